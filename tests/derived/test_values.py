"""What a reader of the derived series sees: every value held (one rescale for slices that had their own), the
source's grey-scale polarity, window, character set and names, and a SliceThickness the output really has."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
import pytest

from models.cubic import CubicEngine
from models.engine import ENGINES, EngineError, EngineOptions, EngineResult, Factors, VolumeInput
from node.app.phantom import phantom_hu, write_phantom_series
from node.config import DeriveConfig, UncertaintyObject, load_config
from node.derived import DerivedObjects, derive_series, rejection_note
from node.process import EngineCache, process_series, write_atomic
from node.series import SeriesVolume, load_series
from tests.support.engines import SIGMA_TEST_ENGINE, SigmaCubic, sigma_engines
from tests.support.fixtures import shared_case
from tests.support.peers import dciodvfy

CFG = DeriveConfig()


def _derive(vol: SeriesVolume, f: int = 2, g: int = 1, cfg: DeriveConfig = CFG) -> DerivedObjects:
    """Cubic values with a sigma (``tests.support.engines.SigmaCubic``): the uncertainty objects are made too."""
    factors = Factors(f, g)
    return derive_series(vol, SigmaCubic().upscale(vol.to_engine_input(), factors), factors, cfg,
                         CubicEngine.version)


def _write(objs: list[pydicom.Dataset], folder: Path) -> list[Path]:
    paths = []
    for k, ds in enumerate(objs):
        paths.append(folder / f"{k:04d}.dcm")
        write_atomic(ds, paths[-1])
    return paths


def _no_errors(paths: list[Path]) -> None:
    """dciodvfy: 0 errors on the first, middle and last file."""
    for p in {paths[0], paths[len(paths) // 2], paths[-1]}:
        errors, _ = dciodvfy(p)
        assert not errors, f"{p.name}: {errors}"


def _edit(files: list[Path], **attrs: object) -> None:
    for f in files:
        ds = pydicom.dcmread(f)
        for k, v in attrs.items():
            setattr(ds, k, v)
        ds.save_as(f, enforce_file_format=True)


# ------------------------------------------------------------------ 1. one output rescale holds every slice's values


def _per_slice_slope_series(folder: Path, slices: int = 6) -> list[Path]:
    """MR-like positive values stored as Philips does: each slice with slope = its own max / 4095 (12 bits)."""
    files = write_phantom_series(folder, slices=slices, size=32, step_mm=3.0, fov_mm=200.0)
    vals = phantom_hu(slices, 32, 3.0, 200.0) + 1024.0
    vals[0] = np.clip(vals[0], 0, 19.0)  # an edge slice of low values: its slope is the finest
    for k, f in enumerate(files):
        ds = pydicom.dcmread(f)
        slope = max(float(vals[k].max()), 1.0) / 4095.0
        ds.Modality, ds.SOPClassUID = "MR", pydicom.uid.MRImageStorage
        ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
        ds.PixelData = np.clip(np.rint(vals[k] / slope), 0, 4095).astype(np.uint16).tobytes()
        ds.RescaleSlope, ds.RescaleIntercept = f"{slope:.10g}", "0"
        del ds.RescaleType, ds.KVP
        ds.ScanningSequence, ds.SequenceVariant, ds.ScanOptions, ds.MRAcquisitionType = "GR", "SP", "", "3D"
        ds.RepetitionTime, ds.EchoTime, ds.EchoTrainLength = "2000", "3", 1
        ds.save_as(f, enforce_file_format=True)
    return files


def _check_values(vin: SeriesVolume, derived: list[Path], f: int) -> float:
    """Max |derived - input| at the acquired positions; asserts it is within the output's stored-value rounding."""
    out = load_series(derived)
    slope = float(pydicom.dcmread(derived[0], stop_before_pixels=True).get("RescaleSlope", 1))
    assert {float(pydicom.dcmread(p, stop_before_pixels=True).get("RescaleSlope", 1)) for p in derived} == {slope}
    err = float(np.max(np.abs(out.data[::f] - vin.data)))
    assert err <= slope / 2 + 1e-3 * max(1.0, float(np.abs(vin.data).max()) / 1000), (err, slope)
    assert float(out.data.max()) == pytest.approx(float(vin.data.max()), abs=slope / 2 + 1e-3)
    return err


def test_per_slice_rescale_synthetic_is_not_clipped(tmp_path: Path) -> None:
    files = _per_slice_slope_series(tmp_path / "in")
    vin = load_series(files)
    assert vin.formats[0].slope < 0.005 < vin.formats[1].slope  # the first slice alone would clip at 19
    objs = _derive(vin, 2)
    paths = _write(objs.derived, tmp_path / "out")
    _check_values(vin, paths, 2)
    assert any("rescale varies between slices" in n for n in objs.notes)
    assert "one rescale" in objs.derived[0].DerivationDescription
    _no_errors(paths)


def test_per_slice_bits_stored_ct_keeps_its_rescale_and_exact_hu(tmp_path: Path) -> None:
    files = write_phantom_series(tmp_path / "in", slices=4, size=32, step_mm=5.0, fov_mm=200.0)
    ds = pydicom.dcmread(files[2])  # this slice saved with 16 bits, holding metal at 5000 HU
    stored = ds.pixel_array.copy()
    stored[10:14, 10:14] = 5000 + 1024
    ds.PixelData, ds.BitsStored, ds.HighBit = stored.tobytes(), 16, 15
    ds.save_as(files[2], enforce_file_format=True)
    vin = load_series(files)
    objs = _derive(vin, 2)
    paths = _write(objs.derived, tmp_path / "out")
    back = load_series(paths)
    assert np.max(np.abs(back.data[::2] - vin.data)) == 0.0  # same rescale: the stored values are the input's
    assert float(back.data.max()) == 5000.0
    d0 = objs.derived[0]
    # the widest input format (16 bits): what any of its slices could hold, the derived series can hold
    assert (float(d0.RescaleSlope), float(d0.RescaleIntercept), int(d0.BitsStored)) == (1.0, -1024.0, 16)
    _no_errors(paths)


def test_case_01_per_slice_slope(tmp_path: Path) -> None:
    files = shared_case("01-per-slice-rescale-slope", tmp_path / "in")
    vin = load_series(files)
    cfg = load_config(None)
    res = process_series(files, cfg.rules[0], cfg, tmp_path / "out", engine_name="cubic")
    f = cfg.rules[0].through_plane_factor
    err = _check_values(vin, res.derived_files, f)
    assert err < 0.01 and float(vin.data.max()) == pytest.approx(708.0, abs=0.1)  # was clipped at 19.0
    # 6. the window is the series' (median of the 20 slices' windows), not the noise slice's 9/19
    heads = [pydicom.dcmread(p, stop_before_pixels=True) for p in files]
    want = (float(np.median([float(h.WindowCenter) for h in heads])),
            float(np.median([float(h.WindowWidth) for h in heads])))
    d0 = pydicom.dcmread(res.derived_files[0], stop_before_pixels=True)
    assert (float(d0.WindowCenter), float(d0.WindowWidth)) == pytest.approx(want)
    assert (float(vin.datasets[0].WindowCenter), float(vin.datasets[0].WindowWidth)) != pytest.approx(want)
    _no_errors(res.derived_files)


# ------------------------------------------------------------------ 4. grey-scale polarity of the source


def test_monochrome1_stays_monochrome1(tmp_path: Path) -> None:
    files = write_phantom_series(tmp_path / "in", slices=4, size=32, step_mm=5.0, fov_mm=200.0)
    _edit(files, PhotometricInterpretation="MONOCHROME1")
    vin = load_series(files)
    objs = _derive(vin, 2)
    paths = _write(objs.derived, tmp_path / "out")
    for p in paths:
        ds = pydicom.dcmread(p, stop_before_pixels=True)
        assert ds.PhotometricInterpretation == "MONOCHROME1"
        assert (float(ds.WindowCenter), float(ds.WindowWidth)) == (40.0, 80.0)
    assert np.max(np.abs(load_series(paths).data[::2] - vin.data)) == 0.0
    _no_errors(paths)


def test_case_04_monochrome1(tmp_path: Path) -> None:
    files = shared_case("04-monochrome1", tmp_path / "in")
    cfg = load_config(None)
    res = process_series(files, cfg.rules[0], cfg, tmp_path / "out", engine_name="cubic")
    kinds = {pydicom.dcmread(p, stop_before_pixels=True).PhotometricInterpretation for p in res.derived_files}
    assert kinds == {"MONOCHROME1"}
    _no_errors(res.derived_files)


# ------------------------------------------------------------------ 5. character set and names, on every object

NAMES = {"PatientName": "Dürr^Jürgen", "ReferringPhysicianName": "山田^太郎"}


def _raw(path: Path, keyword: str) -> bytes:
    """The element's bytes as stored in the file (before any decoding)."""
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    return bytes(ds.get_item(keyword).value)


def _check_names(sources: list[Path], written: list[Path]) -> None:
    charset = pydicom.dcmread(sources[0], stop_before_pixels=True).SpecificCharacterSet
    for p in written:
        ds = pydicom.dcmread(p, stop_before_pixels=True)
        assert ds.get("SpecificCharacterSet") == charset, p
        for kw in NAMES:
            assert _raw(p, kw) == _raw(sources[0], kw), (p, kw)
        errors, _ = dciodvfy(p)
        assert not [e for e in errors if "repertoire" in e.lower()], errors
        assert not errors, f"{p.name}: {errors}"


def test_utf8_names_identical_in_derived_uncertainty_and_rejection_note(tmp_path: Path) -> None:
    files = write_phantom_series(tmp_path / "in", slices=3, size=32, step_mm=5.0, fov_mm=200.0)
    _edit(files, SpecificCharacterSet="ISO_IR 192", **NAMES)
    objs = _derive(load_series(files), 2, cfg=DeriveConfig(uncertainty=UncertaintyObject.BOTH))
    derived = _write(objs.derived, tmp_path / "derived")
    sigma = _write(objs.uncertainty, tmp_path / "sigma")  # the Parametric Map and the SC card
    assert len(sigma) == 2
    note = rejection_note([*derived, *sigma], CFG, tmp_path / "ko", "test: superseded")
    assert pydicom.dcmread(note).PatientName == NAMES["PatientName"]
    _check_names(files, [derived[0], derived[-1], sigma[0], sigma[-1], note])


def test_case_03_utf8_names(tmp_path: Path) -> None:
    files = shared_case("03-utf8-patient-name", tmp_path / "in")
    cfg = load_config(None)
    res = process_series(files, cfg.rules[0], cfg, tmp_path / "out", engine_name=SIGMA_TEST_ENGINE,
                         engines=sigma_engines())
    note = rejection_note(res.derived_files + res.uncertainty_files, CFG, tmp_path / "ko", "test: superseded")
    _check_names(files, [res.derived_files[0], res.uncertainty_files[0], res.uncertainty_files[-1], note])


# ------------------------------------------------------------------ 6. the series' window, not the first slice's


def test_window_from_the_whole_series(tmp_path: Path) -> None:
    files = write_phantom_series(tmp_path / "in", slices=5, size=32, step_mm=5.0, fov_mm=200.0)
    _edit(files[:1], WindowCenter=11, WindowWidth=22)
    objs = _derive(load_series(files), 2)
    assert {(float(d.WindowCenter), float(d.WindowWidth)) for d in objs.derived} == {(40.0, 80.0)}


# ------------------------------------------------------------------ 7. SliceThickness: what the output has


class _BrokenEngine:
    """A real engine registered under its own name that always fails: the node falls back to cubic."""

    name = "broken-for-test"
    version = "0"

    def __init__(self, options: EngineOptions) -> None:
        self.options = options

    def upscale(self, volume: VolumeInput, factors: Factors) -> EngineResult:
        raise EngineError("weights file is corrupt")


@pytest.mark.parametrize("engine", ["cubic", _BrokenEngine.name])
def test_slice_thickness_stays_acquired_at_the_new_step(tmp_path: Path, engine: str) -> None:
    files = write_phantom_series(tmp_path / "in", slices=4, size=32, step_mm=5.0, fov_mm=200.0)
    _edit(files, SliceThickness="3")  # 3 mm slices every 5 mm
    cfg = load_config(None)
    res = process_series(files, cfg.rules[0], cfg, tmp_path / "out", engine_name=engine,
                         engines=EngineCache({**ENGINES, _BrokenEngine.name: _BrokenEngine}))
    assert res.engine == "cubic"
    f = cfg.rules[0].through_plane_factor
    for p in res.derived_files:
        ds = pydicom.dcmread(p, stop_before_pixels=True)
        assert float(ds.SliceThickness) == 3.0  # not the 2.5 mm step: the slices are not thinner
        assert float(ds.SpacingBetweenSlices) == pytest.approx(5.0 / f)
    _no_errors(res.derived_files)
