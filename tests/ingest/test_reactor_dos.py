"""QuietDUL's PDU receive path against a hostile peer, in process over a socket pair: memory in proportion to the
bytes received (not to the length a header announces), and waits that work on descriptors >= 1024."""

from __future__ import annotations

import fcntl
import resource
import socket
import struct
import threading
from typing import Any

import pytest
from pynetdicom import AE
from pynetdicom._globals import MODE_ACCEPTOR

from node.ingest.association import PolledAssociationSocket, QuietAssociation
from node.ingest.fdwait import wait_ready
from node.ingest.reactor import PDU_FIRST_BUFFER
from tests.support.peers import wait_until


class _Wrapper:
    """What QuietDUL reads of pynetdicom's AssociationSocket: ``socket`` and ``_is_connected``."""

    def __init__(self, sock: socket.socket) -> None:
        self.socket = sock
        self._is_connected = True


def _reader(sock: socket.socket) -> tuple[Any, list[bytes], threading.Thread]:
    assoc = QuietAssociation(AE(ae_title="SRNODE"), MODE_ACCEPTOR)
    assoc.acceptor.maximum_length = 262144
    dul = assoc.dul
    dul.socket = _Wrapper(sock)
    got: list[bytes] = []

    def decode(pdu: bytearray) -> tuple[object, str]:
        got.append(bytes(pdu))
        return object(), "Evt6"

    dul._decode_pdu = decode
    t = threading.Thread(target=dul._read_pdu_data, daemon=True)
    t.start()
    return dul, got, t


def test_a_header_announcing_1_mib_then_silence_does_not_allocate_1_mib() -> None:
    """400 connections each sending a 6-byte header announcing 1 MiB (then a byte now and then) grew the node by
    400 MB: the body buffer was allocated at the announced length. It starts at PDU_FIRST_BUFFER now and doubles
    only as data fills it; the PDU still arrives whole and intact."""
    ours, peer = socket.socketpair()
    dul, got, t = _reader(ours)
    try:
        body = bytes(range(256)) * ((1 << 20) // 256)
        peer.sendall(struct.pack(">BBL", 0x01, 0, len(body)) + body[:1000])
        wait_until(lambda: dul.pdu_buffer_bytes > 0, timeout=10, what="the body being read")
        assert dul.pdu_buffer_bytes <= PDU_FIRST_BUFFER
        sent = 1000
        while sent < len(body):  # in steps: the buffer stays within twice what came
            step = body[sent:sent + 100_000]
            peer.sendall(step)
            sent += len(step)
            assert dul.pdu_buffer_bytes <= max(PDU_FIRST_BUFFER, 2 * (sent + 6))
        t.join(timeout=10)
        assert not t.is_alive()
        assert dul.event_queue.get_nowait() == "Evt6"
        assert got == [struct.pack(">BBL", 0x01, 0, len(body)) + body]
        assert dul.pdu_buffer_bytes == 0
    finally:
        dul._kill_thread = True
        peer.close()
        ours.close()


def test_a_peer_closing_mid_body_is_evt17() -> None:
    ours, peer = socket.socketpair()
    dul, got, t = _reader(ours)
    try:
        peer.sendall(struct.pack(">BBL", 0x04, 0, 200_000) + b"\0" * 150_000)
        peer.close()
        t.join(timeout=10)
        assert not t.is_alive()
        assert dul.event_queue.get_nowait() == "Evt17"
        assert got == []
    finally:
        dul._kill_thread = True
        ours.close()


def test_wait_ready_works_above_fd_1024() -> None:
    """select.select raises ValueError for descriptors >= 1024 (FD_SETSIZE), which pynetdicom's
    ``AssociationSocket.ready`` took for a closed connection (every new association aborted once ~340 were
    open); the node's waits and its acceptor sockets use poll."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < 1100:
        pytest.skip(f"the descriptor limit ({hard}) is below 1100")
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, 1100), hard))
    a, b = socket.socketpair()
    try:
        high = socket.socket(fileno=fcntl.fcntl(a.fileno(), fcntl.F_DUPFD, 1024))
        assert high.fileno() >= 1024
        assert wait_ready([high], 0) == []
        b.sendall(b"x")
        assert wait_ready([high], 5) == [high]
        assert wait_ready([high], 0, write=True) == [high]
        assoc = QuietAssociation(AE(ae_title="SRNODE"), MODE_ACCEPTOR)
        polled = PolledAssociationSocket(assoc, client_socket=high)
        assert polled.ready
        assert high.recv(1) == b"x"
        assert not polled.ready
        assert "Evt17" not in list(assoc.dul.event_queue.queue)  # the connection is not taken for closed
        high.close()
    finally:
        a.close()
        b.close()
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))

