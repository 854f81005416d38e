"""sigma10 offline: what ranks |err| on captured eval runs (bench/sigma10_capture.py), written as JSON.

PYTHONPATH=. python bench/sigma10_ceiling.py OUT.json CAPTURE.npz [CAPTURE.npz ...]

Per capture: Spearman with |err| of sigma, u, the local-error oracle (models.evaluate), u box-averaged along z / in
plane, a local noise estimate of the thick input (mean |in-plane neighbour difference| over a box, interpolated to
the output rows) alone, times u, as a multiplier of the noise term
the in-target ceiling (log |err| regressed on
the features, fitted on one random half of the target's voxels and ranked on the other)
a noise-factor sweep with
the per-phase q fitted on the target itself to 95 % (an ideal level: the ranking and width a noise factor allows).
"""
import json
import os
import sys

sys.path.insert(0, os.getcwd())

import numpy as np  # noqa: E402
import torch  # noqa: E402

from models.calibration import box_smooth, edge  # noqa: E402
from models.evaluate import local_error_level  # noqa: E402
from models.internal import spearman  # noqa: E402


def run(path: str) -> dict:
    d = np.load(path)
    r = json.loads(str(d['report']))
    sig, pred, truth, mask, ph, raw, cub, lr, idx = (d[k] for k in ('sigma', 'pred', 'truth', 'mask', 'phase', 'raw0', 'cubic', 'lr', 'out_idx'))
    e3 = np.abs(pred - truth)
    err = e3[mask].astype(np.float64)
    def rho(x):
        return round(spearman(np.asarray(x)[mask].astype(np.float64), err), 4)
    f = 2
    q = np.array(r['through_sigma_q_used'])
    nz = np.array(r['through_sigma_target_noise'][:f]) * r['through_sigma_noise_factor']
    qr = q[idx % f][:, None, None]
    nr = nz[idx % f][:, None, None]
    s = float(np.sqrt(np.median(sig[mask] ** 2 / ((raw * qr / 1.96) ** 2 + nr ** 2)[mask])))
    su, sn = s * raw * qr / 1.96, s * nr * np.ones_like(raw)
    out: dict = {"spearman_sigma": rho(sig), "spearman_u": rho(raw), "spearman_local_oracle": rho(local_error_level(e3)),
                 "noise_share_of_sigma2_median": round(float(np.median((sn ** 2 / sig ** 2)[mask])), 4),
                 "coverage_95": round(float(np.mean(err <= 1.96 * sig[mask])), 4), "width_95": round(float(np.mean(2 * 1.96 * sig[mask])), 2)}
    P, C, U = (torch.from_numpy(a.astype(np.float32)) for a in (pred, cub, raw))
    out["u_smoothed_rz_rxy"] = {f"{rz},{rxy}": rho(box_smooth(box_smooth(U, (0,), rz), (1, 2), rxy)) for rz in (0, 1, 2) for rxy in (0, 1, 2, 3)}
    def up(m):
        z = idx / f
        z0 = np.floor(z).astype(int)
        z1 = np.minimum(z0 + 1, m.shape[0] - 1)
        w = (z - z0)[:, None, None]
        return (1 - w) * m[z0] + w * m[z1]
    t = torch.from_numpy(lr.astype(np.float32))
    h = torch.zeros_like(t)
    h[..., 1:] = (t[..., 1:] - t[..., :-1]) / np.sqrt(2)
    ln = {R: up(box_smooth(h.abs(), (1, 2), R).numpy()) for R in (1, 2, 3, 5)}
    out["local_noise_mad_R"] = {str(R): rho(v) for R, v in ln.items()}
    l3 = ln[3] / np.median(ln[3][mask])
    mc = np.clip(l3, 1 / 3, 3)
    s2 = np.sqrt(su ** 2 + (sn * mc) ** 2)
    out["noise_term_x_local_noise_R3_cap3"] = {"spearman": rho(s2), "coverage_95": round(float(np.mean(err <= 1.96 * s2[mask])), 4), "width_95": round(float(np.mean(2 * 1.96 * s2[mask])), 2)}
    U1 = box_smooth(U, (0,), 1).numpy()
    u1 = U1 / np.median(U1[mask])
    out["u_rz1_times_local_noise_pow"] = {str(w): rho(u1 * l3 ** w) for w in (0.25, 0.5, 1.0)}
    out["u_rz1_plus_local_noise"] = {str(w): rho(u1 + w * l3) for w in (0.1, 0.25, 0.5, 1.0)}
    # in-target ceiling: log|err| regressed on log features (fit on a random half of the target, ranked on the other)
    def sm(x): return box_smooth(box_smooth(x, (0,), 1), (1, 2), 2).numpy()
    m1 = box_smooth(P, (1, 2), 2)
    F = [sm((P - C).abs()), sm(edge(P, (0,))), sm(edge(P, (1, 2))), ln[3], (box_smooth(P * P, (1, 2), 2) - m1 * m1).clamp_min(0).sqrt().numpy()]
    X = [np.log(x[mask] + 1e-3) for x in F] + [np.broadcast_to(ph[:, None, None], pred.shape)[mask].astype(float)]
    it = pred[mask].astype(float)
    it = (it - np.median(it)) / np.std(it)
    X += [it, it ** 2, np.ones_like(err)]
    X = np.stack(X, 1)
    y = np.log(err + 0.5)
    perm = np.random.default_rng(0).permutation(err.size)
    a, b = perm[: err.size // 2], perm[err.size // 2:]
    def fit(cols):
        w = np.linalg.lstsq(X[a][:, cols], y[a], rcond=None)[0]
        return round(spearman(X[b][:, cols] @ w, err[b]), 4)
    out["in_target_regression_ceiling"] = {"delta_gz_gxy": fit([0, 1, 2, 8]), "+phase": fit([0, 1, 2, 5, 8]),
                                           "+phase+local_noise+local_std": fit([0, 1, 2, 3, 4, 5, 8]), "all+intensity": fit(list(range(9)))}
    # noise factor sweep: per-phase q fitted on the target itself to 0.95 (ideal level), the ranking it allows
    sw = {}
    Pm = np.broadcast_to(ph[:, None, None], pred.shape)
    for c in (1.0, 0.8, 0.6, 0.4, 0.2, 0.0):
        qq = []
        for p in range(f):
            m = mask & (Pm == p)
            ee = (e3[m] / 1.96) ** 2
            uu = (s * raw[m] / 1.96) ** 2
            nn = (c * sn[m]) ** 2
            lo, hi = 0.0, 100.0
            for _ in range(50):
                mid = (lo + hi) / 2
                lo, hi = (lo, mid) if np.mean(ee <= mid ** 2 * uu + nn) >= 0.95 else (mid, hi)
            qq.append(hi)
        s3 = np.sqrt((s * raw * np.array(qq)[idx % f][:, None, None] / 1.96) ** 2 + (c * sn) ** 2)
        sw[str(c)] = {"q_ideal": [round(x, 3) for x in qq], "spearman": rho(s3), "width_95": round(float(np.mean(2 * 1.96 * s3[mask])), 2)}
    out["noise_factor_sweep_ideal_q"] = sw
    return out

res = {p.split('/')[-1]: run(p) for p in sys.argv[2:]}
json.dump(res, open(sys.argv[1], 'w'), indent=1)
print(json.dumps(res)[:3000])
