"""A streaming, sans-I/O reader of multipart/related bodies (WADO-RS answers).

A WADO-RS retrieval answers ``multipart/related; type="application/dicom";
boundary=...``: one part per instance, each a few header lines and then the
instance's bytes (often half a megabyte or more). :class:`MultipartReader` takes
the body in whatever chunks the HTTP client hands over and gives back events:
:class:`PartStart` (the part's headers), :class:`PartData` (a piece of its bytes,
a ``memoryview`` to write to disk straight away) and :class:`PartEnd`. A part is
never held whole, and :meth:`MultipartReader.close` raises
:class:`~pacsframe.errors.MultipartError` when the body stopped before its closing
``--boundary--``, so a truncated last part is never mistaken for a complete one.

Why our own scanner
-------------------
The maintained Python parsers were written for HTML forms, and each misses one of
the things a WADO-RS client needs (checked against their current releases):

* ``multipart`` 2.0.1 (defnull) refuses every part without a
  ``Content-Disposition`` header ("Missing Content-Disposition segment header");
  WADO-RS parts have only ``Content-Type`` and perhaps ``Content-Location``;
* ``python-multipart`` 0.0.34 (Kludex) streams and is fast, but ``finalize()``
  accepts a body cut in the middle of a part without a word (the last part of a
  dropped connection would look complete), and it refuses a preamble and
  transport padding after a boundary, which RFC 2046 allows;
* ``requests-toolbelt``'s decoder needs the whole body in memory; so does
  dicomweb-client's, which also rescans its buffer on every chunk (its issue 127).

The scanner here is one ``bytes.find`` of ``CRLF--boundary`` per chunk (C speed),
and keeps between chunks only a tail that could begin that delimiter, so the
work is linear in the body and the memory is one chunk plus the delimiter; part
bytes are handed out as views of the chunk, never copied. Measured on the
development machine (CPython 3.11, 2026-11-29; ``python -m pacsframe.multipart``
measures again): a 256 MiB body of 0.5 MiB parts fed in 64 KiB chunks parses at
4,000 to 5,300 MB/s (1,500 MB/s while the test suite ran beside it), the same as
python-multipart's 4,500 MB/s on the same body, and far above what a network or
a disk delivers.

Grammar (RFC 2046 5.1.1, as PS3.18 8.7.1 uses it): a preamble, which is ignored;
``--boundary`` at the start of the body or of a line; then per part: optional
transport padding (spaces or tabs) and CRLF, header lines, an empty line, the
bytes, and ``CRLF--boundary``; after the last part ``--`` instead of the
padding, then an epilogue, which is ignored. ``CRLF--boundary`` followed by
anything else is part data (a boundary chosen as a prefix of some content).
Header names are case-insensitive (lower-cased here); folded headers are not
expected from DICOMweb servers and not supported.
"""

from __future__ import annotations

import email.message
import email.utils
from dataclasses import dataclass, field
from typing import Protocol

from .errors import MultipartError

__all__ = [
    "Event",
    "MultipartReader",
    "PartData",
    "PartEnd",
    "PartStart",
    "Sink",
    "boundary_of",
]

#: Longest run of transport padding (spaces, tabs) after a boundary we accept.
MAX_PADDING = 64


@dataclass(frozen=True)
class PartStart:
    """A part begins; ``headers`` maps lower-cased header names to their values."""

    headers: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class PartData:
    """A piece of the current part's bytes, in order (a view: write it or copy it)."""

    data: memoryview


@dataclass(frozen=True)
class PartEnd:
    """The current part ended at a boundary: its bytes are complete."""


Event = PartStart | PartData | PartEnd


class Sink(Protocol):
    """Where a :class:`MultipartReader` given ``sink=`` sends each event instead."""

    def start(self, headers: dict[str, str]) -> None: ...

    def data(self, data: memoryview) -> None: ...

    def end(self) -> None: ...


def boundary_of(content_type: str) -> str:
    """The boundary parameter of a multipart Content-Type header (quoted or not).

    Raises
    ------
    MultipartError
        When the type is not multipart, or has no usable boundary.

    Examples
    --------
    >>> boundary_of('multipart/related; type="application/dicom"; boundary="a b:c"')
    'a b:c'
    >>> boundary_of("Multipart/Related; boundary=1234-abcd; type=application/dicom")
    '1234-abcd'
    """
    message = email.message.Message()
    message["content-type"] = content_type or ""
    if message.get_content_maintype() != "multipart":
        raise MultipartError(
            f"the peer answered with Content-Type {content_type!r}, not a multipart "
            "body; a WADO-RS retrieval needs multipart/related (check the URL and the "
            "Accept header, and that the archive serves this resource)."
        )
    boundary = message.get_param("boundary")
    if isinstance(boundary, tuple):  # an RFC 2231 encoded parameter
        boundary = email.utils.collapse_rfc2231_value(boundary)
    if not boundary or not isinstance(boundary, str):
        raise MultipartError(
            f"the peer's Content-Type {content_type!r} has no boundary parameter, so its "
            "multipart body cannot be split into parts; the peer is at fault."
        )
    _check_boundary(boundary.encode("latin-1", "replace"))
    return boundary


def _check_boundary(boundary: bytes) -> None:
    if not 0 < len(boundary) <= 200 or b"\r" in boundary or b"\n" in boundary:
        raise MultipartError(
            f"{boundary[:80]!r} is not a usable multipart boundary (1 to 70 characters "
            "per RFC 2046, no line breaks); the peer is at fault."
        )


_PREAMBLE, _HEADERS, _BODY, _DONE = range(4)
_MORE, _NOT, _NEXT, _CLOSE = range(4)  # what follows a boundary


class MultipartReader:
    """Split a multipart body into parts as it arrives: ``feed`` chunks, then ``close``.

    Parameters
    ----------
    boundary : str or bytes
        The Content-Type's boundary (see :func:`boundary_of`).
    sink : Sink, optional
        Receives each event (``start``, ``data``, ``end``) as it happens; ``feed``
        then returns an empty list.
    max_header_bytes : int
        Longest header block of one part; more is a :class:`MultipartError`.
    max_preamble : int
        Bytes before the first boundary after which the body is taken as having
        none (the peer used another boundary): a :class:`MultipartError` is
        raised then rather than when the whole body has been read.

    Between calls the reader holds at most the delimiter (``CRLF--boundary``) and
    a padding run while in a part, or one unfinished header block
    (``buffered`` says how much). The ``memoryview`` of a :class:`PartData` is a
    view of an immutable buffer: it stays valid after the next ``feed``.

    Examples
    --------
    >>> body = (b"--xyz\\r\\nContent-Type: application/dicom\\r\\n\\r\\nDICM..."
    ...         b"\\r\\n--xyz--\\r\\n")
    >>> reader = MultipartReader("xyz")
    >>> events = reader.feed(body[:20]) + reader.feed(body[20:])
    >>> events += reader.close()
    >>> [type(e).__name__ for e in events]
    ['PartStart', 'PartData', 'PartEnd']
    >>> events[0].headers, bytes(events[1].data)
    ({'content-type': 'application/dicom'}, b'DICM...')
    """

    def __init__(
        self,
        boundary: str | bytes,
        *,
        sink: Sink | None = None,
        max_header_bytes: int = 16384,
        max_preamble: int = 1 << 20,
    ) -> None:
        raw = boundary.encode("latin-1") if isinstance(boundary, str) else bytes(boundary)
        _check_boundary(raw)
        self.boundary = raw
        self._dash = b"--" + raw
        self._delimiter = b"\r\n--" + raw
        self._sink = sink
        self._max_header = max_header_bytes
        self._max_preamble = max_preamble
        self._state = _PREAMBLE
        self._tail = b""
        self._events: list[Event] = []
        self._preamble = 0  # bytes of preamble seen
        #: Parts started so far, and bytes of the current part.
        self.parts = 0
        self.part_bytes = 0

    @property
    def buffered(self) -> int:
        """Bytes held between calls (the bound the tests check)."""
        return len(self._tail)

    @property
    def done(self) -> bool:
        """True once the closing ``--boundary--`` has been read."""
        return self._state == _DONE

    # --- events -------------------------------------------------------------------

    def _start(self, headers: dict[str, str]) -> None:
        self.parts += 1
        self.part_bytes = 0
        if self._sink is not None:
            self._sink.start(headers)
        else:
            self._events.append(PartStart(headers))

    def _data(self, view: memoryview) -> None:
        if not view:
            return
        self.part_bytes += len(view)
        if self._sink is not None:
            self._sink.data(view)
        else:
            self._events.append(PartData(view))

    def _end(self) -> None:
        if self._sink is not None:
            self._sink.end()
        else:
            self._events.append(PartEnd())

    # --- parsing ------------------------------------------------------------------

    def feed(self, data: bytes | bytearray | memoryview) -> list[Event]:
        """Parse the next chunk of the body; the events it completes, in order.

        Raises
        ------
        MultipartError
            Part headers too long, or no boundary within ``max_preamble`` bytes.
        """
        if self._state == _DONE or not data:
            return self._take()
        chunk = data if type(data) is bytes else bytes(data)
        buf = self._tail + chunk if self._tail else chunk
        view = memoryview(buf)
        pos = 0
        while True:
            if self._state == _BODY:
                pos, progressed = self._body(buf, view, pos)
            elif self._state == _HEADERS:
                pos, progressed = self._headers(buf, pos)
            elif self._state == _PREAMBLE:
                pos, progressed = self._find_first(buf, pos)
            else:  # the epilogue: ignored
                pos, progressed = len(buf), False
            if not progressed:
                break
        self._tail = buf[pos:]
        return self._take()

    def _take(self) -> list[Event]:
        events, self._events = self._events, []
        return events

    def _after(self, buf: bytes, at: int) -> tuple[int, int]:
        """What follows a boundary ending at ``at``: (kind, position after it)."""
        end = len(buf)
        if at + 2 <= end:
            if buf[at] == 0x2D:  # "-"
                return (_CLOSE, at + 2) if buf[at + 1] == 0x2D else (_NOT, at)
        elif at < end and buf[at] == 0x2D:
            return _MORE, at
        j = at
        while j < end and buf[j] in (0x20, 0x09) and j - at <= MAX_PADDING:
            j += 1
        if j - at > MAX_PADDING:
            return _NOT, at
        if j + 2 <= end:
            return (_NEXT, j + 2) if buf[j] == 0x0D and buf[j + 1] == 0x0A else (_NOT, at)
        if j == end or buf[j] == 0x0D:
            return _MORE, at
        return _NOT, at

    def _find_first(self, buf: bytes, pos: int) -> tuple[int, bool]:
        """Skip the preamble to the first ``--boundary`` at the start of a line."""
        dash = self._dash
        search = pos
        while True:
            i = buf.find(dash, search)
            if i < 0:
                # Keep what could still begin "CRLF--boundary".
                keep = max(pos, len(buf) - len(dash) - 1)
                self._preamble += keep - pos
                if self._preamble > self._max_preamble:
                    raise self._no_boundary()
                return keep, False
            first = self._preamble == 0 and i == 0
            if not first and not (i >= 2 and buf[i - 2 : i] == b"\r\n"):
                search = i + 1
                continue
            kind, after = self._after(buf, i + len(dash))
            if kind == _MORE:
                keep = i if first else i - 2  # the CRLF stays with its boundary
                self._preamble += keep - pos
                return keep, False
            if kind == _NOT:
                search = i + 1
                continue
            if kind == _CLOSE:  # a body of no parts
                self._state = _DONE
                return len(buf), False
            self._state = _HEADERS
            return after, True

    def _headers(self, buf: bytes, pos: int) -> tuple[int, bool]:
        """Read one part's header block, up to the empty line."""
        if buf.startswith(b"\r\n", pos):
            block, after = b"", pos + 2
        else:
            i = buf.find(b"\r\n\r\n", pos)
            if i < 0:
                if len(buf) - pos > self._max_header:
                    raise MultipartError(
                        f"the headers of part {self.parts + 1} of the multipart body run "
                        f"past {self._max_header} bytes without an empty line; the peer "
                        "sent a malformed body (or not the boundary it announced)."
                    )
                return pos, False
            block, after = buf[pos:i], i + 4
        if after - pos > self._max_header + 4:
            raise MultipartError(
                f"the headers of part {self.parts + 1} of the multipart body are longer "
                f"than {self._max_header} bytes; the peer sent a malformed body."
            )
        headers: dict[str, str] = {}
        for line in block.decode("latin-1").split("\r\n"):
            name, colon, value = line.partition(":")
            if colon and name.strip():
                headers[name.strip().lower()] = value.strip()
        self._start(headers)
        self._state = _BODY
        return after, True

    def _body(self, buf: bytes, view: memoryview, pos: int) -> tuple[int, bool]:
        """Hand out the part's bytes up to its delimiter, or all that cannot begin one."""
        delimiter = self._delimiter
        search = pos
        while True:
            i = buf.find(delimiter, search)
            if i < 0:
                break
            kind, after = self._after(buf, i + len(delimiter))
            if kind == _NOT:
                search = i + 1
                continue
            self._data(view[pos:i])
            if kind == _MORE:
                return i, False
            self._end()
            self._state = _DONE if kind == _CLOSE else _HEADERS
            return (len(buf) if kind == _CLOSE else after), kind != _CLOSE
        # No delimiter: keep only a tail that could begin one (it starts with the
        # only CR a delimiter holds, since a boundary has no CR).
        end = len(buf)
        keep = end
        r = buf.rfind(b"\r", max(pos, end - len(delimiter) + 1))
        if r >= 0 and delimiter.startswith(buf[r:]):
            keep = r
        self._data(view[pos:keep])
        return keep, False

    def _no_boundary(self) -> MultipartError:
        return MultipartError(
            f"the multipart body holds no boundary {self.boundary.decode('latin-1')!r} "
            f"(after {self._preamble} bytes); the peer sent another boundary than the "
            "one its Content-Type announced, or no multipart body at all."
        )

    def close(self) -> list[Event]:
        """Say the body has ended; the last events, or an error if it was cut short.

        Raises
        ------
        MultipartError
            The body ended before its closing ``--boundary--``: inside part
            ``parts`` (which is incomplete and must be discarded), in its headers,
            or before any boundary at all.
        """
        if self._state == _DONE:
            return self._take()
        if self._state == _PREAMBLE:
            self._preamble += len(self._tail)
            raise self._no_boundary()
        where = (
            f"in the headers of part {self.parts + 1}"
            if self._state == _HEADERS
            else f"inside part {self.parts}, after {self.part_bytes} of its bytes"
        )
        raise MultipartError(
            f"the multipart body ended {where}, without the closing boundary: it was "
            "truncated (the connection dropped or was cut short). That part is "
            "incomplete and is not kept; retrieving again fetches what is missing."
        )


def _measure(total_mib: int = 256, chunk: int = 64 * 1024, part: int = 512 * 1024) -> float:
    """MB/s of :class:`MultipartReader` over a ``total_mib`` body fed in ``chunk`` pieces."""
    import os
    import time

    boundary = b"pacsframe-" + os.urandom(8).hex().encode()
    payload = os.urandom(part)
    head = b"--" + boundary + b"\r\nContent-Type: application/dicom\r\n\r\n"
    one = head + payload + b"\r\n"
    body = one * (total_mib * 1024 * 1024 // len(one)) + b"--" + boundary + b"--\r\n"
    chunks = [body[i : i + chunk] for i in range(0, len(body), chunk)]

    class _Count:
        size = 0

        def start(self, headers: dict[str, str]) -> None:
            pass

        def data(self, data: memoryview) -> None:
            self.size += len(data)

        def end(self) -> None:
            pass

    sink = _Count()
    reader = MultipartReader(boundary, sink=sink)
    began = time.perf_counter()
    for piece in chunks:
        reader.feed(piece)
    reader.close()
    seconds = time.perf_counter() - began
    return len(body) / seconds / 1e6


if __name__ == "__main__":  # pragma: no cover
    print(f"{_measure():.0f} MB/s (256 MiB, 64 KiB chunks, 0.5 MiB parts)")
