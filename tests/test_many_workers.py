"""Several worker processes on PostgreSQL against one large job and many small ones at once: exact counts,
no deadlock, no lock timeout."""

from __future__ import annotations

import pytest

from models import Job, JobStatus
from pipeline.schemas import AlgorithmRef, BBox, ClassificationOut, DetectionOut, SourceImageRef, SuccessResult
from tests.conftest import POSTGRES, wait_for
from tests.helpers import fake_job

pytestmark = [pytest.mark.slow, pytest.mark.postgres, pytest.mark.parametrize("db_url", [pytest.param(
    "postgres", marks=pytest.mark.skipif(not POSTGRES, reason="PostgreSQL not reachable"))], indirect=True)]

DET, CLS = AlgorithmRef("blob-detector-v1"), AlgorithmRef("moth-shape-v1")


async def null_model(task):
    """Two classified boxes per image, at once."""
    return SuccessResult(task.pipeline, [SourceImageRef(task.image_id)], [
        DetectionOut(task.image_id, DET, BBox(i, i, i + 5, i + 5), 0.9,
                     classifications=[ClassificationOut("Noctuidae", CLS, [0.9])]) for i in range(2)])


@pytest.mark.parametrize("processes", [2, 4])
def test_worker_processes_on_postgresql_run_a_big_job_and_many_small_ones_exactly(
        settings, runtime, moth_pipeline, worker_factory, service_factory, processes):
    from pipeline.core.jobs import start_job

    worker_factory(settings, processes=processes, threads=4)
    service_factory(settings, moth_pipeline, null_model, concurrency=32, batch_size=25)
    big = fake_job(moth_pipeline, 20_000, prefix="file:///big/img")
    small = [fake_job(moth_pipeline, 5, prefix=f"file:///small{n}/img") for n in range(200)]
    for job in [big, *small]:
        start_job(runtime, job)
    ids = [big.id, *(j.id for j in small)]
    wait_for(lambda: Job.select().where(Job.id.in_(ids) & Job.status.in_(JobStatus.TERMINAL)).count() == len(ids),
             timeout_s=180, interval_s=0.5, message="every job to finish")
    for job in Job.select().where(Job.id.in_(ids)):
        stages = job.progress["stages"]
        assert job.status == JobStatus.SUCCESS, (job.id, job.error)
        assert (stages["process"]["processed"], stages["process"]["failed"]) == (job.total_images, 0)
        assert stages["results"]["detections"] == 2 * job.total_images
    logs = worker_factory.logs().lower()
    assert "deadlock" not in logs and "lock timeout" not in logs and "could not obtain lock" not in logs
