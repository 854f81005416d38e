"""ops19: a PACS outage flooded the log with pynetdicom: per attempt and association "ERROR pynetdicom.transport:
Association request failed: unable to connect to remote" and "TCP Initialisation Error: [Errno 111] Connection
refused" (8 ERROR lines an attempt with 4 associations, ~80 for a 4-minute outage), and a ConnectionResetError
traceback from pynetdicom.dul per association when the PACS went away mid-delivery. The node's own WARNING ("attempt
2/8 failed, next in 4 s: ... association aborted (peer not reachable or it dropped the connection)") did not even
say "connection refused". Now pynetdicom's records about the node's outgoing associations are kept off the log and
read as the reason: one node line per attempt, naming it. Records of associations the node accepts are untouched.
"""

from __future__ import annotations

import dataclasses
import logging
import socket
import struct
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from node.app.phantom import write_phantom_series
from node.app.status_cmd import job_dict, job_line
from node.config import config_from_dict
from node.errors import DeliveryError
from node.metrics import Metrics
from node.send import Outbox
from node.send.peer_log import FILTER
from node.store import DeliveryState, Index, Instance, JobState
from tests.support.peers import free_port


def _outbox(tmp: Path, port: int) -> tuple[Outbox, Index, int]:
    cfg = config_from_dict({
        "node": {"spool_dir": str(tmp / "spool")},
        "outbox": {"max_attempts": 8, "backoff_initial_s": 2.0, "backoff_max_s": 300.0},
        "destinations": [{"name": "pacs", "kind": "dicom", "ae_title": "PACS", "host": "127.0.0.1", "port": port,
                          "confirm": "commitment", "associations": 4, "timeout_s": 10.0}],
        "rules": [{"name": "ct", "match": {"Modality": "CT"}, "destinations": ["pacs"]}]})
    index = Index(tmp / "index.sqlite")
    files = write_phantom_series(tmp / "ct", slices=4, size=32, seed=71)
    series = "1.2.826.0.1.77.71"
    index.add_instance(Instance(f"{series}.1", series, "1.2.826.0.1.76", "1.2.840.10008.5.1.4.1.1.2",
                                "1.2.840.10008.1.2.1", "/x.dcm", "CT01", ""), "CT", 1)
    assert index.mark_stable(series, time.time() + 1)
    job = index.create_job(series, "ct")
    assert index.claim_job(job) is not None
    index.add_deliveries(job, {"pacs": [str(f) for f in files]})
    index.finish_job(job, JobState.SENDING)
    return Outbox(cfg, index, Metrics.create()), index, job


def _pynetdicom_noise(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [f"{r.levelname} {r.name}: {r.getMessage()}" for r in caplog.records
            if r.name.startswith("pynetdicom") and r.levelno >= logging.WARNING]


def test_a_delivery_to_a_closed_port_is_one_node_line_naming_the_refused_connection(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    outbox, index, job = _outbox(tmp_path, free_port())  # nothing listens there: connection refused
    caplog.set_level(logging.DEBUG)
    (d,) = index.deliveries(job)
    outbox.attempt(d)
    (d,) = index.deliveries(job)
    assert d.state is DeliveryState.PENDING and d.attempts == 1
    assert _pynetdicom_noise(caplog) == []
    assert not [r for r in caplog.records if r.exc_info], "a traceback was logged"
    mine = [r for r in caplog.records if r.name.startswith("node") and r.levelno >= logging.WARNING]
    assert len(mine) == 1, [r.getMessage() for r in mine]
    assert "attempt 1/8 failed" in mine[0].getMessage() and "connection refused" in mine[0].getMessage()
    assert "peer not reachable" not in mine[0].getMessage()
    assert "connection refused" in (d.reason or "")


def _resetting_peer() -> tuple[int, threading.Event]:
    """A TCP listener that reads the A-ASSOCIATE-RQ's first bytes, then resets the connection (SO_LINGER 0)."""
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(16)
    stop = threading.Event()

    def run() -> None:
        srv.settimeout(0.2)
        while not stop.is_set():
            try:
                conn, _ = srv.accept()
            except OSError:
                continue
            conn.recv(6)
            conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            conn.close()
        srv.close()

    threading.Thread(target=run, daemon=True).start()
    return srv.getsockname()[1], stop


def test_a_peer_that_resets_the_connection_logs_no_traceback(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    port, stop = _resetting_peer()
    try:
        outbox, index, job = _outbox(tmp_path, port)
        caplog.set_level(logging.DEBUG)
        (d,) = index.deliveries(job)
        outbox.attempt(d)
    finally:
        stop.set()
    (d,) = index.deliveries(job)
    assert d.state is DeliveryState.PENDING and d.attempts == 1
    assert _pynetdicom_noise(caplog) == []
    assert not [r for r in caplog.records if r.exc_info], "a traceback was logged"
    mine = [r for r in caplog.records if r.name.startswith("node") and r.levelno >= logging.WARNING]
    assert len(mine) == 1 and "attempt 1/8 failed" in mine[0].getMessage(), [r.getMessage() for r in mine]


def test_records_of_accepted_associations_and_other_threads_pass() -> None:
    """The filter drops only records of an association the node requested (its thread or its DUL's)."""
    record = logging.LogRecord("pynetdicom.dul", logging.ERROR, __file__, 1, "boom", None, None)
    assert FILTER.filter(record)  # the test's own thread: no association
    result: list[bool] = []
    acceptor = threading.Thread(target=lambda: result.append(FILTER.filter(record)))
    acceptor.assoc = SimpleNamespace(is_requestor=False)  # type: ignore[attr-defined]
    acceptor.start()
    acceptor.join()
    requestor = threading.Thread(target=lambda: result.append(FILTER.filter(record)))
    requestor.assoc = SimpleNamespace(is_requestor=True)  # type: ignore[attr-defined]
    requestor.start()
    requestor.join()
    assert result == [True, False]
    assert requestor.assoc.srnode_problems == ["boom"]  # type: ignore[attr-defined]


def test_dead_letter_and_status_say_what_to_do_and_when(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """ops19: the dead-letter ERROR line and ``srnode status`` did not say ``srnode retry N``; a pending delivery
    showed "pacs:pending(5)" without saying what 5 counts or when the next attempt is."""
    outbox, index, job = _outbox(tmp_path, free_port())
    caplog.set_level(logging.INFO)
    (d,) = index.deliveries(job)
    outbox.attempt(d)
    (d,) = index.deliveries(job)
    outbox.attempt(d)  # the second failure: next in 4 s
    line = job_line(job_dict(index, index.job(job)))
    assert "pacs:pending(2 attempts, next at " in line and ", in " in line, line
    assert "connection refused" in line, line
    last = dataclasses.replace(index.deliveries(job)[0], attempts=7)  # the 8th of max_attempts 8 fails
    outbox.failed(last, DeliveryError("destination pacs: cannot connect: connection refused"))
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1 and f"srnode retry {job}" in errors[0], errors
    line = job_line(job_dict(index, index.job(job)))
    assert "pacs:dead-letter" in line and f"`srnode retry {job}` sends it again" in line, line
