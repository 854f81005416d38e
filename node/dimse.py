"""DIMSE status codes the node answers with or reads from peers (one closed set, named as in DICOM PS3.4 / PS3.7),
and the wire pieces both roles share (TCP_NODELAY, a command element, P-DATA-TF framing).

Sources: PS3.4 Annex B.2.3 (Storage Service Class statuses), Annex C.4 (Query/Retrieve statuses), PS3.7 Annex C
(general status codes). STOW-RS failure reasons (PS3.18 Table 10.5.3-1, Failure Reason 0008,1197) use the same
values.
"""

from __future__ import annotations

import io
import socket
import struct
from enum import IntEnum
from typing import Any

from pynetdicom.status import STATUS_SUCCESS, STATUS_WARNING, code_to_category


class Status(IntEnum):
    """A DIMSE status (the Status (0000,0900) of a response)."""

    SUCCESS = 0x0000
    PROCESSING_FAILURE = 0x0110  # PS3.7 C.4.2: the node failed while handling the request
    SOP_CLASS_NOT_SUPPORTED = 0x0122  # PS3.7 C.5.3: refused, SOP class not supported
    NOT_AUTHORIZED = 0x0124  # PS3.7 C.5.10: refused, the caller may not store here
    OUT_OF_RESOURCES = 0xA700  # PS3.4 B.2.3: refused, out of resources (spool disk below its watermark)
    MOVE_OUT_OF_RESOURCES_MATCHES = 0xA701  # PS3.4 C.4.2.1.5: unable to calculate number of matches
    MOVE_OUT_OF_RESOURCES_SUBOPS = 0xA702  # PS3.4 C.4.2.1.5: unable to perform sub-operations
    DATASET_DOES_NOT_MATCH = 0xA900  # PS3.4 B.2.3: data set does not match SOP class (or study of the URL)
    WARNING_COERCION = 0xB000  # PS3.4 B.2.3: stored, with coercion of data elements
    WARNING_ELEMENTS_DISCARDED = 0xB006  # PS3.4 B.2.3: stored, elements discarded
    WARNING_DATASET_MISMATCH = 0xB007  # PS3.4 B.2.3: stored, though the data set does not match the SOP class
    CANNOT_UNDERSTAND = 0xC210  # PS3.4 B.2.3: cannot understand (unparseable, UIDs missing or invalid)
    # PS3.4 B.2.3 Cxxx (an error, not a refusal): the instance is over [node] max_instance_mb; sent again it is
    # refused again (0xA7xx, out of resources, tells a sender to try later: the Orthanc plugin and modalities did,
    # for an hour, blaming the disk)
    TOO_LARGE = 0xC211
    PENDING = 0xFF00
    PENDING_WARNING = 0xFF01

    def __str__(self) -> str:
        return f"0x{int(self):04X}"


# PS3.8 9.3.5: a P-DATA-TF's presentation data value item starts with 6 bytes (item length 4, presentation
# context ID 1, message control header 1); the smallest maximum PDU length that can carry one byte of a message
MIN_PEER_MAX_PDU = 7


def max_pdu_problem(value: int | None) -> str | None:
    """What is wrong with the maximum PDU length ``value`` (bytes, the Maximum Length sub-item a peer announced
    in its A-ASSOCIATE-RQ or -AC, PS3.7 D.3.3.1 / PS3.8 D.1; 0 or absent: unlimited), or None when PDUs can be
    sent within it. 1 to 6 cannot carry any P-DATA-TF item (``MIN_PEER_MAX_PDU``): pynetdicom then divides by
    zero or fragments into negative sizes, the lean path sent 7-byte PDUs above the peer's limit. The node
    refuses such an association on every side (SCP: A-ASSOCIATE-RJ; SCU: A-ABORT and a failed request)."""
    n = int(value or 0)
    if 0 < n < MIN_PEER_MAX_PDU:
        return (f"its maximum PDU length of {n} byte(s) cannot carry a P-DATA-TF item (PS3.8 9.3.5: at least "
                f"{MIN_PEER_MAX_PDU}; 0 means unlimited)")
    return None


# a C-MOVE / C-GET response that more will follow (PS3.4 C.4.2.1.5, C.4.3.1.4)
PENDING_STATUSES = frozenset({Status.PENDING, Status.PENDING_WARNING})
# a C-MOVE / C-GET that ended out of resources: worth another try later
RETRIEVE_RETRYABLE_STATUSES = frozenset({Status.MOVE_OUT_OF_RESOURCES_MATCHES, Status.MOVE_OUT_OF_RESOURCES_SUBOPS})
# status families (the high byte) of a refused C-STORE worth another try: out of resources (A7xx, PS3.4 B.2.3)
# and failures while processing (01xx, PS3.7 C)
_RETRYABLE_STORE_FAMILIES = (Status.OUT_OF_RESOURCES >> 8, Status.PROCESSING_FAILURE >> 8)


def stored(status: int) -> bool:
    """Whether a C-STORE answered ``status`` stored the instance: Success, or any Warning status (the Storage
    warnings B000-BFFF of PS3.4 B.2.3 and the general warnings 0001, 0107, 0116 of PS3.7 C.4), as pynetdicom's
    ``code_to_category`` classes them."""
    return code_to_category(status) in (STATUS_SUCCESS, STATUS_WARNING)


def store_retryable(status: int) -> bool:
    """Whether a C-STORE refused with ``status`` may succeed if sent again later (a warning is no refusal)."""
    return not stored(status) and status >> 8 in _RETRYABLE_STORE_FAMILIES


def label(status: int) -> str:
    """A status as the ``0xXXXX`` text used in metrics labels and logs."""
    return f"0x{int(status):04X}"


def no_delay(sock: Any) -> None:
    """Turn Nagle's algorithm off on a DICOM connection's socket (``TCP_NODELAY``; a TLS socket's underlying one).

    A DIMSE message is at least two writes (the command's P-DATA-TF, then the data set's), and the peer answers
    only after the last: with Nagle on, the second write waits for the ACK of the first, which the receiver delays
    (Linux: up to 40 ms). Measured on localhost with 8 KB instances (docs/benchmarks.md "Nagle"): pynetdicom
    sending to dcmtk storescp 21.6 instances/s with Nagle, 382 without; dcmtk 3.6.7 storescu 11–23/s unless
    its ``TCP_NODELAY`` environment variable is set. ``sock`` may be None or a closed socket (then nothing happens).
    """
    if sock is None:
        return
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    except (OSError, AttributeError, ValueError):
        pass  # not TCP (a socketpair in a test) or already closed: nothing to tune


def assoc_no_delay(assoc: Any) -> None:
    """:func:`no_delay` on an established pynetdicom association's socket (``assoc.dul.socket.socket``)."""
    transport = getattr(getattr(assoc, "dul", None), "socket", None)
    no_delay(getattr(transport, "socket", None))


_IMPLICIT_ELEMENT = struct.Struct("<HHL")  # group, element, value length: implicit VR little endian (PS3.5 7.1.3)
_PDU_HEAD = struct.Struct(">BBL")  # PDU type, reserved, PDU length (PS3.8 9.3.1)
_PDV_HEAD = struct.Struct(">LBB")  # item length, presentation context ID, message control header (PS3.8 9.3.5.1, E.2)
P_DATA_TF = 0x04
MAX_PDU_LENGTH = 0xFFFF_FFFF  # the PDU length field's largest value (4 bytes, PS3.8 9.3.1): "unlimited" still ends here


def even_uid(uid: str) -> bytes:
    """A UID value as encoded: ASCII, padded with one NUL to an even length (PS3.5 9.1)."""
    value = uid.encode("ascii")
    return value + b"\0" if len(value) % 2 else value


def command_element(tag: int, value: bytes) -> bytes:
    """One element of a command set (always implicit VR little endian, PS3.7 6.3.1): ``tag`` as 0xGGGGEEEE."""
    return _IMPLICIT_ELEMENT.pack(tag >> 16, tag & 0xFFFF, len(value)) + value


def fragment_size(peer_max_pdu: int, length: int) -> int:
    """Bytes of a message part per PDV for a peer whose maximum PDU length is ``peer_max_pdu`` (0: unlimited, the
    whole ``length`` in one, up to what a PDU length field holds): ``peer_max_pdu - 6``, the PDV item header taking 6 (PS3.8 9.3.5.1). Raises ValueError
    for 1-6 (no fragment fits: :func:`max_pdu_problem`)."""
    size = peer_max_pdu - 6 if peer_max_pdu else min(max(length, 1), MAX_PDU_LENGTH - 6)
    if size < 1:
        raise ValueError(f"a maximum PDU length of {peer_max_pdu} byte(s) cannot carry a presentation data value")
    return size


def pdata_pdus(payload: bytes, context_id: int, peer_max_pdu: int, *, command: bool) -> list[bytes]:
    """``payload`` (a whole command set, or a whole data set) as P-DATA-TF PDUs for a peer whose maximum PDU length
    is ``peer_max_pdu`` (bytes; 0: unlimited), fragmented as pynetdicom 3.0's ``DIMSEMessage.encode_msg``: one
    PDV per PDU, each at most ``peer_max_pdu - 6`` bytes of ``payload``, the last fragment flagged last (PS3.8 E.2:
    message control header bit 0 command / data set, bit 1 last). An empty data set gives no PDU. Raises ValueError
    for a ``peer_max_pdu`` of 1-6 (no fragment fits: :func:`max_pdu_problem`)."""
    size = fragment_size(peer_max_pdu, len(payload))
    flag = 0x01 if command else 0x00
    out = []
    for start in range(0, len(payload), size):
        piece = payload[start:start + size]
        control = flag | (0x02 if start + size >= len(payload) else 0x00)
        out.append(_PDU_HEAD.pack(P_DATA_TF, 0, 6 + len(piece)) + _PDV_HEAD.pack(2 + len(piece), context_id, control)
                   + piece)
    return out


def pdata_file(f: io.BufferedReader, length: int, context_id: int, peer_max_pdu: int, prefix: bytes = b"") -> bytearray:
    """The next ``length`` bytes of the open file ``f`` (a data set) as P-DATA-TF PDUs, framed as
    :func:`pdata_pdus` frames them (``command=False``), after ``prefix`` (e.g. the command's PDUs): one buffer,
    each fragment read straight into its place (no copy of the data set in memory). Raises OSError when ``f``
    ends early, ValueError as :func:`fragment_size`."""
    size = fragment_size(peer_max_pdu, length)
    pieces = -(-length // size)
    buf = bytearray(len(prefix) + 12 * pieces + length)
    buf[:len(prefix)] = prefix
    view = memoryview(buf)
    pos = len(prefix)
    for start in range(0, length, size):
        n = min(size, length - start)
        _PDU_HEAD.pack_into(buf, pos, P_DATA_TF, 0, 6 + n)
        _PDV_HEAD.pack_into(buf, pos + 6, 2 + n, context_id, 0x02 if start + n >= length else 0x00)
        if f.readinto(view[pos + 12:pos + 12 + n]) != n:
            raise OSError(f"the file ended {length - start} byte(s) early")
        pos += 12 + n
    return buf
