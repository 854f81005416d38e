#!/bin/bash
# Issue #13 / helper engine17: the engine against cubic under each thick-slice operator of `srnode eval --profile`
# (discrete = the engine's own operator, box-fine / gaussian / trapezoid = continuous profiles of the same FWHM,
# decimate = no blur), same central crops for all, CPU, one thread. Two forms:
#   bench/thick_ops.sh TAG [extra eval args, e.g. --fast]
#       the engine as shipped (`srnode eval`); PROFILES default: all 5 operators; CASES default: ph1 mpr ctbody.
#   bench/thick_ops.sh --switches TAG SWITCH... [-- extra eval args]   (= bench/thick_ops_variants.sh)
#       selfsup switches (bench/ops17_variant.py NAME=VALUE); PROFILES default: the 4 blurring operators;
#       CASES default: ph1 mpr ctbody pair.
# Cases: ph1, mpr, ctbody (192-pixel central crops, factor 2 through-plane), ph1_whole (the whole 1 mm phantom, 512²,
# factor 2: the published figures' input), ph1x5 (factor 5), pair (the real 5 mm / 1 mm phantom pair, one run, no
# --profile). Environment: PY (python3), DATA (../shared/data), PROFILES, CASES.
# Writes bench/results/ops17-<profile>-<case>-<TAG>.json (+ .png; pair: ops17-real-ph5_truth1_c192-<TAG>.json)
# and prints each summary line.
set -u
if [ "${1:-}" = "--switches" ]; then
  shift
  TAG=${1:?tag}; shift
  SW=(); while [ $# -gt 0 ] && [ "$1" != "--" ]; do SW+=("$1"); shift; done; [ $# -gt 0 ] && shift
  RUN=(bench/ops17_variant.py "${SW[@]}" --)
  DEFAULT_PROFILES="discrete box-fine gaussian trapezoid"
  DEFAULT_CASES="ph1 mpr ctbody pair"
else
  TAG=${1:?tag}; shift
  RUN=(-m node.app.cli eval)
  DEFAULT_PROFILES="discrete box-fine gaussian trapezoid decimate"
  DEFAULT_CASES="ph1 mpr ctbody"
fi
EXTRA=("$@")
PY=${PY:-python3}
D=${DATA:-../shared/data}
R=bench/results
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1
PROFILES=${PROFILES:-$DEFAULT_PROFILES}
ev() { local c=$1; shift; for p in $PROFILES; do
  echo -n "$p $c: "; $PY "${RUN[@]}" "$@" --profile "$p" --device cpu --quiet \
    --json $R/ops17-$p-$c-$TAG.json "${EXTRA[@]}" 2>&1 | tail -1; done; }
CASES=${CASES:-$DEFAULT_CASES}
for c in $CASES; do case $c in
  ph1) ev ph1_c192x61 $D/ct_head_phantom_philips_1mm --axis through --factor 2 --crop 192 --max-slices 61 ;;
  mpr) ev mpr_c192x61 $D/mr_t1_mprage_sag_siemens --axis through --factor 2 --crop 192 --max-slices 61 ;;
  ctbody) ev ctbody_c192x41 $D/ct_body_j2k_siemens_petct --axis through --factor 2 --crop 192 --max-slices 41 ;;
  ph1_whole) ev ph1_whole $D/ct_head_phantom_philips_1mm --axis through --factor 2 ;;
  ph1x5) ev ph1x5_c192 $D/ct_head_phantom_philips_1mm --axis through --factor 5 --crop 192 ;;
  pair) echo -n "real ph5_truth1_c192: "; $PY "${RUN[@]}" $D/ct_head_phantom_philips_5mm \
    --truth $D/ct_head_phantom_philips_1mm --factor 5 --crop 192 --device cpu --quiet \
    --json $R/ops17-real-ph5_truth1_c192-$TAG.json "${EXTRA[@]}" 2>&1 | tail -1 ;;
esac; done
