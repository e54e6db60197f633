"""`cli.py demo`: the whole system on one machine, self-contained, checked against ground truth.

Embedded NATS + Redis on free ports and a SQLite database in a temporary directory; one Dramatiq worker
process (`dramatiq pipeline.actors`, which also runs the results bridge); the reference processing
service (`cli.py process --pipeline moth-demo`); N synthetic trap images with known moths; one job run to
its end behind a progress bar; a summary table comparing what was saved with the ground truth.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

from rich.console import Console
from rich.table import Table

import models
from models import JobStatus
from pipeline.core.jobs import create_job, start_job
from pipeline.core.registry import register_pipeline
from pipeline.infra.presence import live_workers
from pipeline.infra.runtime import Runtime, set_runtime
from pipeline.ops.devstack import DevStack
from pipeline.ops.job_views import existing_job, job_summary, taxon_counts, watch
from pipeline.ops.sources import image_urls_from_dir
from pipeline.schemas import decode_pipeline_spec
from pipeline.sdk import moth
from pipeline.settings import Settings, set_settings


def saved_detections(job_id: int) -> Counter:
    """Real detections saved for the job's images, by classified taxon."""
    return Counter({row["taxon"]: row["detections"] for row in taxon_counts(job_id)})


def start_process(args: list[str], *, env: dict, log_path: Path, cwd: Path) -> subprocess.Popen:
    log = open(log_path, "ab")
    return subprocess.Popen(args, env=env, cwd=cwd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)


def stop_process(proc: subprocess.Popen, timeout_s: float = 20) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


class Dashboard(Protocol):
    """The web face, served while the demo runs (`pipeline.web.server.BackgroundWebServer`)."""

    url: str

    def stop(self) -> None: ...


def run_demo(console: Console, *, images: int, keep: bool, timeout_s: float, project_dir: Path,
             serve_dashboard: Callable[[Settings, Runtime], Dashboard], web: bool = False,
             http: bool = False) -> bool:
    """Run the demo; the dashboard (started by `serve_dashboard`: the web layer sits above this one) shows it
    while it runs, and with `web` until Ctrl-C afterwards. With `http` the reference service works through the
    dashboard's HTTP gateway instead of NATS."""
    root = Path(tempfile.mkdtemp(prefix="jetpipe-demo-"))
    stack = DevStack.create(root / "stack")
    procs: list[subprocess.Popen] = []
    runtime = None
    dashboard = None
    previous = _stop_on_signals()
    try:
        console.print(f"[bold]jetpipe demo[/bold] in {root}")
        stack.start()
        env = {**os.environ, **stack.env(), "PIPELINE_LOG_LEVEL": "INFO", "PIPELINE_METRICS_PORT": "0"}
        os.environ.update(stack.env())
        settings = Settings.from_env(env)
        set_settings(settings)
        models.bind(settings.database_url, session=settings.db_session())
        models.create_schema()
        register_pipeline(decode_pipeline_spec(
            __import__("json").dumps(moth.PIPELINE_SPEC).encode(), source="moth-demo"))
        console.print(f"NATS {stack.nats_url}  Redis {stack.redis_url}  DB {settings.database_url}")

        with console.status(f"generating {images} synthetic trap images"):
            truth = moth.generate_images(str(root / "images"), images)
        expected = moth.summarize_truth(truth)
        console.print(f"generated {images} images with {expected['detections']} moths")

        runtime = Runtime(settings, name="jetpipe-demo")
        set_runtime(runtime)
        dashboard = serve_dashboard(settings, runtime)
        procs.append(start_process([sys.executable, "-m", "dramatiq", "pipeline.actors", "-p", "1", "-t", "8"],
                                   env=env, log_path=root / "worker.log", cwd=project_dir))
        via = ["--via", dashboard.url] if http else []
        procs.append(start_process([sys.executable, "cli.py", "process", "--pipeline", moth.SLUG, "--concurrency",
                                    "4", *via], env=env, log_path=root / "service.log", cwd=project_dir))
        if http:
            console.print(f"the reference service works over HTTP through {dashboard.url}/api/v2 (no NATS)",
                          highlight=False)
        with console.status("waiting for the worker to start"):
            _wait_for_worker(runtime)
        job = create_job(moth.SLUG, image_urls_from_dir(str(root / "images")), name="demo job")
        started = time.monotonic()
        start_job(runtime, job)
        console.print(f"job {job.id} enqueued: {job.total_images} images; follow it at {dashboard.url}/jobs/{job.id}",
                      highlight=False)
        job = watch(console, job.id, timeout_s=timeout_s)
        elapsed = time.monotonic() - started
        ok = _summarize(console, job.id, expected, elapsed, root)
        if web:
            console.print(f"dashboard: {dashboard.url}/jobs/{job.id} (its results, failures and log; the JSON API "
                          f"at {dashboard.url}/api/docs); Ctrl-C stops the demo", highlight=False)
            _wait_for_interrupt()
        else:
            console.print(f"dashboard: {dashboard.url}/jobs/{job.id} while the demo runs; "
                          "`python cli.py demo --web` keeps it up afterwards", highlight=False)
        return ok
    finally:
        _restore_signals(previous)
        if dashboard is not None:
            dashboard.stop()
        for proc in reversed(procs):
            stop_process(proc)
        if runtime is not None:
            set_runtime(None)
            runtime.close()
        stack.stop()
        if keep:
            console.print(f"kept {root} (images, pipeline.db, worker.log, service.log)")
        else:
            shutil.rmtree(root, ignore_errors=True)


#: Signals that stop the demo as Ctrl-C does (its stack, worker and service stopped, its directory removed).
STOP_SIGNALS = (signal.SIGTERM, signal.SIGHUP)


def _stop_on_signals() -> dict[int, Any]:
    """Make SIGTERM and SIGHUP stop the demo the way Ctrl-C does: their default kills this process at once and
    leaves NATS, Redis, the worker and the service running. The handlers it replaced."""
    if threading.current_thread() is not threading.main_thread():
        return {}

    def stop(signum: int, frame: object) -> None:
        raise KeyboardInterrupt(signal.Signals(signum).name)

    return {sig: signal.signal(sig, stop) for sig in STOP_SIGNALS}


def _restore_signals(previous: dict[int, Any]) -> None:
    for sig, handler in previous.items():
        signal.signal(sig, handler)


def _wait_for_worker(runtime: Runtime, timeout_s: float = 60) -> None:
    """Until the worker announces itself (the job's time then measures jetpipe, not a process starting)."""
    deadline = time.monotonic() + timeout_s
    while not live_workers(runtime.redis) and time.monotonic() < deadline:
        time.sleep(0.1)


def _wait_for_interrupt() -> None:
    """Until Ctrl-C, SIGTERM or SIGHUP."""
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass


def _summarize(console: Console, job_id: int, expected: dict, elapsed: float, root: Path) -> bool:
    summary = job_summary(existing_job(job_id))
    saved = saved_detections(job_id)
    detections_ok = sum(saved.values()) == expected["detections"] == summary["detections"]
    taxa_ok = dict(saved) == expected["taxa"]
    ok = summary["status"] == JobStatus.SUCCESS and detections_ok and taxa_ok

    table = Table("", "jetpipe", "ground truth", "", title=f"job {job_id} summary")
    mark = lambda good: "[green]ok[/green]" if good else "[red]MISMATCH[/red]"  # noqa: E731
    table.add_row("status", summary["status"], "SUCCESS", mark(summary["status"] == JobStatus.SUCCESS))
    table.add_row("images", f"{summary['processed']} processed, {summary['failed']} failed",
                  str(expected["images"]), mark(summary["processed"] == expected["images"]))
    table.add_row("detections", f"{sum(saved.values())} saved / {summary['detections']} counted",
                  str(expected["detections"]), mark(detections_ok))
    for taxon in sorted(set(saved) | set(expected["taxa"])):
        table.add_row(f"  {taxon}", str(saved.get(taxon, 0)), str(expected["taxa"].get(taxon, 0)),
                      mark(saved.get(taxon, 0) == expected["taxa"].get(taxon, 0)))
    table.add_row("classifications", str(summary["classifications"]), str(expected["detections"]), "")
    table.add_row("time", f"{elapsed:.1f} s ({summary['processed'] / max(elapsed, 1e-9):.0f} images/s)", "", "")
    console.print(table)
    if ok:
        console.print("[bold green]SUCCESS[/bold green]: every image processed, detections equal the ground truth")
    else:
        console.print(f"[bold red]demo failed[/bold red]: see {root}/worker.log and {root}/service.log (--keep)")
    return ok
