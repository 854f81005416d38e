"""The spool index: SQLite in WAL mode, safe across threads and processes (serve, status, retry, workers).

State machines (every change records a reason in words):

- series: receiving → stable → queued → processing → delivered | failed | ignored; a late instance puts a
  series back to receiving, and the next stable point makes a new job that supersedes the earlier one.
- jobs: queued → processing → sending → delivered | failed | dead-letter (and ignored: no rule matched).
- deliveries (the outbox, one row per job and destination): pending → delivered | dead-letter.

Each thread gets its own connection; writes that must not race (claiming a job) use BEGIN IMMEDIATE.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from node.errors import SpoolError

SCHEMA = """
CREATE TABLE IF NOT EXISTS instances (
    sop_uid TEXT PRIMARY KEY,
    series_uid TEXT NOT NULL,
    study_uid TEXT NOT NULL,
    sop_class TEXT NOT NULL,
    transfer_syntax TEXT NOT NULL,
    path TEXT NOT NULL,
    calling_ae TEXT NOT NULL DEFAULT '',
    allowed_rules TEXT NOT NULL DEFAULT '',
    size INTEGER NOT NULL DEFAULT 0,
    received_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS instances_series ON instances(series_uid);
CREATE TABLE IF NOT EXISTS series (
    series_uid TEXT PRIMARY KEY,
    study_uid TEXT NOT NULL,
    modality TEXT NOT NULL DEFAULT '',
    calling_ae TEXT NOT NULL DEFAULT '',
    allowed_rules TEXT NOT NULL DEFAULT '',
    state TEXT NOT NULL,
    reason TEXT NOT NULL DEFAULT '',
    n_instances INTEGER NOT NULL DEFAULT 0,
    first_received REAL NOT NULL,
    last_received REAL NOT NULL,
    job_id INTEGER
);
CREATE INDEX IF NOT EXISTS series_state ON series(state);
CREATE TABLE IF NOT EXISTS jobs (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    series_uid TEXT NOT NULL,
    study_uid TEXT NOT NULL DEFAULT '',
    rule TEXT NOT NULL DEFAULT '',
    state TEXT NOT NULL,
    reason TEXT NOT NULL DEFAULT '',
    n_instances INTEGER NOT NULL DEFAULT 0,
    attempts INTEGER NOT NULL DEFAULT 0,
    supersedes INTEGER,
    derived_series_uid TEXT NOT NULL DEFAULT '',
    uncertainty_series_uid TEXT NOT NULL DEFAULT '',
    engine TEXT NOT NULL DEFAULT '',
    fallback TEXT NOT NULL DEFAULT '',
    report TEXT NOT NULL DEFAULT '{}',
    created REAL NOT NULL,
    updated REAL NOT NULL,
    started REAL,
    finished REAL
);
CREATE INDEX IF NOT EXISTS jobs_state ON jobs(state);
CREATE TABLE IF NOT EXISTS deliveries (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    job_id INTEGER NOT NULL,
    destination TEXT NOT NULL,
    files TEXT NOT NULL,
    state TEXT NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    next_attempt REAL NOT NULL DEFAULT 0,
    reason TEXT NOT NULL DEFAULT '',
    created REAL NOT NULL,
    updated REAL NOT NULL,
    UNIQUE(job_id, destination)
);
CREATE INDEX IF NOT EXISTS deliveries_state ON deliveries(state, next_attempt);
"""

JOB_DONE_STATES = ("delivered", "failed", "dead-letter", "ignored", "superseded")


@dataclass(frozen=True)
class Job:
    id: int
    series_uid: str
    study_uid: str
    rule: str
    state: str
    reason: str
    n_instances: int
    attempts: int
    supersedes: int | None
    derived_series_uid: str
    uncertainty_series_uid: str
    engine: str
    fallback: str
    report: dict[str, Any]
    created: float
    updated: float


@dataclass(frozen=True)
class Delivery:
    id: int
    job_id: int
    destination: str
    files: list[str]
    state: str
    attempts: int
    next_attempt: float
    reason: str


@dataclass(frozen=True)
class Instance:
    sop_uid: str
    series_uid: str
    study_uid: str
    sop_class: str
    transfer_syntax: str
    path: str
    calling_ae: str
    allowed_rules: str


def _job(row: sqlite3.Row) -> Job:
    return Job(id=row["id"], series_uid=row["series_uid"], study_uid=row["study_uid"], rule=row["rule"],
               state=row["state"], reason=row["reason"], n_instances=row["n_instances"],
               attempts=row["attempts"], supersedes=row["supersedes"],
               derived_series_uid=row["derived_series_uid"], uncertainty_series_uid=row["uncertainty_series_uid"],
               engine=row["engine"], fallback=row["fallback"], report=json.loads(row["report"] or "{}"),
               created=row["created"], updated=row["updated"])


def _delivery(row: sqlite3.Row) -> Delivery:
    return Delivery(id=row["id"], job_id=row["job_id"], destination=row["destination"],
                    files=json.loads(row["files"]), state=row["state"], attempts=row["attempts"],
                    next_attempt=row["next_attempt"], reason=row["reason"])


class Index:
    """The spool index at ``path`` (created on first use)."""

    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)
        self._local = threading.local()
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._conn().executescript(SCHEMA)
        except (OSError, sqlite3.Error) as exc:
            raise SpoolError(f"index {self.path}: cannot open: {exc}") from exc

    def _conn(self) -> sqlite3.Connection:
        c: sqlite3.Connection | None = getattr(self._local, "conn", None)
        if c is None:
            c = sqlite3.connect(self.path, timeout=60.0, isolation_level=None, check_same_thread=False)
            c.row_factory = sqlite3.Row
            c.execute("PRAGMA journal_mode=WAL")
            c.execute("PRAGMA synchronous=FULL")  # a Success status means the row survives a power cut
            c.execute("PRAGMA busy_timeout=60000")
            self._local.conn = c
        return c

    @contextmanager
    def tx(self) -> Iterator[sqlite3.Connection]:
        """One write transaction (BEGIN IMMEDIATE: takes the write lock up front, no upgrade deadlocks)."""
        c = self._conn()
        try:
            c.execute("BEGIN IMMEDIATE")
        except sqlite3.Error as exc:
            raise SpoolError(f"index {self.path}: cannot start a transaction: {exc}") from exc
        try:
            yield c
        except BaseException:
            c.execute("ROLLBACK")
            raise
        else:
            c.execute("COMMIT")

    def _query(self, sql: str, args: Sequence[Any] = ()) -> list[sqlite3.Row]:
        try:
            return list(self._conn().execute(sql, args))
        except sqlite3.Error as exc:
            raise SpoolError(f"index {self.path}: query failed: {exc}") from exc

    def close(self) -> None:
        c = getattr(self._local, "conn", None)
        if c is not None:
            c.close()
            self._local.conn = None

    # ------------------------------------------------------------------------------------ instances, series

    def add_instance(self, inst: Instance, modality: str, size: int) -> bool:
        """Record a received instance; False if its SOPInstanceUID was already known (kept once).

        The series is created in 'receiving', or put back to 'receiving' (a late instance after processing).
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
            row = c.execute("SELECT state FROM series WHERE series_uid = ?", (inst.series_uid,)).fetchone()
            if row is None:
                c.execute(
                    "INSERT INTO series (series_uid, study_uid, modality, calling_ae, allowed_rules, state,"
                    " n_instances, first_received, last_received) VALUES (?,?,?,?,?,'receiving',1,?,?)",
                    (inst.series_uid, inst.study_uid, modality, inst.calling_ae, inst.allowed_rules, now, now))
            else:
                reason = "" if row["state"] == "receiving" else f"late instance after the series was {row['state']}"
                c.execute(
                    "UPDATE series SET n_instances = n_instances + 1, last_received = ?, state = 'receiving',"
                    " reason = CASE WHEN ? = '' THEN reason ELSE ? END WHERE series_uid = ?",
                    (now, reason, reason, inst.series_uid))
        return True

    def has_instance(self, sop_uid: str) -> bool:
        return bool(self._query("SELECT 1 FROM instances WHERE sop_uid = ?", (sop_uid,)))

    def instances_of(self, series_uid: str) -> list[Instance]:
        rows = self._query("SELECT * FROM instances WHERE series_uid = ? ORDER BY received_at, sop_uid",
                           (series_uid,))
        return [Instance(sop_uid=r["sop_uid"], series_uid=r["series_uid"], study_uid=r["study_uid"],
                         sop_class=r["sop_class"], transfer_syntax=r["transfer_syntax"], path=r["path"],
                         calling_ae=r["calling_ae"], allowed_rules=r["allowed_rules"]) for r in rows]

    def count_instances(self) -> int:
        return int(self._query("SELECT COUNT(*) AS n FROM instances")[0]["n"])

    def series(self, series_uid: str) -> dict[str, Any] | None:
        rows = self._query("SELECT * FROM series WHERE series_uid = ?", (series_uid,))
        return dict(rows[0]) if rows else None

    def all_series(self) -> list[dict[str, Any]]:
        return [dict(r) for r in self._query("SELECT * FROM series ORDER BY first_received")]

    def quiet_series(self, quiet_since: float) -> list[str]:
        """Series still 'receiving' whose last instance arrived before ``quiet_since``."""
        rows = self._query("SELECT series_uid FROM series WHERE state = 'receiving' AND last_received < ?",
                           (quiet_since,))
        return [r["series_uid"] for r in rows]

    def set_series_state(self, series_uid: str, state: str, reason: str = "", job_id: int | None = None) -> None:
        with self.tx() as c:
            c.execute("UPDATE series SET state = ?, reason = ?, job_id = COALESCE(?, job_id) WHERE series_uid = ?",
                      (state, reason, job_id, series_uid))

    def mark_stable(self, series_uid: str, quiet_since: float) -> bool:
        """receiving → stable, only if no instance arrived since ``quiet_since`` (atomic against ingest)."""
        with self.tx() as c:
            cur = c.execute("UPDATE series SET state = 'stable', reason = '' WHERE series_uid = ?"
                            " AND state = 'receiving' AND last_received < ?", (series_uid, quiet_since))
            return cur.rowcount == 1

    # ------------------------------------------------------------------------------------ jobs

    def create_job(self, series_uid: str, rule: str, state: str = "queued", reason: str = "") -> int:
        """A new job for the series' current instances; an earlier unfinished or delivered job is superseded."""
        now = time.time()
        with self.tx() as c:
            s = c.execute("SELECT study_uid, n_instances, job_id FROM series WHERE series_uid = ?",
                          (series_uid,)).fetchone()
            if s is None:
                raise SpoolError(f"index: series {series_uid} is not known")
            cur = c.execute(
                "INSERT INTO jobs (series_uid, study_uid, rule, state, reason, n_instances, supersedes, created,"
                " updated) VALUES (?,?,?,?,?,?,?,?,?)",
                (series_uid, s["study_uid"], rule, state, reason, s["n_instances"], s["job_id"], now, now))
            job_id = int(cur.lastrowid or 0)
            if s["job_id"] is not None:
                c.execute("UPDATE jobs SET state = 'superseded', reason = ?, updated = ? WHERE id = ?"
                          " AND state IN ('queued')", (f"superseded by job {job_id}", now, s["job_id"]))
            series_state = "queued" if state == "queued" else state
            c.execute("UPDATE series SET state = ?, reason = ?, job_id = ? WHERE series_uid = ?",
                      (series_state, reason, job_id, series_uid))
        return job_id

    def job(self, job_id: int) -> Job:
        rows = self._query("SELECT * FROM jobs WHERE id = ?", (job_id,))
        if not rows:
            raise SpoolError(f"index: no job {job_id}")
        return _job(rows[0])

    def jobs(self, states: Sequence[str] = ()) -> list[Job]:
        if states:
            marks = ",".join("?" * len(states))
            rows = self._query(f"SELECT * FROM jobs WHERE state IN ({marks}) ORDER BY id", list(states))
        else:
            rows = self._query("SELECT * FROM jobs ORDER BY id")
        return [_job(r) for r in rows]

    def claim_job(self, job_id: int) -> Job | None:
        """queued → processing, atomically; None if another worker has it or it is no longer queued."""
        now = time.time()
        with self.tx() as c:
            cur = c.execute("UPDATE jobs SET state = 'processing', reason = '', attempts = attempts + 1,"
                            " started = ?, updated = ? WHERE id = ? AND state = 'queued'", (now, now, job_id))
            if cur.rowcount != 1:
                return None
            row = c.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
            c.execute("UPDATE series SET state = 'processing', reason = '' WHERE series_uid = ? AND job_id = ?"
                      " AND state = 'queued'", (row["series_uid"], job_id))
        return _job(row)

    def finish_job(self, job_id: int, state: str, reason: str = "", **fields: Any) -> None:
        """Record a job's outcome (and its series', unless a later job has taken the series over)."""
        now = time.time()
        allowed = {"derived_series_uid", "uncertainty_series_uid", "engine", "fallback", "report"}
        sets, args = ["state = ?", "reason = ?", "updated = ?"], [state, reason, now]
        if state in JOB_DONE_STATES or state == "sending":
            sets.append("finished = ?")
            args.append(now)
        for k, v in fields.items():
            if k not in allowed:
                raise SpoolError(f"index: unknown job field {k!r}")
            sets.append(f"{k} = ?")
            args.append(json.dumps(v, default=str) if k == "report" else v)
        with self.tx() as c:
            c.execute(f"UPDATE jobs SET {', '.join(sets)} WHERE id = ?", (*args, job_id))
            row = c.execute("SELECT series_uid FROM jobs WHERE id = ?", (job_id,)).fetchone()
            if row is not None:
                c.execute("UPDATE series SET state = ?, reason = ? WHERE series_uid = ? AND job_id = ?"
                          " AND state NOT IN ('receiving', 'stable')", (state, reason, row["series_uid"], job_id))

    def requeue_interrupted(self, processing: bool = True) -> list[int]:
        """Start-up: jobs left 'processing' by a crash go back to 'queued'; returns every queued job id.

        ``processing=False`` leaves 'processing' jobs alone: with Celery workers on a shared spool they may still
        be running elsewhere, and the broker re-delivers the jobs of workers that died.
        """
        now = time.time()
        with self.tx() as c:
            if processing:
                c.execute("UPDATE jobs SET state = 'queued', reason = 'interrupted (node restarted), re-queued',"
                          " updated = ? WHERE state = 'processing'", (now,))
                c.execute("UPDATE series SET state = 'queued' WHERE state = 'processing'")
            # stable but no job yet (crash between the two): let the watcher decide again
            c.execute("UPDATE series SET state = 'receiving' WHERE state = 'stable'")
            rows = c.execute("SELECT id FROM jobs WHERE state = 'queued' ORDER BY id").fetchall()
        return [int(r["id"]) for r in rows]

    def requeue_job(self, job_id: int, reason: str = "re-queued by srnode retry") -> bool:
        now = time.time()
        with self.tx() as c:
            cur = c.execute("UPDATE jobs SET state = 'queued', reason = ?, updated = ? WHERE id = ?"
                            " AND state IN ('failed')", (reason, now, job_id))
            if cur.rowcount == 1:
                c.execute("UPDATE series SET state = 'queued', reason = ? WHERE job_id = ?", (reason, job_id))
            return cur.rowcount == 1

    # ------------------------------------------------------------------------------------ deliveries

    def add_deliveries(self, job_id: int, per_destination: dict[str, list[str]]) -> None:
        """Enqueue the job's files per destination (idempotent: a re-run replaces pending rows)."""
        now = time.time()
        with self.tx() as c:
            for dest, files in per_destination.items():
                c.execute(
                    "INSERT INTO deliveries (job_id, destination, files, state, created, updated)"
                    " VALUES (?,?,?,'pending',?,?) ON CONFLICT(job_id, destination) DO UPDATE SET"
                    " files = excluded.files, state = 'pending', attempts = 0, next_attempt = 0, reason = '',"
                    " updated = excluded.updated", (job_id, dest, json.dumps(files), now, now))

    def deliveries(self, job_id: int | None = None, states: Sequence[str] = ()) -> list[Delivery]:
        sql, args = "SELECT * FROM deliveries WHERE 1=1", list[Any]()
        if job_id is not None:
            sql += " AND job_id = ?"
            args.append(job_id)
        if states:
            sql += f" AND state IN ({','.join('?' * len(states))})"
            args.extend(states)
        return [_delivery(r) for r in self._query(sql + " ORDER BY id", args)]

    def due_deliveries(self, now: float) -> list[Delivery]:
        rows = self._query("SELECT * FROM deliveries WHERE state = 'pending' AND next_attempt <= ? ORDER BY id",
                           (now,))
        return [_delivery(r) for r in rows]

    def delivery_done(self, delivery_id: int) -> None:
        with self.tx() as c:
            c.execute("UPDATE deliveries SET state = 'delivered', reason = '', attempts = attempts + 1,"
                      " updated = ? WHERE id = ?", (time.time(), delivery_id))

    def delivery_failed(self, delivery_id: int, reason: str, next_attempt: float | None) -> None:
        """A failed attempt: retry at ``next_attempt``, or dead-letter (None)."""
        state = "pending" if next_attempt is not None else "dead-letter"
        with self.tx() as c:
            c.execute("UPDATE deliveries SET state = ?, reason = ?, attempts = attempts + 1, next_attempt = ?,"
                      " updated = ? WHERE id = ?", (state, reason, next_attempt or 0.0, time.time(), delivery_id))

    def requeue_deliveries(self, job_id: int | None = None) -> int:
        """dead-letter → pending (attempts reset); returns how many."""
        now = time.time()
        sql = ("UPDATE deliveries SET state = 'pending', attempts = 0, next_attempt = 0, reason = 'retry requested',"
               " updated = ? WHERE state = 'dead-letter'")
        args: list[Any] = [now]
        if job_id is not None:
            sql += " AND job_id = ?"
            args.append(job_id)
        with self.tx() as c:
            cur = c.execute(sql, args)
            n = cur.rowcount
            ids = [r["job_id"] for r in c.execute("SELECT DISTINCT job_id FROM deliveries WHERE state = 'pending'")]
            for jid in ids:
                c.execute("UPDATE jobs SET state = 'sending', reason = 'delivery retry requested', updated = ?"
                          " WHERE id = ? AND state = 'dead-letter'", (now, jid))
        return n

    def settle_job(self, job_id: int) -> str:
        """After a delivery changed: the job is 'delivered' when all are, 'dead-letter' when any is and none is
        pending; otherwise it stays 'sending'. Returns the job's state."""
        ds = self.deliveries(job_id)
        job = self.job(job_id)
        if job.state not in ("sending", "dead-letter", "delivered"):
            return job.state
        if any(d.state == "pending" for d in ds):
            state, reason = "sending", ""
        elif any(d.state == "dead-letter" for d in ds):
            bad = [d for d in ds if d.state == "dead-letter"]
            state = "dead-letter"
            reason = "; ".join(f"{d.destination}: {d.reason}" for d in bad)
        else:
            state, reason = "delivered", ""
        if state != job.state or reason != job.reason:
            self.finish_job(job_id, state, reason)
        return state

    def queue_depth(self) -> int:
        return int(self._query("SELECT COUNT(*) AS n FROM jobs WHERE state IN ('queued', 'processing')")[0]["n"])
