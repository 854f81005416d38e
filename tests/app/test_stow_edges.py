"""STOW-RS into the real node: multipart edge cases (break14o). A quoted boundary with a space, parts without a
Content-Type, a chunked body, a body cut before its closing delimiter, a part of the wrong study."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.support.nodeproc import NodeProc
from tests.support.pacs import TOKEN, phantom, start_node

STOW = 'multipart/related; type="application/dicom"; boundary='


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NodeProc]:
    n = start_node(tmp_path_factory.mktemp("stow") / "node", {})
    yield n
    n.stop()


def _body(boundary: bytes, parts: list[bytes], close: bool = True,
          part_head: bytes = b"Content-Type: application/dicom\r\n") -> bytes:
    out = b"".join(b"--" + boundary + b"\r\n" + part_head + b"\r\n" + d + b"\r\n" for d in parts)
    return out + (b"--" + boundary + b"--\r\n" if close else b"")


def _post(node: NodeProc, ctype: str, content: bytes | Iterator[bytes], path: str = "") -> httpx.Response:
    return httpx.post(f"{node.http_url}/dicom-web/studies{path}", content=content, timeout=60,
                      headers={"Authorization": f"Bearer {TOKEN}", "Content-Type": ctype})


def test_boundaries_parts_and_chunks_a_client_may_send(node: NodeProc, tmp_path: Path) -> None:
    data = [f.read_bytes() for f in phantom(tmp_path, seed=144, slices=4)]
    assert _post(node, STOW + '"a b:c"', _body(b"a b:c", data[:1])).status_code == 200  # quoted, with a space
    r = _post(node, 'multipart/related; boundary=b1; type="application/dicom"', _body(b"b1", data[1:2], part_head=b""))
    assert r.status_code == 200, r.text  # a part without Content-Type is application/dicom (PS3.18 default)

    def chunks() -> Iterator[bytes]:
        yield _body(b"b1", data[2:3], close=False)
        yield b"--b1--\r\n"
    assert _post(node, STOW + "b1", chunks()).status_code == 200  # Transfer-Encoding: chunked


def test_a_body_cut_before_its_closing_delimiter_keeps_only_whole_parts(node: NodeProc, tmp_path: Path) -> None:
    data = [f.read_bytes() for f in phantom(tmp_path, seed=145, slices=2)]
    r = _post(node, STOW + "b1", _body(b"b1", data, close=False))
    # the last part may be cut: never admitted; the whole one before it is, and said
    assert r.status_code == 400 and r.json() == {"error": "multipart body has no closing delimiter (truncated?)",
                                                 "stored": 1}, r.text


def test_a_part_of_another_study_than_the_url_is_refused_in_one_clear_line(node: NodeProc, tmp_path: Path) -> None:
    """break14o: the Warning read "part 1: part 1: StudyInstanceUID does not match the study of the URL"."""
    data = [f.read_bytes() for f in phantom(tmp_path, seed=146, slices=1)]
    r = _post(node, STOW + "b1", _body(b"b1", data), path="/1.2.3")
    assert r.status_code == 409, r.text
    assert r.headers.get_list("warning") == ['299 srnode "part 1: StudyInstanceUID does not match the study of the URL"']
    assert r.json()["00081198"]["Value"][0]["00081197"]["Value"] == [0xA900]


@pytest.mark.parametrize("media", ["application/dicom+json", "application/dicom+xml", "application/octet-stream"])
def test_a_request_type_other_than_application_dicom_is_415(node: NodeProc, tmp_path: Path, media: str) -> None:
    """break14o: ``type="application/dicom+json"`` (PS3.18's metadata-and-bulk-data request, which the node does
    not implement) was read as instances: its JSON parts refused one by one (409, 0xC210), or, holding Part 10
    files after all, stored (200). An unsupported request media type is 415 (PS3.18 10.5.3), naming it; no
    ``type`` at all stays application/dicom."""
    data = [f.read_bytes() for f in phantom(tmp_path, seed=151, slices=1)]
    r = _post(node, f'multipart/related; type="{media}"; boundary=b1', _body(b"b1", data))
    assert r.status_code == 415, r.text
    assert r.json()["error"] == (f"multipart/related type {media!r} is not supported: only application/dicom "
                                 "(Part 10 instances)")
