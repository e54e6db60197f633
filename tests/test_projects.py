"""Projects on every door: jobs carry one (and a priority), every listing filters by it, a token limited to
some projects can neither see nor touch another project's jobs (each route of the API, the pages and the
gateway), and bulk actions act on what their filter picks, after a dry run, one job-log line per job."""

from __future__ import annotations

import datetime as dt
import json
import subprocess
import sys

import httpx
import pytest

import models
from models import Job, JobLog, JobStatus, Project
from pipeline.core import scheduling
from pipeline.errors import UserInputError
from pipeline.ops import bulk
from pipeline.sdk import moth
from tests.conftest import PROJECT, subprocess_env
from tests.helpers import dispatch, fake_job
from tests.web_helpers import TOKENS_SETTING, WebServer, bearer


@pytest.fixture
def web(settings, runtime):
    server = WebServer(settings.with_overrides(web_tokens=TOKENS_SETTING), runtime).start()
    with httpx.Client(base_url=server.url, timeout=30) as client:
        yield client
    server.stop()


@pytest.fixture
def two_projects(runtime, moth_pipeline):
    """A running job of project lab-a, one of lab-b, and an ended one of lab-b with a failed image."""
    mine = fake_job(moth_pipeline, 3, project="lab-a", name="night 1")
    theirs = fake_job(moth_pipeline, 3, project="lab-b", name="night 2", priority="high")
    ended = fake_job(moth_pipeline, 2, project="lab-b", name="old night")
    for job in (mine, theirs):
        dispatch(runtime, job.id)
    models.JobImage.update(status="failed", error="x").where(models.JobImage.job == ended.id).execute()
    Job.update(status=JobStatus.FAILURE).where(Job.id == ended.id).execute()
    return mine, theirs, ended


def cli(settings, *args: str, stdin: str = "") -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "cli.py", *args], cwd=PROJECT, env={**subprocess_env(settings),
                          "COLUMNS": "200"}, capture_output=True, text=True, timeout=60, input=stdin)


def test_a_job_carries_its_project_and_priority_and_listings_filter_by_project(web, settings, two_projects):
    mine, theirs, _ = two_projects
    body = web.get("/api/v1/jobs", params={"project": "lab-a"}, headers=bearer("vic")).json()
    assert [j["id"] for j in body["jobs"]] == [mine.id] and body["counts"]["STARTED"] == 1
    shown = web.get(f"/api/v1/jobs/{theirs.id}", headers=bearer("vic")).json()
    assert (shown["project"], shown["priority"], shown["priority_name"]) == ("lab-b", 5, "high")
    listed = json.loads(cli(settings, "jobs", "--project", "lab-b", "--json").stdout)
    assert {j["id"] for j in listed} == {theirs.id, two_projects[2].id}
    assert "lab-b" in web.get("/", params={"project": "lab-b"}, headers=bearer("ada")).text
    page = web.get("/", params={"project": "lab-a"}, headers=bearer("ada")).text
    assert "night 1" in page and "night 2" not in page


def test_a_project_limited_token_sees_and_acts_on_its_projects_jobs_only(web, runtime, two_projects):
    mine, theirs, ended = two_projects
    lab = bearer("lab")  # an operator of lab-a only
    assert [j["id"] for j in web.get("/api/v1/jobs", headers=lab).json()["jobs"]] == [mine.id]
    assert [j["id"] for j in web.get("/api/v1/jobs", params={"project": "lab-b"}, headers=lab).json()["jobs"]] == []
    assert web.get("/api/v1/jobs", headers=lab).json()["counts"]["FAILURE"] == 0
    for method, path, body in [("get", f"/api/v1/jobs/{theirs.id}", None),
                               ("get", f"/api/v1/jobs/{theirs.id}/failures", None),
                               ("get", f"/api/v1/jobs/{theirs.id}/logs", None),
                               ("get", f"/api/v1/jobs/{theirs.id}/results", None),
                               ("post", f"/api/v1/jobs/{theirs.id}/cancel", None),
                               ("post", f"/api/v1/jobs/{theirs.id}/pause", {}),
                               ("post", f"/api/v1/jobs/{theirs.id}/resume", None),
                               ("post", f"/api/v1/jobs/{theirs.id}/priority", {"priority": "low"}),
                               ("post", f"/api/v1/jobs/{ended.id}/retry-failed", None)]:
        refused = web.request(method, path, json=body, headers=lab)
        assert (refused.status_code, refused.json()) == (404, {"error": f"no job {path.split('/')[4]}"}), path
    assert Job.get_by_id(theirs.id).status == JobStatus.STARTED and Job.get_by_id(theirs.id).paused_at is None
    for path in ("/api/v1/health", "/api/v1/dlq", "/api/v1/parked"):
        assert web.get(path, headers=lab).status_code == 403, path
    assert web.post("/api/v1/pipelines", json=moth.PIPELINE_SPEC, headers=lab).status_code == 403
    assert web.put("/api/v1/projects/lab-a/weight", json={"weight": 5}, headers=lab).status_code == 403
    assert [p["name"] for p in web.get("/api/v1/projects", headers=lab).json()["projects"]] == ["lab-a"]
    schedule = web.get(f"/api/v1/pipelines/{moth.SLUG}/schedule", headers=lab).json()
    assert [j["job_id"] for j in schedule["jobs"]] == [mine.id]
    # its own job: all of it works
    assert web.post(f"/api/v1/jobs/{mine.id}/pause", json={"reason": "lunch"}, headers=lab).json()["paused"] is True
    assert web.post(f"/api/v1/jobs/{mine.id}/resume", headers=lab).json()["paused"] is False
    # new jobs go to its project; another project is refused
    urls = {"pipeline": moth.SLUG, "urls": ["file:///nowhere/a.png"]}
    assert web.post("/api/v1/jobs", json=urls, headers=lab).json()["project"] == "lab-a"
    refused = web.post("/api/v1/jobs", json={**urls, "project": "lab-b"}, headers=lab)
    assert refused.status_code == 403 and "lab-b" in refused.json()["error"]
    several = web.post("/api/v1/jobs", json=urls, headers=bearer("labview"))
    assert several.status_code == 403  # a viewer may not create; and it has two projects to choose from
    # the pages
    assert web.get(f"/jobs/{theirs.id}", headers=lab).status_code == 404
    assert "night 2" not in web.get("/", headers=lab).text and "night 1" in web.get("/", headers=lab).text
    assert web.get("/health", headers=lab).status_code == 403
    # a bulk action naming the other project touches nothing of it
    plan = web.post("/api/v1/jobs/bulk", json={"action": "cancel", "projects": ["lab-b"], "dry_run": False},
                    headers=lab).json()
    assert plan["jobs"] == [] and Job.get_by_id(theirs.id).status == JobStatus.STARTED


def test_a_project_limited_service_token_lists_and_reserves_its_projects_jobs_only(settings, runtime, moth_pipeline):
    from tests.helpers import pull_tasks  # noqa: F401 - the gateway's own reservation is what is tested

    scoped = settings.with_overrides(web_tokens="ami:service:ami-lab-a-token-0123456:lab-a")
    models.Pipeline.update(registered_by="ami").where(models.Pipeline.slug == moth_pipeline).execute()
    mine = fake_job(moth_pipeline, 2, project="lab-a")
    theirs = fake_job(moth_pipeline, 2, project="lab-b")
    for job in (mine, theirs):
        dispatch(runtime, job.id)
    server = WebServer(scoped, runtime).start()
    try:
        with httpx.Client(base_url=server.url, timeout=30,
                          headers={"Authorization": "Token ami-lab-a-token-0123456"}) as ami:
            listed = ami.get("/api/v2/jobs/", params={"ids_only": 1, "incomplete_only": 1}).json()["results"]
            assert [j["id"] for j in listed] == [mine.id]
            assert [p["name"] for p in ami.get("/api/v2/projects/").json()["results"]] == ["lab-a"]
            assert ami.post(f"/api/v2/jobs/{theirs.id}/tasks/", json={"batch_size": 2}).status_code == 404
            assert len(ami.post(f"/api/v2/jobs/{mine.id}/tasks/", json={"batch_size": 2}).json()["tasks"]) == 2
    finally:
        server.stop()


def test_bulk_actions_list_first_then_act_on_what_the_filter_picks_one_log_line_each(web, runtime, two_projects,
                                                                                     moth_pipeline):
    mine, theirs, ended = two_projects
    extra = fake_job(moth_pipeline, 2, project="lab-b", name="Night 3")
    dispatch(runtime, extra.id)
    request = {"action": "pause", "projects": ["lab-b"], "name": "night ?", "reason": "quota"}
    # a dry run lists the jobs and changes nothing
    dry = web.post("/api/v1/jobs/bulk", json=request, headers=bearer("ada")).json()
    assert dry["dry_run"] and [j["job_id"] for j in dry["jobs"]] == [theirs.id, extra.id] and dry["changed"] == 0
    assert Job.get_by_id(theirs.id).paused_at is None
    # the real run pauses them, each job's log saying who, with which filter
    done = web.post("/api/v1/jobs/bulk", json={**request, "dry_run": False}, headers=bearer("ada")).json()
    assert done["changed"] == 2 and all(j["result"] == "paused" for j in done["jobs"])
    for job_id in (theirs.id, extra.id):
        lines = [line.message for line in JobLog.select().where(JobLog.job == job_id)
                 if "bulk pause" in line.message]
        assert len(lines) == 1 and lines[0].startswith("paused by ada (bulk pause: project=lab-b name='night ?')")
        assert "quota" in lines[0]
    assert Job.get_by_id(mine.id).paused_at is None
    # resume and retry-failed by filter; an empty filter and a bad action are refused
    assert web.post("/api/v1/jobs/bulk", json={"action": "resume", "statuses": ["STARTED"], "dry_run": False},
                    headers=bearer("ada")).json()["changed"] == 2
    retried = web.post("/api/v1/jobs/bulk", json={"action": "retry-failed", "projects": ["lab-b"], "dry_run": False},
                       headers=bearer("ada")).json()
    assert [j["job_id"] for j in retried["jobs"]] == [ended.id] and "retried as job" in retried["jobs"][0]["result"]
    for body, why in [({"action": "cancel"}, "needs a filter"), ({"action": "explode", "ids": [1]}, "unknown bulk"),
                      ({"action": "cancel", "statuses": ["DONE"]}, "unknown status"),
                      ({"action": "cancel", "older_than": "soon"}, "age 'soon'")]:
        refused = web.post("/api/v1/jobs/bulk", json=body, headers=bearer("ada"))
        assert refused.status_code == 400 and why in refused.json()["error"], body
    assert web.post("/api/v1/jobs/bulk", json={"action": "cancel", "ids": [mine.id]},
                    headers=bearer("vic")).status_code == 403


def test_bulk_through_the_cli_asks_first_and_honours_dry_run_and_older_than(settings, runtime, two_projects):
    mine, theirs, _ = two_projects
    Job.update(created_at=models.utcnow() - dt.timedelta(days=3)).where(Job.id == theirs.id).execute()
    dry = cli(settings, "bulk", "cancel", "--older-than", "2d", "--dry-run", "--json")
    assert dry.returncode == 0 and [j["job_id"] for j in json.loads(dry.stdout)["jobs"]] == [theirs.id]
    refused = cli(settings, "bulk", "cancel", "--older-than", "2d", stdin="n\n")
    assert refused.returncode == 1 and "not confirmed: nothing changed" in refused.stderr
    assert Job.get_by_id(theirs.id).status == JobStatus.STARTED
    done = cli(settings, "bulk", "cancel", "--older-than", "2d", "--yes")
    assert done.returncode == 0 and "1 of 1 job(s) changed" in done.stdout, done.stdout + done.stderr
    assert Job.get_by_id(theirs.id).status == JobStatus.REVOKED and Job.get_by_id(mine.id).status == JobStatus.STARTED
    assert Job.get_by_id(theirs.id).error.startswith("canceled by cli:")
    nothing = cli(settings, "bulk", "pause", "--project", "nobody", "--yes")
    assert nothing.returncode == 0 and "0 job(s) would change" in nothing.stdout
    bad = cli(settings, "bulk", "pause")
    assert bad.returncode == 1 and bad.stderr.startswith("error: a bulk action needs a filter")


def test_a_projects_weight_reaches_its_running_jobs_consumers(web, runtime, two_projects, settings):
    mine, _, _ = two_projects
    set_weight = cli(settings, "project", "weight", "lab-a", "3")
    assert set_weight.returncode == 0 and "1 running job(s) follow it" in set_weight.stdout
    consumer = next(c for c in runtime.tasks.job_consumers(moth.SLUG) if c.job_id == mine.id)
    assert consumer.metadata == {"project": "lab-a", "priority": "0", "weight": "3", "paused": "false"}
    assert web.put("/api/v1/projects/lab-a/weight", json={"weight": 0}, headers=bearer("ada")).status_code == 400
    listed = {p["name"]: p for p in json.loads(cli(settings, "project", "list", "--json").stdout)}
    assert listed["lab-a"]["weight"] == 3 and listed["lab-a"]["running"] == 1
    scheduling.set_priority(runtime, mine.id, 10, by="test")
    consumer = next(c for c in runtime.tasks.job_consumers(moth.SLUG) if c.job_id == mine.id)
    assert consumer.metadata["priority"] == "10"
    assert cli(settings, "priority", str(mine.id), "soon").returncode == 1


def test_jobs_made_before_projects_belong_to_the_default_project(runtime, moth_pipeline):
    job = fake_job(moth_pipeline, 1)
    Job.update(project=None).where(Job.id == job.id).execute()
    models.create_schema()
    assert Job.get_by_id(job.id).project.name == "default"
    assert Project.select().where(Project.name == "default").count() == 1
    with pytest.raises(UserInputError, match="project name"):
        fake_job(moth_pipeline, 1, project="lab b")
    assert bulk.parse_age("90") == 90 and bulk.parse_age("12h") == 43200


def test_a_pipelines_taxa_count_every_job_of_it_and_only_a_token_of_every_project_reads_them(web, runtime,
                                                                                            moth_pipeline):
    from tests.helpers import job_with_results

    job_with_results(runtime, moth_pipeline, 3, 3, boxes=2)
    job_with_results(runtime, moth_pipeline, 2, 1, boxes=3)  # its one image is the first job's first image
    taxa = web.get(f"/api/v1/pipelines/{moth_pipeline}/taxa", headers=bearer("vic")).json()["taxa"]
    # 3 images x 2 boxes, and the third box the second job found on an image already saved with two
    assert taxa == [{"taxon": "Noctuidae", "detections": 3 * 2 + 1, "mean_score": 0.8}]
    assert web.get(f"/api/v1/pipelines/{moth_pipeline}/taxa", headers=bearer("lab")).status_code == 403
    assert web.get("/api/v1/pipelines/nope/taxa", headers=bearer("vic")).status_code == 404
    assert "Most detected taxa" in web.get("/pipelines", headers=bearer("vic")).text
