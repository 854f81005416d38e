"""Hostile HTTP clients against the real node process: a 200 MB STOW-RS part (the node's RSS must not grow with
it), a lying Content-Length, an announced body over ``[http] max_body_mb``, a chunked body that grows past it, a
body trickled slower than ``body_timeout_s``, and connections that trickle their request head or say nothing.
Every one gets its answer (413 / 408) and is closed; a legitimate request still gets through meanwhile.
"""

from __future__ import annotations

import io
import json
import random
import socket
import struct
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

from node.ingest import MultipartError, MultipartStream
from node.ingest.stow import PartData, PartEnd, PartStart, split_multipart
from tests.support.nodeproc import NodeProc
from tests.support.pacs import TOKEN, phantom, start_node
from tests.support.peers import wait_until

AUTH = f"Authorization: Bearer {TOKEN}\r\n".encode()
STOW_TYPE = b'Content-Type: multipart/related; type="application/dicom"; boundary=b1\r\n'
BIG = 10240  # rows = columns of the big part: 10240 x 10240 x 2 bytes = 200 MiB of pixel data


# ------------------------------------------------------------------------------------------ helpers


def _status_kb(pid: int, key: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise AssertionError(f"{key} not in /proc/{pid}/status")


def _big_header(rows: int) -> bytes:
    """A Part 10 Secondary Capture header up to (not including) its PixelData element; Modality OT, so no
    rule matches and the node never decodes it."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.Modality, ds.PatientID, ds.ConversionType = "OT", "LIMITS", "WSD"
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.Rows = ds.Columns = rows
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def _big_body(header: bytes, pixel_bytes: int, chunk: int = 1 << 20) -> Iterator[bytes]:
    """A one-part STOW-RS body whose part carries ``pixel_bytes`` of pixel data, generated chunk by chunk."""
    yield b"--b1\r\nContent-Type: application/dicom\r\n\r\n" + header
    yield b"\xe0\x7f\x10\x00OW\x00\x00" + struct.pack("<I", pixel_bytes)  # (7FE0,0010) OW, explicit length
    block = bytes(range(256)) * (chunk // 256)
    left = pixel_bytes
    while left:
        n = min(left, len(block))
        yield block[:n]
        left -= n
    yield b"\r\n--b1--\r\n"


def _raw(port: int) -> socket.socket:
    return socket.create_connection(("127.0.0.1", port), timeout=10)


def _response(s: socket.socket, timeout: float) -> tuple[int, bytes, float]:
    """(status, whole answer, seconds until the node closed) read from ``s`` until EOF."""
    t0 = time.monotonic()
    s.settimeout(timeout)
    data = b""
    while True:
        try:
            got = s.recv(65536)
        except ConnectionResetError:
            break
        if not got:
            break
        data += got
    status = int(data.split(b" ", 2)[1]) if data.startswith(b"HTTP/1.1 ") else 0
    return status, data, time.monotonic() - t0


def _closed(s: socket.socket) -> bool:
    """True once the node has closed ``s`` (its answer, if any, read and dropped)."""
    s.settimeout(0.01)
    try:
        while s.recv(4096):
            pass
        return True
    except TimeoutError:
        return False
    except OSError:
        return True


def _leftovers(node: NodeProc) -> list[str]:
    return sorted(p.name for p in (node.spool / "incoming").iterdir() if p.name.startswith("stow-"))


# ------------------------------------------------------------------------------------------ the parser


def test_multipart_stream_matches_the_whole_body_parser_whatever_the_chunks() -> None:
    rng = random.Random(7)
    parts = [bytes(rng.randrange(256) for _ in range(n)) for n in (0, 1, 5, 300, 5000)]
    parts.append(b"\r\n--b2\r\n-\r\n--b")  # near misses of the delimiter, also across chunks
    body = b"preamble\r\n" + b"".join(b"--b1\r\nContent-Type: application/dicom\r\n\r\n" + p + b"\r\n"
                                     for p in parts) + b"--b1--\r\nepilogue"
    expected = [p for _h, p in split_multipart(body, "b1")]
    assert expected == parts
    for trial in range(50):
        stream, got, cur = MultipartStream("b1"), [], bytearray()
        i = 0
        while i < len(body):
            n = 1 if trial == 0 else rng.randrange(1, 200)
            for ev in stream.feed(body[i:i + n]):
                if isinstance(ev, PartStart):
                    assert ev.headers == {"content-type": "application/dicom"}
                    cur = bytearray()
                elif isinstance(ev, PartData):
                    cur += ev.data
                else:
                    assert isinstance(ev, PartEnd)
                    got.append(bytes(cur))
            i += n
        stream.close()
        assert got == parts, trial
    truncated = MultipartStream("b1")
    list(truncated.feed(body[:200]))
    with pytest.raises(MultipartError, match="no closing delimiter"):
        truncated.close()
    with pytest.raises(MultipartError, match="no parts"):
        empty = MultipartStream("b1")
        list(empty.feed(b"--x--"))
        empty.close()


# ------------------------------------------------------------------------------------------ the node


@pytest.mark.faults
def test_a_200_mb_stow_part_does_not_grow_the_node(tmp_path: Path) -> None:
    """Default body limits (2048 MB) but a 3 s idle timeout: a 200 MiB part streams through; "2 GB" announced
    with 60 bytes sent is answered 408 after 3 s."""
    node = start_node(tmp_path / "node", {"http": {"body_idle_timeout_s": 3.0}})
    try:
        pid = node.proc.pid if node.proc else 0
        header = _big_header(BIG)
        pixel_bytes = BIG * BIG * 2
        # settle, then measure: RSS now, and the peak from here on (VmHWM reset by clear_refs 5)
        with httpx.Client(base_url=node.http_url, timeout=30) as c:
            c.get("/readyz")
        rss_before = _status_kb(pid, "VmRSS")
        Path(f"/proc/{pid}/clear_refs").write_text("5")
        t0 = time.monotonic()
        with httpx.Client(base_url=node.http_url, timeout=300,
                          headers={"Authorization": f"Bearer {TOKEN}"}) as c:
            r = c.post("/dicom-web/studies", content=_big_body(header, pixel_bytes),
                       headers={"Content-Type": 'multipart/related; type="application/dicom"; boundary=b1'})
        seconds = time.monotonic() - t0
        peak = _status_kb(pid, "VmHWM")
        assert r.status_code == 200, r.text
        stored = list((node.spool / "instances").rglob("*.dcm"))
        assert len(stored) == 1 and stored[0].stat().st_size == len(header) + 12 + pixel_bytes
        growth_mb = (peak - rss_before) / 1024
        print(f"\n200 MiB STOW-RS part in {seconds:.1f} s: node RSS {rss_before / 1024:.0f} MB before, "
              f"peak {peak / 1024:.0f} MB during (+{growth_mb:.0f} MB)")
        assert growth_mb < 64, f"the node grew by {growth_mb:.0f} MB receiving a 200 MiB part"
        assert _leftovers(node) == []
        job = node.wait_jobs(lambda jobs: jobs and jobs[0]["state"] == "ignored", timeout=60,
                             what="the OT series left alone")
        assert job[0]["instances"] == 1
        with _raw(int(node.config["http"]["port"])) as s:
            s.sendall(_stow_head(2_000_000_000) + b"--b1\r\nContent-Type: application/dicom\r\n\r\n" + b"x" * 19)
            status, answer, seconds = _response(s, timeout=15)
        assert status == 408 and 2.5 <= seconds <= 8, (answer, seconds)
        assert b"60 of 2000000000 bytes received" in answer
    finally:
        node.stop()


@pytest.fixture(scope="module")
def tight(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NodeProc]:
    """A node with tight HTTP limits: 1 MB bodies, 2 s for a request head and between body bytes, 4 s per body."""
    node = start_node(tmp_path_factory.mktemp("tight"), {"http": {
        "max_body_mb": 1, "header_timeout_s": 2.0, "body_idle_timeout_s": 2.0, "body_timeout_s": 4.0}})
    yield node
    node.stop()


def _stow_head(length: int | None) -> bytes:
    size = f"Content-Length: {length}\r\n" if length is not None else "Transfer-Encoding: chunked\r\n"
    return b"POST /dicom-web/studies HTTP/1.1\r\nHost: node\r\n" + AUTH + STOW_TYPE + size.encode() + b"\r\n"


def test_lying_content_length_gets_408_after_the_idle_timeout(tight: NodeProc) -> None:
    port = int(tight.config["http"]["port"])
    with _raw(port) as s:
        s.sendall(_stow_head(900_000) + b"--b1\r\nContent-Type: application/dicom\r\n\r\n" + b"x" * 19)  # 60 bytes
        status, answer, seconds = _response(s, timeout=15)
    assert status == 408, answer
    assert 1.5 <= seconds <= 6, seconds
    assert b"body_idle_timeout_s = 2" in answer and b"60 of 900000 bytes received" in answer, answer
    assert _leftovers(tight) == []


def test_announced_body_over_the_limit_gets_413_before_it_is_read(tight: NodeProc) -> None:
    port = int(tight.config["http"]["port"])
    with _raw(port) as s:
        s.sendall(_stow_head(2_000_000_000))  # "2 GB", nothing of it sent
        status, answer, seconds = _response(s, timeout=10)
    assert status == 413 and seconds < 2, (answer, seconds)
    assert b"max_body_mb = 1" in answer


def test_chunked_body_growing_past_the_limit_gets_413(tight: NodeProc) -> None:
    port = int(tight.config["http"]["port"])
    part = b"--b1\r\nContent-Type: application/dicom\r\n\r\n" + b"y" * (1 << 20)  # over 1 MB in all
    with _raw(port) as s:
        s.sendall(_stow_head(None))
        for i in range(0, len(part), 32768):
            piece = part[i:i + 32768]
            s.sendall(f"{len(piece):x}\r\n".encode() + piece + b"\r\n")
        status, answer, _ = _response(s, timeout=10)
    assert status == 413, answer
    assert b"over [http] max_body_mb = 1" in answer
    wait_until(lambda: _leftovers(tight) == [], timeout=5, what="the partial part removed from incoming/")


def test_body_slower_than_body_timeout_gets_408(tight: NodeProc) -> None:
    port = int(tight.config["http"]["port"])
    body = b"--b1\r\nContent-Type: application/dicom\r\n\r\n" + b"z" * 200
    with _raw(port) as s:
        s.sendall(_stow_head(len(body)))
        t0 = time.monotonic()
        s.settimeout(0.05)
        for b in body:  # one byte every 0.25 s: never idle for 2 s, but 200 bytes take 50 s
            try:
                s.sendall(bytes([b]))
            except OSError:
                break
            if time.monotonic() - t0 > 12:
                break
            try:
                if s.recv(1, socket.MSG_PEEK):
                    break  # the answer is there
            except TimeoutError:
                pass
            time.sleep(0.2)
        status, answer, _ = _response(s, timeout=10)
        seconds = time.monotonic() - t0
    assert status == 408, answer
    assert b"body_timeout_s = 4" in answer and 3.5 <= seconds <= 9, (answer, seconds)


def test_trickling_and_silent_connections_are_closed_and_do_not_block_others(tight: NodeProc) -> None:
    port = int(tight.config["http"]["port"])
    head = b"GET /jobs HTTP/1.1\r\nHost: node\r\n" + AUTH + b"\r\n"
    trickling = [_raw(port) for _ in range(20)]
    silent = [_raw(port) for _ in range(20)]
    t0 = time.monotonic()
    sent = 0
    closed_at: dict[int, float] = {}
    try:
        while len(closed_at) < 40 and time.monotonic() - t0 < 15:
            for s in trickling:  # one byte of the request head each, every 0.25 s (it would take 20 s)
                if id(s) not in closed_at and sent < len(head) - 1:
                    try:
                        s.sendall(head[sent:sent + 1])
                    except OSError:
                        closed_at[id(s)] = time.monotonic() - t0
            sent += 1
            for s in trickling + silent:
                if id(s) not in closed_at and _closed(s):
                    closed_at[id(s)] = time.monotonic() - t0
            # meanwhile a legitimate client is served at once
            r = httpx.get(f"{tight.http_url}/healthz", timeout=2)
            assert r.status_code == 200
            time.sleep(0.25)
    finally:
        for s in trickling + silent:
            s.close()
    assert len(closed_at) == 40, f"{40 - len(closed_at)} connections still open after 15 s"
    assert all(1.5 <= t <= 6 for t in closed_at.values()), sorted(closed_at.values())
    log = tight.log()
    assert log.count("no complete request head within [http] header_timeout_s = 2") >= 40


def test_normal_stow_still_works_within_the_limits(tight: NodeProc, tmp_path: Path) -> None:
    files = phantom(tmp_path, seed=61, slices=2, size=32)
    body = b"".join(b"--b1\r\nContent-Type: application/dicom\r\n\r\n" + f.read_bytes() + b"\r\n" for f in files)
    with httpx.Client(base_url=tight.http_url, timeout=30, headers={"Authorization": f"Bearer {TOKEN}"}) as c:
        r = c.post("/dicom-web/studies", content=body + b"--b1--\r\n",
                   headers={"Content-Type": 'multipart/related; type="application/dicom"; boundary=b1'})
    assert r.status_code == 200, r.text
    assert len(r.json()["00081199"]["Value"]) == 2
    sops = {str(pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID) for f in files}
    assert {i["00081155"]["Value"][0] for i in r.json()["00081199"]["Value"]} == sops
    assert json.loads(r.text)  # a DICOM JSON answer
