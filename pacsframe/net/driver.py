"""A thin blocking driver: the sans-I/O association over a TCP (or TLS) socket.

Everything runs in the calling thread: no reactor thread, no queue. The socket
is read only when the state machine says it needs data, with a timeout that is
what is left of the current wait, so every wait is bounded:

- ``connect_timeout`` for the TCP connection (and the TLS handshake);
- ``acse_timeout`` for the A-ASSOCIATE answer and the A-RELEASE answer (the
  role of PS3.8's ARTIM timer on the requestor side);
- ``dimse_timeout`` for each DIMSE message awaited, and for each fragment of
  an object a C-GET streams to its writer (so a large object may take longer
  than one ``dimse_timeout`` in all, but never stalls longer than one).

Failures are :class:`~pacsframe.errors.AssociationError` with the same
``reason`` values as :class:`pacsframe.PACS` uses: ``refused``, ``timeout``,
``rejected``, ``aborted`` (a :class:`~pacsframe.errors.ProtocolError` when the
peer broke the protocol; we then send an A-ABORT), ``tls``.

Examples
--------
>>> import tempfile
>>> from pacsframe.demo import DemoPACS
>>> from pacsframe.net import driver
>>> with tempfile.TemporaryDirectory() as folder, DemoPACS(folder) as server:
...     seconds = driver.echo("127.0.0.1", server.port, called_ae=server.ae_title)
>>> seconds > 0
True
"""

from __future__ import annotations

import contextlib
import os
import select
import socket
import ssl
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from types import TracebackType
from typing import BinaryIO, NoReturn

from pacsframe.errors import (
    AssociationError,
    DimseError,
    MoveDestinationUnknown,
    NotSupported,
    ProtocolError,
)
from pacsframe.net import dimse, pdu
from pacsframe.net.association import (
    DEFAULT_MAX_PDU,
    NEED_DATA,
    AbortReceived,
    AssociateAccepted,
    AssociateRejected,
    Association,
    CommandReceived,
    ConnectionClosed,
    DataFragments,
    DatasetReceived,
    Event,
    PDataFragment,
    Released,
    ReleaseRequested,
    describe_abort,
    describe_rejection,
)
from pacsframe.net.operations import (
    CANNOT_UNDERSTAND,
    FINAL_OK,
    OUT_OF_RESOURCES,
    PENDING,
    ObjectWriter,
    Part10,
    RetrieveResponse,
    StoreRequest,
    StoreWriterFactory,
    read_part10,
)

__all__ = [
    "CANCEL_GRACE",
    "IMPLEMENTATION_CLASS_UID",
    "IMPLEMENTATION_VERSION_NAME",
    "BlockingAssociation",
    "ClientAssociation",
    "LimitReached",
    "associate",
    "echo",
]

#: pacsframe's implementation class UID: a UUID-derived UID (PS3.5 B.2) from
#: uuid5(NAMESPACE_URL, "https://pypi.org/project/pacsframe/"), so it is ours
#: alone and stable across versions.
IMPLEMENTATION_CLASS_UID = "2.25.33399042836207972551070547619202340788"
IMPLEMENTATION_VERSION_NAME = "PACSFRAME_01"

VERIFICATION = "1.2.840.10008.1.1"
IMPLICIT_VR_LITTLE_ENDIAN = "1.2.840.10008.1.2"
EXPLICIT_VR_LITTLE_ENDIAN = "1.2.840.10008.1.2.1"

#: The pending statuses of a C-FIND-RSP: a match follows.
FIND_PENDING = (0xFF00, 0xFF01)

#: Bytes asked of the kernel per recv: a whole default-sized PDU in one call.
_RECV_SIZE = DEFAULT_MAX_PDU + 6

#: Seconds a peer gets to end an operation after the C-CANCEL we send when an
#: association's ``limit`` passes, before we abort.
CANCEL_GRACE = 2.0

#: At most this many seconds pass, in any wait, before a blocked read notices
#: :meth:`BlockingAssociation.interrupt` from another thread.
_INTERRUPT_POLL = 0.1


class LimitReached(AssociationError):
    """An association's ``limit`` (a call's overall ``timeout=``) passed.

    Attributes
    ----------
    action : str
        What was done about the operation in flight: ``"cancelled"`` (a
        C-CANCEL, and the peer ended the operation within :data:`CANCEL_GRACE`;
        the association can be used again), ``"aborted"`` (an A-ABORT), or
        ``"none"`` (no operation was in flight).
    """

    def __init__(self, message: str, action: str) -> None:
        super().__init__(message, reason="timeout")
        self.action = action


class Interrupted(LimitReached):
    """The operation was stopped by :meth:`BlockingAssociation.interrupt`, not by time.

    ``action`` says what was done, as for :class:`LimitReached`; ``reason`` is
    ``"aborted"``. A call's deadline does not count it as its own.
    """

    def __init__(self, message: str, action: str) -> None:
        super().__init__(message, action)
        self.reason = "aborted"


#: Outgoing P-DATA-TF bytes gathered into one write: few system calls per
#: object, and a bounded copy whatever the object's size.
_SEND_BATCH = 1 << 20


class BlockingAssociation:
    """An established association over a blocking socket: what both sides share.

    Sending with bounded writes, waiting for events within ``dimse_timeout``,
    protocol failures answered with an A-ABORT, and receiving one C-STORE's
    data set fragment by fragment into an
    :class:`~pacsframe.net.operations.ObjectWriter`. :class:`ClientAssociation`
    (the requestor) and the storage SCP's associations
    (:mod:`~pacsframe.net.server`, the acceptor) build on it, so a C-GET
    sub-operation and a C-STORE to our SCP are received by the same code.

    Attributes
    ----------
    where : str
        ``host:port`` of the peer, for messages.
    acse_timeout, dimse_timeout : float
        Seconds: the A-RELEASE answer; each DIMSE message or fragment awaited.
    limit : float or None
        A :func:`time.monotonic` instant no wait outlasts: the end of a call's
        overall ``timeout=``. When it passes, a C-FIND, C-GET or C-MOVE in
        flight is cancelled (C-CANCEL, then an A-ABORT if the peer does not
        end it within :data:`CANCEL_GRACE`) and anything else is aborted; the
        operation raises :class:`LimitReached`. Everything happens in the
        calling thread.
    """

    def __init__(
        self,
        sock: socket.socket,
        machine: Association,
        *,
        where: str,
        acse_timeout: float,
        dimse_timeout: float,
    ) -> None:
        self._sock = sock
        self._machine = machine
        self.where = where
        self.acse_timeout = acse_timeout
        self.dimse_timeout = dimse_timeout
        self.limit: float | None = None
        self._store_response = dimse.StoreResponseTemplate()
        # Set from another thread by interrupt(): None, "cancel" or "abort".
        self._interrupt: str | None = None
        self._cancelling = False  # our C-CANCEL is out: only "abort" counts now
        # The last command set decoded, as bytes and decoded: a peer answering a
        # C-FIND sends the same pending C-FIND-RSP before every match.
        self._last_command: tuple[bytes, dimse.Command] = (b"", dimse.Command(0))

    def interrupt(self, *, abort: bool = False) -> None:
        """Stop the C-GET or C-MOVE in flight; safe to call from any thread.

        The thread running the operation does all the I/O: at the next message
        boundary it sends C-CANCEL and reads up to the final response (storing
        the objects that still arrive) for at most :data:`CANCEL_GRACE`, then
        aborts; with ``abort``, it aborts at its next read. A blocked read
        notices within a tenth of a second. The operation raises
        :class:`Interrupted`. Later operations on the association are
        interrupted too: it is meant for ending a call.
        """
        if abort or self._interrupt is None:
            self._interrupt = "abort" if abort else "cancel"

    def _interrupted(self, *, at_boundary: bool) -> bool:
        """Whether :meth:`interrupt` asks to stop the wait in progress now."""
        wanted = self._interrupt
        if wanted == "abort":
            return True
        return wanted == "cancel" and at_boundary and not self._cancelling

    def _check_interrupt(self, *, at_boundary: bool) -> None:
        """Raise :class:`Interrupted` when :meth:`interrupt` asked (abort: abort first)."""
        if not self._interrupted(at_boundary=at_boundary):
            return
        if self._interrupt == "abort":
            self.abort()
            raise Interrupted(
                f"the operation at {self.where} was stopped; the association was aborted",
                "aborted",
            )
        raise Interrupted(f"the operation at {self.where} was stopped", "none")

    def _send_bytes(self, data: bytes | bytearray) -> None:
        try:
            # The socket's timeout is whatever the last read left of its wait;
            # a send gets a whole dimse_timeout of its own.
            self._sock.settimeout(self.dimse_timeout)
            self._sock.sendall(data)
        except TimeoutError:
            self._fail_closed()
            raise AssociationError(
                f"timed out sending to {self.where}; the peer stopped reading",
                reason="timeout",
            ) from None
        except OSError as exc:
            self._fail_closed()
            raise AssociationError(
                f"the connection to {self.where} broke while sending: {exc}", reason="aborted"
            ) from None

    def _fail_closed(self) -> None:
        self._machine.abort()
        self._sock.close()

    def _protocol_failure(self, error: ProtocolError) -> None:
        with_abort(self._sock, self._machine, error)
        raise error

    def _wait(self, waiting_for: str, *, at_boundary: bool = False) -> Event:
        """The next event, within ``dimse_timeout``; a release request is an error.

        ``at_boundary``: between messages, where :meth:`interrupt` may cancel.
        """
        try:
            event = next_event(
                self._sock,
                self._machine,
                time.monotonic() + self.dimse_timeout,
                waiting_for,
                self.where,
                limit=self.limit,
                interrupted=lambda: self._interrupted(at_boundary=at_boundary),
            )
        except Interrupted:
            self._check_interrupt(at_boundary=at_boundary)  # an abort is done and raised
            raise
        if isinstance(event, ReleaseRequested):
            self._send_bytes(self._machine.send(pdu.ReleaseRP()))
            self._sock.close()
            raise AssociationError(
                f"the peer at {self.where} released the association while we waited "
                f"for {waiting_for}",
                reason="aborted",
            )
        return event

    def _next_command(self) -> tuple[int, dimse.Command]:
        self._check_interrupt(at_boundary=True)
        event = self._wait("a DIMSE message", at_boundary=True)
        if not isinstance(event, CommandReceived):
            self._protocol_failure(
                ProtocolError(
                    "the peer sent a data set without a command announcing it",
                    abort_reason=pdu.UNEXPECTED_PARAMETER,
                )
            )
        try:
            command = dimse.decode_command(event.data)
        except ProtocolError as exc:
            self._protocol_failure(exc)
        return event.context_id, command

    def _fragments(self, context_id: int, command: dimse.Command) -> Iterator[list[memoryview]]:
        """The data set ``command`` announced, as lists of fragments, as it arrives.

        Each list is what the buffer held (a :class:`DataFragments` event),
        or one fragment when the machine gave a :class:`PDataFragment`.
        """
        waiting_for = f"the data set of a {command.name}"
        # Bounded: each pass takes one or more fragments, each wait at most dimse_timeout.
        while True:
            event = self._wait(waiting_for)
            if type(event) is DataFragments:
                fragments = event.fragments
            elif isinstance(event, PDataFragment):
                fragments = [event.data]
            else:
                self._protocol_failure(
                    ProtocolError(
                        f"the peer sent a new command before the data set its "
                        f"{command.name} announced",
                        abort_reason=pdu.UNEXPECTED_PARAMETER,
                    )
                )
            if event.context_id != context_id:
                self._protocol_failure(
                    ProtocolError(
                        f"the peer sent the data set of its {command.name} on context "
                        f"{event.context_id}, not the command's context {context_id}",
                        abort_reason=pdu.UNEXPECTED_PARAMETER,
                    )
                )
            yield fragments
            if event.is_last:
                return

    def _fragments_or_abort(
        self, context_id: int, command: dimse.Command
    ) -> Iterator[list[memoryview]]:
        """:meth:`_fragments`; the limit passing mid-object aborts (the rest would follow)."""
        try:
            yield from self._fragments(context_id, command)
        except LimitReached as exc:
            if exc.action == "aborted":
                raise
            self.abort()
            raise LimitReached(str(exc), "aborted") from None

    def _serve_store(
        self, context_id: int, command: dimse.Command, on_store: StoreWriterFactory
    ) -> None:
        """One C-STORE: stream its data set to a writer, then answer with the template.

        A C-GET's sub-operation on the client, a C-STORE-RQ on our storage SCP.
        """
        if not command.has_dataset or command.message_id is None:
            self._protocol_failure(
                ProtocolError(
                    "the peer sent a C-STORE-RQ without a data set or a message ID",
                    abort_reason=pdu.INVALID_PARAMETER,
                )
            )
        sop_class = command.affected_sop_class_uid or ""
        sop_instance = command.affected_sop_instance_uid or ""
        request = StoreRequest(
            sop_class,
            sop_instance,
            self._machine.accepted_contexts[context_id],
            command.message_id,
        )
        status = 0x0000
        writer: ObjectWriter | None = None
        if not sop_class or not sop_instance:
            status = CANNOT_UNDERSTAND  # nothing to file the object under
        else:
            try:
                writer = on_store(request)
            except OSError:
                status = OUT_OF_RESOURCES
        complete = False
        try:
            for fragments in self._fragments_or_abort(context_id, command):
                if writer is None:
                    continue  # refused: read the rest of the object and drop it
                try:
                    write = writer.write
                    for fragment in fragments:
                        write(fragment)
                except OSError:
                    writer.discard()
                    writer, status = None, OUT_OF_RESOURCES
            complete = True
        finally:
            if writer is not None and not complete:
                # Cut short: the peer aborted, timed out or broke the protocol.
                writer.discard()
        if writer is not None:
            try:
                answer = writer.commit()
            except OSError:
                writer.discard()
                answer = OUT_OF_RESOURCES
            status = 0x0000 if answer is None else answer
        self._send_bytes(
            self._machine.send_message(
                context_id,
                self._store_response.encode(command.message_id, sop_class, sop_instance, status),
                None,
            )
        )

    @property
    def is_established(self) -> bool:
        """Whether the association is up: not released, aborted or closed."""
        return self._machine.state.name == "ESTABLISHED"

    def is_quiet(self) -> bool:
        """Whether an idle association still looks usable, without waiting.

        Established, and nothing to read: a peer that closed the connection
        (its idle timeout), aborted or asked to release while we were not
        reading leaves something there. Checked before a kept association is
        used again.
        """
        if not self.is_established:
            return False
        if isinstance(self._sock, ssl.SSLSocket) and self._sock.pending():
            return False
        try:
            readable, _, _ = select.select([self._sock], [], [], 0)
        except (OSError, ValueError):
            return False
        return not readable

    def abort(self) -> None:
        """A-ABORT (source: service user) and close, without waiting."""
        _send_and_close(self._sock, self._machine.abort())


class ClientAssociation(BlockingAssociation):
    """An established association, driven by blocking socket calls.

    Made by :func:`associate`. Use it as a context manager: leaving the block
    releases the association, or aborts it when the block raised.

    Attributes
    ----------
    accept : pdu.AssociateAC
        The peer's answer: accepted contexts, maximum length, implementation.
    contexts : dict of int to (str, str)
        Accepted context ID to (abstract syntax, transfer syntax).
    """

    def __init__(
        self,
        sock: socket.socket,
        machine: Association,
        accept: pdu.AssociateAC,
        proposed: dict[int, str],
        *,
        where: str,
        acse_timeout: float,
        dimse_timeout: float,
    ) -> None:
        super().__init__(
            sock, machine, where=where, acse_timeout=acse_timeout, dimse_timeout=dimse_timeout
        )
        self.accept = accept
        self.contexts = {cid: (proposed[cid], ts) for cid, ts in machine.accepted_contexts.items()}
        self._next_message_id = 1
        #: True while no operation is in flight as far as we know: set by every
        #: request sent, cleared when C-ECHO or C-FIND got its final response (or
        #: the peer ended a C-FIND we cancelled). An association that is idle
        #: after an error can be used again.
        self.idle = True

    # ------------------------------------------------------------------ plumbing

    def new_message_id(self) -> int:
        """A message ID not used before on this association (wraps at 65535)."""
        message_id = self._next_message_id
        self._next_message_id = message_id % 0xFFFF + 1
        return message_id

    def context_for(self, abstract_syntax: str, transfer_syntax: str | None = None) -> int:
        """The ID of an accepted context for ``abstract_syntax``.

        With ``transfer_syntax``, only a context accepted with that syntax
        counts. Raises :class:`~pacsframe.errors.NotSupported` when the peer
        accepted none.
        """
        for cid, (abstract, syntax) in self.contexts.items():
            if abstract == abstract_syntax and transfer_syntax in (None, syntax):
                return cid
        if transfer_syntax is None:
            raise NotSupported(
                f"the peer at {self.where} accepted no presentation context for {abstract_syntax}",
                status=0x0122,
            )
        raise NotSupported(
            f"the peer at {self.where} accepted no presentation context for {abstract_syntax} "
            f"in transfer syntax {transfer_syntax}; propose that pair when associating "
            "(objects are sent as stored, never transcoded)",
            status=0x0122,
        )

    # ---------------------------------------------------------------- messages

    def send(self, context_id: int, command: dimse.Command, dataset: bytes | None = None) -> None:
        """Send one DIMSE message, fragmented within the peer's maximum PDU."""
        if command.has_dataset != (dataset is not None):
            says = "follows" if command.has_dataset else "does not follow"
            given = "none" if dataset is None else "one"
            raise ValueError(f"{command.name} says a data set {says} but {given} was given")
        self.idle = False
        data = dimse.encode_command(command)
        # One sendall per message: with TCP_NODELAY each write is a segment,
        # and a small message in one write is one segment.
        self._send_bytes(self._machine.send_message(context_id, data, dataset))

    def receive(self, timeout: float | None = None) -> tuple[int, dimse.Command, bytes | None]:
        """Wait for one DIMSE message: (context ID, command, data set or None).

        ``timeout`` defaults to ``dimse_timeout``; it bounds the whole message.
        """
        deadline = time.monotonic() + (self.dimse_timeout if timeout is None else timeout)
        command: dimse.Command | None = None
        context_id = 0
        # Bounded: each pass consumes at least one event, and the deadline ends waits.
        while True:
            event = next_event(
                self._sock, self._machine, deadline, "a DIMSE message", self.where, self.limit
            )
            if isinstance(event, CommandReceived):
                if command is not None:
                    self._protocol_failure(
                        ProtocolError(
                            f"the peer sent a new command before the data set its "
                            f"{command.name} announced",
                            abort_reason=pdu.UNEXPECTED_PARAMETER,
                        )
                    )
                raw, command = self._last_command
                if event.data != raw:
                    try:
                        command = dimse.decode_command(event.data)
                    except ProtocolError as exc:
                        self._protocol_failure(exc)
                    self._last_command = (bytes(event.data), command)
                context_id = event.context_id
                if not command.has_dataset:
                    return context_id, command, None
            elif isinstance(event, DatasetReceived):
                if command is None or event.context_id != context_id:
                    self._protocol_failure(
                        ProtocolError(
                            "the peer sent a data set without a command announcing it",
                            abort_reason=pdu.UNEXPECTED_PARAMETER,
                        )
                    )
                return context_id, command, event.data
            elif isinstance(event, ReleaseRequested):
                self._send_bytes(self._machine.send(pdu.ReleaseRP()))
                self._sock.close()
                raise AssociationError(
                    f"the peer at {self.where} released the association while we waited "
                    "for a DIMSE message",
                    reason="aborted",
                )
            else:  # pragma: no cover - next_event turns the others into errors
                raise AssertionError(f"unexpected event {event!r}")

    # -------------------------------------------------------------- operations

    def echo(self) -> int:
        """C-ECHO; returns the status (0x0000 is success)."""
        cid = self.context_for(VERIFICATION)
        message_id = self.new_message_id()
        self.send(cid, dimse.c_echo_rq(message_id))
        _, rsp, _ = self._receive_or_abort()
        self._check_response(rsp, dimse.C_ECHO_RSP, message_id)
        assert rsp.status is not None
        self.idle = True
        return rsp.status

    def find(self, sop_class_uid: str, identifier: bytes, priority: int = 0) -> Iterator[bytes]:
        """C-FIND; yields the identifier bytes of each pending response.

        ``identifier`` is the query, encoded in the accepted context's transfer
        syntax; so is each identifier yielded. A failure status raises
        :class:`~pacsframe.errors.DimseError`; closing the generator early
        sends C-CANCEL and reads the responses up to the final one.
        """
        with contextlib.closing(self.find_responses(sop_class_uid, identifier, priority)) as rsps:
            for status, comment, data in rsps:
                if data is not None:
                    yield data
                elif status not in (0x0000, 0xFE00):
                    raise DimseError(
                        f"the peer at {self.where} answered C-FIND with status 0x{status:04X}"
                        + (f": {comment}" if comment else ""),
                        status=status,
                        comment=comment,
                    )

    def find_responses(
        self, sop_class_uid: str, identifier: bytes, priority: int = 0
    ) -> Iterator[tuple[int, str | None, bytes | None]]:
        """C-FIND; yields ``(status, error comment, identifier bytes)`` per response.

        Pending responses (0xFF00, 0xFF01) come with their identifier and no
        comment; the last item is the final response, whatever its status,
        with its Error Comment (or None) and no identifier: the caller judges
        it. Closing the generator before the final response sends C-CANCEL and
        reads the responses up to the final one. When the association's
        ``limit`` passes, the C-FIND is cancelled (or the association aborted)
        and :class:`LimitReached` is raised; after ``action="cancelled"`` the
        association is :attr:`idle` and can be used again.
        """
        cid = self.context_for(sop_class_uid)
        message_id = self.new_message_id()
        self.send(cid, dimse.c_find_rq(message_id, sop_class_uid, priority), identifier)
        receive = self.receive
        done = False
        try:
            # Bounded by the peer: each pass waits at most dimse_timeout.
            while True:
                try:
                    _, rsp, data = receive()
                except LimitReached:
                    done = True
                    self._cancel_at_limit(cid, message_id, dimse.C_FIND_RSP, None)
                if (
                    rsp.command_field != dimse.C_FIND_RSP
                    or rsp.message_id_being_responded_to != message_id
                    or rsp.status is None
                ):
                    self._check_response(rsp, dimse.C_FIND_RSP, message_id)
                status: int = rsp.status  # type: ignore[assignment]
                if status in FIND_PENDING:
                    if data is None:
                        self._protocol_failure(
                            ProtocolError(
                                "the peer sent a pending C-FIND-RSP without an identifier",
                                abort_reason=pdu.INVALID_PARAMETER,
                            )
                        )
                    yield status, None, data
                    continue
                done = True
                self.idle = True
                yield status, rsp.error_comment, None
                return
        except LimitReached as exc:
            if exc.action == "cancelled":
                self.idle = True
            raise
        finally:
            if not done and self._machine.state.name == "ESTABLISHED":
                self._cancel(cid, message_id, dimse.C_FIND_RSP)
                self.idle = True

    def _receive_or_abort(self) -> tuple[int, dimse.Command, bytes | None]:
        """:meth:`receive` for operations DIMSE cannot cancel: the limit aborts."""
        try:
            return self.receive()
        except LimitReached as exc:
            self.abort()
            raise LimitReached(f"{exc}; the association was aborted", "aborted") from None

    def _cancel_at_limit(
        self,
        cid: int,
        message_id: int,
        field: int,
        on_store: StoreWriterFactory | None,
        cause: LimitReached | None = None,
    ) -> NoReturn:
        """The limit passed (or :meth:`interrupt` asked) mid-operation: C-CANCEL, wait
        briefly for the end, else abort."""
        stopped = isinstance(cause, Interrupted)
        error = Interrupted if stopped else LimitReached
        why = "the operation was stopped" if stopped else "the time given ran out"
        self.limit = time.monotonic() + CANCEL_GRACE
        self._cancelling = True
        try:
            self._send_message(cid, dimse.c_cancel_rq(message_id), None)
            # Bounded: the grace ends every wait.
            while True:
                if field == dimse.C_FIND_RSP:
                    # C-FIND runs with whole data sets (see find), not fragments.
                    _, rsp, _ = self.receive()
                    self._check_response(rsp, field, message_id)
                else:
                    rsp, _ = self._retrieve_message(cid, message_id, field, on_store)
                if rsp.status not in PENDING:
                    break
        except AssociationError:
            # The grace passed, the limit had cut a message in two, or an abort
            # was asked for: end it.
            self.abort()
            raise error(
                f"{why} and the peer at {self.where} did not end the "
                f"{dimse.COMMAND_NAMES[field][:-4]} within {CANCEL_GRACE:g} s of our C-CANCEL; "
                "the association was aborted",
                "aborted",
            ) from None
        finally:
            self.limit = None
            self._cancelling = False
        raise error(
            f"{why}; the {dimse.COMMAND_NAMES[field][:-4]} at {self.where} "
            "was cancelled (C-CANCEL)",
            "cancelled",
        )

    def _cancel(self, cid: int, message_id: int, field: int) -> None:
        self.send(cid, dimse.c_cancel_rq(message_id))
        # Bounded: until the final response, each wait at most dimse_timeout.
        while True:
            _, rsp, _ = self.receive()
            self._check_response(rsp, field, message_id)
            if rsp.status not in (0xFF00, 0xFF01):
                return

    def _check_response(self, rsp: dimse.Command, field: int, message_id: int) -> None:
        if rsp.command_field != field or rsp.message_id_being_responded_to != message_id:
            self._protocol_failure(
                ProtocolError(
                    f"the peer answered message {message_id} with {rsp.name} for message "
                    f"{rsp.message_id_being_responded_to}; expected "
                    f"{dimse.COMMAND_NAMES[field]}",
                    abort_reason=pdu.UNEXPECTED_PARAMETER,
                )
            )
        if rsp.status is None:
            self._protocol_failure(
                ProtocolError(
                    f"the peer's {rsp.name} has no status", abort_reason=pdu.INVALID_PARAMETER
                )
            )

    # ------------------------------------------------------ store, get and move

    def _send_message(
        self, context_id: int, command: dimse.Command, dataset: bytes | memoryview | None
    ) -> None:
        """Send one DIMSE message in writes of at most about ``_SEND_BATCH`` bytes.

        Unlike :meth:`send`, the data set is never joined whole: a large object
        goes out as memoryview fragments, gathered per batch.
        """
        self.idle = False
        batch: list[bytes | memoryview] = []
        size = 0
        for piece in self._machine.iter_message(
            context_id, dimse.encode_command(command), dataset
        ):
            batch.append(piece)
            size += len(piece)
            if size >= _SEND_BATCH:
                self._send_bytes(b"".join(batch))
                batch, size = [], 0
        if batch:
            self._send_bytes(b"".join(batch))

    def store(
        self,
        source: bytes | bytearray | memoryview | str | os.PathLike[str] | BinaryIO,
        sop_class_uid: str | None = None,
        sop_instance_uid: str | None = None,
        transfer_syntax: str | None = None,
        *,
        priority: int = 0,
    ) -> int:
        """C-STORE one object; returns the peer's status (0x0000 is success).

        :meth:`store_response` with the same arguments gives the whole
        C-STORE-RSP (its error comment, offending element).

        Parameters
        ----------
        source : bytes, path or binary file
            Data set bytes (then the three UIDs are required), or a Part-10
            file: its data set after the file meta is sent as it is on disk,
            never decoded, and the UIDs default to its file meta's.
        sop_class_uid, sop_instance_uid, transfer_syntax : str, optional
            Affected SOP Class and Instance UIDs, and the data set's encoding.
        priority : int
            0 medium, 1 high, 2 low.

        Raises
        ------
        NotSupported
            No context was accepted for the SOP class in that transfer syntax.
        ValueError
            ``source`` is bytes without the UIDs, or not a Part-10 file.
        """
        status = self.store_response(
            source, sop_class_uid, sop_instance_uid, transfer_syntax, priority=priority
        ).status
        assert status is not None  # _check_response made sure
        return status

    def store_response(
        self,
        source: bytes | bytearray | memoryview | str | os.PathLike[str] | BinaryIO,
        sop_class_uid: str | None = None,
        sop_instance_uid: str | None = None,
        transfer_syntax: str | None = None,
        *,
        priority: int = 0,
    ) -> dimse.Command:
        """:meth:`store`, returning the peer's C-STORE-RSP command (it has a status)."""
        if isinstance(source, (bytes, bytearray, memoryview)):
            if not (sop_class_uid and sop_instance_uid and transfer_syntax):
                raise ValueError(
                    "storing data set bytes needs sop_class_uid, sop_instance_uid and "
                    "transfer_syntax; only a Part-10 file says them itself"
                )
            dataset: bytes | memoryview = memoryview(source)
        else:
            dataset, meta = _read_dataset(source)
            sop_class_uid = sop_class_uid or meta.sop_class_uid
            sop_instance_uid = sop_instance_uid or meta.sop_instance_uid
            transfer_syntax = transfer_syntax or meta.transfer_syntax
        cid = self.context_for(sop_class_uid, transfer_syntax)
        message_id = self.new_message_id()
        self._send_message(
            cid, dimse.c_store_rq(message_id, sop_class_uid, sop_instance_uid, priority), dataset
        )
        _, rsp, _ = self._receive_or_abort()
        self._check_response(rsp, dimse.C_STORE_RSP, message_id)
        return rsp

    def get(
        self,
        identifier: bytes,
        model_uid: str,
        on_store: StoreWriterFactory,
        *,
        priority: int = 0,
    ) -> Iterator[RetrieveResponse]:
        """C-GET; yields each C-GET-RSP, pending ones and the final one.

        The peer's C-STORE sub-operations arrive on this association (propose
        the storage contexts with SCP role selection:
        :func:`~pacsframe.net.operations.retrieve_negotiation`). For each,
        ``on_store`` gets a :class:`~pacsframe.net.operations.StoreRequest`
        and returns an :class:`~pacsframe.net.operations.ObjectWriter`; the
        data set reaches it fragment by fragment as the PDUs arrive, never
        reassembled. ``commit`` follows the last fragment and its status is
        the C-STORE-RSP's; an object cut short (abort, timeout, protocol
        error) is ``discard``-ed before the error is raised. An ``OSError``
        from ``on_store`` or the writer answers that object 0xA700 (out of
        resources) and the retrieve goes on.

        The C-GET-RQ goes out at the first ``next()``; an unknown model
        raises :class:`~pacsframe.errors.NotSupported` there. A final failure
        status raises :class:`~pacsframe.errors.DimseError` (the counts are in
        its message). Closing the generator early sends C-CANCEL and reads up to the final
        response, still storing the objects that arrive meanwhile; any other
        exception inside (a bug in the writer) aborts the association.
        Each wait, for a command or for the next fragment, is bounded by
        ``dimse_timeout``.
        """
        # A generator like find: nothing is sent until the first next(), so a
        # retrieve never iterated leaves no responses unread on the association.
        cid = self.context_for(model_uid)
        message_id = self.new_message_id()
        self._send_message(cid, dimse.c_get_rq(message_id, model_uid, priority), identifier)
        yield from self._retrieve(cid, message_id, dimse.C_GET_RSP, on_store)

    def move(
        self, identifier: bytes, model_uid: str, destination: str, *, priority: int = 0
    ) -> Iterator[RetrieveResponse]:
        """C-MOVE to the AE ``destination``; yields each C-MOVE-RSP.

        The objects go to ``destination`` on an association of the peer's;
        this one carries the responses and their counts. An unknown
        destination (0xA801) raises
        :class:`~pacsframe.errors.MoveDestinationUnknown`, other failures
        :class:`~pacsframe.errors.DimseError`. Closing the generator early
        sends C-CANCEL and reads up to the final response.
        """
        cid = self.context_for(model_uid)
        message_id = self.new_message_id()
        self._send_message(
            cid, dimse.c_move_rq(message_id, model_uid, destination, priority), identifier
        )
        yield from self._retrieve(cid, message_id, dimse.C_MOVE_RSP, None)

    def _retrieve(
        self,
        cid: int,
        message_id: int,
        field: int,
        on_store: StoreWriterFactory | None,
    ) -> Iterator[RetrieveResponse]:
        machine = self._machine
        # Data sets come as fragments while the retrieve runs: objects stream
        # to their writers, responses' identifiers are joined here.
        reassemble, machine.reassemble = machine.reassemble, False
        done = False
        try:
            # Bounded by the peer: each pass waits at most dimse_timeout per event.
            while True:
                try:
                    rsp, data = self._retrieve_message(cid, message_id, field, on_store)
                except LimitReached as exc:
                    done = True
                    if exc.action == "aborted":
                        raise
                    self._cancel_at_limit(cid, message_id, field, on_store, exc)
                assert rsp.status is not None  # _check_response made sure
                response = RetrieveResponse(
                    rsp.status,
                    rsp.remaining,
                    rsp.completed,
                    rsp.failed,
                    rsp.warning,
                    data,
                    rsp.error_comment,
                )
                if response.pending:
                    yield response
                    continue
                done = True
                if response.status in FINAL_OK:
                    yield response
                    return
                raise _retrieve_failure(response, rsp.name, self.where)
        except GeneratorExit:
            if not done and machine.state.name == "ESTABLISHED":
                self._send_message(cid, dimse.c_cancel_rq(message_id), None)
                # Bounded: until the final response, each wait at most dimse_timeout.
                while True:
                    rsp, _ = self._retrieve_message(cid, message_id, field, on_store)
                    if rsp.status not in PENDING:
                        break
            raise
        except BaseException:
            if not done:
                # Mid-operation and not by our choice (a writer's bug, Ctrl-C in
                # a read): nothing says where the peer is, so end it.
                self.abort()
            raise
        finally:
            machine.reassemble = reassemble

    def _retrieve_message(
        self, cid: int, message_id: int, field: int, on_store: StoreWriterFactory | None
    ) -> tuple[dimse.Command, bytes | None]:
        """The next response to our request, serving C-STORE sub-operations on the way."""
        # Bounded: each pass serves one sub-operation or returns; each wait is bounded.
        while True:
            context_id, command = self._next_command()
            if command.command_field == field:
                self._check_response(command, field, message_id)
                data = None
                if command.has_dataset:
                    data = self._joined_dataset(context_id, command)
                return command, data
            if command.command_field == dimse.C_STORE_RQ and on_store is not None:
                self._serve_store(context_id, command, on_store)
                continue
            expected = dimse.COMMAND_NAMES[field]
            if on_store is not None:
                expected += " or C-STORE-RQ"
            self._protocol_failure(
                ProtocolError(
                    f"the peer sent {command.name} while we waited for {expected}",
                    abort_reason=pdu.UNEXPECTED_PARAMETER,
                )
            )

    def _joined_dataset(self, context_id: int, command: dimse.Command) -> bytes:
        """A response's (small) data set, joined, within the machine's cap."""
        parts = bytearray()
        for fragments in self._fragments(context_id, command):
            for fragment in fragments:
                parts += fragment
            if len(parts) > self._machine.max_dataset:
                self._protocol_failure(
                    ProtocolError(
                        f"the data set of the peer's {command.name} exceeds "
                        f"{self._machine.max_dataset} bytes",
                        abort_reason=pdu.INVALID_PARAMETER,
                    )
                )
        return bytes(parts)

    # ------------------------------------------------------------------ ending

    def release(self) -> None:
        """A-RELEASE, waiting at most ``acse_timeout`` for the answer; then close."""
        if self._machine.state.name != "ESTABLISHED":
            self._sock.close()
            return
        try:
            self._send_bytes(self._machine.send(pdu.ReleaseRQ()))
            deadline = time.monotonic() + self.acse_timeout
            # Bounded: the deadline ends every wait; data still arriving is dropped.
            while True:
                event = next_event(
                    self._sock, self._machine, deadline, "the A-RELEASE-RP", self.where
                )
                if isinstance(event, Released):
                    return
                if isinstance(event, ReleaseRequested):
                    # Release collision: answer theirs, keep waiting for ours.
                    self._send_bytes(pdu.encode(pdu.ReleaseRP()))
        finally:
            self._sock.close()

    def __enter__(self) -> ClientAssociation:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc_type is None:
            self.release()
        else:
            self.abort()


def _read_dataset(
    source: str | os.PathLike[str] | BinaryIO,
) -> tuple[bytes, Part10]:
    """A Part-10 file's data set bytes (after its meta) and what its meta says."""
    if isinstance(source, (str, os.PathLike)):
        with open(source, "rb") as handle:
            return _read_dataset(handle)
    start = source.tell()
    meta = read_part10(source)
    source.seek(start + meta.dataset_offset)
    return source.read(), meta


def _retrieve_failure(response: RetrieveResponse, name: str, where: str) -> DimseError:
    """The error for a final C-GET/C-MOVE response with a failure status."""
    counts = ", ".join(
        f"{value} {label}"
        for label, value in (
            ("completed", response.completed),
            ("failed", response.failed),
            ("warning", response.warning),
        )
        if value is not None
    )
    message = f"the peer at {where} ended the retrieve with {name} status 0x{response.status:04X}"
    if response.comment:
        message += f": {response.comment}"
    if counts:
        message += f" ({counts})"
    error: DimseError
    if response.status == 0xA801:
        error = MoveDestinationUnknown(
            message + ". The peer must register the destination AE (title, host and port).",
            status=response.status,
            comment=response.comment,
        )
    else:
        error = DimseError(message, status=response.status, comment=response.comment)
    # The whole final response, for callers that account for its counts and its
    # Failed SOP Instance UID List.
    error.response = response  # type: ignore[attr-defined]
    return error


def with_abort(sock: socket.socket, machine: Association, error: ProtocolError) -> None:
    """Send the A-ABORT that answers ``error`` (best effort) and close ``sock``."""
    _send_and_close(sock, machine.protocol_abort(error))


def _send_and_close(sock: socket.socket, data: bytes) -> None:
    """Send a last PDU (an A-ABORT) if there is one, at most 1 s, then close."""
    try:
        if data:
            # Bounded: a peer that stopped reading must not hold us here.
            sock.settimeout(1.0)
            sock.sendall(data)
    except OSError:
        pass  # the peer may be gone; the abort is a courtesy
    finally:
        sock.close()


_THREAD = threading.local()


def _recv_buffer() -> memoryview:
    """This thread's read buffer, made at its first read."""
    view: memoryview | None = getattr(_THREAD, "view", None)
    if view is None:
        view = _THREAD.view = memoryview(bytearray(_RECV_SIZE))
    return view


def _socket_failure(text: str, reason: str, exc: OSError) -> AssociationError:
    """An AssociationError for a failed socket call, keeping a TLS error as ``ssl_error``.

    Callers explain the TLS error itself (:func:`pacsframe.net.tls.explain_failure`):
    which certificate was refused, or that the peer speaks no TLS.
    """
    error = AssociationError(text, reason=reason)
    error.ssl_error = exc if isinstance(exc, ssl.SSLError) else None  # type: ignore[attr-defined]
    return error


def next_event(
    sock: socket.socket,
    machine: Association,
    deadline: float,
    waiting_for: str,
    where: str,
    limit: float | None = None,
    interrupted: Callable[[], bool] | None = None,
) -> Event:
    """The next event that matters, reading ``sock`` until ``deadline``.

    Peer aborts, protocol errors, timeouts and a closed connection become
    :class:`~pacsframe.errors.AssociationError`; ``NEED_DATA`` is never
    returned. When ``limit`` comes before ``deadline`` and passes first,
    :class:`LimitReached` is raised with the association untouched (the
    caller cancels or aborts); ``deadline`` passing aborts. When
    ``interrupted`` (asked at least every ``_INTERRUPT_POLL`` seconds of
    waiting) says so, :class:`Interrupted` is raised the same way.
    """
    if limit is not None and limit < deadline:
        deadline, at_limit = limit, True
    else:
        at_limit = False
    # Reads go into this thread's one buffer (the machine copies what it keeps):
    # no allocation per read.
    view = _recv_buffer()
    # Bounded: every pass either returns, raises, or reads bytes before the deadline.
    while True:
        try:
            event = machine.next_event()
        except ProtocolError as exc:
            with_abort(sock, machine, exc)
            raise
        if event is not NEED_DATA:
            if isinstance(event, AbortReceived):
                sock.close()
                raise AssociationError(
                    f"the peer at {where} aborted the association "
                    f"({describe_abort(event.abort)}) while we waited for {waiting_for}",
                    reason="aborted",
                )
            if isinstance(event, ConnectionClosed):
                sock.close()
                error = AssociationError(
                    f"the connection to {where} closed while we waited for {waiting_for}",
                    reason="aborted",
                )
                error.closed = True  # type: ignore[attr-defined]
                raise error
            return event
        remaining = deadline - time.monotonic()
        if interrupted is not None:
            if interrupted():
                raise Interrupted(
                    f"stopped while we waited for {waiting_for} from {where}", "none"
                )
            remaining = min(remaining, _INTERRUPT_POLL) if remaining > 0 else remaining
        if remaining <= 0 and at_limit:
            raise LimitReached(
                f"the time given ran out while we waited for {waiting_for} from {where}",
                "none",
            )
        if remaining <= 0:
            _send_and_close(sock, machine.abort())
            raise AssociationError(
                f"timed out waiting for {waiting_for} from {where}; the association was "
                "aborted. Raise the timeout if the peer is slow.",
                reason="timeout",
            )
        sock.settimeout(remaining)
        try:
            size = sock.recv_into(view)
        except TimeoutError:
            continue  # the deadline check above raises
        except OSError as exc:
            sock.close()
            # A TLS alert (e.g. our certificate refused) arrives on the first read.
            raise _socket_failure(
                f"the connection to {where} broke while we waited for {waiting_for}: {exc}",
                "aborted",
                exc,
            ) from None
        machine.receive_data(view[:size])


def associate(
    host: str,
    port: int,
    *,
    called_ae: str,
    calling_ae: str = "PACSFRAME",
    contexts: Sequence[tuple[str, Sequence[str]]] = (
        (VERIFICATION, (IMPLICIT_VR_LITTLE_ENDIAN,)),
    ),
    roles: Sequence[pdu.RoleSelection] = (),
    connect_timeout: float = 10.0,
    acse_timeout: float = 30.0,
    dimse_timeout: float = 60.0,
    ssl_context: ssl.SSLContext | None = None,
    max_pdu: int = DEFAULT_MAX_PDU,
) -> ClientAssociation:
    """Connect to ``host:port`` and negotiate an association.

    Parameters
    ----------
    host, port : str, int
        The peer.
    called_ae, calling_ae : str
        The peer's AE title and ours.
    contexts : sequence of (abstract syntax, transfer syntaxes)
        Proposed presentation contexts, given IDs 1, 3, 5, ... in order.
    roles : sequence of pdu.RoleSelection
        SCP/SCU role selection sub-items (C-GET storage classes).
    connect_timeout, acse_timeout, dimse_timeout : float
        Seconds, as for :class:`pacsframe.PACS`.
    ssl_context : ssl.SSLContext, optional
        Wrap the connection in TLS (the handshake counts against
        ``connect_timeout``).
    max_pdu : int
        The largest P-DATA-TF we accept, announced to the peer.

    Raises
    ------
    AssociationError
        ``reason`` says why: ``refused``, ``timeout``, ``rejected``,
        ``aborted`` or ``tls``.
    """
    where = f"{host}:{port}"
    if len(contexts) > 128:
        raise ValueError(f"at most 128 presentation contexts fit; {len(contexts)} were given")
    proposals = tuple(
        pdu.PresentationContextRQ(2 * i + 1, abstract, tuple(syntaxes))
        for i, (abstract, syntaxes) in enumerate(contexts)
    )
    request = pdu.AssociateRQ(
        called_ae,
        calling_ae,
        proposals,
        pdu.UserInformation(
            max_pdu, IMPLEMENTATION_CLASS_UID, IMPLEMENTATION_VERSION_NAME, tuple(roles)
        ),
    )
    # Encode before connecting: a bad AE title is our caller's error, not the network's.
    machine = Association("requestor", max_receive=max_pdu, batch=True)
    request_bytes = machine.send(request)
    sock = _connect(host, port, connect_timeout, ssl_context, where)
    try:
        sock.settimeout(acse_timeout)
        sock.sendall(request_bytes)
    except OSError as exc:
        sock.close()
        raise _socket_failure(
            f"the connection to {where} broke while sending the A-ASSOCIATE-RQ: {exc}",
            "aborted",
            exc,
        ) from None
    event = next_event(
        sock, machine, time.monotonic() + acse_timeout, "the A-ASSOCIATE answer", where
    )
    if isinstance(event, AssociateRejected):
        sock.close()
        transient = event.reject.result == 2
        advice = (
            "The peer is busy and said to try later."
            if transient
            else f"Check that {called_ae!r} is the peer's AE title and that the peer knows "
            f"{calling_ae!r}."
        )
        error = AssociationError(
            f"the peer at {where} rejected the association ({describe_rejection(event.reject)})"
            f" for called AE {called_ae!r} from calling AE {calling_ae!r}. {advice}",
            reason="rejected",
        )
        error.rejection = event.reject  # type: ignore[attr-defined]
        raise error
    assert isinstance(event, AssociateAccepted), event
    proposed = {cx.context_id: cx.abstract_syntax for cx in proposals}
    return ClientAssociation(
        sock,
        machine,
        event.accept,
        proposed,
        where=where,
        acse_timeout=acse_timeout,
        dimse_timeout=dimse_timeout,
    )


def _connect(
    host: str, port: int, timeout: float, ssl_context: ssl.SSLContext | None, where: str
) -> socket.socket:
    try:
        sock = socket.create_connection((host, port), timeout=timeout)
    except ConnectionRefusedError:
        raise AssociationError(
            f"connection refused by {where}: nothing listens there. Check the host and port, "
            "and that the PACS is running.",
            reason="refused",
        ) from None
    except TimeoutError:
        raise AssociationError(
            f"timed out after {timeout:g} s connecting to {where}; check the host, the port "
            "and any firewall, or raise connect_timeout.",
            reason="timeout",
        ) from None
    except OSError as exc:
        raise AssociationError(
            f"could not connect to {where}: {exc.strerror or exc}. Check the host name and port.",
            reason="refused",
        ) from None
    # Each DIMSE message goes out in one write; Nagle's algorithm would hold the
    # next small one back until the peer's delayed ACK, about 40 ms per exchange.
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    if ssl_context is None:
        return sock
    try:
        return ssl_context.wrap_socket(sock, server_hostname=host)
    except (ssl.SSLError, OSError) as exc:
        sock.close()
        raise _socket_failure(
            f"the TLS handshake with {where} failed: {exc}. Check that this is the peer's TLS "
            "port and that the TLS settings (CA, client certificate) match.",
            "tls",
            exc,
        ) from None


def echo(
    host: str,
    port: int,
    *,
    called_ae: str,
    calling_ae: str = "PACSFRAME",
    connect_timeout: float = 10.0,
    acse_timeout: float = 30.0,
    dimse_timeout: float = 60.0,
    ssl_context: ssl.SSLContext | None = None,
) -> float:
    """C-ECHO over a new association; returns the round trip in seconds.

    The time covers the association, the echo and the release, as
    :meth:`pacsframe.PACS.echo` does. Raises
    :class:`~pacsframe.errors.AssociationError` when no association is made
    and :class:`~pacsframe.errors.DimseError` for a failure status.
    """
    started = time.perf_counter()
    with associate(
        host,
        port,
        called_ae=called_ae,
        calling_ae=calling_ae,
        connect_timeout=connect_timeout,
        acse_timeout=acse_timeout,
        dimse_timeout=dimse_timeout,
        ssl_context=ssl_context,
    ) as assoc:
        status = assoc.echo()
    if status != 0x0000:
        raise DimseError(
            f"{host}:{port} answered C-ECHO with status 0x{status:04X}", status=status
        )
    return time.perf_counter() - started
