"""What the dashboard shows (``node.app.dashboard``): job rows, a job's preview, the rule dry-run.

No patient data: a job is its UIDs, states, rule, engine, fallback, timings and reasons (reasons were scrubbed of
patient values when recorded, ``node.jobs.runner``); a series is its UIDs, modality, calling AE and counts; the
rule dry-run quotes no value of a patient attribute (``node.jobs.rules``).
"""

from __future__ import annotations

import logging
import os
import secrets
import threading
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydicom import dcmread
from pydicom.datadict import dictionary_VR, tag_for_keyword
from pydicom.dataset import Dataset

from node.app.preview import write_preview
from node.config import Config, RuleConfig
from node.jobs.replay import replay as replay_job
from node.jobs.rules import allowed_rules, match_rule, rule_mismatch
from node.store import Delivery, Index, Job, JobState, Spool
from node.store.prune import (
    PREVIEW,  # in the job's outbox folder, next to its results (never delivered); pruned with them
)

log = logging.getLogger(__name__)

PREVIEW_STATES = (JobState.SENDING, JobState.DELIVERED, JobState.DEAD_LETTER)  # results complete
_preview_lock = threading.Lock()  # one preview at a time: they are CPU work beside the jobs
_INT_VRS = {"US", "SS", "UL", "SL", "UV", "SV"}
_FLOAT_VRS = {"FL", "FD"}
_NOT_PASTABLE = {"SQ", "AT", "OB", "OW", "OF", "OD", "OL", "OV", "UN"}


def when(t: float | None) -> str:
    """Unix seconds as UTC 'YYYY-MM-DD HH:MM:SS' ('' for none)."""
    return time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(t)) if t else ""


def ago(t: float, now: float) -> str:
    """How long ago ``t`` was, in the largest sensible unit ('12 s', '4 min', '3 h', '2 d')."""
    s = max(0.0, now - t)
    for unit, size in (("d", 86400), ("h", 3600), ("min", 60)):
        if s >= 2 * size:
            return f"{s / size:.0f} {unit}"
    return f"{s:.0f} s"


def job_view(job: Job, deliveries: list[Delivery], now: float) -> dict[str, Any]:
    """One job as the templates show it (UIDs, states, rule, engine, fallback, timings, reasons, deliveries)."""
    report = job.report or {}
    runs = report.get("runs") or []
    return {
        "id": job.id, "state": str(job.state), "rule": job.rule, "engine": job.engine, "fallback": job.fallback,
        "reason": job.reason, "series": job.series_uid, "study": job.study_uid, "instances": job.n_instances,
        "attempts": job.attempts, "supersedes": job.supersedes, "derived": job.derived_series_uid,
        "uncertainty": job.uncertainty_series_uid, "derived_all": job.derived_series_uids,
        "uncertainty_all": job.uncertainty_series_uids, "created": when(job.created), "updated": when(job.updated),
        "age": ago(job.created, now), "since_update": ago(job.updated, now),
        "seconds": report.get("seconds"), "engine_seconds": round(sum(float(r.get("engine_seconds", 0) or 0)
                                                                        for r in runs), 3) if runs else None,
        "runs": [{k: r.get(k) for k in ("volume", "slices_in", "slices_out", "engine", "engine_seconds",
                                        "derived_series_uid")} for r in runs],
        "notes": [str(n) for n in report.get("notes") or []],
        "left_out": list(report.get("left_out") or []),
        "deliveries": [{"destination": d.destination, "state": str(d.state), "attempts": d.attempts,
                        "files": len(d.files), "reason": d.reason, "confirm_method": d.confirm_method,
                        "expected": d.expected, "confirmed": d.confirmed, "confirmed_at": when(d.confirmed_at)
                        if d.confirmed_at else None, "confirm_note": d.confirm_note} for d in deliveries],
        "can_retry": job.state in (JobState.FAILED, JobState.DEAD_LETTER),
        "can_replay": job.state in (JobState.DELIVERED, JobState.DEAD_LETTER) and bool(job.rule)
        and not report.get("pruned"),
        "pruned": when(float(report["pruned"])) if report.get("pruned") else None,
        "done": job.state not in (JobState.QUEUED, JobState.PROCESSING, JobState.SENDING),
    }


def jobs_view(index: Index, states: list[JobState], limit: int) -> tuple[list[dict[str, Any]], dict[str, int]]:
    """The latest ``limit`` jobs (in ``states``, when given), newest first, and the count of jobs per state; both
    read by SQLite (every page loaded the whole history before hostile18: 2.5 s and +380 MB at 100,000 jobs)."""
    counts = {str(s): 0 for s in JobState}
    for state, n in index.job_counts().items():
        counts[str(state)] = n
    chosen = index.jobs(states, limit=max(1, limit))[::-1]
    now = time.time()
    return [job_view(j, index.deliveries(j.id), now) for j in chosen], counts


def replay(cfg: Config, index: Index, job: Job) -> tuple[int, str]:
    """The dashboard's Replay: ``node.jobs.replay.replay`` (new job id, or 0 and why not)."""
    return replay_job(cfg, index, job, f"replay of job {job.id}, requested from the dashboard")


# ---------------------------------------------------------------------------------------------------- preview

def job_results(spool: Spool, job: Job) -> tuple[list[Path], list[Path]]:
    """The job's derived and uncertainty files in its outbox folder (empty when none are left there)."""
    d = spool.outbox / f"job-{job.id}"
    return sorted(d.glob("derived*/*.dcm")), sorted(d.glob("uncertainty*/*.dcm"))


def has_preview(spool: Spool, job: Job) -> bool:
    """Whether a preview can be made: the job's results are complete and still in the outbox (not for a job the
    retention pruned, ``node.store.prune``: its results are headers only and its preview was removed with them)."""
    if (job.report or {}).get("pruned"):
        return False
    return job.state in PREVIEW_STATES and bool(job_results(spool, job)[0])


def preview_png(spool: Spool, index: Index, job: Job) -> Path | None:
    """The job's preview PNG (original / derived / uncertainty), made on the first request with
    ``node.app.preview.write_preview`` into the job's outbox folder and kept there (made again when the results
    are newer). None when there are no results or the preview cannot be made (why: in the log only)."""
    if job.state not in PREVIEW_STATES:
        return None
    derived, sigma = job_results(spool, job)
    if not derived:
        return None
    png = spool.outbox / f"job-{job.id}" / PREVIEW
    if (job.report or {}).get("pruned"):  # its results are headers now (a preview would fail on every request)
        return None
    with _preview_lock:
        newest = max(p.stat().st_mtime for p in [*derived, *sigma])
        if png.is_file() and png.stat().st_mtime >= newest:
            return png
        originals = [Path(i.path) for i in index.instances_of(job.series_uid, job.study_uid)]
        tmp = png.with_name(f".preview-{secrets.token_hex(4)}.png")
        try:
            write_preview(originals, derived, sigma, tmp)
            os.replace(tmp, png)
        except Exception as exc:  # noqa: BLE001 - any failure is "no preview"; the node's log masks values
            log.warning("job %d: no preview: %s: %s", job.id, type(exc).__name__, exc)
            return None
        finally:
            tmp.unlink(missing_ok=True)
    return png


# ---------------------------------------------------------------------------------------------------- rules

@dataclass
class DryRun:
    """What the rules say about a header: the rule that takes it (or None) and why, and each rule's verdict."""

    rule: RuleConfig | None = None
    reason: str = ""
    verdicts: list[dict[str, str]] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    source: str = ""


def parse_tags(text: str) -> tuple[Dataset, list[str]]:
    """A header from ``Keyword = value`` lines (a multi-valued element: values separated by a backslash; blank
    lines and lines starting with # are skipped), and the lines that could not be used, in words (keywords and
    line numbers, never the values)."""
    ds, errors = Dataset(), []
    for n, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        key, sep, value = line.partition("=")
        key, value = key.strip(), value.strip().strip('"')
        tag = tag_for_keyword(key) if sep else None
        if tag is None:
            errors.append(f"line {n}: expected 'Keyword = value' with a DICOM keyword"
                          + (f" ({key[:40]!r} is none)" if sep else ""))
            continue
        vr = dictionary_VR(tag)
        if vr in _NOT_PASTABLE:
            errors.append(f"line {n}: {key} (VR {vr}) cannot be given as text")
            continue
        parts: list[Any] = value.split("\\")
        try:
            if vr in _INT_VRS:
                parts = [int(p) for p in parts]
            elif vr in _FLOAT_VRS:
                parts = [float(p) for p in parts]
            with warnings.catch_warnings():
                warnings.simplefilter("error")
                ds.add_new(tag, vr, parts if len(parts) > 1 else parts[0])
        except (ValueError, TypeError, UserWarning):
            errors.append(f"line {n}: {key}: not a valid value for VR {vr}")
    return ds, errors


def spooled_series(index: Index, limit: int = 200) -> list[dict[str, Any]]:
    """The latest ``limit`` series in the spool, newest first: UIDs, modality, calling AE, state, counts (not those
    the retention pruned: no instance of them is left to test a rule on)."""
    rows = [r for r in index.all_series() if str(r["state"]) != "pruned"][-limit:][::-1]
    return [{"key": f"{r['study_uid']}|{r['series_uid']}", "series": r["series_uid"], "study": r["study_uid"],
             "modality": r["modality"], "calling_ae": r["calling_ae"], "state": str(r["state"]),
             "instances": r["n_instances"], "job": r["job_id"]} for r in rows]


def dry_run(cfg: Config, header: Dataset, allowed: frozenset[str] | None = None, caller: str = "") -> DryRun:
    """Which rule ``header`` would get (``node.jobs.rules.match_rule``) and each rule's verdict."""
    rule, reason = match_rule(cfg, header, allowed, caller)
    verdicts = []
    for r in cfg.rules:
        if allowed is not None and r.name not in allowed:
            verdict = f"not allowed for calling AE {caller!r}"
        else:
            verdict = rule_mismatch(r, header) or "matches"
        verdicts.append({"name": r.name, "description": r.description, "verdict": verdict})
    return DryRun(rule=rule, reason=reason, verdicts=verdicts)


def dry_run_series(cfg: Config, index: Index, key: str) -> DryRun:
    """The dry-run on a spooled series (``study|series``): its first instance's header, with the rules its caller
    may use, as the node decides (``node.jobs.decide``)."""
    study, _, series = key.partition("|")
    s = index.series(series, study) if series else None
    instances = index.instances_of(series, study) if s else []
    if s is None or not instances:
        return DryRun(errors=["that series is not in the spool (any more)"])
    try:
        header = dcmread(instances[0].path, stop_before_pixels=True)
    except Exception as exc:  # noqa: BLE001 - a damaged or vanished file: say so, quote nothing of it
        return DryRun(errors=[f"the series' first instance cannot be read ({type(exc).__name__})"])
    run = dry_run(cfg, header, allowed_rules(str(s.get("allowed_rules", ""))), str(s.get("calling_ae", "")))
    run.source = f"series {series} (first of {len(instances)} instance(s), from {s.get('calling_ae') or '?'})"
    return run
