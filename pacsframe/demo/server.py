"""The embedded demo PACS: a real DICOM server over a folder of files.

:class:`DemoPACS` listens on TCP (loopback by default) with pynetdicom and answers
C-ECHO; C-FIND, C-GET and C-MOVE (to known AEs) in the patient-root and study-root
models at every level; and C-STORE. On start it reads the header of every
``*.dcm`` file under its folder into one typed instance-level DataFrame
(:class:`pacsframe.frames.FrameBuilder`); the patient, study and series levels are
views derived from it (:func:`pacsframe.matching.level_frame`), and keys are
matched with :func:`pacsframe.matching.match`, the same engine the offline cache
uses. C-GET and C-MOVE send the selected files as stored, without decoding their
pixel data. Instances received by C-STORE are written to
``<folder>/<StudyInstanceUID>/<SeriesInstanceUID>/<SOPInstanceUID>.dcm`` (the
cache layout) and become visible to the next request.

The handlers follow pynetdicom's ``apps/`` idiom: small functions bound to
events, with the server passed as an extra handler argument.

With ``http_port=`` the same index is also served as DICOMweb (QIDO-RS, WADO-RS,
STOW-RS) on 127.0.0.1 by :mod:`pacsframe.demo.web`; :attr:`DemoPACS.url` is its base
URL. QIDO-RS matches with the same engine as C-FIND, and STOW-RS files instances
with :func:`store_instance`, as C-STORE does.

With ``tls=`` the server speaks only DICOM TLS (and, given a CA, requires client
certificates); C-MOVE sub-associations use TLS towards destinations added with
``add_known_ae(..., tls=...)``.

It also answers Modality Worklist C-FIND (:mod:`pacsframe.demo.worklist`): by
default the demo worklist of :func:`~pacsframe.demo.worklist.make_worklist`, or
the entries or folder of ``*.wl`` files given as ``worklist=``.

Not supported (yet): relational queries and retrieve and the other extended
negotiation options, sequence matching outside the worklist, and deleting
instances.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import ssl
import struct
import threading
import time
import weakref
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from io import BytesIO
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import pandas as pd
from pydicom import datadict, dcmread
from pydicom.charset import convert_encodings, default_encoding, python_encoding
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.multival import MultiValue
from pydicom.tag import BaseTag, Tag
from pydicom.uid import UID, ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, AllStoragePresentationContexts, _config, evt
from pynetdicom.dimse_messages import C_GET_RSP, C_MOVE_RSP
from pynetdicom.dsutils import encode
from pynetdicom.presentation import PresentationContext, build_context
from pynetdicom.sop_class import (
    ModalityWorklistInformationFind,
    PatientRootQueryRetrieveInformationModelFind,
    PatientRootQueryRetrieveInformationModelGet,
    PatientRootQueryRetrieveInformationModelMove,
    StudyRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelGet,
    StudyRootQueryRetrieveInformationModelMove,
    Verification,
)

from .. import frames, matching
from ..cache import atomic_write
from ..errors import QueryError
from ..matching import INDEX_KEYWORDS, LEVEL_KEYWORDS
from ..net.tls import TLS, BoundedHandshake
from ..pacs import check_ae_title
from . import web
from .worklist import Worklist, handle_worklist_find

__all__ = [
    "INDEX_KEYWORDS",
    "LEVEL_KEYWORDS",
    "DemoPACS",
    "Stored",
    "handle_echo",
    "handle_find",
    "handle_get",
    "handle_move",
    "handle_store",
    "serve",
    "store_instance",
]

LOGGER = logging.getLogger(__name__)


# The demo PACS runs on pynetdicom (an implementation we did not write, which keeps
# it an independent peer for pacsframe's own engine). pynetdicom writes every
# request and response identifier (patient names, IDs, birth dates) to its INFO
# log; the demo server's logs name AE titles, levels, counts and UIDs only. To
# debug identifiers, set these back to True after importing pacsframe.demo.
_config.LOG_REQUEST_IDENTIFIERS = False
_config.LOG_RESPONSE_IDENTIFIERS = False


def set_nodelay(event: evt.Event) -> None:
    """EVT_CONN_OPEN handler: turn off Nagle's algorithm on the association's socket."""
    # Nagle's algorithm and the peer's delayed ACK stall every small request by
    # ~40 ms; DIMSE traffic is request/response, so we always want it off.
    sock = getattr(getattr(event.assoc.dul, "socket", None), "socket", None)
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def pause_reactor(assoc: Any) -> None:
    """Keep a pynetdicom association's reactor from taking a response off its queue.

    pynetdicom's own wait before ``send_c_store`` (``while not assoc._is_paused``)
    can be fooled right after the previous request ended: the reactor has been
    woken but not yet run, its ``_is_paused`` still True, and it then takes the
    C-STORE response off the DIMSE queue, so a delivered object counts as failed.
    A reactor blocked in ``Event.wait`` is a waiter of the event's condition, so
    that is what we wait for (at most 5 s). These are pynetdicom internals: where a
    version lacks them this does nothing and the demo server's C-MOVE is as
    reliable as pynetdicom itself.
    """
    checkpoint = getattr(assoc, "_reactor_checkpoint", None)
    if checkpoint is None:
        return
    checkpoint.clear()
    waiters = getattr(getattr(checkpoint, "_cond", None), "_waiters", None)
    deadline = time.monotonic() + 5
    while assoc.is_established and time.monotonic() < deadline:
        if (len(waiters) > 0) if waiters is not None else getattr(assoc, "_is_paused", True):
            return
        time.sleep(0.0001)


_CHARSET = "SpecificCharacterSet"

_MODELS = {
    PatientRootQueryRetrieveInformationModelFind: "patient",
    StudyRootQueryRetrieveInformationModelFind: "study",
}
_MODEL_LEVELS = {
    "patient": ("PATIENT", "STUDY", "SERIES", "IMAGE"),
    "study": ("STUDY", "SERIES", "IMAGE"),
}
# PS3.4 C.4.1.2.2: the unique keys of every level above the query level, each with
# single value matching.
_UPPER_KEYS = {
    ("patient", "PATIENT"): (),
    ("patient", "STUDY"): ("PatientID",),
    ("patient", "SERIES"): ("PatientID", "StudyInstanceUID"),
    ("patient", "IMAGE"): ("PatientID", "StudyInstanceUID", "SeriesInstanceUID"),
    ("study", "STUDY"): (),
    ("study", "SERIES"): ("StudyInstanceUID",),
    ("study", "IMAGE"): ("StudyInstanceUID", "SeriesInstanceUID"),
}

# The levels whose attributes a wide view (QIDO-RS) adds to a level's rows.
_UPPER_LEVELS = {"PATIENT": (), "STUDY": (), "SERIES": ("STUDY",), "IMAGE": ("STUDY", "SERIES")}
_LEVEL_UNIQUE_KEY = {
    "PATIENT": "PatientID",
    "STUDY": "StudyInstanceUID",
    "SERIES": "SeriesInstanceUID",
    "IMAGE": "SOPInstanceUID",
}

_TAG_CHARSET = 0x00080005
_TAG_LEVEL = 0x00080052
_TAG_RETRIEVE_AE = 0x00080054
_TAG_STUDY_UID = 0x0020000D
_TAG_SERIES_UID = 0x0020000E
_TAG_SOP_UID = 0x00080018
_HEADER_TAGS = [Tag(frames.attribute(k).tag) for k in INDEX_KEYWORDS]

_UTF8 = "ISO_IR 192"
# Single-byte and Unicode character sets whose Python codec matches the DICOM
# repertoire exactly; anything else (ISO 2022 code extensions, ISO_IR 13's subset of
# Shift-JIS) is answered in UTF-8 rather than risk a wrong encoding.
_PLAIN_CHARSETS = {
    term: codec
    for term, codec in python_encoding.items()
    if term.startswith("ISO_IR ") and term not in ("ISO_IR 6", "ISO_IR 13")
} | {"GB18030": "GB18030", "GBK": "GBK"}
_BINARY_INT_VRS = frozenset(frames.BINARY_INT_VRS)
_BINARY_FLOAT_VRS = frozenset(frames.BINARY_FLOAT_VRS)
_BINARY_VRS = _BINARY_INT_VRS | _BINARY_FLOAT_VRS
_MAX_COMMENT = 64  # Error Comment is LO


# --- reading files -------------------------------------------------------------------------


def _read_header(source: str | os.PathLike[str] | BinaryIO) -> Dataset:
    # Only the indexed tags are kept, and the pixel data is never read: a folder of
    # thousands of files indexes in seconds.
    return dcmread(source, stop_before_pixels=True, specific_tags=_HEADER_TAGS)


def _text_of(ds: Dataset, tag: int) -> str | None:
    """An ASCII attribute (a UID) as its raw text, without pydicom's value conversion."""
    elem = ds.get_item(tag)
    if elem is None or elem.value is None:
        return None
    value = elem.value
    if isinstance(value, bytes):
        value = value.decode("ascii", errors="replace")
    elif not isinstance(value, str):
        value = "\\".join(str(v) for v in value) if isinstance(value, MultiValue) else str(value)
    return value.strip(" \x00") or None


# --- the index -----------------------------------------------------------------------------


@dataclass
class _View:
    """One query level: its typed frame and, per row, the character set to answer in."""

    frame: pd.DataFrame
    charsets: list[str | None]
    _strings: dict[str, list[str]] = field(default_factory=dict)
    _bytes: dict[tuple[str, str, bool], list[bytes]] = field(default_factory=dict)
    # Per column, each row's attribute as a DICOM JSON member (pacsframe.demo.web).
    json: dict[str, list[str]] = field(default_factory=dict)

    def strings(self, keyword: str) -> list[str] | None:
        """The column as DICOM strings, converted once per view and then reused."""
        cached = self._strings.get(keyword)
        if cached is None:
            if keyword not in self.frame.columns:
                return None
            column = self.frame[keyword]
            if column.dtype == "string":
                # to_dicom(str) is the string itself; skip the per-value call.
                cached = column.fillna("").tolist()
            else:
                cached = [frames.to_dicom(v, keyword) for v in column.tolist()]
            self._strings[keyword] = cached
        return cached


def _charset_term(terms: Any) -> str | None:
    if not isinstance(terms, list) or not terms:
        return None
    if len(terms) == 1 and terms[0] in _PLAIN_CHARSETS:
        return terms[0]
    return _UTF8


def _make_view(frame: pd.DataFrame) -> _View:
    frame = frame.reset_index(drop=True)
    return _View(frame, [_charset_term(t) for t in frame[_CHARSET].tolist()])


class _Index:
    """The instance frame plus cached level views, safe to share between associations.

    New instances are collected in a FrameBuilder and merged when the next query
    needs them, so a burst of C-STOREs costs one concatenation, not one each.
    Besides the DICOM columns, each row has the file's ``path`` and
    ``transfer_syntax`` (from its file meta; C-MOVE proposes it to the destination).
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._instances = frames.empty_frame(INDEX_KEYWORDS).assign(
            path=pd.Series(dtype=str), transfer_syntax=pd.Series(dtype=str)
        )
        self._pending = frames.FrameBuilder(INDEX_KEYWORDS)
        self._pending_paths: list[str] = []
        self._pending_syntaxes: list[str] = []
        self._views: dict[str, _View] = {}

    def add(self, ds: Dataset, path: str) -> None:
        meta = getattr(ds, "file_meta", None)
        syntax = str(getattr(meta, "TransferSyntaxUID", "") or "")
        with self._lock:
            self._pending.add(ds)
            self._pending_paths.append(path)
            self._pending_syntaxes.append(syntax)
            self._views.clear()

    def scan(self, folder: Path) -> int:
        """Index every ``*.dcm`` under ``folder``; return how many files were indexed."""
        added = 0
        for path in sorted(folder.rglob("*.dcm")):
            if not path.is_file():
                continue
            try:
                ds = _read_header(path)
            except (InvalidDicomError, OSError, ValueError, EOFError) as exc:
                LOGGER.warning("Skipping %s: not a readable DICOM file (%s)", path, exc)
                continue
            missing = [
                name
                for name, tag in (
                    ("StudyInstanceUID", _TAG_STUDY_UID),
                    ("SeriesInstanceUID", _TAG_SERIES_UID),
                    ("SOPInstanceUID", _TAG_SOP_UID),
                )
                if not _text_of(ds, tag)
            ]
            if missing:
                LOGGER.warning("Skipping %s: it has no %s", path, " or ".join(missing))
                continue
            self.add(ds, str(path))
            added += 1
        return added

    def instances(self) -> pd.DataFrame:
        with self._lock:
            self._merge()
            return self._instances

    def view(self, level: str, *, wide: bool = False) -> _View:
        """The rows of one query level; ``wide`` adds the levels above (for QIDO-RS).

        A wide SERIES view carries its study's attributes (patient and study
        columns, ModalitiesInStudy, the study's counts), a wide IMAGE view its
        study's and series' computed attributes, so that a QIDO-RS search for all
        series or instances can match on and return them (PS3.18 6.7.1.2.1).
        """
        with self._lock:
            self._merge()
            return self._view(level, wide)

    def _view(self, level: str, wide: bool) -> _View:
        name = f"{level}+" if wide else level
        view = self._views.get(name)
        if view is None:
            frame = matching.level_frame(self._instances, level)
            for upper in _UPPER_LEVELS[level] if wide else ():
                other = self._view(upper, False).frame
                key = _LEVEL_UNIQUE_KEY[upper]
                extra = [c for c in other.columns if c not in frame.columns]
                if extra and key in frame.columns:
                    # One row per key on the right: a left join keeps the rows' order.
                    frame = frame.merge(other[[key, *extra]], on=key, how="left")
            view = _make_view(frame)
            self._views[name] = view
        return view

    def _merge(self) -> None:
        if not self._pending_paths:
            return
        new = self._pending.frame()
        new["path"] = pd.Series(self._pending_paths, dtype=str)
        new["transfer_syntax"] = pd.Series(self._pending_syntaxes, dtype=str)
        self._pending = frames.FrameBuilder(INDEX_KEYWORDS)
        self._pending_paths = []
        self._pending_syntaxes = []
        merged = (
            pd.concat([self._instances, new], ignore_index=True) if len(self._instances) else new
        )
        # A re-sent instance replaces the old row (its file was overwritten in place).
        self._instances = merged.drop_duplicates("SOPInstanceUID", keep="last", ignore_index=True)


# --- C-FIND --------------------------------------------------------------------------------


class _Refused(Exception):
    """A request the SCP answers with a failure status and an Error Comment."""

    def __init__(self, status: int, comment: str) -> None:
        super().__init__(comment)
        self.status = status
        self.comment = comment


def _status(status: int, comment: str) -> Dataset:
    # Error Comment is one LO value in the command set: ASCII, no backslash, 64 chars.
    text = comment.split("; ")[0].replace("\\", "/").encode("ascii", "replace").decode()
    if len(text) > _MAX_COMMENT:
        text = text[: _MAX_COMMENT - 3] + "..."
    ds = Dataset()
    ds.Status = status
    ds.ErrorComment = text
    return ds


@dataclass(frozen=True)
class _Request:
    """A validated C-FIND identifier: the level, the matching keys, the keys to return."""

    level: str
    keys: dict[str, str]
    returned: tuple[tuple[int, str, str | None], ...]  # (tag, VR, keyword or None)


def _query_value(identifier: Dataset, tag: int, vr: str) -> str | None:
    raw = identifier.get_item(tag)
    if raw is None or raw.value is None:
        return None
    value: Any = raw.value
    if isinstance(value, bytes) and vr not in frames.CHARSET_VRS and vr not in _BINARY_VRS:
        # ASCII VRs (UI, CS, DA, TM, DT, IS, DS, AS, AE) go through untouched, so a
        # wildcard or a range is never "corrected" by pydicom's value classes.
        text = value.decode("ascii", errors="replace")
    else:
        # Text in the identifier's Specific Character Set, or binary numbers.
        value = identifier[tag].value
        if value is None or isinstance(value, bytes):
            return None
        if isinstance(value, (MultiValue, list, tuple)):
            text = "\\".join(str(v) for v in value)
        else:
            text = str(value)
    return text.strip(" \x00") or None


def _level_of(identifier: Dataset, model: str) -> str:
    """The QueryRetrieveLevel of a request, refused (0xA900) when the model lacks it."""
    level = _query_value(identifier, _TAG_LEVEL, "CS")
    levels = _MODEL_LEVELS[model]
    if level not in levels:
        raise _Refused(
            0xA900,
            f"QueryRetrieveLevel {level or '(missing)'} is not one of {', '.join(levels)}",
        )
    return level


def _parse_request(identifier: Dataset, model: str) -> _Request:
    level = _level_of(identifier, model)
    keys: dict[str, str] = {}
    returned: list[tuple[int, str, str | None]] = []
    # Iterating a Dataset yields elements; the tags are what is needed here.
    tags = [int(t) for t in sorted(identifier.keys())]
    for tag in tags:
        if tag in (_TAG_CHARSET, _TAG_LEVEL, _TAG_RETRIEVE_AE) or (tag & 0xFFFF) == 0:
            continue
        elem = identifier.get_item(tag)
        keyword = datadict.keyword_for_tag(tag) if not (tag >> 16) % 2 else ""
        try:
            attr = frames.attribute(keyword) if keyword else None
        except QueryError:
            attr = None  # a sequence: returned empty, never matched
        if attr is None:
            returned.append((tag, elem.VR or "UN", None))
            continue
        returned.append((tag, attr.vr, attr.keyword))
        try:
            value = _query_value(identifier, tag, attr.vr)
        except (ValueError, TypeError, LookupError) as exc:
            raise _Refused(0xA900, f"cannot read the value of {attr.keyword}: {exc}") from None
        if value is not None:
            keys[attr.keyword] = value
    for keyword in _UPPER_KEYS[(model, level)]:
        value = keys.get(keyword)
        if value is None or any(c in value for c in "\\*?"):
            root = "patient" if model == "patient" else "study"
            raise _Refused(0xA900, f"{root}-root {level} level needs one {keyword} value")
    return _Request(level, keys, tuple(returned))


def _pad(value: bytes, vr: str) -> bytes:
    # PS3.5 6.2: values have even length, UI padded with NUL, text with a space.
    if len(value) % 2 == 0:
        return value
    return value + (b"\x00" if vr == "UI" else b" ")


def _binary(text: str, vr: str, little_endian: bool) -> bytes:
    if not text:
        return b""
    parts = text.split("\\")
    code = frames.BINARY_INT_VRS.get(vr) or frames.BINARY_FLOAT_VRS[vr]
    numbers = [int(float(p)) if vr in _BINARY_INT_VRS else float(p) for p in parts]
    return struct.pack(f"{'<' if little_endian else '>'}{len(numbers)}{code}", *numbers)


class _Encoder:
    """Turns view rows into response identifiers made of pre-encoded raw elements.

    pydicom writes a raw element's bytes as they are when the dataset's original
    encoding matches the transfer syntax (``Dataset.set_original_encoding``), so a
    response costs a few byte-string operations per key instead of pydicom's value
    conversion and validation. Text in the Specific Character Set is encoded per
    row; everything else is encoded once per view and column.
    """

    def __init__(
        self, view: _View, request: _Request, ae_title: str, transfer_syntax: UID
    ) -> None:
        self.view = view
        self.implicit = transfer_syntax.is_implicit_VR
        self.little = transfer_syntax.is_little_endian
        self.fixed = [
            self._raw(_TAG_LEVEL, "CS", _pad(request.level.encode(), "CS")),
            self._raw(_TAG_RETRIEVE_AE, "AE", _pad(ae_title.encode(), "AE")),
        ]
        # (tag, VR, strings) for text in the character set; (tag, VR, bytes) otherwise.
        self.text: list[tuple[BaseTag, str, list[str] | None]] = []
        self.other: list[tuple[BaseTag, str, list[bytes] | None]] = []
        for tag, vr, keyword in request.returned:
            strings = view.strings(keyword) if keyword else None
            if vr in frames.CHARSET_VRS:
                self.text.append((BaseTag(tag), vr, strings))
            else:
                self.other.append((BaseTag(tag), vr, self._encoded(keyword, vr, strings)))

    def _raw(self, tag: int, vr: str, value: bytes) -> RawDataElement:
        return RawDataElement(BaseTag(tag), vr, len(value), value, 0, self.implicit, self.little)

    def _encoded(
        self, keyword: str | None, vr: str, strings: list[str] | None
    ) -> list[bytes] | None:
        if strings is None or keyword is None:
            return None
        key = (keyword, vr, self.little)
        cached = self.view._bytes.get(key)
        if cached is None:
            if vr in _BINARY_VRS:
                cached = [_binary(s, vr, self.little) for s in strings]
            elif vr in frames.STRING_VRS or vr in frames.DTYPES:
                cached = [_pad(s.encode("ascii", errors="replace"), vr) for s in strings]
            else:
                cached = [b""] * len(strings)  # OB, AT and friends: returned empty
            self.view._bytes[key] = cached
        return cached

    def __call__(self, row: int) -> Dataset:
        charset = self.view.charsets[row]
        texts = [strings[row] if strings is not None else "" for _, _, strings in self.text]
        try:
            codec = _PLAIN_CHARSETS[charset] if charset else "ascii"
            encoded = [text.encode(codec) for text in texts]
        except UnicodeEncodeError:
            # The row's own character set cannot hold a value (or it has none and a
            # value is not ASCII): Unicode holds everything.
            charset = _UTF8
            encoded = [text.encode("utf-8") for text in texts]
        ds = Dataset()
        for raw in self.fixed:
            ds[raw.tag] = raw
        for (tag, vr, _), value in zip(self.text, encoded, strict=True):
            ds[tag] = self._raw(tag, vr, _pad(value, vr))
        for tag, vr, column in self.other:
            ds[tag] = self._raw(tag, vr, column[row] if column is not None else b"")
        if charset:
            ds[_TAG_CHARSET] = self._raw(_TAG_CHARSET, "CS", _pad(charset.encode(), "CS"))
        # Declaring the encoding the elements already have lets pydicom copy them.
        ds.set_original_encoding(
            self.implicit,
            self.little,
            convert_encodings([charset]) if charset else default_encoding,
        )
        return ds


def handle_find(event: evt.Event, server: DemoPACS) -> Iterator[tuple[int | Dataset, Any]]:
    """Answer a C-FIND request (``evt.EVT_C_FIND``) from the server's index.

    Parameters
    ----------
    event : pynetdicom.events.Event
        The C-FIND request event.
    server : DemoPACS
        The server whose index answers (bound as an extra handler argument).

    Yields
    ------
    (int or pydicom.dataset.Dataset, pydicom.dataset.Dataset or None)
        One Pending ``0xFF00`` response per match, each identifier holding exactly
        the requested keys plus QueryRetrieveLevel, RetrieveAETitle and
        SpecificCharacterSet (when the row has one or a value needs Unicode);
        ``0xFE00`` when the peer cancels; or a single failure status with an Error
        Comment: ``0xA900`` for an identifier that does not fit the model (a bad
        level, a missing or multi-valued upper-level unique key), ``0xC000`` for a
        matching value that cannot be read (an impossible date, a malformed range).
        With ``server.max_results`` set and more matches than that, the first
        ``max_results`` and then ``0xFE00``, as Orthanc's ``LimitFindResults`` does.

    Examples
    --------
    >>> from pynetdicom import evt
    >>> server = DemoPACS("/tmp/nowhere")
    >>> handlers = [(evt.EVT_C_FIND, handle_find, [server])]
    """
    if event.request.AffectedSOPClassUID == ModalityWorklistInformationFind:
        yield from handle_worklist_find(event, server)
        return
    model = _MODELS.get(event.request.AffectedSOPClassUID)
    if model is None:
        yield _status(0x0122, "SOP class not supported"), None
        return
    try:
        identifier = event.identifier
    except (ValueError, TypeError, LookupError, EOFError, struct.error) as exc:
        LOGGER.info("C-FIND identifier unreadable: %s", exc)
        yield _status(0xA900, f"the identifier could not be decoded: {exc}"), None
        return
    try:
        request = _parse_request(identifier, model)
        view = server._index.view(request.level)
        rows = np.flatnonzero(matching.match(view.frame, request.keys).to_numpy())
    except _Refused as exc:
        LOGGER.info("C-FIND refused (0x%04X): %s", exc.status, exc.comment)
        yield _status(exc.status, exc.comment), None
        return
    except QueryError as exc:
        LOGGER.info("C-FIND unable to process: %s", exc)
        yield _status(0xC000, str(exc)), None
        return
    LOGGER.info("C-FIND %s level: %d match(es)", request.level, len(rows))
    encode = _Encoder(view, request, server.ae_title, UID(event.context.transfer_syntax))
    limit = server.max_results
    for n, row in enumerate(rows.tolist()):
        if event.is_cancelled or (limit is not None and n >= limit):
            # At the cap: Cancel unasked, which is how Orthanc says "there is more".
            yield 0xFE00, None
            return
        yield 0xFF00, encode(row)


# --- C-GET and C-MOVE ------------------------------------------------------------------------


_RETRIEVE_MODELS = {
    PatientRootQueryRetrieveInformationModelGet: "patient",
    StudyRootQueryRetrieveInformationModelGet: "study",
    PatientRootQueryRetrieveInformationModelMove: "patient",
    StudyRootQueryRetrieveInformationModelMove: "study",
}
_UNCOMPRESSED = (ExplicitVRLittleEndian, ImplicitVRLittleEndian)
_MAX_CONTEXTS = 128  # PS3.8: presentation context IDs are odd numbers 1 to 255


def _parse_retrieve(identifier: Dataset, model: str) -> tuple[str, dict[str, str]]:
    """The level and the unique keys of a C-GET/C-MOVE identifier (PS3.4 C.4.2.2.1).

    The unique keys of the levels above must be single values; the retrieve
    level's own key may be a list (``\\``-separated). Other keys are ignored, as
    the hierarchical model does not use them to select instances.
    """
    level = _level_of(identifier, model)
    keys: dict[str, str] = {}
    for keyword in (*_UPPER_KEYS[(model, level)], _LEVEL_UNIQUE_KEY[level]):
        attr = frames.attribute(keyword)
        try:
            value = _query_value(identifier, attr.tag, attr.vr)
        except (ValueError, TypeError, LookupError) as exc:
            raise _Refused(0xA900, f"cannot read the value of {keyword}: {exc}") from None
        if not value or any(c in value for c in "*?"):
            raise _Refused(0xA900, f"{level} level retrieve needs {keyword} (no wildcards)")
        if keyword != _LEVEL_UNIQUE_KEY[level] and "\\" in value:
            raise _Refused(0xA900, f"{level} level retrieve needs one {keyword} value")
        keys[keyword] = value
    return level, keys


def _select(server: DemoPACS, event: evt.Event, model: str) -> pd.DataFrame:
    """The indexed instances a C-GET/C-MOVE request asks for (or raise _Refused)."""
    try:
        identifier = event.identifier
    except (ValueError, TypeError, LookupError, EOFError, struct.error) as exc:
        raise _Refused(0xA900, f"the identifier could not be decoded: {exc}") from None
    level, keys = _parse_retrieve(identifier, model)
    # Every instance row carries the UIDs of its patient, study and series, so
    # matching the unique keys on the instance frame selects the same instances
    # as matching the level's frame and expanding each match.
    instances = server._index.instances()
    try:
        mask = matching.match(instances, keys).to_numpy()
    except QueryError as exc:
        raise _Refused(0xC000, str(exc)) from None
    selected = instances.loc[mask, ["SOPClassUID", "SOPInstanceUID", "path", "transfer_syntax"]]
    LOGGER.info("%s %s level: %d instance(s)", event.event.name, level, len(selected))
    return selected.reset_index(drop=True)


class _Notes:
    """Error Comments (and statuses) for final C-GET/C-MOVE responses.

    pynetdicom's retrieve handlers cannot fail a request with an Error Comment
    before the sub-operations start: a C-MOVE handler must yield the destination
    first, and ``(None, None)`` makes pynetdicom answer 0xA801 with no comment; a
    C-GET handler can only end early with a count of 0, which is answered as
    Success. So the handler leaves a note keyed by association and Message ID and
    takes that "no-op" route, and :func:`_annotate` (bound to ``EVT_DIMSE_SENT``,
    which fires after the response is built and before it is encoded) puts the
    status and comment into that final response.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._notes: weakref.WeakKeyDictionary[Any, dict[int, tuple[int | None, str]]]
        self._notes = weakref.WeakKeyDictionary()

    def leave(self, event: evt.Event, status: int | None, comment: str) -> None:
        """Note ``comment`` for the final response (``status`` None: keep pynetdicom's)."""
        with self._lock:
            notes = self._notes.setdefault(event.assoc, {})
            notes[int(event.request.MessageID)] = (status, comment)

    def take(self, assoc: Any, message_id: int) -> tuple[int | None, str] | None:
        with self._lock:
            notes = self._notes.get(assoc)
            return notes.pop(message_id, None) if notes else None


def _annotate(event: evt.Event, server: DemoPACS) -> None:
    """Complete a final C-GET/C-MOVE response with the handler's note (see _Notes)."""
    message = event.message
    if not isinstance(message, (C_GET_RSP, C_MOVE_RSP)):
        return
    command = message.command_set
    status = int(command.get("Status", 0))
    if status in (0xFF00, 0xFF01):
        return
    note = server._notes.take(event.assoc, int(command.MessageIDBeingRespondedTo))
    if note is None:
        return
    wanted, comment = note
    if wanted is None:
        if status != 0xA801 or "ErrorComment" in command:
            return  # the note was for a failure that did not happen
        wanted = status
    command.Status = wanted
    command.ErrorComment = _status(wanted, comment).ErrorComment
    # The Command Group Length was computed before the comment was added.
    del command.CommandGroupLength
    command.CommandGroupLength = len(encode(command, True, True) or b"")


def _stand_in(row: dict[str, Any]) -> Dataset:
    # An instance whose file cannot be read: a dataset without file meta, which
    # pynetdicom's send_c_store refuses, so it counts one failed sub-operation
    # and lists the SOPInstanceUID, and the other sub-operations go on.
    ds = Dataset()
    ds.SOPClassUID = row["SOPClassUID"] or "1.2.840.10008.5.1.4.1.1.7"
    ds.SOPInstanceUID = row["SOPInstanceUID"]
    return ds


def _sub_operations(event: evt.Event, selected: pd.DataFrame) -> Iterator[tuple[int, Any]]:
    """One Pending (status, dataset) per instance; 0xFE00 once the peer cancels."""
    for row in selected.to_dict("records"):
        if event.is_cancelled:
            LOGGER.info("%s cancelled by the peer", event.event.name)
            yield 0xFE00, None
            return
        try:
            # No pixel decoding: the elements stay raw and are written back as read
            # when the transfer syntax is the file's.
            ds = _fit_to_contexts(event, dcmread(row["path"]))
        except (InvalidDicomError, OSError, ValueError, EOFError) as exc:
            LOGGER.error("%s: cannot read %s (%s)", event.event.name, row["path"], exc)
            ds = _stand_in(row)
        yield 0xFF00, ds


def _fit_to_contexts(event: evt.Event, ds: Dataset) -> Dataset:
    """Decompress an object the requestor accepted no context for in its own syntax.

    A C-GET requestor negotiates one syntax per context; as Orthanc does, an object
    stored in another compressed syntax is sent decoded rather than not at all.
    Only possible where pydicom decodes the syntax itself (RLE, or JPEG with a
    plugin installed); otherwise the sub-operation fails and is counted so.
    """
    syntax = ds.file_meta.get("TransferSyntaxUID") if hasattr(ds, "file_meta") else None
    if syntax is None or not syntax.is_compressed or event.event.name != "EVT_C_GET":
        return ds
    sop_class = ds.get("SOPClassUID")
    if any(
        cx.abstract_syntax == sop_class and cx.transfer_syntax[0] == syntax
        for cx in event.assoc.accepted_contexts
    ):
        return ds
    try:
        # Lossless decoding keeps the instance's identity (pydicom would re-issue it).
        ds.decompress(generate_instance_uid=False)
    except Exception as exc:
        # No decoder for this syntax here: send as stored and let it fail visibly.
        LOGGER.warning("cannot decompress %s from %s: %s", ds.get("SOPInstanceUID"), syntax, exc)
    return ds


def handle_get(event: evt.Event, server: DemoPACS) -> Iterator[Any]:
    """Answer a C-GET request (``evt.EVT_C_GET``) with C-STOREs on the same association.

    The identifier names a level and the unique keys down to it (PS3.4 C.4.2.2.1):
    the upper levels' keys one value each, the level's own key one value or a list
    (e.g. several SOPInstanceUIDs at the IMAGE level). The selected files are read
    without decoding their pixel data and sent over the presentation contexts the
    requestor offered in the SCP role.

    Parameters
    ----------
    event : pynetdicom.events.Event
        The C-GET request event.
    server : DemoPACS
        The server whose index and files answer (bound as an extra handler argument).

    Yields
    ------
    int, then (int, pydicom.dataset.Dataset or None)
        pynetdicom's C-GET handler protocol: the number of sub-operations, then a
        Pending ``0xFF00`` and the dataset per instance, or ``0xFE00`` when the peer
        cancels. pynetdicom then answers Success ``0x0000``, Warning ``0xB000``
        (some sub-operations failed) or Failure ``0xA702`` (all failed), with the
        counts and the Failed SOP Instance UID List. A request that cannot be
        served is answered ``0xA900`` (a bad identifier) or ``0xC000`` with an
        Error Comment.

    Examples
    --------
    >>> from pynetdicom import evt
    >>> server = DemoPACS("/tmp/nowhere")
    >>> handlers = [(evt.EVT_C_GET, handle_get, [server])]
    """
    model = _RETRIEVE_MODELS.get(event.request.AffectedSOPClassUID)
    try:
        if model is None:
            raise _Refused(0x0122, "SOP class not supported")
        selected = _select(server, event, model)
    except _Refused as exc:
        LOGGER.info("C-GET refused (0x%04X): %s", exc.status, exc.comment)
        server._notes.leave(event, exc.status, exc.comment)
        yield 0
        return
    yield len(selected)
    yield from _sub_operations(event, selected)


def _move_contexts(selected: pd.DataFrame) -> list[PresentationContext]:
    """Presentation contexts for a C-MOVE sub-association: each file's own syntax.

    Per SOP class one context offers the uncompressed syntaxes (the files' first);
    each compressed syntax gets a context of its own, so the destination accepting
    one does not hide the others.
    """
    pairs = selected[["SOPClassUID", "transfer_syntax"]].drop_duplicates()
    plain: dict[str, list[str]] = {}
    compressed: list[tuple[str, str]] = []
    for sop_class, syntax in pairs.itertuples(index=False):
        if not isinstance(sop_class, str) or not sop_class:
            continue
        syntaxes = plain.setdefault(sop_class, [])
        if not syntax or UID(syntax) in _UNCOMPRESSED or not UID(syntax).is_compressed:
            if syntax:
                syntaxes.append(syntax)
        else:
            compressed.append((sop_class, syntax))
    contexts = [
        build_context(sop_class, list(dict.fromkeys([*syntaxes, *_UNCOMPRESSED])))
        for sop_class, syntaxes in plain.items()
    ]
    contexts += [build_context(sop_class, syntax) for sop_class, syntax in compressed]
    if len(contexts) > _MAX_CONTEXTS:
        LOGGER.warning(
            "C-MOVE needs %d presentation contexts; only %d fit in one association, "
            "instances needing the others will fail",
            len(contexts),
            _MAX_CONTEXTS,
        )
    return contexts[:_MAX_CONTEXTS]


def handle_move(event: evt.Event, server: DemoPACS) -> Iterator[Any]:
    """Answer a C-MOVE request (``evt.EVT_C_MOVE``) with C-STOREs to a known AE.

    The identifier is read as for :func:`handle_get`. The Move Destination must be
    one of the server's known AEs (``known_aes`` or :meth:`DemoPACS.add_known_ae`);
    the sub-association to it proposes, per SOP class, the files' own transfer
    syntaxes plus the uncompressed ones, and has TCP_NODELAY set.

    Parameters
    ----------
    event : pynetdicom.events.Event
        The C-MOVE request event.
    server : DemoPACS
        The server whose index, files and known AEs answer (bound as an extra
        handler argument).

    Yields
    ------
    (str, int, dict), then int, then (int, pydicom.dataset.Dataset or None)
        pynetdicom's C-MOVE handler protocol: the destination's address, port and
        association arguments, the number of sub-operations, then a Pending
        ``0xFF00`` and the dataset per instance, or ``0xFE00`` when the peer
        cancels. Final statuses are as for :func:`handle_get`; an unknown
        destination, or one that refuses the association, is answered ``0xA801``
        with an Error Comment naming the AE.

    Examples
    --------
    >>> from pynetdicom import evt
    >>> server = DemoPACS("/tmp/nowhere", known_aes={"STORESCP": ("127.0.0.1", 11113)})
    >>> handlers = [(evt.EVT_C_MOVE, handle_move, [server])]
    """
    model = _RETRIEVE_MODELS.get(event.request.AffectedSOPClassUID)
    destination = str(event.request.MoveDestination or "").strip()
    try:
        if model is None:
            raise _Refused(0x0122, "SOP class not supported")
        address = server.known_aes.get(destination)
        if address is None:
            raise _Refused(0xA801, f"Move destination unknown: {destination or '(empty)'}")
        selected = _select(server, event, model)
    except _Refused as exc:
        LOGGER.info("C-MOVE refused (0x%04X): %s", exc.status, exc.comment)
        server._notes.leave(event, exc.status, exc.comment)
        yield None, None  # pynetdicom answers at once; _annotate sets status and comment
        return
    if len(selected) == 0:
        # No sub-operations: pynetdicom answers Success without associating.
        yield address[0], address[1]
        yield 0
        return
    host, port = address
    # Noted in case the destination refuses the association (pynetdicom then
    # answers 0xA801 on its own, without a comment).
    server._notes.leave(
        event, None, f"Move destination {destination} at {host}:{port} refused the association"
    )
    opened: list[Any] = []  # the association pynetdicom opens to the destination

    def on_open(open_event: evt.Event) -> None:
        set_nodelay(open_event)
        opened.append(open_event.assoc)

    options: dict[str, Any] = {
        "contexts": _move_contexts(selected),
        "evt_handlers": [(evt.EVT_CONN_OPEN, on_open)],
    }
    tls = server._known_tls.get(destination)
    if tls is not None:
        options["tls_args"] = (tls, host)
    yield host, port, options
    yield len(selected)
    # pynetdicom sends each dataset with send_c_store on that association, whose
    # own pause check can let its reactor take the C-STORE response (see
    # pause_reactor): the sub-operation then fails although the object arrived.
    for status, ds in _sub_operations(event, selected):
        if ds is not None and opened:
            pause_reactor(opened[0])
        yield status, ds


# --- C-STORE and C-ECHO ---------------------------------------------------------------------


def handle_store(event: evt.Event, server: DemoPACS) -> int | Dataset:
    """File a C-STORE request (``evt.EVT_C_STORE``) under the server's folder.

    The encoded dataset is written as received (file meta added, pixel data never
    decoded) to ``<folder>/<StudyUID>/<SeriesUID>/<SOPUID>.dcm``, atomically, after
    each UID is checked against the UI grammar, so nothing is ever written outside
    the folder; then the instance is added to the index.

    Parameters
    ----------
    event : pynetdicom.events.Event
        The C-STORE request event.
    server : DemoPACS
        The server to store into (bound as an extra handler argument).

    Returns
    -------
    int or pydicom.dataset.Dataset
        ``0x0000`` on success; otherwise a failure status with an Error Comment:
        ``0xC000`` for an unreadable dataset or a UID that is not a valid UID,
        ``0xA900`` when SOPInstanceUID differs from the request's, ``0xA700`` when
        the file cannot be written.

    Examples
    --------
    >>> from pynetdicom import evt
    >>> server = DemoPACS("/tmp/nowhere")
    >>> handlers = [(evt.EVT_C_STORE, handle_store, [server])]
    """
    try:
        data = event.encoded_dataset()
    except (InvalidDicomError, ValueError, EOFError, OSError) as exc:
        LOGGER.info("C-STORE refused: unreadable dataset (%s)", exc)
        return _status(0xC000, f"the dataset could not be read: {exc}")
    expected = str(event.request.AffectedSOPInstanceUID).strip("\x00 ")
    try:
        stored = store_instance(server, data, sop_instance_uid=expected, what="C-STORE")
    except _Refused as exc:
        return _status(exc.status, exc.comment)
    LOGGER.info("C-STORE stored %s", stored.path)
    return 0x0000


@dataclass(frozen=True)
class Stored:
    """An instance :func:`store_instance` filed: its UIDs and where it was written."""

    sop_class_uid: str
    study_uid: str
    series_uid: str
    sop_instance_uid: str
    path: Path


def store_instance(
    server: DemoPACS,
    data: bytes,
    *,
    sop_instance_uid: str | None = None,
    study_uid: str | None = None,
    what: str = "store",
) -> Stored:
    """File one encoded instance under the server's folder and index it.

    ``data`` is a DICOM file (or, from C-STORE, the dataset with file meta added).
    It is written as received to ``<folder>/<StudyUID>/<SeriesUID>/<SOPUID>.dcm``,
    atomically (a temporary file, then ``os.replace``), after each UID has been
    checked against the UI grammar, so nothing is ever written outside the folder.
    C-STORE (:func:`handle_store`) and STOW-RS (:mod:`pacsframe.demo.web`) share it.

    Parameters
    ----------
    server : DemoPACS
        The server to store into.
    data : bytes
        The encoded instance.
    sop_instance_uid : str, optional
        The SOP Instance UID the request announced; the data must carry the same.
    study_uid : str, optional
        The study the request targets (STOW-RS ``POST /studies/{study}``); the
        data must belong to it.
    what : str
        The operation's name for the log.

    Returns
    -------
    Stored

    Raises
    ------
    _Refused
        With the failure status that C-STORE answers and STOW-RS reports as the
        FailureReason: ``0xC000`` for unreadable data or a UID that is not a valid
        UID, ``0xA900`` when a UID differs from the request's, ``0xA700`` when the
        file cannot be written.
    """
    try:
        ds = _read_header(BytesIO(data))
    except (InvalidDicomError, ValueError, EOFError, OSError) as exc:
        LOGGER.info("%s refused: unreadable dataset (%s)", what, exc)
        raise _Refused(0xC000, f"the dataset could not be read: {exc}") from None
    uids = {
        "StudyInstanceUID": _text_of(ds, _TAG_STUDY_UID),
        "SeriesInstanceUID": _text_of(ds, _TAG_SERIES_UID),
        "SOPInstanceUID": _text_of(ds, _TAG_SOP_UID),
    }
    for name, uid in uids.items():
        if not uid or not frames.is_uid(uid):
            LOGGER.warning("%s refused: %s %r is not a valid UID", what, name, uid)
            shown = repr(uid) if uid is None or len(uid) <= 20 else repr(uid[:17] + "...")
            raise _Refused(0xC000, f"{name} is not a valid UID: {shown}")
    if sop_instance_uid is not None and uids["SOPInstanceUID"] != sop_instance_uid:
        raise _Refused(0xA900, "SOPInstanceUID differs from Affected SOP Instance UID")
    if study_uid is not None and uids["StudyInstanceUID"] != study_uid:
        raise _Refused(0xA900, "StudyInstanceUID differs from the study in the request")
    folder = server.folder.resolve()
    path = folder / uids["StudyInstanceUID"] / uids["SeriesInstanceUID"]
    path = path / f"{uids['SOPInstanceUID']}.dcm"
    if not path.resolve().is_relative_to(folder):  # defence in depth after the UID check
        raise _Refused(0xC000, "refusing to write outside the storage folder")
    try:
        atomic_write(path, data)
    except OSError as exc:
        LOGGER.error("%s could not write %s: %s", what, path, exc)
        raise _Refused(0xA700, f"out of resources: {exc.strerror or exc}") from None
    server._index.add(ds, str(path))
    return Stored(
        _text_of(ds, 0x00080016) or "",
        uids["StudyInstanceUID"],
        uids["SeriesInstanceUID"],
        uids["SOPInstanceUID"],
        path,
    )


def handle_echo(event: evt.Event) -> int:
    """Answer a C-ECHO request (``evt.EVT_C_ECHO``) with Success (``0x0000``).

    Examples
    --------
    >>> from pynetdicom import evt
    >>> handlers = [(evt.EVT_C_ECHO, handle_echo)]
    """
    LOGGER.debug("C-ECHO from %s", event.assoc.requestor.ae_title)
    return 0x0000


# --- the server ----------------------------------------------------------------------------


def _server_tls_context(
    tls: TLS | ssl.SSLContext | None, require_client_cert: bool | None
) -> ssl.SSLContext | None:
    """The server-side context for ``DemoPACS(tls=...)``, or a QueryError."""
    if tls is None:
        if require_client_cert:
            raise QueryError(
                "require_client_cert=True needs tls=pacsframe.TLS(ca=..., cert=..., key=...)."
            )
        return None
    if isinstance(tls, TLS):
        return tls.server_context(require_client_cert)
    if isinstance(tls, ssl.SSLContext):
        if tls.protocol == ssl.PROTOCOL_TLS_CLIENT:
            raise QueryError(
                "tls= is a client-side ssl.SSLContext; give a server one "
                "(ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER) with load_cert_chain), or "
                "pacsframe.TLS(cert=..., key=...)."
            )
        if require_client_cert is not None:
            raise QueryError(
                "require_client_cert applies to tls=pacsframe.TLS(...); with an "
                "ssl.SSLContext set its verify_mode instead."
            )
        return tls
    raise QueryError(f"tls={tls!r} must be a pacsframe.TLS, an ssl.SSLContext or None.")


class DemoPACS:
    """A DICOM server over a folder of DICOM files, for demos, notebooks and tests.

    Parameters
    ----------
    folder : str or os.PathLike
        The folder to serve; created when missing. Every ``*.dcm`` under it is
        indexed on :meth:`start`, and C-STORE writes into it.
    ae_title : str, default "PFDEMO"
        The server's AE title (also returned as RetrieveAETitle).
    host : str, default "127.0.0.1"
        The address to listen on.
    port : int, default 0
        The TCP port; 0 picks a free one, readable from :attr:`port` after start.
    known_aes : mapping of str to (host, port), optional
        The valid C-MOVE destinations, by AE title; more can be added while the
        server runs with :meth:`add_known_ae`.
    max_associations : int, default 64
        Associations served at once; more are rejected as transient ("local
        limit exceeded"), as a busy PACS does.
    tls : pacsframe.TLS or ssl.SSLContext, optional
        Speak only DICOM TLS: a :class:`~pacsframe.TLS` with the server's
        ``cert`` and ``key`` (and ``ca`` to verify client certificates), or a
        server-side ``ssl.SSLContext`` used as given.
    require_client_cert : bool, optional
        With a :class:`~pacsframe.TLS`: refuse clients without a certificate
        signed by ``tls.ca``. Default: True when ``tls.ca`` is given.
    max_results : int, optional
        Cap every C-FIND answer as Orthanc's ``LimitFindResults`` does: past this
        many matches, send that many and end with an unsolicited 0xFE00. For
        showing and testing how clients cope with a capped PACS; may be changed
        while the server runs. QIDO-RS answers are capped too (see
        ``qido_cap_warning``).
    http_port : int, optional
        Also serve DICOMweb (QIDO-RS, WADO-RS, STOW-RS; :mod:`pacsframe.demo.web`)
        over HTTP on 127.0.0.1 at this port (0 picks a free one), from the same
        index and matching engine; :attr:`url` gives the base URL once started.
        Loopback only, whatever ``host`` is.
    http_auth : (str, str), optional
        A (user, password) pair every HTTP request must carry as basic
        authorization; without it the answer is 401. May be changed while the
        server runs.
    qido_cap_warning : bool, default True
        With ``max_results``: a capped QIDO-RS answer carries PS3.18's
        ``Warning: 299 ... "There are N additional results that can be
        requested"`` header; False cuts silently, as Orthanc 1.7's plugin does.
        May be changed while the server runs.
    max_upload : int, optional
        The largest STOW-RS request body in bytes (larger ones are answered
        413); default 512 MiB. May be changed while the server runs.
    worklist : iterable of pydicom.dataset.Dataset, str or os.PathLike, optional
        What Modality Worklist C-FIND requests are answered from: worklist
        entries, or a folder whose ``*.wl`` files are read at each request.
        Default: the demo worklist (:func:`pacsframe.demo.worklist.make_worklist`:
        5 synthetic patients, 7 steps on 2026-03-02 and 2026-03-03); ``[]`` for
        none. ``max_results`` caps these answers too.

    Examples
    --------
    >>> import tempfile
    >>> from pynetdicom import AE
    >>> from pynetdicom.sop_class import Verification
    >>> with tempfile.TemporaryDirectory() as folder, DemoPACS(folder) as server:
    ...     ae = AE(ae_title="DOCTEST")
    ...     _ = ae.add_requested_context(Verification)
    ...     assoc = ae.associate("127.0.0.1", server.port, ae_title=server.ae_title)
    ...     status = assoc.send_c_echo()
    ...     assoc.release()
    >>> hex(status.Status)
    '0x0'
    """

    def __init__(
        self,
        folder: str | os.PathLike[str],
        *,
        ae_title: str = "PFDEMO",
        host: str = "127.0.0.1",
        port: int = 0,
        known_aes: Mapping[str, tuple[str, int]] | None = None,
        max_associations: int = 64,
        tls: TLS | ssl.SSLContext | None = None,
        require_client_cert: bool | None = None,
        max_results: int | None = None,
        http_port: int | None = None,
        http_auth: tuple[str, str] | None = None,
        qido_cap_warning: bool = True,
        max_upload: int | None = None,
        worklist: Iterable[Dataset] | str | os.PathLike[str] | None = None,
    ) -> None:
        self.worklist = Worklist(worklist)
        if http_port is not None and not 0 <= int(http_port) < 65536:
            raise ValueError(f"http_port must be 0 to 65535, or None; got {http_port}.")
        if http_auth is not None and (
            len(http_auth) != 2 or not all(isinstance(p, str) for p in http_auth)
        ):
            raise QueryError("http_auth must be a (user, password) pair of strings, or None.")
        self.http_port = None if http_port is None else int(http_port)
        self.http_auth = None if http_auth is None else (http_auth[0], http_auth[1])
        self.qido_cap_warning = bool(qido_cap_warning)
        self.max_upload = web.DEFAULT_MAX_UPLOAD if max_upload is None else int(max_upload)
        self._web: web.WebServer | None = None
        if max_results is not None and (
            not isinstance(max_results, int) or isinstance(max_results, bool) or max_results < 1
        ):
            raise QueryError(f"max_results={max_results!r} must be a whole number >= 1, or None.")
        self.max_results = max_results
        self.folder = Path(folder)
        self.tls = tls
        self._ssl_context = _server_tls_context(tls, require_client_cert)
        self._known_tls: dict[str, ssl.SSLContext] = {}
        self.max_associations = int(max_associations)
        self.ae_title = check_ae_title(ae_title, "ae_title")
        self.host = host
        self.port = int(port)
        self.known_aes: dict[str, tuple[str, int]] = {}
        for aet, (ae_host, ae_port) in (known_aes or {}).items():
            self.add_known_ae(aet, ae_host, ae_port)
        self._ae: AE | None = None
        self._server: Any = None
        self._index = _Index()
        self._notes = _Notes()

    def __repr__(self) -> str:
        state = f"listening on {self.host}:{self.port}" if self.running else "stopped"
        if self.running and self._ssl_context is not None:
            state += " (TLS)"
        if self.url is not None:
            state += f", DICOMweb at {self.url}"
        return (
            f"DemoPACS({self.ae_title!r}, {state}, folder={str(self.folder)!r}, "
            f"{len(self._index.instances())} instances)"
        )

    def __enter__(self) -> DemoPACS:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def url(self) -> str | None:
        """The DICOMweb base URL, ``http://127.0.0.1:<port>/dicom-web``, while serving HTTP.

        None when the server is stopped or was made without ``http_port``.
        """
        return self._web.url if self._web is not None else None

    @property
    def running(self) -> bool:
        """True between :meth:`start` and :meth:`stop`."""
        return self._server is not None

    def add_known_ae(
        self, ae_title: str, host: str, port: int, *, tls: TLS | ssl.SSLContext | None = None
    ) -> None:
        """Register (or replace) a C-MOVE destination; takes effect at once.

        Parameters
        ----------
        ae_title : str
            The destination's AE title, as C-MOVE requests name it.
        host : str
            Its address.
        port : int
            Its port.
        tls : pacsframe.TLS or ssl.SSLContext, optional
            Deliver over DICOM TLS: the CA that signed the destination's
            certificate, and the certificate we present (a client-side context).

        Examples
        --------
        >>> server = DemoPACS("/tmp/nowhere")
        >>> server.add_known_ae("STORESCP", "127.0.0.1", 11113)
        >>> server.known_aes["STORESCP"]
        ('127.0.0.1', 11113)
        """
        title = check_ae_title(ae_title, "ae_title")
        port = int(port)
        if not 0 < port < 65536:
            raise ValueError(f"port must be 1 to 65535, got {port}.")
        context = tls.client_context() if isinstance(tls, TLS) else tls
        if context is not None and not isinstance(context, ssl.SSLContext):
            raise QueryError(f"tls={tls!r} must be a pacsframe.TLS, an ssl.SSLContext or None.")
        if context is None:
            self._known_tls.pop(title, None)
        else:
            self._known_tls[title] = context
        # One assignment: handlers on other threads see the old entry or the new one.
        self.known_aes[title] = (str(host), port)

    def instances(self) -> pd.DataFrame:
        """The typed instance-level frame (one row per indexed file, plus ``path``).

        Examples
        --------
        >>> import tempfile
        >>> with tempfile.TemporaryDirectory() as folder:
        ...     DemoPACS(folder).start().stop().instances().shape[0]
        0
        """
        return self._index.instances().copy()

    def start(self) -> DemoPACS:
        """Index the folder and start listening; return ``self``. Idempotent."""
        if self.running:
            return self
        self.folder.mkdir(parents=True, exist_ok=True)
        index = _Index()
        count = index.scan(self.folder)
        self._index = index
        ae = AE(ae_title=self.ae_title)
        ae.maximum_associations = self.max_associations
        ae.add_supported_context(Verification)
        for model in (*_MODELS, *_RETRIEVE_MODELS, ModalityWorklistInformationFind):
            ae.add_supported_context(model)
        # The acceptor's order decides which proposed syntax is accepted. Explicit VR
        # Little Endian first: it is what most files (and the demo cohort) are
        # stored in, so C-GET sends them as stored and C-STORE keeps the VRs.
        syntaxes = list(dict.fromkeys([ExplicitVRLittleEndian, *ALL_TRANSFER_SYNTAXES]))
        for context in AllStoragePresentationContexts:
            # Accepting the SCP role the requestor proposes is what lets C-GET send
            # C-STOREs back on the same association.
            ae.add_supported_context(
                context.abstract_syntax, syntaxes, scu_role=True, scp_role=True
            )
        handlers = [
            (evt.EVT_CONN_OPEN, set_nodelay),
            (evt.EVT_DIMSE_SENT, _annotate, [self]),
            (evt.EVT_C_ECHO, handle_echo),
            (evt.EVT_C_FIND, handle_find, [self]),
            (evt.EVT_C_GET, handle_get, [self]),
            (evt.EVT_C_MOVE, handle_move, [self]),
            (evt.EVT_C_STORE, handle_store, [self]),
        ]
        ssl_context = None
        if self._ssl_context is not None:
            ssl_context = BoundedHandshake(self._ssl_context)
        self._server = ae.start_server(
            (self.host, self.port), block=False, evt_handlers=handlers, ssl_context=ssl_context
        )
        self._ae = ae
        self.port = int(self._server.server_address[1])
        if self.http_port is not None:
            try:
                self._web = web.WebServer(self, self.http_port).start()
            except BaseException:
                self.stop()
                raise
            self.http_port = self._web.port
        LOGGER.info(
            "Demo PACS %r serving %d instance(s) from %s on %s:%d%s",
            self.ae_title,
            count,
            self.folder,
            self.host,
            self.port,
            " (TLS)" if ssl_context is not None else "",
        )
        if self._web is not None:
            LOGGER.info("Demo PACS %r serving DICOMweb at %s", self.ae_title, self.url)
        return self

    def stop(self) -> DemoPACS:
        """Stop listening and abort open associations; return ``self``. Idempotent."""
        ae, self._ae, self._server = self._ae, None, None
        site, self._web = self._web, None
        if site is not None:
            site.stop()
        if ae is not None:
            ae.shutdown()
        return self


def serve(
    folder: str | os.PathLike[str],
    *,
    ae_title: str = "PFDEMO",
    host: str = "127.0.0.1",
    port: int = 11112,
    known_aes: Mapping[str, tuple[str, int]] | None = None,
    tls: TLS | ssl.SSLContext | None = None,
    require_client_cert: bool | None = None,
    max_results: int | None = None,
    http_port: int | None = None,
    worklist: Iterable[Dataset] | str | os.PathLike[str] | None = None,
) -> None:
    """Serve ``folder`` as a demo PACS until interrupted (Ctrl-C), then shut down.

    Blocks the calling thread. The KeyboardInterrupt propagates after the server
    has stopped, so a command line can exit with the conventional status.

    Parameters
    ----------
    folder : str or os.PathLike
        The folder of DICOM files to serve (created when missing).
    ae_title, host, port, known_aes, tls, require_client_cert, max_results, http_port, worklist
        As for :class:`DemoPACS`; the port defaults to 11112 here. With
        ``http_port`` DICOMweb is served too (on 127.0.0.1, see :attr:`DemoPACS.url`).

    Examples
    --------
    It blocks, so run it from a script or use ``pacsframe serve ./dicom``::

        from pacsframe.demo import serve
        serve("./dicom", port=11112)  # Ctrl-C stops it
    """
    server = DemoPACS(
        folder,
        ae_title=ae_title,
        host=host,
        port=port,
        known_aes=known_aes,
        tls=tls,
        require_client_cert=require_client_cert,
        max_results=max_results,
        http_port=http_port,
        worklist=worklist,
    )
    with server:
        # Waiting on an Event (not a sleep loop) keeps the main thread interruptible.
        threading.Event().wait()
