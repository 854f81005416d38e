#!/usr/bin/env bash
# Debian packages srnode's tests and demo use as real peers. Idempotent: installs only what is missing.
# Shared by `make`, .ci/run and the Dockerfile. chromium + chromium-driver: the dashboard's browser test (selenium).
set -euo pipefail
pkgs=(python3-venv dcmtk dicom3tools orthanc orthanc-dicomweb orthanc-python redis-server chromium chromium-driver)
[ "${1:-}" = "--runtime" ] && pkgs=(dcmtk)
missing=()
for p in "${pkgs[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
[ ${#missing[@]} -eq 0 ] && exit 0
SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
echo "installing Debian packages: ${missing[*]}"
$SUDO apt-get update -qq
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
# the Debian package starts a system Orthanc on 4242/8042 where it can; tests start their own on free ports.
# Stop it only when this run installed it: an Orthanc the machine already ran is left alone.
if printf '%s\n' "${missing[@]}" | grep -qx orthanc; then
  $SUDO service orthanc stop >/dev/null 2>&1 || true
fi
