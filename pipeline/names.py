"""Every Redis key, NATS stream/subject/consumer and header name jetpipe uses. Nothing spells one inline.

The NATS names are the public wire contract (docs/processing-services.md): processing services depend
on them.
"""

from __future__ import annotations

from collections.abc import Iterable

# ---- NATS streams (public) ------------------------------------------------------------------------
#: Each pipeline's tasks have a stream of their own, `PIPELINE_TASKS_<slug>`, so that NATS permissions can
#: keep a processing service to its own pipelines (a permission matches whole subject tokens only).
TASKS_STREAM_PREFIX = "PIPELINE_TASKS_"
#: The one tasks stream of every pipeline before that (`pipeline.tasks.>`): removed when a worker starts.
LEGACY_TASKS_STREAM = "PIPELINE_TASKS"
RESULTS_STREAM = "PIPELINE_RESULTS"
ADVISORIES_STREAM = "PIPELINE_ADVISORIES"

TASKS_SUBJECTS = "pipeline.tasks.>"
RESULTS_SUBJECTS = "pipeline.results.>"
#: Advisories of every stream's consumers; only those of tasks streams are acted on (`pipeline/core/lost.py`).
MAX_DELIVERIES_ADVISORY = "$JS.EVENT.ADVISORY.CONSUMER.MAX_DELIVERIES.>"
TERMINATED_ADVISORY = "$JS.EVENT.ADVISORY.CONSUMER.MSG_TERMINATED.>"


def tasks_stream(pipeline_slug: str) -> str:
    return f"{TASKS_STREAM_PREFIX}{pipeline_slug}"


def pipeline_of_tasks_stream(stream: str) -> str | None:
    """The pipeline whose tasks `stream` holds, or None if it is not a tasks stream."""
    return stream[len(TASKS_STREAM_PREFIX):] or None if stream.startswith(TASKS_STREAM_PREFIX) else None


def is_tasks_stream(stream: str) -> bool:
    return pipeline_of_tasks_stream(stream) is not None


#: Durable consumer shared by every worker's results bridge.
RESULTS_BRIDGE_CONSUMER = "results-bridge"
#: Durable consumer through which workers read captured advisories.
ADVISORIES_CONSUMER = "advisories-reader"

# ---- NATS headers (public) ------------------------------------------------------------------------
HDR_MSG_ID = "Nats-Msg-Id"
HDR_JOB_ID = "Pipeline-Job-Id"
HDR_IMAGE_ID = "Pipeline-Image-Id"
HDR_TASK_REPLY = "Pipeline-Task-Reply"
HDR_TASK_TOKEN = "Pipeline-Task-Token"
#: On a result message whose result is too large for one message: the name of the object holding it
#: (docs/processing-services.md, "Big results").
HDR_RESULT_OBJECT = "Pipeline-Result-Object"


def result_objects_bucket(pipeline_slug: str) -> str:
    """The JetStream object store bucket (stream `OBJ_<bucket>`) where the pipeline's services put results too
    large for one message."""
    return f"RESULTS_{pipeline_slug}"


def result_object_prefix(job_id: int) -> str:
    """What the name of every object holding a result of the job starts with."""
    return f"{job_id}/"


def task_subject(pipeline_slug: str, job_id: int) -> str:
    return f"pipeline.tasks.{pipeline_slug}.{job_id}"


def job_announcements(pipeline_slug: str) -> str:
    """Core NATS subject (no stream) on which each new job of the pipeline is announced once its first tasks
    are published, so that services pull at once instead of at their next listing of job consumers."""
    return f"pipeline.jobs.{pipeline_slug}"


def task_subject_prefix(pipeline_slug: str) -> str:
    """Filter-subject prefix of every job consumer of one pipeline."""
    return f"pipeline.tasks.{pipeline_slug}."


def tasks_subjects(pipeline_slug: str) -> str:
    """The subjects of one pipeline's tasks stream."""
    return f"pipeline.tasks.{pipeline_slug}.>"


def result_subject(pipeline_slug: str, job_id: int) -> str:
    return f"pipeline.results.{pipeline_slug}.{job_id}"


def results_of_job(job_id: int) -> str:
    """A subject filter matching every result of the job (`pipeline.results.<any pipeline>.<job_id>`)."""
    return f"pipeline.results.*.{job_id}"


def job_consumer(job_id: int) -> str:
    return f"job-{job_id}"


#: Longest job id jetpipe parses from a name (a database id fits in 18 decimal digits).
MAX_ID_DIGITS = 18


def parse_job_id(text: str) -> int | None:
    """The job id spelled by `text` (ASCII decimal digits only: "²" or "٣" are not ids), else None."""
    if text.isascii() and text.isdigit() and len(text) <= MAX_ID_DIGITS:
        return int(text)
    return None


def job_id_from_consumer(name: str) -> int | None:
    prefix = "job-"
    return parse_job_id(name[len(prefix):]) if name.startswith(prefix) else None


def job_id_from_result_subject(subject: str) -> int | None:
    """The job of `pipeline.results.<pipeline>.<job_id>` (or `pipeline.results.<job_id>`, as services
    written before per-pipeline subjects publish: still taken, so that they hear why they are refused)."""
    parts = subject.split(".")
    if len(parts) in (3, 4) and parts[:2] == ["pipeline", "results"]:
        return parse_job_id(parts[-1])
    return None


def pipeline_from_result_subject(subject: str) -> str | None:
    """The pipeline of `pipeline.results.<pipeline>.<job_id>` (None for the older `pipeline.results.<job_id>`)."""
    parts = subject.split(".")
    return parts[2] if len(parts) == 4 else None


def task_msg_id(job_id: int, image_id: str) -> str:
    return f"{job_id}:{image_id}"


# ---- Redis keys -------------------------------------------------------------------------------------
REDIS_PREFIX = "jetpipe"


def job_pending_key(job_id: int) -> str:
    """SET of image ids whose outcome has not been counted yet."""
    return f"{REDIS_PREFIX}:job:{job_id}:pending"


def job_failed_key(job_id: int) -> str:
    """SET of image ids counted as failed."""
    return f"{REDIS_PREFIX}:job:{job_id}:failed"


def job_counts_key(job_id: int) -> str:
    """HASH total, captures, detections, classifications, ready (1 once fully initialised)."""
    return f"{REDIS_PREFIX}:job:{job_id}:counts"


#: `SCAN` pattern of every job's counts hash (the zombie sweep finds jobs whose state outlived them).
JOB_COUNTS_PATTERN = f"{REDIS_PREFIX}:job:*:counts"


def job_id_from_counts_key(key: str) -> int:
    return int(key.split(":")[2])


def job_keys(job_id: int) -> tuple[str, str, str]:
    return job_pending_key(job_id), job_failed_key(job_id), job_counts_key(job_id)


def rebuild_lock_key(job_id: int) -> str:
    """Held while one process rebuilds the job's state from the database."""
    return f"{REDIS_PREFIX}:lock:rebuild:{job_id}"


def drain_lock_key(job_id: int, lane: int) -> str:
    """Held while one process saves the results of one lane of the job from the inbox (one drainer per
    lane at a time)."""
    return f"{REDIS_PREFIX}:lock:drain:{job_id}:{lane}"


def drain_again_key(job_id: int, lane: int) -> str:
    """Set by a drain request that found the lane's drainer busy: that drainer looks at the lane once more."""
    return f"{REDIS_PREFIX}:drain-again:{job_id}:{lane}"


def drain_blocked_key(job_id: int) -> str:
    """Set by a drainer that left a lane whose oldest result waits for an earlier one in another lane:
    whoever saves results of the job next has the lanes looked at again."""
    return f"{REDIS_PREFIX}:drain-blocked:{job_id}"


def slot_wait_key(job_id: int) -> str:
    """Set (for an hour) when a job waiting for a free job slot last said so in its log."""
    return f"{REDIS_PREFIX}:slot-wait:{job_id}"


#: Sorted set of the jobs waiting for a free job slot, scored by job id: the oldest is woken first.
SLOT_WAITERS_KEY = f"{REDIS_PREFIX}:slot-waiters"


def slot_look_key(job_id: int) -> str:
    """Set while a delayed run_job is due to look for a free job slot for the job (one at a time)."""
    return f"{REDIS_PREFIX}:slot-look:{job_id}"


def crash_delivery_key(message_id: str) -> str:
    """Counter of deliveries of one Dramatiq message (poison-message guard)."""
    return f"{REDIS_PREFIX}:deliveries:{message_id}"


#: Dramatiq namespace for the broker's keys.
DRAMATIQ_NAMESPACE = "jetpipe-dramatiq"


def dramatiq_queue_key(queue: str) -> str:
    """LIST of the message ids waiting in one of the broker's queues."""
    return f"{DRAMATIQ_NAMESPACE}:{queue}"


def dramatiq_wake_key(queue: str) -> str:
    """LIST of wake tokens: one pushed per message sent to `queue`, popped by an idle consumer waiting on it."""
    return f"{DRAMATIQ_NAMESPACE}:{queue}.wake"


def dead_letter_keys(queue: str) -> tuple[str, str]:
    """The broker's dead letters of one queue: a ZSET of message ids by time of death, and a HASH of the messages."""
    base = f"{DRAMATIQ_NAMESPACE}:{queue}.XQ"
    return base, f"{base}.msgs"

# ---- Dramatiq queues and actors ------------------------------------------------------------------------
JOBS_QUEUE = "jobs"
RESULTS_QUEUE = "results"

#: Actor names. The core sends messages by these names (pipeline.infra.broker.send) and never imports actors/.
RUN_JOB = "run_job"
PROCESS_PIPELINE_RESULT = "process_pipeline_result"
PROCESS_TASK_ADVISORY = "process_task_advisory"
JOBS_HEALTH_CHECK = "jobs_health_check"

#: The queue of each actor (the actor declares the same one; a test checks that they agree).
DELIVER_WEBHOOKS = "deliver_webhooks"
#: Held while a deliver_webhooks message is queued or running: the sweeps of many workers send one at a time.
WEBHOOKS_SENDING_KEY = f"{REDIS_PREFIX}:webhooks:sending"
ACTOR_QUEUES = {
    RUN_JOB: JOBS_QUEUE,
    DELIVER_WEBHOOKS: JOBS_QUEUE,
    JOBS_HEALTH_CHECK: JOBS_QUEUE,
    PROCESS_PIPELINE_RESULT: RESULTS_QUEUE,
    PROCESS_TASK_ADVISORY: RESULTS_QUEUE,
}


def parse_ack_subject(reply: str) -> tuple[str, str, int, int] | None:
    """(stream, consumer, num_delivered, stream_seq) of a JetStream ACK subject (v1 or v2), else None."""
    tokens = reply.split(".")
    if tokens[:2] != ["$JS", "ACK"]:
        return None
    try:
        if len(tokens) == 9:
            return tokens[2], tokens[3], int(tokens[4]), int(tokens[5])
        if len(tokens) >= 11:
            return tokens[4], tokens[5], int(tokens[6]), int(tokens[7])
    except ValueError:
        return None
    return None


def task_replies(header: str | None) -> list[str]:
    """The reply subjects in a `Pipeline-Task-Reply` header: one, or several separated by commas or spaces
    (a result message covering several images names each image's task), duplicates dropped."""
    if not header:
        return []
    return list(dict.fromkeys(header.replace(",", " ").split()))


def join_task_replies(replies: Iterable[str]) -> str:
    """The `Pipeline-Task-Reply` value naming several tasks (the inverse of `task_replies`)."""
    return ",".join(replies)


def task_tokens(header: str | None) -> list[str]:
    """The task tokens in a `Pipeline-Task-Token` header (separated by commas or spaces), duplicates dropped."""
    return task_replies(header)


def reply_belongs_to_job(reply: str, job_id: int) -> bool:
    """True iff `reply` is an ACK subject of the job's own consumer on a tasks stream (job consumers are
    named by job, which exists once)."""
    parsed = parse_ack_subject(reply)
    return parsed is not None and is_tasks_stream(parsed[0]) and parsed[1] == job_consumer(job_id)


def gateway_leases_key(job_id: int) -> str:
    """HASH of the job's tasks the HTTP gateway handed out: reply subject -> "<holder>\\n<task token>"."""
    return f"{REDIS_PREFIX}:gateway:leases:{job_id}"


def periodic_slot_key(name: str, slot: int) -> str:
    """Claimed by the one scheduler that sends `name` for time slot `slot` (leaderless, SET NX)."""
    return f"{REDIS_PREFIX}:periodic:{name}:{slot}"


def periodic_lock_key(name: str) -> str:
    """Held while one run of `name` is in progress (no overlapping runs)."""
    return f"{REDIS_PREFIX}:lock:{name}"


def worker_presence_key(identity: str) -> str:
    """JSON of one live worker process (host:pid) and what it can reach; expires when it stops announcing."""
    return f"{REDIS_PREFIX}:worker:{identity}"


#: HASH identity -> JSON {at, since} of every worker seen lately; a clean shutdown removes its entry, so one
#: whose `at` is old and that no longer announces itself vanished (its host lost, or it was killed).
WORKERS_SEEN_KEY = f"{REDIS_PREFIX}:workers:seen"


def service_presence_key(name: str) -> str:
    """HASH of one HTTP processing service (by its token's name): its last request and what it holds."""
    return f"{REDIS_PREFIX}:service:{name}"


#: The web server's own secret signing login cookies (shared by its processes; tells nothing of the tokens).
WEB_SESSION_SECRET_KEY = f"{REDIS_PREFIX}:web:session-secret"


def web_session_revoked_key(session_id: str) -> str:
    """Set when a login session is logged out; expires when the session would have."""
    return f"{REDIS_PREFIX}:web:revoked:{session_id}"


#: The secret signing the web server's links to local images (pipeline/web/image_links.py).
IMAGE_LINK_SECRET_KEY = f"{REDIS_PREFIX}:web:image-link-secret"

#: JSON of the last jobs_health_check result, for `cli.py health`.
HEALTH_LAST_KEY = f"{REDIS_PREFIX}:health:last"
