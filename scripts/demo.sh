#!/usr/bin/env bash
# Sets up (scripts/setup.sh) and runs the demo: Orthanc as the PACS, the node, a generated MR+CT+PET
# head study sent by storescu, the fused series listed from Orthanc, a PNG preview, `dicomnode status`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export TCP_NODELAY=1
.venv/bin/dicomnode demo "$@"
