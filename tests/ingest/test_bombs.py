"""Instances that would make the node hold far more than it was sent, against the real node process (hostile16).

- a C-STORE (or a STOW-RS part) on the Deflated Explicit VR Little Endian transfer syntax whose ~200 KB of deflate
  stream inflate to 200 MiB: pydicom inflates a deflated file whole, so the header check held it twice (a 1 MB
  stream of zeros: +2 GB, 10 s) and accepted it;
- a plain C-STORE holding a 40 MiB private element before its pixel data: the header check read the value;
- an N-EVENT-REPORT (Storage Commitment, open to any caller of the node's AE title) whose deflated event
  information inflates to 1 GiB: pynetdicom inflates it whole before the node looks at who sent it.

The node's memory is read from /proc (VmHWM reset by ``clear_refs``); nothing here waits on time.
"""

from __future__ import annotations

import io
import struct
import zlib
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset, write_file_meta_info
from pydicom.uid import DeflatedExplicitVRLittleEndian, ExplicitVRLittleEndian, SecondaryCaptureImageStorage
from pynetdicom import AE
from pynetdicom.dimse_primitives import N_EVENT_REPORT
from pynetdicom.pdu_primitives import SCP_SCU_RoleSelectionNegotiation
from pynetdicom.sop_class import StorageCommitmentPushModel  # type: ignore[attr-defined]

from node.app.phantom import write_phantom_series
from tests.support.nodeproc import NodeProc
from tests.support.pacs import TOKEN, start_node

MiB = 1 << 20
CAP_MB = 64  # [node] max_instance_mb in these tests


def _status_kb(pid: int, key: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise AssertionError(f"{key} not in /proc/{pid}/status")


class Peak:
    """The node's peak RSS growth (MB) over what happens inside the ``with``: VmHWM reset on entry."""

    def __init__(self, node: NodeProc) -> None:
        self.pid = node.proc.pid if node.proc else 0
        self.growth_mb = 0.0

    def __enter__(self) -> Peak:
        self.before = _status_kb(self.pid, "VmRSS")
        Path(f"/proc/{self.pid}/clear_refs").write_text("5")
        return self

    def __exit__(self, *exc: object) -> None:
        self.growth_mb = (_status_kb(self.pid, "VmHWM") - self.before) / 1024


def _zeros_element(size: int) -> bytes:
    """The head of a (0009,1010) OB element of ``size`` bytes (explicit VR little endian)."""
    return struct.pack("<HH2sHL", 0x0009, 0x1010, b"OB", 0, size)


def _instance(tmp: Path, seed: int, *, zeros: int, deflated: bool, secondary: bool = False) -> Path:
    """A real phantom CT slice (or, ``secondary``, the same as a Secondary Capture of Modality OT, which no rule
    takes) as a Part 10 file with ``zeros`` bytes of a private OB element before its pixel data, its data set
    deflated when ``deflated`` (the deflate stream written chunk by chunk: this process never holds it whole)."""
    src = write_phantom_series(tmp / f"src-{seed}", slices=1, size=32, step_mm=3.0, seed=seed)[0]
    ds = dcmread(src)
    if secondary:
        ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
        ds.Modality = "OT"
    pixels = ds.PixelData
    del ds.PixelData
    body = DicomBytesIO()
    body.is_little_endian, body.is_implicit_VR = True, False
    write_dataset(body, ds)
    ds.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian if deflated else ExplicitVRLittleEndian
    meta = DicomBytesIO()
    meta.is_little_endian, meta.is_implicit_VR = True, False
    write_file_meta_info(meta, ds.file_meta)
    out = tmp / f"{'deflated' if deflated else 'plain'}-{seed}.dcm"
    pixel_element = struct.pack("<HH2sHL", 0x7FE0, 0x0010, b"OW", 0, len(pixels)) + pixels
    with out.open("wb") as fh:
        fh.write(b"\0" * 128 + b"DICM" + meta.getvalue())
        for chunk in _stream([body.getvalue(), _zeros_element(zeros) if zeros else b""], zeros,
                             [pixel_element], deflated):
            fh.write(chunk)
    return out


def _stream(head: list[bytes], zeros: int, tail: list[bytes], deflated: bool) -> Iterator[bytes]:
    """``head``, ``zeros`` zero bytes, ``tail``; deflated (raw deflate, PS3.5 A.5) when asked."""
    deflate = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)

    def out(data: bytes) -> bytes:
        return deflate.compress(data) if deflated else data

    for part in head:
        yield out(part)
    block = bytes(MiB)
    left = zeros
    while left:
        n = min(left, MiB)
        yield out(block[:n])
        left -= n
    for part in tail:
        yield out(part)
    if deflated:
        yield deflate.flush()


def _store(node: NodeProc, path: Path, syntax: str) -> int:
    """C-STORE of the file at ``path`` on a context of ``syntax`` (pynetdicom streams it from the file); the
    response status."""
    ds = dcmread(path, stop_before_pixels=True, defer_size=1024)
    ae = AE(ae_title="BOMBER")
    ae.add_requested_context(str(ds.SOPClassUID), [syntax])
    assoc = ae.associate("127.0.0.1", node.port, ae_title=node.ae_title)
    assert assoc.is_established
    try:
        status = assoc.send_c_store(path)
        return int(status.Status)
    finally:
        assoc.release()


@pytest.fixture(params=["lean", "pynetdicom"])
def node(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[NodeProc]:
    proc = start_node(tmp_path / "node", {"node": {"max_instance_mb": CAP_MB, "receive_path": request.param}})
    try:
        yield proc
    finally:
        proc.stop()


def test_a_deflate_bomb_is_refused_with_0xa700_without_inflating_it_in_memory(node: NodeProc,
                                                                                 tmp_path: Path) -> None:
    """hostile16: a 200 MiB deflated data set in ~200 KB of stream (C-STORE and a STOW-RS part) was inflated whole
    (node +400 MB) and stored; now refused 0xC211 (0xA700 until break18b) naming node.max_instance_mb, memory flat, no copy left in
    incoming/. A deflated instance within the limit is still stored, as is a plain one holding a 40 MiB private
    element, whose value the header check no longer reads."""
    bomb = _instance(tmp_path, 1, zeros=200 * MiB, deflated=True)
    assert bomb.stat().st_size < 2 * MiB
    with Peak(node) as peak:
        status = _store(node, bomb, DeflatedExplicitVRLittleEndian)
    assert status == 0xC211, hex(status)  # 0xA700 until break18b: a sender tried it again for an hour
    assert peak.growth_mb < 48, f"the node grew by {peak.growth_mb:.0f} MB on a {bomb.stat().st_size} byte bomb"
    assert "node.max_instance_mb = 64" in node.log()

    body = (b"--b1\r\nContent-Type: application/dicom\r\n\r\n" + bomb.read_bytes() + b"\r\n--b1--\r\n")
    with Peak(node) as peak:
        r = httpx.post(f"{node.http_url}/dicom-web/studies", content=body, timeout=60,
                       headers={"Authorization": f"Bearer {TOKEN}",
                                "Content-Type": 'multipart/related; type="application/dicom"; boundary=b1'})
    assert r.status_code == 409, r.text
    assert "49681" in r.text, r.text  # FailureReason 0xC211 (node.dimse.Status.TOO_LARGE)
    assert "max_instance_mb" in r.headers.get("warning", ""), r.headers
    assert peak.growth_mb < 48, f"the node grew by {peak.growth_mb:.0f} MB on a STOW-RS bomb"

    small = _instance(tmp_path, 2, zeros=0, deflated=True)
    assert _store(node, small, DeflatedExplicitVRLittleEndian) == 0x0000
    big = _instance(tmp_path, 3, zeros=40 * MiB, deflated=False, secondary=True)
    with Peak(node) as peak:
        assert _store(node, big, ExplicitVRLittleEndian) == 0x0000
    assert peak.growth_mb < 24, f"the node grew by {peak.growth_mb:.0f} MB on a 40 MiB private element"
    stored = sorted(p.stat().st_size for p in (node.spool / "instances").rglob("*.dcm"))
    assert len(stored) == 2 and stored[-1] > 40 * MiB
    assert list((node.spool / "incoming").iterdir()) == []


def test_a_deflated_storage_commitment_report_is_not_taken(tmp_path: Path) -> None:
    """hostile16: the Storage Commitment context (any caller of the node's AE title may open it) took the deflated
    transfer syntax, and pynetdicom inflates an N-EVENT-REPORT's event information whole, before the node asks who
    sent it: 1 MB of stream, 1 GiB in memory. Now that context is accepted only on the uncompressed syntaxes: a
    requestor offering Deflated alone has it refused, one offering it beside Explicit VR gets Explicit VR."""
    node = start_node(tmp_path / "node", {})
    try:
        for offered, expect in (([DeflatedExplicitVRLittleEndian], None),
                                ([DeflatedExplicitVRLittleEndian, ExplicitVRLittleEndian], ExplicitVRLittleEndian)):
            ae = AE(ae_title="BOMBER")
            ae.add_requested_context(StorageCommitmentPushModel, offered)
            role = SCP_SCU_RoleSelectionNegotiation()
            role.sop_class_uid, role.scu_role, role.scp_role = StorageCommitmentPushModel, False, True
            assoc = ae.associate("127.0.0.1", node.port, ae_title=node.ae_title, ext_neg=[role])
            accepted = [cx for cx in assoc.accepted_contexts if cx.abstract_syntax == StorageCommitmentPushModel]
            if expect is None and accepted:  # the weakness: send the bomb and see what the node does
                with Peak(node) as peak:
                    status = _report(assoc, accepted[0].context_id, 1 << 30)
                assoc.release()
                pytest.fail(f"a deflated Storage Commitment context was accepted: a 1 GiB report answered "
                            f"{status}, node +{peak.growth_mb:.0f} MB")
            assert [cx.transfer_syntax[0] for cx in accepted] == ([] if expect is None else [expect])
            if assoc.is_established:
                assoc.release()
        assert node.echo()
    finally:
        node.stop()


def _report(assoc: object, context_id: int, zeros: int) -> str:
    """Send an N-EVENT-REPORT whose event information is a deflated data set holding ``zeros`` zero bytes; its
    answer's status (or what happened instead)."""
    stream = io.BytesIO()
    info = DicomBytesIO()
    info.is_little_endian, info.is_implicit_VR = True, False
    head = Dataset()
    head.TransactionUID = "1.2.3.4"
    write_dataset(info, head)
    for chunk in _stream([info.getvalue(), _zeros_element(zeros)], zeros, [], True):
        stream.write(chunk)
    stream.seek(0)
    req = N_EVENT_REPORT()
    req.MessageID = 1
    req.AffectedSOPClassUID = StorageCommitmentPushModel
    req.AffectedSOPInstanceUID = "1.2.840.10008.1.20.1.1"
    req.EventTypeID = 1
    req.EventInformation = stream
    dimse = assoc.dimse  # type: ignore[attr-defined]
    dimse.send_msg(req, context_id)
    _, rsp = dimse.get_msg(block=True)
    return "no answer" if rsp is None else hex(int(rsp.Status))


def _with_element(tmp: Path, name: str, group: int, elem: int, vr: bytes, size: int) -> Path:
    """A phantom CT slice (explicit VR little endian) with one element of ``size`` bytes of b"1" added: in the
    file meta for group 2, else in the data set (in tag order, replacing any element of that tag)."""
    src = write_phantom_series(tmp / f"src-{name}", slices=1, size=16, step_mm=3.0, seed=11)[0]
    ds = dcmread(src)
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta, body = DicomBytesIO(), DicomBytesIO()
    for b in (meta, body):
        b.is_little_endian, b.is_implicit_VR = True, False
    head = struct.pack("<HH2s", group, elem, vr) + (struct.pack("<HL", 0, size) if vr in (b"OB", b"UT", b"UN")
                                                    else struct.pack("<H", size))
    out = tmp / f"{name}.dcm"
    if group == 2:
        write_file_meta_info(meta, ds.file_meta)
        write_dataset(body, ds)
        parts = [meta.getvalue(), head, b"1" * size, body.getvalue()]
    else:
        write_file_meta_info(meta, ds.file_meta)
        before, after = Dataset(), Dataset()
        for e in ds:
            if e.tag != (group << 16 | elem):
                (before if e.tag < (group << 16 | elem) else after).add(e)
        first, second = DicomBytesIO(), DicomBytesIO()
        for b in (first, second):
            b.is_little_endian, b.is_implicit_VR = True, False
        write_dataset(first, before)
        write_dataset(second, after)
        parts = [meta.getvalue(), first.getvalue(), head, b"1" * size, second.getvalue()]
    with out.open("wb") as fh:
        fh.write(b"\0" * 128 + b"DICM")
        for p in parts:
            fh.write(p)
    return out


@pytest.mark.parametrize(("name", "group", "elem", "vr", "size"), [
    ("uid", 0x0008, 0x0018, b"UN", 64 * MiB),  # SOPInstanceUID of 64 MiB (UN: a 4-byte length)
    ("images", 0x0020, 0x1002, b"UN", 64 * MiB),  # ImagesInAcquisition
    ("meta", 0x0002, 0x0102, b"OB", 64 * MiB),  # PrivateInformation in the file meta
])
def test_a_header_value_of_megabytes_is_refused_without_reading_it(tmp_path: Path, name: str, group: int,
                                                                    elem: int, vr: bytes, size: int) -> None:
    """hostile16: the values the header check reads (UIDs, Modality, the size hints) and the file meta were read
    whatever their length (a 64 MiB SOPInstanceUID: +64 MB in the check). Now 0xC210 naming it, memory flat."""
    import tracemalloc

    from node.errors import IngestError
    from node.ingest.admit import read_header

    path = _with_element(tmp_path, name, group, elem, vr, size)
    tracemalloc.start()
    try:
        with pytest.raises(IngestError) as err:
            read_header(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert err.value.status == 0xC210, str(err.value)
    assert peak < 4 * MiB, f"{peak / MiB:.0f} MiB traced reading the header"
    assert "bytes long: not a header value" in str(err.value) or "file meta ends at byte" in str(err.value)
