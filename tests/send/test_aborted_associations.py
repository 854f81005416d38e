"""A PACS that accepts more associations than it can serve and then aborts them (a per-caller limit enforced
after the A-ASSOCIATE-AC, a PACS shedding load): the file in hand on an aborted association goes back to the
delivery's shared work list (``node.send.dimse._Work``) and the associations still working send it. Before: it was
sent again on new associations (aborted too), then the whole delivery failed and was resent whole, every attempt,
into a dead letter. A real pynetdicom SCP that aborts every association but the first it accepted."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import pydicom
import pytest
from pynetdicom import AE, evt
from pynetdicom.sop_class import CTImageStorage  # type: ignore[attr-defined]

from node.config import DicomDestination
from node.errors import DeliveryError
from node.send import make_sender
from tests.support.pacs import phantom
from tests.support.peers import free_port


class _Shedding:
    """A C-STORE SCP that serves the first association it accepts (``healthy``: how many it serves; 0: none) and
    aborts every other one: at its first C-STORE (``when`` "store", nothing stored) or as soon as it is
    established (``when`` "established")."""

    def __init__(self, when: str, healthy: int = 1) -> None:
        self.when, self.healthy = when, healthy
        self.lock = threading.Lock()
        self.served: list[Any] = []
        self.accepted, self.aborted, self.stored = 0, 0, list[str]()
        ae = AE(ae_title="SHEDDING")
        ae.add_supported_context(CTImageStorage, ["1.2.840.10008.1.2.1", "1.2.840.10008.1.2"])
        self.port = free_port()
        self.server = ae.start_server(("127.0.0.1", self.port), block=False, evt_handlers=[
            (evt.EVT_C_STORE, self._store), (evt.EVT_ESTABLISHED, self._established)])

    def _serves(self, assoc: Any) -> bool:
        with self.lock:
            if assoc not in self.served and len(self.served) < self.healthy and self.accepted == 0:
                self.served.append(assoc)
            return assoc in self.served

    def _established(self, event: Any) -> None:
        serves = self._serves(event.assoc)
        with self.lock:
            self.accepted += 1
        if not serves and self.when == "established":
            with self.lock:
                self.aborted += 1
            event.assoc.abort()

    def _store(self, event: Any) -> int:
        if event.assoc not in self.served:
            with self.lock:
                self.aborted += 1
            event.assoc.abort()
            return 0xA700  # never reaches the peer: the association is gone
        with self.lock:
            self.stored.append(str(event.request.AffectedSOPInstanceUID))
        return 0x0000


@pytest.mark.parametrize("when", ["store", "established"])
def test_files_of_aborted_associations_are_sent_by_the_others(tmp_path: Path, when: str) -> None:
    files = phantom(tmp_path, seed=75, slices=24, size=16)
    uids = [str(pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID) for f in files]
    pacs = _Shedding(when)
    try:
        make_sender(DicomDestination(name="p", ae_title="SHEDDING", host="127.0.0.1", port=pacs.port,
                                     associations=4, timeout_s=10.0)).send(files)
        assert sorted(pacs.stored) == sorted(uids)  # every file, each once, over the one association it served
        assert pacs.aborted >= 1  # the others were accepted and aborted
    finally:
        pacs.server.shutdown()


def test_a_delivery_whose_every_association_is_aborted_fails_retryable(tmp_path: Path) -> None:
    files = phantom(tmp_path, seed=76, slices=6, size=16)
    pacs = _Shedding("store", healthy=0)
    try:
        with pytest.raises(DeliveryError) as exc:
            make_sender(DicomDestination(name="p", ae_title="SHEDDING", host="127.0.0.1", port=pacs.port,
                                         associations=3, timeout_s=10.0)).send(files)
        assert exc.value.retryable and "no C-STORE response" in str(exc.value), exc.value
        assert pacs.stored == []
    finally:
        pacs.server.shutdown()


def test_a_socket_closed_under_the_lean_writer_is_a_lost_connection() -> None:
    """make test (lead): the peer aborted an association between the sender's check and its write; pynetdicom's
    reactor had closed the socket, and the lean writer's poll raised ValueError ("file descriptor cannot be a
    negative integer"), failing the whole attempt instead of handing the file to the other associations. A closed
    socket is a ConnectionResetError now (an OSError: no response, the file goes back to the work list)."""
    import socket

    from node.send.dimse_lean import _send_all

    a, b = socket.socketpair()
    b.close()
    a.close()
    with pytest.raises(ConnectionResetError):
        _send_all(a, b"\0" * 16, 1.0)


def test_a_lost_response_is_logged_once_per_file(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """ops19: a PACS gone mid-delivery: the file in hand went back to the work list and every association took it
    in turn: "no C-STORE response for PM00001.dcm" logged 4 times for one file. Now once per file and delivery."""
    import collections
    import logging

    files = phantom(tmp_path, seed=77, slices=6, size=16)
    pacs = _Shedding("store", healthy=0)
    caplog.set_level(logging.INFO)
    try:
        with pytest.raises(DeliveryError):
            make_sender(DicomDestination(name="p", ae_title="SHEDDING", host="127.0.0.1", port=pacs.port,
                                         associations=4, timeout_s=10.0)).send(files)
    finally:
        pacs.server.shutdown()
    lines = collections.Counter(r.getMessage().split(" for ", 1)[1].split(";", 1)[0] for r in caplog.records
                                if r.levelno >= logging.WARNING and "no C-STORE response for" in r.getMessage())
    assert lines and max(lines.values()) == 1, lines
