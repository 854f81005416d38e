"""Spool and index: atomic writes, duplicates kept once, the watermark, the job/delivery state machines."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from node.dimse import Status
from node.errors import IngestError
from node.store import Index, Instance, JobState, SeriesState, Spool


def _inst(sop: str, series: str = "1.2.3.4", path: str = "/x") -> Instance:
    return Instance(sop_uid=sop, series_uid=series, study_uid="1.2.3", sop_class="1.2.840.10008.5.1.4.1.1.2",
                    transfer_syntax="1.2.840.10008.1.2.1", path=path, calling_ae="CT01", allowed_rules="")


def test_store_is_atomic_and_keeps_the_first_copy(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool")
    first = spool.store_bytes(b"first", "1.2.3", "1.2.3.4", "1.2.3.4.5")
    again = spool.store_bytes(b"second", "1.2.3", "1.2.3.4", "1.2.3.4.5")
    assert not first.duplicate and again.duplicate
    assert first.path == tmp_path / "spool/instances/1.2.3/1.2.3.4/1.2.3.4.5.dcm"
    assert first.path.read_bytes() == b"first"
    assert list(spool.incoming.iterdir()) == []  # no temporary file left behind


def test_uids_that_are_not_uids_are_refused(tmp_path: Path) -> None:
    spool = Spool(tmp_path)
    with pytest.raises(IngestError) as exc:
        spool.store_bytes(b"x", "1.2.3", "../../etc", "1.2")
    assert exc.value.status == Status.CANNOT_UNDERSTAND and "SeriesInstanceUID" in str(exc.value)


def test_watermark_refuses_with_a700_and_writes_nothing(tmp_path: Path) -> None:
    spool = Spool(tmp_path, min_free_mb=10**12)
    with pytest.raises(IngestError) as exc:
        spool.store_bytes(b"x", "1.2.3", "1.2.3.4", "1.2.3.4.5")
    assert exc.value.status == Status.OUT_OF_RESOURCES and "min_free_mb" in str(exc.value)
    assert not any(spool.instances.rglob("*.dcm"))


def test_series_job_and_delivery_states(tmp_path: Path) -> None:
    ix = Index(tmp_path / "index.sqlite")
    assert ix.add_instance(_inst("1.1"), "CT", 10)
    assert not ix.add_instance(_inst("1.1"), "CT", 10)  # duplicate SOPInstanceUID: kept once
    assert ix.add_instance(_inst("1.2"), "CT", 10)
    assert ix.series("1.2.3.4")["n_instances"] == 2
    assert ix.quiet_series(quiet_since=0.0) == []
    assert ix.mark_stable("1.2.3.4", quiet_since=1e12)
    job_id = ix.create_job("1.2.3.4", "r")
    assert ix.claim_job(job_id) is not None
    assert ix.claim_job(job_id) is None  # claimed once
    ix.add_deliveries(job_id, {"a": ["/f1"], "b": ["/f1"]})
    ix.finish_job(job_id, JobState.SENDING)
    a, b = ix.deliveries(job_id)
    ix.delivery_done(a.id)
    ix.delivery_failed(b.id, "peer down", None)
    assert ix.settle_job(job_id) is JobState.DEAD_LETTER
    assert "b: peer down" in ix.job(job_id).reason
    assert ix.requeue_deliveries(job_id) == 1
    assert ix.job(job_id).state is JobState.SENDING
    ix.delivery_done(b.id)
    assert ix.settle_job(job_id) is JobState.DELIVERED
    # a late instance puts the series back to receiving; the next job supersedes
    assert ix.add_instance(_inst("1.3"), "CT", 10)
    assert ix.series("1.2.3.4")["state"] is SeriesState.RECEIVING
    assert "late instance" in ix.series("1.2.3.4")["reason"]
    assert ix.create_job("1.2.3.4", "r") == job_id + 1
    assert ix.job(job_id + 1).supersedes == job_id and ix.job(job_id + 1).n_instances == 3


def test_crash_while_processing_requeues(tmp_path: Path) -> None:
    ix = Index(tmp_path / "index.sqlite")
    ix.add_instance(_inst("1.1"), "CT", 10)
    job_id = ix.create_job("1.2.3.4", "r")
    assert ix.claim_job(job_id) is not None
    ix.close()
    again = Index(tmp_path / "index.sqlite")  # as after a restart
    assert again.requeue_interrupted() == [job_id]
    assert again.job(job_id).state is JobState.QUEUED and "restarted" in again.job(job_id).reason


def test_index_is_shared_between_processes(tmp_path: Path) -> None:
    db = tmp_path / "index.sqlite"
    ix = Index(db)
    code = ("import sys; from node.store import Index, Instance; ix = Index(sys.argv[1])\n"
            "for i in range(200):\n"
            "    ix.add_instance(Instance(f'9.{i}', '9.9', '1.2.3', 'c', 't', '/x', 'A', ''), 'CT', 1)\n")
    procs = [subprocess.Popen([sys.executable, "-c", code, str(db)]) for _ in range(2)]
    for i in range(200):
        ix.add_instance(_inst(f"8.{i}", series="9.9"), "CT", 1)
    assert [p.wait(timeout=60) for p in procs] == [0, 0]
    assert ix.count_instances() == 400  # every distinct instance once, none lost to lock contention
    assert ix.series("9.9")["n_instances"] == 400


def test_link_instance_makes_the_series_folder_and_keeps_the_first_copy(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool")
    first, second = spool.incoming / "1.dcm", spool.incoming / "2.dcm"
    first.write_bytes(b"first")
    second.write_bytes(b"second")
    made = spool.link_instance(first, "1.2.3", "1.2.3.4", "1.2.3.4.5")
    again = spool.link_instance(second, "1.2.3", "1.2.3.4", "1.2.3.4.5")
    assert made.new_folder and not made.duplicate and again.duplicate
    assert made.path.read_bytes() == b"first"
    with pytest.raises(IngestError) as exc:
        spool.link_instance(spool.incoming / "gone.dcm", "1.2.3", "1.2.3.4", "1.2.3.4.6")
    assert exc.value.status == Status.OUT_OF_RESOURCES
