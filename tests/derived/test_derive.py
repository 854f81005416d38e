"""Derived series + uncertainty map: geometry, HU fidelity, UIDs, references, dciodvfy, strict round-trip."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom import config as pydicom_config

from models.cubic import CubicEngine
from models.engine import ENGINES, EngineError, EngineOptions, EngineResult, Factors, VolumeInput
from node.app.phantom import write_phantom_series
from node.config import DeriveConfig, load_config
from node.derived import DerivedObjects, derive_series
from node.process import EngineCache, process_series, write_atomic
from node.series import SeriesVolume, load_series, regular_runs
from tests.support.fixtures import shared_series
from tests.support.peers import dciodvfy
from tests.support.series import phantom_stack, variant

CFG = DeriveConfig()


@pytest.fixture(scope="module")
def phantom(tmp_path_factory: pytest.TempPathFactory) -> SeriesVolume:
    d = tmp_path_factory.mktemp("phantom")
    return load_series(write_phantom_series(d, slices=10, size=64, step_mm=3.0, fov_mm=200.0))


def _derive(vol: SeriesVolume, f: int, g: int, cfg: DeriveConfig = CFG, sigma: bool = False) -> DerivedObjects:
    """Cubic; ``sigma``: as an engine with an uncertainty (a ramp 0..50 over the voxels)."""
    factors = Factors(f, g)
    res = CubicEngine().upscale(vol.to_engine_input(), factors)
    if sigma:
        res.has_sigma = True
        res.sigma = np.linspace(0, 50, res.data.size, dtype=np.float32).reshape(res.data.shape)
    return derive_series(vol, res, factors, cfg, CubicEngine.version)


def _crop(vol: SeriesVolume, n: int = 64, slices: int | None = None) -> SeriesVolume:
    """Top-left n x n (the first pixel, hence every IPP, is unchanged) and optionally the first slices."""
    z = slices or vol.shape[0]
    return dataclasses.replace(vol, data=vol.data[:z, :n, :n].copy(), positions=vol.positions[:z],
                               datasets=vol.datasets[:z], frame_numbers=vol.frame_numbers[:z],
                               formats=vol.formats[:z], names=vol.names[:z], steps=vol.steps[: max(z - 1, 0)])


def _ipp(ds: pydicom.Dataset) -> np.ndarray:
    return np.array([float(v) for v in ds.ImagePositionPatient])


@pytest.fixture()
def strict() -> Iterator[None]:
    old = pydicom_config.settings.reading_validation_mode
    pydicom_config.settings.reading_validation_mode = pydicom_config.RAISE
    yield
    pydicom_config.settings.reading_validation_mode = old


def test_through_plane_geometry_and_hu(phantom: SeriesVolume, tmp_path: Path) -> None:
    out = _derive(phantom, 3, 1)
    d = out.derived
    n, s = phantom.shape[0], phantom.spacing[0]
    assert len(d) == (n - 1) * 3 + 1 and out.uncertainty == [] and out.uncertainty_series_uid == ""  # cubic: no sigma
    assert _ipp(d[0]) == pytest.approx(phantom.positions[0], abs=1e-4)
    assert _ipp(d[-1]) == pytest.approx(phantom.positions[-1], abs=1e-4)
    steps = np.diff([_ipp(x)[2] for x in d])
    assert steps == pytest.approx(np.full(len(d) - 1, s / 3), abs=1e-4)
    # the new step is the sampling (SpacingBetweenSlices); SliceThickness stays the acquired 3 mm (cubic)
    assert float(d[0].SliceThickness) == pytest.approx(3.0) and float(d[0].SpacingBetweenSlices) == pytest.approx(1)
    assert [float(v) for v in d[0].PixelSpacing] == pytest.approx([phantom.spacing[1], phantom.spacing[2]])
    assert all(_ipp(x)[:2] == pytest.approx(phantom.positions[0][:2], abs=1e-4) for x in d)  # on the slice line
    # HU at the original positions (through the written files): within 1 HU for cubic
    files = []
    for k, ds in enumerate(d):
        files.append(tmp_path / f"d{k}.dcm")
        write_atomic(ds, files[-1])
    back = load_series(files)
    assert np.max(np.abs(back.data[::3] - phantom.data)) <= 1.0
    assert d[0].RescaleIntercept == phantom.datasets[0].RescaleIntercept
    assert float(d[0].WindowCenter) == 40 and float(d[0].WindowWidth) == 80  # window carried over


def test_in_plane_geometry(phantom: SeriesVolume) -> None:
    vol = _crop(phantom, 32, slices=4)
    out = _derive(vol, 1, 2)
    d = out.derived
    assert len(d) == 4 and (d[0].Rows, d[0].Columns) == (64, 64)
    dy, dx = vol.spacing[1], vol.spacing[2]
    assert [float(v) for v in d[0].PixelSpacing] == pytest.approx([dy / 2, dx / 2])
    # first pixel centre moves back by a quarter input pixel along rows and columns
    want = vol.positions[0] - 0.25 * (dx * vol.row_cosine + dy * vol.col_cosine)
    assert _ipp(d[0]) == pytest.approx(want, abs=1e-4)
    assert float(d[0].SliceThickness) == pytest.approx(vol.slice_thickness)


def test_uids_new_deterministic_and_references(phantom: SeriesVolume) -> None:
    vol = _crop(phantom, 16)
    a, b = _derive(vol, 2, 1, sigma=True), _derive(vol, 2, 1, sigma=True)
    assert [x.SOPInstanceUID for x in a.derived] == [x.SOPInstanceUID for x in b.derived]
    assert a.derived_series_uid == b.derived_series_uid != vol.series_uid
    assert a.uncertainty_series_uid not in (a.derived_series_uid, vol.series_uid)
    assert _derive(vol, 3, 1).derived_series_uid != a.derived_series_uid  # other factors: other series
    inputs = {ds.SOPInstanceUID for ds in vol.datasets}
    assert not inputs & {x.SOPInstanceUID for x in a.derived}
    assert all(str(x.SOPInstanceUID).startswith(CFG.uid_root) for x in a.derived + a.uncertainty)
    d0, d1 = a.derived[0], a.derived[1]
    assert d0.StudyInstanceUID == vol.datasets[0].StudyInstanceUID
    assert d0.FrameOfReferenceUID == vol.datasets[0].FrameOfReferenceUID
    assert list(d0.ImageType)[:2] == ["DERIVED", "SECONDARY"]
    assert d0.SourceImageSequence[0].ReferencedSOPInstanceUID == vol.datasets[0].SOPInstanceUID
    assert {r.ReferencedSOPInstanceUID for r in d1.SourceImageSequence} == {ds.SOPInstanceUID for ds in vol.datasets[:2]}
    assert d0.ReferencedSeriesSequence[0].SeriesInstanceUID == vol.series_uid
    assert "srnode" in d0.DerivationDescription and "cubic" in d0.DerivationDescription
    assert d0.ContributingEquipmentSequence[0].Manufacturer == "srnode"
    assert d0.SeriesDescription == f"Head phantom 3 mm{CFG.series_description_suffix} x2 cubic - {CFG.caution}"
    assert int(d0.SeriesNumber) % CFG.series_number_offset == int(vol.datasets[0].SeriesNumber)  # labels.py
    assert [x.SOPInstanceUID for x in a.uncertainty] == [x.SOPInstanceUID for x in b.uncertainty]
    (pm,) = a.uncertainty  # the default: one Parametric Map
    assert pm.StudyInstanceUID == d0.StudyInstanceUID and pm.SeriesInstanceUID == a.uncertainty_series_uid
    assert pm.FrameOfReferenceUID == d0.FrameOfReferenceUID
    frame0 = pm.PerFrameFunctionalGroupsSequence[0]
    assert frame0.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID == d0.SOPInstanceUID
    assert pm.ReferencedSeriesSequence[0].SeriesInstanceUID == a.derived_series_uid


def _check_files(objs: DerivedObjects, tmp_path: Path) -> None:
    """dciodvfy reports no error and strict pydicom reads every value back (first, middle, last + one SC)."""
    picks = [objs.derived[0], objs.derived[len(objs.derived) // 2], objs.derived[-1], objs.uncertainty[0]]
    for i, ds in enumerate(picks):
        p = tmp_path / f"o{i}.dcm"
        write_atomic(ds, p)
        errors, _warnings = dciodvfy(p)
        assert not errors, f"{ds.SOPClassUID}: {errors}"
        back = pydicom.dcmread(p)
        for elem in back.iterall():
            _ = elem.value
        declared = {str(it.CodingSchemeDesignator) for it in back.get("CodingSchemeIdentificationSequence", [])}
        used = {str(it.CodingSchemeDesignator) for it in back.get("DerivationCodeSequence", [])}
        assert {d for d in used if d.startswith("99")} <= declared  # private schemes declared (PS3.3 C.12.1.1.4)
        frames = int(ds.get("NumberOfFrames", 1) or 1)
        assert back.pixel_array.shape == ((frames,) if frames > 1 else ()) + (int(ds.Rows), int(ds.Columns))


def test_other_engine_settings_or_weights_give_other_uids(phantom: SeriesVolume, tmp_path: Path) -> None:
    """Re-processing with other settings or weights must not reuse the UIDs of different pixels (a PACS that keeps
    the first copy would show stale pixels under a confirmed delivery); the same settings keep the same UIDs."""
    from models.engine import CpuPrecision, resolved_cpu_precision
    from node.process.engines import settings_digest

    vol = _crop(phantom, 16)
    factors = Factors(2, 1)
    res = CubicEngine().upscale(vol.to_engine_input(), factors)
    base = settings_digest(EngineOptions())
    assert settings_digest(EngineOptions()) == base
    assert settings_digest(EngineOptions(tta_passes=4)) != base
    assert settings_digest(EngineOptions(fast=True)) != base
    # cpu_precision "auto" counts as what it runs as on this CPU: the same UIDs as that value, others than the other
    here = resolved_cpu_precision(CpuPrecision.AUTO)
    there = CpuPrecision.FLOAT32 if here == CpuPrecision.BF16 else CpuPrecision.BF16
    assert base == settings_digest(EngineOptions(cpu_precision=here)) != settings_digest(EngineOptions(cpu_precision=there))
    w = tmp_path / "w.pt"
    w.write_bytes(b"one")
    other = settings_digest(EngineOptions(weights=str(w)))
    w.write_bytes(b"two")  # same path, other bytes
    assert other not in (base, settings_digest(EngineOptions(weights=str(w))))
    uids = {s: [x.SOPInstanceUID for x in derive_series(vol, res, factors, CFG, "v", s).derived]
            for s in (base, settings_digest(EngineOptions(tta_passes=4)))}
    assert uids[base] == [x.SOPInstanceUID for x in derive_series(vol, res, factors, CFG, "v", base).derived]
    assert not set(uids[base]) & set(uids[settings_digest(EngineOptions(tta_passes=4))])


def test_phantom_objects_pass_dciodvfy_and_strict_roundtrip(phantom: SeriesVolume, tmp_path: Path,
                                                            strict: None) -> None:
    _check_files(_derive(_crop(phantom, 32), 2, 2, sigma=True), tmp_path)


def test_ge_tilted_run_objects_valid_and_on_the_tilted_line(tmp_path: Path, strict: None) -> None:
    vol = load_series(sorted(shared_series("ct_head_ge_tilted_irregular").glob("*.dcm")))
    run = _crop(regular_runs(vol)[1], 64, slices=4)
    out = _derive(run, 2, 1, sigma=True)
    # the slice line is tilted 18.5 deg from the normal: derived positions follow it, not the normal
    mid = _ipp(out.derived[1])
    assert mid == pytest.approx((run.positions[0] + run.positions[1]) / 2, abs=1e-3)
    assert float(out.derived[0].SpacingBetweenSlices) == pytest.approx(run.spacing[0] / 2, abs=1e-3)
    assert float(out.derived[0].SliceThickness) == pytest.approx(7.0)  # the run's acquired thickness
    assert "run 2/2" in out.derived[0].SeriesDescription
    _check_files(out, tmp_path)


def test_enhanced_mr_becomes_classic_mr_valid(tmp_path: Path, strict: None) -> None:
    vol = load_series(sorted(shared_series("mr_t1_enhanced_multiframe_siemens_xa30").glob("*.dcm")))
    out = _derive(_crop(vol, 32, slices=5), 2, 1, sigma=True)
    d0 = out.derived[0]
    assert d0.SOPClassUID == pydicom.uid.MRImageStorage
    assert d0.SourceImageSequence[0].ReferencedFrameNumber == vol.frame_numbers[0]
    assert _ipp(d0) == pytest.approx(vol.positions[0], abs=1e-4)
    _check_files(out, tmp_path)


class _BrokenEngine:
    """A real engine registered under its own name that always fails (exercises the fallback path)."""

    name = "broken-for-test"
    version = "0"

    def __init__(self, options: EngineOptions) -> None:
        self.options = options

    def upscale(self, volume: VolumeInput, factors: Factors) -> EngineResult:
        raise EngineError("weights file is corrupt")


def test_engine_failure_falls_back_to_cubic_and_says_so(phantom: SeriesVolume, tmp_path: Path) -> None:
    engines = EngineCache({**ENGINES, _BrokenEngine.name: _BrokenEngine})
    cfg = load_config(None)
    files = [Path(ds.filename) for ds in phantom.datasets[:4]]
    res = process_series(files, cfg.rules[0], cfg, tmp_path / "out", engine_name=_BrokenEngine.name,
                         engines=engines)
    assert res.engine == "cubic" and "broken-for-test failed (weights file is corrupt)" in res.fallback
    ds = pydicom.dcmread(res.derived_files[0], stop_before_pixels=True)
    assert "fallback" in ds.DerivationDescription and "cubic" in ds.DerivationDescription
    assert "fallback" in ds.ContributingEquipmentSequence[0].ContributionDescription
    assert len(res.derived_files) == 7 and res.uncertainty_files == []  # cubic has no sigma: no sigma object


def test_two_pass_mr_stack_derives_one_series_that_reads_back_as_one_volume(tmp_path: Path) -> None:
    """rev12's open end: a 2D MR acquired in two interleaved passes (AcquisitionNumber 1, 2, 1, 2, ... on
    contiguous slices) is one stack; its derived series copied the number of each slice's nearest source
    (1, 1, 2, 2, ...) and so read back as two interleaved acquisitions (the preview refused it: "holds 2
    volumes"). The derived series carries one AcquisitionNumber, the first source image's."""
    src = write_phantom_series(tmp_path / "p", slices=12, size=32, step_mm=3.0, fov_mm=96.0)
    for k, f in enumerate(src):
        ds = pydicom.dcmread(f)
        ds.AcquisitionNumber = 1 + k % 2
        ds.SliceThickness = "3"
        ds.Modality, ds.SOPClassUID = "MR", "1.2.840.10008.5.1.4.1.1.4"
        ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
        ds.save_as(f, enforce_file_format=True)
    vol = load_series(src)
    objs = _derive(vol, 2, 1)
    out = tmp_path / "derived"
    out.mkdir()
    paths = []
    for i, ds in enumerate(objs.derived):
        paths.append(out / f"{i:03d}.dcm")
        ds.save_as(paths[-1], enforce_file_format=True)
    assert {int(pydicom.dcmread(p).AcquisitionNumber) for p in paths} == {int(vol.datasets[0].AcquisitionNumber)}
    back = load_series(paths)
    assert back.shape[0] == 2 * vol.shape[0] - 1


def test_uids_follow_every_setting_that_changes_the_objects(phantom: SeriesVolume) -> None:
    """[derive] caution, suffix, number offset and uncertainty kind change what the objects say (SeriesDescription,
    SeriesNumber): a reprocess after changing one must not send other objects under the same UIDs (two different
    objects under one UID in PACS); the same settings still give the same UIDs."""
    from node.config import UncertaintyObject

    vol = _crop(phantom, 16)

    def uids(objs: DerivedObjects) -> set[str]:
        return {str(x.SOPInstanceUID) for x in objs.derived + objs.uncertainty} | {
            str(x.SeriesInstanceUID) for x in objs.derived + objs.uncertainty}

    both = dataclasses.replace(CFG, uncertainty=UncertaintyObject.BOTH)
    base, base_both = _derive(vol, 2, 1, sigma=True), _derive(vol, 2, 1, both, sigma=True)
    assert uids(base) == uids(_derive(vol, 2, 1, sigma=True))  # the same settings: the same UIDs
    assert uids(base_both) == uids(_derive(vol, 2, 1, both, sigma=True))
    for change in ({"caution": "research only"}, {"series_description_suffix": " HR"},
                   {"series_number_offset": 2000}, {"uid_root": "1.2.826.0.1.3680043.10.1088."}):
        other = _derive(vol, 2, 1, dataclasses.replace(CFG, **change), sigma=True)  # type: ignore[arg-type]
        assert not uids(other) & uids(base), change
    # the card's SeriesNumber depends on whether a Parametric Map is made too: its UIDs follow the kind
    card_only = _derive(vol, 2, 1, dataclasses.replace(CFG, uncertainty=UncertaintyObject.SECONDARY_CAPTURE),
                        sigma=True)
    (card,) = card_only.uncertainty
    card_both = next(x for x in base_both.uncertainty if x.SeriesInstanceUID != base_both.uncertainty_series_uid)
    assert int(card.SeriesNumber) != int(card_both.SeriesNumber)
    assert card.SOPInstanceUID != card_both.SOPInstanceUID and card.SeriesInstanceUID != card_both.SeriesInstanceUID
    # the derived image and the map are the same objects whatever else is made beside them: the same UIDs
    assert base_both.derived_series_uid == base.derived_series_uid
    assert base_both.uncertainty_series_uid == base.uncertainty_series_uid


def test_derivation_description_names_the_settings_and_weights_digest(phantom: SeriesVolume) -> None:
    """A reader comparing two derived series can tell whether the same weights and engine settings made them."""
    factors = Factors(2, 1)
    vol = _crop(phantom, slices=4)
    res = CubicEngine().upscale(vol.to_engine_input(), factors)
    made = derive_series(vol, res, factors, CFG, "1", settings="0123456789abcdef")
    assert "(settings and weights 0123456789abcdef)" in made.derived[0].DerivationDescription
    other = derive_series(vol, res, factors, CFG, "1", settings="fedcba9876543210")
    assert made.derived_series_uid != other.derived_series_uid
    assert "settings and weights" not in _derive(vol, 2, 1).derived[0].DerivationDescription  # cubic has none


def test_a_fallback_reason_names_its_volume_when_a_series_has_several(tmp_path: Path) -> None:
    """A new user's fMRI (3 volumes) showed "internal gain -2.49 dB < 0.30 dB; internal gain -2.50 dB < 0.30 dB":
    two reasons for three volumes (alike ones merged), none saying which volume fell back."""
    def echo(n: int) -> Callable[[pydicom.Dataset, int], None]:
        def change(ds: pydicom.Dataset, k: int) -> None:
            ds.EchoNumbers, ds.EchoTime = n, f"{10.0 * n:.1f}"
        return change

    stack = phantom_stack(tmp_path / "stack")
    files = variant(stack, tmp_path / "in", "e1", echo(1)) + variant(stack, tmp_path / "in", "e2", echo(2))
    engines = EngineCache({**ENGINES, _BrokenEngine.name: _BrokenEngine})
    cfg = load_config(None)
    res = process_series(files, cfg.rules[0], cfg, tmp_path / "out", engine_name=_BrokenEngine.name, engines=engines)
    for vol in ("volume 1/2 (echo 1)", "volume 2/2 (echo 2)"):
        assert f"{vol}: engine broken-for-test failed (weights file is corrupt)" in res.fallback, res.fallback
