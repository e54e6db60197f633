"""peewee models and the database handle (SQLite by default, PostgreSQL by URL)."""

from __future__ import annotations

from models.db import (
    bind,
    database,
    for_update,
    insert_ignoring_duplicates,
    is_postgres,
    thread_connection,
    utcnow,
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
    Pipeline,
    ResultInbox,
    SourceImage,
)


def create_schema() -> None:
    """Create every table and index that does not exist yet (idempotent)."""
    with database.connection_context():
        database.create_tables(ALL_MODELS, safe=True)


__all__ = [
    # database
    "bind", "database", "create_schema", "for_update", "insert_ignoring_duplicates", "is_postgres", "thread_connection",
    "utcnow", "write_transaction",
    # vocabularies
    "DispatchMode", "ImageStatus", "JobStatus",
    # tables
    "ALL_MODELS", "Algorithm", "Classification", "Detection", "Job", "JobImage", "JobLog", "Pipeline",
    "ResultInbox", "SourceImage",
]
