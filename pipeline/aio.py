"""The sync facade over asyncio: run coroutines on one long-lived event loop per process.

Dramatiq actors are sync; nats-py is asyncio. Actors never create an event loop per message: they hand
coroutines to the process's loop thread (Dramatiq's AsyncIO middleware thread inside workers, a
`LoopThread` of our own in the CLI and tests) and wait for the result with a timeout.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
from collections.abc import Awaitable
from typing import TypeVar

T = TypeVar("T")


class LoopRunner:
    """Runs coroutines on `loop`, which some thread other than the caller's runs forever."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop = loop

    def run(self, coro: Awaitable[T], timeout: float | None = None) -> T:
        """The coroutine's result; raises its exception, or TimeoutError after `timeout` seconds."""
        future = asyncio.run_coroutine_threadsafe(coro, self.loop)
        try:
            return future.result(timeout)
        except concurrent.futures.TimeoutError:
            future.cancel()
            raise TimeoutError(f"operation did not finish within {timeout} s") from None

    def spawn(self, coro: Awaitable[T]) -> concurrent.futures.Future[T]:
        """Start a long-running coroutine (a bridge, a service loop) without waiting for it."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop)


class LoopThread(LoopRunner):
    """A daemon thread running an event loop, for processes that are not Dramatiq workers."""

    def __init__(self, name: str = "jetpipe-loop"):
        super().__init__(asyncio.new_event_loop())
        self._thread = threading.Thread(target=self.loop.run_forever, name=name, daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        if self.loop.is_running():
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(timeout)
