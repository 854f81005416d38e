"""The operator dashboard: server-rendered pages under ``/dashboard`` in the node's HTTP app (``node.app.http``).

- ``GET /dashboard``                 jobs (state, rule, engine, fallback, timings, reasons, deliveries); refreshes
  itself every few seconds (``?state=`` filters, ``?refresh=0`` stops refreshing)
- ``GET /dashboard/jobs/{id}``       one job, its deliveries and preview; retry / replay buttons
- ``GET /dashboard/jobs/{id}/preview.png``  original / derived / uncertainty (made on demand, kept in the outbox)
- ``POST /dashboard/jobs/{id}/retry``   what ``srnode retry JOB`` does: a failed job is re-queued, a job's
  dead-letter deliveries are sent again
- ``POST /dashboard/jobs/{id}/replay``  the job's series (study + series) again, as a new job under its rule
- ``GET|POST /dashboard/rules``      rule dry-run: a spooled series or pasted ``Keyword = value`` lines
- ``GET|POST /dashboard/login``, ``POST /dashboard/logout``

Behind the API's token (``node.app.dashboard_auth``: a login form, then a session cookie; POSTs checked for
origin and CSRF). Patient data is never shown, but the preview is the patient's pixels, behind the token.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from jinja2 import Environment, FileSystemLoader, select_autoescape
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import FileResponse, HTMLResponse, PlainTextResponse, RedirectResponse, Response
from starlette.routing import Route

from node.app import dashboard_data as data
from node.app.context import NodeContext
from node.app.dashboard_auth import HTML_HEADERS, DashboardAuth, FormError, read_form
from node.errors import SpoolError
from node.jobs.replay import gone_destinations, redirect
from node.store import JobState

log = logging.getLogger(__name__)

TEMPLATES = Path(__file__).parent / "templates"
REFRESH_S = 5
JOB_LIMIT = 200
LOGIN_FAILURE_DELAY_S = 1.0
DONE_MESSAGES = {  # ?done= codes after a POST (fixed words: nothing from the query string is shown)
    "requeued": "Re-queued for processing.",
    "redeliver": "Dead-letter deliveries re-queued.",
    "nothing": "Nothing to retry in this job's state.",
    "replaced": "Not sent again: a later job of the series replaced its results, and its rejection note retires them.",
    "rematched": "Its rule is not configured (any more): its series is matched against the rules again.",
    "replayed": "Queued as a replay.",
    "no-replay": "Cannot replay: the job's rule is not configured (any more), or its series is not in the spool.",
    "no-rule": "Cannot replay: the job's rule is not configured (any more).",
    "no-instances": "Cannot replay: its series has no instance in this node's spool; send the series again.",
    "busy": "Cannot replay now: the series has a job queued or in progress.",
    "pruned": "Cannot replay: the retention ([node] retention_days) removed its series' instances from the spool; "
              "send the series to the node again to process it again.",
    "no-destination": "Not retried: its destination is no longer configured, and its series cannot be replayed to "
                      "the destinations its rule names now (the rule is gone or names none, the series is not in "
                      "the spool, or it has a job in progress): the node's log says which.",
}
Handler = Callable[[Request], Awaitable[Response]]


def _environment() -> Environment:
    env = Environment(loader=FileSystemLoader(TEMPLATES), autoescape=select_autoescape(default=True),
                      trim_blocks=True, lstrip_blocks=True)
    env.globals["refresh_s"] = REFRESH_S
    return env


def dashboard_routes(ctx: NodeContext) -> list[Route]:
    """The dashboard's routes over the node's context (mounted by ``node.app.http.build_app``)."""
    cfg = ctx.cfg
    auth = DashboardAuth(cfg.http.token, check_host=not cfg.http.allow_anonymous)
    env = _environment()

    def page(request: Request, name: str, status: int = 200, **values: Any) -> HTMLResponse:
        session = auth.session(request) or ""
        html = env.get_template(name).render(csrf=auth.csrf(session), login=auth.login_required, **values)
        return HTMLResponse(html, status_code=status, headers=HTML_HEADERS)

    def refused(text: str, status: int = 403) -> Response:
        return PlainTextResponse(text, status_code=status, headers=HTML_HEADERS)

    def viewer(handler: Handler) -> Handler:
        """A page: a session is needed (else to the login page)."""
        async def wrapped(request: Request) -> Response:
            if not auth.host_ok(request):
                return refused("the dashboard without a token answers on a loopback host name only", 421)
            if auth.session(request) is None:
                return RedirectResponse("/dashboard/login", status_code=303)
            return await handler(request)
        return wrapped

    def action(handler: Callable[[Request, dict[str, str]], Awaitable[Response]]) -> Handler:
        """A POST: a session, the dashboard's own origin and the session's CSRF value are needed."""
        async def wrapped(request: Request) -> Response:
            session = auth.session(request)
            if not auth.host_ok(request) or session is None:
                return refused("log in to the dashboard first")
            if not auth.same_origin(request):
                return refused("refused: the request does not come from the dashboard's own pages")
            try:
                form = await read_form(request)
            except FormError as exc:
                return refused(exc.detail, exc.status_code)
            if not auth.csrf_ok(session, form):
                return refused("refused: the form is stale or not the dashboard's (reload the page)")
            return await handler(request, form)
        return wrapped

    async def login_page(request: Request) -> Response:
        if not auth.login_required or auth.session(request) is not None:
            return RedirectResponse("/dashboard", status_code=303)
        return page(request, "login.html")

    async def login(request: Request) -> Response:
        if not auth.login_required:
            return RedirectResponse("/dashboard", status_code=303)
        if not auth.same_origin(request):
            return refused("refused: the request does not come from the dashboard's own pages")
        try:
            form = await read_form(request, limit=4096)
        except FormError as exc:
            return refused(exc.detail, exc.status_code)
        if not auth.token_ok(form.get("token", "")):
            remote = request.client.host if request.client else "?"
            log.warning("dashboard: failed login from %s", remote)
            await asyncio.sleep(LOGIN_FAILURE_DELAY_S)
            return page(request, "login.html", status=401, error="That is not the node's token.")
        response = RedirectResponse("/dashboard", status_code=303)
        auth.set_session(request, response)
        return response

    async def logout(request: Request, form: dict[str, str]) -> Response:
        response = RedirectResponse("/dashboard/login" if auth.login_required else "/dashboard", status_code=303)
        auth.drop_session(response)
        return response

    async def jobs(request: Request) -> Response:
        wanted = [s for s in JobState if s.value in request.query_params.getlist("state")]
        rows, counts = await run_in_threadpool(data.jobs_view, ctx.index, wanted, JOB_LIMIT)
        # series still arriving or in their quiet period: no job yet, but not "nothing here"
        receiving = len(await run_in_threadpool(ctx.index.receiving_series))
        refresh = request.query_params.get("refresh", "") != "0"
        return page(request, "jobs.html", jobs=rows, counts=counts, states=[s.value for s in wanted],
                    refresh=refresh, queue=counts["queued"] + counts["processing"], limit=JOB_LIMIT,
                    receiving=receiving)

    def _job(request: Request) -> Any:
        jid = int(request.path_params["job_id"])
        try:
            return ctx.index.job(jid)
        except SpoolError:
            return None

    async def job_page(request: Request) -> Response:
        job = await run_in_threadpool(_job, request)
        if job is None:
            return page(request, "missing.html", status=404, what=f"job {request.path_params['job_id']}")
        deliveries = await run_in_threadpool(ctx.index.deliveries, job.id)
        view = data.job_view(job, deliveries, time.time())
        preview = await run_in_threadpool(data.has_preview, ctx.spool, job)
        done = request.query_params.get("done", "")
        return page(request, "job.html", job=view, preview=preview, message=DONE_MESSAGES.get(done, ""),
                    message_ok=done in ("requeued", "redeliver", "replayed", "rematched"),
                    refresh=not view["done"] and request.query_params.get("refresh", "") != "0")

    async def preview(request: Request) -> Response:
        job = await run_in_threadpool(_job, request)
        png = await run_in_threadpool(data.preview_png, ctx.spool, ctx.index, job) if job is not None else None
        if png is None:
            return PlainTextResponse("no preview for this job (no results in this node's outbox, or it could not "
                                     "be made: see the node's log)", status_code=404, headers=HTML_HEADERS)
        return FileResponse(png, media_type="image/png", headers={"Cache-Control": "private, no-cache"})

    async def retry(request: Request, form: dict[str, str]) -> Response:
        job = await run_in_threadpool(_job, request)
        if job is None:
            return refused("no such job", 404)
        if job.state is JobState.FAILED and job.rule not in {r.name for r in cfg.rules}:
            # re-running it under a rule that is gone would fail again: its series is decided again instead
            rematched = await run_in_threadpool(ctx.index.reconsider_ignored, job.id, "matched against the rules "
                                                f"again from the dashboard (its rule {job.rule!r} is not configured)",
                                                JobState.FAILED)
            done = "rematched" if rematched else "nothing"
        elif job.state is JobState.FAILED and await run_in_threadpool(
                ctx.index.requeue_job, job.id, "re-queued from the dashboard"):
            done = "requeued"
        elif job.state in (JobState.DEAD_LETTER, JobState.SUPERSEDED) and (
                await run_in_threadpool(ctx.index.replaced_by, job.id) is not None):
            done = "replaced"  # a later job's results (and its rejection note) replace these: never sent again
        elif job.state in (JobState.DEAD_LETTER, JobState.SUPERSEDED) and (
                gone := await run_in_threadpool(gone_destinations, cfg, ctx.index, job)):
            # resent it would fail again: replayed to its rule's destinations now, or refused (node.jobs.replay)
            out = await run_in_threadpool(redirect, cfg, ctx.index, job, gone, "the dashboard")
            log.info("dashboard: %s", out.line)
            if out.new_job:
                ctx.audit.write("dashboard-retry", job=job.id, series=job.series_uid, outcome="replayed",
                                replayed_as=out.new_job)
                return RedirectResponse(f"/dashboard/jobs/{out.new_job}?done=replayed", status_code=303)
            done = "no-destination"
        elif await run_in_threadpool(ctx.index.requeue_deliveries, job.id):
            done = "redeliver"
        else:
            done = "nothing"
        log.info("dashboard: retry of job %d: %s", job.id, done)
        ctx.audit.write("dashboard-retry", job=job.id, series=job.series_uid, outcome=done)
        return RedirectResponse(f"/dashboard/jobs/{job.id}?done={done}", status_code=303)

    async def replay(request: Request, form: dict[str, str]) -> Response:
        job = await run_in_threadpool(_job, request)
        if job is None:
            return refused("no such job", 404)
        try:
            new_id, why = await run_in_threadpool(data.replay, cfg, ctx.index, job)
        except SpoolError as exc:
            log.warning("dashboard: replay of job %d refused: %s", job.id, exc)
            new_id, why = 0, "no-replay"
        if not new_id:
            return RedirectResponse(f"/dashboard/jobs/{job.id}?done={why}", status_code=303)
        log.info("dashboard: job %d replays job %d (series %s, rule %s)", new_id, job.id, job.series_uid, job.rule)
        ctx.audit.write("dashboard-replay", job=new_id, replays=job.id, series=job.series_uid, rule=job.rule)
        return RedirectResponse(f"/dashboard/jobs/{new_id}?done=replayed", status_code=303)

    async def rules_page(request: Request, run: data.DryRun | None = None, form: dict[str, str] | None = None,
                         ) -> Response:
        series = await run_in_threadpool(data.spooled_series, ctx.index)
        dests = {d.name: str(getattr(d, "kind", "")) for d in cfg.destinations}
        return page(request, "rules.html", rules=cfg.rules, series=series, run=run, form=form or {},
                    destinations=dests, default_engine=cfg.engine.name)

    async def rules_get(request: Request) -> Response:
        return await rules_page(request)

    async def rules_post(request: Request, form: dict[str, str]) -> Response:
        if form.get("series"):
            run = await run_in_threadpool(data.dry_run_series, cfg, ctx.index, form["series"])
        else:
            header, errors = data.parse_tags(form.get("tags", ""))
            run = data.dry_run(cfg, header)
            run.errors, run.source = errors, f"{len(header)} pasted element(s)"
        return await rules_page(request, run, form)

    async def stylesheet(request: Request) -> Response:
        return FileResponse(TEMPLATES / "dashboard.css", media_type="text/css",
                            headers={"Cache-Control": "public, max-age=300"})

    return [
        Route("/dashboard", viewer(jobs), methods=["GET"]),
        Route("/dashboard/login", login_page, methods=["GET"]),
        Route("/dashboard/login", login, methods=["POST"]),
        Route("/dashboard/logout", action(logout), methods=["POST"]),
        Route("/dashboard/dashboard.css", stylesheet, methods=["GET"]),
        Route("/dashboard/jobs/{job_id:int}", viewer(job_page), methods=["GET"]),
        Route("/dashboard/jobs/{job_id:int}/preview.png", viewer(preview), methods=["GET"]),
        Route("/dashboard/jobs/{job_id:int}/retry", action(retry), methods=["POST"]),
        Route("/dashboard/jobs/{job_id:int}/replay", action(replay), methods=["POST"]),
        Route("/dashboard/rules", viewer(rules_get), methods=["GET"]),
        Route("/dashboard/rules", action(rules_post), methods=["POST"]),
    ]
