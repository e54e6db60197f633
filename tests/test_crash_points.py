"""Crash-point matrix: a real worker SIGKILLed at each named point of taking results, saving them and
run_job during a 20-image job (beside a 10-image job of another project); a fresh worker finishes both.
Invariants 1 (ACK last), 2 (exact counters) and 11 (a result in hand decides its image) under crashes.
"""

from __future__ import annotations

import pytest

from models import Detection, Job, JobImage, JobStatus
from pipeline.core import scheduling
from pipeline.core.jobs import create_job, start_job
from pipeline.ops.sources import image_urls_from_dir
from pipeline.sdk import moth
from tests.conftest import make_settings, wait_for
from tests.helpers import stream_count

pytestmark = pytest.mark.slow

TAKE_POINTS = ["after_inbox", "after_task_ack"]
SAVE_POINTS = ["after_validation", "after_db_save", "after_redis_update", "after_progress", "after_commit"]
RUN_JOB_POINTS = ["mid_publish", "after_publish"]
#: Every point with one image per result message (the drain saves several messages per transaction, so a
#: crash interrupts many), and two saving points again with batches of 3 images per message.
CASES = [(point, 1) for point in TAKE_POINTS + SAVE_POINTS + RUN_JOB_POINTS] + [
    (point, 3) for point in ("after_db_save", "after_commit")]


@pytest.mark.parametrize(("point", "batch_size"), CASES)
def test_a_worker_killed_at_a_crash_point_converges(point, batch_size, runtime, db_url, stack, moth_pipeline,
                                                     trap_images, worker_factory, service_factory):
    # Given quick redelivery (ack_wait 3 s) and run_job publishing 4 tasks per round
    settings = make_settings(db_url, stack, PIPELINE_NATS_TASK_TTR=3, PIPELINE_NATS_MAX_DELIVER=10,
                             PIPELINE_DISPATCH_CHUNK=4)
    directory, truth = trap_images
    every = image_urls_from_dir(str(directory))
    urls, other_urls = every[:20], every[20:30]
    # and a worker armed to SIGKILL itself at `point`: a point passed per result message on its 3rd pass,
    # one passed per saving transaction (which holds every message that has arrived) on its first
    skip = 2 if point in TAKE_POINTS + ["after_validation"] else 1 if point == "mid_publish" else 0
    crashing = worker_factory(settings, PIPELINE_CRASH_AT=point, PIPELINE_CRASH_SKIP=skip)
    service_factory(settings, moth.SLUG, moth.process_task, batch_size=batch_size)
    # and two projects' jobs at once, weighted 1 and 3: the service takes their tasks interleaved
    scheduling.set_project_weight(runtime, "lab-b", 3)
    job = create_job(moth.SLUG, urls, name=f"crash at {point}", project="lab-a")
    other = create_job(moth.SLUG, other_urls, name=f"beside a crash at {point}", project="lab-b")
    start_job(runtime, job)
    start_job(runtime, other)

    # When the worker dies at that point
    try:
        wait_for(lambda: crashing.poll() is not None, timeout_s=60, message=f"worker to crash at {point}")
    except pytest.fail.Exception:  # say where the worker was instead (one such timeout was seen, unexplained)
        pytest.fail(f"the worker did not crash at {point} within 60 s; its log ends with:\n"
                    f"{worker_factory.logs()[-4000:]}")
    assert f"crash point {point} reached" in worker_factory.logs()
    # and a fresh worker takes over
    worker_factory(settings)
    # Then both jobs are SUCCESS with counters equal to the ground truth, and nothing is left behind
    for ended, its_urls in ((job, urls), (other, other_urls)):
        converged(runtime, worker_factory, ended.id, its_urls, truth)


def converged(runtime, worker_factory, job_id: int, urls: list[str], truth: dict) -> None:
    job = wait_for(lambda: (j := Job.get_by_id(job_id)).status in JobStatus.TERMINAL and j.cleaned_up_at and j,
                   timeout_s=120, message=f"job {job_id} to finish and clean up")
    expected = sum(len(truth[u.rsplit("/", 1)[1]]) for u in urls)
    stages = job.progress["stages"]
    assert job.status == JobStatus.SUCCESS, worker_factory.logs()[-4000:]
    assert (stages["process"]["processed"], stages["process"]["failed"]) == (len(urls), 0)
    assert stages["results"]["detections"] == expected
    assert stages["results"]["classifications"] == expected
    assert stages["results"]["captures"] == len(urls)
    real = Detection.select().join(JobImage, on=(Detection.image == JobImage.image)).where(
        (JobImage.job == job.id) & (Detection.bbox_key != ""))
    assert real.count() == expected  # no duplicate rows
    assert stream_count(runtime, job.id, moth.SLUG) == 0
    assert runtime.redis.keys(f"jetpipe:job:{job.id}:*") == []
