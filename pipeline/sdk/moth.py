"""The `moth-demo` pipeline: a real, dependency-light model for the reference processing service.

Synthetic trap images are light sheets with dark moth-like blobs of three shapes. The detector
thresholds the image and finds connected dark components; the classifier names each by size and shape:

    Geometridae   wide, flat wings (elongation >= 1.8)
    Noctuidae     large and round (area >= 380 px)
    Tortricidae   small and round

`generate_images` writes such images with ground truth, so the demo can check every detection.
"""

from __future__ import annotations

import json
import logging
import os
import random
import re
import urllib.error
import urllib.request
from collections import Counter
from io import BytesIO
from urllib.parse import unquote, urlsplit

from PIL import Image, ImageDraw, ImageFilter, UnidentifiedImageError

from pipeline.core.image_policy import UNREADABLE
from pipeline.schemas import (
    AlgorithmRef,
    BBox,
    ClassificationOut,
    DetectionOut,
    SourceImageRef,
    SuccessResult,
    Task,
)
from pipeline.settings import redact

SLUG = "moth-demo"
DETECTOR = AlgorithmRef(key="blob-detector-v1", name="Dark blob detector")
CLASSIFIER = AlgorithmRef(key="moth-shape-v1", name="Moth family by size and shape")
TAXA = ("Noctuidae", "Geometridae", "Tortricidae")

PIPELINE_SPEC = {
    "slug": SLUG,
    "name": "Moth demo (blob detector + shape classifier)",
    "algorithms": [
        {"key": DETECTOR.key, "name": DETECTOR.name, "task_type": "detection"},
        {"key": CLASSIFIER.key, "name": CLASSIFIER.name, "task_type": "classification"},
    ],
}

WIDTH, HEIGHT = 320, 240
DARK_THRESHOLD = 110  # background >= 170, moths <= 70: anything darker than this is moth
MIN_AREA = 20  # px; smaller dark specks are dust
#: (taxon, half-width range, half-height range) of each generated shape.
SHAPES = (("Noctuidae", (13, 17), (12, 16)), ("Geometridae", (20, 26), (6, 9)), ("Tortricidae", (5, 7), (5, 7)))


log = logging.getLogger(__name__)

class ImageUnreadable(Exception):
    """The image could not be fetched or decoded."""


# ---- synthetic data ---------------------------------------------------------------------------------------
def draw_trap_image(rng: random.Random, moths: int) -> tuple[Image.Image, list[dict]]:
    image = Image.new("L", (WIDTH, HEIGHT), 205)
    draw = ImageDraw.Draw(image)
    for _ in range(400):  # faint texture on the sheet, never dark enough to be a moth
        x, y = rng.randrange(WIDTH), rng.randrange(HEIGHT)
        draw.point((x, y), fill=rng.randint(175, 235))
    truth: list[dict] = []
    placed: list[tuple[int, int, int, int]] = []
    attempts = 0
    while len(truth) < moths and attempts < 500:
        attempts += 1
        taxon, (wmin, wmax), (hmin, hmax) = rng.choice(SHAPES)
        rx, ry = rng.randint(wmin, wmax), rng.randint(hmin, hmax)
        if rng.random() < 0.5 and taxon == "Geometridae":
            rx, ry = ry, rx  # resting vertically
        cx, cy = rng.randint(rx + 4, WIDTH - rx - 5), rng.randint(ry + 4, HEIGHT - ry - 5)
        box = (cx - rx, cy - ry, cx + rx, cy + ry)
        if any(box[0] < p[2] + 8 and p[0] < box[2] + 8 and box[1] < p[3] + 8 and p[1] < box[3] + 8 for p in placed):
            continue
        placed.append(box)
        draw.ellipse(box, fill=rng.randint(25, 70))
        truth.append({"taxon": taxon, "bbox": list(box)})
    return image.filter(ImageFilter.SMOOTH), truth


def generate_images(directory: str, count: int, *, seed: int = 7, max_moths: int = 5) -> dict:
    """Write `count` PNG trap images and `ground_truth.json`; returns the ground truth by file name."""
    os.makedirs(directory, exist_ok=True)
    rng = random.Random(seed)
    truth: dict[str, list[dict]] = {}
    for n in range(count):
        name = f"trap-{n:06d}.png"
        image, moths = draw_trap_image(rng, rng.randint(0, max_moths))
        image.save(os.path.join(directory, name), optimize=False, compress_level=1)
        truth[name] = moths
    with open(os.path.join(directory, "ground_truth.json"), "w") as handle:
        json.dump(truth, handle)
    return truth


def summarize_truth(truth: dict) -> dict:
    taxa = Counter(m["taxon"] for moths in truth.values() for m in moths)
    return {"images": len(truth), "detections": sum(taxa.values()), "taxa": dict(taxa)}


# ---- the model --------------------------------------------------------------------------------------------
#: Largest image file the model reads (bytes) and largest image it decodes (pixels): a 13,000 x 13,000
#: image would take gigabytes once decoded, and one URL must not exhaust a service's memory.
MAX_IMAGE_BYTES = 50 * 1024 * 1024
MAX_IMAGE_PIXELS = 40_000_000


def load_image(url: str, *, timeout_s: float = 20.0) -> Image.Image:
    """The image at `url` in grey levels; raises ImageUnreadable for anything it cannot or will not read: a
    file over MAX_IMAGE_BYTES or MAX_IMAGE_PIXELS, or not an image, says so; anything else (a missing file,
    one it may not read, a refused connection, an HTTP error, a bad scheme) is "cannot read the image",
    whatever it was, so that a failure never tells its reader what exists where (the detail goes to this
    process's log)."""
    parts = urlsplit(url)
    try:
        if parts.scheme == "file":
            path = unquote(parts.path)
            if os.path.getsize(path) > MAX_IMAGE_BYTES:
                raise ImageUnreadable(f"image file is larger than {MAX_IMAGE_BYTES} bytes")
            image = Image.open(path)
        elif parts.scheme in ("http", "https"):
            with urllib.request.urlopen(url, timeout=timeout_s) as response:  # noqa: S310 - http(s) only
                data = response.read(MAX_IMAGE_BYTES + 1)
            if len(data) > MAX_IMAGE_BYTES:
                raise ImageUnreadable(f"image download is larger than {MAX_IMAGE_BYTES} bytes")
            image = Image.open(BytesIO(data))
        else:
            raise ValueError(f"unsupported URL scheme {parts.scheme!r}")
        if image.width * image.height > MAX_IMAGE_PIXELS:  # known from the header, before decoding
            raise ImageUnreadable(f"image is {image.width} x {image.height} pixels, more than {MAX_IMAGE_PIXELS}")
        image.load()
    except ImageUnreadable:
        raise
    except urllib.error.HTTPError as exc:
        said = object_storage_answer(url, exc)
        if said:  # a presigned object storage URL: its server's own words are no secret of anyone's network
            raise ImageUnreadable(f"{UNREADABLE}: {said}") from None
        log.info("image not read (%s): HTTP %s", redact(url), exc.code)
        raise ImageUnreadable(UNREADABLE) from None
    except Exception as exc:  # noqa: BLE001 - any decode/IO failure means the same thing to the caller
        # (the reason stays next to the image's URL wherever it is shown: it does not repeat it)
        if isinstance(exc, UnidentifiedImageError):
            raise ImageUnreadable("not an image format the model can decode") from None
        log.info("image not read (%s): %s: %s", redact(url), type(exc).__name__,
                 (exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc))[:200])
        raise ImageUnreadable(UNREADABLE) from None
    return image.convert("L")


#: What an object storage error code means, for an image's failure reason.
S3_CODES = {"NoSuchKey": "the object does not exist", "NoSuchBucket": "the bucket does not exist",
            "AccessDenied": "access denied", "ExpiredToken": "the URL's credentials expired"}


def object_storage_answer(url: str, error: urllib.error.HTTPError) -> str | None:
    """What an S3-compatible server said when a presigned URL (one with `X-Amz-Signature`) was refused:
    `the object storage answered 404 NoSuchKey (the object does not exist)`; None for any other URL."""
    if "X-Amz-Signature=" not in urlsplit(url).query:
        return None
    try:
        body = error.read(4096).decode("utf-8", "replace")
    except OSError:
        body = ""
    code = re.search(r"<Code>([^<]{1,64})</Code>", body)
    message = re.search(r"<Message>([^<]{1,200})</Message>", body)
    name = code.group(1) if code else error.reason or ""
    meaning = (message.group(1) if message and name == "AccessDenied" else None) or S3_CODES.get(name, "")
    return f"the object storage answered {error.code} {name}" + (f" ({meaning})" if meaning else "")


def detect_blobs(image: Image.Image) -> list[tuple[tuple[int, int, int, int], int]]:
    """Connected dark components as ((x1, y1, x2, y2), area), 4-connectivity, specks dropped."""
    width, height = image.size
    mask = image.point(lambda v: 255 if v < DARK_THRESHOLD else 0).tobytes()
    dark = {i for i, v in enumerate(mask) if v}
    blobs = []
    while dark:
        seed = dark.pop()
        stack, pixels = [seed], [seed]
        while stack:
            i = stack.pop()
            x = i % width
            for j in (i - width, i + width, i - 1 if x > 0 else -1, i + 1 if x < width - 1 else -1):
                if j in dark:
                    dark.remove(j)
                    stack.append(j)
                    pixels.append(j)
        if len(pixels) >= MIN_AREA:
            xs = [p % width for p in pixels]
            ys = [p // width for p in pixels]
            blobs.append(((min(xs), min(ys), max(xs) + 1, max(ys) + 1), len(pixels)))
    return sorted(blobs)


def classify_blob(box: tuple[int, int, int, int], area: int) -> tuple[str, list[float]]:
    """(taxon, scores over TAXA) from the blob's elongation and area."""
    w, h = box[2] - box[0], box[3] - box[1]
    elongation = max(w, h) / max(1, min(w, h))
    if elongation >= 1.8:
        taxon = "Geometridae"
    elif area >= 380:
        taxon = "Noctuidae"
    else:
        taxon = "Tortricidae"
    confidence = 0.9 if taxon != "Noctuidae" or area > 500 else 0.75
    rest = (1 - confidence) / (len(TAXA) - 1)
    return taxon, [confidence if t == taxon else round(rest, 4) for t in TAXA]


def process_task(task: Task) -> SuccessResult:
    """Run the moth-demo model on one task's image (raises ImageUnreadable)."""
    image = load_image(task.image_url)
    detections = []
    for box, area in detect_blobs(image):
        taxon, scores = classify_blob(box, area)
        detections.append(DetectionOut(
            source_image_id=task.image_id, algorithm=DETECTOR, bbox=BBox(*map(float, box)),
            score=round(min(1.0, area / 300), 3),
            classifications=[ClassificationOut(taxon=taxon, algorithm=CLASSIFIER, scores=scores,
                                               labels=list(TAXA), terminal=True)]))
    if not detections:
        detections.append(DetectionOut(source_image_id=task.image_id, algorithm=DETECTOR, bbox=None))
    return SuccessResult(pipeline=task.pipeline, source_images=[SourceImageRef(id=task.image_id, url=task.image_url)],
                         detections=detections)
