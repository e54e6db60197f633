"""Whole-system tests: a real `dramatiq pipeline.actors` worker subprocess, real NATS and Redis, and a
processing service (the SDK's reference service, or one written only from docs/processing-services.md)."""

from __future__ import annotations

import asyncio
from collections import Counter

import pytest

from models import Classification, Detection, Job, JobImage, JobLog, JobStatus
from pipeline.core.jobs import create_job, start_job
from pipeline.infra.aio import LoopThread
from pipeline.ops.sources import image_urls_from_dir
from pipeline.sdk import moth
from tests.conftest import wait_for
from tests.helpers import raw_service, stream_count

pytestmark = pytest.mark.slow


def finished(job_id: int) -> Job | None:
    job = Job.get_by_id(job_id)
    return job if job.status in JobStatus.TERMINAL else None


def saved_taxa(job_id: int) -> Counter:
    query = (Classification.select(Classification.taxon).join(Detection)
             .join(JobImage, on=(Detection.image == JobImage.image))
             .where((JobImage.job == job_id) & (Detection.bbox_key != "")).tuples())
    return Counter(t for (t,) in query)


def test_fifty_images_run_to_success_with_exact_counts(runtime, moth_pipeline, trap_images, worker_factory,
                                                       service_factory):
    # Given a worker process and the reference processing service
    directory, truth = trap_images
    expected = moth.summarize_truth(truth)
    worker_factory(runtime.settings)
    service_factory(runtime.settings, moth.SLUG, moth.process_task)
    # When a 50-image job is enqueued
    job = create_job(moth.SLUG, image_urls_from_dir(str(directory)), name="e2e")
    start_job(runtime, job)
    job = wait_for(lambda: finished(job.id), timeout_s=90, message="job to finish")
    # Then it is SUCCESS and every count equals the ground truth
    stages = job.progress["stages"]
    assert job.status == JobStatus.SUCCESS, worker_factory.logs()[-3000:]
    assert stages["process"]["processed"] == 50 and stages["process"]["failed"] == 0
    assert stages["results"]["detections"] == expected["detections"]
    assert stages["results"]["classifications"] == expected["detections"]
    assert stages["results"]["captures"] == 50
    assert dict(saved_taxa(job.id)) == expected["taxa"]
    assert stream_count(runtime, job.id, moth.SLUG) == 0
    assert runtime.redis.keys(f"jetpipe:job:{job.id}:*") == []


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_jobs_beyond_the_job_limit_wait_their_turn_and_all_succeed(runtime, moth_pipeline, trap_images,
                                                                   worker_factory, service_factory):
    # Given two worker processes allowed one dispatched job at a time (PIPELINE_NATS_MAX_JOBS=1), and a
    # service sending one image per result message
    directory, truth = trap_images
    one_slot = runtime.settings.with_overrides(nats_max_jobs=1)
    worker_factory(one_slot, processes=2)
    service_factory(one_slot, moth.SLUG, moth.process_task, batch_size=1)
    names_ = sorted(truth)
    # When three jobs are enqueued at once
    jobs = [create_job(moth.SLUG, [f"file://{directory}/{n}" for n in names_[k::3][:6]], name=f"slot-{k}")
            for k in range(3)]
    for job in jobs:
        start_job(runtime, job)
    # Then all end SUCCESS with exact counts, those that found the slot taken having waited their turn
    for job in jobs:
        done = wait_for(lambda job=job: finished(job.id), timeout_s=90, message="every job to finish")
        stages = done.progress["stages"]
        assert done.status == JobStatus.SUCCESS, worker_factory.logs()[-3000:]
        assert (stages["process"]["processed"], stages["process"]["failed"]) == (6, 0)
        urls = [i.image.url for i in JobImage.select().where(JobImage.job == job.id)]
        assert stages["results"]["detections"] == sum(len(truth[u.rsplit("/", 1)[1]]) for u in urls)
    waited = Counter(line.job_id for line in JobLog.select().where(JobLog.job.in_([j.id for j in jobs]))
                     if "waiting for a free job slot" in line.message)
    assert 1 <= len(waited) <= 2 and set(waited.values()) == {1}  # someone waited, each said so once


def test_a_service_written_from_the_wire_contract_alone_completes_a_job(runtime, moth_pipeline, worker_factory):
    def answer(task):
        n = int(task["image_id"])
        if n % 7 == 0:
            return {"error": "could not read image", "image_id": task["image_id"]}
        return {"pipeline": task["pipeline"], "source_images": [{"id": task["image_id"], "url": task["image_url"]}],
                "total_time": 0.01, "detections": [
                    {"source_image_id": task["image_id"], "bbox": {"x1": 1, "y1": 2, "x2": 30, "y2": 40},
                     "algorithm": {"key": "blob-detector-v1", "name": "det"}, "score": 0.9, "crop_image_url": None,
                     "classifications": [{"taxon": "Noctuidae", "scores": [0.9, 0.05, 0.05],
                                          "labels": list(moth.TAXA),
                                          "algorithm": {"key": "moth-shape-v1", "name": "cls"}, "terminal": True}]}]}

    worker_factory(runtime.settings)
    loop = LoopThread()
    stop = asyncio.Event()
    service = loop.spawn(raw_service(runtime.settings.nats_url, moth.SLUG, stop, answer))
    try:
        job = create_job(moth.SLUG, [f"https://example.invalid/img-{i}.jpg" for i in range(30)], name="raw")
        start_job(runtime, job)
        job = wait_for(lambda: finished(job.id), timeout_s=60, message="job to finish")
    finally:
        loop.loop.call_soon_threadsafe(stop.set)
        service.result(timeout=10)
        loop.stop()
    failed = sum(1 for r in JobImage.select() if int(r.image_id) % 7 == 0)
    stages = job.progress["stages"]
    assert job.status == JobStatus.SUCCESS
    assert (stages["process"]["processed"], stages["process"]["failed"]) == (30, failed)
    assert stages["results"]["detections"] == 30 - failed
