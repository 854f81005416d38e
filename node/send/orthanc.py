"""Destination ``kind = "orthanc"``: upload files over Orthanc's REST API (orthanc-api-client, basic auth).

Orthanc stores an instance it already has as a no-op (HTTP 200, status "AlreadyStored"), so a resend after a
partial failure is harmless.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

from orthanc_api_client import OrthancApiClient, exceptions

from node.config import OrthancDestination
from node.errors import DeliveryError

log = logging.getLogger(__name__)

# Orthanc answers 4xx for a file it cannot accept: retrying the same bytes cannot help
_PERMANENT = {400, 401, 403, 413, 415}


class OrthancSender:
    """Sender for one Orthanc server (``url``; ``username``/``password`` or a bearer ``token``; ``timeout_s``)."""

    def __init__(self, dest: OrthancDestination) -> None:
        self.name = dest.name
        self.url = dest.url.rstrip("/") + "/"
        self.timeout_s = dest.timeout_s
        headers = {"Authorization": f"Bearer {dest.token}"} if dest.token else None
        self._client = OrthancApiClient(self.url, user=dest.username or None, pwd=dest.password or None,
                                        headers=headers)

    def _fail(self, what: str, exc: Exception) -> DeliveryError:
        status = getattr(exc, "http_status_code", None)
        retryable = status not in _PERMANENT
        detail = f"HTTP {status}" if status else type(exc).__name__
        return DeliveryError(f"orthanc destination {self.name!r} ({self.url}): {what}: {detail}", retryable)

    def send(self, paths: Sequence[Path]) -> None:
        for path in paths:
            try:
                data = Path(path).read_bytes()
            except OSError as exc:
                raise DeliveryError(f"orthanc destination {self.name!r}: cannot read {path}: {exc}",
                                    retryable=False) from exc
            try:
                resp = self._client.post("instances", data=data, timeout=self.timeout_s,
                                         headers={"Content-Type": "application/dicom"})
            except exceptions.OrthancApiException as exc:
                raise self._fail(f"upload of {Path(path).name} refused", exc) from exc
            body = resp.json() if resp.content else {}
            status = body.get("Status", "") if isinstance(body, dict) else ""
            if status not in ("Success", "AlreadyStored"):
                raise DeliveryError(f"orthanc destination {self.name!r}: {Path(path).name} answered "
                                    f"status {status!r}", retryable=True)
        log.info("orthanc destination %s: %d file(s) stored", self.name, len(paths))

    def check(self) -> None:
        try:
            self._client.get("system", timeout=min(self.timeout_s, 10.0))
        except exceptions.OrthancApiException as exc:
            raise self._fail("not reachable", exc) from exc


def create(dest: OrthancDestination) -> OrthancSender:
    """The sender of kind ``OrthancDestination.kind`` for ``dest`` (``node.send.base.make_sender``)."""
    return OrthancSender(dest)
