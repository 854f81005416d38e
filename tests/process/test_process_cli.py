"""``srnode process IN_DIR OUT_DIR``: real series in, derived + uncertainty series out; bad inputs get reasons."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pydicom
import pytest

from node.app.phantom import write_phantom_series
from node.series import load_series, regular_runs
from tests.support.fixtures import ROOT, shared_series


def srnode(*args: str | Path, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "node.app.cli", *map(str, args)], cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout)


def test_process_phantom_and_enhanced_mr(tmp_path: Path) -> None:
    in_dir, out_dir = tmp_path / "in", tmp_path / "out"
    write_phantom_series(in_dir / "phantom", slices=8, size=64, step_mm=2.5)
    mr = shared_series("mr_t1_enhanced_multiframe_siemens_xa30")
    shutil.copytree(mr, in_dir / "mr")
    r = srnode("process", in_dir, out_dir, "--engine", "cubic")
    assert r.returncode == 0, r.stdout + r.stderr
    lines = [ln for ln in r.stdout.splitlines() if ln.startswith("[")]
    assert len(lines) == 2 and all("derived ->" in ln and "no uncertainty object" in ln for ln in lines), r.stdout
    # the phantom: 8 slices at 2.5 mm, factor 2 -> 15 slices at 1.25 mm, HU kept at the original positions
    ph_in = load_series(sorted((in_dir / "phantom").glob("*.dcm")))
    ph_out = out_dir / ph_in.series_uid
    der = load_series(sorted((ph_out / "derived").glob("*.dcm")))
    assert der.shape == (15, 64, 64) and der.spacing[0] == pytest.approx(1.25)
    assert np.max(np.abs(der.data[::2] - ph_in.data)) <= 1.0
    assert not (ph_out / "uncertainty").exists()  # cubic has no sigma: no uncertainty object
    assert (ph_out / "preview.png").stat().st_size > 1000
    # the enhanced multi-frame MR: 96 frames -> 191 classic MR images, 1 mm apart, same frame of reference
    mr_in = load_series(sorted(mr.glob("*.dcm")))
    mr_out = sorted((out_dir / mr_in.series_uid / "derived").glob("*.dcm"))
    assert len(mr_out) == 191
    first = pydicom.dcmread(mr_out[0], stop_before_pixels=True)
    assert first.SOPClassUID == pydicom.uid.MRImageStorage
    assert first.FrameOfReferenceUID == mr_in.datasets[0].FrameOfReferenceUID
    assert float(first.SpacingBetweenSlices) == pytest.approx(1.0, abs=1e-3)


def test_process_bad_inputs_give_reasons(tmp_path: Path) -> None:
    in_dir, out_dir = tmp_path / "in", tmp_path / "out"
    good = write_phantom_series(in_dir / "good", slices=5, size=32, step_mm=3.0, seed=1)
    # a truncated file, alone in its series
    trunc = pydicom.dcmread(good[0])
    trunc.SeriesInstanceUID = pydicom.uid.generate_uid()
    (in_dir / "trunc").mkdir()
    trunc.save_as(in_dir / "trunc" / "t.dcm", enforce_file_format=True)
    data = (in_dir / "trunc" / "t.dcm").read_bytes()
    (in_dir / "trunc" / "t.dcm").write_bytes(data[: len(data) - 900])
    # a non-image SOP (a structured report)
    sr = pydicom.dcmread(good[0])
    sr.SeriesInstanceUID = pydicom.uid.generate_uid()
    sr.SOPClassUID = sr.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.88.22"
    sr.Modality = "SR"
    del sr.PixelData
    (in_dir / "sr").mkdir()
    sr.save_as(in_dir / "sr" / "sr.dcm", enforce_file_format=True)
    # a mixed series: same SeriesInstanceUID, two matrices
    mixed = write_phantom_series(in_dir / "mixed", slices=4, size=32, step_mm=3.0, seed=2)
    odd = pydicom.dcmread(mixed[0])
    odd.SOPInstanceUID = pydicom.uid.generate_uid()
    odd.Rows = odd.Columns = 16
    odd.PixelData = np.zeros((16, 16), np.uint16).tobytes()
    odd.save_as(in_dir / "mixed" / "odd.dcm", enforce_file_format=True)
    # two of them (field18: a single stray plane is set aside, tests/series/test_set_aside.py; two are refused)
    odd.SOPInstanceUID = pydicom.uid.generate_uid()
    odd.ImagePositionPatient = pydicom.dcmread(mixed[1]).ImagePositionPatient
    odd.save_as(in_dir / "mixed" / "odd2.dcm", enforce_file_format=True)
    (in_dir / "notes.txt").write_text("not DICOM")  # text: skipped with a line, not a failure (fix13)
    (in_dir / "blob.dcm").write_bytes(bytes(range(256)) * 4)  # no 'DICM', no known format: maybe a cut DICOM file
    config = tmp_path / "all.toml"
    config.write_text('[[rules]]\nname = "everything"\nmatch = {}\nthrough_plane_factor = 2\n')

    r = srnode("process", in_dir, out_dir, "--engine", "cubic", "--config", config, "--no-preview")
    out = r.stdout
    assert r.returncode == 1, out + r.stderr
    assert "skipped notes.txt: text, not DICOM" in out
    assert "FAILED blob.dcm: not a readable DICOM file" in out
    assert "t.dcm" in out and "FAILED" in out
    assert "is not an image" in out
    assert "differ in matrix" in out
    good_uid = pydicom.dcmread(good[0]).SeriesInstanceUID
    assert len(list((out_dir / good_uid / "derived").glob("*.dcm"))) == 9  # the good series still processed

    # the default rules leave a report alone, with the reason
    r = srnode("process", in_dir / "sr", tmp_path / "out2", "--engine", "cubic")
    assert r.returncode == 0 and "left alone: no rule matched: ct-mr-thick" in r.stdout, r.stdout + r.stderr
    assert "Modality 'SR' does not match" in r.stdout and "(the series: Modality 'SR')" in r.stdout, r.stdout


def test_process_j2k_ct_without_uids_is_refused_with_reason(tmp_path: Path) -> None:
    src = shared_series("ct_body_j2k_siemens_petct")
    in_dir = tmp_path / "in"
    in_dir.mkdir()
    for p in sorted(src.glob("*.dcm"))[:4]:
        shutil.copy(p, in_dir / p.name)
    r = srnode("process", in_dir, tmp_path / "out", "--engine", "cubic", "--no-preview")
    assert r.returncode == 1
    assert "empty StudyInstanceUID or SeriesInstanceUID" in r.stdout, r.stdout + r.stderr


def test_process_ge_tilted_irregular_gives_one_derived_series_per_regular_run(tmp_path: Path) -> None:
    src = shared_series("ct_head_ge_tilted_irregular")
    r = srnode("process", src, tmp_path / "out", "--engine", "cubic", "--no-preview")
    assert r.returncode == 0, r.stdout + r.stderr
    vol = load_series(sorted(src.glob("*.dcm")))
    base = tmp_path / "out" / vol.series_uid
    uids = set()
    for run, step in ((1, 4.0), (2, 7.0)):
        files = sorted((base / f"derived-run{run}").glob("*.dcm"))
        assert len(files) == 27  # 14 slices x2 -> 27
        first, last = (pydicom.dcmread(f, stop_before_pixels=True) for f in (files[0], files[-1]))
        assert float(first.SpacingBetweenSlices) == pytest.approx(step / 2, abs=0.01)
        assert f"run {run}/2" in first.SeriesDescription
        a = vol.positions[0 if run == 1 else 14]
        b = vol.positions[13 if run == 1 else 27]
        assert [float(v) for v in first.ImagePositionPatient] == pytest.approx(a, abs=1e-3)
        assert [float(v) for v in last.ImagePositionPatient] == pytest.approx(b, abs=1e-3)
        uids.add(first.SeriesInstanceUID)
        # HU at the original slice positions (every 2nd derived slice) within 1 HU for cubic
        derived = load_series(files)
        original = regular_runs(vol)[run - 1]
        assert np.max(np.abs(derived.data[::2] - original.data)) <= 1.0
        assert not (base / f"uncertainty-run{run}").exists()  # cubic: no sigma object
    assert len(uids) == 2


@pytest.mark.parametrize("cut", ["mid-name", "bad-length"])
def test_a_file_cut_inside_its_header_is_named_as_failed(tmp_path: Path, cut: str) -> None:
    """break12: a file truncated inside its header (or with a corrupt element length that swallows the rest) was read
    by pydicom as a partial header without SeriesInstanceUID, then reported as a separate series '(no
    SeriesInstanceUID)' 'left alone: no rule matched: SliceThickness absent', exit 0: neither the file nor the real
    reason was named, and the series it came from silently had one slice less."""
    in_dir = tmp_path / "in"
    files = write_phantom_series(in_dir, slices=6, size=32, step_mm=3.0, seed=3)
    ds = pydicom.dcmread(files[2])
    ds.PatientName = "CUT^HERE"
    ds.save_as(files[2], enforce_file_format=True)
    data = files[2].read_bytes()
    k = data.find(b"CUT^HERE")
    assert k > 0
    data = data[: k + 3] if cut == "mid-name" else data[: k - 2] + b"\xff\xff" + data[k:]
    files[2].write_bytes(data)
    r = srnode("process", in_dir, tmp_path / "out", "--engine", "cubic", "--no-preview")
    assert r.returncode == 1, r.stdout + r.stderr
    failed = [line for line in r.stdout.splitlines() if line.startswith("FAILED") and files[2].name in line]
    assert failed and "SeriesInstanceUID" in failed[0], r.stdout
    assert "CUT" not in r.stdout + r.stderr  # the patient's name is not echoed


def test_the_nodes_own_derived_series_is_left_alone_not_super_resolved_again(tmp_path: Path) -> None:
    """break12: a derived series fed back (a PACS that routes every CT to the node gets the derived series back;
    here `process` on its own output) matched the default rule (it keeps the acquired SliceThickness) and was
    super-resolved again: 6 -> 11 -> 21 slices of interpolated data, and in the live node an endless loop."""
    in_dir = tmp_path / "in"
    write_phantom_series(in_dir, slices=6, size=32, step_mm=3.0, seed=4)
    r = srnode("process", in_dir, tmp_path / "out1", "--engine", "cubic", "--no-preview")
    assert r.returncode == 0 and "11 derived" in r.stdout, r.stdout + r.stderr
    r = srnode("process", tmp_path / "out1", tmp_path / "out2", "--engine", "cubic", "--no-preview")
    lines = [line for line in r.stdout.splitlines() if line.startswith("[")]
    assert lines and all("left alone" in line and "srnode" in line for line in lines), r.stdout + r.stderr
    assert not list((tmp_path / "out2").rglob("*.dcm"))


def test_process_on_its_own_output_folder_skips_its_side_files_and_other_non_dicom_files(tmp_path: Path) -> None:
    """fix13: `srnode process` on the OUT folder of an earlier run printed "FAILED report.json: not a readable DICOM
    file" (and preview.png), exit 1; a README.txt or a .json beside the images of a CD export failed the same way and
    a DICOMDIR was reported as a series "(no SeriesInstanceUID)". srnode's own side files and files that are
    recognisably something else (text, PNG, PDF, ...) are skipped with a line, not failures; the derived series is
    left alone; a DICOM file cut short (or an empty file) stays a FAILED line naming it: its data would be lost."""
    in_dir = tmp_path / "in"
    write_phantom_series(in_dir, slices=6, size=32, step_mm=3.0, seed=5)
    out1 = tmp_path / "out1"
    r = srnode("process", in_dir, out1, "--engine", "cubic")
    assert r.returncode == 0 and "11 derived" in r.stdout, r.stdout + r.stderr
    assert sorted(p.name for p in out1.rglob("*") if p.suffix in (".json", ".png")) == ["preview.png", "report.json"]

    r = srnode("process", out1, tmp_path / "out2", "--engine", "cubic", "--no-preview")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "FAILED" not in r.stdout, r.stdout
    series = [line for line in r.stdout.splitlines() if line.startswith("[")]
    assert len(series) == 1 and "left alone: derived by srnode already" in series[0], r.stdout
    assert "report.json" in r.stdout and "preview.png" in r.stdout, r.stdout  # said, not silent
    assert not list((tmp_path / "out2").rglob("*.dcm"))

    # a CD export: DICOMDIR, README, a JSON and a PDF beside the images; one image cut short, one empty file
    cd = tmp_path / "cd"
    shutil.copytree(in_dir, cd / "IMAGES")
    from pydicom.fileset import FileSet
    fs = FileSet()
    for p in sorted((cd / "IMAGES").glob("*.dcm")):
        fs.add(pydicom.dcmread(p))
    fs.write(cd / "media")
    (cd / "README.txt").write_text("Images of the study. Open with any DICOM viewer.\n")
    (cd / "notes.json").write_text('{"exported": true}\n')
    (cd / "manual.pdf").write_bytes(b"%PDF-1.4\n%\xe2\xe3\xcf\xd3\n1 0 obj\n<<>>\nendobj\n")
    r = srnode("process", cd, tmp_path / "out3", "--engine", "cubic", "--no-preview")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "FAILED" not in r.stdout and "no SeriesInstanceUID" not in r.stdout, r.stdout
    for name in ("README.txt", "notes.json", "manual.pdf", "DICOMDIR"):
        assert any(name in line and "skipped" in line for line in r.stdout.splitlines()), (name, r.stdout)

    whole = (cd / "IMAGES" / "CT0003.dcm").read_bytes()
    for cut, size in (("cut-in-preamble.dcm", 100), ("cut-after-marker.dcm", 200), ("empty.dcm", 0)):
        (cd / cut).write_bytes(whole[:size])
    r = srnode("process", cd, tmp_path / "out4", "--engine", "cubic", "--no-preview")
    assert r.returncode == 1, r.stdout + r.stderr
    failed = [line for line in r.stdout.splitlines() if line.startswith("FAILED")]
    for cut in ("cut-in-preamble.dcm", "cut-after-marker.dcm", "empty.dcm"):
        assert any(cut in line for line in failed), (cut, r.stdout)
    assert not any(name in line for line in failed for name in ("README", "notes", "manual", "DICOMDIR")), r.stdout


def test_a_full_output_disk_is_one_line_naming_the_folder(tmp_path: Path) -> None:
    """break18: OUT_DIR on a disk that fills while the derived slices are written: "srnode process: error: With
    tag (7FE0,0010) got exception: [Errno 28] No space left on device Traceback (most recent call last): File ..."
    (pydicom's re-raise, its traceback folded into the line), or "error: No space left on device" with no folder
    (a failed close). Now one line names the series' output folder, the system's error and how far the run got;
    nothing of the series is left behind."""
    from tests.support.peers import mount_tmpfs

    disk = tmp_path / "disk"
    if not mount_tmpfs(disk, "1m"):
        pytest.skip("cannot mount a tmpfs here (needs root and CAP_SYS_ADMIN): no small real file system to fill")
    try:
        in_dir = tmp_path / "in"
        files = write_phantom_series(in_dir, slices=8, size=256, step_mm=2.5)  # 15 derived x 128 KiB > 1 MiB
        uid = pydicom.dcmread(files[0], stop_before_pixels=True).SeriesInstanceUID
        r = srnode("process", in_dir, disk / "out", "--engine", "cubic", "--no-preview")
        assert r.returncode == 1, r.stdout + r.stderr
        errors = [ln for ln in r.stderr.splitlines() if "error:" in ln]
        assert errors == [ln for ln in r.stderr.splitlines() if ln.startswith("srnode process: error:")], r.stderr
        assert len(errors) == 1 and "Traceback" not in r.stderr, r.stderr
        assert str(disk / "out" / uid) in errors[0] and "No space left on device" in errors[0], errors
        assert "series 1 of 1" in errors[0], errors
        assert not any(p.name.endswith(".dcm") for p in (disk / "out").rglob("*")), list((disk / "out").rglob("*"))
    finally:
        subprocess.run(["umount", "-l", str(disk)], capture_output=True)
