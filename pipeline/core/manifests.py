"""What a manifest says of each image: a job made from a manifest (a CSV or JSON-lines file, one image a row)
keeps each image's metadata with it, and shows it in the API, the web and the exports (Camtrap DP's deployments
and media come from it).

A row has `url` (any image URL a job may name) and, optionally:

- `deployment`: the camera placement it was taken at (text, at most 255 characters);
- `timestamp`: when it was taken, ISO 8601 with a time zone (`2024-06-01T22:05:00+02:00`, or `Z`);
- `latitude`, `longitude`: decimal degrees (WGS 84);
- any other field, kept as given (text up to 1,000 characters, a number or true/false; at most 20 of them,
  named by letters, digits, `_`, `-` and `.`).

A row that breaks one of these makes the whole job fail before anything is made, its line named.
"""

from __future__ import annotations

import datetime as dt
import math
import re
from typing import Any, NamedTuple

from pipeline.errors import UserInputError

STANDARD = ("deployment", "timestamp", "latitude", "longitude")
MAX_FREE_FIELDS = 20
MAX_TEXT = 1000
_FIELD_NAME = re.compile(r"[A-Za-z0-9_.\-]{1,64}")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


class Row(NamedTuple):
    """One image of a manifest: its URL and what the manifest says of it (None: nothing); `etag`: its content's
    tag where its source gives one (an object listed from object storage), part of its identity for reuse."""

    url: str
    meta: dict[str, Any] | None
    etag: str | None = None


def metadata(fields: dict[str, Any], line: int) -> dict[str, Any] | None:
    """The metadata of one row (every field but `url`), checked and normalised; UserInputError naming `line`."""
    found: dict[str, Any] = {}
    free = 0
    for name, value in fields.items():
        if value is None or (isinstance(value, str) and not value.strip()):
            continue  # an empty cell says nothing
        if name == "deployment":
            found[name] = _text(name, value, line, limit=255)
        elif name == "timestamp":
            found[name] = _timestamp(value, line)
        elif name in ("latitude", "longitude"):
            found[name] = _degrees(name, value, line, limit=90 if name == "latitude" else 180)
        else:
            free += 1
            if free > MAX_FREE_FIELDS:
                raise UserInputError(f"manifest line {line}: more than {MAX_FREE_FIELDS} fields besides url and "
                                     f"{', '.join(STANDARD)}")
            if not _FIELD_NAME.fullmatch(name):
                raise UserInputError(f"manifest line {line}: field name {name[:70]!r} may use letters, digits, "
                                     "_, - and . only (at most 64)")
            found[name] = _free(name, value, line)
    return found or None


def _text(name: str, value: Any, line: int, *, limit: int) -> str:
    text = str(value).strip()
    if len(text) > limit or _CONTROL.search(text):
        raise UserInputError(f"manifest line {line}: {name} must be text of at most {limit} characters without "
                             "control characters")
    return text


def _timestamp(value: Any, line: int) -> str:
    text = str(value).strip()
    try:
        when = dt.datetime.fromisoformat(text)
    except ValueError:
        raise UserInputError(f"manifest line {line}: timestamp {text[:40]!r} is not an ISO 8601 date and time "
                             "(2024-06-01T22:05:00+02:00)") from None
    if when.tzinfo is None:
        raise UserInputError(f"manifest line {line}: timestamp {text[:40]!r} has no time zone (add +02:00, or Z "
                             "for UTC): a camera's local time is ambiguous without one")
    return when.isoformat()


def _degrees(name: str, value: Any, line: int, *, limit: int) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError):
        number = math.nan
    if isinstance(value, bool) or not -limit <= number <= limit:
        raise UserInputError(f"manifest line {line}: {name} {str(value)[:40]!r} is not a number of degrees from "
                             f"-{limit} to {limit}")
    return number


def _free(name: str, value: Any, line: int) -> str | int | float | bool:
    if isinstance(value, bool | int | float) and not (isinstance(value, float) and not math.isfinite(value)):
        return value
    if isinstance(value, str):
        return _text(name, value, line, limit=MAX_TEXT)
    raise UserInputError(f"manifest line {line}: {name} must be text, a number or true/false")
