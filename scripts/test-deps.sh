#!/bin/sh
# What the test suite needs beyond the Python packages of `make install`: headless Chromium from Debian,
# which opens the evaluation report in tests/integration/test_report.py. Installed when missing, as root
# or through sudo; `make test` runs this first.
set -eu
command -v chromium >/dev/null 2>&1 && exit 0
if [ "$(id -u)" -eq 0 ]; then
  as_root=""
elif command -v sudo >/dev/null 2>&1; then
  as_root="sudo"
else
  echo "scripts/test-deps.sh: chromium is missing and neither root nor sudo can install it: apt-get install -y chromium" >&2
  exit 1
fi
$as_root apt-get update -qq
$as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null  # errors still go to stderr
