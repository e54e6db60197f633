"""Test helpers: jobs over fake images, pulling real tasks from JetStream, building result bodies."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import shutil
import threading
import time
from collections import Counter
from pathlib import Path

import nats
import nats.errors

from models import Job, JobStatus
from pipeline import names
from pipeline.core import inbox
from pipeline.core.jobs import create_job
from pipeline.core.outcomes import Action, Handled, ids_text
from pipeline.core.saving import drain
from pipeline.errors import TransientError
from pipeline.schemas import Task, decode_task
from pipeline.settings import Settings
from tests.conftest import PROJECT, wait_for

log = logging.getLogger(__name__)

DET = {"key": "blob-detector-v1", "name": "Dark blob detector"}
CLS = {"key": "moth-shape-v1", "name": "Moth family"}


@contextlib.asynccontextmanager
async def nats_client(url: str, **options):
    """A NATS connection closed however the block ends: one left open outlives its event loop and is
    reported later, as an unraisable exception in whichever test the garbage collector then runs."""
    nc = await nats.connect(url, **options)
    try:
        yield nc
    finally:
        await nc.close()


#: What the drains run by `handle_result_message` did, by message source: a message taken by one thread may
#: be saved by another thread's drain of the same job.
_drained: dict[str, Action] = {}
_drained_lock = threading.Lock()


def handle_result_message(runtime, job_id: int, body: bytes, reply: str | None, tokens: str | None = None, *,
                          timeout_s: float = 60) -> Handled:
    """Take one result message (as if it came from the results stream with `reply` as its `Pipeline-Task-Reply`
    and `tokens` as its `Pipeline-Task-Token`) and save it now, as the bridge and a worker would: what
    happened to it. Raises TransientError (logged with job and image ids) when a server is unreachable."""
    incoming = inbox.Incoming.direct(job_id, body, reply, tokens)
    images = ids_text(inbox.named_images(body)) or "?"
    try:
        inbox.take(runtime, [incoming])
    except TransientError as exc:
        log.warning("job=%s image=%s transient error while taking the result (its tasks are not ACKed; a "
                    "redelivery takes it again): %s", job_id, images, exc)
        raise
    deadline = time.monotonic() + timeout_s
    try:
        while True:
            drained = drain(runtime, job_id)
            with _drained_lock:
                _drained.update(drained.actions)
                done = _drained.pop(incoming.source, None)
            if done is not None or time.monotonic() > deadline:
                break
            time.sleep(0.005)  # another thread is draining the job: it saves this message too
    except TransientError as exc:
        log.warning("job=%s image=%s transient error, result waits in the inbox: %s", job_id, images, exc)
        raise
    action = done or Action.LEFT_PENDING
    job = Job.select(Job.status).where(Job.id == job_id).get_or_none()
    snapshot = runtime.state.snapshot(job_id) if action == Action.COUNTED and job and \
        job.status == JobStatus.STARTED else None
    return Handled(action, job.status if job else None, snapshot)


def fake_job(pipeline: str, n: int, *, prefix: str = "file:///nowhere/img", reuse: bool = False, **kwargs) -> Job:
    """A job over `n` made-up images (the same URLs in every such job of a test: so that each job processes its
    own, reuse is off unless asked for)."""
    return create_job(pipeline, [f"{prefix}-{i}.png" for i in range(n)], reuse=reuse, **kwargs)


def settings_on(database_url: str, nats_url: str, redis_url: str, **overrides) -> Settings:
    """Settings for a process on these servers (as one NATS user: its URL says which)."""
    return Settings.from_env({"PIPELINE_DATABASE_URL": database_url, "PIPELINE_NATS_URL": nats_url,
                              "PIPELINE_REDIS_URL": redis_url, "PIPELINE_METRICS_PORT": "0",
                              **{k: str(v) for k, v in overrides.items()}})


def token_of(job_id: int, image_id: str) -> str:
    """The task token of the job's task for `image_id`, as its holder has it (the task's `task_token`)."""
    from pipeline.core.task_tokens import token_for

    return token_for(Job.get_by_id(job_id).task_secret, job_id, str(image_id))


def dispatch(runtime, job_id: int) -> None:
    from actors.run_job import execute

    execute(runtime, job_id)


def pull_tasks(runtime, job_id: int, count: int, *, timeout_s: float = 5.0) -> list[tuple[Task, str]]:
    """Pull up to `count` of the job's tasks like a processing service would: (task, reply subject)."""

    async def pull():
        async with nats_client(runtime.settings.nats_url) as nc:
            job = Job.get_by_id(job_id)
            sub = await nc.jetstream().pull_subscribe_bind(names.job_consumer(job_id),
                                                           stream=names.tasks_stream(job.pipeline.slug))
            # nats-py's fetch may also return [] without raising (a status reply such as a paused consumer's,
            # or the rest of a batch not arriving in time): that ends the pull too, as a timeout does
            got: list[tuple[Task, str]] = []
            while len(got) < count:
                try:
                    msgs = await sub.fetch(count - len(got), timeout=timeout_s)
                except TimeoutError:  # nats-py's own, or asyncio's from inside its fetch (seen on a paused consumer)
                    break
                if not msgs:
                    break
                got += [(decode_task(m.data), m.reply) for m in msgs]
            return got

    return runtime.runner.run(pull(), timeout=timeout_s + 10)


def success_body(task: Task, *, boxes: int = 2, classified: bool = True, pipeline: str | None = None,
                 detector: dict = DET) -> bytes:
    detections = []
    for b in range(boxes):
        det = {"source_image_id": task.image_id, "algorithm": detector,
               "bbox": {"x1": 10.0 * b, "y1": 5.0, "x2": 10.0 * b + 8, "y2": 13.0}, "score": 0.9,
               "crop_image_url": None, "classifications": []}
        if classified:
            det["classifications"] = [{"taxon": "Noctuidae", "scores": [0.8, 0.1, 0.1],
                                       "labels": ["Noctuidae", "Geometridae", "Tortricidae"], "algorithm": CLS,
                                       "terminal": True}]
        detections.append(det)
    if not detections:
        detections = [{"source_image_id": task.image_id, "algorithm": detector, "bbox": None}]
    return json.dumps({"pipeline": pipeline or task.pipeline, "total_time": 0.1,
                       "source_images": [{"id": task.image_id, "url": task.image_url}],
                       "detections": detections}).encode()


def job_with_results(runtime, pipeline: str, images: int, handled: int, *, boxes: int = 2):
    """A dispatched job whose tasks a service pulled, with the first `handled` results handled: (job, tasks)."""
    job = fake_job(pipeline, images)
    dispatch(runtime, job.id)
    tasks = pull_tasks(runtime, job.id, images)
    for task, reply in tasks[:handled]:
        handle_result_message(runtime, job.id, success_body(task, boxes=boxes), reply, task.task_token)
    return job, tasks


def error_body(image_id: str | None, why: str = "model exploded") -> bytes:
    return json.dumps({"error": why, "image_id": image_id}).encode()


def stream_count(runtime, job_id: int, pipeline: str) -> int:
    """Messages of the job still in its pipeline's tasks stream (un-acked tasks)."""

    js = runtime.tasks.queue.js  # connect (via the loop) before running on it

    async def count():
        info = await js.stream_info(names.tasks_stream("moth-demo"),
                                                        subjects_filter=names.task_subject(pipeline, job_id))
        return sum((info.state.subjects or {}).values())

    return runtime.runner.run(count(), timeout=10)


def at_once(n: int, fn, *, setup=None) -> list:
    """Run `fn` in `n` threads released together, like n workers receiving the same message at the same
    moment; `setup()` runs per thread before the release and its result is passed to `fn`. Returns the
    results; re-raises the first exception a thread raised."""
    barrier, results, errors = threading.Barrier(n), [], []

    def run():
        try:
            prepared = setup() if setup else None
            barrier.wait()
            results.append(fn(prepared) if setup else fn())
        except BaseException as exc:  # noqa: BLE001 - handed to the test
            errors.append(exc)

    threads = [threading.Thread(target=run) for _ in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return results


def answer_one_box(task: dict) -> dict:
    """A success result for one task, the way a service written from the contract would send it: one
    image, one detection, one classification."""
    return {"pipeline": task["pipeline"], "source_images": [{"id": task["image_id"], "url": task["image_url"]}],
            "total_time": 0.01, "detections": [
                {"source_image_id": task["image_id"], "bbox": {"x1": 1, "y1": 2, "x2": 30, "y2": 40},
                 "algorithm": DET, "score": 0.9, "crop_image_url": None,
                 "classifications": [{"taxon": "Noctuidae", "scores": [0.9, 0.05, 0.05],
                                      "labels": ["Noctuidae", "Geometridae", "Tortricidae"], "algorithm": CLS,
                                      "terminal": True}]}]}


async def raw_service(nats_url: str, pipeline: str, stop: asyncio.Event, answer, *, copies: int = 1,
                      seen: Counter | None = None, old_contract: bool = False) -> int:
    """A processing service written only from docs/processing-services.md, with raw nats-py and no SDK: one
    result message per image, published `copies` times. `answer(task)` returns the result to publish, or
    None to drop the task; `seen` counts the deliveries of each image id (a model run each). `old_contract`:
    written before task tokens (no Pipeline-Task-Token header)."""
    import nats.js.errors

    async with nats_client(nats_url, max_reconnect_attempts=-1, reconnect_time_wait=0.5) as nc:
        js = nc.jetstream()
        subs, done = {}, 0
        while not stop.is_set():
            try:
                done += await _raw_round(js, subs, pipeline, answer, copies=copies, seen=seen,
                                         old_contract=old_contract)
            except (nats.errors.Error, TimeoutError, OSError) as exc:  # an outage: try again, as a service would
                log.info("raw service: %s: %s; trying again", type(exc).__name__, exc)
                await asyncio.sleep(0.5)
        return done


async def _raw_round(js, subs: dict, pipeline: str, answer, *, copies: int, seen: Counter | None,
                     old_contract: bool) -> int:
    """One look at the pipeline's jobs and one fetch from each not paused, highest priority first; the number of
    tasks answered."""
    import nats.js.errors

    try:
        consumers = await js.consumers_info(f"PIPELINE_TASKS_{pipeline}")
    except nats.js.errors.NotFoundError:  # no worker has created the streams yet
        await asyncio.sleep(0.2)
        return 0
    priority, paused = {}, set()
    for info in consumers:
        subject = info.config.filter_subject or ""
        metadata = info.config.metadata or {}
        if not subject.startswith(f"pipeline.tasks.{pipeline}."):
            continue
        if metadata.get("paused") == "true":  # "Which job next": a paused job is not pulled
            paused.add(info.name)
        priority[info.name] = int(metadata.get("priority", "0"))
        if info.name not in subs:
            subs[info.name] = await js.pull_subscribe_bind(info.name, stream=f"PIPELINE_TASKS_{pipeline}")
    done, got_any, served = 0, False, None
    # the highest priority first, a lower one only if it had nothing (one fetch from each job of a priority
    # per round keeps equal shares between them)
    for name, sub in sorted(subs.items(), key=lambda item: -priority.get(item[0], 0)):
        if name in paused or (served is not None and priority.get(name, 0) < served):
            continue
        try:
            msgs = await sub.fetch(100, timeout=0.2)
        except (TimeoutError, nats.errors.TimeoutError):
            continue
        except nats.js.errors.Error:  # consumer deleted: the job is over
            del subs[name]
            continue
        got_any, served = True, priority.get(name, 0)
        for msg in msgs:
            task = json.loads(msg.data)
            assert msg.headers["Nats-Msg-Id"] == f"{task['job_id']}:{task['image_id']}"
            assert msg.headers["Pipeline-Image-Id"] == task["image_id"]
            if seen is not None:
                seen[task["image_id"]] += 1
            result = answer(task)
            if result is None:  # this service drops the task: no result, no +WPI
                continue
            await msg.in_progress()
            headers = {"Pipeline-Task-Reply": msg.reply}
            if not old_contract:
                headers["Pipeline-Task-Token"] = task["task_token"]
            for _ in range(copies):
                await js.publish(f"pipeline.results.{pipeline}.{task['job_id']}", json.dumps(result).encode(),
                                 headers=headers)
            done += 1
    if not got_any:
        await asyncio.sleep(0.05)
    return done


def result_messages(settings, job_id: int, *, tokens: bool = False) -> list:
    """(Pipeline-Task-Reply header, body) of every result message of the job waiting in PIPELINE_RESULTS (left
    in place); with `tokens`, (reply header, body, Pipeline-Task-Token header)."""

    async def read():
        async with nats_client(settings.nats_url) as nc:
            js = nc.jetstream()
            info = await js.stream_info(names.RESULTS_STREAM)
            found = []
            for seq in range(max(info.state.first_seq, 1), info.state.last_seq + 1):
                try:
                    msg = await js.get_msg(names.RESULTS_STREAM, seq)
                except nats.js.errors.NotFoundError:
                    continue
                if msg.subject == names.result_subject("moth-demo", job_id):
                    headers = msg.headers or {}
                    found.append((headers.get(names.HDR_TASK_REPLY), json.loads(msg.data))
                                 + ((headers.get(names.HDR_TASK_TOKEN),) if tokens else ()))
            return found

    return asyncio.run(read())


def shipped_nats_conf(directory: Path, name: str, *, port: int, http_port: int, route_port: int = 0) -> Path:
    """deploy/`name` as shipped, with its listen ports and store moved into `directory` (the users file it
    includes copied next to it): what the compose services run, on this machine's loopback."""
    directory.mkdir(parents=True, exist_ok=True)
    conf = (PROJECT / "deploy" / name).read_text()
    for shipped, local in (("0.0.0.0:4222", f"127.0.0.1:{port}"), ("127.0.0.1:8222", f"127.0.0.1:{http_port}"),
                           ("0.0.0.0:6222", f"127.0.0.1:{route_port}"), ("/data/jetstream", str(directory / "js"))):
        assert shipped in conf or (shipped == "0.0.0.0:6222" and "cluster {" not in conf), (name, shipped)
        conf = conf.replace(shipped, local)
    (directory / name).write_text(conf)
    shutil.copy(PROJECT / "deploy" / "nats-users.conf", directory / "nats-users.conf")
    return directory / name


def take_and_save(runtime, job_id: int, monkeypatch, *, timeout_s: float = 60) -> None:
    """What a worker does with the job's result messages: the results bridge takes them into the inbox, then
    they are saved (here, rather than by process_pipeline_result), until the job has ended."""
    from pipeline.worker.bridge import Bridge, bridge_routes

    monkeypatch.setattr("pipeline.worker.bridge.request_drains", lambda runtime, job_ids: None)
    bridge = Bridge(runtime.tasks.queue.js, bridge_routes(runtime)[:1])
    running = runtime.runner.spawn(bridge.run())

    def ended() -> bool:
        drain(runtime, job_id)
        return Job.get_by_id(job_id).status in JobStatus.TERMINAL

    try:
        wait_for(ended, timeout_s=timeout_s, message=f"job {job_id} to end")
    finally:
        runtime.runner.loop.call_soon_threadsafe(bridge.stop)
        running.result(timeout=20)
