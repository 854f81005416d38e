"""Scale-out executor on Celery: the receiving node publishes job ids, GPU workers run them.

The receiving node keeps ingest, spool and outbox; ``CeleryExecutor.submit(job_id)`` only publishes a message
to the broker ([executor].broker_url: Redis by default, RabbitMQ with an ``amqp://`` URL and nothing else).
``srnode worker --config FILE`` runs one worker per GPU: one job at a time (prefetch 1), acknowledged only
when it is done (acks late). A job whose worker dies is delivered again and re-run by another worker:

- a pool child that dies (OOM killer, segfault): the parent rejects the message at once (reject on worker lost);
- a whole worker or its machine that dies: the broker gives the unacknowledged message back, Redis after
  [executor].visibility_timeout_s (keep it above the longest job), RabbitMQ when the connection drops.

A re-run is safe: the job's derived UIDs are deterministic and the outbox keeps each file once, so results
are delivered once. Only a redelivered message (or a retry) takes over a job left 'processing'; a duplicate
publish of a job that is running elsewhere is a no-op.

Data reaches a worker through the shared spool path ([executor].data_access = "shared", the worker's
[node].spool_dir is the node's spool) or over WADO-RS from the receiving node ("dicomweb", see
``node.jobs.celery_remote``).
"""

from __future__ import annotations

import logging
import os
import time
from typing import Any

from celery import Celery, Task

from node.config import Config, DataAccess
from node.errors import NodeError
from node.jobs.celery_remote import OutcomeWatcher, job_spec, run_remote_job
from node.jobs.context import JobContext
from node.jobs.runner import process_claimed, run_job
from node.store import Index, Job, JobState, poison_reason, pruned_cover

log = logging.getLogger(__name__)

TASK_NAME = "srnode.run_job"  # the Celery task name; node and workers must agree
RETRY_COUNTDOWN_S = 15  # seconds before a task retry after an infrastructure failure on the worker
BROKER_RETRY_S = 5.0  # seconds after a failed publish during which submit fails fast
MAX_RETRIES = 3  # task retries after infrastructure failures

def broker_display(url: str) -> str:
    """The broker URL with any password masked (for logs and errors)."""
    from kombu import Connection

    try:
        return str(Connection(url).as_uri(include_password=False))
    except Exception:  # noqa: BLE001 - a malformed URL must not leak in an error message
        return url.split("@")[-1]


def transport_options(cfg: Config) -> dict[str, Any]:
    """Broker transport options: visibility timeout (seconds, ``[executor].visibility_timeout_s``), and a
    restore sweep for unacknowledged messages every vt/10 s, 1..60 s (Redis transport of kombu)."""
    vt = int(cfg.executor.visibility_timeout_s)
    return {
        "visibility_timeout": vt,
        # sweep for messages of dead workers every vt/10 s (1..60 s), on every sweep
        "unacked_restore_interval": max(1, min(60, vt // 10)),
        "unacked_restore_throttle": 1,
    }


def make_app(cfg: Config, worker: JobContext | None = None) -> Celery:
    """The Celery app for ``cfg``: same settings on the publishing node and on the workers.

    ``worker``: on a worker, the context its task runs jobs in (bound here, inherited by the pool's children);
    the publishing node passes none.
    """
    ex = cfg.executor
    backend = ex.result_backend or None
    if backend is None and ex.data_access == DataAccess.DICOMWEB and ex.broker_url.startswith(("redis://", "rediss://")):
        backend = ex.broker_url  # remote workers report outcomes back to the node through it
    app = Celery("srnode", broker=ex.broker_url, backend=backend, set_as_current=False)
    app.conf.update(
        task_default_queue=ex.queue,
        task_serializer="json",
        accept_content=["json"],
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        task_ignore_result=backend is None,
        result_expires=7 * 24 * 3600,
        worker_prefetch_multiplier=1,
        worker_concurrency=1,
        worker_hijack_root_logger=False,
        worker_redirect_stdouts=False,
        worker_send_task_events=False,
        broker_transport_options=transport_options(cfg),
        broker_connection_retry_on_startup=True,
        broker_connection_max_retries=None,
    )

    def run_job_task(self: Task, job_id: int | str, study_uid: str = "", series_uid: str = "", rule: str = "",
                     takeover: bool = False, n_instances: int = 0) -> dict[str, Any] | None:
        if worker is None:  # pragma: no cover - only `srnode worker` consumes the queue
            raise NodeError("srnode worker: no job context")
        return _run_job_task(worker, self, job_id, study_uid, series_uid, rule, takeover, n_instances)

    app.task(name=TASK_NAME, bind=True, max_retries=MAX_RETRIES)(run_job_task)
    return app


# ------------------------------------------------------------------------------------ the publishing side


class CeleryExecutor:
    """Executor that hands job ids to Celery workers; the node's own process runs no job."""

    def __init__(self, ctx: JobContext) -> None:
        self.cfg = ctx.cfg
        self.index = ctx.store.index
        self.outbox = ctx.store.spool.outbox
        self.app: Celery | None = None
        self.outcomes: OutcomeWatcher | None = None  # data_access = "dicomweb": records remote outcomes on the node's jobs
        self._down_until = 0.0  # after a failed publish, fail fast for a while (the watcher retries each tick)

    def start(self) -> None:
        """Make the Celery app (and, for "dicomweb", start the ``OutcomeWatcher``) and try the broker once; an
        unreachable broker is logged, not raised."""
        self.app = make_app(self.cfg)
        if self.cfg.executor.data_access == DataAccess.DICOMWEB:
            if self.app.conf.task_ignore_result:
                log.warning("celery executor: data_access = 'dicomweb' without a result backend "
                            "([executor].result_backend): jobs stay 'processing' in this node's index")
            self.outcomes = OutcomeWatcher(self.cfg, self.index, self.app)
            self.outcomes.start()
        where = broker_display(self.cfg.executor.broker_url)
        try:
            with self.app.connection_for_write() as conn:
                conn.ensure_connection(max_retries=2, interval_start=0.5, interval_step=0.5)
        except Exception as exc:  # noqa: BLE001 - kombu raises transport-specific errors
            # not fatal: the broker may come up later; publishes retry, queued jobs stay in the index
            log.warning("celery executor: broker %s not reachable yet (%s); jobs wait in the index", where, exc)
        else:
            log.info("celery executor: publishing jobs to %s, queue %r", where, self.cfg.executor.queue)

    def submit(self, job_id: int | str) -> None:
        """Publish ``job_id`` to ``[executor].queue``. NodeError when publishing fails (the broker, or for
        "dicomweb" reading the job's spec from the index) and for ``BROKER_RETRY_S`` seconds afterwards. For
        "dicomweb" the node's job is then claimed ('processing', SpoolError there) and its outcome tracked."""
        if self.app is None:
            self.start()
        assert self.app is not None
        where = broker_display(self.cfg.executor.broker_url)
        if time.monotonic() < self._down_until:
            raise NodeError(f"job {job_id}: the Celery broker {where} was unreachable moments ago; stays queued")
        if self.outcomes is not None and self._pruned_part(int(job_id)):
            return
        try:
            res = self.app.send_task(
                TASK_NAME,
                args=[job_id],
                kwargs=self._job_spec(job_id),
                queue=self.cfg.executor.queue,
                retry=True,
                retry_policy={"max_retries": 2, "interval_start": 0.2, "interval_step": 0.5, "interval_max": 1.0},
            )
        except Exception as exc:  # noqa: BLE001 - kombu/redis/amqp errors, translated once here
            self._down_until = time.monotonic() + BROKER_RETRY_S
            raise NodeError(f"job {job_id}: could not publish to the Celery broker {where}: {exc}") from exc
        log.info("job %s: published to Celery queue %r", job_id, self.cfg.executor.queue)
        if self.outcomes is not None:
            # the job runs in the worker's own spool: this node's job is 'processing' until the outcome comes back
            if self.index.claim_job(int(job_id)) is not None and not self.app.conf.task_ignore_result:
                self.outcomes.track(int(job_id), res)

    def _pruned_part(self, job_id: int) -> bool:
        """"dicomweb" workers: a job whose series the node pruned, holding part of the pruned instances (or new ones
        without them), is decided here (``node.store.prune.pruned_cover``: ignored, or failed, with why), not
        published: a worker's own spool does not know what the node pruned, and would process it alone."""
        job = self.index.job(job_id)
        sops = {i.sop_uid for i in self.index.instances_of(job.series_uid, job.study_uid)}
        state, why = pruned_cover(self.index, self.outbox, job_id, sops)
        if state is None:
            return False
        if self.index.claim_job(job_id) is not None:
            self.index.finish_job(job_id, state, why)
            log.warning("job %d (series %s): %s: %s", job_id, job.series_uid, state, why)
        return True

    def _job_spec(self, job_id: int | str) -> dict[str, Any]:
        """What a "dicomweb" worker needs to fetch the series: its UIDs (no PHI)."""
        if self.cfg.executor.data_access != DataAccess.DICOMWEB:
            return {}
        return job_spec(self.index, job_id)

    def stop(self) -> None:
        """Stop the outcome watcher and close the Celery app; published jobs stay with the broker."""
        if self.outcomes is not None:
            self.outcomes.stop()
            self.outcomes = None
        if self.app is not None:
            self.app.close()
            self.app = None


# -------------------------------------------------------------------------------------- the worker side


def _run_job_task(ctx: JobContext, self: Task, job_id: int | str, study_uid: str, series_uid: str, rule: str,
                  takeover: bool, n_instances: int = 0) -> dict[str, Any] | None:
    """The Celery task: run one job from the index (shared spool) or from a WADO-RS fetch (dicomweb)."""
    cfg = ctx.cfg
    redelivered = bool((self.request.delivery_info or {}).get("redelivered"))
    me = f"{self.request.hostname} pid {os.getpid()}"
    log.info("job %s: started on %s%s", job_id, me, " (redelivered)" if redelivered else "")
    t0 = time.monotonic()
    outcome: dict[str, Any] | None = None
    try:
        if cfg.executor.data_access == DataAccess.DICOMWEB:
            outcome = run_remote_job(ctx, job_id, study_uid, series_uid, rule, n_instances)
        else:
            run_shared_job(ctx, int(job_id), takeover=takeover or redelivered, worker=me)
    except Exception as exc:
        # run_job records job-level failures itself; what escapes is infrastructure (spool, broker, node)
        log.error("job %s: failed on %s: %s; retry %d/%d in %d s", job_id, me, exc,
                  self.request.retries + 1, MAX_RETRIES, RETRY_COUNTDOWN_S)
        raise self.retry(exc=exc, countdown=RETRY_COUNTDOWN_S,
                         kwargs={"study_uid": study_uid, "series_uid": series_uid, "rule": rule,
                                 "takeover": True, "n_instances": n_instances}) from exc
    log.info("job %s: finished on %s in %.1f s", job_id, me, time.monotonic() - t0)
    return outcome


def run_shared_job(ctx: JobContext, job_id: int, *, takeover: bool = False, worker: str = "") -> None:
    """Run a job from the shared spool; ``takeover``: the message came back because its worker died, so a job
    left 'processing' is claimed again here (a job queued, finished or superseded is handled as usual)."""
    if takeover:
        job = _take_over(ctx.store.index, job_id, worker)
        if job is not None:
            died, limit = job.attempts - 1, ctx.cfg.node.max_job_attempts
            if died >= limit:  # every run so far lost its worker (killed, out of memory): poison
                reason = poison_reason(died, limit)
                ctx.store.index.fail_poison(job.id, reason)
                log.error("job %d (series %s): failed as poison: %s", job.id, job.series_uid, reason)
                ctx.metrics.failures.labels(where="job", reason="poison").inc()
                ctx.audit.write("job-failed", job=job.id, series=job.series_uid, reason=reason)
                return
            log.warning("job %d: its worker was lost while processing; re-run on %s", job_id, worker)
            process_claimed(ctx, job)
            return
    run_job(ctx, job_id)


def _take_over(index: Index, job_id: int, worker: str) -> Job | None:
    """processing → processing (claimed again, one more attempt), atomically; None if not 'processing'."""
    now = time.time()
    with index.tx() as c:
        cur = c.execute("UPDATE jobs SET attempts = attempts + 1, started = ?, updated = ?, reason = ?"
                        " WHERE id = ? AND state = ?",
                        (now, now, f"re-run on {worker}: the previous worker was lost", job_id, JobState.PROCESSING))
        taken = cur.rowcount == 1
    return index.job(job_id) if taken else None
