"""One series through the whole pipeline: volume → (denoise) → engine → derived + uncertainty files.

``process_series`` is what the node's workers run for a job and what ``srnode process IN_DIR OUT_DIR`` runs
offline, so both paths produce the same objects. Engine failures (EngineError, out of memory) fall back to the
``cubic`` engine and the reason is recorded in the result and in the derived objects' provenance.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import logging
import os
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from pydicom.dataset import Dataset

from models.engine import Engine, EngineOptions, EngineResult, Factors, VolumeInput, get_engine
from models.engine import EngineError as ModelsEngineError
from node.config import Config, RuleConfig, load_config
from node.derive import check_identifiers, derive_series
from node.errors import DeriveError, EngineError, NodeError, VolumeError
from node.volume import MIN_SLICES_THROUGH_PLANE, SeriesVolume, check_through_plane, load_series, regular_runs

log = logging.getLogger(__name__)

FALLBACK_ENGINE = "cubic"


@dataclass
class ProcessResult:
    derived_files: list[Path]
    uncertainty_files: list[Path]
    derived_series_uid: str  # the first derived series (the only one unless the input was split into runs)
    uncertainty_series_uid: str
    engine: str
    fallback: str = ""
    report: dict[str, Any] = field(default_factory=dict)
    derived_series_uids: list[str] = field(default_factory=list)  # one per regular run
    uncertainty_series_uids: list[str] = field(default_factory=list)


# ---------------------------------------------------------------------------------------------- engines

_ENGINES: dict[tuple[str, EngineOptions], Engine] = {}
_ENGINES_LOCK = threading.Lock()


def engine_options(cfg: Config) -> EngineOptions:
    e = cfg.engine
    return EngineOptions(device=e.device, fast=e.fast, finetune_steps=e.finetune_steps,
                         in_plane_finetune_steps=e.in_plane_finetune_steps, tta_passes=e.tta_passes, samples=e.samples, weights=e.weights, seed=e.seed, min_gain_db=e.min_gain_db,
                         max_voxels_per_tile=e.max_voxels_per_tile)


def cached_engine(name: str, options: EngineOptions) -> Engine:
    """One engine instance per (name, options), kept for the life of the process (weights load once)."""
    key = (name, options)
    with _ENGINES_LOCK:
        if key not in _ENGINES:
            try:
                _ENGINES[key] = get_engine(name, options)
            except ValueError as exc:
                raise EngineError(str(exc)) from exc
        return _ENGINES[key]


def _is_oom(exc: BaseException) -> bool:
    return isinstance(exc, MemoryError) or type(exc).__name__ == "OutOfMemoryError" or "out of memory" in str(exc)


def run_engine(name: str, options: EngineOptions, vin: VolumeInput, factors: Factors) -> tuple[EngineResult, str]:
    """Upscale with ``name``; on EngineError or out-of-memory retry with cubic. Returns (result, engine version)."""
    try:
        engine = cached_engine(name, options)
        try:
            result = engine.upscale(vin, factors)
        except ModelsEngineError as exc:  # the engine boundary: translated once
            raise EngineError(str(exc)) from exc
        return result, str(getattr(engine, "version", ""))
    except Exception as exc:
        if name == FALLBACK_ENGINE or not (isinstance(exc, EngineError) or _is_oom(exc)):
            if isinstance(exc, EngineError):
                raise
            raise EngineError(f"engine {name} failed: {type(exc).__name__}: {exc}") from exc
        reason = f"engine {name} failed ({'out of memory' if _is_oom(exc) else exc}); used {FALLBACK_ENGINE}"
        log.warning("%s", reason)
    engine = cached_engine(FALLBACK_ENGINE, options)
    result = engine.upscale(vin, factors)
    result.fallback = (result.fallback + "; " if result.fallback else "") + reason
    return result, str(getattr(engine, "version", ""))


def _denoise(vin: VolumeInput, options: EngineOptions) -> tuple[VolumeInput, np.ndarray | None, dict[str, Any]]:
    """The optional denoise step (``models.denoise``, when a teammate's module is installed)."""
    try:
        mod = importlib.import_module("models.denoise")
    except ModuleNotFoundError as exc:
        if exc.name != "models.denoise":
            raise
        return vin, None, {"denoise": "skipped: models.denoise is not installed"}
    try:
        data, sigma, rep = mod.denoise(vin, options)
    except ModelsEngineError as exc:
        raise EngineError(f"denoise: {exc}") from exc
    return dataclasses.replace(vin, data=np.asarray(data, dtype=np.float32)), np.asarray(sigma), dict(rep)


def _add_denoise_sigma(result: EngineResult, sigma_in: np.ndarray, options: EngineOptions,
                       vin: VolumeInput, factors: Factors) -> None:
    """Carry the denoiser's sigma to the output grid (cubic) and add it in quadrature."""
    up = cached_engine(FALLBACK_ENGINE, options).upscale(
        dataclasses.replace(vin, data=sigma_in.astype(np.float32), value_range=None), factors).data
    result.sigma = np.sqrt(result.sigma.astype(np.float64) ** 2 + np.maximum(up, 0) ** 2).astype(np.float32)


# ---------------------------------------------------------------------------------------------- files


def write_atomic(ds: Dataset, path: Path) -> None:
    """Write ``ds`` as a DICOM file: temp file, fsync, rename (a reader never sees half a file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    ds.save_as(tmp, enforce_file_format=True)
    with open(tmp, "rb") as fh:
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def _volumes_for(vol: SeriesVolume, factors: Factors) -> tuple[list[SeriesVolume], list[str]]:
    if factors.through_plane > 1 and vol.irregular:
        runs = regular_runs(vol)
        keep = [r for r in runs if r.shape[0] >= MIN_SLICES_THROUGH_PLANE]
        notes = [f"irregular steps: split into {len(runs)} regular run(s), {len(keep)} with >= "
                 f"{MIN_SLICES_THROUGH_PLANE} slices processed"]
        if not keep:
            raise VolumeError(f"series {vol.series_uid}: slice steps are irregular and no regular run has "
                              f"{MIN_SLICES_THROUGH_PLANE} or more slices; through-plane super-resolution refused")
        return keep, notes
    check_through_plane(vol, factors.through_plane)
    return [vol], []


def process_series(paths: Sequence[Path], rule: RuleConfig, cfg: Config, out_dir: Path,
                   engine_name: str = "", progress: Callable[[str], None] | None = None) -> ProcessResult:
    """Super-resolve the series in ``paths`` by ``rule`` and write derived + uncertainty files under ``out_dir``."""
    t0 = time.perf_counter()
    say = progress or (lambda _msg: None)
    vol = load_series(paths)
    check_identifiers(vol)
    factors = Factors(rule.through_plane_factor, rule.in_plane_factor)
    name = engine_name or rule.engine or cfg.engine.name
    options = engine_options(cfg)
    volumes, notes = _volumes_for(vol, factors)
    report: dict[str, Any] = {"input": vol.describe(), "notes": vol.notes + notes,
                              "factors": [factors.through_plane, factors.in_plane], "runs": []}
    result = ProcessResult([], [], "", "", name, report=report)
    fallbacks: list[str] = []
    for v in volumes:
        tag = f"run {v.run[0]}/{v.run[1]} " if v.run else ""
        say(f"{tag}{v.shape[0]} slices: engine {name}")
        vin = v.to_engine_input()
        sigma_d = None
        if rule.denoise:
            vin, sigma_d, rep = _denoise(vin, options)
            report.setdefault("denoise", []).append(rep)
        t1 = time.perf_counter()
        er, version = run_engine(name, options, vin, factors)
        if sigma_d is not None:
            _add_denoise_sigma(er, sigma_d, options, vin, factors)
            er.report["denoised"] = True  # the derived objects say so, and their UIDs differ from plain SR
        t_engine = time.perf_counter() - t1
        say(f"{tag}deriving {er.data.shape[0]} slices")
        objs = derive_series(v, er, factors, cfg.derive, version)
        suffix = f"-run{v.run[0]}" if v.run else ""
        for k, ds in enumerate(objs.derived):
            p = out_dir / f"derived{suffix}" / f"IM{k + 1:05d}.dcm"
            write_atomic(ds, p)
            result.derived_files.append(p)
        for k, ds in enumerate(objs.uncertainty):
            p = out_dir / f"uncertainty{suffix}" / f"SC{k + 1:05d}.dcm"
            write_atomic(ds, p)
            result.uncertainty_files.append(p)
        result.derived_series_uids.append(objs.derived_series_uid)
        result.uncertainty_series_uids.append(objs.uncertainty_series_uid if objs.uncertainty else "")
        result.engine = er.engine
        if er.fallback:
            fallbacks.append(er.fallback)
        report["runs"].append({"slices_in": v.shape[0], "slices_out": len(objs.derived),
                               "spacing_out": [round(s, 6) for s in er.spacing], "engine": er.engine,
                               "engine_seconds": round(t_engine, 3), "engine_report": er.report,
                               "derived_series_uid": objs.derived_series_uid})
    result.derived_series_uid = result.derived_series_uids[0]
    result.uncertainty_series_uid = result.uncertainty_series_uids[0]
    result.fallback = "; ".join(dict.fromkeys(fallbacks))
    report["seconds"] = round(time.perf_counter() - t0, 3)
    return result


# ---------------------------------------------------------------------------------------------- CLI


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("in_dir", metavar="IN_DIR", type=Path, help="folder of DICOM files (searched recursively)")
    parser.add_argument("out_dir", metavar="OUT_DIR", type=Path, help="where derived + uncertainty series go")
    parser.add_argument("--config", default=None, help="config.toml (default: the embedded defaults)")
    parser.add_argument("--engine", default="", help="engine for every series (default: rule / [engine].name)")
    parser.add_argument("--no-preview", action="store_true", help="do not write preview.png per series")


def group_by_series(in_dir: Path) -> tuple[dict[str, list[Path]], dict[str, Dataset], list[str]]:
    """Files of ``in_dir`` by SeriesInstanceUID, one header per series, and the files that are not DICOM."""
    from node.volume import read_header

    groups: dict[str, list[Path]] = {}
    headers: dict[str, Dataset] = {}
    bad: list[str] = []
    for p in sorted(in_dir.rglob("*")):
        if not p.is_file() or p.name.startswith("."):
            continue
        try:
            hdr = read_header(p)
        except VolumeError as exc:
            bad.append(str(exc))
            continue
        uid = str(hdr.get("SeriesInstanceUID", "") or "")
        groups.setdefault(uid, []).append(p)
        headers.setdefault(uid, hdr)
    return groups, headers, bad


def _safe(uid: str) -> str:
    return "".join(c for c in uid if c.isalnum() or c in ".-_") or "no-series-uid"


def run(args: argparse.Namespace) -> int:
    from node.rules import match_rule

    cfg = load_config(args.config)
    in_dir, out_dir = Path(args.in_dir), Path(args.out_dir)
    if not in_dir.is_dir():
        raise VolumeError(f"{in_dir}: not a folder")
    groups, headers, bad = group_by_series(in_dir)
    failed = 0
    for reason in bad:
        print(f"FAILED {reason}")
        failed += 1
    if not groups:
        print(f"no DICOM series found in {in_dir}")
        return 1
    total = len(groups)
    for n, (uid, files) in enumerate(sorted(groups.items()), start=1):
        hdr = headers[uid]
        label = f"[{n}/{total}] series {uid or '(no SeriesInstanceUID)'} ({hdr.get('Modality', '?')}, " \
                f"{str(hdr.get('SeriesDescription', '') or '').strip() or 'no description'}, {len(files)} file(s))"
        rule, why = match_rule(cfg, hdr)
        if rule is None:
            print(f"{label}: left alone: {why}")
            continue

        def progress(msg: str, _label: str = label) -> None:
            print(f"{_label}: {msg}", file=sys.stderr, flush=True)

        dest = out_dir / _safe(uid)
        try:
            res = process_series(files, rule, cfg, dest, engine_name=args.engine, progress=progress)
        except (VolumeError, EngineError, DeriveError) as exc:
            failed += 1
            print(f"{label}: FAILED: {exc}")
            continue
        except NodeError as exc:
            failed += 1
            print(f"{label}: FAILED: {exc}")
            continue
        preview = ""
        if not args.no_preview:
            preview = _write_preview(files, res, dest)
        fb = f", fallback: {res.fallback}" if res.fallback else ""
        print(f"{label}: rule {rule.name}: {len(res.derived_files)} derived -> "
              f"{sorted({str(p.parent) for p in res.derived_files})}, {len(res.uncertainty_files)} uncertainty -> "
              f"{sorted({str(p.parent) for p in res.uncertainty_files})} (engine {res.engine}{fb}, "
              f"{res.report.get('seconds', 0):.1f} s){preview}")
    return 1 if failed else 0


def _write_preview(files: list[Path], res: ProcessResult, dest: Path) -> str:
    try:
        from node.preview import write_preview

        write_preview(files, res.derived_files, res.uncertainty_files, dest / "preview.png")
    except (ImportError, NodeError, OSError, ValueError) as exc:
        log.warning("preview not written: %s", exc)
        return ""
    return f", preview {dest / 'preview.png'}"
