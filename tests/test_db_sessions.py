"""jetpipe's PostgreSQL sessions carry their own limits, so a client lost with its host (no FIN, no RST)
costs seconds: the server probes silent clients and ends their sessions and locks, idle transactions end,
and a lock wait fails (and is retried) instead of waiting behind a dead session."""

from __future__ import annotations

import time
import uuid

import peewee
import psycopg2
import pytest

import models
from models import Job, SessionLimits, for_update, write_transaction
from tests.helpers import fake_job

pytestmark = pytest.mark.parametrize("db_url", ["postgres"], indirect=True)


def session_settings() -> dict[str, str]:
    names = ("lock_timeout", "idle_in_transaction_session_timeout", "tcp_keepalives_idle",
             "tcp_keepalives_interval", "tcp_keepalives_count", "tcp_user_timeout")
    rows = models.database.execute_sql("select name, setting from pg_settings where name in %s", (names,))
    return dict(rows.fetchall())


def test_every_session_has_jetpipes_limits(runtime):
    assert session_settings() == {"lock_timeout": "10000", "idle_in_transaction_session_timeout": "30000",
                                  "tcp_keepalives_idle": "5", "tcp_keepalives_interval": "2",
                                  "tcp_keepalives_count": "3", "tcp_user_timeout": "11000"}


def test_the_limits_follow_the_settings_and_the_urls_own_options_are_kept(runtime, db_url):
    models.bind(f"{db_url}?options=-c%20application_name%3Dlab", session=SessionLimits(
        lock_timeout_s=2, idle_in_transaction_s=0, dead_peer_s=20))
    try:
        found = session_settings()
        assert (found["lock_timeout"], found["tcp_keepalives_idle"], found["tcp_keepalives_interval"]) == (
            "2000", "11", "3")
        assert found["idle_in_transaction_session_timeout"] == "0"  # left to the server
        name = models.database.execute_sql("show application_name").fetchone()[0]
        assert name == "lab"
    finally:
        models.bind(db_url, session=runtime.settings.db_session())


def test_a_lock_held_by_a_silent_session_fails_the_wait_as_a_transient_error(runtime, db_url, moth_pipeline):
    # Given another session that holds a job's row lock and says nothing more
    job = fake_job(moth_pipeline, 1)
    models.bind(db_url, session=SessionLimits(lock_timeout_s=1))
    holder = psycopg2.connect(db_url)
    try:
        holder.cursor().execute('select id from "job" where id = %s for update', (job.id,))
        # When jetpipe waits for that lock, the wait ends within the limit, as an error a retry gets past
        started = time.monotonic()
        with pytest.raises(peewee.OperationalError) as raised, write_transaction():
            for_update(Job.select().where(Job.id == job.id)).get()
        assert time.monotonic() - started < 5
        assert models.is_transient(raised.value)
    finally:
        holder.close()
        models.bind(db_url, session=runtime.settings.db_session())


def test_a_transaction_left_idle_is_ended_by_the_server_and_its_locks_released(runtime, db_url, moth_pipeline):
    job = fake_job(moth_pipeline, 1)
    models.bind(db_url, session=SessionLimits(idle_in_transaction_s=1))
    try:
        with pytest.raises(peewee.PeeweeException), write_transaction():
            for_update(Job.select().where(Job.id == job.id)).get()
            time.sleep(2.5)  # a client gone quiet inside its transaction
            Job.select().count()
    finally:
        models.database.close()
        models.bind(db_url, session=runtime.settings.db_session())
    probe = psycopg2.connect(db_url)
    try:
        probe.cursor().execute("set lock_timeout = 2000")
        cursor = probe.cursor()
        cursor.execute('select id from "job" where id = %s for update', (job.id,))  # free again
        assert cursor.fetchone() == (job.id,)
    finally:
        probe.close()


def test_a_database_user_who_may_not_create_temporary_tables_is_ready_and_saves_in_bulk(settings):
    # (bulk inserts need no temporary table: a user without TEMPORARY takes rows in bulk all the same)
    from models import SourceImage, insert_ignoring_duplicates, utcnow
    from pipeline.infra.readiness import readiness
    from tests.conftest import PG_ADMIN_URL

    # Given a database whose user may make tables but not temporary ones
    name = f"jetpipe_notemp_{uuid.uuid4().hex[:8]}"
    admin = psycopg2.connect(PG_ADMIN_URL)
    admin.autocommit = True
    cursor = admin.cursor()
    cursor.execute(f"CREATE ROLE {name} LOGIN")
    cursor.execute(f"CREATE DATABASE {name}")
    cursor.execute(f"REVOKE TEMPORARY ON DATABASE {name} FROM PUBLIC")
    server = PG_ADMIN_URL.split("@", 1)[1].rsplit("/", 1)[0]  # host:port of the tests' server
    url = f"postgresql://{name}@{server}/{name}"
    owner = psycopg2.connect(f"{PG_ADMIN_URL.rsplit('/', 1)[0]}/{name}")  # the admin, in that database
    owner.autocommit = True
    owner.cursor().execute(f"GRANT USAGE, CREATE ON SCHEMA public TO {name}")
    owner.close()
    try:
        # Then /readyz says it is ready
        assert readiness(settings.with_overrides(database_url=url)) == (True, {"database": "ok", "redis": "ok",
                                                                                "nats": "ok"})
        # And rows go in in bulk, a second time counted as already there
        models.bind(url)
        models.create_schema()
        rows = [(f"file:///notemp/{i}.png", utcnow()) for i in range(1500)]
        assert insert_ignoring_duplicates(SourceImage, ("url", "created_at"), rows) == 1500
        assert insert_ignoring_duplicates(SourceImage, ("url", "created_at"), rows[:10]) == 0
    finally:
        models.database.obj.close()
        cursor.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
        cursor.execute(f"DROP ROLE IF EXISTS {name}")
        admin.close()
