"""Pictures of a job's images for the gallery: a thumbnail (or a screen-sized picture) of an image, made with
Pillow from the local file or, for a remote image, from its URL, and kept in a disk cache.

Bounded: a source larger than MAX_SOURCE_BYTES or with more pixels than Pillow's decompression-bomb limit is
refused, a remote read gives up after FETCH_TIMEOUT_S, and the image policy (pipeline/core/image_policy.py)
decides which images may be read at all. The picture's header `X-Image-Size: <width>x<height>` gives the
original's size, the space its detection boxes are in.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import logging
import os
import tempfile
from pathlib import Path
from urllib.parse import unquote, urlsplit

import httpx
from PIL import Image, UnidentifiedImageError

from pipeline.core.image_policy import UNREADABLE, ImagePolicy
from pipeline.errors import ConfigError, NotFound
from pipeline.infra import objectstore
from pipeline.settings import get_settings, shown_url

log = logging.getLogger(__name__)

#: Longest side of a thumbnail and of the full view, in pixels.
SIZES = {"thumbnail": 320, "full": 1600}
MAX_SOURCE_BYTES = 50 * 1024 * 1024
FETCH_TIMEOUT_S = 10.0
CACHE_DIR = Path(tempfile.gettempdir()) / "jetpipe-pictures"


@dataclasses.dataclass(frozen=True)
class Picture:
    jpeg: bytes
    width: int  # of the original image
    height: int


def picture(url: str, kind: str, policy: ImagePolicy, *, cache_dir: Path = CACHE_DIR) -> Picture:
    """The `kind` ("thumbnail" or "full") picture of the image at `url`; NotFound (saying only that the image
    cannot be read, as everywhere in jetpipe) when it may not or cannot be read."""
    key = hashlib.sha256(f"{kind}\0{url}".encode()).hexdigest()
    cached, meta = cache_dir / f"{key}.jpg", cache_dir / f"{key}.json"
    try:
        size = json.loads(meta.read_text())
        return Picture(cached.read_bytes(), size["width"], size["height"])
    except (OSError, ValueError, KeyError):
        pass
    made = _make(_source(url, policy), SIZES[kind], url)
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
        partial = cached.with_suffix(f".{os.getpid()}.tmp")
        partial.write_bytes(made.jpeg)
        partial.replace(cached)
        meta.write_text(json.dumps({"width": made.width, "height": made.height}))
    except OSError as exc:  # a full or read-only disk costs the cache, not the picture
        log.warning("pictures: cannot cache a picture in %s: %s", cache_dir, exc)
    return made


def _source(url: str, policy: ImagePolicy) -> bytes:
    if policy.refuses_read(url):
        raise NotFound(UNREADABLE)
    parts = urlsplit(url)
    try:
        if parts.scheme == "s3":  # read through a presigned URL, as the services do
            url, parts = (signed := objectstore.presigned(url, get_settings())), urlsplit(signed)
        if parts.scheme == "file":
            path = unquote(parts.path)
            if os.path.getsize(path) > MAX_SOURCE_BYTES:
                raise NotFound(f"{UNREADABLE}: larger than {MAX_SOURCE_BYTES // 2**20} MB")
            return Path(path).read_bytes()
        if parts.scheme in ("http", "https"):
            with httpx.stream("GET", url, timeout=FETCH_TIMEOUT_S, follow_redirects=False) as response:
                response.raise_for_status()
                data = bytearray()
                for chunk in response.iter_bytes():
                    data += chunk
                    if len(data) > MAX_SOURCE_BYTES:
                        raise NotFound(f"{UNREADABLE}: larger than {MAX_SOURCE_BYTES // 2**20} MB")
                return bytes(data)
    except (OSError, httpx.HTTPError, ConfigError) as exc:
        # the reason for the operator, not the page
        log.info("pictures: cannot read %s: %s", shown_url(url)[:200], exc)
        raise NotFound(UNREADABLE) from None
    raise NotFound(UNREADABLE)


def _make(data: bytes, longest: int, url: str) -> Picture:
    try:
        with Image.open(io.BytesIO(data)) as image:  # Image.MAX_IMAGE_PIXELS refuses decompression bombs
            width, height = image.size
            image.draft("RGB", (longest, longest))  # a JPEG is decoded at a fraction of its size: fast
            shown = image.convert("RGB")
            shown.thumbnail((longest, longest))
            out = io.BytesIO()
            shown.save(out, "JPEG", quality=85, optimize=True)
    except (UnidentifiedImageError, Image.DecompressionBombError, OSError, ValueError) as exc:
        log.info("pictures: cannot decode %s: %s", url[:200], exc)
        raise NotFound(f"{UNREADABLE}: not an image jetpipe can decode") from None
    return Picture(out.getvalue(), width, height)
