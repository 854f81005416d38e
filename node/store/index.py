"""The spool index: the state of every instance, series, job and delivery, and its transitions.

State machines (every change records a reason in words; the states are ``node.store.states``):

- series: receiving → stable → queued → processing → sending → delivered | failed | ignored | dead-letter; a
  late instance puts a series back to receiving, and the next stable point makes a new job that supersedes the
  earlier one. A series is keyed by its study and its SeriesInstanceUID: two studies that share a
  SeriesInstanceUID are two series.
- jobs: queued → processing → sending → delivered | failed | dead-letter; ignored (no rule matched);
  superseded (a later job of the same series replaced it while queued).
- deliveries (the outbox, one row per job and destination): pending → delivered | dead-letter.

Times (``received_at``, ``created``, ``updated``, ``next_attempt``, ...) are Unix seconds (``time.time()``).

When a series is complete (the watcher, ``node.jobs.watcher``, asks :meth:`Index.quiet_series` and
:meth:`Index.complete_series`): quiet for ``stable_age_s`` (``last_received``: the last instance, or the last
plain duplicate while still receiving: a resend is activity), or sooner when it declares its size and that many
distinct instances arrived (``declared_instances``, ``declared_by``): its headers agree on ImagesInAcquisition
(:class:`SizeHint`), or a puller / the Orthanc plugin said how many it sent (:meth:`Index.declare_series`).

Storage (SQLite in WAL mode, safe across threads and processes; a connection per thread; writes that must not
race, such as claiming a job, in BEGIN IMMEDIATE transactions) is ``node.store.schema``.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from node.errors import SpoolError
from node.store.schema import Delivery, IndexDB, Instance, Job, delivery_of, instance_of, job_of, series_of
from node.store.states import JOB_DONE_STATES, DeliveryState, JobState, SeriesState, series_state_of

log = logging.getLogger(__name__)

SeriesKey = tuple[str, str]  # (StudyInstanceUID, SeriesInstanceUID)

HEADER_DECLARED = "ImagesInAcquisition"  # declared_by of a size the series' headers agree on
MIXED = "mixed"  # header_sig once two instances of a series said different things about its size


@dataclass(frozen=True)
class SizeHint:
    """What one instance's header says about the size of its series (read at admission, no pixels).

    ``signature``: the values that must agree across every instance of the series for the size to be trusted
    (e.g. ``"ImagesInAcquisition=200 NumberOfFrames=1 AcquisitionNumber=1"``; ``""``: the header says nothing, so
    a series of such instances declares no size). ``instances``: the distinct instance count the header implies
    (ImagesInAcquisition / NumberOfFrames when that divides; 0: none).
    """

    signature: str = ""
    instances: int = 0


NO_HINT = SizeHint()


def poison_reason(attempts: int, max_attempts: int) -> str:
    """Why a job is failed as poison: its ``attempts`` runs each stopped the process (killed, out of memory)."""
    return (f"poison: the node stopped {attempts} time(s) while processing this job (killed? out of memory?); "
            f"node.max_job_attempts = {max_attempts}, so it is not run again ('srnode retry' re-queues it)")


def _marks(values: Sequence[object]) -> str:
    """``?,?,...`` for an ``IN (...)`` of ``values`` (bound, never formatted into the SQL)."""
    return ",".join("?" * len(values))


def _of_series(series_uid: str, study_uid: str) -> tuple[str, list[str]]:
    """``WHERE`` text and arguments for a series (and its study, when given)."""
    if study_uid:
        return "series_uid = ? AND study_uid = ?", [series_uid, study_uid]
    return "series_uid = ?", [series_uid]


class Index(IndexDB):
    """The spool index at ``path`` (created on first use); errors as ``IndexDB``."""

    # ------------------------------------------------------------------------------------ instances, series

    def add_instance(self, inst: Instance, modality: str, size: int, hint: SizeHint = NO_HINT) -> bool:
        """Record a received instance of ``size`` bytes; False if its SOPInstanceUID was known (kept once; nothing
        changes: see :meth:`note_duplicate`).

        The series is created in 'receiving', or put back to 'receiving' (a late instance after processing).
        ``hint``: what the instance's header says about the series' size; the series declares that size
        (``declared_by`` ImagesInAcquisition) while every instance's hint has the same signature, and stops
        declaring it (logged) at the first that differs. A series receiving more instances than declared is
        logged and left to the quiet period. SpoolError when the index cannot be written.
        """
        now = time.time()
        with self.tx() as c:
            cur = c.execute(
                "INSERT OR IGNORE INTO instances (sop_uid, series_uid, study_uid, sop_class, transfer_syntax, path,"
                " calling_ae, allowed_rules, size, received_at) VALUES (?,?,?,?,?,?,?,?,?,?)",
                (inst.sop_uid, inst.series_uid, inst.study_uid, inst.sop_class, inst.transfer_syntax, inst.path,
                 inst.calling_ae, inst.allowed_rules, size, now))
            if cur.rowcount == 0:
                return False
            row = c.execute("SELECT state, n_instances, declared_instances, declared_by, header_sig FROM series"
                            " WHERE study_uid = ? AND series_uid = ?", (inst.study_uid, inst.series_uid)).fetchone()
            if row is None:
                declared = hint.instances if hint.signature and hint.instances > 0 else None
                c.execute(
                    "INSERT INTO series (series_uid, study_uid, modality, calling_ae, allowed_rules, state,"
                    " n_instances, first_received, last_received, declared_instances, declared_by, header_sig)"
                    " VALUES (?,?,?,?,?,?,1,?,?,?,?,?)",
                    (inst.series_uid, inst.study_uid, modality, inst.calling_ae, inst.allowed_rules,
                     SeriesState.RECEIVING, now, now, declared, HEADER_DECLARED if declared else "",
                     hint.signature))
                return True
            was = row["state"]
            reason = "" if was == SeriesState.RECEIVING else f"late instance after the series was {was}"
            c.execute(
                "UPDATE series SET n_instances = n_instances + 1, last_received = ?, state = ?,"
                " reason = CASE WHEN ? = '' THEN reason ELSE ? END WHERE study_uid = ? AND series_uid = ?",
                (now, SeriesState.RECEIVING, reason, reason, inst.study_uid, inst.series_uid))
            declared, by = row["declared_instances"], row["declared_by"]
            sig = row["header_sig"]
            if sig is not None and sig != MIXED and sig != hint.signature:
                c.execute("UPDATE series SET header_sig = ? WHERE study_uid = ? AND series_uid = ?",
                          (MIXED, inst.study_uid, inst.series_uid))
                if by == HEADER_DECLARED:
                    declared = None
                    c.execute("UPDATE series SET declared_instances = NULL, declared_by = ''"
                              " WHERE study_uid = ? AND series_uid = ?", (inst.study_uid, inst.series_uid))
                if sig:  # the first instances declared a size: say why it is no longer trusted
                    log.warning("series %s (study %s): its instances disagree on their size (%r, then %r): no size"
                                " declared by the headers, the series completes by the quiet period%s",
                                inst.series_uid, inst.study_uid, sig, hint.signature,
                                f" (still declared by {by}: {declared})" if declared is not None else "")
            n = int(row["n_instances"]) + 1
            if declared is not None and n == int(declared) + 1:
                log.warning("series %s (study %s): more instances (%d) than declared (%d, by %s): the series "
                            "completes by the quiet period", inst.series_uid, inst.study_uid, n, declared, by)
        return True

    def note_duplicate(self, study_uid: str, series_uid: str) -> bool:
        """A plain duplicate (same SOPInstanceUID, same content) of an instance of this series arrived: while the
        series is 'receiving' its quiet timer restarts (``last_received`` = now; ``n_instances`` unchanged), since
        a sender resending a series (after a restart of the node, an aborted association) is still sending it.
        A series in any other state is left alone (a resend of a processed series brings nothing new). Returns
        whether the series was touched; SpoolError when the index cannot be written."""
        with self.tx() as c:
            cur = c.execute("UPDATE series SET last_received = MAX(last_received, ?) WHERE study_uid = ? AND"
                            " series_uid = ? AND state = ?",
                            (time.time(), study_uid, series_uid, SeriesState.RECEIVING))
            return cur.rowcount >= 1

    def declare_series(self, study_uid: str, series_uid: str, instances: int, by: str) -> dict[str, Any] | None:
        """Declare that series (``study_uid``, ``series_uid``) holds ``instances`` distinct instances, said by
        ``by`` (a puller, the Orthanc plugin's HTTP hint; in words, e.g. "c-move", "http"). It overrides what the
        headers declare; a later declaration replaces it. Once that many distinct instances are in, the watcher
        completes the series after ``[node] declared_settle_s``; with more, the quiet period applies (logged).

        Returns the series row after the change, None when the series is not in the index (nothing of it was
        received: the declaration is not kept). ValueError when ``instances`` < 1; SpoolError when the index
        cannot be written.
        """
        if instances < 1:
            raise ValueError(f"a declared series size must be >= 1 instance, not {instances}")
        with self.tx() as c:
            cur = c.execute("UPDATE series SET declared_instances = ?, declared_by = ? WHERE study_uid = ? AND"
                            " series_uid = ?", (instances, by, study_uid, series_uid))
            if cur.rowcount == 0:
                return None
            row = c.execute("SELECT * FROM series WHERE study_uid = ? AND series_uid = ?",
                            (study_uid, series_uid)).fetchone()
        if int(row["n_instances"]) > instances:
            log.warning("series %s (study %s): %s declares %d instance(s), %d are in: more than declared, the "
                        "series completes by the quiet period", series_uid, study_uid, by, instances,
                        row["n_instances"])
        return series_of(row)

    def has_instance(self, sop_uid: str) -> bool:
        """Whether an instance with this SOPInstanceUID is recorded."""
        return bool(self._query("SELECT 1 FROM instances WHERE sop_uid = ?", (sop_uid,)))

    def instance(self, sop_uid: str) -> Instance | None:
        """The instance recorded under ``sop_uid``, or None."""
        rows = self._query("SELECT * FROM instances WHERE sop_uid = ?", (sop_uid,))
        return instance_of(rows[0]) if rows else None

    def instances_of(self, series_uid: str, study_uid: str = "") -> list[Instance]:
        """The series' instances (of one study when ``study_uid`` is given: the node always gives it), in order of
        arrival (then SOPInstanceUID); [] for an unknown series."""
        where, args = _of_series(series_uid, study_uid)
        rows = self._query(f"SELECT * FROM instances WHERE {where} ORDER BY received_at, sop_uid", args)
        return [instance_of(r) for r in rows]

    def count_instances(self) -> int:
        """How many instances the index records (all series)."""
        return int(self._query("SELECT COUNT(*) AS n FROM instances")[0]["n"])

    def indexed_sops(self) -> set[str]:
        """The SOPInstanceUID of every indexed instance (start-up compares them with the spool's files)."""
        return {r["sop_uid"] for r in self._query("SELECT sop_uid FROM instances")}

    def series(self, series_uid: str, study_uid: str = "") -> dict[str, Any] | None:
        """The series row as a dict (its ``state`` a ``SeriesState``), or None.

        Without ``study_uid``: the one series of that UID; SpoolError when studies share it.
        """
        where, args = _of_series(series_uid, study_uid)
        rows = self._query(f"SELECT * FROM series WHERE {where}", args)
        if len(rows) > 1:
            raise SpoolError(f"index: series {series_uid} exists in {len(rows)} studies; name the study")
        return series_of(rows[0]) if rows else None

    def all_series(self) -> list[dict[str, Any]]:
        """Every series row, oldest first (as ``series``)."""
        return [series_of(r) for r in self._query("SELECT * FROM series ORDER BY first_received")]

    def quiet_series(self, quiet_since: float) -> list[SeriesKey]:
        """(study, series) of the series still 'receiving' whose last instance arrived before ``quiet_since``."""
        rows = self._query("SELECT study_uid, series_uid FROM series WHERE state = ? AND last_received < ?"
                           " ORDER BY first_received", (SeriesState.RECEIVING, quiet_since))
        return [(r["study_uid"], r["series_uid"]) for r in rows]

    def complete_series(self, settled_since: float) -> list[SeriesKey]:
        """(study, series) of the series still 'receiving' that hold exactly their declared number of distinct
        instances, the last of them (or a duplicate) received before ``settled_since`` (Unix seconds)."""
        rows = self._query("SELECT study_uid, series_uid FROM series WHERE state = ? AND declared_instances IS NOT"
                           " NULL AND n_instances = declared_instances AND last_received < ? ORDER BY first_received",
                           (SeriesState.RECEIVING, settled_since))
        return [(r["study_uid"], r["series_uid"]) for r in rows]

    def receiving_series(self) -> list[dict[str, Any]]:
        """The series still 'receiving' or 'stable' (no job yet), oldest first (as ``series``)."""
        rows = self._query("SELECT * FROM series WHERE state IN (?, ?) ORDER BY first_received",
                           (SeriesState.RECEIVING, SeriesState.STABLE))
        return [series_of(r) for r in rows]

    def mark_stable(self, series_uid: str, quiet_since: float, study_uid: str = "", complete: bool = False) -> bool:
        """receiving → stable, only if no instance arrived since ``quiet_since`` (Unix seconds; atomic against
        ingest). ``complete``: only if the series also holds exactly its declared number of instances
        (:meth:`complete_series`; ``quiet_since`` is then the end of the settle time)."""
        where, args = _of_series(series_uid, study_uid)
        declared = " AND declared_instances IS NOT NULL AND n_instances = declared_instances" if complete else ""
        with self.tx() as c:
            cur = c.execute(f"UPDATE series SET state = ?, reason = '' WHERE {where}"
                            f" AND state = ? AND last_received < ?{declared}",
                            (SeriesState.STABLE, *args, SeriesState.RECEIVING, quiet_since))
            return cur.rowcount >= 1

    # ------------------------------------------------------------------------------------ jobs

    def create_job(self, series_uid: str, rule: str, state: JobState = JobState.QUEUED, reason: str = "",
                   study_uid: str = "") -> int:
        """A new job for the series' current instances. It records the series' earlier job in ``supersedes``, and
        that job, if still queued, becomes superseded.

        ``state`` is queued, or a decision already taken (failed, ignored); the series takes the same state.
        ``study_uid``: the series' study (without it the series UID must be in one study only). Returns the new
        job id. Raises SpoolError for an unknown series or ``state`` superseded, ValueError when ``state`` is no
        ``JobState`` value.
        """
        state = JobState(state)  # a bare string that is no state fails here, not in a query much later
        series_state = series_state_of(state)
        if series_state is None:
            raise SpoolError(f"index: a job cannot be created {state}")
        now = time.time()
        with self.tx() as c:
            where, args = _of_series(series_uid, study_uid)
            found = c.execute(f"SELECT study_uid, n_instances, job_id FROM series WHERE {where}", args).fetchall()
            if not found:
                raise SpoolError(f"index: series {series_uid} is not known")
            if len(found) > 1:
                raise SpoolError(f"index: series {series_uid} exists in {len(found)} studies; name the study")
            s = found[0]
            cur = c.execute(
                "INSERT INTO jobs (series_uid, study_uid, rule, state, reason, n_instances, supersedes, created,"
                " updated) VALUES (?,?,?,?,?,?,?,?,?)",
                (series_uid, s["study_uid"], rule, state, reason, s["n_instances"], s["job_id"], now, now))
            job_id = int(cur.lastrowid or 0)
            if s["job_id"] is not None:
                c.execute("UPDATE jobs SET state = ?, reason = ?, updated = ? WHERE id = ? AND state = ?",
                          (JobState.SUPERSEDED, f"superseded by job {job_id}", now, s["job_id"], JobState.QUEUED))
            c.execute("UPDATE series SET state = ?, reason = ?, job_id = ? WHERE study_uid = ? AND series_uid = ?",
                      (series_state, reason, job_id, s["study_uid"], series_uid))
        return job_id

    def job(self, job_id: int) -> Job:
        """The job ``job_id``; SpoolError when there is none."""
        rows = self._query("SELECT * FROM jobs WHERE id = ?", (job_id,))
        if not rows:
            raise SpoolError(f"index: no job {job_id}")
        return job_of(rows[0])

    def jobs(self, states: Sequence[JobState] = ()) -> list[Job]:
        """Every job (in one of ``states``, when given), oldest first."""
        if states:
            wanted = [JobState(s) for s in states]
            rows = self._query(f"SELECT * FROM jobs WHERE state IN ({_marks(wanted)}) ORDER BY id", wanted)
        else:
            rows = self._query("SELECT * FROM jobs ORDER BY id")
        return [job_of(r) for r in rows]

    def claim_job(self, job_id: int) -> Job | None:
        """queued → processing, atomically; None if another worker has it or it is no longer queued."""
        now = time.time()
        with self.tx() as c:
            cur = c.execute("UPDATE jobs SET state = ?, reason = '', attempts = attempts + 1,"
                            " started = ?, updated = ? WHERE id = ? AND state = ?",
                            (JobState.PROCESSING, now, now, job_id, JobState.QUEUED))
            if cur.rowcount != 1:
                return None
            row = c.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
            c.execute("UPDATE series SET state = ?, reason = '' WHERE study_uid = ? AND series_uid = ? AND job_id = ?"
                      " AND state = ?", (SeriesState.PROCESSING, row["study_uid"], row["series_uid"], job_id,
                                         SeriesState.QUEUED))
        return job_of(row)

    def finish_job(self, job_id: int, state: JobState, reason: str = "", **fields: Any) -> None:
        """Record a job's outcome (and its series', unless a later job has taken the series over).

        ``fields``: derived_series_uid, uncertainty_series_uid, engine, fallback, report (a dict, stored as
        JSON); SpoolError for any other, ValueError when ``state`` is no ``JobState`` value. A done state or
        'sending' also sets ``finished``.
        """
        state = JobState(state)  # a bare string that is no state fails here
        now = time.time()
        allowed = {"derived_series_uid", "uncertainty_series_uid", "engine", "fallback", "report"}
        sets, args = ["state = ?", "reason = ?", "updated = ?"], [state, reason, now]
        if state in JOB_DONE_STATES or state is JobState.SENDING:
            sets.append("finished = ?")
            args.append(now)
        for k, v in fields.items():
            if k not in allowed:
                raise SpoolError(f"index: unknown job field {k!r}")
            sets.append(f"{k} = ?")
            args.append(json.dumps(v, default=str) if k == "report" else v)
        with self.tx() as c:
            c.execute(f"UPDATE jobs SET {', '.join(sets)} WHERE id = ?", (*args, job_id))
            row = c.execute("SELECT study_uid, series_uid FROM jobs WHERE id = ?", (job_id,)).fetchone()
            series_state = series_state_of(state)
            if row is not None and series_state is not None:
                c.execute("UPDATE series SET state = ?, reason = ? WHERE study_uid = ? AND series_uid = ?"
                          " AND job_id = ? AND state NOT IN (?, ?)",
                          (series_state, reason, row["study_uid"], row["series_uid"], job_id,
                           SeriesState.RECEIVING, SeriesState.STABLE))

    def poison_candidates(self, max_attempts: int) -> list[Job]:
        """Jobs left 'processing' whose ``attempts`` reached ``max_attempts`` (read only; what
        :meth:`requeue_interrupted` will fail as poison)."""
        rows = self._query("SELECT * FROM jobs WHERE state = ? AND attempts >= ? ORDER BY id",
                           (JobState.PROCESSING, max_attempts))
        return [job_of(r) for r in rows]

    def requeue_interrupted(self, processing: bool = True, max_attempts: int = 0) -> list[int]:
        """Start-up: jobs left 'processing' by a crash go back to 'queued'; returns every queued job id.

        ``max_attempts`` (> 0): a job left 'processing' that was claimed that many times (``attempts`` is counted
        by :meth:`claim_job` before each run, so it counts the runs that stopped the node) is failed as poison,
        with the reason (:func:`poison_reason`), instead of being run again. ``processing=False`` leaves
        'processing' jobs alone: with Celery workers on a shared spool they may still be running elsewhere, and
        the broker re-delivers the jobs of workers that died.
        """
        now = time.time()
        with self.tx() as c:
            if processing and max_attempts > 0:
                for row in c.execute("SELECT id, attempts FROM jobs WHERE state = ? AND attempts >= ?",
                                     (JobState.PROCESSING, max_attempts)).fetchall():
                    self._fail_poison(c, int(row["id"]), poison_reason(int(row["attempts"]), max_attempts), now)
            if processing:
                c.execute("UPDATE jobs SET state = ?, reason = 'interrupted (node restarted), re-queued',"
                          " updated = ? WHERE state = ?", (JobState.QUEUED, now, JobState.PROCESSING))
                c.execute("UPDATE series SET state = ? WHERE state = ?", (SeriesState.QUEUED, SeriesState.PROCESSING))
            # stable but no job yet (crash between the two): let the watcher decide again
            c.execute("UPDATE series SET state = ? WHERE state = ?", (SeriesState.RECEIVING, SeriesState.STABLE))
            rows = c.execute("SELECT id FROM jobs WHERE state = ? ORDER BY id", (JobState.QUEUED,)).fetchall()
        return [int(r["id"]) for r in rows]

    def fail_poison(self, job_id: int, reason: str) -> None:
        """A job whose runs kept stopping the process: 'failed' with ``reason`` (and its series)."""
        with self.tx() as c:
            self._fail_poison(c, job_id, reason, time.time())

    @staticmethod
    def _fail_poison(c: Any, job_id: int, reason: str, now: float) -> None:
        c.execute("UPDATE jobs SET state = ?, reason = ?, updated = ?, finished = ? WHERE id = ?",
                  (JobState.FAILED, reason, now, now, job_id))
        c.execute("UPDATE series SET state = ?, reason = ? WHERE job_id = ? AND state NOT IN (?, ?)",
                  (SeriesState.FAILED, reason, job_id, SeriesState.RECEIVING, SeriesState.STABLE))

    def requeue_job(self, job_id: int, reason: str = "re-queued by srnode retry") -> bool:
        """failed → queued (and its series), its attempts counted afresh (a poison job gets
        ``node.max_job_attempts`` runs again); False when the job is not 'failed'."""
        now = time.time()
        with self.tx() as c:
            cur = c.execute("UPDATE jobs SET state = ?, reason = ?, updated = ?, attempts = 0"
                            " WHERE id = ? AND state = ?",
                            (JobState.QUEUED, reason, now, job_id, JobState.FAILED))
            if cur.rowcount == 1:
                c.execute("UPDATE series SET state = ?, reason = ? WHERE job_id = ?",
                          (SeriesState.QUEUED, reason, job_id))
            return cur.rowcount == 1

    # ------------------------------------------------------------------------------------ deliveries

    def add_deliveries(self, job_id: int, per_destination: dict[str, list[str]]) -> None:
        """Enqueue the job's files (paths) per destination name (idempotent: a re-run resets the job's rows
        for these destinations to pending, attempts 0)."""
        now = time.time()
        with self.tx() as c:
            for dest, files in per_destination.items():
                c.execute(
                    "INSERT INTO deliveries (job_id, destination, files, state, created, updated)"
                    " VALUES (?,?,?,?,?,?) ON CONFLICT(job_id, destination) DO UPDATE SET"
                    " files = excluded.files, state = excluded.state, attempts = 0, next_attempt = 0, reason = '',"
                    " updated = excluded.updated", (job_id, dest, json.dumps(files), DeliveryState.PENDING, now, now))

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

    def delivery_failed(self, delivery_id: int, reason: str, next_attempt: float | None) -> None:
        """A failed attempt: retry at ``next_attempt`` (Unix seconds), or dead-letter (None)."""
        state = DeliveryState.PENDING if next_attempt is not None else DeliveryState.DEAD_LETTER
        with self.tx() as c:
            c.execute("UPDATE deliveries SET state = ?, reason = ?, attempts = attempts + 1, next_attempt = ?,"
                      " updated = ? WHERE id = ?", (state, reason, next_attempt or 0.0, time.time(), delivery_id))

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
        """After a delivery changed: the job is 'delivered' when all are, 'dead-letter' when any is and none is
        pending; otherwise it stays 'sending'. A job in another state is left alone. Returns the job's state;
        SpoolError when there is no such job."""
        ds = self.deliveries(job_id)
        job = self.job(job_id)
        if job.state not in (JobState.SENDING, JobState.DEAD_LETTER, JobState.DELIVERED):
            return job.state
        bad = [d for d in ds if d.state is DeliveryState.DEAD_LETTER]
        if any(d.state is DeliveryState.PENDING for d in ds):
            state, reason = JobState.SENDING, ""
        elif bad:
            state = JobState.DEAD_LETTER
            reason = "; ".join(f"{d.destination}: {d.reason}" for d in bad)
        else:
            state, reason = JobState.DELIVERED, ""
        if state != job.state or reason != job.reason:
            self.finish_job(job_id, state, reason)
        return state

    # ------------------------------------------------------------------------------------ conflicts

    def add_conflict(self, inst: Instance, via: str, reason: str, kept_path: str, resend_path: str) -> int:
        """Record a resend of a known SOPInstanceUID that differs from the stored copy (kept aside, not used)."""
        with self.tx() as c:
            cur = c.execute(
                "INSERT INTO conflicts (sop_uid, series_uid, study_uid, calling_ae, via, reason, kept_path,"
                " resend_path, received_at) VALUES (?,?,?,?,?,?,?,?,?)",
                (inst.sop_uid, inst.series_uid, inst.study_uid, inst.calling_ae, via, reason, kept_path,
                 resend_path, time.time()))
            return int(cur.lastrowid or 0)

    def conflicts(self) -> list[dict[str, Any]]:
        """Every recorded conflicting resend, oldest first."""
        return [dict(r) for r in self._query("SELECT * FROM conflicts ORDER BY id")]

    def count_conflicts(self) -> int:
        return int(self._query("SELECT COUNT(*) AS n FROM conflicts")[0]["n"])

    def queue_depth(self) -> int:
        """How many jobs are queued or processing."""
        return int(self._query("SELECT COUNT(*) AS n FROM jobs WHERE state IN (?, ?)",
                               (JobState.QUEUED, JobState.PROCESSING))[0]["n"])
