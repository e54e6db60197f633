"""Images in S3-compatible object storage (AWS S3, MinIO, Ceph): `s3://bucket/key`.

A job names its images `s3://bucket/key`; jetpipe lists a prefix to make the job (streamed, a page of 1,000
keys at a time) and hands each task a presigned https URL of its image (`presigned`), valid for
PIPELINE_S3_URL_TTL, never the credentials. The server is PIPELINE_S3_ENDPOINT_URL (AWS S3 when unset); the
credentials come the way every AWS tool finds them (AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, AWS_PROFILE,
an instance or pod role). No error or log line jetpipe writes carries a credential: botocore's messages name
the bucket, the key and the server's error code, and a presigned URL (whose query holds the signature) is
shown without its query (`pipeline.settings.shown_url`).
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Iterable, Iterator
from typing import Any
from urllib.parse import urlsplit

from pipeline.errors import ConfigError, TransientError, UserInputError
from pipeline.settings import Settings, redact

SCHEME = "s3"
#: Keys listed per request (S3's page size).
PAGE = 1000

_lock = threading.Lock()


def is_s3(url: str) -> bool:
    return url.startswith(f"{SCHEME}://")


def split(url: str) -> tuple[str, str]:
    """(bucket, key) of `s3://bucket/key` (the key may be empty: a whole bucket); UserInputError if it is not one."""
    parts = urlsplit(url)
    if parts.scheme != SCHEME or not parts.netloc or parts.query or parts.fragment:
        raise UserInputError(f"not an object storage URL (want s3://bucket/key or s3://bucket/prefix/): {url[:200]!r}")
    return parts.netloc, parts.path.lstrip("/")


@functools.lru_cache(maxsize=8)
def _client(endpoint_url: str, region: str) -> Any:
    import boto3
    from botocore.config import Config

    # path-style addressing for a server of one's own (MinIO, Ceph, a test server): no bucket DNS names there
    config = Config(signature_version="s3v4", retries={"max_attempts": 3, "mode": "standard"},
                    s3={"addressing_style": "path" if endpoint_url else "auto"}, connect_timeout=10, read_timeout=30)
    with _lock:  # boto3's default session is not safe to build clients from in several threads at once
        return boto3.session.Session().client("s3", endpoint_url=endpoint_url or None, region_name=region,
                                              config=config)


def client(settings: Settings) -> Any:
    """The process's S3 client for `settings` (thread-safe, made once)."""
    return _client(settings.s3_endpoint_url, settings.s3_region)


def presigned(url: str, settings: Settings) -> str:
    """A presigned https URL for GETting `s3://bucket/key`, valid PIPELINE_S3_URL_TTL seconds (signed here, no
    request made); ConfigError when no credentials can be found."""
    import botocore.exceptions

    bucket, key = split(url)
    try:
        return str(client(settings).generate_presigned_url(
            "get_object", Params={"Bucket": bucket, "Key": key}, ExpiresIn=int(settings.s3_url_ttl_s)))
    except botocore.exceptions.NoCredentialsError:
        raise ConfigError("no S3 credentials: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or AWS_PROFILE, or "
                          "give the host a role) to read s3:// images") from None


def list_images(prefix_url: str, settings: Settings, *, suffixes: Iterable[str]) -> Iterator[str]:
    """`s3://bucket/key` of every object under `s3://bucket/prefix` whose name ends with one of `suffixes`."""
    return (url for url, _ in list_objects(prefix_url, settings, suffixes=suffixes))


def list_objects(prefix_url: str, settings: Settings, *, suffixes: Iterable[str]) -> Iterator[tuple[str, str]]:
    """(`s3://bucket/key`, its ETag) of every object under `s3://bucket/prefix` whose name ends with one of
    `suffixes` (case-insensitive), in key order, a page at a time. UserInputError for a bucket that does not
    exist or may not be listed; TransientError when the server cannot be reached."""
    import botocore.exceptions

    bucket, prefix = split(prefix_url)
    endings = tuple(s.lower() for s in suffixes)
    pages = client(settings).get_paginator("list_objects_v2").paginate(
        Bucket=bucket, Prefix=prefix, PaginationConfig={"PageSize": PAGE})
    try:
        for page in pages:
            for item in page.get("Contents", []):
                if item["Key"].lower().endswith(endings):
                    yield f"{SCHEME}://{bucket}/{item['Key']}", str(item.get("ETag", "")).strip('"')
    except botocore.exceptions.NoCredentialsError:
        raise ConfigError("no S3 credentials: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or AWS_PROFILE, or "
                          "give the host a role) to list s3:// images") from None
    except botocore.exceptions.ClientError as exc:
        code = exc.response.get("Error", {}).get("Code", "?")
        if code == "NoSuchBucket":
            raise UserInputError(f"no bucket {bucket!r} on the object storage server") from None
        if code in ("AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "AllAccessDisabled"):
            raise UserInputError(f"may not list s3://{bucket}/{prefix} ({code}): check the credentials' rights "
                                 "on that bucket") from None
        raise UserInputError(f"cannot list s3://{bucket}/{prefix}: {code}") from None
    except (botocore.exceptions.EndpointConnectionError, botocore.exceptions.ConnectTimeoutError,
            botocore.exceptions.ReadTimeoutError) as exc:
        where = redact(settings.s3_endpoint_url) if settings.s3_endpoint_url else "AWS S3"
        raise TransientError(f"object storage unavailable: cannot reach {where} ({type(exc).__name__})") from None
