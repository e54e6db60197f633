"""The event-loop runner of processes that are not Dramatiq workers."""

from __future__ import annotations

import asyncio
import gc

import pytest

from pipeline.infra.aio import LoopThread


async def answer() -> int:
    await asyncio.sleep(0)
    return 42


@pytest.mark.filterwarnings("error")
def test_a_coroutine_handed_to_a_closed_loop_is_refused_without_a_never_awaited_warning():
    # Given a loop thread that has been stopped (a process shutting down)
    runner = LoopThread("test-loop")
    assert runner.run(answer(), timeout=5) == 42
    runner.stop()
    # When a coroutine is still handed to it, it is refused, and nothing warns later that it never ran
    with pytest.raises(RuntimeError):
        runner.run(answer(), timeout=5)
    with pytest.raises(RuntimeError):
        runner.spawn(answer())
    gc.collect()
