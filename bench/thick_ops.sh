#!/bin/bash
# Issue #13 / helper engine17: the engine against cubic under each thick-slice operator of `srnode eval --profile`
# (discrete = the engine's own operator, box-fine / gaussian / trapezoid = continuous profiles of the same FWHM,
# decimate = no blur), same central crops for all, CPU, one thread. Args: TAG [extra eval args, e.g. --fast].
# Writes bench/results/ops17-<profile>-<case>-<TAG>.json (+ .png) and prints each summary line.
set -u
TAG=${1:?tag}; shift
PY=${PY:-python3}
D=${DATA:-../shared/data}
R=bench/results
EXTRA=("$@")
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1
PROFILES=${PROFILES:-"discrete box-fine gaussian trapezoid decimate"}
ev() { local c=$1; shift; for p in $PROFILES; do
  echo -n "$p $c: "; $PY -m node.app.cli eval "$@" --profile "$p" --device cpu --quiet \
    --json $R/ops17-$p-$c-$TAG.json "${EXTRA[@]}" 2>&1 | tail -1; done; }
CASES=${CASES:-"ph1 mpr ctbody"}
for c in $CASES; do case $c in
  ph1) ev ph1_c192x61 $D/ct_head_phantom_philips_1mm --axis through --factor 2 --crop 192 --max-slices 61 ;;
  mpr) ev mpr_c192x61 $D/mr_t1_mprage_sag_siemens --axis through --factor 2 --crop 192 --max-slices 61 ;;
  ctbody) ev ctbody_c192x41 $D/ct_body_j2k_siemens_petct --axis through --factor 2 --crop 192 --max-slices 41 ;;
esac; done
