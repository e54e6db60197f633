"""Job logging: one grep-able line per decision in the module log, and the same line in the JobLog table."""

from __future__ import annotations

import logging

from models import JobLog
from pipeline.settings import redact_text

log = logging.getLogger("pipeline.job")

#: Longest job-log message, in the log and in the table: one bad message must not write megabytes.
MAX_MESSAGE_CHARS = 2000


def job_log(job_id: int, level: int, message: str, *, image_id: str | None = None,
            persist: bool = True, emit: bool = True, logger: logging.Logger = log) -> None:
    """Log `job=<id> [image=<id>] message` (unless not `emit`) and, with `persist`, store it in the
    job's log (inside the caller's transaction, if there is one).

    Never raises: a failing job-log write must not turn a decision into a failure.
    """
    message = redact_text(message)  # a presigned URL's signature must not reach logs
    if len(message) > MAX_MESSAGE_CHARS:
        message = f"{message[:MAX_MESSAGE_CHARS]}... ({len(message)} characters)"
    prefix = f"job={job_id}" + (f" image={image_id}" if image_id is not None else "")
    if emit:
        logger.log(level, "%s %s", prefix, message)
    if not persist:
        return
    try:
        JobLog.insert(job=job_id, level=logging.getLevelName(level),
                      message=((f"image={image_id} " if image_id else "") + message).replace("\x00", "\\0")).execute()
    except Exception as exc:  # noqa: BLE001
        logger.warning("%s could not write job log: %s", prefix, exc)


def job_log_ids(job_id: int, level: int, message: str, ids: list[str], *, label: str = "IDs") -> int:
    """`message` then every id in `ids`, over as many job-log lines as they need (each under
    MAX_MESSAGE_CHARS, so none is cut: `<message>; IDs (1/3): 4, 5, ...`); the number of lines written."""
    chunks: list[list[str]] = [[]]
    room = MAX_MESSAGE_CHARS - len(message) - 40
    used = 0
    for image_id in ids:
        if chunks[-1] and used + len(image_id) + 2 > room:
            chunks.append([])
            used = 0
        chunks[-1].append(image_id)
        used += len(image_id) + 2
    for n, chunk in enumerate(chunks, 1):
        part = f" ({n}/{len(chunks)})" if len(chunks) > 1 else ""
        job_log(job_id, level, f"{message}; {label}{part}: {', '.join(chunk)}")
    return len(chunks)
