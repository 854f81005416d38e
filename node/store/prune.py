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
(``outbox/job-<id>/``): each derived file is rewritten, atomically, as its header alone, since a later rejection
note (``node.derived.iocm``) retiring those results reads their headers (UIDs, SOP classes, study). What stays:
the series, job and delivery rows; the series' state becomes 'pruned' and each job's report gets ``pruned``
(Unix seconds), so ``srnode status`` and the dashboard keep the history.

Crash safety: the index is changed first (one transaction), the files after. A kill -9 between leaves instance
files that no index row lists under a series marked 'pruned': the start-up re-index
(``node.ingest.reindex``) removes those instead of re-indexing them (:func:`pruned_leftover`); derived files
not yet stripped are stripped by the next prune run (a pruned job's folder is stripped again, idempotently).

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
    for study, series, ids, paths in todo:
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
            preview = spool.outbox / f"job-{j}" / PREVIEW
            try:  # the dashboard's preview is the patient's pixels too, made from the results now stripped
                if preview.is_file():
                    done.result_bytes += _size(preview)
                    preview.unlink()
            except OSError as exc:
                out.errors.append(f"{preview}: {exc.strerror or exc}")
            for f in _result_files(spool.outbox, j):
                try:
                    freed = _strip(f)
                except Exception as exc:  # noqa: BLE001 - pydicom raises many types on a broken file
                    out.errors.append(f"{f}: cannot be stripped to its header: {exc}")
                    continue
                if freed:
                    done.results += 1
                    done.result_bytes += freed
        out.series.append(done)
    for why in out.errors:
        log.warning("prune: %s", why)
    return out


def pruned_leftover(db: IndexDB, study_uid: str, series_uid: str, sop_uid: str) -> bool:
    """Whether an instance file the index does not list belongs to a series marked 'pruned' (a prune killed
    between its index transaction and its file removals left it): the re-index removes it instead of recording
    it. A resend of such a series is recorded in the index before it is acknowledged, so an unlisted file of it
    was never acknowledged (its sender sends it again)."""
    rows = db._query("SELECT 1 FROM series WHERE study_uid = ? AND series_uid = ? AND state = ?",
                     (study_uid, series_uid, SeriesState.PRUNED))
    return bool(rows) and not db._query("SELECT 1 FROM instances WHERE sop_uid = ?", (sop_uid,))
