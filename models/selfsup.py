"""The ``selfsup`` engine: internal learning from the series itself (SMORE / ZSSR style), calibrated sigma.

upscale(volume, factors):
  1. normalise (0.5 / 99.5 percentiles), build the degradation model from the geometry and log it;
  2. through-plane x f: pairs from held-in axial slices degraded along y and x with the slice profile; start from
     the shipped prior (models/weights/prior.pt) and fine-tune ``finetune_steps`` steps (``fast``: none);
  3. self-check on held-out axial slices: gain over cubic < ``min_gain_db`` -> cubic, with the reason;
  4. apply the net along z on coronal and sagittal stacks x flips (``tta_passes``), fuse by the mean;
  5. data consistency: project so that re-degrading reproduces the acquired slices; report the residual;
  6. sigma = sqrt(((std over flips + k |engine - cubic| + j |dz engine|, box-averaged in-plane) * q / 1.96)^2
     + (c target noise)^2): k, j, q, c (the noise level the pairs show, calibration.noise_level)
     fitted on the held-out pairs and scaled by how much harder z is than in-plane at the acquired scale (internal.z_difficulty),
     the truth-grid noise no engine can predict (in-plane noise of the data x the per-slice-phase gain of
     internal.phase_noise) replaces, in quadrature, the pairs' own target noise that the q fit accounted for;
     between two acquired slices at least |distance of the value outside their range| / 1.96
     (calibration.bracket_floor: the 95 % interval reaches the neighbours' range);
  7. in-plane x f (models.inplane): the prior's ZSSR net (optionally 2.5D: neighbouring slices as channels), fine-tuned
     ``in_plane_finetune_steps`` on ZSSR pairs (acquired slices and their f x f block means; default none: the
     pairs' coarser scale pulled the net away from the finer one the prior learned, -4.4 dB on the phantom), the
     pairs for the self-check and sigma (q scaled by ``inplane.scale_difficulty``), the 8-view dihedral ensemble.
Any internal failure is an ``EngineError`` naming the stage. torch + numpy only.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import replace
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch

from models import calibration as cal
from models import inplane as ip
from models import internal as il
from models.cubic import upsample
from models.degrade import DegradationModel
from models.engine import (
    EngineError,
    EngineOptions,
    EngineResult,
    Factors,
    Progress,
    TorchCompile,
    VolumeInput,
    output_shape,
    resolved_cpu_precision,
)
from models.nets import SRNet
from models.prior import DEFAULT_WEIGHTS, load_prior, make_net, pick_device
from models.profile import estimate_fwhm
from models.transfer import host_pool, to_device, to_host

log = logging.getLogger(__name__)
T = TypeVar("T")

# where the through-plane sigma's conformal q (per slice phase) comes from: "z" pairs along the target's own axis
# one scale coarser (calibration.z_pairs), "xy" the held-out in-plane pairs' q x internal.z_difficulty (the earlier
# method) per phase, "xy_pooled" one such q for all phases, "xy_floor" per phase but at least the pooled one, or
# the "mean" / "max" of "xy" and "z", "xy_shape" the pooled q x the pairs' / target's phase profile of the mean
# feature (calibration.shape_transfer), "xy_phase_shape" the per-phase q x the same factor (docs/engines.md: sigma
# calibration, the figures that chose it); "xy_zscale" (sigma8) the "xy_floor" q with z_difficulty replaced per
# phase by the engine's own z / in-plane ratio one scale coarser (calibration.zscale; with calibration.KJ_RULE
# "zwidth" and PLAIN_CUBIC_FEATURE = True: 7 of the 8 eval runs in [0.93, 0.97] at 8-32 % less width, the
# phantom's whole engine 0.917: not the default, docs/engines.md sigma8); sigma9: the default, with KJ_RULE "zrho"
# (7 of 8 in range, the phantom's whole engine 0.9702, none under; docs/engines.md sigma9)
# "xy_zscale_phase" (sigma10): "xy_zscale" without the floor at the pooled in-plane q (per phase alone); measured with
# calibration.NOISE_MIN_VIEWS = 1, not kept: XA30 fast 0.928, phantom fast 0.937 (docs/engines.md, sigma10)
SIGMA_FROM = "xy_zscale"
# the through-plane q x a factor after fine-tuning (FINETUNE_FAR): fine-tuning adapts the net to the in-plane
# pairs' task, so the held-out pairs' error understates the target's (docs/engines.md, calib3 and calib4)
FINETUNE_SIGMA = True
# how much of that held-out gain the target shares: "none" (the target gains nothing from fine-tuning: the factor is
# the prior's held-out error over the fine-tuned net's) or "coarse" (a probe fine-tuned like the engine's one scale
# coarser, where the z pairs give the target axis a truth: the share of its in-plane held-out gain that reaches the
# z pairs is the share of the engine's gain the target gets, calibration.transfer_factor; one more fine-tuning run,
# sigma only). The "z" and "block" variants of calib4 were measured and removed (docs/engines.md, sigma5).
FINETUNE_FAR = "coarse"
# how the coronal (x-z planes) and sagittal (y-z planes) passes are fused: "mean", or "sigma" (per voxel, each
# orientation weighted by 1 / (its spread over flips^2 + eps^2); needs >= 2 flips per orientation, else the mean)
FUSE = "mean"
# patch corners of the per-series fine-tuning (internal.train): "uniform" or "gradient"
SAMPLING = "uniform"
# the through-plane slice FWHM: "geometry" (SliceThickness, or the slice step when unknown) or "data"
# (models.profile.estimate_fwhm: the width whose degraded in-plane spectrum matches the z spectrum)
PROFILE_FROM = "geometry"
# sigma between two acquired slices at least the distance of the value from their range / 1.96
# (calibration.bracket_floor): new voxels far beyond both neighbours (overshoot of the residual at sharp edges, or
# a thin layer the slab averages cannot place) are flagged; clamping the values there instead cost 0.7-1.0 dB on
# the real 5 mm / 1 mm phantom pair, whose truth has such layers (docs/engines.md, rim14)
BRACKET_FLOOR = True
# data consistency: the share of the acquired slices' residual put back (1: the exact projection D y = x; 0: none).
# The exact projection assumes the declared slice profile is the scanner's: under another profile of the same FWHM
# it amplifies the mismatch (docs/engines.md, "Thick-slice operators")
DC_WEIGHT = 1.0
# the safety net along z: the engine's gain over cubic on the z pairs (calibration.z_pairs: the acquired slices as
# targets, degraded x f along z one scale coarser; built for sigma anyway) below this -> cubic, with the reason.
# The in-plane self-check cannot see a z axis unlike the in-plane ones. -1 dB: the z pairs are one scale coarser,
# where the engine's gain runs lower (measured -0.30 dB on a decimated phantom whose output gained +3.00 dB; -2.08 dB
# on a GE 3D T1 whose output was 0.04 dB under cubic, HU-MAE +8.7 %; docs/engines.md, 2026-12-03). The bar is
# min(this, [engine] min_gain_db): a configuration that turns the self-check off (-99) turns this one off too.
# None: off
Z_MIN_GAIN_DB: float | None = -1.0
# sigma checked on the series' own z pairs (calibration.held_coverage, reported as
# ``through_sigma_z_pairs_coverage_shipped``): below this share, q per phase is widened to the z pairs' conformal q
# (``through_sigma_widened_from_z``). None: measured only. Off: the shipped sigma's coverage on the z pairs does not
# tell the series it misleads on from those it covers (docs/engines.md, 2026-12-03 (b))
Z_SIGMA_MIN_COVERAGE: float | None = None
# the held-out through-plane pairs' inputs (self-check, k/j, sigma's q): "discrete" = the engine's own operator D
# applied to the pairs' thin targets (as the training pairs); "other_shape" = the thick slices integrated over the
# source images through the other profile kind of the same FWHM (box <-> gaussian; ``degrade.make_pairs``'s
# ``lr_profile``), so that q sees the engine's error under a slice profile it does not assume, as a real series'
# unknown profile gives it (measured, not kept: docs/engines.md, 2026-12-03 (c))
VAL_PAIRS_LR = "discrete"
FINETUNE_LR = 3e-4  # Adam learning rate of the fine-tuning from the prior (cosine to a tenth)
FUSE_EPS = 2e-3  # normalised units (data range 1): below it, spreads count as equal
OOM_TILES = (1 << 18, 1 << 16, 1 << 13)  # max_voxels_per_tile of the retries after a CUDA out-of-memory error


class SelfSupEngine:
    name = "selfsup"
    # Bumped whenever the same input, settings and weights give other pixels or sigma (it is written into
    # SoftwareVersions, ContributionDescription and DerivationDescription, and enters the derived UIDs through
    # ``node.process.engines.settings_digest``, so new pixels never go out under UIDs a PACS already holds).
    # 1: up to 2026-12-03. 2: gap acquisitions (SliceThickness under the slice step) keep every f-th output slice
    # as acquired (D = decimation, targets of the stated thickness; was a box of the thickness), and the fallback
    # to cubic when the gain on the series' own z pairs is under -1 dB (docs/engines.md, 2026-12-03).
    version = "2"

    def __init__(self, options: EngineOptions | None = None, mem_fraction: float = 0.4) -> None:
        self.options = options or EngineOptions()
        self.mem_fraction = mem_fraction  # of free GPU memory one batch of network activations may take
        self.weights = Path(self.options.weights) if self.options.weights else DEFAULT_WEIGHTS

    # ------------------------------------------------------------------ public
    def upscale(self, volume: VolumeInput, factors: Factors, progress: Progress | None = None) -> EngineResult:
        """The engine run; out of GPU memory, it runs again with smaller tiles (``OOM_TILES``) before giving up.
        ``progress`` gets the fine-tuning steps and network passes ("through fine-tune", "through passes",
        "in fine-tune", "in passes"; ``models.engine.Progress``)."""
        tiles = [self.options.max_voxels_per_tile]
        tiles += [t for t in OOM_TILES if tiles[0] <= 0 or t < tiles[0]]
        for attempt, tile in enumerate(tiles):
            engine = self if attempt == 0 else SelfSupEngine(replace(self.options, max_voxels_per_tile=tile),
                                                             self.mem_fraction / 4**attempt)
            try:
                res = engine._upscale(volume, factors, progress)
            except EngineError:
                raise
            except torch.cuda.OutOfMemoryError:
                log.warning("selfsup: out of GPU memory on %s with max_voxels_per_tile=%d (attempt %d of %d)",
                            volume.data.shape, tile, attempt + 1, len(tiles))
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()  # the failed attempt's tensors are gone with its frames
                continue
            except Exception as exc:
                raise EngineError(f"selfsup failed on a {volume.data.shape} volume: {type(exc).__name__}: {exc}") from exc
            if attempt:
                res.report.update({"oom_retries": attempt, "max_voxels_per_tile": tile,
                                   "mem_fraction": engine.mem_fraction})
            return res
        raise EngineError(f"selfsup: out of GPU memory on {volume.data.shape} even with {tiles[-1]}-pixel tiles "
                          f"and {100 * self.mem_fraction / 4 ** (len(tiles) - 1):.2g} % of free memory per batch")

    # ------------------------------------------------------------------ steps
    def _upscale(self, volume: VolumeInput, factors: Factors, progress: Progress | None = None) -> EngineResult:
        t0 = time.perf_counter()
        opt = self.options
        data = np.asarray(volume.data, dtype=np.float32)
        if not np.isfinite(data).all():
            raise EngineError("selfsup: the volume holds NaN or infinite values")
        if factors.through_plane > 1 and data.shape[0] < 3:
            raise EngineError(f"selfsup: through-plane x{factors.through_plane} needs >= 3 slices, got {data.shape[0]}")
        device = pick_device(opt.device)
        torch.manual_seed(opt.seed)
        np.random.seed(opt.seed % 2**32)
        torch.use_deterministic_algorithms(False)
        sample = data[:: max(1, data.shape[0] // 16)].ravel()
        lo, hi = (float(v) for v in np.percentile(sample, [0.5, 99.5]))
        scale = max(hi - lo, 1e-6)
        vol_n = data - lo
        vol_n /= scale  # in place: one temporary less (same float32 values)
        model = DegradationModel.from_volume(volume, factors)
        fit = None
        if PROFILE_FROM == "data" and factors.through_plane > 1:
            try:
                fit = estimate_fwhm(vol_n, volume.spacing, model.thickness_mm, model.profile)
                model = replace(model, thickness_mm=fit.fwhm_mm)
            except ValueError as exc:
                log.info("selfsup: slice profile from the geometry (%s)", exc)
        log.info("selfsup on %s: %s", device, model.describe())
        prior = load_prior(self.weights)
        passes = opt.tta_passes
        if opt.fast and device.type == "cpu":
            passes = min(passes, 2)  # CPU fast mode: coronal + sagittal only
        report: dict[str, Any] = {"device": str(device), "degradation": model.describe(), "tta_passes": passes,
                                  "prior": self.weights.name if prior else ""}
        if device.type == "cpu":  # the network passes' arithmetic, ``auto`` resolved for this CPU
            report["cpu_precision"] = resolved_cpu_precision(opt.cpu_precision).value
        if fit is not None:
            report["profile_fwhm_ratio"] = fit.ratio  # the data's FWHM / SliceThickness (models.profile)
        out_n, sig_n = vol_n, np.zeros(vol_n.shape, np.float32)  # calloc: pages untouched unless used
        fallback = ""
        done: tuple[np.ndarray, np.ndarray] | None = None  # denormalised (and clipped) on the device
        if factors.through_plane > 1:
            out_t, sig_t, fallback = self._stage("through", vol_n, volume.spacing, model, prior, device, passes,
                                                 report, progress)
            if out_t is not None and sig_t is not None and not fallback:
                if factors.in_plane > 1:
                    out_n, sig_n = to_host(out_t), to_host(sig_t)
                else:
                    done = self._finish(out_t, sig_t, lo, scale, volume.value_range, report)
        if factors.in_plane > 1 and not fallback:
            square = ip.square_pixels(volume.spacing)
            in_passes = min(opt.tta_passes, 4) if opt.fast and device.type == "cpu" else opt.tta_passes  # cheap 2D
            out_n, sig_n, fallback = self._in_plane(vol_n, out_n, sig_n, factors.in_plane, square, prior, device,
                                                    in_passes, report, progress)
        dz, dy, dx = volume.spacing
        spacing = (dz / factors.through_plane, dy / factors.in_plane, dx / factors.in_plane)
        if fallback:
            log.warning("selfsup falls back to cubic: %s", fallback)
            out = upsample(data, factors)
            sigma = np.zeros_like(out)
        elif done is not None:
            out, sigma = done
        else:
            out, sigma = out_n.astype(np.float32, copy=False), sig_n.astype(np.float32, copy=False)
            out *= scale  # in place: no temporaries of the (large) output
            out += lo
            sigma *= scale
        if volume.value_range is not None and done is None:
            np.clip(out, volume.value_range[0], volume.value_range[1], out=out)
        if out.shape != output_shape(data.shape, factors):  # type: ignore[arg-type]
            raise EngineError(f"selfsup: output {out.shape} breaks the geometry contract for {data.shape}")
        report["seconds"] = round(time.perf_counter() - t0, 3)
        return EngineResult(out.astype(np.float32, copy=False), sigma, spacing, "cubic" if fallback else self.name,
                            fallback, report, has_sigma=not fallback)

    def _steps(self, kind: str) -> int:
        """Fine-tuning steps for "through" or "in" (0 in fast mode)."""
        o = self.options
        steps = o.in_plane_finetune_steps if kind == "in" and o.in_plane_finetune_steps >= 0 else o.finetune_steps
        return 0 if o.fast else max(steps, 0)

    def _skip_training(self, kind: str = "through") -> bool:
        return self._steps(kind) == 0

    @staticmethod
    def _soon(device: torch.device, fn: Callable[[], T]) -> Future[T]:
        """Host-side work: on a host thread while CUDA works through its queue; inline on the CPU (whose cores
        the network already uses), so CPU results and timings are as before."""
        if device.type == "cuda":
            return host_pool.submit(fn)
        fut: Future[T] = Future()
        fut.set_result(fn())
        return fut

    def _fit(
        self, kind: str, sets: list[il.PairSet], val: list[il.PairSet], fz: int, fx: int, prior: dict[str, Any],
        device: torch.device, passes_per_orient: int, report: dict[str, Any], in_ch: int = 1,
        progress: Progress | None = None,
    ) -> tuple[SRNet, cal.Validation]:
        net = self._train_net(kind, sets, fz, fx, prior, device, report, in_ch, progress)
        return net, self._validate(kind, net, val, passes_per_orient, report)

    def _train_net(
        self, kind: str, sets: list[il.PairSet], fz: int, fx: int, prior: dict[str, Any], device: torch.device,
        report: dict[str, Any], in_ch: int = 1, progress: Progress | None = None,
    ) -> SRNet:
        """The prior's net for (kind, factor), fine-tuned on ``sets`` unless in fast mode."""
        t = time.perf_counter()
        net, from_prior = make_net(prior, kind, fz, fx, device, in_ch, self.options.cpu_precision)
        steps = self._steps(kind)
        if steps > 0:
            loss = il.train(net, sets, steps, FINETUNE_LR if from_prior else 1e-3, self.options.seed, augment=kind == "in",
                            sampling=SAMPLING if kind == "through" else "uniform",
                            progress=(progress, f"{kind} fine-tune") if progress else None)
            report[f"{kind}_train_loss"] = round(loss, 5)
        report.update({f"{kind}_from_prior": from_prior, f"{kind}_finetune_steps": steps,
                       f"{kind}_finetune_s": round(time.perf_counter() - t, 3)})
        return net

    def _validate(
        self, kind: str, net: SRNet, val: list[il.PairSet], passes_per_orient: int, report: dict[str, Any],
        tie: cal.Held | None = None,
    ) -> cal.Validation:
        """Held-out gain and sigma calibration (on CUDA its wall time includes waiting for queued work); ``tie``
        the z pairs' held-out features (``calibration.held``) for ``calibration.KJ_RULE`` "zwidth"."""
        t = time.perf_counter()
        v = cal.validate(net, val, passes_per_orient, seed=self.options.seed, tie=tie)
        report.update({f"{kind}_validate_s": round(time.perf_counter() - t, 3),
                       f"{kind}_internal_gain_db": round(v.gain_db, 3),
                       f"{kind}_internal_spearman": round(v.spearman, 3),
                       f"{kind}_internal_coverage_95": round(v.coverage_95, 3), f"{kind}_sigma_k": v.k,
                       f"{kind}_sigma_j": v.j, f"{kind}_sigma_rho_se": round(v.rho_se, 4),
                       f"{kind}_sigma_kj_near": v.n_near,
                       f"{kind}_sigma_q": round(v.q, 4),
                       f"{kind}_sigma_q_phase": [round(q, 4) for q in v.q_phase],
                       f"{kind}_sigma_n_cal": v.n_cal})
        return v

    def _stage(
        self, kind: str, vol_n: np.ndarray, spacing: tuple[float, float, float], model: DegradationModel,
        prior: dict[str, Any], device: torch.device, passes: int, report: dict[str, Any],
        progress: Progress | None = None,
    ) -> tuple[torch.Tensor | None, torch.Tensor | None, str]:
        """Through-plane x f on a normalised volume: (output, sigma, fallback reason), tensors on ``device``.

        On CUDA the network passes are queued before the validation (which only decides fallback and sigma), and
        the validation pairs and host-side sigma helpers are built on host threads meanwhile: host and GPU overlap.
        """
        f = model.factor
        train_z, val_z = il.split_slices(vol_n.shape[0], 48, 12, self.options.seed)
        side = torch.cuda.Stream(device, priority=-1) if device.type == "cuda" else None  # validation beside passes
        val_job = self._soon(device, lambda: _on(side, lambda: il.through_pairs(
            vol_n, spacing, model, val_z, device, lr_profile=_val_lr_profile(model))))

        def sigma_helpers() -> tuple[np.ndarray, float, list[il.PairSet], list[il.PairSet]]:  # host-side
            zf_rows = (vol_n.shape[0] - 1) * f + 1  # truth-noise sd per output slice (its phase k % f)
            extra = il.target_noise_rows(il.noise_sigma(vol_n), model, min(spacing[1:]), zf_rows)
            rho = il.z_difficulty(vol_n, spacing, model, val_z)
            use_z = SIGMA_FROM in ("z", "mean", "max", "xy_zscale", "xy_zscale_phase") or (
                FINETUNE_SIGMA and FINETUNE_FAR == "coarse" and not self._skip_training(kind))
            zsets = cal.z_pairs(vol_n, model, device, src_spacing=min(spacing[1:])) if use_z else []
            csets = (cal.coarse_pairs(vol_n, spacing, model, val_z, device)
                     if SIGMA_FROM.startswith("xy_zscale") and zsets else [])
            return extra, rho, zsets, csets

        helpers = self._soon(device, sigma_helpers)
        sets = [] if self._skip_training() else il.through_pairs(vol_n, spacing, model, train_z, device)
        if not sets and not self._skip_training():
            return None, None, "in-plane matrix too small for internal training pairs"
        orients = 2 if passes >= 2 else 1
        net = self._train_net(kind, sets, f, 1, prior, device, report, progress=progress)
        prior_net = None  # the net before fine-tuning, for sigma only (calibration.finetune_factor)
        if not self._skip_training():
            with torch.random.fork_rng(devices=[]):  # a net without prior weights must not move the caller's RNG
                prior_net = make_net(prior, kind, f, 1, device, cpu_precision=self.options.cpu_precision)[0].eval()
        coarse_probe: Callable[[int, list[il.PairSet]], tuple[float, float, float, float] | None] | None = None
        if prior_net is not None and FINETUNE_SIGMA and FINETUNE_FAR == "coarse":
            def coarse_probe(n_flips: int, zsets: list[il.PairSet]) -> tuple[float, float, float, float] | None:
                return self._coarse_probe(kind, vol_n, spacing, model, prior, device, train_z, val_z, prior_net,
                                          zsets, n_flips, report)
        if side is not None:  # the (fine-tuned, and the prior) weights, before the passes and the validation
            side.wait_stream(torch.cuda.current_stream(device))
        task = il.Task(f, 1, True, model)
        x = to_device(vol_n, device)  # (Z, Y, X)
        z, y, xx = x.shape
        dcm = [il.matrix_f32(m, device) for m in il.dc_matrices(z, model)]  # uploads before the queue
        chunks = [self._chunk(net, z, xx, device), self._chunk(net, z, y, device)]
        stacks = [x.permute(1, 0, 2), x.permute(2, 0, 1)]  # coronal (Y,Z,X) | sagittal (X,Z,Y)
        with contextlib.ExitStack() as held:
            forward = self._compiled(net, stacks[:orients], chunks, task, held, report, kind)
            return self._passes(kind, net, forward, x, stacks, chunks, orients, task, dcm, passes, val_job,
                                helpers, side, report, progress, prior_net, coarse_probe)

    def _coarse_probe(
        self, kind: str, vol_n: np.ndarray, spacing: tuple[float, float, float], model: DegradationModel,
        prior: dict[str, Any], device: torch.device, train_z: np.ndarray, val_z: np.ndarray, prior_net: SRNet,
        zsets: list[il.PairSet], n_flips: int, report: dict[str, Any],
    ) -> tuple[float, float, float, float] | None:
        """Sigma only: a probe net fine-tuned like the engine's (same steps, rate, sampling, seed, slices) on
        in-plane pairs one scale coarser (the model of ``calibration.z_pairs``); (probe, prior) gains in dB over
        cubic on the held-out coarse in-plane pairs, then (probe, prior) on the z pairs ``zsets``; None without
        pairs."""
        t = time.perf_counter()
        f = model.factor
        coarse = DegradationModel(f, 1, model.step_mm * f, model.thickness_mm * f, model.pixel_mm, model.profile)
        sets = il.through_pairs(vol_n, spacing, coarse, train_z, device)
        held = il.through_pairs(vol_n, spacing, coarse, val_z, device)
        if not (sets and held and zsets):
            return None
        with torch.random.fork_rng(devices=[]):  # the engine's RNG stream stays as without the probe
            net, from_prior = make_net(prior, kind, f, 1, device, cpu_precision=self.options.cpu_precision)
            il.train(net, sets, self._steps(kind), FINETUNE_LR if from_prior else 1e-3, self.options.seed,
                     sampling=SAMPLING)
        net.eval()
        out = (cal.heldout_gain(net, held, n_flips), cal.heldout_gain(prior_net, held, n_flips),
               cal.heldout_gain(net, zsets, n_flips), cal.heldout_gain(prior_net, zsets, n_flips))
        report.update({f"{kind}_sigma_coarse_probe_gains_db": [round(g, 3) for g in out],
                       f"{kind}_sigma_coarse_probe_s": round(time.perf_counter() - t, 3)})
        return out

    def _compiled(self, net: SRNet, stacks: list[torch.Tensor], chunks: list[int], task: il.Task,
                  held: contextlib.ExitStack, report: dict[str, Any], kind: str,
                  ) -> Callable[[torch.Tensor], torch.Tensor] | None:
        """The process's compiled forward of ``net``'s shape holding its weights (``internal.CompiledNet``; its lock
        taken into ``held``), compiled for every batch shape of ``stacks`` before the passes are timed; None (eager)
        on the CPU, with ``torch_compile`` "none", or when compiling fails (logged, and reported as
        ``<kind>_compile_error``). Out of GPU memory propagates (the caller retries with smaller tiles)."""
        mode = TorchCompile(self.options.torch_compile)
        if mode == TorchCompile.NONE or stacks[0].device.type != "cuda":
            return None
        t = time.perf_counter()
        try:
            holder = il.compiled_net(net.cfg, str(stacks[0].device), mode.value)
            held.enter_context(holder.lock)
            holder.load(net)
            for stack, chunk in zip(stacks, chunks, strict=True):
                n = stack.shape[0]
                for b in sorted({min(chunk, n - b0) for b0 in range(0, n, chunk)}):
                    shape = (b, *stack.shape[1:])
                    if shape not in holder.shapes:
                        il.residual(net, stack[:b], task, (), self.options.max_voxels_per_tile, forward=holder.forward)
                        holder.shapes.add(shape)
            torch.cuda.synchronize(stacks[0].device)
        except torch.cuda.OutOfMemoryError:
            raise
        except Exception as exc:  # a compiler failure must not fail the series: eager passes instead
            log.warning("selfsup: torch.compile (%s) failed, eager passes: %s: %s", mode.value, type(exc).__name__, exc)
            report[f"{kind}_compile_error"] = f"{type(exc).__name__}: {exc}"[:300]
            return None
        report[f"{kind}_compile_s"] = round(time.perf_counter() - t, 3)
        report[f"{kind}_torch_compile"] = mode.value
        return holder.forward

    def _passes(
        self, kind: str, net: SRNet, forward: Callable[[torch.Tensor], torch.Tensor] | None, x: torch.Tensor,
        stacks: list[torch.Tensor], chunks: list[int], orients: int, task: il.Task, dcm: list[torch.Tensor],
        passes: int, val_job: Future[list[il.PairSet]], helpers: Future[tuple[np.ndarray, float, list[il.PairSet], list[il.PairSet]]],
        side: torch.cuda.Stream | None, report: dict[str, Any], progress: Progress | None,
        prior_net: SRNet | None = None,
        coarse_probe: Callable[[int, list[il.PairSet]], tuple[float, float, float, float] | None] | None = None,
    ) -> tuple[torch.Tensor | None, torch.Tensor | None, str]:
        """The network passes (coronal and sagittal stacks x flips), their fusion, data consistency, the
        self-check and sigma (the second half of ``_stage``). ``prior_net``: the net before fine-tuning (None in
        fast mode), whose held-out gain sets ``calibration.finetune_factor``."""
        f = task.fz
        z, y, xx = x.shape
        zf = (z - 1) * f + 1
        device = x.device
        t = time.perf_counter()
        timer = [torch.cuda.Event(enable_timing=True) for _ in range(2)] if device.type == "cuda" else []
        if timer:
            timer[0].record()
        base = task.base_volume(x)  # (Zf, Y, X)
        fused = torch.zeros_like(base)
        spread = torch.zeros_like(base)
        plan = [(o, fl) for fl in il.FLIPS for o in range(orients)][:passes]
        weighted = FUSE == "sigma" and orients == 2 and len(plan) >= 2 * orients
        wsum = torch.zeros_like(base) if weighted else None
        batches = sum(-(-(y if o == 0 else xx) // chunks[o]) for o, _fl in plan)
        done = 0
        for o in range(orients):
            stack = stacks[o]
            flips = [fl for (oo, fl) in plan if oo == o]
            s1 = torch.zeros((stack.shape[0], zf, stack.shape[2]), device=device)
            s2 = torch.zeros_like(s1) if len(flips) > 1 else None  # one view: its spread is 0, no squares
            chunk = chunks[o]
            for fl in flips:
                for b0 in range(0, stack.shape[0], chunk):
                    r = il.residual(net, stack[b0 : b0 + chunk], task, fl, self.options.max_voxels_per_tile,
                                    forward=forward)
                    s1[b0 : b0 + chunk] += r
                    if s2 is not None:
                        s2[b0 : b0 + chunk] += r * r
                    done += 1
                    if progress is not None:
                        progress(f"{kind} passes", done, batches)
            mean = s1.div_(len(flips))  # in place: the same values as s1 / n, one volume less
            if s2 is not None:  # (s2 / n - mean^2).clamp_min(0).sqrt() in place, the same operations in order
                sq = mean * mean
                std = s2.div_(len(flips)).sub_(sq).clamp_min_(0).sqrt_()
                del sq
            else:
                std = None
            back = (1, 0, 2) if o == 0 else (1, 2, 0)
            if wsum is not None and std is not None:
                w = 1.0 / (std * std + FUSE_EPS**2)
                fused += (mean * w).permute(*back)
                wsum += w.permute(*back)
                del w
            else:
                fused += mean.permute(*back)
            if std is not None:  # a single view adds 0
                spread += std.permute(*back)
            del s1, s2, mean, std
        fused = base + (fused / wsum if wsum is not None else fused / orients)
        spread /= orients
        report["through_fuse"] = "sigma" if wsum is not None else "mean"
        del wsum
        if timer:
            timer[1].record()  # GPU time of the passes, read once they are done (no host wait here)
        wall = time.perf_counter() - t
        fused, residuals = self._consistency(fused, x, dcm)
        val = val_job.result()
        if not val:
            return None, None, "in-plane matrix too small for internal training pairs"
        extra, rho, zsets, csets = helpers.result()
        n_views = max(1, passes // orients)
        zh = ch = None  # "xy_zscale": the engine's features and errors on the z pairs and the coarse in-plane pairs
        if SIGMA_FROM.startswith("xy_zscale") and zsets and csets:
            zh = _on(side, lambda: cal.held(net, zsets, n_views))
            ch = _on(side, lambda: cal.held(net, csets, n_views))
        v = _on(side, lambda: self._validate(kind, net, val, n_views, report, tie=zh))
        if not math.isfinite(v.gain_db) or v.gain_db < self.options.min_gain_db:  # NaN: not a pass
            return None, None, f"internal gain {v.gain_db:.2f} dB < {self.options.min_gain_db:.2f} dB"
        if zh is not None:  # the same check along the series' own z axis (its acquired slices, one scale coarser)
            zg = cal.held_gain(zh)
            report[f"{kind}_z_pairs_gain_db"] = round(zg, 3)
            bar = None if Z_MIN_GAIN_DB is None else min(Z_MIN_GAIN_DB, self.options.min_gain_db)
            if bar is not None and not zg >= bar:  # NaN: not a pass
                return None, None, (f"internal gain along z (the acquired slices, one scale coarser) {zg:.2f} dB "
                                    f"< {bar:.2f} dB")
        if timer:
            timer[1].synchronize()
        report[f"{kind}_inference_s"] = round(timer[0].elapsed_time(timer[1]) / 1e3 if timer else wall, 3)
        report[f"{kind}_flops"] = float(net.flops_per_lr_pixel() * z * y * xx * len(plan))
        n = max(1, x.numel())
        before, after = (sum(float(c) for c in part) for part in residuals)
        report.update({"dc_residual_before": (before / n) ** 0.5, "dc_residual_after": (after / n) ** 0.5})
        q_xy = v.q_rows(f) * rho  # in-plane pairs' q per phase x how much harder z is (the former method)
        vz = (_on(side, lambda: cal.calibrate(net, zsets, n_views, v, seed=self.options.seed))
              if SIGMA_FROM in ("z", "mean", "max") else None)  # z pairs built for FINETUNE_FAR only: no q from them
        zscale = np.full(f, rho)
        if zh is not None and ch is not None:  # "xy_zscale": z over in-plane one scale coarser, per phase
            vz = cal.calibrate_held(zh, v, self.options.seed)
            vc = cal.calibrate_held(ch, v, self.options.seed)
            zscale = cal.zscale(vz, vc, f, rho)
            if vc is not None:
                report[f"{kind}_sigma_q_coarse_xy"] = [round(float(q), 4) for q in vc.q_rows(f)]
            report[f"{kind}_sigma_zscale"] = [round(float(x), 4) for x in zscale]
        q_z = vz.q_rows(f) if vz is not None else q_xy
        q_pool = np.full(f, v.q * rho)  # one q for all phases
        raw = cal.target_u(v, fused, base, spread)
        t_shape = np.ones(f)
        if SIGMA_FROM in ("xy_shape", "xy_phase_shape"):  # body as the pairs' (calibration.validate)
            t_shape = cal.target_phase_shape(raw, fused > 0.05, f)
            report[f"{kind}_sigma_u_shape_target"] = [round(float(x), 4) for x in t_shape]
        transfer = cal.shape_transfer(np.asarray(v.u_shape or np.ones(f)), t_shape)
        q_phase = {"z": q_z, "xy": q_xy, "xy_pooled": q_pool, "xy_floor": np.maximum(q_xy, q_pool),
                   "mean": 0.5 * (q_xy + q_z), "max": np.maximum(q_xy, q_z), "xy_shape": q_pool * transfer,
                   "xy_phase_shape": q_xy * transfer,
                   "xy_zscale": np.maximum(v.q_rows(f), v.q) * zscale,
                   "xy_zscale_phase": v.q_rows(f) * zscale}[SIGMA_FROM]
        if prior_net is not None and FINETUNE_SIGMA:  # held-out pairs made optimistic by fine-tuning: undo it
            n_flips = n_views
            g_prior = _on(side, lambda: cal.heldout_gain(prior_net, val, n_flips))
            ft = cal.finetune_factor(v.gain_db, g_prior)
            report.update({f"{kind}_sigma_prior_gain_db": round(g_prior, 3),
                           f"{kind}_sigma_finetune_factor_near": round(ft, 4)})
            cp = _on(side, lambda: coarse_probe(n_flips, zsets)) if coarse_probe is not None else None
            if cp is not None:  # the share of the held-out gain that reaches the z axis, one scale coarser
                ft = cal.transfer_factor(v.gain_db, g_prior, *cp)
                report[f"{kind}_sigma_coarse_direct_factor"] = round(cal.leak_factor(*cp), 4)
            q_phase = q_phase * ft
            report[f"{kind}_sigma_finetune_factor"] = round(ft, 4)
        if zh is not None and vz is not None:  # the shipped sigma checked on the series' own z pairs
            cz = cal.held_coverage(zh, v, q_phase)
            report[f"{kind}_sigma_z_pairs_coverage_shipped"] = round(cz, 4)
            if Z_SIGMA_MIN_COVERAGE is not None and not cz >= Z_SIGMA_MIN_COVERAGE:
                widened = np.maximum(q_phase, vz.q_rows(f))
                report[f"{kind}_sigma_widened_from_z"] = [round(float(x), 4) for x in widened / q_phase]
                q_phase = widened
        report.update({f"{kind}_sigma_target_noise": [round(float(e), 5) for e in extra[:f]],
                       f"{kind}_sigma_noise_factor": round(v.noise_factor, 4),
                       f"{kind}_sigma_z_difficulty": round(rho, 3),
                       f"{kind}_sigma_q_xy": [round(float(q), 4) for q in q_xy],
                       f"{kind}_sigma_q_used": [round(float(q), 4) for q in q_phase],
                       f"{kind}_sigma_u_shape_pairs": [round(float(x), 4) for x in v.u_shape],
                       f"{kind}_sigma_from": SIGMA_FROM if vz is not None or SIGMA_FROM.startswith("xy") else "xy"})
        if vz is not None:
            report.update({f"{kind}_sigma_q_z": [round(float(q), 4) for q in vz.q_rows(f)],
                           f"{kind}_z_pairs_coverage_95": round(vz.coverage_95, 3),
                           f"{kind}_z_pairs_spearman": round(vz.spearman, 3), f"{kind}_z_pairs_n_cal": vz.n_cal})
        noise = torch.from_numpy(extra * v.noise_factor).float().to(fused.device)[:, None, None]  # pairs' level
        q_rows = torch.from_numpy(q_phase[np.arange(raw.shape[0]) % f]).float().to(fused.device)[:, None, None]
        sigma = ((raw * (q_rows / 1.96)) ** 2 + noise**2).sqrt()
        if BRACKET_FLOOR:  # a layer between two slices outside both: its 95 % interval reaches their range
            raised = cal.bracket_floor(sigma, fused, x, f)
            report[f"{kind}_sigma_bracket_raised"] = int(raised)
        return fused, sigma, ""

    @staticmethod
    def _finish(out: torch.Tensor, sigma: torch.Tensor, lo: float, scale: float,
                value_range: tuple[float, float] | None, report: dict[str, Any]) -> tuple[np.ndarray, np.ndarray]:
        """Denormalise (and clip) on the device, in place, with the float32 operations of the host path, then
        copy to the host (pinned, chunked on CUDA)."""
        t = time.perf_counter()
        out.mul_(scale).add_(lo)
        if value_range is not None:
            out.clamp_(value_range[0], value_range[1])
        sigma.mul_(scale)
        res = to_host(out), to_host(sigma)
        report["to_host_s"] = round(time.perf_counter() - t, 3)
        return res

    @staticmethod
    def _consistency(y: torch.Tensor, x: torch.Tensor, dcm: list[torch.Tensor]) -> tuple[
            torch.Tensor, tuple[list[torch.Tensor], list[torch.Tensor]]]:
        """Project y (Zf, Y, X) so that D y = x (the acquired slices), D and its pseudo-inverse P in ``dcm``;
        the squared residuals before and after, per column chunk, stay on the device (no host wait)."""
        d, p = dcm
        zf = y.shape[0]
        yv, xv = y.reshape(zf, -1), x.reshape(x.shape[0], -1)
        before: list[torch.Tensor] = []
        after: list[torch.Tensor] = []
        step = 1 << 21
        for c0 in range(0, yv.shape[1], step):  # the products in column blocks on the CPU (il.cols_matmul)
            r = xv[:, c0 : c0 + step] - il.cols_matmul(d, yv[:, c0 : c0 + step])
            before.append((r * r).sum())
            yv[:, c0 : c0 + step] += il.cols_matmul(p, r) if DC_WEIGHT == 1.0 else DC_WEIGHT * il.cols_matmul(p, r)
            r2 = xv[:, c0 : c0 + step] - il.cols_matmul(d, yv[:, c0 : c0 + step])
            after.append((r2 * r2).sum())
        return yv.view_as(y), (before, after)

    def _chunk(self, net: SRNet, h: int, w: int, device: torch.device) -> int:
        """Images per batch sized from free memory (GPU) or a 1 GiB activation budget (CPU).

        On CUDA the free memory counts the caching allocator's reserved-but-unused blocks (reusable by this call)
        and the count is rounded down to a power of two: the batch shapes then repeat from one series to the next,
        so a compiled forward (``torch_compile``) is not compiled again for each call. Measured on the H200
        (bench/results/engine-gpu2-*): without this, the second call's batch followed the memory the first left
        cached, and its passes were compiled again (5.3 s)."""
        per = net.cfg.width * h * w * net.cfg.fz * net.cfg.fx * 4 * 4
        if self.options.max_voxels_per_tile > 0:
            per = net.cfg.width * min(h * w, self.options.max_voxels_per_tile) * 4 * 4
        if device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(device)
            cached = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
            n = max(1, int((free + cached) * self.mem_fraction) // max(per, 1))
            return 1 << (n.bit_length() - 1)
        return max(1, (1 << 30) // max(per, 1))

    def _in_plane(
        self, vol_n: np.ndarray, cur: np.ndarray, cur_sigma: np.ndarray, g: int, square: bool,
        prior: dict[str, Any], device: torch.device, passes: int, report: dict[str, Any],
        progress: Progress | None = None,
    ) -> tuple[np.ndarray, np.ndarray, str]:
        """In-plane x g (ZSSR net, ``inplane.CONTEXT`` input slices) on every axial slice of ``cur``; sigma combined with the
        through-plane sigma. ``square``: square pixels (dy == dx), so the ensemble may transpose."""
        if min(vol_n.shape[1:]) < 8 * g:
            return cur, cur_sigma, f"matrix {vol_n.shape[1:]} too small for in-plane x{g} internal pairs"
        train_z, val_z = il.split_slices(vol_n.shape[0], 24, 6, self.options.seed)
        ctx = ip.CONTEXT
        sets = [] if self._skip_training("in") else ip.in_plane_pairs(vol_n, g, train_z, device, ctx, square)
        val = ip.in_plane_pairs(vol_n, g, val_z, device, ctx, square)
        ops = il.tta_ops(passes, square)
        extra = ip.in_plane_noise(vol_n, g)[0]  # the finer grid's noise (its pairs' share is in the q fit)
        rho = ip.scale_difficulty(vol_n, g)  # the finer step's difficulty relative to the pairs'
        report.update({"in_sigma_target_noise": round(extra, 5), "in_sigma_scale_difficulty": round(rho, 3),
                       "in_context": ctx, "in_tta": len(ops)})
        net, v = self._fit("in", sets, val, g, g, prior, device, len(ops), report, ctx, progress)
        if not math.isfinite(v.gain_db) or v.gain_db < self.options.min_gain_db:  # NaN: not a pass
            return cur, cur_sigma, f"in-plane internal gain {v.gain_db:.2f} dB < {self.options.min_gain_db:.2f} dB"
        task = il.Task(g, g, False)
        x = to_device(cur, device)  # (Z, Y, X)
        chunk = self._chunk(net, x.shape[1], x.shape[2], device)
        outs, sigs = [], []
        for b0, base, y, std in ip.infer(net, x, task, ops, chunk, self.options.max_voxels_per_tile):
            if progress is not None:
                progress("in passes", min(b0 + chunk, x.shape[0]), x.shape[0])
            outs.append(to_host(y))
            u = (std + v.k * (y - base).abs() + v.j * cal.edge(y, (-2, -1)) + cal.EPS) * (v.q * rho / 1.96)
            sigs.append(to_host((u**2 + extra**2).sqrt()))
        sig = np.concatenate(sigs)
        prev = np.repeat(np.repeat(cur_sigma, g, axis=1), g, axis=2)
        return np.concatenate(outs), np.sqrt(sig**2 + prev**2).astype(np.float32), ""


def _val_lr_profile(model: DegradationModel) -> str | None:
    """The held-out pairs' input profile kind under ``VAL_PAIRS_LR`` (None: the engine's own operator D)."""
    if VAL_PAIRS_LR == "discrete" or model.gap:
        return None
    if VAL_PAIRS_LR == "other_shape":
        return "gaussian" if model.profile == "box" else "box"
    raise ValueError(f"VAL_PAIRS_LR {VAL_PAIRS_LR!r} is not 'discrete' or 'other_shape'")


def _on(stream: torch.cuda.Stream | None, fn: Callable[[], T]) -> T:
    """fn() with ``stream`` as the calling thread's current CUDA stream (None: as is)."""
    if stream is None:
        return fn()
    with torch.cuda.stream(stream):
        return fn()

