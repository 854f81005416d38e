"""STOW-RS requests of very many parts (hostile17), against the real node process.

A 1 MB body of 100,000 empty parts (``--b\\r\\n\\r\\n\\r\\n`` each) took 12.7 s of the node, wrote 100,000 WARNING lines
(about 17 MB) into its log, raised its peak RSS by 135 MB and was answered with an 8.7 MB JSON of 100,000 failed
entries naming no instance; a 2 GB body (``max_body_mb``) of such parts would have written 200 million lines and
built an answer of ~17 GB in memory. Now ``[http] max_stow_parts`` bounds the parts of a request (the part beyond
it ends the request with 413, the instances stored before are kept and counted), and refused parts are logged ten
a request, then one line with the count by status.
"""

from __future__ import annotations

from pathlib import Path

import httpx

from node.store import Index
from tests.support.pacs import TOKEN, phantom, start_node

STOW = 'multipart/related; type="application/dicom"; boundary=b'


def _part(data: bytes) -> bytes:
    return b"--b\r\nContent-Type: application/dicom\r\n\r\n" + data + b"\r\n"


def test_a_request_of_more_parts_than_max_stow_parts_is_ended_with_413_and_logged_in_a_few_lines(
        tmp_path: Path) -> None:
    node = start_node(tmp_path / "node", {"node": {"stable_age_s": 3600}, "http": {"max_stow_parts": 1000}})
    try:
        good = [f.read_bytes() for f in phantom(tmp_path, seed=1703, slices=3)]
        empty = b"--b\r\n\r\n\r\n"
        # 900 empty parts within the bound: 409, 10 lines and a count
        r = httpx.post(f"{node.http_url}/dicom-web/studies", content=empty * 900 + b"--b--\r\n", timeout=120,
                       headers={"Authorization": f"Bearer {TOKEN}", "Content-Type": STOW})
        assert r.status_code == 409, r.text
        # 3 instances then 100,000 empty parts: the 1,001st part ends it
        body = b"".join(_part(d) for d in good) + empty * 100_000 + b"--b--\r\n"
        r = httpx.post(f"{node.http_url}/dicom-web/studies", content=body, timeout=120,
                       headers={"Authorization": f"Bearer {TOKEN}", "Content-Type": STOW})
        assert r.status_code == 413, r.text  # before: 202 with 100,000 failed entries (8.7 MB)
        assert r.json()["stored"] == 3 and "[http] max_stow_parts = 1000" in r.json()["error"], r.text
        assert len(r.content) < 2000
        assert httpx.get(f"{node.http_url}/healthz", timeout=10).status_code == 200
        ix = Index(node.spool / "index.sqlite")  # the 3 instances stored before the bound are kept
        assert sum(int(row["n_instances"]) for row in ix.all_series()) == 3
        ix.close()
    finally:
        node.stop()
    log = node.log()
    refused = [line for line in log.splitlines() if "STOW-RS: instance refused" in line]
    assert len(refused) == 20, len(refused)  # before: 900 + 100,000 lines
    assert log.count("more refused part(s) in this request") == 2
    assert "and 890 more refused part(s) in this request" in log, log[-2000:]
    assert "413: more than [http] max_stow_parts = 1000 parts" in log
    assert "Traceback" not in log
