"""Index format 1: a series is keyed by study + series. An index of the first format (series keyed by the
SeriesInstanceUID alone) is migrated on open, a series that had fused two studies is split and processed again
alone; format 2 adds the series' declared size, and an index of format 1 opens with its series as they were (no
size declared: they complete by the quiet period); a damaged index file is named in one line that says what to
do."""

from __future__ import annotations

import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from node.store import Index, IndexDamaged, Instance, JobState, SeriesState, SizeHint
from node.store.schema import SCHEMA_VERSION
from tests.store.test_states import PREVIOUS_SCHEMA

SHARED, OTHER = "1.2.826.0.1.9.1", "1.2.826.0.1.9.2"  # series UIDs
STUDY_A, STUDY_B = "1.2.826.0.1.8.1", "1.2.826.0.1.8.2"


def _old_index(db: Path) -> None:
    """First-format index: series SHARED holds 4 instances of study A and 3 of study B in ONE row (what the old
    key did), its job 1 delivered over all 7; series OTHER (study A, 2 instances) delivered by job 2."""
    now = time.time() - 100
    c = sqlite3.connect(db)
    c.executescript(PREVIOUS_SCHEMA)
    rows = [(f"{SHARED}.{k}", SHARED, STUDY_A if k < 4 else STUDY_B) for k in range(7)]
    rows += [(f"{OTHER}.{k}", OTHER, STUDY_A) for k in range(2)]
    for sop, series, study in rows:
        c.execute("INSERT INTO instances (sop_uid, series_uid, study_uid, sop_class, transfer_syntax, path,"
                  " calling_ae, size, received_at) VALUES (?,?,?,'1.2.840.10008.5.1.4.1.1.2','1.2.840.10008.1.2.1',"
                  " ?, 'CT01', 1, ?)", (sop, series, study, f"/spool/{study}/{series}/{sop}.dcm", now))
    for job, series, n in ((1, SHARED, 7), (2, OTHER, 2)):
        c.execute("INSERT INTO series (series_uid, study_uid, modality, calling_ae, state, n_instances,"
                  " first_received, last_received, job_id) VALUES (?, ?, 'CT', 'CT01', 'delivered', ?, ?, ?, ?)",
                  (series, STUDY_A, n, now, now, job))
        c.execute("INSERT INTO jobs (id, series_uid, study_uid, rule, state, n_instances, created, updated)"
                  " VALUES (?, ?, ?, 'ct', 'delivered', ?, ?, ?)", (job, series, STUDY_A, n, now, now))
    c.commit()
    c.close()


def _version(db: Path) -> int:
    c = sqlite3.connect(db)
    try:
        return int(c.execute("PRAGMA user_version").fetchone()[0])
    finally:
        c.close()


def test_first_format_index_is_migrated_and_a_fused_series_split(tmp_path: Path) -> None:
    db = tmp_path / "index.sqlite"
    _old_index(db)
    assert _version(db) == 0
    ix = Index(db)
    assert _version(db) == SCHEMA_VERSION == 4
    a, b = ix.series(SHARED, STUDY_A), ix.series(SHARED, STUDY_B)
    assert a is not None and b is not None
    assert (a["n_instances"], b["n_instances"]) == (4, 3)
    # both go back to 'receiving': the watcher makes a job for each, alone (the new one supersedes job 1)
    assert a["state"] is SeriesState.RECEIVING and b["state"] is SeriesState.RECEIVING
    assert "another study" in a["reason"] and a["job_id"] == 1 and b["job_id"] is None
    assert {(s, u) for s, u in ix.quiet_series(time.time())} == {(STUDY_A, SHARED), (STUDY_B, SHARED)}
    # a series that fused nothing is as it was
    other = ix.series(OTHER)
    assert other is not None and other["state"] is SeriesState.DELIVERED and other["n_instances"] == 2
    assert [i.study_uid for i in ix.instances_of(SHARED, STUDY_B)] == [STUDY_B] * 3
    assert len(ix.instances_of(SHARED, STUDY_A)) == 4
    # without the study the UID is ambiguous: refused rather than guessed
    with pytest.raises(Exception, match="2 studies"):
        ix.series(SHARED)
    # the job history is kept; a new job for study B's part is its own
    assert [j.state for j in ix.jobs()] == [JobState.DELIVERED, JobState.DELIVERED]
    assert ix.mark_stable(SHARED, time.time() + 1, study_uid=STUDY_B)
    job_b = ix.create_job(SHARED, "ct", study_uid=STUDY_B)
    assert ix.job(job_b).study_uid == STUDY_B and ix.job(job_b).n_instances == 3 and ix.job(job_b).supersedes is None
    ix.close()
    # opening again changes nothing more
    again = Index(db)
    assert again.series(SHARED, STUDY_A) == {**a}


# format 1 as spools written before the declared size hold it: PREVIOUS_SCHEMA with the series keyed by study +
# series (kept verbatim: those spools must keep working)
FORMAT_1_SERIES = """CREATE TABLE IF NOT EXISTS series (
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
    PRIMARY KEY (study_uid, series_uid)
);
CREATE INDEX IF NOT EXISTS instances_study_series ON instances(study_uid, series_uid);
CREATE INDEX IF NOT EXISTS series_uid ON series(series_uid);
CREATE INDEX IF NOT EXISTS series_state ON series(state);
"""


def _format_1_index(db: Path) -> None:
    """A format-1 index: series OTHER (study A) receiving with 2 instances, SHARED (study A) delivered by job 1."""
    now = time.time() - 100
    head, tail = PREVIOUS_SCHEMA.split("CREATE TABLE IF NOT EXISTS series (", 1)
    schema = head + FORMAT_1_SERIES + tail.split("CREATE INDEX IF NOT EXISTS series_state ON series(state);", 1)[1]
    c = sqlite3.connect(db)
    c.executescript(schema)
    c.execute("PRAGMA user_version = 1")
    for k, series in ((0, OTHER), (1, OTHER), (2, SHARED)):
        c.execute("INSERT INTO instances (sop_uid, series_uid, study_uid, sop_class, transfer_syntax, path,"
                  " calling_ae, size, received_at) VALUES (?,?,?,'1.2.840.10008.5.1.4.1.1.2','1.2.840.10008.1.2.1',"
                  " ?, 'CT01', 1, ?)", (f"{series}.{k}", series, STUDY_A, f"/spool/{k}.dcm", now))
    c.execute("INSERT INTO series (series_uid, study_uid, modality, calling_ae, state, n_instances, first_received,"
              " last_received) VALUES (?, ?, 'CT', 'CT01', 'receiving', 2, ?, ?)", (OTHER, STUDY_A, now, now))
    c.execute("INSERT INTO series (series_uid, study_uid, modality, calling_ae, state, n_instances, first_received,"
              " last_received, job_id) VALUES (?, ?, 'CT', 'CT01', 'delivered', 1, ?, ?, 1)",
              (SHARED, STUDY_A, now, now))
    c.execute("INSERT INTO jobs (id, series_uid, study_uid, rule, state, n_instances, created, updated)"
              " VALUES (1, ?, ?, 'ct', 'delivered', 1, ?, ?)", (SHARED, STUDY_A, now, now))
    c.commit()
    c.close()


def test_a_format_1_index_opens_with_no_declared_sizes(tmp_path: Path) -> None:
    db = tmp_path / "index.sqlite"
    _format_1_index(db)
    columns = {r[1] for r in sqlite3.connect(db).execute("PRAGMA table_info(series)")}
    assert "declared_instances" not in columns
    ix = Index(db)
    assert _version(db) == SCHEMA_VERSION == 4
    other = ix.series(OTHER, STUDY_A)
    assert other is not None and other["state"] is SeriesState.RECEIVING and other["n_instances"] == 2
    assert (other["declared_instances"], other["declared_by"], other["header_sig"]) == (None, "", None)
    shared = ix.series(SHARED, STUDY_A)
    assert shared is not None and shared["state"] is SeriesState.DELIVERED and shared["job_id"] == 1
    assert [j.state for j in ix.jobs()] == [JobState.DELIVERED]
    # nothing declared: the quiet period, as before; a new instance with a size in its header does not make the
    # older instances (which said nothing the index knows) agree with it
    assert ix.complete_series(time.time() + 1) == [] and ix.quiet_series(time.time()) == [(STUDY_A, OTHER)]
    ix.add_instance(Instance(f"{OTHER}.9", OTHER, STUDY_A, "1.2.840.10008.5.1.4.1.1.2", "1.2.840.10008.1.2.1",
                             "/spool/9.dcm", "CT01", ""), "CT", 1, SizeHint("ImagesInAcquisition=3", 3))
    assert ix.complete_series(time.time() + 1) == []
    # a puller's declaration works on a migrated series
    assert ix.declare_series(STUDY_A, OTHER, 3, "c-move from pacs") is not None
    assert ix.complete_series(time.time() + 1) == [(STUDY_A, OTHER)]
    ix.close()
    assert Index(db).series(OTHER, STUDY_A) is not None  # opening again changes nothing more


def test_migration_by_two_processes_at_once_happens_once(tmp_path: Path) -> None:
    db = tmp_path / "index.sqlite"
    _old_index(db)
    code = "import sys; from node.store import Index; Index(sys.argv[1]).count_instances()"
    procs = [subprocess.Popen([sys.executable, "-c", code, str(db)], stderr=subprocess.PIPE) for _ in range(3)]
    errs = [p.communicate(timeout=60)[1].decode() for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0], errs
    ix = Index(db)
    assert len(ix.all_series()) == 3 and ix.count_instances() == 9


def test_new_instances_of_two_studies_sharing_a_series_uid_are_two_series(tmp_path: Path) -> None:
    ix = Index(tmp_path / "index.sqlite")
    for k in range(7):
        study = STUDY_A if k < 4 else STUDY_B
        ix.add_instance(Instance(f"{SHARED}.{k}", SHARED, study, "1.2.840.10008.5.1.4.1.1.2", "1.2.840.10008.1.2.1",
                                 f"/x/{k}.dcm", "CT01", ""), "CT", 1)
    rows = sorted((s["study_uid"], s["n_instances"]) for s in ix.all_series())
    assert rows == [(STUDY_A, 4), (STUDY_B, 3)]


def test_a_damaged_index_is_named_in_one_line_with_what_to_do(tmp_path: Path) -> None:
    db = tmp_path / "index.sqlite"
    ix = Index(db)
    for k in range(300):  # a few pages of rows
        ix.add_instance(Instance(f"1.2.{k}", "1.2", "1", "c", "t", "/x/" + "p" * 200, "A", ""), "CT", 1)
    ix.close()
    c = sqlite3.connect(db)
    c.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    c.close()
    data = bytearray(db.read_bytes())
    page = 4096
    assert len(data) > 4 * page
    data[2 * page:4 * page] = b"\xde\xad\xbe\xef" * (page // 2)  # garbage over two pages in the middle
    db.write_bytes(bytes(data))
    with pytest.raises(IndexDamaged) as err:
        Index(db, check=True)
    msg = str(err.value)
    assert "\n" not in msg and str(db) in msg and "srnode reindex" in msg, msg


def test_a_format_2_index_gets_the_confirmation_columns_and_keeps_its_deliveries(tmp_path: Path) -> None:
    from node.store import DeliveryState
    from node.store.schema import DELIVERY_COLUMNS_3

    db = tmp_path / "index.sqlite"
    ix = Index(db)
    ix.add_instance(Instance(f"{OTHER}.1", OTHER, STUDY_A, "1.2.840.10008.5.1.4.1.1.2", "1.2.840.10008.1.2.1",
                             "/spool/1.dcm", "CT01", ""), "CT", 1)
    assert ix.mark_stable(OTHER, time.time() + 1, study_uid=STUDY_A)
    job = ix.create_job(OTHER, "ct", study_uid=STUDY_A)
    ix.add_deliveries(job, {"pacs": ["/out/1.dcm"], "down": ["/out/1.dcm"]})
    pacs, down = ix.deliveries(job)
    ix.delivery_done(pacs.id)
    ix.delivery_failed(down.id, "peer down", None)
    ix.close()
    c = sqlite3.connect(db)  # back to format 2: the deliveries table as it was before confirmation
    c.execute("DROP INDEX deliveries_transaction")
    for name, _ in DELIVERY_COLUMNS_3:
        c.execute(f"ALTER TABLE deliveries DROP COLUMN {name}")
    c.execute("PRAGMA user_version = 2")
    c.commit()
    c.close()
    ix = Index(db)
    assert _version(db) == SCHEMA_VERSION == 4
    pacs, down = ix.deliveries(job)
    assert (pacs.state, down.state) == (DeliveryState.DELIVERED, DeliveryState.DEAD_LETTER)
    assert (pacs.confirm_method, pacs.expected, pacs.confirmed, pacs.confirmed_at, pacs.sop_refs) == ("", None, None,
                                                                                                      None, ())
    assert down.reason == "peer down"
    # the new columns work on the migrated rows
    ix.delivery_sent(pacs.id, "count", [(STUDY_A, OTHER, "1.2.840.10008.5.1.4.1.1.2", f"{OTHER}.1")], "count check")
    ix.delivery_confirmed(pacs.id, "count", 1, 1, "1 of 1")
    got = ix.delivery(pacs.id)
    assert got is not None and got.state is DeliveryState.DELIVERED and got.confirmed == 1 and got.confirmed_at
