"""Series that would kill the node, against the real node process: a decompression bomb (three RLE frames of 8 MB
declaring 16384 x 16384 each) and headers that declare more pixels than the file holds are refused before any
decoding, with the numbers; a job whose runs kill the node (SIGKILL while processing) is failed as poison after
``[node] max_job_attempts`` runs instead of crash-looping. The node stays up and keeps processing other series.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pydicom
import pytest
from pydicom.encaps import encapsulate
from pydicom.uid import RLELossless

from node.app.phantom import write_phantom_series
from tests.support.gated import GATE_ENV, GATED_ENGINE, entered, open_gate
from tests.support.nodeproc import NodeProc
from tests.support.peers import storescu, wait_until

DONE = ("delivered", "failed", "dead-letter", "ignored")
SIDE = 16384


def rle_bomb_frame(side: int = SIDE) -> bytes:
    """One 16-bit frame of side x side pixels in DICOM RLE at RLE's best ratio: two segments (high and low
    bytes), each row as replicate runs of 128 zero bytes, 2 bytes per run: 8 MB for 512 MB of pixels."""
    row = bytes([0x81, 0]) * (side // 128)  # header byte -127: the next byte 128 times
    segment = row * side
    header = bytearray(64)
    header[0:4] = (2).to_bytes(4, "little")
    header[4:8] = (64).to_bytes(4, "little")
    header[8:12] = (64 + len(segment)).to_bytes(4, "little")
    return bytes(header) + segment + segment


def write_bomb(folder: Path, seed: int) -> list[Path]:
    """Three CT slices (real phantom headers) whose pixel data is one RLE bomb frame each (8 MB files)."""
    files = write_phantom_series(folder, slices=3, size=16, step_mm=3.0, seed=seed)
    frame = rle_bomb_frame()
    for f in files:
        ds = pydicom.dcmread(f)
        ds.Rows = ds.Columns = SIDE
        ds.file_meta.TransferSyntaxUID = RLELossless
        ds.PixelData = encapsulate([frame])
        ds["PixelData"].VR = "OB"
        ds["PixelData"].is_undefined_length = True
        ds.save_as(f, enforce_file_format=True)
    return files


def write_liar(folder: Path, seed: int) -> list[Path]:
    """Three small uncompressed CT slices whose headers declare 16384 x 16384 pixels over 64 KiB of data."""
    files = write_phantom_series(folder, slices=3, size=16, step_mm=3.0, seed=seed)
    for f in files:
        ds = pydicom.dcmread(f)
        ds.Rows = ds.Columns = SIDE
        ds.PixelData = bytes(65536)
        ds.save_as(f, enforce_file_format=True)
    return files


def _vm_kb(pid: int, key: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise AssertionError(key)


def _audit(node: NodeProc) -> list[dict[str, Any]]:
    return [json.loads(ln) for ln in (node.spool / "audit.log").read_text().splitlines()]


def test_bomb_and_lying_headers_are_refused_before_decoding(tmp_path: Path) -> None:
    bomb = write_bomb(tmp_path / "bomb", seed=81)
    liar = write_liar(tmp_path / "liar", seed=82)
    good = write_phantom_series(tmp_path / "good", slices=4, size=32, step_mm=3.0, seed=83)
    assert all(7_000_000 < f.stat().st_size < 9_000_000 for f in bomb)
    uid = {name: str(pydicom.dcmread(files[0], stop_before_pixels=True).SeriesInstanceUID)
           for name, files in (("bomb", bomb), ("liar", liar), ("good", good))}
    with NodeProc.start(tmp_path / "node", {"node": {"max_series_memory_mb": 4096}}) as node:
        assert node.proc is not None
        pid = node.proc.pid
        Path(f"/proc/{pid}/clear_refs").write_text("5")  # VmHWM from here on
        for files, args in ((bomb, ["-xr"]), (liar, []), (good, [])):  # -xr: propose RLE lossless
            r = storescu(files, node.port, extra_args=args)
            assert r.returncode == 0, r.stdout + r.stderr
        jobs = node.wait_jobs(lambda js: len([j for j in js if j["state"] in DONE]) == 3, timeout=180,
                              what="three series decided")
        peak_mb = _vm_kb(pid, "VmHWM") / 1024
        print(f"\nbomb + liar + good series: node peak RSS {peak_mb:.0f} MB")
        assert node.proc.poll() is None and node.starts == 1, "the node went down"
        audit = _audit(node)
    by_series = {j["series"]: j for j in jobs}
    b, lie, ok = by_series[uid["bomb"]], by_series[uid["liar"]], by_series[uid["good"]]
    assert ok["state"] == "delivered", ok
    assert b["state"] == "failed" and b["reason"].startswith("refused before decoding: series needs about "), b
    for words in ("over the budget of 4096 MB (node.max_series_memory_mb)", "3 frame(s) of up to 16384x16384",
                  "2 byte(s)/sample = 1536 MB decoded", "1342 M output voxels x 40 B (engine cubic)",
                  "not decoded"):
        assert words in b["reason"], (words, b["reason"])
    assert lie["state"] == "failed", lie
    assert "PixelData has 65536 bytes, the header declares 536870912" in lie["reason"], lie
    assert peak_mb < 1024, f"the node's peak RSS reached {peak_mb:.0f} MB: something was decoded"
    failed = {a["series"]: a["reason"] for a in audit if a["event"] == "job-failed"}
    assert failed.keys() == {uid["bomb"], uid["liar"]}


@pytest.mark.faults
def test_a_job_that_kills_the_node_is_failed_as_poison(tmp_path: Path) -> None:
    slow = write_phantom_series(tmp_path / "slow", slices=4, size=32, step_mm=3.0, seed=84)
    for f in slow:  # the rule "slow" (selfsup, endless fine-tuning) takes MR; every kill lands in its run
        ds = pydicom.dcmread(f)
        ds.Modality = "MR"  # and an MR image: a CT Image Storage object saying MR is refused before any run
        ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.4"
        ds.ScanningSequence, ds.SequenceVariant, ds.ScanOptions, ds.MRAcquisitionType = "GR", "NONE", "", "3D"
        ds.EchoTime, ds.RepetitionTime = "2.0", "8.0"
        ds.save_as(f, enforce_file_format=True)
    good = write_phantom_series(tmp_path / "good", slices=4, size=32, step_mm=3.0, seed=85)
    sections = {
        "node": {"max_job_attempts": 3},
        "engine": {"name": "cubic", "device": "cpu", "finetune_steps": 1_000_000, "fast": False},
        "rules": [{"name": "slow", "match": {"Modality": "^MR$"}, "engine": "selfsup", "destinations": ["out"]},
                  {"name": "ct", "match": {"Modality": "^CT$"}, "destinations": ["out"]}],
    }
    node = NodeProc.start(tmp_path / "node", sections)
    try:
        assert storescu(slow, node.port).returncode == 0
        for attempt in (1, 2, 3):
            wait_until(lambda a=attempt: any(j["state"] == "processing" and j["attempts"] == a  # type: ignore[misc]
                                             for j in node.jobs()),
                       timeout=120, interval=0.05, what=f"run {attempt} of the job processing")
            node.kill9()
            node.launch()
        jobs = node.wait_jobs(lambda js: js and js[0]["state"] == "failed", timeout=60, what="the job failed")
        job = jobs[0]
        assert job["attempts"] == 3, job
        assert job["reason"].startswith("poison: the node stopped 3 time(s) while processing this job"), job
        assert "node.max_job_attempts = 3" in job["reason"]
        # the node is up, stays up, and processes the next series
        assert storescu(good, node.port).returncode == 0
        jobs = node.wait_jobs(lambda js: len(js) == 2 and js[1]["state"] in DONE, timeout=120,
                              what="the next series processed")
        assert [j["state"] for j in jobs] == ["failed", "delivered"], json.dumps(jobs, indent=1)
        assert node.proc is not None and node.proc.poll() is None and node.starts == 4
        poison = [a for a in _audit(node) if a["event"] == "job-failed" and a["job"] == job["id"]]
        assert len(poison) == 1 and poison[0]["reason"] == job["reason"]
        assert "failed as poison" in node.log()
        # srnode retry gives it max_job_attempts runs again (attempts counted afresh)
        r = node.cli("retry", str(job["id"]))
        assert r.returncode == 0, r.stdout + r.stderr
        wait_until(lambda: node.jobs()[0]["state"] == "processing" and node.jobs()[0]["attempts"] == 1,
                   timeout=60, interval=0.05, what="the retried job running again, attempt 1")
    finally:
        node.kill9()


def test_a_graceful_stop_during_a_job_is_not_counted_as_a_run_that_stopped_the_node(tmp_path: Path) -> None:
    """SIGTERM while a job runs longer than the stop waits for it (30 s; a CPU selfsup job takes minutes): the node
    stops cleanly, the job is re-queued at the next start and runs. Before, that run counted like a kill -9 toward
    max_job_attempts: after that many restarts (here 1) the job was failed as poison, never run again."""
    gate = tmp_path / "gate"
    gate.mkdir()
    files = write_phantom_series(tmp_path / "ct", slices=4, size=32, step_mm=3.0, seed=86)
    sections = {"node": {"max_job_attempts": 1},
                "rules": [{"name": "ct", "match": {"Modality": "^CT$"}, "engine": GATED_ENGINE,
                           "destinations": ["out"]}]}
    node = NodeProc.start(tmp_path / "node", sections, module="tests.support.gated", env={GATE_ENV: str(gate)})
    try:
        assert storescu(files, node.port).returncode == 0
        wait_until(lambda: entered(gate, 1), timeout=60, what="the job in its engine")
        assert node.stop() == 0  # SIGTERM: the job is still in its engine when the stop gives up waiting
        assert [(j["state"], j["attempts"]) for j in node.jobs()] == [("processing", 0)], node.jobs()
        assert "it is re-queued at next start" in node.log()
        open_gate(gate)
        node.launch()
        jobs = node.wait_jobs(lambda js: js and js[0]["state"] in DONE, timeout=120, what="the job ended")
        assert [(j["state"], j["attempts"]) for j in jobs] == [("delivered", 1)], json.dumps(jobs, indent=1)
        assert "failed as poison:" not in node.log()
    finally:
        node.stop()
