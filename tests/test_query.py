"""Unit tests of query building: every value form and every validation error."""

from __future__ import annotations

import datetime as dt

import numpy as np
import pandas as pd
import pytest
from hypothesis import given
from hypothesis import strategies as st

from pacsframe.errors import QueryError
from pacsframe.query import (
    DEFAULT_KEYS,
    build_query,
    encode_value,
    normalize_level,
    normalize_model,
    required_keys,
)

dates = st.dates(min_value=dt.date(1900, 1, 1), max_value=dt.date(2099, 12, 31))


# --- value forms a user would naturally pass ----------------------------------------------


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("20260301", "20260301"),
        ("2026-03-01", "20260301"),
        (dt.date(2026, 3, 1), "20260301"),
        (dt.datetime(2026, 3, 1, 9, 15), "20260301"),
        (pd.Timestamp("2026-03-01"), "20260301"),
        (np.datetime64("2026-03-01"), "20260301"),
        (("2026-03-01", "2026-04-06"), "20260301-20260406"),
        (("2026-03-01", None), "20260301-"),
        ((None, "2026-04-06"), "-20260406"),
        ((None, None), ""),
        ("20260301-20260406", "20260301-20260406"),
        ("20260301-", "20260301-"),
        ("-20260406", "-20260406"),
        (None, ""),
        ("", ""),
    ],
)
def test_date_values(value, expected):
    assert encode_value("StudyDate", value) == expected


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("0830", "0830"),
        ("08:30", "0830"),
        ("08:30:15.25", "083015.25"),
        (dt.time(8, 30), "083000"),
        (("08:00", "12:00"), "0800-1200"),
        ("0800-1200", "0800-1200"),
    ],
)
def test_time_values(value, expected):
    assert encode_value("StudyTime", value) == expected


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("2026-03-01T08:30", "202603010830"),
        (dt.datetime(2026, 3, 1, 8, 30), "20260301083000"),
        (("2026-03-01", "2026-03-02"), "20260301-20260302"),
        ("20260301083000+0100", "20260301083000+0100"),
    ],
)
def test_datetime_values(value, expected):
    assert encode_value("AcquisitionDateTime", value) == expected


@pytest.mark.parametrize(
    ("keyword", "value", "expected"),
    [
        ("Modality", "CT", "CT"),
        ("PatientName", "SMITH*", "SMITH*"),
        ("PatientName", "SM?TH^JOHN", "SM?TH^JOHN"),
        ("PatientName", "Müller*", "Müller*"),
        ("PatientID", "  123 ", "123"),
        ("SeriesNumber", 3, "3"),
        ("SeriesNumber", np.int64(3), "3"),
        ("SliceThickness", 1.5, "1.5"),
        ("StudyInstanceUID", ["1.2.3", "1.2.4"], "1.2.3\\1.2.4"),
        ("StudyInstanceUID", pd.Series(["1.2.3", "1.2.4"]), "1.2.3\\1.2.4"),
        ("StudyInstanceUID", "1.2.3\\1.2.4", "1.2.3\\1.2.4"),
        ("ModalitiesInStudy", ["CT", "MR"], "CT\\MR"),
        ("ModalitiesInStudy", "CT", "CT"),
        ("Modality", "*", "*"),
    ],
)
def test_other_values(keyword, value, expected):
    assert encode_value(keyword, value) == expected


def test_snake_case_keys_and_column_order():
    q = build_query(
        "study",
        keys={"patient_id": "123", "institution_name": "X*"},
        return_keys=["StationName"],
    )
    assert q.columns[: len(DEFAULT_KEYS["STUDY"])] == list(DEFAULT_KEYS["STUDY"])
    assert q.columns[-2:] == ["StationName", "InstitutionName"]
    assert q.matching == {"PatientID": "123", "InstitutionName": "X*"}


def test_required_parent_keys_come_first():
    q = build_query("image", "patient", keys={"PatientID": "1", "SeriesInstanceUID": "1.2"})
    assert q.columns[:3] == ["PatientID", "StudyInstanceUID", "SeriesInstanceUID"]


def test_non_ascii_query_declares_utf8():
    ds = build_query("study", keys={"PatientName": "Müller*"}).dataset()
    assert ds.SpecificCharacterSet == "ISO_IR 192"
    assert "SpecificCharacterSet" not in build_query("study", keys={"PatientID": "1"}).dataset()


def test_dataset_holds_ranges_and_binary_return_keys():
    ds = build_query(
        "image", keys={"StudyInstanceUID": "1.2", "SeriesInstanceUID": "1.3"}
    ).dataset()
    assert ds.QueryRetrieveLevel == "IMAGE"
    assert ds.Rows is None or ds.Rows == ""
    ds = build_query("study", keys={"StudyDate": ("2026-03-01", None)}).dataset()
    assert ds.StudyDate == "20260301-"


@pytest.mark.parametrize(
    ("text", "level"),
    [("study", "STUDY"), ("Patients", "PATIENT"), ("instances", "IMAGE"), ("IMAGE", "IMAGE")],
)
def test_level_aliases(text, level):
    assert normalize_level(text) == level


def test_model_aliases():
    assert normalize_model("Patient-Root") == "patient"
    assert normalize_model("study") == "study"


# --- every QueryError ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("keyword", "value", "message"),
    [
        ("StudyDate", "2026*", "wildcards are not allowed in a DA attribute; use a range"),
        ("StudyTime", "08*", "wildcards are not allowed in a TM"),
        ("AcquisitionDateTime", "2026?", "wildcards are not allowed in a DT"),
        ("StudyInstanceUID", "1.2.*", "wildcards are not allowed in a UID"),
        ("SeriesNumber", "1*", "wildcards are not allowed in a IS"),
        ("StudyDate", "20260230", "not a real date"),
        ("StudyDate", "2026-02-30", "not a real date"),
        ("StudyDate", "March 1st", "is not a date"),
        ("StudyDate", ("2026-04-06", "2026-03-01"), "starts after it ends"),
        ("StudyDate", ("2026-03-01",), "(start, end) pairs"),
        ("StudyTime", "25:00", "not a time of day"),
        ("StudyInstanceUID", "1.02.3", "not a valid UID"),
        ("StudyInstanceUID", "../../x", "not a valid UID"),
        ("StudyInstanceUID", "1." + "2" * 70, "not a valid UID"),
        ("PatientID", ["1", "2"], "takes a single value, not a list"),
        ("Modality", ["CT", "MR"], "takes a single value"),
        ("StudyInstanceUID", [], "empty list"),
        ("Modality", "ct", "use the upper-case code such as 'CT'"),
        ("SeriesNumber", (1, 2), "takes no range"),
        ("SeriesNumber", "abc", "not a number"),
        ("SeriesNumber", "1.5", "whole number"),
        ("AccessionNumber", "X" * 17, "at most 16 characters"),
        ("PatientID", True, "True/False"),
        ("PatientID", object(), "cannot match on a object"),
        ("PatientName", "A\\B", "backslash"),
    ],
)
def test_value_errors(keyword, value, message):
    with pytest.raises(QueryError, match=_escape(message)):
        encode_value(keyword, value)


def _escape(text: str) -> str:
    import re

    return re.escape(text)


def test_unknown_keyword_with_suggestion():
    with pytest.raises(QueryError, match="did you mean 'StudyDate'"):
        build_query("study", keys={"StudyDat": "20260301"})


def test_reserved_keys_are_refused():
    with pytest.raises(QueryError, match="set by pacsframe"):
        build_query("study", keys={"QueryRetrieveLevel": "SERIES"})


def test_same_key_twice_is_refused():
    with pytest.raises(QueryError, match="given twice"):
        build_query("study", keys={"PatientID": "1", "patient_id": "1"})


@pytest.mark.parametrize(
    ("level", "model", "key"),
    [
        ("STUDY", "patient", "PatientID"),
        ("SERIES", "patient", "PatientID"),
        ("SERIES", "study", "StudyInstanceUID"),
        ("IMAGE", "study", "StudyInstanceUID"),
    ],
)
def test_missing_required_key_says_how_to_drill_down(level, model, key):
    with pytest.raises(QueryError, match=f"needs {key}.*drill down"):
        build_query(level, model).check_required()


def test_required_key_must_be_single_value():
    q = build_query("series", keys={"StudyInstanceUID": ["1.2", "1.3"]})
    with pytest.raises(QueryError, match="single value"):
        q.check_required()


def test_patient_level_needs_patient_root():
    with pytest.raises(QueryError, match="no PATIENT level"):
        build_query("patient", "study")
    assert required_keys("PATIENT", "patient") == ()


def test_bad_level_and_model():
    with pytest.raises(QueryError, match="not a query level"):
        normalize_level("frame")
    with pytest.raises(QueryError, match="not a query/retrieve model"):
        normalize_model("worklist")


def test_sequence_return_key_refused():
    with pytest.raises(QueryError, match="sequence"):
        build_query("study", return_keys=["ReferencedStudySequence"])


# --- properties --------------------------------------------------------------------------------


@given(dates, dates)
def test_date_range_round_trip(a, b):
    lo, hi = sorted((a, b))
    text = encode_value("StudyDate", (lo, hi))
    assert text == f"{lo:%Y%m%d}-{hi:%Y%m%d}"
    assert encode_value("StudyDate", text) == text
    assert encode_value("StudyDate", (lo.isoformat(), hi.isoformat())) == text


@given(dates)
def test_open_ranges_round_trip(d):
    assert encode_value("StudyDate", (d, None)) == f"{d:%Y%m%d}-"
    assert encode_value("StudyDate", (None, d)) == f"-{d:%Y%m%d}"
    assert encode_value("StudyDate", f"{d:%Y%m%d}-") == f"{d:%Y%m%d}-"


@given(st.text(alphabet="ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789^ *?", min_size=1, max_size=60))
def test_wildcard_strings_pass_through_for_pn(text):
    if not text.strip():
        assert encode_value("PatientName", text) == ""
    else:
        assert encode_value("PatientName", text) == text.strip()


@given(st.text(min_size=1, max_size=20))
def test_arbitrary_date_text_is_a_query_error_or_a_valid_date(text):
    try:
        out = encode_value("StudyDate", text)
    except QueryError:
        return
    for part in out.split("-"):
        if part:
            dt.date(int(part[:4]), int(part[4:6]), int(part[6:8]))
