"""An ignored series (no rule matched it) is matched against the rules again when ``srnode retry JOB`` names its
job: the user fixed the rule and wants the series processed without resending it or rebuilding the index."""

from __future__ import annotations

import json
from pathlib import Path

from node.app.phantom import write_phantom_series
from tests.support.gated import GATE_ENV, GATED_ENGINE, entered
from tests.support.nodeproc import NodeProc
from tests.support.peers import storescu, wait_until

NO_MATCH = {"rules": [{"name": "thick-ct", "match": {"Modality": "^CT$", "SliceThickness": "^[3-9]"},
                       "through_plane_factor": 2, "destinations": ["out"]}]}
FIXED = {"rules": [{"name": "thick-ct", "match": {"Modality": "^CT$",
                                                  "SliceThickness": "^([2-9]|[1-9][0-9]+)(\\.[0-9]*)?$"},
                    "through_plane_factor": 2, "destinations": ["out"]}]}


def test_retry_matches_an_ignored_series_against_the_fixed_rules(tmp_path: Path) -> None:
    files = write_phantom_series(tmp_path / "ct", slices=8, size=32, step_mm=4.5)  # SliceThickness "4.5"
    with NodeProc.start(tmp_path / "node", {"node": {"stable_age_s": 1.0}, **NO_MATCH}) as node:
        assert storescu(files, node.port).returncode == 0
        jobs = node.wait_jobs(lambda js: js and js[0]["state"] == "ignored", timeout=60, what="the series ignored")
        assert "no rule matched" in jobs[0]["reason"], jobs
        r = node.cli("retry", str(jobs[0]["id"]))  # under the old rules: matched again, ignored again
        assert r.returncode == 0 and "against its rules again" in r.stdout, r.stdout + r.stderr
        jobs = node.wait_jobs(lambda js: len(js) == 2 and js[1]["state"] == "ignored", timeout=60,
                              what="the series matched again and ignored again")
        node.restart(FIXED)
        r = node.cli("retry", str(jobs[1]["id"]))
        assert r.returncode == 0, r.stdout + r.stderr
        jobs = node.wait_jobs(lambda js: len(js) == 3 and js[2]["state"] == "delivered", timeout=120,
                              what="the series processed under the fixed rule")
        assert [j["state"] for j in jobs] == ["ignored", "ignored", "delivered"], json.dumps(jobs, indent=1)
        assert list((tmp_path / "node" / "out").rglob("*.dcm")), "no derived files in the folder destination"
        r = node.cli("retry", str(jobs[2]["id"]))  # a delivered job: nothing to do, said so
        assert r.returncode == 0 and "nothing to retry" in r.stdout, r.stdout


def test_retry_matches_a_series_whose_rule_was_removed_against_the_rules_now(tmp_path: Path) -> None:
    """A job queued (here: in its engine) when the node is restarted with its rule renamed fails "rule 'ct' is no
    longer in the configuration". `srnode retry` re-queued it under that same missing rule, failing again, every
    time; a resend of the series was a duplicate and did nothing: the series could not be processed any more.
    Now retry matches its series against the running node's rules (as for an ignored job)."""
    gate = tmp_path / "gate"
    gate.mkdir()
    files = write_phantom_series(tmp_path / "ct", slices=6, size=32, step_mm=3.0, seed=93)
    ct = {"rules": [{"name": "ct", "match": {"Modality": "^CT$"}, "engine": GATED_ENGINE, "destinations": ["out"]}]}
    renamed = {"rules": [{"name": "ct-thick", "match": {"Modality": "^CT$"}, "destinations": ["out"]}]}
    node = NodeProc.start(tmp_path / "node", ct, module="tests.support.gated", env={GATE_ENV: str(gate)})
    try:
        assert storescu(files, node.port).returncode == 0
        wait_until(lambda: entered(gate, 1), timeout=60, what="the job in its engine")
        node.kill9()
        node.restart(renamed)
        jobs = node.wait_jobs(lambda js: js and js[0]["state"] == "failed", timeout=60, what="the job failed")
        assert jobs[0]["reason"] == "rule 'ct' is no longer in the configuration", jobs
        r = node.cli("retry")
        assert r.returncode == 0 and "its rule 'ct' is no longer configured" in r.stdout, r.stdout + r.stderr
        jobs = node.wait_jobs(lambda js: len(js) == 2 and js[1]["state"] == "delivered", timeout=120,
                              what="the series processed under the renamed rule")
        assert [(j["state"], j["rule"], j["instances"], j["supersedes"]) for j in jobs] == \
            [("failed", "ct", 6, None), ("delivered", "ct-thick", 6, 1)], json.dumps(jobs, indent=1)
    finally:
        node.stop()
