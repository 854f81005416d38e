"""Pull by UID: retrieve a study/series from a configured ``[[sources]]`` entry into the spool.

``srnode fetch --study UID [--series UID] --from NAME`` and ``POST /jobs`` both call :func:`fetch`.
Instances go into the spool like any received ones (``node.ingest``), so the normal stable → job path
processes them.

- kind ``dicom``: C-MOVE (default) with the node's own AE as move destination — the PACS sends the instances to the
  running node's SCP, so the PACS must know the node's AE title, host and port; or C-GET (``--method get``), where
  this process receives the instances on the same association and spools them itself.
- kind ``dicomweb``: WADO-RS (dicomweb-client) from ``url`` (the DICOMweb service root).
- kind ``orthanc``: Orthanc REST (``/tools/find`` + ``/instances/{id}/file``, byte-exact) from ``url``; with
  ``follow_changes = true`` a :class:`ChangesFollower` also pulls every StableSeries from ``/changes``.
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pydicom
from pydicom.dataset import Dataset

from node.config import Config, SourceConfig, load_config
from node.errors import ConfigError, DeliveryError, IngestError, NodeError

log = logging.getLogger(__name__)

# sink(data, source_name) spools one DICOM file; raises IngestError when refused
Sink = Callable[[bytes, str], Any]
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


def fetch(cfg: Config, source_name: str, study: str, series: str = "", *, sink: Sink,
          method: str = "") -> FetchResult:
    """Retrieve ``study`` (or one ``series`` of it) from source ``source_name`` into the spool via ``sink``."""
    src = cfg.source(source_name)
    if not study:
        raise ConfigError("fetch: a StudyInstanceUID is required")
    if src.kind == "dicom":
        method = method or "move"
        if method not in METHODS:
            raise ConfigError(f"fetch: method {method!r} is not one of {', '.join(METHODS)}")
        result = FetchResult(src.name, f"c-{method}", study, series)
        _dimse(cfg, src, result, sink, method)
    elif src.kind == "dicomweb":
        result = FetchResult(src.name, "wado-rs", study, series)
        _feed(result, sink, _wado(src, study, series))
    else:
        result = FetchResult(src.name, "orthanc-rest", study, series)
        with _orthanc_client(src) as client:
            _feed(result, sink, _orthanc_files(client, src, study, series))
    log.info("fetch from %s (%s): %d spooled, %d moved, %d refused", src.name, result.method,
             result.received, result.moved, len(result.refused))
    return result


def _feed(result: FetchResult, sink: Sink, files: Iterator[bytes]) -> None:
    for data in files:
        try:
            sink(data, result.source)
            result.received += 1
        except IngestError as exc:
            result.refused.append(str(exc))


def spool_sink(cfg: Config, *, spool: Any = None, index: Any = None, metrics: Any = None) -> Callable[..., Any]:
    """A Sink that stores one DICOM file exactly as the C-STORE SCP does (header check, spool, index).

    ``sink(data, source, calling_ae="", remote="")``; raises IngestError with the DIMSE status when refused.
    Opens the spool and index of ``cfg`` when not given (``srnode fetch`` beside a running node: the index is
    safe across processes).
    """
    import tempfile

    from node.index import Index, Instance
    from node.ingest.scp import STORAGE_SOP_CLASSES, read_header
    from node.spool import Spool

    sp = spool if spool is not None else Spool(cfg.node.spool_dir, cfg.node.min_free_mb)
    ix = index if index is not None else Index(sp.index_path)

    def sink(data: bytes, source: str, calling_ae: str = "", remote: str = "") -> Any:
        status = "0x0000"
        try:
            sp.check_space()
            fd, tmp = tempfile.mkstemp(prefix="rx-", suffix=".dcm", dir=sp.incoming)
            try:
                with open(fd, "wb") as out:
                    out.write(data)
                meta = pydicom.dcmread(tmp, stop_before_pixels=True).file_meta
                sop_class = str(meta.get("MediaStorageSOPClassUID", "") or "")
                if sop_class not in STORAGE_SOP_CLASSES:
                    raise IngestError(f"SOP class {sop_class!r} is not a storage SOP class", 0x0122)
                header = read_header(Path(tmp), sop_class)
                stored = sp.store_file(Path(tmp), header.study_uid, header.series_uid, header.sop_uid)
            except (pydicom.errors.InvalidDicomError, OSError, ValueError) as exc:
                raise IngestError(f"file from {source} cannot be parsed: {exc}", 0xC210) from exc
            finally:
                Path(tmp).unlink(missing_ok=True)
            inst = Instance(sop_uid=header.sop_uid, series_uid=header.series_uid, study_uid=header.study_uid,
                            sop_class=sop_class, transfer_syntax=str(meta.get("TransferSyntaxUID", "")),
                            path=str(stored.path), calling_ae=calling_ae or source, allowed_rules="")
            if not ix.add_instance(inst, header.modality, stored.path.stat().st_size):
                log.info("duplicate instance %s of series %s from %s: kept the copy already stored",
                         header.sop_uid, header.series_uid, source)
            return stored
        except IngestError as exc:
            status = f"0x{exc.status:04X}"
            if metrics is not None:
                metrics.failures.labels(where="ingest", reason=status).inc()
            raise
        finally:
            if metrics is not None:
                metrics.instances_received.labels(status=status).inc()

    return sink


# ------------------------------------------------------------------------------------------ DIMSE


def _query(study: str, series: str) -> Dataset:
    ds = Dataset()
    ds.QueryRetrieveLevel = "SERIES" if series else "STUDY"
    ds.StudyInstanceUID = study
    if series:
        ds.SeriesInstanceUID = series
    return ds


def _dimse(cfg: Config, src: SourceConfig, result: FetchResult, sink: Sink, method: str) -> None:
    from pynetdicom import AE, build_role, evt
    from pynetdicom.presentation import StoragePresentationContexts
    from pynetdicom.sop_class import (  # type: ignore[attr-defined]
        StudyRootQueryRetrieveInformationModelGet,
        StudyRootQueryRetrieveInformationModelMove,
    )

    if not (src.ae_title and src.host and src.port):
        raise ConfigError(f"sources {src.name!r}: kind 'dicom' needs ae_title, host and port")
    ae = AE(ae_title=cfg.node.ae_title)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 60
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

        def on_store(event: Any) -> int:
            try:
                sink(event.encoded_dataset(), src.name)
                result.received += 1
                return 0x0000
            except IngestError as exc:
                result.refused.append(str(exc))
                return exc.status

        handlers = [(evt.EVT_C_STORE, on_store)]
    assoc = ae.associate(src.host, src.port, ae_title=src.ae_title, ext_neg=roles, evt_handlers=handlers)
    if not assoc.is_established:
        raise FetchError(f"source {src.name!r}: association with {src.ae_title}@{src.host}:{src.port} "
                         "was rejected or not answered")
    try:
        query = _query(result.study, result.series)
        responses = (assoc.send_c_move(query, cfg.node.ae_title, model) if method == "move"
                     else assoc.send_c_get(query, model))
        last = 0xFFFF
        for status, _identifier in responses:
            if status is None or "Status" not in status:
                raise FetchError(f"source {src.name!r}: C-{method.upper()} got no answer (timeout or abort)")
            last = int(status.Status)
            if last == 0x0000 and method == "move":
                result.moved = int(getattr(status, "NumberOfCompletedSuboperations", 0) or 0)
            if last not in (0x0000, 0xFF00, 0xFF01):
                failed = int(getattr(status, "NumberOfFailedSuboperations", 0) or 0)
                raise FetchError(f"source {src.name!r}: C-{method.upper()} ended with status 0x{last:04X}"
                                 f" ({failed} sub-operation(s) failed; is {cfg.node.ae_title} known to the PACS?)",
                                 retryable=last in (0xA701, 0xA702))
    finally:
        assoc.release()


# ------------------------------------------------------------------------------------------ DICOMweb


def _wado(src: SourceConfig, study: str, series: str) -> Iterator[bytes]:
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
                         f"{f'HTTP {status}' if status else type(exc).__name__}",
                         retryable=status not in (400, 401, 403, 404)) from exc


# ------------------------------------------------------------------------------------------ Orthanc REST


def _orthanc_client(src: SourceConfig) -> httpx.Client:
    if not src.url:
        raise ConfigError(f"sources {src.name!r}: kind {src.kind!r} needs a url")
    auth = (src.username, src.password) if src.username else None
    headers = {"Authorization": f"Bearer {src.token}"} if src.token else {}
    return httpx.Client(base_url=src.url.rstrip("/"), auth=auth, headers=headers, timeout=120)


def _orthanc_call(src: SourceConfig, what: str, fn: Callable[[], httpx.Response]) -> httpx.Response:
    try:
        r = fn()
        r.raise_for_status()
        return r
    except httpx.HTTPStatusError as exc:
        code = exc.response.status_code
        raise FetchError(f"source {src.name!r}: {what}: HTTP {code}", retryable=code >= 500) from exc
    except httpx.HTTPError as exc:
        raise FetchError(f"source {src.name!r}: {what}: {type(exc).__name__}") from exc


def _orthanc_files(client: httpx.Client, src: SourceConfig, study: str, series: str) -> Iterator[bytes]:
    query = {"StudyInstanceUID": study, **({"SeriesInstanceUID": series} if series else {})}
    found = _orthanc_call(src, "find", lambda: client.post("/tools/find", json={
        "Level": "Series", "Query": query})).json()
    if not found:
        raise FetchError(f"source {src.name!r}: no series for study {study}" + (f" series {series}" if series
                         else ""), retryable=False)
    for series_id in found:
        yield from _orthanc_series_files(client, src, series_id)


def _orthanc_series_files(client: httpx.Client, src: SourceConfig, series_id: str) -> Iterator[bytes]:
    instances = _orthanc_call(src, f"series {series_id}", lambda: client.get(f"/series/{series_id}")).json()
    for inst in instances.get("Instances", []):
        url = f"/instances/{inst}/file"
        yield _orthanc_call(src, f"instance {inst}", lambda u=url: client.get(u)).content  # type: ignore[misc]


def is_own_output(ds: Dataset, suffix: str) -> bool:
    """srnode's derived / uncertainty output (never pulled back in)."""
    if "DERIVED" in [str(v).upper() for v in (ds.get("ImageType") or [])]:
        return True
    if suffix and str(ds.get("SeriesDescription", "")).endswith(suffix):
        return True
    return any(str(item.get("Manufacturer", "")).strip().lower() == "srnode"
               for item in (ds.get("ContributingEquipmentSequence") or []))


class ChangesFollower:
    """Follow an Orthanc ``/changes`` feed; every StableSeries is pulled over REST into the spool.

    The last change seen is kept in ``<spool>/changes-<source>.json`` so a restart neither misses nor repeats.
    """

    def __init__(self, cfg: Config, src: SourceConfig, sink: Sink) -> None:
        self.cfg, self.src, self.sink = cfg, src, sink
        self.state_path = Path(cfg.node.spool_dir) / f"changes-{src.name}.json"
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name=f"changes-{src.name}", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def _since(self, client: httpx.Client) -> int:
        try:
            return int(json.loads(self.state_path.read_text())["since"])
        except (OSError, ValueError, KeyError):
            # first start: begin at the end of the feed (do not pull the whole archive)
            last = _orthanc_call(self.src, "changes", lambda: client.get("/changes", params={"last": ""})).json()
            return int(last.get("Last", 0))

    def _save(self, since: int) -> None:
        tmp = self.state_path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"since": since}))
        tmp.replace(self.state_path)

    def _loop(self) -> None:
        since: int | None = None
        with _orthanc_client(self.src) as client:
            while not self._stop.is_set():
                try:
                    if since is None:
                        since = self._since(client)
                    params = {"since": since, "limit": 100}
                    page = _orthanc_call(self.src, "changes", lambda p=params: client.get(  # type: ignore[misc]
                        "/changes", params=p)).json()
                    for change in page.get("Changes", []):
                        if change.get("ChangeType") == "StableSeries":
                            self._pull(client, change["ID"])
                        since = int(change["Seq"])
                        self._save(since)
                    if page.get("Done", True):
                        self._stop.wait(self.src.poll_s)
                except (NodeError, OSError, ValueError) as exc:
                    log.warning("changes follower %s: %s; retrying in %.0f s", self.src.name, exc,
                                self.src.poll_s)
                    self._stop.wait(self.src.poll_s)

    def _pull(self, client: httpx.Client, series_id: str) -> None:
        files = _orthanc_series_files(client, self.src, series_id)
        first = next(files, None)
        if first is None:
            return
        if is_own_output(pydicom.dcmread(io.BytesIO(first), stop_before_pixels=True),
                         self.cfg.derive.series_description_suffix):
            log.info("changes follower %s: series %s is srnode output, left alone", self.src.name, series_id)
            return
        n = 0
        for data in (first, *files):
            try:
                self.sink(data, self.src.name)
                n += 1
            except IngestError as exc:
                log.warning("changes follower %s: instance of series %s refused: %s", self.src.name,
                            series_id, exc)
        log.info("changes follower %s: series %s pulled, %d instance(s)", self.src.name, series_id, n)


def start_followers(cfg: Config, sink: Sink) -> list[ChangesFollower]:
    """Start a follower for every ``kind = "orthanc"`` source with ``follow_changes = true``."""
    out = []
    for src in cfg.sources:
        if src.kind == "orthanc" and src.follow_changes:
            f = ChangesFollower(cfg, src, sink)
            f.start()
            out.append(f)
    return out


# ------------------------------------------------------------------------------------------ CLI


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--study", required=True, help="StudyInstanceUID to retrieve")
    parser.add_argument("--series", default="", help="SeriesInstanceUID (default: every series of the study)")
    parser.add_argument("--from", dest="source", required=True, help="name of a [[sources]] entry")
    parser.add_argument("--method", choices=METHODS, default="",
                        help="for kind 'dicom': C-MOVE to the running node (default) or C-GET into the spool")
    parser.add_argument("--config", default=None, help="config.toml (default: embedded defaults)")


def run(args: argparse.Namespace) -> int:
    cfg = load_config(args.config)
    result = fetch(cfg, args.source, args.study, args.series, sink=spool_sink(cfg), method=args.method)
    print(json.dumps(result.as_dict(), indent=2))
    return 0 if not result.refused else 1
