"""Which images jetpipe reads, and what a reader is told when it cannot (issue 25, row 6).

A job's image URL is another person's input that jetpipe's own processes act on: the worker reads it in
internal mode, the web server serves a local file through a signed link. So:

- local files (`file://`) only under the image roots, PIPELINE_IMAGE_ROOTS (directories, comma-separated),
  with `..` and symbolic links resolved first. Without roots, only a person on jetpipe's own machine (the CLI)
  may name local files; a job created over the network (the web API) may not;
- remote images only over http(s), and, with PIPELINE_IMAGE_HOSTS set, only from those hosts;
- images in object storage (`s3://bucket/key`) only from the buckets of PIPELINE_S3_BUCKETS; without it, any
  bucket from the CLI and none from the web API (jetpipe's credentials reach what they reach: a web user must
  not choose which of it is handed to services);
- an image that cannot be read is "cannot read the image" whatever the reason: a missing file, a file the
  process may not read, a closed port and an HTTP 401 look the same to whoever reads the failure (the
  reason goes to the process's own log, for the operator).
"""

from __future__ import annotations

import dataclasses
import os
from urllib.parse import unquote, urlsplit

from pipeline.errors import UserInputError
from pipeline.settings import Settings

#: What a reader is told of any image jetpipe could not or would not read.
UNREADABLE = "cannot read the image"
#: File name endings of the images a folder or an object storage prefix contributes.
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".webp")


@dataclasses.dataclass(frozen=True)
class ImagePolicy:
    roots: tuple[str, ...] = ()  # real paths; empty: none configured
    hosts: tuple[str, ...] = ()  # lower-case host names; empty: any host
    buckets: tuple[str, ...] = ()  # object storage buckets; empty: none configured

    @classmethod
    def from_settings(cls, settings: Settings) -> ImagePolicy:
        roots = tuple(os.path.realpath(p.strip()) for p in settings.image_roots.split(",") if p.strip())
        hosts = tuple(h.strip().lower() for h in settings.image_hosts.split(",") if h.strip())
        buckets = tuple(b.strip() for b in settings.s3_buckets.split(",") if b.strip())
        return cls(roots, hosts, buckets)

    def local_path_allowed(self, path: str, *, dirs: dict[str, str] | None = None) -> bool:
        """True if `path`, resolved, lies under an image root (False without roots). `dirs`: directories
        already resolved while checking one job's URLs (a job's images share a few directories, and
        resolving a whole path costs a system call per component: only the file itself is then looked at)."""
        real = _resolved(path, dirs) if dirs is not None else os.path.realpath(path)
        return any(real == root or real.startswith(root.rstrip(os.sep) + os.sep) for root in self.roots)

    def host_allowed(self, host: str | None) -> bool:
        return not self.hosts or (host or "").lower() in self.hosts

    def check_new(self, url: str, *, over_network: bool, dirs: dict[str, str] | None = None) -> None:
        """Raise UserInputError if a new job may not name `url` (never saying whether the file exists).
        `dirs`: a cache of resolved directories for the URLs of one job (see `local_path_allowed`)."""
        parts = urlsplit(url)
        if parts.scheme == "file":
            if not self.roots:
                if over_network:
                    raise UserInputError(f"local image {url[:200]!r}: jobs created over the network may name local "
                                         "files only under the image roots, and PIPELINE_IMAGE_ROOTS is not set")
                return
            if not self.local_path_allowed(unquote(parts.path), dirs=dirs):
                raise UserInputError(f"local image {url[:200]!r} is outside the image roots (PIPELINE_IMAGE_ROOTS: "
                                     f"{', '.join(self.roots)})")
        elif parts.scheme == "s3":
            if not self.buckets and over_network:
                raise UserInputError(f"image {url[:200]!r}: jobs created over the network may read object storage "
                                     "only from the buckets of PIPELINE_S3_BUCKETS, and it is not set")
            if self.buckets and parts.netloc not in self.buckets:
                raise UserInputError(f"image {url[:200]!r}: bucket {parts.netloc!r} is not one of PIPELINE_S3_BUCKETS")
        elif not self.host_allowed(parts.hostname):
            raise UserInputError(f"image {url[:200]!r}: host {parts.hostname!r} is not one of PIPELINE_IMAGE_HOSTS")

    def refuses_read(self, url: str) -> bool:
        """True if jetpipe must not read `url` now (a local file outside the roots, when roots are set; a
        remote host not allowed)."""
        parts = urlsplit(url)
        if parts.scheme == "file":
            return bool(self.roots) and not self.local_path_allowed(unquote(parts.path))
        if parts.scheme == "s3":
            return bool(self.buckets) and parts.netloc not in self.buckets
        return not self.host_allowed(parts.hostname)


def _resolved(path: str, dirs: dict[str, str]) -> str:
    """os.path.realpath(path), with its directory resolved once per `dirs` (a symbolic link at the file itself
    is still followed)."""
    directory, name = os.path.split(path)
    if name in ("", ".", ".."):
        return os.path.realpath(path)
    if directory not in dirs:
        dirs[directory] = os.path.realpath(directory)
    real = os.path.join(dirs[directory], name)
    return os.path.realpath(real) if os.path.islink(real) else real
