"""series14 item 3: an enhanced multi-frame object and classic single-frame images under one SeriesInstanceUID
are two encodings. Before: split as "stack 1" (the object's frames, StackID 1) and "stack ?" (the classic images,
no StackID). Now each is a volume of its own labelled by its encoding, with a note naming both, whether they repeat
the positions (the same data twice) or interleave (stacking them into one volume would be a guess); no "?" label."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage, generate_uid

from node.series import load_volumes
from tests.support.fixtures import shared_series

_COPIED = ("PatientName", "PatientID", "StudyInstanceUID", "SeriesInstanceUID", "FrameOfReferenceUID", "Modality",
           "StudyDate", "SeriesNumber", "Rows", "Columns", "BitsAllocated", "BitsStored", "HighBit",
           "PixelRepresentation", "PhotometricInterpretation", "SamplesPerPixel")


def _classic(mf: Dataset, frame: int, out: Path) -> Path:
    """Frame ``frame`` (0-based) of ``mf`` as a classic MR image (as a legacy converter writes it)."""
    ds = Dataset()
    for kw in _COPIED:
        if kw in mf:
            setattr(ds, kw, mf.data_element(kw).value)
    for elem in mf.group_dataset(0x0010):  # the patient module as it is: one patient
        ds.add(elem)
    for kw in ("StudyTime", "StudyID", "AccessionNumber", "ReferringPhysicianName"):
        if kw in mf:
            setattr(ds, kw, mf.data_element(kw).value)
    pf, sf = mf.PerFrameFunctionalGroupsSequence[frame], mf.SharedFunctionalGroupsSequence[0]

    def item(seq: str) -> Dataset:
        return (pf if seq in pf else sf)[seq][0]  # type: ignore[no-any-return]

    ds.SOPClassUID, ds.SOPInstanceUID = MRImageStorage, generate_uid()
    ds.ImageType = ["ORIGINAL", "PRIMARY", "M"]
    ds.ImagePositionPatient = item("PlanePositionSequence").ImagePositionPatient
    ds.ImageOrientationPatient = item("PlaneOrientationSequence").ImageOrientationPatient
    ds.PixelSpacing = item("PixelMeasuresSequence").PixelSpacing
    ds.SliceThickness = item("PixelMeasuresSequence").SliceThickness
    ds.InstanceNumber = frame + 1
    ds.PixelData = np.ascontiguousarray(mf.pixel_array[frame]).tobytes()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID, ds.file_meta.MediaStorageSOPInstanceUID = MRImageStorage, ds.SOPInstanceUID
    path = out / f"classic{frame:03d}.dcm"
    ds.save_as(path, enforce_file_format=True)
    return path


def _keep_frames(mf: Dataset, frames: list[int]) -> None:
    arr = mf.pixel_array[frames]
    pf = mf.PerFrameFunctionalGroupsSequence
    mf.PerFrameFunctionalGroupsSequence = [pf[k] for k in frames]
    mf.NumberOfFrames = len(frames)
    mf.PixelData = np.ascontiguousarray(arr).tobytes()


def _series(tmp_path: Path, mf_frames: list[int], classic_frames: list[int]) -> list[Path]:
    src = sorted(shared_series("mr_t1_enhanced_multiframe_siemens_xa30").glob("*.dcm"))[0]
    mf = pydicom.dcmread(src)
    out = tmp_path / "in"
    out.mkdir(parents=True, exist_ok=True)
    files = [_classic(mf, k, out) for k in classic_frames]
    _keep_frames(mf, mf_frames)
    mf.save_as(out / "MF.dcm", enforce_file_format=True)
    return [out / "MF.dcm", *files]


def _labels_and_notes(files: list[Path]) -> tuple[list[tuple[str, int]], list[str]]:
    vols = load_volumes(files)
    return [(v.volume_label, v.shape[0]) for v in vols], [n for v in vols for n in v.notes]


def test_an_enhanced_object_and_classic_images_that_interleave_are_two_volumes_named_by_encoding(
        tmp_path: Path) -> None:
    labels, notes = _labels_and_notes(_series(tmp_path, list(range(0, 96, 2)), list(range(1, 96, 2))))
    assert labels == [("multi-frame", 48), ("single-frame", 48)], labels
    assert not any("?" in label for label, _n in labels)
    said = [n for n in notes if "two encodings" in n]
    assert said and "MF.dcm" in said[0] and "48 single-frame image(s)" in said[0], notes


def test_an_enhanced_object_and_classic_images_of_the_same_positions_are_two_volumes(tmp_path: Path) -> None:
    labels, notes = _labels_and_notes(_series(tmp_path, list(range(0, 48)), list(range(0, 48))))
    assert labels == [("multi-frame", 48), ("single-frame", 48)], labels
    said = [n for n in notes if "two encodings" in n]
    assert said and "the same 48 position(s)" in said[0], notes


def test_halves_of_one_stack_in_two_encodings_are_not_stacked_together(tmp_path: Path) -> None:
    labels, _notes = _labels_and_notes(_series(tmp_path, list(range(0, 48)), list(range(48, 96))))
    assert labels == [("multi-frame", 48), ("single-frame", 48)], labels
