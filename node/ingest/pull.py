"""Pull by UID: retrieve a study/series from a configured ``[[sources]]`` entry into the spool.

``srnode fetch --study UID [--series UID] --from NAME`` and ``POST /jobs`` both call :func:`fetch`.
Instances go into the spool through the same admission as received ones (``node.ingest.admit``), so the normal
stable → job path processes them.

- kind ``dicom``: C-MOVE (default) with the node's own AE as move destination — the PACS sends the instances to the
  running node's SCP, so the PACS must know the node's AE title, host and port; or C-GET (``--method get``), where
  this process receives the instances on the same association and spools them itself.
- kind ``dicomweb``: WADO-RS (dicomweb-client) from ``url`` (the DICOMweb service root).
- kind ``orthanc``: Orthanc REST (``/tools/find`` + ``/instances/{id}/file``, byte-exact) from ``url``; with
  ``follow_changes = true`` a ``node.ingest.follower.ChangesFollower`` also pulls every StableSeries from
  ``/changes``.
"""

from __future__ import annotations

import io
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import httpx
from pydicom.dataset import Dataset

from node.config import Config, DicomSource, DicomwebSource, OrthancSource, Source
from node.dimse import (
    PENDING_STATUSES,
    RETRIEVE_RETRYABLE_STATUSES,
    Status,
    assoc_no_delay,
    label,
    max_pdu_problem,
)
from node.errors import ConfigError, DeliveryError, IngestError, http_status_text
from node.ingest.admit import Admission, Caller
from node.store import valid_uid

log = logging.getLogger(__name__)

METHODS = ("move", "get")


class FetchError(DeliveryError):
    """A source refused or could not be reached (``retryable`` as for deliveries)."""


@dataclass
class FetchResult:
    source: str
    method: str
    study: str
    series: str
    received: int = 0  # instances spooled by this process (C-GET, WADO-RS, REST)
    moved: int = 0  # instances the PACS reported sent by C-MOVE (they arrive through the node's SCP)
    refused: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {"source": self.source, "method": self.method, "study": self.study, "series": self.series,
                "received": self.received, "moved": self.moved, "refused": self.refused}


def source_caller(src: Source, via: str) -> Caller:
    """The caller identity of instances pulled from ``src``: its ``ae_title`` (else its name) and host."""
    return Caller(src.ae_title or src.name, src.caller_host, via)


def fetch(cfg: Config, source_name: str, study: str, series: str = "", *, admission: Admission,
          method: str = "") -> FetchResult:
    """Retrieve ``study`` (or one ``series`` of it) from source ``source_name`` into the spool.

    Every instance enters through ``admission`` with the source as its caller (``[node].allowed_callers``
    applies as for C-STORE). A pull of one ``series`` that ended well with nothing refused declares the series'
    size (C-MOVE: the final response's NumberOfCompletedSuboperations; else the instances received), so the
    series completes after ``[node] declared_settle_s`` rather than the quiet period (``Admission.declare``).
    Raises ConfigError for an unknown source or method, or a ``study`` / ``series`` that is not a UID (a wildcard
    would reach the source as one), FetchError when the source refuses or cannot be
    reached; refused instances are listed in the result.
    """
    src = cfg.source(source_name)
    if not study:
        raise ConfigError("fetch: a StudyInstanceUID is required")
    for what, uid in (("StudyInstanceUID", study), ("SeriesInstanceUID", series)):
        if uid and not valid_uid(uid):  # never a wildcard, a path or a list to the source (it may match them)
            raise ConfigError(f"fetch: the {what} {uid[:70]!r} is not a UID (digits and dots, at most 64)")
    if isinstance(src, DicomSource):
        method = method or "move"
        if method not in METHODS:
            raise ConfigError(f"fetch: method {method!r} is not one of {', '.join(METHODS)}")
        result = FetchResult(src.name, f"c-{method}", study, series)
        _dimse(cfg, src, result, admission, method)
    elif isinstance(src, DicomwebSource):
        result = FetchResult(src.name, "wado-rs", study, series)
        _feed(result, admission, source_caller(src, "wado-rs"), _wado(src, study, series))
    else:
        result = FetchResult(src.name, "orthanc-rest", study, series)
        with orthanc_client(src) as client:
            _feed(result, admission, source_caller(src, "orthanc-rest"), _orthanc_files(client, src, study, series))
    log.info("fetch from %s (%s): %d spooled, %d moved, %d refused", src.name, result.method,
             result.received, result.moved, len(result.refused))
    sent = result.moved if result.method == "c-move" else result.received
    if series and sent > 0 and not result.refused:
        admission.declare(study, series, sent, f"{result.method} from {src.name}")
    return result


def _feed(result: FetchResult, admission: Admission, caller: Caller, files: Iterator[bytes]) -> None:
    for data in files:
        try:
            admission.admit_bytes(data, caller)
            result.received += 1
        except IngestError as exc:
            result.refused.append(str(exc))


# ------------------------------------------------------------------------------------------ DIMSE


def _query(study: str, series: str) -> Dataset:
    ds = Dataset()
    ds.QueryRetrieveLevel = "SERIES" if series else "STUDY"
    ds.StudyInstanceUID = study
    if series:
        ds.SeriesInstanceUID = series
    return ds


def _dimse(cfg: Config, src: DicomSource, result: FetchResult, admission: Admission, method: str) -> None:
    from pynetdicom import AE, build_role, evt
    from pynetdicom.presentation import StoragePresentationContexts
    from pynetdicom.sop_class import (  # type: ignore[attr-defined]
        StudyRootQueryRetrieveInformationModelGet,
        StudyRootQueryRetrieveInformationModelMove,
    )

    ae = AE(ae_title=cfg.node.ae_title)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 60
    ae.connection_timeout = 60  # the TCP connection and its TLS handshake (node.send.dimse)
    handlers: list[Any] = []
    roles: list[Any] = []
    if method == "move":
        ae.add_requested_context(StudyRootQueryRetrieveInformationModelMove)
        model = StudyRootQueryRetrieveInformationModelMove
    else:
        ae.add_requested_context(StudyRootQueryRetrieveInformationModelGet)
        for ctx in StoragePresentationContexts[:120]:
            syntax = str(ctx.abstract_syntax)
            ae.add_requested_context(syntax)
            roles.append(build_role(syntax, scp_role=True))
        model = StudyRootQueryRetrieveInformationModelGet

        caller = source_caller(src, "c-get")

        def on_store(event: Any) -> int:
            try:
                admission.admit_bytes(event.encoded_dataset(), caller)
                result.received += 1
                return Status.SUCCESS
            except IngestError as exc:
                result.refused.append(str(exc))
                return exc.status

        handlers = [(evt.EVT_C_STORE, on_store)]
    assoc = ae.associate(src.host, src.port, ae_title=src.ae_title, ext_neg=roles, evt_handlers=handlers)
    if not assoc.is_established:
        raise FetchError(f"source {src.name!r}: association with {src.ae_title}@{src.host}:{src.port} "
                         "was rejected or not answered")
    too_small = max_pdu_problem(assoc.acceptor.maximum_length)  # no request could be sent within it
    if too_small is not None:
        assoc.abort()
        raise FetchError(f"source {src.name!r}: association with {src.ae_title}@{src.host}:{src.port} aborted: "
                         f"{too_small}", retryable=False)
    assoc_no_delay(assoc)
    try:
        query = _query(result.study, result.series)
        responses = (assoc.send_c_move(query, cfg.node.ae_title, model) if method == "move"
                     else assoc.send_c_get(query, model))
        for status, _identifier in responses:
            if status is None or "Status" not in status:
                raise FetchError(f"source {src.name!r}: C-{method.upper()} got no answer (timeout or abort)")
            last = int(status.Status)
            if last == Status.SUCCESS and method == "move":
                result.moved = int(getattr(status, "NumberOfCompletedSuboperations", 0) or 0)
            if last != Status.SUCCESS and last not in PENDING_STATUSES:
                failed = int(getattr(status, "NumberOfFailedSuboperations", 0) or 0)
                raise FetchError(f"source {src.name!r}: C-{method.upper()} ended with status {label(last)}"
                                 f" ({failed} sub-operation(s) failed; is {cfg.node.ae_title} known to the PACS?)",
                                 retryable=last in RETRIEVE_RETRYABLE_STATUSES)
    finally:
        assoc.release()


# ------------------------------------------------------------------------------------------ DICOMweb


def _wado(src: DicomwebSource, study: str, series: str) -> Iterator[bytes]:
    import requests
    from dicomweb_client import DICOMwebClient
    from dicomweb_client.session_utils import create_session, create_session_from_user_pass

    session = (create_session_from_user_pass(src.username, src.password) if src.username and not src.token
               else create_session())
    headers = {"Authorization": f"Bearer {src.token}"} if src.token else None
    client = DICOMwebClient(src.url.rstrip("/"), session=session, headers=headers, timeout=120)
    try:
        datasets = client.iter_series(study, series) if series else client.iter_study(study)
        for ds in datasets:
            buf = io.BytesIO()
            ds.save_as(buf, enforce_file_format=True)
            yield buf.getvalue()
    except requests.RequestException as exc:
        status = getattr(getattr(exc, "response", None), "status_code", None)
        raise FetchError(f"source {src.name!r}: WADO-RS from {src.url} failed: "
                         f"{http_status_text(status) if status else type(exc).__name__}",
                         retryable=status not in (400, 401, 403, 404)) from exc


# ------------------------------------------------------------------------------------------ Orthanc REST


def orthanc_client(src: OrthancSource) -> httpx.Client:
    """An HTTP client for ``src``'s REST API (basic auth or bearer token, 120 s timeout)."""
    auth = (src.username, src.password) if src.username else None
    headers = {"Authorization": f"Bearer {src.token}"} if src.token else {}
    return httpx.Client(base_url=src.url.rstrip("/"), auth=auth, headers=headers, timeout=120)


def orthanc_call(src: OrthancSource, what: str, fn: Callable[[], httpx.Response]) -> httpx.Response:
    """``fn()``'s response; raises FetchError naming ``src`` and ``what`` (retryable for 5xx and transport errors)."""
    try:
        r = fn()
        r.raise_for_status()
        return r
    except httpx.HTTPStatusError as exc:
        code = exc.response.status_code
        if 300 <= code < 400:  # not followed: the credentials stay with the configured host
            where = " ".join(exc.response.headers.get("Location", "?").split())[:200]
            raise FetchError(f"source {src.name!r}: {what}: HTTP {code}, redirected to {where}: give the address it "
                             "names as url", retryable=False) from exc
        raise FetchError(f"source {src.name!r}: {what}: {http_status_text(code)}", retryable=code >= 500) from exc
    except httpx.HTTPError as exc:
        raise FetchError(f"source {src.name!r}: {what}: {type(exc).__name__}") from exc


def orthanc_ids(src: OrthancSource, what: str, r: httpx.Response, key: str = "") -> list[str]:
    """The list of Orthanc ids in ``r``'s JSON (``key``: in that key of an object); FetchError naming ``what``
    when the answer is not JSON of that shape (a proxy's page, another server): never guessed from."""
    try:
        doc = r.json()
    except ValueError:
        doc = None
    ids = (doc.get(key) if isinstance(doc, dict) else None) if key else doc
    if not isinstance(ids, list) or not all(isinstance(i, str) and i for i in ids):
        got = type(doc).__name__ if doc is not None else "no JSON"
        raise FetchError(f"source {src.name!r}: {what}: answered JSON that is not Orthanc's (expected "
                         f"{f'an object with {key!r}' if key else 'a list'} of ids, got {got})")
    return ids


def _orthanc_files(client: httpx.Client, src: OrthancSource, study: str, series: str) -> Iterator[bytes]:
    query = {"StudyInstanceUID": study, **({"SeriesInstanceUID": series} if series else {})}
    found = orthanc_ids(src, "find", orthanc_call(src, "find", lambda: client.post("/tools/find", json={
        "Level": "Series", "Query": query})))
    if not found:
        raise FetchError(f"source {src.name!r}: no series for study {study}" + (f" series {series}" if series
                         else ""), retryable=False)
    for series_id in found:
        yield from orthanc_series_files(client, src, series_id)


def orthanc_series_files(client: httpx.Client, src: OrthancSource, series_id: str) -> Iterator[bytes]:
    """The files of Orthanc series ``series_id``, byte-exact; raises FetchError."""
    instances = orthanc_ids(src, f"series {series_id}", orthanc_call(
        src, f"series {series_id}", lambda: client.get(f"/series/{series_id}")), "Instances")
    for inst in instances:
        url = f"/instances/{inst}/file"
        yield orthanc_call(src, f"instance {inst}", lambda u=url: client.get(u)).content  # type: ignore[misc]
