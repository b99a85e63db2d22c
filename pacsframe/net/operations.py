"""C-STORE, C-GET and C-MOVE over a :class:`~pacsframe.net.driver.ClientAssociation`.

The driver's methods :meth:`~pacsframe.net.driver.ClientAssociation.store`,
:meth:`~pacsframe.net.driver.ClientAssociation.get` and
:meth:`~pacsframe.net.driver.ClientAssociation.move` are thin doors into this
module, which holds what the three share and nothing of sockets:

- :func:`read_part10` finds a Part-10 file's dataset and the three UIDs of its
  file meta by reading group 0002 with :mod:`struct` (no pydicom), so C-STORE
  sends the file's own bytes after its meta.
- :func:`retrieve_negotiation` gives the presentation contexts and the SCP role
  selection items a C-GET association proposes.
- A C-GET's incoming objects go to an :class:`ObjectWriter` that the caller's
  ``on_store`` hands out per object: fragment by fragment, then ``commit`` or
  ``discard``. An object whose bytes did not all arrive is always discarded.
- Every C-GET-RSP and C-MOVE-RSP comes back as a :class:`RetrieveResponse`
  with its sub-operation counts.

Examples
--------
>>> contexts, roles = retrieve_negotiation(
...     "1.2.840.10008.5.1.4.1.2.2.3",
...     [("1.2.840.10008.5.1.4.1.1.2", ["1.2.840.10008.1.2.1"])],
... )
>>> [abstract for abstract, _ in contexts]
['1.2.840.10008.5.1.4.1.2.2.3', '1.2.840.10008.5.1.4.1.1.2']
>>> roles[0].scp_role, roles[0].scu_role
(True, False)
"""

from __future__ import annotations

import os
import struct
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import BinaryIO, Protocol

from pacsframe.net import pdu

__all__ = [
    "ObjectWriter",
    "Part10",
    "RetrieveResponse",
    "StoreRequest",
    "StoreWriterFactory",
    "read_part10",
    "retrieve_negotiation",
]

#: Statuses that end a C-GET/C-MOVE without failing it (PS3.4 C.4.2.1.5, C.4.3.1.4):
#: success, warning (some sub-operations failed), and cancelled.
FINAL_OK = frozenset({0x0000, 0xB000, 0xFE00})
PENDING = frozenset({0xFF00, 0xFF01})

#: C-STORE-RSP statuses our C-GET answers with when we cannot keep an object.
OUT_OF_RESOURCES = 0xA700
CANNOT_UNDERSTAND = 0xC000


@dataclass(frozen=True)
class RetrieveResponse:
    """One C-GET-RSP or C-MOVE-RSP.

    Attributes
    ----------
    status : int
        0xFF00 pending; a final status otherwise (0x0000, 0xB000, 0xFE00 are
        yielded, failures raise).
    remaining, completed, failed, warning : int or None
        The sub-operation counts, ``None`` where the peer left one out.
    identifier : bytes or None
        The data set the response carried, if any (a Failed SOP Instance UID
        List), in the retrieve context's transfer syntax.
    comment : str or None
        The peer's Error Comment.
    """

    status: int
    remaining: int | None
    completed: int | None
    failed: int | None
    warning: int | None
    identifier: bytes | None = None
    comment: str | None = None

    @property
    def pending(self) -> bool:
        """Whether more responses follow."""
        return self.status in PENDING


@dataclass(frozen=True)
class StoreRequest:
    """An incoming C-STORE sub-operation of a C-GET, before its data set arrives.

    Attributes
    ----------
    sop_class_uid, sop_instance_uid : str
        From the C-STORE-RQ (Affected SOP Class and Instance UIDs). Not
        validated: the peer chose them, so check them before they name a file.
    transfer_syntax : str
        The accepted context's transfer syntax: the data set's encoding.
    message_id : int
        The C-STORE-RQ's message ID.
    """

    sop_class_uid: str
    sop_instance_uid: str
    transfer_syntax: str
    message_id: int


class ObjectWriter(Protocol):
    """Where one received object's data set goes, fragment by fragment.

    ``write`` gets each fragment in order (a memoryview valid only during the
    call). Then exactly one of ``commit`` (every byte arrived; return the
    C-STORE-RSP status, ``None`` meaning 0x0000) or ``discard`` (the object is
    incomplete or refused: remove every trace of it) is called.
    """

    def write(self, data: memoryview, /) -> object:
        """Take the next fragment of the data set."""

    def commit(self) -> int | None:
        """The data set is complete; make it visible and return a status."""

    def discard(self) -> None:
        """The data set is incomplete; remove what was written."""


#: ``on_store`` of :meth:`ClientAssociation.get`: a writer per incoming object.
StoreWriterFactory = Callable[[StoreRequest], ObjectWriter]


def retrieve_negotiation(
    model_uid: str,
    storage: Iterable[tuple[str, Sequence[str]]],
    *,
    transfer_syntaxes: Sequence[str] = ("1.2.840.10008.1.2.1", "1.2.840.10008.1.2"),
) -> tuple[list[tuple[str, Sequence[str]]], list[pdu.RoleSelection]]:
    """Contexts and role items for a C-GET association.

    Parameters
    ----------
    model_uid : str
        The retrieve information model (e.g. Study Root C-GET), proposed first.
    storage : iterable of (storage SOP class, transfer syntaxes)
        The storage contexts to receive objects on. A SOP class may appear
        twice (uncompressed, then compressed syntaxes): the peer picks one
        syntax per context. Each SOP class gets one SCP role item (PS3.7
        D.3.3.4): we ask to be the SCP, the peer the SCU.
    transfer_syntaxes : sequence of str
        For the retrieve context itself.

    Returns
    -------
    contexts, roles
        For :func:`pacsframe.net.driver.associate`. At most 128 contexts fit
        in one association (PS3.8 9.3.2.2); ``associate`` says so when over.
    """
    contexts: list[tuple[str, Sequence[str]]] = [(model_uid, tuple(transfer_syntaxes))]
    classes: dict[str, None] = {}
    for sop_class, syntaxes in storage:
        contexts.append((sop_class, tuple(syntaxes)))
        classes[sop_class] = None
    roles = [pdu.RoleSelection(uid, scu_role=False, scp_role=True) for uid in classes]
    return contexts, roles


# ------------------------------------------------------------------ Part-10 files


@dataclass(frozen=True)
class Part10:
    """Where a Part-10 file's data set starts, and what its file meta says."""

    sop_class_uid: str
    sop_instance_uid: str
    transfer_syntax: str
    dataset_offset: int


# Explicit VR elements whose length is 4 bytes after 2 reserved ones (PS3.5 7.1.2).
_LONG_VRS = frozenset(
    {b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"UC", b"UN", b"UR", b"UT"}
)
_META_TAGS = {0x0002: "sop_class_uid", 0x0003: "sop_instance_uid", 0x0010: "transfer_syntax"}
#: File meta is a few hundred bytes; more than this is not a file meta.
_MAX_META = 1 << 16


def read_part10(source: str | os.PathLike[str] | BinaryIO) -> Part10:
    """Read a Part-10 file's meta (group 0002) without pydicom.

    Raises :class:`ValueError` with a sentence when ``source`` is not a Part-10
    file: no ``DICM`` after the 128-byte preamble, a truncated or oversized
    meta, or one of Media Storage SOP Class UID, Media Storage SOP Instance
    UID or Transfer Syntax UID missing.
    """
    if isinstance(source, (str, os.PathLike)):
        with open(source, "rb") as handle:
            return read_part10(handle)
    name = getattr(source, "name", "the data")
    head = source.read(132 + _MAX_META)
    if len(head) < 132 or head[128:132] != b"DICM":
        raise ValueError(
            f"{name} is not a DICOM Part-10 file (no 'DICM' after a 128-byte preamble); "
            "pass the data set bytes with the SOP class, SOP instance and transfer syntax "
            "instead"
        )
    values: dict[str, str] = {}
    offset = 132
    # Bounded: every pass consumes at least 8 bytes of ``head``.
    while offset + 8 <= len(head):
        group, element = struct.unpack_from("<HH", head, offset)
        if group != 0x0002:
            break
        vr = head[offset + 4 : offset + 6]
        if vr in _LONG_VRS:
            if offset + 12 > len(head):
                break
            (length,) = struct.unpack_from("<L", head, offset + 8)
            start = offset + 12
        else:
            (length,) = struct.unpack_from("<H", head, offset + 6)
            start = offset + 8
        if start + length > len(head):
            raise ValueError(
                f"the file meta of {name} has element (0002,{element:04X}) running past "
                f"its end or past {_MAX_META} bytes; the file is truncated or not Part-10"
            )
        key = _META_TAGS.get(element)
        if key is not None:
            values[key] = head[start : start + length].decode("ascii", "replace").strip("\0 ")
        offset = start + length
    else:
        raise ValueError(f"the file meta of {name} is truncated or larger than {_MAX_META} bytes")
    missing = [key.replace("_", " ") for key in _META_TAGS.values() if not values.get(key)]
    if missing:
        raise ValueError(f"the file meta of {name} lacks {', '.join(missing)}")
    return Part10(
        values["sop_class_uid"], values["sop_instance_uid"], values["transfer_syntax"], offset
    )
