"""Redis job state: idempotent load, the atomic per-image gate (invariant 2), missing state."""

from __future__ import annotations

import pytest

from pipeline import names
from pipeline.errors import StateMissing, TransientError
from pipeline.infra.jobstate import JobState, Outcome, connect_redis
from tests.helpers import at_once


def pending(ids) -> list[tuple[str, str, int, int]]:
    """Image rows, all still pending (the shape JobState.load reads from the database)."""
    return [(str(i), "pending", 0, 0) for i in ids]


@pytest.fixture
def state(stack):
    client = connect_redis(stack.redis_url)
    client.flushall()
    yield JobState(client)
    client.close()


def test_load_is_idempotent_so_a_retried_run_job_keeps_progress(state):
    # Given a loaded job with one image counted
    assert state.load(1, pending(["1", "2", "3"])) is True
    state.record(1, [Outcome("1", detections=4, classifications=4)])
    # When run_job is retried and loads again
    assert state.load(1, pending(["1", "2", "3"])) is False
    # Then nothing was reset
    snap = state.snapshot(1)
    assert (snap.remaining, snap.detections, snap.captures) == (2, 4, 1)


def test_a_crash_mid_load_is_redone_from_scratch(state):
    # Given a load that died after adding some ids but before finishing (ready never set)
    state.client.sadd(names.job_pending_key(1), "stale-id")
    # When the load runs again
    state.load(1, pending(["1", "2"]))
    # Then only the real ids are pending
    assert state.pending_ids(1) == {"1", "2"}


def test_replayed_outcome_is_counted_once(state):
    state.load(7, pending([str(i) for i in range(10)]))
    for _ in range(3):
        snap = state.record(7, [Outcome("4", detections=3, classifications=2)])
    assert (snap.processed, snap.detections, snap.classifications, snap.captures) == (1, 3, 2, 1)
    assert snap.newly_removed == ()  # the last replay removed nothing


def test_failed_outcome_counts_as_processed_and_failed(state):
    state.load(7, pending(["1", "2"]))
    snap = state.record(7, [Outcome("1", failed=True, captures=0)])
    assert (snap.processed, snap.failed, snap.captures, snap.newly_removed) == (1, 1, 0, ("1",))
    # a later success for the same image changes nothing: the gate already closed
    snap = state.record(7, [Outcome("1", detections=5)])
    assert (snap.failed, snap.detections) == (1, 0)


def test_concurrent_duplicate_deliveries_count_each_image_once(state, stack):
    # Given 200 images and 8 threads each recording every image (as concurrent redeliveries would)
    ids = [str(i) for i in range(200)]
    state.load(3, pending(ids))

    def deliver(client):
        for image_id in ids:
            client.record(3, [Outcome(image_id, detections=2, classifications=1)])

    # each with its own connection, like another worker
    at_once(8, deliver, setup=lambda: JobState(connect_redis(stack.redis_url)))
    # Then every counter is exact
    snap = state.snapshot(3)
    assert (snap.remaining, snap.captures, snap.detections, snap.classifications) == (0, 200, 400, 200)


def test_record_without_state_raises_state_missing(state):
    with pytest.raises(StateMissing):
        state.record(99, [Outcome("1")])
    assert state.snapshot(99) is None


def test_redis_down_is_a_transient_error_not_a_missing_state():
    state = JobState(connect_redis("redis://127.0.0.1:1/0"))
    with pytest.raises(TransientError):
        state.record(1, [Outcome("1")])
    with pytest.raises(TransientError):
        state.snapshot(1)


def test_keys_expire_so_abandoned_state_does_not_leak(state):
    state.load(5, pending(["1"]))
    for key in names.job_keys(5)[::2]:  # pending and counts exist; an empty failed set has no key
        assert 0 < state.client.ttl(key) <= 7 * 24 * 3600
