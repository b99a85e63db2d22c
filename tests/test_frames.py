"""Unit tests of the VR -> dtype converters, the keyword dictionary and level inference."""

from __future__ import annotations

import datetime as dt
import json
import struct
import warnings
from io import BytesIO

import pandas as pd
import pytest
from hypothesis import given
from hypothesis import strategies as st
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.filereader import read_dataset
from pydicom.filewriter import write_dataset
from pynetdicom.dsutils import decode, encode

from pacsframe import frames
from pacsframe.errors import QueryError
from pacsframe.frames import FrameBuilder, MalformedValueWarning, to_dicom, to_series


def wire(ds: Dataset, implicit: bool = False) -> Dataset:
    """Encode and decode as pynetdicom does, so elements arrive raw."""
    return decode(BytesIO(encode(ds, implicit, True)), implicit, True)


# --- one converter per VR family -------------------------------------------------------


def test_da_to_datetime64_with_nat_for_empty():
    s = to_series(["20260301", None, "2026.03.02"], "StudyDate")
    assert str(s.dtype) == "datetime64[ns]"
    assert s.tolist()[0] == pd.Timestamp("2026-03-01")
    assert s.isna().tolist() == [False, True, False]
    assert s[2] == pd.Timestamp("2026-03-02")


def test_tm_to_timedelta_so_date_plus_time_is_a_timestamp():
    times = to_series(["083000", "0830", "08", "08:30:15.5", None], "StudyTime")
    assert str(times.dtype) == "timedelta64[ns]"
    assert times[0] == pd.Timedelta(hours=8, minutes=30)
    assert times[1] == times[0]
    assert times[2] == pd.Timedelta(hours=8)
    assert times[3] == pd.Timedelta(hours=8, minutes=30, seconds=15.5)
    assert pd.isna(times[4])
    dates = to_series(["20260301"] * 5, "StudyDate")
    assert (dates + times)[0] == pd.Timestamp("2026-03-01 08:30")


def test_dt_to_datetime64_partial_and_offset():
    s = to_series(["20260301083000.123+0100", "2026", "202603", None], "AcquisitionDateTime")
    assert str(s.dtype) == "datetime64[ns]"
    assert s[0] == pd.Timestamp("2026-03-01 08:30:00.123")
    assert s[1] == pd.Timestamp("2026-01-01")
    assert s[2] == pd.Timestamp("2026-03-01")
    assert pd.isna(s[3])


@pytest.mark.parametrize(
    ("keyword", "values", "expected"),
    [
        ("SeriesNumber", ["12", " 3 ", None], [12, 3, pd.NA]),  # IS
        ("Rows", [512, None], [512, pd.NA]),  # US
        ("SmallestImagePixelValue", [5, None], [5, pd.NA]),  # "US or SS" -> US
    ],
)
def test_integer_vrs_are_nullable_int64(keyword, values, expected):
    s = to_series(values, keyword)
    assert str(s.dtype) == "Int64"
    assert [None if pd.isna(v) else v for v in s] == [None if e is pd.NA else e for e in expected]


@pytest.mark.parametrize("keyword", ["SliceThickness", "EchoTime"])  # DS, DS
def test_decimal_strings_are_nullable_float64(keyword):
    s = to_series(["1.5", "1e3", None], keyword)
    assert str(s.dtype) == "Float64"
    assert s[0] == 1.5 and s[1] == 1000.0 and pd.isna(s[2])


def test_binary_float_vrs():
    s = to_series([1.25, None], "RecommendedDisplayFrameRateInFloat")  # FL
    assert str(s.dtype) == "Float64"
    assert s[0] == 1.25 and pd.isna(s[1])


@pytest.mark.parametrize(
    "keyword",
    [
        *("PatientName", "StudyInstanceUID", "Modality", "AccessionNumber"),
        *("StudyDescription", "StudyComments", "StationAETitle", "PatientAge"),
        "InstitutionAddress",
    ],
)
def test_string_vrs_are_string_dtype_with_na(keyword):
    s = to_series(["X", None], keyword)
    assert str(s.dtype) == "string"
    assert s[0] == "X" and s[1] is pd.NA


def test_multivalued_attributes_are_lists_typed_elementwise():
    mods = to_series(["CT\\MR", None, "CT", ["PT", "CT"]], "ModalitiesInStudy")
    assert mods.tolist() == [["CT", "MR"], [], ["CT"], ["PT", "CT"]]
    ipp = to_series(["1.0\\2\\-3.5", None], "ImagePositionPatient")
    assert ipp.tolist() == [[1.0, 2.0, -3.5], []]
    assert all(isinstance(v, float) for v in ipp[0])
    types = to_series(["ORIGINAL\\PRIMARY\\AXIAL"], "ImageType")
    assert types[0] == ["ORIGINAL", "PRIMARY", "AXIAL"]


def test_malformed_values_become_empty_with_a_warning_naming_the_attribute():
    with pytest.warns(MalformedValueWarning, match="StudyDate"):
        s = to_series(["20261345", "20260301"], "StudyDate")
    assert pd.isna(s[0]) and s[1] == pd.Timestamp("2026-03-01")
    with pytest.warns(MalformedValueWarning, match="SeriesNumber"):
        to_series(["x"], "SeriesNumber")
    with pytest.warns(MalformedValueWarning, match="StudyTime"):
        to_series(["996"], "StudyTime")


@pytest.mark.parametrize(
    ("keyword", "value"), [("StudyDate", "22630101"), ("AcquisitionDateTime", "16000101120000")]
)
def test_dates_datetime64_ns_cannot_hold_are_empty_with_a_warning(keyword, value):
    # pandas 3 parses them at microsecond resolution; the cast to ns raised, losing
    # the whole frame (found by tests/test_dicom_json.py).
    with pytest.warns(MalformedValueWarning, match=keyword):
        s = to_series([value, "20260301"], keyword)
    assert pd.isna(s[0]) and s[1] == pd.Timestamp("2026-03-01")
    assert str(s.dtype) == "datetime64[ns]"


def test_empty_frame_has_the_right_dtypes():
    f = frames.empty_frame(["StudyDate", "StudyTime", "SeriesNumber", "PatientName"])
    assert list(f.dtypes.astype(str)) == ["datetime64[ns]", "timedelta64[ns]", "Int64", "string"]
    assert len(f) == 0


# --- keyword dictionary ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "keyword"),
    [
        ("PatientID", "PatientID"),
        ("patient_id", "PatientID"),
        ("study_instance_uid", "StudyInstanceUID"),
        ("modalities_in_study", "ModalitiesInStudy"),
    ],
)
def test_snake_case_spellings_map_to_keywords(name, keyword):
    assert frames.normalize_keyword(name) == keyword


def test_unknown_keyword_suggests_the_close_match():
    with pytest.raises(QueryError, match="did you mean 'PatientName'"):
        frames.attribute("PatientNme")
    with pytest.raises(QueryError, match="not a DICOM keyword"):
        frames.attribute("Zzzzzz")


def test_sequences_are_refused_with_a_sentence():
    with pytest.raises(QueryError, match="sequence"):
        frames.attribute("ReferencedStudySequence")


# --- identifiers from the wire -----------------------------------------------------------


@pytest.mark.parametrize("implicit", [True, False])
def test_builder_reads_raw_elements_of_every_family(implicit):
    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.PatientName = "Müller^Jürgen"
    ds.StudyDate = "20260301"
    ds.StudyTime = "083000"
    ds.ModalitiesInStudy = ["CT", "MR"]
    ds.Rows = 512
    ds.SliceThickness = "1.25"
    ds.NumberOfStudyRelatedInstances = "42"
    ds.add(DataElement(0x00081030, "LO", ""))  # StudyDescription, present but empty
    columns = [
        "PatientName",
        "StudyDate",
        "StudyTime",
        "ModalitiesInStudy",
        "Rows",
        "SliceThickness",
        "NumberOfStudyRelatedInstances",
        "StudyDescription",
        "AccessionNumber",
    ]
    fb = FrameBuilder(columns)
    fb.add(wire(ds, implicit))
    f = fb.frame()
    assert list(f.columns) == columns
    row = f.iloc[0]
    assert row.PatientName == "Müller^Jürgen"
    assert row.StudyDate == pd.Timestamp("2026-03-01")
    assert row.StudyTime == pd.Timedelta(hours=8, minutes=30)
    assert row.ModalitiesInStudy == ["CT", "MR"]
    assert row.Rows == 512 and row.SliceThickness == 1.25
    assert row.NumberOfStudyRelatedInstances == 42
    assert row.StudyDescription is pd.NA and row.AccessionNumber is pd.NA


def _encoded(ds: Dataset, implicit: bool) -> bytes:
    out = DicomBytesIO()
    out.is_little_endian, out.is_implicit_VR = True, implicit
    write_dataset(out, ds)
    return out.getvalue()


def _header_with_sequences() -> Dataset:
    """A header whose wanted elements sit around nested undefined-length sequences."""
    inner = Dataset()
    inner.CodeValue, inner.CodeMeaning = "113691", "IHE Profile"
    inner.is_undefined_length_sequence_item = True
    item = Dataset()
    item.ReferencedSOPInstanceUID = "1.2.3.4"
    item.add(DataElement(0x00400260, "SQ", [inner], is_undefined_length=True))
    item.is_undefined_length_sequence_item = True
    sized = Dataset()
    sized.ReferencedSOPInstanceUID = "1.2.3.5"
    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.PatientName = "Gauß^Björn"
    ds.add(DataElement(0x00081140, "SQ", [item, item], is_undefined_length=True))
    ds.add(DataElement(0x00081115, "SQ", [sized]))  # defined length
    ds.StudyInstanceUID = "1.2.826.0.1.3680043.2.1"
    ds.InstanceNumber = "7"
    ds.ImageType = ["ORIGINAL", "PRIMARY"]
    ds.Rows = 2
    ds.add(DataElement(0x7FE00010, "OB", b"\x00\x01\x02\x03"))
    return ds


@pytest.mark.parametrize("implicit", [True, False])
def test_scan_finds_what_pydicom_reads_stepping_over_nested_sequences(implicit):
    data = _encoded(_header_with_sequences(), implicit)
    wanted = {0x00080005, 0x00100010, 0x0020000D, 0x00200013, 0x00080008, 0x00280010}
    found = frames.scan_elements(data, implicit, wanted)
    reference = read_dataset(BytesIO(data), implicit, True)
    assert found is not None and set(found) == wanted
    for tag, elem in found.items():
        raw = reference._dict[tag]
        assert (elem.value, elem.VR, elem.length) == (raw.value, raw.VR, raw.length)
        assert type(elem.value) is bytes


def test_scan_stops_at_pixel_data_and_reads_memoryviews():
    data = _encoded(_header_with_sequences(), False)
    found = frames.scan_elements(memoryview(data), False, {0x00280010, 0x7FE00010}, 0x7FE00008)
    assert found is not None and list(found) == [0x00280010]
    assert found[0x00280010].value == b"\x02\x00"


def test_scan_leaves_what_it_cannot_read_to_pydicom():
    data = _encoded(_header_with_sequences(), False)
    # a wanted sequence, a truncated element, bytes where a VR should be, a stray delimiter
    assert frames.scan_elements(data, False, {0x00081140}) is None
    assert frames.scan_elements(data, False, {0x00081115}) is None
    assert frames.scan_elements(data[:40], False, {0x00100010}) is None
    bad_vr = bytes.fromhex("10001000") + b"\x00\x01" + struct.pack("<H", 2) + b"AB"
    assert frames.scan_elements(bad_vr, False, {0x00100010}) is None
    assert frames.scan_elements(bytes.fromhex("FEFF0DE0 00000000"), True, {0x00100010}) is None
    # implicit VR, a sequence of undefined length that never ends
    endless = bytes.fromhex("08004011 FFFFFFFF FEFF00E0 FFFFFFFF")
    assert frames.scan_elements(endless, True, {0x00100010}) is None


def test_add_raw_builds_the_same_frame_as_a_decoded_dataset():
    columns = ["PatientName", "StudyInstanceUID", "InstanceNumber", "ImageType", "Rows"]
    for implicit in (True, False):
        data = _encoded(_header_with_sequences(), implicit)
        by_bytes, by_dataset = FrameBuilder(columns), FrameBuilder(columns)
        assert by_bytes.add_raw(data, implicit)
        by_dataset.add(read_dataset(BytesIO(data), implicit, True))
        pd.testing.assert_frame_equal(by_bytes.frame(), by_dataset.frame())
        assert by_bytes.frame().PatientName[0] == "Gauß^Björn"


def test_add_raw_declines_unreadable_bytes():
    data = _encoded(_header_with_sequences(), True)
    builder = FrameBuilder(["PatientName"])
    assert not builder.add_raw(data[:30], True)  # cut inside PatientName
    assert len(builder) == 0


@pytest.mark.parametrize(
    ("charset", "name"),
    [
        ("ISO_IR 192", "Łukasiewicz^Zoë"),
        ("ISO_IR 100", "Gauß^Björn"),
        (None, "SMITH^JOHN"),
        ("ISO_IR 101", "Dvořák^Antonín"),  # Latin-2
        ("ISO 2022 IR 6\\ISO 2022 IR 87", "Yamada^Tarou=山田^太郎"),
    ],
)
def test_character_sets_decode(charset, name):
    ds = Dataset()
    if charset:
        ds.SpecificCharacterSet = charset.split("\\") if "\\" in charset else charset
    ds.PatientName = name
    fb = FrameBuilder(["PatientName"])
    fb.add(wire(ds))
    assert fb.frame().PatientName[0] == name


def test_builder_keeps_going_on_undecodable_values():
    # Implicit VR little endian by hand: Rows (US) with 3 bytes, then PatientID.
    raw = struct.pack("<HHI", 0x0010, 0x0020, 2) + b"P1"
    raw = struct.pack("<HHI", 0x0008, 0x0005, 10) + b"ISO_IR 999" + raw
    raw += struct.pack("<HHI", 0x0028, 0x0010, 3) + b"\x01\x02\x03"
    ds = decode(BytesIO(raw), True, True)
    fb = FrameBuilder(["Rows", "PatientID"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fb.add(ds)
    f = fb.frame()
    assert f.PatientID[0] == "P1"


# --- typed values back to DICOM ------------------------------------------------------------


def test_to_dicom_inverse_forms():
    assert to_dicom(pd.Timestamp("2026-03-01"), "StudyDate") == "20260301"
    assert to_dicom(dt.date(2026, 3, 1), "StudyDate") == "20260301"
    assert to_dicom(pd.Timedelta(hours=8, minutes=30), "StudyTime") == "083000"
    assert to_dicom(pd.Timestamp("2026-03-01 08:30:01.5"), "AcquisitionDateTime") == (
        "20260301083001.500000"
    )
    assert to_dicom(["CT", "MR"], "ModalitiesInStudy") == "CT\\MR"
    assert to_dicom(pd.NA, "PatientID") == ""
    assert to_dicom(pd.NaT, "StudyDate") == ""
    assert to_dicom(3, "SeriesNumber") == "3"
    assert to_dicom(1.5, "SliceThickness") == "1.5"
    assert to_dicom([1.0, 0.5], "PixelSpacing") == "1\\0.5"


@given(st.dates(min_value=dt.date(1900, 1, 1), max_value=dt.date(2099, 12, 31)))
def test_date_round_trip(day):
    text = to_dicom(day, "StudyDate")
    assert to_series([text], "StudyDate")[0] == pd.Timestamp(day)


@given(st.times())
def test_time_round_trip(t):
    text = to_dicom(t, "StudyTime")
    got = to_series([text], "StudyTime")[0]
    assert got == pd.Timedelta(
        hours=t.hour, minutes=t.minute, seconds=t.second, microseconds=t.microsecond
    )


@given(st.datetimes(min_value=dt.datetime(1900, 1, 1), max_value=dt.datetime(2099, 12, 31)))
def test_datetime_round_trip(stamp):
    text = to_dicom(stamp, "AcquisitionDateTime")
    assert to_series([text], "AcquisitionDateTime")[0] == pd.Timestamp(stamp)


@given(st.floats(allow_nan=False, allow_infinity=False, min_value=-1e9, max_value=1e9))
def test_decimal_string_round_trip_within_16_chars(x):
    text = to_dicom(x, "SliceThickness")
    assert len(text) <= 16
    assert to_series([text], "SliceThickness")[0] == pytest.approx(x, rel=1e-9, abs=1e-9)


# --- levels ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("columns", "level"),
    [
        (["PatientID"], "PATIENT"),
        (["PatientID", "StudyInstanceUID"], "STUDY"),
        (["StudyInstanceUID", "SeriesInstanceUID", "Modality"], "SERIES"),
        (["SeriesInstanceUID", "SOPInstanceUID"], "IMAGE"),
    ],
)
def test_level_inference_from_most_specific_uid(columns, level):
    assert frames.infer_level(pd.DataFrame(columns=columns)) == level


def test_level_inference_refuses_frames_without_uids():
    with pytest.raises(QueryError, match="cannot tell the level"):
        frames.infer_level(pd.DataFrame(columns=["Modality"]))


def test_attrs_are_json_safe_shapes():
    # The attrs pacsframe writes are plain JSON; this guards the helper used for them.
    from pacsframe.query import build_query

    q = build_query("study", keys={"StudyDate": ("2026-03-01", None), "PatientID": "1"})
    json.dumps(q.to_json())


def test_one_pass_header_strings_read_a_value_by_its_wire_vr_as_the_two_steps_do():
    # Rows (US in the dictionary) sent as IS "12", PatientName as PN, then pixel data.
    data = bytes.fromhex("10001000") + b"PN" + struct.pack("<H", 4) + b"Doe^"
    data += bytes.fromhex("28001000") + b"IS" + struct.pack("<H", 2) + b"12"
    data += bytes.fromhex("E07F1000") + b"OW\0\0" + struct.pack("<I", 2) + b"\0\0"
    columns = ["PatientName", "Rows"]
    one = frames.scan_strings(data, False, columns, 0x7FE00008, True)
    found = frames.scan_elements(data, False, {0x00100010, 0x00280010}, 0x7FE00008)
    assert found is not None
    two = frames.raw_strings(found, columns)
    assert two == {"PatientName": "Doe^", "Rows": "12"}
    assert one is None or one == two
    # Sent as the dictionary says, it is read in the one pass.
    plain = data.replace(b"IS\x02\x0012", b"US\x02\x00" + struct.pack("<H", 512))
    assert frames.scan_strings(plain, False, columns, 0x7FE00008, True) == {
        "PatientName": "Doe^",
        "Rows": "512",
    }
