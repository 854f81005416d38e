"""A PNG preview that explains itself (matplotlib, Agg; no display needed).

Three rows of panels, the acquisition plane first, then the two orthogonal planes (``node.app.preview_planes``:
oriented as viewers show them, letters on the edges, square millimetre pixels), and three columns: original,
derived, uncertainty (sigma, from the Parametric Map: ``load_sigma``). Original and derived share the source series' own window (median over its slices,
``node.series.series_window``) when it holds a third of the body's voxels, else its 1st..99th percentile, stated in
each grey panel; sigma runs 0 to its 99th percentile, as the map's own window (``display_max``); a MONOCHROME1 source is
shown as a viewer shows it (lowest value white). Sigma has a colour map and a colour bar in the modality's units
(HU for CT). The title names the derived series, the engine and the factors as the derived objects record them.
The PNG's text chunks hold the panel boxes (``srnode-panels``, JSON) for tests and tools.
"""

from __future__ import annotations

import dataclasses
import logging
import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pydicom

from node.app.preview_panels import Panel, draw_figure
from node.app.preview_planes import PLANES, acquisition_plane, cut, shown_spacing, volume_centre
from node.derived.modules import PARAMETRIC_MAP_STORAGE
from node.derived.uncertainty import display_max, units
from node.errors import VolumeError
from node.series import SeriesVolume, load_series, load_volumes, series_photometric, series_window

log = logging.getLogger(__name__)

DISPLAY_PX = 500  # pixels across the longer side of a cut, at least (resampled linearly, as viewers do)


# the series' own window is used when at least this share of the body's voxels lie inside it: a brain window
# (W80 L40) holds 58 % of the real GE head CT's body voxels, but 8 % of the plastic head phantom's (all white)
MIN_BODY_IN_WINDOW = 1 / 3


def _body(data: np.ndarray, modality: str) -> np.ndarray:
    """The body's voxels (every 2nd slice, 4th row and column): CT above -500 HU, else above 10 % of the 99th
    percentile (as ``models.evaluate.body_mask``, without its filling)."""
    sub = data[::2, ::4, ::4]
    cut = -500.0 if modality.upper() == "CT" else 0.1 * float(np.percentile(sub, 99))
    return sub[sub > cut]


def window(vol: SeriesVolume) -> tuple[float, float, str]:
    """(lowest, highest) modality value of the grey ramp and where it comes from, said in the panels: the
    series' first window (median over its slices) when it holds at least ``MIN_BODY_IN_WINDOW`` of the body's
    voxels, else the volume's 1st..99th percentile (naming the series window it replaces and its share)."""
    win = series_window(vol)
    if win is not None:
        c, w = win[0][0], win[1][0]
        lo, hi = c - w / 2, c + w / 2
        body = _body(vol.data, vol.modality)
        share = float(np.mean((body >= lo) & (body <= hi))) if body.size else 1.0
        if share >= MIN_BODY_IN_WINDOW:
            return lo, hi, "series window"
        note = f"\n(series W{w:g} L{c:g}: {share:.0%} of body)"  # own line: the panel is ~40 characters wide
    else:
        note = ""
    lo, hi = np.percentile(vol.data, [1, 99])
    return float(lo), float(max(hi, lo + 1)), "1st-99th percentile" + note


def _groups(paths: Sequence[Path]) -> list[tuple[str, list[Path]]]:
    """Files grouped by folder (one derived series per folder: derived, derived-run2, derived-vol1...), in order."""
    out: dict[str, list[Path]] = {}
    for p in paths:
        out.setdefault(Path(p).parent.name, []).append(Path(p))
    return list(out.items())


def _source_volume(found: list[SeriesVolume], der: SeriesVolume) -> SeriesVolume:
    """The original volume the derived series was made from (its first source image), else the first."""
    src = der.datasets[0].get("SourceImageSequence") or []
    uid = str(src[0].get("ReferencedSOPInstanceUID", "")) if len(src) else ""
    for vol in found:
        if any(rec.sop_instance_uid == uid for rec in vol.datasets.records):  # records: no header read again
            return vol
    return found[0]


def derivation(der: SeriesVolume, orig: SeriesVolume) -> dict[str, str]:
    """What the derived objects say made them: engine (and version), factors, fallback, description."""
    ds = der.datasets[0]
    text = str(ds.get("DerivationDescription", "") or "")
    engine, version = "", ""
    for item in ds.get("ContributingEquipmentSequence") or []:
        versions = item.get("SoftwareVersions") or []
        versions = [versions] if isinstance(versions, str) else list(versions)
        if str(item.get("Manufacturer", "")) == "srnode" and len(versions) >= 3:
            engine, _, version = str(versions[-1]).partition(" ")
    m = re.search(r"x(\d+) through-plane, x(\d+) in-plane by engine (\S+)", text)
    if m and not engine:
        engine = m.group(3)
    if m:
        f, g = int(m.group(1)), int(m.group(2))
    else:  # from the geometry
        f = max(1, round(orig.spacing[0] / der.spacing[0]))
        g = max(1, round(orig.spacing[2] / der.spacing[2]))
    factors = f"x{f} through-plane" + (f", x{g} in-plane" if g > 1 else "")
    fb = re.search(r"fallback: ([^;]+)", text)
    if "+denoise" in str(ds.get("SeriesDescription", "")):
        engine += "+denoise"
    return {"engine": engine or "unknown", "version": version, "factors": factors,
            "fallback": fb.group(1).strip() if fb else "",
            "description": str(ds.get("SeriesDescription", "") or "")}


def sigma_units(orig: SeriesVolume) -> tuple[str, str]:
    """Sigma's units, short and long, as the uncertainty map states them (``node.derived.uncertainty.units``):
    ('HU', 'HU') for a CT in HU, ('mg/mL', 'mg/mL') for an iodine map, ('a.u.', 'MR signal, arbitrary units')."""
    _, short, long = units(orig.modality, orig.rescale_type)
    return short, long


def load_sigma(files: Sequence[Path], der: SeriesVolume) -> SeriesVolume | None:
    """Sigma on the derived grid: the Parametric Map among ``files`` (float frames placed on the derived slices by
    their positions, 1 µm), else grey single-frame uncertainty images (srnode before the map) loaded as a series;
    None when there is neither (no uncertainty, or only the colour card, which is a picture, not values).

    Raises VolumeError when a map's frames do not lie on the derived slices.
    """
    heads = [(Path(p), pydicom.dcmread(p, stop_before_pixels=True)) for p in files]
    maps = [p for p, h in heads if str(h.get("SOPClassUID", "")) == PARAMETRIC_MAP_STORAGE]
    if maps:
        ds = pydicom.dcmread(maps[0])
        frames = np.asarray(ds.pixel_array, dtype=np.float32).reshape(-1, int(ds.Rows), int(ds.Columns))
        ipps = np.array([[float(v) for v in f.PlanePositionSequence[0].ImagePositionPatient]
                         for f in ds.PerFrameFunctionalGroupsSequence])
        dist = np.linalg.norm(der.positions[:, None, :] - ipps[None, :, :], axis=2)  # (derived slice, frame)
        idx = np.argmin(dist, axis=1)
        if frames.shape[1:] != der.data.shape[1:] or float(dist[np.arange(len(idx)), idx].max()) > 1e-3:
            raise VolumeError(f"uncertainty map {maps[0].name}: its frames do not lie on the derived slices")
        return dataclasses.replace(der, data=frames[idx])
    grey = [p for p, h in heads if int(h.get("SamplesPerPixel", 1) or 1) == 1]
    return load_series(grey) if grey else None


def write_preview(original: Sequence[Path], derived: Sequence[Path], uncertainty: Sequence[Path], png: Path,
                  *, dpi: int = 100) -> Path:
    """Write the preview PNG of the first derived series (the title says which when there are several) to
    ``png`` (the caller names one file per job); returns its path.

    Raises VolumeError (a series cannot be loaded), IndexError when ``derived`` is empty, OSError.
    """
    groups = _groups(derived)
    dname, dfiles = groups[0]
    der = load_series(dfiles)
    orig = _source_volume(load_volumes(original), der)
    sname = dname.replace("derived", "uncertainty", 1)
    sig_files = [p for p in uncertainty if Path(p).parent.name == sname]
    if not sig_files and len(groups) == 1:
        sig_files = list(uncertainty)
    sig = load_sigma(sig_files, der)
    made = derivation(der, orig)
    has_sigma = sig is not None and float(np.max(sig.data)) > 0  # all zero: "no uncertainty", no flat map
    # the map's own window (its WindowWidth, node.derived.uncertainty): 0 to sigma's 99th percentile
    smax = display_max(sig.data) if sig is not None and has_sigma else 0.0

    # the cut point: the middle of the derived volume, moved onto the original slice nearest it
    point = volume_centre(der)
    t = orig.positions @ orig.normal
    i = int(np.argmin(np.abs(t - point @ orig.normal)))
    point = point + orig.normal * (t[i] - point @ orig.normal)
    acquired = acquisition_plane(orig)
    lo, hi, wsource = window(orig)
    invert = series_photometric(orig)[0] == "MONOCHROME1"
    units, units_long = sigma_units(orig)
    srange = f"\u03c3 0\u2013{smax:.3g} {units}\n(its 99th percentile)"
    rows: list[list[Panel]] = []
    for plane in [acquired] + [p for p in PLANES if p != acquired]:
        # square pixels no coarser than the finer series nor than the panel's (~500 px across the longer side)
        (o_step, o_span), (d_step, _) = shown_spacing(orig, plane), shown_spacing(der, plane)
        pix = min(o_step, d_step, max(o_span, 1.0) / DISPLAY_PX)
        ocut, dcut = cut(orig, plane, point, pix), cut(der, plane, point, pix)
        where = "acquisition plane" if plane == acquired else "reformat"
        n = (f", slice {ocut.index + 1}/{orig.shape[0]}", f", slice {dcut.index + 1}/{der.shape[0]}") \
            if plane == acquired else ("", "")
        row = [Panel("original", f"original {plane} ({where}{n[0]})", ocut, (lo, hi), wsource, invert),
               Panel("derived", f"derived {plane} ({where}{n[1]})", dcut, (lo, hi), wsource, invert)]
        scut = cut(sig, plane, point, pix) if sig is not None and has_sigma else None
        row.append(Panel("sigma", f"uncertainty \u03c3 {plane}", scut, (0.0, smax), srange, False))
        rows.append(row)

    engine = made["engine"] + (f" (version {made['version']})" if made["version"] else "")
    title = [f"srnode preview: {made['description']}",
             f"engine {engine}, {made['factors']}" + (f"  (fallback: {made['fallback']})" if made["fallback"] else ""),
             f"original: {orig.modality} {_shape(orig)}" + (f", {orig.volume_label}" if orig.volume else "")
             + (";  MONOCHROME1, shown inverted as viewers do" if invert else ""),
             f"derived:  {_shape(der)}"]
    if len(groups) > 1:
        title.append(f"showing derived series 1 of {len(groups)} ({dname}); also: "
                     + ", ".join(g for g, _ in groups[1:]))
    no_sigma = "" if has_sigma else f"no uncertainty (engine {made['engine']})"
    png = Path(png)
    png.parent.mkdir(parents=True, exist_ok=True)
    legend = f"\u03c3 ({units_long}); bright = engine unsure"  # short: it runs along the colour bar's height
    if der.shape[0] > orig.shape[0]:  # new slices between acquired ones: calibrated per slice phase
        legend += "; new slices less sure (stripes)"
    draw_figure(rows, title, legend, no_sigma, png, dpi)
    log.info("preview written: %s", png)
    return png


def _shape(vol: SeriesVolume) -> str:
    """'28×512×512, 5 mm steps, 0.451×0.451 mm pixels' (irregular steps and gantry tilt said)."""
    z, y, x = vol.shape
    steps = f"irregular steps (median {vol.spacing[0]:.3g} mm)" if vol.irregular else f"{vol.spacing[0]:.3g} mm steps"
    tilt = f", gantry tilt {vol.tilt_deg:.1f}\u00b0" if vol.tilt_deg > 0.5 else ""
    return f"{z}\u00d7{y}\u00d7{x}, {steps}, {vol.spacing[1]:.3g}\u00d7{vol.spacing[2]:.3g} mm pixels{tilt}"
