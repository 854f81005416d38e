"""The preview PNG (``node.app.preview``): which array axis is which patient direction (a marker voxel at a known
patient position must land where a viewer shows it), and whole previews of a generated phantom, an axial CT and a
sagittal MR (shared data; skipped when absent): 9 labelled panels in 3 planes, the acquisition plane first."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest
from PIL import Image

from node.app.demo import preview_path
from node.app.phantom import write_phantom_series
from node.app.preview import write_preview
from node.app.preview_planes import Cut, acquisition_plane, cut, orientation_letters, patient_axes
from node.config import DEFAULTS, config_from_dict
from node.process import process_series
from node.series import SeriesVolume
from tests.support.engines import SIGMA_TEST_ENGINE, sigma_engines
from tests.support.fixtures import shared_series

# ------------------------------------------------------------------------------------------------ orientation


def _volume(row: tuple[float, ...], col: tuple[float, ...], shape: tuple[int, int, int],
            spacing: tuple[float, float, float], origin: tuple[float, ...]) -> SeriesVolume:
    """A volume of zeros with IOP (row, col), slices stepping ``spacing[0]`` along row x col from ``origin``."""
    r, c = np.asarray(row, float), np.asarray(col, float)
    n = np.cross(r, c)
    positions = np.asarray(origin, float) + np.arange(shape[0])[:, None] * spacing[0] * n
    return SeriesVolume(data=np.zeros(shape, np.float32), spacing=spacing, slice_thickness=spacing[0], modality="MR",
                        positions=positions, row_cosine=r, col_cosine=c, normal=n, datasets=[], series_uid="1.2",
                        sop_class_uid="")


def _voxel(vol: SeriesVolume, p: np.ndarray) -> tuple[int, int, int]:
    """The (slice, row, column) of the voxel at patient position ``p`` (exact grid positions only)."""
    rel = p - vol.positions[0]
    k, i, j = rel @ vol.normal / vol.spacing[0], rel @ vol.col_cosine / vol.spacing[1], rel @ vol.row_cosine / vol.spacing[2]
    assert np.allclose([k, i, j], np.round([k, i, j]), atol=1e-6)
    return int(round(k)), int(round(i)), int(round(j))


def _marker_at(c: Cut) -> tuple[float, float]:
    """(mm down, mm right) from the cut's point of the brightest pixel of ``c.image``."""
    r, q = np.unravel_index(np.nanargmax(c.image), c.image.shape)
    return float(c.rows_mm[r]), float(c.cols_mm[q])


def _sagittal() -> SeriesVolume:
    # sagittal: columns run anterior -> posterior (+y), rows head -> feet (-z); normal = row x col = -x (towards R)
    return _volume((0, 1, 0), (0, 0, -1), (40, 60, 50), (2.0, 1.0, 1.5), (30.0, -40.0, 50.0))


def test_orientation_letters() -> None:
    assert [orientation_letters(np.array(v, float)) for v in ((1, 0, 0), (-1, 0, 0), (0, 1, 0), (0, -1, 0),
                                                            (0, 0, 1), (0, 0, -1))] == ["L", "R", "P", "A", "H", "F"]
    assert orientation_letters(np.array([0, -0.8, 0.6])) == "AH"
    assert orientation_letters(np.array([0.1, -0.99, 0.0])) == "A"  # small obliquity: one letter


def test_sagittal_volume_axes_and_a_marker_in_each_plane() -> None:
    vol = _sagittal()
    assert patient_axes(vol) == (0, 2, 1)  # slices along x (L-R), rows along z (H-F), columns along y (A-P)
    assert acquisition_plane(vol) == "sagittal"
    centre = vol.positions[20] + vol.col_cosine * 30 + vol.row_cosine * 25 * 1.5
    # a marker 12 mm to the patient's left, 9 mm anterior and 10 mm up from the centre (all on grid points)
    marker = centre + np.array([12.0, -9.0, 10.0])
    vol.data[_voxel(vol, marker)] = 1000.0
    point = marker.copy()  # cut every plane through the marker
    ax = cut(vol, "axial", point, 0.5)
    # axial: down the image = posterior (+y), to the right = the patient's left (+x); its axes are y and x
    assert np.allclose(ax.down, [0, 1, 0]) and np.allclose(ax.right, [1, 0, 0])
    assert ax.edges() == {"top": "A", "bottom": "P", "left": "R", "right": "L"}
    assert _marker_at(ax) == pytest.approx((0.0, 0.0), abs=0.51)
    # moved off the marker: the marker appears where its patient offset says, anterior = up, left = right
    ax2 = cut(vol, "axial", centre + np.array([0.0, 0.0, 10.0]), 0.5)
    assert _marker_at(ax2) == pytest.approx((-9.0, 12.0), abs=0.51)
    co = cut(vol, "coronal", centre + np.array([0.0, -9.0, 0.0]), 0.5)
    assert co.edges() == {"top": "H", "bottom": "F", "left": "R", "right": "L"}
    assert _marker_at(co) == pytest.approx((-10.0, 12.0), abs=0.51)  # head up, patient's left on the right
    sa = cut(vol, "sagittal", centre + np.array([12.0, 0.0, 0.0]), 0.5)
    assert sa.edges() == {"top": "H", "bottom": "F", "left": "A", "right": "P"}
    assert _marker_at(sa) == pytest.approx((-10.0, -9.0), abs=0.51)  # head up, anterior on the left
    # square pixels over the physical extent: 40 slices x 2 mm across L-R, 50 columns x 1.5 mm along A-P
    assert ax.image.shape == (int(round(49 * 1.5 / 0.5)) + 1, int(round(39 * 2.0 / 0.5)) + 1)


def test_coronal_and_axial_volumes() -> None:
    co = _volume((1, 0, 0), (0, 0, -1), (10, 20, 30), (3.0, 1.0, 1.0), (0, 0, 0))
    assert acquisition_plane(co) == "coronal" and patient_axes(co) == (1, 2, 0)
    ax = _volume((1, 0, 0), (0, 1, 0), (10, 20, 30), (3.0, 1.0, 1.0), (0, 0, 0))
    assert acquisition_plane(ax) == "axial" and patient_axes(ax) == (2, 1, 0)
    ax.data[4, 5, 25] = 1.0  # 5 mm posterior, 25 mm left, 12 mm up of the origin
    c = cut(ax, "coronal", np.array([0.0, 5.0, 0.0]), 1.0)
    assert c.edges()["top"] == "H" and c.index == 5  # cut across rows (y)
    assert _marker_at(c) == pytest.approx((-12.0, 25.0), abs=0.01)


def test_rows_running_head_to_feet_are_turned_upright() -> None:
    # sagittal slices whose columns run head -> feet and rows anterior -> posterior (the image is transposed)
    vol = _volume((0, 0, -1), (0, 1, 0), (8, 30, 40), (2.0, 1.0, 1.0), (0.0, 0.0, 0.0))
    assert acquisition_plane(vol) == "sagittal"
    vol.data[3, 12, 7] = 1.0  # 12 mm posterior, 7 mm down of the origin
    c = cut(vol, "sagittal", np.array([6.0, 0.0, 0.0]), 1.0)  # normal = row x col = +x: slice 3 is 6 mm left
    assert c.index == 3 and c.edges() == {"top": "H", "bottom": "F", "left": "A", "right": "P"}
    assert _marker_at(c) == pytest.approx((7.0, 12.0), abs=0.01)


def test_gantry_tilt_is_drawn_where_the_voxels_are() -> None:
    # axial slices 3 mm apart along z, each shifted 1 mm posterior (a sheared, gantry-tilted stack)
    shape, n = (12, 40, 30), np.array([0.0, 0.0, 1.0])
    vol = _volume((1, 0, 0), (0, 1, 0), shape, (3.0, 1.0, 1.0), (0.0, 0.0, 0.0))
    vol.positions = np.stack([np.array([0.0, 1.0 * k, 3.0 * k]) for k in range(shape[0])])
    vol.normal = n
    vol.data[6, 10, 15] = 1.0
    marker = np.array([15.0, 10.0 + 6.0, 18.0])
    below = cut(vol, "sagittal", marker - np.array([0.0, 0.0, 9.0]), 0.5)  # 3 slices down: shifted 3 mm less
    assert _marker_at(below) == pytest.approx((-9.0, 0.0), abs=0.26)
    ax = cut(vol, "axial", marker, 0.5)
    assert _marker_at(ax) == pytest.approx((0.0, 0.0), abs=0.26)


# ------------------------------------------------------------------------------------------------ whole previews


def _read(png: Path) -> tuple[list[dict[str, Any]], list[str], np.ndarray]:
    """The PNG's panels (boxes, titles, notes), header lines and grey pixels; checks every panel's box."""
    with Image.open(png) as im:
        assert im.mode == "RGB"
        text: dict[str, str] = im.text  # type: ignore[attr-defined]
        a = np.asarray(im.convert("L"), dtype=np.float32)
    boxes: list[dict[str, Any]] = json.loads(text["srnode-panels"])
    assert [b["column"] for b in boxes] == ["original", "derived", "sigma"] * 3
    assert len({b["plane"] for b in boxes}) == 3 and all(len({b["plane"] for b in boxes[r:r + 3]}) == 1
                                                         for r in (0, 3, 6))
    for b in boxes:
        x0, y0, x1, y1 = b["box"]
        assert 300 <= x1 - x0 <= 500 and 150 <= y1 - y0 <= 520
        assert x1 <= a.shape[1] and y1 <= a.shape[0]
        assert b["plane"] in b["title"]
        if b["column"] != "sigma":
            assert float(np.std(a[y0:y1, x0:x1])) > 10, b  # an image, not a flat panel
            assert b["note"].startswith("W ") and "L " in b["note"]  # the window, stated
    return boxes, json.loads(text["srnode-title"]), a


def _run(tmp_path: Path, files: list[Path], engine: str = "cubic",
         uncertainty: str = "parametric_map") -> tuple[list[Path], list[Path]]:
    cfg = config_from_dict({**DEFAULTS, "rules": [{"name": "all", "match": {"Modality": "^(CT|MR)$"},
                                                   "through_plane_factor": 2}],
                            "derive": {"uncertainty": uncertainty}})
    res = process_series(files, cfg.rules[0], cfg, tmp_path / "out", engine_name=engine, engines=sigma_engines())
    return res.derived_files, res.uncertainty_files


def test_phantom_preview(tmp_path: Path) -> None:
    files = write_phantom_series(tmp_path / "in", slices=12, size=96, step_mm=4.0)
    derived, unc = _run(tmp_path, files)
    png = write_preview(files, derived, unc, tmp_path / "preview-job7.png")
    assert png == tmp_path / "preview-job7.png" and png.stat().st_size > 10_000
    boxes, title, _ = _read(png)
    assert [b["plane"] for b in boxes[::3]] == ["axial", "coronal", "sagittal"]
    assert "acquisition plane, slice 6/12" in boxes[0]["title"] and "reformat" in boxes[3]["title"]
    assert "engine cubic" in title[1] and "x2 through-plane" in title[1] and "SR x2 cubic" in title[0]
    # cubic: sigma all zero -> said in words in every sigma panel, no flat map
    assert all(b["note"] == "no uncertainty (engine cubic)" for b in boxes[2::3])
    # a second job: its own file, the first left alone; no uncertainty files at all: said the same way
    before = png.read_bytes()
    boxes8, _, _ = _read(write_preview(files, derived, [], tmp_path / "preview-job8.png"))
    assert png.read_bytes() == before
    assert all(b["note"] == "no uncertainty (engine cubic)" for b in boxes8[2::3])


def test_sigma_gets_a_colour_bar_in_hu(tmp_path: Path) -> None:
    files = write_phantom_series(tmp_path / "in", slices=10, size=64, step_mm=4.0)
    derived, unc = _run(tmp_path, files)  # cubic: no sigma object
    assert unc == []
    # an engine with sigma (a ramp 0..50 HU), the map and the card: the preview reads the map's float frames
    derived_s, with_sigma = _run(tmp_path / "s", files, SIGMA_TEST_ENGINE, "both")
    assert [p.name for p in with_sigma] == ["PM00001.dcm", "SC00001.dcm"]
    boxes, _, a = _read(write_preview(files, derived_s, with_sigma, tmp_path / "p.png"))
    assert all(b["note"].startswith("\u03c3 0\u2013") and " HU" in b["note"] for b in boxes[2::3])
    top = float(boxes[2]["note"].split("\u2013")[1].split()[0])
    assert 45 <= top <= 51  # the 99th percentile of the ramp, in HU, as the map's own window (not 99.5th)
    pm = pydicom.dcmread(with_sigma[0], stop_before_pixels=True)
    voi = pm.SharedFunctionalGroupsSequence[0].FrameVOILUTSequence[0]
    assert top == pytest.approx(float(voi.WindowWidth), rel=2e-3)  # 3 digits shown  # one sigma range: the preview's and the map's
    x0, y0, x1, y1 = boxes[2]["box"]
    assert a.shape[1] > x1 + 60  # the colour bar's room right of the sigma column
    boxes0, _, a0 = _read(write_preview(files, derived, unc, tmp_path / "p0.png"))
    assert a0.shape[1] < a.shape[1]  # no colour bar without sigma


def test_monochrome1_is_shown_inverted(tmp_path: Path) -> None:
    files = write_phantom_series(tmp_path / "in", slices=10, size=64, step_mm=4.0)
    for f in files:
        ds = pydicom.dcmread(f)
        ds.PhotometricInterpretation = "MONOCHROME1"
        ds.save_as(f)
    derived, unc = _run(tmp_path, files)
    boxes, title, a = _read(write_preview(files, derived, unc, tmp_path / "m1.png"))
    assert boxes[0]["note"].startswith("W 80  L 40, inverted") and "MONOCHROME1, shown inverted" in title[2]
    x0, y0, x1, y1 = boxes[0]["box"]
    corner = a[y0 + 40:y0 + 60, x0 + 50:x0 + 70]  # air (-1000 HU) inside the field of view: white
    assert float(np.mean(corner)) > 200


def test_several_derived_series_the_first_is_shown(tmp_path: Path) -> None:
    files = sorted(shared_series("mr_fmri_philips_3volumes").rglob("*.dcm"))
    derived, unc = _run(tmp_path, files)
    assert len({p.parent for p in derived}) == 3
    boxes, title, _ = _read(write_preview(files, derived, unc, tmp_path / "f.png"))
    assert any(line.startswith("showing derived series 1 of 3 (derived-vol1)") for line in title), title


def test_axial_ct_preview(tmp_path: Path) -> None:
    files = sorted(shared_series("ct_head_phantom_philips_5mm").glob("*.dcm"))
    derived, unc = _run(tmp_path, files)
    boxes, title, a = _read(write_preview(files, derived, unc, tmp_path / "ct.png"))
    assert [b["plane"] for b in boxes[::3]] == ["axial", "coronal", "sagittal"]
    assert "acquisition plane, slice 14/28" in boxes[0]["title"] and title[2].startswith("original: CT 28\u00d7512\u00d7512")
    assert title[3].startswith("derived:  55\u00d7512\u00d7512, 2.5 mm steps")
    assert 1100 <= a.shape[1] <= 1500 and 900 <= a.shape[0] <= 1700
    # the series' own brain window (W80 L40) holds 7 % of this plastic phantom's body (all white in it, user19):
    # the volume's 1st-99th percentile instead, saying which window it replaces and why
    note = boxes[0]["note"]
    assert "1st-99th percentile\n(series W80 L40: 7% of body)" in note, note
    w = float(note.split()[1])
    assert w > 1000  # air to plastic


def test_sagittal_mr_preview(tmp_path: Path) -> None:
    files = sorted(shared_series("mr_t1_mprage_sag_siemens").rglob("*.dcm"))
    derived, unc = _run(tmp_path, files)
    boxes, _, a = _read(write_preview(files, derived, unc, tmp_path / "mr.png"))
    assert [b["plane"] for b in boxes[::3]] == ["sagittal", "axial", "coronal"]
    # the axial reformat spans 220 mm A-P (down) and 173 mm L-R (across): taller than wide, not squashed
    x0, y0, x1, y1 = boxes[3]["box"]
    assert (y1 - y0) / (x1 - x0) == pytest.approx(220 / 173, rel=0.05)


def test_demo_names_one_preview_per_job(tmp_path: Path) -> None:
    assert preview_path(tmp_path, 3) == tmp_path / "preview-job3.png"
    (tmp_path / "preview-job3.png").write_bytes(b"an earlier demo's job 3")
    (tmp_path / "preview-job3-2.png").write_bytes(b"and another")
    assert preview_path(tmp_path, 3) == tmp_path / "preview-job3-3.png"  # never overwritten
