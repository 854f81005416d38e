"""Typed configuration: frozen dataclasses loaded from config.toml with tomllib.

Every key is validated at load; an error names the key (``rules[1].through_plane_factor``) and the reason.
Secrets may be given as ``"env:VARNAME"`` and are resolved from the environment at load; ``redacted()``
gives the effective configuration with every secret replaced, for logging.
"""

from __future__ import annotations

import dataclasses
import os
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from node.errors import ConfigError

SECRET_KEYS = frozenset({"password", "token", "broker_url", "result_backend"})
DESTINATION_KINDS = ("dicom", "folder", "orthanc", "dicomweb")
SOURCE_KINDS = ("dicom", "dicomweb", "orthanc")
ENGINE_DEVICES = ("auto", "cpu", "cuda")


@dataclass(frozen=True)
class CallerConfig:
    """One allowed calling AE: title, optional source address and the rules it may use (empty: all)."""

    ae_title: str
    host: str = ""
    rules: tuple[str, ...] = ()


@dataclass(frozen=True)
class TlsConfig:
    enabled: bool = False
    cert: str = ""
    key: str = ""
    ca: str = ""
    require_client_cert: bool = False


@dataclass(frozen=True)
class NodeConfig:
    ae_title: str = "SRNODE"
    host: str = "127.0.0.1"
    port: int = 11112
    spool_dir: str = "./spool"
    stable_age_s: float = 10.0
    min_free_mb: int = 500
    max_associations: int = 32
    max_pdu: int = 0
    log_level: str = "INFO"
    audit_log: str = ""  # default: <spool_dir>/audit.log
    require_known_callers: bool = False
    allowed_callers: tuple[CallerConfig, ...] = ()
    tls: TlsConfig = field(default_factory=TlsConfig)


@dataclass(frozen=True)
class EngineConfig:
    name: str = "selfsup"
    device: str = "auto"
    fast: bool = False
    finetune_steps: int = 200
    in_plane_finetune_steps: int = 0  # selfsup in-plane (ZSSR) steps; < 0: finetune_steps
    tta_passes: int = 8
    samples: int = 8
    weights: str = ""  # default: the shipped prior in models/weights
    seed: int = 0
    min_gain_db: float = 0.3
    max_voxels_per_tile: int = 0  # 0: sized from free memory


@dataclass(frozen=True)
class DeriveConfig:
    uid_root: str = "1.2.826.0.1.3680043.10.1087."
    series_description_suffix: str = " SR"
    series_number_offset: int = 1000
    uncertainty: bool = True


@dataclass(frozen=True)
class HttpConfig:
    enabled: bool = True
    host: str = "127.0.0.1"
    port: int = 8480
    token: str = ""
    stow_caller: str = "STOW-RS"  # the caller identity of STOW-RS instances, for [node].allowed_callers


@dataclass(frozen=True)
class ExecutorConfig:
    kind: str = "inprocess"
    broker_url: str = "redis://127.0.0.1:6379/0"
    result_backend: str = ""
    queue: str = "srnode"
    data_access: str = "shared"  # "shared" spool path or "dicomweb" from the receiving node
    node_url: str = ""  # the receiving node's HTTP base URL, for data_access = "dicomweb"
    visibility_timeout_s: int = 7200


@dataclass(frozen=True)
class OutboxConfig:
    max_attempts: int = 8
    backoff_initial_s: float = 2.0
    backoff_max_s: float = 300.0


@dataclass(frozen=True)
class DestinationConfig:
    name: str
    kind: str
    ae_title: str = ""
    host: str = ""
    port: int = 0
    path: str = ""
    url: str = ""
    username: str = ""
    password: str = ""
    token: str = ""
    tls: bool = False
    tls_ca: str = ""
    tls_cert: str = ""
    tls_key: str = ""
    calling_ae_title: str = ""
    batch_size: int = 50
    timeout_s: float = 60.0


@dataclass(frozen=True)
class SourceConfig:
    name: str
    kind: str
    ae_title: str = ""
    host: str = ""
    port: int = 0
    url: str = ""
    username: str = ""
    password: str = ""
    token: str = ""
    follow_changes: bool = False
    poll_s: float = 5.0


@dataclass(frozen=True)
class RuleConfig:
    name: str
    match: Mapping[str, str] = field(default_factory=dict)
    through_plane_factor: int = 2
    in_plane_factor: int = 1
    destinations: tuple[str, ...] = ()
    engine: str = ""  # empty: [engine].name
    denoise: bool = False
    forward_originals: bool = False


@dataclass(frozen=True)
class Config:
    node: NodeConfig = field(default_factory=NodeConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)
    derive: DeriveConfig = field(default_factory=DeriveConfig)
    http: HttpConfig = field(default_factory=HttpConfig)
    executor: ExecutorConfig = field(default_factory=ExecutorConfig)
    outbox: OutboxConfig = field(default_factory=OutboxConfig)
    destinations: tuple[DestinationConfig, ...] = ()
    sources: tuple[SourceConfig, ...] = ()
    rules: tuple[RuleConfig, ...] = ()
    path: str = ""

    @property
    def spool_path(self) -> Path:
        return Path(self.node.spool_dir)

    def destination(self, name: str) -> DestinationConfig:
        for d in self.destinations:
            if d.name == name:
                return d
        raise ConfigError(f"destinations: no destination named {name!r}")

    def source(self, name: str) -> SourceConfig:
        for s in self.sources:
            if s.name == name:
                return s
        raise ConfigError(f"sources: no source named {name!r}")

    def redacted(self) -> dict[str, Any]:
        """The effective configuration as a dict, secrets replaced by '***'."""
        return _redact(dataclasses.asdict(self))


def _redact(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: ("***" if k in SECRET_KEYS and v else _redact(v)) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_redact(v) for v in obj]
    return obj


# ---------------------------------------------------------------------------------------------- loading


def _resolve_secret(value: Any, where: str) -> Any:
    if isinstance(value, str) and value.startswith("env:"):
        var = value[4:]
        if var not in os.environ:
            raise ConfigError(f"{where}: environment variable {var!r} is not set")
        return os.environ[var]
    return value


def _build(cls: type, data: Any, where: str) -> Any:
    """Build dataclass ``cls`` from a TOML table, checking unknown keys and types; errors name the key."""
    if not isinstance(data, Mapping):
        raise ConfigError(f"{where}: expected a table, got {type(data).__name__}")
    # Config.path is where the file was read from, not a key; DestinationConfig.path is a real key
    fields = {f.name: f for f in dataclasses.fields(cls) if not (cls is Config and f.name == "path")}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {', '.join(unknown)}; known: {', '.join(sorted(fields))}")
    kwargs: dict[str, Any] = {}
    for name, f in fields.items():
        key = f"{where}.{name}" if where else name
        if name not in data:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise ConfigError(f"{key}: required key is missing")
            continue
        kwargs[name] = _convert(f.type, _resolve_secret(data[name], key), key)
    return cls(**kwargs)


_SIMPLE = {"str": str, "int": int, "float": float, "bool": bool}


def _convert(type_str: Any, value: Any, key: str) -> Any:
    t = type_str if isinstance(type_str, str) else getattr(type_str, "__name__", str(type_str))
    if t in _SIMPLE:
        want = _SIMPLE[t]
        if want is float and isinstance(value, int) and not isinstance(value, bool):
            return float(value)
        if want is not bool and isinstance(value, bool) or not isinstance(value, want):
            raise ConfigError(f"{key}: expected {t}, got {type(value).__name__} {value!r}")
        return value
    if t == "tuple[str, ...]":
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise ConfigError(f"{key}: expected a list of strings, got {value!r}")
        return tuple(value)
    if t == "Mapping[str, str]":
        if not isinstance(value, Mapping):
            raise ConfigError(f"{key}: expected a table of DICOM keyword = value or regex")
        out: dict[str, str] = {}
        for k, v in value.items():
            if not isinstance(v, (str, int, float)) or isinstance(v, bool):
                raise ConfigError(f"{key}.{k}: expected a string, number or regex, got {v!r}")
            try:
                re.compile(str(v))
            except re.error as exc:
                raise ConfigError(f"{key}.{k}: not a valid regular expression: {exc}") from exc
            out[str(k)] = str(v)
        return out
    nested = {"TlsConfig": TlsConfig}
    if t in nested:
        return _build(nested[t], value, key)
    if t == "tuple[CallerConfig, ...]":
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected an array of tables")
        return tuple(_build(CallerConfig, v, f"{key}[{i}]") for i, v in enumerate(value))
    raise ConfigError(f"{key}: unsupported type {t}")  # pragma: no cover - programming error


def _check(cfg: Config) -> None:
    n = cfg.node
    if not 0 < n.port < 65536:
        raise ConfigError(f"node.port: {n.port} is not a TCP port (1-65535)")
    if not 1 <= len(n.ae_title) <= 16:
        raise ConfigError(f"node.ae_title: {n.ae_title!r} must be 1-16 characters")
    if n.stable_age_s <= 0:
        raise ConfigError("node.stable_age_s: must be > 0")
    if n.tls.enabled and not (n.tls.cert and n.tls.key):
        raise ConfigError("node.tls: enabled = true needs cert and key")
    if cfg.engine.device not in ENGINE_DEVICES:
        raise ConfigError(f"engine.device: {cfg.engine.device!r} is not one of {', '.join(ENGINE_DEVICES)}")
    if cfg.executor.kind not in ("inprocess", "celery"):
        raise ConfigError(f"executor.kind: {cfg.executor.kind!r} is not 'inprocess' or 'celery'")
    if cfg.executor.data_access not in ("shared", "dicomweb"):
        raise ConfigError(f"executor.data_access: {cfg.executor.data_access!r} is not 'shared' or 'dicomweb'")
    if not 0 <= cfg.http.port < 65536:
        raise ConfigError(f"http.port: {cfg.http.port} is not a TCP port")
    if not re.fullmatch(r"[0-9.]+\.", cfg.derive.uid_root) or len(cfg.derive.uid_root) > 40:
        raise ConfigError("derive.uid_root: must be digits and dots, end with '.', at most 40 characters")
    names: set[str] = set()
    for i, d in enumerate(cfg.destinations):
        w = f"destinations[{i}]"
        if d.name in names:
            raise ConfigError(f"{w}.name: duplicate destination name {d.name!r}")
        names.add(d.name)
        if d.kind not in DESTINATION_KINDS:
            raise ConfigError(f"{w}.kind: {d.kind!r} is not one of {', '.join(DESTINATION_KINDS)}")
        if d.kind == "dicom" and not (d.ae_title and d.host and d.port):
            raise ConfigError(f"{w}: kind = 'dicom' needs ae_title, host and port")
        if d.kind == "folder" and not d.path:
            raise ConfigError(f"{w}.path: kind = 'folder' needs a path")
        if d.kind in ("orthanc", "dicomweb") and not d.url:
            raise ConfigError(f"{w}.url: kind = {d.kind!r} needs a url")
    for i, s in enumerate(cfg.sources):
        if s.kind not in SOURCE_KINDS:
            raise ConfigError(f"sources[{i}].kind: {s.kind!r} is not one of {', '.join(SOURCE_KINDS)}")
    rule_names: set[str] = set()
    for i, r in enumerate(cfg.rules):
        w = f"rules[{i}]"
        if r.name in rule_names:
            raise ConfigError(f"{w}.name: duplicate rule name {r.name!r}")
        rule_names.add(r.name)
        if not 1 <= r.through_plane_factor <= 8:
            raise ConfigError(f"{w}.through_plane_factor: {r.through_plane_factor} must be 1..8")
        if not 1 <= r.in_plane_factor <= 4:
            raise ConfigError(f"{w}.in_plane_factor: {r.in_plane_factor} must be 1..4")
        for dn in r.destinations:
            if dn not in names:
                raise ConfigError(f"{w}.destinations: no destination named {dn!r}")
    for i, c in enumerate(n.allowed_callers):
        for rn in c.rules:
            if rn not in rule_names:
                raise ConfigError(f"node.allowed_callers[{i}].rules: no rule named {rn!r}")


def config_from_dict(data: Mapping[str, Any], path: str = "") -> Config:
    """Build and validate a Config from a parsed TOML document."""
    top = {f.name for f in dataclasses.fields(Config)} - {"path"}
    unknown = sorted(set(data) - top)
    if unknown:
        raise ConfigError(f"unknown section(s) {', '.join(unknown)}; known: {', '.join(sorted(top))}")

    def table_list(key: str, cls: type) -> tuple[Any, ...]:
        raw = data.get(key, [])
        if not isinstance(raw, list):
            raise ConfigError(f"{key}: expected an array of tables ([[{key}]])")
        return tuple(_build(cls, item, f"{key}[{i}]") for i, item in enumerate(raw))

    cfg = Config(
        node=_build(NodeConfig, data.get("node", {}), "node"),
        engine=_build(EngineConfig, data.get("engine", {}), "engine"),
        derive=_build(DeriveConfig, data.get("derive", {}), "derive"),
        http=_build(HttpConfig, data.get("http", {}), "http"),
        executor=_build(ExecutorConfig, data.get("executor", {}), "executor"),
        outbox=_build(OutboxConfig, data.get("outbox", {}), "outbox"),
        destinations=table_list("destinations", DestinationConfig),
        sources=table_list("sources", SourceConfig),
        rules=table_list("rules", RuleConfig),
        path=path,
    )
    _check(cfg)
    return cfg


def load_config(path: str | os.PathLike[str] | None) -> Config:
    """Load config.toml; ``None`` gives the embedded defaults (used by ``make demo``)."""
    if path is None:
        return config_from_dict(DEFAULTS)
    p = Path(path)
    try:
        with p.open("rb") as fh:
            data = tomllib.load(fh)
    except FileNotFoundError as exc:
        raise ConfigError(f"{p}: config file not found") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{p}: not valid TOML: {exc}") from exc
    try:
        return config_from_dict(data, str(p))
    except ConfigError as exc:
        raise ConfigError(f"{p}: {exc}") from exc


def replace(cfg: Config, **sections: Any) -> Config:
    """A copy of ``cfg`` with whole sections replaced (tests and CLI overrides)."""
    return dataclasses.replace(cfg, **sections)


# The embedded defaults: a working node that writes results to ./srnode-out.
DEFAULTS: dict[str, Any] = {
    "node": {"spool_dir": "./spool", "stable_age_s": 5.0},
    "destinations": [{"name": "local", "kind": "folder", "path": "./srnode-out"}],
    "rules": [
        {
            "name": "ct-mr-thick",
            "match": {"Modality": "^(CT|MR)$"},
            "through_plane_factor": 2,
            "in_plane_factor": 1,
            "destinations": ["local"],
        }
    ],
}
