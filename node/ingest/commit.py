"""Group commit: the instances admitted by every association are made durable and indexed in shared batches.

Admission (``node.ingest.admit``) checks an instance on the caller's thread (header, UIDs, SOP class) and then
calls :meth:`GroupCommit.commit`, which

1. claims the SOPInstanceUID: a second copy arriving while the first is still being stored waits until the first
   is indexed or has failed (else a resend linked as the first copy's duplicate could be acknowledged, or
   compared, on bytes that are not durable yet, or that a failure then removes: ``tests/ingest/test_durability``);
2. when other instances are being stored (other associations' fsyncs in flight, or instances queued), links and
   makes it durable on the caller's own thread, which waits for its answer anyway: the disk watermark (0xA700
   below ``[node].min_free_mb``), the hard link under ``instances/<Study>/<Series>/<SOP>.dcm``
   (``Spool.link_instance``), then one fsync after the other of the paths ``Spool.durable_paths`` names (the
   file, its series folder, the folders above for a new series; a duplicate name keeps the first copy, durable
   already). The 16 associations of a busy sender so sync at the same time (the file system commits them in shared
   journal commits) instead of in one writer's serial cycle;
3. when nothing else is being stored (one association sending one instance after the other), queues it unlinked
   and the writer links it and runs its fsyncs at once on ``SYNC_THREADS`` threads (``Spool.sync``): measured on
   this project's disk, two fsyncs issued together return far sooner than one after the other (docs/benchmarks.md);
4. waits for the writer, which takes everything queued since its previous commit (natural batching: no timer, at
   most ``max_batch``), links and syncs the unlinked ones, records all their index rows in ONE SQLite transaction
   (``Index.add_instances``: one WAL fsync) and wakes every waiting caller with its outcome.

Only then does a C-STORE handler answer Success, so "Success" still means the bytes, their folder entry and the
index row are on disk. Until 2026-12-01 (``ingest8``) the writer linked and synced every batch: with 16 associations
one serial cycle of ~15 ms per ~8 instances (link 3.3, fsyncs 8.6, index 3.0 ms), busy all the time, which set the
rate (docs/benchmarks.md). Failures: a file whose sync fails is unlinked (no name without durable bytes) and its
caller gets 0xA700; an index transaction that fails is retried row by row (one bad row does not fail the others); a
row that still fails has its link removed and its caller gets the error (SpoolError: 0x0110 at the SCP; an index
whose disk is full, SQLITE_FULL or ENOSPC, gives IngestError 0xA700 instead, as every full disk on this path does).
A caller waits at most ``timeout_s`` (``COMMIT_TIMEOUT_S``), for its claim and its commit together, and then gets
IngestError(0xA700): it was not acknowledged; if the writer stores it later anyway, a resend is a plain duplicate.

A kill -9 at any point leaves either nothing acknowledged unstored, or files linked but not indexed, which the node
re-indexes at its next start (``node.ingest.reindex``).
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
SYNC_THREADS = 16  # the writer's fsyncs in flight at once (Spool.sync)


@dataclass
class Pending:
    """One instance being stored: the received file, its index row, and how its commit ended."""

    src: Path  # the complete received file, on the spool's disk
    inst: Instance  # its row; ``path`` is filled in by the writer
    modality: str
    hint: SizeHint
    done: threading.Event = field(default_factory=threading.Event)
    stored: Stored | None = None
    added: bool = False  # False: the SOPInstanceUID was already indexed (a resend)
    error: BaseException | None = None
    size: int = 0  # bytes of the file, read by the caller (the writer makes no system call per row for it)
    released: threading.Event = field(default_factory=threading.Event)  # its SOPInstanceUID's claim is given up
    raw: bool = False  # queued unlinked: the writer links and syncs it


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
    _claims: dict[str, Pending] = field(default_factory=dict, init=False)  # SOPInstanceUID -> the copy in flight
    _pool: ThreadPoolExecutor | None = field(default=None, init=False)  # the sync threads (_sync_one)
    _syncing: int = field(default=0, init=False)  # instances whose fsyncs are in flight now
    batches: int = field(default=0, init=False)  # commits made (figures for tests and benchmarks)
    committed: int = field(default=0, init=False)  # instances in them
    waited: int = field(default=0, init=False)  # copies that waited for another copy of their SOPInstanceUID

    def commit(self, src: Path, inst: Instance, modality: str, hint: SizeHint) -> tuple[Stored, bool]:
        """Link ``src`` under its final name, make it durable, and record ``inst`` together with whatever other
        callers made durable meanwhile; returns (where it is stored, whether its row was added: False for a known
        SOPInstanceUID).

        Blocks until the row is on disk. Raises IngestError (0xA700: disk below the watermark, a write or sync
        failure, or no commit within ``timeout_s``; 0xC210: invalid UID), SpoolError (the index failed)."""
        deadline = time.monotonic() + self.timeout_s
        item = Pending(src=src, inst=inst, modality=modality, hint=hint, size=_size(src))
        self._claim(item, deadline)
        try:
            with self._lock:
                alone = self._syncing == 0 and self._queue.empty()  # nobody else storing: the writer does it all
                self._syncing += 1
            try:
                if alone:
                    start_writeback(src)  # the disk starts on it while the writer wakes up
                else:
                    self._store(item)
            finally:
                if not alone:
                    with self._lock:
                        self._syncing -= 1
            self._enqueue(item, alone)
            if not item.done.wait(max(0.0, deadline - time.monotonic())):
                raise IngestError(f"instance {inst.sop_uid}: not on disk within {self.timeout_s:.0f} s (the spool "
                                  f"writer is stalled)", Status.OUT_OF_RESOURCES)
        finally:
            self._release(item)
        if item.error is not None:
            raise item.error
        assert item.stored is not None
        return item.stored, item.added

    # ------------------------------------------------------------------------------------ the caller's part

    def _claim(self, item: Pending, deadline: float) -> None:
        """Wait until no other copy of ``item``'s SOPInstanceUID is being stored, then claim it. IngestError
        (0xA700) when that copy is still in flight at ``deadline``."""
        sop = item.inst.sop_uid
        while True:
            with self._lock:
                other = self._claims.get(sop)
                if other is None:
                    self._claims[sop] = item
                    return
                self.waited += 1
            if not other.released.wait(max(0.0, deadline - time.monotonic())):
                raise IngestError(f"instance {sop}: another copy of it is still being stored after "
                                  f"{self.timeout_s:.0f} s (the spool writer is stalled)", Status.OUT_OF_RESOURCES)

    def _release(self, item: Pending) -> None:
        with self._lock:
            if self._claims.get(item.inst.sop_uid) is item:
                del self._claims[item.inst.sop_uid]
        item.released.set()

    def _store(self, item: Pending) -> None:
        """Check the watermark, link and fsync ``item`` on the caller's thread, one fsync after the other
        (module docstring, steps 2-4). Raises IngestError."""
        inst = item.inst
        self.spool.check_space()
        try:
            stored = self.spool.link_instance(item.src, inst.study_uid, inst.series_uid, inst.sop_uid)
        except OSError as exc:
            raise IngestError(f"instance {inst.sop_uid}: cannot write to the spool: {exc}",
                              Status.OUT_OF_RESOURCES) from exc
        item.stored = stored
        item.inst = replace(inst, path=str(stored.path))
        if stored.duplicate:  # the first copy: indexed, or durable and re-indexed at the next start (claims)
            return
        try:
            for path in self.spool.durable_paths(stored):
                self.spool.fsync(path)
        except OSError as exc:
            self._unlink([item])
            raise IngestError(f"instance {inst.sop_uid}: could not be made durable in the spool "
                              f"{self.spool.root}: {exc}", Status.OUT_OF_RESOURCES) from exc
        self.spool.made_durable(stored)

    def _enqueue(self, item: Pending, raw: bool) -> None:
        item.raw = raw
        with self._lock:
            self._queue.put(item)
            if self._thread is None:
                if self._pool is None:
                    self._pool = ThreadPoolExecutor(SYNC_THREADS, thread_name_prefix="ingest-sync")
                self._thread = threading.Thread(target=self._run, name="ingest-commit", daemon=True)
                self._thread.start()

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
        raw = [p for p in batch if p.raw]
        if raw:
            try:
                self._link_and_sync(raw)
            finally:
                with self._lock:
                    self._syncing -= len(raw)
        ready = [p for p in batch if p.error is None]
        self._index(ready)
        self._wake(batch)
        self.batches += 1
        self.committed += sum(1 for p in ready if p.error is None)
        log.debug("ingest commit: %d instance(s) in %.1f ms", len(batch), 1000 * (time.monotonic() - t0))

    def _link_and_sync(self, raw: list[Pending]) -> None:
        """The writer's part for instances queued unlinked (their caller stored alone): the watermark once, their
        links, then every fsync at once on the sync threads (``Spool.sync``). A failure is the item's error."""
        try:
            self.spool.check_space()
        except IngestError as exc:
            for p in raw:
                p.error = exc
            return
        linked: list[Pending] = []
        for p in raw:
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
        for p in new:
            if p.stored and p.stored.path in failed:
                self._unlink([p])
                p.error = IngestError(f"instance {p.inst.sop_uid}: could not be made durable in the spool "
                                      f"{self.spool.root}: {failed[p.stored.path]}", Status.OUT_OF_RESOURCES)

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

    @staticmethod
    def _unlink(items: list[Pending]) -> None:
        for p in items:
            if p.stored is not None:
                try:
                    p.stored.path.unlink(missing_ok=True)
                except OSError as exc:  # pragma: no cover - permissions changed under us
                    log.warning("ingest commit: cannot remove %s after a failure: %s", p.stored.path, exc)

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
