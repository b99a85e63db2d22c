"""A fault-injecting DICOM peer: the demo PACS, misbehaving on request.

:class:`FaultyPACS` is a real :class:`~pacsframe.demo.DemoPACS` (pynetdicom over
TCP on loopback) whose C-FIND, C-GET and C-MOVE handlers are wrapped so that a
test can make them abort, hang, answer slowly, end with a chosen status, send
malformed identifiers or objects, or report sub-operation counts that do not
add up. Set ``server.faults`` to a :class:`Faults` before the request; the
defaults misbehave in no way.

Hangs block on ``server.release`` (a :class:`threading.Event`), which
:meth:`FaultyPACS.unblock` sets (leaving ``with FaultyPACS(...)`` does so), so no server
thread outlives the test by more than a moment.

C-FIND is answered in Explicit VR Little Endian only, so a wrong VR is on the
wire, not only in the value bytes.
"""

from __future__ import annotations

import itertools
import os
import struct
import threading
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from io import BytesIO
from pathlib import Path
from typing import Any

from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.tag import BaseTag
from pydicom.uid import ExplicitVRLittleEndian
from pynetdicom import evt
from pynetdicom.dimse_messages import C_FIND_RSP, C_GET_RSP, C_MOVE_RSP
from pynetdicom.dsutils import encode
from pynetdicom.presentation import build_context

from pacsframe import frames
from pacsframe.demo import DemoPACS
from pacsframe.demo.server import _MODELS, handle_find, handle_get, handle_move

__all__ = ["Faults", "FaultyPACS", "raw", "sockets", "status"]

# How long a hung handler waits for the test to release it, at most.
HANG_SECONDS = 60.0


@dataclass
class Faults:
    """What the peer does wrong. Counts are 0-based positions in the answer.

    Attributes
    ----------
    delay : float
        Seconds to wait before every C-FIND match and every sub-operation (cut
        short by :meth:`FaultyPACS.unblock`, so a slow handler ends with the test).
    abort_after : int or None
        Abort the association instead of the n-th C-FIND match or sub-operation
        (so after n of them).
    hang_after : int or None
        Stop answering instead of the n-th match or sub-operation (until released).
    status_after : (int, status) or None
        End the answer with this final status (an int, or a Dataset with Status and
        ErrorComment) instead of the n-th match or sub-operation.
    identifier : callable or None
        ``identifier(n, ds) -> ds`` rewrites the n-th C-FIND match.
    objects : callable or None
        ``objects(n, ds) -> ds`` rewrites the n-th dataset sent by C-GET/C-MOVE.
    response : callable or None
        ``response(command, data)`` may change a C-FIND/C-GET/C-MOVE response's
        command set (a Dataset) in place before it is sent; ``data`` is its
        identifier stream (BytesIO or None); return new bytes to replace it.
    refuse_over : (int, status) or None
        When more than n matches would be sent, answer a C-FIND with this final
        status (an int, or a Dataset with Status and ErrorComment) before any match,
        as dcm4chee-arc does past ``dcmQueryMaxNumberOfResults``.
    find_levels : dict or None
        ``{level: answer(matches) -> matches or status}`` rewrites the whole answer
        to a C-FIND at that QueryRetrieveLevel ("PATIENT", "STUDY", "SERIES",
        "IMAGE"): ``matches`` is the list of identifiers the demo would send;
        return the list to send instead (fewer, changed, none), or a final status
        (an int, or a Dataset with Status and ErrorComment) to refuse with.
        Applied before the per-match faults above.
    """

    delay: float = 0.0
    abort_after: int | None = None
    hang_after: int | None = None
    status_after: tuple[int, int | Dataset] | None = None
    identifier: Callable[[int, Dataset], Dataset] | None = None
    objects: Callable[[int, Dataset], Dataset] | None = None
    response: Callable[[Dataset, BytesIO | None], bytes | None] | None = None
    refuse_over: tuple[int, int | Dataset] | None = None
    find_levels: dict[str, Callable[[list[Dataset]], list[Dataset] | int | Dataset]] | None = None


class FaultyPACS(DemoPACS):
    """A demo PACS whose answers follow ``self.faults``; see the module docstring."""

    def __init__(self, folder: str | os.PathLike[str], **kwargs: Any) -> None:
        super().__init__(folder, **kwargs)
        self.faults = Faults()
        self.release = threading.Event()
        self.hung = threading.Event()  # set while a handler hangs

    def unblock(self) -> None:
        """Let every hung handler go (they then end the request without answering)."""
        self.release.set()

    def __exit__(self, *exc: object) -> None:
        # Hung handlers first, so no server thread outlives the block.
        self.unblock()
        super().__exit__(*exc)

    def start(self) -> FaultyPACS:
        super().start()
        server = self._server
        for event, handler in (
            (evt.EVT_C_FIND, _find),
            (evt.EVT_C_GET, _get),
            (evt.EVT_C_MOVE, _move),
        ):
            # One handler per intervention event: binding replaces the demo's.
            server.bind(event, handler, [self])
        server.bind(evt.EVT_DIMSE_SENT, _tamper, [self])
        server.contexts = [
            build_context(cx.abstract_syntax, ExplicitVRLittleEndian)
            if cx.abstract_syntax in _MODELS
            else cx
            for cx in server.contexts
        ]
        return self

    def _hang(self) -> None:
        self.hung.set()
        self.release.wait(HANG_SECONDS)


def _step(server: FaultyPACS, event: evt.Event, n: int) -> Any:
    """Apply the faults due at position ``n``: returns a final answer, 'abort' or None."""
    faults = server.faults
    if faults.hang_after == n:
        server._hang()
        return "abort"
    if faults.abort_after == n:
        event.assoc.abort()
        return "abort"
    if faults.status_after is not None and faults.status_after[0] == n:
        return faults.status_after[1]
    if faults.delay:
        server.release.wait(faults.delay)
    return None


def _inject(
    event: evt.Event,
    server: FaultyPACS,
    answers: Iterator[Any],
    pending: tuple[int, ...],
    rewrite: Callable[[int, Any], Any] | None,
) -> Iterator[Any]:
    """Pass ``answers`` through, with the configured fault at each pending one."""
    for n, (status, ds) in enumerate(answers):
        if status in pending:
            final = _step(server, event, n)
            if final == "abort":
                return
            if final is not None:
                yield final, None
                return
            if rewrite is not None:
                ds = rewrite(n, ds)
        yield status, ds


def _find(event: evt.Event, server: FaultyPACS) -> Iterator[Any]:
    answers = handle_find(event, server)
    refuse = server.faults.refuse_over
    if refuse is not None:
        # Look one match past the limit before answering anything.
        head = list(itertools.islice(answers, refuse[0] + 1))
        if sum(status in (0xFF00, 0xFF01) for status, _ in head) > refuse[0]:
            yield refuse[1], None
            return
        answers = itertools.chain(head, answers)
    levels = server.faults.find_levels
    if levels:
        level = str(event.identifier.get("QueryRetrieveLevel", "")).strip().upper()
        if level in levels:
            answers = _answer_instead(answers, levels[level])
    yield from _inject(event, server, answers, (0xFF00, 0xFF01), server.faults.identifier)


def _answer_instead(
    answers: Iterator[Any], answer: Callable[[list[Dataset]], Any]
) -> Iterator[Any]:
    """The demo's C-FIND answer, its matches replaced by ``answer(matches)``."""
    matches, finals = [], []
    for status, ds in answers:
        (matches if status in (0xFF00, 0xFF01) else finals).append((status, ds))
    instead = answer([ds for _, ds in matches])
    if isinstance(instead, (int, Dataset)):
        yield instead, None
        return
    for ds in instead:
        yield 0xFF00, ds
    yield from finals


def _sub_operations(event: evt.Event, server: FaultyPACS, inner: Iterator[Any]) -> Iterator[Any]:
    yield from _inject(event, server, inner, (0xFF00,), server.faults.objects)


def _get(event: evt.Event, server: FaultyPACS) -> Iterator[Any]:
    inner = handle_get(event, server)
    yield next(inner)
    yield from _sub_operations(event, server, inner)


def _move(event: evt.Event, server: FaultyPACS) -> Iterator[Any]:
    inner = handle_move(event, server)
    yield next(inner)  # the destination (or None, None: refused)
    count = next(inner, None)
    if count is None:
        return
    yield count
    yield from _sub_operations(event, server, inner)


def _tamper(event: evt.Event, server: FaultyPACS) -> None:
    change = server.faults.response
    message = event.message
    if change is None or not isinstance(message, (C_FIND_RSP, C_GET_RSP, C_MOVE_RSP)):
        return
    command = message.command_set
    data = change(command, message.data_set)
    if data is not None:
        message.data_set = BytesIO(data)
    # The Command Group Length was computed before the change.
    del command.CommandGroupLength
    command.CommandGroupLength = len(encode(command, True, True) or b"")


# --- building malformed data ------------------------------------------------------------


def status(code: int, comment: str | None = None) -> int | Dataset:
    """A final status for ``Faults``: the code, or a Dataset with it and an ErrorComment."""
    if comment is None:
        return code
    final = Dataset()
    final.Status = code
    final.ErrorComment = comment
    return final


def raw(ds: Dataset, keyword: str, vr: str, value: bytes) -> Dataset:
    """Put ``value`` into ``ds`` as-is under ``keyword``'s tag with VR ``vr``.

    For datasets encoded as Explicit VR Little Endian (the fault peer's C-FIND
    answers): pydicom writes the bytes without checking them.
    """
    tag = BaseTag(frames.attribute(keyword).tag)
    ds[tag] = RawDataElement(tag, vr, len(value), value, 0, False, True)
    if keyword == "SpecificCharacterSet":
        # Declare the new character set original too, or pydicom re-encodes the text.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # an unknown term, on purpose
            ds.set_original_encoding(False, True, ds._character_set)
    return ds


def uint32(number: int) -> bytes:
    return struct.pack("<I", number)


def sockets() -> int:
    """Open sockets of this process (``/proc/self/fd`` links to ``socket:[...]``).

    Not counted: the worker server's control socket (pacsframe.workers), which
    the first parallel retrieval opens and which lives for the session by design.
    """
    from pacsframe import workers

    server = workers._SERVER
    ours = str(server.sock.fileno()) if server is not None and server.alive() else None
    count = 0
    for fd in Path("/proc/self/fd").iterdir():
        if fd.name == ours:
            continue
        try:
            if os.readlink(fd).startswith("socket:"):
                count += 1
        except OSError:
            continue  # closed meanwhile
    return count
