"""sigma10 diagnostic: one ``srnode eval`` run; saves what ranks |err| offline (bench/sigma10_ceiling.py).

[S10=...] PYTHONPATH=. python bench/sigma10_capture.py OUT.npz eval SERIES.npz --axis through --factor 2 --device cpu
    --crop 128 --max-slices 60 [--fast] --json OUT.json

Saved: sigma, pred (engine), cubic, truth, mask, phase (the eval's, data units), lr (the thick input), out_idx, raw0
(the target's sigma feature u, ``calibration.target_u``, normalised; the first call's), nraw, report (the engine
report, JSON). $S10 as in bench/sigma10_switches.py (``models.calibration`` names only).
"""
import json
import os
import sys
from typing import Any

sys.path.insert(0, os.getcwd())

import numpy as np  # noqa: E402

import models.calibration as cal  # noqa: E402
import models.evaluate as mev  # noqa: E402
import node.bench.eval as nbe  # noqa: E402
from node.app.cli import main  # noqa: E402

for kv in os.environ.get("S10", "").split(","):
    if kv:
        name, value = kv.split("=")
        setattr(cal, name, type(getattr(cal, name))(float(value)))
out, argv = sys.argv[1], sys.argv[2:]
S: dict[str, Any] = {}
_target_u, _uncertainty, _evaluate = cal.target_u, mev.uncertainty, nbe.evaluate


def target_u(v, fused, base, spread):  # type: ignore[no-untyped-def]
    r = _target_u(v, fused, base, spread)
    S.setdefault("raw", []).append(r.detach().cpu().numpy().copy())
    return r


def uncertainty(sigma, pred, truth, mask, seed=0, phase=None):  # type: ignore[no-untyped-def]
    S.update(sigma=sigma, pred=pred, truth=truth, mask=mask, phase=phase)
    return _uncertainty(sigma, pred, truth, mask, seed, phase)


def evaluate(lr_in, truth, factors, options, engine, out_idx=None, *a, **kw):  # type: ignore[no-untyped-def]
    S.update(lr=lr_in.data, out_idx=out_idx if out_idx is not None else np.arange(truth.shape[0]))
    r = _evaluate(lr_in, truth, factors, options, engine, out_idx, *a, **kw)
    S["report"], S["cubic"] = r[0]["report"], r[1]["cubic"]
    return r


cal.target_u, mev.uncertainty, nbe.evaluate = target_u, uncertainty, evaluate
rc = main(argv)
np.savez(out, **{k: v for k, v in S.items() if k not in ("raw", "report")}, raw0=S["raw"][0], nraw=len(S["raw"]),
         report=json.dumps(S["report"]))
sys.exit(rc)
