"""Event handlers of the DICOM listener, bound as data in `bindings()`.

Each handler is small and states its contract. A handler that raises is answered by
pynetdicom with a failure status (0xC211 for C-STORE) and logged; the association goes on.
"""

from __future__ import annotations

import logging
import socket
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from pydicom.dataset import Dataset
from pynetdicom import evt
from pynetdicom.association import Association
from pynetdicom.events import Event

from pacs.statuses import ERROR_COMMENT_LENGTH, VerificationStatus
from storage.index import Origin
from storage.ingest import InstanceToStore, StoreOutcome
from storage.spool import Spool

log = logging.getLogger("pocketpacs.dicom")

# Calling AE title and peer address -> the institution it belongs to.
Identify = Callable[[str, str], str]


@dataclass
class _AssociationTally:
    """What one association did, for its single log line."""

    calling_ae: str
    address: str
    started: float = field(default_factory=time.monotonic)
    counts: dict[StoreOutcome, int] = field(default_factory=dict)
    bytes: int = 0
    last_failure: str = ""


@dataclass
class DicomContext:
    """What the handlers share: where instances go and who the callers are."""

    spool: Spool
    identify: Identify
    tallies: weakref.WeakKeyDictionary[Association, _AssociationTally] = field(
        default_factory=weakref.WeakKeyDictionary
    )

    def tally(self, assoc: Association) -> _AssociationTally:
        found = self.tallies.get(assoc)
        if found is None:
            requestor = assoc.requestor
            found = _AssociationTally(requestor.ae_title.strip(), requestor.address)
            self.tallies[assoc] = found
        return found


def handle_connection_open(event: Event) -> None:
    """EVT_CONN_OPEN: switch Nagle off, or every response waits ~40 ms for a delayed ACK."""
    sock = event.assoc.dul.socket.socket if event.assoc.dul.socket else None
    if sock is not None:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def handle_echo(event: Event) -> int:
    """EVT_C_ECHO (PS3.4 A.4): the Verification SCP always answers Success."""
    return VerificationStatus.SUCCESS


def handle_store(event: Event, context: DicomContext) -> Dataset:
    """EVT_C_STORE (PS3.4 B.2.3).

    The data set arrives as a Part 10 file (chunked receive) and goes through the ingest
    spool. Returns Success (0x0000) once it is durable, or a failure with an Error Comment:
    0xA700 out of resources (bucket, index or spool unavailable), 0xA900 data set does not
    match the SOP class (missing or malformed UIDs), 0xC000 cannot understand.
    """
    request = event.request
    tally = context.tally(event.assoc)
    origin = Origin(
        institution=context.identify(tally.calling_ae, tally.address),
        calling_ae=tally.calling_ae,
        route="cstore",
    )
    item = InstanceToStore(
        path=Path(event.dataset_path),
        origin=origin,
        expected_sop_class_uid=str(request.AffectedSOPClassUID or ""),
        expected_sop_instance_uid=str(request.AffectedSOPInstanceUID or ""),
    )
    result = context.spool.accept(item)
    tally.counts[result.outcome] = tally.counts.get(result.outcome, 0) + 1
    status = Dataset()
    status.Status = result.outcome.dimse_status
    if result.outcome.ok:
        tally.bytes += result.size
    else:
        tally.last_failure = result.reason
        status.ErrorComment = result.reason[:ERROR_COMMENT_LENGTH]
    return status


def handle_connection_close(event: Event, context: DicomContext) -> None:
    """EVT_CONN_CLOSE: one log line per association saying what was stored from whom."""
    tally = context.tallies.pop(event.assoc, None)
    if tally is None:
        return
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


def handle_accepted(event: Event, context: DicomContext) -> None:
    """EVT_ACCEPTED: start the association's tally once the calling AE title is known."""
    context.tally(event.assoc)


def bindings(context: DicomContext) -> list:
    """Every event the listener handles, with its handler: the one place they are bound."""
    return [
        (evt.EVT_CONN_OPEN, handle_connection_open),
        (evt.EVT_ACCEPTED, handle_accepted, [context]),
        (evt.EVT_C_ECHO, handle_echo),
        (evt.EVT_C_STORE, handle_store, [context]),
        (evt.EVT_CONN_CLOSE, handle_connection_close, [context]),
    ]
