"""``[engine] cpu_precision``: the CPU's network passes in bf16 (LeakyReLU fused into oneDNN convolutions) or
float32; everything around the network unchanged."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from models import internal as il
from models.degrade import degrade_through_plane
from models.engine import CpuPrecision, EngineOptions, Factors, VolumeInput, get_engine
from models.nets import CpuBf16Forward, SRNet, SRNetConfig, cpu_fused_ok
from node.config import config_from_dict
from node.errors import ConfigError


def _net(fz: int = 2, fx: int = 1, in_ch: int = 1) -> SRNet:
    torch.manual_seed(0)
    net = SRNet(SRNetConfig(fz=fz, fx=fx, width=16, depth=3, in_ch=in_ch)).eval()
    torch.nn.init.normal_(net.head.weight, std=0.1)
    return net


def _volume() -> VolumeInput:
    rng = np.random.default_rng(0)
    truth = rng.normal(40, 30, (17, 48, 48)).astype(np.float32)
    return VolumeInput(degrade_through_plane(truth, 2, 2.0), (2.0, 0.8, 0.8), 2.0, "CT")


def test_cpu_precision_is_a_config_key_and_bad_values_name_it() -> None:
    assert config_from_dict({}).engine.options.cpu_precision == CpuPrecision.AUTO
    cfg = config_from_dict({"engine": {"cpu_precision": "float32"}})
    assert cfg.engine.options.cpu_precision == CpuPrecision.FLOAT32
    with pytest.raises(ConfigError, match="cpu_precision"):
        config_from_dict({"engine": {"cpu_precision": "fp8"}})


@pytest.mark.skipif(not cpu_fused_ok(), reason="this torch build lacks oneDNN's fused convolution")
@pytest.mark.parametrize(("fz", "fx", "in_ch"), [(2, 1, 1), (3, 1, 1), (2, 2, 3)])
def test_fused_bf16_forward_matches_bf16_autocast(fz: int, fx: int, in_ch: int) -> None:
    net = _net(fz, fx, in_ch)
    x = torch.rand(3, in_ch, 20, 33)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        want = net(x).float()
    with torch.no_grad():
        got = CpuBf16Forward(net)(x).float()
        exact = net(x)
    assert got.shape == want.shape == (3, 1, 20 * fz, 33 * fx)
    scale = float(exact.abs().max())
    assert float((got - exact).abs().max()) < 0.02 * scale  # bf16 against float32
    assert float((got - want).abs().max()) < 0.02 * scale  # fused against autocast: rounding only


def test_float32_passes_are_the_float32_network() -> None:
    net = _net()
    net.cpu_precision = CpuPrecision.FLOAT32
    lr = torch.rand(2, 12, 30)
    task = il.Task(2, 1, True)
    got = il.residual(net, lr, task, ())
    with torch.no_grad():
        want = net(lr[:, None])[:, 0, : task.out_shape(12, 30)[0]]
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    net.cpu_precision = CpuPrecision.BF16
    bf = il.residual(net, lr, task, ())
    assert bf.dtype == torch.float32 and not torch.equal(bf, got)
    assert float((bf - got).abs().max()) < 0.02 * float(got.abs().max())


def test_tiled_bf16_passes_agree_with_untiled() -> None:
    net = _net()
    net.cpu_precision = CpuPrecision.BF16
    lr = torch.rand(2, 12, 70)
    task = il.Task(2, 1, True)
    whole = il.residual(net, lr, task, (-1,))
    tiled = il.residual(net, lr, task, (-1,), max_pixels=12 * 20)
    assert float((whole - tiled).abs().max()) < 1e-2 * float(whole.abs().max())


def test_engine_in_float32_and_bf16_differ_by_rounding_only_and_keep_data_consistency() -> None:
    base = EngineOptions(device="cpu", fast=True, tta_passes=2, min_gain_db=-1e9)  # type: ignore[arg-type]
    vin = _volume()
    a = get_engine("selfsup", EngineOptions(**{**base.__dict__, "cpu_precision": CpuPrecision.FLOAT32})).upscale(
        vin, Factors(2, 1))
    b = get_engine("selfsup", EngineOptions(**{**base.__dict__, "cpu_precision": CpuPrecision.BF16})).upscale(
        vin, Factors(2, 1))
    assert a.data.shape == b.data.shape and a.engine == b.engine == "selfsup"
    assert float(np.abs(a.data - b.data).max()) < 2.0  # HU: bf16 rounding of a residual of tens of HU
    assert abs(float((a.data - b.data).mean())) < 0.05  # no bias
    for r in (a, b):
        assert r.report["dc_residual_after"] < 1e-5  # data consistency exact in both (float32 after the net)


def test_column_blocked_products_and_base_volume_are_bit_identical() -> None:
    torch.manual_seed(0)
    m = il.matrix_f32(il.cubic_matrix(40, 2, True), torch.device("cpu"))
    v = torch.rand(40, 3 * il.CPU_MATMUL_COLS + 17)
    torch.testing.assert_close(il.cols_matmul(m, v), m @ v, rtol=0, atol=0)
    x = torch.rand(40, 6, 50)
    task = il.Task(2, 1, True)
    want = task.base(x.permute(1, 0, 2)).permute(1, 0, 2)
    torch.testing.assert_close(task.base_volume(x), want, rtol=0, atol=0)


def test_float32_matrices_hold_no_denormals() -> None:
    m = np.array([[1.0, 1e-40, -1e-39], [1e-30, 0.0, 2.0]])
    t = il.matrix_f32(m, torch.device("cpu"))
    assert t.dtype == torch.float32 and t.tolist() == [[1.0, 0.0, 0.0], [pytest.approx(1e-30), 0.0, 2.0]]
    tiny = torch.finfo(torch.float32).tiny
    c = il.matrix_f32(il.cubic_matrix(134, 2, True), torch.device("cpu"))
    assert not bool(((c != 0) & (c.abs() < tiny)).any())
