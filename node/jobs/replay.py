"""Replaying a job: its series (the instances spooled now) queued again as a new job under the job's rule, as
the rule is configured now. One code path for the dashboard's Replay button and for a retry (``srnode retry``, the
dashboard's Retry) of a dead letter whose destination is no longer configured: resending its deliveries would
fail again, so the series is replayed to the destinations its rule names now, or the retry is refused with why.
"""

from __future__ import annotations

from dataclasses import dataclass

from node.config import Config
from node.store import JOB_DONE_STATES, DeliveryState, Index, Job, SeriesState


def replay(cfg: Config, index: Index, job: Job, reason: str, retire: str = "") -> tuple[int, str]:
    """Queue the job's series (its study + series, the instances spooled now) again as a new job under the job's
    rule: (new job id, ""), or (0, why not: 'no-rule': the job has no rule or it is not configured (any more);
    'pruned': the retention removed the series' instances (``node.store.prune``); 'no-instances': the series has
    no instance in the spool; 'busy': the series has a job queued or in progress). The new job supersedes the
    series' last one. ``retire``: also mark ``job`` (dead-letter) 'superseded' with this reason, in the same
    transaction (a retry does not replay it twice). SpoolError (index)."""
    if not job.rule or job.rule not in {r.name for r in cfg.rules}:
        return 0, "no-rule"
    s = index.series(job.series_uid, job.study_uid)
    if s is None or not index.instances_of(job.series_uid, job.study_uid):
        return 0, "pruned" if s is not None and str(s.get("state")) == str(SeriesState.PRUNED) else "no-instances"
    current = s.get("job_id")
    if current and current != job.id and index.job(int(current)).state not in JOB_DONE_STATES:
        return 0, "busy"
    return index.create_job(job.series_uid, job.rule, reason=reason, study_uid=job.study_uid,
                            retire=(job.id, retire) if retire else None), ""


def gone_destinations(cfg: Config, index: Index, job: Job) -> list[str]:
    """The destinations of ``job``'s dead-letter deliveries that are no longer configured (a retry of those would
    fail again: ``Config.destination`` refuses the name)."""
    names = {d.name for d in cfg.destinations}
    return sorted({d.destination for d in index.deliveries(job.id, (DeliveryState.DEAD_LETTER,))
                   if d.destination not in names})


@dataclass(frozen=True)
class Redirected:
    """What a retry of a dead letter to destinations no longer configured did: ``new_job`` (0: refused) and one
    line naming the job and why (printed by ``srnode retry``, logged by the dashboard)."""

    new_job: int
    line: str


def redirect(cfg: Config, index: Index, job: Job, gone: list[str], by: str) -> Redirected:
    """Retry of dead-letter ``job`` whose destinations ``gone`` are no longer configured: its series is replayed
    (:func:`replay`) under its rule as configured now, to the destinations it names now, and ``job`` becomes
    'superseded' (in the same transaction); or refused, with one line saying why (the rule is gone too, it names
    no destination now, the series is no longer in the spool, or it has a job in progress). Nothing is dropped
    silently: the dead letter stays as it is when refused. ``by``: who asked ("srnode retry", "the dashboard")."""
    names = ", ".join(repr(g) for g in gone)
    what = f"job {job.id}: its destination{'s' if len(gone) > 1 else ''} {names} {'are' if len(gone) > 1 else 'is'}"
    rule = next((r for r in cfg.rules if r.name == job.rule), None)
    if rule is None:
        return Redirected(0, f"{what} no longer configured, nor its rule {job.rule!r}: not retried (configure the "
                             "destination again, or send the series through a rule)")
    if not rule.destinations:
        return Redirected(0, f"{what} no longer configured and its rule {rule.name!r} names no destination now: "
                             "not retried")
    to = ", ".join(rule.destinations)
    new_id, why = replay(cfg, index, job, f"replay of job {job.id} (destination {names} no longer configured), "
                         f"requested by {by}", retire=f"replayed as a new job to {to}: destination {names} no "
                         "longer configured")
    if why == "busy":
        return Redirected(0, f"{what} no longer configured; its series has a job queued or in progress: retry once "
                             "it is done")
    if not new_id:
        return Redirected(0, f"{what} no longer configured and its series' instances are no longer in the spool: "
                             "not retried")
    return Redirected(new_id, f"{what} no longer configured: its series is replayed as job {new_id} under its rule "
                              f"{rule.name!r}, to {to}")
