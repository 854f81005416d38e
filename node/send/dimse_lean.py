"""The C-STORE SCU's lean request path (``node.send.dimse``): a file's C-STORE-RQ written by the sending thread
itself on a plain TCP connection (its P-DATA-TF PDUs framed with ``struct``), the rest of pynetdicom's
``send_c_store`` unchanged.
"""

from __future__ import annotations

import select
import socket
import ssl
import struct
from typing import Any

from pynetdicom.dimse_primitives import C_STORE

from node.dimse import command_element, even_uid, pdata_file, pdata_pdus

C_STORE_RQ = 0x0001  # CommandField (PS3.7 Table 9.3-1)
DATASET_PRESENT = 0x0001  # CommandDataSetType: a data set follows (any value but 0x0101; pynetdicom's)


def store_rq_command(message_id: int, priority: int, sop_class: str, sop_instance: str) -> bytes:
    """The C-STORE-RQ command set (PS3.7 Table 9.3-1, implicit VR little endian) pynetdicom 3.0 encodes for a
    request with a data set and no Move Originator: the same bytes (tests/send/test_lean_send.py)."""
    body = b"".join((
        command_element(0x0000_0002, even_uid(sop_class)),  # AffectedSOPClassUID
        command_element(0x0000_0100, struct.pack("<H", C_STORE_RQ)),  # CommandField
        command_element(0x0000_0110, struct.pack("<H", message_id)),  # MessageID
        command_element(0x0000_0700, struct.pack("<H", priority)),  # Priority
        command_element(0x0000_0800, struct.pack("<H", DATASET_PRESENT)),  # CommandDataSetType
        command_element(0x0000_1000, even_uid(sop_instance)),  # AffectedSOPInstanceUID
    ))
    return command_element(0x0000_0000, struct.pack("<L", len(body))) + body  # CommandGroupLength first


def _send_all(sock: socket.socket, data: bytes | bytearray, timeout_s: float) -> None:
    """Write ``data`` to ``sock`` (plain TCP, shared with pynetdicom's reading thread) without blocking past
    ``timeout_s`` seconds of no progress: non-blocking sends, a ``poll`` for writability between them. Raises
    OSError (TimeoutError when the peer stopped reading)."""
    view = memoryview(data)
    if sock.fileno() < 0:  # closed by pynetdicom's reactor just now (the peer aborted the association)
        raise ConnectionResetError("the association's socket is closed")
    poller = select.poll()
    try:
        poller.register(sock, select.POLLOUT)
    except ValueError as exc:  # closed between the check and here
        raise ConnectionResetError("the association's socket is closed") from exc
    while view:
        try:
            sent = sock.send(view, socket.MSG_DONTWAIT)
        except (BlockingIOError, InterruptedError):
            sent = 0
        if sent:
            view = view[sent:]
            continue
        if not poller.poll(timeout_s * 1000):
            raise TimeoutError(f"the peer read nothing for {timeout_s:g} s")


def _lean_requests(assoc: Any, timeout_s: float) -> Any:
    """``assoc`` (an established requestor association on a plain TCP socket) with its C-STORE-RQs of a file
    streamed from disk written by the sending thread itself: the command set by :func:`store_rq_command`, the
    data set read at once from the file, both framed by :func:`node.dimse.pdata_pdus` exactly as pynetdicom
    3.0 frames them, and written with :func:`_send_all`. Everything else (context choice, pausing the
    association's reactor, waiting for and checking the response, other messages) stays pynetdicom's
    ``send_c_store``; only its ``dimse.send_msg`` is replaced on this association object.

    Why: with pynetdicom each PDU of the request is a P-DATA primitive put on the DUL thread's queue, an event of
    its state machine and an encoding (and the command set a pydicom encoding): ~2.7 ms of CPU per 512² CT
    instance (py-spy --gil, 4 associations to storescp), most of the node's delivery time (docs/benchmarks.md
    "Delivery"). Only plain sockets: a TLS socket must not be written by one thread while another reads it.
    pynetdicom's EVT_DIMSE_SENT / EVT_PDU_SENT are not triggered for these requests (the node binds neither on
    a sender). A failed write (a peer that read nothing for ``timeout_s``, or closed) shuts the connection down
    and aborts the association (nothing else may follow half a message; an A-ABORT queued behind a send buffer
    the peer never reads would hold the sending thread, and the delivery, for ever) and raises OSError, which
    ``_send_one`` reports as a retryable failure."""
    raw = getattr(getattr(assoc.dul, "socket", None), "socket", None)
    if not isinstance(raw, socket.socket) or isinstance(raw, ssl.SSLSocket):
        return assoc
    dimse = assoc.dimse
    pynetdicom_send = dimse.send_msg

    def send_msg(primitive: Any, context_id: int) -> None:
        where = getattr(primitive, "_dataset_path", None)
        if (not isinstance(primitive, C_STORE) or where is None or primitive.MessageIDBeingRespondedTo is not None
                or primitive.MoveOriginatorApplicationEntityTitle or primitive.MoveOriginatorMessageID is not None):
            pynetdicom_send(primitive, context_id)
            return
        path, offset = where
        max_pdu = int(dimse.maximum_pdu_size or 0)
        command = store_rq_command(int(primitive.MessageID or 0), int(primitive.Priority),
                                   str(primitive.AffectedSOPClassUID), str(primitive.AffectedSOPInstanceUID))
        with open(path, "rb") as f:
            length = f.seek(0, 2) - f.seek(offset)
            if length <= 0:  # nothing after the file meta: as pynetdicom has it
                pynetdicom_send(primitive, context_id)
                return
            data = pdata_file(f, length, context_id, max_pdu,
                              prefix=b"".join(pdata_pdus(command, context_id, max_pdu, command=True)))
        try:
            _send_all(raw, data, timeout_s)
        except OSError:
            try:  # the peer reads nothing more: pynetdicom's A-ABORT would wait on the full send buffer for ever
                raw.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            assoc.abort()
            raise

    dimse.send_msg = send_msg
    return assoc
