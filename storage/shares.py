"""Pocket film share links (SPEC 5, 6): a token that opens one study on a phone.

The token is the link and the only key: 192 random bits, shown once, kept as a SHA-256.
A link may demand a 6-digit access code, kept as a SHA-256 taken with the token, so the
database alone opens no link and confirms no code. Wrong codes lock the link, and the
address that tried them, for `LOCK_MINUTES` after `LOCK_AFTER` failures. Protocol-free:
`viewer_api` serves the page and the command line makes links with the same class.
"""

from __future__ import annotations

import hashlib
import hmac
import io
import logging
import re
import secrets
import threading
import time
from collections import Counter, OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta

import segno
from sqlalchemy import bindparam, func, select, update
from sqlalchemy.exc import SQLAlchemyError

from storage.index import Index, IndexUnavailable
from storage.models import Instance as InstanceRow
from storage.models import Patient, Series, Share, ShareDay, ShareFailure, Study
from storage.query import Located, Query, QueryLevel, Viewer, locate

log = logging.getLogger(__name__)

TOKEN_BYTES = 24  # 192 bits; SPEC 6 asks for at least 128
_TOKEN = re.compile(r"[A-Za-z0-9_-]{32}")
CODE_DIGITS = 6
LOCK_AFTER = 5
LOCK_MINUTES = 15
# Tokens that open nothing, from one address in LOCK_MINUTES, before it may try no more.
MISSES_AFTER = 20
DEFAULT_DAYS = 30
# How long a study's arrangement for the page is reused, and for how many studies.
STUDY_SECONDS = 5.0
# Views are counted in memory and written together at most this long after the first.
VIEWS_WRITTEN_WITHIN = 1.0
STUDIES_KEPT = 256
LONGEST_DAYS = 3650

# Reports a pocket film shows as such rather than as images.
SR_PREFIX = "1.2.840.10008.5.1.4.1.1.88."
ENCAPSULATED_PDF = "1.2.840.10008.5.1.4.1.1.104.1"


class ShareError(Exception):
    """A link that cannot be opened, or an access code not accepted."""


class ShareNotFound(ShareError):
    """No such link (or a malformed token): told apart from nothing else."""


class ShareGone(ShareError):
    """An expired or revoked link (HTTP 410): the patient is told whom to ask."""

    def __init__(self, reason: str, institution: str) -> None:
        super().__init__(f"this link was {reason}")
        self.reason = reason  # "expired" or "revoked"
        self.institution = institution


class ShareLocked(ShareError):
    """Too many wrong codes for this link or from this address."""

    def __init__(self, retry_after: int) -> None:
        super().__init__(f"too many wrong codes: try again in {retry_after // 60 + 1} minutes")
        self.retry_after = retry_after


class WrongCode(ShareError):
    def __init__(self, remaining: int) -> None:
        super().__init__(f"wrong access code ({remaining} tries left)")
        self.remaining = remaining


@dataclass(frozen=True)
class ShareLink:
    """A link as staff see it (never its token)."""

    id: int
    study_instance_uid: str
    institution: str
    created_by: str
    created_at: datetime
    expires_at: datetime
    revoked_at: datetime | None
    allow_download: bool
    has_access_code: bool
    views: int
    last_view_at: datetime | None

    @property
    def state(self) -> str:
        if self.revoked_at is not None:
            return "revoked"
        return "expired" if self.expires_at <= datetime.now(UTC) else "active"


@dataclass(frozen=True)
class NewShare:
    """A link just made: its token and access code exist only here."""

    link: ShareLink
    token: str
    access_code: str | None


def token_sha256(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def _code_sha256(token: str, code: str) -> str:
    return hashlib.sha256(f"{token}:{code}".encode()).hexdigest()


def masked_token(token: str) -> str:
    """What logs and audit rows show of a token: enough to tell links apart."""
    return token[:6] + "…"


def _aware(moment: datetime | None) -> datetime | None:
    """SQLite keeps no time zone; every moment here is UTC."""
    if moment is not None and moment.tzinfo is None:
        return moment.replace(tzinfo=UTC)
    return moment


def _link(row: Share) -> ShareLink:
    return ShareLink(
        id=row.id,
        study_instance_uid=row.study_instance_uid,
        institution=row.institution,
        created_by=row.created_by,
        created_at=_aware(row.created_at),  # type: ignore[arg-type]
        expires_at=_aware(row.expires_at),  # type: ignore[arg-type]
        revoked_at=_aware(row.revoked_at),
        allow_download=row.allow_download,
        has_access_code=row.access_code_sha256 is not None,
        views=row.views,
        last_view_at=_aware(row.last_view_at),
    )


# What `Shares.open` asks, built once.
_MISSES = (
    select(ShareFailure.at)
    .where(
        ShareFailure.source == bindparam("source"),
        ShareFailure.share_pk.is_(None),
        ShareFailure.at > bindparam("since"),
    )
    .order_by(ShareFailure.at.desc())
    .limit(MISSES_AFTER)
)
_BY_DIGEST = select(Share.__table__).where(Share.token_sha256 == bindparam("digest"))


class Shares:
    """Make, list, revoke and open share links; check access codes; count views."""

    def __init__(self, index: Index, clock: Callable[[], datetime] | None = None) -> None:
        self.index = index
        self.clock = clock or (lambda: datetime.now(UTC))
        self._studies: OrderedDict[str, tuple[float, PocketStudy | None]] = OrderedDict()
        self._lock = threading.Lock()
        # Views counted, not written yet: (link id, day) -> views; link id -> last view.
        self._views: Counter[tuple[int, date]] = Counter()
        self._last_views: dict[int, datetime] = {}
        self._views_timer: threading.Timer | None = None
        self._writing_views = threading.Lock()

    def study(self, study_instance_uid: str) -> PocketStudy | None:
        """`pocket_study`, remembered for `STUDY_SECONDS`: a phone swiping through a
        series asks for it with every slice. Whether the link still opens is never
        remembered; only how the study is arranged, which new instances change late by
        at most that long."""
        now = time.monotonic()
        with self._lock:
            found = self._studies.get(study_instance_uid)
            if found is not None and now - found[0] < STUDY_SECONDS:
                return found[1]
        arranged = pocket_study(self.index, study_instance_uid)
        with self._lock:
            self._studies[study_instance_uid] = (now, arranged)
            self._studies.move_to_end(study_instance_uid)
            while len(self._studies) > STUDIES_KEPT:
                self._studies.popitem(last=False)
        return arranged

    def create(
        self,
        study_instance_uid: str,
        institution: str,
        created_by: str,
        *,
        expires_in_days: int = DEFAULT_DAYS,
        access_code: bool = False,
        allow_download: bool = False,
    ) -> NewShare:
        """A new link. The caller has checked that `institution` may see the study."""
        if not 1 <= expires_in_days <= LONGEST_DAYS:
            raise ValueError(f"expires_in_days: from 1 to {LONGEST_DAYS}")
        token = secrets.token_urlsafe(TOKEN_BYTES)
        code = f"{secrets.randbelow(10**CODE_DIGITS):0{CODE_DIGITS}d}" if access_code else None
        now = self.clock()
        row = Share(
            token_sha256=token_sha256(token),
            study_instance_uid=study_instance_uid,
            institution=institution,
            created_by=created_by,
            created_at=now,
            expires_at=now + timedelta(days=expires_in_days),
            revoked_at=None,
            access_code_sha256=_code_sha256(token, code) if code else None,
            allow_download=allow_download,
            views=0,
            last_view_at=None,
        )
        with self.index.session() as session:
            session.add(row)
            session.commit()
            return NewShare(_link(row), token, code)

    def list(self, institution: str) -> list[ShareLink]:
        """An institution's links, newest first."""
        self.write_views()
        query = select(Share).where(Share.institution == institution).order_by(Share.id.desc())
        with self.index.session() as session:
            return [_link(row) for row in session.scalars(query)]

    def revoke(self, share_id: int, institution: str) -> ShareLink | None:
        """Withdraw a link at once; None when the institution has no such link."""
        with self.index.session() as session:
            row = session.get(Share, share_id)
            if row is None or row.institution != institution:
                return None
            if row.revoked_at is None:
                row.revoked_at = self.clock()
                session.commit()
            return _link(row)

    def open(self, token: str, source: str = "") -> tuple[ShareLink, str | None]:
        """The link a token opens and its access code's digest (None: no code).

        ShareNotFound for a malformed or unknown token (counted against `source`),
        ShareLocked when `source` tried too many of those, ShareGone when the link expired
        or was revoked. The token is looked up by its digest: a token right in all but one
        character is as far from a link as any other."""
        since = self.clock() - timedelta(minutes=LOCK_MINUTES)
        # Core selects, not the ORM: a phone opens the link with every image it asks for,
        # and the ORM session took half of that.
        with self.index.reading() as connection:
            misses = connection.execute(_MISSES, {"source": source, "since": since}).all()
            if len(misses) >= MISSES_AFTER:
                oldest = _aware(misses[-1].at)
                assert oldest is not None
                raise ShareLocked(int((oldest - since).total_seconds()) + 1)
            row = None
            if _TOKEN.fullmatch(token):
                row = connection.execute(_BY_DIGEST, {"digest": token_sha256(token)}).first()
            if row is not None:
                link = _link(row)
                reason = (
                    "revoked"
                    if link.revoked_at is not None
                    else "expired"
                    if link.expires_at <= self.clock()
                    else None
                )
                if reason is None:
                    return link, row.access_code_sha256
                # Whom to ask: the hospital as the patient knows it, from the study itself.
                hospital = connection.execute(
                    select(Study.institution_name).where(
                        Study.study_instance_uid == link.study_instance_uid
                    )
                ).scalar()
                raise ShareGone(reason, hospital or link.institution)
        with self.index.session() as session:
            session.add(ShareFailure(share_pk=None, source=source, at=self.clock()))
            session.commit()
        raise ShareNotFound("no such link")

    def locked_for(self, link: ShareLink, source: str) -> int:
        """Seconds until this link, or this address, may try a code again (0: now)."""
        since = self.clock() - timedelta(minutes=LOCK_MINUTES)
        waits = [0]
        with self.index.session() as session:
            for column, value in ((ShareFailure.share_pk, link.id), (ShareFailure.source, source)):
                recent = session.scalars(
                    select(ShareFailure.at)
                    .where(column == value, ShareFailure.at > since)
                    .order_by(ShareFailure.at.desc())
                    .limit(LOCK_AFTER)
                ).all()
                if len(recent) >= LOCK_AFTER:
                    oldest = _aware(recent[-1])
                    assert oldest is not None
                    waits.append(int((oldest - since).total_seconds()) + 1)
        return max(waits)

    def check_code(
        self, link: ShareLink, code_sha256: str | None, token: str, code: str, source: str
    ) -> None:
        """Accept the right code, or record a failure: WrongCode, ShareLocked."""
        if code_sha256 is None:
            return
        wait = self.locked_for(link, source)
        if wait:
            raise ShareLocked(wait)
        if hmac.compare_digest(_code_sha256(token, code.strip()), code_sha256):
            return
        with self.index.session() as session:
            session.add(ShareFailure(share_pk=link.id, source=source, at=self.clock()))
            session.commit()
        since = self.clock() - timedelta(minutes=LOCK_MINUTES)
        with self.index.session() as session:
            failures = session.scalar(
                select(func.count())
                .select_from(ShareFailure)
                .where(ShareFailure.share_pk == link.id, ShareFailure.at > since)
            )
        remaining = max(0, LOCK_AFTER - int(failures or 0))
        if remaining == 0:
            raise ShareLocked(self.locked_for(link, source))
        raise WrongCode(remaining)

    def count_view(self, link: ShareLink) -> None:
        """One more view of the link, today and in all: counted now, written with the
        others within `VIEWS_WRITTEN_WITHIN` (a write per view waited behind ingest for
        the database, and under load that wait was most of a phone's)."""
        now = self.clock()
        with self._lock:
            self._views[(link.id, now.date())] += 1
            self._last_views[link.id] = now
            self._schedule_views()

    def write_views(self) -> None:
        """Write the views counted so far (before reading them, and at shutdown).
        IndexUnavailable, with the views kept for the next try."""
        with self._writing_views:
            with self._lock:
                views, last = self._views, self._last_views
                self._views, self._last_views = Counter(), {}
                if self._views_timer is not None:
                    self._views_timer.cancel()
                    self._views_timer = None
            if not views:
                return
            try:
                self._write_views(views, last)
            except (IndexUnavailable, SQLAlchemyError):
                with self._lock:
                    self._views.update(views)
                    for share_pk, at in last.items():
                        self._last_views.setdefault(share_pk, at)
                raise

    def close(self) -> None:
        """Write the views counted so far."""
        try:
            self.write_views()
        except (IndexUnavailable, SQLAlchemyError) as exc:
            log.error("share link views not written at shutdown: %s", exc)

    def _write_later(self) -> None:
        try:
            self.write_views()
        except (IndexUnavailable, SQLAlchemyError) as exc:
            log.warning("share link views wait for the index: %s", exc)
            with self._lock:
                self._schedule_views()

    def _schedule_views(self) -> None:
        """Write the views `VIEWS_WRITTEN_WITHIN` from now, unless that is arranged (the
        lock held)."""
        if self._views_timer is None:
            self._views_timer = threading.Timer(VIEWS_WRITTEN_WITHIN, self._write_later)
            self._views_timer.daemon = True
            self._views_timer.start()

    def _write_views(self, views: Counter[tuple[int, date]], last: dict[int, datetime]) -> None:
        totals: Counter[int] = Counter()
        for (share_pk, _), count in views.items():
            totals[share_pk] += count
        with self.index.session() as session:
            for share_pk, count in totals.items():
                session.execute(
                    update(Share)
                    .where(Share.id == share_pk)
                    .values(views=Share.views + count, last_view_at=last[share_pk])
                )
            for (share_pk, day), count in views.items():
                changed = session.execute(
                    update(ShareDay)
                    .where(ShareDay.share_pk == share_pk, ShareDay.day == day)
                    .values(views=ShareDay.views + count)
                )
                if not changed.rowcount:  # type: ignore[attr-defined]
                    session.add(ShareDay(share_pk=share_pk, day=day, views=count))
                    session.flush()  # another process's row for the day shows up here
            session.commit()

    def views_by_day(self, share_id: int) -> dict[date, int]:
        self.write_views()
        with self.index.session() as session:
            rows = session.execute(
                select(ShareDay.day, ShareDay.views).where(ShareDay.share_pk == share_id)
            )
            return {day: views for day, views in rows}


def qr_code(url: str, kind: str) -> bytes:
    """The QR code of a link, as "png" or "svg", sized to print on a report."""
    buffer = io.BytesIO()
    options = {"xmldecl": False} if kind == "svg" else {}
    segno.make(url, error="m").save(buffer, kind=kind, scale=8, border=4, **options)
    return buffer.getvalue()


def study_institution(index: Index, study_instance_uid: str) -> str | None:
    """The institution that stored a study (who owns its links); None: no such study."""
    with index.session() as session:
        return session.scalar(
            select(Study.source_institution).where(Study.study_instance_uid == study_instance_uid)
        )


def session_cookie(code_sha256: str) -> str:
    """What proves that this browser gave the right code to this link: derived from the
    code's digest, so it opens nothing without the token, and dies with the link."""
    return hmac.new(code_sha256.encode(), b"pocket film session", "sha256").hexdigest()


# What the page shows of a study.


@dataclass(frozen=True)
class Image:
    """One image a viewer swipes through: an instance's frame."""

    item: Located
    frame: int


@dataclass(frozen=True)
class PocketSeries:
    number: int | None
    description: str
    modality: str
    body_part: str
    images: list[Image]


@dataclass(frozen=True)
class PocketStudy:
    patient_name: str  # masked
    patient_sex: str
    patient_age: str
    study_date: date | None
    description: str
    institution: str
    modalities: list[str]
    body_parts: list[str]
    series: list[PocketSeries]
    reports: list[Located]  # SR and encapsulated PDF
    instances: list[Located]  # everything, for the download


def masked_name(person_name: str) -> str:
    """A name a stranger reading over the shoulder cannot use: 张*明, J*** S***. The
    ideographic form of a DICOM name when there is one, given names first otherwise."""
    groups = person_name.split("=")
    ideographic = groups[1] if len(groups) > 1 and groups[1].strip("^ ") else ""
    if ideographic:
        text = ideographic.replace("^", "")
        if len(text) <= 1:
            return text
        if len(text) == 2:
            return text[0] + "*"
        return text[0] + "*" * (len(text) - 2) + text[-1]
    family, _, rest = groups[0].partition("^")
    given = rest.split("^")[0]
    words = [w for w in (given + " " + family).split() if w]
    if any(ord(ch) > 0x2E80 for w in words for ch in w):  # CJK written in the first group
        return masked_name("=" + "".join(reversed(words)) if len(words) > 1 else "=" + family)
    return " ".join(w[0].upper() + "***" for w in words)


def age_at(birth: date | None, on: date | None) -> str:
    """Whole years at the study date (months under two years); empty when unknown."""
    if birth is None or on is None or on < birth:
        return ""
    months = (on.year - birth.year) * 12 + on.month - birth.month - (on.day < birth.day)
    return f"{months // 12}Y" if months >= 24 else f"{months}M"


def pocket_study(index: Index, study_instance_uid: str) -> PocketStudy | None:
    """The study a link opens, arranged for the page; None when it holds nothing now."""
    located = locate(
        index, Query(QueryLevel.STUDY, {"StudyInstanceUID": study_instance_uid}), Viewer.archive()
    )
    if not located:
        return None
    with index.session() as session:
        head = session.execute(
            select(
                Patient.patient_name,
                Patient.patient_sex,
                Patient.patient_birth_date,
                Study.study_date,
                Study.study_description,
                Study.institution_name,
            )
            .join(Study, Study.patient_pk == Patient.id)
            .where(Study.study_instance_uid == study_instance_uid)
        ).one()
        rows = session.execute(
            select(
                Series.series_instance_uid,
                Series.series_number,
                Series.series_description,
                Series.modality,
                Series.body_part_examined,
                InstanceRow.sop_instance_uid,
                InstanceRow.number_of_frames,
                InstanceRow.rows,
            )
            .join(InstanceRow, InstanceRow.series_pk == Series.id)
            .join(Study, Study.id == Series.study_pk)
            .where(Study.study_instance_uid == study_instance_uid)
        ).all()
    about = {row.sop_instance_uid: row for row in rows}
    series: dict[str, PocketSeries] = {}
    reports: list[Located] = []
    for item in located:  # in series and instance order
        row = about[item.sop_instance_uid]
        if item.sop_class_uid.startswith(SR_PREFIX) or item.sop_class_uid == ENCAPSULATED_PDF:
            reports.append(item)
            continue
        if not row.rows:  # no pixel data: nothing to show
            continue
        entry = series.setdefault(
            item.series_instance_uid,
            PocketSeries(
                row.series_number,
                row.series_description,
                row.modality,
                row.body_part_examined,
                [],
            ),
        )
        entry.images.extend(Image(item, n) for n in range(1, (row.number_of_frames or 1) + 1))
    shown = list(series.values())
    return PocketStudy(
        patient_name=masked_name(head.patient_name),
        patient_sex=head.patient_sex,
        patient_age=age_at(head.patient_birth_date, head.study_date),
        study_date=head.study_date,
        description=head.study_description,
        institution=head.institution_name,
        modalities=sorted({s.modality for s in shown if s.modality}),
        body_parts=sorted({s.body_part for s in shown if s.body_part}),
        series=shown,
        reports=reports,
        instances=located,
    )
