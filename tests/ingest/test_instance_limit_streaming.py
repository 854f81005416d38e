"""``[node] max_instance_mb`` while a C-STORE's data set arrives (hostile19), both receive paths, the real node.

Before: the limit was checked once the data set was whole on disk, so one C-STORE could write any number of bytes
to the spool's ``incoming/`` first (100 MiB sent under ``max_instance_mb = 8``: 100 MiB written; with the default
2048 MB, down to the disk watermark, where every caller's C-STORE is refused 0xA700), while a STOW-RS request is
bounded by ``[http] max_body_mb`` as it arrives. Now nothing is written past the limit: the partial file is
removed when the data set passes it, the rest is read and dropped, and the C-STORE answered 0xC211 as before."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest

from node.dimse import Status
from tests.ingest.test_hostile_peers import _one_c_store
from tests.ingest.test_lean import _pdu, _Peer, _rq_command
from tests.support.nodeproc import NodeProc
from tests.support.pacs import TOKEN, phantom, start_node
from tests.support.peers import wait_until

LIMIT_MB = 8
SENT_MB = 64


@pytest.fixture(params=["lean", "pynetdicom"])
def node(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[NodeProc]:
    with NodeProc.start(tmp_path / "node", {"node": {"stable_age_s": 3600, "max_instance_mb": LIMIT_MB,
                                                     "receive_path": request.param}}) as n:
        yield n


def _incoming_bytes(node: NodeProc) -> int:
    total = 0
    for f in (node.spool / "incoming").rglob("*"):
        try:
            total += f.stat().st_size if f.is_file() else 0
        except FileNotFoundError:
            continue
    return total


@contextmanager
def _peak_incoming(node: NodeProc) -> Iterator[list[int]]:
    """While inside: the largest number of bytes seen in the node's incoming/ (polled every 10 ms), as ``[n]``."""
    peak = [0]
    stop = threading.Event()

    def watch() -> None:
        while not stop.is_set():
            peak[0] = max(peak[0], _incoming_bytes(node))
            stop.wait(0.01)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        yield peak
    finally:
        stop.set()
        watcher.join()


def test_a_data_set_past_max_instance_mb_is_not_written_beyond_it(node: NodeProc, tmp_path: Path) -> None:
    peer = _Peer(node.port)
    try:
        with _peak_incoming(node) as peak:
            peer.send(_pdu((peer.cx, 0x03, _rq_command(sop="1.2.826.0.1.3680043.10.1087.19.99"))))
            chunk = b"\0" * (128 << 10)
            for _ in range(SENT_MB * 8):
                peer.send(_pdu((peer.cx, 0x00, chunk)))
            peer.send(_pdu((peer.cx, 0x02, b"\0\0")))
            assert peer.answer(60) == Status.TOO_LARGE
            cmd, data = _one_c_store(tmp_path)  # the association goes on
            peer.send(_pdu((peer.cx, 0x03, cmd)), _pdu((peer.cx, 0x02, data)))
            assert peer.answer(60) == Status.SUCCESS
    finally:
        peer.close()
    assert peak[0] <= (LIMIT_MB << 20) + (1 << 20), f"incoming/ held {peak[0] / 2**20:.1f} MiB"
    wait_until(lambda: _incoming_bytes(node) == 0, timeout=30, what="incoming/ empty")
    line = next(ln for ln in node.log().splitlines() if "refused (0xC211)" in ln)
    assert f"passed node.max_instance_mb = {LIMIT_MB} while it arrived" in line, line


def test_a_stow_rs_part_past_max_instance_mb_is_not_written_beyond_it(tmp_path: Path) -> None:
    """The same for a STOW-RS part (bounded before only by ``[http] max_body_mb``, 2048 MB, for the whole
    request): a 48 MiB part under ``max_instance_mb = 8`` between two good instances: refused 0xC211, the two
    stored, ``incoming/`` never above the limit (before: 48 MiB written, then refused)."""
    node = start_node(tmp_path / "node", {"node": {"stable_age_s": 3600, "max_instance_mb": LIMIT_MB}})
    def body() -> Iterator[bytes]:
        good = [f.read_bytes() for f in phantom(tmp_path, seed=1919, slices=2)]
        yield b"--b\r\nContent-Type: application/dicom\r\n\r\n" + good[0] + b"\r\n"
        yield b"--b\r\nContent-Type: application/dicom\r\n\r\n"
        for _ in range(48 * 8):
            yield b"\0" * (128 << 10)
        yield b"\r\n--b\r\nContent-Type: application/dicom\r\n\r\n" + good[1] + b"\r\n--b--\r\n"

    try:
        with _peak_incoming(node) as peak:
                r = httpx.post(f"{node.http_url}/dicom-web/studies", content=body(), timeout=120,
                           headers={"Authorization": f"Bearer {TOKEN}",
                                    "Content-Type": 'multipart/related; type="application/dicom"; boundary=b'})
    finally:
        node.stop()
    assert r.status_code in (200, 202), r.text
    failed = r.json()["00081198"]["Value"]
    assert [f["00081197"]["Value"][0] for f in failed] == [Status.TOO_LARGE], r.text
    assert len(r.json()["00081199"]["Value"]) == 2, r.text
    assert peak[0] <= (LIMIT_MB << 20) + (1 << 20), f"incoming/ held {peak[0] / 2**20:.1f} MiB"
    assert "over node.max_instance_mb = 8 while it arrived" in node.log()
