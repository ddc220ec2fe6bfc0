"""Answers a route gave a moment ago, given again to the same caller from memory.

Why: a viewer scrolling a series back and forth asks for the same rendered images again
and again, and answering one through FastAPI costs about 1 ms of routing, dependencies, a
thread hop and two index round trips, three times what serving the bytes costs
(`bench/RESULTS-render.md`). A route that may (the rendered images) calls `remember` with its
answer; for `SECONDS` after, a request from the same caller (the same `Authorization`
header) for the same URL and `Accept` is answered here, before FastAPI: with the same
headers, a 304 when the client holds the image, and an audit event as the route writes.

What it trades: for those seconds, the access decision is the one the route made. A key
revoked, or a study's visibility changed, takes effect after them at most.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from dataclasses import dataclass, replace
from datetime import UTC, datetime

from prometheus_client import Counter

from storage.audit import AuditEntry, AuditLog

SECONDS = 5.0
HOLDING_AT_MOST = 4096
HOLDING_BYTES = 64 * 1024 * 1024

ANSWERED = Counter(
    "pocketpacs_answered_from_memory_total",
    "HTTP answers given again from memory, before routing (viewer_api.recent_answers)",
)

_Key = tuple[bytes, str, bytes, bytes]  # Authorization, path, query string, Accept


@dataclass(frozen=True)
class _Answer:
    body: bytes
    headers: list[tuple[bytes, bytes]]  # Content-Type and the route's own headers
    etag: str
    audit: AuditEntry  # what the route recorded; each answer records it again, now
    until: float

    def audit_now(self, scope) -> AuditEntry:
        """The route's audit event, for this request: its time and address."""
        client = scope.get("client")
        return replace(self.audit, source=client[0] if client else "", at=datetime.now(UTC))


def _headers_of(scope) -> tuple[bytes, bytes, bytes]:
    authorization = accept = held = b""
    for name, value in scope["headers"]:
        if name == b"authorization":
            authorization = value
        elif name == b"accept":
            accept = value
        elif name == b"if-none-match":
            held = value
    return authorization, accept, held


class RecentAnswers:
    """The answers routes `remember` (see the module docstring); `AnswerFromMemory` serves
    them. Used from the event loop only: no lock."""

    def __init__(self, audit: AuditLog | None = None) -> None:
        self.audit = audit
        self._answers: OrderedDict[_Key, _Answer] = OrderedDict()
        self._bytes = 0

    def find(self, scope) -> tuple[_Answer, bytes] | None:
        """The answer held for this request, audited now, and its If-None-Match."""
        if not self._answers or scope["method"] != "GET":
            return None
        authorization, accept, held = _headers_of(scope)
        answer = self._answers.get((authorization, scope["path"], scope["query_string"], accept))
        if answer is None or answer.until <= time.monotonic():
            return None
        if self.audit is not None and not self.audit.record_soon(answer.audit_now(scope)):
            return None  # the audit trail is backed up: the route answers, and waits
        return answer, held

    def remember(
        self,
        request,
        audit: AuditEntry,
        body: bytes,
        media_type: str,
        etag: str,
        headers: dict[str, str],
    ) -> None:
        """Hold a 200 answer of `request`, which the route audited as `audit`, for
        `SECONDS`."""
        scope = request.scope
        authorization, accept, _ = _headers_of(scope)
        key = (authorization, scope["path"], scope["query_string"], accept)
        listed = [(b"content-type", media_type.encode())]
        listed += [(name.lower().encode(), value.encode()) for name, value in headers.items()]
        now = time.monotonic()
        previous = self._answers.pop(key, None)
        if previous is not None:
            self._bytes -= len(previous.body)
        self._answers[key] = _Answer(body, listed, etag, audit, now + SECONDS)
        self._bytes += len(body)
        while self._answers and (
            len(self._answers) > HOLDING_AT_MOST
            or self._bytes > HOLDING_BYTES
            or next(iter(self._answers.values())).until <= now
        ):
            _, dropped = self._answers.popitem(last=False)
            self._bytes -= len(dropped.body)


class AnswerFromMemory:
    """ASGI middleware: a request `answers` holds an answer for gets it at once."""

    def __init__(self, app, answers: RecentAnswers) -> None:
        self.app = app
        self.answers = answers

    async def __call__(self, scope, receive, send) -> None:
        found = self.answers.find(scope) if scope["type"] == "http" else None
        if found is None:
            await self.app(scope, receive, send)
            return
        answer, held = found
        ANSWERED.inc()
        if held and answer.etag.encode() in held:
            headers = [h for h in answer.headers if h[0] != b"content-type"]
            await send({"type": "http.response.start", "status": 304, "headers": headers})
            await send({"type": "http.response.body", "body": b""})
            return
        headers = [*answer.headers, (b"content-length", str(len(answer.body)).encode())]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": answer.body})
