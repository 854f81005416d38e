"""What a reader sees of srnode's output in a study list: SeriesDescription and SeriesNumber.

SeriesDescription (LO, at most 64 characters)::

    <source description>[ run i/n | slices a-b of N]<suffix> <factors> <engine>[ (fallback)][ sigma[ card]][ - <caution>]

    STD BRAIN 5MM SR x2 selfsup - not for diagnosis               the derived series
    STD BRAIN 5MM SR x2 selfsup sigma - not for diagnosis         its uncertainty (Parametric Map) series
    STD BRAIN 5MM SR x2 selfsup sigma card - not for diagnosis    its uncertainty card (Secondary Capture)
    STD BRAIN 5MM SR x2 cubic (fallback) - not for diagnosis      SR failed or gained too little: cubic instead

``suffix`` is ``[derive] series_description_suffix`` (default " SR"), ``caution`` is ``[derive] caution`` (default
"not for diagnosis"; "" leaves it out). ``factors`` is ``x<f>`` for a through-plane factor f, ``x<g> in-plane``
for an in-plane factor g alone, ``x<f> x<g> in-plane`` for both. ``engine`` is the engine that made the pixels
(``selfsup``, ``cubic``, ``selfsup+denoise``). When the whole is longer than 64 characters the source description
is shortened first; only then the end of the caution.

SeriesNumber (IS)::

    derived     = source + offset * k + 3 * (run - 1)
    uncertainty = derived + 1      (the Parametric Map; the card when it is the only sigma object)
    card        = derived + 2      (the Secondary Capture card when both are made)
    k           = 1 + (first 4 bytes of SHA-256 of "<engine>|<f>|<g>"  +  revision) mod 99       (1..99)

``source`` is the input's SeriesNumber (0 when absent), ``offset`` is ``[derive] series_number_offset`` (default
1000), ``run`` the regular run of an irregular series (1 otherwise). So with the default offset a result of series
201 is numbered <k>201 (1201 ... 99201): the source number stays readable in the last digits, each run and the
uncertainty series (and card) get their own number, and results of other engines or factors land in another thousand (98
times in 99; their descriptions differ in any case). The rule's name is not part of k on purpose: two rules with the same engine and
factors make the very same series (the same SeriesInstanceUID, ``node.derived.modules.derived_uid``), which must
carry one number. The same inputs always give the same number.

``revision`` (0 for a series' first result) tells a superseding result from the one it supersedes: when late
instances make a series be processed again, the new derived series (new UIDs) and the earlier one (retired by an
IOCM rejection note, ``node.derived.iocm``) are both in PACS for a while, and must not show the same number. The
runner gives the new job the revision of the latest earlier job of the series that made results, plus one for a
derived series whose SeriesInstanceUID that job did not make (more instances, other engine settings or weights,
another pipeline version), the same revision for one it made (a replay: the same UIDs, so the same number);
``node.derived.iocm.result_revision`` and :class:`Revision`. Each
revision moves the result into the next thousand: series 201 is 1201, then 2201, then 3201 (k + revision, mod 99).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from models.engine import Factors
from node.config import DeriveConfig
from node.own import is_srnode_description

__all__ = ["factors_label", "is_srnode_description", "series_description", "series_descriptions", "series_number"]

LO_MAX = 64
IS_MAX = 2**31 - 1


def factors_label(factors: Factors) -> str:
    """``x2``; ``x2 in-plane``; ``x2 x2 in-plane`` (through-plane, then in-plane)."""
    f, g = factors.through_plane, factors.in_plane
    if g == 1:
        return f"x{f}"
    return f"x{g} in-plane" if f == 1 else f"x{f} x{g} in-plane"


def series_description(source: str, suffix: str, factors: Factors, engine: str, *, fallback: bool = False,
                       caution: str = "", run: str = "", sigma: bool = False, card: bool = False) -> str:
    """The SeriesDescription of a derived (``sigma``: uncertainty; ``card`` too: its card) series; see the
    module's docstring.

    ``run``: which part of an irregular series this is ("run 1/2", "slices 3-27 of 27"), "" for a whole series.
    """
    run_text = f" {run}" if run else ""
    tail = (f"{run_text}{suffix} {factors_label(factors)} {engine}" + (" (fallback)" if fallback else "")
            + (" sigma" if sigma else "") + (" card" if sigma and card else "")
            + (f" - {caution}" if caution else ""))
    room = LO_MAX - len(tail)
    head = " ".join(source.split())  # one line, single spaces (a description may hold odd whitespace)
    if room <= 0:
        return tail.strip()[:LO_MAX].rstrip(" -")
    if len(head) > room:
        head = head[:room].rstrip()
    return (head + tail).strip()


def series_descriptions(source: str, cfg: DeriveConfig, factors: Factors, engine: str, fallback: bool,
                        run: str) -> tuple[str, str, str]:
    """The derived series' description, its uncertainty series' and its uncertainty card's (``[derive]`` suffix
    and caution)."""
    derived, sigma, card = (series_description(source, cfg.series_description_suffix, factors, engine,
                                               fallback=fallback, caution=cfg.caution, run=run, sigma=s, card=c)
                            for s, c in ((False, False), (True, False), (True, True)))
    return derived, sigma, card


@dataclass(frozen=True)
class Revision:
    """What decides a result's revision: the latest earlier result of the series (its revision and its derived
    SeriesInstanceUIDs; none: ``earlier_series`` empty). A derived series whose UID is one of the earlier result's
    keeps that revision (the same UIDs: a replay, the same numbers); any other UID -- more instances, other engine
    settings or weights, another pipeline version -- is a superseding result and takes the next revision."""

    earlier: int = 0
    earlier_series: frozenset[str] = frozenset()
    # every earlier result of the series (older than the latest too): (derived SeriesInstanceUID, its revision).
    # rev14: a setting changed and then changed back gives the UIDs of an older result again; they keep its
    # revision (the same UIDs never carry another SeriesNumber), and a new UID takes one above every revision made
    made: tuple[tuple[str, int], ...] = ()

    def of(self, series_uid: str) -> int:
        """The revision of a derived series with SeriesInstanceUID ``series_uid``."""
        if not self.earlier_series or series_uid in self.earlier_series:
            return self.earlier
        older = dict(self.made)
        if series_uid in older:
            return older[series_uid]
        return max([self.earlier, *older.values()]) + 1

    def retired(self, series_uid: str) -> bool:
        """Whether ``series_uid`` is a derived series of an older result that a later one superseded (its rejection
        note retired it): made again -- settings A, then B, then A -- it would send live images under SOP Instance
        UIDs a PACS holds as rejected. Such UIDs are reissued (``node.derived.image_series.derive_series``)."""
        return series_uid not in self.earlier_series and series_uid in dict(self.made)


def series_number(source: int, offset: int, engine: str, factors: Factors, run: int = 1, revision: int = 0) -> int:
    """The derived series' SeriesNumber (its uncertainty series take the next two); see the module's docstring.
    ``revision``: 0 for a series' first result, +1 for each later result of other input that supersedes one."""
    key = f"{engine}|{factors.through_plane}|{factors.in_plane}".encode()
    k = 1 + (int.from_bytes(hashlib.sha256(key).digest()[:4], "big") + max(revision, 0)) % 99
    return max(0, min(source + offset * k + 3 * (max(run, 1) - 1), IS_MAX - 3))
