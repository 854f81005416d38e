"""The uncertainty metrics of ``srnode eval`` on cases whose answer is known."""

from __future__ import annotations

import numpy as np

from models.evaluate import local_error_level, uncertainty


def test_local_error_level_leaves_the_voxel_out() -> None:
    err = np.zeros((5, 6, 7), np.float32)
    err[2, 3, 3] = 26.0
    loc = local_error_level(err)
    assert loc[2, 3, 3] == 0.0  # its own error is not part of its level
    assert np.isclose(loc[2, 3, 4], 1.0)  # 26 neighbours of an interior voxel: 26 / 26
    assert np.isclose(loc[0, 0, 0], 0.0)
    corner = np.zeros_like(err)
    corner[0, 0, 1] = 7.0
    assert np.isclose(local_error_level(corner)[0, 0, 0], 1.0)  # a corner has 7 neighbours


def test_sigma_that_knows_the_noise_level_ranks_and_covers() -> None:
    rng = np.random.default_rng(0)
    level = np.repeat(np.linspace(1, 20, 16), 16 * 16).reshape(16, 16, 16).astype(np.float32)
    truth = np.zeros_like(level)
    pred = (rng.normal(0, 1, level.shape) * level).astype(np.float32)
    mask = np.ones(level.shape, bool)
    u = uncertainty(level, pred, truth, mask)
    assert 0.93 <= u["coverage_95"] <= 0.97, u
    assert u["spearman"] > 0.4 and u["ause_ratio"] < 0.6, u
    assert abs(u["spearman_local_oracle"] - u["spearman"]) < 0.1, u  # the oracle sees the same level
    flat = uncertainty(np.full_like(level, 10.0), pred, truth, mask)
    assert abs(flat["spearman"]) < 0.05 and flat["spearman_local_oracle"] > 0.4, flat
