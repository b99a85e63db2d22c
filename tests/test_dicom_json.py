"""DICOM JSON (PS3.18 F.2, a QIDO-RS answer) into the same typed frame as C-FIND.

The reference is the C-FIND path itself: the same datasets, encoded as an
identifier and added with ``FrameBuilder.add_raw``, against their DICOM JSON
(``pydicom.Dataset.to_json_dict``, as a DICOMweb server would write it) through
``frames.from_dicom_json``. The frames must be equal column by column, dtypes
included, and both paths must warn about the same columns.
"""

from __future__ import annotations

import base64
import datetime as dt
import json
import warnings
from io import BytesIO

import pandas as pd
import pytest
from hypothesis import assume, given
from hypothesis import strategies as st
from pydicom import dcmread
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.filereader import read_dataset
from pydicom.filewriter import write_dataset

from pacsframe import frames
from pacsframe.demo import make_cohort
from pacsframe.frames import FrameBuilder, MalformedValueWarning
from pacsframe.query import DEFAULT_KEYS, build_query
from tests.test_fuzz import FUZZ


def encoded(ds: Dataset, implicit: bool = False) -> bytes:
    out = DicomBytesIO()
    out.is_implicit_VR = implicit
    out.is_little_endian = True
    write_dataset(out, ds)
    return out.getvalue()


def _malformed(caught) -> set[str]:
    """The keywords the MalformedValueWarnings name (their first word)."""
    return {
        str(w.message).split(" of ", 1)[-1].split(" ", 1)[0]
        if str(w.message)[0].isdigit()
        else str(w.message).split(" ", 1)[0]
        for w in caught
        if issubclass(w.category, MalformedValueWarning)
    }


def by_cfind(datasets, columns) -> tuple[pd.DataFrame, set[str]]:
    builder = FrameBuilder(columns)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for ds in datasets:
            data = encoded(ds)
            if not builder.add_raw(data, False):
                builder.add(read_dataset(BytesIO(data), False, True))
        frame = builder.frame()
    return frame, _malformed(caught)


def by_json(objects, columns) -> tuple[pd.DataFrame, set[str]]:
    # Through JSON text, as it comes off the wire.
    text = json.dumps(objects, ensure_ascii=False).encode("utf-8")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        frame = frames.from_dicom_json(text, columns)
    unexpected = [w for w in caught if not issubclass(w.category, MalformedValueWarning)]
    assert not unexpected, [str(w.message) for w in unexpected]
    return frame, _malformed(caught)


def served_json(ds: Dataset) -> dict:
    """What a DICOMweb server holding ``ds`` as a file answers: its stored bytes as JSON."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pydicom's own validation warnings
        stored = read_dataset(BytesIO(encoded(ds)), False, True)
        return stored.to_json_dict()


def assert_same_frame(datasets, columns) -> pd.DataFrame:
    reference, warned = by_cfind(datasets, columns)
    frame, warned_json = by_json([served_json(ds) for ds in datasets], columns)
    assert list(frame.columns) == list(reference.columns)
    for column in columns:
        assert frame[column].dtype == reference[column].dtype, column
        pd.testing.assert_series_equal(frame[column], reference[column], obj=column)
    assert warned_json == warned
    return frame


# --- the demo cohort ----------------------------------------------------------------------

EXTRA = [
    "SpecificCharacterSet",
    "SeriesDescription",
    "SliceThickness",
    "PixelSpacing",
    "ImagePositionPatient",
    "WindowCenter",
    "AcquisitionDateTime",
    "ContentTime",
    "PatientAge",
    "BitsAllocated",
]


@pytest.fixture(scope="module")
def cohort_headers(tmp_path_factory) -> list[Dataset]:
    folder = tmp_path_factory.mktemp("cohort")
    manifest = make_cohort(
        folder, 4, seed=13, studies_per_patient=1, series_per_study=2, instances_per_series=2
    )
    return [dcmread(p, stop_before_pixels=True) for p in manifest.path]


@pytest.mark.parametrize("level", ["PATIENT", "STUDY", "SERIES", "IMAGE"])
def test_cohort_headers_give_the_same_frame_over_json_as_over_cfind(cohort_headers, level):
    columns = list(dict.fromkeys([*DEFAULT_KEYS[level], *DEFAULT_KEYS["STUDY"], *EXTRA]))
    frame = assert_same_frame(cohort_headers, columns)
    assert len(frame) == len(cohort_headers)
    # The cohort's UTF-8 and Latin-1 names arrive decoded, and its empty values as NA.
    names = set(frame.PatientName.dropna())
    assert any(not n.isascii() for n in names)
    assert frame.AccessionNumber.isna().any()


# --- hand-built cases ---------------------------------------------------------------------


def _dataset(charset, **values) -> Dataset:
    ds = Dataset()
    if charset:
        ds.SpecificCharacterSet = charset
    for keyword, value in values.items():
        attr = frames.attribute(keyword)
        ds.add(DataElement(attr.tag, attr.vr, value))
    return ds


HAND_BUILT = [
    _dataset(
        ["ISO 2022 IR 6", "ISO 2022 IR 87"],
        PatientName="Yamada^Tarou=山田^太郎=やまだ^たろう",
        OtherPatientNames=["Yamada^T", "=山田^太郎"],
        StudyDescription="",
    ),
    _dataset("ISO_IR 100", PatientName="Müller^Jürgen", PatientID="ÄÖ1", StudyDate=""),
    _dataset("ISO_IR 192", PatientName="Łukasiewicz^Zoë", ReferringPhysicianName=""),
    _dataset(
        None,
        PatientName="DOE^JANE",
        ModalitiesInStudy=["CT", "MR", "SR"],
        ImageType=["ORIGINAL", "PRIMARY", "AXIAL"],
        PixelSpacing=["0.5", "0.75"],
        WindowCenter=["40", "-600"],
        NumberOfStudyRelatedInstances="12",
        SliceThickness="1.25",
        Rows=512,
        SelectorSSValue=[-3, 4],
        SelectorULValue=4_000_000_000,
        SelectorFLValue=0.1,
        SelectorFDValue=[1e-300, 2.5],
        SelectorATValue=[0x00100010, 0x7FE00010],
        SelectorOBValue=b"\x00\x01\xfe\xff",
        StudyTime="083000.123",
        AcquisitionDateTime="20260301083000.5+0100",
        PatientAge="042Y",
    ),
    _dataset(None, ModalitiesInStudy="", ImageType="", PixelSpacing="", Rows=None),
]
HAND_COLUMNS = [
    "SpecificCharacterSet",
    "PatientName",
    "OtherPatientNames",
    "PatientID",
    "ReferringPhysicianName",
    "StudyDescription",
    "StudyDate",
    "StudyTime",
    "AcquisitionDateTime",
    "PatientAge",
    "ModalitiesInStudy",
    "ImageType",
    "PixelSpacing",
    "WindowCenter",
    "NumberOfStudyRelatedInstances",
    "SliceThickness",
    "Rows",
    "SelectorSSValue",
    "SelectorULValue",
    "SelectorFLValue",
    "SelectorFDValue",
    "SelectorATValue",
    "SelectorOBValue",
    "AccessionNumber",
]


def test_hand_built_datasets_give_the_same_frame_over_json_as_over_cfind():
    frame = assert_same_frame(HAND_BUILT, HAND_COLUMNS)
    first, _, _, numbers, empty = (frame.iloc[i] for i in range(5))
    assert first.PatientName == "Yamada^Tarou=山田^太郎=やまだ^たろう"
    assert first.OtherPatientNames == ["Yamada^T", "=山田^太郎"]
    assert numbers.ModalitiesInStudy == ["CT", "MR", "SR"]
    assert numbers.PixelSpacing == [0.5, 0.75]
    assert numbers.SelectorATValue == ["00100010", "7FE00010"]
    assert numbers.SelectorOBValue == b"\x00\x01\xfe\xff"
    assert numbers.AcquisitionDateTime == pd.Timestamp("2026-03-01 08:30:00.5")
    assert empty.ModalitiesInStudy == [] and empty.PixelSpacing == []
    assert empty.Rows is pd.NA and empty.PatientName is pd.NA


# --- what DICOM JSON allows that a DICOM encoding does not ---------------------------------


def one(item: dict, keyword: str):
    """The cell a single DICOM JSON attribute gives, and the warnings on the way."""
    tag = f"{frames.attribute(keyword).tag:08X}"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        frame = frames.from_dicom_json([{tag: item}], [keyword, "PatientID"])
    assert len(frame) == 1  # the row is always kept
    assert str(frame[keyword].dtype) == frames.attribute(keyword).dtype
    return frame[keyword][0], [str(w.message) for w in caught]


@pytest.mark.parametrize(
    ("keyword", "item", "expected"),
    [
        ("NumberOfStudyRelatedInstances", {"vr": "IS", "Value": ["42"]}, 42),
        ("NumberOfStudyRelatedInstances", {"vr": "IS", "Value": [42]}, 42),
        ("NumberOfStudyRelatedInstances", {"vr": "IS", "Value": [42.0]}, 42),
        ("SliceThickness", {"vr": "DS", "Value": ["1.25"]}, 1.25),
        ("SliceThickness", {"vr": "DS", "Value": [1.25]}, 1.25),
        ("SliceThickness", {"vr": "DS", "Value": [3]}, 3.0),
        ("PixelSpacing", {"vr": "DS", "Value": [0.5, "0.75"]}, [0.5, 0.75]),
        ("PixelSpacing", {"vr": "DS", "Value": [0.5, None]}, [0.5]),  # an empty value
        ("PatientName", {"vr": "PN", "Value": [{"Alphabetic": "Doe^Jane"}]}, "Doe^Jane"),
        ("PatientName", {"vr": "PN", "Value": [{"Ideographic": "山田^太郎"}]}, "=山田^太郎"),
        (
            "PatientName",
            {"vr": "PN", "Value": [{"Alphabetic": "A", "Ideographic": "", "Phonetic": "P"}]},
            "A==P",
        ),
        (
            "PatientName",
            {"vr": "PN", "Value": [{"Alphabetic": "A", "Ideographic": "", "Phonetic": ""}]},
            "A",
        ),
        ("PatientName", {"vr": "PN", "Value": ["Doe^Jane"]}, "Doe^Jane"),  # a lax server
        ("PatientName", {"vr": "PN"}, pd.NA),
        ("PatientName", {"vr": "PN", "Value": []}, pd.NA),
        ("PatientName", {"vr": "PN", "Value": [None]}, pd.NA),
        ("ModalitiesInStudy", {"vr": "CS"}, []),
        ("ModalitiesInStudy", {"vr": "CS", "Value": ["CT", None, "MR"]}, ["CT", "MR"]),
        ("ModalitiesInStudy", {"vr": "CS", "Value": "CT"}, ["CT"]),  # not in a list
        ("StudyDate", {"vr": "DA", "Value": ["20260301"]}, pd.Timestamp("2026-03-01")),
        ("StudyDate", {"Value": ["20260301"]}, pd.Timestamp("2026-03-01")),  # no vr
        ("StudyTime", {"vr": "TM", "Value": ["0830"]}, pd.Timedelta(hours=8, minutes=30)),
        (
            "AcquisitionDateTime",
            {"vr": "DT", "Value": ["20260301083000-0500"]},
            pd.Timestamp("2026-03-01 08:30"),
        ),
        ("Rows", {"vr": "US", "Value": [512]}, 512),
        ("Rows", {"vr": "US", "Value": ["512"]}, 512),  # a string for a binary number
        ("SelectorUVValue", {"vr": "UV", "Value": [2**63 - 1]}, [2**63 - 1]),
        ("SelectorFDValue", {"vr": "FD", "Value": [0.1]}, [0.1]),
        ("SelectorATValue", {"vr": "AT", "Value": ["0020000D"]}, ["0020000D"]),
        ("SelectorOBValue", {"vr": "OB", "InlineBinary": "AQIDBA=="}, b"\x01\x02\x03\x04"),
        (
            "SelectorOBValue",
            {"vr": "OB", "BulkDataURI": "https://pacs/bulk/1"},
            "https://pacs/bulk/1",
        ),
        ("SelectorOBValue", {"vr": "UN", "InlineBinary": "AQI="}, b"\x01\x02"),
        # UN with InlineBinary: the bytes, read by the dictionary's VR (US here).
        ("Rows", {"vr": "UN", "InlineBinary": base64.b64encode(b"\x00\x02").decode()}, 512),
        ("PatientName", {"vr": "UN", "InlineBinary": base64.b64encode(b"Doe").decode()}, "Doe"),
    ],
)
def test_dicom_json_forms(keyword, item, expected):
    cell, caught = one(item, keyword)
    assert not caught, caught
    if expected is pd.NA:
        assert cell is pd.NA
    else:
        assert cell == expected


@pytest.mark.parametrize(
    ("keyword", "item"),
    [
        ("StudyDate", {"vr": "DA", "Value": ["2026-13-45"]}),
        ("NumberOfStudyRelatedInstances", {"vr": "IS", "Value": [1.5]}),
        ("NumberOfStudyRelatedInstances", {"vr": "IS", "Value": [True]}),
        ("SliceThickness", {"vr": "DS", "Value": [{"x": 1}]}),
        ("SliceThickness", {"vr": "DS", "BulkDataURI": "https://pacs/bulk/2"}),
        ("PatientName", {"vr": "PN", "Value": [{"Alphabetic": 3}]}),
        ("PatientName", {"vr": "PN", "Value": [["Doe"]]}),
        ("Rows", {"vr": "US", "Value": [70000.5]}),
        ("Rows", {"vr": "US", "Value": [[1]]}),
        ("SelectorATValue", {"vr": "AT", "Value": ["0010"]}),
        ("SelectorATValue", {"vr": "AT", "Value": ["0010XYZ0"]}),
        ("SelectorOBValue", {"vr": "OB", "InlineBinary": "not base64!"}),
        ("SelectorOBValue", {"vr": "OB", "InlineBinary": 12}),
        ("StudyDescription", {"vr": "SQ", "Value": [{}]}),
        ("StudyDescription", "just a string"),
        ("StudyDescription", {"vr": "LO", "Value": ["\ud800"]}),  # a lone surrogate
        ("Modality", {"vr": "CS", "Value": ["CTé"]}),  # CS is ASCII, as over C-FIND
    ],
)
def test_malformed_dicom_json_warns_and_keeps_the_row(keyword, item):
    _, caught = one(item, keyword)
    assert caught and all(keyword in m for m in caught), caught


def test_keys_in_lower_case_sequences_and_private_tags():
    answer = [
        {
            "0020000d": {"vr": "UI", "Value": ["1.2.3"]},  # lower-case hex
            "00081115": {"vr": "SQ", "Value": [{"0020000E": {"vr": "UI", "Value": ["9"]}}]},
            "00091001": {"vr": "LO", "Value": ["private"]},
            "00091000": {"vr": "LO", "Value": ["CREATOR"]},
            "not a tag": 3,
        }
    ]
    frame = frames.from_dicom_json(answer, ["StudyInstanceUID", "SeriesInstanceUID"])
    assert frame.StudyInstanceUID.tolist() == ["1.2.3"]
    assert frame.SeriesInstanceUID.isna().all()  # only the top level is read, as in C-FIND


def test_non_objects_are_left_out_with_a_warning():
    with pytest.warns(MalformedValueWarning, match="2 match"):
        frame = frames.from_dicom_json([{}, 3, None], ["PatientID"])
    assert len(frame) == 1


def test_an_empty_answer_is_the_empty_typed_frame():
    columns = list(DEFAULT_KEYS["STUDY"])
    pd.testing.assert_frame_equal(
        frames.from_dicom_json(b"[]", columns), frames.empty_frame(columns)
    )


def test_a_query_gives_the_columns_and_attrs_of_a_cfind_frame():
    query = build_query("series", keys={"StudyInstanceUID": "1.2.3", "Modality": "CT"})
    answer = [{"0020000E": {"vr": "UI", "Value": ["1.2.3.4"]}, "00080060": {"vr": "CS"}}]
    frame = frames.from_dicom_json(answer, query, peer="https://archive/dicom-web")
    assert list(frame.columns) == query.columns
    assert frame.attrs["pacsframe"] == {
        "level": "SERIES",
        "model": "study",
        "keys": {"StudyInstanceUID": "1.2.3", "Modality": "CT"},
        "peer": "https://archive/dicom-web",
    }
    json.dumps(frame.attrs)  # JSON-safe


# --- property: any dataset, both ways --------------------------------------------------------

_LATIN1 = "AZaz09 .-'éüßÆø"
_UTF8 = _LATIN1 + "山田Ωжやま"
_CS = st.from_regex(r"[A-Z0-9_]{1,8}( [A-Z0-9_]{1,3})?", fullmatch=True)


def _text(alphabet: str, max_size: int = 20):
    return st.text(alphabet=alphabet, max_size=max_size)


def _pn(alphabet: str):
    component = _text(alphabet.replace(" ", ""), 8)
    group = st.lists(component, min_size=1, max_size=3).map("^".join)
    return st.lists(group, min_size=1, max_size=3).map("=".join)


def _values(alphabet: str) -> dict:
    """A value strategy per keyword: valid values, empties and a few malformed ones."""
    tm = st.times().map(lambda t: t.strftime("%H%M%S.%f").rstrip("0").rstrip("."))
    number = st.integers(-(10**9), 10**9).map(str)
    decimal = st.from_regex(r"-?[0-9]{1,6}(\.[0-9]{1,6})?", fullmatch=True)
    bad = st.sampled_from(["", "??", "20261345"])
    return {
        "PatientName": _pn(alphabet),
        "OtherPatientNames": st.lists(_pn(alphabet), max_size=3),
        "PatientID": _text(alphabet, 16),
        "StudyDescription": _text(alphabet, 30),
        "PatientComments": _text(alphabet + "\r\n", 40),
        "StudyDate": st.one_of(st.dates().map(lambda d: d.strftime("%Y%m%d")), bad),
        "StudyTime": st.one_of(tm, bad),
        "AcquisitionDateTime": st.one_of(
            st.datetimes(min_value=dt.datetime(1900, 1, 1)).map(
                lambda d: d.strftime("%Y%m%d%H%M%S.%f")
            ),
            st.from_regex(r"(19|20)[0-9]{2}(0[1-9](1[0-9])?)?([+-]0[0-9]00)?", fullmatch=True),
            bad,
        ),
        "ModalitiesInStudy": st.lists(_CS, max_size=3),
        "ImageType": st.lists(_CS, max_size=4),
        "StudyInstanceUID": st.from_regex(r"[1-9][0-9]{0,5}(\.[0-9]{1,6}){0,6}", fullmatch=True),
        # pydicom builds no IS or DS element of other text.
        "NumberOfStudyRelatedInstances": st.one_of(number, st.just("")),
        "SliceThickness": st.one_of(decimal, st.just("")),
        "PixelSpacing": st.lists(decimal, max_size=3),
        "Rows": st.integers(0, 2**16 - 1),
        "SelectorSSValue": st.lists(st.integers(-(2**15), 2**15 - 1), max_size=3),
        "SelectorSLValue": st.integers(-(2**31), 2**31 - 1),
        "SelectorULValue": st.lists(st.integers(0, 2**32 - 1), max_size=2),
        "SelectorFLValue": st.floats(width=32, allow_nan=False, allow_infinity=False),
        "SelectorFDValue": st.lists(st.floats(allow_nan=False, allow_infinity=False), max_size=3),
        "SelectorATValue": st.lists(st.integers(0, 2**32 - 1), max_size=3),
        "SelectorOBValue": st.binary(max_size=12).map(lambda b: b + b"\0" * (len(b) % 2)),
        "PatientAge": st.from_regex(r"[0-9]{3}[DWMY]", fullmatch=True),
    }


_CHARSETS = {None: "AZaz09 .-'", "ISO_IR 100": _LATIN1, "ISO_IR 192": _UTF8}


@st.composite
def datasets(draw) -> Dataset:
    charset = draw(st.sampled_from(list(_CHARSETS)))
    strategies = _values(_CHARSETS[charset])
    keywords = draw(st.lists(st.sampled_from(sorted(strategies)), max_size=8, unique=True))
    ds = Dataset()
    if charset:
        ds.SpecificCharacterSet = charset
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pydicom's validation of the malformed values
        for keyword in keywords:
            attr = frames.attribute(keyword)
            ds.add(DataElement(attr.tag, attr.vr, draw(strategies[keyword])))
    return ds


PROPERTY_COLUMNS = ["SpecificCharacterSet", *sorted(_values(""))]


@FUZZ
@given(st.lists(datasets(), min_size=1, max_size=4))
def test_any_dataset_gives_the_same_frame_over_json_as_over_cfind(batch):
    try:
        served = [served_json(ds) for ds in batch]
    except Exception:  # a value pydicom itself cannot write as JSON (a malformed DS)
        assume(False)
    reference, warned = by_cfind(batch, PROPERTY_COLUMNS)
    frame, warned_json = by_json(served, PROPERTY_COLUMNS)
    for column in PROPERTY_COLUMNS:
        pd.testing.assert_series_equal(frame[column], reference[column], obj=column)
    assert warned_json == warned


# --- property: any JSON at all ---------------------------------------------------------------

json_values = st.recursive(
    st.one_of(
        st.none(),
        st.booleans(),
        st.integers(-(2**70), 2**70),
        st.floats(),
        st.text(max_size=12),
        st.sampled_from(["20260301", "083000", "1.5", "CT", "0020000D", "AQI=", "=山田"]),
    ),
    lambda inner: st.one_of(
        st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=12), inner, max_size=3)
    ),
    max_leaves=8,
)


@st.composite
def json_objects(draw):
    """(columns, objects): DICOM JSON as a careless or hostile server might send it."""
    columns = draw(st.lists(st.sampled_from(PROPERTY_COLUMNS), min_size=1, max_size=6))
    columns = list(dict.fromkeys(columns))
    keys = st.one_of(
        st.sampled_from([f"{frames.attribute(c).tag:08X}" for c in columns]),
        st.sampled_from([f"{frames.attribute(c).tag:08x}" for c in columns]),
        st.text(max_size=9),
    )
    attribute = st.one_of(
        st.fixed_dictionaries(
            {},
            optional={
                "vr": st.one_of(st.sampled_from(sorted(frames._KNOWN_VRS)), st.text(max_size=3)),
                "Value": json_values,
                "InlineBinary": st.one_of(
                    st.binary(max_size=9).map(base64.b64encode), json_values
                ),
                "BulkDataURI": json_values,
            },
        ).map(lambda d: {k: v.decode() if isinstance(v, bytes) else v for k, v in d.items()}),
        json_values,
    )
    objects = draw(
        st.lists(st.one_of(st.dictionaries(keys, attribute, max_size=6), json_values), max_size=4)
    )
    return columns, objects


@FUZZ
@given(json_objects())
def test_any_json_becomes_a_typed_frame_with_malformed_value_warnings_only(case):
    from tests.test_fuzz import check_frame

    columns, objects = case
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        frame = frames.from_dicom_json(objects, columns)
    unexpected = [w for w in caught if not issubclass(w.category, MalformedValueWarning)]
    assert not unexpected, [str(w.message) for w in unexpected]
    rows = sum(isinstance(o, dict) for o in objects)
    check_frame(frame, columns, rows)


def _by_raw_elements(objects, columns) -> tuple[pd.DataFrame, set[str]]:
    """The reference road for add_json: every attribute as its raw element (json_element)."""
    builder = FrameBuilder(columns)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for obj in objects:
            if not isinstance(obj, dict):
                continue
            found = []
            for key, item in obj.items():
                tag = builder._json_tags.get(key)
                if tag is not None:
                    attr = frames.attribute(columns[builder._index[tag][-1]])
                    found.append((tag, frames.json_element(tag, item, attr)))
            builder._keep(found)
            builder._charsets[-1] = frames._UTF8_CHARSET
        frame = builder.frame()
    return frame, _malformed(caught)


# Text that the shortcut must leave to the raw road, or trim exactly as it does.
_TRICKY_TEXT = st.sampled_from(
    ["\ud800x", "\x1b$BF|", " a \x00", "  ", "é", "Doe^Jane ", "1.2.3", "+1e3", "\x01"]
)


@FUZZ
@given(
    json_objects(),
    st.lists(
        st.tuples(
            st.sampled_from([c for c in PROPERTY_COLUMNS if c != "SpecificCharacterSet"]),
            st.one_of(st.none(), st.sampled_from(sorted(frames._KNOWN_VRS))),
            st.lists(
                st.one_of(
                    _TRICKY_TEXT,
                    st.text(max_size=6),
                    st.integers(-5, 5),
                    st.floats(allow_nan=False),
                    st.fixed_dictionaries({"Alphabetic": st.one_of(_TRICKY_TEXT, st.text())}),
                ),
                max_size=2,
            ),
        ),
        max_size=4,
    ),
    st.integers(0, 7),
)
def test_add_json_shortcut_gives_what_the_raw_elements_give(case, extra, settle):
    """FrameBuilder.add_json takes plain text as it is; the frame and its warnings must be
    what the raw elements of the same JSON give through the C-FIND decoding, typed at
    once or in batches (FrameBuilder.settle, as QIDO-RS pages are)."""
    columns, objects = case
    columns = [c for c in columns if c != "SpecificCharacterSet"] or ["PatientID"]
    columns = list(dict.fromkeys(columns + [c for c, _, _ in extra]))
    built = {
        f"{frames.attribute(c).tag:08X}": {"Value": v, **({"vr": vr} if vr else {})}
        for c, vr, v in extra
    }
    objects = [*objects, built]
    reference, warned = _by_raw_elements(objects, columns)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        builder = FrameBuilder(columns)
        for i, obj in enumerate(objects):
            builder.add_json(obj)
            if settle >> (i % 3) & 1:
                builder.settle()
        assert len(builder) == sum(isinstance(o, dict) for o in objects)
        frame = builder.frame()
    for column in columns:
        pd.testing.assert_series_equal(frame[column], reference[column], obj=column)
    assert _malformed(caught) == warned


@pytest.mark.parametrize(
    "vr, keyword, good",
    [("US", "Rows", 7), ("IS", "NumberOfFrames", "7"), ("DA", "StudyDate", "20260301")],
)
def test_lone_surrogate_where_a_number_or_date_is_due_is_an_empty_cell(vr, keyword, good):
    """DICOM JSON can escape a lone surrogate ("\\ud800"); pandas' string dtype cannot
    hold one. Where a number or date is due it is malformed: an empty cell and a
    warning, never a UnicodeEncodeError."""
    tag = f"{frames.attribute(keyword).tag:08X}"
    with pytest.warns(MalformedValueWarning):
        frame = frames.from_dicom_json(
            [{tag: {"vr": vr, "Value": ["\ud800x"]}}, {tag: {"vr": vr, "Value": [good]}}],
            [keyword],
        )
    assert frame[keyword].isna().tolist() == [True, False]
