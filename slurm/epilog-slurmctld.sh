#!/bin/bash
# Slurm EpilogSlurmctld (on the controller): the job's name, nodelist, account and final state
# for the ledger, which the slurmd Epilog is not told. Runs after the job, off its critical
# path. Always exits 0; problems go to syslog (tag llem-epilog-slurmctld). Settings:
# /etc/default/llem on the controller (see llem-hook.sh).
here=${BASH_SOURCE[0]%/*}
if [ -r "$here/llem-hook.sh" ]; then
    # shellcheck source=llem-hook.sh
    . "$here/llem-hook.sh" && llem_hook epilog-slurmctld
else
    /usr/bin/logger -t llem-epilog-slurmctld -- "job ${SLURM_JOB_ID:-?}: $here/llem-hook.sh missing; llem skipped" 2>/dev/null
fi
exit 0
