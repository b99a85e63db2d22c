"""DICOM C-FIND matching rules (PS3.4 C.2.2.2) over a typed pandas DataFrame.

One engine, written once, answers queries for the embedded demo PACS and for
offline queries against the cache. It takes a frame typed the way
:func:`pacsframe.frames.to_series` types it and query values in the DICOM string
form they have in a C-FIND identifier, and returns a boolean mask. Every key is
compiled once (one regular expression, one set, one pair of bounds) and applied
to a whole column, so the cost grows with columns, not with Python-level rows.

The rules, per key:

* **Universal matching.** ``None``, ``""`` or a value made only of ``*`` matches
  every row, including rows where the attribute is empty. So does a key whose
  column the frame lacks: the engine treats it as an attribute the SCP does not
  support for matching and ignores it (PS3.4 lets an SCP do so for optional keys;
  the response then carries the attribute empty). ``QueryRetrieveLevel`` and
  ``SpecificCharacterSet`` are never matched.
* **Empty values never match** a non-universal value (PS3.4 C.2.2.2.1): a row with
  ``<NA>``, ``NaT`` or an empty list fails every other kind of matching.
* **Single value matching** is exact and case-sensitive after removing
  insignificant leading and trailing spaces (leading spaces are kept for ST, LT
  and UT, where PS3.5 makes them significant). PN is the exception: PS3.4 leaves
  the case sensitivity of PN to the SCP, and this engine, like Orthanc's default,
  matches PN case-insensitively (by Unicode case folding), on the whole DICOM
  string with its carets and ``=`` component groups, after dropping trailing empty
  components (``Smith^John^^`` is ``Smith^John``).
* **Wild card matching**: ``*`` matches any run of characters (also none), ``?``
  any single character, in every string VR except UI, AS and the date, time and
  numeric VRs, where ``*`` and ``?`` are literal characters (a value of only ``*``
  is still universal everywhere).
* **List of UID matching** for UI, and **multiple value matching** for the other
  VRs that use ``\\`` as a value delimiter (all but ST, LT, UT and UR): the key
  matches when any of its values matches. PS3.4 C.2.2.2.8 defines an "all values"
  semantics only under extended negotiation and leaves the plain case undefined;
  "any" is what Orthanc does, and what ``Modality="CT\\MR"`` is meant to say.
* **Range matching** for DA, TM and DT: ``a-b``, ``-b`` and ``a-``, both ends
  inclusive. A value, or a range end, given with less precision than the attribute
  stands for the whole period it names: ``20260406`` as a DT end includes every
  moment of that day, ``14`` as a TM value matches 14:00:00 to 14:59:59.999999.
  A range whose start is after its end is rejected. DT timezone offsets in the
  query are accepted and ignored, because typed frames keep local times as
  written (the offsets are dropped when the frame is built). Combined date-time
  matching (StudyDate with StudyTime, an extended negotiation option) is not
  implemented: each attribute is matched on its own.
* **Numbers** (IS, DS, SS, US, SL, UL, SV, UV, FL, FD) match by numeric equality,
  so ``"5"`` matches ``5.0``.
* **Multi-valued attributes** (list cells, e.g. ModalitiesInStudy, ImageType) match
  when any element matches any of the query values.
* Attributes of VRs this engine cannot compare (AT, OB, OW, UN, ...) are ignored,
  like missing columns. Sequence matching is not supported: a sequence keyword is
  rejected by :func:`pacsframe.frames.attribute`. (The demo PACS's Modality
  Worklist matches a sequence's items by matching a frame of one row per item, see
  :mod:`pacsframe.demo.worklist`.)

A query value that cannot be read as its VR (an impossible date, a malformed range,
text in a number) raises :class:`~pacsframe.errors.QueryError`.

Above the rules sit the levels. An archive (the demo PACS, the cache) indexes one
row per instance with the :data:`INDEX_KEYWORDS`; :func:`level_frame` derives the
patient, study and series rows from it (attributes from each entity's first
instance, plus the computed counts and ``ModalitiesInStudy``), and :func:`answer`
runs a whole :class:`~pacsframe.query.Query` over it, so every archive answers a
query with the same rows and columns.
"""

from __future__ import annotations

import datetime as _dt
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from . import frames
from .errors import QueryError

if TYPE_CHECKING:
    from .query import Query

__all__ = [
    "INDEX_KEYWORDS",
    "LEVEL_KEYWORDS",
    "NOT_MATCHED",
    "answer",
    "is_universal",
    "level_frame",
    "match",
]

#: Keywords that are never matching keys, whatever value they carry.
NOT_MATCHED = frozenset({"QueryRetrieveLevel", "SpecificCharacterSet"})

_RANGE_VRS = frozenset({"DA", "TM", "DT"})
_NUMBER_VRS = frozenset(frames.INT_VRS | frames.FLOAT_VRS)
_LITERAL_VRS = frozenset({"UI", "AS"})
_TEXT_VRS = frozenset(frames.STRING_VRS) - _LITERAL_VRS
# In these a backslash is text, not a value delimiter (PS3.5 6.2).
_SINGLE_VALUE_VRS = frozenset({"ST", "LT", "UT", "UR"})

_DA_RE = re.compile(r"(\d{4})(\d{2})(\d{2})")
_TM_RE = re.compile(r"(\d{2})(?:(\d{2})(?:(\d{2})(?:\.(\d{1,6}))?)?)?")
_DT_RE = re.compile(
    r"(\d{4})(?:(\d{2})(?:(\d{2})(?:(\d{2})(?:(\d{2})(?:(\d{2})(?:\.(\d{1,6}))?)?)?)?)?)?"
    r"(?:[+-](?:0\d|1[0-4])[0-5]\d)?"
)
_REGEX_SPECIAL = frozenset(".^$*+?()[]{}|\\")
# Trailing empty PN components, before a component group delimiter or at the end.
# Two patterns without look-ahead, which RE2 (pyarrow strings) lacks.
_PN_EMPTY_BEFORE_GROUP = r"\^+="
_PN_EMPTY_AT_END = r"\^+$"

# Bounds of datetime64[ns]; a query date outside them is clamped, which keeps the
# comparison exact for every date a frame can hold.
_TS_MIN, _TS_MAX = pd.Timestamp.min.ceil("D"), pd.Timestamp.max.floor("D")

Test = Callable[[pd.Series], np.ndarray]

# --- what an archive indexes, per level ----------------------------------------------------

_PATIENT = (
    "PatientID",
    "IssuerOfPatientID",
    "PatientName",
    "PatientBirthDate",
    "PatientBirthTime",
    "PatientSex",
    "OtherPatientIDs",
    "OtherPatientNames",
    "EthnicGroup",
    "PatientComments",
)
_STUDY = (
    "StudyInstanceUID",
    "StudyDate",
    "StudyTime",
    "AccessionNumber",
    "StudyID",
    "StudyDescription",
    "ReferringPhysicianName",
    "NameOfPhysiciansReadingStudy",
    "AdmittingDiagnosesDescription",
    "PatientAge",
    "PatientSize",
    "PatientWeight",
)
_SERIES = (
    "SeriesInstanceUID",
    "SeriesNumber",
    "SeriesDate",
    "SeriesTime",
    "Modality",
    "SeriesDescription",
    "BodyPartExamined",
    "ProtocolName",
    "Laterality",
    "PatientPosition",
    "Manufacturer",
    "ManufacturerModelName",
    "InstitutionName",
    "StationName",
    "PerformingPhysicianName",
    "OperatorsName",
    "FrameOfReferenceUID",
)
_INSTANCE = (
    "SOPInstanceUID",
    "SOPClassUID",
    "InstanceNumber",
    "ImageType",
    "Rows",
    "Columns",
    "BitsAllocated",
    "BitsStored",
    "SamplesPerPixel",
    "PhotometricInterpretation",
    "NumberOfFrames",
    "ContentDate",
    "ContentTime",
    "AcquisitionDate",
    "AcquisitionTime",
    "AcquisitionDateTime",
    "AcquisitionNumber",
    "InstanceCreationDate",
    "InstanceCreationTime",
    "SliceThickness",
    "SpacingBetweenSlices",
    "SliceLocation",
    "ImagePositionPatient",
    "ImageOrientationPatient",
    "PixelSpacing",
    "WindowCenter",
    "WindowWidth",
    "RescaleIntercept",
    "RescaleSlope",
)
_CHARSET = "SpecificCharacterSet"

#: Attributes an archive indexes per instance (the IMAGE level's columns).
INDEX_KEYWORDS: tuple[str, ...] = (*_PATIENT, *_STUDY, *_SERIES, *_INSTANCE, _CHARSET)

#: The columns of each query level, in order (computed attributes included).
LEVEL_KEYWORDS: dict[str, tuple[str, ...]] = {
    "PATIENT": (
        *_PATIENT,
        "NumberOfPatientRelatedStudies",
        "NumberOfPatientRelatedSeries",
        "NumberOfPatientRelatedInstances",
        _CHARSET,
    ),
    "STUDY": (
        *_PATIENT,
        *_STUDY,
        "ModalitiesInStudy",
        "SOPClassesInStudy",
        "NumberOfStudyRelatedSeries",
        "NumberOfStudyRelatedInstances",
        _CHARSET,
    ),
    "SERIES": (
        "PatientID",
        "StudyInstanceUID",
        *_SERIES,
        "NumberOfSeriesRelatedInstances",
        _CHARSET,
    ),
    "IMAGE": INDEX_KEYWORDS,
}

# The attribute that identifies one entity of each level above IMAGE.
_LEVEL_KEY = {"PATIENT": "PatientID", "STUDY": "StudyInstanceUID", "SERIES": "SeriesInstanceUID"}


def is_universal(value: str | Iterable[str] | None) -> bool:
    """True when ``value`` asks for the attribute without matching on it.

    That is ``None``, an empty string, a value made only of ``*`` (in any VR), or
    a list of values one of which is universal.

    Examples
    --------
    >>> is_universal(""), is_universal("*"), is_universal("CT\\\\*"), is_universal("CT")
    (True, True, True, False)
    """
    values = _split(value, split=True)
    return not values or any(_only_stars(v) for v in values)


def match(frame: pd.DataFrame, keys: Mapping[str, str | list[str] | None]) -> pd.Series:
    """Rows of ``frame`` that match every key, by the C-FIND rules of PS3.4 C.2.2.2.

    Parameters
    ----------
    frame : pandas.DataFrame
        A frame typed like :func:`pacsframe.frames.to_series` output: one column per
        DICOM keyword. Its index may be anything, duplicates included.
    keys : mapping of str to str, list of str or None
        DICOM keywords (or snake_case spellings) to query values in DICOM string
        form, as they arrive in a C-FIND identifier: ``"SMITH*"``,
        ``"20260301-20260406"``, ``"CT\\\\MR"``, ``""`` or ``None`` for universal
        matching. A list is the same as a backslash-separated value.

    Returns
    -------
    pandas.Series
        Boolean, aligned with ``frame.index``.

    Raises
    ------
    QueryError
        When a keyword is unknown or a value cannot be read as its VR, e.g. an
        impossible date or a malformed range.

    Examples
    --------
    >>> import pandas as pd
    >>> from pacsframe.frames import to_series
    >>> frame = pd.DataFrame({
    ...     "PatientName": to_series(["Smith^John", "Smyth^Jane", None], "PatientName"),
    ...     "StudyDate": to_series(["20260301", "20260406", "20260501"], "StudyDate"),
    ...     "ModalitiesInStudy": to_series(["CT\\\\MR", "MR", "CT"], "ModalitiesInStudy"),
    ... })
    >>> match(frame, {"PatientName": "SM?TH*"}).tolist()
    [True, True, False]
    >>> match(frame, {"StudyDate": "20260301-20260406"}).tolist()
    [True, True, False]
    >>> match(frame, {"StudyDate": "-20260331", "ModalitiesInStudy": "CT"}).tolist()
    [True, False, False]
    >>> match(frame, {"ModalitiesInStudy": "PT\\\\MR", "PatientName": ""}).tolist()
    [True, True, False]
    """
    mask = np.ones(len(frame), dtype=bool)
    for name, value in keys.items():
        attr = frames.attribute(name)
        if attr.keyword in NOT_MATCHED:
            continue
        # Compile before looking at the frame, so a bad value fails whatever it holds.
        test = _compile(attr, value)
        if test is None or attr.keyword not in frame.columns:
            continue
        column = frame[attr.keyword]
        if isinstance(column, pd.DataFrame):
            raise QueryError(
                f"the frame has more than one {attr.keyword} column; drop or rename "
                "the duplicates before matching."
            )
        mask &= _apply(test, column, attr)
        if not mask.any():
            break
    return pd.Series(mask, index=frame.index, dtype=bool)


# --- levels --------------------------------------------------------------------------------


def _entities(column: pd.Series) -> tuple[np.ndarray, np.ndarray]:
    """Codes of the entity each instance belongs to, and each entity's first instance."""
    codes, _ = pd.factorize(column, use_na_sentinel=False)
    first = np.unique(codes, return_index=True)[1]
    return codes, first


def _count_distinct(codes: np.ndarray, other: pd.Series, size: int) -> np.ndarray:
    other_codes, _ = pd.factorize(other, use_na_sentinel=False)
    pairs = np.unique(np.stack([codes, other_codes]), axis=1)
    return np.bincount(pairs[0], minlength=size)


def _collect(codes: np.ndarray, values: pd.Series, size: int) -> list[list[str]]:
    """Per entity, the sorted distinct non-empty values (ModalitiesInStudy and kin)."""
    pairs = pd.DataFrame({"code": codes, "value": values.to_numpy(dtype=object)})
    pairs = pairs[values.notna().to_numpy()].drop_duplicates().sort_values(["code", "value"])
    out: list[list[str]] = [[] for _ in range(size)]
    for code, value in zip(pairs["code"].tolist(), pairs["value"].tolist(), strict=True):
        out[code].append(value)
    return out


def _check_level(level: str) -> None:
    if level not in LEVEL_KEYWORDS:
        raise QueryError(
            f"QueryRetrieveLevel {level!r} is not one of {', '.join(LEVEL_KEYWORDS)}."
        )


def level_frame(instances: pd.DataFrame, level: str) -> pd.DataFrame:
    """One row per entity of ``level``, derived from an instance-level frame.

    Each patient, study or series takes its attributes from its first instance
    (in frame order) and gains the computed attributes of its level: the
    ``NumberOf...Related...`` counts, and at the STUDY level ``ModalitiesInStudy``
    and ``SOPClassesInStudy`` (sorted distinct values). Columns follow
    :data:`LEVEL_KEYWORDS`; those the instances lack are left out, as are the
    computed attributes whose source column is missing. Instances with an empty
    identifying key (e.g. no PatientID) are grouped as one entity.

    Parameters
    ----------
    instances : pandas.DataFrame
        One typed row per instance (columns from :data:`INDEX_KEYWORDS`, extra
        columns such as ``path`` allowed), e.g. a demo server's or the cache's index.
    level : {"PATIENT", "STUDY", "SERIES", "IMAGE"}
        The query level. ``"IMAGE"`` returns the instances unchanged (a shallow
        copy, with every column).

    Returns
    -------
    pandas.DataFrame
        The level's rows, with a fresh ``RangeIndex``.

    Raises
    ------
    QueryError
        For an unknown level, or when the level's identifying column is missing.

    Examples
    --------
    >>> import pandas as pd
    >>> from pacsframe.frames import to_series
    >>> instances = pd.DataFrame({
    ...     k: to_series(v, k) for k, v in {
    ...         "PatientID": ["P1", "P1", "P1"],
    ...         "StudyInstanceUID": ["1.2", "1.2", "1.2"],
    ...         "SeriesInstanceUID": ["1.2.1", "1.2.1", "1.2.2"],
    ...         "SOPInstanceUID": ["1.2.1.1", "1.2.1.2", "1.2.2.1"],
    ...         "Modality": ["CT", "CT", "MR"],
    ...     }.items()
    ... })
    >>> level_frame(instances, "SERIES")["NumberOfSeriesRelatedInstances"].tolist()
    [2, 1]
    >>> study = level_frame(instances, "STUDY")
    >>> study["ModalitiesInStudy"].tolist(), study["NumberOfStudyRelatedSeries"].tolist()
    ([['CT', 'MR']], [2])
    """
    _check_level(level)
    if level == "IMAGE":
        return instances.reset_index(drop=True)
    key = _LEVEL_KEY[level]
    if key not in instances.columns:
        raise QueryError(f"the instance frame has no {key} column to group the {level} level by.")
    codes, first = _entities(instances[key])
    size = len(first)
    columns = [c for c in LEVEL_KEYWORDS[level] if c in instances.columns]
    out = instances[columns].iloc[first].reset_index(drop=True)
    count = np.bincount(codes, minlength=size)

    def distinct(keyword: str) -> np.ndarray | None:
        if keyword not in instances.columns:
            return None
        return _count_distinct(codes, instances[keyword], size)

    counts: dict[str, np.ndarray | None]
    if level == "PATIENT":
        counts = {
            "NumberOfPatientRelatedStudies": distinct("StudyInstanceUID"),
            "NumberOfPatientRelatedSeries": distinct("SeriesInstanceUID"),
            "NumberOfPatientRelatedInstances": count,
        }
    elif level == "STUDY":
        for keyword, source in (
            ("ModalitiesInStudy", "Modality"),
            ("SOPClassesInStudy", "SOPClassUID"),
        ):
            if source in instances.columns:
                out[keyword] = pd.Series(_collect(codes, instances[source], size), dtype=object)
        counts = {
            "NumberOfStudyRelatedSeries": distinct("SeriesInstanceUID"),
            "NumberOfStudyRelatedInstances": count,
        }
    else:
        counts = {"NumberOfSeriesRelatedInstances": count}
    for keyword, values in counts.items():
        if values is not None:
            out[keyword] = frames.to_series(values.tolist(), keyword)
    return out[[c for c in LEVEL_KEYWORDS[level] if c in out.columns]]


def answer(instances: pd.DataFrame, query: Query) -> pd.DataFrame:
    """Answer a C-FIND query from an instance-level frame, as a PACS would.

    The rows of :func:`level_frame` at ``query.level`` that :func:`match`
    ``query.matching``, with exactly ``query.columns`` as columns, in that order;
    a column the archive does not hold comes back empty (``<NA>``, ``NaT`` or
    empty lists), as it would from a PACS that returns the key without a value.
    The frame is typed like a C-FIND answer and its ``attrs["pacsframe"]`` holds
    the query (``Query.to_json``).

    Parameters
    ----------
    instances : pandas.DataFrame
        One typed row per instance (see :func:`level_frame`).
    query : pacsframe.query.Query
        The validated query (level, model and keys in DICOM string form).

    Returns
    -------
    pandas.DataFrame
        One row per match, with a fresh ``RangeIndex``.

    Raises
    ------
    QueryError
        For an unknown level, or a matching value that cannot be read as its VR.

    Examples
    --------
    >>> import pandas as pd
    >>> from pacsframe.frames import to_series
    >>> from pacsframe.query import Query
    >>> instances = pd.DataFrame({
    ...     k: to_series(v, k) for k, v in {
    ...         "PatientID": ["P1", "P2"],
    ...         "StudyInstanceUID": ["1.2", "1.3"],
    ...         "SeriesInstanceUID": ["1.2.1", "1.3.1"],
    ...         "SOPInstanceUID": ["1.2.1.1", "1.3.1.1"],
    ...         "Modality": ["CT", "MR"],
    ...         "StudyDate": ["20260301", "20260406"],
    ...     }.items()
    ... })
    >>> query = Query("STUDY", "study", {"StudyDate": "20260401-", "StudyInstanceUID": "",
    ...                                  "ModalitiesInStudy": "", "AccessionNumber": ""})
    >>> found = answer(instances, query)
    >>> found.columns.tolist()
    ['StudyDate', 'StudyInstanceUID', 'ModalitiesInStudy', 'AccessionNumber']
    >>> found["StudyInstanceUID"].tolist(), found["ModalitiesInStudy"].tolist()
    (['1.3'], [['MR']])
    >>> str(found["AccessionNumber"].dtype)
    'string'
    """
    rows = level_frame(instances, query.level)
    mask = match(rows, query.matching).to_numpy()
    rows = rows[mask].reset_index(drop=True)
    size = len(rows)
    out = pd.DataFrame(
        {
            keyword: rows[keyword]
            if keyword in rows.columns
            else frames.to_series([None] * size, keyword)
            for keyword in query.columns
        },
        index=pd.RangeIndex(size),
    )
    out.attrs["pacsframe"] = query.to_json()
    return out


# --- compiling a key ---------------------------------------------------------------------


def _split(value: str | Iterable[str] | None, *, split: bool) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        items: list[object] = [value]
    elif isinstance(value, (list, tuple)):
        items = list(value)
    else:
        items = [value]  # rejected below with a message
    out: list[str] = []
    for item in items:
        if item is None:
            continue
        if not isinstance(item, str):
            raise QueryError(
                f"query values must be DICOM strings, got {type(item).__name__} {item!r}; "
                "convert them with pacsframe.query.encode_value first."
            )
        parts = item.split("\\") if split else [item]
        out.extend(p for p in parts if p.strip(" \x00"))
    return out


def _only_stars(value: str) -> bool:
    stripped = value.strip(" \x00")
    return bool(stripped) and not stripped.strip("*")


def _clean(value: str, vr: str) -> str:
    value = value.rstrip(" \x00")
    return value if vr in frames.KEEP_LEADING_SPACE_VRS else value.lstrip(" ")


def _compile(attr: frames.Attribute, value: str | Iterable[str] | None) -> Test | None:
    """One test for a whole column, or None for universal matching."""
    values = _split(value, split=attr.vr not in _SINGLE_VALUE_VRS)
    if not values or any(_only_stars(v) for v in values):
        return None
    values = [_clean(v, attr.vr) for v in values]
    if attr.vr in _RANGE_VRS:
        return _range_test([_period(v, attr) for v in values], attr.vr)
    if attr.vr in _NUMBER_VRS:
        return _number_test([_number(v, attr) for v in values])
    if attr.vr in _LITERAL_VRS:
        return _text_test(values, attr.vr, wildcards=False)
    if attr.vr in _TEXT_VRS:
        return _text_test(values, attr.vr, wildcards=True)
    # AT, OB, OW, UN and friends: no ordering or text form to compare.
    return None


def _wildcard_regex(pattern: str) -> str:
    # Hand-rolled escaping: re.escape's output is not always valid in RE2, which
    # pandas uses for pyarrow-backed strings.
    out = []
    for char in pattern:
        if char == "*":
            out.append(".*")
        elif char == "?":
            out.append(".")
        elif char in _REGEX_SPECIAL:
            out.append("\\" + char)
        else:
            out.append(char)
    return "".join(out)


def _fold_pn(value: str) -> str:
    folded = re.sub(_PN_EMPTY_BEFORE_GROUP, "=", value.casefold())
    return re.sub(_PN_EMPTY_AT_END, "", folded).rstrip("=")


def _text_test(values: list[str], vr: str, *, wildcards: bool) -> Test:
    fold = vr == "PN"
    exact: set[str] = set()
    patterns: list[str] = []
    for value in values:
        folded = _fold_pn(value) if fold else value
        if wildcards and ("*" in folded or "?" in folded):
            patterns.append(_wildcard_regex(folded))
        else:
            exact.add(folded)
    regex = "(?s)(?:" + "|".join(patterns) + ")" if patterns else None

    def test(column: pd.Series) -> np.ndarray:
        text = column if column.dtype == "string" else column.astype("string")
        text = text.str.rstrip(" \x00")
        if vr not in frames.KEEP_LEADING_SPACE_VRS:
            text = text.str.lstrip(" ")
        if fold:
            text = (
                text.str.casefold()
                .str.replace(_PN_EMPTY_BEFORE_GROUP, "=", regex=True)
                .str.replace(_PN_EMPTY_AT_END, "", regex=True)
                .str.rstrip("=")
            )
        hit = text.isin(exact).to_numpy(dtype=bool, na_value=False)
        if regex is not None:
            hit = hit | text.str.fullmatch(regex).to_numpy(dtype=bool, na_value=False)
        return hit

    return test


def _number(value: str, attr: frames.Attribute) -> float:
    try:
        number = float(value.strip())
    except ValueError:
        raise QueryError(
            f"{attr.keyword} ({attr.vr}) takes a number, got {value!r}; numbers match "
            "by equality, without wild cards or ranges."
        ) from None
    if not np.isfinite(number):
        raise QueryError(f"{attr.keyword} ({attr.vr}) takes a finite number, got {value!r}.")
    return number


def _number_test(numbers: list[float]) -> Test:
    wanted = np.array(sorted(set(numbers)), dtype=float)

    def test(column: pd.Series) -> np.ndarray:
        if column.dtype.kind not in "iuf" and str(column.dtype) not in ("Int64", "Float64"):
            column = pd.to_numeric(column, errors="coerce")
        values = column.to_numpy(dtype=float, na_value=np.nan)
        return np.isin(values, wanted)

    return test


# --- dates and times ---------------------------------------------------------------------


@dataclass(frozen=True)
class _Period:
    """A half-open interval [start, stop); None is an open end."""

    start: pd.Timestamp | pd.Timedelta | None
    stop: pd.Timestamp | pd.Timedelta | None


def _bad_temporal(value: str, attr: frames.Attribute, why: str) -> QueryError:
    forms = {
        "DA": "YYYYMMDD",
        "TM": "HHMMSS.FFFFFF (trailing parts optional)",
        "DT": "YYYYMMDDHHMMSS.FFFFFF&ZZXX (trailing parts optional)",
    }[attr.vr]
    return QueryError(
        f"{attr.keyword} ({attr.vr}) value {value!r} {why}; use {forms}, or a range "
        "'start-end', '-end' or 'start-' of those."
    )


def _after(start: _dt.datetime, step: _dt.timedelta) -> _dt.datetime:
    try:
        return start + step
    except OverflowError:  # the end of year 9999
        return _dt.datetime.max


def _clamp(stamp: _dt.datetime) -> pd.Timestamp:
    if stamp <= _TS_MIN:
        return _TS_MIN
    if stamp >= _TS_MAX:
        return _TS_MAX
    return pd.Timestamp(stamp)


def _date_bounds(text: str, value: str, attr: frames.Attribute) -> tuple[pd.Timestamp, ...]:
    found = _DA_RE.fullmatch(text.replace(".", "") if len(text) == 10 else text)
    if not found:
        raise _bad_temporal(value, attr, "is not a date")
    try:
        day = _dt.datetime(*(int(g) for g in found.groups()))
    except ValueError:
        raise _bad_temporal(value, attr, "is an impossible date") from None
    return _clamp(day), _clamp(_after(day, _dt.timedelta(days=1)))


def _time_bounds(text: str, value: str, attr: frames.Attribute) -> tuple[pd.Timedelta, ...]:
    found = _TM_RE.fullmatch(text.replace(":", ""))
    if not found:
        raise _bad_temporal(value, attr, "is not a time")
    hh, mm, ss, fraction = found.groups()
    if int(hh) > 23 or int(mm or 0) > 59 or int(ss or 0) > 60:
        raise _bad_temporal(value, attr, "is an impossible time")
    start = pd.Timedelta(
        hours=int(hh),
        minutes=int(mm or 0),
        seconds=int(ss or 0),
        microseconds=int((fraction or "0").ljust(6, "0")),
    )
    if fraction:
        step = pd.Timedelta(microseconds=10 ** (6 - len(fraction)))
    elif ss:
        step = pd.Timedelta(seconds=1)
    elif mm:
        step = pd.Timedelta(minutes=1)
    else:
        step = pd.Timedelta(hours=1)
    return start, start + step


def _datetime_bounds(text: str, value: str, attr: frames.Attribute) -> tuple[pd.Timestamp, ...]:
    found = _DT_RE.fullmatch(text)
    if not found:
        raise _bad_temporal(value, attr, "is not a date-time")
    year, month, day, hh, mm, ss, fraction = found.groups()
    try:
        start = _dt.datetime(
            int(year),
            int(month or 1),
            int(day or 1),
            int(hh or 0),
            int(mm or 0),
            int(ss or 0),
            int((fraction or "0").ljust(6, "0")),
        )
    except ValueError:
        raise _bad_temporal(value, attr, "is an impossible date-time") from None
    if fraction:
        stop = _after(start, _dt.timedelta(microseconds=10 ** (6 - len(fraction))))
    elif ss:
        stop = _after(start, _dt.timedelta(seconds=1))
    elif mm:
        stop = _after(start, _dt.timedelta(minutes=1))
    elif hh:
        stop = _after(start, _dt.timedelta(hours=1))
    elif day:
        stop = _after(start, _dt.timedelta(days=1))
    elif month:
        stop = _after(start.replace(day=28), _dt.timedelta(days=4)).replace(day=1)
    else:
        stop = start.replace(year=start.year + 1) if start.year < 9999 else _dt.datetime.max
    return _clamp(start), _clamp(stop)


_BOUNDS = {"DA": _date_bounds, "TM": _time_bounds, "DT": _datetime_bounds}


def _period(value: str, attr: frames.Attribute) -> _Period:
    """Read a DA/TM/DT value or range as the interval of moments it covers."""
    bounds = _BOUNDS[attr.vr]
    text = value.strip()
    if attr.vr == "DT" and _DT_RE.fullmatch(text):
        # A "-" in a DT may be a timezone offset sign; a whole DT wins over a range.
        return _Period(*bounds(text, value, attr))
    if "-" not in text:
        return _Period(*bounds(text, value, attr))
    if text.count("-") > 1 and attr.vr != "DT":
        raise _bad_temporal(value, attr, "has more than one '-'")
    head, tail = _split_range(text, attr)
    if not head and not tail:
        raise _bad_temporal(value, attr, "is a range with neither start nor end")
    start = bounds(head, value, attr)[0] if head else None
    stop = bounds(tail, value, attr)[1] if tail else None
    if start is not None and tail and start > bounds(tail, value, attr)[0]:
        raise _bad_temporal(value, attr, "is a range whose start is after its end")
    return _Period(start, stop)


def _split_range(text: str, attr: frames.Attribute) -> tuple[str, str]:
    if attr.vr != "DT":
        head, _, tail = text.partition("-")
        return head.strip(), tail.strip()
    # DT ends may carry "-ZZXX" offsets: try every "-" and keep the split whose two
    # sides are both valid (or empty).
    for at in (i for i, char in enumerate(text) if char == "-"):
        head, tail = text[:at].strip(), text[at + 1 :].strip()
        if (not head or _DT_RE.fullmatch(head)) and (not tail or _DT_RE.fullmatch(tail)):
            return head, tail
    raise _bad_temporal(text, attr, "is not a date-time range")


def _range_test(periods: list[_Period], vr: str) -> Test:
    def test(column: pd.Series) -> np.ndarray:
        column = _as_temporal(column, vr)
        hit = np.zeros(len(column), dtype=bool)
        for period in periods:
            inside = column.notna()
            if period.start is not None:
                inside &= column >= period.start
            if period.stop is not None:
                inside &= column < period.stop
            hit |= inside.to_numpy(dtype=bool, na_value=False)
        return hit

    return test


def _as_temporal(column: pd.Series, vr: str) -> pd.Series:
    if vr == "TM":
        if column.dtype.kind == "m":
            return column
        return pd.to_timedelta(column, errors="coerce")
    if column.dtype.kind == "M":
        # Frames are naive local time; an aware column is compared on its wall clock.
        return column.dt.tz_localize(None) if column.dt.tz is not None else column
    return pd.to_datetime(column, errors="coerce")


# --- applying a test ---------------------------------------------------------------------


def _apply(test: Test, column: pd.Series, attr: frames.Attribute) -> np.ndarray:
    """Run ``test`` over a column, element-wise for list cells, by position."""
    column = column.reset_index(drop=True)
    if column.dtype != object or not attr.multivalued:
        if column.dtype == object and attr.vr in _TEXT_VRS | _LITERAL_VRS:
            # A hand-built object column of plain strings.
            column = column.astype("string")
        return np.asarray(test(column), dtype=bool)
    # List cells: one row per element (empty lists become one NA row), tested in a
    # single pass, then folded back with "any".
    exploded = column.explode()
    if len(exploded) == 0:
        return np.zeros(len(column), dtype=bool)
    elements = pd.Series(exploded.to_numpy(), dtype=object)
    elements = elements.where(elements.notna(), None)
    if attr.vr in _TEXT_VRS | _LITERAL_VRS:
        elements = elements.astype("string")
    hits = np.asarray(test(elements), dtype=bool)
    rows = exploded.index.to_numpy(dtype=np.intp)
    return np.bincount(rows, weights=hits, minlength=len(column)) > 0
