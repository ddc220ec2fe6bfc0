"""The DICOM listener: Verification and Storage SCP for every storage SOP class and
transfer syntax pynetdicom knows, data sets received straight to disk (chunked)."""

from __future__ import annotations

import copy
import logging
import socket
import socketserver
import ssl
import tempfile
import threading

from pydicom import uid
from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, _config, dimse_messages, evt
from pynetdicom.presentation import PresentationContext
from pynetdicom.sop_class import (
    _STORAGE_CLASSES,
    PatientRootQueryRetrieveInformationModelGet,
    PatientRootQueryRetrieveInformationModelMove,
    StudyRootQueryRetrieveInformationModelGet,
    StudyRootQueryRetrieveInformationModelMove,
    Verification,
)
from pynetdicom.transport import ThreadedAssociationServer

from pacs.find import FIND_MODELS
from pacs.handlers import DicomContext, Identify, ReceivedFile, bindings
from pacs.lean_acceptor import LeanAcceptor
from storage.audit import AuditLog
from storage.index import Index
from storage.registry import Registry
from storage.spool import Spool

log = logging.getLogger("pocketpacs.dicom")

MAXIMUM_ASSOCIATIONS = 64
# A TLS client has this long to finish its handshake.
HANDSHAKE_TIMEOUT = 30
RETRIEVE_MODELS = (
    PatientRootQueryRetrieveInformationModelMove,
    StudyRootQueryRetrieveInformationModelMove,
    PatientRootQueryRetrieveInformationModelGet,
    StudyRootQueryRetrieveInformationModelGet,
)
# Associations served by pynetdicom (those that mix storage with other services): not
# "unlimited" (0), since a peer told 0 may send a whole data set as one PDU (pynetdicom's
# SCU does) and pynetdicom reads a PDU into memory whole. 4 MiB bounds that and is still
# 32 times DCMTK's largest PDU.
MAXIMUM_PDU_SIZE = 4 * 1024 * 1024
# The lean acceptor streams every PDV to disk as it arrives, so it can take any PDU size.
UNLIMITED_PDU_SIZE = 0


# Lossless encapsulated syntaxes: a sender offering one of these holds its data that way.
_LOSSLESS = [
    uid.JPEGLosslessSV1,
    uid.JPEGLossless,
    uid.JPEGLSLossless,
    uid.JPEG2000Lossless,
    uid.HTJ2KLossless,
    uid.HTJ2KLosslessRPCL,
    uid.RLELossless,
]
_NATIVE = [
    uid.ExplicitVRLittleEndian,
    uid.DeflatedExplicitVRLittleEndian,
    uid.ImplicitVRLittleEndian,
    uid.ExplicitVRBigEndian,
]


def transfer_syntax_preference() -> list[str]:
    """The order in which the acceptor picks among the syntaxes a sender proposes.

    pynetdicom accepts the first syntax of *this* list that the sender offers, so the order
    decides what is stored. Senders hardly ever compress on the fly, so a compressed syntax
    on offer usually means the sender holds its data that way: lossless compression comes
    first (its bytes are kept), then the native encodings (Explicit VR first), and lossy and
    video syntaxes last, so a sender that could compress lossily on the fly is never asked
    to while it offers anything lossless.
    """
    head = [*_LOSSLESS, *_NATIVE]
    tail = [ts for ts in ALL_TRANSFER_SYNTAXES if ts not in head]
    return [str(ts) for ts in (*head, *tail)]


class _SharedUIDContext(PresentationContext):
    """A supported context whose deep copy shares its (immutable) UIDs.

    pynetdicom deep-copies every supported context for each association it serves: 176 SOP
    classes with 45 transfer syntaxes each, re-validating every UID, took 50 ms per
    association (py-spy). Copying the list and sharing the UIDs is the same thing, fast.
    """

    @classmethod
    def of(cls, context: PresentationContext) -> _SharedUIDContext:
        shared = copy.copy(context)
        shared.__class__ = cls
        return shared

    def __deepcopy__(self, memo: dict) -> _SharedUIDContext:
        clone = copy.copy(self)
        clone._transfer_syntax = list(self._transfer_syntax)
        return clone


class _Server(ThreadedAssociationServer):
    """pynetdicom's threaded server without its forced garbage collection.

    Why: pynetdicom runs a full `gc.collect()` every 60 turns of its accept loop; on an
    archive holding its caches that took about 0.7 s, every thread of the process stopped,
    and under load it was a fifth of the interpreter's time (py-spy). Python's own
    collector still runs."""

    def service_actions(self) -> None:
        """Nothing to do between accepts."""


class _Listener(_Server):
    """pynetdicom's threaded server, with store, verify and find associations taken by the lean
    `LeanAcceptor` and TCP_NODELAY on every connection (else each response waits
    ~40 ms for a delayed ACK)."""

    def __init__(self, *args, acceptor: LeanAcceptor, **kwargs) -> None:
        self.acceptor = acceptor
        super().__init__(*args, **kwargs)

    def get_request(self) -> tuple[socket.socket, tuple[str, int]]:
        sock, address = super().get_request()
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return sock, address

    def process_request_thread(self, request: socket.socket, client_address) -> None:
        try:
            taken = self.acceptor.take(request, client_address)
        except Exception:
            self.handle_error(request, client_address)
            taken = True
        if taken:
            self.shutdown_request(request)
        else:
            super().process_request_thread(request, client_address)

    def shutdown(self) -> None:
        """Stop serving and close the socket (this server is not in the AE's own list)."""
        socketserver.BaseServer.shutdown(self)
        self.server_close()


class _TlsListener(_Server):
    """pynetdicom's threaded server for DICOM over TLS (PS3.15 B.1), every association served
    by pynetdicom. The handshake runs in the connection's own thread, so a slow or silent
    client cannot hold up the others; TCP_NODELAY as on the plain port."""

    def get_request(self) -> tuple[socket.socket, tuple[str, int]]:
        sock, address = self.socket.accept()
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        assert self.ssl_context is not None
        wrapped = self.ssl_context.wrap_socket(
            sock, server_side=True, do_handshake_on_connect=False
        )
        return wrapped, address

    def process_request_thread(self, request: socket.socket, client_address) -> None:
        try:
            request.settimeout(HANDSHAKE_TIMEOUT)
            request.do_handshake()  # type: ignore[attr-defined]
            request.settimeout(None)
        except (OSError, ssl.SSLError) as exc:
            log.warning("TLS handshake with %s failed: %s", client_address[0], exc)
            self.shutdown_request(request)
            return
        super().process_request_thread(request, client_address)

    def shutdown(self) -> None:
        socketserver.BaseServer.shutdown(self)
        self.server_close()


class DicomServer:
    """One AE title on one port, storing through the ingest spool."""

    def __init__(
        self,
        ae_title: str,
        host: str,
        port: int,
        spool: Spool,
        identify: Identify,
        audit: AuditLog | None = None,
        index: Index | None = None,
        registry: Registry | None = None,
        regional_issuer: str = "",
        maximum_associations: int = MAXIMUM_ASSOCIATIONS,
        tls_port: int | None = None,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        self.ae_title = ae_title
        self.maximum_associations = maximum_associations
        self.tls_port = tls_port
        self.ssl_context = ssl_context
        self._tls_server: _TlsListener | None = None
        self.host = host
        self.port = port
        self.context = DicomContext(
            spool=spool,
            identify=identify,
            audit=audit,
            index=index,
            registry=registry,
            ae_title=ae_title,
            regional_issuer=regional_issuer,
        )
        self._server: _Listener | None = None

    def _application_entity(self) -> AE:
        ae = AE(ae_title=self.ae_title)
        ae.maximum_pdu_size = MAXIMUM_PDU_SIZE
        ae.maximum_associations = self.maximum_associations
        ae.require_called_aet = True
        syntaxes = transfer_syntax_preference()
        ae.add_supported_context(Verification, syntaxes)
        for model in FIND_MODELS + RETRIEVE_MODELS:
            ae.add_supported_context(model, _NATIVE)
        for sop_class in _STORAGE_CLASSES.values():
            # Both roles: a C-GET requestor asks to act as the storage SCP (PS3.7 D.3.3.4).
            ae.add_supported_context(sop_class, syntaxes, scu_role=True, scp_role=True)
        return ae

    def start(self) -> None:
        """Listen in background threads; received data is written under the spool."""
        # Data sets are written to a temporary file as they arrive, never held whole in
        # memory, and that file must be on the spool's filesystem so it can be linked
        # into the spool without a copy.
        _config.STORE_RECV_CHUNKED_DATASET = True
        # A write that fails there (a full disk) is then answered 0xA700, not an abort.
        dimse_messages.NamedTemporaryFile = ReceivedFile  # type: ignore[assignment]
        # pynetdicom's own handlers format a log record for every PDU and DIMSE message;
        # we log one line per association instead (pacs.handlers), so skip that work.
        _config.LOG_HANDLER_LEVEL = "none"
        tempfile.tempdir = str(self.context.spool.incoming)
        ae = self._application_entity()
        # The lean acceptor takes associations that propose storage, verification and
        # C-FIND only; retrieval goes to pynetdicom.
        acceptor = LeanAcceptor(
            self.ae_title,
            [cx for cx in ae.supported_contexts if cx.abstract_syntax not in RETRIEVE_MODELS],
            UNLIMITED_PDU_SIZE,
            self.maximum_associations,
            self.context,
        )
        self._server = ae.make_server(
            (self.host, self.port),
            contexts=[_SharedUIDContext.of(cx) for cx in ae.supported_contexts],
            # The acceptor counts pynetdicom's associations too: one limit for all.
            evt_handlers=[*bindings(self.context), (evt.EVT_CONN_CLOSE, acceptor.closed)],
            server_class=_Listener,
            acceptor=acceptor,
        )
        self.port = self._server.server_address[1]
        threading.Thread(
            target=self._server.serve_forever, name="dicom-listener", daemon=True
        ).start()
        log.info("DICOM listener %s on %s:%d", self.ae_title, self.host, self.port)
        if self.ssl_context is not None and self.tls_port is not None:
            self._tls_server = ae.make_server(
                (self.host, self.tls_port),
                contexts=[_SharedUIDContext.of(cx) for cx in ae.supported_contexts],
                evt_handlers=bindings(self.context),
                server_class=_TlsListener,
                ssl_context=self.ssl_context,
            )
            self.tls_port = self._tls_server.server_address[1]
            threading.Thread(
                target=self._tls_server.serve_forever, name="dicom-tls-listener", daemon=True
            ).start()
            log.info("DICOM TLS listener %s on %s:%d", self.ae_title, self.host, self.tls_port)

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server = None
        if self._tls_server is not None:
            self._tls_server.shutdown()
            self._tls_server = None
