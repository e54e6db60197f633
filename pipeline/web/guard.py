"""Checks made before a request's body is read:

- in loopback mode (no tokens), the `Host` header must name this machine's loopback: a page elsewhere
  that rebinds its own name to 127.0.0.1 (DNS rebinding) reaches nothing;
- a write that a browser sends from another origin (its `Origin` header names another host) is refused,
  and an API write must be JSON (or a multipart upload): the kinds of body a page on another site can
  post without the browser asking first are refused;
- an API write authenticated by the login cookie alone must carry the CSRF value in `X-CSRF-Token`;
- a write without credentials is refused (401, or the login form for a page), and a body larger than
  PIPELINE_WEB_MAX_BODY_MB is refused (413) as soon as it says so or grows past it. Without this, anyone
  who reached the server could make it read (and keep, or spool to disk) hundreds of megabytes first."""

from __future__ import annotations

import collections
import logging
import threading
import time
from http.cookies import SimpleCookie
from urllib.parse import quote

from fastapi import HTTPException
from starlette.responses import JSONResponse, RedirectResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from pipeline.web.auth import CSRF_COOKIE, SESSION_COOKIE, Tokens, csrf_ok

log = logging.getLogger(__name__)

#: Writes that need no credentials: the login form carries the token itself.
OPEN_WRITES = ("/login",)
READS = ("GET", "HEAD", "OPTIONS")
LOOPBACK_NAMES = ("127.0.0.1", "localhost", "::1")
API_BODY_TYPES = ("application/json", "multipart/form-data")


def _hostname(host: str) -> str:
    """The name in a Host header, without its port ("[::1]:8080" -> "::1")."""
    host = host.strip().lower()
    if host.startswith("["):
        return host[1:].split("]", 1)[0]
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


def _authority(origin: str) -> str:
    """host[:port] of an Origin header ("http://127.0.0.1:8080" -> "127.0.0.1:8080")."""
    return origin.strip().lower().split("://", 1)[-1].rstrip("/")


def _cookies(headers: dict[str, str]) -> dict[str, str]:
    cookie = SimpleCookie()
    try:
        cookie.load(headers.get("cookie", ""))
    except Exception:  # noqa: BLE001 - an unreadable cookie header carries nothing
        return {}
    return {name: morsel.value for name, morsel in cookie.items()}


class Throttle:
    """Failed authentications per client address: past LIMIT within WINDOW_S, the address is refused (429)
    until its oldest failure leaves the window. Token guessing gets ten tries a minute, not hundreds a
    second. Kept in this process's memory, for at most MAX_ADDRESSES addresses."""

    LIMIT = 10
    WINDOW_S = 60.0
    MAX_ADDRESSES = 10_000

    def __init__(self):
        self._failures: dict[str, collections.deque[float]] = {}
        self._lock = threading.Lock()

    def failed(self, address: str) -> None:
        now = time.monotonic()
        with self._lock:
            failures = self._failures.setdefault(address, collections.deque(maxlen=self.LIMIT))
            failures.append(now)
            if len(failures) == self.LIMIT and now - failures[0] < self.WINDOW_S:
                log.warning("web: %s failed to authenticate %s times in %.0f s; refused for up to %.0f s", address,
                            self.LIMIT, now - failures[0], self.WINDOW_S)
            if len(self._failures) > self.MAX_ADDRESSES:
                self._failures.pop(next(iter(self._failures)))

    def retry_after(self, address: str) -> int:
        """Seconds until `address` may try again (0: now)."""
        with self._lock:
            failures = self._failures.get(address)
            if not failures or len(failures) < self.LIMIT:
                return 0
            left = self.WINDOW_S - (time.monotonic() - failures[0])
        return int(left) + 1 if left > 0 else 0


class BodyGuard:
    def __init__(self, app: ASGIApp, *, tokens: Tokens, limit_bytes: int, throttle: Throttle, public_url: str = ""):
        self.app = app
        self.tokens = tokens
        self.throttle = throttle
        self.limit = limit_bytes
        self.public = _authority(public_url) if public_url else None

    def _own(self, host: str, headers: dict[str, str]) -> set[str]:
        """The authorities this server answers as: its Host, a proxy's X-Forwarded-Host, the public URL."""
        own = {host.strip().lower(), headers.get("x-forwarded-host", "").strip().lower()}
        return own | ({self.public} if self.public else set())

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]}
        path = scope["path"]
        host = headers.get("host", "")
        if self.tokens.open and _hostname(host) not in LOOPBACK_NAMES:
            await self._refuse(scope, receive, send, 400, f"Host {host[:100]!r} is not this server: without "
                               "tokens it answers to 127.0.0.1 and localhost only")
            return
        if not self.tokens.open:
            address = (scope.get("client") or ("?", 0))[0]
            wait = self.throttle.retry_after(address)
            if wait:
                await self._refuse(scope, receive, send, 429, f"too many failed authentications from {address}; "
                                   f"try again in {wait} s", extra={"Retry-After": str(wait)})
                return
            if headers.get("authorization") and self.tokens.from_header(headers["authorization"]) is None:
                self.throttle.failed(address)  # a token that is not one: a guess, or a typo
        if scope["method"] in READS:
            await self.app(scope, receive, send)
            return
        origin = headers.get("origin")
        if origin is not None and _authority(origin) not in self._own(host, headers):
            await self._refuse(scope, receive, send, 403, f"a write from another origin ({origin[:100]}) is refused")
            return
        by = None if self.tokens.open else self._credential(headers)
        kind = headers.get("content-type", "").split(";", 1)[0].strip().lower()
        has_body = headers.get("content-length", "0") != "0" or "transfer-encoding" in headers
        # a browser can send these kinds of body to another site unasked: only a token (which no other site
        # can make a browser send) may write to the API without JSON
        if path.startswith("/api/") and has_body and kind not in API_BODY_TYPES and by != "token":
            await self._refuse(scope, receive, send, 415, "an API write must be JSON (Content-Type: "
                               "application/json) or a multipart upload")
            return
        declared = headers.get("content-length", "")
        if declared.isdigit() and int(declared) > self.limit:
            await self._refuse(scope, receive, send, 413, f"request body of {declared} bytes is over the "
                               f"{self.limit}-byte limit (PIPELINE_WEB_MAX_BODY_MB)")
            return
        if not self.tokens.open and path not in OPEN_WRITES:
            if by is None:
                if path.startswith("/api/"):
                    await self._refuse(scope, receive, send, 401, "authentication required: send "
                                       "Authorization: Bearer <token>")
                else:
                    await RedirectResponse(f"/login?next={quote(path)}", status_code=303)(scope, receive, send)
                return
            if by == "cookie" and path.startswith("/api/") and not csrf_ok(
                    _cookies(headers).get(CSRF_COOKIE), headers.get("x-csrf-token")):
                await self._refuse(scope, receive, send, 403, "an API write made with the login cookie needs "
                                   "the CSRF value in X-CSRF-Token (or use Authorization: Bearer <token>)")
                return
        await self.app(scope, self._counted(receive), send)

    def _credential(self, headers: dict[str, str]) -> str | None:
        """How the request is authenticated: "token", "cookie", or None."""
        if self.tokens.from_header(headers.get("authorization")) is not None:
            return "token"
        session = _cookies(headers).get(SESSION_COOKIE)
        return "cookie" if session and self.tokens.from_cookie(session) is not None else None

    def _counted(self, receive: Receive) -> Receive:
        seen = 0

        async def counted() -> Message:
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.limit:
                raise HTTPException(413, f"request body is over the {self.limit}-byte limit "
                                         "(PIPELINE_WEB_MAX_BODY_MB)")
            return message

        return counted

    async def _refuse(self, scope: Scope, receive: Receive, send: Send, status: int, message: str, *,
                      extra: dict[str, str] | None = None) -> None:
        body = {"error": message, **({"detail": message} if scope["path"].startswith("/api/v2/") else {})}
        await JSONResponse(body, status_code=status, headers={"Connection": "close", **(extra or {})})(
            scope, receive, send)
