"""Faults against the real node process and a real Orthanc: kill -9 during ingest, processing and sending,
destination outage, dead-letter and ``srnode retry``, spool disk watermark, 16 concurrent associations, late
instances, engine failure. The long ones are marked ``faults`` (``make test-faults``).

What a user checks is what is asserted: every instance that got Success is in the spool after a crash, and
Orthanc ends up with each derived series exactly once and complete (count of instances per series, no more).
"""

from __future__ import annotations

import json
import os
import subprocess
import threading
from pathlib import Path
from typing import Any

import httpx
import pytest
from pydicom import dcmread
from pynetdicom import AE
from pynetdicom.sop_class import CTImageStorage  # type: ignore[attr-defined]

from node.app.phantom import write_phantom_series
from node.bench.ingest import peak_rss_mb, send_concurrently, write_series
from node.store import Index
from tests.support.nodeproc import NodeProc
from tests.support.peers import ORTHANC_BIN, Orthanc, dciodvfy, start_orthanc, storescu, wait_until

DONE = ("delivered", "failed", "dead-letter", "ignored", "superseded")


# ------------------------------------------------------------------------------------------ helpers


def pacs_sections(o: Orthanc, **node: Any) -> dict[str, Any]:
    return {"node": node,
            "destinations": [{"name": "pacs", "kind": "dicom", "ae_title": o.aet, "host": "127.0.0.1",
                              "port": o.dicom_port, "timeout_s": 10.0}],
            "rules": [{"name": "ct", "match": {"Modality": "CT"}, "through_plane_factor": 2,
                       "destinations": ["pacs"]}]}


def restart_orthanc(o: Orthanc) -> Orthanc:
    """Start the same Orthanc again (same config file, ports and storage) after ``o.stop()``."""
    logf = o.log_path.open("ab")
    proc = subprocess.Popen([ORTHANC_BIN, str(o.workdir / "orthanc.json")], stdout=logf, stderr=subprocess.STDOUT,
                            cwd=o.workdir)
    new = Orthanc(url=o.url, dicom_port=o.dicom_port, aet=o.aet, workdir=o.workdir, proc=proc,
                  log_path=o.log_path)
    wait_until(lambda: httpx.get(f"{o.url}/system", timeout=2).status_code == 200, timeout=60,
               what="Orthanc back up")
    return new


def series_counts(o: Orthanc, study_uid: str) -> list[tuple[str, int]]:
    """(Modality, number of instances) of every series Orthanc holds for the study, sorted."""
    return sorted((s["MainDicomTags"].get("Modality", ""), len(s["Instances"])) for s in o.series_of_study(study_uid))


def index_of(node: NodeProc) -> Index:
    return Index(node.spool / "index.sqlite")


def job_states(node: NodeProc) -> list[tuple[str, str]]:
    return [(j.state, j.reason) for j in index_of(node).jobs()]


def expect_delivered_once(o: Orthanc, files: list[Path], factor: int = 2) -> None:
    first = dcmread(files[0], stop_before_pixels=True)
    n_out = (len(files) - 1) * factor + 1
    assert series_counts(o, str(first.StudyInstanceUID)) == [("CT", n_out)]  # cubic: no sigma object


class Scanner:
    """A modality sending a series over one association in a thread, remembering what got Success."""

    def __init__(self, port: int, files: list[Path]) -> None:
        self.port, self.files = port, files
        self.acked: list[str] = []
        self.error = ""
        self.thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> Scanner:
        self.thread.start()
        return self

    def _run(self) -> None:
        ae = AE(ae_title="SCANNER")
        ae.add_requested_context(CTImageStorage)
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 10
        assoc = ae.associate("127.0.0.1", self.port, ae_title="SRNODE")
        try:
            for f in self.files:
                ds = dcmread(f)
                rsp = assoc.send_c_store(ds)
                if rsp is None or "Status" not in rsp:
                    self.error = "no response (association lost)"
                    return
                if int(rsp.Status) == 0:
                    self.acked.append(str(ds.SOPInstanceUID))
        except Exception as exc:  # noqa: BLE001 - the node was killed under us: expected
            self.error = f"{type(exc).__name__}: {exc}"
        finally:
            if assoc.is_established:
                assoc.release()


# ------------------------------------------------------------------------------------------ kill -9


@pytest.mark.faults
def test_kill9_during_ingest_keeps_every_acknowledged_instance(tmp_path: Path) -> None:
    o = start_orthanc(tmp_path / "orthanc")
    files = write_phantom_series(tmp_path / "ct", slices=60, size=128, step_mm=3.0, seed=21)
    try:
        node = NodeProc.start(tmp_path / "node", pacs_sections(o, stable_age_s=15.0))
        scanner = Scanner(node.port, files).start()
        wait_until(lambda: len(scanner.acked) >= 20, timeout=60, what="20 instances acknowledged")
        node.kill9()
        scanner.thread.join(30)
        acked = list(scanner.acked)
        assert len(acked) < len(files), "the kill came too late: the whole series was already stored"
        node.launch()
        idx = index_of(node)
        for sop in acked:
            assert idx.has_instance(sop), f"instance {sop} got Success before the crash but is not in the spool"
        for inst in idx.instances_of(str(dcmread(files[0]).SeriesInstanceUID)):
            dcmread(inst.path)  # every spooled file is complete and readable
        assert not list((node.spool / "incoming").iterdir()), "partial files left in incoming/"
        # the scanner resends the whole series (duplicates of what was stored must be harmless)
        r = storescu(files, node.port, calling="SCANNER")
        assert r.returncode == 0, r.stderr
        jobs = node.wait_jobs(lambda js: any(j["state"] in DONE for j in js), timeout=180, what="series delivered")
        assert [j["state"] for j in jobs] == ["delivered"], json.dumps(jobs, indent=1)
        assert jobs[0]["instances"] == len(files)
        expect_delivered_once(o, files)
        node.stop()
    finally:
        o.stop()


@pytest.mark.faults
def test_kill9_during_processing_requeues_and_delivers_once(tmp_path: Path) -> None:
    o = start_orthanc(tmp_path / "orthanc")
    files = write_phantom_series(tmp_path / "ct", slices=40, size=256, step_mm=3.0, seed=22)
    try:
        node = NodeProc.start(tmp_path / "node", pacs_sections(o))
        assert storescu(files, node.port).returncode == 0
        wait_until(lambda: any(s == "processing" for s, _ in job_states(node)), timeout=60, interval=0.02,
                   what="the job processing")
        node.kill9()
        assert [s for s, _ in job_states(node)] == ["processing"], job_states(node)
        node.launch()
        jobs = node.wait_jobs(lambda js: all(j["state"] in DONE for j in js), timeout=180, what="job finished")
        assert [(j["state"], j["attempts"]) for j in jobs] == [("delivered", 2)], json.dumps(jobs, indent=1)
        expect_delivered_once(o, files)
        node.stop()
    finally:
        o.stop()


@pytest.mark.faults
def test_kill9_during_sending_resends_without_duplicates(tmp_path: Path) -> None:
    o = start_orthanc(tmp_path / "orthanc")
    files = write_phantom_series(tmp_path / "ct", slices=60, size=256, step_mm=3.0, seed=23)
    try:
        node = NodeProc.start(tmp_path / "node", pacs_sections(o))
        assert storescu(files, node.port).returncode == 0

        def half_sent() -> bool:
            n = int(httpx.get(f"{o.url}/statistics", timeout=2).json()["CountInstances"])
            return 30 <= n < (len(files) - 1) * 2 + 1

        wait_until(half_sent, timeout=120, interval=0.02, what="Orthanc holding part of the results")
        node.kill9()
        at_kill = int(httpx.get(f"{o.url}/statistics", timeout=2).json()["CountInstances"])
        assert [s for s, _ in job_states(node)] == ["sending"], job_states(node)
        node.launch()
        jobs = node.wait_jobs(lambda js: all(j["state"] in DONE for j in js), timeout=180, what="job delivered")
        assert [j["state"] for j in jobs] == ["delivered"], json.dumps(jobs, indent=1)
        expect_delivered_once(o, files)  # the half series was completed, nothing doubled
        print(f"kill -9 while sending: Orthanc held {at_kill} of {(len(files) - 1) * 2 + 1} results")
        node.stop()
    finally:
        o.stop()


# ------------------------------------------------------------------------------------------ destination outage


@pytest.mark.faults
def test_destination_down_then_back_dead_letter_and_retry(tmp_path: Path) -> None:
    o = start_orthanc(tmp_path / "orthanc")
    first = write_phantom_series(tmp_path / "a", slices=5, size=64, step_mm=3.0, seed=31)
    second = write_phantom_series(tmp_path / "b", slices=5, size=64, step_mm=3.0, seed=32)
    node = NodeProc.start(tmp_path / "node", {**pacs_sections(o),
                                              "outbox": {"max_attempts": 50, "backoff_initial_s": 0.2,
                                                         "backoff_max_s": 1.0}})
    try:
        o.stop()
        assert storescu(first, node.port).returncode == 0
        node.wait_jobs(lambda js: any(d["attempts"] >= 2 for j in js for d in j["deliveries"]), timeout=120,
                       what="delivery attempts failing while Orthanc is down")
        (job,) = node.jobs()
        assert job["state"] == "sending" and "pacs" in job["deliveries"][0]["reason"], job
        # `srnode status` says why the job is still sending: the delivery's last failure
        st = node.cli("status")
        (line,) = [ln for ln in st.stdout.splitlines() if job["series"] in ln]
        assert "pacs:pending(" in line and "last attempt failed: " in line, st.stdout
        o = restart_orthanc(o)
        node.wait_jobs(lambda js: js[0]["state"] == "delivered", timeout=120, what="delivered after the outage")
        expect_delivered_once(o, first)

        # max attempts reached: dead-letter with the reason; `srnode retry` delivers it once Orthanc is back
        node.restart({"outbox": {"max_attempts": 2}})
        o.stop()
        assert storescu(second, node.port).returncode == 0
        jobs = node.wait_jobs(lambda js: len(js) == 2 and js[1]["state"] == "dead-letter", timeout=120,
                              what="dead-letter after 2 attempts")
        dl = jobs[1]["deliveries"][0]
        assert dl["state"] == "dead-letter" and "after 2 attempt(s)" in dl["reason"], dl
        o = restart_orthanc(o)
        r = node.cli("retry")
        assert r.returncode == 0 and "re-queued" in r.stdout, r.stdout + r.stderr
        node.wait_jobs(lambda js: js[1]["state"] == "delivered", timeout=120, what="delivered after srnode retry")
        expect_delivered_once(o, second)
        expect_delivered_once(o, first)
    finally:
        node.stop()
        o.stop()


# ------------------------------------------------------------------------------------------ disk watermark


def _store_status(port: int, path: Path) -> int:
    ae = AE(ae_title="SCANNER")
    ae.add_requested_context(CTImageStorage)
    assoc = ae.associate("127.0.0.1", port, ae_title="SRNODE")
    assert assoc.is_established
    try:
        return int(assoc.send_c_store(dcmread(path)).Status)
    finally:
        assoc.release()


def test_spool_below_watermark_answers_a700_and_recovers_when_space_returns(tmp_path: Path) -> None:
    """Space is taken by a real ballast file on the spool's disk, then given back: no restart in between."""
    files = write_phantom_series(tmp_path / "ct", slices=4, size=32, step_mm=3.0, seed=41)
    (tmp_path / "node").mkdir()
    st = os.statvfs(tmp_path / "node")
    free_mb = st.f_bavail * st.f_frsize // 2**20
    margin_mb, ballast_mb = 2000, 6000  # generous: teammates' tests write to the same disk meanwhile
    if free_mb < ballast_mb + 4000:
        pytest.skip(f"only {free_mb} MB free on the spool disk; the ballast needs {ballast_mb + 4000} MB")
    ballast = tmp_path / "node" / "ballast"
    with NodeProc.start(tmp_path / "node", {"node": {"min_free_mb": int(free_mb - margin_mb)}}) as node:
        assert _store_status(node.port, files[0]) == 0x0000
        fd = os.open(ballast, os.O_CREAT | os.O_WRONLY, 0o600)
        try:
            os.posix_fallocate(fd, 0, ballast_mb * 2**20)
        finally:
            os.close(fd)
        try:
            assert _store_status(node.port, files[1]) == 0xA700
        finally:
            ballast.unlink()
        assert not list((node.spool / "incoming").iterdir()), "half-written files left in incoming/"
        assert not index_of(node).has_instance(str(dcmread(files[1]).SOPInstanceUID))
        # space is back: the same instance and the rest are accepted, and the series is processed
        for f in files[1:]:
            assert _store_status(node.port, f) == 0x0000
        jobs = node.wait_jobs(lambda js: any(j["state"] in DONE for j in js), what="series processed")
        assert [(j["state"], j["instances"]) for j in jobs] == [("delivered", len(files))]
        assert "0xA700" in node.log() or "below node.min_free_mb" in node.log()


# ------------------------------------------------------------------------------------------ load


@pytest.mark.faults
def test_16_concurrent_associations_100_instances_each_all_indexed(tmp_path: Path) -> None:
    batches = [write_series(tmp_path / "send" / f"s{i:02d}", i, 100, 128) for i in range(16)]
    with NodeProc.start(tmp_path / "node", {"node": {"stable_age_s": 3600.0}}) as node:
        assert node.proc is not None
        res = send_concurrently(node.port, batches, node.ae_title)
        rss = peak_rss_mb(node.proc.pid)
        count = index_of(node).count_instances()
        # one large instance (4096 x 4096 x 16 bit = 32 MiB): received in chunks to disk, not held in memory
        (big,) = write_series(tmp_path / "big", 99, 1, 4096)
        assert storescu([big], node.port).returncode == 0
        rss_big = peak_rss_mb(node.proc.pid)
        assert index_of(node).has_instance(str(dcmread(big, stop_before_pixels=True).SOPInstanceUID))
    print(f"16 x 100 instances: {res['instances'] / res['seconds']:.0f} instances/s, node peak RSS {rss:.0f} MB; "
          f"after a 32 MiB instance {rss_big:.0f} MB")
    assert not res["failed"], res["failed"]
    assert count == 1600
    assert rss < 1024, f"node peak RSS {rss:.0f} MB for 1600 small instances: memory is not bounded"
    assert rss_big - rss < 24, f"a 32 MiB instance raised the node's peak RSS by {rss_big - rss:.0f} MB"


# ------------------------------------------------------------------------------------------ late instances


@pytest.mark.faults
def test_late_instances_reprocess_and_supersede(tmp_path: Path) -> None:
    """Two slices arrive after the series was delivered (at its start): a new job supersedes the first one.

    How PACS sees it: a second derived series (new UIDs, all slices) beside the first one; the first one's
    instances are never overwritten in place, so no series ever mixes slices of two reconstructions; and a KO
    rejection note ("Rejected for Quality Reasons", IOCM) lists every instance of the superseded results.
    """
    o = start_orthanc(tmp_path / "orthanc")
    files = write_phantom_series(tmp_path / "ct", slices=8, size=64, step_mm=3.0, seed=51)
    try:
        with NodeProc.start(tmp_path / "node", pacs_sections(o)) as node:
            assert storescu(files[2:], node.port).returncode == 0
            node.wait_jobs(lambda js: [j["state"] for j in js] == ["delivered"], what="first job delivered")
            assert storescu(files[:2], node.port).returncode == 0  # the late ones
            jobs = node.wait_jobs(lambda js: len(js) == 2 and js[1]["state"] in DONE, timeout=120,
                                  what="reprocess delivered")
        assert jobs[1]["state"] == "delivered" and jobs[1]["supersedes"] == jobs[0]["id"], json.dumps(jobs, indent=1)
        assert jobs[1]["instances"] == len(files)
        assert jobs[1]["derived_series"] != jobs[0]["derived_series"], "the reprocess overwrote the first series"
        study = str(dcmread(files[0]).StudyInstanceUID)
        by_uid = {s["MainDicomTags"]["SeriesInstanceUID"]: len(s["Instances"]) for s in o.series_of_study(study)}
        assert by_uid[jobs[1]["derived_series"]] == (len(files) - 1) * 2 + 1
        assert by_uid[jobs[0]["derived_series"]] == (len(files) - 3) * 2 + 1  # intact, not mixed
        # the IOCM rejection note: one KO in the study, rejecting exactly the first job's results (cubic: derived
        # only; the sigma objects of an engine with sigma are rejected the same way: tests/derived/test_values.py)
        (ko,) = [s for s in o.series_of_study(study) if s["MainDicomTags"].get("Modality") == "KO"]
        (ko_file,) = list((tmp_path / "node" / "spool" / "outbox").glob(f"job-{jobs[1]['id']}/**/KO-*.dcm"))
        note = dcmread(ko_file)
        assert note.ConceptNameCodeSequence[0].CodeValue == "113001"  # Rejected for Quality Reasons
        rejected = {s.SeriesInstanceUID for st in note.CurrentRequestedProcedureEvidenceSequence
                    for s in st.ReferencedSeriesSequence}
        assert jobs[0]["derived_series"] in rejected and jobs[1]["derived_series"] not in rejected
        assert sum(1 for it in note.ContentSequence if it.ValueType == "IMAGE") == (len(files) - 3) * 2 + 1
        errors, _ = dciodvfy(ko_file)
        assert not errors, errors
        assert len(ko["Instances"]) == 1
        # every derived series in PACS is geometrically consistent: one position per instance
        for uid in (jobs[0]["derived_series"], jobs[1]["derived_series"]):
            (series,) = [s for s in o.series_of_study(study) if s["MainDicomTags"]["SeriesInstanceUID"] == uid]
            positions = [o.get(f"/instances/{i}/tags?simplify")["ImagePositionPatient"] for i in series["Instances"]]
            assert len(set(positions)) == len(positions), f"series {uid} has instances at the same position"
    finally:
        o.stop()


# ------------------------------------------------------------------------------------------ engine failure


def test_engine_failure_falls_back_to_cubic_with_a_note(tmp_path: Path) -> None:
    broken = tmp_path / "broken-weights.pt"
    broken.write_bytes(b"not a checkpoint")
    files = write_phantom_series(tmp_path / "ct", slices=4, size=32, step_mm=3.0, seed=61)
    with NodeProc.start(tmp_path / "node", {"engine": {"name": "selfsup", "weights": str(broken), "fast": True}}
                        ) as node:
        assert storescu(files, node.port).returncode == 0
        jobs = node.wait_jobs(lambda js: any(j["state"] in DONE for j in js), timeout=180, what="job finished")
    (job,) = jobs
    assert job["state"] == "delivered" and job["engine"] == "cubic", job
    assert "selfsup" in job["fallback"] and "broken-weights.pt" in job["fallback"], job
    derived = [dcmread(p, stop_before_pixels=True) for p in (tmp_path / "node" / "out").rglob("*.dcm")]
    assert derived and all("fallback" in str(d.get("DerivationDescription", "")) for d in derived
                           if d.Modality == "CT"), "the derived series does not say SR fell back"


def test_sr_impossible_still_forwards_originals_with_sr_not_applied(tmp_path: Path) -> None:
    """The last fallback: a rule that forwards originals delivers them even when SR cannot be applied."""
    files = write_phantom_series(tmp_path / "ct", slices=1, size=32, step_mm=3.0, seed=62)  # too few for SR
    rule = {"name": "ct", "match": {"Modality": "CT"}, "destinations": ["out"], "forward_originals": True}
    with NodeProc.start(tmp_path / "node", {"rules": [rule]}) as node:
        assert storescu(files, node.port).returncode == 0
        jobs = node.wait_jobs(lambda js: any(j["state"] in DONE for j in js), timeout=120, what="job finished")
    (job,) = jobs
    assert job["state"] == "delivered" and job["engine"] == "none", job
    assert job["fallback"].startswith("SR not applied: series cannot be a volume"), job
    out = {str(ds.SOPInstanceUID): ds for ds in map(dcmread, (tmp_path / "node" / "out").rglob("*.dcm"))}
    sent = {str(ds.SOPInstanceUID): ds for ds in map(dcmread, files)}
    assert sorted(out) == sorted(sent)
    assert all(out[k] == sent[k] for k in sent), "originals were changed"  # every data element, file meta aside


def test_retry_does_not_send_results_a_later_job_replaced(tmp_path: Path) -> None:
    """A job's delivery dead-letters while the PACS is down; late instances then make a new job, delivered with
    its rejection note once the PACS is back. `srnode retry` (every dead letter) sent the first job's results too:
    a derived series of 6 of the 8 slices arriving after the note that retires it. Now retry says why not."""
    o = start_orthanc(tmp_path / "orthanc")
    files = write_phantom_series(tmp_path / "ct", slices=8, size=64, step_mm=3.0, seed=33)
    study = str(dcmread(files[0], stop_before_pixels=True).StudyInstanceUID)
    node = NodeProc.start(tmp_path / "node", {**pacs_sections(o), "outbox": {"max_attempts": 2}})
    try:
        o.stop()
        assert storescu(files[2:], node.port).returncode == 0
        node.wait_jobs(lambda js: [j["state"] for j in js] == ["dead-letter"], timeout=120,
                       what="job 1 dead-letter while the PACS is down")
        o = restart_orthanc(o)
        assert storescu(files[:2], node.port).returncode == 0  # the late ones
        jobs = node.wait_jobs(lambda js: len(js) == 2 and js[1]["state"] in DONE, timeout=120,
                              what="job 2 delivered")
        assert (jobs[1]["state"], jobs[1]["supersedes"]) == ("delivered", 1), json.dumps(jobs, indent=1)
        r = node.cli("retry")
        assert r.returncode == 0 and "job 1: its results were replaced by job 2" in r.stdout, r.stdout + r.stderr
        r = node.cli("retry", "1")
        assert r.returncode == 0 and "job 1: its results were replaced by job 2" in r.stdout, r.stdout + r.stderr
        assert node.jobs()[0]["deliveries"][0]["state"] == "dead-letter"
        assert series_counts(o, study) == [("CT", 15), ("KO", 1)], series_counts(o, study)
    finally:
        node.stop()
        o.stop()


def test_results_a_later_job_replaced_are_not_sent_when_the_pacs_returns(tmp_path: Path) -> None:
    """The PACS is down while a series' first job (6 of 8 slices) and, after the late slices, its second job (all
    8, with the rejection note) wait in the outbox. When the PACS returns, the first job's results went too: a
    partial series beside the whole one. Now only the second job's are sent; the first job ends superseded."""
    o = start_orthanc(tmp_path / "orthanc")
    files = write_phantom_series(tmp_path / "ct", slices=8, size=64, step_mm=3.0, seed=34)
    study = str(dcmread(files[0], stop_before_pixels=True).StudyInstanceUID)
    node = NodeProc.start(tmp_path / "node", {**pacs_sections(o), "outbox": {"max_attempts": 100,
                                                                               "backoff_initial_s": 0.2,
                                                                               "backoff_max_s": 1.0}})
    try:
        o.stop()
        assert storescu(files[2:], node.port).returncode == 0
        node.wait_jobs(lambda js: js and js[0]["state"] == "sending" and js[0]["deliveries"][0]["attempts"] >= 1,
                       timeout=120, what="job 1 failing to reach the PACS")
        assert storescu(files[:2], node.port).returncode == 0  # the late ones
        node.wait_jobs(lambda js: len(js) == 2 and js[1]["state"] == "sending", timeout=120,
                       what="job 2 waiting in the outbox too")
        o = restart_orthanc(o)
        jobs = node.wait_jobs(lambda js: len(js) == 2 and all(j["state"] in DONE for j in js), timeout=120,
                              what="both jobs settled")
        assert [j["state"] for j in jobs] == ["superseded", "delivered"], json.dumps(jobs, indent=1)
        assert "replaced" in jobs[0]["reason"] and "job 2" in jobs[0]["reason"], jobs[0]["reason"]
        assert series_counts(o, study) == [("CT", 15), ("KO", 1)], series_counts(o, study)
    finally:
        node.stop()
        o.stop()


def test_a_note_dropped_with_replaced_results_still_retires_what_reached_the_pacs(tmp_path: Path) -> None:
    """Job 1 (4 of 8 slices) reaches the PACS; the PACS goes down; 2 late slices make job 2 (its results and the
    note retiring job 1's wait in the outbox), 2 more make job 3 before the PACS returns. Job 2's delivery is
    replaced (never sent) and with it the only note retiring job 1; job 3's note retired job 2's results only
    (which never reached the PACS): Orthanc kept job 1's partial series (CT 7) beside the whole one (CT 15) with
    nothing retiring it. Now job 3's note also retires every earlier result its predecessors' notes did not."""
    o = start_orthanc(tmp_path / "orthanc")
    files = write_phantom_series(tmp_path / "ct", slices=8, size=64, step_mm=3.0, seed=35)
    study = str(dcmread(files[0], stop_before_pixels=True).StudyInstanceUID)
    node = NodeProc.start(tmp_path / "node", {**pacs_sections(o), "outbox": {"max_attempts": 100,
                                                                               "backoff_initial_s": 0.2,
                                                                               "backoff_max_s": 1.0}})
    try:
        assert storescu(files[4:], node.port).returncode == 0
        node.wait_jobs(lambda js: len(js) == 1 and js[0]["state"] == "delivered", timeout=120,
                       what="job 1 delivered")
        o.stop()
        assert storescu(files[2:4], node.port).returncode == 0  # late
        node.wait_jobs(lambda js: len(js) == 2 and js[1]["state"] == "sending"
                       and js[1]["deliveries"][0]["attempts"] >= 1, timeout=120, what="job 2 failing to send")
        assert storescu(files[:2], node.port).returncode == 0  # later still
        node.wait_jobs(lambda js: len(js) == 3 and js[2]["state"] == "sending", timeout=120,
                       what="job 3 waiting in the outbox too")
        o = restart_orthanc(o)
        jobs = node.wait_jobs(lambda js: len(js) == 3 and all(j["state"] in DONE for j in js), timeout=120,
                              what="every job settled")
        assert [j["state"] for j in jobs] == ["delivered", "superseded", "delivered"], json.dumps(jobs, indent=1)
        rejected: set[str] = set()
        for ko in (s for s in o.series_of_study(study) if s["MainDicomTags"].get("Modality") == "KO"):
            for i in ko["Instances"]:
                note = o.instance_file(i)
                rejected |= {s.SeriesInstanceUID for st in note.CurrentRequestedProcedureEvidenceSequence
                             for s in st.ReferencedSeriesSequence}
        assert jobs[0]["derived_series"] in rejected, (series_counts(o, study), rejected)
        assert jobs[2]["derived_series"] not in rejected
    finally:
        node.stop()
        o.stop()
