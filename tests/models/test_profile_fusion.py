"""Slice-profile estimation from the data (models.profile) and the sigma-weighted orthogonal fusion of selfsup."""

from __future__ import annotations

import numpy as np
import pytest

from models import selfsup
from models.degrade import degrade_through_plane
from models.engine import EngineOptions, Factors, VolumeInput, get_engine
from models.profile import estimate_fwhm
from tests.models.test_engine_selfsup import FAST, _phantom, _thick


def _isotropic(shape: tuple[int, int, int] = (128, 96, 96), seed: int = 0) -> np.ndarray:
    """A statistically isotropic textured volume (1 mm voxels): Gaussian-filtered noise through a soft threshold."""
    rng = np.random.default_rng(seed)
    k = [np.fft.fftfreq(n) for n in shape]
    kz, ky, kx = np.meshgrid(*k, indexing="ij")
    g = np.exp(-2 * (np.pi * 1.0) ** 2 * (kz**2 + ky**2 + kx**2))
    field = np.real(np.fft.ifftn(np.fft.fftn(rng.standard_normal(shape)) * g))
    return np.tanh(field / field.std() * 1.5).astype(np.float32)


@pytest.mark.parametrize("fwhm", [1.6, 2.0, 3.0])
def test_profile_estimator_recovers_a_known_fwhm(fwhm: float) -> None:
    fine = _isotropic()
    thick = degrade_through_plane(fine, 2, fwhm)  # box of FWHM fwhm mm, step 2 mm
    fit = estimate_fwhm(thick, (2.0, 1.0, 1.0), thickness_mm=2.0)  # assumed 2 mm: the data say otherwise
    assert fit.fwhm_mm == pytest.approx(fwhm, abs=0.15), fit.cost
    assert fit.ratio == pytest.approx(fit.fwhm_mm / 2.0)


def test_profile_estimator_refuses_too_few_slices() -> None:
    with pytest.raises(ValueError, match="slices"):
        estimate_fwhm(np.zeros((5, 32, 32), np.float32), (2.0, 1.0, 1.0), 2.0)


def test_sigma_weighted_fusion_keeps_geometry_consistency_and_bias(monkeypatch: pytest.MonkeyPatch) -> None:
    truth = _phantom()
    vin = _thick(truth)
    opts = EngineOptions(**{**FAST, "tta_passes": 8})
    mean = get_engine("selfsup", opts).upscale(vin, Factors(2, 1))
    monkeypatch.setattr(selfsup, "FUSE", "sigma")
    res = get_engine("selfsup", opts).upscale(vin, Factors(2, 1))
    assert mean.report["through_fuse"] == "mean" and res.report["through_fuse"] == "sigma"
    assert res.data.shape == mean.data.shape == (33, 64, 64) and res.sigma.shape == res.data.shape
    assert np.abs(degrade_through_plane(res.data, 2, 2.0) - vin.data).max() < 0.05  # data consistency (HU)
    assert abs(float(res.data.mean() - truth.mean())) < 2.0  # no HU drift
    assert not np.array_equal(res.data, mean.data)
    # 2 passes (one flip per orientation): no spread to weight by, so the mean
    two = get_engine("selfsup", EngineOptions(**{**FAST, "tta_passes": 2})).upscale(vin, Factors(2, 1))
    assert two.report["through_fuse"] == "mean"


def test_profile_from_the_data_is_reported_and_keeps_consistency(monkeypatch: pytest.MonkeyPatch) -> None:
    fine = _isotropic((66, 64, 64)) * 500.0
    thick = VolumeInput(degrade_through_plane(fine, 2, 2.0), (2.0, 1.0, 1.0), 2.0, "CT")
    monkeypatch.setattr(selfsup, "PROFILE_FROM", "data")
    res = get_engine("selfsup", EngineOptions(**FAST)).upscale(thick, Factors(2, 1))
    ratio = res.report["profile_fwhm_ratio"]
    assert 0.5 <= ratio <= 1.8
    assert f"FWHM {2.0 * ratio:.3g} mm" in res.report["degradation"]
    assert np.abs(degrade_through_plane(res.data, 2, 2.0 * ratio) - thick.data).max() < 0.5
