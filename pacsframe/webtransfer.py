"""WADO-RS retrieval into the cache and STOW-RS storage, over a DICOMweb transport.

``get`` is the C-GET retrieval of :mod:`pacsframe.retrieve` with HTTP underneath:
the same :class:`~pacsframe.retrieve._Planner` decides what is cached and what to
request (a partly cached series is requested instance by instance, a fully cached
frame costs no request), the same :class:`~pacsframe.retrieve._Receiver` files
each object (rows, progress bar, ``on_received``) and the same
:class:`~pacsframe.retrieve.RetrieveResult` comes back. Each unit is one request
at its level (``studies/{s}``, ``.../series/{se}``, ``.../instances/{i}``, one per
missing instance), asking for the bytes as stored
(``multipart/related; type="application/dicom"; transfer-syntax=*``). The body is
read in 256 KiB chunks into a :class:`~pacsframe.multipart.MultipartReader` whose
sink writes each part straight into :meth:`Cache.receive`: the part's file meta
is read first (the SOP class, SOP instance and transfer syntax it names are the
C-STORE request's), the data set after it streams into the cache's temporary
file, and the part is filed at its closing boundary, so memory is one chunk per
worker whatever the size of a study. The cache writes the same file meta a C-GET
writes, so an instance has the same bytes in the cache whichever protocol brought
it. A body cut short (a dropped connection, a truncated body, another boundary)
discards the part in progress and raises with ``.result`` attached; a re-run
fetches only what is missing. With ``workers`` > 1 the units run in worker
processes (:mod:`pacsframe.workers`, as C-GET's associations do): reading,
parsing and filing 500 objects is Python, and threads share one GIL, so they
overlap only their waits. Each child opens its own connections from the
archive's settings (:meth:`DICOMweb.__getstate__`) and files into the one cache;
the caller keeps the queue of units, the rows, the progress bar and
``on_received``. An archive with a caller's ``session=`` (which cannot cross to a
child), or ``PACSFRAME_WORKER_PROCESSES=0``, runs them in threads.

``store`` is STOW-RS: the sources of :meth:`PACS.store` (paths, folders, frames
with a ``path`` column, Datasets) go in batches of ``batch`` objects per
request, each body a generator that reads its files in chunks; the DICOM JSON
answer (Referenced / Failed SOP Sequences) gives every object its own row in the
:class:`~pacsframe.storage.StoreResult`, for a 200 or 202 and for a 400 or 409
whose body names the objects alike (Orthanc 1.7's plugin answers a partial failure
with 409 or 400: the transport is asked to return those with their body, not to
raise). An object the answer does not name, once it names any, is a failed row.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import io
import json
import logging
import pickle
import queue
import secrets
import struct
import threading
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import pandas as pd

from . import frames
from .cache import part10_head
from .deadline import Deadline, deadline_for
from .errors import AssociationError, NotSupported, PacsFrameError, QueryError
from .multipart import MultipartReader, boundary_of
from .net.operations import Part10, StoreRequest, read_part10
from .retrieve import (
    _RETRIEVE_ADVICE,
    RetrieveResult,
    _as_frame,
    _finish,
    _Planner,
    _ProcessWorker,
    _progress,
    _Receiver,
    _run,
    _Unit,
    _warn_counts,
    _with_result,
)
from .storage import (
    StoreResult,
    _describe,
    _encode,
    _Item,
    _iter_sources,
    _row,
    _status_sentence,
    _store_result,
    peer_name,
)
from .workers import available, warm

__all__ = ["get", "store"]

LOGGER = logging.getLogger("pacsframe")

ACCEPT = 'multipart/related; type="application/dicom"; transfer-syntax=*'
#: Bytes read from the response per chunk, and per file read for STOW.
CHUNK = 256 * 1024
#: A part's file meta longer than this is not a file meta.
_META_LIMIT = 132 + (1 << 16)
# What is read of a part first for its meta (see _read_meta).
_META_PREFIX = 4096
#: Objects per STOW-RS request.
STOW_BATCH = 50


def _transport(web: Any) -> Any:
    """The :class:`~pacsframe.webhttp.WebTransport` of a DICOMweb facade (or itself)."""
    for name in ("transport", "_transport", "http"):
        found = getattr(web, name, None)
        if found is not None and hasattr(found, "request"):
            return found
    return web


def _part_syntax(headers: dict[str, str]) -> str:
    """The ``transfer-syntax`` parameter of a part's Content-Type ('' when none)."""
    for param in headers.get("content-type", "").split(";")[1:]:
        name, _, value = param.partition("=")
        if name.strip().lower() == "transfer-syntax":
            return value.strip().strip('"')
    return ""


# --- WADO-RS ------------------------------------------------------------------------------


class _PartSink:
    """A :class:`MultipartReader` sink: every part of one answer into the cache.

    The first bytes of a part (preamble, ``DICM``, file meta) are held until the
    meta is complete; then the receiver's writer is opened with the meta's UIDs
    and everything after the meta goes to it as it comes. ``end`` files the
    object (the receiver never raises: a UID the cache refuses is a failed row);
    ``abort`` discards the part in progress.
    """

    def __init__(self, receiver: _Receiver, arrived: list[str]) -> None:
        self.receiver = receiver
        self.arrived = arrived
        self._head: bytearray | None = None
        self._writer: Any = None
        self._sop = ""
        self._bad: str | None = None
        self._syntax = ""

    def start(self, headers: dict[str, str]) -> None:
        self._head = bytearray()
        self._writer = None
        self._bad = None
        self._sop = ""
        self._syntax = _part_syntax(headers)

    def data(self, view: memoryview) -> None:
        if self._writer is not None:
            self._writer.write(view)
        elif self._head:
            self._head += view
            self._open(self._head, final=False)
        elif self._head is not None:
            # A part's first bytes are read where they are (up to a whole chunk: not
            # copied), and kept only while its meta is not whole yet.
            self._open(view, final=False)
            if self._head is not None:
                self._head += view

    def _open(self, head: bytearray | memoryview, *, final: bool) -> None:
        if len(head) < 144 and not final:
            return
        if head[128:132] != b"DICM":
            self._refuse("it is not a DICOM Part-10 file (no 'DICM' after a 128-byte preamble)")
            return
        group, element, vr = struct.unpack_from("<HH2s", head, 132)
        if (group, element, vr) == (2, 0, b"UL"):
            end = 144 + struct.unpack_from("<I", head, 140)[0]
            if len(head) < end + 8 and not final:
                if len(head) > _META_LIMIT:
                    self._refuse("its file meta is longer than any file meta")
                return
        elif len(head) < _META_LIMIT and not final:
            return  # no group length: read the meta once enough has come
        try:
            meta = _read_meta(head)
        except ValueError as exc:
            self._refuse(str(exc))
            return
        syntax = meta.transfer_syntax or self._syntax
        self._sop = meta.sop_instance_uid
        request = StoreRequest(meta.sop_class_uid, meta.sop_instance_uid, syntax, 0)
        self._writer = self.receiver.writer(request)
        self._head = None
        with memoryview(head) as whole:
            rest = whole[meta.dataset_offset :]
            if rest:
                self._writer.write(rest)
            rest.release()

    def _refuse(self, why: str) -> None:
        self._bad = why
        self._head = None

    def end(self) -> None:
        if self._writer is None and self._head is not None:
            self._open(self._head, final=True)
        writer, self._writer = self._writer, None
        if writer is not None:
            writer.commit()  # files it, or a failed row: never raises
            self.arrived.append(self._sop)
            # A batch of index rows full: committed between objects, where a refusal
            # ends the response as a failure (CacheError) rather than one object's row.
            self.receiver.cache._flush_rows(full=True)
            return
        why = self._bad or "it is empty"
        self.receiver._record(
            "", "", None, "failed", f"a part of the WADO-RS answer was not kept: {why}", None
        )
        self.arrived.append("")

    def abort(self) -> None:
        writer, self._writer = self._writer, None
        if writer is not None:
            writer.discard()
        self._head = None


def _read_meta(head: bytes | bytearray | memoryview, prefix_size: int = _META_PREFIX) -> Part10:
    """``read_part10`` of the first ``_META_LIMIT`` bytes of ``head``, copying few of them.

    A meta (a few hundred bytes) that a prefix holds whole, with the tag and VR of
    the element after it, reads the same from all the bytes: only what the prefix
    cannot settle (an error there, a meta longer than it) is read again from them all.
    """
    prefix = bytes(head[:prefix_size])
    if len(prefix) < min(len(head), _META_LIMIT):
        try:
            meta = read_part10(io.BytesIO(prefix))
        except ValueError:
            pass
        else:
            # Further on, read_part10 could have stopped at an element cut short.
            if meta.dataset_offset + 12 <= len(prefix):
                return meta
        return read_part10(io.BytesIO(bytes(head[:_META_LIMIT])))
    return read_part10(io.BytesIO(prefix))


def _requests_of(unit: _Unit) -> list[tuple[str, list[str]]]:
    """(path, SOPInstanceUIDs asked for) of each WADO-RS request of one unit."""
    keys = unit.keys
    study = f"/studies/{keys['StudyInstanceUID']}"
    if unit.level == "STUDY":
        return [(study, [])]
    series = f"{study}/series/{keys['SeriesInstanceUID']}"
    if unit.level == "SERIES":
        return [(series, [])]
    return [(f"{series}/instances/{sop}", [sop]) for sop in keys["SOPInstanceUID"].split("\\")]


def _per_instance(unit: _Unit) -> list[_Unit]:
    """An IMAGE unit of several instances as one unit per instance (others as they are)."""
    if unit.level != "IMAGE" or "\\" not in unit.keys["SOPInstanceUID"]:
        return [unit]
    return [
        _Unit("IMAGE", {**unit.keys, "SOPInstanceUID": sop}, 1)
        for sop in unit.keys["SOPInstanceUID"].split("\\")
    ]


def _check_uids(unit: _Unit) -> None:
    for key, value in unit.keys.items():
        for uid in value.split("\\"):
            if not frames.is_uid(uid):
                raise QueryError(f"{key} {uid[:70]!r} is not a valid UID; it cannot name a URL.")


def _stream_error(exc: BaseException, what: str) -> AssociationError:
    import urllib3.exceptions as u3

    if isinstance(exc, (u3.ReadTimeoutError, TimeoutError)):
        return AssociationError(
            f"the peer stopped sending the {what} (read timed out); what arrived complete "
            "is cached.",
            reason="timeout",
        )
    return AssociationError(
        f"the connection dropped during the {what} ({type(exc).__name__}); the part in "
        "progress was discarded, what arrived complete is cached.",
        reason="aborted",
    )


class _WebWorker(threading.Thread):
    """Takes units from the queue and retrieves each over WADO-RS.

    A thread here, or the worker of a :class:`~pacsframe.retrieve._ProcessWorker`
    (in a worker process, with the units the parent lends and a receiver that
    sends its rows to the parent's).
    """

    protocol = "WADO-RS"

    def __init__(
        self, web: Any, units: queue.Queue[_Unit], receiver: _Receiver, name: str
    ) -> None:
        super().__init__(name=name, daemon=True)
        self.web = web
        self.transport = _transport(web)
        self.units = units
        self.receiver = receiver
        self.requests = 0
        self.failures: list[BaseException] = []
        self.cancelled = False
        self._response: Any = None
        self.context = contextvars.copy_context()  # the call's timeout= holds here too

    def run(self) -> None:
        try:
            self.context.run(self._units)
        except BaseException as exc:
            self.failures.append(exc)
            self.receiver.stop.set()

    def _units(self) -> None:
        while not self.receiver.stop.is_set():
            try:
                unit = self.units.get_nowait()
            except queue.Empty:
                return
            for path, sops in _requests_of(unit):
                if self.receiver.stop.is_set():
                    self.cancelled = True
                    return
                self._get(unit, path, sops)

    def _get(self, unit: _Unit, path: str, sops: list[str]) -> None:
        deadline = Deadline.current()
        if deadline is not None:
            deadline.check("WADO-RS", _RETRIEVE_ADVICE)
        what = f"WADO-RS retrieval of {unit.name() if not sops else 'instance ' + sops[0]}"
        self.requests += 1
        response = self.transport.request(
            "GET", path, headers={"Accept": ACCEPT}, stream=True, what=what, missing="return"
        )
        arrived: list[str] = []
        try:
            self._response = response
            status = response.status_code
            if status in (405, 501):
                raise NotSupported(
                    f"{peer_name(self.web)} does not serve WADO-RS ({status} for the {what}).",
                    status=status,
                )
            if status == 404:
                self._missing(unit, sops, arrived, "the peer answered 404 (not found)")
                return
            sink = _PartSink(self.receiver, arrived)
            reader = MultipartReader(
                boundary_of(response.headers.get("Content-Type", "")), sink=sink
            )
            try:
                # The objects' index rows are committed a batch at a time, the last
                # when the response ends (unless on_received is given, which may look
                # into the index as each object arrives).
                batched = self.receiver.cache._batched() if self.receiver.batch else None
                with batched or contextlib.nullcontext():
                    self._read(response, reader, what, deadline)
            except BaseException:
                sink.abort()
                raise
        finally:
            self._response = None
            response.close()
        if self.receiver.stop.is_set() and not reader.done:
            sink.abort()  # stopped mid-body: the part in progress is not kept
            self.cancelled = True
            return
        self._missing(unit, sops, arrived, "the peer's answer held no part for it")

    def _read(
        self, response: Any, reader: MultipartReader, what: str, deadline: Deadline | None
    ) -> None:
        try:
            for chunk in response.raw.stream(CHUNK, decode_content=True):
                reader.feed(chunk)
                if self.receiver.stop.is_set():
                    return
                if deadline is not None:
                    deadline.check("WADO-RS", _RETRIEVE_ADVICE)
        except PacsFrameError:
            raise
        except Exception as exc:
            raise _stream_error(exc, what) from exc
        reader.close()

    def _missing(self, unit: _Unit, sops: list[str], arrived: list[str], why: str) -> None:
        """Rows for asked instances that did not come, and a note when counts differ."""
        peer = peer_name(self.web)
        if sops:
            lost = [s for s in sops if s not in arrived]
            rows = [
                {
                    "StudyInstanceUID": unit.keys.get("StudyInstanceUID"),
                    "SeriesInstanceUID": unit.keys.get("SeriesInstanceUID"),
                    "SOPInstanceUID": sop,
                    "SOPClassUID": None,
                    "path": None,
                    "status": "failed",
                    "error": f"not received: {why}",
                }
                for sop in lost
            ]
            note = (
                f"instance {lost[0]} of SERIES {unit.keys['SeriesInstanceUID']}: {peer} sent "
                f"nothing for it ({why})."
                if lost
                else None
            )
            self.receiver.extend(rows, note)
            return
        expected = unit.expected
        if expected is not None and expected != len(arrived):
            self.receiver.extend(
                [],
                f"{unit.name()}: {peer} announced {expected} object(s) and "
                f"{len(arrived)} arrived in its WADO-RS answer"
                + (f" ({why})." if not arrived else "."),
            )

    def cancel(self) -> None:
        self.receiver.stop.set()

    def abort(self) -> None:
        response = self._response
        if response is not None:
            response.close()


def _parallel(web: Any) -> bool:
    """Whether this archive's parallel units may run in worker processes.

    The archive crosses to a child as its settings (:meth:`DICOMweb.__getstate__`);
    a ``session=`` the caller gave (e.g. google-auth's ``AuthorizedSession``), or an
    auth object that does not pickle, cannot, and its units run in threads.
    """
    if not available():
        return False
    transport = _transport(web)
    if not getattr(transport, "portable", lambda: False)():
        return False
    try:
        pickle.dumps(web)
    except Exception as exc:
        LOGGER.info(
            "WADO-RS units run in threads: the archive does not pickle (%s)", type(exc).__name__
        )
        return False
    return True


def get(
    web: Any,
    frame: pd.DataFrame | pd.Series | Sequence[str],
    *,
    workers: int = 4,
    progress: bool = True,
    on_received: Callable[[str, dict[str, Any]], Any] | None = None,
    overwrite: bool = False,
    timeout: float | None = None,
) -> RetrieveResult:
    """WADO-RS everything ``frame`` describes into ``web.cache``; see the module doc.

    Parameters
    ----------
    web : DICOMweb
        The service: its ``cache``, its transport, and ``find`` (QIDO-RS) for the
        listings a partly cached unit needs.
    frame : DataFrame, Series of UIDs, or list of StudyInstanceUIDs
        What to retrieve, at the level of its most specific UID column.
    workers : int
        Units requested in parallel: worker processes where they can run
        (:func:`pacsframe.workers.available`, an archive without a caller's
        ``session=``), threads otherwise.
    progress, on_received, overwrite, timeout
        As for :meth:`PACS.get`.

    Raises
    ------
    AssociationError
        The connection dropped or timed out (``MultipartError`` for a malformed
        or truncated body), with ``.result`` listing what arrived.
    NotSupported
        The service has no WADO-RS.
    """
    if not isinstance(workers, int) or isinstance(workers, bool) or workers < 1:
        raise QueryError(f"workers={workers!r} must be a whole number of at least 1.")
    with deadline_for(timeout, "get"):
        return _get(web, frame, workers, progress, on_received, overwrite)


def _get(
    web: Any,
    frame: pd.DataFrame | pd.Series | Sequence[str],
    workers: int,
    progress: bool,
    on_received: Callable[[str, dict[str, Any]], Any] | None,
    overwrite: bool,
) -> RetrieveResult:
    frame = _as_frame(frame)
    if frames.infer_level(frame) == "PATIENT":
        raise QueryError(
            "WADO-RS retrieves studies, series and instances, not patients: drill down "
            "first, e.g. web.get(web.find_studies(patients))."
        )
    cache = web.cache
    parallel = workers > 1 and _parallel(web)
    if parallel:
        warm()  # the worker server's imports overlap the planning QIDO-RS searches
    planner = _Planner(web, cache, "study", overwrite)
    planner.plan(frame)
    planner.spread(workers)
    # An instance is one request: each its own unit, so that they spread over workers.
    planner.units = [one for unit in planner.units for one in _per_instance(unit)]
    for unit in planner.units:
        _check_uids(unit)
    planner.warn(web)
    peer = peer_name(web)
    bar = _progress(planner.expected(), progress, f"WADO-RS from {peer}")
    if bar is not None and planner.cached_rows:
        bar.update(len(planner.cached_rows))
    receiver = _Receiver(
        cache, overwrite=overwrite, on_received=on_received, bar=bar, again=planner.again
    )
    units: queue.Queue[_Unit] = queue.Queue()
    for unit in planner.units:
        units.put(unit)
    n = min(workers, len(planner.units))
    # Parallel units in worker processes where they can run: the reading, parsing and
    # filing of each object is Python, and threads share one GIL.
    kind: Any = functools.partial(_ProcessWorker, _WebWorker) if n > 1 and parallel else _WebWorker
    threads = [kind(web, units, receiver, f"pacsframe-wado-{i}") for i in range(n)]
    LOGGER.info(
        "WADO-RS from %s: %d unit(s) over %d %s, %d object(s) already cached",
        peer,
        len(planner.units),
        n,
        "process(es)" if kind is not _WebWorker else "thread(s)",
        len(planner.cached_rows),
    )
    try:
        _run(threads, receiver)
    finally:
        if bar is not None:
            bar.close()
    requests = sum(t.requests for t in threads)
    result = _finish(planner, receiver.rows, receiver.notes, requests, {})
    if receiver.error is not None:
        raise receiver.error
    failures = [f for t in threads for f in t.failures]
    if failures:
        raise _with_result(failures[0], result, "get")
    _warn_counts(web, result, receiver.notes)
    return result


# --- STOW-RS ------------------------------------------------------------------------------


class _Body:
    """A STOW-RS request body, produced as it is sent: files read in chunks.

    ``len`` is known (and sent as Content-Length) when every object is a file;
    Datasets are encoded one at a time as their turn comes (chunked encoding).
    """

    def __init__(self, items: list[_Item], boundary: str, refused: dict[int, str]) -> None:
        self.items = items
        self.boundary = boundary
        self.refused = refused  # id(item) -> why it was left out of the body
        self._length: int | None = None
        if all(i.path is not None for i in items):
            import os

            self._length = sum(len(self._head(i)) + os.path.getsize(i.path) + 2 for i in items)
            self._length += len(self._tail())

    def _head(self, item: _Item) -> bytes:
        # No transfer-syntax parameter: the file meta says it, and Orthanc's plugin
        # (1.7) skips a part whose Content-Type is not exactly application/dicom.
        return f"--{self.boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode("ascii")

    def _tail(self) -> bytes:
        return f"--{self.boundary}--\r\n".encode("ascii")

    def __len__(self) -> int:
        return self._length or 0

    def __bool__(self) -> bool:
        return True

    def __iter__(self) -> Iterator[bytes]:
        for item in self.items:
            if item.path is not None:
                yield self._head(item)
                sent = 0
                with open(item.path, "rb") as source:
                    while block := source.read(CHUNK):
                        sent += len(block)
                        yield block
                if self._length is not None and sent != self._size(item):
                    raise OSError(f"{item.path} changed while it was sent")
            else:
                assert item.dataset is not None
                try:
                    data = _encode(item.dataset, item.syntax)
                    head = part10_head(item.sop_class, item.sop_instance, item.syntax)
                    if head is None:
                        raise ValueError("its UIDs cannot be written as a file meta")
                except Exception as exc:
                    why = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
                    self.refused[id(item)] = f"not sent: pydicom could not encode it ({why})"
                    continue
                yield self._head(item)
                yield head
                yield data
                del data
            yield b"\r\n"
        yield self._tail()

    def _size(self, item: _Item) -> int:
        import os

        assert item.path is not None
        return os.path.getsize(item.path)


def _json_uids(item: dict[str, Any]) -> tuple[str, int | None, int | None]:
    """(SOP Instance UID, FailureReason, WarningReason) of one item of the answer."""

    def first(tag: str) -> Any:
        value = item.get(tag, {}).get("Value") if isinstance(item.get(tag), dict) else None
        return value[0] if isinstance(value, list) and value else None

    sop = first("00081155")
    failure = first("00081197")
    warning = first("00081196")
    return (
        str(sop) if sop else "",
        int(failure) if failure is not None else None,
        int(warning) if warning is not None else None,
    )


def _answer(response: Any) -> dict[str, Any]:
    try:
        value = json.loads(response.content or b"{}")
    except ValueError:
        return {}
    if isinstance(value, list) and value:
        value = value[0]
    return value if isinstance(value, dict) else {}


def _sequence(answer: dict[str, Any], tag: str) -> list[dict[str, Any]]:
    element = answer.get(tag)
    values = element.get("Value") if isinstance(element, dict) else None
    return [v for v in values if isinstance(v, dict)] if isinstance(values, list) else []


#: Failure statuses whose STOW-RS answer is read, not raised: 409 (none stored for a
#: conflict; Orthanc 1.7's plugin also for a partial failure against /studies/{study})
#: and 400 (bad syntax; Orthanc 1.7 also when some were stored). Both may name each
#: object in the Referenced / Failed SOP Sequences.
_STOW_ANSWERED = (400, 409)
_REFERENCED, _FAILED = "00081199", "00081198"


def _stow_batch(
    web: Any, batch: list[_Item], rows: list[dict[str, Any]], study: str | None
) -> None:
    """One STOW-RS request for ``batch``; a row per item."""
    transport = _transport(web)
    boundary = "pacsframe-" + secrets.token_hex(12)
    refused: dict[int, str] = {}
    body = _Body(batch, boundary, refused)
    headers = {
        "Content-Type": f'multipart/related; type="application/dicom"; boundary={boundary}',
        "Accept": "application/dicom+json",
    }
    what = f"STOW-RS of {len(batch)} object(s)"
    path = "/studies" if study is None else f"/studies/{study}"
    response = transport.request(
        "POST", path, headers=headers, data=body, what=what, returned=_STOW_ANSWERED
    )
    status = response.status_code
    answer = _answer(response)
    if status >= 400 and _REFERENCED not in answer and _FAILED not in answer:
        # Not a Store Instances Response: the request itself failed.
        raise transport.error(response, what)
    done: dict[str, tuple[str, int | None, str | None]] = {}
    top_warning = _json_uids(answer)[2]
    for item in _sequence(answer, _REFERENCED):
        sop, _, warning = _json_uids(item)
        warning = warning if warning is not None else top_warning
        if warning is not None:
            done[sop] = ("warning", warning, _status_sentence(warning, None))
        else:
            done[sop] = ("completed", 0, None)
    unnamed: list[int] = []
    for item in _sequence(answer, _FAILED):
        sop, failure, _ = _json_uids(item)
        code = failure if failure is not None else 0xC000
        if sop:
            done[sop] = ("failed", code, _status_sentence(code, None))
        else:
            unnamed.append(code)
    # A 200 or 202 without either sequence says all were stored without listing them;
    # once the answer lists objects (Orthanc 1.7 answers 200 with both sequences empty
    # when a part aborted the request), an object it does not name was not stored.
    listed = _REFERENCED in answer or _FAILED in answer
    for item in batch:
        if id(item) in refused:
            rows.append(_row(item, "failed", None, refused[id(item)]))
            continue
        found = done.get(item.sop_instance)
        if found is not None:
            rows.append(_row(item, found[0], found[1], found[2]))
        elif status in (200, 202) and not listed:
            rows.append(_row(item, "completed", None, None))
        else:
            why = (
                f"the peer's STOW-RS answer (HTTP {status} {response.reason or ''}) does not "
                "name it: the peer did not store it or could not read it"
            )
            rows.append(_row(item, "failed", unnamed[0] if unnamed else None, why))


def store(
    web: Any,
    source: Any,
    *,
    study: str | None = None,
    batch: int = STOW_BATCH,
    timeout: float | None = None,
) -> StoreResult:
    """STOW-RS every object in ``source`` to ``web``; never raises for one bad object.

    Parameters
    ----------
    web : DICOMweb
        The service.
    source : path, folder, list of paths, DataFrame with ``path``, Dataset(s)
        What to send, as for :meth:`PACS.store`.
    study : str, optional
        A Study Instance UID: POST to ``/studies/{study}``, where the archive
        refuses (a ``failed`` row) any object of another study. None: ``/studies``.
    batch : int
        Objects per request.
    timeout : float, optional
        Seconds for the whole call.

    Returns
    -------
    StoreResult
        One row per object: ``completed``, ``warning`` (WarningReason) or
        ``failed`` (FailureReason as ``code``, or why it was not sent, or that the
        answer does not name it).

    Notes
    -----
    The rows are what the archive says. Orthanc's DICOMweb plugin 1.7 answers 409
    (or 400) when only some objects failed, and 200 naming only the objects before
    one it could not store (e.g. full storage: the rest are failed rows); it lists an
    object its Lua ``ReceivedInstanceFilter`` dropped as stored. Ask the archive
    (a QIDO-RS search) when that matters.

    Examples
    --------
    An object of another study sent to ``/studies/{study}`` is refused, the others
    stored (HTTP 202):

    >>> import tempfile
    >>> import pacsframe as pf
    >>> from pacsframe.demo import DemoPACS, make_cohort
    >>> cohort = make_cohort(tempfile.mkdtemp(), patients=2, seed=3, studies_per_patient=1)
    >>> study = cohort.StudyInstanceUID.iloc[0]
    >>> with DemoPACS(tempfile.mkdtemp(), http_port=0) as server:
    ...     result = pf.DICOMweb(server.url).store(cohort, study=study)
    >>> int((cohort.StudyInstanceUID == study).sum()) == result.completed
    True
    >>> set(result.failed_instances.code) == {0xA900}
    True
    """
    if not isinstance(batch, int) or isinstance(batch, bool) or batch < 1:
        raise QueryError(f"batch={batch!r} must be a whole number of at least 1.")
    if study is not None and not (isinstance(study, str) and frames.is_uid(study)):
        raise QueryError(
            f"study={str(study)[:70]!r} must be a Study Instance UID (digits and dots, "
            "e.g. '1.2.840.113619.2.55.3'), or None to POST to /studies."
        )
    with deadline_for(timeout, "store"):
        items = [_describe(s) for s in _iter_sources(source)]
        rows: list[dict[str, Any]] = []
        sendable = [i for i in items if i.error is None]
        for item in items:
            if item.error is not None:
                rows.append(_row(item, "failed", None, f"not sent: {item.error}"))
        try:
            for start in range(0, len(sendable), batch):
                _stow_batch(web, sendable[start : start + batch], rows, study)
        except PacsFrameError as exc:
            reached = {id(r["_item"]) for r in rows}
            for item in items:
                if id(item) not in reached:
                    rows.append(_row(item, "failed", None, f"not sent or not answered: {exc}"))
            exc.result = _store_result(web, items, rows)  # type: ignore[attr-defined]
            raise
        return _store_result(web, items, rows)
