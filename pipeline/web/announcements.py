"""Long polls of the gateway's job listing: a service's request for work waits for a new job to be announced
(`pipeline.jobs.<pipeline>`, sent when a job's first tasks are published) instead of asking again and again.

The subscription lives on the runtime's event loop (where the process's NATS connection is); the waiting
requests live on the web server's. A waiter is registered before the listing is read, so a job announced
between the two is not missed.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Iterable, Iterator

from nats.aio.msg import Msg

from pipeline import names
from pipeline.infra.taskqueue import TaskQueue

#: Longest wait a listing may ask for (seconds): under the usual proxy and client timeouts.
MAX_WAIT_S = 30.0
#: Stands for "any pipeline" (an operator's token, or no filter).
ANY = "*"


class JobAnnouncements:
    """Who waits for which pipeline's next job, woken when NATS announces one."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._waiting: dict[str, set[asyncio.Future[None]]] = {}

    async def listen(self, queue: TaskQueue) -> None:
        """Subscribe to every pipeline's announcements (on the loop of `queue`'s connection)."""
        await queue.nc.subscribe(names.job_announcements(ANY), cb=self._heard)

    async def _heard(self, msg: Msg) -> None:
        slug = msg.subject.removeprefix(names.job_announcements(""))
        with self._lock:
            woken = self._waiting.pop(slug, set()) | self._waiting.pop(ANY, set())
        for future in woken:
            future.get_loop().call_soon_threadsafe(_wake, future)

    @contextlib.contextmanager
    def waiter(self, slugs: Iterable[str]) -> Iterator[asyncio.Future[None]]:
        """A future (of the running loop) done when a job of one of `slugs` is announced; registered until the
        block ends."""
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        keys = set(slugs) or {ANY}
        with self._lock:
            for key in keys:
                self._waiting.setdefault(key, set()).add(future)
        try:
            yield future
        finally:
            with self._lock:
                for key in keys:
                    waiting = self._waiting.get(key)
                    if waiting is not None:
                        waiting.discard(future)
                        if not waiting:
                            del self._waiting[key]


def _wake(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


async def until(future: asyncio.Future[None], seconds: float) -> bool:
    """Wait for `future` at most `seconds`; whether it came."""
    try:
        await asyncio.wait_for(asyncio.shield(future), seconds)
        return True
    except TimeoutError:
        return False
