"""A series that moves on while its job waits or runs (late instances arrive, a later job of the series is made),
against the real node and a real Orthanc: the job's results would be made from part of the series, so they are
never sent; the job ends 'superseded' with the reason, and the series is processed again, whole, once complete.
Orthanc ends with one derived series per source series, complete, and no rejection note is needed.

The node runs with the test engine ``gated`` (``tests/support/gated.py``): the test holds a job in 'processing'
for as long as it needs, so nothing here depends on timing. Two workers (Celery) finishing one series' jobs in
the wrong order: ``tests/jobs/test_runner_moved_on.py``.
"""

from __future__ import annotations

import json
from pathlib import Path

import httpx
from pydicom import dcmread

from node.app.phantom import write_phantom_series
from tests.jobs.test_faults import DONE, pacs_sections, series_counts
from tests.support.gated import GATE_ENV, GATED_ENGINE, entered, open_gate
from tests.support.nodeproc import NodeProc
from tests.support.peers import start_orthanc, storescu, wait_until


def _uids(files: list[Path]) -> tuple[str, str]:
    ds = dcmread(files[0], stop_before_pixels=True)
    return str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID)


def test_late_instances_while_a_job_waits_or_runs_never_send_a_partial_result(tmp_path: Path) -> None:
    o = start_orthanc(tmp_path / "orthanc")
    gate = tmp_path / "gate"
    gate.mkdir()
    x = write_phantom_series(tmp_path / "x", slices=8, size=32, step_mm=3.0, seed=61)
    y = write_phantom_series(tmp_path / "y", slices=8, size=32, step_mm=3.0, seed=62)
    # the quiet period never ends within the test: each series is made complete by declaring its size
    sections = pacs_sections(o, stable_age_s=300.0, declared_settle_s=0.2)
    sections["rules"][0]["engine"] = GATED_ENGINE
    try:
        with NodeProc.start(tmp_path / "node", sections, module="tests.support.gated",
                            env={GATE_ENV: str(gate)}) as node:

            def send(files: list[Path]) -> None:
                r = storescu(files, node.port, aet=node.ae_title)
                assert r.returncode == 0, r.stdout + r.stderr

            def complete(files: list[Path], n: int) -> None:
                study, series = _uids(files)
                r = httpx.post(f"{node.http_url}/series/{study}/{series}/complete", json={"instances": n}, timeout=30)
                assert r.status_code == 200, r.text

            send(x[2:])
            complete(x, 6)  # X's job (1) starts on 6 of its 8 slices and is held in the engine
            wait_until(lambda: entered(gate, 1), timeout=60, what="job 1 in the engine")
            send(y[2:])
            complete(y, 6)  # Y's job (2) waits behind it: one worker
            node.wait_jobs(lambda js: [(j["id"], j["state"]) for j in js] == [(1, "processing"), (2, "queued")],
                           what="job 1 processing, job 2 queued")
            send(x[:2])  # the rest of X while its job runs
            send(y[:2])  # the rest of Y while its job waits
            open_gate(gate)
            node.wait_jobs(lambda js: len(js) == 2 and all(j["state"] in DONE for j in js), timeout=120,
                           what="jobs 1 and 2 ended")
            complete(x, 8)
            complete(y, 8)
            jobs = node.wait_jobs(lambda js: len(js) == 4 and all(j["state"] in DONE for j in js), timeout=120,
                                  what="both series processed whole")
            status = node.cli("status")
        assert status.returncode == 0, status.stderr
        summary = [(j["id"], j["state"], j["instances"], j["supersedes"], len(j["deliveries"])) for j in jobs]
        assert summary == [(1, "superseded", 6, None, 0), (2, "superseded", 6, None, 0),
                           (3, "delivered", 8, 1, 1), (4, "delivered", 8, 2, 1)], json.dumps(jobs, indent=1)
        assert "2 instance(s) arrived after it took the series' 6" in jobs[0]["reason"], jobs[0]["reason"]
        assert "2 instance(s) arrived after it took the series' 6" in jobs[1]["reason"], jobs[1]["reason"]
        assert not jobs[0]["derived_series"] and not jobs[1]["derived_series"]
        # what the PACS holds: each source's derived series once, from all 8 slices (cubic: no sigma), no KO
        for files, job in ((x, jobs[2]), (y, jobs[3])):
            study, _ = _uids(files)
            assert series_counts(o, study) == [("CT", 15)], series_counts(o, study)
            (held,) = o.series_of_study(study)
            assert held["MainDicomTags"]["SeriesInstanceUID"] == job["derived_series"]
        assert not list(node.spool.glob("outbox/**/KO-*.dcm")), "a rejection note for results never sent"
        lines = {int(ln.split()[0]): ln for ln in status.stdout.splitlines()[1:] if ln.strip()[:1].isdigit()}
        assert "superseded" in lines[1] and "arrived after it took" in lines[1], status.stdout
        audit = [json.loads(ln) for ln in (node.spool / "audit.log").read_text().splitlines()]
        assert [a["job"] for a in audit if a.get("event") == "job-superseded"] == [1, 2], audit
    finally:
        o.stop()
