"""The spool index's storage: the SQLite schema, its row records, and one connection per thread.

WAL mode, safe across threads and processes (serve, status, retry, workers); ``synchronous=FULL`` so a row
survives a power cut once written. Writes that must not race (claiming a job) use ``tx()``: BEGIN IMMEDIATE.
The state transitions live in ``node.store.index``.
"""

from __future__ import annotations

import json
import logging
import sqlite3
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any, TypeVar

from node.errors import SpoolError
from node.store.states import DeliveryState, JobState, SeriesState

log = logging.getLogger(__name__)

# a series is keyed by its study and its SeriesInstanceUID (schema format 1; the first format keyed the UID alone).
# Format 2 added the declared size: declared_instances (the distinct instance count the series is said to hold,
# NULL: nothing trusted declares it), declared_by (who said so: a header attribute, a puller, the HTTP hint) and
# header_sig (what the series' instance headers say about its size: the first instance's signature, 'mixed' once
# an instance disagreed; see node.store.index.SizeHint).
SERIES_TABLE = """CREATE TABLE IF NOT EXISTS series (
    series_uid TEXT NOT NULL,
    study_uid TEXT NOT NULL,
    modality TEXT NOT NULL DEFAULT '',
    calling_ae TEXT NOT NULL DEFAULT '',
    allowed_rules TEXT NOT NULL DEFAULT '',
    state TEXT NOT NULL,
    reason TEXT NOT NULL DEFAULT '',
    n_instances INTEGER NOT NULL DEFAULT 0,
    first_received REAL NOT NULL,
    last_received REAL NOT NULL,
    job_id INTEGER,
    declared_instances INTEGER,
    declared_by TEXT NOT NULL DEFAULT '',
    header_sig TEXT,
    PRIMARY KEY (study_uid, series_uid)
)"""

# format 2's columns, added to a format-1 series table by the migration (name, declaration)
SERIES_COLUMNS_2 = (("declared_instances", "INTEGER"), ("declared_by", "TEXT NOT NULL DEFAULT ''"),
                    ("header_sig", "TEXT"))

# format 3's columns of the deliveries table: how the delivery was confirmed (node.send.confirm). confirm_method
# ('commitment', 'count', 'none', '' before any), expected / confirmed (instances sent / the destination holds),
# confirmed_at (Unix seconds), confirm_note (how, or why not, in words), transaction_uid (the Storage Commitment
# request awaiting its report), sop_refs (JSON [[study, series, SOP class, SOP instance], ...] of what was sent),
# confirm_deadline (Unix seconds: the report is overdue after it). Added by the migration to every index, a new
# one too (a fresh index starts at format 0), so a migrated index's schema is the same text as a new one's.
DELIVERY_COLUMNS_3 = (("confirm_method", "TEXT NOT NULL DEFAULT ''"), ("expected", "INTEGER"),
                      ("confirmed", "INTEGER"), ("confirmed_at", "REAL"), ("confirm_note", "TEXT NOT NULL DEFAULT ''"),
                      ("transaction_uid", "TEXT NOT NULL DEFAULT ''"), ("sop_refs", "TEXT NOT NULL DEFAULT '[]'"),
                      ("confirm_deadline", "REAL NOT NULL DEFAULT 0"))
# format 4: jobs count the runs a stop of the node (SIGTERM) interrupted, in a row (``JobTable.stopped_during``)
JOB_COLUMNS_4 = (("interrupted", "INTEGER NOT NULL DEFAULT 0"),)

SCHEMA = f"""
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
CREATE INDEX IF NOT EXISTS instances_study_series ON instances(study_uid, series_uid);
{SERIES_TABLE};
CREATE INDEX IF NOT EXISTS series_state ON series(state);
CREATE INDEX IF NOT EXISTS series_uid ON series(series_uid);
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
    report TEXT NOT NULL DEFAULT '{{}}',
    created REAL NOT NULL,
    updated REAL NOT NULL,
    started REAL,
    finished REAL
);
CREATE INDEX IF NOT EXISTS jobs_state ON jobs(state);
CREATE INDEX IF NOT EXISTS jobs_series ON jobs(study_uid, series_uid);
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
CREATE TABLE IF NOT EXISTS conflicts (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    sop_uid TEXT NOT NULL,
    series_uid TEXT NOT NULL,
    study_uid TEXT NOT NULL,
    calling_ae TEXT NOT NULL DEFAULT '',
    via TEXT NOT NULL DEFAULT '',
    reason TEXT NOT NULL,
    kept_path TEXT NOT NULL,
    resend_path TEXT NOT NULL,
    received_at REAL NOT NULL
);
"""

@dataclass(frozen=True)
class Job:
    """A row of ``jobs``: one processing of a series' instances under a rule.

    ``supersedes``: the series' earlier job, if any; ``report``: the job's figures (JSON object); ``created``
    / ``updated``: Unix seconds.
    """

    id: int
    series_uid: str
    study_uid: str
    rule: str
    state: JobState
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
    interrupted: int = 0  # runs in a row a stop of the node (SIGTERM) interrupted (``JobTable.stopped_during``)

    @property
    def derived_series_uids(self) -> list[str]:
        """Every derived SeriesInstanceUID of the result (one per volume / run: an fMRI of 3 volumes has 3), in
        order; ``derived_series_uid`` is the first. A job recorded before the report listed them: that one."""
        uids = [str(u) for u in self.report.get("derived_series_uids", []) or []] or [self.derived_series_uid]
        return [u for u in dict.fromkeys(uids) if u]

    @property
    def uncertainty_series_uids(self) -> list[str]:
        """Every uncertainty SeriesInstanceUID of the result (a Parametric Map per derived series, then the SC
        sigma cards), in order; ``uncertainty_series_uid`` is the first. An older job: that one."""
        uids = [str(u) for u in self.report.get("uncertainty_series_uids", []) or []] or [self.uncertainty_series_uid]
        uids += [str(u) for u in self.report.get("sigma_card_series_uids", []) or []]
        return [u for u in dict.fromkeys(uids) if u]


@dataclass(frozen=True)
class Delivery:
    """A row of ``deliveries`` (the outbox): a job's files (paths) for one destination.

    ``next_attempt``: Unix seconds (0: now); ``reason``: the last failure, in words. The confirmation
    (``node.send.confirm``): ``confirm_method`` ('commitment', 'count', 'none'; '' before the first), ``expected``
    and ``confirmed`` instances (None: not known), ``confirmed_at`` (Unix seconds), ``confirm_note`` (how, or why
    not, in words), ``transaction_uid`` (the Storage Commitment request awaiting its report), ``sop_refs`` ((study,
    series, SOP class, SOP instance) of each file sent), ``confirm_deadline`` (Unix seconds).
    """

    id: int
    job_id: int
    destination: str
    files: list[str]
    state: DeliveryState
    attempts: int
    next_attempt: float
    reason: str
    confirm_method: str = ""
    expected: int | None = None
    confirmed: int | None = None
    confirmed_at: float | None = None
    confirm_note: str = ""
    transaction_uid: str = ""
    sop_refs: tuple[tuple[str, str, str, str], ...] = ()
    confirm_deadline: float = 0.0


@dataclass(frozen=True)
class Instance:
    """A row of ``instances``: one received SOP instance and where the spool keeps it.

    ``allowed_rules``: the rule names its caller may use, comma-separated ("" = every rule).
    """

    sop_uid: str
    series_uid: str
    study_uid: str
    sop_class: str
    transfer_syntax: str
    path: str
    calling_ae: str
    allowed_rules: str


_S = TypeVar("_S", bound=StrEnum)


def state_of(kind: type[_S], row: sqlite3.Row, table: str) -> _S:
    """The row's ``state`` column as a member of ``kind``; SpoolError naming the row when it is none."""
    try:
        return kind(row["state"])
    except ValueError:
        raise SpoolError(f"index: {table} row {row[0]!r} has an unknown state {row['state']!r}") from None


def job_of(row: sqlite3.Row) -> Job:
    """A ``jobs`` row as a record."""
    return Job(id=row["id"], series_uid=row["series_uid"], study_uid=row["study_uid"], rule=row["rule"],
               state=state_of(JobState, row, "jobs"), reason=row["reason"], n_instances=row["n_instances"],
               attempts=row["attempts"], supersedes=row["supersedes"],
               derived_series_uid=row["derived_series_uid"], uncertainty_series_uid=row["uncertainty_series_uid"],
               engine=row["engine"], fallback=row["fallback"], report=json.loads(row["report"] or "{}"),
               created=row["created"], updated=row["updated"], interrupted=row["interrupted"])


def delivery_of(row: sqlite3.Row) -> Delivery:
    """A ``deliveries`` row as a record."""
    return Delivery(id=row["id"], job_id=row["job_id"], destination=row["destination"],
                    files=json.loads(row["files"]), state=state_of(DeliveryState, row, "deliveries"), attempts=row["attempts"],
                    next_attempt=row["next_attempt"], reason=row["reason"], confirm_method=row["confirm_method"],
                    expected=row["expected"], confirmed=row["confirmed"], confirmed_at=row["confirmed_at"],
                    confirm_note=row["confirm_note"], transaction_uid=row["transaction_uid"],
                    sop_refs=tuple(tuple(r) for r in json.loads(row["sop_refs"] or "[]")),  # type: ignore[misc]
                    confirm_deadline=row["confirm_deadline"])


def series_of(row: sqlite3.Row) -> dict[str, Any]:
    """A ``series`` row as a dict, its ``state`` a ``SeriesState``."""
    d = dict(row)
    d["state"] = state_of(SeriesState, row, "series")
    return d


def instance_of(row: sqlite3.Row) -> Instance:
    """An ``instances`` row as a record."""
    return Instance(sop_uid=row["sop_uid"], series_uid=row["series_uid"], study_uid=row["study_uid"],
                    sop_class=row["sop_class"], transfer_syntax=row["transfer_syntax"], path=row["path"],
                    calling_ae=row["calling_ae"], allowed_rules=row["allowed_rules"])


SCHEMA_VERSION = 4  # PRAGMA user_version: 0 = the first format (series keyed by SeriesInstanceUID alone), 1 = series
# keyed by (study, series), 2 = the series' declared size (declared_instances, declared_by, header_sig), 3 = the
# deliveries' confirmation (DELIVERY_COLUMNS_3), 4 = the jobs' interrupted runs (JOB_COLUMNS_4)

# the first format's series table keyed one series UID to one row, whatever the study: two studies sharing a
# SeriesInstanceUID were one series (one job, one derived series holding both). Version 1 keys a series by
# (study, series); the migration gives every (study, series) of the instances its own row, and a series whose
# row held instances of more than one study goes back to 'receiving', so it is processed again on its own (the
# new job supersedes the fused one).
_MIGRATE_TO_1 = f"""
ALTER TABLE series RENAME TO series_v0;
{SERIES_TABLE};
INSERT INTO series (series_uid, study_uid, modality, calling_ae, allowed_rules, state, reason, n_instances,
                    first_received, last_received, job_id)
    SELECT series_uid, study_uid, modality, calling_ae, allowed_rules, state, reason, n_instances, first_received,
           last_received, job_id FROM series_v0;
INSERT OR IGNORE INTO series (series_uid, study_uid, modality, calling_ae, allowed_rules, state, reason,
                              n_instances, first_received, last_received)
    SELECT i.series_uid, i.study_uid, s.modality, MIN(i.calling_ae), MIN(i.allowed_rules),
           '{SeriesState.RECEIVING.value}', 'index migration: a series of another study shares this SeriesInstanceUID',
           COUNT(*), MIN(i.received_at), MAX(i.received_at)
    FROM instances i LEFT JOIN series_v0 s ON s.series_uid = i.series_uid GROUP BY i.study_uid, i.series_uid;
UPDATE series SET
    state = '{SeriesState.RECEIVING.value}',
    reason = 'index migration: instances of another study shared this SeriesInstanceUID, processed again alone'
    WHERE job_id IS NOT NULL AND EXISTS (SELECT 1 FROM instances i WHERE i.series_uid = series.series_uid
                                         AND i.study_uid != series.study_uid);
UPDATE series SET n_instances = (SELECT COUNT(*) FROM instances i
                                 WHERE i.study_uid = series.study_uid AND i.series_uid = series.series_uid)
    WHERE EXISTS (SELECT 1 FROM instances i WHERE i.series_uid = series.series_uid);
DROP TABLE series_v0;
"""

# indexes on columns that an earlier format lacks: created once the migration added them
AFTER_MIGRATION = "CREATE INDEX IF NOT EXISTS deliveries_transaction ON deliveries(transaction_uid);"

DAMAGED_HINT = "move it aside (with its -wal and -shm files) and run `srnode reindex` to rebuild it from the spool"


class IndexDamaged(SpoolError):
    """The index file is not a readable SQLite database (garbage written into it, a disk error)."""


def damaged(path: Path, exc: BaseException | str) -> IndexDamaged:
    """The IndexDamaged error for ``path``, with what to do."""
    return IndexDamaged(f"index {path} is damaged ({exc}); {DAMAGED_HINT}")


def _is_damage(exc: sqlite3.Error) -> bool:
    text = str(exc).lower()
    return isinstance(exc, sqlite3.DatabaseError) and any(
        w in text for w in ("not a database", "malformed", "corrupt", "disk i/o error"))


class IndexDB:
    """The SQLite file at ``path`` (created, with its schema, on first use) and a connection per thread.

    An index written by the first format is migrated on open (``SCHEMA_VERSION``). ``check=True`` also runs
    SQLite's ``quick_check`` over every page (the node's start-up does): a damaged file raises
    :class:`IndexDamaged` with one line naming the file and what to do. SpoolError when the file cannot be
    opened, a query fails, or a write transaction cannot start, fails inside or cannot commit (rolled back).
    """

    def __init__(self, path: Path | str, check: bool = False) -> None:
        self.path = Path(path)
        self._local = threading.local()
        # every connection and the thread it belongs to: a thread that ends does not close its own (a threading.local
        # value of a finished thread is not closed by SQLite: one file handle per thread, e.g. per association),
        # so each new connection closes those of threads that have ended
        self._conns: dict[int, tuple[threading.Thread, sqlite3.Connection]] = {}
        self._conns_lock = threading.Lock()
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            c = self._conn()
            if check:
                rows = [r[0] for r in c.execute("PRAGMA quick_check")]
                if rows != ["ok"]:
                    problems = [ln.strip() for r in rows for ln in str(r).splitlines()
                                if ln.strip() and not ln.startswith("***")]
                    raise damaged(self.path, f"quick_check found {len(problems)} problem(s), the first: "
                                             f"{problems[0] if problems else rows[0]}")
            c.executescript(SCHEMA)
            self._migrate(c)
            c.executescript(AFTER_MIGRATION)
        except sqlite3.Error as exc:
            self.close()
            if _is_damage(exc):
                raise damaged(self.path, exc) from exc
            raise SpoolError(f"index {self.path}: cannot open: {exc}") from exc
        except OSError as exc:
            self.close()
            raise SpoolError(f"index {self.path}: cannot open: {exc}") from exc
        except SpoolError:
            self.close()
            raise

    def _migrate(self, c: sqlite3.Connection) -> None:
        """Bring an index of an earlier format to ``SCHEMA_VERSION`` (one transaction; other processes wait).

        0 → 1: series re-keyed by (study, series) (``_MIGRATE_TO_1``); 1 → 2: the declared-size columns
        (``SERIES_COLUMNS_2``, NULL/'' for every existing series: they complete by the quiet period as before);
        2 → 3: the deliveries' confirmation columns (``DELIVERY_COLUMNS_3``; existing deliveries keep their state,
        their method '' shows they were delivered before confirmation existed); 3 → 4: the jobs' count of runs
        interrupted by a stop (``JOB_COLUMNS_4``, 0 for existing jobs).
        SpoolError for an index of a newer format; sqlite3.Error from a failed step (rolled back)."""
        version = int(c.execute("PRAGMA user_version").fetchone()[0])
        if version == SCHEMA_VERSION:
            return
        if version > SCHEMA_VERSION:
            raise SpoolError(f"index {self.path}: format {version} was written by a newer srnode (this one reads "
                             f"up to {SCHEMA_VERSION})")
        c.execute("BEGIN IMMEDIATE")
        try:
            version = int(c.execute("PRAGMA user_version").fetchone()[0])  # another process may have done it
            if version < 1:
                pk = [r["name"] for r in c.execute("PRAGMA table_info(series)") if r["pk"]]
                if pk == ["series_uid"]:
                    for stmt in _MIGRATE_TO_1.split(";"):
                        if stmt.strip():
                            c.execute(stmt)
                    log.warning("index %s: migrated to format 1 (series keyed by study + series)", self.path)
            if version < 2:
                have = {r["name"] for r in c.execute("PRAGMA table_info(series)")}
                added = [name for name, _ in SERIES_COLUMNS_2 if name not in have]
                for name, decl in SERIES_COLUMNS_2:
                    if name not in have:
                        c.execute(f"ALTER TABLE series ADD COLUMN {name} {decl}")
                if added:
                    log.warning("index %s: migrated to format 2 (declared series sizes: %s)", self.path,
                                ", ".join(added))
            if version < 3:
                have = {r["name"] for r in c.execute("PRAGMA table_info(deliveries)")}
                added = [name for name, _ in DELIVERY_COLUMNS_3 if name not in have]
                for name, decl in DELIVERY_COLUMNS_3:
                    if name not in have:
                        c.execute(f"ALTER TABLE deliveries ADD COLUMN {name} {decl}")
                if added and version > 0:  # a new index (format 0, empty) is not worth a warning
                    log.warning("index %s: migrated to format 3 (delivery confirmation: %s)", self.path,
                                ", ".join(added))
            if version < 4:
                have = {r["name"] for r in c.execute("PRAGMA table_info(jobs)")}
                added = [name for name, _ in JOB_COLUMNS_4 if name not in have]
                for name, decl in JOB_COLUMNS_4:
                    if name not in have:
                        c.execute(f"ALTER TABLE jobs ADD COLUMN {name} {decl}")
                if added and version > 0:
                    log.warning("index %s: migrated to format 4 (interrupted job runs: %s)", self.path,
                                ", ".join(added))
            c.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
        except BaseException:
            c.execute("ROLLBACK")
            raise
        c.execute("COMMIT")
        c.executescript(SCHEMA)  # the indexes of the rebuilt table

    def _conn(self) -> sqlite3.Connection:
        c: sqlite3.Connection | None = getattr(self._local, "conn", None)
        if c is None:
            c = sqlite3.connect(self.path, timeout=60.0, isolation_level=None, check_same_thread=False)
            c.row_factory = sqlite3.Row
            c.execute("PRAGMA journal_mode=WAL")
            c.execute("PRAGMA synchronous=FULL")  # a Success status means the row survives a power cut
            c.execute("PRAGMA busy_timeout=60000")
            self._local.conn = c
            with self._conns_lock:
                for key, (thread, conn) in list(self._conns.items()):
                    if not thread.is_alive():
                        conn.close()
                        del self._conns[key]
                self._conns[id(c)] = (threading.current_thread(), c)
        return c

    @contextmanager
    def tx(self) -> Iterator[sqlite3.Connection]:
        """One write transaction (BEGIN IMMEDIATE: takes the write lock up front, no upgrade deadlocks).

        Commits when the block ends, rolls back when it raises. SpoolError when BEGIN fails (busy for 60 s), when
        a statement of the block fails in SQLite, or when the commit fails.
        """
        c = self._conn()
        try:
            c.execute("BEGIN IMMEDIATE")
        except sqlite3.Error as exc:
            raise SpoolError(f"index {self.path}: cannot start a transaction: {exc}") from exc
        try:
            yield c
        except BaseException as exc:
            c.execute("ROLLBACK")
            if isinstance(exc, sqlite3.Error):
                raise SpoolError(f"index {self.path}: write failed: {exc}") from exc
            raise
        try:
            c.execute("COMMIT")
        except sqlite3.Error as exc:
            raise SpoolError(f"index {self.path}: cannot commit: {exc}") from exc

    def _query(self, sql: str, args: Sequence[Any] = ()) -> list[sqlite3.Row]:
        try:
            return list(self._conn().execute(sql, args))
        except sqlite3.Error as exc:
            raise SpoolError(f"index {self.path}: query failed: {exc}") from exc

    def close(self) -> None:
        """Close the calling thread's connection (other threads' connections stay open)."""
        c = getattr(self._local, "conn", None)
        if c is not None:
            c.close()
            self._local.conn = None
            with self._conns_lock:
                self._conns.pop(id(c), None)
