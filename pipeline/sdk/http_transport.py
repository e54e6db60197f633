"""The processing-service SDK over HTTP: `ProcessingService(..., transport=HttpTransport(url, token=…))`.

For services that cannot reach NATS (a lab GPU behind a firewall): the same handler, run against the web
server's gateway (`/api/v2`, docs/processing-services.md). It finds the pipeline's running jobs (when there
are none, its listing waits at the gateway until one is announced: a long poll), reserves
as many tasks as it has free slots, runs the handler (in a thread of its own per task, with the SDK's
deadline), keeps each task's lease alive with `tasks/in_progress/` while the handler runs, and returns
results in batches (`results_per_post`, or after `linger_s`). A 503 (NATS or the results stream down) is
retried with backoff and the results are kept; a 409 (the job ended, or the task is not the job's) drops
them, since no retry can help.
"""

from __future__ import annotations

import asyncio
import collections
import logging

import httpx
import msgspec
from opentelemetry.trace import SpanKind

from pipeline.errors import ConfigError
from pipeline.infra import tracing
from pipeline.infra.outage import Outage
from pipeline.schemas import Task, encode
from pipeline.sdk.transport import Service

log = logging.getLogger(__name__)

#: Seconds between two looks for jobs when none has a task for us.
IDLE_S = 0.5
#: Seconds a listing may wait at the gateway for a job to be announced when there is none (a long poll; a
#: gateway that does not know the `wait` parameter answers at once, and the service looks again after IDLE_S).
LONG_POLL_S = 20.0
#: Seconds between two lease extensions of a running task (the default ack_wait is 30 s).
KEEP_ALIVE_S = 10.0
#: How long a partly filled POST of results may wait (seconds).
LINGER_S = 0.1
#: Attempts to return one batch of results while the gateway answers 503 (about two minutes).
POST_ATTEMPTS = 12


class HttpTransport:
    """The service's link to a jetpipe web server's gateway at `url` (`token`: a `service` token).
    `results_per_post`: results returned in one POST (default: the service's batch_size)."""

    def __init__(self, url: str, *, token: str = "", results_per_post: int | None = None,
                 linger_s: float = LINGER_S):
        if not url:
            raise ValueError("the HTTP transport needs the web server's url")
        self.url = url.rstrip("/")
        self.headers = {"Authorization": f"Token {token}"} if token else {}
        self._results_per_post = results_per_post
        self.results_per_post = results_per_post or 1
        self.linger_s = linger_s
        self._free = 0
        self._slot_freed = asyncio.Event()
        self._pending: dict[int, list[dict]] = {}
        self._inflight: set[asyncio.Task] = set()
        self._running: collections.Counter[int] = collections.Counter()  # per job: tasks its handler runs

    async def run(self, service: Service) -> None:
        """Reserve and answer the pipeline's tasks until the service stops; survives gateway outages."""
        self.service = service
        self._free = service.concurrency
        self.results_per_post = self._results_per_post or service.batch_size
        outage = Outage(f"service {service.name}: gateway {self.url}", log)
        log.info("service %s pulling pipeline %s over HTTP from %s with %s slot(s)", service.name,
                 service.pipeline, self.url, service.concurrency)
        async with httpx.AsyncClient(base_url=self.url, headers=self.headers, timeout=60) as client:
            self.client = client
            flusher = asyncio.create_task(self._flush_forever())
            try:
                while not service.stopping.is_set():
                    try:
                        got = await self._round(client)
                        outage.ok()
                    except (httpx.HTTPError, GatewayBusy) as exc:
                        await service.wait(outage.failed(str(exc) or type(exc).__name__))
                        continue
                    if not got:
                        await service.wait(IDLE_S)
            finally:
                if self._inflight:
                    await asyncio.gather(*self._inflight, return_exceptions=True)
                flusher.cancel()
                await self._flush_all()

    async def _round(self, client: httpx.AsyncClient) -> bool:
        """One look at every running job of the pipeline; True if any task came."""
        listing = await self._list_jobs(client)
        if listing is None:  # stopped while waiting for a job
            return False
        _raise_for(listing)
        got = False
        for job in listing.json()["results"]:
            while self._free <= 0 and not self.service.stopping.is_set():
                self._slot_freed.clear()
                await self.service.wait_for(self._slot_freed, 1.0)
            if self.service.stopping.is_set():
                break
            reply = await client.post(f"/api/v2/jobs/{job['id']}/tasks/",
                                      json={"batch_size": self._free, "client_info": {"name": self.service.name}})
            if reply.status_code in (400, 404):
                continue  # not a job for services after all, or gone
            _raise_for(reply)
            for task in reply.json()["tasks"]:
                got = True
                self._free -= 1
                self._running[job["id"]] += 1
                running = asyncio.create_task(self._process(job["id"], task))
                self._inflight.add(running)
                running.add_done_callback(self._inflight.discard)
        return got

    async def _list_jobs(self, client: httpx.AsyncClient) -> httpx.Response | None:
        """The pipeline's running jobs; when there are none, the gateway holds the request until one is announced
        (or LONG_POLL_S passes). None if the service stopped meanwhile."""
        listing = asyncio.ensure_future(client.get("/api/v2/jobs/", params={
            "ids_only": 1, "incomplete_only": 1, "pipeline__slug__in": self.service.pipeline, "wait": LONG_POLL_S}))
        stopping = asyncio.ensure_future(self.service.stopping.wait())
        await asyncio.wait((listing, stopping), return_when=asyncio.FIRST_COMPLETED)
        stopping.cancel()
        if not listing.done():
            listing.cancel()
            return None
        return listing.result()

    async def _process(self, job_id: int, task: dict) -> None:
        keep_alive = asyncio.create_task(self._keep_alive(job_id, task["reply_subject"]))
        try:
            with tracing.span("jetpipe.service.task", parent=task.get(tracing.TRACEPARENT), kind=SpanKind.CONSUMER,
                              attributes={"jetpipe.job_id": job_id, "jetpipe.image_id": str(task["image_id"]),
                                          "jetpipe.service": self.service.name}):
                trace = tracing.traceparent()
                result = await self.service.run_task(Task(job_id=job_id, image_id=str(task["image_id"]),
                                                           image_url=task["image_url"], pipeline=self.service.pipeline))
        finally:
            keep_alive.cancel()
            self._free += 1
            self._running[job_id] -= 1
            if self._running[job_id] <= 0:
                del self._running[job_id]
            self._slot_freed.set()
        answer = {"reply_subject": task["reply_subject"], "result": msgspec.json.decode(encode(result))}
        if trace:
            answer[tracing.TRACEPARENT] = trace
        self._pending.setdefault(job_id, []).append(answer)
        # full, or nothing else of the job in hand to join it: return it now rather than after the linger
        if len(self._pending[job_id]) >= self.results_per_post or not self._running[job_id]:
            await self._flush(job_id)

    async def _keep_alive(self, job_id: int, reply: str) -> None:
        while True:
            await asyncio.sleep(KEEP_ALIVE_S)
            try:
                await self.client.post(f"/api/v2/jobs/{job_id}/tasks/in_progress/", json={"reply_subjects": [reply]})
            except httpx.HTTPError:
                pass  # a lost extension only risks a redelivery

    async def _flush_forever(self) -> None:
        while True:
            await asyncio.sleep(self.linger_s)
            await self._flush_all()

    async def _flush_all(self) -> None:
        for job_id in list(self._pending):
            await self._flush(job_id)

    async def _flush(self, job_id: int) -> None:
        results = self._pending.pop(job_id, [])
        if not results:
            return
        for attempt in range(1, POST_ATTEMPTS + 1):
            posted: httpx.Response | None = None
            try:
                posted = await self.client.post(f"/api/v2/jobs/{job_id}/result/", json={"results": results})
                error = f"{posted.status_code} {posted.text[:200]}"
            except httpx.HTTPError as exc:
                error = str(exc) or type(exc).__name__
            if posted is not None and posted.status_code == 200:
                return
            if posted is not None and posted.status_code not in (502, 503, 504):
                log.warning("service %s: job=%s %s result(s) refused (%s); dropped", self.service.name, job_id,
                            len(results), error)
                return
            log.log(logging.WARNING if attempt == 1 else logging.DEBUG,
                    "service %s: job=%s returning results failed (%s); retrying", self.service.name, job_id, error)
            await asyncio.sleep(min(0.5 * 2 ** attempt, 10))
        log.warning("service %s: job=%s %s result(s) not returned; their tasks return after ack_wait",
                    self.service.name, job_id, len(results))


class GatewayBusy(Exception):
    """The gateway answered 5xx (NATS or the results stream unavailable): try again later."""


def _raise_for(response: httpx.Response) -> None:
    if response.status_code >= 500:
        raise GatewayBusy(f"{response.status_code} {response.text[:200]}")
    if response.status_code in (401, 403):
        raise ConfigError(f"the gateway refused this service's token ({response.status_code}): "
                          f"{response.json().get('error', '')}")
    response.raise_for_status()

