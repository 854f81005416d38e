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

import pytest

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
