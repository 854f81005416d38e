"""Small generated series for the series / derived tests: the phantom of ``node.app.phantom`` with a change made
to each slice's header or pixels, copies of it as further instances of the same series (another volume, another
kind of image), and the check that a series is refused both by the split and by processing.

Every builder writes real DICOM files (pydicom, ``enforce_file_format=True`` where the file is rewritten) and
returns their paths in slice order; nothing is mocked."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.uid import UID, ExplicitVRLittleEndian, ImplicitVRLittleEndian, generate_uid

from node.app.phantom import write_phantom_series
from node.config import load_config
from node.errors import VolumeError
from node.process import process_series
from node.series import load_volumes

MR_IMAGE_STORAGE = UID("1.2.840.10008.5.1.4.1.1.4")

SliceChange = Callable[[Dataset, int], None]
"""``change(ds, k)``: edits slice k's data set in place before it is written."""


def edited_phantom(tmp_path: Path, change: Callable[[int, Dataset], None], slices: int = 6,
                   enforce_file_format: bool = False) -> list[Path]:
    """A phantom CT of ``slices`` 32² slices 3 mm apart in ``tmp_path / "in"``, ``change(k, ds)`` applied to
    slice k's data set before it is saved back; the files, in slice order."""
    files = write_phantom_series(tmp_path / "in", slices=slices, size=32, step_mm=3.0)
    for k, f in enumerate(files):
        ds = pydicom.dcmread(f)
        change(k, ds)
        ds.save_as(f, enforce_file_format=enforce_file_format)
    return files


def phantom_stack(folder: Path) -> list[Path]:
    """The stack the volume-split tests copy: a phantom CT of 6 slices of 32² pixels over a 96 mm field
    (3 mm pixels), 3 mm apart, written to ``folder``; the files, in slice order."""
    return write_phantom_series(folder, slices=6, size=32, step_mm=3.0, fov_mm=96.0)


def variant(files: list[Path], out: Path, tag: str, change: SliceChange) -> list[Path]:
    """Copies of ``files`` in ``out`` (made if absent) as new instances of the same series, each changed by
    ``change(ds, k)``: SOPInstanceUIDs derived from the original's and ``tag``, file names ``{tag}-{name}``."""
    return _copies(files, out, tag, change)


def mr_variant(files: list[Path], out: Path, tag: str, change: SliceChange,
               implicit: bool | None = None) -> list[Path]:
    """As :func:`variant`, the copies made MR Image Storage objects (Modality MR) before ``change``; with
    ``implicit`` True/False they are written Implicit/Explicit VR Little Endian, with None in the phantom's
    own transfer syntax."""
    def as_mr(ds: Dataset) -> None:
        ds.Modality, ds.SOPClassUID = "MR", MR_IMAGE_STORAGE
        ds.file_meta.MediaStorageSOPClassUID = MR_IMAGE_STORAGE
        if implicit is not None:
            ds.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian if implicit else ExplicitVRLittleEndian
    return _copies(files, out, tag, change, as_mr, implicit)


def _copies(files: list[Path], out: Path, tag: str, change: SliceChange,
            first: Callable[[Dataset], None] | None = None, implicit: bool | None = None) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for k, f in enumerate(files):
        ds = pydicom.dcmread(f)
        ds.SOPInstanceUID = generate_uid(entropy_srcs=[str(ds.SOPInstanceUID), tag])
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        if first is not None:
            first(ds)
        change(ds, k)
        p = out / f"{tag}-{f.name}"
        if implicit is None:
            ds.save_as(p, enforce_file_format=True)
        else:
            ds.save_as(p, enforce_file_format=True, implicit_vr=implicit, little_endian=True)
        paths.append(p)
    return paths


def refused(files: list[Path], tmp_path: Path, *reason: str) -> str:
    """Asserts that ``files`` are refused twice: by ``load_volumes`` with a VolumeError whose text holds every
    string of ``reason``, and by ``process_series`` (default config, first rule, cubic engine) writing no DICOM
    file under ``tmp_path / "out"``. Returns the load_volumes message."""
    with pytest.raises(VolumeError) as exc:
        load_volumes(files)
    msg = str(exc.value)
    for r in reason:
        assert r in msg, msg
    cfg = load_config(None)
    with pytest.raises(VolumeError):
        process_series(files, cfg.rules[0], cfg, tmp_path / "out", engine_name="cubic")
    assert not list((tmp_path / "out").rglob("*.dcm")), "nothing may be derived"
    return msg
