#!/usr/bin/env bash
# Install everything the test suite needs on a fresh machine, then run the whole suite.
# Extra arguments go to pytest (e.g. scripts/test.sh -k rapl).
set -euo pipefail
cd "$(dirname "$0")/.."

if [ "$(id -u)" = 0 ]; then
    # Debian's slurm-wlm and munge for the tests against a real local Slurm (marker: slurm),
    # and chromium for the test that opens the HTML report.
    bash scripts/install-slurm.sh
    bash scripts/install-chromium.sh
    bash scripts/install-prometheus.sh  # node_exporter, prometheus, promtool: metrics tests
    bash scripts/install-ipmi.sh  # ipmi_sim, ipmi-dcmi, ipmitool: BMC power tests
    bash scripts/install-postgresql.sh  # initdb, postgres: the PostgreSQL ledger's tests
fi

python3 -m venv .venv
.venv/bin/python -m pip install --quiet --disable-pip-version-check -e '.[test]'

# Lint and format first: cheap, and a failure here fails the run (pyproject.toml's rules).
.venv/bin/ruff check src tests bench share scripts
.venv/bin/ruff format --check src tests bench share scripts

# pytest exits 5 when it collected no test: that fails this script too.
exec .venv/bin/python -m pytest "$@"
