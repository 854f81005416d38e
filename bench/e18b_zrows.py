"""Issue #13 / helper engine18b: the engine's gain over cubic on the series' own z pairs, per z row (calibration.z_pairs:
the acquired slices as targets, one scale coarser), beside the whole-pair gain the z check reads.

``python bench/e18b_zrows.py OUT.json -- EVAL ARGS...`` runs ``srnode eval EVAL ARGS...`` with ``calibration.held``
wrapped: on the z pairs it also sums, per target row (z), the squared error of the engine and of cubic (both with
data consistency, body voxels > 0.05 as ``held``), and writes them with each row's gain to OUT.json.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from models import calibration as cal  # noqa: E402
from models.internal import ensemble  # noqa: E402
from node.app.cli import main  # noqa: E402

rows: dict[str, Any] = {}
_held = cal.held


def held(net: Any, sets: list[Any], n_flips: int, body: float = 0.05) -> Any:
    if not rows and sets and sets[0].task.node_rows and sets[0].hr.shape[1] > sets[0].lr.shape[1]:
        se = np.zeros(sets[0].hr.shape[1])
        sb = np.zeros_like(se)
        n = np.zeros_like(se)
        with torch.no_grad():
            for s in sets:
                mean, _ = ensemble(net, s, n_flips)
                pred = s.task.project(s.base + mean, s.lr)
                base = s.task.project(s.base.clone(), s.lr)
                m = (s.hr > body).float()
                se += (((pred - s.hr) ** 2) * m).sum(dim=(0, 2)).cpu().numpy()
                sb += (((base - s.hr) ** 2) * m).sum(dim=(0, 2)).cpu().numpy()
                n += m.sum(dim=(0, 2)).cpu().numpy()
        gain = [10 * math.log10(b / e) if e > 0 and b > 0 else None for e, b in zip(se, sb, strict=True)]
        rows.update({"row_gain_db": gain, "row_voxels": n.tolist(), "row_mse_engine": (se / np.maximum(n, 1)).tolist(),
                     "row_mse_cubic": (sb / np.maximum(n, 1)).tolist(),
                     "gain_db": 10 * math.log10(sb.sum() / se.sum())})
    return _held(net, sets, n_flips, body)


if __name__ == "__main__":
    cut = sys.argv.index("--")
    cal.held = held  # type: ignore[assignment]
    rc = main(["eval", *sys.argv[cut + 1 :]])
    Path(sys.argv[1]).write_text(json.dumps(rows, indent=1) + "\n")
    raise SystemExit(rc)
