"""The ASGI application: `create_app(settings)`; `cli.py web` serves it with uvicorn."""

from __future__ import annotations

import contextlib
import logging
import threading
from pathlib import Path

import fastapi_offline
import peewee
import redis
from fastapi import Depends, FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse
from fastapi.staticfiles import StaticFiles
from starlette.concurrency import run_in_threadpool

import models
from pipeline import names
from pipeline.errors import (
    ConfigError,
    Conflict,
    Forbidden,
    NotFound,
    PipelineError,
    TooLarge,
    TransientError,
    UserInputError,
)
from pipeline.infra.jobstate import connect_redis
from pipeline.infra.readiness import readiness
from pipeline.infra.runtime import Runtime, get_runtime
from pipeline.settings import Settings, redact_text
from pipeline.web import api, gateway_api, image_links, pages
from pipeline.web.auth import Principal, Tokens
from pipeline.web.deps import LoginRequired, allowed
from pipeline.web.guard import BodyGuard, Throttle

log = logging.getLogger(__name__)
HERE = Path(__file__).parent
#: On every answer: no page of jetpipe's may be framed by another site (clickjacking), no answer sniffed
#: into another type, no address leaked to other sites through the Referer header.
SECURITY_HEADERS = {"X-Frame-Options": "DENY", "X-Content-Type-Options": "nosniff",
                    "Referrer-Policy": "same-origin",
                    "Content-Security-Policy": "default-src 'self'; script-src 'self'; style-src 'self'; "
                                               "img-src 'self' data: blob:; object-src 'none'; "
                                               "frame-ancestors 'none'; "
                                               "base-uri 'self'; form-action 'self'"}
#: The API explorer's page: Swagger UI's assets are served by jetpipe (no CDN: it works offline); its page
#: starts Swagger UI with one inline script.
DOCS_CSP = ("default-src 'self'; script-src 'self' 'unsafe-inline'; style-src 'self'; img-src 'self' data:; "
            "object-src 'none'; frame-ancestors 'none'; base-uri 'self'; form-action 'self'")
#: Swagger UI 5 (OpenAPI 3.1, which FastAPI writes), as the fastapi-offline package ships it.
SWAGGER_ASSETS = Path(fastapi_offline.__file__).parent / "static"


def _status_of(exc: BaseException) -> int:
    if isinstance(exc, NotFound):
        return 404
    if isinstance(exc, Forbidden):
        return 403
    if isinstance(exc, TooLarge):
        return 413
    if isinstance(exc, Conflict):
        return 409
    if isinstance(exc, UserInputError):
        return 400
    if isinstance(exc, TransientError | redis.RedisError) or models.is_transient(exc):
        return 503
    if isinstance(exc, models.SchemaMissing):
        return 503
    return 500


def _message(exc: BaseException) -> str:
    if isinstance(exc, redis.RedisError):
        return f"Redis unavailable: {exc}"
    if isinstance(exc, peewee.PeeweeException) and models.is_transient(exc):
        return f"database unavailable: {(str(exc).strip().splitlines() or [type(exc).__name__])[0]}"
    return str(exc)


def create_app(settings: Settings, *, runtime: Runtime | None = None) -> FastAPI:
    """The web application for `settings`. Tokens are read (and checked) here: bad ones raise ConfigError."""
    tokens = Tokens.from_settings(settings, **_sessions(settings))
    lock = threading.Lock()
    made: list[Runtime] = [runtime] if runtime else []

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        await run_in_threadpool(_release_reserved, app, made)

    app = FastAPI(title="jetpipe", summary="Reliable asynchronous ML jobs over many images",
                  docs_url=None, redoc_url=None, openapi_url=None, lifespan=lifespan)
    app.state.settings = settings
    app.state.tokens = tokens

    app.state.throttle = Throttle()
    app.add_middleware(BodyGuard, tokens=tokens, limit_bytes=int(settings.web_max_body_mb * 1024 * 1024),
                       throttle=app.state.throttle, public_url=settings.web_public_url)

    @app.middleware("http")
    async def security_headers(request: Request, call_next):
        response = await call_next(request)
        for name, value in SECURITY_HEADERS.items():
            response.headers.setdefault(name, value)
        return response

    def the_runtime() -> Runtime:
        with lock:
            if not made:
                runtime = get_runtime()
                runtime.watch_nats = True  # the web server lives long: its gateway's connection is watched
                made.append(runtime)
            return made[0]

    app.state.runtime = the_runtime

    # the API's description and its documentation page: for those who may read, like everything else
    @app.get("/api/v1/openapi.json", include_in_schema=False)
    def openapi_schema(_: Principal = Depends(allowed("read"))) -> JSONResponse:
        return JSONResponse(app.openapi())

    @app.get("/api/docs", include_in_schema=False)
    def api_docs(_: Principal = Depends(allowed("read", page=True))) -> HTMLResponse:
        page = get_swagger_ui_html(openapi_url="/api/v1/openapi.json", title="jetpipe API",
                                   swagger_js_url="/static/api-docs/swagger-ui-bundle.js",
                                   swagger_css_url="/static/api-docs/swagger-ui.css",
                                   swagger_favicon_url="/static/api-docs/favicon.png")
        page.headers["Content-Security-Policy"] = DOCS_CSP
        return page

    @app.exception_handler(PipelineError)
    @app.exception_handler(redis.RedisError)
    @app.exception_handler(peewee.PeeweeException)
    async def known_errors(request: Request, exc: Exception):
        status = _status_of(exc)
        if status == 500 and not isinstance(exc, PipelineError | ConfigError):
            log.exception("web: %s %s failed", request.method, request.url.path)
            message = "internal error (see the server's log)"
        else:
            message = _message(exc)
        return _error(request, status, redact_text(message))

    @app.exception_handler(Exception)
    async def bugs(request: Request, exc: Exception):
        log.exception("web: %s %s failed", request.method, request.url.path)
        return _error(request, 500, "internal error (see the server's log)")

    @app.exception_handler(HTTPException)
    async def http_errors(request: Request, exc: HTTPException):
        return _error(request, exc.status_code, str(exc.detail), headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def bad_requests(request: Request, exc: RequestValidationError):
        problems = "; ".join(f"{'.'.join(str(p) for p in e['loc'][1:]) or 'body'}: {e['msg']}" for e in exc.errors())
        return _error(request, 400, f"bad request: {problems}")

    @app.exception_handler(LoginRequired)
    async def to_login(request: Request, exc: LoginRequired):
        return RedirectResponse(f"/login?next={exc.next_path}", status_code=303)

    @app.get("/healthz", include_in_schema=False)
    def healthz() -> dict:
        return {"status": "alive"}

    @app.get("/readyz", include_in_schema=False)
    def readyz():
        ready, checks = readiness(settings)
        return JSONResponse({"ready": ready, **checks}, status_code=200 if ready else 503)

    app.include_router(api.router)
    app.include_router(gateway_api.router)
    app.include_router(pages.router)
    app.mount("/static/api-docs", StaticFiles(directory=SWAGGER_ASSETS), name="api-docs")
    app.mount("/static", StaticFiles(directory=HERE / "static"), name="static")
    return app


def _sessions(settings: Settings) -> dict:
    """The login cookies' secret (made once, kept in Redis for every web process) and the check of
    logged-out sessions. With Redis unreachable at start, a secret of this process alone (its cookies end
    with it), and logouts are then checked when Redis answers again."""
    client = connect_redis(settings.redis_url)

    def revoked(session_id: str) -> bool:
        try:
            return bool(client.exists(names.web_session_revoked_key(session_id)))
        except redis.RedisError:
            return False  # the dashboard stays usable while Redis is down; logouts bind again when it is back

    try:
        secret = image_links.shared_secret(client, names.WEB_SESSION_SECRET_KEY)
    except redis.RedisError as exc:
        log.warning("web: Redis unreachable (%s): login sessions are signed with this process's own secret", exc)
        secret = None
    return {"secret": secret, "revoked": revoked}


def _release_reserved(app: FastAPI, made: list[Runtime]) -> None:
    """At shutdown: what the gateway fetched and did not hand out goes back to NATS now, not after ack_wait."""
    gateway = getattr(app.state, "gateway", None)
    if gateway is None or not made:
        return
    try:
        released = made[0].runner.run(gateway.release_all(), timeout=10)
        log.info("web: released %s reserved task(s) no service received", released)
    except Exception as exc:  # noqa: BLE001 - they return after ack_wait anyway
        log.warning("web: could not release reserved tasks (%s); they return after ack_wait", exc)


def _error(request: Request, status: int, message: str, headers=None):
    if request.url.path.startswith("/api/v2/"):  # the reference's clients read DRF's `detail`
        return JSONResponse({"error": message, "detail": message}, status_code=status, headers=headers)
    if request.url.path.startswith("/api/") or "text/html" not in request.headers.get("accept", ""):
        return JSONResponse({"error": message}, status_code=status, headers=headers)
    return pages.error_page(request, status, message)
