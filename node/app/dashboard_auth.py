"""The dashboard's authentication and request checks (``node.app.dashboard``).

Browsers cannot send the API's bearer token, so the dashboard takes it once, in a login form (compared in
constant time), and answers with a session cookie: ``<expiry>.<nonce>.<HMAC-SHA256(token, expiry.nonce)>``,
HttpOnly, SameSite=Strict, path /dashboard, Secure when the page came over HTTPS. Nothing is kept in memory: a
session ends at its expiry (``SESSION_TTL_S``), on logout (the cookie is dropped) and for every session at once
when the token changes. With an empty token (an API on loopback only) there is no login.

Every POST (login included) must come from the dashboard's own pages: its ``Origin`` (else ``Referer``) names the
host the request was sent to, and the form carries the session's CSRF value (an HMAC of the session). With an
empty token the ``Host`` must be a loopback name or address, so a web page that rebinds its own name to
127.0.0.1 cannot read the dashboard.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import secrets
import time
from urllib.parse import parse_qs, urlsplit

from starlette.requests import Request
from starlette.responses import Response

COOKIE = "srnode_dashboard"
SESSION_TTL_S = 12 * 3600
FORM_LIMIT = 64 * 1024  # bytes: the largest dashboard form (the rule tester's pasted tags)
HTML_HEADERS = {
    "Cache-Control": "no-store",
    "Content-Security-Policy": ("default-src 'none'; img-src 'self'; style-src 'self'; form-action 'self'; "
                                "frame-ancestors 'none'; base-uri 'none'"),
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",
}


class FormError(Exception):
    """A dashboard form that cannot be read: too large (413) or not a urlencoded form (415)."""

    def __init__(self, status_code: int, detail: str) -> None:
        super().__init__(detail)
        self.status_code, self.detail = status_code, detail


async def read_form(request: Request, limit: int = FORM_LIMIT) -> dict[str, str]:
    """The request's urlencoded form (first value of each field), read up to ``limit`` bytes; FormError."""
    if request.headers.get("content-type", "").split(";")[0].strip() != "application/x-www-form-urlencoded":
        raise FormError(415, "expected a form (application/x-www-form-urlencoded)")
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise FormError(413, f"form larger than {limit} bytes")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise FormError(413, f"form larger than {limit} bytes")
    try:
        fields = parse_qs(body.decode("utf-8"), keep_blank_values=True, max_num_fields=32)
    except (UnicodeDecodeError, ValueError) as exc:
        raise FormError(400, "the form cannot be read") from exc
    return {k: v[0] for k, v in fields.items()}


def _loopback_host(host_header: str) -> bool:
    host = urlsplit("//" + host_header).hostname or ""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class DashboardAuth:
    """Sessions and CSRF values over ``token`` (the API's bearer token; "" = no login).

    ``check_host``: with no token, refuse a ``Host`` that is not loopback (the API is bound to loopback).
    """

    def __init__(self, token: str, check_host: bool = True) -> None:
        self.token = token
        self.check_host = check_host and not token
        self._key = token.encode() if token else secrets.token_bytes(32)

    @property
    def login_required(self) -> bool:
        return bool(self.token)

    def _mac(self, purpose: str, text: str) -> str:
        return hmac.new(self._key, f"{purpose}|{text}".encode(), hashlib.sha256).hexdigest()

    def token_ok(self, given: str) -> bool:
        """Whether ``given`` is the token (constant-time)."""
        return bool(self.token) and hmac.compare_digest(given.encode("utf-8", "surrogateescape"), self.token.encode())

    def host_ok(self, request: Request) -> bool:
        return not self.check_host or _loopback_host(request.headers.get("host", ""))

    def new_session(self) -> str:
        """A fresh session cookie value."""
        head = f"{int(time.time()) + SESSION_TTL_S}.{secrets.token_hex(8)}"
        return f"{head}.{self._mac('session', head)}"

    def session(self, request: Request) -> str | None:
        """The request's valid session ("" when no login is needed), or None."""
        if not self.token:
            return ""
        value = request.cookies.get(COOKIE, "")
        expiry, _, rest = value.partition(".")
        nonce, _, mac = rest.partition(".")
        if not (expiry.isascii() and expiry.isdigit() and nonce and mac) or int(expiry) < time.time():
            return None
        # bytes: compare_digest raises TypeError on a str holding a character above 0x7F (a forged cookie's)
        given = mac.encode("utf-8", "surrogateescape")
        return value if hmac.compare_digest(given, self._mac("session", f"{expiry}.{nonce}").encode()) else None

    def csrf(self, session: str) -> str:
        """The CSRF value the session's forms carry."""
        return self._mac("csrf", session)

    def csrf_ok(self, session: str, form: dict[str, str]) -> bool:
        return hmac.compare_digest(form.get("csrf", "").encode("utf-8", "surrogateescape"), self.csrf(session).encode())

    @staticmethod
    def same_origin(request: Request) -> bool:
        """Whether the request's Origin (else Referer) is the host it was sent to; False when neither is sent."""
        source = request.headers.get("origin") or request.headers.get("referer") or ""
        netloc = urlsplit(source).netloc.lower() if source != "null" else ""
        return bool(netloc) and netloc == request.headers.get("host", "").lower()

    def set_session(self, request: Request, response: Response) -> None:
        response.set_cookie(COOKIE, self.new_session(), max_age=SESSION_TTL_S, path="/dashboard", httponly=True,
                            samesite="strict", secure=request.url.scheme == "https")

    @staticmethod
    def drop_session(response: Response) -> None:
        response.delete_cookie(COOKIE, path="/dashboard", httponly=True, samesite="strict")
