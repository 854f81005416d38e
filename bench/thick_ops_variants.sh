#!/bin/bash
# Helper engine17: selfsup switches (bench/ops17_variant.py NAME=VALUE) under each `srnode eval --profile`,
# same crops as bench/thick_ops.sh, plus the real 5 mm / 1 mm phantom pair. Args: TAG SWITCH... [-- extra eval args].
# Writes bench/results/ops17-<profile>-<case>-<TAG>.json (+ .png). The argument handling and the cases are
# bench/thick_ops.sh's (its --switches form).
exec "$(dirname "$0")/thick_ops.sh" --switches "$@"
