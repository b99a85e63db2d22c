"""caps.py on its own: windows, truncation words, and splitting behind a fake capped peer.

The peer here is a function over a list of rows (the splitting logic is pure), so
these tests can try every shape of archive hypothesis can think of; the tests
against real servers are in test_caps.py.
"""

from __future__ import annotations

import datetime as dt

import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pacsframe import caps

TODAY = dt.date(2026, 6, 15)


def matches(value: str, query: str) -> bool:
    """DICOM single value / range matching of DA and TM strings (empty never matches a range)."""
    if not query:
        return True
    if not value:
        return False
    if "-" not in query:
        return value == query if len(query) == 8 else value.startswith(query)
    lo, _, hi = query.partition("-")
    # Times here are HHMMSS and bounds HHMM or HHMM59.999999: string order is time order.
    return (not lo or value >= lo) and (not hi or value <= hi)


class Peer:
    """A capped archive of (uid, StudyDate, StudyTime) rows; ``style`` says how it caps.

    ``"flag"``: the first ``cap`` rows, then "more" (Orthanc's 0xFE00);
    ``"refuse"``: nothing, refused, when more than ``cap`` match (dcm4chee-arc);
    ``"silent"``: the first ``cap`` rows and nothing said (the caller knows the cap).
    """

    def __init__(self, rows: list[tuple[str, str, str]], cap: int, style: str) -> None:
        self.rows, self.cap, self.style = rows, cap, style
        self.queries: list[dict[str, str]] = []

    def __call__(self, keys: dict[str, str]) -> caps.Answer[list[tuple[str, str, str]]]:
        self.queries.append(keys)
        found = [
            r
            for r in self.rows
            if matches(r[1], keys.get("StudyDate", ""))
            and matches(r[2], keys.get("StudyTime", ""))
        ]
        if len(found) <= self.cap and not (self.style == "silent" and len(found) == self.cap):
            return caps.Answer(found, len(found))
        if self.style == "refuse":
            return caps.Answer([], 0, "refused: too large")
        flag = "more" if self.style == "flag" else None
        return caps.Answer(found[: self.cap], self.cap, flag)


def run(peer: Peer, keys: dict[str, str] | None = None) -> caps.Outcome:
    cap = peer.cap if peer.style == "silent" else None
    return caps.split_find(
        peer, keys or {"StudyDate": "", "StudyTime": ""}, "STUDY", cap=cap, today=TODAY
    )


def got(outcome: caps.Outcome) -> list[tuple[str, str, str]]:
    return [row for answer in outcome.answers for row in answer]


def uids(rows) -> list[str]:
    return sorted({r[0] for r in rows})


# --- windows -------------------------------------------------------------------------------


def test_open_range_is_cut_at_the_earliest_date_and_after_today():
    root = caps._Window(caps._Dates(None, None))
    first, rest = root.halves({}, "StudyTime", TODAY)
    assert first.dates.text() == "-19841231"
    digital, future = rest.halves({}, "StudyTime", TODAY)
    assert digital.dates.text() == "19850101-20260615"
    assert future.dates.text() == "20260616-"  # future-dated studies keep a window


def test_a_day_splits_by_time_down_to_one_minute():
    day = caps._Window(caps._Dates(dt.date(2026, 3, 1), dt.date(2026, 3, 1)))
    assert day.dates.text() == "20260301"
    morning, evening = day.halves({}, "StudyTime", TODAY)
    assert morning.times.text() == "0000-115959.999999"
    assert evening.times.text() == "1200-235959.999999"
    window = morning
    for _ in range(20):
        halves = window.halves({}, "StudyTime", TODAY)
        if halves is None:
            break
        window = halves[0]
    assert window.times.text() == "0000-000059.999999"
    assert window.halves({}, "StudyTime", TODAY) is None


def test_the_querys_own_time_range_bounds_the_split():
    day = caps._Window(caps._Dates(dt.date(2026, 3, 1), dt.date(2026, 3, 1)))
    left, right = day.halves({"StudyTime": "083015-0900"}, "StudyTime", TODAY)
    assert left.times.text() == "083015-084459.999999"
    assert right.times.text() == "0845-0900"
    # A single time value is exact matching: it is never widened into a range.
    assert day.halves({"StudyTime": "0830"}, "StudyTime", TODAY) is None


@pytest.mark.parametrize(
    ("comment", "size"),
    [
        ("Request entity too large", True),
        ("Too many matches", True),
        ("Query result limit exceeded", True),
        ("exceeds maximum number of results", True),
        ("index offline", False),
        ("Unable to process", False),
        ("unlimited", False),
        (None, False),
        ("", False),
    ],
)
def test_refusals_that_name_a_size(comment, size):
    assert caps.names_a_size(comment) is size


def test_repeated_rows_by_unique_key_and_patient_identity():
    studies = pd.DataFrame({"StudyInstanceUID": ["1.1", "1.2", "1.1"], "StudyDate": [1, 2, 3]})
    assert caps.repeated(studies, "STUDY").tolist() == [False, False, True]
    patients = pd.DataFrame(
        {
            "PatientID": ["7", "7", "7"],
            "IssuerOfPatientID": ["A", "B", "A"],
            "NumberOfPatientRelatedStudies": [1, 1, 2],
        }
    )
    # One PatientID, two issuers: two patients. The counts do not make a patient.
    assert caps.repeated(patients, "PATIENT").tolist() == [False, False, True]


# --- splitting -------------------------------------------------------------------------------


def test_an_answer_under_the_cap_is_one_query():
    peer = Peer([("1", "20260301", "080000")], cap=3, style="flag")
    outcome = run(peer)
    assert not outcome.split and len(peer.queries) == 1 and got(outcome) == peer.rows


def test_the_first_capped_answer_keeps_its_undated_rows_and_says_so():
    rows = [("u1", "", "")] + [(f"d{i}", f"202603{i + 1:02d}", "080000") for i in range(6)]
    outcome = run(Peer(rows, cap=3, style="flag"))
    assert outcome.split and not outcome.capped
    assert uids(got(outcome)) == uids(rows)  # u1 came in the first (capped) answer
    assert outcome.unmatched == ["StudyDate"]


def test_a_crowded_minute_is_reported_with_what_was_obtained():
    rows = [(f"m{i}", "20260301", f"0830{i:02d}") for i in range(5)]
    rows += [(f"o{i}", "20260302", "090000") for i in range(2)]
    outcome = run(Peer(rows, cap=3, style="flag"), {"StudyDate": "20260301-20260302"})
    assert outcome.capped == ["StudyDate=20260301 StudyTime=0830-083059.999999"]
    assert outcome.cap == 3
    assert {"o0", "o1"} <= set(uids(got(outcome))) <= set(uids(rows))


def test_levels_without_a_complete_split_report_the_whole_query():
    peer = Peer([(str(i), "20260301", "080000") for i in range(4)], cap=2, style="flag")
    outcome = caps.split_find(peer, {"SeriesInstanceUID": ""}, "SERIES")
    assert outcome.split and outcome.capped == ["the whole query"] and len(peer.queries) == 1


def test_a_peer_that_refuses_everything_costs_a_bounded_number_of_queries(monkeypatch):
    monkeypatch.setattr(caps, "MAX_CAPPED_WINDOWS", 5)

    def refuse(keys):
        return caps.Answer([], 0, "refused: too large")

    outcome = caps.split_find(refuse, {"StudyDate": "20260301"}, "STUDY", today=TODAY)
    assert len(outcome.capped) >= 5
    assert outcome.cap is None  # a refusal names no number


dates = st.sampled_from(
    ["", "19000101", "19991231", "20260301", "20260302", "20260615", "20260616", "20301231"]
)
times = st.sampled_from(["", "000000", "083000", "083059", "083100", "120000", "235959"])


@settings(max_examples=150, deadline=None)
@given(
    when=st.lists(st.tuples(dates, times), max_size=40),
    cap=st.integers(1, 6),
    style=st.sampled_from(["flag", "refuse", "silent"]),
    ranged=st.booleans(),
)
def test_every_row_comes_back_exactly_once_or_the_error_is_honest(when, cap, style, ranged):
    rows = [(f"s{i}", d, t) for i, (d, t) in enumerate(when)]
    peer = Peer(rows, cap, style)
    keys = {"StudyDate": "20260301-20260616" if ranged else "", "StudyTime": ""}
    outcome = run(peer, keys)
    truth = {r[0] for r in rows if matches(r[1], keys["StudyDate"])}
    found = uids(got(outcome))
    assert set(found) <= truth  # never a row the query does not match
    if outcome.capped:
        # Honest: each window given up on really holds at least the cap.
        for window in outcome.capped:
            date, time = (part.split("=", 1)[1] for part in window.split(" "))
            inside = [r for r in rows if matches(r[1], date) and matches(r[2], time)]
            assert len(inside) >= cap
        return
    # Complete: every match with a date and a time, once after merging; rows without
    # one only when the capped answer carried them, and the outcome says so.
    sure = {r[0] for r in rows if r[1] and r[2] and r[0] in truth}
    assert sure <= set(found)
    if set(found) != truth:
        assert outcome.split and outcome.unmatched
    merged = pd.DataFrame([r for r in got(outcome)], columns=["StudyInstanceUID", "d", "t"])
    merged = merged[~caps.repeated(merged, "STUDY")]
    assert sorted(merged.StudyInstanceUID) == found
