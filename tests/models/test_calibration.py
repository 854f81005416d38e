"""Split-conformal sigma calibration of ``selfsup`` (``models.internal``) on synthetic cases with known noise."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from models import calibration as cal
from models import internal as il
from models.degrade import DegradationModel, degrade_through_plane
from models.nets import SRNet, SRNetConfig


def test_conformal_level_is_the_finite_sample_quantile() -> None:
    assert cal.conformal_level(19, 0.95) == 1.0  # ceil(20 * 0.95) / 19 > 1: capped
    assert cal.conformal_level(99, 0.95) == 95 / 99
    assert abs(cal.conformal_level(100_000, 0.95) - 0.95) < 1e-4


def test_conformal_q_covers_fresh_errors_with_the_known_width() -> None:
    rng = np.random.default_rng(0)
    scale = rng.uniform(0.5, 2.0, 40_000)  # a sigma that knows each error's sd
    err = rng.normal(0.0, 1.0, scale.size) * scale
    fit, new = slice(0, 20_000), slice(20_000, None)
    q = cal.conformal_q(np.abs(err[fit]), scale[fit], np.zeros(20_000))
    assert abs(q - 1.96) < 0.08, q  # Gaussian: the 95 % interval is +-1.96 sd
    cover = float(np.mean(np.abs(err[new]) <= q * scale[new]))
    assert 0.93 <= cover <= 0.97, cover
    width = float(np.mean(2 * q * scale[new]))
    assert abs(width / (2 * 1.96 * scale[new].mean()) - 1) < 0.05, width
    # with a noise term in the interval (known sd 1 added to every error), q only covers the rest
    noisy = err + rng.normal(0.0, 1.0, err.size)
    qn = cal.conformal_q(np.abs(noisy[fit]), scale[fit], np.ones(20_000))
    cover_n = float(np.mean(np.abs(noisy[new]) <= 1.96 * np.sqrt((scale[new] * qn / 1.96) ** 2 + 1.0)))
    assert 0.93 <= cover_n <= 0.97 and 0.8 * 1.96 < qn < 1.2 * 1.96, (cover_n, qn)


def _smooth(shape: tuple[int, int, int], seed: int) -> np.ndarray:
    """A smooth body (normalised units, ~0.3-0.7) filling most of the volume."""
    rng = np.random.default_rng(seed)
    z, y, x = np.mgrid[0 : shape[0], 0 : shape[1], 0 : shape[2]].astype(np.float32)
    vol = 0.5 + 0.05 * np.sin(z / 4.0 + 0.3) * np.cos(y / 15.0) + 0.05 * np.sin(x / 17.0 + y / 23.0)
    for _ in range(4):
        c = rng.uniform(0.2, 0.8, 3) * shape
        vol += 0.1 * np.exp(-((z - c[0]) ** 2) / 20.0 - ((y - c[1]) ** 2 + (x - c[2]) ** 2) / 300.0)
    return vol.astype(np.float32)


def test_phase_wise_calibration_on_z_pairs_covers_a_noisy_target() -> None:
    """Smooth thin volume + white noise of known sd; thick x2 slices from it. The z-pair calibration (the acquired
    slices against their x2 coarser version) with the target-grid noise term must cover 93-97 % of the engine's
    (here: cubic + data consistency, an untrained net) errors against the noisy thin truth, per phase, with a
    width close to the noise the truth carries."""
    sd = 0.02
    rng = np.random.default_rng(1)
    thin = _smooth((81, 48, 48), 2) + rng.normal(0.0, sd, (81, 48, 48)).astype(np.float32)
    thick = degrade_through_plane(thin, 2, 2.0)  # (41, 48, 48), box of 2 thin slices every 2
    model = DegradationModel(2, 1, 2.0, 2.0, 1.0)
    torch.manual_seed(0)
    net = SRNet(SRNetConfig(fz=2, fx=1, width=8, depth=3))  # head ~0: cubic to ~1e-3
    cpu = torch.device("cpu")
    val_z = np.arange(2, 41, 5)
    v = cal.validate(net, il.through_pairs(thick, (2.0, 1.0, 1.0), model, val_z, cpu), 1)
    vz = cal.calibrate(net, cal.z_pairs(thick, model, cpu, planes=16, src_spacing=1.0), 1, v)
    assert vz is not None and len(vz.q_phase) == 2 and vz.n_cal > 1000
    assert 0.93 <= vz.coverage_95 <= 0.98, vz  # on its own pairs
    # the target: x2 of the thick slices against the noisy thin truth
    task = il.Task(2, 1, True, model)
    x = torch.from_numpy(thick).permute(1, 0, 2)  # coronal (Y, Z, X)
    pred = task.project(task.base(x), x).permute(1, 0, 2).numpy()  # (81, 48, 48)
    base = pred  # the untrained net adds ~nothing: |engine - cubic| ~ 0, the features ~EPS
    u = np.full(pred.shape, cal.EPS, np.float32) + v.k * np.abs(pred - base)
    noise = il.target_noise_rows(il.noise_sigma(thick, body=0.0), model, 1.0, pred.shape[0])[:, None, None]
    q = vz.q_rows(pred.shape[0])[:, None, None]
    sigma = np.sqrt((u * q / 1.96) ** 2 + noise**2)
    err = np.abs(pred - thin)[4:-4]  # the end slices: mirrored boundary
    sig = sigma[4:-4]
    cover = float(np.mean(err <= 1.96 * sig))
    assert 0.93 <= cover <= 0.97, cover
    for p in (0, 1):  # acquired positions and the slices between, each calibrated
        rows = (np.arange(4, 77) % 2) == p
        c = float(np.mean(err[rows] <= 1.96 * sig[rows]))
        assert 0.92 <= c <= 0.98, (p, c)
    width = float(np.mean(2 * 1.96 * sig))
    rms = float(np.sqrt(np.mean(err**2)))
    assert abs(width / (2 * 1.96 * rms) - 1) < 0.25, (width, rms)


def test_phase_noise_of_an_overlapping_acquisition() -> None:
    """Acquired slices of FWHM 1.5 x their step (overlap: z-correlated noise), made from white noise on a 2x finer
    grid; thick x2 slices of them. The truth-noise error of cubic + data consistency per phase must match
    ``phase_noise`` (per unit of the thick slices' noise) within 10 %; the white-thin-noise model misses it."""
    rng = np.random.default_rng(3)
    white = rng.normal(0.0, 1.0, (2 * 161, 4, 2000))
    acq = degrade_through_plane(white, 2, 3.0)  # (161, 4, 2000): FWHM 3 fine units every 2 = 1.5 x the step
    thick = degrade_through_plane(acq, 2, 3.0)  # (81, ...): the x2 input of FWHM 1.5 x its step
    model = DegradationModel(2, 1, 4.0, 6.0, 1.0)  # thickness_fine_px 3 on the 2 mm output grid
    task = il.Task(2, 1, True, model)
    x = torch.from_numpy(thick).permute(1, 0, 2)  # (4, 81, 2000)
    pred = task.project(task.base(x), x).permute(1, 0, 2).numpy()
    err = (pred - acq)[8:-8]
    s_thick = float(thick[4:-4].std())
    want = il.phase_noise(model, 1.0)[0]
    for p in (0, 1):
        got = float(np.sqrt(np.mean(err[(np.arange(8, 153) % 2) == p] ** 2))) / s_thick
        assert abs(got / want[p] - 1) < 0.1, (p, got, want)
    white_model = DegradationModel(2, 1, 4.0, 4.0, 1.0)  # contiguous: white thin noise assumed
    assert float(il.phase_noise(white_model, 1.0)[0][1]) > 1.25 * want[1]



def test_phase_shape_of_a_known_feature_profile_numpy_and_torch() -> None:
    """u = 1 at phase 0 and 3 at phase 1 (equal counts): profile [0.5, 1.5]; the torch version on a (Zf, Y, X)
    map with a body mask gives the same, voxels outside the body ignored."""
    u = np.tile([1.0, 3.0], 500)
    ph = np.tile([0, 1], 500)
    assert np.allclose(cal.phase_shape(u, ph, 2), [0.5, 1.5])
    assert np.allclose(cal.phase_shape(np.zeros(0), np.zeros(0, int), 2), [1.0, 1.0])
    vol = torch.tensor([1.0, 3.0] * 5)[:, None, None].expand(10, 4, 4).clone()
    body = torch.ones_like(vol, dtype=torch.bool)
    body[:, 0, :] = False
    vol[:, 0, :] = 100.0  # outside the body: must not count
    assert np.allclose(cal.target_phase_shape(vol, body, 2), [0.5, 1.5])


def test_shape_transfer_carries_the_pairs_phase_levels_to_a_distorted_target() -> None:
    """Errors of sd 1 (phase 0) and 2 (phase 1) on pairs and target alike; the pairs' feature follows the error sd,
    the target's is flat (inflated at phase 0, as real slices do). The per-phase q from the pairs alone over-covers
    phase 0 and under-covers phase 1 on the target; times ``shape_transfer`` both phases cover 93-97 %."""
    rng = np.random.default_rng(3)
    n = 40_000
    ph = np.tile([0, 1], n // 2)
    sd = np.where(ph == 0, 1.0, 2.0)
    u_pairs = sd * rng.uniform(0.8, 1.2, n)
    e_pairs = rng.normal(0.0, 1.0, n) * sd
    q = np.array([cal.conformal_q(np.abs(e_pairs[ph == p]), u_pairs[ph == p], np.zeros(n // 2)) for p in (0, 1)])
    u_t = 1.5 * rng.uniform(0.8, 1.2, n)  # flat across phases
    e_t = rng.normal(0.0, 1.0, n) * sd  # the same per-phase errors as the pairs
    plain = [float(np.mean(np.abs(e_t[ph == p]) <= q[p] * u_t[ph == p])) for p in (0, 1)]
    assert plain[0] > 0.99 and plain[1] < 0.9, plain
    c = cal.shape_transfer(cal.phase_shape(u_pairs, ph, 2), cal.phase_shape(u_t, ph, 2))
    qt = q * c
    fixed = [float(np.mean(np.abs(e_t[ph == p]) <= qt[p] * u_t[ph == p])) for p in (0, 1)]
    assert all(0.93 <= x <= 0.97 for x in fixed), (fixed, c)
    assert np.allclose(cal.shape_transfer(np.array([1.0, 1.0]), np.array([1.0, 1.0])), 1.0)
    assert cal.shape_transfer(np.array([0.01, 1.99]), np.array([1.0, 1.0]), clip=4.0)[0] == 0.25  # clipped


def test_finetune_factor_undoes_the_held_out_gain_of_fine_tuning() -> None:
    """A net fine-tuned on slices next to the held-out ones: the factor is the prior's held-out rms error over
    the tuned net's (dB difference / 20), never below 1, capped; ``heldout_gain`` is ``validate``'s gain."""
    assert abs(cal.finetune_factor(9.97, 4.50) - 10 ** (5.47 / 20)) < 1e-9  # the 1 mm phantom's figures
    assert cal.finetune_factor(3.0, 4.0) == 1.0  # fine-tuning made it worse: no shrinking
    assert cal.finetune_factor(30.0, 0.0) == 4.0
    sd = 0.02
    rng = np.random.default_rng(5)
    thin = _smooth((41, 40, 40), 6) + rng.normal(0.0, sd, (41, 40, 40)).astype(np.float32)
    thick = degrade_through_plane(thin, 2, 2.0)
    model = DegradationModel(2, 1, 2.0, 2.0, 1.0)
    torch.manual_seed(0)
    net = SRNet(SRNetConfig(fz=2, fx=1, width=8, depth=3))
    sets = il.through_pairs(thick, (2.0, 1.0, 1.0), model, np.arange(2, 21, 5), torch.device("cpu"))
    v = cal.validate(net, sets, 1)
    assert abs(cal.heldout_gain(net, sets, 1) - v.gain_db) < 1e-9
    assert abs(v.gain_db) < 0.5  # the untrained head adds ~nothing to cubic


def test_finetune_factor_of_a_non_finite_gain_is_the_widest_not_nan() -> None:
    """Adversarial review: NaN passed through np.clip, so a non-finite held-out gain would have made sigma NaN."""
    from models.calibration import finetune_factor

    assert finetune_factor(float("nan"), 1.0) == 4.0
    assert finetune_factor(float("inf"), float("inf")) == 4.0
    assert abs(finetune_factor(2.0, 1.0) - 10 ** (1 / 20)) < 1e-12


def test_leak_factor_is_the_near_over_far_gain_of_the_probe() -> None:
    """Near gain 7.9 dB, far 3.2 dB (probe - prior): factor 10^(4.7/20); no leak or a negative one: 1; capped;
    non-finite: the cap."""
    assert abs(cal.leak_factor(12.3, 4.4, 7.5, 4.3) - 10 ** ((7.9 - 3.2) / 20)) < 1e-9
    assert cal.leak_factor(5.0, 4.0, 6.0, 4.0) == 1.0
    assert cal.leak_factor(40.0, 0.0, 0.0, 0.0) == 4.0
    assert cal.leak_factor(float("nan"), 0.0, 0.0, 0.0) == 4.0


def test_transfer_factor_keeps_the_share_of_the_gain_the_z_axis_gets() -> None:
    """calib4: engine held-out gain g = 7.87 dB (the phantom's), coarse probe: in-plane +4.1 dB, z pairs +2.14 dB
    (tau 0.52): factor 10^(g (1 - tau) / 20); tau >= 1: 1; tau <= 0 or no in-plane gain: ``finetune_factor``."""
    tau = 2.142 / 4.105
    f = cal.transfer_factor(12.308, 4.44, 9.757, 5.652, 6.459, 4.317)
    assert abs(f - 10 ** (7.868 * (1 - tau) / 20)) < 1e-9 and 1.5 < f < 1.6
    assert cal.transfer_factor(12.0, 4.0, 8.0, 4.0, 9.0, 4.0) == 1.0  # z gains as much: the target shares it all
    assert cal.transfer_factor(12.0, 4.0, 8.0, 4.0, 3.0, 4.0) == cal.finetune_factor(12.0, 4.0)  # z lost
    assert cal.transfer_factor(12.0, 4.0, 3.0, 4.0, 5.0, 4.0) == cal.finetune_factor(12.0, 4.0)  # ip <= 0
    assert cal.transfer_factor(float("nan"), 4.0, 8.0, 4.0, 5.0, 4.0) == 4.0
    assert cal.transfer_factor(3.0, 4.0, 8.0, 4.0, 5.0, 4.0) == 1.0  # the engine's fine-tuning lost: no factor


def test_coarse_probe_on_a_known_noise_volume() -> None:
    """Smooth volume + white noise of known sd, thick x2 slices: the coarse-scale probe's gains (in-plane pairs
    one scale coarser, and the z pairs) are 0 for a probe that is the prior, so the factor is
    ``finetune_factor`` of the engine's gains; a probe fine-tuned a few steps at the coarse scale gives gains on
    both that make a finite factor between 1 and ``finetune_factor``."""
    sd = 0.02
    rng = np.random.default_rng(9)
    thin = _smooth((81, 40, 40), 10) + rng.normal(0.0, sd, (81, 40, 40)).astype(np.float32)
    thick = degrade_through_plane(thin, 2, 2.0)  # (41, 40, 40)
    model = DegradationModel(2, 1, 2.0, 2.0, 1.0)
    coarse = DegradationModel(2, 1, 4.0, 4.0, 1.0)  # as z_pairs' (and selfsup._coarse_probe's)
    cpu = torch.device("cpu")
    train, val = il.split_slices(thick.shape[0], 48, 12, 0)
    held = il.through_pairs(thick, (2.0, 1.0, 1.0), coarse, val, cpu)
    zs = cal.z_pairs(thick, model, cpu, planes=8, src_spacing=1.0)
    assert held and zs
    torch.manual_seed(0)
    prior = SRNet(SRNetConfig(fz=2, fx=1, width=8, depth=3))
    gp = (cal.heldout_gain(prior, held, 1), cal.heldout_gain(prior, zs, 1))
    assert cal.transfer_factor(6.0, 2.0, gp[0], gp[0], gp[1], gp[1]) == cal.finetune_factor(6.0, 2.0)
    probe = SRNet(SRNetConfig(fz=2, fx=1, width=8, depth=3))
    probe.load_state_dict(prior.state_dict())
    il.train(probe, il.through_pairs(thick, (2.0, 1.0, 1.0), coarse, train, cpu), 30, 1e-3, 0)
    probe.eval()
    f = cal.transfer_factor(6.0, 2.0, cal.heldout_gain(probe, held, 1), gp[0], cal.heldout_gain(probe, zs, 1), gp[1])
    assert 1.0 <= f <= cal.finetune_factor(6.0, 2.0) and np.isfinite(f), f


def test_noise_level_is_the_noise_the_low_feature_voxels_show() -> None:
    """sigma5: |err| = noise of sd 0.5 x the estimate where the feature u is small (plus an engine error that grows
    with u): the factor is ~0.5; noise as estimated: 1 (clipped, never above); no noise term: 1."""
    rng = np.random.default_rng(3)
    u = rng.uniform(0.0, 1.0, 50_000)
    est = np.full(u.size, 0.02)
    err = np.abs(rng.normal(0.0, 0.01, u.size) + rng.normal(0.0, 1.0, u.size) * 0.05 * u**2)
    c = cal.noise_level(err, u, est)
    assert 0.45 < c < 0.56, c
    assert cal.noise_level(np.abs(rng.normal(0.0, 0.03, u.size)), u, est) == 1.0
    assert cal.noise_level(err, u, np.zeros(u.size)) == 1.0
    assert cal.noise_level(np.zeros(0), np.zeros(0), np.zeros(0)) == 1.0


def test_box_smooth_averages_along_the_given_axes_only() -> None:
    x = torch.zeros(3, 5, 7)
    x[1, 2, 3] = 9.0
    y = cal.box_smooth(x, (1, 2), 1)
    assert torch.allclose(y[1, 1:4, 2:5], torch.ones(3, 3)) and float(y.sum()) == 9.0 and float(y[0].abs().sum()) == 0
    assert torch.equal(cal.box_smooth(x, (1, 2), 0), x)
    e = cal.box_smooth(torch.arange(4.0)[None], (1,), 1)  # edges replicated
    assert torch.allclose(e, torch.tensor([[1 / 3, 1.0, 2.0, 8 / 3]]))


def test_through_sigma_ranks_the_noisier_region_higher() -> None:
    """sigma5: smooth thin volume whose right half carries 8 x the noise of the left; thick x2 slices. A net
    fine-tuned a few steps on the series' own pairs, validated on held-out pairs (features, k, j, noise level, q),
    then sigma on the target grid as ``selfsup`` makes it (``target_u``): sigma is higher on the noisy half, ranks
    |error| against the thin truth, and the noise level the pairs show stays in (0, 1]."""
    rng = np.random.default_rng(5)
    shape = (61, 40, 48)
    sd = np.where(np.arange(shape[2]) < 24, 0.004, 0.032).astype(np.float32)[None, None, :]
    thin = _smooth(shape, 6) + rng.normal(0.0, 1.0, shape).astype(np.float32) * sd
    thick = degrade_through_plane(thin, 2, 2.0)  # (31, 40, 48)
    model = DegradationModel(2, 1, 2.0, 2.0, 1.0)
    cpu = torch.device("cpu")
    train_z, val_z = il.split_slices(thick.shape[0], 48, 12, 0)
    torch.manual_seed(0)
    net = SRNet(SRNetConfig(fz=2, fx=1, width=8, depth=3))
    il.train(net, il.through_pairs(thick, (2.0, 1.0, 1.0), model, train_z, cpu), 40, 1e-3, 0)
    v = cal.validate(net, il.through_pairs(thick, (2.0, 1.0, 1.0), model, val_z, cpu), 2)
    assert 0.0 < v.noise_factor <= 1.0 and len(v.q_phase) == 2
    task = il.Task(2, 1, True, model)
    x = torch.from_numpy(thick).permute(1, 0, 2)  # coronal (Y, Z, X)
    rs = torch.stack([il.residual(net, x, task, fl) for fl in il.FLIPS[:2]])
    base = task.base(x)
    fused = task.project(base + rs.mean(0), x).permute(1, 0, 2)  # (Zf, Y, X)
    spread = rs.std(0, unbiased=False).permute(1, 0, 2)
    u = cal.target_u(v, fused, base.permute(1, 0, 2), spread)
    noise = il.target_noise_rows(il.noise_sigma(thick, body=0.0), model, 1.0, u.shape[0]) * v.noise_factor
    q = v.q_rows(u.shape[0])
    sigma = np.sqrt((u.numpy() * q[:, None, None] / 1.96) ** 2 + noise[:, None, None] ** 2)[2:-2]
    err = np.abs(fused.numpy() - thin)[2:-2]
    assert sigma[..., 28:].mean() > 1.5 * sigma[..., :20].mean(), (sigma[..., 28:].mean(), sigma[..., :20].mean())
    assert il.spearman(sigma.ravel(), err.ravel()) > 0.3


def test_pairs_feature_against_the_plain_cubic_covers_the_target_near_95() -> None:
    """sigma6: sharp isotropic detail + white noise of known sd (0.001), thick x2 slices; the engine is cubic + data
    consistency (an untrained net). The target's feature is |engine - cubic| against the plain cubic (``target_u``).
    With the held-out pairs' feature against the data-consistent cubic instead (``PLAIN_CUBIC_FEATURE = False``,
    the default before sigma9) the pairs do not see the deblurring at the acquired positions that the target's
    feature counts, q is fitted too large and the target is over-covered (measured 0.993); with the same feature on
    both (plain cubic) the coverage lands near 95 % (measured 0.958) with half the width."""
    rng = np.random.default_rng(3)
    shape = (81, 48, 48)
    z, y, x = np.mgrid[0 : shape[0], 0 : shape[1], 0 : shape[2]].astype(np.float32)
    thin = np.full(shape, 0.5, np.float32)
    for _ in range(300):  # isotropic detail: the in-plane pairs see what z sees
        c = rng.uniform(0, 1, 3) * shape
        thin += 0.15 * np.exp(-((z - c[0]) ** 2 + (y - c[1]) ** 2 + (x - c[2]) ** 2) / rng.uniform(1, 4))
    thin += rng.normal(0.0, 0.001, shape).astype(np.float32)
    thick = degrade_through_plane(thin, 2, 2.0)  # (41, 48, 48)
    model = DegradationModel(2, 1, 2.0, 2.0, 1.0)
    cpu = torch.device("cpu")
    torch.manual_seed(0)
    net = SRNet(SRNetConfig(fz=2, fx=1, width=8, depth=3))  # head ~0: cubic + data consistency
    pairs = il.through_pairs(thick, (2.0, 1.0, 1.0), model, np.arange(2, thick.shape[0], 3), cpu)
    task = il.Task(2, 1, True, model)
    xx = torch.from_numpy(thick).permute(1, 0, 2)  # coronal (Y, Z, X)
    base = task.base(xx)
    fused = task.project(base + il.residual(net, xx, task, ()), xx).permute(1, 0, 2)  # (Zf, Y, X)
    noise = il.target_noise_rows(il.noise_sigma(thick, body=0.0), model, 1.0, fused.shape[0])[:, None, None]
    err = np.abs(fused.numpy() - thin)[4:-4]  # the end slices: mirrored boundary

    def coverage(plain: bool) -> tuple[float, float]:
        old = cal.PLAIN_CUBIC_FEATURE
        cal.PLAIN_CUBIC_FEATURE = plain
        try:
            v = cal.calibrate(net, pairs, 1, cal.Validation(0.0, 1.0, 1.0, 0.0, 0.0))  # k = 1, j = 0 kept
        finally:
            cal.PLAIN_CUBIC_FEATURE = old
        assert v is not None and abs(v.coverage_95 - 0.95) < 0.01  # on its own pairs
        u = cal.target_u(v, fused.clone(), base.permute(1, 0, 2).contiguous(), torch.zeros_like(fused)).numpy()
        sigma = np.sqrt((u * v.q_rows(u.shape[0])[:, None, None] / 1.96) ** 2 + noise**2)[4:-4]
        return float(np.mean(err <= 1.96 * sigma)), float(np.mean(sigma))

    (cov_old, sig_old), (cov_new, sig_new) = coverage(False), coverage(True)
    assert cov_old > 0.98, cov_old
    assert 0.935 <= cov_new <= 0.97, cov_new
    assert sig_new < 0.75 * sig_old, (sig_new, sig_old)


def test_jackknife_corr_leaves_each_block_out() -> None:
    """The delete-one-block correlations from per-block sums equal np.corrcoef on the voxels left."""
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=300), rng.normal(size=300)
    b += 0.5 * a
    block = np.arange(300) * 6 // 300
    full, loo = cal._jackknife_corr(a, b, block, 6)
    assert abs(full - np.corrcoef(a, b)[0, 1]) < 1e-12
    for g in range(6):
        keep = block != g
        assert abs(loo[g] - np.corrcoef(a[keep], b[keep])[0, 1]) < 1e-12


def _near_tied_features(seed: int, n_blocks: int = 20, per_block: int = 400) -> tuple[np.ndarray, ...]:
    """Held-out voxels in correlated blocks (a shared factor per block, as the pixels of one held-out slice): |err|
    of known scale s, a spread feature s x noise, and two further features (delta, grad) that carry the same
    information on another scale (10 x, 0.1 x) with a little noise of their own: every k, j candidate ranks |err|
    about equally well (near-tied), and which is best by a hair depends on the sample."""
    rng = np.random.default_rng(seed)
    n = n_blocks * per_block
    block = np.repeat(np.arange(n_blocks), per_block)
    s = np.exp(rng.normal(0, 0.5, n_blocks)[block] + rng.normal(0, 0.5, n))
    err = np.abs(rng.normal(0, 1, n)) * s
    std = s * np.exp(rng.normal(0, 0.3, n))
    delta = 10 * std * np.exp(rng.normal(0, 0.05, n))
    grad = 0.1 * std * np.exp(rng.normal(0, 0.05, n))
    return std, delta, grad, err, block


def test_one_se_rule_keeps_the_simplest_of_near_tied_features_whatever_the_sample() -> None:
    """sigma7: with near-tied candidates the largest rank correlation picks a different k, j from sample to sample
    (the width on the target flipped 2.3 x that way, docs/engines.md sigma6); the one-standard-error rule (block
    jackknife SE of the difference to the best) keeps the most parsimonious, the spread alone (k = j = 0), on every
    sample, and reports the near-tied set and the SE."""
    old, new = set(), set()
    for seed in range(6):
        std, delta, grad, err, block = _near_tied_features(seed)
        a = cal.choose_kj(std, delta, grad, err, block, rule="max")
        b = cal.choose_kj(std, delta, grad, err, block, rule="one_se")
        old.add((a.k, a.j))
        new.add((b.k, b.j))
        assert b.n_near > 1 and 0.0 < b.rho_se < 0.1
        assert b.rho >= a.rho - 3 * b.rho_se
    assert len(old) > 1, old  # the former rule flips
    assert new == {(0.0, 0.0)}, new


def test_one_se_rule_keeps_a_feature_that_ranks_clearly_better() -> None:
    """The rule does not drop a feature whose gain in rank correlation is well beyond its standard error: |err|
    follows delta, the spread is noise, so k > 0 is kept."""
    rng = np.random.default_rng(1)
    n = 8000
    block = np.arange(n) * 20 // n
    s = np.exp(rng.normal(0, 0.7, n))
    err = np.abs(rng.normal(0, 1, n)) * s
    std = 0.01 * np.exp(rng.normal(0, 0.7, n))
    c = cal.choose_kj(std, s, np.zeros(n), err, block, rule="one_se")
    assert c.k > 0 and c.rho > 0.3


def test_average_rule_gives_one_stable_feature_mix_and_rejects_unknown_rules() -> None:
    """``rule="average"``: the near-tied candidates' u averaged is one k, j (u is linear in the features) whose rank
    correlation is within the standard error of the best's, and it moves little from sample to sample."""
    mixes = []
    for seed in range(3):
        std, delta, grad, err, block = _near_tied_features(seed)
        c = cal.choose_kj(std, delta, grad, err, block, rule="average")
        best = cal.choose_kj(std, delta, grad, err, block, rule="max")
        assert c.rho >= best.rho - c.rho_se and c.n_near > 1
        mixes.append((c.k, c.j))
    ks, js = np.array(mixes).T
    assert np.ptp(ks) < 0.2 * max(ks.mean(), 1e-9) and np.ptp(js) < 0.2 * max(js.mean(), 1e-9), mixes
    try:
        cal.choose_kj(std, delta, grad, err, block, rule="best")  # type: ignore[arg-type]
    except ValueError as exc:
        assert "best" in str(exc)
    else:
        raise AssertionError("unknown rule accepted")


def _held_known(rng: np.random.Generator, n: int, ratio: tuple[float, float], noise_sd: float) -> cal.Held:
    """Held-out voxels with a feature u (log-normal) and |err| ~ |N(0, (ratio[phase] u)^2 + noise_sd^2)|: the
    engine's error is ratio x u per phase plus white noise of known sd (which the pairs report as their noise)."""
    u = np.exp(rng.normal(0.0, 0.6, n))
    phase = np.arange(n) % 2
    err = rng.normal(0.0, 1.0, n) * np.sqrt((np.asarray(ratio)[phase] * u) ** 2 + noise_sd**2)
    return cal.Held(err, err, u, np.zeros(n), np.zeros(n), np.full(n, noise_sd), phase, np.arange(n) * 20 // n)


def test_zscale_carries_the_in_plane_q_to_the_target_axis_with_known_noise() -> None:
    """sigma8: the engine's error per unit of feature is, at the fine scale, 1 (phase 0) / 1.5 (phase 1) in-plane
    and 1.2 / 3 along z (the target); one scale coarser everything is 1.6 x larger (in-plane 1.6 / 2.4, z pairs
    1.92 / 4.8), white noise of known sd 0.3 on every set. The z pairs' own q over-covers the target (the coarser
    scale), the in-plane q x one z difficulty misses the phases; ``zscale`` (z pairs' q over the coarse in-plane
    pairs' q, per phase) x the in-plane q covers the target 93-97 % in each phase."""
    rng = np.random.default_rng(5)
    n, sd = 40_000, 0.3
    fine_xy = _held_known(rng, n, (1.0, 1.5), sd)
    coarse_xy = _held_known(rng, n, (1.6, 2.4), sd)
    zp = _held_known(rng, n, (1.92, 4.8), sd)
    target = _held_known(rng, n, (1.2, 3.0), sd)
    v0 = cal.Validation(0.0, 0.0, 1.0, 0.0, 0.0)  # k = j = 0: u = std + EPS
    v = cal.calibrate_held(fine_xy, v0)
    vz, vc = cal.calibrate_held(zp, v0), cal.calibrate_held(coarse_xy, v0)
    assert v is not None and vz is not None and vc is not None
    scale = cal.zscale(vz, vc, 2, 1.0)
    assert np.allclose(scale, [1.2, 2.0], rtol=0.08), scale  # z over in-plane, per phase

    def cover(q: np.ndarray) -> list[float]:
        u = target.u(0.0, 0.0)
        sig = np.sqrt((u * q[target.phase] / 1.96) ** 2 + target.noise**2)
        ok = np.abs(target.err) <= 1.96 * sig
        return [float(ok[target.phase == p].mean()) for p in (0, 1)]

    new = cover(v.q_rows(2) * scale)
    assert all(0.93 <= c <= 0.97 for c in new), new
    assert min(cover(vz.q_rows(2))) > 0.97  # the coarser z pairs' own q over-covers
    one = cover(v.q_rows(2) * float(np.mean(scale)))  # one ratio for both phases misses them
    assert one[0] > 0.97 and one[1] < 0.93, one


def test_narrowest_on_picks_the_efficient_near_tied_feature() -> None:
    """``narrowest_on``: of two candidates that both cover the pairs by construction, the one whose feature follows
    |err| (delta) gives the narrower interval and is picked; the one that does not (grad: noise) is not; an empty
    near set or too few voxels fall back."""
    rng = np.random.default_rng(2)
    n = 6000
    s = np.exp(rng.normal(0, 0.7, n))
    err = rng.normal(0, 1, n) * s
    z = cal.Held(err, err, np.zeros(n), s, np.exp(rng.normal(0, 0.7, n)), np.zeros(n), np.arange(n) % 2,
                 np.arange(n) * 20 // n)
    assert cal.narrowest_on(z, ((0.0, 1.0), (1.0, 0.0)), lambda k, j: 1.0) == (1.0, 0.0)
    assert cal.narrowest_on(z, (), lambda k, j: 1.0) == (1.0, 0.0)
    small = cal.Held(*(a[:100] for a in (z.err, z.base_err, z.std, z.delta, z.grad, z.noise, z.phase, z.block)))
    assert cal.narrowest_on(small, ((0.0, 1.0), (1.0, 0.0)), lambda k, j: 1.0) == (0.0, 1.0)


def _twin_features(seed: int, z_axis: bool, n_blocks: int = 20, per_block: int = 400) -> cal.Held:
    """Held-out voxels in correlated blocks with |err| of known scale s, a negligible spread, delta ~ s and grad ~
    5 delta: on the in-plane pairs (``z_axis`` False) grad is delta up to a 2 % jitter, so every candidate with k
    or j > 0 ranks |err| alike (a near-tie of two features); on the z pairs (True) grad is noise of its own and
    only delta follows |err|."""
    rng = np.random.default_rng(seed)
    n = n_blocks * per_block
    block = np.repeat(np.arange(n_blocks), per_block)
    s = np.exp(rng.normal(0, 0.5, n_blocks)[block] + rng.normal(0, 0.5, n))
    err = rng.normal(0, 1, n) * s
    std = 1e-4 * np.exp(rng.normal(0, 0.3, n))
    delta = s * np.exp(rng.normal(0, 0.4, n))
    grad = 5 * (np.exp(rng.normal(0, 0.6, n)) if z_axis else delta) * np.exp(rng.normal(0, 0.02, n))
    return cal.Held(err, err, std, delta, grad, np.zeros(n), np.arange(n) % 2, block)


def test_zrho_breaks_the_near_tie_by_the_rank_on_the_z_pairs(monkeypatch: pytest.MonkeyPatch) -> None:
    """sigma9, ``KJ_RULE = "zrho"``: two features tie on the in-plane pairs (delta and grad carry the same ranks
    there), only delta ranks the z pairs' |err|. ``choose_kj`` hands the near set (both pure delta and pure grad
    candidates in it) to ``best_rank_on``, which picks a candidate whose u is delta's (> 99 % of it), whose
    Spearman on the z pairs is the largest of the near set; ``validate`` with the rule applies it through-plane (its k, j come from
    ``best_rank_on``, not ``narrowest_on``); candidates that rank alike (one view, the same k : j) go to the
    smallest k + j; an empty near set or too few z voxels fall back."""
    for seed in range(3):
        h, z = _twin_features(seed, False), _twin_features(100 + seed, True)
        c = cal.choose_kj(h.std, h.delta, h.grad, np.abs(h.err), h.block, rule="zrho")
        assert any(k > 0 and j == 0 for k, j in c.near) and any(k == 0 and j > 0 for k, j in c.near), c.near
        k, j = cal.best_rank_on(z, c.near)
        assert k > 0 and j * z.grad.mean() < 0.01 * k * z.delta.mean(), (k, j)  # delta carries u
        rho = {kj: il.spearman(z.u(*kj)[:100_000], np.abs(z.err)) for kj in c.near}
        assert rho[(k, j)] >= max(rho.values()) - cal.RANK_TIE
    one_view = cal.Held(z.err, z.base_err, np.zeros_like(z.std), z.delta, z.grad, z.noise, z.phase, z.block)
    assert cal.best_rank_on(one_view, ((2.0, 0.2), (0.5, 0.05), (0.0, 1.0))) == (0.5, 0.05)  # same k : j, same ranks
    assert cal.best_rank_on(z, ()) == (1.0, 0.0)
    small = cal.Held(*(a[:100] for a in (z.err, z.base_err, z.std, z.delta, z.grad, z.noise, z.phase, z.block)))
    assert cal.best_rank_on(small, ((0.0, 1.0), (1.0, 0.0))) == (0.0, 1.0)

    class _Pairs:  # a through-plane pair set as ``validate`` sees it (features from the patched ``_held``)
        task = il.Task(2, 1, True, DegradationModel(2, 1, 2.0, 2.0, 1.0))

    monkeypatch.setattr(cal, "_held", lambda *a: _twin_features(0, False))
    monkeypatch.setattr(cal, "KJ_RULE", "zrho")
    v = cal.validate(torch.nn.Identity(), [_Pairs()], 1, tie=_twin_features(100, True))  # type: ignore[arg-type, list-item]
    zt = _twin_features(100, True)
    assert v.k > 0 and v.j * zt.grad.mean() < 0.01 * v.k * zt.delta.mean() and v.n_near > 1, (v.k, v.j, v.n_near)


def test_noise_min_views_measures_the_noise_level_with_one_view(monkeypatch: pytest.MonkeyPatch) -> None:
    """sigma10, ``NOISE_MIN_VIEWS``: held-out pairs whose |err| is white noise of sd 1 plus an error ~ the feature
    delta, while the pairs report a noise 3 x too large (texture counted as noise). With one view (fast mode) and
    2 views needed (the rule before sigma10) the estimate is kept (noise factor 1); with ``NOISE_MIN_VIEWS = 1`` (the
    default) ``validate``
    measures it on the low-u voxels: about 1/3 (an upper bound: the engine's own error left there biases it up),
    bounded below by ``ONE_VIEW_NOISE_MIN`` with one view only (conservative: here it over-covers); with the
    measure as it is the calibrated interval covers 95 % of the pairs with the lowered noise term."""
    rng = np.random.default_rng(7)
    n = 40_000
    delta = np.exp(rng.normal(0.0, 0.8, n))
    err = rng.normal(0.0, 1.0, n) * np.sqrt(1.0 + (0.5 * delta) ** 2)
    h = cal.Held(err, err, np.zeros(n), delta, np.zeros(n), np.full(n, 3.0), np.arange(n) % 2,
                 np.arange(n) * cal.JACKKNIFE_BLOCKS // n)

    class _Pairs:  # a through-plane pair set as ``validate`` sees it (features from the patched ``_held``)
        task = il.Task(2, 1, True, DegradationModel(2, 1, 2.0, 2.0, 1.0))

    monkeypatch.setattr(cal, "_held", lambda *a: cal.Held(*(np.copy(x) for x in (
        h.err, h.base_err, h.std, h.delta, h.grad, h.noise, h.phase, h.block))))
    monkeypatch.setattr(cal, "KJ_RULE", "max")
    assert cal.NOISE_MIN_VIEWS == 1  # the default since sigma10
    monkeypatch.setattr(cal, "NOISE_MIN_VIEWS", 2)
    v = cal.validate(torch.nn.Identity(), [_Pairs()], 1)  # type: ignore[arg-type, list-item]
    assert v.noise_factor == 1.0
    monkeypatch.setattr(cal, "NOISE_MIN_VIEWS", 1)
    v1 = cal.validate(torch.nn.Identity(), [_Pairs()], 1)  # type: ignore[arg-type, list-item]
    assert v1.noise_factor == cal.ONE_VIEW_NOISE_MIN == 0.7  # the one-view measure, bounded below
    assert v1.coverage_95 >= 0.95, v1.coverage_95  # the bound can only widen the interval (here 2 x the noise)
    monkeypatch.setattr(cal, "ONE_VIEW_NOISE_MIN", 0.0)
    v0 = cal.validate(torch.nn.Identity(), [_Pairs()], 1)  # type: ignore[arg-type, list-item]
    assert 0.3 <= v0.noise_factor <= 0.45, v0.noise_factor
    assert 0.94 <= v0.coverage_95 <= 0.96, v0.coverage_95
    v2 = cal.validate(torch.nn.Identity(), [_Pairs()], 2)  # type: ignore[arg-type, list-item]
    assert v2.noise_factor == v0.noise_factor  # two views: the measure as before, no bound
