"""Who may do what on the web server: tokens, roles, the login cookie and CSRF protection.

Tokens come from PIPELINE_WEB_TOKENS (`name:role:token,…`) and PIPELINE_WEB_TOKENS_FILE (one a line); a
fourth part limits a token to some projects (`name:role:token:lab-a+lab-b`): it sees and acts on their jobs
only, and may not use what spans every project (health, dead letters, parked results, registering pipelines). A
client sends `Authorization: Bearer <token>` (or `Token <token>`, as the reference system's workers do);
a browser logs in with a form that sets a signed cookie naming the token's holder, never the token. Roles:
`viewer` reads, `operator` also changes things, `service` is only for the processing-service gateway.
With no token configured the server binds to 127.0.0.1 and everyone who reaches it is an operator.

Form posts carry a CSRF value that must equal the `jetpipe_csrf` cookie (a double-submit token; the
cookies are SameSite=Strict as well), so another site cannot make a browser act here.
"""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import hmac
import secrets
import time
from collections.abc import Callable
from pathlib import Path

from pipeline.errors import ConfigError, Forbidden
from pipeline.fairshare import PROJECT_NAME
from pipeline.settings import Settings

ROLES = ("viewer", "operator", "service")
#: What each role may do (`service` may use only the gateway, which has routes of its own).
GRANTS = {"viewer": {"read"}, "operator": {"read", "write", "gateway"}, "service": {"gateway"}}
SESSION_COOKIE = "jetpipe_session"
CSRF_COOKIE = "jetpipe_csrf"
SESSION_S = 12 * 3600


@dataclasses.dataclass(frozen=True)
class Principal:
    name: str
    role: str
    #: The projects whose jobs it may see and act on; None: every project.
    projects: frozenset[str] | None = None

    def may(self, action: str) -> bool:
        return action in GRANTS[self.role]

    def may_see(self, project: str) -> bool:
        return self.projects is None or project in self.projects

    def project_for_new_job(self, requested: str | None) -> str | None:
        """The project a job it asks for goes to: `requested` if it may use it, else Forbidden; when none is
        requested, its only project (a token limited to several must name one)."""
        if self.projects is None:
            return requested
        if requested is None:
            if len(self.projects) == 1:
                return next(iter(self.projects))
            raise Forbidden(f"{self.name} may use projects {', '.join(sorted(self.projects))}: name one for the job")
        if requested not in self.projects:
            raise Forbidden(f"{self.name} may not create jobs in project {requested!r} (its projects: "
                            f"{', '.join(sorted(self.projects))})")
        return requested


ANONYMOUS_OPERATOR = Principal("local", "operator")  # no tokens configured: loopback only


class Tokens:
    """The configured tokens; `open` is True when there are none (loopback mode)."""

    def __init__(self, entries: dict[str, Principal], *, secret: bytes | None = None,
                 revoked: Callable[[str], bool] | None = None):
        """`secret` signs login cookies (a server secret of its own: a cookie tells nothing about the
        tokens); `revoked(session_id)` says whether a session was logged out."""
        self._by_token = entries
        self._key = hashlib.sha256(b"jetpipe-web-session\0" + (secret or secrets.token_bytes(32))).digest()
        self._revoked = revoked or (lambda session_id: False)

    @property
    def open(self) -> bool:
        return not self._by_token

    @classmethod
    def from_settings(cls, settings: Settings, *, secret: bytes | None = None,
                      revoked: Callable[[str], bool] | None = None) -> Tokens:
        lines = [part for part in settings.web_tokens.split(",") if part.strip()]
        if settings.web_tokens_file:
            try:
                text = Path(settings.web_tokens_file).read_text(encoding="utf-8")
            except OSError as exc:
                raise ConfigError(f"PIPELINE_WEB_TOKENS_FILE: cannot read it ({exc.strerror})") from None
            lines += [line for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
        entries: dict[str, Principal] = {}
        for n, line in enumerate(lines, 1):
            name, sep1, rest = line.strip().partition(":")
            role, sep2, rest = rest.partition(":")
            token, sep3, scope = rest.partition(":")
            if not (sep1 and sep2 and name and token) or (sep3 and not scope):
                raise ConfigError(f"web token entry {n} is not name:role:token or name:role:token:project+project")
            if role not in ROLES:
                raise ConfigError(f"web token {name!r}: role {role!r} is not one of {', '.join(ROLES)}")
            if len(token) < 16:
                raise ConfigError(f"web token {name!r} is shorter than 16 characters")
            projects = frozenset(p.strip() for p in scope.split("+")) if scope else None
            if projects is not None and not all(PROJECT_NAME.fullmatch(p) for p in projects):
                raise ConfigError(f"web token {name!r}: {scope!r} is not a list of project names joined by '+'")
            entries[token] = Principal(name, role, projects)
        return cls(entries, secret=secret, revoked=revoked)

    def from_header(self, header: str | None) -> Principal | None:
        """The holder of the token in an Authorization header (`Bearer x` or `Token x`), else None."""
        if not header:
            return None
        scheme, _, token = header.strip().partition(" ")
        if scheme.lower() not in ("bearer", "token"):
            return None
        return self.lookup(token.strip())

    def lookup(self, token: str) -> Principal | None:
        for known, principal in self._by_token.items():
            if hmac.compare_digest(known.encode(), token.encode()):
                return principal
        return None

    # ---- the login cookie: "<name>:<role>:<expiry>.<signature>", no token in it ----------------------
    def session_cookie(self, principal: Principal) -> str:
        payload = f"{principal.name}:{principal.role}:{int(time.time()) + SESSION_S}:{secrets.token_urlsafe(12)}"
        return f"{_b64(payload.encode())}.{self._sign(payload)}"

    def session_of(self, value: str | None) -> tuple[str, int] | None:
        """(session id, expiry) of a valid login cookie, else None."""
        payload = self._payload(value)
        if payload is None:
            return None
        _, _, expiry, session_id = payload.rsplit(":", 3)
        return session_id, int(expiry)

    def from_cookie(self, value: str | None) -> Principal | None:
        payload = self._payload(value)
        if payload is None:
            return None
        name, role, _, session_id = payload.rsplit(":", 3)
        if self._revoked(session_id):
            return None  # logged out
        # a removed token logs out; its projects are the token's as configured now
        return next((p for p in self._by_token.values() if (p.name, p.role) == (name, role)), None)

    def _payload(self, value: str | None) -> str | None:
        """The signed, unexpired payload of a login cookie, else None."""
        if not value or "." not in value:
            return None
        encoded, signature = value.rsplit(".", 1)
        try:
            payload = base64.urlsafe_b64decode(encoded + "=" * (-len(encoded) % 4)).decode()
        except (ValueError, UnicodeDecodeError):
            return None
        if not hmac.compare_digest(self._sign(payload), signature) or payload.count(":") < 3:
            return None
        _, role, expiry, _ = payload.rsplit(":", 3)
        if not expiry.isdigit() or int(expiry) < time.time() or role not in ROLES:
            return None
        return payload

    def _sign(self, payload: str) -> str:
        return _b64(hmac.new(self._key, payload.encode(), hashlib.sha256).digest())


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode().rstrip("=")


def new_csrf_value() -> str:
    return secrets.token_urlsafe(24)


def csrf_ok(cookie: str | None, submitted: str | None) -> bool:
    return bool(cookie and submitted) and hmac.compare_digest(cookie or "", submitted or "")
