#!/usr/bin/env bash
# Install Debian's PostgreSQL server binaries for the tests of the PostgreSQL ledger (marker:
# postgres). The tests never use the packaged cluster: each session makes its own with initdb
# in a temporary folder, started as an unprivileged user on a Unix socket
# (tests/helpers/postgres.py). The package's maintainer scripts may start the default
# cluster; it is left alone. Idempotent; exits non-zero with a message when it cannot install.
set -euo pipefail
if ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1; then
    echo "install-postgresql: $(ls -d /usr/lib/postgresql/*/bin | tail -n 1)/postgres present"
    exit 0
fi
if [ "$(id -u)" -ne 0 ] || ! command -v apt-get >/dev/null 2>&1; then
    echo "install-postgresql: ERROR: PostgreSQL server binaries missing and this is not root on Debian" >&2
    exit 1
fi
export DEBIAN_FRONTEND=noninteractive
echo "install-postgresql: apt-get install postgresql"
apt-get update -q >/dev/null
apt-get install -y -q --no-install-recommends postgresql >/dev/null
ls /usr/lib/postgresql/*/bin/initdb
