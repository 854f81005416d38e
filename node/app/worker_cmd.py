"""``srnode worker --config FILE``: a Celery GPU worker ([executor].kind = "celery"); one per GPU.

It opens its job context (spool, index, engines) once, binds it into the Celery task and serves the queue one job
at a time (see ``node.jobs.celery_executor`` for acknowledgement and redelivery).
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import socket
import time
from dataclasses import replace as dc_replace
from pathlib import Path

from node.config import Config, DataAccess, Device, ExecutorKind, load_config
from node.errors import NodeError
from node.jobs import JobContext
from node.jobs.celery_executor import broker_display, make_app

log = logging.getLogger(__name__)


def configure(parser: argparse.ArgumentParser) -> None:
    """Add ``srnode worker`` options to ``parser``."""
    parser.add_argument("--config", required=True, help="config.toml ([executor] kind = 'celery')")
    parser.add_argument("--name", default="", help="worker name (default srnode-<pid>@<host>); one per GPU")
    parser.add_argument("--pool", choices=("prefork", "solo"), default="prefork",
                        help="prefork (default): a dying job process is re-queued at once; solo: no child")
    parser.add_argument("--device", default="", choices=["", *(d.value for d in Device)],
                        help="override [engine].device for this worker (auto, cpu, cuda)")


def _preload(ctx: JobContext, pool: str) -> None:
    """Build the engines before the pool forks, where safe, so the first job starts warm.

    Engines are built here only on the CPU or with the solo pool: CUDA must not be initialised before a fork.
    """
    t0 = time.monotonic()
    cfg = ctx.cfg
    if pool == "solo" or cfg.engine.options.device == Device.CPU:
        for name in sorted({cfg.engine.name, *(r.engine for r in cfg.rules if r.engine)}):
            try:
                ctx.engines.get(name, cfg.engine.options)
            except NodeError as exc:
                log.warning("engine %s could not be loaded (jobs will fall back to cubic): %s", name, exc)
    log.info("worker: pipeline loaded in %.1f s", time.monotonic() - t0)


def scratch_spool(cfg: Config, name: str) -> Config:
    """``cfg`` with the worker's own scratch spool, ``<spool_dir>/workers/<name>`` (``data_access = "dicomweb"``):
    worker instances started with one config (the systemd template, one per GPU) must not share one, or a worker
    that cleans up its delivered series removes the files another is still deriving from."""
    safe = re.sub(r"[^A-Za-z0-9._@-]", "_", name) or "worker"
    spool = Path(cfg.node.spool_dir) / "workers" / safe
    return dc_replace(cfg, node=dc_replace(cfg.node, spool_dir=str(spool)))


def run(args: argparse.Namespace) -> int:
    """Run ``srnode worker`` until Celery stops it; returns its exit code. Raises ConfigError, SpoolError."""
    cfg = load_config(args.config)
    if cfg.executor.kind != ExecutorKind.CELERY:
        log.warning("%s: executor.kind is %r; the worker serves Celery jobs anyway", args.config,
                    cfg.executor.kind.value)
    if args.device:
        options = dc_replace(cfg.engine.options, device=Device(args.device))
        cfg = dc_replace(cfg, engine=dc_replace(cfg.engine, options=options))
    logging.getLogger().setLevel(args.log_level.upper() if args.log_level else cfg.node.log_level.upper())
    name = args.name or f"srnode-{os.getpid()}@{socket.gethostname()}"
    if cfg.executor.data_access == DataAccess.DICOMWEB:
        cfg = scratch_spool(cfg, name)
    ctx = JobContext.open(cfg)
    _preload(ctx, args.pool)
    app = make_app(cfg, worker=ctx)
    log.info("srnode worker %s: broker %s, queue %r, pool %s, data access %s (spool %s), engine %s on %s",
             name, broker_display(cfg.executor.broker_url), cfg.executor.queue, args.pool,
             cfg.executor.data_access, cfg.node.spool_dir, cfg.engine.name, cfg.engine.options.device)
    worker = app.Worker(
        hostname=name,
        pool_cls=args.pool,
        concurrency=1,
        queues=[cfg.executor.queue],
        loglevel=logging.getLevelName(logging.getLogger().level),
        without_gossip=True,
        without_mingle=True,
        without_heartbeat=True,
        optimization="fair",
        quiet=True,
    )
    worker.start()
    return int(worker.exitcode or 0)
