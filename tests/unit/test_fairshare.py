"""The rule that decides which job a service serves next (pipeline/fairshare.py): priorities, weighted shares
between projects, and the stride order that turns shares into turns."""

from __future__ import annotations

from collections import Counter

import pytest

from pipeline import fairshare
from pipeline.errors import UserInputError
from pipeline.fairshare import Claim, Stride


def serve(stride: Stride, claims: list[Claim], turns: int, *, batch: int = 4) -> Counter:
    """Hand out `turns` batches, each to the job first in the stride's order: tasks per job."""
    got: Counter = Counter()
    for _ in range(turns):
        first = stride.order(claims)[0]
        stride.served(claims, first.job_id, batch)
        got[first.job_id] += batch
    return got


@pytest.mark.parametrize(("text", "value"), [("low", -5), ("normal", 0), ("HIGH", 5), ("urgent", 10), ("3", 3),
                                             (-10, -10)])
def test_priorities_are_names_or_small_whole_numbers(text, value):
    assert fairshare.parse_priority(text) == value


@pytest.mark.parametrize("text", ["11", "-11", "soon", "1.5", ""])
def test_a_priority_out_of_range_or_unknown_is_refused_saying_what_is_allowed(text):
    with pytest.raises(UserInputError, match="low, normal, high, urgent"):
        fairshare.parse_priority(text)


def test_projects_share_by_weight_and_a_projects_share_is_split_between_its_jobs():
    shares = fairshare.shares([Claim(1, "a", weight=3), Claim(2, "b", weight=1), Claim(3, "b", weight=1)])
    assert shares == pytest.approx({1: 0.75, 2: 0.125, 3: 0.125})


def test_two_projects_weighted_three_to_one_get_three_to_one_of_the_turns():
    got = serve(Stride(), [Claim(1, "a", weight=3), Claim(2, "b", weight=1)], 400)
    assert got[1] / got[2] == pytest.approx(3, rel=0.02)


def test_a_job_that_arrives_late_gets_its_share_from_then_on_not_a_backlog_of_credit():
    stride = Stride()
    serve(stride, [Claim(1, "a")], 1000)  # a big job alone for a long time
    got = serve(stride, [Claim(1, "a"), Claim(2, "b")], 100)  # then a small one of another project
    assert got[1] == got[2] == 200  # half each: the newcomer neither waits nor monopolizes


def test_a_job_that_had_no_task_for_a_while_comes_back_without_credit():
    stride = Stride()
    both = [Claim(1, "a"), Claim(2, "b")]
    serve(stride, both, 10)
    serve(stride, [Claim(1, "a")], 100)  # job 2 had no task waiting meanwhile
    got = serve(stride, both, 100)
    assert abs(got[1] - got[2]) <= 4


def test_the_highest_priority_is_served_first_and_a_lower_one_only_when_it_has_nothing():
    stride = Stride()
    claims = [Claim(1, "a", priority=0), Claim(2, "b", priority=5)]
    assert serve(stride, claims, 50) == Counter({2: 200})
    assert stride.due(claims, 2, 4) and not stride.due(claims, 1, 4)
    assert stride.due([Claim(1, "a", priority=0)], 1, 4)  # the urgent job has no task left


def test_a_job_ahead_of_its_share_is_not_due_until_the_others_catch_up():
    stride = Stride()
    claims = [Claim(1, "a"), Claim(2, "b")]
    stride.order(claims)
    stride.served(claims, 1, 4)
    stride.served(claims, 1, 4)
    assert stride.due(claims, 2, 4)
    assert not stride.due(claims, 1, 4)
    stride.served(claims, 2, 8)
    assert stride.due(claims, 1, 4)


def test_a_claim_travels_in_consumer_metadata_and_a_consumer_without_it_is_a_default_job():
    claim = Claim(7, "lab-a", priority=5, weight=2.5)
    metadata = fairshare.metadata_of(claim, paused=True)
    assert all(isinstance(v, str) for v in metadata.values())
    assert fairshare.claim_from_metadata(7, metadata) == (claim, True)
    assert fairshare.claim_from_metadata(8, None) == (Claim(8), False)
    assert fairshare.claim_from_metadata(9, {"priority": "x", "weight": "-1"}) == (Claim(9), False)


@pytest.mark.parametrize("name", ["lab-a", "Season_2025.v2", "x"])
def test_project_names_are_short_words(name):
    assert fairshare.check_project_name(name) == name


@pytest.mark.parametrize("name", ["", "-lab", "a b", "a/b", "x" * 101, "lab+b"])
def test_a_project_name_that_is_not_a_short_word_is_refused(name):
    with pytest.raises(UserInputError, match="project name"):
        fairshare.check_project_name(name)


@pytest.mark.parametrize("weight", [0, -1, 1001])
def test_a_weight_out_of_range_is_refused(weight):
    with pytest.raises(UserInputError, match="weight"):
        fairshare.check_weight(weight)
