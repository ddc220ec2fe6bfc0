"""The registry: institutions, DICOM nodes and API keys, kept in the index database.

Administrators change it with `pocketpacs institutions|nodes|keys`; the DICOM listener and
the HTTP API read it to know who is calling. Whatever the route, a caller is resolved
once into a `Caller`, and that is what access checks and the audit trail see.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
from dataclasses import dataclass
from datetime import UTC, datetime

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError

from storage.index import Index
from storage.models import ApiKey, Institution, Node

SCOPES = ("read", "ingest", "share", "admin")
# The one institution of a development archive (`serve --open`): every caller the registry
# does not know, DICOM or HTTP, belongs to it; also where `import` files go by default.
DEFAULT_INSTITUTION = "default"
KEY_PREFIX = "ppk"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


class RegistryError(ValueError):
    """A registry change that cannot be made, with the reason an administrator needs."""


@dataclass(frozen=True)
class Caller:
    """Who is asking, however they came (DICOM association or HTTP key)."""

    institution: str
    actor: str  # calling AE title, or API key id
    scopes: frozenset[str]
    source: str = ""  # peer address


@dataclass(frozen=True)
class NodeInfo:
    ae_title: str
    host: str
    port: int
    institution: str


@dataclass(frozen=True)
class KeyInfo:
    key_id: str
    institution: str
    scopes: tuple[str, ...]
    label: str
    created_at: datetime
    revoked_at: datetime | None


@dataclass(frozen=True)
class NewKey:
    """A key just created: `token` is shown to the administrator once and never stored."""

    key_id: str
    token: str
    institution: str
    scopes: tuple[str, ...]


def _sha256(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def _ae_title(value: str) -> str:
    value = value.strip()
    if not 1 <= len(value) <= 16 or "\\" in value or not value.isprintable():
        raise RegistryError("an AE title is 1 to 16 printable characters without backslash")
    return value


def parse_scopes(text: str) -> tuple[str, ...]:
    scopes = tuple(dict.fromkeys(s.strip() for s in text.split(",") if s.strip()))
    unknown = [s for s in scopes if s not in SCOPES]
    if unknown or not scopes:
        raise RegistryError(f"scopes are a comma-separated list of {', '.join(SCOPES)}")
    return scopes


class Registry:
    """Institutions, nodes and keys in the index database."""

    def __init__(self, index: Index) -> None:
        self.index = index

    # institutions ---------------------------------------------------------------------

    def add_institution(self, name: str, description: str = "") -> None:
        if not _NAME.match(name):
            raise RegistryError(
                "an institution name is 1 to 64 letters, digits, '.', '_' or '-', "
                "starting with a letter or digit"
            )
        with self.index.session() as session, session.begin():
            if session.scalar(select(Institution.id).where(Institution.name == name)):
                raise RegistryError(f"institution {name!r} exists already")
            session.add(
                Institution(name=name, description=description, created_at=datetime.now(UTC))
            )

    def institutions(self) -> list[tuple[str, str]]:
        with self.index.session() as session:
            rows = session.execute(
                select(Institution.name, Institution.description).order_by(Institution.name)
            )
            return [(name, description) for name, description in rows]

    def _institution_pk(self, session, name: str) -> int:
        pk = session.scalar(select(Institution.id).where(Institution.name == name))
        if pk is None:
            raise RegistryError(
                f"no institution {name!r}; add it with `pocketpacs institutions add {name}`"
            )
        return pk

    # nodes ----------------------------------------------------------------------------

    def add_node(self, ae_title: str, host: str, port: int, institution: str) -> NodeInfo:
        ae_title = _ae_title(ae_title)
        if not 1 <= port <= 65535:
            raise RegistryError("a port is 1 to 65535")
        if not host or len(host) > 255:
            raise RegistryError("a host is a name or address of at most 255 characters")
        try:
            with self.index.session() as session, session.begin():
                session.add(
                    Node(
                        ae_title=ae_title,
                        host=host,
                        port=port,
                        institution_pk=self._institution_pk(session, institution),
                        created_at=datetime.now(UTC),
                    )
                )
        except IntegrityError as exc:
            raise RegistryError(f"a node with AE title {ae_title!r} exists already") from exc
        return NodeInfo(ae_title, host, port, institution)

    def remove_node(self, ae_title: str) -> bool:
        with self.index.session() as session, session.begin():
            node = session.scalar(select(Node).where(Node.ae_title == ae_title.strip()))
            if node is None:
                return False
            session.delete(node)
            return True

    def _nodes(self, ae_title: str | None = None) -> list[NodeInfo]:
        query = (
            select(Node.ae_title, Node.host, Node.port, Institution.name)
            .join(Institution, Node.institution_pk == Institution.id)
            .order_by(Node.ae_title)
        )
        if ae_title is not None:
            query = query.where(Node.ae_title == ae_title)
        with self.index.session() as session:
            return [NodeInfo(*row) for row in session.execute(query)]

    def nodes(self) -> list[NodeInfo]:
        return self._nodes()

    def node(self, ae_title: str) -> NodeInfo | None:
        found = self._nodes(ae_title.strip())
        return found[0] if found else None

    # keys -----------------------------------------------------------------------------

    def create_key(self, institution: str, scopes: tuple[str, ...], label: str = "") -> NewKey:
        scopes = parse_scopes(",".join(scopes))
        key_id = secrets.token_hex(6)
        secret = secrets.token_urlsafe(32)  # 256 random bits
        with self.index.session() as session, session.begin():
            session.add(
                ApiKey(
                    key_id=key_id,
                    secret_sha256=_sha256(secret),
                    institution_pk=self._institution_pk(session, institution),
                    scopes=",".join(scopes),
                    label=label,
                    created_at=datetime.now(UTC),
                )
            )
        return NewKey(key_id, f"{KEY_PREFIX}_{key_id}_{secret}", institution, scopes)

    def revoke_key(self, key_id: str) -> bool:
        with self.index.session() as session, session.begin():
            key = session.scalar(select(ApiKey).where(ApiKey.key_id == key_id))
            if key is None or key.revoked_at is not None:
                return False
            key.revoked_at = datetime.now(UTC)
            return True

    def keys(self, institution: str | None = None) -> list[KeyInfo]:
        query = (
            select(ApiKey, Institution.name)
            .join(Institution, ApiKey.institution_pk == Institution.id)
            .order_by(ApiKey.created_at)
        )
        if institution is not None:
            query = query.where(Institution.name == institution)
        with self.index.session() as session:
            return [
                KeyInfo(
                    key.key_id,
                    name,
                    tuple(key.scopes.split(",")),
                    key.label,
                    key.created_at,
                    key.revoked_at,
                )
                for key, name in session.execute(query)
            ]

    def authenticate(self, token: str, source: str = "") -> Caller | None:
        """The caller a bearer token stands for, or None for anything not a live key."""
        prefix, _, rest = token.partition("_")
        key_id, _, secret = rest.partition("_")
        if prefix != KEY_PREFIX or not key_id or not secret:
            return None
        with self.index.session() as session:
            found = session.execute(
                select(ApiKey, Institution.name)
                .join(Institution, ApiKey.institution_pk == Institution.id)
                .where(ApiKey.key_id == key_id)
            ).first()
        if found is None:
            return None
        key, institution = found
        if key.revoked_at is not None:
            return None
        if not hmac.compare_digest(key.secret_sha256, _sha256(secret)):
            return None
        return Caller(institution, key_id, frozenset(key.scopes.split(",")), source)
