"""Lost images (invariant 8): an image whose task JetStream gave up on becomes failed, with a reason.

Both paths end here: the MAX_DELIVERIES / MSG_TERMINATED advisory (fast, seconds) and the periodic
`lost_images` check (safety net, for jobs idle past PIPELINE_STALLED_JOBS_MAX_MINUTES). Failing goes
through the database arbiter and the same atomic Redis gate as results, so a late result and the
reconciler can never both count an image, and duplicate advisories change nothing.

"Lost" means no result was ever received (invariant 8): while results of the job published before
JetStream gave up are still waiting to be saved (in the results stream or the inbox), the verdict waits
for them, however long the workers take. A valid result that arrives after the verdict supersedes it
while the job runs (`pipeline/core/result_rows.py`).
"""

from __future__ import annotations

import json
import logging
from enum import StrEnum

from models import Job, JobStatus
from pipeline import names
from pipeline.core import inbox, task_runs
from pipeline.core.joblog import job_log
from pipeline.core.outcomes import finish, load_job, settle
from pipeline.core.result_rows import fail_images
from pipeline.infra.jobstate import Outcome
from pipeline.infra.runtime import Runtime

log = logging.getLogger(__name__)


def fail_lost(runtime: Runtime, job: Job, image_ids: list[str], reason: str) -> tuple[list[Outcome], str]:
    """Fail the still-pending `image_ids` of a running job with `reason`, count them, end the job if done.

    Returns the settled outcomes and the job's status afterwards.
    """
    outcomes, _, written = settle(runtime, job, lambda: fail_images(job.id, image_ids, reason))
    if not outcomes:
        return [], job.status
    finish(runtime, job, written)
    return outcomes, written.status


def _image_of_task(job_id: int, stream_seq: int) -> str | None:
    """The image whose task was stored at `stream_seq`, from jetpipe's own record (`task_runs`): a terminated
    task is gone from the stream, and the reason a TERM carries is its sender's text, never trusted to name an
    image (invariant 12)."""
    return task_runs.images_of(job_id, [stream_seq]).get(stream_seq)


class Verdict(StrEnum):
    """What an advisory came to (also the `outcome` label of the advisories metric)."""

    FAILED = "failed"  # the image failed as lost
    DEFERRED = "deferred"  # results published before the give-up are still being saved: ask again later
    ALREADY_SETTLED = "already_settled"  # its image had its outcome already
    MALFORMED = "malformed"
    NOT_OURS = "not_ours"
    JOB_ENDED = "job_ended"
    UNKNOWN_IMAGE = "unknown_image"  # left to the periodic check


def handle_advisory(runtime: Runtime, body: str, results_seq: int | None = None) -> tuple[Verdict, int | None]:
    """Fail the image behind a MAX_DELIVERIES or MSG_TERMINATED advisory; returns the verdict and, for
    DEFERRED (ask again later, passing it back), the results stream sequence the verdict waits for."""
    try:
        advisory = json.loads(body)
        job_id = names.job_id_from_consumer(advisory["consumer"])
        stream_seq = int(advisory["stream_seq"])
        kind = advisory.get("type", "")
    except (ValueError, KeyError, TypeError):
        log.error("advisory dropped: not a JetStream consumer advisory: %.200s", body)
        return Verdict.MALFORMED, None
    stream = str(advisory.get("stream", ""))
    if job_id is None or not names.is_tasks_stream(stream):
        return Verdict.NOT_OURS, None
    job = load_job(job_id)
    if job is None or job.status in JobStatus.TERMINAL:
        return Verdict.JOB_ENDED, None
    if kind.endswith("max_deliver"):
        task = runtime.tasks.task_at(stream, stream_seq)
        if task is not None and task[0] != job_id:  # checked against the task itself, never taken on trust
            log.error("job=%s advisory names stream_seq=%s, a task of job %s: ignored", job_id, stream_seq, task[0])
            return Verdict.NOT_OURS, None
        image_id = task[1] if task else None
        reason = (f"lost: JetStream gave up after {advisory.get('deliveries', '?')} deliveries "
                  f"(max_deliver={runtime.settings.nats_max_deliver}) without a result")
    else:
        image_id = _image_of_task(job_id, stream_seq)
        # jetpipe terminates a task only after failing its image: a pending image's task was ended by its holder
        said = str(advisory.get("reason") or "")[:300]
        reason = f"task terminated by a processing service (its reason: {said!r})" if said else \
            "task terminated by a processing service (no reason given)"
    if image_id is None:
        log.warning("job=%s advisory for stream_seq=%s names no image we can find; left to the periodic check",
                    job_id, stream_seq)
        return Verdict.UNKNOWN_IMAGE, None
    first_look = results_seq is None
    if first_look:
        results_seq = runtime.tasks.results_last_seq()  # every result published before the give-up is <= this
    if inbox.outstanding(runtime, job_id, published_up_to=results_seq):
        log.log(logging.INFO if first_look else logging.DEBUG, "job=%s image=%s verdict deferred: results "
                "published before JetStream gave up on its task are still being saved (%s)", job_id, image_id,
                kind or "advisory")
        return Verdict.DEFERRED, results_seq
    outcomes, status = fail_lost(runtime, job, [image_id], reason)
    if kind.endswith("max_deliver"):
        runtime.tasks.delete_task(stream, stream_seq)  # nothing will ever deliver it again: leave nothing in NATS
    if any(o.failed for o in outcomes):
        job_log(job_id, logging.WARNING, f"image failed: {reason}", image_id=image_id)
        return Verdict.FAILED, None
    return Verdict.ALREADY_SETTLED, None
