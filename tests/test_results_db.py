"""Result saving (invariant 3) and the guarded terminal transition (invariant 5), on SQLite and PostgreSQL."""

from __future__ import annotations

import pytest

import models
from models import Classification, Detection, ImageStatus, Job, JobImage, JobStatus
from pipeline.core import progress
from pipeline.core.result_rows import fail_images, save_result
from pipeline.errors import BadResult
from pipeline.infra.jobstate import Snapshot
from pipeline.schemas import Task, decode_result
from tests.helpers import at_once, fake_job, success_body


def task_of(job: Job, n: int = 0) -> Task:
    row = JobImage.select().where(JobImage.job == job.id).order_by(JobImage.id).offset(n).get()
    return Task(job.id, str(row.image_id), row.image.url, job.pipeline.slug)


def test_saving_the_same_result_three_times_creates_each_row_once(db_url, moth_pipeline):
    job = fake_job(moth_pipeline, 3)
    task = task_of(job)
    result = decode_result(success_body(task, boxes=3))
    outcomes = [save_result(job, result) for _ in range(3)]
    assert Detection.select().count() == 3
    assert Classification.select().count() == 3
    assert outcomes[0] == outcomes[1] == outcomes[2]  # a replay reports the same counts
    assert (outcomes[0][0].detections, outcomes[0][0].classifications) == (3, 3)
    row = JobImage.get(JobImage.job == job.id, JobImage.image == int(task.image_id))
    assert (row.status, row.detections, row.classifications) == (ImageStatus.PROCESSED, 3, 3)


def test_concurrent_duplicate_deliveries_create_no_duplicate_rows(db_url, moth_pipeline):
    # Given one image's result delivered to 6 workers at the same moment
    job = fake_job(moth_pipeline, 1)
    result = decode_result(success_body(task_of(job), boxes=4))

    def deliver():
        with models.database.connection_context():
            save_result(Job.get_by_id(job.id), result)

    at_once(6, deliver)  # raises if any delivery failed
    # Then the database holds each detection and classification once
    assert Detection.select().count() == 4
    assert Classification.select().count() == 4


def test_nothing_found_marker_is_saved_but_not_counted(db_url, moth_pipeline):
    job = fake_job(moth_pipeline, 1)
    [outcome] = save_result(job, decode_result(success_body(task_of(job), boxes=0)))
    assert (outcome.detections, outcome.captures) == (0, 1)
    assert [d.bbox_key for d in Detection.select()] == [""]


def test_undeclared_algorithm_is_bad_data(db_url, moth_pipeline):
    job = fake_job(moth_pipeline, 1)
    task = task_of(job)
    body = success_body(task, detector={"key": "yolo-v99", "name": "?"})
    with pytest.raises(BadResult, match=r"undeclared algorithm\(s\) \['yolo-v99'\]") as info:
        save_result(job, decode_result(body))
    assert info.value.image_ids == (task.image_id,)
    assert Detection.select().count() == 0


def test_image_outside_the_job_is_bad_data(db_url, moth_pipeline):
    job = fake_job(moth_pipeline, 1)
    stray = Task(job.id, "999999", "file:///x.png", moth_pipeline)
    with pytest.raises(BadResult, match="not part of job"):
        save_result(job, decode_result(success_body(stray)))


def test_database_is_the_arbiter_a_saved_success_is_never_turned_into_a_failure(db_url, moth_pipeline):
    job = fake_job(moth_pipeline, 1)
    task = task_of(job)
    save_result(job, decode_result(success_body(task, boxes=2)))
    [outcome] = fail_images(job.id, [task.image_id], "late error")
    assert (outcome.failed, outcome.detections) == (False, 2)
    assert JobImage.get(JobImage.job == job.id).status == ImageStatus.PROCESSED


def test_late_update_cannot_resurrect_a_revoked_job(db_url, moth_pipeline):
    job = fake_job(moth_pipeline, 2)
    assert progress.transition(job.id, JobStatus.REVOKED, error="canceled")
    written = progress.write_progress(job.id, Snapshot(2, 0, 0, 2, 4, 4), threshold=0.5)
    job = Job.get_by_id(job.id)
    assert (written.finished_now, job.status, job.progress["summary"]["status"]) == (False, "REVOKED", "REVOKED")
    assert not progress.transition(job.id, JobStatus.SUCCESS)


def test_exactly_one_of_many_concurrent_completions_makes_the_transition(db_url, moth_pipeline):
    job = fake_job(moth_pipeline, 2)
    progress.transition(job.id, JobStatus.STARTED)
    JobImage.update(status=ImageStatus.PROCESSED).where(JobImage.job == job.id).execute()  # results saved

    def complete():
        with models.database.connection_context():
            return progress.write_progress(job.id, Snapshot(2, 0, 0, 2, 0, 0), threshold=0.5).finished_now

    assert at_once(5, complete).count(True) == 1
    assert Job.get_by_id(job.id).status == JobStatus.SUCCESS


def test_no_index_is_written_that_another_already_covers_and_an_upgrade_drops_those_made_before(db_url):
    # Given a database of an earlier version, which indexed detections by image beside (image, algorithm, box)
    models.database.execute_sql('CREATE INDEX "detection_image_id" ON "detection" ("image_id")')
    # When it is upgraded
    models.create_schema()
    # Then no table has an index that another of its indexes begins with: each insert would write it for nothing
    for model in models.ALL_MODELS:
        indexes = models.database.get_indexes(model._meta.table_name)
        covered = [(ix.name, other.name) for ix in indexes for other in indexes
                   if ix is not other and not ix.unique and len(other.columns) > len(ix.columns)
                   and list(other.columns[:len(ix.columns)]) == list(ix.columns)]
        assert covered == [], model._meta.table_name
    assert "detection_image_id" not in {ix.name for ix in models.database.get_indexes("detection")}


def test_result_rows_refer_to_what_they_name_without_a_check_per_row_and_an_upgrade_drops_the_old_checks(
        db_url, moth_pipeline):
    # Given a PostgreSQL database of an earlier version, which checked (and indexed some of) those references
    if models.is_postgres():
        for table, column, target, indexed in (("detection", "algorithm_id", "algorithm", True),
                                               ("detection", "job_id", "job", True),
                                               ("classification", "algorithm_id", "algorithm", True),
                                               ("detection", "image_id", "source_image", False),
                                               ("classification", "detection_id", "detection", False)):
            models.database.execute_sql(f'ALTER TABLE "{table}" ADD FOREIGN KEY ("{column}") REFERENCES "{target}"')
            if indexed:
                models.database.execute_sql(f'CREATE INDEX "{table}_{column}" ON "{table}" ("{column}")')
    # When it is upgraded
    models.create_schema()
    # Then no reference of a result row is checked row by row, nor indexed for it
    checked = {(fk.table, fk.column) for table in ("detection", "classification")
               for fk in models.database.get_foreign_keys(table)}
    assert checked == set()
    indexed = {ix.name for table in ("detection", "classification") for ix in models.database.get_indexes(table)}
    assert not indexed & {"detection_algorithm_id", "detection_job_id", "classification_algorithm_id"}
    # And a result naming an algorithm its pipeline does not have, or an image not in the job, is still refused whole
    job = fake_job(moth_pipeline, 2)
    with pytest.raises(BadResult, match="not-in-the-pipeline"):
        save_result(job, decode_result(success_body(task_of(job), detector={"key": "not-in-the-pipeline"})))
    stranger = Task(job.id, "999999", "file:///elsewhere.png", job.pipeline.slug)
    with pytest.raises(BadResult, match="not part of job"):
        save_result(job, decode_result(success_body(stranger, boxes=2)))
    assert Detection.select().count() == Classification.select().count() == 0
    # And a saved result names its image, algorithms, detections and the job that saved it, which peewee follows
    task = task_of(job)
    save_result(job, decode_result(success_body(task, boxes=2)))
    detection = Detection.select().where(Detection.bbox_key != "").first()
    assert (detection.job.id, detection.algorithm.key, detection.image.url) == (job.id, "blob-detector-v1",
                                                                                task.image_url)
    assert {(c.algorithm.key, c.detection.image_id) for c in Classification.select()} == {
        ("moth-shape-v1", int(task.image_id))}
    assert Classification.select().join(Detection).count() == Classification.select().count() == 2
    # And deleting the job leaves its results, no longer naming it
    job.delete_instance(recursive=True)
    assert Detection.select().where(Detection.job.is_null()).count() == Detection.select().count() == 2


AWKWARD = 'tab\there, new\nline, cr\r, back\\slash \\N \\x41, "quoted", é, 🦋'


def test_awkward_text_goes_through_the_bulk_path_unchanged_and_duplicates_across_chunks_count_once(db_url,
                                                                                                   moth_pipeline):
    # (PostgreSQL takes these rows as one JSON parameter, where quotes, backslashes and control characters are
    # escaped; they meant something in the COPY text format it used before; SQLite takes them through executemany)
    import json

    from pipeline.core import manifests
    from pipeline.core.jobs import CREATE_CHUNK, create_job

    # Given a job whose manifest says awkward things of an image, and names an image again past the first chunk
    first = manifests.Row("file:///nowhere/awkward-0.png", {"note": AWKWARD}, AWKWARD[:40])
    rows = [first] + [manifests.Row(f"file:///nowhere/awkward-{i}.png", None) for i in range(1, CREATE_CHUNK + 5)]
    job = create_job(moth_pipeline, rows + [first, rows[7]], reuse=False)
    # Then each image is counted once, and what the manifest said is kept exactly
    assert job.total_images == CREATE_CHUNK + 5 == JobImage.select().where(JobImage.job == job.id).count()
    kept = JobImage.select().where(JobImage.job == job.id).order_by(JobImage.id).first()
    assert (json.loads(kept.meta), kept.etag) == ({"note": AWKWARD}, AWKWARD[:40])
    # And a result whose classification says awkward things is saved as it said them
    body = json.loads(success_body(task_of(job), boxes=1))
    body["detections"][0]["classifications"][0].update(taxon=AWKWARD, labels=[AWKWARD, "\\"])
    save_result(job, decode_result(json.dumps(body).encode()))
    saved = Classification.get()
    assert (saved.taxon, saved.labels) == (AWKWARD, [AWKWARD, "\\"])
