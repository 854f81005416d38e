"""diag: run srnode eval's engine once, report sigma metrics for the q actually used and for the in-plane (xy) q."""

import argparse
import json
import time
from pathlib import Path

import numpy as np

from models import internal as il
from models.degrade import DegradationModel
from models.engine import Device, EngineOptions, Factors
from models.evaluate import body_mask, uncertainty
from node.app.volume_file import load_volume
from node.bench import eval as ev

p = argparse.ArgumentParser()
p.add_argument("series")
p.add_argument("--truth", default=None)
p.add_argument("--factor", type=int, default=2)
p.add_argument("--crop", type=int, default=0)
p.add_argument("--max-slices", type=int, default=0)
p.add_argument("--fast", action="store_true")
p.add_argument("--out", required=True)
p.add_argument("--sigma-from", default="")  # run the engine with this selfsup.SIGMA_FROM (e.g. max: q_z reported too)
a = p.parse_args()
if a.sigma_from:
    import models.selfsup as _ss

    _ss.SIGMA_FROM = a.sigma_from

series = ev.central(load_volume(Path(a.series)), a.max_slices, a.crop)
out_idx = None
if a.truth:
    thin = ev.central(load_volume(Path(a.truth)), 0, a.crop)
    factors = Factors(a.factor, 1)
    out_idx, thin_idx = ev.match_truth(series, thin, a.factor)
    lr_in, truth = series.vin, thin.vin.data[thin_idx]
else:
    lr_in, truth, factors = ev.simulate(series, "through", a.factor, ev.ThickProfile.DISCRETE)  # as recorded
opts = EngineOptions(device=Device("cpu"), fast=a.fast)
t0 = time.perf_counter()
doc, outs, sigma = ev.evaluate(lr_in, truth, factors, opts, "selfsup", out_idx)
rep = doc["report"]
f = a.factor
data = lr_in.data
sample = data[:: max(1, data.shape[0] // 16)].ravel()
lo, hi = (float(v) for v in np.percentile(sample, [0.5, 99.5]))
scale = max(hi - lo, 1e-6)
vol_n = (data - lo) / scale
model = DegradationModel.from_volume(lr_in, factors)
zf = (data.shape[0] - 1) * f + 1
extra = il.target_noise_rows(il.noise_sigma(vol_n), model, min(lr_in.spacing[1:]), zf) * scale
rows = out_idx if out_idx is not None else np.arange(truth.shape[0])
nz = extra[rows][:, None, None]
sr = np.sqrt(np.maximum(sigma.astype(np.float64) ** 2 - nz**2, 0))
ph = rows % f
mask = body_mask(truth, lr_in.modality)
res = {
    "series": series.name,
    "gain_db": doc["engine"]["psnr_db"] - doc["cubic"]["psnr_db"],
    "hu_mae": doc["engine"]["hu_mae"],
    "seconds": doc["seconds"],
    "used": doc["uncertainty"],
    "report": {k: v for k, v in rep.items() if "sigma" in k or "z_pairs" in k or "internal" in k},
}
if doc["fallback"]:
    res["fallback"] = doc["fallback"]
else:
    qu = np.asarray(rep["through_sigma_q_used"])
    qx = np.asarray(rep["through_sigma_q_xy"])
    qz = np.asarray(rep.get("through_sigma_q_z", qu))
    err = np.abs(outs["engine"].astype(np.float64) - truth)
    ideal = []
    for p_ in range(f):
        m = mask & (ph == p_)[:, None, None]
        e, s_, n_ = err[m], (sr * np.ones_like(err))[m] / max(qu[p_], 1e-9), (nz * np.ones_like(err))[m]
        from models.calibration import conformal_q

        ideal.append(conformal_q(e, np.maximum(s_ * 1.96, 1e-12), n_))
    res["q_ideal"] = ideal
    for name, q in (
        ("xy", qx),
        ("z", qz),
        ("max", np.maximum(qx, qz)),
        ("geo", np.sqrt(qx * qz)),
        ("mean", 0.5 * (qx + qz)),
        ("xyfloor", np.maximum(qx, rep["through_sigma_q"] * rep["through_sigma_z_difficulty"])),
        ("xypool", np.full(f, rep["through_sigma_q"] * rep["through_sigma_z_difficulty"])),
    ):
        s2 = np.sqrt((sr * (q / qu)[ph][:, None, None]) ** 2 + nz**2).astype(np.float32)
        res[name] = uncertainty(s2, outs["engine"], truth, mask, phase=ph)
    # noise-only sigma for reference
    res["noise_only"] = uncertainty(
        np.broadcast_to(nz, sigma.shape).astype(np.float32) + 1e-6, outs["engine"], truth, mask, phase=ph
    )
json.dump(res, open(a.out, "w"), indent=1, default=float)


def line(u):
    return f"cov {u['coverage_95']:.3f} {u.get('coverage_95_by_phase')} width {u['width_95']:.4g} sp {u['spearman']:.3f}/{u['spearman_local_oracle']:.3f} s95 {u.get('scale_to_95')}"


print(series.name, f"gain {res['gain_db']:+.2f} dB, {doc['seconds']} s", res.get("fallback", ""))
print("   q_ideal", res.get("q_ideal"), "q_xy", rep.get("through_sigma_q_xy"), "q_z", rep.get("through_sigma_q_z"))
for k in ("xy", "z", "max", "geo", "mean", "xyfloor", "xypool", "noise_only"):
    if k in res:
        print("  ", k, line(res[k]))
print("  ", {k: v for k, v in res["report"].items() if "q" in k or "difficulty" in k or "z_pairs" in k})
