"""C-MOVE and C-GET SCP (PS3.4 C.4.2, C.4.3), Patient Root and Study Root.

What is sent is decided by `storage.query.locate`: the same matching and the same access
rule as C-FIND, so a hospital retrieves another institution's study only with the exact
patient identifier in its request. Instances go out one at a time, read from the object
store just before they are sent, in the transfer syntax they were stored in; a peer that
does not accept that syntax gets that sub-operation failed, never a transcoded copy.
pynetdicom counts the sub-operations and lists the failed instances.
"""

from __future__ import annotations

from collections.abc import Iterator
from io import BytesIO
from typing import TYPE_CHECKING

from pydicom import dcmread
from pydicom.dataset import Dataset
from pynetdicom.events import Event
from pynetdicom.presentation import build_context
from pynetdicom.sop_class import Verification

from pacs.find import CANCELLED, IDENTIFIER_DOES_NOT_MATCH, failure, query_of, requested
from storage import audit
from storage.query import InvalidQuery, Located, Query, locate

if TYPE_CHECKING:
    from pacs.handlers import AssociationTally, DicomContext

PENDING = 0xFF00
# PS3.4 C.4.2.1.4: refused, move destination unknown.
MOVE_DESTINATION_UNKNOWN = 0xA801
# A presentation context per SOP class stored (PS3.8 allows 128 per association).
MOST_CONTEXTS = 128


def _located(
    event: Event, context: DicomContext, tally: AssociationTally, model: str
) -> list[Located]:
    query = query_of(requested(event.identifier), model)
    return locate(context.index, Query(query.level, query.keys), context.viewer(tally))


def _instances(
    event: Event, context: DicomContext, located: list[Located]
) -> Iterator[tuple[int, Dataset | None]]:
    """Each instance as stored, read only when its turn comes; C-CANCEL stops the rest."""
    for item in located:
        if event.is_cancelled:
            yield CANCELLED, None
            return
        dataset = dcmread(BytesIO(context.spool.pipeline.objects.get(item.object_key)))
        yield PENDING, dataset


def _contexts(located: list[Located]) -> list:
    """What to propose to a C-MOVE destination: each SOP class in its stored syntaxes."""
    syntaxes: dict[str, list[str]] = {}
    for item in located:
        found = syntaxes.setdefault(item.sop_class_uid, [])
        if item.transfer_syntax_uid not in found:
            found.append(item.transfer_syntax_uid)
    return [build_context(sop, ts) for sop, ts in list(syntaxes.items())[:MOST_CONTEXTS]]


def _summary(event: Event) -> str:
    keys = ", ".join(
        f"{e.keyword}={e.value}"
        for e in event.identifier
        if e.keyword and e.value not in ("", None)
    )
    return keys[:200]


def handle_get(event: Event, context: DicomContext) -> Iterator:
    """EVT_C_GET: the matching instances, sent back over the requesting association."""
    tally = context.tally(event.assoc)
    try:
        located = _located(event, context, tally, str(event.request.AffectedSOPClassUID))
    except InvalidQuery as exc:
        context.record(tally, "retrieve", audit.FAILED, detail=str(exc))
        yield 1
        yield failure(IDENTIFIER_DOES_NOT_MATCH, str(exc)), None
        return
    context.record(
        tally, "retrieve", audit.OK, resource=f"C-GET {_summary(event)}", instances=len(located)
    )
    yield len(located)
    yield from _instances(event, context, located)


def handle_move(event: Event, context: DicomContext) -> Iterator:
    """EVT_C_MOVE: the matching instances, sent to a registered node (else 0xA801)."""
    tally = context.tally(event.assoc)
    destination = str(event.move_destination).strip()
    node = context.registry.node(destination) if context.registry is not None else None
    if node is None:
        context.record(
            tally, "retrieve", audit.REFUSED, detail=f"unknown move destination {destination!r}"
        )
        yield None, None
        return
    try:
        located = _located(event, context, tally, str(event.request.AffectedSOPClassUID))
    except InvalidQuery as exc:
        context.record(tally, "retrieve", audit.FAILED, detail=str(exc))
        # pynetdicom associates with the destination before it takes a status: propose
        # what any node accepts, so the peer gets this failure, not 0xC515.
        yield node.host, node.port, {"contexts": [build_context(Verification)]}
        yield 1
        yield failure(IDENTIFIER_DOES_NOT_MATCH, str(exc)), None
        return
    context.record(
        tally,
        "retrieve",
        audit.OK,
        resource=f"C-MOVE to {destination} {_summary(event)}"[:200],
        instances=len(located),
    )
    yield node.host, node.port, {"contexts": _contexts(located)} if located else {}
    yield len(located)
    yield from _instances(event, context, located)
