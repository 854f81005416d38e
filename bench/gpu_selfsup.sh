#!/bin/bash
# The selfsup GPU session (run through the device tool, carry ["devcarry/sr"]): train the shipped prior on the
# training exports, bench the engine on 512x512x300, then `srnode eval` on the held-out shared series.
# Everything lands in $OUT/results.tar (re-packed after each stage, so a cut-off run still returns what it did).
# Args: STEPS (prior steps per net, default 1500); SKIP_TRAIN=1 reuses models/weights/prior.pt.
set -u
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
STEPS=${1:-1500}
R=$OUT/r; mkdir -p $R
pack() { tar -C $OUT -cf $OUT/results.tar r; }
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv | tee $R/gpu.txt
D=devcarry/sr
if [ "${SKIP_TRAIN:-0}" != 1 ]; then
  python -m node.app.cli train $D/tr_ctbody.npz $D/tr_cthead.npz $D/tr_mrmf.npz --out models/weights/prior.pt \
    --steps "$STEPS" --device cuda 2>&1 | grep -v "^$" | tee $R/train.log | grep -v INFO
  cp models/weights/prior.pt models/weights/prior.json $R/
fi
pack
python -m node.app.cli bench engine --device cuda --shape 512,512,300 --source $D/ph1.npz 2>&1 | tee $R/bench.log | grep -v INFO
cp bench/results/engine-*.json $R/ 2>/dev/null; pack
ev() { local tag=$1; shift; python -m node.app.cli eval "$@" --device cuda --json $R/eval_$tag.json > $R/eval_$tag.log 2>&1; tail -1 $R/eval_$tag.log; pack; }
ev ph1_through2 $D/ph1.npz --axis through --factor 2
ev mpr_through2 $D/mpr.npz --axis through --factor 2
ev ph5_truth5 $D/ph5.npz --truth $D/ph1.npz --factor 5
ev ph1_in2 $D/ph1.npz --axis in --factor 2 --max-slices 40
ev mpr_in2 $D/mpr.npz --axis in --factor 2
ev ph1_through2_fast $D/ph1.npz --axis through --factor 2 --fast
pack; rm -rf $R
