"""Processing services serve a pipeline's jobs in the order priority and fair share decide
(pipeline/fairshare.py), on real servers: the SDK over NATS reads each job's claim from its consumer, and the
HTTP gateway orders its listing and its reservations so that the reference system's worker loop, which
takes tasks of the first listed job until none come, shares too."""

from __future__ import annotations

import time

import httpx
import pytest

from models import Pipeline
from pipeline.core import scheduling
from pipeline.sdk import moth
from tests.conftest import wait_for
from tests.helpers import dispatch, fake_job
from tests.web_helpers import WebServer

pytestmark = pytest.mark.slow
SQLITE_ONLY = pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)  # about ordering, not the database


def delivered(runtime, job_id: int) -> int:
    return runtime.tasks.consumer_state(job_id, moth.SLUG).num_delivered


def steady(task):
    time.sleep(0.03)
    return moth.process_task(task)


@SQLITE_ONLY
def test_the_sdk_gives_two_projects_weighted_three_to_one_three_to_one_of_its_work(runtime, moth_pipeline,
                                                                                   service_factory):
    # Given two jobs of the same size waiting, of projects weighted 3 and 1
    scheduling.set_project_weight(runtime, "lab-a", 3)
    heavy = fake_job(moth_pipeline, 200, project="lab-a")
    light = fake_job(moth_pipeline, 200, project="lab-b")
    for job in (heavy, light):
        dispatch(runtime, job.id)
    # When one service with one slot works on them (the images do not exist: each task is answered fast)
    service_factory(runtime.settings, moth.SLUG, steady, concurrency=1)
    wait_for(lambda: delivered(runtime, heavy.id) + delivered(runtime, light.id) >= 80, timeout_s=60,
             message="80 tasks handed out")
    # Then the heavy project has had three times the light one's tasks
    ratio = delivered(runtime, heavy.id) / max(delivered(runtime, light.id), 1)
    assert 2.4 <= ratio <= 3.6, (delivered(runtime, heavy.id), delivered(runtime, light.id))


@SQLITE_ONLY
def test_the_sdk_serves_a_higher_priority_job_first_whenever_it_has_tasks(runtime, moth_pipeline, service_factory):
    # Given a service working on a big job
    big = fake_job(moth_pipeline, 300, project="lab-a")
    dispatch(runtime, big.id)
    service_factory(runtime.settings, moth.SLUG, steady, concurrency=2)
    wait_for(lambda: delivered(runtime, big.id) >= 10, timeout_s=30, message="the big job under way")
    # When an urgent job comes
    urgent = fake_job(moth_pipeline, 30, project="lab-b", priority="urgent")
    dispatch(runtime, urgent.id)
    before = delivered(runtime, big.id)
    wait_for(lambda: delivered(runtime, urgent.id) >= 30, timeout_s=30, message="the urgent job's tasks out")
    # Then the big job got hardly a task meanwhile (those its pulls already had in hand), and continues after
    assert delivered(runtime, big.id) - before <= 6
    wait_for(lambda: delivered(runtime, big.id) >= before + 20, timeout_s=30, message="the big job to go on")


def reference_loop(api: httpx.Client, until: int, batch: int = 4) -> list[tuple[int, int]]:
    """The reference worker's loop (trapdata/antenna/worker.py): list the jobs, take tasks of each until a
    reservation comes back empty, then the next; (job id, tasks) per reservation, until `until` tasks."""
    taken: list[tuple[int, int]] = []
    while sum(n for _, n in taken) < until:
        listing = api.get("/jobs", params={"pipeline__slug__in": moth.SLUG, "ids_only": 1, "incomplete_only": 1,
                                           "dispatch_mode": "async_api"}, follow_redirects=True).json()
        for job in listing["results"]:
            while tasks := api.post(f"/jobs/{job['id']}/tasks/", json={"batch_size": batch}).json()["tasks"]:
                taken.append((job["id"], len(tasks)))
                if sum(n for _, n in taken) >= until:
                    return taken
    return taken


@SQLITE_ONLY
@pytest.mark.parametrize("weights", [(1, 1), (3, 1)])
def test_the_gateway_shares_between_projects_even_with_a_worker_that_empties_one_job_first(
        settings, runtime, moth_pipeline, weights):
    # Given two projects' jobs of one pipeline, the first enqueued first, and a service token for the pipeline
    Pipeline.update(registered_by="ami").where(Pipeline.slug == moth_pipeline).execute()
    scheduling.set_project_weight(runtime, "lab-a", weights[0])
    scheduling.set_project_weight(runtime, "lab-b", weights[1])
    first = fake_job(moth_pipeline, 60, project="lab-a")
    dispatch(runtime, first.id)
    second = fake_job(moth_pipeline, 60, project="lab-b")
    dispatch(runtime, second.id)
    server = WebServer(settings.with_overrides(web_tokens="ami:service:ami-service-token-0123456"), runtime).start()
    try:
        with httpx.Client(base_url=f"{server.url}/api/v2", timeout=30,
                          headers={"Authorization": "Token ami-service-token-0123456"}) as api:
            # When the reference worker's loop takes 48 tasks
            taken = reference_loop(api, 48)
    finally:
        server.stop()
    # Then the two jobs got them in the ratio of their projects' weights, not the first job all of them
    got = {job_id: sum(n for j, n in taken if j == job_id) for job_id in (first.id, second.id)}
    expected_first = 48 * weights[0] / sum(weights)
    assert abs(got[first.id] - expected_first) <= 8, taken
