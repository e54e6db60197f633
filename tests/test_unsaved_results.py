"""Results that cannot be saved (invariant 13: every job ends), on real NATS, Redis and both databases:
bounded attempts then parking, outages never counted, replay, deadlines with results waiting, and what
`health` says meanwhile."""

from __future__ import annotations

import datetime as dt
import json
import subprocess
import sys
from collections import Counter

import httpx
import peewee
import pytest

from models import ImageStatus, Job, JobImage, JobLog, JobStatus, ParkedResult, ResultInbox, utcnow
from pipeline.core import inbox, saving, unsaved
from pipeline.core.inbox import Incoming, take
from pipeline.core.jobs import create_job, start_job
from pipeline.core.reconciler import run_health_check
from pipeline.core.saving import drain
from pipeline.errors import UserInputError
from pipeline.ops.health import build_report
from pipeline.sdk import moth
from tests.conftest import PROJECT, kill_group, subprocess_env, wait_for
from tests.helpers import dispatch, fake_job, pull_tasks, success_body


def take_results(runtime, job_id: int, tasks) -> None:
    """A service answered these tasks: their results are taken into the inbox (nothing saved yet)."""
    take(runtime, [Incoming.direct(job_id, success_body(task, boxes=1), reply, task.task_token) for task,
                                   reply in tasks])


def image_states(job_id: int) -> dict[str, tuple[str, str | None]]:
    return {str(i.image_id): (i.status, i.error) for i in JobImage.select().where(JobImage.job == job_id)}


def saving_fails_for(monkeypatch, image_id: str) -> None:
    """A bug in saving: every attempt to save a result naming `image_id` raises."""
    monkeypatch.setenv("PIPELINE_RAISE_AT", "after_validation")
    monkeypatch.setenv("PIPELINE_RAISE_IF", f"images={image_id}")


def bug_fixed(monkeypatch) -> None:
    monkeypatch.delenv("PIPELINE_RAISE_AT")
    monkeypatch.delenv("PIPELINE_RAISE_IF")


@pytest.fixture
def job4(runtime, moth_pipeline):
    """A dispatched 4-image job whose tasks a service pulled: (job, tasks sorted by image id)."""
    job = fake_job(moth_pipeline, 4)
    dispatch(runtime, job.id)
    return job, sorted(pull_tasks(runtime, job.id, 4), key=lambda t: int(t[0].image_id))


def test_a_result_that_never_saves_is_parked_after_its_attempts_and_the_job_ends(runtime, job4, monkeypatch):
    # Given a job whose four results wait in the inbox, one of which saving always fails on (a bug)
    job, tasks = job4
    runtime.settings = runtime.settings.with_overrides(result_save_attempts=3, result_save_backoff=0.0)
    bad = tasks[1][0].image_id
    saving_fails_for(monkeypatch, bad)
    take_results(runtime, job.id, tasks)
    # When the inbox is drained
    drain(runtime, job.id)
    # Then the other three are saved, the bad one failed with the error after 3 attempts, and the job
    # ended by its threshold (1/4 failed: SUCCESS)
    states = image_states(job.id)
    assert states[bad] == (ImageStatus.FAILED,
                           "result could not be saved: InjectedFault: fault injected at after_validation")
    assert sorted(i for i, (status, _) in states.items() if status == ImageStatus.PROCESSED) == sorted(
        t.image_id for t, _ in tasks if t.image_id != bad)
    ended = Job.get_by_id(job.id)
    assert (ended.status, ended.progress["stages"]["process"]["failed"]) == (JobStatus.SUCCESS, 1)
    # And the message left the inbox for the parked table, with what an operator needs
    assert ResultInbox.select().count() == 0
    [parked] = unsaved.list_parked(job_id=job.id)
    assert (parked.image_ids, parked.attempts) == ([bad], 3)
    assert parked.error == "InjectedFault: fault injected at after_validation"
    # And the job's log tells each attempt and the parking (no Dramatiq dead letter: the fixture checks)
    lines = [row.message for row in JobLog.select().where(JobLog.job == job.id).order_by(JobLog.id)]
    assert sum("could not be saved (attempt" in line for line in lines) == 2
    assert any(f"kept as parked result {parked.id}" in line for line in lines)


def test_while_a_message_waits_out_its_backoff_the_others_are_saved_and_a_fix_saves_it(runtime, job4, monkeypatch):
    # Given a failing message with a long backoff
    job, tasks = job4
    runtime.settings = runtime.settings.with_overrides(result_save_attempts=3, result_save_backoff=600.0)
    bad = tasks[0][0].image_id
    saving_fails_for(monkeypatch, bad)
    take_results(runtime, job.id, tasks)
    # When the inbox is drained: the other three are saved, the bad one waits (not due, not parked)
    drain(runtime, job.id)
    assert Job.get_by_id(job.id).progress["stages"]["process"]["processed"] == 3
    [row] = ResultInbox.select()
    assert (row.attempts, row.next_attempt_at > utcnow() + dt.timedelta(seconds=500)) == (1, True)
    assert inbox.jobs_waiting() == []  # the sweep does not ask for it before its time
    assert inbox.waiting()[job.id].retrying == 1
    # When the bug is fixed and its time comes
    bug_fixed(monkeypatch)
    ResultInbox.update(next_attempt_at=utcnow()).execute()
    assert inbox.jobs_waiting() == [job.id]
    drain(runtime, job.id)
    # Then it is saved like any result: the job ends SUCCESS, exact, nothing parked
    ended = Job.get_by_id(job.id)
    assert (ended.status, ended.progress["stages"]["process"]["processed"]) == (JobStatus.SUCCESS, 4)
    assert ParkedResult.select().count() == 0


def test_an_outage_while_saving_is_never_counted_as_an_attempt(runtime, job4, monkeypatch):
    # Given saving that meets a database outage ten times in a row (more than the attempts allowed)
    job, tasks = job4
    runtime.settings = runtime.settings.with_overrides(result_save_attempts=2, result_save_backoff=0.0)
    take_results(runtime, job.id, tasks[:1])
    outages = iter(range(10))
    decode = saving.decode_result

    def unreachable_then_back(body):
        if next(outages, None) is not None:
            raise peewee.OperationalError("server closed the connection unexpectedly")
        return decode(body)

    monkeypatch.setattr(saving, "decode_result", unreachable_then_back)
    # When drains run through the outage, each raising it for the actor's retries to wait out
    for _ in range(10):
        with pytest.raises(peewee.OperationalError):
            drain(runtime, job.id)
    # Then nothing was counted against the message, and once the outage ends it is saved
    assert ResultInbox.get().attempts is None
    drain(runtime, job.id)
    assert image_states(job.id)[tasks[0][0].image_id][0] == ImageStatus.PROCESSED
    assert ParkedResult.select().count() == 0


def test_a_parked_result_replayed_while_its_job_runs_supersedes_the_failure(runtime, job4, monkeypatch):
    # Given a parked result of a job that still runs (two images unanswered)
    job, tasks = job4
    runtime.settings = runtime.settings.with_overrides(result_save_attempts=1, result_save_backoff=0.0)
    bad = tasks[0][0].image_id
    saving_fails_for(monkeypatch, bad)
    take_results(runtime, job.id, tasks[:2])
    drain(runtime, job.id)
    assert image_states(job.id)[bad][0] == ImageStatus.FAILED
    [parked] = unsaved.list_parked()
    # When the bug is fixed and the parked result replayed
    bug_fixed(monkeypatch)
    assert unsaved.replay(runtime, ids=[parked.id]) == ([parked.id], [])
    drain(runtime, job.id)
    # Then its image counts as processed, and the job ends SUCCESS exact once the rest is answered
    assert image_states(job.id)[bad] == (ImageStatus.PROCESSED, None)
    take_results(runtime, job.id, tasks[2:])
    drain(runtime, job.id)
    ended = Job.get_by_id(job.id)
    assert (ended.status, ended.progress["stages"]["process"]["processed"],
            ended.progress["stages"]["process"]["failed"]) == (JobStatus.SUCCESS, 4, 0)
    assert ParkedResult.select().count() == 0


def test_a_parked_result_of_an_ended_job_is_not_replayed_and_can_be_dropped(runtime, job4, monkeypatch):
    job, tasks = job4
    runtime.settings = runtime.settings.with_overrides(result_save_attempts=1, result_save_backoff=0.0)
    saving_fails_for(monkeypatch, tasks[0][0].image_id)
    take_results(runtime, job.id, tasks)
    drain(runtime, job.id)
    assert Job.get_by_id(job.id).status == JobStatus.SUCCESS
    [parked] = unsaved.list_parked()
    with pytest.raises(UserInputError, match=f"job\\(s\\) {job.id} ended"):
        unsaved.replay(runtime, job_id=job.id)
    assert unsaved.replay(runtime, every=True) == ([], [parked.id])  # --all leaves it, saying so
    with pytest.raises(UserInputError, match="no parked result 999"):
        unsaved.drop(ids=[999])
    assert unsaved.drop(ids=[parked.id]) == [parked.id]
    assert ParkedResult.select().count() == 0 and ResultInbox.select().count() == 0


def test_a_deadline_ends_a_job_whose_results_wait_saying_which_were_received(runtime, moth_pipeline, monkeypatch):
    # Given a job past its deadline: one result saved, one taken but failing to save (backoff), one taken
    # and saveable (the workers are behind), one never answered
    job = fake_job(moth_pipeline, 4, deadline_s=600)
    dispatch(runtime, job.id)
    tasks = sorted(pull_tasks(runtime, job.id, 4), key=lambda t: int(t[0].image_id))
    runtime.settings = runtime.settings.with_overrides(result_save_backoff=600.0)
    take_results(runtime, job.id, tasks[:1])
    drain(runtime, job.id)
    unsaveable, behind, unanswered = (t.image_id for t, _ in tasks[1:])
    saving_fails_for(monkeypatch, unsaveable)
    take_results(runtime, job.id, tasks[1:2])
    drain(runtime, job.id)  # its first attempt fails: it waits out its backoff
    take_results(runtime, job.id, tasks[2:3])  # not drained yet: the workers are behind
    # When the health check runs after the deadline
    report = run_health_check(runtime, now=utcnow() + dt.timedelta(minutes=11))
    # Then the job ends: what could be saved was, the rest failed with reasons that tell them apart
    assert report["deadlines"]["jobs"] == {str(job.id): "deadline_passed"}
    states = image_states(job.id)
    assert states[behind] == (ImageStatus.PROCESSED, None)
    assert states[unsaveable][1].endswith("its result was received but could not be saved by then")
    assert states[unanswered][1].endswith("this image had no result by then")
    assert Job.get_by_id(job.id).status == JobStatus.SUCCESS  # 2 of 4 failed: not more than half


def test_health_is_degraded_naming_a_job_whose_results_wait_too_long_or_were_parked(runtime, job4, monkeypatch):
    job, tasks = job4
    runtime.settings = runtime.settings.with_overrides(result_save_attempts=2, result_save_backoff=600.0,
                                                       stalled_jobs_max_minutes=1.0)
    saving_fails_for(monkeypatch, tasks[0][0].image_id)
    take_results(runtime, job.id, tasks[:2])
    drain(runtime, job.id)
    # A result received 2 minutes ago and still not saved (past the 1-minute stall cutoff)
    ResultInbox.update(received_at=utcnow() - dt.timedelta(minutes=2)).execute()
    status, report = build_report(runtime.settings, runtime.runner)
    assert status == 1, report["problems"]
    assert any(p.startswith(f"job {job.id}: results received 2 min ago are still not saved (1 message(s), 1 image(s), "
                            "1 of them failing and retried)") for p in report["problems"]), report["problems"]
    [line] = [j for j in report["jobs"] if j["id"] == job.id]
    assert line["results_waiting"]["messages"] == 1 and line["results_waiting"]["oldest_age_s"] >= 119
    # Once parked, health names the parked result until an operator deals with it
    ResultInbox.update(next_attempt_at=utcnow()).execute()
    drain(runtime, job.id)
    status, report = build_report(runtime.settings, runtime.runner)
    assert status == 1
    assert any(p.startswith(f"1 result message(s) could not be saved and are parked (job(s) {job.id})")
               for p in report["problems"]), report["problems"]
    unsaved.drop(job_id=job.id)
    assert not any("parked" in p for p in build_report(runtime.settings, runtime.runner)[1]["problems"])


# ---- with real worker processes and a real processing service ------------------------------------------------

def counting(runs: Counter):
    def handler(task):
        runs[task.image_id] += 1
        return moth.process_task(task)

    return handler


def finished(job_id: int):
    job = Job.get_by_id(job_id)
    return job if job.status in JobStatus.TERMINAL else None


def expected_detections(truth: dict, urls: list[str], skip: set[str] = frozenset()) -> int:
    return sum(len(truth[u.rsplit("/", 1)[1]]) for u in urls if u not in skip)


@pytest.fixture
def six_images(runtime, moth_pipeline, trap_images):
    """A 6-image job of real trap images, not started: (job, urls, truth, the id of its first image)."""
    directory, truth = trap_images
    urls = [f"file://{directory}/{name}" for name in sorted(truth)[:6]]
    job = create_job(moth_pipeline, urls)
    first = JobImage.select().where(JobImage.job == job.id).order_by(JobImage.id).first()
    return job, urls, truth, str(first.image_id), first.image.url


@pytest.mark.slow
def test_real_workers_park_a_result_that_never_saves_and_health_names_the_job_meanwhile(
        runtime, six_images, worker_factory, service_factory):
    # Given workers whose saving always raises for one image's result, and a service answering every task
    job, urls, truth, bad, bad_url = six_images
    s = runtime.settings = runtime.settings.with_overrides(result_save_attempts=3, result_save_backoff=2.0,
                                                           stalled_jobs_max_minutes=0.05)
    worker_factory(s, threads=2, PIPELINE_RAISE_AT="after_validation", PIPELINE_RAISE_IF=f"images={bad}")
    runs: Counter = Counter()
    service_factory(s, moth.SLUG, counting(runs), concurrency=2, batch_size=1)  # one image per message
    # When the job runs
    start_job(runtime, job)
    # Then while that result waits, `health` is degraded and names the job
    wait_for(lambda: any(p.startswith(f"job {job.id}: results received")
                         for p in build_report(s, runtime.runner)[1]["problems"]),
             timeout_s=60, interval_s=0.3, message="health to name the job whose results wait")
    # And the job ends by its threshold once the message is parked: its image failed with the error,
    # every other image saved exactly, no model run twice
    ended = wait_for(lambda: finished(job.id), timeout_s=90, message="the job to end")
    stages = ended.progress["stages"]
    assert (ended.status, stages["process"]["processed"], stages["process"]["failed"]) == (JobStatus.SUCCESS, 6, 1)
    assert stages["results"]["detections"] == expected_detections(truth, urls, {bad_url})
    assert image_states(job.id)[bad][1] == ("result could not be saved: InjectedFault: fault injected at "
                                            "after_validation")
    assert set(runs.values()) == {1} and len(runs) == 6
    assert [p.image_ids for p in unsaved.list_parked(job_id=job.id)] == [[bad]]


@pytest.mark.slow
def test_a_bug_fixed_before_the_last_attempt_saves_the_result_without_a_model_rerun(
        runtime, six_images, worker_factory, service_factory):
    # Given a worker whose saving fails for one image's result, with 4 s before its next attempt
    job, urls, truth, bad, _ = six_images
    s = runtime.settings = runtime.settings.with_overrides(result_save_attempts=3, result_save_backoff=4.0)
    buggy = worker_factory(s, threads=2, PIPELINE_RAISE_AT="after_validation", PIPELINE_RAISE_IF=f"images={bad}")
    runs: Counter = Counter()
    service_factory(s, moth.SLUG, counting(runs), concurrency=2, batch_size=1)
    start_job(runtime, job)
    wait_for(lambda: ResultInbox.select().where(ResultInbox.attempts == 1).exists(), timeout_s=60,
             message="a first failed attempt")
    # When the buggy worker is replaced by a fixed one before the message's attempts run out
    kill_group(buggy)
    worker_factory(s, threads=2)
    # Then the job ends SUCCESS, exact, and no model ran twice
    ended = wait_for(lambda: finished(job.id), timeout_s=90, message="the job to end")
    stages = ended.progress["stages"]
    assert (ended.status, stages["process"]["processed"], stages["process"]["failed"]) == (JobStatus.SUCCESS, 6, 0)
    assert stages["results"]["detections"] == expected_detections(truth, urls)
    assert set(runs.values()) == {1} and len(runs) == 6
    assert ParkedResult.select().count() == 0


# ---- the operator's doors: CLI and API ------------------------------------------------------------------------

@pytest.fixture
def parked_job(runtime, job4, monkeypatch):
    """A running job with one parked result (image of its first task) and one result waiting its backoff."""
    job, tasks = job4
    runtime.settings = runtime.settings.with_overrides(result_save_attempts=1, result_save_backoff=0.0)
    saving_fails_for(monkeypatch, tasks[0][0].image_id)
    take_results(runtime, job.id, tasks[:1])
    drain(runtime, job.id)
    runtime.settings = runtime.settings.with_overrides(result_save_attempts=3, result_save_backoff=600.0)
    saving_fails_for(monkeypatch, tasks[1][0].image_id)
    take_results(runtime, job.id, tasks[1:2])
    drain(runtime, job.id)
    bug_fixed(monkeypatch)
    return job, tasks


def test_the_cli_lists_shows_replays_and_drops_parked_results(runtime, parked_job):
    job, tasks = parked_job
    env = {**subprocess_env(runtime.settings), "COLUMNS": "200"}

    def cli(*args, expect=0):
        proc = subprocess.run([sys.executable, "cli.py", *args], cwd=PROJECT, env=env, capture_output=True, text=True,
                              timeout=60)
        assert proc.returncode == expect, proc.stderr + proc.stdout
        return proc

    [row] = json.loads(cli("parked", "list", "--json").stdout)
    assert (row["job_id"], row["image_ids"], row["attempts"]) == (job.id, [tasks[0][0].image_id], 1)
    assert "fault injected at after_validation" in cli("parked", "list").stdout
    assert json.loads(cli("parked", "show", str(row["id"])).stdout)["source_images"][0]["id"] == tasks[0][0].image_id
    # status shows the result that waits to be saved, apart from processed and failed
    status = json.loads(cli("status", str(job.id), "--json").stdout)
    assert (status["received"], status["failed"]) == (1, 1)
    assert "1 image(s) answered by the processing service and waiting to be saved" in cli("status", str(job.id)).stdout
    # bad input: one readable line, non-zero exit, no traceback
    for args, expect, says in ((("parked", "replay"), 2, "name parked results by id"),
                               (("parked", "drop", "999"), 1, "no parked result 999"),
                               (("parked", "show", "999"), 1, "no parked result 999")):
        proc = cli(*args, expect=expect)
        assert says in proc.stderr and "Traceback" not in proc.stderr
    assert cli("parked", "replay", str(row["id"])).stdout.strip() == "replayed 1 parked result(s)"
    assert ParkedResult.select().count() == 0 and ResultInbox.select().count() == 2


def test_the_api_lists_replays_and_drops_parked_results(runtime, parked_job):
    from tests.web_helpers import TOKENS_SETTING, WebServer, bearer

    job, tasks = parked_job
    server = WebServer(runtime.settings.with_overrides(web_tokens=TOKENS_SETTING), runtime).start()
    try:
        with httpx.Client(base_url=server.url, timeout=30) as web:
            [row] = web.get("/api/v1/parked", headers=bearer("vic")).json()["parked"]
            assert (row["job_id"], row["image_ids"]) == (job.id, [tasks[0][0].image_id])
            assert web.get("/api/v1/parked", params={"job_id": job.id + 1}, headers=bearer("vic")).json() == {
                "parked": []}
            assert web.get(f"/api/v1/jobs/{job.id}", headers=bearer("vic")).json()["received"] == 1
            assert web.post("/api/v1/parked/drop", json={"ids": [row["id"]]}, headers=bearer("vic")).status_code == 403
            refused = web.post("/api/v1/parked/replay", json={}, headers=bearer("ada"))
            assert (refused.status_code, refused.json()["error"]) == (
                400, "name parked results by id, or give a job (--job N) or --all")
            missing = web.post("/api/v1/parked/drop", json={"ids": [999]}, headers=bearer("ada"))
            assert (missing.status_code, missing.json()) == (404, {"error": "no parked result 999"})
            assert web.post("/api/v1/parked/replay", json={"job_id": job.id}, headers=bearer("ada")).json() == {
                "replayed": [row["id"]], "left_parked": []}
    finally:
        server.stop()
    assert ParkedResult.select().count() == 0


def test_a_batch_that_never_saves_fails_each_of_its_images_once_even_delivered_twice(runtime, moth_pipeline,
                                                                                   monkeypatch):
    """The SDK's shape: several images in one result message, and a replay of that message. Each image of
    the batch fails once, the counters stay exact, and the job's other messages are saved."""
    job = fake_job(moth_pipeline, 5)
    dispatch(runtime, job.id)
    tasks = sorted(pull_tasks(runtime, job.id, 5), key=lambda t: int(t[0].image_id))
    runtime.settings = runtime.settings.with_overrides(result_save_attempts=2, result_save_backoff=0.0)
    bodies = [json.loads(success_body(task, boxes=1)) for task, _ in tasks[:3]]
    batch = {**bodies[0], "source_images": [i for b in bodies for i in b["source_images"]],
             "detections": [d for b in bodies for d in b["detections"]]}
    replies = ",".join(reply for _, reply in tasks[:3])
    tokens = ",".join(task.task_token for task, _ in tasks[:3])
    saving_fails_for(monkeypatch, tasks[1][0].image_id)
    take(runtime, [Incoming.direct(job.id, json.dumps(batch).encode(), replies, tokens)
                   for _ in range(2)])  # and a replay
    take_results(runtime, job.id, tasks[3:])
    drain(runtime, job.id)
    states = image_states(job.id)
    assert [states[t.image_id][0] for t, _ in tasks] == [ImageStatus.FAILED] * 3 + [ImageStatus.PROCESSED] * 2
    ended = Job.get_by_id(job.id)
    assert (ended.status, ended.progress["stages"]["process"]["failed"]) == (JobStatus.FAILURE, 3)  # 3/5 > 0.5
    assert [p.image_ids for p in unsaved.list_parked(job_id=job.id)] == [[t.image_id for t, _ in tasks[:3]]] * 2
