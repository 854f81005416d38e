"""sigma10: ``srnode`` with sigma switches set first (the runs of docs/engines.md, sigma10).

S10="NOISE_MIN_VIEWS=1,ONE_VIEW_NOISE_MIN=0.0,ss.SIGMA_FROM=xy_zscale_phase" PYTHONPATH=. python
    bench/sigma10_switches.py eval SERIES.npz --axis through --factor 2 --device cpu --crop 128 --max-slices 60
    [--fast] --json OUT.json

Each NAME=VALUE of $S10 sets ``models.calibration.NAME`` (``ss.NAME``: ``models.selfsup.NAME``) to VALUE, converted
to the type of the current value; then the CLI runs with the remaining arguments.
"""
import os
import sys

sys.path.insert(0, os.getcwd())

import models.calibration as cal  # noqa: E402
import models.selfsup as ss  # noqa: E402
from node.app.cli import main  # noqa: E402

for kv in os.environ.get("S10", "").split(","):
    if kv:
        name, value = kv.split("=")
        mod = ss if name.startswith("ss.") else cal
        name = name.removeprefix("ss.")
        cur = getattr(mod, name)
        setattr(mod, name, value if isinstance(cur, str) else type(cur)(float(value)))
sys.exit(main(sys.argv[1:]))
