"""VR -> dtype conversion, identifiers <-> DataFrames, and level inference.

This is the one place where DICOM values become pandas values and back. It reads
pydicom's data dictionary for keywords, VRs and VMs, but never pydicom's value
conversion: identifiers arrive as raw bytes, are decoded with the identifier's
character set, collected per column as strings, and converted a column at a time
(vectorised), so a 100,000-row answer costs no pydicom element per cell.

The dtype of a column follows its VR (see ``DTYPES``); an attribute whose
dictionary VM is not ``"1"`` becomes a column of lists.

DICOM JSON (PS3.18 F.2, what QIDO-RS answers) takes the same road: each attribute
becomes the raw element its DICOM encoding would give (:func:`json_element`) and
goes through the same per-column conversion (:meth:`FrameBuilder.add_json`,
:func:`from_dicom_json`), so both protocols give equal frames for equal data.
AT values become ``"GGGGEEEE"`` strings, as DICOM JSON writes them, and values of
OB, OW and the other binary VRs stay ``bytes`` (over DICOM JSON: ``InlineBinary``
decoded; a ``BulkDataURI`` kept as its URI string).
"""

from __future__ import annotations

import base64
import binascii
import codecs
import contextlib
import datetime as _dt
import difflib
import functools
import json
import math
import re
import struct
import warnings
from collections.abc import Callable, Container, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
from pydicom import datadict
from pydicom.charset import convert_encodings, decode_bytes
from pydicom.dataelem import DataElement, RawDataElement
from pydicom.dataset import Dataset
from pydicom.tag import BaseTag
from pydicom.valuerep import EXPLICIT_VR_LENGTH_32, VR

from .errors import PacsFrameError, QueryError

__all__ = [
    "DTYPES",
    "Attribute",
    "FrameBuilder",
    "MalformedValueWarning",
    "attribute",
    "dicom_strings",
    "empty_frame",
    "from_dicom_json",
    "infer_level",
    "is_missing",
    "is_uid",
    "normalize_keyword",
    "scan_elements",
    "scan_items",
    "to_dicom",
    "to_series",
]

DATE_VRS = frozenset({"DA"})
TIME_VRS = frozenset({"TM"})
DATETIME_VRS = frozenset({"DT"})
INT_STRING_VRS = frozenset({"IS"})
FLOAT_STRING_VRS = frozenset({"DS"})
BINARY_INT_VRS = {"SS": "h", "US": "H", "SL": "l", "UL": "L", "SV": "q", "UV": "Q"}
BINARY_FLOAT_VRS = {"FL": "f", "FD": "d"}
INT_VRS = INT_STRING_VRS | frozenset(BINARY_INT_VRS)
FLOAT_VRS = FLOAT_STRING_VRS | frozenset(BINARY_FLOAT_VRS)
STRING_VRS = frozenset({"PN", "UI", "CS", "SH", "LO", "ST", "LT", "UT", "AE", "AS", "UC", "UR"})
# Text VRs whose bytes follow the Specific Character Set; the rest are ASCII.
CHARSET_VRS = frozenset({"PN", "SH", "LO", "ST", "LT", "UT", "UC"})
# Leading spaces are significant only in these (PS3.5 6.2).
KEEP_LEADING_SPACE_VRS = frozenset({"ST", "LT", "UT"})
#: Binary VRs whose value stays the bytes as sent (a ``bytes`` cell in an object column).
BYTES_VRS = frozenset({"OB", "OD", "OF", "OL", "OV", "OW", "UN"})

#: The pandas dtype of a single value of each VR family.
DTYPES: dict[str, str] = {
    **dict.fromkeys(DATE_VRS | DATETIME_VRS, "datetime64[ns]"),
    **dict.fromkeys(TIME_VRS, "timedelta64[ns]"),
    **dict.fromkeys(INT_VRS, "Int64"),
    **dict.fromkeys(FLOAT_VRS, "Float64"),
    **dict.fromkeys(STRING_VRS, "string"),
}


def _value_vr(wire_vr: Any, attr: Attribute) -> str:
    """The VR that reads a value: the one on the wire, else the dictionary's.

    UN, SQ and a binary VR (OB, OW...) on the wire say nothing about how to read the
    bytes of an attribute the dictionary gives another VR: they are read by that one.
    """
    if (
        not wire_vr
        or wire_vr in ("UN", "SQ")
        or (wire_vr in BYTES_VRS and attr.vr not in BYTES_VRS)
    ):
        return attr.vr
    return wire_vr


UID_COLUMNS = ("SOPInstanceUID", "SeriesInstanceUID", "StudyInstanceUID", "PatientID")
_LEVEL_OF_COLUMN = dict(zip(UID_COLUMNS, ("IMAGE", "SERIES", "STUDY", "PATIENT"), strict=True))


class MalformedValueWarning(UserWarning):
    """A value from a peer could not be read as its VR and became empty."""


@dataclass(frozen=True)
class Attribute:
    """A DICOM attribute as pacsframe sees it: keyword, tag, VR and VM."""

    keyword: str
    tag: int
    vr: str
    vm: str

    @property
    def multivalued(self) -> bool:
        """True when the dictionary allows more than one value (a list column)."""
        return self.vm != "1"

    @property
    def dtype(self) -> str:
        """The pandas dtype of the column (``object`` for list columns)."""
        return "object" if self.multivalued else DTYPES.get(self.vr, "object")


@functools.cache
def _lowered_keywords() -> dict[str, str]:
    # Folding case and underscores lets snake_case spellings map to keywords.
    return {kw.lower(): kw for kw in datadict.keyword_dict if kw}


def normalize_keyword(name: str) -> str:
    """Return the DICOM keyword for ``name``, accepting snake_case spellings.

    Raises
    ------
    QueryError
        When ``name`` is not a DICOM keyword, with the closest keywords suggested.

    Examples
    --------
    >>> normalize_keyword("patient_id")
    'PatientID'
    >>> normalize_keyword("StudyDate")
    'StudyDate'
    """
    if not isinstance(name, str) or not name:
        raise QueryError(f"{name!r} is not a DICOM keyword; use a keyword such as 'PatientID'.")
    if name in datadict.keyword_dict:
        return name
    folded = name.replace("_", "").replace("-", "").lower()
    found = _lowered_keywords().get(folded)
    if found:
        return found
    close = difflib.get_close_matches(folded, _lowered_keywords(), n=3, cutoff=0.75)
    hint = (
        "did you mean " + " or ".join(repr(_lowered_keywords()[c]) for c in close) + "?"
        if close
        else "check the spelling against the DICOM data dictionary (PS3.6)."
    )
    raise QueryError(f"{name!r} is not a DICOM keyword; {hint}")


@functools.cache
def attribute(name: str) -> Attribute:
    """Look up an attribute by keyword (or snake_case spelling).

    Examples
    --------
    >>> attribute("StudyDate").vr
    'DA'
    >>> attribute("modalities_in_study").multivalued
    True
    """
    keyword = normalize_keyword(name)
    tag = datadict.tag_for_keyword(keyword)
    vr = datadict.dictionary_VR(tag)
    # Ambiguous VRs ("US or SS") are read as the first; identifiers rarely use them.
    vr = vr.split(" or ")[0]
    if vr == "SQ":
        raise QueryError(
            f"{keyword} is a sequence (SQ); pacsframe queries and frames hold flat "
            "attributes only: ask for the attributes inside it instead."
        )
    return Attribute(keyword, tag, vr, datadict.dictionary_VM(tag))


#: The UI grammar (PS3.5 9.1) without the length limit, as a regular expression.
UID_PATTERN = r"(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*"
_UID_RE = re.compile(UID_PATTERN)


def is_uid(text: str) -> bool:
    """True when ``text`` follows the UI grammar (PS3.5 9.1), so it is safe as a path part.

    Examples
    --------
    >>> is_uid("1.2.840.10008.1.1"), is_uid("1.02.3"), is_uid("../../x")
    (True, False, False)
    """
    return isinstance(text, str) and len(text) <= 64 and _UID_RE.fullmatch(text) is not None


# --- bytes -> strings -----------------------------------------------------------------


def _decode_raw(elem: Any, vr: str, encodings: list[str] | None) -> Any:
    """Turn one element of an identifier into a DICOM string (or number, for binary VRs)."""
    value = elem.value
    if isinstance(value, Exception):
        raise value  # a DICOM JSON value that has no DICOM form (see json_element)
    if value is None or value == b"" or value == "":
        return None
    if isinstance(value, bytes):
        if vr in BINARY_INT_VRS or vr in BINARY_FLOAT_VRS:
            code = BINARY_INT_VRS.get(vr) or BINARY_FLOAT_VRS[vr]
            endian = "<" if getattr(elem, "is_little_endian", True) else ">"
            # Standard sizes ("<L" is 4 bytes; a bare "L" is the platform's 8).
            size = struct.calcsize(endian + code)
            count, extra = divmod(len(value), size)
            if extra:
                raise ValueError(f"{len(value)} bytes are not a whole number of {vr} values")
            numbers = struct.unpack(f"{endian}{count}{code}", value)
            return list(numbers) if count != 1 else numbers[0]
        if vr == "AT":
            # Tags as DICOM JSON writes them: "GGGGEEEE", upper-case hex.
            endian = "<" if getattr(elem, "is_little_endian", True) else ">"
            count, extra = divmod(len(value), 4)
            if extra:
                raise ValueError(f"{len(value)} bytes are not a whole number of AT values")
            pairs = struct.unpack(f"{endian}{2 * count}H", value)
            tags = [f"{g:04X}{e:04X}" for g, e in zip(pairs[::2], pairs[1::2], strict=True)]
            return tags if count != 1 else tags[0]
        if vr in BYTES_VRS:
            return value
        codec = "ascii"
        if vr in CHARSET_VRS and encodings:
            if b"\x1b" not in value:
                # decode_bytes reads all of it with the first encoding then, too.
                codec = encodings[0]
            else:
                delims = {0x5E, 0x3D} if vr == "PN" else {0x0D, 0x0A, 0x09, 0x0C}
                codec = ""
                with warnings.catch_warnings(record=True) as caught:
                    # pydicom warns (per row) and puts U+FFFD for what it cannot
                    # decode: reported like the other undecodable text below.
                    warnings.simplefilter("always")
                    text = decode_bytes(value, encodings, delims | {0x5C})
                if caught:
                    lossy = _Lossy(f"not valid in its character sets ({', '.join(encodings)})")
                    lossy.value = _trim(text, vr)
                    raise lossy
        if codec:
            try:
                text = value.decode(codec)
            except UnicodeDecodeError as exc:
                if codec != "ascii":
                    why = f"is not valid in its character set ({codec})"
                elif vr in CHARSET_VRS:
                    why = "is not ASCII and no known SpecificCharacterSet says how to read it"
                else:
                    why = f"is not ASCII, which {vr} values must be"
                lossy = _Lossy(f"byte 0x{value[exc.start]:02X} at position {exc.start} {why}")
                lossy.value = _trim(value.decode(codec, errors="replace"), vr)
                raise lossy from None
    elif isinstance(value, (list, tuple)) or type(value).__name__ == "MultiValue":
        return [str(v) if not isinstance(v, (int, float)) else v for v in value]
    elif isinstance(value, (int, float)):
        return value
    else:
        text = str(value)
    return _trim(text, vr)


def _trim(text: str, vr: str) -> str | None:
    text = text.rstrip(" \x00")
    if vr not in KEEP_LEADING_SPACE_VRS:
        text = text.lstrip(" ")
    return text or None


class _Lossy(ValueError):
    """Text with bytes its character set cannot decode; ``value`` has U+FFFD for them."""

    value: str | None = None


def _encodings_of(ds: Dataset) -> list[str] | None:
    return _charset_encodings(ds.get_item(0x00080005))


def _charset_encodings(elem: Any) -> list[str] | None:
    """The Python codecs of a SpecificCharacterSet element (None when absent or empty)."""
    if elem is None or not elem.value:
        return None
    raw = elem.value
    if isinstance(raw, bytes):
        terms = [t.strip() for t in raw.decode("ascii", errors="replace").split("\\")]
    elif isinstance(raw, str):
        terms = [raw.strip()]
    else:
        terms = [str(t).strip() for t in raw]
    if terms and not terms[0]:
        # An empty first value means the default repertoire, with extensions after it.
        terms[0] = "ISO_IR 6"
    return _cached_encodings(tuple(terms))


@functools.cache
def _cached_encodings(terms: tuple[str, ...]) -> list[str]:
    try:
        with warnings.catch_warnings(record=True) as caught:
            # Once per distinct value, not a pydicom warning per row.
            warnings.simplefilter("always")
            encodings = convert_encodings(list(terms))
    except (ValueError, LookupError, TypeError):
        # A term Python cannot even look up (e.g. with a NUL in it): as an unknown one.
        return []
    if any("Unknown encoding" in str(w.message) for w in caught):
        # pydicom would read the text as Latin-1 without a word; as no encoding at
        # all, non-ASCII text is decoded with U+FFFD and reported instead.
        return []
    return encodings


def _decode_all(
    ds: Dataset | Mapping[int, RawDataElement], attributes: Sequence[Attribute]
) -> tuple[list[Any], list[tuple[str, Exception]]]:
    """Decode each attribute of ``ds``; values that fail become None and are reported.

    ``ds`` may also be what :func:`scan_elements` returns, read as the ``Dataset``
    made of those elements would be (its ``get_item`` returns them as they are).
    """
    get = ds.get_item if isinstance(ds, Dataset) else ds.get
    encodings = _charset_encodings(get(0x00080005))
    values: list[Any] = []
    failures: list[tuple[str, Exception]] = []
    for attr in attributes:
        elem = get(attr.tag)
        values.append(None if elem is None else _decode_one(elem, attr, encodings, failures))
    return values, failures


def _decode_one(
    elem: Any, attr: Attribute, encodings: list[str] | None, failures: list[tuple[str, Exception]]
) -> Any:
    """:func:`_decode_raw` of one present element; a failure is noted in ``failures``."""
    try:
        return _decode_raw(elem, _value_vr(elem.VR, attr), encodings)
    except _Lossy as exc:
        failures.append((attr.keyword, exc))
        return exc.value
    except (PacsFrameError, ValueError, struct.error, LookupError) as exc:
        failures.append((attr.keyword, exc))
        return None


def _warn_undecodable(keyword: str, exc: Exception, stacklevel: int) -> None:
    what = (
        "those bytes are U+FFFD in that row"
        if isinstance(exc, _Lossy)
        else "it is empty in that row"
    )
    warnings.warn(
        f"{keyword} could not be decoded ({exc}); {what} and the rest of the frame is kept.",
        MalformedValueWarning,
        stacklevel=stacklevel + 1,
    )


def _as_text(value: Any) -> str | None:
    if value is None:
        return None
    if isinstance(value, list):
        return "\\".join(t for t in (_as_text(v) for v in value) if t is not None) or None
    if type(value) is float:
        # repr round-trips every binary float exactly; to_series reads it back.
        return repr(value)
    # pydicom's DSfloat and IS (from a dataset built in memory) quote themselves in
    # repr; their str is the DICOM string.
    return str(value)


def dicom_strings(ds: Dataset, keywords: Sequence[str]) -> dict[str, str | None]:
    """The DICOM string form of each keyword in ``ds`` (None when absent or empty).

    Text is decoded with the dataset's Specific Character Set, multiple values are
    joined with backslashes and binary numbers are written out, so the strings
    become typed columns again with :func:`to_series`. The dataset's values are
    read raw, without pydicom's value conversion.

    Examples
    --------
    >>> from pydicom import Dataset
    >>> ds = Dataset()
    >>> ds.PatientName, ds.Rows, ds.ImageType = "Doe^Jane", 512, ["ORIGINAL", "PRIMARY"]
    >>> dicom_strings(ds, ["PatientName", "Rows", "ImageType", "StudyDate"])
    {'PatientName': 'Doe^Jane', 'Rows': '512', 'ImageType': 'ORIGINAL\\\\PRIMARY', \
'StudyDate': None}
    >>> ds.PixelSpacing = [0.5, "0.75"]
    >>> dicom_strings(ds, ["PixelSpacing"])
    {'PixelSpacing': '0.5\\\\0.75'}
    """
    attributes = _attributes(tuple(keywords))
    values, failures = _decode_all(ds, attributes)
    for keyword, exc in failures:
        _warn_undecodable(keyword, exc, stacklevel=2)
    return {a.keyword: _as_text(v) for a, v in zip(attributes, values, strict=True)}


def raw_strings(
    elements: Mapping[int, RawDataElement], keywords: Sequence[str]
) -> dict[str, str | None]:
    """:func:`dicom_strings` of the elements :func:`scan_elements` found, by tag.

    The same strings and warnings as ``dicom_strings(Dataset(elements), keywords)``,
    without building the ``Dataset`` (a received object's header, once per object).
    """
    # The common elements (text a single codec reads, one binary integer) take a
    # short road here; every other one, and any that fails on it, takes the generic
    # _decode_raw, so strings and warnings are those of dicom_strings.
    get = elements.get
    encodings = _charset_encodings(get(0x00080005))
    codec = encodings[0] if encodings else "ascii"
    strings: dict[str, str | None] = {}
    failures: list[tuple[str, Exception]] = []
    for attr, kind, unpack in _string_plan(tuple(keywords)):
        elem = get(attr.tag)
        if elem is None:
            strings[attr.keyword] = None
            continue
        value, wire = elem.value, elem.VR
        if (
            kind
            and type(value) is bytes
            and (not wire or wire == attr.vr)
            and (kind is not _INTEGER or elem.is_little_endian)
        ):
            text = _short_text(value, kind, unpack, encodings, codec)
            if text is not _GENERIC:
                strings[attr.keyword] = text
                continue
        strings[attr.keyword] = _as_text(_decode_one(elem, attr, encodings, failures))
    for keyword, exc in failures:
        _warn_undecodable(keyword, exc, stacklevel=2)
    return strings


@functools.lru_cache(maxsize=64)
def _attributes(keywords: tuple[str, ...]) -> tuple[Attribute, ...]:
    return tuple(attribute(k) for k in keywords)


# How raw_strings reads a VR on its short road: ASCII text, text in the character
# set (leading spaces dropped or kept), or one little-endian binary integer; any other
# VR (0) takes _decode_raw.
_ASCII, _CHARSET, _CHARSET_KEEP, _INTEGER = "ascii", "charset", "charset-keep", "integer"
# The VRs _decode_raw reads as ASCII text: every VR but the binary ones, AT and those
# of the character set.
_ASCII_VRS = frozenset({"AE", "AS", "CS", "DA", "DS", "DT", "IS", "TM", "UI", "UR"})


_GENERIC: Any = object()  # what _short_text gives for bytes it leaves to _decode_raw


def _short_text(
    value: bytes, kind: str, unpack: Any, encodings: list[str] | None, codec: str
) -> Any:
    """The string of one element's bytes on the short road (``kind``), or ``_GENERIC``.

    What ``_as_text(_decode_raw(...))`` gives for them when it does not fail: text
    decoded and trimmed, one little-endian integer written out (the caller checks the
    element's wire VR, and its byte order for an integer).
    """
    if not value:
        return None
    try:  # (a try costs less than contextlib.suppress, once per element)
        if kind is _ASCII:
            text = value.decode("ascii").rstrip(" \x00").lstrip(" ")
        elif kind is _INTEGER:
            if len(value) != unpack.size:
                return _GENERIC
            text = str(unpack.unpack(value)[0])
        else:
            if encodings and b"\x1b" in value:
                return _GENERIC  # code extensions: decode_bytes reads them
            text = value.decode(codec).rstrip(" \x00")
            if kind is _CHARSET:
                text = text.lstrip(" ")
    except ValueError:  # UnicodeDecodeError too: the generic road tells why
        return _GENERIC
    return text or None


@functools.lru_cache(maxsize=64)
def _string_plan(
    keywords: tuple[str, ...],
) -> tuple[tuple[Attribute, str | int, struct.Struct | None], ...]:
    plan: list[tuple[Attribute, str | int, struct.Struct | None]] = []
    for attr in _attributes(keywords):
        vr = attr.vr
        if vr in _ASCII_VRS:
            plan.append((attr, _ASCII, None))
        elif vr in CHARSET_VRS:
            plan.append((attr, _CHARSET_KEEP if vr in KEEP_LEADING_SPACE_VRS else _CHARSET, None))
        elif vr in BINARY_INT_VRS:
            plan.append((attr, _INTEGER, struct.Struct("<" + BINARY_INT_VRS[vr])))
        else:
            plan.append((attr, 0, None))
    return tuple(plan)


# --- strings -> typed columns -----------------------------------------------------------

_TM_RE = r"^(\d{2})(\d{2})?(\d{2})?(?:\.(\d{1,6}))?$"
_DT_RE = r"^(\d{4})(\d{2})?(\d{2})?(\d{2})?(\d{2})?(\d{2})?(?:\.(\d{1,6}))?(?:[+-]\d{4})?$"


def _warn_malformed(keyword: str, bad: pd.Series) -> None:
    if bad.any():
        examples = ", ".join(repr(v) for v in bad[bad].index.unique()[:3])
        warnings.warn(
            f"{int(bad.sum())} value(s) of {keyword} could not be read as its VR and are "
            f"empty in the frame (e.g. {examples}); the peer sent malformed data.",
            MalformedValueWarning,
            stacklevel=4,
        )


def _without_surrogates(value: Any) -> Any:
    """``value`` with each lone surrogate replaced by ``?`` (other values as they are)."""
    if isinstance(value, str):
        return value.encode("utf-8", "replace").decode("utf-8")
    return value


def _scalar_column(values: Sequence[Any], vr: str, keyword: str) -> pd.Series:
    """Convert DICOM strings (or numbers) of one VR to a typed Series."""
    if vr in STRING_VRS or vr not in DTYPES:
        try:
            return pd.Series(values, dtype="string" if vr in STRING_VRS else "object")
        except UnicodeError:
            # bytes that are not UTF-8 (e.g. a list of raw UIDs from a caller), or a
            # lone surrogate from DICOM JSON (no UTF-8 form): each becomes U+FFFD or "?"
            values = [
                v.decode("utf-8", "replace") if isinstance(v, bytes) else _without_surrogates(v)
                for v in values
            ]
            return pd.Series(values, dtype="string")
    if vr in BINARY_INT_VRS or vr in BINARY_FLOAT_VRS:
        cells = [None if v is None or isinstance(v, list) else v for v in values]
        if vr in BINARY_INT_VRS:
            fits = all(v is None or (type(v) is int and -(2**63) <= v < 2**63) for v in cells)
        else:
            fits = all(v is None or type(v) in (int, float) for v in cells)
        if fits:
            with contextlib.suppress(TypeError, ValueError, OverflowError):
                return pd.Series(pd.array(cells, dtype=DTYPES[vr]))
        # Text or a fraction (a wrong VR on the wire) or a number beyond Int64: read
        # each as an IS or DS string, so that what cannot be typed becomes empty.
        text = [None if v is None else str(v) for v in cells]
        return _scalar_column(text, "IS" if vr in BINARY_INT_VRS else "DS", keyword)
    raw = pd.Series(values, dtype="object")
    present = raw.notna()
    try:
        text = raw.where(present, "").astype(str).str.strip()
    except UnicodeEncodeError:
        # A lone surrogate (DICOM JSON can escape one, "\ud800") has no UTF-8 form,
        # which pandas' string dtype needs. It is no number, date or time either:
        # replaced, the value is reported as malformed and left empty like any other.
        raw = raw.map(_without_surrogates)
        text = raw.where(present, "").astype(str).str.strip()
    if vr in INT_STRING_VRS or vr in FLOAT_STRING_VRS:
        numbers = pd.to_numeric(text.where(present, None), errors="coerce")
        bad = present & numbers.isna()
        if vr in INT_STRING_VRS:
            # A fraction, or a number Int64 cannot hold (IS is at most 12 characters).
            fractional = numbers.notna() & (numbers != np.floor(numbers.fillna(0)))
            fractional |= numbers.notna() & ~(numbers.abs() < 2.0**63)
            bad |= fractional
            numbers = numbers.where(~fractional)
        _warn_malformed(keyword, pd.Series(bad.to_numpy(), index=raw.astype(str)))
        return pd.Series(pd.array(numbers.to_numpy(dtype=float, na_value=np.nan), DTYPES[vr]))
    if vr in DATE_VRS:
        # ACR-NEMA wrote dates as YYYY.MM.DD; peers still send them.
        cleaned = text.str.replace(".", "", regex=False)
        out = pd.to_datetime(cleaned.where(present), format="%Y%m%d", errors="coerce")
    elif vr in TIME_VRS:
        parts = text.str.replace(":", "", regex=False).str.extract(_TM_RE)
        hours, minutes, seconds = (pd.to_numeric(parts[i]).fillna(0) for i in range(3))
        micros = pd.to_numeric(parts[3].str.ljust(6, "0")).fillna(0)
        total = ((hours * 60 + minutes) * 60 + seconds) * 1_000_000 + micros
        total = total.where(parts[0].notna() & (hours < 24) & (minutes < 60) & (seconds < 61))
        out = pd.to_timedelta(total, unit="us")
    else:
        parts = text.str.extract(_DT_RE)
        # Missing trailing components default to the start of the period (PS3.5 6.2).
        defaults = ("01", "01", "00", "00", "00")
        stamp = parts[0]
        for i, default in enumerate(defaults, start=1):
            stamp = stamp + parts[i].fillna(default)
        fraction = parts[6].fillna("0").str.ljust(6, "0")
        out = pd.to_datetime(stamp + "." + fraction, format="%Y%m%d%H%M%S.%f", errors="coerce")
    if vr not in TIME_VRS:
        # pandas 3 parses at microsecond resolution: a date datetime64[ns] cannot hold
        # (after 2262-04-11, before 1677-09-21) is malformed here, not an error.
        out = out.where((out >= pd.Timestamp.min) & (out <= pd.Timestamp.max))
    out = pd.Series(out.to_numpy(), dtype=DTYPES[vr])
    bad = present.to_numpy() & out.isna().to_numpy()
    _warn_malformed(keyword, pd.Series(bad, index=raw.astype(str)))
    return out


def to_series(values: Sequence[Any], keyword: str) -> pd.Series:
    """Convert DICOM string forms of one attribute into a Series typed by its VR.

    ``values`` holds one item per row: a DICOM string (``"20260301"``,
    ``"CT\\\\MR"``), a number for binary VRs, a list for multi-valued attributes,
    or ``None`` for an empty value.

    Examples
    --------
    >>> to_series(["20260301", None], "StudyDate").tolist()
    [Timestamp('2026-03-01 00:00:00'), NaT]
    >>> to_series(["CT\\\\MR", None], "ModalitiesInStudy").tolist()
    [['CT', 'MR'], []]
    """
    attr = attribute(keyword)
    if not attr.multivalued:
        return _scalar_column(
            [v[0] if isinstance(v, list) and v else (None if v == [] else v) for v in values],
            attr.vr,
            attr.keyword,
        )
    # Flatten every cell's values, convert them in one vectorised pass, then regroup.
    lengths: list[int] = []
    flat: list[Any] = []
    for v in values:
        if v is None:
            items: list[Any] = []
        elif isinstance(v, str):
            items = [s for s in (p.strip(" \x00") for p in v.split("\\")) if s]
        elif isinstance(v, (list, tuple)):
            items = [s for s in v if s is not None and s != ""]
        else:
            items = [v]
        lengths.append(len(items))
        flat.extend(items)
    converted = _scalar_column(flat, attr.vr, attr.keyword).astype(object)
    converted = converted.where(converted.notna(), None).tolist()
    out: list[list[Any]] = []
    pos = 0
    for n in lengths:
        out.append(converted[pos : pos + n])
        pos += n
    return pd.Series(out, dtype="object")


def empty_frame(columns: Iterable[str]) -> pd.DataFrame:
    """A zero-row frame with the right dtype for each keyword column."""
    return pd.DataFrame({c: to_series([], c) for c in columns})


# --- reading encoded datasets without pydicom's per-element objects ------------------------

_TAG = struct.Struct("<HH").unpack_from
_LENGTH = struct.Struct("<L").unpack_from
_LONG_VRS = frozenset(vr.encode() for vr in EXPLICIT_VR_LENGTH_32)
_SHORT_VRS = frozenset(v.value.encode() for v in VR if len(v.value) == 2) - _LONG_VRS
# One unpack per element header: (group, element, length) implicit; (group, element,
# VR, 16-bit length) explicit, the VR then looked up once for its text and length size.
_IMPLICIT_HEADER = struct.Struct("<HHL").unpack_from
_EXPLICIT_HEADER = struct.Struct("<HH2sH").unpack_from
_EXPLICIT_VRS = {vr: (vr.decode(), vr in _LONG_VRS) for vr in _LONG_VRS | _SHORT_VRS}
_UNDEFINED = 0xFFFFFFFF
_new_tuple = tuple.__new__
_ITEM, _ITEM_END, _SEQUENCE_END = 0xFFFEE000, 0xFFFEE00D, 0xFFFEE0DD
_MAX_DEPTH = 32  # sequences nested deeper than this are left to pydicom


def scan_elements(
    data: bytes | memoryview,
    implicit_vr: bool,
    wanted: Container[int],
    stop: int | None = None,
) -> dict[int, RawDataElement] | None:
    """The top-level elements of a little-endian encoded dataset whose tags are ``wanted``.

    One pass of ``struct.unpack_from`` over the bytes, stopping at the first tag at or
    after ``stop`` (e.g. pixel data) if given: elements not wanted are stepped over,
    sequences of undefined length included, and each wanted one becomes the same
    ``RawDataElement`` pydicom's reader would give (VR None when implicit), without
    a ``Dataset`` or a ``Tag`` per element. A C-FIND identifier or an object's header
    reads several times faster than through ``pydicom.filereader.read_dataset``.

    Returns None for anything pydicom reads its own way (a wanted sequence, a
    delimiter or unknown VR where an element should be, a truncated element, a
    ``UN`` of undefined length), so the caller can fall back to pydicom and keep
    exactly its behaviour.

    Examples
    --------
    >>> data = bytes.fromhex("10001000" "04000000") + b"Doe^"  # implicit VR
    >>> scan_elements(data, True, {0x00100010})[0x00100010].value
    b'Doe^'
    """
    out: dict[int, RawDataElement] = {}
    end = _scan(data, 0, len(data), implicit_vr, wanted, 1 << 32 if stop is None else stop, out, 0)
    return out if end is not None else None


def _scan(
    data: bytes | memoryview,
    pos: int,
    end: int,
    implicit: bool,
    wanted: Container[int],
    stop: int,
    out: dict[int, RawDataElement] | None,
    depth: int,
    spans: dict[int, tuple[int, int]] | None = None,
    take: Callable[[int, str | None, bytes], bool] | None = None,
) -> int | None:
    """Walk one dataset from ``pos``; the position after it, or None to defer to pydicom.

    At depth 0 (``out`` given) the dataset runs to ``end`` or ``stop``; nested (an
    item of undefined length) it runs to its item delimiter. The top-level sequences
    whose tags are keys of ``spans`` get the (start, end) of their items there.
    ``take``: given, each wanted element's (tag, VR, value) goes to it instead of a
    ``RawDataElement`` into ``out``; when it answers False, the walk gives None.
    """
    top = out is not None
    while pos + 8 <= end:
        if implicit:
            group, element, length = _IMPLICIT_HEADER(data, pos)
            vr_bytes = b""
        else:
            group, element, vr_bytes, length = _EXPLICIT_HEADER(data, pos)
        tag = group << 16 | element
        if group == 0xFFFE:
            if not top and tag == _ITEM_END:
                return pos + 8
            return None
        if top and tag >= stop:
            return pos
        if implicit:
            vr = None
            pos += 8
        else:
            known = _EXPLICIT_VRS.get(vr_bytes)
            if known is None:
                return None
            vr, long = known
            if long:
                if pos + 12 > end:
                    return None
                length = _LENGTH(data, pos + 8)[0]
                pos += 12
            else:
                pos += 8
        if length == _UNDEFINED:
            if (top and tag in wanted) or vr == "UN" or depth >= _MAX_DEPTH:
                return None
            start = pos
            pos = _skip_items(data, pos, end, implicit, depth + 1)
            if pos is None:
                return None
            if spans is not None and top and tag in spans:
                spans[tag] = (start, pos - 8)  # before the sequence delimiter
            continue
        if pos + length > end:
            return None
        if spans is not None and top and tag in spans:
            spans[tag] = (pos, pos + length)
            pos += length
            continue
        if out is not None and tag in wanted:
            if vr == "SQ":
                return None
            value = data[pos : pos + length]
            if type(value) is not bytes:
                value = bytes(value)
            if take is None:
                # RawDataElement's own __new__ is a Python function; tuple's makes the same.
                out[tag] = _new_tuple(
                    RawDataElement, (BaseTag(tag), vr, length, value, pos, implicit, True)
                )
            elif not take(tag, vr, value):
                return None
        pos += length
    return pos if top and pos == end else None


def _skip_items(
    data: bytes | memoryview, pos: int, end: int, implicit: bool, depth: int
) -> int | None:
    """Step over the items of an undefined-length value, to after its delimiter."""
    while pos + 8 <= end:
        group, element = _TAG(data, pos)
        tag = group << 16 | element
        length = _LENGTH(data, pos + 4)[0]
        pos += 8
        if tag == _SEQUENCE_END:
            return pos
        if tag != _ITEM:
            return None
        if length == _UNDEFINED:
            pos = _scan(data, pos, end, implicit, (), 0, None, depth)
            if pos is None:
                return None
        elif pos + length > end:
            return None
        else:
            pos += length
    return None


def scan_strings(
    data: bytes, implicit_vr: bool, keywords: Sequence[str], stop: int, complete: bool
) -> dict[str, str | None] | None:
    """:func:`raw_strings` of a header's elements, read in the pass that finds them.

    For a little-endian data set whose wanted elements (``keywords`` and the
    Specific Character Set, read first) are all on :func:`raw_strings`' short road:
    the strings it gives for what :func:`_scan` finds up to ``stop`` (or up to the
    end of ``data`` when ``complete``), without a ``RawDataElement`` per element.
    None for anything else (a value the generic decoder reads, what ``_scan``
    leaves to pydicom, the end of ``data`` reached when not ``complete``...): then
    the caller scans and decodes in two steps, which give the same strings, and
    warnings if any.

    Examples
    --------
    >>> data = bytes.fromhex("10001000" "04000000") + b"Doe^"  # implicit VR
    >>> scan_strings(data, True, ["PatientName", "PatientID"], 0x7FE00008, True)
    {'PatientName': 'Doe^', 'PatientID': None}
    >>> scan_strings(data[:6], True, ["PatientName"], 0x7FE00008, True) is None  # cut short
    True
    """
    plan = _scan_plan(tuple(keywords))
    strings: dict[str, str | None] = dict.fromkeys(keywords)
    encodings: list[str] | None = None
    codec = "ascii"
    seen = False  # a wanted element was read: the character set must come before

    def take(tag: int, vr: str | None, value: bytes) -> bool:
        nonlocal encodings, codec, seen
        keyword, attr_vr, kind, unpack = plan[tag]
        if not kind or (vr and vr != attr_vr):
            return False
        if tag == 0x00080005:
            if seen:
                return False
            raw = _new_tuple(RawDataElement, (tag, vr, len(value), value, 0, implicit_vr, True))
            encodings = _charset_encodings(raw)
            codec = encodings[0] if encodings else "ascii"
        seen = True
        text = _short_text(value, kind, unpack, encodings, codec)
        if text is _GENERIC:
            return False
        if keyword:
            strings[keyword] = text
        return True

    end = _scan(data, 0, len(data), implicit_vr, plan, stop, {}, 0, take=take)
    if end is None or (end == len(data) and not complete):
        return None
    return strings


@functools.lru_cache(maxsize=8)
def _scan_plan(keywords: tuple[str, ...]) -> dict[int, tuple[str, str, str | int, Any]]:
    """scan_strings' reading of each wanted tag: keyword, VR, short-road kind, unpacker."""
    plan = {
        attr.tag: (attr.keyword, attr.vr, kind, unpack)
        for attr, kind, unpack in _string_plan(keywords)
    }
    if 0x00080005 not in plan:
        # raw_strings reads the character set even when it is not asked for.
        plan[0x00080005] = ("", "CS", _ASCII, None)
    return plan


def scan_items(
    data: bytes | memoryview, implicit_vr: bool, wanted: Container[int], sequence: int
) -> tuple[dict[int, RawDataElement], list[dict[int, RawDataElement]]] | None:
    """:func:`scan_elements` for the top level and for each item of one top-level sequence.

    The wanted elements of the dataset, and per item of ``sequence`` (absent or
    empty: no items) the wanted elements of that item, in one pass over the
    bytes (each item then scanned once more). None for anything pydicom reads its
    own way, as :func:`scan_elements`.

    Examples
    --------
    >>> item = bytes.fromhex("08006000" "02000000") + b"CT"
    >>> data = (bytes.fromhex("10002000" "02000000") + b"P1"
    ...         + bytes.fromhex("40000001" "FFFFFFFF" "FEFF00E0" "0A000000") + item
    ...         + bytes.fromhex("FEFFDDE0" "00000000"))
    >>> top, items = scan_items(data, True, {0x00100020, 0x00080060}, 0x00400100)
    >>> top[0x00100020].value, [i[0x00080060].value for i in items]
    (b'P1', [b'CT'])
    """
    top: dict[int, RawDataElement] = {}
    spans: dict[int, tuple[int, int]] = {sequence: (0, 0)}
    view = memoryview(data)
    if _scan(view, 0, len(view), implicit_vr, wanted, 1 << 32, top, 0, spans) is None:
        return None
    pos, end = spans[sequence]
    items = []
    while pos + 8 <= end:  # each pass moves pos forward by at least 8
        group, element = _TAG(view, pos)
        length = _LENGTH(view, pos + 4)[0]
        pos += 8
        if group << 16 | element == _SEQUENCE_END:
            break
        if group << 16 | element != _ITEM:
            return None
        if length == _UNDEFINED:
            after = _scan(view, pos, end, implicit_vr, (), 0, None, 1)
            if after is None:
                return None
            body, pos = view[pos : after - 8], after
        elif pos + length > end:
            return None
        else:
            body, pos = view[pos : pos + length], pos + length
        found = scan_elements(body, implicit_vr, wanted)
        if found is None:
            return None
        items.append(found)
    return top, items


# --- DICOM JSON (PS3.18 F.2) -> the raw elements the C-FIND path keeps --------------------
#
# A QIDO-RS answer goes through the same converter as a C-FIND identifier: each
# attribute becomes the element its DICOM encoding would give (text as UTF-8 bytes read
# with a row character set of ISO_IR 192, binary numbers as numbers, AT as the encoded
# tag, InlineBinary as its bytes), so no VR rule exists twice.

_KNOWN_VRS = frozenset(v.value for v in VR)
_UTF8_CHARSET = RawDataElement(BaseTag(0x00080005), "CS", 10, b"ISO_IR 192", 0, False, True)
_PN_GROUPS = ("Alphabetic", "Ideographic", "Phonetic")
# VRs whose single JSON string is its DICOM form as it is (not PN, AT, SQ, numbers).
_ONE_STRING_VRS = (STRING_VRS - {"PN"}) | DATE_VRS | TIME_VRS | DATETIME_VRS | INT_STRING_VRS
_ONE_STRING_VRS |= FLOAT_STRING_VRS


def _json_text(item: Any) -> str:
    """One value of a text, date/time, IS or DS attribute in its DICOM string form."""
    if item is None:
        return ""  # an empty value of a multi-valued attribute (PS3.18 F.2.5)
    if isinstance(item, str):
        return item
    if isinstance(item, float):
        return repr(item)  # the shortest text that reads back as the same number
    if isinstance(item, int):
        return str(item)  # bool too: "True", which no numeric VR reads
    raise ValueError(f"a JSON {type(item).__name__} is not a value of this VR")


def _json_pn(item: Any) -> str:
    """A PN value object as the DICOM form: ``Alphabetic=Ideographic=Phonetic``."""
    if item is None:
        return ""
    if isinstance(item, str):
        return item  # some services send the DICOM form; it reads the same
    if not isinstance(item, Mapping):
        raise ValueError(f"a JSON {type(item).__name__} is not a PN value object")
    groups = [item.get(name) or "" for name in _PN_GROUPS]
    if not all(isinstance(g, str) for g in groups):
        raise ValueError("a PN component group is not a string")
    while groups and not groups[-1]:
        groups.pop()  # trailing empty groups are dropped, as in the DICOM form
    return "=".join(groups)


def _json_at(item: Any) -> bytes:
    if not (isinstance(item, str) and len(item) == 8):
        raise ValueError(f"{item!r} is not a tag as DICOM JSON writes one (GGGGEEEE)")
    number = int(item, 16)
    return struct.pack("<HH", number >> 16, number & 0xFFFF)


def _json_value(item: Mapping[str, Any], vr: str) -> Any:
    """The value of one DICOM JSON attribute object, read with ``vr``, in encoded form."""
    if "Value" in item:
        values = item["Value"]
        if not isinstance(values, list):
            values = [values]
        if vr == "SQ":
            raise ValueError("a sequence (SQ) where a flat value was expected")
        if vr in BINARY_INT_VRS or vr in BINARY_FLOAT_VRS:
            numbers = [v for v in values if v is not None]
            if any(not isinstance(v, (int, float, str)) for v in numbers):
                raise ValueError(f"a {vr} value is not a number")
            return numbers or b""
        if vr == "AT":
            return b"".join(_json_at(v) for v in values if v is not None)
        to_text = _json_pn if vr == "PN" else _json_text
        return "\\".join(to_text(v) for v in values).encode("utf-8", "surrogatepass")
    if "InlineBinary" in item:
        text = item["InlineBinary"]
        if not isinstance(text, str):
            raise ValueError("InlineBinary is not a base64 string")
        return base64.b64decode(text, validate=True)
    if "BulkDataURI" in item:
        uri = item["BulkDataURI"]
        if vr in BYTES_VRS and isinstance(uri, str):
            return uri
        raise ValueError(
            "the peer sent the value by reference (BulkDataURI), not inline; ask for the "
            "attribute at a level where the archive sends it inline"
        )
    return b""  # an attribute with no value


def json_element(tag: int, item: Any, attr: Attribute) -> RawDataElement:
    """One DICOM JSON attribute object as the raw element a C-FIND identifier would give.

    The value is what the C-FIND path would hold for the same attribute: text in
    UTF-8 (read with ISO_IR 192), binary numbers as numbers, AT and ``InlineBinary``
    values as their bytes. A ``BulkDataURI`` of a binary VR (OB, OW, UN...) is kept as
    the URI string, since fetching it is a request of its own; of any other VR it
    makes the cell empty with a :class:`MalformedValueWarning`. A value that cannot
    be put in DICOM form holds the reason (an exception), which the converter
    reports as a malformed value.
    """
    vr = None
    try:
        if type(item) is not dict and not isinstance(item, Mapping):
            raise ValueError(f"a JSON {type(item).__name__} is not a DICOM JSON attribute")
        declared = item.get("vr")
        vr = declared if declared in _KNOWN_VRS else None
        reading = _value_vr(vr, attr) if vr != "SQ" else "SQ"
        values = item.get("Value")
        if (
            type(values) is list
            and len(values) == 1
            and type(values[0]) is str
            and reading in _ONE_STRING_VRS
        ):
            # The common case, as _json_value would take it: one string of a text VR.
            value = values[0].encode("utf-8", "surrogatepass")
        else:
            value = _json_value(item, reading)
    except (ValueError, TypeError, binascii.Error, struct.error) as exc:
        value = exc if isinstance(exc, ValueError) else ValueError(str(exc))
    return RawDataElement(BaseTag(tag), vr, 0, value, 0, False, True)


# The VRs whose DICOM JSON strings FrameBuilder takes as they are: those whose one
# string is its DICOM form, and PN, except the ones that keep leading spaces.
_FAST_JSON_VRS = (_ONE_STRING_VRS | {"PN"}) - KEEP_LEADING_SPACE_VRS


def _utf8(text: str) -> bool:
    """True when ``text`` has a UTF-8 form (no lone surrogates from ``\\ud800`` escapes)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


_CHARSET_TAG = 0x00080005
# Joined text is cut at this byte, which no value of a fast-path column may hold.
_SEPARATOR = b"\x01"


@functools.cache
def _joinable(codec: str) -> bool:
    """True for codecs where a strict decode of joined values splits at the separator.

    Single-byte codecs and UTF-8 never read the separator byte as part of a character
    and carry no state from one value to the next; ISO 2022 and the other multi-byte
    codecs are decoded a value at a time instead.
    """
    try:
        name = codecs.lookup(codec).name
    except LookupError:
        return False
    return name in ("ascii", "utf-8", "tis-620") or name.startswith("iso8859")


class FrameBuilder:
    """Collect identifiers as they arrive and build one typed frame at the end.

    Adding an identifier is one pass over its elements that keeps the raw element
    of each column (no value conversion, no pydicom element per cell); the bytes are
    decoded a column at a time when the frame is built, each run of rows sharing a
    codec with a single ``bytes.decode``, so a long C-FIND answer costs little more
    than receiving it.

    Examples
    --------
    >>> from pydicom import Dataset
    >>> ds = Dataset()
    >>> ds.PatientID, ds.StudyDate = "123", "20260301"
    >>> fb = FrameBuilder(["PatientID", "StudyDate"])
    >>> fb.add(ds)
    >>> fb.frame().dtypes.astype(str).tolist()
    ['string', 'datetime64[ns]']
    """

    def __init__(self, columns: Sequence[str], *, flatten: int | None = None) -> None:
        self.attributes = [attribute(c) for c in columns]
        # The tag of a sequence whose items become one row each (a worklist's
        # Scheduled Procedure Step Sequence), the identifier's other columns repeated.
        self._flatten = flatten
        #: Identifiers added (rows, but for ``flatten``: one identifier, many rows).
        self.matches = 0
        self._index: dict[int, list[int]] = {_CHARSET_TAG: [-1]}
        for i, attr in enumerate(self.attributes):
            self._index.setdefault(attr.tag, []).append(i)
        self._cells: list[list[Any]] = [[] for _ in self.attributes]
        # DICOM JSON keys ("0020000D", or in lower case) -> tag.
        self._json_tags = {f"{t:08X}": t for t in self._index} | {
            f"{t:08x}": t for t in self._index
        }
        # (column, declared VR) -> how its DICOM JSON values are read (see _json_cell).
        self._json_modes: dict[tuple[int, Any], tuple[bool, bool] | None] = {}
        # Per row: the raw SpecificCharacterSet element (None when absent).
        self._charsets: list[Any] = []
        self._warned: set[str] = set()
        # The rows typed ahead by settle(), as frames, and how many they are.
        self._typed: list[pd.DataFrame] = []
        self._typed_rows = 0

    def __len__(self) -> int:
        return self._typed_rows + len(self._charsets)

    def settle(self) -> None:
        """Type the rows added so far now, so that :meth:`frame` has only the rest to do.

        For a caller with time to spare between batches: QIDO-RS types one page
        while the server works on the next. The frame is the same as when typed at
        once (each column's dtype follows its VR, not its values); a malformed value
        is still reported, once per batch it is in.

        Examples
        --------
        >>> fb = FrameBuilder(["PatientID"])
        >>> _ = fb.add_json({"00100020": {"vr": "LO", "Value": ["1"]}})
        >>> fb.settle()
        >>> _ = fb.add_json({"00100020": {"vr": "LO", "Value": ["2"]}})
        >>> len(fb), fb.frame().PatientID.tolist()
        (2, ['1', '2'])
        """
        if self._charsets:
            self._typed.append(self._typed_frame())
            self._typed_rows += len(self._charsets)
            self._cells = [[] for _ in self.attributes]
            self._charsets = []

    def add(self, ds: Dataset) -> None:
        """Keep the raw element of each column of one identifier.

        With ``flatten=`` (a sequence's tag), one row per item of that sequence:
        the item's elements and the identifier's top-level ones (an identifier
        without items is one row of its top-level elements).

        Examples
        --------
        >>> from pydicom import Dataset
        >>> ds, one, two = Dataset(), Dataset(), Dataset()
        >>> ds.PatientID, one.Modality, two.Modality = "P1", "CT", "MR"
        >>> ds.ScheduledProcedureStepSequence = [one, two]
        >>> fb = FrameBuilder(["PatientID", "Modality"], flatten=0x00400100)
        >>> fb.add(ds)
        >>> fb.frame().values.tolist(), fb.matches
        ([['P1', 'CT'], ['P1', 'MR']], 1)
        """
        top = self._wanted(ds)
        sequence = ds.get(self._flatten) if self._flatten is not None else None
        items = sequence.value if sequence is not None and sequence.VR == "SQ" else None
        if not items:
            self._keep(top)
            return
        for position, item in enumerate(items):
            self._keep([*top, *self._wanted(item)], new_match=position == 0)

    def _wanted(self, ds: Dataset) -> list[tuple[int, Any]]:
        """(tag, element) of each element of ``ds`` (top level only) that is a column."""
        index = self._index
        wanted = []
        for elem in ds.values():
            if elem.tag not in index:
                continue
            if elem.value is None and not isinstance(elem, DataElement):
                elem = ds.get_item(elem.tag)  # a deferred read: read it now
            wanted.append((elem.tag, elem))
        return wanted

    def add_raw(self, data: bytes | memoryview, implicit_vr: bool) -> bool:
        """Add one identifier from its little-endian encoding, as it came off the wire.

        The same as ``add(read_dataset(...))`` without building a pydicom ``Dataset``:
        the bytes are scanned once (:func:`scan_elements`) for this frame's columns.
        Returns False, adding nothing, for an encoding the scan leaves to pydicom;
        decode it with pydicom and call :meth:`add` then. With ``flatten=``, one
        row per item as :meth:`add` (:func:`scan_items`).

        Examples
        --------
        >>> fb = FrameBuilder(["PatientID"])
        >>> fb.add_raw(bytes.fromhex("10002000" "04000000") + b"123 ", implicit_vr=True)
        True
        >>> fb.frame().PatientID.tolist()
        ['123']
        """
        if self._flatten is not None:
            scanned = scan_items(data, implicit_vr, self._index, self._flatten)
            if scanned is None:
                return False
            top, items = scanned
            if not items:
                self._keep(top.items())
            for position, item in enumerate(items):
                self._keep([*top.items(), *item.items()], new_match=position == 0)
            return True
        found = scan_elements(data, implicit_vr, self._index)
        if found is None:
            return False
        self._keep(found.items())
        return True

    @property
    def tags(self) -> frozenset[int]:
        """The tags this frame keeps: its columns' and SpecificCharacterSet's.

        What to pass :func:`scan_elements` as ``wanted`` for :meth:`add_elements`.
        """
        return frozenset(self._index)

    def add_elements(self, elements: Mapping[int, Any]) -> None:
        """Add one row from raw elements by tag, as :func:`scan_elements` returns them.

        For a caller that scans the bytes itself (a file's header up to its pixel
        data, see :func:`pacsframe.files.read_headers`); tags that are not
        :attr:`tags` are ignored.

        Examples
        --------
        >>> fb = FrameBuilder(["PatientID"])
        >>> data = bytes.fromhex("10002000" "04000000") + b"123 "
        >>> fb.add_elements(scan_elements(data, True, fb.tags))
        >>> fb.frame().PatientID.tolist()
        ['123']
        """
        index = self._index
        self._keep((tag, elem) for tag, elem in elements.items() if tag in index)

    def add_json(self, obj: Any) -> bool:
        """Add one match of a QIDO-RS answer: a DICOM JSON object (PS3.18 F.2).

        Each attribute goes through the same conversion as a C-FIND identifier (see
        :func:`json_element`), so a frame built from DICOM JSON has the columns,
        dtypes and values of one built from the same datasets' encoding; sequences,
        private and other attributes that are not columns are skipped as C-FIND's
        are. Returns False, adding nothing, when ``obj`` is not a JSON object.

        Examples
        --------
        >>> fb = FrameBuilder(["PatientName", "StudyDate"])
        >>> fb.add_json({"00100010": {"vr": "PN", "Value": [{"Alphabetic": "Doe^Jane"}]},
        ...              "00080020": {"vr": "DA", "Value": ["20260301"]}})
        True
        >>> fb.frame().iloc[0].tolist()
        ['Doe^Jane', Timestamp('2026-03-01 00:00:00')]
        """
        if not isinstance(obj, Mapping):
            return False
        tags = self._json_tags
        index = self._index
        row: list[Any] = [None] * len(self.attributes)
        for key, item in obj.items():
            tag = tags.get(key)
            if tag is None:
                continue
            for i in index[tag]:
                if i >= 0:  # (SpecificCharacterSet as the row's charset: UTF-8, below)
                    row[i] = self._json_cell(i, tag, item)
        for cells, cell in zip(self._cells, row, strict=True):
            cells.append(cell)
        # Decoded with UTF-8: the text is already Unicode, whatever character set the
        # object names (which stays the SpecificCharacterSet column's value).
        self._charsets.append(_UTF8_CHARSET)
        self.matches += 1
        return True

    def _json_cell(self, i: int, tag: int, item: Any) -> Any:
        """Column ``i``'s cell for one DICOM JSON attribute: its DICOM string, or a raw element.

        Text the C-FIND path would decode and trim to the same string (one or more
        strings of a text, date/time, IS or DS VR; a PN of one Alphabetic group; ASCII,
        or valid UTF-8 without ISO 2022 escapes where the VR follows the character set)
        becomes that string here, without the detour through UTF-8 bytes; everything
        else becomes the raw element (:func:`json_element`) and is decoded as before.
        """
        declared = item.get("vr") if type(item) is dict else 0
        if declared is None or type(declared) is str:
            mode = self._json_modes.get((i, declared), 0)
            if mode == 0:
                mode = self._json_mode(i, declared)
            if mode is not None:
                values = item.get("Value")
                text: Any = None
                if type(values) is list:
                    if len(values) == 1:
                        text = values[0]
                        kind = type(text)
                        if mode[0]:
                            if kind is dict and len(text) == 1:
                                text = text.get("Alphabetic")  # PN: one Alphabetic group
                        elif kind is int:
                            text = str(text)
                        elif kind is float:
                            text = repr(text)
                    elif not mode[0] and values and all(type(v) is str for v in values):
                        text = "\\".join(values)
                    elif not values:
                        return None
                elif values is None and len(item) == 1 and "vr" in item:
                    return None  # {"vr": ...}: an attribute with no value
                if type(text) is str and (
                    text.isascii()
                    if not mode[1]
                    else "\x1b" not in text and (text.isascii() or _utf8(text))
                ):
                    return text.rstrip(" \x00").lstrip(" ") or None
        return json_element(tag, item, self.attributes[i])

    def _json_mode(self, i: int, declared: str | None) -> tuple[bool, bool] | None:
        """How column ``i`` reads a DICOM JSON value declared as ``declared`` on the fast
        path: (is PN, follows the character set), or None for the raw element."""
        vr = declared if declared in _KNOWN_VRS else None
        reading = _value_vr(vr, self.attributes[i]) if vr != "SQ" else "SQ"
        mode = None
        if reading in _FAST_JSON_VRS:
            mode = (reading == "PN", reading in CHARSET_VRS)
        self._json_modes[(i, declared)] = mode
        return mode

    def _keep(self, elements: Iterable[tuple[int, Any]], *, new_match: bool = True) -> None:
        """Append one row: each (tag, raw element) to its columns or the charsets.

        ``new_match`` is False for the second and later rows of one identifier.
        """
        self.matches += new_match
        row: list[Any] = [None] * len(self.attributes)
        charset = None
        index = self._index
        for tag, elem in elements:
            for i in index[tag]:
                if i < 0:
                    charset = elem
                else:
                    row[i] = elem
        for cells, elem in zip(self._cells, row, strict=True):
            cells.append(elem)
        self._charsets.append(charset)

    def _encodings(self) -> list[list[str] | None]:
        known: dict[Any, list[str] | None] = {}
        out: list[list[str] | None] = []
        for elem in self._charsets:
            if elem is None:
                out.append(None)
                continue
            value = elem.value
            key = value if value is None or isinstance(value, (bytes, str)) else tuple(value)
            if key not in known:
                known[key] = _charset_encodings(elem)
            out.append(known[key])
        return out

    @staticmethod
    def _kind(attr: Attribute, wire_vr: Any, enc: list[str] | None) -> tuple[str, bool] | None:
        vr = _value_vr(wire_vr, attr)
        if (
            vr in BINARY_INT_VRS
            or vr in BINARY_FLOAT_VRS
            or vr in KEEP_LEADING_SPACE_VRS
            or vr in BYTES_VRS
            or vr == "AT"
        ):
            return None
        codec, escapes = "ascii", False
        if vr in CHARSET_VRS and enc:
            codec, escapes = enc[0], True
        return (codec, escapes) if _joinable(codec) else None

    def _column(
        self, attr: Attribute, elems: list[Any], encodings: list[list[str] | None]
    ) -> list[Any]:
        """Decode one column's raw elements into DICOM strings (numbers for binary VRs)."""
        values: list[Any] = [None] * len(elems)
        groups: dict[str, list[int]] = {}
        slow: list[int] = []
        # (VR on the wire, the row's encodings) -> the codec of the fast path, whether
        # ISO 2022 escapes must be looked for, or None to decode one at a time.
        kinds: dict[tuple[Any, int], tuple[str, bool] | None] = {}
        for r, elem in enumerate(elems):
            if elem is None:
                continue
            if type(elem) is str:
                values[r] = elem  # DICOM JSON text, already decoded (FrameBuilder._json_cell)
                continue
            value = elem.value
            if type(value) is not bytes:
                if not (value is None or value == ""):
                    slow.append(r)
                continue
            if not value:
                continue
            enc = encodings[r]
            key = (elem.VR, id(enc))
            kind = kinds.get(key, False)
            if kind is False:
                kind = kinds[key] = self._kind(attr, elem.VR, enc)
            if kind is None or (kind[1] and b"\x1b" in value):
                slow.append(r)
                continue
            codec = kind[0]
            if codec in groups:
                groups[codec].append(r)
            else:
                groups[codec] = [r]
        for codec, rows in groups.items():
            joined = _SEPARATOR.join([elems[r].value for r in rows])
            parts = None
            if joined.count(_SEPARATOR) == len(rows) - 1:
                with contextlib.suppress(UnicodeDecodeError):
                    parts = joined.decode(codec).split("\x01")
            if parts is None:
                slow.extend(rows)  # a separator byte or undecodable bytes: one at a time
                continue
            for r, text in zip(rows, parts, strict=True):
                values[r] = text.rstrip(" \x00").lstrip(" ") or None
        failures: list[Exception] = []
        for r in sorted(slow):
            elem = elems[r]
            vr = _value_vr(elem.VR, attr)
            try:
                values[r] = _decode_raw(elem, vr, encodings[r])
            except _Lossy as exc:
                values[r] = exc.value
                failures.append(exc)
            except (PacsFrameError, ValueError, struct.error, LookupError) as exc:
                failures.append(exc)
        if failures and attr.keyword not in self._warned:
            self._warned.add(attr.keyword)
            _warn_undecodable(attr.keyword, failures[0], stacklevel=4)
        return values

    def frame(self) -> pd.DataFrame:
        """Build the typed frame from everything added so far."""
        if not self._typed:
            return self._typed_frame()
        parts = [*self._typed, self._typed_frame()] if self._charsets else self._typed
        return pd.concat(parts, ignore_index=True)

    def _typed_frame(self) -> pd.DataFrame:
        """The typed frame of the rows not yet typed."""
        encodings = self._encodings()
        return pd.DataFrame(
            {
                a.keyword: to_series(self._column(a, cells, encodings), a.keyword)
                for a, cells in zip(self.attributes, self._cells, strict=True)
            }
        )


def from_dicom_json(
    objects: Iterable[Any] | str | bytes,
    columns: Sequence[str] | Any,
    *,
    peer: str | None = None,
) -> pd.DataFrame:
    """A QIDO-RS answer (a list of DICOM JSON objects) as the frame C-FIND would give.

    ``columns`` is the frame's columns in order, or the :class:`~pacsframe.query.Query`
    that was asked (then its columns, and ``attrs["pacsframe"]`` records its level,
    model and matching keys, with ``peer``, as a C-FIND frame's do). ``objects`` may
    also be the answer's JSON text. Matches that are not JSON objects are left out
    with a :class:`MalformedValueWarning`; malformed values become empty with one,
    and the row is kept.

    Examples
    --------
    >>> answer = [{"0020000D": {"vr": "UI", "Value": ["1.2.3"]},
    ...            "00080061": {"vr": "CS", "Value": ["CT", "MR"]},
    ...            "00201208": {"vr": "IS", "Value": [42]}}]
    >>> f = from_dicom_json(answer, ["StudyInstanceUID", "ModalitiesInStudy",
    ...                              "NumberOfStudyRelatedInstances"])
    >>> f.NumberOfStudyRelatedInstances.tolist(), f.dtypes.astype(str).tolist()
    ([42], ['string', 'object', 'Int64'])
    """
    query = columns if hasattr(columns, "to_json") and hasattr(columns, "columns") else None
    builder = FrameBuilder(query.columns if query is not None else list(columns))
    if isinstance(objects, (str, bytes)):
        objects = json.loads(objects)
    if isinstance(objects, Mapping):
        objects = [objects]  # one object where a list was due
    skipped = sum(not builder.add_json(obj) for obj in objects)
    if skipped:
        warnings.warn(
            f"{skipped} match(es) of the DICOM JSON answer are not JSON objects and are "
            "missing from the frame; the peer sent malformed data.",
            MalformedValueWarning,
            stacklevel=2,
        )
    frame = builder.frame()
    if query is not None:
        frame.attrs["pacsframe"] = {**query.to_json(), **({"peer": peer} if peer else {})}
    return frame


# --- typed values -> DICOM strings -------------------------------------------------------


def _format_ds(value: float) -> str:
    text = repr(float(value))
    if len(text) <= 16:
        return text.removesuffix(".0") if text.endswith(".0") else text
    return f"{value:.10g}"[:16]


def _scalar_to_dicom(value: Any, vr: str) -> str:
    if isinstance(value, (pd.Timedelta, _dt.timedelta)):
        total = pd.Timedelta(value)
        if vr == "TM":
            secs = total.total_seconds()
            hh, rem = divmod(int(secs), 3600)
            mm, ss = divmod(rem, 60)
            micro = total.microseconds
            return f"{hh:02d}{mm:02d}{ss:02d}" + (f".{micro:06d}" if micro else "")
    if isinstance(value, (pd.Timestamp, _dt.datetime, np.datetime64)):
        stamp = pd.Timestamp(value)
        if vr == "DA":
            return stamp.strftime("%Y%m%d")
        if vr == "TM":
            return stamp.strftime("%H%M%S") + (
                f".{stamp.microsecond:06d}" if stamp.microsecond else ""
            )
        return stamp.strftime("%Y%m%d%H%M%S") + (
            f".{stamp.microsecond:06d}" if stamp.microsecond else ""
        )
    if isinstance(value, _dt.date):
        return value.strftime("%Y%m%d")
    if isinstance(value, _dt.time):
        return value.strftime("%H%M%S") + (
            f".{value.microsecond:06d}" if value.microsecond else ""
        )
    if isinstance(value, (bool, np.bool_)):
        return str(int(value))
    if isinstance(value, (int, np.integer)):
        return str(int(value))
    if isinstance(value, (float, np.floating)):
        if vr in INT_VRS and float(value).is_integer():
            return str(int(value))
        return _format_ds(float(value))
    return str(value)


def is_missing(value: Any) -> bool:
    """True for None, NA, NaT and NaN (and False for lists, which are values)."""
    if value is None or value is pd.NA or value is pd.NaT:
        return True
    if isinstance(value, float) and math.isnan(value):
        return True
    try:
        return bool(pd.isna(value)) if not isinstance(value, (list, tuple, np.ndarray)) else False
    except (TypeError, ValueError):
        return False


def to_dicom(value: Any, keyword: str) -> str:
    """Convert a typed frame value back to its DICOM string form (``""`` when empty).

    Examples
    --------
    >>> import pandas as pd
    >>> to_dicom(pd.Timestamp("2026-03-01"), "StudyDate")
    '20260301'
    >>> to_dicom(pd.Timedelta(hours=8, minutes=30), "StudyTime")
    '083000'
    >>> to_dicom(["CT", "MR"], "ModalitiesInStudy")
    'CT\\\\MR'
    """
    attr = attribute(keyword)
    if isinstance(value, (list, tuple, np.ndarray)):
        return "\\".join(_scalar_to_dicom(v, attr.vr) for v in value if not is_missing(v))
    if is_missing(value):
        return ""
    return _scalar_to_dicom(value, attr.vr)


def infer_level(frame: pd.DataFrame | pd.Series) -> str:
    """The query level a frame describes, from its most specific UID column.

    SOPInstanceUID > SeriesInstanceUID > StudyInstanceUID > PatientID.

    Examples
    --------
    >>> import pandas as pd
    >>> infer_level(pd.DataFrame(columns=["PatientID", "StudyInstanceUID"]))
    'STUDY'
    """
    names = [frame.name] if isinstance(frame, pd.Series) else list(frame.columns)
    for column in UID_COLUMNS:
        if column in names:
            return _LEVEL_OF_COLUMN[column]
    raise QueryError(
        "cannot tell the level of this frame: it has none of the columns "
        f"{', '.join(UID_COLUMNS)}; pass a frame returned by a find_* call."
    )
