"""The degradation model: slice profiles, thick-slice and low-matrix simulation, training pairs."""

from __future__ import annotations

import math

import numpy as np
import pytest

from models.degrade import (
    DegradationModel,
    degrade_in_plane,
    degrade_through_plane,
    make_pairs,
    slice_profile,
    through_plane_matrix,
)
from models.engine import Factors, VolumeInput


@pytest.mark.parametrize("fwhm", [1.0, 2.0, 3.0, 2.5, 5.0])
def test_box_profile_has_its_fwhm_as_width(fwhm: float) -> None:
    k = slice_profile(fwhm, "box")
    assert k.size % 2 == 1
    assert k.sum() == pytest.approx(1.0)
    assert np.allclose(k, k[::-1])
    # a box of width W integrated over unit bins: total support W, flat top of 1/W
    assert k.max() == pytest.approx(1.0 / fwhm)
    centre = (np.arange(k.size) - k.size // 2).astype(float)
    # variance of a box of width W sampled by unit bins = (W^2 - 1)/12 for odd W; check the integer widths
    if float(fwhm).is_integer() and int(fwhm) % 2 == 1:
        assert float((k * centre**2).sum()) == pytest.approx((fwhm**2 - 1) / 12)


def test_box_fwhm_two_is_quarter_half_quarter() -> None:
    assert np.allclose(slice_profile(2.0, "box"), [0.25, 0.5, 0.25])
    assert np.allclose(slice_profile(1.0, "box")[slice_profile(1.0).size // 2], 1.0)


def test_gaussian_profile_width() -> None:
    fwhm = 4.0
    k = slice_profile(fwhm, "gaussian")
    centre = np.arange(k.size) - k.size // 2
    sigma = fwhm / (2 * math.sqrt(2 * math.log(2)))
    # bin integration adds the variance of a unit box (1/12)
    assert float((k * centre**2).sum()) == pytest.approx(sigma**2 + 1 / 12, rel=0.02)
    with pytest.raises(ValueError, match="slice profile"):
        slice_profile(2.0, "triangle")


def test_thick_slices_keep_means_and_positions() -> None:
    rng = np.random.default_rng(0)
    fine = rng.normal(100.0, 20.0, (41, 8, 8)).astype(np.float32)
    thick = degrade_through_plane(fine, 4, 4.0)
    assert thick.shape == (11, 8, 8)  # slices 0, 4, ..., 40 kept (node-aligned)
    ramp = np.broadcast_to(np.arange(41, dtype=np.float32)[:, None, None], (41, 2, 2))
    # a symmetric profile leaves a linear ramp unchanged away from the ends: slice k sits at fine slice 4k
    assert np.allclose(degrade_through_plane(ramp, 4, 4.0)[1:-1, 0, 0], np.arange(4, 40, 4))
    const = np.full((21, 3, 3), -1000.0, np.float32)
    assert np.allclose(degrade_through_plane(const, 2, 3.0, profile="gaussian"), -1000.0)
    # the matrix form used by data consistency is the same operator
    d = through_plane_matrix(11, 4, 4.0)
    assert np.allclose(d @ fine.reshape(41, -1), thick.reshape(11, -1), atol=1e-3)
    assert np.allclose(d.sum(axis=1), 1.0)


def test_low_matrix_is_block_means_aligned_with_pixel_centres() -> None:
    img = np.arange(36, dtype=np.float32).reshape(1, 6, 6)
    lo = degrade_in_plane(img, 2)
    assert lo.shape == (1, 3, 3)
    assert lo[0, 0, 0] == pytest.approx(np.mean([0, 1, 6, 7]))
    assert degrade_in_plane(img, 4).shape == (1, 1, 1)  # cropped to multiples of f


def test_model_from_geometry_and_pairs() -> None:
    vol = VolumeInput(np.zeros((5, 64, 64), np.float32), (3.0, 0.5, 0.5), 0.0, "CT")
    m = DegradationModel.from_volume(vol, Factors(3, 1))
    assert m.thickness_mm == 3.0  # unknown thickness: the step
    assert m.fine_mm == pytest.approx(1.0)
    assert m.thickness_fine_px == pytest.approx(3.0)
    assert "contiguous" in m.describe()
    gap = DegradationModel.from_volume(VolumeInput(vol.data, (3.0, 0.5, 0.5), 2.0), Factors(3, 1))
    assert "gap" in gap.describe()
    rng = np.random.default_rng(1)
    imgs = rng.normal(0, 1, (2, 64, 40)).astype(np.float32)
    lr, hr = make_pairs(imgs, m, src_spacing=0.5)
    assert hr.shape[1] == (lr.shape[1] - 1) * 3 + 1 and hr.shape[2] == 40
    assert np.allclose(lr, degrade_through_plane(hr, 3, 3.0, axis=1), atol=1e-5)


@pytest.mark.parametrize(("step", "thick", "kind"), [(4.002, 4.0, "contiguous"), (6.999, 7.0, "contiguous"),
                                                     (5.0, 2.5, "gap 2.5 mm"), (2.5, 5.0, "overlap 2.5 mm")])
def test_the_log_calls_slices_that_touch_contiguous(step: float, thick: float, kind: str) -> None:
    """A step within 1 % of the slice thickness (positions written rounded) is contiguous, not a gap or overlap
    (newuser13: "step 4 mm (gap)" for 4.002 mm slices of 4 mm)."""
    assert f"({kind})" in DegradationModel(2, 1, step, thick, 0.5, "gaussian").describe()
