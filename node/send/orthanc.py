"""Destination ``kind = "orthanc"``: upload files over Orthanc's REST API (orthanc-api-client, basic auth).

Orthanc stores an instance it already has as a no-op (HTTP 200, status "AlreadyStored"), so a resend after a
partial failure is harmless. ``dest.parallel`` uploads run at once (one ``POST /instances`` per file: Orthanc
1.10.1 also takes a ZIP of several files there, but building it costs the node a copy of every byte for no gain
on localhost; measured 67 instances/s one at a time, 123/s four at once, docs/benchmarks.md "Delivery"). The first
failure stops the uploads not yet started and is raised (a non-retryable one first).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

from orthanc_api_client import OrthancApiClient, exceptions

from node.config import OrthancDestination
from node.errors import DeliveryError, http_status_text
from node.send.base import in_parallel

log = logging.getLogger(__name__)

# Orthanc answers 4xx for a file it cannot accept: retrying the same bytes cannot help
_PERMANENT = {400, 401, 403, 413, 415}


def client_for(dest: OrthancDestination, pool_maxsize: int = 10) -> OrthancApiClient:
    """An orthanc-api-client for ``dest``'s ``url``: basic ``username``/``password`` or a bearer ``token``;
    ``pool_maxsize`` connections kept."""
    headers = {"Authorization": f"Bearer {dest.token}"} if dest.token else None
    return OrthancApiClient(dest.url.rstrip("/") + "/", user=dest.username or None, pwd=dest.password or None,
                            headers=headers, pool_maxsize=pool_maxsize)


class OrthancSender:
    """Sender for one Orthanc server (``url``; ``username``/``password`` or a bearer ``token``; ``timeout_s``;
    ``parallel`` uploads at once)."""

    def __init__(self, dest: OrthancDestination) -> None:
        self.name = dest.name
        self.url = dest.url.rstrip("/") + "/"
        self.timeout_s = dest.timeout_s
        self.parallel = dest.parallel
        self._client = client_for(dest, pool_maxsize=max(10, dest.parallel))

    def _fail(self, what: str, exc: Exception) -> DeliveryError:
        status = getattr(exc, "http_status_code", None)
        retryable = status not in _PERMANENT
        detail = http_status_text(status) if status else type(exc).__name__
        return DeliveryError(f"orthanc destination {self.name!r} ({self.url}): {what}: {detail}", retryable)

    def send(self, paths: Sequence[Path]) -> None:
        in_parallel([Path(p) for p in paths], self._upload, self.parallel, f"srnode-orthanc-{self.name}")
        log.info("orthanc destination %s: %d file(s) stored", self.name, len(paths))

    def _upload(self, path: Path) -> None:
        """POST one file to ``/instances``; raises DeliveryError."""
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise DeliveryError(f"orthanc destination {self.name!r}: cannot read {path}: {exc}",
                                retryable=False) from exc
        try:
            resp = self._client.post("instances", data=data, timeout=self.timeout_s,
                                     headers={"Content-Type": "application/dicom"})
        except exceptions.OrthancApiException as exc:
            raise self._fail(f"upload of {path.name} refused", exc) from exc
        try:
            body = resp.json() if resp.content else {}
        except ValueError as exc:  # e.g. a proxy's HTML page with 200: not Orthanc's answer, nothing is known
            raise DeliveryError(f"orthanc destination {self.name!r}: {path.name}: the answer is not Orthanc's "
                                f"JSON (HTTP {resp.status_code})", retryable=True) from exc
        status = body.get("Status", "") if isinstance(body, dict) else ""
        if status not in ("Success", "AlreadyStored"):
            raise DeliveryError(f"orthanc destination {self.name!r}: {path.name} answered "
                                f"status {status!r}", retryable=True)

    def check(self) -> None:
        try:
            self._client.get("system", timeout=min(self.timeout_s, 10.0))
        except exceptions.OrthancApiException as exc:
            raise self._fail("not reachable", exc) from exc


def create(dest: OrthancDestination) -> OrthancSender:
    """The sender of kind ``OrthancDestination.kind`` for ``dest`` (``node.send.base.make_sender``)."""
    return OrthancSender(dest)
