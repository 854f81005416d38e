"""A peer that makes the node's libraries write its log for it (hostile16): one A-ASSOCIATE-RQ of 128 presentation
contexts, each proposing 100 transfer syntaxes that are no valid UIDs (878 KB, within the 1 MiB the node reads of
an A-ASSOCIATE-RQ), made pynetdicom and pydicom write ~6,000 WARNING lines into the node's log (~2 lines of log
per byte sent, and again on every association: a log disk filled at the attacker's line rate, the node's own
lines drowned). Against the real node process; the association itself is answered as before."""

from __future__ import annotations

import socket
import struct
from pathlib import Path

from tests.support.nodeproc import NodeProc
from tests.support.peers import wait_until


def _item(kind: int, body: bytes) -> bytes:
    return struct.pack(">BBH", kind, 0, len(body)) + body


def _request(contexts: int, syntaxes: int) -> bytes:
    """An A-ASSOCIATE-RQ (PS3.8 9.3.2) calling SRNODE as ATTACK: ``contexts`` CT Image Storage presentation
    contexts, each proposing ``syntaxes`` 64-character transfer syntax "UIDs" that are not valid (then Implicit VR
    Little Endian)."""
    body = struct.pack(">H", 1) + b"\0\0" + b"SRNODE".ljust(16) + b"ATTACK".ljust(16) + b"\0" * 32
    body += _item(0x10, b"1.2.840.10008.3.1.1.1")
    names = [("1.2.3." + str(i)).ljust(64, "x") for i in range(syntaxes)] + ["1.2.840.10008.1.2"]
    for k in range(contexts):
        proposed = _item(0x30, b"1.2.840.10008.5.1.4.1.1.2") + b"".join(_item(0x40, n.encode()) for n in names)
        body += _item(0x20, struct.pack(">BBBB", 2 * k + 1, 0, 0, 0) + proposed)
    body += _item(0x50, _item(0x51, struct.pack(">L", 16384)) + _item(0x52, b"1.2.3.4"))
    return struct.pack(">BBL", 1, 0, len(body)) + body


def test_an_association_request_cannot_flood_the_log(tmp_path: Path) -> None:
    """Three such requests: the node answers each (A-ASSOCIATE-AC, the valid syntax accepted), and writes at most a
    few dozen lines for all three: each third-party message at most 10 times a minute (then one line saying that
    more are suppressed), a library logger at most 100 lines a minute. A C-ECHO still gets through."""
    with NodeProc.start(tmp_path / "node", {"node": {"stable_age_s": 3600}}) as node:
        before = len(node.log().splitlines())
        request = _request(128, 100)
        assert len(request) < 1 << 20
        for _ in range(3):
            with socket.create_connection(("127.0.0.1", node.port), timeout=60) as s:
                s.sendall(request)
                answer = s.recv(1)
                assert answer == b"\x02", answer  # A-ASSOCIATE-AC
        wait_until(lambda: node.log().count("association from ATTACK@127.0.0.1") >= 3, timeout=30,
                   what="the three associations ended")
        assert node.echo()
        lines = node.log().splitlines()[before:]
    library = [ln for ln in lines if " pynetdicom" in ln or " pydicom" in ln or " py.warnings" in ln]
    assert len(library) <= 60, f"{len(library)} library lines for 3 association requests:\n" + "\n".join(library[:30])
    assert any("suppressed" in ln for ln in library), library[:30]
