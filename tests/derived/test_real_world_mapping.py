"""Philips MR images carry a private ScaleSlope (2005,100E): a quantitative reader (dcm2niix's "Philips precise
float", nibabel) takes their values as FP = (SV * RS + RI) / (RS * SS). The derived series copied no private element,
so the same reader got the input in FP units and the derived in displayed units: measured 180.9x apart on the shared
fMRI (RS 1.29035, SS 0.0042840), exit 0, valid to dciodvfy. An input's standard RealWorldValueMappingSequence was
dropped alike. Now every derived slice states the input's mapping, restated in its own stored values
(RealWorldValueMappingSequence, PS3.3 C.7.6.16.2.11.1), and the job's note says so; images of one volume stating
different mappings (a ScaleSlope per slice) are refused, naming them."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence

from node.app.check_cmd import check_folders
from node.errors import VolumeError
from node.series import load_volumes
from tests.support.fixtures import shared_series
from tests.support.peers import dciodvfy

FMRI = "mr_fmri_philips_3volumes"
PHILIPS = "Philips MR Imaging DD 001"


def _philips_fp(ds: Dataset) -> np.ndarray:
    """What a Philips-aware reader (dcm2niix, nibabel) reads: FP = (SV * RS + RI) / (RS * SS)."""
    sv = ds.pixel_array.astype(np.float64)
    rs, ri = float(ds.get("RescaleSlope", 1)), float(ds.get("RescaleIntercept", 0))
    ss = float(ds.private_block(0x2005, PHILIPS)[0x0E].value)
    return (sv * rs + ri) / (rs * ss)


def _rwvm(ds: Dataset) -> np.ndarray:
    """A standard reader: the first RealWorldValueMappingSequence item applied to the stored values."""
    item = ds.RealWorldValueMappingSequence[0]
    sv = ds.pixel_array.astype(np.float64)
    assert item.RealWorldValueFirstValueMapped <= sv.min() and sv.max() <= item.RealWorldValueLastValueMapped
    return sv * float(item.RealWorldValueSlope) + float(item.RealWorldValueIntercept)


def _process(src: Path, out: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "node.app.cli", "process", str(src), str(out), "--engine", "cubic",
                           "--no-preview", "--quiet"], capture_output=True, text=True, timeout=300)


def _by_position(files: list[Path]) -> dict[tuple[float, ...], Dataset]:
    out = {}
    for f in files:
        ds = pydicom.dcmread(f)
        out[tuple(round(float(v), 2) for v in ds.ImagePositionPatient)] = ds
    return out


def _volume_one(src: Path, tmp_path: Path, edit=None) -> list[Path]:  # type: ignore[no-untyped-def]
    """The first time point (9 slices) of the shared fMRI, each slice edited by ``edit(k, ds)``."""
    dst = tmp_path / "in"
    dst.mkdir(parents=True, exist_ok=True)
    files = []
    for k, f in enumerate(sorted(src.glob("*_0001_*.dcm"))):
        if edit is None:
            shutil.copy(f, dst / f.name)
        else:
            ds = pydicom.dcmread(f)
            edit(k, ds)
            ds.save_as(dst / f.name)
        files.append(dst / f.name)
    return files


def test_the_derived_series_states_the_philips_scale_as_a_real_world_mapping(tmp_path: Path) -> None:
    src = shared_series(FMRI)
    files = _volume_one(src, tmp_path)
    out = tmp_path / "out"
    r = _process(files[0].parent, out)
    assert r.returncode == 0, r.stdout + r.stderr
    derived = sorted(out.rglob("derived*/*.dcm"))
    note = "Philips ScaleSlope (2005,100E) of the input restated as RealWorldValueMappingSequence PHILIPS_FP"
    assert note in pydicom.dcmread(derived[0]).DerivationDescription
    assert len(derived) == 17
    at = _by_position(derived)
    matched = 0
    for f in files:  # cubic x2 through-plane, x1 in-plane: the acquired slices are kept exactly
        ds = pydicom.dcmread(f)
        d = at[tuple(round(float(v), 2) for v in ds.ImagePositionPatient)]
        want, got = _philips_fp(ds), _rwvm(d)
        np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-9)  # before: want / got = 180.9
        matched += 1
    assert matched == 9
    item = at[next(iter(at))].RealWorldValueMappingSequence[0]
    assert item.LUTLabel == "PHILIPS_FP" and item.MeasurementUnitsCodeSequence[0].CodeValue == "1"
    errors, warnings = dciodvfy(derived[0])
    assert not errors, errors
    assert not [w for w in warnings if "0x0040,0x9" in w or "Real World" in w], warnings


def test_an_input_real_world_mapping_is_restated_in_the_derived_stored_values(tmp_path: Path) -> None:
    """A standard RWVM (stored values -> ms, say) on every slice, and a rescale that differs per slice (so the
    derived series has a rescale of its own): the derived real-world values equal the input's at the acquired
    slices within one derived stored step."""
    def edit(k: int, ds: Dataset) -> None:
        del ds[0x2005, 0x100E]  # the standard mapping alone
        ds.RescaleSlope = f"{1.0 + 0.25 * k:g}"
        item = Dataset()
        item.RealWorldValueFirstValueMapped = 0
        item.RealWorldValueLastValueMapped = 4095
        # real = stored * m + b with m / RS the same on every slice: one line of modality values
        item.RealWorldValueSlope = 0.5 * (1.0 + 0.25 * k)
        item.RealWorldValueIntercept = -3.0
        item.LUTExplanation, item.LUTLabel = "T2 map", "T2"
        unit = Dataset()
        unit.CodeValue, unit.CodingSchemeDesignator, unit.CodeMeaning = "ms", "UCUM", "millisecond"
        item.MeasurementUnitsCodeSequence = Sequence([unit])
        ds.RealWorldValueMappingSequence = Sequence([item])

    files = _volume_one(shared_series(FMRI), tmp_path, edit)
    out = tmp_path / "out"
    r = _process(files[0].parent, out)
    assert r.returncode == 0, r.stdout + r.stderr
    at = _by_position(sorted(out.rglob("derived*/*.dcm")))
    for f in files:
        ds = pydicom.dcmread(f)
        d = at[tuple(round(float(v), 2) for v in ds.ImagePositionPatient)]
        want, got = _rwvm(ds), _rwvm(d)
        step = 0.5 * float(d.RescaleSlope)  # one derived stored step, in ms
        assert float(np.abs(got - want).max()) <= step / 2 + 1e-9
        item = d.RealWorldValueMappingSequence[0]
        assert (item.LUTLabel, item.MeasurementUnitsCodeSequence[0].CodeValue) == ("T2", "ms")


@pytest.mark.parametrize("implicit", [False, True])
def test_a_scale_slope_that_differs_between_slices_of_one_volume_is_refused(tmp_path: Path, implicit: bool) -> None:
    def edit(k: int, ds: Dataset) -> None:
        if k in (3, 6):
            ds.private_block(0x2005, PHILIPS)[0x0E].value = 0.002
        if implicit:
            ds.file_meta.TransferSyntaxUID = pydicom.uid.ImplicitVRLittleEndian

    files = _volume_one(shared_series(FMRI), tmp_path, edit)
    with pytest.raises(VolumeError) as exc:
        load_volumes(files)
    msg = str(exc.value)
    assert "2 different real-world value mappings" in msg and "Philips ScaleSlope (2005,100E)" in msg, msg
    assert "7 image(s)" in msg and "2 image(s)" in msg and files[3].name in msg, msg
    out = tmp_path / "out"
    r = _process(files[0].parent, out)
    assert r.returncode == 1 and "different real-world value mappings" in r.stdout, r.stdout + r.stderr
    assert not list(out.rglob("*.dcm"))


def test_the_implicit_vr_scale_slope_is_read(tmp_path: Path) -> None:
    """In implicit VR the private element carries no VR: its 4 bytes are read as FL."""
    def edit(k: int, ds: Dataset) -> None:
        ds.file_meta.TransferSyntaxUID = pydicom.uid.ImplicitVRLittleEndian

    files = _volume_one(shared_series(FMRI), tmp_path, edit)
    raw = pydicom.dcmread(files[0])
    vols = load_volumes(files)
    assert len(vols) == 1 and len(vols[0].real_world) == 1, raw
    rs, ss = 1.29035409035409, 0.004284040071070194
    assert vols[0].real_world[0].a == pytest.approx(1 / (rs * ss), rel=1e-6)


def test_srnode_check_fails_a_derived_series_without_the_input_mapping(tmp_path: Path) -> None:
    """A derived series made before this fix (no RealWorldValueMappingSequence): ``srnode check`` said OK, its
    values equal the input's displayed values. Simulated exactly: the mapping removed from the derived slices."""
    files = _volume_one(shared_series(FMRI), tmp_path)
    out = tmp_path / "out"
    assert _process(files[0].parent, out).returncode == 0
    result = check_folders(files[0].parent, out, run_dciodvfy=False)
    assert result.ok, result.lines()
    assert "real-world value mapping of the input stated alike" in result.lines()[0]
    derived = sorted(out.rglob("derived*/*.dcm"))
    for f in derived[:1]:
        ds = pydicom.dcmread(f)
        del ds.RealWorldValueMappingSequence
        ds.save_as(f)
    result = check_folders(files[0].parent, out, run_dciodvfy=False)
    assert not result.ok
    assert "real = 180.9 x value + 0" in result.lines()[0] and "does not state" in result.lines()[0], result.lines()
    ds = pydicom.dcmread(derived[0])
    item = pydicom.dcmread(derived[1]).RealWorldValueMappingSequence
    item[0].RealWorldValueSlope = float(item[0].RealWorldValueSlope) * 1.01
    ds.RealWorldValueMappingSequence = item
    ds.save_as(derived[0])
    result = check_folders(files[0].parent, out, run_dciodvfy=False)
    assert not result.ok and "states otherwise" in result.lines()[0], result.lines()


def test_the_parametric_map_gives_sigma_in_the_real_world_units_too(tmp_path: Path) -> None:
    """The map's sigma is in modality (displayed) units; a Philips-aware reader reads the derived values in FP: the
    map adds a mapping per derived real-world mapping, slope |a| (180.9 here), and dciodvfy is clean."""
    from node.config import load_config
    from node.process import process_series
    from tests.support.engines import SIGMA_TEST_ENGINE, sigma_engines

    files = _volume_one(shared_series(FMRI), tmp_path)
    cfg = load_config(None)
    res = process_series(files, cfg.rules[0], cfg, tmp_path / "out", engine_name=SIGMA_TEST_ENGINE,
                         engines=sigma_engines())
    pm = pydicom.dcmread(res.uncertainty_files[0])
    d0 = pydicom.dcmread(res.derived_files[0])
    maps = pm.SharedFunctionalGroupsSequence[0].RealWorldValueMappingSequence
    assert [str(m.LUTLabel) for m in maps][1:] == ["PHILIPS_FP_SD"]
    derived_a = float(d0.RealWorldValueMappingSequence[0].RealWorldValueSlope) / float(d0.RescaleSlope)
    assert float(maps[1].RealWorldValueSlope) == pytest.approx(derived_a * float(maps[0].RealWorldValueSlope))
    assert float(maps[1].RealWorldValueIntercept) == 0.0
    errors, _ = dciodvfy(res.uncertainty_files[0])
    assert not errors, errors


def test_an_enhanced_objects_per_frame_mapping_is_carried(tmp_path: Path) -> None:
    """The shared enhanced MR (96 frames) with a mapping in each frame's functional groups (where enhanced objects
    state it): every derived classic slice states it; ``srnode check`` OK, dciodvfy clean."""
    ds = pydicom.dcmread(sorted(shared_series("mr_t1_enhanced_multiframe_siemens_xa30").glob("*.dcm"))[0])
    for group in ds.PerFrameFunctionalGroupsSequence:
        item = Dataset()
        item.RealWorldValueFirstValueMapped, item.RealWorldValueLastValueMapped = 0, 4095
        item.RealWorldValueSlope, item.RealWorldValueIntercept = 0.25, 10.0
        item.LUTLabel, item.LUTExplanation = "T1", "T1 in ms"
        unit = Dataset()
        unit.CodeValue, unit.CodingSchemeDesignator, unit.CodeMeaning = "ms", "UCUM", "millisecond"
        item.MeasurementUnitsCodeSequence = Sequence([unit])
        group.RealWorldValueMappingSequence = Sequence([item])
    (tmp_path / "in").mkdir()
    ds.save_as(tmp_path / "in" / "MF.dcm", enforce_file_format=True)
    out = tmp_path / "out"
    assert _process(tmp_path / "in", out).returncode == 0
    derived = sorted(out.rglob("derived/*.dcm"))
    assert len(derived) == 191
    item = pydicom.dcmread(derived[0]).RealWorldValueMappingSequence[0]
    assert (float(item.RealWorldValueSlope), float(item.RealWorldValueIntercept), item.LUTLabel) == (0.25, 10.0, "T1")
    result = check_folders(tmp_path / "in", out)
    assert result.ok and "real-world value mapping of the input stated alike" in result.lines()[0], result.lines()


def test_a_piecewise_input_mapping_is_not_restated_as_lines_over_every_value(tmp_path: Path) -> None:
    """Two linear items over different ranges of stored values (0-2000 x1, 2001-4095 x3: one piecewise mapping,
    PS3.3 C.7.6.16.2.11.1.1). Before (review18): both restated as lines over the derived series' whole stored
    range, same label: a reader taking the second item read the values under 2001 3x off (and one taking the
    first, those above), exit 0, ``srnode check`` OK. Now neither is restated, the derivation note says why, and
    ``srnode check`` (which no longer expects the pieces) is OK."""
    def edit(k: int, ds: Dataset) -> None:
        del ds[0x2005, 0x100E]
        items = []
        for lo, hi, m in ((0, 2000, 1.0), (2001, 4095, 3.0)):
            item = Dataset()
            item.RealWorldValueFirstValueMapped, item.RealWorldValueLastValueMapped = lo, hi
            item.RealWorldValueSlope, item.RealWorldValueIntercept = m, 0.0
            item.LUTExplanation, item.LUTLabel = "piecewise", "PW"
            items.append(item)
        ds.RealWorldValueMappingSequence = Sequence(items)

    files = _volume_one(shared_series(FMRI), tmp_path, edit)
    out = tmp_path / "out"
    r = _process(files[0].parent, out)
    assert r.returncode == 0, r.stdout + r.stderr
    derived = sorted(out.rglob("derived*/*.dcm"))
    d = pydicom.dcmread(derived[0])
    assert "RealWorldValueMappingSequence" not in d  # before: 2 items, each over every derived value
    assert "given piecewise (items over different ranges of stored values): not carried" in d.DerivationDescription
    result = check_folders(files[0].parent, out, run_dciodvfy=False)
    assert result.ok, result.lines()
