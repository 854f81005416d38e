"""The outbox rows of the spool index: one delivery per job and destination, pending → [sent →] delivered |
unconfirmed | dead-letter, with attempts, the next attempt's time (Unix seconds) and how the destination confirmed
it (``node.send.confirm``); a job settles once its deliveries have.

Part of :class:`node.store.index.Index` (its mixin base).
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from typing import Any

from node.store.jobs import JobTable, _marks
from node.store.schema import Delivery, delivery_of
from node.store.states import DeliveryState, JobState


class DeliveryTable(JobTable):
    """The ``deliveries`` table's transitions."""


    def add_deliveries(self, job_id: int, per_destination: dict[str, list[str]]) -> None:
        """Enqueue the job's files (paths) per destination name (idempotent: a re-run resets the job's rows
        for these destinations to pending, attempts 0)."""
        with self.tx() as c:
            self._add_deliveries(c, job_id, per_destination)

    def enqueue_results(self, job_id: int, per_destination: dict[str, list[str]], state: JobState,
                        reason: str = "", **fields: Any) -> None:
        """A processed job's outcome in ONE transaction: its deliveries (as :meth:`add_deliveries`) and its new
        state (as :meth:`finish_job`: 'sending', or 'delivered' when there are none). Never the deliveries of a job
        still 'processing' (a kill -9 between two transactions: the outbox sent results the next start re-ran,
        wiping them), nor a 'sending' job without them. SpoolError when the index refuses it: nothing recorded."""
        with self.tx() as c:
            self._add_deliveries(c, job_id, per_destination)
            self._finish(c, job_id, state, reason, **fields)

    @staticmethod
    def _add_deliveries(c: Any, job_id: int, per_destination: dict[str, list[str]]) -> None:
        now = time.time()
        for dest, files in per_destination.items():
            c.execute(
                "INSERT INTO deliveries (job_id, destination, files, state, created, updated)"
                " VALUES (?,?,?,?,?,?) ON CONFLICT(job_id, destination) DO UPDATE SET"
                " files = excluded.files, state = excluded.state, attempts = 0, next_attempt = 0, reason = '',"
                " confirm_method = '', expected = NULL, confirmed = NULL, confirmed_at = NULL, confirm_note = '',"
                " transaction_uid = '', sop_refs = '[]', confirm_deadline = 0, updated = excluded.updated",
                (job_id, dest, json.dumps(files), DeliveryState.PENDING, now, now))

    def deliveries(self, job_id: int | None = None, states: Sequence[DeliveryState] = ()) -> list[Delivery]:
        """The deliveries (of one job, in one of ``states``, when given), oldest first."""
        sql, args = "SELECT * FROM deliveries WHERE 1=1", list[Any]()
        if job_id is not None:
            sql += " AND job_id = ?"
            args.append(job_id)
        if states:
            wanted = [DeliveryState(s) for s in states]
            sql += f" AND state IN ({_marks(wanted)})"
            args.extend(wanted)
        return [delivery_of(r) for r in self._query(sql + " ORDER BY id", args)]

    def overdue_confirmations(self, now: float) -> list[Delivery]:
        """'sent' deliveries whose confirmation deadline (Unix seconds) passed at ``now``."""
        rows = self._query("SELECT * FROM deliveries WHERE state = ? AND confirm_deadline <= ? ORDER BY id",
                           (DeliveryState.SENT, now))
        return [delivery_of(r) for r in rows]

    def unstamp_future_deliveries(self, now: float, retry_max_s: float, confirm_max_s: float,
                                  slack: float = 2.0) -> int:
        """Pending deliveries whose next attempt lies more than ``retry_max_s`` (+ ``slack``) seconds after ``now``,
        and 'sent' ones whose confirmation deadline lies more than ``confirm_max_s`` after it: stamped by a clock
        that has stepped back since (NTP), they would wait that step on top (an hour's step: a PACS back at once
        and the delivery an hour later). Brought back to ``now`` + their longest wait. Returns how many."""
        args = (DeliveryState.PENDING, now + retry_max_s + slack, DeliveryState.SENT, now + confirm_max_s + slack)
        where = "(state = ? AND next_attempt > ?) OR (state = ? AND confirm_deadline > ?)"
        if not self._query(f"SELECT COUNT(*) AS n FROM deliveries WHERE {where}", args)[0]["n"]:
            return 0
        with self.tx() as c:
            n = c.execute("UPDATE deliveries SET next_attempt = ? WHERE state = ? AND next_attempt > ?",
                          (now + retry_max_s, *args[:2])).rowcount
            n += c.execute("UPDATE deliveries SET confirm_deadline = ? WHERE state = ? AND confirm_deadline > ?",
                           (now + confirm_max_s, *args[2:])).rowcount
            return int(n)

    def due_deliveries(self, now: float) -> list[Delivery]:
        """Pending deliveries whose next attempt is due at ``now`` (Unix seconds)."""
        rows = self._query("SELECT * FROM deliveries WHERE state = ? AND next_attempt <= ? ORDER BY id",
                           (DeliveryState.PENDING, now))
        return [delivery_of(r) for r in rows]

    def delivery_done(self, delivery_id: int) -> None:
        """A successful attempt: the delivery is delivered."""
        with self.tx() as c:
            c.execute("UPDATE deliveries SET state = ?, reason = '', attempts = attempts + 1, updated = ? WHERE id = ?",
                      (DeliveryState.DELIVERED, time.time(), delivery_id))

    def delivery_sent(self, delivery_id: int, method: str, sop_refs: Sequence[Sequence[str]], note: str,
                      transaction_uid: str = "", deadline: float = 0.0) -> None:
        """The files were accepted; the confirmation by ``method`` is awaited until ``deadline`` (Unix seconds).
        ``sop_refs``: (study, series, SOP class, SOP instance) of each file; ``transaction_uid``: the Storage
        Commitment request (recorded before it is sent, so a report that arrives at once, or after a restart,
        finds it). The attempt is counted when it ends (confirmed, unconfirmed or failed)."""
        with self.tx() as c:
            c.execute("UPDATE deliveries SET state = ?, confirm_method = ?, expected = ?, confirmed = NULL,"
                      " confirmed_at = NULL, confirm_note = ?, transaction_uid = ?, sop_refs = ?, confirm_deadline = ?,"
                      " updated = ? WHERE id = ?",
                      (DeliveryState.SENT, method, len(sop_refs), note, transaction_uid,
                       json.dumps([list(r) for r in sop_refs]), deadline, time.time(), delivery_id))

    def delivery_confirmed(self, delivery_id: int, method: str, expected: int | None, confirmed: int | None,
                           note: str, state: DeliveryState = DeliveryState.DELIVERED) -> None:
        """An attempt that ended in ``state`` (delivered, or unconfirmed: the destination can confirm nothing):
        ``confirmed`` of ``expected`` instances found by ``method``, ``note`` says how (or why not)."""
        now = time.time()
        with self.tx() as c:
            c.execute("UPDATE deliveries SET state = ?, reason = '', attempts = attempts + 1, confirm_method = ?,"
                      " expected = ?, confirmed = ?, confirmed_at = ?, confirm_note = ?, transaction_uid = '',"
                      " confirm_deadline = 0, updated = ? WHERE id = ?",
                      (state, method, expected, confirmed, now if state is DeliveryState.DELIVERED else None, note,
                       now, delivery_id))

    def delivery(self, delivery_id: int) -> Delivery | None:
        """One delivery by id (None when there is none)."""
        rows = self._query("SELECT * FROM deliveries WHERE id = ?", (delivery_id,))
        return delivery_of(rows[0]) if rows else None

    def delivery_by_transaction(self, transaction_uid: str) -> Delivery | None:
        """The delivery awaiting the Storage Commitment report of ``transaction_uid`` (state 'sent'), or None."""
        if not transaction_uid:
            return None
        rows = self._query("SELECT * FROM deliveries WHERE transaction_uid = ? AND state = ?",
                           (transaction_uid, DeliveryState.SENT))
        return delivery_of(rows[0]) if rows else None

    def delivery_failed(self, delivery_id: int, reason: str, next_attempt: float | None,
                        confirmed: int | None = None) -> None:
        """A failed attempt: retry at ``next_attempt`` (Unix seconds), or dead-letter (None). ``confirmed``: what a
        confirmation that found too few instances counted (kept for status; the expected count stays)."""
        state = DeliveryState.PENDING if next_attempt is not None else DeliveryState.DEAD_LETTER
        with self.tx() as c:
            c.execute("UPDATE deliveries SET state = ?, reason = ?, attempts = attempts + 1, next_attempt = ?,"
                      " confirmed = ?, transaction_uid = '', confirm_deadline = 0, updated = ? WHERE id = ?",
                      (state, reason, next_attempt or 0.0, confirmed, time.time(), delivery_id))

    def requeue_deliveries(self, job_id: int | None = None) -> int:
        """dead-letter → pending (attempts reset), of one job or all; returns how many. Jobs in 'dead-letter'
        that now have a pending delivery go back to 'sending'."""
        now = time.time()
        sql = ("UPDATE deliveries SET state = ?, attempts = 0, next_attempt = 0, reason = 'retry requested',"
               " updated = ? WHERE state = ?")
        args: list[Any] = [DeliveryState.PENDING, now, DeliveryState.DEAD_LETTER]
        if job_id is not None:
            sql += " AND job_id = ?"
            args.append(job_id)
        with self.tx() as c:
            cur = c.execute(sql, args)
            n = cur.rowcount
            ids = [r["job_id"] for r in c.execute("SELECT DISTINCT job_id FROM deliveries WHERE state = ?",
                                                  (DeliveryState.PENDING,))]
            for jid in ids:
                c.execute("UPDATE jobs SET state = ?, reason = 'delivery retry requested', updated = ?"
                          " WHERE id = ? AND state = ?", (JobState.SENDING, now, jid, JobState.DEAD_LETTER))
        return n

    def settle_job(self, job_id: int) -> JobState:
        """After a delivery changed: the job is 'delivered' when all are (delivered, or unconfirmed: then its
        reason names those destinations and why), 'dead-letter' when any is and none is pending or sent; otherwise
        it stays 'sending'. A job in another state is left alone. Returns the job's state; SpoolError when there
        is no such job."""
        ds = self.deliveries(job_id)
        job = self.job(job_id)
        if job.state not in (JobState.SENDING, JobState.DEAD_LETTER, JobState.DELIVERED):
            return job.state
        bad = [d for d in ds if d.state is DeliveryState.DEAD_LETTER]
        if any(d.state in (DeliveryState.PENDING, DeliveryState.SENT) for d in ds):
            state, reason = JobState.SENDING, ""
        elif bad:
            state = JobState.DEAD_LETTER
            reason = "; ".join(f"{d.destination}: {d.reason}" for d in bad)
        else:
            state = JobState.DELIVERED
            reason = "; ".join(f"{d.destination}: sent, unconfirmed: {d.confirm_note}" for d in ds
                               if d.state is DeliveryState.UNCONFIRMED)
        if state != job.state or reason != job.reason:
            self.finish_job(job_id, state, reason)
        return state
