#!/bin/bash
# `srnode bench peers` on the GPU machine (issue #13): srnode, cubic and ECLARE side by side on the held-out human
# MR (mr_t1_3d_axial_ge) and body CT (ct_body_j2k_siemens_petct), x2 through-plane, whole volumes, on cuda.
#
#   bash bench/gpu_peers.sh OUTDIR        (from the repo root; OUTDIR gets peers-gpu-<UTC>.json/.png + logs)
#
# Installs nothing: the caller has put the wheels of .whl/ (eclare 1.0.1, radifox-utils, sigpy-lite, transforms3d,
# nibabel + the DICOM stack) into /tmp/site with --no-deps and PYTHONPATH=/tmp/site:$PWD, so ECLARE runs on the
# machine's own torch/numpy/scipy (--peer-python). Inputs: devcarry/eval/{ge_t1,ctbody}.npz (bench/prior_data.py).
# Knobs (environment):
#   ECLARE_PATCHES  ECLARE's patch budget per series, default 300000 = 30 % of its 1,000,000: the full budget was
#                   estimated at ~100 s of training per series (data-loader bound), which does not fit the ~150 s
#                   slot for both series (docs/benchmarks.md "ECLARE on the GPU: the estimate")
#   ECLARE_TIMEOUT  seconds per ECLARE run (default 110)
#   PEERS_BUDGET_S  the whole run's deadline (default 175): ECLARE's caps are cut to fit it, and the CT's patch
#                   budget too, at the rate measured on the MR; a hard `timeout` follows 5 s later
#   PEERS_SERIES    the devcarry/eval exports to run, in order (default "ge_t1 ctbody")
#   PEERS_WEIGHTS   srnode's prior (default models/weights/prior.pt), PEERS_DEVICE (cuda), PY (python3)
#   PEERS_ARGS      extra options, e.g. for a CPU check "--crop 24 --max-slices 9 --finetune-steps 2 --tta-passes 1"
#   DRY=1           (as bench/gpu_session.sh's dry run) the same on the CPU at a toy size: PEERS_DEVICE=cpu,
#                   ECLARE_PATCHES=128, PEERS_ARGS="--crop 16 --max-slices 9 --finetune-steps 2 --tta-passes 1"
# Exit: 0; 1 when an ECLARE run failed or was cut off (the JSON says which and why); 2 when an input is missing.
set -u
OUTDIR=${1:?usage: bash bench/gpu_peers.sh OUTDIR}
PY=${PY:-python3}
if [ "${DRY:-0}" = 1 ]; then
  : "${PEERS_DEVICE:=cpu}" "${ECLARE_PATCHES:=128}" "${PEERS_ARGS:=--crop 16 --max-slices 9 --finetune-steps 2 --tta-passes 1}"
fi
DEVICE=${PEERS_DEVICE:-cuda}
PATCHES=${ECLARE_PATCHES:-300000}
TIMEOUT=${ECLARE_TIMEOUT:-110}
BUDGET=${PEERS_BUDGET_S:-175}
mkdir -p "$OUTDIR"
STAMP=$(date -u +%Y%m%dT%H%M%SZ)
WORK=$(mktemp -d /tmp/peers-work.XXXXXX)
J=$OUTDIR/peers-gpu-$STAMP.json
[ "$DEVICE" = cuda ] || J=$OUTDIR/peers-$DEVICE-$STAMP.json
SERIES=()
for k in ${PEERS_SERIES:-ge_t1 ctbody}; do
  f=devcarry/eval/$k.npz
  [ -f "$f" ] || { echo "gpu_peers: $f is missing (bench/prior_data.py export)"; exit 2; }
  SERIES+=("$f")
done
REASON="the full budget (1,000,000 patches) was estimated at ~100-125 s per series on the H200 machine (data-loader bound: ~0.7-0.9 ms of CPU per patch over ECLARE's 8 workers; GPU ~5.8 PFLOP per 1M patches; docs/benchmarks.md) and does not fit the ~150 s slot for both series"
[ "$PATCHES" -ge 1000000 ] && REASON=""
# shellcheck disable=SC2086  # PEERS_ARGS is a list of options
timeout -k 5 $((BUDGET + 5)) "$PY" -m node.app.cli --log-level INFO bench peers \
  "${SERIES[@]}" --factor 2 --device "$DEVICE" \
  --n-patches "$PATCHES" --batch-size 128 --peer-python "$PY" --peer-timeout "$TIMEOUT" --deadline-s "$BUDGET" \
  --budget-reason "$REASON" --workdir "$WORK" --out "$J" \
  --note "$(nproc) CPU cores; $(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1); ${PEERS_ARGS:-whole volumes}" \
  ${PEERS_WEIGHTS:+--weights "$PEERS_WEIGHTS"} ${PEERS_ARGS:-} > "$OUTDIR/peers.log" 2>&1
rc=$?
# ECLARE's logs: its progress bar rewrites one line with \r; keep the last 60 lines of each
for d in "$WORK"/*/; do
  [ -f "$d/peer.log" ] && tr '\r' '\n' < "$d/peer.log" | grep -v '^\s*$' | tail -60 > "$OUTDIR/eclare-$(basename "$d").log"
done
rm -rf "$WORK"
grep -v " INFO " "$OUTDIR/peers.log" | tail -8
echo "gpu_peers: exit $rc; $(ls "$OUTDIR")"
exit $rc
