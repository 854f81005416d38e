"""The shipped prior of ``selfsup``: loading it (``load_prior``, ``make_net``) and training it (``srnode train``:
one small net per task and factor).

Through-plane nets (x2..x5) learn from in-plane axes of every training series, degraded with box profiles of
several physical sizes (contiguous, 20 % gap, 25 % overlap) so that the prior is not tied to one scanner; in-plane
nets (x2..x4) learn ZSSR pairs (slices and their f x f block means). The checkpoint carries the net config; a
JSON beside it records data, steps, commit and internal metrics. torch + numpy only.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from models import calibration as cal
from models import inplane as ip
from models import internal as il
from models.degrade import DegradationModel
from models.engine import CpuPrecision, EngineError, Progress, VolumeInput
from models.nets import SRNet, SRNetConfig

log = logging.getLogger(__name__)

DEFAULT_WEIGHTS = Path(__file__).resolve().parent / "weights" / "prior.pt"
NET = SRNetConfig(width=24, depth=6)  # the shipped prior's shape (overridden by the checkpoint's config)


def pick_device(name: str) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise EngineError("engine.device = 'cuda' but no CUDA device is available")
    if name in ("cuda", "auto") and torch.cuda.is_available():
        return torch.device("cuda")
    return torch.device("cpu")


def load_prior(path: Path) -> dict[str, Any]:
    """The shipped prior: {"config": {...}, "through": {f: state}, "in": {f: state}}; {} when absent."""
    if not path.is_file():
        return {}
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # corrupt or foreign file
        raise EngineError(f"selfsup: cannot read prior weights {path}: {exc}") from exc
    if not isinstance(ckpt, dict) or "config" not in ckpt:
        raise EngineError(f"selfsup: {path} is not a selfsup prior (no 'config')")
    return ckpt


def make_net(prior: dict[str, Any], kind: str, fz: int, fx: int, device: torch.device,
             in_ch: int = 1, cpu_precision: CpuPrecision = CpuPrecision.AUTO) -> tuple[SRNet, bool]:
    """A net for (kind, factor) with ``in_ch`` input slices, initialised from the prior when it has one;
    (net, from_prior); its passes on the CPU run in ``cpu_precision``. A prior net with another channel count is adapted: a 2D net's first layer goes to the
    centre channel (the context starts unused), a 2.5D net's is summed (one slice repeated)."""
    c = prior.get("config", {})
    cfg = SRNetConfig(fz=fz, fx=fx, width=int(c.get("width", NET.width)), depth=int(c.get("depth", NET.depth)),
                      in_ch=in_ch)
    torch.manual_seed(0)
    net = SRNet(cfg)
    net.cpu_precision = cpu_precision
    state = prior.get(kind, {}).get(str(fz))
    if state is not None:
        state = {k: v.float() for k, v in state.items()}
        w0 = state["body.0.weight"]  # (width, C, 3, 3)
        if w0.shape[1] == 1 and in_ch > 1:
            state["body.0.weight"] = torch.zeros((w0.shape[0], in_ch, *w0.shape[2:]))
            state["body.0.weight"][:, in_ch // 2] = w0[:, 0]
        elif w0.shape[1] != in_ch and in_ch == 1:
            state["body.0.weight"] = w0.sum(1, keepdim=True)
        elif w0.shape[1] != in_ch:
            raise EngineError(f"selfsup: prior {kind} x{fz} has {w0.shape[1]} input slices, not {in_ch}")
        net.load_state_dict(state)
    net = net.to(device)
    if device.type == "cuda":
        net = net.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
    return net.eval(), state is not None


THROUGH_FACTORS = (2, 3, 4, 5)
IN_FACTORS = (2, 3, 4)


def _normalise(v: VolumeInput) -> np.ndarray:
    lo, hi = np.percentile(v.data[:: max(1, v.data.shape[0] // 16)], [0.5, 99.5])
    return ((v.data - lo) / max(float(hi - lo), 1e-6)).astype(np.float32)


def _through_sets(vols: list[VolumeInput], f: int, device: torch.device, seed: int,
                  held_out: bool) -> list[il.PairSet]:
    sets: list[il.PairSet] = []
    for i, v in enumerate(vols):
        vn = _normalise(v)
        _, dy, dx = v.spacing
        train_z, val_z = il.split_slices(vn.shape[0], 24, 6, seed + i)
        z_idx = val_z if held_out else train_z
        for fine_px, ratio in ((1.0, 1.0), (1.6, 0.8), (2.2, 1.25)):
            fine = fine_px * min(dy, dx)
            model = DegradationModel(f, 1, f * fine, f * fine * ratio, min(dy, dx))
            sets += il.through_pairs(vn, v.spacing, model, z_idx, device)
    return sets


IN_SLICES = 24  # training slices per series of the in-plane nets (``train_prior``'s default)


def _in_sets(vols: list[VolumeInput], f: int, device: torch.device, seed: int, held_out: bool,
             n_train: int = IN_SLICES) -> list[il.PairSet]:
    sets: list[il.PairSet] = []
    for i, v in enumerate(vols):
        vn = _normalise(v)
        if min(vn.shape[1:]) < 8 * f:
            continue
        train_z, val_z = il.split_slices(vn.shape[0], n_train, 6, seed + i)
        sets += ip.in_plane_pairs(vn, f, val_z if held_out else train_z, device, ip.CONTEXT,
                                  ip.square_pixels(v.spacing))
    return sets


def train_prior(vols: list[VolumeInput], steps: int, device: torch.device, cfg: SRNetConfig, seed: int = 0,
                only: str = "", keep: dict[str, Any] | None = None, factors: tuple[int, ...] = (),
                sampling: str = "uniform", progress: Progress | None = None,
                in_slices: int = IN_SLICES) -> tuple[dict[str, Any], dict[str, Any]]:
    """(checkpoint, metrics): nets for every factor trained ``steps`` steps each on all ``vols``; in-plane nets
    see ``inplane.CONTEXT`` slices. ``only`` ("in" | "through"): train that kind only and copy the other kind's
    nets from the checkpoint ``keep`` (which must have the same width and depth); ``factors`` (with ``only``):
    train these factors of that kind only, the others are kept too. ``sampling`` ("uniform" | "gradient"): where
    training patches are drawn (``internal.train``). ``progress`` gets each net's steps and loss, stage
    "<kind> x<f> (<k>/<n>)". ``in_slices``: training slices per series of the in-plane nets (drawn at random
    from the 4 in 5 not held out for validation; all of them when fewer). ValueError when ``factors`` is given
    without ``only``."""
    ckpt: dict[str, Any] = {"format": 1, "config": {"width": cfg.width, "depth": cfg.depth, "in_context": ip.CONTEXT},
                            "norm": "percentile 0.5-99.5", "through": {}, "in": {}}
    if only:
        old = (keep or {}).get("config", {})
        if (old.get("width"), old.get("depth")) != (cfg.width, cfg.depth):
            raise ValueError(f"--only {only}: the kept checkpoint's config {old} is not width {cfg.width}, depth "
                             f"{cfg.depth}")
        other = "through" if only == "in" else "in"
        ckpt[other] = dict((keep or {}).get(other, {}))
        if other == "in":
            ckpt["config"]["in_context"] = old.get("in_context", 1)
        if factors:
            ckpt[only] = {f: st for f, st in (keep or {}).get(only, {}).items() if int(f) not in factors}
    elif factors:
        raise ValueError("factors need only='in' or 'through' (the other factors are kept from a checkpoint)")
    metrics: dict[str, Any] = {}
    jobs = [("through", f) for f in THROUGH_FACTORS] + [("in", f) for f in IN_FACTORS]
    jobs = [j for j in jobs if (not only or j[0] == only) and (not factors or j[1] in factors)]
    for k, (kind, f) in enumerate(jobs, start=1):
        t = time.perf_counter()
        if kind == "through":
            sets, val = _through_sets(vols, f, device, seed, False), _through_sets(vols, f, device, seed, True)
        else:
            sets = _in_sets(vols, f, device, seed, False, in_slices)
            val = _in_sets(vols, f, device, seed, True, in_slices)
        if not sets or not val:
            log.warning("prior %s x%d: no training pairs, skipped", kind, f)
            continue
        torch.manual_seed(seed)
        net = SRNet(SRNetConfig(fz=f, fx=1 if kind == "through" else f, width=cfg.width, depth=cfg.depth,
                                in_ch=1 if kind == "through" else ip.CONTEXT))
        net = net.to(device)
        loss = il.train(net, sets, steps, 2e-3, seed, patch=(32, 64), batch=32, augment=kind == "in",
                        sampling=sampling,
                        progress=(progress, f"{kind} x{f} ({k}/{len(jobs)})") if progress else None)
        v = cal.validate(net, val, 4, seed=seed)
        ckpt[kind][str(f)] = {k: t.detach().cpu().half() for k, t in net.state_dict().items()}
        metrics[f"{kind}_x{f}"] = {"loss": round(loss, 5), "val_gain_db": round(v.gain_db, 3),
                                   "val_spearman": round(v.spearman, 3), "seconds": round(time.perf_counter() - t, 1)}
        log.info("prior %s x%d: %s", kind, f, metrics[f"{kind}_x{f}"])
    return ckpt, metrics
