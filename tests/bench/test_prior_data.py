"""``bench/prior_data.py``: its .npz exports load with ``node.app.volume_file.load_volume`` unchanged, the row restack
(and the column restack) keep the geometry, and no held-out series is in the training set."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import numpy as np

from node.app.volume_file import load_volume
from tests.support.fixtures import ROOT, shared_series


def _prior_data() -> ModuleType:
    spec = importlib.util.spec_from_file_location("prior_data", ROOT / "bench" / "prior_data.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules["prior_data"] = mod  # dataclasses look their module up
    spec.loader.exec_module(mod)
    return mod


def test_export_round_trips_through_load_volume(tmp_path: Path) -> None:
    pd = _prior_data()
    series = shared_series("ct_head_ge_tilted_irregular")
    v = pd.load(series)
    row = pd.save(tmp_path / "ct.npz", v, slice(2, 20, 3), crop=64)
    lo = load_volume(tmp_path / "ct.npz")
    assert lo.vin.data.shape == (6, 64, 64) and row["shape"] == [6, 64, 64]
    y0 = (v.data.shape[1] - 64) // 2
    np.testing.assert_array_equal(lo.vin.data, np.rint(v.data[2:20:3, y0:y0 + 64, y0:y0 + 64]))
    assert lo.vin.spacing[0] == v.spacing[0] * 3 and lo.vin.spacing[1:] == tuple(v.spacing[1:])
    assert lo.vin.modality == "CT" and lo.vin.slice_thickness == v.thickness
    np.testing.assert_allclose(lo.positions, v.positions[2:20:3])


def test_restack_rows_keeps_geometry() -> None:
    pd = _prior_data()
    data = np.arange(4 * 5 * 6, dtype=np.float32).reshape(4, 5, 6)
    v = pd.Vol(data, (2.0, 0.5, 0.7), 2.0, "MR", (0.0, 4095.0), np.array([[0.0, 0.0, 0.0]] * 4) +
               np.arange(4)[:, None] * np.array([2.0, 0.0, 0.0]), np.array([1.0, 0.0, 0.0]), 1, "",
               np.array([0.0, 1.0, 0.0]), np.array([0.0, 0.0, -1.0]))
    r = pd.restack_rows(v)
    assert r.data.shape == (5, 4, 6) and r.spacing == (0.5, 2.0, 0.7)
    np.testing.assert_array_equal(r.data[3], data[:, 3, :])
    np.testing.assert_allclose(r.positions[2], [0.0, 0.0, -1.0])  # two rows of 0.5 mm down the column cosine
    np.testing.assert_allclose(r.normal, [0.0, 0.0, -1.0])


def test_restack_cols_keeps_geometry() -> None:
    pd = _prior_data()
    data = np.arange(4 * 5 * 6, dtype=np.float32).reshape(4, 5, 6)
    v = pd.Vol(data, (2.0, 0.5, 0.7), 2.0, "MR", (0.0, 4095.0), np.array([[0.0, 0.0, 0.0]] * 4) +
               np.arange(4)[:, None] * np.array([2.0, 0.0, 0.0]), np.array([1.0, 0.0, 0.0]), 1, "",
               np.array([0.0, 1.0, 0.0]), np.array([0.0, 0.0, -1.0]))
    c = pd.restack_cols(v)
    assert c.data.shape == (6, 4, 5) and c.spacing == (0.7, 2.0, 0.5)
    np.testing.assert_array_equal(c.data[3], data[:, :, 3])
    np.testing.assert_allclose(c.positions[2], [0.0, 1.4, 0.0])  # two columns of 0.7 mm along the row cosine
    np.testing.assert_allclose(c.normal, [0.0, 1.0, 0.0])
    assert c.row_cosine is not None and c.col_cosine is not None  # columns: the old rows; rows: the old slices
    np.testing.assert_allclose(c.row_cosine, [0.0, 0.0, -1.0])
    np.testing.assert_allclose(c.col_cosine, [1.0, 0.0, 0.0])
    assert all(it.sub for it in pd.TRAIN if it.reformat == "cols")  # kept apart from the recommended set


def test_no_held_out_series_is_trained_on() -> None:
    pd = _prior_data()
    for it in (*pd.TRAIN, *pd.TRAIN_SPLIT):
        where = f"{it.repo}:{it.path} {it.shared}"
        assert "3d_axial_ge" not in where and "05_3D_Ax_T1" not in where, it
        assert "ct_body" not in where and "phantom_philips" not in where and "In/Philips" not in where, it
    assert not any(it.name.startswith("xa30_t1w") for it in pd.TRAIN_SPLIT)
