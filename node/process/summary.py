"""The short, stable answer of a job report: is the result better than cubic, and how far can its σ be trusted.

``summarize(report, engine, fallback)`` reads a ``process_series`` report (its ``runs`` with each engine's own
report) and returns the ``summary`` block that ``srnode process`` writes first in ``report.json``, the job report
keeps under ``summary`` (``srnode status --json``) and whose ``line`` ``srnode process`` prints with its result.
Its keys are documented in docs/commands.md ("report.json"); they do not change with the engine's internals.
"""

from __future__ import annotations

from typing import Any

SUMMARY_VERSION = 1

# What the engine's self-check measures (models/selfsup.py ``_validate``, models/diffusion.py): held-out pairs of
# the series itself, made from its in-plane pixels degraded like its slices, never used to fit the network.
GAIN_PAIRS = ("held-out pairs of this series made from its own in-plane pixels, degraded like its slices "
              "(not used for fine-tuning); PSNR of the engine minus PSNR of cubic, body voxels")
Z_PAIRS = ("the series' own acquired slices as targets, degraded along z one scale coarser (the same check "
           "along the slice axis)")


def _first(rep: dict[str, Any], *keys: str) -> Any:
    for k in keys:
        if isinstance(rep.get(k), (int, float)):
            return rep[k]
    return None


def _worst(values: list[float | None]) -> float | None:
    got = [float(v) for v in values if v is not None]
    return min(got) if got else None


def _farthest(values: list[float | None], target: float = 0.95) -> float | None:
    """The coverage farthest from ``target`` (the worst calibrated run), None when none was measured."""
    got = [float(v) for v in values if v is not None]
    return max(got, key=lambda v: abs(v - target)) if got else None


# A 95 % interval is called calibrated when it covers between these fractions of the errors (issue #13's bar).
CALIBRATED = (0.93, 0.97)


def coverage_words(coverage: float) -> str:
    """What a 95 % coverage means for a reader: 'calibrated', 'wider than its errors' or 'too narrow'."""
    if coverage < CALIBRATED[0]:
        return "sigma too narrow: trust it less than it says"
    if coverage > CALIBRATED[1]:
        return "sigma wider than its errors: conservative"
    return "sigma calibrated"


def summarize(report: dict[str, Any], engine: str, fallback: str) -> dict[str, Any]:
    """The summary of a ``process_series`` report. ``engine``: the engine asked for; ``fallback``: the joined
    fallback reasons ("" when none). Gains in dB over cubic (None where the engine measured none, e.g. cubic
    itself); coverages as fractions (0..1) of the pairs' errors within σ's 95 % interval; with several runs
    (volumes of a series) the worst run's figure (the lowest gain, the coverage farthest from 0.95; the line says
    "worst of N"). Never raises on a report without runs (counts 0)."""
    runs: list[dict[str, Any]] = list(report.get("runs", []))
    reps = [r.get("engine_report", {}) or {} for r in runs]
    made_by = sorted({str(r.get("engine", "")) for r in runs if r.get("engine")})
    gain = _worst([_first(x, "through_internal_gain_db", "internal_gain_db") for x in reps])
    gain_z = _worst([_first(x, "through_z_pairs_gain_db") for x in reps])
    cov = _farthest([_first(x, "through_internal_coverage_95") for x in reps])
    cov_z = _farthest([_first(x, "through_sigma_z_pairs_coverage_shipped", "through_z_pairs_coverage_95")
                       for x in reps])
    slices_in = sum(int(r.get("slices_in", 0)) for r in runs)
    slices_out = sum(int(r.get("slices_out", 0)) for r in runs)
    left_out = len(report.get("left_out", []))
    out: dict[str, Any] = {
        "version": SUMMARY_VERSION,
        "engine": engine,
        "made_by": ", ".join(made_by) or engine,
        "fallback": bool(fallback),
        "fallback_reason": fallback,
        "gain_over_cubic_db": gain,
        "gain_pairs": GAIN_PAIRS if gain is not None else "",
        "gain_over_cubic_along_z_db": gain_z,
        "gain_along_z_pairs": Z_PAIRS if gain_z is not None else "",
        "sigma_coverage_95": cov,
        "sigma_coverage_95_along_z": cov_z,
        "runs": len(runs),
        "slices_in": slices_in,
        "slices_out": slices_out,
        "input_slices_left_out": left_out,
        "seconds": report.get("seconds"),
    }
    out["line"] = summary_line(out)
    return out


def summary_line(s: dict[str, Any]) -> str:
    """One line of the summary for people: engine, fallback, gain over cubic, σ coverage, slices."""
    parts = [f"engine {s['engine']}"]
    worst = f" (worst of {s['runs']} volumes)" if s.get("runs", 0) > 1 else ""
    if s["fallback"]:
        parts.append(f"FELL BACK to {s['made_by']}: {s['fallback_reason']}")
    gain = s["gain_over_cubic_db"]
    if gain is not None:
        verdict = "better than cubic" if gain > 0 else "NOT better than cubic"
        g = f"self-check: {verdict}, {gain:+.2f} dB on held-out pairs of this series"
        if s["gain_over_cubic_along_z_db"] is not None:
            g += f" ({s['gain_over_cubic_along_z_db']:+.2f} dB along z)"
        parts.append(g + worst)
    elif s["made_by"] == "cubic":
        parts.append("cubic interpolation (no self-check: it is the baseline)")
    cov = s["sigma_coverage_95"]
    if cov is not None:
        c = f"sigma 95 % coverage {cov:.2f} on those pairs ({coverage_words(cov)})"
        cov_z = s["sigma_coverage_95_along_z"]
        if cov_z is not None:
            c += f", {cov_z:.2f} along z ({coverage_words(cov_z)})"
        parts.append(c + worst)
    sl = f"{s['slices_in']} slices in, {s['slices_out']} out"
    if s.get("runs", 0) > 1:
        sl += f" in {s['runs']} derived series (volumes or regular runs: report.notes says why)"
    if s["input_slices_left_out"]:
        sl += f", {s['input_slices_left_out']} input slice(s) in no derived series"
    parts.append(sl)
    return "; ".join(parts)
