#!/usr/bin/env bash
# Install what the real-Slurm tests (tests/slurm/) and the SPANK plugin (spank/) need:
# slurmctld, slurmd, munged, Slurm's client commands, spank.h, a C compiler and runuser,
# and shellcheck for the Slurm hook scripts (slurm/*.sh); slurmdbd and MariaDB for the tests
# that compare llem-acct with sacct (the harness starts them on a temp datadir).
#
# Idempotent: does nothing when everything is already there. Never starts a daemon (the
# test harness starts and stops its own). Exits non-zero with a message when something is
# missing and cannot be installed (not root, no apt-get, apt failure).
#
# Usage: scripts/install-slurm.sh [--check]   (--check: report only, install nothing)
set -euo pipefail

check_only=0
case "${1:-}" in
    --check) check_only=1 ;;
    "") ;;
    *) echo "usage: $0 [--check]" >&2; exit 2 ;;
esac

packages=(slurm-wlm munge libslurm-dev gcc make libc6-dev binutils util-linux shellcheck
          slurmdbd mariadb-server)

# path -> package that provides it
declare -A wanted=(
    [/usr/sbin/slurmctld]=slurm-wlm
    [/usr/sbin/slurmd]=slurm-wlm
    [/usr/bin/sbatch]=slurm-wlm
    [/usr/sbin/munged]=munge
    [/usr/sbin/mungekey]=munge
    [/usr/include/slurm/spank.h]=libslurm-dev
    [/usr/bin/gcc]=gcc
    [/usr/bin/make]=make
    [/usr/bin/nm]=binutils
    [/usr/sbin/runuser]=util-linux
    [/usr/bin/shellcheck]=shellcheck
    [/usr/sbin/slurmdbd]=slurmdbd
    [/usr/sbin/mariadbd]=mariadb-server
    [/usr/bin/mariadb-install-db]=mariadb-server
)

missing=()
for path in "${!wanted[@]}"; do
    [ -e "$path" ] || missing+=("$path")
done

if [ "${#missing[@]}" -eq 0 ]; then
    echo "install-slurm: everything present ($(/usr/sbin/slurmctld -V 2>/dev/null || echo 'slurm ?')); nothing to do"
    exit 0
fi

echo "install-slurm: missing: ${missing[*]}"
if [ "$check_only" -eq 1 ]; then
    exit 1
fi
if [ "$(id -u)" -ne 0 ]; then
    echo "install-slurm: ERROR: not root, cannot install ${packages[*]}" >&2
    exit 1
fi
if ! command -v apt-get >/dev/null 2>&1; then
    echo "install-slurm: ERROR: no apt-get on this machine; install Slurm (slurmctld, slurmd," \
         "munge, libslurm-dev) by hand" >&2
    exit 1
fi

export DEBIAN_FRONTEND=noninteractive
echo "install-slurm: apt-get update"
if ! apt-get update -q >/dev/null; then
    echo "install-slurm: ERROR: apt-get update failed" >&2
    exit 1
fi
echo "install-slurm: apt-get install ${packages[*]}"
if ! apt-get install -y -q --no-install-recommends "${packages[@]}" >/dev/null; then
    echo "install-slurm: ERROR: apt-get install ${packages[*]} failed" >&2
    exit 1
fi

still=()
for path in "${!wanted[@]}"; do
    [ -e "$path" ] || still+=("$path")
done
if [ "${#still[@]}" -ne 0 ]; then
    echo "install-slurm: ERROR: still missing after install: ${still[*]}" >&2
    exit 1
fi
echo "install-slurm: installed $(/usr/sbin/slurmctld -V)"
