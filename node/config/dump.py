"""Writing a configuration back as config.toml text (``make demo`` leaves its effective configuration behind)."""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from node.config.schema import Config, as_table


def _value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, str):
        return json.dumps(v)  # a JSON string is a TOML basic string
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_value(x) for x in v) + "]"
    if isinstance(v, Mapping):
        return "{ " + ", ".join(f"{json.dumps(str(k))} = {_value(x)}" for k, x in v.items()) + " }"
    raise TypeError(f"cannot write {type(v).__name__} as TOML")


def _is_table_array(v: Any) -> bool:
    return isinstance(v, (list, tuple)) and bool(v) and all(isinstance(x, Mapping) for x in v)


def dump_toml(data: Mapping[str, Any], prefix: str = "") -> str:
    """TOML text of a table: scalars and arrays, [tables], [[arrays of tables]]; a rule's ``match`` inline."""
    lines: list[str] = []
    nested: list[tuple[str, Any]] = []
    for k, v in data.items():
        if (isinstance(v, Mapping) and k != "match") or _is_table_array(v):
            nested.append((k, v))
        else:
            lines.append(f"{k} = {_value(v)}")
    out = "\n".join(lines) + ("\n" if lines else "")
    for k, v in nested:
        name = f"{prefix}{k}"
        if isinstance(v, Mapping):
            out += f"\n[{name}]\n" + dump_toml(v, prefix=f"{name}.")
        else:
            for item in v:
                out += f"\n[[{name}]]\n" + dump_toml(item, prefix=f"{name}.")
    return out


def config_toml(cfg: Config, header: str = "") -> str:
    """``cfg`` as config.toml text that loads back to the same configuration (secrets written as they are)."""
    table = {k: v for k, v in as_table(cfg).items() if k != "path"}
    head = "".join(f"# {line}\n" for line in header.splitlines())
    return head + dump_toml(table)
