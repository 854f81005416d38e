"""The closed sets of states kept in the index. The values are the strings stored in SQLite (unchanged since the
first spool format, so existing spools keep working); a ``StrEnum`` member compares equal to its string.

- series: receiving → stable → queued → processing → sending → delivered | failed | ignored | dead-letter; a late
  instance puts a series back to receiving, and the next stable point makes a job that supersedes the earlier one.
  delivered | ignored → pruned (``[node] retention_days`` after, node.store.prune); a resend → receiving again.
- jobs: queued → processing → sending → delivered | failed | dead-letter; ignored (no rule took the series);
  superseded (a later job of the same series replaced it before it ran, or its series moved on -- late instances,
  a later job -- before its results were enqueued: they are never sent).
- deliveries (the outbox, one row per job and destination): pending → [sent →] delivered | unconfirmed |
  dead-letter. 'sent': the files were accepted and the destination's confirmation (a Storage Commitment report)
  is awaited; 'unconfirmed': accepted, but the destination offers no way to confirm it (``node.send.confirm``);
  a confirmation that finds fewer instances than were sent puts the delivery back to pending (or dead-letter).
"""

from __future__ import annotations

from enum import StrEnum


class JobState(StrEnum):
    """The state of a job (the ``jobs.state`` column)."""

    QUEUED = "queued"
    PROCESSING = "processing"
    SENDING = "sending"
    DELIVERED = "delivered"
    FAILED = "failed"
    DEAD_LETTER = "dead-letter"
    IGNORED = "ignored"
    SUPERSEDED = "superseded"


class SeriesState(StrEnum):
    """The state of a series (the ``series.state`` column)."""

    RECEIVING = "receiving"
    STABLE = "stable"
    QUEUED = "queued"
    PROCESSING = "processing"
    SENDING = "sending"
    DELIVERED = "delivered"
    FAILED = "failed"
    DEAD_LETTER = "dead-letter"
    IGNORED = "ignored"
    PRUNED = "pruned"  # retention removed its received instances and its results' pixels (node.store.prune)


class DeliveryState(StrEnum):
    """The state of a delivery (the ``deliveries.state`` column)."""

    PENDING = "pending"
    SENT = "sent"  # accepted by the destination, its confirmation awaited
    DELIVERED = "delivered"
    UNCONFIRMED = "unconfirmed"  # accepted by a destination that can confirm nothing
    DEAD_LETTER = "dead-letter"


# how every reason saying that results were not sent to a destination, and never will be by this job, begins: a
# delivery whose results a later job replaced before they went (dead-letter), a rejection note not sent where the
# results it retires never had a delivery (the job's report ``rejection_notes``)
NOT_SENT = "not sent: "

# a job in one of these states will not change again by itself
JOB_DONE_STATES = (JobState.DELIVERED, JobState.FAILED, JobState.DEAD_LETTER, JobState.IGNORED,
                   JobState.SUPERSEDED)


def series_state_of(job: JobState) -> SeriesState | None:
    """The series state that mirrors a job state (a series follows its current job); None for superseded, which
    only an earlier job of the series can be."""
    try:
        return SeriesState(job.value)
    except ValueError:
        return None
