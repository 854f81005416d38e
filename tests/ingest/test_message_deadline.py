"""A C-STORE whose data set never ends (hostile18), on both receive paths: the command set says a data set
follows, then its fragments trickle in, each PDU well inside ``[node] idle_timeout_s`` and the per-PDU deadline,
so neither ever fired: the association slot and the partial file in incoming/ were held as long as the peer
liked. ``[node] message_timeout_s`` bounds a DIMSE message (command set or data set) from its first fragment to its
last (plus 1 s per 64 KiB received): past it A-ABORT, one line, the partial file removed. Also what trails a data
set: bytes after its last element, and a data set whose last fragment never sets the 'last' bit."""

from __future__ import annotations

import logging
import struct
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from pydicom import dcmread

from node.app.phantom import write_phantom_series
from node.ingest import StoreSCP
from tests.ingest.test_hostile_peers import _open, _settled, _warnings
from tests.ingest.test_lean import _dataset_bytes, _pdu, _Peer, _rq_command, _spool
from tests.ingest.test_scp import start_scp


@pytest.fixture(params=["lean", "pynetdicom"])
def scp(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[StoreSCP]:
    s = start_scp(tmp_path / request.param, receive_path=request.param, idle_timeout_s=3,
                  message_timeout_s=4)
    yield s
    s.stop()


def _one(tmp_path: Path, seed: int = 18) -> tuple[bytes, bytes]:
    f = write_phantom_series(tmp_path / f"ph{seed}", slices=1, size=64, seed=seed)[0]
    return _rq_command(sop=str(dcmread(f, stop_before_pixels=True).SOPInstanceUID)), _dataset_bytes(f)


def test_a_data_set_trickled_inside_every_idle_timeout_is_aborted_at_the_message_deadline(
        scp: StoreSCP, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A fragment of 64 bytes every 1 s (inside idle_timeout_s = 3 s, each PDU whole at once). Before: after 12 s
    the association still open (counted), its partial file in incoming/, nothing logged; the trickle could go on
    for ever. Now: aborted once the data set took message_timeout_s = 4 s (+1 s per 64 KiB), one WARNING line,
    the partial file removed, nothing stored."""
    caplog.set_level(logging.WARNING)
    cmd, data = _one(tmp_path)
    peer = _Peer(scp.cfg.node.port)
    aborted_at = None
    pace = threading.Event()
    try:
        peer.send(_pdu((peer.cx, 0x03, cmd)))
        t0 = time.monotonic()
        for k in range(12):
            try:
                peer.send(_pdu((peer.cx, 0x00, data[64 * k:64 * (k + 1)])))
            except OSError:
                aborted_at = time.monotonic() - t0
                break
            if not peer.assoc.is_alive() or peer.assoc.acse.is_aborted():
                aborted_at = time.monotonic() - t0
                break
            pace.wait(1.0)  # the trickle's pace (the attack), not a wait for the node
        assert aborted_at is not None, "still open after 12 s of a trickled data set"
        assert peer.answer(10) is None
    finally:
        peer.close()
    _settled(scp)
    assert not _spool(scp)
    said = _warnings(caplog, "message_timeout_s")
    assert len(said) == 1 and "data set" in said[0], caplog.text


@pytest.mark.parametrize("stall_after", ["command", "fragments"])
def test_a_c_store_whose_data_set_stops_coming_is_aborted_with_nothing_left(
        scp: StoreSCP, tmp_path: Path, stall_after: str) -> None:
    """The command set says a data set follows, then nothing (or 3 fragments of it, the last bit never set), the
    connection left open: aborted by idle_timeout_s (3 s here), the slot freed and no partial file left."""
    cmd, data = _one(tmp_path)
    peer = _Peer(scp.cfg.node.port)
    try:
        pdus = [_pdu((peer.cx, 0x03, cmd))]
        if stall_after == "fragments":
            pdus += [_pdu((peer.cx, 0x00, data[k * 500:(k + 1) * 500])) for k in range(3)]
        peer.send(*pdus)
        assert peer.answer(20) is None  # A-ABORT, no status
    finally:
        peer.close()
    _settled(scp)
    assert not _spool(scp) and _open(scp) == 0


TRAILERS = {
    "16 zero bytes": b"\x00" * 16,
    "7 bytes 0xFF": b"\xff" * 7,
    "an element header announcing 1 GB": b"\x09\x00\x10\x00OB\x00\x00\x00\x00\x00\x40",
    "text": b"GARBAGE AFTER THE PIXEL DATA",
}


@pytest.mark.parametrize("what", list(TRAILERS))
def test_bytes_after_the_data_set_s_last_element_are_refused_with_a_status(
        scp: StoreSCP, tmp_path: Path, what: str, caplog: pytest.LogCaptureFixture) -> None:
    """A data set with bytes after its last element (the pixel data), in the fragment with the last bit. Before:
    stored, 0x0000, on both paths (a file every later reader parses its own way: zeros read as tag (0000,0000), an
    element announcing 1 GB past the end). Now 0xC210 naming the bytes, nothing stored, the association goes on."""
    caplog.set_level(logging.WARNING)
    cmd, data = _one(tmp_path)
    peer = _Peer(scp.cfg.node.port)
    try:
        peer.send(_pdu((peer.cx, 0x03, cmd)), _pdu((peer.cx, 0x02, data + TRAILERS[what])))
        status = peer.answer(20)
    finally:
        peer.close()
    _settled(scp)
    assert status == 0xC210, (status, list(_spool(scp)))
    assert not _spool(scp)
    assert _warnings(caplog, "are no data set elements"), caplog.text


def test_elements_after_the_pixel_data_in_ascending_order_are_stored(scp: StoreSCP, tmp_path: Path) -> None:
    """The other side: Data Set Trailing Padding (FFFC,FFFC) after the pixel data is a data set element: stored."""
    cmd, data = _one(tmp_path)
    padding = b"\xfc\xff\xfc\xffOB\x00\x00" + struct.pack("<L", 8) + b"\x00" * 8
    peer = _Peer(scp.cfg.node.port)
    try:
        peer.send(_pdu((peer.cx, 0x03, cmd)), _pdu((peer.cx, 0x02, data + padding)))
        status = peer.answer(20)
    finally:
        peer.close()
    _settled(scp)
    assert status == 0 and len(_spool(scp)) == 1, status


def test_a_large_data_set_sent_slowly_but_steadily_past_message_timeout_s_is_stored(
        scp: StoreSCP, tmp_path: Path) -> None:
    """The deadline must not catch a real slow link (review18): a 512 KiB CT slice in 16 KiB fragments every
    0.2 s (80 KiB/s, over 1 s per 64 KiB) takes ~6.4 s, past message_timeout_s = 4 s, inside its allowance
    (4 s + 8 s): stored, 0x0000, on both paths."""
    f = write_phantom_series(tmp_path / "big", slices=1, size=512, seed=19)[0]
    cmd, data = _rq_command(sop=str(dcmread(f, stop_before_pixels=True).SOPInstanceUID)), _dataset_bytes(f)
    assert len(data) > 500_000
    peer = _Peer(scp.cfg.node.port)
    pace = threading.Event()
    chunk = 16 << 10
    try:
        peer.send(_pdu((peer.cx, 0x03, cmd)))
        t0 = time.monotonic()
        for at in range(0, len(data), chunk):
            last = at + chunk >= len(data)
            peer.send(_pdu((peer.cx, 0x02 if last else 0x00, data[at:at + chunk])))
            if not last:
                pace.wait(0.2)  # the link's pace, not a wait for the node
        took = time.monotonic() - t0
        status = peer.answer(30)
    finally:
        peer.close()
    _settled(scp)
    assert took > 4.0  # past message_timeout_s: the case the deadline must let through
    assert status == 0x0000
    assert len(_spool(scp)) == 1
