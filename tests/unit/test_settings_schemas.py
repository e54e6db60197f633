"""Settings from the environment and wire schemas: defaults, validation, secrets never shown."""

from __future__ import annotations

import json

import pytest

from pipeline import names
from pipeline.errors import BadResult, ConfigError
from pipeline.schemas import ErrorResult, SuccessResult, _result_read_leniently, _success_as_specified, decode_result
from pipeline.settings import Settings, redact


def test_defaults_match_the_architecture():
    s = Settings.from_env({})
    assert (s.nats_max_deliver, s.nats_task_ttr, s.stalled_jobs_max_minutes, s.failure_threshold,
            s.health_check_seconds, s.database_url) == (2, 30, 10, 0.5, 60, "sqlite:///pipeline.db")


@pytest.mark.parametrize("env, message", [
    ({"PIPELINE_NATS_MAX_DELIVER": "0"}, "at least 1"),
    ({"PIPELINE_FAILURE_THRESHOLD": "1.5"}, "in [0, 1)"),
    ({"PIPELINE_NATS_TASK_TTR": "soon"}, "not a valid float"),
    ({"PIPELINE_REDIS_URL": "localhost"}, "is not a URL"),
    ({"PIPELINE_NATS_REPLICAS": "0"}, "between 1 and 5"),
    ({"PIPELINE_NATS_REPLICAS": "three"}, "not a valid int"),
])
def test_bad_settings_name_the_variable(env, message):
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace(")", r"\)")):
        Settings.from_env(env)


def test_stream_replicas_are_only_imposed_when_set():
    unset = Settings.from_env({})
    assert unset.stream_options()["replicas"] is None  # new streams get 1, existing ones keep theirs
    assert Settings.from_env(unset.to_env()) == unset  # and "not set" survives a child process's environment
    assert unset.describe()["PIPELINE_NATS_REPLICAS"] == ""  # shown as unset, not as "None"
    assert Settings.from_env({"PIPELINE_NATS_REPLICAS": " 3 "}).stream_options()["replicas"] == 3


def test_secrets_in_urls_are_masked():
    assert redact("redis://:hunter2@cache:6379/0") == "redis://:***@cache:6379/0"
    assert redact("postgresql://app:s3cret@db/jobs") == "postgresql://app:***@db/jobs"
    assert redact("nats://tok3n@nats:4222") == "nats://***@nats:4222"
    assert redact("sqlite:////var/lib/jetpipe/pipeline.db") == "sqlite:////var/lib/jetpipe/pipeline.db"
    described = Settings.from_env({"PIPELINE_DATABASE_URL": "postgresql://app:s3cret@db/jobs"}).describe()
    assert "s3cret" not in str(described)
    # secrets in query strings too: a password redis-py accepts there, a presigned URL's signature
    assert redact("redis://cache:6379/0?password=hunter2&db=1") == "redis://cache:6379/0?password=***&db=1"
    presigned = ("https://b.s3.amazonaws.com/a.jpg?X-Amz-Credential=AKIA%2F&X-Amz-Signature=abc123"
                 "&X-Amz-Expires=60")
    assert redact(presigned) == ("https://b.s3.amazonaws.com/a.jpg?X-Amz-Credential=***&X-Amz-Signature=***"
                                 "&X-Amz-Expires=60")


def test_results_decode_by_shape():
    assert isinstance(decode_result(b'{"error": "x", "image_id": 3}'), ErrorResult)
    ok = decode_result(b'{"pipeline": "p", "source_images": [{"id": "3"}], "detections": []}')
    assert isinstance(ok, SuccessResult) and ok.source_images[0].id == "3"


_DETECTION = {"source_image_id": "1", "algorithm": {"key": "d"}, "bbox": {"x1": 1, "y1": 2, "x2": 3, "y2": 4},
              "score": 0.5, "classifications": [{"taxon": "Noctuidae", "algorithm": {"key": "c"}, "scores": [0.5]}]}


@pytest.mark.parametrize("result, one_pass", [
    ({"pipeline": "p", "source_images": [{"id": "1"}], "detections": [_DETECTION]}, True),
    ({"pipeline": "p", "source_images": [{"id": "1", "url": "u"}], "total_time": 2.5, "extra": {"a": [1]}}, True),
    # what the lenient reading normalises: read that way, never half-read in one pass
    ({"pipeline": "p", "source_images": [{"id": 1}], "detections": [{**_DETECTION, "source_image_id": 1}]}, False),
    ({"pipeline": "p", "source_images": [{"id": "1"}], "detections": [{**_DETECTION, "classifications": None}]},
     False),
    ({"pipeline": "p", "source_images": [{"id": "1"}], "detections": [{**_DETECTION, "classifications": [
        {"classification": "Noctuidae", "algorithm": {"key": "c"}, "scores": None, "labels": None}]}]}, False),
    # a top-level "error" makes an error result, whatever else the body holds; so does an escape spelling it
    ({"error": "boom", "image_id": "1", "pipeline": "p", "source_images": [{"id": "1"}]}, False),
    ({"\\u0065rror": "boom", "image_id": "1", "pipeline": "p", "source_images": [{"id": "1"}]}, False),
    ({"pipeline": "p", "source_images": [{"id": "1"}], "detections": [{**_DETECTION, "classifications": [
        {"taxon": "error", "algorithm": {"key": "c"}}]}]}, False),
])
def test_a_result_reads_the_same_in_one_pass_as_leniently(result, one_pass):
    """The common case (a result exactly as the contract writes it) is read in one typed pass; anything else is
    read after normalising. Both must give the same result for every body."""
    body = json.dumps(result).replace("\\\\u0065", "\\u0065").encode()
    assert (_success_as_specified(body) is not None) == one_pass
    assert decode_result(body) == _result_read_leniently(body)
    if "taxon" not in str(result):
        assert isinstance(decode_result(body), ErrorResult) == ("rror" in body.decode())


@pytest.mark.parametrize("body, message", [
    (b"[]", "must be a JSON object"),
    (b'{"pipeline": "p", "source_images": []}', "lists no source_images"),
    (b'{"pipeline": "p", "source_images": [{"id": "1"}], "detections": [{"source_image_id": "2", '
     b'"algorithm": {"key": "d"}}]}', "not in source_images"),
    (b'{"pipeline": "p", "source_images": [{"id": "1"}], "detections": [{"source_image_id": "1", '
     b'"algorithm": {"key": "d"}, "bbox": {"x1": "left"}}]}', "SuccessResult schema"),
    # lists of the wrong type (found by the property test: a TypeError instead of a verdict)
    (b'{"pipeline": "p", "source_images": [{"id": "1"}], "detections": true}', "SuccessResult schema"),
    (b'{"pipeline": "p", "source_images": true}', "SuccessResult schema"),
    (b'{"pipeline": "p", "source_images": [{"id": "1"}], "detections": [{"source_image_id": "1", '
     b'"algorithm": {"key": "d"}, "classifications": 5}]}', "SuccessResult schema"),
])
def test_bad_results_say_why(body, message):
    with pytest.raises(BadResult, match=message):
        decode_result(body)


def test_ack_subjects_are_bound_to_their_job():
    v1 = "$JS.ACK.PIPELINE_TASKS_moths.job-12.1.42.42.1713000000000000000.3"
    v2 = "$JS.ACK._.ACCHASH.PIPELINE_TASKS_moths.job-12.2.42.43.1713000000000000000.3.abc"
    assert names.parse_ack_subject(v1) == ("PIPELINE_TASKS_moths", "job-12", 1, 42)
    assert names.parse_ack_subject(v2) == ("PIPELINE_TASKS_moths", "job-12", 2, 42)
    assert names.reply_belongs_to_job(v1, 12) and names.reply_belongs_to_job(v2, 12)
    assert not names.reply_belongs_to_job(v1, 1)
    assert not names.reply_belongs_to_job("$JS.ACK.OTHER.job-12.1.42.42.1.3", 12)
    assert not names.reply_belongs_to_job("$JS.ACK.PIPELINE_TASKS.job-12.1.42.42.1.3", 12)  # the old single stream
    assert not names.reply_belongs_to_job("$JS.ACK.PIPELINE_TASKS_.job-12.1.42.42.1.3", 12)
    assert not names.reply_belongs_to_job("_INBOX.abc", 12)


def test_the_reference_systems_result_is_accepted_as_it_is():
    body = json.dumps({
        "pipeline": "moth-demo", "algorithms": {}, "total_time": 1.2, "errors": None,
        "source_images": [{"id": "123", "url": "https://x/123.jpg"}],
        "detections": [{"source_image_id": "123", "bbox": {"x1": 1, "y1": 2, "x2": 3, "y2": 4},
                        "inference_time": 0.1, "algorithm": {"name": "Detector", "key": "det-v1"},
                        "timestamp": "2026-11-29T04:00:00", "crop_image_url": None,
                        "classifications": [{"classification": "Noctuidae", "labels": None, "scores": [0.9],
                                             "logits": [2.1], "inference_time": 0.01, "terminal": True,
                                             "algorithm": {"name": "Classifier", "key": "cls-v1"},
                                             "timestamp": "2026-11-29T04:00:00"}]},
                       {"source_image_id": "123", "bbox": None, "algorithm": {"name": "D", "key": "det-v1"},
                        "classifications": None}]}).encode()
    result = decode_result(body)
    assert isinstance(result, SuccessResult)
    [classification] = result.detections[0].classifications
    assert (classification.taxon, classification.labels, classification.score) == ("Noctuidae", [], 0.9)
    assert result.detections[1].classifications == []


def test_every_wire_type_is_ready_to_decode_once_imported_so_threads_never_build_it_at_once():
    # msgspec builds a type's decoding information on first use; two worker threads doing that at once for
    # the same type crashed a worker process. Importing the modules must build it for every wire type:
    # after import, evaluating an annotation (what msgspec does while building) is made to fail.
    import subprocess
    import sys

    code = """
import msgspec._utils
from pipeline import schemas
from pipeline.core import inbox
from pipeline.web import gateway_api

def building(*args):
    raise AssertionError("msgspec built a type's decoding information after import")

msgspec._utils._eval_type = building
task = schemas.decode_task(b'{"job_id": 1, "image_id": "2", "image_url": "file:///a.png", "pipeline": "p", '
                           b'"reply_subject": "r"}')
ok = schemas.decode_result(b'{"pipeline": "p", "source_images": [{"id": "2"}], "detections": [{"source_image_id":'
                           b' "2", "algorithm": {"key": "d"}, "bbox": {"x1": 0, "y1": 0, "x2": 1, "y2": 1}, '
                           b'"classifications": [{"taxon": "t", "algorithm": {"key": "c"}, "scores": [0.9]}]}]}')
error = schemas.decode_result(b'{"error": "x", "image_id": "2"}')
spec = schemas.decode_pipeline_spec(b'{"slug": "p", "name": "P", "algorithms": [{"key": "d", "name": "D", '
                                    b'"task_type": "detection"}]}', source="t")
print(type(task).__name__, type(ok).__name__, type(error).__name__, type(spec).__name__)
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.split() == ["Task", "SuccessResult", "ErrorResult", "PipelineSpec"]


def test_a_result_read_from_the_wire_is_not_tracked_by_the_garbage_collector():
    # (reading a 50-image result makes about 900 objects; tracked, the collections they set off cost a worker more
    # than the reading itself)
    import gc

    body = json.dumps({"pipeline": "p", "source_images": [{"id": "1"}], "detections": [
        {"source_image_id": "1", "algorithm": {"key": "d"}, "bbox": {"x1": 0, "y1": 0, "x2": 1, "y2": 1},
         "score": 0.5, "classifications": [{"taxon": "t", "algorithm": {"key": "c"}, "scores": [0.5]}]}]}).encode()
    result = decode_result(body)
    [detection] = result.detections
    objects = [result, result.source_images[0], detection, detection.algorithm, detection.bbox,
               detection.classifications[0], detection.classifications[0].algorithm]
    assert not [type(o).__name__ for o in objects if gc.is_tracked(o)]
    assert not gc.is_tracked(decode_result(b'{"error": "model crashed", "image_id": "1"}'))
