#!/usr/bin/env bash
# The venv that `srnode bench peers` runs ECLARE in (issue #13): its own, because eclare pins scipy.
#
#   scripts/peers-venv.sh            -> .venv-eclare/ (ignored by git), PEER_VENV overrides the folder
#
# torch is installed first and pinned by bench/peers/constraints.txt (the node's 2.13.0: the CPU build where the
# machine's pip finds one), so resolving eclare's requirements cannot bring in another torch build.
set -euo pipefail
cd "$(dirname "$0")/.."
SYSTEM_PY=${SYSTEM_PY:-$( [ -x /usr/bin/python3 ] && echo /usr/bin/python3 || command -v python3 )}
PEER_VENV=${PEER_VENV:-.venv-eclare}
ECLARE_VERSION=${ECLARE_VERSION:-1.0.1}
[ -x "$PEER_VENV/bin/python" ] || "$SYSTEM_PY" -m venv "$PEER_VENV"
PY="$PEER_VENV/bin/python"
"$PY" -m pip install -q -c bench/peers/constraints.txt "torch==2.13.0"
"$PY" -m pip install -q -c bench/peers/constraints.txt "eclare==${ECLARE_VERSION}"
"$PY" -c "import eclare, torch; print('eclare', '${ECLARE_VERSION}', 'torch', torch.__version__)"
