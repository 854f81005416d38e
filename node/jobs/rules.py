"""Routing rules: which pipeline (factors, engine, destinations) a series gets, or why it is left alone.

A rule matches when every entry of its ``match`` table matches: the entry's key is a DICOM keyword, its value a
literal or a regular expression that must match the whole element value. Multi-valued elements match when any
single value matches or when the values joined with a backslash do (``ImageType = "ORIGINAL\\\\PRIMARY.*"``).
The first matching rule wins. Callers listed in ``[node].allowed_callers`` with a ``rules`` list may only use
those rules.
"""

from __future__ import annotations

import copy
import logging
import re
from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path

from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue

from node.config import Config, RuleConfig
from node.dicom_read import read_dicom
from node.own import own_output_marker
from node.phi import PHI_KEYWORDS
from node.series import group_value

log = logging.getLogger(__name__)

# never quote these in a reason: they identify a patient or an encounter
_PRIVATE_KEYWORDS = frozenset(PHI_KEYWORDS)


@lru_cache(maxsize=256)
def _compiled(pattern: str) -> re.Pattern[str]:
    return re.compile(pattern)


def element_values(header: Dataset, keyword: str) -> list[str] | None:
    """The element's values as strings (``None`` when absent); a multi-valued element gives each value.

    An enhanced (multi-frame) object keeps SliceThickness, PixelSpacing and the like only in its functional
    groups: an element absent at the top level is looked up there (shared groups, then the first frame's).
    """
    if keyword not in header:
        value = group_value(header, keyword)
        if value is None:
            return None
        return element_text(value)
    return element_text(header.get(keyword))


def element_text(value: object) -> list[str]:
    """An element value as strings, one per value."""
    if value is None:
        return [""]
    if isinstance(value, (MultiValue, list, tuple)):
        return [str(v) for v in value]
    return [str(value)]


def matches(pattern: str, values: list[str]) -> bool:
    """Whether ``pattern`` (a literal, or a regular expression that must match a whole value) matches one of
    ``values`` or, for several, the values joined with a backslash (the multi-value separator, PS3.5 6.4)."""
    rx = _compiled(pattern)
    candidates = values + (["\\".join(values)] if len(values) > 1 else [])
    return any(v == pattern or rx.fullmatch(v) is not None for v in candidates)


def quoted(text: str) -> str:
    """``text`` in single quotes as it is -- a pattern as config.toml says it, values as the header holds them,
    a backslash once (``repr`` doubled each: ``'^\\\\d+$'`` for ``^\\d+$``) -- with only characters that are not
    printable escaped (a newline as ``\\n``), so a reason stays one line in the log."""
    return "'" + "".join(c if c.isprintable() else repr(c)[1:-1] for c in text) + "'"


def _shown(keyword: str, values: list[str] | None) -> str:
    if values is None:
        return f"{keyword} absent"
    if keyword in _PRIVATE_KEYWORDS:
        return f"{keyword} (value not shown)"
    joined = "\\".join(values)  # the multi-value separator (PS3.5 6.4), once
    return f"{keyword} {quoted(joined)}"


def rule_mismatch(rule: RuleConfig, header: Dataset) -> str:
    """Empty when ``rule`` matches ``header``; otherwise the first entry that does not, as words."""
    for keyword, pattern in rule.match.items():
        values = element_values(header, keyword)
        if values is None or not matches(str(pattern), values):
            return f"{_shown(keyword, values)} does not match {quoted(str(pattern))}"
    return ""


def allowed_rules(stored: str) -> frozenset[str] | None:
    """The rule names a series may use, from the index's ``allowed_rules`` column ("" or absent: every rule).

    The value was decided once, at admission (``node.ingest.admit.caller_rules``), from ``[node].allowed_callers``.
    """
    names = frozenset(r for r in stored.split(",") if r)
    return names or None


def derived_by_srnode(header: Dataset) -> str:
    """Which of srnode's markers ``header`` carries (``node.own.own_output_marker``), "" when it is not srnode's
    output."""
    return own_output_marker(header)


def match_rule(cfg: Config, header: Dataset, allowed: frozenset[str] | None = None,
               caller: str = "") -> tuple[RuleConfig | None, str]:
    """The first rule matching ``header`` among ``allowed`` (None: every rule), with a reason a person can read.

    ``caller``: the calling AE title (or path identity) of the series, named in the reason when a rule is not
    allowed for it.
    """
    if not cfg.rules:
        return None, "no rules are configured"
    marker = derived_by_srnode(header)
    if marker:
        return None, (f"derived by srnode already ({marker}): super-resolving a derived series again would "
                      "interpolate interpolated data, and a PACS that routes it back would loop")
    misses: list[str] = []
    for rule in cfg.rules:
        if allowed is not None and rule.name not in allowed:
            misses.append(f"{rule.name}: not allowed for calling AE {caller!r} (node.allowed_callers)")
            continue
        miss = rule_mismatch(rule, header)
        if not miss:
            return rule, f"rule {rule.name!r} matched"
        misses.append(f"{rule.name}" + (f" ({rule.description})" if rule.description else "") + f": {miss}")
    # each rule with the value that failed it first; the series' Modality last, as context (it read as the failing
    # key when it came first: "no rule matched: Modality 'MR' (ct-mr-thick (...): SliceThickness ...)")
    modality = element_values(header, "Modality")
    return None, "no rule matched: " + "; ".join(misses) + f" (the series: {_shown('Modality', modality)})"


def _lacks(header: Dataset, keyword: str) -> bool:
    values = element_values(header, keyword)
    return values is None or all(not v.strip() for v in values)


def series_header(cfg: Config, header: Dataset, others: Sequence[Path | str]) -> tuple[Dataset, str]:
    """The header the rules match on: ``header`` (the series' first instance's) with each value a rule matches on
    that it lacks (absent or empty) taken from the series' other instances ``others`` when every one of them that
    states it states the same (a scanner that left SliceThickness off the first slice only: the default rule's
    "2 mm or more" read it as absent and the series was left alone); and a note naming what was taken ("" when
    nothing). ``header`` itself is not changed; the other headers are read (those keywords only) only when a value
    is missing. One that cannot be read is passed over (the job's load names it)."""
    wanted = sorted({str(kw) for rule in cfg.rules for kw in rule.match} - {"SOPClassUID"})
    missing = [kw for kw in wanted if _lacks(header, kw)]
    if not missing or not others:
        return header, ""
    seen: dict[str, dict[tuple[str, ...], DataElement]] = {kw: {} for kw in missing}
    for path in others:
        try:
            ds = read_dicom(path, stop_before_pixels=True, specific_tags=list(missing))
        except Exception:  # noqa: BLE001 - an unreadable instance states nothing here
            continue
        for kw in missing:
            if kw in ds and not _lacks(ds, kw):
                seen[kw].setdefault(tuple(element_values(ds, kw) or []), ds[kw])
    filled = [kw for kw in missing if len(seen[kw]) == 1]
    if not filled:
        return header, ""
    out = copy.deepcopy(header)  # the first instance's header stays as it was read (a header: no pixels)
    for kw in filled:
        elem = next(iter(seen[kw].values()))
        out[elem.tag] = elem
    return out, (f"{', '.join(filled)} absent from the series' first instance: taken from the other instances, "
                 "which agree")
