"""Clients that ask for a large response and then do not read it (hostile17), against the real node process.

A client asking for a whole spooled series by WADO-RS (or a preview, a dashboard page) and then reading a byte a
second, or nothing, held its connection for ever: no deadline applied once the request was read (measured: 8 such
clients on a 40 x 512² series, 21 MB, each kept its socket for as long as the test ran, 40 s and more, with no line
in the log). Each holds one of ``[http] max_connections``: that many of them locked every other client out of the
API (503 for ``/healthz``, ``/jobs``, STOW-RS, the dashboard) for as long as they liked. Now a response whose next
48 KiB the client does not take within ``[http] write_timeout_s`` has its connection aborted, one WARNING line.
"""

from __future__ import annotations

import socket
import subprocess
import threading
from pathlib import Path

import httpx
import pydicom

from node.app.phantom import write_phantom_series
from tests.support.nodeproc import NodeProc
from tests.support.peers import STORESCU, wait_until

READERS = 4


def _closed_by_peer(sock: socket.socket) -> bool:
    """True once the node closed or reset ``sock`` (reads what is left without waiting)."""
    sock.setblocking(False)
    try:
        while data := sock.recv(1 << 20):
            del data
        return True
    except BlockingIOError:
        return False
    except OSError:
        return True


def test_clients_that_do_not_read_a_wado_rs_series_cannot_hold_the_api(tmp_path: Path) -> None:
    node = NodeProc.start(tmp_path / "node", {"node": {"stable_age_s": 3600},
                                              "http": {"max_connections": READERS, "write_timeout_s": 2,
                                                       "header_timeout_s": 60}})
    files = write_phantom_series(tmp_path / "in", slices=40, size=512, step_mm=3.0, seed=7)  # 21 MB
    readers: list[socket.socket] = []
    stop = threading.Event()
    try:
        r = subprocess.run([STORESCU, "-aec", "SRNODE", "127.0.0.1", str(node.port), *map(str, files)],
                           capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, r.stdout + r.stderr
        ds = pydicom.dcmread(files[0], stop_before_pixels=True)
        path = f"/dicom-web/studies/{ds.StudyInstanceUID}/series/{ds.SeriesInstanceUID}"
        port = int(node.config["http"]["port"])
        for _ in range(READERS):
            s = socket.socket()
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            s.connect(("127.0.0.1", port))
            s.sendall(f"GET {path} HTTP/1.1\r\nHost: node\r\n\r\n".encode())
            readers.append(s)

        def trickle(s: socket.socket) -> None:  # the attacker's pace: a byte a second
            while not stop.is_set():
                try:
                    if not s.recv(1):
                        return
                except OSError:
                    return
                stop.wait(1)

        for s in readers[: READERS // 2]:  # half read a byte a second, half nothing at all
            threading.Thread(target=trickle, args=(s,), daemon=True).start()
        # every slot is now held by a slow reader: the API answers again once the node has aborted them
        wait_until(lambda: httpx.get(f"{node.http_url}/healthz", timeout=5).status_code == 200, timeout=60,
                   what="/healthz answered while the slow readers hold every [http] max_connections slot")
        stop.set()
        for s in readers:
            wait_until(lambda s=s: _closed_by_peer(s), timeout=30, what="the node closing a slow reader")
        # a client that reads is served whole
        with httpx.stream("GET", f"{node.http_url}{path}", timeout=60) as answer:
            assert answer.status_code == 200
            assert sum(len(c) for c in answer.iter_bytes()) > 20_000_000
    finally:
        stop.set()
        for s in readers:
            s.close()
        node.stop()
    log = node.log()
    assert log.count("[http] write_timeout_s = 2") == READERS, log[-3000:]
    assert "took too little of the response to GET /dicom-web/studies/" in log
    assert "Traceback" not in log
