"""Durability of the group commit (``node.ingest.commit``), tested rather than assumed (issue #15 item 1).

- kill -9 of the real node right after it answered Success to dcmtk ``storescu``: after a restart every
  acknowledged instance is in the spool and the index, with the bytes that were sent, and the series (sent again
  in full, as a sender does) is processed once;
- the writer failing (the spool's ``instances/`` folder made immutable with ``chattr +i``, so that no name can be
  created in it, even by root): the C-STOREs are answered 0xA700, nothing is left half-written (no file under
  ``instances/``, no index row, nothing in ``incoming/``), and the same series goes in once the folder is writable;
- a disk that fills while instances arrive (a real 4 MiB tmpfs as the spool, ``min_free_mb = 0``): each instance
  that meets the full disk is answered 0xA700 on a living association (dcmtk ``storescu`` goes on to the next),
  no partial file stays in ``incoming/``, every acknowledged instance is intact, and once space returns the same
  association stores again;
- in process: a sync that fails, an index transaction that fails (one row or the whole batch), a writer that
  stalls past the caller's deadline -- each answered with a failure, nothing linked without its row.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import threading
from pathlib import Path
from typing import Any

import httpx
import pytest
from pydicom import dcmread
from pydicom.uid import ExplicitVRLittleEndian
from pynetdicom import AE

from node.bench.ingest import write_series
from node.config import config_from_dict
from node.dimse import Status
from node.errors import IngestError, SpoolError
from node.ingest import Admission
from node.ingest.admit import Caller
from node.ingest.commit import GroupCommit
from node.ingest.stow import StowReceiver, multipart_close, multipart_part
from node.metrics import Metrics
from node.store import Index, open_store
from node.store import spool as spool_module
from tests.support.nodeproc import NodeProc
from tests.support.peers import STORESCU, mount_tmpfs, storescu, wait_until

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


def _acknowledged(storescu_output: str) -> tuple[list[str], int]:
    """From ``storescu -v`` output: the files answered Success (in order), and how many were refused 0xA700."""
    acked, refused, current = [], 0, ""
    for line in storescu_output.splitlines():
        if "Sending file: " in line:
            current = line.split("Sending file: ", 1)[1].strip()
        elif SUCCESS_LINE in line:
            acked.append(current)
        elif "Refused: OutOfResources" in line:
            refused += 1
    return acked, refused


@pytest.mark.faults
def test_a_disk_that_fills_during_receive_answers_a700_and_keeps_the_association(tmp_path: Path) -> None:
    disk = tmp_path / "disk"
    if not mount_tmpfs(disk, "4m"):
        pytest.skip("cannot mount a tmpfs here (needs root and CAP_SYS_ADMIN): no small real file system to fill")
    node: NodeProc | None = None
    try:
        filler = disk / "filler"  # removed later: the space that "returns"
        filler.write_bytes(b"\0" * (1 << 20))
        files = write_series(tmp_path / "ct", 13, 48, 256, tag="diskfull-")  # 48 x 128 KiB: more than fits
        node = NodeProc.start(tmp_path / "node", {"node": {"spool_dir": str(disk / "spool"), "min_free_mb": 0,
                                                          "stable_age_s": 3600.0}})
        r = subprocess.run([STORESCU, "-v", "-nh", "-aec", node.ae_title, "-aet", "CT01", "127.0.0.1",
                            str(node.port), *map(str, files)], capture_output=True, text=True, timeout=300)
        out = r.stdout + r.stderr
        acked, refused = _acknowledged(out)
        assert acked and refused, out[-3000:]
        assert len(acked) + refused == len(files), out[-3000:]  # every C-STORE answered: nothing aborted
        assert "Abort" not in out, out[-3000:]
        assert "0xA700" in out or "OutOfResources" in out
        wait_until(lambda: not list((node.spool / "incoming").iterdir()), timeout=30,
                   what="no partial file in incoming/")
        # space returns: the same association stores again
        ae = AE(ae_title="CT01")
        ae.add_requested_context(str(dcmread(files[0], stop_before_pixels=True).SOPClassUID), ExplicitVRLittleEndian)
        assoc = ae.associate("127.0.0.1", node.port, ae_title=node.ae_title)
        assert assoc.is_established
        try:
            refused_file = next(f for f in files if str(f) not in acked)
            assert assoc.send_c_store(refused_file).Status == Status.OUT_OF_RESOURCES  # still full
            filler.unlink()
            assert assoc.send_c_store(refused_file).Status == Status.SUCCESS
            assert assoc.is_established
        finally:
            assoc.release()
        assert not list((node.spool / "incoming").iterdir()), "partial files left in incoming/"
        idx = Index(node.spool / "index.sqlite")
        for f in [*map(Path, acked), refused_file]:
            inst = idx.instance(str(dcmread(f, stop_before_pixels=True).SOPInstanceUID))
            assert inst is not None, f"{f.name} was acknowledged but is not in the index"
            assert dataset_bytes(Path(inst.path)) == dataset_bytes(f), f"{f.name}: the stored bytes differ"
        assert idx.count_instances() == len(acked) + 1
        counted = sum(float(ln.rsplit(" ", 1)[1]) for ln in httpx.get(f"{node.http_url}/metrics", timeout=10)
                      .text.splitlines() if ln.startswith('srnode_instances_received_total{status="0xA700"}'))
        assert counted == refused + 1, counted
        log = node.log()
        assert "filled up while it arrived" in log or "disk is full" in log or "No space" in log, log[-3000:]
        assert "DISKFULL" not in log and "BENCH^INGEST" not in log  # no patient values in the log
        node.stop()
    finally:
        if node is not None:
            node.kill9()
        subprocess.run(["umount", "-l", str(disk)], capture_output=True)


def _fill(disk: Path) -> Path:
    """Write a file on ``disk`` until its file system is full (ENOSPC); returns it (remove it to free space)."""
    filler = disk / "filler-full"
    with filler.open("wb", buffering=0) as fh:
        try:
            while True:
                fh.write(b"\0" * (4 << 10))
        except OSError:
            pass
    return filler


@pytest.mark.faults
def test_an_index_on_a_full_disk_answers_a700_and_unlinks(tmp_path: Path) -> None:
    disk = tmp_path / "disk"
    if not mount_tmpfs(disk, "2m"):
        pytest.skip("cannot mount a tmpfs here (needs root and CAP_SYS_ADMIN): no small real file system to fill")
    try:
        cfg = config_from_dict({"node": {"spool_dir": str(disk / "spool"), "min_free_mb": 0}})
        store = open_store(cfg)
        adm = Admission(cfg, store.spool, store.index, Metrics.create())
        files = write_series(tmp_path / "ct", 14, 3, 32, tag="indexfull-")
        adm.admit_file(files[0], Caller("CT01"))
        received = store.spool.incoming / "rx.dcm"  # as the SCP leaves it: complete, on the spool's disk
        shutil.copyfile(files[1], received)
        filler = _fill(disk)
        with pytest.raises(IngestError) as err:  # linking needs no data block on tmpfs; the index's WAL does
            adm.admit_file(received, Caller("CT01"))
        assert err.value.status == Status.OUT_OF_RESOURCES, err.value
        assert adm.index.count_instances() == 1
        assert len(list(store.spool.instances.rglob("*.dcm"))) == 1, "a link without its index row"
        filler.unlink()
        assert not adm.admit_file(received, Caller("CT01")).duplicate
        assert adm.index.count_instances() == 2
    finally:
        subprocess.run(["umount", "-l", str(disk)], capture_output=True)


def test_stow_parts_on_a_full_disk_fail_a700_and_leave_nothing(tmp_path: Path) -> None:
    disk = tmp_path / "disk"
    if not mount_tmpfs(disk, "1m"):
        pytest.skip("cannot mount a tmpfs here (needs root and CAP_SYS_ADMIN): no small real file system to fill")
    try:
        incoming = disk / "incoming"
        incoming.mkdir()
        kept = disk / "kept"  # the admission links each part into the spool, on the same disk
        kept.mkdir()
        receiver = StowReceiver("b0undary", lambda p: os.link(p, kept / p.name), incoming)
        files = write_series(tmp_path / "ct", 15, 12, 256, tag="stowfull-")  # 12 x 128 KiB in 1 MiB
        for f in files:
            receiver.feed(multipart_part(f.read_bytes(), "b0undary"))
        receiver.feed(multipart_close("b0undary"))
        result = receiver.finish()
        assert result.stored and result.failed, result
        assert all(reason == Status.OUT_OF_RESOURCES for *_, reason, _ in result.failed), result.failed
        assert len(result.stored) + len(result.failed) == len(files)
        assert result.http_status == 202
        assert not list(incoming.iterdir()), "partial parts left in incoming/"
        assert len(list(kept.iterdir())) == len(result.stored)
    finally:
        subprocess.run(["umount", "-l", str(disk)], capture_output=True)


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
    """A file whose fsync fails is answered 0xA700 and unlinked; the others of its batch are stored."""
    adm = _admission(tmp_path)
    files = write_series(tmp_path / "ct", 10, 6, 32, tag="sync-")
    bad = str(dcmread(files[3], stop_before_pixels=True).SOPInstanceUID)
    real = spool_module.fsync_dir

    def broken(path: Path) -> None:
        if path.name == f"{bad}.dcm":
            raise OSError(5, "Input/output error")
        real(path)

    monkeypatch.setattr(spool_module, "fsync_dir", broken)
    results = _admit_all(adm, files)
    assert isinstance(results[3], IngestError) and results[3].status == Status.OUT_OF_RESOURCES, results
    assert not any(isinstance(r, Exception) for i, r in enumerate(results) if i != 3), results
    names = {p.stem for p in adm.spool.instances.rglob("*.dcm")}
    assert bad not in names and len(names) == len(files) - 1 and adm.index.count_instances() == len(files) - 1


def test_a_resend_in_the_batch_of_a_copy_whose_sync_fails_is_not_acknowledged(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Two copies of one instance in one batch (a resend from a second association): the first copy's fsync fails,
    so neither is acknowledged (the second was linked as its duplicate), and no row points at a removed file."""
    adm = _admission(tmp_path)
    blocker, target = write_series(tmp_path / "ct", 15, 2, 32, tag="dupfail-")
    resend = tmp_path / "resend.dcm"
    shutil.copyfile(target, resend)
    blk = str(dcmread(blocker, stop_before_pixels=True).SOPInstanceUID)
    bad = str(dcmread(target, stop_before_pixels=True).SOPInstanceUID)
    held, release = threading.Event(), threading.Event()
    real = spool_module.fsync_dir

    def patched(path: Path) -> None:
        if path.name == f"{blk}.dcm":  # hold the first batch so that both copies queue into the next one
            held.set()
            release.wait(30)
        if path.name == f"{bad}.dcm":
            raise OSError(5, "Input/output error")
        real(path)

    monkeypatch.setattr(spool_module, "fsync_dir", patched)
    out: dict[str, Any] = {}

    def admit(name: str, path: Path) -> None:
        try:
            out[name] = adm.admit_file(path, Caller("CT01", "127.0.0.1"))
        except Exception as exc:  # noqa: BLE001 - collected for the assertions
            out[name] = exc

    threads = [threading.Thread(target=admit, args=("blocker", blocker))]
    threads[0].start()
    wait_until(held.is_set, timeout=30, what="the first batch syncing")
    for name, path in (("first", target), ("resend", resend)):
        threads.append(threading.Thread(target=admit, args=(name, path)))
        threads[-1].start()
    wait_until(lambda: adm.writer._queue.qsize() == 2, timeout=30, what="both copies queued")
    release.set()
    for t in threads:
        t.join(30)
    assert not isinstance(out["blocker"], Exception), out
    for name in ("first", "resend"):
        assert isinstance(out[name], IngestError) and out[name].status == Status.OUT_OF_RESOURCES, out
    assert adm.index.count_instances() == 1
    assert {p.stem for p in adm.spool.instances.rglob("*.dcm")} == {blk}


def test_a_series_folder_whose_parents_failed_to_sync_is_synced_again(tmp_path: Path,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """The first instance of a new series: its study folder's fsync fails (0xA700). The next instance of that
    series links into the existing folder; its Success must wait for the folder's parents to be synced again."""
    adm = _admission(tmp_path)
    files = write_series(tmp_path / "ct", 16, 2, 32, tag="parents-")
    synced: list[Path] = []
    fail_study = [True]
    real = spool_module.fsync_dir

    def patched(path: Path) -> None:
        synced.append(path)
        if path.is_dir() and path.parent == adm.spool.instances and fail_study[0]:
            fail_study[0] = False
            raise OSError(5, "Input/output error")
        real(path)

    monkeypatch.setattr(spool_module, "fsync_dir", patched)
    first = _admit_all(adm, files[:1])[0]
    assert isinstance(first, IngestError) and first.status == Status.OUT_OF_RESOURCES
    synced.clear()
    second = adm.admit_file(files[1], Caller("CT01", "127.0.0.1"))
    assert not second.duplicate
    study = second.path.parent.parent
    assert study in synced and adm.spool.instances in synced, synced  # the parents, synced with this batch
    synced.clear()
    adm.admit_file(files[0], Caller("CT01", "127.0.0.1"))  # now known durable: the file and its folder only
    assert study not in synced and second.path.parent in synced, synced


def test_a_failed_folder_sync_answers_a700_for_its_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A series folder whose fsync fails (its new entries may not survive a power cut): every instance linked in
    it is answered 0xA700 and unlinked, nothing is indexed."""
    adm = _admission(tmp_path)
    files = write_series(tmp_path / "ct", 13, 6, 32, tag="dsync-")
    real = spool_module.fsync_dir

    def broken(path: Path) -> None:
        if path.is_dir():
            raise OSError(5, "Input/output error")
        real(path)

    monkeypatch.setattr(spool_module, "fsync_dir", broken)
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

    def slow(*args: Any) -> dict[Path, OSError]:
        release.wait(30)
        return real(*args)

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


def test_a_resend_whose_first_copy_a_prune_removes_meanwhile_is_kept(tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """A series resent while the spool's retention prunes it (node.store.prune): the resend was linked as the
    duplicate of the first copy, the prune then removed that copy and its row (under the index's write lock), and
    the resend's row was written after: acknowledged, its row naming no file -- an accepted instance lost. The
    prune's removal is made to fall in exactly that window (between the link and the rows); every resent instance
    must then be on disk, byte for byte, and listed."""
    adm = _admission(tmp_path)
    files = write_series(tmp_path / "ct", 12, 4, 32, tag="prune-race-")
    assert all(not isinstance(r, Exception) for r in _admit_all(adm, files))
    real = adm.index.add_instances
    pruned: list[Path] = []

    def prune_first(items: Any) -> list[bool]:
        if not pruned:  # what prune() does to the series, in the window between the resend's link and its row
            with adm.index.tx() as c:
                for r in c.execute("SELECT path FROM instances").fetchall():
                    pruned.append(Path(r["path"]))
                c.execute("DELETE FROM instances")
                for p in pruned:
                    p.unlink()
        return real(items)

    monkeypatch.setattr(adm.index, "add_instances", prune_first)
    results = _admit_all(adm, files)
    assert pruned and all(not isinstance(r, Exception) for r in results), results  # all acknowledged ...
    stored = {p.stem: p for p in adm.spool.instances.rglob("*.dcm")}
    for f in files:  # ... and all kept: the file each row names is there, with the bytes sent
        sop = str(dcmread(f, stop_before_pixels=True).SOPInstanceUID)
        assert sop in stored, f"{f.name}: acknowledged, its first copy pruned, nothing on disk"
        assert dataset_bytes(stored[sop]) == dataset_bytes(f)
    assert adm.index.count_instances() == len(files)
