"""jetpipe benchmarks: each figure next to a raw baseline measured in the same run, with the ratio.

    python benchmarks/run.py [--dispatch-images 100000] [--e2e-images 10000] [--memory-images 1000000]

Starts its own NATS + Redis (embedded binaries) and a SQLite database in a temporary directory.
Figures (issue 6; targets in brackets):
  dispatch     run_job publishing a job's tasks vs raw concurrent nats-py publishing   [ratio >= 0.7]
  end to end   enqueue -> SUCCESS with a null processing service and 1 worker process  [>= 1000 images/s]
               vs a raw floor: the same messages through JetStream pull+ack only
  cost         Redis commands per result message (INFO commandstats)                  [1 round trip]
  memory       peak RSS of enqueue-job + run_job for a large job                      [<= 300 MB]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import nats  # noqa: E402
import nats.errors  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

from pipeline.devstack import DevStack  # noqa: E402

console = Console(stderr=True)
out = Console()


def env_for(stack: DevStack, db: str, **extra) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIPELINE_")}
    env.update(stack.env())
    env.update({"PIPELINE_DATABASE_URL": db, "PIPELINE_METRICS_PORT": "0", "PIPELINE_LOG_LEVEL": "WARNING"})
    env.update({k: str(v) for k, v in extra.items()})
    return env


def fresh_servers(stack: DevStack) -> None:
    """Empty Redis and drop jetpipe's streams, so a stage never sees another stage's jobs."""
    from pipeline.chaos import flush_nats, flush_redis

    flush_redis(stack.redis_url)
    asyncio.run(flush_nats(stack.nats_url))


def run_py(code: str, env: dict) -> dict:
    """Run `code` in a fresh interpreter (own settings, own event loop); it prints one JSON line."""
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=1800)
    if out.returncode != 0:
        raise RuntimeError(out.stderr[-3000:])
    return json.loads(out.stdout.strip().splitlines()[-1])


# ---- dispatch ------------------------------------------------------------------------------------------------
async def raw_publish(url: str, n: int) -> float:
    """Raw baseline: the same task messages (subject, headers, body) published with gathered js.publish."""
    nc = await nats.connect(url)
    js = nc.jetstream()
    try:
        await js.delete_stream("RAW_BENCH")
    except Exception:  # noqa: BLE001
        pass
    await js.add_stream(name="RAW_BENCH", subjects=["raw.tasks.>"], retention="workqueue")
    started = time.perf_counter()
    for base in range(0, n, 500):
        await asyncio.gather(*(js.publish(
            "raw.tasks.moth-demo.1", json.dumps({"job_id": 1, "image_id": str(i), "image_url": f"file:///b/{i}.png",
                                                  "pipeline": "moth-demo"}).encode(),
            headers={"Nats-Msg-Id": f"1:{i}", "Pipeline-Job-Id": "1", "Pipeline-Image-Id": str(i)})
            for i in range(base, min(base + 500, n))))
    elapsed = time.perf_counter() - started
    await js.delete_stream("RAW_BENCH")
    await nc.close()
    return n / elapsed


DISPATCH = """
import json, time, models
from pipeline import moth
from pipeline.registry import register_pipeline
from pipeline.schemas import decode_pipeline_spec
from pipeline.runtime import get_runtime
from pipeline.jobs import create_job
from actors.run_job import execute
rt = get_runtime(); models.create_schema()
register_pipeline(decode_pipeline_spec(json.dumps(moth.PIPELINE_SPEC).encode(), source="bench"))
t0 = time.perf_counter()
job = create_job("moth-demo", (f"file:///bench/{i}.png" for i in range(N)))
t1 = time.perf_counter()
execute(rt, job.id)
t2 = time.perf_counter()
print(json.dumps({"enqueue_s": t1 - t0, "dispatch_s": t2 - t1}))
"""


# ---- end to end ------------------------------------------------------------------------------------------------
E2E_SERVICE = """
import asyncio, json
from pipeline.sdk import ProcessingService
from pipeline.schemas import SuccessResult, SourceImageRef, DetectionOut, ClassificationOut, BBox, AlgorithmRef
from pipeline.settings import get_settings
DET, CLS = AlgorithmRef("blob-detector-v1"), AlgorithmRef("moth-shape-v1")
async def null_model(task):  # 3 detections with 1 classification each, no work
    dets = [DetectionOut(task.image_id, DET, BBox(i, i, i + 5, i + 5), 0.9,
                         classifications=[ClassificationOut("Noctuidae", CLS, [0.9])]) for i in range(3)]
    return SuccessResult(task.pipeline, [SourceImageRef(task.image_id)], dets)
asyncio.run(ProcessingService("moth-demo", null_model, nats_url=get_settings().nats_url, concurrency=64).run())
"""

E2E_ENQUEUE = """
import json, time, models
from pipeline import moth
from pipeline.registry import register_pipeline
from pipeline.schemas import decode_pipeline_spec
from pipeline.runtime import get_runtime
from pipeline.jobs import create_job, start_job
from models import Job
rt = get_runtime(); models.create_schema()
register_pipeline(decode_pipeline_spec(json.dumps(moth.PIPELINE_SPEC).encode(), source="bench"))
r = rt.redis
before = {k: v["calls"] for k, v in r.info("commandstats").items()}
t0 = time.perf_counter()
job = create_job("moth-demo", (f"file:///e2e/{i}.png" for i in range(N)))
start_job(rt, job)
deadline = time.monotonic() + 900
while Job.get_by_id(job.id).status not in ("SUCCESS", "FAILURE", "REVOKED") and time.monotonic() < deadline:
    time.sleep(0.2)
elapsed = time.perf_counter() - t0
after = {k: v["calls"] for k, v in r.info("commandstats").items()}
delta = {k: after[k] - before.get(k, 0) for k in after}
job = Job.get_by_id(job.id)
stages = job.progress["stages"]
print(json.dumps({"elapsed_s": elapsed, "status": job.status, "detections": stages["results"]["detections"],
                  "redis_commands": delta}))
"""


RSS = """
import resource
print(json.dumps({"rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


async def raw_pull_ack(url: str, n: int) -> float:
    """Raw floor: the same number of messages published, pulled in batches and acked (no jetpipe logic)."""
    nc = await nats.connect(url)
    js = nc.jetstream()
    await js.add_stream(name="RAW_FLOOR", subjects=["floor.>"], retention="workqueue")
    for base in range(0, n, 500):
        await asyncio.gather(*(js.publish("floor.x", b'{"image_id": "1"}') for _ in range(base, min(base + 500, n))))
    sub = await js.pull_subscribe("floor.x", durable="floor", stream="RAW_FLOOR")
    got, started = 0, time.perf_counter()
    while got < n:
        try:
            msgs = await sub.fetch(500, timeout=2)
        except (nats.errors.TimeoutError, TimeoutError):
            break
        for m in msgs:
            await m.ack()
        got += len(msgs)
    elapsed = time.perf_counter() - started
    await js.delete_stream("RAW_FLOOR")
    await nc.close()
    return got / elapsed


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dispatch-images", type=int, default=100_000)
    parser.add_argument("--e2e-images", type=int, default=10_000)
    parser.add_argument("--memory-images", type=int, default=1_000_000)
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory(prefix="jetpipe-bench-") as tmp:
        stack = DevStack.create(Path(tmp) / "stack").start()
        try:
            # dispatch
            console.log("dispatch: raw publishing")
            raw = asyncio.run(raw_publish(stack.nats_url, args.dispatch_images))
            console.log("dispatch: jetpipe run_job")
            d = run_py(DISPATCH.replace("N)", f"{args.dispatch_images})"), env_for(stack, f"sqlite:///{tmp}/d.db"))
            jet = args.dispatch_images / d["dispatch_s"]
            rows.append(("dispatch (run_job publish)", f"{jet:,.0f} tasks/s", f"{raw:,.0f} msg/s raw publish",
                         f"{jet / raw:.2f}", ">= 0.70", jet / raw >= 0.7))
            rows.append(("enqueue-job (DB rows)", f"{args.dispatch_images / d['enqueue_s']:,.0f} images/s", "", "", "",
                         None))

            # end to end
            console.log("end to end: starting a worker and a null processing service")
            fresh_servers(stack)  # the dispatch stage's job 1 must not meet this stage's job 1
            env = env_for(stack, f"sqlite:///{tmp}/e2e.db")
            worker = subprocess.Popen([sys.executable, "-m", "dramatiq", "pipeline.actors", "-p", "1", "-t", "8"],
                                      cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                      start_new_session=True)
            service = subprocess.Popen([sys.executable, "-c", E2E_SERVICE], cwd=ROOT, env=env,
                                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
            try:
                time.sleep(2)
                e = run_py(E2E_ENQUEUE.replace("range(N)", f"range({args.e2e_images})"), env)
            finally:
                for proc in (service, worker):
                    os.killpg(proc.pid, 9)
                    proc.wait(30)
            console.log("end to end: raw pull+ack floor")
            rate = args.e2e_images / e["elapsed_s"]
            floor = asyncio.run(raw_pull_ack(stack.nats_url, args.e2e_images))
            rows.append(("end to end, 1 worker process", f"{rate:,.0f} images/s ({e['status']})",
                         f"{floor:,.0f} msg/s raw pull+ack", f"{rate / floor:.2f}", ">= 1000 images/s",
                         rate >= 1000 and e["status"] == "SUCCESS"))
            evals = sum(v for k, v in e["redis_commands"].items() if k.startswith("cmdstat_eval"))
            rows.append(("Redis scripts per result message", f"{evals / args.e2e_images:.2f}",
                         "(gate + Dramatiq's own)", "", "1 gate call", None))

            # memory
            console.log("memory: enqueue + run_job")
            fresh_servers(stack)
            m_env = env_for(stack, f"sqlite:///{tmp}/m.db")
            code = DISPATCH.replace("N)", f"{args.memory_images})") + RSS
            m = run_py(code, m_env)
            rows.append((f"peak RSS, enqueue + run_job of {args.memory_images:,} images", f"{m['rss_mb']:.0f} MB",
                         "", "", "<= 300 MB", m["rss_mb"] <= 300))
        finally:
            stack.stop()

    table = Table("figure", "jetpipe", "raw baseline (same run)", "ratio", "target", "holds",
                  title=f"jetpipe benchmarks ({os.cpu_count()} cores, Python {sys.version.split()[0]})")
    for name, value, base, ratio, target, ok in rows:
        table.add_row(name, value, base, ratio, target, "" if ok is None else ("yes" if ok else "[red]no[/red]"))
    out.print(table)
    out.print(f"measured by: python benchmarks/run.py {' '.join(sys.argv[1:])}".rstrip())
    return 0


if __name__ == "__main__":
    sys.exit(main())
