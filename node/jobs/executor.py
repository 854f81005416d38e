"""Where jobs run: one ``Executor`` interface, two implementations.

- ``InProcessExecutor`` (default): one worker thread in the serving process; jobs run one at a time, so GPU
  work is serialised.
- ``node.jobs.celery_executor.CeleryExecutor`` ([executor].kind = "celery"): publishes job ids to GPU workers.

Submitting is only a wake-up: the job's state lives in the index, ``run_job`` claims it atomically, so a job
submitted twice runs once.
"""

from __future__ import annotations

import logging
import queue
import threading
from typing import Protocol, runtime_checkable

from node.config import ExecutorKind
from node.jobs.context import JobContext
from node.jobs.runner import run_job

log = logging.getLogger(__name__)

RETRY_S = 5.0  # seconds before a job whose claim or outcome the index refused is handed to the worker again


@runtime_checkable
class Executor(Protocol):
    """Where jobs run. ``submit`` only wakes a runner: the job's state lives in the index."""

    def start(self) -> None:
        """Start running (or publishing) jobs."""

    def submit(self, job_id: int) -> None:
        """Wake a runner for ``job_id`` (queued in the index); NodeError when it cannot be handed on now."""

    def stop(self) -> None:
        """Stop; jobs not started stay queued in the index."""


class InProcessExecutor:
    """A single worker thread calling ``node.jobs.runner.run_job(ctx, job_id)`` for each submitted job; a job
    whose claim or outcome the index refused (SpoolError escaping ``run_job``) is submitted again ``RETRY_S``
    later."""

    def __init__(self, ctx: JobContext) -> None:
        self.ctx = ctx
        self._queue: queue.Queue[int | None] = queue.Queue()
        self._pending: set[int] = set()
        self._running: int | None = None  # the job id in hand
        self._stopping = threading.Event()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        """Start the worker thread (a daemon); no-op when it runs."""
        if self._thread is None:
            self._stopping.clear()
            self._thread = threading.Thread(target=self._loop, name="srnode-worker", daemon=True)
            self._thread.start()

    def submit(self, job_id: int) -> None:
        """Queue ``job_id`` for the worker thread, unless it is already waiting or running there."""
        with self._lock:
            if job_id in self._pending:
                return
            self._pending.add(job_id)
        self._queue.put(job_id)

    def _resubmit(self, job_id: int) -> None:
        if not self._stopping.is_set():
            self.submit(job_id)

    @property
    def pending(self) -> int:
        """How many submitted jobs are waiting or running in this executor."""
        with self._lock:
            return len(self._pending)

    def _loop(self) -> None:
        while True:
            job_id = self._queue.get()
            if job_id is None:
                return
            with self._lock:
                self._running = job_id
            failed = False
            try:
                run_job(self.ctx, job_id)
            except Exception as exc:  # noqa: BLE001 - run_job records job failures; this is the spool failing
                log.exception("job %s: the worker could not record its outcome: %s; it is tried again in %.0f s",
                              job_id, exc, RETRY_S)
                failed = True
            finally:
                with self._lock:
                    self._pending.discard(job_id)
                    self._running = None
            if failed and not self._stopping.is_set():
                # the index refused the claim or the outcome (locked, full): the job is still queued (or left
                # 'processing', then skipped); the watcher submits a job once per change, so submit it again here
                retry = threading.Timer(RETRY_S, self._resubmit, (job_id,))
                retry.daemon = True
                retry.start()

    def stop(self, timeout: float = 30.0) -> None:
        """Finish the job in hand (up to ``timeout`` seconds); queued jobs stay queued in the index.

        A job still running after ``timeout`` dies with the process and is re-queued at the next start; that run
        does not count toward ``[node] max_job_attempts`` (``Index.stopped_during``): only runs that stopped the
        node (kill -9, out of memory) make a job poison."""
        if self._thread is None:
            return
        self._stopping.set()
        while True:  # drop what was not started: it is still 'queued' in the index
            try:
                dropped = self._queue.get_nowait()
            except queue.Empty:
                break
            with self._lock:
                self._pending.discard(dropped or 0)
        self._queue.put(None)
        self._thread.join(timeout)
        if self._thread.is_alive():
            log.warning("worker: the running job did not finish within %.0f s; it is re-queued at next start",
                        timeout)
            with self._lock:
                running = self._running
            # a stop is no crash: this run must not count toward max_job_attempts (poison)
            if running is not None:
                try:
                    self.ctx.store.index.stopped_during(running, self.ctx.cfg.node.max_interrupted_runs)
                except Exception as exc:  # noqa: BLE001 - stopping anyway; the run then counts as one that stopped it
                    log.warning("job %s: its interrupted run could not be recorded as such: %s", running, exc)
        self._thread = None


def make_executor(ctx: JobContext) -> Executor:
    """The executor named by ``[executor].kind`` (Celery is imported only when configured)."""
    if ctx.cfg.executor.kind == ExecutorKind.CELERY:
        from node.jobs.celery_executor import CeleryExecutor

        return CeleryExecutor(ctx)
    return InProcessExecutor(ctx)
