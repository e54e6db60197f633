"""Where a job's images come from: a folder, lines of URLs (a file, an upload, a form, a JSON list), or
command-line arguments. One rule for every door: a line is a URL (kept as given) or an absolute path (its
file:// URL); a relative path is resolved against `base_dir` where the caller has one (the CLI's working
directory) and refused where it has none (the web: a path relative to the server means nothing to its user).
Blank lines and `#` comments are skipped. Sources are read lazily: a million lines are never whole in memory.
"""

from __future__ import annotations

import io
import os
from collections.abc import Iterable, Iterator
from typing import BinaryIO

from pipeline.core.image_policy import IMAGE_SUFFIXES
from pipeline.errors import UserInputError


def image_urls_from_dir(directory: str) -> list[str]:
    """file:// URLs of the images in `directory`, sorted by name."""
    if not os.path.isdir(directory):
        raise UserInputError(f"--images-dir {directory!r} is not a directory")
    files = sorted(f for f in os.listdir(directory) if f.lower().endswith(IMAGE_SUFFIXES))
    return [f"file://{os.path.abspath(os.path.join(directory, f))}" for f in files]


def as_image_url(text: str, *, base_dir: str | None) -> str:
    """A URL as given, or a path as its absolute file:// URL (relative paths only where there is a `base_dir`)."""
    if "://" in text:
        return text
    if os.path.isabs(text):
        return f"file://{os.path.normpath(text)}"
    if base_dir is None:
        raise UserInputError(f"not an image URL (want file://, http:// or https://, or an absolute path): {text!r}")
    return f"file://{os.path.normpath(os.path.join(base_dir, text))}"


def url_lines(lines: Iterable[str], *, base_dir: str | None = None) -> Iterator[str]:
    """Image URLs from lines of text, by the rule in this module's docstring."""
    for line in lines:
        line = line.strip()
        if line and not line.startswith("#"):
            yield as_image_url(line, base_dir=base_dir)


def image_urls_from_file(path: str) -> Iterator[str]:
    """The image URLs listed one a line in the local file `path` (relative paths: from the working directory)."""
    try:
        handle = open(path, encoding="utf-8")
    except OSError as exc:
        raise UserInputError(f"cannot read --images-file {path!r}: {exc.strerror}") from None
    with handle:
        try:
            yield from url_lines(handle, base_dir=os.getcwd())
        except UnicodeDecodeError:
            raise UserInputError(f"--images-file {path!r} is not UTF-8 text") from None


def image_urls_from_upload(stream: BinaryIO, filename: str | None) -> Iterator[str]:
    """The image URLs of an uploaded file, one a line, read as they are consumed."""
    try:
        yield from url_lines(io.TextIOWrapper(stream, encoding="utf-8", errors="strict"))
    except UnicodeDecodeError:
        raise UserInputError(f"{filename or 'the uploaded file'} is not UTF-8 text") from None


def local_image_urls(arguments: Iterable[str]) -> Iterator[str]:
    """Command-line image arguments as URLs: a URL as given, a local path (which must exist) as its file:// URL."""
    for text in arguments:
        if "://" not in text and not os.path.isfile(text):
            raise UserInputError(f"no such image file: {text!r} (give a path to a file, or a URL)")
        yield as_image_url(text, base_dir=os.getcwd())


def image_suffixes(text: str | Iterable[str] | None) -> tuple[str, ...]:
    """The name endings that make an object of an s3:// prefix an image (`.jpg,.png`; a dot is added where it
    is missing); the usual image endings when none are given."""
    given = [t.strip() for t in (text.split(",") if isinstance(text, str) else text or []) if t.strip()]
    for ending in given:
        if "/" in ending or len(ending) > 20:
            raise UserInputError(f"a suffix is a file name ending such as .jpg, not {ending[:40]!r}")
    return tuple(t if t.startswith(".") else f".{t}" for t in given) or IMAGE_SUFFIXES
