"""The HTTP gateway (`/api/v2`): processing services that never touch NATS, speaking the reference
system's task protocol, against a real web server, NATS, Redis, a database and worker subprocesses."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import threading
import time

import httpx
import pytest

from models import Job, JobImage, JobStatus
from pipeline import names
from tests import reference_client
from tests.conftest import PROJECT, make_settings, subprocess_env, wait_for
from tests.helpers import answer_one_box, dispatch, fake_job, pull_tasks
from tests.web_helpers import TOKENS_SETTING, WebServer, bearer

SERVICE = bearer("svc")


@pytest.fixture
def gateway(settings, runtime):
    server = WebServer(settings.with_overrides(web_tokens=TOKENS_SETTING), runtime).start()
    with httpx.Client(base_url=server.url, timeout=30, headers=SERVICE) as client:
        yield client
    server.stop()


def http_worker(client: httpx.Client, pipeline: str, stop: threading.Event, *, batch_size: int = 8,
                per_request: int = 1, answer=answer_one_box) -> dict:
    """A processing worker written from docs/processing-services.md with HTTP calls only: find jobs, reserve
    tasks, answer each, return `per_request` results per POST. Returns counters."""
    seen = {"tasks": 0, "posts": 0}
    while not stop.is_set():
        jobs = client.get("/api/v2/jobs/", params={"ids_only": 1, "incomplete_only": 1,
                                                   "pipeline__slug__in": pipeline}).json()["results"]
        got_any = False
        for job in jobs:
            reply = client.post(f"/api/v2/jobs/{job['id']}/tasks/", json={"batch_size": batch_size,
                                                                           "client_info": {"name": "test"}})
            assert reply.status_code == 200, reply.text
            tasks = reply.json()["tasks"]
            got_any |= bool(tasks)
            seen["tasks"] += len(tasks)
            results = [{"reply_subject": t["reply_subject"],
                        "result": answer({"image_id": t["image_id"], "image_url": t["image_url"],
                                          "pipeline": pipeline})}
                       for t in tasks]
            for start in range(0, len(results), per_request):
                posted = client.post(f"/api/v2/jobs/{job['id']}/result/",
                                     json={"results": results[start:start + per_request]})
                assert posted.status_code == 200, posted.text
                seen["posts"] += 1
        if not got_any:
            stop.wait(0.1)
    return seen


def run_worker_until(client, pipeline, job_id, **kwargs) -> tuple[Job, dict]:
    stop = threading.Event()
    out: dict = {}

    def work():
        try:
            out.update(http_worker(client, pipeline, stop, **kwargs))
        except BaseException as exc:  # noqa: BLE001 - handed to the test
            out["error"] = exc
            stop.set()

    thread = threading.Thread(target=work)
    thread.start()
    try:
        job = wait_for(lambda: out.get("error") or ((j := Job.get_by_id(job_id)).status in JobStatus.TERMINAL and j),
                       timeout_s=120, interval_s=0.2, message="the job to finish through the gateway")
    finally:
        stop.set()
        thread.join(30)
    if "error" in out:
        raise out["error"]
    return job, out


@pytest.mark.slow
@pytest.mark.parametrize("per_request", [1, 8])
def test_an_http_only_worker_runs_a_1000_image_job_to_success_with_exact_counts(
        gateway, settings, moth_pipeline, worker_factory, per_request):
    worker_factory(settings)
    created = gateway.post("/api/v1/jobs", headers=bearer("ada"), json={
        "pipeline": moth_pipeline, "urls": [f"file:///traps/{i}.png" for i in range(1000)]})
    job_id = created.json()["id"]
    wait_for(lambda: Job.get_by_id(job_id).status == JobStatus.STARTED, timeout_s=30, message="dispatch")
    job, seen = run_worker_until(gateway, moth_pipeline, job_id, batch_size=16, per_request=per_request)
    stages = job.progress["stages"]
    assert job.status == JobStatus.SUCCESS
    assert (stages["process"]["processed"], stages["process"]["failed"]) == (1000, 0)
    assert (stages["results"]["detections"], stages["results"]["classifications"]) == (1000, 1000)
    assert seen["tasks"] == 1000  # every task handed out once: no lease ran out, nothing redelivered


def test_the_reference_workers_shapes_are_kept(gateway, runtime, moth_pipeline):
    job = fake_job(moth_pipeline, 2)
    internal = fake_job(moth_pipeline, 1, prefix="file:///internal/img", dispatch_mode="internal")
    # before dispatch: the job is listed but has no tasks yet
    listing = gateway.get("/api/v2/jobs/", params={"ids_only": 1, "incomplete_only": 1,
                                                   "pipeline__slug__in": f"{moth_pipeline},other"}).json()
    assert listing == {"count": 1, "next": None, "previous": None,
                       "results": [{"id": job.id, "pipeline_slug": moth_pipeline}]}
    reference_client.JobsListResponse.model_validate(listing)  # as the reference's worker parses it
    assert gateway.post(f"/api/v2/jobs/{job.id}/tasks/", json={"batch_size": 4}).json() == {"tasks": []}
    dispatch(runtime, job.id)
    reserved = gateway.post(f"/api/v2/jobs/{job.id}/tasks/", json={"batch_size": 4}).json()
    reference_client.TasksListResponse.model_validate(reserved)
    tasks = reserved["tasks"]
    assert len(tasks) == 2
    for task in tasks:
        assert set(task) == {"id", "image_id", "image_url", "reply_subject"}
        assert task["id"] == task["image_id"] and task["image_url"].startswith(
            f"{gateway.base_url}/api/v2/images/{job.id}/{task['image_id']}?expires=")  # a local file: a link
        assert names.reply_belongs_to_job(task["reply_subject"], job.id)
    # a result in the reference's own schema (taxon under "classification", extra fields) is accepted
    reference = {"pipeline": moth_pipeline, "algorithms": {}, "total_time": 0.2, "errors": None,
                 "source_images": [{"id": tasks[0]["image_id"], "url": tasks[0]["image_url"]}],
                 "detections": [{"source_image_id": tasks[0]["image_id"], "bbox": {"x1": 1, "y1": 1, "x2": 9, "y2": 9},
                                 "inference_time": 0.1, "timestamp": "2026-11-29T04:00:00",
                                 "algorithm": {"name": "Dark blob detector", "key": "blob-detector-v1"},
                                 "classifications": [{"classification": "Geometridae", "labels": None,
                                                      "scores": [0.7], "logits": [1.2], "terminal": True,
                                                      "algorithm": {"name": "Moth family", "key": "moth-shape-v1"}}]}]}
    error = {"error": "lens cap on", "image_id": tasks[1]["image_id"]}
    accepted = gateway.post(f"/api/v2/jobs/{job.id}/result/", json={"results": [
        {"reply_subject": tasks[0]["reply_subject"], "result": reference},
        {"reply_subject": tasks[1]["reply_subject"], "result": error}], "client_info": {"hostname": "gpu-1"}})
    assert accepted.status_code == 200
    ack = reference_client.ResultPostResponse.model_validate(accepted.json())
    assert (ack.status, ack.job_id, ack.results_queued) == ("accepted", job.id, 2)
    assert [(t.reply_subject, t.status) for t in ack.tasks] == [(tasks[0]["reply_subject"], "queued"),
                                                               (tasks[1]["reply_subject"], "queued")]
    assert all(t.task_id.startswith(f"{names.RESULTS_STREAM}:") for t in ack.tasks)
    assert len({t.task_id for t in ack.tasks}) == 2
    # the results are on the results stream exactly as a NATS service would have put them
    assert _results_waiting(runtime) == 2
    # internal jobs have no tasks for services; unknown jobs are 404
    assert gateway.post(f"/api/v2/jobs/{internal.id}/tasks/", json={"batch_size": 1}).status_code == 400
    assert gateway.post("/api/v2/jobs/4242/tasks/", json={"batch_size": 1}).status_code == 404
    assert gateway.post(f"/api/v2/jobs/{job.id}/tasks/", json={"batch_size": 0}).status_code == 400


def _results_waiting(runtime) -> int:
    async def count():
        return (await runtime.tasks.queue.js.stream_info(names.RESULTS_STREAM)).state.messages

    return runtime.runner.run(count(), timeout=10)


def test_a_foreign_or_forged_reply_subject_is_refused_and_nothing_is_published(gateway, runtime, moth_pipeline):
    mine, other = fake_job(moth_pipeline, 1), fake_job(moth_pipeline, 1, prefix="file:///other/img")
    dispatch(runtime, mine.id)
    dispatch(runtime, other.id)
    [my_task] = gateway.post(f"/api/v2/jobs/{mine.id}/tasks/", json={"batch_size": 1}).json()["tasks"]
    [their_task] = gateway.post(f"/api/v2/jobs/{other.id}/tasks/", json={"batch_size": 1}).json()["tasks"]
    before = _results_waiting(runtime)
    result = answer_one_box({"image_id": my_task["image_id"], "image_url": "x", "pipeline": moth_pipeline})
    for reply in (their_task["reply_subject"], f"$JS.ACK.PIPELINE_TASKS_moth-demo.job-{other.id + 7}.1.1.1.1.0",
                  "pipeline.results.1"):
        refused = gateway.post(f"/api/v2/jobs/{mine.id}/result/", json={"results": [
            {"reply_subject": my_task["reply_subject"], "result": result}, {"reply_subject": reply, "result": result}]})
        assert refused.status_code == 409, reply
        assert refused.json()["error"].startswith(f"1 reply_subject(s) are not tasks of job {mine.id}")
        extended = gateway.post(f"/api/v2/jobs/{mine.id}/tasks/in_progress/", json={"reply_subjects": [reply]})
        assert extended.status_code == 409
    assert _results_waiting(runtime) == before  # nothing published, not even the good one
    # their task: untouched, still leased
    assert runtime.tasks.consumer_state(other.id, "moth-demo").num_ack_pending == 1


def test_an_abandoned_reservation_comes_back_after_ack_wait_and_in_progress_keeps_it(
        settings, runtime, moth_pipeline):
    quick = settings.with_overrides(web_tokens=TOKENS_SETTING, nats_task_ttr=1.5)
    runtime.settings = quick
    server = WebServer(quick, runtime).start()
    try:
        with httpx.Client(base_url=server.url, timeout=30, headers=SERVICE) as client:
            job = fake_job(moth_pipeline, 2)
            dispatch(runtime, job.id)
            first = client.post(f"/api/v2/jobs/{job.id}/tasks/", json={"batch_size": 2}).json()["tasks"]
            assert len(first) == 2
            assert client.post(f"/api/v2/jobs/{job.id}/tasks/", json={"batch_size": 2}).json()["tasks"] == []
            # keep one alive with +WPI, abandon the other
            kept = first[0]
            for _ in range(3):
                time.sleep(0.7)
                assert client.post(f"/api/v2/jobs/{job.id}/tasks/in_progress/",
                                   json={"reply_subjects": [kept["reply_subject"]]}).json() == {"extended": 1}
            again = client.post(f"/api/v2/jobs/{job.id}/tasks/", json={"batch_size": 2}).json()["tasks"]
            assert [t["image_id"] for t in again] == [first[1]["image_id"]]  # only the abandoned one is back
            assert again[0]["reply_subject"] != first[1]["reply_subject"]  # a new delivery
    finally:
        server.stop()


def test_an_oversized_result_body_is_413_and_nothing_is_saved(settings, runtime, moth_pipeline):
    small = settings.with_overrides(web_tokens=TOKENS_SETTING, web_max_body_mb=0.01)  # about 10 kB
    server = WebServer(small, runtime).start()
    try:
        with httpx.Client(base_url=server.url, timeout=30, headers=SERVICE) as client:
            job = fake_job(moth_pipeline, 1)
            dispatch(runtime, job.id)
            [task] = client.post(f"/api/v2/jobs/{job.id}/tasks/", json={"batch_size": 1}).json()["tasks"]
            result = answer_one_box({"image_id": task["image_id"], "image_url": "x", "pipeline": moth_pipeline})
            result["detections"] *= 200
            big = json.dumps({"results": [{"reply_subject": task["reply_subject"], "result": result}]}).encode()
            before = _results_waiting(runtime)
            declared = client.post(f"/api/v2/jobs/{job.id}/result/", content=big,
                                   headers={"Content-Type": "application/json"})
            assert declared.status_code == 413 and "PIPELINE_WEB_MAX_BODY_MB" in declared.json()["error"]

            def chunked():  # no Content-Length: the limit holds while reading
                for start in range(0, len(big), 4096):
                    yield big[start:start + 4096]

            streamed = client.post(f"/api/v2/jobs/{job.id}/result/", content=chunked(),
                                   headers={"Content-Type": "application/json"})
            assert streamed.status_code == 413
            assert _results_waiting(runtime) == before
            assert JobImage.get(JobImage.job == job.id).status == "pending"
    finally:
        server.stop()


def test_nats_stopped_is_503_and_the_gateway_recovers(private_runtime, moth_pipeline):
    runtime, dev = private_runtime
    server = WebServer(runtime.settings.with_overrides(web_tokens=TOKENS_SETTING), runtime).start()
    try:
        with httpx.Client(base_url=server.url, timeout=60, headers=SERVICE) as client:
            job = fake_job(moth_pipeline, 3)
            dispatch(runtime, job.id)
            assert len(client.post(f"/api/v2/jobs/{job.id}/tasks/", json={"batch_size": 1}).json()["tasks"]) == 1
            dev.nats.stop()
            down = client.post(f"/api/v2/jobs/{job.id}/tasks/", json={"batch_size": 1})
            assert down.status_code == 503 and "unavailable" in down.json()["error"]
            dev.nats.start()
            back = wait_for(lambda: (r := client.post(f"/api/v2/jobs/{job.id}/tasks/", json={"batch_size": 1}))
                            .status_code == 200 and r.json()["tasks"], timeout_s=60, interval_s=0.5,
                            message="the gateway to hand out tasks again")
            assert len(back) == 1
    finally:
        server.stop()


def test_viewers_may_not_use_the_gateway_and_services_appear_in_health(gateway, runtime, moth_pipeline):
    job = fake_job(moth_pipeline, 1)
    dispatch(runtime, job.id)
    assert gateway.post(f"/api/v2/jobs/{job.id}/tasks/", json={"batch_size": 1},
                        headers=bearer("vic")).status_code == 403
    assert gateway.get("/api/v2/jobs/", headers={"Authorization": ""}).status_code == 401
    gateway.post(f"/api/v2/jobs/{job.id}/tasks/", json={"batch_size": 1})
    report = gateway.get("/api/v1/health", headers=bearer("ada")).json()
    [svc] = report["http_services"]
    assert (svc["service"], svc["pipeline"], svc["job"], svc["holding"]) == ("svc", moth_pipeline, job.id, 1)


@pytest.mark.slow
def test_two_gateway_processes_never_hand_out_one_task_twice(settings, moth_pipeline, runtime):
    job = fake_job(moth_pipeline, 300)
    dispatch(runtime, job.id)
    env = subprocess_env(settings.with_overrides(web_tokens=TOKENS_SETTING))
    from pipeline.ops.devstack import free_port

    ports = [free_port(), free_port()]
    procs = [subprocess.Popen([sys.executable, "cli.py", "web", "--port", str(port)], cwd=PROJECT, env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
             for port in ports]
    handed: list[str] = []
    try:
        for port in ports:
            wait_for(lambda port=port: _answers(f"http://127.0.0.1:{port}/healthz"), timeout_s=30, message="web")

        def reserve(port):
            with httpx.Client(base_url=f"http://127.0.0.1:{port}", headers=SERVICE, timeout=30) as client:
                while True:
                    tasks = client.post(f"/api/v2/jobs/{job.id}/tasks/", json={"batch_size": 7}).json()["tasks"]
                    if not tasks:
                        return
                    handed.extend(t["image_id"] for t in tasks)

        threads = [threading.Thread(target=reserve, args=(port,)) for port in ports for _ in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
    finally:
        for proc in procs:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(20)
    assert len(handed) == 300 and len(set(handed)) == 300


def _answers(url: str) -> bool:
    try:
        return httpx.get(url, timeout=2).status_code == 200
    except httpx.HTTPError:
        return False



@pytest.mark.slow
def test_the_reference_service_works_through_the_gateway_with_cli_process_via(
        settings, runtime, moth_pipeline, trap_images, worker_factory):
    from pipeline.sdk import moth

    server = WebServer(settings.with_overrides(web_tokens=TOKENS_SETTING), runtime).start()
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIPELINE_")}  # no NATS, no database here
    env["PIPELINE_SERVICE_TOKEN"] = TOKENS_SETTING.split(",")[2].split(":")[2]
    service = subprocess.Popen([sys.executable, "cli.py", "process", "--pipeline", moth.SLUG, "--via", server.url,
                                "--batch-size", "5"], cwd=PROJECT, env=env, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        worker_factory(settings)
        directory, truth = trap_images
        names_ = sorted(truth)[:15]
        with httpx.Client(base_url=server.url, timeout=30) as client:
            job_id = client.post("/api/v1/jobs", headers=bearer("ada"), json={
                "pipeline": moth.SLUG, "urls": [f"file://{directory}/{n}" for n in names_]}).json()["id"]
        done = wait_for(lambda: (j := Job.get_by_id(job_id)).status in JobStatus.TERMINAL and j, timeout_s=90,
                        message="the job to finish through cli.py process --via")
        stages = done.progress["stages"]
        assert done.status == JobStatus.SUCCESS
        assert stages["results"]["detections"] == sum(len(truth[n]) for n in names_)
        # a wrong token is one clear line and exit 1
        env["PIPELINE_SERVICE_TOKEN"] = "not-a-token-0123456789"
        refused = subprocess.run([sys.executable, "cli.py", "process", "--pipeline", moth.SLUG, "--via", server.url],
                                 cwd=PROJECT, env=env, capture_output=True, text=True, timeout=60)
        assert refused.returncode == 1 and "refused this service's token (401)" in refused.stderr
        assert "Traceback" not in refused.stderr
    finally:
        os.killpg(service.pid, signal.SIGTERM)
        out, _ = service.communicate(timeout=30)
        server.stop()
    assert "Traceback" not in out, out


def deliver_late(runtime, gateway, job_id: int, count: int) -> int:
    """What a fetch that timed out leaves behind: `count` deliveries on the gateway's subscription that no
    request took (its pull request answered after it gave up). How many wait there."""
    sub = gateway._subs[job_id]

    async def late():
        stream = names.tasks_stream("moth-demo")
        await runtime.tasks.queue.nc.publish(f"$JS.API.CONSUMER.MSG.NEXT.{stream}.job-{job_id}",
                                             json.dumps({"batch": count}).encode(), reply=sub._deliver)
        for _ in range(50):
            if sub.pending_msgs >= count:
                break
            await asyncio.sleep(0.05)
        return sub.pending_msgs

    return runtime.runner.run(late(), timeout=10)


def test_on_shutdown_tasks_fetched_but_never_handed_out_go_back_at_once(runtime, moth_pipeline):
    """A delivery that reached the gateway after its request gave up is held, not lost; at shutdown it is
    NAKed so it is redelivered now, not after ack_wait."""
    from pipeline.web.gateway_tasks import Gateway

    job = fake_job(moth_pipeline, 4)
    dispatch(runtime, job.id)
    gateway = Gateway(runtime.tasks.queue)
    assert len(runtime.runner.run(gateway.reserve(job.id, moth_pipeline, 1), timeout=10)) == 1
    assert deliver_late(runtime, gateway, job.id, 2) == 2
    assert runtime.tasks.consumer_state(job.id, "moth-demo").num_ack_pending == 3
    assert runtime.runner.run(gateway.release_all(), timeout=10) == 2
    # at once, not after the 30 s ack_wait: the two released come back, with the one never delivered
    again = pull_tasks(runtime, job.id, 3, timeout_s=3)
    assert len(again) == 3 and runtime.tasks.consumer_state(job.id, "moth-demo").num_redelivered == 2


def test_a_request_is_never_handed_more_tasks_than_it_asked_for_late_deliveries_go_to_the_next(
        runtime, moth_pipeline):
    """A fetch returns the late deliveries waiting on the subscription along with its own; the gateway hands
    a request at most its `batch_size` and keeps the rest for the next requests."""
    from pipeline.web.gateway_tasks import Gateway

    job = fake_job(moth_pipeline, 6)
    dispatch(runtime, job.id)
    gateway = Gateway(runtime.tasks.queue)

    def reserve(count: int) -> list[str]:
        return [r.image_id for r in runtime.runner.run(gateway.reserve(job.id, moth_pipeline, count), timeout=10)]

    first = reserve(1)
    assert deliver_late(runtime, gateway, job.id, 3) == 3
    # When requests for two tasks each come, then one for five
    second, third, rest = reserve(2), reserve(2), reserve(5)
    # Then each got at most what it asked for, and all six tasks went out once each
    assert (len(first), len(second), len(third), len(rest)) == (1, 2, 2, 1)
    assert len(set(first + second + third + rest)) == 6
    assert reserve(5) == [] and runtime.runner.run(gateway.release_all(), timeout=10) == 0


def test_a_late_delivery_handed_out_starts_its_lease_again(db_url, stack, settings, moth_pipeline):
    """A task that waited at the gateway (a late delivery) is leased to the caller for a whole ack_wait from
    the moment it is handed out, as the contract says, not from when NATS delivered it."""
    from pipeline.infra.runtime import Runtime
    from pipeline.web.gateway_tasks import Gateway

    runtime = Runtime(make_settings(db_url, stack, PIPELINE_NATS_TASK_TTR=6), name="jetpipe-gateway-test")
    try:
        job = fake_job(moth_pipeline, 4)
        dispatch(runtime, job.id)
        gateway = Gateway(runtime.tasks.queue)
        runtime.runner.run(gateway._subscribe(job.id, moth_pipeline), timeout=10)
        # Given two tasks delivered to the gateway 4 s (of their 6 s lease) before a request takes them
        assert deliver_late(runtime, gateway, job.id, 2) == 2
        time.sleep(4)
        handed = {r.image_id for r in runtime.runner.run(gateway.reserve(job.id, moth_pipeline, 2), timeout=10)}
        assert len(handed) == 2
        # When 3.5 s more pass (7.5 s after delivery, 3.5 s after handing out)
        time.sleep(3.5)
        # Then they are still the caller's: only the two never delivered can be pulled
        pulled = {task.image_id for task, _ in pull_tasks(runtime, job.id, 4, timeout_s=0.5)}
        assert pulled == {"1", "2", "3", "4"} - handed
    finally:
        runtime.close()


def test_the_gateway_lets_go_of_an_ended_jobs_subscription(runtime, moth_pipeline):
    """Once a job ends, the gateway drops its pull subscription and what it holds, within a tidy interval
    (before: it kept them until the web server stopped)."""
    from pipeline.core.jobs import cancel
    from pipeline.web.gateway_api import ended_jobs
    from pipeline.web.gateway_tasks import Gateway

    job, other = fake_job(moth_pipeline, 3), fake_job(moth_pipeline, 2)
    for j in (job, other):
        dispatch(runtime, j.id)
    gateway = Gateway(runtime.tasks.queue)
    runtime.runner.spawn(gateway.keep_tidy(ended_jobs, every_s=0.2))
    for j in (job, other):
        assert len(runtime.runner.run(gateway.reserve(j.id, moth_pipeline, 1), timeout=10)) == 1
    assert gateway.subscribed_jobs() == [job.id, other.id]
    cancel(runtime, job.id)
    wait_for(lambda: gateway.subscribed_jobs() == [other.id], timeout_s=10, message="the ended job to be let go")
    # the other job is untouched
    assert len(runtime.runner.run(gateway.reserve(other.id, moth_pipeline, 1), timeout=10)) == 1
    runtime.runner.run(gateway.release_all(), timeout=10)


def test_too_many_results_in_one_request_are_413_and_nothing_is_published(gateway, runtime, moth_pipeline):
    """Row 12 of the security review: a request could carry any number of results. (A result over NATS'
    max_payload is no longer refused: it goes through the pipeline's bucket, tests/test_big_results.py.)"""
    job = fake_job(moth_pipeline, 1)
    dispatch(runtime, job.id)
    [task] = gateway.post(f"/api/v2/jobs/{job.id}/tasks/", json={"batch_size": 1}).json()["tasks"]
    many = gateway.post(f"/api/v2/jobs/{job.id}/result/", json={"results": [
        {"reply_subject": task["reply_subject"], "result": {"error": "x", "image_id": task["image_id"]}}] * 501})
    assert many.status_code == 413 and "at most 500" in many.json()["error"]
    assert _results_waiting(runtime) == 0


def test_a_listing_with_wait_is_answered_when_a_job_is_announced_and_without_wait_at_once(gateway, runtime,
                                                                                          moth_pipeline):
    # Given no job for the service's pipeline
    params = {"ids_only": 1, "incomplete_only": 1, "pipeline__slug__in": moth_pipeline}
    assert gateway.get("/api/v2/jobs/", params=params).json()["results"] == []  # (the reference's listing)
    assert gateway.get("/api/v2/jobs/", params={**params, "wait": 31}).status_code == 400  # over the longest wait
    # When a service's listing waits up to a minute, and a job is dispatched a moment later
    job = fake_job(moth_pipeline, 1)
    timer = threading.Timer(1.0, lambda: dispatch(runtime, job.id))
    timer.start()
    started = time.monotonic()
    answer = gateway.get("/api/v2/jobs/", params={**params, "wait": 30}, timeout=60)
    took = time.monotonic() - started
    timer.join()
    # Then the listing is answered with the job as soon as it is announced, not when the wait runs out
    assert answer.status_code == 200 and [j["id"] for j in answer.json()["results"]] == [job.id]
    assert took < 20
    # and with jobs to list, a waiting listing answers at once
    assert [j["id"] for j in gateway.get("/api/v2/jobs/", params={**params, "wait": 30}).json()["results"]] == [job.id]
    # and a wait that sees no announcement answers, empty, when it runs out
    other = {**params, "pipeline__slug__in": "nobody", "wait": 0.5}
    assert gateway.get("/api/v2/jobs/", params=other).json()["results"] == []


def test_a_waiting_listing_answers_from_the_database_when_nats_cannot_be_reached(private_runtime, moth_pipeline):
    # Given a web server whose NATS is down before it ever connected, and one job in the database
    runtime, dev = private_runtime
    job = fake_job(moth_pipeline, 2)
    dev.nats.stop()
    server = WebServer(runtime.settings.with_overrides(web_tokens=TOKENS_SETTING), runtime).start()
    try:
        with httpx.Client(base_url=server.url, timeout=60, headers=SERVICE) as client:
            params = {"ids_only": 1, "pipeline__slug__in": moth_pipeline, "wait": 30}
            # When a service's listing asks to wait for announcements it cannot hear
            started = time.monotonic()
            listed = client.get("/api/v2/jobs/", params=params)
            empty = client.get("/api/v2/jobs/", params={**params, "pipeline__slug__in": "nobody"})
            took = time.monotonic() - started
        # Then both are answered from the database without waiting out the 30 s (NATS' connect timeout only)
        assert listed.status_code == 200 and [j["id"] for j in listed.json()["results"]] == [job.id]
        assert empty.status_code == 200 and empty.json()["results"] == []
        assert took < 45
    finally:
        server.stop()
        dev.nats.start()
