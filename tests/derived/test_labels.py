"""Labels a reader can trust: SeriesDescription names engine, factor, fallback and the caution; SeriesNumber tells
results of one source apart (``node.derived.labels``)."""

from __future__ import annotations

from pathlib import Path

import pydicom
import pytest
from pydicom.dataset import Dataset

from models.cubic import CubicEngine
from models.engine import ENGINES, Device, EngineError, EngineOptions, EngineResult, Factors, VolumeInput
from node.app.phantom import write_phantom_series
from node.config import DEFAULTS, DeriveConfig, UncertaintyObject, config_from_dict
from node.derived import DerivedObjects, derive_series
from node.derived.labels import is_srnode_description, series_description, series_number
from node.errors import ConfigError
from node.ingest.follower import is_own_output
from node.process import EngineCache, process_series
from node.series import SeriesVolume, load_series, regular_runs
from tests.support.engines import ramp_sigma
from tests.support.fixtures import shared_series

CFG = DeriveConfig()


@pytest.fixture(scope="module")
def phantom(tmp_path_factory: pytest.TempPathFactory) -> SeriesVolume:
    """Series 2 "Head phantom 3 mm": 6 slices of 32 x 32."""
    return load_series(write_phantom_series(tmp_path_factory.mktemp("ph"), slices=6, size=32, step_mm=3.0))


def _cubic(vol: SeriesVolume, f: int, g: int = 1, cfg: DeriveConfig = CFG) -> DerivedObjects:
    """Cubic values, labelled cubic, with a sigma (as if the engine had one) so that its objects are made."""
    factors = Factors(f, g)
    res = CubicEngine().upscale(vol.to_engine_input(), factors)
    res.has_sigma, res.sigma = True, ramp_sigma(res.data.shape)
    return derive_series(vol, res, factors, cfg, CubicEngine.version)


def _labels(out: DerivedObjects) -> tuple[str, int, str, int]:
    d, s = out.derived, out.uncertainty
    assert len({x.SeriesDescription for x in d}) == len({int(x.SeriesNumber) for x in d}) == 1  # per series
    assert len({x.SeriesDescription for x in s}) == len({int(x.SeriesNumber) for x in s}) == 1
    return d[0].SeriesDescription, int(d[0].SeriesNumber), s[0].SeriesDescription, int(s[0].SeriesNumber)


def test_description_names_factor_engine_and_caution(phantom: SeriesVolume) -> None:
    desc, number, sigma_desc, sigma_number = _labels(_cubic(phantom, 2))
    assert desc == "Head phantom 3 mm SR x2 cubic - not for diagnosis"
    assert sigma_desc == "Head phantom 3 mm SR x2 cubic sigma - not for diagnosis"
    # source series 2, offset 1000: <k>002 with k in 1..99; the uncertainty series the next number
    assert number % 1000 == 2 and 1 <= number // 1000 <= 99 and sigma_number == number + 1
    assert number == series_number(2, 1000, "cubic", Factors(2, 1))  # the documented formula, deterministic
    assert _labels(_cubic(phantom, 2)) == (desc, number, sigma_desc, sigma_number)
    assert _labels(_cubic(phantom, 1, 2))[0] == "Head phantom 3 mm SR x2 in-plane cubic - not for diagnosis"
    assert _labels(_cubic(phantom, 2, 2))[0] == "Head phantom 3 mm SR x2 x2 in-plane cubic - not for diagnosis"
    # both sigma objects: the map takes number + 1, the card number + 2, each its own series and description
    both = _cubic(phantom, 2, cfg=DeriveConfig(uncertainty=UncertaintyObject.BOTH))
    assert [(x.SeriesDescription, int(x.SeriesNumber)) for x in both.uncertainty] == [
        (sigma_desc, number + 1), ("Head phantom 3 mm SR x2 cubic sigma card - not for diagnosis", number + 2)]
    assert len(set(both.uncertainty_series_uids)) == 2 and both.uncertainty_series_uid == both.uncertainty_series_uids[0]
    card = _cubic(phantom, 2, cfg=DeriveConfig(uncertainty=UncertaintyObject.SECONDARY_CAPTURE)).uncertainty
    assert [int(x.SeriesNumber) for x in card] == [number + 1]  # the card alone takes the next number


def test_caution_and_suffix_are_configurable(phantom: SeriesVolume) -> None:
    cfg = config_from_dict({**DEFAULTS, "derive": {"caution": "research use only", "series_description_suffix": " AI"}})
    assert _labels(_cubic(phantom, 2, cfg=cfg.derive))[0] == "Head phantom 3 mm AI x2 cubic - research use only"
    cfg = config_from_dict({**DEFAULTS, "derive": {"caution": ""}})
    assert _labels(_cubic(phantom, 2, cfg=cfg.derive))[0] == "Head phantom 3 mm SR x2 cubic"
    for bad in ("a\\b", "x" * 33, "line\nbreak"):
        with pytest.raises(ConfigError, match=r"^derive.caution: .* at most 32 printable characters"):
            config_from_dict({**DEFAULTS, "derive": {"caution": bad}})


def test_a_long_source_description_is_shortened_first() -> None:
    source = "VERY LONG PROTOCOL NAME OF A RESEARCH SCANNER WITH MANY WORDS IN IT"
    desc = series_description(source, " SR", Factors(3, 1), "selfsup", caution="not for diagnosis")
    assert len(desc) == 64 and desc.endswith(" SR x3 selfsup - not for diagnosis")
    assert source.startswith(desc[: 64 - len(" SR x3 selfsup - not for diagnosis")])
    # the fallback and a run survive too; only a tail longer than 64 characters loses the end of the caution
    desc = series_description(source, " SR", Factors(2, 1), "cubic", fallback=True, caution="not for diagnosis",
                              run="run 2/2")
    assert len(desc) <= 64 and desc.endswith(" run 2/2 SR x2 cubic (fallback) - not for diagnosis")
    desc = series_description(source, " " + "S" * 31, Factors(2, 2), "selfsup+denoise", caution="c" * 32)
    assert desc == "S" * 31 + " x2 x2 in-plane selfsup+denoise"  # 64 characters, no dangling " -"


class _FailingEngine:
    """A real engine, registered under its own name, that always fails: the node falls back to cubic."""

    name = "failing-for-labels"
    version = "0"

    def __init__(self, options: EngineOptions) -> None:
        self.options = options

    def upscale(self, volume: VolumeInput, factors: Factors) -> EngineResult:
        raise EngineError("weights file is corrupt")


def test_the_fallback_is_visible_in_the_description(phantom: SeriesVolume, tmp_path: Path) -> None:
    cfg = config_from_dict(DEFAULTS)
    engines = EngineCache({**ENGINES, _FailingEngine.name: _FailingEngine})
    res = process_series([Path(ds.filename) for ds in phantom.datasets], cfg.rules[0], cfg, tmp_path / "out",
                         engine_name=_FailingEngine.name, engines=engines)
    assert res.engine == "cubic" and res.fallback
    d = pydicom.dcmread(res.derived_files[0], stop_before_pixels=True)
    assert d.SeriesDescription == "Head phantom 3 mm SR x2 cubic (fallback) - not for diagnosis"
    assert res.uncertainty_files == [] and res.uncertainty_series_uid == ""  # the cubic fallback has no sigma
    # (a denoised fallback has sigma) 67 characters: the source description gives way ("... 3 mm" -> "... 3")
    s = series_description("Head phantom 3 mm", " SR", Factors(2, 1), "cubic", fallback=True,
                           caution="not for diagnosis", sigma=True)
    assert s == "Head phantom 3 SR x2 cubic (fallback) sigma - not for diagnosis"


def test_two_results_of_one_source_never_look_alike(phantom: SeriesVolume) -> None:
    vol = phantom
    factors = Factors(2, 1)
    fast = EngineOptions(fast=True, device=Device.CPU, tta_passes=1, samples=2, min_gain_db=-100.0)
    selfsup = EngineCache().get("selfsup", fast)
    results = {
        "cubic x2": _cubic(vol, 2),
        "cubic x3": _cubic(vol, 3),
        "selfsup x2": derive_series(vol, selfsup.upscale(vol.to_engine_input(), factors), factors, CFG, "t"),
    }
    labels = {k: _labels(v) for k, v in results.items()}
    descriptions = [d for lab in labels.values() for d in (lab[0], lab[2])]
    numbers = [n for lab in labels.values() for n in (lab[1], lab[3])]
    assert len(set(descriptions)) == len(descriptions) == 6, labels
    assert len(set(numbers)) == len(numbers) == 6, labels
    assert all(n % 1000 in (2, 3) for n in numbers)  # the source's number stays readable
    assert "x2 selfsup" in labels["selfsup x2"][0] and "x3 cubic" in labels["cubic x3"][0]


def test_each_run_of_an_irregular_series_has_its_own_numbers() -> None:
    vol = load_series(sorted(shared_series("ct_head_ge_tilted_irregular").glob("*.dcm")))
    runs = [_cubic(r, 2) for r in regular_runs(vol)]
    (d1, n1, s1, m1), (d2, n2, s2, m2) = (_labels(r) for r in runs)
    assert (n2, m1, m2) == (n1 + 3, n1 + 1, n1 + 4)  # room for the card (+2) of each run
    assert "run 1/2 SR x2 cubic - not for diagnosis" in d1 and "run 2/2 SR x2 cubic sigma" in s2


def test_srnode_output_is_recognised_by_its_description(phantom: SeriesVolume) -> None:
    out = _cubic(phantom, 2)
    for made in (out.derived[0], out.uncertainty[0]):
        only_description = Dataset()
        only_description.SeriesDescription = made.SeriesDescription
        assert is_own_output(only_description, CFG.series_description_suffix)
        assert is_own_output(made, CFG.series_description_suffix)
    older = Dataset()
    older.SeriesDescription = "Head phantom 3 mm SR"  # what srnode wrote before the factor and engine were named
    assert is_own_output(older, " SR")
    acquired = Dataset()
    acquired.SeriesDescription = "SR x2 protocol"
    for text in ("Head phantom 3 mm", "STD BRAIN 5MM", "SR x2 protocol", "T1 SRx2"):
        acquired.SeriesDescription = text
        assert not is_own_output(acquired, " SR"), text
    assert is_srnode_description("CT HEAD [AI] x4 selfsup - research", " [AI]")
    assert not is_srnode_description("CT HEAD x4 selfsup - research", "")
