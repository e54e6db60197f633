"""Limits on what processing services can put in jetpipe's hands (issue 25, row 12): the results stream holds
a bounded number of bytes and messages of a bounded size, refuses new results when full rather than drop
stored ones, and `health` says when it fills up. Real NATS and Redis."""

from __future__ import annotations

import nats.js.errors
import pytest
from nats.js.api import DiscardPolicy

from pipeline import names
from pipeline.infra.aio import LoopThread
from pipeline.infra.taskqueue import DEFAULT_RESULTS_MAX_BYTES, RESULT_MAX_MSG_BYTES
from pipeline.ops.health import build_report


def results_config(runtime):
    return runtime.runner.run(runtime.tasks.queue.js.stream_info(names.RESULTS_STREAM), timeout=10).config


def test_the_results_stream_is_bounded_and_refuses_rather_than_drops(runtime):
    config = results_config(runtime)
    assert (config.max_bytes, config.max_msg_size, config.discard) == (
        DEFAULT_RESULTS_MAX_BYTES, RESULT_MAX_MSG_BYTES, DiscardPolicy.NEW)
    # (the NATS server's max_payload, 1 MiB by default and 8 MiB in deploy/nats.conf, bounds a message before
    # the stream does: max_msg_size keeps the bound if a server allows more)


def test_a_results_stream_made_without_limits_gets_them_and_the_setting_is_imposed(runtime):
    js = runtime.tasks.queue.js

    async def unlimited():
        await js.delete_stream(names.RESULTS_STREAM)
        await js.add_stream(name=names.RESULTS_STREAM, subjects=[names.RESULTS_SUBJECTS], retention="workqueue")

    runtime.runner.run(unlimited(), timeout=10)
    runtime.tasks.ensure_streams()  # a process without the setting: the defaults on a stream that has none
    config = results_config(runtime)
    assert (config.max_bytes, config.max_msg_size, config.discard) == (
        DEFAULT_RESULTS_MAX_BYTES, RESULT_MAX_MSG_BYTES, DiscardPolicy.NEW)
    runtime.tasks.ensure_streams(**runtime.settings.with_overrides(nats_results_max_gb=2.0).stream_options())
    assert results_config(runtime).max_bytes == 2 * 2**30
    runtime.tasks.ensure_streams()  # and a process without the setting leaves it as it is
    assert results_config(runtime).max_bytes == 2 * 2**30


def test_health_says_when_the_results_stream_fills_up(runtime, moth_pipeline):
    # Given a results stream of 64 KiB (no worker takes the results) holding 60 KiB
    runtime.tasks.ensure_streams(**runtime.settings.with_overrides(nats_results_max_gb=64 / 2**20).stream_options())
    js = runtime.tasks.queue.js

    async def fill():
        for _ in range(60):
            await js.publish(names.result_subject("moth-demo", 1), b"x" * 1000)

    runtime.runner.run(fill(), timeout=30)
    loop = LoopThread()
    try:
        status, health = build_report(runtime.settings, loop)
    finally:
        loop.stop()
    # Then health is degraded and says why and what to do
    assert status != "healthy"
    [problem] = [p for p in health["problems"] if p.startswith(f"{names.RESULTS_STREAM} holds")]
    assert "GiB (PIPELINE_NATS_RESULTS_MAX_GB)" in problem and "refused and retried" in problem
    assert int(problem.split("%")[0].rsplit(" ", 1)[1]) >= 80
    # And once full, a result is refused, never a stored one dropped
    with pytest.raises(nats.js.errors.APIError):
        runtime.runner.run(js.publish(names.result_subject("moth-demo", 1), b"x" * 8000), timeout=10)
    assert runtime.runner.run(js.stream_info(names.RESULTS_STREAM), timeout=10).state.messages == 60
