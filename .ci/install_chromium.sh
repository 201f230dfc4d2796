#!/usr/bin/env bash
# Headless Chromium from Debian's packages, for the HTML report tests (tests/test_report_html.py).
# With CI=true those tests fail (not skip) when chromium is missing, so CI must run this first.
set -euo pipefail
if command -v chromium >/dev/null 2>&1; then
    echo "chromium present: $(chromium --version 2>/dev/null || true)"
    exit 0
fi
SUDO=""
if [ "$(id -u)" != "0" ]; then SUDO="sudo"; fi
$SUDO apt-get update -qq
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq chromium
chromium --version
