"""Destination ``kind = "dicomweb"``: STOW-RS with dicomweb-client.

Auth: ``token`` (bearer) or ``username``/``password`` (basic). Files go in batches of at most ``batch_size``
instances and ``batch_mb`` MB of files (a larger single file goes alone) per multipart request, ``parallel``
requests at once; the first failure stops the batches not yet started and is raised (a non-retryable one first).
dicomweb-client retries 408/429/503/504 with exponential backoff, and the outbox retries the whole delivery on a
``DeliveryError(retryable=True)``. A STOW response listing failed instances is a delivery error naming them.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import pydicom
import requests
from dicomweb_client import DICOMwebClient
from dicomweb_client.session_utils import create_session, create_session_from_user_pass

from node.config import DicomwebDestination
from node.errors import DeliveryError
from node.send.base import in_parallel

log = logging.getLogger(__name__)

_PERMANENT = {400, 401, 403, 404, 409, 413, 415}


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


def client_for(dest: DicomwebDestination) -> DICOMwebClient:
    """A dicomweb-client for ``dest``'s service root: bearer ``token``, else basic ``username``/``password``;
    ``tls_ca`` / ``tls_cert`` / ``tls_key``; ``timeout_s`` per request."""
    if dest.username and not dest.token:
        session = create_session_from_user_pass(dest.username, dest.password)
    else:
        session = create_session()
    if dest.tls_ca:
        session.verify = dest.tls_ca
    if dest.tls_cert:
        session.cert = (dest.tls_cert, dest.tls_key) if dest.tls_key else dest.tls_cert
    headers = {"Authorization": f"Bearer {dest.token}"} if dest.token else None
    return DICOMwebClient(dest.url.rstrip("/"), session=session, headers=headers, timeout=dest.timeout_s)


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
        self._client.set_http_retry_params(retry=True, max_attempts=3, wait_exponential_multiplier=500)

    def _error(self, what: str, exc: Exception) -> DeliveryError:
        resp = getattr(exc, "response", None)
        status = getattr(resp, "status_code", None)
        retryable = status not in _PERMANENT
        detail = f"HTTP {status}" if status is not None else type(exc).__name__
        return DeliveryError(f"dicomweb destination {self.name!r} ({self.url}): {what}: {detail}", retryable)

    def send(self, paths: Sequence[Path]) -> None:
        todo = batches(paths, self.batch_size, self.batch_bytes)
        in_parallel(todo, self._store, self.parallel, f"srnode-stow-{self.name}")
        log.info("dicomweb destination %s: %d file(s) stored in %d request(s)", self.name, len(paths), len(todo))

    def _store(self, batch: list[Path]) -> None:
        """One STOW-RS request with the files of ``batch``; raises DeliveryError."""
        try:
            datasets = [pydicom.dcmread(p) for p in batch]
        except (OSError, pydicom.errors.InvalidDicomError) as exc:
            raise DeliveryError(f"dicomweb destination {self.name!r}: cannot read a file of the batch "
                                f"starting {batch[0].name}: {exc}", retryable=False) from exc
        try:
            result = self._client.store_instances(datasets)
        except requests.RequestException as exc:
            raise self._error(f"STOW-RS of {len(batch)} instance(s) failed", exc) from exc
        failed = list(getattr(result, "FailedSOPSequence", []) or [])
        if failed:
            reasons = sorted({f"{getattr(item, 'ReferencedSOPInstanceUID', '?')}: reason "
                              f"0x{int(getattr(item, 'FailureReason', 0)):04X}" for item in failed})
            raise DeliveryError(f"dicomweb destination {self.name!r}: {len(failed)} of {len(batch)} "
                                f"instance(s) refused ({'; '.join(reasons[:3])})", retryable=True)

    def check(self) -> None:
        try:
            # QIDO-RS with limit=1: cheap and needs the same auth as STOW
            self._client.search_for_studies(limit=1)
        except requests.RequestException as exc:
            raise self._error("not reachable", exc) from exc


def create(dest: DicomwebDestination) -> DicomWebSender:
    """The sender of kind ``DicomwebDestination.kind`` for ``dest`` (``node.send.base.make_sender``)."""
    return DicomWebSender(dest)
