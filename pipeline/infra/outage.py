"""Quiet retries: one log line when something starts failing, one when it works again.

A loop that retries through an outage (the bridge while NATS is down, a worker connecting) would
otherwise log every attempt, several lines a second for as long as the outage lasts. `Outage` logs the
first failure and any change of cause as a WARNING, repeats at DEBUG, and the recovery with its
duration; the delay it returns backs off from 1 s to `max_delay_s`.
"""

from __future__ import annotations

import logging
import time


class Outage:
    def __init__(self, what: str, logger: logging.Logger, *, max_delay_s: float = 5.0):
        self.what = what
        self.log = logger
        self.max_delay_s = max_delay_s
        self.since: float | None = None
        self.problem: str | None = None
        self.delay_s = 1.0

    def failed(self, problem: str) -> float:
        """Record a failed attempt; returns the seconds to wait before the next one."""
        if self.since is None:
            self.since = time.monotonic()
            self.log.warning("%s: %s; retrying quietly until it works", self.what, problem)
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
        self.since = self.problem = None
        self.delay_s = 1.0

    @property
    def failing(self) -> bool:
        return self.since is not None
