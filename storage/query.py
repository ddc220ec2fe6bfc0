"""Searching the index: the matching rules of PS3.4 C.2.2.2, at the PATIENT, STUDY,
SERIES and IMAGE levels, answered from the index alone (no object reads).

Protocol-free: C-FIND (pacs) and QIDO-RS (viewer_api) both turn their request into a
`Query` of DICOM keywords and string values, and get `Match`es back as keyword -> value
dictionaries. Access is decided here too, once for both routes (`visible_to`).

Matching, per attribute:
- empty value: universal match (the attribute is only returned);
- ``*`` and ``?``: wildcard match;
- ``A-B``, ``-B``, ``A-``: range match (dates, times);
- ``A\\B``: list of values (UID lists, and any other attribute);
- anything else: single value match, exact; person names match case-insensitively.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import date

from sqlalchemy import ColumnElement, Connection, Select, and_, distinct, func, or_, select, true

from storage.index import Index
from storage.models import Instance, Patient, Series, Study


class QueryLevel(enum.IntEnum):
    PATIENT = 0
    STUDY = 1
    SERIES = 2
    IMAGE = 3


class InvalidQuery(ValueError):
    """A query that cannot be answered (unknown level or key, malformed value)."""


class Kind(enum.Enum):
    TEXT = "text"
    NAME = "name"  # PN: case-insensitive
    DATE = "date"
    TIME = "time"
    UID = "uid"
    NUMBER = "number"


@dataclass(frozen=True)
class _Attribute:
    level: QueryLevel
    column: object
    kind: Kind


P, ST, SE, IM = QueryLevel.PATIENT, QueryLevel.STUDY, QueryLevel.SERIES, QueryLevel.IMAGE

ATTRIBUTES: dict[str, _Attribute] = {
    "PatientID": _Attribute(P, Patient.patient_id, Kind.TEXT),
    "IssuerOfPatientID": _Attribute(P, Patient.issuer_of_patient_id, Kind.TEXT),
    "PatientName": _Attribute(P, Patient.patient_name, Kind.NAME),
    "PatientBirthDate": _Attribute(P, Patient.patient_birth_date, Kind.DATE),
    "PatientSex": _Attribute(P, Patient.patient_sex, Kind.TEXT),
    "StudyInstanceUID": _Attribute(ST, Study.study_instance_uid, Kind.UID),
    "StudyDate": _Attribute(ST, Study.study_date, Kind.DATE),
    "StudyTime": _Attribute(ST, Study.study_time, Kind.TIME),
    "AccessionNumber": _Attribute(ST, Study.accession_number, Kind.TEXT),
    "StudyID": _Attribute(ST, Study.study_id, Kind.TEXT),
    "StudyDescription": _Attribute(ST, Study.study_description, Kind.TEXT),
    "ReferringPhysicianName": _Attribute(ST, Study.referring_physician_name, Kind.NAME),
    "InstitutionName": _Attribute(ST, Study.institution_name, Kind.TEXT),
    "SeriesInstanceUID": _Attribute(SE, Series.series_instance_uid, Kind.UID),
    "Modality": _Attribute(SE, Series.modality, Kind.TEXT),
    "SeriesNumber": _Attribute(SE, Series.series_number, Kind.NUMBER),
    "SeriesDescription": _Attribute(SE, Series.series_description, Kind.TEXT),
    "BodyPartExamined": _Attribute(SE, Series.body_part_examined, Kind.TEXT),
    "SeriesDate": _Attribute(SE, Series.series_date, Kind.DATE),
    "SeriesTime": _Attribute(SE, Series.series_time, Kind.TIME),
    "SOPInstanceUID": _Attribute(IM, Instance.sop_instance_uid, Kind.UID),
    "SOPClassUID": _Attribute(IM, Instance.sop_class_uid, Kind.UID),
    "InstanceNumber": _Attribute(IM, Instance.instance_number, Kind.NUMBER),
    "NumberOfFrames": _Attribute(IM, Instance.number_of_frames, Kind.NUMBER),
    "Rows": _Attribute(IM, Instance.rows, Kind.NUMBER),
    "Columns": _Attribute(IM, Instance.columns, Kind.NUMBER),
}

# Computed from the rows below a match; returned, and ModalitiesInStudy also matched on.
COMPUTED: dict[str, QueryLevel] = {
    "ModalitiesInStudy": ST,
    "NumberOfPatientRelatedStudies": P,
    "NumberOfPatientRelatedSeries": P,
    "NumberOfPatientRelatedInstances": P,
    "NumberOfStudyRelatedSeries": ST,
    "NumberOfStudyRelatedInstances": ST,
    "NumberOfSeriesRelatedInstances": SE,
}

UNIQUE_KEYS = {
    P: "PatientID",
    ST: "StudyInstanceUID",
    SE: "SeriesInstanceUID",
    IM: "SOPInstanceUID",
}
_TABLES = {P: Patient, ST: Study, SE: Series, IM: Instance}
_WILDCARDS = ("*", "?")


@dataclass(frozen=True)
class Query:
    """What to find: a level, and keyword -> DICOM string value ("" = return only)."""

    level: QueryLevel
    keys: Mapping[str, str]
    limit: int | None = None
    offset: int = 0


@dataclass(frozen=True)
class Viewer:
    """On whose behalf a search runs: the institution whose rules apply, and the issuer of
    the region's patient identifier, if the platform has one (`POCKETPACS_REGIONAL_ISSUER`)."""

    institution: str
    regional_issuer: str = ""


Match = dict[str, object]


def is_exact(value: str) -> bool:
    """A single value with no wildcard, range or list: what identifies one patient."""
    return bool(value) and not any(c in value for c in ("*", "?", "\\"))


def visible_to(viewer: Viewer, keys: Mapping[str, str]) -> ColumnElement[bool]:
    """The access rule, for every route: an institution sees every study it sent, and
    another institution's study only through an exact patient identifier, which the query
    itself then matches on: PatientID with its IssuerOfPatientID, both single values, or a
    PatientID alone when it is the regional identifier (the patient's issuer is the
    configured regional issuer). So nobody browses the region by wildcard or by date."""
    own = Study.source_institution == viewer.institution
    if not is_exact(keys.get("PatientID", "")):
        return own
    if is_exact(keys.get("IssuerOfPatientID", "")):
        return true()
    if viewer.regional_issuer and not keys.get("IssuerOfPatientID", "").strip():
        return or_(own, Patient.issuer_of_patient_id == viewer.regional_issuer)
    return own


def _like(pattern: str) -> str:
    escaped = pattern.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
    return escaped.replace("*", "%").replace("?", "_")


def _parse_date(text: str, keyword: str) -> date:
    text = text.strip().replace(".", "")
    if len(text) != 8 or not text.isdigit():
        raise InvalidQuery(f"{keyword}: {text!r} is not a date (YYYYMMDD)")
    try:
        return date(int(text[:4]), int(text[4:6]), int(text[6:]))
    except ValueError as exc:
        raise InvalidQuery(f"{keyword}: {text!r} is not a date") from exc


def _single(attribute: _Attribute, keyword: str, value: str) -> ColumnElement[bool]:
    column = attribute.column
    kind = attribute.kind
    if kind is Kind.DATE:
        if "-" in value:
            low, _, high = value.partition("-")
            conditions = [column.is_not(None)]
            if low.strip():
                conditions.append(column >= _parse_date(low, keyword))
            if high.strip():
                conditions.append(column <= _parse_date(high, keyword))
            return and_(*conditions)
        return column == _parse_date(value, keyword)
    if kind is Kind.TIME and "-" in value:
        low, _, high = value.partition("-")
        conditions = [column != ""]
        if low.strip():
            conditions.append(column >= low.strip())
        if high.strip():
            # "1200" covers 12:00:00.000 to 12:00:59.999: compare on the given precision.
            conditions.append(func.substr(column, 1, len(high.strip())) <= high.strip())
        return and_(*conditions)
    if kind is Kind.NUMBER:
        try:
            return column == int(value)
        except ValueError as exc:
            raise InvalidQuery(f"{keyword}: {value!r} is not a number") from exc
    if any(w in value for w in _WILDCARDS):
        if kind is Kind.NAME:
            return func.lower(column).like(_like(value.lower()), escape="\\")
        return column.like(_like(value), escape="\\")
    if kind is Kind.NAME:
        return func.lower(column) == value.lower()
    return column == value


def _condition(keyword: str, value: str) -> ColumnElement[bool] | None:
    if keyword == "ModalitiesInStudy":
        modalities = [v for v in value.split("\\") if v]
        if not modalities:
            return None
        return Study.id.in_(
            select(Series.study_pk).where(
                or_(*(_single(ATTRIBUTES["Modality"], "Modality", m) for m in modalities))
            )
        )
    attribute = ATTRIBUTES[keyword]
    values = [v for v in value.split("\\")] if "\\" in value else [value]
    if len(values) > 1:
        if attribute.kind is Kind.UID and not any(any(w in v for w in _WILDCARDS) for v in values):
            return attribute.column.in_(values)
        return or_(*(_single(attribute, keyword, v) for v in values))
    return _single(attribute, keyword, value)


def _conditions(query: Query, viewer: Viewer) -> ColumnElement[bool]:
    """What a row must satisfy: the query's keys, and the access rule."""
    conditions = [visible_to(viewer, query.keys)]
    for keyword, value in query.keys.items():
        value = value.strip()
        if not value or keyword in ("QueryRetrieveLevel", "SpecificCharacterSet"):
            continue
        if keyword not in ATTRIBUTES and keyword not in COMPUTED:
            continue  # an optional key we do not hold: returned empty (PS3.4 C.2.2.1.3)
        level_of = ATTRIBUTES[keyword].level if keyword in ATTRIBUTES else COMPUTED[keyword]
        if level_of > query.level:
            raise InvalidQuery(f"{keyword} is below the {query.level.name} level")
        if keyword in COMPUTED and keyword != "ModalitiesInStudy":
            continue  # counts are returned, not matched on
        condition = _condition(keyword, value)
        if condition is not None:
            conditions.append(condition)
    return and_(*conditions)


def _joined(statement: Select, level: QueryLevel) -> Select:
    statement = statement.select_from(Patient).join(Study)
    if level >= SE:
        statement = statement.join(Series)
    if level >= IM:
        statement = statement.join(Instance)
    return statement


def _select(query: Query, viewer: Viewer) -> Select:
    level = query.level
    columns = [
        attribute.column.label(keyword)
        for keyword, attribute in ATTRIBUTES.items()
        if attribute.level <= level and (keyword in query.keys or keyword == UNIQUE_KEYS[level])
    ]
    table = _TABLES[level]
    statement = _joined(select(table.id.label("pk"), *columns), level)
    # A patient (or study) appears once, however many rows below it matched.
    statement = statement.where(_conditions(query, viewer)).distinct().order_by(table.id)
    if query.offset:
        statement = statement.offset(query.offset)
    if query.limit is not None:
        statement = statement.limit(query.limit)
    return statement


@dataclass(frozen=True)
class Located:
    """A stored instance a retrieval names, and where its bytes are."""

    sop_class_uid: str
    sop_instance_uid: str
    transfer_syntax_uid: str
    object_key: str
    size: int
    study_instance_uid: str
    series_instance_uid: str


def locate(index: Index, query: Query, viewer: Viewer) -> list[Located]:
    """Every stored instance below the matches of `query`: what C-MOVE, C-GET and WADO-RS
    send, found with the same matching and the same access rule as a search."""
    statement = _joined(
        select(
            Instance.sop_class_uid,
            Instance.sop_instance_uid,
            Instance.transfer_syntax_uid,
            Instance.object_key,
            Instance.size,
            Study.study_instance_uid,
            Series.series_instance_uid,
        ),
        QueryLevel.IMAGE,
    ).where(_conditions(query, viewer))
    statement = statement.order_by(Series.id, Instance.instance_number, Instance.id)
    with index.engine.connect() as connection:
        return [Located(*row) for row in connection.execute(statement)]


def search(index: Index, query: Query, viewer: Viewer) -> list[Match]:
    """Every visible match of `query`, with the requested keys and the level's unique key."""
    statement = _select(query, viewer)
    # Core, not the ORM session: these are plain selects, and the ORM's execution layer
    # took 40 % of a search's time.
    with index.engine.connect() as connection:
        rows = connection.execute(statement).mappings().all()
        pks = [row["pk"] for row in rows]
        matches: list[Match] = [{k: v for k, v in row.items() if k != "pk"} for row in rows]
        computed = [k for k in query.keys if k in COMPUTED and COMPUTED[k] == query.level]
        if computed and rows:
            _add_computed(connection, query, viewer, pks, matches, computed)
    return matches


def _add_computed(connection: Connection, query, viewer, pks, matches, computed) -> None:
    level = query.level
    own_or_all = visible_to(viewer, query.keys)
    if level == ST:
        # One statement for all three: counts per study and modality, summed per study
        # below (a series has one modality, so its count is never split).
        series: dict[int, int] = {}
        instances: dict[int, int] = {}
        modalities: dict[int, list[str]] = {}
        for study_pk, modality, series_count, instance_count in connection.execute(
            select(
                Series.study_pk,
                Series.modality,
                func.count(distinct(Series.id)),
                func.count(Instance.id),
            )
            .select_from(Series)
            .outerjoin(Instance)
            .where(Series.study_pk.in_(pks))
            .group_by(Series.study_pk, Series.modality)
            .order_by(Series.study_pk, Series.modality)
        ):
            series[study_pk] = series.get(study_pk, 0) + series_count
            instances[study_pk] = instances.get(study_pk, 0) + instance_count
            if modality:
                modalities.setdefault(study_pk, []).append(modality)
        for pk, match in zip(pks, matches, strict=True):
            values = {
                "ModalitiesInStudy": modalities.get(pk, []),
                "NumberOfStudyRelatedSeries": series.get(pk, 0),
                "NumberOfStudyRelatedInstances": instances.get(pk, 0),
            }
            for keyword in computed:
                match[keyword] = values[keyword]
    elif level == SE:
        counts = dict(
            connection.execute(
                select(Instance.series_pk, func.count(Instance.id))
                .where(Instance.series_pk.in_(pks))
                .group_by(Instance.series_pk)
            ).all()
        )
        for pk, match in zip(pks, matches, strict=True):
            match["NumberOfSeriesRelatedInstances"] = counts.get(pk, 0)
    elif level == P:
        studies = _patient_counts(connection, pks, own_or_all, distinct(Study.id), Study)
        series = _patient_counts(connection, pks, own_or_all, distinct(Series.id), Series)
        instances = _patient_counts(connection, pks, own_or_all, distinct(Instance.id), Instance)
        for pk, match in zip(pks, matches, strict=True):
            values = {
                "NumberOfPatientRelatedStudies": studies.get(pk, 0),
                "NumberOfPatientRelatedSeries": series.get(pk, 0),
                "NumberOfPatientRelatedInstances": instances.get(pk, 0),
            }
            for keyword in computed:
                match[keyword] = values[keyword]


def _patient_counts(connection: Connection, pks, visible, counted, table) -> dict[int, int]:
    statement = select(Study.patient_pk, func.count(counted)).select_from(Study)
    if table in (Series, Instance):
        statement = statement.join(Series)
    if table is Instance:
        statement = statement.join(Instance)
    statement = statement.where(Study.patient_pk.in_(pks), visible).group_by(Study.patient_pk)
    return dict(connection.execute(statement).all())
