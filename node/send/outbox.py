"""The durable outbox: each job's results wait in the index, one delivery per destination, until sent.

A thread picks due deliveries, sends them with the destination's Sender and records the outcome. A retryable
failure is tried again after an exponential backoff ([outbox] backoff_initial_s doubling up to backoff_max_s);
after max_attempts, or at once for a non-retryable failure, the delivery goes to dead-letter with the reason
(``srnode retry`` puts it back). A resend is harmless: derived UIDs are deterministic. A delivery whose results a
later job of the same series replaced (late instances; that job's rejection note retires them) is not sent at all.

Accepted files are not yet delivered: ``node.send.confirm`` asks the destination (Storage Commitment, or a count
of what it holds), and only its answer makes the delivery 'delivered'; a shortfall is a failed attempt.
"""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path

from node.audit import AuditLog
from node.config import Config
from node.errors import ConfigError, DeliveryError, NodeError
from node.metrics import Metrics
from node.send.base import Sender, make_sender
from node.send.confirm import Confirmations, Mismatch
from node.store import NOT_SENT, Delivery, DeliveryState, Index, JobState

log = logging.getLogger(__name__)


def backoff_s(cfg: Config, failed_attempts: int) -> float:
    """Delay before the next try after ``failed_attempts`` (>= 1) failures."""
    o = cfg.outbox
    return float(min(o.backoff_max_s, o.backoff_initial_s * 2 ** max(0, failed_attempts - 1)))


class Outbox:
    """Delivers due deliveries of ``index`` with one Sender per destination of ``cfg``, in its own thread."""

    def __init__(self, cfg: Config, index: Index, metrics: Metrics, audit: AuditLog | None = None,
                 takes_reports: bool = True) -> None:
        """``takes_reports``: whether Storage Commitment reports for this outbox's requests reach it (the node's
        SCP hands them to ``confirm.on_report``); False on a ``data_access = "dicomweb"`` Celery worker, whose
        peers send their reports to the node: then DICOM destinations are confirmed by count."""
        self.cfg, self.index, self.metrics, self.audit = cfg, index, metrics, audit
        self._senders: dict[str, Sender] = {}
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._resume = threading.Event()
        self._thread: threading.Thread | None = None
        self.confirm = Confirmations(cfg, index, metrics, self, takes_reports)

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="srnode-outbox", daemon=True)
        self._thread.start()

    def resume(self) -> None:
        """Ask again (in the outbox thread) for the confirmations a stopped node left awaiting; call it once the
        SCP that takes Storage Commitment reports listens."""
        self._resume.set()
        self._wake.set()

    def wake(self) -> None:
        self._wake.set()

    def stop(self, timeout: float = 30.0) -> None:
        """Stop after the delivery in hand, waiting up to ``timeout`` (a half-sent delivery is resent at the next
        start; resends are harmless)."""
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                if self._resume.is_set():
                    self._resume.clear()
                    self.confirm.resume()
                self.run_due()
            except Exception as exc:  # noqa: BLE001 - keep the outbox alive; the index may be busy
                log.exception("outbox: %s", exc)
            self._wake.wait(0.5)
            self._wake.clear()

    def run_due(self) -> int:
        """Attempt every due delivery once; returns how many were attempted."""
        ob = self.cfg.outbox
        restamped = self.index.unstamp_future_deliveries(time.time(), ob.backoff_max_s, ob.confirm_timeout_s)
        if restamped:
            log.warning("the clock is behind the time %d deliveries' next attempt or confirmation deadline was set "
                        "with (it stepped back): brought back to at most backoff_max_s / confirm_timeout_s from now",
                        restamped)
        self.confirm.overdue(time.time())
        due = self.index.due_deliveries(time.time())
        for d in due:
            if self._stop.is_set():
                break
            self.attempt(d)
        return len(due)

    def sender(self, name: str) -> Sender:
        if name not in self._senders:
            self._senders[name] = make_sender(self.cfg.destination(name))
        return self._senders[name]

    def attempt(self, d: Delivery) -> None:
        t0 = time.monotonic()
        later = self.index.replaced_by(d.job_id)
        if later is not None:  # a later job of the series made results that replace these: never sent
            self.replaced(d, later)
            return
        try:
            missing = [f for f in d.files if not Path(f).is_file()]
            if missing:
                raise DeliveryError(f"{len(missing)} result file(s) are missing from the spool, e.g. {missing[0]}",
                                    retryable=False)
            self.sender(d.destination).send([Path(f) for f in d.files])
            settled = self.confirm.after_send(d, [Path(f) for f in d.files])
        except (DeliveryError, ConfigError, NodeError) as exc:
            self.failed(d, exc)
            return
        except Exception as exc:  # noqa: BLE001 - a client library raised something else: still a counted attempt
            # (backoff, then dead-letter), never an uncounted one that the loop resends every 0.5 s forever
            log.exception("job %d -> %s: unexpected error: %s", d.job_id, d.destination, exc)
            self.failed(d, DeliveryError(f"unexpected {type(exc).__name__}: {exc}"[:500]))
            return
        seconds = time.monotonic() - t0
        self.metrics.job_seconds.labels(stage="deliver").observe(seconds)
        if not settled:
            log.info("job %d -> %s: %d file(s) accepted in %.1f s, storage commitment report awaited", d.job_id,
                     d.destination, len(d.files), seconds)
            return
        self.settled(d)

    def failed(self, d: Delivery, exc: Exception) -> None:
        """Record a failed attempt of ``d`` (``exc``: a DeliveryError says whether to retry): pending again after
        the backoff, or dead-letter after max_attempts; then settle its job."""
        retryable = exc.retryable if isinstance(exc, DeliveryError) else False
        attempts = d.attempts + 1
        confirmed = exc.confirmed if isinstance(exc, Mismatch) else None
        if retryable and attempts < self.cfg.outbox.max_attempts:
            delay = backoff_s(self.cfg, attempts)
            self.index.delivery_failed(d.id, str(exc), time.time() + delay, confirmed)
            log.warning("job %d -> %s: attempt %d/%d failed, next in %.0f s: %s", d.job_id, d.destination,
                        attempts, self.cfg.outbox.max_attempts, delay, exc)
            self.metrics.deliveries.labels(destination=d.destination, outcome="retry").inc()
            self.wake()
        else:
            why = f"after {attempts} attempt(s): {exc}" if retryable else f"not retryable: {exc}"
            self.index.delivery_failed(d.id, why, None, confirmed)
            log.error("job %d -> %s: dead-letter %s; once the cause is fixed, `srnode retry %d` sends it again",
                      d.job_id, d.destination, why, d.job_id)
            self.metrics.deliveries.labels(destination=d.destination, outcome=DeliveryState.DEAD_LETTER).inc()
            self.metrics.failures.labels(where="delivery", reason=type(exc).__name__).inc()
            if self.audit:
                self.audit.write("delivery", job=d.job_id, destination=d.destination, outcome=DeliveryState.DEAD_LETTER,
                                 attempts=attempts, reason=str(exc))
        self.index.settle_job(d.job_id)

    def replaced(self, d: Delivery, later: int) -> None:
        """``d``'s results were replaced by job ``later``'s (late instances made the series be processed again; its
        rejection note retires these): ``d`` is not sent (dead-letter, with why) and, once none of its job's
        deliveries is pending or awaiting a confirmation, the job is 'superseded'. Logged and audited."""
        why = (f"{NOT_SENT}job {later} of the same series replaced these results (late instances), and its "
               f"rejection note retires them")
        self.index.delivery_failed(d.id, why, None)
        log.warning("job %d -> %s: %s", d.job_id, d.destination, why)
        self.metrics.deliveries.labels(destination=d.destination, outcome="replaced").inc()
        if self.audit:
            self.audit.write("delivery", job=d.job_id, destination=d.destination, outcome="replaced", reason=why)
        if not self.index.deliveries(d.job_id, (DeliveryState.PENDING, DeliveryState.SENT)):
            self.index.finish_job(d.job_id, JobState.SUPERSEDED, f"superseded by job {later}, whose results "
                                                                 "replaced this job's before they were sent: not sent")

    def settled(self, d: Delivery) -> None:
        """``d`` ended delivered or unconfirmed (the index holds which, and how it was confirmed): settle its job,
        count, log and audit it."""
        now = self.index.delivery(d.id) or d
        state = self.index.settle_job(d.job_id)
        self.metrics.deliveries.labels(destination=d.destination, outcome=now.state).inc()
        log.info("job %d -> %s: %d file(s) %s, %s (job %s)", d.job_id, d.destination, len(d.files), now.state,
                 now.confirm_note, state)
        if self.audit:
            self.audit.write("delivery", job=d.job_id, destination=d.destination, outcome=now.state,
                             files=len(d.files), attempts=now.attempts, confirmed_by=now.confirm_method,
                             confirmed=now.confirmed, expected=now.expected)
