"""No re-processing: a new job over images that an earlier job of the same pipeline version has already
processed reuses their saved results instead of sending them to a service again.

An image's results are saved per image and pipeline (its detections belong to the image, made by the
pipeline's algorithms), so a reused image needs nothing copied: the new job's row for it is written
`processed`, with the counts of the earlier job's row and `reused_from` naming that job, and no task is
published for it. Its export then holds the same detections, marked with the job they came from.

- Same version: the pipeline's version (`PipelineSpec.fingerprint`: what it declares) when the earlier job was
  made equals the current one. A pipeline registered again with another algorithm set or version starts
  over: its next job processes everything.
- Same image: the same URL (`s3://bucket/key`, `https://…`, `file://…`), and for an object listed from object
  storage the same ETag (an object replaced under its key is processed again). A file or a web image replaced
  under the same URL is not noticed: make that job with reuse off (`enqueue-job --no-reuse`, `reuse: false`).
- Only images saved `processed` are reused; failed ones are processed again.
"""

from __future__ import annotations

import datetime as dt
from typing import NamedTuple

from models import ImageStatus, Job, JobImage, select_in


class Earlier(NamedTuple):
    """An earlier job's saved outcome of an image: what the new job's row for it copies."""

    job_id: int
    detections: int
    classifications: int
    etag: str | None  # the ETag its object had for that job (None: none known)


def earlier_results(pipeline_id: int, version: str | None, image_ids: list[int], *,
                    before_job: int) -> dict[int, Earlier]:
    """For each of `image_ids` that a job of the pipeline at `version` made before `before_job` saved as
    processed: the latest such job's outcome. Nothing without a version."""
    if version is None or not image_ids:
        return {}
    rows = select_in('SELECT ji.image_id, ji.job_id, ji.detections, ji.classifications, ji.etag FROM "job_image" ji '
                     'JOIN "job" j ON j.id = ji.job_id WHERE ji.status = %s AND j.pipeline_id = %s '
                     'AND j.pipeline_version = %s AND j.id < %s AND ji.image_id IN ({in})',
                     image_ids, params=(ImageStatus.PROCESSED, pipeline_id, version, before_job))
    found: dict[int, Earlier] = {}
    for image_id, job_id, detections, classifications, etag in rows:
        if image_id not in found or job_id > found[image_id].job_id:
            found[image_id] = Earlier(job_id, detections or 0, classifications or 0, etag)
    return found


def same_content(earlier: Earlier | None, etag: str | None) -> Earlier | None:
    """`earlier` if it saw the image as it is now (the same ETag, or none known either time); else None."""
    return earlier if earlier is not None and earlier.etag == etag else None


#: The columns of a new job's image rows, in the order `job_image_row` gives their values.
JOB_IMAGE_FIELDS = ("job", "image", "meta", "etag", "status", "detections", "classifications", "reused_from",
                    "updated_at")
REUSED_FROM = JOB_IMAGE_FIELDS.index("reused_from")


def job_image_row(job: Job, image_id: int, meta: str | None, etag: str | None, earlier: Earlier | None,
                  now: dt.datetime | str) -> tuple[object, ...]:
    """The new job's row for an image (JOB_IMAGE_FIELDS): pending, or processed with an earlier job's outcome."""
    if earlier is None:
        return (job.id, image_id, meta, etag, ImageStatus.PENDING, 0, 0, None, now)
    return (job.id, image_id, meta, etag, ImageStatus.PROCESSED, earlier.detections, earlier.classifications,
            earlier.job_id, now)


def reused_count(job_id: int) -> int:
    return JobImage.select().where((JobImage.job == job_id) & JobImage.reused_from.is_null(False)).count()
