"""Configuration read once from the environment (the table in README.md and `cli.py --help`)."""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any, TypedDict
from urllib.parse import urlsplit, urlunsplit

from pipeline.errors import ConfigError

if TYPE_CHECKING:
    from models import SessionLimits


class NatsOptions(TypedDict):
    """How to connect to NATS beyond the URL: a credentials file, a private CA."""

    creds: str
    tls_ca: str


@dataclasses.dataclass(frozen=True)
class Option:
    env: str
    default: str
    help: str


#: Every environment variable jetpipe reads, with its default and meaning (shown in `cli.py --help`).
OPTIONS: dict[str, Option] = {
    "database_url": Option("PIPELINE_DATABASE_URL", "sqlite:///pipeline.db",
                           "peewee database URL: sqlite:///path or postgresql://user@host/db"),
    "redis_url": Option("PIPELINE_REDIS_URL", "redis://127.0.0.1:6379/0",
                        "Redis for job state and the Dramatiq broker"),
    "nats_url": Option("PIPELINE_NATS_URL", "nats://127.0.0.1:4222", "NATS server with JetStream"),
    "nats_max_deliver": Option("PIPELINE_NATS_MAX_DELIVER", "2",
                               "deliveries of one task before JetStream gives up on it"),
    "nats_task_ttr": Option("PIPELINE_NATS_TASK_TTR", "30",
                            "seconds a processing service has per task before redelivery (ack_wait)"),
    "nats_replicas": Option("PIPELINE_NATS_REPLICAS", "",
                            "replicas of jetpipe's streams (3 on a 3-node JetStream cluster): when set, streams are "
                            "created with it and existing ones changed to it at startup; unset, new streams get 1 and "
                            "existing ones keep theirs"),
    "nats_results_max_gb": Option("PIPELINE_NATS_RESULTS_MAX_GB", "",
                                  "most bytes of results PIPELINE_RESULTS holds untaken (GiB): beyond it a service's "
                                  "publish is refused and retried, nothing stored is dropped; when set, imposed on the "
                                  "stream at startup; unset, a new stream gets 10 and an unlimited one is given 10"),
    "nats_max_jobs": Option("PIPELINE_NATS_MAX_JOBS", "",
                            "job consumers each pipeline's tasks stream allows at once: its jobs dispatched and "
                            "not yet cleaned up; when set, the streams are created with it and changed to it at "
                            "startup; unset, a new stream gets 10000 and an existing one keeps its limit (NATS 2.15 "
                            "gives a stream 1000 unless it says otherwise)"),
    "stalled_jobs_max_minutes": Option("PIPELINE_STALLED_JOBS_MAX_MINUTES", "10",
                                       "idle minutes before a running job's pending images count as lost"),
    "failure_threshold": Option("PIPELINE_FAILURE_THRESHOLD", "0.5",
                                "a job fails iff failed/total is strictly greater than this"),
    "health_check_seconds": Option("PIPELINE_HEALTH_CHECK_SECONDS", "60",
                                   "seconds between two jobs_health_check runs"),
    "job_pickup_timeout": Option("PIPELINE_JOB_PICKUP_TIMEOUT", "86400",
                                 "seconds after dispatch within which a processing service must pull a task of "
                                 "a job, or the job ends FAILURE (enqueue-job --pickup-timeout)"),
    "result_save_attempts": Option("PIPELINE_RESULT_SAVE_ATTEMPTS", "3",
                                   "attempts to save a result message that fails with an error other than an outage "
                                   "(a bug, data the code cannot handle); then its images fail with the error and the "
                                   "message is parked for `cli.py parked` (outages are waited out, never counted)"),
    "save_lanes": Option("PIPELINE_SAVE_LANES", "4",
                         "lanes one job's results are saved in on PostgreSQL: up to this many worker threads or "
                         "processes save a job's results at once, the first result to arrive for an image deciding "
                         "it; 1 saves each job's results one transaction at a time (SQLite always uses 1)"),
    "result_save_backoff": Option("PIPELINE_RESULT_SAVE_BACKOFF", "10",
                                  "seconds before the second attempt to save such a result message; doubled for each "
                                  "later one (3 attempts: about 30 s from the first to the last)"),
    "db_lock_timeout": Option("PIPELINE_DB_LOCK_TIMEOUT", "10",
                              "PostgreSQL: seconds a statement waits for a lock before it fails and is retried "
                              "(a dead client's locks never hold a job for long; 0: the server's setting)"),
    "db_idle_in_transaction_timeout": Option("PIPELINE_DB_IDLE_IN_TRANSACTION_TIMEOUT", "30",
                                             "PostgreSQL: seconds a session may sit idle inside a transaction "
                                             "before the server ends it (0: the server's setting)"),
    "db_dead_peer_timeout": Option("PIPELINE_DB_DEAD_PEER_TIMEOUT", "11",
                                   "PostgreSQL: seconds of silence after which TCP keepalives give up on the other "
                                   "end, on the server (ending a lost client's session and its locks) and on the "
                                   "client (0: the operating system's defaults, hours)"),
    "dispatch_chunk": Option("PIPELINE_DISPATCH_CHUNK", "5000",
                             "tasks run_job reads and publishes per round (its resume checkpoint; the first "
                             "round is at most 500)"),
    "metrics_port": Option("PIPELINE_METRICS_PORT", "9191",
                           "port of the workers' Prometheus endpoint (0: no metrics)"),
    "metrics_host": Option("PIPELINE_METRICS_HOST", "127.0.0.1",
                           "address the Prometheus endpoint listens on (0.0.0.0: every interface)"),
    "log_level": Option("PIPELINE_LOG_LEVEL", "INFO", "log level of workers and services: DEBUG, INFO, WARNING, ERROR"),
    "log_format": Option("PIPELINE_LOG_FORMAT", "text",
                         "text, or json: one JSON object per line with job and image ids as fields"),
    "web_host": Option("PIPELINE_WEB_HOST", "127.0.0.1", "address `cli.py web` listens on"),
    "web_port": Option("PIPELINE_WEB_PORT", "8080", "port `cli.py web` listens on"),
    "web_tokens": Option("PIPELINE_WEB_TOKENS", "",
                         "access tokens of the web server, comma-separated name:role:token (role: viewer, "
                         "operator or service), or name:role:token:project+project to limit one to projects; "
                         "none: it listens on 127.0.0.1 only"),
    "web_tokens_file": Option("PIPELINE_WEB_TOKENS_FILE", "", "a file of name:role:token lines, the same"),
    "web_max_body_mb": Option("PIPELINE_WEB_MAX_BODY_MB", "32",
                              "largest request body the web server accepts (a batch of results, a file of "
                              "URLs, any write), in MiB: 413 above it, before it is read"),
    "web_public_url": Option("PIPELINE_WEB_PUBLIC_URL", "",
                             "the web server's address as processing services reach it (behind a proxy: "
                             "https://jetpipe.example); empty: the address each request came to"),
    "web_local_images": Option("PIPELINE_WEB_LOCAL_IMAGES", "http",
                               "how the HTTP gateway hands out a task whose image is a local file: http (a "
                               "signed, expiring link served by the web server) or file (the path, for services "
                               "on the same machine)"),
    "image_roots": Option("PIPELINE_IMAGE_ROOTS", "",
                          "directories local images (file://) may come from, comma-separated: a job naming a file "
                          "outside them is refused, and none is read; unset, only the CLI on jetpipe's own machine "
                          "may name local files (not the web API)"),
    "image_hosts": Option("PIPELINE_IMAGE_HOSTS", "",
                          "hosts remote images (http, https) may come from, comma-separated; unset: any host"),
    "s3_endpoint_url": Option("PIPELINE_S3_ENDPOINT_URL", "",
                              "the S3-compatible server s3:// images are read from (MinIO, Ceph: "
                              "https://s3.lab.example); "
                              "empty: AWS S3. Credentials come the usual way (AWS_ACCESS_KEY_ID and "
                              "AWS_SECRET_ACCESS_KEY, AWS_PROFILE, an instance role), never from jetpipe's settings"),
    "s3_region": Option("PIPELINE_S3_REGION", "us-east-1", "the region the S3 requests are signed for"),
    "s3_buckets": Option("PIPELINE_S3_BUCKETS", "",
                         "buckets jobs may read s3:// images from, comma-separated; unset: any bucket from the CLI, "
                         "none through the web API"),
    "s3_url_ttl_s": Option("PIPELINE_S3_URL_TTL", "604800",
                           "seconds a task's presigned image URL stays valid (at least the task's whole lease, "
                           "ack_wait × max_deliver plus 5 minutes; at most 7 days, S3's limit): a task may wait in "
                           "its stream before it is first delivered"),
    "webhooks": Option("PIPELINE_WEBHOOKS", "",
                       "endpoints told when any job ends, comma-separated URL|secret (the secret, 16 characters or "
                       "more, signs each delivery), or URL|secret|events to choose the events (started+failing+ended)"),
    "webhook_retry_s": Option("PIPELINE_WEBHOOK_RETRY_S", "5",
                              "seconds before a failed webhook delivery is tried again (doubled per attempt)"),
    "nats_creds": Option("PIPELINE_NATS_CREDS", "", "NATS credentials file (JWT + NKey), if the server wants one"),
    "nats_tls_ca": Option("PIPELINE_NATS_TLS_CA", "", "CA bundle that signed the NATS server's TLS certificate"),
}


#: A presigned image URL outlives its task's last possible delivery by this much (seconds), and lives at most
#: S3_URL_MAX_TTL_S (a SigV4 signature's limit).
S3_URL_MARGIN_S = 300
S3_URL_MAX_TTL_S = 7 * 24 * 3600
#: The shortest secret a webhook endpoint may have.
WEBHOOK_MIN_SECRET = 16
#: What a webhook endpoint may be told: a job started, its failed images passed its failure threshold (it will end
#: FAILURE), it ended. An endpoint is told of `job.ended` unless it names others.
WEBHOOK_EVENTS = ("job.started", "job.failing", "job.ended")
DEFAULT_WEBHOOK_EVENTS = ("job.ended",)


def webhook_events(names: str | Iterable[str]) -> tuple[str, ...]:
    """Events named by `names` (`started`, `job.started`, …; joined by commas or `+` in text), in WEBHOOK_EVENTS'
    order; ValueError naming an unknown one. None named: the default."""
    given = [n.strip() for n in (re.split(r"[,+]", names) if isinstance(names, str) else names) if n.strip()]
    full = {(n if n.startswith("job.") else f"job.{n}") for n in given}
    unknown = sorted(full - set(WEBHOOK_EVENTS))
    if unknown:
        raise ValueError(f"unknown webhook event {unknown[0]!r} (use {', '.join(e[4:] for e in WEBHOOK_EVENTS)})")
    return tuple(e for e in WEBHOOK_EVENTS if e in full) or DEFAULT_WEBHOOK_EVENTS


def webhook_problem(url: str, secret: str) -> str | None:
    """What is wrong with a webhook endpoint (its URL and signing secret), else None."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return f"webhook URL {parts.scheme}://{parts.hostname or ''}… is not an http(s) URL"
    if len(secret) < WEBHOOK_MIN_SECRET:
        return f"a webhook's secret must be at least {WEBHOOK_MIN_SECRET} characters"
    return None


#: Settings whose whole value is a secret (never logged or printed).
SECRET_OPTIONS = frozenset({"web_tokens", "webhooks"})
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")
LOG_FORMATS = ("text", "json")


@dataclasses.dataclass(frozen=True)
class Settings:
    database_url: str
    redis_url: str
    nats_url: str
    nats_max_deliver: int
    nats_task_ttr: float  # seconds
    nats_max_jobs: int | None  # None: not set (a new stream gets 10,000, an existing one keeps its limit)
    nats_replicas: int | None  # None: not set (new streams get 1, existing ones are left alone)
    nats_results_max_gb: float | None  # None: not set (a new results stream gets 10 GiB)
    stalled_jobs_max_minutes: float
    failure_threshold: float
    health_check_seconds: float
    job_pickup_timeout: float
    result_save_attempts: int
    result_save_backoff: float  # seconds, doubled per attempt
    save_lanes: int
    db_lock_timeout: float  # seconds
    db_idle_in_transaction_timeout: float  # seconds
    db_dead_peer_timeout: float  # seconds
    dispatch_chunk: int
    metrics_port: int
    metrics_host: str
    log_level: str
    log_format: str
    web_host: str
    web_port: int
    web_tokens: str
    web_tokens_file: str
    web_max_body_mb: float
    web_public_url: str
    web_local_images: str
    image_roots: str
    image_hosts: str
    s3_endpoint_url: str
    s3_region: str
    s3_buckets: str
    s3_url_ttl_s: float
    webhooks: str
    webhook_retry_s: float
    nats_creds: str
    nats_tls_ca: str

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Settings:
        """Settings from `environ` (default: os.environ); raises ConfigError naming a bad variable."""
        environ = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        for field in dataclasses.fields(cls):
            option = OPTIONS[field.name]
            raw = environ.get(option.env, option.default).strip()
            values[field.name] = _convert(option.env, raw, field.type)
        settings = cls(**values)
        settings.validate()
        return settings

    def validate(self) -> None:
        if self.dispatch_chunk < 1:
            raise ConfigError("PIPELINE_DISPATCH_CHUNK must be at least 1")
        if self.nats_max_deliver < 1:
            raise ConfigError("PIPELINE_NATS_MAX_DELIVER must be at least 1")
        if self.nats_replicas is not None and not 1 <= self.nats_replicas <= 5:
            raise ConfigError("PIPELINE_NATS_REPLICAS must be between 1 and 5")
        if self.nats_results_max_gb is not None and not self.nats_results_max_gb > 0:
            raise ConfigError("PIPELINE_NATS_RESULTS_MAX_GB must be a positive number of GiB")
        if self.nats_max_jobs is not None and self.nats_max_jobs < 1:
            raise ConfigError("PIPELINE_NATS_MAX_JOBS must be at least 1")
        if self.nats_task_ttr <= 0:
            raise ConfigError("PIPELINE_NATS_TASK_TTR must be a positive number of seconds")
        if not 0 <= self.failure_threshold < 1:
            raise ConfigError("PIPELINE_FAILURE_THRESHOLD must be in [0, 1)")
        if self.health_check_seconds <= 0 or self.stalled_jobs_max_minutes <= 0:
            raise ConfigError("PIPELINE_HEALTH_CHECK_SECONDS and PIPELINE_STALLED_JOBS_MAX_MINUTES must be > 0")
        if self.result_save_attempts < 1:
            raise ConfigError("PIPELINE_RESULT_SAVE_ATTEMPTS must be at least 1")
        if not 1 <= self.save_lanes <= 64:
            raise ConfigError("PIPELINE_SAVE_LANES must be a whole number from 1 to 64")
        if self.result_save_backoff < 0:
            raise ConfigError("PIPELINE_RESULT_SAVE_BACKOFF must be a number of seconds, 0 or more")
        if min(self.db_lock_timeout, self.db_idle_in_transaction_timeout, self.db_dead_peer_timeout) < 0:
            raise ConfigError("PIPELINE_DB_LOCK_TIMEOUT, PIPELINE_DB_IDLE_IN_TRANSACTION_TIMEOUT and "
                              "PIPELINE_DB_DEAD_PEER_TIMEOUT must be 0 or more seconds")
        if self.job_pickup_timeout <= 0:
            raise ConfigError("PIPELINE_JOB_PICKUP_TIMEOUT must be a positive number of seconds")
        if self.webhook_retry_s <= 0:
            raise ConfigError("PIPELINE_WEBHOOK_RETRY_S must be a positive number of seconds")
        lease = self.nats_task_ttr * self.nats_max_deliver + S3_URL_MARGIN_S
        if not lease <= self.s3_url_ttl_s <= S3_URL_MAX_TTL_S:
            raise ConfigError(f"PIPELINE_S3_URL_TTL must be from {lease:g} s (a task's whole lease: ack_wait × "
                              f"max_deliver plus {S3_URL_MARGIN_S} s) to {S3_URL_MAX_TTL_S} s (7 days, S3's limit)")
        if self.s3_endpoint_url and not self.s3_endpoint_url.startswith(("http://", "https://")):
            raise ConfigError(f"PIPELINE_S3_ENDPOINT_URL must be an http(s) URL, not {redact(self.s3_endpoint_url)!r}")
        self.webhook_endpoints()
        if self.web_max_body_mb <= 0:
            raise ConfigError("PIPELINE_WEB_MAX_BODY_MB must be a positive number")
        if self.web_local_images not in ("http", "file"):
            raise ConfigError(f"PIPELINE_WEB_LOCAL_IMAGES must be http or file, not {self.web_local_images!r}")
        if self.web_public_url and not self.web_public_url.startswith(("http://", "https://")):
            raise ConfigError(f"PIPELINE_WEB_PUBLIC_URL must be an http(s) URL, not {self.web_public_url!r}")
        if self.log_level.upper() not in LOG_LEVELS:
            raise ConfigError(f"PIPELINE_LOG_LEVEL must be one of {', '.join(LOG_LEVELS)}, not {self.log_level!r}")
        if self.log_format not in LOG_FORMATS:
            raise ConfigError(f"PIPELINE_LOG_FORMAT must be one of {', '.join(LOG_FORMATS)}, not {self.log_format!r}")
        for name in ("nats_creds", "nats_tls_ca", "web_tokens_file"):
            path = getattr(self, name)
            if path and not os.path.isfile(path):
                raise ConfigError(f"{OPTIONS[name].env}: no such file {path!r}")
        for name in ("database_url", "redis_url", "nats_url"):
            url = getattr(self, name)
            if "://" not in url:
                raise ConfigError(f"{OPTIONS[name].env} is not a URL: {redact(url)!r}")

    def webhook_endpoints(self) -> list[tuple[str, str, tuple[str, ...]]]:
        """(url, secret, events) of each PIPELINE_WEBHOOKS entry (`URL|secret` or `URL|secret|events`, events
        joined by `+`); ConfigError names a bad one."""
        found = []
        for n, entry in enumerate((e.strip() for e in self.webhooks.split(",") if e.strip()), 1):
            url, secret, events = (entry.split("|") + ["", ""])[:3]
            problem = webhook_problem(url.strip(), secret.strip())
            try:
                chosen = webhook_events(events)
            except ValueError as exc:
                problem = problem or str(exc)
            if problem:
                raise ConfigError(f"PIPELINE_WEBHOOKS entry {n}: {problem}")
            found.append((url.strip(), secret.strip(), chosen))
        return found

    def stream_options(self) -> dict[str, int | None]:
        """How jetpipe's streams are to be made: `ensure_streams(**settings.stream_options())`. Each is None
        unless its variable is set, so that a process started without them (a CLI on a laptop) cannot turn a
        cluster's R3 streams into R1 or undo the workers' consumer limit."""
        results_bytes = int(self.nats_results_max_gb * 2**30) if self.nats_results_max_gb is not None else None
        return {"max_jobs": self.nats_max_jobs, "replicas": self.nats_replicas, "results_max_bytes": results_bytes}

    def db_session(self) -> SessionLimits:
        """The limits jetpipe sets on its PostgreSQL sessions (models.SessionLimits)."""
        from models import SessionLimits  # models imports nothing of pipeline; settings stays import-light

        return SessionLimits(lock_timeout_s=self.db_lock_timeout,
                             idle_in_transaction_s=self.db_idle_in_transaction_timeout,
                             dead_peer_s=self.db_dead_peer_timeout)

    def nats_options(self) -> NatsOptions:
        """Connection options beyond the URL (which carries user/password or token, and tls://)."""
        return {"creds": self.nats_creds, "tls_ca": self.nats_tls_ca}

    def with_overrides(self, **changes: Any) -> Settings:
        return dataclasses.replace(self, **changes)

    def to_env(self) -> dict[str, str]:
        """Every setting as the environment variables that reproduce it (secrets included: not for logs)."""
        return {OPTIONS[f.name].env: "" if (value := getattr(self, f.name)) is None else str(value)
                for f in dataclasses.fields(self)}

    def describe(self) -> dict[str, str]:
        """Every setting by environment name, with secrets masked: in URLs, and the web tokens (safe to log
        or print)."""
        described = {}
        for field, (env, text) in zip(dataclasses.fields(self), self.to_env().items(), strict=True):
            described[env] = "***" if field.name in SECRET_OPTIONS and text else redact(text)
        return described


def _convert(env: str, raw: str, kind: object) -> object:
    """`raw` as the field type `kind` names (the dataclass field's annotation: a string, as annotations are)."""
    name = str(kind)
    if name in ("int | None", "float | None"):  # optional: empty means not set
        if not raw:
            return None
        name = name.split(" ")[0]
    convert: type[int] | type[float] | type[str] = {"int": int, "float": float}.get(name, str)
    try:
        return convert(raw)
    except ValueError:
        raise ConfigError(f"{env}={raw!r} is not a valid {convert.__name__}") from None


#: Query parameters whose values are secrets: passwords and tokens that clients accept in a URL
#: (`redis://host?password=`), and the signatures and credentials of presigned object-store URLs.
SECRET_PARAMS = re.compile(r"pass|pwd|token|secret|signature|sig$|credential|key|auth", re.IGNORECASE)
#: A URL inside free text (a log line, a processing service's error message).
URL_IN_TEXT = re.compile(r"\b[a-z][a-z0-9+.-]*://[^\s'\"<>]+", re.IGNORECASE)


def shown_url(url: str) -> str:
    """`url` without what may be a credential (its query, its user and password: a webhook's key, a presigned
    URL's signature), for logs and pages."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    return urlunsplit((parts.scheme, host + (f":{parts.port}" if parts.port else ""), parts.path,
                       "…" if parts.query else "", ""))


def redact(url: str) -> str:
    """The URL with any password or token replaced by ***, in its user info and in its query string;
    never log a URL without this. A comma-separated list of URLs (NATS servers) is redacted URL by URL."""
    if "," in url and url.count("://") > 1:
        return ",".join(redact(part.strip()) for part in url.split(","))
    try:
        parts = urlsplit(url)
    except ValueError:
        return "<unparseable url>"
    if not parts.query and "@" not in parts.netloc:
        return url  # nothing to hide (and urlunsplit would turn sqlite:////abs into sqlite://abs)
    if parts.query:
        query = "&".join(
            f"{name}=***" if sep and SECRET_PARAMS.search(name) else f"{name}{sep}{value}"
            for name, sep, value in (pair.partition("=") for pair in parts.query.split("&")))
        parts = parts._replace(query=query)
    if not parts.netloc or "@" not in parts.netloc:
        return urlunsplit(parts)
    userinfo, host = parts.netloc.rsplit("@", 1)
    user = userinfo.split(":", 1)[0]
    masked = f"{user}:***" if ":" in userinfo else "***"
    return urlunsplit(parts._replace(netloc=f"{masked}@{host}"))


def redact_text(text: str) -> str:
    """`text` with every URL in it redacted (presigned image URLs in error messages, for instance)."""
    return URL_IN_TEXT.sub(lambda m: redact(m.group()), text) if "://" in text else text


_current: Settings | None = None


def get_settings() -> Settings:
    """The process-wide settings, read from the environment on first use."""
    global _current
    if _current is None:
        _current = Settings.from_env()
    return _current


def set_settings(settings: Settings | None) -> None:
    """Replace the process-wide settings (tests, and CLI options that override the environment)."""
    global _current
    _current = settings
