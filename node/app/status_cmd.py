"""``srnode status`` (jobs, their states and reasons) and ``srnode retry`` (re-queue what failed).

Both read the spool index directly, so they work whether or not the node is running; a running node picks up
re-queued work within a second or two. A job whose input slices are not all in a derived series lists each such
slice (file and reason) under its line, and in ``--json`` as ``left_out``; a job made from fewer instances than
its series declares says so (``INCOMPLETE: ...``; ``--json``: its report's ``declared`` and ``incomplete``). The series not yet complete (and, in
``--json``, the series of the jobs listed) are shown with their instance counts and declared sizes. Each delivery
shows how the destination confirmed it (``node.send.confirm``): the method, instances confirmed of expected and
when, or why it is not confirmed. When no ``srnode serve`` holds the spool (stopped, killed) while the index shows
jobs queued, processing or sending, a ``NODE NOT RUNNING`` line says so (``--json``: ``node_running``, null when
it cannot be told).
"""

from __future__ import annotations

import argparse
import calendar
import json
import sys
import time
from typing import Any

from node.config import Config, load_config
from node.errors import NodeError, SpoolError
from node.jobs.replay import gone_destinations, redirect, replay
from node.store import NOT_SENT, Delivery, DeliveryState, Index, Job, JobState, SeriesState, Spool


def configure(parser: argparse.ArgumentParser) -> None:
    """Add ``srnode status`` (or, for the ``retry`` / ``replay`` parser, ``srnode retry`` / ``replay``) options to
    ``parser``."""
    parser.add_argument("--config", default=None, help="config.toml (default: the embedded defaults)")
    if parser.prog.endswith("retry"):
        parser.add_argument("jobs", nargs="*", type=int, metavar="JOB",
                            help="job ids (default: every dead-letter delivery and failed job)")
    elif parser.prog.endswith("replay"):
        parser.add_argument("jobs", nargs="+", type=int, metavar="JOB", help="job ids")
    else:
        parser.add_argument("--json", action="store_true", help="machine-readable output")
        parser.add_argument("--state", action="append", default=[], type=JobState, choices=list(JobState),
                            help="only jobs in this state (repeatable)")
        parser.add_argument("--limit", type=int, default=50, help="the most recent N jobs (default 50)")


def _not_running(served: bool | None, cfg_spool: str, jobs: list[Job]) -> str:
    """A line for a stopped node whose index still shows work under way (a kill -9, a power cut, a stop): the
    states are what the node recorded, and nothing moves them until it runs again. "" otherwise."""
    if served is not False:
        return ""
    running = [j for j in jobs if j.state in (JobState.PROCESSING, JobState.SENDING)]
    queued = sum(j.state == JobState.QUEUED for j in jobs)
    if not running and not queued:
        return ""
    said = []
    if running:
        said.append(f"{len(running)} job(s) shown processing or sending (" + ", ".join(str(j.id) for j in running[:10])
                    + (", ..." if len(running) > 10 else "") + ") were interrupted: it re-queues them when it starts "
                    "(one whose runs stopped the node [node].max_job_attempts times is failed as poison instead)")
    if queued:
        said.append(f"{queued} queued job(s) wait for it")
    return (f"NODE NOT RUNNING: no srnode serve holds the spool {cfg_spool}: nothing is processed or sent until it "
            f"starts; " + "; ".join(said))


def _open(args: argparse.Namespace) -> Index:
    """The spool's index; NodeError when there is none (never creates an empty spool where nothing was received)."""
    cfg = load_config(args.config)
    where = f"the spool_dir of {cfg.path}" if cfg.path else "the embedded default; pass the node's --config"
    if not cfg.spool_path.is_dir():
        raise NodeError(f"no spool at {cfg.spool_path.resolve()} ({where})")
    index_path = Spool(cfg.spool_path).index_path
    if not index_path.is_file():
        raise NodeError(f"no spool index at {index_path}: the node has not run with this spool ({where})")
    return Index(index_path)


def job_dict(index: Index, j: Job) -> dict[str, Any]:
    """Job ``j`` with its deliveries as a JSON-ready dict (``updated`` as UTC ISO 8601, no PHI)."""
    return {
        "id": j.id, "series": j.series_uid, "study": j.study_uid, "rule": j.rule, "state": j.state,
        "reason": j.reason, "instances": j.n_instances, "attempts": j.attempts, "engine": j.engine,
        "fallback": j.fallback, "derived_series": j.derived_series_uid,
        "uncertainty_series": j.uncertainty_series_uid, "supersedes": j.supersedes,
        # every one: a job of several volumes / runs has a derived (and an uncertainty) series per volume / run
        "derived_series_uids": j.derived_series_uids, "uncertainty_series_uids": j.uncertainty_series_uids,
        "report": j.report,
        "left_out": list((j.report or {}).get("left_out", [])),  # input slices in no derived series, with why
        "created": _utc(j.created),
        "updated": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(j.updated)),
        "deliveries": [delivery_dict(d) for d in index.deliveries(j.id)],
        "supersedes_text": _supersedes_text(index, j),
    }


def _supersedes_text(index: Index, j: Job) -> str:
    """How job ``j`` relates to the series' earlier job it follows (``j.supersedes``), in words for the status line:
    "supersedes job N" only when its results replace job N's at a destination they share (other derived series);
    a replay of the same instances makes the same derived series ("same derived series as job N, sent again"), and
    one to other destinations replaces nothing there ("" then). Before ops19 every replay read "supersedes job 1"
    while job 1 stayed 'delivered' (docs: 'superseded' is a job whose results a later one replaced before they
    were sent)."""
    if not j.supersedes:
        return ""
    try:
        old = index.job(j.supersedes)
    except SpoolError:  # the earlier job is gone: say only what is known
        return f"after job {j.supersedes}"
    if old.derived_series_uid and old.derived_series_uid == j.derived_series_uid:
        return f"same derived series as job {old.id}, sent again"
    mine = {d.destination for d in index.deliveries(j.id)}
    theirs = {d.destination for d in index.deliveries(old.id)}
    if mine and theirs and not mine & theirs:
        return ""
    if not j.derived_series_uid or not old.derived_series_uid:
        return f"after job {old.id}"
    return f"supersedes job {old.id}"


def delivery_dict(d: Delivery) -> dict[str, Any]:
    """A delivery as ``status --json`` lists it: destination, state, attempts, files, last failure, and its
    ``confirmation``: ``method`` (commitment, count, none; "" before any), ``expected`` / ``confirmed`` instances
    (null: not known), ``confirmed_at`` (UTC ISO 8601, ms; null: not confirmed), ``note`` (how, or why not)."""
    return {"destination": d.destination, "state": d.state, "attempts": d.attempts, "files": len(d.files),
            "reason": d.reason,
            # when a pending delivery is tried next (UTC ISO 8601; null: not pending, or at once)
            "next_attempt": _utc(d.next_attempt) if d.state is DeliveryState.PENDING and d.next_attempt else None,
            "confirmation": {"method": d.confirm_method, "expected": d.expected, "confirmed": d.confirmed,
                             "confirmed_at": _utc(d.confirmed_at), "note": d.confirm_note}}


def confirmation_text(x: dict[str, Any]) -> str:
    """One delivery's confirmation in words, for the status line ("" when nothing was tried yet)."""
    c = x["confirmation"]
    if not c["method"]:
        return ""
    if x["state"] == DeliveryState.DELIVERED and c["method"] != "none":
        return f"confirmed by {c['method']} {c['confirmed']}/{c['expected']} at {c['confirmed_at']}"
    if x["state"] == DeliveryState.SENT:
        return f"awaiting {c['method']} of {c['expected']}"
    if x["state"] in (DeliveryState.PENDING, DeliveryState.DEAD_LETTER):
        if c["confirmed"] is None:
            return f"{c['method']}: not confirmed yet ({c['expected']} instance(s) sent)"
        return f"{c['method']}: {c['confirmed']} of {c['expected']} instance(s) found in the peer"
    return f"not confirmed: {c['note']}"


def _tries(x: dict[str, Any]) -> str:
    """"(N attempts, next at HH:MM:SSZ, in S s)" for a delivery tried more than once or waiting for its next try
    (before ops19 a bare "(5)" that said neither what it counted nor when the next attempt was)."""
    parts = [f"{x['attempts']} attempts"] if x["attempts"] > 1 else []
    nxt = x.get("next_attempt")
    if x["state"] == DeliveryState.PENDING and nxt:
        wait = calendar.timegm(time.strptime(nxt[:19], "%Y-%m-%dT%H:%M:%S")) - time.time()
        parts.append(f"next at {nxt[11:19]}Z" + (f", in {wait:.0f} s" if wait >= 1 else ", due now"))
    return f"({', '.join(parts)})" if parts else ""


def _retrying(x: dict[str, Any]) -> str:
    """Why a pending delivery is waiting for its next attempt (its last failure, shortened), for the status line;
    "" when it has not failed (a dead-letter's reason is the job's)."""
    if x["state"] != DeliveryState.PENDING or not x["attempts"] or not x["reason"]:
        return ""
    why = " ".join(str(x["reason"]).split())
    return f" [last attempt failed: {why[:200]}{'...' if len(why) > 200 else ''}]"


def _utc(t: float | None) -> str | None:
    """Unix seconds as UTC ISO 8601 with milliseconds (None stays None)."""
    if t is None:
        return None
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(t)) + f".{int(t * 1000) % 1000:03d}Z"


def series_dict(s: dict[str, Any]) -> dict[str, Any]:
    """A series row as ``status --json`` lists it: UIDs, state, distinct instances received, the declared size
    (``declared_instances``: null when nothing trusted declares it; ``declared_by``: ImagesInAcquisition, or the
    puller / HTTP hint that said it), first and last receipt (UTC ISO 8601, ms; a plain duplicate while receiving
    counts as a receipt) and its latest job. No PHI."""
    return {"study": s["study_uid"], "series": s["series_uid"], "state": s["state"], "reason": s["reason"],
            "instances": s["n_instances"], "declared_instances": s["declared_instances"],
            "declared_by": s["declared_by"], "first_received": _utc(s["first_received"]),
            "last_received": _utc(s["last_received"]), "job": s["job_id"]}


def conflict_dict(c: dict[str, Any]) -> dict[str, Any]:
    """A conflicting resend (``conflicts`` row) as ``status --json`` lists it: UIDs, caller, the difference in
    words (attribute names, never values), where the kept copy and the resend are."""
    return {"sop": c["sop_uid"], "series": c["series_uid"], "study": c["study_uid"], "calling_ae": c["calling_ae"],
            "via": c["via"], "reason": c["reason"], "kept": c["kept_path"], "resend": c["resend_path"],
            "received": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(c["received_at"]))}


def _print_conflicts(conflicts: list[dict[str, Any]]) -> None:
    if not conflicts:
        return
    print(f"\n{len(conflicts)} conflicting resend(s): a known SOPInstanceUID came again with different content; the "
          "first copy is kept and used, each resend is kept aside in spool/conflicts/")
    for c in conflicts[-10:]:
        print(f"  {c['received']}  instance {c['sop']} (series {c['series']}) from {c['calling_ae']} ({c['via']}): "
              f"{c['reason']}")


def run(args: argparse.Namespace) -> int:
    """Run ``srnode status`` or ``srnode retry``; returns the exit code (retry: 1 for an unknown job id)."""
    index = _open(args)
    if args.command == "retry":
        return _retry(index, list(args.jobs), load_config(args.config))
    if args.command == "replay":
        return _replay(index, list(args.jobs), load_config(args.config))
    jobs = index.jobs(args.state)[-args.limit:] if args.limit > 0 else index.jobs(args.state)
    cfg = load_config(args.config)
    served = Spool(cfg.spool_path).served()
    stopped = _not_running(served, str(cfg.spool_path.resolve()), index.jobs([JobState.PROCESSING, JobState.SENDING,
                                                                              JobState.QUEUED]))
    docs = [job_dict(index, j) for j in jobs]
    conflicts = [conflict_dict(c) for c in index.conflicts()]
    waiting = [series_dict(s) for s in index.receiving_series()]
    if args.json:
        listed = {(j.study_uid, j.series_uid) for j in jobs}
        series = waiting + [series_dict(s) for s in index.all_series() if (s["study_uid"], s["series_uid"]) in listed
                            and s["state"] not in (SeriesState.RECEIVING, SeriesState.STABLE)]
        print(json.dumps({"jobs": docs, "series": series, "instances": index.count_instances(),
                          "conflicts": conflicts, "node_running": served}, indent=2))
        return 0
    if not docs:
        print(f"no jobs{' in this state' if args.state else ''} ({index.count_instances()} instances in the spool)")
        _print_waiting(waiting)
        _print_conflicts(conflicts)
        if stopped:
            print(f"\n{stopped}")
        return 0
    width = max(len(d["series"]) for d in docs)
    print(f"{'JOB':>5}  {'STATE':<11} {'RULE':<14} {'N':>4}  {'SERIES':<{width}}  REASON / DELIVERIES")
    for d in docs:
        print(f"{d['id']:>5}  {d['state']:<11} {d['rule'][:14]:<14} {d['instances']:>4}  {d['series']:<{width}}  "
              f"{job_line(d)}")
        if (d["report"] or {}).get("incomplete"):  # fewer instances than the series declares
            print(f"{'':>5}  INCOMPLETE: {d['report']['incomplete']}")
        if (d["report"] or {}).get("pruned"):  # retention removed its instances and its results' pixels
            print(f"{'':>5}  PRUNED at {_utc(d['report']['pruned'])}: its received instances and its results' "
                  "pixels were removed from the spool ([node] retention_days; headers kept)")
        for x in d["left_out"]:
            where = (f"slice {x.get('index')}/{x.get('of')}" if x.get("index") else "image") + f" {x.get('file')}"
            print(f"{'':>5}  NOT IN ANY DERIVED SERIES: {where}: {x.get('reason')}")
    _print_waiting(waiting)
    _print_conflicts(conflicts)
    if stopped:
        print(f"\n{stopped}")
    return 0


def job_line(d: dict[str, Any]) -> str:
    """The REASON / DELIVERIES column of a job (``job_dict``): its reason, each delivery (destination, state,
    attempts, confirmation, why a pending one waits), fallback and what it supersedes. A delivered job's reason
    only repeats its deliveries' confirmation notes, so it is left out there."""
    dl = ", ".join(f"{x['destination']}:{x['state']}" + _tries(x)
                   + (f" [{confirmation_text(x)}]" if confirmation_text(x) else "") + _retrying(x)
                   for x in d["deliveries"])
    if any(x["state"] == DeliveryState.DEAD_LETTER for x in d["deliveries"]) and not any(
            str(x["reason"]).startswith(NOT_SENT) for x in d["deliveries"]):
        dl += f" (once the cause is fixed, `srnode retry {d['id']}` sends it again)"
    reason = "" if d["state"] == JobState.DELIVERED and d["deliveries"] else d["reason"]
    return "; ".join(s for s in (reason, dl, f"fallback: {d['fallback']}" if d["fallback"] else "",
                                 d.get("supersedes_text", f"supersedes job {d['supersedes']}" if d["supersedes"]
                                       else "")) if s)


def _print_waiting(waiting: list[dict[str, Any]]) -> None:
    if not waiting:
        return
    print(f"\n{len(waiting)} series not complete yet (quiet for stable_age_s, or the size a sender declared reached):")
    for s in waiting[-10:]:
        declared = (f", declared {s['declared_instances']} ({s['declared_by']})" if s["declared_instances"] is not None
                    else "")
        print(f"  series {s['series']}: {s['instances']} instance(s){declared}, last received {s['last_received']}")


def _retry(index: Index, job_ids: list[int], cfg: Config) -> int:
    """Re-queue each job of ``job_ids`` (default: every failed or dead-letter job): a failed job under a rule of
    ``cfg`` runs again; one whose rule is not among them (renamed, removed, or none was chosen) has its series
    matched against the running node's rules again, as an ignored job named here. A dead letter to a destination
    no longer configured is replayed to the destinations its rule names now, or refused with why
    (``node.jobs.replay.redirect``: rc 1)."""
    rules = {r.name for r in cfg.rules}
    targets = job_ids or sorted({j.id for j in index.jobs((JobState.FAILED, JobState.DEAD_LETTER))})
    if not targets:
        print("nothing to retry: no failed jobs or dead-letter deliveries")
        return 0
    rc, acted = 0, False
    for jid in targets:
        try:
            job = index.job(jid)
        except Exception as exc:  # noqa: BLE001 - SpoolError: unknown job
            print(f"job {jid}: {exc}", file=sys.stderr)
            rc = 1
            continue
        if job.state is JobState.FAILED and job.rule not in rules:
            gone = f"its rule {job.rule!r} is no longer configured" if job.rule else "no rule was chosen"
            if index.reconsider_ignored(jid, f"matched against the rules again by srnode retry ({gone})",
                                        JobState.FAILED):
                print(f"job {jid}: {gone}; the running node matches its series against its rules again")
                acted = True
            else:
                print(f"job {jid}: {gone}, and its series has a later job: nothing to retry")
        elif job.state is JobState.FAILED:
            index.requeue_job(jid)
            print(f"job {jid}: re-queued for processing")
            acted = True
        elif job.state in (JobState.DEAD_LETTER, JobState.SUPERSEDED) and (later := index.replaced_by(jid)) is not None:
            print(f"job {jid}: its results were replaced by job {later} (late instances), whose rejection note "
                  "retires them: not sent again")
        elif job.state in (JobState.DEAD_LETTER, JobState.SUPERSEDED) and (
                lost := gone_destinations(cfg, index, job)):
            out = redirect(cfg, index, job, lost, "srnode retry")  # resent, it would fail again
            print(out.line, file=sys.stdout if out.new_job else sys.stderr)
            rc, acted = (rc, True) if out.new_job else (1, acted)
        elif index.requeue_deliveries(jid):
            print(f"job {jid}: dead-letter deliveries re-queued")
            acted = True
        elif job.state is JobState.IGNORED and index.reconsider_ignored(jid):
            print(f"job {jid}: no rule had matched; the running node matches its series against its rules again")
            acted = True
        elif (job.report or {}).get("pruned") and job.state is not JobState.DELIVERED:
            print(f"job {jid}: nothing to retry: {PRUNED_WORDS}")
        elif job.state is JobState.DELIVERED:
            print(f"job {jid}: nothing to retry (state delivered); `srnode replay {jid}` sends its series again "
                  "under its rule as configured now (add a destination to the rule first to send it there)")
        else:
            print(f"job {jid}: nothing to retry (state {job.state})")
    if acted and Spool(cfg.spool_path).served() is False:
        print(f"NODE NOT RUNNING: no srnode serve holds the spool {cfg.spool_path.resolve()}: what was re-queued "
              "waits in the index until it starts")
    return rc


PRUNED_WORDS = ("its series' received instances were removed from the spool by the retention ([node] retention_days): "
                "send the series to the node again to process it again")
_REPLAY_REFUSED = {
    "no-rule": "its rule is not configured (any more)",
    "no-instances": "its series has no instance in this node's spool: send the series again",
    "busy": "its series has a job queued or in progress: replay it when that one is done",
    "pruned": PRUNED_WORDS,
}


def _replay(index: Index, job_ids: list[int], cfg: Config) -> int:
    """``srnode replay JOB...``: each job's series (the instances spooled now) queued again as a new job under the
    job's rule as ``cfg`` configures it now, to the destinations it names now (``node.jobs.replay.replay``, the
    dashboard's Replay): how a delivered job is sent to another destination (add it to the rule first). One line
    per job: the new job, or why not (rc 1 when any was refused or unknown)."""
    rc, acted = 0, False
    for jid in job_ids:
        try:
            job = index.job(jid)
            new_id, why = replay(cfg, index, job, f"replay of job {jid}, requested by srnode replay")
        except Exception as exc:  # noqa: BLE001 - SpoolError: unknown job, index busy
            print(f"job {jid}: {exc}", file=sys.stderr)
            rc = 1
            continue
        if not new_id:
            print(f"job {jid}: not replayed: {_REPLAY_REFUSED.get(why, why)}", file=sys.stderr)
            rc = 1
            continue
        rule = next(r for r in cfg.rules if r.name == job.rule)
        dests = ", ".join(rule.destinations) or "no destination (results kept in the spool)"
        print(f"job {jid}: replayed as job {new_id} (rule {job.rule!r}, to {dests})")
        acted = True
    if acted and Spool(cfg.spool_path).served() is False:
        print(f"NODE NOT RUNNING: no srnode serve holds the spool {cfg.spool_path.resolve()}: the new job(s) wait in "
              "the index until it starts")
    return rc
