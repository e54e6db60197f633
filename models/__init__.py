"""peewee models and the database handle (SQLite by default, PostgreSQL by URL)."""

from __future__ import annotations

from models.db import (
    DatabaseURLError,
    SchemaMissing,
    SessionLimits,
    bind,
    bind_listeners,
    commit_listeners,
    database,
    execute_in,
    for_update,
    insert_ignoring_duplicates,
    is_postgres,
    is_transient,
    is_unstorable,
    make_database,
    plain_rows,
    select_in,
    thread_connection,
    tuples,
    undoable_write,
    utcnow,
    utcnow_stored,
    write_transaction,
)
from models.entities import (
    ALL_MODELS,
    Algorithm,
    Classification,
    Detection,
    DispatchMode,
    ImageStatus,
    Job,
    JobImage,
    JobLog,
    JobStatus,
    ParkedResult,
    Pipeline,
    Project,
    ResultInbox,
    SourceImage,
    TaskRun,
    WebhookDelivery,
)


def create_schema() -> None:
    """Create every table, column and index that does not exist yet (idempotent: also upgrades a database
    made by an earlier version in place)."""
    with database.connection_context():
        database.create_tables(ALL_MODELS, safe=True)
        _add_missing_columns()
        _task_sequences_into_runs()
        _drop_retired_indexes()
        _give_every_job_a_project()


def _add_missing_columns() -> None:
    """Columns added to a table after it was created (every such column is nullable)."""
    from playhouse.migrate import SchemaMigrator, migrate

    migrator = SchemaMigrator.from_database(database.obj)
    operations = []
    for model in ALL_MODELS:
        table = model._meta.table_name
        present = {column.name for column in database.get_columns(table)}
        operations += [migrator.add_column(table, field.column_name, field)
                       for field in model._meta.sorted_fields if field.column_name not in present]
    if operations:
        with database.atomic():
            migrate(*operations)


#: Indexes earlier versions made that another index begins with: every insert wrote them for nothing (the
#: longer index serves each of their lookups).
REDUNDANT_INDEXES = ("algorithm_pipeline_id", "job_image_job_id", "job_image_image_id", "detection_image_id",
                     "classification_detection_id", "webhook_delivery_job_id")
#: Indexes of columns earlier versions wrote and this one does not (`job_image.task_seq`: now `TaskRun`).
UNUSED_INDEXES = ("job_image_job_id_task_seq",)


def _task_sequences_into_runs() -> None:
    """Earlier versions recorded each image's task sequence in its `job_image` row (`task_seq`): the running jobs'
    are recorded as `TaskRun`s (once: a run already there is left alone), as dispatch records them now."""
    if "task_seq" not in {column.name for column in database.get_columns("job_image")}:
        return
    marks = ", ".join([database.obj.param] * len(JobStatus.RUNNING))
    rows = database.execute_sql(
        'SELECT i.job_id, i.image_id, i.task_seq FROM "job_image" AS i JOIN "job" AS j ON j.id = i.job_id '
        f"WHERE i.task_seq IS NOT NULL AND j.status IN ({marks})", JobStatus.RUNNING).fetchall()
    by_job: dict[int, tuple[list[str], list[int]]] = {}
    for job_id, image_id, seq in rows:
        images, seqs = by_job.setdefault(job_id, ([], []))
        images.append(str(image_id))
        seqs.append(seq)
    with database.atomic():
        for job_id, (images, seqs) in by_job.items():
            insert_ignoring_duplicates(TaskRun, ("job", "first_seq", "last_seq", "image_ids"),
                                       TaskRun.rows_for(job_id, images, seqs))


#: Checks and indexes earlier versions made for the references of result rows that are now `Reference`s
#: (models/entities.py): (table, constraint, index). SQLite cannot drop a constraint from a table: an older
#: SQLite database keeps checking them, which costs it little.
UNCHECKED_REFERENCES = (("detection", "detection_algorithm_id_fkey", "detection_algorithm_id"),
                        ("detection", "detection_job_id_fkey", "detection_job_id"),
                        ("classification", "classification_algorithm_id_fkey", "classification_algorithm_id"),
                        # (their indexes are gone already: REDUNDANT_INDEXES)
                        ("detection", "detection_image_id_fkey", "detection_image_id"),
                        ("classification", "classification_detection_id_fkey", "classification_detection_id"))


def _drop_retired_indexes() -> None:
    with database.atomic():
        for name in REDUNDANT_INDEXES + UNUSED_INDEXES:
            database.execute_sql(f'DROP INDEX IF EXISTS "{name}"')
        present = set()
        if is_postgres():  # (ALTER TABLE locks the table even when there is nothing to drop)
            present = {name for name, in database.execute_sql(
                "SELECT conname FROM pg_constraint WHERE conname IN %s",
                (tuple(constraint for _, constraint, _ in UNCHECKED_REFERENCES),)).fetchall()}
        for table, constraint, index in UNCHECKED_REFERENCES:
            if constraint in present:
                database.execute_sql(f'ALTER TABLE "{table}" DROP CONSTRAINT "{constraint}"')
            database.execute_sql(f'DROP INDEX IF EXISTS "{index}"')


DEFAULT_PROJECT = "default"


def default_project() -> Project:
    """The project of a job enqueued without one (created on first use)."""
    project, _ = Project.get_or_create(name=DEFAULT_PROJECT)
    return project


def _give_every_job_a_project() -> None:
    """Jobs made before projects belong to the default one."""
    if Job.select().where(Job.project.is_null()).exists():
        with database.atomic():
            Job.update(project=default_project()).where(Job.project.is_null()).execute()


__all__ = [
    # database
    "DatabaseURLError", "SchemaMissing", "SessionLimits",
    "DEFAULT_PROJECT", "default_project",
    "bind", "bind_listeners", "commit_listeners", "database", "create_schema", "execute_in", "for_update",
    "insert_ignoring_duplicates", "is_postgres", "make_database", "plain_rows", "tuples",
    "is_transient", "is_unstorable", "select_in", "thread_connection", "undoable_write", "utcnow", "utcnow_stored",
    "write_transaction",
    # vocabularies
    "DispatchMode", "ImageStatus", "JobStatus",
    # tables
    "ALL_MODELS", "Algorithm", "Classification", "Detection", "Job", "JobImage", "JobLog", "ParkedResult",
    "Pipeline", "Project", "ResultInbox", "SourceImage", "TaskRun", "WebhookDelivery",
]
