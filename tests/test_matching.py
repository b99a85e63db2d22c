"""The C-FIND matching rules of PS3.4 C.2.2.2 over typed frames (pacsframe.matching)."""

from __future__ import annotations

import datetime as dt
import re
import time

import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pacsframe import matching
from pacsframe.errors import QueryError
from pacsframe.frames import empty_frame, to_series
from pacsframe.matching import is_universal, match
from pacsframe.query import Query


def frame_of(**columns: list) -> pd.DataFrame:
    """A frame typed exactly as pacsframe types C-FIND answers."""
    return pd.DataFrame(
        {keyword: to_series(values, keyword) for keyword, values in columns.items()}
    )


def hits(frame: pd.DataFrame, **keys) -> list[int]:
    mask = match(frame, keys)
    assert mask.dtype == bool
    assert mask.index.equals(frame.index)
    return [i for i, hit in enumerate(mask.tolist()) if hit]


@pytest.fixture
def studies() -> pd.DataFrame:
    return frame_of(
        PatientID=["P1", "P2", "p1", None, "P10"],
        PatientName=["Smith^John", "SMYTH^Jane", "Müller^Jürgen", None, "Smith^John^^^"],
        StudyDate=["20260301", "20260406", "20260407", None, "20251231"],
        StudyTime=["083000", "140000.5", "235959", None, "14"],
        StudyInstanceUID=["1.2.3", "1.2.4", "1.2.30", "1.2.5", "1.2.6"],
        ModalitiesInStudy=["CT\\MR", "MR", "CT", None, "PT\\CT"],
        NumberOfStudyRelatedInstances=["5", "12", None, "5", "0"],
        PatientAge=["042Y", "042Y", None, "003M", "042Y"],
        StudyDescription=["CT HEAD", "MR (knee) 1.5T", "ct head", None, "CT*HEAD"],
    )


# --- universal matching --------------------------------------------------------------------------


@pytest.mark.parametrize("value", [None, "", "*", "**", " * ", [], [""], ["CT", "*"]])
def test_universal_values_match_every_row_including_empty(studies, value):
    for keyword in ("PatientName", "StudyDate", "ModalitiesInStudy", "PatientAge"):
        assert hits(studies, **{keyword: value}) == [0, 1, 2, 3, 4]


def test_star_alone_is_universal_in_every_vr(studies):
    for keyword in ("StudyInstanceUID", "NumberOfStudyRelatedInstances", "StudyTime"):
        assert hits(studies, **{keyword: "*"}) == [0, 1, 2, 3, 4]


def test_is_universal():
    assert is_universal(None) and is_universal("") and is_universal("*") and is_universal([])
    assert is_universal("CT\\*")
    assert not is_universal("CT") and not is_universal("SMITH*") and not is_universal("?")


def test_no_keys_match_everything(studies):
    assert hits(studies) == [0, 1, 2, 3, 4]


def test_missing_column_is_not_matchable_and_ignored(studies):
    # The frame has no Modality column: the key is treated as unsupported.
    assert hits(studies, Modality="CT") == [0, 1, 2, 3, 4]
    assert hits(studies, Modality="CT", PatientID="P1") == [0]


def test_bad_value_raises_even_when_the_column_is_missing(studies):
    with pytest.raises(QueryError, match="SeriesDate"):
        match(studies, {"SeriesDate": "2026-13-45"})


def test_query_retrieve_level_and_character_set_are_never_matched(studies):
    keys = {"QueryRetrieveLevel": "SERIES", "SpecificCharacterSet": "ISO_IR 100"}
    assert hits(studies, **keys) == [0, 1, 2, 3, 4]
    frame = studies.assign(
        SpecificCharacterSet=to_series(["ISO_IR 192"] * 5, "SpecificCharacterSet")
    )
    assert hits(frame, SpecificCharacterSet="ISO_IR 100") == [0, 1, 2, 3, 4]


def test_unknown_keyword_and_sequence_raise(studies):
    with pytest.raises(QueryError, match="PatientID"):
        match(studies, {"PatientIDD": "1"})
    with pytest.raises(QueryError, match="sequence"):
        match(studies, {"ReferencedSeriesSequence": "1"})


def test_snake_case_keywords(studies):
    assert hits(studies, patient_id="P1") == [0]


# --- single value matching -----------------------------------------------------------------------


def test_single_value_is_exact_and_case_sensitive(studies):
    assert hits(studies, PatientID="P1") == [0]
    assert hits(studies, PatientID="p1") == [2]
    assert hits(studies, StudyDescription="CT HEAD") == [0]


def test_insignificant_spaces_are_ignored(studies):
    assert hits(studies, PatientID=" P1  ") == [0]
    padded = frame_of(PatientID=["P1 ", " P2", "P3"])
    assert hits(padded, PatientID="P1") == [0]
    assert hits(padded, PatientID="P2") == [1]


def test_leading_spaces_are_significant_in_text_vrs():
    frame = frame_of(StudyComments=["  indented", "indented"])
    assert hits(frame, StudyComments="indented") == [1]
    assert hits(frame, StudyComments="  indented") == [0]


def test_empty_values_never_match_a_value(studies):
    # Row 3 is empty in every column but StudyInstanceUID and the count.
    for keyword, value in [
        ("PatientName", "*a*"),
        ("PatientID", "?*"),
        ("StudyDate", "-20991231"),
        ("StudyTime", "00-"),
        ("ModalitiesInStudy", "CT\\MR\\PT"),
    ]:
        assert 3 not in hits(studies, **{keyword: value}), keyword
    assert hits(studies, PatientAge="003M\\042Y\\") == [0, 1, 3, 4]  # row 2 is empty


def test_pn_is_case_insensitive_on_the_whole_string(studies):
    assert hits(studies, PatientName="smith^john") == [0, 4]
    assert hits(studies, PatientName="SMITH*") == [0, 4]
    assert hits(studies, PatientName="MÜLLER^JÜRGEN") == [2]
    # The whole string, not a component: a family name alone matches nothing.
    assert hits(studies, PatientName="Smith") == []
    assert hits(studies, PatientName="*^Jane") == [1]


def test_pn_trailing_empty_components_are_insignificant():
    frame = frame_of(PatientName=["Smith^John", "Smith^John^^", "Yamada^Tarō^=山田^太郎", "Smith"])
    assert hits(frame, PatientName="Smith^John^^^") == [0, 1]
    assert hits(frame, PatientName="Smith^") == [3]
    assert hits(frame, PatientName="yamada^tarō=山田^太郎") == [2]
    assert hits(frame, PatientName="*=山田*") == [2]


def test_non_pn_strings_are_case_sensitive_with_wildcards(studies):
    assert hits(studies, StudyDescription="ct*") == [2]
    assert hits(studies, StudyDescription="CT*") == [0, 4]


# --- wild cards ----------------------------------------------------------------------------------


def test_wildcards(studies):
    assert hits(studies, PatientID="P?") == [0, 1]
    assert hits(studies, PatientID="P*") == [0, 1, 4]
    assert hits(studies, PatientID="*1*") == [0, 2, 4]
    assert hits(studies, PatientID="P1*") == [0, 4]  # "*" matches zero characters too
    assert hits(studies, PatientName="S?ITH^JOHN") == [0, 4]


def test_regex_characters_are_literal(studies):
    assert hits(studies, StudyDescription="MR (knee) 1.5T") == [1]
    assert hits(studies, StudyDescription="MR (knee) 1?5T") == [1]
    assert hits(studies, StudyDescription="MR (knee) 1x5T") == []
    assert hits(studies, StudyDescription="*.5T") == [1]
    assert hits(studies, StudyDescription="*(*") == [1]
    frame = frame_of(StudyDescription=["a|b", "a", "a+b", "[ab]", "a\tb"])
    assert hits(frame, StudyDescription="a|b") == [0]
    assert hits(frame, StudyDescription="a+b") == [2]
    assert hits(frame, StudyDescription="[ab]") == [3]
    assert hits(frame, StudyDescription="a?b") == [0, 2, 4]


def test_wildcards_are_literal_in_uid_and_age(studies):
    assert hits(studies, StudyInstanceUID="1.2.*") == []
    assert hits(studies, StudyInstanceUID="1.2.?") == []
    assert hits(studies, PatientAge="04?Y") == []
    frame = frame_of(StudyInstanceUID=["1.2.*", "1.2.3"])
    assert hits(frame, StudyInstanceUID="1.2.*") == [0]


def test_wildcards_in_dates_and_numbers_are_errors(studies):
    with pytest.raises(QueryError, match="StudyDate"):
        match(studies, {"StudyDate": "2026*"})
    with pytest.raises(QueryError, match="number"):
        match(studies, {"NumberOfStudyRelatedInstances": "1*"})


# --- lists: UID lists, multiple values, multi-valued attributes ----------------------------------


def test_list_of_uid_matching(studies):
    assert hits(studies, StudyInstanceUID="1.2.3\\1.2.5") == [0, 3]
    assert hits(studies, StudyInstanceUID=["1.2.4", "1.2.6", "9.9"]) == [1, 4]
    assert hits(studies, StudyInstanceUID="1.2.3") == [0]  # not a prefix of 1.2.30


def test_multiple_values_on_a_single_valued_attribute_match_any():
    frame = frame_of(Modality=["CT", "MR", "PT", None])
    assert hits(frame, Modality="CT\\MR") == [0, 1]
    assert hits(frame, Modality=["PT", "US"]) == [2]


def test_multi_valued_attribute_matches_any_element(studies):
    assert hits(studies, ModalitiesInStudy="CT") == [0, 2, 4]
    assert hits(studies, ModalitiesInStudy="MR") == [0, 1]
    assert hits(studies, ModalitiesInStudy="PT\\MR") == [0, 1, 4]
    assert hits(studies, ModalitiesInStudy="?T") == [0, 2, 4]
    assert hits(studies, ModalitiesInStudy="US") == []


def test_multi_valued_numbers_and_strings():
    frame = frame_of(
        ImageType=["ORIGINAL\\PRIMARY\\AXIAL", "DERIVED\\SECONDARY", None],
        PixelSpacing=["0.5\\0.5", "0.25\\1", None],
        OtherPatientIDs=["A1\\B2", None, "C3"],
    )
    assert hits(frame, ImageType="AXIAL") == [0]
    assert hits(frame, ImageType="DERIVED\\AXIAL") == [0, 1]
    assert hits(frame, PixelSpacing="1") == [1]
    assert hits(frame, PixelSpacing="0.50") == [0]
    assert hits(frame, OtherPatientIDs="B*") == [0]


def test_backslash_is_text_in_st_lt_ut():
    frame = frame_of(StudyComments=["a\\b", "a"])
    assert hits(frame, StudyComments="a\\b") == [0]


# --- numbers -------------------------------------------------------------------------------------


def test_numbers_match_by_value(studies):
    assert hits(studies, NumberOfStudyRelatedInstances="5") == [0, 3]
    assert hits(studies, NumberOfStudyRelatedInstances="5.0") == [0, 3]
    assert hits(studies, NumberOfStudyRelatedInstances=" 012 ") == [1]
    assert hits(studies, NumberOfStudyRelatedInstances="0\\12") == [1, 4]
    frame = frame_of(SliceThickness=["2.5", "2.50", "3", None], Rows=[512, 256, None, 512])
    assert hits(frame, SliceThickness="2.5") == [0, 1]
    assert hits(frame, SliceThickness="2.5e0") == [0, 1]
    assert hits(frame, Rows="512") == [0, 3]


@pytest.mark.parametrize("value", ["five", "5-6", "nan", "inf"])
def test_bad_numbers_raise(studies, value):
    with pytest.raises(QueryError, match="NumberOfStudyRelatedInstances"):
        match(studies, {"NumberOfStudyRelatedInstances": value})


# --- dates, times, date-times --------------------------------------------------------------------


def test_date_single_and_ranges(studies):
    assert hits(studies, StudyDate="20260406") == [1]
    assert hits(studies, StudyDate="20260301-20260406") == [0, 1]
    assert hits(studies, StudyDate="-20260406") == [0, 1, 4]
    assert hits(studies, StudyDate="20260406-") == [1, 2]
    assert hits(studies, StudyDate="20260406-20260406") == [1]
    assert hits(studies, StudyDate=" 20260301 - 20260301 ") == [0]
    assert hits(studies, StudyDate="20251231\\20260407") == [2, 4]
    assert hits(studies, StudyDate="19000101-20991231") == [0, 1, 2, 4]
    assert hits(studies, StudyDate="2026.04.06") == [1]  # ACR-NEMA form


def test_dates_outside_the_timestamp_range_are_clamped(studies):
    assert hits(studies, StudyDate="00010101-99991231") == [0, 1, 2, 4]
    assert hits(studies, StudyDate="-15000101") == []


@pytest.mark.parametrize(
    ("value", "why"),
    [
        ("2026-04-06", "more than one"),
        ("20260230", "impossible"),
        ("2026040", "not a date"),
        ("-", "neither start nor end"),
        ("20260407-20260406", "start is after its end"),
        ("yesterday", "not a date"),
    ],
)
def test_bad_dates_raise(studies, value, why):
    with pytest.raises(QueryError, match=why):
        match(studies, {"StudyDate": value})


def test_time_values_cover_their_precision(studies):
    # Row 4's "14" is 14:00:00; row 1 is 14:00:00.5.
    assert hits(studies, StudyTime="14") == [1, 4]
    assert hits(studies, StudyTime="1400") == [1, 4]
    assert hits(studies, StudyTime="140000") == [1, 4]
    assert hits(studies, StudyTime="140000.5") == [1]
    assert hits(studies, StudyTime="140000.0") == [4]
    assert hits(studies, StudyTime="0800-1400") == [0, 1, 4]
    assert hits(studies, StudyTime="083001-") == [1, 2, 4]
    assert hits(studies, StudyTime="-083000") == [0]
    assert hits(studies, StudyTime="08:30:00") == [0]  # ACR-NEMA form


@pytest.mark.parametrize("value", ["25", "1260", "8", "0800-0700", "08.5"])
def test_bad_times_raise(studies, value):
    with pytest.raises(QueryError, match="StudyTime"):
        match(studies, {"StudyTime": value})


def test_datetime_ranges_at_any_precision():
    frame = frame_of(
        AcquisitionDateTime=[
            "20260301083000",
            "20260406235959.999999",
            "20260407000000",
            "2025",
            None,
        ]
    )
    # A date-only end includes the whole day.
    assert hits(frame, AcquisitionDateTime="20260301-20260406") == [0, 1]
    assert hits(frame, AcquisitionDateTime="-20260406") == [0, 1, 3]
    assert hits(frame, AcquisitionDateTime="20260407-") == [2]
    assert hits(frame, AcquisitionDateTime="2026") == [0, 1, 2]
    assert hits(frame, AcquisitionDateTime="202603") == [0]
    assert hits(frame, AcquisitionDateTime="2025-2025") == [3]
    assert hits(frame, AcquisitionDateTime="2026030108") == [0]
    assert hits(frame, AcquisitionDateTime="202603010830-202603010830") == [0]
    # Offsets are accepted and ignored: frames hold local times as written.
    assert hits(frame, AcquisitionDateTime="20260301083000+0100") == [0]
    assert hits(frame, AcquisitionDateTime="20260301-0500") == [0]
    assert hits(frame, AcquisitionDateTime="20260301-0500-20260301+0100") == [0]


@pytest.mark.parametrize("value", ["2026-03-01", "20261301", "2027-2026", "20260301T0830"])
def test_bad_datetimes_raise(value):
    frame = frame_of(AcquisitionDateTime=["20260301083000"])
    with pytest.raises(QueryError, match="AcquisitionDateTime"):
        match(frame, {"AcquisitionDateTime": value})


# --- several keys, index, frames built by hand ---------------------------------------------------


def test_keys_combine_with_and(studies):
    assert hits(studies, PatientName="SM*", StudyDate="20260301-", ModalitiesInStudy="MR") == [
        0,
        1,
    ]
    assert hits(studies, PatientName="SM*", StudyDate="-20260301", ModalitiesInStudy="MR") == [0]


def test_index_is_kept_even_with_duplicates(studies):
    frame = studies.set_axis(["a", "b", "a", "c", "b"])
    mask = match(frame, {"ModalitiesInStudy": "MR", "PatientID": "P?"})
    assert mask.index.tolist() == ["a", "b", "a", "c", "b"]
    assert mask.tolist() == [True, True, False, False, False]
    assert frame[mask].PatientID.tolist() == ["P1", "P2"]


def test_filtered_frames_and_empty_frames(studies):
    part = studies.iloc[[4, 0]]
    assert match(part, {"PatientID": "P1"}).tolist() == [False, True]
    empty = studies.iloc[:0]
    assert match(empty, {"PatientName": "S*", "StudyDate": "2026-"}).tolist() == []


def test_hand_built_object_columns():
    frame = pd.DataFrame(
        {
            "PatientID": ["A", "B", None],
            "StudyDate": ["20260301", "20260302", None],
            "ModalitiesInStudy": [["CT"], [], ["MR", "CT"]],
        }
    )
    assert match(frame, {"PatientID": "A"}).tolist() == [True, False, False]
    assert match(frame, {"StudyDate": "20260302-"}).tolist() == [False, True, False]
    assert match(frame, {"ModalitiesInStudy": "CT"}).tolist() == [True, False, True]


def test_values_must_be_strings(studies):
    with pytest.raises(QueryError, match="DICOM strings"):
        match(studies, {"StudyDate": dt.date(2026, 3, 1)})


# --- properties ----------------------------------------------------------------------------------

DAYS = st.dates(min_value=dt.date(1900, 1, 1), max_value=dt.date(2100, 12, 31))


@settings(max_examples=200, deadline=None)
@given(d=DAYS, a=DAYS, b=DAYS)
def test_date_range_property(d, a, b):
    frame = frame_of(StudyDate=[d.strftime("%Y%m%d")])
    lo, hi = min(a, b), max(a, b)
    fmt = "%Y%m%d"
    assert match(frame, {"StudyDate": f"{lo:{fmt}}-{hi:{fmt}}"}).item() == (lo <= d <= hi)
    assert match(frame, {"StudyDate": f"-{hi:{fmt}}"}).item() == (d <= hi)
    assert match(frame, {"StudyDate": f"{lo:{fmt}}-"}).item() == (lo <= d)
    assert match(frame, {"StudyDate": f"{a:{fmt}}"}).item() == (a == d)


TIMES = st.times().map(lambda t: t.replace(microsecond=t.microsecond // 1000 * 1000))


@settings(max_examples=200, deadline=None)
@given(t=TIMES, a=TIMES, b=TIMES)
def test_time_range_property(t, a, b):
    def tm(x: dt.time) -> str:
        return x.strftime("%H%M%S") + f".{x.microsecond:06d}"

    frame = frame_of(StudyTime=[tm(t)])
    lo, hi = min(a, b), max(a, b)
    assert match(frame, {"StudyTime": f"{tm(lo)}-{tm(hi)}"}).item() == (lo <= t <= hi)


def reference_wildcard(pattern: str, text: str) -> bool:
    """Plain dynamic programming: '*' any run, '?' one character, the rest literal."""
    reachable = [True] + [False] * len(text)
    for char in pattern:
        if char == "*":
            for i in range(1, len(text) + 1):
                reachable[i] = reachable[i] or reachable[i - 1]
        else:
            reachable = [False] + [
                reachable[i] and (char == "?" or char == text[i]) for i in range(len(text))
            ]
    return reachable[-1]


ALPHABET = st.sampled_from([*"ab^.(|[+$ \\é", "*", "?"])
TEXT = st.text(alphabet=st.sampled_from(list("ab^.(|[+$é ")), min_size=1, max_size=8)


@settings(max_examples=300, deadline=None)
@given(pattern=st.text(alphabet=ALPHABET, min_size=1, max_size=6), text=TEXT)
def test_wildcard_property(pattern, text):
    frame = frame_of(StudyDescription=[text])
    text, parts = text.strip(" "), [p.strip(" ") for p in pattern.split("\\")]
    parts = [p for p in parts if p]
    got = match(frame, {"StudyDescription": pattern}).item()
    if not parts or any(not p.strip("*") for p in parts):
        assert got  # universal
    elif not text:
        assert not got  # empty values never match
    else:
        assert got == any(reference_wildcard(p, text) for p in parts)


@settings(max_examples=200, deadline=None)
@given(name=st.text(alphabet=st.sampled_from(list("abcxyzÄäöÖßΣσ^=")), min_size=1, max_size=10))
def test_pn_matches_itself_in_any_case(name):
    frame = frame_of(PatientName=[name])
    if not name.strip("^="):
        return  # only delimiters: an empty name
    assert match(frame, {"PatientName": name}).item()
    assert match(frame, {"PatientName": name.upper()}).item()
    assert match(frame, {"PatientName": name.lower()}).item()


@settings(max_examples=100, deadline=None)
@given(
    uids=st.lists(st.from_regex(r"1\.2\.[1-9][0-9]{0,3}", fullmatch=True), min_size=1, max_size=8),
    data=st.data(),
)
def test_uid_list_property(uids, data):
    wanted = data.draw(st.lists(st.sampled_from([*uids, "9.9.9"]), min_size=1, max_size=4))
    frame = frame_of(SeriesInstanceUID=uids)
    got = match(frame, {"SeriesInstanceUID": "\\".join(wanted)}).tolist()
    assert got == [u in wanted for u in uids]


# --- speed ---------------------------------------------------------------------------------------


def test_one_hundred_thousand_rows_match_quickly():
    n = 100_000
    rng = np.random.default_rng(0)
    days = pd.Timestamp("2026-01-01") + pd.to_timedelta(rng.integers(0, 365, n), unit="D")
    names = [f"Name{i % 977}^Given{i % 13}" for i in range(n)]
    dates = days.strftime("%Y%m%d").tolist()
    modalities = ["CT\\MR" if i % 3 else "CT" for i in range(n)]
    frame = frame_of(
        PatientName=names,
        StudyDate=dates,
        ModalitiesInStudy=modalities,
        StudyInstanceUID=[f"1.2.3.{i}" for i in range(n)],
    )
    keys = {
        "PatientName": "name1*",
        "StudyDate": "20260301-20260406",
        "ModalitiesInStudy": "MR\\PT",
        "StudyInstanceUID": "",
    }
    mask = match(frame, keys)
    expected = (
        frame.PatientName.str.lower().str.startswith("name1")
        & frame.StudyDate.between("2026-03-01", "2026-04-06")
        & pd.Series([i % 3 != 0 for i in range(n)])
    )
    assert mask.tolist() == expected.tolist()

    # Timed against the same test written as one plain loop over the rows, alongside
    # it (the best of three each, in CPU time of this process): never a wall-clock
    # limit. match() takes about 4 such loops; matching row by row in pandas
    # (DataFrame.apply) takes about 60.
    def one_loop() -> list[bool]:
        wanted = {"MR", "PT"}
        return [
            name.lower().startswith("name1")
            and "20260301" <= date <= "20260406"
            and not wanted.isdisjoint(cell.split("\\"))
            for name, date, cell in zip(names, dates, modalities, strict=True)
        ]

    assert one_loop() == mask.tolist()
    matching = _fastest(lambda: match(frame, keys))
    loop = _fastest(one_loop)
    assert matching < 20 * loop, f"match() took {matching:.3f} s, one plain loop {loop:.3f} s"


def _fastest(call, repeat: int = 3) -> float:
    best = float("inf")
    for _ in range(repeat):
        start = time.process_time()
        call()
        best = min(best, time.process_time() - start)
    return best


def test_reference_wildcard_agrees_with_fnmatch_on_plain_text():
    # Sanity check of the reference itself, on characters fnmatch treats literally.
    import fnmatch

    for pattern, text in [("a*b", "axxb"), ("a?b", "ab"), ("*", ""), ("?*", "a"), ("a*", "ba")]:
        assert reference_wildcard(pattern, text) == fnmatch.fnmatchcase(text, pattern)
    assert re.fullmatch(r".*", "") is not None


# --- levels and whole queries (level_frame, answer) ----------------------------------------------


@pytest.fixture
def instances() -> pd.DataFrame:
    """Two patients, three studies, four series, six instances (typed as an index)."""
    return frame_of(
        PatientID=["P1", "P1", "P1", "P1", "P2", "P2"],
        PatientName=["Smith^John"] * 4 + ["Müller^Jürgen"] * 2,
        StudyInstanceUID=["1.1", "1.1", "1.1", "1.2", "1.3", "1.3"],
        StudyDate=["20260301", "20260301", "20260301", "20260406", "20250101", "20250101"],
        SeriesInstanceUID=["1.1.1", "1.1.1", "1.1.2", "1.2.1", "1.3.1", "1.3.1"],
        Modality=["CT", "CT", "MR", "CT", "MR", "MR"],
        SeriesNumber=["1", "1", "2", "1", "1", "1"],
        SOPInstanceUID=["1.1.1.1", "1.1.1.2", "1.1.2.1", "1.2.1.1", "1.3.1.1", "1.3.1.2"],
        SOPClassUID=["1.2.840.10008.5.1.4.1.1.2"] * 2
        + ["1.2.840.10008.5.1.4.1.1.4"]
        + ["1.2.840.10008.5.1.4.1.1.2"]
        + ["1.2.840.10008.5.1.4.1.1.4"] * 2,
        InstanceNumber=["1", "2", "1", "1", "1", "2"],
        SpecificCharacterSet=[None] * 4 + [["ISO_IR 192"]] * 2,
    )


def test_level_keywords_cover_the_index():
    assert matching.LEVEL_KEYWORDS["IMAGE"] == matching.INDEX_KEYWORDS
    for level in ("PATIENT", "STUDY", "SERIES"):
        assert set(matching.LEVEL_KEYWORDS[level]) - set(matching.INDEX_KEYWORDS) <= {
            "NumberOfPatientRelatedStudies",
            "NumberOfPatientRelatedSeries",
            "NumberOfPatientRelatedInstances",
            "ModalitiesInStudy",
            "SOPClassesInStudy",
            "NumberOfStudyRelatedSeries",
            "NumberOfStudyRelatedInstances",
            "NumberOfSeriesRelatedInstances",
        }


def test_level_frame_patient(instances):
    patients = matching.level_frame(instances, "PATIENT")
    assert patients["PatientID"].tolist() == ["P1", "P2"]
    assert patients["NumberOfPatientRelatedStudies"].tolist() == [2, 1]
    assert patients["NumberOfPatientRelatedSeries"].tolist() == [3, 1]
    assert patients["NumberOfPatientRelatedInstances"].tolist() == [4, 2]
    assert str(patients["NumberOfPatientRelatedInstances"].dtype) == "Int64"
    # Columns follow LEVEL_KEYWORDS, restricted to what exists.
    order = [c for c in matching.LEVEL_KEYWORDS["PATIENT"] if c in patients.columns]
    assert patients.columns.tolist() == order
    assert "StudyInstanceUID" not in patients.columns


def test_level_frame_study(instances):
    studies = matching.level_frame(instances, "STUDY")
    assert studies["StudyInstanceUID"].tolist() == ["1.1", "1.2", "1.3"]
    assert studies["ModalitiesInStudy"].tolist() == [["CT", "MR"], ["CT"], ["MR"]]
    assert studies["SOPClassesInStudy"].tolist()[0] == [
        "1.2.840.10008.5.1.4.1.1.2",
        "1.2.840.10008.5.1.4.1.1.4",
    ]
    assert studies["NumberOfStudyRelatedSeries"].tolist() == [2, 1, 1]
    assert studies["NumberOfStudyRelatedInstances"].tolist() == [3, 1, 2]
    assert studies["StudyDate"].dtype.kind == "M"
    assert studies.index.equals(pd.RangeIndex(3))


def test_level_frame_series_and_image(instances):
    series = matching.level_frame(instances, "SERIES")
    assert series["SeriesInstanceUID"].tolist() == ["1.1.1", "1.1.2", "1.2.1", "1.3.1"]
    assert series["NumberOfSeriesRelatedInstances"].tolist() == [2, 1, 1, 2]
    assert "SOPInstanceUID" not in series.columns and "PatientName" not in series.columns
    image = matching.level_frame(instances.set_axis(range(10, 16)), "IMAGE")
    assert image.columns.tolist() == instances.columns.tolist()
    assert image.index.equals(pd.RangeIndex(6))


def test_level_frame_first_instance_wins_and_extra_columns_are_dropped(instances):
    instances = instances.assign(path=[f"/x/{i}.dcm" for i in range(6)])
    instances.loc[1, "Modality"] = "OT"  # a later instance of series 1.1.1 disagrees
    series = matching.level_frame(instances, "SERIES")
    assert series["Modality"].tolist()[0] == "CT"
    assert "path" not in series.columns
    assert "path" in matching.level_frame(instances, "IMAGE").columns


def test_level_frame_tolerates_missing_source_columns(instances):
    slim = instances[["PatientID", "StudyInstanceUID", "SOPInstanceUID"]]
    studies = matching.level_frame(slim, "STUDY")
    assert "ModalitiesInStudy" not in studies.columns
    assert "NumberOfStudyRelatedSeries" not in studies.columns
    assert studies["NumberOfStudyRelatedInstances"].tolist() == [3, 1, 2]
    with pytest.raises(QueryError, match="SeriesInstanceUID"):
        matching.level_frame(slim, "SERIES")
    with pytest.raises(QueryError, match="FRAME"):
        matching.level_frame(slim, "FRAME")


@pytest.mark.parametrize("level", ["PATIENT", "STUDY", "SERIES", "IMAGE"])
def test_level_frame_of_an_empty_index(level):
    rows = matching.level_frame(empty_frame(matching.INDEX_KEYWORDS), level)
    assert len(rows) == 0
    assert set(rows.columns) <= set(matching.LEVEL_KEYWORDS[level])


def test_answer_selects_rows_and_exactly_the_query_columns(instances):
    query = Query(
        "STUDY",
        "study",
        {
            "PatientName": "smith*",
            "StudyInstanceUID": "",
            "ModalitiesInStudy": "MR",
            "NumberOfStudyRelatedInstances": "",
            "AccessionNumber": "",
            "StudyTime": "",
            "ImageComments": "",
        },
    )
    found = matching.answer(instances, query)
    assert found.columns.tolist() == query.columns
    assert found["StudyInstanceUID"].tolist() == ["1.1"]
    assert found["NumberOfStudyRelatedInstances"].tolist() == [3]
    # Columns the archive does not hold are empty, typed by their VR.
    assert str(found["AccessionNumber"].dtype) == "string"
    assert found["AccessionNumber"].isna().all()
    assert found["StudyTime"].dtype.kind == "m"
    assert found.index.equals(pd.RangeIndex(1))
    assert found.attrs["pacsframe"] == query.to_json()


def test_answer_uid_lists_and_levels(instances):
    query = Query(
        "IMAGE",
        "study",
        {
            "StudyInstanceUID": "1.1",
            "SeriesInstanceUID": "1.1.1",
            "SOPInstanceUID": "1.1.1.2\\1.1.2.1\\9.9",
            "InstanceNumber": "",
        },
    )
    found = matching.answer(instances, query)
    assert found["SOPInstanceUID"].tolist() == ["1.1.1.2"]
    assert found["InstanceNumber"].tolist() == [2]
    assert matching.answer(instances, Query("PATIENT", "patient", {"PatientID": "P9"})).empty


def test_answer_with_no_match_keeps_typed_columns(instances):
    query = Query("SERIES", "study", {"StudyInstanceUID": "1.9", "SeriesDate": "", "Modality": ""})
    found = matching.answer(instances, query)
    assert found.empty
    assert found.columns.tolist() == ["StudyInstanceUID", "SeriesDate", "Modality"]
    assert found["SeriesDate"].dtype.kind == "M"


def test_answer_rejects_bad_values(instances):
    with pytest.raises(QueryError, match="StudyDate"):
        matching.answer(instances, Query("STUDY", "study", {"StudyDate": "20261345"}))
