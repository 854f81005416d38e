"""Absurd or overflowing rescales (a RescaleSlope of 1e30, an intercept of 1e20, a slope whose values overflow
float64): either a valid derived slice and Parametric Map (dciodvfy: no error) or a refusal of the series naming
the file and the reason, never an invalid object. Before, a slope of 1e30 gave a Parametric Map whose WindowWidth
(2e31) dciodvfy rejected, and a derived series whose window (the source's 40/80) no longer matched its values."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
import pytest

from models.cubic import CubicEngine
from models.engine import Factors
from node.app.phantom import write_phantom_series
from node.config import DeriveConfig
from node.derived import derive_series
from node.errors import DeriveError, VolumeError
from node.process import write_atomic
from node.series import MAX_MODALITY_ABS, SeriesVolume, load_series
from tests.process.test_process_cli import srnode
from tests.support.peers import dciodvfy


def _series(tmp_path: Path, slope: str, intercept: str | None = None) -> list[Path]:
    files = write_phantom_series(tmp_path / "in", slices=4, size=32, step_mm=3.0)
    for f in files:
        ds = pydicom.dcmread(f)
        ds.RescaleSlope = slope
        if intercept is not None:
            ds.RescaleIntercept = intercept
        ds.save_as(f)
    return files


def _derive_with_sigma(vol: SeriesVolume) -> tuple[pydicom.Dataset, pydicom.Dataset]:
    """Cubic with a sigma of 1 % of each value (an engine's uncertainty scales with the values)."""
    factors = Factors(2, 1)
    res = CubicEngine().upscale(vol.to_engine_input(), factors)
    res.has_sigma = True
    res.sigma = (np.abs(res.data) * 0.01).astype(np.float32)
    out = derive_series(vol, res, factors, DeriveConfig(), CubicEngine.version)
    return out.derived[len(out.derived) // 2], out.uncertainty[0]


@pytest.mark.parametrize(("slope", "intercept"), [("1e30", None), ("1", "1e20"), ("1e300", None),
                                                  ("-1e16", None), ("1e12", None)])
def test_absurd_rescale_is_refused_naming_the_file(tmp_path: Path, slope: str, intercept: str | None) -> None:
    files = _series(tmp_path, slope, intercept)
    with pytest.raises(VolumeError, match=rf"^{files[0].name}: RescaleSlope \S+ / RescaleIntercept \S+ make "
                                          r"modality values up to \S+ in magnitude, beyond the 1e\+15"):
        load_series(files)


@pytest.mark.parametrize(("slope", "intercept"), [("1e6", None), ("2e11", None), ("-3e11", "5e14")])
def test_large_but_holdable_rescale_gives_valid_objects(tmp_path: Path, slope: str, intercept: str | None) -> None:
    vol = load_series(_series(tmp_path, slope, intercept))
    derived, pm = _derive_with_sigma(vol)
    for name, ds in (("slice", derived), ("map", pm)):
        path = tmp_path / f"{name}.dcm"
        write_atomic(ds, path)
        errors, _ = dciodvfy(path)
        assert errors == [], (name, errors)
    back = load_series([tmp_path / "slice.dcm"])  # the derived slice's values are the engine's, within a step
    assert np.isfinite(back.data).all() and float(np.max(np.abs(back.data))) <= MAX_MODALITY_ABS


def test_engine_output_or_sigma_beyond_the_bound_is_refused(tmp_path: Path) -> None:
    vol = load_series(_series(tmp_path, "1"))
    factors = Factors(2, 1)
    res = CubicEngine().upscale(vol.to_engine_input(), factors)
    res.data[0, 0, 0] = 3e15
    with pytest.raises(DeriveError, match=r"the engine's output reaches 3e\+15 in magnitude, beyond the 1e\+15"):
        derive_series(vol, res, factors, DeriveConfig(), CubicEngine.version)
    res = CubicEngine().upscale(vol.to_engine_input(), factors)
    res.has_sigma = True
    res.sigma = np.zeros_like(res.data)
    res.sigma[1, 2, 3] = 1e20
    with pytest.raises(DeriveError, match=r"uncertainty \(sigma\) reaches 1e\+20, beyond the 1e\+15"):
        derive_series(vol, res, factors, DeriveConfig(), CubicEngine.version)


def test_source_window_beyond_the_bound_is_not_copied(tmp_path: Path) -> None:
    files = _series(tmp_path, "1")
    for f in files:
        ds = pydicom.dcmread(f)
        ds.WindowCenter, ds.WindowWidth = "40", "1e19"  # dciodvfy: "negative" (read as a 64-bit integer)
        ds.save_as(f)
    derived, pm = _derive_with_sigma(load_series(files))
    assert "WindowWidth" not in derived
    path = tmp_path / "slice.dcm"
    write_atomic(derived, path)
    assert dciodvfy(path)[0] == []


def test_process_cli_fails_the_series_with_one_line(tmp_path: Path) -> None:
    files = _series(tmp_path, "1e30")
    r = srnode("process", files[0].parent, tmp_path / "out", "--engine", "cubic", "--no-preview")
    assert r.returncode == 1
    lines = [ln for ln in r.stdout.splitlines() if "RescaleSlope 1e+30" in ln]
    assert len(lines) == 1 and files[0].name in lines[0], r.stdout + r.stderr
    assert not list((tmp_path / "out").rglob("*.dcm"))


@pytest.mark.parametrize(("slope", "intercept"), [("1", "1e9"), ("0.5", "-4e8")])
def test_a_rescale_whose_steps_32_bit_floats_cannot_hold_is_refused(tmp_path: Path, slope: str,
                                                                   intercept: str) -> None:
    """Values near 1e9 whose detail is a few units: float32 steps there are 64, so the image would round away
    (measured before: 1.6 % of the input range wrong at an intercept of 1e9, 187x at 1e14, dciodvfy silent)."""
    files = _series(tmp_path, slope, intercept)
    with pytest.raises(VolumeError, match=rf"^{files[0].name}: RescaleSlope \S+ / RescaleIntercept \S+: its steps "
                                          r"of \S+ cannot be held in 32-bit floats"):
        load_series(files)


def test_slopes_orders_of_magnitude_apart_between_slices_are_refused(tmp_path: Path) -> None:
    """One slice at slope 1e11 beside slope-1 slices: normalised by the whole range the slope-1 slices' detail is
    below float32's resolution (it came out as one constant value); refused naming a slope-1 slice."""
    files = _series(tmp_path, "1")
    ds = pydicom.dcmread(files[0])
    ds.RescaleSlope = "1e11"
    ds.save_as(files[0])
    with pytest.raises(VolumeError, match=r"RescaleSlope 1 / RescaleIntercept \S+: its steps of 1 cannot be held"):
        load_series(files)


@pytest.mark.parametrize(("slope", "intercept"), [("1", "1e7"), ("1", "-1024"), ("0.0001", "0"), ("2.5", "-1e5")])
def test_ordinary_and_holdable_rescales_load_exactly(tmp_path: Path, slope: str, intercept: str) -> None:
    files = _series(tmp_path, slope, intercept)
    vol = load_series(files)
    ds = pydicom.dcmread(files[1])
    want = ds.pixel_array.astype(np.float64) * float(slope) + float(intercept)
    got = vol.data[1].astype(np.float64)
    assert np.max(np.abs(got - want)) <= abs(float(slope)) / 2  # every stored step kept
