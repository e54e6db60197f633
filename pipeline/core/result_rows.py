"""Saving results, idempotent by unique constraints; a constant number of statements per result message
(whatever its number of images), inside the caller's transaction when there is one.

The first result that decides an image wins: rows are written only for images still pending (or failed
as lost, a verdict a late result supersedes), so a replay, a duplicate or a second result with other
boxes adds nothing, and an image that has failed never gets rows (counters equal rows). Inserts are also
INSERT ... ON CONFLICT DO NOTHING on the unique keys of Detection and Classification, so concurrent
duplicates cannot double a row. A replay reports the outcome the database already holds.
"""

from __future__ import annotations

import dataclasses
import logging
from collections import defaultdict
from collections.abc import Iterable
from typing import Any, NamedTuple

import msgspec

from models import (
    Algorithm,
    Detection,
    ImageStatus,
    Job,
    database,
    execute_in,
    insert_ignoring_duplicates,
    is_postgres,
    select_in,
    tuples,
    utcnow,
    utcnow_stored,
    write_transaction,
)
from models.db import insert_staged
from pipeline.errors import BadResult
from pipeline.infra.jobstate import Outcome
from pipeline.schemas import DETECTION_TASK_TYPES, DetectionOut, SuccessResult
from pipeline.settings import redact_text

log = logging.getLogger(__name__)

#: Reasons of images failed because no result came (pipeline/core/lost.py); a result arriving later supersedes them.
LOST_PREFIX = "lost:"
#: Reasons of images whose result could not be saved (pipeline/core/unsaved.py); a replay supersedes them too.
UNSAVED_PREFIX = "result could not be saved:"
#: Longest failure reason stored on an image.
MAX_REASON_CHARS = 2000
#: The kinds of failure reasons (the `reason` label of `jetpipe_image_failures_total`), by how a reason begins.
FAILURE_KINDS = (("processing service error:", "service_error"), ("bad result", "bad_result"), (LOST_PREFIX, "lost"),
                 ("task terminated by a processing service", "terminated"), ("deadline passed", "deadline"),
                 ("no processing service picked up", "not_picked_up"), (UNSAVED_PREFIX, "unsaved"))


def failure_kind(reason: str) -> str:
    """What kind of failure `reason` is: one of FAILURE_KINDS' kinds, else `other`."""
    return next((kind for prefix, kind in FAILURE_KINDS if reason.startswith(prefix)), "other")
#: Longest taxon name (the column's size, on every database).
MAX_TAXON_CHARS = 255


class AlgorithmInfo(NamedTuple):
    """A declared algorithm, as results are checked against it."""

    id: int
    task_type: str


_algorithms: dict[int, dict[str, AlgorithmInfo]] = {}


def pipeline_algorithms(pipeline_id: int, *, refresh: bool = False) -> dict[str, AlgorithmInfo]:
    """The pipeline's declared algorithms by key (cached per process; refreshed on a miss)."""
    if refresh or pipeline_id not in _algorithms:
        _algorithms[pipeline_id] = {key: AlgorithmInfo(pk, task_type) for pk, key, task_type in tuples(Algorithm.select(
            Algorithm.id, Algorithm.key, Algorithm.task_type).where(Algorithm.pipeline == pipeline_id))}
    return _algorithms[pipeline_id]


def _resolve_algorithms(pipeline_id: int, slug: str, keys: set[str],
                        image_ids: tuple[str, ...]) -> dict[str, AlgorithmInfo]:
    known = pipeline_algorithms(pipeline_id)
    if not keys <= known.keys():
        known = pipeline_algorithms(pipeline_id, refresh=True)
    undeclared = sorted(keys - known.keys())
    if undeclared:
        raise BadResult(f"result names undeclared algorithm(s) {undeclared} for pipeline {slug!r}",
                        image_ids=image_ids)
    return known


def canonical_image_id(image_id: object) -> str | None:
    """The image id as the database spells it ("0345" -> "345"), or None if it cannot be one."""
    text = str(image_id)
    if text.isascii() and text.isdigit() and len(text) <= 18:
        return str(int(text))
    return None


class ImageRow(NamedTuple):
    """An image's outcome in a job, as the database holds it (a JobImage row, read without the model)."""

    id: int
    image_id: int
    status: str
    detections: int
    classifications: int
    error: str | None


def job_images(job_id: int, image_ids: Iterable[object]) -> dict[str, ImageRow]:
    """The job's rows for these images, locked until the transaction ends (the outcome arbiter) in the order
    of their primary key, as every writer of image rows locks them: two writers of overlapping images wait
    for each other, never each for the other."""
    numeric = sorted({int(c) for c in map(canonical_image_id, image_ids) if c is not None})
    found = select_in('SELECT id, image_id, status, detections, classifications, error FROM "job_image" '
                      "WHERE job_id = %s AND image_id IN ({in}) ORDER BY id", numeric, params=(job_id,), lock=True)
    return {str(row[1]): ImageRow(*row) for row in found}


def is_supersedable(row: ImageRow) -> bool:
    """True for an image failed because no result came, or because its result could not be saved: a valid
    result arriving later (or replayed) supersedes that."""
    return row.status == ImageStatus.FAILED and (row.error or "").startswith((LOST_PREFIX, UNSAVED_PREFIX))


def _settled_outcome(row: ImageRow) -> Outcome:
    """The outcome an image already has in the database; a replay or late result reports this one."""
    if row.status == ImageStatus.FAILED:
        return Outcome(str(row.image_id), failed=True, captures=0)
    return Outcome(str(row.image_id), captures=1, detections=row.detections,
                   classifications=row.classifications)


def _rows_of(job_id: int, image_ids: tuple[str, ...]) -> dict[str, ImageRow]:
    rows = job_images(job_id, image_ids)
    missing = [i for i in image_ids if i not in rows]
    if missing:
        raise BadResult(f"images {missing} are not part of job {job_id}",
                        image_ids=tuple(i for i in image_ids if i in rows))
    return rows


@dataclasses.dataclass
class PreparedResult:
    """A validated success result turned into rows, ready to save: everything but the database work, so
    the part that holds the write lock (SQLite) or row locks (PostgreSQL) is only statements."""

    job_id: int
    image_ids: tuple[str, ...]
    detections: list[tuple[Any, ...]]  # Detection rows, in DETECTION_FIELDS order
    #: (image id, classification row in the columns of `_CLASSIFICATIONS_STAGED`: its detection named by key)
    classifications: list[tuple[str, tuple[Any, ...]]]
    counts: dict[str, list[int]]  # image id -> [detections, classifications]

    @classmethod
    def combine(cls, parts: list[PreparedResult]) -> PreparedResult:
        """One result of several of the same job, saved in one go; an image named by several parts takes
        the rows of the first (the order the results arrived in)."""
        if len(parts) == 1:
            return parts[0]
        owner: dict[str, int] = {}
        for n, part in enumerate(parts):
            for image_id in part.image_ids:
                owner.setdefault(image_id, n)
        return cls(
            parts[0].job_id, tuple(owner),
            [row for n, part in enumerate(parts) for row in part.detections if owner[str(row[0])] == n],
            [c for n, part in enumerate(parts) for c in part.classifications if owner[c[0]] == n],
            {image_id: parts[n].counts[image_id] for image_id, n in owner.items()})

    def restricted_to(self, image_ids: Iterable[str]) -> PreparedResult:
        """This result without the images not in `image_ids` (decided by another message)."""
        keep = set(image_ids)
        if keep >= set(self.image_ids):
            return self
        return PreparedResult(self.job_id, tuple(i for i in self.image_ids if i in keep),
                              [r for r in self.detections if str(r[0]) in keep],
                              [c for c in self.classifications if c[0] in keep],
                              {i: n for i, n in self.counts.items() if i in keep})

    def save(self, rows: dict[str, ImageRow] | None = None) -> list[Outcome]:
        """Write the rows and outcomes of the images this result decides (inside the caller's transaction,
        if any); every image's outcome. `rows`: the images' locked rows, if the caller already read them."""
        with write_transaction():
            rows = rows if rows is not None else _rows_of(self.job_id, self.image_ids)
            deciding = [i for i in self.image_ids if rows[i].status == ImageStatus.PENDING or is_supersedable(rows[i])]
            decided = set(deciding)
            detections = [r for r in self.detections if str(r[0]) in decided]
            insert_ignoring_duplicates(Detection, DETECTION_FIELDS, detections)
            classifications = [row for image_id, row in self.classifications if image_id in decided]
            _insert_classifications(classifications)
            by_counts: dict[tuple[int, int], list[int]] = defaultdict(list)  # one UPDATE per distinct pair
            for image_id in deciding:
                n_det, n_cls = self.counts[image_id]
                by_counts[(n_det, n_cls)].append(rows[image_id].id)
            now = utcnow()
            for (n_det, n_cls), row_ids in by_counts.items():
                execute_in('UPDATE "job_image" SET status = %s, detections = %s, classifications = %s, error = NULL, '
                           "updated_at = %s WHERE id IN ({in})", row_ids,
                           params=(ImageStatus.PROCESSED, n_det, n_cls, now))
        return [Outcome(i, captures=1, detections=self.counts[i][0], classifications=self.counts[i][1],
                        supersedes=rows[i].status == ImageStatus.FAILED)
                if i in decided else _settled_outcome(rows[i]) for i in self.image_ids]


DETECTION_FIELDS = ("image", "algorithm", "bbox_key", "x1", "y1", "x2", "y2", "score", "crop_url", "job",
                    "created_at")

#: Each classification row finds its detection's id by the detection's key (image, algorithm, box) as it is
#: inserted: no read of the detections' ids into Python between the two inserts.
_CLASSIFICATIONS_SQLITE = (
    'INSERT INTO "classification" (detection_id, algorithm_id, taxon, score, scores, labels, terminal, created_at) '
    'SELECT d.id, ?, ?, ?, ?, ?, ?, ? FROM "detection" AS d '
    "WHERE d.image_id = ? AND d.algorithm_id = ? AND d.bbox_key = ? ON CONFLICT DO NOTHING")
_CLASSIFICATIONS_STAGED = (  # the rows as `_insert_classifications` hands them over, each with its detection's key
    "SELECT c.algorithm_id, c.taxon, c.score, c.scores, c.labels, c.terminal, c.created_at, d.image_id, "
    'd.algorithm_id AS detector_id, d.bbox_key FROM "classification" AS c, "detection" AS d')
_CLASSIFICATIONS_POSTGRES = (
    'INSERT INTO "classification" (detection_id, algorithm_id, taxon, score, scores, labels, terminal, created_at) '
    # a lookup per row, by the detections' unique index (a join could be planned as a scan of the whole table)
    'SELECT (SELECT d.id FROM "detection" AS d WHERE d.image_id = v.image_id AND d.algorithm_id = v.detector_id '
    "AND d.bbox_key = v.bbox_key), v.algorithm_id, v.taxon, v.score, v.scores, v.labels, v.terminal, v.created_at "
    "FROM staged AS v ON CONFLICT DO NOTHING")


def _insert_classifications(rows: list[tuple[Any, ...]]) -> None:
    """Insert classification rows (the columns of `_CLASSIFICATIONS_STAGED`), each finding its detection by the
    detection's key; a row already there is left as it is."""
    if not rows:
        return
    cursor = database.obj.cursor()
    if is_postgres():
        insert_staged(cursor, _CLASSIFICATIONS_STAGED, rows, _CLASSIFICATIONS_POSTGRES)
    else:
        cursor.executemany(_CLASSIFICATIONS_SQLITE, rows)


_encode_json = msgspec.json.Encoder().encode


def _to_json(value: list[Any]) -> str:
    return _encode_json(value).decode()


def prepare_result(job: Job, result: SuccessResult) -> PreparedResult:
    """Validate a success result against the job's pipeline and build its rows; raises BadResult."""
    checked = {img.id: canonical_image_id(img.id) for img in result.source_images}
    malformed = sorted(raw for raw, image_id in checked.items() if image_id is None)
    canonical = {raw: image_id for raw, image_id in checked.items() if image_id is not None}
    if malformed:
        raise BadResult(f"image ids must be decimal numbers, got {malformed[:5]}",
                        image_ids=tuple(dict.fromkeys(canonical.values())))
    image_ids = tuple(dict.fromkeys(canonical.values()))
    job_id, pipeline_id, slug = job.id, job.pipeline_id, job.pipeline.slug
    if result.pipeline != slug:
        raise BadResult(f"result is for pipeline {result.pipeline!r}, job {job_id} runs {slug!r}",
                        image_ids=image_ids)
    keys = {d.algorithm.key for d in result.detections}
    keys |= {c.algorithm.key for d in result.detections for c in d.classifications}
    algorithms = _resolve_algorithms(pipeline_id, slug, keys, image_ids)
    bad_types = sorted({d.algorithm.key for d in result.detections
                        if algorithms[d.algorithm.key].task_type not in DETECTION_TASK_TYPES})
    if bad_types:
        raise BadResult(f"algorithm(s) {bad_types} are not detection algorithms", image_ids=image_ids)
    marker = next((key for key, a in algorithms.items() if a.task_type in DETECTION_TASK_TYPES), None)
    long_taxa = sorted({c.taxon[:40] for d in result.detections for c in d.classifications
                        if len(c.taxon) > MAX_TAXON_CHARS})
    if long_taxa:
        raise BadResult(f"a taxon is at most {MAX_TAXON_CHARS} characters; got one starting {long_taxa[0]!r}",
                        image_ids=image_ids)

    # Deduplicate within the message the way the database will (same image, algorithm, box).
    detections: dict[tuple[str, str, str], DetectionOut | None] = {}
    for given in result.detections:
        detections.setdefault((canonical[given.source_image_id], given.algorithm.key,
                               given.bbox.key() if given.bbox else ""), given)
    found = {image_id for image_id, _, _ in detections}
    for image_id in image_ids:  # "processed, nothing found" marker for images without any detection
        if marker and image_id not in found:
            detections[(image_id, marker, "")] = None

    counts: dict[str, list[int]] = {i: [0, 0] for i in image_ids}
    now = utcnow_stored()
    det_rows: list[tuple[Any, ...]] = []
    cls_rows: list[tuple[str, tuple[Any, ...]]] = []
    for (image_id, algo_key, bbox_key), det in detections.items():
        algorithm_id = algorithms[algo_key].id
        if det is None:  # the "processed, nothing found" marker
            det_rows.append((int(image_id), algorithm_id, bbox_key, None, None, None, None, None, None, job_id, now))
            continue
        box = (det.bbox.x1, det.bbox.y1, det.bbox.x2, det.bbox.y2) if det.bbox else (None,) * 4
        det_rows.append((int(image_id), algorithm_id, bbox_key, *box, det.score, det.crop_image_url, job_id, now))
        if det.bbox:
            counts[image_id][0] += 1
        seen_algorithms: set[str] = set()
        for c in det.classifications:
            if c.algorithm.key in seen_algorithms:
                continue  # one classification per detection and algorithm
            seen_algorithms.add(c.algorithm.key)
            cls_rows.append((image_id, (
                algorithms[c.algorithm.key].id, c.taxon, c.score, _to_json(c.scores),
                _to_json(c.labels) if c.labels else "[]", c.terminal, now, int(image_id), algorithm_id, bbox_key)))
            if bbox_key:
                counts[image_id][1] += 1
    return PreparedResult(job_id, image_ids, det_rows, cls_rows, counts)


def save_result(job: Job, result: SuccessResult) -> list[Outcome]:
    """Write a success result's detections, classifications and image outcomes; returns per-image counts."""
    return prepare_result(job, result).save()


def fail_images(job_id: int, image_ids: Iterable[object], reason: str,
                rows: dict[str, ImageRow] | None = None) -> list[Outcome]:
    """Mark still-pending images of the job failed with `reason`; returns each image's settled outcome.

    An image that already has an outcome keeps it (a saved success is never turned into a failure), and
    its outcome is returned as it stands, so the Redis gate counts what the database holds. Ids that are
    not part of the job are ignored. `rows`: the images' locked rows, if the caller already read them.
    """
    wanted = list(dict.fromkeys(c for c in map(canonical_image_id, image_ids) if c is not None))
    if not wanted:
        return []
    with write_transaction():
        rows = rows if rows is not None else job_images(job_id, wanted)
        pending = [rows[i].id for i in wanted if i in rows and rows[i].status == ImageStatus.PENDING]
        execute_in('UPDATE "job_image" SET status = %s, error = %s, updated_at = %s WHERE id IN ({in})', pending,
                   params=(ImageStatus.FAILED, redact_text(reason)[:MAX_REASON_CHARS].replace("\x00", ""), utcnow()))
    kind = failure_kind(reason)
    return [Outcome(i, failed=True, captures=0, failure=kind) if rows[i].status == ImageStatus.PENDING
            else _settled_outcome(rows[i]) for i in wanted if i in rows]
