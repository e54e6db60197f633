"""The reference system's worker client against the gateway (`/api/v2`): its flow and its schemas, as read
in RolnickLab/ami-data-companion (trapdata/antenna: client.get_jobs, worker, datasets.RESTDataset,
result_posting, registration), with every answer validated by tests/reference_client.py. Includes the
signed links that let a service on another machine read the images of a job made from a local folder."""

from __future__ import annotations

import io
import json
import threading
import time
import urllib.parse

import httpx
import pytest
import redis
from PIL import Image

from models import Job, JobStatus, Pipeline
from pipeline.core.jobs import create_job, start_job
from pipeline.ops.sources import image_urls_from_dir
from pipeline.schemas import Task, encode
from pipeline.sdk import moth
from pipeline.web import image_links
from tests import reference_client
from tests.conftest import wait_for
from tests.helpers import answer_one_box, dispatch, fake_job, handle_result_message, result_messages, token_of
from tests.web_helpers import WebServer

TOKENS = {"ami-lab": "service-token-ami-lab-0123", "other-lab": "service-token-other-lab-0123",
          "ada": "operator-token-0123456789"}
SETTING = "ami-lab:service:service-token-ami-lab-0123,other-lab:service:service-token-other-lab-0123," \
          "ada:operator:operator-token-0123456789"


def client_of(server, name: str) -> httpx.Client:
    return httpx.Client(base_url=f"{server.url}/api/v2", timeout=30,
                        headers={"Authorization": f"Token {TOKENS[name]}"} if name else {})


@pytest.fixture
def moth_pipeline(moth_pipeline):
    """moth-demo, belonging to the reference worker's service token `ami-lab`."""
    Pipeline.update(registered_by="ami-lab").where(Pipeline.slug == moth_pipeline).execute()
    return moth_pipeline


@pytest.fixture
def server(settings, runtime):
    web = WebServer(settings.with_overrides(web_tokens=SETTING), runtime).start()
    yield web
    web.stop()


def registration(slug: str, *, task_type: str = "localization") -> dict:
    """An `ami worker register` request body (AsyncPipelineRegistrationRequest) for one pipeline."""
    return {"processing_service_name": "AMI worker (gpu-1)", "pipelines": [{
        "name": f"{slug} pipeline", "slug": slug, "version": 1, "description": None, "stages": [],
        "algorithms": [
            {"name": "Moth detector", "key": f"{slug}-det", "task_type": task_type, "version": 1,
             "description": None, "version_name": None, "uri": None, "category_map": None},
            {"name": "Moth species", "key": f"{slug}-cls", "task_type": "classification", "version": 1,
             "category_map": {"data": [], "labels": ["a", "b"], "version": None, "description": None,
                              "uri": None}}]}]}


def test_a_service_registers_its_own_pipelines_and_no_other(server, moth_pipeline):
    with client_of(server, "ami-lab") as ami, client_of(server, "other-lab") as other:
        projects = ami.get("/projects/").json()
        assert projects["results"] == [{"id": 1, "name": "default"}]  # what `ami worker register` lists
        created = ami.post("/projects/1/pipelines/", json=registration("ami-moths"))
        assert created.status_code == 200, created.text
        answer = reference_client.RegistrationResponse.model_validate(created.json())
        assert (answer.pipelines_created, answer.pipelines_updated) == (["ami-moths"], [])
        again = reference_client.RegistrationResponse.model_validate(
            ami.post("/projects/1/pipelines/", json=registration("ami-moths")).json())
        assert (again.pipelines_created, again.pipelines_updated) == ([], ["ami-moths"])
        # another service may not change it, nor a pipeline an operator registered; nothing is changed
        for slug in ("ami-moths", moth_pipeline):
            refused = other.post("/projects/1/pipelines/", json=registration(slug))
            assert refused.status_code == 403
            assert refused.json()["detail"].startswith(f"pipeline {slug!r} was registered by ")
        assert Pipeline.get(Pipeline.slug == "ami-moths").registered_by == "ami-lab"
        # bad input: the reference's error shape (`detail`), nothing registered
        bad = ami.post("/projects/1/pipelines/", json=registration("odd", task_type="astrology"))
        assert bad.status_code == 400 and "unknown task_type 'astrology'" in bad.json()["detail"]
        assert ami.post("/projects/7/pipelines/", json=registration("x")).status_code == 404
        assert not Pipeline.select().where(Pipeline.slug.in_(["odd", "x"])).exists()
        assert client_of(server, "").get("/projects/").status_code == 401


def test_local_images_are_handed_out_as_signed_links_that_open_only_their_image(server, runtime, moth_pipeline,
                                                                                 trap_images):
    directory, truth = trap_images
    job = create_job(moth_pipeline, [f"file://{directory}/{name}" for name in sorted(truth)[:2]])
    other = fake_job(moth_pipeline, 1)
    dispatch(runtime, job.id)
    with client_of(server, "ami-lab") as ami:
        tasks = reference_client.TasksListResponse.model_validate(
            ami.post(f"/jobs/{job.id}/tasks/", json={"batch_size": 2}).json()).tasks
        link = tasks[0].image_url
        assert link.startswith(f"{server.url}/api/v2/images/{job.id}/{tasks[0].image_id}?expires=")
        # the link opens its image (no token needed: the signature is the credential)
        got = httpx.get(link, timeout=10)
        assert got.status_code == 200 and got.headers["content-type"] == "image/png"
        path = directory / sorted(truth)[int(tasks[0].image_id) - int(min(t.image_id for t in tasks))]
        assert Image.open(io.BytesIO(got.content)).size == Image.open(path).size
        # and nothing else: another image, another job, a forged or expired signature
        parts = urllib.parse.urlsplit(link)
        query = dict(urllib.parse.parse_qsl(parts.query))
        forged = httpx.get(f"{server.url}/api/v2/images/{job.id}/{tasks[1].image_id}?{parts.query}", timeout=10)
        assert forged.status_code == 403 and forged.json()["detail"] == "this image link is not valid"
        key = image_links.secret(redis.Redis.from_url(runtime.settings.redis_url))
        expired = image_links.link(key, server.url, job.id, tasks[0].image_id, -5)
        assert httpx.get(expired, timeout=10).status_code == 403
        foreign = image_links.link(key, server.url, job.id, str(other.id * 1000 + 999), 60)
        assert httpx.get(foreign, timeout=10).status_code == 404
        assert query["signature"] not in json.dumps(ami.get("/jobs/", params={"ids_only": 1}).json())


def reference_worker(server, stop: threading.Event, out: dict) -> None:
    """The reference client's loop (trapdata/antenna/worker.py), step by step: list jobs with its query,
    reserve with its body, download each image over HTTP, run the model, post in its result schema, parse
    every answer with its models. Nothing is handed to it: it finds the job itself."""
    with client_of(server, "ami-lab") as api:
        while not stop.is_set():
            listing = api.get("/jobs", params={"pipeline__slug__in": moth.SLUG, "ids_only": 1,
                                               "incomplete_only": 1, "dispatch_mode": "async_api"},
                              follow_redirects=True)
            jobs = reference_client.JobsListResponse.model_validate(listing.json()).results
            worked = False
            for job in jobs:
                assert job.pipeline_slug == moth.SLUG
                reply = api.post(f"/jobs/{job.id}/tasks/", json={"batch_size": 4})
                tasks = reference_client.TasksListResponse.model_validate(reply.json()).tasks
                results = []
                for task in tasks:
                    assert task.image_url.startswith("http")  # fetched with requests in the reference
                    result = moth.process_task(Task(job_id=job.id, image_id=task.image_id,
                                                    image_url=task.image_url, pipeline=job.pipeline_slug))
                    results.append({"reply_subject": task.reply_subject, "result": json.loads(encode(result))})
                if results:
                    worked = True
                    posted = api.post(f"/jobs/{job.id}/result/", json={"results": results})
                    ack = reference_client.ResultPostResponse.model_validate(posted.json())
                    out["posts_ok"] = out.get("posts_ok", 0) + (ack.results_queued == len(results))
                    out["tasks"] = out.get("tasks", 0) + len(tasks)
            if not worked:
                stop.wait(0.2)


@pytest.mark.slow
def test_the_reference_workers_flow_runs_a_job_from_a_local_folder_to_success(server, runtime, moth_pipeline,
                                                                              trap_images, worker_factory):
    # Given a job made from a local folder, a jetpipe worker, and the reference's worker flow over HTTP only
    directory, truth = trap_images
    worker_factory(runtime.settings, threads=4)
    job = create_job(moth_pipeline, image_urls_from_dir(str(directory)))
    start_job(runtime, job)
    stop, out = threading.Event(), {}
    thread = threading.Thread(target=lambda: _guarded(reference_worker, server, stop, out), daemon=True)
    thread.start()
    try:
        # Then it finds the job by itself, and the job ends SUCCESS with every row exact
        ended = wait_for(lambda: out.get("error") or ((j := Job.get_by_id(job.id)).status in JobStatus.TERMINAL
                                                     and j), timeout_s=120, message="the job to end")
    finally:
        stop.set()
        thread.join(30)
    assert "error" not in out, out.get("error")
    stages = ended.progress["stages"]
    assert (ended.status, stages["process"]["processed"], stages["process"]["failed"]) == (
        JobStatus.SUCCESS, len(truth), 0)
    assert stages["results"]["detections"] == sum(len(v) for v in truth.values())
    assert out["tasks"] == len(truth) and out["posts_ok"] >= 1


def _guarded(fn, *args) -> None:
    out = args[-1]
    try:
        fn(*args)
    except BaseException as exc:  # noqa: BLE001 - handed to the test
        out["error"] = f"{type(exc).__name__}: {exc}"
        time.sleep(0)


def test_a_service_reaches_only_its_own_pipelines_and_answers_only_the_tasks_handed_to_it(server, runtime, settings,
                                                                                          moth_pipeline):
    # Given a dispatched job of ami-lab's pipeline
    job = fake_job(moth_pipeline, 2)
    dispatch(runtime, job.id)
    with client_of(server, "ami-lab") as ami, client_of(server, "other-lab") as other, \
            client_of(server, "ada") as ada:
        # Then another service does not see it, and may neither reserve, extend nor answer its tasks
        assert other.get("/jobs/", params={"ids_only": 1, "incomplete_only": 1}).json()["results"] == []
        for path, body in (("tasks/", {"batch_size": 2}), ("tasks/in_progress/", {"reply_subjects": []}),
                           ("result/", {"results": [{"reply_subject": "x", "result": {"error": "x"}}]})):
            refused = other.post(f"/jobs/{job.id}/{path}", json=body)
            assert refused.status_code == 403, refused.text
            assert "belongs to service 'ami-lab'" in refused.json()["detail"]
        # And a task ami-lab reserved is answered by ami-lab alone: anyone else gets 409 and nothing is published
        tasks = ami.post(f"/jobs/{job.id}/tasks/", json={"batch_size": 2}).json()["tasks"]
        assert len(tasks) == 2 and all("task_token" not in t for t in tasks)  # tokens stay with the gateway
        mine = tasks[0]
        forged = {"results": [{"reply_subject": mine["reply_subject"],
                               "result": {"error": "forged", "image_id": mine["image_id"]}}]}
        refused = ada.post(f"/jobs/{job.id}/result/", json=forged)
        assert refused.status_code == 409 and "handed to ada" in refused.json()["detail"]
        extend = ada.post(f"/jobs/{job.id}/tasks/in_progress/", json={"reply_subjects": [mine["reply_subject"]]})
        assert extend.status_code == 409
        assert result_messages(settings, job.id) == []
        # And its own answers go out with each task's token, which decides its image
        answers = [{"reply_subject": t["reply_subject"], "result": answer_one_box(
            {"image_id": t["image_id"], "image_url": t["image_url"], "pipeline": moth_pipeline})} for t in tasks]
        assert ami.post(f"/jobs/{job.id}/result/", json={"results": answers}).status_code == 200
    published = result_messages(settings, job.id, tokens=True)
    assert sorted(token for _, _, token in published) == sorted(token_of(job.id, t["image_id"]) for t in tasks)
    for reply, body, token in published:
        handle_result_message(runtime, job.id, json.dumps(body).encode(), reply, token)
    assert Job.get_by_id(job.id).status == JobStatus.SUCCESS
