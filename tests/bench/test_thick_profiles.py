"""``srnode eval --profile``: the thick-slice operators it simulates (numpy only, no engine run).

The ``discrete`` operator is the engine's own data-consistency operator, so the engine's projection holds the
truth exactly (an inverse crime); the continuous profiles and decimation are not, and must still be faithful
slice profiles (unit gain, centred, the declared FWHM).
"""

from __future__ import annotations

import numpy as np
import pytest

from models.degrade import DegradationModel, degrade_through_plane
from models.engine import VolumeInput
from models.internal import dc_matrices
from node.app.volume_file import Loaded
from node.bench.eval import ThickProfile, continuous_weights, simulate, thick_from_thin


def _loaded(data: np.ndarray, thickness: float = 1.0) -> Loaded:
    z = data.shape[0]
    pos = np.stack([np.zeros(z), np.zeros(z), np.arange(z, dtype=float)], axis=1)
    vin = VolumeInput(data.astype(np.float32), (1.0, 0.5, 0.5), thickness, "CT")
    return Loaded(vin, pos, np.array([0.0, 0.0, 1.0]), np.array([1.0, 0, 0]), np.array([0, 1.0, 0]), "npz", "toy")


def _residual(lr: np.ndarray, truth: np.ndarray, declared_mm: float, f: int) -> float:
    """|lr - D truth| max, D the engine's data-consistency operator for the declared thickness."""
    model = DegradationModel(f, 1, float(f), declared_mm, 0.5)
    d, _p = dc_matrices(lr.shape[0], model)
    return float(np.abs(lr - np.einsum("ij,jyx->iyx", d, truth)).max())


@pytest.mark.parametrize("kind", list(ThickProfile))
def test_each_operator_keeps_constants_and_linear_ramps(kind: ThickProfile) -> None:
    ramp = np.arange(41, dtype=np.float32)[:, None, None] * np.ones((1, 3, 3), np.float32) + 7.0
    out = thick_from_thin(ramp, 2, 2.0, kind)
    assert out.shape == (21, 3, 3)
    # a unit-gain, centred profile returns the ramp's value at each thick slice's centre (ends: mirrored)
    np.testing.assert_allclose(out[3:-3, 1, 1], ramp[6:-6:2, 1, 1], atol=2e-3)


@pytest.mark.parametrize("kind", [ThickProfile.BOX_FINE, ThickProfile.GAUSSIAN, ThickProfile.TRAPEZOID])
def test_continuous_profiles_have_the_declared_fwhm(kind: ThickProfile) -> None:
    t, w = continuous_weights(kind, 3.0, fine=64)
    assert w.sum() == pytest.approx(1.0) and np.allclose(w, w[::-1])
    above = t[w >= 0.5 * w.max()]
    assert above.max() - above.min() == pytest.approx(3.0, abs=2 / 64 + 1e-9)


def test_discrete_is_the_engines_operator_and_the_others_are_not() -> None:
    rng = np.random.default_rng(0)
    truth = rng.normal(size=(33, 8, 8)).astype(np.float32) * 100
    res = {}
    for kind in ThickProfile:
        vin, t, factors = simulate(_loaded(truth), "through", 2, kind)
        assert factors.through_plane == 2 and t.shape == truth.shape and vin.spacing[0] == 2.0
        res[kind] = _residual(vin.data, t, vin.slice_thickness, 2)
    assert res[ThickProfile.DISCRETE] < 1e-3  # data consistency reproduces the truth: the inverse crime
    for kind in (ThickProfile.BOX_FINE, ThickProfile.GAUSSIAN, ThickProfile.TRAPEZOID):
        assert res[kind] > 1.0, res
    np.testing.assert_array_equal(simulate(_loaded(truth), "through", 2, ThickProfile.DISCRETE)[0].data,
                                  degrade_through_plane(truth, 2, 2.0))


def test_decimation_declares_the_thin_thickness_and_keeps_the_slices() -> None:
    truth = np.random.default_rng(1).normal(size=(21, 4, 4)).astype(np.float32)
    vin, _t, _f = simulate(_loaded(truth, thickness=0.8), "through", 3, ThickProfile.DECIMATE)
    np.testing.assert_array_equal(vin.data, truth[::3])
    assert vin.slice_thickness == 0.8 and vin.spacing[0] == 3.0 and vin.profile == "box"
    vin2, _t, _f = simulate(_loaded(truth, thickness=0.8), "through", 3, ThickProfile.GAUSSIAN)
    assert vin2.slice_thickness == 3.0  # f x max(thickness, step): what a thick series would declare
