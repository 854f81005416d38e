"""The uncertainty objects (``node.derived.uncertainty``): the float Parametric Map on the derived grid and the
colour SC card without geometry; dciodvfy, pydicom and highdicom read them back; ``[derive] uncertainty``."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
from pydicom import config as pydicom_config

from models.engine import Factors
from node.app.phantom import write_phantom_series
from node.config import DEFAULTS, DeriveConfig, UncertaintyObject, config_from_dict
from node.derived import DerivedObjects, derive_series
from node.derived.modules import PARAMETRIC_MAP_STORAGE, SECONDARY_CAPTURE_STORAGE
from node.errors import ConfigError
from node.process import write_atomic
from node.series import SeriesVolume, load_series
from tests.support.engines import SigmaCubic, ramp_sigma
from tests.support.fixtures import shared_series
from tests.support.peers import dciodvfy

BOTH = DeriveConfig(uncertainty=UncertaintyObject.BOTH)
GEOMETRY = ("ImagePositionPatient", "ImageOrientationPatient", "FrameOfReferenceUID", "PixelSpacing",
            "SliceThickness")


@pytest.fixture(scope="module")
def phantom(tmp_path_factory: pytest.TempPathFactory) -> SeriesVolume:
    return load_series(write_phantom_series(tmp_path_factory.mktemp("ph"), slices=6, size=48, step_mm=3.0))


@pytest.fixture()
def strict() -> Iterator[None]:
    old = pydicom_config.settings.reading_validation_mode
    pydicom_config.settings.reading_validation_mode = pydicom_config.RAISE
    yield
    pydicom_config.settings.reading_validation_mode = old


def _derive(vol: SeriesVolume, cfg: DeriveConfig = BOTH, f: int = 2, g: int = 1,
            sigma: np.ndarray | None = None) -> tuple[DerivedObjects, np.ndarray]:
    factors = Factors(f, g)
    res = SigmaCubic().upscale(vol.to_engine_input(), factors)
    if sigma is not None:
        res.sigma = sigma
    return derive_series(vol, res, factors, cfg, "0"), res.sigma


def _written(ds: pydicom.Dataset, path: Path, warnings_too: bool = True) -> Path:
    """``ds`` written to ``path``; dciodvfy: no error (``warnings_too``: no warning either)."""
    write_atomic(ds, path)
    errors, warnings = dciodvfy(path)
    assert not errors, f"{ds.SOPClassUID}: {errors}"
    assert not (warnings_too and warnings), f"{ds.SOPClassUID}: {warnings}"
    return path


def test_parametric_map_float_values_frames_units_and_references(phantom: SeriesVolume, tmp_path: Path,
                                                                   strict: None) -> None:
    out, sigma = _derive(phantom)
    pm_ds, card_ds = out.uncertainty
    assert pm_ds.SOPClassUID == PARAMETRIC_MAP_STORAGE and card_ds.SOPClassUID == SECONDARY_CAPTURE_STORAGE
    path = _written(pm_ds, tmp_path / "PM00001.dcm")
    back = pydicom.dcmread(path)
    for elem in back.iterall():  # every value readable under strict validation
        _ = elem.value
    # float32 pixels equal to sigma, frame k = derived slice k, bit for bit
    assert "FloatPixelData" in back and int(back.NumberOfFrames) == len(out.derived)
    assert back.pixel_array.dtype == np.float32 and np.array_equal(back.pixel_array, sigma)
    frames = back.PerFrameFunctionalGroupsSequence
    for frame, d in zip(frames, out.derived, strict=True):
        assert list(frame.PlanePositionSequence[0].ImagePositionPatient) == list(d.ImagePositionPatient)
        ref = frame.DerivationImageSequence[0].SourceImageSequence[0]
        assert ref.ReferencedSOPInstanceUID == d.SOPInstanceUID
    d0 = out.derived[0]
    shared = back.SharedFunctionalGroupsSequence[0]
    assert list(shared.PlaneOrientationSequence[0].ImageOrientationPatient) == [float(v) for v in
                                                                                  d0.ImageOrientationPatient]
    assert [float(v) for v in shared.PixelMeasuresSequence[0].PixelSpacing] == [float(v) for v in d0.PixelSpacing]
    assert back.FrameOfReferenceUID == d0.FrameOfReferenceUID and back.StudyInstanceUID == d0.StudyInstanceUID
    assert back.ReferencedSeriesSequence[0].SeriesInstanceUID == out.derived_series_uid
    assert back.PatientName == d0.PatientName and back.PatientID == d0.PatientID
    assert back.SeriesInstanceUID == out.uncertainty_series_uid != out.derived_series_uid
    assert int(back.SeriesNumber) == int(d0.SeriesNumber) + 1 and back.SeriesDescription.endswith(
        "sigma - not for diagnosis")
    assert back.ContentLabel == "SIGMA" and list(back.ImageType) == ["DERIVED", "PRIMARY", "VOLUME", "STD_DEVIATION"]
    # the real world value mapping: identity, Hounsfield units (UCUM), a standard deviation
    rwv = shared.RealWorldValueMappingSequence[0]
    unit = rwv.MeasurementUnitsCodeSequence[0]
    assert (unit.CodeValue, unit.CodingSchemeDesignator) == ("[hnsf'U]", "UCUM")
    assert rwv.LUTExplanation == "1-sigma uncertainty of the SR estimate (HU)" and rwv.LUTLabel == "SIGMA"
    assert (rwv.RealWorldValueSlope, rwv.RealWorldValueIntercept) == (1.0, 0.0)
    assert rwv.DoubleFloatRealWorldValueLastValueMapped == pytest.approx(float(sigma.max()))
    assert rwv.QuantityDefinitionSequence[0].ConceptCodeSequence[0].CodeMeaning == "Standard Deviation"
    # highdicom reads it as a Parametric Map, with the same values
    pm = hd.pm.ParametricMap.from_dataset(back)
    assert np.array_equal(pm.pixel_array, sigma) and pm.SeriesInstanceUID == out.uncertainty_series_uid


def test_card_is_colour_without_geometry(phantom: SeriesVolume, tmp_path: Path, strict: None) -> None:
    out, _ = _derive(phantom)
    card = pydicom.dcmread(_written(out.uncertainty[1], tmp_path / "SC00001.dcm"))
    assert card.PhotometricInterpretation == "RGB" and int(card.SamplesPerPixel) == 3
    assert card.pixel_array.shape == (520, 640, 3) and card.pixel_array.std() > 0
    assert not [kw for kw in GEOMETRY if kw in card]
    assert card.BurnedInAnnotation == "NO" and card.SeriesDescription.endswith("sigma card - not for diagnosis")
    assert card.SeriesInstanceUID == out.uncertainty_series_uids[1] != out.uncertainty_series_uid
    mid = out.derived[len(out.derived) // 2]
    assert card.SourceImageSequence[0].ReferencedSOPInstanceUID == mid.SOPInstanceUID
    assert card.StudyInstanceUID == mid.StudyInstanceUID and card.PatientID == mid.PatientID
    img = hd.Image.from_dataset(card, copy=True)  # highdicom reads it back (its generic image reader)
    assert img.get_frame(1).shape == (520, 640, 3)


def test_mr_map_in_arbitrary_units_valid(tmp_path: Path) -> None:
    vol = load_series(sorted(shared_series("mr_t1_enhanced_multiframe_siemens_xa30").glob("*.dcm")))
    z = 4
    vol = dataclasses.replace(vol, data=vol.data[:z, :32, :32].copy(), positions=vol.positions[:z],
                              datasets=vol.datasets[:z], frame_numbers=vol.frame_numbers[:z],
                              formats=vol.formats[:z], names=vol.names[:z], steps=vol.steps[:z - 1])
    out, sigma = _derive(vol)
    # (the source's PatientName, copied as it is, is in a retired form: dciodvfy warns about that value)
    pm = pydicom.dcmread(_written(out.uncertainty[0], tmp_path / "PM00001.dcm", warnings_too=False))
    _written(out.uncertainty[1], tmp_path / "SC00001.dcm", warnings_too=False)
    rwv = pm.SharedFunctionalGroupsSequence[0].RealWorldValueMappingSequence[0]
    assert rwv.MeasurementUnitsCodeSequence[0].CodeValue == "[arb'U]"
    assert np.array_equal(pm.pixel_array, sigma)


def test_non_finite_and_negative_sigma_become_zero(phantom: SeriesVolume) -> None:
    factors = Factors(2, 1)
    shape = SigmaCubic().upscale(phantom.to_engine_input(), factors).data.shape
    bad = ramp_sigma(shape)
    bad[0, 0, :3] = (np.nan, np.inf, -5.0)
    out, _ = _derive(phantom, DeriveConfig(), sigma=bad)
    (pm,) = out.uncertainty
    values = pm.pixel_array
    assert values[0, 0, :3].tolist() == [0.0, 0.0, 0.0] and np.isfinite(values).all()
    assert np.array_equal(values[1:], bad[1:])


@pytest.mark.parametrize(("kind", "classes"), [
    ("parametric_map", [PARAMETRIC_MAP_STORAGE]), ("secondary_capture", [SECONDARY_CAPTURE_STORAGE]),
    ("both", [PARAMETRIC_MAP_STORAGE, SECONDARY_CAPTURE_STORAGE]), ("none", [])])
def test_config_chooses_the_objects(phantom: SeriesVolume, kind: str, classes: list[str]) -> None:
    cfg = config_from_dict({**DEFAULTS, "derive": {"uncertainty": kind}})
    out, _ = _derive(phantom, cfg.derive)
    assert [x.SOPClassUID for x in out.uncertainty] == classes
    assert out.uncertainty_series_uid == (out.uncertainty_series_uids[0] if classes else "")


def test_config_default_and_bad_values_name_the_key() -> None:
    assert config_from_dict(DEFAULTS).derive.uncertainty == UncertaintyObject.PARAMETRIC_MAP
    for bad in ("pm", True, "SC"):
        with pytest.raises(ConfigError, match=r"^derive\.uncertainty: .*parametric_map, secondary_capture, both, none"):
            config_from_dict({**DEFAULTS, "derive": {"uncertainty": bad}})


def test_engine_without_sigma_writes_no_sigma_object(phantom: SeriesVolume) -> None:
    factors = Factors(2, 1)
    res = SigmaCubic().upscale(phantom.to_engine_input(), factors)
    res.has_sigma = False  # as cubic (and every fallback to it) says
    out = derive_series(phantom, res, factors, BOTH, "0")
    assert out.uncertainty == [] and out.uncertainty_series_uid == "" and out.uncertainty_series_uids == []


def test_map_of_a_source_without_body_part_is_valid(tmp_path: Path) -> None:
    """A source with neither BodyPartExamined nor Laterality (the Philips fMRI): the map still passes dciodvfy
    (General Series Laterality, type 2C, present and empty), one map per time point."""
    from node.series.load import load_volumes

    vols = load_volumes(sorted(shared_series("mr_fmri_philips_3volumes").glob("*.dcm")))
    assert len(vols) == 3
    for k, vol in enumerate(vols):
        out, sigma = _derive(vol, DeriveConfig(uncertainty=UncertaintyObject.PARAMETRIC_MAP))
        pm = pydicom.dcmread(_written(out.uncertainty[0], tmp_path / f"PM{k}.dcm", warnings_too=False))
        assert np.array_equal(pm.pixel_array, sigma)
        refs = [it.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID
                for it in pm.PerFrameFunctionalGroupsSequence]
        assert refs == [d.SOPInstanceUID for d in out.derived]


def test_the_maps_window_spans_the_new_slices_not_only_the_acquired_ones(phantom: SeriesVolume) -> None:
    """x2 through-plane: every 2nd derived slice is an acquired one, where sigma is small. The window was taken on
    every 2nd slice only, i.e. on the acquired slices alone: on the shared Philips fMRI it said 0-1 a.u. while the new
    slices' sigma reached 570-2400, and a viewer (and the preview) showed every new slice saturated, air included."""
    factors = Factors(2, 1)
    shape = SigmaCubic().upscale(phantom.to_engine_input(), factors).data.shape
    sigma = np.full(shape, 0.05, np.float32)  # acquired slices (even k): nearly sure
    sigma[1::2] = np.linspace(500, 2400, sigma[1::2].size, dtype=np.float32).reshape(sigma[1::2].shape)
    out, _ = _derive(phantom, DeriveConfig(), sigma=sigma)
    (pm,) = out.uncertainty
    want = float(np.percentile(sigma[:, ::4, ::4], 99))
    voi = pm.SharedFunctionalGroupsSequence[0].FrameVOILUTSequence[0]
    assert float(voi.WindowCenter) * 2 == pytest.approx(float(voi.WindowWidth))
    assert float(voi.WindowWidth) == pytest.approx(want, rel=0.05), (voi.WindowWidth, want)
