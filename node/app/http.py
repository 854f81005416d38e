"""The node's HTTP API: one small Starlette app served by uvicorn in a thread.

Routes (``[http]`` host/port; ``token``: bearer token for everything but the probes and metrics)

- ``GET /healthz``  the process answers
- ``GET /readyz``   spool writable, every destination reachable (``Sender.check()``), engine(s) loadable; 503 if not
- ``GET /metrics``  Prometheus text (the node's ``Metrics`` registry)
- ``GET /jobs``     jobs with states and reasons (``?state=``, ``?series=``, ``?limit=``)
- ``POST /jobs``    pull by UID: ``{"study": UID, "series": UID?, "source": NAME, "method": "move"|"get"?}``;
  202 with the outcome, 409 when the source sent instances and admission refused every one
- ``POST /dicom-web/studies[/{study}]``  STOW-RS in (multipart/related; type="application/dicom")
- ``GET /dicom-web/studies/{study}/series/{series}``  WADO-RS of a spooled series (remote Celery workers)
- ``POST /series/{study}/{series}/complete``  ``{"instances": N}``: the sender says the series holds N instances
  (the Orthanc plugin, after its store job): once N distinct instances are in, the series completes after
  ``[node] declared_settle_s`` instead of the quiet period. 200 with the series' counts, 400 for a bad body,
  404 when nothing of the series was received
- ``/dashboard``    the operator dashboard (``node.app.dashboard``): the same token, taken once by a login form

Limits (``node.app.limits``): request heads within ``header_timeout_s``, bodies up to ``max_body_mb`` (413) and
within ``body_idle_timeout_s`` / ``body_timeout_s`` (408), responses taken by the client within ``write_timeout_s``
(else the connection is aborted); STOW-RS bodies and WADO-RS files are streamed, never
held whole in memory. An API bound beyond loopback needs ``token`` (:func:`check_exposure`).
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import secrets
import socket
import tempfile
import threading
import time
from dataclasses import asdict
from functools import partial
from typing import Any

import uvicorn
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.middleware import Middleware
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from models.engine import Device, EngineOptions, get_engine
from node.app.context import NodeContext
from node.app.dashboard import dashboard_routes
from node.app.exposure import check_exposure as check_exposure  # re-exported: node.app.service, tests
from node.app.exposure import is_loopback as is_loopback
from node.app.limits import MB, BodyLimitError, BodyLimits, guarded_h11
from node.errors import ConfigError, NodeError, listen_problem
from node.ingest import (
    Caller,
    ChangesFollower,
    MultipartError,
    StowReceiver,
    TooManyParts,
    UnsupportedMediaType,
    boundary_of,
    fetch,
    multipart_close,
    multipart_part,
    start_followers,
)
from node.send import make_sender
from node.store import MAX_DECLARED_INSTANCES, Job, JobState, valid_uid

log = logging.getLogger(__name__)
MAX_JOBS_PAGE = 10_000  # jobs one GET /jobs may answer (?limit=); the newest first read by SQLite

DICOM_JSON = "application/dicom+json"
READY_CACHE_S = 10.0
READ_CHUNK = 1024 * 1024  # bytes per read when streaming a spooled file out (WADO-RS)
KEEP_ALIVE_S = 5  # an idle keep-alive connection is closed after this (seconds)


class _Ready:
    """readyz checks, cached for a few seconds so a probe every second does not hammer the destinations."""

    def __init__(self, ctx: NodeContext) -> None:
        self.ctx = ctx
        self.lock = threading.Lock()
        self.at = 0.0
        self.result: dict[str, Any] = {}
        self.engines_ok: dict[str, str] = {}

    def check(self) -> dict[str, Any]:
        with self.lock:
            if time.monotonic() - self.at < READY_CACHE_S and self.result:
                return self.result
            checks = {"spool": self._spool(), **self._destinations(), **self._engines()}
            self.result = {"ready": all(v == "ok" for v in checks.values()), "checks": checks}
            self.at = time.monotonic()
            return self.result

    def _spool(self) -> str:
        root = self.ctx.spool.root
        try:
            with tempfile.NamedTemporaryFile(dir=root, prefix=".readyz-"):
                pass
        except OSError as exc:
            return f"spool {root} not writable: {exc}"
        if not self.ctx.spool.has_space():
            return f"spool {root} below min_free_mb ({self.ctx.spool.free_mb():.0f} MB free)"
        return "ok"

    def _destinations(self) -> dict[str, str]:
        out = {}
        for dest in self.ctx.cfg.destinations:
            try:
                make_sender(dest).check()
                out[f"destination:{dest.name}"] = "ok"
            except NodeError as exc:
                out[f"destination:{dest.name}"] = str(exc)
        return out

    def _engines(self) -> dict[str, str]:
        cfg = self.ctx.cfg
        names = {cfg.engine.name, *(r.engine for r in cfg.rules if r.engine)}
        for name in sorted(names - set(self.engines_ok)):
            try:
                get_engine(name, EngineOptions(device=Device.CPU))
                self.engines_ok[name] = "ok"
            except Exception as exc:  # noqa: BLE001 - any failure to build the engine is "not ready"
                return {f"engine:{name}": f"engine {name!r} cannot be loaded: {exc}"}
        return {f"engine:{n}": "ok" for n in sorted(names)}


def _job_dict(job: Job) -> dict[str, Any]:
    d = asdict(job)
    d.pop("report", None)
    return d


def build_app(ctx: NodeContext) -> Starlette:
    """The ASGI app over the node's context (config, spool, index, admission, metrics)."""
    cfg = ctx.cfg
    token = cfg.http.token
    ready = _Ready(ctx)

    def authorized(request: Request) -> bool:
        if not token:
            return True
        given = request.headers.get("authorization", "")
        return given.startswith("Bearer ") and hmac.compare_digest(given[7:].encode(), token.encode())

    def unauthorized() -> Response:
        return JSONResponse({"error": "a valid bearer token is required ([http].token)"}, status_code=401,
                            headers={"WWW-Authenticate": 'Bearer realm="srnode"'})

    async def healthz(request: Request) -> Response:
        return JSONResponse({"status": "ok"})

    async def readyz(request: Request) -> Response:
        result = await run_in_threadpool(ready.check)
        return JSONResponse(result, status_code=200 if result["ready"] else 503)

    async def metrics(request: Request) -> Response:
        ctx.metrics.queue_depth.set(await run_in_threadpool(ctx.index.queue_depth))
        ctx.metrics.incoming_bytes.set(await run_in_threadpool(ctx.spool.incoming_bytes))
        return Response(generate_latest(ctx.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    async def jobs_list(request: Request) -> Response:
        if not authorized(request):
            return unauthorized()
        series = request.query_params.get("series", "")
        try:
            states = [JobState(s) for s in request.query_params.getlist("state") if s]
        except ValueError:
            return JSONResponse({"error": f"state must be one of {', '.join(JobState)}"}, status_code=400)
        try:
            limit = int(request.query_params.get("limit", "500") or 500)
        except ValueError:
            return JSONResponse({"error": "limit must be an integer"}, status_code=400)
        if not 1 <= limit <= MAX_JOBS_PAGE:  # 0 gave every job (jobs[-0:]), 10**9 too: one answer of the history
            return JSONResponse({"error": f"limit must be from 1 to {MAX_JOBS_PAGE}"}, status_code=400)
        jobs = await run_in_threadpool(partial(ctx.index.jobs, states, series_uid=series, limit=limit))
        return JSONResponse({"jobs": [_job_dict(j) for j in jobs]})

    async def jobs_pull(request: Request) -> Response:
        if not authorized(request):
            return unauthorized()
        try:
            body = await request.json()
            study, source = str(body["study"]), str(body["source"])
        except (ValueError, KeyError, TypeError):
            return JSONResponse({"error": 'expected JSON {"study": UID, "series": UID, "source": NAME}'},
                                status_code=400)
        try:
            result = await run_in_threadpool(fetch, cfg, source, study, str(body.get("series", "") or ""),
                                             admission=ctx.admission,
                                             method=str(body.get("method", "") or ""))
        except ConfigError as exc:
            return JSONResponse({"error": str(exc)}, status_code=400)
        except NodeError as exc:
            return JSONResponse({"error": str(exc)}, status_code=502)
        # 409 when the source sent instances and admission refused every one (as STOW-RS answers it)
        refused_all = bool(result.refused) and result.received == 0
        return JSONResponse(result.as_dict(), status_code=409 if refused_all else 202)

    async def stow(request: Request) -> Response:
        """STOW-RS, streamed: each part goes to a temporary file in the spool's incoming/ as it arrives and is
        admitted when complete (memory bounded by a chunk, whatever the size of the request). 413/408 when the
        body breaks ``[http]`` max_body_mb / body timeouts (the parts completed before are kept and counted)."""
        if not authorized(request):
            return unauthorized()
        study = request.path_params.get("study", "")
        remote = request.client.host if request.client else ""
        caller = Caller(cfg.http.stow_caller, remote, "stow-rs")
        try:
            boundary = boundary_of(request.headers.get("content-type", ""))
        except MultipartError as exc:
            return JSONResponse({"error": str(exc)}, status_code=415 if isinstance(exc, UnsupportedMediaType) else 400)
        receiver = StowReceiver(boundary, lambda path: ctx.admission.admit_file(path, caller),
                                ctx.spool.incoming, study, has_space=ctx.spool.has_space,
                                max_instance_bytes=cfg.node.max_instance_mb << 20, max_parts=cfg.http.max_stow_parts)
        try:
            async for chunk in request.stream():
                await run_in_threadpool(receiver.feed, chunk)
            result = await run_in_threadpool(receiver.finish)
        except BodyLimitError as exc:
            log.warning("STOW-RS from %s: %s; %d instance(s) stored before", remote, exc.detail,
                        len(receiver.result.stored))
            return JSONResponse({"error": exc.detail, "stored": len(receiver.result.stored)},
                                status_code=exc.status_code, headers=exc.headers)
        except ClientDisconnect:
            log.warning("STOW-RS from %s: the client went away after %d bytes; %d instance(s) stored before",
                        remote, receiver.bytes_received, len(receiver.result.stored))
            return Response(status_code=400)
        except TooManyParts as exc:  # the body is not read further: the connection is closed
            receiver.log_refusals()
            log.warning("STOW-RS from %s: 413: %s", remote, exc)
            return JSONResponse({"error": str(exc), "stored": len(receiver.result.stored)}, status_code=413,
                                headers={"Connection": "close"})
        except MultipartError as exc:
            return JSONResponse({"error": str(exc), "stored": len(receiver.result.stored)}, status_code=400)
        finally:
            receiver.abort()
        base = str(request.base_url).rstrip("/") + "/dicom-web/studies" + (f"/{study}" if study else "")
        log.info("STOW-RS from %s: %d stored, %d refused (%d bytes)", remote, len(result.stored),
                 len(result.failed), receiver.bytes_received)
        response = JSONResponse(result.as_json(base), status_code=result.http_status, media_type=DICOM_JSON)
        for warning in result.warnings():  # what was wrong with each refused part, in words
            response.headers.append("Warning", warning)
        return response

    async def wado_series(request: Request) -> Response:
        if not authorized(request):
            return unauthorized()
        study, series = request.path_params["study"], request.path_params["series"]
        instances = await run_in_threadpool(ctx.index.instances_of, series, study)
        if not instances:
            return JSONResponse({"error": f"series {series} is not in the spool"}, status_code=404)
        boundary = secrets.token_hex(16)

        async def body() -> Any:  # file by file, chunk by chunk: memory bounded whatever the series' size
            for inst in instances:
                head, tail = multipart_part(b"", boundary).split(b"\r\n\r\n", 1)
                yield head + b"\r\n\r\n"
                with open(inst.path, "rb") as fh:
                    while chunk := await asyncio.to_thread(fh.read, READ_CHUNK):
                        yield chunk
                yield tail
            yield multipart_close(boundary)

        ctype = f'multipart/related; type="application/dicom"; boundary={boundary}'
        return StreamingResponse(body(), media_type=ctype)

    async def series_complete(request: Request) -> Response:
        """The sender's declared size of a series (``{"instances": N}``, N >= 1): see ``Admission.declare``."""
        if not authorized(request):
            return unauthorized()
        study, series = request.path_params["study"], request.path_params["series"]
        if not (valid_uid(study) and valid_uid(series)):
            return JSONResponse({"error": "study and series must be valid UIDs"}, status_code=400)
        try:
            body = await request.json()
            instances = body["instances"]
            if isinstance(instances, bool) or not isinstance(instances, int) \
                    or not 1 <= instances <= MAX_DECLARED_INSTANCES:
                raise ValueError(instances)
        except (ValueError, KeyError, TypeError):
            return JSONResponse({"error": 'expected JSON {"instances": N} with N an integer from 1 to '
                                 f'{MAX_DECLARED_INSTANCES}'}, status_code=400)
        remote = request.client.host if request.client else ""
        row = await run_in_threadpool(ctx.admission.declare, study, series, instances, f"http from {remote}")
        if row is None:
            return JSONResponse({"error": f"series {series} of study {study} is not in the spool"}, status_code=404)
        return JSONResponse({"study": study, "series": series, "state": str(row["state"]),
                             "received": row["n_instances"], "declared_instances": row["declared_instances"],
                             "declared_by": row["declared_by"]})

    routes = [
        Route("/healthz", healthz),
        Route("/readyz", readyz),
        Route("/metrics", metrics),
        Route("/jobs", jobs_list, methods=["GET"]),
        Route("/jobs", jobs_pull, methods=["POST"]),
        Route("/dicom-web/studies", stow, methods=["POST"]),
        Route("/dicom-web/studies/{study}", stow, methods=["POST"]),
        Route("/dicom-web/studies/{study}/series/{series}", wado_series, methods=["GET"]),
        Route("/series/{study}/{series}/complete", series_complete, methods=["POST"]),
        *dashboard_routes(ctx),
    ]
    limits = Middleware(BodyLimits, max_body_bytes=cfg.http.max_body_mb * MB,
                        idle_timeout_s=cfg.http.body_idle_timeout_s, total_timeout_s=cfg.http.body_timeout_s)
    return Starlette(routes=routes, middleware=[limits])


class HttpHandle:
    """A running uvicorn server in a daemon thread; ``port`` is the bound port, ``stop()`` shuts it down."""

    def __init__(self, server: uvicorn.Server, thread: threading.Thread,
                 followers: list[ChangesFollower] | None = None) -> None:
        self.server, self.thread = server, thread
        self.followers = followers or []

    @property
    def port(self) -> int:
        for srv in getattr(self.server, "servers", []):
            for sock in srv.sockets:
                return int(sock.getsockname()[1])
        return int(self.server.config.port)

    def stop(self) -> None:
        for f in self.followers:
            f.stop()
        self.server.should_exit = True
        self.thread.join(timeout=10)


# listen() backlog, and how many connections asyncio accepts in one go before any is handled (uvicorn's 2048: a
# burst of idle connections was accepted 2048 at a time before [http] max_connections could close one, up to the
# process's limit of open files)
ACCEPT_BATCH = 128


def _bind(host: str, port: int) -> socket.socket:
    """A listening-ready TCP socket on host:port; ConfigError in words when the port is taken or not allowed."""
    try:
        family, kind, proto, _name, addr = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        sock = socket.socket(family, kind, proto)
    except OSError as exc:
        raise ConfigError(listen_problem("HTTP port", "http", host, port, exc)) from exc
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(addr)
    except OSError as exc:
        sock.close()
        raise ConfigError(listen_problem("HTTP port", "http", host, port, exc)) from exc
    return sock


def start_http(ctx: NodeContext) -> HttpHandle:
    """Serve :func:`build_app` on ``[http]`` host:port in a thread; returns once the socket is bound.

    Also starts the Orthanc ``/changes`` followers of ``[[sources]]`` with ``follow_changes = true`` (they stop
    with the handle).
    """
    cfg = ctx.cfg.http
    sock = _bind(cfg.host, cfg.port)  # here, so that a port in use is one ConfigError (uvicorn would log and exit)
    config = uvicorn.Config(build_app(ctx), host=cfg.host, port=cfg.port, log_level="warning",
                            access_log=False, lifespan="off", backlog=ACCEPT_BATCH,
                            http=guarded_h11(cfg.header_timeout_s, cfg.max_connections, cfg.write_timeout_s),
                            timeout_keep_alive=KEEP_ALIVE_S)
    server = uvicorn.Server(config)
    # uvicorn installs signal handlers only in the main thread: the service keeps owning SIGTERM/SIGINT
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name="http", daemon=True)
    thread.start()
    deadline = time.monotonic() + 15
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise ConfigError(f"http: the API did not start on {cfg.host}:{cfg.port} within 15 s")
        time.sleep(0.05)
    handle = HttpHandle(server, thread, start_followers(ctx.cfg, ctx.admission))
    log.info("HTTP API on http://%s:%d", cfg.host, handle.port)
    return handle
