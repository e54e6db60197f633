"""Invariant 12: only the holder of a task decides its image. A result decides an image only if it names
that image's task token (carried in the task, made from the job's own secret); a TERM decides the image of
the task it names by jetpipe's own record, never by the text of its reason. Real NATS, Redis, databases and,
where the path needs one, a worker subprocess."""

from __future__ import annotations

import asyncio
import json
import threading

import pytest

from models import Job, JobImage, JobLog, JobStatus
from pipeline import names
from pipeline.core.jobs import create_job, start_job
from pipeline.core.task_tokens import token_for
from pipeline.sdk import moth
from tests.conftest import make_settings, wait_for
from tests.helpers import (
    answer_one_box,
    dispatch,
    fake_job,
    handle_result_message,
    nats_client,
    pull_tasks,
    raw_service,
    stream_count,
    success_body,
)
from tests.test_end_to_end import LoopThread


def statuses(job_id: int) -> dict[str, str]:
    return {str(r.image_id): r.status for r in JobImage.select().where(JobImage.job == job_id)}


def logged(job_id: int, text: str) -> list[str]:
    return [r.message for r in JobLog.select().where((JobLog.job == job_id) & JobLog.message.contains(text))]


def test_each_task_carries_a_token_for_its_image_that_no_other_job_or_image_shares(runtime, moth_pipeline):
    a, b = fake_job(moth_pipeline, 3), fake_job(moth_pipeline, 3, prefix="file:///b/img")
    dispatch(runtime, a.id)
    dispatch(runtime, b.id)
    tasks = pull_tasks(runtime, a.id, 3) + pull_tasks(runtime, b.id, 3)
    tokens = [task.task_token for task, _ in tasks]
    assert len(set(tokens)) == 6
    assert all(task.task_token.startswith(f"{task.image_id}.") for task, _ in tasks)
    for task, _ in tasks:  # each is the job's own: made from a secret of its own, never shown
        assert task.task_token == token_for(Job.get_by_id(task.job_id).task_secret, task.job_id, task.image_id)
    assert Job.get_by_id(a.id).task_secret != Job.get_by_id(b.id).task_secret


@pytest.mark.parametrize("forgery", ["no token", "a made-up token", "another job's token for the image",
                                     "the sender's own token, for another image"])
def test_a_result_its_sender_cannot_prove_decides_nothing(runtime, moth_pipeline, forgery):
    # Given a job whose two tasks are held by two services, and another job
    job = fake_job(moth_pipeline, 2)
    other = fake_job(moth_pipeline, 1, prefix="file:///other/img")
    dispatch(runtime, job.id)
    dispatch(runtime, other.id)
    (mine, my_reply), (theirs, their_reply) = pull_tasks(runtime, job.id, 2)
    [(other_task, _)] = pull_tasks(runtime, other.id, 1)
    # When the holder of `mine` sends a result for `theirs` (their reply subject, which it could guess)
    token = {"no token": None, "a made-up token": f"{theirs.image_id}.AAAAAAAAAAAAAAAAAAAAAA",
             "another job's token for the image": token_for(Job.get_by_id(other.id).task_secret, job.id,
                                                           theirs.image_id),
             "the sender's own token, for another image": mine.task_token}[forgery]
    handled = handle_result_message(runtime, job.id, success_body(theirs, boxes=3), their_reply, token)
    # Then it is refused whole, with the reason in the job log: the image stays pending, its task is not
    # ACKed (its holder's delivery is untouched), and the real result decides it afterwards
    assert handled.action == "rejected"
    assert statuses(job.id) == {mine.image_id: "pending", theirs.image_id: "pending"}
    assert stream_count(runtime, job.id, moth_pipeline) == 2
    assert len(logged(job.id, "result refused")) == 1
    handle_result_message(runtime, job.id, success_body(theirs, boxes=1), their_reply, theirs.task_token)
    handle_result_message(runtime, job.id, success_body(mine, boxes=1), my_reply, mine.task_token)
    ended = Job.get_by_id(job.id)
    assert ended.status == JobStatus.SUCCESS and ended.progress["stages"]["results"]["detections"] == 2


def test_a_bad_result_fails_only_the_images_it_proves_and_terminates_only_their_tasks(runtime, moth_pipeline):
    # Given a job whose two tasks are held by two services
    job = fake_job(moth_pipeline, 2)
    dispatch(runtime, job.id)
    (mine, my_reply), (theirs, their_reply) = pull_tasks(runtime, job.id, 2)
    # When the holder of `mine` sends unreadable bytes naming both reply subjects, with its own token
    handled = handle_result_message(runtime, job.id, b"{not json", f"{my_reply},{their_reply}", mine.task_token)
    # Then only its own image fails as a bad result and only its own task is terminated
    assert handled.action == "failed"
    assert statuses(job.id) == {mine.image_id: "failed", theirs.image_id: "pending"}
    assert stream_count(runtime, job.id, moth_pipeline) == 1


def test_a_service_written_before_task_tokens_is_told_why_in_the_job_log(db_url, stack, moth_pipeline,
                                                                        worker_factory):
    # Given a worker and a raw service written to the contract before task tokens, tasks giving up fast
    from pipeline.infra.runtime import Runtime, set_runtime
    from tests.conftest import clean_servers

    clean_servers(stack)
    settings = make_settings(db_url, stack, PIPELINE_NATS_TASK_TTR=1, PIPELINE_NATS_MAX_DELIVER=2)
    runtime = Runtime(settings)
    previous = set_runtime(runtime)
    worker_factory(settings)
    loop, stop = LoopThread(), asyncio.Event()
    service = loop.spawn(raw_service(settings.nats_url, moth.SLUG, stop, answer_one_box, old_contract=True))
    try:
        job = create_job(moth.SLUG, [f"file:///old/{i}.png" for i in range(3)])
        start_job(runtime, job)
        # Then every result is refused with a reason that says what to change, nothing is saved, and the
        # job still ends: its images fail as lost once their deliveries run out (no silent loss)
        ended = wait_for(lambda: (j := Job.get_by_id(job.id)).status in JobStatus.TERMINAL and j, timeout_s=90,
                         message="the job to end")
    finally:
        loop.loop.call_soon_threadsafe(stop.set)
        service.result(timeout=10)
        loop.stop()
        set_runtime(previous)
        runtime.close()
    assert ended.status == JobStatus.FAILURE
    assert set(statuses(job.id).values()) == {"failed"}
    refusals = logged(job.id, "result refused: it names no task token (Pipeline-Task-Token header)")
    assert refusals and all("docs/processing-services.md" in line for line in refusals)
    errors = [r.error for r in JobImage.select().where(JobImage.job == job.id)]
    assert all(e.startswith("lost:") for e in errors), errors


def test_a_term_fails_the_image_of_the_task_it_names_whatever_its_reason_says(runtime, settings, moth_pipeline,
                                                                             worker_factory):
    # Given a worker (it reads the MSG_TERMINATED advisories) and a job whose two tasks two services hold
    worker_factory(settings)
    job = fake_job(moth_pipeline, 2)
    dispatch(runtime, job.id)
    (mine, my_reply), (theirs, _) = pull_tasks(runtime, job.id, 2)

    async def term():
        async with nats_client(settings.nats_url) as nc:
            await nc.publish(my_reply, f"+TERM image={theirs.image_id} bad result: forged".encode())
            await nc.flush()

    runtime.runner.run(term())
    # Then the image of the task it terminated fails (by jetpipe's record of that task), with the reason it
    # gave kept as text; the image its reason names is untouched
    wait_for(lambda: statuses(job.id)[mine.image_id] == "failed", timeout_s=30, message="the TERM's image to fail")
    row = JobImage.get((JobImage.job == job.id) & (JobImage.image == int(mine.image_id)))
    assert row.error == f"task terminated by a processing service (its reason: 'image={theirs.image_id} bad result: " \
                        "forged')"
    assert statuses(job.id)[theirs.image_id] == "pending"


def test_tokens_are_checked_for_a_whole_batch_with_one_query_per_job(runtime, moth_pipeline, monkeypatch):
    """Proving tokens costs no database work per message: the jobs' secrets are read once per batch."""
    from pipeline.core import inbox, task_tokens

    job = fake_job(moth_pipeline, 20)
    dispatch(runtime, job.id)
    tasks = pull_tasks(runtime, job.id, 20)
    reads = []
    real = task_tokens.job_secrets
    monkeypatch.setattr(task_tokens, "job_secrets", lambda ids: reads.append(1) or real(ids))
    batch = [inbox.Incoming.direct(job.id, success_body(t), r, t.task_token) for t, r in tasks]
    proofs = inbox.prove(batch)
    assert len(reads) == 1 and [p.images for p in proofs] == [frozenset({t.image_id}) for t, _ in tasks]


def test_concurrent_forgeries_never_outlive_the_real_result(runtime, moth_pipeline):
    """First result wins, so a forgery that won would outlive the real result: none can win."""
    job = fake_job(moth_pipeline, 2)  # the job runs on after the race (a result for an ended job is refused anyway)
    dispatch(runtime, job.id)
    (task, reply), _ = pull_tasks(runtime, job.id, 2)
    forged = json.dumps({"error": "forged", "image_id": task.image_id}).encode()
    threads = [threading.Thread(target=handle_result_message, args=(runtime, job.id, forged, reply,
                                                                   f"{task.image_id}.forgedforgedforgedforge"))
               for _ in range(4)]
    for thread in threads:
        thread.start()
    handle_result_message(runtime, job.id, success_body(task, boxes=2), reply, task.task_token)
    for thread in threads:
        thread.join(30)
    row = JobImage.get((JobImage.job == job.id) & (JobImage.image == int(task.image_id)))
    assert (row.status, row.detections) == ("processed", 2)
    refusals = logged(job.id, "result refused")
    assert 1 <= len(refusals) <= 4 and all(names.HDR_TASK_TOKEN in line for line in refusals)


def test_a_flood_of_forged_results_writes_one_job_log_line_a_batch(runtime, moth_pipeline):
    from pipeline.core.inbox import Incoming, take
    from pipeline.core.saving import drain

    job = fake_job(moth_pipeline, 1)
    dispatch(runtime, job.id)
    [(task, reply)] = pull_tasks(runtime, job.id, 1)
    forged = [Incoming.direct(job.id, success_body(task), reply, f"{task.image_id}.forged{n:016d}")
              for n in range(300)]
    take(runtime, forged)
    drain(runtime, job.id)
    [line] = logged(job.id, "result refused")
    assert line.endswith("(and 299 more result message(s) refused in this batch)")
    assert JobImage.get(JobImage.job == job.id).status == "pending"
    assert stream_count(runtime, job.id, moth_pipeline) == 1  # its task untouched
