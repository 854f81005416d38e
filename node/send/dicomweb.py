"""Destination ``kind = "dicomweb"``: STOW-RS (PS3.18 10.5) out; dicomweb-client for the reachability check.

Auth: ``token`` (bearer) or ``username``/``password`` (basic). Files go in batches of at most ``batch_size``
instances and ``batch_mb`` MB of files (a larger single file goes alone) per multipart request, ``parallel``
requests at once; the first failure stops the batches not yet started and is raised (a non-retryable one first).

Each batch is POSTed by this module, its files' bytes as they are: a 408/429/503/504 is sent again (the same
bytes, up to ``POST_TRIES`` times, backing off), and the outbox retries the whole delivery on a
``DeliveryError(retryable=True)``. The answer is read here too (:func:`stow_answer`), JSON or XML whatever the
parameters of its Content-Type: an instance it lists as failed, or leaves out of a list of the stored ones, is a
delivery error naming them; a 409 (nothing stored) is retried when every Failure Reason is one a C-STORE status
would be retried for (``node.dimse.store_retryable``: out of resources, processing failure), else permanent.
dicomweb-client did this before and (0.61) read failures only under four exact Content-Type strings (not
``application/dicom+json; charset=utf-8``), and resent a batch over its 1 MB chunk size after a 503 as an empty
body, which Orthanc answered 200.
"""

from __future__ import annotations

import json
import logging
import secrets
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from xml.etree import ElementTree

import pydicom
import requests
from dicomweb_client import DICOMwebClient
from dicomweb_client.session_utils import create_session, create_session_from_user_pass

from node.config import DicomwebDestination
from node.dimse import store_retryable
from node.errors import DeliveryError, http_status_text
from node.send.base import in_parallel

log = logging.getLogger(__name__)

_PERMANENT = {400, 401, 403, 404, 409, 413, 415}
_BUSY = {408, 429, 503, 504}  # sent again at once (after a short backoff) before the attempt fails
POST_TRIES = 3
BACKOFF_S = 0.5  # before the 2nd POST of a batch answered busy; doubles
_JSON_TYPES = ("application/dicom+json", "application/json")
_XML_TYPES = ("application/dicom+xml", "application/xml", "text/xml")
REFERENCED_SOP_SEQUENCE, FAILED_SOP_SEQUENCE = "00081199", "00081198"
REFERENCED_SOP_INSTANCE_UID, FAILURE_REASON = "00081155", "00081197"


@dataclass
class StowAnswer:
    """What a STOW-RS answer says (PS3.18 Table 10.5.3-1): ``stored`` (ReferencedSOPSequence; None when the answer
    has no such list, e.g. no body), ``failed`` (FailedSOPSequence: SOP Instance UID -> Failure Reason)."""

    stored: set[str] | None = None
    failed: dict[str, int] = field(default_factory=dict)


def _media_type(content_type: str) -> str:
    return content_type.split(";", 1)[0].strip().lower()


def _json_answer(doc: object) -> StowAnswer:
    answer = StowAnswer()
    if not isinstance(doc, dict):
        raise ValueError("not a DICOM JSON object")

    def items(tag: str) -> list[dict[str, object]] | None:
        el = doc.get(tag)
        if el is None:
            return None
        values = el.get("Value", []) if isinstance(el, dict) else None
        if not isinstance(values, list) or not all(isinstance(i, dict) for i in values):
            raise ValueError(f"({tag[:4]},{tag[4:]}) is not a sequence")
        return values

    def first(item: dict[str, object], tag: str) -> object:
        el = item.get(tag)
        values = el.get("Value") if isinstance(el, dict) else None
        return values[0] if isinstance(values, list) and values else None

    stored = items(REFERENCED_SOP_SEQUENCE)
    if stored is not None:
        answer.stored = {str(first(i, REFERENCED_SOP_INSTANCE_UID)) for i in stored}
    for i in items(FAILED_SOP_SEQUENCE) or []:
        reason = first(i, FAILURE_REASON)
        answer.failed[str(first(i, REFERENCED_SOP_INSTANCE_UID))] = int(reason) if isinstance(reason, int) else 0x0110
    return answer


def _xml_answer(body: bytes) -> StowAnswer:
    root = ElementTree.fromstring(body)  # noqa: S314 - the destination's answer; no entities are resolved
    answer = StowAnswer()

    def children(el: ElementTree.Element, name: str) -> list[ElementTree.Element]:
        # by local name: PS3.19 A.1 puts the model in a namespace (Orthanc writes it), some servers none
        return [c for c in el if c.tag.rsplit("}", 1)[-1] == name]

    def seq(tag: str) -> list[ElementTree.Element] | None:
        el = next((a for a in children(root, "DicomAttribute") if a.get("tag", "").upper() == tag), None)
        return None if el is None else children(el, "Item")

    def first(item: ElementTree.Element, tag: str) -> str:
        el = next((a for a in children(item, "DicomAttribute") if a.get("tag", "").upper() == tag), None)
        value = next(iter(children(el, "Value")), None) if el is not None else None
        return (value.text or "").strip() if value is not None else ""

    stored = seq(REFERENCED_SOP_SEQUENCE)
    if stored is not None:
        answer.stored = {first(i, REFERENCED_SOP_INSTANCE_UID) for i in stored}
    for i in seq(FAILED_SOP_SEQUENCE) or []:
        reason = first(i, FAILURE_REASON)
        answer.failed[first(i, REFERENCED_SOP_INSTANCE_UID)] = int(reason) if reason.isdigit() else 0x0110
    return answer


def stow_answer(content_type: str, body: bytes) -> StowAnswer:
    """The stored and failed instances a STOW-RS answer lists; its media type is read without parameters
    (``application/dicom+json; charset=utf-8`` is JSON). An empty body, or one of another type, lists nothing.
    Raises ValueError when a JSON or XML body cannot be read."""
    kind = _media_type(content_type)
    if not body.strip():
        return StowAnswer()
    if kind in _JSON_TYPES:
        return _json_answer(json.loads(body))
    if kind in _XML_TYPES:
        try:
            return _xml_answer(body)
        except ElementTree.ParseError as exc:
            raise ValueError(f"XML: {exc}") from exc
    return StowAnswer()


def batches(paths: Sequence[Path], max_files: int, max_bytes: int) -> list[list[Path]]:
    """``paths`` in order, cut into runs of at most ``max_files`` files and ``max_bytes`` bytes on disk (a file
    larger than ``max_bytes`` makes a batch of its own). Raises DeliveryError when a file cannot be stat'ed."""
    out: list[list[Path]] = []
    cur: list[Path] = []
    size = 0
    for p in map(Path, paths):
        try:
            n = p.stat().st_size
        except OSError as exc:
            raise DeliveryError(f"cannot read {p}: {exc}", retryable=False) from exc
        if cur and (len(cur) >= max_files or size + n > max_bytes):
            out.append(cur)
            cur, size = [], 0
        cur.append(p)
        size += n
    if cur:
        out.append(cur)
    return out


def session_for(dest: DicomwebDestination) -> requests.Session:
    """A requests session for ``dest``: basic ``username``/``password`` (when no token), ``tls_ca`` /
    ``tls_cert`` / ``tls_key`` (the bearer token is a header of each request: :func:`auth_headers`)."""
    if dest.username and not dest.token:
        session = create_session_from_user_pass(dest.username, dest.password)
    else:
        session = create_session()
    if dest.tls_ca:
        session.verify = dest.tls_ca
    if dest.tls_cert:
        session.cert = (dest.tls_cert, dest.tls_key) if dest.tls_key else dest.tls_cert
    return session


def auth_headers(dest: DicomwebDestination) -> dict[str, str]:
    return {"Authorization": f"Bearer {dest.token}"} if dest.token else {}


def client_for(dest: DicomwebDestination) -> DICOMwebClient:
    """A dicomweb-client for ``dest``'s service root: bearer ``token``, else basic ``username``/``password``;
    ``tls_ca`` / ``tls_cert`` / ``tls_key``; ``timeout_s`` per request."""
    return DICOMwebClient(dest.url.rstrip("/"), session=session_for(dest), headers=auth_headers(dest) or None,
                          timeout=dest.timeout_s)


def _sop_uid(path: Path) -> str:
    """The SOPInstanceUID of a file about to be sent ("" when it cannot be read)."""
    try:
        return str(pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["SOPInstanceUID"]).SOPInstanceUID)
    except Exception:  # noqa: BLE001 - pydicom raises many types on a broken file; such a file was refused before
        return ""


class DicomWebSender:
    """STOW-RS sender for one DICOMweb service root (``url``, e.g. ``http://pacs/dicom-web``)."""

    def __init__(self, dest: DicomwebDestination) -> None:
        self.name = dest.name
        self.url = dest.url.rstrip("/")
        self.batch_size = max(1, dest.batch_size)
        self.batch_bytes = max(1, int(dest.batch_mb * 1024 * 1024))
        self.parallel = max(1, dest.parallel)
        self.timeout_s = dest.timeout_s
        self._client = client_for(dest)
        self._session = session_for(dest)
        self._headers = auth_headers(dest)

    def _error(self, what: str, exc: Exception) -> DeliveryError:
        resp = getattr(exc, "response", None)
        status = getattr(resp, "status_code", None)
        retryable = status not in _PERMANENT
        detail = http_status_text(status) if status is not None else type(exc).__name__
        return DeliveryError(f"dicomweb destination {self.name!r} ({self.url}): {what}: {detail}", retryable)

    def send(self, paths: Sequence[Path]) -> None:
        todo = batches(paths, self.batch_size, self.batch_bytes)
        in_parallel(todo, self._store, self.parallel, f"srnode-stow-{self.name}")
        log.info("dicomweb destination %s: %d file(s) stored in %d request(s)", self.name, len(paths), len(todo))

    def _store(self, batch: list[Path]) -> None:
        """One STOW-RS request with the files of ``batch`` (sent again while the server answers busy); raises
        DeliveryError unless the answer says every file was stored (:meth:`_judge`)."""
        boundary = secrets.token_hex(16)
        parts: list[bytes] = []
        for p in batch:
            try:
                data = p.read_bytes()
            except OSError as exc:
                raise DeliveryError(f"dicomweb destination {self.name!r}: cannot read {p}: {exc}",
                                    retryable=False) from exc
            if data[128:132] != b"DICM":
                raise DeliveryError(f"dicomweb destination {self.name!r}: {p.name} is not a DICOM file (no "
                                    "DICM prefix)", retryable=False)
            parts += [b"--" + boundary.encode() + b"\r\nContent-Type: application/dicom\r\n\r\n", data, b"\r\n"]
        parts.append(b"--" + boundary.encode() + b"--\r\n")
        body = b"".join(parts)  # one copy of the batch, sent again as it is while the server answers busy
        del parts
        headers = {**self._headers, "Accept": "application/dicom+json",
                   "Content-Type": f'multipart/related; type="application/dicom"; boundary={boundary}'}
        what = f"STOW-RS of {len(batch)} instance(s)"
        for attempt in range(POST_TRIES):
            try:
                resp = self._session.post(f"{self.url}/studies", data=body, headers=headers,
                                          timeout=self.timeout_s, allow_redirects=False)
            except requests.RequestException as exc:
                raise self._error(f"{what} failed", exc) from exc
            if resp.status_code not in _BUSY or attempt == POST_TRIES - 1:
                break
            resp.close()
            time.sleep(BACKOFF_S * 2 ** attempt)
        self._judge(resp, batch, what)

    def _judge(self, resp: requests.Response, batch: list[Path], what: str) -> None:
        """Whether the STOW-RS answer ``resp`` says every file of ``batch`` was stored; DeliveryError otherwise."""
        status = resp.status_code
        if 300 <= status < 400:  # never followed: requests re-sends a POST redirected by 301-303 as a GET
            where = " ".join(resp.headers.get("Location", "?").split())[:200]
            raise DeliveryError(f"dicomweb destination {self.name!r} ({self.url}): {what}: HTTP {status}, redirected "
                                f"to {where}: give the address that takes STOW-RS as url", retryable=False)
        kind = _media_type(resp.headers.get("Content-Type", ""))
        if 200 <= status < 300 and resp.content.strip() and kind not in _JSON_TYPES + _XML_TYPES:
            raise DeliveryError(f"dicomweb destination {self.name!r} ({self.url}): {what}: HTTP {status} with an "
                                f"answer that is not a STOW-RS response ({kind or 'no Content-Type'})")
        try:
            answer = stow_answer(resp.headers.get("Content-Type", ""), resp.content)
        except (ValueError, TypeError) as exc:
            if 200 <= status < 300:  # stored, says the status; its body cannot be read: not trusted
                raise DeliveryError(f"dicomweb destination {self.name!r} ({self.url}): {what}: HTTP {status} with "
                                    f"an answer that cannot be read ({type(exc).__name__})") from exc
            answer = StowAnswer()
        if answer.failed:
            reasons = sorted({f"0x{r:04X}" for r in answer.failed.values()})
            shown = "; ".join(f"{uid}: reason 0x{r:04X}" for uid, r in sorted(answer.failed.items())[:3])
            retryable = all(store_retryable(r) for r in answer.failed.values())
            raise DeliveryError(f"dicomweb destination {self.name!r}: {len(answer.failed)} of {len(batch)} "
                                f"instance(s) refused, HTTP {status} ({shown}; reasons {', '.join(reasons)})",
                                retryable=retryable)
        if not 200 <= status < 300:
            raise DeliveryError(f"dicomweb destination {self.name!r} ({self.url}): {what} failed: {http_status_text(status)}",
                                retryable=status not in _PERMANENT)
        if answer.stored is not None:
            missing = len(batch) - len(answer.stored & {_sop_uid(p) for p in batch})
            if missing:
                raise DeliveryError(f"dicomweb destination {self.name!r}: {missing} of {len(batch)} instance(s) "
                                    f"not in the answer's list of stored instances (HTTP {status})")

    def check(self) -> None:
        try:
            # QIDO-RS with limit=1: cheap and needs the same auth as STOW
            self._client.search_for_studies(limit=1)
        except requests.RequestException as exc:
            raise self._error("not reachable", exc) from exc


def create(dest: DicomwebDestination) -> DicomWebSender:
    """The sender of kind ``DicomwebDestination.kind`` for ``dest`` (``node.send.base.make_sender``)."""
    return DicomWebSender(dest)
