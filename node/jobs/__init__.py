"""Stage ``jobs``: from a stable series to results in the outbox.

- ``watcher``: the completeness watcher (when a series counts as complete) and job submission;
- ``decide``: which rule takes a stable series, or why none (``rules``: the matching itself);
- ``runner``: claim a job, run ``node.process`` on it, enqueue its deliveries;
- ``replay``: a job's series queued again under its rule (the dashboard's Replay; a retry of a dead letter whose
  destination is gone);
- ``executor``: where jobs run (in-process thread; ``celery_executor`` / ``celery_remote`` for scale-out);
- ``context``: ``JobContext``, what a runner needs, opened once per process.
"""

from node.jobs.context import JobContext
from node.jobs.decide import decide
from node.jobs.executor import Executor, InProcessExecutor, make_executor
from node.jobs.rules import allowed_rules, match_rule, rule_mismatch, series_header
from node.jobs.runner import process_claimed, run_job
from node.jobs.watcher import StabilityWatcher

__all__ = ["Executor", "InProcessExecutor", "JobContext", "StabilityWatcher", "allowed_rules", "decide",
           "make_executor", "match_rule", "process_claimed", "rule_mismatch", "run_job", "series_header"]
