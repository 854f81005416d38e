"""The eval picture names the plane it shows from the volume's patient axes (a sagittal MPRAGE's cut was titled
"central coronal slice" over an axial brain slice: helper user19), with orientation letters, a scale bar and
panels of one size."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from node.bench.eval import panel, shown_plane

AXIAL = np.array([[0.0, 0.0, 1.0], [0.0, 1.0, 0.0], [1.0, 0.0, 0.0]])  # normal, IOP[3:6], IOP[0:3]
SAGITTAL = np.array([[-1.0, 0.0, 0.0], [0.0, 0.0, -1.0], [0.0, 1.0, 0.0]])  # MPRAGE: IOP 0\1\0\0\0\-1


@pytest.mark.parametrize(("directions", "axis", "plane", "down", "right"), [
    (AXIAL, "through", "coronal", "H", "L"),
    (AXIAL, "in", "axial", "P", "L"),
    (SAGITTAL, "through", "axial", "R", "P"),
    (SAGITTAL, "in", "sagittal", "F", "P"),
])
def test_the_plane_is_named_from_the_patient_axes(directions: np.ndarray, axis: str, plane: str, down: str,
                                                   right: str) -> None:
    assert shown_plane(axis, directions) == (plane, down, right)


def test_an_oblique_cut_says_so_and_an_unknown_orientation_too() -> None:
    tilted = np.array([[0.0, -0.6, 0.8], [0.0, 0.8, 0.6], [1.0, 0.0, 0.0]])  # 37 degrees about x
    assert shown_plane("in", tilted)[0] == "oblique, nearest axial"
    assert shown_plane("through", None)[0] == "coronal (orientation unknown)"


def test_the_picture_of_a_sagittal_volume_is_titled_axial_with_panels_of_one_size(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    truth = rng.normal(100.0, 10.0, (9, 20, 24)).astype(np.float32)
    outs = {"engine": truth + 1.0, "cubic": truth + 2.0}
    doc = {"series": "mpr", "factor": 2, "engine": {"psnr_db": 30.0}, "cubic": {"psnr_db": 28.0},
           "uncertainty": {"coverage_95": 0.95}, "engine_name": "selfsup"}
    png = tmp_path / "p.png"
    title = panel(png, truth, outs, np.ones_like(truth), "through", (1.8, 0.9, 0.9), doc, SAGITTAL)
    assert "central axial slice" in title and "coronal" not in title
    assert png.stat().st_size > 1000
