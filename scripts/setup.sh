#!/usr/bin/env bash
# Installs what dicomnode needs on a fresh Debian machine (run as root, or with sudo available):
# the DICOM peers from Debian and a virtual environment with the CPU build of torch, then the project.
set -euo pipefail
cd "$(dirname "$0")/.."

SUDO=""
if [ "$(id -u)" != "0" ]; then SUDO="sudo"; fi
need_apt=0
# The peers the tests and the demo start on loopback: Orthanc (the PACS, with its DICOMweb, web
# viewer and PostgreSQL plugins), dcmtk (the scanner), dicom3tools (dciodvfy), PostgreSQL, and
# Chromium with its driver for the dashboard and viewer tests.
APT_PACKAGES="orthanc orthanc-dicomweb orthanc-webviewer orthanc-postgresql dcmtk dicom3tools postgresql chromium chromium-driver"
for bin in storescu echoscu dciodvfy chromium chromedriver; do command -v "$bin" >/dev/null 2>&1 || need_apt=1; done
[ -x /usr/sbin/Orthanc ] || need_apt=1
for pkg in $APT_PACKAGES; do dpkg -s "$pkg" >/dev/null 2>&1 || need_apt=1; done
if [ "$need_apt" = "1" ]; then
  echo "[setup] apt-get install $APT_PACKAGES"
  $SUDO env DEBIAN_FRONTEND=noninteractive apt-get update -qq
  # policy-rc.d may forbid starting services in containers; the packages install all the same.
  $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
    $APT_PACKAGES >/dev/null
fi

PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  echo "[setup] creating .venv"
  "$PY" -m venv .venv
fi
# torch first, pinned: 2.13.0 is the CPU build here. A GPU site installs its CUDA build instead,
# e.g. `pip install torch --index-url https://download.pytorch.org/whl/cu124`, before this script.
if ! .venv/bin/python -c "import torch" >/dev/null 2>&1; then
  echo "[setup] pip install torch==2.13.0"
  .venv/bin/pip install -q --disable-pip-version-check torch==2.13.0
fi
# The project is installed editable: code changes need no reinstall, only a changed pyproject.toml.
STAMP=".venv/.installed-$(sha256sum pyproject.toml | cut -c1-16)"
if [ -f "$STAMP" ] && .venv/bin/python -c "import dicomnode" >/dev/null 2>&1; then
  echo "[setup] .venv already has this pyproject.toml installed"
else
  echo "[setup] pip install -e .[test]"
  .venv/bin/pip install -q --disable-pip-version-check -e '.[test]'
  rm -f .venv/.installed-*
  touch "$STAMP"
fi
echo "[setup] done"
