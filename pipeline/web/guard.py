"""Checks made before a request's body is read: a write without credentials is refused (401, or the login
form for a page), and a body larger than PIPELINE_WEB_MAX_BODY_MB is refused (413) as soon as it says so
or grows past it. Without them, anyone who reached the server could make it read (and keep in memory, or
spool to disk) hundreds of megabytes before being told they may not."""

from __future__ import annotations

from http.cookies import SimpleCookie
from urllib.parse import quote

from fastapi import HTTPException
from starlette.responses import JSONResponse, RedirectResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from pipeline.web.auth import SESSION_COOKIE, Tokens

#: Writes that need no credentials: the login form carries the token itself.
OPEN_WRITES = ("/login",)
READS = ("GET", "HEAD", "OPTIONS")


class BodyGuard:
    def __init__(self, app: ASGIApp, *, tokens: Tokens, limit_bytes: int):
        self.app = app
        self.tokens = tokens
        self.limit = limit_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] in READS:
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]}
        path = scope["path"]
        declared = headers.get("content-length", "")
        if declared.isdigit() and int(declared) > self.limit:
            await self._refuse(scope, receive, send, 413, f"request body of {declared} bytes is over the "
                               f"{self.limit}-byte limit (PIPELINE_WEB_MAX_BODY_MB)")
            return
        if not self.tokens.open and path not in OPEN_WRITES and not self._known(headers):
            if path.startswith("/api/"):
                await self._refuse(scope, receive, send, 401, "authentication required: send "
                                   "Authorization: Bearer <token>")
            else:
                await RedirectResponse(f"/login?next={quote(path)}", status_code=303)(scope, receive, send)
            return
        await self.app(scope, self._counted(receive), send)

    def _known(self, headers: dict[str, str]) -> bool:
        if self.tokens.from_header(headers.get("authorization")) is not None:
            return True
        cookie = SimpleCookie()
        try:
            cookie.load(headers.get("cookie", ""))
        except Exception:  # noqa: BLE001 - an unreadable cookie header is no credential
            return False
        return SESSION_COOKIE in cookie and self.tokens.from_cookie(cookie[SESSION_COOKIE].value) is not None

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

    async def _refuse(self, scope: Scope, receive: Receive, send: Send, status: int, message: str) -> None:
        body = {"error": message, **({"detail": message} if scope["path"].startswith("/api/v2/") else {})}
        await JSONResponse(body, status_code=status, headers={"Connection": "close"})(scope, receive, send)
