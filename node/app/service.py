"""``srnode serve --config FILE``: the running node.

Starts, in order: the spool and index (re-reading them: every page of the index is checked, a damaged one stops
the start with one line saying what to do; instance files the index does not list are re-indexed -- the spool
files are the truth; jobs left 'processing' by a crash are re-queued), the executor, the stability watcher, the
outbox, the DICOM SCP and the HTTP API (``node.app.http.start_http(ctx)``, when [http].enabled). SIGTERM or SIGINT stops gracefully: new associations are refused, the stores in
flight finish, then the threads stop; whatever is unfinished stays in the index for the next start.
"""

from __future__ import annotations

import argparse
import json
import logging
import resource
import signal
import socket
import ssl
import threading
from types import FrameType

from node.app.context import NodeContext
from node.app.http import HttpHandle, check_exposure, start_http
from node.app.logs import REDACT
from node.config import Config, ExecutorKind, load_config, secret_values
from node.errors import ConfigError, listen_problem
from node.ingest import Admission, StoreSCP, reindex_spool
from node.jobs import JobContext, StabilityWatcher, make_executor
from node.process import series_budget_mb
from node.send import Outbox
from node.store import DeliveryState, prune

log = logging.getLogger(__name__)


MAX_OPEN_FILES = 1 << 20  # the soft limit of open files is raised to the hard one, at most this


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", default=None, help="config.toml (default: the embedded defaults)")


class Node:
    """The node's components, started and stopped in order."""

    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        jobs = JobContext.open(cfg, check=True)
        spool, index, metrics = jobs.store.spool, jobs.store.index, jobs.metrics
        self.ctx = NodeContext(jobs=jobs, executor=make_executor(jobs),
                               admission=Admission(cfg, spool, index, metrics, jobs.audit))
        self.watcher = StabilityWatcher(cfg, index, self.ctx.executor.submit, metrics, jobs.audit)
        self.outbox = Outbox(cfg, index, metrics, jobs.audit)
        self.scp = StoreSCP(cfg, self.ctx.admission, metrics, jobs.audit, on_release=self.watcher.hint,
                            on_report=self.outbox.confirm.on_report)
        self.http: HttpHandle | None = None
        self._spool_lock: int | None = None  # the spool's lock while serving (Spool.lock)
        self._pruner: threading.Thread | None = None
        self._stop_pruning = threading.Event()

    def start(self) -> None:
        """Start every component; raises ConfigError before anything starts when ``[http]`` would serve
        patient data to the network without a token (``check_exposure``), or ``[node.tls]`` names files that are
        no usable certificate, key or CA (``check_tls_files``)."""
        if self.cfg.http.enabled:
            check_exposure(self.cfg.http)
        check_tls_files(self.cfg)
        ctx = self.ctx
        self._spool_lock = ctx.spool.lock()  # one serving node per spool, before the spool is touched
        leftovers = ctx.spool.clean_incoming()
        found = reindex_spool(ctx.spool, ctx.index)
        if found.added:
            log.warning("spool %s: %d instance file(s) of %d series were not in the index %s (deleted, emptied or "
                        "restored from an older copy?): re-indexed from the spool; those series are processed "
                        "again", ctx.spool.root, found.added, len(found.series), ctx.spool.index_path)
            ctx.audit.write("spool-reindexed", spool=str(ctx.spool.root), instances=found.added,
                            series=len(found.series), skipped=len(found.skipped))
        # in-process: nothing can still be running after a restart; Celery: workers may be (see requeue_interrupted)
        inprocess = self.cfg.executor.kind == ExecutorKind.INPROCESS
        max_attempts = self.cfg.node.max_job_attempts
        max_interrupted = self.cfg.node.max_interrupted_runs
        poisoned = ctx.index.poison_candidates(max_attempts, max_interrupted) if inprocess else []
        queued = ctx.index.requeue_interrupted(processing=inprocess, max_attempts=max_attempts,
                                               max_interrupted=max_interrupted)
        for job in poisoned:  # their runs killed the node max_job_attempts times: failed, never run again
            reason = ctx.index.job(job.id).reason
            log.error("job %d (series %s): failed as poison: %s", job.id, job.series_uid, reason)
            ctx.metrics.series_processed.labels(outcome="failed").inc()
            ctx.metrics.failures.labels(where="job", reason="poison").inc()
            ctx.audit.write("job-failed", job=job.id, series=job.series_uid, reason=reason)
        budget, how = series_budget_mb(self.cfg.node.max_series_memory_mb)
        log.info("series memory budget %d MB (%s); a job is failed as poison after %d run(s) that stopped the node, "
                 "or %d a stop of the node interrupted", budget, how, max_attempts, max_interrupted)
        to_send = len(ctx.index.deliveries(states=(DeliveryState.PENDING,)))
        awaiting = len(ctx.index.deliveries(states=(DeliveryState.SENT,)))
        partial = [n for n in leftovers if not n.endswith("/")]
        log.info("spool %s: %d instances indexed, %d job(s) queued, %d delivery(ies) resumed (%d to send, %d awaiting "
                 "confirmation: asked again), %d partial file(s) removed", ctx.spool.root, ctx.index.count_instances(),
                 len(queued), to_send + awaiting, to_send, awaiting, len(partial))
        if leftovers:
            log.info("spool incoming/: removed %s (a file: a data set whose transfer was cut; a folder: a library's "
                     "scratch left while the SCP pointed tempfile at incoming/)", ", ".join(leftovers[:10])
                     + (f" and {len(leftovers) - 10} more" if len(leftovers) > 10 else ""))
        ctx.executor.start()
        self.watcher.start()  # submits the queued jobs on its first tick
        # the outbox's first pass asks again for the confirmations a stopped node left awaiting, before it sends
        # anything (a delivery it sends itself is never asked twice), and only once the SCP that takes the Storage
        # Commitment reports listens (before ops19 the outbox started first: a pending delivery sent at once was
        # asked again by the resume that followed, two N-ACTIONs 70 ms apart)
        self.outbox.resume()
        self.scp.start()
        self.outbox.start()
        if self.cfg.node.retention_days > 0:
            self._pruner = threading.Thread(target=self._prune_loop, name="pruner", daemon=True)
            self._pruner.start()
        if self.cfg.http.enabled:
            self.http = start_http(ctx)
        else:
            log.info("HTTP API disabled ([http].enabled = false)")
        ctx.audit.write("node-started", ae_title=self.cfg.node.ae_title, port=self.cfg.node.port,
                        queued_jobs=len(queued))

    def _prune_loop(self) -> None:
        """Every ``[node] prune_interval_s`` (the first that long after the start): prune the spool
        (``node.store.prune``), one log line per series pruned (UIDs, MB freed). A failure is logged and tried
        again at the next interval; the thread never stops the node."""
        ctx, days = self.ctx, self.cfg.node.retention_days
        while not self._stop_pruning.wait(self.cfg.node.prune_interval_s):
            try:
                result = prune(ctx.spool, ctx.index, days)
            except Exception as exc:  # noqa: BLE001 - logged; the next interval tries again
                log.error("prune: %s (tried again in %g s)", exc, self.cfg.node.prune_interval_s)
                continue
            for p in result.series:
                log.info("prune: %s", p.line(dry_run=False))
            if result.series:
                ctx.audit.write("spool-pruned", series=len(result.series),
                                mb=round(sum(p.mb for p in result.series), 1), errors=len(result.errors))

    def stop(self, refused: bool = False) -> None:
        """Stop every component (those not started do nothing). ``refused``: after a start that failed: its
        progress is logged at DEBUG only, so that the refusal's one error line is what the user sees."""
        say = log.debug if refused else log.info
        say("stopping: refusing new associations, finishing the stores in flight")
        self.ctx.stopping.set()
        self._stop_pruning.set()
        self.scp.stop()
        if self.http is not None:
            try:
                self.http.stop()
            except Exception as exc:  # noqa: BLE001 - stopping anyway
                log.warning("HTTP API did not stop cleanly: %s", exc)
        self.watcher.stop()
        self.outbox.stop()
        if self._pruner is not None:
            self._pruner.join(timeout=60)  # a prune under way finishes its series (a kill leaves no half state)
        self.ctx.executor.stop()
        self.ctx.audit.write("node-stopped", ae_title=self.cfg.node.ae_title)
        if self._spool_lock is not None:
            self.ctx.spool.unlock(self._spool_lock)
            self._spool_lock = None
        say("stopped")


def check_ports(cfg: Config) -> None:
    """ConfigError in words (``listen_problem``) when the DICOM port, or the HTTP port when enabled (not 0), cannot
    be bound now: checked before the spool is opened (a refused `serve` left a new, empty spool_dir behind, and
    logged its components starting and stopping before the error). A probe: the real bind comes later."""
    ports = [("DICOM port", "node", cfg.node.host, cfg.node.port)]
    if cfg.http.enabled and cfg.http.port:
        ports.append(("HTTP port", "http", cfg.http.host, cfg.http.port))
    for what, section, host, port in ports:
        try:
            family, kind, proto, _name, addr = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
            with socket.socket(family, kind, proto) as probe:
                probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the servers bind
                probe.bind(addr)
        except OSError as exc:
            raise ConfigError(listen_problem(what, section, host, port, exc)) from exc


def check_tls_files(cfg: Config) -> None:
    """ConfigError naming the ``[node.tls]`` key and file when TLS is on and its cert, key or ca cannot be read
    or is no certificate / key / CA bundle. The SCP loads them only when it binds its port, so these errors came
    out as "DICOM port host:port ([node] host, port): cannot listen: No such file or directory", after the
    executor and the outbox had started."""
    t = cfg.node.tls
    if not t.enabled:
        return
    for key, path in (("cert", t.cert), ("key", t.key), ("ca", t.ca)):
        if not path:
            continue
        try:
            with open(path, "rb") as fh:
                fh.read(1)
        except OSError as exc:
            raise ConfigError(f"node.tls.{key}: {path}: {exc.strerror or exc}") from exc
    try:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(certfile=t.cert, keyfile=t.key)
    except (ssl.SSLError, OSError, ValueError) as exc:
        raise ConfigError(f"node.tls.cert / node.tls.key: {t.cert} and {t.key} are not a certificate (PEM) and its "
                          f"private key: {' '.join(str(exc).split())}") from exc
    if t.ca:
        try:
            ctx.load_verify_locations(cafile=t.ca)
        except (ssl.SSLError, OSError, ValueError) as exc:
            raise ConfigError(f"node.tls.ca: {t.ca} is no CA bundle (PEM certificates): "
                              f"{' '.join(str(exc).split())}") from exc


def raise_open_files_limit() -> None:
    """Raise this process's soft limit of open files to its hard limit (at most ``MAX_OPEN_FILES``), with one
    INFO line when it changes; a WARNING when it cannot. Under systemd the soft limit is 1024, which 1,100 idle
    connections to the HTTP port (or any mix of peers) used up: DICOM callers then timed out. The HTTP side is
    bounded too (``[http] max_connections``); this leaves room for everything else (associations, spool files,
    the index)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = MAX_OPEN_FILES if hard == resource.RLIM_INFINITY else min(hard, MAX_OPEN_FILES)
    if soft != resource.RLIM_INFINITY and soft >= want:
        return
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
    except (ValueError, OSError) as exc:
        log.warning("open files limit %d could not be raised to %d: %s", soft, want, exc)
        return
    log.info("open files limit raised from %d to %d (the hard limit)", soft, want)


def run(args: argparse.Namespace) -> int:
    cfg = load_config(args.config)
    check_tls_files(cfg)  # before the spool and its index are opened
    check_ports(cfg)
    raise_open_files_limit()
    if not args.log_level:
        logging.getLogger().setLevel(cfg.node.log_level.upper())
    REDACT.secrets.update(_secrets(cfg))
    log.info("effective configuration (%s): %s", cfg.path or "embedded defaults",
             json.dumps(cfg.redacted(), default=str))
    node = Node(cfg)
    stop = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        log.info("signal %s received", signal.Signals(signum).name)
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    try:
        node.start()
    except BaseException:
        node.stop(refused=True)  # what did start (executor, watcher, outbox, SCP) stops before the error is reported
        raise
    log.info("srnode %s ready (DICOM %s:%d)", cfg.node.ae_title, cfg.node.host, cfg.node.port)
    while not stop.wait(1.0):
        pass
    node.stop()
    return 0


def _secrets(cfg: Config) -> set[str]:
    """The values masked in every log line: each password and token of the config (http, destinations, sources).

    URLs (broker_url, result_backend) are logged through ``broker_display``, which drops their credentials;
    masking them whole would hide the host too.
    """
    return secret_values(cfg, keys=("password", "token"))
