"""PS3.7 DIMSE command sets, coded with :mod:`struct`.

A command set is group 0000 in implicit VR little endian (PS3.7 6.3.1): each
element is a tag (group, element: two little-endian uint16), a 32-bit length
and the value, in ascending tag order, after the Command Group Length
(0000,0000). pacsframe needs only the elements of the C-services it uses, so it
codes them directly with a table of tags and VRs instead of going through a
general data set: one :class:`Command` in, its bytes out, and back.

Decoding is strict and bounded like :mod:`pacsframe.net.pdu`: an element whose
length overruns the command set, a value of the wrong size for its VR, a tag
outside group 0000 or out of order, a missing Command Field or Command Data
Set Type each raise :class:`~pacsframe.errors.ProtocolError`. Group 0000
elements this module does not know (retired ones, N-service ones) are skipped.

Examples
--------
>>> from pacsframe.net import dimse
>>> rq = dimse.c_echo_rq(message_id=7)
>>> data = dimse.encode_command(rq)
>>> dimse.decode_command(data) == rq
True
>>> dimse.decode_command(data).name
'C-ECHO-RQ'
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from pacsframe.errors import ProtocolError
from pacsframe.net.pdu import INVALID_PARAMETER

__all__ = [
    "C_CANCEL_RQ",
    "C_ECHO_RQ",
    "C_ECHO_RSP",
    "C_FIND_RQ",
    "C_FIND_RSP",
    "C_GET_RQ",
    "C_GET_RSP",
    "C_MOVE_RQ",
    "C_MOVE_RSP",
    "C_STORE_RQ",
    "C_STORE_RSP",
    "NO_DATASET",
    "Command",
    "StoreResponseTemplate",
    "c_cancel_rq",
    "c_echo_rq",
    "c_echo_rsp",
    "c_find_rq",
    "c_find_rsp",
    "c_get_rq",
    "c_get_rsp",
    "c_move_rq",
    "c_move_rsp",
    "c_store_rq",
    "c_store_rsp",
    "decode_command",
    "encode_command",
]

# Command Field values (PS3.7 E.1).
C_STORE_RQ = 0x0001
C_STORE_RSP = 0x8001
C_GET_RQ = 0x0010
C_GET_RSP = 0x8010
C_FIND_RQ = 0x0020
C_FIND_RSP = 0x8020
C_MOVE_RQ = 0x0021
C_MOVE_RSP = 0x8021
C_ECHO_RQ = 0x0030
C_ECHO_RSP = 0x8030
C_CANCEL_RQ = 0x0FFF

COMMAND_NAMES = {
    C_STORE_RQ: "C-STORE-RQ",
    C_STORE_RSP: "C-STORE-RSP",
    C_GET_RQ: "C-GET-RQ",
    C_GET_RSP: "C-GET-RSP",
    C_FIND_RQ: "C-FIND-RQ",
    C_FIND_RSP: "C-FIND-RSP",
    C_MOVE_RQ: "C-MOVE-RQ",
    C_MOVE_RSP: "C-MOVE-RSP",
    C_ECHO_RQ: "C-ECHO-RQ",
    C_ECHO_RSP: "C-ECHO-RSP",
    C_CANCEL_RQ: "C-CANCEL-RQ",
}

#: Command Data Set Type value meaning "no data set follows" (PS3.7 E.1); any
#: other value means one follows. 0x0000 is what we send when one does.
NO_DATASET = 0x0101
DATASET_PRESENT = 0x0000

#: Largest value of a text element we accept (AE 16, UI 64, LO 64 by the VR;
#: a little slack for peers that pad badly, bounded so a decoder cannot be made
#: to build huge strings).
_MAX_TEXT = 1024

_ELEMENT = struct.Struct("<HHL")
_US = struct.Struct("<H")
_UL = struct.Struct("<L")


@dataclass(frozen=True)
class Command:
    """The fields of a DIMSE C-service command set that pacsframe uses.

    ``None`` means the element is absent. Build one with the ``c_*``
    functions, which fill in what each message requires.
    """

    command_field: int
    command_data_set_type: int = NO_DATASET
    message_id: int | None = None
    message_id_being_responded_to: int | None = None
    affected_sop_class_uid: str | None = None
    requested_sop_class_uid: str | None = None
    move_destination: str | None = None
    priority: int | None = None
    status: int | None = None
    offending_element: tuple[int, ...] | None = None
    error_comment: str | None = None
    error_id: int | None = None
    affected_sop_instance_uid: str | None = None
    requested_sop_instance_uid: str | None = None
    remaining: int | None = None
    completed: int | None = None
    failed: int | None = None
    warning: int | None = None
    move_originator_ae: str | None = None
    move_originator_message_id: int | None = None

    @property
    def has_dataset(self) -> bool:
        """Whether a data set follows this command."""
        return self.command_data_set_type != NO_DATASET

    @property
    def name(self) -> str:
        """The message name, e.g. ``"C-FIND-RSP"``."""
        return COMMAND_NAMES.get(self.command_field, f"command 0x{self.command_field:04X}")


# (element number, Command attribute, VR). Ascending element order is the
# encoding order (PS3.5 7.1: elements in a data set are in ascending tag order).
_ELEMENTS: tuple[tuple[int, str, str], ...] = (
    (0x0002, "affected_sop_class_uid", "UI"),
    (0x0003, "requested_sop_class_uid", "UI"),
    (0x0100, "command_field", "US"),
    (0x0110, "message_id", "US"),
    (0x0120, "message_id_being_responded_to", "US"),
    (0x0600, "move_destination", "AE"),
    (0x0700, "priority", "US"),
    (0x0800, "command_data_set_type", "US"),
    (0x0900, "status", "US"),
    (0x0901, "offending_element", "AT"),
    (0x0902, "error_comment", "LO"),
    (0x0903, "error_id", "US"),
    (0x1000, "affected_sop_instance_uid", "UI"),
    (0x1001, "requested_sop_instance_uid", "UI"),
    (0x1020, "remaining", "US"),
    (0x1021, "completed", "US"),
    (0x1022, "failed", "US"),
    (0x1023, "warning", "US"),
    (0x1030, "move_originator_ae", "AE"),
    (0x1031, "move_originator_message_id", "US"),
)
_BY_ELEMENT = {element: (name, vr) for element, name, vr in _ELEMENTS}


def _encode_value(value: object, vr: str) -> bytes:
    if vr == "US":
        return _US.pack(value)
    if vr == "AT":
        # Each tag as group, element (two little-endian uint16).
        return b"".join(struct.pack("<HH", tag >> 16, tag & 0xFFFF) for tag in value)  # type: ignore[attr-defined]
    raw = str(value).encode("ascii")
    if len(raw) % 2:
        # PS3.5 6.2: UI pads with NUL, the text VRs with a space, to even length.
        raw += b"\0" if vr == "UI" else b" "
    return raw


def encode_command(command: Command) -> bytes:
    """Encode ``command`` as group 0000 in implicit VR little endian.

    Includes the Command Group Length (0000,0000). Raises :class:`ValueError`
    (or :class:`struct.error` for a number out of range) for values we should
    not have built: these are our bugs, not the peer's.
    """
    parts = []
    for element, name, vr in _ELEMENTS:
        value = getattr(command, name)
        if value is None:
            continue
        encoded = _encode_value(value, vr)
        parts.append(_ELEMENT.pack(0x0000, element, len(encoded)))
        parts.append(encoded)
    body = b"".join(parts)
    return _ELEMENT.pack(0x0000, 0x0000, 4) + _UL.pack(len(body)) + body


def decode_command(data: bytes | bytearray | memoryview) -> Command:
    """Decode a command set; every malformation raises :class:`ProtocolError`."""
    view = memoryview(data)
    if view.ndim != 1 or view.itemsize != 1:
        view = view.cast("B")
    end = len(view)
    offset = 0
    last_element = -1
    values: dict[str, object] = {}
    while offset < end:
        if end - offset < _ELEMENT.size:
            raise ProtocolError(
                f"the peer's command set ends {end - offset} bytes into an element header "
                "(8 bytes)",
                abort_reason=INVALID_PARAMETER,
            )
        group, element, length = _ELEMENT.unpack_from(view, offset)
        offset += _ELEMENT.size
        if group != 0x0000:
            raise ProtocolError(
                f"the peer's command set holds element ({group:04X},{element:04X}); a "
                "command set is group 0000 only",
                abort_reason=INVALID_PARAMETER,
            )
        if element <= last_element:
            raise ProtocolError(
                f"the peer's command set has element (0000,{element:04X}) after "
                f"(0000,{last_element:04X}); elements must ascend",
                abort_reason=INVALID_PARAMETER,
            )
        last_element = element
        if length > end - offset:
            raise ProtocolError(
                f"element (0000,{element:04X}) of the peer's command set says {length} "
                f"bytes, but only {end - offset} remain",
                abort_reason=INVALID_PARAMETER,
            )
        value = view[offset : offset + length]
        offset += length
        if element == 0x0000:
            if length != 4:
                raise ProtocolError(
                    f"the peer's Command Group Length has {length} bytes; it is 4",
                    abort_reason=INVALID_PARAMETER,
                )
            (group_length,) = _UL.unpack(value)
            if group_length != end - offset:
                raise ProtocolError(
                    f"the peer's Command Group Length says {group_length} bytes, but "
                    f"{end - offset} follow it",
                    abort_reason=INVALID_PARAMETER,
                )
            continue
        known = _BY_ELEMENT.get(element)
        if known is None:
            continue  # retired or N-service element: not ours to interpret
        name, vr = known
        values[name] = _decode_value(value, vr, element)
    for required, tag in (
        ("command_field", "(0000,0100) Command Field"),
        ("command_data_set_type", "(0000,0800) Command Data Set Type"),
    ):
        if required not in values:
            raise ProtocolError(
                f"the peer's command set has no {tag}", abort_reason=INVALID_PARAMETER
            )
    return Command(**values)  # type: ignore[arg-type]


def _decode_value(value: memoryview, vr: str, element: int) -> object:
    if vr == "US":
        if len(value) != 2:
            raise ProtocolError(
                f"element (0000,{element:04X}) of the peer's command set is US (2 bytes) "
                f"but has {len(value)}",
                abort_reason=INVALID_PARAMETER,
            )
        return _US.unpack(value)[0]
    if vr == "AT":
        if len(value) % 4:
            raise ProtocolError(
                f"element (0000,{element:04X}) of the peer's command set is AT (4 bytes "
                f"each) but has {len(value)}",
                abort_reason=INVALID_PARAMETER,
            )
        return tuple((group << 16) | elem for group, elem in struct.iter_unpack("<HH", value))
    if len(value) > _MAX_TEXT:
        raise ProtocolError(
            f"element (0000,{element:04X}) of the peer's command set has {len(value)} "
            f"bytes; a {vr} is far shorter",
            abort_reason=INVALID_PARAMETER,
        )
    # Error comments from real peers are sometimes Latin-1; never fail on them.
    text = bytes(value).decode("ascii" if vr != "LO" else "latin-1", errors="replace")
    return text.strip("\0 ") if vr != "LO" else text.rstrip("\0 ")


# ------------------------------------------------------------------- constructors


def c_echo_rq(message_id: int, sop_class_uid: str = "1.2.840.10008.1.1") -> Command:
    """C-ECHO-RQ (PS3.7 9.3.5.1)."""
    return Command(C_ECHO_RQ, NO_DATASET, message_id, affected_sop_class_uid=sop_class_uid)


def c_echo_rsp(
    responding_to: int, status: int = 0x0000, sop_class_uid: str = "1.2.840.10008.1.1"
) -> Command:
    """C-ECHO-RSP (PS3.7 9.3.5.2)."""
    return Command(
        C_ECHO_RSP,
        NO_DATASET,
        message_id_being_responded_to=responding_to,
        affected_sop_class_uid=sop_class_uid,
        status=status,
    )


def c_find_rq(message_id: int, sop_class_uid: str, priority: int = 0) -> Command:
    """C-FIND-RQ (PS3.7 9.3.2.1); the identifier follows as the data set."""
    return Command(
        C_FIND_RQ,
        DATASET_PRESENT,
        message_id,
        affected_sop_class_uid=sop_class_uid,
        priority=priority,
    )


def c_find_rsp(
    responding_to: int, sop_class_uid: str, status: int, *, has_dataset: bool = False
) -> Command:
    """C-FIND-RSP (PS3.7 9.3.2.2); pending responses carry an identifier."""
    return Command(
        C_FIND_RSP,
        DATASET_PRESENT if has_dataset else NO_DATASET,
        message_id_being_responded_to=responding_to,
        affected_sop_class_uid=sop_class_uid,
        status=status,
    )


def c_cancel_rq(responding_to: int) -> Command:
    """C-CANCEL-RQ (PS3.7 9.3.2.3): cancels the C-FIND/C-GET/C-MOVE with that ID."""
    return Command(C_CANCEL_RQ, NO_DATASET, message_id_being_responded_to=responding_to)


def c_get_rq(message_id: int, sop_class_uid: str, priority: int = 0) -> Command:
    """C-GET-RQ (PS3.7 9.3.3.1); the identifier follows as the data set."""
    return Command(
        C_GET_RQ,
        DATASET_PRESENT,
        message_id,
        affected_sop_class_uid=sop_class_uid,
        priority=priority,
    )


def c_move_rq(message_id: int, sop_class_uid: str, destination: str, priority: int = 0) -> Command:
    """C-MOVE-RQ (PS3.7 9.3.4.1); the identifier follows as the data set."""
    return Command(
        C_MOVE_RQ,
        DATASET_PRESENT,
        message_id,
        affected_sop_class_uid=sop_class_uid,
        move_destination=destination,
        priority=priority,
    )


#: Sub-operation counts of a C-GET/C-MOVE response: remaining, completed,
#: failed, warning (``None``: absent, as in a final response that omits one).
Counts = tuple[int | None, int | None, int | None, int | None]
_NO_COUNTS: Counts = (None, None, None, None)


def _retrieve_rsp(
    field: int,
    responding_to: int,
    sop_class_uid: str,
    status: int,
    counts: Counts,
    has_dataset: bool,
) -> Command:
    remaining, completed, failed, warning = counts
    return Command(
        field,
        DATASET_PRESENT if has_dataset else NO_DATASET,
        message_id_being_responded_to=responding_to,
        affected_sop_class_uid=sop_class_uid,
        status=status,
        remaining=remaining,
        completed=completed,
        failed=failed,
        warning=warning,
    )


def c_get_rsp(
    responding_to: int,
    sop_class_uid: str,
    status: int,
    counts: Counts = _NO_COUNTS,
    *,
    has_dataset: bool = False,
) -> Command:
    """C-GET-RSP (PS3.7 9.3.3.2); ``counts`` is (remaining, completed, failed, warning)."""
    return _retrieve_rsp(C_GET_RSP, responding_to, sop_class_uid, status, counts, has_dataset)


def c_move_rsp(
    responding_to: int,
    sop_class_uid: str,
    status: int,
    counts: Counts = _NO_COUNTS,
    *,
    has_dataset: bool = False,
) -> Command:
    """C-MOVE-RSP (PS3.7 9.3.4.2); ``counts`` is (remaining, completed, failed, warning)."""
    return _retrieve_rsp(C_MOVE_RSP, responding_to, sop_class_uid, status, counts, has_dataset)


def c_store_rq(
    message_id: int,
    sop_class_uid: str,
    sop_instance_uid: str,
    priority: int = 0,
    *,
    move_originator_ae: str | None = None,
    move_originator_message_id: int | None = None,
) -> Command:
    """C-STORE-RQ (PS3.7 9.3.1.1); the object follows as the data set."""
    return Command(
        C_STORE_RQ,
        DATASET_PRESENT,
        message_id,
        affected_sop_class_uid=sop_class_uid,
        priority=priority,
        affected_sop_instance_uid=sop_instance_uid,
        move_originator_ae=move_originator_ae,
        move_originator_message_id=move_originator_message_id,
    )


def c_store_rsp(
    responding_to: int,
    sop_class_uid: str,
    sop_instance_uid: str,
    status: int = 0x0000,
    error_comment: str | None = None,
) -> Command:
    """C-STORE-RSP (PS3.7 9.3.1.2)."""
    return Command(
        C_STORE_RSP,
        NO_DATASET,
        message_id_being_responded_to=responding_to,
        affected_sop_class_uid=sop_class_uid,
        status=status,
        error_comment=error_comment,
        affected_sop_instance_uid=sop_instance_uid,
    )


class StoreResponseTemplate:
    """C-STORE-RSP bytes from a template: a storage SCP answers every object.

    The elements that never change (Command Field, Command Data Set Type) are
    encoded once; per object only the message ID, the status and the two UIDs
    are packed. The bytes equal :func:`encode_command` of :func:`c_store_rsp`.

    Examples
    --------
    >>> template = StoreResponseTemplate()
    >>> data = template.encode(3, "1.2.840.10008.5.1.4.1.1.2", "1.2.3.4", 0x0000)
    >>> data == encode_command(c_store_rsp(3, "1.2.840.10008.5.1.4.1.1.2", "1.2.3.4"))
    True
    """

    _FIELD = _ELEMENT.pack(0, 0x0100, 2) + _US.pack(C_STORE_RSP)
    _MSG = struct.Struct("<HHLH")
    _TYPE_STATUS = struct.Struct("<HHLHHHLH")

    def encode(
        self, responding_to: int, sop_class_uid: str, sop_instance_uid: str, status: int
    ) -> bytes:
        """The C-STORE-RSP command set for one object."""
        cls = _encode_value(sop_class_uid, "UI")
        inst = _encode_value(sop_instance_uid, "UI")
        body = b"".join(
            (
                _ELEMENT.pack(0, 0x0002, len(cls)),
                cls,
                self._FIELD,
                self._MSG.pack(0, 0x0120, 2, responding_to),
                self._TYPE_STATUS.pack(0, 0x0800, 2, NO_DATASET, 0, 0x0900, 2, status),
                _ELEMENT.pack(0, 0x1000, len(inst)),
                inst,
            )
        )
        return _ELEMENT.pack(0, 0, 4) + _UL.pack(len(body)) + body
