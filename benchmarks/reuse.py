"""The `reuse` stage of benchmarks/run.py: re-enqueueing a collection that was processed before, with a few new
images, publishes tasks for the new images only (pipeline/core/reuse.py).

A first job over N images is made and its images saved as processed (written straight to its rows: what a run
would leave), then a second job over the same N images and M new ones is made and started with reuse on, and
for comparison a third one with reuse off (the raw baseline: every image sent). The figures: tasks published
for each, and the time to make and start each.
"""

from __future__ import annotations

from benchmarks.run import console, fresh_servers, run_py

CODE = """
import json, time, models
from models import ImageStatus, Job, JobImage
from pipeline import names
from pipeline.sdk import moth
from pipeline.core.registry import register_pipeline
from pipeline.schemas import decode_pipeline_spec
from pipeline.infra.runtime import get_runtime
from pipeline.core.jobs import create_job
from actors.run_job import execute
runtime = get_runtime(); models.create_schema()
register_pipeline(decode_pipeline_spec(json.dumps(moth.PIPELINE_SPEC).encode(), source="bench"))
first = create_job("moth-demo", (f"file:///collection/{i}.png" for i in range(N)))
with models.write_transaction():
    JobImage.update(status=ImageStatus.PROCESSED, detections=2).where(JobImage.job == first.id).execute()
    Job.update(status="SUCCESS").where(Job.id == first.id).execute()
def published(job_id):
    info = runtime.tasks._run("info", runtime.tasks.queue.js.stream_info(
        names.tasks_stream("moth-demo"), subjects_filter=names.task_subject("moth-demo", job_id)))
    return sum((info.state.subjects or {}).values())
out = {}
for label, reuse in (("reuse", True), ("everything", False)):
    t0 = time.perf_counter()
    job = create_job("moth-demo", (f"file:///collection/{i}.png" for i in range(N + M)), reuse=reuse)
    made = time.perf_counter() - t0
    execute(runtime, job.id)
    out[label] = {"made_s": made, "started_s": time.perf_counter() - t0, "tasks": published(job.id),
                  "reused": Job.get_by_id(job.id).reused_images or 0}
print(json.dumps(out))
"""


def reuse_collection(stack, env: dict, images: int, new: int, label: str = "") -> list[tuple]:
    console.log(f"reuse: re-enqueueing a {images:,}-image collection with {new:,} new images{label}")
    fresh_servers(stack)
    got = run_py(CODE.replace("range(N)", f"range({images})").replace("N + M", str(images + new)), env)
    on, off = got["reuse"], got["everything"]
    return [
        (f"re-enqueue {images:,} processed + {new:,} new images: tasks published{label}", f"{on['tasks']:,}",
         f"{off['tasks']:,} with reuse off", "", f"= {new:,}", on["tasks"] == new),
        (f"re-enqueue {images:,} + {new:,}: made and started{label}", f"{on['started_s']:.1f} s "
         f"(made {on['made_s']:.1f} s, {on['reused']:,} reused)", f"{off['started_s']:.1f} s with reuse off",
         f"{on['started_s'] / off['started_s']:.2f}x", "", None),
    ]
