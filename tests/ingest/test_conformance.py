"""C-STORE conformance against the real node (issue #16, item 8).

Attacks: a C-STORE whose data set's SOPInstanceUID is not the command's Affected SOP Instance UID; one whose data
set is of another SOP class than the command's; an association calling another AE title than the node's.
Before: the first was stored under the data set's UID with Success, the third was accepted. Now: both mismatches
are answered 0xA900 (PS3.4 B.2.3 "data set does not match SOP class") and nothing is stored; an association to
another called AE title is rejected (A-ASSOCIATE-RJ, "called AE title not recognised") unless
``[node] require_called_ae = false``, and the rejection is logged and audited.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

from pydicom import dcmread
from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage, generate_uid
from pynetdicom import AE
from pynetdicom.sop_class import CTImageStorage  # type: ignore[attr-defined]

from tests.support.hostile import series
from tests.support.nodeproc import NodeProc
from tests.support.peers import ECHOSCU, storescu


def _send(port: int, path: Path, sop_class: str) -> int:
    ae = AE(ae_title="CONFSCU")
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 30
    ae.add_requested_context(sop_class, ExplicitVRLittleEndian)
    assoc = ae.associate("127.0.0.1", port, ae_title="SRNODE")
    assert assoc.is_established
    try:
        rsp = assoc.send_c_store(path)
        return int(rsp.Status)
    finally:
        assoc.release()


def _meta_says(src: Path, dst: Path, **meta: str) -> Path:
    """``src`` with its file meta changed (the data set untouched): the command will name these UIDs."""
    ds = dcmread(src)
    for k, v in meta.items():
        setattr(ds.file_meta, k, v)
    ds.save_as(dst)  # not enforce_file_format: that would set the file meta from the data set again
    assert all(str(getattr(dcmread(dst).file_meta, k)) == v for k, v in meta.items())
    return dst


def test_dataset_and_command_mismatch_get_a900_and_nothing_is_stored(tmp_path: Path, raw_send: None) -> None:
    files = series(tmp_path / "ct", 51, 3)
    other_uid = str(generate_uid())
    wrong_instance = _meta_says(files[0], tmp_path / "wrong-instance.dcm", MediaStorageSOPInstanceUID=other_uid)
    wrong_class = _meta_says(files[1], tmp_path / "wrong-class.dcm", MediaStorageSOPClassUID=MRImageStorage)
    with NodeProc.start(tmp_path / "node") as node:
        assert _send(node.port, wrong_instance, CTImageStorage) == 0xA900
        assert _send(node.port, wrong_class, MRImageStorage) == 0xA900
        assert _send(node.port, files[2], CTImageStorage) == 0x0000  # the control: a matching one is stored
        log = node.log()
        status = json.loads(node.cli("status", "--json").stdout)
    assert status["instances"] == 1
    stored = list((node.spool / "instances").rglob("*.dcm"))
    assert [p.stem for p in stored] == [str(dcmread(files[2]).SOPInstanceUID)]
    assert f"differs from the command's Affected SOP Instance UID {other_uid}" in log
    assert f"differs from the command's {MRImageStorage}" in log


def _echo(port: int, called: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([ECHOSCU, "-aet", "CALLER1", "-aec", called, "-to", "5", "127.0.0.1", str(port)],
                          capture_output=True, text=True, timeout=20)


def test_wrong_called_ae_title_is_rejected_logged_and_audited(tmp_path: Path) -> None:
    files = series(tmp_path / "ct", 52, 3)
    with NodeProc.start(tmp_path / "node") as node:
        r = storescu(files, node.port, aet="NOTSRNODE", calling="CALLER1")
        assert r.returncode != 0 and "Called AE Title Not Recognized" in r.stdout + r.stderr, r.stdout + r.stderr
        assert _echo(node.port, "ANY-SCP").returncode != 0
        assert _echo(node.port, "SRNODE").returncode == 0
        log = node.log()
        audit = [json.loads(ln) for ln in (node.spool / "audit.log").read_text().splitlines()]
        status = json.loads(node.cli("status", "--json").stdout)
    assert status["instances"] == 0
    assert "it called AE title 'NOTSRNODE', ours is 'SRNODE'" in log
    rejected = [a for a in audit if a["event"] == "association-rejected"]
    assert {(a["calling_ae"], a["called_ae"]) for a in rejected} == {("CALLER1", "NOTSRNODE"), ("CALLER1", "ANY-SCP")}
    # a site that wants promiscuous routing turns it off
    with NodeProc.start(tmp_path / "node2", {"node": {"require_called_ae": False}}) as node2:
        r = storescu(files, node2.port, aet="NOTSRNODE", calling="CALLER1")
        assert r.returncode == 0, r.stdout + r.stderr
        assert json.loads(node2.cli("status", "--json").stdout)["instances"] == 3
