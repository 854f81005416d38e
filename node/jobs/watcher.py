"""The completeness watcher: a series quiet for ``[node].stable_age_s`` becomes a job (``node.jobs.decide``), and
queued jobs are (re)submitted to the executor. An association release only wakes it.

When is a series complete:

- a sender declared its size (a puller or the Orthanc plugin said how many it sent: ``Index.declare_series``;
  not ImagesInAcquisition, which counts one acquisition of a series that may hold more, series14) and exactly
  that many distinct instances are in, the last of them
  ``min([node].declared_settle_s, stable_age_s)`` ago: complete without waiting the quiet period. More instances
  than declared: the declaration no longer counts (logged), the quiet period applies;
- else it has been quiet for ``stable_age_s``: no new instance, and no duplicate either (a resend is activity);
  and the node itself has been up that long: silence while the node was down (a sender that could not reach
  it) is no evidence that a series is complete.

A series marked stable whose decision could not be recorded (the index locked past its busy timeout, a full disk)
stays 'stable' and is decided again ``RETRY_DECIDE_S`` later, never left without a job until a restart.

To change when a series counts as complete, change :meth:`StabilityWatcher.tick` (and the index queries it
uses, ``Index.quiet_series`` / ``Index.mark_stable``).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

from node.audit import AuditLog
from node.config import Config
from node.errors import NodeError
from node.jobs.decide import decide
from node.metrics import Metrics
from node.store import Index, JobState

log = logging.getLogger(__name__)

RETRY_DECIDE_S = 5.0  # seconds before a series whose decision could not be recorded is decided again


class StabilityWatcher:
    """Polls the index: quiet series become jobs; queued jobs are handed to ``submit``."""

    def __init__(self, cfg: Config, index: Index, submit: Callable[[int], None], metrics: Metrics,
                 audit: AuditLog | None = None) -> None:
        self.cfg, self.index, self.submit, self.metrics, self.audit = cfg, index, submit, metrics, audit
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._submitted: dict[int, float] = {}  # job id -> its 'updated' time when last submitted
        self._up_since = 0.0  # Unix seconds the watcher started (0: never started; tick() called directly)
        self._undecided: dict[tuple[str, str], float] = {}  # stable series whose decision failed -> next try (s)

    def hint(self) -> None:
        """An association was released: look now (the series must still be quiet for stable_age_s)."""
        self._wake.set()

    def start(self) -> None:
        """Start polling in a daemon thread, every min(0.5 s, stable_age_s / 4, declared settle time / 2) or when
        hinted. Series received before now count as quiet only from now on (the node was down)."""
        self._up_since = time.time()
        self._thread = threading.Thread(target=self._loop, name="srnode-stability", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop polling; waits up to 30 s for the thread to end."""
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(30)

    @property
    def settle_s(self) -> float:
        """Seconds a series holding its declared instance count must stay without a new instance or duplicate
        before it is complete: min(``[node].declared_settle_s``, ``stable_age_s``)."""
        return min(self.cfg.node.declared_settle_s, self.cfg.node.stable_age_s)

    def tick(self) -> None:
        """One pass: series holding their declared instance count for :attr:`settle_s`, then series quiet for
        ``[node].stable_age_s`` (seconds; counted from the watcher's start for series received before it) become
        stable and get a decision (``node.jobs.decide``); queued jobs not submitted since their last change go to
        ``submit``; the queue depth metric is set. NodeError from a decision or a submit is logged; index errors
        (SpoolError) raise."""
        now = time.time()
        restamped = self.index.unstamp_future_series(now)
        if restamped:
            log.warning("the clock is behind the time %d series' last instance was stamped with (it stepped back): "
                        "their quiet time counts from now", restamped)
        # series left 'stable' without a job (recording the decision failed: the index locked or full): again
        stable = self.index.stable_series()
        self._undecided = {k: t for k, t in self._undecided.items() if k in stable}
        for study_uid, series_uid in stable:
            if self._undecided.get((study_uid, series_uid), 0.0) <= now:
                self._decide(study_uid, series_uid)
        settled_since = now - self.settle_s
        headers = self.cfg.node.images_in_acquisition_completes
        for study_uid, series_uid in self.index.complete_series(settled_since, headers):
            if self.index.mark_stable(series_uid, settled_since, study_uid=study_uid, complete=True,
                                      headers=headers):
                row = self.index.series(series_uid, study_uid) or {}
                log.info("series %s (study %s): complete, %s of %s declared instance(s) (by %s), %.1f s after the "
                         "last", series_uid, study_uid, row.get("n_instances"), row.get("declared_instances"),
                         row.get("declared_by"), now - float(row.get("last_received") or now))
                self._decide(study_uid, series_uid)
        quiet_since = now - self.cfg.node.stable_age_s
        if self._up_since <= quiet_since:  # up for less than stable_age_s: nothing has been quiet long enough
            for study_uid, series_uid in self.index.quiet_series(quiet_since):
                if self.index.mark_stable(series_uid, quiet_since, study_uid=study_uid):
                    self._decide(study_uid, series_uid)
        queued = self.index.jobs((JobState.QUEUED,))
        # forget jobs that left the queue (the map holds only queued jobs: it does not grow with the node's age)
        for gone in set(self._submitted) - {j.id for j in queued}:
            del self._submitted[gone]
        for job in queued:
            if self._submitted.get(job.id) != job.updated:
                self._submitted[job.id] = job.updated
                try:
                    self.submit(job.id)
                except NodeError as exc:
                    log.error("job %d: could not be submitted (stays queued): %s", job.id, exc)
                    del self._submitted[job.id]
        self.metrics.queue_depth.set(self.index.queue_depth())

    def _decide(self, study_uid: str, series_uid: str) -> None:
        """Decide a stable series (``node.jobs.decide``); when that fails (NodeError: the index cannot record it)
        the series stays 'stable' and is decided again at a pass ``RETRY_DECIDE_S`` seconds later."""
        try:
            decide(self.cfg, self.index, series_uid, self.audit, study_uid=study_uid)
        except NodeError as exc:
            log.error("series %s (study %s): could not decide what to do: %s; trying again in %.0f s", series_uid,
                      study_uid, exc, RETRY_DECIDE_S)
            self._undecided[(study_uid, series_uid)] = time.time() + RETRY_DECIDE_S
        else:
            self._undecided.pop((study_uid, series_uid), None)

    def _loop(self) -> None:
        interval = min(0.5, self.cfg.node.stable_age_s / 4, max(self.settle_s / 2, 0.1))
        while not self._stop.is_set():
            try:
                self.tick()
            except Exception as exc:  # noqa: BLE001 - keep watching; the index may be busy for a moment
                log.exception("stability watcher: %s", exc)
            self._wake.wait(interval)
            self._wake.clear()
