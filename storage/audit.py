"""The audit trail: every store, query, retrieval, refusal and registry change, in the
index database, read back by `pocketpacs audit` (and `GET /api/audit`)."""

from __future__ import annotations

import logging
import threading
from collections import deque
from dataclasses import dataclass, field, fields
from datetime import UTC, datetime

from sqlalchemy import insert, select
from sqlalchemy.exc import OperationalError, SQLAlchemyError

from storage.index import Index, IndexUnavailable
from storage.models import AuditEvent

# Outcomes.
OK = "ok"
PARTIAL = "partial"
FAILED = "failed"
REFUSED = "refused"


@dataclass(frozen=True)
class AuditEntry:
    """One event: who (actor, institution, source), what (action, resource), the outcome."""

    actor: str
    action: str
    outcome: str
    institution: str = ""
    resource: str = ""
    source: str = ""
    instances: int = 0
    detail: str = ""
    at: datetime = field(default_factory=lambda: datetime.now(UTC))


log = logging.getLogger(__name__)

# Built once: a new insert construct per event cost more than the insert itself.
_INSERT = insert(AuditEvent)
# Events `record_soon` holds at most; past it, `record_soon` refuses (its caller records
# the event itself, the slow way).
WAITING_AT_MOST = 10_000
# The writer gathers events this long before writing them: one transaction for many, and
# no database work racing the answers that queued them.
GATHER_SECONDS = 0.05


class AuditLog:
    def __init__(self, index: Index) -> None:
        self.index = index
        self._waiting: deque[AuditEntry] = deque()
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._writer: threading.Thread | None = None  # started by the first record_soon
        self._writing = threading.Lock()  # the writer thread's batch, or a `flush`
        self._closing = False

    def record(self, entry: AuditEntry) -> None:
        """Write one event before returning."""
        self._write([entry])

    def record_soon(self, entry: AuditEntry) -> bool:
        """Queue one event for a writer thread, which writes what is waiting within
        `GATHER_SECONDS`, in one transaction: for a caller that must not wait for the
        database (an HTTP answer from memory, on the event loop). False, and nothing
        queued, when closing or when `WAITING_AT_MOST` wait already (the database is down
        or slow)."""
        with self._lock:
            if self._closing or len(self._waiting) >= WAITING_AT_MOST:
                return False
            self._waiting.append(entry)
            if self._writer is None:
                self._writer = threading.Thread(target=self._write_soon, name="audit", daemon=True)
                self._writer.start()
            if len(self._waiting) == 1:
                self._wake.notify()
        return True

    def close(self) -> None:
        """Write what `record_soon` queued, then stop its writer."""
        with self._lock:
            self._closing = True
            self._wake.notify()
            writer = self._writer
        if writer is not None:
            writer.join(timeout=30)

    def flush(self) -> None:
        """Write the events `record_soon` queued, now (a search must see every event
        recorded before it). IndexUnavailable."""
        with self._writing:
            with self._lock:
                batch = list(self._waiting)
            if batch:
                self._write(batch)
                with self._lock:
                    for _ in batch:
                        self._waiting.popleft()

    def _write_soon(self) -> None:
        while True:
            with self._lock:
                while not self._waiting and not self._closing:
                    self._wake.wait()
                if not self._waiting:
                    return
                if not self._closing:
                    self._wake.wait(GATHER_SECONDS)  # woken early only by `close`
            try:
                self.flush()
            except IndexUnavailable as exc:
                with self._lock:
                    log.warning("audit: %d events wait for the index: %s", len(self._waiting), exc)
                    if self._closing:
                        log.error("audit: %d events lost at shutdown", len(self._waiting))
                        self._waiting.clear()
                        return
                    self._wake.wait(1.0)

    def _write(self, entries: list[AuditEntry]) -> None:
        """Rows inserted directly: every query and retrieval writes one, and the ORM's
        unit of work took a fifth of a C-FIND's time."""
        for attempt in (1, 2):  # a connection cut under it: once more on a fresh one
            try:
                with self.index.engine.begin() as connection:
                    connection.execute(_INSERT, [vars(entry) for entry in entries])
                return
            except OperationalError as exc:
                if attempt == 2:
                    raise IndexUnavailable(f"cannot write the audit trail: {exc}") from exc
            except SQLAlchemyError as exc:
                raise IndexUnavailable(f"cannot write the audit trail: {exc}") from exc

    def search(
        self,
        *,
        institution: str | None = None,
        action: str | None = None,
        actor: str | None = None,
        outcome: str | None = None,
        since: datetime | None = None,
        until: datetime | None = None,
        limit: int = 100,
    ) -> list[AuditEntry]:
        """Newest first."""
        self.flush()
        query = select(AuditEvent).order_by(AuditEvent.at.desc(), AuditEvent.id.desc())
        for column, value in (
            (AuditEvent.institution, institution),
            (AuditEvent.action, action),
            (AuditEvent.actor, actor),
            (AuditEvent.outcome, outcome),
        ):
            if value is not None:
                query = query.where(column == value)
        if since is not None:
            query = query.where(AuditEvent.at >= since)
        if until is not None:
            query = query.where(AuditEvent.at < until)
        with self.index.session() as session:
            rows = session.scalars(query.limit(limit)).all()
            return [_entry(row) for row in rows]


def _entry(row: AuditEvent) -> AuditEntry:
    found = {f.name: getattr(row, f.name) for f in fields(AuditEntry)}
    if found["at"].tzinfo is None:  # SQLite keeps no time zone; every event is in UTC
        found["at"] = found["at"].replace(tzinfo=UTC)
    return AuditEntry(**found)
