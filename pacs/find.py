"""C-FIND SCP (PS3.4 C.4.1), Patient Root and Study Root: a request identifier becomes a
`storage.query.Query`, each match a response identifier. Answered from the index alone."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from datetime import date
from typing import TYPE_CHECKING

from pydicom.datadict import dictionary_VR, tag_for_keyword
from pydicom.dataset import Dataset
from pynetdicom.events import Event
from pynetdicom.sop_class import (
    PatientRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelFind,
)

from pacs.commands import Element
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
_QUERY_RETRIEVE_LEVEL = 0x00080052
_RETRIEVE_AE_TITLE = 0x00080054
_SPECIFIC_CHARACTER_SET = 0x00080005
# Tag and VR of every attribute a match can hold, looked up once.
_TAG_VR = {
    keyword: (tag_for_keyword(keyword), dictionary_VR(keyword))
    for keyword in (*ATTRIBUTES, *COMPUTED)
}


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


def _text(value: object) -> str | int | None:
    """An index value as an element value: text (dates as DA, several values joined by a
    backslash), an int for US, None for an empty element."""
    if value is None or value == "" or value == []:
        return None
    if isinstance(value, date):
        return value.strftime("%Y%m%d")
    if isinstance(value, list | tuple):
        return "\\".join(str(v) for v in value)
    if isinstance(value, int):
        return value
    return str(value)


def response_of(match: dict, identifier: Dataset, retrieve_ae_title: str) -> list[Element]:
    """A pending response, in tag order: every key the request asked for, filled in or
    left empty, and the unique keys of the level."""
    answer = {
        _QUERY_RETRIEVE_LEVEL: Element(
            _QUERY_RETRIEVE_LEVEL, "CS", str(identifier.QueryRetrieveLevel)
        ),
        _RETRIEVE_AE_TITLE: Element(_RETRIEVE_AE_TITLE, "AE", retrieve_ae_title),
    }
    for element in identifier:
        keyword = element.keyword
        if not keyword or keyword in _SKIPPED:
            continue
        if keyword in ATTRIBUTES or keyword in COMPUTED:
            tag, vr = _TAG_VR[keyword]
            answer[tag] = Element(tag, vr, _text(match.get(keyword)))
        else:
            answer[element.tag] = Element(element.tag, element.VR, None)  # not held: empty
    for keyword, value in match.items():
        tag, vr = _TAG_VR[keyword]
        if tag not in answer:
            answer[tag] = Element(tag, vr, _text(value))
    if any(isinstance(e.value, str) and not e.value.isascii() for e in answer.values()):
        answer[_SPECIFIC_CHARACTER_SET] = Element(_SPECIFIC_CHARACTER_SET, "CS", UTF8)
    return [answer[tag] for tag in sorted(answer)]


def dataset_of(elements: list[Element]) -> Dataset:
    """A response as a pydicom data set, for the associations pynetdicom serves."""
    answer = Dataset()
    for element in elements:
        answer.add_new(element.tag, element.VR, element.value)
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
) -> Iterator[tuple[int, list[Element] | str | None]]:
    """Every match visible to the caller's institution, whichever acceptor serves the
    association: (status, response elements) while pending, then a failure status with its
    Error Comment, or the Cancel status once `cancelled` reports a C-CANCEL."""
    try:
        query = query_of(identifier, sop_class_uid)
        matches = search(context.index, query, context.viewer(tally))
    except InvalidQuery as exc:
        context.record(tally, "query", audit.FAILED, detail=str(exc))
        yield IDENTIFIER_DOES_NOT_MATCH, str(exc)
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
    for status, payload in find(
        context,
        context.tally(event.assoc),
        event.identifier,
        str(event.request.AffectedSOPClassUID),
        lambda: event.is_cancelled,
    ):
        if isinstance(payload, list):
            yield status, dataset_of(payload)
        else:
            yield status, failure(payload) if payload else None
