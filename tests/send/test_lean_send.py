"""The C-STORE SCU's lean request path (``node.send.dimse_lean._lean_requests``): the bytes on the wire are pynetdicom's,
and what a real peer keeps is the file the node sent."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pydicom
import pytest
from pynetdicom.dimse_messages import C_STORE_RQ
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.dsutils import encode, split_dataset
from pynetdicom.pdu import P_DATA_TF

from node.config import DicomDestination
from node.dimse import pdata_file, pdata_pdus
from node.send import make_sender
from node.send.dimse_lean import store_rq_command
from tests.support.pacs import phantom
from tests.support.peers import free_port, wait_until


def _request(path: Path, message_id: int) -> C_STORE:
    meta, offset = split_dataset(path)
    req = C_STORE()
    req.MessageID = message_id
    req.Priority = 2
    req.AffectedSOPClassUID = meta.MediaStorageSOPClassUID
    req.AffectedSOPInstanceUID = meta.MediaStorageSOPInstanceUID
    req._dataset_path = (path, offset)  # as pynetdicom's send_c_store sets it for a file streamed from disk
    return req


def _pynetdicom_wire(req: C_STORE, context_id: int, max_pdu: int) -> bytes:
    msg = C_STORE_RQ()
    msg.primitive_to_message(req)
    out = b""
    for primitive in msg.encode_msg(context_id, max_pdu):
        pdu = P_DATA_TF()
        pdu.from_primitive(primitive)
        out += pdu.encode()
    return out


@pytest.mark.parametrize("max_pdu", [0, 7, 200, 1024, 16384, 16390, 262144])
def test_lean_request_bytes_are_pynetdicoms(tmp_path: Path, max_pdu: int) -> None:
    """Command set and data set, fragmented for the peer's maximum PDU length (0: unlimited; 7: one byte per
    PDV), give the same PDUs, byte for byte, as pynetdicom 3.0 encodes them."""
    path = phantom(tmp_path, seed=71, slices=1, size=24)[0]
    req = _request(path, message_id=513)
    msg = C_STORE_RQ()
    msg.primitive_to_message(req)
    command = store_rq_command(513, 2, str(req.AffectedSOPClassUID), str(req.AffectedSOPInstanceUID))
    assert command == encode(msg.command_set, True, True)
    _, offset = split_dataset(path)
    with path.open("rb") as f:
        length = f.seek(0, 2) - f.seek(offset)
        ours = pdata_file(f, length, 5, max_pdu, prefix=b"".join(pdata_pdus(command, 5, max_pdu, command=True)))
    assert bytes(ours) == _pynetdicom_wire(req, 5, max_pdu)


def test_a_uid_of_odd_length_is_padded_as_pynetdicom_pads_it() -> None:
    req = C_STORE()
    req.MessageID, req.Priority = 1, 0
    req.AffectedSOPClassUID = "1.2.840.10008.5.1.4.1.1.2"  # 25 characters
    req.AffectedSOPInstanceUID = "1.2.3.4.5"
    req._dataset_path = (Path("unused"), 0)
    msg = C_STORE_RQ()
    msg.primitive_to_message(req)
    assert store_rq_command(1, 0, "1.2.840.10008.5.1.4.1.1.2", "1.2.3.4.5") == encode(msg.command_set, True, True)


def test_a_file_shorter_than_its_length_is_an_error_not_a_short_message(tmp_path: Path) -> None:
    path = tmp_path / "short"
    path.write_bytes(b"x" * 100)
    with path.open("rb") as f, pytest.raises(OSError, match="ended"):
        pdata_file(f, 200, 1, 16384)


def test_storescp_keeps_every_file_the_node_sent_byte_for_byte(tmp_path: Path) -> None:
    """dcmtk storescp (a small maximum PDU, so every data set is fragmented) receives a delivery over two
    associations; each file it writes holds the same data set bytes as the node's file."""
    files = phantom(tmp_path / "in", seed=72, slices=9, size=96)
    out = tmp_path / "scp"
    out.mkdir()
    port = free_port()
    scp = subprocess.Popen(["storescp", "--fork", "--max-pdu", "4096", "-aet", "STORESCP", "-od", str(out), "-uf",
                            str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        sender = make_sender(DicomDestination(name="scp", ae_title="STORESCP", host="127.0.0.1", port=port,
                                              associations=2))
        wait_until(lambda: _echo(port), timeout=30, what="storescp")
        sender.send(files)
        wait_until(lambda: len(list(out.iterdir())) == len(files), timeout=30, what="the files in storescp")
    finally:
        scp.terminate()
        scp.wait(timeout=10)
    by_uid = {str(pydicom.dcmread(f).SOPInstanceUID): f for f in out.iterdir()}
    for f in files:
        sent, kept = pydicom.dcmread(f), by_uid[str(pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID)]
        kept_ds = pydicom.dcmread(kept)
        assert kept_ds.PixelData == sent.PixelData
        assert _dataset_bytes(f) == _dataset_bytes(kept)


def _echo(port: int) -> bool:
    return subprocess.run(["echoscu", "-aec", "STORESCP", "127.0.0.1", str(port)], capture_output=True).returncode == 0


def _dataset_bytes(path: Path) -> bytes:
    _, offset = split_dataset(path)
    return path.read_bytes()[offset:]


def test_a_peer_that_stops_reading_ends_the_delivery_retryable(tmp_path: Path) -> None:
    """A PACS whose reader blocks after a few PDUs of a large instance (its receive and our send buffers fill):
    the send ends with a retryable DeliveryError after about ``timeout_s``, instead of holding the outbox's thread
    (and with it the delivery) until the peer reads again."""
    import threading

    from pydicom.uid import ExplicitVRLittleEndian
    from pynetdicom import AE, AllStoragePresentationContexts, evt

    from node.bench.ingest import write_series
    from node.errors import DeliveryError

    files = write_series(tmp_path / "in", 7, 2, 3200, tag="stall-")  # two ~20 MB instances
    release, pdus = threading.Event(), [0]

    def on_pdu(event: object) -> None:
        if isinstance(getattr(event, "pdu", None), P_DATA_TF):
            pdus[0] += 1
            if pdus[0] == 4:
                release.wait(120)  # the peer's reader stops here

    ae = AE("STALLING")
    for cx in AllStoragePresentationContexts:
        ae.add_supported_context(cx.abstract_syntax, [ExplicitVRLittleEndian])
    port = free_port()
    server = ae.start_server(("127.0.0.1", port), block=False, evt_handlers=[(evt.EVT_PDU_RECV, on_pdu)])
    outcome: list[BaseException | None] = []

    def send() -> None:
        try:
            make_sender(DicomDestination(name="stall", ae_title="STALLING", host="127.0.0.1", port=port,
                                         timeout_s=5.0, associations=1)).send(files)
            outcome.append(None)
        except BaseException as exc:  # noqa: BLE001 - checked below
            outcome.append(exc)

    worker = threading.Thread(target=send, daemon=True)
    try:
        worker.start()
        worker.join(60)  # a deadline, far above timeout_s: the send must not wait for the peer
        assert not worker.is_alive(), "the send still waits on a peer that reads nothing"
        assert isinstance(outcome[0], DeliveryError) and outcome[0].retryable, outcome
        assert "read nothing" in str(outcome[0]), outcome
    finally:
        release.set()
        server.shutdown()


def test_a_file_whose_data_set_lacks_its_sop_class_is_refused_once_not_retried(tmp_path: Path) -> None:
    """A file that names its SOP class only in the file meta, to a peer that refuses its transfer syntax (here
    storescp accepting implicit VR only): the transcoding path cannot send it (no context for ''); a clear,
    non-retryable failure instead of attempts until the dead letter."""
    from node.errors import DeliveryError

    path = phantom(tmp_path / "in", seed=73, slices=1, size=16)[0]
    ds = pydicom.dcmread(path)
    del ds.SOPClassUID
    ds.save_as(path)
    port = free_port()
    scp = subprocess.Popen(["storescp", "+xi", "-aet", "STORESCP", str(port)], stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL)
    try:
        wait_until(lambda: _echo(port), timeout=30, what="storescp")
        with pytest.raises(DeliveryError) as exc:
            make_sender(DicomDestination(name="scp", ae_title="STORESCP", host="127.0.0.1", port=port)).send([path])
        assert not exc.value.retryable and "SOPClassUID" in str(exc.value)
    finally:
        scp.terminate()
        scp.wait(timeout=10)
