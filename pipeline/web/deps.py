"""What every route needs: the caller's identity and rights, a database connection for the thread the
route runs in, and the process runtime."""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable

from fastapi import HTTPException, Request

import models
from pipeline.infra.runtime import Runtime
from pipeline.web.auth import ANONYMOUS_OPERATOR, SESSION_COOKIE, Principal, Tokens


class LoginRequired(Exception):
    """A page was asked for without a login: the browser is sent to the login form."""

    def __init__(self, next_path: str):
        self.next_path = next_path


def principal_of(request: Request) -> Principal | None:
    tokens: Tokens = request.app.state.tokens
    if tokens.open:
        return ANONYMOUS_OPERATOR
    return (tokens.from_header(request.headers.get("authorization"))
            or tokens.from_cookie(request.cookies.get(SESSION_COOKIE)))


def allowed(action: str, *, page: bool = False, everywhere: bool = False) -> Callable[[Request], Principal]:
    """A dependency: the caller, if it may do `action` (read, write); else 401 (or, for a page, the login
    form) without credentials, 403 with credentials that do not allow it. `everywhere`: what it reads or
    changes spans every project, so a token limited to some projects may not."""

    def check(request: Request) -> Principal:
        who = principal_of(request)
        if who is None:
            if page:
                raise LoginRequired(request.url.path + (f"?{request.url.query}" if request.url.query else ""))
            raise HTTPException(401, "authentication required: send Authorization: Bearer <token>",
                                headers={"WWW-Authenticate": "Bearer"})
        if not who.may(action):
            raise HTTPException(403, f"{who.name} ({who.role}) may not {action} here")
        if everywhere and who.projects is not None:
            raise HTTPException(403, f"{who.name} is limited to project(s) {', '.join(sorted(who.projects))}; this "
                                     "spans every project")
        return who

    return check


def runtime_of(request: Request) -> Runtime:
    return request.app.state.runtime()


def with_db(fn):
    """Run a sync route with this thread's database connection, given back afterwards (FastAPI runs sync
    routes on a thread pool; a pooled PostgreSQL connection must not stay with an idle thread)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with models.thread_connection():
            return fn(*args, **kwargs)

    wrapper.__signature__ = inspect.signature(fn)  # type: ignore[attr-defined]  # what FastAPI reads
    return wrapper
