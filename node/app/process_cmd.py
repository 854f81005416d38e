"""``srnode process IN_DIR OUT_DIR``: offline, the same pipeline as the node on a folder of DICOM files.

Files are grouped by study and series (StudyInstanceUID + SeriesInstanceUID: two studies sharing a series UID are two
series); each series goes through the configured rules (no caller: every rule may take it) and
``node.process.process_series`` (which refuses a series whose instances belong to more than one patient); one line
per series says what was written, or why not. Results go to ``OUT_DIR/<SeriesUID>/``, or to
``OUT_DIR/<StudyUID>/<SeriesUID>/`` for a series UID found in more than one study.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from pydicom.dataset import Dataset

from node.app.preview import write_preview
from node.config import load_config
from node.errors import NodeError, VolumeError
from node.jobs import match_rule
from node.phi import scrub, series_values
from node.process import EngineCache, ProcessResult, process_series
from node.series import read_header

log = logging.getLogger(__name__)


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("in_dir", metavar="IN_DIR", type=Path, help="folder of DICOM files (searched recursively)")
    parser.add_argument("out_dir", metavar="OUT_DIR", type=Path, help="where derived + uncertainty series go")
    parser.add_argument("--config", default=None, help="config.toml (default: the embedded defaults)")
    parser.add_argument("--engine", default="", help="engine for every series (default: rule / [engine].name)")
    parser.add_argument("--no-preview", action="store_true", help="do not write preview.png per series")


SeriesKey = tuple[str, str]  # (StudyInstanceUID, SeriesInstanceUID)


def group_by_series(in_dir: Path) -> tuple[dict[SeriesKey, list[Path]], dict[SeriesKey, Dataset], list[str]]:
    """Files of ``in_dir`` by (study, series), one header per series, and the files that are not DICOM."""
    groups: dict[SeriesKey, list[Path]] = {}
    headers: dict[SeriesKey, Dataset] = {}
    bad: list[str] = []
    for p in sorted(in_dir.rglob("*")):
        if not p.is_file() or p.name.startswith("."):
            continue
        try:
            hdr = read_header(p)
        except VolumeError as exc:
            bad.append(str(exc))
            continue
        key = (str(hdr.get("StudyInstanceUID", "") or ""), str(hdr.get("SeriesInstanceUID", "") or ""))
        groups.setdefault(key, []).append(p)
        headers.setdefault(key, hdr)
    return groups, headers, bad


def _safe(uid: str) -> str:
    return "".join(c for c in uid if c.isalnum() or c in ".-_") or "no-series-uid"


def run(args: argparse.Namespace) -> int:
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
    engines = EngineCache()
    shared = {uid for _study, uid in groups if sum(1 for k in groups if k[1] == uid) > 1}
    for n, ((study, uid), files) in enumerate(sorted(groups.items(), key=lambda kv: (kv[0][1], kv[0][0])), start=1):
        hdr = headers[(study, uid)]
        in_study = f" of study {study}" if uid in shared else ""
        label = f"[{n}/{total}] series {uid or '(no SeriesInstanceUID)'}{in_study} ({hdr.get('Modality', '?')}, " \
                f"{str(hdr.get('SeriesDescription', '') or '').strip() or 'no description'}, {len(files)} file(s))"
        rule, why = match_rule(cfg, hdr)
        if rule is None:
            print(f"{label}: left alone: {why}")
            continue

        def progress(msg: str, _label: str = label) -> None:
            print(f"{_label}: {msg}", file=sys.stderr, flush=True)

        dest = out_dir / _safe(study) / _safe(uid) if uid in shared else out_dir / _safe(uid)
        try:
            res = process_series(files, rule, cfg, dest, engine_name=args.engine, progress=progress,
                                 engines=engines)
        except NodeError as exc:  # VolumeError, EngineError, DeriveError: the reason in words
            failed += 1
            print(f"{label}: FAILED: {scrub(str(exc), series_values(files))}")  # no patient values
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
        write_preview(files, res.derived_files, res.uncertainty_files, dest / "preview.png")
    except (ImportError, NodeError, OSError, ValueError) as exc:
        log.warning("preview not written: %s", exc)
        return ""
    return f", preview {dest / 'preview.png'}"
