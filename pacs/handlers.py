"""Event handlers of the DICOM listener, bound as data in `bindings()`.

Each handler is small and states its contract. A handler that raises is answered by
pynetdicom with a failure status (0xC211 for C-STORE) and logged; the association goes on.
The store itself and the log line live on `DicomContext`, shared with the lean acceptor
(`pacs.lean_acceptor`) that serves store, verify and find associations.
"""

from __future__ import annotations

import logging
import os
import tempfile
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from pydicom.dataset import Dataset
from pynetdicom import evt
from pynetdicom.association import Association
from pynetdicom.events import Event

from pacs.find import handle_find
from pacs.retrieve import handle_get, handle_move
from pacs.statuses import ERROR_COMMENT_LENGTH, VerificationStatus
from storage import audit
from storage.audit import AuditEntry, AuditLog
from storage.index import Index, IndexUnavailable, Origin
from storage.ingest import InstanceToStore, StoreOutcome
from storage.query import Viewer
from storage.registry import Registry
from storage.spool import Spool

log = logging.getLogger("pocketpacs.dicom")

# Calling AE title and peer address -> the institution it belongs to, or None: refused.
Identify = Callable[[str, str], str | None]


@dataclass
class AssociationTally:
    """What one association did, for its single log line."""

    calling_ae: str
    address: str
    institution: str
    started: float = field(default_factory=time.monotonic)
    counts: dict[StoreOutcome, int] = field(default_factory=dict)
    bytes: int = 0
    last_failure: str = ""


@dataclass
class DicomContext:
    """What every association shares, whichever acceptor serves it: where instances go,
    who the callers are, and each association's tally for its log line."""

    spool: Spool
    identify: Identify
    audit: AuditLog | None = None
    index: Index | None = None
    registry: Registry | None = None
    ae_title: str = ""
    regional_issuer: str = ""
    tallies: weakref.WeakKeyDictionary[Association, AssociationTally] = field(
        default_factory=weakref.WeakKeyDictionary
    )

    def tally(self, assoc: Association) -> AssociationTally:
        found = self.tallies.get(assoc)
        if found is None:
            requestor = assoc.requestor
            calling_ae = requestor.ae_title.strip()
            institution = self.identify(calling_ae, requestor.address) or ""
            found = AssociationTally(calling_ae, requestor.address, institution)
            self.tallies[assoc] = found
        return found

    def viewer(self, tally: AssociationTally) -> Viewer:
        """Whose access rules apply to this association's queries and retrievals."""
        return Viewer(tally.institution, self.regional_issuer)

    def finish(self, tally: AssociationTally) -> None:
        """An association ended: its one log line, and its audit event if it stored."""
        log_association(tally)
        if self.audit is None or not tally.counts:
            return
        stored = sum(n for outcome, n in tally.counts.items() if outcome.ok)
        failed = sum(tally.counts.values()) - stored
        result = audit.OK if not failed else audit.PARTIAL if stored else audit.FAILED
        detail = ", ".join(f"{n} {outcome.label}" for outcome, n in tally.counts.items())
        if tally.last_failure:
            detail += f"; last failure: {tally.last_failure}"
        self.record(tally, "store", result, instances=stored, detail=detail)

    def record(
        self,
        tally: AssociationTally,
        action: str,
        outcome: str,
        *,
        resource: str = "",
        instances: int = 0,
        detail: str = "",
    ) -> None:
        """An audit event for something this association's caller did."""
        self._audit(
            AuditEntry(
                actor=tally.calling_ae,
                institution=tally.institution,
                action=action,
                outcome=outcome,
                resource=resource,
                source=tally.address,
                instances=instances,
                detail=detail,
            )
        )

    def refuse(self, calling_ae: str, address: str, reason: str) -> None:
        """An association refused before it began."""
        log.warning("association from %r at %s refused: %s", calling_ae, address, reason)
        self._audit(
            AuditEntry(
                actor=calling_ae,
                action="associate",
                outcome=audit.REFUSED,
                source=address,
                detail=reason,
            )
        )

    def _audit(self, entry: AuditEntry) -> None:
        if self.audit is None:
            return
        try:
            self.audit.record(entry)
        except IndexUnavailable as exc:
            log.error("audit event lost (%s): %s", exc, entry)

    def store(
        self,
        tally: AssociationTally,
        path: Path,
        sop_class_uid: str,
        sop_instance_uid: str,
        negotiated_sop_class_uid: str,
        not_received: str = "",
    ) -> tuple[int, str]:
        """C-STORE (PS3.4 B.2.3): one received data set, a Part 10 file at `path`, into the
        ingest spool. Returns the DIMSE status and an Error Comment ("" on success).

        Success (0x0000) once the instance is durable; 0xA700 out of resources (bucket,
        index or spool unavailable), 0xA900 data set does not match the SOP class (missing
        or malformed UIDs, or a SOP class other than the presentation context's), 0xC000
        cannot understand. `not_received`: why the data set could not be written where it
        arrived (a full disk, say): out of resources, and the association goes on.
        """
        if not_received:
            outcome, reason, size = StoreOutcome.OUT_OF_RESOURCES, not_received, 0
        elif sop_class_uid != negotiated_sop_class_uid:
            outcome = StoreOutcome.DOES_NOT_MATCH_SOP_CLASS
            reason = f"presentation context is for {negotiated_sop_class_uid}, not {sop_class_uid}"
            size = 0
        else:
            origin = Origin(
                institution=tally.institution,
                calling_ae=tally.calling_ae,
                route="cstore",
            )
            item = InstanceToStore(
                path=path,
                origin=origin,
                expected_sop_class_uid=sop_class_uid,
                expected_sop_instance_uid=sop_instance_uid,
            )
            result = self.spool.accept(item)
            outcome, reason, size = result.outcome, result.reason, result.size
        tally.counts[outcome] = tally.counts.get(outcome, 0) + 1
        if outcome.ok:
            tally.bytes += size
            return outcome.dimse_status, ""
        tally.last_failure = reason
        return outcome.dimse_status, reason[:ERROR_COMMENT_LENGTH]


def log_association(tally: AssociationTally) -> None:
    """One log line per association saying what was stored from whom."""
    seconds = time.monotonic() - tally.started
    parts = [f"{count} {outcome.label}" for outcome, count in tally.counts.items()]
    line = (
        f"association from {tally.calling_ae!r} at {tally.address}: "
        f"{', '.join(parts) or 'nothing stored'}, {tally.bytes / 1e6:.1f} MB in {seconds:.1f} s"
    )
    if tally.last_failure:
        log.warning("%s; last failure: %s", line, tally.last_failure)
    else:
        log.info(line)


class ReceivedFile:
    """The file pynetdicom receives a C-STORE data set into, in place of the
    `NamedTemporaryFile` it would make (see `DicomServer.start`): it keeps a write error
    instead of raising it.

    Why: raised in pynetdicom's reactor, an error such as a full disk ends the association
    with no answer; kept, the rest of the data set is read and dropped, and `handle_store`
    answers 0xA700 with the reason, as the lean acceptor does. Writes go straight to the
    file (pynetdicom flushed after each one anyway), so none can fail later, on close.
    """

    def __init__(self, *, mode: str = "wb", suffix: str = "", delete: bool = False) -> None:
        """The arguments pynetdicom passes: always a new binary file, kept after closing."""
        fd, self.name = tempfile.mkstemp(suffix=suffix)
        self._raw = os.fdopen(fd, "wb", buffering=0)  # closed when dropped, as before
        self.file = self  # pynetdicom calls `file.flush()` after every write
        self.failure = ""
        _RECEIVING[Path(self.name)] = self

    def write(self, data: bytes | memoryview) -> int:
        view = memoryview(data)
        size = len(view)
        if not self.failure:
            try:
                while view:
                    view = view[self._raw.write(view) :]
            except OSError as exc:
                self.failure = f"cannot write the received data: {exc.strerror or exc}"
        return size

    def flush(self) -> None:
        """Nothing is buffered."""

    def close(self) -> None:
        self._raw.close()


# The files pynetdicom is receiving into, by path, while it holds them.
_RECEIVING: weakref.WeakValueDictionary[Path, ReceivedFile] = weakref.WeakValueDictionary()


def not_received(path: Path) -> str:
    """Why the data set at `path` could not be written whole ("" if it was)."""
    received = _RECEIVING.get(path)
    return received.failure if received is not None else ""


def handle_echo(event: Event) -> int:
    """EVT_C_ECHO (PS3.4 A.4): the Verification SCP always answers Success."""
    return VerificationStatus.SUCCESS


def handle_store(event: Event, context: DicomContext) -> Dataset:
    """EVT_C_STORE: the data set arrives as a Part 10 file (chunked receive)."""
    request = event.request
    path = Path(event.dataset_path)
    status, comment = context.store(
        context.tally(event.assoc),
        path,
        str(request.AffectedSOPClassUID or ""),
        str(request.AffectedSOPInstanceUID or ""),
        str(event.context.abstract_syntax),
        not_received=not_received(path),
    )
    answer = Dataset()
    answer.Status = status
    if comment:
        answer.ErrorComment = comment
    return answer


def handle_connection_close(event: Event, context: DicomContext) -> None:
    """EVT_CONN_CLOSE: log the association's line."""
    tally = context.tallies.pop(event.assoc, None)
    if tally is not None:
        context.finish(tally)


def handle_accepted(event: Event, context: DicomContext) -> None:
    """EVT_ACCEPTED: start the association's tally once the calling AE title is known. A
    caller the node registry does not know is aborted at once: on the plain port the lean
    acceptor has rejected it already; on the TLS port, served by pynetdicom alone, this is
    where it is turned away."""
    tally = context.tally(event.assoc)
    if context.identify(tally.calling_ae, tally.address) is None:
        context.refuse(tally.calling_ae, tally.address, "calling AE title not registered")
        event.assoc.abort()


def bindings(context: DicomContext) -> list:
    """Every event the listener handles, with its handler: the one place they are bound."""
    return [
        (evt.EVT_C_FIND, handle_find, [context]),
        (evt.EVT_C_GET, handle_get, [context]),
        (evt.EVT_C_MOVE, handle_move, [context]),
        (evt.EVT_ACCEPTED, handle_accepted, [context]),
        (evt.EVT_C_ECHO, handle_echo),
        (evt.EVT_C_STORE, handle_store, [context]),
        (evt.EVT_CONN_CLOSE, handle_connection_close, [context]),
    ]
