"""``srnode eval SERIES_DIR --axis through|in --factor F --json OUT.json``: an engine against cubic and linear.

Without ``--truth``: SERIES_DIR is the truth; the thick (or low-matrix) input is simulated from it with
``--profile`` (``ThickProfile``; default a trapezoid of FWHM f slices sampled every f slices; ``discrete`` is the
engine's own operator, which flatters it; f x f block means in-plane),
the WHOLE engine (self-training included) runs on the degraded input only, and the output is compared with the
truth. With ``--truth THIN_DIR``: SERIES_DIR is a real thick series and the output slices are compared with the
thin slices at matching patient positions (along the slice normal). ``--max-slices`` / ``--crop`` take a central
sub-volume. Writes OUT.json (engine/cubic/linear: psnr_db, ssim, hu_mae, hu_bias; uncertainty: spearman,
spearman_local_oracle, coverage_95, width_95 (mean 2 x 1.96 sigma), scale_to_95, per slice phase for
through-plane, ause_ratio; engine_seconds: the engine alone (also as ``seconds``, for older readers),
wall_seconds: the whole command but the picture) and a PNG panel beside it; prints a one-line summary.
SERIES_DIR may also be a ``.npz`` (data int16/float, spacing, thickness, modality, value_range, positions,
normal; optional row_cosine, col_cosine) for machines without the DICOM stack.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import time
from collections.abc import Callable
from dataclasses import replace
from enum import StrEnum
from pathlib import Path
from typing import Any

import numpy as np

from models.engine import Device, EngineOptions, Factors, Progress, VolumeInput, get_engine, upscale
from models.engine import EngineError as ModelsEngineError
from node.app.volume_file import Loaded, load_volume
from node.errors import EngineError, VolumeError

log = logging.getLogger(__name__)


def central(lo: Loaded, max_slices: int, crop: int) -> Loaded:
    """Central sub-volume: at most ``max_slices`` slices and a ``crop`` x ``crop`` in-plane window (0: all);
    the positions follow the slices (``positions[0]`` stays the first kept slice's IPP, not the crop's corner)."""
    z, y, x = lo.vin.data.shape
    z0, z1 = (0, z) if max_slices <= 0 or max_slices >= z else ((z - max_slices) // 2, (z - max_slices) // 2 + max_slices)
    y0 = 0 if crop <= 0 or crop >= y else (y - crop) // 2
    x0 = 0 if crop <= 0 or crop >= x else (x - crop) // 2
    y1, x1 = (y if crop <= 0 else min(y, y0 + crop)), (x if crop <= 0 else min(x, x0 + crop))
    data = np.ascontiguousarray(lo.vin.data[z0:z1, y0:y1, x0:x1])
    return replace(lo, vin=replace(lo.vin, data=data), positions=lo.positions[z0:z1])


def linear_upsample(data: np.ndarray, factors: Factors) -> np.ndarray:
    """Linear interpolation with the engine geometry contract (node-aligned z, area-aligned in-plane).

    ``data`` (Z, Y, X) → float32 of ``models.engine.output_shape``: ((Z - 1) f + 1, g Y, g X).
    """
    out = np.asarray(data, dtype=np.float64)
    f, g = factors.through_plane, factors.in_plane
    if f > 1:
        pos = np.arange((out.shape[0] - 1) * f + 1) / f
        i0 = np.minimum(np.floor(pos).astype(int), out.shape[0] - 2)
        w = (pos - i0)[:, None, None]
        out = out[i0] * (1 - w) + out[i0 + 1] * w
    for axis in (1, 2) if g > 1 else ():
        n = out.shape[axis]
        pos = np.clip((np.arange(n * g) + 0.5) / g - 0.5, 0, n - 1)
        i0 = np.minimum(np.floor(pos).astype(int), n - 2)
        w = pos - i0
        a, b = np.take(out, i0, axis=axis), np.take(out, i0 + 1, axis=axis)
        shape = [1, 1, 1]
        shape[axis] = -1
        out = a * (1 - w.reshape(shape)) + b * w.reshape(shape)
    return out.astype(np.float32)


class ThickProfile(StrEnum):
    """How ``srnode eval`` makes a thick slice from the thin truth slices (through-plane, without ``--truth``).

    ``discrete``: the engine's own operator (``models.degrade.degrade_through_plane``: the box of FWHM f slices
    integrated over the thin slices' bins, e.g. (1/4, 1/2, 1/4) at x2): the engine's data consistency then holds
    the truth exactly, an inverse crime that flatters it (docs/engines.md, "Thick-slice operators").
    ``box-fine`` / ``gaussian`` / ``trapezoid``: a continuous profile of FWHM f x thickness (trapezoid: linear
    ramps of half the FWHM) integrated over the thin slices' cubic B-spline interpolant at 1/``FINE`` slice steps.
    ``decimate``: every f-th thin slice as it is (no blur; the input then declares the thin slices' thickness).
    The engine is always told a box of the declared thickness, as a DICOM header would tell it.
    """

    DISCRETE = "discrete"
    BOX_FINE = "box-fine"
    GAUSSIAN = "gaussian"
    TRAPEZOID = "trapezoid"
    DECIMATE = "decimate"


FINE = 8  # sub-samples per thin slice step for the continuous profiles
# the default of `srnode eval` / `srnode bench peers`: of these operators at the declared FWHM, the trapezoid came
# closest to the real Philips 5 mm slices made from its real 1 mm slices (PSNR 35.7 dB against discrete 30.8,
# bench/results/ops17-realfit-ph5_ph1_c192-20261203.json); "discrete" flatters the engine (docs/engines.md)
DEFAULT_PROFILE = ThickProfile.TRAPEZOID


def continuous_weights(kind: ThickProfile, fwhm_px: float, fine: int = FINE) -> tuple[np.ndarray, np.ndarray]:
    """(offsets in thin-slice steps, weights summing to 1) of a continuous profile of FWHM ``fwhm_px`` thin steps,
    sampled every 1 / ``fine`` step (midpoint rule over the profile's support)."""
    if kind == ThickProfile.GAUSSIAN:
        sd = fwhm_px / (2.0 * math.sqrt(2.0 * math.log(2.0)))
        half = 3.5 * sd
    elif kind == ThickProfile.TRAPEZOID:
        half = 0.75 * fwhm_px  # plateau |t| < FWHM/4, zero beyond 3 FWHM/4: half height at FWHM/2
    else:
        half = 0.5 * fwhm_px
    n = max(1, int(math.ceil(half * fine)))
    t = (np.arange(-n, n) + 0.5) / fine  # midpoints of 2n sub-bins covering [-half, half] (or a little more)
    if kind == ThickProfile.GAUSSIAN:
        w = np.exp(-0.5 * (t / sd) ** 2)
    elif kind == ThickProfile.TRAPEZOID:
        w = np.clip((0.75 * fwhm_px - np.abs(t)) / (0.5 * fwhm_px), 0.0, 1.0)
    else:
        w = (np.abs(t) <= half).astype(np.float64)
    return t, w / w.sum()


def thick_from_thin(vol: np.ndarray, f: int, fwhm_px: float, kind: ThickProfile) -> np.ndarray:
    """Thick slices at thin slices 0, f, 2f, ... of ``vol`` (Z, Y, X) made with the ``kind`` operator of FWHM
    ``fwhm_px`` thin steps: ((Z - 1) // f + 1, Y, X) float32 (see ``ThickProfile``; mirror ends)."""
    from models.cubic import bspline_prefilter, mirror_index
    from models.degrade import degrade_through_plane

    if kind == ThickProfile.DISCRETE:
        return degrade_through_plane(vol, f, fwhm_px, axis=0)
    centres = np.arange(0, vol.shape[0], f)
    if kind == ThickProfile.DECIMATE:
        return np.ascontiguousarray(vol[centres], dtype=np.float32)
    coef = bspline_prefilter(np.asarray(vol, dtype=np.float64), 0)
    n = vol.shape[0]
    offsets, weights = continuous_weights(kind, fwhm_px)
    out = np.zeros((centres.size, *vol.shape[1:]), dtype=np.float64)
    for off, w in zip(offsets, weights, strict=True):
        pos = centres + off
        base = np.floor(pos).astype(np.int64)
        for m in (-1, 0, 1, 2):
            d = np.abs(pos - (base + m))
            b = np.where(d < 1, 2 / 3 - d**2 + d**3 / 2, np.where(d < 2, (2 - d) ** 3 / 6, 0.0))
            out += (w * b)[:, None, None] * coef[mirror_index(base + m, n)]
    return out.astype(np.float32)


def simulate(truth: Loaded, axis: str, f: int,
             profile: ThickProfile = DEFAULT_PROFILE) -> tuple[VolumeInput, np.ndarray, Factors]:
    """(degraded input, truth cropped to the output grid, factors) for a run without --truth.

    ``axis`` "through": thick slices of FWHM f x max(thickness, dz) every f slices made with ``profile``
    (``ThickProfile``; the input declares that FWHM and a box, or the thin thickness for ``decimate``); "in":
    f x f block means (``models.degrade``). VolumeError when fewer than 3 thick slices would remain.
    """
    from models.degrade import degrade_in_plane, degrade_through_plane

    v = truth.vin
    dz, dy, dx = v.spacing
    if axis == "through":
        n_lr = (v.data.shape[0] - 1) // f + 1
        if n_lr < 3:
            raise VolumeError(f"{truth.name}: {v.data.shape[0]} slices are too few for a x{f} through-plane test")
        t = v.data[: (n_lr - 1) * f + 1]
        thick_px = f * max(v.slice_thickness, dz) / dz if v.slice_thickness > 0 else float(f)
        if profile == ThickProfile.DISCRETE:  # the series' own declared profile shape (box unless told)
            lr = degrade_through_plane(t, f, thick_px, axis=0, profile=v.profile)
        else:
            lr = thick_from_thin(t, f, thick_px, profile)
        declared = v.slice_thickness if profile == ThickProfile.DECIMATE and v.slice_thickness > 0 else thick_px * dz
        vin = replace(v, data=lr, spacing=(dz * f, dy, dx), slice_thickness=declared,
                      profile=v.profile if profile == ThickProfile.DISCRETE else "box")
        log.info("simulated %s: %s FWHM %.3g mm every %.3g mm (declared %.3g mm), %d -> %d slices", truth.name,
                 profile.value, thick_px * dz, dz * f, declared, t.shape[0], lr.shape[0])
        return vin, t, Factors(f, 1)
    h, w = (v.data.shape[1] // f) * f, (v.data.shape[2] // f) * f
    t = v.data[:, :h, :w]
    vin = replace(v, data=degrade_in_plane(t, f), spacing=(dz, dy * f, dx * f))
    log.info("simulated %s: %dx%d block means, %dx%d -> %dx%d", truth.name, f, f, h, w, h // f, w // f)
    return vin, t, Factors(1, f)


def match_truth(thick: Loaded, thin: Loaded, f: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices (into the x f output, into the thin series) of slices at the same position along the normal
    (within a quarter of the finer step). VolumeError when the matrices differ or under 3 slices match."""
    if thick.vin.data.shape[1:] != thin.vin.data.shape[1:]:
        raise VolumeError(f"{thick.name} and {thin.name}: in-plane matrices differ {thick.vin.data.shape[1:]} vs "
                          f"{thin.vin.data.shape[1:]}")
    n = thick.normal / np.linalg.norm(thick.normal)
    step = thick.vin.spacing[0] / f
    out_pos = float(thick.positions[0] @ n) + step * np.arange((thick.vin.data.shape[0] - 1) * f + 1)
    thin_pos = thin.positions @ n
    j = np.abs(out_pos[:, None] - thin_pos[None, :]).argmin(axis=1)
    ok = np.abs(out_pos - thin_pos[j]) < 0.25 * min(step, thin.vin.spacing[0])
    if ok.sum() < 3:
        raise VolumeError(f"{thick.name} x{f}: fewer than 3 output slices match {thin.name} positions")
    return np.nonzero(ok)[0], j[ok]


def shown_plane(axis: str, directions: np.ndarray | None) -> tuple[str, str, str]:
    """(plane, down, right) of the picture's cut: the anatomical plane nearest to it ("axial", "coronal",
    "sagittal"; "oblique, nearest axial" when its normal is over ~26 degrees off every patient axis) and the
    orientation letters of the image's downward and rightward directions ("" without ``directions``).

    The cut holds array axes (0, 2) for ``axis`` "through" (the slice axis down, columns right) and (1, 2) for
    "in" (rows down, columns right); ``directions`` (3, 3): row ``a`` the patient direction (LPS) of increasing
    index along array axis ``a`` (the slice normal, IOP[3:6], IOP[0:3]). Without it the plane is named as for an
    axial acquisition, with "(orientation unknown)"."""
    from node.app.preview_planes import PLANE_OF_AXIS, orientation_letters

    perp, down = (1, 0) if axis == "through" else (0, 1)
    if directions is None:
        return ("coronal (orientation unknown)" if axis == "through" else "axial (orientation unknown)"), "", ""
    d = np.asarray(directions, dtype=np.float64)
    d = d / np.maximum(np.linalg.norm(d, axis=1, keepdims=True), 1e-12)
    n = np.abs(d[perp])
    plane = PLANE_OF_AXIS[int(n.argmax())]
    if float(n.max()) < 0.9:
        plane = f"oblique, nearest {plane}"
    return plane, orientation_letters(d[down]), orientation_letters(d[2])


def panel(path: Path, truth: np.ndarray, outs: dict[str, np.ndarray], sigma: np.ndarray, axis: str,
          spacing: tuple[float, float, float], doc: dict[str, Any], directions: np.ndarray | None = None) -> str:
    """PNG of five labelled panels of one size on the central cut of the compared grid holding the slice axis
    (``axis`` "through") or the acquired plane ("in"): truth | cubic | engine, on the truth's 1st..99th percentile;
    |engine - truth| and 1.96 sigma (the 95 % half-width) on one colour scale, 0 to the error's 99.5th percentile,
    with a colour bar in modality units. ``spacing`` (dz, dy, dx) mm of ``truth``: pixels are shown square in
    millimetres, with a millimetre scale bar; ``directions`` (``shown_plane``) names the plane from the patient
    axes and puts orientation letters on the first panel's edges. ``doc`` gives each title its figures
    (body-masked PSNR, coverage). matplotlib's object API on the Agg canvas (no display). Returns the title.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from node.app.preview_planes import orientation_letters

    def cut(a: np.ndarray) -> np.ndarray:
        return a[:, a.shape[1] // 2, :] if axis == "through" else a[a.shape[0] // 2]

    dz, dy, dx = spacing
    dv = dz if axis == "through" else dy  # mm down the image (columns: dx)
    lo, hi = np.percentile(cut(truth), [1, 99])
    err = np.abs(cut(outs["engine"]) - cut(truth))
    emax = max(float(np.percentile(err, 99.5)), 1e-6)
    eng, cub = doc.get("engine", {}), doc.get("cubic", {})
    unc = doc.get("uncertainty", {}) or {}
    name = doc.get("engine_name", "engine") + (f" (fallback: {doc['fallback']})" if doc.get("fallback") else "")
    plane, down, right = shown_plane(axis, directions)

    def db(d: dict[str, Any]) -> str:
        return f"{d['psnr_db']:.2f} dB" if "psnr_db" in d else ""

    tiles = [(cut(truth), "truth", "grey"), (cut(outs["cubic"]), f"cubic  {db(cub)}", "grey"),
             (cut(outs["engine"]), f"{name}  {db(eng)}", "grey"), (err, "|engine \u2212 truth|", "err"),
             (cut(sigma) * 1.96, "1.96 \u03c3" + (f"  (coverage {unc['coverage_95']:.3f})"
                                                 if "coverage_95" in unc else ""), "err")]
    fig = Figure(figsize=(3.2 * len(tiles) + 0.9, 3.9), dpi=100)
    FigureCanvasAgg(fig)
    grid = fig.add_gridspec(1, len(tiles) + 1, width_ratios=[1.0] * len(tiles) + [0.06], wspace=0.08)
    axes = [fig.add_subplot(grid[0, k]) for k in range(len(tiles))]  # one size each: the colour bar has its own
    shown = None
    h, w = tiles[0][0].shape
    extent = (0.0, w * dx, h * dv, 0.0)  # millimetres: square pixels, and the scale bar in mm
    for ax, (img, title, kind) in zip(axes, tiles, strict=True):
        if kind == "grey":
            ax.imshow(img, cmap="gray", vmin=lo, vmax=hi, extent=extent, interpolation="nearest")
        else:
            shown = ax.imshow(img, cmap="magma", vmin=0.0, vmax=emax, extent=extent, interpolation="nearest")
        ax.set_title(title, fontsize=9)
        ax.set_xticks([])
        ax.set_yticks([])
    width_mm = w * dx
    bar = max([n for n in (5, 10, 20, 25, 50, 100, 200) if n <= width_mm / 4] or [width_mm / 4])
    ax0 = axes[0]
    y = h * dv * 0.94
    ax0.plot([width_mm * 0.96 - bar, width_mm * 0.96], [y, y], color="yellow", lw=2.5, solid_capstyle="butt")
    ax0.text(width_mm * 0.96 - bar / 2, y - 0.02 * h * dv, f"{bar:g} mm", color="yellow", fontsize=8,
             ha="center", va="bottom")
    if right and directions is not None:  # letters of the edges: up / down, left / right
        d = np.asarray(directions, dtype=np.float64)
        up, left = orientation_letters(-d[0 if axis == "through" else 1]), orientation_letters(-d[2])
        for text, xy, ha, va in ((up, (0.5, 0.98), "center", "top"), (down, (0.5, 0.02), "center", "bottom"),
                                 (left, (0.02, 0.5), "left", "center"), (right, (0.98, 0.5), "right", "center")):
            ax0.text(*xy, text, transform=ax0.transAxes, color="yellow", fontsize=9, ha=ha, va=va)
    if shown is not None:
        fig.colorbar(shown, cax=fig.add_subplot(grid[0, len(tiles)]), label="modality units (HU for CT)")
    title = (f"srnode eval: {doc.get('series', '')} {axis}-plane x{doc.get('factor', '')}, central {plane} "
             f"slice; grey {lo:.4g} to {hi:.4g} (truth's 1st-99th percentile)")
    fig.suptitle(title, fontsize=10)
    fig.savefig(path)
    return title


def evaluate(lr_in: VolumeInput, truth: np.ndarray, factors: Factors, options: EngineOptions, engine: str,
             out_idx: np.ndarray | None = None, stage: Callable[[str], None] | None = None,
             engine_progress: Progress | None = None) -> tuple[dict[str, Any], dict[str, np.ndarray], np.ndarray]:
    """Run engine, cubic and linear on ``lr_in``; compare with ``truth`` (rows ``out_idx`` of the output).
    ``stage`` gets the name of each of the four stages (engine, baselines, metrics, uncertainty) as it starts,
    ``engine_progress`` the engine's own and the metrics' SSIM slices.

    Returns (figures, outputs by method, sigma); the outputs and sigma have ``truth``'s shape. EngineError
    when the engine refuses the input.
    """
    from models.evaluate import body_mask, data_range, fidelity, uncertainty

    say = stage or (lambda _name: None)
    log.info("[1/4] engine %s on %s input (factors %s)", engine, lr_in.data.shape, factors)
    say(f"engine {engine}")
    t0 = time.perf_counter()
    try:
        res = upscale(get_engine(engine, options), lr_in, factors, engine_progress)
    except (ValueError, ModelsEngineError) as exc:
        raise EngineError(str(exc)) from exc
    seconds = time.perf_counter() - t0
    log.info("[2/4] baselines (cubic, linear)")
    say("baselines")
    outs = {"engine": res.data, "cubic": get_engine("cubic").upscale(lr_in, factors).data,
            "linear": linear_upsample(lr_in.data, factors)}
    sigma = res.sigma
    if out_idx is not None:
        outs = {k: v[out_idx] for k, v in outs.items()}
        sigma = sigma[out_idx]
    log.info("[3/4] metrics on %s voxels", truth.shape)
    say("metrics")
    mask = body_mask(truth, lr_in.modality)
    drange = data_range(truth)
    doc: dict[str, Any] = {}
    for k, v in outs.items():  # SSIM's slices shown under the stage bar (the longest part of the metrics)
        tick = (lambda done, total, k=k: engine_progress(f"SSIM {k}", done, total)) if engine_progress else None
        doc[k] = fidelity(v, truth, mask, drange, tick)
    log.info("[4/4] uncertainty")
    say("uncertainty")
    f = factors.through_plane
    rows = out_idx if out_idx is not None else np.arange(truth.shape[0])
    phase = rows % f if f > 1 and factors.in_plane == 1 else None  # 0: the acquired slice positions
    doc["uncertainty"] = uncertainty(sigma, outs["engine"], truth, mask, phase=phase)
    # "seconds" (kept for older readers) is the engine's alone, as "engine_seconds"; "wall_seconds" (set by
    # ``run``) is the whole command: reading, simulating, engine, baselines, metrics (not the picture)
    doc.update({"seconds": round(seconds, 2), "engine_seconds": round(seconds, 2), "engine_name": res.engine,
                "fallback": res.fallback,
                "report": res.report, "data_range": drange, "mask_fraction": round(float(mask.mean()), 4)})
    return doc, outs, sigma


PROFILE_HELP = {
    ThickProfile.TRAPEZOID: "a trapezoid slice profile of FWHM f x the thickness (ramps of half the FWHM): the "
                            "closest to real 5 mm CT slices made from 1 mm ones; the default",
    ThickProfile.DISCRETE: "the engine's own operator (a box over the thin slices' bins): an inverse crime that "
                           "flatters the engine; the older figures in docs/benchmarks.md",
    ThickProfile.BOX_FINE: "a box of FWHM f x the thickness over the thin slices' spline",
    ThickProfile.GAUSSIAN: "a Gaussian of that FWHM",
    ThickProfile.DECIMATE: "every f-th thin slice as it is (a gap acquisition: no blur)",
}


class _ShowDefaults(argparse.HelpFormatter):
    """Help lines end with "(default: X)" where there is a default to show (not None, False or "")."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        d = action.default
        if "default" in text or d is None or d is False or d == "" or d == argparse.SUPPRESS:
            return text
        return text + " (default: %(default)s)"


def configure(parser: argparse.ArgumentParser) -> None:
    """Add ``srnode eval`` options to ``parser`` (its help shows every default)."""
    parser.formatter_class = _ShowDefaults
    parser.add_argument("series", type=Path, help="series folder (the truth, or the thick series with --truth)")
    parser.add_argument("--axis", choices=["through", "in"], default="through",
                        help="through: thicker slices (fewer along the slice normal); in: a coarser in-plane matrix "
                             "(f x f block means)")
    parser.add_argument("--factor", type=int, default=2,
                        help="the factor f: simulated input f times coarser along --axis, the engine upscales x f "
                             "(with --truth: the thick series' step over the thin one's)")
    parser.add_argument("--engine", default="selfsup", help="the engine to test (selfsup, diffusion, cubic)")
    parser.add_argument("--device", choices=[d.value for d in Device], default="auto",
                        help="auto: CUDA when there is one, else the CPU")
    parser.add_argument("--max-slices", type=int, default=0, help="central slices only (0: all)")
    parser.add_argument("--crop", type=int, default=0, help="central N x N in-plane window (0: whole matrix)")
    parser.add_argument("--truth", type=Path, default=None, help="thin series: compare a real thick SERIES to it")
    parser.add_argument("--json", type=Path, required=True,
                        help="where to write the figures (the PNG goes beside it, same name)")
    parser.add_argument("--fast", action="store_true", help="engine fast mode (no per-series fine-tuning)")
    parser.add_argument("--finetune-steps", type=int, default=EngineOptions.finetune_steps,
                        help="through-plane fine-tuning steps on the series' own pairs")
    parser.add_argument("--in-plane-finetune-steps", type=int, default=EngineOptions.in_plane_finetune_steps,
                        help="in-plane fine-tuning steps")
    parser.add_argument("--tta-passes", type=int, default=EngineOptions.tta_passes,
                        help="network passes over flipped / transposed copies, averaged (their spread feeds sigma)")
    parser.add_argument("--weights", default="", help="prior weights (default: models/weights/prior.pt)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (pairs, fine-tuning)")
    parser.add_argument("--profile", choices=[p.value for p in ThickProfile], default=DEFAULT_PROFILE.value,
                        help="how the simulated thick slices are made from the thin ones (--axis through without "
                             "--truth): " + "; ".join(f"{k.value}: {v}" for k, v in PROFILE_HELP.items()))
    parser.add_argument("--quiet", action="store_true",
                        help="no progress bar (there is none either when stderr is not a terminal)")


def run(args: argparse.Namespace) -> int:
    """Run ``srnode eval``; returns the exit code. Raises VolumeError or EngineError (see above)."""
    t_start = time.perf_counter()
    options = EngineOptions(device=Device(args.device), fast=args.fast, finetune_steps=args.finetune_steps,
                            in_plane_finetune_steps=args.in_plane_finetune_steps,
                            tta_passes=args.tta_passes, weights=args.weights, seed=args.seed)
    series = central(load_volume(args.series), args.max_slices, args.crop)
    out_idx = None
    if args.truth is not None:
        if args.axis != "through":
            raise VolumeError("--truth is supported for --axis through only")
        thin = central(load_volume(args.truth), 0, args.crop)
        factors = Factors(args.factor, 1)
        out_idx, thin_idx = match_truth(series, thin, args.factor)
        lr_in, truth = series.vin, thin.vin.data[thin_idx]
    else:
        lr_in, truth, factors = simulate(series, args.axis, args.factor, ThickProfile(args.profile))
    from node.app.progress import StageBar, logs_through_bars, wanted

    bars = wanted(getattr(args, "quiet", False))
    with logs_through_bars(bars), StageBar(f"eval {series.name} {args.axis} x{args.factor}", 4, bars) as bar:
        doc, outs, sigma = evaluate(lr_in, truth, factors, options, args.engine, out_idx, bar.stage,
                                    bar.engine if bars else None)
    doc.update({"series": series.name, "truth": args.truth.name if args.truth else "simulated", "axis": args.axis,
                "factor": args.factor, "input_shape": list(lr_in.data.shape), "compared_shape": list(truth.shape),
                "device": args.device, "fast": args.fast,
                "thick_profile": "real" if args.truth is not None else
                (args.profile if args.axis == "through" else "block-mean")})
    doc["wall_seconds"] = round(time.perf_counter() - t_start, 2)  # all but the picture, drawn after the JSON
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(doc, indent=2, default=float) + "\n")
    truth_spacing = thin.vin.spacing if args.truth is not None else series.vin.spacing
    geo = thin if args.truth is not None else series  # the compared grid: the truth's slices and cosines
    directions = np.stack([geo.normal, geo.col_cosine, geo.row_cosine])
    panel(args.json.with_suffix(".png"), truth, outs, sigma, args.axis, truth_spacing, doc, directions)
    from models.evaluate import summary

    print(f"{series.name} {args.axis} x{args.factor}: " + summary(doc) + (f" [fallback: {doc['fallback']}]"
                                                                          if doc["fallback"] else ""))
    return 0
