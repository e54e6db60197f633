"""Log output of jetpipe's processes: readable text by default, or one JSON object per line for log
shippers (PIPELINE_LOG_FORMAT=json), with the job and image ids a decision names as fields of their own.

Every decision jetpipe logs names its job as `job=<id>` (and its image as `image=<id>`); the JSON
formatter lifts those into `job_id` and `image_id`, so a shipper can index them without parsing text.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import re
import sys

from pipeline.infra import tracing
from pipeline.settings import Settings

TEXT_FORMAT = "%(asctime)s %(levelname)s %(process)d %(name)s %(message)s"
_JOB = re.compile(r"\bjob=(\d+)")
_IMAGE = re.compile(r"\bimage=([^\s,;]+)")


class JsonFormatter(logging.Formatter):
    """`{"at", "level", "logger", "pid", "thread", "message", "job_id"?, "image_id"?, "trace_id"?, "span_id"?,
    "error"?}` per record; `trace_id` and `span_id` (hex) name the span the line was logged in, where traces
    are on (pipeline/infra/tracing.py)."""

    def format(self, record: logging.LogRecord) -> str:
        message = record.getMessage()
        entry = {"at": dt.datetime.fromtimestamp(record.created, dt.UTC).isoformat(timespec="milliseconds"),
                 "level": record.levelname, "logger": record.name, "pid": record.process,
                 "thread": record.threadName, "message": message}
        if job := _JOB.search(message):
            entry["job_id"] = int(job.group(1))
        if image := _IMAGE.search(message):
            entry["image_id"] = image.group(1)
        if traced := tracing.ids():
            entry["trace_id"], entry["span_id"] = traced
        if record.exc_info:
            entry["error"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False)


_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")


class OneLine(logging.Filter):
    """Spells out control characters in a record's message (`\\n`, `\\r`, `\\x1b`): text from a processing
    service (an error, a taxon) can neither split a log line, forge another, nor drive a terminal. A
    traceback, which is not part of the message, keeps its lines."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if _CONTROL.search(message):
            record.msg, record.args = _CONTROL.sub(lambda m: repr(m.group())[1:-1], message), None
        return True


def configure(settings: Settings, *, level: int | str | None = None) -> None:
    """Set the root logger's level and format. Handlers that exist (a Dramatiq worker process logs
    through a pipe to its master) keep their destination and get the format; else one goes to stderr."""
    root = logging.getLogger()
    root.setLevel(level if level is not None else settings.log_level.upper())
    if not root.handlers:
        root.addHandler(logging.StreamHandler(sys.stderr))
        if settings.log_format == "text":
            root.handlers[0].setFormatter(logging.Formatter(TEXT_FORMAT))
    for handler in root.handlers:
        if not any(isinstance(f, OneLine) for f in handler.filters):
            handler.addFilter(OneLine())
    if settings.log_format == "json":
        for handler in root.handlers:
            handler.setFormatter(JsonFormatter())
