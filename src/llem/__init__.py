"""llem: energy and carbon accounting for Slurm/HPC clusters and for any command."""

__version__ = "0.1.0"
