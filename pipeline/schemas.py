"""Wire schemas of the processing-service contract (docs/processing-services.md): tasks, results,
pipeline registration, validated with msgspec."""

from __future__ import annotations

import hashlib
import json
from typing import Any

import msgspec

from pipeline.errors import BadResult, UserInputError

#: The largest result one image may have (bytes), in one message or, when it is too large for one, as a result
#: object (docs/processing-services.md, "Big results").
MAX_RESULT_OBJECT_BYTES = 64 * 1024 * 1024


# The wire types are `gc=False`: immutable, holding only text, numbers and lists of one another, they are never
# part of a reference cycle, and the garbage collector need not track them. A 50-image result is about 900 of
# them; tracked, the collections their allocation set off cost a worker more than reading them (docs/performance.md).
class Task(msgspec.Struct, frozen=True, gc=False):
    """One image to process: the body of a message on `pipeline.tasks.<pipeline>.<job_id>`."""

    job_id: int
    image_id: str
    image_url: str
    pipeline: str
    #: Proves its holder was given this task: a result names it in `Pipeline-Task-Token` (invariant 12).
    task_token: str = ""


class BBox(msgspec.Struct, frozen=True, gc=False):
    x1: float
    y1: float
    x2: float
    y2: float

    def key(self) -> str:
        """Canonical text of the box; the dedupe key of a detection (with image and algorithm)."""
        return f"{self.x1:.2f},{self.y1:.2f},{self.x2:.2f},{self.y2:.2f}"


class AlgorithmRef(msgspec.Struct, frozen=True, gc=False):
    key: str
    name: str = ""


class ClassificationOut(msgspec.Struct, frozen=True, gc=False):
    taxon: str
    algorithm: AlgorithmRef
    scores: list[float] = []
    labels: list[str] = []
    terminal: bool = True

    @property
    def score(self) -> float:
        return max(self.scores) if self.scores else 0.0


class DetectionOut(msgspec.Struct, frozen=True, gc=False):
    source_image_id: str
    algorithm: AlgorithmRef
    bbox: BBox | None = None  # None: "processed, nothing found"
    score: float | None = None
    crop_image_url: str | None = None
    classifications: list[ClassificationOut] = []


class SourceImageRef(msgspec.Struct, frozen=True, gc=False):
    id: str
    url: str = ""


class SuccessResult(msgspec.Struct, frozen=True, gc=False):
    pipeline: str
    source_images: list[SourceImageRef]
    detections: list[DetectionOut] = []
    total_time: float | None = None


class ErrorResult(msgspec.Struct, frozen=True, gc=False):
    error: str
    image_id: str | None = None


Result = SuccessResult | ErrorResult

#: Images one success result may cover (a batch); its tasks are named in one Pipeline-Task-Reply header.
MAX_IMAGES_PER_RESULT = 1000
#: Detections one result message may carry (all its images together).
MAX_DETECTIONS_PER_RESULT = 50_000

_json = msgspec.json.Decoder()
_success_decoder = msgspec.json.Decoder(SuccessResult)
_encoder = msgspec.json.Encoder()


def _normalize(data: dict[str, Any]) -> dict[str, Any]:
    """Accept integer image ids (`"id": 345`) as the strings the contract specifies, and the reference
    system's result as it is: the taxon under `classification`, `null` for an empty list of labels, scores
    or classifications. (Its other fields — `algorithms`, `errors`, `logits`, `inference_time`,
    `timestamp` — are ignored like any unknown field.) Anything of the wrong shape is left for the schema
    to refuse."""
    for image in _listed(data.get("source_images")):
        if isinstance(image, dict) and isinstance(image.get("id"), int):
            image["id"] = str(image["id"])
    for det in _listed(data.get("detections")):
        if not isinstance(det, dict):
            continue
        if isinstance(det.get("source_image_id"), int):
            det["source_image_id"] = str(det["source_image_id"])
        if det.get("classifications") is None and "classifications" in det:
            det["classifications"] = []
        for c in _listed(det.get("classifications")):
            if isinstance(c, dict):
                if "taxon" not in c and "classification" in c:
                    c["taxon"] = c["classification"]
                for field in ("labels", "scores"):
                    if field in c and c[field] is None:
                        c[field] = []
    if isinstance(data.get("image_id"), int):
        data["image_id"] = str(data["image_id"])
    return data


def _listed(value: object) -> list[Any]:
    """`value` if it is a JSON array, else nothing to normalise (`"detections": true` is the schema's to
    refuse, not a TypeError here)."""
    return value if isinstance(value, list) else []


def decode_result(body: bytes) -> Result:
    """The result in `body`; raises BadResult with a precise reason when it is not one."""
    if b"\\u0000" in body:  # JSON's escape of NUL: PostgreSQL stores no NUL in text, SQLite would cut it
        raise BadResult("result contains a NUL character (\\u0000), which text cannot hold")
    result: Result = _success_as_specified(body) or _result_read_leniently(body)
    if isinstance(result, SuccessResult):
        if not result.source_images:
            raise BadResult("success result lists no source_images")
        if len(result.source_images) > MAX_IMAGES_PER_RESULT:
            raise BadResult(f"a result may cover at most {MAX_IMAGES_PER_RESULT} images, this one lists "
                            f"{len(result.source_images)}")
        if len(result.detections) > MAX_DETECTIONS_PER_RESULT:
            raise BadResult(f"a result may carry at most {MAX_DETECTIONS_PER_RESULT} detections, this one carries "
                            f"{len(result.detections)}", image_ids=tuple(i.id for i in result.source_images))
        known = {image.id for image in result.source_images}
        strays = sorted({d.source_image_id for d in result.detections} - known)
        if strays:
            raise BadResult(f"detections name images not in source_images: {strays}",
                            image_ids=tuple(sorted(known)))
    return result


def _success_as_specified(body: bytes) -> SuccessResult | None:
    """A success result written exactly as the contract specifies (string ids, lists where lists go), read in
    one pass; None for anything else (an error result, a reference system's result, a malformed one), which
    `_result_read_leniently` reads or explains. A body naming "error" anywhere, or holding an escape (which
    could spell it), goes the lenient way: only there does a top-level `error` make it an error result."""
    if b'"error"' in body or b"\\" in body:
        return None
    try:
        return _success_decoder.decode(body)
    except (msgspec.DecodeError, RecursionError):
        return None


def _result_read_leniently(body: bytes) -> Result:
    """The result in `body` after normalising what the contract tolerates (`_normalize`); BadResult saying
    precisely why when it is not one."""
    try:
        data = _json.decode(body)
    except msgspec.DecodeError as exc:
        raise BadResult(f"result is not valid JSON: {exc}") from None
    except RecursionError:
        raise BadResult("result is nested too deeply to read") from None
    if not isinstance(data, dict):
        raise BadResult(f"result must be a JSON object, got {type(data).__name__}")
    data = _normalize(data)
    kind: type[SuccessResult] | type[ErrorResult] = ErrorResult if "error" in data else SuccessResult
    try:
        result: Result = msgspec.convert(data, kind)
    except msgspec.ValidationError as exc:
        image_id = data.get("image_id") if kind is ErrorResult else None
        raise BadResult(f"result does not match the {kind.__name__} schema: {exc}",
                        image_ids=(str(image_id),) if image_id else ()) from None
    return result


def encode(obj: msgspec.Struct) -> bytes:
    return _encoder.encode(obj)


def decode_task(body: bytes) -> Task:
    return _task_decoder.decode(body)


#: The reference system's algorithm task types. A result's detections must come from an algorithm of a
#: detection type; classifications may name any declared algorithm.
DETECTION_TASK_TYPES = ("detection", "localization", "segmentation")
TASK_TYPES = (*DETECTION_TASK_TYPES, "classification", "tagging", "embedding", "tracking", "regression",
              "captioning", "generation", "translation", "summarization", "question_answering",
              "depth_estimation", "pose_estimation", "size_estimation", "post_processing", "other", "unknown")


class AlgorithmSpec(msgspec.Struct, frozen=True):
    key: str
    name: str
    task_type: str = "unknown"
    #: The algorithm's own version (a model's weights, its category map), if its service says: part of the
    #: pipeline's version, which decides whether earlier results are reused.
    version: str | int | None = None


class PipelineSpec(msgspec.Struct, frozen=True):
    """A pipeline registration file (`cli.py pipeline register FILE.json`)."""

    slug: str
    name: str
    algorithms: list[AlgorithmSpec]
    version: str | int | None = None

    def fingerprint(self) -> str:
        """The pipeline's version as jetpipe knows it: a hash of what it declares (its version and each
        algorithm's key, task type and version; not names, which are for people). Results saved by a job of
        the same fingerprint are reused by a later job over the same images (pipeline/core/reuse.py)."""
        declared = [self.version, sorted([a.key, a.task_type, a.version] for a in self.algorithms)]
        return hashlib.sha256(json.dumps(declared, default=str).encode()).hexdigest()[:16]


def is_valid_slug(slug: str) -> bool:
    """Letters, digits, '-' or '_': a slug is a NATS subject token and part of a stream's name."""
    return bool(slug) and slug.isascii() and all(c.isalnum() or c in "-_" for c in slug)


def decode_pipeline_spec(body: bytes, *, source: str) -> PipelineSpec:
    try:
        spec = _pipeline_decoder.decode(body)
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        raise UserInputError(f"{source}: not a valid pipeline file: {exc}") from None
    if not is_valid_slug(spec.slug):
        raise UserInputError(f"{source}: slug {spec.slug!r} must be letters, digits, '-' or '_' "
                             "(it becomes a NATS subject token)")
    unknown = sorted({a.task_type for a in spec.algorithms} - set(TASK_TYPES))
    if unknown:
        raise UserInputError(f"{source}: unknown task_type {unknown[0]!r} (one of {', '.join(TASK_TYPES)})")
    if not any(a.task_type in DETECTION_TASK_TYPES for a in spec.algorithms):
        raise UserInputError(f"{source}: a pipeline needs at least one detection algorithm (task_type "
                             f"{', '.join(DETECTION_TASK_TYPES)})")
    keys = [a.key for a in spec.algorithms]
    if len(set(keys)) != len(keys):
        raise UserInputError(f"{source}: algorithm keys must be unique, got {keys}")
    return spec


# msgspec builds a Struct type's decoding information on first use and caches it on the class. Two worker
# threads doing that at once for the same type crashed a worker process (a segmentation fault inside
# msgspec while another thread evaluated the type's annotations). Building a decoder builds it for the
# type and every type inside it, here at import, where only one thread runs; `msgspec.convert` of results
# then finds it built.
_task_decoder = msgspec.json.Decoder(Task)
_pipeline_decoder = msgspec.json.Decoder(PipelineSpec)
_results_built = [msgspec.json.Decoder(kind) for kind in (SuccessResult, ErrorResult)]
