#!/bin/bash
# Shared body of the llem Slurm hooks (prolog.sh, epilog.sh, epilog-slurmctld.sh).
#
# Slurm runs these as root with no PATH and no HOME, and drains a node whose Prolog or
# Epilog exits non-zero. So: absolute paths only, a time limit around llem, every branch
# logged with logger(1), and exit status 0 whatever happens inside llem.
#
# Settings come from /etc/default/llem (or the file named by LLEM_DEFAULTS_FILE), read as
# plain KEY=VALUE lines, never executed, so that a broken file cannot break the hook:
#   LLEM_BIN=/opt/llem/venv/bin/llem     the llem executable (a virtual environment is fine)
#   LLEM_CONFIG=/etc/llem/llem.yaml      the config file
#   LLEM_TIMEOUT=10                      seconds before llem is killed
# Any other LLEM_* line (LLEM_POWERCAP_ROOT, ...) is exported to llem as it is.

llem_hook() {
    local kind=$1 tag="llem-$1" job=${SLURM_JOB_ID:-?}
    local defaults=${LLEM_DEFAULTS_FILE:-/etc/default/llem}
    local line key value out rc

    if [ -r "$defaults" ]; then
        while IFS= read -r line || [ -n "$line" ]; do
            case $line in
                LLEM_*=*)
                    key=${line%%=*}
                    value=${line#*=}
                    value=${value%\"}; value=${value#\"}
                    value=${value%\'}; value=${value#\'}
                    case $key in
                        *[!A-Z0-9_]*) /usr/bin/logger -t "$tag" -- "ignored bad line in $defaults: $key" 2>/dev/null ;;
                        *) export "$key=$value" ;;
                    esac
                    ;;
            esac
        done < "$defaults"
    fi
    LLEM_BIN=${LLEM_BIN:-/usr/local/bin/llem}
    LLEM_TIMEOUT=${LLEM_TIMEOUT:-10}
    case $LLEM_TIMEOUT in ''|*[!0-9]*) LLEM_TIMEOUT=10 ;; esac

    if [ ! -x "$LLEM_BIN" ]; then
        /usr/bin/logger -t "$tag" -- "job $job: $LLEM_BIN is not executable; llem skipped" 2>/dev/null
        return 0
    fi
    out=$(/usr/bin/timeout -k 2 "$LLEM_TIMEOUT" "$LLEM_BIN" "$kind" 2>&1 </dev/null)
    rc=$?
    if [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then
        /usr/bin/logger -t "$tag" -- "job $job: llem $kind killed after ${LLEM_TIMEOUT}s" 2>/dev/null
    elif [ "$rc" -ne 0 ]; then
        /usr/bin/logger -t "$tag" -- "job $job: llem $kind exited $rc: ${out:0:2000}" 2>/dev/null
    else
        /usr/bin/logger -t "$tag" -- "${out:0:2000}" 2>/dev/null
    fi
    return 0
}
