"""The `fairness` stage of benchmarks/run.py: many jobs from many projects on one processing service of fixed
capacity (a model that takes COST_S per image, CONCURRENCY at a time), with the SDK (priority and weighted
fair share, pipeline/fairshare.py) side by side with first-come (a service that takes the oldest job's
tasks until it has none: what a job queue without fair share gives, and what the reference system's
worker does through a listing ordered by age).

- a 50-image job of project B alone on the idle system, then enqueued while a 100,000-image job of project A
  runs (all its tasks dispatched), three times: its median time next to its idle time, on SQLite and (with
  --postgres) on PostgreSQL                                                     [<= 2x]
  and, for the record, enqueued while the big job is still being dispatched (the worker, NATS and the
  database then also publish and record 100,000 tasks)
- two projects weighted 3:1, a 20,000-image job each: the tasks each got in a window while both had work
                                                                                [3:1 +- 10 %]
"""

from __future__ import annotations

import contextlib
import statistics
import subprocess
import sys
import time

from benchmarks.run import E2E_SERVICE, ROOT, console, env_for, fresh_servers, run_py, start_worker, stop
from pipeline.ops.devstack import DevStack

COST_S = 0.008  # the model's time per image
CONCURRENCY = 4  # images at once: a capacity of CONCURRENCY / COST_S = 500 images/s

#: The SDK's service, whose model takes COST_S per image.
FAIR_SERVICE = E2E_SERVICE.replace(
    "async def null_model(task):  # 3 detections with 1 classification each, no work\n",
    f"async def null_model(task):  # 3 detections with 1 classification each, {COST_S * 1000:g} ms of work\n"
    f"    await asyncio.sleep({COST_S})\n").replace("concurrency=64", f"concurrency={CONCURRENCY}").replace(
    "BATCH)", "50)")

#: A first-come service written from the wire contract with raw nats-py: the same model and capacity, but it
#: takes the tasks of the oldest job that has any (one result message per image, as a simple service does).
FIFO_SERVICE = f"""
import asyncio, json, nats
from pipeline.settings import get_settings
DET, CLS = {{"key": "blob-detector-v1"}}, {{"key": "moth-shape-v1"}}
state, wake = {{"free": {CONCURRENCY}}}, asyncio.Event()
async def answer(js, msg):
    try:
        task = json.loads(msg.data)
        await asyncio.sleep({COST_S})
        dets = [{{"source_image_id": task["image_id"], "bbox": {{"x1": i, "y1": i, "x2": i + 5, "y2": i + 5}},
                 "algorithm": DET, "score": 0.9, "classifications": [{{"taxon": "Noctuidae", "scores": [0.9],
                 "algorithm": CLS}}]}} for i in range(3)]
        body = {{"pipeline": task["pipeline"], "source_images": [{{"id": task["image_id"]}}], "detections": dets}}
        await js.publish(f"pipeline.results.{{task['pipeline']}}.{{task['job_id']}}", json.dumps(body).encode(),
                         headers={{"Pipeline-Task-Reply": msg.reply, "Pipeline-Task-Token": task["task_token"]}})
    finally:
        state["free"] += 1
        wake.set()
async def main():
    nc = await nats.connect(get_settings().nats_url)
    js = nc.jetstream()
    subs = {{}}
    while True:
        while state["free"] == 0:
            wake.clear()
            await wake.wait()
        try:
            consumers = await js.consumers_info("PIPELINE_TASKS_moth-demo")
        except Exception:
            await asyncio.sleep(0.2)
            continue
        got = False
        for info in sorted(consumers, key=lambda c: int(c.name.split("-")[1])):  # the oldest job first
            if info.name not in subs:
                subs[info.name] = await js.pull_subscribe_bind(info.name, stream="PIPELINE_TASKS_moth-demo")
            try:
                msgs = await subs[info.name].fetch(state["free"], timeout=0.2)
            except Exception:
                continue
            for msg in msgs:
                state["free"] -= 1
                asyncio.ensure_future(answer(js, msg))
            got = True
            break  # back to the oldest job
        if not got:
            await asyncio.sleep(0.05)
asyncio.run(main())
"""

SCENARIO = """
import json, time, models
from models import Job
from pipeline.sdk import moth
from pipeline.core import scheduling
from pipeline.core.registry import register_pipeline
from pipeline.schemas import decode_pipeline_spec
from pipeline.infra.runtime import get_runtime
from pipeline.core.jobs import cancel, create_job, start_job
rt = get_runtime(); models.create_schema()
register_pipeline(decode_pipeline_spec(json.dumps(moth.PIPELINE_SPEC).encode(), source="bench"))
def job(n, project, tag):
    made = create_job("moth-demo", (f"file:///fair/{tag}/{i}.png" for i in range(n)), project=project, name=tag)
    start_job(rt, made)
    return made.id
def processed(job_id):
    return Job.get_by_id(job_id).progress["stages"]["process"]["processed"]
def wait(pred, limit=900):
    deadline = time.monotonic() + limit
    while not pred() and time.monotonic() < deadline:
        time.sleep(0.02)
    return pred()
def took(job_id):
    j = Job.get_by_id(job_id)
    return (j.finished_at - j.created_at).total_seconds(), j.status
def delivered(job_id):
    return rt.tasks.consumer_state(job_id, "moth-demo").num_delivered
out = {}
if MODE == "alone":  # after a first job that makes the tasks stream and warms every connection, three jobs
    times, statuses = [], set()
    for n in range(4):
        b = job(SMALL if n else 1, "lab-b", f"alone-{n}")
        wait(lambda: Job.get_by_id(b).finished_at is not None)
        if n:
            times.append(took(b)[0])
            statuses.add(took(b)[1])
    out["small_s"], out["status"] = sorted(times)[1], "SUCCESS" if statuses == {"SUCCESS"} else sorted(statuses)
elif MODE == "beside":
    a = job(BIG, "lab-a", "big")
    wait(lambda: processed(a) >= 2000 and (not AFTER_DISPATCH or Job.get_by_id(a).dispatched_at is not None))
    b = job(SMALL, "lab-b", "small")
    wait(lambda: Job.get_by_id(b).finished_at is not None)
    out["small_s"], out["status"] = took(b)
    out["big_processed"] = processed(a)
    cancel(rt, a)
else:
    scheduling.set_project_weight(rt, "lab-a", 3)
    scheduling.set_project_weight(rt, "lab-b", 1)
    a, b = job(SHARE, "lab-a", "heavy"), job(SHARE, "lab-b", "light")
    wait(lambda: processed(a) + processed(b) >= 1000)
    first = delivered(a), delivered(b)
    time.sleep(WINDOW)
    last = delivered(a), delivered(b)
    out["heavy"], out["light"] = last[0] - first[0], last[1] - first[1]
    out["both_had_work"] = processed(a) < SHARE and processed(b) < SHARE
    cancel(rt, a); cancel(rt, b)
print(json.dumps(out))
"""


def scenario(stack: DevStack, db: str, service: str, mode: str, *, big: int, small: int, share: int,
             window_s: float, after_dispatch: bool = False, **settings) -> dict:
    """One scenario with one worker process and `service` (FAIR_SERVICE or FIFO_SERVICE) started first."""
    fresh_servers(stack)
    env = env_for(stack, db, **settings)
    worker = start_worker(env, "pipeline.actors")
    svc = subprocess.Popen([sys.executable, "-c", service], cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        time.sleep(3)
        values = {"MODE": repr(mode), "AFTER_DISPATCH": str(after_dispatch), "BIG": str(big), "SMALL": str(small),
                  "SHARE": str(share), "WINDOW": str(window_s)}
        code = SCENARIO
        for name, value in values.items():
            code = code.replace(name, value)
        return run_py(code, env)
    finally:
        stop(worker, svc)


def fairness(stack: DevStack, tmp: str, *, big: int = 100_000, small: int = 50, share: int = 20_000,
             window_s: float = 10.0, repeats: int = 3, databases=None) -> list[tuple]:
    """`databases`: (label, a context manager giving a fresh database URL) to run the fair share's rows on;
    SQLite by default. The first-come rows and the weights run on SQLite."""
    sqlite = ("SQLite", lambda: contextlib.nullcontext(f"sqlite:///{tmp}/fair-{time.time_ns()}.db"))
    rows = []
    capacity = f"a service of {CONCURRENCY / COST_S:,.0f} images/s ({COST_S * 1000:g} ms x {CONCURRENCY})"

    def run(service: str, mode: str, fresh_db, **options) -> dict:
        with fresh_db() as url:
            return scenario(stack, url, service, mode, big=big, small=small, share=share, window_s=window_s,
                            **options)

    def beside_row(label: str, when: str, alone: dict, runs: list[dict], target: bool) -> tuple:
        times = sorted(r["small_s"] for r in runs)
        median = statistics.median(times)
        spread = f", {len(times)} runs: {times[0]:.2f}-{times[-1]:.2f} s" if len(times) > 1 else ""
        ok = all(r["status"] == "SUCCESS" for r in runs)
        return (f"{small}-image job of project B beside a {big:,}-image job of A {when} ({label})",
                f"{median:,.2f} s{spread} ({'SUCCESS' if ok else 'not all SUCCESS'}; A had "
                f"{runs[0]['big_processed']:,} done)", f"{alone['small_s']:,.2f} s alone (median of 3), {capacity}",
                f"{median / alone['small_s']:.2f}x", "<= 2x" if target else "",
                (median / alone["small_s"] <= 2 and ok) if target else None)

    for db_label, fresh_db in databases or [sqlite]:
        label = f"fair share (SDK), {db_label}"
        console.log(f"fairness, {label}: a {small}-image job alone, then {repeats}x beside a running {big:,}-image job")
        alone = run(FAIR_SERVICE, "alone", fresh_db)
        runs = [run(FAIR_SERVICE, "beside", fresh_db, after_dispatch=True) for _ in range(repeats)]
        rows.append(beside_row(label, "running", alone, runs, True))
        if db_label == "SQLite":
            console.log(f"fairness, {label}: the {small}-image job while the {big:,}-image job is still dispatched")
            rows.append(beside_row(label, "still being dispatched", alone, [run(FAIR_SERVICE, "beside", fresh_db)],
                                   False))
    console.log(f"fairness, first-come: a {small}-image job alone, then beside a running {big:,}-image job")
    alone = run(FIFO_SERVICE, "alone", sqlite[1])
    rows.append(beside_row("first-come, SQLite", "running", alone,
                           [run(FIFO_SERVICE, "beside", sqlite[1], after_dispatch=True)], False))
    for label, service in (("fair share (SDK)", FAIR_SERVICE), ("first-come", FIFO_SERVICE)):
        console.log(f"fairness, {label}: projects weighted 3:1")
        weights = run(service, "weights", sqlite[1])
        fair = service is FAIR_SERVICE
        ratio = weights["heavy"] / weights["light"] if weights["light"] else float("inf")
        rows.append((f"projects weighted 3:1, a {share:,}-image job each ({label}, SQLite)",
                     f"{weights['heavy']:,} : {weights['light']:,} tasks in {window_s:g} s",
                     "both had work" if weights["both_had_work"] else "one ran out of work",
                     f"{ratio:.2f}:1" if weights["light"] else "all : 0", "3:1 +- 10 %" if fair else "",
                     (2.7 <= ratio <= 3.3 and weights["both_had_work"]) if fair else None))
    return rows
