"""What srnode writes is what the PACS holds: the derived slices, the uncertainty Parametric Map and card and a
rejection note, sent by each delivery path (C-STORE, STOW-RS, Orthanc REST) into a real Orthanc 1.10.1 with its
DICOMweb plugin, read back (REST file download; WADO-RS for the STOW-RS path) and compared with the files the node
wrote: byte for byte, else element by element (the differing elements named), transfer syntax included.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest
from dicomweb_client import DICOMwebClient
from pydicom.dataset import Dataset

from node.config import (
    DicomDestination,
    DicomwebDestination,
    OrthancDestination,
    UncertaintyObject,
    load_config,
    replace,
)
from node.derived.iocm import rejection_note
from node.process import process_series
from node.send import make_sender
from tests.support.engines import SIGMA_TEST_ENGINE, sigma_engines
from tests.support.pacs import orthanc_dicomweb
from tests.support.peers import Orthanc
from tests.support.series import edited_phantom


@pytest.fixture(scope="module")
def web_orthanc(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Orthanc]:
    o = orthanc_dicomweb(tmp_path_factory.mktemp("orthanc-paths"))
    yield o
    o.stop()


def _elements(ds: Dataset, prefix: str = "") -> dict[str, tuple[str, object]]:
    """Every element of ``ds`` (nested sequences flattened as path -> (VR, value)); pixel data by its bytes."""
    out: dict[str, tuple[str, object]] = {}
    for elem in ds:
        key = f"{prefix}{elem.tag}"
        if elem.VR == "SQ":
            for i, item in enumerate(elem.value):
                out.update(_elements(item, f"{key}[{i}]."))
            out[key] = ("SQ", len(elem.value))
        else:
            out[key] = (str(elem.VR), elem.value)
    return out


def differences(written: Path, held: bytes) -> list[str]:
    """What differs between the file the node wrote and the bytes the PACS gives back: [] when byte for byte equal,
    else the transfer syntax and each element added, lost or changed (named by keyword)."""
    mine = written.read_bytes()
    if mine == held:
        return []
    a = pydicom.dcmread(written)
    b = pydicom.dcmread(pydicom.filebase.DicomBytesIO(held))
    out = []
    if a.file_meta.TransferSyntaxUID != b.file_meta.TransferSyntaxUID:
        out.append(f"transfer syntax {a.file_meta.TransferSyntaxUID.name} -> {b.file_meta.TransferSyntaxUID.name}")
    ea, eb = _elements(a), _elements(b)
    for k in sorted(set(ea) | set(eb)):
        if ea.get(k) != eb.get(k):
            tag = k.rsplit(".", 1)[-1]
            name = pydicom.datadict.keyword_for_tag(int(re.sub(r"[^0-9A-Fa-f]", "", tag), 16)) or tag
            what = "lost" if k not in eb else "added" if k not in ea else "changed"
            out.append(f"{k} {name} {what}")
    return out


def _held(o: Orthanc, sop_uid: str) -> bytes:
    with o.client() as c:
        found = [x for x in c.post("/tools/lookup", content=sop_uid).json() if x["Type"] == "Instance"]
        assert found, f"instance {sop_uid} not in Orthanc"
        r = c.get(f"/instances/{found[0]['ID']}/file")
        r.raise_for_status()
        return r.content


def _objects(tmp_path: Path) -> list[Path]:
    """A 5-slice CT phantom through the sigma-test engine with map and card, and a rejection note of them."""
    files = edited_phantom(tmp_path, lambda k, ds: None, slices=5)
    cfg = load_config(None)
    cfg = replace(cfg, derive=dataclasses.replace(cfg.derive, uncertainty=UncertaintyObject.BOTH))
    res = process_series(files, cfg.rules[0], cfg, tmp_path / "out", engine_name=SIGMA_TEST_ENGINE,
                         engines=sigma_engines())
    written = [*res.derived_files, *res.uncertainty_files]
    note = rejection_note(written, cfg.derive, tmp_path / "ko", "superseded")
    return [*written, note]


def test_differences_names_what_a_pacs_changed(tmp_path: Path) -> None:
    """The comparison itself: an element lost, one changed and another transfer syntax are each named."""
    f = edited_phantom(tmp_path, lambda k, ds: None, slices=2)[0]
    ds = pydicom.dcmread(f)
    del ds.StudyDescription
    ds.PatientName = "QZ^OTHER"
    ds.file_meta.TransferSyntaxUID = pydicom.uid.ImplicitVRLittleEndian
    buf = pydicom.filebase.DicomBytesIO()
    ds.save_as(buf, enforce_file_format=True)
    found = differences(f, buf.getvalue())
    assert "transfer syntax Explicit VR Little Endian -> Implicit VR Little Endian" in found
    assert any("StudyDescription lost" in d for d in found) and any("PatientName changed" in d for d in found)


@pytest.mark.parametrize("path", ["dicom", "dicomweb", "orthanc"])
def test_what_the_node_writes_is_what_orthanc_holds(path: str, tmp_path: Path, web_orthanc: Orthanc) -> None:
    web_orthanc.clear()
    objects = _objects(tmp_path)
    dest = {"dicom": DicomDestination(name="pacs", ae_title=web_orthanc.aet, host="127.0.0.1",
                                      port=web_orthanc.dicom_port),
            "dicomweb": DicomwebDestination(name="web", url=f"{web_orthanc.url}/dicom-web"),
            "orthanc": OrthancDestination(name="rest", url=web_orthanc.url)}[path]
    make_sender(dest).send(objects)
    found = {}
    for p in objects:
        ds = pydicom.dcmread(p, stop_before_pixels=True)
        found[f"{p.parent.name}/{p.name} ({ds.SOPClassUID.name})"] = differences(p, _held(web_orthanc,
                                                                                        str(ds.SOPInstanceUID)))
    assert not any(found.values()), "\n".join(f"{k}: {v}" for k, v in found.items() if v)
    if path == "dicomweb":  # WADO-RS gives back the same data sets (Orthanc re-wraps them in multipart)
        client = DICOMwebClient(f"{web_orthanc.url}/dicom-web")
        for p in objects:
            ds = pydicom.dcmread(p)
            got = client.retrieve_instance(ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID)
            ea, eb = _elements(ds), _elements(got)
            assert {k for k in ea if ea[k] != eb.get(k)} == set(), p.name
