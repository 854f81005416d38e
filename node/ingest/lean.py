"""The lean C-STORE receive path: P-DATA-TF PDUs of the common C-STORE read by the DUL thread itself.

pynetdicom 3.0 turns every P-DATA-TF into a PDU object, an event of its state machine, a P-DATA primitive handed
to the association thread, a DIMSE message (the command set decoded by pydicom), a C-STORE primitive, an
``EVT_C_STORE`` event, and then encodes the C-STORE-RSP through the same layers back. Profiled (py-spy --gil,
``srnode bench ingest``) that was ~35 % of the node's CPU per small instance for the receive side, ~18 % for the
response, 20-30 % for the hand-overs between the two threads.

Once an association is established, :class:`LeanReceiver` takes each P-DATA-TF that
:class:`node.ingest.reactor.QuietDUL` read (whole, within its PDU caps and deadlines), in the DUL thread:

- the command set (implicit VR little endian, PS3.7 6.3.1) is gathered from its fragments and parsed with
  ``struct`` (:func:`parse_store_command`). Only a plain C-STORE-RQ takes the lean path: the command holds no
  other element than those PS3.7 9.3.1.1 lists, each well formed, its presentation context accepted and for the
  command's SOP class, its UIDs plain (digits and dots). Anything else (C-ECHO, C-FIND, N-EVENT-REPORT, a
  malformed or unusual command set, a dataset fragment without a command) is handed to pynetdicom as it came (the
  PDUs held so far, unchanged, in order), and so answered exactly as by the ``pynetdicom`` receive path, until
  that message is complete. A command set over ``MAX_COMMAND_BYTES`` is aborted (pynetdicom gathers command
  fragments in memory without a bound: memory would grow with the bytes a peer sends), and so is one that
  pynetdicom could not decode (:func:`pynetdicom_decodes`: its DUL thread would fail on it and leave the
  association hanging);
- the dataset fragments are written straight to a file in the spool's ``incoming/``, with the same preamble
  and file meta pynetdicom writes (``STORE_RECV_CHUNKED_DATASET``: :func:`file_meta_bytes`, byte-identical);
- when the last fragment came, the file goes to the store callback (``StoreSCP.store_received``: the same
  admission and group commit as pynetdicom's ``EVT_C_STORE`` handler: Success only once the bytes and the index
  row are durable) and the C-STORE-RSP (:func:`store_rsp_pdus`, the bytes pynetdicom would send) is written to
  the socket by the same thread; the file in ``incoming/`` is then removed (the spool holds its hard link).

A fragment of another message (a command fragment, another presentation context) while a dataset arrives is a
protocol violation (PS3.8 9.3.5.1: no interleaving without negotiated asynchronous operations): the association
is aborted (A-ABORT, as for an invalid PDU) and the partial file removed. A full disk (ENOSPC) while a dataset
arrives removes the partial file, drops the rest and answers 0xA700, as :class:`node.ingest.scp._DiskFullGuard`.
"""

from __future__ import annotations

import errno
import io
import logging
import os
import re
import struct
import tempfile
import threading
from collections.abc import Callable, Container
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pynetdicom import PYNETDICOM_IMPLEMENTATION_UID, PYNETDICOM_IMPLEMENTATION_VERSION
from pynetdicom.dimse_messages import _MESSAGE_TYPES
from pynetdicom.dsutils import decode

from node.dimse import command_element, even_uid, pdata_pdus

log = logging.getLogger(__name__)

MAX_COMMAND_BYTES = 64 << 10  # a command set beyond this is aborted (C-STORE's are ~200 bytes; pynetdicom has no cap)
C_STORE_RQ = 0x0001
C_STORE_RSP = 0x8001
NO_DATASET = 0x0101  # CommandDataSetType: no data set follows (PS3.7 E.1)
_PLAIN_UID = re.compile(rb"[0-9][0-9.]{0,63}")

# the command elements of a C-STORE-RQ (PS3.7 Table 9.3-1) and how each is encoded: "UI", "US", "UL" or "AE"
_STORE_RQ_ELEMENTS: dict[int, str] = {
    0x0000_0000: "UL",  # CommandGroupLength
    0x0000_0002: "UI",  # AffectedSOPClassUID
    0x0000_0100: "US",  # CommandField
    0x0000_0110: "US",  # MessageID
    0x0000_0700: "US",  # Priority
    0x0000_0800: "US",  # CommandDataSetType
    0x0000_1000: "UI",  # AffectedSOPInstanceUID
    0x0000_1030: "AE",  # MoveOriginatorApplicationEntityTitle
    0x0000_1031: "US",  # MoveOriginatorMessageID
}
_ELEMENT = struct.Struct("<HHL")
_PDV = struct.Struct(">LBB")


@dataclass(frozen=True)
class StoreCommand:
    """The fields of a C-STORE-RQ command set the lean path uses (UIDs without their padding)."""

    message_id: int
    sop_class: str
    sop_instance: str


def parse_store_command(data: bytes | bytearray) -> StoreCommand | None:
    """The C-STORE-RQ in ``data`` (an encoded command set, implicit VR little endian), or None when it is
    anything else or anything unusual: another command, an element PS3.7 9.3.1.1 does not list, a length that
    does not fit, a value pynetdicom would decode differently (UIDs must be digits and dots, at most 64), no data
    set, a Priority other than 0, 1, 2. None means: let pynetdicom decode it."""
    pos, n = 0, len(data)
    values: dict[int, bytes] = {}
    last = -1
    while pos < n:
        if n - pos < 8:
            return None
        group, elem, length = _ELEMENT.unpack_from(data, pos)
        tag = (group << 16) | elem
        pos += 8
        kind = _STORE_RQ_ELEMENTS.get(tag)
        if kind is None or tag <= last or length > n - pos:
            return None
        if (kind == "US" and length != 2) or (kind == "UL" and length != 4):
            return None
        values[tag] = bytes(data[pos:pos + length])
        last = tag
        pos += length
    try:
        field = struct.unpack("<H", values[0x0000_0100])[0]
        message_id = struct.unpack("<H", values[0x0000_0110])[0]
        priority = struct.unpack("<H", values[0x0000_0700])[0]
        dataset_type = struct.unpack("<H", values[0x0000_0800])[0]
        sop_class = values[0x0000_0002].rstrip(b"\0 ")
        sop_instance = values[0x0000_1000].rstrip(b"\0 ")
    except KeyError:
        return None
    if field != C_STORE_RQ or dataset_type == NO_DATASET or priority not in (0, 1, 2):
        return None
    if not _PLAIN_UID.fullmatch(sop_class) or not _PLAIN_UID.fullmatch(sop_instance):
        return None
    if 0x0000_1030 in values and not values[0x0000_1030].isascii():
        return None
    return StoreCommand(message_id, sop_class.decode("ascii"), sop_instance.decode("ascii"))


def pynetdicom_decodes(data: bytes | bytearray) -> bool:
    """Whether pynetdicom 3.0 can take this command set (``DIMSEMessage.decode_msg``): it decodes and names a
    DIMSE message type. One it cannot take ends pynetdicom's DUL thread with an exception (the association then
    answers nothing and is not aborted), so the lean path aborts it instead."""
    try:
        field = decode(io.BytesIO(bytes(data)), True, True).CommandField
        return int(field) in _MESSAGE_TYPES
    except Exception:  # noqa: BLE001 - whatever pydicom raises on garbage
        return False


def _even(value: bytes, pad: bytes) -> bytes:
    return value + pad if len(value) % 2 else value


def _explicit(tag: int, vr: bytes, value: bytes) -> bytes:
    if vr == b"OB":
        return struct.pack("<HH2s2xL", tag >> 16, tag & 0xFFFF, vr, len(value)) + value
    return struct.pack("<HH2sH", tag >> 16, tag & 0xFFFF, vr, len(value)) + value


def file_meta_bytes(sop_class: str, sop_instance: str, transfer_syntax: str) -> bytes:
    """The preamble, ``DICM`` and File Meta Information (PS3.10 7.1, explicit VR little endian) pynetdicom 3.0
    writes before a dataset it receives in chunks (``create_file_meta`` + pydicom's ``write_file_meta_info``):
    the same bytes, tested against them (tests/ingest/test_lean.py)."""
    body = b"".join((
        _explicit(0x0002_0001, b"OB", b"\x00\x01"),
        _explicit(0x0002_0002, b"UI", _even(sop_class.encode("ascii"), b"\0")),
        _explicit(0x0002_0003, b"UI", _even(sop_instance.encode("ascii"), b"\0")),
        _explicit(0x0002_0010, b"UI", _even(transfer_syntax.encode("ascii"), b"\0")),
        _explicit(0x0002_0012, b"UI", _even(str(PYNETDICOM_IMPLEMENTATION_UID).encode("ascii"), b"\0")),
        _explicit(0x0002_0013, b"SH", _even(PYNETDICOM_IMPLEMENTATION_VERSION.encode("ascii"), b" ")),
    ))
    return b"\0" * 128 + b"DICM" + _explicit(0x0002_0000, b"UL", struct.pack("<L", len(body))) + body


def store_rsp_command(cmd: StoreCommand, status: int) -> bytes:
    """The C-STORE-RSP command set pynetdicom 3.0 encodes for ``cmd`` answered with ``status`` (implicit VR
    little endian; PS3.7 Table 9.3-2: Affected SOP Class/Instance UID, Message ID Being Responded To, Status)."""
    body = b"".join((
        command_element(0x0000_0002, even_uid(cmd.sop_class)),
        command_element(0x0000_0100, struct.pack("<H", C_STORE_RSP)),
        command_element(0x0000_0120, struct.pack("<H", cmd.message_id)),
        command_element(0x0000_0800, struct.pack("<H", NO_DATASET)),
        command_element(0x0000_0900, struct.pack("<H", status)),
        command_element(0x0000_1000, even_uid(cmd.sop_instance)),
    ))
    return command_element(0x0000_0000, struct.pack("<L", len(body))) + body


def store_rsp_pdus(cmd: StoreCommand, status: int, context_id: int, peer_max_pdu: int) -> bytes:
    """The P-DATA-TF PDU(s) carrying the C-STORE-RSP, fragmented as pynetdicom does for a peer whose maximum PDU
    length is ``peer_max_pdu`` (bytes; 0: unlimited): one PDV per PDU, each at most ``peer_max_pdu - 6`` bytes
    of the command. Raises LeanAbort for a ``peer_max_pdu`` of 1-6 (no item fits: ``node.dimse.max_pdu_problem``;
    the SCP rejects such associations before any PDU)."""
    try:
        return b"".join(pdata_pdus(store_rsp_command(cmd, status), context_id, peer_max_pdu, command=True))
    except ValueError as exc:
        raise LeanAbort(f"the peer's maximum PDU length of {peer_max_pdu} byte(s) cannot carry a response") from exc


def pdata_item_problem(pdu: bytes | bytearray, accepted: Container[int]) -> str | None:
    """What is wrong with the presentation data value items of the P-DATA-TF ``pdu`` (header included), or None:
    PS3.8 9.3.5 wants one or more items, each of length >= 2 and inside the PDU, and each on a presentation
    context of the association (``accepted``: the accepted context IDs). pynetdicom 3.0's DUL thread dies on an
    item of a context it did not accept or of length below 2 (KeyError / IndexError in its state machine),
    leaving the association half-closed, counted open and its partial file in incoming/; an empty P-DATA-TF
    would count against the lean path's command-set bound. Both receive paths check every P-DATA-TF with this
    before anything decodes it (``node.ingest.reactor.QuietDUL``) and abort the association with the text
    returned (no patient data in it)."""
    pos, end = 6, len(pdu)
    if end <= pos:
        return "a P-DATA-TF without any presentation data value item"
    while pos < end:
        if end - pos < 6:
            return "a P-DATA-TF ending inside a presentation data value item header"
        length, cx, _control = _PDV.unpack_from(pdu, pos)
        if length < 2 or length > end - pos - 4:
            return f"a presentation data value item of length {length} in a P-DATA-TF of {end} bytes"
        if cx not in accepted:
            return f"a presentation data value item on presentation context {cx}, which was not accepted"
        pos += 4 + length
    return None


class LeanAbort(Exception):
    """The peer broke the protocol on the lean path (interleaved fragments, a write error): abort the
    association; the message says why (no patient data)."""


# (assoc, path or None when the disk filled, SOP class, SOP instance, transfer syntax) -> DIMSE status
StoreCallback = Callable[[Any, Path | None, str, str, str], int]


@dataclass(frozen=True)
class LeanHooks:
    """What the lean path needs from the SCP: where received files go (``incoming``, on the spool's disk), the
    store callback (``StoreSCP.store_received``) and, when given, what to call with each PDU's size in bytes
    instead of triggering ``EVT_DATA_RECV`` (``StoreSCP.data_received``: the disk watermark check)."""

    incoming: Path
    store: StoreCallback
    received: Callable[[Any, int], None] | None = None
    # [node] max_instance_mb in bytes (0: none): a data set growing past it is no longer written (its partial file
    # removed, the rest read and dropped) and, once whole, answered by ``oversize(assoc, sop_instance, bytes)``
    max_bytes: int = 0
    oversize: Callable[[Any, str, int], int] | None = None


_IDLE, _DATA, _PASS, _DEAD = range(4)


class LeanReceiver:
    """The lean path of one association (module docstring); used by its DUL thread only, except
    :meth:`drop_partial` (any thread)."""

    def __init__(self, assoc: Any, hooks: LeanHooks) -> None:
        self.assoc = assoc
        self.hooks = hooks
        self._mode = _IDLE
        self._cmd = bytearray()  # command fragments gathered so far
        self._held: list[bytes | bytearray] = []  # the PDUs that brought them (replayed to pynetdicom on fallback)
        self._held_bytes = 0
        self._cmd_cx = -1
        self._pass_has_data = True  # PASS: the message passed to pynetdicom has a data set (else ends with its command)
        self._store: StoreCommand | None = None
        self._cx = -1
        self._ts = ""
        self._fh: Any = None  # the file being written (None: none, or dropped after ENOSPC)
        self._path: Path | None = None
        self._disk_full = False
        self._written = 0  # bytes of the current data set's file written (file meta included)
        self._oversize = 0  # bytes of the current data set received once it passed hooks.max_bytes (0: it did not)
        self._lock = threading.Lock()
        self.stored = 0  # C-STORE-RQs answered on the lean path (for tests)
        self.passed = 0  # messages handed to pynetdicom

    # ------------------------------------------------------------------------------------ PDUs in

    def feed(self, pdu: bytearray, send: Callable[[bytes], None]) -> list[bytes | bytearray]:
        """Take one whole P-DATA-TF (``pdu``, header included). Returns the PDUs to hand to pynetdicom, in order
        (often none). ``send`` writes bytes to the peer (the C-STORE-RSP). Raises LeanAbort."""
        if self._mode == _DEAD:
            return []
        self._check_items(pdu)
        if self._mode == _PASS:
            self._pass_through(pdu)
            return [pdu]
        view = memoryview(pdu)
        pos, end = 6, len(pdu)
        while pos < end:
            if end - pos < 6:
                return self._fallback(pdu)
            length, cx, control = _PDV.unpack_from(pdu, pos)
            if length < 2 or length > end - pos - 4:
                return self._fallback(pdu)
            start, stop = pos + 6, pos + 4 + length
            pos = stop
            if self._mode == _DATA:
                if control & 1 or cx != self._cx:
                    raise LeanAbort("a fragment of another message arrived while a data set was being received")
                self._write(view[start:stop])
                if control & 2:
                    self._finish(send)
                    return []  # as pynetdicom: the rest of a P-DATA after a complete message is not read
                continue
            # _IDLE: the command set of a new message
            if not control & 1:  # pynetdicom would buffer such fragments in memory without a bound
                raise LeanAbort("a data set fragment arrived with no complete command set before it")
            if self._cmd_cx >= 0 and cx != self._cmd_cx:
                return self._fallback(pdu)
            self._cmd_cx = cx
            self._cmd += view[start:stop]
            if len(self._cmd) > MAX_COMMAND_BYTES:  # pynetdicom would gather it without a bound
                raise LeanAbort(f"a command set of more than {MAX_COMMAND_BYTES} bytes")
            if control & 2:
                if not self._begin(cx):
                    if not pynetdicom_decodes(self._cmd):
                        raise LeanAbort("a command set that cannot be decoded")
                    return self._fallback(pdu)
                if pos >= end:
                    self._reset_command()
                    return []
                self._reset_command()
        if self._mode == _IDLE:  # the command continues in a later PDU
            self._held.append(pdu)
            self._held_bytes += len(pdu)
            if self._held_bytes > 2 * MAX_COMMAND_BYTES:  # many PDUs of tiny fragments
                raise LeanAbort(f"a command set sent in more than {2 * MAX_COMMAND_BYTES} bytes of PDUs")
        return []

    def _check_items(self, pdu: bytes | bytearray) -> None:
        """:func:`pdata_item_problem` of ``pdu`` on this association, raised as LeanAbort."""
        problem = pdata_item_problem(pdu, self.assoc._accepted_cx)
        if problem is not None:
            raise LeanAbort(problem)

    def _reset_command(self) -> None:
        self._cmd = bytearray()
        self._held = []
        self._held_bytes = 0
        self._cmd_cx = -1

    def _fallback(self, pdu: bytearray | None) -> list[bytes | bytearray]:
        """Hand the message to pynetdicom: the PDUs held for its command, then ``pdu``, as they came."""
        if self._mode == _DATA:
            raise LeanAbort("a malformed P-DATA-TF arrived while a data set was being received")
        out = self._held + ([pdu] if pdu is not None else [])
        self._reset_command()
        self._mode = _PASS
        self._pass_has_data = True
        self.passed += 1
        for p in out:
            self._pass_through(p)
            if self._mode != _PASS:
                break
        return out

    def _pass_through(self, pdu: bytes | bytearray) -> None:
        """Follow a PDU handed to pynetdicom: back to _IDLE once the message it belongs to is complete (as
        pynetdicom, the rest of that P-DATA is not read). Malformed items: pynetdicom decides."""
        pos, end = 6, len(pdu)
        while pos + 6 <= end:
            length, _cx, control = _PDV.unpack_from(pdu, pos)
            if length < 2:
                return
            if control & 1 and control & 2:  # the last command fragment: does a data set follow?
                cmd_end = min(end, pos + 4 + length)
                self._pass_has_data = _has_dataset(pdu, pos + 6, cmd_end)
                if not self._pass_has_data:
                    self._mode = _IDLE
                    return
            elif not control & 1 and control & 2:
                self._mode = _IDLE
                return
            pos += 4 + length

    # ------------------------------------------------------------------------------------ one C-STORE

    def _begin(self, cx: int) -> bool:
        """The command is complete: start a lean C-STORE if it is a plain one on an accepted context."""
        cmd = parse_store_command(self._cmd)
        if cmd is None:
            return False
        context = self.assoc._accepted_cx.get(cx)
        if context is None or str(context.abstract_syntax) != cmd.sop_class or not context.transfer_syntax:
            return False
        ts = str(context.transfer_syntax[0])
        if not _PLAIN_UID.fullmatch(ts.encode("ascii", "replace")):
            return False
        self._store, self._cx, self._ts = cmd, cx, ts
        self._disk_full = False
        self._written, self._oversize = 0, 0
        with self._lock:
            try:
                fd, name = tempfile.mkstemp(suffix=".dcm", dir=self.hooks.incoming)
            except OSError as exc:
                if exc.errno != errno.ENOSPC:
                    raise LeanAbort(f"cannot create a file in {self.hooks.incoming}: {exc}") from exc
                self._disk_full = True
                self._mode = _DATA
                return True
            self._fh = os.fdopen(fd, "wb")
            self._path = Path(name)
        self._mode = _DATA
        self._write(file_meta_bytes(cmd.sop_class, cmd.sop_instance, ts))
        return True

    def _write(self, data: bytes | memoryview) -> None:
        if self._oversize:
            self._oversize += len(data)
            return
        if self._disk_full:
            return
        with self._lock:
            fh = self._fh
            if fh is None:
                raise LeanAbort("the data set's file was removed (the association is ending)")
            self._written += len(data)
            if 0 < self.hooks.max_bytes < self._written and self.hooks.oversize is not None:
                self._oversize = self._written  # over max_instance_mb: not written further (hostile19)
                path, self._fh, self._path = self._path, None, None
                try:
                    fh.close()
                except OSError:
                    pass
                if path is not None:
                    path.unlink(missing_ok=True)
                return
            try:
                fh.write(data)
            except OSError as exc:
                self._spill(exc)

    def _spill(self, exc: OSError) -> None:
        """A write failed: on ENOSPC drop the partial file and the rest of the data set (answered 0xA700);
        otherwise abort. Called with the lock held."""
        name = self._path
        try:
            self._fh.close()
        except OSError:
            pass
        self._fh, self._path = None, None
        if name is not None:
            name.unlink(missing_ok=True)
        if exc.errno != errno.ENOSPC:
            raise LeanAbort(f"writing a received data set failed: {exc}") from exc
        self._disk_full = True

    def _finish(self, send: Callable[[bytes], None]) -> None:
        """The last fragment came: store, answer, remove the file from incoming/."""
        cmd = self._store
        assert cmd is not None
        with self._lock:
            fh, path = self._fh, self._path
            if fh is not None:
                try:
                    fh.close()
                except OSError as exc:
                    self._spill(exc)
                    path = None
            self._fh, self._path = None, None  # complete: no longer a partial file for drop_partial
        if not self._disk_full and not self._oversize and path is None:
            raise LeanAbort("the data set's file was removed (the association is ending)")
        self._mode = _IDLE
        timer = getattr(getattr(self.assoc, "dul", None), "_idle_timer", None)
        if timer is not None:  # the DUL thread waits for the commit: not the peer's silence (network timeout)
            timer.stop()
        try:
            if self._oversize and self.hooks.oversize is not None:
                status = self.hooks.oversize(self.assoc, cmd.sop_instance, self._oversize)
            else:
                status = self.hooks.store(self.assoc, None if self._disk_full else path, cmd.sop_class,
                                          cmd.sop_instance, self._ts)
        finally:
            if path is not None:
                path.unlink(missing_ok=True)  # the spool holds its own link; as pynetdicom after the handler
            if timer is not None:
                timer.restart()
        self._store = None
        if not self.assoc.is_established:  # aborted meanwhile (e.g. the node stopping): no answer, as pynetdicom
            return
        send(store_rsp_pdus(cmd, status, self._cx, int(self.assoc.requestor.maximum_length or 0)))
        self.stored += 1

    # ------------------------------------------------------------------------------------ the end

    def drop_partial(self) -> Path | None:
        """Close the file of a data set still arriving, if any, and return its path (not removed: the caller
        removes and reports it); nothing more is received on this path afterwards."""
        with self._lock:
            fh, path = self._fh, self._path
            self._fh, self._path = None, None
            self._mode = _DEAD
        if fh is not None:
            try:
                fh.close()
            except OSError:
                pass
        return path


def _has_dataset(pdu: bytes | bytearray, start: int, stop: int) -> bool:
    """Whether a final command fragment (bytes ``start:stop`` of ``pdu``) says a data set follows: its
    CommandDataSetType (0000,0800) is not 0x0101. Only whole commands in one fragment are looked at; when the
    element is not found, True (pynetdicom's message then ends with a data set's last fragment)."""
    data = bytes(pdu[start:stop])
    pos = 0
    while pos + 8 <= len(data):
        group, elem, length = _ELEMENT.unpack_from(data, pos)
        if group == 0 and elem == 0x0800 and length == 2 and pos + 10 <= len(data):
            return bool(struct.unpack_from("<H", data, pos + 8)[0] != NO_DATASET)
        pos += 8 + length
    return True
