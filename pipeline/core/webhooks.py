"""Webhooks when a job ends (and, for endpoints that ask, when it starts and when its failed images pass its
failure threshold): a JSON summary POSTed to the job's own endpoint (`notify_url`) and to every global one
(PIPELINE_WEBHOOKS), signed, delivered at least once.

- **Durable.** The deliveries are rows of a database outbox, written in the transaction of the change they tell
  of (`pipeline/core/progress.py`: the STARTED transition, the progress write whose failures pass the
  threshold, the one terminal transition): a job that ended has its deliveries, whatever crashes.
- **Never in the way.** Nothing waits for them: workers deliver what is due from their sweep
  (`due`, then `deliver` each), each row claimed for a lease first so that two workers never send it at once.
- **Retried.** A delivery that does not get a 2xx answer is tried again after `PIPELINE_WEBHOOK_RETRY_S`
  doubled per attempt (at most an hour apart), MAX_ATTEMPTS times, then given up with its last error.
- **Signed** as the Standard Webhooks specification says: headers `webhook-id` (the same on every attempt:
  a receiver drops duplicates by it), `webhook-timestamp` (Unix seconds: a receiver refuses old ones) and
  `webhook-signature: v1,<base64 HMAC-SHA256 of "<id>.<timestamp>.<body>" under the endpoint's secret>`.
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import hmac
import json
import logging
import time
from collections.abc import Iterable
from typing import Any, NamedTuple

import httpx

from models import Job, Pipeline, Project, WebhookDelivery, tuples, utcnow
from pipeline.errors import UserInputError
from pipeline.settings import DEFAULT_WEBHOOK_EVENTS, Settings, shown_url, webhook_events, webhook_problem

log = logging.getLogger(__name__)

JOB_STARTED, JOB_FAILING, JOB_ENDED = "job.started", "job.failing", "job.ended"
MAX_ATTEMPTS = 12
MAX_BACKOFF_S = 3600.0
SEND_TIMEOUT_S = 10.0
#: Seconds a worker holds a delivery it is sending (longer than a send can take): a worker killed while sending
#: leaves it to another after this.
LEASE_S = SEND_TIMEOUT_S + 5.0


def check_endpoint(url: str, secret: str) -> None:
    """A job's own endpoint: UserInputError saying what is wrong with it."""
    problem = webhook_problem(url, secret)
    if problem:
        raise UserInputError(problem)


class Endpoint(NamedTuple):
    """A job's own webhook endpoint: where, the secret that signs its deliveries, and what it is told of."""

    url: str
    secret: str
    events: str | Iterable[str] = DEFAULT_WEBHOOK_EVENTS


def check_events(names: str | Iterable[str]) -> tuple[str, ...]:
    """The events a job's own endpoint asks for (`started`, `failing`, `ended`); UserInputError naming an unknown
    one."""
    try:
        return webhook_events(names)
    except ValueError as exc:
        raise UserInputError(str(exc)) from None


def job_events(job: Job) -> tuple[str, ...]:
    """The events the job's own endpoint is told of."""
    return tuple(job.notify_events.split(",")) if job.notify_events else DEFAULT_WEBHOOK_EVENTS


def enqueue(job_id: int, event: str, settings: Settings) -> int:
    """Write the job's deliveries of `event`, one per endpoint that asked for it; inside the caller's transaction
    (the change it tells of). Idempotent: a delivery per job, endpoint and event. How many were new."""
    targets = [(url, secret) for url, secret, events in settings.webhook_endpoints() if event in events]
    row = (Job.select(Job, Pipeline, Project).join(Pipeline).switch(Job).join(Project)
           .where(Job.id == job_id).get_or_none())
    if row is None:
        return 0
    if row.notify_url and event in job_events(row):
        targets.append((row.notify_url, row.notify_secret or ""))
    if not targets:
        return 0
    body = json.dumps(summary(row, event), separators=(",", ":"))
    now = utcnow()
    rows = [{"job_id": job_id, "url": url, "secret": secret, "event": event, "body": body, "created_at": now,
             "next_attempt_at": now} for url, secret in targets]
    return int(WebhookDelivery.insert_many(rows).on_conflict_ignore().as_rowcount().execute())


def summary(job: Job, event: str = JOB_ENDED) -> dict[str, Any]:
    """The body of a delivery of `event`: the job as it stands (`finished_at` is null until it ends)."""
    stages = (job.progress or {}).get("stages", {})
    process, results = stages.get("process", {}), stages.get("results", {})
    finished = job.finished_at or (utcnow() if event == JOB_ENDED else None)
    return {"event": event, "job": {
        "id": job.id, "name": job.name, "project": job.project_name, "pipeline": job.pipeline.slug,
        "status": job.status, "error": job.error, "total_images": job.total_images,
        "processed": process.get("processed", 0), "failed": process.get("failed", 0),
        "detections": results.get("detections", 0), "classifications": results.get("classifications", 0),
        "created_at": _iso(job.created_at), "started_at": _iso(job.started_at), "finished_at": _iso(finished)}}


def _iso(value: dt.datetime | None) -> str | None:
    return value.isoformat(timespec="seconds") + "Z" if value else None


def signature(secret: str, message_id: str, timestamp: int, body: str) -> str:
    digest = hmac.new(secret.encode(), f"{message_id}.{timestamp}.{body}".encode(), hashlib.sha256).digest()
    return "v1," + base64.b64encode(digest).decode()


def due(limit: int = 50) -> list[int]:
    """Deliveries due now (not delivered, attempts left, their time come)."""
    query = (WebhookDelivery.select(WebhookDelivery.id).where(WebhookDelivery.next_attempt_at <= utcnow())
             .order_by(WebhookDelivery.next_attempt_at).limit(limit))  # sent or given up: next_attempt_at is None
    return [delivery_id for (delivery_id,) in tuples(query)]


def next_due_in(horizon_s: float) -> float | None:
    """Seconds until the next delivery is due, if one is due within `horizon_s` (0: now)."""
    soonest = (WebhookDelivery.select(WebhookDelivery.next_attempt_at).where(
        WebhookDelivery.next_attempt_at.is_null(False)).order_by(WebhookDelivery.next_attempt_at).limit(1).scalar())
    if soonest is None:
        return None
    wait = max((soonest - utcnow()).total_seconds(), 0.0)
    return wait if wait <= horizon_s else None


def claim(row: WebhookDelivery, now: dt.datetime) -> bool:
    """Take the delivery `row` (as read) for LEASE_S: True for exactly one of the workers that read it at the
    same time (the update is conditional on the attempt time they read)."""
    return bool(WebhookDelivery.update(next_attempt_at=now + dt.timedelta(seconds=LEASE_S)).where(
        (WebhookDelivery.id == row.id) & (WebhookDelivery.next_attempt_at == row.next_attempt_at)).execute())


def deliver(delivery_id: int, settings: Settings) -> bool:
    """Claim and send one delivery; True if its endpoint accepted it (2xx)."""
    now = utcnow()
    row = WebhookDelivery.get_or_none(WebhookDelivery.id == delivery_id)
    if row is None or row.next_attempt_at is None or row.next_attempt_at > now:
        return False
    if not claim(row, now):
        return False  # another worker has it
    message_id = f"jetpipe-{row.job_id}-{row.id}"
    timestamp = int(time.time())
    headers = {"content-type": "application/json", "user-agent": "jetpipe-webhooks", "webhook-id": message_id,
               "webhook-timestamp": str(timestamp),
               "webhook-signature": signature(row.secret, message_id, timestamp, row.body)}
    status, error = None, None
    try:
        answer = httpx.post(row.url, content=row.body.encode(), headers=headers, timeout=SEND_TIMEOUT_S,
                            follow_redirects=False)
        status = answer.status_code
        if not 200 <= status < 300:
            error = f"answered {status}"
    except httpx.HTTPError as exc:
        error = f"{type(exc).__name__}: {str(exc)[:200] or 'no answer'}"
    attempts = (row.attempts or 0) + 1
    if error is None:
        WebhookDelivery.update(delivered_at=utcnow(), attempts=attempts, last_status=status, last_error=None,
                               next_attempt_at=None).where(WebhookDelivery.id == delivery_id).execute()
        log.info("job=%s webhook %s delivered to %s (attempt %s)", row.job_id, message_id, shown_url(row.url), attempts)
        return True
    changes: dict[Any, Any] = {WebhookDelivery.attempts: attempts, WebhookDelivery.last_status: status,
                               WebhookDelivery.last_error: error}
    if attempts >= MAX_ATTEMPTS:
        changes[WebhookDelivery.gave_up_at] = utcnow()
        changes[WebhookDelivery.next_attempt_at] = None
        log.warning("job=%s webhook %s to %s given up after %s attempts: %s", row.job_id, message_id,
                    shown_url(row.url), attempts, error)
    else:
        wait = min(settings.webhook_retry_s * 2 ** (attempts - 1), MAX_BACKOFF_S)
        changes[WebhookDelivery.next_attempt_at] = utcnow() + dt.timedelta(seconds=wait)
        log.info("job=%s webhook %s to %s failed (%s); attempt %s in %.0f s", row.job_id, message_id,
                 shown_url(row.url), error, attempts + 1, wait)
    WebhookDelivery.update(changes).where(WebhookDelivery.id == delivery_id).execute()
    return False


def of_job(job_id: int) -> list[dict[str, Any]]:
    """The job's deliveries as people and the API see them (no secret, no credential in a URL)."""
    rows = WebhookDelivery.select().where(WebhookDelivery.job_id == job_id).order_by(WebhookDelivery.id)
    return [{"url": shown_url(r.url), "event": r.event, "attempts": r.attempts or 0, "last_status": r.last_status,
             "last_error": r.last_error, "delivered_at": _iso(r.delivered_at), "gave_up_at": _iso(r.gave_up_at),
             "next_attempt_at": _iso(r.next_attempt_at)} for r in rows]


def failing() -> int:
    """Deliveries given up: `health` names them."""
    return WebhookDelivery.select().where(WebhookDelivery.gave_up_at.is_null(False)).count()
