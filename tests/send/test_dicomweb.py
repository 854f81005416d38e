"""DICOMweb: STOW-RS into the node (token-protected, per-instance response), STOW-RS out to Orthanc's DICOMweb."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pydicom
import pytest
from dicomweb_client import DICOMwebClient

from node.config import DicomwebDestination
from node.errors import DeliveryError
from node.send import make_sender
from tests.support.pacs import TOKEN, api, orthanc_dicomweb, phantom, start_node, wait_job
from tests.support.peers import Orthanc, free_port


@pytest.fixture(scope="module")
def web_orthanc(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Orthanc]:
    o = orthanc_dicomweb(tmp_path_factory.mktemp("orthanc-web"))
    yield o
    o.stop()


def test_stow_in_is_processed_and_stow_out_lands_in_orthanc(tmp_path: Path, web_orthanc: Orthanc) -> None:
    node = start_node(tmp_path / "node", {
        "destinations": [{"name": "web", "kind": "dicomweb", "url": f"{web_orthanc.url}/dicom-web",
                          "batch_size": 4}],
        "rules": [{"name": "ct", "match": {"Modality": "^CT$"}, "through_plane_factor": 2,
                   "destinations": ["web"]}]})
    try:
        files = phantom(tmp_path, seed=51, slices=6)
        datasets = [pydicom.dcmread(f) for f in files]
        ref = datasets[0]

        # no token, wrong token: 401 and nothing spooled
        anon = DICOMwebClient(f"{node.http_url}/dicom-web")
        with pytest.raises(Exception) as info:
            anon.store_instances(datasets[:1])
        assert getattr(getattr(info.value, "response", None), "status_code", None) == 401
        with api(node, token="wrong") as c:
            assert c.post("/dicom-web/studies", content=b"--x--",
                          headers={"Content-Type": "multipart/related; boundary=x"}).status_code == 401

        client = DICOMwebClient(f"{node.http_url}/dicom-web", headers={"Authorization": f"Bearer {TOKEN}"})
        response = client.store_instances(datasets, study_instance_uid=ref.StudyInstanceUID)
        assert sorted(i.ReferencedSOPInstanceUID for i in response.ReferencedSOPSequence) == \
            sorted(d.SOPInstanceUID for d in datasets)
        assert "FailedSOPSequence" not in response

        # WADO-RS of the spooled series (what remote Celery workers read): the same instances come back
        back = client.retrieve_series(ref.StudyInstanceUID, ref.SeriesInstanceUID)
        assert sorted(d.SOPInstanceUID for d in back) == sorted(d.SOPInstanceUID for d in datasets)
        assert back[0].pixel_array.tobytes() in {d.pixel_array.tobytes() for d in datasets}

        job = wait_job(node, ref.SeriesInstanceUID)
        assert job["state"] == "delivered", job
        # the results are in Orthanc, seen through its own DICOMweb (QIDO-RS)
        qido = DICOMwebClient(f"{web_orthanc.url}/dicom-web")
        found = {s["0020000E"]["Value"][0]: s for s in qido.search_for_series(ref.StudyInstanceUID)}
        assert set(found) == {job["derived_series_uid"]} and job["uncertainty_series_uid"] == ""  # cubic: no sigma
        for uid in found:
            assert len(qido.search_for_instances(ref.StudyInstanceUID, uid)) == 11
    finally:
        node.stop()


def test_stow_reports_each_refused_instance(tmp_path: Path) -> None:
    node = start_node(tmp_path / "node", {})
    try:
        good = phantom(tmp_path, seed=52, slices=3)[0].read_bytes()
        other_study = phantom(tmp_path, seed=53, slices=3)[0]
        url_study = pydicom.dcmread(phantom(tmp_path, seed=52, slices=3)[0]).StudyInstanceUID
        body = (b"--b1\r\nContent-Type: application/dicom\r\n\r\n" + good + b"\r\n"
                b"--b1\r\nContent-Type: application/dicom\r\n\r\nnot a dicom file\r\n"
                b"--b1\r\nContent-Type: application/dicom\r\n\r\n" + other_study.read_bytes() + b"\r\n--b1--\r\n")
        with api(node) as c:
            r = c.post(f"/dicom-web/studies/{url_study}", content=body,
                       headers={"Content-Type": 'multipart/related; type="application/dicom"; boundary=b1'})
            assert r.status_code == 202  # some stored, some refused
            doc = r.json()
            assert len(doc["00081199"]["Value"]) == 1
            reasons = [item["00081197"]["Value"][0] for item in doc["00081198"]["Value"]]
            assert reasons == [0xC210, 0xA900]  # cannot understand; not in the study of the URL
            bad = c.post("/dicom-web/studies", content=b"{}", headers={"Content-Type": "application/json"})
            assert bad.status_code == 415
    finally:
        node.stop()


def _broken_meta(path: Path, how: str) -> bytes:
    """``path``'s bytes with its file meta broken as pydicom's reader fails on it with other exceptions than the
    usual ones: an unknown VR (NotImplementedError), a UL of 3 bytes (BytesLengthException)."""
    b = bytearray(path.read_bytes())
    if how == "vr":
        i = b.index(b"\x02\x00\x10\x00UI")
        b[i + 4:i + 6] = b"\x55\xb9"
    else:
        i = b.index(b"\x02\x00\x00\x00UL")
        b[i + 6:i + 8] = b"\x03\x00"
    return bytes(b)


def test_stow_parts_whose_file_meta_breaks_the_reader_are_refused_one_by_one(tmp_path: Path) -> None:
    """break13p: a part whose file meta made pydicom raise NotImplementedError or BytesLengthException (not the
    exceptions the part check caught) ended the whole request with 500: no per-part answer, the parts after it
    never read. Now each such part is refused (0xC210) with its reason and the others are stored."""
    node = start_node(tmp_path / "node", {})
    try:
        files = phantom(tmp_path, seed=56, slices=4)
        parts = [files[0].read_bytes(), _broken_meta(files[1], "vr"), _broken_meta(files[2], "length"),
                 files[3].read_bytes()]
        body = b"".join(b"--b1\r\nContent-Type: application/dicom\r\n\r\n" + p + b"\r\n" for p in parts)
        with api(node) as c:
            r = c.post("/dicom-web/studies", content=body + b"--b1--\r\n",
                       headers={"Content-Type": 'multipart/related; type="application/dicom"; boundary=b1'})
        assert r.status_code == 202, (r.status_code, r.text[:300])
        doc = r.json()
        assert len(doc["00081199"]["Value"]) == 2
        assert [item["00081197"]["Value"][0] for item in doc["00081198"]["Value"]] == [0xC210, 0xC210]
        assert "Traceback" not in node.log()
    finally:
        node.stop()


def test_stow_out_batches_into_orthanc(tmp_path: Path, web_orthanc: Orthanc) -> None:
    files = phantom(tmp_path, seed=54, slices=7)
    sender = make_sender(DicomwebDestination(name="web", url=f"{web_orthanc.url}/dicom-web",
                                           batch_size=3))
    sender.check()
    sender.send(files)
    sender.send(files[:2])  # a resend is harmless
    ref = pydicom.dcmread(files[0], stop_before_pixels=True)
    series = web_orthanc.series_of_study(ref.StudyInstanceUID)
    assert [len(s["Instances"]) for s in series] == [7]
    with httpx.Client(base_url=web_orthanc.url) as c:
        assert c.get(f"/dicom-web/studies/{ref.StudyInstanceUID}/series").status_code == 200


# ---------------------------------------------------------------------------------------------- a STOW-RS peer
# that misbehaves (break13p): a proxy in front of the real Orthanc DICOMweb, or a server whose answer is scripted


class _Stow:
    """An HTTP server on a free port: each POST's body is read whole (plain or chunked) and recorded; ``answer``
    gives (status, content type, body) for the n-th POST (from 0), or None to pass it on to ``upstream``."""

    def __init__(self, answer: Any, upstream: str = "") -> None:
        import http.server
        import threading

        self.bodies: list[bytes] = []
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self) -> None:  # noqa: N802 - http.server's name
                if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                    data = b""
                    while (n := int(self.rfile.readline().strip() or b"0", 16)) > 0:
                        data += self.rfile.read(n)
                        self.rfile.readline()
                    self.rfile.readline()
                else:
                    data = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                outer.bodies.append(data)
                scripted = answer(len(outer.bodies) - 1)
                if scripted is None:
                    r = httpx.post(upstream + self.path, content=data, timeout=60,
                                   headers={"Content-Type": self.headers["Content-Type"],
                                            "Accept": "application/dicom+json"})
                    scripted = (r.status_code, r.headers.get("content-type", ""), r.content)
                status, ctype, body = scripted
                self.send_response(status)
                if ctype:
                    self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: Any) -> None:
                pass

        self.port = free_port()
        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def sender(self, **extra: Any) -> Any:
        return make_sender(DicomwebDestination(name="web", url=f"http://127.0.0.1:{self.port}/dicom-web", **extra))

    def close(self) -> None:
        self.server.shutdown()


def _failed_body(files: list[Path], reasons: dict[int, int], ctype: str) -> bytes:
    """A STOW-RS response (PS3.18 10.5.3) storing every file but those of ``reasons`` (index -> Failure Reason)."""
    def item(f: Path, reason: int | None) -> dict[str, Any]:
        ds = pydicom.dcmread(f, stop_before_pixels=True)
        out = {"00081150": {"vr": "UI", "Value": [ds.SOPClassUID]}, "00081155": {"vr": "UI", "Value": [ds.SOPInstanceUID]}}
        if reason is not None:
            out["00081197"] = {"vr": "US", "Value": [reason]}
        return out
    doc: dict[str, Any] = {"00081199": {"vr": "SQ", "Value": [item(f, None) for i, f in enumerate(files)
                                                                if i not in reasons]}}
    if reasons:
        doc["00081198"] = {"vr": "SQ", "Value": [item(files[i], r) for i, r in reasons.items()]}
    if "xml" in ctype:
        return _native_xml(doc)
    return json.dumps(doc).encode()


def _native_xml(doc: dict[str, Any], ns: bool = False) -> bytes:
    """``doc`` (DICOM JSON of sequences of UI/US items) in the DICOM Native model (PS3.19 A.1); ``ns``: in its
    namespace, as Orthanc writes it."""
    def attrs(d: dict[str, Any]) -> str:
        out = ""
        for tag, el in d.items():
            if el["vr"] == "SQ":
                items = "".join(f'<Item number="{n}">{attrs(i)}</Item>' for n, i in enumerate(el["Value"], 1))
                out += f'<DicomAttribute tag="{tag}" vr="SQ">{items}</DicomAttribute>'
            else:
                values = "".join(f'<Value number="{n}">{v}</Value>' for n, v in enumerate(el["Value"], 1))
                out += f'<DicomAttribute tag="{tag}" vr="{el["vr"]}">{values}</DicomAttribute>'
        return out
    xmlns = ' xmlns="http://dicom.nema.org/PS3.19/models/NativeDICOM"' if ns else ""
    return f'<?xml version="1.0" encoding="UTF-8"?><NativeDicomModel{xmlns}>{attrs(doc)}</NativeDicomModel>'.encode()


@pytest.mark.parametrize("ctype", ["application/dicom+json; charset=utf-8", "application/dicom+json",
                                   "application/dicom+xml; charset=UTF-8"])
@pytest.mark.parametrize("status", [200, 202])
def test_a_stow_answer_listing_failed_instances_fails_the_delivery_whatever_its_content_type(
        tmp_path: Path, ctype: str, status: int) -> None:
    """dicomweb-client read the answer's failures only when its Content-Type was exactly one of four strings:
    with parameters (``application/dicom+json; charset=utf-8``) a 202 listing a refused instance was a
    delivered batch. The answer's media type is read without its parameters, JSON or XML."""
    files = phantom(tmp_path, seed=71, slices=3)
    stow = _Stow(lambda n: (status, ctype, _failed_body(files, {1: 0xC000}, ctype)))
    try:
        with pytest.raises(DeliveryError, match=r"1 of 3 instance\(s\) refused.*0xC000"):
            stow.sender().send(files)
    finally:
        stow.close()


@pytest.mark.parametrize(("reason", "retryable"), [(0xA700, True), (0x0110, True), (0xC000, False)])
def test_a_stow_answer_409_is_retried_when_every_reason_is_out_of_resources(tmp_path: Path, reason: int,
                                                                            retryable: bool) -> None:
    """409 (PS3.18 10.5.3: no instance stored) was a permanent refusal whatever the reasons: a PACS whose disk was
    full (Failure Reason 0xA700) dead-lettered the delivery at its first attempt. The reasons decide now, as
    for C-STORE statuses (node.dimse.store_retryable)."""
    files = phantom(tmp_path, seed=72, slices=2)
    ctype = "application/dicom+json"
    stow = _Stow(lambda n: (409, ctype, _failed_body(files, {0: reason, 1: reason}, ctype)))
    try:
        with pytest.raises(DeliveryError, match=rf"2 of 2 instance\(s\) refused.*0x{reason:04X}") as exc:
            stow.sender().send(files)
        assert exc.value.retryable is retryable
    finally:
        stow.close()


def test_a_stow_answered_503_is_sent_again_whole(tmp_path: Path, web_orthanc: Orthanc) -> None:
    """A proxy answering 503 once in front of Orthanc: dicomweb-client's own retry sent a batch over its 1 MB
    chunk size as an exhausted generator, an empty body: Orthanc answered 200 to it and the sender reported 24
    files stored, Orthanc held none. The retry sends the same bytes again."""
    files = phantom(tmp_path, seed=73, slices=24, size=256)
    stow = _Stow(lambda n: (503, "text/plain", b"busy") if n == 0 else None, upstream=web_orthanc.url)
    try:
        stow.sender().send(files)
        assert len(stow.bodies) == 2 and stow.bodies[1] and len(stow.bodies[1]) == len(stow.bodies[0])
    finally:
        stow.close()
    ref = pydicom.dcmread(files[0], stop_before_pixels=True)
    assert [len(s["Instances"]) for s in web_orthanc.series_of_study(ref.StudyInstanceUID)] == [24]


@pytest.mark.parametrize("status", [200, 202])
def test_a_stow_answer_in_the_native_model_namespace_is_read(tmp_path: Path, status: int) -> None:
    """Orthanc (and PS3.19 A.1) writes the XML answer in the namespace http://dicom.nema.org/PS3.19/models/NativeDICOM:
    its DicomAttribute elements were not found, a FailedSOPSequence unread and the batch delivered; a list of
    stored instances leaving one out unread too."""
    files = phantom(tmp_path, seed=75, slices=3)
    ctype = "application/dicom+xml"
    doc = json.loads(_failed_body(files, {1: 0xC000}, "application/dicom+json"))
    stow = _Stow(lambda n: (status, ctype, _native_xml(doc, ns=True)))
    try:
        with pytest.raises(DeliveryError, match=r"1 of 3 instance\(s\) refused.*0xC000"):
            stow.sender().send(files)
    finally:
        stow.close()
    left_out = json.loads(_failed_body(files[:2], {}, "application/dicom+json"))
    stow = _Stow(lambda n: (status, ctype, _native_xml(left_out, ns=True)))
    try:
        with pytest.raises(DeliveryError, match=r"1 of 3 instance\(s\) not in the answer"):
            stow.sender().send(files)
    finally:
        stow.close()


def test_a_stow_answer_that_leaves_out_instances_fails_the_delivery(tmp_path: Path) -> None:
    """A 200 whose ReferencedSOPSequence lists only some of the instances sent, and no failure: the ones left out
    were not stored as far as the answer says; a failed attempt (retried), not a delivery."""
    files = phantom(tmp_path, seed=74, slices=3)
    ctype = "application/dicom+json"
    body = _failed_body(files[:2], {}, ctype)
    stow = _Stow(lambda n: (200, ctype, body))
    try:
        with pytest.raises(DeliveryError, match=r"1 of 3 instance\(s\) not in the answer") as exc:
            stow.sender().send(files)
        assert exc.value.retryable
    finally:
        stow.close()


def test_a_stow_destination_that_redirects_to_a_login_page_is_not_delivered(tmp_path: Path) -> None:
    """break14o: a STOW-RS url behind a proxy that answers the POST with 302 to its login page (or an http URL
    moved to https): requests followed the redirect as a GET, the page answered 200 text/html, and an answer of
    another type "lists nothing": the batch counted as stored, nothing was (confirm = "none": delivered). Now a
    redirect is not followed and is a permanent failure naming where it points; a 2xx whose body is neither
    DICOM JSON nor XML is not trusted."""
    import http.server
    import threading

    gets: list[str] = []

    class Proxy(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_POST(self) -> None:  # noqa: N802 - http.server's name
            self.rfile.read(int(self.headers.get("Content-Length", 0)))
            self.send_response(302)
            self.send_header("Location", "/sso/login")
            self.send_header("Content-Length", "0")
            self.end_headers()

        def do_GET(self) -> None:  # noqa: N802
            gets.append(self.path)
            body = b"<html><body>Please log in</body></html>"
            self.send_response(200)
            self.send_header("Content-Type", "text/html")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: Any) -> None:
            pass

    port = free_port()
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", port), Proxy)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    files = phantom(tmp_path, seed=149, slices=2)
    try:
        sender = make_sender(DicomwebDestination(name="web", url=f"http://127.0.0.1:{port}/dicom-web"))
        with pytest.raises(DeliveryError) as info:
            sender.send(files)
        assert "HTTP 302, redirected to /sso/login" in str(info.value) and not info.value.retryable, info.value
        assert gets == []
    finally:
        srv.shutdown()
    html = _Stow(lambda n: (200, "text/html", b"<html><body>Please log in</body></html>"))
    try:
        with pytest.raises(DeliveryError) as info:
            html.sender().send(files)
        assert "HTTP 200 with an answer that is not a STOW-RS response (text/html)" in str(info.value), info.value
    finally:
        html.close()
