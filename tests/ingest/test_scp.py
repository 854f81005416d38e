"""The C-STORE SCP with real peers (dcmtk storescu, a pynetdicom SCU): statuses, duplicates, callers, syntaxes."""

from __future__ import annotations

import logging
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset
from pynetdicom import AE, _config

from node.app.phantom import write_phantom_series
from node.config import config_from_dict
from node.ingest import Admission, StoreSCP
from node.metrics import Metrics
from node.store import open_store
from tests.support.fixtures import shared_series
from tests.support.peers import free_port, storescu, wait_until

CT = "1.2.840.10008.5.1.4.1.1.2"


def start_scp(tmp_path: Path, **node: Any) -> StoreSCP:
    cfg = config_from_dict({"node": {"port": free_port(), "spool_dir": str(tmp_path / "spool"), "min_free_mb": 1,
                                     **node}, "rules": [{"name": "r1"}, {"name": "r2"}]})
    store = open_store(cfg)
    scp = StoreSCP(cfg, Admission(cfg, store.spool, store.index, Metrics.create()), Metrics.create())
    scp.start()
    return scp


@pytest.fixture
def scp(tmp_path: Path) -> Iterator[StoreSCP]:
    s = start_scp(tmp_path)
    yield s
    s.stop()


@pytest.fixture(scope="module")
def phantom(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    return write_phantom_series(tmp_path_factory.mktemp("phantom"), slices=4, size=64)


def send_raw(port: int, path: Path, calling: str = "PYSCU") -> int:
    """Send a file's bytes as they are (pynetdicom's chunked send: no decoding on our side either)."""
    meta = dcmread(path, stop_before_pixels=True).file_meta
    ae = AE(ae_title=calling)
    ae.add_requested_context(meta.MediaStorageSOPClassUID, meta.TransferSyntaxUID)
    old = _config.STORE_SEND_CHUNKED_DATASET
    _config.STORE_SEND_CHUNKED_DATASET = True
    try:
        assoc = ae.associate("127.0.0.1", port, ae_title="SRNODE")
        assert assoc.is_established
        rsp = assoc.send_c_store(path)
        assoc.release()
    finally:
        _config.STORE_SEND_CHUNKED_DATASET = old
    return int(rsp.Status)


def send_dataset(port: int, ds: Dataset) -> int:
    ae = AE(ae_title="PYSCU")
    ae.add_requested_context(ds.SOPClassUID, ds.file_meta.TransferSyntaxUID)
    assoc = ae.associate("127.0.0.1", port, ae_title="SRNODE")
    assert assoc.is_established
    rsp = assoc.send_c_store(ds)
    assoc.release()
    return int(rsp.Status)


def test_storescu_series_is_spooled_and_indexed(scp: StoreSCP) -> None:
    files = sorted(shared_series("ct_head_phantom_philips_5mm").glob("*.dcm"))
    r = storescu(files, scp.cfg.node.port)
    assert r.returncode == 0, r.stderr
    series = scp.admission.index.all_series()
    assert [(s["n_instances"], s["state"], s["modality"], s["calling_ae"]) for s in series] == \
        [(28, "receiving", "CT", "STORESCU")]
    for inst in scp.admission.index.instances_of(series[0]["series_uid"]):
        got = dcmread(inst.path)
        assert got.SOPInstanceUID == inst.sop_uid and got.SeriesInstanceUID == series[0]["series_uid"]
    original = dcmread(files[0])
    stored = dcmread(scp.admission.spool.instance_path(original.StudyInstanceUID, original.SeriesInstanceUID,
                                             original.SOPInstanceUID))
    assert stored.PixelData == original.PixelData


def test_every_transfer_syntax_is_accepted_undecoded(scp: StoreSCP) -> None:
    for f in sorted(shared_series("ts_parity_mr_mosaic_9syntaxes").glob("*.dcm")):
        assert send_raw(scp.cfg.node.port, f) == 0x0000, f.name
        sop = dcmread(f, stop_before_pixels=True).SOPInstanceUID
        assert scp.admission.index.has_instance(sop)


def test_duplicate_instance_is_kept_once(scp: StoreSCP, phantom: list[Path], tmp_path: Path,
                                         caplog: pytest.LogCaptureFixture) -> None:
    ds = dcmread(phantom[0])
    assert send_dataset(scp.cfg.node.port, ds) == 0x0000
    first = scp.admission.spool.instance_path(ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID).read_bytes()
    ds.WindowCenter = 1234  # same SOPInstanceUID, different content
    with caplog.at_level(logging.INFO, logger="node.ingest.admit"):
        assert send_dataset(scp.cfg.node.port, ds) == 0x0000
    assert scp.admission.index.count_instances() == 1
    assert scp.admission.spool.instance_path(ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID).read_bytes() == first
    assert "duplicate instance" in caplog.text


def test_association_summary_tells_duplicates_from_new_instances(scp: StoreSCP, phantom: list[Path],
                                                                   caplog: pytest.LogCaptureFixture) -> None:
    """A resend of a whole series read "28 instance(s) stored" though nothing new was kept (newuser13): the
    association's line now says how many were already held."""
    with caplog.at_level(logging.INFO, logger="node.ingest.scp"):
        assert storescu(phantom[:3], scp.cfg.node.port).returncode == 0
        wait_until(lambda: "3 instance(s) stored, 0 refused" in caplog.text, 15, what="the first association's line")
        assert storescu(phantom[:4], scp.cfg.node.port).returncode == 0
        # ops19: "4 instance(s) stored (3 of them already held" read as 4 stored
        wait_until(lambda: "4 instance(s) accepted: 1 new, 3 already held" in caplog.text, 15,
                   what="the resend's line")
    assert scp.admission.index.count_instances() == 4


def test_truncated_file_is_refused_with_c210(scp: StoreSCP, phantom: list[Path], tmp_path: Path) -> None:
    cut = tmp_path / "cut.dcm"
    cut.write_bytes(phantom[1].read_bytes()[:-3000])
    assert send_raw(scp.cfg.node.port, cut) == 0xC210
    assert scp.admission.index.count_instances() == 0 and not any(scp.admission.spool.instances.rglob("*.dcm"))


@pytest.mark.parametrize("drop", ["SOPInstanceUID", "SeriesInstanceUID", "StudyInstanceUID"])
def test_missing_uid_is_refused_with_c210(scp: StoreSCP, phantom: list[Path], drop: str, tmp_path: Path) -> None:
    ds = dcmread(phantom[2])
    del ds[drop]  # the file meta (hence the C-STORE command) still names the instance
    bad = tmp_path / "bad.dcm"
    ds.save_as(bad, enforce_file_format=True)
    assert send_raw(scp.cfg.node.port, bad) == 0xC210
    assert scp.admission.index.count_instances() == 0


def test_image_without_pixel_data_is_refused(scp: StoreSCP, phantom: list[Path]) -> None:
    ds = dcmread(phantom[3])
    del ds.PixelData
    assert send_dataset(scp.cfg.node.port, ds) == 0xC210


def test_non_storage_sop_class_is_refused(scp: StoreSCP) -> None:
    ae = AE(ae_title="PYSCU")
    ae.add_requested_context("1.2.840.10008.5.1.4.31")  # Modality Worklist FIND: not a storage class
    ae.add_requested_context(CT)
    assoc = ae.associate("127.0.0.1", scp.cfg.node.port, ae_title="SRNODE")
    assert assoc.is_established
    accepted = {str(cx.abstract_syntax) for cx in assoc.accepted_contexts}
    rejected = {str(cx.abstract_syntax) for cx in assoc.rejected_contexts}
    assoc.release()
    assert accepted == {CT} and "1.2.840.10008.5.1.4.31" in rejected


def test_disk_watermark_answers_a700(tmp_path: Path, phantom: list[Path]) -> None:
    scp = start_scp(tmp_path, min_free_mb=10**9)
    try:
        assert send_dataset(scp.cfg.node.port, dcmread(phantom[0])) == 0xA700
        assert scp.admission.index.count_instances() == 0 and not any(scp.admission.spool.instances.rglob("*.dcm"))
    finally:
        scp.stop()


def test_unknown_callers_are_rejected_and_caller_rules_recorded(tmp_path: Path, phantom: list[Path]) -> None:
    scp = start_scp(tmp_path, require_known_callers=True,
                    allowed_callers=[{"ae_title": "CT01", "host": "127.0.0.1", "rules": ["r2"]}])
    try:
        r = storescu(phantom[:1], scp.cfg.node.port, calling="INTRUDER")
        assert r.returncode != 0 and "Rejected" in (r.stdout + r.stderr)
        r = storescu(phantom[:1], scp.cfg.node.port, calling="CT01")
        assert r.returncode == 0, r.stderr
        (inst,) = scp.admission.index.instances_of(dcmread(phantom[0]).SeriesInstanceUID)
        assert (inst.calling_ae, inst.allowed_rules) == ("CT01", "r2")
    finally:
        scp.stop()


@pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl CLI not installed")
def test_dicom_tls(tmp_path: Path, phantom: list[Path]) -> None:
    import subprocess

    key, cert = tmp_path / "key.pem", tmp_path / "cert.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj",
                    "/CN=localhost", "-keyout", str(key), "-out", str(cert)], check=True, capture_output=True)
    scp = start_scp(tmp_path, tls={"enabled": True, "cert": str(cert), "key": str(key)})
    try:
        r = storescu(phantom[:1], scp.cfg.node.port, extra_args=["+tls", str(key), str(cert), "+cf", str(cert)])
        assert r.returncode == 0, r.stdout + r.stderr
        assert scp.admission.index.count_instances() == 1
        plain = storescu(phantom[1:2], scp.cfg.node.port)  # no TLS: no association
        assert plain.returncode != 0
    finally:
        scp.stop()


def test_both_ends_of_an_association_run_without_nagle(scp: StoreSCP) -> None:
    """TCP_NODELAY on the node's accepted socket and on its own outgoing associations (node.dimse.no_delay: with
    Nagle every DIMSE round trip waits for a delayed ACK)."""
    import socket

    from node.dimse import assoc_no_delay

    ae = AE(ae_title="NAGLE")
    ae.add_requested_context("1.2.840.10008.1.1")
    assoc = ae.associate("127.0.0.1", scp.cfg.node.port, ae_title=scp.cfg.node.ae_title)
    assert assoc.is_established
    try:
        assoc_no_delay(assoc)
        assert assoc.dul.socket.socket.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
        assert scp._server is not None
        accepted = [a.dul.socket.socket for a in scp._server.active_associations]
        assert accepted and all(s.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) for s in accepted)
    finally:
        assoc.release()
