"""Building and validating C-FIND identifiers: levels, models, keys and values.

Everything a user may pass as a matching value is turned here into the DICOM
string the peer expects, and every mistake that can be caught before sending is
raised as a :class:`~pacsframe.errors.QueryError` that says what to do instead.
"""

from __future__ import annotations

import datetime as _dt
import math
import re
import struct
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
from pydicom import config
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset

from . import frames
from .errors import QueryError

__all__ = [
    "DEFAULT_KEYS",
    "INSTANCE_COUNT_KEY",
    "LEVELS",
    "MODELS",
    "SPS_KEYS",
    "WORKLIST",
    "Query",
    "build_query",
    "build_worklist_query",
    "encode_value",
    "normalize_level",
    "normalize_model",
    "required_keys",
]

LEVELS = ("PATIENT", "STUDY", "SERIES", "IMAGE")
MODELS = ("study", "patient")
_LEVEL_ALIASES = {
    "patient": "PATIENT",
    "patients": "PATIENT",
    "study": "STUDY",
    "studies": "STUDY",
    "series": "SERIES",
    "image": "IMAGE",
    "images": "IMAGE",
    "instance": "IMAGE",
    "instances": "IMAGE",
}

#: The unique key of each level.
UNIQUE_KEY = {
    "PATIENT": "PatientID",
    "STUDY": "StudyInstanceUID",
    "SERIES": "SeriesInstanceUID",
    "IMAGE": "SOPInstanceUID",
}

#: The count column that says how many instances an entity of each level holds.
INSTANCE_COUNT_KEY = {
    "PATIENT": "NumberOfPatientRelatedInstances",
    "STUDY": "NumberOfStudyRelatedInstances",
    "SERIES": "NumberOfSeriesRelatedInstances",
}

#: Columns returned by default at each level, in this order.
DEFAULT_KEYS: dict[str, tuple[str, ...]] = {
    "PATIENT": (
        "PatientID",
        "PatientName",
        "PatientBirthDate",
        "PatientSex",
        "NumberOfPatientRelatedStudies",
        "NumberOfPatientRelatedSeries",
        "NumberOfPatientRelatedInstances",
    ),
    "STUDY": (
        "PatientID",
        "PatientName",
        "PatientBirthDate",
        "PatientSex",
        "StudyInstanceUID",
        "StudyDate",
        "StudyTime",
        "AccessionNumber",
        "StudyID",
        "StudyDescription",
        "ModalitiesInStudy",
        "ReferringPhysicianName",
        "NumberOfStudyRelatedSeries",
        "NumberOfStudyRelatedInstances",
    ),
    "SERIES": (
        "StudyInstanceUID",
        "SeriesInstanceUID",
        "Modality",
        "SeriesNumber",
        "SeriesDescription",
        "SeriesDate",
        "SeriesTime",
        "BodyPartExamined",
        "NumberOfSeriesRelatedInstances",
    ),
    "IMAGE": (
        "StudyInstanceUID",
        "SeriesInstanceUID",
        "SOPInstanceUID",
        "SOPClassUID",
        "InstanceNumber",
        "ImageType",
        "Rows",
        "Columns",
    ),
}

#: The level name of a Modality Worklist query. The MWL information model has no
#: levels and its identifier carries no QueryRetrieveLevel; pacsframe uses this name
#: where a level names the kind of query (``Query.level``, the frame's attrs, caps).
WORKLIST = "WORKLIST"
#: The keys that belong to the Scheduled Procedure Step Sequence item of a worklist
#: identifier (PS3.4 Table K.6-1); every other key of a worklist query is top level.
SPS_KEYS = frozenset(
    {
        "ScheduledStationAETitle",
        "ScheduledProcedureStepStartDate",
        "ScheduledProcedureStepStartTime",
        "ScheduledProcedureStepEndDate",
        "ScheduledProcedureStepEndTime",
        "Modality",
        "ScheduledPerformingPhysicianName",
        "ScheduledProcedureStepDescription",
        "ScheduledProcedureStepID",
        "ScheduledStationName",
        "ScheduledProcedureStepLocation",
        "ScheduledProcedureStepStatus",
        "PreMedication",
        "RequestedContrastAgent",
        "CommentsOnTheScheduledProcedureStep",
    }
)
#: The tag of the Scheduled Procedure Step Sequence, (0040,0100).
SPS_SEQUENCE_TAG = 0x00400100
DEFAULT_KEYS[WORKLIST] = (
    "PatientID",
    "PatientName",
    "PatientBirthDate",
    "PatientSex",
    "AccessionNumber",
    "RequestedProcedureID",
    "RequestedProcedureDescription",
    "StudyInstanceUID",
    "ReferringPhysicianName",
    "ScheduledProcedureStepStartDate",
    "ScheduledProcedureStepStartTime",
    "Modality",
    "ScheduledStationAETitle",
    "ScheduledStationName",
    "ScheduledProcedureStepLocation",
    "ScheduledPerformingPhysicianName",
    "ScheduledProcedureStepDescription",
    "ScheduledProcedureStepID",
)

# PS3.4 C.2.2.2.4: these VRs take no wildcards.
_NO_WILDCARD_VRS = frozenset(
    {"DA", "TM", "DT", "UI", "AS", "IS", "DS", "SS", "US", "SL", "UL", "SV", "UV", "FL", "FD"}
)
_RANGE_VRS = frozenset({"DA", "TM", "DT"})
# Values of these VRs are bytes or tags, not text: nothing to match with a string.
_UNMATCHED_VRS = frozenset({"OB", "OD", "OF", "OL", "OV", "OW", "UN", "AT"})
# Maximum value lengths (PS3.5 Table 6.2-1) for the VRs users type into queries.
_MAX_LENGTH = {"AE": 16, "AS": 4, "CS": 16, "DS": 16, "IS": 12, "LO": 64, "PN": 64 * 5, "SH": 16}
_MAX_LENGTH.update({"UI": 64, "ST": 1024, "LT": 10240})


def _int_range(code: str) -> tuple[int, int]:
    bits = 8 * struct.calcsize("<" + code)  # standard sizes, as on the wire
    return (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if code.islower() else (0, 2**bits - 1)


_BINARY_RANGE = {vr: _int_range(code) for vr, code in frames.BINARY_INT_VRS.items()}
_FL_MAX = float(np.finfo(np.float32).max)
_CS_RE = re.compile(r"^[A-Z0-9 _*?]*$")
_ISO_DATE = re.compile(r"^(\d{4})-(\d{2})-(\d{2})$")
_ISO_TIME = re.compile(r"^(\d{2}):(\d{2})(?::(\d{2})(\.\d{1,6})?)?$")
_ISO_DATETIME = re.compile(r"^(\d{4}-\d{2}-\d{2})[T ](\d{2}:\d{2}(?::\d{2}(?:\.\d{1,6})?)?)$")
_DICOM_DA = re.compile(r"^\d{8}$")
_DICOM_TM = re.compile(r"^\d{2}(\d{2}(\d{2}(\.\d{1,6})?)?)?$")
_DICOM_DT = re.compile(r"^\d{4}(\d{2}(\d{2}(\d{2}(\d{2}(\d{2}(\.\d{1,6})?)?)?)?)?)?([+-]\d{4})?$")


def normalize_level(level: str) -> str:
    """Return the DICOM QueryRetrieveLevel for ``level`` ("study", "IMAGE", "instances"...).

    Examples
    --------
    >>> normalize_level("instances")
    'IMAGE'
    """
    found = _LEVEL_ALIASES.get(str(level).strip().lower())
    if found is None and str(level).strip().lower() == "worklist":
        raise QueryError(
            "a Modality Worklist is not a query/retrieve level; use "
            "pacs.find_worklist(...) (the same keys and value forms)."
        )
    if found is None:
        raise QueryError(
            f"{level!r} is not a query level; use one of 'patient', 'study', 'series' or 'image'."
        )
    return found


def normalize_model(model: str) -> str:
    """Return ``"study"`` or ``"patient"`` for a query/retrieve information model name."""
    text = str(model).strip().lower().replace("-", "_").replace(" ", "_")
    text = text.removesuffix("_root")
    if text not in MODELS:
        raise QueryError(
            f"{model!r} is not a query/retrieve model; use model='study' (study root) "
            "or model='patient' (patient root)."
        )
    return text


def required_keys(level: str, model: str) -> tuple[str, ...]:
    """The unique keys of the levels above ``level`` that a hierarchical query must carry.

    Examples
    --------
    >>> required_keys("SERIES", "study")
    ('StudyInstanceUID',)
    >>> required_keys("STUDY", "patient")
    ('PatientID',)
    """
    levels = LEVELS if model == "patient" else LEVELS[1:]
    if level not in levels:
        raise QueryError(
            f"the study-root model has no {level} level; use model='patient' for "
            "patient-level queries (find_patients does)."
        )
    return tuple(UNIQUE_KEY[lv] for lv in levels[: levels.index(level)])


# --- values -----------------------------------------------------------------------------


def _check_date(text: str, keyword: str) -> str:
    try:
        _dt.date(int(text[:4]), int(text[4:6]), int(text[6:8]))
    except ValueError:
        raise QueryError(
            f"{keyword}={text!r} is not a real date; give a date such as '2026-03-01' "
            "or '20260301'."
        ) from None
    return text


def _one_temporal(value: Any, vr: str, keyword: str) -> str:
    """One end of a DA/TM/DT value (no range) as a DICOM string."""
    if value is None or value is pd.NaT:
        return ""
    if isinstance(value, str):
        text = value.strip()
        if not text:
            return ""
        if not text.isascii():
            # \d would match other scripts' digits, which a DICOM date cannot hold.
            raise QueryError(
                f"{keyword}={value!r} holds characters other than ASCII; write dates and "
                "times with the digits 0-9, e.g. '2026-03-01' or '08:30'."
            )
        if vr == "DA":
            m = _ISO_DATE.match(text)
            if m:
                text = "".join(m.groups())
            if not _DICOM_DA.match(text):
                raise QueryError(
                    f"{keyword}={value!r} is not a date; use '2026-03-01', '20260301', "
                    "a datetime.date, or a (start, end) tuple for a range."
                )
            return _check_date(text, keyword)
        if vr == "TM":
            m = _ISO_TIME.match(text)
            if m:
                hh, mm, ss, frac = m.groups()
                text = hh + mm + (ss or "") + (frac or "")
            if (
                not _DICOM_TM.match(text)
                or int(text[:2]) > 23
                or (len(text) >= 4 and int(text[2:4]) > 59)
            ):
                raise QueryError(
                    f"{keyword}={value!r} is not a time of day; use '08:30', '0830', "
                    "'083000' or a datetime.time."
                )
            return text
        m = _ISO_DATETIME.match(text)
        if m:
            text = m.group(1).replace("-", "") + m.group(2).replace(":", "")
        elif _ISO_DATE.match(text):
            text = text.replace("-", "")
        if not _DICOM_DT.match(text):
            raise QueryError(
                f"{keyword}={value!r} is not a date-time; use '2026-03-01T08:30', "
                "'202603010830' or a datetime.datetime."
            )
        if len(text) >= 8:
            _check_date(text[:8], keyword)
        return text
    if isinstance(value, (pd.Timestamp, _dt.datetime, np.datetime64, _dt.date)):
        if vr == "TM" and isinstance(value, _dt.date) and not isinstance(value, _dt.datetime):
            raise QueryError(f"{keyword} is a time; give a datetime.time, not a date.")
        return frames.to_dicom(value, keyword)
    if isinstance(value, (_dt.time, _dt.timedelta, pd.Timedelta)) and vr == "TM":
        return frames.to_dicom(value, keyword)
    raise QueryError(
        f"{keyword} cannot match on a {type(value).__name__}; give a string, a date/time "
        "or a (start, end) tuple."
    )


def _temporal(value: Any, vr: str, keyword: str) -> str:
    if isinstance(value, tuple):
        if len(value) != 2:
            raise QueryError(
                f"{keyword} ranges are (start, end) pairs; got {len(value)} items. Use "
                "None for an open end, e.g. (None, '2026-04-06')."
            )
        start, end = (_one_temporal(v, vr, keyword) for v in value)
        if not start and not end:
            return ""
        if start and end and vr == "DA" and start > end:
            raise QueryError(
                f"{keyword} range starts after it ends ({start} > {end}); swap the two ends."
            )
        return f"{start}-{end}"
    if isinstance(value, str):
        text = value.strip()
        if any(c in text for c in "*?"):
            hint = (
                "use a range instead, e.g. (start, end) or '20260301-20260331'"
                if text not in ("*",)
                else "pass None or '' to return it without matching"
            )
            raise QueryError(
                f"{keyword}={value!r}: wildcards are not allowed in a {vr} attribute; {hint}."
            )
        if vr == "DA" and _ISO_DATE.match(text):
            return _one_temporal(text, vr, keyword)
        if vr == "DT" and (_ISO_DATETIME.match(text) or _ISO_DATE.match(text)):
            return _one_temporal(text, vr, keyword)
        if "-" in text and not (vr == "DT" and re.search(r"\d[+-]\d{4}$", text)):
            start, _, end = text.partition("-")
            return _temporal((start or None, end or None), vr, keyword)
    return _one_temporal(value, vr, keyword)


def _check_string(text: str, attr: frames.Attribute) -> str:
    vr, keyword = attr.vr, attr.keyword
    has_wildcard = any(c in text for c in "*?")
    if vr == "UI":
        if has_wildcard:
            raise QueryError(
                f"{keyword}={text!r}: wildcards are not allowed in a UID; pass the full "
                "UID, a list of UIDs, or None to return it without matching."
            )
        if not frames.is_uid(text):
            raise QueryError(
                f"{keyword}={text!r} is not a valid UID (digits and dots, at most 64 "
                "characters, no leading zeros); copy it from a find_* result."
            )
    elif vr in _NO_WILDCARD_VRS and has_wildcard and text != "*":
        raise QueryError(
            f"{keyword}={text!r}: wildcards are not allowed in a {vr} attribute; "
            "match a single value instead."
        )
    if vr == "CS" and not _CS_RE.match(text):
        hint = f" such as {text.upper()!r}" if _CS_RE.match(text.upper()) else ""
        raise QueryError(
            f"{keyword}={text!r}: code strings (CS) hold upper-case letters, digits, space "
            f"and underscore only; use the upper-case code{hint}."
        )
    if vr not in frames.CHARSET_VRS and not text.isascii():
        raise QueryError(
            f"{keyword}={text!r}: {vr} values hold ASCII characters only (only names and "
            "texts follow the character set); use ASCII letters and digits 0-9."
        )
    if vr in ("IS", "DS"):
        try:
            number = float(text)
        except ValueError:
            raise QueryError(f"{keyword}={text!r} is not a number; give a number.") from None
        if vr == "IS" and not number.is_integer():
            raise QueryError(f"{keyword}={text!r} is an integer attribute; give a whole number.")
    if vr in frames.BINARY_INT_VRS or vr in frames.BINARY_FLOAT_VRS:
        try:
            number = float(text)
        except ValueError:
            raise QueryError(f"{keyword}={text!r} is not a number; give a number.") from None
        if vr in frames.BINARY_INT_VRS:
            # Sent as a binary number of the VR's size: whole and in range, or it
            # could not be encoded at all.
            low, high = _BINARY_RANGE[vr]
            try:
                whole: int | None = int(text)
            except ValueError:
                whole = int(number) if number.is_integer() else None
            if whole is None or not low <= whole <= high:
                raise QueryError(
                    f"{keyword}={text!r}: {keyword} is {vr}, a whole number from {low} to "
                    f"{high}; give one."
                )
            return str(whole)
        if vr == "FL" and math.isfinite(number) and abs(number) > _FL_MAX:
            raise QueryError(
                f"{keyword}={text!r} is too large for {vr} (a 32-bit float, at most "
                f"{_FL_MAX:.6g}); give a smaller number."
            )
    limit = _MAX_LENGTH.get(vr)
    if limit and len(text) > limit:
        raise QueryError(
            f"{keyword} is at most {limit} characters for its VR {vr}; the value given has "
            f"{len(text)}. Shorten it or use a wildcard such as {text[: min(limit, 8)] + '*'!r}."
        )
    if "\\" in text and not attr.multivalued and vr != "UI":
        raise QueryError(
            f"{keyword}={text!r}: a backslash separates multiple values, which {keyword} "
            "does not take; match one value."
        )
    return text


def _is_listlike(value: Any) -> bool:
    return isinstance(value, (list, set, frozenset, pd.Series, pd.Index, np.ndarray)) or (
        isinstance(value, Iterable) and not isinstance(value, (str, bytes, tuple, Mapping))
    )


def encode_value(keyword: str, value: Any) -> str:
    """Turn a user's matching value for ``keyword`` into its DICOM query string.

    Accepts the forms DESIGN.md lists: plain strings and wildcards, dates and
    times (``datetime``, ``pandas.Timestamp``, ISO strings), ``(start, end)``
    ranges with ``None`` for an open end, DICOM range strings, lists of UIDs,
    numbers, and ``None``/``""`` for a return key.

    Examples
    --------
    >>> encode_value("StudyDate", ("2026-03-01", None))
    '20260301-'
    >>> encode_value("SeriesInstanceUID", ["1.2.3", "1.2.4"])
    '1.2.3\\\\1.2.4'
    >>> encode_value("PatientName", "SMITH*")
    'SMITH*'
    """
    attr = frames.attribute(keyword)
    keyword, vr = attr.keyword, attr.vr
    if value is None or (isinstance(value, str) and not value.strip()):
        return ""
    if not isinstance(value, (list, tuple, np.ndarray, pd.Series, pd.Index)) and frames.is_missing(
        value
    ):
        return ""
    if isinstance(value, str) and "\\" in value and (vr == "UI" or attr.multivalued):
        # A DICOM multi-value string (as typed on a command line) is a list.
        value = [v for v in value.split("\\")]
    if _is_listlike(value):
        items = list(value)
        if vr != "UI" and not attr.multivalued:
            raise QueryError(
                f"{keyword} takes a single value, not a list; only UIDs take list matching. "
                f"Query once per value, or filter the frame with "
                f"frame[frame.{keyword}.isin([...])]."
            )
        if not items:
            raise QueryError(
                f"{keyword} was given an empty list, which matches nothing; pass None to "
                "return the attribute without matching on it."
            )
        parts = [encode_value(keyword, v) for v in items]
        if any(not p for p in parts):
            raise QueryError(f"{keyword} list has an empty item; remove it.")
        return "\\".join(parts)
    if vr in _UNMATCHED_VRS:
        raise QueryError(
            f"{keyword} is {vr} (binary data or a tag), which C-FIND cannot match on; pass "
            f"None to return it, or filter the frame with pandas."
        )
    if vr in _RANGE_VRS:
        return _temporal(value, vr, keyword)
    if isinstance(value, tuple):
        raise QueryError(
            f"{keyword} is {vr}, which takes no range; ranges are only for dates and times "
            "(DA, TM, DT). Filter the frame with pandas instead."
        )
    if isinstance(value, (bool, np.bool_)):
        raise QueryError(f"{keyword} cannot match on True/False; give a {vr} value.")
    if isinstance(value, (int, float, np.integer, np.floating)):
        if vr not in frames.INT_VRS and vr not in frames.FLOAT_VRS and vr not in ("SH", "LO"):
            raise QueryError(f"{keyword} is {vr}; give it as a string, e.g. {str(value)!r}.")
        text = frames.to_dicom(value, keyword)
    elif isinstance(value, str):
        text = value.strip()
    else:
        raise QueryError(
            f"{keyword} cannot match on a {type(value).__name__}; give a string or number."
        )
    return _check_string(text, attr)


# Identifier encoding without pydicom (Query._encode_text): ASCII values of text VRs
# are written as given, padded to even length (UI with NUL, the others with a space).
_TEXT_VRS = frozenset(
    {"AE", "AS", "CS", "DA", "DT", "LO", "LT", "PN", "SH", "ST", "TM", "UC", "UI", "UR", "UT"}
)
_EMPTY_ONLY_VRS = frozenset({"DS", "IS"})  # numbers as text: pydicom formats a value
_LONG_TEXT_VRS = frozenset({"UC", "UR", "UT"})  # 32-bit length in explicit VR
_IMPLICIT_ELEMENT = struct.Struct("<HHL")
_EXPLICIT_SHORT = struct.Struct("<HH2sH")
_EXPLICIT_LONG = struct.Struct("<HH2sHL")


# --- whole queries ----------------------------------------------------------------------


@dataclass
class Query:
    """A validated C-FIND request: level, model, and keys in DICOM string form.

    ``keys`` holds every requested attribute in column order; matching values are
    non-empty strings, return keys are ``""``.
    """

    level: str
    model: str
    keys: dict[str, str] = field(default_factory=dict)

    @property
    def columns(self) -> list[str]:
        """The frame columns this query returns, in order."""
        return list(self.keys)

    @property
    def matching(self) -> dict[str, str]:
        """The keys that narrow the match (non-empty values)."""
        return {k: v for k, v in self.keys.items() if v}

    def with_keys(self, **values: str) -> Query:
        """A copy with some keys set (used to add parent UIDs when drilling down)."""
        keys = dict(self.keys)
        keys.update(values)
        return Query(self.level, self.model, keys)

    @property
    def is_worklist(self) -> bool:
        """True for a Modality Worklist query (see :func:`build_worklist_query`)."""
        return self.level == WORKLIST

    @property
    def what(self) -> str:
        """The request as messages name it: ``"STUDY-level C-FIND"``, ``"worklist C-FIND"``."""
        return "worklist C-FIND" if self.is_worklist else f"{self.level}-level C-FIND"

    def builder(self) -> frames.FrameBuilder:
        """An empty :class:`~pacsframe.frames.FrameBuilder` for this query's answers.

        A worklist answer becomes one row per Scheduled Procedure Step item.
        """
        flatten = SPS_SEQUENCE_TAG if self.is_worklist else None
        return frames.FrameBuilder(self.columns, flatten=flatten)

    def keys_required(self) -> tuple[str, ...]:
        """The upper-level unique keys this query must carry (see :func:`required_keys`)."""
        if self.is_worklist:
            return ()
        return required_keys(self.level, self.model)

    def check_required(self) -> None:
        """Raise unless every upper-level unique key is present as a single value."""
        for key in self.keys_required():
            value = self.keys.get(key, "")
            if not value:
                raise QueryError(_missing_key_message(self.level, self.model, key))
            if "\\" in value or "*" in value or "?" in value:
                raise QueryError(
                    f"{key} must be a single value at the {self.level} level (it is the "
                    f"unique key of a level above); got {value!r}. Drill down from a frame "
                    "instead: one query per parent is sent for you."
                )

    def dataset(self) -> Dataset:
        """The identifier to send."""
        ds = Dataset()
        if any(not v.isascii() for v in self.keys.values()):
            ds.SpecificCharacterSet = "ISO_IR 192"
        item = ds
        if self.is_worklist:
            # PS3.4 K.6.1.2.1: no QueryRetrieveLevel; the step's keys go into the
            # single item of the Scheduled Procedure Step Sequence (sequence matching).
            item = Dataset()
            ds.ScheduledProcedureStepSequence = [item]
        else:
            ds.QueryRetrieveLevel = self.level
        for keyword, text in self.keys.items():
            attr = frames.attribute(keyword)
            target = item if self.is_worklist and keyword in SPS_KEYS else ds
            value: Any
            if attr.vr in frames.BINARY_INT_VRS:
                value = [_whole(v) for v in text.split("\\")] if text else None
            elif attr.vr in frames.BINARY_FLOAT_VRS:
                value = [float(v) for v in text.split("\\")] if text else None
            else:
                value = text
            if isinstance(value, list) and len(value) == 1:
                value = value[0]
            # Range and wildcard strings are not valid element values to pydicom's
            # validator, so this element skips validation (a per-element setting, never
            # the global one).
            target.add(DataElement(attr.tag, attr.vr, value, validation_mode=config.IGNORE))
        return ds

    def encode(self, implicit_vr: bool) -> bytes:
        """The identifier as sent: :meth:`dataset` in little endian, implicit or explicit VR.

        Raises
        ------
        QueryError
            A value cannot be encoded (nothing is sent).

        Examples
        --------
        >>> Query("PATIENT", "patient", {"PatientID": "12"}).encode(implicit_vr=True).hex()
        '080052000800000050415449454e542010002000020000003132'
        """
        fast = self._encode_text(implicit_vr)
        if fast is not None:
            return fast
        fp = DicomBytesIO()
        fp.is_implicit_VR = implicit_vr
        fp.is_little_endian = True
        try:
            write_dataset(fp, self.dataset())
        except Exception as exc:  # pydicom raises many kinds for a value it cannot write
            raise QueryError(
                f"the query could not be encoded for the peer ({type(exc).__name__}: {exc}); "
                "check the keys' values."
            ) from None
        return fp.getvalue()

    def _encode_text(self, implicit_vr: bool) -> bytes | None:
        """:meth:`encode` with ``struct`` for the common query, or None for pydicom's way.

        The common query (every drill-down) is ASCII text in text VRs; it encodes
        to the bytes pydicom writes (tests/test_fuzz.py checks), about ten times
        faster. Anything else (a number in a binary or DS/IS VR, non-ASCII text, a
        value too long for its length field, a worklist query's sequence) is left
        to pydicom.
        """
        if self.is_worklist:
            return None
        elements = {0x00080052: ("CS", self.level)}
        for keyword, text in self.keys.items():
            attr = frames.attribute(keyword)
            vr = attr.vr
            if not (vr in _TEXT_VRS or (not text and vr in _EMPTY_ONLY_VRS)):
                return None
            if not text.isascii():
                return None
            elements[attr.tag] = (vr, text)
        parts = []
        for tag in sorted(elements):
            vr, text = elements[tag]
            value = text.encode("ascii")
            if len(value) % 2:
                value += b"\0" if vr == "UI" else b" "
            if implicit_vr:
                parts.append(_IMPLICIT_ELEMENT.pack(tag >> 16, tag & 0xFFFF, len(value)))
            elif vr in _LONG_TEXT_VRS:
                parts.append(
                    _EXPLICIT_LONG.pack(tag >> 16, tag & 0xFFFF, vr.encode(), 0, len(value))
                )
            elif len(value) > 0xFFFF:
                return None
            else:
                parts.append(
                    _EXPLICIT_SHORT.pack(tag >> 16, tag & 0xFFFF, vr.encode(), len(value))
                )
            parts.append(value)
        return b"".join(parts)

    def to_json(self) -> dict[str, Any]:
        """JSON-safe description, for ``DataFrame.attrs``."""
        return {"level": self.level, "model": self.model, "keys": self.matching}


def _whole(text: str) -> int:
    # Exact for the canonical integers _check_string makes, even beyond 2**53.
    return int(text) if text.lstrip("+-").isdigit() else int(float(text))


def _missing_key_message(level: str, model: str, key: str) -> str:
    finder = {"STUDY": "find_studies", "SERIES": "find_series", "IMAGE": "find_instances"}
    parent = {
        "PatientID": "patients",
        "StudyInstanceUID": "studies",
        "SeriesInstanceUID": "series",
    }[key]
    root = "patient-root" if model == "patient" else "study-root"
    return (
        f"a {root} {level}-level query needs {key}; pass {key}=..., or drill down from a "
        f"frame of {parent}, e.g. pacs.{finder.get(level, 'find')}({parent}_frame)."
    )


def build_query(
    level: str,
    model: str = "study",
    keys: Mapping[str, Any] | None = None,
    return_keys: Sequence[str] | None = None,
    *,
    defaults: bool = True,
) -> Query:
    """Validate user keys and build a :class:`Query` (nothing is sent).

    Column order: upper-level unique keys, the level's defaults, ``return_keys``,
    then any other matching keys, each once.

    Examples
    --------
    >>> q = build_query("study", keys={"patient_id": "123", "StudyDate": ("2026-03-01", None)})
    >>> q.matching
    {'PatientID': '123', 'StudyDate': '20260301-'}
    """
    level = normalize_level(level)
    model = normalize_model(model)
    required = required_keys(level, model)
    encoded = _encode_keys(keys)
    extra = _return_keywords(return_keys)
    order = [*required, *(DEFAULT_KEYS[level] if defaults else ()), UNIQUE_KEY[level], *extra]
    return Query(level, model, _ordered(order, encoded))


def _encode_keys(keys: Mapping[str, Any] | None) -> dict[str, str]:
    """The user's keys by DICOM keyword, values in DICOM string form (validated)."""
    encoded: dict[str, str] = {}
    for name, value in (keys or {}).items():
        keyword = frames.normalize_keyword(name)
        if keyword in ("QueryRetrieveLevel", "SpecificCharacterSet"):
            raise QueryError(
                f"{keyword} is set by pacsframe; choose the level with the find_* method "
                "or level=..., and leave the character set to pacsframe."
            )
        if keyword in encoded:
            raise QueryError(f"{keyword} was given twice (as {name!r}); give it once.")
        encoded[keyword] = encode_value(keyword, value)
    return encoded


def _return_keywords(return_keys: Sequence[str] | str | None) -> list[str]:
    """``return_keys`` as DICOM keywords (validated)."""
    if isinstance(return_keys, str):
        return_keys = [return_keys]
    if return_keys is not None and not isinstance(return_keys, Iterable):
        raise QueryError(
            f"return_keys takes a list of keywords, e.g. ['BodyPartExamined'], not "
            f"{type(return_keys).__name__}."
        )
    extra = [frames.normalize_keyword(k) for k in (return_keys or ())]
    for keyword in extra:
        frames.attribute(keyword)
    return extra


def _ordered(order: Sequence[str], encoded: Mapping[str, str]) -> dict[str, str]:
    """Each keyword of ``order`` then of ``encoded`` once, with its value (``""``: return key)."""
    columns: dict[str, str] = {}
    for keyword in [*order, *encoded]:
        if keyword not in columns:
            columns[keyword] = encoded.get(keyword, "")
    return columns


def build_worklist_query(
    keys: Mapping[str, Any] | None = None, return_keys: Sequence[str] | None = None
) -> Query:
    """Validate user keys and build a Modality Worklist :class:`Query` (nothing is sent).

    Keys take the value forms of :func:`encode_value`. The keys of :data:`SPS_KEYS`
    go into the Scheduled Procedure Step Sequence item when the identifier is
    built, the others stay top level. Columns: :data:`DEFAULT_KEYS` ``["WORKLIST"]``,
    then ``return_keys``, then any other matching keys.

    Examples
    --------
    >>> q = build_worklist_query({"modality": "CT", "ScheduledProcedureStepStartDate":
    ...                           ("2026-03-02", "2026-03-03")})
    >>> q.matching
    {'ScheduledProcedureStepStartDate': '20260302-20260303', 'Modality': 'CT'}
    >>> q.dataset().ScheduledProcedureStepSequence[0].Modality
    'CT'
    """
    encoded = _encode_keys(keys)
    return Query(
        WORKLIST,
        "worklist",
        _ordered([*DEFAULT_KEYS[WORKLIST], *_return_keywords(return_keys)], encoded),
    )
