#!/bin/bash
# Slurm Epilog: final reading, seal the job's energy data and export it for the ledger.
# Always exits 0 (a failing Epilog drains the node); problems go to syslog (tag llem-epilog)
# and to 'llem doctor'. Settings: /etc/default/llem (see llem-hook.sh).
here=${BASH_SOURCE[0]%/*}
if [ -r "$here/llem-hook.sh" ]; then
    # shellcheck source=llem-hook.sh
    . "$here/llem-hook.sh" && llem_hook epilog
else
    /usr/bin/logger -t llem-epilog -- "job ${SLURM_JOB_ID:-?}: $here/llem-hook.sh missing; llem skipped"
fi
exit 0
