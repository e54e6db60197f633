"""Named crash points for fault-injection tests. They do nothing unless an environment variable arms them.

    PIPELINE_CRASH_AT=after_db_save        SIGKILL this process the first time that point is reached
    PIPELINE_CRASH_AT=mid_publish PIPELINE_CRASH_SKIP=3
                                           ... the 4th time instead (let 3 hits pass first)
    PIPELINE_RAISE_AT=after_dispatch       raise InjectedFault there, every time (an ordinary bug)
    PIPELINE_RAISE_AT=after_validation PIPELINE_RAISE_IF=images=7
                                           ... only where the point's context names that value (here: a
                                           result message naming image 7; a bug in one message's data)
    PIPELINE_DELAY_AT=after_validation=0.02
                                           sleep 0.02 s there, every time (a throttled worker: makes a
                                           backlog deterministic instead of a matter of machine speed)

Points (docs/processing-lifecycle.md says what recovers each one):
"""

from __future__ import annotations

import logging
import os
import signal
import time

log = logging.getLogger(__name__)

#: Every crash point that production code passes through.
POINTS = (
    # the bridge taking results into the inbox
    "after_inbox", "after_task_ack",
    # process_pipeline_result saving them
    "after_validation", "after_db_save", "after_redis_update", "after_progress", "after_commit",
    # run_job
    "before_publish", "mid_publish", "after_publish", "after_dispatch",
    # a processing service (the SDK) with a result too large for one message: put in the bucket, not referenced
    "after_result_object",
)


class InjectedFault(RuntimeError):
    """A failure injected by PIPELINE_RAISE_AT (fault-injection tests only)."""

_hits: dict[str, int] = {}


def _matches(condition: str | None, context: dict[str, object]) -> bool:
    """True if `condition` ("key=value") is unset, or the context's `key` is (or lists) `value`."""
    if not condition:
        return True
    key, _, value = condition.partition("=")
    given = context.get(key)
    given = given() if callable(given) else given  # computed only when a condition asks for it
    listed = given if isinstance(given, list | tuple | set) else str(given).split(",")
    return value in {str(v) for v in listed}


def crash_point(name: str, **context: object) -> None:
    """SIGKILL this process here if PIPELINE_CRASH_AT names this point (after PIPELINE_CRASH_SKIP hits);
    raise InjectedFault if PIPELINE_RAISE_AT names it."""
    if os.environ.get("PIPELINE_RAISE_AT") == name and _matches(os.environ.get("PIPELINE_RAISE_IF"), context):
        raise InjectedFault(f"fault injected at {name}")
    delay = os.environ.get("PIPELINE_DELAY_AT")
    if delay and delay.partition("=")[0] == name:
        time.sleep(float(delay.partition("=")[2] or 0))
    armed = os.environ.get("PIPELINE_CRASH_AT")
    if armed != name:
        return
    skip = int(os.environ.get("PIPELINE_CRASH_SKIP", "0"))
    _hits[name] = _hits.get(name, 0) + 1
    if _hits[name] <= skip:
        return
    details = " ".join(f"{k}={v() if callable(v) else v}" for k, v in context.items())
    log.critical("crash point %s reached: SIGKILL pid=%s %s", name, os.getpid(), details)
    for handler in logging.getLogger().handlers:
        handler.flush()
    os.kill(os.getpid(), signal.SIGKILL)
