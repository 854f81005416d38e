"""``srnode train DATA_DIR... --out models/weights/prior.pt --steps N --device cuda``: the shipped prior.

Each DATA_DIR is a series folder, a folder of series folders, or a ``.npz`` export (see ``srnode eval``). Writes
the checkpoint (< 5 MB, float16) and ``<out>.json`` with the data, steps, commit and internal metrics.
"""

from __future__ import annotations

import argparse
import json
import logging
import subprocess
import time
from pathlib import Path
from typing import Any

import torch

from models.engine import VolumeInput
from models.nets import SRNetConfig
from models.prior import IN_SLICES
from node.app.progress import StageBar, logs_through_bars, wanted
from node.app.volume_file import load_volume
from node.errors import NodeError, VolumeError

log = logging.getLogger(__name__)


def _series_dirs(path: Path) -> list[Path]:
    if not path.exists():
        raise VolumeError(f"{path}: does not exist")
    if path.suffix == ".npz" or (path.is_dir() and any(p.is_file() for p in path.iterdir())):
        return [path]
    if path.is_dir():
        return sorted(p for p in path.iterdir() if p.is_dir())
    raise VolumeError(f"{path}: not a series folder, a folder of series or a .npz")


def _commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=False,
                              timeout=10).stdout.strip()
    except OSError:
        return ""


def _positive(text: str) -> int:
    """An argparse type: an integer >= 1 (0 or negative counts crashed training or wrote an untrained prior)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid int value: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def configure(parser: argparse.ArgumentParser) -> None:
    """Add ``srnode train`` options to ``parser``."""
    parser.add_argument("data", nargs="+", type=Path, help="series folders, folders of series, or .npz exports")
    parser.add_argument("--out", type=Path, default=Path("models/weights/prior.pt"))
    parser.add_argument("--steps", type=_positive, default=2000, help="training steps per net (task x factor)")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    parser.add_argument("--width", type=_positive, default=24)
    parser.add_argument("--depth", type=_positive, default=6)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--only", choices=["in", "through"], default="",
                        help="retrain these nets only; the others are copied from the existing --out checkpoint")
    parser.add_argument("--quiet", action="store_true",
                        help="no progress bar (there is none either when stderr is not a terminal)")
    parser.add_argument("--factors", type=int, nargs="+", default=[],
                        help="with --only: retrain these factors only (the others are kept too)")
    parser.add_argument("--sampling", choices=["uniform", "gradient"], default="uniform",
                        help="training patch corners: uniform, or half in proportion to the input's |gradient|")
    parser.add_argument("--in-slices", type=_positive, default=IN_SLICES,
                        help="in-plane nets: training slices per series (at random from the 4 in 5 not held out "
                             "for validation; all of them when fewer)")
    parser.add_argument("--sources", type=Path, default=None,
                        help="JSON list of where the training series came from (repository, commit, path, "
                             "licence), copied into <out>.json as 'sources'")


def run(args: argparse.Namespace) -> int:
    """Run ``srnode train``; returns the exit code. Series with fewer than 3 slices or under 64 x 64 are
    skipped; VolumeError when none is usable or ``--only`` finds no checkpoint to keep. On a terminal (and
    without ``--quiet``) a bar names the stage and one under it counts each net's steps with its loss and ETA."""
    bars = wanted(args.quiet)
    with logs_through_bars(bars), StageBar("train", 2, bars) as bar:
        return _run(args, bar, bars)


def _run(args: argparse.Namespace, bar: StageBar, bars: bool) -> int:
    from models.prior import pick_device, train_prior

    device = pick_device(args.device)
    if args.factors and not args.only:
        raise VolumeError("--factors needs --only in|through (the other factors are kept from --out)")
    sources: Any = None
    if args.sources is not None:
        try:
            sources = json.loads(args.sources.read_text())
        except (OSError, ValueError) as exc:
            raise VolumeError(f"--sources {args.sources}: not a readable JSON file ({exc})") from exc
    bar.stage("loading series")
    vols: list[VolumeInput] = []
    names: list[str] = []
    for p in args.data:
        for d in _series_dirs(p):
            try:
                lo = load_volume(d)
            except NodeError as exc:
                log.warning("skipped %s: %s", d, exc)
                continue
            if lo.vin.data.shape[0] < 3 or min(lo.vin.data.shape[1:]) < 64:
                log.warning("skipped %s: %s is too small", d, lo.vin.data.shape)
                continue
            vols.append(lo.vin)
            names.append(f"{lo.name} {lo.vin.modality} {'x'.join(map(str, lo.vin.data.shape))}")
            log.info("training series %d: %s", len(vols), names[-1])
    if not vols:
        raise VolumeError("no usable training series")
    keep: dict[str, Any] = {}
    kept_prov: dict[str, Any] = {}
    if args.only:
        if not args.out.is_file():
            raise VolumeError(f"--only {args.only}: {args.out} does not exist (nothing to keep)")
        keep = torch.load(args.out, map_location="cpu", weights_only=True)
        prov_path = args.out.with_suffix(".json")
        kept_prov = json.loads(prov_path.read_text()) if prov_path.is_file() else {}
    t0 = time.perf_counter()
    bar.stage(f"training on {len(vols)} series")
    ckpt, metrics = train_prior(vols, args.steps, device, SRNetConfig(width=args.width, depth=args.depth), args.seed,
                                args.only, keep, tuple(args.factors), args.sampling, bar.engine if bars else None,
                                in_slices=args.in_slices)
    if args.only:  # the kept nets' figures and provenance stay on record
        other = "through" if args.only == "in" else "in"
        kept = {k: v for k, v in kept_prov.get("metrics", {}).items()
                if k.startswith(other) or (args.factors and k.startswith(args.only) and int(k.split("x")[-1])
                                           not in args.factors)}
        metrics = {**kept, **metrics}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    torch.save(ckpt, args.out)
    prov = {"data": names, "steps_per_net": args.steps, "in_slices": args.in_slices, "device": str(device),
            "torch": torch.__version__, "commit": _commit(), "seconds": round(time.perf_counter() - t0, 1),
            "config": ckpt["config"], "metrics": metrics, "bytes": args.out.stat().st_size,
            "method": "internal pairs from in-plane axes (box profiles: contiguous, gap, overlap) and ZSSR pairs "
                      f"({ckpt['config'].get('in_context', 1)} input slices; each batch under a random symmetry of "
                      f"the square); patch sampling: {args.sampling}"}
    if sources is not None:
        prov["sources"] = sources
    if args.only:
        other = "through" if args.only == "in" else "in"
        prov["only"] = args.only
        if args.factors:
            prov["factors"] = list(args.factors)
        prov["kept"] = {"nets": other, "from": {k: kept_prov.get(k) for k in
                                                ("data", "steps_per_net", "device", "torch", "commit", "seconds")}}
    args.out.with_suffix(".json").write_text(json.dumps(prov, indent=2) + "\n")
    print(f"prior written to {args.out} ({prov['bytes'] / 1e6:.2f} MB) in {prov['seconds']} s: "
          + ", ".join(f"{k} {v['val_gain_db']:+.2f} dB" for k, v in metrics.items()))
    return 0
