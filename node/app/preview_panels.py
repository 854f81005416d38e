"""Drawing the preview (``node.app.preview``): a grid of panels laid out in inches, each with its plane's
orientation letters on the edges, its window or colour map, a millimetre scale bar; one colour bar for sigma.

matplotlib is imported here only, through its object API on the Agg canvas (no pyplot, no display, no global
state), so the node does not pay for it unless a preview is drawn.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from PIL.PngImagePlugin import PngInfo

from node.app.preview_planes import Cut

PANEL_W = 3.8  # inches, every panel's width
ROW_H = (1.8, 5.0)  # inches, lowest / highest panel height (the image is padded to the box, never squashed)
GAP = 0.3  # inches between panels
TITLE_H = 0.36  # inches above each panel for its title
LINE_H = 0.27  # inches per header line
MARGIN = 0.25
CBAR = (0.18, 0.22, 1.05)  # inches: gap, bar width, room for ticks and label
BG, FG, LETTER = "#0b0b0b", "#e6e6e6", "#ffd54a"


@dataclass(frozen=True)
class Panel:
    """One panel: its ``column`` ('original', 'derived', 'sigma'), title, cut (None: nothing to show), value
    range (lo, hi) mapped to the colour ramp, where that range comes from, MONOCHROME1 (inverted grey)."""

    column: str
    title: str
    cut: Cut | None
    vrange: tuple[float, float]
    vsource: str
    invert: bool


def _limits(row: list[Panel]) -> tuple[float, float, float, float, float]:
    """(left, right, top, bottom) mm shared by a row's panels, padded to the panel box; and the box height."""
    ext = [p.cut.extent for p in row if p.cut is not None]
    left, right = min(e[0] for e in ext), max(e[1] for e in ext)
    top, bottom = min(e[3] for e in ext), max(e[2] for e in ext)
    w, h = right - left, bottom - top
    height = min(max(PANEL_W * h / w, ROW_H[0]), ROW_H[1])
    want = height / PANEL_W  # the box's aspect: pad the image's shorter side to it
    if h / w < want:
        pad = (w * want - h) / 2
        top, bottom = top - pad, bottom + pad
    else:
        pad = (h / want - w) / 2
        left, right = left - pad, right + pad
    return left, right, top, bottom, height


def _scale_bar(ax: Any, lim: tuple[float, float, float, float], effects: list[Any]) -> None:
    """A millimetre bar in the bottom right corner: the longest round length up to a quarter of the width."""
    left, right, top, bottom = lim
    width, height = right - left, bottom - top
    length = max([n for n in (5, 10, 20, 25, 50, 100, 200) if n <= width / 4] or [5])
    x1 = right - 0.04 * width
    y = bottom - 0.05 * height
    ax.plot([x1 - length, x1], [y, y], color=FG, lw=3, solid_capstyle="butt", path_effects=effects)
    ax.text(x1 - length / 2, y - 0.015 * height, f"{length} mm", color=FG, fontsize=10, ha="center", va="bottom",
            path_effects=effects)


def _draw_panel(ax: Any, panel: Panel, lim: tuple[float, float, float, float], no_sigma: str) -> tuple[Any, str]:
    """Draw one panel; returns its image artist (None when nothing is shown) and the note written in it."""
    import matplotlib
    from matplotlib import patheffects

    effects = [patheffects.withStroke(linewidth=3, foreground="black")]
    ax.set_facecolor("black")
    ax.set_xticks([])
    ax.set_yticks([])
    for s in ax.spines.values():
        s.set_color("#555555")
    ax.set_title(panel.title, color=FG, fontsize=11, pad=6)
    left, right, top, bottom = lim
    ax.set_xlim(left, right)
    ax.set_ylim(bottom, top)
    if panel.cut is None:
        ax.text(0.5, 0.5, no_sigma.replace(" (", "\n("), transform=ax.transAxes, color=FG, fontsize=12,
                ha="center", va="center", linespacing=1.5)
        return None, no_sigma
    name = "inferno" if panel.column == "sigma" else ("gray_r" if panel.invert else "gray")
    cmap = matplotlib.colormaps[name].with_extremes(bad="black")
    lo, hi = panel.vrange
    im = ax.imshow(panel.cut.image, cmap=cmap, vmin=lo, vmax=hi, extent=panel.cut.extent, origin="upper",
                   interpolation="antialiased")
    ax.set_xlim(left, right)
    ax.set_ylim(bottom, top)
    edges = panel.cut.edges()
    for key, (x, y, ha, va) in {"top": (0.5, 0.985, "center", "top"), "bottom": (0.5, 0.015, "center", "bottom"),
                                "left": (0.012, 0.5, "left", "center"),
                                "right": (0.988, 0.5, "right", "center")}.items():
        ax.text(x, y, edges[key], transform=ax.transAxes, color=LETTER, fontsize=13, fontweight="bold", ha=ha,
                va=va, path_effects=effects)
    note = panel.vsource  # sigma: its range; grey: the window and where it comes from
    if panel.column != "sigma":
        inv = ", inverted" if panel.invert else ""  # MONOCHROME1: the header says so
        note = f"W {hi - lo:.0f}  L {(hi + lo) / 2:.0f}{inv}\n{panel.vsource}"
    ax.text(0.02, 0.02, note, transform=ax.transAxes, color=FG, fontsize=10, ha="left", va="bottom",
            path_effects=effects, linespacing=1.3)
    _scale_bar(ax, lim, effects)
    return im, note


def draw_figure(rows: list[list[Panel]], header: list[str], sigma_label: str, no_sigma: str, png: Path,
                dpi: int) -> list[dict[str, Any]]:
    """Lay out ``rows`` of panels under the ``header`` lines, draw them and write ``png``; returns the panels'
    boxes (pixels from the top left), titles and notes, also written into its text chunks ``srnode-panels`` (JSON)
    and ``srnode-title`` (JSON list of the header lines)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    lims = [_limits(row) for row in rows]
    head = MARGIN + LINE_H * len(header) + 0.15
    with_bar = any(p.column == "sigma" and p.cut is not None for row in rows for p in row)
    width = MARGIN * 2 + 3 * PANEL_W + 2 * GAP + (sum(CBAR) if with_bar else 0.0)
    height = head + sum(TITLE_H + lim[4] for lim in lims) + GAP * (len(rows) - 1) + MARGIN
    fig = Figure(figsize=(width, height), dpi=dpi, facecolor=BG)
    canvas = FigureCanvasAgg(fig)
    for k, line in enumerate(header):
        fig.text(MARGIN / width, 1 - (MARGIN + LINE_H * k) / height, line, color=FG, ha="left", va="top",
                 fontsize=13 if k == 0 else 11, fontweight="bold" if k == 0 else "normal")
    boxes: list[dict[str, Any]] = []
    image = None
    y = head
    for row, lim in zip(rows, lims, strict=True):
        y += TITLE_H
        h = lim[4]
        for c, panel in enumerate(row):
            x = MARGIN + c * (PANEL_W + GAP)
            ax = fig.add_axes((x / width, 1 - (y + h) / height, PANEL_W / width, h / height))
            im, note = _draw_panel(ax, panel, lim[:4], no_sigma)
            if panel.column == "sigma" and im is not None:
                image = im
            plane = panel.cut.plane if panel.cut is not None else row[0].cut.plane if row[0].cut else ""
            boxes.append({"column": panel.column, "plane": plane, "title": panel.title, "note": note,
                          "box": [round(x * dpi), round(y * dpi), round((x + PANEL_W) * dpi), round((y + h) * dpi)]})
        y += h + GAP
    if image is not None:  # one colour bar for every sigma panel (they share the range)
        x = MARGIN + 3 * PANEL_W + 2 * GAP + CBAR[0]
        top, bottom = head + TITLE_H, y - GAP
        cax = fig.add_axes((x / width, 1 - bottom / height, CBAR[1] / width, (bottom - top) / height))
        bar = fig.colorbar(image, cax=cax)
        bar.set_label(sigma_label, color=FG, fontsize=11)
        bar.ax.tick_params(colors=FG, labelsize=10)
        bar.outline.set_edgecolor("#555555")
    canvas.draw()  # RGB, no alpha: a viewer shows it as it is
    info = PngInfo()
    for key, value in (("Software", "srnode preview"), ("srnode-panels", json.dumps(boxes)),
                       ("srnode-title", json.dumps(header))):
        info.add_text(key, value)
    Image.fromarray(np.asarray(canvas.buffer_rgba())[..., :3]).save(png, pnginfo=info)
    return boxes
