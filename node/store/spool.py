"""The spool: an atomic file store for received instances and for results waiting in the outbox.

Layout under ``[node].spool_dir``::

    index.sqlite                      the index (node.store.index)
    incoming/                         temporary files (pynetdicom's chunked receive, partial writes)
    instances/<Study>/<Series>/<SOP>.dcm
    conflicts/<SOP>.<n>.dcm           resends of a known SOPInstanceUID that differ from the stored copy
    outbox/job-<id>/...               a job's results until they are delivered

A file is written to ``incoming/``, fsync'ed, then hard-linked to its final name (``os.link`` fails when the name
exists, so a duplicate is never overwritten) and the directory is fsync'ed: a name under ``instances/`` always
points at a complete file. The disk watermark ``[node].min_free_mb`` is checked before every write.

Group commit (``node.ingest.commit``): :meth:`Spool.link_instance` links a batch of received files under their
final names without syncing, then :meth:`Spool.sync` makes the whole batch durable at once: an fsync of every file
and of every folder whose entries changed, all issued together on a few threads (the file system's journal
commits them together), and only those: not a ``syncfs`` of the whole file system, whose time depends on every
other writer of that disk. :func:`start_writeback` lets a received file's writeback begin before that.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import logging
import os
import re
import shutil
import sys
import tempfile
from collections.abc import Callable, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass
from pathlib import Path

from node.dimse import Status
from node.errors import IngestError, SpoolError, SpoolInUse

log = logging.getLogger(__name__)

_UID = re.compile(r"^[0-9]+(\.[0-9]+)*$")


def valid_uid(uid: str) -> bool:
    """Whether ``uid`` is a DICOM UID usable as a file name: digits and dots, at most 64 characters
    (PS3.5 9.1; a leading zero in a component is not checked)."""
    return 0 < len(uid) <= 64 and bool(_UID.match(uid))


def fsync_dir(path: Path) -> None:
    """fsync ``path``: a directory, so that a rename or link in it survives a power cut; or a file, its data and
    inode. Raises OSError."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _load_sync_file_range() -> Callable[[int, int, int, int], int] | None:
    """libc's ``sync_file_range(fd, offset, nbytes, flags)`` (Linux >= 2.6.17), None elsewhere."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        fn = libc.sync_file_range
    except (OSError, AttributeError):
        return None
    fn.argtypes, fn.restype = [ctypes.c_int, ctypes.c_longlong, ctypes.c_longlong, ctypes.c_uint], ctypes.c_int
    return fn  # type: ignore[no-any-return]


_SYNC_FILE_RANGE = _load_sync_file_range()  # a constant of the platform, read once
_SYNC_FILE_RANGE_WRITE = 2  # <fcntl.h>: start writeback of the dirty pages, do not wait for it


def start_writeback(path: Path) -> None:
    """Start writing ``path``'s dirty pages to disk without waiting (``sync_file_range`` SYNC_FILE_RANGE_WRITE;
    nothing on other systems), so that the fsync that makes it durable later has less left to wait for. It
    guarantees nothing by itself; errors are left to that fsync."""
    if _SYNC_FILE_RANGE is None:
        return
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        _SYNC_FILE_RANGE(fd, 0, 0, _SYNC_FILE_RANGE_WRITE)
    finally:
        os.close(fd)


def sync_batch(files: Sequence[Path], dirs: Sequence[Path],
               pool: Executor | None = None) -> dict[Path, OSError]:
    """Make ``files`` (their data and inodes) and the entries of ``dirs`` durable; returns the files that could
    not be, each with its error (a directory that fails fails every file of ``files`` below it).

    Every fsync runs at once on ``pool``'s threads when given (concurrent fsyncs share the file system's journal
    commits), else one after the other. Only these files are flushed: a ``syncfs`` of the whole file system
    (what the node did before) also waits for every other writer's dirty data on it -- measured on this project's
    2-core machine, 16 files of 128 KiB: syncfs 2.9 ms median alone but 18.9 ms beside a 1.5 GB ``dd``; the 17
    fsyncs at once after :func:`start_writeback` 1.2 ms alone, 1.3 ms beside it (``bench/sync_modes.py``,
    ``bench/results/sync-20261130.md``).
    """
    paths = list(files) + list(dirs)
    outcomes: list[BaseException | None]
    if pool is None:
        outcomes = []
        for p in paths:
            try:
                fsync_dir(p)
                outcomes.append(None)
            except OSError as exc:
                outcomes.append(exc)
    else:
        futures = [pool.submit(fsync_dir, p) for p in paths]
        outcomes = [f.exception() for f in futures]
    failed: dict[Path, OSError] = {}
    bad_dirs = [(d, e) for d, e in zip(paths[len(files):], outcomes[len(files):], strict=True) if e is not None]
    for f, err in zip(files, outcomes[:len(files)], strict=True):
        if err is None:
            err = next((e for d, e in bad_dirs if d in f.parents), None)
        if err is not None:
            failed[f] = err if isinstance(err, OSError) else OSError(str(err))
    return failed


def synced_temp_copy(src: Path, folder: Path, prefix: str, suffix: str = "") -> Path:
    """A new temporary file in ``folder`` holding an fsync'ed copy of ``src``; the caller renames or drops it.

    Raises OSError (the temporary file is removed first).
    """
    fd, tmp = tempfile.mkstemp(prefix=prefix, suffix=suffix, dir=folder)
    try:
        with os.fdopen(fd, "wb") as out, src.open("rb") as inp:
            shutil.copyfileobj(inp, out, 1 << 20)
            out.flush()
            os.fsync(out.fileno())
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return Path(tmp)


def atomic_copy(src: Path, dst: Path) -> None:
    """Copy ``src`` to ``dst`` through a temporary file in dst's folder, fsync, rename (replaces dst).

    Creates dst's folder; raises OSError.
    """
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = synced_temp_copy(src, dst.parent, ".part-")
    try:
        os.replace(tmp, dst)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(dst.parent)


def atomic_write(dst: Path, data: bytes) -> None:
    """Write ``data`` to ``dst`` atomically and durably: a temporary file in dst's folder, fsync, rename (replaces
    dst), fsync of the folder; a power cut leaves the old content or the new, never an empty or partial file.
    Raises OSError (the temporary file is removed)."""
    fd, tmp = tempfile.mkstemp(prefix=".part-", dir=dst.parent)
    try:
        with os.fdopen(fd, "wb") as out:
            out.write(data)
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, dst)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(dst.parent)


@dataclass(frozen=True)
class Stored:
    """Where an admitted instance lies in the spool (``instances/<Study>/<Series>/<SOP>.dcm``)."""

    path: Path
    duplicate: bool  # True: the instance was already in the spool and was kept as it was
    new_folder: bool = False  # True: linking it made its series folder (so its parents' entries changed too)


class Spool:
    """Atomic file store rooted at ``root``; refuses writes when free space falls below ``min_free_mb`` (MB).

    Creates ``incoming/``, ``instances/`` and ``outbox/`` under ``root``; SpoolError when it cannot.
    """

    def __init__(self, root: Path | str, min_free_mb: int = 0) -> None:
        self.root = Path(root).resolve()
        self.min_free_mb = min_free_mb
        self.incoming = self.root / "incoming"
        self.instances = self.root / "instances"
        self.conflicts = self.root / "conflicts"
        self.outbox = self.root / "outbox"
        self._durable_folders: set[Path] = set()  # series folders whose entries up to instances/ were synced
        try:
            for d in (self.incoming, self.instances, self.conflicts, self.outbox):
                d.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise SpoolError(f"spool {self.root}: cannot create its folders: {exc}") from exc

    @property
    def index_path(self) -> Path:
        """``<root>/index.sqlite``, the spool index's file."""
        return self.root / "index.sqlite"

    # ------------------------------------------------------------------------------------ one node per spool

    def lock(self) -> int:
        """Take the spool's exclusive lock (``<root>/srnode.lock``, flock(2)) for the serving node's lifetime,
        before anything cleans, re-indexes or requeues: two nodes on one spool would delete each other's partial
        files and run each other's jobs. The kernel drops the lock when the process dies (kill -9 included).
        Returns its file descriptor (``unlock(fd)`` releases it). SpoolError when another process holds it."""
        import fcntl

        path = self.root / "srnode.lock"
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except OSError as exc:
            raise SpoolError(f"spool {self.root}: cannot open its lock {path.name}: {exc}") from exc
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(fd)
            if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):  # e.g. ENOLCK: a file system without flock
                raise SpoolError(f"spool {self.root}: cannot take its lock {path.name}: {exc}") from exc
            raise SpoolInUse(f"spool {self.root} is in use by another srnode (its lock {path.name} is held): stop "
                             "that node, or give this one its own [node] spool_dir") from exc
        return fd

    def served(self) -> bool | None:
        """Whether a serving node holds the spool's lock now (:meth:`lock`), read from ``/proc/locks`` without
        taking it (a probe by flock could make a node starting at that moment refuse the spool). False when
        the lock file is absent or no lock on it is listed; None when that cannot be told (no ``/proc/locks``)."""
        try:
            st = os.stat(self.root / "srnode.lock")
        except OSError:
            return False
        try:
            text = Path("/proc/locks").read_text()
        except OSError:
            return None
        for line in text.splitlines():
            fields = line.split()
            if "->" in fields or "FLOCK" not in fields:  # a waiter, or another kind of lock
                continue
            for f in fields:
                parts = f.split(":")
                if len(parts) == 3 and parts[2].isdigit():
                    try:
                        major, minor = int(parts[0], 16), int(parts[1], 16)
                    except ValueError:
                        continue
                    if (int(parts[2]) == st.st_ino and major == os.major(st.st_dev)
                            and minor == os.minor(st.st_dev)):
                        return True
        return False

    @staticmethod
    def unlock(fd: int) -> None:
        """Release a lock taken by :meth:`lock` (closing its descriptor)."""
        try:
            os.close(fd)
        except OSError:
            pass

    # ------------------------------------------------------------------------------------ disk watermark

    def free_mb(self) -> float:
        """Free space on the spool's file system, in MiB (1024 x 1024 bytes). Raises OSError."""
        return shutil.disk_usage(self.root).free / (1024 * 1024)

    def has_space(self) -> bool:
        """Whether the free space is at least ``min_free_mb``."""
        return self.free_mb() >= self.min_free_mb

    def incoming_bytes(self, folder: Path | None = None) -> int:
        """Bytes in ``incoming/`` now: datasets being received, series the changes follower stages (a folder
        in it), and partial files not yet cleaned."""
        total = 0
        try:
            with os.scandir(folder or self.incoming) as it:
                for e in it:
                    try:
                        if e.is_dir(follow_symlinks=False):
                            total += self.incoming_bytes(Path(e.path))
                        elif e.is_file(follow_symlinks=False):
                            total += e.stat(follow_symlinks=False).st_size
                    except OSError:
                        continue  # removed while we looked
        except OSError:
            return 0
        return total

    def check_space(self) -> None:
        """IngestError(0xA700 out of resources, PS3.4 B.2.3) when the spool disk is below the watermark."""
        free = self.free_mb()
        if free < self.min_free_mb:
            incoming = self.incoming_bytes() / (1024 * 1024)
            raise IngestError(
                f"spool disk {self.root} has {free:.0f} MB free, below node.min_free_mb = {self.min_free_mb}"
                f" ({incoming:.0f} MB of it in incoming/)", status=Status.OUT_OF_RESOURCES,
            )

    # ------------------------------------------------------------------------------------ instances

    def instance_path(self, study_uid: str, series_uid: str, sop_uid: str) -> Path:
        """``instances/<Study>/<Series>/<SOP>.dcm``; IngestError(0xC210) when a UID fails ``valid_uid``."""
        for what, uid in (("StudyInstanceUID", study_uid), ("SeriesInstanceUID", series_uid),
                          ("SOPInstanceUID", sop_uid)):
            if not valid_uid(uid):
                raise IngestError(f"{what} {uid!r} is not a valid UID")
        return self.instances / study_uid / series_uid / f"{sop_uid}.dcm"

    def store_file(self, src: Path, study_uid: str, series_uid: str, sop_uid: str) -> Stored:
        """Move a complete file (already on the spool's disk, e.g. in ``incoming/``) to its final name.

        ``src`` is hard-linked, not moved: the caller (pynetdicom) removes its temporary file itself. A file
        on another disk is copied first. ``Stored.duplicate``: the name existed; the first copy is kept.
        Raises IngestError: 0xA700 below the watermark or on a write error, 0xC210 for an invalid UID.
        """
        self.check_space()
        dst = self.instance_path(study_uid, series_uid, sop_uid)
        try:
            with src.open("rb") as fh:
                os.fsync(fh.fileno())
            dst.parent.mkdir(parents=True, exist_ok=True)
            try:
                os.link(src, dst)
            except FileExistsError:
                return Stored(dst, duplicate=True)
            except OSError as exc:
                if exc.errno != 18:  # EXDEV: another file system
                    raise
                return self._store_copy(src, dst)
            fsync_dir(dst.parent)
            return Stored(dst, duplicate=False)
        except OSError as exc:
            raise IngestError(f"instance {sop_uid}: cannot write to the spool {self.root}: {exc}",
                              status=Status.OUT_OF_RESOURCES) from exc

    def link_instance(self, src: Path, study_uid: str, series_uid: str, sop_uid: str) -> Stored:
        """Link a complete file (on the spool's disk) under its final name WITHOUT syncing: the group commit
        syncs a whole batch at once (:func:`sync_batch`) before anything is acknowledged. A file on another disk
        is copied (that copy is synced here). ``Stored.duplicate``: the name existed; the first copy is kept.
        Raises IngestError: 0xA700 on a write error, 0xC210 for an invalid UID."""
        dst = self.instance_path(study_uid, series_uid, sop_uid)
        try:
            try:
                os.link(src, dst)
            except FileNotFoundError:
                if src.exists():  # the series' folder is not there yet
                    dst.parent.mkdir(parents=True, exist_ok=True)
                    os.link(src, dst)
                    return Stored(dst, duplicate=False, new_folder=True)
                raise
            return Stored(dst, duplicate=False)
        except FileExistsError:
            return Stored(dst, duplicate=True)
        except OSError as exc:
            if exc.errno == 18:  # EXDEV: another file system
                try:
                    return self._store_copy(src, dst)
                except OSError as exc2:
                    exc = exc2
            raise IngestError(f"instance {sop_uid}: cannot write to the spool {self.root}: {exc}",
                              status=Status.OUT_OF_RESOURCES) from exc

    def sync(self, stored: Sequence[Stored], pool: Executor | None = None) -> dict[Path, OSError]:
        """Make the files just linked (``stored``, from :meth:`link_instance`) durable with their names: each
        file, its series folder, and -- for a folder made by the link, or one this process has not yet seen made
        durable (a sync that failed, a kill -9 between mkdir and sync) -- its study folder and ``instances/``
        (:func:`sync_batch`, concurrently on ``pool``). Returns the paths that could not be made durable, each
        with its error. Called by one thread at a time (the group commit's writer)."""
        dirs: set[Path] = set()
        unsure: set[Path] = set()  # series folders whose own entry (and their study folder's) must be synced too
        for s in stored:
            folder = s.path.parent
            dirs.add(folder)
            if s.new_folder or folder not in self._durable_folders:
                unsure.add(folder)
                dirs.update((folder.parent, self.instances))
        failed = sync_batch([s.path for s in stored], sorted(dirs), pool)
        bad = {f.parent for f in failed}
        self._durable_folders.update(unsure - bad)
        return failed

    def store_bytes(self, data: bytes, study_uid: str, series_uid: str, sop_uid: str) -> Stored:
        """Write ``data`` (a DICOM file) atomically under its final name; a duplicate is kept as it was.

        Raises IngestError as :meth:`store_file`.
        """
        self.check_space()
        fd, tmp = tempfile.mkstemp(prefix="rx-", suffix=".dcm", dir=self.incoming)
        try:
            with os.fdopen(fd, "wb") as out:
                out.write(data)
            return self.store_file(Path(tmp), study_uid, series_uid, sop_uid)
        except OSError as exc:
            raise IngestError(f"instance {sop_uid}: cannot write to the spool {self.root}: {exc}",
                              status=Status.OUT_OF_RESOURCES) from exc
        finally:
            Path(tmp).unlink(missing_ok=True)

    def _store_copy(self, src: Path, dst: Path) -> Stored:
        tmp = synced_temp_copy(src, self.incoming, "rx-", ".dcm")
        try:
            try:
                os.link(tmp, dst)
            except FileExistsError:
                return Stored(dst, duplicate=True)
            fsync_dir(dst.parent)
            return Stored(dst, duplicate=False)
        finally:
            tmp.unlink(missing_ok=True)

    def keep_aside(self, src: Path, sop_uid: str) -> Path:
        """Keep a conflicting resend under ``conflicts/<SOP>.<n>.dcm`` (linked, or copied across disks)."""
        if not valid_uid(sop_uid):
            raise IngestError(f"SOPInstanceUID {sop_uid!r} is not a valid UID")
        for n in range(1, 10_000):
            dst = self.conflicts / f"{sop_uid}.{n}.dcm"
            try:
                os.link(src, dst)
            except FileExistsError:
                continue
            except OSError as exc:
                if exc.errno != 18:  # EXDEV: another file system
                    raise
                tmp = synced_temp_copy(src, self.conflicts, ".part-")
                try:
                    os.link(tmp, dst)
                except FileExistsError:
                    continue
                finally:
                    tmp.unlink(missing_ok=True)
            fsync_dir(self.conflicts)
            return dst
        raise IngestError(f"instance {sop_uid}: too many conflicting resends kept", Status.OUT_OF_RESOURCES)

    def instance_files(self) -> list[Path]:
        """Every file under ``instances/<Study>/<Series>/`` (what the index must list)."""
        out: list[Path] = []
        for study in sorted(self.instances.iterdir()) if self.instances.is_dir() else []:
            if not study.is_dir():
                continue
            for series in sorted(study.iterdir()):
                if series.is_dir():
                    out.extend(sorted(p for p in series.iterdir() if p.is_file() and p.suffix == ".dcm"))
        return out

    def clean_incoming(self) -> list[str]:
        """Remove leftovers of interrupted writes (start-up); returns the names removed, a folder's with a trailing
        ``/`` (a received data set's partial file is a file; a folder is a library's scratch: while the SCP runs,
        ``tempfile.tempdir`` is ``incoming/``). An entry that cannot be removed is logged and left."""
        removed: list[str] = []
        for p in sorted(self.incoming.iterdir()):
            try:
                if p.is_dir():
                    shutil.rmtree(p)
                    removed.append(p.name + "/")
                else:
                    p.unlink()
                    removed.append(p.name)
            except OSError as exc:  # pragma: no cover - permissions
                log.warning("spool: cannot remove leftover %s: %s", p, exc)
        return removed

    # ------------------------------------------------------------------------------------ outbox area

    def job_dir(self, job_id: int, fresh: bool = False) -> Path:
        """The folder holding job ``job_id``'s results (``outbox/job-<id>``), created if absent; ``fresh``
        empties it first (a re-run after a crash). Raises OSError."""
        d = self.outbox / f"job-{job_id}"
        if fresh and d.exists():
            shutil.rmtree(d)
        d.mkdir(parents=True, exist_ok=True)
        return d
