#!/bin/bash
# Issue #13 / helper engine18b: shipped sigma vs sigma widened from the z pairs; cases ge ctbody ph1 mpr pair (CASES),
# modes fast / whole (MODES); TAG names the files bench/results/e18b-TAG-<profile>-<case>-<mode>.json; switches
# (bench/variant18.py NAME=VALUE) after TAG.
# TAG [variant switches]
TAG=$1; shift
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 PYTHONPATH=$PWD
PY=${PY:-python3}; D=$(realpath ${DATA:-../shared/data}); R=bench/results
ev() { n=$1; shift; echo -n "$n: "; $PY bench/variant18.py "$@" 2>&1 | tail -1; }
SW=("$@")
for m in ${MODES:-fast}; do X=""; [ $m = fast ] && X=--fast
for c in ${CASES:-ge ctbody ph1 mpr pair}; do case $c in
 ge) ev ge-$m "${SW[@]}" -- $D/mr_t1_3d_axial_ge --axis through --factor 2 --crop 192 --max-slices 61 --profile trapezoid --device cpu --quiet --json $R/e18b-$TAG-trapezoid-ge_c192x61-$m.json $X;;
 ctbody) ev ctbody-$m "${SW[@]}" -- $D/ct_body_j2k_siemens_petct --axis through --factor 2 --crop 192 --max-slices 41 --profile trapezoid --device cpu --quiet --json $R/e18b-$TAG-trapezoid-ctbody_c192x41-$m.json $X;;
 ph1) ev ph1-$m "${SW[@]}" -- $D/ct_head_phantom_philips_1mm --axis through --factor 2 --crop 192 --max-slices 61 --profile trapezoid --device cpu --quiet --json $R/e18b-$TAG-trapezoid-ph1_c192x61-$m.json $X;;
 mpr) ev mpr-$m "${SW[@]}" -- $D/mr_t1_mprage_sag_siemens --axis through --factor 2 --crop 192 --max-slices 61 --profile trapezoid --device cpu --quiet --json $R/e18b-$TAG-trapezoid-mpr_c192x61-$m.json $X;;
 pair) ev pair-$m "${SW[@]}" -- $D/ct_head_phantom_philips_5mm --truth $D/ct_head_phantom_philips_1mm --factor 5 --crop 192 --device cpu --quiet --json $R/e18b-$TAG-real-ph5_truth1_c192-$m.json $X;;
esac; done; done
