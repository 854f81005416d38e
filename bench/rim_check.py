"""Dark/bright rims in a through-plane x f result: new voxels far outside their acquired neighbours along z.

``PYTHONPATH=. python bench/rim_check.py CASE [--fast] [--window Y0:Y1,X0:X1] [--slices Z0:Z1] --out X.json``

CASE:
- ``demo-synth``: the input ``make demo`` sends without ../shared/data (``node.app.phantom``: 40 slices, each the
  mean of the object over its 2.5 mm slab, 256 x 256) and its exact truth (the same object, noise-free, as 1.25 mm
  slabs every 1.25 mm: the profile thickness / f the engine targets);
- ``demo-synth-point``: the phantom as it was before slab averaging (point samples declared 2.5 mm thick; truth
  the point samples every 1.25 mm, the input its even rows);
- ``demo-pair``: the input ``make demo`` sends with ../shared/data (the real 5 mm phantom CT) x2, truth the 1 mm
  reconstruction of the same acquisition at the output positions (acquired positions: the 1 mm slice there;
  new positions, 0.5 mm off the 1 mm grid: the mean of the two 1 mm slices around them);
- ``ph1`` / ``mpr`` / ``ge``: ``srnode eval``'s simulated x2 (``node.bench.eval.simulate``) of the 1 mm phantom,
  the MPRAGE and the GE T1.

For the engine, cubic and the truth: the count of voxels of the new slices more than ``--hu`` below (dark) or
above (bright) BOTH through-plane neighbours (the nearest output rows k-1 and k+1); for the engine's rim voxels
their error vs truth, and whether |err| <= 1.96 sigma there; the eval figures (PSNR gain over cubic, HU-MAE,
bias, coverage) on the compared grid.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from models.engine import Device, EngineOptions, Factors, VolumeInput

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def rims(vol: np.ndarray, f: int, hu: float) -> tuple[np.ndarray, np.ndarray]:
    """(dark, bright) boolean masks of the new rows (k % f != 0) more than ``hu`` below / above both z neighbours."""
    dark = np.zeros(vol.shape, bool)
    bright = np.zeros(vol.shape, bool)
    v = vol.astype(np.float32)
    mid, up, dn = v[1:-1], v[:-2], v[2:]
    dark[1:-1] = (mid < up - hu) & (mid < dn - hu)
    bright[1:-1] = (mid > up + hu) & (mid > dn + hu)
    new = (np.arange(vol.shape[0]) % f != 0)[:, None, None]
    return dark & new, bright & new


def case_input(name: str, f: int) -> tuple[VolumeInput, np.ndarray, str]:
    """(engine input, truth on the x f output grid, description)."""
    if name == "demo-synth":
        from node.app.phantom import phantom_hu

        px = 230.0 / 256
        lr = np.clip(np.rint(phantom_hu() + 1024), 0, 4095) - 1024.0  # exactly the pixel values make demo sends
        vin = VolumeInput(lr.astype(np.float32), (2.5, px, px), 2.5, "CT", (-1024.0, 3071.0))
        truth = phantom_hu(slices=79, step_mm=1.25, noise_hu=0.0)  # 1.25 mm slabs every 1.25 mm, no noise
        return vin, truth, "generated phantom 40 x 256 x 256, 2.5 mm slabs; truth: 1.25 mm slabs every 1.25 mm, noise-free"
    if name == "demo-synth-point":  # the phantom before slab averaging (point samples declared 2.5 mm thick)
        from node.app.phantom import phantom_hu

        fine = np.clip(np.rint(phantom_hu(slices=79, step_mm=1.25, thickness_mm=0.0) + 1024), 0, 4095) - 1024.0
        lr = np.ascontiguousarray(fine[::2]).astype(np.float32)
        px = 230.0 / 256
        vin = VolumeInput(lr, (2.5, px, px), 2.5, "CT", (-1024.0, 3071.0))
        return vin, fine.astype(np.float32), "point-sampled phantom 40 x 256 x 256 (declared 2.5 mm), truth every 1.25 mm"
    from node.app.volume_file import load_volume

    if name == "demo-pair":
        thick, thin = load_volume(DATA / "ct_head_phantom_philips_5mm"), load_volume(DATA / "ct_head_phantom_philips_1mm")
        n = thick.normal / np.linalg.norm(thick.normal)
        step = thick.vin.spacing[0] / f
        out_pos = float(thick.positions[0] @ n) + step * np.arange((thick.vin.data.shape[0] - 1) * f + 1)
        thin_pos = thin.positions @ n
        order = np.argsort(thin_pos)
        tp, td = thin_pos[order], thin.vin.data[order].astype(np.float32)
        truth = np.empty((out_pos.size, *td.shape[1:]), np.float32)
        for k, p in enumerate(out_pos):  # linear between the thin slices around p (exact at a thin position)
            i = int(np.clip(np.searchsorted(tp, p) - 1, 0, tp.size - 2))
            w = float(np.clip((p - tp[i]) / (tp[i + 1] - tp[i]), 0, 1))
            truth[k] = (1 - w) * td[i] + w * td[i + 1]
        return thick.vin, truth, "real 5 mm phantom CT, truth from the 1 mm reconstruction (interpolated at new rows)"
    from node.bench.eval import ThickProfile, simulate

    folder = {"ph1": "ct_head_phantom_philips_1mm", "mpr": "mr_t1_mprage_sag_siemens", "ge": "mr_t1_3d_axial_ge"}[name]
    vin, truth, _ = simulate(load_volume(DATA / folder), "through", f, ThickProfile.DISCRETE)  # as recorded
    return vin, truth, f"{folder} simulated x{f} (srnode eval)"


def window(vin: VolumeInput, truth: np.ndarray, f: int, spec: str, slices: str) -> tuple[VolumeInput, np.ndarray]:
    data = vin.data
    if slices:
        z0, z1 = (int(s) for s in slices.split(":"))
        data = data[z0:z1]
        truth = truth[z0 * f : (z1 - 1) * f + 1]
    if spec:
        (y0, y1), (x0, x1) = ((int(a) for a in part.split(":")) for part in spec.split(","))
        data, truth = data[:, y0:y1, x0:x1], truth[:, y0:y1, x0:x1]
    return replace(vin, data=np.ascontiguousarray(data)), np.ascontiguousarray(truth)


def measure(out: np.ndarray, cub: np.ndarray, truth: np.ndarray, sigma: np.ndarray, f: int, hu: float,
            modality: str) -> dict[str, Any]:
    from models.evaluate import body_mask, data_range, fidelity, uncertainty

    doc: dict[str, Any] = {}
    for what, vol in (("truth", truth), ("cubic", cub), ("engine", out)):
        d, b = rims(vol, f, hu)
        doc[f"{what}_dark"], doc[f"{what}_bright"] = int(d.sum()), int(b.sum())
    d, b = rims(out, f, hu)
    td, tb = rims(truth, f, hu)
    for what, m, tm in (("dark", d, td), ("bright", b, tb)):
        if m.any():
            err = (out - truth)[m]
            doc[f"engine_{what}_err_mean"] = round(float(err.mean()), 1)
            doc[f"engine_{what}_abs_err_median"] = round(float(np.median(np.abs(err))), 1)
            doc[f"engine_{what}_also_in_truth"] = int((m & tm).sum())
            doc[f"engine_{what}_covered_1.96sigma"] = round(float(np.mean(np.abs(err) <= 1.96 * sigma[m])), 3)
            doc[f"engine_{what}_sigma_median"] = round(float(np.median(sigma[m])), 1)
            z, y, x = np.nonzero(m)
            doc[f"engine_{what}_where"] = {"z": [int(z.min()), int(z.max())], "y": [int(y.min()), int(y.max())],
                                           "x": [int(x.min()), int(x.max())]}
    mask = body_mask(truth, modality)
    dr = data_range(truth)
    fe, fc = fidelity(out, truth, mask, dr), fidelity(cub, truth, mask, dr)
    new = (np.arange(truth.shape[0]) % f != 0)[:, None, None] & mask
    u = uncertainty(sigma, out, truth, mask, phase=np.arange(truth.shape[0]) % f)
    doc.update({"engine": fe, "cubic": fc, "gain_db": round(fe["psnr_db"] - fc["psnr_db"], 3),
                "coverage_95": u["coverage_95"], "coverage_95_by_phase": u.get("coverage_95_by_phase"),
                "width_95": u["width_95"],
                "new_rows_mae_engine": round(float(np.abs(out - truth)[new].mean()), 3),
                "new_rows_mae_cubic": round(float(np.abs(cub - truth)[new].mean()), 3)})
    return doc


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("case")
    p.add_argument("--factor", type=int, default=2)
    p.add_argument("--fast", action="store_true")
    p.add_argument("--tta-passes", type=int, default=8)
    p.add_argument("--finetune-steps", type=int, default=200)
    p.add_argument("--window", default="", help="Y0:Y1,X0:X1 of the input")
    p.add_argument("--slices", default="", help="Z0:Z1 of the input")
    p.add_argument("--hu", type=float, default=200.0, help="threshold (modality units)")
    p.add_argument("--save", default="", help="npz of engine, cubic, truth, sigma")
    p.add_argument("--out", type=Path, required=True)
    a = p.parse_args()
    from models.engine import get_engine, upscale

    f = a.factor
    vin, truth, what = case_input(a.case, f)
    vin, truth = window(vin, truth, f, a.window, a.slices)
    opts = EngineOptions(device=Device.CPU, fast=a.fast, tta_passes=a.tta_passes, finetune_steps=a.finetune_steps)
    t = time.perf_counter()
    res = upscale(get_engine("selfsup", opts), vin, Factors(f, 1))
    secs = time.perf_counter() - t
    cub = get_engine("cubic").upscale(vin, Factors(f, 1)).data
    hu = a.hu if vin.modality == "CT" else a.hu / 2000.0 * float(np.percentile(truth, 99.5) - np.percentile(truth, 0.5))
    doc = {"case": a.case, "what": what, "input_shape": list(vin.data.shape), "window": a.window, "slices": a.slices,
           "fast": a.fast, "threshold": round(hu, 2), "engine_name": res.engine, "fallback": res.fallback,
           "seconds": round(secs, 1), "dc_residual_after": res.report.get("dc_residual_after"),
           **measure(res.data, cub, truth, res.sigma, f, hu, vin.modality)}
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(doc, indent=1) + "\n")
    if a.save:
        np.savez_compressed(a.save, engine=res.data, cubic=cub, truth=truth, sigma=res.sigma, lr=vin.data)
    print(json.dumps({k: v for k, v in doc.items() if not isinstance(v, dict) or k.endswith("where")}))


if __name__ == "__main__":
    main()
