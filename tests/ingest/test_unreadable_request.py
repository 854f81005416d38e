"""A-ASSOCIATE-RQs the DICOM upper layer refuses or cannot read (hostile19), against the real node process.

Before: pynetdicom's acceptor thread, counted toward ``[node] max_associations`` from the first byte on, waited
``acse_timeout`` (``[node] association_timeout_s``, 10 s by default) for a request its reader had already given
up on (it answered A-ABORT or A-ASSOCIATE-RJ and closed): the slot stayed taken, past the per-caller and
per-address limits (the node's EVT_REQUESTED handler never ran), and the node wrote no line of its own. Measured
with ``max_associations = 1``: each of the five requests below locked every other caller out for 10.1 s (another
caller's C-ECHO refused ~200 times); one 100-byte request per slot every 10 s locks out every modality. Now the
slot is free as soon as the reader ends, with one WARNING line and one ``connection-dropped`` audit record."""

from __future__ import annotations

import json
import socket
import struct
from collections.abc import Iterator
from pathlib import Path

import pytest

from node.audit import PeerBudget
from tests.support.nodeproc import NodeProc
from tests.support.peers import wait_until


def _item(kind: int, body: bytes) -> bytes:
    return struct.pack(">BBH", kind, 0, len(body)) + body


def _request(calling: bytes = b"PEER", version: int = 1, context_id: int = 1) -> bytes:
    """An A-ASSOCIATE-RQ (PS3.8 9.3.2) calling SRNODE with one Verification presentation context."""
    body = struct.pack(">H", version) + b"\0\0" + b"SRNODE".ljust(16) + calling.ljust(16) + b"\0" * 32
    body += _item(0x10, b"1.2.840.10008.3.1.1.1")
    body += _item(0x20, bytes([context_id, 0, 0, 0]) + _item(0x30, b"1.2.840.10008.1.1")
                  + _item(0x40, b"1.2.840.10008.1.2"))
    body += _item(0x50, _item(0x51, struct.pack(">L", 16384)) + _item(0x52, b"1.2.3.4"))
    return struct.pack(">BBL", 1, 0, len(body)) + body


BAD_REQUESTS = {
    "a calling AE title of non-ASCII bytes": (_request(calling=b"\xff\xfeCT"), "cannot be decoded"),
    "a calling AE title with a backslash": (_request(calling=b"CT\\01"), "cannot be decoded"),
    "an even presentation context ID": (_request(context_id=2), "upper layer failed"),
    "protocol version 2": (_request(version=2), "refused by the DICOM upper layer"),
    "an A-ASSOCIATE-RQ of 16 bytes of garbage": (b"\x01\x00\x00\x00\x00\x10" + b"\xff" * 16, "cannot be decoded"),
}


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NodeProc]:
    # one slot, and a request wait far beyond the test's deadline: a slot held until association_timeout_s is seen
    with NodeProc.start(tmp_path_factory.mktemp("node"), {"node": {
            "stable_age_s": 3600, "max_associations": 1, "association_timeout_s": 120}}) as n:
        yield n


@pytest.mark.parametrize("what", list(BAD_REQUESTS))
def test_a_request_the_upper_layer_refuses_frees_its_slot_at_once(node: NodeProc, what: str) -> None:
    """The peer gets its A-ABORT / A-ASSOCIATE-RJ; another caller's C-ECHO gets the only slot well before
    ``association_timeout_s`` (120 s here) would have freed it; the node says which address and why, in its log
    and the audit log."""
    data, reason = BAD_REQUESTS[what]
    lines = len(node.log().splitlines())
    with socket.create_connection(("127.0.0.1", node.port), timeout=30) as s:
        s.sendall(data)
        answer = s.recv(1)
    assert answer in (b"\x03", b"\x07"), answer  # A-ASSOCIATE-RJ or A-ABORT
    wait_until(node.echo, timeout=30, interval=0.2, what=f"another caller's C-ECHO after {what}")
    new = node.log().splitlines()[lines:]
    said = [ln for ln in new if "closed before an association (A-ASSOCIATE-RQ)" in ln]
    assert len(said) == 1 and reason in said[0] and "127.0.0.1" in said[0], new
    audit = [json.loads(ln) for ln in (node.spool / "audit.log").read_text().splitlines()]
    assert any(r["event"] == "connection-dropped" and reason in r["reason"] for r in audit), audit[-5:]


def test_a_peer_sending_such_requests_cannot_hold_the_slot(node: NodeProc) -> None:
    """20 of them in a row, each connection left open by the peer after the answer: the slot is free between
    them, and afterwards a C-ECHO gets in (before: the first one held it for association_timeout_s)."""
    held = []
    try:
        for i in range(20):
            s = socket.create_connection(("127.0.0.1", node.port), timeout=30)
            held.append(s)
            s.sendall(_request(calling=b"\xffHOG%d" % i))
            assert s.recv(1) == b"\x07"
        wait_until(node.echo, timeout=30, interval=0.2, what="a C-ECHO while the hostile peer keeps its sockets")
    finally:
        for s in held:
            s.close()


def test_refusals_from_one_address_are_written_within_its_budget_then_counted(tmp_path: Path) -> None:
    """20 associations calling another AE title and 10 unreadable requests from one address, with
    ``refusals_logged_per_minute = 5``: each still answered (A-ASSOCIATE-RJ / A-ABORT), 5 lines and audit records
    of each kind written (the 5th saying the next ones of that kind are counted), the other 20 counted and written
    as one line and one ``refusals-not-written`` record at the stop. Before hostile19: one WARNING line and one
    fsync'ed audit record per refusal (128 a second from one sequential client: ~45 KB/s on the spool's disk).
    review19: with one budget per address, the 20 rejections of one kind left the 10 unreadable requests without
    a single line or record (their reason written nowhere); the budget is now per address and kind."""
    node = NodeProc.start(tmp_path / "node", {"node": {"stable_age_s": 3600, "refusals_logged_per_minute": 5}})
    try:
        for k in range(30):
            data = _request(calling=b"HOG%d" % k) if k < 20 else BAD_REQUESTS["a calling AE title with a backslash"][0]
            if k < 20:
                data = data.replace(b"SRNODE".ljust(16), b"ELSEWHERE".ljust(16), 1)
            with socket.create_connection(("127.0.0.1", node.port), timeout=30) as s:
                s.sendall(data)
                assert s.recv(1) == (b"\x03" if k < 20 else b"\x07"), k
        wait_until(node.echo, timeout=30, interval=0.2, what="a C-ECHO after the refusals")
    finally:
        assert node.stop() == 0
    log = node.log().splitlines()
    written = [ln for ln in log if "rejected: it called AE title 'ELSEWHERE'" in ln]
    assert len(written) == 5, written
    assert ("the next ones from 127.0.0.1 (called AE title) are counted, not written one by one, for up to 60 s"
            in written[-1]), written[-1]
    unreadable = [ln for ln in log if "closed before an association (A-ASSOCIATE-RQ)" in ln]
    assert len(unreadable) == 5, unreadable  # before (one budget an address): 0
    assert any("20 more refused association(s) / dropped connection(s) from 127.0.0.1 were counted" in ln
               for ln in log), log[-10:]
    audit = [json.loads(ln) for ln in (node.spool / "audit.log").read_text().splitlines()]
    assert sum(r["event"] == "association-rejected" for r in audit) == 5
    assert sum(r["event"] == "connection-dropped" for r in audit) == 5
    assert [r["count"] for r in audit if r["event"] == "refusals-not-written"] == [20]


def test_the_budget_writes_the_count_with_the_first_refusal_of_the_next_window() -> None:
    now = [0.0]
    budget = PeerBudget(2, window_s=60.0, clock=lambda: now[0])
    assert budget.take("a") == (True, "")
    assert budget.take("a") == (True, "the next ones from a are counted, not written one by one, for up to 60 s")
    assert budget.take("b") == (True, "")  # another address has its own budget
    assert [budget.take("a") for _ in range(3)] == [(False, "")] * 3
    now[0] = 60.0
    assert budget.take("a") == (True, "3 more from a were counted, not written one by one, before this")
    assert budget.flush() == {}
    assert PeerBudget(0).take("a") == (True, "")  # 0: every one written


def test_each_kind_of_refusal_of_an_address_has_its_own_budget() -> None:
    """review19: one kind flooding an address's budget no longer silences another kind from it."""
    now = [0.0]
    budget = PeerBudget(2, window_s=60.0, clock=lambda: now[0])
    assert [budget.take("a", "called AE title")[0] for _ in range(5)] == [True, True, False, False, False]
    assert budget.take("a", "TLS handshake") == (True, "")  # before: (False, "") -- counted, its reason lost
    assert budget.take("a", "TLS handshake") == (
        True, "the next ones from a (TLS handshake) are counted, not written one by one, for up to 60 s")
    assert budget.take("a", "TLS handshake") == (False, "")
    assert budget.flush() == {"a": 4}  # the counts of every kind, by address
