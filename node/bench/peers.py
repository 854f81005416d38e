"""``srnode bench peers SERIES_DIR...``: a peer method side by side with srnode and cubic (issue #13).

The peer is ECLARE (Remedios et al., self-supervised through-plane SR; ``eclare==1.0.1`` on PyPI, console script
``run-eclare``), run as a subprocess by ``node.bench.eclare``: by default in its own venv (``make peers-venv`` -> ``.venv-eclare/``: it pins
scipy); ``--peer-python PY`` (or ``$SRNODE_ECLARE_CMD``, a command line) runs it with another interpreter instead, e.g.
the GPU machine's own torch/scipy with eclare installed ``--no-deps`` beside it (``bench/gpu_peers.sh``). Each series
is a folder of DICOM files or a ``.npz`` export (``node.app.volume_file.load_volume``; ``row_cosine`` / ``col_cosine``,
IOP's two halves, give its in-plane orientation, else one is made up perpendicular to ``normal``: ECLARE reads only
voxel sizes, and the read-back uses the same affine, so the figures do not depend on it). For each series:

1. the truth is the series (``--max-slices`` / ``--crop``: a central sub-volume, ``node.bench.eval.central``) and
   the thick input is made exactly as ``srnode eval`` makes it (``node.bench.eval.simulate``: ``models.degrade``'s
   box profile of FWHM f slices, sampled every f slices);
2. srnode's engine, cubic and linear run on that input through ``node.bench.eval.evaluate`` (body mask, PSNR,
   SSIM, HU-MAE, bias of ``models.evaluate``);
3. the same input is written as NIfTI (nibabel), its affine from the DICOM geometry (``node.bench.nifti``'s
   ``nifti_affine``: IPP of the first kept slice, IOP, pixel spacing, slice step; LPS -> RAS), and ECLARE runs on it with the slice profile
   given (``--relative-slice-thickness`` = FWHM / in-plane pixel, boxcar or gaussian: no ESPRESO estimate);
4. ECLARE's output (isotropic at the in-plane pixel size, its own affine) is read back onto the truth grid by
   its affine (``read_onto``: cubic B-spline along the slice axis, ``models.cubic.resample_axis``; the in-plane
   grid must be the input's) and scored with the same mask and metrics. ``resampling_ceiling_psnr_db`` says what
   that regridding alone costs: the truth taken to ECLARE's grid and back.

Writes one ``bench/results/peers-<UTC>.json`` (command, machine, budget note, figures per series and method:
psnr_db, ssim, hu_mae, hu_bias, gain_db over cubic, seconds) and a PNG beside it (bars per method; central
coronal cut of truth / cubic / srnode / ECLARE). On the CPU ECLARE's patch budget is reduced (``--n-patches``;
its default is 1,000,000 patches of batch 128 on a GPU) and the JSON says so; its network is unchanged. Each ECLARE
run is capped (``--peer-timeout`` seconds) and its whole process group killed when it ends, however it ends; a run that fails, times out, or (with
``--device cuda``) finds no GPU is recorded in the JSON (``eclare.error``) and the other series still run. ECLARE's
own training rate (patches/s, from its progress bar) is recorded, with what its full budget would take at that rate.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import re
import shlex
import signal
import sys
import tempfile
import textwrap
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from models.engine import Device, EngineOptions
from node.bench.eclare import (
    ECLARE_DEFAULT_PATCHES,
    PEER_CMD_ENV,
    PeerTimeout,
    fit_budget,
    peer_command,
    peer_versions,
    run_peer,
    training_progress,
)
from node.bench.eval import DEFAULT_PROFILE, ThickProfile
from node.bench.nifti import geometry_of, regrid_ceiling
from node.errors import EngineError, VolumeError

if TYPE_CHECKING:
    from node.app.progress import StageBar

log = logging.getLogger(__name__)

def configure(parser: argparse.ArgumentParser) -> None:
    """Add ``srnode bench peers`` options to ``parser``."""
    parser.add_argument("series", nargs="+", type=Path,
                        help="series folders or .npz exports (srnode eval's; each is a truth)")
    parser.add_argument("--factor", type=int, default=2, help="through-plane factor (default 2)")
    parser.add_argument("--max-slices", type=int, default=0, help="central slices only (0: all)")
    parser.add_argument("--crop", type=int, default=0, help="central N x N in-plane window (0: whole matrix)")
    parser.add_argument("--profile", choices=[p.value for p in ThickProfile], default=DEFAULT_PROFILE.value,
                        help="how the thick input is simulated (srnode eval --profile)")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu",
                        help="srnode's engine and ECLARE on this device (cuda: ECLARE's --gpu-id, stopped if its "
                             "torch finds no GPU)")
    parser.add_argument("--gpu-id", type=int, default=0, help="ECLARE's --gpu-id with --device cuda (default 0)")
    parser.add_argument("--engine", default="selfsup")
    parser.add_argument("--finetune-steps", type=int, default=EngineOptions.finetune_steps)
    parser.add_argument("--tta-passes", type=int, default=EngineOptions.tta_passes)
    parser.add_argument("--weights", default="", help="srnode's prior weights (default: models/weights/prior.pt)")
    parser.add_argument("--n-patches", type=int, default=0,
                        help=f"ECLARE's training patches (default: {ECLARE_DEFAULT_PATCHES} on cuda, 4096 on cpu)")
    parser.add_argument("--batch-size", type=int, default=0, help="ECLARE's batch (default: 128 cuda, 32 cpu)")
    parser.add_argument("--peer", default="",
                        help=f"peer command line (default: ${PEER_CMD_ENV}, else .venv-eclare/bin/run-eclare)")
    parser.add_argument("--peer-python", default="",
                        help="run ECLARE with this Python (eclare importable there, e.g. installed --no-deps on "
                             "PYTHONPATH) instead of the peer venv")
    parser.add_argument("--out", type=Path, default=None,
                        help="JSON path (default: bench/results/peers-<UTC>.json); the PNG goes beside it")
    parser.add_argument("--workdir", type=Path, default=None, help="keep the NIfTI files here")
    parser.add_argument("--peer-timeout", "--timeout", dest="timeout", type=float, default=7200.0,
                        help="seconds ECLARE may run per series (then killed, recorded in the JSON; default 7200)")
    parser.add_argument("--deadline-s", type=float, default=0.0,
                        help="the whole run must end within this many seconds (0: no deadline): each ECLARE run "
                             "is capped to fit, a later series' patch budget cut to fit at the previous one's rate "
                             "(both recorded)")
    parser.add_argument("--budget-reason", default="",
                        help="why ECLARE's patch budget is what it is (into the JSON's budget_note)")
    parser.add_argument("--note", default="", help="a note for the JSON (the machine: shared, loaded...)")


SCORING_RESERVE_S = 15.0  # kept back from a deadline for scoring, regridding and the PNG of full volumes


def compare(path: Path, args: argparse.Namespace, command: list[str], workdir: Path,
            bar: StageBar | None = None, n_series: int = 1, deadline: float | None = None,
            prev: dict[str, Any] | None = None) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """One series side by side: (figures, images on the truth grid: truth, cubic, srnode, ECLARE). ``bar``
    gets four stages per series (of ``n_series``). ``deadline`` (``time.monotonic()``, or None): ECLARE's cap is
    cut to end ``SCORING_RESERVE_S`` before it, and its budget to fit (``fit_budget``, from ``prev``: the previous
    series' ``eclare`` figures)."""
    from models.evaluate import body_mask, data_range, fidelity
    from node.app.volume_file import load_volume
    from node.bench.eval import central, evaluate, simulate

    def say(name: str, total: int | None = None) -> None:
        if bar is not None:
            bar.stage(f"{path.name}: {name}", total)

    say("loading", 4 * n_series)
    whole = load_volume(path)
    lo = central(whole, args.max_slices, args.crop)
    z, y, x = whole.vin.data.shape
    z0 = int(np.argmin(np.abs(whole.positions - lo.positions[0]).sum(axis=1)))
    y0 = 0 if args.crop <= 0 or args.crop >= y else (y - args.crop) // 2  # as node.bench.eval.central
    x0 = 0 if args.crop <= 0 or args.crop >= x else (x - args.crop) // 2
    if not np.array_equal(lo.vin.data, whole.vin.data[z0 : z0 + lo.vin.data.shape[0], y0 : y0 + lo.vin.data.shape[1],
                                                      x0 : x0 + lo.vin.data.shape[2]]):
        raise VolumeError(f"{path.name}: the crop's offset could not be found")
    lr, truth, factors = simulate(lo, "through", args.factor, ThickProfile(args.profile))
    f = factors.through_plane
    pixel = (float(lo.vin.spacing[1]), float(lo.vin.spacing[2]))
    g_truth = geometry_of(lo.positions[: truth.shape[0]], whole.row_cosine, whole.col_cosine, pixel, (y0, x0))
    g_lr = geometry_of(lo.positions[: truth.shape[0]], whole.row_cosine, whole.col_cosine, pixel, (y0, x0), every=f)
    options = EngineOptions(device=Device(args.device), finetune_steps=args.finetune_steps,
                            tta_passes=args.tta_passes, weights=args.weights)
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
    budget = {"n_patches": n_patches, "batch_size": batch, "default_n_patches": ECLARE_DEFAULT_PATCHES,
              "reduced_budget": n_patches < ECLARE_DEFAULT_PATCHES, "gpu": cuda,
              "gpu_id": args.gpu_id if cuda else -1, "timeout_s": args.timeout,
              "relative_slice_thickness": round(float(lr.slice_thickness / min(pixel)), 4)}
    mask = body_mask(truth, lr.modality)
    drange = data_range(truth)
    methods: dict[str, dict[str, Any]] = {
        "cubic": {**doc["cubic"], "seconds": round(cubic_s, 3)},
        "srnode": {**doc["engine"], "seconds": doc["seconds"], "engine": doc["engine_name"],
                   "fallback": doc["fallback"]}}
    figures = {
        "series": path.name, "modality": lr.modality, "factor": f, "thick_profile": args.profile,
        "truth_shape": list(truth.shape),
        "input_shape": list(lr.data.shape), "crop": [int(z0), int(y0), int(x0)],
        "spacing_truth_mm": [round(float(s), 4) for s in (lo.vin.spacing[0], *pixel)],
        "input_slice_step_mm": round(float(lr.spacing[0]), 4),
        "input_slice_fwhm_mm": round(float(lr.slice_thickness), 4), "profile": lr.profile,
        "orientation": whole.orientation,
        "mask_fraction": round(float(mask.mean()), 4), "data_range": drange, "methods": methods,
        "srnode_options": {"engine": args.engine, "device": args.device, "finetune_steps": args.finetune_steps,
                           "tta_passes": args.tta_passes, "weights": args.weights or "models/weights/prior.pt"},
        "eclare": budget,
    }
    images = {"truth": truth, "cubic": outs["cubic"], "srnode": outs["engine"]}
    t_peer = time.perf_counter()
    cap = args.timeout
    try:
        if deadline is not None:
            left = deadline - time.monotonic() - SCORING_RESERVE_S
            cap = min(cap, left)
            fitted, why = fit_budget(n_patches, batch, left, prev)
            if why:
                budget.update({"n_patches": fitted, "reduced_budget": True, "budget_cut": why})
                n_patches = fitted
            budget["timeout_s"] = round(max(cap, 0.0), 1)
            if cap < 5.0 or n_patches < batch:
                raise PeerTimeout(f"not run: {max(left, 0.0):.0f} s left before the deadline")
        budget["timeout_s"] = round(cap, 1)
        peer = run_peer(command, lr, g_lr, g_truth, truth.shape, workdir / path.name, n_patches, batch,
                        args.gpu_id if cuda else -1, cap)
    except (EngineError, VolumeError) as exc:  # recorded; the other methods and series still count
        log.error("%s: ECLARE: %s", path.name, exc)
        budget.update({"error": str(exc), "timed_out": isinstance(exc, PeerTimeout),
                       "seconds": round(time.perf_counter() - t_peer, 2)})
        peer_log = workdir / path.name / "peer.log"
        if peer_log.is_file():
            budget["progress"] = training_progress(peer_log.read_bytes().decode(errors="replace"), n_patches)
        for m in methods.values():
            m["gain_db"] = round(m["psnr_db"] - doc["cubic"]["psnr_db"], 3)
        return figures, images
    say("scoring")
    eclare = fidelity(peer.data, truth, mask, drange)
    scale, shift = peer.index_map
    ceiling = fidelity(regrid_ceiling(truth, scale, shift, peer.output_shape[2]), truth, mask, drange)
    methods["eclare"] = {**eclare, "seconds": round(peer.seconds, 2)}
    for m in methods.values():
        m["gain_db"] = round(m["psnr_db"] - doc["cubic"]["psnr_db"], 3)
    eclare_own = re.search(r"ECLARE elapsed time: ([0-9.]+)s", peer.log_tail)
    rate = peer.progress.get("patches_per_s", 0.0)
    budget.update({
        "output_shape_xyz": list(peer.output_shape), "output_spacing_mm": list(peer.output_spacing),
        "truth_slice_to_output_slice": [round(scale, 5), round(shift, 5)],
        "seconds": round(peer.seconds, 2), "own_elapsed_s": float(eclare_own.group(1)) if eclare_own else None,
        "progress": peer.progress,
        # at the measured rate: what the default budget's training would take (for sizing a later run)
        "default_budget_train_s_at_this_rate": round(ECLARE_DEFAULT_PATCHES / rate, 1) if rate else None,
        "read_back": "cubic B-spline along the slice axis from ECLARE's grid onto the truth grid "
                     "(its affine); in-plane grid unchanged",
        "resampling_ceiling_psnr_db": ceiling["psnr_db"],
        # ECLARE clips to the input's range: an undertrained net leaves much of the body at its minimum
        "body_at_input_minimum": round(float((peer.data[mask] <= float(lr.data.min()) + 1e-3).mean()), 4)})
    images["ECLARE"] = peer.data
    return figures, images


def write_png(path: Path, rows: list[tuple[dict[str, Any], dict[str, np.ndarray]]], title: str) -> None:
    """One row per series: bars (gain over cubic dB, HU-MAE, bias, seconds) per method, then the central coronal
    cut of truth / cubic / srnode / ECLARE (display window: the truth's 1-99 percentiles). A series whose ECLARE
    run failed shows no ECLARE bar and its error in place of the ECLARE cut."""
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
            have = [k for k, m in enumerate(methods) if m in fig_doc["methods"]]
            vals = [float(fig_doc["methods"][methods[k]][key]) for k in have]
            ax.bar([methods[k] for k in have], vals, color=[colours[k] for k in have])
            for i, v in enumerate(vals):
                ax.text(i, v, f"{v:.3g}", ha="center", va="bottom", fontsize=8)
            ax.set_title(f"{fig_doc['series']}\n{label}" if c == 0 else label, fontsize=9)
        truth = imgs["truth"]
        lo, hi = np.percentile(truth[:, truth.shape[1] // 2, :], [1, 99])
        for c, name in enumerate(["truth", "cubic", "srnode", "ECLARE"]):
            ax = axes[r][4 + c]
            ax.axis("off")
            if name not in imgs:
                ax.text(0.5, 0.5, "\n".join(textwrap.wrap(str(fig_doc["eclare"].get("error", "no output")), 40)),
                        ha="center", va="center", fontsize=8, transform=ax.transAxes)
                ax.set_title(f"{name}: failed", fontsize=9)
                continue
            ax.imshow(imgs[name][:, imgs[name].shape[1] // 2, :], cmap="gray", vmin=lo, vmax=hi, aspect="auto")
            ax.set_title(name, fontsize=9)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def _budget_note(rows: list[tuple[dict[str, Any], dict[str, np.ndarray]]], args: argparse.Namespace) -> str:
    """What ECLARE's budget was, per series, why, and its cap: for the JSON."""
    budgets = [(r[0]["series"], r[0]["eclare"]) for r in rows]
    note = ""
    if any(b.get("reduced_budget") for _, b in budgets):
        gpu = any(b.get("gpu") for _, b in budgets)
        per = ", ".join(f"{name} {b['n_patches']}" for name, b in budgets)
        note = (f"ECLARE ran with a reduced patch budget on {'cuda' if gpu else 'the cpu'}: {per} patches of batch "
                f"{budgets[0][1]['batch_size']} (its default: {ECLARE_DEFAULT_PATCHES} of 128 on a GPU); network "
                "unchanged (WDSR, 16 blocks x 256 channels), slice profile given, no ESPRESO")
        if args.budget_reason:
            note += f"; why: {args.budget_reason}"
        note += "".join(f"; {name}: {b['budget_cut']}" for name, b in budgets if b.get("budget_cut"))
    note += ("; " if note else "") + f"each ECLARE run capped at {args.timeout:g} s"
    if args.deadline_s > 0:
        note += f" and by the run's deadline of {args.deadline_s:g} s"
    return note


def _write(out: Path, rows: list[tuple[dict[str, Any], dict[str, np.ndarray]]], args: argparse.Namespace,
           stamp: str, command: list[str], versions: dict[str, str]) -> None:
    """The JSON (command, machine, peer and its versions, budget note, figures per series) and the PNG beside it."""
    out.parent.mkdir(parents=True, exist_ok=True)
    shown = [c if len(c) < 80 else c[:77] + "..." for c in command]
    doc = {
        "benchmark": "peers",
        "command": " ".join(["srnode", *sys.argv[1:]]) if sys.argv[0].endswith("cli.py") else
        "srnode bench peers " + " ".join(str(s) for s in args.series),
        "machine": {"node": platform.node(), "machine": platform.machine(), "python": platform.python_version(),
                    "cpu_count": os.cpu_count(), "device": args.device, "note": args.note},
        "utc": stamp,
        "peer": "ECLARE 1.0.1 (pip eclare==1.0.1, its run-eclare)",
        "peer_command": shlex.join(shown),
        "peer_versions": versions,
        "budget_note": _budget_note(rows, args),
        "inputs": "srnode eval's simulated thick input (node.bench.eval.simulate, models.degrade box profile)",
        "metrics": "models.evaluate: body mask of the truth, PSNR over the truth's 0.1-99.9 % range, SSIM, "
                   "MAE and bias in modality units; gain_db = PSNR - cubic's PSNR",
        "series": [r[0] for r in rows],
    }
    out.write_text(json.dumps(doc, indent=2, default=float) + "\n")
    per = ", ".join(f"{r[0]['series']} {r[0]['eclare']['n_patches']}" for r in rows)
    title = (f"srnode bench peers x{args.factor} on {args.device}: srnode {args.engine}, cubic, ECLARE ({per} "
             f"patches)  [{args.note or platform.node()}]")
    write_png(out.with_suffix(".png"), rows, title)


def run(args: argparse.Namespace) -> int:
    """Run ``srnode bench peers``; returns the exit code: 0, or 1 when an ECLARE run failed or timed out (its
    error is in the JSON, the other figures too). VolumeError for a series that cannot be loaded, EngineError
    when no peer command is there."""
    from node.app.progress import bar_of
    from node.bench.results import RESULTS

    if args.factor < 2:
        raise VolumeError("--factor must be >= 2")
    command = peer_command(args.peer, args.peer_python)
    versions = peer_versions(command)
    if versions:
        log.info("peer runs with %s", versions)
    bar = bar_of(args)
    deadline = time.monotonic() + args.deadline_s if args.deadline_s > 0 else None
    if threading.current_thread() is threading.main_thread():  # a TERM (an outer timeout) still stops ECLARE's group
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    own = args.workdir is None
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="srnode-bench-peers-"))
    rows: list[tuple[dict[str, Any], dict[str, np.ndarray]]] = []
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    out = args.out or RESULTS / f"peers-{stamp}.json"
    try:
        for k, path in enumerate(args.series):
            prev = rows[-1][0]["eclare"] if rows else None
            rows.append(compare(path, args, command, workdir, bar, len(args.series), deadline, prev))
            m = rows[-1][0]["methods"]
            err = rows[-1][0]["eclare"].get("error")
            print(f"{path.name} x{args.factor}: " + ", ".join(
                f"{n} {v['gain_db']:+.2f} dB MAE {v['hu_mae']:.2f} bias {v['hu_bias']:+.2f} {v['seconds']:.1f} s"
                for n, v in m.items()) + (f", eclare FAILED: {err}" if err else "")
                + f" ({k + 1}/{len(args.series)})", flush=True)
            # after each series: a long run stopped early keeps what it measured
            _write(out, rows, args, stamp, command, versions)
    finally:
        if own:
            import shutil

            shutil.rmtree(workdir, ignore_errors=True)
    print(f"wrote {out} and {out.with_suffix('.png')}")
    return 1 if any("error" in r[0]["eclare"] for r in rows) else 0
