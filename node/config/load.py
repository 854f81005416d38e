"""Loading config.toml into the typed ``Config`` (``schema.py``, ``endpoints.py``).

Every key is validated at load; an error names the key (``rules[1].through_plane_factor``) and the reason.
Values are read by the field's real type (``typing.get_type_hints``): str/int/float/bool, enums (the closed value
sets), nested dataclasses, ``tuple[X, ...]``, ``Mapping[str, str]`` and the tagged unions of destinations and
sources (picked by ``kind``). Secrets may be given as ``"env:VARNAME"`` and are resolved from the environment.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import re
import tomllib
import types
import typing
from collections.abc import Mapping
from enum import Enum
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from pydicom.datadict import keyword_dict, tag_for_keyword

from models.engine import EngineOptions, factor_problem
from node.config.endpoints import (
    ConfirmMethod,
    DestinationKind,
    DicomDestination,
    DicomSource,
    DicomwebDestination,
    FolderDestination,
    OrthancDestination,
    WebEndpoint,
)
from node.config.schema import (
    FLATTEN,
    NOT_A_KEY,
    SECRET_KEYS,
    Config,
    DataAccess,
    NodeConfig,
    TlsConfig,
    kind_tag,
)
from node.dimse import MIN_PEER_MAX_PDU, max_pdu_problem
from node.errors import ConfigError

_TABLE_ARRAYS = {"destinations", "sources", "rules"}  # written [[name]] in the file (for the error message)


def _resolve_secret(value: Any, where: str) -> Any:
    if isinstance(value, str) and value.startswith("env:"):
        var = value[4:]
        if var not in os.environ:
            raise ConfigError(f"{where}: environment variable {var!r} is not set")
        return os.environ[var]
    return value


def _keys(cls: type) -> list[str]:
    """The keys of ``cls``'s table: its fields, a FLATTEN field's own keys in its place, ``kind`` for tagged."""
    hints = typing.get_type_hints(cls)
    out = ["kind"] if kind_tag(cls) else []
    for f in dataclasses.fields(cls):
        if f.metadata.get(NOT_A_KEY):
            continue
        out += _keys(hints[f.name]) if f.metadata.get(FLATTEN) else [f.name]
    return out


def _build(cls: type, data: Any, where: str) -> Any:
    """Build dataclass ``cls`` from a TOML table, checking unknown keys and types; errors name the key.

    Raises ConfigError for a non-table, an unknown key (listing the known ones), a missing required key, an empty
    required string and any value of the wrong type.
    """
    if not isinstance(data, Mapping):
        raise ConfigError(f"{where}: expected a table, got {type(data).__name__}")
    known = _keys(cls)
    unknown = sorted(set(data) - set(known))
    if unknown:
        what = f"{where}: unknown key(s)" if where else "unknown section(s)"
        tag = kind_tag(cls)
        for_kind = f" for kind {tag!r}" if tag else ""
        raise ConfigError(f"{what} {', '.join(unknown)}{for_kind}; known: {', '.join(sorted(known))}")
    hints = typing.get_type_hints(cls)
    kwargs: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        if f.metadata.get(NOT_A_KEY):
            continue
        if f.metadata.get(FLATTEN):
            sub = set(_keys(hints[f.name]))
            kwargs[f.name] = _build(hints[f.name], {k: v for k, v in data.items() if k in sub}, where)
            continue
        key = f"{where}.{f.name}" if where else f.name
        required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        if f.name not in data:
            if required:
                raise ConfigError(f"{key}: required key is missing")
            continue
        value = _convert(hints[f.name], _resolve_secret(data[f.name], key), key)
        if required and value == "":
            raise ConfigError(f"{key}: must not be empty")
        kwargs[f.name] = value
    return cls(**kwargs)


def _convert(tp: Any, value: Any, key: str) -> Any:
    """``value`` read as type ``tp``; raises ConfigError naming ``key`` when it is not one."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp in (str, int, float, bool):
        if tp is float and isinstance(value, int) and not isinstance(value, bool):
            return float(value)
        if (tp is not bool and isinstance(value, bool)) or not isinstance(value, tp):
            shown = ("(the value is a secret: not shown)" if key.rsplit(".", 1)[-1] in SECRET_KEYS
                     else repr(value))
            raise ConfigError(f"{key}: expected {tp.__name__}, got {type(value).__name__} {shown}")
        if tp is float and not math.isfinite(value):  # TOML's nan / inf: every comparison with nan is false
            raise ConfigError(f"{key}: {value} must be a finite number")
        return value
    if isinstance(tp, type) and issubclass(tp, Enum):
        names = [m.value for m in tp]
        if value not in names:
            raise ConfigError(f"{key}: {value!r} is not one of {', '.join(names)}")
        return tp(value)
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        return _build(tp, value, key)
    if origin is tuple and len(args) == 2 and args[1] is Ellipsis:
        if args[0] is str and isinstance(value, str):
            value = [value]
        if not isinstance(value, list):
            name = key.rsplit(".", 1)[-1]
            hint = f" ([[{name}]])" if name in _TABLE_ARRAYS else ""
            raise ConfigError(f"{key}: expected an array{hint}, got {type(value).__name__}")
        return tuple(_convert(args[0], v, f"{key}[{i}]") for i, v in enumerate(value))
    if origin in (Mapping, dict) and args == (str, str):
        if not isinstance(value, Mapping):
            raise ConfigError(f"{key}: expected a table, got {type(value).__name__}")
        out: dict[str, str] = {}
        for k, v in value.items():  # numbers are kept as their text (match = { EchoNumbers = 1 })
            if not isinstance(v, (str, int, float)) or isinstance(v, bool):
                raise ConfigError(f"{key}.{k}: expected a string or number, got {v!r}")
            out[str(k)] = str(v)
        return out
    if origin in (typing.Union, types.UnionType) and all(isinstance(a, type) and kind_tag(a) for a in args):
        return _tagged(args, value, key)
    raise ConfigError(f"{key}: unsupported type {tp!r}")  # pragma: no cover - programming error


def _tagged(members: tuple[type, ...], value: Any, key: str) -> Any:
    """A member of a tagged union, picked by the table's ``kind``; raises ConfigError naming ``key.kind``."""
    by_kind = {str(kind_tag(m)): m for m in members}
    kinds = ", ".join(by_kind)
    if not isinstance(value, Mapping):
        raise ConfigError(f"{key}: expected a table, got {type(value).__name__}")
    if "kind" not in value:
        raise ConfigError(f"{key}.kind: required key is missing; one of {kinds}")
    kind = value["kind"]
    if kind not in by_kind:
        raise ConfigError(f"{key}.kind: {kind!r} is not one of {kinds}")
    return _build(by_kind[kind], {k: v for k, v in value.items() if k != "kind"}, key)


def _check_port(port: int, key: str, allow_zero: bool = False) -> None:
    if not (0 if allow_zero else 1) <= port < 65536:
        raise ConfigError(f"{key}: {port} is not a TCP port ({0 if allow_zero else 1}-65535)")


def _check_ae_title(title: str, key: str) -> None:
    """An AE title (PS3.5 6.2, VR AE): 1-16 characters, not only spaces, no backslash or control character."""
    if not 1 <= len(title) <= 16 or not title.strip() or "\\" in title or not title.isprintable():
        raise ConfigError(f"{key}: {title!r} must be 1-16 characters, not only spaces, without a backslash or "
                          "control character")


_LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")

# time keys (every ``*_s``) where 0 has a meaning: no limit, or at once; every other one must be > 0
_ZERO_TIME_OK = frozenset({"body_timeout_s", "declared_settle_s"})


def _check_times(obj: Any, where: str) -> None:
    """Every ``*_s`` key of ``obj`` (a config dataclass, or a tuple of them) >= 0, and > 0 unless 0 means
    something (``_ZERO_TIME_OK``); raises ConfigError naming the key."""
    if isinstance(obj, tuple):
        for i, item in enumerate(obj):
            _check_times(item, f"{where}[{i}]")
        return
    if not dataclasses.is_dataclass(obj) or isinstance(obj, type):
        return
    for f in dataclasses.fields(obj):
        if f.metadata.get(NOT_A_KEY):
            continue
        value = getattr(obj, f.name)
        key = where if f.metadata.get(FLATTEN) else (f"{where}.{f.name}" if where else f.name)
        if f.name.endswith("_s") and isinstance(value, (int, float)) and not isinstance(value, bool):
            if value < 0 or (value == 0 and f.name not in _ZERO_TIME_OK):
                raise ConfigError(f"{key}: {value:g} must be {'>= 0' if f.name in _ZERO_TIME_OK else '> 0'} "
                                  "(seconds)")
        else:
            _check_times(value, key)


def _check_url(e: WebEndpoint, key: str) -> None:
    """An HTTP peer's ``url``: http(s) with a host, and no credentials in it (they would be shown wherever the URL
    is: logs, errors, job reasons; only ``password`` / ``token`` values are kept out). Never names the URL."""
    try:
        parts = urlsplit(e.url)
        scheme, host, has_user = parts.scheme, parts.hostname, parts.username is not None or parts.password is not None
    except ValueError:  # a bad IPv6 literal
        scheme, host, has_user = "", None, False
    if has_user:
        raise ConfigError(f"{key}: holds credentials (user:password@): give them as username and password (or "
                          "token) of this entry, which are kept out of logs and messages; the URL is not")
    if scheme not in ("http", "https") or not host:
        raise ConfigError(f"{key}: must be an http:// or https:// URL with a host")


# kombu's transports a Celery broker URL may name (its scheme; "sqla+..." / "db+..." are result backends only)
_BROKER_SCHEMES = frozenset({"redis", "rediss", "sentinel", "amqp", "amqps", "pyamqp", "librabbitmq", "sqs",
                             "memory", "filesystem", "mongodb", "zookeeper", "etcd", "consul", "qpid",
                             "confluentkafka", "gcpubsub", "azurestoragequeues", "azureservicebus"})


def _check_celery_urls(broker_url: str, result_backend: str) -> None:
    """With ``executor.kind = "celery"``: a broker URL whose scheme no transport takes ("amqpx://", "redis:/"
    typos) or whose port is not one made the node start and log "broker ... not reachable yet" for ever, every
    job waiting in the index. Both are secrets (credentials in them): the URL is never named, only its scheme."""
    for key, url in (("executor.broker_url", broker_url), ("executor.result_backend", result_backend)):
        if not url:
            continue
        parts = urlsplit(url)
        scheme = parts.scheme.lower()
        if key == "executor.broker_url" and scheme not in _BROKER_SCHEMES:
            raise ConfigError(f"{key}: {scheme + '://' if scheme else 'no scheme'} is no Celery broker transport "
                              f"(e.g. redis://host:6379/0, amqp://host:5672//; the value is a secret: not shown)")
        try:
            parts.port  # noqa: B018 - raises ValueError for a port that is not 0..65535
        except ValueError:
            raise ConfigError(f"{key}: its port is not a number from 0 to 65535 (the value is a secret: not "
                              "shown)") from None


def _check(cfg: Config) -> None:
    """Checks across keys and of value ranges; raises ConfigError naming the key."""
    n = cfg.node
    if cfg.executor.kind == "celery":
        _check_celery_urls(cfg.executor.broker_url, cfg.executor.result_backend)
    _check_port(n.port, "node.port")
    _check_ae_title(n.ae_title, "node.ae_title")
    if n.log_level.upper() not in _LOG_LEVELS:  # `serve` ended in a ValueError traceback
        raise ConfigError(f"node.log_level: {n.log_level!r} is not one of {', '.join(_LOG_LEVELS)}")
    if n.min_free_mb < 0:
        raise ConfigError(f"node.min_free_mb: {n.min_free_mb} must be >= 0 (MB)")
    if not math.isfinite(n.retention_days) or n.retention_days < 0:
        raise ConfigError(f"node.retention_days: {n.retention_days} must be >= 0 (days; 0 keeps everything)")
    if not math.isfinite(n.prune_interval_s) or n.prune_interval_s <= 0:
        raise ConfigError(f"node.prune_interval_s: {n.prune_interval_s} must be > 0 (seconds)")
    if n.max_pdu < 0 or max_pdu_problem(n.max_pdu):
        raise ConfigError(f"node.max_pdu: {n.max_pdu} must be 0 (pynetdicom's default) or at least "
                          f"{MIN_PEER_MAX_PDU} (bytes)")
    if cfg.outbox.max_attempts < 1:
        raise ConfigError(f"outbox.max_attempts: {cfg.outbox.max_attempts} must be >= 1")
    if n.stable_age_s <= 0:
        raise ConfigError("node.stable_age_s: must be > 0")
    if n.declared_settle_s < 0:
        raise ConfigError(f"node.declared_settle_s: {n.declared_settle_s:g} must be >= 0 (seconds)")
    if n.tls.enabled and not (n.tls.cert and n.tls.key):
        raise ConfigError("node.tls: enabled = true needs cert and key")
    if n.tls.enabled and n.tls.require_client_cert and not n.tls.ca:
        raise ConfigError("node.tls.require_client_cert: true needs node.tls.ca, the CA the callers' certificates "
                          "are checked against (without it every caller's handshake fails: none is trusted)")
    if n.max_series_memory_mb < 0:
        raise ConfigError(f"node.max_series_memory_mb: {n.max_series_memory_mb} must be >= 0 (0: 3/4 of the memory)")
    if not 1 <= n.max_instance_mb <= 1 << 20:
        raise ConfigError(f"node.max_instance_mb: {n.max_instance_mb} must be from 1 to {1 << 20} (MB)")
    if n.max_job_attempts < 1:
        raise ConfigError(f"node.max_job_attempts: {n.max_job_attempts} must be >= 1")
    if n.max_interrupted_runs < 1:
        raise ConfigError(f"node.max_interrupted_runs: {n.max_interrupted_runs} must be >= 1")
    if n.max_associations < 1:
        raise ConfigError(f"node.max_associations: {n.max_associations} must be >= 1")
    if n.max_associations_per_caller < 0:
        raise ConfigError(f"node.max_associations_per_caller: {n.max_associations_per_caller} must be >= 0 "
                          "(0: no per-caller limit)")
    if n.max_associations_per_address < 0:
        raise ConfigError(f"node.max_associations_per_address: {n.max_associations_per_address} must be >= 0 "
                          "(0: no per-address limit)")
    if not 0 <= n.refusals_logged_per_minute <= 1_000_000:
        raise ConfigError(f"node.refusals_logged_per_minute: {n.refusals_logged_per_minute} must be from 0 to 1000000 "
                          "(lines and audit records a minute per peer address; 0: every one)")
    if not 0 < n.idle_timeout_s <= 86400:
        raise ConfigError(f"node.idle_timeout_s: {n.idle_timeout_s:g} must be > 0 and <= 86400 seconds")
    if not 0 < n.message_timeout_s <= 86400:
        raise ConfigError(f"node.message_timeout_s: {n.message_timeout_s:g} must be > 0 and <= 86400 seconds")
    for key, seconds in (("node.association_timeout_s", n.association_timeout_s),
                         ("node.tls.handshake_timeout_s", n.tls.handshake_timeout_s)):
        if not 0 < seconds <= 600:
            raise ConfigError(f"{key}: {seconds:g} must be > 0 and <= 600 seconds")
    _check_port(cfg.http.port, "http.port", allow_zero=True)
    h = cfg.http
    if not 1 <= h.max_connections <= 65536:
        raise ConfigError(f"http.max_connections: {h.max_connections} must be from 1 to 65536")
    if not 1 <= h.max_stow_parts <= 10_000_000:
        raise ConfigError(f"http.max_stow_parts: {h.max_stow_parts} must be from 1 to 10000000")
    if h.max_body_mb < 1:
        raise ConfigError(f"http.max_body_mb: {h.max_body_mb} must be >= 1")
    for key, seconds, zero_ok in (("http.header_timeout_s", h.header_timeout_s, False),
                                  ("http.body_idle_timeout_s", h.body_idle_timeout_s, False),
                                  ("http.body_timeout_s", h.body_timeout_s, True)):
        if seconds < 0 or (seconds == 0 and not zero_ok):
            raise ConfigError(f"{key}: {seconds:g} must be > 0" + (" (0: no limit)" if zero_ok else ""))
    if not 0 < h.write_timeout_s <= 86400:
        raise ConfigError(f"http.write_timeout_s: {h.write_timeout_s:g} must be > 0 and <= 86400 seconds (a client "
                          "that stops reading a response would otherwise hold its connection for ever)")
    if not re.fullmatch(r"[0-9.]+\.", cfg.derive.uid_root) or len(cfg.derive.uid_root) > 40:
        raise ConfigError("derive.uid_root: must be digits and dots, end with '.', at most 40 characters")
    for key in ("caution", "series_description_suffix"):
        text = getattr(cfg.derive, key)
        if len(text) > 32 or "\\" in text or not text.isprintable():
            raise ConfigError(f"derive.{key}: {text!r} must be at most 32 printable characters without a backslash "
                              "(it goes into SeriesDescription, 64 characters in all)")
    if not 0 <= cfg.derive.series_number_offset <= 10_000_000:
        raise ConfigError("derive.series_number_offset: must be 0..10000000")
    for key, endpoints in (("destinations", cfg.destinations), ("sources", cfg.sources)):
        names: set[str] = set()
        for i, e in enumerate(endpoints):
            w = f"{key}[{i}]"
            if e.name in names:
                raise ConfigError(f"{w}.name: duplicate name {e.name!r}")
            names.add(e.name)
            if isinstance(e, WebEndpoint):
                _check_url(e, f"{w}.url")
            if isinstance(e, (DicomDestination, DicomSource)):
                _check_port(e.port, f"{w}.port")
                _check_ae_title(e.ae_title, f"{w}.ae_title")
            if isinstance(e, DicomDestination) and e.calling_ae_title:
                _check_ae_title(e.calling_ae_title, f"{w}.calling_ae_title")
            if getattr(e, "confirm", None) == ConfirmMethod.COMMITMENT and not isinstance(e, DicomDestination):
                raise ConfigError(f"{w}.confirm: 'commitment' (DICOM Storage Commitment) needs kind = \"dicom\"; "
                                  "use 'auto', 'count' or 'none'")
            if (getattr(e, "confirm", None) == ConfirmMethod.COMMITMENT and cfg.executor.kind == "celery"
                    and cfg.executor.data_access == DataAccess.DICOMWEB):
                raise ConfigError(f"{w}.confirm: 'commitment' with executor.data_access = \"dicomweb\": the workers "
                                  "deliver the results, and the peer sends its Storage Commitment report to the "
                                  "node, never to them; use 'auto' (a count by C-FIND there) or 'count'")
            if isinstance(e, DicomDestination) and not 1 <= e.associations <= 32:
                raise ConfigError(f"{w}.associations: {e.associations} must be 1..32")
            if isinstance(e, (OrthancDestination, DicomwebDestination)) and not 1 <= e.parallel <= 32:
                raise ConfigError(f"{w}.parallel: {e.parallel} must be 1..32")
            if isinstance(e, DicomwebDestination):
                if not 1 <= e.batch_size <= 1000:
                    raise ConfigError(f"{w}.batch_size: {e.batch_size} must be 1..1000")
                if not e.batch_mb > 0:
                    raise ConfigError(f"{w}.batch_mb: {e.batch_mb:g} must be > 0 (MB)")
    _check_times(cfg, "")
    dest_names = {d.name for d in cfg.destinations}
    rule_names: set[str] = set()
    for i, r in enumerate(cfg.rules):
        w = f"rules[{i}]"
        if r.name in rule_names:
            raise ConfigError(f"{w}.name: duplicate rule name {r.name!r}")
        rule_names.add(r.name)
        for k, pattern in r.match.items():
            if tag_for_keyword(k) is None:  # the element is never there: the rule would never match
                near = difflib.get_close_matches(k, keyword_dict.keys(), n=1)
                raise ConfigError(f"{w}.match.{k}: not a DICOM keyword" + (f" (did you mean {near[0]}?)" if near
                                                                           else " (PS3.6, e.g. Modality)"))
            try:
                re.compile(pattern)
            except re.error as exc:
                raise ConfigError(f"{w}.match.{k}: not a valid regular expression: {exc}") from exc
        for field_key, axis, value in (("through_plane_factor", "through_plane", r.through_plane_factor),
                                       ("in_plane_factor", "in_plane", r.in_plane_factor)):
            problem = factor_problem(axis, value)
            if problem:
                raise ConfigError(f"{w}.{field_key}: {problem}")
        for dn in r.destinations:
            if dn not in dest_names:
                raise ConfigError(f"{w}.destinations: no destination named {dn!r}")
    for i, c in enumerate(n.allowed_callers):
        for rn in c.rules:
            if rn not in rule_names:
                raise ConfigError(f"node.allowed_callers[{i}].rules: no rule named {rn!r}")


# The keys that name files or folders, by the config class that holds them. Relative values in a config file are
# taken relative to that file's folder (not the directory the command runs in); "none" is engine.weights' word
# for "no prior", not a file.
_PATH_KEYS: Mapping[type, tuple[str, ...]] = {
    NodeConfig: ("spool_dir", "audit_log"),
    TlsConfig: ("cert", "key", "ca"),
    EngineOptions: ("weights",),
    FolderDestination: ("path",),
    DicomDestination: ("tls_ca", "tls_cert", "tls_key"),
    OrthancDestination: ("tls_ca", "tls_cert", "tls_key"),
    DicomwebDestination: ("tls_ca", "tls_cert", "tls_key"),
}
_NOT_A_PATH = frozenset({"", "none"})


def _resolve_paths(obj: Any, base: Path | None) -> Any:
    """``obj`` (a config dataclass, a tuple of them, or any other value) with every relative path key
    (``_PATH_KEYS``) joined to ``base`` and ``~`` / ``~user`` expanded (ConfigError for an unknown user); absolute
    paths, "" and "none" are kept as they are."""
    if isinstance(obj, tuple):
        return tuple(_resolve_paths(v, base) for v in obj)
    if not dataclasses.is_dataclass(obj) or isinstance(obj, type):
        return obj
    path_keys = _PATH_KEYS.get(type(obj), ())
    changes: dict[str, Any] = {}
    for f in dataclasses.fields(obj):
        if not f.init or f.metadata.get(NOT_A_KEY):
            continue
        value = getattr(obj, f.name)
        if f.name in path_keys and isinstance(value, str):
            if value.startswith("~"):  # the user's home: Path() never expands it (it made a folder named "~")
                home = os.path.expanduser(value)
                if home.startswith("~"):
                    raise ConfigError(f"{type(obj).__name__}.{f.name}: {value!r}: no such user's home folder")
                changes[f.name] = home
            elif base is not None and value not in _NOT_A_PATH and not Path(value).is_absolute():
                changes[f.name] = os.path.abspath(base / value)
            continue
        new = _resolve_paths(value, base)
        if new is not value:
            changes[f.name] = new
    return dataclasses.replace(obj, **changes) if changes else obj


def config_from_dict(data: Mapping[str, Any], path: str = "", base: Path | None = None) -> Config:
    """Build and validate a Config from a parsed TOML document; raises ConfigError naming the key.

    With ``base`` (the folder of the file it was read from) relative file and folder keys (``_PATH_KEYS``:
    ``spool_dir``, a folder destination's ``path``, TLS PEM files, ``weights``, ``audit_log``) are made absolute
    under it; without it (the embedded defaults) they stay relative to the current directory. ``~`` is expanded
    either way.
    """
    cfg: Config = _build(Config, data, "")
    _check(cfg)
    cfg = _resolve_paths(cfg, base)
    return dataclasses.replace(cfg, path=path)


def load_config(path: str | os.PathLike[str] | None) -> Config:
    """Load config.toml; ``None`` gives the embedded defaults (used by ``make demo``).

    Relative paths in the file (``spool_dir``, a folder destination's ``path``, TLS PEM files, ``weights``,
    ``audit_log``) are relative to the file's own folder, not to the current directory; the embedded defaults'
    ``./spool`` and ``./srnode-out`` are relative to the current directory.

    Raises ConfigError (prefixed with the file name) for a missing file, invalid TOML or an invalid key.
    """
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
        _check_spool_moved(data, p.parent)
        return config_from_dict(data, str(p), base=p.parent)
    except ConfigError as exc:
        raise ConfigError(f"{p}: {exc}") from exc


def _check_spool_moved(data: Mapping[str, Any], base: Path) -> None:
    """ConfigError when a relative ``node.spool_dir`` names, under the file's folder, no spool while under the current
    directory (where a relative spool_dir led before it followed the file) it names one: the node would start on an
    empty spool and leave every accepted instance and job of the old one behind, unprocessed and unsaid."""
    node = data.get("node")
    value = node.get("spool_dir") if isinstance(node, Mapping) else None
    if not isinstance(value, str) or value in _NOT_A_PATH or value.startswith("~") or Path(value).is_absolute():
        return
    by_file, by_cwd = Path(os.path.abspath(base / value)), Path(os.path.abspath(value))
    if by_file != by_cwd and (by_cwd / "index.sqlite").is_file() and not (by_file / "index.sqlite").is_file():
        raise ConfigError(f"node.spool_dir: {value!r} is relative to the config file's folder ({by_file}), which "
                          f"holds no spool, while the current directory's {by_cwd} holds one (a relative spool_dir "
                          "followed the current directory before): give spool_dir as an absolute path")


def replace(cfg: Config, **sections: Any) -> Config:
    """A copy of ``cfg`` with whole sections replaced (tests and CLI overrides)."""
    return dataclasses.replace(cfg, **sections)


# SliceThickness of 2 mm or more, as the DS text of the element ("2", "2.5", "5.0", "10"): thin series (a 0.9 mm
# MPRAGE, a 1 mm CT) are left alone by default. config.toml's rule is the same.
THICK_2MM_OR_MORE = r"^([2-9]|[1-9][0-9]+)(\.[0-9]*)?$"

# The embedded defaults: a working node that writes results to ./srnode-out.
DEFAULTS: dict[str, Any] = {
    "node": {"spool_dir": "./spool", "stable_age_s": 5.0},
    "destinations": [{"name": "local", "kind": DestinationKind.FOLDER.value, "path": "./srnode-out"}],
    "rules": [
        {
            "name": "ct-mr-thick",
            "description": "thick CT/MR only: SliceThickness 2 mm or more",
            "match": {"Modality": "^(CT|MR)$", "SliceThickness": THICK_2MM_OR_MORE},
            "through_plane_factor": 2,
            "in_plane_factor": 1,
            "destinations": ["local"],
        }
    ],
}
