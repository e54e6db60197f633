"""The database handle: one peewee proxy, bound to SQLite (default) or PostgreSQL by URL."""

from __future__ import annotations

import datetime as dt
import json
from urllib.parse import parse_qs, unquote, urlsplit

import peewee
from playhouse.pool import PooledPostgresqlDatabase

from pipeline.errors import ConfigError

database = peewee.DatabaseProxy()

#: Seconds a SQLite writer waits for the lock before raising "database is locked".
SQLITE_BUSY_TIMEOUT_S = 30
#: Connections one process keeps at most (Dramatiq threads + bridge + scheduler, with room to spare).
POOL_MAX_CONNECTIONS = 32
#: Seconds an idle pooled connection is kept before it is replaced by a fresh one.
POOL_STALE_S = 300


def utcnow() -> dt.datetime:
    """Naive UTC now: every timestamp in the database is naive UTC (portable across SQLite and PostgreSQL)."""
    return dt.datetime.now(dt.UTC).replace(tzinfo=None)


def make_database(url: str) -> peewee.Database:
    """An unconnected peewee Database for `url` (sqlite:///path, sqlite:///:memory:, postgresql://...)."""
    parts = urlsplit(url)
    if parts.scheme == "sqlite":
        path = unquote(url.split("://", 1)[1])
        path = path[1:] if path.startswith("/") else path  # sqlite:///rel.db -> rel.db, sqlite:////abs -> /abs
        # Not pooled: a pooled sqlite3 connection moves between threads, and one worker segfaulted so in
        # testing. Per-thread connections are cheap to open (a local file); PostgreSQL is pooled.
        return peewee.SqliteDatabase(
            path or ":memory:",
            timeout=SQLITE_BUSY_TIMEOUT_S,
            pragmas={
                "journal_mode": "wal",  # readers never block the writer
                "busy_timeout": SQLITE_BUSY_TIMEOUT_S * 1000,
                "foreign_keys": 1,
                "synchronous": "normal",  # safe with WAL: a crash loses no committed transaction
            },
            check_same_thread=False,
        )
    if parts.scheme in ("postgres", "postgresql"):
        extra = {k: v[-1] for k, v in parse_qs(parts.query).items()}  # e.g. ?sslmode=require&connect_timeout=5
        return PooledPostgresqlDatabase(
            (parts.path or "/").lstrip("/") or "postgres",
            user=unquote(parts.username) if parts.username else None,
            password=unquote(parts.password) if parts.password else None,
            host=parts.hostname or "127.0.0.1",
            port=parts.port or 5432,
            autorollback=True,
            max_connections=POOL_MAX_CONNECTIONS, stale_timeout=POOL_STALE_S, timeout=30,
            **{"connect_timeout": 10, **extra},
        )
    raise ConfigError(f"unsupported database URL scheme {parts.scheme!r} (use sqlite:/// or postgresql://)")


def bind(url: str) -> peewee.Database:
    """Point the models at `url` (closing any previous connection) and return the database."""
    current = database.obj
    if current is not None and not current.is_closed():
        current.close()
    db = make_database(url)
    database.initialize(db)
    return db


def is_postgres() -> bool:
    return isinstance(database.obj, peewee.PostgresqlDatabase)


class JSONField(peewee.TextField):
    """JSON stored as text: the same column type on SQLite and PostgreSQL."""

    def db_value(self, value):
        return None if value is None else json.dumps(value, separators=(",", ":"), sort_keys=True)

    def python_value(self, value):
        return None if value is None else json.loads(value)


class BaseModel(peewee.Model):
    class Meta:
        database = database
        legacy_table_names = False


def write_transaction():
    """A transaction that takes the write lock up front.

    SQLite: BEGIN IMMEDIATE, so a read-then-write transaction never fails on lock upgrade (SQLite
    serialises writers). PostgreSQL: an ordinary transaction; lock rows with `for_update`.
    """
    db = database.obj
    if isinstance(db, peewee.SqliteDatabase):
        return db.atomic(lock_type="IMMEDIATE")
    return db.atomic()


def for_update(query):
    """`query` with a row lock (SELECT ... FOR UPDATE) on PostgreSQL; SQLite's write lock already serialises."""
    return query.for_update() if is_postgres() else query
