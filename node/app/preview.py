"""A PNG preview: original / derived / uncertainty at one matching position, axial and coronal (pillow).

Original and derived panels share one window: the source series' own (median over its slices,
``node.series.series_window``), else its 1st..99th percentile; a MONOCHROME1 source is shown as a viewer shows it
(lowest value white).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from node.series import SeriesVolume, load_series, load_volumes, series_photometric, series_window

log = logging.getLogger(__name__)

PANEL = 256  # pixels, height of each panel


def _window(vol: SeriesVolume) -> tuple[float, float]:
    """(lowest, highest) modality value of the grey ramp: the series' first window (median over its slices)."""
    win = series_window(vol)
    if win is not None:
        c, w = win[0][0], win[1][0]
        return c - w / 2, c + w / 2
    lo, hi = np.percentile(vol.data, [1, 99])
    return float(lo), float(max(hi, lo + 1))


def _to_image(img: np.ndarray, lo: float, hi: float, mm: tuple[float, float], scale: float,
              invert: bool = False) -> Image.Image:
    """``img`` (rows, cols) windowed to 8 bits (``invert``: MONOCHROME1, lo shown white), resized to ``scale``
    pixels per mm (row, col spacing ``mm``)."""
    a = np.clip((img.astype(np.float64) - lo) / max(hi - lo, 1e-6), 0, 1)
    if invert:
        a = 1.0 - a
    im = Image.fromarray((a * 255).astype(np.uint8))
    h = max(1, int(round(img.shape[0] * mm[0] * scale)))
    w = max(1, int(round(img.shape[1] * mm[1] * scale)))
    return im.resize((w, h), Image.Resampling.BILINEAR)


def _axial(vol: SeriesVolume, k: int) -> tuple[np.ndarray, tuple[float, float]]:
    return vol.data[k], (vol.spacing[1], vol.spacing[2])


def _coronal(vol: SeriesVolume) -> tuple[np.ndarray, tuple[float, float]]:
    """Middle row through all slices (z, x), top = last slice."""
    y = vol.shape[1] // 2
    return vol.data[::-1, y, :], (vol.spacing[0], vol.spacing[2])


def write_preview(original: Sequence[Path], derived: Sequence[Path], uncertainty: Sequence[Path], png: Path) -> Path:
    """Write the preview PNG (first derived run when the series was split); returns its path.

    Panels are scaled to millimetres (axial row: 256 px high); grey levels follow the original's first
    WindowCenter / WindowWidth, else its 1st..99th percentile; sigma spans 0..its 99.5th percentile. Raises
    VolumeError (a series cannot be loaded), IndexError when ``derived`` is empty, OSError.
    """
    orig = load_volumes(original)[0]  # a series of several volumes: the first, as the first derived series
    dparent = Path(derived[0]).parent
    der = load_series([p for p in derived if Path(p).parent == dparent])
    sig_files = [p for p in uncertainty if Path(p).parent.name == dparent.name.replace("derived", "uncertainty")]
    sig = load_series(sig_files or list(uncertainty)) if uncertainty else None
    # the input slice nearest the middle of the derived stack, and the derived slice at the same position
    mid = der.positions[der.shape[0] // 2] @ der.normal
    i = int(np.argmin(np.abs(orig.positions @ orig.normal - mid)))
    k = int(np.argmin(np.abs(der.positions @ der.normal - orig.positions[i] @ orig.normal)))
    lo, hi = _window(orig)
    inv = series_photometric(orig)[0] == "MONOCHROME1"
    oa, oa_mm = _axial(orig, i)
    oc, oc_mm = _coronal(orig)
    s_ax = PANEL / (oa.shape[0] * oa_mm[0])  # pixels per mm, the same for every panel of a row
    s_co = PANEL / max(oc.shape[0] * oc_mm[0], oc.shape[1] * oc_mm[1] / 2)
    da, da_mm = _axial(der, k)
    row1 = [("original", _to_image(oa, lo, hi, oa_mm, s_ax, inv)),
            ("derived", _to_image(da, lo, hi, da_mm, s_ax, inv))]
    dc, dc_mm = _coronal(der)
    row2 = [("original coronal", _to_image(oc, lo, hi, oc_mm, s_co, inv)),
            ("derived coronal", _to_image(dc, lo, hi, dc_mm, s_co, inv))]
    if sig is not None:
        smax = float(np.percentile(sig.data, 99.5)) or 1.0
        sa, sa_mm = _axial(sig, min(k, sig.shape[0] - 1))
        row1.append(("uncertainty (sigma)", _to_image(sa, 0.0, smax, sa_mm, s_ax)))
        sc, sc_mm = _coronal(sig)
        row2.append(("sigma coronal", _to_image(sc, 0.0, smax, sc_mm, s_co)))
    width = max(sum(im.width for _, im in row) for row in (row1, row2)) + 10 * (len(row1) + 1)
    heights = [max(im.height for _, im in row) for row in (row1, row2)]
    canvas = Image.new("L", (width, sum(heights) + 2 * 24 + 10), 0)
    draw = ImageDraw.Draw(canvas)
    y = 10
    for r, row in enumerate((row1, row2)):
        x = 10
        for label, im in row:
            canvas.paste(im, (x, y + 14))
            draw.text((x, y), label, fill=255)
            x += im.width + 10
        y += heights[r] + 24
    png.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(png)
    log.info("preview written: %s", png)
    return png
