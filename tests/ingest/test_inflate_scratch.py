"""Where the header check inflates a deflated instance of the spool (break16b, review of hostile16).

``srnode reindex`` (and every ``srnode serve`` start) reads the header of each spool instance the index lacks; a
deflated one is inflated to a copy first (``node.ingest.inflate.inflated_copy``). That copy was written beside the
instance, in ``instances/<Study>/<Series>/``: a start killed meanwhile (systemd's start timeout, an OOM kill, an
operator's Ctrl-C on ``srnode reindex``) left an ``inflated-*.dcm`` of up to the instance's inflated size there for
good (``clean_incoming`` only empties ``incoming/``), and every later reindex skipped it with a warning and exited 1.
"""

from __future__ import annotations

import os
import shutil
import signal
import struct
import subprocess
import sys
import threading
from pathlib import Path

import httpx
import pytest
from pydicom import dcmread
from pydicom.uid import DeflatedExplicitVRLittleEndian, ExplicitVRLittleEndian

from node.dimse import Status
from node.store import Spool
from tests.ingest.test_bombs import MiB, Peak, _instance, _store
from tests.support.nodeproc import NodeProc
from tests.support.pacs import TOKEN, start_node
from tests.support.peers import mount_tmpfs, wait_until

ROOT = Path(__file__).resolve().parents[2]


def _copies(root: Path) -> list[Path]:
    return [p for p in root.rglob("inflated-*") if p.is_file()]


@pytest.mark.faults
def test_a_reindex_killed_while_inflating_leaves_no_copy_among_the_stored_instances(tmp_path: Path) -> None:
    src = _instance(tmp_path, 7, zeros=1024 * MiB, deflated=True)  # 1 GiB once inflated, ~5 MB as stored
    ds = dcmread(src, stop_before_pixels=True, defer_size=1024)
    spool = Spool(tmp_path / "spool", 1)
    stored = spool.instance_path(str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID), str(ds.SOPInstanceUID))
    stored.parent.mkdir(parents=True)
    src.rename(stored)
    config = tmp_path / "config.toml"
    config.write_text(f'[node]\nspool_dir = "{spool.root}"\nmin_free_mb = 1\n')
    cmd = [sys.executable, "-m", "node.app.cli", "reindex", "--config", str(config)]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        seen = wait_until(lambda: _copies(spool.root) or proc.poll() is not None, timeout=120, interval=0.005,
                          what="an inflated copy")  # the copies, or True once reindex has ended without one
        assert isinstance(seen, list), f"reindex ended before its inflated copy was seen: {proc.stdout.read()!r}"
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    left = _copies(spool.root)
    assert left and all(p.parent == spool.incoming for p in left), left  # where the next start cleans up
    assert sorted(p for p in spool.instances.rglob("*") if p.is_file()) == [stored]
    spool.clean_incoming()  # what `srnode serve` does first at its start
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and "1 added" in done.stdout and "0 skipped" in done.stdout, done.stdout + done.stderr
    assert not _copies(spool.root)


@pytest.mark.faults
def test_inflating_a_deflated_instance_to_check_it_does_not_take_the_spool_disk_reserve(tmp_path: Path) -> None:
    """A deflated instance of ~100 KB inflating to 100 MiB, on a 128 MiB spool disk with ``min_free_mb = 48``:
    the header check's copy took the disk down to ~20 MiB free (below the reserve min_free_mb keeps for the
    index, the jobs and their results; 32 associations x 2 GiB bombs do the same to a real spool) and the
    instance was stored. Now the check stops at the watermark: 0xA700 (as any C-STORE on a disk below it), one
    line naming min_free_mb, the copy removed; a plain instance is stored right after."""
    disk = tmp_path / "disk"
    if not mount_tmpfs(disk, "128m"):
        pytest.skip("cannot mount a tmpfs here (needs root and CAP_SYS_ADMIN): no small real file system to fill")
    node: NodeProc | None = None
    try:
        node = NodeProc.start(tmp_path / "node", {"node": {"spool_dir": str(disk / "spool"), "min_free_mb": 48,
                                                           "stable_age_s": 3600.0}})
        bomb = _instance(tmp_path, 11, zeros=100 * MiB, deflated=True)
        lowest = [shutil.disk_usage(disk).free]
        stop = threading.Event()

        def watch() -> None:
            while not stop.is_set():
                lowest[0] = min(lowest[0], shutil.disk_usage(disk).free)

        watcher = threading.Thread(target=watch, daemon=True)
        watcher.start()
        try:
            status = _store(node, bomb, DeflatedExplicitVRLittleEndian)
        finally:
            stop.set()
            watcher.join()
        assert status == Status.OUT_OF_RESOURCES, (hex(status), lowest[0] >> 20)
        assert lowest[0] >= (48 - 2) * MiB, lowest[0] >> 20  # at most a chunk past the watermark
        wait_until(lambda: "node.min_free_mb" in node.log(), timeout=30, what="the refusal's line")
        assert not _copies(node.spool), _copies(node.spool)
        plain = _instance(tmp_path, 12, zeros=0, deflated=False)
        assert _store(node, plain, ExplicitVRLittleEndian) == Status.SUCCESS
        node.stop()
    finally:
        if node is not None:
            node.kill9()
        subprocess.run(["umount", "-l", str(disk)], capture_output=True)


def _implicit_meta_copy(src: Path, out: Path) -> Path:
    """``src`` (a Part 10 file) with its file meta rewritten in implicit VR little endian (not PS3.10's explicit VR,
    but pydicom reads it): the same elements, each tag + 4-byte length + value."""
    from pydicom.filereader import read_file_meta_info

    from node.ingest.inflate import _meta_end

    with src.open("rb") as fh:
        end, _ = _meta_end(fh)
    elements = b""
    for e in read_file_meta_info(src):
        if e.tag.element == 0:
            continue
        value = e.value.encode() if isinstance(e.value, str) else bytes(e.value)
        value += b"\0" * (len(value) % 2)
        elements += struct.pack("<HHL", 0x0002, e.tag.element, len(value)) + value
    meta = struct.pack("<HHLL", 0x0002, 0x0000, 4, len(elements)) + elements
    with src.open("rb") as fh, out.open("wb") as dst:
        dst.write(fh.read(132) + meta)
        fh.seek(end)
        shutil.copyfileobj(fh, dst)
    return out


def test_a_deflate_bomb_behind_an_implicit_vr_file_meta_is_not_inflated_in_memory(tmp_path: Path) -> None:
    """A STOW-RS part (a Part 10 file the peer writes whole, as a pulled instance is) whose file meta is in implicit
    VR: the deflate-bomb guard read the meta as explicit VR only, missed its Deflated transfer syntax and let
    pydicom parse the file, which inflated 300 MiB from a 307 KB part whole in memory (node +600 MB; a 16 MB part
    would take ~32 GB). Now the meta is read as pydicom reads it (implicit when the first element's VR bytes are
    not capitals): the part is refused 0xC210 naming its file meta, nothing inflated."""
    node = start_node(tmp_path / "node", {})
    try:
        bomb = _implicit_meta_copy(_instance(tmp_path, 21, zeros=300 * MiB, deflated=True), tmp_path / "bomb.dcm")
        assert bomb.stat().st_size < 2 * MiB
        body = b"--b1\r\nContent-Type: application/dicom\r\n\r\n" + bomb.read_bytes() + b"\r\n--b1--\r\n"
        with Peak(node) as peak:
            r = httpx.post(f"{node.http_url}/dicom-web/studies", content=body, timeout=120,
                           headers={"Authorization": f"Bearer {TOKEN}",
                                    "Content-Type": 'multipart/related; type="application/dicom"; boundary=b1'})
        assert peak.growth_mb < 48, f"the node grew by {peak.growth_mb:.0f} MB on a {bomb.stat().st_size} byte part"
        assert r.status_code == 409 and "49680" in r.text, (r.status_code, r.text)  # FailureReason 0xC210
        assert "file meta" in r.headers.get("warning", ""), r.headers
        assert not _copies(node.spool)
        plain = _implicit_meta_copy(_instance(tmp_path, 22, zeros=0, deflated=False), tmp_path / "plain.dcm")
        body = b"--b1\r\nContent-Type: application/dicom\r\n\r\n" + plain.read_bytes() + b"\r\n--b1--\r\n"
        r = httpx.post(f"{node.http_url}/dicom-web/studies", content=body, timeout=60,
                       headers={"Authorization": f"Bearer {TOKEN}",
                                "Content-Type": 'multipart/related; type="application/dicom"; boundary=b1'})
        assert r.status_code == 200, r.text  # an implicit VR file meta on a plain file is still taken
    finally:
        node.stop()


def _padded_syntax_copy(src: Path, out: Path, pad: int) -> Path:
    """``src`` (a Part 10 file, explicit VR meta) with its TransferSyntaxUID value followed by ``pad`` NUL bytes
    (pydicom strips them: the same transfer syntax to it)."""
    from pydicom.filereader import read_file_meta_info

    from node.ingest.inflate import _meta_end

    with src.open("rb") as fh:
        end, _ = _meta_end(fh)
    elements = b""
    for e in read_file_meta_info(src):
        if e.tag.element == 0:
            continue
        value = e.value.encode() if isinstance(e.value, str) else bytes(e.value)
        value += b"\0" * (pad if e.tag.element == 0x0010 else 0)
        value += b"\0" * (len(value) % 2)
        vr = e.VR.encode()
        if vr in (b"OB", b"UN"):
            elements += struct.pack("<HH2sHL", 0x0002, e.tag.element, vr, 0, len(value)) + value
        else:
            elements += struct.pack("<HH2sH", 0x0002, e.tag.element, vr, len(value)) + value
    meta = struct.pack("<HH2sHL", 0x0002, 0x0000, b"UL", 4, len(elements)) + elements
    with src.open("rb") as fh, out.open("wb") as dst:
        dst.write(fh.read(132) + meta)
        fh.seek(end)
        shutil.copyfileobj(fh, dst)
    return out


def test_a_deflate_bomb_behind_a_padded_transfer_syntax_uid_is_refused_without_inflating_it(tmp_path: Path) -> None:
    """A STOW-RS part whose TransferSyntaxUID (Deflated) is followed by 120 NUL bytes: the guard read the value
    only up to 128 bytes, saw no transfer syntax and let pydicom parse the file; pydicom strips the padding, sees
    Deflated and inflated 300 MiB from 307 KB whole (node +600 MB). Now the syntax pydicom acts on decides: refused
    0xC211 over node.max_instance_mb = 64 (inflated in chunks), memory flat."""
    node = start_node(tmp_path / "node", {"node": {"max_instance_mb": 64}})
    try:
        bomb = _padded_syntax_copy(_instance(tmp_path, 31, zeros=300 * MiB, deflated=True), tmp_path / "bomb.dcm",
                                   120)
        body = b"--b1\r\nContent-Type: application/dicom\r\n\r\n" + bomb.read_bytes() + b"\r\n--b1--\r\n"
        with Peak(node) as peak:
            r = httpx.post(f"{node.http_url}/dicom-web/studies", content=body, timeout=120,
                           headers={"Authorization": f"Bearer {TOKEN}",
                                    "Content-Type": 'multipart/related; type="application/dicom"; boundary=b1'})
        assert peak.growth_mb < 48, f"the node grew by {peak.growth_mb:.0f} MB on a {bomb.stat().st_size} byte part"
        assert r.status_code == 409 and "49681" in r.text, (r.status_code, r.text)  # FailureReason 0xC211
        assert "max_instance_mb" in r.headers.get("warning", ""), r.headers
        assert not _copies(node.spool)
    finally:
        node.stop()
