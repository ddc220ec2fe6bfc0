"""The HTTP server in a process of its own, beside the archive process that receives DICOM.

Why: a Python process runs one thread at a time (the GIL). With the DICOM side and the
HTTP side in one process, 20 modalities pushing took most of it, and a phone opening a
pocket film link waited its turn: 1.3 to 1.8 s to the first thumbnail at the 95th
percentile, on a machine with a core to spare (bench/RESULTS-load.md). Two processes use
both cores, and each side's latency stops depending on the other's load.

The two share what two archive processes on one bucket share already: the bucket, the
index and the data directory. The HTTP process has its own ingest pipeline and spool for
STOW-RS (`data_dir/spool-stow`), its own local copies (`data_dir/copies-http`, from
STOW-RS and from renderings; it reads the archive process's `copies` too), renditions and
thumbnail worker, audit queue and share view counts. Over two pipes from the archive process come
- every instance its pipeline stores (its listener events, batched), so the thumbnail
  worker and the renditions here know of them as of their own;
- on request, its spool's state and its metrics, for /healthz and /metrics.

The archive process binds the HTTP port and hands the socket over, so the port is taken
(or refused) before anything starts. It stops when the HTTP process dies; the HTTP process
stops when the archive process is gone (its pipe closes), kill -9 included.
"""

from __future__ import annotations

import gc
import itertools
import logging
import multiprocessing
import os
import signal
import socket
import threading
from collections import deque
from dataclasses import dataclass
from multiprocessing.connection import Connection

import uvicorn
from prometheus_client import generate_latest

from pocketpacs.logs import configure_logging
from pocketpacs.settings import Settings
from storage.audit import AuditLog
from storage.index import Index
from storage.ingest import IngestPipeline, StoreResult
from storage.local_copies import LocalCopies
from storage.objects import ObjectStore
from storage.registry import Registry
from storage.renditions import Renditions, ThumbnailWorker
from storage.shares import Shares
from storage.spool import Spool
from viewer_api.app import create_app, served
from viewer_api.deps import Services

log = logging.getLogger("pocketpacs")

# Stored-instance events waiting for the HTTP process; beyond this many (it is stuck), new
# ones are dropped: they only spare a bucket read and make thumbnails ahead of time.
EVENTS_WAITING_AT_MOST = 20_000
EVENTS_PER_MESSAGE = 500
# How long /healthz and /metrics wait for the archive process to answer.
ANSWER_SECONDS = 5.0
# After its archive process is gone, the HTTP process finishes the requests it has (uvicorn
# gives them 10 s) and writes what it holds, for this long at most, then exits regardless.
ORPHAN_GRACE_SECONDS = 20.0


@dataclass(frozen=True)
class S3Access:
    """Where the bucket is and the keys to it, for a process that did not start it."""

    endpoint: str
    access_key: str
    secret_key: str
    bucket: str
    secure: bool

    def store(self) -> ObjectStore:
        return ObjectStore(
            self.endpoint, self.access_key, self.secret_key, self.bucket, self.secure
        )


def listening_socket(settings: Settings) -> socket.socket:
    """The HTTP port, bound and listening (OSError when it is taken)."""
    family = socket.AF_INET6 if ":" in settings.host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((settings.host, settings.http_port))
    sock.listen(2048)
    return sock


class HttpProcess:
    """The HTTP server's process, from the archive process's side: started with the
    bound socket, told of every stored instance (`stored`, a pipeline listener), asked
    for the spool's state and the metrics."""

    def __init__(self, settings: Settings, s3: S3Access, spool: Spool, sock: socket.socket):
        self.spool = spool
        context = multiprocessing.get_context("spawn")  # threads run here: no fork
        events_in, self._events_out = context.Pipe(duplex=False)
        self._control, control_there = context.Pipe()
        self.process = context.Process(
            target=run,
            args=(settings, s3, sock, events_in, control_there, logging.getLogger().level),
            name="pocketpacs-http",
        )
        self._ends_there = (events_in, control_there)
        self._waiting: deque[StoreResult] = deque()
        self._wake = threading.Condition()
        self._closed = False

    def start(self) -> None:
        self.process.start()
        for end in self._ends_there:
            end.close()  # the child's now: its end closing must be seen as EOF here
        threading.Thread(target=self._send_events, name="http-events", daemon=True).start()
        threading.Thread(target=self._answer, name="http-control", daemon=True).start()

    def stored(self, result: StoreResult) -> None:
        """An instance stored on this side (pipeline listener): queued for the HTTP side."""
        if not result.outcome.ok or result.header is None:
            return
        with self._wake:
            if self._closed or len(self._waiting) >= EVENTS_WAITING_AT_MOST:
                return
            self._waiting.append(result)
            if len(self._waiting) == 1:
                self._wake.notify()

    def wait(self) -> int | None:
        """Until the HTTP process exits; its exit code."""
        self.process.join()
        return self.process.exitcode

    def stop(self, timeout: float = 30.0) -> None:
        """Ask the HTTP process to finish (SIGTERM: uvicorn's graceful shutdown), kill it
        if it has not after `timeout`."""
        with self._wake:
            self._closed = True
            self._wake.notify()
        if self.process.is_alive():
            self.process.terminate()
            self.process.join(timeout)
        if self.process.is_alive():
            log.error("the HTTP process did not stop in %.0f s: killed", timeout)
            self.process.kill()
            self.process.join()
        self._events_out.close()
        self._control.close()

    def _send_events(self) -> None:
        while True:
            with self._wake:
                while not self._waiting and not self._closed:
                    self._wake.wait()
                if self._closed:
                    return
                count = min(len(self._waiting), EVENTS_PER_MESSAGE)
                batch = [self._waiting.popleft() for _ in range(count)]
            try:
                self._events_out.send(batch)
            except (OSError, ValueError):  # the HTTP process is gone
                return

    def _answer(self) -> None:
        """Answer the HTTP process's questions, one at a time, each tagged with its number."""
        while True:
            try:
                number, question = self._control.recv()
            except (EOFError, OSError):
                return
            answer: object = None
            try:
                if question == "spool":
                    answer = self.spool.health()
                elif question == "metrics":
                    answer = generate_latest().decode()
            except Exception:
                log.exception("no answer to the HTTP process's question %r", question)
            try:
                self._control.send((number, answer))
            except (OSError, ValueError):
                return


class _DicomSide:
    """The archive process, as the HTTP side's `Services.dicom_side` sees it."""

    def __init__(self, control: Connection) -> None:
        self._control = control
        self._lock = threading.Lock()
        self._numbers = itertools.count()

    def spool_health(self) -> dict:
        return self._ask("spool")

    def metrics(self) -> str:
        return self._ask("metrics")

    def _ask(self, question: str):
        """OSError when the archive process does not answer in time or is gone."""
        if not self._lock.acquire(timeout=ANSWER_SECONDS):  # another question is stuck
            raise OSError(f"the archive process did not answer in {ANSWER_SECONDS:.0f} s")
        try:
            number = next(self._numbers)
            self._control.send((number, question))
            while self._control.poll(ANSWER_SECONDS):
                answered, answer = self._control.recv()
                if answered == number:  # an older, late answer is dropped
                    if answer is None:
                        raise OSError(f"the archive process could not answer {question!r}")
                    return answer
        except (EOFError, ValueError) as exc:
            raise OSError(f"the archive process is gone: {exc}") from exc
        finally:
            self._lock.release()
        raise OSError(f"the archive process did not answer in {ANSWER_SECONDS:.0f} s")


def run(
    settings: Settings,
    s3: S3Access,
    sock: socket.socket,
    events: Connection,
    control: Connection,
    log_level: int,
) -> None:
    """The HTTP process: serve `sock` until SIGTERM or until the archive process is gone."""
    # uvicorn, once it has finished on SIGTERM, raises the signal again for the handler it
    # found: this one, so that the clean-up below runs (the default handler would end the
    # process on the spot, the last audit events and share views unwritten).
    signal.signal(signal.SIGTERM, _interrupt)
    configure_logging(log_level)
    objects = s3.store()
    index = Index(settings.index_url)
    copies = LocalCopies(
        settings.data_dir / "copies-http",
        settings.local_copies_mb * 1024 * 1024,
        others=[settings.data_dir / "copies"],  # the archive process's, from C-STORE
    )
    pipeline = IngestPipeline(
        objects, index, upload_workers=settings.ingest_workers, local_copies=copies
    )
    spool = Spool(
        settings.data_dir / "spool-stow",
        pipeline,
        limit_bytes=settings.spool_limit_mb * 1024 * 1024,
        defer_seconds=settings.spool_defer_seconds,
    )
    renditions = Renditions(objects, local_copies=copies, index=index)
    thumbnails = ThumbnailWorker(index, renditions)
    pipeline.listeners += [renditions.stored, thumbnails]
    thumbnails.start()
    audit = AuditLog(index)
    shares = Shares(index)
    try:
        replayed = spool.replay()
        if replayed:
            log.info("stored %d STOW-RS instances left in the spool by the previous run", replayed)
        spool.start()
        app = create_app(
            Services(
                objects=objects,
                index=index,
                spool=spool,
                registry=Registry(index),
                audit=audit,
                renditions=renditions,
                shares=shares,
                open_access=settings.open,
                regional_issuer=settings.regional_issuer,
                public_url=settings.base_url,
                dicom_side=_DicomSide(control),
            )
        )
        server = uvicorn.Server(
            uvicorn.Config(
                served(app),
                log_config=None,
                access_log=False,
                timeout_graceful_shutdown=10,
                ssl_certfile=str(settings.tls_cert) if settings.tls_cert else None,
                ssl_keyfile=str(settings.tls_key) if settings.tls_key else None,
            )
        )
        threading.Thread(
            target=_receive_events,
            args=(events, pipeline.listeners, server),
            name="events",
            daemon=True,
        ).start()
        # What start made (modules, the application, SQLAlchemy's and pydicom's tables)
        # lives as long as the process: frozen, the cyclic collector no longer walks it in
        # its collections between requests (a cold MR rendering 0.81 to 0.71 of Orthanc's
        # time, four alternated runs).
        gc.collect()
        gc.freeze()
        server.run(sockets=[sock])
    except KeyboardInterrupt:
        pass  # SIGTERM or Ctrl-C: stop as asked
    finally:
        # What a crash would lose first (the last accesses, the last views), then the rest.
        audit.close()
        shares.close()
        spool.close()
        thumbnails.stop()
        renditions.close()
        pipeline.close()
        index.dispose()


def _interrupt(signum: int, _frame) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def _receive_events(events: Connection, listeners: list, server: uvicorn.Server) -> None:
    """Hand the archive process's stored instances to this process's pipeline listeners,
    as if stored here; when its pipe closes (it stopped or was killed), stop serving."""
    while True:
        try:
            batch = events.recv()
        except (EOFError, OSError):
            break
        for result in batch:
            for listener in listeners:
                try:
                    listener(result)
                except Exception:
                    log.exception("listener failed on a stored instance")
    log.warning("the archive process is gone: the HTTP server stops")
    server.should_exit = True
    timer = threading.Timer(ORPHAN_GRACE_SECONDS, os._exit, args=(1,))
    timer.daemon = True
    timer.start()
