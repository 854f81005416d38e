"""``[[destinations]]`` and ``[[sources]]``: one frozen dataclass per kind, each with only its own keys.

A table's ``kind`` picks the dataclass (``DESTINATION_TYPES`` / ``SOURCE_TYPES``, built from the ``Destination`` /
``Source`` unions); each class names its kind as the ClassVar ``kind``, so ``dest.kind`` works on every member and
``isinstance`` narrows. Fields without a default are required (and must not be empty); times are in seconds.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import ClassVar, get_args
from urllib.parse import urlsplit


class DestinationKind(StrEnum):
    """How results are delivered: C-STORE, a folder, Orthanc REST or DICOMweb STOW-RS."""

    DICOM = "dicom"
    FOLDER = "folder"
    ORTHANC = "orthanc"
    DICOMWEB = "dicomweb"


class ConfirmMethod(StrEnum):
    """How a delivery is confirmed once its files were sent (``confirm`` of a destination; ``node.send.confirm``).

    auto: the best the peer offers (DICOM: Storage Commitment, else a C-FIND count; Orthanc: its REST API;
    DICOMweb: a QIDO-RS count); commitment: Storage Commitment only (DICOM); count: a query of what the peer holds
    (C-FIND, QIDO-RS or Orthanc REST); none: delivered once the peer accepted the files, shown as not confirmed.
    """

    AUTO = "auto"
    COMMITMENT = "commitment"
    COUNT = "count"
    NONE = "none"


class SourceKind(StrEnum):
    """How series are pulled: C-MOVE/C-GET, WADO-RS or Orthanc REST."""

    DICOM = "dicom"
    DICOMWEB = "dicomweb"
    ORTHANC = "orthanc"


# ---------------------------------------------------------------------------------------------- destinations


@dataclass(frozen=True)
class DicomDestination:
    """``kind = "dicom"``: C-STORE SCU to ``ae_title@host:port``, DICOM TLS with ``tls`` (PEM paths)."""

    kind: ClassVar[DestinationKind] = DestinationKind.DICOM
    name: str
    ae_title: str  # the called AE title
    host: str
    port: int
    calling_ae_title: str = ""  # our title on the association; "": "SRNODE"
    tls: bool = False
    tls_ca: str = ""
    tls_cert: str = ""
    tls_key: str = ""
    timeout_s: float = 60.0  # ACSE, DIMSE and network timeout
    confirm: ConfirmMethod = ConfirmMethod.AUTO  # how delivery is confirmed (ConfirmMethod)
    associations: int = 4  # associations at once per delivery (1..32); a PACS stores one instance at a time on each

    @property
    def address(self) -> str:
        """``AE@host:port``, for messages."""
        return f"{self.ae_title}@{self.host}:{self.port}"


@dataclass(frozen=True)
class FolderDestination:
    """``kind = "folder"``: files written under ``path/<StudyUID>/<SeriesUID>/<SOPUID>.dcm``."""

    kind: ClassVar[DestinationKind] = DestinationKind.FOLDER
    name: str
    path: str

    @property
    def address(self) -> str:
        """The folder, for messages."""
        return self.path


@dataclass(frozen=True)
class WebEndpoint:
    """The keys every HTTP peer shares: its service root ``url`` and credentials (basic auth, or a bearer
    ``token``, preferred when both are given). Not a kind of its own: the base of the HTTP kinds below."""

    name: str
    url: str
    username: str = ""
    password: str = ""  # secret
    token: str = ""  # secret

    @property
    def address(self) -> str:
        """The URL, for messages."""
        return self.url

    @property
    def caller_host(self) -> str:
        """The URL's host, for ``[node].allowed_callers``."""
        return urlsplit(self.url).hostname or ""


@dataclass(frozen=True)
class OrthancDestination(WebEndpoint):
    """``kind = "orthanc"``: upload over Orthanc's REST API at ``url``; basic auth or a bearer ``token``."""

    kind: ClassVar[DestinationKind] = DestinationKind.ORTHANC
    timeout_s: float = 60.0  # per request
    confirm: ConfirmMethod = ConfirmMethod.AUTO  # auto/count: the series' instances counted over REST; none
    parallel: int = 4  # uploads (POST /instances) at once per delivery (1..32)


@dataclass(frozen=True)
class DicomwebDestination(WebEndpoint):
    """``kind = "dicomweb"``: STOW-RS to the service root ``url``, at most ``batch_size`` instances and ``batch_mb``
    MB (one file larger than that goes alone) per request, ``parallel`` requests at once."""

    kind: ClassVar[DestinationKind] = DestinationKind.DICOMWEB
    tls_ca: str = ""  # PEM CA bundle to verify the server
    tls_cert: str = ""  # PEM client certificate
    tls_key: str = ""
    batch_size: int = 50  # instances per STOW-RS request (1..1000)
    batch_mb: float = 64.0  # bytes per STOW-RS request, in MB (> 0)
    parallel: int = 2  # STOW-RS requests at once per delivery (1..32)
    timeout_s: float = 60.0  # per request
    confirm: ConfirmMethod = ConfirmMethod.AUTO  # auto/count: the series' instances counted by QIDO-RS; none


Destination = DicomDestination | FolderDestination | OrthancDestination | DicomwebDestination
DESTINATION_TYPES: Mapping[DestinationKind, type[Destination]] = {c.kind: c for c in get_args(Destination)}


# ---------------------------------------------------------------------------------------------- sources


@dataclass(frozen=True)
class DicomSource:
    """``kind = "dicom"``: C-MOVE (to the node's own AE) or C-GET from ``ae_title@host:port``."""

    kind: ClassVar[SourceKind] = SourceKind.DICOM
    name: str
    ae_title: str  # the called AE title; also the caller identity of what it sends
    host: str
    port: int

    @property
    def caller_host(self) -> str:
        """The address its instances come from, for ``[node].allowed_callers``."""
        return self.host


@dataclass(frozen=True)
class DicomwebSource(WebEndpoint):
    """``kind = "dicomweb"``: WADO-RS from the service root ``url``; basic auth or a bearer ``token``."""

    kind: ClassVar[SourceKind] = SourceKind.DICOMWEB
    ae_title: str = ""  # the caller identity of pulled instances ([node].allowed_callers); "": the name


@dataclass(frozen=True)
class OrthancSource(WebEndpoint):
    """``kind = "orthanc"``: Orthanc REST at ``url``; ``follow_changes`` also follows ``/changes``, every ``poll_s``."""

    kind: ClassVar[SourceKind] = SourceKind.ORTHANC
    ae_title: str = ""  # the caller identity of pulled instances ([node].allowed_callers); "": the name
    follow_changes: bool = False
    poll_s: float = 5.0  # seconds between /changes polls once the feed is read to its end


Source = DicomSource | DicomwebSource | OrthancSource
SOURCE_TYPES: Mapping[SourceKind, type[Source]] = {c.kind: c for c in get_args(Source)}
