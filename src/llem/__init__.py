"""llem: energy and carbon accounting for Slurm/HPC clusters and for any command.

The Python API (:mod:`llem.api`) is imported on first use, so that ``import llem`` stays
cheap and starts nothing::

    import llem

    with llem.window("train", unit="tokens") as w:
        ...
        w.add(n_tokens)
    print(w.result.energy_per_unit_j)
"""

__version__ = "0.1.0"

_API = frozenset(
    {
        "Measurement",
        "Window",
        "WindowStateError",
        "begin_window",
        "end_window",
        "measured",
        "window",
    }
)


def __getattr__(name: str):
    if name in _API:
        from llem import api

        return getattr(api, name)
    raise AttributeError(f"module 'llem' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | _API)
