"""Sizing across hosts: the cluster deployment of tests/test_across_hosts.py (three NATS nodes with R3 streams,
a PostgreSQL + Redis host, two worker hosts, a processing-service host, each a network namespace on one
bridge), measured without faults, next to a raw baseline on the same hosts in the same run.

    sudo python benchmarks/across_hosts.py [--images 10000] [--runs 3]

Root only (it makes the namespaces). Figures:
  raw publish   js.publish of the task messages from a worker host to an R3 stream, 500 in flight
  dispatch      run_job publishing a job's tasks on a worker host (started_at -> dispatched_at)
  end to end    enqueue -> SUCCESS: a null model answering 50 images per result message on the service host,
                both worker hosts saving (`dramatiq pipeline.actors -p 1 -t 8` each, as the compose profile)
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

from benchmarks.run import E2E_SERVICE  # noqa: E402
from tests.netlab import UNAVAILABLE, Lab  # noqa: E402

RAW = """
import asyncio, json, sys
sys.path.insert(0, ROOT)
from benchmarks.run import raw_publish
print(json.dumps({"rate": asyncio.run(raw_publish(URL, N, replicas=3))}))
"""

#: The benchmarks' null model (3 detections and a classification per image, no work), 50 images per message.
SERVICE = E2E_SERVICE.replace("BATCH)", "50)")


def one_job(stack, images: int) -> dict:
    from models import Job, JobStatus
    from pipeline.core.jobs import create_job, start_job

    job = create_job("moth-demo", (f"file:///lab/{i}.png" for i in range(images)))
    started = time.perf_counter()
    start_job(stack.runtime, job)
    deadline = time.monotonic() + 900
    while (job := Job.get_by_id(job.id)).status not in JobStatus.TERMINAL and time.monotonic() < deadline:
        time.sleep(0.2)
    elapsed = time.perf_counter() - started
    stages = job.progress["stages"]
    exact = (job.status == JobStatus.SUCCESS and stages["process"]["processed"] == images
             and stages["process"]["failed"] == 0 and stages["results"]["detections"] == 3 * images)
    dispatch = (job.dispatched_at - job.started_at).total_seconds() if job.dispatched_at and job.started_at else None
    return {"elapsed_s": elapsed, "dispatch_s": dispatch, "exact": exact, "status": job.status}


def measure(images: int, runs: int, work: Path) -> list[tuple[str, str, str]]:
    import models
    from pipeline.core.registry import register_pipeline
    from pipeline.infra.runtime import Runtime, set_runtime
    from pipeline.schemas import decode_pipeline_spec
    from pipeline.sdk import moth
    from tests.conftest import PROJECT, subprocess_env
    from tests.test_across_hosts import LabStack

    stack = LabStack(Lab(200), work)
    rows = []
    try:
        stack.start_database()
        stack.start_nats()
        settings = stack.settings()
        stack.runtime = Runtime(settings, name="jetpipe-lab-operator")
        set_runtime(stack.runtime)
        models.create_schema()
        register_pipeline(decode_pipeline_spec(json.dumps(moth.PIPELINE_SPEC).encode(), source="lab"))
        w1, _ = stack.workers
        raw_code = RAW.replace("ROOT", repr(str(ROOT))).replace("URL", repr(stack.nats_url("jetpipe-operator")))
        for worker in stack.workers:
            stack.start_worker(worker, settings)
        stack.svc.popen([sys.executable, "-c", SERVICE], cwd=PROJECT, log=work / "svc.log",
                        env={**subprocess_env(settings), "PYTHONPATH": str(PROJECT),
                             "PIPELINE_NATS_URL": stack.nats_url("jetpipe-service")})
        time.sleep(5)
        for run in range(runs):
            raw = json.loads(w1.run([sys.executable, "-c", raw_code.replace("N,", f"{images},")],
                                    cwd=PROJECT).stdout.strip().splitlines()[-1])["rate"]
            e = one_job(stack, images)
            rows.append((f"run {run + 1}: raw publish from a worker host, R3", f"{raw:,.0f} msg/s", ""))
            if e["dispatch_s"]:
                rate = images / e["dispatch_s"]
                rows.append((f"run {run + 1}: dispatch (run_job on a worker host)", f"{rate:,.0f} tasks/s",
                             f"{rate / raw:.2f} of raw"))
            rows.append((f"run {run + 1}: end to end, {images:,} images, 50 per message",
                         f"{images / e['elapsed_s']:,.0f} images/s", "exact" if e["exact"] else f"NOT EXACT {e}"))
    finally:
        stack.runtime.close() if getattr(stack, "runtime", None) else None
        stack.close()
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=10_000)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    if UNAVAILABLE:
        print(f"cannot measure across hosts here: {UNAVAILABLE}", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="jetpipe-bench-hosts-") as tmp:
        rows = measure(args.images, args.runs, Path(tmp))
    table = Table("figure", "value", "against")
    for row in rows:
        table.add_row(*row)
    Console(width=150).print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
