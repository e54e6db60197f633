"""No re-processing (pipeline/core/reuse.py): a new job reuses the results an earlier job of the same pipeline
version saved for the same images, sends only the others, counts exactly, and exports the reused ones marked
with the job they came from; a new pipeline version, or reuse turned off, processes everything."""

from __future__ import annotations

import json

from models import Job, JobImage, JobStatus
from pipeline.core import jobs
from pipeline.core.registry import register_pipeline
from pipeline.ops import export
from pipeline.schemas import decode_pipeline_spec
from pipeline.sdk import moth
from tests.helpers import dispatch, error_body, fake_job, handle_result_message, pull_tasks, stream_count, success_body


def answer(runtime, job_id: int, tasks, *, failing: set[str] = frozenset()) -> None:
    for task, reply in tasks:
        body = error_body(task.image_id) if task.image_id in failing else success_body(task, boxes=2)
        handle_result_message(runtime, job_id, body, reply, task.task_token)


def test_a_job_over_processed_images_sends_only_the_new_and_the_failed_ones(runtime, moth_pipeline):
    # Given a job of 6 images that ended with 5 processed and 1 failed
    first = fake_job(moth_pipeline, 6)
    dispatch(runtime, first.id)
    tasks = pull_tasks(runtime, first.id, 6)
    failed = tasks[0][0].image_id
    answer(runtime, first.id, tasks, failing={failed})
    assert Job.get_by_id(first.id).status == JobStatus.SUCCESS
    # When a job over those 6 and 2 new images is made
    second = fake_job(moth_pipeline, 8, reuse=True)
    assert second.reused_images == 5
    dispatch(runtime, second.id)
    # Then only 3 tasks are published (the failed image and the new ones), and the reused show as processed
    assert stream_count(runtime, second.id, moth_pipeline) == 3
    summary = Job.get_by_id(second.id).progress["stages"]["process"]
    assert (summary["processed"], summary["remaining"]) == (5, 3)
    rest = pull_tasks(runtime, second.id, 8)
    assert len(rest) == 3 and failed in {t.image_id for t, _ in rest}
    answer(runtime, second.id, rest)
    done = Job.get_by_id(second.id)
    process = done.progress["stages"]["process"]
    assert (done.status, process["processed"], process["failed"]) == (JobStatus.SUCCESS, 8, 0)
    # and its export holds all 8 with their detections, the reused ones marked with the job they came from
    lines = [json.loads(line) for line in export.export(second.id, "jsonl")]
    assert len(lines) == 8 and all(len(line["detections"]) == 2 for line in lines)
    assert sorted(line["reused_from"] or 0 for line in lines) == [0] * 3 + [first.id] * 5
    assert done.progress["stages"]["results"]["detections"] == 16  # each image counted once


def test_a_job_whose_images_were_all_processed_ends_at_once(runtime, moth_pipeline):
    first = fake_job(moth_pipeline, 3)
    dispatch(runtime, first.id)
    answer(runtime, first.id, pull_tasks(runtime, first.id, 3))
    again = fake_job(moth_pipeline, 3, reuse=True)
    dispatch(runtime, again.id)
    ended = Job.get_by_id(again.id)
    assert (ended.status, ended.reused_images, ended.cleaned_up_at is not None) == (JobStatus.SUCCESS, 3, True)
    assert ended.progress["stages"]["results"]["detections"] == 6
    assert stream_count(runtime, again.id, moth_pipeline) == 0


def test_reuse_off_or_a_new_pipeline_version_processes_everything(runtime, moth_pipeline):
    first = fake_job(moth_pipeline, 4)
    dispatch(runtime, first.id)
    answer(runtime, first.id, pull_tasks(runtime, first.id, 4))
    # reuse turned off for one job
    off = fake_job(moth_pipeline, 4)  # (the helper's default: reuse off)
    assert off.reused_images is None
    jobs.cancel(runtime, off.id, by="test")
    # the pipeline registered again with a new version of its classifier: a new version, nothing reused
    spec = json.loads(json.dumps(moth.PIPELINE_SPEC))
    spec["algorithms"][1]["version"] = "2"
    register_pipeline(decode_pipeline_spec(json.dumps(spec).encode(), source="test"), for_service="svc")
    renewed = fake_job(moth_pipeline, 4, reuse=True)
    assert renewed.reused_images is None
    dispatch(runtime, renewed.id)
    assert stream_count(runtime, renewed.id, moth_pipeline) == 4
    # a name that changes (for people) is not a new version
    spec["name"] = "Moth demo, renamed"
    register_pipeline(decode_pipeline_spec(json.dumps(spec).encode(), source="test"), for_service="svc")
    assert JobImage.select().where(JobImage.job == renewed.id).count() == 4
    answer(runtime, renewed.id, pull_tasks(runtime, renewed.id, 4))
    assert fake_job(moth_pipeline, 4, reuse=True).reused_images == 4
