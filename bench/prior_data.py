"""Training and evaluation data for the shipped prior (issue #13 item 2), as ``.npz`` exports.

``python bench/prior_data.py eval  --out devcarry/eval``: the held-out evaluation volumes (full series; the
Philips phantom cropped to its central 320 x 320), one ``.npz`` each plus ``README.txt``.
``python bench/prior_data.py train --out devcarry/train [--work DIR]``: extracts the training series
from the local bare mirrors of the neurolabusc/dcm_qa* repositories (``git archive`` at a pinned commit) and from
``../shared/data``, loads each with the node's own loader (``node.series.load_volumes``: the first volume of a
multi-volume series, e.g. the b0 of a DWI), trims noise slices, keeps every k-th slice (the through-plane nets
learn from the in-plane axes, ``models.prior._through_sets``, so slice subsampling keeps their pairs intact) and
writes ``<name>.npz`` plus ``sources.json`` (the list ``srnode train --sources`` copies into ``prior.json``).

The ``.npz`` format is the one ``node.app.volume_file.load_volume`` reads: data (Z, Y, X) int16 in modality units
(rounded; HU for CT), spacing (dz, dy, dx) mm, thickness mm, modality, value_range, positions (Z, 3) mm, normal (3,).
HELD_OUT series are never exported for training (the brief of issue #13 item 2): the GE 3D T1, the Siemens
PET/CT abdomen and every Philips head-phantom series.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import subprocess
import sys
import tarfile
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

SHARED = ROOT.parent / "shared" / "data"
MIRRORS = Path(os.environ.get("SRNODE_MIRRORS", str(ROOT.parent / ".mirror")))  # fetched git mirrors of the dcm_qa repositories

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
    trim: int = 0  # drop this many slices at each end; -1: every end slice whose mean is < 10 % of the median
    volume: int = 0  # which volume of a multi-volume series (0: the first; -1: the last)
    reformat: str = ""  # "rows" / "cols": restack along its rows / columns (sagittal 3D -> axial / coronal planes)
    license: str = "BSD-2"
    shared: str = ""  # the ../shared/data folder, when the series is there
    window: tuple[int, int] = (0, 0)  # keep the acquired slices [a, b) only, before any reformat ((0, 0): all)
    sub: str = ""  # export into this subfolder of --out, not in the recommended set ("epi": low-resolution EPI;
    # "cor": the MPRAGE's column restack, which lowered the in-plane x2 net's held-out gains, docs/engines.md)


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
    run = subprocess.run(["git", "--git-dir", str(git), "archive", "HEAD", item.path], capture_output=True)
    if run.returncode:  # e.g. a blob the snapshot lacks (its largest files are listed but absent)
        raise FileNotFoundError(f"{item.repo}:{item.path}: git archive failed: {run.stderr.decode()[-200:].strip()}")
    dest.mkdir(parents=True, exist_ok=True)
    with tarfile.open(fileobj=io.BytesIO(run.stdout)) as tf:
        for m in tf.getmembers():
            src = tf.extractfile(m) if m.isfile() else None
            if src is not None:  # flat: one folder of files per series
                (dest / m.name.replace("/", "__")).write_bytes(src.read())
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
    label: str = ""  # the node's label of the kept volume ("b=0", "time 1", ...)
    row_cosine: np.ndarray | None = None
    col_cosine: np.ndarray | None = None


def load(folder: Path, volume: int = 0) -> Vol:
    """The node's own loader; the ``volume``-th volume of a multi-volume series. VolumeError when it refuses."""
    from node.series import load_volumes

    files = sorted(p for p in folder.rglob("*") if p.is_file() and not p.name.startswith(".")
                   and not p.name.endswith((".nii", ".txt", ".pdf", ".json")))
    vols = load_volumes(files)
    sv = vols[volume if volume >= 0 else len(vols) + volume]
    return Vol(sv.data, sv.spacing, sv.slice_thickness, sv.modality, sv.value_range,
               np.asarray(sv.positions, float), np.asarray(sv.normal, float), len(vols), sv.volume_label,
               np.asarray(sv.row_cosine, float), np.asarray(sv.col_cosine, float))


def save(out: Path, v: Vol, z: slice = slice(None), crop: int = 0) -> dict[str, Any]:
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


def export_eval(out: Path) -> list[dict[str, Any]]:
    rows = []
    for name, (folder, crop) in EVAL.items():
        v = load(SHARED / folder)
        row = save(out / f"{name}.npz", v, crop=crop)
        row["from"] = f"../shared/data/{folder}" + (f" (central {crop}x{crop})" if crop else "")
        rows.append(row)
        print(json.dumps(row))
    lines = ["Held-out evaluation volumes for the prior (bench/prior_data.py eval); never trained on.",
             "Format: node.app.volume_file.load_volume .npz (int16 modality units, spacing dz/dy/dx mm, thickness, modality,",
             "value_range, positions, normal). Use: srnode eval devcarry/eval/ge_t1.npz --axis through --factor 2 ...", ""]
    lines += [f"{r['file']}: {r['from']}, {'x'.join(map(str, r['shape']))} {r['modality']}, spacing {r['spacing_mm']}"
              f" mm, thickness {r['thickness_mm']} mm, {r['bytes'] / 1e6:.1f} MB" for r in rows]
    lines += ["", "ph1 is CROPPED to its central 256x256 (of 512x512; as the earlier CPU evals: --crop 256) to keep devcarry/eval under 25 MB; whole slices are in",
              "../shared/data/ct_head_phantom_philips_1mm."]
    (out / "README.txt").write_text("\n".join(lines) + "\n")
    return rows


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("what", choices=["eval", "train", "train-split", "eval-split"])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--work", type=Path, default=ROOT.parent / "train-data" / "p3",
                   help="where the repositories' series are extracted (outside every repository)")
    p.add_argument("--only", nargs="*", default=[], help="train: these items only")
    a = p.parse_args()
    if a.what == "eval":
        export_eval(a.out)
    elif a.what == "eval-split":
        export_split_eval(a.out)
    else:
        export_train(a.out, a.work, tuple(a.only), TRAIN if a.what == "train" else TRAIN_SPLIT)
    return 0


def restack_rows(v: Vol) -> Vol:
    """The volume restacked along its rows (Z, Y, X) -> (Y, Z, X): planes of constant row index (a sagittal 3D
    series becomes axial-like planes), with the geometry that follows (normal = the column cosine)."""
    assert v.col_cosine is not None and v.row_cosine is not None
    data = np.ascontiguousarray(v.data.transpose(1, 0, 2))
    dz, dy, dx = v.spacing
    pos = v.positions[0][None, :] + np.arange(data.shape[0])[:, None] * dy * v.col_cosine[None, :]
    return Vol(data, (dy, dz, dx), dy, v.modality, v.value_range, pos, v.col_cosine, v.count, v.label,
               v.row_cosine, v.normal)


def restack_cols(v: Vol) -> Vol:
    """The volume restacked along its columns (Z, Y, X) -> (X, Z, Y): planes of constant column index (a sagittal
    3D series becomes coronal-like planes), with the geometry that follows (normal = the row cosine)."""
    assert v.col_cosine is not None and v.row_cosine is not None
    data = np.ascontiguousarray(v.data.transpose(2, 0, 1))
    dz, dy, dx = v.spacing
    pos = v.positions[0][None, :] + np.arange(data.shape[0])[:, None] * dx * v.row_cosine[None, :]
    return Vol(data, (dx, dz, dy), dx, v.modality, v.value_range, pos, v.row_cosine, v.count, v.label,
               v.col_cosine, v.normal)


def _trim(v: Vol, trim: int) -> slice:
    if trim >= 0:
        return slice(trim, v.data.shape[0] - trim)
    m = v.data.mean(axis=(1, 2))
    ok = np.nonzero(m >= 0.1 * float(np.median(m)))[0]
    return slice(int(ok[0]), int(ok[-1]) + 1)


XA30, QA, GE, PH, TO = ("neurolabusc/dcm_qa_xa30", "neurolabusc/dcm_qa", "neurolabusc/dcm_qa_ge",
                        "neurolabusc/dcm_qa_philips", "neurolabusc/dcm_qa_toshiba")
TRAIN = (
    Item("mpr_sag", "FNNDSC/SAG-anon", "(via ../shared/data/mr_t1_mprage_sag_siemens)",
         "MR Siemens Skyra 3T sagittal MPRAGE, human child, 0.86 mm in-plane, 0.9 mm slices; noise end slices "
         "dropped, every 2nd slice kept", step=2, trim=-1, license="MIT", shared="mr_t1_mprage_sag_siemens"),
    Item("mpr_ax", "FNNDSC/SAG-anon", "(via ../shared/data/mr_t1_mprage_sag_siemens)",
         "the same MPRAGE restacked along its rows (axial-like planes, 0.9 x 0.86 mm), every 3rd plane kept",
         step=3, trim=-1, license="MIT", shared="mr_t1_mprage_sag_siemens", reformat="rows"),
    Item("mpr_cor", "FNNDSC/SAG-anon", "(via ../shared/data/mr_t1_mprage_sag_siemens)",
         "the same MPRAGE restacked along its columns (coronal-like planes, 0.9 x 0.86 mm), every 3rd plane kept",
         step=3, trim=-1, license="MIT", shared="mr_t1_mprage_sag_siemens", reformat="cols", sub="cor"),
    Item("ct_head_ge", "neurolabusc/dcm_qa_ct", "In/GE",
         "CT GE HiSpeed Dual, human head, 512x512 0.49 mm, 4/7 mm slices, gantry tilt 18.5 deg",
         shared="ct_head_ge_tilted_irregular"),
    Item("xa30_t1w5", XA30, "In/5_anat-T1w_acq-tfl",
         "MR Siemens Prisma XA30 enhanced T1w (tfl), human, 128x128 2 mm isotropic",
         shared="mr_t1_enhanced_multiframe_siemens_xa30"),
    Item("xa30_t1w6", XA30, "In/6_anat-T1w_acq-tfl",
         "MR Siemens Prisma XA30 enhanced T1w (tfl, second reconstruction), human, 128x128 2 mm isotropic"),
    Item("xa30_dwi_b0", XA30, "In/10_DWI_dir80_PA", "MR Siemens XA30 DWI, human brain, b=0 volume only, "
         "72x72 3 mm", sub="epi"),
    Item("ph_dti_b0", PH, "In/Vanderbilt_2018/601_WIP_dti_ax", "MR Philips DTI, human brain, b=0 volume only, "
         "80x80 3 mm", sub="epi"),
    Item("tosh_dti_b0", TO, "In/Galan/8006_DTI_AX_30d", "MR Toshiba/Canon axial DTI, human brain, the last "
         "volume (the node labels it b=?; its mean is 4.5x the b=1500 volumes': the b=0) only, 64x64 3 mm",
         volume=-1, sub="epi"),
    Item("qa_epi_ax", QA, "In/Orientation/ax/axasc36", "MR Siemens EPI mosaic, human brain, axial, first of 2 "
         "volumes, 64x64 3.25 mm", sub="epi"),
    Item("qa_epi_cor", QA, "In/Orientation/cor/corasc36", "MR Siemens EPI mosaic, human brain, coronal, first "
         "of 2 volumes, 64x64 3.25 mm", sub="epi"),
    Item("qa_epi_sag", QA, "In/Orientation/sag/sagasc36", "MR Siemens EPI mosaic, human brain, sagittal, first "
         "of 2 volumes, 64x64 3.25 mm", sub="epi"),
)
MPR_SPLIT = 96  # the MPRAGE's sagittal slices [14, 96) (one side of the head) vs [96, 178) (the other)
TRAIN_SPLIT = tuple(  # set "split": the human-MR check - MPRAGE one side only, the XA30 T1w held out
    [replace(it, name=f"{it.name}_l", what=it.what + f"; acquired sagittal slices < {MPR_SPLIT} only",
             window=(0, MPR_SPLIT))
     for it in TRAIN if it.name.startswith("mpr")]
    + [it for it in TRAIN if not it.name.startswith(("mpr", "xa30_t1w"))])
EVAL_SPLIT = {  # CPU-only held-out human MR for set "split" (not in devcarry/eval)
    "mpr_r": ("mr_t1_mprage_sag_siemens", (MPR_SPLIT, 178)),
    "xa30t1": ("mr_t1_enhanced_multiframe_siemens_xa30", (0, 0)),
}

SKIPPED = {  # candidates looked at and not exported, with the reason
    "neurolabusc/dcm_qa_ge:In/04_Ax_DWI_TENSOR_R2MB2 (and 01-03)": "the node's loader refuses it: every image "
    "shares its slice position with others (DWI volumes it cannot tell apart)",
    "neurolabusc/dcm_qa_ge:In/SliceTiming/14_Ax_fMRI_HB3_48sl_int_asc": "refused likewise (3 time points it cannot "
    "tell apart)",
    "neurolabusc/dcm_qa_philips:In/Bangalore_2008/dwi_no-phi": "refused likewise (34 images per position)",
    "neurolabusc/dcm_qa_enh:In/Philips/IM_0006_T1.dcm, IM_0035_fMRI.dcm, In/Canon/DTI_PA.dcm": "blob absent "
    "from the local mirror (large files are listed but not fetched)",
    "neurolabusc/dcm_qa:In/TotalReadoutTime": "blobs absent from the local mirror",
    "neurolabusc/dcm_qa_xa30:In/25_asl_2d_tra, dcm_qa_enh:In/Siemens/XA10": "degenerate: 12 and 6 slices of 64x64",
    "neurolabusc/dcm_qa_enh:In/Philips/IM_0027_fMAP.dcm": "a field map (real/imaginary parts), not anatomy",
    "neurolabusc/dcm_qa_xa30:In/7_func-bold_task-fa_run-1": "left out: a 4th Siemens EPI like the three "
    "Orientation series",
    "held out (never trained on)": ", ".join(HELD_OUT),
}


def export_split_eval(out: Path) -> None:
    """EVAL_SPLIT volumes to ``out`` (for the CPU check of set "split")."""
    for name, (folder, (a, b)) in EVAL_SPLIT.items():
        v = load(SHARED / folder)
        print(json.dumps(save(out / f"{name}.npz", v, slice(a, b) if b else slice(None))))


def export_train(out: Path, work: Path, only: tuple[str, ...] = (), items: tuple[Item, ...] = TRAIN
                 ) -> list[dict[str, Any]]:
    """Export ``items`` (or those named in ``only``) to ``out`` (items with ``sub`` to ``out/<sub>``, each folder
    with its own sources.json, README.txt and the shared skipped.json)."""
    rows: list[dict[str, Any]] = []
    for sub in sorted({it.sub for it in items}):
        sel = tuple(it for it in items if it.sub == sub and (not only or it.name in only))
        if sel:
            rows += _export(out / sub if sub else out, work, sel, items is TRAIN)
    return rows


def _export(out: Path, work: Path, items: tuple[Item, ...], full: bool) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    for it in items:
        assert not any(h.split(":")[-1] in f"{it.path} {it.shared}" for h in HELD_OUT), it
        folder = extract(it, work)
        v = load(folder, it.volume)
        if it.window != (0, 0):
            a, b = it.window
            v = Vol(v.data[a:b], v.spacing, v.thickness, v.modality, v.value_range, v.positions[a:b], v.normal,
                    v.count, v.label, v.row_cosine, v.col_cosine)
        if it.reformat == "rows":
            v = restack_rows(v)
        elif it.reformat == "cols":
            v = restack_cols(v)
        t = _trim(v, it.trim)
        z = slice(t.start, t.stop, it.step)
        row = save(out / f"{it.name}.npz", v, z)
        commit = "" if it.repo.startswith("FNNDSC") else _commit(it.repo)
        row.update({"series": it.name, "repo": it.repo, "commit": commit, "path": it.path, "license": it.license,
                    "what": it.what, "from": f"../shared/data/{it.shared}" if it.shared else f"{it.repo}:{it.path}",
                    "volume": v.label or "the only one", "volumes_in_series": v.count,
                    "slices": f"{t.start}..{t.stop - 1} step {it.step} of {v.data.shape[0]}"})
        if it.repo.startswith("FNNDSC"):
            row["commit"] = "not recorded in ../shared/data (MIT, FNNDSC/SAG-anon)"
        rows.append(row)
        print(json.dumps({k: row[k] for k in ("series", "shape", "spacing_mm", "bytes", "volume", "slices")}),
              flush=True)
    doc = [{k: r[k] for k in ("series", "repo", "commit", "path", "license", "what", "from", "shape", "spacing_mm",
                               "volume", "slices")} for r in rows]
    (out / "sources.json").write_text(json.dumps(doc, indent=1) + "\n")
    (out / "skipped.json").write_text(json.dumps(SKIPPED, indent=1) + "\n")
    total = sum(int(r["bytes"]) for r in rows)
    lines = [f"Training series for the shipped prior (bench/prior_data.py {'train' if full else 'train-split'});"
             " provenance in sources.json, candidates left out and why in skipped.json.",
             "Train (all 7 nets): srnode train " + str(out) + "/*.npz --out models/weights/prior.pt --steps N "
             "--device cuda --sources " + str(out / "sources.json"), "",
             "Held out, never here: " + ", ".join(HELD_OUT), ""]
    lines += [f"{r['file']}: {r['from']} ({r['volume']}), {'x'.join(map(str, r['shape']))} {r['modality']}, slices "
              f"{r['slices']}, {int(r['bytes']) / 1e6:.2f} MB" for r in rows]
    lines += [f"total {total / 1e6:.1f} MB"]
    if out.name not in ("epi", "cor"):
        lines += ["", "cor/: the MPRAGE restacked along its columns (coronal-like planes), kept apart: adding it to the",
                  "in-plane x2 training lowered the held-out gains (MPRAGE -0.14 dB, XA30 T1 -0.31 dB; docs/engines.md)."]
    if full and out.name not in ("epi", "cor"):
        lines += ["", "epi/: six low-resolution EPI volumes (b=0 / first volume), kept apart: in the CPU check (bench/results/",
                  "prior3-README.md) adding them lowered the held-out MPRAGE x2 gain (+3.47 vs +3.75 dB) and their 64-pixel",
                  "matrices shrink every through-plane patch (x2: 15 instead of 29 rows; models.internal.train takes the",
                  "smallest set's size). Add epi/*.npz (and merge epi/sources.json) to train on them anyway."]
    (out / "README.txt").write_text("\n".join(lines) + "\n")
    print(f"{len(rows)} series, {total / 1e6:.1f} MB in {out}")
    return rows


if __name__ == "__main__":
    raise SystemExit(main())
