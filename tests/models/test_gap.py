"""Gap acquisitions (SliceThickness under the step between slices): the engine's training pairs and data
consistency take the acquired slices as thin slices every step (not slabs filling it), and a series on which the engine does worse than cubic along its own z axis
falls back to cubic with the reason (issue #13, helper engine18; docs/engines.md 2026-12-03)."""

from __future__ import annotations

import numpy as np
import pytest

from models import selfsup
from models.degrade import DegradationModel, make_pairs, resample_profile
from models.engine import EngineOptions, Factors, VolumeInput, get_engine
from tests.models.test_engine_selfsup import _phantom


def test_gap_pairs_inputs_are_every_fth_target_slice_as_it_is() -> None:
    """2 mm slices every 4 mm at x2: the thick inputs of the pairs are every 2nd target slice as it is (a gap
    acquisition samples thin slices; data consistency keeps them), not a box of 2 mm over 2 mm output samples
    ((1/4, 1/2, 1/4): a slab filling its step)."""
    rng = np.random.default_rng(0)
    images = rng.normal(0.0, 1.0, (3, 97, 40)).astype(np.float32)
    gap = DegradationModel(2, 1, 4.0, 2.0, 0.5)
    assert gap.gap and gap.target_mm == 1.0 and gap.dc_fwhm_px == 0.0
    assert "gap 2 mm" in gap.describe() and "FWHM 1 mm;" in gap.describe()
    lr, hr = make_pairs(images, gap)
    np.testing.assert_array_equal(lr, hr[:, ::2])
    want = resample_profile(images, 1, 0.5, 1.0, 2.0)[:, : hr.shape[1]]
    np.testing.assert_allclose(hr, want, atol=1e-6)


@pytest.mark.parametrize(("step", "thick"), [(4.0, 4.0), (4.0, 6.0), (4.0, 3.98)])
def test_contiguous_and_overlapping_slices_keep_their_model(step: float, thick: float) -> None:
    m = DegradationModel(2, 1, step, thick, 0.5)
    assert not m.gap
    assert m.target_mm == pytest.approx(thick / 2) and m.dc_fwhm_px == pytest.approx(thick / 2.0)


def _gap_input() -> tuple[np.ndarray, VolumeInput]:
    truth = _phantom((33, 64, 64), noise=10.0, seed=2)  # 1 mm slices every 1 mm (the truth)
    return truth, VolumeInput(np.ascontiguousarray(truth[::2]), (2.0, 0.8, 0.8), 1.4, "CT")  # 1.4 mm every 2 mm


def test_a_gap_acquisitions_slices_are_kept_as_acquired_at_their_positions() -> None:
    """The acquired slices are output slices (same thickness, same place): data consistency keeps them as they
    are. With D a box of the stated 1.4 mm over 1 mm output samples (1/7 the neighbours), the output there
    differed from the acquired slices by tens of HU."""
    truth, vin = _gap_input()
    opts = EngineOptions(device="cpu", fast=True, tta_passes=2, min_gain_db=-1e9)
    res = get_engine("selfsup", opts).upscale(vin, Factors(2, 1))
    assert res.engine == "selfsup" and not res.fallback
    assert "gap 0.6 mm" in res.report["degradation"] and "FWHM 0.7 mm;" in res.report["degradation"]
    assert np.abs(res.data[::2] - vin.data).max() < 0.05  # HU, the range is ~1600 HU
    assert "through_z_pairs_gain_db" in res.report


def test_worse_than_cubic_along_z_falls_back_to_cubic_with_the_reason(monkeypatch: pytest.MonkeyPatch) -> None:
    """The safety net along z: when the engine's gain over cubic on the series' own z pairs is under
    ``Z_MIN_GAIN_DB``, the output is cubic's, with no sigma, and the reason names the check."""
    _, vin = _gap_input()
    monkeypatch.setattr(selfsup, "Z_MIN_GAIN_DB", 50.0)
    opts = EngineOptions(device="cpu", fast=True, tta_passes=2, min_gain_db=60.0)
    monkeypatch.setattr(selfsup.SelfSupEngine, "_validate", _passing(selfsup.SelfSupEngine._validate))
    res = get_engine("selfsup", opts).upscale(vin, Factors(2, 1))
    cubic = get_engine("cubic").upscale(vin, Factors(2, 1))
    assert res.engine == "cubic" and "along z" in res.fallback and "< 50.00 dB" in res.fallback
    assert np.array_equal(res.data, cubic.data) and not res.sigma.any() and not res.has_sigma


def test_the_z_check_is_off_when_the_configuration_turns_the_self_check_off(monkeypatch: pytest.MonkeyPatch) -> None:
    """``[engine] min_gain_db`` below ``Z_MIN_GAIN_DB`` lowers the z bar too (-99: no fallback at all)."""
    _, vin = _gap_input()
    monkeypatch.setattr(selfsup, "Z_MIN_GAIN_DB", 50.0)
    res = get_engine("selfsup", EngineOptions(device="cpu", fast=True, tta_passes=2, min_gain_db=-99.0)).upscale(
        vin, Factors(2, 1))
    assert res.engine == "selfsup" and not res.fallback


def _passing(validate):  # type: ignore[no-untyped-def]
    """``_validate`` whose gain reads 99 dB (the in-plane check passes), so that the z check decides."""
    from dataclasses import replace

    def wrapped(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        return replace(validate(self, *args, **kwargs), gain_db=99.0)

    return wrapped
