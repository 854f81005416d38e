"""The node's stderr log: pynetdicom's ERROR for an expected answer (a peer accepting no presentation context
of a probe) is dropped, its other errors kept (newuser13: two ERROR lines per delivery to a plain storescp)."""

from __future__ import annotations

import logging
import subprocess
import sys

from node.app.logs import FloodFilter

SCRIPT = """
import logging
from node.app.logs import setup_logging
setup_logging("INFO")
setup_logging("INFO")  # twice, as a test process may: one filter
acse = logging.getLogger("pynetdicom.acse")
acse.error("No accepted presentation contexts")
acse.error("Association Rejected")
from node.send.peer_log import FILTER
print(sum(type(f).__name__ == "_AnsweredElsewhere" for f in acse.filters), acse.filters.count(FILTER))
"""


def test_an_expected_pynetdicom_error_is_not_logged() -> None:
    r = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert "No accepted presentation contexts" not in r.stderr
    assert "Association Rejected" in r.stderr and r.stdout.strip() == "1 1"  # one of each (ops19: outgoing)


def _record(name: str, msg: str) -> object:
    import logging

    return logging.LogRecord(name, logging.WARNING, __file__, 1, msg, None, None)


def test_a_third_party_message_repeated_is_bounded_and_the_count_said() -> None:
    """hostile16: a peer's A-ASSOCIATE-RQ made pynetdicom and pydicom write ~77,000 lines. Per minute: 10 copies
    of one message, then one with a note, then none; the first after the window names how many were dropped; the
    node's own loggers are never bounded; a logger saying ever-different things stops at 100 (+1 with a note)."""
    from node.app.logs import FloodFilter

    now = [0.0]
    flood = FloodFilter(per_message=10, per_logger=100, window_s=60.0, clock=lambda: now[0])
    kept = [r for r in (_record("pydicom", "Invalid value for VR UI: '***'") for _ in range(1000))
            if flood.filter(r)]  # type: ignore[arg-type]
    assert len(kept) == 11 and "are suppressed for up to 60 s (log flood)" in kept[-1].getMessage()  # type: ignore[attr-defined]
    assert all(flood.filter(_record("node.ingest.scp", "association from X rejected")) for _ in range(500))  # type: ignore[arg-type]
    now[0] = 61.0
    after = _record("pydicom", "Invalid value for VR UI: '***'")
    assert flood.filter(after)  # type: ignore[arg-type]
    assert "989 more message(s) like this one were suppressed in the previous 60 s" in after.getMessage()  # type: ignore[attr-defined]
    varied = [r for r in (_record("pynetdicom.utils", f"value {i}") for i in range(1000)) if flood.filter(r)]  # type: ignore[arg-type]
    assert len(varied) == 101 and "from this logger are suppressed" in varied[-1].getMessage()  # type: ignore[attr-defined]


def test_the_flood_filter_stays_bounded_when_every_message_is_new() -> None:
    """A peer decides part of a third-party message (pydicom's "The value length (N) exceeds the maximum length
    of 16 allowed for VR CS." for a Modality of N bytes, N as the peer likes): every record a new message. The
    filter's table grew by one per record and, past 10,000, was rebuilt whole on each (40,000 records: 66 s of
    CPU under its lock, holding every library thread that logs). Now it forgets the messages' counts once it is
    full; the per-logger bound still drops all but 101 a window (break16b, review of hostile16)."""
    clock = [0.0]
    flood = FloodFilter(clock=lambda: clock[0])
    written = 0
    for n in range(17, 17 + 30_000):
        record = logging.LogRecord("pydicom", logging.WARNING, __file__, 1, "The value length (%d) exceeds the "
                                   "maximum length of 16 allowed for VR CS.", (n,), None)
        written += flood.filter(record)
        assert len(flood._counts) <= 10_001, n  # node.app.logs.MAX_FLOOD_KEYS + the one just counted
    assert written == 101
