"""A sans-I/O DICOM association: bytes in, events out (PS3.8 section 9.2).

:class:`Association` knows the PS3.8 states and what may happen in each, and
nothing about sockets, threads or clocks. The caller feeds it the bytes it read
with :meth:`Association.receive_data` and takes events with
:meth:`Association.next_event`; what it wants to say it passes to
:meth:`Association.send`, which returns the bytes to write. That keeps the
protocol testable and fuzzable without a network (the same design as h11 and
wsproto), and lets the driver choose how it waits: a blocking socket today.

The PS3.8 state table (Sta1 to Sta13) is folded into the states a program can
observe: the transport states (Sta4, Sta13) belong to the driver, and the ARTIM
timer is the driver's ``acse_timeout``. A peer that breaks the rules (a
P-DATA-TF before the association is accepted, a fragment on a context that was
not accepted, a data set fragment in the middle of a command, a PDU over the
maximum length we announced) makes :meth:`next_event` raise
:class:`~pacsframe.errors.ProtocolError`; the association is then
:attr:`State.CLOSED` and :meth:`abort` gives the A-ABORT to send.

Examples
--------
Both sides in one process, no network:

>>> from pacsframe.net import association as a, pdu
>>> VERIFICATION = "1.2.840.10008.1.1"
>>> IMPLICIT = "1.2.840.10008.1.2"
>>> scu = a.Association("requestor")
>>> scp = a.Association("acceptor")
>>> rq = pdu.AssociateRQ("SCP", "SCU", (pdu.PresentationContextRQ(1, VERIFICATION, (IMPLICIT,)),),
...                      pdu.UserInformation(max_length=16384))
>>> scp.receive_data(scu.send(rq))
>>> event = scp.next_event()
>>> type(event).__name__
'AssociateRequested'
>>> ac = pdu.AssociateAC("SCP", "SCU", (pdu.PresentationContextAC(1, 0, IMPLICIT),),
...                      pdu.UserInformation(max_length=16384))
>>> scu.receive_data(scp.send(ac))
>>> type(scu.next_event()).__name__, scu.state.name
('AssociateAccepted', 'ESTABLISHED')
>>> scp.receive_data(scu.send_message(1, b"command", None))
>>> scp.next_event()
CommandReceived(context_id=1, data=b'command')
"""

from __future__ import annotations

import enum
import struct
from collections.abc import Iterator
from dataclasses import dataclass

from pacsframe.errors import ProtocolError
from pacsframe.net import pdu
from pacsframe.net.pdu import (
    INVALID_PARAMETER,
    UNEXPECTED_PARAMETER,
    UNEXPECTED_PDU,
    Abort,
    AssociateAC,
    AssociateRJ,
    AssociateRQ,
    PDataTF,
    ReleaseRP,
    ReleaseRQ,
)

__all__ = [
    "DEFAULT_MAX_PDU",
    "AbortReceived",
    "AssociateAccepted",
    "AssociateRejected",
    "AssociateRequested",
    "Association",
    "CommandReceived",
    "ConnectionClosed",
    "DataFragments",
    "DatasetReceived",
    "Event",
    "NeedData",
    "PDataFragment",
    "ReleaseRequested",
    "Released",
    "State",
    "describe_abort",
    "describe_rejection",
]

#: The maximum P-DATA-TF length pacsframe announces by default. Larger PDUs
#: mean fewer headers and system calls per object; 256 KiB keeps the buffer a
#: connection holds small. (Not yet tuned: the benchmarks of issue 12 will.)
DEFAULT_MAX_PDU = 262_144

#: Largest command set we reassemble. Command sets are a few hundred bytes; an
#: Error Comment is at most 64 characters. Anything this big is an attack.
MAX_COMMAND = 65_536

#: A P-DATA-TF header followed by its first PDV item's header.
_DATA_PDU = struct.Struct(">BxLLBB")

#: Default cap on a reassembled data set (C-FIND identifiers, small objects).
#: Large objects are meant to be streamed with ``reassemble=False``.
DEFAULT_MAX_DATASET = 256 << 20


class State(enum.Enum):
    """What the association is doing, from this side's point of view."""

    #: Requestor before its A-ASSOCIATE-RQ; acceptor waiting for one (Sta1/Sta2).
    IDLE = "idle"
    #: Requestor: A-ASSOCIATE-RQ sent, waiting for AC or RJ (Sta5).
    AWAITING_ASSOCIATE_RESPONSE = "awaiting associate response"
    #: Acceptor: A-ASSOCIATE-RQ received, the user must accept or reject (Sta3).
    AWAITING_LOCAL_RESPONSE = "awaiting local response"
    #: Data may flow both ways (Sta6).
    ESTABLISHED = "established"
    #: We sent A-RELEASE-RQ and wait for A-RELEASE-RP (Sta7, and Sta9-12 on collision).
    AWAITING_RELEASE_RESPONSE = "awaiting release response"
    #: The peer sent A-RELEASE-RQ; we must send A-RELEASE-RP (Sta8).
    RELEASE_REQUESTED = "release requested"
    #: Rejected, released or aborted: only closing the transport is left (Sta1/Sta13).
    CLOSED = "closed"


# ----------------------------------------------------------------------------- events


class NeedData:
    """No whole event is buffered: read more bytes and call ``receive_data``."""

    def __repr__(self) -> str:
        return "NEED_DATA"


#: The single :class:`NeedData` instance :meth:`Association.next_event` returns.
NEED_DATA = NeedData()


@dataclass(frozen=True)
class AssociateRequested:
    """Acceptor side: the peer asks for an association."""

    request: AssociateRQ


@dataclass(frozen=True)
class AssociateAccepted:
    """Requestor side: the peer accepted; ``accept`` holds the contexts and max length."""

    accept: AssociateAC


@dataclass(frozen=True)
class AssociateRejected:
    """Requestor side: the peer rejected the association."""

    reject: AssociateRJ


@dataclass(frozen=True)
class PDataFragment:
    """One PDV, in order, when the association does not reassemble messages.

    ``data`` is a memoryview into the received PDU: write it out before
    feeding more bytes.
    """

    context_id: int
    is_command: bool
    is_last: bool
    data: memoryview


@dataclass(frozen=True)
class DataFragments:
    """Several data set PDVs in order, one per P-DATA-TF, when ``batch`` is on.

    What a run of :class:`PDataFragment` events would say, in one event:
    the fragments of one data set on ``context_id``, ``is_last`` when the last
    of them ends it. ``fragments`` are memoryviews into bytes the machine no
    longer uses, so they stay valid after more bytes are fed.
    """

    context_id: int
    fragments: list[memoryview]
    is_last: bool


@dataclass(frozen=True)
class CommandReceived:
    """A whole command set (the bytes of group 0000, implicit VR little endian)."""

    context_id: int
    data: bytes


@dataclass(frozen=True)
class DatasetReceived:
    """A whole data set in the context's transfer syntax."""

    context_id: int
    data: bytes


@dataclass(frozen=True)
class ReleaseRequested:
    """The peer asks to release; answer with ``send(pdu.ReleaseRP())``."""


@dataclass(frozen=True)
class Released:
    """The peer answered our A-RELEASE-RQ: the association is over."""


@dataclass(frozen=True)
class AbortReceived:
    """The peer sent A-ABORT."""

    abort: Abort


@dataclass(frozen=True)
class ConnectionClosed:
    """The transport closed after the association ended (``receive_data(b"")``)."""


Event = (
    NeedData
    | AssociateRequested
    | AssociateAccepted
    | AssociateRejected
    | PDataFragment
    | DataFragments
    | CommandReceived
    | DatasetReceived
    | ReleaseRequested
    | Released
    | AbortReceived
    | ConnectionClosed
)


# ----------------------------------------------------------------------- descriptions

_RJ_RESULTS = {1: "rejected-permanent", 2: "rejected-transient"}
_RJ_SOURCES = {
    1: "DICOM UL service-user",
    2: "DICOM UL service-provider (ACSE)",
    3: "DICOM UL service-provider (presentation)",
}
_RJ_REASONS = {
    (1, 1): "no reason given",
    (1, 2): "application context name not supported",
    (1, 3): "calling AE title not recognized",
    (1, 7): "called AE title not recognized",
    (2, 1): "no reason given",
    (2, 2): "protocol version not supported",
    (3, 1): "temporary congestion",
    (3, 2): "local limit exceeded",
}
_ABORT_REASONS = {
    0: "reason not specified",
    1: "unrecognized PDU",
    2: "unexpected PDU",
    4: "unrecognized PDU parameter",
    5: "unexpected PDU parameter",
    6: "invalid PDU parameter value",
}


def describe_rejection(reject: AssociateRJ) -> str:
    """Say an A-ASSOCIATE-RJ in words.

    >>> describe_rejection(pdu.AssociateRJ(1, 1, 7))
    'rejected-permanent; source: DICOM UL service-user; reason: called AE title not recognized'
    """
    result = _RJ_RESULTS.get(reject.result, f"result {reject.result}")
    source = _RJ_SOURCES.get(reject.source, f"source {reject.source}")
    reason = _RJ_REASONS.get((reject.source, reject.reason), f"reason code {reject.reason}")
    return f"{result}; source: {source}; reason: {reason}"


def describe_abort(abort: Abort) -> str:
    """Say an A-ABORT in words.

    >>> describe_abort(pdu.Abort(2, 2))
    'by the service provider: unexpected PDU'
    """
    if abort.source == 0:
        return "by the service user"
    reason = _ABORT_REASONS.get(abort.reason, f"reason code {abort.reason}")
    return f"by the service provider: {reason}"


# ------------------------------------------------------------------------ the machine

#: Where P-DATA-TF from the peer is allowed.
_DATA_STATES = frozenset((State.ESTABLISHED, State.AWAITING_RELEASE_RESPONSE))

_NAMES = {
    AssociateRQ: "A-ASSOCIATE-RQ",
    AssociateAC: "A-ASSOCIATE-AC",
    AssociateRJ: "A-ASSOCIATE-RJ",
    PDataTF: "P-DATA-TF",
    ReleaseRQ: "A-RELEASE-RQ",
    ReleaseRP: "A-RELEASE-RP",
    Abort: "A-ABORT",
}


class Association:
    """One DICOM association as a state machine over bytes.

    Parameters
    ----------
    role : {"requestor", "acceptor"}
        Which side we are. pacsframe's client is the requestor; its storage SCP
        will be the acceptor.
    max_receive : int, default DEFAULT_MAX_PDU
        The largest P-DATA-TF we accept; announce the same value in the
        user information of our A-ASSOCIATE-RQ/AC. A bigger one is a
        :class:`ProtocolError`.
    reassemble : bool, default True
        Emit :class:`CommandReceived` / :class:`DatasetReceived` for whole
        messages; with False, data sets come as :class:`PDataFragment` events
        (commands are still reassembled: they are small and always parsed).
    max_dataset : int
        Cap on a reassembled data set, in bytes.
    batch : bool, default False
        With ``reassemble`` False: data set fragments that are whole in the
        buffer, one data PDV per P-DATA-TF (what every peer sends), come
        together as one :class:`DataFragments` event instead of one
        :class:`PDataFragment` each. Fewer steps per PDU; the same bytes, in
        the same order, and the same errors.

    Attributes
    ----------
    state : State
    accepted_contexts : dict of int to str
        Context ID to transfer syntax, once the association is established.
    peer_max_pdu : int
        The peer's maximum P-DATA-TF length (0: no limit), once established.
    """

    def __init__(
        self,
        role: str,
        *,
        max_receive: int = DEFAULT_MAX_PDU,
        reassemble: bool = True,
        max_dataset: int = DEFAULT_MAX_DATASET,
        batch: bool = False,
    ) -> None:
        if role not in ("requestor", "acceptor"):
            raise ValueError(f"role must be 'requestor' or 'acceptor', not {role!r}")
        self.role = role
        self.max_receive = max_receive
        self.reassemble = reassemble
        self.max_dataset = max_dataset
        self.batch = batch
        self.state = State.IDLE
        self.accepted_contexts: dict[int, str] = {}
        self.peer_max_pdu = 0
        self._proposed: dict[int, pdu.PresentationContextRQ] = {}
        self._buffer = bytearray()
        self._eof = False
        # True once nothing is owed to the peer: released, rejected or aborted.
        # A protocol error closes the machine but leaves this False, so that
        # abort() still produces the A-ABORT PS3.8 asks for.
        self._ended = False
        # PDVs of the last P-DATA-TF not yet turned into events.
        self._pending: Iterator[pdu.PDV] | None = None
        # The message being reassembled: (context id, is_command), its chunks and size.
        self._current: tuple[int, bool] | None = None
        self._chunks: list[bytes] = []
        self._size = 0

    # ------------------------------------------------------------------ sending

    def send(self, message: pdu.PDU) -> bytes:
        """Return the bytes of ``message`` after checking it is allowed now.

        Raises :class:`RuntimeError` when it is not (our own bug, not the
        peer's): for example an A-ASSOCIATE-AC from the requestor, or a
        P-DATA-TF before the association is established.
        """
        if isinstance(message, Abort):
            return self.abort(message.source, message.reason)
        state = self.state
        if isinstance(message, AssociateRQ):
            self._require(self.role == "requestor" and state is State.IDLE, message)
            self._proposed = {cx.context_id: cx for cx in message.contexts}
            self.state = State.AWAITING_ASSOCIATE_RESPONSE
        elif isinstance(message, AssociateAC):
            self._require(
                self.role == "acceptor" and state is State.AWAITING_LOCAL_RESPONSE, message
            )
            self._establish(message, self._peer_max_from_request)
        elif isinstance(message, AssociateRJ):
            self._require(
                self.role == "acceptor" and state is State.AWAITING_LOCAL_RESPONSE, message
            )
            self.state, self._ended = State.CLOSED, True
        elif isinstance(message, PDataTF):
            self._require(state in (State.ESTABLISHED, State.RELEASE_REQUESTED), message)
            for pdv in message.pdvs:
                if pdv.context_id not in self.accepted_contexts:
                    raise RuntimeError(f"presentation context {pdv.context_id} is not accepted")
        elif isinstance(message, ReleaseRQ):
            self._require(state is State.ESTABLISHED, message)
            self.state = State.AWAITING_RELEASE_RESPONSE
        elif isinstance(message, ReleaseRP):
            self._require(state is State.RELEASE_REQUESTED, message)
            self.state, self._ended = State.CLOSED, True
        else:
            raise TypeError(f"not a PDU: {message!r}")
        return pdu.encode(message)

    def _require(self, allowed: bool, message: object) -> None:
        if not allowed:
            raise RuntimeError(
                f"cannot send {type(message).__name__} as the {self.role} in state "
                f"{self.state.value!r}"
            )

    def abort(self, source: int = 0, reason: int = 0) -> bytes:
        """Return the A-ABORT to send and close the association.

        Allowed in every state, including after a :class:`ProtocolError` (which
        closes the machine but still owes the peer an A-ABORT). Returns ``b""``
        once the association has ended: released, rejected, aborted by either
        side.
        """
        if self._ended:
            return b""
        self._ended = True
        self.state = State.CLOSED
        return pdu.encode(Abort(source, reason))

    def send_message(self, context_id: int, command: bytes, dataset: bytes | None) -> bytes:
        """Fragment a DIMSE message into P-DATA-TF PDUs within the peer's maximum.

        The command set and the data set go in separate PDVs (PS3.8 9.3.5.1
        forbids mixing them), one PDV per PDU.
        """
        return b"".join(self.iter_message(context_id, command, dataset))

    def iter_message(
        self, context_id: int, command: bytes, dataset: bytes | memoryview | None
    ) -> Iterator[bytes | memoryview]:
        """Like :meth:`send_message`, as pieces to write one after another.

        Data set fragments are memoryviews into ``dataset`` (no copies); each
        is preceded by its 12-byte PDU and PDV header.
        """
        if self.state not in (State.ESTABLISHED, State.RELEASE_REQUESTED):
            raise RuntimeError(f"cannot send data in state {self.state.value!r}")
        if context_id not in self.accepted_contexts:
            raise RuntimeError(f"presentation context {context_id} is not accepted")
        step = self.fragment_size
        parts: list[tuple[bool, bytes | memoryview]] = [(True, command)]
        if dataset is not None:
            parts.append((False, dataset))
        for is_command, data in parts:
            view = memoryview(data)
            total = len(view)
            offset = 0
            # An empty data set still needs one (last) PDV.
            while True:
                chunk = view[offset : offset + step]
                offset += len(chunk)
                last = offset >= total
                yield pdu.encode_pdv_header(context_id, is_command, last, len(chunk))
                if len(chunk):
                    yield chunk
                if last:
                    break

    @property
    def fragment_size(self) -> int:
        """The most data bytes one P-DATA-TF to the peer can carry."""
        if not self.peer_max_pdu:
            # No limit from the peer: still bound each PDU, to bound our buffers.
            return 4 << 20
        return self.peer_max_pdu - 6

    # ---------------------------------------------------------------- receiving

    def receive_data(self, data: bytes | bytearray | memoryview) -> None:
        """Buffer bytes read from the transport; ``b""`` means it was closed."""
        if not data:
            self._eof = True
        else:
            self._buffer += data

    def next_event(self) -> Event:
        """Return the next event, or :data:`NEED_DATA`.

        Raises
        ------
        ProtocolError
            The peer broke the protocol. The association is closed; send
            :meth:`abort`'s bytes (with ``source=2``) and close the transport.
        """
        try:
            return self._next_event()
        except ProtocolError:
            # After a protocol error nothing the peer says can be trusted; the
            # caller aborts. Keep the reason so the abort can carry it.
            self._pending = None
            self._buffer.clear()
            raise

    def protocol_abort(self, error: ProtocolError) -> bytes:
        """The A-ABORT (source: service provider) that answers ``error``."""
        return self.abort(2, error.abort_reason)

    def _next_event(self) -> Event:
        # Bounded: each pass consumes a PDV or a whole PDU from the buffer, or returns.
        while True:
            if self._pending is not None:
                event = self._next_pdv_event()
                if event is not None:
                    return event
                continue
            if (
                self.batch
                and not self.reassemble
                and len(self._buffer) >= 12
                and self.state in _DATA_STATES
            ):
                fast = self._take_fragments()
                if fast is not None:
                    return fast
            if len(self._buffer) < 6:
                return self._at_end_of_buffer()
            _, length = pdu.pdu_header(self._buffer, self.max_receive)
            if len(self._buffer) < 6 + length:
                return self._at_end_of_buffer()
            if len(self._buffer) == 6 + length:
                # The buffer is this PDU and nothing more (the usual case for a
                # large P-DATA-TF): take it whole, without a copy.
                raw: bytes | bytearray = self._buffer
                self._buffer = bytearray()
            else:
                with memoryview(self._buffer) as view:
                    raw = bytes(view[: 6 + length])
                del self._buffer[: 6 + length]
            event = self._handle(pdu.decode(raw, self.max_receive))
            if event is not None:
                return event

    def _at_end_of_buffer(self) -> Event:
        if not self._eof:
            return NEED_DATA
        if self.state is State.CLOSED or (
            self.role == "acceptor" and self.state is State.IDLE and not self._buffer
        ):
            if self._buffer:
                raise ProtocolError(
                    f"the connection closed in the middle of a PDU ({len(self._buffer)} "
                    "bytes of it arrived)",
                    abort_reason=INVALID_PARAMETER,
                )
            self.state = State.CLOSED
            return ConnectionClosed()
        was = self.state
        self.state = State.CLOSED
        partial = f" after {len(self._buffer)} bytes of a PDU" if self._buffer else ""
        raise ProtocolError(
            f"the peer closed the connection{partial} while the association was "
            f"{was.value}, without releasing or aborting it"
        )

    def _unexpected(self, message: pdu.PDU) -> ProtocolError:
        """The error for a PDU not allowed in the current state; closes the machine."""
        error = ProtocolError(
            f"the peer sent {_NAMES[type(message)]} while the association was "
            f"{self.state.value} (we are the {self.role}); PS3.8 does not allow it there",
            abort_reason=UNEXPECTED_PDU,
        )
        self.state = State.CLOSED
        return error

    def _handle(self, message: pdu.PDU) -> Event | None:
        state = self.state
        if isinstance(message, Abort):
            self.state, self._ended = State.CLOSED, True
            return AbortReceived(message)
        if state is State.CLOSED:
            # PS3.8 Sta13: after an abort or release, ignore what still arrives.
            return None
        if isinstance(message, PDataTF):
            if state not in (State.ESTABLISHED, State.AWAITING_RELEASE_RESPONSE):
                raise self._unexpected(message)
            self._pending = iter(message.pdvs)
            return None
        if isinstance(message, AssociateRQ):
            if self.role != "acceptor" or state is not State.IDLE:
                raise self._unexpected(message)
            self._proposed = {cx.context_id: cx for cx in message.contexts}
            self._peer_max_from_request = message.user_information.max_length
            self.state = State.AWAITING_LOCAL_RESPONSE
            return AssociateRequested(message)
        if isinstance(message, AssociateAC):
            if state is not State.AWAITING_ASSOCIATE_RESPONSE:
                raise self._unexpected(message)
            self._establish(message, message.user_information.max_length)
            return AssociateAccepted(message)
        if isinstance(message, AssociateRJ):
            if state is not State.AWAITING_ASSOCIATE_RESPONSE:
                raise self._unexpected(message)
            self.state, self._ended = State.CLOSED, True
            return AssociateRejected(message)
        if isinstance(message, ReleaseRQ):
            if state is State.ESTABLISHED:
                self._check_no_partial_message()
                self.state = State.RELEASE_REQUESTED
                return ReleaseRequested()
            if state is State.AWAITING_RELEASE_RESPONSE:
                # Release collision (PS3.8 7.2.2): both sides asked. We answer
                # the peer's request and still wait for its answer to ours.
                return ReleaseRequested()
            raise self._unexpected(message)
        if isinstance(message, ReleaseRP):
            if state is not State.AWAITING_RELEASE_RESPONSE:
                raise self._unexpected(message)
            self.state, self._ended = State.CLOSED, True
            return Released()
        raise AssertionError(f"unhandled PDU {message!r}")  # pragma: no cover

    def _establish(self, accept: AssociateAC, peer_max: int) -> None:
        accepted = {}
        for cx in accept.contexts:
            proposed = self._proposed.get(cx.context_id)
            if proposed is None:
                self.state = State.CLOSED
                raise ProtocolError(
                    f"the A-ASSOCIATE-AC answers presentation context {cx.context_id}, "
                    "which was never proposed",
                    abort_reason=INVALID_PARAMETER,
                )
            if cx.accepted:
                if cx.transfer_syntax not in proposed.transfer_syntaxes:
                    self.state = State.CLOSED
                    raise ProtocolError(
                        f"presentation context {cx.context_id} was accepted with transfer "
                        f"syntax {cx.transfer_syntax!r}, which was not proposed for it",
                        abort_reason=INVALID_PARAMETER,
                    )
                accepted[cx.context_id] = cx.transfer_syntax
        if 0 < peer_max < 7:
            # A P-DATA-TF needs 6 bytes of PDV header plus at least one of data.
            self.state = State.CLOSED
            raise ProtocolError(
                f"the peer's maximum PDU length {peer_max} cannot carry any data",
                abort_reason=INVALID_PARAMETER,
            )
        self.accepted_contexts = accepted
        self.peer_max_pdu = peer_max
        self.state = State.ESTABLISHED

    _peer_max_from_request = 0

    def _take_fragments(self) -> DataFragments | None:
        """The run of plain data PDUs at the head of the buffer, as one event.

        The fast path of the data transfer: it takes whole P-DATA-TF PDUs of a
        single data PDV each, on one accepted context and continuing the data
        set in progress (if any), up to the PDV that ends the data set. It
        stops before anything else (a partial PDU, another PDU type, a command,
        several PDVs in a PDU, any malformation), which the general path then
        handles and, for a malformed one, refuses with its usual error. So it
        yields exactly the fragments the :class:`PDataFragment` events would.
        """
        buffer = self._buffer
        end = len(buffer)
        limit = self.max_receive or 0xFFFFFFFF
        unpack = _DATA_PDU.unpack_from
        current = self._current
        context_id = -1
        spans = []
        offset = 0
        is_last = False
        # Bounded: each pass takes one whole PDU from the buffer, or stops.
        while end - offset >= 12:
            kind, length, item, cid, control = unpack(buffer, offset)
            stop = offset + 6 + length
            if (
                kind != 4
                or length > limit
                or item != length - 4
                or length < 6
                or control & 1  # a command (or a bit PS3.8 leaves undefined)
                or control > 3
                or stop > end
            ):
                break
            if context_id != cid:
                if context_id != -1 or cid not in self.accepted_contexts:
                    break
                if current is not None and current != (cid, False):
                    break
                context_id = cid
            spans.append((offset + 12, stop))
            offset = stop
            if control:
                is_last = True
                break
        if not spans:
            return None
        with memoryview(buffer) as whole:
            # The fragments keep the old buffer; the rest moves to a new one.
            fragments = [whole[start:stop] for start, stop in spans]
            self._buffer = bytearray(whole[offset:])
        self._current = None if is_last else (context_id, False)
        return DataFragments(context_id, fragments, is_last)

    def _next_pdv_event(self) -> Event | None:
        assert self._pending is not None
        pdv = next(self._pending, None)
        if pdv is None:
            self._pending = None
            return None
        if pdv.context_id not in self.accepted_contexts:
            self.state = State.CLOSED
            raise ProtocolError(
                f"the peer sent data on presentation context {pdv.context_id}, which was "
                "not accepted on this association",
                abort_reason=UNEXPECTED_PARAMETER,
            )
        current = self._current
        if current is not None and current != (pdv.context_id, pdv.is_command):
            what = "command" if current[1] else "data set"
            self.state = State.CLOSED
            raise ProtocolError(
                f"the peer interleaved a {'command' if pdv.is_command else 'data set'} "
                f"fragment on context {pdv.context_id} into an unfinished {what} on "
                f"context {current[0]}",
                abort_reason=UNEXPECTED_PARAMETER,
            )
        if not pdv.is_command and not self.reassemble:
            self._current = None if pdv.is_last else (pdv.context_id, False)
            return PDataFragment(pdv.context_id, False, pdv.is_last, memoryview(pdv.data))
        limit = MAX_COMMAND if pdv.is_command else self.max_dataset
        self._size += len(pdv.data)
        if self._size > limit:
            self.state = State.CLOSED
            raise ProtocolError(
                f"the peer's {'command set' if pdv.is_command else 'data set'} exceeds "
                f"{limit} bytes",
                abort_reason=INVALID_PARAMETER,
            )
        self._chunks.append(bytes(pdv.data))
        if not pdv.is_last:
            self._current = (pdv.context_id, pdv.is_command)
            return None
        data = b"".join(self._chunks)
        self._chunks, self._size, self._current = [], 0, None
        if pdv.is_command:
            return CommandReceived(pdv.context_id, data)
        return DatasetReceived(pdv.context_id, data)

    def _check_no_partial_message(self) -> None:
        if self._current is not None:
            self.state = State.CLOSED
            raise ProtocolError(
                "the peer asked to release in the middle of a message",
                abort_reason=UNEXPECTED_PDU,
            )
