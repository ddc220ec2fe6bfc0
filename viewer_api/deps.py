"""Typed dependencies, so a route names what it needs and a test overrides one provider."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, Request

from storage.index import Index
from storage.objects import ObjectStore
from storage.spool import Spool


@dataclass(frozen=True)
class Services:
    """The core objects the HTTP face works with, built once by the command line."""

    objects: ObjectStore
    index: Index
    spool: Spool | None = None


def get_services(request: Request) -> Services:
    return request.app.state.services


ServicesDep = Annotated[Services, Depends(get_services)]
