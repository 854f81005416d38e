"""Split-conformal sigma calibration of ``selfsup`` (``models.internal``) on synthetic cases with known noise."""

from __future__ import annotations

import numpy as np
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


def test_far_split_keeps_the_far_block_away_from_the_probe_training_slices() -> None:
    """calib4: the block split that measures fine-tuning's leak into the held-out pairs."""
    train, val = il.split_slices(60, 48, 12, 0)
    probe, near, far = cal.far_split(60, train, val, gap=2)
    assert far.size == 15 and far[0] == 22 and far[-1] == 36  # the central quarter
    assert probe.size > 0 and near.size > 0
    assert np.min(np.abs(probe[:, None] - far[None, :])) > 2  # no probe slice within the gap
    assert np.min(np.abs(near[:, None] - far[None, :])) > 2
    assert set(probe) <= set(train) and set(near) <= set(val)
    assert np.min(np.abs(near[:, None] - probe[None, :])) == 1  # near = next to probe training slices
    p2, n2, f2 = cal.far_split(6, *il.split_slices(6, 48, 12, 0))
    assert min(p2.size, n2.size, f2.size) == 0  # too short: the engine keeps the near factor


def test_leak_factor_is_the_near_over_far_gain_of_the_probe() -> None:
    """Near gain 7.9 dB, far 3.2 dB (probe - prior): factor 10^(4.7/20); no leak or a negative one: 1; capped;
    non-finite: the cap. ``target_gain_factor`` divides the near factor by the far gain's."""
    assert abs(cal.leak_factor(12.3, 4.4, 7.5, 4.3) - 10 ** ((7.9 - 3.2) / 20)) < 1e-9
    assert cal.leak_factor(5.0, 4.0, 6.0, 4.0) == 1.0
    assert cal.leak_factor(40.0, 0.0, 0.0, 0.0) == 4.0
    assert cal.leak_factor(float("nan"), 0.0, 0.0, 0.0) == 4.0
    assert abs(cal.target_gain_factor(12.3, 4.4, 5.0, 3.0) - 10 ** ((7.9 - 2.0) / 20)) < 1e-9
    assert cal.target_gain_factor(12.3, 4.4, 3.0, 5.0) == cal.finetune_factor(12.3, 4.4)  # far gain < 0: none


def test_leak_factor_of_a_probe_on_a_known_noise_volume() -> None:
    """Smooth volume + white noise of known sd, thick x2 slices: a probe that is the prior (no fine-tuning)
    has no leak (factor 1 exactly); a probe fine-tuned a few steps on the block split's training slices gives a
    finite factor in [1, 4]."""
    sd = 0.02
    rng = np.random.default_rng(7)
    thin = _smooth((81, 40, 40), 8) + rng.normal(0.0, sd, (81, 40, 40)).astype(np.float32)
    thick = degrade_through_plane(thin, 2, 2.0)  # (41, 40, 40)
    model = DegradationModel(2, 1, 2.0, 2.0, 1.0)
    cpu = torch.device("cpu")
    train, val = il.split_slices(thick.shape[0], 48, 12, 0)
    probe_z, near_z, far_z = cal.far_split(thick.shape[0], train, val)
    near = il.through_pairs(thick, (2.0, 1.0, 1.0), model, near_z, cpu)
    far = il.through_pairs(thick, (2.0, 1.0, 1.0), model, far_z, cpu)
    torch.manual_seed(0)
    prior = SRNet(SRNetConfig(fz=2, fx=1, width=8, depth=3))
    gains = [cal.heldout_gain(prior, s, 1) for s in (near, far)]
    assert cal.leak_factor(gains[0], gains[0], gains[1], gains[1]) == 1.0
    probe = SRNet(SRNetConfig(fz=2, fx=1, width=8, depth=3))
    probe.load_state_dict(prior.state_dict())
    il.train(probe, il.through_pairs(thick, (2.0, 1.0, 1.0), model, probe_z, cpu), 30, 1e-3, 0)
    probe.eval()
    f = cal.leak_factor(cal.heldout_gain(probe, near, 1), gains[0], cal.heldout_gain(probe, far, 1), gains[1])
    assert 1.0 <= f <= 4.0 and np.isfinite(f), f


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
