"""Celery workers without the shared spool ([executor] data_access = "dicomweb").

The worker fetches the job's series over WADO-RS from the receiving node ([executor].node_url, bearer
[http].token) into its own local spool ([node].spool_dir of the worker's config), runs the same job there
(``node.jobs.runner.run_job``) and delivers the results from its local outbox to the rule's destinations, with the
[outbox] retries and backoff, before it takes its next job. The
task's return value (state, reason, derived UIDs: no PHI) goes back through the Celery result backend, and
the node records it on its own job (``OutcomeWatcher``), so ``srnode status`` and /jobs stay true.

Re-running a job is cheap and harmless: a series whose job already delivered here is not processed again.
"""

from __future__ import annotations

import logging
import shutil
import threading
import time
from typing import Any
from urllib.parse import urlsplit

import httpx
from celery import Celery
from celery.result import AsyncResult
from pydicom import dcmread

from node.config import Config
from node.errors import DeliveryError, NodeError
from node.ingest import Admission, Caller, MultipartError
from node.ingest.stow import boundary_of, split_multipart
from node.jobs.context import JobContext
from node.jobs.runner import run_job
from node.send import Outbox
from node.store import DeliveryState, Index, Job, JobState, Spool

log = logging.getLogger(__name__)

FETCH_TIMEOUT_S = 300.0
NODE_CALLER = "SRNODE-NODE"  # the caller recorded for instances fetched from the receiving node


class FetchFromNodeError(DeliveryError):
    """The series could not be fetched from the receiving node over WADO-RS."""


def job_spec(index: Index, job_id: int | str) -> dict[str, Any]:
    """The task arguments a remote worker needs: the job's study/series UIDs, rule and the instances it took of
    the series (no PHI); SpoolError when there is no such job."""
    job = index.job(int(job_id))
    return {"study_uid": job.study_uid, "series_uid": job.series_uid, "rule": job.rule,
            "n_instances": job.n_instances}


def fetch_series(cfg: Config, study_uid: str, series_uid: str) -> list[bytes]:
    """GET {node_url}/dicom-web/studies/{study}/series/{series} (WADO-RS, PS3.18 10.4; multipart/related
    application/dicom); returns each part's bytes (a DICOM file). Timeout ``FETCH_TIMEOUT_S`` seconds.

    NodeError when ``[executor].node_url`` is empty; FetchFromNodeError when the request fails, the answer is
    not 200 (not retryable for 400, 401, 403, 404) or the body cannot be split.
    """
    base = cfg.executor.node_url.rstrip("/")
    if not base:
        raise NodeError("executor.node_url: data_access = 'dicomweb' needs the receiving node's HTTP URL")
    url = f"{base}/dicom-web/studies/{study_uid}/series/{series_uid}"
    headers = {"Accept": 'multipart/related; type="application/dicom"'}
    if cfg.http.token:
        headers["Authorization"] = f"Bearer {cfg.http.token}"
    try:
        r = httpx.get(url, headers=headers, timeout=FETCH_TIMEOUT_S)
    except httpx.HTTPError as exc:
        raise FetchFromNodeError(f"series {series_uid}: WADO-RS from {base} failed: {exc}") from exc
    if r.status_code != 200:
        raise FetchFromNodeError(f"series {series_uid}: WADO-RS from {base} answered HTTP {r.status_code}",
                                 retryable=r.status_code not in (400, 401, 403, 404))
    try:
        parts = [payload for _h, payload in split_multipart(r.content, boundary_of(r.headers["content-type"]))]
    except (MultipartError, KeyError) as exc:
        raise FetchFromNodeError(f"series {series_uid}: WADO-RS answer from {base} is not readable: {exc}",
                                 retryable=False) from exc
    return parts


def run_remote_job(ctx: JobContext, job_id: int | str, study_uid: str, series_uid: str,
                   rule: str, n_instances: int = 0) -> dict[str, Any]:
    """Fetch, process and deliver one job in this worker's own spool; returns the outcome for the node.

    The outcome: state, reason, derived / uncertainty series UIDs, engine, fallback, report (no PHI). A series
    already delivered here under the same rule and the instance count the node's job took (``n_instances``; 0,
    from a node before hostile18: never taken as delivered) is not fetched again. Raises as
    :func:`fetch_series`, IngestError for a refused instance, SpoolError (index).
    """
    cfg, spool, index = ctx.cfg, ctx.store.spool, ctx.store.index
    done = _already_delivered(index, study_uid, series_uid, rule, n_instances)
    if done is not None:
        log.info("job %s: series %s already processed and delivered here (local job %d)", job_id, series_uid,
                 done.id)
        return _outcome(done)
    t0 = time.monotonic()
    files = fetch_series(cfg, study_uid, series_uid)
    # the receiving node admitted these instances (its caller checks applied there): trusted here
    admission = Admission(cfg, spool, index, ctx.metrics)
    caller = Caller(NODE_CALLER, urlsplit(cfg.executor.node_url).hostname or "", "wado-rs", trusted=True)
    for data in files:
        admission.admit_bytes(data, caller)
    log.info("job %s: fetched %d instances of series %s in %.1f s", job_id, len(files), series_uid,
             time.monotonic() - t0)
    index.mark_stable(series_uid, time.time() + 1.0, study_uid=study_uid)
    local = index.create_job(series_uid, rule, reason=f"node job {job_id}", study_uid=study_uid)
    run_job(ctx, local)
    _deliver_now(ctx, local)
    job = index.job(local)
    if job.state == JobState.DELIVERED:
        _clean(spool, study_uid, series_uid, local)
    return _outcome(job)


def _clean(spool: Spool, study_uid: str, series_uid: str, local_job: int) -> None:
    """A delivered job's files leave the worker's scratch spool (its index rows stay: a re-run is recognised;
    a later fetch of the same series stores the files again). Dead-lettered jobs keep theirs for a retry. Its
    results stay as headers without pixel data (a few KB each): what the rejection note of a later job of the
    series made here must list (``node.derived.iocm.rejection_notes`` reads them from ``outbox/job-<id>``);
    before hostile18 they were removed, and a re-made result went out without a note."""
    shutil.rmtree(spool.instances / study_uid / series_uid, ignore_errors=True)
    outbox = spool.outbox / f"job-{local_job}"
    for path in sorted(outbox.glob("**/*.dcm")) if outbox.is_dir() else []:
        try:
            if path.name.startswith("KO-"):
                path.unlink()
                continue
            ds = dcmread(path, stop_before_pixels=True)
            tmp = path.with_name(path.name + ".tmp")
            ds.save_as(tmp, enforce_file_format=True)
            tmp.replace(path)
        except Exception as exc:  # noqa: BLE001 - pydicom raises many types; the file is removed, the note said
            log.warning("job %d: result %s kept for a later rejection note could not be cut to its header: %s",
                        local_job, path.name, type(exc).__name__)
            path.unlink(missing_ok=True)


def _already_delivered(index: Index, study_uid: str, series_uid: str, rule: str, n_instances: int) -> Job | None:
    """The job of this worker that delivered the series under ``rule`` from the ``n_instances`` the node's job
    took, else None. Before hostile18 the count compared was the worker's own, kept from its last fetch: late
    instances made a second node job that this took as delivered, answering the first result's UIDs (the late
    slices in no derived series, the node's job 'delivered')."""
    s = index.series(series_uid, study_uid)
    if not n_instances or not s or s.get("job_id") is None:
        return None
    job = index.job(int(s["job_id"]))
    same = job.rule == rule and job.n_instances == n_instances == s.get("n_instances")
    return job if same and job.state == JobState.DELIVERED else None


def _deliver_now(ctx: JobContext, job_id: int) -> None:
    """Deliver the job's results from this worker, with the outbox's retries and backoff, until each delivery
    is done or dead-lettered. Only this task touches them (one job at a time per worker): sent once."""
    index = ctx.store.index
    # its thread is not started: the attempts happen here, in order; Storage Commitment reports go to the node's
    # AE title, not here: DICOM destinations are confirmed by count (break19: the delivery stayed 'sent' for good)
    outbox = Outbox(ctx.cfg, index, ctx.metrics, takes_reports=False)
    ob = ctx.cfg.outbox
    while True:
        # a clock stepped back since a next attempt was set would add the step to its wait (node.send.outbox)
        index.unstamp_future_deliveries(time.time(), ob.backoff_max_s, ob.confirm_timeout_s)
        pending = index.deliveries(job_id, states=(DeliveryState.PENDING,))
        if not pending:
            break
        now = time.time()
        due = [d for d in pending if d.next_attempt <= now]
        for d in due:
            outbox.attempt(d)
        if not due:
            time.sleep(min(5.0, max(0.05, min(d.next_attempt for d in pending) - now)))
    index.settle_job(job_id)


def _outcome(job: Job) -> dict[str, Any]:
    return {"state": job.state.value, "reason": job.reason, "derived_series_uid": job.derived_series_uid,
            "uncertainty_series_uid": job.uncertainty_series_uid, "engine": job.engine,
            "fallback": job.fallback, "report": job.report}


class OutcomeWatcher:
    """On the node: records remote workers' outcomes (from the result backend) on the node's own jobs."""

    def __init__(self, cfg: Config, index: Index, app: Celery) -> None:
        self.cfg, self.index, self.app = cfg, index, app
        self._pending: dict[int, Any] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="srnode-celery-outcomes", daemon=True)

    def start(self) -> None:
        """Start polling the tracked results every second (a daemon thread)."""
        self._thread.start()

    def track(self, job_id: int, result: AsyncResult) -> None:
        """Record ``result`` (a Celery ``AsyncResult``) on job ``job_id`` once it is ready."""
        with self._lock:
            self._pending[job_id] = result

    def stop(self) -> None:
        """Stop polling (waits up to 10 s); outcomes not yet read are not recorded."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(10)

    def _loop(self) -> None:
        while not self._stop.wait(1.0):
            with self._lock:
                items = list(self._pending.items())
            for job_id, res in items:
                try:
                    if not res.ready():
                        continue
                    self._record(job_id, res)
                except Exception as exc:  # noqa: BLE001 - the backend may be down for a moment; try again
                    log.warning("job %d: cannot read its outcome from the result backend: %s", job_id, exc)
                    continue
                with self._lock:
                    self._pending.pop(job_id, None)

    def _unretired(self, job_id: int, state: JobState, out: dict[str, Any]) -> str:
        """Why the earlier result this remote job's new one replaces is not retired, or "": a worker retires only
        results it made itself (their headers stay in its scratch spool); one made on another worker (or before
        its scratch spool was emptied) gets no rejection note, which a WARNING line and the job's reason say, naming
        the series to retire by hand (hostile18: before, nothing said so)."""
        if state != JobState.DELIVERED:
            return ""
        job = self.index.job(job_id)
        old_id, seen = job.supersedes, {job_id}
        while old_id and old_id not in seen:  # the latest earlier job of the series that made a result
            seen.add(old_id)
            old = self.index.job(old_id)
            if old.derived_series_uid:
                break
            old_id = old.supersedes
        else:
            return ""
        new_uid = str(out.get("derived_series_uid") or "")
        report = out.get("report") if isinstance(out.get("report"), dict) else {}
        if not new_uid or new_uid == old.derived_series_uid or (report or {}).get("rejection_notes"):
            return ""
        said = (f"no rejection note retires job {old.id}'s derived series {old.derived_series_uid} (made on another "
                "worker, whose record of it this one does not hold): retire it in the PACS by hand")
        log.warning("job %d: %s", job_id, said)
        return said

    def _record(self, job_id: int, res: AsyncResult) -> None:
        if res.successful() and isinstance(res.result, dict):
            out = res.result
            fields = {k: out[k] for k in ("derived_series_uid", "uncertainty_series_uid", "engine", "fallback",
                                          "report") if k in out}
            try:
                state = JobState(str(out.get("state", JobState.FAILED)))
            except ValueError:
                self.index.finish_job(job_id, JobState.FAILED, f"remote worker answered an unknown state: {out!r}")
                log.warning("job %d: the remote worker answered an unknown state: %r", job_id, out.get("state"))
                return
            reason = str(out.get("reason", ""))
            unretired = self._unretired(job_id, state, out)
            if unretired:
                reason = f"{reason}; {unretired}" if reason else unretired
            self.index.finish_job(job_id, state, reason, **fields)
            log.info("job %d: %s on a remote worker", job_id, state)
        else:
            self.index.finish_job(job_id, JobState.FAILED, f"remote worker: {res.result!r}")
            log.warning("job %d: failed on a remote worker: %r", job_id, res.result)
