"""ops19: refused callers were invisible in ``/metrics`` (only the log and the audit trail said so): a caller not
in ``allowed_callers`` (MRI9), an association calling another AE title, a connection that never sends a request.
Now ``srnode_associations_refused_total{reason}`` counts each, whatever the log budget."""

from __future__ import annotations

import socket
import subprocess
from pathlib import Path

import httpx

from tests.support.nodeproc import NodeProc
from tests.support.peers import ECHOSCU, wait_until


def _refused(node: NodeProc) -> dict[str, float]:
    out: dict[str, float] = {}
    for line in httpx.get(f"{node.http_url}/metrics", timeout=10).text.splitlines():
        if line.startswith("srnode_associations_refused_total{"):
            reason = line.split('reason="', 1)[1].split('"', 1)[0]
            out[reason] = float(line.rsplit(" ", 1)[1])
    return out


def test_refused_associations_are_counted_by_reason(tmp_path: Path) -> None:
    sections = {"node": {"require_known_callers": True, "require_called_ae": True, "association_timeout_s": 1.0,
                         "allowed_callers": [{"ae_title": "CT01", "host": ""},
                                             {"ae_title": "ECHOSCU", "host": ""}]}}  # NodeProc's readiness echo
    with NodeProc.start(tmp_path / "node", sections) as node:
        def echo(calling: str, called: str) -> int:
            return subprocess.run([ECHOSCU, "-aet", calling, "-aec", called, "127.0.0.1", str(node.port)],
                                  capture_output=True, timeout=30).returncode
        assert echo("CT01", node.ae_title) == 0
        assert echo("MRI9", node.ae_title) != 0
        assert echo("MRI9", node.ae_title) != 0
        assert echo("CT01", "ANY-SCP") != 0
        with socket.create_connection(("127.0.0.1", node.port), timeout=10) as s:  # never sends a request
            s.settimeout(10)
            assert s.recv(1) == b""  # closed by the node after association_timeout_s
        got = wait_until(lambda: (r := _refused(node)).get("no-request") and r, 15, what="the dropped connection")
        assert got == {"unknown-caller": 2.0, "called-ae": 1.0, "no-request": 1.0}, got
