"""The gateway's fair share: which job an HTTP service is handed tasks of (pipeline/fairshare.py's rule).

A worker written for the reference system lists jobs and takes tasks of the first one until a reservation
comes back empty, then of the next. So the gateway lists a pipeline's running jobs in the order the rule
decides, and answers a reservation for a job that is not due (another job of its pipeline has a higher
priority, or is owed its share) with no tasks: the worker moves on to the job that is due, and lists again
when it has been round them all. Jobs with no task waiting (all handed out, or paused) are not in the way.
"""

from __future__ import annotations

import threading
import time

from pipeline import fairshare
from pipeline.core import scheduling
from pipeline.errors import TransientError
from pipeline.infra.runtime import Runtime

#: Seconds a pipeline's picture (its running jobs' claims and tasks waiting) is reused between reservations.
FRESH_S = 1.0


class GatewayShare:
    """One per web process: the order of each pipeline's jobs, and which job is due."""

    def __init__(self) -> None:
        self._stride: dict[str, fairshare.Stride] = {}
        self._seen: dict[str, tuple[float, list[fairshare.Claim]]] = {}  # per pipeline: (when, jobs with work)
        self._lock = threading.Lock()

    def _stride_of(self, slug: str) -> fairshare.Stride:
        with self._lock:
            return self._stride.setdefault(slug, fairshare.Stride())

    def waiting(self, runtime: Runtime, slug: str) -> list[fairshare.Claim]:
        """The pipeline's running, unpaused jobs that have tasks waiting (read at most every FRESH_S)."""
        with self._lock:
            seen = self._seen.get(slug)
        if seen is not None and time.monotonic() - seen[0] < FRESH_S:
            return seen[1]
        pending = {c.job_id: c.num_pending for c in runtime.tasks.job_consumers(slug)}
        claims = [claim for claim, _, paused in scheduling.running_claims([slug])
                  if not paused and pending.get(claim.job_id, 0) > 0]
        with self._lock:
            self._seen[slug] = (time.monotonic(), claims)
        return claims

    def due(self, runtime: Runtime, slug: str, job_id: int, tasks: int) -> bool:
        """Whether job `job_id` is to be handed up to `tasks` tasks now. NATS unreachable: yes (the
        reservation itself then says what is wrong)."""
        try:
            claims = self.waiting(runtime, slug)
        except TransientError:
            return True
        return self._stride_of(slug).due(claims, job_id, tasks)

    def served(self, slug: str, job_id: int, tasks: int) -> None:
        """`tasks` of job `job_id` were handed out; none: it has no task waiting now (it stops being in the way
        of the others until the picture is read again)."""
        with self._lock:
            seen = self._seen.get(slug)
        claims = seen[1] if seen else []
        if tasks:
            self._stride_of(slug).served(claims, job_id, tasks)
        elif seen is not None:
            with self._lock:
                self._seen[slug] = (seen[0], [c for c in claims if c.job_id != job_id])

    def rank(self, runtime: Runtime, slugs: list[str]) -> dict[int, tuple[int, int]]:
        """Per job with tasks waiting: (-priority, place in its pipeline's order), to list jobs by."""
        ranks: dict[int, tuple[int, int]] = {}
        for slug in slugs:
            try:
                claims = self.waiting(runtime, slug)
            except TransientError:
                continue
            for place, claim in enumerate(self._stride_of(slug).order(claims)):
                ranks[claim.job_id] = (-claim.priority, place)
        return ranks
