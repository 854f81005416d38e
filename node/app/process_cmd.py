"""``srnode process IN_DIR OUT_DIR``: offline, the same pipeline as the node on a folder of DICOM files.

IN_DIR may also be one DICOM file. Files are grouped by study and series (StudyInstanceUID + SeriesInstanceUID: two
studies sharing a series UID are two series); each series goes through the configured rules (no caller: every rule
may take it) and ``node.process.process_series`` (which refuses a series whose instances belong to more than one
patient); one line per series says what was written, or why not, followed by one "NOT IN ANY DERIVED SERIES" line
per input slice that no derived series holds (file and reason), and ``report.json`` in the series' output folder
keeps the same (the job report, a refusal or "left alone" with the reason), for ``srnode check``.
A DICOM data set without the 128-byte preamble and 'DICM' is read as DICOM (``node.dicom_read``). A file that is
not DICOM is a FAILED line naming it (it may be a DICOM file cut short) unless it is recognisably
something else (``node.app.not_dicom``): srnode's own report.json / preview.png (IN_DIR may be an earlier OUT_DIR,
whose derived series are left alone), text, PDF, images, archives, a DICOMDIR; those are named on a "skipped" line. Results go to
``OUT_DIR/<SeriesUID>/``, or to ``OUT_DIR/<StudyUID>/<SeriesUID>/`` for a series UID found in more than one study.
On a terminal a progress bar per series names the stage (``node.app.progress``).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import shutil
from pathlib import Path

from pydicom.dataset import Dataset

from node.app.not_dicom import other_format, own_side_file
from node.app.preview import write_preview
from node.app.progress import SeriesBar, logs_through_bars
from node.app.progress import wanted as progress_bar_wanted
from node.config import Config, load_config
from node.errors import NodeError, VolumeError
from node.ingest import size_hint
from node.jobs import match_rule, series_header
from node.phi import scrub, series_values
from node.process import EngineCache, ProcessResult, process_series, write_error
from node.series import is_localizer, read_header
from node.store import HEADER_DECLARED, SizeHint

log = logging.getLogger(__name__)


def configure(parser: argparse.ArgumentParser) -> None:
    """Add ``srnode process`` options to ``parser``."""
    parser.add_argument("in_dir", metavar="IN_DIR", type=Path,
                        help="folder of DICOM files (searched recursively), or one DICOM file")
    parser.add_argument("out_dir", metavar="OUT_DIR", type=Path, help="where derived + uncertainty series go")
    parser.add_argument("--config", default=None, help="config.toml (default: the embedded defaults)")
    parser.add_argument("--engine", default="", help="engine for every series (default: rule / [engine].name)")
    parser.add_argument("--no-preview", action="store_true", help="do not write preview.png per series")
    parser.add_argument("--quiet", action="store_true",
                        help="no progress bar (there is none either when stderr is not a terminal)")


SeriesKey = tuple[str, str]  # (StudyInstanceUID, SeriesInstanceUID)


@dataclasses.dataclass
class Found:
    """The files of IN_DIR: by (study, series), one header per series, failures and skipped files as lines."""

    groups: dict[SeriesKey, list[Path]]
    headers: dict[SeriesKey, Dataset]
    bad: list[str]  # "<file>: <why>": not readable as DICOM and maybe a DICOM file cut short (data lost)
    skipped: list[str]  # "<file>: <what it is>": recognisably not an image of a series (nothing lost)
    own: list[str]  # srnode's own side files (report.json, preview.png), relative paths
    # per series: (SOPInstanceUID, what its header says of the series' size) of each file (``declared_size``)
    sizes: dict[SeriesKey, list[tuple[str, SizeHint]]] = dataclasses.field(default_factory=dict)


def group_by_series(in_dir: Path) -> Found:
    """Files of ``in_dir`` by (study, series), one header per series, the files that failed and those skipped.

    ``in_dir`` may be a single file (an enhanced multi-frame object holds a whole series); one that is not DICOM
    raises VolumeError, as does a path that does not exist.
    """
    if not in_dir.exists():
        raise VolumeError(f"{in_dir}: does not exist")
    if in_dir.is_file():
        hdr = read_header(in_dir)  # VolumeError: not DICOM
        key = (str(hdr.get("StudyInstanceUID", "") or ""), str(hdr.get("SeriesInstanceUID", "") or ""))
        return Found({key: [in_dir]}, {key: hdr}, [], [], [],
                     {key: [(str(hdr.get("SOPInstanceUID", "") or ""), size_hint(hdr))]})
    if not in_dir.is_dir():
        raise VolumeError(f"{in_dir}: neither a folder nor a file")
    found = Found({}, {}, [], [], [])
    for p in sorted(in_dir.rglob("*")):
        if not p.is_file() or p.name.startswith("."):
            continue
        rel = str(p.relative_to(in_dir))
        try:
            hdr = read_header(p)
        except VolumeError as exc:
            if own_side_file(p):
                found.own.append(rel)
            elif what := other_format(p):
                found.skipped.append(f"{rel}: {what}, not DICOM")
            elif p.stat().st_size == 0:
                found.bad.append(f"{p.name}: an empty file (0 bytes), not a DICOM file; a copy that failed?")
            else:
                found.bad.append(str(exc))
            continue
        if _is_dicomdir(hdr):  # the index of a DICOM medium (CD export): lists the files, holds no image
            found.skipped.append(f"{rel}: a DICOMDIR, the index of a DICOM medium (no image)")
            continue
        if "SeriesInstanceUID" not in hdr:
            # pydicom reads a file cut inside its header (or with an element length running past its end) as a
            # partial header without complaint; every image has a SeriesInstanceUID, so name the file here
            found.bad.append(f"{p.name}: no SeriesInstanceUID in its header ({p.stat().st_size} bytes): a truncated "
                             "or corrupt file (an element cut short or with a wrong length); it is in no series")
            continue
        key = (str(hdr.get("StudyInstanceUID", "") or ""), str(hdr.get("SeriesInstanceUID", "") or ""))
        found.groups.setdefault(key, []).append(p)
        found.sizes.setdefault(key, []).append((str(hdr.get("SOPInstanceUID", "") or ""), size_hint(hdr)))
        if key not in found.headers or (is_localizer(found.headers[key]) and not is_localizer(hdr)):
            found.headers[key] = hdr  # the rules match on an image of the series, not on a scout filed in it
    return found


def declared_size(sizes: list[tuple[str, SizeHint]]) -> tuple[int, int]:
    """(instances the series declares, distinct instances found) from each file's (SOPInstanceUID, size hint);
    (0, n) when nothing is declared. As the node's index (``node.store.Index.add_instance``): a size is declared
    only when every file's header says the same (ImagesInAcquisition, NumberOfFrames and AcquisitionNumber alike:
    one acquisition); a copy of an instance counts once."""
    distinct = len({sop for sop, _ in sizes})
    signatures = {hint.signature for _, hint in sizes}
    if len(signatures) != 1 or not sizes[0][1].signature or sizes[0][1].instances <= 0:
        return 0, distinct
    return sizes[0][1].instances, distinct


def _is_dicomdir(hdr: Dataset) -> bool:
    meta = getattr(hdr, "file_meta", None)
    return str(meta.get("MediaStorageSOPClassUID", "") if meta is not None else "") == "1.2.840.10008.1.3.10"


def _safe(uid: str) -> str:
    return "".join(c for c in uid if c.isalnum() or c in ".-_") or "no-series-uid"


def run(args: argparse.Namespace) -> int:
    """Run ``srnode process``; returns the exit code (1 when a file or series failed or nothing was found).
    VolumeError when IN_DIR is not a folder; ConfigError for a bad config."""
    cfg = load_config(args.config)
    in_dir, out_dir = Path(args.in_dir), Path(args.out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise VolumeError(f"{out_dir}: OUT_DIR exists and is not a folder")
    found = group_by_series(in_dir)
    groups, headers = found.groups, found.headers
    failed = 0
    for reason in found.bad:
        print(f"FAILED {reason}")
        failed += 1
    for what in found.skipped:
        print(f"skipped {what}")
    if found.own:
        shown = ", ".join(found.own[:4]) + (f" and {len(found.own) - 4} more" if len(found.own) > 4 else "")
        print(f"skipped {len(found.own)} file(s) srnode writes beside its output ({shown})")
    if not groups:
        if not found.bad and not found.skipped and not found.own:
            raise VolumeError(f"{in_dir}: no files in this folder")
        print(f"no DICOM series found in {in_dir}")
        return 1
    bars = progress_bar_wanted(args.quiet)
    with logs_through_bars(bars):
        return _process(cfg, groups, headers, out_dir, args, bars, failed, found.sizes)


def _process(cfg: Config, groups: dict[SeriesKey, list[Path]], headers: dict[SeriesKey, Dataset], out_dir: Path,
             args: argparse.Namespace, bars: bool, failed: int,
             sizes: dict[SeriesKey, list[tuple[str, SizeHint]]] | None = None) -> int:
    """Each series through its rule; one result line per series on stdout. Returns the exit status.

    A series whose headers declare more instances than IN_DIR holds (``declared_size``) is derived from what is
    there, and says so as the node's job does (``INCOMPLETE: made from 27 of the 28 instance(s) the series declares
    (ImagesInAcquisition) ...``: a line, a WARNING and the report's ``declared`` / ``incomplete``): a slice missing at
    either end of the stack leaves no gap for the irregular-step note to see."""
    total = len(groups)
    engines = EngineCache()
    shared = {uid for _study, uid in groups if sum(1 for k in groups if k[1] == uid) > 1}
    for n, ((study, uid), files) in enumerate(sorted(groups.items(), key=lambda kv: (kv[0][1], kv[0][0])), start=1):
        hdr = headers[(study, uid)]
        in_study = f" of study {study}" if uid in shared else ""
        label = f"[{n}/{total}] series {uid or '(no SeriesInstanceUID)'}{in_study} ({hdr.get('Modality', '') or 'no Modality'}, " \
                f"{str(hdr.get('SeriesDescription', '') or '').strip() or 'no description'}, {len(files)} file(s))"
        match_hdr, taken = series_header(cfg, hdr, files[1:])  # files[0]: the file ``hdr`` was read from
        rule, why = match_rule(cfg, match_hdr)
        why += f"; {taken}" if taken else ""
        dest = out_dir / _safe(study) / _safe(uid) if uid in shared else out_dir / _safe(uid)
        names = sorted(p.name for p in files)
        if rule is None:
            print(f"{label}: left alone: {why}")
            _write_report(dest, {"series": uid, "files": names, "left_alone": why})
            continue

        bar = SeriesBar(f"[{n}/{total}] {hdr.get('Modality', '') or 'no Modality'} {len(files)} file(s)", bars)
        partial = dest.parent / f".{dest.name}.partial-{os.getpid()}"  # written here, moved into dest when whole
        shutil.rmtree(partial, ignore_errors=True)
        try:
            res = process_series(files, rule, cfg, partial, engine_name=args.engine, progress=bar.stage,
                                 engines=engines, engine_progress=bar.engine if bars else None)
            res = _move_into(res, partial, dest)
        except NodeError as exc:  # VolumeError, EngineError, DeriveError: the reason in words
            bar.close()
            failed += 1
            why = scrub(str(exc), series_values(files))  # no patient values
            print(f"{label}: FAILED: {why}")
            _write_report(dest, {"series": uid, "files": names, "failed": why})
            continue
        except OSError as exc:  # the output's disk (full, read-only): the run stops, naming where and how far
            bar.close()
            done = f"the {n - 1} series before it are complete in {out_dir}" if n > 1 else "no series written"
            # the system's error under pydicom's re-raise ("With tag (7FE0,0010) got exception: ... Traceback ...")
            cause = write_error(exc) or exc
            text = cause.strerror or " ".join(str(cause).splitlines()[:1]) or type(cause).__name__
            raise OSError(cause.errno, f"{text} (writing series {n} of {total}: nothing of it kept; {done})",
                          cause.filename or str(dest)) from exc
        finally:  # a build that failed part-way leaves nothing: no partial derived series beside a "failed" report
            shutil.rmtree(partial, ignore_errors=True)
        bar.close()
        declared, distinct = declared_size((sizes or {}).get((study, uid), []))
        incomplete = ""
        if declared > distinct:
            incomplete = (f"made from {distinct} of the {declared} instance(s) the series declares "
                          f"({HEADER_DECLARED}); {declared - distinct} not in {args.in_dir}: the derived series may "
                          "lack slices (at either end of the stack, or a gap) yet looks complete")
            res.report["declared"] = {"instances": declared, "by": HEADER_DECLARED, "missing": declared - distinct}
            res.report["incomplete"] = incomplete
            log.warning("series %s: %s", uid, incomplete)
        summary = res.report.get("summary", {})
        if incomplete and summary:  # the summary says it too: a derived series made from part of its series
            summary = {**summary, "incomplete": incomplete, "line": f"{summary['line']}; INCOMPLETE input"}
        _write_report(dest, {"summary": summary, "series": uid, "files": names, "rule": rule.name,
                             "report": {k: v for k, v in res.report.items() if k != "summary"}})
        preview = ""
        if not args.no_preview:
            preview = _write_preview(files, res, dest)
        fb = f", fallback: {res.fallback}" if res.fallback else ""
        unc = (f"{len(res.uncertainty_files)} uncertainty -> {sorted({str(p.parent) for p in res.uncertainty_files})}"
               if res.uncertainty_files else "no uncertainty object (no sigma from the engine, or [derive] "
               "uncertainty = \"none\")")
        print(f"{label}: rule {rule.name}: {len(res.derived_files)} derived -> "
              f"{sorted({str(p.parent) for p in res.derived_files})}, {unc} (engine {res.engine}{fb}, "
              f"{res.report.get('seconds', 0):.1f} s){preview}")
        if incomplete:
            print(f"{label}: INCOMPLETE: {incomplete}")
        if summary.get("line"):  # the short answer (docs/commands.md "report.json")
            print(f"    summary: {summary['line']}")
        for line in res.left_out_lines():
            print(f"{label}: NOT IN ANY DERIVED SERIES: {line}")
        for why in res.report.get("refused", []):  # volumes of the series that could not be super-resolved
            failed += 1
            print(f"{label}: FAILED: {why}")
    return 1 if failed else 0


def _move_into(res: ProcessResult, partial: Path, dest: Path) -> ProcessResult:
    """Move the complete result folders from ``partial`` into ``dest`` (each replacing the folder of the same name
    from an earlier run, so that no series mixes two runs' slices); ``res`` with its paths under ``dest``."""
    dest.mkdir(parents=True, exist_ok=True)
    for child in sorted(partial.iterdir()) if partial.is_dir() else []:
        target = dest / child.name
        if target.is_dir():
            shutil.rmtree(target)
        elif target.exists():
            target.unlink()
        os.replace(child, target)

    def moved(paths: list[Path]) -> list[Path]:
        return [dest / p.relative_to(partial) for p in paths]

    return dataclasses.replace(res, derived_files=moved(res.derived_files),
                               uncertainty_files=moved(res.uncertainty_files))


def _write_report(dest: Path, record: dict[str, object]) -> None:
    """``dest/report.json``: what was done with the series, or why not (``srnode check`` reads it)."""
    dest.mkdir(parents=True, exist_ok=True)
    (dest / "report.json").write_text(json.dumps(record, indent=1, default=str))


def _write_preview(files: list[Path], res: ProcessResult, dest: Path) -> str:
    try:
        write_preview(files, res.derived_files, res.uncertainty_files, dest / "preview.png")
    except (ImportError, NodeError, OSError, ValueError) as exc:
        log.warning("preview not written: %s", exc)
        return ""
    return f", preview {dest / 'preview.png'}"
