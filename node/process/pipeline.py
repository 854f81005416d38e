"""One series through the whole pipeline: volume → (denoise) → engine → derived + uncertainty files.

``process_series`` is what the node's workers run for a job and what ``srnode process IN_DIR OUT_DIR`` runs
offline, so both paths produce the same objects. Engine failures (EngineError, out of memory) fall back to the
``cubic`` engine and the reason is recorded in the result and in the derived objects' provenance.
"""

from __future__ import annotations

import ctypes
import gc
import logging
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydicom.dataset import Dataset

from models.engine import Factors, Progress
from node.config import Config, RuleConfig, VolumeChoice
from node.derived import (
    Revision,
    check_identifiers,
    check_inputs,
    check_one_patient,
    conform_dataset,
    derive_series,
    inspect_input,
)
from node.derived.modules import sigma_file_name
from node.errors import VolumeError
from node.process.budget import check_series
from node.process.engines import EngineCache, add_denoise_sigma, denoise_input, run_engine, settings_digest
from node.process.space import ResultsRoom, failed_write, pixel_bytes, results_bytes
from node.process.summary import summarize
from node.series import (
    LeftOut,
    SeriesVolume,
    check_through_plane,
    describe_steps,
    load_volumes,
    read_header,
    split_runs,
)
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
    left_out: list[LeftOut] = field(default_factory=list)  # input slices in no derived series, each with why

    def left_out_lines(self) -> list[str]:
        """One line per input slice that is in no derived series: 'slice 1/27 IM0001.dcm: reason'."""
        return [f"{x.where}: {x.reason}" for x in self.left_out]


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


def _write_result(ds: Dataset, path: Path, room: ResultsRoom | None, what: str, out_dir: Path) -> None:
    """``write_atomic``; with a ``room`` (a job's), the watermark is checked first (its pixel data must fit above
    it) and a failed write becomes ResultsSpaceError naming its error and ``path`` under ``out_dir``'s parent."""
    if room is None:
        write_atomic(ds, path)
        return
    room.check(pixel_bytes(ds), what)
    try:
        write_atomic(ds, path)
    except OSError as exc:
        raise failed_write(exc, path, what, out_dir.parent) from exc


def _volumes_for(vol: SeriesVolume, factors: Factors) -> tuple[list[SeriesVolume], list[LeftOut], list[str]]:
    """The volumes to super-resolve (the series, or its regular runs), the slices in none, and remarks."""
    if factors.through_plane > 1 and vol.irregular:
        split = split_runs(vol)
        if not split.runs:
            raise VolumeError(f"{vol.name}: slice steps are irregular ({describe_steps(vol.steps)}) "
                              "and no stretch of them is regular; through-plane super-resolution refused")
        spans = ", ".join(f"{r.run_slices[0]}-{r.run_slices[1]}" for r in split.runs if r.run_slices)
        notes = [f"irregular steps: split into {len(split.runs)} regular run(s) (input slices {spans} of "
                 f"{vol.shape[0]}), each its own derived series"]
        if split.left_out:
            notes.append(f"{len(split.left_out)} input slice(s) in no derived series: "
                         + "; ".join(f"slice {x.index} ({x.file})" for x in split.left_out))
        return split.runs, split.left_out, notes
    check_through_plane(vol, factors.through_plane)
    return [vol], [], []


def _select_volumes(vols: list[SeriesVolume], choice: VolumeChoice) -> tuple[list[SeriesVolume], list[str]]:
    """The volumes a rule's ``volumes`` option keeps, and a note naming the ones left out."""
    if len(vols) <= 1 or choice == VolumeChoice.ALL:
        return vols, []
    left = ", ".join(v.volume_label for v in vols[1:])
    return vols[:1], [f"rule volumes = \"first\": {len(vols) - 1} other volume(s) of the series not processed ({left})"]


def _volumes_of(vols: list[SeriesVolume],
                factors: Factors) -> tuple[list[SeriesVolume], list[LeftOut], list[str], list[str]]:
    """Every volume (or regular run) to super-resolve, the input slices in none, notes, and the volumes refused
    (each with its reason).

    A volume that cannot be super-resolved is refused alone when its siblings can; raises VolumeError when no
    volume is left."""
    out: list[SeriesVolume] = []
    left_out: list[LeftOut] = []
    notes: list[str] = []
    refused: list[str] = []
    for vol in vols:
        try:
            vs, lo, ns = _volumes_for(vol, factors)
        except VolumeError as exc:
            if len(vols) == 1:
                raise
            files = sorted({r.file.name for r in vol.datasets.records if r.file is not None})
            refused.append(f"{exc} (files: {', '.join(files)})" if files else str(exc))
            continue
        out += vs
        left_out += lo
        notes += ns
    if not out:
        raise VolumeError("no volume of the series can be super-resolved: " + "; ".join(refused))
    for j, v in enumerate(out):
        v.part = j  # distinct series numbers for every derived series of this input
    return out, left_out, notes, refused


def _describe_input(vols: list[SeriesVolume]) -> str:
    if len(vols) == 1:
        return vols[0].describe()
    return (f"series {vols[0].series_uid}: {len(vols)} volumes ("
            + "; ".join(f"{v.volume_label}: {v.shape[0]} slices" for v in vols) + ")")


def _mixed_patients(paths: Sequence[Path]) -> None:
    """VolumeError naming the attributes that differ when ``paths`` hold several patients or studies (headers only);
    nothing when they do not, or when a header cannot be read (the caller's own reason then stands)."""
    try:
        headers = [read_header(p) for p in paths]
    except VolumeError:
        return
    if headers:
        check_one_patient(str(headers[0].get("SeriesInstanceUID", "") or ""), headers)


def _release_input_headers(vols: list[SeriesVolume]) -> None:
    """Let go of the input headers once every volume holds its float32 data and the headers were checked
    (``check_inputs``): deriving reads a small record of each input slice (``node.series.SliceHeader``) and the
    full header of one slice at a time, read again from its file when a derived slice copies from it (with
    ``conform_dataset`` applied, as to the checked one); a long series otherwise held every header, its stored
    and its decoded pixels beside the volume for the whole job (issue #15 item 5). Headers that cannot be read
    again (frames of a multi-frame object, mosaic tiles) stay, without their PixelData, private elements,
    overlays and icon (``node.series.headers``). A multi-frame object shared by several volumes is released only
    after all of them were built (hence here, after ``load_volumes``)."""
    for vol in vols:
        vol.datasets.release(conform_dataset)
    _give_back_memory()


def _give_back_memory() -> None:
    """Collect and hand the C heap's free pages back to the system (glibc ``malloc_trim``; nothing elsewhere).

    The headers and pixels just let go of were small objects spread over the heap: freed, their pages stay
    resident, and the engine's output (its own large mapping) came on top of them. Measured (5000 64² slices,
    issue #15 item 5): without the trim the release gave back nothing (451 -> 450 MB resident); with it,
    396 -> 327 MB."""
    gc.collect()
    try:
        trim = ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):  # not glibc
        return
    trim(0)


def process_series(paths: Sequence[Path], rule: RuleConfig, cfg: Config, out_dir: Path,
                   engine_name: str = "", progress: Callable[[str], None] | None = None,
                   engines: EngineCache | None = None, engine_progress: Progress | None = None,
                   revision: Revision | None = None, room: ResultsRoom | None = None) -> ProcessResult:
    """Super-resolve the series in ``paths`` by ``rule``; write derived + uncertainty files under ``out_dir``.

    A series holding several volumes (``node.series.load_volumes``) gives one derived series per volume (and per
    regular run), in ``derived-vol<k>``; ``rule.volumes`` keeps all or the first; refused volumes are listed in
    ``report["refused"]`` with their files, and input slices in no derived series in ``report["left_out"]``.

    ``engines``: the caller's engine cache (a fresh one when not given); ``progress`` gets one line per step,
    ``engine_progress`` the engine's own long stages (fine-tuning steps, network passes: ``models.engine.Progress``).
    ``revision``: the series' earlier result (``node.derived.iocm.result_revision``): a derived series with other
    UIDs than that result's gets other SeriesNumbers, a replay the same (``node.derived.labels.Revision``).
    Before decoding, ``node.process.budget.check_series`` refuses a series whose pixel data cannot hold what its
    headers declare (VolumeError) or that would need more memory than ``[node] max_series_memory_mb``
    (BudgetError, a VolumeError). ``room`` (the job runner's: ``[node] min_free_mb`` on the spool disk,
    ``node.process.space``): before decoding, a series whose derived pixel data would not fit above the watermark
    is refused, and each file is checked before it is written (ResultsSpaceError, a SpoolError, also for a write
    that fails; the files already written stay: the caller removes ``out_dir``). Raises VolumeError (no volume can be super-resolved), EngineError (even cubic
    failed), DeriveError (a derived object failed its checks) or OSError (a file cannot be written); engine failures
    otherwise fall back to cubic, recorded in ``ProcessResult.fallback``.
    """
    t0 = time.perf_counter()
    engines = engines or EngineCache()
    say = progress or (lambda _msg: None)
    factors = Factors(rule.through_plane_factor, rule.in_plane_factor)
    name = engine_name or rule.engine or cfg.engine.name
    fp = check_series(paths, factors, name, cfg.node.max_series_memory_mb)  # headers only, before any decoding
    if room is not None:  # before the engine runs: the derived pixel data alone must fit above the watermark
        room.check(results_bytes(fp, factors), f"the derived series ({fp.frames} input frame(s) "
                   f"x{factors.through_plane} through-plane x{factors.in_plane} in-plane)")
    try:
        found = load_volumes(paths, inspect=inspect_input)  # each header checked as it is read, not held
    except VolumeError:
        _mixed_patients(paths)  # instances of several patients or studies: that reason matters more
        raise
    for vol in found:
        check_identifiers(vol)
    check_inputs(found)  # one patient and study (else VolumeError); non-conformant copied values dropped, noted
    _release_input_headers(found)
    options = cfg.engine.options
    chosen, notes = _select_volumes(found, rule.volumes)
    volumes, left_out, run_notes, refused = _volumes_of(chosen, factors)
    # images of the series in none of its volumes (a localizer filed in it, a single stray plane): named by file
    left_out = [LeftOut(0, 0, where, sop, why) for where, sop, why in found[0].set_aside] + left_out
    vol_notes = list(dict.fromkeys(n for v in chosen for n in v.notes))
    report: dict[str, Any] = {"input": _describe_input(found), "notes": vol_notes + notes + run_notes,
                              "factors": [factors.through_plane, factors.in_plane], "runs": [],
                              "left_out": [x.as_dict() for x in left_out]}
    if refused:
        report["refused"] = refused
    result = ProcessResult([], [], "", "", name, report=report, left_out=left_out)
    for x in left_out:
        log.warning("series %s: input %s is in no derived series: %s", found[0].series_uid, x.where, x.reason)
    fallbacks: list[str] = []
    for v in volumes:
        tag = (f"volume {v.volume[0]}/{v.volume[1]} ({v.volume_label}) " if v.volume else "") \
            + (f"run {v.run[0]}/{v.run[1]} " if v.run else "")
        say(f"{tag}{v.shape[0]} slices: engine {name}")
        vin = v.to_engine_input()
        sigma_d = None
        if rule.denoise:
            vin, sigma_d, rep = denoise_input(vin, options)
            report.setdefault("denoise", []).append(rep)
        t1 = time.perf_counter()
        er, version = run_engine(engines, name, options, vin, factors, engine_progress)
        if sigma_d is not None:
            add_denoise_sigma(engines, er, sigma_d, options, vin, factors)
            er.report["denoised"] = True  # the derived objects say so, and their UIDs differ from plain SR
        t_engine = time.perf_counter() - t1
        say(f"{tag}deriving {er.data.shape[0]} slices")
        objs = derive_series(v, er, factors, cfg.derive, version,
                             "" if er.engine == "cubic" else settings_digest(options, version), revision,
                             lazy=True)
        suffix = (f"-vol{v.volume[0]}" if v.volume else "") + (f"-run{v.run[0]}" if v.run else "")
        for k, ds in enumerate(objs.derived):  # each slice made as it is written, then dropped (issue #15 item 5)
            p = out_dir / f"derived{suffix}" / f"IM{k + 1:05d}.dcm"
            _write_result(ds, p, room, f"derived slice {k + 1}", out_dir)
            result.derived_files.append(p)
        for ds in objs.uncertainty:  # the Parametric Map (PM00001.dcm) and/or the SC card (SC00001.dcm)
            p = out_dir / f"uncertainty{suffix}" / sigma_file_name(ds)
            _write_result(ds, p, room, f"uncertainty object {p.name}", out_dir)
            result.uncertainty_files.append(p)
        result.derived_series_uids.append(objs.derived_series_uid)
        result.uncertainty_series_uids.append(objs.uncertainty_series_uid)
        if len(objs.uncertainty_series_uids) > 1:
            report.setdefault("sigma_card_series_uids", []).append(objs.uncertainty_series_uids[1])
        result.engine = er.engine
        if er.fallback:  # which volume, when there are several (a fMRI's three fell back with two alike reasons)
            fallbacks.append(f"{tag.strip()}: {er.fallback}" if len(volumes) > 1 and tag else er.fallback)
        report["notes"].extend(n for n in objs.notes if n not in report["notes"])
        report["runs"].append({"volume": v.volume_label, "slices_in": v.shape[0],
                               "input_slices": list(v.run_slices or (1, v.shape[0], v.shape[0])),
                               "slices_out": len(objs.derived),
                               "spacing_out": [round(s, 6) for s in er.spacing], "engine": er.engine,
                               "fallback": er.fallback,
                               "engine_seconds": round(t_engine, 3), "engine_report": er.report,
                               "derived_series_uid": objs.derived_series_uid})
    result.derived_series_uid = result.derived_series_uids[0]
    result.uncertainty_series_uid = result.uncertainty_series_uids[0]
    result.fallback = "; ".join(dict.fromkeys(fallbacks))
    report["seconds"] = round(time.perf_counter() - t0, 3)
    # the short answer first (is it better than cubic, can its sigma be trusted): node.process.summary
    result.report = {"summary": summarize(report, name, result.fallback), **report}
    return result
