"""Typed configuration: frozen dataclasses loaded from config.toml with tomllib.

``schema.py`` holds the sections, ``endpoints.py`` one dataclass per kind of destination and source (a tagged union
on ``kind``), ``load.py`` the loading and validation: every key is validated at load and an error names the key
(``rules[1].through_plane_factor``). Secrets may be given as ``"env:VARNAME"``; ``Config.redacted()`` gives the
effective configuration with every secret replaced, for logging.
"""

from models.engine import Device, EngineOptions
from node.config.endpoints import (
    DESTINATION_TYPES,
    SOURCE_TYPES,
    ConfirmMethod,
    Destination,
    DestinationKind,
    DicomDestination,
    DicomSource,
    DicomwebDestination,
    DicomwebSource,
    FolderDestination,
    OrthancDestination,
    OrthancSource,
    Source,
    SourceKind,
)
from node.config.load import DEFAULTS, config_from_dict, load_config, replace
from node.config.schema import (
    SECRET_KEYS,
    CallerConfig,
    Config,
    DataAccess,
    DeriveConfig,
    EngineConfig,
    ExecutorConfig,
    ExecutorKind,
    HttpConfig,
    NodeConfig,
    OutboxConfig,
    ReceivePath,
    RuleConfig,
    TlsConfig,
    UncertaintyObject,
    VolumeChoice,
    as_table,
    secret_values,
)

__all__ = [
    "DEFAULTS", "DESTINATION_TYPES", "SECRET_KEYS", "SOURCE_TYPES", "CallerConfig", "Config", "ConfirmMethod",
    "DataAccess", "DeriveConfig", "Destination", "DestinationKind", "Device", "DicomDestination", "DicomSource",
    "DicomwebDestination", "DicomwebSource", "EngineConfig", "EngineOptions", "ExecutorConfig", "ExecutorKind",
    "FolderDestination", "HttpConfig", "NodeConfig", "OrthancDestination", "OrthancSource", "OutboxConfig",
    "ReceivePath", "RuleConfig", "Source", "SourceKind", "TlsConfig", "UncertaintyObject", "VolumeChoice",
    "as_table", "config_from_dict", "load_config", "replace",
    "secret_values",
]
