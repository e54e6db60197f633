"""Two processing services with their own NATS users, on their own pipelines, side by side (issue 25):
the shipped NATS configuration with a second team's user made by `cli.py nats service-user`, a worker, two
SDK services, and one of them trying everything against the other's job. NATS refuses each attempt, and
both jobs end exact."""

from __future__ import annotations

import asyncio
import json

import nats as nats_py
import pytest

from models import Job, JobImage, JobStatus
from pipeline import names
from pipeline.core.jobs import create_job, start_job
from pipeline.core.registry import register_pipeline
from pipeline.infra.runtime import Runtime, set_runtime
from pipeline.schemas import decode_pipeline_spec, decode_result
from pipeline.sdk import moth
from pipeline.settings import Settings
from tests.conftest import wait_for
from tests.helpers import settings_on, success_body

BIRDS = {**moth.PIPELINE_SPEC, "slug": "birds", "name": "Birds"}


async def attack(url_b: str, job_a: Job, reply_of_a: str) -> list[str]:
    """Everything lab-b tries against job A (moth-demo); the subjects NATS refused, as it reported them."""
    refused: list[str] = []

    async def errors(exc):
        refused.append(str(exc))

    nc = await nats_py.connect(url_b, inbox_prefix="_INBOX.lab-b", error_cb=errors, max_reconnect_attempts=1)
    try:
        stream = names.tasks_stream(moth.SLUG)
        for subject in ("_INBOX.jetpipe-service.>", "_INBOX.>", "pipeline.tasks.>",  # read A's deliveries
                        names.job_announcements(moth.SLUG)):  # hear of A's jobs
            await nc.subscribe(subject)
        body = json.dumps({"error": "forged", "image_id": "1"}).encode()
        for subject, payload in (
                (f"$JS.API.CONSUMER.LIST.{stream}", b""),  # find A's jobs
                (f"$JS.API.CONSUMER.MSG.NEXT.{stream}.{names.job_consumer(job_a.id)}", b'{"batch": 5}'),  # reserve
                (names.result_subject(moth.SLUG, job_a.id), body),  # decide or fail its images
                (f"pipeline.results.{job_a.id}", body),  # the same, on the older subject
                (reply_of_a, b"+ACK"),  # ACK a task of A
                (reply_of_a, b"+TERM image=1"),  # TERM it
                (f"$JS.API.STREAM.INFO.OBJ_{names.result_objects_bucket(moth.SLUG)}", b""),  # A's big results
                (f"$O.{names.result_objects_bucket(moth.SLUG)}.C.forged", b"x"),  # put an object in A's bucket
        ):
            await nc.publish(subject, payload, reply=f"_INBOX.lab-b.{len(refused)}")
        # a result on its own pipeline's subject, naming job A: NATS lets it through; jetpipe refuses it
        await nc.publish(names.result_subject("birds", job_a.id), body)
        await nc.flush()
        await asyncio.sleep(1)
    finally:
        await nc.close()
    return refused


@pytest.mark.slow
def test_two_services_with_their_own_users_run_side_by_side_and_cannot_touch_each_other(
        two_teams, sqlite_url, worker_factory, service_factory):
    urls, redis_url = two_teams

    def settings_as(user: str) -> Settings:
        return settings_on(sqlite_url, urls[user], redis_url, PIPELINE_NATS_TASK_TTR=5)

    for spec in (moth.PIPELINE_SPEC, BIRDS):
        register_pipeline(decode_pipeline_spec(json.dumps(spec).encode(), source="test"))
    # Given a worker, and a service per team (each as its own NATS user), slowed so that jobs run a while
    worker_factory(settings_as("jetpipe-worker"))
    runtime = Runtime(settings_as("jetpipe-operator"))
    previous = set_runtime(runtime)
    try:
        job_a = create_job(moth.SLUG, [f"file:///a/{i}.png" for i in range(20)])
        job_b = create_job("birds", [f"file:///b/{i}.png" for i in range(20)])
        start_job(runtime, job_a)
        start_job(runtime, job_b)
        wait_for(lambda: Job.get_by_id(job_a.id).status == JobStatus.STARTED, timeout_s=30, message="dispatch")
        replies = _hold_one_task(urls["jetpipe-service"], job_a)
        # When lab-b tries to list, reserve, read, decide, fail, ACK and TERM anything of job A
        refused = asyncio.run(attack(urls["lab-b"], job_a, replies))
        # Then NATS refuses every attempt, each reported as a permissions violation
        text = " ".join(refused).lower()
        stream = names.tasks_stream(moth.SLUG).lower()
        for subject in ("_inbox.jetpipe-service.>", "_inbox.>", "pipeline.tasks.>", f"pipeline.jobs.{moth.SLUG}",
                        f"$js.api.consumer.list.{stream}", f"$js.api.consumer.msg.next.{stream}.job-{job_a.id}",
                        f"pipeline.results.{moth.SLUG}.{job_a.id}", f"pipeline.results.{job_a.id}", replies.lower(),
                        f"$js.api.stream.info.obj_results_{moth.SLUG}", f"$o.results_{moth.SLUG}.c.forged"):
            assert f'"{subject}"' in text, (subject, refused)
        # (while each team's own user hears its pipeline's new jobs announced)
        assert asyncio.run(hears_announcements(urls["jetpipe-service"], moth.SLUG))
        assert not asyncio.run(hears_announcements(urls["jetpipe-service"], "birds"))
        # And both services run their own jobs to the end, exact
        service_factory(settings_as("jetpipe-service"), moth.SLUG,
                        lambda task: decode_result(success_body(task, boxes=2)))
        service_factory(settings_as("lab-b"), "birds", lambda task: decode_result(success_body(task, boxes=1)))
        for job, boxes in ((job_a, 2), (job_b, 1)):
            ended = wait_for(lambda job=job: (j := Job.get_by_id(job.id)).status in JobStatus.TERMINAL and j,
                             timeout_s=90, message=f"job {job.id} to end")
            stages = ended.progress["stages"]
            assert ended.status == JobStatus.SUCCESS
            assert (stages["process"]["processed"], stages["process"]["failed"]) == (20, 0)
            assert stages["results"]["detections"] == 20 * boxes
        assert not JobImage.select().where(JobImage.error.is_null(False)).exists()
        # And the one result NATS let through (job A's id on lab-b's own subject) was refused by jetpipe
        from models import JobLog

        assert JobLog.select().where((JobLog.job == job_a.id) & JobLog.message.contains(
            "published on the results subject of pipeline 'birds'")).exists()
    finally:
        set_runtime(previous)
        runtime.close()


async def hears_announcements(url: str, pipeline: str) -> bool:
    """Whether the user of `url` may listen to the pipeline's job announcements (NATS reports a refusal)."""
    refused: list[str] = []

    async def errors(exc):
        refused.append(str(exc))

    nc = await nats_py.connect(url, inbox_prefix="_INBOX.jetpipe-service", error_cb=errors,
                               max_reconnect_attempts=1)
    try:
        await nc.subscribe(names.job_announcements(pipeline))
        await nc.flush(2)
        await asyncio.sleep(0.2)  # a refusal arrives as an asynchronous error
    finally:
        await nc.close()
    return not refused


def _hold_one_task(url_a: str, job_a: Job) -> str:
    """Service A holds one task of job A (pulled, not answered: it comes back after ack_wait); its reply subject."""

    async def pull():
        nc = await nats_py.connect(url_a, inbox_prefix="_INBOX.jetpipe-service")
        try:
            sub = await nc.jetstream().pull_subscribe_bind(names.job_consumer(job_a.id),
                                                           stream=names.tasks_stream(moth.SLUG))
            [msg] = await sub.fetch(1, timeout=10)
            return msg.reply
        finally:
            await nc.close()

    return asyncio.run(pull())
