"""Which `srnode eval --profile` operator reproduces a REAL thick series from its real thin series best?

``python bench/ops17_realfit.py THICK THIN --crop N --json OUT``: for each ``node.bench.eval.ThickProfile`` (and
FWHM scale s x the thick SliceThickness), simulate thick slices from the thin series at the thick slices' positions
and compare them with the acquired thick slices (body-masked MAE and PSNR on the thin series' range). The operator
closest to the scanner's is the honest default for simulated evaluations. numpy only (+ the node's loader).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from models.evaluate import body_mask, data_range, psnr  # noqa: E402
from node.app.volume_file import load_volume  # noqa: E402
from node.bench.eval import ThickProfile, central, thick_from_thin  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("thick", type=Path)
    ap.add_argument("thin", type=Path)
    ap.add_argument("--crop", type=int, default=192)
    ap.add_argument("--json", type=Path, required=True)
    a = ap.parse_args()
    thick, thin = central(load_volume(a.thick), 0, a.crop), central(load_volume(a.thin), 0, a.crop)
    n = thin.normal / np.linalg.norm(thin.normal)
    tpos, hpos = thin.positions @ n, thick.positions @ n
    dz = thin.vin.spacing[0]
    j = np.abs(hpos[:, None] - tpos[None, :]).argmin(axis=1)
    ok = np.abs(hpos - tpos[j]) < 0.25 * dz
    f = int(round(thick.vin.spacing[0] / dz))
    fwhm_px = thick.vin.slice_thickness / dz
    # thick slice k sits at thin slice j0 + k f: simulate on the thin run from the first matched slice
    j0 = int(j[ok][0])
    doc: dict = {"thick": a.thick.name, "thin": a.thin.name, "crop": a.crop, "factor": f, "fwhm_px": fwhm_px,
                 "matched": int(ok.sum()), "results": []}
    real = thick.vin.data[ok]
    mask = body_mask(real, "CT")
    dr = data_range(real)
    for kind in ThickProfile:
        for s in ((1.0,) if kind == ThickProfile.DECIMATE else (0.8, 1.0, 1.2, 1.4)):
            sim_all = thick_from_thin(thin.vin.data[j0:], f, s * fwhm_px, kind)
            k = ((j[ok] - j0) // f).astype(int)
            sim = sim_all[k]
            err = (sim.astype(np.float64) - real)[mask]
            row = {"profile": kind.value, "fwhm_scale": s, "mae": round(float(np.abs(err).mean()), 2),
                   "bias": round(float(err.mean()), 2), "psnr_db": round(psnr(sim, real, dr, mask), 3)}
            doc["results"].append(row)
            print(json.dumps(row), flush=True)
    a.json.write_text(json.dumps(doc, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
