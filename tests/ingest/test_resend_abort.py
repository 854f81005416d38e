"""Resends that differ, and transfers that never finish (issue #16, item 9), against the real node.

Attacks: a known SOPInstanceUID sent again with other pixels (or another patient name, or under another
study); a transfer killed (the sender dies) or aborted (A-ABORT) half-way. Before: the differing resend was
dropped with one INFO line; the partial file stayed in spool/incoming/ until the next restart. Now: a differing
resend is a conflict: kept aside in spool/conflicts/, listed by ``srnode status`` (text and --json), counted in
``srnode_instance_conflicts_total`` and audited, the first copy still the one used (an identical resend is still
a plain duplicate); the partial file is removed as soon as the association ends, and logged and audited. And a
transfer still arriving counts against the disk watermark: when the spool disk falls below ``min_free_mb`` during
it, the association is aborted and its partial file removed, instead of filling the disk to the end of the data set.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import httpx
import numpy as np
import pytest
from pydicom import dcmread

from tests.support.hostile import series
from tests.support.nodeproc import ROOT, NodeProc
from tests.support.peers import storescu, wait_until


def _variant(src: Path, dst: Path, **change: str) -> Path:
    ds = dcmread(src)
    if change.pop("pixels", ""):
        arr = ds.pixel_array.copy()
        arr[:4, :4] += 100  # a few pixels differ
        ds.PixelData = arr.astype(np.uint16).tobytes()
    for k, v in change.items():
        setattr(ds, k, v)
    ds.save_as(dst)
    return dst


def _metric(node: NodeProc, name: str) -> float:
    for ln in httpx.get(f"{node.http_url}/metrics", timeout=10).text.splitlines():
        if ln.startswith(name + " ") or ln.startswith(name + "{"):
            return float(ln.rsplit(" ", 1)[1])
    raise AssertionError(f"metric {name} not exposed")


def test_a_resend_that_differs_is_a_reported_conflict_not_a_silent_drop(tmp_path: Path) -> None:
    files = series(tmp_path / "ct", 61, 4)
    first = dcmread(files[0])
    sop = str(first.SOPInstanceUID)
    pixels = _variant(files[0], tmp_path / "pixels.dcm", pixels="yes")
    renamed = _variant(files[0], tmp_path / "renamed.dcm", PatientName="QZOTHER^PATIENT")
    moved = _variant(files[0], tmp_path / "moved.dcm", StudyInstanceUID="1.2.826.0.1.3680043.10.1087.9.61.99")
    with NodeProc.start(tmp_path / "node") as node:
        assert storescu(files, node.port, calling="CT01").returncode == 0
        node.wait_jobs(lambda js: [j["state"] for j in js] == ["delivered"], what="series delivered")
        kept_bytes = (node.spool / "instances" / str(first.StudyInstanceUID) / str(first.SeriesInstanceUID)
                      / f"{sop}.dcm").read_bytes()
        # the same file again: a plain duplicate, no conflict
        assert storescu(files[:1], node.port, calling="CT01").returncode == 0
        for f in (pixels, renamed, moved):
            r = storescu([f], node.port, calling="CT02")
            assert r.returncode == 0, r.stdout + r.stderr  # stored aside: the sender gets Success
        text = node.cli("status")
        doc = json.loads(node.cli("status", "--json").stdout)
        conflicts = _metric(node, "srnode_instance_conflicts_total")
        audit = [json.loads(ln) for ln in (node.spool / "audit.log").read_text().splitlines()]
        jobs = node.jobs()
        log = node.log()
    assert [c["reason"] for c in doc["conflicts"]] == [
        "different pixel data", "PatientName differs", "same SOPInstanceUID filed under another study or series"]
    assert {c["sop"] for c in doc["conflicts"]} == {sop} and {c["calling_ae"] for c in doc["conflicts"]} == {"CT02"}
    assert conflicts == 3.0
    assert "3 conflicting resend(s)" in text.stdout and "different pixel data" in text.stdout, text.stdout
    assert [a["reason"] for a in audit if a["event"] == "instance-conflict"] == [c["reason"] for c in doc["conflicts"]]
    # each resend kept aside as received; the first copy is untouched and still the only one indexed
    for c, f in zip(doc["conflicts"], (pixels, renamed, moved), strict=True):
        aside, sent = dcmread(c["resend"]), dcmread(f)
        assert (aside.PixelData, aside.PatientName, aside.StudyInstanceUID) == \
            (sent.PixelData, sent.PatientName, sent.StudyInstanceUID)
    assert Path(doc["conflicts"][0]["kept"]).read_bytes() == kept_bytes
    assert doc["instances"] == 4
    assert not list((node.spool / "instances" / "1.2.826.0.1.3680043.10.1087.9.61.99").rglob("*.dcm"))
    assert len(jobs) == 1, "a conflicting resend started a new job"
    assert "QZOTHER" not in log and "conflicting resend of instance" in log


SENDER = r"""
import os, sys, time
from pynetdicom import AE, evt, _config
from pynetdicom.pdu import A_ABORT_RQ
from pydicom.uid import ExplicitVRLittleEndian
from pynetdicom.sop_class import CTImageStorage
_config.STORE_SEND_CHUNKED_DATASET = True
path, port, mode = sys.argv[1], int(sys.argv[2]), sys.argv[3]
sent = [0]
def on_pdu(event):
    sent[0] += 1
    time.sleep(0.03)  # one PDU every 30 ms: the 2 MB transfer would take about 4 s
    if mode == "abort" and sent[0] == 40:  # an A-ABORT part-way through the data set, then gone
        pdu = A_ABORT_RQ()
        pdu.source, pdu.reason_diagnostic = 0x00, 0x00
        event.assoc.dul.socket.socket.sendall(pdu.encode())
        os._exit(0)
ae = AE(ae_title="ABORTER")
ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
assoc = ae.associate("127.0.0.1", port, ae_title="SRNODE", evt_handlers=[(evt.EVT_PDU_SENT, on_pdu)])
assert assoc.is_established
rsp = assoc.send_c_store(path)
print("status", rsp.Status if rsp is not None and "Status" in rsp else None, "aborted", assoc.is_aborted, flush=True)
"""


def _partial(incoming: Path) -> list[Path]:
    return [p for p in incoming.iterdir() if p.is_file() and p.stat().st_size > 100_000]


def test_an_ended_transfer_leaves_no_partial_file_in_incoming(tmp_path: Path) -> None:
    (big,) = series(tmp_path / "big", 62, 1, size=1024)  # 2 MB of pixel data
    with NodeProc.start(tmp_path / "node", {"node": {"max_pdu": 16384}}) as node:
        incoming = node.spool / "incoming"
        for mode in ("kill", "abort"):
            proc = subprocess.Popen([sys.executable, "-c", SENDER, str(big), str(node.port), mode], cwd=ROOT,
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            try:
                wait_until(lambda: _partial(incoming), timeout=30, interval=0.05, what=f"a partial file ({mode})")
                if mode == "kill":
                    proc.send_signal(signal.SIGKILL)  # the sender dies: the connection just drops
                proc.wait(timeout=30)
            finally:
                if proc.poll() is None:
                    proc.kill()
            # without a restart, the partial file goes as soon as the association has ended
            wait_until(lambda: not any(incoming.iterdir()), timeout=15, interval=0.1,
                       what=f"incoming/ empty after the {mode}ed transfer")
        assert _metric(node, "srnode_spool_incoming_bytes") == 0.0
        audit = [json.loads(ln) for ln in (node.spool / "audit.log").read_text().splitlines()]
        assert len([a for a in audit if a["event"] == "transfer-incomplete"]) == 2, audit
        assert node.log().count("incomplete dataset file(s) removed from incoming/") == 2
        assert json.loads(node.cli("status", "--json").stdout)["instances"] == 0
        assert node.echo(), "the node stopped answering"


def test_a_transfer_that_takes_the_disk_below_the_watermark_is_aborted_midway(tmp_path: Path) -> None:
    """The spool disk is filled by a real ballast file while a slow 8 MB transfer arrives (no restart)."""
    (big,) = series(tmp_path / "big", 63, 1, size=2048)  # 8 MB of pixel data: about 5 s at the sender's pace
    (tmp_path / "node").mkdir()
    st = os.statvfs(tmp_path / "node")
    free_mb = st.f_bavail * st.f_frsize // 2**20
    margin_mb, ballast_mb = 2000, 6000  # generous: teammates' tests write to the same disk meanwhile
    if free_mb < ballast_mb + 4000:
        pytest.skip(f"only {free_mb} MB free on the spool disk; the ballast needs {ballast_mb + 4000} MB")
    ballast = tmp_path / "node" / "ballast"
    with NodeProc.start(tmp_path / "node", {"node": {"max_pdu": 16384, "min_free_mb": int(free_mb - margin_mb)}}
                        ) as node:
        incoming = node.spool / "incoming"
        proc = subprocess.Popen([sys.executable, "-c", SENDER, str(big), str(node.port), "slow"], cwd=ROOT,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            wait_until(lambda: _partial(incoming), timeout=30, interval=0.05, what="a partial file")
            fd = os.open(ballast, os.O_CREAT | os.O_WRONLY, 0o600)
            try:
                os.posix_fallocate(fd, 0, ballast_mb * 2**20)
            finally:
                os.close(fd)
            try:
                wait_until(lambda: proc.poll() is not None, timeout=30, what="the sender sees the abort")
                wait_until(lambda: not any(incoming.iterdir()), timeout=15, what="incoming/ empty")
            finally:
                ballast.unlink()
            out = proc.stdout.read() if proc.stdout else ""
            assert out.startswith("status None"), out  # no Success, no status at all: the association ended
        finally:
            if proc.poll() is None:
                proc.kill()
        log = node.log()
        audit = [json.loads(ln) for ln in (node.spool / "audit.log").read_text().splitlines()]
        assert "aborted during a transfer: spool disk" in log and "below node.min_free_mb" in log, log[-2000:]
        assert [a["event"] for a in audit if a["event"].startswith("transfer-")] == ["transfer-aborted",
                                                                                     "transfer-incomplete"]
        assert json.loads(node.cli("status", "--json").stdout)["instances"] == 0
        # space is back: the same instance is accepted
        r = storescu([big], node.port)
        assert r.returncode == 0, r.stdout + r.stderr
        assert json.loads(node.cli("status", "--json").stdout)["instances"] == 1
