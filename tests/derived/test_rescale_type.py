"""A CT whose values are not Hounsfield units (RescaleType US, MGML, Z_EFF, ED: dual-energy maps, PS3.3
C.8.2.1.1.11 / C.11.1.1.2) keeps its unit in the derived series (break13f: every derived CT said RescaleType HU, its
uncertainty map Hounsfield units, and padding was filled with -1000 "air" in units that are not HU)."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path

import highdicom as hd
import pydicom
import pytest
from pydicom.dataset import Dataset

from node.config import UncertaintyObject, load_config, replace
from node.process import process_series
from node.series import load_series
from tests.support.engines import SIGMA_TEST_ENGINE, sigma_engines
from tests.support.series import edited_phantom


def _series(tmp_path: Path, change: Callable[[int, Dataset], None]) -> list[Path]:
    return edited_phantom(tmp_path, change, enforce_file_format=True)


def _unit(unit: str) -> Callable[[int, Dataset], None]:
    def change(k: int, ds: Dataset) -> None:
        ds.RescaleType = unit
        ds.RescaleIntercept = "0"  # an iodine or Z-effective map: 0 .. a few tens, no -1024 offset
        ds.RescaleSlope = "0.01"
    return change


def _derive(tmp_path: Path, files: list[Path]) -> list[Dataset]:
    cfg = load_config(None)
    cfg = replace(cfg, derive=dataclasses.replace(cfg.derive, uncertainty=UncertaintyObject.BOTH))
    res = process_series(files, cfg.rules[0], cfg, tmp_path / "out", engine_name=SIGMA_TEST_ENGINE,
                         engines=sigma_engines())
    return [pydicom.dcmread(p) for p in (*res.derived_files, *res.uncertainty_files)]


@pytest.mark.parametrize(("unit", "ucum"), [("MGML", "mg/mL"), ("Z_EFF", "1"), ("ED", "10*23/mL"), ("EDW", "1"),
                                            ("PCT", "%"), ("US", "[arb'U]"), ("HU_MOD", "[arb'U]")])
def test_a_ct_in_other_units_keeps_them(tmp_path: Path, unit: str, ucum: str) -> None:
    """The derived slices keep the stated RescaleType; sigma is in that unit (UCUM, PS3.3 C.11.1.1.2), arbitrary
    units where the term names none (US, HU_MOD), never Hounsfield units."""
    out = _derive(tmp_path, _series(tmp_path, _unit(unit)))
    derived = [d for d in out if d.SOPClassUID == "1.2.840.10008.5.1.4.1.1.2"]
    assert derived and {str(d.RescaleType) for d in derived} == {unit}
    pm = hd.pm.ParametricMap.from_dataset(next(d for d in out if d.SOPClassUID == "1.2.840.10008.5.1.4.1.1.30"))
    mapping = pm.SharedFunctionalGroupsSequence[0].RealWorldValueMappingSequence[0]
    assert mapping.MeasurementUnitsCodeSequence[0].CodeValue == ucum  # not Hounsfield units
    card = next(d for d in out if d.SOPClassUID == "1.2.840.10008.5.1.4.1.1.7")
    assert "HU" not in str(card.DerivationDescription)


def test_a_ct_in_hounsfield_units_still_says_hu(tmp_path: Path) -> None:
    out = _derive(tmp_path, _series(tmp_path, lambda k, ds: None))
    assert {str(d.RescaleType) for d in out if d.SOPClassUID == "1.2.840.10008.5.1.4.1.1.2"} == {"HU"}
    pm = hd.pm.ParametricMap.from_dataset(next(d for d in out if d.SOPClassUID == "1.2.840.10008.5.1.4.1.1.30"))
    assert pm.SharedFunctionalGroupsSequence[0].RealWorldValueMappingSequence[0] \
        .MeasurementUnitsCodeSequence[0].CodeValue == "[hnsf'U]"


def test_padding_of_a_ct_in_other_units_is_not_air_in_hu(tmp_path: Path) -> None:
    """PixelPaddingValue of a CT in unspecified units (-1500 .. 2595): filled with the lowest value present, as for
    any image that is not in HU, not with -1000 (air in HU)."""
    def padded(k: int, ds: Dataset) -> None:
        ds.RescaleType = "US"
        ds.RescaleIntercept = "-1500"
        a = ds.pixel_array.copy()
        a[:4, :] = 4095
        ds.PixelData = a.tobytes()
        ds.add_new(0x00280120, "US", 4095)  # PixelPaddingValue
    vol = load_series(_series(tmp_path, padded))
    low = float(vol.data[:, 4:, :].min())  # the lowest value of the image itself (-1476)
    assert low < -1400 and float(vol.data[:, :4, :].min()) == float(vol.data[:, :4, :].max()) == low
