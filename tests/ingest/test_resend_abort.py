"""Resends that differ, and transfers that never finish (issue #16, item 9), against the real node.

Attacks: a known SOPInstanceUID sent again with other pixels (or another patient name, or under another
study); a transfer killed (the sender dies) or aborted (A-ABORT) half-way. Before: the differing resend was
dropped with one INFO line; the partial file stayed in spool/incoming/ until the next restart. Now: a differing
resend is a conflict: kept aside in spool/conflicts/, listed by ``srnode status`` (text and --json), counted in
``srnode_instance_conflicts_total`` and audited, the first copy still the one used (an identical resend is still
a plain duplicate); the partial file is removed as soon as the association ends, and logged and audited.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import httpx
import numpy as np
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
    if mode == "abort" and sent[0] == 40:  # an A-ABORT half-way through the data set, then gone
        pdu = A_ABORT_RQ()
        pdu.source, pdu.reason_diagnostic = 0x00, 0x00
        event.assoc.dul.socket.socket.sendall(pdu.encode())
        os._exit(0)
ae = AE(ae_title="ABORTER")
ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
assoc = ae.associate("127.0.0.1", port, ae_title="SRNODE", evt_handlers=[(evt.EVT_PDU_SENT, on_pdu)])
assert assoc.is_established
assoc.send_c_store(path)
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
