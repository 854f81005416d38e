#!/bin/bash
# `srnode eval` of the selfsup engine on the shared series, on the CPU, whole series (the phantom's in-plane run:
# its 40 central slices, as on the GPU). Inputs: the .npz exports in devcarry/sr (the ones bench/gpu_selfsup.sh
# carries to the device). Args: TAG [extra eval args...].
# Writes bench/results/eval-cpu-<case>-<TAG>.json (+ .png) and prints each summary line.
set -u
TAG=${1:?tag}; shift
PY=${PY:-python3}
D=devcarry/sr
R=bench/results
EXTRA=("$@")
ev() { local c=$1; shift; $PY -m node.cli eval "$@" --device cpu --json $R/eval-cpu-$c-$TAG.json "${EXTRA[@]}" 2>&1 | tail -1; }
ev ph1_through2 $D/ph1.npz --axis through --factor 2
ev mpr_through2 $D/mpr.npz --axis through --factor 2
ev ph5_truth5 $D/ph5.npz --truth $D/ph1.npz --factor 5
ev ph1_in2 $D/ph1.npz --axis in --factor 2 --max-slices 40
ev mpr_in2 $D/mpr.npz --axis in --factor 2
