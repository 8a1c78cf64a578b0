#!/bin/bash
# Slurm Prolog: register the job with llem and make sure the node sampler runs.
# Always exits 0 (a failing Prolog drains the node); problems go to syslog (tag llem-prolog)
# and to 'llem doctor'. Settings: /etc/default/llem (see llem-hook.sh).
here=${BASH_SOURCE[0]%/*}
if [ -r "$here/llem-hook.sh" ]; then
    # shellcheck source=llem-hook.sh
    . "$here/llem-hook.sh" && llem_hook prolog
else
    /usr/bin/logger -t llem-prolog -- "job ${SLURM_JOB_ID:-?}: $here/llem-hook.sh missing; llem skipped"
fi
exit 0
