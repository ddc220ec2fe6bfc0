"""One validated settings object: command-line flags, then environment variables, then a TOML file.

The names follow SPEC section 2; every field has an environment variable
``POCKETPACS_<FIELD>`` and a TOML key of the same (lower-case) name.
"""

from __future__ import annotations

import ipaddress
import os
import tomllib
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

ENV_PREFIX = "POCKETPACS_"


class SettingsError(ValueError):
    """The configuration cannot be used; the message says which value and why."""


class Settings(BaseModel):
    """Everything `pocketpacs` reads from its environment, validated once."""

    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True)

    data_dir: Path = Path("pocketpacs-data")
    dicom_port: int = Field(11112, ge=1, le=65535)
    ae_title: str = "POCKETPACS"
    http_port: int = Field(8000, ge=1, le=65535)
    host: str = "127.0.0.1"
    database_url: str | None = None
    s3_endpoint: str | None = None
    s3_access_key: str | None = None
    s3_secret_key: str | None = None
    s3_bucket: str = "pocketpacs"
    s3_secure: bool = False
    public_url: str | None = None
    ingest_workers: int = Field(8, ge=1, le=64)
    # DICOM associations served at once, every kind together; the next caller is
    # rejected at once (A-ASSOCIATE-RJ, transient, local limit exceeded).
    max_associations: int = Field(64, ge=1, le=1000)
    # TLS (PEM files): with a certificate and key, HTTP is HTTPS only, and the DICOM TLS
    # listener runs on dicom_tls_port (conventionally 2762) beside the plain one. With a
    # client CA, DICOM TLS callers must present a certificate it signed (mutual TLS).
    tls_cert: Path | None = None
    tls_key: Path | None = None
    tls_client_ca: Path | None = None
    dicom_tls_port: int | None = Field(None, ge=1, le=65535)
    spool_limit_mb: int = Field(20_000, ge=1)
    spool_defer_seconds: float = Field(30.0, ge=0, le=3600)
    # Copies of recently stored and read originals kept on local disk (data_dir/copies) for
    # rendering; 0 keeps none. The bucket stays the only place an original is kept.
    local_copies_mb: int = Field(2_000, ge=0)
    # Issuer of the region's patient identifier: a PatientID with this issuer recognises
    # a patient across institutions without the issuer in the request.
    regional_issuer: str = ""
    open: bool = False

    @field_validator("data_dir")
    @classmethod
    def _data_dir(cls, value: Path) -> Path:
        # Absolute, so every process on this directory (serve, import, check, started from
        # anywhere) recognises the same embedded S3 server and spool.
        return value.expanduser().resolve()

    @field_validator("ae_title")
    @classmethod
    def _ae_title(cls, value: str) -> str:
        value = value.strip()
        if not 1 <= len(value) <= 16 or "\\" in value or not value.isprintable():
            raise ValueError("an AE title is 1 to 16 printable characters without backslash")
        return value

    @field_validator("host")
    @classmethod
    def _host(cls, value: str) -> str:
        try:
            ipaddress.ip_address(value)
        except ValueError as exc:
            raise ValueError(f"{value!r} is not an IP address to bind") from exc
        return value

    @property
    def is_loopback(self) -> bool:
        return ipaddress.ip_address(self.host).is_loopback

    @property
    def embedded_s3(self) -> bool:
        """No S3 endpoint configured: pocketpacs runs its own SeaweedFS."""
        return not self.s3_endpoint

    @property
    def index_url(self) -> str:
        """The SQLAlchemy URL of the index; SQLite in the data directory by default."""
        if self.database_url:
            return self.database_url
        return f"sqlite:///{(self.data_dir / 'index.sqlite3').resolve()}"

    @property
    def base_url(self) -> str:
        """Where share links and QR codes point: the public URL, else this server."""
        scheme = "https" if self.tls_cert else "http"
        return (self.public_url or f"{scheme}://{self.host}:{self.http_port}").rstrip("/")

    def check_secure(self) -> None:
        """Refuse the development-only shortcuts outside loopback (SPEC 6)."""
        if self.open and not self.is_loopback:
            raise SettingsError("--open accepts anyone; it is refused unless bound to loopback")
        if bool(self.tls_cert) != bool(self.tls_key):
            raise SettingsError("POCKETPACS_TLS_CERT and POCKETPACS_TLS_KEY go together")
        for name in ("tls_cert", "tls_key", "tls_client_ca"):
            path = getattr(self, name)
            if path is not None and not Path(path).is_file():
                raise SettingsError(f"POCKETPACS_{name.upper()}: no such file {path}")
        if self.dicom_tls_port and not self.tls_cert:
            raise SettingsError("POCKETPACS_DICOM_TLS_PORT needs POCKETPACS_TLS_CERT and _KEY")
        if self.s3_endpoint and not (self.s3_access_key and self.s3_secret_key):
            raise SettingsError(
                "POCKETPACS_S3_ENDPOINT is set: POCKETPACS_S3_ACCESS_KEY and "
                "POCKETPACS_S3_SECRET_KEY must be set too"
            )


def _from_env(environ: dict[str, str]) -> dict[str, Any]:
    values: dict[str, Any] = {}
    for name in Settings.model_fields:
        raw = environ.get(ENV_PREFIX + name.upper())
        if raw is not None and raw != "":
            values[name] = raw
    return values


def _from_toml(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as handle:
            data = tomllib.load(handle)
    except OSError as exc:
        raise SettingsError(f"cannot read the configuration file {path}: {exc.strerror}") from exc
    except tomllib.TOMLDecodeError as exc:
        raise SettingsError(f"{path} is not valid TOML: {exc}") from exc
    unknown = sorted(set(data) - set(Settings.model_fields))
    if unknown:
        raise SettingsError(f"{path}: unknown setting(s) {', '.join(unknown)}")
    return data


def load_settings(
    flags: dict[str, Any] | None = None,
    config_file: Path | None = None,
    environ: dict[str, str] | None = None,
) -> Settings:
    """Merge flags over environment over file, and validate the result."""
    merged: dict[str, Any] = {}
    if config_file is not None:
        merged.update(_from_toml(config_file))
    merged.update(_from_env(dict(os.environ) if environ is None else environ))
    merged.update({k: v for k, v in (flags or {}).items() if v is not None})
    try:
        settings = Settings(**merged)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc'])}: {err['msg']}" for err in exc.errors()
        )
        raise SettingsError(f"invalid configuration: {problems}") from exc
    settings.check_secure()
    return settings
