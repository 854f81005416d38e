"""engine19 diagnostic: does the in-plane x2 net under-shoot? One ``srnode eval --axis in`` run; the in-plane
output is re-made offline as y(a) = P(cubic) + a * (P(cubic + r) - P(cubic)) for a residual gain a (P: the exact
block-mean data consistency, affine, so this equals P(cubic + a r)), and scored with the eval's own metrics. Also the
gain a* that least squares picks on the engine's held-out ZSSR pairs (the validation slices, one scale coarser) and
the pairs' PSNR gain at a = 1 and a = a*.

PYTHONPATH=. python bench/e19_inplane_gain.py OUT.json eval SERIES --axis in --factor 2 --device cpu --fast
    [--max-slices N] --json EVAL.json
"""
import json
import os
import sys
from typing import Any

sys.path.insert(0, os.getcwd())

import numpy as np  # noqa: E402
import torch  # noqa: E402

import models.inplane as ip  # noqa: E402
import models.internal as il  # noqa: E402
import node.bench.eval as nbe  # noqa: E402
from models.evaluate import fidelity  # noqa: E402
from models.selfsup import SelfSupEngine  # noqa: E402
from node.app.cli import main  # noqa: E402

out, argv = sys.argv[1], sys.argv[2:]
S: dict[str, Any] = {"y": [], "y0": []}
_infer, _fit, _evaluate = ip.infer, SelfSupEngine._fit, nbe.evaluate


def infer(net, x, task, ops, chunk, max_pixels=0):  # type: ignore[no-untyped-def]
    for b0, base, y, std in _infer(net, x, task, ops, chunk, max_pixels):
        S["y"].append(y.cpu().numpy().copy())
        S["y0"].append(task.project(base, x[b0:b0 + base.shape[0]]).cpu().numpy().copy())
        yield b0, base, y, std


def fit(self, kind, sets, val, fz, fx, prior, device, passes, report, in_ch=1, progress=None):  # type: ignore[no-untyped-def]
    net, v = _fit(self, kind, sets, val, fz, fx, prior, device, passes, report, in_ch, progress)
    if kind == "in":
        ops = il.tta_ops(passes, val[0].square)
        task = val[0].task
        num = den = 0.0
        rows = []
        with torch.no_grad():
            for ps in val:
                lr, hr = ps.lr, ps.hr
                base = task.base(lr)
                r = torch.stack([il.residual(net, lr, task, fl, 0, tr) for fl, tr in ops]).mean(0)
                y0, y1 = task.project(base, lr), task.project(base + r, lr)
                m = hr > 0.05
                d, e = (y1 - y0)[m], (hr - y0)[m]
                num += float((d * e).sum())
                den += float((d * d).sum())
                rows.append((y0, y1, hr, m))
        a_star = num / max(den, 1e-12)
        pairs = {}
        for a in (1.0, a_star):
            se = sum(float((((y0 + a * (y1 - y0)) - hr)[m] ** 2).sum()) for y0, y1, hr, m in rows)
            sc = sum(float(((task.base(ps.lr) - ps.hr)[m] ** 2).sum()) for ps, (_, _, _, m) in zip(val, rows, strict=True))
            pairs[f"{a:.3f}"] = round(10 * np.log10(sc / max(se, 1e-20)), 3)
        S["a_star"], S["pairs_gain_db"] = a_star, pairs
    return net, v


def evaluate(lr_in, truth, factors, options, engine, out_idx=None, *a, **kw):  # type: ignore[no-untyped-def]
    r = _evaluate(lr_in, truth, factors, options, engine, out_idx, *a, **kw)
    S.update(truth=truth, outs=r[1], doc=r[0], modality=lr_in.modality)
    return r


ip.infer, nbe.evaluate = infer, evaluate
SelfSupEngine._fit = fit  # type: ignore[method-assign]
rc = main(argv)
from models.evaluate import body_mask, data_range  # noqa: E402

truth, outs = S["truth"], S["outs"]
Y, Y0 = np.concatenate(S["y"]), np.concatenate(S["y0"])
pred = outs["engine"]
sl = tuple(slice(0, n) for n in pred.shape)
Y, Y0 = Y[sl], Y0[sl]
A = np.stack([Y.ravel(), np.ones(Y.size)], 1)
coef, *_ = np.linalg.lstsq(A, pred.ravel().astype(np.float64), rcond=None)
resid = float(np.abs(A @ coef - pred.ravel()).max())
p0 = coef[0] * Y0 + coef[1]
mask, drange = body_mask(truth, S["modality"]), data_range(truth)
cub = fidelity(outs["cubic"], truth, mask, drange)
res: dict[str, Any] = {"a_star_pairs": round(S["a_star"], 4), "pairs_gain_db": S["pairs_gain_db"],
                       "denorm_fit_max_abs_residual": resid, "cubic": cub, "by_gain": {}}
for a in (0.8, 1.0, 1.1, 1.2, 1.3, 1.5, 1.75, 2.0, round(S["a_star"], 3)):
    f = fidelity(p0 + a * (pred - p0), truth, mask, drange)
    res["by_gain"][str(a)] = {**f, "gain_db": round(f["psnr_db"] - cub["psnr_db"], 3),
                              "mae_vs_cubic_pct": round(100 * (f["hu_mae"] / cub["hu_mae"] - 1), 1)}
with open(out, "w") as fh:
    json.dump(res, fh, indent=1)
print(json.dumps({k: v for k, v in res.items() if k != "by_gain"}))
for a, f in res["by_gain"].items():
    print(a, f["gain_db"], f["hu_mae"], f["hu_bias"], f["mae_vs_cubic_pct"])
sys.exit(rc)
