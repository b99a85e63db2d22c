"""Fuzzing (issue 5 item 6): whatever a user or a peer sends, no exception but ours.

Two properties, each over bounded, derandomized Hypothesis runs:

* query building: arbitrary keywords and values passed to ``build_query`` and to the
  ``find_*`` argument path (with the network replaced) either give an identifier that
  encodes, in both VR encodings, and decodes back to the query's own strings, or raise
  :class:`pacsframe.QueryError`;
* frame conversion: arbitrary identifiers as they arrive off the wire (any
  keywords, raw bytes, declared or undeclared character sets, wrong VRs, over-long
  values, either byte order) go through ``FrameBuilder`` without an exception, with
  :class:`~pacsframe.frames.MalformedValueWarning` as the only warning, and each
  column has the dtype of DESIGN.md's table whatever came in.

The explicit ``@example`` cases are the bugs these properties found.
"""

from __future__ import annotations

import datetime as dt
import io
import math
import os
import re
import struct
import warnings
from decimal import Decimal
from unittest import mock

import numpy as np
import pandas as pd
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from pydicom import datadict
from pydicom import dcmread as pydicom_dcmread
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.filereader import read_dataset as pydicom_read_dataset
from pydicom.filewriter import write_dataset
from pydicom.tag import Tag
from pynetdicom.dsutils import decode
from pynetdicom.dsutils import encode as _encode

import pacsframe as pf
from pacsframe import finder, frames, matching, webtransfer
from pacsframe.frames import FrameBuilder, MalformedValueWarning
from pacsframe.net.operations import read_part10
from pacsframe.query import _BINARY_RANGE, build_query

# CI runs the same 200 examples each time; PACSFRAME_FUZZ_EXAMPLES=20000 searches
# further, with fresh random examples.
_EXAMPLES = int(os.environ.get("PACSFRAME_FUZZ_EXAMPLES", "200"))
FUZZ = settings(
    max_examples=_EXAMPLES,
    deadline=None,
    derandomize=_EXAMPLES <= 200,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


def _usable(keyword: str) -> bool:
    try:
        frames.attribute(keyword)
    except pf.QueryError:
        return False
    return True


# Every keyword of the dictionary (repeating groups such as 60xx have none).
KEYWORDS = sorted(k for k in datadict.keyword_dict if k)
ATTRIBUTES = [k for k in KEYWORDS if _usable(k)]  # no sequences
# Keys people query on, and a few of every VR family, so that valid queries are common.
COMMON = [
    "PatientID",
    "PatientName",
    "PatientBirthDate",
    "PatientSex",
    "PatientAge",
    "StudyDate",
    "StudyTime",
    "AcquisitionDateTime",
    "StudyInstanceUID",
    "SeriesInstanceUID",
    "SOPInstanceUID",
    "AccessionNumber",
    "StudyDescription",
    "ModalitiesInStudy",
    "Modality",
    "ImageType",
    "InstanceNumber",
    "SeriesNumber",
    "SliceThickness",
    "PixelSpacing",
    "WindowCenter",
    "Rows",
    "Columns",
    "SmallestImagePixelValue",
    "LUTDescriptor",
    "ReferencedFrameNumber",
    "FrameTime",
    "SelectorSSValue",
    "SelectorULValue",
    "SelectorSVValue",
    "SelectorUVValue",
    "SelectorFLValue",
    "SelectorFDValue",
    "SelectorATValue",
    "SelectorOBValue",
    "PixelData",
    "RetrieveAETitle",
    "TextValue",
    "PatientComments",
    "URNCodeValue",
    "LongCodeValue",
    "NumberOfStudyRelatedInstances",
]


def _snake(keyword: str) -> str:
    return re.sub(r"(?<!^)(?=[A-Z])", "_", keyword).lower()


def _near_miss(parts: tuple[str, int, str, int]) -> str:
    keyword, at, char, how = parts
    at %= len(keyword) + 1
    return [
        keyword[:at] + char + keyword[at:],
        keyword[:at] + keyword[at + 1 :],
        keyword.upper(),
        keyword[:at] + keyword[at:].swapcase(),
    ][how]


keywords = st.one_of(
    st.sampled_from(COMMON),
    st.sampled_from(KEYWORDS),
    st.sampled_from(COMMON).map(_snake),
    st.tuples(st.sampled_from(COMMON), st.integers(0, 40), st.characters(), st.integers(0, 3)).map(
        _near_miss
    ),
    st.text(max_size=20),
)

_TRICKY = "AZaz09*?\\\x00-^ .:,+=éß山\u200b\r\n\t\x1b２"
texts = st.one_of(
    st.text(max_size=70),
    st.text(alphabet=st.sampled_from(_TRICKY), max_size=30),
    st.from_regex(r"[0-9.]{1,70}", fullmatch=True),  # UIDs and near-UIDs
    st.from_regex(r"-?[0-9]{1,22}(\.[0-9]{0,5})?([eE][+-]?[0-9]{1,3})?", fullmatch=True),
    st.from_regex(r"[0-9]{8}-[0-9]{0,8}", fullmatch=True),  # DICOM ranges
    st.from_regex(
        r"[0-9]{4}-[0-9]{2}-[0-9]{2}([T ][0-9]{2}:[0-9]{2}(:[0-9]{2})?)?", fullmatch=True
    ),
    st.from_regex(r"[0-9]{2}:?[0-9]{2}(:?[0-9]{2}(\.[0-9]{1,7})?)?", fullmatch=True),
)
odd_things = st.sampled_from(
    [
        pd.NA,
        pd.NaT,
        np.nan,
        np.int64(3),
        np.uint16(7),
        np.float32(1.5),
        np.bool_(True),
        pd.Timestamp("2026-03-01 08:30"),
        pd.Timestamp("2026-03-01", tz="UTC"),
        np.datetime64("2026-03-01"),
        np.datetime64("NaT"),
        pd.Timedelta("1h"),
        Decimal("1.5"),
        complex(1, 2),
        np.array([1, 2]),
        np.array([]),
        pd.Series(["1.2", "1.3"]),
        pd.Index(["1.4"]),
        pd.Period("2026-03"),
        bytearray(b"CT"),
        Ellipsis,
        object(),
    ]
)
scalars = st.one_of(
    st.none(),
    texts,
    st.integers(),
    st.integers(-(2**70), 2**70),
    st.floats(),
    st.booleans(),
    st.dates(),
    st.datetimes(),
    st.datetimes(timezones=st.just(dt.UTC)),
    st.times(),
    st.timedeltas(),
    st.binary(max_size=20),
    odd_things,
)
values = st.recursive(
    scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4),
        st.tuples(inner),
        st.tuples(inner, inner),
        st.tuples(inner, inner, inner),
        st.frozensets(st.sampled_from(["1.2", "1.3", "CT", 4])),
        st.dictionaries(st.text(max_size=3), inner, max_size=2),
        st.iterables(inner, max_size=3),
    ),
    max_leaves=6,
)
levels = st.one_of(
    st.sampled_from(["patient", "study", "series", "image", "STUDY", "instances"]),
    st.text(max_size=8),
    st.integers(),
    st.none(),
)
models = st.one_of(
    st.sampled_from(["study", "patient", "Patient-Root", "study root"]),
    st.text(max_size=8),
    st.none(),
)
return_keys = st.one_of(
    st.none(),
    keywords,
    st.lists(keywords, max_size=3),
    st.lists(st.one_of(st.integers(), st.none(), st.binary(max_size=4)), max_size=2),
    st.integers(),
)


def _encoded(ds: Dataset, implicit: bool) -> bytes:
    out = DicomBytesIO()
    out.is_implicit_VR = implicit
    out.is_little_endian = True
    write_dataset(out, ds)
    return out.parent.getvalue()


def _same_number(sent: str, back: str, vr: str) -> bool:
    cast = np.float32 if vr == "FL" else float
    a, b = (cast(float(v)) for v in (sent, back))
    return bool(a == b or (math.isnan(a) and math.isnan(b)))


def assert_encodes_and_round_trips(query) -> None:
    """The identifier writes in both VR encodings and reads back as the query's strings."""
    ds = query.dataset()
    for implicit in (True, False):
        # What is sent (Query.encode: struct for ASCII text, else pydicom) is what
        # pydicom writes.
        assert query.encode(implicit) == _encoded(ds, implicit), (query.keys, implicit)
        back = decode(io.BytesIO(_encoded(ds, implicit)), implicit, True)
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # no malformed value in what we send
            strings = frames.dicom_strings(back, query.columns)
        assert str(back.QueryRetrieveLevel) == query.level
        for keyword, sent in query.keys.items():
            got = strings[keyword]
            vr = frames.attribute(keyword).vr
            if not sent:
                assert got is None, (keyword, got)
            elif vr in frames.BINARY_FLOAT_VRS:
                parts = zip(sent.split("\\"), got.split("\\"), strict=True)
                assert all(_same_number(a, b, vr) for a, b in parts), (keyword, sent, got)
            else:
                # Trailing NULs and spaces are padding on the wire, never data.
                assert got == sent.rstrip(" \x00"), (keyword, sent, got)


@FUZZ
@given(levels, models, st.dictionaries(keywords, values, max_size=4), return_keys)
@example("series", "patient", {}, 349)  # return_keys=349 raised TypeError
def test_build_query_gives_a_valid_identifier_or_a_query_error(level, model, keys, extra):
    try:
        query = build_query(level, model, keys, extra)
    except pf.QueryError:
        return
    assert_encodes_and_round_trips(query)


@FUZZ
@given(
    st.sampled_from(["patient", "study", "series", "image"]),
    st.sampled_from(["study", "patient"]),
    st.one_of(st.sampled_from(COMMON), st.sampled_from(KEYWORDS)),
    values,
)
# Digits of other scripts matched \d, then could not be written as a DT.
@example("study", "patient", "AcquisitionDateTime", "-৯༥០𑋳")
@example("study", "study", "StudyDate", "２０２６０３０１")
@example("series", "study", "InstanceNumber", "１２")
# Binary numbers out of their VR's range, or fractions, failed at encoding.
@example("image", "study", "Rows", -9998)
@example("image", "study", "Rows", 1.5)
@example("image", "study", "SelectorSVValue", 2**80)
@example("image", "study", "SelectorUVValue", str(2**64 - 1))
@example("image", "study", "SelectorFLValue", 1e300)
# SL and UL values read back empty: frames unpacked them with native sizes (8 bytes).
@example("patient", "patient", "SelectorULValue", frozenset([4]))
# Tags and binary data cannot be matched on; strings for them failed at encoding.
@example("series", "study", "SelectorATValue", "1.2")
@example("series", "study", "SelectorATValue", frozenset({"1.2", "1.3"}))
@example("patient", "patient", "PixelData", "07802929.875534")
def test_one_key_of_any_value_gives_a_valid_identifier_or_a_query_error(
    level, model, keyword, value
):
    try:
        query = build_query(level, model, {keyword: value})
    except pf.QueryError:
        return
    assert_encodes_and_round_trips(query)


def test_the_largest_unsigned_64_bit_value_is_sent_exactly():
    query = build_query("image", keys={"SelectorUVValue": 2**64 - 1})
    assert query.keys["SelectorUVValue"] == str(2**64 - 1)
    assert query.dataset().SelectorUVValue == 2**64 - 1
    assert_encodes_and_round_trips(query)


parents = st.one_of(
    st.none(),
    st.lists(st.one_of(texts, st.integers(), st.none(), st.binary(max_size=4)), max_size=3),
    texts,
    st.builds(pd.Series, st.lists(texts, max_size=2), name=st.sampled_from(frames.UID_COLUMNS)),
    st.dictionaries(
        st.sampled_from(["Modality", *frames.UID_COLUMNS]),
        st.lists(st.one_of(st.none(), texts, st.integers()), min_size=2, max_size=2),
        min_size=1,
    ).map(pd.DataFrame),
)


@FUZZ
@given(
    st.sampled_from(["find_patients", "find_studies", "find_series", "find_instances"]),
    parents,
    st.dictionaries(keywords, values, max_size=3),
)
def test_find_arguments_give_a_valid_identifier_or_a_query_error(method, parent, keys):
    """The ``find_*`` path up to the network: keyword arguments, drilling down, models."""
    sent = []

    def offline(pacs, query, parents, progress=True):
        sent.append((query, parents))
        return frames.empty_frame(query.columns)

    pacs = pf.PACS("127.0.0.1", 9, "NOWHERE")  # nothing is ever sent
    args = () if method == "find_patients" else (parent,)
    try:
        with mock.patch.object(finder, "run", offline), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "parent row has no ..." warnings are fine
            getattr(pacs, method)(*args, **keys)
    except pf.QueryError:
        return
    for query, _ in sent:
        assert_encodes_and_round_trips(query)


# --- identifiers off the wire ------------------------------------------------------------

VRS = ["AE", "AS", "AT", "CS", "DA", "DS", "DT", "FL", "FD", "IS", "LO", "LT", "OB", "OD"]
VRS += ["OF", "OL", "OV", "OW", "PN", "SH", "SL", "SQ", "SS", "ST", "SV", "TM", "UC", "UI"]
VRS += ["UL", "UN", "UR", "US", "UT", "UV"]
# Explicit VR elements with a 4-byte length (PS3.5 7.1.2).
LONG_VRS = {"OB", "OD", "OF", "OL", "OV", "OW", "SQ", "SV", "UC", "UN", "UR", "UT", "UV"}
CHARSETS = [
    "ISO_IR 100",
    "ISO_IR 192",
    "ISO_IR 13",
    "ISO_IR 144",
    "ISO_IR 166",
    "GB18030",
    "GBK",
    "ISO 2022 IR 87",
    "ISO 2022 IR 6\\ISO 2022 IR 87",
    "ISO 2022 IR 13\\ISO 2022 IR 87",
    "\\ISO 2022 IR 149",
    "ISO 2022 IR 58",
    "ISO_IR 100\\ISO_IR 192",
    "ISO_IR 6",
    "ISO_IR 999",
    "utf-8",
    "",
    "\\",
]
raw_values = st.one_of(
    st.binary(max_size=40),
    st.text(max_size=30).map(lambda t: t.encode("utf-8")),
    st.text(max_size=20).map(lambda t: t.encode("latin-1", "replace")),
    st.sampled_from(
        [
            b"20260301",
            b"2026.03.01",
            b"083000.123456",
            b"20260301083000+0100",
            b"1.5\\2.5",
            b"CT\\MR",
            b"Yamada^Tarou=\x1b$B;3ED\x1b(B^\x1b$BB@O:\x1b(B",
            b"\x1b$)C\xc7\xd1",
            b"99999999999999999999",
            b"-0",
            b"nan",
            b"inf",
            b"1e400",
            b"  12 ",
            b"\x00\x00",
            b"253000",
            b"99999",
            b"030Y",
            b"\xff" * 9,
            b"1" * 300,  # over-long for every short VR
            b"A" * 70000,  # over the 2-byte length of explicit short VRs
        ]
    ),
)


@st.composite
def identifiers(draw):
    """(columns, elements, implicit, little endian): an identifier as raw elements."""
    columns = draw(
        st.lists(
            st.one_of(
                st.sampled_from([k for k in COMMON if _usable(k)]), st.sampled_from(ATTRIBUTES)
            ),
            min_size=1,
            max_size=8,
            unique=True,
        )
    )
    tags = [frames.attribute(k).tag for k in columns]
    others = st.sampled_from(KEYWORDS).map(datadict.tag_for_keyword)
    element = st.tuples(
        st.one_of(st.sampled_from(tags), others, st.integers(0x00090010, 0x0009FFFF)),
        st.one_of(st.none(), st.sampled_from(VRS)),  # None: the dictionary's VR
        raw_values,
    )
    elements = draw(st.lists(element, max_size=10))
    charset = draw(
        st.one_of(st.none(), st.sampled_from(CHARSETS).map(str.encode), st.binary(max_size=12))
    )
    if charset is not None:
        elements.append((0x00080005, draw(st.sampled_from(["CS", "CS", "LO", "UN"])), charset))
    implicit = draw(st.booleans())
    little = True if implicit else draw(st.booleans())
    return columns, elements, implicit, little


def _vr_of(tag: int, declared: str | None) -> str:
    if declared:
        return declared
    try:
        return datadict.dictionary_VR(tag).split(" or ")[0]
    except KeyError:
        return "UN"


def wire_bytes(elements, implicit: bool, little: bool) -> bytes:
    end = "<" if little else ">"
    out = []
    for tag, declared, value in sorted(elements, key=lambda e: e[0]):
        head = struct.pack(f"{end}HH", tag >> 16, tag & 0xFFFF)
        vr = _vr_of(tag, declared)
        if implicit:
            out.append(head + struct.pack(f"{end}I", len(value)) + value)
        elif vr in LONG_VRS:
            out.append(head + vr.encode() + struct.pack(f"{end}HI", 0, len(value)) + value)
        else:
            value = value[:0xFFFF]
            out.append(head + vr.encode() + struct.pack(f"{end}H", len(value)) + value)
    return b"".join(out)


def in_memory(elements, implicit: bool, little: bool) -> Dataset:
    """The same elements as RawDataElements set directly (a VR that may be wrong)."""
    ds = Dataset()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pydicom's own charset warnings while building
        for tag, declared, value in elements:
            vr = None if implicit else _vr_of(tag, declared)
            raw = RawDataElement(Tag(tag), vr, len(value), value, 0, implicit, little)
            try:
                ds[tag] = raw
            except Exception:
                # pydicom converts private elements on the way in, and may fail there.
                ds._dict[Tag(tag)] = raw
    return ds


def _cell_ok(cell, vr: str) -> bool:
    if cell is None or cell is pd.NA or cell is pd.NaT:
        return True
    if vr in frames.DATE_VRS | frames.DATETIME_VRS:
        return isinstance(cell, pd.Timestamp)
    if vr in frames.TIME_VRS:
        return isinstance(cell, pd.Timedelta)
    if vr in frames.INT_VRS:
        return isinstance(cell, (int, np.integer))
    if vr in frames.FLOAT_VRS:
        return isinstance(cell, (float, np.floating))
    if vr in frames.STRING_VRS:
        return isinstance(cell, str)
    return True  # OB, AT...: no dtype in DESIGN.md's table


def check_frame(frame: pd.DataFrame, columns: list[str], rows: int) -> None:
    assert list(frame.columns) == columns and len(frame) == rows
    for keyword in columns:
        attr = frames.attribute(keyword)
        column = frame[keyword]
        if attr.multivalued:
            assert column.dtype == object
            assert all(isinstance(cell, list) for cell in column), keyword
            assert all(_cell_ok(v, attr.vr) for cell in column for v in cell), keyword
        else:
            assert str(column.dtype) == frames.DTYPES.get(attr.vr, "object"), keyword
            assert all(_cell_ok(cell, attr.vr) for cell in column), keyword


def build_frame(columns, ds: Dataset, rows: int = 2) -> pd.DataFrame:
    builder = FrameBuilder(columns)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(rows):
            builder.add(ds)
        frame = builder.frame()
    unexpected = [w for w in caught if not issubclass(w.category, MalformedValueWarning)]
    assert not unexpected, [str(w.message) for w in unexpected]
    return frame


@FUZZ
@given(identifiers())
# A number in a column whose declared VR is text (wrong VR on the wire) or that
# Int64 cannot hold raised ValueError/TypeError; a charset with a NUL raised
# ValueError ("embedded null character").
@example((["SmallestImagePixelValue"], [(0x00280106, "IS", b"\xec?\x96\x99")], False, False))
@example((["SelectorUVValue"], [(0x00720083, "UV", b"\xff" * 8)], True, True))
@example(
    (["NumberOfStudyRelatedInstances"], [(0x00201208, None, b"99999999999999999999")], True, True)
)
@example((["Rows"], [(0x00280010, "FD", struct.pack("<d", 1.5))], False, True))
@example(
    (["AcquisitionDateTime"], [(0x00080005, "CS", b"\xa3m\x00\x87\x98\x03\xf3K")], False, True)
)
def test_any_identifier_off_the_wire_becomes_a_typed_frame(identifier):
    columns, elements, implicit, little = identifier
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # pydicom's, while pynetdicom decodes
            ds = decode(io.BytesIO(wire_bytes(elements, implicit, little)), implicit, little)
    except Exception:
        return  # pynetdicom logs an identifier it cannot decode and hands on None
    check_frame(build_frame(columns, ds), columns, 2)


@FUZZ
@given(identifiers())
def test_any_dataset_of_raw_elements_becomes_a_typed_frame(identifier):
    columns, elements, implicit, little = identifier
    check_frame(build_frame(columns, in_memory(elements, implicit, little)), columns, 2)


@pytest.mark.parametrize("little", [True, False])
@pytest.mark.parametrize("vr", sorted(frames.BINARY_INT_VRS))
def test_binary_integers_of_every_size_decode_at_both_ends_of_their_range(vr, little):
    keyword = f"Selector{vr}Value"
    low, high = _BINARY_RANGE[vr]
    numbers = [low, min(high, 2**63 - 1)]  # Int64 holds at most 2**63 - 1
    raw = struct.pack(f"{'<' if little else '>'}2{frames.BINARY_INT_VRS[vr]}", *numbers)
    element = (frames.attribute(keyword).tag, vr, raw)
    ds = decode(io.BytesIO(wire_bytes([element], False, little)), False, little)
    frame = build_frame([keyword], ds, rows=1)
    assert frame[keyword][0] == numbers


def test_an_empty_builder_has_the_design_dtypes():
    check_frame(FrameBuilder(ATTRIBUTES[:50]).frame(), ATTRIBUTES[:50], 0)


# --- the batched FrameBuilder against the cell-by-cell reference --------------------------


def _undecodable_keywords(caught) -> set[str]:
    return {
        str(w.message).split(" ", 1)[0]
        for w in caught
        if issubclass(w.category, MalformedValueWarning)
        and "could not be decoded" in str(w.message)
    }


def reference_frame(columns, datasets) -> tuple[pd.DataFrame, set[str]]:
    """What FrameBuilder gave before batching: ``_decode_all`` per identifier, then to_series."""
    attributes = [frames.attribute(c) for c in columns]
    cells: list[list] = [[] for _ in attributes]
    undecodable: set[str] = set()
    for ds in datasets:
        values, failures = frames._decode_all(ds, attributes)
        for column, value in zip(cells, values, strict=True):
            column.append(value)
        undecodable.update(keyword for keyword, _ in failures)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        frame = pd.DataFrame(
            {
                a.keyword: frames.to_series(c, a.keyword)
                for a, c in zip(attributes, cells, strict=True)
            }
        )
    return frame, undecodable


def assert_same_as_reference(columns, datasets) -> None:
    builder = FrameBuilder(columns)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for ds in datasets:
            builder.add(ds)
        frame = builder.frame()
    expected, undecodable = reference_frame(columns, datasets)
    pd.testing.assert_frame_equal(frame, expected)
    assert _undecodable_keywords(caught) == undecodable


@FUZZ
@given(identifiers(), identifiers())
def test_batched_builder_equals_the_cell_by_cell_path(first, second):
    columns = first[0]
    datasets = []
    for _, elements, implicit, little in (first, second):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                ds = decode(io.BytesIO(wire_bytes(elements, implicit, little)), implicit, little)
        except Exception:
            continue
        datasets += [ds, in_memory(elements, implicit, little)]
    assert_same_as_reference(columns, datasets)


# Values as objects' headers mostly hold them: text (padded, in a character set, with
# code extensions), binary integers of any bytes; and anything raw_values gives.
_TEXT_VALUES = st.one_of(
    st.text(st.characters(min_codepoint=0, max_codepoint=0x7F), max_size=24).map(str.encode),
    st.text(st.sampled_from(" \x00\\^=.-0123456789ABCabcßÖ山"), max_size=16).map(
        lambda t: t.encode("utf-8")
    ),
    st.sampled_from(
        [
            b"Yamada^Tarou=\x1b$B;3ED\x1b(B^\x1b$BB@O:\x1b(B",
            b"\x1b$)C\xc7\xd1",
            b"ABC\x1b(Bdef ",
            b" \x1b-A\xe9t\xe9",
        ]
    ),
    raw_values,
)
# A few index attributes of each way to read them, drawn more often than the rest.
_FOCUS = ["PatientComments", "PatientName", "Rows", "ImageType", "SliceThickness", "StudyTime"]


def _header_value(vr: str) -> st.SearchStrategy[bytes]:
    if vr in frames.BINARY_INT_VRS:
        size = struct.calcsize("<" + frames.BINARY_INT_VRS[vr])
        return st.one_of(st.binary(min_size=size, max_size=size), st.binary(max_size=9))
    # Padded as senders pad (and some do not): a leading space is kept in ST, LT, UT.
    pads = st.sampled_from([b"", b"", b" ", b"  ", b"\x00"])
    return st.tuples(pads, _TEXT_VALUES, pads).map(b"".join)


@st.composite
def header_elements(draw):
    """(columns, {tag: RawDataElement}): index attributes as a header scan finds them."""
    columns, elements, implicit, little = draw(identifiers())
    keywords = st.one_of(st.sampled_from(matching.INDEX_KEYWORDS), st.sampled_from(_FOCUS))
    index = draw(st.lists(keywords, min_size=1, max_size=12, unique=True))
    columns = list(dict.fromkeys([*index, *columns]))
    for keyword in index:
        attr = frames.attribute(keyword)
        # Mostly the dictionary's VR (or none, implicit), as objects send them.
        declared = draw(st.one_of(st.just(attr.vr), st.just(attr.vr), st.sampled_from(VRS)))
        elements.append((attr.tag, declared, draw(_header_value(declared))))
    if draw(st.booleans()):
        elements.append((0x00080005, "CS", draw(st.sampled_from(CHARSETS)).encode()))
    found = {}
    for tag, declared, value in elements:
        vr = None if implicit else _vr_of(tag, declared)
        found[tag] = RawDataElement(Tag(tag), vr, len(value), value, 0, implicit, little)
    return columns, found


@FUZZ
@given(header_elements())
def test_the_index_strings_short_road_equals_the_generic_decoder(header):
    """``raw_strings`` (a received object's index row) gives ``dicom_strings``' strings
    and warnings, for any elements (its short road for common values included)."""
    columns, found = header
    with warnings.catch_warnings(record=True) as short_caught:
        warnings.simplefilter("always")
        short = frames.raw_strings(found, columns)
    with warnings.catch_warnings(record=True) as generic_caught:
        warnings.simplefilter("always")
        generic = frames.dicom_strings(Dataset(dict(found)), columns)
    assert list(short.items()) == list(generic.items())
    assert [(w.category, str(w.message)) for w in short_caught] == [
        (w.category, str(w.message)) for w in generic_caught
    ]


@st.composite
def clean_headers(draw):
    """(columns, [(tag, VR, value)]): index attributes mostly as objects send them (the
    dictionary's VR, a plain value), now and then not (another VR, any bytes)."""
    columns = draw(st.lists(st.sampled_from(matching.INDEX_KEYWORDS), min_size=1, unique=True))
    text = st.text(st.sampled_from(" .^-0123456789ABCXYZ"), max_size=12).map(str.encode)
    elements = []
    for keyword in columns:
        attr = frames.attribute(keyword)
        vr = attr.vr if draw(_mostly) else draw(st.sampled_from(["US", "IS", "LO", *VRS]))
        if not draw(_mostly):
            value = draw(_header_value(vr))
        elif vr in frames.BINARY_INT_VRS:
            size = struct.calcsize("<" + frames.BINARY_INT_VRS[vr])
            value = draw(st.binary(min_size=size, max_size=size))
        else:
            value = draw(text)
        elements.append((attr.tag, vr, value))
    if draw(st.booleans()):
        charset = draw(st.sampled_from(CHARSETS)).encode()
        elements.append((0x00080005, "CS" if draw(_mostly) else "LO", charset))
    return columns, elements


@FUZZ
@given(st.one_of(clean_headers(), header_elements()), st.booleans(), st.booleans(), st.data())
def test_the_one_pass_header_strings_equal_the_scan_then_decode(header, implicit, complete, data):
    """``scan_strings`` (a received header read in one pass) gives None, or the strings
    the two-step road gives (``_scan`` then ``raw_strings``) without a warning."""
    columns, elements = header
    if isinstance(elements, dict):  # header_elements: RawDataElements by tag
        elements = [(tag, raw.VR, raw.value) for tag, raw in elements.items()]
    elements = sorted(elements, key=lambda e: e[0])
    if data.draw(st.booleans()):  # a sequence of undefined length, stepped over or not
        item = bytes.fromhex("FEFF00E0 FFFFFFFF 08006000 02000000") + b"CT"
        item += bytes.fromhex("FEFF0DE0 00000000 FEFFDDE0 00000000")
        if elements and data.draw(st.booleans()):
            elements[0] = (elements[0][0], "SQ", None, item)  # a wanted one: left to pydicom
        else:
            elements.append((0x00081140, "SQ", None, item))
            elements.sort(key=lambda e: e[0])
    if not data.draw(_mostly):  # out of order, or twice
        elements = data.draw(st.permutations(elements + elements[:1]))
    encoded = b""
    for tag, declared, *value in elements:
        if len(value) == 2:  # (None, items): undefined length
            head = struct.pack("<HH", tag >> 16, tag & 0xFFFF)
            head += b"SQ\0\0" if not implicit else b""
            encoded += head + b"\xff\xff\xff\xff" + value[1]
        else:
            encoded += wire_bytes([(tag, declared, value[0])], implicit, True)
    encoded += wire_bytes([(0x7FE00010, "OW", b"\0\0")], implicit, True)
    encoded = encoded[: data.draw(st.one_of(st.just(len(encoded)), st.integers(0, len(encoded))))]
    stop = data.draw(st.sampled_from([0x7FE00008, 0x00200000, 1 << 32]))
    wanted = {frames.attribute(k).tag for k in columns} | {0x00080005}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        one = frames.scan_strings(encoded, implicit, columns, stop, complete)
        out = {}
        end = frames._scan(encoded, 0, len(encoded), implicit, wanted, stop, out, 0)
        two = None
        if end is not None and (end < len(encoded) or complete):
            two = frames.raw_strings(out, columns)
    if one is not None:
        assert two is not None
        assert list(one.items()) == list(two.items())
        assert not caught


_mostly = st.sampled_from([True] * 9 + [False])


@st.composite
def part_heads(draw):
    """The first bytes of a WADO-RS part (preamble, DICM, file meta elements, then more),
    and where each element starts."""
    uid = st.sampled_from([b"1.2.840.10008.1.2.1\0", b"1.2.3.4", b"1.2", b" 1.2 "] * 3 + [b""])
    # Mostly the three elements a meta needs, among others of any group, VR and length
    # (of which some cut it short, refuse it, or carry it past any prefix).
    needed = [(2, element, b"UI", uid) for element in (2, 3, 0x10) if draw(_mostly)]
    value = st.one_of(uid, st.binary(max_size=6), st.integers(0, 9000).map(b"7".__mul__))
    others = st.tuples(
        st.sampled_from([2] * 6 + [8, 0xFFFE]),
        st.sampled_from([0, 1, 2, 3, 0x10, 0x12, 0x13, 0x100]),
        st.sampled_from([b"UL", b"OB", b"UI", b"SH", b"UN", b"UT", b"\0\0"]),
        st.just(value),
    )
    elements = needed + draw(st.lists(others, max_size=5))
    if not draw(_mostly):
        elements = draw(st.permutations(elements))
    out = [b"\0" * 128, b"DICM" if draw(_mostly) else b"DICN"]
    starts = []  # where each element begins: prefixes end near them
    for group, element, vr, values in elements:
        starts.append(sum(map(len, out)))
        data = draw(values)
        length = len(data) if draw(_mostly) else draw(st.integers(0, 0xFFFF))
        head = struct.pack("<HH2s", group, element, vr)
        if vr in (b"OB", b"UN", b"UT"):
            head += struct.pack("<HI", 0, length)
        else:
            head += struct.pack("<H", length & 0xFFFF)
        out.append(head + data)
    starts.append(sum(map(len, out)))
    # Mostly the data set's first element (where a meta ends), then anything.
    if draw(_mostly):
        out.append(b"\x08\x00\x05\x00CS\x0a\x00ISO_IR 100")
    out.append(draw(st.binary(max_size=16)))
    return b"".join(out), starts


def _meta_or_error(read, head):
    try:
        return read(head)
    except ValueError as exc:
        return str(exc)


@FUZZ
@given(part_heads(), st.data())
def test_a_parts_meta_read_from_a_prefix_reads_as_from_all_its_bytes(head_starts, data):
    """The WADO-RS sink reads a part's meta from its first bytes: the same meta, or the
    same refusal, as ``read_part10`` of all of them (what it read before), wherever the
    first bytes end (about each element's start above all)."""
    head, starts = head_starts
    head = head[: data.draw(st.one_of(st.just(len(head)), st.integers(0, len(head))))]
    expected = _meta_or_error(
        lambda h: read_part10(io.BytesIO(bytes(h[: webtransfer._META_LIMIT]))), head
    )
    sizes = {s + d for s in starts for d in range(14)} | {webtransfer._META_PREFIX}
    sizes.add(data.draw(st.integers(0, len(head) + 12)))
    for form in (bytes, bytearray, lambda h: memoryview(bytearray(h))):
        for size in sorted(sizes):
            got = _meta_or_error(lambda h, size=size: webtransfer._read_meta(h, size), form(head))
            assert got == expected, size


def encode_identifier(ds: Dataset, implicit: bool) -> bytes:
    return _encode(ds, implicit, True)


def test_batched_builder_equals_the_cell_by_cell_path_on_a_cohort(tmp_path):
    from pacsframe.demo import make_cohort

    manifest = make_cohort(tmp_path, patients=6, seed=3, instances_per_series=1, matrix=8)
    columns = [
        "SpecificCharacterSet",
        "PatientID",
        "PatientName",
        "StudyInstanceUID",
        "StudyDate",
        "StudyTime",
        "StudyDescription",
        "Modality",
        "ImageType",
        "Rows",
        "PixelSpacing",
        "SliceThickness",
    ]
    charsets = [None, "ISO_IR 100", "ISO_IR 192", ["ISO 2022 IR 6", "ISO 2022 IR 87"]]
    datasets = []
    for i, path in enumerate(manifest.path):
        ds = pydicom_dcmread(path)
        del ds.PixelData
        if charsets[i % 4] is not None:
            ds.SpecificCharacterSet = charsets[i % 4]
            ds.PatientName = "Yamada^Tarou=山田^太郎" if i % 4 == 3 else "Gauß^Zoë"
        for implicit in (True, False):
            datasets.append(decode(io.BytesIO(encode_identifier(ds, implicit)), implicit, True))
    assert_same_as_reference(columns, datasets)


@FUZZ
@given(identifiers())
def test_reading_identifier_bytes_equals_decoding_them_with_pydicom(identifier):
    """``FrameBuilder.add_raw`` (the C-FIND fast path) gives what ``add(decode(...))`` gives."""
    columns, elements, implicit, little = identifier
    data = wire_bytes(elements, implicit, little)
    by_bytes = FrameBuilder(columns)
    read = little and by_bytes.add_raw(data, implicit)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ds = decode(io.BytesIO(data), implicit, little)
    except Exception:
        # pydicom refuses a whole identifier whose character set it cannot look up
        # (the old path dropped that row); the scan keeps it, reading the text as of
        # no declared character set. Either way the frame keeps its dtypes.
        if read:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", MalformedValueWarning)
                check_frame(by_bytes.frame(), columns, 1)
        return
    if not read:
        return  # left to pydicom, as the fast path does
    assert_same_as_reference(columns, [ds])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        expected = build_frame(columns, ds, rows=1)
        pd.testing.assert_frame_equal(by_bytes.frame(), expected)


# --- the header scan over nested sequences -----------------------------------------------

_SEQUENCE_TAGS = [0x00081140, 0x00081115, 0x00400260, 0x00082218]  # SQ in the dictionary
_FLAT = [
    (0x00080016, "UI", "1.2.840.10008.5.1.4.1.1.2"),
    (0x00100010, "PN", "Doe^Jane"),
    (0x0020000D, "UI", "1.2.3.4"),
    (0x00200013, "IS", "7"),
    (0x00280010, "US", 512),
    (0x00080008, "CS", ["ORIGINAL", "PRIMARY"]),
]


@st.composite
def nested_datasets(draw, depth: int = 0):
    """A dataset of flat elements and sequences, each of defined or undefined length."""
    ds = Dataset()
    for tag, vr, value in draw(
        st.lists(st.sampled_from(_FLAT), max_size=4, unique_by=lambda e: e[0])
    ):
        ds.add_new(tag, vr, value)
    if depth < 3:
        for tag in draw(st.lists(st.sampled_from(_SEQUENCE_TAGS), max_size=2, unique=True)):
            items = draw(st.lists(nested_datasets(depth + 1), max_size=3))
            for item in items:
                item.is_undefined_length_sequence_item = draw(st.booleans())
            ds.add_new(tag, "SQ", items)
            ds[tag].is_undefined_length = draw(st.booleans())
    return ds


@FUZZ
@given(nested_datasets(), st.booleans(), st.sets(st.sampled_from([t for t, _, _ in _FLAT])))
def test_the_header_scan_steps_over_any_nesting_as_pydicom_reads_it(ds, implicit, wanted):
    """``scan_elements`` (received headers, identifiers) agrees with pydicom's reader."""
    out = DicomBytesIO()
    out.is_little_endian, out.is_implicit_VR = True, implicit
    write_dataset(out, ds)
    data = out.getvalue()
    found = frames.scan_elements(data, implicit, wanted)
    assert found is not None  # well-formed: never left to pydicom
    reference = {
        int(tag): elem
        for tag, elem in pydicom_read_dataset(io.BytesIO(data), implicit, True)._dict.items()
        if tag in wanted
    }
    assert {t: (e.VR, e.value) for t, e in found.items()} == {
        t: (e.VR, e.value) for t, e in reference.items()
    }
    # Cut anywhere, it is left to pydicom or reads a prefix: never an exception.
    for cut in range(0, len(data), max(1, len(data) // 7)):
        frames.scan_elements(data[:cut], implicit, wanted)


@FUZZ
@given(
    nested_datasets(),
    st.booleans(),
    st.sets(st.sampled_from([t for t, _, _ in _FLAT])),
    st.sampled_from(_SEQUENCE_TAGS),
)
def test_the_item_scan_reads_a_sequence_as_pydicom_reads_it(ds, implicit, wanted, sequence):
    """``scan_items`` (worklist answers, one row per item) agrees with pydicom's reader."""
    out = DicomBytesIO()
    out.is_little_endian, out.is_implicit_VR = True, implicit
    write_dataset(out, ds)
    data = out.getvalue()
    found = frames.scan_items(data, implicit, wanted, sequence)
    assert found is not None  # well-formed: never left to pydicom
    read = pydicom_read_dataset(io.BytesIO(data), implicit, True)

    def flat(elements):
        return {int(t): (e.VR, e.value) for t, e in elements.items() if t in wanted}

    assert flat(found[0]) == flat(read._dict)
    items = read[sequence].value if sequence in read else []
    assert [flat(i) for i in found[1]] == [flat(i._dict) for i in items]
    # Cut anywhere, it is left to pydicom or reads a prefix: never an exception.
    for cut in range(0, len(data), max(1, len(data) // 7)):
        frames.scan_items(data[:cut], implicit, wanted, sequence)
