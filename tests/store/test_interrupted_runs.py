"""A job that hangs while a supervisor keeps restarting the node by SIGTERM: each stop gives up waiting for it,
and such a run is not counted toward ``[node] max_job_attempts`` (a clean restart must not make a job poison), so
the job ran again after every restart, for ever. Its interrupted runs are now counted apart: after
``MAX_INTERRUPTED_RUNS`` the next start fails it as poison with a reason that says so; one clean restart stays
harmless (the real node: ``tests/jobs/test_poison.py``). The real index (SQLite) through its own transitions, as
the in-process executor's stop and the node's start call them."""

from __future__ import annotations

import time
from pathlib import Path

from node.store import Index, Instance, JobState, SeriesState
from node.store.jobs import MAX_INTERRUPTED_RUNS

SERIES, STUDY = "1.2.3.4.5", "1.2.3.4"


def _index_with_a_job(tmp_path: Path) -> tuple[Index, int]:
    ix = Index(tmp_path / "index.sqlite")
    ix.add_instance(Instance(f"{SERIES}.1", SERIES, STUDY, "1.2.840.10008.5.1.4.1.1.2", "1.2.840.10008.1.2.1",
                             str(tmp_path / "1.dcm"), "CT01", ""), "CT", 1)
    assert ix.mark_stable(SERIES, time.time() + 1, study_uid=STUDY)
    return ix, ix.create_job(SERIES, "ct", study_uid=STUDY)


def _interrupted_run(ix: Index, job: int) -> list[int]:
    """One run of ``job`` that a stop interrupts, then the next start (max_job_attempts 3): the queued jobs."""
    assert ix.claim_job(job) is not None
    assert ix.stopped_during(job)
    return ix.requeue_interrupted(max_attempts=3)


def test_a_job_interrupted_by_every_stop_is_failed_as_poison_after_the_limit(tmp_path: Path) -> None:
    ix, job = _index_with_a_job(tmp_path)
    for run in range(1, MAX_INTERRUPTED_RUNS):
        assert _interrupted_run(ix, job) == [job], run  # re-queued: a restart is not held against it
        j = ix.job(job)
        assert (j.state, j.attempts, j.interrupted) == (JobState.QUEUED, 0, run)
    assert ix.claim_job(job) is not None
    assert ix.stopped_during(job)
    assert "interrupted by the node's stop (5 of at most 5 runs)" in ix.job(job).reason
    assert [j.id for j in ix.poison_candidates(3)] == [job]  # what the node logs and audits at its start
    assert ix.requeue_interrupted(max_attempts=3) == []
    j = ix.job(job)
    assert j.state is JobState.FAILED, j
    assert j.reason.startswith(f"poison: {MAX_INTERRUPTED_RUNS} run(s) of this job were still going when the node "
                               "was stopped (SIGTERM)"), j.reason
    assert ix.series(SERIES, STUDY)["state"] == SeriesState.FAILED  # type: ignore[index]
    # srnode retry: its runs counted afresh, interrupted ones too
    assert ix.requeue_job(job)
    j = ix.job(job)
    assert (j.state, j.attempts, j.interrupted) == (JobState.QUEUED, 0, 0)
    assert _interrupted_run(ix, job) == [job]


def test_one_clean_restart_is_harmless(tmp_path: Path) -> None:
    ix, job = _index_with_a_job(tmp_path)
    assert _interrupted_run(ix, job) == [job]
    assert ix.claim_job(job) is not None
    ix.finish_job(job, JobState.DELIVERED)
    j = ix.job(job)
    assert (j.state, j.attempts, j.interrupted) == (JobState.DELIVERED, 1, 1)


def test_the_limit_is_the_node_setting(tmp_path: Path) -> None:
    """``[node] max_interrupted_runs = 2``: the second interrupted run makes the job poison (the node passes the
    setting to the index's transitions; the reason names it)."""
    from node.config import config_from_dict

    limit = config_from_dict({"node": {"max_interrupted_runs": 2}}).node.max_interrupted_runs
    ix, job = _index_with_a_job(tmp_path)
    assert ix.claim_job(job) is not None
    assert ix.stopped_during(job, limit)
    assert ix.requeue_interrupted(max_attempts=3, max_interrupted=limit) == [job]
    assert ix.claim_job(job) is not None
    assert ix.stopped_during(job, limit)
    assert "(2 of at most 2 runs)" in ix.job(job).reason
    assert [j.id for j in ix.poison_candidates(3, limit)] == [job]
    assert ix.requeue_interrupted(max_attempts=3, max_interrupted=limit) == []
    j = ix.job(job)
    assert j.state is JobState.FAILED and "node.max_interrupted_runs = 2" in j.reason, j.reason
