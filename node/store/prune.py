"""Retention: removing from the spool what is safe elsewhere, once ``[node] retention_days`` have passed.

A series is pruned only when ALL of these hold (checked inside one write transaction, so ingest cannot add an
instance to it meanwhile):

- its state is 'delivered' or 'ignored' (never receiving/stable -- its quiet period --, queued, processing,
  sending, failed or dead-letter);
- every job of the series is delivered, ignored or superseded, and every delivery of every one of them is
  'delivered' or 'unconfirmed' (accepted by a destination that offers no confirmation; a delivery still awaiting
  its Storage Commitment report, 'sent', keeps the series), or dead-letter with a reason saying its results were
  replaced before they went (``NOT_SENT``: they never will be);
- its last instance arrived, and every job of it ended, more than the retention ago.

What is removed: the received instance files (``instances/<Study>/<Series>/``) and their index rows (so that a
later resend of the series is received as new and processed again), and the PIXELS of the derived results
(``outbox/job-<id>/``): each derived file is rewritten, atomically, as its header alone (and the dashboard's
preview PNG, pixels too, is removed), since a later rejection
note (``node.derived.iocm``) retiring those results reads their headers (UIDs, SOP classes, study). What stays:
the series, job and delivery rows; the series' state becomes 'pruned' and each job's report gets ``pruned``
(Unix seconds), so ``srnode status`` and the dashboard keep the history.

Crash safety: the index is changed first (one transaction), the files after. A kill -9 between leaves instance
files that no index row lists under a series marked 'pruned': the start-up re-index
(``node.ingest.reindex``) removes those instead of re-indexing them (:func:`pruned_leftover`); derived files
not yet stripped are stripped by the next prune run: each job's report gets ``stripped`` (Unix seconds) once all
its results are, and a pruned series with a job whose report lacks it is stripped again (idempotently).

A resend racing the prune of its own series: the files are removed under the index's write lock, and a file whose
SOP Instance UID the index lists again is kept. A resend that the ingest linked as a duplicate of the old file just
before its removal, and indexed just after, finds its first copy gone once its row is in: the ingest links the
received copy again before acknowledging it (``node.ingest.commit.GroupCommit._relink_pruned``).
"""

from __future__ import annotations

import io
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from node.store.schema import IndexDB
from node.store.spool import Spool, atomic_write
from node.store.states import NOT_SENT, DeliveryState, JobState, SeriesState

log = logging.getLogger(__name__)

DAY_S = 86400.0
SOURCES = "pruned-sources.txt"  # in outbox/job-<id>/ of the series' latest job: the SOP UIDs pruned, one a line
PREVIEW = "preview.png"  # the dashboard's preview in a job's outbox folder (node.app.dashboard_data): pruned too
_SERIES_DONE = (SeriesState.DELIVERED, SeriesState.IGNORED)
_JOBS_DONE = (JobState.DELIVERED, JobState.IGNORED, JobState.SUPERSEDED)
_DELIVERIES_DONE = (DeliveryState.DELIVERED, DeliveryState.UNCONFIRMED)


@dataclass
class Pruned:
    """One series pruned (or, in a dry run, that would be)."""

    study_uid: str
    series_uid: str
    jobs: list[int]
    instances: int  # instance files removed
    instance_bytes: int
    results: int  # derived files stripped to their headers
    result_bytes: int  # bytes freed by that (dry run: the files' whole size, an upper bound)

    @property
    def mb(self) -> float:
        return (self.instance_bytes + self.result_bytes) / (1024 * 1024)

    def line(self, dry_run: bool) -> str:
        """One line naming the series by its UIDs (never a patient value) and what is (would be) freed."""
        verb = "would free" if dry_run else "freed"
        return (f"series {self.series_uid} (study {self.study_uid}, job(s) {','.join(map(str, self.jobs)) or '-'}):"
                f" {verb} {self.mb:.1f} MB: {self.instances} instance file(s), {self.results} derived file(s)"
                " stripped to their headers")


@dataclass
class PruneResult:
    series: list[Pruned] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)  # files that could not be removed or stripped, with why


def _prunable(c: Any, cutoff: float) -> list[tuple[str, str, list[int]]]:
    """(study, series, job ids) of the series that may be pruned now (the rules of this module), read through
    connection ``c`` (inside the caller's transaction when it prunes)."""
    out: list[tuple[str, str, list[int]]] = []
    rows = c.execute("SELECT study_uid, series_uid FROM series WHERE state IN (?, ?) AND last_received < ?"
                     " ORDER BY first_received", (*_SERIES_DONE, cutoff)).fetchall()
    for r in rows:
        study, series = r["study_uid"], r["series_uid"]
        jobs = c.execute("SELECT id, state, updated, finished FROM jobs WHERE study_uid = ? AND series_uid = ?",
                         (study, series)).fetchall()
        if not jobs or any(j["state"] not in _JOBS_DONE for j in jobs):
            continue
        if any(max(j["updated"] or 0.0, j["finished"] or 0.0) >= cutoff for j in jobs):
            continue
        ids = [int(j["id"]) for j in jobs]
        marks = ",".join("?" * len(ids))
        deliveries = c.execute(f"SELECT state, reason FROM deliveries WHERE job_id IN ({marks})", ids).fetchall()
        if any(d["state"] not in _DELIVERIES_DONE
               and not (d["state"] == DeliveryState.DEAD_LETTER and str(d["reason"]).startswith(NOT_SENT))
               for d in deliveries):
            continue
        out.append((study, series, ids))
    return out


def _unstripped(c: Any) -> list[tuple[str, str, list[int]]]:
    """(study, series, job ids) of the series marked 'pruned' whose jobs' results are not known to be stripped
    (a job report with ``pruned`` and without ``stripped``: the prune stopped, or failed on a file, before)."""
    out: list[tuple[str, str, list[int]]] = []
    for r in c.execute("SELECT study_uid, series_uid FROM series WHERE state = ?", (SeriesState.PRUNED,)).fetchall():
        jobs = c.execute("SELECT id, report FROM jobs WHERE study_uid = ? AND series_uid = ?",
                         (r["study_uid"], r["series_uid"])).fetchall()
        reports = [json.loads(j["report"] or "{}") for j in jobs]
        if any(rep.get("pruned") and not rep.get("stripped") for rep in reports):
            out.append((r["study_uid"], r["series_uid"], [int(j["id"]) for j in jobs]))
    return out


def _mark_stripped(db: IndexDB, ids: list[int], now: float) -> None:
    with db.tx() as c:
        for j in ids:
            row = c.execute("SELECT report FROM jobs WHERE id = ?", (j,)).fetchone()
            report = json.loads(row["report"] or "{}") if row is not None else {}
            if report.get("pruned") and not report.get("stripped"):
                report["stripped"] = now
                c.execute("UPDATE jobs SET report = ? WHERE id = ?", (json.dumps(report), j))


def _result_files(outbox: Path, job_id: int) -> list[Path]:
    d = outbox / f"job-{job_id}"
    return sorted(p for p in d.glob("**/*.dcm") if p.is_file()) if d.is_dir() else []


def _strip(path: Path) -> int:
    """Rewrite the DICOM file ``path`` as its header alone (no Pixel Data and nothing after it), atomically;
    returns the bytes freed (0: nothing to strip, e.g. stripped already: the file is left as it is). Raises
    OSError, or pydicom's errors on an unreadable file."""
    from pydicom import dcmread

    before = path.stat().st_size
    ds = dcmread(path, stop_before_pixels=True)
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    if len(buf.getvalue()) >= before:
        return 0
    atomic_write(path, buf.getvalue())
    return before - len(buf.getvalue())


def _size(p: Path) -> int:
    try:
        return p.stat().st_size
    except OSError:
        return 0


def prune(spool: Spool, db: IndexDB, retention_days: float, dry_run: bool = False,
          now: float | None = None) -> PruneResult:
    """Prune every series that is safe to prune (the module's rules) and older than ``retention_days`` (days;
    0 or less: nothing is pruned, whatever ``dry_run``). ``dry_run``: nothing changes; the result says what would
    be freed. Files that cannot be removed are listed in ``PruneResult.errors`` (the index says pruned; the next
    start removes the instance leftovers, the next run strips the results). SpoolError when the index cannot be
    read or written (then nothing was changed)."""
    out = PruneResult()
    if retention_days <= 0:
        return out
    now = time.time() if now is None else now
    cutoff = now - retention_days * DAY_S
    if dry_run:
        c = db._conn()
        for study, series, ids in _prunable(c, cutoff):
            paths = [Path(r["path"]) for r in c.execute(
                "SELECT path FROM instances WHERE study_uid = ? AND series_uid = ?", (study, series))]
            results = [f for j in ids for f in _result_files(spool.outbox, j)]
            out.series.append(Pruned(study, series, ids, len(paths), sum(_size(p) for p in paths), len(results),
                                     sum(_size(f) for f in results)))
        return out
    todo: list[tuple[str, str, list[int], list[Path]]] = []
    with db.tx() as c:
        for study, series, ids in _prunable(c, cutoff):
            paths = [Path(r["path"]) for r in c.execute(
                "SELECT path FROM instances WHERE study_uid = ? AND series_uid = ?", (study, series))]
            # what the latest job's results were made from, kept: a later resend of part of them is covered by
            # those results (``pruned_cover``), never processed alone (its results would retire the complete ones)
            job_dir = spool.outbox / f"job-{max(ids)}"
            if job_dir.is_dir():
                atomic_write(job_dir / SOURCES, "".join(f"{p.stem}\n" for p in paths).encode())
            c.execute("DELETE FROM instances WHERE study_uid = ? AND series_uid = ?", (study, series))
            c.execute("UPDATE series SET state = ?, n_instances = 0, reason = ? WHERE study_uid = ? AND"
                      " series_uid = ?", (SeriesState.PRUNED,
                                          f"retention: {len(paths)} received instance(s) and the results' pixels"
                                          f" removed after {retention_days:g} day(s)", study, series))
            for j in ids:
                row = c.execute("SELECT report FROM jobs WHERE id = ?", (j,)).fetchone()
                report = json.loads(row["report"] or "{}")
                report["pruned"] = now
                c.execute("UPDATE jobs SET report = ? WHERE id = ?", (json.dumps(report), j))
            todo.append((study, series, ids, paths))
        # series pruned before whose results a stop (kill -9) or an error left unstripped: stripped again now
        taken = {(s, r) for s, r, _, _ in todo}
        todo += [(s, r, ids, []) for s, r, ids in _unstripped(c) if (s, r) not in taken]
    for study, series, ids, paths in todo:
        failed = len(out.errors)
        done = Pruned(study, series, ids, 0, 0, 0, 0)
        # under the index's write lock: a resend of an instance recorded again since (its row committed before
        # this) keeps its file; no row can be recorded between this check and the removal
        with db.tx() as c:
            for p in paths:
                if c.execute("SELECT 1 FROM instances WHERE sop_uid = ?", (p.stem,)).fetchone():
                    log.warning("prune: %s was received again meanwhile: kept", p.name)
                    continue
                size = _size(p)
                try:
                    p.unlink(missing_ok=True)
                    done.instances += 1
                    done.instance_bytes += size
                except OSError as exc:
                    out.errors.append(f"{p}: {exc.strerror or exc}")
        folder = spool.instances / study / series
        try:
            folder.rmdir()  # only when empty
        except OSError:
            pass
        for j in ids:
            # the dashboard's preview (node.app.dashboard_data.PREVIEW): the patient's pixels, made from these
            for png in (spool.outbox / f"job-{j}").glob("preview*.png"):
                size = _size(png)
                try:
                    png.unlink()
                    done.result_bytes += size
                except OSError as exc:
                    out.errors.append(f"{png}: {exc.strerror or exc}")
            for f in _result_files(spool.outbox, j):
                try:
                    freed = _strip(f)
                except Exception as exc:  # noqa: BLE001 - pydicom raises many types on a broken file
                    out.errors.append(f"{f}: cannot be stripped to its header: {exc}")
                    continue
                if freed:
                    done.results += 1
                    done.result_bytes += freed
        if len(out.errors) == failed:  # every result stripped: not looked at again
            _mark_stripped(db, ids, now)
        if paths or done.results or done.result_bytes:
            out.series.append(done)
    for why in out.errors:
        log.warning("prune: %s", why)
    return out


def pruned_cover(db: IndexDB, outbox: Path, job_id: int, sop_uids: set[str]) -> tuple[JobState | None, str]:
    """Whether job ``job_id``'s input (``sop_uids``, the SOP Instance UIDs of its series now) may be processed,
    when the series' latest earlier job that made results was pruned (its report's ``pruned``): processed without
    the pruned instances, its results would lack those slices, and its rejection note would retire the complete
    results in every PACS. (IGNORED, why): these instances are a strict part of those results' (a resend of part of
    the series: those results cover them); (FAILED, why): some are new but some of the pruned ones are missing
    (late instances after the prune: the whole series must be sent again); (None, '') to process it (no pruned
    earlier result; the same instances again, which make the same UIDs; or all of them and more). Without the list
    of the pruned instances (a prune killed before writing it), fewer instances than that job had count as a
    part. SpoolError (index)."""
    old_id, seen = _supersedes(db, job_id), {job_id}
    while old_id and old_id not in seen:
        seen.add(old_id)
        rows = db._query("SELECT id, derived_series_uid, report, n_instances, supersedes FROM jobs WHERE id = ?",
                         (old_id,))
        if not rows:
            return None, ""
        old = rows[0]
        if old["derived_series_uid"]:
            if not json.loads(old["report"] or "{}").get("pruned"):
                return None, ""
            listed = outbox / f"job-{old_id}" / SOURCES
            try:
                before = {line.strip() for line in listed.read_text().splitlines() if line.strip()}
            except OSError:
                before = set()
            n_before = len(before) or int(old["n_instances"] or 0)
            was = (f"job {old_id}'s results (delivered, then pruned from the spool by [node] retention_days) were "
                   f"made from {n_before} instance(s)")
            if (sop_uids < before) if before else len(sop_uids) < n_before:
                return JobState.IGNORED, (f"{was}; {len(sop_uids)} of them were sent again: those results cover "
                                          "them, not processed alone (their results would retire the complete "
                                          "ones). Send the whole series again to process it again")
            missing = before - sop_uids
            if missing:
                return JobState.FAILED, (f"{was}; {len(sop_uids - before)} new instance(s) arrived since, but "
                                         f"{len(missing)} of those are no longer in the spool: processed without "
                                         "them, its results would lack their slices and retire the complete ones. "
                                         "Send the whole series again to process it with them")
            return None, ""
        old_id = old["supersedes"]
    return None, ""


def _supersedes(db: IndexDB, job_id: int) -> int:
    rows = db._query("SELECT supersedes FROM jobs WHERE id = ?", (job_id,))
    return int(rows[0]["supersedes"] or 0) if rows else 0


def pruned_leftover(db: IndexDB, study_uid: str, series_uid: str, sop_uid: str) -> bool:
    """Whether an instance file the index does not list belongs to a series marked 'pruned' (a prune killed
    between its index transaction and its file removals left it): the re-index removes it instead of recording
    it. A resend of such a series is recorded in the index before it is acknowledged, so an unlisted file of it
    was never acknowledged (its sender sends it again)."""
    rows = db._query("SELECT 1 FROM series WHERE study_uid = ? AND series_uid = ? AND state = ?",
                     (study_uid, series_uid, SeriesState.PRUNED))
    return bool(rows) and not db._query("SELECT 1 FROM instances WHERE sop_uid = ?", (sop_uid,))
