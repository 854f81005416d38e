"""calib3 diagnostic: one ``srnode eval`` engine run; saves the target's and the held-out pairs' sigma inputs.

PYTHONPATH=. python bench/calib3_capture.py SERIES [--truth THIN --factor 5] --crop N [--max-slices M] [--fast]
    --out X.npz [--json X.json]

Saved (normalised units unless said): target (masked voxels of the truth) err, std, delta, grad, noise, phase; the
held-out in-plane pairs' (``calibration._held``) err, std, delta, grad, noise, phase; k, j, q_used, z_difficulty,
scale. With ``--json`` also the eval document (as ``srnode eval --json``). Offline variants of the q per phase are
then computed with numpy alone (bench/calib3_variants.py).
"""
import argparse
import json
from pathlib import Path

import numpy as np
import torch

import models.calibration as cal
from models import internal as il
from models.degrade import DegradationModel
from models.engine import Device, EngineOptions, Factors
from models.evaluate import body_mask
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
p.add_argument("--json", default="")
p.add_argument("--sigma-from", default="")  # run with this selfsup.SIGMA_FROM ("max": z pairs held out too)
a = p.parse_args()
if a.sigma_from:
    import models.selfsup as _ss

    _ss.SIGMA_FROM = a.sigma_from

held: list[cal._Held] = []
fused_cap: list[np.ndarray] = []
_held0, _edge0 = cal._held, cal.edge


maps: list[dict[str, np.ndarray]] = []  # per pair set of the first _held call: (B, H, W) maps


@torch.no_grad()
def _held_rec(net, sets, n_flips, body=0.05):  # type: ignore[no-untyped-def]
    h = _held0(net, sets, n_flips, body)
    if not held:
        for s in sets:
            mean, spread = il.ensemble(net, s, n_flips)
            pred = s.task.project(s.base + mean, s.lr)
            base = s.task.project(s.base.clone(), s.lr)
            g = _edge0(pred, (-2,) if s.task.node_rows else (-2, -1))
            maps.append({"err": (pred - s.hr).numpy(), "std": spread.numpy(), "delta": (pred - base).abs().numpy(),
                         "grad": g.numpy(), "body": (s.hr > body).numpy()})
    held.append(h)
    return h


def _edge_rec(y: torch.Tensor, axes: tuple[int, ...]) -> torch.Tensor:
    if axes == (0,) and y.dim() == 3:
        fused_cap.append(y.detach().cpu().numpy().copy())
    return _edge0(y, axes)


cal._held = _held_rec  # type: ignore[assignment]
cal.edge = _edge_rec  # type: ignore[assignment]

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
doc, outs, sigma = ev.evaluate(lr_in, truth, factors, opts, "selfsup", out_idx)
doc.update({"series": series.name, "truth": a.truth or "simulated", "axis": "through", "factor": a.factor,
            "input_shape": list(lr_in.data.shape), "compared_shape": list(truth.shape), "device": "cpu",
            "fast": a.fast})
if a.json:
    Path(a.json).write_text(json.dumps(doc, indent=1, default=float))
rep = doc["report"]
f = a.factor
data = lr_in.data
sample = data[:: max(1, data.shape[0] // 16)].ravel()
lo, hi = (float(v) for v in np.percentile(sample, [0.5, 99.5]))
scale = max(hi - lo, 1e-6)
vol_n = (data - lo) / scale
model = DegradationModel.from_volume(lr_in, factors)
zf = (data.shape[0] - 1) * f + 1
extra = il.target_noise_rows(il.noise_sigma(vol_n), model, min(lr_in.spacing[1:]), zf)
rows = out_idx if out_idx is not None else np.arange(truth.shape[0])
mask = body_mask(truth, lr_in.modality)
k, j = float(rep["through_sigma_k"]), float(rep["through_sigma_j"])
fused = fused_cap[-1]  # (Zf, Y, X) normalised, after data consistency
task = il.Task(f, 1, True, model)
base = task.base(torch.from_numpy(vol_n).float().permute(1, 0, 2)).permute(1, 0, 2).numpy()
grad = cal.edge(torch.from_numpy(fused), (0,)).numpy()
delta = np.abs(fused - base)
qu = np.asarray(rep["through_sigma_q_used"])
ph_all = np.arange(zf) % f
sig_n = sigma.astype(np.float64) / scale  # rows of the compared grid
nz = extra[rows][:, None, None]
raw = np.sqrt(np.maximum(sig_n**2 - nz**2, 0)) * 1.96 / qu[rows % f][:, None, None]
d_r, g_r = delta[rows], grad[rows]
std = raw - k * d_r - j * g_r - cal.EPS
err = (outs["engine"].astype(np.float64) - truth) / scale
m = mask
hp = held[0]
hz = held[1] if len(held) > 1 and held[1].err.size else None
zx = {} if hz is None else {"z_err": hz.err, "z_std": hz.std, "z_delta": hz.delta, "z_grad": hz.grad, "z_noise": hz.noise,
                            "z_phase": hz.phase.astype(np.int8)}
np.savez_compressed(
    a.out, t_err=err[m].astype(np.float32), t_std=std[m].astype(np.float32), t_delta=d_r[m].astype(np.float32),
    t_grad=g_r[m].astype(np.float32), t_noise=np.broadcast_to(nz, err.shape)[m].astype(np.float32),
    t_phase=np.broadcast_to((rows % f)[:, None, None], err.shape)[m].astype(np.int8),
    t_z=np.broadcast_to(rows[:, None, None], err.shape)[m].astype(np.int16),
    p_err=hp.err, p_std=hp.std, p_delta=hp.delta, p_grad=hp.grad, p_noise=hp.noise, p_phase=hp.phase.astype(np.int8),
    k=k, j=j, q_used=qu, q_xy=np.asarray(rep["through_sigma_q_xy"]), rho=float(rep["through_sigma_z_difficulty"]),
    q_pool=float(rep["through_sigma_q"]), scale=scale, f=f, extra=extra[:f],
    phase_noise_t=il.phase_noise(model, min(lr_in.spacing[1:]))[0],
    phase_noise_p=il.phase_noise(model, min(lr_in.spacing[1:]))[1], noise_sd=il.noise_sigma(vol_n), vol_n=vol_n.astype(np.float32), rows=rows,
    t_yx=np.stack(np.nonzero(m)[1:]).astype(np.int16), **zx,
    **{f"pm{i}_{key}": val.astype(np.float32) for i, mp in enumerate(maps[:4]) for key, val in mp.items()},
)
u = doc["uncertainty"]
print(series.name, "fast" if a.fast else "whole", f"gain {doc['engine']['psnr_db'] - doc['cubic']['psnr_db']:+.2f}",
      f"cov {u['coverage_95']} {u.get('coverage_95_by_phase')} width {u['width_95']} sp {u['spearman']}/"
      f"{u['spearman_local_oracle']} q_used {list(qu)} {doc['seconds']} s")
