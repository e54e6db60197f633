"""A job's results out of the database: every image of the job with its detections and their
classifications (and what its manifest said of it), as JSON lines (one image a line) or CSV (one classification
a row; the manifest's deployment, timestamp, latitude and longitude as columns, its other fields as JSON),
streamed.

Memory stays constant however large the job: images are read in pages by key (no OFFSET, no server-side
cursor held open between pages), at most IMAGES_PER_PAGE images and, going by the counts saved with each
image, about DETECTIONS_PER_PAGE detections (one image at least); each page's detections and
classifications are read with it. `cli.py results` and `GET /api/v1/jobs/{id}/results` both call `export`.

Detections belong to images, not jobs (an image in two jobs of one pipeline is processed once), so a job's
results are the detections of its processed images made by its pipeline's algorithms.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Iterator, Sequence

from models import Job, database, select_in
from pipeline.core.manifests import STANDARD
from pipeline.errors import NotFound, UserInputError

FORMATS = ("jsonl", "csv")
#: Binary formats, written to a file: Parquet (a row per classification, as the CSV), and Camtrap DP (a zip).
FILE_FORMATS = ("parquet", "camtrap-dp")
#: Images, and detections, read per page (an image's detections and classifications come with it).
IMAGES_PER_PAGE = 500
DETECTIONS_PER_PAGE = 5_000
#: CSV rows handed on at a time.
CSV_ROWS_PER_CHUNK = 1_000
CSV_COLUMNS = ("image_id", "image_url", "image_status", "error", "detector", "x1", "y1", "x2", "y2", "score",
               "crop_url", "classifier", "taxon", "taxon_score", "terminal", "deployment", "timestamp", "latitude",
               "longitude", "metadata", "reused_from")
MEDIA_TYPES = {"jsonl": "application/x-ndjson", "csv": "text/csv; charset=utf-8",
               "parquet": "application/vnd.apache.parquet", "camtrap-dp": "application/zip"}
#: File name endings of the exports.
ENDINGS = {"jsonl": "jsonl", "csv": "csv", "parquet": "parquet", "camtrap-dp": "camtrap-dp.zip"}

_IMAGES = ('SELECT ji.id, ji.image_id, si.url, ji.status, ji.error, ji.meta, ji.reused_from, ji.detections '
           'FROM "job_image" ji '
           'JOIN "source_image" si ON si.id = ji.image_id '
           'WHERE ji.job_id = %s AND ji.id > %s ORDER BY ji.id LIMIT %s')
_DETECTIONS = ('SELECT d.id, d.image_id, a.key, d.x1, d.y1, d.x2, d.y2, d.score, d.crop_url, d.bbox_key '
               'FROM "detection" d JOIN "algorithm" a ON a.id = d.algorithm_id '
               'WHERE a.pipeline_id = %s AND d.image_id IN ({in}) ORDER BY d.image_id, d.id')
_CLASSIFICATIONS = ('SELECT c.detection_id, a.key, c.taxon, c.score, c.terminal, c.labels, c.scores '
                    'FROM "classification" c JOIN "algorithm" a ON a.id = c.algorithm_id '
                    'WHERE c.detection_id IN ({in}) ORDER BY c.detection_id, c.id')


def export(job_id: int, fmt: str) -> Iterator[str]:
    """The job's results as text chunks in `fmt` (jsonl or csv); raises NotFound or UserInputError first,
    before anything is produced."""
    if fmt not in FORMATS:
        raise UserInputError(f"unknown results format {fmt!r} (use {' or '.join(FORMATS)})")
    return (_jsonl if fmt == "jsonl" else _csv)(job_to_export(job_id))


def job_to_export(job_id: int) -> Job:
    job = Job.get_or_none(Job.id == job_id)
    if job is None:
        raise NotFound(f"no job {job_id}")
    return job


def write_parquet(job_id: int, path: str) -> int:
    """Write the job's results to `path` as Parquet (the CSV's rows, typed); how many rows. NotFound first."""
    return _parquet(job_to_export(job_id), path)


#: Parquet column types, in CSV_COLUMNS' order.
PARQUET_TYPES = ("int64", "string", "string", "string", "string", "float64", "float64", "float64", "float64",
                 "float64", "string", "string", "string", "float64", "bool_", "string", "string", "float64", "float64",
                 "string", "int64")
#: Rows per Parquet row group: what is held in memory at once (a million rows export in about the CSV's memory,
#: plus pyarrow's libraries).
PARQUET_ROWS_PER_GROUP = 10_000


def _parquet(job: Job, path: str) -> int:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pool = pa.default_memory_pool()
    schema = pa.schema([(name, getattr(pa, kind)()) for name, kind in zip(CSV_COLUMNS, PARQUET_TYPES, strict=True)])
    written = 0
    with pq.ParquetWriter(path, schema, compression="zstd") as writer:
        group: list[tuple] = []
        for row in flat_rows(job):
            group.append(row)
            if len(group) >= PARQUET_ROWS_PER_GROUP:
                writer.write_table(_table(pa, schema, group))
                written += len(group)
                group = []
                pool.release_unused()  # (pyarrow's allocator keeps freed memory for a while otherwise)
        if group or not written:
            writer.write_table(_table(pa, schema, group))
            written += len(group)
    return written


def _table(pa, schema, rows: list[tuple]):
    columns: list[tuple] = list(zip(*rows, strict=True)) if rows else [() for _ in CSV_COLUMNS]
    return pa.table([pa.array(list(values), type=field.type) for values, field in zip(columns, schema, strict=True)],
                    schema=schema)


def images(job: Job) -> Iterator[dict]:
    """Each image of the job, in order, with its detections (each with its classifications)."""
    after = 0
    while True:
        rows = _page(_query(_IMAGES, (job.id, after, IMAGES_PER_PAGE)))
        if not rows:
            return
        after = rows[-1][0]
        processed = [image_id for _, image_id, _, status, *_ in rows if status == "processed"]
        detections = _detections(job.pipeline_id, processed) if processed else {}
        for _, image_id, url, status, error, meta, reused_from, _ in rows:
            yield {"image_id": str(image_id), "url": url, "status": status, "error": error,
                   "metadata": json.loads(meta) if meta else None, "reused_from": reused_from,
                   "detections": detections.get(image_id, [])}


def _page(rows: list[tuple]) -> list[tuple]:
    """The first rows whose detections add up to DETECTIONS_PER_PAGE (the first row at least)."""
    total = 0
    for n, row in enumerate(rows):
        total += row[-1] or 0
        if total > DETECTIONS_PER_PAGE and n > 0:
            return rows[:n]
    return rows


def _detections(pipeline_id: int, image_ids: list[int]) -> dict[int, list[dict]]:
    found: dict[int, list[dict]] = {}
    by_id: dict[int, dict] = {}
    for det_id, image_id, key, x1, y1, x2, y2, score, crop_url, bbox_key in _query_in(
            _DETECTIONS, image_ids, params=(pipeline_id,)):
        if bbox_key == "":
            found.setdefault(image_id, [])  # the "processed, nothing found" marker: no detection
            continue
        detection = {"algorithm": key, "bbox": {"x1": x1, "y1": y1, "x2": x2, "y2": y2}, "score": score,
                     "crop_url": crop_url, "classifications": []}
        found.setdefault(image_id, []).append(detection)
        by_id[det_id] = detection
    if by_id:
        for det_id, key, taxon, score, terminal, labels, scores in _query_in(_CLASSIFICATIONS, list(by_id)):
            by_id[det_id]["classifications"].append({
                "algorithm": key, "taxon": taxon, "score": score, "terminal": bool(terminal),
                "labels": json.loads(labels) if labels else None, "scores": json.loads(scores) if scores else None})
    return found


def _jsonl(job: Job) -> Iterator[str]:
    for image in images(job):
        yield json.dumps(image, ensure_ascii=False, separators=(",", ":")) + "\n"


#: A cell starting with one of these is a formula to a spreadsheet (CSV injection: `=HYPERLINK(…)`,
#: `=cmd|…`): such text from a processing service is written with a leading apostrophe, which spreadsheets
#: show as text. Numbers are written as they are; JSON lines keep every value exact.
FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")


def _cell(value: object) -> object:
    return "'" + value if isinstance(value, str) and value.startswith(FORMULA_STARTS) else value


class _SafeWriter:
    """csv.writer whose text cells can never run as spreadsheet formulas."""

    def __init__(self, buffer: io.StringIO):
        self._writer = csv.writer(buffer, lineterminator="\n")

    def writerow(self, row: Sequence[object]) -> None:
        self._writer.writerow([_cell(value) for value in row])


def flat_rows(job: Job) -> Iterator[tuple]:
    """The job's results a row per classification (per detection without one, per image without a detection), in
    CSV_COLUMNS' order, None where a value is missing."""
    for image in images(job):
        head = (int(image["image_id"]), image["url"], image["status"], image["error"])
        meta = dict(image["metadata"] or {})
        tail = (*(meta.pop(name, None) for name in STANDARD), json.dumps(meta, ensure_ascii=False) if meta else None,
                image["reused_from"])
        if not image["detections"]:
            yield head + (None,) * (len(CSV_COLUMNS) - len(head) - len(tail)) + tail
        for detection in image["detections"]:
            box = detection["bbox"]
            row = head + (detection["algorithm"], box["x1"], box["y1"], box["x2"], box["y2"], detection["score"],
                          detection["crop_url"])
            for c in detection["classifications"] or [None]:
                yield row + ((None,) * 4 if c is None else
                             (c["algorithm"], c["taxon"], c["score"], bool(c["terminal"]))) + tail


def _csv(job: Job) -> Iterator[str]:
    buffer = io.StringIO()
    writer = _SafeWriter(buffer)
    writer.writerow(CSV_COLUMNS)
    for n, row in enumerate(flat_rows(job), 1):
        writer.writerow(["" if v is None else str(v).lower() if isinstance(v, bool) else v for v in row])
        if n % CSV_ROWS_PER_CHUNK == 0:
            yield buffer.getvalue()
            buffer.seek(0)
            buffer.truncate()
    yield buffer.getvalue()


def _blank(value) -> object:
    return "" if value is None else value


def _query(sql: str, params: tuple) -> list[tuple]:
    mark = database.obj.param
    return database.execute_sql(sql.replace("%s", mark), params).fetchall()


def _query_in(sql: str, values: list, *, params: tuple = ()) -> list[tuple]:
    return select_in(sql, values, params=params)
