"""``[engine] torch_compile``: the network passes through ``torch.compile`` on CUDA, the CPU unchanged."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from models import internal as il
from models.degrade import DegradationModel, degrade_through_plane
from models.engine import EngineOptions, Factors, TorchCompile, VolumeInput, get_engine
from models.nets import SRNet, SRNetConfig
from node.config import config_from_dict
from node.errors import ConfigError


def _volume() -> VolumeInput:
    rng = np.random.default_rng(0)
    truth = rng.normal(40, 30, (17, 48, 48)).astype(np.float32)
    return VolumeInput(degrade_through_plane(truth, 2, 2.0), (2.0, 0.8, 0.8), 2.0, "CT")


def test_torch_compile_is_a_config_key_and_bad_values_name_it() -> None:
    cfg = config_from_dict({"engine": {"torch_compile": "max-autotune"}})
    assert cfg.engine.options.torch_compile == TorchCompile.MAX_AUTOTUNE
    with pytest.raises(ConfigError, match="torch_compile"):
        config_from_dict({"engine": {"torch_compile": "fastest"}})


def test_cpu_ignores_torch_compile_and_gives_the_same_volume() -> None:
    base = EngineOptions(device="cpu", fast=True, tta_passes=2, min_gain_db=-1e9)
    a = get_engine("selfsup", base).upscale(_volume(), Factors(2, 1))
    b = get_engine("selfsup", EngineOptions(**{**base.__dict__, "torch_compile": TorchCompile.DEFAULT})).upscale(
        _volume(), Factors(2, 1))
    np.testing.assert_array_equal(a.data, b.data)
    np.testing.assert_array_equal(a.sigma, b.sigma)
    assert "through_compile_s" not in b.report


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_compiled_net_takes_each_callers_weights_without_tracing_again() -> None:
    cfg = SRNetConfig(fz=2, fx=1, width=8, depth=2)
    dev = torch.device("cuda")
    task = il.Task(2, 1, True, DegradationModel(2, 1, 2.0, 2.0, 1.0))
    held = il.compiled_net(cfg, "cuda", "default")
    x = torch.randn(4, 20, 32, device=dev)
    for seed in (1, 2, 1):
        torch.manual_seed(seed)
        net = SRNet(cfg).to(dev).eval()
        for p in net.parameters():
            torch.nn.init.normal_(p, std=0.1)
        with held.lock:
            held.load(net)
            got = il.residual(net, x, task, (), forward=held.forward)
        want = il.residual(net, x, task, ())
        assert float((got - want).norm() / want.norm()) < 2e-2  # bf16 autocast both ways; kernels differ
