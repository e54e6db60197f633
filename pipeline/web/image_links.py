"""Signed, expiring links to local image files, so processing services on other machines can read the
images of jobs made from local folders (`--images-dir`, paths): the gateway hands out
`<base>/api/v2/images/<job>/<image>?expires=<unix time>&signature=<hmac>` instead of `file://…`.

A link opens one image of one job, and nothing else: the file served is the one the job's image row names
(no path comes from the request), and the signature (HMAC-SHA256 over job, image and expiry, with a secret
kept in Redis and shared by every web process) cannot be made without the secret. A link lives as long as
its task can be redelivered: ack_wait × max_deliver, plus a margin.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import time
from urllib.parse import unquote, urlencode, urlsplit

import redis

from pipeline import names
from pipeline.errors import Forbidden, NotFound, TransientError

#: Seconds a link outlives its task's last possible delivery.
MARGIN_S = 300


def shared_secret(client: redis.Redis, key: str) -> bytes:
    """A secret made once and kept in Redis under `key`, the same for every web process."""
    client.set(key, secrets.token_hex(32), nx=True)
    value = client.get(key)
    if value is None:  # (only if Redis lost it between the two commands: the next call makes another)
        raise TransientError("the web server's shared secret could not be read from Redis")
    return value if isinstance(value, bytes) else str(value).encode()


def secret(client: redis.Redis) -> bytes:
    """The links' signing secret."""
    return shared_secret(client, names.IMAGE_LINK_SECRET_KEY)


def _signature(key: bytes, job_id: int, image_id: str, expires: int) -> str:
    return hmac.new(key, f"{job_id}:{image_id}:{expires}".encode(), hashlib.sha256).hexdigest()


def link(key: bytes, base_url: str, job_id: int, image_id: str, lifetime_s: float) -> str:
    expires = int(time.time() + lifetime_s)
    query = urlencode({"expires": expires, "signature": _signature(key, job_id, image_id, expires)})
    return f"{base_url.rstrip('/')}/api/v2/images/{job_id}/{image_id}?{query}"


def check(key: bytes, job_id: int, image_id: str, expires: int, signature: str) -> None:
    """Raises Forbidden unless the link is jetpipe's and has not expired."""
    if not hmac.compare_digest(_signature(key, job_id, image_id, expires), signature):
        raise Forbidden("this image link is not valid")
    if expires < time.time():
        raise Forbidden("this image link has expired; the task's next delivery carries a new one")


def local_path(url: str) -> str:
    """The file a `file://` image URL names; NotFound for any other URL."""
    parts = urlsplit(url)
    if parts.scheme != "file":
        raise NotFound("this image is not a local file")
    return unquote(parts.path)
