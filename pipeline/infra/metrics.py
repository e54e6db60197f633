"""Prometheus metrics: Dramatiq's own plus jetpipe's, served by each `dramatiq pipeline.actors` instance.

Dramatiq's Prometheus middleware keeps every worker process's metrics in a multiprocess directory and
forks one HTTP exposition server (on PIPELINE_METRICS_PORT) that serves them all. jetpipe's metrics are
created in the worker processes after that middleware's `after_process_boot`, so they land in the same
directory and are served by the same endpoint:

    jetpipe_images_total{pipeline, outcome}        images counted once (outcome: processed | failed)
    jetpipe_image_failures_total{pipeline, reason} failed images by kind of reason (service_error, bad_result,
                                                   lost, terminated, deadline, not_picked_up, unsaved, other)
    jetpipe_result_handling_seconds                time to save one job's waiting results (a drain)
    jetpipe_lost_images_total{path}                images failed as lost (path: advisory | periodic)
    jetpipe_advisories_total{outcome}              MAX_DELIVERIES / MSG_TERMINATED advisories handled
    jetpipe_health_check_jobs_total{check, result} jobs checked / fixed / unfixable per sub-check
    jetpipe_jobs{status}                           jobs per status at the last health check
    jetpipe_job_longest_idle_seconds               the running job longest without progress (0: none runs)
    jetpipe_bridge_lag_seconds                     result published -> taken into the inbox
    jetpipe_bridge_consumer_missing{stream}        1 while the bridge finds its consumer gone (NATS lost it)
    jetpipe_db_transactions_total                  database write transactions committed
    jetpipe_results_waiting                        result messages taken into the inbox, not yet saved
    jetpipe_results_waiting_oldest_seconds         age of the oldest of them (0: none); per job in `health --json`
    jetpipe_results_parked                         result messages that could not be saved, parked
    jetpipe_result_save_failures_total{outcome}    failed attempts to save a result (not outages): retry | parked
    jetpipe_dead_letters                           Dramatiq messages that failed for good (`cli.py dlq list`)
    jetpipe_health_check_last_run_timestamp_seconds  when jobs_health_check last finished (Unix time)
    jetpipe_pipeline_*{pipeline}                   a pipeline's backlog, for autoscalers (docs/operations.md)
    jetpipe_task_ack_wait_seconds                  the tasks' lease (PIPELINE_NATS_TASK_TTR): alerts scale on it
    jetpipe_outage{loop}                           1 while a worker's retry loop fails (a server unreachable)
Label values known in advance are created at zero, so an alert on `increase()` sees the first one.
Alert rules on these: deploy/prometheus/jetpipe-alerts.yml.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import threading
from collections.abc import Callable, Iterable
from typing import Any

import dramatiq

import models
from pipeline import names
from pipeline.settings import Settings

log = logging.getLogger(__name__)

_lock = threading.Lock()
_metrics: _Metrics | None = None

#: The worker loops that report an outage (`jetpipe_outage{loop}`): the results bridge's two routes, its inbox
#: sweep, and its start.
OUTAGE_LOOPS = (f"bridge:{names.RESULTS_STREAM}", f"bridge:{names.ADVISORIES_STREAM}", "inbox_sweep", "bridge_start")
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


def metrics_directory(settings: Settings) -> str:
    """Where the worker processes behind one metrics port keep their multiprocess metric files."""
    return os.path.join(tempfile.gettempdir(), f"jetpipe-metrics-{settings.metrics_port}")


class _Metrics:
    def __init__(self) -> None:
        import prometheus_client as prom  # late: after Dramatiq set the multiprocess directory

        self.images = prom.Counter("jetpipe_images", "Images whose outcome was counted (once per image).",
                                   ["pipeline", "outcome"])
        self.result_seconds = prom.Histogram("jetpipe_result_handling_seconds",
                                             "Seconds to save one job's waiting results (one drain).",
                                             buckets=LATENCY_BUCKETS)
        self.job_row_lock = prom.Histogram(
            "jetpipe_job_row_lock_seconds", "Seconds a writer of a job's outcomes held the job's row lock (its Redis "
            "gate and progress write, to its commit): what several savers of one job queue for.",
            buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1))
        self.image_failures = prom.Counter("jetpipe_image_failures", "Failed images by kind of reason.",
                                           ["pipeline", "reason"])
        self.lost_images = prom.Counter("jetpipe_lost_images", "Images failed because their task was lost.",
                                        ["path"])
        self.advisories = prom.Counter("jetpipe_advisories", "Task advisories handled, by outcome.", ["outcome"])
        self.health_jobs = prom.Counter("jetpipe_health_check_jobs", "Jobs seen by each health-check sub-check.",
                                        ["check", "result"])
        self.jobs = prom.Gauge("jetpipe_jobs", "Jobs per status at the last health check.", ["status"],
                               multiprocess_mode="mostrecent")
        self.longest_idle = prom.Gauge(
            "jetpipe_job_longest_idle_seconds", "Seconds the running (not paused) job longest without progress has "
            "gone without it, at the last health check (0: no job runs).", multiprocess_mode="mostrecent")
        self.bridge_lag = prom.Histogram("jetpipe_bridge_lag_seconds",
                                         "Seconds from a result's publication to its taking into the inbox.",
                                         buckets=LATENCY_BUCKETS)
        self.bridge_consumer_missing = prom.Gauge(
            "jetpipe_bridge_consumer_missing", "1 while the bridge finds its durable consumer gone.", ["stream"],
            multiprocess_mode="max")
        self.db_transactions = prom.Counter("jetpipe_db_transactions", "Database write transactions committed.")
        self.results_waiting = prom.Gauge("jetpipe_results_waiting",
                                          "Result messages taken into the inbox and not yet saved.",
                                          multiprocess_mode="mostrecent")
        self.results_waiting_oldest = prom.Gauge(
            "jetpipe_results_waiting_oldest_seconds",
            "Age of the oldest result message taken into the inbox and not yet saved (0: none).",
            multiprocess_mode="mostrecent")
        self.results_parked = prom.Gauge("jetpipe_results_parked",
                                         "Result messages that could not be saved and are parked.",
                                         multiprocess_mode="mostrecent")
        self.result_save_failures = prom.Counter(
            "jetpipe_result_save_failures", "Failed attempts to save a result message (not outages), by what "
            "became of it.", ["outcome"])
        self.dead_letters = prom.Gauge("jetpipe_dead_letters", "Dramatiq messages that failed for good.",
                                       multiprocess_mode="mostrecent")
        # a pipeline's backlog, for autoscalers (pipeline/infra/backlog.py)
        self.pipeline_tasks_waiting = prom.Gauge(
            "jetpipe_pipeline_tasks_waiting", "Tasks published and not yet delivered to a service.", ["pipeline"],
            multiprocess_mode="mostrecent")
        self.pipeline_tasks_in_flight = prom.Gauge(
            "jetpipe_pipeline_tasks_in_flight", "Tasks delivered to a service and not yet answered.", ["pipeline"],
            multiprocess_mode="mostrecent")
        self.pipeline_oldest_waiting = prom.Gauge(
            "jetpipe_pipeline_oldest_waiting_task_seconds", "Age of the oldest task not yet delivered (0: none).",
            ["pipeline"], multiprocess_mode="mostrecent")
        self.pipeline_pulls_waiting = prom.Gauge(
            "jetpipe_pipeline_pull_requests_waiting", "NATS pull requests waiting for a task (services idle now).",
            ["pipeline"], multiprocess_mode="mostrecent")
        self.pipeline_http_services = prom.Gauge(
            "jetpipe_pipeline_http_services", "HTTP processing services seen in the last minute.", ["pipeline"],
            multiprocess_mode="mostrecent")
        self.ack_wait = prom.Gauge("jetpipe_task_ack_wait_seconds", "The tasks' lease (PIPELINE_NATS_TASK_TTR).",
                                   multiprocess_mode="mostrecent")
        self.outage = prom.Gauge("jetpipe_outage", "1 while a worker's retry loop fails (a server it needs is "
                                 "unreachable).", ["loop"], multiprocess_mode="max")
        self.health_check_last_run = prom.Gauge(
            "jetpipe_health_check_last_run_timestamp_seconds", "When jobs_health_check last finished (Unix time).",
            multiprocess_mode="max")
        for outcome in ("retry", "parked"):
            self.result_save_failures.labels(outcome)
        for path in ("advisory", "periodic"):
            self.lost_images.labels(path)
        for loop in OUTAGE_LOOPS:
            self.outage.labels(loop)
        models.commit_listeners.append(self.db_transactions.inc)


def metrics() -> _Metrics:
    """The process's metrics (created on first use)."""
    global _metrics
    with _lock:
        if _metrics is None:
            _metrics = _Metrics()
        return _metrics


def outage_reporter(loop: str) -> Callable[[bool], None]:
    """What an `Outage` of the worker loop `loop` (one of OUTAGE_LOOPS) calls: sets `jetpipe_outage{loop}`."""
    return lambda failing: metrics().outage.labels(loop).set(int(failing))


def make_middleware(settings: Settings) -> dramatiq.Middleware | None:
    """Dramatiq's Prometheus middleware serving PIPELINE_METRICS_PORT, inert until process boot (in-process
    test workers never boot); None when metrics are off (port 0)."""
    if settings.metrics_port == 0:
        return None
    from dramatiq.middleware import prometheus
    from dramatiq.middleware.prometheus import Prometheus

    # Dramatiq reads its directory from the environment when that module is imported; we set the module's
    # value instead of writing the environment (its after_process_boot hands it to prometheus_client).
    prometheus.DB_PATH = metrics_directory(settings)
    os.makedirs(prometheus.DB_PATH, exist_ok=True)

    class WorkerMetrics(Prometheus):
        booted = False

        @property
        def forks(self) -> list[Callable[[], int]]:
            return [run_exposition_server]  # ours: it reads PIPELINE_METRICS_PORT in the forked process

        def after_process_boot(self, broker: dramatiq.Broker) -> None:
            super().after_process_boot(broker)  # type: ignore[no-untyped-call]
            self.booted = True

    def _guard(name: str) -> Callable[..., Any]:
        def hook(self: WorkerMetrics, *args: Any, **kwargs: Any) -> Any:
            if self.booted:
                return getattr(Prometheus, name)(self, *args, **kwargs)
            return None
        return hook

    for hook in ("after_worker_shutdown", "after_nack", "after_enqueue", "before_delay_message",
                 "before_process_message", "after_process_message", "after_skip_message"):
        setattr(WorkerMetrics, hook, _guard(hook))

    return WorkerMetrics()


def _remove_dead_process_files(directory: str) -> None:
    """Drop metric files of processes that no longer run (a restarted worker starts from zero)."""
    for name in os.listdir(directory):
        pid = name.rsplit("_", 1)[-1].split(".", 1)[0]
        if not pid.isdigit():
            continue
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            os.remove(os.path.join(directory, name))
        except PermissionError:
            pass


WsgiApp = Callable[[dict[str, Any], Callable[..., Any]], Iterable[bytes]]


def with_probes(metrics_app: WsgiApp, settings: Settings) -> WsgiApp:
    """The metrics WSGI app, plus `/healthz` (this process answers) and `/readyz` (the database, Redis and
    NATS answer from this host) for orchestrators."""
    from pipeline.infra.readiness import readiness

    def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        path = environ.get("PATH_INFO", "")
        if path not in ("/healthz", "/readyz"):
            return metrics_app(environ, start_response)
        ready, checks = (True, {"status": "alive"}) if path == "/healthz" else readiness(settings)
        body = json.dumps({"ready": ready, **checks} if path == "/readyz" else checks).encode()
        start_response("200 OK" if ready else "503 Service Unavailable",
                       [("Content-Type", "application/json"), ("Content-Length", str(len(body)))])
        return [body]

    return app


def run_exposition_server() -> int:
    """Serve every worker process's metrics over HTTP; run by the `dramatiq` master as a fork process."""
    from wsgiref.simple_server import WSGIRequestHandler, make_server

    settings = Settings.from_env()
    directory = metrics_directory(settings)
    os.makedirs(directory, exist_ok=True)
    _remove_dead_process_files(directory)
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = directory
    import prometheus_client as prom
    from prometheus_client import multiprocess

    registry = prom.CollectorRegistry()
    multiprocess.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]

    class QuietHandler(WSGIRequestHandler):
        def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - one line a scrape would drown the log
            pass

    try:
        server = make_server(settings.metrics_host, settings.metrics_port,
                             with_probes(prom.make_wsgi_app(registry), settings), handler_class=QuietHandler)
    except OSError as exc:
        # Workers behind one port share one metrics directory, so the worker that holds the port also
        # serves this one's metrics when both are jetpipe workers.
        log.warning("metrics: cannot listen on %s:%s (%s); if another jetpipe worker on this host holds it, it "
                    "serves this worker's metrics too; else set PIPELINE_METRICS_PORT (0: off)",
                    settings.metrics_host, settings.metrics_port, exc.strerror or exc)
        return 0
    server.serve_forever()
    return 0
