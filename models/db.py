"""The database handle: one peewee proxy, bound to SQLite (default) or PostgreSQL by URL.

It is also jetpipe's one boundary for database errors: a missing schema becomes `SchemaMissing` here,
whatever the driver; `is_transient` and `is_unstorable` are the only places that decide what a database
error means for a retry. Callers never look at an error's module or message text.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import json
import threading
from collections.abc import Callable, Iterable, Iterator
from typing import Any, TypeVar
from urllib.parse import parse_qs, unquote, urlsplit

import msgspec
import peewee
from playhouse.pool import PooledPostgresqlDatabase

_Query = TypeVar("_Query", bound=peewee.Select)

database = peewee.DatabaseProxy()

#: Called after each write transaction commits (the metrics count them; models imports nothing of pipeline).
commit_listeners: list[Callable[[], None]] = []
#: Called when the models are pointed at another database (`bind`): what a process keeps of the last one's rows goes.
bind_listeners: list[Callable[[], None]] = []

#: Seconds a SQLite writer waits for the lock before raising "database is locked".
SQLITE_BUSY_TIMEOUT_S = 30
#: Connections one process keeps at most (Dramatiq threads + bridge + scheduler, with room to spare).
POOL_MAX_CONNECTIONS = 32
#: Seconds an idle pooled connection is kept before it is replaced by a fresh one.
POOL_STALE_S = 300


@dataclasses.dataclass(frozen=True)
class SessionLimits:
    """What jetpipe sets on each PostgreSQL session it opens, so that a client lost with its host (a cut
    link: no FIN, no RST) costs seconds, not the hours the server's defaults give it: the server probes a
    silent client with TCP keepalives and ends its session, releasing its locks, after about
    `dead_peer_s`; a transaction left idle longer than `idle_in_transaction_s` is ended; a lock wait longer
    than `lock_timeout_s` fails (a transient error: it is retried) instead of waiting behind a dead
    session. The client probes the server the same way. 0 leaves a limit to the server."""

    lock_timeout_s: float = 10.0
    idle_in_transaction_s: float = 30.0
    dead_peer_s: float = 11.0

    def keepalives(self) -> tuple[int, int, int]:
        """(idle, interval, count) of TCP keepalives that give up on a silent peer after ~dead_peer_s."""
        interval = max(1, round(self.dead_peer_s / 6))
        return max(1, round(self.dead_peer_s - 3 * interval)), interval, 3

    def connect_params(self, options: str = "") -> dict:
        """psycopg2 connection parameters: the client's keepalives and the session's settings (`options`,
        the URL's own, is kept and comes last)."""
        params: dict = {}
        server: list[str] = []
        if self.dead_peer_s > 0:
            idle, interval, count = self.keepalives()
            params.update(keepalives=1, keepalives_idle=idle, keepalives_interval=interval, keepalives_count=count,
                          tcp_user_timeout=int(self.dead_peer_s * 1000))
            # keepalives cover a silent connection; tcp_user_timeout one whose sent data is never acknowledged
            server += [f"tcp_keepalives_idle={idle}", f"tcp_keepalives_interval={interval}",
                       f"tcp_keepalives_count={count}", f"tcp_user_timeout={int(self.dead_peer_s * 1000)}"]
        if self.lock_timeout_s > 0:
            server.append(f"lock_timeout={int(self.lock_timeout_s * 1000)}")
        if self.idle_in_transaction_s > 0:
            server.append(f"idle_in_transaction_session_timeout={int(self.idle_in_transaction_s * 1000)}")
        joined = " ".join(f"-c {setting}" for setting in server) + (f" {options}" if options else "")
        if joined.strip():
            params["options"] = joined.strip()
        return params


class DatabaseURLError(ValueError):
    """The database URL names a kind of database jetpipe cannot use."""


class SchemaMissing(peewee.DatabaseError):
    """The database has no jetpipe tables yet: `python cli.py init-db` creates them. (Not transient.)"""


def is_transient(exc: BaseException) -> bool:
    """True for a database error that a retry can get past: the database unreachable, its connection
    lost, a lock not granted in time, a serialization failure. False for bad data, a missing schema or
    a bug. Driver errors count too: batch inserts go straight to the driver."""
    import sqlite3

    kinds: tuple = (peewee.OperationalError, peewee.InterfaceError, sqlite3.OperationalError)
    try:
        import psycopg2

        kinds += (psycopg2.OperationalError, psycopg2.InterfaceError)
    except ImportError:  # SQLite-only install
        pass
    return isinstance(exc, kinds)


def is_unstorable(exc: BaseException) -> bool:
    """True for data the database refuses to store (a value too long for its column, a number out of
    range, a constraint it breaks): retrying cannot help. Driver errors count too: batch inserts go
    straight to the driver, past peewee's error translation."""
    import sqlite3

    kinds: tuple = (peewee.DataError, peewee.IntegrityError, OverflowError, sqlite3.DataError, sqlite3.IntegrityError)
    try:
        import psycopg2

        kinds += (psycopg2.DataError, psycopg2.IntegrityError)
    except ImportError:  # SQLite-only install
        pass
    return isinstance(exc, kinds)


def utcnow() -> dt.datetime:
    """Naive UTC now: every timestamp in the database is naive UTC (portable across SQLite and PostgreSQL)."""
    return dt.datetime.now(dt.UTC).replace(tzinfo=None)


def utcnow_stored() -> dt.datetime | str:
    """`utcnow()` as the bound database stores it, for rows handed to the driver in bulk: on SQLite the text
    sqlite3 would make of the datetime (made once for the rows, not by a Python adapter call per row)."""
    now = utcnow()
    return now if is_postgres() else now.isoformat(" ")


def _schema_missing(exc: peewee.DatabaseError) -> SchemaMissing | None:
    """`SchemaMissing` if `exc` (peewee's wrapper; the driver's error is its first argument) says a table
    does not exist, on SQLite or PostgreSQL; else None."""
    original = exc.args[0] if exc.args else exc
    text = (str(original).strip().splitlines() or [type(original).__name__])[0]
    if getattr(original, "pgcode", None) == "42P01" or text.startswith("no such table"):
        return SchemaMissing(f"database is not initialised ({text}): run `python cli.py init-db`")
    return None


class _TranslatesErrors:
    """Mixed into jetpipe's peewee databases: a statement on a table that does not exist raises
    `SchemaMissing`; every other error is peewee's own."""

    def execute_sql(self, sql: str, params: Any = None) -> Any:
        try:
            return super().execute_sql(sql, params)  # type: ignore[misc]  # a mixin of peewee databases
        except (peewee.OperationalError, peewee.ProgrammingError) as exc:
            missing = _schema_missing(exc)
            if missing is None:
                raise
            raise missing from exc


class SqliteDatabase(_TranslatesErrors, peewee.SqliteDatabase):
    pass


class PostgresqlDatabase(_TranslatesErrors, PooledPostgresqlDatabase):
    pass


def make_database(url: str, *, session: SessionLimits | None = None) -> peewee.Database:
    """An unconnected peewee Database for `url` (sqlite:///path, sqlite:///:memory:, postgresql://...);
    PostgreSQL sessions get `session`'s limits (the defaults when None)."""
    parts = urlsplit(url)
    if parts.scheme == "sqlite":
        path = unquote(url.split("://", 1)[1])
        path = path[1:] if path.startswith("/") else path  # sqlite:///rel.db -> rel.db, sqlite:////abs -> /abs
        # Not pooled: a pooled sqlite3 connection moves between threads, and one worker segfaulted so in
        # testing. Per-thread connections are cheap to open (a local file); PostgreSQL is pooled.
        return SqliteDatabase(
            path or ":memory:",
            timeout=SQLITE_BUSY_TIMEOUT_S,
            # Every transaction takes the write lock when it begins: a transaction that read first and then
            # wrote would need to upgrade its lock, which SQLite refuses at once ("database is locked",
            # without the busy timeout) when another connection committed since the read.
            lock_type="IMMEDIATE",
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
        extra = {**(session or SessionLimits()).connect_params(extra.get("options", "")),
                 **{k: v for k, v in extra.items() if k != "options"}}
        return PostgresqlDatabase(
            (parts.path or "/").lstrip("/") or "postgres",
            user=unquote(parts.username) if parts.username else None,
            password=unquote(parts.password) if parts.password else None,
            host=parts.hostname or "127.0.0.1",
            port=parts.port or 5432,
            autorollback=True,
            max_connections=POOL_MAX_CONNECTIONS, stale_timeout=POOL_STALE_S, timeout=30,
            **{"connect_timeout": 10, **extra},
        )
    raise DatabaseURLError(f"unsupported database URL scheme {parts.scheme!r} (use sqlite:/// or postgresql://)")


def bind(url: str, *, session: SessionLimits | None = None) -> peewee.Database:
    """Point the models at `url` (closing any previous connection) and return the database."""
    current = database.obj
    if current is not None and not current.is_closed():
        current.close()
    db = make_database(url, session=session)
    database.initialize(db)
    for listener in bind_listeners:
        listener()
    return db


@contextlib.contextmanager
def thread_connection() -> Iterator[None]:
    """Use this thread's connection for a unit of work outside a Dramatiq message (the bridge's threads):
    a pooled PostgreSQL connection goes back to the pool afterwards, or is dropped if the database
    failed it; a SQLite connection (a local file, one per thread) stays open."""
    db = database.obj
    failed = False
    try:
        yield
    except (peewee.OperationalError, peewee.InterfaceError):
        failed = True
        raise
    finally:
        if not db.is_closed() and (failed or not isinstance(db, peewee.SqliteDatabase)):
            if failed and hasattr(db, "manual_close"):
                db.manual_close()
            else:
                db.close()


def is_postgres() -> bool:
    return isinstance(database.obj, peewee.PostgresqlDatabase)


class JSONField(peewee.TextField):
    """JSON stored as text: the same column type on SQLite and PostgreSQL."""

    def db_value(self, value: Any) -> str | None:
        return None if value is None else json.dumps(value, separators=(",", ":"), sort_keys=True)

    def python_value(self, value: str | None) -> Any:
        return None if value is None else json.loads(value)


class BaseModel(peewee.Model):
    #: The primary key peewee would add to every table by itself, declared so that type checkers know it.
    id = peewee.AutoField()

    class Meta:
        database = database
        legacy_table_names = False


#: Serialises this process's SQLite writers before they reach SQLite. Threads contending for SQLite's own
#: write lock wait in its busy handler, which sleeps 1-100 ms between attempts: with 8 worker threads that
#: sleeping, not the writing, was most of a result's cost. Other processes still meet the busy handler.
_sqlite_writer = threading.Lock()  # never re-entered: a nested write_transaction joins the outer one


@contextlib.contextmanager
def write_transaction() -> Iterator[None]:
    """A transaction that takes the write lock up front.

    SQLite: BEGIN IMMEDIATE, so a read-then-write transaction never fails on lock upgrade (SQLite
    serialises writers), entered by one thread of this process at a time. PostgreSQL: an ordinary
    transaction; lock rows with `for_update`. Inside another transaction it joins that one (no savepoint),
    so a result's save, count and progress commit together. Counted in `jetpipe_db_transactions_total`.
    """
    db = database.obj
    if db.in_transaction():
        yield  # part of the caller's transaction: one commit for the whole unit of work
        return
    if isinstance(db, peewee.SqliteDatabase):
        with _sqlite_writer, db.atomic(lock_type="IMMEDIATE"):
            yield
    else:
        with db.atomic():
            yield
    _count_transaction()


@contextlib.contextmanager
def undoable_write() -> Iterator[None]:
    """A `write_transaction`, or inside one, a savepoint: either way an exception undoes this block's writes
    alone and goes on (a savepoint costs two statements, so it is taken only where it is needed)."""
    db = database.obj
    if not db.in_transaction():
        with write_transaction():
            yield
        return
    with db.atomic():
        yield


def _count_transaction() -> None:
    for listener in commit_listeners:
        listener()


def insert_ignoring_duplicates(model: type[peewee.Model], fields: tuple[str, ...],
                               rows: list[tuple[Any, ...]]) -> int:
    """`INSERT ... ON CONFLICT DO NOTHING` of `rows`, tuples of database values in the order of `fields`; the
    number of rows inserted (those already there not counted).

    Goes through the driver's bulk path: on SQLite executemany; on PostgreSQL one INSERT reading the rows from a
    JSON parameter (`insert_staged`). peewee's `insert_many` builds its SQL value by value, which cost more than
    the database's own work (15 ms for a 50-image result's 150 detections; 0.4 s for a 10,000-image job's rows).
    """
    if not rows:
        return 0
    columns = ", ".join(f'"{model._meta.fields[name].column_name}"' for name in fields)
    table = model._meta.table_name
    cursor = database.obj.cursor()
    if is_postgres():
        return insert_staged(cursor, f'SELECT {columns} FROM "{table}"', rows,
                             f'INSERT INTO "{table}" ({columns}) SELECT * FROM staged ON CONFLICT DO NOTHING')
    marks = ", ".join("?" * len(fields))
    cursor.executemany(f'INSERT INTO "{table}" ({columns}) VALUES ({marks}) ON CONFLICT DO NOTHING', rows)
    return int(cursor.rowcount)  # sqlite3 sums an executemany's changes


def insert_staged(cursor: Any, shape: str, rows: list[tuple[Any, ...]], insert: str) -> int:
    """PostgreSQL: `insert`, a statement reading `rows` as `staged`, a table with the columns (names and types)
    that `shape` (a SELECT) selects; the rows `insert` wrote. One statement, whose one parameter is the rows as
    a JSON array of arrays, read back into typed columns by the server.

    An INSERT of 1,000 rows as VALUES costs the client a literal per value and the server the parsing and
    planning of each; COPY into a temporary table and an INSERT from there cost three round trips, a temporary
    table to keep empty, and a Python call per value to format it. JSON is encoded in C (msgspec) and parsed in
    C by the server: 1,500 detections cost the client 2.7 ms instead of 10.9 ms through COPY, and the server
    as much (docs/performance.md)."""
    columns = _shape_columns(cursor, shape)
    cursor.execute(f"WITH staged AS (SELECT {columns} FROM jsonb_array_elements(%s::jsonb) AS e) {insert}",
                   (_encode_rows(rows).decode(),))
    return int(cursor.rowcount)


_encode_rows = msgspec.json.Encoder().encode  # a datetime in ISO 8601, bytes in base64, None as null
_shape_columns_of: dict[str, str] = {}


def _shape_columns(cursor: Any, shape: str) -> str:
    """`(e->>0)::integer AS "image_id", ...`: the columns `shape` selects, each read from a JSON array element
    `e` (bytea from base64). Asked of the server once per shape and process."""
    known = _shape_columns_of.get(shape)
    if known is not None:
        return known
    cursor.execute(f"{shape} LIMIT 0")
    described = [(column.name, column.type_code) for column in cursor.description]
    cursor.execute("SELECT oid, format_type(oid, NULL) FROM pg_type WHERE oid = ANY(%s)",
                   (list({oid for _, oid in described}),))
    type_of = dict(cursor.fetchall())
    known = _shape_columns_of[shape] = ", ".join(
        (f"decode(e->>{n}, 'base64')" if type_of[oid] == "bytea" else f"(e->>{n})::{type_of[oid]}") + f' AS "{name}"'
        for n, (name, oid) in enumerate(described))
    return known


def select_in(sql: str, column_values: Iterable[Any], *, params: tuple[Any, ...] = (), chunk: int = 500,
              lock: bool = False) -> list[tuple[Any, ...]]:
    """Rows of `sql` (a SELECT whose last condition is `<column> IN ({in})`) for many values, a statement
    per `chunk` of them (SQLite limits the variables of one statement), built as text: peewee builds such
    a statement value by value, which cost more than the query itself for a thousand ids. Placeholders
    are `%s`; `lock` adds the row lock of `for_update`, in one statement, so that the rows are locked in
    the order its ORDER BY gives."""
    db = database.obj
    mark = db.param
    rows: list[tuple[Any, ...]] = []
    values = list(column_values)
    if lock and is_postgres():
        chunk = max(chunk, len(values))
    for start in range(0, len(values), chunk):
        part = values[start:start + chunk]
        text = sql.replace("%s", mark).replace("{in}", ", ".join([mark] * len(part)))
        if lock and is_postgres():
            text += " FOR NO KEY UPDATE"
        rows += db.execute_sql(text, (*params, *part)).fetchall()
    return rows


def execute_in(sql: str, column_values: Iterable[Any], *, params: tuple[Any, ...] = (), chunk: int = 500) -> int:
    """`sql` (an UPDATE or DELETE whose last condition is `<column> IN ({in})`) for many values, like
    `select_in`; the number of rows it changed."""
    db = database.obj
    mark = db.param
    changed = 0
    values = list(column_values)
    for start in range(0, len(values), chunk):
        part = values[start:start + chunk]
        cursor = db.execute_sql(sql.replace("%s", mark).replace("{in}", ", ".join([mark] * len(part))),
                                (*params, *part))
        changed += cursor.rowcount
    return changed


def for_update(query: _Query) -> _Query:
    """`query` with a row lock on PostgreSQL; SQLite's write lock already serialises.

    FOR NO KEY UPDATE, not FOR UPDATE: inserting a detection takes a KEY SHARE lock on its job row (the
    foreign key), which FOR UPDATE waits for, so two results of one job that each saved rows and then
    locked the job row for progress deadlocked. Nothing here changes a key, and NO KEY UPDATE still
    serialises every progress write and status transition of a job.
    """
    return query.for_update("FOR NO KEY UPDATE") if is_postgres() else query  # type: ignore[arg-type]  # peewee takes the clause


def plain_rows(query: Any) -> Iterator[tuple[Any, ...]]:
    """The rows of a peewee query as the driver returns them: for columns whose stored values are what the caller
    wants as they are (integers, text), without peewee's conversion of each value (a Python call per column and
    row: reading a dispatch round of 5,000 tasks took 11-23 ms that way, 5 ms plain)."""
    return iter(database.execute_sql(*query.sql()))


def tuples(query: Any, *, stream: bool = False) -> Iterator[tuple[Any, ...]]:
    """The rows of a peewee query as tuples (its `.tuples()`, typed as what it yields); `stream`: read as
    they are consumed, never all held (peewee's `.iterator()`)."""
    rows = query.tuples()
    return rows.iterator() if stream else iter(rows)
