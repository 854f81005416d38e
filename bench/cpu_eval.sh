#!/bin/bash
# `srnode eval` of the selfsup engine on the shared series, on the CPU, whole series (the phantom's in-plane run:
# its 40 central slices, as on the GPU), straight from the shared DICOM series (DATA, default ../shared/data).
# Args: TAG [extra eval args...]; `make bench-eval` runs it with TAG = the commit.
# Writes bench/results/eval-cpu-<case>-<TAG>.json (+ .png) and prints each summary line.
set -u
TAG=${1:?tag}; shift
PY=${PY:-python3}  # make bench-eval passes its own
D=${DATA:-../shared/data}
R=bench/results
EXTRA=("$@")
ev() { local c=$1; shift; $PY -m node.app.cli eval "$@" --device cpu --json $R/eval-cpu-$c-$TAG.json "${EXTRA[@]}" 2>&1 | tail -1; }
ev ph1_through2 $D/ct_head_phantom_philips_1mm --axis through --factor 2
ev mpr_through2 $D/mr_t1_mprage_sag_siemens --axis through --factor 2
ev ph5_truth5 $D/ct_head_phantom_philips_5mm --truth $D/ct_head_phantom_philips_1mm --factor 5
ev ph1_in2 $D/ct_head_phantom_philips_1mm --axis in --factor 2 --max-slices 40
ev mpr_in2 $D/mr_t1_mprage_sag_siemens --axis in --factor 2
