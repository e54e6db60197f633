"""Webhooks when a job ends, and when it starts or its failures pass the threshold for endpoints that ask
(pipeline/core/webhooks.py), delivered by real worker processes to a local receiver that fails, hangs and
recovers: one accepted delivery per job end, signed, never lost to a killed worker."""

from __future__ import annotations

import base64
import hashlib
import hmac
import http.server
import json
import threading
import time

import httpx
import pytest

from models import Job, WebhookDelivery
from pipeline.core import jobs, webhooks
from pipeline.errors import UserInputError
from pipeline.ops.devstack import free_port
from tests.conftest import kill_group, wait_for
from tests.helpers import dispatch, error_body, fake_job, handle_result_message, pull_tasks
from tests.web_helpers import TOKENS_SETTING, WebServer, bearer

pytestmark = pytest.mark.slow
SQLITE_ONLY = pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)  # about processes and HTTP
SECRET = "whsec-test-0123456789abcdef"


class Receiver:
    """A local webhook endpoint: answers 500 to the first `failures` requests, holds the first one `hang_s`."""

    def __init__(self, *, failures: int = 0, hang_s: float = 0.0):
        self.failures, self.hang_s = failures, hang_s
        self.requests: list[tuple[dict, bytes, int]] = []  # (headers, body, the status answered)
        receiver = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802 - http.server's name
                body = self.rfile.read(int(self.headers["content-length"]))
                first = not receiver.requests
                status = 500 if len(receiver.requests) < receiver.failures else 200
                receiver.requests.append(({k.lower(): v for k, v in self.headers.items()}, body, status))
                if first and receiver.hang_s:
                    time.sleep(receiver.hang_s)
                self.send_response(status)
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", free_port()), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}/hooks/jetpipe?key=abc"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def accepted(self) -> list[tuple[dict, bytes, int]]:
        return [r for r in self.requests if r[2] == 200]

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def receiver():
    made: list[Receiver] = []

    def make(**options) -> Receiver:
        made.append(Receiver(**options))
        return made[-1]

    yield make
    for r in made:
        r.stop()


def verified(headers: dict, body: bytes, secret: str = SECRET) -> bool:
    signed = f"{headers['webhook-id']}.{headers['webhook-timestamp']}.{body.decode()}".encode()
    expected = base64.b64encode(hmac.new(secret.encode(), signed, hashlib.sha256).digest()).decode()
    fresh = abs(time.time() - int(headers["webhook-timestamp"])) < 300
    return headers["webhook-signature"] == f"v1,{expected}" and fresh


@SQLITE_ONLY
def test_an_endpoint_down_for_three_attempts_gets_exactly_one_accepted_signed_delivery(
        settings, runtime, moth_pipeline, worker_factory, receiver):
    endpoint = receiver(failures=3)
    hooked = settings.with_overrides(webhooks=f"{endpoint.url}|{SECRET}", webhook_retry_s=0.3)
    from pipeline.settings import set_settings

    set_settings(hooked)
    worker_factory(hooked, threads=2)
    job = fake_job(moth_pipeline, 3, name="night 7")
    jobs.cancel(runtime, job.id, by="test")
    wait_for(lambda: endpoint.accepted(), timeout_s=60, message="an accepted delivery")
    time.sleep(2)  # nothing more comes
    assert [status for _, _, status in endpoint.requests] == [500, 500, 500, 200]
    headers, body, _ = endpoint.accepted()[0]
    assert verified(headers, body)
    assert len({h["webhook-id"] for h, _, _ in endpoint.requests}) == 1  # the same id on every attempt
    sent = json.loads(body)
    assert sent["event"] == "job.ended"
    assert {k: sent["job"][k] for k in ("id", "name", "status", "project")} == {
        "id": job.id, "name": "night 7", "status": "REVOKED", "project": "default"}
    [delivery] = webhooks.of_job(job.id)
    assert delivery["attempts"] == 4 and delivery["delivered_at"] and delivery["url"].endswith("/hooks/jetpipe?…")


@SQLITE_ONLY
def test_a_worker_killed_while_delivering_loses_nothing(settings, runtime, moth_pipeline, worker_factory, receiver):
    endpoint = receiver(hang_s=6)  # the first request hangs; the worker sending it is killed meanwhile
    hooked = settings.with_overrides(webhooks=f"{endpoint.url}|{SECRET}", webhook_retry_s=0.3)
    from pipeline.settings import set_settings

    set_settings(hooked)
    worker = worker_factory(hooked, threads=2)
    job = fake_job(moth_pipeline, 2)
    jobs.cancel(runtime, job.id, by="test")
    wait_for(lambda: endpoint.requests, timeout_s=30, message="the first delivery to start")
    kill_group(worker)
    worker_factory(hooked, threads=2)
    wait_for(lambda: len(endpoint.requests) >= 2, timeout_s=60, message="the delivery sent again by another worker")
    wait_for(lambda: WebhookDelivery.get(WebhookDelivery.job_id == job.id).delivered_at, timeout_s=30,
             message="the delivery recorded")
    assert len({h["webhook-id"] for h, _, _ in endpoint.requests}) == 1 and all(
        verified(h, b) for h, b, _ in endpoint.requests)


def test_a_jobs_own_endpoint_is_told_and_its_secret_is_never_shown(settings, runtime, moth_pipeline):
    server = WebServer(settings.with_overrides(web_tokens=TOKENS_SETTING), runtime).start()
    try:
        with httpx.Client(base_url=server.url, timeout=30) as web:
            body = {"pipeline": moth_pipeline, "urls": ["https://traps.example/1.jpg"],
                    "notify_url": "https://lab.example/hook", "notify_secret": SECRET}
            made = web.post("/api/v1/jobs", json=body, headers=bearer("ada"))
            assert made.status_code == 201, made.text
            job_id = made.json()["id"]
            web.post(f"/api/v1/jobs/{job_id}/cancel", headers=bearer("ada"))
            shown = web.get(f"/api/v1/jobs/{job_id}", headers=bearer("vic"))
            assert SECRET not in shown.text and shown.json()["webhooks"][0]["url"] == "https://lab.example/hook"
            short = web.post("/api/v1/jobs", json={**body, "notify_secret": "short"}, headers=bearer("ada"))
            assert short.status_code == 400 and "at least 16 characters" in short.json()["error"]
            odd = web.post("/api/v1/jobs", json={**body, "notify_events": ["ended", "paused"]}, headers=bearer("ada"))
            assert odd.status_code == 400 and "unknown webhook event 'job.paused'" in odd.json()["error"]
            told = web.post("/api/v1/jobs", json={**body, "notify_events": ["started", "ended"]}, headers=bearer("ada"))
            assert told.status_code == 201
            assert Job.get_by_id(told.json()["id"]).notify_events == "job.started,job.ended"
    finally:
        server.stop()
    [row] = WebhookDelivery.select().where(WebhookDelivery.job_id == job_id)
    assert (row.secret, json.loads(row.body)["job"]["status"]) == (SECRET, "REVOKED")


def test_a_terminal_transition_writes_one_delivery_per_endpoint_however_often_it_is_retried(settings, runtime,
                                                                                           moth_pipeline):
    from pipeline.settings import set_settings

    set_settings(settings.with_overrides(webhooks=f"https://a.example/h|{SECRET},https://b.example/h|{SECRET}"))
    job = fake_job(moth_pipeline, 1)
    jobs.cancel(runtime, job.id, by="test")
    jobs.cancel(runtime, job.id, by="test")  # already ended: nothing more
    assert webhooks.enqueue(job.id, webhooks.JOB_ENDED, settings.with_overrides(
        webhooks=f"https://a.example/h|{SECRET},https://b.example/h|{SECRET}")) == 0  # written once already
    assert sorted(d["url"] for d in webhooks.of_job(job.id)) == ["https://a.example/h", "https://b.example/h"]
    with pytest.raises(UserInputError, match="not an http"):
        webhooks.check_endpoint("ftp://x.example/h", SECRET)


def test_of_workers_that_read_a_delivery_at_once_one_claims_it_and_only_it_sends(settings, runtime, moth_pipeline,
                                                                               receiver):
    from models import utcnow
    from pipeline.settings import set_settings

    endpoint = receiver()
    hooked = settings.with_overrides(webhooks=f"{endpoint.url}|{SECRET}")
    set_settings(hooked)
    job = fake_job(moth_pipeline, 1)
    jobs.cancel(runtime, job.id, by="test")
    # Given four workers that all read the due delivery before any claimed it
    read = [WebhookDelivery.get(WebhookDelivery.job_id == job.id) for _ in range(4)]
    # Then exactly one claim succeeds, and the others find it taken when they come to send it
    assert [webhooks.claim(row, utcnow()) for row in read].count(True) == 1
    assert [webhooks.deliver(row.id, hooked) for row in read] == [False] * 4  # held by the claim's lease
    assert webhooks.due() == [] and endpoint.requests == []


def test_each_endpoint_is_told_of_the_events_it_asks_for_once_each(settings, runtime, moth_pipeline):
    from pipeline.settings import set_settings

    # Given a global endpoint told of job ends (the default), one told of everything, and a job's own endpoint
    # told only when its failures pass the threshold (more than half of its images failed)
    everything = "https://all.example/h"
    set_settings(settings.with_overrides(failure_threshold=0.5, webhooks=(
        f"https://ends.example/h|{SECRET},{everything}|{SECRET}|started+failing+ended")))
    job = fake_job(moth_pipeline, 4, notify=("https://own.example/h", SECRET, "failing"))

    def told() -> list[tuple[str, str, str | None]]:
        return [(d.url.split("/")[2], d.event, json.loads(d.body)["job"]["status"]) for d in
                WebhookDelivery.select().where(WebhookDelivery.job_id == job.id).order_by(WebhookDelivery.id)]

    # When it starts
    dispatch(runtime, job.id)
    assert told() == [("all.example", "job.started", "STARTED")]
    # and its images fail one by one: the third failure passes the threshold (2 of 4 is not above half)
    tasks = pull_tasks(runtime, job.id, 4)
    for n, (task, reply) in enumerate(tasks, 1):
        handle_result_message(runtime, job.id, error_body(task.image_id), reply, task.task_token)
        if n == 2:
            assert len(told()) == 1
    # Then each endpoint was told of what it asked for, once
    assert told() == [("all.example", "job.started", "STARTED"), ("all.example", "job.failing", "STARTED"),
                      ("own.example", "job.failing", "STARTED"), ("ends.example", "job.ended", "FAILURE"),
                      ("all.example", "job.ended", "FAILURE")]
    failing = json.loads(WebhookDelivery.get((WebhookDelivery.job_id == job.id)
                                             & (WebhookDelivery.event == "job.failing")).body)
    assert failing["job"]["failed"] == 3 and failing["job"]["finished_at"] is None and failing["job"]["started_at"]


def test_unknown_webhook_events_are_refused_with_a_clear_error(settings, moth_pipeline):
    from pipeline.errors import ConfigError

    with pytest.raises(UserInputError, match="unknown webhook event 'job.paused'"):
        fake_job(moth_pipeline, 1, notify=("https://own.example/h", SECRET, "paused"))
    with pytest.raises(ConfigError, match="PIPELINE_WEBHOOKS entry 1: unknown webhook event 'job.done'"):
        settings.with_overrides(webhooks=f"https://a.example/h|{SECRET}|done").webhook_endpoints()
    assert settings.with_overrides(webhooks=f"https://a.example/h|{SECRET}").webhook_endpoints() == [
        ("https://a.example/h", SECRET, ("job.ended",))]
