"""PS3.8 protocol data units: plain values, encoded and decoded with :mod:`struct`.

Each PDU is a small frozen dataclass. :func:`encode` turns one into bytes and
:func:`decode` turns the bytes of exactly one PDU back into its dataclass.
:func:`pdu_header` reads the 6-byte header that starts every PDU, which is what
a stream reader needs to know how many bytes to wait for.

Decoding is strict and bounded: every length is checked against the bytes that
are really there before anything is read, so a malformed PDU (truncated, a
length that overruns its parent, an unknown PDU type, a PDV longer than its
PDU, a PDU over the announced maximum) raises :class:`ProtocolError` with a
sentence, never a :class:`struct.error` or an :class:`IndexError`. Unknown
*items* inside the A-ASSOCIATE PDUs and unknown user-information sub-items are
skipped, as PS3.8 9.3.1 asks, so a peer that negotiates extensions we do not
use (user identity, asynchronous operations, extended negotiation) still works.

Examples
--------
>>> from pacsframe.net import pdu
>>> data = pdu.encode(pdu.ReleaseRQ())
>>> data
b'\\x05\\x00\\x00\\x00\\x00\\x04\\x00\\x00\\x00\\x00'
>>> pdu.decode(data)
ReleaseRQ()
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

from pacsframe.errors import ProtocolError

__all__ = [
    "APPLICATION_CONTEXT",
    "MAX_ASSOCIATE_PDU",
    "PDU",
    "PDV",
    "Abort",
    "AssociateAC",
    "AssociateRJ",
    "AssociateRQ",
    "PDataTF",
    "PresentationContextAC",
    "PresentationContextRQ",
    "ReleaseRP",
    "ReleaseRQ",
    "RoleSelection",
    "UserInformation",
    "decode",
    "encode",
    "pdu_header",
]

#: The DICOM application context name (PS3.7 A.2.1), the only one in use.
APPLICATION_CONTEXT = "1.2.840.10008.3.1.1.1"

#: Upper bound on the size of any PDU other than P-DATA-TF (whose bound is the
#: negotiated maximum length). A-ASSOCIATE-RQ with 128 contexts of 10 transfer
#: syntaxes each is about 90 kB; 1 MiB leaves room and still bounds memory.
MAX_ASSOCIATE_PDU = 1 << 20

# PDU types (PS3.8 9.3).
_ASSOCIATE_RQ = 0x01
_ASSOCIATE_AC = 0x02
_ASSOCIATE_RJ = 0x03
_P_DATA_TF = 0x04
_RELEASE_RQ = 0x05
_RELEASE_RP = 0x06
_ABORT = 0x07

# Item types inside A-ASSOCIATE-RQ/AC (PS3.8 9.3.2, 9.3.3, Annex D).
_ITEM_APPLICATION_CONTEXT = 0x10
_ITEM_CONTEXT_RQ = 0x20
_ITEM_CONTEXT_AC = 0x21
_ITEM_ABSTRACT_SYNTAX = 0x30
_ITEM_TRANSFER_SYNTAX = 0x40
_ITEM_USER_INFORMATION = 0x50
_SUB_MAX_LENGTH = 0x51
_SUB_IMPLEMENTATION_CLASS = 0x52
_SUB_ROLE_SELECTION = 0x54
_SUB_IMPLEMENTATION_VERSION = 0x55

_HEADER = struct.Struct(">BxL")  # PDU type, reserved, length of the rest
_ITEM = struct.Struct(">BxH")  # item type, reserved, item length
_ASSOCIATE_FIXED = struct.Struct(">Hxx16s16s32x")  # version, reserved, AEs, reserved
_FOUR_BYTES = struct.Struct(">xBBB")  # RJ and A-ABORT: reserved, then three codes
_PDV_HEADER = struct.Struct(">LBB")  # item length, context ID, message control header
_UINT32 = struct.Struct(">L")
_UINT16 = struct.Struct(">H")

PDU_NAMES = {
    _ASSOCIATE_RQ: "A-ASSOCIATE-RQ",
    _ASSOCIATE_AC: "A-ASSOCIATE-AC",
    _ASSOCIATE_RJ: "A-ASSOCIATE-RJ",
    _P_DATA_TF: "P-DATA-TF",
    _RELEASE_RQ: "A-RELEASE-RQ",
    _RELEASE_RP: "A-RELEASE-RP",
    _ABORT: "A-ABORT",
}

# A-ABORT reason codes (PS3.8 9.3.8), used in ProtocolError.abort_reason.
UNRECOGNIZED_PDU = 1
UNEXPECTED_PDU = 2
UNRECOGNIZED_PARAMETER = 4
UNEXPECTED_PARAMETER = 5
INVALID_PARAMETER = 6


@dataclass(frozen=True)
class PresentationContextRQ:
    """A proposed presentation context: an abstract syntax and transfer syntaxes.

    ``context_id`` is odd, 1 to 255 (PS3.8 9.3.2.2).
    """

    context_id: int
    abstract_syntax: str
    transfer_syntaxes: tuple[str, ...]


@dataclass(frozen=True)
class PresentationContextAC:
    """The acceptor's answer for one proposed context.

    ``result`` is 0 acceptance, 1 user rejection, 2 no reason, 3 abstract syntax
    not supported, 4 transfer syntaxes not supported (PS3.8 9.3.3.2).
    ``transfer_syntax`` is the one chosen; PS3.8 says it is not significant
    unless the context was accepted.
    """

    context_id: int
    result: int
    transfer_syntax: str = ""

    @property
    def accepted(self) -> bool:
        """Whether the acceptor accepted this context."""
        return self.result == 0


@dataclass(frozen=True)
class RoleSelection:
    """SCP/SCU role selection for one SOP class (PS3.7 D.3.3.4).

    C-GET needs it: the requestor proposes to act as SCP for the storage SOP
    classes it wants to receive.
    """

    sop_class_uid: str
    scu_role: bool
    scp_role: bool


@dataclass(frozen=True)
class UserInformation:
    """The user information item: the sub-items pacsframe uses.

    ``max_length`` is the largest P-DATA-TF variable field the sender accepts
    (0: no limit). Sub-items not listed here are skipped when decoding.
    """

    max_length: int = 0
    implementation_class_uid: str = ""
    implementation_version_name: str = ""
    roles: tuple[RoleSelection, ...] = ()


@dataclass(frozen=True)
class AssociateRQ:
    """A-ASSOCIATE-RQ (PS3.8 9.3.2)."""

    called_ae: str
    calling_ae: str
    contexts: tuple[PresentationContextRQ, ...]
    user_information: UserInformation = field(default_factory=UserInformation)
    application_context: str = APPLICATION_CONTEXT
    protocol_version: int = 1


@dataclass(frozen=True)
class AssociateAC:
    """A-ASSOCIATE-AC (PS3.8 9.3.3).

    The AE title fields are echoed from the request and, per PS3.8, not tested.
    """

    called_ae: str
    calling_ae: str
    contexts: tuple[PresentationContextAC, ...]
    user_information: UserInformation = field(default_factory=UserInformation)
    application_context: str = APPLICATION_CONTEXT
    protocol_version: int = 1


@dataclass(frozen=True)
class AssociateRJ:
    """A-ASSOCIATE-RJ (PS3.8 9.3.4).

    ``result`` 1 permanent, 2 transient. ``source`` 1 service user, 2 service
    provider (ACSE), 3 service provider (presentation). ``reason`` depends on
    the source; see :func:`pacsframe.net.association.describe_rejection`.
    """

    result: int
    source: int
    reason: int


@dataclass(frozen=True)
class PDV:
    """A presentation data value item: one fragment of a command or a data set.

    ``is_command`` is bit 0 of the message control header, ``is_last`` bit 1.
    ``data`` may be a memoryview into the received PDU, so a large fragment is
    not copied before it reaches its destination.
    """

    context_id: int
    is_command: bool
    is_last: bool
    data: bytes | memoryview


@dataclass(frozen=True)
class PDataTF:
    """P-DATA-TF (PS3.8 9.3.5): one or more PDVs."""

    pdvs: tuple[PDV, ...]


@dataclass(frozen=True)
class ReleaseRQ:
    """A-RELEASE-RQ (PS3.8 9.3.6)."""


@dataclass(frozen=True)
class ReleaseRP:
    """A-RELEASE-RP (PS3.8 9.3.7)."""


@dataclass(frozen=True)
class Abort:
    """A-ABORT (PS3.8 9.3.8).

    ``source`` 0 service user, 2 service provider; ``reason`` is significant
    only for source 2 (see the ``*_PDU``/``*_PARAMETER`` constants).
    """

    source: int = 0
    reason: int = 0


PDU = AssociateRQ | AssociateAC | AssociateRJ | PDataTF | ReleaseRQ | ReleaseRP | Abort


# --------------------------------------------------------------------------- encoding


def _ae(title: str) -> bytes:
    raw = title.encode("ascii")
    if not raw.strip() or len(raw) > 16:
        raise ValueError(f"AE title {title!r} must be 1 to 16 ASCII characters")
    return raw.ljust(16, b" ")


def _item(item_type: int, value: bytes) -> bytes:
    if len(value) > 0xFFFF:
        raise ValueError(f"item 0x{item_type:02X} is {len(value)} bytes; at most 65535 fit")
    return _ITEM.pack(item_type, len(value)) + value


def _uid(uid: str) -> bytes:
    # PS3.8 Annex F: UIDs in items are not padded to even length.
    return uid.encode("ascii")


def _user_information(info: UserInformation) -> bytes:
    parts = [_item(_SUB_MAX_LENGTH, _UINT32.pack(info.max_length))]
    if info.implementation_class_uid:
        parts.append(_item(_SUB_IMPLEMENTATION_CLASS, _uid(info.implementation_class_uid)))
    for role in info.roles:
        uid = _uid(role.sop_class_uid)
        parts.append(
            _item(
                _SUB_ROLE_SELECTION,
                _UINT16.pack(len(uid)) + uid + bytes((role.scu_role, role.scp_role)),
            )
        )
    if info.implementation_version_name:
        name = info.implementation_version_name.encode("ascii")
        if not 1 <= len(name) <= 16:
            raise ValueError("the implementation version name must be 1 to 16 characters")
        parts.append(_item(_SUB_IMPLEMENTATION_VERSION, name))
    return _item(_ITEM_USER_INFORMATION, b"".join(parts))


def _associate(pdu_type: int, pdu: AssociateRQ | AssociateAC) -> bytes:
    parts = [
        _ASSOCIATE_FIXED.pack(pdu.protocol_version, _ae(pdu.called_ae), _ae(pdu.calling_ae)),
        _item(_ITEM_APPLICATION_CONTEXT, _uid(pdu.application_context)),
    ]
    for cx in pdu.contexts:
        if isinstance(cx, PresentationContextRQ):
            sub = [_item(_ITEM_ABSTRACT_SYNTAX, _uid(cx.abstract_syntax))]
            sub += [_item(_ITEM_TRANSFER_SYNTAX, _uid(ts)) for ts in cx.transfer_syntaxes]
            body = bytes((cx.context_id, 0, 0, 0)) + b"".join(sub)
            parts.append(_item(_ITEM_CONTEXT_RQ, body))
        else:
            body = bytes((cx.context_id, 0, cx.result, 0))
            body += _item(_ITEM_TRANSFER_SYNTAX, _uid(cx.transfer_syntax))
            parts.append(_item(_ITEM_CONTEXT_AC, body))
    parts.append(_user_information(pdu.user_information))
    body = b"".join(parts)
    return _HEADER.pack(pdu_type, len(body)) + body


def encode_pdv_header(context_id: int, is_command: bool, is_last: bool, length: int) -> bytes:
    """The 12 bytes before a single-PDV P-DATA-TF's data of ``length`` bytes.

    PDU header (6) plus PDV item header (6). The driver sends these and the data
    separately, so a large fragment is never copied into a new bytes object.
    """
    return _HEADER.pack(_P_DATA_TF, length + 6) + _PDV_HEADER.pack(
        length + 2, context_id, is_command | (is_last << 1)
    )


def encode(pdu: PDU) -> bytes:
    """Encode one PDU to bytes.

    Raises :class:`ValueError` (our own mistake, not the peer's) for values that
    cannot be encoded: an AE title over 16 characters, an item over 64 KiB.
    """
    if isinstance(pdu, PDataTF):
        parts = []
        for pdv in pdu.pdvs:
            parts.append(
                _PDV_HEADER.pack(
                    len(pdv.data) + 2, pdv.context_id, pdv.is_command | (pdv.is_last << 1)
                )
            )
            parts.append(bytes(pdv.data))
        body = b"".join(parts)
        return _HEADER.pack(_P_DATA_TF, len(body)) + body
    if isinstance(pdu, AssociateRQ):
        return _associate(_ASSOCIATE_RQ, pdu)
    if isinstance(pdu, AssociateAC):
        return _associate(_ASSOCIATE_AC, pdu)
    if isinstance(pdu, AssociateRJ):
        return _HEADER.pack(_ASSOCIATE_RJ, 4) + _FOUR_BYTES.pack(
            pdu.result, pdu.source, pdu.reason
        )
    if isinstance(pdu, ReleaseRQ):
        return _HEADER.pack(_RELEASE_RQ, 4) + bytes(4)
    if isinstance(pdu, ReleaseRP):
        return _HEADER.pack(_RELEASE_RP, 4) + bytes(4)
    if isinstance(pdu, Abort):
        return _HEADER.pack(_ABORT, 4) + _FOUR_BYTES.pack(0, pdu.source, pdu.reason)
    raise TypeError(f"not a PDU: {pdu!r}")


# --------------------------------------------------------------------------- decoding


def pdu_header(data: bytes | bytearray | memoryview, max_pdata: int = 0) -> tuple[int, int]:
    """Read and check the header of the PDU at the start of ``data``.

    Parameters
    ----------
    data : bytes-like
        At least 6 bytes.
    max_pdata : int, default 0
        The maximum P-DATA-TF length we announced (0: no limit of ours; the
        1 MiB bound of the other PDU types still applies to them).

    Returns
    -------
    (pdu_type, length) : tuple of int
        ``length`` is the number of bytes after the 6-byte header.

    Raises
    ------
    ProtocolError
        Unknown PDU type, a P-DATA-TF over ``max_pdata``, another PDU over
        :data:`MAX_ASSOCIATE_PDU` or a fixed-size PDU of the wrong length.
    """
    if len(data) < _HEADER.size:
        raise ProtocolError(
            f"a PDU header is 6 bytes; only {len(data)} were given",
            abort_reason=INVALID_PARAMETER,
        )
    pdu_type, length = _HEADER.unpack_from(data)
    name = PDU_NAMES.get(pdu_type)
    if name is None:
        raise ProtocolError(
            f"the peer sent an unknown PDU type 0x{pdu_type:02X}; DICOM defines 0x01 to 0x07",
            abort_reason=UNRECOGNIZED_PDU,
        )
    if pdu_type == _P_DATA_TF:
        if max_pdata and length > max_pdata:
            raise ProtocolError(
                f"the peer sent a P-DATA-TF of {length} bytes, over the maximum PDU "
                f"length of {max_pdata} we announced",
                abort_reason=INVALID_PARAMETER,
            )
    elif pdu_type in (_ASSOCIATE_RQ, _ASSOCIATE_AC):
        if length > MAX_ASSOCIATE_PDU:
            raise ProtocolError(
                f"the peer sent an {name} of {length} bytes; pacsframe accepts at most "
                f"{MAX_ASSOCIATE_PDU}",
                abort_reason=INVALID_PARAMETER,
            )
    elif length != 4:
        raise ProtocolError(
            f"the peer sent an {name} with length {length}; it is always 4",
            abort_reason=INVALID_PARAMETER,
        )
    return pdu_type, length


def decode(data: bytes | bytearray | memoryview, max_pdata: int = 0) -> PDU:
    """Decode exactly one PDU.

    ``data`` must hold the whole PDU and nothing else. ``max_pdata`` is as in
    :func:`pdu_header`. Every malformation raises :class:`ProtocolError`.
    """
    view = memoryview(data)
    if view.ndim != 1 or view.itemsize != 1:
        view = view.cast("B")
    pdu_type, length = pdu_header(view, max_pdata)
    name = PDU_NAMES[pdu_type]
    if len(view) - 6 != length:
        raise ProtocolError(
            f"the peer's {name} says it has {length} bytes after its header, but "
            f"{len(view) - 6} arrived",
            abort_reason=INVALID_PARAMETER,
        )
    body = view[6:]
    if pdu_type == _P_DATA_TF:
        return _decode_pdata(body)
    if pdu_type in (_ASSOCIATE_RQ, _ASSOCIATE_AC):
        return _decode_associate(pdu_type, body)
    if pdu_type == _ASSOCIATE_RJ:
        result, source, reason = _FOUR_BYTES.unpack(body)
        return AssociateRJ(result, source, reason)
    if pdu_type == _RELEASE_RQ:
        return ReleaseRQ()
    if pdu_type == _RELEASE_RP:
        return ReleaseRP()
    _, source, reason = _FOUR_BYTES.unpack(body)
    return Abort(source, reason)


def _decode_pdata(body: memoryview) -> PDataTF:
    pdvs = []
    offset, end = 0, len(body)
    if end == 0:
        raise ProtocolError(
            "the peer sent a P-DATA-TF with no PDV item", abort_reason=INVALID_PARAMETER
        )
    while offset < end:
        if end - offset < _PDV_HEADER.size:
            raise ProtocolError(
                f"the peer's P-DATA-TF ends {end - offset} bytes into a PDV item header (6 bytes)",
                abort_reason=INVALID_PARAMETER,
            )
        length, context_id, control = _PDV_HEADER.unpack_from(body, offset)
        if length < 2:
            raise ProtocolError(
                f"the peer sent a PDV item of length {length}; at least 2 (context ID and "
                "message control header)",
                abort_reason=INVALID_PARAMETER,
            )
        if offset + 4 + length > end:
            raise ProtocolError(
                f"the peer sent a PDV of {length} bytes in a P-DATA-TF with only "
                f"{end - offset - 4} left",
                abort_reason=INVALID_PARAMETER,
            )
        if control > 0x03:
            raise ProtocolError(
                f"the peer sent a PDV message control header 0x{control:02X}; only its two "
                "low bits are defined",
                abort_reason=INVALID_PARAMETER,
            )
        data = body[offset + _PDV_HEADER.size : offset + 4 + length]
        pdvs.append(PDV(context_id, bool(control & 1), bool(control & 2), data))
        offset += 4 + length
    return PDataTF(tuple(pdvs))


def _items(body: memoryview, where: str) -> list[tuple[int, memoryview]]:
    """Split ``body`` into (item type, value) pairs, checking every length."""
    items = []
    offset, end = 0, len(body)
    while offset < end:
        if end - offset < _ITEM.size:
            raise ProtocolError(
                f"{where} ends {end - offset} bytes into an item header (4 bytes)",
                abort_reason=INVALID_PARAMETER,
            )
        item_type, length = _ITEM.unpack_from(body, offset)
        if offset + 4 + length > end:
            raise ProtocolError(
                f"item 0x{item_type:02X} in {where} says {length} bytes, but only "
                f"{end - offset - 4} remain",
                abort_reason=INVALID_PARAMETER,
            )
        items.append((item_type, body[offset + 4 : offset + 4 + length]))
        offset += 4 + length
    return items


def _text(value: memoryview, what: str) -> str:
    try:
        text = bytes(value).decode("ascii")
    except UnicodeDecodeError:
        raise ProtocolError(
            f"the peer sent a {what} that is not ASCII: {bytes(value)[:64]!r}",
            abort_reason=INVALID_PARAMETER,
        ) from None
    # Some peers pad UIDs with NUL or space to even length; neither is significant.
    return text.strip("\0 ")


def _decode_associate(pdu_type: int, body: memoryview) -> AssociateRQ | AssociateAC:
    name = PDU_NAMES[pdu_type]
    if len(body) < _ASSOCIATE_FIXED.size:
        raise ProtocolError(
            f"the peer's {name} has {len(body)} bytes; its fixed part alone is 68",
            abort_reason=INVALID_PARAMETER,
        )
    version, called, calling = _ASSOCIATE_FIXED.unpack_from(body)
    called_ae = _text(memoryview(called), "called AE title")
    calling_ae = _text(memoryview(calling), "calling AE title")
    application_context = ""
    user_information = None
    rq_contexts: list[PresentationContextRQ] = []
    ac_contexts: list[PresentationContextAC] = []
    for item_type, value in _items(body[_ASSOCIATE_FIXED.size :], name):
        if item_type == _ITEM_APPLICATION_CONTEXT:
            application_context = _text(value, "application context name")
        elif item_type == _ITEM_CONTEXT_RQ and pdu_type == _ASSOCIATE_RQ:
            rq_contexts.append(_decode_context_rq(value))
        elif item_type == _ITEM_CONTEXT_AC and pdu_type == _ASSOCIATE_AC:
            ac_contexts.append(_decode_context_ac(value))
        elif item_type == _ITEM_USER_INFORMATION:
            user_information = _decode_user_information(value)
        elif item_type in (_ITEM_CONTEXT_RQ, _ITEM_CONTEXT_AC):
            raise ProtocolError(
                f"the peer's {name} holds a presentation context item of type "
                f"0x{item_type:02X}, which belongs in the other kind of A-ASSOCIATE PDU",
                abort_reason=UNEXPECTED_PARAMETER,
            )
        # Other item types are reserved; PS3.8 9.3.1 says to ignore them.
    if not application_context:
        raise ProtocolError(
            f"the peer's {name} has no application context name item",
            abort_reason=INVALID_PARAMETER,
        )
    if user_information is None:
        raise ProtocolError(
            f"the peer's {name} has no user information item (it must carry the maximum length)",
            abort_reason=INVALID_PARAMETER,
        )
    if pdu_type == _ASSOCIATE_RQ:
        return AssociateRQ(
            called_ae,
            calling_ae,
            tuple(rq_contexts),
            user_information,
            application_context,
            version,
        )
    return AssociateAC(
        called_ae, calling_ae, tuple(ac_contexts), user_information, application_context, version
    )


def _context_fixed(value: memoryview, what: str) -> tuple[int, int]:
    if len(value) < 4:
        raise ProtocolError(
            f"the peer sent a {what} item of {len(value)} bytes; its fixed part is 4",
            abort_reason=INVALID_PARAMETER,
        )
    return value[0], value[2]


def _decode_context_rq(value: memoryview) -> PresentationContextRQ:
    context_id, _ = _context_fixed(value, "presentation context")
    abstract = ""
    transfer: list[str] = []
    for sub_type, sub in _items(value[4:], f"presentation context {context_id}"):
        if sub_type == _ITEM_ABSTRACT_SYNTAX:
            abstract = _text(sub, "abstract syntax")
        elif sub_type == _ITEM_TRANSFER_SYNTAX:
            transfer.append(_text(sub, "transfer syntax"))
    return PresentationContextRQ(context_id, abstract, tuple(transfer))


def _decode_context_ac(value: memoryview) -> PresentationContextAC:
    context_id, result = _context_fixed(value, "presentation context")
    transfer = ""
    for sub_type, sub in _items(value[4:], f"presentation context {context_id}"):
        if sub_type == _ITEM_TRANSFER_SYNTAX:
            transfer = _text(sub, "transfer syntax")
    return PresentationContextAC(context_id, result, transfer)


def _decode_user_information(value: memoryview) -> UserInformation:
    max_length = None
    class_uid = version_name = ""
    roles: list[RoleSelection] = []
    for sub_type, sub in _items(value, "the user information item"):
        if sub_type == _SUB_MAX_LENGTH:
            if len(sub) != 4:
                raise ProtocolError(
                    f"the peer's maximum length sub-item has {len(sub)} bytes; it is 4",
                    abort_reason=INVALID_PARAMETER,
                )
            (max_length,) = _UINT32.unpack(sub)
        elif sub_type == _SUB_IMPLEMENTATION_CLASS:
            class_uid = _text(sub, "implementation class UID")
        elif sub_type == _SUB_IMPLEMENTATION_VERSION:
            version_name = _text(sub, "implementation version name")
        elif sub_type == _SUB_ROLE_SELECTION:
            if len(sub) < 2:
                raise ProtocolError(
                    "the peer's role selection sub-item is shorter than its UID length field",
                    abort_reason=INVALID_PARAMETER,
                )
            (uid_length,) = _UINT16.unpack_from(sub)
            if len(sub) != 2 + uid_length + 2:
                raise ProtocolError(
                    f"the peer's role selection sub-item has {len(sub)} bytes for a UID of "
                    f"{uid_length}; it must have {uid_length + 4}",
                    abort_reason=INVALID_PARAMETER,
                )
            uid = _text(sub[2 : 2 + uid_length], "role selection SOP class UID")
            roles.append(RoleSelection(uid, bool(sub[-2]), bool(sub[-1])))
        # Other sub-items (asynchronous operations, extended negotiation, user
        # identity, ...) are skipped: pacsframe does not negotiate them.
    if max_length is None:
        raise ProtocolError(
            "the peer's user information item has no maximum length sub-item",
            abort_reason=INVALID_PARAMETER,
        )
    return UserInformation(max_length, class_uid, version_name, tuple(roles))
