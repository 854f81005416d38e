#!/bin/bash
# Issue #13 / helper engine18: sigma's q from split-conformal calibration on which of the series' own internal pairs
# (models.selfsup.SIGMA_FROM through bench/ops17_variant.py), default eval profile (trapezoid), CPU, one thread.
# Args: TAG SWITCH... [-- extra eval args, e.g. --fast]. Writes bench/results/sigma18-<case>-<TAG>.json (+ .png).
set -u
TAG=${1:?tag}; shift
SW=(); while [ $# -gt 0 ] && [ "$1" != "--" ]; do SW+=("$1"); shift; done; [ $# -gt 0 ] && shift
EXTRA=("$@")
PY=${PY:-python3}
D=${DATA:-../shared/data}
R=bench/results
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1
ev() { local c=$1; shift; echo -n "$c: "; $PY bench/ops17_variant.py "${SW[@]}" -- "$@" --device cpu --quiet \
    --json $R/sigma18-$c-$TAG.json "${EXTRA[@]}" 2>&1 | tail -1; }
CASES=${CASES:-"ph1 pair"}
for c in $CASES; do case $c in
  ph1) ev ph1_c192x61 $D/ct_head_phantom_philips_1mm --axis through --factor 2 --crop 192 --max-slices 61 ;;
  mpr) ev mpr_c192x61 $D/mr_t1_mprage_sag_siemens --axis through --factor 2 --crop 192 --max-slices 61 ;;
  ctbody) ev ctbody_c192x41 $D/ct_body_j2k_siemens_petct --axis through --factor 2 --crop 192 --max-slices 41 ;;
  pair) ev real_ph5_truth1_c192 $D/ct_head_phantom_philips_5mm --truth $D/ct_head_phantom_philips_1mm --factor 5 \
    --crop 192 ;;
esac; done
