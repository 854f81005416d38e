"""Generate the bad-input corpus: crafted DICOM files a node must refuse or record a reason for, never crash on.

    python tests/ingest/make_corpus.py OUT_DIR     # writes the files and OUT_DIR/manifest.json

Nothing here is committed as binaries: tests call ``make_corpus(tmp_dir)``. Every case is its own series (its own
SeriesInstanceUID) so the node's decision can be checked per case; ``good_series`` writes a clean series that
must still flow to its destination while the corpus is being sent.

Each case says how it must be sent (``send``): ``"raw"`` streams the bytes after the file meta as they are
(pynetdicom chunked send, no re-encoding, so broken bodies reach the node broken); ``"storescu"`` sends with
dcmtk. ``expect`` is what a user may see: ``"refuse"`` (a non-Success C-STORE status or a rejected presentation
context), ``"reason"`` (accepted, then the series is left alone / failed with a recorded reason) or ``"either"``.
"""

from __future__ import annotations

import io
import json
import struct
import sys
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import (
    UID,
    ExplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    RLELossless,
    generate_uid,
)

CT_IMAGE = UID("1.2.840.10008.5.1.4.1.1.2")
MR_IMAGE = UID("1.2.840.10008.5.1.4.1.1.4")
BASIC_TEXT_SR = UID("1.2.840.10008.5.1.4.1.1.88.11")
ENCAPSULATED_PDF = UID("1.2.840.10008.5.1.4.1.1.104.1")
RT_STRUCT = UID("1.2.840.10008.5.1.4.1.1.481.3")
KEY_OBJECT = UID("1.2.840.10008.5.1.4.1.1.88.59")
RAW_DATA = UID("1.2.840.10008.5.1.4.1.1.66")
UID_ROOT = "1.2.826.0.1.3680043.10.1087.99."
STUDY_UID = UID(UID_ROOT + "1")  # one study for the whole corpus (as a busy scanner would send)
SIZE = 32  # rows = columns of the crafted images: tiny, the point is the header


@dataclass
class Case:
    name: str
    category: str
    series_uid: str
    files: list[str] = field(default_factory=list)
    send: str = "raw"  # "raw" (pynetdicom chunked, bytes as written) | "storescu"
    expect: str = "either"  # "refuse" | "reason" | "either"
    why: str = ""


def uid(*parts: object) -> UID:
    """Deterministic UID from the case name (a regenerated corpus has the same UIDs)."""
    return generate_uid(prefix=UID_ROOT, entropy_srcs=[str(p) for p in parts])


# ----------------------------------------------------------------------------------------------- builders


def base_slice(series: str, index: int, *, modality: str = "CT", z: float | None = None,
               orientation: tuple[float, ...] = (1, 0, 0, 0, 1, 0), signed: bool = True,
               rows: int = SIZE, cols: int = SIZE) -> Dataset:
    """A valid little CT slice of series ``series`` at slice ``index`` (5 mm steps)."""
    ds = Dataset()
    # SOP Common
    ds.SOPClassUID = CT_IMAGE if modality == "CT" else MR_IMAGE
    ds.SOPInstanceUID = uid(series, "instance", index)
    ds.SpecificCharacterSet = "ISO_IR 100"
    # Patient: synthetic values, never real people
    ds.PatientName = "CORPUS^BADINPUT"
    ds.PatientID = "CORPUS-0001"
    ds.PatientBirthDate = "19700101"
    ds.PatientSex = "O"
    # General Study
    ds.StudyInstanceUID = STUDY_UID
    ds.StudyDate = "20200101"
    ds.StudyTime = "120000"
    ds.AccessionNumber = "ACC-CORPUS"
    ds.ReferringPhysicianName = ""
    ds.StudyID = "1"
    # General Series
    ds.Modality = modality
    ds.SeriesInstanceUID = uid(series, "series")
    ds.SeriesNumber = 1
    ds.SeriesDescription = f"corpus {series}"[:64]
    # Frame of Reference
    ds.FrameOfReferenceUID = uid("corpus", "for")
    ds.PositionReferenceIndicator = ""
    # General Equipment
    ds.Manufacturer = "srnode-corpus"
    # General Image / Image Plane
    ds.InstanceNumber = index + 1
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.PixelSpacing = [0.5, 0.5]
    ds.SliceThickness = 5.0
    ds.ImageOrientationPatient = list(orientation)
    zpos = 5.0 * index if z is None else z
    ds.ImagePositionPatient = [-8.0, -8.0, zpos]
    # Image Pixel
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows, ds.Columns = rows, cols
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, 16, 15
    ds.PixelRepresentation = 1 if signed else 0
    # CT Image
    ds.RescaleIntercept = -1024 if signed is False else 0
    ds.RescaleSlope = 1
    ds.RescaleType = "HU"
    ds.KVP = 120
    yy, xx = np.mgrid[0:rows, 0:cols]
    disc = ((yy - rows / 2) ** 2 + (xx - cols / 2) ** 2) < (rows / 3) ** 2
    img = np.where(disc, 40 + 10 * index, -1000).astype(np.int16)
    if not signed:
        img = (img + 1024).astype(np.uint16)
    ds.PixelData = img.tobytes()
    ds["PixelData"].VR = "OW"
    return ds


def encode(ds: Dataset, ts: UID = ExplicitVRLittleEndian, meta_sop_class: str | None = None,
           meta_sop_instance: str | None = None) -> bytes:
    """Part 10 bytes of ``ds`` with a file meta matching it (or the given meta UIDs)."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = UID(meta_sop_class if meta_sop_class is not None else ds.SOPClassUID or CT_IMAGE)
    meta.MediaStorageSOPInstanceUID = UID(meta_sop_instance if meta_sop_instance is not None
                                          else ds.get("SOPInstanceUID", "") or uid("orphan"))
    meta.TransferSyntaxUID = ts
    meta.ImplementationClassUID = UID(UID_ROOT + "0")
    ds.file_meta = meta
    buf = io.BytesIO()
    little = ts != UID("1.2.840.10008.1.2.2")
    implicit = ts == UID("1.2.840.10008.1.2")
    ds.save_as(buf, implicit_vr=implicit, little_endian=little, enforce_file_format=True)
    return buf.getvalue()


def body_offset(data: bytes) -> int:
    """Offset of the first byte after the file meta group."""
    # preamble (128) + 'DICM' + (0002,0000) UL element: 4 tag + 2 VR + 2 len + 4 value
    (group_len,) = struct.unpack_from("<I", data, 128 + 4 + 8)
    return 128 + 4 + 12 + group_len


def find_tag(data: bytes, group: int, elem: int, start: int = 0) -> int:
    """Offset of an explicit-VR-LE element's tag (first match after ``start``)."""
    pos = data.find(struct.pack("<HH", group, elem), start)
    if pos < 0:
        raise KeyError(f"({group:04X},{elem:04X}) not found")
    return pos


def element(group: int, elem: int, vr: str, value: bytes, length: int | None = None) -> bytes:
    """Raw explicit-VR-LE element bytes (``length`` lets a case lie about its length)."""
    n = len(value) if length is None else length
    if vr in ("OB", "OW", "OF", "SQ", "UT", "UN", "UC", "UR", "OD", "OL", "OV"):
        return struct.pack("<HH", group, elem) + vr.encode() + b"\0\0" + struct.pack("<I", n) + value
    return struct.pack("<HH", group, elem) + vr.encode() + struct.pack("<H", n & 0xFFFF) + value


# -------------------------------------------------------------------------------------------------- cases

Writer = Callable[[Path], Case]


def _single(name: str, category: str, make: Callable[[Dataset], bytes | Dataset], *, expect: str = "either",
            send: str = "raw", why: str = "", ts: UID = ExplicitVRLittleEndian) -> Writer:
    def write(out: Path) -> Case:
        ds = base_slice(name, 0)
        result = make(ds)
        data = result if isinstance(result, bytes) else encode(result, ts)
        path = out / f"{name}.dcm"
        path.write_bytes(data)
        return Case(name, category, str(uid(name, "series")), [path.name], send, expect, why)

    return write


def _series(name: str, category: str, slices: Callable[[str], Iterator[Dataset]], *, expect: str = "reason",
            why: str = "", send: str = "raw") -> Writer:
    def write(out: Path) -> Case:
        files = []
        for i, ds in enumerate(slices(name)):
            p = out / f"{name}_{i:02d}.dcm"
            p.write_bytes(encode(ds))
            files.append(p.name)
        return Case(name, category, str(uid(name, "series")), files, send, expect, why)

    return write


def _truncate(fraction: float) -> Callable[[Dataset], bytes]:
    def make(ds: Dataset) -> bytes:
        data = encode(ds)
        start = body_offset(data)
        return data[: start + max(1, int((len(data) - start) * fraction))]

    return make


def _truncate_at(group: int, elem: int, extra: int) -> Callable[[Dataset], bytes]:
    def make(ds: Dataset) -> bytes:
        data = encode(ds)
        return data[: find_tag(data, group, elem, body_offset(data)) + extra]

    return make


def _set_raw(tag: tuple[int, int], vr: str, text: str | int) -> Callable[[Dataset], bytes]:
    """Write element ``tag`` with VR ``vr`` and a value pydicom would refuse to encode (bytes spliced in)."""

    def make(ds: Dataset) -> bytes:
        if tag in ds:
            del ds[tag]
        value = struct.pack("<H", text) if isinstance(text, int) else text.encode()
        if len(value) % 2:
            value += b" "
        data = encode(ds)
        at = top_level_offset(data, tag)
        return data[:at] + element(tag[0], tag[1], vr, value) + data[at:]

    return make


def top_level_offset(data: bytes, tag: tuple[int, int]) -> int:
    """Where element ``tag`` belongs (tag order) among the top-level explicit-VR-LE elements of the body."""
    pos = body_offset(data)
    want = (tag[0] << 16) | tag[1]
    while pos < len(data):
        group, elem = struct.unpack_from("<HH", data, pos)
        if (group << 16) | elem > want:
            return pos
        vr = data[pos + 4:pos + 6].decode()
        if vr in ("OB", "OW", "OF", "SQ", "UT", "UN", "UC", "UR", "OD", "OL", "OV"):
            (length,) = struct.unpack_from("<I", data, pos + 8)
            pos += 12 + length
        else:
            (length,) = struct.unpack_from("<H", data, pos + 6)
            pos += 8 + length
    return pos


def _splice(group: int, elem: int, new: Callable[[bytes, int], bytes]) -> Callable[[Dataset], bytes]:
    """Replace the bytes from element (group, elem) to the end of the file with ``new(data, offset)``."""

    def make(ds: Dataset) -> bytes:
        data = encode(ds)
        at = find_tag(data, group, elem, body_offset(data))
        return data[:at] + new(data, at)

    return make


def _pixel_length_past_eof(data: bytes, at: int) -> bytes:
    pixels = data[at + 12:]
    return element(0x7FE0, 0x0010, "OW", pixels, length=len(pixels) + 100_000)


def _short_length_past_eof(data: bytes, at: int) -> bytes:
    # SeriesDescription claims 60000 bytes; what follows it in the file is far shorter
    (length,) = struct.unpack_from("<H", data, at + 6)
    return element(0x0008, 0x103E, "LO", b"", length=60000) + data[at + 8 + length:]


def _huge_explicit_length(data: bytes, at: int) -> bytes:
    return element(0x0009, 0x0010, "LO", b"SRCORPUS") + element(0x0009, 0x1001, "UN", b"\0" * 8,
                                                                length=0xFFFFFFF0) + data[at:]


def _unclosed_sequence(data: bytes, at: int) -> bytes:
    item = struct.pack("<HHI", 0xFFFE, 0xE000, 0xFFFFFFFF) + element(0x0008, 0x0100, "SH", b"CODE01")
    return data[at:] + struct.pack("<HH", 0x7FE1, 0x0010) + b"SQ\0\0" + struct.pack("<I", 0xFFFFFFFF) + item


def _deep_nesting(depth: int) -> Callable[[bytes, int], bytes]:
    def new(data: bytes, at: int) -> bytes:
        open_ = struct.pack("<HH", 0x0040, 0x0275) + b"SQ\0\0" + struct.pack("<I", 0xFFFFFFFF)
        open_ += struct.pack("<HHI", 0xFFFE, 0xE000, 0xFFFFFFFF)
        close = struct.pack("<HHI", 0xFFFE, 0xE00D, 0) + struct.pack("<HHI", 0xFFFE, 0xE0DD, 0)
        return open_ * depth + close * depth + data[at:]

    return new


def _pixels(nbytes_fn: Callable[[Dataset], int]) -> Callable[[Dataset], Dataset]:
    def make(ds: Dataset) -> Dataset:
        ds.PixelData = bytes(ds.PixelData)[: nbytes_fn(ds)]
        return ds

    return make


def _attrs(**kw: object) -> Callable[[Dataset], Dataset]:
    def make(ds: Dataset) -> Dataset:
        for k, v in kw.items():
            if v is None:
                if k in ds:
                    delattr(ds, k)
            else:
                setattr(ds, k, v)
        return ds

    return make


def _bits(allocated: int) -> Callable[[Dataset], Dataset]:
    def make(ds: Dataset) -> Dataset:
        n = ds.Rows * ds.Columns
        ds.BitsAllocated = allocated
        ds.BitsStored = allocated
        ds.HighBit = allocated - 1
        if allocated == 1:
            ds.PixelRepresentation = 0
            ds.PixelData = np.packbits(np.arange(n) % 3 == 0, bitorder="little").tobytes()
        elif allocated == 8:
            ds.PixelRepresentation = 0
            ds.PixelData = (np.arange(n) % 251).astype(np.uint8).tobytes()
        else:
            ds.PixelData = (np.arange(n, dtype=np.int32) * 1000 - 500_000).tobytes()
        return ds

    return make


def _encapsulated(ts_name: str) -> Callable[[Dataset], bytes]:
    """Pixel Data encapsulated in ``ts`` but the fragments are garbage (decoding must fail with a reason)."""
    ts = {"jpeg": JPEGBaseline8Bit, "j2k": JPEG2000Lossless, "rle": RLELossless}[ts_name]

    def make(ds: Dataset) -> bytes:
        from pydicom.encaps import encapsulate

        if ts_name == "jpeg":
            ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
        ds.PixelData = encapsulate([b"\xff\xd8\xff" + bytes(range(200)) if ts_name == "jpeg" else bytes(300)])
        ds["PixelData"].VR = "OB"
        return encode(ds, ts)

    return make


def _non_image(sop_class: UID, extra: Callable[[Dataset], None]) -> Callable[[Dataset], Dataset]:
    def make(ds: Dataset) -> Dataset:
        keep = ("SpecificCharacterSet", "PatientName", "PatientID", "PatientBirthDate", "PatientSex",
                "StudyInstanceUID", "StudyDate", "StudyTime", "AccessionNumber", "ReferringPhysicianName",
                "StudyID", "SeriesInstanceUID", "SeriesNumber", "SOPInstanceUID", "Manufacturer",
                "InstanceNumber")
        out = Dataset()
        for kw in keep:
            setattr(out, kw, ds.data_element(kw).value)  # type: ignore[union-attr]
        out.SOPClassUID = sop_class
        out.Modality = {BASIC_TEXT_SR: "SR", KEY_OBJECT: "KO", ENCAPSULATED_PDF: "DOC", RT_STRUCT: "RTSTRUCT"}.get(
            sop_class, "OT")
        extra(out)
        return out

    return make


def _pdf(ds: Dataset) -> None:
    ds.MIMETypeOfEncapsulatedDocument = "application/pdf"
    ds.EncapsulatedDocument = b"%PDF-1.4\n%corpus\n" + b"0" * 100 + b"\n%%EOF\n"


def _sr(ds: Dataset) -> None:
    ds.ValueType = "CONTAINER"
    ds.CompletionFlag = "COMPLETE"
    ds.VerificationFlag = "UNVERIFIED"
    item = Dataset()
    item.RelationshipType = "CONTAINS"
    item.ValueType = "TEXT"
    item.TextValue = "no findings (corpus)"
    ds.ContentSequence = DicomSequence([item])


def _nothing(ds: Dataset) -> None:
    return None


def _mixed_signedness(name: str) -> Iterator[Dataset]:
    for i in range(4):
        yield base_slice(name, i, signed=i % 2 == 0)


def _mixed_orientation(name: str) -> Iterator[Dataset]:
    for i in range(4):
        yield base_slice(name, i, orientation=(1, 0, 0, 0, 1, 0) if i < 2 else (0, 1, 0, 0, 0, -1))


def _duplicate_positions(name: str) -> Iterator[Dataset]:
    for i in range(4):
        yield base_slice(name, i, z=10.0)


def _single_slice(name: str) -> Iterator[Dataset]:
    yield base_slice(name, 0)


def _no_geometry(name: str) -> Iterator[Dataset]:
    for i in range(3):
        ds = base_slice(name, i)
        del ds.ImagePositionPatient, ds.ImageOrientationPatient
        yield ds


def _mixed_matrix(name: str) -> Iterator[Dataset]:
    for i in range(4):
        yield base_slice(name, i, rows=SIZE if i < 2 else SIZE // 2, cols=SIZE if i < 2 else SIZE // 2)


def _non_parallel_tilted(name: str) -> Iterator[Dataset]:
    # positions do not lie along the slice normal by a constant step: z jumps and x drifts wildly
    for i, z in enumerate((0.0, 5.0, 37.0, 41.0)):
        ds = base_slice(name, i, z=z)
        ds.ImagePositionPatient = [-8.0 + 20 * i, -8.0, z]
        yield ds


def _mixed_spacing(name: str) -> Iterator[Dataset]:
    for i in range(4):
        ds = base_slice(name, i)
        ds.PixelSpacing = [0.5, 0.5] if i < 2 else [0.8, 0.8]
        yield ds


def _mixed_modality_units(name: str) -> Iterator[Dataset]:
    for i in range(4):
        ds = base_slice(name, i)
        ds.RescaleSlope = 1 if i < 2 else 2.5
        ds.RescaleIntercept = -1024 if i % 2 else 0
        yield ds


def _nan_spacing_series(name: str) -> Iterator[Dataset]:
    for i in range(3):
        ds = base_slice(name, i)
        ds["PixelSpacing"] = DataElement(0x00280030, "DS", "nan\\nan")
        yield ds


def _zero_spacing_series(name: str) -> Iterator[Dataset]:
    for i in range(3):
        ds = base_slice(name, i)
        ds.PixelSpacing = [0, 0]
        yield ds


def cases() -> list[Writer]:
    """Every crafted case (≥ 50 files once the multi-file series are counted)."""
    n = SIZE * SIZE * 2
    return [
        # -- truncated files (inside the body: the file meta must survive for the sender to name the SOP)
        _single("trunc_body_1pct", "truncated", _truncate(0.01), why="file cut 1% into the dataset"),
        _single("trunc_body_half", "truncated", _truncate(0.5), why="file cut in the middle of the pixels"),
        _single("trunc_last_byte", "truncated", _truncate(0.9995), why="last bytes of Pixel Data missing"),
        _single("trunc_in_rows_tag", "truncated", _truncate_at(0x0028, 0x0010, 3), why="cut inside a tag"),
        _single("trunc_pixel_header", "truncated", _truncate_at(0x7FE0, 0x0010, 10),
                why="cut inside the Pixel Data element header"),
        # -- wrong VRs / malformed values
        _single("vr_rows_as_ds", "wrong_vr", _set_raw((0x0028, 0x0010), "DS", "32"), why="Rows encoded as DS"),
        _single("vr_spacing_as_us", "wrong_vr", _set_raw((0x0028, 0x0030), "US", 5), why="PixelSpacing as US"),
        _single("vr_ipp_text", "wrong_vr", _set_raw((0x0020, 0x0032), "LO", "abc\\def\\ghi"),
                why="ImagePositionPatient not numbers"),
        _single("vr_iop_five_values", "wrong_vr", _set_raw((0x0020, 0x0037), "DS", "1\\0\\0\\0\\1"),
                why="ImageOrientationPatient with 5 values"),
        _single("vr_ipp_two_values", "wrong_vr", _set_raw((0x0020, 0x0032), "DS", "1\\2"),
                why="ImagePositionPatient with 2 values"),
        _single("vr_slope_text", "wrong_vr", _set_raw((0x0028, 0x1053), "DS", "x"), why="RescaleSlope 'x'"),
        _single("vr_bits_as_text", "wrong_vr", _set_raw((0x0028, 0x0100), "LO", "sixteen"),
                why="BitsAllocated as text"),
        _single("vr_thickness_text", "wrong_vr", _set_raw((0x0018, 0x0050), "DS", "thick"),
                why="SliceThickness not a number"),
        # -- lengths past end of file
        _single("len_pixel_past_eof", "length", _splice(0x7FE0, 0x0010, _pixel_length_past_eof),
                why="Pixel Data length 100 kB past EOF"),
        _single("len_short_past_eof", "length", _splice(0x0008, 0x103E, _short_length_past_eof),
                why="a LO claims 60000 bytes at the end of a short file"),
        _single("len_huge_explicit", "length", _splice(0x0010, 0x0010, _huge_explicit_length),
                why="an UN element claims 4 GB"),
        _single("len_unclosed_sequence", "length", _splice(0x7FE0, 0x0010, _unclosed_sequence),
                why="undefined-length sequence never closed"),
        _single("deep_nesting_400", "length", _splice(0x0020, 0x000D, _deep_nesting(400)),
                why="sequences nested 400 deep"),
        # -- pixel data missing / empty / short
        _single("pixels_missing", "pixels", _attrs(PixelData=None), why="no Pixel Data"),
        _single("pixels_empty", "pixels", _pixels(lambda ds: 0), why="empty Pixel Data"),
        _single("pixels_half", "pixels", _pixels(lambda ds: n // 2), why="Pixel Data half of Rows x Columns"),
        _single("pixels_one_short", "pixels", _pixels(lambda ds: n - 2), why="Pixel Data one pixel short"),
        _single("pixels_frames_short", "pixels", _attrs(NumberOfFrames=5),
                why="NumberOfFrames 5, one frame of pixels"),
        _single("rows_65535", "pixels", _attrs(Rows=65535, Columns=65535), why="Rows x Columns 65535^2"),
        _single("rows_zero", "pixels", _attrs(Rows=0), why="Rows 0"),
        _single("columns_zero", "pixels", _attrs(Columns=0), why="Columns 0"),
        _single("frames_huge", "pixels", _attrs(NumberOfFrames=2_000_000_000), why="2e9 frames claimed"),
        # -- bit depths
        _single("bits_1", "bits", _bits(1), why="BitsAllocated 1"),
        _single("bits_8", "bits", _bits(8), why="BitsAllocated 8 in a CT"),
        _single("bits_32", "bits", _bits(32), why="BitsAllocated 32"),
        _single("bits_stored_17", "bits", _attrs(BitsStored=17, HighBit=16), why="BitsStored > BitsAllocated"),
        _single("bits_allocated_12", "bits", _attrs(BitsAllocated=12), why="BitsAllocated 12 (not byte aligned)"),
        _single("samples_3_mono", "bits", _attrs(SamplesPerPixel=3), why="SamplesPerPixel 3 with MONOCHROME2"),
        _single("photometric_palette", "bits", _attrs(PhotometricInterpretation="PALETTE COLOR"),
                why="PALETTE COLOR without a palette"),
        # -- transfer syntaxes
        _single("ts_private", "transfer_syntax", lambda ds: encode(ds, UID("1.2.826.0.1.3680043.10.1087.99.77")),
                expect="refuse", why="a private transfer syntax nobody can decode"),
        _single("ts_jpeg_garbage", "transfer_syntax", _encapsulated("jpeg"), why="JPEG fragments are garbage"),
        _single("ts_j2k_garbage", "transfer_syntax", _encapsulated("j2k"), why="JPEG 2000 codestream of zeros"),
        _single("ts_rle_garbage", "transfer_syntax", _encapsulated("rle"), why="RLE segments of zeros"),
        _single("ts_meta_lies_implicit", "transfer_syntax",
                lambda ds: _relabel_ts(encode(ds), UID("1.2.840.10008.1.2")),
                why="file meta says Implicit VR, body is Explicit VR"),
        # -- non-image SOP classes
        _single("sop_basic_text_sr", "non_image", _non_image(BASIC_TEXT_SR, _sr), why="Basic Text SR"),
        _single("sop_encapsulated_pdf", "non_image", _non_image(ENCAPSULATED_PDF, _pdf), why="Encapsulated PDF"),
        _single("sop_rtstruct", "non_image", _non_image(RT_STRUCT, _nothing), why="RT Structure Set, empty"),
        _single("sop_key_object", "non_image", _non_image(KEY_OBJECT, _nothing), why="Key Object Selection"),
        _single("sop_raw_data", "non_image", _non_image(RAW_DATA, _nothing), why="Raw Data Storage"),
        # -- UIDs
        _single("uid_sop_class_empty", "uid", lambda ds: encode(_attrs(SOPClassUID="")(ds), meta_sop_class=CT_IMAGE),
                why="SOPClassUID present but empty (file meta says CT)"),
        _single("uid_series_missing", "uid", _attrs(SeriesInstanceUID=None), why="no SeriesInstanceUID"),
        _single("uid_study_missing", "uid", _attrs(StudyInstanceUID=None), why="no StudyInstanceUID"),
        _single("uid_instance_mismatch", "uid",
                lambda ds: encode(ds, meta_sop_instance=str(uid("mismatch", "other"))),
                why="SOPInstanceUID differs from the file meta and the C-STORE request"),
        _single("uid_bad_chars", "uid", _set_raw((0x0020, 0x000E), "UI", "1.2.abc.4/../../etc"),
                why="SeriesInstanceUID with letters and path separators"),
        _single("uid_too_long", "uid", _set_raw((0x0020, 0x000E), "UI", "1." + "2" * 90),
                why="SeriesInstanceUID longer than 64 characters"),
        _single("charset_unknown", "uid", _attrs(SpecificCharacterSet="ISO_IR 999", SeriesDescription="\u00e9t\u00e9"),
                why="unknown SpecificCharacterSet"),
        _single("spacing_negative", "geometry", _attrs(PixelSpacing=[-0.5, 0.5]), why="negative PixelSpacing"),
        _single("iop_not_unit", "geometry", _attrs(ImageOrientationPatient=[0, 0, 0, 0, 0, 0]),
                why="ImageOrientationPatient all zeros"),
        # -- series-level defects (several files each)
        _series("series_mixed_signedness", "series", _mixed_signedness, why="signed and unsigned slices mixed"),
        _series("series_mixed_orientation", "series", _mixed_orientation, why="axial and sagittal slices mixed"),
        _series("series_duplicate_positions", "series", _duplicate_positions, why="four slices at one position"),
        _series("series_single_slice", "series", _single_slice, why="a one-slice 'series'"),
        _series("series_no_geometry", "series", _no_geometry, why="no ImagePositionPatient/Orientation"),
        _series("series_mixed_matrix", "series", _mixed_matrix, why="32x32 and 16x16 slices mixed"),
        _series("series_irregular_positions", "series", _non_parallel_tilted,
                why="positions neither on one line nor evenly stepped"),
        _series("series_mixed_spacing", "series", _mixed_spacing, why="PixelSpacing differs between slices"),
        _series("series_mixed_rescale", "series", _mixed_modality_units,
                why="RescaleSlope/Intercept differ between slices (must be honoured per slice, or refused)",
                expect="either"),
        _series("series_nan_spacing", "series", _nan_spacing_series, why="PixelSpacing 'nan'"),
        _series("series_zero_spacing", "series", _zero_spacing_series, why="PixelSpacing 0"),
    ]


def _relabel_ts(data: bytes, ts: UID) -> bytes:
    """Change the file meta's TransferSyntaxUID in place (same length, padded) without re-encoding the body."""
    at = find_tag(data, 0x0002, 0x0010)
    (length,) = struct.unpack_from("<H", data, at + 6)
    value = str(ts).encode()
    value = value + b"\0" * (length - len(value))
    if len(value) != length:
        raise ValueError("transfer syntax UID does not fit")
    return data[: at + 8] + value + data[at + 8 + length:]


def good_series(out: Path, name: str = "good_series", slices: int = 8) -> Case:
    """A clean CT series (``slices`` x 32 x 32, 5 mm) that must be processed and delivered."""
    out.mkdir(parents=True, exist_ok=True)
    files = []
    for i in range(slices):
        p = out / f"{name}_{i:02d}.dcm"
        p.write_bytes(encode(base_slice(name, i)))
        files.append(p.name)
    return Case(name, "good", str(uid(name, "series")), files, "storescu", "accept", "clean series")


def make_corpus(out: Path) -> list[Case]:
    """Write every case into ``out`` (and ``manifest.json``); returns the cases."""
    out.mkdir(parents=True, exist_ok=True)
    written = [w(out) for w in cases()]
    (out / "manifest.json").write_text(json.dumps([asdict(c) for c in written], indent=1) + "\n")
    return written


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print(__doc__, file=sys.stderr)
        return 2
    written = make_corpus(Path(argv[0]))
    print(f"{sum(len(c.files) for c in written)} files in {len(written)} cases written to {argv[0]}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
