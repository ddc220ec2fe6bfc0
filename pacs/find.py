"""C-FIND SCP (PS3.4 C.4.1), Patient Root and Study Root: a request identifier becomes a
`storage.query.Query`, each match a response identifier. Answered from the index alone."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from datetime import date
from typing import TYPE_CHECKING

from pydicom.datadict import dictionary_VR, keyword_for_tag, tag_for_keyword
from pydicom.dataset import Dataset
from pynetdicom.events import Event
from pynetdicom.sop_class import (
    PatientRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelFind,
)

from pacs.commands import TEXT_VRS, Element, dictionary_vr, plain_text
from pacs.statuses import ERROR_COMMENT_LENGTH
from storage import audit
from storage.index import IndexUnavailable
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
OUT_OF_RESOURCES = 0xA700
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
_KEYWORDS = {tag: keyword for keyword, (tag, _) in _TAG_VR.items()}


def _as_text(value: object) -> str:
    if value is None:
        return ""
    if isinstance(value, list | tuple) or type(value).__name__ == "MultiValue":
        return "\\".join(str(v) for v in value)
    return str(value)


def requested(identifier: Dataset) -> list[Element]:
    """The identifier's elements, values as text (several joined by a backslash; None when
    empty), for identifiers `commands.decode_identifier` leaves to pydicom. ASCII text is
    read from the bytes as they came; anything else (another character set, binary VRs) is
    converted by pydicom, which knows the identifier's Specific Character Set."""
    keys = []
    for element in identifier.elements():
        tag = int(element.tag)
        vr = element.VR or dictionary_vr(tag)
        value = element.value
        text = plain_text(value) if isinstance(value, bytes) and vr in TEXT_VRS else None
        if text is None:
            try:
                converted = identifier[tag]
            except Exception as exc:  # pydicom raises what the malformed value provokes
                raise InvalidQuery(f"({tag >> 16:04X},{tag & 0xFFFF:04X}): {exc}") from exc
            vr, text = converted.VR, ("" if vr == "SQ" else _as_text(converted.value))
        keys.append(Element(tag, vr, text or None))
    return keys


def query_of(keys: list[Element], sop_class_uid: str) -> Query:
    """The query an identifier asks, or InvalidQuery saying what is wrong with it."""
    level_name = next((k.value for k in keys if k.tag == _QUERY_RETRIEVE_LEVEL), "")
    level_name = str(level_name).strip().upper()
    if level_name not in QueryLevel.__members__:
        raise InvalidQuery(f"QueryRetrieveLevel {level_name!r} is not PATIENT/STUDY/SERIES/IMAGE")
    level = QueryLevel[level_name]
    if (
        level is QueryLevel.PATIENT
        and sop_class_uid != PatientRootQueryRetrieveInformationModelFind
    ):
        raise InvalidQuery("the Study Root model has no PATIENT level")
    query_keys: dict[str, str] = {}
    for key in keys:
        keyword = _KEYWORDS.get(key.tag) or keyword_for_tag(key.tag)
        if keyword and keyword not in _SKIPPED and key.VR != "SQ":
            query_keys[keyword] = "" if key.value is None else str(key.value)
    return Query(level, query_keys)


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


def response_of(
    match: dict, keys: list[Element], level: QueryLevel, retrieve_ae_title: str
) -> list[Element]:
    """A pending response, in tag order: every key the request asked for, filled in or
    left empty, and the unique keys of the level."""
    answer = {
        _QUERY_RETRIEVE_LEVEL: Element(_QUERY_RETRIEVE_LEVEL, "CS", level.name),
        _RETRIEVE_AE_TITLE: Element(_RETRIEVE_AE_TITLE, "AE", retrieve_ae_title),
    }
    for key in keys:
        keyword = _KEYWORDS.get(key.tag) or keyword_for_tag(key.tag)
        if not keyword or keyword in _SKIPPED or key.tag >> 16 == 0xFFFE:
            continue  # unknown tags and stray items are not echoed
        if keyword in _TAG_VR:
            tag, vr = _TAG_VR[keyword]
            answer[tag] = Element(tag, vr, _text(match.get(keyword)))
        else:
            answer[key.tag] = Element(key.tag, key.VR, None)  # not held: empty
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


def failure(status: int, reason: str) -> Dataset:
    """A failure status with its Error Comment (0000,0902), for pynetdicom's handlers: as a
    status data set it goes into the response's command set (a failed response carries
    no identifier, so pynetdicom drops one)."""
    answer = Dataset()
    answer.Status = status
    answer.ErrorComment = reason[:ERROR_COMMENT_LENGTH]
    return answer


def find(
    context: DicomContext,
    tally: AssociationTally,
    read_keys: Callable[[], list[Element]],
    sop_class_uid: str,
    cancelled: Callable[[], bool],
) -> Iterator[tuple[int, list[Element] | str | None]]:
    """Every match visible to the caller's institution, whichever acceptor serves the
    association and however it reads the identifier (`read_keys`, which raises
    InvalidQuery for one it cannot read: 0xC000): (status, response elements) while
    pending, then the final status (with its Error Comment for a failure), the Cancel
    status once `cancelled` reports a C-CANCEL.

    The audit row is written when the caller resumes or closes the generator after sending
    the final status: the caller does not wait for it, and it counts what was sent."""
    try:
        keys = read_keys()
    except InvalidQuery as exc:
        context.record(tally, "query", audit.FAILED, detail=str(exc))
        yield UNABLE_TO_PROCESS, str(exc)
        return
    try:
        query = query_of(keys, sop_class_uid)
        matches = search(context.index, query, context.viewer(tally))
    except InvalidQuery as exc:
        context.record(tally, "query", audit.FAILED, detail=str(exc))
        yield IDENTIFIER_DOES_NOT_MATCH, str(exc)
        return
    except IndexUnavailable as exc:
        context.record(tally, "query", audit.FAILED, detail=str(exc))
        yield OUT_OF_RESOURCES, "index unavailable, try again"
        return
    summary = ", ".join(f"{k}={v}" for k, v in query.keys.items() if v)
    sent, final, outcome, detail = 0, False, audit.OK, ""
    try:
        for match in matches:
            if cancelled():
                outcome, detail = audit.PARTIAL, f"cancelled after {sent} of {len(matches)}"
                final = True
                yield CANCELLED, None
                return
            yield PENDING, response_of(match, keys, query.level, context.ae_title)
            sent += 1
        final = True
        yield SUCCESS, None
    finally:
        if not final:
            outcome, detail = audit.FAILED, f"the caller went away after {sent} of {len(matches)}"
        context.record(
            tally,
            "query",
            outcome,
            resource=f"{query.level.name} {summary}"[:200],
            instances=sent,
            detail=detail,
        )


def handle_find(event: Event, context: DicomContext) -> Iterator[tuple[int, Dataset | None]]:
    """EVT_C_FIND, for associations pynetdicom serves."""
    for status, payload in find(
        context,
        context.tally(event.assoc),
        lambda: requested(event.identifier),
        str(event.request.AffectedSOPClassUID),
        lambda: event.is_cancelled,
    ):
        if isinstance(payload, list):
            yield status, dataset_of(payload)
        else:
            yield (failure(status, payload) if payload else status), None
