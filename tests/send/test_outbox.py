"""Outbound: the DIMSE sender against real SCPs (transcoding for a peer that only takes uncompressed), the
folder sender, and the durable outbox of the real node: destination down -> retries -> dead-letter ->
``srnode retry`` delivers."""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.uid import JPEG2000Lossless

from node.app.phantom import write_phantom_series
from node.config import DicomDestination, FolderDestination
from node.errors import DeliveryError
from node.send import make_sender
from tests.support.fixtures import shared_series
from tests.support.nodeproc import NodeProc
from tests.support.peers import STORESCP, Orthanc, free_port, storescu, wait_until


@pytest.fixture
def storescp(tmp_path: Path) -> Iterator[tuple[int, Path]]:
    """dcmtk storescp: accepts uncompressed transfer syntaxes only (its default)."""
    port, out = free_port(), tmp_path / "storescp"
    out.mkdir()
    proc = subprocess.Popen([STORESCP, "-aet", "STORESCP", "-od", str(out), str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_until(lambda: subprocess.run(["/usr/bin/echoscu", "-aec", "STORESCP", "127.0.0.1", str(port)],
                                      capture_output=True).returncode == 0, timeout=20, what="storescp up")
    yield port, out
    proc.terminate()
    proc.wait(10)


def test_dimse_sender_transcodes_for_a_peer_without_jpeg2000(storescp: tuple[int, Path]) -> None:
    port, out = storescp
    j2k = shared_series("ts_parity_mr_mosaic_9syntaxes") / "9.dcm"
    assert dcmread(j2k, stop_before_pixels=True).file_meta.TransferSyntaxUID == JPEG2000Lossless
    sender = make_sender(DicomDestination(name="scp", ae_title="STORESCP", host="127.0.0.1",
                                           port=port))
    sender.check()
    sender.send([j2k])
    (got,) = list(out.iterdir())
    received = dcmread(got)
    assert not received.file_meta.TransferSyntaxUID.is_compressed
    assert (received.pixel_array == dcmread(j2k).pixel_array).all()


def test_dimse_sender_to_orthanc_and_unreachable_peer(orthanc: Orthanc, tmp_path: Path) -> None:
    files = write_phantom_series(tmp_path / "ct", slices=3, size=32, seed=7)
    sender = make_sender(DicomDestination(name="pacs", ae_title=orthanc.aet, host="127.0.0.1",
                                           port=orthanc.dicom_port))
    sender.send(files)
    sender.send(files)  # a resend is harmless
    uid = dcmread(files[0], stop_before_pixels=True).StudyInstanceUID
    assert [len(s["Instances"]) for s in orthanc.series_of_study(uid)] == [3]
    down = make_sender(DicomDestination(name="down", ae_title="X", host="127.0.0.1",
                                         port=free_port(), timeout_s=5))
    with pytest.raises(DeliveryError) as exc:
        down.send(files)
    assert exc.value.retryable and "down (X@127.0.0.1" in str(exc.value)


def test_folder_sender_writes_study_series_sop(tmp_path: Path) -> None:
    files = write_phantom_series(tmp_path / "ct", slices=2, size=32, seed=8)
    sender = make_sender(FolderDestination(name="f", path=str(tmp_path / "out")))
    sender.send(files)
    ds = dcmread(files[1], stop_before_pixels=True)
    target = tmp_path / "out" / ds.StudyInstanceUID / ds.SeriesInstanceUID / f"{ds.SOPInstanceUID}.dcm"
    assert target.read_bytes() == files[1].read_bytes()
    assert not list((tmp_path / "out").rglob(".part-*"))


def test_destination_down_dead_letter_then_retry_delivers(tmp_path: Path) -> None:
    pacs_port, received = free_port(), tmp_path / "pacs"
    received.mkdir()
    sections = {"destinations": [{"name": "pacs", "kind": "dicom", "ae_title": "STORESCP", "host": "127.0.0.1",
                                  "port": pacs_port, "timeout_s": 5.0}],
                "rules": [{"name": "ct", "match": {"Modality": "CT"}, "destinations": ["pacs"]}],
                "outbox": {"max_attempts": 3, "backoff_initial_s": 0.2, "backoff_max_s": 0.5}}
    files = write_phantom_series(tmp_path / "ct", slices=3, size=32, seed=9)
    with NodeProc.start(tmp_path / "node", sections) as node:
        assert storescu(files, node.port).returncode == 0
        (job,) = node.wait_jobs(lambda js: js and js[-1]["state"] == "dead-letter", timeout=90,
                                what="dead-letter after max_attempts")
        (d,) = job["deliveries"]
        assert d["attempts"] == 3 and "after 3 attempt(s)" in d["reason"] and "pacs" in job["reason"]
        scp = subprocess.Popen([STORESCP, "-aet", "STORESCP", "-od", str(received), str(pacs_port)],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            wait_until(lambda: subprocess.run(["/usr/bin/echoscu", "-aec", "STORESCP", "127.0.0.1", str(pacs_port)],
                                              capture_output=True).returncode == 0, timeout=20, what="storescp up")
            r = node.cli("retry")
            assert r.returncode == 0 and "re-queued" in r.stdout
            (job,) = node.wait_jobs(lambda js: js[-1]["state"] == "delivered", timeout=60, what="delivered")
            assert len(list(received.iterdir())) == (3 - 1) * 2 + 1  # derived (cubic: no sigma object)
        finally:
            scp.terminate()
            scp.wait(10)


@pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl CLI not installed")
def test_dimse_sender_over_tls(tmp_path: Path) -> None:
    key, cert = tmp_path / "key.pem", tmp_path / "cert.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=pacs",
                    "-addext", "subjectAltName=IP:127.0.0.1", "-keyout", str(key), "-out", str(cert)],
                   check=True, capture_output=True)
    port, out = free_port(), tmp_path / "tls-in"
    out.mkdir()
    scp = subprocess.Popen([STORESCP, "-aet", "TLSPACS", "+tls", str(key), str(cert), "+cf", str(cert), "-od", str(out), str(port)],
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        files = write_phantom_series(tmp_path / "ct", slices=2, size=32, seed=10)
        dest = DicomDestination(name="tls", ae_title="TLSPACS", host="127.0.0.1", port=port,
                                 tls=True, tls_ca=str(cert), tls_cert=str(cert), tls_key=str(key),
                                 timeout_s=10)  # mutual TLS: storescp requires a client certificate
        wait_until(lambda: make_sender(dest).check() is None, timeout=20, what="TLS storescp up")
        make_sender(dest).send(files)
        assert len(list(out.iterdir())) == 2
        plain = make_sender(DicomDestination(name="plain", ae_title="TLSPACS", host="127.0.0.1",
                                              port=port, timeout_s=5))
        with pytest.raises(DeliveryError):
            plain.send(files)
    finally:
        scp.terminate()
        scp.wait(10)


def test_a_tls_peer_that_never_answers_the_handshake_fails_the_delivery_not_the_outbox(tmp_path: Path) -> None:
    """A TLS destination whose host completes the TCP connection (the kernel's listen backlog) but whose program
    never answers the TLS handshake (hung, or busy with one association at a time): pynetdicom wraps the socket
    before connecting and connects without a timeout (AE.connection_timeout None), so the handshake waited for
    ever and with it ``send``, the outbox's thread and every later delivery. Now it ends after ``timeout_s`` with
    a retryable DeliveryError, as a plain connection to that peer does (its ACSE timeout)."""
    import socket
    import threading

    key, cert = tmp_path / "key.pem", tmp_path / "cert.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=pacs",
                    "-addext", "subjectAltName=IP:127.0.0.1", "-keyout", str(key), "-out", str(cert)],
                   check=True, capture_output=True)
    files = write_phantom_series(tmp_path / "ct", slices=2, size=32, seed=11)
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as hung:
        hung.bind(("127.0.0.1", 0))
        hung.listen(8)  # never accepts, never reads
        port = hung.getsockname()[1]
        outcome: list[BaseException | None] = []

        def send(tls: bool) -> None:
            dest = DicomDestination(name="hung", ae_title="PACS", host="127.0.0.1", port=port, timeout_s=2,
                                    associations=2, tls=tls, tls_ca=str(cert) if tls else "")
            try:
                make_sender(dest).send(files)
                outcome.append(None)
            except BaseException as exc:  # noqa: BLE001 - the outcome is asserted below
                outcome.append(exc)

        for tls in (False, True):
            outcome.clear()
            t = threading.Thread(target=send, args=(tls,), daemon=True)
            t.start()
            t.join(60)  # a deadline: the send must end by itself
            assert not t.is_alive(), f"send (tls={tls}) still waiting for the peer after 60 s"
            assert isinstance(outcome[0], DeliveryError) and outcome[0].retryable, outcome


def test_http_senders_refused_credentials_are_permanent_and_say_so(tmp_path: Path) -> None:
    """break14o: a real Orthanc with authentication, the node's password wrong: the REST upload and the STOW-RS
    batch failed with a bare "HTTP 401", read like any hiccup. Now the reason says the credentials were refused
    and which keys to check, is not retried (the same credentials cannot pass), and never holds the password."""
    from node.config import DicomwebDestination, OrthancDestination
    from tests.support.pacs import ORTHANC_PLUGINS
    from tests.support.peers import start_orthanc

    orthanc = start_orthanc(tmp_path / "orthanc", username="srnode", password="right-pass-4e8",
                            plugins=[ORTHANC_PLUGINS / "libOrthancDicomWeb.so"],
                            extra={"DicomWeb": {"Enable": True, "Root": "/dicom-web/"}})
    try:
        files = write_phantom_series(tmp_path / "in", slices=2, size=32, step_mm=3.0, seed=148)
        for dest in (OrthancDestination(name="o", url=orthanc.url, username="srnode", password="wrong-pass-1a3"),
                     DicomwebDestination(name="w", url=f"{orthanc.url}/dicom-web", username="srnode",
                                         password="wrong-pass-1a3")):
            with pytest.raises(DeliveryError) as info:
                make_sender(dest).send(files)
            text = str(info.value)
            assert "HTTP 401: the credentials were refused (check username / password or token" in text, text
            assert not info.value.retryable and "wrong-pass-1a3" not in text
    finally:
        orthanc.stop()
