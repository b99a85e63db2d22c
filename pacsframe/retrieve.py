"""C-GET and C-MOVE drivers: from a (filtered) frame to objects in the cache.

A frame at any level is turned into *work units* (one C-GET or C-MOVE request
each), after subtracting what the cache already holds: a fully cached series costs
one index query and no request; a partly cached one is listed with one C-FIND and
only its missing instances are requested. Units are spread over ``workers``
parallel associations. Every received object goes from the association straight
to an atomic write in the cache; nothing partial is ever visible there.

A retrieval never requests less than the frame describes. A listing of the level
below made only to plan (a study's series, to split it over ``workers``; what a
partly cached study or series lacks) is used only when it is *trusted*:

- it answered, with at least one match, every match carrying its own unique key
  and, where it names one, the parent's UID;
- when the parent row has a count (``NumberOfStudyRelatedInstances`` and the
  like), the children add up to it: their own counts, or the number of distinct
  instances listed;
- when the parent row has no count, a split may still use a listing that passes
  the first rule (splitting only buys parallelism), but a partly cached unit is
  requested whole without a listing: skipping what is cached only saves transfer,
  and nothing could tell a short listing from a complete one.

Otherwise the unit is requested whole (a listing that times out ends the call
instead, as any request to a peer that stopped answering does). What the unit
holds in the cache already arrives again, is not rewritten (unless
``overwrite=True``) and counts as ``cached``; the result's ``notes`` and an
:class:`~pacsframe.errors.UnusableListingWarning` say which unit and why.

After each request, the objects that arrived are compared with what the peer
announced (the frame's count, or the sub-operation counts of its first pending
response): what did not arrive gets a ``failed`` row whatever the final status
said, and a difference the peer's own failure counts do not explain is a note
and a :class:`~pacsframe.errors.CountMismatchWarning`.
"""

from __future__ import annotations

import contextvars
import functools
import html
import io
import logging
import queue
import resource
import ssl
import threading
import time
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import pandas as pd
from pydicom.filebase import DicomBytesIO
from pydicom.filereader import read_dataset
from pydicom.filewriter import write_dataset
from pynetdicom.sop_class import (
    PatientRootQueryRetrieveInformationModelGet,
    PatientRootQueryRetrieveInformationModelMove,
    StudyRootQueryRetrieveInformationModelGet,
    StudyRootQueryRetrieveInformationModelMove,
)
from pynetdicom.status import code_to_category

from . import frames
from .deadline import Deadline, deadline_for, deadline_scope, fired, timed_out
from .errors import (
    AssociationError,
    CacheError,
    CountMismatchWarning,
    DimseError,
    MoveDestinationUnknown,
    NotSupported,
    PacsFrameError,
    QueryError,
    UnusableListingWarning,
)
from .finder import FIND_MODELS
from .net.driver import IMPLICIT_VR_LITTLE_ENDIAN, ClientAssociation, Interrupted, LimitReached
from .net.operations import (
    ObjectWriter,
    RetrieveResponse,
    StoreRequest,
    retrieve_negotiation,
)
from .query import (
    INSTANCE_COUNT_KEY,
    LEVELS,
    UNIQUE_KEY,
    build_query,
    normalize_model,
    required_keys,
)
from .storage import StorageSCP, TransferResult, peer_name, storage_contexts
from .workers import ChildLink, ProcessWorker, available, portable, restore, warm

if TYPE_CHECKING:
    from .cache import Cache, IncomingObject
    from .pacs import PACS

__all__ = ["RetrieveResult", "get", "move"]

LOGGER = logging.getLogger("pacsframe")

# The retrieve context's transfer syntaxes.
_RETRIEVE_SYNTAXES = ("1.2.840.10008.1.2.1", IMPLICIT_VR_LITTLE_ENDIAN)
GET_MODELS = {
    "study": str(StudyRootQueryRetrieveInformationModelGet),
    "patient": str(PatientRootQueryRetrieveInformationModelGet),
}
MOVE_MODELS = {
    "study": str(StudyRootQueryRetrieveInformationModelMove),
    "patient": str(PatientRootQueryRetrieveInformationModelMove),
}
# Identifiers stay well under any peer's limits when a long list of SOP UIDs is
# split into requests of this many.
_UIDS_PER_REQUEST = 200
_COLUMNS = (
    "StudyInstanceUID",
    "SeriesInstanceUID",
    "SOPInstanceUID",
    "SOPClassUID",
    "path",
    "status",
    "error",
)


@dataclass
class RetrieveResult(TransferResult):
    """What a ``get`` or ``move`` did.

    ``instances`` has one row per object: StudyInstanceUID, SeriesInstanceUID,
    SOPInstanceUID, SOPClassUID, path (in the cache), status (``completed``,
    ``cached``, ``warning``, ``failed``) and error. ``requests`` counts the C-GET
    or C-MOVE requests sent (0 when everything was cached already).

    ``expected`` is how many objects the peer announced for the whole request
    (its counts in the frame, else the sub-operation counts of its first pending
    response; ``None`` when some part had neither), and ``shortfall`` how many of
    them are not in the cache after the call (for a move to another AE: not
    reported delivered by the peer's counts). ``notes`` holds one sentence per
    planning listing that could not be trusted and per request whose arrivals
    differ from what the peer announced (JSON-safe strings; no patient
    identifiers).
    """

    requests: int = 0
    remote: dict[str, int] = field(default_factory=dict)
    expected: int | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def cached(self) -> int:
        """Objects already in the cache, not fetched (or not rewritten) again."""
        return self._count("cached")

    @property
    def completed(self) -> int:
        """Objects received (or, for a move to another AE, the peer's completed count)."""
        return self._count("completed") + self.remote.get("completed", 0)

    @property
    def failed(self) -> int:
        """Objects that could not be retrieved or stored."""
        return self._count("failed") + self.remote.get("failed", 0)

    @property
    def warning(self) -> int:
        """Objects the peer sent with a warning status."""
        return self._count("warning") + self.remote.get("warning", 0)

    @property
    def shortfall(self) -> int | None:
        """Objects the peer announced that are not in the cache (``None``: no count)."""
        if self.expected is None:
            return None
        return max(0, self.expected - self.completed - self.cached - self.warning)

    def _remarks(self) -> str:
        """What differs from the peer's counts, for the reprs ('' when nothing)."""
        if not self.notes and not self.shortfall:
            return ""
        return f", expected={self.expected}, shortfall={self.shortfall}, notes={len(self.notes)}"

    def _repr_html_(self) -> str:
        counts = "".join(
            f"<td>{getattr(self, name)}</td>"
            for name in ("completed", "cached", "warning", "failed", "requests")
        )
        failed = self.failed_instances
        detail = (
            "<p>Failed:</p>" + failed[["SOPInstanceUID", "error"]].head(10).to_html(index=False)
            if len(failed)
            else ""
        )
        if self._remarks():
            items = "".join(f"<li>{html.escape(n)}</li>" for n in self.notes)
            detail += (
                f"<p>The peer announced {self.expected} object(s); {self.shortfall} are not "
                f"in the cache.</p><ul>{items}</ul>"
            )
        return (
            "<div><b>RetrieveResult</b><table><tr><th>completed</th><th>cached</th>"
            f"<th>warning</th><th>failed</th><th>requests</th></tr><tr>{counts}</tr>"
            f"</table>{detail}</div>"
        )

    def __repr__(self) -> str:
        return (
            f"RetrieveResult(completed={self.completed}, cached={self.cached}, "
            f"warning={self.warning}, failed={self.failed}, requests={self.requests}"
            f"{self._remarks()})"
        )


@dataclass
class _Unit:
    """One C-GET/C-MOVE request: its level and identifier keys (DICOM strings).

    ``expected`` is the peer's count for it from the frame or a listing;
    ``announced`` the sub-operation total of its first pending response; ``whole``
    marks a unit requested whole because its listing could not be trusted or its
    count is unknown, never to be split again; ``held`` the SOPInstanceUIDs of it
    that were cached before.
    """

    level: str
    keys: dict[str, str]
    expected: int | None = None
    whole: bool = False
    announced: int | None = None
    held: frozenset[str] = frozenset()

    def name(self) -> str:
        """The unit in a note: level and UID, never a patient identifier."""
        if self.level == "IMAGE":
            n = len(self.keys["SOPInstanceUID"].split("\\"))
            return f"{n} instance(s) of SERIES {self.keys['SeriesInstanceUID']}"
        return _entity_name(self.level, self.keys)


def _entity_name(level: str, keys: dict[str, str]) -> str:
    if level == "PATIENT":
        return "a PATIENT (PatientID withheld)"
    return f"{level} {keys[UNIQUE_KEY[level]]}"


class _Receiver:
    """Files each received object into the cache; shared by C-GET and the storage SCP."""

    def __init__(
        self,
        cache: Cache,
        *,
        overwrite: bool,
        on_received: Callable[[str, dict[str, Any]], Any] | None,
        bar: Any,
        again: set[str] | None = None,
    ) -> None:
        self.cache = cache
        self.overwrite = overwrite
        self.on_received = on_received
        # Whether a WADO-RS response's index rows may be committed in batches (see
        # Cache._batched): not when on_received may look into the index.
        self.batch = on_received is None
        self.bar = bar
        # Cached objects of units requested whole: their rows say "cached" already.
        self.again = set() if overwrite else set(again or ())
        self.rows: list[dict[str, Any]] = []
        self.arrivals: list[tuple[str, bool]] = []  # (SOPInstanceUID, refused) as they come
        self.notes: list[str] = []
        self.error: BaseException | None = None
        self.stop = threading.Event()
        self.bytes = 0
        self.started = time.monotonic()
        self._lock = threading.Lock()
        self._filed: set[str] = set()

    def writer(self, request: StoreRequest) -> _ReceivedWriter:
        """An ``on_store`` for our own engine: a writer per incoming object.

        For :meth:`pacsframe.net.driver.ClientAssociation.get` and
        :class:`pacsframe.net.server.StorageServer`: the object streams into the
        cache (:meth:`Cache.receive`) and ``commit`` files it, with the rows,
        statuses, progress and ``on_received``. It never raises: what the
        cache refuses answers 0xC000, any other failure 0xC001, each with a
        failed row; an object cut short (``discard``) leaves no row.
        """
        return _ReceivedWriter(self, request)

    def _failed(self, sop_class: str, sop: str, exc: Exception) -> int:
        """Record an object that could not be filed; the status to answer it with."""
        if isinstance(exc, CacheError):
            self._record(sop_class, sop, None, "failed", str(exc), header=None)
            # 0xA700 family would invite a retry; the object itself is unacceptable.
            return 0xC000
        # The peer must get a status back, never our traceback.
        LOGGER.warning("could not file object %s: %s", sop, exc)
        self._record(sop_class, sop, None, "failed", f"could not be stored: {exc}", None)
        return 0xC001

    def _filed_ok(
        self,
        sop_class: str,
        sop: str,
        path: Any,
        header: dict[str, str | None],
        syntax: str,
        size: int,
    ) -> int:
        """Count, report and pass on an object the cache holds now; its status."""
        study = header["StudyInstanceUID"] or ""
        series = header["SeriesInstanceUID"] or ""
        sop = header["SOPInstanceUID"] or sop  # what the file is filed under
        if not self._first_arrival(sop):
            return 0x0000
        if sop in self.again:
            # Cached before this call and requested again with its unit: the cache kept
            # its copy (write() does not touch an indexed file) and its row says cached.
            return 0x0000
        meta = {
            "StudyInstanceUID": study,
            "SeriesInstanceUID": series,
            "SOPInstanceUID": sop,
            "SOPClassUID": sop_class,
            "TransferSyntaxUID": syntax,
            "size": size,
        }
        self._completed(sop_class, sop, str(path), meta, size)
        return 0x0000

    def _first_arrival(self, sop: str) -> bool:
        """Whether ``sop`` is filed for the first time in this retrieval (and note it).

        A peer that sends one object twice (in one request or two) gets one row, one
        count and one file.
        """
        with self._lock:
            again = sop in self._filed
            self._filed.add(sop)
        if again:
            LOGGER.warning("%s arrived twice in one retrieval; counted once", sop)
        return not again

    def _completed(
        self, sop_class: str, sop: str, path: str, meta: dict[str, Any], size: int
    ) -> None:
        """The row, progress and ``on_received`` of an object the cache holds now."""
        self._record(sop_class, sop, path, "completed", None, header=meta)
        self._deliver(path, meta, size)

    def _deliver(self, path: str, meta: dict[str, Any], size: int) -> None:
        """Progress and ``on_received`` for an object the cache holds now."""
        with self._lock:
            self.bytes += size
            if self.bar is not None:
                self.bar.update(1)
                elapsed = max(time.monotonic() - self.started, 1e-6)
                self.bar.set_postfix_str(f"{self.bytes / elapsed / 1e6:.1f} MB/s", refresh=False)
        if self.on_received is not None and not self.stop.is_set():
            try:
                self.on_received(path, meta)
            except BaseException as exc:
                # The object is safely cached; stop the retrieval and let the driver
                # cancel, release and re-raise the caller's exception.
                with self._lock:
                    self.error = self.error or exc
                self.stop.set()

    def extend(self, rows: list[dict[str, Any]], note: str | None = None) -> None:
        """Add rows the driver knows of (objects the peer failed to send), and a note."""
        with self._lock:
            self.rows.extend(rows)
            if note:
                self.notes.append(note)

    def _record(
        self,
        sop_class: str,
        sop: str,
        path: str | None,
        status: str,
        error: str | None,
        header: dict[str, Any] | None,
    ) -> None:
        row = {
            "StudyInstanceUID": (header or {}).get("StudyInstanceUID"),
            "SeriesInstanceUID": (header or {}).get("SeriesInstanceUID"),
            "SOPInstanceUID": sop or None,
            "SOPClassUID": sop_class or None,
            "path": path,
            "status": status,
            "error": error,
        }
        self._add_row(row)

    def _add_row(self, row: dict[str, Any]) -> None:
        with self._lock:
            self.rows.append(row)


class _ReceivedWriter:
    """What :meth:`_Receiver.writer` hands out: the cache's writer, with the receiver's books.

    An :class:`~pacsframe.net.operations.ObjectWriter` whose ``commit`` never
    raises: a failure to open, write or file the object becomes its status
    (0xC000 refused by the cache, 0xC001 anything else) and a failed row.
    Once a write failed, the rest of the object
    is read and dropped.
    """

    def __init__(self, receiver: _Receiver, request: StoreRequest) -> None:
        self.receiver = receiver
        self.request = request
        self.error: Exception | None = None
        self.incoming: IncomingObject | None = None
        try:
            self.incoming = receiver.cache.receive(request, overwrite=receiver.overwrite)
        except Exception as exc:
            self.error = exc

    def write(self, data: memoryview, /) -> None:
        """Pass one fragment on to the cache (dropped once a write failed)."""
        if self.incoming is None:
            return
        try:
            self.incoming.write(data)
        except Exception as exc:
            self.error = exc
            self.incoming.discard()
            self.incoming = None

    def commit(self) -> int:
        """File the object and do the receiver's books; the C-STORE-RSP status."""
        request, receiver = self.request, self.receiver
        code = self._commit()
        with receiver._lock:
            receiver.arrivals.append((request.sop_instance_uid, code != 0))
        return code

    def _commit(self) -> int:
        request, receiver = self.request, self.receiver
        sop_class, sop = request.sop_class_uid, request.sop_instance_uid
        if self.incoming is not None:
            try:
                self.incoming.commit()
            except Exception as exc:
                self.error = exc
            self.incoming, incoming = None, self.incoming
            if self.error is None:
                assert incoming.path is not None and incoming.header is not None
                return receiver._filed_ok(
                    sop_class,
                    sop,
                    incoming.path,
                    incoming.header,
                    request.transfer_syntax,
                    incoming.size,
                )
        assert self.error is not None
        return receiver._failed(sop_class, sop, self.error)

    def discard(self) -> None:
        """The object was cut short: remove what was written; no row, no arrival."""
        if self.incoming is not None:
            self.incoming.discard()
            self.incoming = None


def _result(
    rows: list[dict[str, Any]],
    requests: int,
    remote: dict[str, int],
    *,
    expected: int | None = None,
    notes: Sequence[str] = (),
) -> RetrieveResult:
    frame = pd.DataFrame(
        {c: pd.array([r.get(c) for r in rows], dtype="string") for c in _COLUMNS},
        columns=list(_COLUMNS),
    )
    return RetrieveResult(
        frame, requests=requests, remote=remote, expected=expected, notes=list(notes)
    )


# --- planning ---------------------------------------------------------------------------------


def _as_frame(frame: pd.DataFrame | pd.Series | Sequence[str]) -> pd.DataFrame:
    if isinstance(frame, pd.DataFrame):
        return frame
    if isinstance(frame, pd.Series):
        if frame.name not in UNIQUE_KEY.values():
            raise QueryError(
                "a Series to retrieve must be a UID column (StudyInstanceUID, "
                f"SeriesInstanceUID, SOPInstanceUID, PatientID); got {frame.name!r}."
            )
        return frame.to_frame()
    if isinstance(frame, (str, bytes)):
        raise QueryError(
            "give a frame, a Series of UIDs, or a list of StudyInstanceUIDs, not one string; "
            f"e.g. pacs.get([{frame!r}])."
        )
    values = list(frame)
    return pd.DataFrame({"StudyInstanceUID": frames.to_series(values, "StudyInstanceUID")})


def _keys_of(row: dict[str, Any], level: str, model: str) -> dict[str, str] | None:
    wanted = [*required_keys(level, model), UNIQUE_KEY[level]]
    keys = {k: frames.to_dicom(row.get(k), k) for k in wanted}
    return keys if all(keys.values()) else None


def _count_of(row: dict[str, Any], level: str) -> int | None:
    """The peer's instance count in a row of ``level`` (None when it gave none)."""
    value = row.get(INSTANCE_COUNT_KEY.get(level, ""))
    return None if value is None or frames.is_missing(value) else int(value)


def _reason(exc: BaseException) -> str:
    """An error in a note: its first sentence, and the peer's comment when it had one."""
    text = str(exc).strip().split(". ")[0].rstrip(".") or type(exc).__name__
    comment = getattr(exc, "comment", None)
    if comment and comment not in text:
        text += f" (the peer says: {comment})"
    return text


class _Planner:
    """Turns a frame into work units, subtracting what the cache holds."""

    def __init__(self, pacs: PACS, cache: Cache, model: str, overwrite: bool) -> None:
        self.pacs = pacs
        self.cache = cache
        self.model = model
        self.overwrite = overwrite
        self.units: list[_Unit] = []
        self.cached_rows: list[dict[str, Any]] = []
        # Objects accounted for without a request (the peer's counts of fully cached
        # entities, cached instances of a listing).
        self.settled = 0
        self.notes: list[str] = []  # listings that could not be trusted

    @property
    def again(self) -> set[str]:
        """The cached objects of the units requested whole: they arrive again."""
        return set().union(*(unit.held for unit in self.units))

    def expected(self, *, announced: bool = False) -> int | None:
        """The objects the peer announced for the frame, or None when a unit has no count.

        With ``announced``, a unit without a count from C-FIND counts what its
        first pending C-GET/C-MOVE response announced.
        """
        total = self.settled
        for unit in self.units:
            n = unit.expected
            if n is None and announced:
                n = unit.announced
            if n is None:
                return None
            total += n
        return total

    def plan(self, frame: pd.DataFrame) -> None:
        level = frames.infer_level(frame)
        if level == "PATIENT" and self.model != "patient":
            raise QueryError(
                "a frame of patients is retrieved in the patient-root model; pass "
                "model='patient' (the frame from find_patients is)."
            )
        missing = [k for k in required_keys(level, self.model) if k not in frame.columns]
        if missing:
            raise QueryError(
                f"retrieving at {level} level in the {self.model}-root model needs the "
                f"column(s) {missing}; pass a frame returned by a find_* call."
            )
        needed = list(dict.fromkeys([*required_keys(level, self.model), UNIQUE_KEY[level]]))
        absent = frame[needed].isna() | (frame[needed].astype("string") == "")
        if absent.any(axis=None):
            # Nothing can be requested for them; say so rather than skip in silence.
            names = " or ".join(c for c in needed if absent[c].any())
            warnings.warn(
                f"{int(absent.any(axis=1).sum())} row(s) of the frame have no {names}; "
                "nothing was requested for them (the peer's find_* answer lacked the "
                "UIDs; ask it again, or drop those rows).",
                frames.MalformedValueWarning,
                stacklevel=4,
            )
        rows = frame.drop_duplicates(subset=[UNIQUE_KEY[level]]).to_dict("records")
        self._plan_rows(level, rows)

    def _plan_rows(self, level: str, rows: list[dict[str, Any]]) -> None:
        if level == "IMAGE":
            self._plan_instances(rows)
            return
        # One index query for every entity of these rows, not one per row.
        key = UNIQUE_KEY[level]
        uids = [frames.to_dicom(r.get(key), key) for r in rows]
        held = {} if self.overwrite else self.cache.count(level, [u for u in uids if u])
        for row in rows:
            self._plan_entity(level, row, held)

    def _plan_entity(self, level: str, row: dict[str, Any], held: dict[str, int]) -> None:
        keys = _keys_of(row, level, self.model)
        if keys is None:
            return
        uid = keys[UNIQUE_KEY[level]]
        expected = _count_of(row, level)
        have = held.get(uid, 0)
        if have == 0:
            self.units.append(_Unit(level, keys, expected))
            return
        if expected is not None and have >= expected:
            self.cached_rows.extend(self._cached_under(level, uid))
            self.settled += expected
            return
        # Partly cached: list the level below and recurse, so that only what is
        # missing is requested; without a count to check that listing against,
        # or when it cannot be trusted, request the whole unit.
        below = None if expected is None else self._list_below(level, keys, expected)
        if below is None:
            held_rows = self._cached_under(level, uid)
            self.cached_rows.extend(held_rows)
            held_uids = frozenset(r["SOPInstanceUID"] for r in held_rows if r["SOPInstanceUID"])
            self.units.append(_Unit(level, keys, expected, whole=True, held=held_uids))
            return
        self._plan_rows(LEVELS[LEVELS.index(level) + 1], below)

    def _list_below(
        self, level: str, keys: dict[str, str], expected: int | None
    ) -> list[dict[str, Any]] | None:
        """The children of one entity from the peer, or None when they cannot be trusted.

        The rows come back with the parent's keys filled in, one per child.
        """
        child = LEVELS[LEVELS.index(level) + 1]
        try:
            # Matching on the parent's keys (not drilling down from a frame) keeps
            # the UIDs the peer put in each match, to check them.
            below = self.pacs.find(child, model=self.model, **keys)
        except PacsFrameError as exc:
            if isinstance(exc, AssociationError) and exc.reason == "timeout":
                # The peer stopped answering within dimse_timeout (or the call ran out
                # of time): a larger request would wait the same way. The call ends.
                raise
            # Refused, not supported, capped, aborted: any other failure of a listing
            # made only to plan costs at most a larger request.
            self._untrusted(level, keys, f"its {child}-level C-FIND failed: {_reason(exc)}")
            return None
        problem = _listing_problem(level, keys, expected, child, below)
        if problem:
            self._untrusted(level, keys, problem)
            return None
        rows = below.drop_duplicates(subset=[UNIQUE_KEY[child]]).to_dict("records")
        for row in rows:
            row.update(keys)
        return rows

    def warn(self, pacs: PACS) -> None:
        """One UnusableListingWarning for the units requested whole (from get or move)."""
        if not self.notes:
            return
        warnings.warn(
            f"{len(self.notes)} listing(s) {peer_name(pacs)} answered to plan this retrieval "
            f"could not be trusted, e.g. {self.notes[0]} Nothing is missing because of it: "
            "each such unit was requested whole, and what it already had in the cache "
            "counts as cached (see the result's notes).",
            UnusableListingWarning,
            stacklevel=4,
        )

    def _untrusted(self, level: str, keys: dict[str, str], reason: str) -> None:
        if keys.get("PatientID"):
            # A peer's comment or our own error may quote the key it was asked for.
            reason = reason.replace(keys["PatientID"], "<PatientID>")
        note = (
            f"{_entity_name(level, keys)}: the peer's listing of what it holds was not "
            f"used ({reason}); the {level.lower()} was requested whole."
        )
        LOGGER.info("%s", note)
        self.notes.append(note)

    def spread(self, workers: int) -> None:
        """Split patient/study units into their series while workers would sit idle.

        One C-FIND per split unit buys parallel C-GETs of its series; a unit whose
        listing cannot be trusted stays whole.
        """
        for _ in range(2):  # PATIENT -> STUDY -> SERIES at most
            if len(self.units) >= workers or not any(_splittable(u) for u in self.units):
                return
            spread: list[_Unit] = []
            for unit in self.units:
                if not _splittable(unit):
                    spread.append(unit)
                    continue
                below = self._list_below(unit.level, unit.keys, unit.expected)
                if below is None:
                    unit.whole = True
                    spread.append(unit)
                    continue
                child = LEVELS[LEVELS.index(unit.level) + 1]
                for row in below:
                    keys = _keys_of(row, child, self.model)
                    if keys is not None:  # always, for a trusted listing
                        spread.append(_Unit(child, keys, _count_of(row, child)))
            self.units = spread

    def _cached_under(self, level: str, uid: str) -> list[dict[str, Any]]:
        return [_cached_row(r) for r in self.cache.locate_records(level, [uid])]

    def _plan_instances(self, rows: list[dict[str, Any]]) -> None:
        sops = [frames.to_dicom(r.get("SOPInstanceUID"), "SOPInstanceUID") for r in rows]
        have = set() if self.overwrite else self.cache.cached([s for s in sops if s])
        if have:
            held = self.cache.locate_records("IMAGE", sorted(have))
            self.cached_rows.extend(_cached_row(r) for r in held)
        self.settled += len(have)
        by_series: dict[tuple[str, ...], list[str]] = {}
        for row, sop in zip(rows, sops, strict=True):
            if not sop or sop in have:
                continue
            keys = _keys_of(row, "IMAGE", self.model)
            if keys is None:
                continue
            parent = tuple(v for k, v in keys.items() if k != "SOPInstanceUID")
            by_series.setdefault(parent, []).append(sop)
        parent_names = [k for k in required_keys("IMAGE", self.model)]
        for parent, uids in by_series.items():
            for start in range(0, len(uids), _UIDS_PER_REQUEST):
                chunk = uids[start : start + _UIDS_PER_REQUEST]
                keys = dict(zip(parent_names, parent, strict=True))
                keys["SOPInstanceUID"] = "\\".join(chunk)
                self.units.append(_Unit("IMAGE", keys, len(chunk)))


def _splittable(unit: _Unit) -> bool:
    return unit.level in ("PATIENT", "STUDY") and not unit.whole


def _listing_problem(
    level: str, keys: dict[str, str], expected: int | None, child: str, below: pd.DataFrame
) -> str | None:
    """Why a listing of ``child`` rows under one entity cannot be trusted, or None."""
    key = UNIQUE_KEY[child]
    if not len(below):
        return f"its {child}-level C-FIND answered no match"
    if key not in below.columns or below[key].isna().any():
        bad = len(below) if key not in below.columns else int(below[key].isna().sum())
        return f"{bad} of its {len(below)} {child}-level match(es) have no {key}"
    for parent_key, value in keys.items():
        if parent_key not in below.columns:
            continue
        named = below[parent_key].dropna().astype("string")
        other = int((named != value).sum())
        if other:
            return f"{other} of its {child}-level match(es) name another {parent_key}"
    if expected is None:
        return None  # keyed and consistent: as good as the peer's word gets
    unique = below.drop_duplicates(subset=[key])
    parent_count = f"{INSTANCE_COUNT_KEY[level]} in the {level} row says {expected}"
    if child == "IMAGE":
        if len(unique) != expected:
            return f"it listed {len(unique)} instance(s) and {parent_count}"
        return None
    count_key = INSTANCE_COUNT_KEY[child]
    if count_key not in unique.columns or unique[count_key].isna().any():
        return f"its {child}-level matches have no {count_key} to check against {parent_count}"
    total = int(unique[count_key].sum())
    if total != expected:
        return f"its {child}-level matches hold {total} instance(s) in all and {parent_count}"
    return None


def _cached_row(record: dict[str, Any]) -> dict[str, Any]:
    return {
        "StudyInstanceUID": record.get("StudyInstanceUID"),
        "SeriesInstanceUID": record.get("SeriesInstanceUID"),
        "SOPInstanceUID": record.get("SOPInstanceUID"),
        "SOPClassUID": record.get("SOPClassUID"),
        "path": record.get("path"),
        "status": "cached",
        "error": None,
    }


# --- running ---------------------------------------------------------------------------------


def _identifier(unit: _Unit, model: str, syntax: str) -> bytes:
    """The unit's C-GET/C-MOVE identifier, encoded in the retrieve context's ``syntax``."""
    query = build_query(unit.level, model, defaults=False)
    out = DicomBytesIO()
    out.is_little_endian = True
    out.is_implicit_VR = syntax == IMPLICIT_VR_LITTLE_ENDIAN
    write_dataset(out, query.with_keys(**unit.keys).dataset())
    return out.getvalue()


def _syntax(assoc: ClientAssociation, model_uid: str) -> str:
    """The transfer syntax the peer accepted for the retrieve context."""
    return assoc.contexts[assoc.context_for(model_uid)][1]


def _failed_list(response: RetrieveResponse, syntax: str) -> str:
    """The Failed SOP Instance UID List a final response carries ('' when none)."""
    if not response.identifier:
        return ""
    try:
        ds = read_dataset(
            io.BytesIO(response.identifier), syntax == IMPLICIT_VR_LITTLE_ENDIAN, True
        )
        return (
            frames.dicom_strings(ds, ["FailedSOPInstanceUIDList"])["FailedSOPInstanceUIDList"]
            or ""
        )
    except Exception as exc:
        # A list we cannot read names nobody: the counts still account for them.
        LOGGER.warning("could not read a retrieve response's identifier: %s", exc)
        return ""


def _tls_scp_hint(pacs: PACS, destination: str | None) -> str:
    """A hint when the failed destination is our storage SCP and it speaks only TLS."""
    from .pacs import TLS

    tls = pacs.tls
    if destination != pacs.calling_ae or not isinstance(tls, TLS) or tls.cert is None:
        return ""
    return (
        " Our storage SCP speaks only DICOM TLS (tls.cert is set): the peer must deliver to "
        'it with TLS (Orthanc: "UseDicomTls": true for this modality) and trust the CA '
        "that signed tls.cert."
    )


# What to do about a C-GET/C-MOVE failure, by status class (the high byte).
_ADVICE = {
    0: "Check the peer's log.",
    0xA700: "The peer ran out of resources: try again later, or with fewer parallel "
    "associations (workers=).",
    0xA900: "The peer says the identifier does not fit the information model: pass a frame "
    "from this peer's find_* answer, and check model= ('study' or 'patient').",
    0xC000: "The peer could not process the request: its log says why; retrieving smaller "
    "parts (series instead of studies) may get past it.",
}


def _peer_failures(
    pacs: PACS,
    final: RetrieveResponse,
    listed: str,
    seen: list[tuple[str, bool]],
    unit: _Unit,
    what: str,
) -> tuple[list[dict[str, Any]], str | None]:
    """Rows for the objects of a request that never reached us, and a note when unexplained.

    ``seen`` holds (SOPInstanceUID, refused by us) for each object that arrived for
    this request; ``listed`` is the final response's Failed SOP Instance UID List
    (backslash-separated). Objects the peer names in that list get a
    row each. When the peer announced a number (its C-FIND count for the unit, else
    its first pending response's sub-operation counts), everything announced that
    did not arrive gets a row whatever the final status said (by SOPInstanceUID for
    a list of instances, anonymous otherwise); without a number, the failures it
    counts without naming do. The note says when the arrivals differ from the
    announced number by more than the peer's own failure counts explain.
    """
    arrived = {sop for sop, _ in seen}
    kept = unit.held - arrived  # cached before and not sent again: still in the cache
    ours = sum(refused for _, refused in seen)
    filed = len({sop for sop, refused in seen if not refused})
    named = [u for u in dict.fromkeys(listed.split("\\")) if u and u not in arrived]
    code = final.status
    counted = max(0, (final.failed or 0) - ours - len(named))
    announced = unit.expected if unit.expected is not None else unit.announced
    unnamed = counted
    if announced is not None:
        unnamed = max(0, announced - len(arrived) - len(kept) - len(named))
    # The peer lists the entity, so it holds at least one object of it: nothing sent,
    # nothing counted and no count is not an empty success.
    nothing = announced is None and unit.level != "IMAGE" and not arrived and not named
    if nothing and not counted:
        unnamed = 1
    lost: list[str] = []
    if unit.level == "IMAGE":
        asked = unit.keys["SOPInstanceUID"].split("\\")
        lost = [u for u in asked if u and u not in arrived and u not in named][:unnamed]
        unnamed -= len(lost)
    study = unit.keys.get("StudyInstanceUID")
    series = unit.keys.get("SeriesInstanceUID")
    base = {"StudyInstanceUID": study, "SeriesInstanceUID": series, "SOPClassUID": None}
    base |= {"path": None, "status": "failed"}
    if nothing and not counted:
        why = (
            f"{pacs.ae_title} sent nothing for the {what}, counted no failure and gave no "
            f"count, though its C-FIND lists this {unit.level} (final status 0x{code:04X})."
        )
    elif announced is None:
        why = (
            f"{pacs.ae_title} ended the {what} with 0x{code:04X} without naming the objects "
            "it did not send."
        )
    else:
        why = (
            f"{pacs.ae_title} announced {announced} object(s) for the {what}, {len(arrived)} "
            f"arrived, and it ended with 0x{code:04X} without naming the others."
        )
    rows = [
        {
            **base,
            "SOPInstanceUID": uid,
            "error": f"{pacs.ae_title} could not send it: its C-STORE sub-operation of the "
            f"{what} failed (final status 0x{code:04X}).",
        }
        for uid in named
    ]
    rows += [
        {
            **base,
            "SOPInstanceUID": uid,
            "error": f"not received: {pacs.ae_title} ended the {what} with 0x{code:04X} "
            "without sending it (it may no longer hold it).",
        }
        for uid in lost
    ]
    rows += [
        {**base, "SOPInstanceUID": None, "error": f"not received: {why}"} for _ in range(unnamed)
    ]
    completed = final.completed
    if completed is not None and completed != filed:
        # The counts reported are what arrived, whatever the peer says.
        LOGGER.warning(
            "%s counted %s completed sub-operation(s) of the %s; %d object(s) arrived",
            pacs.ae_title,
            completed,
            what,
            filed,
        )
    note = f"{unit.name()}: {why}" if nothing and not counted else None
    present = len(arrived) + len(kept)
    if (
        announced is not None
        and present != announced
        and present + len(named) + counted != announced
    ):
        source = "its C-FIND count" if unit.expected is not None else "its first pending response"
        note = (
            f"{unit.name()}: {pacs.ae_title} announced {announced} object(s) for the {what} "
            f"({source}) and {len(arrived)} arrived"
        )
        if kept:
            note += f", {len(kept)} more were cached already"
        if unit.expected is not None and unit.announced not in (None, unit.expected):
            note += f"; its first pending response counted {unit.announced} sub-operation(s)"
        if counted or named:
            note += f"; it counted {counted + len(named)} as failed"
        note += f" (final status 0x{code:04X})."
    return rows, note


def _announce(unit: _Unit, response: RetrieveResponse) -> None:
    """Keep what the first pending response with sub-operation counts announced."""
    if unit.announced is None and response.pending:
        unit.announced = _sub_total(response)


def _sub_total(response: RetrieveResponse) -> int | None:
    """The number of sub-operations a C-GET/C-MOVE response accounts for (None: no counts)."""
    values = [response.remaining, response.completed, response.failed, response.warning]
    if all(v is None for v in values):
        return None
    return sum(v or 0 for v in values)


def _ours_only(
    final: RetrieveResponse, seen: list[tuple[str, bool]], missed: list[dict[str, Any]]
) -> bool:
    """True for "all sub-operations failed" (0xA702) when we refused every object.

    The rows already say why (e.g. a UID that is not valid); the peer's "out of
    resources" would only mislead.
    """
    return final.status == 0xA702 and not missed and bool(seen) and all(r for _, r in seen)


def _final_status(
    response: RetrieveResponse, what: str, pacs: PACS, destination: str | None
) -> dict[str, int]:
    code = response.status
    counts = {
        "completed": response.completed or 0,
        "failed": response.failed or 0,
        "warning": response.warning or 0,
    }
    category = code_to_category(code)
    if code == 0x0000 or category == "Warning":
        return counts
    comment = response.comment
    detail = f" The peer says: {comment}." if comment else ""
    if destination is not None and (
        code == 0xA801 or (code == 0xC000 and not comment and not any(counts.values()))
    ):
        raise MoveDestinationUnknown(
            f"{pacs.ae_title} answered the C-MOVE to {destination!r} with 0x{code:04X}"
            f"{' (move destination unknown)' if code == 0xA801 else ' and no comment'}."
            f"{detail} The peer must know {destination!r} with its host and port (register "
            "the AE at the PACS, e.g. Orthanc's DicomModalities); check that registration."
            f"{_tls_scp_hint(pacs, destination)}",
            status=code,
            comment=str(comment) if comment else None,
        )
    if code == 0xFE00:
        raise DimseError(f"the {what} was cancelled.", status=code)
    raise DimseError(
        f"{pacs.ae_title} answered the {what} with 0x{code:04X} ({category}).{detail} "
        f"{_ADVICE.get(code & 0xFF00, _ADVICE[0])}",
        status=code,
        comment=str(comment) if comment else None,
    )


class _Seen:
    """A receiver's writer that also notes, per request, what arrived and whether we refused it."""

    __slots__ = ("seen", "sop", "writer")

    def __init__(self, writer: ObjectWriter, seen: list[tuple[str, bool]], sop: str) -> None:
        self.writer = writer
        self.seen = seen
        self.sop = sop

    def write(self, data: memoryview, /) -> object:
        return self.writer.write(data)

    def commit(self) -> int | None:
        code = self.writer.commit()
        self.seen.append((self.sop, bool(code)))
        return code

    def discard(self) -> None:
        self.writer.discard()


class _Worker(threading.Thread):
    """One association, many units: C-GET each and let the receiver file the objects.

    (For :class:`_ProcessWorker`: built as ``_Worker(peer, units, receiver, *extra)``,
    ``extra`` ending with its name; ``protocol`` names it in messages.)

    Everything on the association happens in this thread (pacsframe's engine is
    blocking): :meth:`cancel`, from any thread, asks it to send C-CANCEL at the
    next message boundary; the call's ``timeout=`` is the association's limit,
    which the engine enforces itself (C-CANCEL, then abort).
    """

    protocol = "C-GET"

    def __init__(
        self,
        pacs: PACS,
        units: queue.Queue[_Unit],
        receiver: _Receiver,
        model: str,
        contexts: list[tuple[str, Sequence[str]]],
        roles: list[Any],
        name: str,
    ) -> None:
        super().__init__(name=name, daemon=True)
        self.pacs = pacs
        self.units = units
        self.receiver = receiver
        self.model = model
        self.contexts = contexts
        self.roles = roles
        self.requests = 0
        self.failures: list[BaseException] = []
        self.cancelled = False  # a request ended by our C-CANCEL
        self.assoc: ClientAssociation | None = None
        self.seen: list[tuple[str, bool]] = []  # what arrived for the request in flight
        # The call's timeout= (a context variable) holds in this thread too.
        self.context = contextvars.copy_context()

    def _unsupported(self) -> NotSupported:
        return NotSupported(
            f"{self.pacs.ae_title} accepts no C-GET in the {self.model}-root model from "
            f"{self.pacs.calling_ae!r}; retrieve with pacs.move(frame) instead (C-MOVE to "
            "our storage SCP).",
            status=0x0122,
        )

    def run(self) -> None:
        try:
            self.context.run(self._run)
        except NotSupported as exc:
            # Refused outright (no context at all) reads better as "no C-GET here".
            self.failures.append(self._unsupported() if exc.status == 0x0122 else exc)
            self.receiver.stop.set()
        except LimitReached as exc:
            self._stopped(exc)  # and aborted
        except BaseException as exc:
            # Handed to the driver thread, which re-raises it after stopping the others.
            self.failures.append(exc)
            self.receiver.stop.set()

    def _run(self) -> None:
        with self.pacs.session(
            self.contexts, purpose=self.name, roles=self.roles, keep=False
        ) as assoc:
            self.assoc = assoc
            if self.receiver.stop.is_set():
                assoc.interrupt()  # stopped while we associated
            model_uid = GET_MODELS[self.model]
            if not any(abstract == model_uid for abstract, _ in assoc.contexts.values()):
                raise self._unsupported()
            try:
                self._units(assoc, model_uid, _syntax(assoc, model_uid))
            except LimitReached as exc:
                if exc.action == "aborted":
                    raise
                # Cancelled, or stopped between requests: the association is sound
                # and is released.
                self._stopped(exc)

    def _units(self, assoc: ClientAssociation, model_uid: str, syntax: str) -> None:
        while not self.receiver.stop.is_set():
            try:
                unit = self.units.get_nowait()
            except queue.Empty:
                return
            if assoc.limit is not None and time.monotonic() >= assoc.limit:
                self.units.put(unit)  # never requested: the result says what is missing
                raise LimitReached("the time given ran out between requests", "none")
            self._get(assoc, unit, model_uid, syntax)

    def _stopped(self, exc: LimitReached) -> None:
        """A request ended by our C-CANCEL or the call's limit: note it, stop the others."""
        if isinstance(exc, Interrupted):
            self.cancelled = True  # we asked: Ctrl-C, another worker, on_received
        else:
            self.failures.append(exc)  # the call's timeout=
        self.receiver.stop.set()

    def _store(self, request: StoreRequest) -> ObjectWriter:
        # C-STOREs of a C-GET arrive on this thread, inside assoc.get.
        return _Seen(self.receiver.writer(request), self.seen, request.sop_instance_uid)

    def _get(self, assoc: ClientAssociation, unit: _Unit, model_uid: str, syntax: str) -> None:
        self.requests += 1
        self.seen = []
        what = f"{unit.level}-level C-GET"
        final: RetrieveResponse | None = None
        try:
            for response in assoc.get(
                _identifier(unit, self.model, syntax), model_uid, self._store
            ):
                _announce(unit, response)
                if not response.pending:
                    final = response
                elif self.receiver.stop.is_set():
                    assoc.interrupt()  # C-CANCEL before the next message
        except LimitReached:
            raise  # the call's timeout=, or our own interrupt (Interrupted)
        except DimseError as exc:
            final = getattr(exc, "response", None)  # a failure status: its counts count
            if final is None:
                raise
        except AssociationError as exc:
            raise self.pacs.explain_loss(exc, what) from exc
        if final is None:  # pragma: no cover - the engine yields or raises a final response
            raise AssociationError(f"no final {what} response", reason="aborted")
        if final.status == 0xFE00 and self.receiver.stop.is_set():
            self.cancelled = True
            return
        listed = _failed_list(final, syntax)
        missed, note = _peer_failures(self.pacs, final, listed, self.seen, unit, what)
        self.receiver.extend(missed, note)
        if _ours_only(final, self.seen, missed):
            return
        _final_status(final, what, self.pacs, None)

    def cancel(self) -> None:
        """Ask the peer to stop the C-GET in flight (C-CANCEL, sent by this worker)."""
        if self.assoc is not None:
            self.assoc.interrupt()

    def abort(self) -> None:
        """Have this worker abort its association at its next read."""
        if self.assoc is not None:
            self.assoc.interrupt(abort=True)


class _Flag:
    """A stop flag a signal handler may set: ``threading.Event.set`` takes a lock the
    interrupted code might hold."""

    __slots__ = ("_set",)

    def __init__(self) -> None:
        self._set = False

    def set(self) -> None:
        self._set = True

    def is_set(self) -> bool:
        return self._set


class _ChildReceiver(_Receiver):
    """A worker process's receiver: it files objects itself, and sends its rows,
    progress and ``on_received`` to the parent's :class:`_Receiver`."""

    def __init__(
        self, link: ChildLink, cache: Cache, *, overwrite: bool, again: set[str], batch: bool
    ) -> None:
        super().__init__(cache, overwrite=overwrite, on_received=None, bar=None, again=again)
        self.batch = batch  # decided by the parent, which alone calls on_received
        self.link = link
        self.stop = _Flag()  # type: ignore[assignment]

    def _add_row(self, row: dict[str, Any]) -> None:
        self.link.send("row", row)

    def _completed(
        self, sop_class: str, sop: str, path: str, meta: dict[str, Any], size: int
    ) -> None:
        # One message: the caller checks it against what other processes filed.
        self.link.send("completed", sop_class, sop, path, meta, size)

    def extend(self, rows: list[dict[str, Any]], note: str | None = None) -> None:
        self.link.send("extend", rows, note)


class _AskedUnits:
    """The child's view of the parent's queue of units (``get_nowait``/``put``).

    Whatever a worker learnt of a unit it took (``announced``, the sub-operation
    total of its first pending response) goes back to the parent's copy when the
    child asks for its next unit, and at its end (:meth:`settle`).
    """

    def __init__(self, link: ChildLink) -> None:
        self.link = link
        self.current: int | None = None
        self._unit: _Unit | None = None

    def get_nowait(self) -> _Unit:
        self.settle()
        lent = self.link.ask("unit")
        if lent is None:
            raise queue.Empty
        self.current, unit = lent
        self._unit = unit
        return unit

    def put(self, unit: _Unit) -> None:
        self._unit = None  # back in the parent's queue: another worker may take it
        self.link.send("put", self.current)

    def settle(self) -> None:
        """Tell the parent what the unit in hand announced."""
        unit, self._unit = self._unit, None
        if unit is not None:
            self.link.send("announced", self.current, unit.announced)


class _ProcessWorker(ProcessWorker):
    """A thread worker (:class:`_Worker`, or WADO-RS's ``_WebWorker``) that runs in
    a worker process (see :mod:`pacsframe.workers`), with the same face to
    :func:`_run` and the callers.

    ``kind`` is the thread worker's class, built as ``kind(peer, units, receiver,
    *extra)`` (``extra`` ends with its name): in the child with the units the
    parent lends and a :class:`_ChildReceiver`, or here in a thread when no
    worker process can start (:func:`_run`). ``peer`` crosses as its settings
    (:meth:`PACS.__getstate__`, :meth:`DICOMweb.__getstate__`). The child files
    what arrives into the one cache itself (SQLite's locking shares the index
    between processes); the parent keeps the queue of units, the rows and the
    progress bar, and calls ``on_received``.
    """

    def __init__(
        self, kind: type, peer: Any, units: queue.Queue[_Unit], receiver: _Receiver, *extra: Any
    ) -> None:
        name = extra[-1]
        cache = receiver.cache
        settings = (cache.root, receiver.overwrite, sorted(receiver.again), receiver.batch)
        args = (kind, peer, settings, extra, Deadline.current())
        super().__init__(name, _child_get, args, self._on_message)
        self.kind = kind
        self.thread_args = (peer, units, receiver, *extra)
        self.units = units
        self.receiver = receiver
        self.requests = 0
        self.failures: list[BaseException] = []
        self.cancelled = False
        self._lent: list[_Unit] = []
        self._done = False

    def in_thread(self) -> Any:
        """The same worker as a thread of this process (no worker process could start)."""
        return self.kind(*self.thread_args)

    def _on_message(self, message: tuple[Any, ...]) -> Any:
        kind, *rest = message
        receiver = self.receiver
        if kind == "completed":
            # Another process may have filed it too (a peer sending one object in two
            # requests): counted once, as with threads.
            if receiver._first_arrival(rest[1]):
                receiver._completed(*rest)
        elif kind == "row":
            receiver._add_row(rest[0])
        elif kind == "?":  # the child asks for its next unit
            if receiver.stop.is_set():
                return None
            try:
                unit = self.units.get_nowait()
            except queue.Empty:
                return None
            self._lent.append(unit)
            return len(self._lent) - 1, unit
        elif kind == "announced":
            self._lent[rest[0]].announced = rest[1]
        elif kind == "put":
            self.units.put(self._lent[rest[0]])
        elif kind == "extend":
            receiver.extend(*rest)
        elif kind == "done":
            self._done = True
            self.requests, self.cancelled = rest[0], rest[1]
            self.failures.extend(restore(f) for f in rest[2])
            if self.failures:
                receiver.stop.set()
        elif kind == "crashed":
            self.failures.append(restore(rest[0]))
            receiver.stop.set()
        elif kind == "ended" and not self._done:
            self.failures.append(
                AssociationError(
                    f"the {self.kind.protocol} worker process {self.name} ended without a "
                    "result (it was killed, or crashed); what it filed is in the cache, "
                    "and the same call again fetches only what is missing.",
                    reason="aborted",
                )
            )
            receiver.stop.set()
        return None


def _child_get(
    link: ChildLink,
    kind: type,
    peer: Any,
    settings: tuple[Any, bool, list[str], bool],
    extra: tuple[Any, ...],
    deadline: Deadline | None,
) -> None:
    """A worker process's retrievals: the units the parent lends, filed into the cache."""
    from .cache import Cache

    root, overwrite, again, batch = settings
    receiver = _ChildReceiver(
        link, Cache(root), overwrite=overwrite, again=set(again), batch=batch
    )
    units = _AskedUnits(link)
    with deadline_scope(deadline):
        # The worker copies this context: the call's timeout= holds in here too.
        worker = kind(peer, units, receiver, *extra)

    def cancel() -> None:
        receiver.stop.set()
        worker.cancel()

    def abort() -> None:
        receiver.stop.set()
        worker.abort()

    link.on_cancel, link.on_abort = cancel, abort
    if link.aborted:  # asked before the handlers above were set
        abort()
    elif link.cancelled:
        cancel()
    started, used = time.monotonic(), resource.getrusage(resource.RUSAGE_SELF)
    worker.run()  # in this process's only thread; failures are collected, not raised
    units.settle()
    now = resource.getrusage(resource.RUSAGE_SELF)
    LOGGER.debug(
        "worker process %s: %d request(s), %.3f s, CPU %.3f s user + %.3f s system",
        extra[-1],
        worker.requests,
        time.monotonic() - started,
        now.ru_utime - used.ru_utime,
        now.ru_stime - used.ru_stime,
    )
    failures = [portable(f) for f in worker.failures]
    link.send("done", worker.requests, worker.cancelled, failures)


def _parallel(pacs: PACS) -> bool:
    """Whether this call's parallel associations may run in worker processes."""
    # A TLS context the caller built (not pf.TLS settings) cannot reach a child.
    return available() and not isinstance(pacs.tls, ssl.SSLContext)


def _progress(total: int | None, enabled: bool, what: str) -> Any:
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, unit="obj", desc=what, leave=True)


def get(
    pacs: PACS,
    frame: pd.DataFrame | pd.Series | Sequence[str],
    *,
    workers: int = 4,
    progress: bool = True,
    on_received: Callable[[str, dict[str, Any]], Any] | None = None,
    overwrite: bool = False,
    model: str | None = None,
    timeout: float | None = None,
) -> RetrieveResult:
    """C-GET everything ``frame`` describes into ``pacs.cache``. See :meth:`PACS.get`."""
    if not isinstance(workers, int) or isinstance(workers, bool) or workers < 1:
        raise QueryError(f"workers={workers!r} must be a whole number of at least 1.")
    with deadline_for(timeout, "get"):
        return _get(pacs, frame, workers, progress, on_received, overwrite, model)


def _get(
    pacs: PACS,
    frame: pd.DataFrame | pd.Series | Sequence[str],
    workers: int,
    progress: bool,
    on_received: Callable[[str, dict[str, Any]], Any] | None,
    overwrite: bool,
    model: str | None,
) -> RetrieveResult:
    deadline = Deadline.current()
    frame = _as_frame(frame)
    model = normalize_model(model or _model_of(frame))
    cache = pacs.cache
    if workers > 1 and _parallel(pacs):
        warm()  # the worker server's imports overlap the planning C-FINDs
    planner = _Planner(pacs, cache, model, overwrite)
    _plan(planner, frame, "get", workers)
    planner.warn(pacs)
    bar = _progress(planner.expected(), progress, f"C-GET from {pacs.ae_title}")
    if bar is not None and planner.cached_rows:
        bar.update(len(planner.cached_rows))
    receiver = _Receiver(
        cache, overwrite=overwrite, on_received=on_received, bar=bar, again=planner.again
    )
    units: queue.Queue[_Unit] = queue.Queue()
    for unit in planner.units:
        units.put(unit)
    contexts, roles = retrieve_negotiation(
        GET_MODELS[model], _storage(), transfer_syntaxes=_RETRIEVE_SYNTAXES
    )
    n = min(workers, len(planner.units))
    # Parallel associations in processes where forking is safe: threads would
    # share one GIL, and overlap only their waits.
    kind = functools.partial(_ProcessWorker, _Worker) if n > 1 and _parallel(pacs) else _Worker
    threads: list[Any] = [
        kind(pacs, units, receiver, model, contexts, roles, f"pacsframe-get-{i}") for i in range(n)
    ]
    LOGGER.info(
        "C-GET from %s: %d request(s) over %d association(s), %d object(s) already cached",
        pacs.ae_title,
        len(planner.units),
        len(threads),
        len(planner.cached_rows),
    )
    try:
        # The call's timeout= is each association's limit: every worker cancels
        # (or aborts) its own request when it passes.
        _run(threads, receiver)
    finally:
        if bar is not None:
            bar.close()
    requests = sum(t.requests for t in threads)
    result = _finish(planner, receiver.rows, receiver.notes, requests, {})
    failures = [f for t in threads for f in t.failures]
    if receiver.error is not None:
        raise receiver.error
    limited = _at_limit(deadline, failures)
    # Cut short: a request cancelled or failed, or units never requested.
    if fired(deadline) and (failures or not units.empty() or any(t.cancelled for t in threads)):
        cause = limited or (failures[0] if failures else None)
        raise _with_result(_deadline_error(deadline, "C-GET", cause), result, "get")
    if failures:
        raise _with_result(failures[0], result, "get")
    _warn_counts(pacs, result, receiver.notes)
    return result


_RETRIEVE_ADVICE = "Raise timeout= (None: no overall limit), or retrieve less at a time."


@functools.cache
def _storage() -> tuple[tuple[str, tuple[str, ...]], ...]:
    """The storage contexts a C-GET proposes, as (SOP class, transfer syntaxes).

    Built once: the 127 contexts cost about 12 ms, which a fully cached re-run
    (no request at all) would otherwise pay every time.
    """
    return tuple(
        (str(cx.abstract_syntax), tuple(str(ts) for ts in cx.transfer_syntax))
        for cx in storage_contexts()
    )


def _at_limit(deadline: Deadline | None, failures: list[BaseException]) -> BaseException | None:
    """The first failure the call's ``timeout=`` caused, marking the deadline as fired.

    The engine enforces the limit in each association's thread
    (:class:`~pacsframe.net.driver.LimitReached`); an abort anywhere is what the
    error reports, as it is the harder end.
    """
    limits = [f for f in failures if isinstance(f, LimitReached)]
    limits.sort(key=lambda f: getattr(f, "action", "") == "aborted")
    for exc in limits:
        timed_out(deadline, exc, "C-GET")
    return limits[-1] if limits else None


def _deadline_error(
    deadline: Deadline | None, doing: str, cause: BaseException | None
) -> BaseException:
    """The timeout error of a retrieval the deadline stopped, caused by ``cause``."""
    assert deadline is not None
    if cause is not None:
        return timed_out(deadline, cause, doing, _RETRIEVE_ADVICE)
    return deadline.error(doing, _RETRIEVE_ADVICE)


def _plan(planner: _Planner, frame: pd.DataFrame, call: str, workers: int = 1) -> None:
    """Plan ``frame`` (and spread it over ``workers``); attach what is cached when the
    deadline stops a planning C-FIND."""
    try:
        planner.plan(frame)
        planner.spread(workers)
    except PacsFrameError as exc:
        error = timed_out(Deadline.current(), exc, f"C-{call.upper()}", _RETRIEVE_ADVICE)
        if error is exc:
            raise
        stopped = _with_result(error, _result(planner.cached_rows, 0, {}), call)
        raise stopped from error.__cause__


def _finish(
    planner: _Planner,
    rows: list[dict[str, Any]],
    notes: list[str],
    requests: int,
    remote: dict[str, int],
) -> RetrieveResult:
    """The result: what the plan found cached, what arrived, and every note."""
    expected = planner.expected(announced=True)
    return _result(
        planner.cached_rows + rows,
        requests,
        remote,
        expected=expected,
        notes=planner.notes + notes,
    )


def _warn_counts(
    pacs: PACS, result: RetrieveResult, notes: list[str], destination: str | None = None
) -> None:
    """One CountMismatchWarning for the requests whose arrivals the peer's counts contradict.

    ``destination``: the other AE of a move, which only the peer's counts speak of.
    """
    if not notes:
        return
    came, place = "arrived", "in the cache"
    if destination is not None:
        came = f"it reports delivered to {destination!r}"
        place = f"reported delivered to {destination!r}"
    total = (
        "It gave no count for some of the request"
        if result.expected is None
        else f"The peer announced {result.expected} object(s) in all and {result.shortfall} "
        f"of them are not {place}"
    )
    warnings.warn(
        f"what {peer_name(pacs)} announced differs from what {came} for "
        f"{len(notes)} request(s), e.g. {notes[0]} {total} (see the result's notes and "
        "failed_instances). Run the same call again to request what is missing; if it "
        "stays short, the peer's counts or its archive are inconsistent: ask its "
        "administrator.",
        CountMismatchWarning,
        stacklevel=4,
    )


def _with_result(exc: BaseException, result: RetrieveResult, call: str) -> BaseException:
    """Attach what was retrieved to a failure, and say that a re-run resumes."""
    if not isinstance(exc, Exception):
        return exc
    exc.result = result  # type: ignore[attr-defined]
    if isinstance(exc, (DimseError, AssociationError)) and exc.args and result.completed:
        exc.args = (
            f"{exc.args[0]} The {result.completed} object(s) that arrived are in the cache "
            f"(this error's .result lists them); pacs.{call}() with the same frame fetches "
            "only what is missing.",
            *exc.args[1:],
        )
    return exc


def _run(threads: list[Any], receiver: _Receiver) -> None:
    """Run the workers (threads or :class:`_ProcessWorker`) until each has ended.

    A worker process that cannot start (the worker server could not run: an
    embedding without a usable ``sys.executable``, a sandbox without fork) is
    replaced by a thread in ``threads``, with a warning in the log.
    """
    for i, thread in enumerate(threads):
        try:
            thread.start()
        except OSError as exc:
            if not isinstance(thread, _ProcessWorker):
                raise
            LOGGER.warning("no worker process (%s); this association runs in a thread", exc)
            threads[i] = thread.in_thread()
            threads[i].start()
    stopping = False
    try:
        for thread in threads:
            # Short joins keep the main thread responsive to Ctrl-C.
            while thread.is_alive():
                thread.join(0.1)
                if receiver.stop.is_set() and not stopping:
                    # A worker failed, or on_received raised: the others cancel
                    # their requests in flight rather than finish them.
                    stopping = True
                    for other in threads:
                        other.cancel()
    except KeyboardInterrupt:
        # Each worker sends C-CANCEL on its own association, files what still
        # arrives and releases; one that has not ended in 10 s aborts.
        receiver.stop.set()
        for thread in threads:
            thread.cancel()
        deadline = time.monotonic() + 10
        for thread in threads:
            thread.join(max(0.0, deadline - time.monotonic()))
            if thread.is_alive():
                thread.abort()
        for thread in threads:
            thread.join(1.0)
        raise


def _model_of(frame: pd.DataFrame) -> str:
    attrs = frame.attrs.get("pacsframe", {}) if isinstance(frame, pd.DataFrame) else {}
    if isinstance(attrs, dict) and attrs.get("model") in ("study", "patient"):
        return str(attrs["model"])
    return "patient" if frames.infer_level(frame) == "PATIENT" else "study"


def move(
    pacs: PACS,
    frame: pd.DataFrame | pd.Series | Sequence[str],
    *,
    destination: str | None = None,
    progress: bool = True,
    on_received: Callable[[str, dict[str, Any]], Any] | None = None,
    overwrite: bool = False,
    model: str | None = None,
    timeout: float | None = None,
) -> RetrieveResult:
    """C-MOVE everything ``frame`` describes. See :meth:`PACS.move`."""
    with deadline_for(timeout, "move"):
        return _move(pacs, frame, destination, progress, on_received, overwrite, model)


def _move(
    pacs: PACS,
    frame: pd.DataFrame | pd.Series | Sequence[str],
    destination: str | None,
    progress: bool,
    on_received: Callable[[str, dict[str, Any]], Any] | None,
    overwrite: bool,
    model: str | None,
) -> RetrieveResult:
    deadline = Deadline.current()
    frame = _as_frame(frame)
    model = normalize_model(model or _model_of(frame))
    ours = destination is None or destination.strip() == pacs.calling_ae
    target = pacs.calling_ae if ours else destination.strip()  # type: ignore[union-attr]
    cache = pacs.cache if ours else None
    planner = _Planner(pacs, cache if cache is not None else _NoCache(), model, overwrite)
    _plan(planner, frame, "move")
    planner.warn(pacs)
    bar = _progress(planner.expected(), progress and ours, f"C-MOVE from {pacs.ae_title}")
    if bar is not None and planner.cached_rows:
        bar.update(len(planner.cached_rows))
    receiver = (
        _Receiver(
            cache, overwrite=overwrite, on_received=on_received, bar=bar, again=planner.again
        )
        if cache is not None
        else None
    )
    remote = {"completed": 0, "failed": 0, "warning": 0}
    remote_notes: list[str] = []
    requests = 0
    stopped = False  # by the deadline, before every unit was done
    scp = StorageSCP(pacs, receiver.writer) if receiver is not None else None
    failure: PacsFrameError | None = None
    holder: list[ClientAssociation] = []

    def run() -> None:
        nonlocal requests, stopped
        model_uid = MOVE_MODELS[model]
        # The call's timeout= is the association's limit: the engine cancels the
        # request in flight when it passes (then aborts if the peer does not stop).
        # The same model's C-FIND context too: dcmqrscp (with --require-find) refuses
        # a C-MOVE on an association that did not propose it.
        contexts = [(model_uid, _RETRIEVE_SYNTAXES), (str(FIND_MODELS[model]), _RETRIEVE_SYNTAXES)]
        with pacs.session(contexts, purpose="move", keep=False) as assoc:
            holder.append(assoc)
            syntax = _syntax(assoc, model_uid)
            for unit in planner.units:
                if receiver is not None and receiver.stop.is_set():
                    break
                if assoc.limit is not None and time.monotonic() >= assoc.limit:
                    timed_out(deadline, LimitReached("between requests", "none"), "C-MOVE")
                    stopped = True  # the rest was not asked for
                    break
                requests += 1
                what = f"{unit.level}-level C-MOVE"
                first = len(receiver.arrivals) if receiver is not None else 0
                try:
                    final = _move_one(assoc, unit, model, model_uid, syntax, target, receiver)
                except LimitReached as exc:
                    if exc.action == "aborted":
                        raise
                    if not isinstance(exc, Interrupted):
                        timed_out(deadline, exc, "C-MOVE")
                    stopped = True  # cancelled: nothing failed; the rest was not asked for
                    break
                except AssociationError as exc:
                    raise pacs.explain_loss(exc, what) from exc
                if receiver is not None:
                    # Our SCP filed this request's objects before the final response.
                    seen = receiver.arrivals[first:]
                    listed = _failed_list(final, syntax)
                    missed, note = _peer_failures(pacs, final, listed, seen, unit, what)
                    receiver.extend(missed, note)
                    if _ours_only(final, seen, missed):
                        continue
                counts = _final_status(final, what, pacs, target)
                if not ours:
                    for key, value in counts.items():
                        remote[key] += value
                    untold, note = _untold(pacs, unit, counts, what)
                    remote["failed"] += untold
                    remote_notes.extend([note] if note else [])

    try:
        if scp is not None:
            scp.start()
        _in_thread(run, holder, "pacsframe-move")
    except PacsFrameError as exc:
        failure = exc
        if isinstance(exc, LimitReached) and not isinstance(exc, Interrupted):
            timed_out(deadline, exc, "C-MOVE")  # the engine acted for the deadline
    finally:
        if scp is not None:
            scp.stop()
        if bar is not None:
            bar.close()
    if receiver is not None and receiver.error is not None:
        raise receiver.error
    rows, notes = (receiver.rows, receiver.notes) if receiver is not None else ([], remote_notes)
    result = _finish(planner, rows, notes, requests, {} if ours else remote)
    if fired(deadline) and (stopped or failure is not None):
        failure = _deadline_error(deadline, "C-MOVE", failure)  # type: ignore[assignment]
    if failure is not None:
        raise _with_result(failure, result, "move")
    _warn_counts(pacs, result, notes, None if ours else target)
    return result


def _in_thread(work: Callable[[], None], holder: list[ClientAssociation], name: str) -> None:
    """Run ``work`` (an association's whole life) in a thread of its own, and wait.

    The association's I/O stays in that thread, so Ctrl-C here asks it to cancel
    (C-CANCEL at the next message boundary, then release) instead of cutting a
    read in two; after 10 s it aborts. ``holder`` gets the association once open.
    What ``work`` raises is raised here.
    """
    failures: list[BaseException] = []
    context = contextvars.copy_context()  # the call's timeout= holds there too

    def target() -> None:
        try:
            context.run(work)
        except BaseException as exc:
            failures.append(exc)

    thread = threading.Thread(target=target, name=name, daemon=True)
    thread.start()
    try:
        # Short joins keep this thread responsive to Ctrl-C.
        while thread.is_alive():
            thread.join(0.1)
    except KeyboardInterrupt:
        for assoc in holder:
            assoc.interrupt()
        thread.join(10)
        if thread.is_alive():
            for assoc in holder:
                assoc.interrupt(abort=True)
            thread.join(1)
        raise
    if failures:
        raise failures[0]


def _move_one(
    assoc: ClientAssociation,
    unit: _Unit,
    model: str,
    model_uid: str,
    syntax: str,
    target: str,
    receiver: _Receiver | None,
) -> RetrieveResponse:
    """One C-MOVE request: its final response (a failure status's too).

    ``on_received`` raising (the receiver stops) cancels it at the next response.
    """
    final: RetrieveResponse | None = None
    try:
        for response in assoc.move(_identifier(unit, model, syntax), model_uid, target):
            _announce(unit, response)
            if not response.pending:
                final = response
            elif receiver is not None and receiver.stop.is_set():
                assoc.interrupt()  # C-CANCEL before the next message
    except LimitReached:
        raise
    except DimseError as exc:
        final = getattr(exc, "response", None)  # a failure status: its counts count
        if final is None:
            raise
    if final is None:  # pragma: no cover - the engine yields or raises a final response
        raise AssociationError("no final C-MOVE response", reason="aborted")
    return final


def _untold(pacs: PACS, unit: _Unit, counts: dict[str, int], what: str) -> tuple[int, str | None]:
    """For a move to another AE: how many announced objects its final counts leave out.

    We see no object there, only the peer's counts; what they do not account for
    of what it announced (or, with no count at all, of an entity it lists and so
    holds at least one object of) counts as failed, with a note.
    """
    announced = unit.expected if unit.expected is not None else unit.announced
    told = sum(counts.values())
    if announced is None:
        if told or unit.level == "IMAGE":
            return 0, None
        return 1, (
            f"{unit.name()}: {pacs.ae_title}'s final counts for the {what} account for "
            f"nothing and it gave no count, though its C-FIND lists this {unit.level}."
        )
    if told >= announced:
        return 0, None
    return announced - told, (
        f"{unit.name()}: {pacs.ae_title} announced {announced} object(s) for the {what} "
        f"and its final counts account for {told}."
    )


class _NoCache:
    """Stands in for the cache when moving to another AE: nothing is held locally."""

    def count(self, level: str, uids: Iterable[str]) -> dict[str, int]:
        return {}

    def cached(self, uids: Iterable[str]) -> set[str]:
        return set()

    def locate(self, level: str, uids: Iterable[str]) -> pd.DataFrame:
        return pd.DataFrame(columns=list(_COLUMNS))

    def locate_records(self, level: str, uids: Iterable[str]) -> list[dict[str, Any]]:
        return []
