"""Which image a task was for, by the stream sequence it was stored at: jetpipe's own record (`TaskRun`).

Dispatch records each round's PubAcks as runs of consecutive sequences (`record`); a result's reply subject
and an advisory name a task by its sequence, and `images_of` answers from those runs. A run never changes once
written, so a process keeps the runs it has read (up to `CACHED_IMAGES` images' worth) and asks the database only
for sequences none of them holds, one query per run that holds some: saving a job's results usually reads one
run per dispatch round, not a row per batch of results.
"""

from __future__ import annotations

import bisect
import threading
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from typing import NamedTuple

from models import TaskRun, bind_listeners, database, insert_ignoring_duplicates

#: Images' worth of runs a process keeps (about 60 bytes each); past that the runs of the jobs least recently
#: asked about are forgotten.
CACHED_IMAGES = 200_000

_FIELDS = ("job", "first_seq", "last_seq", "image_ids")


class Run(NamedTuple):
    first_seq: int
    last_seq: int
    image_ids: tuple[str, ...]

    def image_at(self, seq: int) -> str | None:
        return self.image_ids[seq - self.first_seq] if self.first_seq <= seq <= self.last_seq else None


def record(job_id: int, image_ids: Sequence[str], seqs: Sequence[int]) -> None:
    """Record that `image_ids[k]`'s task was stored at `seqs[k]` (inside the caller's transaction); recording
    the same tasks again (a round republished after a crash, deduplicated by NATS) changes nothing."""
    insert_ignoring_duplicates(TaskRun, _FIELDS, TaskRun.rows_for(job_id, image_ids, seqs))


def images_of(job_id: int, seqs: Iterable[int]) -> dict[int, str]:
    """The image of each of these sequences that holds a task of the job, by jetpipe's record (a sequence not
    recorded, or of another job's task, is left out)."""
    wanted = sorted(set(seqs))
    found = _cache.lookup(job_id, wanted)
    missing = [seq for seq in wanted if seq not in found]
    read: list[Run] = []
    while missing:  # the runs holding them, each read once; none between them (a late task and a new one)
        run = _run_reaching(job_id, missing[0])
        if run is None:
            break  # no run reaches that far: none of them is recorded
        held = {seq: image for seq in missing if (image := run.image_at(seq)) is not None}
        if held:  # (a run past a sequence no round holds is not kept)
            read.append(run)
            found.update(held)
        missing = [seq for seq in missing if seq > run.last_seq]  # those before the run are in none
    _cache.add(job_id, read)
    return found


def _run_reaching(job_id: int, seq: int) -> Run | None:
    """The job's first run that ends at or after `seq` (it holds `seq` if it starts at or before it)."""
    row = database.execute_sql(
        f'SELECT first_seq, last_seq, image_ids FROM "task_run" WHERE job_id = {database.obj.param} '
        f"AND last_seq >= {database.obj.param} ORDER BY last_seq LIMIT 1", (job_id, seq)).fetchone()
    return Run(row[0], row[1], tuple(row[2].split(","))) if row is not None else None


class _Runs:
    """The runs this process has read, by job, the jobs in the order they were last asked about."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.lock = threading.Lock()
        self.jobs: OrderedDict[int, list[Run]] = OrderedDict()  # each job's runs by first_seq
        self.images = 0

    def lookup(self, job_id: int, seqs: list[int]) -> dict[int, str]:
        with self.lock:
            runs = self.jobs.get(job_id)
            if runs is None:
                return {}
            self.jobs.move_to_end(job_id)
        firsts = [run.first_seq for run in runs]
        found = {}
        for seq in seqs:
            at = bisect.bisect_right(firsts, seq) - 1
            image = runs[at].image_at(seq) if at >= 0 else None
            if image is not None:
                found[seq] = image
        return found

    def add(self, job_id: int, runs: list[Run]) -> None:
        if not runs:
            return
        with self.lock:
            known = self.jobs.pop(job_id, [])
            starts = {run.first_seq for run in known}
            new = [run for run in runs if run.first_seq not in starts]
            self.jobs[job_id] = sorted(known + new)  # a new list: a reader may be going through the old one
            self.images += sum(len(run.image_ids) for run in new)
            while self.images > self.limit and len(self.jobs) > 1:
                _, dropped = self.jobs.popitem(last=False)
                self.images -= sum(len(run.image_ids) for run in dropped)
            if self.images > self.limit:  # this job alone: keep only what was just read
                self.jobs[job_id] = sorted(runs)
                self.images = sum(len(run.image_ids) for run in runs)

    def clear(self) -> None:
        with self.lock:
            self.jobs.clear()
            self.images = 0


_cache = _Runs(CACHED_IMAGES)
bind_listeners.append(_cache.clear)  # another database: its jobs are not these
