"""STOW-RS inbound and WADO-RS outbound encoding (PS3.18): multipart/related bodies and the STOW response.

No HTTP server here. ``node.app.http`` feeds the request body, chunk by chunk as it arrives, to a
:class:`StowReceiver`: an incremental multipart parser (:class:`MultipartStream`) writes each part to a temporary
file in the spool's ``incoming/`` and, once the part is complete, hands the file to an ``admit`` callable
(``Admission.admit_file``: exactly as a C-STORE), which raises IngestError with the DIMSE status when the
instance is refused. Memory stays bounded whatever the size of a part (one chunk and one delimiter's length).
"""

from __future__ import annotations

import logging
import os
import re
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from node.dimse import Status
from node.errors import IngestError, dicom_read_problem
from node.ingest.admit import DEFAULT_MAX_INSTANCE_BYTES, header_dataset

log = logging.getLogger(__name__)

_BOUNDARY = re.compile(r'boundary="?([^";]+)"?', re.I)
_TYPE = re.compile(r';\s*type\s*=\s*"?([^";]*)"?', re.I)


class MultipartError(ValueError):
    """The request body is not a multipart/related message we can read."""


class UnsupportedMediaType(MultipartError):
    """The request's media type is not one the node takes (HTTP 415)."""


class TooManyParts(MultipartError):
    """The request holds more parts than ``[http] max_stow_parts`` (HTTP 413; the parts before are kept)."""


def boundary_of(content_type: str) -> str:
    """The ``boundary`` parameter of a multipart/related Content-Type (RFC 2046 5.1.1, RFC 2387);
    UnsupportedMediaType when the type is another, or its ``type`` parameter is not application/dicom (PS3.18's
    metadata-and-bulk-data requests are not implemented; no ``type`` is application/dicom); MultipartError when
    the boundary is missing."""
    if not content_type.lower().startswith("multipart/related"):
        raise UnsupportedMediaType(f"Content-Type {content_type.split(';')[0]!r} is not multipart/related")
    kind = _TYPE.search(content_type)
    if kind and kind.group(1).strip().lower() != "application/dicom":
        raise UnsupportedMediaType(f"multipart/related type {kind.group(1).strip()!r} is not supported: only "
                                   "application/dicom (Part 10 instances)")
    m = _BOUNDARY.search(content_type)
    if not m:
        raise MultipartError("multipart/related without a boundary parameter")
    return m.group(1)


def split_multipart(body: bytes, boundary: str) -> Iterator[tuple[dict[str, str], bytes]]:
    """Yield (headers, payload) for each part of a multipart body; header names lower-cased.

    A generator: MultipartError (no parts, a part without a blank line, no closing delimiter) is raised when
    iteration reaches the fault, after the parts before it were yielded.
    """
    delim = b"--" + boundary.encode("latin-1")
    chunks = body.split(delim)
    if len(chunks) < 3:
        raise MultipartError("multipart body has no parts (boundary not found)")
    for chunk in chunks[1:]:
        if chunk.startswith(b"--"):
            return  # closing delimiter
        if chunk.startswith(b"\r\n"):
            chunk = chunk[2:]
        head, sep, payload = chunk.partition(b"\r\n\r\n")
        if not sep:
            raise MultipartError("multipart part without a header/body separator")
        if payload.endswith(b"\r\n"):
            payload = payload[:-2]
        headers: dict[str, str] = {}
        for line in head.decode("latin-1").split("\r\n"):
            name, colon, value = line.partition(":")
            if colon:
                headers[name.strip().lower()] = value.strip()
        yield headers, payload
    raise MultipartError("multipart body has no closing delimiter")


MAX_WARNINGS = 10  # Warning headers on one STOW-RS response (a request of 3000 junk parts gets 10 and a count)
MAX_LOGGED = 10  # log lines naming a refused part, per request (then one line with the count by status)
DEFAULT_MAX_PARTS = 50_000  # [http] max_stow_parts


@dataclass
class StowResult:
    """Per-instance outcome of a STOW-RS request: stored (SOP class, SOP instance) pairs and failed ones with
    the DIMSE status used as Failure Reason (0008,1197) and the reason in words."""

    stored: list[tuple[str, str]] = field(default_factory=list)  # (SOP class, SOP instance)
    failed: list[tuple[str, str, int, str]] = field(default_factory=list)  # (class, instance, reason, words)

    @property
    def http_status(self) -> int:
        """200 when nothing failed, 202 when some were stored and some failed, 409 when every one failed
        (PS3.18 10.5.3)."""
        if not self.failed:
            return 200
        return 202 if self.stored else 409

    def as_json(self, base_url: str) -> dict[str, Any]:
        """The STOW-RS response as DICOM JSON (PS3.18 Table 10.5.3-1)."""
        out: dict[str, Any] = {}
        if self.stored:
            out["00081199"] = {"vr": "SQ", "Value": [
                {"00081150": {"vr": "UI", "Value": [c]}, "00081155": {"vr": "UI", "Value": [i]}}
                for c, i in self.stored]}
        if self.failed:
            out["00081198"] = {"vr": "SQ", "Value": [
                {"00081150": {"vr": "UI", "Value": [c]} if c else {"vr": "UI"},
                 "00081155": {"vr": "UI", "Value": [i]} if i else {"vr": "UI"},
                 "00081197": {"vr": "US", "Value": [reason]}}
                for c, i, reason, _ in self.failed]}
        if base_url:
            out["00081190"] = {"vr": "UR", "Value": [base_url]}
        return out

    def warnings(self, limit: int = MAX_WARNINGS) -> list[str]:
        """The failed instances' reasons as HTTP Warning header values (PS3.18 10.5.3: ``299 <service>:
        <text>``; RFC 7234 5.5), the first ``limit`` and a count of the rest; ASCII, quotes and line breaks
        replaced. The Failure Reason codes alone do not say what was wrong with a part."""
        def clean(text: str) -> str:
            flat = " ".join(text.split()).replace('"', "'")
            return flat.encode("ascii", "replace").decode("ascii")[:300]
        out = [f'299 srnode "{clean(words)}"' for *_, words in self.failed[:limit]]
        if len(self.failed) > limit:
            out.append(f'299 srnode "and {len(self.failed) - limit} more refused instance(s): see the node log"')
        return out


MAX_PART_HEADER_BYTES = 16 * 1024  # the header block of one part; beyond: MultipartError


@dataclass(frozen=True)
class PartStart:
    """A part begins: its headers (names lower-cased)."""

    headers: dict[str, str]


@dataclass(frozen=True)
class PartData:
    """Some bytes of the current part's body."""

    data: bytes


@dataclass(frozen=True)
class PartEnd:
    """The current part is complete (its closing delimiter was seen)."""


PartEvent = PartStart | PartData | PartEnd


class MultipartStream:
    """An incremental multipart parser (RFC 2046 5.1.1): :meth:`feed` it chunks of any size, get part events.

    Holds at most one chunk plus a delimiter's length (and one part's header block, at most
    ``MAX_PART_HEADER_BYTES``) in memory. The preamble and the epilogue are ignored.
    """

    def __init__(self, boundary: str) -> None:
        self.delimiter = b"\r\n--" + boundary.encode("latin-1")
        self._buf = bytearray(b"\r\n")  # the first delimiter may start the body, without a CRLF before it
        self._state = "preamble"  # preamble, after-delimiter, headers, body, closed
        self.parts = 0

    @property
    def closed(self) -> bool:
        """Whether the closing delimiter (``--boundary--``) was seen."""
        return self._state == "closed"

    def feed(self, data: bytes) -> Iterator[PartEvent]:
        """The events that ``data`` completes, in order. A generator: MultipartError (a part header block over
        ``MAX_PART_HEADER_BYTES``) is raised when iteration reaches it."""
        if self._state == "closed":
            return
        self._buf += data
        d = self.delimiter
        while True:
            buf = self._buf
            if self._state in ("preamble", "body"):
                i = buf.find(d)
                if i < 0:
                    keep = len(d) - 1  # a delimiter may be cut between this chunk and the next
                    if len(buf) > keep:
                        if self._state == "body":
                            yield PartData(bytes(buf[: len(buf) - keep]))
                        del buf[: len(buf) - keep]
                    return
                if self._state == "body":
                    if i:
                        yield PartData(bytes(buf[:i]))
                    yield PartEnd()
                del buf[: i + len(d)]
                self._state = "after-delimiter"
            elif self._state == "after-delimiter":
                if len(buf) < 2:
                    return
                if buf[:2] == b"--":
                    self._state = "closed"
                    buf.clear()
                    return
                eol = buf.find(b"\r\n")  # transport padding (RFC 2046) may precede it
                if eol < 0:
                    if len(buf) > MAX_PART_HEADER_BYTES:
                        raise MultipartError("multipart delimiter line too long")
                    return
                del buf[: eol + 2]
                self._state = "headers"
            elif self._state == "headers":
                if buf[:2] == b"\r\n":
                    head, cut = b"", 2
                else:
                    end = buf.find(b"\r\n\r\n")
                    if end < 0:
                        if len(buf) > MAX_PART_HEADER_BYTES:
                            raise MultipartError(f"part {self.parts + 1}: header block over "
                                                 f"{MAX_PART_HEADER_BYTES} bytes")
                        return
                    head, cut = bytes(buf[:end]), end + 4
                del buf[:cut]
                headers: dict[str, str] = {}
                for line in head.decode("latin-1").split("\r\n"):
                    name, colon, value = line.partition(":")
                    if colon:
                        headers[name.strip().lower()] = value.strip()
                self.parts += 1
                self._state = "body"
                yield PartStart(headers)
            else:  # closed
                return

    def close(self) -> None:
        """The body ended: MultipartError unless the closing delimiter was seen after at least one part."""
        if self._state == "closed" and self.parts:
            return
        if self.parts == 0:
            raise MultipartError("multipart body has no parts (boundary not found)")
        raise MultipartError("multipart body has no closing delimiter (truncated?)")


class StowReceiver:
    """One STOW-RS request body, received incrementally: :meth:`feed` its chunks, then :meth:`finish`.

    Each ``application/dicom`` part is written to a temporary file in ``incoming`` (the spool's disk) and, when
    complete, checked (SOP class and instance UIDs read from its header; ``study``: the StudyInstanceUID of the
    URL, if any, else 0xA900) and passed to ``admit`` (which links it into the spool or raises IngestError);
    the temporary file is then removed. A part of another type is skipped (0xC210), as is a part that arrives
    while ``has_space()`` is False or cannot be written (0xA700). Outcomes per part are in :attr:`result`.
    Call :meth:`abort` when the body ends early (a partial part is removed, never admitted).
    """

    def __init__(self, boundary: str, admit: Callable[[Path], Any], incoming: Path, study: str = "",
                 has_space: Callable[[], bool] | None = None,
                 max_instance_bytes: int = DEFAULT_MAX_INSTANCE_BYTES, max_parts: int = DEFAULT_MAX_PARTS) -> None:
        self.parser = MultipartStream(boundary)
        self.max_parts = max_parts  # [http] max_stow_parts: a part beyond it ends the request (TooManyParts)
        self.max_instance_bytes = max_instance_bytes  # [node] max_instance_mb: a larger part is refused 0xC211
        self.admit, self.incoming, self.study = admit, Path(incoming), study
        self.has_space = has_space or (lambda: True)
        self.result = StowResult()
        self.bytes_received = 0
        self._fh: IO[bytes] | None = None
        self._path: Path | None = None
        self._part_bytes = 0  # bytes of the part being written

    def feed(self, data: bytes) -> None:
        """Parse ``data`` (the next bytes of the body), writing and admitting parts as they complete.
        MultipartError for a malformed body; what escapes ``admit`` other than IngestError (SpoolError,
        OSError) propagates (the temporary file is removed)."""
        self.bytes_received += len(data)
        try:
            for event in self.parser.feed(data):
                if isinstance(event, PartStart):
                    self._start(event.headers)
                elif isinstance(event, PartData):
                    self._write(event.data)
                else:
                    self._end()
        except BaseException:
            self.abort()
            raise

    def finish(self) -> StowResult:
        """The body is complete: MultipartError when it was not a whole multipart message (the parts completed
        before the fault are stored); else the per-instance result."""
        self.abort()
        self.parser.close()
        self.log_refusals()
        return self.result

    def log_refusals(self) -> None:
        """One WARNING line per refused part, at most ``MAX_LOGGED`` a request, then one line counting the rest by
        status: a 1 MB body of 100,000 empty parts wrote 100,000 lines (17 MB) into the node's log."""
        failed = self.result.failed
        for *_, words in failed[:MAX_LOGGED]:
            log.warning("STOW-RS: instance refused: %s", words)
        if len(failed) > MAX_LOGGED:
            by: dict[int, int] = {}
            for _c, _i, status, _w in failed[MAX_LOGGED:]:
                by[status] = by.get(status, 0) + 1
            counts = ", ".join(f"{k} with 0x{st:04X}" for st, k in sorted(by.items()))
            log.warning("STOW-RS: and %d more refused part(s) in this request (%s): not logged one by one",
                        len(failed) - MAX_LOGGED, counts)

    def abort(self) -> None:
        """Drop a part still being written (its temporary file is removed, also when closing it fails: a full
        disk fails the close's flush as it failed the write)."""
        fh, path = self._fh, self._path
        self._fh = self._path = None
        if fh is not None:
            try:
                fh.close()
            except OSError:
                pass  # the part is dropped either way
        if path is not None:
            path.unlink(missing_ok=True)

    # ------------------------------------------------------------------------------------ parts

    def _start(self, headers: dict[str, str]) -> None:
        n = self.parser.parts
        if self.max_parts and n > self.max_parts:
            raise TooManyParts(f"more than [http] max_stow_parts = {self.max_parts} parts in one STOW-RS request: "
                               f"the request ends here ({len(self.result.stored)} instance(s) stored before, "
                               f"{len(self.result.failed)} refused); send the rest in another request")
        part_type = headers.get("content-type", "application/dicom").split(";")[0].strip().lower()
        if part_type != "application/dicom":
            self.result.failed.append(("", "", Status.CANNOT_UNDERSTAND,
                                       f"part {n}: {part_type} is not application/dicom"))
            return
        if not self.has_space():
            self.result.failed.append(("", "", Status.OUT_OF_RESOURCES,
                                       f"part {n}: the spool disk is below node.min_free_mb"))
            return
        fd, name = tempfile.mkstemp(prefix="stow-", suffix=".dcm", dir=self.incoming)
        self._fh, self._path = os.fdopen(fd, "wb"), Path(name)
        self._part_bytes = 0

    def _write(self, data: bytes) -> None:
        if self._fh is None:
            return  # a part being skipped
        self._part_bytes += len(data)
        if 0 < self.max_instance_bytes < self._part_bytes:  # not written past the limit (as C-STORE, hostile19):
            self.abort()  # checked once whole, a part wrote up to [http] max_body_mb to incoming/ first
            self.result.failed.append(("", "", Status.TOO_LARGE,
                                       f"part {self.parser.parts}: over node.max_instance_mb = "
                                       f"{self.max_instance_bytes >> 20} while it arrived: not written beyond it"))
            return
        try:
            self._fh.write(data)
        except OSError as exc:
            self.abort()
            self.result.failed.append(("", "", Status.OUT_OF_RESOURCES,
                                       f"part {self.parser.parts}: cannot write to the spool: {exc}"))

    def _end(self) -> None:
        if self._fh is None or self._path is None:
            return
        n, path = self.parser.parts, self._path
        try:
            self._fh.close()
        except OSError as exc:
            self.abort()
            self.result.failed.append(("", "", Status.OUT_OF_RESOURCES,
                                       f"part {n}: cannot write to the spool: {exc}"))
            return
        self._fh = None
        try:
            self._admit_part(n, path)
        finally:
            self._path = None
            path.unlink(missing_ok=True)

    def _admit_part(self, n: int, path: Path) -> None:
        sop_class = sop_uid = study = ""
        try:
            # bounded whatever the part holds or declares (node.ingest.admit.header_dataset): pydicom's dcmread
            # here inflated a deflated part whole and read every large value into memory
            ds, _ = header_dataset(path, self.max_instance_bytes, has_space=self.has_space)
            sop_class = str(ds.get("SOPClassUID", "") or ds.file_meta.get("MediaStorageSOPClassUID", ""))
            sop_uid = str(ds.get("SOPInstanceUID", "") or ds.file_meta.get("MediaStorageSOPInstanceUID", ""))
            study = str(ds.get("StudyInstanceUID", ""))
        except IngestError as exc:
            self.result.failed.append((sop_class, sop_uid, exc.status, f"part {n}: {exc}"))
            return
        except Exception as exc:  # noqa: BLE001 - pydicom raises many types on a broken file (as read_header):
            # InvalidDicomError, EOFError, ValueError, but also NotImplementedError (an unknown VR in the file
            # meta), BytesLengthException, struct.error -- which ended the whole request with 500
            self.result.failed.append((sop_class, sop_uid, Status.CANNOT_UNDERSTAND,
                                       f"part {n}: not a DICOM file: {dicom_read_problem(exc)}"))
            return
        try:
            if self.study and study != self.study:
                raise IngestError("StudyInstanceUID does not match the study of the URL",
                                  status=Status.DATASET_DOES_NOT_MATCH)
            self.admit(path)
            self.result.stored.append((sop_class, sop_uid))
        except IngestError as exc:
            self.result.failed.append((sop_class, sop_uid, exc.status, f"part {n}: {exc}"))


def multipart_part(data: bytes, boundary: str) -> bytes:
    """One application/dicom part of a multipart/related stream (WADO-RS)."""
    return b"--" + boundary.encode("latin-1") + b"\r\nContent-Type: application/dicom\r\n\r\n" + data + b"\r\n"


def multipart_close(boundary: str) -> bytes:
    """The closing delimiter of a multipart stream (``--boundary--``, RFC 2046 5.1.1)."""
    return b"--" + boundary.encode("latin-1") + b"--\r\n"
