"""``srnode bench peers SERIES_DIR...``: a peer method side by side with srnode and cubic (issue #13).

The peer is ECLARE (Remedios et al., self-supervised through-plane SR; ``eclare==1.0.1`` on PyPI, console script
``run-eclare``), run in its own venv (``make peers-venv`` -> ``.venv-eclare/``: it pins scipy) as a subprocess.
For each series:

1. the truth is the series (``--max-slices`` / ``--crop``: a central sub-volume, ``node.bench.eval.central``) and
   the thick input is made exactly as ``srnode eval`` makes it (``node.bench.eval.simulate``: ``models.degrade``'s
   box profile of FWHM f slices, sampled every f slices);
2. srnode's engine, cubic and linear run on that input through ``node.bench.eval.evaluate`` (body mask, PSNR,
   SSIM, HU-MAE, bias of ``models.evaluate``);
3. the same input is written as NIfTI (nibabel), its affine from the DICOM geometry (``nifti_affine``: IPP of the
   first kept slice, IOP, pixel spacing, slice step; LPS -> RAS), and ECLARE runs on it with the slice profile
   given (``--relative-slice-thickness`` = FWHM / in-plane pixel, boxcar or gaussian: no ESPRESO estimate);
4. ECLARE's output (isotropic at the in-plane pixel size, its own affine) is read back onto the truth grid by
   its affine (``read_onto``: cubic B-spline along the slice axis, ``models.cubic.resample_axis``; the in-plane
   grid must be the input's) and scored with the same mask and metrics. ``resampling_ceiling_psnr_db`` says what
   that regridding alone costs: the truth taken to ECLARE's grid and back.

Writes one ``bench/results/peers-<UTC>.json`` (command, machine, budget note, figures per series and method:
psnr_db, ssim, hu_mae, hu_bias, gain_db over cubic, seconds) and a PNG beside it (bars per method; central
coronal cut of truth / cubic / srnode / ECLARE). On the CPU ECLARE's patch budget is reduced (``--n-patches``;
its default is 1,000,000 patches of batch 128 on a GPU) and the JSON says so; its network is unchanged.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from models.engine import Device, EngineOptions, VolumeInput
from node.errors import EngineError, VolumeError

if TYPE_CHECKING:
    from node.app.progress import StageBar

log = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parents[2]
PEER_VENV = ROOT / ".venv-eclare"
ECLARE_DEFAULT_PATCHES = 1_000_000  # eclare.main's --n-patches default
LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])  # DICOM patient (LPS) <-> NIfTI world (RAS)


@dataclass(frozen=True)
class Geometry:
    """Where the voxels of a (Z, Y, X) volume lie in DICOM patient space (LPS, mm).

    ``origin``: ImagePositionPatient of voxel (0, 0, 0); ``row_cosine``: direction of increasing column index x
    (IOP[0:3]); ``col_cosine``: of increasing row index y (IOP[3:6]); ``step``: vector from one slice's position to
    the next (mm); ``pixel``: (dy, dx) PixelSpacing (row, column spacing) in mm.
    """

    origin: np.ndarray  # (3,)
    row_cosine: np.ndarray  # (3,)
    col_cosine: np.ndarray  # (3,)
    step: np.ndarray  # (3,)
    pixel: tuple[float, float]

    def positions(self, n: int) -> np.ndarray:
        """(n, 3) ImagePositionPatient of slices 0..n-1."""
        return self.origin[None, :] + np.arange(n)[:, None] * self.step[None, :]


def geometry_of(positions: np.ndarray, row_cosine: np.ndarray, col_cosine: np.ndarray,
                pixel: tuple[float, float], offset: tuple[int, int] = (0, 0), every: int = 1) -> Geometry:
    """The geometry of slices ``positions[::every]`` (Z, 3 IPP, LPS mm; >= 2 slices, evenly spaced) cropped to
    start at row/column ``offset`` = (y0, x0). VolumeError when fewer than two slices remain."""
    pos = np.asarray(positions, float)[::every]
    if pos.shape[0] < 2:
        raise VolumeError("a geometry needs at least two slices")
    r, c = np.asarray(row_cosine, float), np.asarray(col_cosine, float)
    dy, dx = pixel
    origin = pos[0] + offset[1] * dx * r + offset[0] * dy * c
    step = (pos[-1] - pos[0]) / (pos.shape[0] - 1)
    return Geometry(origin, r, c, step, (float(dy), float(dx)))


def nifti_affine(g: Geometry) -> np.ndarray:
    """The NIfTI (RAS) affine of a volume stored as nibabel data (X, Y, Z) = ``volume.transpose(2, 1, 0)``:
    voxel (i, j, k) = (column, row, slice) -> mm. DICOM's LPS is turned into RAS by negating x and y."""
    a = np.eye(4)
    a[:3, 0] = g.row_cosine * g.pixel[1]
    a[:3, 1] = g.col_cosine * g.pixel[0]
    a[:3, 2] = g.step
    a[:3, 3] = g.origin
    return LPS_TO_RAS @ a


def dicom_positions(affine: np.ndarray, n: int) -> np.ndarray:
    """(n, 3) ImagePositionPatient (LPS mm) of slices k = 0..n-1 of a NIfTI volume with ``affine`` (RAS)."""
    lps = LPS_TO_RAS @ affine
    return (lps @ np.stack([np.zeros(n), np.zeros(n), np.arange(n), np.ones(n)]))[:3].T


def write_nifti(path: Path, volume: np.ndarray, g: Geometry) -> None:
    """Write ``volume`` (Z, Y, X) as NIfTI-1 (float32, data (X, Y, Z), ``nifti_affine(g)`` as sform and qform)."""
    import nibabel as nib

    img = nib.Nifti1Image(np.ascontiguousarray(volume.transpose(2, 1, 0), dtype=np.float32), nifti_affine(g))
    img.set_qform(img.affine, code=1)
    img.set_sform(img.affine, code=1)
    nib.save(img, str(path))


def _load_nifti(path: Path) -> Any:
    """A NIfTI image (nibabel SpatialImage: ``affine``, ``shape``, ``get_fdata``); VolumeError otherwise."""
    import nibabel as nib
    from nibabel.spatialimages import SpatialImage

    try:
        img = nib.load(str(path))
    except (OSError, ValueError, nib.filebasedimages.ImageFileError) as exc:
        raise VolumeError(f"{path.name}: not readable as NIfTI: {exc}") from exc
    if not isinstance(img, SpatialImage) or img.affine is None:
        raise VolumeError(f"{path.name}: not a NIfTI volume with an affine")
    return img


def read_onto(path: Path, g: Geometry, shape: tuple[int, int, int]) -> np.ndarray:
    """A peer's NIfTI output on the grid of ``g`` with ``shape`` (Z, Y, X), float32.

    The output must share the in-plane grid of ``g`` (same columns and rows, any slice step along the same
    normal): each target slice is found in the output through the two affines and interpolated along the
    slice axis (cubic B-spline, mirrored at the ends). VolumeError when the grids do not line up in-plane.
    """
    from models.cubic import resample_axis

    img = _load_nifti(path)
    data = np.asarray(img.get_fdata(dtype=np.float32))
    if data.ndim != 3:
        raise VolumeError(f"{path.name}: expected a 3-D volume, got shape {data.shape}")
    m = np.linalg.inv(img.affine) @ nifti_affine(g)  # target voxel (i, j, k) -> output voxel
    inplane_ok = np.allclose(m[:3, :2], np.eye(3)[:, :2], atol=1e-3) and np.allclose(m[:2, 2:], 0, atol=1e-3)
    if not inplane_ok or abs(m[2, 2]) < 1e-6:
        raise VolumeError(f"{path.name}: its grid does not share the input's columns and rows "
                          f"(target -> output index map {np.round(m[:3], 4).tolist()})")
    if data.shape[:2] != (shape[2], shape[1]):
        raise VolumeError(f"{path.name}: in-plane matrix {data.shape[:2]} is not the input's {(shape[2], shape[1])}")
    k = m[2, 2] * np.arange(shape[0]) + m[2, 3]
    if k.min() < -1 or k.max() > data.shape[2]:
        log.warning("%s: target slices %.2f..%.2f extend past the output's 0..%d", path.name, k.min(), k.max(),
                    data.shape[2] - 1)
    return resample_axis(data, 2, k).transpose(2, 1, 0).astype(np.float32)


def regrid_ceiling(truth: np.ndarray, scale: float, shift: float, n_out: int) -> np.ndarray:
    """``truth`` (Z, Y, X) taken to a peer's slice grid (output slice k' at truth index (k' - shift) / scale,
    k' < ``n_out``) and back: what the regridding of ``read_onto`` alone does to a perfect output."""
    from models.cubic import resample_axis

    there = resample_axis(truth, 0, (np.arange(n_out) - shift) / scale)
    return resample_axis(there, 0, scale * np.arange(truth.shape[0]) + shift).astype(np.float32)


@dataclass(frozen=True)
class PeerRun:
    """A peer's output on the truth grid, its wall seconds, and what it said about itself."""

    data: np.ndarray  # (Z, Y, X) float32 on the truth grid
    seconds: float
    index_map: tuple[float, float]  # truth slice k -> output slice scale * k + shift
    output_shape: tuple[int, ...]  # the output's nibabel shape (X, Y, Z')
    output_spacing: tuple[float, ...]  # its voxel size (mm)
    log_tail: str


def run_peer(command: list[str], lr: VolumeInput, g_lr: Geometry, g_truth: Geometry,
             truth_shape: tuple[int, int, int], workdir: Path, n_patches: int, batch_size: int,
             gpu_id: int = -1, timeout: float = 7200.0) -> PeerRun:
    """Write ``lr`` (its slices at ``g_lr``) as NIfTI, run ``command`` + ECLARE's options on it, read the output
    back onto ``g_truth``. ``command``: the peer's argv prefix (``run-eclare`` of the peer venv, or a stand-in
    taking the same options). EngineError when the peer fails or writes nothing; VolumeError for an output
    that is not on the input's in-plane grid."""
    workdir.mkdir(parents=True, exist_ok=True)
    src = workdir / "lr.nii.gz"
    write_nifti(src, lr.data, g_lr)
    out_dir = workdir / "out"
    profile = "gaussian" if lr.profile == "gaussian" else "boxcar"
    rel = lr.slice_thickness / min(g_lr.pixel)
    argv = [*command, "--in-fpath", str(src), "--out-dir", str(out_dir), "--n-patches", str(n_patches),
            "--batch-size", str(batch_size), "--relative-slice-thickness", f"{rel:.6g}",
            "--relative-slice-profile-type", profile, "--gpu-id", str(gpu_id), "--suffix", "_peer"]
    log.info("peer: %s", " ".join(argv))
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(argv, cwd=workdir, capture_output=True, text=True, timeout=timeout,
                              env={**os.environ, "PYTHONUNBUFFERED": "1"})
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise EngineError(f"peer {Path(command[-1]).name}: {exc}") from exc
    seconds = time.perf_counter() - t0
    tail = (proc.stdout + proc.stderr)[-1500:]
    outs = sorted(out_dir.glob("*_peer.nii*")) if out_dir.is_dir() else []
    if proc.returncode != 0 or not outs:
        raise EngineError(f"peer {Path(command[-1]).name} failed (exit {proc.returncode}): "
                          + " ".join(tail.split()[-60:]))
    img = _load_nifti(outs[0])
    m = np.linalg.inv(img.affine) @ nifti_affine(g_truth)
    data = read_onto(outs[0], g_truth, truth_shape)
    zooms = np.sqrt((np.asarray(img.affine)[:3, :3] ** 2).sum(axis=0))
    return PeerRun(data, seconds, (float(m[2, 2]), float(m[2, 3])), tuple(int(s) for s in img.shape),
                   tuple(round(float(z), 4) for z in zooms), tail)


def configure(parser: argparse.ArgumentParser) -> None:
    """Add ``srnode bench peers`` options to ``parser``."""
    parser.add_argument("series", nargs="+", type=Path, help="series folders (each is a truth)")
    parser.add_argument("--factor", type=int, default=2, help="through-plane factor (default 2)")
    parser.add_argument("--max-slices", type=int, default=0, help="central slices only (0: all)")
    parser.add_argument("--crop", type=int, default=0, help="central N x N in-plane window (0: whole matrix)")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu",
                        help="srnode's engine and ECLARE (--gpu-id 0) on this device")
    parser.add_argument("--engine", default="selfsup")
    parser.add_argument("--finetune-steps", type=int, default=EngineOptions.finetune_steps)
    parser.add_argument("--tta-passes", type=int, default=EngineOptions.tta_passes)
    parser.add_argument("--n-patches", type=int, default=0,
                        help=f"ECLARE's training patches (default: {ECLARE_DEFAULT_PATCHES} on cuda, 4096 on cpu)")
    parser.add_argument("--batch-size", type=int, default=0, help="ECLARE's batch (default: 128 cuda, 32 cpu)")
    parser.add_argument("--peer", default="", help="peer command (default: .venv-eclare/bin/run-eclare)")
    parser.add_argument("--out", type=Path, default=None,
                        help="JSON path (default: bench/results/peers-<UTC>.json); the PNG goes beside it")
    parser.add_argument("--workdir", type=Path, default=None, help="keep the NIfTI files here")
    parser.add_argument("--timeout", type=float, default=7200.0, help="seconds the peer may run per series")
    parser.add_argument("--note", default="", help="a note for the JSON (the machine: shared, loaded...)")


def _peer_command(args: argparse.Namespace) -> list[str]:
    if args.peer:
        return args.peer.split()
    exe = PEER_VENV / "bin" / "run-eclare"
    if not exe.is_file():
        raise EngineError(f"{exe} is missing: make peers-venv (ECLARE in its own venv)")
    return [str(exe)]


def compare(path: Path, args: argparse.Namespace, command: list[str], workdir: Path,
            bar: StageBar | None = None, n_series: int = 1) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """One series side by side: (figures, images on the truth grid: truth, cubic, srnode, ECLARE). ``bar``
    gets four stages per series (of ``n_series``)."""
    from models.evaluate import body_mask, data_range, fidelity
    from node.bench.eval import Loaded, central, evaluate, simulate
    from node.series import load_series

    def say(name: str, total: int | None = None) -> None:
        if bar is not None:
            bar.stage(f"{path.name}: {name}", total)

    say("loading", 4 * n_series)
    files = sorted(p for p in path.rglob("*") if p.is_file() and not p.name.startswith("."))
    if not files:
        raise VolumeError(f"{path}: no files")
    sv = load_series(files)
    whole = Loaded(sv.to_engine_input(), np.asarray(sv.positions, float), np.asarray(sv.normal, float), path.name)
    lo = central(whole, args.max_slices, args.crop)
    z, y, x = whole.vin.data.shape
    z0 = int(np.argmin(np.abs(whole.positions - lo.positions[0]).sum(axis=1)))
    y0 = 0 if args.crop <= 0 or args.crop >= y else (y - args.crop) // 2  # as node.bench.eval.central
    x0 = 0 if args.crop <= 0 or args.crop >= x else (x - args.crop) // 2
    if not np.array_equal(lo.vin.data, whole.vin.data[z0 : z0 + lo.vin.data.shape[0], y0 : y0 + lo.vin.data.shape[1],
                                                      x0 : x0 + lo.vin.data.shape[2]]):
        raise VolumeError(f"{path.name}: the crop's offset could not be found")
    lr, truth, factors = simulate(lo, "through", args.factor)
    f = factors.through_plane
    pixel = (float(lo.vin.spacing[1]), float(lo.vin.spacing[2]))
    g_truth = geometry_of(lo.positions[: truth.shape[0]], sv.row_cosine, sv.col_cosine, pixel, (y0, x0))
    g_lr = geometry_of(lo.positions[: truth.shape[0]], sv.row_cosine, sv.col_cosine, pixel, (y0, x0), every=f)
    options = EngineOptions(device=Device(args.device), finetune_steps=args.finetune_steps,
                            tta_passes=args.tta_passes)
    say(f"srnode {args.engine}")
    doc, outs, _sigma = evaluate(lr, truth, factors, options, args.engine, None, None,
                                 bar.engine if bar is not None and bar.bar is not None else None)
    t = time.perf_counter()
    from models.cubic import upsample

    upsample(lr.data, factors)
    cubic_s = time.perf_counter() - t
    say("ECLARE")
    cuda = args.device == "cuda"
    n_patches = args.n_patches or (ECLARE_DEFAULT_PATCHES if cuda else 4096)
    batch = args.batch_size or (128 if cuda else 32)
    peer = run_peer(command, lr, g_lr, g_truth, truth.shape, workdir / path.name, n_patches, batch,
                    0 if cuda else -1, args.timeout)
    say("scoring")
    mask = body_mask(truth, lr.modality)
    drange = data_range(truth)
    eclare = fidelity(peer.data, truth, mask, drange)
    scale, shift = peer.index_map
    ceiling = fidelity(regrid_ceiling(truth, scale, shift, peer.output_shape[2]), truth, mask, drange)
    methods = {"cubic": {**doc["cubic"], "seconds": round(cubic_s, 3)},
               "srnode": {**doc["engine"], "seconds": doc["seconds"], "engine": doc["engine_name"],
                          "fallback": doc["fallback"]},
               "eclare": {**eclare, "seconds": round(peer.seconds, 2)}}
    for m in methods.values():
        m["gain_db"] = round(m["psnr_db"] - doc["cubic"]["psnr_db"], 3)
    eclare_own = re.search(r"ECLARE elapsed time: ([0-9.]+)s", peer.log_tail)
    figures = {
        "series": path.name, "modality": lr.modality, "factor": f, "truth_shape": list(truth.shape),
        "input_shape": list(lr.data.shape), "crop": [int(z0), int(y0), int(x0)],
        "spacing_truth_mm": [round(float(s), 4) for s in (lo.vin.spacing[0], *pixel)],
        "input_slice_step_mm": round(float(lr.spacing[0]), 4),
        "input_slice_fwhm_mm": round(float(lr.slice_thickness), 4), "profile": lr.profile,
        "mask_fraction": round(float(mask.mean()), 4), "data_range": drange, "methods": methods,
        "srnode_options": {"engine": args.engine, "device": args.device, "finetune_steps": args.finetune_steps,
                           "tta_passes": args.tta_passes},
        "eclare": {"n_patches": n_patches, "batch_size": batch, "default_n_patches": ECLARE_DEFAULT_PATCHES,
                   "reduced_budget": n_patches < ECLARE_DEFAULT_PATCHES, "gpu": cuda,
                   "relative_slice_thickness": round(float(lr.slice_thickness / min(pixel)), 4),
                   "output_shape_xyz": list(peer.output_shape), "output_spacing_mm": list(peer.output_spacing),
                   "truth_slice_to_output_slice": [round(scale, 5), round(shift, 5)],
                   "own_elapsed_s": float(eclare_own.group(1)) if eclare_own else None,
                   "read_back": "cubic B-spline along the slice axis from ECLARE's grid onto the truth grid "
                                "(its affine); in-plane grid unchanged",
                   "resampling_ceiling_psnr_db": ceiling["psnr_db"],
                   # ECLARE clips to the input's range: an undertrained net leaves much of the body at its minimum
                   "body_at_input_minimum": round(float((peer.data[mask] <= float(lr.data.min()) + 1e-3).mean()),
                                                  4)},
    }
    images = {"truth": truth, "cubic": outs["cubic"], "srnode": outs["engine"], "ECLARE": peer.data}
    return figures, images


def write_png(path: Path, rows: list[tuple[dict[str, Any], dict[str, np.ndarray]]], title: str) -> None:
    """One row per series: bars (gain over cubic dB, HU-MAE, bias, seconds) per method, then the central coronal
    cut of truth / cubic / srnode / ECLARE (display window: the truth's 1-99 percentiles)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = [("gain_db", "PSNR gain over cubic (dB)"), ("hu_mae", "MAE (modality units)"),
               ("hu_bias", "bias"), ("seconds", "seconds")]
    methods = ["cubic", "srnode", "eclare"]
    colours = ["#999999", "#1f77b4", "#d62728"]
    fig, axes = plt.subplots(len(rows), 8, figsize=(26, 3.6 * len(rows)), squeeze=False)
    for r, (fig_doc, imgs) in enumerate(rows):
        for c, (key, label) in enumerate(metrics):
            ax = axes[r][c]
            vals = [float(fig_doc["methods"][m][key]) for m in methods]
            ax.bar(methods, vals, color=colours)
            for i, v in enumerate(vals):
                ax.text(i, v, f"{v:.3g}", ha="center", va="bottom", fontsize=8)
            ax.set_title(f"{fig_doc['series']}\n{label}" if c == 0 else label, fontsize=9)
        truth = imgs["truth"]
        lo, hi = np.percentile(truth[:, truth.shape[1] // 2, :], [1, 99])
        for c, name in enumerate(["truth", "cubic", "srnode", "ECLARE"]):
            ax = axes[r][4 + c]
            ax.imshow(imgs[name][:, imgs[name].shape[1] // 2, :], cmap="gray", vmin=lo, vmax=hi, aspect="auto")
            ax.set_title(name, fontsize=9)
            ax.axis("off")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def _write(out: Path, rows: list[tuple[dict[str, Any], dict[str, np.ndarray]]], args: argparse.Namespace,
           stamp: str) -> None:
    """The JSON (command, machine, budget note, figures per series) and the PNG beside it."""
    out.parent.mkdir(parents=True, exist_ok=True)
    budget = rows[0][0]["eclare"] if rows else {}
    doc = {
        "benchmark": "peers",
        "command": " ".join(["srnode", *sys.argv[1:]]) if sys.argv[0].endswith("cli.py") else
        "srnode bench peers " + " ".join(str(s) for s in args.series),
        "machine": {"node": platform.node(), "machine": platform.machine(), "python": platform.python_version(),
                    "cpu_count": os.cpu_count(), "device": args.device, "note": args.note},
        "utc": stamp,
        "peer": "ECLARE 1.0.1 (pip eclare==1.0.1, run-eclare, own venv .venv-eclare, torch 2.13.0)",
        "budget_note": ("" if not budget.get("reduced_budget") else
                        f"ECLARE ran with a reduced patch budget: {budget.get('n_patches')} patches of batch "
                        f"{budget.get('batch_size')} (its default: {ECLARE_DEFAULT_PATCHES} of 128 on a GPU); "
                        "network unchanged (WDSR, 16 blocks x 256 channels), slice profile given, no ESPRESO"),
        "inputs": "srnode eval's simulated thick input (node.bench.eval.simulate, models.degrade box profile)",
        "metrics": "models.evaluate: body mask of the truth, PSNR over the truth's 0.1-99.9 % range, SSIM, "
                   "MAE and bias in modality units; gain_db = PSNR - cubic's PSNR",
        "series": [r[0] for r in rows],
    }
    out.write_text(json.dumps(doc, indent=2, default=float) + "\n")
    write_png(out.with_suffix(".png"), rows, f"{doc['command']}  [{args.note or platform.node()}]")


def run(args: argparse.Namespace) -> int:
    """Run ``srnode bench peers``; returns the exit code. VolumeError for a series that cannot be loaded,
    EngineError when the peer is missing or fails."""
    from node.app.progress import bar_of
    from node.bench.results import RESULTS

    if args.factor < 2:
        raise VolumeError("--factor must be >= 2")
    command = _peer_command(args)
    bar = bar_of(args)
    own = args.workdir is None
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="srnode-bench-peers-"))
    rows: list[tuple[dict[str, Any], dict[str, np.ndarray]]] = []
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    out = args.out or RESULTS / f"peers-{stamp}.json"
    try:
        for k, path in enumerate(args.series):
            rows.append(compare(path, args, command, workdir, bar, len(args.series)))
            m = rows[-1][0]["methods"]
            print(f"{path.name} x{args.factor}: " + ", ".join(
                f"{n} {v['gain_db']:+.2f} dB MAE {v['hu_mae']:.2f} bias {v['hu_bias']:+.2f} {v['seconds']:.1f} s"
                for n, v in m.items()) + f" ({k + 1}/{len(args.series)})", flush=True)
            _write(out, rows, args, stamp)  # after each series: a long run stopped early keeps what it measured
    finally:
        if own:
            import shutil

            shutil.rmtree(workdir, ignore_errors=True)
    print(f"wrote {out} and {out.with_suffix('.png')}")
    return 0
