"""``srnode process`` on series that are more (or less) than one stack: time points, echoes, a mosaic, a folder
holding an instance twice, a volume too short to super-resolve. What a reader of the output would check."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pydicom
import pytest

from node.app.phantom import write_phantom_series
from tests.support.fixtures import ROOT, shared_series
from tests.support.peers import dciodvfy
from tests.support.series import variant


def srnode(*args: str | Path, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "node.app.cli", *map(str, args)], cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout)


def _headers(folder: Path) -> list[pydicom.Dataset]:
    return [pydicom.dcmread(f, stop_before_pixels=True) for f in sorted(folder.glob("*.dcm"))]


def _series_folders(out: Path) -> dict[str, list[pydicom.Dataset]]:
    """derived*/uncertainty* folder name -> headers, below the one series folder of ``out``."""
    (series,) = [d for d in out.iterdir() if d.is_dir()]
    return {d.name: _headers(d) for d in sorted(series.iterdir()) if d.is_dir()}


def test_fmri_time_points_become_three_derived_series(tmp_path: Path) -> None:
    r = srnode("process", shared_series("mr_fmri_philips_3volumes"), tmp_path / "out", "--engine", "cubic")
    assert r.returncode == 0, r.stdout + r.stderr
    folders = _series_folders(tmp_path / "out")
    assert sorted(folders) == ["derived-vol1", "derived-vol2", "derived-vol3"]  # cubic: no sigma objects
    numbers, uids = set(), set()
    for t in (1, 2, 3):
        der = folders[f"derived-vol{t}"]
        assert len(der) == 17  # 9 slices x2 -> 17
        assert {d.SeriesDescription for d in der} == {f"EPI_asc time {t} SR x2 cubic - not for diagnosis"}
        numbers |= {int(der[0].SeriesNumber)}
        uids |= {der[0].SeriesInstanceUID}
        # each derived series comes from its own time point's 9 images
        sources = {it.ReferencedSOPInstanceUID for d in der for it in d.SourceImageSequence}
        src = [pydicom.dcmread(f, stop_before_pixels=True)
               for f in sorted(shared_series("mr_fmri_philips_3volumes").glob("*.dcm"))]
        assert sources == {s.SOPInstanceUID for s in src if int(s.TemporalPositionIdentifier) == t}
    assert len(numbers) == 3 and len(uids) == 3  # every derived series told apart
    report = json.loads(next((tmp_path / "out").glob("*/report.json")).read_text())
    assert [run["volume"] for run in report["report"]["runs"]] == ["time 1", "time 2", "time 3"]


def test_rule_volumes_first_processes_the_first_volume_only(tmp_path: Path) -> None:
    config = tmp_path / "first.toml"
    config.write_text('[[rules]]\nname = "first-only"\nmatch = { Modality = "MR" }\nvolumes = "first"\n')
    r = srnode("process", shared_series("mr_fmri_philips_3volumes"), tmp_path / "out", "--engine", "cubic",
               "--config", config, "--no-preview")
    assert r.returncode == 0, r.stdout + r.stderr
    folders = _series_folders(tmp_path / "out")
    assert sorted(folders) == ["derived-vol1"]
    assert folders["derived-vol1"][0].SeriesDescription == "EPI_asc time 1 SR x2 cubic - not for diagnosis"
    report = json.loads(next((tmp_path / "out").glob("*/report.json")).read_text())
    assert 'rule volumes = "first": 2 other volume(s) of the series not processed (time 2, time 3)' \
        in report["report"]["notes"]


def test_enhanced_echoes_become_classic_series_valid_for_dciodvfy(tmp_path: Path) -> None:
    r = srnode("process", shared_series("mr_fieldmap_enhanced_2echo_siemens_xa30"), tmp_path / "out", "--engine",
               "cubic", "--no-preview")
    assert r.returncode == 0, r.stdout + r.stderr
    folders = _series_folders(tmp_path / "out")
    assert sorted(folders) == ["derived-vol1", "derived-vol2"]
    assert folders["derived-vol1"][0].SeriesDescription == "gre_field_mapping echo 1 TE 10 SR x2 cubic - not for diagnosis"
    # 64 characters at most (LO): the source description is shortened first, the labels are kept
    assert folders["derived-vol2"][0].SeriesDescription == \
        "gre_field_mappin echo 2 TE 12.46 SR x2 cubic - not for diagnosis"
    assert [float(folders[f"derived-vol{k}"][0].EchoTime) for k in (1, 2)] == [10.0, 12.46]
    for d in folders["derived-vol1"]:
        assert d.SOPClassUID == pydicom.uid.MRImageStorage
        assert d.InPlanePhaseEncodingDirection == "COL"  # the enhanced object says COLUMN
        assert "InversionTime" not in d  # no IR in ScanningSequence
    for f in sorted((tmp_path / "out").glob("*/*/*.dcm")):
        errors, _ = dciodvfy(f)
        assert not errors, (f, errors)


def test_enhanced_t1_derived_objects_all_pass_dciodvfy(tmp_path: Path) -> None:
    r = srnode("process", shared_series("mr_t1_enhanced_multiframe_siemens_xa30"), tmp_path / "out", "--engine",
               "cubic", "--no-preview")
    assert r.returncode == 0, r.stdout + r.stderr
    files = sorted((tmp_path / "out").glob("*/*/*.dcm"))
    assert len(files) == 191  # cubic: no sigma object
    first = pydicom.dcmread(files[0], stop_before_pixels=True)
    assert list(first.ScanningSequence) == ["GR", "IR"] and float(first.InversionTime) == 900.0
    for f in files:
        errors, _ = dciodvfy(f)
        assert not errors, (f, errors)


def test_mosaic_becomes_a_volume_never_a_picture(tmp_path: Path) -> None:
    r = srnode("process", shared_series("mr_epi_mosaic_siemens_single"), tmp_path / "out", "--engine", "cubic",
               "--no-preview")
    assert r.returncode == 0, r.stdout + r.stderr
    der = _series_folders(tmp_path / "out")["derived"]
    assert len(der) == 119  # 60 slices x2 -> 119, each a 90x90 slice, none 720x720
    assert {(int(d.Rows), int(d.Columns)) for d in der} == {(90, 90)}
    assert [float(d.SpacingBetweenSlices) for d in der] == pytest.approx([1.2] * 119)
    assert not any("MOSAIC" in list(d.ImageType) for d in der)


def _copy_series(files: list[Path], out: Path, tag: str, time: int) -> list[Path]:
    """Copies of ``files`` as new instances of time point ``time`` (TemporalPositionIdentifier)."""
    return variant(files, out, tag, lambda ds, k: setattr(ds, "TemporalPositionIdentifier", time))


def test_a_volume_too_short_is_refused_alone_naming_its_files(tmp_path: Path) -> None:
    ph = write_phantom_series(tmp_path / "ph", slices=6, size=32, step_mm=3.0)
    _copy_series(ph, tmp_path / "in", "t1", 1)
    _copy_series(ph[:1], tmp_path / "in", "t2", 2)  # time point 2 has only 1 slice
    r = srnode("process", tmp_path / "in", tmp_path / "out", "--engine", "cubic", "--no-preview")
    assert r.returncode == 1, r.stdout + r.stderr
    assert "volume 2/2 (time 2): 1 slice(s); through-plane super-resolution needs at least 2 " \
           "(files: t2-CT0001.dcm)" in r.stdout, r.stdout
    folders = _series_folders(tmp_path / "out")
    assert sorted(folders) == ["derived-vol1"] and len(folders["derived-vol1"]) == 11


def test_a_folder_holding_an_instance_twice_is_processed_as_the_node_does(tmp_path: Path) -> None:
    in_dir = tmp_path / "in"
    ph = write_phantom_series(in_dir, slices=6, size=32, step_mm=3.0)
    shutil.copyfile(ph[2], in_dir / "CT0003 (1).dcm")
    r = srnode("process", in_dir, tmp_path / "out", "--engine", "cubic", "--no-preview")
    assert r.returncode == 0, r.stdout + r.stderr
    assert len(_series_folders(tmp_path / "out")["derived"]) == 11
    report = json.loads(next((tmp_path / "out").glob("*/report.json")).read_text())
    assert "CT0003 (1).dcm is a second copy of CT0003.dcm (same SOPInstanceUID, same pixels): kept once" \
        in report["report"]["notes"]
    # the same UID with other pixels: refused, both files named
    other = pydicom.dcmread(ph[2])
    other.PixelData = (np.asarray(other.pixel_array) + 5).astype(other.pixel_array.dtype).tobytes()
    other.save_as(in_dir / "CT0003 (1).dcm", enforce_file_format=True)
    r = srnode("process", in_dir, tmp_path / "out2", "--engine", "cubic", "--no-preview")
    assert r.returncode == 1
    assert "CT0003.dcm and CT0003 (1).dcm carry the same SOPInstanceUID but different pixel data" in r.stdout, \
        r.stdout
