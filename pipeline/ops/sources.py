"""Where a job's images come from: a folder, lines of URLs (a file, an upload, a form, a JSON list),
command-line arguments, or a manifest (CSV or JSON lines: an image a row, with its metadata). One rule for
every door: a line is a URL (kept as given) or an absolute path (its file:// URL); a relative path is resolved
against `base_dir` where the caller has one (the CLI's working directory; a manifest's own directory) and
refused where it has none (the web: a path relative to the server means nothing to its user).
Blank lines and `#` comments are skipped. Sources are read lazily: a million lines are never whole in memory.
"""

from __future__ import annotations

import csv
import io
import json
import os
from collections.abc import Iterable, Iterator
from typing import BinaryIO, TextIO

from pipeline.core.image_policy import IMAGE_SUFFIXES
from pipeline.core.manifests import Row, metadata
from pipeline.errors import UserInputError

#: Manifest formats by file name ending.
MANIFEST_FORMATS = {".csv": "csv", ".jsonl": "jsonl", ".ndjson": "jsonl"}


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


def manifest_format(filename: str | None) -> str | None:
    """`csv` or `jsonl` for a manifest's file name, None for anything else (a plain list of URLs)."""
    return next((fmt for ending, fmt in MANIFEST_FORMATS.items() if (filename or "").lower().endswith(ending)), None)


def manifest_from_file(path: str) -> Iterator[Row]:
    """The rows of the manifest at `path` (relative image paths: from the manifest's own directory)."""
    fmt = manifest_format(path)
    if fmt is None:
        raise UserInputError(f"--manifest {path!r}: a manifest is a .csv or a .jsonl file")
    try:
        handle = open(path, encoding="utf-8-sig", newline="")
    except OSError as exc:
        raise UserInputError(f"cannot read --manifest {path!r}: {exc.strerror}") from None
    with handle:
        yield from manifest_rows(handle, fmt, base_dir=os.path.dirname(os.path.abspath(path)), name=path)


def manifest_from_upload(stream: BinaryIO, filename: str) -> Iterator[Row]:
    """The rows of an uploaded manifest, read as they are consumed (image paths must be absolute)."""
    fmt = manifest_format(filename)
    if fmt is None:
        raise UserInputError(f"{filename}: a manifest is a .csv or a .jsonl file")
    yield from manifest_rows(io.TextIOWrapper(stream, encoding="utf-8-sig", errors="strict", newline=""), fmt,
                             base_dir=None, name=filename)


def manifest_rows(text: TextIO, fmt: str, *, base_dir: str | None, name: str) -> Iterator[Row]:
    """Rows of a manifest in `fmt` (csv: a header naming `url` and any other fields; jsonl: an object a line);
    UserInputError naming the line of the first bad row."""
    try:
        for line, fields in (_csv_rows(text, name) if fmt == "csv" else _jsonl_rows(text, name)):
            yield _row(line, fields, base_dir)
    except UnicodeDecodeError:
        raise UserInputError(f"{name} is not UTF-8 text") from None


def _row(line: int, fields: dict, base_dir: str | None) -> Row:
    """The manifest row of `fields` (its `url` and what else it says), found at `line`."""
    url = fields.get("url")
    if not isinstance(url, str) or not url.strip():
        raise UserInputError(f"manifest line {line}: no url")
    try:
        image = as_image_url(url.strip(), base_dir=base_dir)
    except UserInputError as exc:
        raise UserInputError(f"manifest line {line}: {exc}") from None
    return Row(image, metadata({k: v for k, v in fields.items() if k != "url"}, line))


def _csv_rows(text: TextIO, name: str) -> Iterator[tuple[int, dict]]:
    reader = csv.reader(text)
    header = [h.strip() for h in next(reader, [])]
    if "url" not in header:
        raise UserInputError(f"{name}: the manifest's first line names its columns, and one must be url")
    if len(set(header)) < len(header):
        raise UserInputError(f"{name}: the manifest names a column twice")
    for cells in reader:
        if not any(c.strip() for c in cells):
            continue
        if len(cells) > len(header):
            raise UserInputError(f"manifest line {reader.line_num}: {len(cells)} cells under {len(header)} columns")
        yield reader.line_num, dict(zip(header, cells, strict=False))


def _jsonl_rows(text: TextIO, name: str) -> Iterator[tuple[int, dict]]:
    for line, raw in enumerate(text, 1):
        if not raw.strip():
            continue
        try:
            fields = json.loads(raw)
        except ValueError:
            raise UserInputError(f"manifest line {line}: not a JSON object") from None
        if not isinstance(fields, dict):
            raise UserInputError(f"manifest line {line}: not a JSON object")
        yield line, fields


def uploaded_images(stream: BinaryIO, filename: str | None) -> Iterator[str | Row]:
    """An uploaded file's images: a manifest's rows (a .csv or .jsonl file), else its lines of URLs."""
    if manifest_format(filename):
        yield from manifest_from_upload(stream, filename or "")
    else:
        yield from image_urls_from_upload(stream, filename)


def manifest_from_objects(objects: Iterable[dict]) -> Iterator[Row]:
    """Manifest rows given as JSON objects (the API's `images`), each counted as a line from 1."""
    for line, fields in enumerate(objects, 1):
        yield _row(line, fields, None)
