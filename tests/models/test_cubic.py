"""The cubic engine interpolates: its output at every acquired position equals the input, for every stack length."""

from __future__ import annotations

import numpy as np
import pytest

from models.cubic import CubicEngine, resample_axis, upsample
from models.engine import Factors, VolumeInput
from node.app.phantom import phantom_hu


@pytest.mark.parametrize("n", range(2, 9))
@pytest.mark.parametrize("f", [2, 3, 5])
def test_through_plane_output_equals_input_at_acquired_slices(n: int, f: int) -> None:
    hu = phantom_hu(slices=n, size=32, step_mm=5.0, fov_mm=200.0, seed=n)  # skull, brain, air: HU edges
    out = upsample(hu, Factors(f, 1))
    assert out.shape == ((n - 1) * f + 1, 32, 32)
    assert np.max(np.abs(out[::f] - hu)) <= 1e-3 * max(1.0, float(np.max(np.abs(hu))) / 1000)  # float32 precision


@pytest.mark.parametrize("n", range(2, 9))
@pytest.mark.parametrize("axis", [0, 1, 2])
def test_resample_at_integer_positions_returns_the_samples_on_every_axis(n: int, axis: int) -> None:
    rng = np.random.default_rng(n)
    shape = [4, 5, 6]
    shape[axis] = n
    x = rng.normal(0.0, 1000.0, shape)
    back = resample_axis(x, axis, np.arange(n, dtype=np.float64))
    assert np.max(np.abs(back - x)) <= 1e-9


@pytest.mark.parametrize("n", range(2, 9))
def test_in_plane_odd_factor_keeps_acquired_pixels(n: int) -> None:
    # area-aligned x3: output pixel 3i + 1 has its centre on input pixel i (rows and columns)
    rng = np.random.default_rng(10 + n)
    x = rng.normal(0.0, 1000.0, (2, n, n + 1)).astype(np.float32)
    out = upsample(x, Factors(1, 3))
    assert out.shape == (2, 3 * n, 3 * (n + 1))
    assert np.max(np.abs(out[:, 1::3, 1::3] - x)) <= 1e-2  # float32 of values ~1000


def test_two_slices_through_the_engine() -> None:
    hu = phantom_hu(slices=2, size=16, step_mm=5.0, fov_mm=200.0)
    res = CubicEngine().upscale(VolumeInput(hu, (5.0, 12.5, 12.5), 5.0, "CT", (-1024.0, 3071.0)), Factors(4, 1))
    assert res.data.shape == (5, 16, 16)
    assert np.max(np.abs(res.data[::4] - hu)) <= 1e-3
    # the midpoint of two samples is their mean (mirror symmetry of a 2-sample spline)
    assert np.max(np.abs(res.data[2] - (hu[0] + hu[1]) / 2)) <= 1e-3
