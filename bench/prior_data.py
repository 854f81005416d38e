"""Training and evaluation data for the shipped prior (issue #13 item 2), as ``.npz`` exports.

``python bench/prior_data.py eval  --out devcarry/eval``: the held-out evaluation volumes (full series; the
Philips phantom cropped to its central 320 x 320), one ``.npz`` each plus ``README.txt``.
``python bench/prior_data.py train --out devcarry/train [--work /work/train-data]``: extracts the training series
from the local bare mirrors of the neurolabusc/dcm_qa* repositories (``git archive`` at a pinned commit) and from
``../shared/data``, loads each with the node's own loader (``node.series.load_volumes``: the first volume of a
multi-volume series, e.g. the b0 of a DWI), trims noise slices, keeps every k-th slice (the through-plane nets
learn from the in-plane axes, ``models.prior._through_sets``, so slice subsampling keeps their pairs intact) and
writes ``<name>.npz`` plus ``sources.json`` (the list ``srnode train --sources`` copies into ``prior.json``).

The ``.npz`` format is the one ``node.bench.eval.load_volume`` reads: data (Z, Y, X) int16 in modality units
(rounded; HU for CT), spacing (dz, dy, dx) mm, thickness mm, modality, value_range, positions (Z, 3) mm, normal (3,).
HELD_OUT series are never exported for training (the brief of issue #13 item 2): the GE 3D T1, the Siemens
PET/CT abdomen and every Philips head-phantom series.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tarfile
import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

SHARED = ROOT.parent / "shared" / "data"
MIRRORS = Path("/work/.mirror")

HELD_OUT = ("mr_t1_3d_axial_ge", "ct_body_j2k_siemens_petct", "ct_head_phantom_philips",
            "dcm_qa_ge:In/05_3D_Ax_T1_MP_RAGE_R22", "dcm_qa_ct:In/Philips")


@dataclass(frozen=True)
class Item:
    """One training series: where it comes from and how much of it is kept."""

    name: str
    repo: str  # "neurolabusc/dcm_qa_xa30", or "" for ../shared/data
    path: str  # path inside the repository (or the shared folder's name)
    what: str  # series description for sources.json
    step: int = 1  # keep every step-th slice
    trim: int = 0  # drop this many slices at each end (noise slices)
    volume: int = 0  # which volume of a multi-volume series (0: the first)
    license: str = "BSD-2"
    shared: str = ""  # the ../shared/data folder, when the series is there


def _commit(repo: str) -> str:
    git = MIRRORS / repo.replace("/", "+") / "repo"
    return subprocess.run(["git", "--git-dir", str(git), "rev-parse", "HEAD"], capture_output=True, text=True,
                          check=True).stdout.strip()


def extract(item: Item, work: Path) -> Path:
    """The series' files in ``work/<name>`` (extracted once with ``git archive`` from the mirror)."""
    if item.shared:
        return SHARED / item.shared
    dest = work / item.name
    if dest.is_dir() and any(dest.iterdir()):
        return dest
    git = MIRRORS / item.repo.replace("/", "+") / "repo"
    tar = subprocess.run(["git", "--git-dir", str(git), "archive", "HEAD", item.path], capture_output=True,
                         check=True).stdout
    dest.mkdir(parents=True, exist_ok=True)
    with tarfile.open(fileobj=io.BytesIO(tar)) as tf:
        for m in tf.getmembers():
            if m.isfile():
                m.name = m.name.replace("/", "__")  # flat: one folder of files per series
                tf.extract(m, dest, filter="data")
    return dest


@dataclass
class Vol:
    data: np.ndarray
    spacing: tuple[float, float, float]
    thickness: float
    modality: str
    value_range: tuple[float, float]
    positions: np.ndarray
    normal: np.ndarray
    count: int  # volumes in the series


def load(folder: Path, volume: int = 0) -> Vol:
    """The node's own loader; the ``volume``-th volume of a multi-volume series. VolumeError when it refuses."""
    from node.series import load_volumes

    files = sorted(p for p in folder.rglob("*") if p.is_file() and not p.name.startswith("."))
    vols = load_volumes(files)
    sv = vols[volume]
    return Vol(sv.data, sv.spacing, sv.slice_thickness, sv.modality, sv.value_range,
               np.asarray(sv.positions, float), np.asarray(sv.normal, float), len(vols))


def save(out: Path, v: Vol, z: slice = slice(None), crop: int = 0) -> dict[str, object]:
    """Write ``v`` (slices ``z``, central crop x crop when > 0) as an int16 .npz; returns a summary."""
    data = v.data[z]
    pos = v.positions[z]
    if crop:
        y0, x0 = max(0, (data.shape[1] - crop) // 2), max(0, (data.shape[2] - crop) // 2)
        data = data[:, y0:y0 + crop, x0:x0 + crop]
    r = np.rint(data)
    lo, hi = np.percentile(data, [0.5, 99.5])
    err = float(np.abs(r - data).max()) / max(float(hi - lo), 1e-6)
    if r.min() < -32768 or r.max() > 32767:
        raise ValueError(f"{out.name}: values {r.min()}..{r.max()} do not fit int16")
    step = z.step or 1
    spacing = (float(v.spacing[0]) * step, float(v.spacing[1]), float(v.spacing[2]))
    out.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(out, data=r.astype(np.int16), spacing=np.asarray(spacing), thickness=np.asarray(v.thickness),
                        modality=np.asarray(v.modality), value_range=np.asarray(v.value_range, float),
                        positions=pos, normal=v.normal)
    return {"file": out.name, "shape": list(data.shape), "spacing_mm": [round(s, 4) for s in spacing],
            "thickness_mm": v.thickness, "modality": v.modality, "bytes": out.stat().st_size,
            "rounding_error_of_range": round(err, 5)}


EVAL = {  # name: (shared folder, crop)
    "ge_t1": ("mr_t1_3d_axial_ge", 0),
    "ctbody": ("ct_body_j2k_siemens_petct", 0),
    "ph1": ("ct_head_phantom_philips_1mm", 256),
    "mpr": ("mr_t1_mprage_sag_siemens", 0),
}


def export_eval(out: Path) -> list[dict[str, object]]:
    rows = []
    for name, (folder, crop) in EVAL.items():
        v = load(SHARED / folder)
        row = save(out / f"{name}.npz", v, crop=crop)
        row["from"] = f"../shared/data/{folder}" + (f" (central {crop}x{crop})" if crop else "")
        rows.append(row)
        print(json.dumps(row))
    lines = ["Held-out evaluation volumes for the prior (bench/prior_data.py eval); never trained on.",
             "Format: node.bench.eval.load_volume .npz (int16 modality units, spacing dz/dy/dx mm, thickness, modality,",
             "value_range, positions, normal). Use: srnode eval devcarry/eval/ge_t1.npz --axis through --factor 2 ...", ""]
    lines += [f"{r['file']}: {r['from']}, {'x'.join(map(str, r['shape']))} {r['modality']}, spacing {r['spacing_mm']}"
              f" mm, thickness {r['thickness_mm']} mm, {r['bytes'] / 1e6:.1f} MB" for r in rows]
    lines += ["", "ph1 is CROPPED to its central 256x256 (of 512x512; as the earlier CPU evals: --crop 256) to keep devcarry/eval under 25 MB; whole slices are in",
              "../shared/data/ct_head_phantom_philips_1mm."]
    (out / "README.txt").write_text("\n".join(lines) + "\n")
    return rows


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("what", choices=["eval", "train"])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--work", type=Path, default=Path("/work/train-data"))
    a = p.parse_args()
    if a.what == "eval":
        export_eval(a.out)
    else:
        export_train(a.out, a.work)
    return 0


def export_train(out: Path, work: Path) -> None:
    raise NotImplementedError


if __name__ == "__main__":
    raise SystemExit(main())
