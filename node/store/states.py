"""The closed sets of states kept in the index. The values are the strings stored in SQLite (unchanged since the
first spool format, so existing spools keep working); a ``StrEnum`` member compares equal to its string.

- series: receiving → stable → queued → processing → sending → delivered | failed | ignored | dead-letter; a late
  instance puts a series back to receiving, and the next stable point makes a job that supersedes the earlier one.
- jobs: queued → processing → sending → delivered | failed | dead-letter; ignored (no rule took the series);
  superseded (a later job of the same series replaced it before it ran).
- deliveries (the outbox, one row per job and destination): pending → delivered | dead-letter.
"""

from __future__ import annotations

from enum import StrEnum


class JobState(StrEnum):
    QUEUED = "queued"
    PROCESSING = "processing"
    SENDING = "sending"
    DELIVERED = "delivered"
    FAILED = "failed"
    DEAD_LETTER = "dead-letter"
    IGNORED = "ignored"
    SUPERSEDED = "superseded"


class SeriesState(StrEnum):
    RECEIVING = "receiving"
    STABLE = "stable"
    QUEUED = "queued"
    PROCESSING = "processing"
    SENDING = "sending"
    DELIVERED = "delivered"
    FAILED = "failed"
    DEAD_LETTER = "dead-letter"
    IGNORED = "ignored"


class DeliveryState(StrEnum):
    PENDING = "pending"
    DELIVERED = "delivered"
    DEAD_LETTER = "dead-letter"


# a job in one of these states will not change again by itself
JOB_DONE_STATES = (JobState.DELIVERED, JobState.FAILED, JobState.DEAD_LETTER, JobState.IGNORED,
                   JobState.SUPERSEDED)
