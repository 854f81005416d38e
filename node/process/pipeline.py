"""One series through the whole pipeline: volume → (denoise) → engine → derived + uncertainty files.

``process_series`` is what the node's workers run for a job and what ``srnode process IN_DIR OUT_DIR`` runs
offline, so both paths produce the same objects. Engine failures (EngineError, out of memory) fall back to the
``cubic`` engine and the reason is recorded in the result and in the derived objects' provenance.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydicom.dataset import Dataset

from models.engine import Factors
from node.config import Config, RuleConfig
from node.derived import check_identifiers, derive_series
from node.errors import VolumeError
from node.process.budget import check_series
from node.process.engines import EngineCache, add_denoise_sigma, denoise_input, run_engine
from node.series import MIN_SLICES_THROUGH_PLANE, SeriesVolume, check_through_plane, load_series, regular_runs
from node.store import fsync_dir

log = logging.getLogger(__name__)

@dataclass
class ProcessResult:
    """What ``process_series`` wrote: the derived and uncertainty file paths (all runs, in order), the
    series UIDs, the engine that made the pixels (of the last run), the fallback reasons (joined) and the
    job report."""

    derived_files: list[Path]
    uncertainty_files: list[Path]
    derived_series_uid: str  # the first derived series (the only one unless the input was split into runs)
    uncertainty_series_uid: str
    engine: str
    fallback: str = ""
    report: dict[str, Any] = field(default_factory=dict)
    derived_series_uids: list[str] = field(default_factory=list)  # one per regular run
    uncertainty_series_uids: list[str] = field(default_factory=list)


# ---------------------------------------------------------------------------------------------- files


def write_atomic(ds: Dataset, path: Path) -> None:
    """Write ``ds`` as a DICOM file: temp file, fsync, rename, fsync of the folder (a reader never sees half a
    file, and the name survives a power cut). Creates the folder. Raises OSError (the temp file is removed)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        ds.save_as(tmp, enforce_file_format=True)
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    fsync_dir(path.parent)


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
                   engine_name: str = "", progress: Callable[[str], None] | None = None,
                   engines: EngineCache | None = None) -> ProcessResult:
    """Super-resolve the series in ``paths`` by ``rule``; write derived + uncertainty files under ``out_dir``.

    ``engines``: the caller's engine cache (a fresh one when not given); ``progress`` gets one line per step.
    An irregular stack with through-plane factor > 1 is processed per regular run
    (``node.series.regular_runs``). Before decoding, ``node.process.budget.check_series`` refuses a series whose
    pixel data cannot hold what its headers declare (VolumeError) or that would need more memory than
    ``[node] max_series_memory_mb`` (BudgetError, a VolumeError). Raises VolumeError (not one volume), EngineError (even cubic failed),
    DeriveError (a derived object failed its checks) or OSError (a file cannot be written); engine failures
    otherwise fall back to cubic, recorded in ``ProcessResult.fallback``.
    """
    t0 = time.perf_counter()
    engines = engines or EngineCache()
    say = progress or (lambda _msg: None)
    factors = Factors(rule.through_plane_factor, rule.in_plane_factor)
    name = engine_name or rule.engine or cfg.engine.name
    check_series(paths, factors, name, cfg.node.max_series_memory_mb)  # headers only, before any decoding
    vol = load_series(paths)
    check_identifiers(vol)
    options = cfg.engine.options
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
            vin, sigma_d, rep = denoise_input(vin, options)
            report.setdefault("denoise", []).append(rep)
        t1 = time.perf_counter()
        er, version = run_engine(engines, name, options, vin, factors)
        if sigma_d is not None:
            add_denoise_sigma(engines, er, sigma_d, options, vin, factors)
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
