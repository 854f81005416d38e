#!/bin/bash
# Helper engine17: selfsup switches (bench/ops17_variant.py NAME=VALUE) under each `srnode eval --profile`,
# same crops as bench/thick_ops.sh, plus the real 5 mm / 1 mm phantom pair. Args: TAG SWITCH... [-- extra eval args].
# Writes bench/results/ops17-<profile>-<case>-<TAG>.json (+ .png).
set -u
TAG=${1:?tag}; shift
SW=(); while [ $# -gt 0 ] && [ "$1" != "--" ]; do SW+=("$1"); shift; done; [ $# -gt 0 ] && shift
EXTRA=("$@")
PY=${PY:-python3}
D=${DATA:-../shared/data}
R=bench/results
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1
PROFILES=${PROFILES:-"discrete box-fine gaussian trapezoid"}
ev() { local c=$1; shift; for p in $PROFILES; do
  echo -n "$p $c: "; $PY bench/ops17_variant.py "${SW[@]}" -- "$@" --profile "$p" --device cpu --quiet \
    --json $R/ops17-$p-$c-$TAG.json "${EXTRA[@]}" 2>&1 | tail -1; done; }
CASES=${CASES:-"ph1 mpr ctbody pair"}
for c in $CASES; do case $c in
  ph1) ev ph1_c192x61 $D/ct_head_phantom_philips_1mm --axis through --factor 2 --crop 192 --max-slices 61 ;;
  mpr) ev mpr_c192x61 $D/mr_t1_mprage_sag_siemens --axis through --factor 2 --crop 192 --max-slices 61 ;;
  ctbody) ev ctbody_c192x41 $D/ct_body_j2k_siemens_petct --axis through --factor 2 --crop 192 --max-slices 41 ;;
  ph1x5) ev ph1x5_c192 $D/ct_head_phantom_philips_1mm --axis through --factor 5 --crop 192 ;;
  pair) echo -n "real ph5_truth1_c192: "; $PY bench/ops17_variant.py "${SW[@]}" -- $D/ct_head_phantom_philips_5mm \
    --truth $D/ct_head_phantom_philips_1mm --factor 5 --crop 192 --device cpu --quiet \
    --json $R/ops17-real-ph5_truth1_c192-$TAG.json "${EXTRA[@]}" 2>&1 | tail -1 ;;
esac; done
