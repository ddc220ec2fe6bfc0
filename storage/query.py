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
import threading
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import date

from sqlalchemy import (
    BindParameter,
    Boolean,
    ColumnElement,
    Connection,
    Executable,
    Integer,
    Select,
    and_,
    bindparam,
    distinct,
    func,
    or_,
    select,
    true,
)
from sqlalchemy.ext.compiler import compiles
from sqlalchemy.sql.functions import FunctionElement

from storage.header import valid_uid
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
    everything: bool = False

    @classmethod
    def archive(cls) -> Viewer:
        """The archive itself, for its own background work (thumbnails): sees everything.
        Never a caller's viewer."""
        return cls("", everything=True)


Match = dict[str, object]


def is_exact(value: str) -> bool:
    """A single value with no wildcard, range or list: what identifies one patient."""
    return bool(value) and not any(c in value for c in ("*", "?", "\\"))


@dataclass(frozen=True)
class _Rule:
    """One condition of a search, split in two: its shape, which decides the SQL, and its
    values, bound as parameters. Searches of one shape (PatientID=X, whatever X) then share
    one statement, built and compiled once: building and compiling a statement took ten
    times as long as SQLite took to answer it."""

    shape: tuple
    values: tuple = ()
    # The condition, from one bind parameter per value (built only for a new shape).
    build: Callable[..., ColumnElement[bool]] = lambda: true()


def _all_of(rules: list[_Rule], either: bool = False) -> _Rule:
    """Every rule (or, with `either`, any of them), as one rule."""

    def build(*params: BindParameter) -> ColumnElement[bool]:
        built, position = [], 0
        for rule in rules:
            built.append(rule.build(*params[position : position + len(rule.values)]))
            position += len(rule.values)
        return or_(*built) if either else and_(*built)

    shape = ("or" if either else "and", *(rule.shape for rule in rules))
    return _Rule(shape, tuple(v for rule in rules for v in rule.values), build)


def visible_to(viewer: Viewer, keys: Mapping[str, str]) -> _Rule:
    """The access rule, for every route: an institution sees every study it sent, and
    another institution's study only through an exact patient identifier, which the query
    itself then matches on: PatientID with its IssuerOfPatientID, both single values, or a
    PatientID alone when it is the regional identifier (the patient's issuer is the
    configured regional issuer). So nobody browses the region by wildcard or by date."""
    if viewer.everything:
        return _Rule(("anyone's",))
    own = _Rule(("own",), (viewer.institution,), lambda i: Study.source_institution == i)
    if not is_exact(keys.get("PatientID", "")):
        return own
    if is_exact(keys.get("IssuerOfPatientID", "")):
        return _Rule(("anyone's",))
    if viewer.regional_issuer and not keys.get("IssuerOfPatientID", "").strip():
        return _Rule(
            ("own or regional",),
            (viewer.institution, viewer.regional_issuer),
            lambda i, r: or_(Study.source_institution == i, Patient.issuer_of_patient_id == r),
        )
    return own


class NameLike(FunctionElement[bool]):
    """`column LIKE pattern` without regard to case (`pattern` already lowered), written
    the way each database answers it from the patient name index (migration 0003)."""

    type = Boolean()
    inherit_cache = True
    # A condition as it stands: without this, SQLAlchemy writes `... = 1` on databases
    # without a boolean type, and SQLite cannot use the index for that.
    _is_implicitly_boolean = True


class NameEquals(FunctionElement[bool]):
    """`column = value` without regard to case (`value` already lowered), likewise."""

    type = Boolean()
    inherit_cache = True
    _is_implicitly_boolean = True


@compiles(NameLike)
def _lowered_like(element: NameLike, compiler, **kw) -> str:
    column, pattern = element.clauses
    return compiler.process(func.lower(column).like(pattern, escape="\\"), **kw)


@compiles(NameLike, "sqlite")
def _nocase_like(element: NameLike, compiler, **kw) -> str:
    # SQLite's LIKE ignores ASCII case, as its lower() folds only ASCII: the same matches.
    # unlikely(): without table statistics SQLite guesses a LIKE selects much and scans
    # studies in order instead of the name index (55 ms instead of 0.2 at 100,000 studies).
    column, pattern = element.clauses
    return compiler.process(func.unlikely(column.like(pattern, escape="\\")), **kw)


@compiles(NameEquals)
def _lowered_equals(element: NameEquals, compiler, **kw) -> str:
    column, value = element.clauses
    return compiler.process(func.lower(column) == value, **kw)


@compiles(NameEquals, "sqlite")
def _nocase_equals(element: NameEquals, compiler, **kw) -> str:
    column, value = element.clauses
    return compiler.process(column.collate("NOCASE") == value, **kw)


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


def _single(attribute: _Attribute, keyword: str, value: str) -> _Rule:
    column = attribute.column
    kind = attribute.kind
    if kind is Kind.DATE and "-" in value:
        low, _, high = value.partition("-")
        rules = [_Rule(("dated", keyword), (), lambda: column.is_not(None))]
        if low.strip():
            rules.append(
                _Rule((">=", keyword), (_parse_date(low, keyword),), lambda d: column >= d)
            )
        if high.strip():
            rules.append(
                _Rule(("<=", keyword), (_parse_date(high, keyword),), lambda d: column <= d)
            )
        return _all_of(rules)
    if kind is Kind.DATE:
        return _Rule(("=", keyword), (_parse_date(value, keyword),), lambda d: column == d)
    if kind is Kind.TIME and "-" in value:
        low, _, high = (part.strip() for part in value.partition("-"))
        rules = [_Rule(("timed", keyword), (), lambda: column != "")]
        if low:
            rules.append(_Rule((">=", keyword), (low,), lambda t: column >= t))
        if high:
            # "1200" as the upper end covers 12:00:00.000 to 12:00:59.999: compare on the
            # precision given.
            precision = len(high)
            rules.append(
                _Rule(
                    ("<= to precision", keyword, precision),
                    (high,),
                    lambda t: func.substr(column, 1, precision) <= t,
                )
            )
        return _all_of(rules)
    if kind is Kind.NUMBER:
        text = value.strip()
        number = int(text) if len(text) <= 12 and text.lstrip("+-").isdigit() else None
        if number is None or not -(2**31) <= number < 2**31:  # IS: a 32-bit integer
            raise InvalidQuery(f"{keyword}: {value[:80]!r} is not a number")
        return _Rule(("=", keyword), (number,), lambda n: column == n)
    if kind is Kind.UID and value != "*" and not valid_uid(value):
        raise InvalidQuery(f"{keyword}: {value[:80]!r} is not a UID")
    if any(w in value for w in _WILDCARDS):
        if kind is Kind.NAME:
            return _Rule(
                ("name like", keyword), (_like(value.lower()),), lambda p: NameLike(column, p)
            )
        return _Rule(("like", keyword), (_like(value),), lambda p: column.like(p, escape="\\"))
    if kind is Kind.NAME:
        return _Rule(("name =", keyword), (value.lower(),), lambda n: NameEquals(column, n))
    return _Rule(("=", keyword), (value,), lambda v: column == v)


def _condition(keyword: str, value: str) -> _Rule | None:
    if keyword == "ModalitiesInStudy":
        modalities = [v for v in value.split("\\") if v]
        if not modalities:
            return None
        any_of = _all_of([_single(ATTRIBUTES["Modality"], "Modality", m) for m in modalities], True)
        return _Rule(
            ("modalities", any_of.shape),
            any_of.values,
            lambda *p: Study.id.in_(select(Series.study_pk).where(any_of.build(*p))),
        )
    attribute = ATTRIBUTES[keyword]
    values = [v for v in value.split("\\")] if "\\" in value else [value]
    if len(values) > 1:
        if attribute.kind is Kind.UID and not any(any(w in v for w in _WILDCARDS) for v in values):
            column = attribute.column
            # One expanding parameter: a list of 1,000 UIDs is the same shape as one of 2.
            return _Rule(("in", keyword), (values,), lambda uids: column.in_(uids))
        return _all_of([_single(attribute, keyword, v) for v in values], either=True)
    return _single(attribute, keyword, value)


def _conditions(query: Query, viewer: Viewer) -> _Rule:
    """What a row must satisfy: the query's keys, and the access rule."""
    rules = [visible_to(viewer, query.keys)]
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
        rule = _condition(keyword, value)
        if rule is not None:
            rules.append(rule)
    return _all_of(rules)


class _Statements:
    """Statements by shape, the most recently used kept (a client asking with ever new
    shapes, offsets say, only evicts older ones)."""

    def __init__(self, capacity: int = 1024) -> None:
        self._capacity = capacity
        self._statements: OrderedDict[tuple, Executable] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, shape: tuple, make: Callable[[], Executable]) -> Executable:
        with self._lock:
            statement = self._statements.get(shape)
            if statement is not None:
                self._statements.move_to_end(shape)
                return statement
        statement = make()
        with self._lock:
            self._statements[shape] = statement
            while len(self._statements) > self._capacity:
                self._statements.popitem(last=False)
        return statement


_STATEMENTS = _Statements()


def _where(rule: _Rule) -> ColumnElement[bool]:
    """The rule's condition on bind parameters v0, v1, ... (see `_values`)."""
    return rule.build(
        *(bindparam(f"v{n}", expanding=isinstance(v, list)) for n, v in enumerate(rule.values))
    )


def _values(rule: _Rule) -> dict[str, object]:
    """The rule's values, by the names `_where` gave their parameters."""
    return {f"v{n}": value for n, value in enumerate(rule.values)}


def _joined(statement: Select, level: QueryLevel) -> Select:
    statement = statement.select_from(Patient).join(Study)
    if level >= SE:
        statement = statement.join(Series)
    if level >= IM:
        statement = statement.join(Instance)
    return statement


def _select(query: Query, viewer: Viewer) -> tuple[Executable, dict[str, object]]:
    """The search's statement (shared by every search of its shape) and its parameters."""
    level = query.level
    returned = tuple(
        keyword
        for keyword, attribute in ATTRIBUTES.items()
        if attribute.level <= level and (keyword in query.keys or keyword == UNIQUE_KEYS[level])
    )
    rule = _conditions(query, viewer)
    paging = (query.offset > 0, query.limit is not None)

    def make() -> Executable:
        columns = [ATTRIBUTES[keyword].column.label(keyword) for keyword in returned]
        table = _TABLES[level]
        statement = _joined(select(table.id.label("pk"), *columns), level)
        # A patient (or study) appears once, however many rows below it matched.
        statement = statement.where(_where(rule)).distinct().order_by(table.id)
        if paging[0]:
            statement = statement.offset(bindparam("offset", type_=Integer))
        if paging[1]:
            statement = statement.limit(bindparam("limit", type_=Integer))
        return statement

    params = _values(rule)
    if paging[0]:
        params["offset"] = query.offset
    if paging[1]:
        params["limit"] = query.limit
    return _STATEMENTS.get(("search", level, returned, rule.shape, paging), make), params


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
    sha256: str
    pixel_layout: str | None = None  # `storage.header.PixelLayout.to_text`, for the renderer


def locate(index: Index, query: Query, viewer: Viewer) -> list[Located]:
    """Every stored instance below the matches of `query`: what C-MOVE, C-GET and WADO-RS
    send, found with the same matching and the same access rule as a search."""
    rule = _conditions(query, viewer)

    def make() -> Executable:
        statement = _joined(
            select(
                Instance.sop_class_uid,
                Instance.sop_instance_uid,
                Instance.transfer_syntax_uid,
                Instance.object_key,
                Instance.size,
                Study.study_instance_uid,
                Series.series_instance_uid,
                Instance.sha256,
                Instance.pixel_layout,
            ),
            QueryLevel.IMAGE,
        )
        return statement.where(_where(rule)).order_by(
            Series.id, Instance.instance_number, Instance.id
        )

    statement = _STATEMENTS.get(("locate", rule.shape), make)
    return [Located(*row) for row in index.rows(statement, _values(rule))]


def search(index: Index, query: Query, viewer: Viewer) -> list[Match]:
    """Every visible match of `query`, with the requested keys and the level's unique key."""
    statement, params = _select(query, viewer)
    # Core, not the ORM session: these are plain selects, and the ORM's execution layer
    # took 40 % of a search's time.
    with index.reading() as connection:
        rows = connection.execute(statement, params).mappings().all()
        pks = [row["pk"] for row in rows]
        matches: list[Match] = [{k: v for k, v in row.items() if k != "pk"} for row in rows]
        computed = [k for k in query.keys if k in COMPUTED and COMPUTED[k] == query.level]
        if computed and rows:
            _add_computed(connection, query, viewer, pks, matches, computed)
    return matches


# Counts below each match, per level; `pks` an expanding parameter.
_STUDY_COUNTS = (
    # One statement for all three study keys: counts per study and modality, summed per
    # study (a series has one modality, so its count is never split).
    select(
        Series.study_pk,
        Series.modality,
        func.count(distinct(Series.id)),
        func.count(Instance.id),
    )
    .select_from(Series)
    .outerjoin(Instance)
    .where(Series.study_pk.in_(bindparam("pks", expanding=True)))
    .group_by(Series.study_pk, Series.modality)
    .order_by(Series.study_pk, Series.modality)
)
_SERIES_COUNTS = (
    select(Instance.series_pk, func.count(Instance.id))
    .where(Instance.series_pk.in_(bindparam("pks", expanding=True)))
    .group_by(Instance.series_pk)
)


def _add_computed(connection: Connection, query, viewer, pks, matches, computed) -> None:
    level = query.level
    if level == ST:
        series: dict[int, int] = {}
        instances: dict[int, int] = {}
        modalities: dict[int, list[str]] = {}
        for study_pk, modality, series_count, instance_count in connection.execute(
            _STUDY_COUNTS, {"pks": pks}
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
        counts = dict(connection.execute(_SERIES_COUNTS, {"pks": pks}).all())
        for pk, match in zip(pks, matches, strict=True):
            match["NumberOfSeriesRelatedInstances"] = counts.get(pk, 0)
    elif level == P:
        visible = visible_to(viewer, query.keys)
        counts = {
            keyword: _patient_counts(connection, pks, visible, table)
            for keyword, table in (
                ("NumberOfPatientRelatedStudies", Study),
                ("NumberOfPatientRelatedSeries", Series),
                ("NumberOfPatientRelatedInstances", Instance),
            )
        }
        for pk, match in zip(pks, matches, strict=True):
            for keyword in computed:
                match[keyword] = counts[keyword].get(pk, 0)


def _patient_counts(connection: Connection, pks, visible: _Rule, table) -> dict[int, int]:
    """Studies, series or instances (`table`) of each patient the viewer may see."""

    def make() -> Executable:
        # Patient joined for the access rule, which may test the patient's issuer.
        statement = (
            select(Study.patient_pk, func.count(distinct(table.id)))
            .select_from(Study)
            .join(Patient, Study.patient_pk == Patient.id)
        )
        if table in (Series, Instance):
            statement = statement.join(Series)
        if table is Instance:
            statement = statement.join(Instance)
        return statement.where(
            Study.patient_pk.in_(bindparam("pks", expanding=True)), _where(visible)
        ).group_by(Study.patient_pk)

    statement = _STATEMENTS.get(("patient counts", table.__tablename__, visible.shape), make)
    return dict(connection.execute(statement, {"pks": pks, **_values(visible)}).all())
