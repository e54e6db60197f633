"""A job made from a manifest keeps what it says of each image, shows it (API, web) and exports it; a bad row makes
nothing, whichever door it came through."""

from __future__ import annotations

import csv
import io
import json
import subprocess
import sys

import httpx
import pytest

from models import Job, JobImage, SourceImage
from pipeline.core import jobs
from pipeline.errors import UserInputError
from pipeline.ops import export, job_views
from pipeline.ops.sources import manifest_from_file
from tests.conftest import PROJECT, subprocess_env
from tests.helpers import dispatch, error_body, handle_result_message, pull_tasks, success_body
from tests.web_helpers import TOKENS_SETTING, WebServer, bearer

MANIFEST = ("url,deployment,timestamp,latitude,longitude,camera\n"
            "a.png,pole 7,2024-06-01T22:05:00+02:00,45.5017,-73.5673,cam-1\n"
            "b.png,pole 7,2024-06-01T22:06:00+02:00,45.5017,-73.5673,cam-1\n"
            "c.png,pole 9,2024-06-01T23:00:00Z,45.6,-73.6,\n")


def nothing_made() -> bool:
    return Job.select().count() == JobImage.select().count() == SourceImage.select().count() == 0


def test_each_image_keeps_its_metadata_through_results_export_and_retry(runtime, moth_pipeline, tmp_path):
    (tmp_path / "night.csv").write_text(MANIFEST)
    job = jobs.create_job(moth_pipeline, manifest_from_file(str(tmp_path / "night.csv")))
    dispatch(runtime, job.id)
    tasks = sorted(pull_tasks(runtime, job.id, 3), key=lambda t: int(t[0].image_id))
    for task, reply in tasks[:2]:
        handle_result_message(runtime, job.id, success_body(task, boxes=1), reply, task.task_token)
    last, reply = tasks[2]
    handle_result_message(runtime, job.id, error_body(last.image_id), reply, last.task_token)
    # the images' page of the API (and the gallery) show it
    shown = {i["url"].rsplit("/", 1)[1]: i["metadata"] for i in job_views.gallery(job.id)["images"]}
    assert shown["a.png"] == {"deployment": "pole 7", "timestamp": "2024-06-01T22:05:00+02:00",
                              "latitude": 45.5017, "longitude": -73.5673, "camera": "cam-1"}
    assert shown["c.png"] == {"deployment": "pole 9", "timestamp": "2024-06-01T23:00:00+00:00", "latitude": 45.6,
                              "longitude": -73.6}
    # the exports carry it
    lines = [json.loads(line) for line in export.export(job.id, "jsonl")]
    assert [line["metadata"]["deployment"] for line in lines] == ["pole 7", "pole 7", "pole 9"]
    table = list(csv.DictReader(io.StringIO("".join(export.export(job.id, "csv")))))
    assert {(r["deployment"], r["timestamp"], r["latitude"], r["metadata"]) for r in table} == {
        ("pole 7", "2024-06-01T22:05:00+02:00", "45.5017", '{"camera": "cam-1"}'),
        ("pole 7", "2024-06-01T22:06:00+02:00", "45.5017", '{"camera": "cam-1"}'),
        ("pole 9", "2024-06-01T23:00:00+00:00", "45.6", "")}
    # a retry of the failed image keeps what the manifest said of it
    retry = jobs.retry_failed(job.id)
    [(meta,)] = JobImage.select(JobImage.meta).where(JobImage.job == retry.id).tuples()
    assert json.loads(meta)["deployment"] == "pole 9"


def test_a_bad_row_makes_nothing_and_names_its_line(moth_pipeline, tmp_path):
    (tmp_path / "night.csv").write_text(MANIFEST + "d.png,pole 9,2024-06-02T01:00:00Z,91,-73.6,\n")
    with pytest.raises(UserInputError, match="manifest line 5: latitude '91' is not a number of degrees"):
        jobs.create_job(moth_pipeline, manifest_from_file(str(tmp_path / "night.csv")))
    assert nothing_made()


def test_the_api_takes_a_manifest_as_json_or_as_an_upload(settings, runtime, moth_pipeline):
    server = WebServer(settings.with_overrides(web_tokens=TOKENS_SETTING), runtime).start()
    try:
        with httpx.Client(base_url=server.url, headers=bearer("ada"), timeout=30) as web:
            bad = web.post("/api/v1/jobs", json={"pipeline": moth_pipeline, "images": [
                {"url": "https://traps.example/a.jpg"}, {"url": "https://traps.example/b.jpg", "timestamp": "noon"}]})
            assert bad.status_code == 400 and bad.json()["error"].startswith("manifest line 2: timestamp 'noon'")
            assert nothing_made()
            made = web.post("/api/v1/jobs", json={"pipeline": moth_pipeline, "images": [
                {"url": "https://traps.example/a.jpg", "deployment": "pole 7", "latitude": 45.5}]})
            assert made.status_code == 201, made.text
            page = web.get(f"/api/v1/jobs/{made.json()['id']}/images").json()
            assert page["images"][0]["metadata"] == {"deployment": "pole 7", "latitude": 45.5}
            uploaded = web.post("/api/v1/jobs/from-file", data={"pipeline": moth_pipeline}, files={"urls_file": (
                "night.jsonl", b'{"url": "https://traps.example/c.jpg", "deployment": "pole 9"}\n',
                "application/x-ndjson")})
            assert uploaded.status_code == 201, uploaded.text
            page = web.get(f"/api/v1/jobs/{uploaded.json()['id']}/images").json()
            assert page["images"][0]["metadata"] == {"deployment": "pole 9"}
    finally:
        server.stop()


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_the_cli_makes_a_job_from_a_manifest_and_refuses_a_bad_one_in_one_line(settings, moth_pipeline, tmp_path):
    (tmp_path / "night.csv").write_text(MANIFEST)
    (tmp_path / "bad.jsonl").write_text('{"url": "a.png"}\n{"url": "b.png", "longitude": 200}\n')
    env = subprocess_env(settings)

    def cli(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "cli.py", *args], cwd=PROJECT, env=env, capture_output=True, text=True,
                              timeout=60)

    refused = cli("enqueue-job", "--pipeline", moth_pipeline, "--manifest", str(tmp_path / "bad.jsonl"))
    assert refused.returncode == 1 and refused.stderr.strip().splitlines() == [
        "error: manifest line 2: longitude '200' is not a number of degrees from -180 to 180"]
    assert nothing_made()
    made = cli("enqueue-job", "--pipeline", moth_pipeline, "--manifest", str(tmp_path / "night.csv"), "--json")
    assert made.returncode == 0, made.stderr
    job_id = json.loads(made.stdout)["id"]
    urls = [u for (u,) in SourceImage.select(SourceImage.url).join(JobImage).where(JobImage.job == job_id).tuples()]
    assert sorted(urls) == [f"file://{tmp_path}/{n}" for n in ("a.png", "b.png", "c.png")]  # from its directory
    assert cli("enqueue-job", "--pipeline", moth_pipeline, "--manifest", str(tmp_path / "night.txt")).stderr.strip() \
        == f"error: --manifest {str(tmp_path / 'night.txt')!r}: a manifest is a .csv or a .jsonl file"
