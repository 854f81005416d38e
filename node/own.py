"""How srnode recognises its own output: by its markers (``own_output_marker``: ``jobs.rules`` leaves such a series
alone, ``ingest`` never pulls it back in, ``derived`` writes them) and by its SeriesDescription (``derived.labels``
writes the descriptions it recognises). A base module: stdlib only, headers read through ``.get``.

Markers (decision, fix13). De-identifiers remove what the DICOM Basic Profile lists (PS3.15 Table E.1-1: the
SeriesDescription, DerivationDescription, private attributes) and some remove more (a whitelist, or a removal of
ContributingEquipmentSequence, or a de-identifier that replaces it by its own item). srnode's output carries three
markers, any one of which identifies it: ContributingEquipmentSequence naming srnode as Modifying Equipment; srnode's
code in DerivationCodeSequence (``SRNODE_CODE``: a private coding scheme, so no other software writes it); and the
General Equipment SoftwareVersions "srnode <version>" (on every derived image, Parametric Map and card srnode wrote,
before the code too). The last two are not in Table E.1-1 and survive the Basic Profile (Orthanc's /anonymize
keeps both). Nothing that merely looks derived counts: ImageType DERIVED, the DICOM code for spatial resampling
(113085) or another Modifying Equipment are those of any MPR; nor Manufacturer "srnode", which srnode's generated
phantom (an input, ``node.app.phantom``) states too.

The format is described in :mod:`node.derived.labels`: ``<source>[ run]<suffix> <factors> <engine>...``, where
``suffix`` is ``[derive] series_description_suffix`` and ``factors`` is ``x<f>``, ``x<g> in-plane`` or
``x<f> x<g> in-plane``; older srnode output ended in ``<suffix>``.
"""

from __future__ import annotations

import re
from typing import Any

FACTORS_PATTERN = r" x\d+(?: x\d+)?(?: in-plane)? "  # the factors label between the suffix and the engine


def is_srnode_description(description: str, suffix: str) -> bool:
    """Whether a SeriesDescription is one srnode wrote (this format, or the older ``<description><suffix>``);
    always False for an empty ``suffix`` (nothing marks the output then)."""
    if not suffix:
        return False
    return (description.endswith(suffix)
            or re.search(re.escape(suffix) + FACTORS_PATTERN + r"\S", description) is not None)


# srnode's entry in DerivationCodeSequence, beside DCM 113085 "Spatial resampling": a private coding scheme
# designator ("99" + the owner, PS3.16 8.2), so that the code names srnode and no other software
SRNODE_CODE = ("SR", "99SRNODE", "Super-resolution by srnode")  # (CodeValue, CodingSchemeDesignator, CodeMeaning)


def _text(value: Any) -> list[str]:
    """The values of a string element (one or several) as stripped text."""
    if value is None:
        return []
    if isinstance(value, (str, bytes)):
        return [str(value).strip()]
    try:
        return [str(v).strip() for v in value]
    except TypeError:
        return [str(value).strip()]


def own_output_marker(header: Any) -> str:
    """Which of srnode's markers ``header`` (a pydicom Dataset) carries, in words for a reason ("" when none):
    ContributingEquipmentSequence naming srnode, srnode's DerivationCodeSequence code, or a General Equipment
    SoftwareVersions value "srnode <version>". A malformed element is no marker."""
    try:
        for item in header.get("ContributingEquipmentSequence") or []:
            if str(item.get("Manufacturer", "")).strip().lower() == "srnode":
                return "ContributingEquipmentSequence names srnode as Modifying Equipment"
    except (TypeError, AttributeError, ValueError):
        pass
    try:
        for item in header.get("DerivationCodeSequence") or []:
            if (str(item.get("CodingSchemeDesignator", "")).strip(), str(item.get("CodeValue", "")).strip()) \
                    == (SRNODE_CODE[1], SRNODE_CODE[0]):
                return f"DerivationCodeSequence holds srnode's code ({SRNODE_CODE[0]}, {SRNODE_CODE[1]})"
    except (TypeError, AttributeError, ValueError):
        pass
    try:
        if any(v.lower().startswith("srnode ") for v in _text(header.get("SoftwareVersions"))):
            return "SoftwareVersions names srnode"
    except (TypeError, AttributeError, ValueError):
        pass
    return ""
