"""series14 item 1: a DICOM data set written without its Part 10 wrapper (no 128-byte preamble, no 'DICM', maybe no
file meta: old archives, raw network dumps) is read as DICOM everywhere an input is read (``srnode process``'s
grouping, the loader, ``srnode check``); bytes that pydicom only "parses" with force (text, random bytes, a
plausible first tag and nothing else) stay a FAILED line naming the file."""

from __future__ import annotations

import io
import os
from pathlib import Path

import pydicom
import pytest
from pydicom.errors import InvalidDicomError
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset, write_file_meta_info

from node.app.phantom import write_phantom_series
from node.dicom_read import read_dicom
from tests.process.test_process_cli import srnode


def raw_bytes(path: Path, implicit: bool, with_meta: bool = False) -> bytes:
    """The data set of ``path`` as a raw dump: no preamble, no 'DICM' (``with_meta``: the file meta group first)."""
    ds = pydicom.dcmread(path)
    fp = DicomBytesIO()
    fp.is_little_endian, fp.is_implicit_VR = True, implicit
    if with_meta:
        ds.file_meta.TransferSyntaxUID = (pydicom.uid.ImplicitVRLittleEndian if implicit
                                          else pydicom.uid.ExplicitVRLittleEndian)
        meta = DicomBytesIO()
        meta.is_little_endian, meta.is_implicit_VR = True, False
        write_file_meta_info(meta, ds.file_meta, enforce_standard=True)
        fp.write(meta.getvalue())
    write_dataset(fp, ds)
    return fp.getvalue()


def junk(tmp: Path) -> dict[str, bytes]:
    """Files that force-parse as "something" but are no data set: each must stay a failure naming it."""
    return {
        "dump.raw": b"\x08\x00\x05\x00" + os.urandom(3000),  # a plausible first tag, then noise
        "noise.dcm": os.urandom(4096),
        # a real first element (0008,0005) and ImageType, but no SOP Class / Instance UID: not an image data set
        "stub.dcm": b"\x08\x00\x05\x00CS\x0a\x00ISO_IR 100" + b"\x08\x00\x08\x00CS\x08\x00ORIGINAL",
    }


def test_read_dicom_reads_a_data_set_without_preamble_and_nothing_else(tmp_path: Path) -> None:
    files = write_phantom_series(tmp_path / "ct", slices=2, size=16, step_mm=3.0, seed=7)
    whole = pydicom.dcmread(files[0])
    for implicit in (True, False):
        for with_meta in (False, True):
            data = raw_bytes(files[0], implicit, with_meta)
            with pytest.raises(InvalidDicomError):
                pydicom.dcmread(io.BytesIO(data))  # pydicom alone: not DICOM without force
            ds = read_dicom(io.BytesIO(data))
            assert ds.SOPInstanceUID == whole.SOPInstanceUID
            assert (ds.pixel_array == whole.pixel_array).all(), (implicit, with_meta)
            assert read_dicom(io.BytesIO(data), stop_before_pixels=True).Rows == whole.Rows
    for name, data in junk(tmp_path).items():
        with pytest.raises(InvalidDicomError):
            read_dicom(io.BytesIO(data))
        assert name


def test_process_and_check_read_raw_dumps_as_dicom_and_still_fail_noise(tmp_path: Path) -> None:
    """Before: every raw file was "FAILED x.dcm: not a readable DICOM file (no DICOM header: the 'DICM' marker after
    the 128-byte preamble is missing)", and the series was derived from the 2 wrapped slices that were left."""
    in_dir, out_dir = tmp_path / "in", tmp_path / "out"
    files = write_phantom_series(in_dir, slices=6, size=32, step_mm=3.0, seed=8)
    for k, (implicit, with_meta) in enumerate([(True, False), (False, False), (True, True), (False, True)]):
        files[k].write_bytes(raw_bytes(files[k], implicit, with_meta))  # 4 of 6 slices without the Part 10 wrapper
    for name, data in junk(tmp_path).items():
        (in_dir / name).write_bytes(data)

    r = srnode("process", in_dir, out_dir, "--engine", "cubic", "--no-preview")
    assert r.returncode == 1, r.stdout + r.stderr  # the junk files failed
    failed = [ln for ln in r.stdout.splitlines() if ln.startswith("FAILED")]
    assert sorted(ln.split(":")[0] for ln in failed) == ["FAILED dump.raw", "FAILED noise.dcm", "FAILED stub.dcm"], \
        r.stdout
    assert all("not a readable DICOM file (no DICOM header" in ln and "read without it the bytes are no DICOM data set" in ln
               for ln in failed), r.stdout
    assert "Unknown encoding" not in r.stderr, r.stderr  # pydicom's complaints about the noise read with force
    series = [ln for ln in r.stdout.splitlines() if ln.startswith("[")]
    assert len(series) == 1 and "6 file(s)" in series[0] and "11 derived" in series[0], r.stdout
    assert "NOT IN ANY DERIVED SERIES" not in r.stdout, r.stdout

    c = srnode("check", in_dir, out_dir, "--no-dciodvfy")
    assert c.returncode == 0, c.stdout + c.stderr
    assert "1 derived series checked" in c.stdout and "0 failure(s)" in c.stdout, c.stdout
