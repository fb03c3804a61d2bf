#!/usr/bin/env bash
# Headless Chromium (Debian package) for the HTML report/preview tests. Idempotent: does
# nothing when a chromium binary is already there.
set -euo pipefail
for b in chromium chromium-browser; do
  if command -v "$b" >/dev/null 2>&1; then echo "chromium: $(command -v "$b")"; exit 0; fi
done
SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo"
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
$SUDO apt-get install -y -qq --no-install-recommends chromium fonts-dejavu-core >/dev/null
command -v chromium
