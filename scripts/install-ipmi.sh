#!/usr/bin/env bash
# Install the real IPMI parts of the BMC power tests (tests/test_ipmi.py): OpenIPMI's BMC
# simulator ipmi_sim (package openipmi) and its headers (libopenipmi-dev, to build the tests'
# DCMI power module tests/ipmisim/dcmi_power.c), and both clients llem drives, FreeIPMI's
# ipmi-dcmi (freeipmi-tools) and ipmitool. ipmi_sim runs on the loopback, started and stopped
# by the tests; the openipmi package's own service is not used.
# Idempotent; exits non-zero with a message when it cannot install them.
set -euo pipefail
need=()
[ -x /usr/bin/ipmi_sim ] || need+=(openipmi)
[ -f /usr/include/OpenIPMI/mcserv.h ] || need+=(libopenipmi-dev)
[ -x /usr/sbin/ipmi-dcmi ] || [ -x /usr/bin/ipmi-dcmi ] || need+=(freeipmi-tools)
[ -x /usr/bin/ipmitool ] || need+=(ipmitool)
command -v gcc >/dev/null 2>&1 || need+=(gcc)
if [ "${#need[@]}" -eq 0 ]; then
    echo "install-ipmi: ipmi_sim, OpenIPMI headers, ipmi-dcmi and ipmitool present"
    exit 0
fi
if [ "$(id -u)" -ne 0 ] || ! command -v apt-get >/dev/null 2>&1; then
    echo "install-ipmi: ERROR: ${need[*]} missing and this is not root on Debian" >&2
    exit 1
fi
export DEBIAN_FRONTEND=noninteractive
echo "install-ipmi: apt-get install ${need[*]}"
apt-get update -q >/dev/null
apt-get install -y -q --no-install-recommends "${need[@]}" >/dev/null
ipmitool -V
