"""The ``selfsup`` engine on small CPU volumes: data consistency, sigma calibration, fallback, tiling seams,
geometry contract, determinism, and clear errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from models import internal as il
from models.degrade import degrade_in_plane, degrade_through_plane
from models.engine import EngineError, EngineOptions, Factors, VolumeInput, get_engine
from models.evaluate import body_mask, uncertainty
from models.nets import SRNet, SRNetConfig

FAST = {"finetune_steps": 15, "tta_passes": 4, "device": "cpu", "min_gain_db": -1e9}


def _phantom(shape: tuple[int, int, int] = (33, 64, 64), noise: float = 0.0, seed: int = 0) -> np.ndarray:
    """Smooth CT-like head: an ellipsoid of soft tissue with a few denser spheres, in air (HU)."""
    rng = np.random.default_rng(seed)
    z, y, x = np.mgrid[0 : shape[0], 0 : shape[1], 0 : shape[2]].astype(np.float32)
    zc, yc, xc = (s / 2 for s in shape)
    vol = np.where(((z - zc) / (0.45 * shape[0])) ** 2 + ((y - yc) / 26) ** 2 + ((x - xc) / 22) ** 2 < 1, 40.0,
                   -1000.0).astype(np.float32)
    for _ in range(8):
        c = rng.uniform(0.3, 0.7, 3) * shape
        r = rng.uniform(3, 7)
        vol += rng.uniform(100, 600) * (((z - c[0]) ** 2 + (y - c[1]) ** 2 + (x - c[2]) ** 2) < r * r)
    if noise:
        vol += rng.normal(0, noise, vol.shape).astype(np.float32)
    return vol


def _thick(truth: np.ndarray, f: int = 2) -> VolumeInput:
    return VolumeInput(degrade_through_plane(truth, f, float(f)), (2.0 * f / 2, 0.8, 0.8), 2.0 * f / 2, "CT")


def test_output_reproduces_acquired_slices_and_keeps_geometry() -> None:
    truth = _phantom()
    vin = _thick(truth)
    res = get_engine("selfsup", EngineOptions(**FAST)).upscale(vin, Factors(2, 1))
    assert res.engine == "selfsup" and not res.fallback
    assert res.data.shape == (33, 64, 64) and res.sigma.shape == res.data.shape
    assert res.spacing == pytest.approx((1.0, 0.8, 0.8))
    # data consistency: re-degrading the output with the same slice profile gives back the input slices
    redeg = degrade_through_plane(res.data, 2, 2.0)
    assert np.abs(redeg - vin.data).max() < 0.05  # HU
    assert res.report["dc_residual_after"] < 1e-4 <= res.report["dc_residual_before"]
    assert abs(float(res.data.mean() - truth.mean())) < 2.0  # no HU drift
    assert np.all(res.sigma > 0)


def test_sigma_is_calibrated_on_a_case_with_known_noise() -> None:
    noise = 25.0
    truth = _phantom(noise=noise, seed=3)
    vin = _thick(truth)
    res = get_engine("selfsup", EngineOptions(**FAST, seed=1)).upscale(vin, Factors(2, 1))
    mask = body_mask(truth, "CT")
    u = uncertainty(res.sigma, res.data, truth, mask)
    # errors against the noisy truth are dominated by the known noise: the 95 % interval must cover most of them
    assert 0.85 <= u["coverage_95"] <= 0.995, u
    med = float(np.median(res.sigma[mask]))
    assert 0.25 * noise < med < 3 * noise, med


def test_fallback_returns_cubic_with_the_reason() -> None:
    vin = _thick(_phantom())
    opts = EngineOptions(device="cpu", fast=True, tta_passes=2, min_gain_db=50.0)
    res = get_engine("selfsup", opts).upscale(vin, Factors(2, 1))
    cubic = get_engine("cubic").upscale(vin, Factors(2, 1))
    assert res.engine == "cubic"
    assert "internal gain" in res.fallback and "50.00 dB" in res.fallback
    assert np.array_equal(res.data, cubic.data)
    assert not res.sigma.any()


@pytest.mark.parametrize("shape", [(12, 32, 1), (12, 1, 32), (12, 1, 1)])
def test_one_row_or_one_column_slices_fall_back_to_cubic(shape: tuple[int, int, int]) -> None:
    """A slice of one column (or one row, or one pixel) has no in-plane neighbours to learn from: the engine
    falls back to cubic with its reason instead of failing the job (it raised an IndexError in the noise estimate
    on one-column slices)."""
    vol = np.random.default_rng(0).normal(100.0, 10.0, shape).astype(np.float32)
    res = get_engine("selfsup", EngineOptions(device="cpu", fast=True)).upscale(
        VolumeInput(vol, (3.0, 1.0, 1.0), 3.0, "CT"), Factors(2, 1))
    assert res.engine == "cubic" and res.fallback
    assert res.data.shape == (23, *shape[1:])
    assert il.noise_sigma(vol) >= 0.0


def test_tiled_and_untiled_inference_agree() -> None:
    torch.manual_seed(0)
    net = SRNet(SRNetConfig(fz=3, fx=1, width=8, depth=3))
    torch.nn.init.normal_(net.head.weight, std=0.1)
    task = il.Task(3, 1, True)
    lr = torch.randn(2, 12, 70)
    whole = il.residual(net, lr, task, (-1,))
    tiled = il.residual(net, lr, task, (-1,), max_pixels=12 * 20)  # 4 column tiles with halos
    assert torch.allclose(whole, tiled, atol=1e-5)
    vin = _thick(_phantom((17, 48, 48)))
    a = get_engine("selfsup", EngineOptions(**FAST)).upscale(vin, Factors(2, 1))
    b = get_engine("selfsup", EngineOptions(**{**FAST, "max_voxels_per_tile": 9 * 16})).upscale(vin, Factors(2, 1))
    assert np.allclose(a.data, b.data, atol=1e-3)


def test_deterministic_under_seed_and_in_plane_geometry() -> None:
    vin = VolumeInput(_phantom((6, 64, 48)), (2.0, 0.8, 0.8), 2.0, "CT")
    opts = EngineOptions(device="cpu", finetune_steps=5, tta_passes=2, min_gain_db=-1e9, seed=7)
    a = get_engine("selfsup", opts).upscale(vin, Factors(1, 2))
    b = get_engine("selfsup", opts).upscale(vin, Factors(1, 2))
    assert a.data.shape == (6, 128, 96) and a.spacing == pytest.approx((2.0, 0.4, 0.4))
    assert np.array_equal(a.data, b.data)
    # in-plane data consistency: 2 x 2 block means of the output are the acquired pixels
    blocks = a.data.reshape(6, 64, 2, 48, 2).mean(axis=(2, 4))
    assert np.abs(blocks - vin.data).max() < 0.05


def test_bad_input_is_an_engine_error() -> None:
    eng = get_engine("selfsup", EngineOptions(device="cpu", fast=True))
    bad = _phantom((9, 32, 32))
    bad[3, 4, 4] = np.nan
    with pytest.raises(EngineError, match="NaN"):
        eng.upscale(VolumeInput(bad, (2.0, 1.0, 1.0), 2.0, "CT"), Factors(2, 1))
    with pytest.raises(EngineError, match="needs >= 3 slices"):
        eng.upscale(VolumeInput(_phantom((2, 32, 32)), (2.0, 1.0, 1.0), 2.0, "CT"), Factors(2, 1))
    with pytest.raises(EngineError, match="cannot read prior"):
        bad_w = EngineOptions(device="cpu", fast=True, weights=__file__)
        get_engine("selfsup", bad_w).upscale(VolumeInput(_phantom((9, 32, 32)), (2.0, 1.0, 1.0), 2.0), Factors(2, 1))


def test_in_plane_context_net_from_a_2d_prior_and_dihedral_views() -> None:
    from models.selfsup import make_net

    torch.manual_seed(0)
    net2d = SRNet(SRNetConfig(fz=2, fx=2, width=8, depth=3))
    torch.nn.init.normal_(net2d.head.weight, std=0.1)
    prior = {"config": {"width": 8, "depth": 3}, "in": {"2": net2d.state_dict()}}
    net3, from_prior = make_net(prior, "in", 2, 2, torch.device("cpu"), in_ch=3)
    assert from_prior and net3.cfg.in_ch == 3
    task = il.Task(2, 2, False)
    lr = torch.randn(2, 3, 20, 20)  # (B, C, h, w): neighbours first and last
    a = il.residual(net2d, lr[:, 1], task, ())
    b = il.residual(net3, lr, task, ())
    assert torch.allclose(a, b, atol=1e-5)  # a 2D prior starts with the context unused
    # a transposed view is the transposed residual of the transposed input
    t = il.residual(net2d, lr[:, 1], task, (-1,), transpose=True)
    ref = il.residual(net2d, lr[:, 1].transpose(-2, -1).flip(-1), task, ()).flip(-1).transpose(-2, -1)
    assert torch.allclose(t, ref, atol=1e-5) and not torch.allclose(t, a, atol=1e-3)
    assert len(il.tta_ops(8, True)) == 8 and len(il.tta_ops(8, False)) == 4


def test_in_plane_pairs_with_context_and_scale_difficulty() -> None:
    from models import inplane as ip

    vol = (_phantom((7, 64, 64)) + 1000.0) / 1600.0
    (s,) = ip.in_plane_pairs(vol, 2, np.array([0, 3, 6]), torch.device("cpu"), context=3, square=True)
    assert s.inp.shape == (3, 3, 32, 32) and s.hr.shape == (3, 64, 64)
    assert torch.equal(s.inp[:, 1], s.lr) and torch.equal(s.inp[0, 0], s.inp[0, 2])  # mirrored at z = 0
    assert np.array_equal(ip.context_index(np.array([0, 6]), 7, 3), [[1, 0, 1], [5, 6, 5]])
    assert 0.25 <= ip.scale_difficulty(vol, 2) <= 4.0


def test_train_prior_only_in_keeps_the_through_nets() -> None:
    from models.prior import train_prior

    vin = VolumeInput(_phantom((9, 64, 64)), (1.0, 0.8, 0.8), 1.0, "CT")
    old = {"config": {"width": 8, "depth": 3}, "through": {"2": {"w": torch.ones(2)}}, "in": {}}
    ckpt, metrics = train_prior([vin], 2, torch.device("cpu"), SRNetConfig(width=8, depth=3), only="in", keep=old)
    assert ckpt["through"] == old["through"] and set(ckpt["in"]) == {"2", "3", "4"}
    assert set(metrics) == {"in_x2", "in_x3", "in_x4"}
    with pytest.raises(ValueError, match="width"):
        train_prior([vin], 2, torch.device("cpu"), SRNetConfig(width=16, depth=3), only="in", keep=old)


def test_train_prior_factors_keep_the_other_factors_of_that_kind() -> None:
    from models.prior import train_prior

    vin = VolumeInput(_phantom((9, 64, 64)), (1.0, 0.8, 0.8), 1.0, "CT")
    old = {"config": {"width": 8, "depth": 3}, "through": {"3": {"w": torch.ones(2)}}, "in": {"2": {"w": 1}}}
    ckpt, metrics = train_prior([vin], 2, torch.device("cpu"), SRNetConfig(width=8, depth=3), only="through",
                                keep=old, factors=(2,), sampling="gradient")
    assert set(ckpt["through"]) == {"2", "3"} and ckpt["through"]["3"] == old["through"]["3"]
    assert ckpt["in"] == old["in"] and set(metrics) == {"through_x2"}
    with pytest.raises(ValueError, match="factors"):
        train_prior([vin], 2, torch.device("cpu"), SRNetConfig(width=8, depth=3), factors=(2,))


def test_gradient_sampling_draws_patches_at_edges_more_often() -> None:
    lr = torch.zeros(2, 40, 80)
    lr[1, :, 60:] = 1.0  # one edge, in image 1 at column 60
    s = il.PairSet(lr, torch.zeros(2, 79, 80))
    cdf = il._corner_cdf(s, 8, 16)
    p = torch.diff(cdf, prepend=torch.zeros(1))
    assert float(cdf[-1]) == pytest.approx(1.0)
    gi, gj = (40 - 8) // il.GRAD_STRIDE + 1, (80 - 16) // il.GRAD_STRIDE + 1
    p = p.view(2, gi, gj)
    assert float(p[1].sum()) > 0.7 and float(p[0].min()) > 0  # edges weigh more, flat corners stay possible
    net = SRNet(SRNetConfig(fz=2, fx=1, width=8, depth=3))
    assert np.isfinite(il.train(net, [s], 3, 1e-3, 0, patch=(8, 16), batch=4, sampling="gradient"))
    with pytest.raises(ValueError, match="sampling"):
        il.train(net, [s], 1, 1e-3, 0, sampling="edges")


def test_through_and_in_plane_together_keep_both_consistencies() -> None:
    truth = _phantom()
    vin = _thick(truth)
    res = get_engine("selfsup", EngineOptions(**FAST)).upscale(vin, Factors(2, 2))
    assert res.engine == "selfsup" and not res.fallback, res.fallback
    assert res.data.shape == (33, 128, 128) and res.sigma.shape == res.data.shape
    assert res.spacing == pytest.approx((1.0, 0.4, 0.4))
    assert np.isfinite(res.sigma).all() and (res.sigma > 0).all()
    # 2 x 2 block means give the through-plane result, whose re-degradation gives the acquired slices
    redeg = degrade_through_plane(degrade_in_plane(res.data, 2), 2, 2.0)
    assert np.abs(redeg - vin.data).max() < 0.1  # HU
    assert res.report["in_tta"] >= 1 and "through_internal_gain_db" in res.report


def _outside_bracket(out: np.ndarray, lr: np.ndarray, f: int) -> np.ndarray:
    """(Zf, Y, X) how far each voxel between two acquired slices lies outside their [min, max] (0 on acquired rows)."""
    gap = np.zeros(out.shape, np.float32)
    for k in range(lr.shape[0] - 1):
        a, b = lr[k], lr[k + 1]
        v = out[k * f + 1 : (k + 1) * f]
        gap[k * f + 1 : (k + 1) * f] = np.maximum(np.minimum(a, b) - v, 0) + np.maximum(v - np.maximum(a, b), 0)
    return gap


@pytest.mark.parametrize("f", [2, 3])
def test_new_voxels_beyond_their_acquired_neighbours_are_flagged_by_sigma(f: int) -> None:
    """A sharp skull shell grazed by the slices (the demo phantom's equator: bone on two slices, air around) makes
    the engine's residual overshoot between the slices by hundreds of HU (a bright or dark rim that is not in
    the truth). Whatever value the engine writes there, its 95 % interval must reach the range of the two
    acquired slices around it: sigma says the layer may not be there (calibration.bracket_floor)."""
    from node.app.phantom import phantom_hu

    fine = phantom_hu(slices=10 * f + 1, size=64, step_mm=2.5 / f, seed=0)
    lr = np.ascontiguousarray(fine[::f])
    px = 230.0 / 64
    vin = VolumeInput(lr, (2.5, px, px), 2.5, "CT", (-1024.0, 3071.0))
    opts = EngineOptions(device="cpu", fast=True, tta_passes=2, min_gain_db=-1e9)
    res = get_engine("selfsup", opts).upscale(vin, Factors(f, 1))
    assert res.engine == "selfsup" and not res.fallback, res.fallback
    gap = _outside_bracket(res.data, lr, f)
    assert gap.max() > 200.0  # the case does make the engine overshoot (else this test tests nothing)
    assert np.all(gap <= 1.96 * res.sigma + 1e-3 * (1.0 + gap)), float((gap - 1.96 * res.sigma).max())
    assert res.report["through_sigma_bracket_raised"] > 0


def test_bracket_floor_raises_only_what_leaves_the_neighbours_range() -> None:
    from models.calibration import bracket_floor

    lr = torch.tensor([[[0.0, 0.0, 1.0]], [[1.0, 0.5, 1.0]], [[1.0, 0.5, 1.0]]])  # (3, 1, 3)
    out = torch.zeros(5, 1, 3)
    out[0], out[2], out[4] = lr[0], lr[1], lr[2]
    out[1] = torch.tensor([[0.5, -0.196, 1.392]])  # inside [0, 1]; 0.196 below [0, 0.5]; 0.392 above [1, 1]
    out[3] = torch.tensor([[1.0, 0.5, 0.804]])  # inside; inside; 0.196 below [1, 1]
    sigma = torch.full((5, 1, 3), 0.05)
    raised = bracket_floor(sigma, out, lr, 2)
    assert int(raised) == 3
    assert sigma[1, 0].tolist() == pytest.approx([0.05, 0.1, 0.2])
    assert sigma[3, 0].tolist() == pytest.approx([0.05, 0.05, 0.1])
    assert torch.all(sigma[::2] == 0.05)  # acquired rows untouched
