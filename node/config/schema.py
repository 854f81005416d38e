"""The configuration's shape: one frozen dataclass per config.toml section (loading and checks: ``load.py``).

A field is a key of its section under the same name; its type says how the TOML value is read (``load.py``
dispatches on the real types). Two field markers change that: ``FLATTEN`` (the nested dataclass's keys sit
directly in the parent table: ``[engine]`` holds ``name`` and every ``EngineOptions`` key) and ``NOT_A_KEY``
(``Config.path``, where the file was read from). Times are in seconds, sizes in MB unless the key says otherwise.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from enum import Enum, StrEnum
from pathlib import Path
from typing import Any

from models.engine import EngineOptions
from node.config.endpoints import Destination, Source
from node.errors import ConfigError

SECRET_KEYS = frozenset({"password", "token", "broker_url", "result_backend"})
FLATTEN = "srnode.flatten"  # field metadata: the nested dataclass's keys live in the parent table
NOT_A_KEY = "srnode.not_a_key"  # field metadata: not read from the file


class ExecutorKind(StrEnum):
    """Where jobs run: ``inprocess`` (one worker thread in the node) or ``celery`` (``srnode worker`` processes)."""

    INPROCESS = "inprocess"
    CELERY = "celery"


class ReceivePath(StrEnum):
    """How the SCP receives C-STOREs once an association is established (``node.ingest.lean``): ``lean`` (the
    node parses P-DATA-TF and plain C-STORE command sets itself, writes the data set straight to the spool and
    answers from a template; everything else still goes to pynetdicom) or ``pynetdicom`` (pynetdicom's DUL, state
    machine and DIMSE layers for every message)."""

    LEAN = "lean"
    PYNETDICOM = "pynetdicom"


class DataAccess(StrEnum):
    """How a Celery worker reads a series: the ``shared`` spool path or WADO-RS from the node (``dicomweb``)."""

    SHARED = "shared"
    DICOMWEB = "dicomweb"


class VolumeChoice(StrEnum):
    """Which volumes of a series holding several (time points, echoes, M/P, b-values) a rule processes."""

    ALL = "all"  # each volume its own derived series
    FIRST = "first"  # only the first (lowest time point / echo / ...); the others are named in the job notes


class UncertaintyObject(StrEnum):
    """How the engine's 1-sigma uncertainty leaves the node (``[derive] uncertainty``; ``node.derived.uncertainty``).

    Engines without an uncertainty (cubic, and every fallback to it) write no sigma object whatever this says.
    """

    PARAMETRIC_MAP = "parametric_map"  # one float multi-frame Parametric Map per derived volume (its geometry)
    SECONDARY_CAPTURE = "secondary_capture"  # one colour-mapped sigma "card" (RGB, colour bar; no geometry)
    BOTH = "both"  # the map and the card, each its own series
    NONE = "none"  # no sigma object

    @property
    def parametric_map(self) -> bool:
        return self in (UncertaintyObject.PARAMETRIC_MAP, UncertaintyObject.BOTH)

    @property
    def card(self) -> bool:
        return self in (UncertaintyObject.SECONDARY_CAPTURE, UncertaintyObject.BOTH)


@dataclass(frozen=True)
class CallerConfig:
    """One allowed calling AE: title, optional source address and the rules it may use (empty: all)."""

    ae_title: str
    host: str = ""
    rules: tuple[str, ...] = ()


@dataclass(frozen=True)
class TlsConfig:
    """``[node.tls]``: DICOM TLS on the SCP (PEM paths)."""

    enabled: bool = False
    cert: str = ""
    key: str = ""
    ca: str = ""
    require_client_cert: bool = False
    handshake_timeout_s: float = 10.0  # a connection's TLS handshake must finish within this


@dataclass(frozen=True)
class NodeConfig:
    """``[node]``: the DICOM SCP, the spool and logging."""

    ae_title: str = "SRNODE"
    host: str = "127.0.0.1"
    port: int = 11112
    spool_dir: str = "./spool"
    stable_age_s: float = 10.0
    declared_settle_s: float = 1.0  # s; a series holding the count a sender declared completes after min(this, stable_age_s)
    # True: a count every instance's ImagesInAcquisition agrees on completes the series like a sender's count (for
    # modalities that send each series as one acquisition); False: it only names what is missing (series14)
    images_in_acquisition_completes: bool = False
    min_free_mb: int = 500
    # days after a series' job ended (every delivery delivered) before its received instances and its results'
    # pixels are removed from the spool (node.store.prune); 0: kept for ever
    retention_days: float = 7.0
    prune_interval_s: float = 3600.0  # s; how often a serving node prunes (the first run this long after its start)
    max_associations: int = 32
    max_associations_per_caller: int = 8  # open at once per calling AE title + peer address; 0: no per-caller limit
    max_associations_per_address: int = 16  # open at once from one peer address, whatever AE titles; 0: no limit
    refusals_logged_per_minute: int = 60  # rejected associations / dropped connections written per address; 0: all
    idle_timeout_s: float = 60.0  # an association with no PDU for this long is aborted (pynetdicom's network timeout)
    # seconds a DIMSE message's command set, or its data set, may take from its first fragment to its last, plus
    # 1 s per 64 KiB received: a data set trickled in PDUs each inside idle_timeout_s is aborted past it
    message_timeout_s: float = 120.0
    max_pdu: int = 262144  # bytes we accept in one PDU (announced to callers); 0: pynetdicom's default (16382)
    association_timeout_s: float = 10.0  # a connection must start (and then finish) its A-ASSOCIATE-RQ within this
    receive_path: ReceivePath = ReceivePath.LEAN  # C-STORE receive path (node.ingest.lean); "pynetdicom": fall back
    log_level: str = "INFO"
    audit_log: str = ""  # default: <spool_dir>/audit.log
    max_series_memory_mb: int = 0  # memory a series may need to process (estimated from headers); 0: 3/4 of RAM
    # MB: the largest instance admitted, as received or, for the deflated transfer syntax, once inflated (a few KB
    # of deflate stream inflate to GB); larger: refused 0xA700 before its header is parsed whole
    max_instance_mb: int = 2048
    max_job_attempts: int = 3  # a job whose runs stopped the node this many times is failed as poison
    # a job whose runs a stop of the node (SIGTERM) interrupted this many times in a row is failed as poison
    max_interrupted_runs: int = 5
    require_known_callers: bool = False
    require_called_ae: bool = True  # associations calling another AE title than ae_title are rejected
    allowed_callers: tuple[CallerConfig, ...] = ()
    tls: TlsConfig = field(default_factory=TlsConfig)


@dataclass(frozen=True)
class EngineConfig:
    """``[engine]``: the default engine's ``name`` and, in the same table, every ``EngineOptions`` key."""

    name: str = "selfsup"
    options: EngineOptions = field(default_factory=EngineOptions, metadata={FLATTEN: True})


@dataclass(frozen=True)
class DeriveConfig:
    """``[derive]``: UIDs and labels of the derived series (``node.derived.labels`` says how they are made)."""

    uid_root: str = "1.2.826.0.1.3680043.10.1087."
    series_description_suffix: str = " SR"
    series_number_offset: int = 1000
    caution: str = "not for diagnosis"  # ends every derived SeriesDescription ("" = none)
    uncertainty: UncertaintyObject = UncertaintyObject.PARAMETRIC_MAP


@dataclass(frozen=True)
class HttpConfig:
    """``[http]``: health, metrics, the jobs API and STOW-RS."""

    enabled: bool = True
    host: str = "127.0.0.1"
    port: int = 8480
    token: str = ""
    allow_anonymous: bool = False  # serve without a token on an address beyond loopback (refused otherwise)
    max_body_mb: int = 2048  # largest request body (STOW-RS: the whole multipart request); above: 413
    header_timeout_s: float = 10.0  # a connection must deliver a complete request head within this; else 408
    max_connections: int = 128  # HTTP connections open at once; one beyond it gets 503 and is closed at once
    body_idle_timeout_s: float = 30.0  # longest wait for the next bytes of a request body; else 408
    body_timeout_s: float = 3600.0  # longest time to read a whole request body (0: no limit); else 408
    max_stow_parts: int = 50_000  # parts in one STOW-RS request; the next one ends it with 413 (those before kept)
    write_timeout_s: float = 60.0  # longest a response may wait for the client to take its next 48 KiB; else abort
    stow_caller: str = "STOW-RS"  # the caller identity of STOW-RS instances, for [node].allowed_callers


@dataclass(frozen=True)
class ExecutorConfig:
    """``[executor]``: where jobs run."""

    kind: ExecutorKind = ExecutorKind.INPROCESS
    broker_url: str = "redis://127.0.0.1:6379/0"
    result_backend: str = ""
    queue: str = "srnode"
    data_access: DataAccess = DataAccess.SHARED
    node_url: str = ""  # the receiving node's HTTP base URL, for data_access = "dicomweb"
    visibility_timeout_s: int = 7200


@dataclass(frozen=True)
class OutboxConfig:
    """``[outbox]``: delivery retries (delays in seconds)."""

    max_attempts: int = 8
    backoff_initial_s: float = 2.0
    backoff_max_s: float = 300.0
    confirm_timeout_s: float = 120.0  # how long a Storage Commitment report is awaited before the delivery is retried


@dataclass(frozen=True)
class RuleConfig:
    """One ``[[rules]]`` entry: which series (``match``: DICOM keyword = regex) get which factors and where."""

    name: str
    description: str = ""  # what the rule is for, in words; quoted in the reason a series is left alone
    match: Mapping[str, str] = field(default_factory=dict)
    through_plane_factor: int = 2
    in_plane_factor: int = 1
    destinations: tuple[str, ...] = ()
    engine: str = ""  # empty: [engine].name
    denoise: bool = False
    forward_originals: bool = False
    volumes: VolumeChoice = VolumeChoice.ALL  # series with several volumes: "all" or only the "first"


@dataclass(frozen=True)
class Config:
    """The whole configuration; ``path`` is the file it was read from ("" for embedded defaults)."""

    node: NodeConfig = field(default_factory=NodeConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)
    derive: DeriveConfig = field(default_factory=DeriveConfig)
    http: HttpConfig = field(default_factory=HttpConfig)
    executor: ExecutorConfig = field(default_factory=ExecutorConfig)
    outbox: OutboxConfig = field(default_factory=OutboxConfig)
    destinations: tuple[Destination, ...] = ()
    sources: tuple[Source, ...] = ()
    rules: tuple[RuleConfig, ...] = ()
    path: str = field(default="", metadata={NOT_A_KEY: True})

    @property
    def spool_path(self) -> Path:
        """The spool folder."""
        return Path(self.node.spool_dir)

    def destination(self, name: str) -> Destination:
        """The destination called ``name``; raises ConfigError when there is none."""
        for d in self.destinations:
            if d.name == name:
                return d
        raise ConfigError(f"destinations: no destination named {name!r}")

    def source(self, name: str) -> Source:
        """The source called ``name``; raises ConfigError when there is none."""
        for s in self.sources:
            if s.name == name:
                return s
        raise ConfigError(f"sources: no source named {name!r}")

    def redacted(self) -> dict[str, Any]:
        """The effective configuration as config.toml's tables (and ``path``), secrets replaced by '***'."""
        table: dict[str, Any] = _redact(as_table(self))
        return table


def kind_tag(cls: type) -> str | None:
    """The kind a dataclass names as its ClassVar ``kind`` (members of the Destination/Source unions), else None."""
    tag = getattr(cls, "kind", None)
    if isinstance(tag, Enum) and "kind" not in {f.name for f in dataclasses.fields(cls)}:
        return str(tag.value)
    return None


def as_table(obj: Any) -> Any:
    """A config dataclass as the TOML tables it is read from: ``kind`` of tagged classes first, ``FLATTEN``
    fields merged into their parent, enums as their values, tuples as lists."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        tag = kind_tag(type(obj))
        out: dict[str, Any] = {"kind": tag} if tag else {}
        for f in dataclasses.fields(obj):
            value = as_table(getattr(obj, f.name))
            if f.metadata.get(FLATTEN):
                out.update(value)
            else:
                out[f.name] = value
        return out
    if isinstance(obj, Enum):
        return obj.value
    if isinstance(obj, Mapping):
        return {k: as_table(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [as_table(v) for v in obj]
    return obj


def secret_values(cfg: Config, keys: Collection[str] = SECRET_KEYS) -> set[str]:
    """Every non-empty value of a key named in ``keys`` anywhere in ``cfg`` (for log redaction)."""
    out: set[str] = set()

    def walk(obj: Any) -> None:
        if isinstance(obj, dict):
            for k, v in obj.items():
                if k in keys and isinstance(v, str) and v:
                    out.add(v)
                else:
                    walk(v)
        elif isinstance(obj, list):
            for v in obj:
                walk(v)

    walk(as_table(cfg))
    return out


def _redact(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: ("***" if k in SECRET_KEYS and v else _redact(v)) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_redact(v) for v in obj]
    return obj
