"""Results export (`cli.py results`, the API's /results): equal to the database rows, in both formats,
streamed in constant memory."""

from __future__ import annotations

import csv
import io
import json
import os
import sqlite3
import subprocess
import sys

import pytest

from models import Algorithm, Classification, Detection, Job, JobImage, Pipeline, SourceImage
from pipeline.ops.export import export
from tests.conftest import PROJECT, subprocess_env
from tests.helpers import dispatch, error_body, fake_job, handle_result_message, pull_tasks, success_body


def job_with_outcomes(runtime, pipeline: str) -> Job:
    """Five images: three with 2 classified boxes, one with nothing found, one failed."""
    job = fake_job(pipeline, 5)
    dispatch(runtime, job.id)
    tasks = pull_tasks(runtime, job.id, 5)
    for task, reply in tasks[:3]:
        handle_result_message(runtime, job.id, success_body(task, boxes=2), reply, task.task_token)
    handle_result_message(runtime, job.id, success_body(tasks[3][0], boxes=0), tasks[3][1], tasks[3][0].task_token)
    handle_result_message(runtime, job.id, error_body(tasks[4][0].image_id, "lens cap <on>"), tasks[4][1],
                          tasks[4][0].task_token)
    return Job.get_by_id(job.id)


def test_the_export_equals_the_database_rows(runtime, moth_pipeline):
    job = job_with_outcomes(runtime, moth_pipeline)
    lines = [json.loads(line) for line in "".join(export(job.id, "jsonl")).splitlines()]
    # every image of the job, once, in order, with its outcome
    rows = list(JobImage.select().where(JobImage.job == job.id).order_by(JobImage.id))
    assert [(line["image_id"], line["status"]) for line in lines] == [(str(r.image_id), r.status) for r in rows]
    assert [line["url"] for line in lines] == [SourceImage.get_by_id(r.image_id).url for r in rows]
    assert lines[4]["error"] == "processing service error: lens cap <on>" and lines[4]["detections"] == []
    assert lines[3]["detections"] == []  # processed, nothing found
    # every detection and classification, as saved
    saved = {(str(d.image_id), d.x1, d.y1, d.x2, d.y2, d.score)
             for d in Detection.select().where(Detection.bbox_key != "")}
    exported = {(line["image_id"], d["bbox"]["x1"], d["bbox"]["y1"], d["bbox"]["x2"], d["bbox"]["y2"], d["score"])
                for line in lines for d in line["detections"]}
    assert exported == saved and len(saved) == 6
    taxa = [c["taxon"] for line in lines for d in line["detections"] for c in d["classifications"]]
    assert taxa == ["Noctuidae"] * Classification.select().count() == ["Noctuidae"] * 6
    first = lines[0]["detections"][0]
    assert (first["algorithm"], first["classifications"][0]["algorithm"]) == ("blob-detector-v1", "moth-shape-v1")
    assert first["classifications"][0]["labels"] == ["Noctuidae", "Geometridae", "Tortricidae"]
    # CSV: one row per classification, one per image without any
    table = list(csv.DictReader(io.StringIO("".join(export(job.id, "csv")))))
    assert len(table) == 6 + 2
    assert [r["image_status"] for r in table].count("failed") == 1
    assert {r["taxon"] for r in table} == {"Noctuidae", ""}


def test_the_cli_writes_the_export_and_refuses_what_it_cannot(runtime, moth_pipeline, tmp_path):
    job = job_with_outcomes(runtime, moth_pipeline)
    env = subprocess_env(runtime.settings)

    def cli(*args):
        return subprocess.run([sys.executable, "cli.py", *args], cwd=PROJECT, env=env, capture_output=True,
                              text=True, timeout=60)

    out = tmp_path / "results.csv"
    written = cli("results", str(job.id), "--format", "csv", "--output", str(out))
    assert written.returncode == 0 and written.stdout == ""
    assert out.read_text() == "".join(export(job.id, "csv"))
    assert written.stderr.strip() == f"wrote {len(out.read_text().splitlines()):,} CSV line(s) to {out}"
    assert cli("results", str(job.id)).stdout == "".join(export(job.id, "jsonl"))
    missing = cli("results", "4242")
    assert missing.returncode == 1 and missing.stderr.strip() == "error: no job 4242"
    assert cli("results", str(job.id), "--format", "xml").returncode == 2
    unwritable = cli("results", str(job.id), "--output", str(tmp_path / "no" / "such" / "dir.csv"))
    assert unwritable.returncode == 1 and "cannot write" in unwritable.stderr and "Traceback" not in unwritable.stderr


@pytest.mark.slow
@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_a_million_detections_export_in_constant_memory(db_url, moth_pipeline, tmp_path):
    # Given a job of 10,000 images with 100 classified detections each, written straight to SQLite
    images, per_image = 10_000, 100
    job = Job.create(name="big", pipeline=Pipeline.get(Pipeline.slug == moth_pipeline), status="SUCCESS",
                     total_images=images)
    det_alg = Algorithm.get(Algorithm.key == "blob-detector-v1").id
    cls_alg = Algorithm.get(Algorithm.key == "moth-shape-v1").id
    path = db_url.split("sqlite:///", 1)[1]
    conn = sqlite3.connect(path)
    with conn:
        conn.executemany('INSERT INTO "source_image" (id, url, created_at) VALUES (?, ?, ?)',
                         ((i, f"file:///traps/{i}.png", "2026-01-01") for i in range(1, images + 1)))
        conn.executemany('INSERT INTO "job_image" (job_id, image_id, status, detections, classifications, '
                         'updated_at) VALUES (?, ?, ?, ?, ?, ?)',
                         ((job.id, i, "processed", per_image, per_image, "2026-01-01") for i in range(1, images + 1)))
        conn.executemany('INSERT INTO "detection" (id, image_id, algorithm_id, bbox_key, x1, y1, x2, y2, score, '
                         'created_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)',
                         ((n, n // per_image + 1, det_alg, f"{n % per_image}", 1.0, 2.0, 3.0, 4.0, 0.5, "2026-01-01")
                          for n in range(images * per_image)))
        conn.executemany('INSERT INTO "classification" (detection_id, algorithm_id, taxon, score, terminal, '
                         'created_at) VALUES (?, ?, ?, ?, ?, ?)',
                         ((n, cls_alg, "Noctuidae", 0.8, 1, "2026-01-01") for n in range(images * per_image)))
    conn.close()
    # When the CLI exports it as CSV, and as Parquet, each measuring its own peak memory
    # (the peak is read from /proc/self/status, VmHWM: getrusage's ru_maxrss keeps, across exec, the size of the
    # pytest process the child was forked from)
    code = ("import sys, cli\nsys.argv = ['cli.py', *sys.argv[1:]]\n"
            "try:\n    cli.main()\nexcept SystemExit as exit:\n    assert not exit.code, exit.code\n"
            "peak = [l for l in open('/proc/self/status') if l.startswith('VmHWM:')][0].split()[1]\n"
            "print(peak, file=sys.stderr)")
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("PIPELINE_")}, "PIPELINE_DATABASE_URL": db_url}
    peaks = {}
    for fmt in ("csv", "parquet"):
        proc = subprocess.run([sys.executable, "-c", code, "results", str(job.id), "--format", fmt, "--output",
                               str(tmp_path / f"big.{fmt}")], cwd=PROJECT, env=env, capture_output=True, text=True,
                              timeout=600)
        assert proc.returncode == 0, proc.stderr
        peaks[fmt] = int(proc.stderr.strip().splitlines()[-1]) / 1024
    # Then every detection is there, and neither process held more than a page of them
    with (tmp_path / "big.csv").open() as handle:
        assert sum(1 for _ in handle) == 1 + images * per_image
    import pyarrow.parquet as pq

    assert pq.ParquetFile(tmp_path / "big.parquet").metadata.num_rows == images * per_image
    print(f"peak {peaks}")
    # the CLI alone takes ~40 MB, all the rows ~1 GB. Measured: CSV ~65 MB, Parquet ~115 MB (pyarrow's libraries
    # take ~40 MB once imported): within the CSV's bound; Parquet is given room for its allocator's moods (146 MB
    # once beside the whole suite, before the export released its unused memory after each row group)
    assert peaks["csv"] < 120 and peaks["parquet"] < 150, f"peak RSS {peaks} MB"


def test_csv_cells_a_spreadsheet_would_run_are_written_as_text_and_jsonl_stays_exact(runtime, moth_pipeline):
    # Given results whose taxon, crop URL and failure reason, from a service, are spreadsheet formulas
    job = fake_job(moth_pipeline, 2)
    dispatch(runtime, job.id)
    (task, reply), (other, other_reply) = pull_tasks(runtime, job.id, 2)
    body = json.loads(success_body(task, boxes=1))
    body["detections"][0]["classifications"][0]["taxon"] = '=HYPERLINK("http://evil.example","click")'
    body["detections"][0]["crop_image_url"] = "=cmd|' /C calc'!A0"
    handle_result_message(runtime, job.id, json.dumps(body).encode(), reply,
                          task.task_token)
    handle_result_message(runtime, job.id, error_body(other.image_id, "@SUM(1+1)*cmd|' /C calc'!A0"), other_reply,
                          other.task_token)
    # When exported as CSV, no cell starts a formula: each is text, behind an apostrophe
    rows = list(csv.DictReader(io.StringIO("".join(export(job.id, "csv")))))
    formulas = [v for row in rows for v in row.values() if v and v[0] in "=+-@\t\r"]
    assert formulas == []
    [detected] = [r for r in rows if r["detector"]]
    assert detected["taxon"] == '\'=HYPERLINK("http://evil.example","click")'
    assert detected["crop_url"] == "'=cmd|' /C calc'!A0"
    [failed] = [r for r in rows if r["image_status"] == "failed"]
    assert failed["error"].startswith("processing service error: @SUM")  # not at the start of the cell
    # And the JSON lines keep every value as the service sent it
    lines = [json.loads(line) for line in "".join(export(job.id, "jsonl")).splitlines()]
    taxa = [c["taxon"] for image in lines for d in image["detections"] for c in d["classifications"]]
    assert taxa == ['=HYPERLINK("http://evil.example","click")']
