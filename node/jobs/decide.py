"""The decision on a stable series: which rule takes it (and so factors, engine, destinations), or why none.

The rules each instance may use were fixed when it was admitted (``node.ingest.admit.caller_rules``, stored on the
instance); a series whose instances came from several callers may use only the rules every one of them may (its
derived series holds every instance). Here the rules are matched on the series' first instance's header.
"""

from __future__ import annotations

import logging

from pydicom import dcmread
from pydicom.dataset import Dataset

from node.audit import AuditLog
from node.config import Config, RuleConfig
from node.jobs.rules import allowed_rules, match_rule, series_header
from node.phi import dataset_values, mask_quoted, scrub
from node.series import is_localizer
from node.store import Index, Instance, JobState

log = logging.getLogger(__name__)


def _series_rules(instances: list[Instance], series: dict[str, object]) -> tuple[frozenset[str] | None, str]:
    """The rules the series may use -- those every instance's caller may use (None: every rule) -- and its
    callers' AE titles in words. Instances of a caller restricted by ``[node] allowed_callers`` are never processed
    by a rule it may not use because another caller sent the series' first instance."""
    allowed: frozenset[str] | None = None
    for stored in {i.allowed_rules for i in instances} or {str(series.get("allowed_rules", ""))}:
        mine = allowed_rules(stored)
        if mine is not None:
            allowed = mine if allowed is None else allowed & mine
    callers = sorted({i.calling_ae for i in instances}) or [str(series.get("calling_ae", ""))]
    return allowed, ", ".join(callers)


def decide(cfg: Config, index: Index, series_uid: str, audit: AuditLog | None = None,
           study_uid: str = "") -> int | None:
    """A stable series (of ``study_uid``): match the rules on its first instance's header; returns the queued job
    id or None.

    None: a job was recorded as ignored (no rule matched) or failed (the header or a rule could not be read).
    Raises SpoolError (index).
    """
    s = index.series(series_uid, study_uid) or {}
    study_uid = study_uid or str(s.get("study_uid", ""))
    instances = index.instances_of(series_uid, study_uid)
    if audit:
        audit.write("series-received", series=series_uid, study=s.get("study_uid", ""), instances=len(instances),
                    modality=s.get("modality", ""), calling_ae=s.get("calling_ae", ""))
    rule: RuleConfig | None = None
    header = None
    try:
        first, header = _first_image(instances)
        allowed, callers = _series_rules(instances, s)
        match_header, taken = series_header(cfg, header, [i.path for i in instances if i is not first])
        rule, reason = match_rule(cfg, match_header, allowed, callers)
        reason += f"; {taken}" if taken else ""
    except Exception as exc:  # noqa: BLE001 - a broken first instance or rule: record it, keep watching
        reason = f"cannot match the rules on the series' first instance: {type(exc).__name__}: {exc}"
        # the exception's text may quote a header value: never let it reach the index, the log or the audit
        reason = scrub(reason, dataset_values(header)) if header is not None else mask_quoted(reason)
        job_id = index.create_job(series_uid, "", state=JobState.FAILED, reason=reason, study_uid=study_uid)
        log.warning("series %s: job %d failed: %s", series_uid, job_id, reason)
        if audit:
            audit.write("job-decision", job=job_id, series=series_uid, instances=len(instances),
                        decision=JobState.FAILED, reason=reason)
        return None
    if rule is None:
        if not reason.startswith("no rule matched"):
            reason = f"no rule matched: {reason}"
        job_id = index.create_job(series_uid, "", state=JobState.IGNORED, reason=reason, study_uid=study_uid)
        log.info("series %s (%d instances): left alone: %s", series_uid, len(instances), reason)
        if audit:
            audit.write("job-decision", job=job_id, series=series_uid, instances=len(instances),
                        decision=JobState.IGNORED, reason=reason)
        return None
    job_id = index.create_job(series_uid, rule.name, reason=reason if isinstance(reason, str) else "",
                              study_uid=study_uid)
    log.info("series %s (%d instances): job %d queued (rule %s)", series_uid, len(instances), job_id, rule.name)
    if audit:
        audit.write("job-decision", job=job_id, series=series_uid, instances=len(instances), decision=JobState.QUEUED,
                    rule=rule.name, calling_ae=s.get("calling_ae", ""))
    return job_id


def _first_image(instances: list[Instance]) -> tuple[Instance, Dataset]:
    """The series' first instance that is no localizer, and its header: what the rules match on. A scout filed
    first in an axial series (scanners acquire it first; its SliceThickness, matrix and orientation are the
    scout's) made the default rule leave the whole series alone ("SliceThickness '1.0' does not match", field18);
    the load sets such an image aside and derives the rest. The first instance when every one is a localizer."""
    for inst in instances:
        header = dcmread(inst.path, stop_before_pixels=True)
        if not is_localizer(header):
            return inst, header
    return instances[0], dcmread(instances[0].path, stop_before_pixels=True)
