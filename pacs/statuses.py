"""Named DIMSE statuses the handlers return (PS3.7 C; PS3.4 A.4 Verification).

Storage statuses come with each `storage.ingest.StoreOutcome`, so C-STORE and STOW-RS
report one instance the same way; this table holds the rest.
"""

from __future__ import annotations

import enum


class VerificationStatus(enum.IntEnum):
    SUCCESS = 0x0000


# PS3.7 C.5.1 Error Comment is LO: at most 64 characters.
ERROR_COMMENT_LENGTH = 64
