"""From a stable series to results in the outbox.

- ``StabilityWatcher``: a thread that turns a series quiet for ``[node].stable_age_s`` into a job (or records
  why it is left alone), and (re)submits queued jobs to the executor; an association release only wakes it.
- ``run_job(cfg, job_id)``: claims a queued job, runs ``node.pipeline.process_series`` on its instance files,
  writes the results into the spool's outbox area and enqueues one delivery per destination. Every outcome is
  recorded on the job with a reason. Safe to call from any process that sees the spool.
"""

from __future__ import annotations

import logging
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pydicom import dcmread

from node.audit import AuditLog
from node.config import Config, RuleConfig
from node.errors import DeriveError, EngineError, NodeError, VolumeError
from node.index import Index, Job
from node.metrics import METRICS
from node.spool import Spool

log = logging.getLogger(__name__)

_OPEN: dict[str, tuple[Spool, Index]] = {}
_OPEN_LOCK = threading.Lock()


def open_spool(cfg: Config) -> tuple[Spool, Index]:
    """The spool and index of ``cfg`` (one pair per process and spool folder)."""
    key = str(cfg.spool_path.resolve())
    with _OPEN_LOCK:
        if key not in _OPEN:
            spool = Spool(cfg.spool_path, cfg.node.min_free_mb)
            _OPEN[key] = (spool, Index(spool.index_path))
        return _OPEN[key]


def audit_log(cfg: Config) -> AuditLog:
    return AuditLog(cfg.node.audit_log or cfg.spool_path / "audit.log")


def _rule(cfg: Config, name: str) -> RuleConfig | None:
    return next((r for r in cfg.rules if r.name == name), None)


# ------------------------------------------------------------------------------------------ deciding


def decide(cfg: Config, index: Index, series_uid: str, audit: AuditLog | None = None) -> int | None:
    """A stable series: match the rules on its first instance's header; returns the queued job id or None."""
    from node.rules import match_rule

    s = index.series(series_uid) or {}
    instances = index.instances_of(series_uid)
    if audit:
        audit.write("series-received", series=series_uid, study=s.get("study_uid", ""), instances=len(instances),
                    modality=s.get("modality", ""), calling_ae=s.get("calling_ae", ""))
    rule: RuleConfig | None = None
    try:
        header = dcmread(instances[0].path, stop_before_pixels=True)
        rule, reason = match_rule(cfg, header, str(s.get("calling_ae", "")))
    except Exception as exc:  # noqa: BLE001 - a broken first instance or rule: record it, keep watching
        reason = f"cannot match the rules on the series' first instance: {type(exc).__name__}: {exc}"
        job_id = index.create_job(series_uid, "", state="failed", reason=reason)
        log.warning("series %s: job %d failed: %s", series_uid, job_id, reason)
        if audit:
            audit.write("job-decision", job=job_id, series=series_uid, instances=len(instances),
                        decision="failed", reason=reason)
        return None
    allowed = [r for r in str(s.get("allowed_rules", "")).split(",") if r]
    if rule is not None and allowed and rule.name not in allowed:
        reason = f"rule {rule.name!r} is not allowed for calling AE {s.get('calling_ae', '')!r}"
        rule = None
    if rule is None:
        if not reason.startswith("no rule matched"):
            reason = f"no rule matched: {reason}"
        job_id = index.create_job(series_uid, "", state="ignored", reason=reason)
        log.info("series %s (%d instances): left alone: %s", series_uid, len(instances), reason)
        if audit:
            audit.write("job-decision", job=job_id, series=series_uid, instances=len(instances),
                        decision="ignored", reason=reason)
        return None
    job_id = index.create_job(series_uid, rule.name, reason=reason if isinstance(reason, str) else "")
    log.info("series %s (%d instances): job %d queued (rule %s)", series_uid, len(instances), job_id, rule.name)
    if audit:
        audit.write("job-decision", job=job_id, series=series_uid, instances=len(instances), decision="queued",
                    rule=rule.name, calling_ae=s.get("calling_ae", ""))
    return job_id


class StabilityWatcher:
    """Polls the index: quiet series become jobs; queued jobs are handed to ``submit``."""

    def __init__(self, cfg: Config, index: Index, submit: Callable[[int], None],
                 audit: AuditLog | None = None) -> None:
        self.cfg, self.index, self.submit, self.audit = cfg, index, submit, audit
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._submitted: dict[int, float] = {}  # job id -> its 'updated' time when last submitted

    def hint(self) -> None:
        """An association was released: look now (the series must still be quiet for stable_age_s)."""
        self._wake.set()

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="srnode-stability", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(30)

    def tick(self) -> None:
        now = time.time()
        quiet_since = now - self.cfg.node.stable_age_s
        for series_uid in self.index.quiet_series(quiet_since):
            if self.index.mark_stable(series_uid, quiet_since):
                try:
                    decide(self.cfg, self.index, series_uid, self.audit)
                except NodeError as exc:
                    log.error("series %s: could not decide what to do: %s", series_uid, exc)
        for job in self.index.jobs(("queued",)):
            if self._submitted.get(job.id) != job.updated:
                self._submitted[job.id] = job.updated
                try:
                    self.submit(job.id)
                except NodeError as exc:
                    log.error("job %d: could not be submitted (stays queued): %s", job.id, exc)
                    del self._submitted[job.id]
        METRICS.queue_depth.set(self.index.queue_depth())

    def _loop(self) -> None:
        interval = min(0.5, self.cfg.node.stable_age_s / 4)
        while not self._stop.is_set():
            try:
                self.tick()
            except Exception as exc:  # noqa: BLE001 - keep watching; the index may be busy for a moment
                log.exception("stability watcher: %s", exc)
            self._wake.wait(interval)
            self._wake.clear()


# ------------------------------------------------------------------------------------------ running a job


def run_job(cfg: Config, job_id: int) -> None:
    """Claim queued job ``job_id`` and run it; its outcome (and reason) is recorded in the index."""
    spool, index = open_spool(cfg)
    job = index.claim_job(job_id)
    if job is None:
        log.info("job %s: not queued any more (taken or finished elsewhere), skipped", job_id)
        return
    process_claimed(cfg, spool, index, job)


def process_claimed(cfg: Config, spool: Spool, index: Index, job: Job, audit: AuditLog | None = None) -> str:
    """Run a job already claimed ('processing'); returns its new state."""
    audit = audit or audit_log(cfg)
    t0 = time.monotonic()
    rule = _rule(cfg, job.rule)
    if rule is None:
        return _fail(index, job, f"rule {job.rule!r} is no longer in the configuration", audit, "config")
    paths = [Path(i.path) for i in index.instances_of(job.series_uid)]
    out_dir = spool.job_dir(job.id, fresh=True)
    log.info("job %d: series %s, %d instances, rule %s", job.id, job.series_uid, len(paths), rule.name)
    try:
        from node.pipeline import process_series

        result: Any = process_series(paths, rule, cfg, out_dir)
    except VolumeError as exc:
        why = f"series cannot be a volume: {exc}"
        return _originals_only(index, job, rule, paths, why, audit) or _fail(index, job, why, audit, "volume")
    except EngineError as exc:
        why = f"engine failed: {exc}"
        return _originals_only(index, job, rule, paths, why, audit) or _fail(index, job, why, audit, "engine")
    except DeriveError as exc:
        why = f"derived series could not be built: {exc}"
        return _originals_only(index, job, rule, paths, why, audit) or _fail(index, job, why, audit, "derive")
    except NodeError as exc:
        return _fail(index, job, str(exc), audit, type(exc).__name__)
    except Exception as exc:  # noqa: BLE001 - record it on the job, keep the node running
        log.exception("job %d: unexpected error", job.id)
        return _fail(index, job, f"internal error: {type(exc).__name__}: {exc}", audit, "internal")
    seconds = time.monotonic() - t0
    METRICS.job_seconds.labels(stage="process").observe(seconds)
    files = [str(p) for p in [*result.derived_files, *result.uncertainty_files]]
    try:  # a reprocess after late instances: retire the earlier results in PACS (IOCM rejection note)
        from node.iocm import reject_superseded

        files += [str(p) for p in reject_superseded(index, spool.outbox, job, result.derived_series_uid,
                                                    cfg.derive, out_dir)]
    except NodeError as exc:
        log.warning("job %d: no rejection note for the superseded job: %s", job.id, exc)
    per_dest = {d: files + ([str(p) for p in paths] if rule.forward_originals else []) for d in rule.destinations}
    index.add_deliveries(job.id, per_dest)
    report = dict(result.report or {})
    report.setdefault("seconds", round(seconds, 3))
    report.setdefault("derived_files", len(result.derived_files))
    report.setdefault("uncertainty_files", len(result.uncertainty_files))
    state = "sending" if per_dest else "delivered"
    reason = "" if per_dest else "rule has no destinations; results kept in the spool"
    index.finish_job(job.id, state, reason, derived_series_uid=result.derived_series_uid,
                     uncertainty_series_uid=result.uncertainty_series_uid, engine=result.engine,
                     fallback=result.fallback or "", report=report)
    METRICS.series_processed.labels(outcome="processed").inc()
    _gpu_peak()
    log.info("job %d: %d derived + %d uncertainty objects in %.1f s (engine %s%s); %s", job.id,
             len(result.derived_files), len(result.uncertainty_files), seconds, result.engine,
             f", fallback: {result.fallback}" if result.fallback else "",
             f"to {', '.join(per_dest)}" if per_dest else reason)
    audit.write("job-processed", job=job.id, series=job.series_uid, derived_series=result.derived_series_uid,
                uncertainty_series=result.uncertainty_series_uid, engine=result.engine,
                fallback=result.fallback or "", seconds=round(seconds, 2), destinations=list(per_dest))
    return state


def _gpu_peak() -> None:
    """Publish the engine's peak GPU memory of the last job (only when torch is loaded and sees a GPU)."""
    torch: Any = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available():
        METRICS.gpu_memory_bytes.set(torch.cuda.max_memory_allocated())
        torch.cuda.reset_peak_memory_stats()


def _originals_only(index: Index, job: Job, rule: RuleConfig, paths: list[Path], why: str,
                    audit: AuditLog) -> str:
    """The last fallback: a rule that forwards originals still forwards them when SR cannot be applied, so the
    study reaches PACS; the job says "SR not applied" and why. Returns '' when the rule forwards nothing."""
    if not (rule.forward_originals and rule.destinations and paths):
        return ""
    note = f"SR not applied: {why}; originals forwarded unchanged"
    index.add_deliveries(job.id, {d: [str(p) for p in paths] for d in rule.destinations})
    index.finish_job(job.id, "sending", "", engine="none", fallback=note)
    METRICS.series_processed.labels(outcome="originals-only").inc()
    log.warning("job %d (series %s): %s", job.id, job.series_uid, note)
    audit.write("job-processed", job=job.id, series=job.series_uid, engine="none", fallback=note,
                destinations=list(rule.destinations))
    return "sending"


def _fail(index: Index, job: Job, reason: str, audit: AuditLog, category: str) -> str:
    log.warning("job %d (series %s): failed: %s", job.id, job.series_uid, reason)
    index.finish_job(job.id, "failed", reason)
    METRICS.series_processed.labels(outcome="failed").inc()
    METRICS.failures.labels(where="job", reason=category).inc()
    audit.write("job-failed", job=job.id, series=job.series_uid, reason=reason)
    return "failed"
