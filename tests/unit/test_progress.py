"""Progress rules (invariants 4 and 6): monotone, sticky FAILURE, strict threshold, capped id lists."""

from __future__ import annotations

import logging

from models import JobStatus
from pipeline.core import progress
from pipeline.infra.jobstate import Snapshot


def snap(total, remaining, failed=0, det=0):
    return Snapshot(total, remaining, failed, total - remaining - failed, det, det)


def test_progress_never_goes_backwards():
    # Given progress written from a newer snapshot
    newer = progress.merge({}, snap(10, 2, det=30), threshold=0.5, job_id=1)
    # When an older snapshot (computed earlier by a slower worker) is merged afterwards
    merged = progress.merge(newer, snap(10, 6, det=12), threshold=0.5, job_id=1)
    # Then no stage or counter went down
    assert merged["stages"]["process"]["processed"] == 8
    assert merged["stages"]["process"]["remaining"] == 2
    assert merged["stages"]["results"]["detections"] == 30
    assert merged["stages"]["process"]["progress"] == 0.8


def test_lifting_a_stage_to_100_percent_logs_a_warning(caplog):
    done = progress.merge({}, snap(4, 0), threshold=0.5, job_id=9)
    with caplog.at_level(logging.WARNING):
        progress.merge(done, snap(4, 1), threshold=0.5, job_id=9)
    assert "job=9 stage 'process' progress lifted to 100% by max() guard" in caplog.text


def test_threshold_is_strict():
    assert progress.final_status(snap(10, 0, failed=5), 0.5) == JobStatus.SUCCESS
    assert progress.final_status(snap(10, 0, failed=6), 0.5) == JobStatus.FAILURE


def test_a_failed_stage_keeps_failure():
    # 6 of 10 failed: the job is doomed before it completes, and stays so
    doomed = progress.merge({}, snap(10, 3, failed=6), threshold=0.5, job_id=1)
    assert doomed["stages"]["process"]["status"] == JobStatus.FAILURE
    later = progress.merge(doomed, snap(10, 0, failed=6), threshold=0.9, job_id=1)
    assert later["stages"]["process"]["status"] == JobStatus.FAILURE


def test_error_id_lists_are_capped():
    text = progress.format_ids([str(i) for i in range(1000, 1030)])
    assert text.startswith("['1000', '1001'") and text.endswith("... and 20 more")
    assert "'1009'" in text and "'1010'" not in text


def test_progress_over_time_is_sampled_every_few_seconds_and_thinned_when_long():
    import datetime as dt

    from pipeline.core.progress import MAX_SAMPLES, SAMPLE_S, record_sample

    progress = {"stages": {"process": {"processed": 0, "failed": 0}}}
    start = dt.datetime(2026, 12, 6, 12, 0, 0)
    for second in range(0, 2000):
        progress["stages"]["process"]["processed"] = second
        record_sample(progress, start + dt.timedelta(seconds=second))
    samples = progress["samples"]
    assert len(samples) <= MAX_SAMPLES
    assert samples[0] == [start.replace(tzinfo=dt.UTC).timestamp(), 0, 0]
    assert all(b[0] - a[0] >= SAMPLE_S for a, b in zip(samples, samples[1:], strict=False))
    assert all(b[1] >= a[1] for a, b in zip(samples, samples[1:], strict=False))
    record_sample(progress, start + dt.timedelta(seconds=2000.5), last=True)  # the end is always kept
    assert progress["samples"][-1][0] == start.replace(tzinfo=dt.UTC).timestamp() + 2000.5
