"""The diffusion engine on small synthetic volumes (CPU): seeded determinism, exact data consistency of every
output, σ that vanishes where the acquisition pins the output, and the cubic fallback."""

from __future__ import annotations

import numpy as np
import pytest

from models.cubic import upsample
from models.degrade import degrade_through_plane, through_plane_matrix
from models.engine import EngineOptions, EngineResult, Factors, VolumeInput, get_engine

FAST = {"samples": 2, "finetune_steps": 8, "weights": "none", "min_gain_db": -99.0, "device": "cpu"}


def _phantom() -> np.ndarray:
    """A 17 x 24 x 24 'head': a ball of tissue with texture in air, 1 mm voxels (HU)."""
    z, y, x = np.mgrid[0:17, 0:24, 0:24].astype(np.float32)
    ball = (x - 12) ** 2 + (y - 12) ** 2 + (1.4 * (z - 8)) ** 2 < 10**2
    return (np.where(ball, 40.0, -1000.0) + 60 * np.sin(x / 2.0) * np.cos(y / 3.0) * ball).astype(np.float32)


def _run(thickness: float, **opts: object) -> tuple[VolumeInput, EngineResult]:
    thick = degrade_through_plane(_phantom(), 2, thickness)  # (9, 24, 24), 2 mm step
    vol = VolumeInput(thick, (2.0, 1.0, 1.0), thickness, "CT")
    eng = get_engine("diffusion", EngineOptions(**{**FAST, **opts}))  # type: ignore[arg-type]
    return vol, eng.upscale(vol, Factors(2, 1))


@pytest.fixture(scope="module")
def contiguous() -> tuple[VolumeInput, EngineResult]:
    return _run(2.0, seed=3)


def test_same_seed_same_samples_other_seed_other_samples(contiguous: tuple[VolumeInput, EngineResult]) -> None:
    _, a = contiguous
    _, b = _run(2.0, seed=3)
    _, c = _run(2.0, seed=4)
    assert a.engine == "diffusion" and not a.fallback
    np.testing.assert_array_equal(a.data, b.data)
    np.testing.assert_array_equal(a.sigma, b.sigma)
    assert np.abs(a.data - c.data).max() > 1e-3


def test_every_output_reproduces_the_acquired_slices(contiguous: tuple[VolumeInput, EngineResult]) -> None:
    vol, res = contiguous
    assert res.data.shape == (17, 24, 24) and res.spacing == (1.0, 1.0, 1.0)
    d = through_plane_matrix(9, 2, 2.0, "box")  # box of FWHM 2 output slices, every 2nd slice
    redegraded = (d @ res.data.reshape(17, -1).astype(np.float64)).reshape(vol.data.shape)
    assert np.abs(redegraded - vol.data).max() < 0.05  # HU
    assert res.report["consistency_max_abs"] < 0.05
    # the diffusion output differs from cubic between the acquired slices: it is not a no-op
    assert np.abs(res.data - upsample(vol.data, Factors(2, 1))).max() > 1.0
    assert np.isfinite(res.sigma).all() and res.sigma.max() > 0


def test_sigma_shrinks_where_the_input_pins_the_output() -> None:
    # a thin slice (FWHM 1 mm every 2 mm) measures the output slices 0, 2, 4 ... exactly, and nothing between
    vol, res = _run(1.0, seed=5)
    acquired, between = res.sigma[0::2], res.sigma[1::2]
    np.testing.assert_allclose(res.data[0::2], vol.data, atol=0.05)
    assert acquired.mean() < 0.05 * between.mean()
    assert between.mean() > 0.5  # HU: the samples do disagree where nothing was measured


def test_low_internal_gain_falls_back_to_cubic() -> None:
    vol, res = _run(2.0, seed=0, min_gain_db=99.0, finetune_steps=0)
    assert res.engine == "cubic" and "internal gain" in res.fallback
    np.testing.assert_allclose(res.data, upsample(vol.data, Factors(2, 1)), atol=1e-4)


def test_sigma_between_slices_reaches_the_acquired_neighbours_range(
        contiguous: tuple[VolumeInput, EngineResult]) -> None:
    """Whatever a sample invents between two acquired slices, its 95 % interval reaches their [min, max]
    (models.calibration.bracket_floor, as selfsup's)."""
    vol, res = contiguous
    lr, mid = vol.data, res.data[1::2]
    gap = np.maximum(np.minimum(lr[:-1], lr[1:]) - mid, 0) + np.maximum(mid - np.maximum(lr[:-1], lr[1:]), 0)
    assert np.all(gap <= 1.96 * res.sigma[1::2] + 1e-3 * (1.0 + gap))
    assert "sigma_bracket_raised" in res.report
