"""`srnode replay JOB`: a delivered job's series sent again under its rule as configured now (the dashboard's Replay
from the command line): how a new user sends a delivered job to another destination. `srnode retry` of it said only
"nothing to retry (state delivered)"."""

from __future__ import annotations

import json
from pathlib import Path

from node.app.phantom import write_phantom_series
from tests.support.nodeproc import NodeProc
from tests.support.peers import storescu


def test_replay_sends_a_delivered_job_to_the_destination_added_to_its_rule(tmp_path: Path) -> None:
    files = write_phantom_series(tmp_path / "ct", slices=6, size=32, step_mm=3.0, seed=181)
    second = tmp_path / "second"
    with NodeProc.start(tmp_path / "node") as node:
        assert storescu(files, node.port).returncode == 0
        jobs = node.wait_jobs(lambda js: js and js[0]["state"] == "delivered", timeout=120, what="job 1 delivered")
        job1 = jobs[0]["id"]
        node.restart({"destinations": [node.config["destinations"][0],
                                       {"name": "second", "kind": "folder", "path": str(second)}],
                      "rules": [{**node.config["rules"][0], "destinations": ["out", "second"]}]})
        r = node.cli("retry", str(job1))
        assert r.returncode == 0 and f"srnode replay {job1}" in r.stdout, r.stdout + r.stderr
        r = node.cli("replay", str(job1))
        assert r.returncode == 0, r.stdout + r.stderr
        assert f"job {job1}: replayed as job " in r.stdout and "to out, second" in r.stdout, r.stdout
        jobs = node.wait_jobs(lambda js: len(js) == 2 and js[1]["state"] == "delivered", timeout=120,
                              what="the replay delivered")
        assert jobs[1]["supersedes"] == job1, json.dumps(jobs, indent=1)
        assert sorted(d["destination"] for d in jobs[1]["deliveries"]) == ["out", "second"], jobs[1]
        assert list(second.rglob("*.dcm")), "nothing in the added destination"
        r = node.cli("replay", "999")  # an unknown job: one line, rc 1
        assert r.returncode == 1 and "job 999:" in r.stderr and "Traceback" not in r.stderr, r.stderr
