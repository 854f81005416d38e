"""The jobs of the spool index: created per stable series, claimed atomically, finished with a reason, re-queued
after a crash or by ``srnode retry``, failed as poison after ``max_job_attempts`` runs that stopped the node (or
``[node] max_interrupted_runs``, default :data:`MAX_INTERRUPTED_RUNS`, runs a stop of the node interrupted).

Part of :class:`node.store.index.Index` (its mixin base); times are Unix seconds.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from typing import Any

from node.config import NodeConfig
from node.errors import SpoolError
from node.store.schema import IndexDB, Job, job_of
from node.store.states import JOB_DONE_STATES, JobState, SeriesState, series_state_of


def poison_reason(attempts: int, max_attempts: int) -> str:
    """Why a job is failed as poison: its ``attempts`` runs each stopped the process (killed, out of memory)."""
    return (f"poison: the node stopped {attempts} time(s) while processing this job (killed? out of memory?); "
            f"node.max_job_attempts = {max_attempts}, so it is not run again ('srnode retry' re-queues it)")


# the default of ``[node] max_interrupted_runs``: runs of one job a stop of the node (SIGTERM) interrupted before it
# is failed as poison
MAX_INTERRUPTED_RUNS: int = NodeConfig.max_interrupted_runs


def interrupted_reason(runs: int, max_interrupted: int = MAX_INTERRUPTED_RUNS) -> str:
    """Why a job is failed as poison: ``runs`` of its runs were each still going when the node was stopped (SIGTERM)
    and outlived the stop's wait; a single clean restart is no such failure, a job that hangs under a supervisor
    restarting the node is."""
    return (f"poison: {runs} run(s) of this job were still going when the node was stopped (SIGTERM) and did not end "
            f"within the stop's wait (a hung job, the node restarted by a supervisor?); after "
            f"node.max_interrupted_runs = {max_interrupted}, it is not run again ('srnode retry' re-queues it)")


def _marks(values: Sequence[object]) -> str:
    """``?,?,...`` for an ``IN (...)`` of ``values`` (bound, never formatted into the SQL)."""
    return ",".join("?" * len(values))


def _of_series(series_uid: str, study_uid: str) -> tuple[str, list[str]]:
    """``WHERE`` text and arguments for a series (and its study, when given)."""
    if study_uid:
        return "series_uid = ? AND study_uid = ?", [series_uid, study_uid]
    return "series_uid = ?", [series_uid]


class JobTable(IndexDB):
    """The ``jobs`` table's transitions (and the series state each one implies)."""


    def create_job(self, series_uid: str, rule: str, state: JobState = JobState.QUEUED, reason: str = "",
                   study_uid: str = "", retire: tuple[int, str] | None = None) -> int:
        """A new job for the series' current instances. It records the series' earlier job in ``supersedes``, and
        that job, if still queued, becomes superseded.

        ``state`` is queued, or a decision already taken (failed, ignored); the series takes the same state.
        ``study_uid``: the series' study (without it the series UID must be in one study only). ``retire``: (job id,
        reason) of a dead-letter job this one replays: it becomes 'superseded' with the reason, in the same
        transaction (``node.jobs.replay.redirect``). Returns the new
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
            if retire is not None:
                c.execute("UPDATE jobs SET state = ?, reason = ?, updated = ? WHERE id = ? AND state = ?",
                          (JobState.SUPERSEDED, f"{retire[1]} (job {job_id})", now, retire[0], JobState.DEAD_LETTER))
        return job_id

    def job(self, job_id: int) -> Job:
        """The job ``job_id``; SpoolError when there is none (also for an id no SQLite integer can hold: a
        caller's number, e.g. a dashboard URL, would raise OverflowError)."""
        if not -(2**63) <= job_id < 2**63:
            raise SpoolError(f"index: no job {str(job_id)[:20]}")
        rows = self._query("SELECT * FROM jobs WHERE id = ?", (job_id,))
        if not rows:
            raise SpoolError(f"index: no job {job_id}")
        return job_of(rows[0])

    def jobs(self, states: Sequence[JobState] = (), *, series_uid: str = "", limit: int = 0) -> list[Job]:
        """Every job (in one of ``states``, when given; of series ``series_uid``, when given), oldest first; with
        ``limit`` > 0 only the newest ``limit`` of them (read so by SQLite: a page of a long history no longer
        loads it whole, hostile18)."""
        where: list[str] = []
        args: list[Any] = []
        if states:
            wanted = [JobState(s) for s in states]
            where.append(f"state IN ({_marks(wanted)})")
            args += wanted
        if series_uid:
            where.append("series_uid = ?")
            args.append(series_uid)
        cond = f" WHERE {' AND '.join(where)}" if where else ""
        if limit > 0:
            rows = self._query(f"SELECT * FROM (SELECT * FROM jobs{cond} ORDER BY id DESC LIMIT ?) ORDER BY id",
                               [*args, int(limit)])
        else:
            rows = self._query(f"SELECT * FROM jobs{cond} ORDER BY id", args)
        return [job_of(r) for r in rows]

    def job_counts(self) -> dict[JobState, int]:
        """How many jobs are in each state (those with none left out), counted by SQLite."""
        rows = self._query("SELECT state, COUNT(*) AS n FROM jobs GROUP BY state")
        return {JobState(r["state"]): int(r["n"]) for r in rows}

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
        with self.tx() as c:
            self._finish(c, job_id, state, reason, **fields)

    @staticmethod
    def _finish(c: Any, job_id: int, state: JobState, reason: str = "", **fields: Any) -> None:
        """:meth:`finish_job` inside the caller's transaction ``c``."""
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
        c.execute(f"UPDATE jobs SET {', '.join(sets)} WHERE id = ?", (*args, job_id))
        row = c.execute("SELECT study_uid, series_uid FROM jobs WHERE id = ?", (job_id,)).fetchone()
        series_state = series_state_of(state)
        if row is not None and series_state is not None:
            c.execute("UPDATE series SET state = ?, reason = ? WHERE study_uid = ? AND series_uid = ?"
                      " AND job_id = ? AND state NOT IN (?, ?)",
                      (series_state, reason, row["study_uid"], row["series_uid"], job_id,
                       SeriesState.RECEIVING, SeriesState.STABLE))

    def supersede_if_moved_on(self, job_id: int) -> str:
        """A job about to run, or whose results are about to be enqueued: when its series has moved on since the
        job took it -- a later job of the series exists (two workers), or instances arrived after the job's
        ``n_instances`` (late instances: the series is 'receiving' again) -- its results would be made from part
        of the series, or replaced already, so the job becomes 'superseded' with the reason, which is returned;
        nothing of it is to be sent. The series is decided again once complete (put back to 'receiving' if this
        job still held it in another state). Returns '' when the series is as the job took it; SpoolError."""
        now = time.time()
        with self.tx() as c:
            j = c.execute("SELECT study_uid, series_uid, n_instances, state FROM jobs WHERE id = ?",
                          (job_id,)).fetchone()
            if j is None:
                raise SpoolError(f"index: no job {job_id}")
            s = c.execute("SELECT job_id, state, n_instances FROM series WHERE study_uid = ? AND series_uid = ?",
                          (j["study_uid"], j["series_uid"])).fetchone()
            # the job's n_instances was the series' count when it was made: the same column, compared
            n, took = int(s["n_instances"]) if s is not None else 0, int(j["n_instances"])
            if s is not None and s["job_id"] is not None and int(s["job_id"]) > job_id:
                reason = (f"superseded by job {s['job_id']}: its series was decided again (late instances) before "
                          f"this job's results were sent; they are not sent")
            elif n > took:
                reason = (f"{n - took} instance(s) arrived after it took the series' {took}: its results would be "
                          f"made from part of the series and are not sent; the series is processed again, whole, "
                          f"once complete")
            else:
                return ""
            c.execute("UPDATE jobs SET state = ?, reason = ?, updated = ?, finished = ? WHERE id = ?",
                      (JobState.SUPERSEDED, reason, now, now, job_id))
            c.execute("UPDATE series SET state = ?, reason = ? WHERE study_uid = ? AND series_uid = ? AND job_id = ?"
                      " AND state NOT IN (?, ?)",
                      (SeriesState.RECEIVING, f"job {job_id} superseded: {reason}", j["study_uid"], j["series_uid"],
                       job_id, SeriesState.RECEIVING, SeriesState.STABLE))
        return reason

    def replaced_by(self, job_id: int) -> int | None:
        """The latest later job of ``job_id``'s series that made results (a derived series): its results replace
        this job's, and its IOCM rejection note retires them, so this job's are not to be sent again. None when
        there is none (or no such job)."""
        rows = self._query("SELECT l.id FROM jobs j JOIN jobs l ON l.study_uid = j.study_uid AND l.series_uid ="
                           " j.series_uid AND l.id > j.id AND l.derived_series_uid != '' WHERE j.id = ?"
                           " ORDER BY l.id DESC LIMIT 1", (job_id,))
        return int(rows[0]["id"]) if rows else None

    def poison_candidates(self, max_attempts: int, max_interrupted: int = MAX_INTERRUPTED_RUNS) -> list[Job]:
        """Jobs left 'processing' whose ``attempts`` reached ``max_attempts``, or whose runs a stop interrupted
        ``max_interrupted`` times (``[node] max_interrupted_runs``; read only: what :meth:`requeue_interrupted`
        will fail as poison)."""
        rows = self._query("SELECT * FROM jobs WHERE state = ? AND (attempts >= ? OR interrupted >= ?) ORDER BY id",
                           (JobState.PROCESSING, max_attempts, max_interrupted))
        return [job_of(r) for r in rows]

    def requeue_interrupted(self, processing: bool = True, max_attempts: int = 0,
                            max_interrupted: int = MAX_INTERRUPTED_RUNS) -> list[int]:
        """Start-up: jobs left 'processing' by a crash go back to 'queued'; returns every queued job id.

        ``max_attempts`` (> 0): a job left 'processing' that was claimed that many times (``attempts`` is counted
        by :meth:`claim_job` before each run, so it counts the runs that stopped the node) is failed as poison,
        with the reason (:func:`poison_reason`), instead of being run again; so is one whose runs a stop of the
        node interrupted ``max_interrupted`` times (``[node] max_interrupted_runs``, :meth:`stopped_during`;
        :func:`interrupted_reason`). ``processing=False`` leaves
        'processing' jobs alone: with Celery workers on a shared spool they may still be running elsewhere, and
        the broker re-delivers the jobs of workers that died.
        """
        now = time.time()
        with self.tx() as c:
            if processing and max_attempts > 0:
                for row in c.execute("SELECT id, attempts FROM jobs WHERE state = ? AND attempts >= ?",
                                     (JobState.PROCESSING, max_attempts)).fetchall():
                    self._fail_poison(c, int(row["id"]), poison_reason(int(row["attempts"]), max_attempts), now)
                for row in c.execute("SELECT id, interrupted FROM jobs WHERE state = ? AND interrupted >= ?",
                                     (JobState.PROCESSING, max_interrupted)).fetchall():
                    self._fail_poison(c, int(row["id"]), interrupted_reason(int(row["interrupted"]), max_interrupted),
                                      now)
            if processing:
                c.execute("UPDATE jobs SET state = ?, reason = 'interrupted (node restarted), re-queued',"
                          " updated = ? WHERE state = ?", (JobState.QUEUED, now, JobState.PROCESSING))
                c.execute("UPDATE series SET state = ? WHERE state = ?", (SeriesState.QUEUED, SeriesState.PROCESSING))
            # stable but no job yet (crash between the two): let the watcher decide again
            c.execute("UPDATE series SET state = ? WHERE state = ?", (SeriesState.RECEIVING, SeriesState.STABLE))
            rows = c.execute("SELECT id FROM jobs WHERE state = ? ORDER BY id", (JobState.QUEUED,)).fetchall()
        return [int(r["id"]) for r in rows]

    def stopped_during(self, job_id: int, max_interrupted: int = MAX_INTERRUPTED_RUNS) -> bool:
        """The node is stopping (SIGTERM) while job ``job_id`` still runs and will not wait for it: its run is not
        one that stopped the node (it is re-queued at the next start, ``requeue_interrupted``), so it does not count
        toward ``max_job_attempts`` (``attempts`` back by one): a clean restart is harmless. It is counted apart
        (``interrupted``): a job that hangs while a supervisor keeps restarting the node is failed as poison at the
        start after its ``max_interrupted``-th interrupted run (``[node] max_interrupted_runs``; the reason says
        "n of at most max_interrupted runs"). False when the job is not 'processing'
        any more."""
        with self.tx() as c:
            cur = c.execute("UPDATE jobs SET attempts = MAX(attempts - 1, 0), interrupted = interrupted + 1,"
                            " reason = 'interrupted by the node''s stop (' || (interrupted + 1) || ' of at most ' ||"
                            " ? || ' runs); re-queued at its next start', updated = ? WHERE id = ? AND state = ?",
                            (max_interrupted, time.time(), job_id, JobState.PROCESSING))
            return cur.rowcount == 1

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

    def reconsider_ignored(self, job_id: int,
                           reason: str = "matched against the rules again by srnode retry",
                           state: JobState = JobState.IGNORED) -> bool:
        """An ignored job's series (no rule matched it) goes back to 'receiving', as after a late instance: the
        running node's watcher takes it as stable at its next pass and matches it against its rules as they are
        now (a new job, which supersedes this one). The job stays 'ignored' (its history). ``state`` failed: the
        same for a failed job (its rule is no longer configured, or the rules could not be matched). False when
        the job is not in ``state`` or its series has moved on since (a later job)."""
        state = JobState(state)
        with self.tx() as c:
            row = c.execute("SELECT state FROM jobs WHERE id = ?", (job_id,)).fetchone()
            if row is None or row["state"] != state:
                return False
            cur = c.execute("UPDATE series SET state = ?, reason = ? WHERE job_id = ? AND state = ?",
                            (SeriesState.RECEIVING, reason, job_id, series_state_of(state)))
            return cur.rowcount == 1

    def requeue_job(self, job_id: int, reason: str = "re-queued by srnode retry") -> bool:
        """failed → queued (and its series), its attempts counted afresh (a poison job gets
        ``node.max_job_attempts`` runs again); False when the job is not 'failed'."""
        now = time.time()
        with self.tx() as c:
            cur = c.execute("UPDATE jobs SET state = ?, reason = ?, updated = ?, attempts = 0, interrupted = 0"
                            " WHERE id = ? AND state = ?",
                            (JobState.QUEUED, reason, now, job_id, JobState.FAILED))
            if cur.rowcount == 1:  # a series receiving late instances stays so (the job is superseded at claim)
                c.execute("UPDATE series SET state = ?, reason = ? WHERE job_id = ? AND state NOT IN (?, ?)",
                          (SeriesState.QUEUED, reason, job_id, SeriesState.RECEIVING, SeriesState.STABLE))
            return cur.rowcount == 1
