"""A leaderless periodic scheduler that runs inside every worker process.

Every process ticks; for each time slot `floor(now / interval)` exactly one of them wins
`SET jetpipe:periodic:<name>:<slot> NX` in Redis and sends the actor. However many worker processes and
hosts run, each slot is sent once; a process that dies after winning loses only that tick. A tick that
waited in a busy queue past the next slot is skipped when it runs (`run_once_per_slot`), so a backlog never
replays stale ticks; it is not expired by Dramatiq's max_age, which would dead-letter every one of them.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from collections.abc import Callable

import redis

from pipeline import names
from pipeline.infra.runtime import Runtime

log = logging.getLogger(__name__)


class SlotScheduler:
    """Sends `send(slot)` once per slot of `interval_s` across all schedulers sharing `client`."""

    def __init__(self, client: redis.Redis, name: str, interval_s: float, send: Callable[[int], None], *,
                 clock: Callable[[], float] = time.time):
        self.client = client
        self.name = name
        self.interval_s = interval_s
        self.send = send
        self.clock = clock
        self.identity = f"{socket.gethostname()}:{os.getpid()}"
        self._last_slot: int | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def tick(self) -> bool:
        """Claim and send the current slot if nobody has; True if this scheduler sent it."""
        slot = int(self.clock() // self.interval_s)
        if slot == self._last_slot:
            return False
        self._last_slot = slot
        key = names.periodic_slot_key(self.name, slot)
        if not self.client.set(key, self.identity, nx=True, px=int(self.interval_s * 2000)):
            return False
        self.send(slot)
        log.info("scheduler %s sent %s for slot %s", self.identity, self.name, slot)
        return True

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name=f"scheduler-{self.name}", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.tick()
            except Exception as exc:  # noqa: BLE001 - a Redis blip must not kill the scheduler
                log.warning("scheduler %s: %s tick failed: %s", self.identity, self.name, exc)
            self._stop.wait(min(1.0, self.interval_s / 4))


def run_once_per_slot(runtime: Runtime, name: str, slot: int | None, interval_s: float, run: Callable[[], object],
                      *, time_limit_ms: int) -> bool:
    """Run `run()` for the periodic task `name`'s tick `slot`, unless another run of it is still going (no
    overlapping runs) or the tick waited in the queue past the next one (a backlog is not replayed).
    True if it ran. The lock lasts `time_limit_ms`: the actor's time limit, so a stopped run frees it."""
    if slot is not None and time.time() // interval_s - slot > 1:
        log.info("%s slot=%s skipped: stale (a newer tick follows)", name, slot)
        return False
    lock = names.periodic_lock_key(name)
    token = runtime.state.try_lock(lock, time_limit_ms)
    if token is None:
        log.info("%s slot=%s skipped: another run is in progress", name, slot)
        return False
    try:
        run()
        return True
    finally:
        runtime.state.release(lock, token)
