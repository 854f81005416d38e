"""ops19: after `srnode replay 1` the status said "supersedes job 1" while job 1 stayed `delivered`, and
docs/commands.md defines `superseded` as a job whose results a later one replaced before they were sent. Now the
status line says what the later job is to the earlier one: the same derived series sent again, nothing for a replay
to other destinations only, "supersedes job N" only for other results at a shared destination."""

from __future__ import annotations

import time
from pathlib import Path

from node.app.status_cmd import job_dict, job_line
from node.store import Index, Instance, JobState

SERIES, STUDY = "1.2.826.0.1.77.90", "1.2.826.0.1.76"


def _job(index: Index, dest: str, derived: str) -> int:
    sop = f"{SERIES}.{int(time.time() * 1e6) % 10**9}"
    index.add_instance(Instance(sop, SERIES, STUDY, "1.2.840.10008.5.1.4.1.1.2", "1.2.840.10008.1.2.1", "/x.dcm",
                                "CT01", ""), "CT", 1)
    assert index.mark_stable(SERIES, time.time() + 1)
    job = index.create_job(SERIES, "ct")
    assert index.claim_job(job) is not None
    index.add_deliveries(job, {dest: ["/a.dcm"]})
    index.finish_job(job, JobState.SENDING, derived_series_uid=derived)
    return job


def _line(index: Index, job: int) -> str:
    return job_line(job_dict(index, index.job(job)))


def test_replay_status_says_what_the_new_job_is_to_the_old(tmp_path: Path) -> None:
    index = Index(tmp_path / "index.sqlite")
    first = _job(index, "pacs", "2.25.1")
    same = _job(index, "pacs", "2.25.1")  # a replay of the same instances: the same derived series
    assert index.job(same).supersedes == first
    assert "same derived series as job 1, sent again" in _line(index, same)
    assert "supersedes" not in _line(index, same)
    other = _job(index, "archive", "2.25.2")  # to another destination only
    assert "supersedes" not in _line(index, other) and "job 2" not in _line(index, other), _line(index, other)
    later = _job(index, "archive", "2.25.3")  # other results at the same destination
    assert f"supersedes job {other}" in _line(index, later), _line(index, later)
