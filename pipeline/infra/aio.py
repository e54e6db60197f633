"""The sync facade over asyncio: run coroutines on one long-lived event loop per process.

Dramatiq actors are sync; nats-py is asyncio. Actors never create an event loop per message: they hand
coroutines to the process's loop thread (Dramatiq's AsyncIO middleware thread inside workers, a
`LoopThread` of our own in the CLI and tests) and wait for the result with a timeout.

The wait is interruptible. Dramatiq stops an actor that exceeds its time limit, or a worker shutting
down, by raising an exception asynchronously in the actor's thread; Python delivers it only between
bytecodes, never inside a blocking lock wait. So the caller waits in short slices, and whatever
interrupts it (that exception, or Ctrl-C) also cancels the coroutine it was waiting for.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
import time
from collections.abc import Coroutine
from typing import Any, TypeVar

T = TypeVar("T")

#: Seconds between two looks for an asynchronous interrupt while waiting for a coroutine.
INTERRUPT_CHECK_S = 0.1


class LoopRunner:
    """Runs coroutines on `loop`, which some thread other than the caller's runs forever."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop = loop

    def run(self, coro: Coroutine[Any, Any, T], timeout: float | None = None) -> T:
        """The coroutine's result; raises its exception, or TimeoutError after `timeout` seconds (the
        coroutine is then cancelled, as it is when the waiting thread is interrupted)."""
        return self.wait(self._schedule(coro), timeout)

    def wait(self, future: concurrent.futures.Future[T], timeout: float | None = None) -> T:
        """The result of a coroutine from `spawn`, as `run` waits for it (interruptible; cancelled if the wait
        ends without it)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        try:
            while True:
                left = INTERRUPT_CHECK_S if deadline is None else min(INTERRUPT_CHECK_S, deadline - time.monotonic())
                try:
                    return future.result(max(left, 0))
                except TimeoutError:
                    if future.done():  # finished meanwhile, or raised a TimeoutError of its own
                        return future.result(0)
                    if deadline is not None and time.monotonic() >= deadline:
                        raise TimeoutError(f"operation did not finish within {timeout} s") from None
        finally:
            if not future.done():
                future.cancel()

    def spawn(self, coro: Coroutine[Any, Any, T]) -> concurrent.futures.Future[T]:
        """Start a coroutine without waiting for it (a bridge, a service loop; or work whose result the caller
        `wait`s for after doing something else meanwhile)."""
        return self._schedule(coro)

    def _schedule(self, coro: Coroutine[Any, Any, T]) -> concurrent.futures.Future[T]:
        try:
            return asyncio.run_coroutine_threadsafe(coro, self.loop)
        except RuntimeError:  # the loop is closed (shutting down): the coroutine never runs, say so quietly
            coro.close()
            raise


class LoopThread(LoopRunner):
    """A daemon thread running an event loop, for processes that are not Dramatiq workers."""

    def __init__(self, name: str = "jetpipe-loop"):
        super().__init__(asyncio.new_event_loop())
        self._thread = threading.Thread(target=self.loop.run_forever, name=name, daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        """Cancel what still runs on the loop and let it finish (as `asyncio.run` does), then stop and close
        the loop: a task left pending would be reported as "Event loop is closed" whenever it is collected."""
        if self.loop.is_running():
            try:
                asyncio.run_coroutine_threadsafe(cancel_the_rest(), self.loop).result(timeout)
            except (concurrent.futures.TimeoutError, RuntimeError):
                pass  # what did not finish in time is left as it is
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(timeout)
        if not self._thread.is_alive() and not self.loop.is_closed():
            self.loop.close()


async def cancel_the_rest() -> None:
    """Cancel every other task on the running loop and wait for them to end."""
    others = [task for task in asyncio.all_tasks() if task is not asyncio.current_task()]
    for task in others:
        task.cancel()
    await asyncio.gather(*others, return_exceptions=True)
