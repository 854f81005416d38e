"""The lean C-STORE receive path (node.ingest.lean) against pynetdicom's (``[node] receive_path``): the same files,
index rows and answers, with real peers (dcmtk storescu, a pynetdicom SCU writing hand-made P-DATA-TF PDUs)."""

from __future__ import annotations

import io
import logging
import os
import struct
import subprocess
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from pydicom import dcmread
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset, write_file_meta_info
from pynetdicom import AE
from pynetdicom.dimse_messages import C_ECHO_RQ as C_ECHO_RQ_MSG
from pynetdicom.dimse_messages import C_STORE_RQ as C_STORE_RQ_MSG
from pynetdicom.dimse_messages import C_STORE_RSP as C_STORE_RSP_MSG
from pynetdicom.dimse_primitives import C_ECHO, C_STORE
from pynetdicom.dsutils import create_file_meta
from pynetdicom.pdu import P_DATA_TF
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from node.app.phantom import write_phantom_series
from node.config import ReceivePath, config_from_dict
from node.dimse import Status
from node.errors import ConfigError
from node.ingest import StoreSCP
from node.ingest.lean import (
    LeanHooks,
    StoreCommand,
    file_meta_bytes,
    parse_store_command,
    store_rsp_command,
    store_rsp_pdus,
)
from tests.ingest.test_scp import start_scp
from tests.support.fixtures import shared_series
from tests.support.peers import STORESCU, wait_until

CT = "1.2.840.10008.5.1.4.1.1.2"
MR = "1.2.840.10008.5.1.4.1.1.4"
EXPLICIT_LE = "1.2.840.10008.1.2.1"
PRIVATE = "1.2.826.0.1.3680043.10.1087.99.1"


# ------------------------------------------------------------------------------------ encodings (no network)

def test_receive_path_setting() -> None:
    assert config_from_dict({}).node.receive_path is ReceivePath.LEAN
    assert config_from_dict({"node": {"receive_path": "pynetdicom"}}).node.receive_path is ReceivePath.PYNETDICOM
    with pytest.raises(ConfigError, match=r"node\.receive_path: 'fast' is not one of lean, pynetdicom"):
        config_from_dict({"node": {"receive_path": "fast"}})


@pytest.mark.parametrize("sop", ["1.2.3.4", "1.2.3.45", "1.2.826.0.1.3680043.8.498.1234567890123456789012345"])
@pytest.mark.parametrize("ts", ["1.2.840.10008.1.2", EXPLICIT_LE, "1.2.840.10008.1.2.4.50"])
def test_file_meta_is_pynetdicoms(sop: str, ts: str) -> None:
    buf = io.BytesIO()
    buf.write(b"\x00" * 128 + b"DICM")
    write_file_meta_info(buf, create_file_meta(sop_class_uid=CT, sop_instance_uid=sop,  # type: ignore[arg-type]
                                               transfer_syntax=ts))  # type: ignore[arg-type]
    assert file_meta_bytes(CT, sop, ts) == buf.getvalue()


def _rq_command(sop_class: str = CT, sop: str = "1.2.3.4", msg_id: int = 7, no_dataset: bool = False,
                **extra: Any) -> bytes:
    req = C_STORE()
    req.MessageID = msg_id
    req.AffectedSOPClassUID = sop_class
    req.AffectedSOPInstanceUID = sop
    req.Priority = 2
    for k, v in extra.items():
        setattr(req, k, v)
    msg = C_STORE_RQ_MSG()
    msg.primitive_to_message(req)
    msg.command_set.CommandDataSetType = 0x0101 if no_dataset else 0x0001
    fp = DicomBytesIO()
    fp.is_little_endian, fp.is_implicit_VR = True, True
    write_dataset(fp, msg.command_set)
    return fp.getvalue()


@pytest.mark.filterwarnings("ignore:Invalid value for VR UI")
def test_store_command_parsed_and_oddities_left_to_pynetdicom() -> None:
    assert parse_store_command(_rq_command(sop="1.2.3.45", msg_id=65535)) == StoreCommand(65535, CT, "1.2.3.45")
    moved = _rq_command(MoveOriginatorApplicationEntityTitle="MOVER", MoveOriginatorMessageID=3)
    assert parse_store_command(moved) == StoreCommand(7, CT, "1.2.3.4")
    good = _rq_command()
    assert parse_store_command(good[:-3]) is None  # truncated
    assert parse_store_command(good + struct.pack("<HHL", 0, 0x0900, 2) + b"\0\0") is None  # out of order
    assert parse_store_command(good + struct.pack("<HHL", 0, 0x5555, 2) + b"\0\0") is None  # unknown element
    assert parse_store_command(b"\xff" * 40) is None
    assert parse_store_command(_rq_command(sop="1.2.x")) is None  # not a plain UID: pynetdicom's business


@pytest.mark.parametrize("max_pdu", [0, 16382, 40])
@pytest.mark.parametrize("status", [0x0000, 0xA700, 0xC210])
def test_store_rsp_is_pynetdicoms(max_pdu: int, status: int) -> None:
    cmd = StoreCommand(12, CT, "1.2.3.45")
    rsp = C_STORE()
    rsp.MessageIDBeingRespondedTo = 12
    rsp.AffectedSOPClassUID = CT
    rsp.AffectedSOPInstanceUID = "1.2.3.45"
    rsp.Status = status
    msg = C_STORE_RSP_MSG()
    msg.primitive_to_message(rsp)
    want = b""
    for p in msg.encode_msg(5, max_pdu):
        pdu = P_DATA_TF()
        pdu.from_primitive(p)
        want += pdu.encode()
    assert store_rsp_pdus(cmd, status, 5, max_pdu) == want
    assert len(store_rsp_command(cmd, status)) < 200


# ------------------------------------------------------------------------------------ real peers

class _Counting:
    """Wraps the SCP's lean hooks to count the C-STOREs stored on the lean path."""

    def __init__(self, scp: StoreSCP) -> None:
        server: Any = scp._server
        hooks: LeanHooks = server.lean_hooks
        self.n = 0

        def store(*args: Any) -> int:
            self.n += 1
            return hooks.store(*args)

        server.lean_hooks = LeanHooks(hooks.incoming, store, hooks.received)


@pytest.fixture
def both(tmp_path: Path) -> Iterator[tuple[StoreSCP, StoreSCP]]:
    lean = start_scp(tmp_path / "lean", receive_path="lean")
    plain = start_scp(tmp_path / "plain", receive_path="pynetdicom")
    assert plain._server is not None and getattr(plain._server, "lean_hooks", None) is None
    yield lean, plain
    # stopped in the reverse order of their starts: each restores the process-wide settings it found
    # (pynetdicom's STORE_RECV_CHUNKED_DATASET, tempfile.tempdir), so the first started must be the last stopped
    plain.stop()
    lean.stop()


def _storescu(files: list[Path], port: int, *extra: str) -> subprocess.CompletedProcess[str]:
    cmd = [STORESCU, "-aec", "SRNODE", "-aet", "STORESCU", *extra, "127.0.0.1", str(port), *map(str, files)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, env={**os.environ, "TCP_NODELAY": "1"})


def _spool(scp: StoreSCP) -> dict[str, bytes]:
    root = scp.admission.spool.root / "instances"
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*.dcm"))}


def _rows(scp: StoreSCP) -> list[Any]:
    """Every instance row (path relative to the spool) and the series rows' counts and attributes."""
    index, root = scp.admission.index, scp.admission.spool.root
    out: list[Any] = []
    for s in index.all_series():
        out.append((s["study_uid"], s["series_uid"], s["n_instances"], s["modality"], s["calling_ae"]))
        rows = [replace(i, path=str(Path(i.path).relative_to(root)))
                for i in index.instances_of(s["series_uid"], s["study_uid"])]
        out += sorted(rows, key=lambda i: i.sop_uid)
    return out


def _incoming(scp: StoreSCP) -> list[Path]:
    return list(scp.admission.spool.incoming.iterdir())


def test_storescu_series_lean_gives_the_same_files_and_rows(both: tuple[StoreSCP, StoreSCP]) -> None:
    files = sorted(shared_series("ct_head_phantom_philips_5mm").glob("*.dcm"))
    lean, plain = both
    counted = _Counting(lean)
    for scp in both:
        r = _storescu(files, scp.cfg.node.port)
        assert r.returncode == 0, r.stderr
    assert counted.n == len(files)
    a, b = _spool(lean), _spool(plain)
    assert len(a) == len(files) and a == b  # byte-identical, under the same names
    rows = _rows(lean)
    assert rows == _rows(plain) and len(rows) == 1 + len(files)
    wait_until(lambda: not _incoming(lean) and not _incoming(plain), 10, what="incoming/ empty")


def test_storescu_small_pdus_and_echo(both: tuple[StoreSCP, StoreSCP], tmp_path: Path) -> None:
    """A data set split across many P-DATA-TF PDUs (storescu --max-send-pdu 4096), then a C-ECHO on the same
    path: stored, answered."""
    files = write_phantom_series(tmp_path / "ph", slices=3, size=64)
    lean, plain = both
    counted = _Counting(lean)
    for scp in both:
        r = _storescu(files, scp.cfg.node.port, "--max-send-pdu", "4096")
        assert r.returncode == 0, r.stderr
    assert counted.n == 3
    assert _spool(lean) == _spool(plain)
    ae = AE(ae_title="PYSCU")
    ae.add_requested_context(Verification)
    assoc = ae.associate("127.0.0.1", lean.cfg.node.port, ae_title="SRNODE")
    assert assoc.is_established
    assert int(assoc.send_c_echo().Status) == 0
    assoc.release()


# ------------------------------------------------------------------------------------ hand-made PDUs

def _pdu(*pdvs: tuple[int, int, bytes]) -> bytes:
    items = b"".join(struct.pack(">LBB", 2 + len(d), cx, ctl) + d for cx, ctl, d in pdvs)
    return struct.pack(">BBL", 0x04, 0, len(items)) + items


def _dataset_bytes(path: Path) -> bytes:
    """The data set of a Part 10 file (explicit VR little endian), without its preamble and file meta."""
    raw = path.read_bytes()
    ds = dcmread(path, stop_before_pixels=True)
    start = 132 + 12 + int(ds.file_meta.FileMetaInformationGroupLength)
    return raw[start:]


class _Peer:
    """A pynetdicom SCU association to ``port`` with a CT context (explicit VR LE) that writes raw PDUs."""

    def __init__(self, port: int) -> None:
        ae = AE(ae_title="RAWSCU")
        ae.add_requested_context(CT, EXPLICIT_LE)
        ae.add_requested_context(Verification)
        ae.add_requested_context(PRIVATE, EXPLICIT_LE)  # not a storage SOP class we know: rejected
        ae.dimse_timeout = 30
        self.assoc = ae.associate("127.0.0.1", port, ae_title="SRNODE")
        assert self.assoc.is_established
        self.cx = next(c.context_id for c in self.assoc.accepted_contexts if c.abstract_syntax == CT)
        self.echo_cx = next(c.context_id for c in self.assoc.accepted_contexts if c.abstract_syntax == Verification)
        self.rejected_cx = next(c.context_id for c in self.assoc.rejected_contexts if c.abstract_syntax == PRIVATE)
        self.assoc._reactor_checkpoint.clear()  # its reactor must not take (and drop) the responses we read
        wait_until(lambda: self.assoc._is_paused, 10, what="the SCU's reactor paused")

    def send(self, *pdus: bytes) -> None:
        """Write ``pdus``; OSError once the node has closed the connection (after its A-ABORT)."""
        for p in pdus:
            sock = self.assoc.dul.socket.socket if self.assoc.dul.socket is not None else None
            if sock is None:
                raise OSError("the association's socket is closed")
            sock.sendall(p)

    def answer(self, timeout: float = 30) -> int | str | None:
        """The status of the next response, None when the association was aborted instead, "silent" when neither
        came within ``timeout`` seconds."""
        try:
            wait_until(lambda: self.assoc.dimse.peek_msg()[1] is not None or self.assoc.acse.is_aborted()
                       or not self.assoc.is_alive(), timeout, what="an answer or an abort")
        except AssertionError:
            return "silent"
        _, msg = self.assoc.dimse.get_msg(block=False)
        if msg is None:
            return None
        return int(msg.Status)

    def close(self) -> None:
        self.assoc._reactor_checkpoint.set()
        if self.assoc.is_established:
            self.assoc.release()


def _outcomes(scps: tuple[StoreSCP, StoreSCP], script: Any) -> list[Any]:
    out = []
    for scp in scps:
        peer = _Peer(scp.cfg.node.port)
        try:
            out.append(script(peer))
        finally:
            peer.close()
    return out


def test_many_pdvs_per_pdu_and_many_pdus(both: tuple[StoreSCP, StoreSCP], tmp_path: Path) -> None:
    f = write_phantom_series(tmp_path / "ph", slices=1, size=64)[0]
    ds = dcmread(f, stop_before_pixels=True)
    data = _dataset_bytes(f)
    cmd = _rq_command(sop_class=CT, sop=str(ds.SOPInstanceUID), msg_id=3)
    lean, plain = both
    counted = _Counting(lean)

    def script(peer: _Peer) -> Any:
        cx = peer.cx
        half = len(cmd) // 2  # the command in two fragments, in two PDUs
        peer.send(_pdu((cx, 0x01, cmd[:half])), _pdu((cx, 0x03, cmd[half:])))
        pieces = [data[i:i + 997] for i in range(0, len(data), 997)]
        for start in range(0, len(pieces), 5):  # 5 PDVs per PDU
            chunk = pieces[start:start + 5]
            last = start + 5 >= len(pieces)
            peer.send(_pdu(*[(cx, 0x02 if last and k == len(chunk) - 1 else 0x00, c) for k, c in enumerate(chunk)]))
        return peer.answer()

    assert _outcomes(both, script) == [Status.SUCCESS, Status.SUCCESS]
    assert counted.n == 1
    assert _spool(lean) == _spool(plain)
    stored = next(iter(_spool(lean).values()))
    assert stored[-len(data):] == data


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
def test_malformed_command_and_foreign_sop_class_answered_as_before(both: tuple[StoreSCP, StoreSCP],
                                                                     tmp_path: Path) -> None:
    """Command sets the lean path does not take go to pynetdicom: the same outcome on both paths."""
    f = write_phantom_series(tmp_path / "ph", slices=1, size=32)[0]
    ds = dcmread(f, stop_before_pixels=True)
    data = _dataset_bytes(f)
    lean, _ = both
    counted = _Counting(lean)

    def store_with(cmd: bytes, timeout: float = 30) -> Any:
        def script(peer: _Peer) -> Any:
            try:
                peer.send(_pdu((peer.cx, 0x03, cmd)), _pdu((peer.cx, 0x02, data)))
            except OSError:  # the node aborted after the command PDU (garbage): its answer is that abort
                pass
            return peer.answer(timeout)
        return script

    # the command names MR on the CT context (the dataset is CT): pynetdicom's path answers 0xA900
    foreign = _outcomes(both, store_with(_rq_command(sop_class=MR, sop=str(ds.SOPInstanceUID))))
    assert foreign[0] == foreign[1] == Status.DATASET_DOES_NOT_MATCH
    # a C-STORE on a context that was rejected: the lean path aborts at the first item (pynetdicom's DUL thread
    # dies on it, test_items_pynetdicom_would_die_on_are_aborted_with_nothing_left); neither path stores it
    def on_rejected(peer: _Peer) -> Any:
        cmd = _rq_command(sop_class=PRIVATE, sop=str(ds.SOPInstanceUID))
        try:
            peer.send(_pdu((peer.rejected_cx, 0x03, cmd)), _pdu((peer.rejected_cx, 0x02, data)))
        except OSError:  # the node aborted after the first PDU
            pass
        return peer.answer(10)
    rejected = _outcomes(both, on_rejected)
    assert rejected[0] is None and rejected[1] not in (Status.SUCCESS,)
    # a command set with an unknown element: as pynetdicom answers it
    odd = _rq_command(sop=str(ds.SOPInstanceUID)) + struct.pack("<HHL", 0, 0x5555, 2) + b"\0\0"
    odd_out = _outcomes(both, store_with(odd))
    assert odd_out[0] == odd_out[1]
    # garbage in place of a command set: pynetdicom 3.0's DUL thread fails on it (no CommandField, an unhandled
    # exception) and the connection ends; the lean path aborts it (A-ABORT, one line): ended either way
    garbage = _outcomes(both, store_with(b"\x00\x00\x00\x00\xff\xff\xff\x7f" + b"\x01" * 30, timeout=10))
    assert garbage == [None, None]
    assert counted.n == 0
    wait_until(lambda: not _incoming(lean), 10, what="incoming/ empty")


def test_interleaved_fragment_aborts_and_removes_the_partial_file(both: tuple[StoreSCP, StoreSCP],
                                                                   tmp_path: Path) -> None:
    f = write_phantom_series(tmp_path / "ph", slices=1, size=64)[0]
    ds = dcmread(f, stop_before_pixels=True)
    data = _dataset_bytes(f)
    cmd = _rq_command(sop=str(ds.SOPInstanceUID))
    lean, _ = both
    peer = _Peer(lean.cfg.node.port)
    try:
        peer.send(_pdu((peer.cx, 0x03, cmd)), _pdu((peer.cx, 0x00, data[:1000])))
        wait_until(lambda: len(_incoming(lean)) == 1, 10, what="the partial file")
        peer.send(_pdu((peer.cx, 0x03, cmd)))  # a second message before the first one's data set ended
        assert peer.answer() is None
    finally:
        peer.close()
    wait_until(lambda: not _incoming(lean), 10, what="the partial file removed")
    assert not _spool(lean)


def test_endless_command_set_is_aborted(both: tuple[StoreSCP, StoreSCP]) -> None:
    """Command fragments that never end: aborted at MAX_COMMAND_BYTES (pynetdicom gathers them without a bound)."""
    lean, _ = both
    peer = _Peer(lean.cfg.node.port)
    try:
        piece = b"\0" * 8000
        for _ in range(10):
            try:
                peer.send(_pdu(*[(peer.cx, 0x01, piece)] * 2))
            except OSError:  # the node closed the connection after its A-ABORT
                break
            if peer.assoc.acse.is_aborted():
                break
        assert peer.answer() is None
    finally:
        peer.close()


def test_items_pynetdicom_would_die_on_are_aborted_with_nothing_left(both: tuple[StoreSCP, StoreSCP],
                                                                     tmp_path: Path) -> None:
    """Found by this stop's adversarial review: pynetdicom's DUL thread died (KeyError / IndexError) on an item
    of a context it never accepted or of length < 2, leaving the association counted open and a file in
    incoming/; data fragments with no command before them were buffered in memory without a bound. The lean
    path aborts each at once (A-ABORT, one line) and the association ends cleanly."""
    f = write_phantom_series(tmp_path / "ph", slices=1, size=32)[0]
    data = _dataset_bytes(f)
    cmd = _rq_command(sop=str(dcmread(f, stop_before_pixels=True).SOPInstanceUID))
    lean, _ = both
    counted = _Counting(lean)
    attacks = {
        "context never proposed": lambda peer: [_pdu((99, 0x03, cmd)), _pdu((99, 0x02, data))],
        "context rejected": lambda peer: [_pdu((peer.rejected_cx, 0x01, cmd))],
        "item of length 1": lambda peer: [struct.pack(">BBLLBB", 0x04, 0, 6, 1, peer.cx, 0x03)],
        "item past the PDU's end": lambda peer: [struct.pack(">BBLLBB", 0x04, 0, 8, 400, peer.cx, 0x03) + b"\0\0"],
        "no item at all": lambda peer: [struct.pack(">BBL", 0x04, 0, 0)],
        "data set with no command": lambda peer: [_pdu((peer.cx, 0x00, data[:2000]))] * 3,
    }
    for what, make in attacks.items():
        peer = _Peer(lean.cfg.node.port)
        try:
            try:
                peer.send(*make(peer))
            except OSError:  # the node closed the connection after its A-ABORT
                pass
            assert peer.answer(15) is None, what
        finally:
            peer.close()
    wait_until(lambda: not lean._counts, 15, what="every association's count closed")
    assert not _incoming(lean) and not _spool(lean) and counted.n == 0


def test_store_without_a_data_set_is_refused_with_a_status(both: tuple[StoreSCP, StoreSCP]) -> None:
    """A C-STORE-RQ whose CommandDataSetType says no data set follows: 0xC210 on both paths (the node's handler
    raised TypeError on it before, which pynetdicom turned into 0xC211 with a traceback)."""
    def script(peer: _Peer) -> Any:
        peer.send(_pdu((peer.cx, 0x03, _rq_command(no_dataset=True))))
        return peer.answer(15)

    assert _outcomes(both, script) == [Status.CANNOT_UNDERSTAND, Status.CANNOT_UNDERSTAND]


def _echo_command(msg_id: int) -> bytes:
    req = C_ECHO()
    req.MessageID = msg_id
    req.AffectedSOPClassUID = Verification
    msg = C_ECHO_RQ_MSG()
    msg.primitive_to_message(req)
    fp = DicomBytesIO()
    fp.is_little_endian, fp.is_implicit_VR = True, True
    write_dataset(fp, msg.command_set)
    return fp.getvalue()


def test_echo_between_stores_on_one_association(both: tuple[StoreSCP, StoreSCP], tmp_path: Path) -> None:
    """C-STORE (lean), C-ECHO (pynetdicom), C-STORE (lean again) on one association: all answered."""
    files = write_phantom_series(tmp_path / "ph", slices=2, size=32)
    lean, _ = both
    counted = _Counting(lean)
    peer = _Peer(lean.cfg.node.port)
    try:
        out = []
        for i, f in enumerate(files):
            cmd = _rq_command(sop=str(dcmread(f, stop_before_pixels=True).SOPInstanceUID), msg_id=10 + i)
            peer.send(_pdu((peer.cx, 0x03, cmd)), _pdu((peer.cx, 0x02, _dataset_bytes(f))))
            out.append(peer.answer())
            if i == 0:
                peer.send(_pdu((peer.echo_cx, 0x03, _echo_command(5))))
                out.append(peer.answer())
    finally:
        peer.close()
    assert out == [Status.SUCCESS, Status.SUCCESS, Status.SUCCESS]
    assert counted.n == 2 and len(_spool(lean)) == 2


def test_pynetdicom_info_logging_turning_the_lean_path_off_is_said(tmp_path: Path,
                                                                   caplog: pytest.LogCaptureFixture) -> None:
    """pynetdicom's INFO log handlers watch every PDU, so the lean path steps aside while they are on: a node set
    to receive_path = "lean" says so in one line instead of silently receiving on the other path."""
    pnd = logging.getLogger("pynetdicom")
    old = pnd.level
    pnd.setLevel(logging.INFO)
    try:
        with caplog.at_level(logging.WARNING, logger="node.ingest.scp"):
            scp = start_scp(tmp_path / "lean", receive_path="lean")
            scp.stop()
    finally:
        pnd.setLevel(old)
    said = [r.getMessage() for r in caplog.records if "is not used while the pynetdicom logger" in r.getMessage()]
    assert len(said) == 1, [r.getMessage() for r in caplog.records]
