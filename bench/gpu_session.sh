#!/bin/bash
# One lease of the GPU machine (device tool, repo root, carry below), issue #13 items 1, 2 and 4:
#   1. the network's forward variants (bench/gpu_net.py) and the ceilings (copy bandwidth, bf16 matmul);
#   2. srnode bench engine 512x512x300 x2 through-plane, eager then torch.compile, each with a profile;
#   3. ECLARE beside srnode and cubic (bench/gpu_peers.sh, background), while srnode train trains the prior on
#      $TRAIN (default devcarry/trainS: human MR held out from it) -- through-plane nets, then in-plane nets;
#   4. srnode eval on the held-out series (x2 through, whole and fast; x2 in-plane), old prior and new.
# Carry: [".whl", "devcarry/eval", "devcarry/trainS"] (bench/prior_data.py exports; .whl from device-wheels.sh).
# Every stage has its own time cap; results are re-packed into $OUT/results.tgz after each stage, so a cut-off run
# still returns what it did. SKIP_SPEED=1 skips stages 1-2. DRY=1 runs the same stages on the CPU at toy sizes (to test this script).
set -u
export PYTHONUNBUFFERED=1
STEPS=${STEPS:-6000}
DRY=${DRY:-0}
R=$OUT/r; mkdir -p "$R"
T0=$(date +%s)
log() { echo "[$(( $(date +%s) - T0 )) s] $*" | tee -a "$R/session.log"; }
pack() { tar -C "$OUT" -czf "$OUT/results.tgz" r 2>/dev/null; }
touch "$R/.t0"
newresults() { find bench/results -name "$1-*.json" -newer "$R/.t0" -exec cp {} "$R/" \; 2>/dev/null; }
if [ "$DRY" = 1 ]; then
  PY=${PY:-.venv/bin/python}; export PYTHONPATH=$PWD
else
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    >"$R/pip.log" 2>&1 || log "pip install of .whl failed (see pip.log)"
  export PYTHONPATH=/tmp/site:$PWD
  PY=python3
fi
SR="$PY -m node.app.cli"
if [ "$DRY" = 1 ]; then
  DEV=cpu; SHAPE=64,64,40; STEPS=20; NETB=(--budget-s 60); EV=(--max-slices 24 --crop 96)
else
  DEV=cuda; SHAPE=512,512,300; NETB=(--budget-s 60); EV=()
fi
{ nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,driver_version --format=csv; $PY -c "import torch, sys; print(sys.version, torch.__version__, torch.cuda.is_available())"; } >"$R/gpu.txt" 2>&1
log "start: $(tr '\n' ' ' <"$R/gpu.txt")"; pack

if [ "${SKIP_SPEED:-0}" != 1 ]; then
log "1. network forward variants"
timeout 90 $PY bench/gpu_net.py --out "$R/net.json" "${NETB[@]}" >"$R/net.log" 2>&1; log "net rc=$?"; pack

log "2a. engine, eager"
timeout 60 $SR bench --quiet engine --device $DEV --shape $SHAPE --source devcarry/eval/ph1.npz --repeat 2 \
  --profile "$R/profile-eager.txt" >"$R/engine-eager.log" 2>&1; log "engine eager rc=$?"
newresults engine; pack
# the compile mode whose forward was faster in stage 1 (max-autotune only when it beat default by 10 %)
MODE=$($PY - "$R/net.json" <<'PYEOF'
import json, sys
try:
    v = json.load(open(sys.argv[1]))["variants"]
    d, m = v.get("compile_default", {}).get("ms_per_call"), v.get("compile_max_autotune", {}).get("ms_per_call")
    print("max-autotune" if d and m and m < 0.9 * d else "default")
except Exception:
    print("default")
PYEOF
)
log "2b. engine, torch.compile $MODE"
timeout 80 $SR bench --quiet engine --device $DEV --shape $SHAPE --source devcarry/eval/ph1.npz --repeat 2 \
  --torch-compile "$MODE" --profile "$R/profile-compile.txt" >"$R/engine-compile.log" 2>&1; log "engine compile rc=$?"
newresults engine; pack

fi

TRAIN=${TRAIN:-devcarry/trainS}
log "3. ECLARE (background, srnode beside it on the shipped prior) and the prior on $TRAIN, $STEPS steps per net"
if [ -f bench/gpu_peers.sh ] && [ "${PEERS:-1}" = 1 ] && [ "$DRY" != 1 ]; then
  (PEERS_SERIES=${PEERS_SERIES:-"xa30t1 ctbody"} ECLARE_PATCHES=${ECLARE_PATCHES:-1000000} ECLARE_TIMEOUT=${ECLARE_TIMEOUT:-145} \
   PEERS_BUDGET_S=${PEERS_BUDGET_S:-295} timeout 305 bash bench/gpu_peers.sh "$R/peers" >"$R/peers-run.log" 2>&1
   echo "peers rc=$?" >>"$R/peers-run.log") &
  PEERS_PID=$!
fi
cp models/weights/prior.pt "$R/prior-old.pt"; cp models/weights/prior.json "$R/prior-old.json"
cp models/weights/prior.pt "$R/prior.pt"; cp models/weights/prior.json "$R/prior.json"
# the x2 nets only (FACTORS), the others kept from the shipped prior: the evals are x2, and the host-side pair
# building of every net (~10-20 s each) would not fit the lease for all seven
for kind in through in; do  # through first: a cut-off run still has it (and the shipped in-plane nets)
  timeout ${TRAIN_CAP:-100} $SR train "$TRAIN"/*.npz --steps "$STEPS" --device $DEV --out "$R/prior.pt" --quiet \
    --only $kind --factors ${FACTORS:-2} --sources "$TRAIN/sources.json" >"$R/train-$kind.log" 2>&1
  log "train $kind rc=$? $(tail -1 "$R/train-$kind.log" | cut -c1-300)"; cp "$R/prior.json" "$R/prior-$kind.json"; pack
done

log "4. evals, old and new prior"
ev() {  # tag weights series args...
  local tag=$1 w=$2 s=$3; shift 3
  timeout ${EVAL_CAP:-70} $SR eval "devcarry/eval/$s.npz" --device $DEV --weights "$w" "${EV[@]}" --quiet \
    --json "$R/eval-$tag.json" "$@" >"$R/eval-$tag.log" 2>&1
  echo "$tag rc=$? $(tail -1 "$R/eval-$tag.log")" >>"$R/evals.txt"
}
round1() {  # weights tag: whole engine, x2 through-plane, every held-out series
  ev "$2-xa30t1-through2" "$1" xa30t1 --axis through --factor 2 & pids+=($!)
  ev "$2-mpr_r-through2" "$1" mpr_r --axis through --factor 2 & pids+=($!)
  ev "$2-ctbody-through2" "$1" ctbody --axis through --factor 2 & pids+=($!)
  ev "$2-ge_t1-through2" "$1" ge_t1 --axis through --factor 2 & pids+=($!)
  ev "$2-ph1-through2" "$1" ph1 --axis through --factor 2 & pids+=($!)
}
round2() {  # weights tag: fast mode, and x2 in-plane
  ev "$2-xa30t1-through2-fast" "$1" xa30t1 --axis through --factor 2 --fast & pids+=($!)
  ev "$2-mpr_r-through2-fast" "$1" mpr_r --axis through --factor 2 --fast & pids+=($!)
  ev "$2-ctbody-through2-fast" "$1" ctbody --axis through --factor 2 --fast & pids+=($!)
  ev "$2-ctbody-in2" "$1" ctbody --axis in --factor 2 & pids+=($!)
  ev "$2-mpr_r-in2" "$1" mpr_r --axis in --factor 2 & pids+=($!)
}
for step in "round1 new" "round1 old" "round2 new" "round2 old"; do
  set -- $step
  if [ $(( $(date +%s) - T0 )) -gt ${EVAL_DEADLINE:-500} ]; then log "skipped $step: past ${EVAL_DEADLINE:-500} s"; continue; fi
  W="$R/prior.pt"; [ "$2" = old ] && W="$R/prior-old.pt"
  pids=(); $1 "$W" "$2"; wait "${pids[@]}"
  log "$step done"; pack
done
if [ -n "${PEERS_PID:-}" ]; then wait "$PEERS_PID"; log "peers: $(tail -2 "$R/peers-run.log" | tr '\n' ' ')"; fi
log "done"; pack
