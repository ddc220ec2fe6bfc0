"""The metadata index over SQLAlchemy: SQLite embedded, PostgreSQL at scale, same code.

Writers on several threads, processes or replicas may record instances of the same
patient, study and series at once, so every level is written with INSERT ... ON CONFLICT
DO NOTHING and read back: the first writer's attributes win, nobody fails on a race.
"""

from __future__ import annotations

import sqlite3
import threading
from collections import OrderedDict
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from alembic import command
from alembic.config import Config
from sqlalchemy import (
    Connection,
    Engine,
    Executable,
    bindparam,
    create_engine,
    event,
    func,
    select,
    text,
    update,
)
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.exc import DataError, IntegrityError, SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from storage.header import InstanceHeader
from storage.models import Instance, Patient, Series, Study

MIGRATIONS = Path(__file__).with_name("migrations")
# Any fixed number: PostgreSQL replicas starting together take turns migrating.
_MIGRATION_LOCK = 0x706F636B


class IndexUnavailable(RuntimeError):
    """The database did not answer or refused the write for reasons of its own."""


class IndexRejected(ValueError):
    """The database refuses a value of this data set: retrying will not help."""


@dataclass(frozen=True)
class StoredInstance:
    """What the index knows of one stored object."""

    sop_instance_uid: str
    study_instance_uid: str
    series_instance_uid: str
    object_key: str
    size: int
    sha256: str


@dataclass(frozen=True)
class Origin:
    """Who sent an instance: the institution, the calling AE (empty over HTTP) and the route."""

    institution: str
    calling_ae: str = ""
    route: str = "import"
    received_at: datetime | None = None


class _KnownRows:
    """Row ids of patients, studies and series this process has seen committed (LRU).

    Instances arrive series by series, so after the first instance of a series the rest
    need one INSERT each instead of three upserts and three look-ups.
    """

    def __init__(self, capacity: int = 20_000) -> None:
        self._rows: OrderedDict[tuple, int] = OrderedDict()
        self._capacity = capacity
        self._lock = threading.Lock()

    def get(self, key: tuple) -> int | None:
        with self._lock:
            pk = self._rows.get(key)
            if pk is not None:
                self._rows.move_to_end(key)
            return pk

    def put(self, key: tuple, pk: int) -> None:
        with self._lock:
            self._rows[key] = pk
            self._rows.move_to_end(key)
            while len(self._rows) > self._capacity:
                self._rows.popitem(last=False)

    def clear(self) -> None:
        with self._lock:
            self._rows.clear()


_INSTANCES = Instance.__table__

# The columns of `StoredInstance`, in its field order.
_STORED_INSTANCES = (
    select(
        Instance.sop_instance_uid,
        Study.study_instance_uid,
        Series.series_instance_uid,
        Instance.object_key,
        Instance.size,
        Instance.sha256,
    )
    .join(Series, Instance.series_pk == Series.id)
    .join(Study, Series.study_pk == Study.id)
)


@dataclass(frozen=True)
class IndexEntry:
    """One stored object to record: its header, who sent it, and what is in the bucket."""

    header: InstanceHeader
    origin: Origin
    size: int
    sha256: str
    object_key: str


def _sqlite_pragmas(dbapi_connection, _record) -> None:
    cursor = dbapi_connection.cursor()
    # WAL lets readers run beside the writer; NORMAL syncs at checkpoints, which is safe
    # against process crashes, and the object is already in the bucket when a row is
    # written, so `pocketpacs check` re-indexes anything a power cut takes back.
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.execute("PRAGMA busy_timeout=30000")
    cursor.close()


def _now() -> datetime:
    return datetime.now(UTC)


@dataclass(frozen=True)
class _Compiled:
    """A select as its driver takes it: the SQL, the order of positional parameters
    (None: named), and the values of the parameters the statement itself holds (the
    literals of its conditions); `sql` None when SQLAlchemy must convert or expand."""

    sql: str | None
    order: tuple[str, ...] | None
    literals: dict[str, object]

    def parameters(self, values: dict[str, object]) -> tuple | dict[str, object]:
        merged = {**self.literals, **values}
        return merged if self.order is None else tuple(merged[name] for name in self.order)


class _CompiledSelects:
    """Selects compiled for one engine's driver, by statement (statements are made once
    per shape, `storage.query`, and compared by identity), the most recently used kept."""

    PLAIN = (str, int, float)

    def __init__(self, engine: Engine, capacity: int = 1024) -> None:
        self._dialect = engine.dialect
        self._capacity = capacity
        self._compiled: OrderedDict[Executable, _Compiled] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, statement: Executable, values: dict[str, object]) -> _Compiled | None:
        """`statement` compiled, or None when the driver cannot take it or `values` as
        they are."""
        if not all(isinstance(value, self.PLAIN) for value in values.values()):
            return None
        with self._lock:
            found = self._compiled.get(statement)
            if found is not None:
                self._compiled.move_to_end(statement)
                return found if found.sql is not None else None
        compiled = statement.compile(dialect=self._dialect)
        plain = not compiled._bind_processors and "POSTCOMPILE" not in compiled.string
        made = _Compiled(
            compiled.string if plain else None,  # else values converted, or lists expanded
            tuple(compiled.positiontup) if compiled.positional else None,
            {
                name: value
                for name, value in compiled.construct_params(values).items()
                if name not in values
            },
        )
        with self._lock:
            self._compiled[statement] = made
            while len(self._compiled) > self._capacity:
                self._compiled.popitem(last=False)
        return made if plain else None


class Index:
    """Patient, study, series and instance rows, and the queries the archive needs."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.is_sqlite = url.startswith("sqlite")
        kwargs: dict = {}
        if self.is_sqlite:
            kwargs["connect_args"] = {"timeout": 30, "check_same_thread": False}
            # A connection per busy thread (associations, HTTP workers, spool workers):
            # SQLite connections are only file handles, and a thread waiting for one
            # waited up to 30 s under load (bench/load.py).
            kwargs.update(pool_size=32, max_overflow=96)
        else:
            # A PostgreSQL restart leaves dead pooled connections: test each on checkout.
            kwargs.update(
                pool_pre_ping=True,
                pool_size=10,
                max_overflow=20,
                connect_args={"connect_timeout": 5},
            )
        self.engine: Engine = create_engine(url, **kwargs)
        if self.is_sqlite:
            event.listen(self.engine, "connect", _sqlite_pragmas)
        self._sessions = sessionmaker(self.engine, expire_on_commit=False)
        self._insert = sqlite.insert if self.is_sqlite else postgresql.insert
        self._known = _KnownRows()
        self._compiled = _CompiledSelects(self.engine)
        self._own = threading.local()  # SQLite: each thread's connection for `rows`
        # Those connections, with their threads: closed once their thread has ended (an
        # HTTP worker thread ends after 10 s idle), or by `dispose`.
        self._detached: list[tuple[threading.Thread, sqlite3.Connection]] = []
        self._generation = 0  # of the connections kept: `dispose` closes them all
        self._lock = threading.Lock()

    def session(self) -> Session:
        return self._sessions()

    @contextmanager
    def reading(self) -> Iterator[Connection]:
        """A connection for selects; a database that is gone or cut the connection is an
        IndexUnavailable, which callers answer as a temporary failure (503, 0xA700)."""
        try:
            with self.engine.connect() as connection:
                yield connection
        except SQLAlchemyError as exc:
            raise IndexUnavailable(f"the index did not answer: {exc}"[:300]) from exc

    def rows(self, statement: Executable, values: dict[str, object]) -> list[tuple]:
        """The rows of a select of plain columns (text and numbers: the driver's values,
        without SQLAlchemy's result processing), run on the driver's own connection with
        the statement compiled once. Why: on a lookup by UIDs, SQLAlchemy's execution
        layer cost more than the query, 0.5 to 0.9 ms of a 3 ms rendering with the
        processor's caches cold (bench/README.md, "Rendering latency"). Values that need
        SQLAlchemy's conversions (dates, lists) take the usual way."""
        compiled = self._compiled.get(statement, values)
        if compiled is None:
            with self.reading() as connection:
                return [tuple(row) for row in connection.execute(statement, values)]
        if self.is_sqlite:
            return self._sqlite_rows(compiled.sql, compiled.parameters(values))
        driver_error = self.engine.dialect.loaded_dbapi.Error
        try:
            connection = self.engine.raw_connection()
        except (SQLAlchemyError, driver_error) as exc:
            raise IndexUnavailable(f"the index did not answer: {exc}"[:300]) from exc
        cursor = None
        try:
            cursor = connection.cursor()
            cursor.execute(compiled.sql, compiled.parameters(values))
            return cursor.fetchall()
        except driver_error as exc:
            if self.engine.dialect.is_disconnect(exc, connection.dbapi_connection, cursor):
                connection.invalidate()  # the pool opens another
            raise IndexUnavailable(f"the index did not answer: {exc}"[:300]) from exc
        finally:
            if cursor is not None:
                cursor.close()
            connection.close()  # back to the pool, its transaction rolled back

    def _sqlite_rows(self, sql: str, parameters: tuple | dict[str, object]) -> list[tuple]:
        """`rows` on SQLite: on this thread's own connection, taken from the pool once and
        kept. A pool's checkout and return cost a third of a lookup by UIDs with the
        processor's caches cold; a SQLite connection is only a file handle. A select
        opens no transaction (the driver begins one before writes only), so each sees
        what is committed when it runs."""
        connection = self._own_connection()
        try:
            if connection is None:
                pooled = self.engine.raw_connection()
                pooled.detach()  # the pool forgets it: closed here once the thread ends
                connection = pooled.dbapi_connection
                with self._lock:
                    ended = [c for thread, c in self._detached if not thread.is_alive()]
                    self._detached = [(t, c) for t, c in self._detached if t.is_alive()]
                    self._detached.append((threading.current_thread(), connection))
                    self._own.kept = (self._generation, connection)
                for old in ended:
                    old.close()
            cursor = connection.execute(sql, parameters)
            try:
                return cursor.fetchall()
            finally:
                cursor.close()
                if connection.in_transaction:
                    connection.rollback()
        except (SQLAlchemyError, sqlite3.Error) as exc:
            raise IndexUnavailable(f"the index did not answer: {exc}"[:300]) from exc

    def reads_locally(self) -> bool:
        """Whether a lookup now waits for nothing: SQLite (pages of a local file, which
        writers do not block in WAL mode) with this thread's connection kept
        (`_sqlite_rows`) or a pooled one idle (none to open). PostgreSQL is a network
        round trip away, and can stall."""
        return self.is_sqlite and (
            self._own_connection() is not None or self.engine.pool.checkedin() > 0
        )

    def _own_connection(self) -> sqlite3.Connection | None:
        """This thread's SQLite connection for `rows`, unless `dispose` closed it."""
        generation, connection = getattr(self._own, "kept", (None, None))
        return connection if generation == self._generation else None

    def migrate(self) -> None:
        """Bring the schema to the newest Alembic revision (called at every start)."""
        config = Config()
        config.set_main_option("script_location", str(MIGRATIONS))
        try:
            with self.engine.begin() as connection:
                if not self.is_sqlite:
                    connection.execute(select(func.pg_advisory_xact_lock(_MIGRATION_LOCK)))
                config.attributes["connection"] = connection
                command.upgrade(config, "head")
        except SQLAlchemyError as exc:
            raise IndexUnavailable(f"cannot migrate the index: {exc}") from exc

    def ping(self) -> None:
        try:
            with self.engine.connect() as connection:
                connection.execute(text("SELECT 1"))
        except SQLAlchemyError as exc:
            raise IndexUnavailable(str(exc.__cause__ or exc)) from exc

    def dispose(self) -> None:
        with self._lock:
            detached, self._detached = self._detached, []
            self._generation += 1
        for _, connection in detached:
            connection.close()
        self.engine.dispose()

    def find(self, sop_instance_uid: str) -> StoredInstance | None:
        """The stored instance with this SOP Instance UID, if any."""
        return self.find_many([sop_instance_uid]).get(sop_instance_uid)

    def find_many(self, sop_instance_uids: Iterable[str]) -> dict[str, StoredInstance]:
        """The stored instances among these SOP Instance UIDs, by UID (one query)."""
        wanted = list(set(sop_instance_uids))
        if not wanted:
            return {}
        query = _STORED_INSTANCES.where(Instance.sop_instance_uid.in_(wanted))
        try:
            with self.engine.connect() as connection:
                rows = connection.execute(query).all()
        except SQLAlchemyError as exc:
            raise IndexUnavailable(str(exc.__cause__ or exc)) from exc
        return {row[0]: StoredInstance(*row) for row in rows}

    def add_pixel_layouts(self, layouts: dict[str, tuple[str, str]]) -> None:
        """Record pixel layouts (`PixelLayout.to_text`) of instances stored before the index
        kept them: SOP Instance UID -> (SHA-256 of the bytes they were read from, text). A
        row that has one keeps it, and a row of other bytes gets none."""
        if not layouts:
            return
        statement = (
            update(_INSTANCES)
            .where(_INSTANCES.c.sop_instance_uid == bindparam("uid"))
            .where(_INSTANCES.c.sha256 == bindparam("sha"))
            .where(_INSTANCES.c.pixel_layout.is_(None))
            .values(pixel_layout=bindparam("text"))
        )
        rows = [{"uid": u, "sha": sha, "text": t} for u, (sha, t) in layouts.items()]
        try:
            with self.engine.begin() as connection:
                connection.execute(statement, rows)
        except SQLAlchemyError as exc:
            raise IndexUnavailable(str(exc.__cause__ or exc)) from exc

    def _upsert(self, connection: Connection, model, key: dict, values: dict) -> int:
        """Insert unless present (the first writer's attributes win) and return the row id."""
        table = model.__table__
        statement = self._insert(table).values(**key, **values)
        connection.execute(statement.on_conflict_do_nothing(index_elements=list(key)))
        conditions = [table.c[column] == value for column, value in key.items()]
        return connection.execute(select(table.c.id).where(*conditions)).scalar_one()

    def record(
        self, header: InstanceHeader, origin: Origin, size: int, sha256: str, object_key: str
    ) -> bool:
        """Write the rows for one stored object; False when the instance was already there."""
        return bool(self.record_many([IndexEntry(header, origin, size, sha256, object_key)]))

    def record_many(self, entries: Sequence[IndexEntry]) -> set[str]:
        """Write the rows for stored objects in one transaction.

        Returns the SOP Instance UIDs inserted; the others were indexed already. Patient,
        study and series rows are written once per batch however many instances share them.
        """
        if not entries:
            return set()
        try:
            return self._record_many(entries)
        except DataError as exc:
            raise IndexRejected(str(exc.orig or exc).splitlines()[0]) from exc
        except IntegrityError:
            # A remembered row id is gone (deleted by another process): forget and retry.
            self._known.clear()
            try:
                return self._record_many(entries)
            except SQLAlchemyError as exc:
                raise IndexUnavailable(str(exc.__cause__ or exc)) from exc
        except SQLAlchemyError as exc:
            raise IndexUnavailable(str(exc.__cause__ or exc)) from exc

    def _record_many(self, entries: Sequence[IndexEntry]) -> set[str]:
        patients: dict[tuple[str, str], int] = {}
        studies: dict[str, int] = {}
        series: dict[str, int] = {}
        for entry in entries:
            h = entry.header
            patient = (h.patient_id, h.issuer_of_patient_id)
            for level, key, found in (
                ("patient", patient, patients),
                ("study", h.study_instance_uid, studies),
                ("series", h.series_instance_uid, series),
            ):
                pk = self._known.get((level, key))
                if pk is not None:
                    found[key] = pk
        rows = []
        with self.engine.begin() as connection:
            for entry in entries:
                h = entry.header
                patient = (h.patient_id, h.issuer_of_patient_id)
                if patient not in patients:
                    patients[patient] = self._upsert(
                        connection,
                        Patient,
                        {
                            "patient_id": h.patient_id,
                            "issuer_of_patient_id": h.issuer_of_patient_id,
                        },
                        {
                            "patient_name": h.patient_name,
                            "patient_birth_date": h.patient_birth_date,
                            "patient_sex": h.patient_sex,
                        },
                    )
                if h.study_instance_uid not in studies:
                    studies[h.study_instance_uid] = self._upsert(
                        connection,
                        Study,
                        {"study_instance_uid": h.study_instance_uid},
                        {
                            "patient_pk": patients[patient],
                            "study_date": h.study_date,
                            "study_time": h.study_time,
                            "accession_number": h.accession_number,
                            "study_id": h.study_id,
                            "study_description": h.study_description,
                            "referring_physician_name": h.referring_physician_name,
                            "institution_name": h.institution_name,
                            "source_institution": entry.origin.institution,
                            "created_at": _now(),
                        },
                    )
                if h.series_instance_uid not in series:
                    series[h.series_instance_uid] = self._upsert(
                        connection,
                        Series,
                        {"series_instance_uid": h.series_instance_uid},
                        {
                            "study_pk": studies[h.study_instance_uid],
                            "modality": h.modality,
                            "series_number": h.series_number,
                            "series_description": h.series_description,
                            "body_part_examined": h.body_part_examined,
                            "series_date": h.series_date,
                            "series_time": h.series_time,
                        },
                    )
                rows.append(
                    {
                        "sop_instance_uid": h.sop_instance_uid,
                        "series_pk": series[h.series_instance_uid],
                        "sop_class_uid": h.sop_class_uid,
                        "instance_number": h.instance_number,
                        "number_of_frames": h.number_of_frames,
                        "rows": h.rows,
                        "columns": h.columns,
                        "transfer_syntax_uid": h.transfer_syntax_uid,
                        "source_institution": entry.origin.institution,
                        "source_ae": entry.origin.calling_ae,
                        "received_at": entry.origin.received_at or _now(),
                        "size": entry.size,
                        "sha256": entry.sha256,
                        "object_key": entry.object_key,
                        "pixel_layout": h.pixels.to_text() if h.pixels is not None else None,
                    }
                )
            inserted = set(
                connection.execute(
                    self._insert(_INSTANCES)
                    .values(rows)
                    .on_conflict_do_nothing(index_elements=["sop_instance_uid"])
                    .returning(_INSTANCES.c.sop_instance_uid)
                ).scalars()
            )
        # Committed: these rows exist now, and the next instances of the series need not ask.
        for level, found in (("patient", patients), ("study", studies), ("series", series)):
            for key, pk in found.items():
                self._known.put((level, key), pk)
        return inserted

    def iter_by_key(self) -> Iterator[StoredInstance]:
        """Every indexed instance in the bucket's listing order (bytewise by object key),
        streamed from one server-side cursor, so `check` can merge the two lists."""
        key = Instance.object_key if self.is_sqlite else Instance.object_key.collate("C")
        query = _STORED_INSTANCES.order_by(key).execution_options(yield_per=5000)
        try:
            with self.session() as session:
                for row in session.execute(query):
                    yield StoredInstance(*row)
        except SQLAlchemyError as exc:
            raise IndexUnavailable(str(exc.__cause__ or exc)) from exc

    def counts(self) -> dict[str, int]:
        """Rows at each level, for health and `check` summaries."""
        try:
            with self.session() as session:
                return {
                    name: session.execute(select(func.count()).select_from(model)).scalar_one()
                    for name, model in (
                        ("patients", Patient),
                        ("studies", Study),
                        ("series", Series),
                        ("instances", Instance),
                    )
                }
        except SQLAlchemyError as exc:
            raise IndexUnavailable(str(exc.__cause__ or exc)) from exc
