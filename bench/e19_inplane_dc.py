"""engine19 diagnostic: in-plane data consistency with a smooth back-projector. The shipped projection adds the
block-mean residual replicated over each f x f block (minimum norm, exact, piecewise constant). Variant: K steps of
iterative back-projection with the cubic up-sampler (y += cubic(x - B y)), then the exact projection (so the output
still re-degrades to the input exactly). One ``srnode eval --axis in`` run; the net's pre-projection output is
captured per chunk and every variant is scored offline with the eval's own metrics (data units through the affine
map fitted between the shipped normalised output and the eval's engine output).

PYTHONPATH=. python bench/e19_inplane_dc.py OUT.json eval SERIES --axis in --factor 2 --device cpu --fast
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
from models.evaluate import body_mask, data_range, fidelity  # noqa: E402
from node.app.cli import main  # noqa: E402

out, argv = sys.argv[1], sys.argv[2:]
S: dict[str, Any] = {"z": [], "x": [], "y": []}
_infer, _evaluate = ip.infer, nbe.evaluate


@torch.no_grad()
def infer(net, x, task, ops, chunk, max_pixels=0):  # type: ignore[no-untyped-def]
    for b0 in range(0, x.shape[0], chunk):
        b1 = min(x.shape[0], b0 + chunk)
        xb = x[b0:b1]
        rs = torch.stack([il.residual(net, xb, task, fl, max_pixels, tr) for fl, tr in ops])
        base = task.base(xb)
        z = base + rs.mean(0)
        y = task.project(z, xb)
        S["z"].append(z.cpu().numpy().copy())
        S["x"].append(xb.cpu().numpy().copy())
        S["y"].append(y.cpu().numpy().copy())
        S["task"] = task
        std = rs.std(0, unbiased=False) if len(ops) > 1 else torch.zeros_like(y)
        yield b0, base, y, std


def evaluate(lr_in, truth, factors, options, engine, out_idx=None, *a, **kw):  # type: ignore[no-untyped-def]
    r = _evaluate(lr_in, truth, factors, options, engine, out_idx, *a, **kw)
    S.update(truth=truth, outs=r[1], modality=lr_in.modality)
    return r


ip.infer, nbe.evaluate = infer, evaluate
rc = main(argv)
truth, outs, task = S["truth"], S["outs"], S["task"]
pred = outs["engine"]
sl = tuple(slice(0, n) for n in pred.shape)
Y = np.concatenate(S["y"])[sl]
A = np.stack([Y.ravel(), np.ones(Y.size)], 1)
coef, *_ = np.linalg.lstsq(A, pred.ravel().astype(np.float64), rcond=None)
mask, drange = body_mask(truth, S["modality"]), data_range(truth)
cub = fidelity(outs["cubic"], truth, mask, drange)
f = task.fz


def bmean(y: torch.Tensor) -> torch.Tensor:
    b, h, w = y.shape
    return y.view(b, h // f, f, w // f, f).mean(dim=(2, 4))


res: dict[str, Any] = {"cubic": cub, "denorm": list(coef), "by_variant": {}}
for k in (0, 1, 2, 4, 8):
    ys = []
    for z, x in zip(S["z"], S["x"], strict=True):
        zt, xt = torch.from_numpy(z), torch.from_numpy(x)
        y = zt
        for _ in range(k):
            y = y + task.base(xt - bmean(y))
        ys.append(task.project(y, xt).numpy())
    p = coef[0] * np.concatenate(ys)[sl] + coef[1]
    fi = fidelity(p, truth, mask, drange)
    res["by_variant"][f"ibp_cubic_{k}"] = {**fi, "gain_db": round(fi["psnr_db"] - cub["psnr_db"], 3),
                                           "mae_vs_cubic_pct": round(100 * (fi["hu_mae"] / cub["hu_mae"] - 1), 1)}
    print(k, res["by_variant"][f"ibp_cubic_{k}"], flush=True)
with open(out, "w") as fh:
    json.dump(res, fh, indent=1)
sys.exit(rc)
