"""Durability of the group commit (``node.ingest.commit``), tested rather than assumed (issue #15 item 1).

- kill -9 of the real node right after it answered Success to dcmtk ``storescu``: after a restart every
  acknowledged instance is in the spool and the index, with the bytes that were sent, and the series (sent again
  in full, as a sender does) is processed once;
- the writer failing (the spool's ``instances/`` folder made immutable with ``chattr +i``, so that no name can be
  created in it, even by root): the C-STOREs are answered 0xA700, nothing is left half-written (no file under
  ``instances/``, no index row, nothing in ``incoming/``), and the same series goes in once the folder is writable;
- in process: a sync that fails, an index transaction that fails (one row or the whole batch), a writer that
  stalls past the caller's deadline -- each answered with a failure, nothing linked without its row.
"""

from __future__ import annotations

import shutil
import subprocess
import threading
from pathlib import Path
from typing import Any

import pytest
from pydicom import dcmread

from node.bench.ingest import write_series
from node.config import config_from_dict
from node.dimse import Status
from node.errors import IngestError, SpoolError
from node.ingest import Admission
from node.ingest.admit import Caller
from node.ingest.commit import GroupCommit
from node.metrics import Metrics
from node.store import Index, open_store
from tests.support.nodeproc import NodeProc
from tests.support.peers import STORESCU, storescu, wait_until

SUCCESS_LINE = "Received Store Response (Success)"


def dataset_bytes(path: Path) -> bytes:
    """The bytes of a Part 10 file after its file meta group (what travels in a C-STORE)."""
    meta = dcmread(path, stop_before_pixels=True).file_meta
    start = 128 + 4 + 12 + int(meta.FileMetaInformationGroupLength)
    return path.read_bytes()[start:]


def send_until_acknowledged(node: NodeProc, files: list[Path], kill_after: int) -> int:
    """Send ``files`` with storescu over one association and kill -9 the node as soon as ``kill_after`` Success
    responses were read; returns how many Success responses storescu printed in all (the first that many files
    are acknowledged: one association sends in order)."""
    proc = subprocess.Popen([STORESCU, "-v", "-aec", node.ae_title, "-aet", "CT01", "127.0.0.1", str(node.port),
                             *map(str, files)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    acked = 0
    assert proc.stdout is not None
    for line in proc.stdout:
        if SUCCESS_LINE in line:
            acked += 1
            if acked == kill_after:
                node.kill9()
    proc.wait(60)
    return acked


@pytest.mark.faults
def test_kill9_right_after_success_keeps_every_acknowledged_instance_byte_for_byte(tmp_path: Path) -> None:
    files = write_series(tmp_path / "ct", 7, 60, 64, tag="durability-")
    node = NodeProc.start(tmp_path / "node", {"node": {"stable_age_s": 2.0}})
    try:
        acked = send_until_acknowledged(node, files, kill_after=25)
        assert 25 <= acked < len(files), f"{acked} acknowledged: the kill came too late"
        node.launch()
        idx = Index(node.spool / "index.sqlite")
        for f in files[:acked]:
            sop = str(dcmread(f, stop_before_pixels=True).SOPInstanceUID)
            inst = idx.instance(sop)
            assert inst is not None, f"instance {f.name} got Success before the kill -9 but is not in the index"
            assert dataset_bytes(Path(inst.path)) == dataset_bytes(f), f"{f.name}: the stored bytes differ"
        assert not list((node.spool / "incoming").iterdir()), "partial files left in incoming/"
        # the sender resends the whole series: duplicates are harmless, the series is processed once
        r = storescu(files, node.port, calling="CT01")
        assert r.returncode == 0, r.stdout + r.stderr
        # (a job may already have started on the part received before the kill: the full series supersedes it)
        jobs = node.wait_jobs(lambda js: js and js[-1]["state"] == "delivered"
                              and js[-1]["instances"] == len(files), timeout=180,
                              what="the whole series processed and delivered")
        assert [j["state"] for j in jobs].count("delivered") <= 2, jobs
        assert idx.count_instances() == len(files)
        node.stop()
    finally:
        node.kill9()


def _chattr(path: Path, flag: str) -> bool:
    tool = shutil.which("chattr")
    if tool is None:
        return False
    return subprocess.run([tool, flag, str(path)], capture_output=True).returncode == 0


@pytest.mark.faults
def test_a_spool_that_cannot_be_written_answers_a700_and_leaves_nothing_half_written(tmp_path: Path) -> None:
    files = write_series(tmp_path / "ct", 8, 12, 64, tag="readonly-")
    node = NodeProc.start(tmp_path / "node", {"node": {"stable_age_s": 2.0}})
    instances = node.spool / "instances"
    if not _chattr(instances, "+i"):
        node.stop()
        pytest.skip("chattr +i is not available here (needs CAP_LINUX_IMMUTABLE and a file system that has it)")
    try:
        r = subprocess.run([STORESCU, "-v", "-aec", node.ae_title, "-aet", "CT01", "127.0.0.1", str(node.port),
                            *map(str, files)], capture_output=True, text=True, timeout=300)
        out = r.stdout + r.stderr
        assert SUCCESS_LINE not in out, out[-2000:]
        assert "Received Store Response (Refused: OutOfResources)" in out, out[-2000:]  # storescu then stops
        assert not any(instances.rglob("*")), "something was written under instances/"
        assert Index(node.spool / "index.sqlite").count_instances() == 0
        wait_until(lambda: not list((node.spool / "incoming").iterdir()), timeout=30,
                   what="incoming/ emptied after the association")
    finally:
        _chattr(instances, "-i")
    try:
        r = storescu(files, node.port, calling="CT01")
        assert r.returncode == 0 and "Success" not in r.stderr, r.stderr
        assert Index(node.spool / "index.sqlite").count_instances() == len(files)
        node.stop()
    finally:
        node.kill9()


# ------------------------------------------------------------------------------------------ in process


def _admission(tmp_path: Path) -> Admission:
    cfg = config_from_dict({"node": {"spool_dir": str(tmp_path / "spool"), "min_free_mb": 1}})
    store = open_store(cfg)
    return Admission(cfg, store.spool, store.index, Metrics.create())


def _admit_all(adm: Admission, files: list[Path]) -> list[Any]:
    """Admit ``files`` from one thread each (one batch or several); per file the Stored or the exception."""
    out: list[Any] = [None] * len(files)

    def one(k: int) -> None:
        try:
            out[k] = adm.admit_file(files[k], Caller("CT01", "127.0.0.1"))
        except Exception as exc:  # noqa: BLE001 - collected for the assertions
            out[k] = exc

    threads = [threading.Thread(target=one, args=(k,)) for k in range(len(files))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    return out


def test_concurrent_admissions_share_commits_and_all_are_indexed(tmp_path: Path) -> None:
    adm = _admission(tmp_path)
    files = write_series(tmp_path / "ct", 9, 40, 32, tag="batch-")
    results = _admit_all(adm, files)
    assert all(not isinstance(r, Exception) for r in results), results
    assert adm.index.count_instances() == len(files)
    assert adm.writer.committed == len(files) and adm.writer.batches <= len(files)
    again = _admit_all(adm, files[:3])  # resends: plain duplicates
    assert all(r.duplicate for r in again) and adm.index.count_instances() == len(files)


def test_a_failed_sync_answers_a700_and_unlinks(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    adm = _admission(tmp_path)
    files = write_series(tmp_path / "ct", 10, 6, 32, tag="sync-")

    def broken(*args: Any) -> None:
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(adm.spool, "sync", broken)
    results = _admit_all(adm, files)
    assert all(isinstance(r, IngestError) and r.status == Status.OUT_OF_RESOURCES for r in results), results
    assert not any(p.is_file() for p in adm.spool.instances.rglob("*")) and adm.index.count_instances() == 0


def test_a_failed_index_transaction_answers_a_failure_and_unlinks(tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    adm = _admission(tmp_path)
    files = write_series(tmp_path / "ct", 11, 6, 32, tag="index-")
    bad = str(dcmread(files[2], stop_before_pixels=True).SOPInstanceUID)
    real = adm.index.add_instances

    def fails_for_one(items: Any) -> list[bool]:
        if any(inst.sop_uid == bad for inst, *_ in items):
            raise SpoolError("index: write failed: disk I/O error")
        return real(items)

    monkeypatch.setattr(adm.index, "add_instances", fails_for_one)
    results = _admit_all(adm, files)
    failed = [f for f, r in zip(files, results, strict=True) if isinstance(r, Exception)]
    assert failed == [files[2]], results  # one bad row does not fail the others of its batch
    assert isinstance(results[2], SpoolError)
    assert adm.index.count_instances() == len(files) - 1
    names = {p.stem for p in adm.spool.instances.rglob("*.dcm")}
    assert bad not in names and len(names) == len(files) - 1


def test_a_stalled_writer_answers_a700_after_the_deadline(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    adm = _admission(tmp_path)
    files = write_series(tmp_path / "ct", 12, 1, 32, tag="stall-")
    release = threading.Event()
    real = adm.spool.sync

    def slow(*args: Any) -> None:
        release.wait(30)
        real(*args)

    monkeypatch.setattr(adm.spool, "sync", slow)
    adm.writer = GroupCommit(adm.spool, adm.index, timeout_s=0.5)
    try:
        with pytest.raises(IngestError) as err:
            adm.admit_file(files[0], Caller("CT01"))
        assert err.value.status == Status.OUT_OF_RESOURCES
    finally:
        release.set()
    # not acknowledged, but stored once the writer went on: a resend is a plain duplicate
    wait_until(lambda: adm.index.count_instances() == 1, timeout=30, what="the late commit")
    assert adm.admit_file(files[0], Caller("CT01")).duplicate
