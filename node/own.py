"""How srnode recognises its own output by its SeriesDescription (a base module: ``ingest`` uses it to never pull
srnode's output back in, ``derived.labels`` writes the descriptions it recognises).

The format is described in :mod:`node.derived.labels`: ``<source>[ run]<suffix> <factors> <engine>...``, where
``suffix`` is ``[derive] series_description_suffix`` and ``factors`` is ``x<f>``, ``x<g> in-plane`` or
``x<f> x<g> in-plane``; older srnode output ended in ``<suffix>``.
"""

from __future__ import annotations

import re

FACTORS_PATTERN = r" x\d+(?: x\d+)?(?: in-plane)? "  # the factors label between the suffix and the engine


def is_srnode_description(description: str, suffix: str) -> bool:
    """Whether a SeriesDescription is one srnode wrote (this format, or the older ``<description><suffix>``);
    always False for an empty ``suffix`` (nothing marks the output then)."""
    if not suffix:
        return False
    return (description.endswith(suffix)
            or re.search(re.escape(suffix) + FACTORS_PATTERN + r"\S", description) is not None)
