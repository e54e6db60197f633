"""Exports in the field's formats: Parquet (the CSV's rows, typed) and the Camera Trap Data Package, validated with
`frictionless` against the standard's own profile and table schemas (Camtrap DP 1.0.2, shipped in
tests/data/camtrap-dp-1.0.2 with their MIT license)."""

from __future__ import annotations

import copy
import csv
import io
import json
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import frictionless
import httpx
import jsonschema
import pyarrow.parquet as pq
import pytest
from PIL import Image

from pipeline.core import jobs
from pipeline.core.manifests import Row
from pipeline.errors import UserInputError
from pipeline.ops import export
from pipeline.ops.result_files import write_file
from tests.conftest import PROJECT, subprocess_env
from tests.helpers import dispatch, error_body, handle_result_message, pull_tasks, success_body
from tests.web_helpers import TOKENS_SETTING, WebServer, bearer

STANDARD = PROJECT / "tests" / "data" / "camtrap-dp-1.0.2"


def night(runtime, moth_pipeline, trap_images, *, meta: bool = True):
    """A job over 5 trap images at two deployments (from a manifest), 3 with 2 boxes each, one with none found,
    one failed."""
    directory, truth = trap_images
    names = sorted(truth)[:5]
    rows = [Row(f"file://{directory}/{name}", {
        "deployment": "pole 7" if n < 3 else "pole 9", "timestamp": f"2024-06-0{1 + n // 3}T22:0{n}:00+02:00",
        "latitude": 45.5 + n / 100, "longitude": -73.5, "camera": "cam-1"} if meta else None)
            for n, name in enumerate(names)]
    job = jobs.create_job(moth_pipeline, rows, name="night 12")
    dispatch(runtime, job.id)
    tasks = sorted(pull_tasks(runtime, job.id, 5), key=lambda t: int(t[0].image_id))
    for task, reply in tasks[:3]:
        handle_result_message(runtime, job.id, success_body(task, boxes=2), reply, task.task_token)
    blank, reply = tasks[3]
    handle_result_message(runtime, job.id, success_body(blank, boxes=0), reply, blank.task_token)
    failed, reply = tasks[4]
    handle_result_message(runtime, job.id, error_body(failed.image_id, "lens fogged"), reply, failed.task_token)
    return job, [t for t, _ in tasks]


def test_parquet_holds_the_csv_rows_typed(runtime, moth_pipeline, trap_images, tmp_path):
    job, _ = night(runtime, moth_pipeline, trap_images)
    rows = write_file(job.id, "parquet", str(tmp_path / "r.parquet"))
    table = pq.read_table(tmp_path / "r.parquet")
    as_csv = list(csv.DictReader(io.StringIO("".join(export.export(job.id, "csv")))))
    assert table.num_rows == rows == len(as_csv) == 3 * 2 + 1 + 1  # a row per classification; one per empty image
    assert table.column_names == list(export.CSV_COLUMNS)
    parquet = table.to_pylist()
    for typed, text in zip(parquet, as_csv, strict=True):
        assert {k: "" if v is None else str(v).lower() if isinstance(v, bool) else str(v) for k, v in typed.items()} \
            == {k: str(float(v)) if k in ("x1", "y1", "x2", "y2", "score", "taxon_score", "latitude", "longitude")
                and v else v for k, v in text.items()}
    assert {r["deployment"] for r in parquet} == {"pole 7", "pole 9"} and parquet[0]["latitude"] == 45.5


def camtrap(job_id: int, tmp_path: Path) -> Path:
    """The job's package, unzipped, with its schemas pointing at the standard's copies (frictionless reads them
    from the package's directory)."""
    zipped = tmp_path / "package.zip"
    write_file(job_id, "camtrap-dp", str(zipped))
    unpacked = tmp_path / "package"
    with zipfile.ZipFile(zipped) as package:
        assert sorted(package.namelist()) == ["datapackage.json", "deployments.csv", "media.csv", "observations.csv"]
        package.extractall(unpacked)
    return unpacked


def test_a_manifest_jobs_camtrap_dp_package_validates_against_the_standard(runtime, moth_pipeline, trap_images,
                                                                          tmp_path):
    job, tasks = night(runtime, moth_pipeline, trap_images)
    unpacked = camtrap(job.id, tmp_path)
    descriptor = json.loads((unpacked / "datapackage.json").read_text())
    # the descriptor names the standard's profile and table schemas, and holds what the profile requires
    assert descriptor["profile"] == "https://raw.githubusercontent.com/tdwg/camtrap-dp/1.0.2/camtrap-dp-profile.json"
    profile = json.loads((STANDARD / "camtrap-dp-profile.json").read_text())
    # (the Data Package and GeoJSON schemas it refers to are not here: frictionless checks the first, and the
    # spatial coverage's shape is checked below)
    assert profile["allOf"][0] == {"$ref": "https://specs.frictionlessdata.io/schemas/data-package.json"}
    profile["allOf"][0] = {}
    profile["allOf"][1]["properties"]["spatial"].pop("$ref")
    jsonschema.validate(descriptor, profile)
    assert descriptor["spatial"]["type"] == "Polygon" and descriptor["temporal"] == {"start": "2024-06-01",
                                                                                       "end": "2024-06-02"}
    assert descriptor["taxonomic"] == [{"scientificName": "Noctuidae"}]
    # every table validates against the standard's table schema (types, constraints, keys, foreign keys)
    local = copy.deepcopy(descriptor)
    local.pop("profile")  # (checked above; frictionless would fetch it)
    for resource in local["resources"]:
        schema = f"{resource['name']}-table-schema.json"
        assert resource["schema"] == f"https://raw.githubusercontent.com/tdwg/camtrap-dp/1.0.2/{schema}"
        shutil.copy(STANDARD / schema, unpacked / schema)
        resource["schema"] = schema
    (unpacked / "local.json").write_text(json.dumps(local))
    report = frictionless.validate(str(unpacked / "local.json"))
    assert report.valid, report.flatten(["rowNumber", "fieldName", "type", "note"])
    # the observations: a box a detection, normalised to its image; a blank image; nothing of the failed one
    observations = list(csv.DictReader((unpacked / "observations.csv").open()))
    assert [o["observationType"] for o in observations] == ["animal"] * 6 + ["blank"]
    width, height = Image.open(urlpath(tasks[0].image_url)).size
    first = observations[0]
    assert (float(first["bboxX"]), float(first["bboxWidth"])) == (0.0, round(8 / width, 6))
    assert float(first["bboxY"]) == round(5 / height, 6) and first["scientificName"] == "Noctuidae"
    media = list(csv.DictReader((unpacked / "media.csv").open()))
    assert len(media) == 5 and media[4]["mediaComments"] == "jetpipe: processing service error: lens fogged"
    deployments = {d["deploymentID"]: d for d in csv.DictReader((unpacked / "deployments.csv").open())}
    assert (deployments["pole 7"]["deploymentStart"], deployments["pole 7"]["deploymentEnd"]) == (
        "2024-06-01T22:00:00+02:00", "2024-06-01T22:02:00+02:00")


def urlpath(url: str) -> str:
    return url.removeprefix("file://")


def test_a_job_without_the_metadata_the_standard_needs_is_refused_and_writes_nothing(runtime, moth_pipeline,
                                                                                   trap_images, tmp_path):
    job, _ = night(runtime, moth_pipeline, trap_images, meta=False)
    (tmp_path / "out").mkdir()
    with pytest.raises(UserInputError, match="5 image.s. lack a deployment, timestamp, latitude or longitude"):
        write_file(job.id, "camtrap-dp", str(tmp_path / "out" / "p.zip"))
    assert list((tmp_path / "out").iterdir()) == []


def test_the_api_sends_both_files_and_keeps_no_copy(settings, runtime, moth_pipeline, trap_images, tmp_path):
    job, _ = night(runtime, moth_pipeline, trap_images)
    server = WebServer(settings.with_overrides(web_tokens=TOKENS_SETTING), runtime).start()
    try:
        with httpx.Client(base_url=server.url, headers=bearer("vic"), timeout=60) as web:
            parquet = web.get(f"/api/v1/jobs/{job.id}/results", params={"format": "parquet"})
            assert parquet.status_code == 200 and parquet.content[:4] == b"PAR1"
            assert parquet.headers["content-disposition"].endswith(f'job-{job.id}-results.parquet"')
            package = web.get(f"/api/v1/jobs/{job.id}/results", params={"format": "camtrap-dp"})
            assert package.status_code == 200 and package.headers["content-type"] == "application/zip"
            assert "datapackage.json" in zipfile.ZipFile(io.BytesIO(package.content)).namelist()
            assert web.get(f"/api/v1/jobs/{job.id}/results", params={"format": "xlsx"}).status_code == 400
    finally:
        server.stop()
    import tempfile

    assert not list(Path(tempfile.gettempdir()).glob(f"jetpipe-job-{job.id}-*"))


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_the_cli_writes_the_binary_formats_to_a_file_only(settings, runtime, moth_pipeline, trap_images, tmp_path):
    job, _ = night(runtime, moth_pipeline, trap_images)
    env = subprocess_env(settings)

    def cli(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "cli.py", "results", str(job.id), *args], cwd=PROJECT, env=env,
                              capture_output=True, text=True, timeout=60)

    refused = cli("--format", "parquet")
    assert refused.returncode == 1 and refused.stderr.strip() == "error: parquet is a binary file: give -o FILE"
    made = cli("--format", "camtrap-dp", "-o", str(tmp_path / "night.zip"))
    assert made.returncode == 0 and made.stderr.strip() == f"wrote 7 observation(s) to {tmp_path / 'night.zip'} " \
                                                           "(camtrap-dp)"
