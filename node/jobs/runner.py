"""Running a job: claim it, run ``node.process.process_series`` on its instance files, put the results in the
spool's outbox area and enqueue one delivery per destination. Every outcome is recorded on the job with a
reason. Safe to call from any process that sees the spool (the in-process worker, a Celery worker).

A failure's reason is the boundary where foreign text (pydicom's, highdicom's, an engine's exception messages)
becomes ours: every value of a patient or study attribute the series carries is replaced by ``***`` there
(``node.phi.scrub``) before the reason reaches the index (``srnode status``, GET /jobs), the log or the audit.

A full disk while the results are written (``node.process.space``): the spool's watermark ``[node] min_free_mb``
is checked before the engine runs and before each result file; a failed write (ENOSPC, EIO, ...) or a refusal
removes the job's partial ``outbox/job-<id>`` folder FIRST (giving its space back, so that the index can record
the outcome), then fails the job with one line ("disk full while writing results: ..."); the received instances
stay. Failed jobs are re-queued by ``srnode retry`` (the node does not re-run a failed job by itself). Recording
an outcome is retried for a while (:data:`RECORD_DELAYS_S`) when the index cannot be written; a job still left
'processing' is re-queued at the next start (``Index.requeue_interrupted``).
"""

from __future__ import annotations

import logging
import shutil
import sqlite3
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from node.config import RuleConfig
from node.derived import rejection_notes, result_revision
from node.errors import DeriveError, EngineError, NodeError, SpoolError, VolumeError
from node.jobs.context import JobContext
from node.metrics import Metrics
from node.phi import scrub, series_values
from node.process import (
    BudgetError,
    ResultsRoom,
    ResultsSpaceError,
    describe_write_error,
    process_series,
    write_error,
)
from node.store import Job, JobState, pruned_cover

log = logging.getLogger(__name__)
_T = TypeVar("_T")

# seconds between tries to record a job's outcome while the index cannot be written (its disk full, a lock held
# past sqlite's busy timeout): about 30 s in all, then the error escapes (the worker logs it; the job is re-queued
# at the next start)
RECORD_DELAYS_S = (0.25, 0.5, 1.0, 2.0, 4.0, 8.0, 15.0)
RETRY_HINT = "the job's outbox folder removed; 'srnode retry' re-queues the job once there is room"


def _rule(rules: tuple[RuleConfig, ...], name: str) -> RuleConfig | None:
    return next((r for r in rules if r.name == name), None)


def run_job(ctx: JobContext, job_id: int) -> None:
    """Claim queued job ``job_id`` and run it; its outcome (and reason) is recorded in the index.

    A job that is not queued any more is skipped. Only spool and index failures (SpoolError, OSError,
    sqlite3.Error) escape.
    """
    job = ctx.store.index.claim_job(job_id)
    if job is None:
        log.info("job %s: not queued any more (taken or finished elsewhere), skipped", job_id)
        return
    process_claimed(ctx, job)


def process_claimed(ctx: JobContext, job: Job) -> str:
    """Run a job already claimed ('processing'); returns its new state (a ``JobState`` value).

    'sending' (deliveries enqueued, or originals forwarded when SR failed and the rule forwards them),
    'delivered' (no destinations), 'failed' with the reason, or 'superseded' when the series moved on since the
    job took it (late instances, a later job of the series), checked before it runs and again before its results
    are enqueued: results made from part of a series are removed, never sent. Only spool and index failures (SpoolError,
    OSError, sqlite3.Error) escape.
    """
    cfg, spool, index, audit, metrics = ctx.cfg, ctx.store.spool, ctx.store.index, ctx.audit, ctx.metrics
    t0 = time.monotonic()
    if _moved_on(ctx, job):  # late instances (or a later job) since the decision: the series is decided again
        return JobState.SUPERSEDED
    rule = _rule(cfg.rules, job.rule)
    if rule is None:
        return _fail(ctx, job, f"rule {job.rule!r} is no longer in the configuration", "config")
    inputs = index.instances_of(job.series_uid, job.study_uid)
    state, why = pruned_cover(index, spool.outbox, job.id, {i.sop_uid for i in inputs})
    if state is JobState.FAILED:  # new instances, but pruned ones missing (node.store.prune)
        return _fail(ctx, job, why, "pruned")
    if state is not None:  # a resend of part of a pruned series: its delivered results cover it
        log.warning("job %d (series %s): ignored: %s", job.id, job.series_uid, why)
        _recorded(job, lambda: index.finish_job(job.id, JobState.IGNORED, why))
        metrics.series_processed.labels(outcome="ignored").inc()
        audit.write("job-ignored", job=job.id, series=job.series_uid, reason=why)
        return JobState.IGNORED
    paths = [Path(i.path) for i in inputs]
    revision = result_revision(index, job)  # a superseding result gets other SeriesNumbers
    log.info("job %d: series %s, %d instances, rule %s", job.id, job.series_uid, len(paths), rule.name)
    out_dir = spool.outbox / f"job-{job.id}"
    room = ResultsRoom(spool.outbox, cfg.node.min_free_mb)
    built = False
    try:
        out_dir = spool.job_dir(job.id, fresh=True)
        room.check(0, "the job's results")  # the watermark, before anything is decoded or written
        result = process_series(paths, rule, cfg, out_dir, engines=ctx.engines, revision=revision, room=room)
        built = True
    except ResultsSpaceError as exc:
        return _results_lost(ctx, job, out_dir, str(exc))
    except BudgetError as exc:
        why = f"refused before decoding: {exc}"
        return _originals_only(ctx, job, rule, paths, why) or _fail(ctx, job, why, "budget")
    except VolumeError as exc:
        why = _scrubbed(f"series cannot be a volume: {exc}", paths)
        return _originals_only(ctx, job, rule, paths, why) or _fail(ctx, job, why, "volume")
    except EngineError as exc:
        why = _scrubbed(f"engine failed: {exc}", paths)
        return _originals_only(ctx, job, rule, paths, why) or _fail(ctx, job, why, "engine")
    except DeriveError as exc:
        why = _scrubbed(f"derived series could not be built: {exc}", paths)
        return _originals_only(ctx, job, rule, paths, why) or _fail(ctx, job, why, "derive")
    except NodeError as exc:
        return _fail(ctx, job, _scrubbed(str(exc), paths), type(exc).__name__)
    except Exception as exc:  # noqa: BLE001 - record it on the job, keep the node running
        err = write_error(exc)
        if err is not None:  # ENOSPC, EIO, ...: one line, no traceback
            return _results_lost(ctx, job, out_dir, _scrubbed(describe_write_error(err, spool.root), paths))
        log.exception("job %d: unexpected error", job.id)  # the log's filter masks the traceback's values
        return _fail(ctx, job, _scrubbed(f"internal error: {type(exc).__name__}: {exc}", paths), "internal")
    finally:
        if not built:  # whatever a failed build wrote is never sent: not left to fill the outbox
            _discard(job, out_dir)
    seconds = time.monotonic() - t0
    metrics.job_seconds.labels(stage="process").observe(seconds)
    if _moved_on(ctx, job):  # instances arrived (or a later job was made) while it ran: never sent, removed
        _discard(job, out_dir)
        return JobState.SUPERSEDED
    files = [str(p) for p in [*result.derived_files, *result.uncertainty_files]]
    notes: dict[str, list[Path]] = {}
    notes_said: dict[str, str] = {}
    try:  # a reprocess after late instances: retire the earlier results in PACS (IOCM rejection note), at each
        # destination where they had a delivery (never a note naming instances a destination never held)
        room.check(0, "the rejection note")
        notes, notes_said = rejection_notes(index, spool.outbox, job, result.derived_series_uid, cfg.derive, out_dir,
                                            rule.destinations, configured={d.name for d in cfg.destinations})
    except ResultsSpaceError as exc:
        return _results_lost(ctx, job, out_dir, str(exc))
    except NodeError as exc:
        log.warning("job %d: no rejection note for the superseded job: %s", job.id, exc)
    except OSError as exc:
        return _results_lost(ctx, job, out_dir, _scrubbed(describe_write_error(exc, spool.root), paths))
    per_dest = {d: files + [str(p) for p in notes.get(d, [])] + ([str(p) for p in paths] if rule.forward_originals
                                                                 else []) for d in rule.destinations}
    # a configured destination the rule no longer names, holding results the note retires: the note alone
    per_dest.update({d: [str(p) for p in ps] for d, ps in notes.items() if d not in per_dest})
    report = dict(result.report or {})
    if notes_said:  # per destination: "sent", or why no note went there (NOT_SENT ...)
        report["rejection_notes"] = notes_said
    # for the next result's revision (node.derived.labels.Revision)
    report["revision"] = revision.of(result.derived_series_uid)
    report["derived_series_uids"] = result.derived_series_uids or [result.derived_series_uid]
    report["uncertainty_series_uids"] = result.uncertainty_series_uids or [result.uncertainty_series_uid]
    report["inputs"] = len(paths)
    report.setdefault("seconds", round(seconds, 3))
    report.setdefault("derived_files", len(result.derived_files))
    report.setdefault("uncertainty_files", len(result.uncertainty_files))
    report["left_out"] = [x.as_dict() for x in result.left_out]  # input slices in no derived series, with why
    missing = _declared_shortfall(ctx, job, len(paths), report)  # fewer instances than the series declares
    state = JobState.SENDING if per_dest else JobState.DELIVERED
    reason = "" if per_dest else "rule has no destinations; results kept in the spool"
    try:  # the deliveries and the job's new state: one transaction (never one without the other), tried again
        # for a while when the index cannot take it yet
        _recorded(job, lambda: index.enqueue_results(
            job.id, per_dest, state, reason, derived_series_uid=result.derived_series_uid,
            uncertainty_series_uid=result.uncertainty_series_uid, engine=result.engine,
            fallback=result.fallback or "", report=report), "its results are removed and the job failed")
    except (SpoolError, sqlite3.Error) as exc:  # e.g. "database or disk is full": nothing was recorded
        return _results_lost(ctx, job, out_dir, f"the results could not be recorded in the index: {exc}")
    metrics.series_processed.labels(outcome="processed").inc()
    _gpu_peak(metrics)
    log.info("job %d: %d derived + %d uncertainty objects in %.1f s (engine %s%s); %s", job.id,
             len(result.derived_files), len(result.uncertainty_files), seconds, result.engine,
             f", fallback: {result.fallback}" if result.fallback else "",
             f"to {', '.join(per_dest)}" if per_dest else reason)
    audit.write("job-processed", job=job.id, series=job.series_uid, derived_series=result.derived_series_uid,
                uncertainty_series=result.uncertainty_series_uid, engine=result.engine,
                fallback=result.fallback or "", seconds=round(seconds, 2), destinations=list(per_dest),
                left_out=[x.file for x in result.left_out], missing_declared=missing)
    return state


def _declared_shortfall(ctx: JobContext, job: Job, inputs: int, report: dict[str, Any]) -> int:
    """How many instances the series declares (ImagesInAcquisition, a puller, the HTTP hint) beyond the
    ``inputs`` the job was made from (0: none declared, or no fewer). The job came from the quiet period without
    them: its derived series may lack slices yet looks complete, so ``report`` says so (``declared``: instances,
    by, missing; ``incomplete``: in words, shown by ``srnode status``) and a warning is logged."""
    row = ctx.store.index.series(job.series_uid, job.study_uid) or {}
    declared = row.get("declared_instances")
    if declared is None or int(declared) <= inputs:
        return 0
    missing, by = int(declared) - inputs, str(row.get("declared_by") or "")
    report["declared"] = {"instances": int(declared), "by": by, "missing": missing}
    report["incomplete"] = (f"made from {inputs} of the {declared} instance(s) the series declares ({by}); {missing} "
                            f"never came (quiet for stable_age_s {ctx.cfg.node.stable_age_s:g} s)")
    log.warning("job %d (series %s): %s", job.id, job.series_uid, report["incomplete"])
    return missing


def _moved_on(ctx: JobContext, job: Job) -> bool:
    """Whether ``job``'s series moved on since the job took it (``Index.supersede_if_moved_on``: late instances,
    or a later job of the series on another worker); if so the job is now 'superseded', logged and audited, and
    nothing of it is sent: a derived series made from part of a series never reaches a destination."""
    reason = _recorded_value(job, lambda: ctx.store.index.supersede_if_moved_on(job.id))
    if not reason:
        return False
    log.warning("job %d (series %s): superseded: %s", job.id, job.series_uid, reason)
    ctx.metrics.series_processed.labels(outcome="superseded").inc()
    ctx.audit.write("job-superseded", job=job.id, series=job.series_uid, reason=reason)
    return True


def _scrubbed(reason: str, paths: list[Path]) -> str:
    """``reason`` (an exception's text) without any patient or study value of the series' files."""
    return scrub(reason, series_values(paths))


def _gpu_peak(metrics: Metrics) -> None:
    """Publish the engine's peak GPU memory of the last job (only when torch is loaded and sees a GPU)."""
    torch: Any = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available():
        metrics.gpu_memory_bytes.set(torch.cuda.max_memory_allocated())
        torch.cuda.reset_peak_memory_stats()


def _originals_only(ctx: JobContext, job: Job, rule: RuleConfig, paths: list[Path], why: str) -> str:
    """The last fallback: a rule that forwards originals still forwards them when SR cannot be applied, so the
    study reaches PACS; the job says "SR not applied" and why. Returns '' when the rule forwards nothing."""
    if not (rule.forward_originals and rule.destinations and paths):
        return ""
    note = f"SR not applied: {why}; originals forwarded unchanged"
    index = ctx.store.index
    index.enqueue_results(job.id, {d: [str(p) for p in paths] for d in rule.destinations}, JobState.SENDING, "",
                          engine="none", fallback=note)  # one transaction: never deliveries of a job 'processing'
    ctx.metrics.series_processed.labels(outcome="originals-only").inc()
    log.warning("job %d (series %s): %s", job.id, job.series_uid, note)
    ctx.audit.write("job-processed", job=job.id, series=job.series_uid, engine="none", fallback=note,
                    destinations=list(rule.destinations))
    return JobState.SENDING


def _results_lost(ctx: JobContext, job: Job, out_dir: Path, why: str) -> str:
    """The job's results could not be written (``why``: one line): its partial outbox folder is removed first
    (its space back, for the index to record this), then the job fails with the reason. The received instances
    stay. Returns 'failed'."""
    _discard(job, out_dir)
    return _fail(ctx, job, f"{why}; {RETRY_HINT}", "disk")


def _discard(job: Job, out_dir: Path) -> None:
    """Remove the job's partial outbox folder (a build that failed part-way: e.g. an input file replaced under
    it, the engine failing after the first volume); an error is logged, not raised."""
    try:
        shutil.rmtree(out_dir)
    except FileNotFoundError:
        pass
    except OSError as exc:
        log.error("job %d: its partial results in %s cannot be removed: %s", job.id, out_dir, exc)


_STAYS = "it stays 'processing' until the node restarts and re-queues it"


def _recorded(job: Job, record: Callable[[], None], then: str = _STAYS) -> None:
    """Run ``record`` (an index write of the job's outcome), trying again after each of :data:`RECORD_DELAYS_S`
    while the index cannot be written (SpoolError, sqlite3.Error: its disk full, a lock held); the last error
    escapes (logged with ``then``: what happens next)."""
    _recorded_value(job, record, then)


def _recorded_value(job: Job, record: Callable[[], _T], then: str = _STAYS) -> _T:
    """As :func:`_recorded`, returning what ``record`` returns."""
    for delay in (*RECORD_DELAYS_S, None):
        try:
            return record()
        except (SpoolError, sqlite3.Error) as exc:
            if delay is None:
                log.error("job %d: its outcome could not be recorded (%s); %s", job.id, exc, then)
                raise
            log.warning("job %d: its outcome cannot be recorded yet (%s); trying again in %.2f s", job.id, exc,
                        delay)
            time.sleep(delay)
    raise AssertionError("unreachable")  # the last try returns or raises


def _fail(ctx: JobContext, job: Job, reason: str, category: str) -> str:
    log.warning("job %d (series %s): failed: %s", job.id, job.series_uid, reason)
    _recorded(job, lambda: ctx.store.index.finish_job(job.id, JobState.FAILED, reason))
    ctx.metrics.series_processed.labels(outcome="failed").inc()
    ctx.metrics.failures.labels(where="job", reason=category).inc()
    ctx.audit.write("job-failed", job=job.id, series=job.series_uid, reason=reason)
    return JobState.FAILED
