"""Result caps: telling a capped C-FIND answer from a complete one, and beating the cap.

Many PACS stop answering a query at a fixed number of matches, and DICOM defines no
status that says so. What peers do instead:

* Orthanc (``LimitFindResults``, ``LimitFindInstances``) sends N pending answers and
  then a final 0xFE00 (Cancel) that nobody asked for;
* dcm4chee-arc (``dcmQueryMaxNumberOfResults``) refuses before the first match, with
  0xC000 and the comment "Request entity too large";
* the Repository Query class answers 0xB001 ("matching reached response limit");
* other PACS stop at N and answer Success: only a known ``max_results`` tells.

The client detects the protocol signs (see ``finder._find_one``); this
module does the rest, without any networking, so a QIDO-RS client can reuse it:
:func:`split_find` drives a function that runs one query for a dict of keys (DICOM
string form) and says whether that answer was cut short, splits a capped query
into windows that together match exactly what it matched, and reports the windows
no split could get under the cap.

Which splits are complete, by level:

* STUDY: StudyDate windows (bisection of the query's own range, or of everything
  when it has none, cut first at :data:`EARLIEST_DATE` and after today so the open
  ends, future-dated studies included, are windows of their own); a single day is
  then split by StudyTime (a time range applies per day) down to one minute.
* PATIENT: PatientBirthDate windows, the same way (no time split).
* WORKLIST (Modality Worklist): ScheduledProcedureStepStartDate windows, then
  ScheduledProcedureStepStartTime within a day, as for STUDY. An entry with two
  steps on different days comes back from each day's window with that day's step.
* SERIES and IMAGE: none. Their queries carry the unique key of one study (or
  series), so a date window either holds all of its children or none; the other
  keys (Modality, SeriesNumber, InstanceNumber...) cannot be split into a complete
  set of values. A capped answer there is reported, never completed by guessing.

An entity without a value in the split key (an undated study, a patient without a
birth date) matches no window: only those in a capped answer are kept, and
:attr:`Outcome.unmatched` names the key so the caller can say that more may exist.
Prefix splits of IDs or names (``A*`` ... ``Z*``) are not used: they miss values
starting with a digit, a non-ASCII letter or a space, and case rules differ by peer.

Examples
--------
A peer that answers at most 3 matches, with a final "more" flag (as Orthanc does):

>>> dates = ["20260301", "20260302", "20260302", "20260305", "20260310", "20260311"]
>>> rows = [{"StudyInstanceUID": f"1.2.{i}", "StudyDate": d} for i, d in enumerate(dates)]
>>> def run(keys):
...     lo, _, hi = keys.get("StudyDate", "").partition("-")
...     if keys.get("StudyDate") and "-" not in keys["StudyDate"]:
...         hi = lo
...     found = [r for r in rows if (not lo or r["StudyDate"] >= lo)
...              and (not hi or r["StudyDate"] <= hi)]
...     return Answer(found[:3], min(len(found), 3), "more" if len(found) > 3 else None)
>>> out = split_find(run, {"StudyDate": "20260301-20260331"}, "STUDY")
>>> sorted({r["StudyInstanceUID"] for part in out.answers for r in part}) == [
...     r["StudyInstanceUID"] for r in rows]
True
>>> out.split, out.capped
(True, [])
"""

from __future__ import annotations

import datetime as _dt
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

import pandas as pd

__all__ = [
    "EARLIEST_DATE",
    "MAX_CAPPED_WINDOWS",
    "MAX_QUERIES",
    "SPLIT_KEYS",
    "Answer",
    "Outcome",
    "Progress",
    "capped_message",
    "names_a_size",
    "repeated",
    "split_find",
]

R = TypeVar("R")

#: Where date bisection of a query without a date range first cuts: before it lies
#: an open window of its own ("-19841231": film scans, placeholder dates such as
#: 19000101), after it the digital era. 1985 is the year ACR-NEMA 1.0 appeared.
EARLIEST_DATE = _dt.date(1985, 1, 1)
#: At most this many queries for one capped query (its pieces included); then the
#: windows not yet asked are reported as capped.
MAX_QUERIES = 10_000
#: Stop splitting once this many windows are known to stay over the cap: the query
#: must be narrowed anyway, and a peer refusing everything must not cost hours.
MAX_CAPPED_WINDOWS = 100
#: Show a progress bar once a split find has made more than this many queries.
SHOW_BAR_AFTER = 4

#: The (date key, time key) each level splits on; SERIES and IMAGE have none.
SPLIT_KEYS: dict[str, tuple[str, str | None]] = {
    "PATIENT": ("PatientBirthDate", None),
    "STUDY": ("StudyDate", "StudyTime"),
    # A Modality Worklist query (pacsframe.query.WORKLIST): the step's date and time.
    "WORKLIST": ("ScheduledProcedureStepStartDate", "ScheduledProcedureStepStartTime"),
}

# Bounds for bisecting an open end; the window itself is still sent open ("-X"), so
# nothing outside them is lost.
_FLOOR = _dt.date(1, 1, 1)
_CEILING = _dt.date(9999, 12, 31)
_DAY = _dt.timedelta(days=1)
_LAST_MINUTE = 24 * 60 - 1
_END_OF_MINUTE = "59.999999"  # appended to HHMM: the last moment of that minute

# Words with which peers explain refusing an answer for its size: dcm4chee-arc's
# "Request entity too large", "too many matches", "result limit exceeded",
# "maximum number of results"... Matched as words, so "unlimited" does not count.
_SIZE_WORDS = re.compile(
    r"\b(too\s+(large|many|big)|limit(s|ed)?|exceed(s|ed|ing)?|maximum|max(\.|imal)?|"
    r"truncat\w*|result\s+size|response\s+size|entity\s+too)\b",
    re.IGNORECASE,
)


def names_a_size(comment: str | None) -> bool:
    """Whether a refusal's Error Comment says the answer would be too large.

    Conservative on purpose: a refusal that does not name a size ("index offline",
    no comment at all) stays an error instead of being split.

    Examples
    --------
    >>> names_a_size("Request entity too large"), names_a_size("Result limit exceeded")
    (True, True)
    >>> names_a_size("index offline"), names_a_size(None), names_a_size("unlimited")
    (False, False, False)
    """
    return bool(comment) and _SIZE_WORDS.search(str(comment)) is not None


@dataclass(frozen=True)
class Answer(Generic[R]):
    """What one query returned: its rows, their number, and whether it was cut short.

    Attributes
    ----------
    rows
        Whatever the runner collects (a frame, a list, positions in a builder).
    count : int
        How many matches came back.
    truncated : str or None
        Why the peer's answer is incomplete ("an unsolicited 0xFE00 after 100
        matches"), or None when the peer gave no sign. A count at the caller's
        ``cap`` counts as truncated too (:func:`split_find` checks that).
    """

    rows: R
    count: int
    truncated: str | None = None


# --- windows ------------------------------------------------------------------------------


def _parse_date(text: str) -> _dt.date | None:
    if not text:
        return None
    return _dt.date(int(text[:4]), int(text[4:6]), int(text[6:8]))


def _date_text(day: _dt.date) -> str:
    return f"{day.year:04d}{day.month:02d}{day.day:02d}"


def _minute(text: str, *, upper: bool) -> int:
    """The minute of day a TM bound falls in (an hour-only upper bound: its last minute)."""
    hours = int(text[:2])
    if len(text) >= 4:
        return hours * 60 + int(text[2:4])
    return hours * 60 + (59 if upper else 0)


def _minute_text(minute: int) -> str:
    return f"{minute // 60:02d}{minute % 60:02d}"


@dataclass(frozen=True)
class _Dates:
    """Days ``lo``..``hi`` inclusive; None is an open end (sent open, e.g. ``-19841231``)."""

    lo: _dt.date | None
    hi: _dt.date | None

    @classmethod
    def parse(cls, value: str) -> _Dates | None:
        """From a DA value (``D``, ``A-B``, ``A-``, ``-B`` or empty); None if unreadable."""
        text = value.strip()
        try:
            if "-" not in text:
                day = _parse_date(text)
                return cls(day, day)
            lo, _, hi = text.partition("-")
            return cls(_parse_date(lo), _parse_date(hi))
        except (ValueError, IndexError):
            return None

    def text(self) -> str:
        if self.lo is not None and self.lo == self.hi:
            return _date_text(self.lo)
        if self.lo is None and self.hi is None:
            return ""
        lo = _date_text(self.lo) if self.lo else ""
        hi = _date_text(self.hi) if self.hi else ""
        return f"{lo}-{hi}"

    def halves(self, today: _dt.date) -> tuple[_Dates, _Dates] | None:
        """Two windows that together hold exactly these days, or None for one day."""
        lo = self.lo or _FLOOR
        hi = self.hi or _CEILING
        if lo >= hi:
            return None
        # Cut at the documented earliest date and after today first: the rare
        # pre-digital and future-dated studies then sit in open windows of their own
        # instead of spreading the bisection over centuries.
        cuts = [c for c in (EARLIEST_DATE, today + _DAY) if lo < c <= hi]
        cut = cuts[0] if cuts else lo + _dt.timedelta(days=((hi - lo).days + 1) // 2)
        return _Dates(self.lo, cut - _DAY), _Dates(cut, self.hi)


@dataclass(frozen=True)
class _Times:
    """A time-of-day range: bounds as DICOM TM text ("" open) and the minutes they fall in."""

    lo: str
    hi: str
    first: int
    last: int

    @classmethod
    def parse(cls, value: str) -> _Times | None:
        """From a TM matching value; a single value is never split (it is exact matching)."""
        text = value.strip()
        try:
            if text and "-" not in text:
                minute = _minute(text, upper=False)
                return cls(text, text, minute, minute)
            lo, _, hi = text.partition("-")
            first = _minute(lo, upper=False) if lo else 0
            last = _minute(hi, upper=True) if hi else _LAST_MINUTE
        except (ValueError, IndexError):
            return None
        return cls(lo, hi, first, last)

    def text(self) -> str:
        if self.lo and self.lo == self.hi:
            return self.lo
        # Explicit ends: "-1159" and "0000-1159" mean the same to a correct peer, and
        # the explicit form is the one every peer reads.
        return f"{self.lo or '0000'}-{self.hi or '2359' + _END_OF_MINUTE}"

    def halves(self) -> tuple[_Times, _Times] | None:
        if self.first >= self.last:
            return None
        cut = (self.first + self.last + 1) // 2
        # The left half ends at the last moment of the minute before the cut, the
        # right one starts at the cut: every time of day is in exactly one of them.
        left = _Times(self.lo, _minute_text(cut - 1) + _END_OF_MINUTE, self.first, cut - 1)
        return left, _Times(_minute_text(cut), self.hi, cut, self.last)


@dataclass(frozen=True)
class _Window:
    """One piece of a split query: the values of its date key and, once split, time key."""

    dates: _Dates
    times: _Times | None = None  # None: the query's own time key, unchanged

    def keys(self, base: Mapping[str, str], date_key: str, time_key: str | None) -> dict[str, str]:
        keys = dict(base)
        keys[date_key] = self.dates.text()
        if self.times is not None and time_key is not None:
            keys[time_key] = self.times.text()
        return keys

    def describe(self, date_key: str, time_key: str | None) -> str:
        text = f"{date_key}={self.dates.text() or '(any)'}"
        if self.times is not None and time_key is not None:
            text += f" {time_key}={self.times.text()}"
        return text

    def halves(
        self, base: Mapping[str, str], time_key: str | None, today: _dt.date
    ) -> tuple[_Window, _Window] | None:
        dates = self.dates.halves(today) if self.times is None else None
        if dates is not None:
            return _Window(dates[0]), _Window(dates[1])
        if time_key is None:
            return None
        # One day (or a date window that cannot be cut): split the day by time.
        times = self.times or _Times.parse(base.get(time_key, ""))
        halves = times.halves() if times is not None else None
        if halves is None:
            return None
        return _Window(self.dates, halves[0]), _Window(self.dates, halves[1])


# --- progress -------------------------------------------------------------------------------


class Progress:
    """Counts the queries of one find call; shows a ``tqdm.auto`` bar when splitting drags.

    One object serves every query of a call (a drill-down's parents included), so
    ``queries`` is the call's total and a single bar appears, once a split has taken
    more than :data:`SHOW_BAR_AFTER` queries.

    Examples
    --------
    >>> p = Progress("STUDY-level C-FIND", show=False)
    >>> p.ask(lambda keys: Answer([], 0), {}).count, p.queries
    (0, 1)
    """

    def __init__(self, what: str, *, show: bool = True) -> None:
        self.what = what
        self.show = show
        self.queries = 0
        self.split = False
        self._bar: Any = None

    def ask(self, run: Callable[[dict[str, str]], Answer[R]], keys: dict[str, str]) -> Answer[R]:
        """Run one query and count it."""
        answer = run(keys)
        self.queries += 1
        if self._bar is not None:
            self._bar.update(1)
        elif self.show and self.split and self.queries > SHOW_BAR_AFTER:
            from tqdm.auto import tqdm

            self._bar = tqdm(
                initial=self.queries, unit="query", desc=f"{self.what}, split", leave=False
            )
        return answer

    def close(self) -> None:
        """Remove the bar, if one was shown."""
        if self._bar is not None:
            self._bar.close()
            self._bar = None


# --- the driver --------------------------------------------------------------------------------


@dataclass
class Outcome(Generic[R]):
    """What :func:`split_find` got.

    Attributes
    ----------
    answers : list
        The ``rows`` of every answer, the capped ones included (their rows are real
        matches), in the order asked. Rows may repeat across answers; drop repeats
        with :func:`repeated`.
    split : bool
        Whether the first answer was capped, so the query was split.
    capped : list of str
        Windows (described as ``key=value``) that still hit the cap and could not
        be split further. Empty when the answers hold every match.
    cap : int or None
        The cap: ``cap`` when given, else the largest count of an answer the peer
        flagged as cut short, else None (a peer that refuses names no number).
    reason : str or None
        Why the first answer counted as capped.
    unmatched : list of str
        Split keys the query left open, so entities without a value in them (an
        undated study) match none of the windows: only those in the capped answers
        are included, and more may exist.
    """

    answers: list[R] = field(default_factory=list)
    split: bool = False
    capped: list[str] = field(default_factory=list)
    cap: int | None = None
    reason: str | None = None
    unmatched: list[str] = field(default_factory=list)


def split_find(
    run: Callable[[dict[str, str]], Answer[R]],
    keys: Mapping[str, str],
    level: str,
    *,
    cap: int | None = None,
    today: _dt.date | None = None,
    progress: Progress | None = None,
) -> Outcome[R]:
    """Run ``keys``; when the answer is capped, split it into windows until none is.

    Parameters
    ----------
    run : callable
        ``run(keys) -> Answer``: one query, keys in DICOM string form (``""`` for a
        return key). It may raise; nothing is caught here.
    keys : mapping of str to str
        The query, as sent.
    level : {"PATIENT", "STUDY", "SERIES", "IMAGE"}
        Chooses the split keys (:data:`SPLIT_KEYS`).
    cap : int, optional
        The peer's known result cap (``max_results``): an answer with at least
        this many rows counts as capped even when the peer said nothing.
    today : datetime.date, optional
        Where the open upper end of a date range is cut (default: today).
    progress : Progress, optional
        Counts the queries (and shows a bar); shared across the calls of one find.

    Returns
    -------
    Outcome
        The answers, and the windows still capped (empty when complete). Windows
        are disjoint and together match exactly what ``keys`` matches, except
        entities with no value in a split key (see :attr:`Outcome.unmatched`).
    """
    progress = progress or Progress(level, show=False)
    today = today or _dt.date.today()
    base = dict(keys)
    first = progress.ask(run, base)
    outcome: Outcome[R] = Outcome([first.rows], cap=cap)
    reason = _capped(first, cap)
    if reason is None:
        return outcome
    outcome.split = progress.split = True
    outcome.reason = reason
    _note_cap(outcome, first)
    date_key, time_key = SPLIT_KEYS.get(level, ("", None))
    dates = _Dates.parse(base.get(date_key, "")) if date_key else None
    root = _Window(dates) if dates is not None else None
    halves = root.halves(base, time_key, today) if root is not None else None
    if root is None or halves is None:
        outcome.capped.append(_describe_whole(base, date_key, time_key))
        return outcome
    # Depth-first, earliest window first: answers come back in date order and only
    # one path of pending windows is held at a time.
    pending = [halves[1], halves[0]]
    asked = 1
    timed = halves[0].times is not None
    while pending:
        window = pending.pop()
        if asked >= MAX_QUERIES or len(outcome.capped) >= MAX_CAPPED_WINDOWS:
            outcome.capped.extend(w.describe(date_key, time_key) for w in [window, *pending])
            break
        answer = progress.ask(run, window.keys(base, date_key, time_key))
        asked += 1
        outcome.answers.append(answer.rows)
        if _capped(answer, cap) is None:
            continue
        _note_cap(outcome, answer)
        halves = window.halves(base, time_key, today)
        if halves is None:
            outcome.capped.append(window.describe(date_key, time_key))
            continue
        timed = timed or halves[0].times is not None
        pending.extend([halves[1], halves[0]])
    if not base.get(date_key):
        outcome.unmatched.append(date_key)
    if timed and time_key is not None and not base.get(time_key):
        outcome.unmatched.append(time_key)
    return outcome


def _capped(answer: Answer[Any], cap: int | None) -> str | None:
    if answer.truncated:
        return answer.truncated
    if cap is not None and answer.count >= cap:
        return f"{answer.count} matches, at max_results={cap}"
    return None


def _note_cap(outcome: Outcome[Any], answer: Answer[Any]) -> None:
    # A peer that flags a cut-short answer (Orthanc's 0xFE00) sends exactly its cap.
    if answer.truncated and answer.count and (outcome.cap is None or answer.count > outcome.cap):
        outcome.cap = answer.count


def _describe_whole(base: Mapping[str, str], date_key: str, time_key: str | None) -> str:
    shown = [f"{k}={base[k]}" for k in (date_key, time_key) if k and base.get(k)]
    return " ".join(shown) or "the whole query"


# --- merging and reporting --------------------------------------------------------------------


def repeated(frame: pd.DataFrame, level: str) -> pd.Series:
    """Rows that repeat an earlier row of ``frame``: what merging split answers drops.

    Rows are the same entity when they share the level's unique key
    (StudyInstanceUID, SeriesInstanceUID, SOPInstanceUID). At PATIENT level a
    PatientID may legitimately stand for two patients (two issuers), so there rows
    are the same only when every column but the ``NumberOf...`` counts agrees
    (IssuerOfPatientID included when it was asked for). Rows without the unique key
    are never dropped.

    Examples
    --------
    >>> frame = pd.DataFrame({"StudyInstanceUID": ["1.2", "1.3", "1.2", None, None]})
    >>> repeated(frame, "STUDY").tolist()
    [False, False, True, False, False]
    """
    from .query import UNIQUE_KEY

    key = UNIQUE_KEY.get(level)
    if level == "PATIENT" or key not in frame.columns:
        columns = [c for c in frame.columns if not str(c).startswith("NumberOf")]
        identity = pd.DataFrame(
            {c: [tuple(v) if isinstance(v, list) else v for v in frame[c]] for c in columns},
            index=frame.index,
        )
        return identity.astype(object).duplicated(keep="first")
    values = frame[key]
    return values.duplicated(keep="first") & values.notna()


def capped_message(
    level: str,
    peer: str,
    outcome: Outcome[Any],
    rows: int,
    *,
    more: str = "",
    service: str = "C-FIND",
) -> str:
    """The sentence of a :class:`~pacsframe.errors.ResultsCapped`: window, cap, what to do."""
    windows = outcome.capped
    cap = f"{outcome.cap}" if outcome.cap is not None else "a limit it did not name"
    first = windows[0]
    others = f" (and {len(windows) - 1} more window(s))" if len(windows) > 1 else ""
    if level in SPLIT_KEYS:
        date_key, time_key = SPLIT_KEYS[level]
        finest = f"one minute of {time_key}" if time_key else f"one day of {date_key}"
        examples = (
            "Modality, ScheduledStationAETitle"
            if level == "WORKLIST"
            else "ModalitiesInStudy, AccessionNumber, PatientID"
        )
        advice = (
            f"no split got under it: {finest} still holds that many. Narrow the query "
            f"with more matching keys (e.g. {examples}), or ask the PACS administrator "
            "to raise the limit"
        )
    else:
        advice = (
            f"no complete split exists at the {level} level (its queries name one parent, "
            "so a date window cannot divide them). Retrieve the parent whole with get() "
            "or move(), which needs no listing, narrow the query with more matching "
            "keys, or ask the PACS administrator to raise the limit (Orthanc: "
            "LimitFindResults, LimitFindInstances)"
        )
    return (
        f"{peer} caps {'worklist' if level == 'WORKLIST' else f'{level}-level'} {service} "
        f"answers at {cap} ({outcome.reason}) and "
        f"{advice}. Still capped: {first}{others}{more}. The {rows} row(s) obtained are "
        "in the error's .partial frame."
    )
