"""Logging as every pocketpacs process sets it up (the command line, the HTTP process)."""

from __future__ import annotations

import logging


def configure_logging(level: int) -> None:
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # pynetdicom logs every PDU at INFO; our handlers log one line per association.
    logging.getLogger("pynetdicom").setLevel(logging.WARNING)
    # Alembic reports every check of the schema at INFO; migrations that run still show.
    logging.getLogger("alembic.runtime.migration").setLevel(logging.WARNING)
