#!/bin/bash
# One lease of the GPU machine (device tool, repo root, carry [".whl", "devcarry"]), issue #13 items 1, 2 and 4:
#   1. the network's forward variants (bench/gpu_net.py) and the ceilings (copy bandwidth, bf16 matmul);
#   2. srnode bench engine 512x512x300 x2 through-plane, eager then torch.compile, each with a profile;
#   3. srnode train: the prior on devcarry/train (sources.json), all nets;
#   4. srnode eval on the held-out series with the old and the new prior, beside ECLARE (bench/gpu_peers.sh).
# Every stage has its own time cap; results are re-packed into $OUT/results.tgz after each stage, so a cut-off run
# still returns what it did. DRY=1 runs the same stages on the CPU at toy sizes (to test this script).
set -u
export PYTHONUNBUFFERED=1
STEPS=${STEPS:-3000}
DRY=${DRY:-0}
R=$OUT/r; mkdir -p "$R"
T0=$(date +%s)
log() { echo "[$(( $(date +%s) - T0 )) s] $*" | tee -a "$R/session.log"; }
pack() { tar -C "$OUT" -czf "$OUT/results.tgz" r 2>/dev/null; }
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    >"$R/pip.log" 2>&1 || log "pip install of .whl failed (see pip.log)"
fi
export PYTHONPATH=/tmp/site:$PWD
PY=python3
SR="$PY -m node.app.cli"
if [ "$DRY" = 1 ]; then
  DEV=cpu; SHAPE=64,64,40; STEPS=20; NETB=(--budget-s 60); EV=(--max-slices 24 --crop 96)
else
  DEV=cuda; SHAPE=512,512,300; NETB=(--budget-s 70); EV=()
fi
{ nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,driver_version --format=csv; $PY -c "import torch, sys; print(sys.version, torch.__version__, torch.cuda.is_available())"; } >"$R/gpu.txt" 2>&1
log "start: $(tr '\n' ' ' <"$R/gpu.txt")"; pack

log "1. network forward variants"
timeout 100 $PY bench/gpu_net.py --out "$R/net.json" "${NETB[@]}" >"$R/net.log" 2>&1; log "net rc=$?"; pack

log "2a. engine, eager"
timeout 60 $SR bench --quiet engine --device $DEV --shape $SHAPE --source devcarry/eval/ph1.npz --repeat 2 \
  --profile "$R/profile-eager.txt" >"$R/engine-eager.log" 2>&1; log "engine eager rc=$?"
cp bench/results/engine-*.json "$R/" 2>/dev/null; pack
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
cp bench/results/engine-*.json "$R/" 2>/dev/null; pack

log "3. train the prior, $STEPS steps per net"
cp models/weights/prior.pt "$R/prior-old.pt"
timeout 150 $SR train devcarry/train/*.npz --steps "$STEPS" --device $DEV --out "$R/prior.pt" --quiet \
  --sources devcarry/train/sources.json >"$R/train.log" 2>&1; log "train rc=$?"; pack

log "4. ECLARE (background) and evals"
if [ -f bench/gpu_peers.sh ]; then
  (timeout 190 bash bench/gpu_peers.sh "$R/peers" >"$R/peers.log" 2>&1; echo "peers rc=$?" >>"$R/peers.log") &
  PEERS=$!
fi
ev() {  # tag weights series args...
  local tag=$1 w=$2 s=$3; shift 3
  timeout 100 $SR eval "devcarry/eval/$s.npz" --device $DEV --weights "$w" "${EV[@]}" --quiet \
    --json "$R/eval-$tag.json" "$@" >"$R/eval-$tag.log" 2>&1
  echo "$tag rc=$? $(tail -1 "$R/eval-$tag.log")" >>"$R/evals.txt"
}
NEW="$R/prior.pt"; [ -f "$NEW" ] || NEW=models/weights/prior.pt
for w in new old; do
  W=$NEW; [ $w = old ] && W="$R/prior-old.pt"
  pids=()
  ev "$w-ge_t1-through2" "$W" ge_t1 --axis through --factor 2 & pids+=($!)
  ev "$w-ctbody-through2" "$W" ctbody --axis through --factor 2 & pids+=($!)
  ev "$w-ge_t1-through2-fast" "$W" ge_t1 --axis through --factor 2 --fast & pids+=($!)
  ev "$w-ctbody-through2-fast" "$W" ctbody --axis through --factor 2 --fast & pids+=($!)
  wait "${pids[@]}"; pids=()
  ev "$w-ph1-through2" "$W" ph1 --axis through --factor 2 & pids+=($!)
  ev "$w-mpr-through2" "$W" mpr --axis through --factor 2 & pids+=($!)
  ev "$w-ctbody-in2" "$W" ctbody --axis in --factor 2 & pids+=($!)
  ev "$w-ge_t1-in2" "$W" ge_t1 --axis in --factor 2 & pids+=($!)
  wait "${pids[@]}"
  log "evals $w done"; pack
done
if [ -n "${PEERS:-}" ]; then wait "$PEERS"; fi
log "done"; pack
