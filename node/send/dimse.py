"""C-STORE SCU destination (kind "dicom").

One association per ``send``: for every SOP class among the files it proposes the files' own transfer
syntax and, in a second context, Explicit/Implicit VR Little Endian. A file whose compressed syntax the peer
refused is decompressed (pylibjpeg) and sent uncompressed. TLS when ``dest.tls``.
"""

from __future__ import annotations

import logging
import ssl
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.uid import UID, ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from node.config import DicomDestination
from node.dimse import STORED_STATUSES, Status, label, store_retryable
from node.errors import DeliveryError

log = logging.getLogger(__name__)

UNCOMPRESSED = (ExplicitVRLittleEndian, ImplicitVRLittleEndian)
MAX_CONTEXTS = 128


def client_ssl_context(dest: DicomDestination) -> ssl.SSLContext:
    """The TLS client context of ``dest`` (``tls_ca``, ``tls_cert``, ``tls_key``); raises OSError/SSLError on bad files."""
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=dest.tls_ca or None)
    if dest.tls_cert:
        ctx.load_cert_chain(certfile=dest.tls_cert, keyfile=dest.tls_key or None)
    return ctx


class DimseSender:
    """C-STORE SCU sender for one ``DicomDestination`` (one association per ``send``)."""

    def __init__(self, dest: DicomDestination) -> None:
        self.name = dest.name
        self.dest = dest

    def _ae(self) -> AE:
        d = self.dest
        ae = AE(ae_title=d.calling_ae_title or "SRNODE")
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = d.timeout_s
        return ae

    def _where(self) -> str:
        d = self.dest
        return f"{d.name} ({d.address}{', TLS' if d.tls else ''})"

    def _associate(self, ae: AE) -> Any:
        d = self.dest
        kwargs: dict[str, Any] = {"ae_title": d.ae_title}
        if d.tls:
            kwargs["tls_args"] = (client_ssl_context(d), d.host)
        try:
            assoc = ae.associate(d.host, d.port, **kwargs)
        except (OSError, ssl.SSLError) as exc:
            raise DeliveryError(f"destination {self._where()}: cannot connect: {exc}") from exc
        if not assoc.is_established:
            why = ("rejected" if assoc.is_rejected
                   else "aborted (peer not reachable or it dropped the connection)" if assoc.is_aborted
                   else "not established")
            raise DeliveryError(f"destination {self._where()}: association {why}")
        return assoc

    def send(self, paths: Sequence[Path]) -> None:
        if not paths:
            return
        headers: list[tuple[Path, str, str]] = []
        for p in paths:
            try:
                h = dcmread(p, stop_before_pixels=True, specific_tags=["SOPClassUID"])
            except Exception as exc:  # noqa: BLE001 - pydicom raises many types on a broken file
                raise DeliveryError(f"{p}: not a readable DICOM file: {exc}", retryable=False) from exc
            meta = h.file_meta
            sop_class = str(meta.get("MediaStorageSOPClassUID", "") or h.get("SOPClassUID", ""))
            headers.append((Path(p), sop_class, str(meta.get("TransferSyntaxUID", ExplicitVRLittleEndian))))
        ae = self._ae()
        for sop_class in sorted({h[1] for h in headers}):
            own = sorted({h[2] for h in headers if h[1] == sop_class and h[2] not in UNCOMPRESSED})
            for ts in own:
                ae.add_requested_context(sop_class, ts)
            ae.add_requested_context(sop_class, list(UNCOMPRESSED))
        if len(ae.requested_contexts) > MAX_CONTEXTS:  # pragma: no cover - > 60 SOP classes in one job
            raise DeliveryError(f"destination {self._where()}: too many SOP classes for one association",
                                retryable=False)
        assoc = self._associate(ae)
        try:
            accepted = {(str(cx.abstract_syntax), str(cx.transfer_syntax[0])) for cx in assoc.accepted_contexts}
            for path, sop_class, ts in headers:
                self._send_one(assoc, accepted, path, sop_class, ts)
        finally:
            if assoc.is_established:
                assoc.release()

    def _send_one(self, assoc: Any, accepted: set[tuple[str, str]], path: Path, sop_class: str, ts: str) -> None:
        if not any(a[0] == sop_class for a in accepted):
            raise DeliveryError(f"destination {self._where()}: refused SOP class {UID(sop_class).name} "
                                f"({path.name})", retryable=False)
        try:
            ds: Dataset = dcmread(path)
            if (sop_class, ts) not in accepted and ts not in UNCOMPRESSED:
                ds.decompress()  # the peer refused the compressed syntax: send it uncompressed
        except Exception as exc:  # noqa: BLE001 - pydicom/pylibjpeg errors
            raise DeliveryError(f"{path}: cannot be read or transcoded for {self._where()}: {exc}",
                                retryable=False) from exc
        try:
            rsp = assoc.send_c_store(ds)
        except Exception as exc:  # noqa: BLE001 - pynetdicom raises on encoding/context problems
            raise DeliveryError(f"destination {self._where()}: C-STORE of {path.name} failed: {exc}") from exc
        status = int(rsp.get("Status", -1)) if rsp is not None and len(rsp) else -1
        if status == -1:
            raise DeliveryError(f"destination {self._where()}: no C-STORE response for {path.name} "
                                "(connection lost or timed out)")
        if status not in STORED_STATUSES:
            raise DeliveryError(f"destination {self._where()}: C-STORE of {path.name} answered {label(status)}",
                                retryable=store_retryable(status))

    def check(self) -> None:
        ae = self._ae()
        ae.add_requested_context(Verification)
        assoc = self._associate(ae)
        try:
            rsp = assoc.send_c_echo()
            if rsp is None or int(rsp.get("Status", -1)) != Status.SUCCESS:
                raise DeliveryError(f"destination {self._where()}: C-ECHO failed")
        finally:
            if assoc.is_established:
                assoc.release()


def create(dest: DicomDestination) -> DimseSender:
    """The sender of kind ``DicomDestination.kind`` for ``dest`` (``node.send.base.make_sender``)."""
    return DimseSender(dest)
