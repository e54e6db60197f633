"""The `big` stage of benchmarks/run.py: results too large for one NATS message (about 20 MB an image: 200
detections, each with 12,500 class scores), sent by the SDK through the pipeline's object store bucket, taken
and saved by a worker; next to the raw cost of moving the same bytes (put in the bucket, read back).
"""

from __future__ import annotations

import json
import subprocess
import sys
import time

from benchmarks.run import ROOT, console, env_for, fresh_servers, run_py, start_worker, stop

SERVICE = """
import asyncio, logging, random
from pipeline.schemas import AlgorithmRef, BBox, ClassificationOut, DetectionOut, SourceImageRef, SuccessResult
from pipeline.sdk.service import ProcessingService
from pipeline.settings import get_settings

DET, CLS = AlgorithmRef(key="blob-detector-v1"), AlgorithmRef(key="moth-shape-v1")
SCORES = [round(random.random() / 12_500, 6) for _ in range(12_500)]

def dense(task):
    return SuccessResult(pipeline=task.pipeline, source_images=[SourceImageRef(id=task.image_id)], detections=[
        DetectionOut(source_image_id=task.image_id, algorithm=DET, bbox=BBox(b, 0, b + 5, 5), score=0.8,
                     classifications=[ClassificationOut(taxon="Noctuidae", algorithm=CLS, scores=SCORES)])
        for b in range(200)])

asyncio.run(ProcessingService("moth-demo", dense, nats_url=get_settings().nats_url, concurrency=2).run())
"""

JOB = """
import json, time, models
from models import Job
from pipeline.sdk import moth
from pipeline.core.registry import register_pipeline
from pipeline.schemas import decode_pipeline_spec
from pipeline.infra.runtime import get_runtime
from pipeline.ops import actions
runtime = get_runtime(); models.create_schema()
register_pipeline(decode_pipeline_spec(json.dumps(moth.PIPELINE_SPEC).encode(), source="bench"))
job = actions.enqueue(runtime, "moth-demo", [f"file:///dense/{i}.png" for i in range(N)], reuse=False)
while (j := Job.get_by_id(job.id)).status not in ("SUCCESS", "FAILURE", "REVOKED"):
    time.sleep(0.1)
stages = j.progress["stages"]
print(json.dumps({"status": j.status, "s": (j.finished_at - j.created_at).total_seconds(),
                  "detections": stages["results"]["detections"]}))
"""

RAW = """
import asyncio, json, os, time, uuid
import nats
from nats.js.api import ObjectStoreConfig
async def main():
    nc = await nats.connect(os.environ["PIPELINE_NATS_URL"])
    js = nc.jetstream()
    store = await js.create_object_store("RAW_BENCH", ObjectStoreConfig())
    body = os.urandom(20_000_000)
    t0 = time.perf_counter()
    for n in range(N):
        await store.put(f"raw/{n}", body)
        assert len((await store.get(f"raw/{n}")).data) == len(body)
        await store.delete(f"raw/{n}")
    print(json.dumps({"s": time.perf_counter() - t0}))
    await js.delete_object_store("RAW_BENCH")
    await nc.close()
asyncio.run(main())
"""


def big_results(stack, tmp: str, images: int) -> list[tuple]:
    console.log(f"big: {images} images with a result of about 20 MB each, through the object store")
    fresh_servers(stack)
    env = env_for(stack, f"sqlite:///{tmp}/big.db")
    raw = run_py(RAW.replace("range(N)", f"range({images})"), env)
    worker = start_worker(env, "pipeline.actors")
    service = subprocess.Popen([sys.executable, "-c", SERVICE], cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        time.sleep(1)
        got = run_py(JOB.replace("range(N)", f"range({images})"), env)
    finally:
        stop(worker, service)
    ok = got["status"] == "SUCCESS" and got["detections"] == 200 * images
    return [(f"{images} results of ~20 MB each (as objects): created -> {got['status']}",
             f"{got['s']:.1f} s ({got['s'] / images:.2f} s an image, made, sent, taken and saved)",
             f"{raw['s']:.1f} s raw put + get + delete of {images} x 20 MB", f"{raw['s'] / got['s']:.2f}",
             "SUCCESS, every detection saved", ok)]


if __name__ == "__main__":
    print(json.dumps("run it through benchmarks/run.py --stages big"))
