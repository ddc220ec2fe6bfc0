"""A lean acceptor for associations that only store, verify and find.

Why: pynetdicom's reactor reads a PDU 4 KiB at a time into a growing buffer and passes
every event between threads that poll with short sleeps. For a 0.5 MB CT slice that is
about 7 ms of CPU, which caps the whole process near 130 instances/s under the GIL; for a
C-FIND it is about 1 ms per response. An association that proposes nothing but Storage,
Verification and C-FIND needs a small part of PS3.8, so this module serves it on the socket
directly: pynetdicom still decodes the A-ASSOCIATE-RQ, negotiates the presentation
contexts and encodes the A-ASSOCIATE-AC; command sets and C-FIND responses are read and
written by `pacs.commands`; each data set streams from the socket into a Part 10 file of
the spool's pool (``files/``) as it arrives, never held whole in memory, whatever the PDU
size; C-FIND runs the same `pacs.find.find` as pynetdicom's handler.

Every association passes this module's gate first: a calling AE title the node registry
does not know is rejected here. Anything else it does not serve (retrieval, role
selection, user identity, extended negotiation, a wrong called AE title) is left, unread,
to pynetdicom: the A-ASSOCIATE-RQ is only peeked at until this module decides.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import select
import socket
import struct
import threading
from collections.abc import Callable, Iterable
from io import BytesIO

from pydicom.uid import UID
from pynetdicom import PYNETDICOM_IMPLEMENTATION_UID, PYNETDICOM_IMPLEMENTATION_VERSION
from pynetdicom._globals import APPLICATION_CONTEXT_NAME
from pynetdicom.dsutils import decode
from pynetdicom.pdu import A_ASSOCIATE_AC, A_ASSOCIATE_RQ
from pynetdicom.pdu_primitives import (
    A_ASSOCIATE,
    ImplementationClassUIDNotification,
    ImplementationVersionNameNotification,
    MaximumLengthNotification,
    SCP_SCU_RoleSelectionNegotiation,
    SOPClassCommonExtendedNegotiation,
    SOPClassExtendedNegotiation,
    UserIdentityNegotiation,
)
from pynetdicom.presentation import PresentationContext, negotiate_as_acceptor

from pacs import commands, find
from pacs.handlers import AssociationTally, DicomContext
from pacs.statuses import ERROR_COMMENT_LENGTH, VerificationStatus
from storage.query import InvalidQuery
from storage.spool import IncomingFile

log = logging.getLogger("pocketpacs.dicom")

# PDU types (PS3.8 9.3) and the two PDUs this module sends as fixed bytes:
# A-RELEASE-RP (9.3.7), and A-ABORT from the service provider, reason not specified (9.3.8).
A_ASSOCIATE_RQ_TYPE = 0x01
P_DATA_TF_TYPE = 0x04
A_RELEASE_RQ_TYPE = 0x05
A_ABORT_TYPE = 0x07
RELEASE_RP = b"\x06\x00\x00\x00\x00\x04\x00\x00\x00\x00"
ABORT = b"\x07\x00\x00\x00\x00\x04\x00\x00\x02\x00"
# A-ASSOCIATE-RJ (9.3.4): transient, service provider (presentation), local limit exceeded;
# and permanent, service user, calling AE title not recognised.
REJECT_BUSY = b"\x03\x00\x00\x00\x00\x04\x00\x02\x03\x02"
REJECT_CALLING_AE = b"\x03\x00\x00\x00\x00\x04\x00\x01\x01\x03"
PDU_HEADER = struct.Struct(">BxL")
PDV_HEADER = struct.Struct(">LBB")

# PS3.7 C.4.2: the status for a failure of our own making.
PROCESSING_FAILURE = 0x0110

# A larger A-ASSOCIATE-RQ than this is left to pynetdicom (real ones are a few KiB).
LARGEST_REQUEST = 1024 * 1024
# A command set is a handful of elements; a bigger one is a broken or hostile peer.
LARGEST_COMMAND = 64 * 1024
# A C-FIND identifier is a few hundred bytes, but a list of UIDs can hold thousands.
LARGEST_IDENTIFIER = 1024 * 1024
RECEIVE_BUFFER = 256 * 1024
# C-FIND responses are sent in batches of about this many bytes.
SEND_BATCH = 64 * 1024
# At most this many chunks per writev (the kernel takes up to IOV_MAX, 1024 on Linux).
WRITE_BATCH = 512
# Seconds of silence after which an association is aborted (pynetdicom's default too).
NETWORK_TIMEOUT = 60.0

_REFERRED_ITEMS = (
    SCP_SCU_RoleSelectionNegotiation,
    UserIdentityNegotiation,
    SOPClassExtendedNegotiation,
    SOPClassCommonExtendedNegotiation,
)


class ProtocolError(Exception):
    """The peer broke PS3.7 or PS3.8: the association is aborted."""


class LeanAcceptor:
    """Takes the associations that only store, verify and find, and serves each on its
    socket."""

    def __init__(
        self,
        ae_title: str,
        supported_contexts: Iterable[PresentationContext],
        maximum_pdu_size: int,
        maximum_associations: int,
        context: DicomContext,
    ) -> None:
        self.ae_title = ae_title
        self.supported_contexts = list(supported_contexts)
        self.abstract_syntaxes = {cx.abstract_syntax for cx in self.supported_contexts}
        self.maximum_pdu_size = maximum_pdu_size
        self.context = context
        self._slots = threading.BoundedSemaphore(maximum_associations)

    def take(self, sock: socket.socket, address: tuple[str, int]) -> bool:
        """Gate every association, and serve it here if it only stores, verifies and finds.

        A caller the node registry does not know is rejected (calling AE title not
        recognised); what is not a readable A-ASSOCIATE-RQ is aborted. Returns False, with
        nothing read from the socket, when pynetdicom should serve the association.
        """
        timeout = sock.gettimeout()
        sock.settimeout(NETWORK_TIMEOUT)
        try:
            request = _peek_request(sock)
        except OSError:
            request = None
        if request is None:
            with contextlib.suppress(OSError):
                sock.sendall(ABORT)
            return True
        calling_ae = request.calling_ae_title.strip()
        institution = self.context.identify(calling_ae, address[0])
        if institution is None:
            _discard(sock, PDU_HEADER.size + _pdu_length(sock))
            sock.sendall(REJECT_CALLING_AE)
            self.context.refuse(calling_ae, address[0], "calling AE title not registered")
            return True
        if not self._slots.acquire(blocking=False):
            _discard(sock, PDU_HEADER.size + _pdu_length(sock))
            sock.sendall(REJECT_BUSY)
            self.context.refuse(calling_ae, address[0], "too many associations at once")
            return True
        handed_over = False
        try:
            accepted = self._negotiate(request)
            if accepted is None:  # pynetdicom's to serve; `closed` frees its slot
                sock.settimeout(timeout)
                handed_over = True
                return False
            _discard(sock, PDU_HEADER.size + _pdu_length(sock))
            sock.sendall(self._accept_pdu(request, accepted))
            contexts = {cx.context_id: cx for cx in accepted if cx.result == 0}
            tally = AssociationTally(calling_ae, address[0], institution)
            session = _Session(sock, contexts, request.maximum_length_received or 0, self, tally)
            try:
                session.run()
            finally:
                self.context.finish(tally)
        finally:
            if not handed_over:
                self._slots.release()
        return True

    def closed(self, event: object) -> None:
        """An association pynetdicom served has closed (EVT_CONN_CLOSE): its slot is free."""
        self._slots.release()

    def _negotiate(self, request: A_ASSOCIATE) -> list[PresentationContext] | None:
        """The presentation context results, or None if this is not an association to take."""
        if request.called_ae_title.strip() != self.ae_title:
            return None
        if request.application_context_name != APPLICATION_CONTEXT_NAME:
            return None
        if any(isinstance(item, _REFERRED_ITEMS) for item in request.user_information):
            return None
        proposed = request.presentation_context_definition_list
        if not proposed or any(cx.abstract_syntax not in self.abstract_syntaxes for cx in proposed):
            return None
        results, _ = negotiate_as_acceptor(proposed, self.supported_contexts)
        if not any(cx.result == 0 for cx in results):
            return None
        return results

    def _accept_pdu(self, request: A_ASSOCIATE, results: list[PresentationContext]) -> bytes:
        answer = A_ASSOCIATE()
        answer.application_context_name = UID(APPLICATION_CONTEXT_NAME)
        answer.calling_ae_title = request.calling_ae_title
        answer.called_ae_title = request.called_ae_title
        answer.result = 0x00
        answer.result_source = 0x01
        answer.presentation_context_definition_results_list = results
        maximum_length = MaximumLengthNotification()
        maximum_length.maximum_length_received = self.maximum_pdu_size
        class_uid = ImplementationClassUIDNotification()
        class_uid.implementation_class_uid = PYNETDICOM_IMPLEMENTATION_UID
        version = ImplementationVersionNameNotification()
        version.implementation_version_name = PYNETDICOM_IMPLEMENTATION_VERSION
        answer.user_information = [maximum_length, class_uid, version]
        pdu = A_ASSOCIATE_AC()
        pdu.from_primitive(answer)
        return pdu.encode()


def _pdu_length(sock: socket.socket) -> int:
    header = sock.recv(PDU_HEADER.size, socket.MSG_PEEK | socket.MSG_WAITALL)
    if len(header) < PDU_HEADER.size:
        raise ConnectionError("connection closed before a whole PDU header")
    return PDU_HEADER.unpack(header)[1]


def _peek_request(sock: socket.socket) -> A_ASSOCIATE | None:
    """The A-ASSOCIATE-RQ waiting on `sock`, left in the socket for whoever serves it."""
    length = _pdu_length(sock)
    if length > LARGEST_REQUEST:
        return None
    raw = sock.recv(PDU_HEADER.size + length, socket.MSG_PEEK | socket.MSG_WAITALL)
    if len(raw) < PDU_HEADER.size + length or raw[0] != A_ASSOCIATE_RQ_TYPE:
        return None
    pdu = A_ASSOCIATE_RQ()
    try:
        pdu.decode(raw)
        return pdu.to_primitive()
    except Exception:  # pynetdicom's decoders raise anything; pynetdicom then answers it
        return None


def _discard(sock: socket.socket, size: int) -> None:
    while size:
        chunk = sock.recv(min(size, RECEIVE_BUFFER))
        if not chunk:
            raise ConnectionError("connection closed")
        size -= len(chunk)


class _Receiver:
    """The socket, read 256 KiB at a time.

    Why: every recv and every write releases and retakes the GIL, and with several
    associations in one process that hand-off (a futex wake per call) costs more than
    the copying. Read PDU by PDU, a 0.5 MB data set in 16 KiB PDUs is about 100 recv calls
    and 30 writes; read in large chunks and written with one writev per chunk, it is a
    handful of each.
    """

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buffer = bytearray(RECEIVE_BUFFER)
        self.view = memoryview(self.buffer)
        self.start = 0
        self.end = 0
        self.before_refill: Callable[[], None] = lambda: None

    @property
    def available(self) -> int:
        return self.end - self.start

    def _refill(self, needed: int) -> None:
        """Read until `needed` bytes are buffered; views handed out before are invalid after."""
        self.before_refill()
        kept = self.end - self.start
        if kept:
            self.buffer[:kept] = bytes(self.view[self.start : self.end])
        self.start, self.end = 0, kept
        while self.end < needed:
            count = self.sock.recv_into(self.view[self.end :])
            if count == 0:
                raise ConnectionError("peer closed the connection")
            self.end += count

    def read(self, size: int) -> bytes:
        """Exactly `size` bytes (a header or a command fragment, never a data set)."""
        if size > len(self.buffer):
            raise ProtocolError(f"a {size}-byte header or command fragment is too long")
        if self.available < size:
            self._refill(size)
        data = bytes(self.view[self.start : self.start + size])
        self.start += size
        return data

    def take(self, size: int) -> memoryview:
        """Up to `size` bytes (at least one), valid until the next refill."""
        if not self.available:
            self._refill(1)
        count = min(size, self.available)
        chunk = self.view[self.start : self.start + count]
        self.start += count
        return chunk


@functools.cache
def _encoding(transfer_syntax: str) -> tuple[bool, bool, bool]:
    """(implicit VR, little endian, deflated) of a transfer syntax."""
    syntax = UID(transfer_syntax)
    return syntax.is_implicit_VR, syntax.is_little_endian, syntax.is_deflated


class _Session:
    """One accepted association: P-DATA in, DIMSE answers out, until release or abort."""

    def __init__(
        self,
        sock: socket.socket,
        contexts: dict[int, PresentationContext],
        peer_maximum_pdu: int,
        acceptor: LeanAcceptor,
        tally: AssociationTally,
    ) -> None:
        self.sock = sock
        self.contexts = contexts
        self.peer_maximum_pdu = peer_maximum_pdu
        self.acceptor = acceptor
        self.tally = tally
        self.receiver = _Receiver(sock)
        self.receiver.before_refill = self._write_received
        self.received: list[memoryview] = []
        self.command = bytearray()
        self.store: _IncomingDataSet | _IncomingIdentifier | None = None
        self.finding = False  # answering a C-FIND: only a C-CANCEL may come in
        self.cancelled: set[int] = set()  # Message IDs a C-CANCEL-RQ named

    def run(self) -> None:
        try:
            while True:
                pdu_type, length = PDU_HEADER.unpack(self.receiver.read(PDU_HEADER.size))
                if pdu_type == P_DATA_TF_TYPE:
                    self._p_data(length)
                elif pdu_type == A_RELEASE_RQ_TYPE:
                    self._skip(length)
                    self.sock.sendall(RELEASE_RP)
                    return
                elif pdu_type == A_ABORT_TYPE:
                    return
                else:
                    raise ProtocolError(f"unexpected PDU type 0x{pdu_type:02X}")
        except (ProtocolError, TimeoutError) as exc:
            self.tally.last_failure = f"association aborted: {exc or 'timed out'}"
            with contextlib.suppress(OSError):
                self.sock.sendall(ABORT)
        except OSError as exc:
            self.tally.last_failure = f"connection lost: {exc}"
        finally:
            if self.store is not None:
                self.store.discard()

    def _skip(self, size: int) -> None:
        while size:
            size -= len(self.receiver.take(size))

    def _p_data(self, remaining: int) -> None:
        """Walk the PDVs of one P-DATA-TF (PS3.8 9.3.5), streaming data fragments to disk."""
        while remaining:
            if remaining < PDV_HEADER.size:
                raise ProtocolError("P-DATA-TF ends inside a PDV header")
            item_length, context_id, control = PDV_HEADER.unpack(
                self.receiver.read(PDV_HEADER.size)
            )
            if item_length < 2 or item_length + 4 > remaining:
                raise ProtocolError("PDV length does not fit its P-DATA-TF")
            remaining -= item_length + 4
            if context_id not in self.contexts:
                raise ProtocolError(f"PDV on presentation context {context_id}, not accepted")
            size = item_length - 2
            last = bool(control & 0x02)
            if control & 0x01:
                self._command_fragment(context_id, size, last)
            else:
                self._data_fragment(context_id, size, last)

    def _command_fragment(self, context_id: int, size: int, last: bool) -> None:
        if self.store is not None:
            raise ProtocolError("command fragment while a data set was being received")
        if len(self.command) + size > LARGEST_COMMAND:
            raise ProtocolError("command set too large")
        self.command += self.receiver.read(size)
        if not last:
            return
        try:
            command = commands.decode_command(bytes(self.command))
        except commands.MalformedCommand as exc:
            raise ProtocolError(f"undecodable command set: {exc}") from exc
        finally:
            self.command.clear()
        if self.finding and command.command_field != commands.C_CANCEL_RQ:
            raise ProtocolError("a request arrived while a C-FIND was being answered")
        abstract_syntax = self.contexts[context_id].abstract_syntax
        transfer_syntax = self.contexts[context_id].transfer_syntax[0]
        if command.command_field == commands.C_CANCEL_RQ:
            self.cancelled.add(command.message_id)  # PS3.7 9.3.2.3: ignored if none is running
        elif command.command_field == commands.C_ECHO_RQ and not command.has_data_set:
            answer = commands.encode_response(
                commands.C_ECHO_RSP,
                command.message_id,
                self.contexts[context_id].abstract_syntax,
                VerificationStatus.SUCCESS,
            )
            self._answer(context_id, answer)
        elif command.command_field == commands.C_STORE_RQ and command.has_data_set:
            self.store = _IncomingDataSet(command, context_id, transfer_syntax, self.acceptor)
        elif (
            command.command_field == commands.C_FIND_RQ
            and command.has_data_set
            and abstract_syntax in find.FIND_MODELS
        ):
            self.store = _IncomingIdentifier(command, context_id, transfer_syntax)
        else:
            raise ProtocolError(f"DIMSE command 0x{command.command_field:04X} is not served here")

    def _data_fragment(self, context_id: int, size: int, last: bool) -> None:
        store = self.store
        if store is None or store.context_id != context_id:
            raise ProtocolError("data fragment without a C-STORE request on its context")
        while size:
            chunk = self.receiver.take(size)
            self.received.append(chunk)
            size -= len(chunk)
            if len(self.received) >= WRITE_BATCH:
                self._write_received()
        if last:
            self._write_received()
            self.store = None
            if isinstance(store, _IncomingIdentifier):
                self._find(store)
            else:
                self._finish(store)

    def _write_received(self) -> None:
        """Write what the buffer holds of the data set being received, in one call."""
        if self.received:
            if self.store is not None:
                self.store.write_many(self.received)
            self.received.clear()

    def _finish(self, store: _IncomingDataSet) -> None:
        if not store.failure:
            try:
                store.close()
            except OSError as exc:
                store.failure = f"cannot write the received data: {exc.strerror or exc}"
        request = store.command
        try:
            status, comment = self.acceptor.context.store(
                self.tally,
                store.path,
                request.affected_sop_class_uid,
                request.affected_sop_instance_uid,
                str(self.contexts[store.context_id].abstract_syntax),
                not_received=store.failure,
            )
        except Exception:
            log.exception("storing %s failed", request.affected_sop_instance_uid)
            status, comment = PROCESSING_FAILURE, "internal error, see the archive's log"
        finally:
            store.discard()
        answer = commands.encode_response(
            commands.C_STORE_RSP,
            request.message_id,
            request.affected_sop_class_uid,
            status,
            request.affected_sop_instance_uid,
            comment,
        )
        self._answer(store.context_id, answer)

    def _find(self, request: _IncomingIdentifier) -> None:
        """Answer a C-FIND-RQ (PS3.7 9.1.2): pending responses, polling for a C-CANCEL
        between them, then the final status. Responses go out in batches of about 64 KiB."""
        command = request.command
        encoding = _encoding(request.transfer_syntax)
        context_id = request.context_id
        sop_class = command.affected_sop_class_uid
        context = self.acceptor.context
        status, comment = find.SUCCESS, ""
        out = bytearray()
        responses = None
        self.cancelled.clear()
        self.finding = True
        try:
            data = bytes(request.data)
            responses = find.find(
                context,
                self.tally,
                lambda: self._requested(data, encoding),
                sop_class,
                lambda: self._cancel_requested(command.message_id),
            )
            for status, payload in responses:
                if status != find.PENDING or not isinstance(payload, list):
                    comment = payload if isinstance(payload, str) else ""
                    break
                data = commands.encode_identifier(payload, *encoding)
                pending = commands.encode_response(
                    commands.C_FIND_RSP, command.message_id, sop_class, status, has_data_set=True
                )
                out += self._pdus(context_id, pending, data)
                if len(out) >= SEND_BATCH:
                    self.sock.sendall(out)
                    out.clear()
        except (ProtocolError, OSError):
            raise
        except Exception:
            log.exception("C-FIND from %s failed", self.tally.calling_ae)
            status, comment = find.UNABLE_TO_PROCESS, "internal error, see the archive's log"
        finally:
            self.finding = False
        final = commands.encode_response(
            commands.C_FIND_RSP,
            command.message_id,
            sop_class,
            status,
            error_comment=comment[:ERROR_COMMENT_LENGTH],
        )
        out += self._pdus(context_id, final)
        try:
            self.sock.sendall(out)
        finally:
            if responses is not None:
                responses.close()  # writes the audit row, now that the answer is out

    @staticmethod
    def _requested(data: bytes, encoding: tuple[bool, bool, bool]) -> list[commands.Element]:
        """A C-FIND identifier's keys: read directly when it is flat ASCII text in a Little
        Endian syntax, else by pydicom."""
        implicit, little_endian, deflated = encoding
        if little_endian and not deflated:
            keys = commands.decode_identifier(data, implicit)
            if keys is not None:
                return keys
        try:
            return find.requested(decode(BytesIO(data), *encoding))
        except InvalidQuery:
            raise
        except Exception as exc:
            raise InvalidQuery(f"the identifier cannot be decoded: {exc}") from exc

    def _cancel_requested(self, message_id: int) -> bool:
        """Read what the peer sent meanwhile (a C-CANCEL-RQ, if anything) without waiting."""
        while self.receiver.available or select.select([self.sock], [], [], 0)[0]:
            pdu_type, length = PDU_HEADER.unpack(self.receiver.read(PDU_HEADER.size))
            if pdu_type == A_ABORT_TYPE:
                raise ConnectionError("the peer aborted during a C-FIND")
            if pdu_type != P_DATA_TF_TYPE:
                raise ProtocolError(f"PDU type 0x{pdu_type:02X} while a C-FIND was answered")
            self._p_data(length)
        return message_id in self.cancelled

    def _pdus(self, context_id: int, command: bytes, data: bytes = b"") -> bytes:
        """A command set, and its data set if any, as P-DATA-TF PDUs no larger than the peer
        accepts (PS3.8 9.3.5)."""
        largest = self.peer_maximum_pdu - PDV_HEADER.size if self.peer_maximum_pdu else 0
        out = bytearray()
        for value, is_command in ((command, True), (data, False)):
            step = largest if largest > 0 else max(len(value), 1)
            for start in range(0, len(value), step):
                fragment = value[start : start + step]
                control = (0x01 if is_command else 0x00) | (
                    0x02 if start + step >= len(value) else 0x00
                )
                out += PDU_HEADER.pack(P_DATA_TF_TYPE, PDV_HEADER.size + len(fragment))
                out += PDV_HEADER.pack(len(fragment) + 2, context_id, control) + fragment
        return bytes(out)

    def _answer(self, context_id: int, command: bytes) -> None:
        self.sock.sendall(self._pdus(context_id, command))


class _IncomingIdentifier:
    """A C-FIND request's identifier, kept in memory: a few hundred bytes, and bounded."""

    def __init__(self, command: commands.Command, context_id: int, transfer_syntax: str) -> None:
        self.command = command
        self.context_id = context_id
        self.transfer_syntax = transfer_syntax
        self.data = bytearray()

    def write_many(self, chunks: list[memoryview]) -> None:
        for chunk in chunks:
            self.data += chunk
        if len(self.data) > LARGEST_IDENTIFIER:
            raise ProtocolError("C-FIND identifier too large")

    def discard(self) -> None:
        self.data.clear()


class _IncomingDataSet(IncomingFile):
    """A data set being received: a Part 10 file of the spool's pool (``files/``),
    laid out as pynetdicom's chunked receive writes it (preamble, file meta, data set)."""

    def __init__(
        self,
        command: commands.Command,
        context_id: int,
        transfer_syntax: str,
        acceptor: LeanAcceptor,
    ) -> None:
        super().__init__(acceptor.context.spool.files)
        self.command = command
        self.context_id = context_id
        # Why the data set could not be written (a full disk): the rest of it is read and
        # dropped, the C-STORE answered 0xA700, and the association goes on.
        self.failure = ""
        self.write(
            commands.encode_file_meta(
                command.affected_sop_class_uid,
                command.affected_sop_instance_uid,
                transfer_syntax,
                PYNETDICOM_IMPLEMENTATION_UID,
                PYNETDICOM_IMPLEMENTATION_VERSION,
            )
        )

    def write(self, data: bytes | memoryview) -> None:
        if not self.failure:
            try:
                super().write(data)
            except OSError as exc:
                self.failure = f"cannot write the received data: {exc.strerror or exc}"

    def write_many(self, chunks: list[memoryview]) -> None:
        if not self.failure:
            try:
                super().write_many(chunks)
            except OSError as exc:
                self.failure = f"cannot write the received data: {exc.strerror or exc}"
