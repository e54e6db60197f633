"""jetpipe's record of which image each task was for, by the stream sequence it was stored at (`TaskRun`): what a
result's reply subject and a TERM advisory are checked against (invariant 12)."""

from __future__ import annotations

import models
from models import Job, JobImage, JobStatus, TaskRun, write_transaction
from pipeline.core import task_runs
from tests.helpers import fake_job


def images(job: Job) -> list[str]:
    return [str(i) for i, in JobImage.select(JobImage.image).where(JobImage.job == job.id).order_by(JobImage.id)
            .tuples()]


def test_tasks_stored_at_consecutive_sequences_make_one_run_and_another_jobs_tasks_break_it():
    # tasks given in any order; sequences 13 and 14 went to another job's tasks
    assert TaskRun.rows_for(7, ["a", "b", "c", "d", "e"], [12, 11, 15, 10, 16]) == [
        (7, 10, 12, "d,b,a"), (7, 15, 16, "c,e")]
    assert TaskRun.rows_for(7, [], []) == []


def test_each_sequence_names_its_own_jobs_image_and_nothing_else(db_url, moth_pipeline):
    # Given two jobs whose tasks were published interleaved, and a round of the first recorded twice (a republish)
    first, second = fake_job(moth_pipeline, 6), fake_job(moth_pipeline, 3, prefix="file:///nowhere/other")
    a, b = images(first), images(second)
    with write_transaction():
        task_runs.record(first.id, a[:3], [100, 101, 102])
        task_runs.record(second.id, b, [103, 104, 105])
        task_runs.record(first.id, a[3:], [106, 107, 108])
    with write_transaction():
        task_runs.record(first.id, a[3:], [106, 107, 108])
    assert TaskRun.select().count() == 3
    # Then each recorded sequence gives its image, in its own job only; one not recorded gives nothing
    assert task_runs.images_of(first.id, range(99, 110)) == dict(zip([100, 101, 102, 106, 107, 108], a, strict=True))
    assert task_runs.images_of(second.id, [100, 104, 105, 106]) == {104: b[1], 105: b[2]}
    assert task_runs.images_of(first.id, []) == {}


def test_a_run_once_read_is_answered_without_the_database_until_another_database_is_bound(db_url, moth_pipeline):
    job = fake_job(moth_pipeline, 4)
    ids = images(job)
    with write_transaction():
        task_runs.record(job.id, ids, [1, 2, 3, 4])
    assert task_runs.images_of(job.id, [2]) == {2: ids[1]}
    # a run never changes once written: a process keeps what it read (here, proven by taking the row away)
    TaskRun.delete().execute()
    assert task_runs.images_of(job.id, [1, 4]) == {1: ids[0], 4: ids[3]}
    # pointing the models at a database again forgets it (job ids there are that database's own)
    models.bind(db_url)
    assert task_runs.images_of(job.id, [1, 4]) == {}


def test_the_runs_kept_are_bounded_and_a_job_asked_about_again_is_read_again(db_url, moth_pipeline, monkeypatch):
    kept = task_runs._Runs(limit=5)
    monkeypatch.setattr(task_runs, "_cache", kept)
    old, new = fake_job(moth_pipeline, 4), fake_job(moth_pipeline, 4, prefix="file:///nowhere/new")
    with write_transaction():
        task_runs.record(old.id, images(old), [1, 2, 3, 4])
        task_runs.record(new.id, images(new), [5, 6, 7, 8])
    task_runs.images_of(old.id, [1])
    task_runs.images_of(new.id, [5])  # past the limit: the job asked about least recently goes
    assert list(kept.jobs) == [new.id] and kept.images == 4
    assert task_runs.images_of(old.id, [3]) == {3: images(old)[2]}  # from the database again
    assert list(kept.jobs) == [old.id] and kept.images == 4


def test_an_upgrade_records_the_running_jobs_task_sequences_as_runs(db_url, moth_pipeline):
    # Given a database of an earlier version, which kept each image's task sequence in its row, with a running
    # job and an ended one
    running, ended = fake_job(moth_pipeline, 5), fake_job(moth_pipeline, 2, prefix="file:///nowhere/ended")
    Job.update(status=JobStatus.SUCCESS).where(Job.id == ended.id).execute()
    models.database.execute_sql('ALTER TABLE "job_image" ADD COLUMN "task_seq" BIGINT')
    models.database.execute_sql('CREATE INDEX "job_image_job_id_task_seq" ON "job_image" ("job_id", "task_seq")')
    for n, image in enumerate(images(running) + images(ended)):
        seq = n + 1 if n != 2 else None  # the third image's task not yet published
        models.database.execute_sql(f'UPDATE "job_image" SET "task_seq" = {models.database.obj.param} '
                                    f'WHERE "image_id" = {models.database.obj.param}', (seq, int(image)))
    # When it is upgraded (twice: init-db may run again)
    models.create_schema()
    models.create_schema()
    # Then the running job's recorded tasks are runs, the ended job's are not needed, and the old index is gone
    ids = images(running)
    assert task_runs.images_of(running.id, range(1, 8)) == {1: ids[0], 2: ids[1], 4: ids[3], 5: ids[4]}
    assert [(r.first_seq, r.last_seq) for r in TaskRun.select().order_by(TaskRun.first_seq)] == [(1, 2), (4, 5)]
    assert "job_image_job_id_task_seq" not in {ix.name for ix in models.database.get_indexes("job_image")}


def test_only_the_runs_holding_the_sequences_asked_for_are_read(db_url, moth_pipeline, monkeypatch):
    # Given a job dispatched in four rounds, with another job's tasks between them
    kept = task_runs._Runs(limit=1000)
    monkeypatch.setattr(task_runs, "_cache", kept)
    job = fake_job(moth_pipeline, 12)
    ids = images(job)
    with write_transaction():
        for n, first in enumerate((1, 10, 20, 30)):
            task_runs.record(job.id, ids[3 * n:3 * n + 3], [first, first + 1, first + 2])
    # When a batch names a task of the first round, one of the last, and sequences no round holds
    found = task_runs.images_of(job.id, [2, 5, 31, 40])
    # Then it gets their images, having read those two rounds only (a late task beside a new one must not read
    # every round of a big job between them)
    assert found == {2: ids[1], 31: ids[10]}
    assert [run.first_seq for run in kept.jobs[job.id]] == [1, 30]
