"""Tables: pipelines and algorithms, images, jobs and their per-image outcomes, results, and job logs."""

from __future__ import annotations

from collections.abc import Sequence
from enum import StrEnum, nonmember

import peewee

from models.db import BaseModel, JSONField, utcnow


class Reference(peewee.ForeignKeyField):
    """A reference from a result row (detections, classifications: the largest tables, written a thousand rows at a
    time) to a row the application never deletes (a source image, a detection, an algorithm, the job that first
    saved a detection), which the database neither checks row by row nor indexes for the check.

    A checked foreign key costs a lookup and a row lock (KEY SHARE) on the referenced row for every row written:
    1,500 detections took 1,500 locks on their job's row, which every progress write also updates, and the checks
    cost more than the insert itself; the checks of a detection's image and a classification's detection were
    still a third of what saving a result cost the server (docs/performance.md). The saving already knows these
    rows exist: a result's algorithms are looked up among its pipeline's before any row is made, its images are
    the job's (their rows locked in the same transaction), the job is the one being saved, and a classification
    takes its detection's id from the detection row itself, in the statement that inserts it.
    peewee still follows it (joins, `delete_instance(recursive=True)` deletes or clears the rows that name one).
    """

    def __init__(self, model: type[peewee.Model], **kwargs: object) -> None:
        super().__init__(model, index=False, **kwargs)
        self.deferred = True  # peewee's create_table writes no constraint for a deferred foreign key


class JobStatus(StrEnum):
    """A job's status, stored as its value. The groups (TERMINAL, RUNNING, ALL) are tuples of the values:
    `status in JobStatus.TERMINAL` holds for a member and for the plain string read from the database."""

    CREATED = "CREATED"
    PENDING = "PENDING"
    STARTED = "STARTED"
    CANCELING = "CANCELING"
    SUCCESS = "SUCCESS"
    FAILURE = "FAILURE"
    REVOKED = "REVOKED"

    TERMINAL = nonmember((SUCCESS, FAILURE, REVOKED))
    RUNNING = nonmember((CREATED, PENDING, STARTED, CANCELING))
    ALL = nonmember((CREATED, PENDING, STARTED, CANCELING, SUCCESS, FAILURE, REVOKED))


class DispatchMode(StrEnum):
    ASYNC_API = "async_api"  # tasks go through NATS to external processing services
    INTERNAL = "internal"    # the worker runs the pipeline's Python handler itself

    ALL = nonmember((ASYNC_API, INTERNAL))


class ImageStatus(StrEnum):
    PENDING = "pending"
    PROCESSED = "processed"
    FAILED = "failed"


class Pipeline(BaseModel):
    slug = peewee.CharField(max_length=100, unique=True)
    name = peewee.CharField(max_length=255)
    created_at = peewee.DateTimeField(default=utcnow)
    #: The processing service (its gateway token's name) that registered it through /api/v2; None: an
    #: operator did. A service may change only the pipelines it registered.
    registered_by = peewee.CharField(max_length=255, null=True)
    #: Its version as last registered (`PipelineSpec.fingerprint`); None: registered before versions.
    version = peewee.CharField(max_length=32, null=True)


class Algorithm(BaseModel):
    # no index of its own: (pipeline, key) serves it (an index that another begins with is written for nothing)
    pipeline = peewee.ForeignKeyField(Pipeline, backref="algorithms", on_delete="CASCADE", index=False)
    key = peewee.CharField(max_length=100)
    name = peewee.CharField(max_length=255)
    task_type = peewee.CharField(max_length=20)  # pipeline.schemas.TASK_TYPES (detection, localization, ...)

    class Meta:
        indexes = ((("pipeline", "key"), True),)


class SourceImage(BaseModel):
    url = peewee.TextField(unique=True)
    created_at = peewee.DateTimeField(default=utcnow)


class Project(BaseModel):
    """Who a job belongs to: a lab, a season, a tenant. Projects share the processing services by `weight`
    (pipeline/fairshare.py); a token may be limited to some projects (pipeline/web/auth.py)."""

    name = peewee.CharField(max_length=100, unique=True)
    weight = peewee.FloatField(default=1.0)
    created_at = peewee.DateTimeField(default=utcnow)


class Job(BaseModel):
    name = peewee.CharField(max_length=255)
    #: Always set for a new job; None only in a database made before projects, until `create_schema` runs.
    project = peewee.ForeignKeyField(Project, backref="jobs", null=True, on_delete="RESTRICT")
    project_id: int | None
    #: Higher first: services serve a pipeline's jobs of the highest priority that have tasks before any other.
    priority = peewee.IntegerField(default=0, null=True)
    pipeline = peewee.ForeignKeyField(Pipeline, backref="jobs", on_delete="RESTRICT")
    pipeline_id: int  # the foreign key's column, as peewee exposes it (declared for type checkers)
    dispatch_mode = peewee.CharField(max_length=20, default=DispatchMode.ASYNC_API)
    status = peewee.CharField(max_length=20, default=JobStatus.CREATED, index=True)
    progress = JSONField(default=dict)
    total_images = peewee.IntegerField(default=0)
    error = peewee.TextField(null=True)  # why the job failed or was revoked
    created_at = peewee.DateTimeField(default=utcnow)
    updated_at = peewee.DateTimeField(default=utcnow)
    started_at = peewee.DateTimeField(null=True)
    dispatched_at = peewee.DateTimeField(null=True)  # every task published; failures are deferred from here
    dispatch_cursor = peewee.IntegerField(default=0)  # JobImage.id up to which tasks are published
    finished_at = peewee.DateTimeField(null=True)
    last_progress_at = peewee.DateTimeField(null=True)
    cleaned_up_at = peewee.DateTimeField(null=True)
    #: Seconds after dispatch within which some service must pull a task (None: PIPELINE_JOB_PICKUP_TIMEOUT).
    pickup_timeout_s = peewee.FloatField(null=True)
    #: When the whole job must have ended: its images still pending then are failed (None: no deadline).
    deadline_at = peewee.DateTimeField(null=True)
    #: Key of the job's task tokens (pipeline/core/task_tokens.py); never shown. None: made before task tokens.
    task_secret = peewee.CharField(max_length=64, null=True)
    #: Since when the job is paused (it hands out no new tasks); None: not paused.
    paused_at = peewee.DateTimeField(null=True)
    pause_reason = peewee.TextField(null=True)
    #: Seconds the job spent paused before its current pause: kept out of every idle-time verdict.
    paused_s = peewee.FloatField(null=True)
    #: The ended job whose failed images this job runs again (`retry-failed`); None: a job of its own.
    retry_of = peewee.IntegerField(null=True, index=True)
    #: Where to POST the job's summary when it ends (pipeline/core/webhooks.py), and the secret that signs it
    #: (never shown).
    notify_url = peewee.TextField(null=True)
    notify_secret = peewee.CharField(max_length=255, null=True)
    #: The events `notify_url` is told of, comma-separated (job.started, job.failing, job.ended); None: job.ended.
    notify_events = peewee.CharField(max_length=100, null=True)
    #: The W3C `traceparent` of the job's enqueue span, the root every later span of the job joins
    #: (pipeline/infra/tracing.py); None where traces are off.
    trace_parent = peewee.CharField(max_length=64, null=True)
    #: The pipeline's version when the job was made; its images saved as processed are reused by a later job of
    #: the same version (pipeline/core/reuse.py). None: reuse nothing, and be reused by nothing.
    pipeline_version = peewee.CharField(max_length=32, null=True)
    #: How many of its images came with results saved by an earlier job (none were dispatched).
    reused_images = peewee.IntegerField(null=True)

    @property
    def is_terminal(self) -> bool:
        return self.status in JobStatus.TERMINAL

    @property
    def is_paused(self) -> bool:
        return self.paused_at is not None

    @property
    def project_name(self) -> str:
        """Its project's name (read with the job when the query joins Project; `default` for a job made
        before projects)."""
        project = self.project if self.project_id else None
        return project.name if project is not None else "default"

    @property
    def project_weight(self) -> float:
        project = self.project if self.project_id else None
        return project.weight if project is not None else 1.0


class JobImage(BaseModel):
    # no index of their own: (job, image) and (image, status) serve them
    job = peewee.ForeignKeyField(Job, backref="images", on_delete="CASCADE", index=False)
    image = peewee.ForeignKeyField(SourceImage, on_delete="CASCADE", index=False)
    status = peewee.CharField(max_length=12, default=ImageStatus.PENDING)
    detections = peewee.IntegerField(default=0)
    classifications = peewee.IntegerField(default=0)
    error = peewee.TextField(null=True)
    updated_at = peewee.DateTimeField(default=utcnow)
    #: What the job's manifest says of the image, JSON (pipeline/core/manifests.py); None: nothing.
    meta = peewee.TextField(null=True)
    #: The earlier job whose saved results this image reuses (it was not processed again); None: its own.
    reused_from = peewee.BigIntegerField(null=True)
    #: The ETag its object had when it was listed for the job (object storage); None: none known. An image is
    #: reused only from a job that saw the same one.
    etag = peewee.CharField(max_length=100, null=True)

    class Meta:
        indexes = (
            (("job", "image"), True),  # one outcome per image per job
            (("image", "status"), False),  # an image's saved outcomes across jobs: what a new job may reuse
            (("job", "status", "id"), False),  # the pending images of a job, in dispatch order
        )


class TaskRun(BaseModel):
    """Tasks of a job that the tasks stream stored at consecutive sequences: the task stored at `first_seq + k`
    is that of the k-th image of `image_ids`. A result's reply subject and an advisory name a task by its
    sequence; this is jetpipe's own record of which image that task was for (the stream may no longer hold it).

    Written once per dispatch round from its PubAcks (usually one row per round: a few rows for a job, where a
    sequence per image row meant rewriting every image row and its indexes), and never changed.
    """

    job = peewee.ForeignKeyField(Job, on_delete="CASCADE", index=False)  # (job, last_seq, first_seq) serves it
    first_seq = peewee.BigIntegerField()
    last_seq = peewee.BigIntegerField()
    image_ids = peewee.TextField()  # the images' ids, decimal, comma-separated, in sequence order

    class Meta:
        # the runs of a job that reach a sequence, in order; the first one holds it if it starts at or before it
        indexes = ((("job", "last_seq", "first_seq"), True),)

    @staticmethod
    def rows_for(job_id: int, image_ids: Sequence[str], seqs: Sequence[int]) -> list[tuple[int, int, int, str]]:
        """(job, first_seq, last_seq, image_ids) rows of the runs of consecutive sequences among these tasks
        (`image_ids[k]`'s task stored at `seqs[k]`; another job's tasks published meanwhile break a run)."""
        rows: list[tuple[int, int, int, str]] = []
        run: list[str] = []
        first = last = 0
        for seq, image_id in sorted(zip(seqs, image_ids, strict=True)):
            if run and seq == last + 1:
                run.append(image_id)
            else:
                if run:
                    rows.append((job_id, first, last, ",".join(run)))
                first, run = seq, [image_id]
            last = seq
        if run:
            rows.append((job_id, first, last, ",".join(run)))
        return rows


class Detection(BaseModel):
    image = Reference(SourceImage, backref="detections")  # (image, ...)
    algorithm = Reference(Algorithm)
    #: "x1,y1,x2,y2" with fixed precision, or "" for the "processed, nothing found" marker. Backs dedupe.
    bbox_key = peewee.CharField(max_length=100)
    x1 = peewee.FloatField(null=True)
    y1 = peewee.FloatField(null=True)
    x2 = peewee.FloatField(null=True)
    y2 = peewee.FloatField(null=True)
    score = peewee.FloatField(null=True)
    crop_url = peewee.TextField(null=True)
    job = Reference(Job, null=True)  # the job that first saved it
    created_at = peewee.DateTimeField(default=utcnow)

    class Meta:
        indexes = ((("image", "algorithm", "bbox_key"), True),)

    @property
    def is_null_marker(self) -> bool:
        return self.bbox_key == ""


class Classification(BaseModel):
    detection = Reference(Detection, backref="classifications")  # (detection, algorithm) serves it
    algorithm = Reference(Algorithm)
    taxon = peewee.CharField(max_length=255)
    score = peewee.FloatField()
    scores = JSONField(null=True)
    labels = JSONField(null=True)
    terminal = peewee.BooleanField(default=True)
    created_at = peewee.DateTimeField(default=utcnow)

    class Meta:
        indexes = ((("detection", "algorithm"), True),)


class ResultInbox(BaseModel):
    """A result message taken from the results stream and not yet saved: the durable hand-over between
    NATS and the database. A row is deleted in the transaction that saves its result, so a result is
    saved once, and nothing between the stream and that commit can drop it (invariant 11)."""

    job_id = peewee.BigIntegerField()  # no foreign key: a result may name a job that does not exist
    #: "<results stream seq>:<publish time ns>" of the message (a redelivered message is taken once).
    source = peewee.CharField(max_length=64, unique=True)
    stream_seq = peewee.BigIntegerField(null=True)  # None for a result handed over without NATS
    body = peewee.BlobField()
    task_replies = peewee.TextField(default="")  # the Pipeline-Task-Reply header as received
    received_at = peewee.DateTimeField(default=utcnow)
    images = peewee.IntegerField(null=True)  # how many images it names (results taken, not yet saved)
    #: Failed attempts to save it (an error that is not an outage); parked after PIPELINE_RESULT_SAVE_ATTEMPTS.
    attempts = peewee.IntegerField(null=True)
    next_attempt_at = peewee.DateTimeField(null=True)  # not tried again before this (backoff)
    last_error = peewee.TextField(null=True)
    #: What its task tokens proved when it was taken (pipeline/core/inbox.py, JSON): {"images": [...]} or
    #: {"refused": "why"}. None: taken for a job made before task tokens.
    proof = peewee.TextField(null=True)
    #: Picks the lane its job's results are saved in (pipeline/core/saving.py): a hash of the smallest image
    #: id it names. None (it names no image): lane 0.
    lane_key = peewee.IntegerField(null=True)
    #: The smallest and the largest image id it names: a result is saved after every earlier result of its
    #: job in another lane whose range overlaps its own (the first result to arrive decides an image).
    first_image = peewee.BigIntegerField(null=True)
    last_image = peewee.BigIntegerField(null=True)
    #: The `traceparent` of the span that took it (pipeline/infra/tracing.py): its save joins that trace.
    trace_parent = peewee.CharField(max_length=64, null=True)

    class Meta:
        indexes = ((("job_id", "id"), False),)


class ParkedResult(BaseModel):
    """A result message that could not be saved after its attempts (a bug, not an outage): its images
    were failed with the reason, and it is kept here for inspection and replay (`cli.py parked`)."""

    job_id = peewee.BigIntegerField(index=True)
    source = peewee.CharField(max_length=64)
    stream_seq = peewee.BigIntegerField(null=True)
    body = peewee.BlobField()
    task_replies = peewee.TextField(default="")
    received_at = peewee.DateTimeField()
    parked_at = peewee.DateTimeField(default=utcnow)
    attempts = peewee.IntegerField()
    error = peewee.TextField()
    image_ids = peewee.TextField(default="")  # the images it named, comma-separated (failed when parked)
    proof = peewee.TextField(null=True)  # what its task tokens proved when it was taken (ResultInbox.proof)


class WebhookDelivery(BaseModel):
    """A webhook to send (pipeline/core/webhooks.py): written with the job's terminal transition, deleted never
    (its delivery, attempts and last error stay visible)."""

    job_id = peewee.BigIntegerField()  # (job_id, url, event) serves it
    url = peewee.TextField()
    secret = peewee.CharField(max_length=255)
    event = peewee.CharField(max_length=40)
    body = peewee.TextField()
    created_at = peewee.DateTimeField(default=utcnow)
    next_attempt_at = peewee.DateTimeField(null=True, index=True)  # None: nothing more to do (sent or given up)
    attempts = peewee.IntegerField(null=True)
    last_status = peewee.IntegerField(null=True)
    last_error = peewee.TextField(null=True)
    delivered_at = peewee.DateTimeField(null=True)
    gave_up_at = peewee.DateTimeField(null=True)

    class Meta:
        indexes = ((("job_id", "url", "event"), True),)  # one delivery per job, endpoint and event


class JobLog(BaseModel):
    job = peewee.ForeignKeyField(Job, backref="logs", on_delete="CASCADE")
    level = peewee.CharField(max_length=10)
    message = peewee.TextField()
    created_at = peewee.DateTimeField(default=utcnow, index=True)


ALL_MODELS = (Pipeline, Algorithm, SourceImage, Project, Job, JobImage, TaskRun, Detection, Classification,
              ResultInbox, ParkedResult, JobLog, WebhookDelivery)
