"""Issue #13 / helper engine18b: how far one slice's mean departs from its two neighbours' in the shared series (the
GE 3D T1's InstanceNumber 66 is 5x its neighbours), as acquired and as ``srnode eval`` gives the engine (crop 192,
trapezoid x2 thick slices). ``python bench/e18b_slice_outliers.py OUT.json``: per series, the largest
mean_k / ((mean_{k-1} + mean_{k+1}) / 2) and its inverse over slices k whose neighbours agree within 20 %
(means over each slice's voxels above 0.1 x the volume's 99th percentile, as ``models.evaluate``'s mask)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402

from node.bench.eval import ThickProfile, central, load_volume, simulate  # noqa: E402

DATA = Path(__file__).resolve().parent.parent.parent / "shared" / "data"
SERIES = ["mr_t1_3d_axial_ge", "mr_t1_mprage_sag_siemens", "ct_head_phantom_philips_1mm", "ct_head_phantom_philips_5mm",
          "ct_body_j2k_siemens_petct", "ct_head_ge_tilted_irregular", "mr_t1_enhanced_multiframe_siemens_xa30"]


def worst(vol: np.ndarray) -> dict[str, float]:
    v = vol.astype(np.float64)
    thr = 0.1 * float(np.percentile(v, 99))
    means = np.array([float(s[s > thr].mean()) if (s > thr).any() else np.nan for s in v])
    best = (1.0, -1)
    for k in range(1, len(means) - 1):
        a, b, c = means[k - 1], means[k], means[k + 1]
        if not np.all(np.isfinite([a, b, c])) or max(a, c) > 1.2 * min(a, c):
            continue
        r = b / (0.5 * (a + c))
        r = max(r, 1.0 / r)
        if r > best[0]:
            best = (r, k)
    return {"max_ratio": round(best[0], 3), "slice": best[1], "slices": len(means)}


def main(out: Path) -> None:
    res = {}
    for name in SERIES:
        try:
            s = load_volume(DATA / name)
        except Exception as exc:  # noqa: BLE001 - a series the loader refuses is reported, not fatal
            res[name] = {"error": type(exc).__name__}
            continue
        row = {"acquired": worst(s.vin.data)}
        if s.vin.data.shape[0] >= 7:
            c = central(s, 61, 192)
            lr, _, _ = simulate(c, "through", 2, ThickProfile("trapezoid"))
            row["eval_input_c192_trapezoid_x2"] = worst(lr.data)
        res[name] = row
        print(name, row)
    out.write_text(json.dumps(res, indent=1) + "\n")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
