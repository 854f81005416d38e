"""States as enums over the spool index: a spool written by the previous layout is read and resumed by this
code, and every state the code stores is a member of its enum (the strings in SQLite never changed)."""

from __future__ import annotations

import json
import sqlite3
import time
from pathlib import Path

import pytest

from node.errors import SpoolError
from node.store import DeliveryState, Index, Instance, JobState, SeriesState, Spool, prune

# The index schema of the previous layout (node/indexdb.py before the stage folders; node/store/schema.py kept it
# unchanged until format 1 keyed series by study + series), as it is on disk in existing spools. Kept here verbatim:
# those spools must keep working.
PREVIOUS_SCHEMA = """
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

SERIES_A, SERIES_B, STUDY = "1.2.826.0.1.1", "1.2.826.0.1.2", "1.2.826.0.1"


def _previous_layout_spool(db: Path) -> None:
    """An index.sqlite as the previous layout left it after a crash: series A's job 1 was 'processing'; series
    B's job 2 was 'sending', one delivery 'pending' and one 'dead-letter'. Written with sqlite3 only."""
    now = time.time()
    c = sqlite3.connect(db)
    c.executescript(PREVIOUS_SCHEMA)
    c.execute("INSERT INTO instances (sop_uid, series_uid, study_uid, sop_class, transfer_syntax, path, calling_ae,"
              " allowed_rules, size, received_at) VALUES ('1.2.826.0.1.1.1', ?, ?, '1.2.840.10008.5.1.4.1.1.2',"
              " '1.2.840.10008.1.2.1', '/spool/a.dcm', 'CT01', '', 10, ?)", (SERIES_A, STUDY, now - 60))
    c.execute("INSERT INTO series (series_uid, study_uid, modality, calling_ae, state, n_instances, first_received,"
              " last_received, job_id) VALUES (?, ?, 'CT', 'CT01', 'processing', 1, ?, ?, 1)",
              (SERIES_A, STUDY, now - 60, now - 60))
    c.execute("INSERT INTO series (series_uid, study_uid, modality, calling_ae, state, n_instances, first_received,"
              " last_received, job_id) VALUES (?, ?, 'CT', 'CT01', 'sending', 1, ?, ?, 2)",
              (SERIES_B, STUDY, now - 60, now - 60))
    c.execute("INSERT INTO jobs (id, series_uid, study_uid, rule, state, n_instances, attempts, created, updated,"
              " started) VALUES (1, ?, ?, 'ct', 'processing', 1, 1, ?, ?, ?)", (SERIES_A, STUDY, now, now, now))
    c.execute("INSERT INTO jobs (id, series_uid, study_uid, rule, state, n_instances, attempts, derived_series_uid,"
              " engine, report, created, updated, started, finished) VALUES (2, ?, ?, 'ct', 'sending', 1, 1,"
              " '2.25.1', 'cubic', '{\"seconds\": 1.5}', ?, ?, ?, ?)", (SERIES_B, STUDY, now, now, now, now))
    c.execute("INSERT INTO deliveries (job_id, destination, files, state, attempts, next_attempt, created, updated)"
              " VALUES (2, 'pacs', ?, 'pending', 1, 0, ?, ?)", (json.dumps(["/spool/out/1.dcm"]), now, now))
    c.execute("INSERT INTO deliveries (job_id, destination, files, state, attempts, reason, created, updated)"
              " VALUES (2, 'archive', ?, 'dead-letter', 5, 'after 5 attempt(s): refused', ?, ?)",
              (json.dumps(["/spool/out/1.dcm"]), now, now))
    c.commit()
    c.close()


def _schema_of(db: Path) -> list[tuple[str, str, str]]:
    c = sqlite3.connect(db)
    try:
        return sorted(c.execute("SELECT type, name, sql FROM sqlite_master WHERE name NOT LIKE 'sqlite_%'"))
    finally:
        c.close()


def test_a_spool_of_the_previous_layout_is_read_and_its_jobs_resume(tmp_path: Path) -> None:
    old = tmp_path / "old" / "index.sqlite"
    old.parent.mkdir()
    _previous_layout_spool(old)
    ix = Index(old)
    # opening migrated it (series keyed by study + series, tests/store/test_index_format.py): its schema is now a
    # fresh index's, and every row below reads as before
    assert _schema_of(old) == _schema_of(Index(tmp_path / "new" / "index.sqlite").path)

    assert ix.requeue_interrupted() == [1]
    job = ix.job(1)
    assert job.state is JobState.QUEUED and job.state == "queued" and "restarted" in job.reason
    series_a = ix.series(SERIES_A)
    assert series_a is not None and series_a["state"] is SeriesState.QUEUED
    assert ix.queue_depth() == 1

    sending = ix.job(2)
    assert sending.state is JobState.SENDING and sending.report == {"seconds": 1.5} and sending.engine == "cubic"
    assert [j.id for j in ix.jobs((JobState.SENDING,))] == [2]
    pending, dead = ix.deliveries(2)
    assert (pending.state, dead.state) == (DeliveryState.PENDING, DeliveryState.DEAD_LETTER)
    assert isinstance(pending.state, DeliveryState) and isinstance(dead.state, DeliveryState)
    assert [d.id for d in ix.deliveries(states=(DeliveryState.DEAD_LETTER,))] == [dead.id]

    # the outbox picks the pending delivery up; once it is done, the job settles as dead-letter (archive)
    assert [d.id for d in ix.due_deliveries(time.time())] == [pending.id]
    ix.delivery_done(pending.id)
    assert ix.settle_job(2) is JobState.DEAD_LETTER
    assert "archive: after 5 attempt(s)" in ix.job(2).reason
    # srnode retry: the dead-letter delivery goes back to pending, the job to sending; then it is delivered
    assert ix.requeue_deliveries(2) == 1
    assert ix.job(2).state is JobState.SENDING
    assert [d.id for d in ix.due_deliveries(time.time())] == [dead.id]
    ix.delivery_done(dead.id)
    assert ix.settle_job(2) is JobState.DELIVERED
    series_b = ix.series(SERIES_B)
    assert series_b is not None and series_b["state"] is SeriesState.DELIVERED

    # and the re-queued job runs
    claimed = ix.claim_job(1)
    assert claimed is not None and claimed.state is JobState.PROCESSING and claimed.attempts == 2
    ix.finish_job(1, JobState.DELIVERED)
    assert ix.series(SERIES_A) == {**series_a, "state": SeriesState.DELIVERED}


def _inst(sop: str, series: str) -> Instance:
    return Instance(sop_uid=sop, series_uid=series, study_uid=STUDY, sop_class="1.2.840.10008.5.1.4.1.1.2",
                    transfer_syntax="1.2.840.10008.1.2.1", path=f"/x/{sop}.dcm", calling_ae="CT01",
                    allowed_rules="")


class _Raw:
    """The state columns as stored, read with a connection of its own; every value seen is kept."""

    def __init__(self, db: Path) -> None:
        self.db = db
        self.seen: dict[str, set[str]] = {"series": set(), "jobs": set(), "deliveries": set()}

    def look(self) -> None:
        c = sqlite3.connect(self.db)
        try:
            for table, values in self.seen.items():
                values.update(r[0] for r in c.execute(f"SELECT state FROM {table}"))
        finally:
            c.close()


def test_every_stored_state_is_a_member_of_its_enum(tmp_path: Path) -> None:
    ix = Index(tmp_path / "index.sqlite")
    raw = _Raw(ix.path)
    # series A: its life through processing and delivery, a failed attempt, a dead letter, a retry
    ix.add_instance(_inst("1.1", SERIES_A), "CT", 1)
    raw.look()
    assert ix.mark_stable(SERIES_A, quiet_since=time.time() + 1)
    raw.look()
    job = ix.create_job(SERIES_A, "ct")
    raw.look()
    assert ix.claim_job(job) is not None
    raw.look()
    ix.add_deliveries(job, {"pacs": ["/f"], "archive": ["/f"]})
    ix.finish_job(job, JobState.SENDING)
    raw.look()
    pacs, archive = ix.deliveries(job)
    ix.delivery_failed(pacs.id, "peer down", next_attempt=time.time() + 60)
    ix.delivery_failed(archive.id, "refused", next_attempt=None)
    ix.delivery_done(pacs.id)
    raw.look()
    assert ix.settle_job(job) is JobState.DEAD_LETTER
    raw.look()
    ix.requeue_deliveries(job)
    raw.look()
    # accepted, its confirmation awaited; then the destination can confirm nothing: unconfirmed (the job is
    # delivered, its reason says which destination is unconfirmed and why)
    ix.delivery_sent(archive.id, "commitment", [("1", "2", "3", "4")], "report awaited", "2.25.7", time.time() + 60)
    raw.look()
    assert ix.settle_job(job) is JobState.SENDING
    assert ix.delivery_by_transaction("2.25.7") == ix.delivery(archive.id)
    ix.delivery_confirmed(archive.id, "count", 1, None, "peer supports neither", DeliveryState.UNCONFIRMED)
    assert ix.settle_job(job) is JobState.DELIVERED
    assert "archive: sent, unconfirmed: peer supports neither" in ix.job(job).reason
    raw.look()
    # series B: queued, superseded by a late instance's job, that one fails and is retried; a crash mid-run
    ix.add_instance(_inst("2.1", SERIES_B), "CT", 1)
    ix.mark_stable(SERIES_B, quiet_since=time.time() + 1)
    first = ix.create_job(SERIES_B, "ct")
    ix.add_instance(_inst("2.2", SERIES_B), "CT", 1)
    raw.look()
    second = ix.create_job(SERIES_B, "ct")
    assert ix.job(first).state is JobState.SUPERSEDED
    assert ix.claim_job(second) is not None
    ix.finish_job(second, JobState.FAILED, "engine failed")
    raw.look()
    assert ix.requeue_job(second)
    raw.look()
    assert ix.claim_job(second) is not None
    assert ix.requeue_interrupted() == [second]
    raw.look()
    # series C and D: decided without processing
    for series, state in ((SERIES_A + ".3", JobState.IGNORED), (SERIES_A + ".4", JobState.FAILED)):
        ix.add_instance(_inst(series + ".1", series), "CT", 1)
        ix.mark_stable(series, quiet_since=time.time() + 1)
        ix.create_job(series, "", state=state, reason="decided")
    raw.look()
    # retention: the ignored series C, long after it ended, is pruned (node.store.prune)
    assert [p.series_uid for p in prune(Spool(tmp_path / "spool"), ix, 1.0, now=time.time() + 30 * 86400).series
            if p.series_uid == SERIES_A + ".3"] == [SERIES_A + ".3"]
    raw.look()

    assert raw.seen["jobs"] <= {s.value for s in JobState}, raw.seen
    assert raw.seen["series"] <= {s.value for s in SeriesState}, raw.seen
    assert raw.seen["deliveries"] <= {s.value for s in DeliveryState}, raw.seen
    # the life above went through every state of each set (the enums have no dead members)
    assert raw.seen["jobs"] == {s.value for s in JobState}
    assert raw.seen["series"] == {s.value for s in SeriesState}
    assert raw.seen["deliveries"] == {s.value for s in DeliveryState}


def test_a_state_that_is_no_member_fails_loudly(tmp_path: Path) -> None:
    ix = Index(tmp_path / "index.sqlite")
    ix.add_instance(_inst("1.1", SERIES_A), "CT", 1)
    job = ix.create_job(SERIES_A, "ct")
    with pytest.raises(ValueError):
        ix.finish_job(job, "deliverd")  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        ix.jobs(("faild",))  # type: ignore[arg-type]
    assert ix.job(job).state is JobState.QUEUED  # nothing was written
    c = sqlite3.connect(ix.path)
    c.execute("UPDATE jobs SET state = 'bogus' WHERE id = ?", (job,))
    c.commit()
    c.close()
    with pytest.raises(SpoolError, match="unknown state 'bogus'"):
        ix.job(job)
