"""The SCP's listening server: pynetdicom's threaded association server with a gate before the association.

pynetdicom's ``AssociationServer.get_request`` does the TLS handshake inside the accept loop, without a timeout:
one TCP connection that never sends a ClientHello stops every later connection from being accepted. And every
accepted connection becomes an ``Association`` thread at once, which pynetdicom counts toward
``maximum_associations`` while it waits (``acse_timeout``, 30 s by default) for an A-ASSOCIATE-RQ: a few dozen
silent sockets lock every legitimate caller out with "local limit exceeded".

:class:`GuardedAssociationServer` accepts only; each connection then passes a gate in its own thread, with one
deadline per step:

1. TLS (when configured): the handshake must finish within ``[node.tls] handshake_timeout_s``;
2. the caller must start its A-ASSOCIATE-RQ within ``[node] association_timeout_s`` (the first byte is enough).

Only then is the connection handed to pynetdicom as an association (and counted toward
``[node] max_associations``); the rest of the A-ASSOCIATE-RQ must arrive within ``association_timeout_s`` too
(the AE's ``acse_timeout``). At most ``MAX_PENDING`` connections wait at the gate; a newer one evicts the oldest
(a caller that means it sends its request within milliseconds). A connection that fails the gate is closed,
logged and audited (``tls-handshake-failed``, ``connection-dropped``) with the address and the reason; one
that the caller closes without sending a byte (a TCP health probe) is only logged at DEBUG.
"""

from __future__ import annotations

import collections
import logging
import socket
import ssl
import threading
import time
from collections.abc import Callable
from datetime import datetime
from typing import Any

from pynetdicom import AE
from pynetdicom.transport import ThreadedAssociationServer
from pynetdicom.utils import make_target

from node.audit import AuditLog, PeerBudget
from node.dimse import no_delay
from node.ingest.association import QuietRequestHandler
from node.ingest.fdwait import wait_ready
from node.ingest.lean import LeanHooks

log = logging.getLogger(__name__)

MAX_PENDING = 256  # connections waiting at the gate (TLS handshake, first byte); beyond: the oldest is evicted

Address = tuple[str, int] | tuple[str, int, int, int]


class GateClosed(Exception):
    """A connection did not pass the gate; the message is the reason (for the log and the audit)."""


class _Hangup(Exception):
    """The caller closed the connection without sending a byte (a TCP health probe): not logged as a failure."""


class _Pending:
    """One connection at the gate: its current socket (plain, then TLS) and when it was accepted."""

    __slots__ = ("evicted", "since", "sock")

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.since = time.monotonic()
        self.evicted = False

    def cut(self) -> None:
        """Shut the connection down from another thread: whatever waits on it wakes up and fails."""
        try:
            socket.socket.shutdown(self.sock, socket.SHUT_RDWR)  # the socket level, also under an SSLSocket
        except OSError:
            pass


class GuardedAssociationServer(ThreadedAssociationServer):
    """A ThreadedAssociationServer whose connections pass the gate (module docstring) before they become
    associations. ``handshake_timeout_s`` and ``association_timeout_s`` are seconds; ``audit`` receives
    one record per connection that failed the gate."""

    daemon_threads = True
    request_queue_size = 128  # listen() backlog (pynetdicom's 5 drops SYNs of a burst: 1 s client retries)

    def __init__(self, ae: AE, address: Address, ae_title: str, contexts: Any, ssl_context: ssl.SSLContext | None,
                 evt_handlers: Any = None, *, handshake_timeout_s: float = 10.0,
                 association_timeout_s: float = 10.0, audit: AuditLog | None = None,
                 max_pending: int = MAX_PENDING, lean_hooks: LeanHooks | None = None,
                 message_timeout_s: float = 0.0, budget: PeerBudget | None = None,
                 on_refused: Callable[[str], None] | None = None) -> None:
        self.on_refused = on_refused  # counts each refused connection by reason (the node's metrics), unbudgeted
        self.budget = budget  # the per-address bound on refusal lines and audit records (None: none)
        self.lean_hooks = lean_hooks  # the lean C-STORE receive path (node.ingest.lean); None: pynetdicom's
        self.message_timeout_s = message_timeout_s  # QuietDUL's deadline of one fragmented message (0: none)
        self.handshake_timeout_s = handshake_timeout_s
        self.association_timeout_s = association_timeout_s
        self.audit = audit
        self.max_pending = max_pending
        self._pending: collections.OrderedDict[int, _Pending] = collections.OrderedDict()
        self._pending_lock = threading.Lock()
        self._serial = 0
        super().__init__(ae, address, ae_title, contexts, ssl_context, evt_handlers=evt_handlers,
                         request_handler=QuietRequestHandler)

    # ------------------------------------------------------------------------------------ accept loop

    def get_request(self) -> tuple[socket.socket, Any]:  # type: ignore[override]
        """Accept only: the TLS handshake happens in the connection's own thread, with a deadline."""
        assert self.socket is not None
        sock, address = self.socket.accept()
        no_delay(sock)  # before any TLS wrapping; node.dimse.no_delay says why
        return sock, address

    def process_request(self, request: Any, client_address: Any) -> None:
        """Put the connection at the gate (evicting the oldest waiting one when ``max_pending`` wait) and start
        its thread."""
        entry = _Pending(request)
        with self._pending_lock:
            self._serial += 1
            key = self._serial
            self._pending[key] = entry
            oldest = None
            if len(self._pending) > self.max_pending:
                _, oldest = self._pending.popitem(last=False)
                oldest.evicted = True
        if oldest is not None:
            oldest.cut()
        t = threading.Thread(target=self._gate_then_associate, args=(key, entry, client_address),
                             name=f"ConnectionGate@{datetime.now():%Y%m%d%H%M%S}", daemon=True)
        t.start()

    # ------------------------------------------------------------------------------------ the gate

    def _gate_then_associate(self, key: int, entry: _Pending, client_address: Any) -> None:
        address = str(client_address[0]) if isinstance(client_address, tuple) else str(client_address)
        handshake = self.ssl_context is not None
        try:
            first = self.handshake_timeout_s if handshake else self.association_timeout_s
            if not self._first_bytes(entry.sock, entry.since + first):
                raise GateClosed(f"no ClientHello arrived within {first:g} s" if handshake
                                 else f"no A-ASSOCIATE-RQ within {first:g} s")
            if self.ssl_context is not None:
                entry.sock = self._handshake(entry, self.ssl_context)
                handshake = False
                self._await_request(entry)
        except (_Hangup, GateClosed, OSError, ssl.SSLError, ValueError) as exc:
            self._forget(key)
            if isinstance(exc, _Hangup) and not entry.evicted:
                self._close(entry.sock)
                log.debug("DICOM connection from %s closed by the caller before it said anything", address)
                return
            reason = str(exc) if isinstance(exc, GateClosed) else f"{type(exc).__name__}: {exc}"
            if entry.evicted:
                reason = f"evicted: more than {self.max_pending} connections waiting at the gate"
            self._close(entry.sock)
            self._refused(address, handshake, reason)
            return
        self._forget(key)
        # as ThreadedAssociationServer.process_request_thread: pynetdicom's handler starts the association
        super().process_request_thread(entry.sock, client_address)

    @staticmethod
    def _first_bytes(sock: socket.socket, deadline: float) -> bool:
        """Whether the caller sent something (a ClientHello, an A-ASSOCIATE-RQ) before ``deadline``
        (monotonic seconds); _Hangup when it closed the connection without a byte (a TCP probe)."""
        if not wait_ready([sock], deadline - time.monotonic()):  # poll: select() fails on descriptors >= 1024
            return False
        if not sock.recv(1, socket.MSG_PEEK):
            raise _Hangup()
        return True

    def _handshake(self, entry: _Pending, context: ssl.SSLContext) -> ssl.SSLSocket:
        """The server side of the TLS handshake, finished within ``handshake_timeout_s`` of the connection;
        GateClosed or ssl.SSLError / OSError when it fails."""
        deadline = entry.since + self.handshake_timeout_s
        entry.sock.setblocking(False)
        tls = context.wrap_socket(entry.sock, server_side=True, do_handshake_on_connect=False)
        entry.sock = tls  # the plain socket object is detached now; eviction must reach the TLS one
        while True:
            try:
                tls.do_handshake()
                break
            except ssl.SSLWantReadError:
                wait_read = True
            except ssl.SSLWantWriteError:
                wait_read = False
            left = deadline - time.monotonic()
            if left <= 0:
                raise GateClosed(f"TLS: the handshake was not finished within {self.handshake_timeout_s:g} s")
            wait_ready([tls], left, write=not wait_read)
        tls.setblocking(True)
        return tls

    def _await_request(self, entry: _Pending) -> None:
        """After the TLS handshake: wait until the caller starts its A-ASSOCIATE-RQ, at most
        ``association_timeout_s``; GateClosed when it says nothing."""
        sock = entry.sock
        if isinstance(sock, ssl.SSLSocket) and sock.pending():
            return
        if not wait_ready([sock], self.association_timeout_s):
            raise GateClosed(f"no A-ASSOCIATE-RQ within {self.association_timeout_s:g} s")

    def _refused(self, address: str, handshake: bool, reason: str, stage: str = "no request") -> None:
        """One WARNING line and one audit record for a connection that ended before an association: at the
        gate (the TLS handshake, no request) or, ``stage`` "A-ASSOCIATE-RQ", its request refused or unreadable by
        the DICOM upper layer (``QuietAssociation._reader_ended``)."""
        if self.on_refused is not None:
            self.on_refused("tls-handshake" if handshake else "no-request" if stage == "no request"
                            else "unreadable-request")
        kind = "TLS handshake" if handshake else stage
        write, note = self.budget.take(address, kind) if self.budget is not None else (True, "")
        if not write:  # beyond [node] refusals_logged_per_minute for this address: counted (PeerBudget)
            return
        event = "tls-handshake-failed" if handshake else "connection-dropped"
        log.warning("DICOM connection from %s closed before an association (%s): %s%s", address,
                    "TLS handshake" if handshake else stage, reason, f" ({note})" if note else "")
        if self.audit is not None:
            self.audit.write(event, address=address, reason=reason, **({"note": note} if note else {}))

    def _forget(self, key: int) -> None:
        with self._pending_lock:
            self._pending.pop(key, None)

    @staticmethod
    def _close(sock: socket.socket) -> None:
        try:
            socket.socket.shutdown(sock, socket.SHUT_RDWR)
        except OSError:
            pass
        sock.close()

    @property
    def pending(self) -> int:
        """How many connections wait at the gate now."""
        with self._pending_lock:
            return len(self._pending)

    def server_close(self) -> None:
        """Close the listening socket and every connection still waiting at the gate."""
        with self._pending_lock:
            waiting = list(self._pending.values())
        for entry in waiting:
            entry.cut()
        super().server_close()


def start_guarded_server(ae: AE, address: tuple[str, int], evt_handlers: list[Any],
                         ssl_context: ssl.SSLContext | None, *, handshake_timeout_s: float,
                         association_timeout_s: float, audit: AuditLog | None,
                         lean_hooks: LeanHooks | None = None,
                         message_timeout_s: float = 0.0,
                         budget: PeerBudget | None = None,
                         on_refused: Callable[[str], None] | None = None) -> GuardedAssociationServer:
    """Start ``ae`` as an association acceptor on ``address`` behind the gate, in a daemon thread (as
    ``AE.start_server(block=False)`` does); returns the server (``shutdown()`` stops it).

    Sets the AE's ``acse_timeout`` to ``association_timeout_s`` (the rest of the A-ASSOCIATE-RQ after its first
    byte). ``lean_hooks``: receive plain C-STOREs on the lean path (``node.ingest.lean``). ``message_timeout_s``:
    seconds a fragmented command set or data set may take (``QuietDUL``; 0: no deadline). ``budget``: the
    per-address bound on the lines and audit records of dropped connections (``PeerBudget``). ``on_refused``: called
    with the reason of each connection refused before an association (tls-handshake, no-request,
    unreadable-request), for the node's metrics. Raises OSError when
    the address cannot be bound.
    """
    ae.acse_timeout = association_timeout_s
    server = ae.make_server(address, ssl_context=ssl_context, evt_handlers=evt_handlers,
                            server_class=GuardedAssociationServer, handshake_timeout_s=handshake_timeout_s,
                            association_timeout_s=association_timeout_s, audit=audit, lean_hooks=lean_hooks,
                            message_timeout_s=message_timeout_s, budget=budget, on_refused=on_refused)
    assert isinstance(server, GuardedAssociationServer)
    thread = threading.Thread(target=make_target(server.serve_forever), name=f"AcceptorServer@{datetime.now():%Y%m%d%H%M%S}",
                              daemon=True)
    thread.start()
    ae._servers.append(server)  # AssociationServer.shutdown() removes it from there
    return server
