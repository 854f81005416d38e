"""Every attribute copied into a classic CT / MR Image object must be valid there.

The derived series is always a classic (single-frame) CT or MR Image, also when the input was an enhanced
multi-frame object; attributes read from enhanced functional groups use the enhanced IODs' value sets, which
differ (In-plane Phase Encoding Direction ``COLUMN`` there, ``COL`` in the classic MR Image module), and
conditional attributes must follow their condition (Inversion Time only with ``IR`` in Scanning Sequence). This
module maps such values to the classic ones or drops them (type 3, or a type 2C whose condition is not met) and
says what it did; only attribute names and enumerated values are reported, never patient values.
"""

from __future__ import annotations

from pydicom.dataset import Dataset

# enumerated values of the classic MR Image module (PS3.3 C.8.3.1), with the enhanced spellings mapped onto them
_MR_ENUMS: dict[str, dict[str, str]] = {
    "InPlanePhaseEncodingDirection": {"ROW": "ROW", "COL": "COL", "COLUMN": "COL"},  # type 3
    "MRAcquisitionType": {"2D": "2D", "3D": "3D"},  # type 2
}
_SCANNING_SEQUENCE = {"SE", "IR", "GR", "EP", "RM"}  # type 1, enumerated, multi-valued
_SEQUENCE_VARIANT = {"SK", "MTC", "SS", "TRSS", "SP", "MP", "OSP", "NONE"}  # type 1, enumerated, multi-valued
# enumerated values of the classic CT Image module (PS3.3 C.8.2.1)
_CT_ENUMS: dict[str, dict[str, str]] = {
    "RotationDirection": {"CW": "CW", "CC": "CC"},  # type 3
}
_TYPE2 = {"MRAcquisitionType"}


def _values(ds: Dataset, keyword: str) -> list[str]:
    v = ds.get(keyword)
    if v is None or v == "":
        return []
    return [str(x).strip().upper() for x in (v if isinstance(v, (list, tuple)) or hasattr(v, "__iter__")
                                             and not isinstance(v, str) else [v])]


def _map_enums(ds: Dataset, enums: dict[str, dict[str, str]], notes: list[str]) -> None:
    for kw, allowed in enums.items():
        vals = _values(ds, kw)
        if not vals:
            continue
        value = vals[0]
        if value in allowed:
            if allowed[value] != value:
                notes.append(f"{kw} {value} written as {allowed[value]}")
                setattr(ds, kw, allowed[value])
            continue
        notes.append(f"{kw} {value} has no classic equivalent: " + ("left empty" if kw in _TYPE2 else "dropped"))
        if kw in _TYPE2:
            setattr(ds, kw, "")
        else:
            delattr(ds, kw)


def _filter_multi(ds: Dataset, keyword: str, allowed: set[str], fallback: str, notes: list[str]) -> None:
    vals = _values(ds, keyword)
    if not vals:
        return
    keep = [v for v in vals if v in allowed]
    if keep != vals:
        notes.append(f"{keyword} values {'/'.join(v for v in vals if v not in allowed)} are not classic: dropped")
        setattr(ds, keyword, keep or [fallback])


def _laterality(ds: Dataset, notes: list[str]) -> None:
    """General Series Laterality is type 2C: when BodyPartExamined does not say what was imaged (absent or empty
    in the input), a paired structure cannot be ruled out and Laterality must be present (empty: unknown)."""
    if not ds.get("BodyPartExamined") and "Laterality" not in ds:
        notes.append("Laterality written empty (body part unknown)")
        ds.Laterality = ""


def classic_mr_values(ds: Dataset) -> list[str]:
    """Make the MR Image attributes of the classic MR object ``ds`` valid in place; returns what was changed."""
    notes: list[str] = []
    _laterality(ds, notes)
    _map_enums(ds, _MR_ENUMS, notes)
    _filter_multi(ds, "ScanningSequence", _SCANNING_SEQUENCE, "RM", notes)
    _filter_multi(ds, "SequenceVariant", _SEQUENCE_VARIANT, "NONE", notes)
    # Inversion Time is type 2C: present only when Scanning Sequence has IR
    if "InversionTime" in ds and "IR" not in _values(ds, "ScanningSequence"):
        notes.append("InversionTime dropped: ScanningSequence has no IR")
        del ds.InversionTime
    return notes


def classic_ct_values(ds: Dataset) -> list[str]:
    """Make the CT Image attributes of the classic CT object ``ds`` valid in place; returns what was changed."""
    notes: list[str] = []
    _laterality(ds, notes)
    _map_enums(ds, _CT_ENUMS, notes)
    return notes
