"""Group commit: one writer thread makes the instances admitted by every association durable together.

Admission (``node.ingest.admit``) checks an instance on the caller's thread (header, UIDs, SOP class) and then
hands it to :class:`GroupCommit` and waits. The writer takes everything queued since its previous commit (natural
batching: no timer, a batch is whatever arrived while the last one was being made durable, at most
``max_batch``), and for the batch:

1. checks the spool's disk watermark once (0xA700 for the whole batch below ``[node].min_free_mb``);
2. hard-links each received file under ``instances/<Study>/<Series>/<SOP>.dcm`` (``Spool.link_instance``);
3. makes all of them durable at once (``Spool.sync``: every file's and changed folder's fsync issued together on
   ``SYNC_THREADS`` threads, so the file system commits them in shared journal commits; each caller started its
   file's writeback already, ``start_writeback``);
4. records all their index rows in ONE SQLite transaction (``Index.add_instances``: one WAL fsync);
5. wakes every waiting caller with its outcome.

Only then does a C-STORE handler answer Success, so "Success" still means the bytes and the index row are on
disk. Failures: a file whose sync fails is unlinked (no name without durable bytes) and its caller gets 0xA700 (the
others of the batch go on); an index transaction that fails is retried row by row (one bad row does not fail the others);
a row that still fails has its link removed and its caller gets the error (SpoolError: 0x0110 at the SCP; an index
whose disk is full, SQLITE_FULL or ENOSPC, gives IngestError 0xA700 instead, as every full disk on this path does).
A caller waits at most ``timeout_s`` (``COMMIT_TIMEOUT_S``) and then gets IngestError(0xA700): it was not
acknowledged; if the writer stores it later anyway, a resend is a plain duplicate.

A kill -9 at any point leaves either nothing acknowledged unstored, or files linked but not indexed, which the
node re-indexes at its next start (``node.ingest.reindex``).
"""

from __future__ import annotations

import errno
import logging
import queue
import sqlite3
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path

from node.dimse import Status
from node.errors import IngestError, SpoolError
from node.store import Index, Instance, SizeHint, Spool, Stored
from node.store.spool import start_writeback

log = logging.getLogger(__name__)

COMMIT_TIMEOUT_S = 120.0  # longest a caller waits for its batch to be durable before answering 0xA700
MAX_BATCH = 256  # instances in one commit at most
IDLE_EXIT_S = 10.0  # the writer thread ends after this long without work (a new one starts on demand)
SYNC_THREADS = 16  # fsyncs of one batch in flight at once (one per concurrent association is the common case)


@dataclass
class Pending:
    """One instance waiting for the group commit: the file to link and the index row to write."""

    src: Path  # the complete received file, on the spool's disk
    inst: Instance  # its row; ``path`` is filled in by the writer
    modality: str
    hint: SizeHint
    done: threading.Event = field(default_factory=threading.Event)
    stored: Stored | None = None
    added: bool = False  # False: the SOPInstanceUID was already indexed (a resend)
    error: BaseException | None = None
    size: int = 0  # bytes of the file, read by the caller (the writer makes no system call per row for it)


@dataclass
class GroupCommit:
    """The writer for ``spool`` and ``index``; safe to share between threads. ``max_batch``: instances per commit
    at most; ``timeout_s``: how long :meth:`commit` waits."""

    spool: Spool
    index: Index
    max_batch: int = MAX_BATCH
    timeout_s: float = COMMIT_TIMEOUT_S
    _queue: queue.SimpleQueue[Pending] = field(default_factory=queue.SimpleQueue, init=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, init=False)
    _thread: threading.Thread | None = field(default=None, init=False)
    _pool: ThreadPoolExecutor | None = field(default=None, init=False)  # the fsync threads, made with the writer
    batches: int = field(default=0, init=False)  # commits made (figures for tests and benchmarks)
    committed: int = field(default=0, init=False)  # instances in them

    def commit(self, src: Path, inst: Instance, modality: str, hint: SizeHint) -> tuple[Stored, bool]:
        """Link ``src`` under its final name and record ``inst``, durably, together with whatever else is
        waiting; returns (where it is stored, whether its row was added: False for a known SOPInstanceUID).

        Blocks until the batch is on disk. Raises IngestError (0xA700: disk below the watermark, a write or sync
        failure, or no commit within ``timeout_s``; 0xC210: invalid UID), SpoolError (the index failed)."""
        item = Pending(src=src, inst=inst, modality=modality, hint=hint, size=_size(src))
        start_writeback(src)  # the disk starts on it while the writer finishes the batch before
        with self._lock:
            self._queue.put(item)
            if self._thread is None:
                if self._pool is None:
                    self._pool = ThreadPoolExecutor(SYNC_THREADS, thread_name_prefix="ingest-sync")
                self._thread = threading.Thread(target=self._run, name="ingest-commit", daemon=True)
                self._thread.start()
        if not item.done.wait(self.timeout_s):
            raise IngestError(f"instance {inst.sop_uid}: not on disk within {self.timeout_s:.0f} s (the spool "
                              f"writer is stalled)", Status.OUT_OF_RESOURCES)
        if item.error is not None:
            raise item.error
        assert item.stored is not None
        return item.stored, item.added

    # ------------------------------------------------------------------------------------ the writer thread

    def _run(self) -> None:
        while True:
            try:
                first = self._queue.get(timeout=IDLE_EXIT_S)
            except queue.Empty:
                with self._lock:
                    if self._queue.empty():
                        self._thread = None
                        self.index.close()  # this thread's index connection (else one file handle per writer)
                        return
                continue
            batch = [first]
            while len(batch) < self.max_batch:
                try:
                    batch.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            try:
                self._commit(batch)
            except BaseException as exc:  # noqa: BLE001 - never leave a caller waiting
                log.exception("ingest commit of %d instance(s) failed unexpectedly: %s", len(batch), exc)
                for p in batch:
                    if not p.done.is_set():
                        p.error = exc if isinstance(exc, Exception) else SpoolError(str(exc))
                        p.done.set()

    def _commit(self, batch: list[Pending]) -> None:
        t0 = time.monotonic()
        try:
            self.spool.check_space()
        except IngestError as exc:
            self._fail(batch, exc)
            self._wake(batch)
            return
        linked: list[Pending] = []
        for p in batch:
            try:
                p.stored = self.spool.link_instance(p.src, p.inst.study_uid, p.inst.series_uid, p.inst.sop_uid)
            except (IngestError, OSError) as exc:
                p.error = exc if isinstance(exc, IngestError) else IngestError(
                    f"instance {p.inst.sop_uid}: cannot write to the spool: {exc}", Status.OUT_OF_RESOURCES)
                continue
            p.inst = replace(p.inst, path=str(p.stored.path))
            linked.append(p)
        new = [p for p in linked if p.stored is not None and not p.stored.duplicate]
        failed = self.spool.sync([p.stored for p in new if p.stored], self._pool)
        if failed:
            self._unlink([p for p in new if p.stored and p.stored.path in failed])
            for p in linked:  # the new copy, and any resend of it in this batch linked as its duplicate
                if p.stored and p.stored.path in failed:
                    p.error = IngestError(f"instance {p.inst.sop_uid}: could not be made durable in the spool "
                                          f"{self.spool.root}: {failed[p.stored.path]}", Status.OUT_OF_RESOURCES)
            linked = [p for p in linked if p.error is None]
        self._index(linked)
        self._relink_pruned(linked)
        self._wake(batch)
        self.batches += 1
        self.committed += len(linked)
        log.debug("ingest commit: %d instance(s) in %.1f ms", len(linked), 1000 * (time.monotonic() - t0))

    def _index(self, linked: list[Pending]) -> None:
        """All rows in one transaction; when it fails, row by row (a failed row: its new link is removed)."""
        rows = [(p.inst, p.modality, p.size, p.hint) for p in linked]
        try:
            for p, added in zip(linked, self.index.add_instances(rows), strict=True):
                p.added = added
            return
        except SpoolError as exc:
            if len(linked) == 1:
                self._unlink([p for p in linked if p.stored and not p.stored.duplicate])
                linked[0].error = _disk_full(exc) or exc
                return
            log.warning("ingest commit: the index transaction of %d rows failed (%s); writing them one by one",
                        len(linked), exc)
        removed: set[Path] = set()  # links removed after their row failed: a resend of it in this batch fails too
        for p, row in zip(linked, rows, strict=True):
            if p.stored and p.stored.path in removed:
                p.error = IngestError(f"instance {p.inst.sop_uid}: its first copy in this batch could not be "
                                      "indexed; send it again", Status.OUT_OF_RESOURCES)
                continue
            try:
                p.added = self.index.add_instances([row])[0]
            except SpoolError as exc:
                if p.stored and not p.stored.duplicate:
                    self._unlink([p])
                    removed.add(p.stored.path)
                p.error = _disk_full(exc) or exc

    def _relink_pruned(self, linked: list[Pending]) -> None:
        """A resend linked as the duplicate of a first copy that a prune (``node.store.prune``) removed before this
        batch's rows were written: its row now names no file. The prune removes files under the index's write lock
        and keeps those whose row is back, so once the rows are in, a first copy still missing stays missing:
        link the received copy (``src``, still there) again and make it durable; if that fails the sender gets
        0xA700 and sends it again (its row is then a duplicate's, and that resend's link makes the file)."""
        lost = [p for p in linked if p.error is None and p.stored is not None and p.stored.duplicate
                and not p.stored.path.exists()]
        if not lost:
            return
        log.warning("ingest commit: %d resent instance(s) whose first copy a prune had just removed: written again",
                    len(lost))
        relinked: list[Pending] = []
        for p in lost:
            try:
                p.stored = self.spool.link_instance(p.src, p.inst.study_uid, p.inst.series_uid, p.inst.sop_uid)
                relinked.append(p)
            except (IngestError, OSError) as exc:
                p.error = IngestError(f"instance {p.inst.sop_uid}: its first copy was pruned meanwhile and it could "
                                      f"not be written again: {exc}; send it again", Status.OUT_OF_RESOURCES)
        failed = self.spool.sync([p.stored for p in relinked if p.stored and not p.stored.duplicate], self._pool)
        for p in relinked:
            if p.stored and p.stored.path in failed:
                p.error = IngestError(f"instance {p.inst.sop_uid}: could not be made durable in the spool "
                                      f"{self.spool.root}: {failed[p.stored.path]}", Status.OUT_OF_RESOURCES)

    @staticmethod
    def _unlink(items: list[Pending]) -> None:
        for p in items:
            if p.stored is not None:
                try:
                    p.stored.path.unlink(missing_ok=True)
                except OSError as exc:  # pragma: no cover - permissions changed under us
                    log.warning("ingest commit: cannot remove %s after a failure: %s", p.stored.path, exc)

    @staticmethod
    def _fail(items: list[Pending], exc: BaseException) -> None:
        for p in items:
            if p.error is None:
                p.error = exc

    @staticmethod
    def _wake(items: list[Pending]) -> None:
        for p in items:
            p.done.set()


def _disk_full(exc: SpoolError) -> IngestError | None:
    """IngestError 0xA700 (out of resources, PS3.4 B.2.3) when the index failed because its disk is full
    (SQLITE_FULL, or an OSError ENOSPC), else None (the SpoolError stands)."""
    cause = exc.__cause__
    full = ((isinstance(cause, sqlite3.Error) and getattr(cause, "sqlite_errorcode", None) == sqlite3.SQLITE_FULL)
            or (isinstance(cause, OSError) and cause.errno == errno.ENOSPC))
    if not full:
        return None
    err = IngestError(f"the index could not be written, its disk is full: {exc}", Status.OUT_OF_RESOURCES)
    err.__cause__ = exc
    return err


def _size(path: Path) -> int:
    """The size of ``path`` in bytes, 0 when it cannot be read."""
    try:
        return path.stat().st_size
    except OSError:
        return 0
