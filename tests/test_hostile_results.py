"""Property: whatever a processing service sends — valid results mutated in type, size, unicode, nesting,
missing fields, truncated bytes, foreign or forged reply subjects — handling it never raises into
Dramatiq's retries or dead letters, leaves nothing in the inbox, and leaves every image of the job either
pending, processed with counters equal to its rows, or failed with a reason (invariant 10)."""

from __future__ import annotations

import json
import uuid

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from models import Detection, Job, JobImage, ResultInbox
from tests.helpers import dispatch, fake_job, handle_result_message, pull_tasks, success_body

#: Any JSON value, nested a little (deep nesting has its own test).
JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=50),
                    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
                    max_leaves=12)
PATHS = [("pipeline",), ("source_images",), ("source_images", 0, "id"), ("detections",),
         ("detections", 0, "source_image_id"), ("detections", 0, "bbox"), ("detections", 0, "bbox", "x1"),
         ("detections", 0, "algorithm", "key"), ("detections", 0, "score"),
         ("detections", 0, "classifications", 0, "taxon"), ("detections", 0, "classifications", 0, "scores"),
         ("detections", 0, "classifications", 0, "algorithm")]


def mutate(body: dict, path: tuple, action: str, value) -> dict:
    node = body
    for key in path[:-1]:
        node = node[key]
    if action == "delete":
        del node[path[-1]]
    else:
        node[path[-1]] = value
    return body


MUTATIONS = st.one_of(
    st.tuples(st.just("set"), st.sampled_from(PATHS), JSON),
    st.tuples(st.just("delete"), st.sampled_from(PATHS), st.none()),
    st.tuples(st.just("truncate"), st.integers(min_value=0, max_value=400), st.none()),
    st.tuples(st.just("unicode id"), st.text(min_size=1, max_size=6), st.none()),
    st.tuples(st.just("none"), st.none(), st.none()),
)
REPLIES = st.sampled_from(["own", "own and the other", "the other only", "foreign job", "garbage", "none"])
TOKENS = st.sampled_from(["own", "own and the other", "the other only", "forged", "none"])


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                 HealthCheck.too_slow])
@given(mutation=MUTATIONS, reply_kind=REPLIES, token_kind=TOKENS)
def test_any_result_message_leaves_the_job_consistent(runtime, moth_pipeline, mutation, reply_kind, token_kind):
    # Given a dispatched 2-image job whose tasks a service pulled
    job = fake_job(moth_pipeline, 2, prefix=f"file:///hostile/{uuid.uuid4().hex}")  # images of its own
    dispatch(runtime, job.id)
    (task, reply), (other, other_reply) = pull_tasks(runtime, job.id, 2)
    # When a mutated result for the first image arrives
    action, where, value = mutation
    body = json.loads(success_body(task, boxes=1))
    if action in ("set", "delete"):
        try:
            body = json.dumps(mutate(body, where, action, value)).encode()
        except (KeyError, IndexError, TypeError):
            body = json.dumps(body).encode()
    elif action == "truncate":
        body = json.dumps(body).encode()[:where]
    elif action == "unicode id":
        body = json.dumps(body).replace(f'"{task.image_id}"', json.dumps(where)).encode()
    else:
        body = json.dumps(body).encode()
    header = {"own": reply, "own and the other": f"{reply},{other_reply}", "the other only": other_reply,
              "foreign job": reply.replace(f"job-{job.id}.", f"job-{job.id + 1000}."), "garbage": "$JS.ACK.x.y",
              "none": None}[reply_kind]
    tokens = {"own": task.task_token, "own and the other": f"{task.task_token},{other.task_token}",
              "the other only": other.task_token, "forged": f"{task.image_id}.forgedforgedforgedforge",
              "none": None}[token_kind]
    handle_result_message(runtime, job.id, body, header, tokens)  # raises nothing
    # Then nothing waits in the inbox, and every image is pending, processed or failed with a reason
    assert not ResultInbox.select().where(ResultInbox.job_id == job.id).exists()
    rows = list(JobImage.select().where(JobImage.job == job.id))
    for row in rows:
        assert row.status in ("pending", "processed", "failed")
        if row.status == "failed":
            assert row.error and row.error.startswith(("bad result: ", "processing service error: "))
        boxes = Detection.select().where((Detection.image == row.image_id) & (Detection.bbox_key != "")).count()
        assert boxes == (row.detections if row.status == "processed" else 0)  # rows only for processed images
    # And the counters equal the rows
    stages = Job.get_by_id(job.id).progress["stages"]
    assert stages["process"]["processed"] == sum(r.status != "pending" for r in rows)
    assert stages["process"]["failed"] == sum(r.status == "failed" for r in rows)
    assert stages["results"]["detections"] == sum(r.detections for r in rows if r.status == "processed")
    # And an image whose token the message did not name is never decided by it (invariant 12)
    if token_kind not in ("own and the other", "the other only"):
        assert {r.status for r in rows if str(r.image_id) == other.image_id} <= {"pending"}
    if token_kind in ("forged", "none", "the other only"):
        assert {r.status for r in rows if str(r.image_id) == task.image_id} <= {"pending"}
    # And the other image still proceeds (its task was not settled by this message unless it named it)
    if rows and all(r.status == "pending" for r in rows if str(r.image_id) == other.image_id):
        handle_result_message(runtime, job.id, success_body(other, boxes=1), other_reply, other.task_token)
        assert JobImage.get((JobImage.job == job.id) & (JobImage.image == int(other.image_id))).status == "processed"
