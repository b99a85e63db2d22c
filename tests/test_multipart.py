"""The streaming multipart/related reader (WADO-RS answers), against a reference split.

The reference is RFC 2046's grammar as one regular expression over the whole
body; the streaming reader must give the same parts whatever the chunking, raise
at ``close()`` for a body cut anywhere before its closing boundary (and never end
a part short), raise for a wrong boundary, and hold no more than the delimiter
between chunks while in a part.
"""

from __future__ import annotations

import itertools
import os
import re
import time

import pytest
from hypothesis import assume, example, given
from hypothesis import strategies as st

from pacsframe.errors import AssociationError, MultipartError, ProtocolError
from pacsframe.multipart import (
    MAX_PADDING,
    MultipartReader,
    PartData,
    PartEnd,
    PartStart,
    boundary_of,
)
from tests.test_fuzz import FUZZ

# --- the reference: the whole body at once ---------------------------------------------


def reference_parts(body: bytes, boundary: bytes) -> list[tuple[dict[str, str], bytes]] | None:
    """The parts of a complete body (None when it is not one), by RFC 2046 5.1.1."""
    b = re.escape(boundary)
    first = re.compile(rb"(?:^|\r\n)--" + b + rb"(--|[ \t]*\r\n)", re.S)
    delimiter = re.compile(rb"\r\n--" + b + rb"(--|[ \t]*\r\n)", re.S)
    m = first.search(body)
    if m is None:
        return None
    parts = []
    pos = m.end()
    closed = m.group(1) == b"--"
    while not closed:
        head_end = 0 if body.startswith(b"\r\n", pos) else body.find(b"\r\n\r\n", pos)
        if head_end < 0:
            return None
        if head_end == 0:
            block, start = b"", pos + 2
        else:
            block, start = body[pos:head_end], head_end + 4
        m = delimiter.search(body, start)
        if m is None:
            return None
        headers = {}
        for line in block.decode("latin-1").split("\r\n"):
            name, colon, value = line.partition(":")
            if colon and name.strip():
                headers[name.strip().lower()] = value.strip()
        parts.append((headers, body[start : m.start()]))
        pos = m.end()
        closed = m.group(1) == b"--"
    return parts


def streamed(body: bytes, boundary: bytes, cuts: list[int], reader=None):
    """Feed ``body`` split at ``cuts``; (parts ended, bytes of an unended part, reader)."""
    reader = reader or MultipartReader(boundary)
    parts: list[tuple[dict[str, str], bytes]] = []
    current: list[bytes] | None = None
    headers: dict[str, str] = {}
    edges = [0, *sorted({c % (len(body) + 1) for c in cuts}), len(body)]

    def take(events):
        nonlocal current, headers
        for event in events:
            if isinstance(event, PartStart):
                assert current is None
                headers, current = event.headers, []
            elif isinstance(event, PartData):
                assert current is not None and len(event.data) > 0
                current.append(bytes(event.data))
            else:
                assert isinstance(event, PartEnd) and current is not None
                parts.append((headers, b"".join(current)))
                current = None

    for a, z in itertools.pairwise(edges):
        take(reader.feed(body[a:z]))
        check_bound(reader, z - a)
    return parts, current, reader, take


def check_bound(reader: MultipartReader, chunk: int) -> None:
    """Between chunks: the delimiter and a padding run in a part, a header block else."""
    delimiter = len(reader.boundary) + 4
    if reader._state == 1:  # in a header block: bounded by max_header_bytes
        assert reader.buffered <= 16384 + 4
    else:
        assert reader.buffered <= delimiter + MAX_PADDING + 2


# --- generated bodies -----------------------------------------------------------------------

BCHARS = "0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ'()+_,-./:=?"
boundaries = st.one_of(
    st.sampled_from(["xyz", "-", "a", "==boundary==", "pacsframe-3f9c2a71e0b4d5c6"]),
    st.text(alphabet=BCHARS, min_size=1, max_size=70),
)


def tricky(boundary: bytes):
    """Content pieces that look like a delimiter, or part of one."""
    return st.sampled_from(
        [
            b"\r\n",
            b"\r",
            b"\n",
            b"-",
            b"--",
            b"\r\n-",
            b"\r\n--",
            boundary,
            b"--" + boundary,
            b"--" + boundary + b"--",
            b"\r\n--" + boundary[:-1],
            b"\r\n--" + boundary + b"x",
            b"\r\n--" + boundary + b"-x",
            b"\r\n--" + boundary + b" \tx",
            b"\r\n--" + boundary + b"\rx",
            b"\r\n\r\n",
            b"DICM",
            b"\x00" * 7,
        ]
    )


@st.composite
def bodies(draw):
    """(boundary, body, parts, position right after the closing --boundary--)."""
    boundary = draw(boundaries).encode()
    content = st.lists(st.one_of(st.binary(max_size=40), tricky(boundary)), max_size=8).map(
        b"".join
    )
    header = st.tuples(
        st.sampled_from(["Content-Type", "content-location", "X-Other", "MIME-Version"]),
        st.text(alphabet=BCHARS + " ", max_size=20).map(str.strip),
    )
    parts = draw(st.lists(st.tuples(st.lists(header, max_size=3), content), max_size=5))
    padding = st.text(alphabet=" \t", max_size=3).map(str.encode)
    preamble = draw(st.one_of(st.just(b""), content))
    out = [preamble + b"\r\n" if preamble else b""]
    expected = []
    for lines, data in parts:
        out.append(b"--" + boundary + draw(padding) + b"\r\n")
        headers = {}
        for name, value in lines:
            out.append(f"{name}: {value}\r\n".encode())
            headers[name.lower()] = value
        out.append(b"\r\n" + data + b"\r\n")
        expected.append((headers, data))
    out.append(b"--" + boundary + b"--")
    closed = len(b"".join(out))
    out.append(draw(st.sampled_from([b"", b"\r\n", b"\r\nepilogue --" + boundary + b"\r\n"])))
    body = b"".join(out)
    # A piece of content that happens to be a real delimiter makes another body.
    assume(reference_parts(body, boundary) == expected)
    return boundary, body, expected, closed


cut_lists = st.lists(st.integers(0, 10_000), max_size=12)


@FUZZ
@given(bodies(), cut_lists)
@example((b"xyz", b"--xyz\r\n\r\n\r\n--xyz--", [({}, b"")], 18), [1, 2, 3, 4, 5, 6, 7, 8, 9])
def test_any_chunking_gives_the_reference_parts(case, cuts):
    boundary, body, expected, _ = case
    parts, current, reader, take = streamed(body, boundary, cuts)
    take(reader.close())
    assert current is None and reader.done
    assert parts == expected


@FUZZ
@given(bodies(), cut_lists, st.integers(0, 10_000))
def test_a_body_cut_anywhere_raises_at_close_and_ends_no_part_short(case, cuts, at):
    boundary, body, expected, closed = case
    cut = at % closed  # anywhere before the closing boundary is complete
    parts, _, reader, _ = streamed(body[:cut], boundary, cuts)
    assert not reader.done
    with pytest.raises(MultipartError, match=r"truncated|no boundary"):
        reader.close()
    # Every part that ended is whole: the first ones, exactly.
    assert parts == expected[: len(parts)]


@FUZZ
@given(bodies(), cut_lists, st.sampled_from([b"Q", b"x", b"-"]))
def test_a_wrong_boundary_raises(case, cuts, extra):
    boundary, body, _, _ = case
    wrong = extra + boundary
    assume(reference_parts(body, wrong) is None)
    parts, _, reader, _ = streamed(body, wrong, cuts)
    if b"--" + wrong not in body:
        assert parts == []
        with pytest.raises(MultipartError, match="no boundary"):
            reader.close()
    else:  # the content holds the wrong boundary: whatever it splits, it is not whole
        with pytest.raises(MultipartError):
            reader.close()


def test_the_error_is_an_aborted_association_error():
    reader = MultipartReader("xyz")
    reader.feed(b"--xyz\r\nContent-Type: application/dicom\r\n\r\nDICM")
    with pytest.raises(MultipartError, match=r"inside part 1, after 4 of its bytes") as info:
        reader.close()
    assert isinstance(info.value, ProtocolError) and isinstance(info.value, AssociationError)
    assert info.value.reason == "aborted"


def test_a_wrong_boundary_is_found_early_in_a_long_body():
    reader = MultipartReader("xyz", max_preamble=1000)
    with pytest.raises(MultipartError, match="no boundary 'xyz'"):
        for _ in range(100):
            reader.feed(b"--other\r\n" + b"x" * 100)


def test_endless_part_headers_are_refused():
    reader = MultipartReader("xyz", max_header_bytes=100)
    reader.feed(b"--xyz\r\n")
    with pytest.raises(MultipartError, match="headers of part 1"):
        reader.feed(b"A: " + b"a" * 200)


def test_a_sink_receives_the_events_instead():
    got = []

    class Sink:
        def start(self, headers):
            got.append(("start", headers))

        def data(self, data):
            got.append(("data", bytes(data)))

        def end(self):
            got.append(("end",))

    reader = MultipartReader(b"b", sink=Sink())
    assert reader.feed(b"preamble\r\n--b\r\nContent-Location: /x\r\n\r\nAB\r\n--b\r\n\r\n") == []
    reader.feed(b"\r\n--b--")
    reader.close()
    assert got == [
        ("start", {"content-location": "/x"}),
        ("data", b"AB"),
        ("end",),
        ("start", {}),
        ("end",),
    ]


def test_data_views_stay_valid_after_the_next_feed():
    reader = MultipartReader("b")
    first = reader.feed(bytearray(b"--b\r\n\r\nhello"))
    reader.feed(b" world\r\n--b--")
    assert [bytes(e.data) for e in first if isinstance(e, PartData)] == [b"hello"]


# --- Content-Type -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("header", "boundary"),
    [
        ('multipart/related; type="application/dicom"; boundary=abc123', "abc123"),
        ('multipart/related; boundary="a b:c?"; type="application/dicom"', "a b:c?"),
        ("Multipart/Related;boundary=x;type=application/dicom", "x"),
        ('multipart/related; type="application/dicom"; boundary="=_Part_0.1"', "=_Part_0.1"),
    ],
)
def test_boundary_of_content_type(header, boundary):
    assert boundary_of(header) == boundary


@pytest.mark.parametrize(
    ("header", "why"),
    [
        ('multipart/related; type="application/dicom"', "no boundary"),
        ('multipart/related; boundary=""', "no boundary"),
        ("application/dicom", "not a multipart"),
        ("application/json", "not a multipart"),
        ("", "not a multipart"),
        ("multipart/related; boundary=" + "x" * 300, "not a usable"),
    ],
)
def test_content_types_without_a_boundary_are_refused(header, why):
    with pytest.raises(MultipartError, match=why):
        boundary_of(header)


# --- size and speed ------------------------------------------------------------------------


def test_a_large_body_streams_with_a_bounded_buffer_at_speed():
    """32 MiB of 0.5 MiB instances in 64 KiB chunks: linear, bounded, fast."""
    chunk = 64 * 1024
    boundary = b"pacsframe-" + os.urandom(8).hex().encode()
    payload = os.urandom(512 * 1024)
    one = b"--" + boundary + b"\r\nContent-Type: application/dicom\r\n\r\n" + payload + b"\r\n"
    body = one * 64 + b"--" + boundary + b"--\r\n"
    reader = MultipartReader(boundary)
    sizes: list[int] = []
    began = time.perf_counter()
    for i in range(0, len(body), chunk):
        for event in reader.feed(body[i : i + chunk]):
            if isinstance(event, PartStart):
                sizes.append(0)
            elif isinstance(event, PartData):
                sizes[-1] += len(event.data)
        # The brief's bound, with room to spare: one chunk plus the boundary.
        assert reader.buffered <= chunk + len(boundary)
        assert reader.buffered <= len(boundary) + 4 + MAX_PADDING + 2
    reader.close()
    seconds = time.perf_counter() - began
    assert sizes == [len(payload)] * 64
    assert len(body) / seconds > 100e6, f"{len(body) / seconds / 1e6:.0f} MB/s"
