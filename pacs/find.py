"""C-FIND SCP (PS3.4 C.4.1), Patient Root and Study Root: a request identifier becomes a
`storage.query.Query`, each match a response identifier. Answered from the index alone."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from datetime import date
from typing import TYPE_CHECKING

from pydicom.dataset import Dataset
from pynetdicom.events import Event
from pynetdicom.sop_class import (
    PatientRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelFind,
)

from pacs.statuses import ERROR_COMMENT_LENGTH
from storage import audit
from storage.query import ATTRIBUTES, COMPUTED, InvalidQuery, Query, QueryLevel, search

if TYPE_CHECKING:
    from pacs.handlers import AssociationTally, DicomContext

FIND_MODELS = (
    PatientRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelFind,
)
# PS3.4 C.4.1.1.4: statuses of a C-FIND response.
PENDING = 0xFF00
CANCELLED = 0xFE00
SUCCESS = 0x0000
IDENTIFIER_DOES_NOT_MATCH = 0xA900
UNABLE_TO_PROCESS = 0xC000
UTF8 = "ISO_IR 192"
_SKIPPED = {"QueryRetrieveLevel", "SpecificCharacterSet", "RetrieveAETitle"}


def query_of(identifier: Dataset, sop_class_uid: str) -> Query:
    """The query an identifier asks, or InvalidQuery saying what is wrong with it."""
    level_name = str(identifier.get("QueryRetrieveLevel", "") or "").strip().upper()
    if level_name not in QueryLevel.__members__:
        raise InvalidQuery(f"QueryRetrieveLevel {level_name!r} is not PATIENT/STUDY/SERIES/IMAGE")
    level = QueryLevel[level_name]
    if (
        level is QueryLevel.PATIENT
        and sop_class_uid != PatientRootQueryRetrieveInformationModelFind
    ):
        raise InvalidQuery("the Study Root model has no PATIENT level")
    keys: dict[str, str] = {}
    for element in identifier:
        keyword = element.keyword
        if not keyword or keyword in _SKIPPED or element.VR == "SQ":
            continue
        value = element.value
        if value is None:
            text = ""
        elif isinstance(value, list | tuple) or type(value).__name__ == "MultiValue":
            text = "\\".join(str(v) for v in value)
        else:
            text = str(value)
        keys[keyword] = text
    return Query(level, keys)


def _value(value: object) -> object:
    """An index value as pydicom takes it: dates as DA text, numbers as numbers (US and IS
    both take an int), nothing as an empty element."""
    if isinstance(value, date):
        return value.strftime("%Y%m%d")
    return value


def response_of(match: dict, identifier: Dataset, retrieve_ae_title: str) -> Dataset:
    """A pending response: every key the request asked for, filled in or left empty."""
    answer = Dataset()
    answer.QueryRetrieveLevel = identifier.QueryRetrieveLevel
    answer.RetrieveAETitle = retrieve_ae_title
    texts = []
    for element in identifier:
        keyword = element.keyword
        if not keyword or keyword in _SKIPPED:
            continue
        if keyword in ATTRIBUTES or keyword in COMPUTED:
            value = _value(match.get(keyword))
            if isinstance(value, str):
                texts.append(value)
            setattr(answer, keyword, value)
        else:
            answer.add_new(element.tag, element.VR, None)  # a key we do not hold: empty
    for keyword, value in match.items():
        if keyword not in answer:
            setattr(answer, keyword, _value(value))
    if any(not text.isascii() for text in texts):
        answer.SpecificCharacterSet = UTF8
    return answer


def failure(reason: str) -> Dataset:
    """A failed response's identifier: the Error Comment saying why."""
    answer = Dataset()
    answer.ErrorComment = reason[:ERROR_COMMENT_LENGTH]
    return answer


def find(
    context: DicomContext,
    tally: AssociationTally,
    identifier: Dataset,
    sop_class_uid: str,
    cancelled: Callable[[], bool],
) -> Iterator[tuple[int, Dataset | None]]:
    """Every match visible to the caller's institution, as (status, identifier) responses,
    whichever acceptor serves the association; `cancelled` reports a C-CANCEL."""
    try:
        query = query_of(identifier, sop_class_uid)
        matches = search(context.index, query, context.viewer(tally))
    except InvalidQuery as exc:
        context.record(tally, "query", audit.FAILED, detail=str(exc))
        yield IDENTIFIER_DOES_NOT_MATCH, failure(str(exc))
        return
    summary = ", ".join(f"{k}={v}" for k, v in query.keys.items() if v)
    context.record(
        tally,
        "query",
        audit.OK,
        resource=f"{query.level.name} {summary}"[:200],
        instances=len(matches),
    )
    for match in matches:
        if cancelled():
            yield CANCELLED, None
            return
        yield PENDING, response_of(match, identifier, context.ae_title)


def handle_find(event: Event, context: DicomContext) -> Iterator[tuple[int, Dataset | None]]:
    """EVT_C_FIND, for associations pynetdicom serves."""
    yield from find(
        context,
        context.tally(event.assoc),
        event.identifier,
        str(event.request.AffectedSOPClassUID),
        lambda: event.is_cancelled,
    )
