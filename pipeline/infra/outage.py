"""Quiet retries: one log line when something starts failing, one when it works again.

A loop that retries through an outage (the bridge while NATS is down, a worker connecting) would
otherwise log every attempt, several lines a second for as long as the outage lasts. `Outage` logs the
first failure and any change of cause as a WARNING, repeats at DEBUG, and the recovery with its
duration; the delay it returns backs off from 1 s to `max_delay_s`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable


class Outage:
    """`what` is failing, or works. `on_change(failing)` is called as it starts failing and as it recovers
    (a worker's metric)."""

    def __init__(self, what: str, logger: logging.Logger, *, max_delay_s: float = 5.0,
                 on_change: Callable[[bool], None] | None = None):
        self.what = what
        self.log = logger
        self.max_delay_s = max_delay_s
        self.on_change = on_change
        self.since: float | None = None
        self.problem: str | None = None
        self.delay_s = 1.0

    def failed(self, problem: str) -> float:
        """Record a failed attempt; returns the seconds to wait before the next one."""
        if self.since is None:
            self.since = time.monotonic()
            self.log.warning("%s: %s; retrying quietly until it works", self.what, problem)
            if self.on_change is not None:
                self.on_change(True)
        elif problem != self.problem:
            self.log.warning("%s: now %s; still retrying", self.what, problem)
        else:
            self.log.debug("%s: %s; retrying", self.what, problem)
        self.problem = problem
        delay, self.delay_s = self.delay_s, min(self.delay_s * 2, self.max_delay_s)
        return delay

    def ok(self) -> None:
        """Record a successful attempt (logs the recovery once)."""
        if self.since is not None:
            self.log.info("%s: working again after %.0f s", self.what, time.monotonic() - self.since)
            if self.on_change is not None:
                self.on_change(False)
        self.since = self.problem = None
        self.delay_s = 1.0

    @property
    def failing(self) -> bool:
        return self.since is not None
