"""``srnode bench celery``: series per minute with 1 and 2 Celery workers on this machine (CPU, cubic engine).

For each worker count: a fresh spool gets ``--series`` generated CT series (ingested through the spool and its
index exactly as the SCP does, one job each), a private ``redis-server`` on a free loopback port, and that many
real ``srnode worker`` processes. The clock runs from the first job published to the last job processed (its
results in the outbox, state 'sending'); ingest, stability wait and delivery are the node's and not measured.

Also holds the real-process helpers the Celery tests share: ``RedisServer`` and ``WorkerProcess`` (series come
from ``node.app.phantom.write_phantom_series``).
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from node.app.phantom import write_phantom_series
from node.app.progress import bar_of
from node.bench.results import write_result
from node.config import load_config
from node.ingest import Admission, Caller
from node.jobs import JobContext
from node.jobs.celery_executor import CeleryExecutor
from node.store import JobState

log = logging.getLogger(__name__)

REDIS_SERVER = "/usr/bin/redis-server"


# ------------------------------------------------------------------------------------ real peers


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now (another process may take it before it is used)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for(cond: Callable[[], Any], timeout: float, what: str, interval: float = 0.1) -> Any:
    """Poll ``cond`` until truthy; TimeoutError naming ``what`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = cond()
        if value:
            return value
        time.sleep(interval)
    raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}")


@dataclass
class RedisServer:
    """A throw-away ``redis-server`` on a free loopback port, no persistence."""

    workdir: Path
    port: int = 0
    proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        """The broker URL, ``redis://127.0.0.1:<port>/0``."""
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> RedisServer:
        """Start it (log in ``workdir/redis.log``) and wait until it answers PING; RuntimeError when it exits,
        TimeoutError after 20 s."""
        import redis

        self.workdir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        logf = (self.workdir / "redis.log").open("wb")
        self.proc = subprocess.Popen(
            [REDIS_SERVER, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
             "--dir", str(self.workdir), "--protected-mode", "yes"],
            stdout=logf, stderr=subprocess.STDOUT)

        def up() -> bool:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise RuntimeError(f"redis-server exited with {self.proc.returncode}: "
                                   f"{(self.workdir / 'redis.log').read_text(errors='replace')[-2000:]}")
            try:
                return bool(redis.Redis(host="127.0.0.1", port=self.port, socket_timeout=1).ping())
            except redis.exceptions.ConnectionError:
                return False

        wait_for(up, 20, "redis-server to answer PING")
        return self

    def stop(self) -> None:
        """SIGTERM, SIGKILL after 10 s."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


@dataclass
class WorkerProcess:
    """A real ``srnode worker`` process (its own session: ``kill9`` takes its pool children with it)."""

    config: Path
    name: str
    log_path: Path
    pool: str = "prefork"
    env: dict[str, str] = field(default_factory=dict)
    proc: subprocess.Popen[bytes] | None = None
    _log: IO[bytes] | None = field(default=None, repr=False)

    def start(self, ready_timeout: float = 90.0) -> WorkerProcess:
        """Launch it and wait until it is ready (``ready_timeout`` seconds, as :meth:`wait_ready`)."""
        self.launch()
        self.wait_ready(ready_timeout)
        return self

    def launch(self) -> None:
        """Start ``srnode worker`` in a new session, output appended to ``log_path``; does not wait."""
        self._log = self.log_path.open("ab")
        env = {**os.environ, "PYTHONUNBUFFERED": "1", **self.env}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "node.app.cli", "--log-level", "INFO", "worker", "--config", str(self.config),
             "--name", self.name, "--pool", self.pool],
            stdout=self._log, stderr=subprocess.STDOUT, env=env, start_new_session=True)

    def wait_ready(self, timeout: float = 90.0) -> None:
        """Until Celery says ready (the pipeline and CPU engines are loaded before that); RuntimeError when
        the worker exits, TimeoutError after ``timeout`` seconds."""

        def ready() -> bool:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise RuntimeError(f"worker {self.name} exited with {self.proc.returncode}: {self.log()[-3000:]}")
            return " ready." in self.log()

        wait_for(ready, timeout, f"worker {self.name} to be ready")

    def log(self) -> str:
        """The worker's log so far ("" when it cannot be read)."""
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def kill9(self) -> None:
        """SIGKILL the worker and its pool children at once, as a machine that dies."""
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()

    def stop(self, timeout: float = 30.0) -> None:
        """SIGTERM (Celery's warm shutdown), SIGKILL after ``timeout``."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.kill9()
        if self._log is not None:
            self._log.close()
            self._log = None


def config_toml(spool: Path, broker_url: str, out: Path, visibility_timeout_s: int = 3600,
                extra: str = "") -> str:
    """A worker/node config for a Celery set-up on loopback with the cubic engine on CPU."""
    return f"""
[node]
spool_dir = "{spool}"
stable_age_s = 1.0
port = {free_port()}

[http]
enabled = false

[engine]
name = "cubic"
device = "cpu"

[executor]
kind = "celery"
broker_url = "{broker_url}"
visibility_timeout_s = {visibility_timeout_s}

[[destinations]]
name = "out"
kind = "folder"
path = "{out}"

[[rules]]
name = "ct"
match = {{ Modality = "^CT$" }}
through_plane_factor = 2
destinations = ["out"]
{extra}
"""


# ------------------------------------------------------------------------------------ the benchmark


def spool_series(ctx: JobContext, files: list[Path], rule: str) -> int:
    """Admit ``files`` into the spool as the SCP does, and create their job; returns its id."""
    admission = Admission(ctx.cfg, ctx.store.spool, ctx.store.index, ctx.metrics)
    series_uid = ""
    for f in files:
        series_uid = admission.admit_file(f, Caller("BENCH", via="bench")).path.parent.name
    ctx.store.index.mark_stable(series_uid, time.time() + 1)
    return ctx.store.index.create_job(series_uid, rule)


def run_once(n_workers: int, n_series: int, slices: int, size: int, workdir: Path) -> dict[str, Any]:
    """One measurement: ``n_series`` phantom series (``slices`` x ``size``²) spooled as jobs, ``n_workers``
    workers, the clock from the first publish until every job is past processing. Returns the figures
    (seconds, series per minute, jobs per worker, failures, load average); TimeoutError after 60 s + 60 s
    per series."""
    workdir.mkdir(parents=True, exist_ok=True)
    redis_srv = RedisServer(workdir / "redis").start()
    workers: list[WorkerProcess] = []
    try:
        cfg_path = workdir / "config.toml"
        spool_dir = workdir / "spool"
        cfg_path.write_text(config_toml(spool_dir, redis_srv.url, workdir / "out"))
        cfg = load_config(cfg_path)
        ctx = JobContext.open(cfg)
        jobs = [spool_series(ctx, write_phantom_series(workdir / f"in-{i}", seed=100 + i, slices=slices,
                                                             size=size), "ct") for i in range(n_series)]
        # CPU workers share the cores: each gets its share of threads, as GPU workers each get their GPU
        threads = str(max(1, (os.cpu_count() or 1) // n_workers))
        workers = [WorkerProcess(cfg_path, f"bench{w}@{socket.gethostname()}", workdir / f"worker{w}.log",
                                 env={"OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads})
                   for w in range(n_workers)]
        for wp in workers:
            wp.launch()
        for wp in workers:
            wp.wait_ready()
        # workers load the pipeline and engine before they say ready: no cold first job in the clock
        index = ctx.store.index
        ex = CeleryExecutor(ctx)
        ex.start()
        load_before = os.getloadavg()[0]
        t0 = time.monotonic()
        for j in jobs:
            ex.submit(j)

        def done() -> bool:
            states = [index.job(j).state for j in jobs]
            return all(s in (JobState.SENDING, JobState.DELIVERED, JobState.FAILED, JobState.DEAD_LETTER) for s in states)

        wait_for(done, 60.0 + 60.0 * n_series, f"{n_series} jobs processed by {n_workers} worker(s)", 0.05)
        elapsed = time.monotonic() - t0
        ex.stop()
        states = [index.job(j).state for j in jobs]
        for wp in workers:
            wp.stop()  # (its last log line may follow the job's state change)
        per_worker = {w.name: w.log().count(": finished on ") for w in workers}
        return {"workers": n_workers, "series": n_series, "slices": slices, "matrix": size,
                "elapsed_s": round(elapsed, 2), "series_per_minute": round(60.0 * n_series / elapsed, 2),
                "jobs_by_worker": per_worker, "failed": sum(s is JobState.FAILED for s in states),
                "torch_threads_per_worker": int(threads),
                "load_avg_1min_before_after": [round(load_before, 2), round(os.getloadavg()[0], 2)]}
    finally:
        for wp in workers:
            wp.stop()
        redis_srv.stop()


def configure(parser: argparse.ArgumentParser) -> None:
    """Add ``srnode bench celery`` options to ``parser``."""
    parser.add_argument("--series", type=int, default=8, help="series per run (default 8)")
    parser.add_argument("--slices", type=int, default=40, help="slices per series (default 40)")
    parser.add_argument("--size", type=int, default=256, help="matrix (default 256)")
    parser.add_argument("--workers", default="1,2", help="worker counts to run (default 1,2)")
    parser.add_argument("--keep", action="store_true", help="keep the work folder")


def run(args: argparse.Namespace) -> int:
    """Run ``srnode bench celery``; returns the exit code (1 when a job failed)."""
    root = Path(tempfile.mkdtemp(prefix="srnode-bench-celery-"))
    results = []
    try:
        counts = [int(v) for v in str(args.workers).split(",") if v]
        bar = bar_of(args)
        for n in counts:
            bar.stage(f"{n} worker(s)", len(counts))
            r = run_once(n, args.series, args.slices, args.size, root / f"w{n}")
            results.append(r)
            print(f"celery, {n} worker(s), CPU, cubic: {r['series']} series of {r['slices']}x{r['matrix']}^2 in "
                  f"{r['elapsed_s']} s = {r['series_per_minute']} series/min; jobs by worker {r['jobs_by_worker']}; "
                  f"load avg before/after {r['load_avg_1min_before_after']}")
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
    figures = {"runs": results, "cpu_count": os.cpu_count(), "device": "cpu", "engine": "cubic",
               "note": "clock: first job published -> last job's results in the outbox; GPU figure not taken here"}
    out = write_result("celery", figures)
    print(f"written {out}")
    return 1 if any(r["failed"] for r in results) else 0
