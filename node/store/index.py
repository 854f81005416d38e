"""The spool index: the state of every instance, series, job and delivery, and its transitions.

State machines (every change records a reason in words; the states are ``node.store.states``):

- series: receiving → stable → queued → processing → sending → delivered | failed | ignored | dead-letter; a
  late instance puts a series back to receiving, and the next stable point makes a new job that supersedes the
  earlier one. A series is keyed by its study and its SeriesInstanceUID: two studies that share a
  SeriesInstanceUID are two series.
- jobs: queued → processing → sending → delivered | failed | dead-letter; ignored (no rule matched);
  superseded (a later job of the same series replaced it while queued, or late instances arrived before its
  results were enqueued: ``supersede_if_moved_on``).
- deliveries (the outbox, one row per job and destination): pending → delivered | dead-letter.

Times (``received_at``, ``created``, ``updated``, ``next_attempt``, ...) are Unix seconds (``time.time()``).

When a series is complete (the watcher, ``node.jobs.watcher``, asks :meth:`Index.quiet_series` and
:meth:`Index.complete_series`): quiet for ``stable_age_s`` (``last_received``: the last instance, or the last
plain duplicate while still receiving: a resend is activity), or sooner when a puller / the Orthanc plugin said how
many it sent (:meth:`Index.declare_series`) and that many distinct instances arrived (``declared_instances``,
``declared_by``). A size the headers agree on (ImagesInAcquisition, :class:`SizeHint`) is recorded too, but counts
one acquisition: it never completes a series early (``_DECLARED_COMPLETE``), it names what is missing.

Storage (SQLite in WAL mode, safe across threads and processes; a connection per thread; writes that must not
race, such as claiming a job, in BEGIN IMMEDIATE transactions) is ``node.store.schema``.
"""

from __future__ import annotations

import logging
import sqlite3
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from node.errors import SpoolError
from node.store.deliveries import DeliveryTable
from node.store.jobs import _of_series
from node.store.schema import Instance, instance_of, series_of
from node.store.states import JobState, SeriesState

log = logging.getLogger(__name__)

SeriesKey = tuple[str, str]  # (StudyInstanceUID, SeriesInstanceUID)

MAX_DECLARED_INSTANCES = 1_000_000  # the largest series size a caller may declare (SQLite holds 64-bit integers)
HEADER_DECLARED = "ImagesInAcquisition"  # declared_by of a size the series' headers agree on
# series14: ImagesInAcquisition is the number of images of ONE acquisition; a series may hold several (CT phases,
# dynamic / perfusion time points, each declaring its own count), and the first one arriving alone then a pause held
# exactly "its declared count": it completed early, a derived series of part of the series went out. Nothing in a
# header states that no other acquisition follows, so a size only the headers declare never completes a series
# early: it is kept to name what is missing (INCOMPLETE) and to log "more than declared"; the quiet period decides.
_DECLARED_COMPLETE = (" AND declared_instances IS NOT NULL AND n_instances = declared_instances"
                      " AND declared_by != ?")
CLOCK_SLACK_S = 2.0  # seconds a time stamped in the index may lie ahead of the clock before it counts as a step back
MIXED = "mixed"  # header_sig once two instances of a series said different things about its size


@dataclass(frozen=True)
class SizeHint:
    """What one instance's header says about the size of its series (read at admission, no pixels).

    ``signature``: the values that must agree across every instance of the series for the size to be trusted
    (e.g. ``"ImagesInAcquisition=200 NumberOfFrames=1 AcquisitionNumber=1"``; ``""``: the header says nothing, so
    a series of such instances declares no size). ``instances``: the distinct instance count the header implies
    (ImagesInAcquisition / NumberOfFrames when that divides; 0: none).
    """

    signature: str = ""
    instances: int = 0


NO_HINT = SizeHint()


class Index(DeliveryTable):
    """The spool index at ``path`` (created on first use): instances, series and conflicts here, jobs
    (``node.store.jobs``) and deliveries (``node.store.deliveries``) in its bases; errors as ``IndexDB``."""

    # ------------------------------------------------------------------------------------ instances, series

    def add_instance(self, inst: Instance, modality: str, size: int, hint: SizeHint = NO_HINT) -> bool:
        """Record a received instance of ``size`` bytes; False if its SOPInstanceUID was known (kept once; nothing
        changes: see :meth:`note_duplicate`).

        The series is created in 'receiving', or put back to 'receiving' (a late instance after processing).
        ``hint``: what the instance's header says about the series' size; the series declares that size
        (``declared_by`` ImagesInAcquisition) while every instance's hint has the same signature, and stops
        declaring it (logged) at the first that differs. A series receiving more instances than declared is
        logged and left to the quiet period. SpoolError when the index cannot be written.
        """
        with self.tx() as c:
            return self._add_instance(c, inst, modality, size, hint, time.time())

    def add_instances(self, items: Sequence[tuple[Instance, str, int, SizeHint]]) -> list[bool]:
        """Record several received instances, each ``(instance, modality, size in bytes, hint)``, in ONE
        transaction (one commit, one WAL fsync: the group commit's index step); per item as :meth:`add_instance`
        (False: its SOPInstanceUID was known, or came earlier in ``items``). All or nothing: SpoolError when the
        index cannot be written, and then none is recorded."""
        if not items:
            return []
        now = time.time()
        with self.tx() as c:
            return [self._add_instance(c, inst, modality, size, hint, now) for inst, modality, size, hint in items]

    def _add_instance(self, c: sqlite3.Connection, inst: Instance, modality: str, size: int, hint: SizeHint,
                      now: float) -> bool:
        """:meth:`add_instance`'s statements, inside the caller's transaction ``c``."""
        cur = c.execute(
            "INSERT OR IGNORE INTO instances (sop_uid, series_uid, study_uid, sop_class, transfer_syntax, path,"
            " calling_ae, allowed_rules, size, received_at) VALUES (?,?,?,?,?,?,?,?,?,?)",
            (inst.sop_uid, inst.series_uid, inst.study_uid, inst.sop_class, inst.transfer_syntax, inst.path,
             inst.calling_ae, inst.allowed_rules, size, now))
        if cur.rowcount == 0:
            return False
        row = c.execute("SELECT state, n_instances, declared_instances, declared_by, header_sig FROM series"
                        " WHERE study_uid = ? AND series_uid = ?", (inst.study_uid, inst.series_uid)).fetchone()
        if row is None:
            declared = hint.instances if hint.signature and hint.instances > 0 else None
            c.execute(
                "INSERT INTO series (series_uid, study_uid, modality, calling_ae, allowed_rules, state,"
                " n_instances, first_received, last_received, declared_instances, declared_by, header_sig)"
                " VALUES (?,?,?,?,?,?,1,?,?,?,?,?)",
                (inst.series_uid, inst.study_uid, modality, inst.calling_ae, inst.allowed_rules,
                 SeriesState.RECEIVING, now, now, declared, HEADER_DECLARED if declared else "",
                 hint.signature))
            return True
        was = row["state"]
        reason = "" if was == SeriesState.RECEIVING else f"late instance after the series was {was}"
        c.execute(
            "UPDATE series SET n_instances = n_instances + 1, last_received = ?, state = ?,"
            " reason = CASE WHEN ? = '' THEN reason ELSE ? END WHERE study_uid = ? AND series_uid = ?",
            (now, SeriesState.RECEIVING, reason, reason, inst.study_uid, inst.series_uid))
        declared, by = row["declared_instances"], row["declared_by"]
        sig = row["header_sig"]
        if sig is not None and sig != MIXED and sig != hint.signature:
            c.execute("UPDATE series SET header_sig = ? WHERE study_uid = ? AND series_uid = ?",
                      (MIXED, inst.study_uid, inst.series_uid))
            if by == HEADER_DECLARED:
                declared = None
                c.execute("UPDATE series SET declared_instances = NULL, declared_by = ''"
                          " WHERE study_uid = ? AND series_uid = ?", (inst.study_uid, inst.series_uid))
            if sig:  # the first instances declared a size: say why it is no longer trusted
                log.warning("series %s (study %s): its instances disagree on their size (%r, then %r): no size"
                            " declared by the headers, the series completes by the quiet period%s",
                            inst.series_uid, inst.study_uid, sig, hint.signature,
                            f" (still declared by {by}: {declared})" if declared is not None else "")
        n = int(row["n_instances"]) + 1
        if declared is not None and n == int(declared) + 1:
            log.warning("series %s (study %s): more instances (%d) than declared (%d, by %s): the series "
                        "completes by the quiet period", inst.series_uid, inst.study_uid, n, declared, by)
        return True

    def note_duplicate(self, study_uid: str, series_uid: str) -> bool:
        """A plain duplicate (same SOPInstanceUID, same content) of an instance of this series arrived: while the
        series is 'receiving' its quiet timer restarts (``last_received`` = now; ``n_instances`` unchanged), since
        a sender resending a series (after a restart of the node, an aborted association) is still sending it.
        A series in any other state is left alone (a resend of a processed series brings nothing new). Returns
        whether the series was touched; SpoolError when the index cannot be written."""
        with self.tx() as c:
            cur = c.execute("UPDATE series SET last_received = MAX(last_received, ?) WHERE study_uid = ? AND"
                            " series_uid = ? AND state = ?",
                            (time.time(), study_uid, series_uid, SeriesState.RECEIVING))
            return cur.rowcount >= 1

    def declare_series(self, study_uid: str, series_uid: str, instances: int, by: str) -> dict[str, Any] | None:
        """Declare that series (``study_uid``, ``series_uid``) holds ``instances`` distinct instances, said by
        ``by`` (a puller, the Orthanc plugin's HTTP hint; in words, e.g. "c-move", "http"). It overrides what the
        headers declare; a later declaration replaces it. Once that many distinct instances are in, the watcher
        completes the series after ``[node] declared_settle_s``; with more, the quiet period applies (logged).

        Returns the series row after the change, None when the series is not in the index (nothing of it was
        received: the declaration is not kept). ValueError when ``instances`` is not 1 to
        ``MAX_DECLARED_INSTANCES``; SpoolError when the index cannot be written.
        """
        if not 1 <= instances <= MAX_DECLARED_INSTANCES:
            raise ValueError(f"a declared series size must be 1 to {MAX_DECLARED_INSTANCES} instances, not "
                             f"{str(instances)[:20]}")
        with self.tx() as c:
            cur = c.execute("UPDATE series SET declared_instances = ?, declared_by = ? WHERE study_uid = ? AND"
                            " series_uid = ?", (instances, by, study_uid, series_uid))
            if cur.rowcount == 0:
                return None
            row = c.execute("SELECT * FROM series WHERE study_uid = ? AND series_uid = ?",
                            (study_uid, series_uid)).fetchone()
        if int(row["n_instances"]) > instances:
            log.warning("series %s (study %s): %s declares %d instance(s), %d are in: more than declared, the "
                        "series completes by the quiet period", series_uid, study_uid, by, instances,
                        row["n_instances"])
        return series_of(row)

    def has_instance(self, sop_uid: str) -> bool:
        """Whether an instance with this SOPInstanceUID is recorded."""
        return bool(self._query("SELECT 1 FROM instances WHERE sop_uid = ?", (sop_uid,)))

    def instance(self, sop_uid: str) -> Instance | None:
        """The instance recorded under ``sop_uid``, or None."""
        rows = self._query("SELECT * FROM instances WHERE sop_uid = ?", (sop_uid,))
        return instance_of(rows[0]) if rows else None

    def instances_of(self, series_uid: str, study_uid: str = "") -> list[Instance]:
        """The series' instances (of one study when ``study_uid`` is given: the node always gives it), in order of
        arrival (then SOPInstanceUID); [] for an unknown series."""
        where, args = _of_series(series_uid, study_uid)
        rows = self._query(f"SELECT * FROM instances WHERE {where} ORDER BY received_at, sop_uid", args)
        return [instance_of(r) for r in rows]

    def count_instances(self) -> int:
        """How many instances the index records (all series)."""
        return int(self._query("SELECT COUNT(*) AS n FROM instances")[0]["n"])

    def indexed_sops(self) -> set[str]:
        """The SOPInstanceUID of every indexed instance (start-up compares them with the spool's files)."""
        return {r["sop_uid"] for r in self._query("SELECT sop_uid FROM instances")}

    def series(self, series_uid: str, study_uid: str = "") -> dict[str, Any] | None:
        """The series row as a dict (its ``state`` a ``SeriesState``), or None.

        Without ``study_uid``: the one series of that UID; SpoolError when studies share it.
        """
        where, args = _of_series(series_uid, study_uid)
        rows = self._query(f"SELECT * FROM series WHERE {where}", args)
        if len(rows) > 1:
            raise SpoolError(f"index: series {series_uid} exists in {len(rows)} studies; name the study")
        return series_of(rows[0]) if rows else None

    def all_series(self) -> list[dict[str, Any]]:
        """Every series row, oldest first (as ``series``)."""
        return [series_of(r) for r in self._query("SELECT * FROM series ORDER BY first_received")]

    def quiet_series(self, quiet_since: float) -> list[SeriesKey]:
        """(study, series) of the series still 'receiving' whose last instance arrived before ``quiet_since``."""
        rows = self._query("SELECT study_uid, series_uid FROM series WHERE state = ? AND last_received < ?"
                           " ORDER BY first_received", (SeriesState.RECEIVING, quiet_since))
        return [(r["study_uid"], r["series_uid"]) for r in rows]

    def unstamp_future_series(self, now: float, slack: float = CLOCK_SLACK_S) -> int:
        """Series still 'receiving' whose ``last_received`` is later than ``now`` + ``slack`` seconds: the clock
        stepped back since it was stamped (NTP correcting a clock that ran ahead, a hardware clock set to local
        time corrected after boot). Their quiet time counted from a moment the clock reaches only later (an hour
        on for an hour's step) and nothing was said; it is stamped ``now`` instead, so a quiet series waits
        ``stable_age_s`` from now. Returns how many series were restamped (usually 0: one read, no write)."""
        ahead = self._query("SELECT COUNT(*) AS n FROM series WHERE state = ? AND last_received > ?",
                            (SeriesState.RECEIVING, now + slack))[0]["n"]
        if not ahead:
            return 0
        with self.tx() as c:
            cur = c.execute("UPDATE series SET last_received = ? WHERE state = ? AND last_received > ?",
                            (now, SeriesState.RECEIVING, now + slack))
            return int(cur.rowcount)

    def complete_series(self, settled_since: float, headers: bool = False) -> list[SeriesKey]:
        """(study, series) of the series still 'receiving' that hold exactly the number of distinct instances a
        puller or the Orthanc plugin declared (:meth:`declare_series`), the last of them (or a duplicate) received
        before ``settled_since`` (Unix seconds). A size only the headers declare (ImagesInAcquisition) never
        completes a series early: it counts one acquisition, and the series may hold others still to come
        (:data:`HEADER_DECLARED`), unless ``headers`` (``[node] images_in_acquisition_completes``)."""
        rows = self._query(f"SELECT study_uid, series_uid FROM series WHERE state = ?{_DECLARED_COMPLETE}"
                           " AND last_received < ? ORDER BY first_received",
                           (SeriesState.RECEIVING, "" if headers else HEADER_DECLARED, settled_since))
        return [(r["study_uid"], r["series_uid"]) for r in rows]

    def stable_series(self) -> list[SeriesKey]:
        """(study, series) of the series marked 'stable' that have no job for it yet (the decision could not be
        recorded: the watcher tries again), oldest first."""
        rows = self._query("SELECT study_uid, series_uid FROM series WHERE state = ? ORDER BY first_received",
                           (SeriesState.STABLE,))
        return [(r["study_uid"], r["series_uid"]) for r in rows]

    def receiving_series(self) -> list[dict[str, Any]]:
        """The series still 'receiving' or 'stable' (no job yet), oldest first (as ``series``)."""
        rows = self._query("SELECT * FROM series WHERE state IN (?, ?) ORDER BY first_received",
                           (SeriesState.RECEIVING, SeriesState.STABLE))
        return [series_of(r) for r in rows]

    def mark_stable(self, series_uid: str, quiet_since: float, study_uid: str = "", complete: bool = False,
                    headers: bool = False) -> bool:
        """receiving → stable, only if no instance arrived since ``quiet_since`` (Unix seconds; atomic against
        ingest). ``complete``: only if the series also holds exactly the number of instances a puller or the
        Orthanc plugin declared, or with ``headers`` one the headers agree on (:meth:`complete_series`;
        ``quiet_since`` is then the end of the settle time)."""
        where, args = _of_series(series_uid, study_uid)
        declared, by = (_DECLARED_COMPLETE, ("" if headers else HEADER_DECLARED,)) if complete else ("", ())
        with self.tx() as c:
            cur = c.execute(f"UPDATE series SET state = ?, reason = '' WHERE {where}"
                            f" AND state = ?{declared} AND last_received < ?",
                            (SeriesState.STABLE, *args, SeriesState.RECEIVING, *by, quiet_since))
            return cur.rowcount >= 1

    # ------------------------------------------------------------------------------------ conflicts

    def add_conflict(self, inst: Instance, via: str, reason: str, kept_path: str, resend_path: str) -> int:
        """Record a resend of a known SOPInstanceUID that differs from the stored copy (kept aside, not used)."""
        with self.tx() as c:
            cur = c.execute(
                "INSERT INTO conflicts (sop_uid, series_uid, study_uid, calling_ae, via, reason, kept_path,"
                " resend_path, received_at) VALUES (?,?,?,?,?,?,?,?,?)",
                (inst.sop_uid, inst.series_uid, inst.study_uid, inst.calling_ae, via, reason, kept_path,
                 resend_path, time.time()))
            return int(cur.lastrowid or 0)

    def conflicts(self) -> list[dict[str, Any]]:
        """Every recorded conflicting resend, oldest first."""
        return [dict(r) for r in self._query("SELECT * FROM conflicts ORDER BY id")]

    def count_conflicts(self) -> int:
        return int(self._query("SELECT COUNT(*) AS n FROM conflicts")[0]["n"])

    def queue_depth(self) -> int:
        """How many jobs are queued or processing."""
        return int(self._query("SELECT COUNT(*) AS n FROM jobs WHERE state IN (?, ?)",
                               (JobState.QUEUED, JobState.PROCESSING))[0]["n"])
