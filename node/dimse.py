"""DIMSE status codes the node answers with or reads from peers: one closed set, named as in DICOM PS3.4 / PS3.7.

Sources: PS3.4 Annex B.2.3 (Storage Service Class statuses), Annex C.4 (Query/Retrieve statuses), PS3.7 Annex C
(general status codes). STOW-RS failure reasons (PS3.18 Table 10.5.3-1, Failure Reason 0008,1197) use the same
values.
"""

from __future__ import annotations

import socket
from enum import IntEnum
from typing import Any


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


# a C-STORE that stored the instance: success, or one of the Storage warnings (PS3.4 B.2.3)
STORED_STATUSES = frozenset({Status.SUCCESS, Status.WARNING_COERCION, Status.WARNING_ELEMENTS_DISCARDED,
                             Status.WARNING_DATASET_MISMATCH})
# a C-MOVE / C-GET response that more will follow (PS3.4 C.4.2.1.5, C.4.3.1.4)
PENDING_STATUSES = frozenset({Status.PENDING, Status.PENDING_WARNING})
# a C-MOVE / C-GET that ended out of resources: worth another try later
RETRIEVE_RETRYABLE_STATUSES = frozenset({Status.MOVE_OUT_OF_RESOURCES_MATCHES, Status.MOVE_OUT_OF_RESOURCES_SUBOPS})
# status families (the high byte) of a refused C-STORE worth another try: out of resources (A7xx, PS3.4 B.2.3)
# and failures while processing (01xx, PS3.7 C)
_RETRYABLE_STORE_FAMILIES = (Status.OUT_OF_RESOURCES >> 8, Status.PROCESSING_FAILURE >> 8)


def store_retryable(status: int) -> bool:
    """Whether a C-STORE refused with ``status`` may succeed if sent again later."""
    return status >> 8 in _RETRYABLE_STORE_FAMILIES


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
