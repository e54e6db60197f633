"""Results too large for one NATS message (docs/processing-services.md, "Big results"): put in the pipeline's object
store bucket and referenced by a small message, taken and saved like any other, the object deleted once taken
and, left behind by a service killed between its upload and its publish, when the job ends."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from types import SimpleNamespace

import httpx
import pytest

from models import Classification, Detection, Job, JobImage, JobStatus, ResultInbox
from pipeline import names
from pipeline.core import inbox
from pipeline.core.jobs import create_job, start_job
from pipeline.core.registry import register_pipeline
from pipeline.infra.runtime import Runtime, set_runtime
from pipeline.schemas import decode_pipeline_spec
from pipeline.sdk import moth
from tests.conftest import PROJECT, kill_group, subprocess_env, wait_for
from tests.helpers import dispatch, fake_job, pull_tasks, settings_on, success_body, take_and_save
from tests.web_helpers import TOKENS, TOKENS_SETTING, WebServer

#: Classes each classification scores: 200 detections of an image, each with its 12,500 scores, make a result
#: of about 20 MB (the reference system's users see 8 to 17 MB of JSON per image for dense detections).
CLASSES, BOXES = 12_500, 200

SERVICE = f"""
import asyncio, logging, random
logging.basicConfig(level=logging.INFO)
from pipeline.schemas import AlgorithmRef, BBox, ClassificationOut, DetectionOut, SourceImageRef, SuccessResult
from pipeline.sdk.service import ProcessingService
from pipeline.settings import get_settings

DET, CLS = AlgorithmRef(key="blob-detector-v1"), AlgorithmRef(key="moth-shape-v1")

def dense(task):
    scores = [round(random.random() / {CLASSES}, 6) for _ in range({CLASSES})]
    scores[0] = 0.9
    return SuccessResult(pipeline=task.pipeline, source_images=[SourceImageRef(id=task.image_id)], detections=[
        DetectionOut(source_image_id=task.image_id, algorithm=DET, bbox=BBox(b, 0, b + 5, 5), score=0.8,
                     classifications=[ClassificationOut(taxon="Noctuidae", algorithm=CLS, scores=scores)])
        for b in range({BOXES})])

asyncio.run(ProcessingService("moth-demo", dense, nats_url=get_settings().nats_url, concurrency=1).run())
"""


@pytest.mark.slow
def test_a_20_mb_result_goes_through_the_bucket_even_when_its_service_dies_between_upload_and_publish(
        two_teams, db_url, worker_factory, tmp_path):
    urls, redis_url = two_teams  # (the shipped NATS users; lab-b plays no part here)
    register_pipeline(decode_pipeline_spec(json.dumps(moth.PIPELINE_SPEC).encode(), source="test"))
    worker_factory(settings_on(db_url, urls["jetpipe-worker"], redis_url, PIPELINE_NATS_TASK_TTR=4,
                               PIPELINE_NATS_MAX_DELIVER=3))
    runtime = Runtime(settings_on(db_url, urls["jetpipe-operator"], redis_url, PIPELINE_NATS_TASK_TTR=4,
                                  PIPELINE_NATS_MAX_DELIVER=3))
    previous = set_runtime(runtime)
    script = tmp_path / "dense_service.py"
    script.write_text(SERVICE)
    # the service runs as the restricted service user of deploy/nats-users.conf: what it may do is what it needs
    service_settings = settings_on(db_url, urls["jetpipe-service"], redis_url)
    env = {k: v for k, v in subprocess_env(service_settings, PYTHONPATH=str(PROJECT)).items()
           if k not in ("PIPELINE_DATABASE_URL", "PIPELINE_REDIS_URL")}
    services = []
    try:
        job = create_job(moth.SLUG, [f"file:///dense/{i}.png" for i in range(2)])
        start_job(runtime, job)
        # Given a service that is killed right after it put its first result in the bucket
        log = open(tmp_path / "service-killed.log", "ab")
        killed = subprocess.Popen([sys.executable, str(script)], cwd=PROJECT, stdout=log, stderr=subprocess.STDOUT,
                                  env={**env, "PIPELINE_CRASH_AT": "after_result_object"}, start_new_session=True)
        services.append(killed)
        assert killed.wait(timeout=120) != 0
        # (objects no message names: its other task's result may have been on its way up too)
        assert 1 <= len(runtime.tasks.job_result_objects(moth.SLUG, job.id)) <= 2
        # When another service answers the job's tasks (the first again, once its lease has run out)
        log = open(tmp_path / "service.log", "ab")
        services.append(subprocess.Popen([sys.executable, str(script)], cwd=PROJECT, stdout=log,
                                         stderr=subprocess.STDOUT, env=env, start_new_session=True))
        ended = wait_for(lambda: (j := Job.get_by_id(job.id)).status in JobStatus.TERMINAL and j, timeout_s=180,
                         message=f"job {job.id} to end ({(tmp_path / 'service.log').read_text()[-1500:]})")
        # Then both 20 MB results are saved exactly, as an inline result would be
        process, results = ended.progress["stages"]["process"], ended.progress["stages"]["results"]
        assert (ended.status, process["processed"], process["failed"], results["detections"]) == (
            JobStatus.SUCCESS, 2, 0, 2 * BOXES)
        assert Detection.select().count() == 2 * BOXES
        scores = Classification.select().first().scores
        assert len(scores) == CLASSES and scores[0] == 0.9
        assert "sent as object" in (tmp_path / "service.log").read_text()
        # and no object is left: each was deleted once taken, the orphans when the job ended (its cleanup)
        wait_for(lambda: Job.get_by_id(job.id).cleaned_up_at, timeout_s=30, message="the job's cleanup")
        assert runtime.tasks.job_result_objects(moth.SLUG, job.id) == []
        # (eventually: on a loaded machine a task whose 20 MB upload outlasts its 4 s lease can be answered twice,
        # and a copy taken into the inbox after the job ended waits there for the next drain, which drops it; a
        # full run once found one row left at this point)
        wait_for(lambda: ResultInbox.select().count() == 0, timeout_s=30, message="the inbox to be empty")
    finally:
        set_runtime(previous)
        for proc in services:
            kill_group(proc)


def test_a_reference_that_cannot_be_honoured_takes_nothing(runtime, moth_pipeline):
    job = fake_job(moth_pipeline, 2)
    dispatch(runtime, job.id)
    (task, reply), _ = pull_tasks(runtime, job.id, 2)
    body = success_body(task)

    async def put(name: str, data: bytes) -> None:
        store = await runtime.tasks.queue.js.object_store(names.result_objects_bucket(moth_pipeline))
        await store.put(name, data)

    def reference(name: str, data: bytes, **changes) -> inbox.Incoming:
        said = {"result_object": name, "size": len(data), "sha256": hashlib.sha256(data).hexdigest(), **changes}
        return inbox.Incoming(job.id, json.dumps(said).encode(), (reply,), f"test:{name}:{changes}",
                              tokens=(task.task_token,), pipeline=moth_pipeline, result_object=name)

    runtime.runner.run(put(f"{job.id}/good", body), timeout=20)
    runtime.runner.run(put("999/other-job", body), timeout=20)
    refused = [reference(f"{job.id}/missing", body),  # never uploaded
               reference("999/other-job", body),  # another job's object
               reference(f"{job.id}/good", body, sha256="0" * 64),  # not what it says it is
               reference(f"{job.id}/good", body, size=len(body) + 1)]
    assert inbox.take(runtime, refused) == []
    assert ResultInbox.select().count() == 0
    # while an honest one is taken, and its object deleted
    assert inbox.take(runtime, [reference(f"{job.id}/good", body)]) == [job.id]
    assert ResultInbox.select().count() == 1
    assert runtime.tasks.result_object(moth_pipeline, f"{job.id}/good") is None


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_the_gateway_puts_a_result_too_large_for_a_message_in_the_bucket(settings, runtime, moth_pipeline,
                                                                         monkeypatch):
    job = fake_job(moth_pipeline, 1)
    dispatch(runtime, job.id)
    server = WebServer(settings.with_overrides(web_tokens=TOKENS_SETTING), runtime).start()
    try:
        with httpx.Client(base_url=server.url, headers={"Authorization": f"Token {TOKENS['svc'][1]}"},
                          timeout=60) as web:
            [task] = web.post(f"/api/v2/jobs/{job.id}/tasks/", json={"batch_size": 1}).json()["tasks"]
            held = SimpleNamespace(image_id=task["image_id"], image_url=task["image_url"], pipeline=moth_pipeline)
            big = json.loads(success_body(held, boxes=BOXES // 20))
            for detection in big["detections"]:  # 10 detections with 20,000 scores each: about 1.4 MB
                detection["classifications"][0].update(scores=[0.5] + [0.0001] * 20_000, labels=[])
            body = json.dumps({"results": [{"reply_subject": task["reply_subject"], "result": big}]})
            assert len(body) > runtime.tasks.queue.nc.max_payload  # more than one NATS message carries here
            posted = web.post(f"/api/v2/jobs/{job.id}/result/", content=body,
                              headers={"Content-Type": "application/json"})
            assert posted.status_code == 200, posted.text
    finally:
        server.stop()
    take_and_save(runtime, job.id, monkeypatch)
    assert Job.get_by_id(job.id).status == JobStatus.SUCCESS
    assert JobImage.get(JobImage.job == job.id).detections == BOXES // 20
    assert runtime.tasks.job_result_objects(moth_pipeline, job.id) == []


def test_a_reference_delivered_twice_is_saved_once(runtime, moth_pipeline):
    """A service that publishes its reference twice (a retry), and a reference redelivered after its object was
    taken: the first decides, nothing is counted twice, and the late copy takes nothing."""
    job = fake_job(moth_pipeline, 1)
    dispatch(runtime, job.id)
    [(task, reply)] = pull_tasks(runtime, job.id, 1)
    body = success_body(task, boxes=3)
    name = f"{job.id}/twice"

    async def put() -> None:
        await runtime.tasks.queue.put_result_object(moth_pipeline, name, body)

    runtime.runner.run(put(), timeout=20)
    said = json.dumps({"result_object": name, "size": len(body), "sha256": hashlib.sha256(body).hexdigest()}).encode()

    def copy(source: str) -> inbox.Incoming:
        return inbox.Incoming(job.id, said, (reply,), source, tokens=(task.task_token,), pipeline=moth_pipeline,
                              result_object=name)

    # two copies in one take: both read, both in the inbox, the image decided once
    assert inbox.take(runtime, [copy("1:1"), copy("2:2")]) == [job.id]
    from pipeline.core import saving

    saving.drain(runtime, job.id)
    done = Job.get_by_id(job.id)
    assert (done.status, done.progress["stages"]["results"]["detections"]) == (JobStatus.SUCCESS, 3)
    assert Detection.select().count() == 3
    # a third copy after the object was taken: nothing
    assert inbox.take(runtime, [copy("3:3")]) == []
    assert ResultInbox.select().count() == 0
