"""σ checked on the series' own z pairs (issue #13, helper engine18b; docs/engines.md 2026-12-03 (b)): the shipped
σ's coverage there is reported on every through-plane run, and the widening switch ``Z_SIGMA_MIN_COVERAGE``
(off: measured, it does not tell the misleading series from the covered ones) raises q per phase to the z pairs'
conformal q when that coverage is under its bar."""

from __future__ import annotations

import numpy as np
import pytest

from models import calibration as cal
from models import selfsup
from models.engine import EngineOptions, Factors, get_engine
from tests.models.test_gap import _gap_input


def _held(err: np.ndarray, u: np.ndarray, phase: np.ndarray) -> cal.Held:
    z = np.zeros_like(err)
    return cal.Held(err, z, u - cal.EPS, z, z, z, phase, np.zeros(err.size, np.int64))


def test_held_coverage_is_the_share_inside_the_shipped_interval_per_phase() -> None:
    """|err| = 1, 2, 3, 4 with u = 1 (k = j = 0, no noise): q 2.5 for phase 0 covers 1 and 2, q 10 for phase 1
    covers 3 and 4 -> 1.0; q 2.5 for both -> 0.5; no voxels -> NaN."""
    v = cal.Validation(gain_db=0.0, k=0.0, q=1.0, spearman=0.0, coverage_95=0.0)
    h = _held(np.array([1.0, 2.0, 3.0, 4.0]), np.ones(4), np.array([0, 0, 1, 1]))
    assert cal.held_coverage(h, v, np.array([2.5, 10.0])) == 1.0
    assert cal.held_coverage(h, v, np.array([2.5, 2.5])) == 0.5
    empty = _held(np.zeros(0), np.zeros(0), np.zeros(0, np.int64))
    assert np.isnan(cal.held_coverage(empty, v, np.array([1.0])))


def test_the_shipped_sigmas_coverage_on_the_z_pairs_is_reported_and_widening_is_off_by_default() -> None:
    _, vin = _gap_input()
    res = get_engine("selfsup", EngineOptions(device="cpu", fast=True, tta_passes=2, min_gain_db=-99.0)).upscale(
        vin, Factors(2, 1))
    assert selfsup.Z_SIGMA_MIN_COVERAGE is None
    assert 0.0 <= res.report["through_sigma_z_pairs_coverage_shipped"] <= 1.0
    assert "through_sigma_widened_from_z" not in res.report


def test_under_the_bar_sigma_is_widened_to_the_z_pairs_q(monkeypatch: pytest.MonkeyPatch) -> None:
    """A bar no coverage reaches (1.01): q per phase becomes at least the z pairs' conformal q, said in the report,
    and σ is at least the unwidened σ everywhere."""
    _, vin = _gap_input()
    opts = EngineOptions(device="cpu", fast=True, tta_passes=2, min_gain_db=-99.0)
    base = get_engine("selfsup", opts).upscale(vin, Factors(2, 1))
    monkeypatch.setattr(selfsup, "Z_SIGMA_MIN_COVERAGE", 1.01)
    res = get_engine("selfsup", opts).upscale(vin, Factors(2, 1))
    widened = np.asarray(res.report["through_sigma_widened_from_z"])
    assert widened.shape == (2,) and np.all(widened >= 1.0)
    q_used, q_z = np.asarray(res.report["through_sigma_q_used"]), np.asarray(res.report["through_sigma_q_z"])
    assert np.all(q_used >= q_z - 1e-3)
    assert np.array_equal(res.data, base.data) and np.all(res.sigma >= base.sigma - 1e-6)
