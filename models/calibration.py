"""Sigma of ``selfsup``: held-out validation, sigma features and split-conformal calibration.

Method. The sigma of a voxel is sqrt((u q / 1.96)^2 + noise^2): u = std over test-time views + k |engine - cubic|
+ j |grad engine| + EPS (features; through-plane, |engine - cubic| against the plain cubic on the pairs as on the
target, ``PLAIN_CUBIC_FEATURE``; k, j chosen by rank correlation with |error| on one half of the held-out internal
pairs, ``choose_kj`` by ``KJ_RULE``, candidates within one SE of the best decided by the rank correlation on the
``z_pairs``, ``best_rank_on``; through-plane, the features box-averaged along the axes not up-sampled, and the
noise term's level measured on that half where u is smallest, ``noise_level``), q the split-conformal factor fitted
on the other half so that
95 % of |error| lie within 1.96 sigma
(split / inductive conformal prediction: Vovk, Gammerman & Shafer 2005, "Algorithmic Learning in a Random World";
Lei, G'Sell, Rinaldo, Tibshirani & Wasserman 2018, "Distribution-free predictive inference for regression", JASA;
finite-sample (n + 1) level as in Angelopoulos & Bates 2021, "A gentle introduction to conformal prediction").
The noise term is the noise the target grid carries (``internal.target_noise_rows``), which no engine can predict;
q is fitted with the pairs' own noise in the interval so that the target's noise can replace it at inference.
Through-plane, one q per output-row phase (row % f). The features' phase profile differs between the pairs and the
target (on the target, u at the acquired positions is inflated by the real slice's deblurring and noise, which are
not errors), so the pairs' per-phase sigma levels are carried over through the ratio of the two phase profiles of
the mean feature (``phase_shape``, ``shape_transfer``). torch + numpy only.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch

from models.degrade import DegradationModel, degrade_through_plane, through_plane_matrix
from models.internal import PairSet, Task, _ranks, ensemble, noise_sigma, phase_noise, spearman, through_pairs
from models.nets import SRNet

EPS = 1e-3  # sigma floor in normalised units
# through-plane: the features are averaged over a (2 r + 1) box along the axes that were not up-sampled (pairs: the
# columns; target: y and x) before they are weighted. The error level is locally smooth (the local-error oracle of
# models.evaluate) while a voxel's own features are not; measured in docs/engines.md (sigma5)
SMOOTH_RADIUS = 1
# through-plane with >= 2 test-time views (u holds their spread): the noise term's level is measured on the held-out
# pairs (``noise_level``) instead of trusting the in-plane noise estimate (internal.noise_sigma), which texture
# inflates on MR. With one view (CPU fast mode) u is k |engine - cubic| + j |dz engine| alone, which transfers to the
# target's acquired positions less well: there the lower noise term over-covered (MPRAGE 0.993, XA30 0.984) and
# the estimate is kept (docs/engines.md, sigma5)
NOISE_FROM_PAIRS = True
# sigma10: the fewest test-time views with which ``validate`` measures the noise level on the pairs (2: before
# sigma10, fast mode's one view keeps the estimate; 1, the default since sigma10: fast mode too). Under sigma9's
# "xy_zscale" q the z pairs set the level, and the in-plane estimate (texture counted as noise on MR) flattens sigma:
# XA30 fast, 95 % of sigma^2 the constant noise term (docs/engines.md, sigma10)
NOISE_MIN_VIEWS = 1
# sigma10: with one view (NOISE_MIN_VIEWS = 1), the noise factor is at least this (``noise_level`` measures only an
# upper bound of the pairs' noise; with one view the features transfer to the target's acquired positions less well,
# sigma5). 0.7 of the two values measured (0.5, 0.7) on XA30 / MPRAGE fast: XA30 fast Spearman 0.493 -> 0.542 at a
# narrower interval; the runs with >= 2 views (whole engine) are unchanged (docs/engines.md, sigma10)
ONE_VIEW_NOISE_MIN = 0.7
LOW_U_FRACTION = 0.2  # ``noise_level``: the share of voxels with the smallest feature u where noise dominates |err|
# through-plane: True takes the held-out pairs' feature |engine - cubic| against the plain cubic B-spline up-sampling,
# as on the target grid (``target_u`` gets the cubic before data consistency); False (the default, as before sigma6)
# against the cubic projected by data consistency, which at the acquired positions already holds the deblurring
# that the target's |engine - cubic| counts (the target's mean u over the pairs' at phase 0: 1.3-3.9 x in fast mode,
# where k is large). True brought 7 of the 8 sigma6 eval runs into coverage [0.93, 0.97] (fast mode all four, MPRAGE
# fast 0.983 -> 0.968) but took the phantom's whole engine 0.945 -> 0.977 at 2.3 x the width: there the k, j grid
# search flips between near-tied candidates (rank correlation 0.459 vs 0.455) whose widths differ 2 x; not the
# default until that choice is made robust (docs/engines.md, sigma6). sigma7: the three rules of ``KJ_RULE`` with
# True all leave the phantom out of [0.93, 0.97] (whole 0.973 / 0.913 / 0.973, fast 0.927 / 0.918). sigma9: True
# (the default) with KJ_RULE "zrho" and selfsup.SIGMA_FROM "xy_zscale": 7 of the 8 eval runs in [0.93, 0.97], the
# phantom's whole engine 0.9702, none under (docs/engines.md, sigma9)
PLAIN_CUBIC_FEATURE = True
# the k, j grid of ``choose_kj``; the rank correlations of the candidates are estimated on the same correlated voxels
# (pixels of one held-out slice are not independent), so their standard error comes from a delete-one-block jackknife
# over ``JACKKNIFE_BLOCKS`` contiguous blocks of each pair set (reported as ``through_sigma_rho_se``)
K_GRID = (0.0, 0.25, 0.5, 1.0, 2.0, 4.0, 1e3)
J_GRID = (0.0, 0.05, 0.2, 1.0)
JACKKNIFE_BLOCKS = 20
# through-plane k, j rule (``choose_kj``): "max" the largest rank correlation (the default before sigma9);
# "one_se" the one-standard-error rule; "average" the near-tied candidates' u averaged. Measured with
# PLAIN_CUBIC_FEATURE = True on the 8 eval runs (docs/engines.md, sigma7): neither puts the phantom in range, so
# neither is the default. "zwidth" (sigma8): the near-tied candidate with the narrowest split-conformal interval on
# the z pairs (``narrowest_on``; selfsup.SIGMA_FROM "xy_zscale" passes them), else "max". "zrho" (sigma9): the
# near-tied candidate whose u ranks |error| best on the z pairs (``best_rank_on``), else "max" (the default since
# sigma9: no eval run under 0.93, docs/engines.md sigma9)
KJRule = Literal["max", "one_se", "average", "zwidth", "zrho"]
KJ_RULES: tuple[KJRule, ...] = ("max", "one_se", "average", "zwidth", "zrho")
KJ_RULE: KJRule = "zrho"
# ``best_rank_on``: z-pair rank correlations closer than this to the best are a tie (float rounding of equal ranks)
RANK_TIE = 1e-6
# ``zscale``: True keeps per phase at least cubic's z_difficulty (sigma8 `zfloor` runs); False the engine's ratio alone
ZSCALE_FLOOR = False


@dataclass
class Validation:
    gain_db: float  # PSNR(engine) - PSNR(cubic) on held-out internal pairs, normalised units, body
    k: float  # sigma_raw = std_tta + k * |engine - cubic| + j * edge(engine)
    q: float  # conformal factor: sigma = sqrt(((sigma_raw + EPS) * q / 1.96)^2 + noise^2), 95 % covered
    spearman: float
    coverage_95: float
    j: float = 0.0
    q_phase: tuple[float, ...] = ()  # q per output-row phase (row % fz; through-plane), () where one q serves all
    n_cal: int = 0  # calibration voxels (held-out pairs, body)
    u_shape: tuple[float, ...] = ()  # the pairs' mean feature u per phase / its mean over all (``phase_shape``)
    noise_factor: float = 1.0  # the noise term's level measured on the pairs over the estimate's (``noise_level``)
    rho_se: float = 0.0  # block-jackknife standard error of the best candidate's rank correlation (``choose_kj``)
    n_near: int = 1  # candidates k, j within one standard error of the best (``choose_kj``)

    def q_rows(self, rows: int) -> np.ndarray:
        """(rows,) the conformal q of each output row (its phase row % len(q_phase); ``q`` without phases)."""
        qp = np.asarray(self.q_phase or (self.q,), dtype=np.float64)
        return qp[np.arange(rows) % qp.size]


def edge(y: torch.Tensor, axes: tuple[int, ...]) -> torch.Tensor:
    """|central difference| of ``y`` along ``axes`` (root of the sum of squares), same shape."""
    total = torch.zeros_like(y)
    for a in axes:
        n = y.shape[a]
        if n < 3:
            continue
        d = (y.narrow(a, 2, n - 2) - y.narrow(a, 0, n - 2)) * 0.5
        d = torch.cat([d.narrow(a, 0, 1), d, d.narrow(a, n - 3, 1)], dim=a)
        total += d * d
    return total.sqrt()


def box_smooth(x: torch.Tensor, dims: tuple[int, ...], radius: int) -> torch.Tensor:
    """``x`` averaged over a (2 ``radius`` + 1) box along each of ``dims`` in turn (edges replicated), same shape
    and dtype; ``x`` itself for radius 0."""
    if radius <= 0:
        return x
    for d in dims:
        y = x.movedim(d, -1)
        shape = y.shape
        flat = y.reshape(-1, 1, shape[-1])
        flat = torch.nn.functional.pad(flat, (radius, radius), mode="replicate")
        y = torch.nn.functional.avg_pool1d(flat, 2 * radius + 1, 1).reshape(shape)
        x = y.movedim(-1, d)
    return x


SMOOTH_CHUNK = 32  # output rows smoothed at a time by ``target_u`` (the smoothing is in-plane: rows are independent)


@torch.no_grad()
def target_u(v: Validation, fused: torch.Tensor, base: torch.Tensor, spread: torch.Tensor) -> torch.Tensor:
    """(Zf, Y, X) the through-plane sigma feature u on the target grid: std over test-time views ``spread`` + k
    |engine - cubic| + j |dz engine|, averaged over the in-plane ``SMOOTH_RADIUS`` box (as the pairs' features
    along their columns, ``_held``) + EPS. ``fused`` the engine's output after data consistency, ``base`` cubic,
    ``spread`` (all (Zf, Y, X), normalised units). The box average runs ``SMOOTH_CHUNK`` rows at a time, in place:
    its temporaries are a chunk's, not the volume's (a 512 x 512 x 1199 output is 1.26 GB a copy in float32)."""
    raw = spread + v.k * (fused - base).abs() + v.j * edge(fused, (0,))
    for z0 in range(0, raw.shape[0], SMOOTH_CHUNK):
        rows = raw[z0:z0 + SMOOTH_CHUNK]
        rows.copy_(box_smooth(rows, (1, 2), SMOOTH_RADIUS))
    return raw.add_(EPS)


Z95 = 1.96  # the 95 % half-width of a normal, in sigmas (the interval the derived uncertainty map promises)


@torch.no_grad()
def bracket_floor(sigma: torch.Tensor, out: torch.Tensor, lr: torch.Tensor, f: int) -> torch.Tensor:
    """Raise ``sigma`` (Zf, Y, X), in place, on the rows between acquired slices so that each voxel's 95 % interval
    ``out`` +- ``Z95`` sigma reaches the range [min, max] of the two acquired slices around it; returns how many
    voxels were raised (a 0-d tensor on ``sigma``'s device: no host wait here).

    ``lr`` (Z, Y, X): the acquired slices, row k of ``lr`` at output row k f (node-aligned), same units as ``out``.
    A value between two slices outside both is a structure thinner than the slice step that the engine inferred
    from the slab averages (a thin dark or bright layer, or its residual's overshoot at a sharp edge: bone/air,
    bone/brain): "nothing there", a value inside the neighbours' range, is also consistent with the data, so the
    interval must include it. A clamp of the values to that range was measured instead and refused: the real
    thin-slice truth has such layers (the 1 mm phantom: 8083 voxels of the 5 mm series' x2 more than 200 HU below
    both neighbours), clamping cost 0.7-1.0 dB there (docs/engines.md, rim14)."""
    raised = torch.zeros((), dtype=torch.int64, device=sigma.device)
    for k in range(lr.shape[0] - 1):
        rows = slice(k * f + 1, (k + 1) * f)
        a, b = lr[k], lr[k + 1]
        v = out[rows]
        gap = (torch.minimum(a, b) - v).clamp_min_(0) + (v - torch.maximum(a, b)).clamp_min_(0)
        need = gap.div_(Z95).to(sigma.dtype)
        s = sigma[rows]
        raised += (need > s).sum()
        torch.maximum(s, need, out=s)
    return raised


def noise_level(abs_err: np.ndarray, u: np.ndarray, noise: np.ndarray, frac: float = LOW_U_FRACTION) -> float:
    """The factor on the noise term that the pairs themselves show, in [0, 1]: over the ``frac`` of voxels with the
    smallest feature u (where the engine's own error is smallest, so |err| is mostly the pair target's noise),
    median(|err| / noise) / 0.6745 (the median of |N(0, 1)|). The engine's error left in those voxels biases it
    up, so it is an upper bound and clipped at 1: the noise estimate is only ever lowered. 1 without noise or
    voxels. Why: ``internal.noise_sigma`` (in-plane neighbour differences) counts fine texture as noise; on the MR
    series it was 2-5 x the noise the pairs show, and a too-large noise term, constant per phase, drowns the
    ranking of u (docs/engines.md, sigma5). ``abs_err``, ``u``, ``noise``: (N,) same units."""
    ok = np.isfinite(abs_err) & np.isfinite(u) & np.isfinite(noise) & (noise > 0)  # non-finite values say nothing
    if abs_err.size == 0 or not np.any(ok):
        return 1.0
    e, uu, nn = abs_err[ok], u[ok], noise[ok]
    low = uu <= np.quantile(uu, frac)
    return float(np.clip(np.median(e[low] / nn[low]) / 0.6745, 0.0, 1.0))


@dataclass
class _Held:
    """Per held-out body voxel of a list of PairSets: error, cubic's error (cubic + data consistency), the sigma
    features (through-plane ``delta``: against which cubic, ``PLAIN_CUBIC_FEATURE``), pair noise, phase."""

    err: np.ndarray
    base_err: np.ndarray
    std: np.ndarray
    delta: np.ndarray
    grad: np.ndarray
    noise: np.ndarray
    phase: np.ndarray
    block: np.ndarray  # jackknife block in [0, JACKKNIFE_BLOCKS): the same contiguous run of every pair set

    def u(self, k: float, j: float) -> np.ndarray:
        return self.std + k * self.delta + j * self.grad + EPS


@torch.no_grad()
def _held(net: SRNet, sets: list[PairSet], n_flips: int, body: float) -> _Held:
    errs, stds, deltas, base_errs, edges, noises, phases, blocks = [], [], [], [], [], [], [], []
    for s in sets:
        mean, spread = ensemble(net, s, n_flips)
        pred = s.task.project(s.base + mean, s.lr)
        base = s.task.project(s.base.clone(), s.lr)
        m = s.hr > body
        m_np = m.cpu().numpy()
        r = SMOOTH_RADIUS if s.task.node_rows else 0  # through-plane: along the columns, as ``target_u`` in-plane
        errs.append((pred - s.hr)[m].cpu().numpy())
        base_errs.append((base - s.hr)[m].cpu().numpy())
        stds.append(box_smooth(spread, (-1,), r)[m].cpu().numpy())
        ref = s.base if s.task.node_rows and PLAIN_CUBIC_FEATURE else base  # as ``target_u``'s cubic (no projection)
        deltas.append(box_smooth((pred - ref).abs(), (-1,), r)[m].cpu().numpy())
        edges.append(box_smooth(edge(pred, (-2,) if s.task.node_rows else (-2, -1)), (-1,), r)[m].cpu().numpy())
        rows = np.asarray(s.noise or (0.0,), dtype=np.float32)[np.arange(s.hr.shape[1]) % len(s.noise or (0.0,))]
        noises.append(np.broadcast_to(rows[None, :, None], s.hr.shape)[m_np])
        nph = s.task.fz if s.task.node_rows else 1
        phases.append(np.broadcast_to((np.arange(s.hr.shape[1]) % nph)[None, :, None], s.hr.shape)[m_np])
        nb = int(m_np.sum())  # voxels in (slice, row, column) order: block g is the g-th run of this set's slices
        blocks.append(np.arange(nb, dtype=np.int64) * JACKKNIFE_BLOCKS // max(nb, 1))

    def cat(xs: list[np.ndarray]) -> np.ndarray:
        return np.concatenate(xs) if xs else np.zeros(0, np.float32)

    return _Held(cat(errs), cat(base_errs), cat(stds), cat(deltas), cat(edges), cat(noises),
                 cat(phases).astype(np.int64), cat(blocks).astype(np.int64))


Held = _Held  # the held-out features of a pair set (``held``), public name for callers' annotations


@dataclass(frozen=True)
class KJChoice:
    """The feature weights ``choose_kj`` picked: k, j, their rank correlation with |error| (rho), the jackknife
    standard error of the best candidate's rho (rho_se), the number of candidates within one SE (n_near)."""

    k: float
    j: float
    rho: float
    rho_se: float
    n_near: int
    near: tuple[tuple[float, float], ...] = ()  # rules "zwidth" / "zrho": the (k, j) within one SE, for the caller


def _jackknife_corr(ra: np.ndarray, rb: np.ndarray, block: np.ndarray, nb: int) -> tuple[float, np.ndarray]:
    """(Pearson correlation of ``ra``, ``rb``, (nb,) the same with each block left out), from per-block sums."""
    def sums(w: np.ndarray | None) -> np.ndarray:
        return np.bincount(block, w, nb).astype(np.float64)

    s = [sums(ra), sums(rb), sums(ra * ra), sums(rb * rb), sums(ra * rb), sums(None)]
    tot = [float(x.sum()) for x in s]

    def corr(a: np.ndarray | float, b: np.ndarray | float, aa: np.ndarray | float, bb: np.ndarray | float,
             ab: np.ndarray | float, m: np.ndarray | float) -> np.ndarray:
        m = np.maximum(m, 1.0)
        den = np.sqrt(np.maximum((aa - a * a / m) * (bb - b * b / m), 1e-300))
        return np.asarray((ab - a * b / m) / den, dtype=np.float64)

    full = float(corr(*tot))
    loo = corr(*(t - x for t, x in zip(tot, s, strict=True)))
    return full, loo


def choose_kj(std: np.ndarray, delta: np.ndarray, grad: np.ndarray, abs_err: np.ndarray, block: np.ndarray,
              rule: KJRule | None = None) -> KJChoice:
    """The sigma feature weights k, j of u = std + k delta + j grad + EPS from the grid ``K_GRID`` x ``J_GRID``,
    by rank correlation (Spearman) of u with |error| on the fit part of the held-out pairs.

    All inputs (N,), same units; ``block`` ints in [0, ``JACKKNIFE_BLOCKS``). ``rule`` (default ``KJ_RULE``):
    "max" the largest rank correlation; "one_se" the one-standard-error rule (Breiman, Friedman, Olshen & Stone
    1984, "Classification and Regression Trees", 3.4.3; Hastie, Tibshirani & Friedman 2009, "The Elements of
    Statistical Learning", 7.10): among the candidates whose rank correlation is within one standard error of the
    best's, the most parsimonious (smallest k + j: the test-time spread alone is the simplest; ties: larger rho);
    "average": the same near-tied candidates' u, each divided by its median on these voxels, averaged (model
    averaging; u is linear in the features, so the average is one u with the weighted mean k, j: returned as
    such); "zwidth": the best by rank correlation, with the near-tied candidates in ``near`` (the caller breaks
    the tie on the target's own axis, ``narrowest_on``; without z pairs it stays the best); "zrho": the same, the
    caller's tie-break being the rank correlation on the z pairs (``best_rank_on``). The standard error is the
    best candidate's, by a delete-one-block jackknife (Efron & Tibshirani 1993,
    "An Introduction to the Bootstrap", 11.2; blocks for dependent data: Kuensch 1989, Ann. Statist. 17) over the
    ``block`` labels: neighbouring pixels of a held-out slice are correlated, so a standard error from the pixel
    count would be too small. The ranks are those of the whole fit part in every replicate (the correlation of
    fixed ranks; its difference to re-ranking is O(1/N)). Why: near-tied candidates (rank correlation 0.4594 vs
    0.4550, well within the standard error) gave 2.3 x different widths on the target (docs/engines.md, sigma6 /
    sigma7). Raises ValueError for another ``rule``; a constant u scores 0."""
    rule = KJ_RULE if rule is None else rule
    if rule not in KJ_RULES:
        raise ValueError(f"k, j rule {rule!r} is not one of {', '.join(KJ_RULES)}")
    n = abs_err.size
    if n < 3:
        return KJChoice(1.0, 0.0, 0.0, 0.0, 1)
    nb = int(block.max()) + 1 if block.size else 1
    rank_err = _ranks(abs_err).astype(np.float64)  # ranked once; each candidate ranks only its u
    cands: list[tuple[float, float, float]] = []
    loos: list[np.ndarray] = []
    for k in K_GRID:
        for j in J_GRID:
            u = std + k * delta + j * grad + EPS
            if np.ptp(u) > 0:
                rho, loo = _jackknife_corr(_ranks(u).astype(np.float64), rank_err, block, nb)
            else:
                rho, loo = 0.0, np.zeros(nb)
            cands.append((rho, k, j))
            loos.append(loo)
    rhos = np.array([c[0] for c in cands])
    ib = max(range(len(cands)), key=lambda i: cands[i])  # ties: the larger k, j (as before sigma7)

    def jk_se(x: np.ndarray) -> float:
        return float(np.sqrt((nb - 1) / nb * np.sum((x - x.mean()) ** 2))) if nb > 1 else 0.0

    se_best = jk_se(loos[ib])
    if rule == "max" or nb < 2:
        return KJChoice(cands[ib][1], cands[ib][2], float(rhos[ib]), se_best, 1)
    near = [i for i in range(len(cands)) if rhos[i] >= rhos[ib] - se_best]
    if rule in ("zwidth", "zrho"):  # the best by rank, and the near set for the caller's tie-break (on the z pairs)
        return KJChoice(cands[ib][1], cands[ib][2], float(rhos[ib]), se_best, len(near),
                        tuple((cands[i][1], cands[i][2]) for i in near))
    if rule == "one_se":
        pick = min(near, key=lambda i: (cands[i][1] + cands[i][2], -rhos[i]))
        return KJChoice(cands[pick][1], cands[pick][2], float(rhos[pick]), se_best, len(near))
    w = np.array([1.0 / max(float(np.median(std + cands[i][1] * delta + cands[i][2] * grad + EPS)), 1e-12)
                  for i in near])
    k = float(sum(wi * cands[i][1] for wi, i in zip(w, near, strict=True)) / w.sum())
    j = float(sum(wi * cands[i][2] for wi, i in zip(w, near, strict=True)) / w.sum())
    u = std + k * delta + j * grad + EPS
    rho = float(np.corrcoef(_ranks(u), rank_err)[0, 1]) if np.ptp(u) > 0 else 0.0
    return KJChoice(k, j, rho, se_best, len(near))


def _phase_q(h: _Held, u: np.ndarray, idx: np.ndarray, level: float) -> tuple[float, tuple[float, ...]]:
    """(q over ``idx``, q per phase over ``idx`` or () with one phase)."""
    e, uu, nn, ph = np.abs(h.err[idx]), u[idx], h.noise[idx], h.phase[idx]
    q = conformal_q(e, uu, nn, level)
    nph = int(ph.max()) + 1 if ph.size else 1
    if nph <= 1:
        return q, ()
    return q, tuple(conformal_q(e[ph == p], uu[ph == p], nn[ph == p], level) if np.any(ph == p) else q
                    for p in range(nph))


def phase_shape(u: np.ndarray, phase: np.ndarray, nph: int) -> np.ndarray:
    """(nph,) mean of ``u`` per phase over the mean of ``u`` over all voxels: the phase profile of a sigma feature
    (1 for a phase without voxels, all 1 for an empty ``u``). ``u``, ``phase`` (N,): feature >= 0, ints in [0, nph)."""
    out = np.ones(nph)
    if u.size == 0 or float(u.mean()) <= 0:
        return out
    for p in range(nph):
        sel = phase == p
        if np.any(sel):
            out[p] = float(u[sel].mean()) / float(u.mean())
    return out


@torch.no_grad()
def target_phase_shape(u: torch.Tensor, body: torch.Tensor, nph: int) -> np.ndarray:
    """``phase_shape`` of a target-grid feature map ``u`` (Zf, Y, X) over the voxels where ``body`` (same shape,
    bool) holds; phase = row index along dim 0 mod ``nph``."""
    sums = np.zeros(nph)
    counts = np.zeros(nph)
    for p in range(nph):  # strided views: temporaries of 1 / nph of the volume
        b = body[p::nph]
        sums[p] = float(torch.where(b, u[p::nph], 0.0).sum())
        counts[p] = float(b.sum())
    out = np.ones(nph)
    if counts.sum() <= 0 or sums.sum() <= 0:
        return out
    mean = sums.sum() / counts.sum()
    ok = counts > 0
    out[ok] = sums[ok] / counts[ok] / mean
    return out


def shape_transfer(pairs: np.ndarray, target: np.ndarray, clip: float = 4.0) -> np.ndarray:
    """(nph,) factor on the q of each phase that carries the pairs' per-phase sigma levels over to the target:
    pairs' ``phase_shape`` / target's (clipped to [1/clip, clip]). With q_t = q_p x factor the target's mean scaled
    sigma per phase, relative to its mean over phases, is the pairs' (q_p x the pairs' mean u per phase): the error
    of each phase relative to the others is taken from the pairs (data consistency ties the phases together the same
    way on both), not from the target's feature, whose phase profile the real slices distort. Measured in
    docs/engines.md (calib3)."""
    pairs, target = np.asarray(pairs, dtype=np.float64), np.asarray(target, dtype=np.float64)
    if pairs.size != target.size or pairs.size == 0:
        return np.ones(max(pairs.size, target.size, 1))
    return np.clip(pairs / np.maximum(target, 1e-12), 1.0 / clip, clip)


def narrowest_on(z: _Held, near: tuple[tuple[float, float], ...], noise_factor: Callable[[float, float], float],
                 seed: int = 0, level: float = 0.95, max_voxels: int = 100_000) -> tuple[float, float]:
    """The (k, j) of ``near`` whose split-conformal interval on the pairs ``z`` is the narrowest: per candidate,
    u = z.u(k, j), the pairs' noise x ``noise_factor(k, j)``, q per phase (``_phase_q``) at ``level``, width the
    mean 1.96 sqrt((u q / 1.96)^2 + noise^2) over ``z``'s voxels (up to ``max_voxels``, seeded). Every candidate
    covers ``level`` of ``z`` by construction, so the narrowest is the most efficient feature mix on ``z``
    (efficiency of conformal sets as a model choice: Lei, G'Sell, Rinaldo, Tibshirani & Wasserman 2018, JASA,
    section 2.3; Yang & Kuchibhotla 2021, "Finite-sample efficient conformal prediction", arXiv:2104.13871).
    Through-plane ``z`` are the ``z_pairs`` (the target's own axis one scale coarser): the in-plane pairs rank
    near-tied candidates alike, but on the phantom the candidates within one SE covered the target 0.913-0.984
    at 53-249 HU (docs/engines.md, sigma7 / sigma8). ``near`` empty or ``z`` with < 200 voxels: ``near[0]`` or (1, 0)."""
    if not near:
        return 1.0, 0.0
    if z.err.size < 200 or len(near) == 1:
        return near[0]
    idx = np.random.default_rng(seed).permutation(z.err.size)[:max_voxels]
    best, best_w = near[0], math.inf
    for k, j in near:
        h = _Held(z.err[idx], z.base_err[idx], z.std[idx], z.delta[idx], z.grad[idx],
                  z.noise[idx] * noise_factor(k, j), z.phase[idx], z.block[idx])
        u = h.u(k, j)
        q, q_phase = _phase_q(h, u, np.arange(idx.size), level)
        qv = np.asarray(q_phase or (q,))[h.phase]
        w = float(np.mean(np.sqrt((u * (qv / 1.96)) ** 2 + h.noise**2)))
        if w < best_w:
            best, best_w = (k, j), w
    return best


def best_rank_on(z: _Held, near: tuple[tuple[float, float], ...], seed: int = 0,
                 max_voxels: int = 100_000) -> tuple[float, float]:
    """The (k, j) of ``near`` whose feature u = z.u(k, j) ranks |error| best on the pairs ``z``: the largest
    Spearman rank correlation (``internal.spearman``, the in-plane pairs' statistic of ``choose_kj``) over up to
    ``max_voxels`` of ``z``'s voxels (seeded, as the in-plane fit part); ties: the first in ``near``. Model
    selection by the validation criterion on data of the target's own geometry (Hastie, Tibshirani & Friedman
    2009, "The Elements of Statistical Learning", 7.2 / 7.10: a held-out criterion on the distribution the model
    is used on), applied to the candidates the in-plane pairs cannot tell apart (within one SE, ``choose_kj``).
    Through-plane ``z`` are the ``z_pairs`` (the target's own axis one scale coarser). Unlike ``narrowest_on``
    (the narrowest conformal interval on ``z``, which on the phantom whole picked the candidate that transfers
    worst: 0.917), it asks which mix of features orders the z axis's errors, not which is cheapest there
    (offline on the sigma8 captures: no run under 0.93; docs/engines.md, sigma8 / sigma9). Candidates within
    ``RANK_TIE`` of the largest correlation are a tie: the most parsimonious (smallest k + j, as the one-SE rule
    of ``choose_kj``) wins; with one test-time view (fast mode) u has no spread term, so candidates with the same
    k : j (0.5, 0.05 and 2, 0.2) rank every voxel alike and only float rounding told them apart (ph1 fast 0.960 /
    184 HU vs 0.953 / 128 HU). ``near`` empty: (1, 0); one candidate or ``z`` with < 200 voxels: ``near[0]``."""
    if not near:
        return 1.0, 0.0
    if z.err.size < 200 or len(near) == 1:
        return near[0]
    idx = np.random.default_rng(seed).permutation(z.err.size)[:max_voxels]
    abs_err = np.abs(z.err[idx])
    rank_err = _ranks(abs_err).astype(np.float64)
    rs = []
    for k, j in near:
        u = z.u(k, j)[idx]
        rs.append(float(np.corrcoef(_ranks(u).astype(np.float64), rank_err)[0, 1]) if np.ptp(u) > 0 else 0.0)
    top = max(rs)
    tied = [i for i, r in enumerate(rs) if r >= top - RANK_TIE]
    return near[min(tied, key=lambda i: (near[i][0] + near[i][1], i))]


@torch.no_grad()
def validate(net: SRNet, sets: list[PairSet], n_flips: int, body: float = 0.05, seed: int = 0,
             level: float = 0.95, tie: _Held | None = None) -> Validation:
    """Held-out gain over cubic and the sigma calibration: k, j by rank correlation with |error| (on up to 100 k
    voxels), then split-conformal q on the other held-out voxels (Vovk et al. 2005; Angelopoulos & Bates 2021,
    "A gentle introduction to conformal prediction", finite-sample (n + 1) quantile), one q per output-row phase
    for through-plane pairs (row % fz: rows at the acquired positions keep most of the data through data
    consistency, the rows between do not, so one q would over-cover the former and under-cover the latter).
    Through-plane pairs also: features box-averaged along the columns (``SMOOTH_RADIUS``) and, with ``n_flips``
    >= 2, the noise term's level measured on the fit part (``noise_level``, ``NOISE_FROM_PAIRS``; the factor is
    ``noise_factor``, which the caller applies to the target's noise too). ``tie``: the held-out features of
    the ``z_pairs`` (``held``); with ``KJ_RULE`` "zwidth" / "zrho" the near-tied k, j are decided on them
    (``narrowest_on`` / ``best_rank_on``)."""
    h = _held(net, sets, n_flips, body)
    err = h.err
    if err.size == 0:
        return Validation(0.0, 1.0, 1.0, 0.0, 0.0)
    gain = 10 * math.log10(max(float(np.mean(h.base_err**2)), 1e-20) / max(float(np.mean(err**2)), 1e-20))
    rng = np.random.default_rng(seed)
    perm = rng.permutation(err.size)
    n_fit = min(err.size // 2, 100_000) if err.size >= 200 else err.size  # features fitted on one part ...
    sub = perm[:n_fit]
    cal = (perm[n_fit:] if err.size >= 200 else perm)[:400_000]  # ... q calibrated on the rest (split conformal)
    through = bool(sets and sets[0].task.node_rows)  # the one-SE rule is measured through-plane only
    choice = choose_kj(h.std[sub], h.delta[sub], h.grad[sub], np.abs(err[sub]), h.block[sub],
                       KJ_RULE if through else "max")
    rho, k, j = choice.rho, choice.k, choice.j
    from_pairs = NOISE_FROM_PAIRS and n_flips >= NOISE_MIN_VIEWS and through

    def level_of(kk: float, jj: float) -> float:  # the fit part's noise level (``noise_level``) for u(kk, jj)
        if not from_pairs:
            return 1.0
        c = noise_level(np.abs(err[sub]), h.u(kk, jj)[sub], h.noise[sub])
        return max(c, ONE_VIEW_NOISE_MIN) if n_flips < 2 else c

    if choice.near and tie is not None and through:
        k, j = (best_rank_on(tie, choice.near, seed) if KJ_RULE == "zrho"
                else narrowest_on(tie, choice.near, level_of, seed, level))
        if (k, j) != (choice.k, choice.j):
            u = h.u(k, j)[sub]
            rho = spearman(u, np.abs(err[sub]))
    u = h.u(k, j)
    c = level_of(k, j)
    h.noise = h.noise * c
    q, q_phase = _phase_q(h, u, cal, level)
    qv = np.asarray(q_phase or (q,))[h.phase]
    cov = float(np.mean(np.abs(err) <= 1.96 * np.sqrt((u * (qv / 1.96)) ** 2 + h.noise**2)))
    nph = len(q_phase)
    shape = tuple(float(x) for x in phase_shape(u[cal], h.phase[cal], nph)) if nph > 1 else ()
    return Validation(gain, k, q, rho, cov, j, q_phase, int(cal.size), shape, c, choice.rho_se, choice.n_near)


@torch.no_grad()
def heldout_gain(net: SRNet, sets: list[PairSet], n_flips: int, body: float = 0.05) -> float:
    """PSNR gain in dB of ``net`` (+ data consistency) over cubic on the held-out pairs' body voxels, as
    ``validate``'s ``gain_db`` (0.0 without voxels)."""
    return held_gain(_held(net, sets, n_flips, body))


def held_gain(h: _Held) -> float:
    """PSNR gain in dB of the engine over cubic on the body voxels of ``h`` (``held``): 10 log10 of cubic's mean
    squared error over the engine's (0.0 without voxels)."""
    if h.err.size == 0:
        return 0.0
    return 10 * math.log10(max(float(np.mean(h.base_err**2)), 1e-20) / max(float(np.mean(h.err**2)), 1e-20))


def finetune_factor(gain_tuned_db: float, gain_prior_db: float, cap: float = 4.0) -> float:
    """The factor on q that undoes the fine-tuning's gain on the held-out pairs: rms error of the prior net over
    that of the fine-tuned net on the same held-out pairs, 10^((gain_tuned - gain_prior) / 20), in [1, ``cap``].

    Why: the held-out pairs are in-plane pairs from axial slices next to the fine-tuning slices (every 5th slice,
    ``internal.split_slices``), so fine-tuning lowers their error much more than the target's error along z
    (measured, 2-core CPU, x2 central crops: held-out gain +5.5 dB vs target +1.5 dB on the 1 mm CT phantom, +2.1
    vs +0.4 dB on the GE 3D T1, +0.9 vs +0.2 dB on the abdomen CT; docs/engines.md, calib3), and a q fitted on
    them under-covers the target (phantom 0.83). The prior net never saw the series, so its held-out errors carry
    no such leak; the factor assumes the target gains nothing from fine-tuning (conservative). 1 without
    fine-tuning (fast mode). ``cap`` bounds a prior far from the series (a net trained from scratch: prior = cubic).
    ``selfsup`` now uses ``transfer_factor`` (which measures the target's share instead of assuming none; calib4)
    and falls back to this factor when its probe has no pairs.
    """
    f = 10 ** ((gain_tuned_db - gain_prior_db) / 20.0)
    return float(np.clip(f, 1.0, cap)) if math.isfinite(f) else cap  # a non-finite gain: the widest interval


def leak_factor(near_probe_db: float, near_prior_db: float, far_probe_db: float, far_prior_db: float,
                cap: float = 4.0) -> float:
    """The direct near / far factor of a probe: its gain over the prior net on near pairs minus that on far pairs,
    10^((near - far) / 20) with gain = probe - prior dB (held-out PSNR gains over cubic, ``heldout_gain``), in
    [1, ``cap``]; ``cap`` when a gain is not finite. ``selfsup`` reports it for the coarse probe
    (``through_sigma_coarse_direct_factor``) as a diagnostic and does not use it (docs/engines.md, calib4)."""
    d = (near_probe_db - near_prior_db) - (far_probe_db - far_prior_db)
    if not math.isfinite(d):
        return cap
    return float(np.clip(10 ** (d / 20.0), 1.0, cap))


def transfer_factor(near_tuned_db: float, near_prior_db: float, ip_probe_db: float, ip_prior_db: float,
                    z_probe_db: float, z_prior_db: float, cap: float = 4.0) -> float:
    """The factor on q that undoes the part of fine-tuning's held-out gain the target does not share, with the
    share measured one scale coarser, where the target's own axis has a truth (``z_pairs``): a probe net
    fine-tuned like the engine's on in-plane pairs of that coarser scale gains ``ip`` = ip_probe - ip_prior dB
    on held-out in-plane pairs of that scale and ``z`` = z_probe - z_prior dB on the z pairs; the share that
    reaches the z axis is tau = z / ip (in [0, 1]; 0 when ip <= 0), and the target's gain from fine-tuning is
    taken as tau x the engine's held-out gain g = near_tuned - near_prior. Factor 10^(g (1 - tau) / 20) in
    [1, ``cap``]; tau = 0 is ``finetune_factor`` (the target gains nothing), tau = 1 is 1; non-finite inputs: as
    ``finetune_factor``. Measured in docs/engines.md (calib4)."""
    g = near_tuned_db - near_prior_db
    ip, z = ip_probe_db - ip_prior_db, z_probe_db - z_prior_db
    if not (math.isfinite(g) and math.isfinite(ip) and math.isfinite(z)):
        return finetune_factor(near_tuned_db, near_prior_db, cap)
    tau = float(np.clip(z / ip, 0.0, 1.0)) if ip > 0 else 0.0
    return float(np.clip(10 ** (max(g, 0.0) * (1.0 - tau) / 20.0), 1.0, cap))


@torch.no_grad()
def held(net: SRNet, sets: list[PairSet], n_flips: int, body: float = 0.05) -> _Held:
    """Per held-out body voxel of ``sets``: the engine's error, cubic's, the sigma features, the pairs' noise and
    row phase (each (N,); ``net`` with ``n_flips`` test-time views + data consistency, as ``validate``)."""
    return _held(net, sets, n_flips, body)


@torch.no_grad()
def calibrate(net: SRNet, sets: list[PairSet], n_flips: int, v: Validation, body: float = 0.05, seed: int = 0,
              level: float = 0.95) -> Validation | None:
    """``v`` with q (and q per phase) re-fitted by split-conformal calibration on other pairs (``z_pairs``: the
    target's own axis one scale coarser), the features k, j kept; None without enough voxels (< 200)."""
    return calibrate_held(_held(net, sets, n_flips, body), v, seed, level)


def calibrate_held(h: _Held, v: Validation, seed: int = 0, level: float = 0.95) -> Validation | None:
    """``calibrate`` on features already computed (``held``); ``h`` is not changed."""
    if h.err.size < 200:
        return None
    h = _Held(h.err, h.base_err, h.std, h.delta, h.grad, h.noise * v.noise_factor, h.phase, h.block)  # ``validate``'s level
    idx = np.random.default_rng(seed).permutation(h.err.size)[:400_000]
    u = h.u(v.k, v.j)
    q, q_phase = _phase_q(h, u, idx, level)
    qv = np.asarray(q_phase or (q,))[h.phase]
    cov = float(np.mean(np.abs(h.err) <= 1.96 * np.sqrt((u * (qv / 1.96)) ** 2 + h.noise**2)))
    rank = spearman(u[idx[:100_000]], np.abs(h.err[idx[:100_000]]))
    shape = tuple(float(x) for x in phase_shape(u[idx], h.phase[idx], len(q_phase))) if len(q_phase) > 1 else ()
    return Validation(v.gain_db, v.k, q, rank, cov, v.j, q_phase, int(idx.size), shape, v.noise_factor)


def held_coverage(h: _Held, v: Validation, q_phase: np.ndarray, level_z: float = 1.96) -> float:
    """The share of ``h``'s voxels (``held``: e.g. the z pairs) whose |error| lies within the 95 % interval of the
    sigma the engine ships, 1.96 sqrt((u q / 1.96)^2 + noise^2), with ``v``'s features k, j and noise level and
    ``q_phase`` (nph,) the shipped q per row phase; NaN without voxels."""
    if h.err.size == 0:
        return float("nan")
    u = h.u(v.k, v.j)
    q = np.asarray(q_phase, dtype=np.float64)[h.phase % max(1, len(q_phase))]
    n = h.noise * v.noise_factor
    return float(np.mean(np.abs(h.err) <= level_z * np.sqrt((u * (q / 1.96)) ** 2 + n**2)))


def zscale(vz: Validation | None, vc: Validation | None, nph: int, fallback: float, clip: float = 4.0) -> np.ndarray:
    """(nph,) the factor on the in-plane pairs' q per phase that carries it to the target's axis: the q the z pairs
    need (``vz``, ``calibrate`` on ``z_pairs``: the target's axis one scale coarser) over the q the in-plane pairs
    of that same coarser scale need (``vc``, ``calibrate`` on ``coarse_pairs``), per row phase, both with the
    engine's net, features and noise level, clipped to [1 / ``clip``, ``clip``]. The two coarse pair sets differ
    only in the axis, so the ratio is how much harder z is than in-plane for this engine at that scale, phase by
    phase; the fine in-plane pairs x this ratio estimate the target (q_target = q_xy q_z / q_c). It replaces
    ``internal.z_difficulty`` (the same ratio for cubic, one number for all phases). Why: the z pairs' own q
    over-covered the target (their scale is coarser: q_ideal / q_z 0.3-0.98 on the eight sigma8 runs) and the
    in-plane pairs' q under-covered the phantom's slices between (phase ratio 1.2-1.3 vs 2.0-2.5 the target
    needed); the scale change, measured in-plane at both scales, cancels the first, the z pairs' phase profile
    fixes the second (docs/engines.md, sigma8). ``fallback`` (``internal.z_difficulty``: cubic's ratio at the same
    coarser scale, one number) for all phases when either is None or a ratio is not finite; with ``ZSCALE_FLOOR``
    the result is at least ``fallback`` per phase (measured, not the rule: 0-0.021 more coverage, 0-20 % wider)."""
    if vz is None or vc is None:
        return np.full(nph, float(fallback))
    r = vz.q_rows(nph) / np.maximum(vc.q_rows(nph), 1e-12)
    r = np.where(np.isfinite(r), r, fallback)
    if ZSCALE_FLOOR:
        r = np.maximum(r, fallback)
    return np.clip(r, 1.0 / clip, clip)


def coarse_pairs(vol: np.ndarray, spacing: tuple[float, float, float], model: DegradationModel,
                 z_idx: np.ndarray, device: torch.device) -> list[PairSet]:
    """In-plane held-out pairs one scale coarser, the model of ``z_pairs`` (profile and step f times the
    target's): ``internal.through_pairs`` of the axial slices ``z_idx``; [] when the matrix is too small."""
    f = model.factor
    coarse = DegradationModel(f, 1, model.step_mm * f, model.thickness_mm * f, model.pixel_mm, model.profile)
    return through_pairs(vol, spacing, coarse, z_idx, device)


def z_pairs(vol: np.ndarray, model: DegradationModel, device: torch.device, planes: int = 24,
            src_spacing: float = 0.0) -> list[PairSet]:
    """Pairs along the target's own axis, one scale coarser: the acquired (normalised, (Z, Y, X)) slices are the
    targets, the same slices degraded x f along z with a profile f times thicker are the inputs; ``planes``
    coronal and as many sagittal planes. [] when fewer than 3 coarse slices remain. Their target noise per row
    phase is the acquired slices' in-plane noise x the coarse profile's noise gain x ``phase_noise`` of the
    coarse model."""
    f = model.factor
    n_lr = (vol.shape[0] - 1) // f + 1
    if n_lr < 3:
        return []
    coarse = DegradationModel(f, 1, model.step_mm * f, model.thickness_mm * f, model.pixel_mm, model.profile)
    sub = vol[: (n_lr - 1) * f + 1]
    lr = degrade_through_plane(sub, f, coarse.dc_fwhm_px, axis=0, profile=model.profile)  # (n_lr, Y, X)
    # the coarse inputs' noise from the acquired slices' (white along z assumed, as for the target grid): the
    # profile's noise gain, not noise_sigma(lr), which the blurred slices' structure inflates relative to noise
    d = through_plane_matrix(max(n_lr, 9), f, coarse.dc_fwhm_px, model.profile)
    gain = float(np.sqrt((d[d.shape[0] // 2] ** 2).sum()))
    g = phase_noise(coarse, src_spacing or model.pixel_mm)[0]
    noise = tuple(float(noise_sigma(vol) * gain * x) for x in g)
    task = Task(f, 1, True, coarse)
    out = []
    for axis in (1, 2):
        idx = np.unique(np.linspace(0, vol.shape[axis] - 1, min(planes, vol.shape[axis])).round().astype(int))
        lo = np.ascontiguousarray(np.moveaxis(np.take(lr, idx, axis=axis), axis, 0))  # (P, n_lr, W)
        hi = np.ascontiguousarray(np.moveaxis(np.take(sub, idx, axis=axis), axis, 0))  # (P, Z', W)
        out.append(PairSet(torch.from_numpy(lo).float().to(device), torch.from_numpy(hi).float().to(device), task,
                           noise))
    return out


def conformal_level(n: int, level: float) -> float:
    """The split-conformal quantile level for ``n`` calibration scores: ceil((n + 1) level) / n (capped at 1),
    which makes the coverage of a new exchangeable score >= ``level`` (Angelopoulos & Bates 2021, Thm. 1)."""
    return min(1.0, math.ceil((n + 1) * level) / max(n, 1))


def conformal_q(abs_err: np.ndarray, u: np.ndarray, noise: np.ndarray, level: float = 0.95) -> float:
    """The q for which ``level`` of |err| <= 1.96 sqrt((u q / 1.96)^2 + noise^2) (bisection; q is monotone), with
    the finite-sample level of ``conformal_level``.

    noise = 0 gives the plain conformal quantile of |err| / u. The noise the pairs' targets carry is part of the
    interval, not of q, so that the target grid's (different) noise can replace it at inference.
    """
    if abs_err.size == 0:
        return 1.0
    lv = conformal_level(abs_err.size, level)
    e2, u2, n2 = (abs_err / 1.96) ** 2, u * u, noise * noise
    if not np.any(n2 > 0):
        return float(np.quantile(abs_err / u, lv, method="higher"))

    def cover(q: float) -> float:
        return float(np.mean(e2 <= (q / 1.96) ** 2 * u2 + n2))

    lo, hi = 0.0, float(np.quantile(abs_err / u, lv, method="higher"))
    if cover(lo) >= lv:
        return 0.0
    for _ in range(40):
        mid = 0.5 * (lo + hi)
        lo, hi = (lo, mid) if cover(mid) >= lv else (mid, hi)
    return hi
