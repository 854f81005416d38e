"""C-STORE responses matched to their requests (the C-STORE SCU, ``node.send.dimse``): each request of an
association carries its own MessageID, and a response counts only when its MessageIDBeingRespondedTo is the
request in flight and its AffectedSOPInstanceUID (when present) the instance sent. A PACS that answers twice, late,
with another message's ID or another instance's UID leaves the association's outcome unknown: the delivery fails,
retryable, naming why, instead of counting a stale success for a refused instance (peer13b)."""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pydicom
import pytest
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE, evt
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.sop_class import CTImageStorage  # type: ignore[attr-defined]

from node.config import DicomDestination
from node.errors import DeliveryError
from node.send import make_sender
from tests.support.pacs import phantom
from tests.support.peers import free_port


class _HostilePacs:
    """A pynetdicom C-STORE SCP (AE HOSTILE) that records every request's MessageID and instance UID, answers
    ``status(k)`` for its k-th request (0-based, over all associations), sends ``extra(k)`` (a status) as an
    additional response before the real one when that is not None, and passes every response it sends through
    ``mangle`` (on its way out: another MessageIDBeingRespondedTo or AffectedSOPInstanceUID)."""

    def __init__(self, *, status: Callable[[int], int] = lambda k: 0x0000,
                 extra: Callable[[int], int | None] = lambda k: None,
                 mangle: Callable[[C_STORE], None] = lambda rsp: None,
                 syntaxes: tuple[str, ...] = (ExplicitVRLittleEndian, ImplicitVRLittleEndian)) -> None:
        self.status, self.extra, self.mangle = status, extra, mangle
        self.requests: list[tuple[int, int, str]] = []  # (association number, MessageID, SOP instance UID)
        self.assocs = 0
        self.lock = threading.Lock()
        ae = AE(ae_title="HOSTILE")
        ae.add_supported_context(CTImageStorage, list(syntaxes))
        self.port = free_port()
        self.server = ae.start_server(("127.0.0.1", self.port), block=False, evt_handlers=[
            (evt.EVT_C_STORE, self._store), (evt.EVT_ACCEPTED, self._accepted)])

    def _accepted(self, event: Any) -> None:
        with self.lock:
            self.assocs += 1
            event.assoc._hostile_number = self.assocs
        send = event.assoc.dimse.send_msg

        def send_msg(primitive: Any, context_id: int) -> None:
            if isinstance(primitive, C_STORE) and primitive.MessageIDBeingRespondedTo is not None:
                self.mangle(primitive)
            send(primitive, context_id)

        event.assoc.dimse.send_msg = send_msg

    def _store(self, event: Any) -> int:
        req = event.request
        with self.lock:
            k = len(self.requests)
            self.requests.append((event.assoc._hostile_number, int(req.MessageID), str(req.AffectedSOPInstanceUID)))
        extra = self.extra(k)
        if extra is not None:
            rsp = C_STORE()
            rsp.MessageIDBeingRespondedTo = req.MessageID
            rsp.AffectedSOPClassUID = req.AffectedSOPClassUID
            rsp.AffectedSOPInstanceUID = req.AffectedSOPInstanceUID
            rsp.Status = extra
            event.assoc.dimse.send_msg(rsp, event.context.context_id)
        return self.status(k)

    def sender(self, associations: int = 1) -> Any:
        return make_sender(DicomDestination(name="hostile", ae_title="HOSTILE", host="127.0.0.1", port=self.port,
                                            timeout_s=10, associations=associations))

    def stop(self) -> None:
        self.server.shutdown()


def _uids(files: list[Path]) -> list[str]:
    return [str(pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID) for f in files]


@pytest.mark.parametrize("syntaxes", [(ExplicitVRLittleEndian, ImplicitVRLittleEndian), (ImplicitVRLittleEndian,)],
                         ids=["streamed", "transcoded"])
def test_each_request_of_an_association_has_its_own_message_id(tmp_path: Path, syntaxes: tuple[str, ...]) -> None:
    """1, 2, 3, ... on each association, whether the file is streamed by the node's lean writer (its own syntax
    accepted) or decoded and sent by pynetdicom (the PACS takes implicit VR only)."""
    files = phantom(tmp_path, seed=81, slices=7, size=16)
    pacs = _HostilePacs(syntaxes=syntaxes)
    try:
        pacs.sender(associations=2).send(files)
    finally:
        pacs.stop()
    assert sorted(r[2] for r in pacs.requests) == sorted(_uids(files))
    ids = sorted([r[1] for r in pacs.requests if r[0] == number] for number in (1, 2))
    assert ids == [[1, 2, 3], [1, 2, 3, 4]]  # 7 files over 2 associations, in either order of acceptance


def test_a_pacs_answering_twice_then_refusing_the_last_instance_is_not_delivered(tmp_path: Path) -> None:
    """The reviewer's repro (/tmp/b13/probe_dup.py): every C-STORE answered twice (an extra success first), the
    last refused with 0xA700. Before: each request took the previous one's second answer, the refusal was never
    read, and the delivery counted as done."""
    files = phantom(tmp_path, seed=82, slices=4, size=16)
    pacs = _HostilePacs(extra=lambda k: 0x0000, status=lambda k: 0xA700 if k == 3 else 0x0000)
    try:
        with pytest.raises(DeliveryError) as exc:
            pacs.sender().send(files)
    finally:
        pacs.stop()
    assert exc.value.retryable
    assert "message 1" in str(exc.value) and "message 2" in str(exc.value), exc.value
    assert "outcome unknown" in str(exc.value)
    assert len(pacs.requests) == 2  # the association was aborted at the first stale answer


def test_a_second_answer_to_the_last_request_fails_the_delivery(tmp_path: Path) -> None:
    """One instance: a success, then (before the PACS answers the release) a refusal for the same message. Which
    one the PACS meant is unknown: the delivery is not counted as done."""
    files = phantom(tmp_path, seed=83, slices=1, size=16)
    pacs = _HostilePacs(extra=lambda k: 0x0000, status=lambda k: 0xA700)
    try:
        with pytest.raises(DeliveryError) as exc:
            pacs.sender().send(files)
    finally:
        pacs.stop()
    assert exc.value.retryable and "outcome unknown" in str(exc.value), exc.value
    assert "message 1" in str(exc.value), exc.value


def test_a_response_to_another_message_id_fails_the_delivery(tmp_path: Path) -> None:
    """A PACS that answers every request as message 1 (what srnode itself sent before): the second request's
    answer is not taken for it."""
    files = phantom(tmp_path, seed=84, slices=3, size=16)

    def as_message_1(rsp: C_STORE) -> None:
        rsp.MessageIDBeingRespondedTo = 1

    pacs = _HostilePacs(mangle=as_message_1)
    try:
        with pytest.raises(DeliveryError) as exc:
            pacs.sender().send(files)
    finally:
        pacs.stop()
    assert exc.value.retryable and "message 1" in str(exc.value) and "message 2" in str(exc.value), exc.value
    assert files[1].name in str(exc.value)


def test_a_response_naming_another_instance_fails_the_delivery(tmp_path: Path) -> None:
    files = phantom(tmp_path, seed=85, slices=3, size=16)

    def other_instance(rsp: C_STORE) -> None:
        rsp.AffectedSOPInstanceUID = "1.2.826.0.1.3680043.10.1087.999.1"

    pacs = _HostilePacs(mangle=other_instance)
    try:
        with pytest.raises(DeliveryError) as exc:
            pacs.sender().send(files)
    finally:
        pacs.stop()
    assert exc.value.retryable and "another SOP instance" in str(exc.value), exc.value
    assert files[0].name in str(exc.value) and "outcome unknown" in str(exc.value)


def test_a_response_without_the_optional_instance_uid_is_accepted(tmp_path: Path) -> None:
    """AffectedSOPInstanceUID is optional in a C-STORE-RSP (PS3.7 Table 9.1-1, U(=)): its absence is no
    mismatch; the MessageID still is checked."""
    files = phantom(tmp_path, seed=86, slices=3, size=16)

    def no_uid(rsp: C_STORE) -> None:
        rsp.AffectedSOPInstanceUID = None
        rsp.AffectedSOPClassUID = None

    pacs = _HostilePacs(mangle=no_uid)
    try:
        pacs.sender().send(files)
    finally:
        pacs.stop()
    assert [r[1] for r in pacs.requests] == [1, 2, 3]
