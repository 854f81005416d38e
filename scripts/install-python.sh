#!/usr/bin/env bash
# srnode's Python dependencies, one script for `make install` (CI, developers) and the Dockerfile.
#
#   scripts/install-python.sh [--dev] [--editable]
#
#   --dev        also the test/lint tools (pytest, mypy, ruff, scipy)
#   --editable   install the checkout in place (pip -e), as developers and CI do; the image installs a copy
#
# torch is pinned by TORCH_VERSION and installed first, alone, so nothing else can pull a different build.
# On Linux x86_64 the default torch wheel is the CUDA build (the image's GPU path); a CPU-only machine may set
# TORCH_INDEX_URL to a CPU wheel index. Nothing here downloads model weights: they ship in models/weights.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python3}
TORCH_VERSION=${TORCH_VERSION:-2.13.0}
extras=""
editable=()
for arg in "$@"; do
  case "$arg" in
    --dev) extras="[dev]" ;;
    --editable) editable=(-e) ;;
    *) echo "install-python.sh: unknown option $arg" >&2; exit 2 ;;
  esac
done
index=()
[ -n "${TORCH_INDEX_URL:-}" ] && index=(--index-url "$TORCH_INDEX_URL")
"$PY" -m pip install -q "torch==${TORCH_VERSION}" "${index[@]}"
"$PY" -m pip install -q "${editable[@]}" ".${extras}"
