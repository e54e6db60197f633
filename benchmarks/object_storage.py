"""The `s3` stage of benchmarks/run.py: a job from an object storage prefix of N images, on an S3-API server started
for it (moto's standalone server), run to SUCCESS by a worker and the reference service, which downloads every
image through the presigned URL its task carries and holds no credential.

Next to it, the same images from a local folder in the same run (the raw baseline: no listing, no presigning,
no download), so the figure says what object storage costs.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.run import ROOT, console, env_for, fresh_servers, run_py, start_worker, stop
from pipeline.ops.devstack import free_port

CREDENTIALS = {"AWS_ACCESS_KEY_ID": "AKIABENCHJETPIPE0001", "AWS_SECRET_ACCESS_KEY": "bench-secret-key-0123456789"}

MAKE = """
import json, os, time, models
from pipeline.sdk import moth
from pipeline.core.registry import register_pipeline
from pipeline.schemas import decode_pipeline_spec
from pipeline.infra.runtime import get_runtime
from pipeline.ops import actions
runtime = get_runtime(); models.create_schema()
register_pipeline(decode_pipeline_spec(json.dumps(moth.PIPELINE_SPEC).encode(), source="bench"))
source = os.environ["BENCH_SOURCE"]
urls = [source] if source.startswith("s3://") else [f"file://{source}/{n}" for n in sorted(os.listdir(source))]
t0 = time.perf_counter()
job = actions.enqueue(runtime, "moth-demo", urls, reuse=False)
print(json.dumps({"job": job.id, "images": job.total_images, "made_s": time.perf_counter() - t0}))
"""

WAIT = """
import json, time, models
from models import Job
models.bind(__import__("os").environ["PIPELINE_DATABASE_URL"])
t0 = time.perf_counter()
while True:
    job = Job.get_by_id(JOB)
    if job.status in ("SUCCESS", "FAILURE", "REVOKED"):
        break
    time.sleep(0.2)
stages = job.progress["stages"]
print(json.dumps({"status": job.status, "s": (job.finished_at - job.created_at).total_seconds(),
                  "processed": stages["process"]["processed"], "failed": stages["process"]["failed"]}))
"""


def s3_job(stack, images: int) -> list[tuple]:
    from pipeline.sdk import moth

    console.log(f"s3: {images:,} trap images into an S3-API server")
    work = Path(tempfile.mkdtemp(prefix="jetpipe-s3-bench-"))
    moth.generate_images(str(work / "traps"), min(images, 200), seed=5)
    pictures = sorted((work / "traps").glob("*.png"))
    port = free_port()
    endpoint = f"http://127.0.0.1:{port}"
    server = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    procs = [server]
    try:
        _fill(endpoint, pictures, images)
        rows = []
        for label, source, extra in (
                ("S3 prefix (presigned URLs)", "s3://traps/night-1/", {"PIPELINE_S3_ENDPOINT_URL": endpoint}),
                ("local folder (raw baseline)", str(work / "folder"), {})):
            if not source.startswith("s3://"):
                _folder(work / "folder", pictures, images)
            fresh_servers(stack)
            env = env_for(stack, f"sqlite:///{work / (label.split()[0] + '.db')}", **CREDENTIALS, **extra)
            worker = start_worker(env, "pipeline.actors")
            service_env = {k: v for k, v in env.items() if not k.startswith("AWS_")}  # it needs no credential
            service = subprocess.Popen([sys.executable, "cli.py", "process", "--pipeline", "moth-demo",
                                        "--concurrency", "8"], cwd=ROOT, env=service_env, stdout=subprocess.DEVNULL,
                                       stderr=subprocess.DEVNULL, start_new_session=True)
            procs += [worker, service]
            made = run_py(MAKE, {**env, "BENCH_SOURCE": source})
            done = run_py(WAIT.replace("JOB", str(made["job"])), env)
            stop(worker, service)
            rows.append((label, made, done))
        (_, s3_made, s3_done), (_, _, local_done) = rows
        return [(f"job from an S3 prefix of {images:,} objects: created -> {s3_done['status']}",
                 f"{s3_done['s']:.1f} s ({images / s3_done['s']:,.0f} images/s; listed and made in "
                 f"{s3_made['made_s']:.1f} s)", f"{local_done['s']:.1f} s from a local folder",
                 f"{local_done['s'] / s3_done['s']:.2f}", "SUCCESS, every image processed",
                 s3_done["status"] == "SUCCESS" and s3_done["processed"] == images and s3_done["failed"] == 0)]
    finally:
        stop(*procs)


def _fill(endpoint: str, pictures: list[Path], images: int) -> None:
    import boto3
    from botocore.config import Config

    os.environ.update(CREDENTIALS)
    client = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1",
                          config=Config(s3={"addressing_style": "path"}, max_pool_connections=32))
    for _ in range(100):
        try:
            client.create_bucket(Bucket="traps")
            break
        except Exception:  # noqa: BLE001 - the server is starting
            time.sleep(0.2)
    from concurrent.futures import ThreadPoolExecutor

    bodies = [p.read_bytes() for p in pictures]
    with ThreadPoolExecutor(16) as pool:
        list(pool.map(lambda n: client.put_object(Bucket="traps", Key=f"night-1/{n:06d}.png",
                                                  Body=bodies[n % len(bodies)]), range(images)))


def _folder(folder: Path, pictures: list[Path], images: int) -> None:
    folder.mkdir(exist_ok=True)
    for n in range(images):
        target = folder / f"{n:06d}.png"
        if not target.exists():
            os.link(pictures[n % len(pictures)], target)


if __name__ == "__main__":
    print(json.dumps("run it through benchmarks/run.py --stages s3"))
