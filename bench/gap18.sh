#!/bin/bash
# Issue #13 / helper engine18: the engine against cubic on gap acquisitions (eval profile "decimate": thin slices
# every 2x their thickness) and the other thick-slice operators, same central crops, CPU, one thread.
# Args: TAG [extra eval args, e.g. --fast]. CODE=<dir> runs another checkout's models/node (the "before" runs).
# Writes bench/results/gap18-<profile>-<case>-<TAG>.json (+ .png) and prints each summary line.
set -u
TAG=${1:?tag}; shift
PY=${PY:-python3}
D=${DATA:-../shared/data}
R=${RESULTS:-$PWD/bench/results}
D=$(realpath "$D")
EXTRA=("$@")
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1
if [ -n "${CODE:-}" ]; then export PYTHONPATH=$CODE; cd "$CODE"; fi  # python -m puts the cwd first on sys.path
PROFILES=${PROFILES:-"decimate trapezoid"}
ev() { local c=$1; shift; for p in $PROFILES; do
  echo -n "$p $c: "; $PY -m node.app.cli eval "$@" --profile "$p" --device cpu --quiet \
    --json $R/gap18-$p-$c-$TAG.json "${EXTRA[@]}" 2>&1 | tail -1; done; }
CASES=${CASES:-"ctbody ph1 mpr"}
for c in $CASES; do case $c in
  ph1) ev ph1_c192x61 $D/ct_head_phantom_philips_1mm --axis through --factor 2 --crop 192 --max-slices 61 ;;
  mpr) ev mpr_c192x61 $D/mr_t1_mprage_sag_siemens --axis through --factor 2 --crop 192 --max-slices 61 ;;
  ge) ev ge_c192x61 $D/mr_t1_3d_axial_ge --axis through --factor 2 --crop 192 --max-slices 61 ;;
  ctbody) ev ctbody_c192x41 $D/ct_body_j2k_siemens_petct --axis through --factor 2 --crop 192 --max-slices 41 ;;
esac; done
