"""Hostile DICOM peers at the connection level, against the real node process: silent TCP sockets (on a TLS and on
a plain port), more of them than ``[node] max_associations``, a peer that talks plain text to the TLS port and
``openssl s_client`` without a client certificate. Legitimate dcmtk callers must get through at once, the
silent sockets must be closed after their deadline, and every failed handshake must be in the log and the audit.
"""

from __future__ import annotations

import json
import socket
import subprocess
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import pytest

from node.ingest.server import MAX_PENDING
from tests.support.certs import Pki, make_pki
from tests.support.nodeproc import NodeProc
from tests.support.peers import ECHOSCU, wait_until

SILENT = 40  # idle sockets, ten times max_associations
TIMEOUT_S = 3.0  # handshake_timeout_s and association_timeout_s of these nodes


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


def _echo(node: NodeProc, *tls: str) -> tuple[bool, float, str]:
    """echoscu (dcmtk) with ``tls`` arguments; (ok, seconds, output)."""
    t0 = time.monotonic()
    r = subprocess.run([ECHOSCU, *tls, "-aec", node.ae_title, "-to", "5", "-ta", "5", "127.0.0.1", str(node.port)],
                       capture_output=True, text=True, timeout=30)
    return r.returncode == 0, time.monotonic() - t0, r.stdout + r.stderr


def _tls_args(pki: Pki) -> list[str]:
    return ["+tls", str(pki.client_key), str(pki.client_cert), "+cf", str(pki.ca)]


@contextmanager
def silent_sockets(port: int, n: int) -> Iterator[list[socket.socket]]:
    """``n`` TCP connections to the node that never send a byte."""
    with ExitStack() as stack:
        socks = []
        for _ in range(n):
            s = stack.enter_context(socket.create_connection(("127.0.0.1", port), timeout=5))
            socks.append(s)
        yield socks


def _closed_by_peer(s: socket.socket) -> bool:
    """True once the node has closed ``s`` (EOF or reset); False while it is still open."""
    s.settimeout(0.05)
    try:
        return s.recv(1024) == b""
    except TimeoutError:
        return False
    except OSError:
        return True


def _audit(node: NodeProc) -> list[dict[str, Any]]:
    path = node.spool / "audit.log"
    return [json.loads(ln) for ln in path.read_text().splitlines()] if path.exists() else []


def _nodes_sections(max_associations: int, **tls: Any) -> dict[str, Any]:
    # every dropped connection written (these tests count them one by one; the per-address bound has its own test)
    node: dict[str, Any] = {"max_associations": max_associations, "association_timeout_s": TIMEOUT_S,
                            "refusals_logged_per_minute": 0}
    if tls:
        node["tls"] = {**tls, "handshake_timeout_s": TIMEOUT_S}
    return {"node": node}


def test_silent_sockets_do_not_block_tls_callers(tmp_path: Path, pki: Pki) -> None:
    sections = _nodes_sections(4, enabled=True, cert=str(pki.server_cert), key=str(pki.server_key),
                               ca=str(pki.ca), require_client_cert=True)
    with NodeProc.start(tmp_path / "node", sections, wait=False) as node:
        wait_until(lambda: _echo(node, *_tls_args(pki))[0], timeout=60, what="TLS C-ECHO answered")
        with silent_sockets(node.port, SILENT) as socks:
            t_open = time.monotonic()
            # every legitimate caller gets through while the 40 silent sockets wait at the gate
            for _ in range(3):
                ok, seconds, out = _echo(node, *_tls_args(pki))
                assert ok, out
                assert seconds < 2.5, f"TLS C-ECHO took {seconds:.1f} s behind {SILENT} silent sockets"
            # a peer speaking plain DICOM to the TLS port fails its handshake at once (not after the deadline)
            with socket.create_connection(("127.0.0.1", node.port), timeout=5) as plain:
                plain.sendall(b"\x01\x00\x00\x00\x00\xcd" + b"\x00" * 64)
                wait_until(lambda: _closed_by_peer(plain), timeout=2, interval=0.05,
                           what="plain-text peer on the TLS port closed")
            # openssl without a client certificate: refused (require_client_cert)
            ossl = subprocess.run(["openssl", "s_client", "-connect", f"127.0.0.1:{node.port}", "-CAfile", str(pki.ca)],
                               input="", capture_output=True, text=True, timeout=20)
            # the silent ones are closed by the node after handshake_timeout_s
            wait_until(lambda: all(_closed_by_peer(s) for s in socks), timeout=TIMEOUT_S + 10, interval=0.2,
                       what="the silent sockets closed by the node")
            closed_after = time.monotonic() - t_open
        assert TIMEOUT_S - 0.5 <= closed_after <= TIMEOUT_S + 10, closed_after
        ok, seconds, out = _echo(node, *_tls_args(pki))
        assert ok and seconds < 2.5, out
        log = node.log()
        wait_until(lambda: len([a for a in _audit(node) if a["event"] == "tls-handshake-failed"]) >= SILENT + 2,
                   timeout=10, what="every failed handshake audited")
    failed = [a for a in _audit(node) if a["event"] == "tls-handshake-failed"]
    reasons = [a["reason"] for a in failed]
    assert sum("no ClientHello arrived within 3 s" in r for r in reasons) == SILENT, reasons
    others = [r for r in reasons if "no ClientHello" not in r]
    assert len(others) == 2, others  # the plain-text peer and openssl without a certificate
    assert any("WRONG_VERSION_NUMBER" in r.upper() or "wrong version" in r.lower() for r in others), others
    assert any("CERTIFICATE" in r.upper() for r in others), (others, ossl.stdout[-500:], ossl.stderr[-500:])
    assert all(a["address"] == "127.0.0.1" for a in failed)
    assert "no ClientHello arrived within 3 s" in log and "local limit exceeded" not in log.lower()
    assert "closed by the caller" not in log


def test_silent_sockets_do_not_lock_out_plain_callers(tmp_path: Path) -> None:
    """300 silent sockets: more than the gate holds (256); the oldest are evicted, callers still get through."""
    n = MAX_PENDING + 44
    with NodeProc.start(tmp_path / "node", _nodes_sections(4)) as node:
        for _ in range(5):  # TCP health probes: connect, close; neither a warning nor an audit record
            socket.create_connection(("127.0.0.1", node.port), timeout=5).close()
        with silent_sockets(node.port, n) as socks:
            for _ in range(3):
                ok, seconds, out = _echo(node)
                assert ok, out  # pynetdicom alone answers "local limit exceeded" here
                assert seconds < 2.5, f"C-ECHO took {seconds:.1f} s behind {n} silent sockets"
            wait_until(lambda: all(_closed_by_peer(s) for s in socks), timeout=TIMEOUT_S + 10, interval=0.2,
                       what="the silent sockets closed by the node")
        wait_until(lambda: len([a for a in _audit(node) if a["event"] == "connection-dropped"]) >= n,
                   timeout=20, what="the silent connections audited")
    dropped = [a["reason"] for a in _audit(node) if a["event"] == "connection-dropped"]
    evicted = [r for r in dropped if r.startswith("evicted")]
    assert len(dropped) == n and len(evicted) >= 44, (len(dropped), len(evicted))  # the probes are not there
    assert set(dropped) - set(evicted) == {"no A-ASSOCIATE-RQ within 3 s"}, set(dropped)
