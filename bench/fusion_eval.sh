#!/bin/bash
# The runner of docs/engines.md's "per-series method on unseen anatomy" table (issue #13 item 2, helper `fusion`).
# usage: bench/fusion_eval.sh TAG fast|whole "PYTHON STATEMENTS" SERIES...   (EXTRA="--finetune-steps 500" etc.)
# e.g.   bench/fusion_eval.sh fuse whole "import models.selfsup as S; S.FUSE='sigma'" mr_t1_mprage_sag_siemens
# The statements run before `srnode eval` (module switches of models/selfsup.py). Central crops per series below.
# Writes bench/results/eval-cpu-SERIES-through2-MODE-fusion-TAG.json (+ .png); logs in ${LOGS:-/tmp}.
set -u
T=$1; M=$2; PRE=$3; shift 3
cd "$(dirname "$0")/.."
D=${DATA:-../shared/data}
PY=${PY:-.venv/bin/python}
for s in "$@"; do
  case $s in
    mr_t1_mprage_sag_siemens) C="--crop 128 --max-slices 96";;
    ct_body_j2k_siemens_petct) C="--crop 192";;
    ct_head_phantom_philips_1mm) C="--crop 160 --max-slices 80";;
    *) C="";;
  esac
  F=""; [ "$M" = fast ] && F="--fast"
  out=bench/results/eval-cpu-$s-through2-$M-fusion-$T.json
  log=${LOGS:-/tmp}/fusion-$T-$s-$M.log
  # shellcheck disable=SC2086
  /usr/bin/time -f "%e s" nice -n 10 $PY -c "
import sys
$PRE
from node.app.cli import main
sys.exit(main(sys.argv[1:]))
" eval "$D/$s" --axis through --factor 2 --device cpu --quiet $F $C ${EXTRA:-} --json "$out" > "$log" 2>&1
  echo "$T $M $s: $(tail -2 "$log" | tr '\n' ' ')"
done
