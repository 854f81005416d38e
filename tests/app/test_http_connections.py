"""Idle HTTP connections cannot take the DICOM side's file descriptors (hostile16), against the real node process.

A node started under systemd has a soft RLIMIT_NOFILE of 1024. Any client that can reach the HTTP port (no token
is needed to connect) opening 1,100 connections and saying nothing held every descriptor until
``header_timeout_s``, and reconnected: dcmtk storescu then failed ("DUL network read timeout") and echoscu hung.
Now the node raises its soft limit to the hard one at start, and ``[http] max_connections`` bounds the HTTP
connections open at once: one beyond it is answered 503 and closed at once.
"""

from __future__ import annotations

import resource
import socket
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from node.app.phantom import write_phantom_series
from tests.support.nodeproc import NodeProc
from tests.support.peers import STORESCU, wait_until

SOFT = 1024  # systemd's default soft limit of open files


@contextmanager
def _soft_nofile(limit: int) -> Iterator[None]:
    """This process's soft RLIMIT_NOFILE lowered to ``limit`` (a child started meanwhile inherits it)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(limit, hard), hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def _fds(pid: int) -> int:
    return len(list(Path(f"/proc/{pid}/fd").iterdir()))


def _nofile(pid: int) -> tuple[int, int]:
    return resource.prlimit(pid, resource.RLIMIT_NOFILE)


def test_idle_http_connections_cannot_starve_the_dicom_side(tmp_path: Path) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    assert hard >= 2 * SOFT and soft >= 1200, "the test needs more open files than systemd's default"
    with _soft_nofile(SOFT):
        node = NodeProc.start(tmp_path / "node", {"node": {"stable_age_s": 3600},
                                                  "http": {"max_connections": 64, "header_timeout_s": 60}})
    files = write_phantom_series(tmp_path / "in", slices=4, size=32, step_mm=3.0, seed=7)
    held: list[socket.socket] = []
    try:
        pid = node.proc.pid if node.proc else 0
        assert _nofile(pid)[0] == _nofile(pid)[1], f"soft limit not raised: {_nofile(pid)}"
        # the raised limit is one defence; the bound on connections is the other: test it at systemd's limit
        resource.prlimit(pid, resource.RLIMIT_NOFILE, (SOFT, _nofile(pid)[1]))
        port = int(node.config["http"]["port"])
        for _ in range(1100):
            held.append(socket.create_connection(("127.0.0.1", port), timeout=10))
        # those beyond the bound are answered 503 and closed by the node: wait until it has closed them
        wait_until(lambda: _fds(pid) < 64 + 200, timeout=60, what=f"the node closing connections ({_fds(pid)} fds)")
        refused = held[-1]
        refused.settimeout(10)
        answer = refused.recv(4096)
        assert answer.startswith(b"HTTP/1.1 503"), answer
        assert b"max_connections" in answer, answer
        r = subprocess.run([STORESCU, "-aec", "SRNODE", "-to", "10", "-ta", "10", "-td", "10", "127.0.0.1",
                            str(node.port), *map(str, files)], capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, r.stdout + r.stderr
        assert node.echo()
    finally:
        for s in held:
            s.close()
        node.stop()
    log = node.log()
    assert "[http] max_connections = 64" in log
    assert log.count("max_connections") < 20, "one line per refused connection floods the log"
    assert "Too many open files" not in log
