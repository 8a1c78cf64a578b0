#!/usr/bin/env bash
# Install Debian's prometheus (server and promtool) and prometheus-node-exporter for the
# metrics tests (tests/test_metrics_prometheus.py): the real node_exporter reads llem's
# textfile, the real Prometheus scrapes it on the loopback. The packages' maintainer scripts
# try to start the daemons; the tests start their own on 127.0.0.1 and stop them by pid.
# Idempotent; exits non-zero with a message when it cannot install them.
set -euo pipefail
need=()
[ -x /usr/bin/prometheus ] && [ -x /usr/bin/promtool ] || need+=(prometheus)
[ -x /usr/bin/prometheus-node-exporter ] || need+=(prometheus-node-exporter)
if [ "${#need[@]}" -eq 0 ]; then
    echo "install-prometheus: $(/usr/bin/prometheus --version 2>&1 | head -n 1) present"
    exit 0
fi
if [ "$(id -u)" -ne 0 ] || ! command -v apt-get >/dev/null 2>&1; then
    echo "install-prometheus: ERROR: ${need[*]} missing and this is not root on Debian" >&2
    exit 1
fi
export DEBIAN_FRONTEND=noninteractive
echo "install-prometheus: apt-get install ${need[*]}"
apt-get update -q >/dev/null
apt-get install -y -q --no-install-recommends "${need[@]}" >/dev/null
/usr/bin/prometheus --version 2>&1 | head -n 1
/usr/bin/prometheus-node-exporter --version 2>&1 | head -n 1
