"""Put the archive together from settings: object store (embedded or external), index,
ingest pipeline, and for `serve` the spool, the DICOM listener and the HTTP server."""

from __future__ import annotations

import logging
import signal
import ssl
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from pacs.handlers import Identify
from pacs.server import DicomServer
from pocketpacs.http_process import HttpProcess, S3Access, listening_socket
from pocketpacs.settings import Settings
from storage.audit import AuditLog
from storage.embedded_s3 import EmbeddedS3
from storage.index import Index
from storage.ingest import IngestPipeline
from storage.local_copies import LocalCopies
from storage.objects import ObjectStore, ObjectStoreUnavailable
from storage.registry import DEFAULT_INSTITUTION, Registry
from storage.spool import Spool

log = logging.getLogger("pocketpacs")


@dataclass
class Core:
    objects: ObjectStore
    index: Index
    pipeline: IngestPipeline
    s3: S3Access  # for another process on the same bucket


def _wait_for_bucket(objects: ObjectStore, timeout: float = 30.0) -> None:
    """A freshly started S3 server may refuse requests for a moment after its banner."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            objects.ensure_bucket()
            return
        except ObjectStoreUnavailable:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.3)


@contextmanager
def open_index(settings: Settings) -> Iterator[Index]:
    """The migrated index alone, for commands that change only the registry or read audit."""
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    index = Index(settings.index_url)
    try:
        index.migrate()
        yield index
    finally:
        index.dispose()


def dicom_identify(registry: Registry, open_access: bool) -> Identify:
    """Calling AE title -> institution, from the node registry; unknown callers are refused
    unless the archive runs `--open`."""

    def identify(calling_ae: str, _address: str) -> str | None:
        node = registry.node(calling_ae)
        if node is not None:
            return node.institution
        return DEFAULT_INSTITUTION if open_access else None

    return identify


@contextmanager
def open_core(settings: Settings, local_copies: LocalCopies | None = None) -> Iterator[Core]:
    """Object store and index ready to use; the embedded S3 server runs while inside.
    `local_copies`: where the pipeline keeps a copy of what it stores (`serve` only: one
    process accounts for that directory)."""
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    embedded = EmbeddedS3(settings.data_dir) if settings.embedded_s3 else None
    index: Index | None = None
    pipeline: IngestPipeline | None = None
    try:
        if embedded is not None:
            endpoint = embedded.start()
            embedded.supervise()
            access_key, secret_key = (
                embedded.credentials.access_key,
                embedded.credentials.secret_key,
            )
            secure = False
        else:
            endpoint = settings.s3_endpoint or ""
            access_key, secret_key = settings.s3_access_key or "", settings.s3_secret_key or ""
            secure = settings.s3_secure
        s3 = S3Access(endpoint, access_key, secret_key, settings.s3_bucket, secure)
        objects = s3.store()
        _wait_for_bucket(objects)
        index = Index(settings.index_url)
        index.migrate()
        pipeline = IngestPipeline(
            objects, index, upload_workers=settings.ingest_workers, local_copies=local_copies
        )
        yield Core(objects=objects, index=index, pipeline=pipeline, s3=s3)
    finally:
        if pipeline is not None:
            pipeline.close()
        if index is not None:
            index.dispose()
        if embedded is not None:
            embedded.stop()


def _terminate_as_interrupt(signum: int, _frame) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def dicom_tls_context(settings: Settings) -> ssl.SSLContext | None:
    """The DICOM TLS listener's context (PS3.15 B.1, TLS 1.2 or newer): the archive's
    certificate, and, with a client CA, a certificate required of every caller."""
    if not (settings.tls_cert and settings.tls_key and settings.dicom_tls_port):
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(settings.tls_cert, settings.tls_key)
    if settings.tls_client_ca:
        context.verify_mode = ssl.CERT_REQUIRED
        context.load_verify_locations(settings.tls_client_ca)
    return context


def serve(settings: Settings) -> None:
    """Run everything until Ctrl-C or SIGTERM, then stop cleanly, embedded S3 included:
    the DICOM side here, the HTTP server in a process of its own (`http_process`)."""
    signal.signal(signal.SIGTERM, _terminate_as_interrupt)
    sock = listening_socket(settings)  # taken now, or the archive does not start
    copies = LocalCopies(settings.data_dir / "copies", settings.local_copies_mb * 1024 * 1024)
    with sock, open_core(settings, copies) as core:
        spool = Spool(
            settings.data_dir / "spool",
            core.pipeline,
            limit_bytes=settings.spool_limit_mb * 1024 * 1024,
            defer_seconds=settings.spool_defer_seconds,
        )
        # The HTTP side hears of every instance stored here (replayed ones too): its
        # thumbnail worker makes their series' thumbnails.
        http = HttpProcess(settings, core.s3, spool, sock)
        core.pipeline.listeners.append(http.stored)
        replayed = spool.replay()
        if replayed:
            log.info("stored %d instances left in the spool by the previous run", replayed)
        spool.start()
        registry = Registry(core.index)
        dicom = DicomServer(
            settings.ae_title,
            settings.host,
            settings.dicom_port,
            spool,
            identify=dicom_identify(registry, settings.open),
            audit=AuditLog(core.index),
            index=core.index,
            registry=registry,
            regional_issuer=settings.regional_issuer,
            maximum_associations=settings.max_associations,
            tls_port=settings.dicom_tls_port,
            ssl_context=dicom_tls_context(settings),
        )
        dicom.start()
        http.start()
        sock.close()  # the HTTP process's now: once it is gone, callers are refused at once
        log.info(
            "pocketpacs ready: DICOM %s@%s:%d%s, HTTP %s://%s:%d, data in %s",
            settings.ae_title,
            settings.host,
            dicom.port,
            f" (TLS on {dicom.tls_port})" if dicom.tls_port else "",
            "https" if settings.tls_cert else "http",
            settings.host,
            settings.http_port,
            settings.data_dir.resolve(),
        )
        try:
            code = http.wait()
            log.error("the HTTP process exited (%s): stopping the archive", code)
            failed = True
        except KeyboardInterrupt:
            failed = False
        finally:
            log.info("stopping: the HTTP server, the DICOM listener, then draining the spool")
            http.stop()
            dicom.stop()
            spool.close()
        if failed:
            raise SystemExit(1)
