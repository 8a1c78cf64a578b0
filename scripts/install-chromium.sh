#!/usr/bin/env bash
# Install Debian's chromium for the report test that opens the HTML report headless
# (tests/test_report_html.py). Idempotent; exits non-zero with a message when it cannot.
set -euo pipefail
if [ -x /usr/bin/chromium ]; then
    echo "install-chromium: $(/usr/bin/chromium --version 2>/dev/null || echo chromium) present"
    exit 0
fi
if [ "$(id -u)" -ne 0 ] || ! command -v apt-get >/dev/null 2>&1; then
    echo "install-chromium: ERROR: chromium missing and this is not root on Debian" >&2
    exit 1
fi
export DEBIAN_FRONTEND=noninteractive
echo "install-chromium: apt-get install chromium"
apt-get update -q >/dev/null
apt-get install -y -q --no-install-recommends chromium >/dev/null
/usr/bin/chromium --version
