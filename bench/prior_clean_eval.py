"""``python bench/prior_clean_eval.py VOLUME WEIGHTS``: ``srnode eval VOLUME --axis through --factor 2 --fast``'s
engine and cubic figures, plus the same figures with artifact slices left out (truth slices whose maximum exceeds
4 x the volume's 99.9th percentile: in ``mr_t1_3d_axial_ge`` slice 65 holds a spike up to 5467 against a p99.9 of
426, and its squared error sets that series' PSNR). Prints one JSON object. VOLUME: a series folder or a .npz
(``node.app.volume_file.load_volume``)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from models.engine import Device, EngineOptions  # noqa: E402
from models.evaluate import body_mask, data_range, fidelity  # noqa: E402
from node.app.volume_file import load_volume  # noqa: E402
from node.bench.eval import ThickProfile, evaluate, simulate  # noqa: E402


def main(volume: Path, weights: str) -> dict[str, object]:
    lo = load_volume(volume)
    lr, truth, fac = simulate(lo, "through", 2, ThickProfile.DISCRETE)  # as recorded
    doc, outs, _sigma = evaluate(lr, truth, fac, EngineOptions(device=Device.CPU, fast=True, weights=weights),
                                 "selfsup")
    p = float(np.percentile(truth, 99.9))
    bad = np.array([float(truth[z].max()) > 4 * p for z in range(truth.shape[0])])
    mask = body_mask(truth, lr.modality)
    mask[bad] = False
    dr = data_range(truth)
    return {"volume": str(volume), "weights": weights, "excluded_slices": np.nonzero(bad)[0].tolist(),
            "all": {k: doc[k] for k in ("engine", "cubic")},
            "clean": {k: fidelity(outs[k], truth, mask, dr) for k in ("engine", "cubic")}}


if __name__ == "__main__":
    print(json.dumps(main(Path(sys.argv[1]), sys.argv[2])))
