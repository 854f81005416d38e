"""Logging of the ``srnode`` commands: one stderr handler, third-party chatter lowered and bounded (a peer cannot
make the libraries flood the log: :class:`FloodFilter`), secrets redacted, patient data kept out.

Patient data: the node's own messages name UIDs, never patient or study values (``node.phi``). What other code
says is filtered here: every record of a third-party logger (pydicom, highdicom, pynetdicom, uvicorn, ...) and
every Python warning (``logging.captureWarnings``: pydicom warns with the offending value, ``Invalid value for VR
DA: '...'``) has its quoted values masked, and so do the message lines of every logged traceback. Uncaught
exceptions in any thread are logged through the same handler instead of printed raw to stderr.
"""

from __future__ import annotations

import logging
import sys
import threading
import time
from collections.abc import Callable
from types import TracebackType

from node.phi import mask_quoted, mask_traceback
from node.send.peer_log import install as quiet_outgoing

# loggers whose messages are the node's own (they name UIDs and reasons, never values of patient attributes)
OWN_LOGGERS = frozenset({"node", "models", "srnode", "__main__"})


class _RedactFilter(logging.Filter):
    """Last line of defence: never let a record carry a configured secret."""

    def __init__(self) -> None:
        super().__init__()
        self.secrets: set[str] = set()

    def filter(self, record: logging.LogRecord) -> bool:
        """Replace every secret in the formatted message by ``***``; never drops a record."""
        if self.secrets:
            msg = record.getMessage()
            for s in self.secrets:
                if s and s in msg:
                    msg = msg.replace(s, "***")
            record.msg, record.args = msg, None
        return True


class PhiFilter(logging.Filter):
    """Masks quoted values in third-party records (and Python warnings) and in every logged traceback."""

    _formatter = logging.Formatter()

    def filter(self, record: logging.LogRecord) -> bool:
        if record.name.split(".", 1)[0] not in OWN_LOGGERS:
            record.msg, record.args = mask_quoted(record.getMessage()), None
        if record.exc_info and not record.exc_text:
            record.exc_text = mask_traceback(self._formatter.formatException(record.exc_info))
        if record.stack_info:
            record.stack_info = mask_traceback(record.stack_info)
        return True


class _AnsweredElsewhere(logging.Filter):
    """Drops pynetdicom's ERROR "No accepted presentation contexts": the node asks peers what they support (a
    Storage Commitment or C-FIND probe a plain storescp refuses) and says the outcome itself, in its own words
    (``node.send``: "peer supports neither storage commitment nor C-FIND", "refused SOP class ..."); an ERROR
    line for an expected answer alarms an operator for nothing."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.getMessage() != "No accepted presentation contexts"


MAX_FLOOD_KEYS = 10_000  # (logger, message) counts FloodFilter keeps at most (then forgets the messages')


class FloodFilter(logging.Filter):
    """Bounds what third-party loggers (pynetdicom, pydicom and its warnings, uvicorn, ...) write, whatever a peer
    makes them say: at most ``per_message`` records of one message (its text as the handler writes it, quoted
    values already masked by :class:`PhiFilter`, so "Invalid value for VR UI: '***'" is one message whatever the
    UID) and ``per_logger`` records of one logger in ``window_s`` seconds. The record that reaches a bound is
    written with a note that more like it are suppressed; the first one written after its window names how many
    were dropped. The node's own loggers (``OWN_LOGGERS``) are not bounded: they write one line per event.

    One A-ASSOCIATE-RQ of 128 presentation contexts proposing 100 invalid transfer syntax UIDs each (878 KB) made
    pynetdicom and pydicom write ~77,000 WARNING lines (11 MB), again on every association."""

    def __init__(self, per_message: int = 10, per_logger: int = 100, window_s: float = 60.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        super().__init__()
        self.per_message, self.per_logger, self.window_s, self.clock = per_message, per_logger, window_s, clock
        self._counts: dict[tuple[str, str], list[float]] = {}  # (logger, message or "") -> [window start, count]
        self._lock = threading.Lock()

    def filter(self, record: logging.LogRecord) -> bool:
        """False to drop ``record``; may add a note to its message (then its args are consumed)."""
        if record.name.split(".", 1)[0] in OWN_LOGGERS:
            return True
        message = record.getMessage()
        now = self.clock()
        with self._lock:
            if len(self._counts) > MAX_FLOOD_KEYS:  # many different messages: forget the windows that ended and,
                # when that is not enough, every message's count (the per-logger bounds still hold): only pruning
                # rebuilt the whole table on every record while a peer's values made each message new (pydicom's
                # "The value length (N) exceeds ..." for each N): 40,000 such records took 66 s of CPU, the lock held
                self._counts = {k: v for k, v in self._counts.items() if now - v[0] < self.window_s}
                if len(self._counts) > MAX_FLOOD_KEYS // 2:
                    self._counts = {k: v for k, v in self._counts.items() if not k[1]}
            notes: list[str] = []
            counts = [self._count((record.name, ""), self.per_logger, now, "from this logger", notes),
                      self._count((record.name, message), self.per_message, now, "like this one", notes)]
        (logger_n, logger_bound), (message_n, message_bound) = counts
        if logger_n > logger_bound + 1 or message_n > message_bound + 1:
            return False
        if logger_n == logger_bound + 1:
            notes.append(f"more messages from this logger are suppressed for up to {self.window_s:g} s (log flood)")
        elif message_n == message_bound + 1:
            notes.append(f"more messages like this one are suppressed for up to {self.window_s:g} s (log flood)")
        if notes:
            record.msg, record.args = f"{message} [{'; '.join(notes)}]", None
        return True

    def _count(self, key: tuple[str, str], bound: int, now: float, what: str, notes: list[str]) -> tuple[int, int]:
        """One more record under ``key`` (its window restarted when over); (its count in the window, ``bound``).
        A restarted window that dropped records adds a note saying how many."""
        entry = self._counts.get(key)
        if entry is None or now - entry[0] >= self.window_s:
            if entry is not None and entry[1] > bound + 1:
                notes.append(f"{int(entry[1]) - bound - 1} more message(s) {what} were suppressed in the previous "
                             f"{self.window_s:g} s")
            entry = self._counts[key] = [now, 0.0]
        entry[1] += 1
        return int(entry[1]), bound


REDACT = _RedactFilter()  # the one filter on the stderr handler; the service adds the configured secrets
PHI = PhiFilter()
FLOOD = FloodFilter()


def _log_uncaught(kind: type[BaseException], exc: BaseException, tb: TracebackType | None,
                  where: str = "") -> None:
    if issubclass(kind, KeyboardInterrupt):
        sys.__excepthook__(kind, exc, tb)
        return
    logging.getLogger("srnode").error("%s", f"Exception in thread {where} (uncaught)" if where else
                                      "Uncaught exception", exc_info=(kind, exc, tb))


def _log_thread_uncaught(args: threading.ExceptHookArgs) -> None:
    if args.exc_value is None:
        return
    _log_uncaught(args.exc_type, args.exc_value, args.exc_traceback, args.thread.name if args.thread else "")


def setup_logging(level: str = "INFO") -> None:
    """Replace the root logger's handlers by one stderr handler (with ``REDACT``) at ``level``; pynetdicom and
    httpx at WARNING. ValueError for an unknown level name."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)-7s %(name)s: %(message)s"))
    handler.addFilter(PHI)
    handler.addFilter(FLOOD)  # after PHI: a message's masked text is its identity
    handler.addFilter(REDACT)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # warnings (pydicom's carry the values they complain about) go through the handler and its filters
    logging.captureWarnings(True)
    sys.excepthook = _log_uncaught
    threading.excepthook = _log_thread_uncaught
    # pynetdicom is chatty at INFO and logs identifiers from datasets at DEBUG
    logging.getLogger("pynetdicom").setLevel(logging.WARNING)
    acse = logging.getLogger("pynetdicom.acse")
    if not any(isinstance(f, _AnsweredElsewhere) for f in acse.filters):
        acse.addFilter(_AnsweredElsewhere())
    # pynetdicom's records about the node's own outgoing associations: the sender says the outcome (ops19)
    quiet_outgoing()
    # httpx logs every request (URLs with UIDs) at INFO
    logging.getLogger("httpx").setLevel(logging.WARNING)
    # highdicom logs ~10 INFO lines per derived object ('copy attributes of module "..."'), which the
    # redaction turns into '"***"': noise that reads like a glitch to an operator
    logging.getLogger("highdicom").setLevel(logging.WARNING)
