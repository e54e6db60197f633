"""A pipeline's backlog as an autoscaler sees it: tasks waiting, tasks in flight, the age of the oldest waiting
task, and the services at work, read from the job consumers of its tasks stream (and, for HTTP services,
from what the gateway records). Exported as Prometheus gauges by every worker (`pipeline/worker/middleware.py`)
and answered by `GET /api/v1/pipelines/{slug}/stats`.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
from typing import Any

import redis

from pipeline.infra import presence
from pipeline.infra.taskqueue import JobConsumer, SyncTaskQueue

#: HTTP services that made a request this recently count as at work.
SEEN_S = 60.0


@dataclasses.dataclass
class Backlog:
    pipeline: str
    jobs: int = 0  # jobs with a consumer (dispatched and not ended)
    tasks_waiting: int = 0  # published, not yet delivered to any service
    tasks_in_flight: int = 0  # delivered, not yet answered
    oldest_waiting_s: float = 0.0  # age of the oldest task not yet delivered (0: none waits)
    pulls_waiting: int = 0  # NATS pull requests waiting for a task: services idle right now
    http_services: int = 0  # HTTP services seen in the last SEEN_S
    last_delivery_s: float | None = None  # since the last task was delivered (None: never)

    def as_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "oldest_waiting_s": round(self.oldest_waiting_s, 1),
                "last_delivery_s": None if self.last_delivery_s is None else round(self.last_delivery_s, 1)}


def backlogs(tasks: SyncTaskQueue, client: redis.Redis | None = None,
             pipeline: str | None = None) -> dict[str, Backlog]:
    """Per pipeline (or of `pipeline` only): its backlog now. Raises TransientError when NATS cannot be read."""
    now = dt.datetime.now(dt.UTC)
    found: dict[str, Backlog] = {}
    for consumer in tasks.job_consumers(pipeline):
        backlog = found.setdefault(consumer.pipeline, Backlog(consumer.pipeline))
        _add(backlog, consumer, tasks, now)
    if pipeline is not None:
        found.setdefault(pipeline, Backlog(pipeline))
    if client is not None:
        for service in presence.http_services(client):
            if service["pipeline"] in found and service["last_request_s_ago"] <= SEEN_S:
                found[service["pipeline"]].http_services += 1
    return found


def _add(backlog: Backlog, consumer: JobConsumer, tasks: SyncTaskQueue, now: dt.datetime) -> None:
    backlog.jobs += 1
    backlog.tasks_waiting += consumer.num_pending
    backlog.tasks_in_flight += consumer.num_ack_pending
    backlog.pulls_waiting += consumer.num_waiting
    if consumer.last_active is not None:
        since = (now - _utc(consumer.last_active)).total_seconds()
        backlog.last_delivery_s = since if backlog.last_delivery_s is None else min(backlog.last_delivery_s, since)
    published = tasks.next_waiting_task_at(consumer)
    if published is not None:
        backlog.oldest_waiting_s = max(backlog.oldest_waiting_s, (now - _utc(published)).total_seconds())


def _utc(at: dt.datetime) -> dt.datetime:
    return at if at.tzinfo else at.replace(tzinfo=dt.UTC)
