"""Task tokens: only the holder of a task decides its image (invariant 12).

Each task jetpipe publishes carries a `task_token` in its body: `<image id>.<MAC>`, where the MAC is an
HMAC-SHA256 of the job and image under the job's own secret (`Job.task_secret`, made when the job is
created and never shown). A service that was given the task holds its token; one that was not cannot make
it (reply subjects can be guessed: they are sequence numbers, a token cannot). A result names the tokens
of the tasks it answers in its `Pipeline-Task-Token` header, and decides only images whose token it
names; anything else is refused with a reason in the job log and touches nothing.

A token names its image, so the header's order does not matter. Redelivered and re-dispatched tasks of
an image carry the same token (it is computed, not stored). Jobs created before tokens existed have no
secret: their results are taken as the contract took them then.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
from collections.abc import Iterable

from models import Job, Pipeline, tuples

#: Bytes of MAC in a token (128 bits: no guessing).
MAC_BYTES = 16


def new_secret() -> str:
    return secrets.token_urlsafe(32)


def token_for(secret: str, job_id: int, image_id: str) -> str:
    mac = hmac.new(secret.encode(), f"{job_id}:{image_id}".encode(), hashlib.sha256).digest()[:MAC_BYTES]
    return f"{image_id}.{base64.urlsafe_b64encode(mac).decode().rstrip('=')}"


def image_of(token: str) -> str:
    """The image a token names (not yet checked: see `proven_images`)."""
    return token.partition(".")[0]


def job_secrets(job_ids: Iterable[int]) -> dict[int, tuple[str | None, str]]:
    """Each job's (token secret, pipeline slug); the secret is None for a job made before task tokens, and
    jobs that do not exist are left out."""
    ids = sorted(set(job_ids))
    if not ids:
        return {}
    return {job_id: (secret, slug) for job_id, secret, slug in tuples(
        Job.select(Job.id, Job.task_secret, Pipeline.slug).join(Pipeline).where(Job.id.in_(ids)))}


def proven_images(secret: str, job_id: int, tokens: Iterable[str]) -> tuple[set[str], list[str]]:
    """(the images whose tokens are valid, the tokens that are not)."""
    proven: set[str] = set()
    forged: list[str] = []
    for token in tokens:
        image_id = image_of(token)
        if image_id and hmac.compare_digest(token, token_for(secret, job_id, image_id)):
            proven.add(image_id)
        else:
            forged.append(token)
    return proven, forged
