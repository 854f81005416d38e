"""Several processes receiving on the one DICOM port (``[node] receive_processes`` > 1).

One Python interpreter receives at most ~650-700 small instances/s on this project's benchmark (its GIL: the
group commit's fsync threads wait for it, docs/benchmarks.md "Ingest"). With ``receive_processes = N`` the main
process (``srnode serve``) receives as before and starts N - 1 receiving children; every one of them binds the
DICOM port with ``SO_REUSEPORT`` and the kernel spreads the connections among them (by a hash of the addresses
and ports). A child is a whole SCP of its own: its pynetdicom AE (the lean path), admission, group commit and
SQLite connection (WAL; the writers' transactions serialise on SQLite's write lock, ``busy_timeout`` 60 s), so
durability is per process as before: Success only after that process's batch is synced and its index
transaction committed. The main process keeps the completeness watcher, jobs, senders and HTTP.

What crosses processes, over one pipe per child (pickled tuples, :class:`ReceiverPool` / :class:`ParentLink`):

- ``[node] max_associations``: one limit for all processes (:class:`SharedSlots`, held by the main process; a
  child asks for a slot as an association is requested and gives it back when it ends; a child that dies
  gives back all of its slots);
- the metrics: a child counts in its own registry and sends its counters and gauges every ``FLUSH_S`` (and before
  each release hint); the main process adds the differences to its own (:class:`MetricsRelay`: ``/metrics`` and
  the dashboard count every process; the gauges of a child that died are taken back);
- the SCP's on-release hint to the series watcher, and the Storage Commitment N-EVENT-REPORTs a peer sends to
  the node's port (their Event Information goes to the main process's ``Confirmer.answer_report``; the child
  answers the peer with its status);
- the audit log: every process appends its own JSON lines to the one file (``O_APPEND``, one ``write`` per line).

Per process, not shared: the connection gate (``node.ingest.server.MAX_PENDING`` connections waiting for their
first bytes in each process) and the spool's disk watermark checks (each process asks the disk itself).

Life cycle: the main process checks that the port is free (:func:`probe_port`, without ``SO_REUSEPORT``: another
program or node listening there stops the start with one line), binds its own SCP, then starts the children
(``python -m node.app.receiver``); start-up fails with one line when a child cannot bind or open the spool. A
child dies with the main process (``PR_SET_PDEATHSIG``: a kill -9 of the node ends them all); a child that dies
is restarted, logged in one line (one that exits with code 0 was told to stop and is not). SIGTERM: the
children stop accepting, finish their associations (``StoreSCP.stop``) and exit; the main process waits for
them before it closes the index.
"""

from __future__ import annotations

import ctypes
import errno
import itertools
import logging
import os
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, fields
from multiprocessing.connection import Connection, wait
from pathlib import Path
from typing import Any

from prometheus_client import Counter, Gauge
from pydicom.dataset import Dataset
from pynetdicom import evt

from node.audit import AuditLog
from node.config import Config
from node.dimse import Status
from node.errors import ConfigError, listen_problem
from node.ingest.admit import Admission
from node.ingest.scp import AssociationSlots, StoreSCP
from node.metrics import Metrics
from node.store import open_store

log = logging.getLogger(__name__)

READY_TIMEOUT_S = 60.0  # a child must be listening within this after it was started
FLUSH_S = 0.25  # a child's metrics reach the main process within this (seconds)
ASK_TIMEOUT_S = 30.0  # a child waits this long for the main process's answer (a slot, a commitment report)
PROBE_S = 10.0  # the port is retried this long at start (the children of a node just killed may still be exiting)
RESTART_MAX_S = 30.0  # longest wait before restarting a child that keeps dying
STOP_GRACE_S = 10.0  # after its own stop timeout, how long a child gets to exit before it is killed
_PR_SET_PDEATHSIG = 1  # prctl(2)

MetricKey = tuple[str, tuple[tuple[str, str], ...]]  # (metric family name, sorted labels)
Snapshot = dict[MetricKey, float]


# ---------------------------------------------------------------------------------------------- shared state


class SharedSlots:
    """``[node] max_associations`` for every receiving process together: ``limit`` slots, held per owner (0: the
    main process, 1..N-1: the children). Thread-safe."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._held: dict[int, int] = {}
        self._lock = threading.Lock()

    def take(self, owner: int) -> bool:
        """One slot for ``owner``; False when ``limit`` are held."""
        with self._lock:
            if sum(self._held.values()) >= self.limit:
                return False
            self._held[owner] = self._held.get(owner, 0) + 1
            return True

    def give(self, owner: int) -> None:
        """A slot of ``owner`` back."""
        with self._lock:
            if self._held.get(owner, 0) > 0:
                self._held[owner] -= 1

    def reset(self, owner: int) -> None:
        """Every slot of ``owner`` back (it ended)."""
        with self._lock:
            self._held.pop(owner, None)

    @property
    def held(self) -> int:
        """Slots held now, all owners."""
        with self._lock:
            return sum(self._held.values())

    def owner(self, owner: int) -> AssociationSlots:
        """The slots as one process's SCP sees them (``StoreSCP.slots``)."""
        return _OwnerSlots(self, owner)


@dataclass(frozen=True)
class _OwnerSlots:
    shared: SharedSlots
    number: int

    def take(self) -> bool:
        return self.shared.take(self.number)

    def give(self) -> None:
        self.shared.give(self.number)


def metric_snapshot(metrics: Metrics) -> Snapshot:
    """Every counter's and gauge's value in ``metrics`` by (family, labels) (no ``_created`` samples)."""
    out: Snapshot = {}
    for family in metrics.registry.collect():
        if family.type not in ("counter", "gauge"):
            continue
        for s in family.samples:
            if not s.name.endswith("_created"):
                out[(family.name, tuple(sorted(s.labels.items())))] = float(s.value)
    return out


class MetricsRelay:
    """The main process's side of the children's metrics: each child's snapshots (:func:`metric_snapshot`)
    added to ``metrics`` as differences from its previous one. Thread-safe."""

    def __init__(self, metrics: Metrics) -> None:
        self._targets: dict[str, Counter | Gauge] = {}
        for f in fields(metrics):
            obj = getattr(metrics, f.name)
            if isinstance(obj, Counter | Gauge):
                self._targets[next(iter(obj.describe())).name] = obj
        self._last: dict[int, Snapshot] = {}
        self._lock = threading.Lock()

    def apply(self, child: int, snap: Snapshot) -> None:
        """Child ``child`` counts ``snap`` now."""
        with self._lock:
            last = self._last.setdefault(child, {})
            for key, value in snap.items():
                delta = value - last.get(key, 0.0)
                if delta:
                    self._add(key, delta)
                last[key] = value

    def forget(self, child: int) -> None:
        """Child ``child`` ended: its gauges (open associations) are taken back; its counters stay counted."""
        with self._lock:
            for key, value in self._last.pop(child, {}).items():
                if value and isinstance(self._targets.get(key[0]), Gauge):
                    self._add(key, -value)

    def _add(self, key: MetricKey, delta: float) -> None:
        target = self._targets.get(key[0])
        if target is None or (isinstance(target, Counter) and delta < 0):
            return
        metric: Any = target.labels(**dict(key[1])) if key[1] else target
        metric.inc(delta)


def probe_port(host: str, port: int, within_s: float = PROBE_S) -> None:
    """Check that nothing listens on ``host:port`` by binding it without SO_REUSEPORT (then closing it), retried
    for ``within_s`` seconds while it is in use; ConfigError (one line, ``listen_problem``) when it stays taken.
    Every receiving process binds with SO_REUSEPORT, which would otherwise share the port with another node."""
    deadline = time.monotonic() + within_s
    while True:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                s.bind((host, port))
                return
            except OSError as exc:
                if exc.errno != errno.EADDRINUSE or time.monotonic() >= deadline:
                    raise ConfigError(listen_problem("DICOM port", "node", host, port, exc)) from exc
        time.sleep(0.2)


# ---------------------------------------------------------------------------------------------- the child


def die_with_parent(parent_pid: int) -> None:
    """Ask the kernel for SIGKILL when the parent ends (``PR_SET_PDEATHSIG``, Linux); exits at once when
    ``parent_pid`` is already gone (it ended before the request)."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    except (OSError, AttributeError) as exc:  # pragma: no cover - not Linux
        log.warning("receiving process: PR_SET_PDEATHSIG unavailable (%s): it outlives a killed node", exc)
    if os.getppid() != parent_pid:
        os._exit(1)


class ParentLink:
    """A child's pipe to the main process: :meth:`send` a message, :meth:`ask` and wait for the answer
    (``("answer", id, value)``, read by :meth:`read_forever` in a thread of its own). Thread-safe."""

    def __init__(self, conn: Connection) -> None:
        self._conn = conn
        self._send_lock = threading.Lock()
        self._waiting: dict[int, list[Any]] = {}
        self._ids = itertools.count(1)
        self.closed = threading.Event()  # the main process is gone

    def send(self, *msg: Any) -> None:
        with self._send_lock:
            try:
                self._conn.send(msg)
            except (OSError, ValueError):
                self.closed.set()

    def ask(self, kind: str, *args: Any, timeout: float = ASK_TIMEOUT_S) -> Any:
        """Send ``(kind, id, *args)`` and return the answer; None when none came within ``timeout`` s."""
        rid = next(self._ids)
        slot: list[Any] = [threading.Event(), None]
        self._waiting[rid] = slot
        try:
            self.send(kind, rid, *args)
            slot[0].wait(timeout)
            return slot[1]
        finally:
            self._waiting.pop(rid, None)

    def read_forever(self) -> None:
        while True:
            try:
                msg = self._conn.recv()
            except (EOFError, OSError):
                self.closed.set()
                for slot in list(self._waiting.values()):
                    slot[0].set()
                return
            waiting = self._waiting.get(msg[1]) if msg[0] == "answer" else None
            if waiting is not None:
                waiting[1] = msg[2]
                waiting[0].set()


@dataclass(frozen=True)
class _ChildSlots:
    link: ParentLink

    def take(self) -> bool:
        return self.link.ask("take") is True

    def give(self) -> None:
        self.link.send("give")


def _forward_report(link: ParentLink) -> Callable[[evt.Event], tuple[int, None]]:
    def on_report(event: evt.Event) -> tuple[int, None]:
        """EVT_N_EVENT_REPORT in a child: the main process records the report (``Confirmer.answer_report``)."""
        requestor = event.assoc.requestor
        try:
            info = event.event_information
        except Exception as exc:  # noqa: BLE001 - a malformed report: say so, do not crash the SCP
            log.warning("storage commitment report from %s unreadable: %s", requestor.ae_title, exc)
            return Status.PROCESSING_FAILURE, None
        status = link.ask("report", info, str(requestor.ae_title).strip(), str(requestor.address))
        return (status if isinstance(status, int) else Status.PROCESSING_FAILURE), None

    return on_report


def serve_receiver(conn: Connection, cfg: Config, number: int) -> int:
    """Run receiving child ``number`` (1..N-1) on ``conn`` until SIGTERM or until the main process is gone;
    returns the exit code (1: it could not start: the reason was sent to the main process)."""
    link = ParentLink(conn)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda signum, frame: stop.set())
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole group: the main process stops us
    threading.Thread(target=link.read_forever, name="receiver-link", daemon=True).start()
    try:
        store = open_store(cfg)
        audit = AuditLog(cfg.node.audit_log or store.spool.root / "audit.log")
    except Exception as exc:  # noqa: BLE001 - reported to the main process in one line
        link.send("failed", f"{type(exc).__name__}: {exc}")
        return 1
    metrics = Metrics.create()
    flush_lock = threading.Lock()
    sent: list[Snapshot] = [{}]

    def flush() -> None:
        with flush_lock:
            snap = metric_snapshot(metrics)
            if snap != sent[0]:
                link.send("metrics", snap)
                sent[0] = snap

    def released() -> None:
        flush()  # the counts of the association first, then the hint
        link.send("release")

    scp = StoreSCP(cfg, Admission(cfg, store.spool, store.index, metrics, audit), metrics, audit,
                   on_release=released, on_report=_forward_report(link), reuse_port=True, slots=_ChildSlots(link))
    try:
        scp.start()
    except ConfigError as exc:
        link.send("failed", str(exc))
        return 1
    link.send("ready", os.getpid())
    while not stop.is_set() and not link.closed.is_set():
        stop.wait(FLUSH_S)
        flush()
    scp.stop()
    flush()
    store.index.close()
    return 0


# ---------------------------------------------------------------------------------------------- the main side


def _child_env() -> dict[str, str]:
    """The environment of a child: the main process's, with the folder of the ``node`` package it runs first on
    ``PYTHONPATH`` (a child runs the same code whatever its working folder)."""
    root = str(Path(__file__).resolve().parents[2])
    rest = os.environ.get("PYTHONPATH", "")
    return {**os.environ, "PYTHONPATH": root + (os.pathsep + rest if rest else "")}


@dataclass
class _Child:
    number: int
    proc: subprocess.Popen[bytes] | None = None
    conn: Connection | None = None
    send_lock: threading.Lock = field(default_factory=threading.Lock)
    pid: int = 0
    ready: threading.Event = field(default_factory=threading.Event)
    failure: str = ""
    started: float = 0.0
    restart_at: float = 0.0
    quick_deaths: int = 0

    def send(self, *msg: Any) -> None:
        with self.send_lock:
            if self.conn is not None:
                try:
                    self.conn.send(msg)
                except (OSError, ValueError):
                    pass


class ReceiverPool:
    """The main process's receiving children: ``cfg.node.receive_processes - 1`` of them, each started as
    ``command + [parent pid, pipe descriptor]`` (the app's ``python -m node.app.receiver``) and sent
    ``(cfg, number, log level)`` on the pipe. ``slots``: the shared association limit (the main process's SCP
    holds slots as owner 0); ``on_release``: the series watcher's hint; ``answer_report``: what records a
    Storage Commitment report (``Confirmer.answer_report``: info, AE title, address -> DIMSE status)."""

    def __init__(self, cfg: Config, metrics: Metrics, slots: SharedSlots, on_release: Callable[[], None],
                 answer_report: Callable[[Dataset, str, str], int], command: Sequence[str]) -> None:
        self.cfg = cfg
        self.slots = slots
        self.relay = MetricsRelay(metrics)
        self.on_release = on_release
        self.answer_report = answer_report
        self.command = list(command)
        self.children = [_Child(n) for n in range(1, cfg.node.receive_processes)]
        self.restarts = 0  # children restarted after they died (for tests)
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        """Start the children and return once each listens; ConfigError (one line) when one cannot start (the
        others are stopped again)."""
        self._thread = threading.Thread(target=self._supervise, name="receivers", daemon=True)
        self._thread.start()  # the children are the supervisor's: PR_SET_PDEATHSIG follows the thread that forks
        deadline = time.monotonic() + READY_TIMEOUT_S
        for child in self.children:
            if not child.ready.wait(max(0.0, deadline - time.monotonic())):
                child.failure = child.failure or f"not listening within {READY_TIMEOUT_S:.0f} s"
            if child.failure:
                self.stop(timeout=5.0)
                raise ConfigError(f"receiving process {child.number} of node.receive_processes = "
                                  f"{self.cfg.node.receive_processes} could not start: {child.failure}")
        log.info("DICOM SCP: %d receiving processes on port %d (pids %s and the main process %d)",
                 len(self.children) + 1, self.cfg.node.port, ", ".join(str(c.pid) for c in self.children),
                 os.getpid())

    def stop(self, timeout: float = 30.0) -> None:
        """SIGTERM every child (each stops accepting, finishes its associations within ``timeout`` s, exits);
        waits for them (killed ``STOP_GRACE_S`` later) and for the supervisor."""
        self._stopping.set()
        for child in self.children:
            if child.proc is not None and child.proc.poll() is None:
                child.proc.send_signal(signal.SIGTERM)
        for child in self.children:
            proc = child.proc
            if proc is None:
                continue
            try:
                proc.wait(timeout + STOP_GRACE_S)
            except subprocess.TimeoutExpired:
                log.warning("receiving process %d (pid %d) did not stop within %.0f s: killed", child.number,
                            proc.pid, timeout + STOP_GRACE_S)
                proc.kill()
                proc.wait()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=STOP_GRACE_S)

    @property
    def pids(self) -> list[int]:
        """The children's process ids now (0: not running)."""
        return [c.proc.pid if c.proc is not None and c.proc.poll() is None else 0 for c in self.children]

    # ------------------------------------------------------------------------------------ the supervisor thread

    def _supervise(self) -> None:
        for child in self.children:
            self._spawn(child)
        while True:
            live = {c.conn: c for c in self.children if c.conn is not None}
            if self._stopping.is_set() and not live:
                return
            for conn in wait(list(live), timeout=0.5) if live else []:
                child = live[conn]  # type: ignore[index]
                try:
                    msg = child.conn.recv() if child.conn is not None else None
                except (EOFError, OSError):
                    self._ended(child)
                    continue
                if msg is not None:
                    self._handle(child, msg)
            if not live:
                self._stopping.wait(0.5)
            now = time.monotonic()
            for child in self.children:
                if child.conn is None and not self._stopping.is_set() and now >= child.restart_at:
                    self._spawn(child)

    def _spawn(self, child: _Child) -> None:
        ours, theirs = socket.socketpair()
        try:
            child.proc = subprocess.Popen([*self.command, str(os.getpid()), str(theirs.fileno())],
                                          pass_fds=[theirs.fileno()], stdin=subprocess.DEVNULL, env=_child_env())
        except OSError as exc:
            ours.close()
            child.failure = f"cannot start {self.command[0]}: {exc}"
            child.ready.set()
            child.restart_at = time.monotonic() + RESTART_MAX_S
            return
        finally:
            theirs.close()
        child.conn = Connection(ours.detach())
        child.started = time.monotonic()
        child.pid = child.proc.pid
        child.send(self.cfg, child.number, logging.getLevelName(logging.getLogger().getEffectiveLevel()))

    def _handle(self, child: _Child, msg: tuple[Any, ...]) -> None:
        kind = msg[0]
        if kind == "take":
            child.send("answer", msg[1], self.slots.take(child.number))
        elif kind == "give":
            self.slots.give(child.number)
        elif kind == "metrics":
            self.relay.apply(child.number, msg[1])
        elif kind == "release":
            self.on_release()
        elif kind == "report":
            threading.Thread(target=self._report, args=(child, *msg[1:]), name="receiver-report",
                             daemon=True).start()
        elif kind == "ready":
            child.pid = int(msg[1])
            child.failure = ""
            if child.ready.is_set():
                log.info("receiving process %d (pid %d) listening again", child.number, child.pid)
            child.ready.set()
        elif kind == "failed":
            child.failure = str(msg[1])
            if child.ready.is_set():  # a restart that failed: the main process goes on with fewer receivers
                log.error("receiving process %d could not start again: %s", child.number, child.failure)
            child.ready.set()

    def _report(self, child: _Child, rid: int, info: Dataset, ae_title: str, address: str) -> None:
        try:
            status = self.answer_report(info, ae_title, address)
        except Exception as exc:  # noqa: BLE001 - the child answers 0x0110
            log.exception("storage commitment report from %s not recorded: %s", ae_title, exc)
            status = Status.PROCESSING_FAILURE
        child.send("answer", rid, int(status))

    def _ended(self, child: _Child) -> None:
        """The child's pipe closed: it exited or died. Its slots and gauges are given back; restarted unless the
        node is stopping or it exited with code 0 (it was sent SIGTERM itself) -- at once, or after a growing wait
        when it keeps dying within 10 s of its start."""
        with child.send_lock:
            if child.conn is not None:
                child.conn.close()
            child.conn = None
        code: int | None = None
        if child.proc is not None:
            try:
                code = child.proc.wait(timeout=5.0)
            except subprocess.TimeoutExpired:
                child.proc.kill()
                code = child.proc.wait()
        self.slots.reset(child.number)
        self.relay.forget(child.number)
        if self._stopping.is_set() or not child.ready.is_set():
            if not child.ready.is_set():
                child.failure = child.failure or f"it exited with code {code} before it listened"
                child.restart_at = time.monotonic() + RESTART_MAX_S  # start() gives up and stops the pool
                child.ready.set()
            return
        if code == 0:  # it was told to stop (SIGTERM to the whole group: systemd, docker stop): not restarted
            log.info("receiving process %d (pid %d) stopped", child.number, child.pid)
            child.restart_at = float("inf")
            return
        quick = time.monotonic() - child.started < 10.0
        child.quick_deaths = child.quick_deaths + 1 if quick else 0
        wait_s = min(RESTART_MAX_S, 0.5 * 2 ** child.quick_deaths) if child.quick_deaths else 0.0
        child.restart_at = time.monotonic() + wait_s
        self.restarts += 1
        log.error("receiving process %d (pid %d) ended with exit code %s: restarted%s", child.number, child.pid,
                  code, f" in {wait_s:.1f} s" if wait_s else "")
