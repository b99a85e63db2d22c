"""DICOMweb for the demo PACS: QIDO-RS, WADO-RS and STOW-RS over HTTP on loopback.

:class:`WebServer` runs a :class:`http.server.ThreadingHTTPServer` in a daemon
thread beside a :class:`~pacsframe.demo.DemoPACS` (``DemoPACS(..., http_port=0)``)
and answers from the same index and the same matching engine
(:func:`pacsframe.matching.match`) as its C-FIND, so a QIDO-RS search and a C-FIND
with the same keys find the same rows. Its base URL is
``http://127.0.0.1:<port>/dicom-web``; it listens on loopback only (plain HTTP,
and basic auth in clear, are for a machine's own tests and notebooks).

Resources (PS3.18), below the base URL:

* **QIDO-RS** ``GET /studies``, ``/series``, ``/instances``,
  ``/studies/{study}/series``, ``/studies/{study}/instances``,
  ``/studies/{study}/series/{series}/instances``. Query parameters name
  attributes by keyword or tag (``PatientID=...``, ``00100020=...``) with values
  in DICOM string form (wildcards, ``20260301-20260406`` ranges, UID lists
  separated by ``\\`` or ``,``); ``includefield`` (keywords or tags, repeated or
  comma-separated, or ``all``), ``limit``, ``offset`` and ``fuzzymatching``
  (accepted, ignored). The answer is ``application/dicom+json`` (PS3.18 F.2)
  with the level's default attributes (PS3.18 Table 6.7.1-2, -2a, -2b, those the
  index holds; a search for all series or all instances adds the study's and
  series' ones), the matching keys, the included fields and RetrieveURL. No match
  is ``204 No Content``; a bad parameter ``400`` with a text body. Text is
  Unicode in JSON, so SpecificCharacterSet is always ``ISO_IR 192``.
* **WADO-RS** ``GET /studies/{study}``, ``/studies/{study}/series/{series}``,
  ``/studies/{study}/series/{series}/instances/{sop}``: the files as stored, as a
  ``multipart/related; type="application/dicom"`` body streamed from disk with a
  precomputed Content-Length, one part per instance with its
  ``Content-Type: application/dicom; transfer-syntax=<the file's>``,
  ``Content-Location`` and ``Content-Length``. Accepted: no Accept header,
  ``*/*``, or ``multipart/related`` with ``type="application/dicom"`` and
  ``transfer-syntax=*`` or no transfer-syntax (both served as stored: the demo
  never transcodes, unlike Orthanc, which transcodes to Explicit VR Little
  Endian when no transfer-syntax is asked for), or a transfer-syntax every
  selected file already has. Anything else is ``406``; an unknown UID ``404``.
  ``.../metadata`` at the same three levels answers the instances' DICOM JSON
  without pixel data (bulk data elements as BulkDataURI, which this server does
  not serve).
* **STOW-RS** ``POST /studies`` and ``/studies/{study}`` with a
  ``multipart/related; type="application/dicom"`` body (Content-Length or
  chunked, at most ``max_upload`` bytes, else ``413``). Each part is filed by
  :func:`pacsframe.demo.server.store_instance`, the code C-STORE uses (UIDs
  checked against the UI grammar before they become path parts, atomic write,
  indexed at once). The answer lists ReferencedSOPSequence (with RetrieveURL) and
  FailedSOPSequence (with FailureReason): ``200`` when every part was stored,
  ``202`` when some failed (PS3.18 10.5.3), ``409`` when all failed. (Orthanc
  answers ``409`` for a partial failure too; clients must read the sequences.)

With ``http_auth=(user, password)`` every request needs that HTTP basic
authorization, else ``401``.

A server with ``max_results`` answers a QIDO-RS search as a capped archive does:
of the matches after ``offset`` (and within ``limit``), the first ``max_results``;
with ``qido_cap_warning=True`` (the default, PS3.18 8.3.4.1) it adds
``Warning: 299 <host:port>: "There are N additional results that can be
requested"``, N counting every further match after this page; with
``qido_cap_warning=False`` it cuts silently, as Orthanc 1.7's plugin does with
``LimitFindResults`` (Orthanc applies its cap before ``offset``; this server
applies it after, as PS3.18 intends, so paging with ``offset`` always works).

For tests, a ``wado_fault`` attribute set on the :class:`~pacsframe.demo.DemoPACS`
(``fault(content_type, body) -> (content_type, body, announced_length)``) sees
each WADO-RS answer whole and may change it: another boundary, a body without its
closing boundary, or one shorter than its Content-Length (the connection is then
closed: a transfer dropped mid-body).

Logs name methods, paths (UIDs) and counts, never query strings: they carry
patient identifiers.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import hmac
import json
import logging
import math
import re
import socket
import threading
import uuid
from collections.abc import Iterable, Mapping
from email.message import Message
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from io import BytesIO
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qsl, unquote, urlsplit

import numpy as np
import pandas as pd
from pydicom import datadict, dcmread
from pydicom.errors import InvalidDicomError

from .. import frames, matching
from ..errors import QueryError

if TYPE_CHECKING:
    from .server import DemoPACS, _View

__all__ = ["DEFAULT_MAX_UPLOAD", "ROOT", "WebServer"]

LOGGER = logging.getLogger(__name__)

#: The path of the DICOMweb service below the server's origin.
ROOT = "/dicom-web"
#: The largest STOW-RS request body accepted by default (bytes).
DEFAULT_MAX_UPLOAD = 512 * 2**20

_JSON = "application/dicom+json"
_UTF8 = "ISO_IR 192"
_CHUNK = 1 << 20

# PS3.18 Table 6.7.1-2, -2a and -2b: the attributes a QIDO-RS answer carries by
# default (those the index holds), plus the UIDs a client needs to drill down.
_STUDY_DEFAULTS = (
    "SpecificCharacterSet",
    "StudyDate",
    "StudyTime",
    "AccessionNumber",
    "ModalitiesInStudy",
    "ReferringPhysicianName",
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientSex",
    "StudyInstanceUID",
    "StudyID",
    "NumberOfStudyRelatedSeries",
    "NumberOfStudyRelatedInstances",
)
_SERIES_DEFAULTS = (
    "SpecificCharacterSet",
    "StudyInstanceUID",
    "Modality",
    "SeriesDescription",
    "SeriesInstanceUID",
    "SeriesNumber",
    "NumberOfSeriesRelatedInstances",
)
_INSTANCE_DEFAULTS = (
    "SpecificCharacterSet",
    "StudyInstanceUID",
    "SeriesInstanceUID",
    "SOPClassUID",
    "SOPInstanceUID",
    "InstanceNumber",
    "Rows",
    "Columns",
    "BitsAllocated",
    "NumberOfFrames",
)
_KEYWORDS = frozenset(
    k for level in matching.LEVEL_KEYWORDS.values() for k in level
)  # the DICOM columns of the index's views
_TAG_RE = re.compile(r"[0-9A-Fa-f]{8}")
_TAG_RETRIEVE_URL = "00081190"
_SINGLE_VALUE_VRS = frozenset({"ST", "LT", "UT", "UR"})
_QUERY_REDACT = re.compile(r"\?\S*")


class HTTPError(Exception):
    """A request answered with an error status and a one-line text body."""

    def __init__(self, status: int, message: str, headers: Mapping[str, str] | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = dict(headers or {})


# --- QIDO-RS -------------------------------------------------------------------------------


def _keyword(name: str) -> frames.Attribute:
    """The attribute a query parameter names, by keyword or by tag (``00100020``)."""
    if "." in name:
        raise HTTPError(400, f"{name}: sequence matching is not supported.")
    if _TAG_RE.fullmatch(name):
        keyword = datadict.keyword_for_tag(int(name, 16)) if int(name[:4], 16) % 2 == 0 else ""
        if not keyword:
            raise HTTPError(400, f"{name} is not a tag of the DICOM data dictionary.")
        name = keyword
    try:
        return frames.attribute(name)
    except QueryError as exc:
        raise HTTPError(400, str(exc)) from None


class _Search:
    """A parsed QIDO-RS query string."""

    def __init__(self, query: str) -> None:
        self.keys: dict[str, str] = {}
        self.include: list[str] = []
        self.include_all = False
        self.limit: int | None = None
        self.offset = 0
        try:
            pairs = parse_qsl(query, keep_blank_values=True, strict_parsing=False)
        except ValueError as exc:
            raise HTTPError(400, f"the query string cannot be read: {exc}") from None
        for name, value in pairs:
            if name == "includefield":
                for item in value.split(","):
                    item = item.strip()
                    if item.lower() == "all":
                        self.include_all = True
                    elif item:
                        self.include.append(_keyword(item).keyword)
            elif name in ("limit", "offset"):
                number = int(value) if value.isdigit() else -1
                if number < (1 if name == "limit" else 0):
                    lowest = 1 if name == "limit" else 0
                    raise HTTPError(400, f"{name}={value!r} must be a whole number >= {lowest}.")
                if name == "limit":
                    self.limit = number
                else:
                    self.offset = number
            elif name == "fuzzymatching":
                if value.lower() not in ("true", "false"):
                    raise HTTPError(400, f"fuzzymatching={value!r} must be true or false.")
            else:
                attr = _keyword(name)
                if attr.vr == "UI":
                    value = value.replace(",", "\\")  # PS3.18 8.3.4.1: UID lists
                old = self.keys.get(attr.keyword)
                self.keys[attr.keyword] = value if old is None else f"{old}\\{value}"


def _json_value(text: str, vr: str) -> Any:
    if not text:
        return None
    if vr == "PN":
        groups = text.split("=")
        return {
            name: group
            for name, group in zip(("Alphabetic", "Ideographic", "Phonetic"), groups, strict=False)
            if group
        }
    if vr in frames.INT_VRS:
        try:
            return int(text)
        except ValueError:
            number = float(text)
    elif vr in frames.FLOAT_VRS:
        number = float(text)
    else:
        return text
    if not math.isfinite(number):
        return None
    return int(number) if number.is_integer() and vr not in frames.BINARY_FLOAT_VRS else number


def element(text: str, attr: frames.Attribute) -> dict[str, Any]:
    """One attribute in DICOM JSON (PS3.18 F.2) from its DICOM string form.

    Examples
    --------
    >>> element("Smith^John", frames.attribute("PatientName"))
    {'vr': 'PN', 'Value': [{'Alphabetic': 'Smith^John'}]}
    >>> element("CT\\\\MR", frames.attribute("ModalitiesInStudy"))
    {'vr': 'CS', 'Value': ['CT', 'MR']}
    >>> element("", frames.attribute("StudyDate"))
    {'vr': 'DA'}
    >>> element("2.5", frames.attribute("SliceThickness"))
    {'vr': 'DS', 'Value': [2.5]}
    """
    if not text:
        return {"vr": attr.vr}
    parts = [text] if attr.vr in _SINGLE_VALUE_VRS or not attr.multivalued else text.split("\\")
    return {"vr": attr.vr, "Value": [_json_value(p, attr.vr) for p in parts]}


def _retrieve_url(base: str, study: str, series: str | None = None, sop: str | None = None) -> str:
    url = f"{base}/studies/{study}"
    if series is not None:
        url += f"/series/{series}"
        if sop is not None:
            url += f"/instances/{sop}"
    return url


def _members(view: _View, attr: frames.Attribute, level: str, base: str) -> list[str]:
    """Each row's ``"tag": {...}`` JSON member for one column, made once per view."""
    tag = f"{attr.tag:08X}"
    name = f"{tag} {base}" if tag == _TAG_RETRIEVE_URL else tag
    cached = view.json.get(name)
    if cached is not None:
        return cached
    size = len(view.frame)
    if attr.keyword == "SpecificCharacterSet":
        # JSON text is Unicode, whatever character set the files were written in.
        texts = [_UTF8] * size
    elif attr.keyword == "RetrieveURL":
        depth = {"STUDY": 1, "SERIES": 2}.get(level, 3)
        keys = ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID")[:depth]
        uids = [view.strings(k) or [""] * size for k in keys]
        texts = [_retrieve_url(base, *row) for row in zip(*uids, strict=True)]
    else:
        texts = view.strings(attr.keyword) or [""] * size
    cached = [
        f'"{tag}":' + json.dumps(element(text, attr), ensure_ascii=False, allow_nan=False)
        for text in texts
    ]
    view.json[name] = cached
    return cached


def search(
    pacs: DemoPACS, level: str, path_keys: Mapping[str, str], query: str, base: str
) -> tuple[bytes, int, int]:
    """Answer one QIDO-RS search.

    Returns
    -------
    (bytes, int, int)
        The DICOM JSON body (a UTF-8 array), how many rows it holds, and how many
        further matches a capped answer left out.

    Raises
    ------
    HTTPError
        400 for a bad parameter or value.
    """
    request = _Search(query)
    # Wide views: a series or instance search may match on its study's attributes too.
    view = pacs._index.view(level, wide=True)
    frame = view.frame
    try:
        mask = matching.match(frame, request.keys).to_numpy()
        if path_keys:
            mask = mask & matching.match(frame, dict(path_keys)).to_numpy()
    except QueryError as exc:
        raise HTTPError(400, str(exc)) from None
    rows = np.flatnonzero(mask)[request.offset :]
    wanted = rows if request.limit is None else rows[: request.limit]
    cap = pacs.max_results
    sent = wanted if cap is None else wanted[:cap]
    more = len(rows) - len(sent) if cap is not None and len(wanted) > cap else 0
    LOGGER.info("QIDO-RS %s level: %d match(es), %d sent", level, len(rows), len(sent))

    if level == "STUDY":
        defaults: tuple[str, ...] = _STUDY_DEFAULTS
    elif level == "SERIES":
        defaults = _SERIES_DEFAULTS + (() if path_keys else _STUDY_DEFAULTS)
    else:
        defaults = _INSTANCE_DEFAULTS
        if "SeriesInstanceUID" not in path_keys:
            defaults += _SERIES_DEFAULTS
        if "StudyInstanceUID" not in path_keys:
            defaults += _STUDY_DEFAULTS
    held = set(frame.columns)
    keywords = [k for k in defaults if k in held]
    keywords += [*request.keys, "RetrieveURL"]
    if request.include_all:  # every DICOM column of the view (not the file's path)
        keywords += [k for k in frame.columns if k in _KEYWORDS]
    else:
        keywords += request.include
    attrs = sorted({frames.attribute(k) for k in keywords}, key=lambda a: a.tag)
    columns = [_members(view, a, level, base) for a in attrs]
    body = ",".join("{" + ",".join(c[row] for c in columns) + "}" for row in sent.tolist())
    return ("[" + body + "]").encode("utf-8"), len(sent), more


# --- WADO-RS -------------------------------------------------------------------------------


def _media_ranges(accept: str) -> list[Message]:
    ranges = []
    for text in accept.split(","):
        if text.strip():
            message = Message()
            message["content-type"] = text.strip()
            ranges.append(message)
    return ranges


def _wado_syntax_ok(accept: str | None, syntaxes: Iterable[str]) -> bool:
    """True when ``accept`` admits the files' own transfer syntaxes (see the module doc)."""
    if not accept:
        return True
    stored = set(syntaxes)
    for media in _media_ranges(accept):
        ctype = media.get_content_type()
        if ctype in ("*/*", "multipart/*"):
            return True
        if ctype != "multipart/related":
            continue
        kind = media.get_param("type")
        if kind not in (None, "application/dicom"):
            continue
        syntax = media.get_param("transfer-syntax")
        if syntax in (None, "*") or stored <= {syntax}:
            return True
    return False


def _json_accepted(accept: str | None) -> bool:
    if not accept:
        return True
    return any(
        m.get_content_type() in (_JSON, "application/json", "application/*", "*/*")
        for m in _media_ranges(accept)
    )


def select(pacs: DemoPACS, keys: Mapping[str, str]) -> pd.DataFrame:
    """The indexed instances with exactly these UIDs, in index order."""
    instances = pacs._index.instances()
    mask = np.ones(len(instances), dtype=bool)
    for keyword, uid in keys.items():
        mask &= (instances[keyword] == uid).fillna(False).to_numpy(dtype=bool)
    return instances.loc[
        mask,
        ["StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "path", "transfer_syntax"],
    ].reset_index(drop=True)


# --- STOW-RS -------------------------------------------------------------------------------


def split_multipart(body: bytes, boundary: str) -> list[tuple[Message, bytes]]:
    """The parts of a ``multipart/*`` body (RFC 2046): their headers and content.

    Raises
    ------
    HTTPError
        400 when the body has no closing delimiter.
    """
    delimiter = b"\r\n--" + boundary.encode("latin-1")
    sections = (b"\r\n" + body).split(delimiter)
    if len(sections) < 2 or not sections[-1].startswith(b"--"):
        raise HTTPError(400, "the multipart body has no closing boundary delimiter.")
    parts = []
    for section in sections[1:-1]:
        head, sep, content = section.partition(b"\r\n\r\n")
        if not sep:
            raise HTTPError(400, "a multipart part has no blank line after its headers.")
        message = Message()
        for line in head.split(b"\r\n")[1:]:  # the first is the delimiter's line end
            name, colon, value = line.decode("latin-1").partition(":")
            if colon:
                message[name.strip()] = value.strip()
        parts.append((message, content))
    return parts


def _referenced_uids(data: bytes) -> dict[str, Any]:
    """SOP Class and Instance UIDs of a part, where readable and valid, for FailedSOP."""
    try:
        ds = dcmread(
            BytesIO(data), stop_before_pixels=True, specific_tags=[0x00080016, 0x00080018]
        )
    except Exception:
        return {}
    out: dict[str, Any] = {}
    for tag, ref in ((0x00080016, "00081150"), (0x00080018, "00081155")):
        raw = ds.get_item(tag)  # raw bytes: no pydicom validation warning for a bad UID
        value = raw.value if raw is not None else b""
        if isinstance(value, bytes):
            value = value.decode("ascii", errors="replace")
        value = str(value or "").strip("\x00 ")
        if frames.is_uid(value):
            out[ref] = {"vr": "UI", "Value": [value]}
    return out


# --- the HTTP server -----------------------------------------------------------------------


class _HTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    web: WebServer

    def handle_error(self, request: Any, client_address: Any) -> None:
        # A client that went away, or a connection closed by stop(): not worth a traceback.
        LOGGER.debug("HTTP connection from %s ended with an error", client_address, exc_info=True)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "pacsframe-demo"
    timeout = 60  # idle keep-alive connections end after this many seconds
    server: _HTTPServer

    # --- plumbing ---

    def setup(self) -> None:
        super().setup()
        # Small writes (part headers between files) must not wait for delayed ACKs.
        with contextlib.suppress(OSError):
            self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.server.web._track(self.connection, True)

    def finish(self) -> None:
        try:
            super().finish()
        finally:
            self.server.web._track(self.connection, False)

    def log_message(self, format: str, *args: Any) -> None:
        # Query strings carry patient identifiers; paths carry UIDs only.
        LOGGER.debug("HTTP " + format, *(_QUERY_REDACT.sub("?...", str(a)) for a in args))

    def _send(
        self,
        status: int,
        body: bytes = b"",
        content_type: str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        self.send_response(status)
        if content_type:
            self.send_header("Content-Type", content_type)
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if body and self.command != "HEAD":
            self.wfile.write(body)

    def _send_json(
        self, status: int, value: Any, headers: Mapping[str, str] | None = None
    ) -> None:
        body = json.dumps(value, ensure_ascii=False, allow_nan=False).encode("utf-8")
        self._send(status, body, _JSON, headers)

    def do_GET(self) -> None:
        self._dispatch()

    def do_POST(self) -> None:
        self._dispatch()

    def _dispatch(self) -> None:
        web = self.server.web
        self._body_read = self.command != "POST"
        self._streaming = False  # True once a streamed body's headers are out
        try:
            self._authorize(web.pacs.http_auth)
            url = urlsplit(self.path)
            if url.path != ROOT and not url.path.startswith(ROOT + "/"):
                raise HTTPError(404, f"no resource here; the DICOMweb service is at {ROOT}")
            parts = [unquote(p) for p in url.path[len(ROOT) :].split("/") if p]
            if self.command == "POST":
                self._stow(parts)
            else:
                self._get(parts, url.query)
        except HTTPError as exc:
            if not self._body_read:
                self.close_connection = True  # the unread body would be taken for a request
            body = (exc.message.rstrip() + "\n").encode("utf-8")
            self._send(exc.status, body, "text/plain; charset=utf-8", exc.headers)
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True
        except Exception as exc:
            LOGGER.exception("DICOMweb request failed")
            self.close_connection = True
            if not self._streaming:  # else the client sees a body shorter than announced
                self._send(500, f"internal error: {type(exc).__name__}\n".encode(), "text/plain")

    def _authorize(self, auth: tuple[str, str] | None) -> None:
        if auth is None:
            return
        header = self.headers.get("Authorization", "")
        scheme, _, token = header.partition(" ")
        try:
            given = base64.b64decode(token.strip(), validate=True)
        except (binascii.Error, ValueError):
            given = b""
        expected = f"{auth[0]}:{auth[1]}".encode()
        if scheme.lower() != "basic" or not hmac.compare_digest(given, expected):
            raise HTTPError(
                401,
                "authentication required",
                {"WWW-Authenticate": 'Basic realm="pacsframe demo", charset="UTF-8"'},
            )

    @property
    def _base(self) -> str:
        return self.server.web.url

    # --- GET ---

    def _get(self, parts: list[str], query: str) -> None:
        n = len(parts)
        if n == 1 and parts[0] in ("studies", "series", "instances"):
            level = {"studies": "STUDY", "series": "SERIES", "instances": "IMAGE"}[parts[0]]
            return self._qido(level, {}, query)
        if n < 2 or parts[0] != "studies":
            raise HTTPError(404, "unknown resource")
        keys = {"StudyInstanceUID": parts[1]}
        rest = parts[2:]
        if rest[:1] == ["series"] and len(rest) >= 2:
            keys["SeriesInstanceUID"] = rest[1]
            rest = rest[2:]
            if rest[:1] == ["instances"] and len(rest) >= 2:
                keys["SOPInstanceUID"] = rest[1]
                rest = rest[2:]
        for keyword, uid in keys.items():
            if not frames.is_uid(uid):
                raise HTTPError(400, f"{keyword} {uid[:70]!r} is not a valid UID.")
        if rest == ["series"] and len(keys) == 1:
            return self._qido("SERIES", keys, query)
        if rest == ["instances"] and len(keys) < 3:
            return self._qido("IMAGE", keys, query)
        if rest == ["metadata"]:
            return self._metadata(keys)
        if not rest:
            return self._wado(keys)
        raise HTTPError(404, "unknown resource")

    def _qido(self, level: str, keys: dict[str, str], query: str) -> None:
        if not _json_accepted(self.headers.get("Accept")):
            raise HTTPError(406, f"QIDO-RS answers {_JSON} only.")
        web = self.server.web
        body, count, more = search(web.pacs, level, keys, query, self._base)
        headers = {}
        if more and getattr(web.pacs, "qido_cap_warning", True):
            host = f"{web.host}:{web.port}"
            headers["Warning"] = (
                f'299 {host}: "There are {more} additional results that can be requested"'
            )
        if not count:
            self._send(204, headers=headers)
            return
        self._send(200, body, _JSON, headers)

    def _wado(self, keys: dict[str, str]) -> None:
        selected = select(self.server.web.pacs, keys)
        if selected.empty:
            raise HTTPError(404, "no such " + ("study", "series", "instance")[len(keys) - 1])
        if not _wado_syntax_ok(self.headers.get("Accept"), selected.transfer_syntax):
            raise HTTPError(
                406,
                "this server sends the files as stored: ask for multipart/related; "
                'type="application/dicom"; transfer-syntax=*',
            )
        boundary = uuid.uuid4().hex
        heads: list[bytes] = []
        sizes: list[int] = []
        paths: list[Path] = []
        for row in selected.itertuples(index=False):
            path = Path(row.path)
            try:
                size = path.stat().st_size
            except OSError as exc:
                raise HTTPError(500, f"cannot read an instance: {exc.strerror}") from None
            location = _retrieve_url(
                self._base, row.StudyInstanceUID, row.SeriesInstanceUID, row.SOPInstanceUID
            )
            syntax = f"; transfer-syntax={row.transfer_syntax}" if row.transfer_syntax else ""
            heads.append(
                (
                    f"--{boundary}\r\nContent-Type: application/dicom{syntax}\r\n"
                    f"Content-Location: {location}\r\nContent-Length: {size}\r\n\r\n"
                ).encode("ascii")
            )
            sizes.append(size)
            paths.append(path)
        tail = f"--{boundary}--\r\n".encode("ascii")
        length = sum(len(h) for h in heads) + sum(sizes) + 2 * len(sizes) + len(tail)
        LOGGER.info("WADO-RS %d instance(s), %d bytes", len(paths), length)
        fault = getattr(self.server.web.pacs, "wado_fault", None)
        if fault is not None:
            # Tests: fault(content_type, body) -> (content_type, body, announced length);
            # a body shorter than announced is a connection dropped mid-body.
            whole = b"\r\n".join(h + p.read_bytes() for h, p in zip(heads, paths, strict=True))
            ctype = f'multipart/related; type="application/dicom"; boundary={boundary}'
            ctype, body, announced = fault(ctype, whole + b"\r\n" + tail)
            self.send_response(200)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(announced))
            self.end_headers()
            self._streaming = True
            self.wfile.write(body)
            self.close_connection = len(body) < announced
            return
        self.send_response(200)
        self.send_header(
            "Content-Type", f'multipart/related; type="application/dicom"; boundary={boundary}'
        )
        self.send_header("Content-Length", str(length))
        self.end_headers()
        self._streaming = True
        gap = b""  # the CRLF that ends a part goes out with the next delimiter
        for head, size, path in zip(heads, sizes, paths, strict=True):
            self.wfile.write(gap + head)
            with open(path, "rb") as source:
                sent = self.connection.sendfile(source, count=size) if size else 0
            if sent != size:  # the file shrank under us: the body cannot be completed
                self.close_connection = True
                raise ConnectionResetError("an instance file changed while it was sent")
            gap = b"\r\n"
        self.wfile.write(gap + tail)

    def _metadata(self, keys: dict[str, str]) -> None:
        if not _json_accepted(self.headers.get("Accept")):
            raise HTTPError(406, f"metadata is answered as {_JSON} only.")
        selected = select(self.server.web.pacs, keys)
        if selected.empty:
            raise HTTPError(404, "no such " + ("study", "series", "instance")[len(keys) - 1])
        out = []
        for row in selected.itertuples(index=False):
            url = _retrieve_url(
                self._base, row.StudyInstanceUID, row.SeriesInstanceUID, row.SOPInstanceUID
            )
            try:
                ds = dcmread(row.path, stop_before_pixels=True)
                item = ds.to_json_dict(
                    bulk_data_element_handler=lambda e, url=url: f"{url}/bulkdata/{e.tag:08X}",
                    suppress_invalid_tags=True,
                )
            except (InvalidDicomError, OSError, ValueError, EOFError) as exc:
                raise HTTPError(500, f"cannot read an instance: {exc}") from None
            out.append(item)
        self._send_json(200, out)

    # --- POST ---

    def _read_body(self) -> bytes:
        limit = self.server.web.pacs.max_upload
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            chunks: list[bytes] = []
            total = 0
            while True:
                line = self.rfile.readline(1024)
                try:
                    size = int(line.split(b";")[0].strip(), 16)
                except ValueError:
                    raise HTTPError(400, "malformed chunked request body") from None
                if size == 0:
                    while self.rfile.readline(1024) not in (b"\r\n", b"\n", b""):
                        pass  # trailers
                    break
                total += size
                if total > limit:
                    raise HTTPError(413, f"the request body is over {limit} bytes")
                chunks.append(self.rfile.read(size))
                self.rfile.readline(8)
            self._body_read = True
            return b"".join(chunks)
        length_header = self.headers.get("Content-Length")
        if length_header is None or not length_header.strip().isdigit():
            raise HTTPError(411, "a Content-Length (or chunked transfer encoding) is required")
        length = int(length_header)
        if length > limit:
            raise HTTPError(413, f"the request body is over {limit} bytes")
        body = self.rfile.read(length)
        self._body_read = True
        if len(body) != length:
            raise HTTPError(400, "the request body ended early")
        return body

    def _stow(self, parts: list[str]) -> None:
        if parts[:1] != ["studies"] or len(parts) > 2:
            raise HTTPError(404 if parts[:1] != ["studies"] else 405, "STOW-RS is POST /studies")
        study = parts[1] if len(parts) == 2 else None
        if study is not None and not frames.is_uid(study):
            raise HTTPError(400, f"StudyInstanceUID {study[:70]!r} is not a valid UID.")
        media = _media_ranges(self.headers.get("Content-Type", ""))
        if len(media) != 1 or media[0].get_content_type() != "multipart/related":
            raise HTTPError(415, 'STOW-RS takes multipart/related; type="application/dicom"')
        kind = media[0].get_param("type")
        if kind not in (None, "application/dicom"):
            raise HTTPError(415, f"this server stores application/dicom parts, not {kind}")
        boundary = media[0].get_param("boundary")
        if not boundary or not isinstance(boundary, str):
            raise HTTPError(400, "the Content-Type has no boundary")
        body = self._read_body()
        answer = store(self.server.web.pacs, split_multipart(body, boundary), study, self._base)
        referenced = answer.get("00081199", {}).get("Value", [])
        failed = answer.get("00081198", {}).get("Value", [])
        if not referenced and not failed:
            raise HTTPError(400, "the request holds no parts")
        status = 200 if not failed else (202 if referenced else 409)
        LOGGER.info("STOW-RS %d stored, %d failed", len(referenced), len(failed))
        self._send_json(status, answer)


def store(
    pacs: DemoPACS, parts: list[tuple[Message, bytes]], study: str | None, base: str
) -> dict[str, Any]:
    """File STOW-RS parts; the response's DICOM JSON (PS3.18 10.5.3)."""
    from .server import _Refused, store_instance

    referenced: list[dict[str, Any]] = []
    failed: list[dict[str, Any]] = []
    studies: set[str] = set()
    for headers, content in parts:
        ctype = headers.get_content_type() if "content-type" in headers else "application/dicom"
        if ctype != "application/dicom":
            failed.append({"00081197": {"vr": "US", "Value": [0xC000]}})
            continue
        try:
            stored = store_instance(pacs, content, study_uid=study, what="STOW-RS")
        except _Refused as exc:
            LOGGER.info("STOW-RS part refused (0x%04X): %s", exc.status, exc.comment)
            item = _referenced_uids(content)
            item["00081197"] = {"vr": "US", "Value": [exc.status]}
            failed.append(dict(sorted(item.items())))
            continue
        studies.add(stored.study_uid)
        url = _retrieve_url(base, stored.study_uid, stored.series_uid, stored.sop_instance_uid)
        item = {
            "00081150": {"vr": "UI", "Value": [stored.sop_class_uid]}
            if stored.sop_class_uid
            else {"vr": "UI"},
            "00081155": {"vr": "UI", "Value": [stored.sop_instance_uid]},
            "00081190": {"vr": "UR", "Value": [url]},
        }
        referenced.append(item)
    answer: dict[str, Any] = {}
    if len(studies) == 1:
        answer["00081190"] = {"vr": "UR", "Value": [_retrieve_url(base, studies.pop())]}
    if failed:
        answer["00081198"] = {"vr": "SQ", "Value": failed}
    if referenced:
        answer["00081199"] = {"vr": "SQ", "Value": referenced}
    return answer


class WebServer:
    """The DICOMweb side of a :class:`~pacsframe.demo.DemoPACS` (see the module doc).

    Parameters
    ----------
    pacs : DemoPACS
        The server whose index and files answer, and whose settings apply:
        ``max_results``, ``qido_cap_warning``, ``http_auth`` and ``max_upload``
        (read at each request, so they may change while it runs).
    port : int, default 0
        The TCP port on 127.0.0.1; 0 picks a free one.
    """

    host = "127.0.0.1"

    def __init__(
        self,
        pacs: DemoPACS,
        port: int = 0,
    ) -> None:
        self.pacs = pacs
        self.port = int(port)
        self._httpd: _HTTPServer | None = None
        self._thread: threading.Thread | None = None
        self._connections: set[socket.socket] = set()
        self._lock = threading.Lock()

    @property
    def url(self) -> str:
        """The service's base URL, ``http://127.0.0.1:<port>/dicom-web``."""
        return f"http://{self.host}:{self.port}{ROOT}"

    def _track(self, connection: socket.socket, alive: bool) -> None:
        with self._lock:
            if alive:
                self._connections.add(connection)
            else:
                self._connections.discard(connection)

    def start(self) -> WebServer:
        """Listen and serve in a daemon thread; return ``self``."""
        if self._httpd is not None:
            return self
        httpd = _HTTPServer((self.host, self.port), _Handler)
        httpd.web = self
        self.port = int(httpd.server_address[1])
        self._httpd = httpd
        self._thread = threading.Thread(
            target=httpd.serve_forever,
            kwargs={"poll_interval": 0.05},
            name=f"pacsframe-dicomweb-{self.port}",
            daemon=True,
        )
        self._thread.start()
        return self

    def stop(self) -> WebServer:
        """Stop listening and close open connections (within about a second)."""
        httpd, self._httpd = self._httpd, None
        if httpd is None:
            return self
        httpd.shutdown()
        with self._lock:
            connections = list(self._connections)
        for connection in connections:
            with contextlib.suppress(OSError):
                connection.shutdown(socket.SHUT_RDWR)
        httpd.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None
        return self
