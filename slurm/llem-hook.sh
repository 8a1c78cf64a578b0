#!/bin/bash
# Shared body of the llem Slurm hooks (prolog.sh, epilog.sh, epilog-slurmctld.sh).
#
# Slurm runs these as root with no PATH and no HOME, and drains a node whose Prolog or
# Epilog exits non-zero. So: absolute paths only, a time limit around llem, every branch
# logged with logger(1), and exit status 0 whatever happens inside llem.
#
# The common case needs no Python: the hook drops a registration file (the job's Slurm
# variables and the time) into RUN_DIR/NODE/jobs/ and wakes the node sampler, which takes it
# from there. Only when no sampler is alive does it run `llem prolog` / `llem epilog`, which
# start one (Prolog) or seal the job themselves (Epilog).
#
# Runs on bash 4.2 and later (EL7, EL8 and newer): no bash-5-only feature without a fallback.
# The one it would like is $EPOCHREALTIME (see llem_now_us).
#
# Settings come from /etc/default/llem (or the file named by LLEM_DEFAULTS_FILE), read as
# plain KEY=VALUE lines, never executed, so that a broken file cannot break the hook:
#   LLEM_BIN=/opt/llem/venv/bin/llem     the llem executable (a virtual environment is fine)
#   LLEM_CONFIG=/etc/llem/llem.yaml      the config file
#   LLEM_TIMEOUT=10                      seconds before llem is killed
#   LLEM_RUN_DIR=/run/llem               the config's run_dir (this variable sets both)
# Any other LLEM_* line (LLEM_POWERCAP_ROOT, ...) is exported to llem as it is.

LLEM_JOB_VARS=(SLURM_JOB_ID SLURM_JOB_UID SLURM_JOB_USER SLURM_JOB_GID SLURM_JOB_ACCOUNT
    SLURM_JOB_PARTITION SLURM_CLUSTER_NAME SLURMD_NODENAME SLURM_NODELIST SLURM_JOB_NUM_NODES
    SLURM_JOB_CPUS_PER_NODE SLURM_JOB_GPUS SLURM_JOB_NAME SLURM_ARRAY_JOB_ID
    SLURM_ARRAY_TASK_ID SPANK_LLEM_ENERGY_TAG)

# The hook's time in microseconds since the epoch, into the caller's $now (bash's dynamic
# scope: no command substitution, so no fork on bash 5). Returns 1 when no clock gives
# microseconds; the hook then leaves the job to `llem prolog` / `llem epilog`, whose clock is
# exact, rather than write a registration the sampler cannot date.
#   bash >= 5: $EPOCHREALTIME, free. Below 5 the name is not special, and a value found in the
#     environment there is stale text: it is read only on bash 5.
#   bash 4 (EL7, EL8): /bin/date +%s%6N (GNU coreutils, which every EL has; one fork and
#     exec, about 2 ms). Not printf '%(%s)T' -1: whole seconds move the job's start
#     and end by up to a second, which the coverage figure reads as a gap (and with no
#     argument, bash 4.2's %(...)T prints the epoch, 0).
#   The result must be all digits, at least 16 of them (seconds and 6 decimals): a date that
#     does not know %N prints something else, and then we return 1.
llem_now_us() {
    now=
    if [ "${BASH_VERSINFO[0]}" -ge 5 ] 2>/dev/null; then
        now=${EPOCHREALTIME//[.,]/}
    fi
    if [ -z "$now" ]; then
        now=$(/bin/date +%s%6N 2>/dev/null)
    fi
    case $now in ''|*[!0-9]*) now=; return 1 ;; esac
    [ "${#now}" -ge 16 ] || { now=; return 1; }
    return 0
}

# Write the registration, then hand it to a live sampler. Returns 0 when a sampler took it.
llem_fast_path() {
    local kind=$1 node=${SLURMD_NODENAME:-} job=${SLURM_JOB_ID:-}
    local dir jobs suffix tmp now var pid
    case $node in ''|.*|*[!A-Za-z0-9._-]*) return 1 ;; esac
    case $job in ''|*[!0-9]*) return 1 ;; esac
    dir=${LLEM_RUN_DIR:-/run/llem}/$node
    jobs=$dir/jobs
    # The sampler creates jobs/ (root, 0700); anything else is not ours to write into.
    [ -d "$jobs" ] && [ ! -L "$jobs" ] && [ -O "$jobs" ] || return 1
    if ! llem_now_us; then
        /usr/bin/logger -t "llem-$kind" -- "job $job: no microsecond clock (bash $BASH_VERSION, /bin/date); llem $kind takes the job" 2>/dev/null
        return 1
    fi
    suffix=start
    [ "$kind" = epilog ] && suffix=end
    tmp=$jobs/.$job.$suffix.$$
    if ! {
        printf 'LLEM_EVENT_US=%s\0' "$now"
        for var in "${LLEM_JOB_VARS[@]}"; do
            if [ -n "${!var+set}" ]; then printf '%s=%s\0' "$var" "${!var}"; fi
        done
    } > "$tmp" 2>/dev/null || ! /bin/mv -f "$tmp" "$jobs/$job.$suffix"; then
        /bin/rm -f "$tmp"
        return 1
    fi
    # A live sampler holds sampler.lock; if we can take it, there is none.
    if /usr/bin/flock -n "$dir/sampler.lock" /bin/true 2>/dev/null; then
        return 1
    fi
    read -r pid < "$dir/sampler.pid" 2>/dev/null
    case $pid in ''|*[!0-9]*) return 1 ;; esac
    kill -USR1 "$pid" 2>/dev/null || return 1
    /usr/bin/logger -t "llem-$kind" -- "job $job: handed to the node sampler (pid $pid)" 2>/dev/null
    return 0
}

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

    if [ "$kind" != epilog-slurmctld ] && llem_fast_path "$kind"; then
        return 0
    fi
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
