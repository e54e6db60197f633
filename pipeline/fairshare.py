"""Which job a processing service serves next: priority first, then weighted fair share between projects.

The rule, part of the wire contract (docs/processing-services.md, "Which job next"), for the jobs of one
pipeline that have tasks waiting:

1. Only the jobs of the highest priority are served; a lower priority waits until they have no task left.
2. Among those, each project gets a share of the service in proportion to its weight, and a project's share
   is split evenly between its jobs.

`Stride` turns the shares into an order (stride scheduling): each job has a *pass*; serving `n` of its tasks
adds `n / share`; the next job is the one with the smallest pass. A job that starts, or has tasks again after
having none, begins at the smallest pass of the others: it gets its share from then on, no credit for the time
before. The SDK and the HTTP gateway both follow it, and a service written from the contract alone may too.
"""

from __future__ import annotations

import dataclasses
import re
import threading
from collections import defaultdict
from collections.abc import Iterable

from pipeline.errors import UserInputError

PROJECT_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,99}")


def check_project_name(name: str) -> str:
    if not PROJECT_NAME.fullmatch(name or ""):
        raise UserInputError(f"project name {name!r}: use 1 to 100 letters, digits, '.', '_' or '-', starting with "
                             "a letter or digit")
    return name


#: Named priorities; any whole number from MIN_PRIORITY to MAX_PRIORITY is allowed too.
PRIORITIES = {"low": -5, "normal": 0, "high": 5, "urgent": 10}
MIN_PRIORITY, MAX_PRIORITY = -10, 10
MIN_WEIGHT, MAX_WEIGHT = 0.01, 1000.0


def parse_priority(value: str | int) -> int:
    """A priority from a name (low, normal, high, urgent) or a whole number; UserInputError says what is allowed."""
    text = str(value).strip().lower()
    if text in PRIORITIES:
        return PRIORITIES[text]
    try:
        number = int(text)
    except ValueError:
        number = None
    if number is None or not MIN_PRIORITY <= number <= MAX_PRIORITY:
        raise UserInputError(f"priority {value!r} is not one of {', '.join(PRIORITIES)} or a whole number from "
                             f"{MIN_PRIORITY} to {MAX_PRIORITY}")
    return number


def priority_name(priority: int | None) -> str:
    """`high` for 5, `3` for 3."""
    value = priority or 0
    return next((name for name, number in PRIORITIES.items() if number == value), str(value))


def check_weight(weight: float) -> float:
    if not MIN_WEIGHT <= weight <= MAX_WEIGHT:
        raise UserInputError(f"a project's weight must be from {MIN_WEIGHT} to {MAX_WEIGHT:g}, not {weight!r}")
    return float(weight)


@dataclasses.dataclass(frozen=True)
class Claim:
    """A job asking for service: its project, that project's weight, and its priority."""

    job_id: int
    project: str = "default"
    priority: int = 0
    weight: float = 1.0


#: The keys of a job consumer's metadata that carry its claim (NATS 2.10 and later keep consumer metadata).
METADATA_KEYS = ("project", "priority", "weight", "paused")


def metadata_of(claim: Claim, *, paused: bool = False) -> dict[str, str]:
    """What a job's consumer carries in its metadata for services to read when they list the consumers."""
    return {"project": claim.project, "priority": str(claim.priority), "weight": f"{claim.weight:g}",
            "paused": "true" if paused else "false"}


def claim_from_metadata(job_id: int, metadata: dict[str, str] | None) -> tuple[Claim, bool]:
    """(claim, paused) from a job consumer's metadata; a consumer without it (made by an older jetpipe, or
    on a server that keeps no metadata) is a `default` project job of priority 0 and weight 1."""
    metadata = metadata or {}
    try:
        priority = int(metadata.get("priority", 0))
        weight = float(metadata.get("weight", 1.0))
    except ValueError:
        priority, weight = 0, 1.0
    return (Claim(job_id, metadata.get("project") or "default", priority, weight if weight > 0 else 1.0),
            metadata.get("paused") == "true")


def shares(claims: Iterable[Claim]) -> dict[int, float]:
    """Each job's fraction of the service among the jobs of its own priority (they sum to 1 per priority):
    projects in proportion to their weights, a project's part split evenly between its jobs."""
    levels: dict[int, dict[str, list[Claim]]] = defaultdict(lambda: defaultdict(list))
    for claim in claims:
        levels[claim.priority][claim.project].append(claim)
    result: dict[int, float] = {}
    for projects in levels.values():
        total = sum(max(jobs[0].weight, MIN_WEIGHT) for jobs in projects.values())
        for jobs in projects.values():
            part = max(jobs[0].weight, MIN_WEIGHT) / total
            for claim in jobs:
                result[claim.job_id] = part / len(jobs)
    return result


class Stride:
    """The order in which to serve jobs so that each gets its share over time (thread-safe)."""

    def __init__(self) -> None:
        self._pass: dict[int, float] = {}
        self._active: set[int] = set()  # the jobs that had tasks at the last `order`
        self._lock = threading.Lock()

    def order(self, claims: Iterable[Claim]) -> list[Claim]:
        """`claims` (jobs with tasks waiting) in the order to serve them: highest priority first, then the
        smallest pass. A job new to the set starts at the smallest pass of those that stay."""
        claims = list(claims)
        with self._lock:
            ids = {c.job_id for c in claims}
            staying = [self._pass[j] for j in ids & self._active if j in self._pass]
            floor = min(staying) if staying else min((self._pass.get(j, 0.0) for j in ids), default=0.0)
            for job_id in ids - self._active:
                self._pass[job_id] = max(self._pass.get(job_id, floor), floor)
            self._active = ids
            if len(self._pass) > 4 * len(ids) + 64:  # forget the jobs that have no tasks waiting
                self._pass = {j: p for j, p in self._pass.items() if j in ids}
            return sorted(claims, key=lambda c: (-c.priority, self._pass[c.job_id], c.job_id))

    def served(self, claims: Iterable[Claim], job_id: int, tasks: int) -> None:
        """`tasks` of job `job_id` were handed out: its pass moves on by tasks / share."""
        share = shares(claims).get(job_id)
        if not share or tasks <= 0:
            return
        with self._lock:
            self._pass[job_id] = self._pass.get(job_id, 0.0) + tasks / share

    def due(self, claims: Iterable[Claim], job_id: int, tasks: int) -> bool:
        """Whether job `job_id` may be handed `tasks` tasks now: it is of the highest priority among
        `claims` and its pass is at most one such hand-out past the smallest pass (a job not among `claims`
        is due: nothing competes with what it asks for)."""
        ordered = self.order(claims)
        mine = next((c for c in ordered if c.job_id == job_id), None)
        if mine is None or len(ordered) == 1:
            return True
        top = [c for c in ordered if c.priority == ordered[0].priority]
        if mine.priority != top[0].priority:
            return False
        share = shares(ordered).get(job_id) or 1.0
        with self._lock:
            return self._pass[job_id] <= self._pass[top[0].job_id] + max(tasks, 1) / share
