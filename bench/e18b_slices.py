"""Issue #13 / helper engine18b: where on the GE 3D T1 crop the engine loses to cubic and sigma under-covers.

``python bench/e18b_slices.py OUT.json [--whole]`` runs the engine as ``srnode eval
mr_t1_3d_axial_ge --axis through --factor 2 --crop 192 --max-slices 61 --profile trapezoid --device cpu [--fast]``
and writes, per output slice (z) inside the eval's body mask: voxels, engine / cubic MAE, coverage of the 95 %
interval, mean sigma, the truth's mean; and the gain / MAE / coverage / width over the mask and over all voxels,
with and without the output slices 26-36 (the five either side of the single bright acquired slice, InstanceNumber
66, 5x its neighbours' mean).
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402

from models.engine import Device, EngineOptions  # noqa: E402
from models.evaluate import body_mask, data_range  # noqa: E402
from node.bench.eval import ThickProfile, central, evaluate, load_volume, simulate  # noqa: E402

DATA = Path(__file__).resolve().parent.parent.parent / "shared" / "data"


def main(out: Path, fast: bool) -> None:
    s = central(load_volume(DATA / "mr_t1_3d_axial_ge"), 61, 192)
    lr, truth, fac = simulate(s, "through", 2, ThickProfile("trapezoid"))
    doc, outs, sig = evaluate(lr, truth, fac, EngineOptions(device=Device("cpu"), fast=fast), "selfsup")
    m = body_mask(truth, lr.modality)
    dr = data_range(truth)
    e, c = np.abs(outs["engine"] - truth), np.abs(outs["cubic"] - truth)
    cov = e <= 1.96 * sig
    per = []
    for z in range(truth.shape[0]):
        mm = m[z]
        if mm.any():
            per.append({"z": z, "phase": z % 2, "voxels": int(mm.sum()), "mae_engine": round(float(e[z][mm].mean()), 2),
                        "mae_cubic": round(float(c[z][mm].mean()), 2), "coverage_95": round(float(cov[z][mm].mean()), 3),
                        "sigma_mean": round(float(sig[z][mm].mean()), 2), "truth_mean": round(float(truth[z][mm].mean()), 1)})
    zz = np.arange(truth.shape[0])[:, None, None] * np.ones(truth.shape, dtype=bool)
    away = (zz < 26) | (zz > 36)
    regions = {}
    for name, mm in {"mask": m, "mask_without_26_36": m & away, "all_voxels": np.ones_like(m),
                     "all_voxels_without_26_36": away}.items():
        mm = mm.astype(bool)
        mse_e, mse_c = float(np.mean(e[mm] ** 2)), float(np.mean(c[mm] ** 2))
        regions[name] = {"fraction": round(float(mm.mean()), 4), "gain_db": round(10 * math.log10(mse_c / mse_e), 2),
                         "mae_engine": round(float(e[mm].mean()), 2), "mae_cubic": round(float(c[mm].mean()), 2),
                         "coverage_95": round(float(cov[mm].mean()), 3), "width_95": round(float(2 * 1.96 * sig[mm].mean()), 1)}
    out.write_text(json.dumps({"command": " ".join(sys.argv), "data_range": dr, "regions": regions,
                               "eval": {k: doc[k] for k in ("engine", "cubic", "uncertainty")}, "slices": per},
                              indent=1) + "\n")
    print(json.dumps(regions, indent=1))


if __name__ == "__main__":
    main(Path(sys.argv[1]), fast="--whole" not in sys.argv[2:])
