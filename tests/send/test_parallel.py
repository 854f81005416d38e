"""Parallel delivery: several C-STORE associations, Orthanc uploads and STOW-RS requests at once per delivery,
every instance landing once; the first failure of one association stops the others and is raised; STOW batches
bounded in files and bytes; the new keys validated at load."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pydicom
import pytest
from pynetdicom import AE, evt
from pynetdicom.sop_class import CTImageStorage  # type: ignore[attr-defined]

from node.config import DicomDestination, DicomwebDestination, OrthancDestination, config_from_dict
from node.errors import ConfigError, DeliveryError
from node.send import make_sender
from node.send.dicomweb import batches
from tests.support.pacs import orthanc_dicomweb, phantom
from tests.support.peers import Orthanc, free_port


@pytest.fixture(scope="module")
def web_orthanc(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Orthanc]:
    o = orthanc_dicomweb(tmp_path_factory.mktemp("orthanc-web-parallel"))
    yield o
    o.stop()


def _count(o: Orthanc, files: list[Path]) -> list[int]:
    study = pydicom.dcmread(files[0], stop_before_pixels=True).StudyInstanceUID
    return [len(s["Instances"]) for s in o.series_of_study(study)]


def test_dimse_sender_spreads_one_delivery_over_its_associations(tmp_path: Path, orthanc: Orthanc) -> None:
    files = phantom(tmp_path, seed=61, slices=11, size=32)
    sender = make_sender(DicomDestination(name="pacs", ae_title=orthanc.aet, host="127.0.0.1",
                                           port=orthanc.dicom_port, associations=4))
    sender.send(files)
    sender.send(files[3:])  # a resend is harmless
    assert _count(orthanc, files) == [11]


class _Scp:
    """A pynetdicom C-STORE SCP that counts associations and instances and answers 0xA700 (out of resources,
    retryable) for the SOP instance UID ``refuse``."""

    def __init__(self, refuse: str = "", answer: int = 0x0000) -> None:
        self.refuse, self.answer, self.assocs, self.stored = refuse, answer, 0, list[str]()
        self.lock = threading.Lock()
        ae = AE(ae_title="COUNTER")
        ae.add_supported_context(CTImageStorage, ["1.2.840.10008.1.2.1", "1.2.840.10008.1.2"])
        self.port = free_port()
        self.server = ae.start_server(("127.0.0.1", self.port), block=False, evt_handlers=[
            (evt.EVT_C_STORE, self._store), (evt.EVT_ACCEPTED, self._accepted)])

    def _accepted(self, event: Any) -> None:
        with self.lock:
            self.assocs += 1

    def _store(self, event: Any) -> int:
        uid = str(event.request.AffectedSOPInstanceUID)
        if uid == self.refuse:
            return 0xA700
        with self.lock:
            self.stored.append(uid)
        return self.answer


def test_dimse_sender_uses_n_associations_and_stops_at_the_first_failure(tmp_path: Path) -> None:
    files = phantom(tmp_path, seed=62, slices=40, size=16)
    uids = [str(pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID) for f in files]
    ok = _Scp()
    try:
        make_sender(DicomDestination(name="c", ae_title="COUNTER", host="127.0.0.1", port=ok.port,
                                     associations=3)).send(files)
        assert ok.assocs == 3 and sorted(ok.stored) == sorted(uids)
        make_sender(DicomDestination(name="c", ae_title="COUNTER", host="127.0.0.1", port=ok.port,
                                     associations=8)).send(files[:2])
        assert ok.assocs == 3 + 2  # never more associations than files
    finally:
        ok.server.shutdown()
    bad = _Scp(refuse=uids[0])  # the first file of association 0
    try:
        with pytest.raises(DeliveryError) as exc:
            make_sender(DicomDestination(name="c", ae_title="COUNTER", host="127.0.0.1", port=bad.port,
                                         associations=2)).send(files)
        assert exc.value.retryable and files[0].name in str(exc.value)
        assert len(bad.stored) <= len(files) // 2  # association 0 sent nothing after its refused first file
    finally:
        bad.server.shutdown()


@pytest.mark.parametrize("answer", [0x0001, 0x0107, 0x0116, 0xB000, 0xB006, 0xB007, 0xB123])
def test_a_c_store_answered_with_a_warning_status_is_stored(tmp_path: Path, answer: int) -> None:
    """PS3.7 C.4 general warnings (0001, 0107, 0116) and Storage warnings (Bxxx, PS3.4 B.2.3) mean stored with a
    warning: delivered, not retried into a dead letter (break13p: 0107 / 0116 were read as failures)."""
    files = phantom(tmp_path, seed=66, slices=3, size=16)
    scp = _Scp(answer=answer)
    try:
        make_sender(DicomDestination(name="c", ae_title="COUNTER", host="127.0.0.1", port=scp.port)).send(files)
        assert len(scp.stored) == 3
    finally:
        scp.server.shutdown()


def test_a_c_store_answered_0110_is_a_retryable_failure(tmp_path: Path) -> None:
    files = phantom(tmp_path, seed=67, slices=2, size=16)
    scp = _Scp(answer=0x0110)  # processing failure (PS3.7 C.4.1)
    try:
        with pytest.raises(DeliveryError) as exc:
            make_sender(DicomDestination(name="c", ae_title="COUNTER", host="127.0.0.1", port=scp.port)).send(files)
        assert exc.value.retryable and "answered 0x0110" in str(exc.value)
    finally:
        scp.server.shutdown()


def test_orthanc_sender_uploads_in_parallel(tmp_path: Path, orthanc: Orthanc) -> None:
    files = phantom(tmp_path, seed=63, slices=9, size=32)
    sender = make_sender(OrthancDestination(name="o", url=orthanc.url, parallel=3))
    sender.send(files)
    sender.send(files[:4])
    assert _count(orthanc, files) == [9]
    (tmp_path / "junk.dcm").write_bytes(b"not dicom")
    with pytest.raises(DeliveryError) as exc:
        sender.send([*files[:2], tmp_path / "junk.dcm"])
    assert not exc.value.retryable and "junk.dcm" in str(exc.value)


def test_stow_batches_are_bounded_in_files_and_bytes(tmp_path: Path) -> None:
    paths = []
    for i, size in enumerate([10, 10, 10, 50, 10, 10, 10, 10]):
        p = tmp_path / f"{i}.bin"
        p.write_bytes(b"x" * size)
        paths.append(p)
    got = [[p.name for p in b] for b in batches(paths, max_files=3, max_bytes=30)]
    assert got == [["0.bin", "1.bin", "2.bin"], ["3.bin"], ["4.bin", "5.bin", "6.bin"], ["7.bin"]]
    assert [len(b) for b in batches(paths, max_files=2, max_bytes=10_000)] == [2, 2, 2, 2]
    assert batches([], 5, 5) == []


def test_stow_sender_parallel_byte_bounded_batches_into_orthanc(tmp_path: Path, web_orthanc: Orthanc) -> None:
    files = phantom(tmp_path, seed=64, slices=10, size=64)
    one_mb_fraction = 2.5 * files[0].stat().st_size / 1024 / 1024  # two files per request
    sender = make_sender(DicomwebDestination(name="web", url=f"{web_orthanc.url}/dicom-web", batch_size=50,
                                           batch_mb=one_mb_fraction, parallel=3))
    sender.send(files)
    assert _count(web_orthanc, files) == [10]


@pytest.mark.parametrize(("dest", "key"), [
    ({"kind": "dicom", "ae_title": "P", "host": "h", "port": 104, "associations": 0}, "associations"),
    ({"kind": "dicom", "ae_title": "P", "host": "h", "port": 104, "associations": 33}, "associations"),
    ({"kind": "orthanc", "url": "http://o", "parallel": 0}, "parallel"),
    ({"kind": "dicomweb", "url": "http://o", "parallel": 40}, "parallel"),
    ({"kind": "dicomweb", "url": "http://o", "batch_mb": 0.0}, "batch_mb"),
    ({"kind": "dicomweb", "url": "http://o", "batch_size": 0}, "batch_size"),
])
def test_parallel_keys_are_validated(dest: dict[str, Any], key: str) -> None:
    cfg: dict[str, Any] = {"destinations": [{"name": "d", **dest}],
                           "rules": [{"name": "r", "match": {"Modality": "CT"}, "destinations": ["d"]}]}
    with pytest.raises(ConfigError, match=rf"^destinations\[0\]\.{key}: "):
        config_from_dict(cfg)
