"""STOW-RS inbound and WADO-RS outbound encoding (PS3.18): multipart/related bodies and the STOW response.

No HTTP server here: ``node.app.http`` calls :func:`store_multipart` with the request body and a ``spool`` callable
that admits one instance (``node.ingest.admit.Admission.admit_bytes``: exactly as a C-STORE) and raises
IngestError with the DIMSE status when it is refused.
"""

from __future__ import annotations

import io
import logging
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import pydicom
from pydicom.errors import InvalidDicomError

from node.dimse import Status
from node.errors import IngestError, dicom_read_problem

log = logging.getLogger(__name__)

_BOUNDARY = re.compile(r'boundary="?([^";]+)"?', re.I)


class MultipartError(ValueError):
    """The request body is not a multipart/related message we can read."""


def boundary_of(content_type: str) -> str:
    """The ``boundary`` parameter of a multipart/related Content-Type (RFC 2046 5.1.1, RFC 2387);
    MultipartError when the type is another or the parameter is missing."""
    if not content_type.lower().startswith("multipart/related"):
        raise MultipartError(f"Content-Type {content_type.split(';')[0]!r} is not multipart/related")
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


def store_multipart(body: bytes, content_type: str, spool: Callable[[bytes], Any], study: str = "") -> StowResult:
    """Store every application/dicom part of a STOW-RS request; per-instance outcome in the result.

    ``spool`` admits one part (raising IngestError with the DIMSE status); ``study``: the StudyInstanceUID of
    the URL, if any (a part of another study fails with 0xA900). MultipartError when the body cannot be split;
    parts before the fault may already be stored (see :func:`split_multipart`).
    """
    result = StowResult()
    for n, (headers, payload) in enumerate(split_multipart(body, boundary_of(content_type)), start=1):
        part_type = headers.get("content-type", "application/dicom").split(";")[0].strip().lower()
        if part_type != "application/dicom":
            result.failed.append(("", "", Status.CANNOT_UNDERSTAND, f"part {n}: {part_type} is not application/dicom"))
            continue
        sop_class = sop_uid = ""
        try:
            ds = pydicom.dcmread(io.BytesIO(payload), stop_before_pixels=True)
            sop_class = str(ds.get("SOPClassUID", "") or ds.file_meta.get("MediaStorageSOPClassUID", ""))
            sop_uid = str(ds.get("SOPInstanceUID", "") or ds.file_meta.get("MediaStorageSOPInstanceUID", ""))
            if study and str(ds.get("StudyInstanceUID", "")) != study:
                raise IngestError(f"part {n}: StudyInstanceUID does not match the study of the URL",
                                  status=Status.DATASET_DOES_NOT_MATCH)
            spool(payload)
            result.stored.append((sop_class, sop_uid))
        except (InvalidDicomError, EOFError, ValueError, AttributeError) as exc:
            result.failed.append((sop_class, sop_uid, Status.CANNOT_UNDERSTAND, f"part {n}: not a DICOM file: {dicom_read_problem(exc)}"))
        except IngestError as exc:
            result.failed.append((sop_class, sop_uid, exc.status, f"part {n}: {exc}"))
    for *_, words in result.failed:
        log.warning("STOW-RS: instance refused: %s", words)
    return result


def multipart_part(data: bytes, boundary: str) -> bytes:
    """One application/dicom part of a multipart/related stream (WADO-RS)."""
    return b"--" + boundary.encode("latin-1") + b"\r\nContent-Type: application/dicom\r\n\r\n" + data + b"\r\n"


def multipart_close(boundary: str) -> bytes:
    """The closing delimiter of a multipart stream (``--boundary--``, RFC 2046 5.1.1)."""
    return b"--" + boundary.encode("latin-1") + b"--\r\n"
