"""The C-FIND service: queries into typed frames over pacsframe's own engine.

:class:`pacsframe.PACS` validates a call and hands it here with itself as the
peer (its settings and :meth:`~pacsframe.PACS.session`). One query runs on one
association (``session(query_contexts(), "query")``; a Modality Worklist query on
one of its own, ``session(query_contexts("worklist"), "worklist")``, its answers
one row per scheduled step); a drill-down over many
parents is one C-FIND per parent on it. Each response's identifier goes as
bytes to :class:`~pacsframe.frames.FrameBuilder` (``add_raw``); only what that
cannot read goes through pydicom. Capped answers are detected here and split
by :mod:`pacsframe.caps`; the call's ``timeout=`` is the association's limit.
"""

from __future__ import annotations

import contextlib
import logging
import warnings
from collections.abc import Callable, Iterator, Sequence
from io import BytesIO
from typing import TYPE_CHECKING, Any

import pandas as pd
from pydicom.filereader import read_dataset
from pynetdicom.sop_class import (
    ModalityWorklistInformationFind,
    PatientRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelFind,
    Verification,
)
from pynetdicom.status import (
    MODALITY_WORKLIST_SERVICE_CLASS_STATUS,
    QR_FIND_SERVICE_CLASS_STATUS,
    code_to_category,
)

from . import caps, frames
from .deadline import Deadline, deadline_for, fired
from .errors import (
    AssociationError,
    DimseError,
    NotSupported,
    PacsFrameError,
    ProtocolError,
    QueryError,
    ResultsCapped,
)
from .net import driver
from .query import LEVELS, UNIQUE_KEY, Query

if TYPE_CHECKING:
    from .pacs import PACS

__all__ = [
    "FIND_MODELS",
    "collect",
    "parents_of",
    "partial",
    "query_contexts",
    "run",
    "same_level",
]

LOGGER = logging.getLogger("pacsframe")

FIND_MODELS = {
    "study": StudyRootQueryRetrieveInformationModelFind,
    "patient": PatientRootQueryRetrieveInformationModelFind,
}
# The C-FIND SOP class of each query model, the Modality Worklist one included.
_MODEL_UIDS = {**FIND_MODELS, "worklist": ModalityWorklistInformationFind}
# What to do about a C-FIND failure, by status class (the high byte).
_FIND_ADVICE = {
    0: "Check the matching keys against what the peer supports.",
    0xA700: "The peer ran out of resources: narrow the query (more matching keys, a "
    "shorter date range) or try again later.",
    0xA900: "The peer says the identifier does not fit the information model: check the "
    "level and model= ('study' or 'patient').",
    0xC000: "The peer could not process the query: check the matching keys against what "
    "the peer supports, and the peer's log.",
}

#: What a query association proposes (pacsframe's engine): C-ECHO and both
#: C-FIND models, each in the two uncompressed little-endian syntaxes, whose
#: identifiers go to the frame as bytes (``FrameBuilder.add_raw``).
_LITTLE_ENDIAN = ("1.2.840.10008.1.2.1", "1.2.840.10008.1.2")
_IMPLICIT_VR_LITTLE_ENDIAN = "1.2.840.10008.1.2"


def query_contexts(model: str = "study") -> list[tuple[str, tuple[str, ...]]]:
    """The presentation contexts of a query association: Verification and C-FIND.

    Both query/retrieve models, or (``model="worklist"``) the Modality Worklist
    model alone: a worklist provider (a RIS, ``wlmscpfs``) often has no Q/R, a
    PACS often no worklist, so each kind has its own association.
    """
    models = ["worklist"] if model == "worklist" else list(FIND_MODELS)
    return [(str(Verification), _LITTLE_ENDIAN)] + [
        (str(_MODEL_UIDS[m]), _LITTLE_ENDIAN) for m in models
    ]


def _status_text(code: int, table: dict[int, tuple[str, str]]) -> str:
    category, text = table.get(code, (code_to_category(code), "unknown status"))
    return f"0x{code:04X} {category}: {text}" if text else f"0x{code:04X} {category}"


def _add_decoded(builder: frames.FrameBuilder, data: bytes, implicit_vr: bool) -> bool:
    """Add an identifier ``FrameBuilder.add_raw`` left to pydicom; False when undecodable."""
    try:
        builder.add(read_dataset(BytesIO(data), implicit_vr, True))
    except Exception as exc:  # pydicom raises many kinds on malformed data
        LOGGER.debug("an identifier could not be decoded: %r", exc)
        return False
    return True


def same_level(frame: Any, query: Query) -> bool:
    """Whether ``frame`` is a frame of ``query``'s level (from its attrs)."""
    attrs = frame.attrs.get("pacsframe", {}) if isinstance(frame, pd.DataFrame) else {}
    return isinstance(attrs, dict) and attrs.get("level") == query.level


def _carry_parents(result: pd.DataFrame, parents: pd.DataFrame, owners: list[int]) -> pd.DataFrame:
    """Put the parents' columns (repeated per child row) in front of the children's."""
    carried = parents.iloc[owners].reset_index(drop=True)
    carried.attrs = {}
    children = result.drop(columns=[c for c in result.columns if c in carried.columns])
    out = pd.concat([carried, children.reset_index(drop=True)], axis=1)
    # Where the parent lacks a value the child knows (e.g. a parent column that was
    # empty), prefer the child's answer.
    for column in result.columns.intersection(carried.columns):
        if result[column].dtype == out[column].dtype and out[column].isna().any():
            out[column] = out[column].where(out[column].notna(), result[column].to_numpy())
    return out


def _check_answer(frame: pd.DataFrame, level: str, peer: str, service: str = "C-FIND") -> None:
    """Warn about rows a retrieval or drill-down trips over: no, invalid or repeated UIDs."""
    what = f"the {level}-level {service} answer from {peer}"
    key = UNIQUE_KEY.get(level)  # a worklist has no unique key
    if key in frame.columns:
        missing = int(frame[key].isna().sum())
        if missing:
            warnings.warn(
                f"{missing} row(s) of {what} have no {key}, the level's unique key; the "
                "peer sent malformed data. They are kept, but cannot be retrieved or "
                "drilled down from.",
                frames.MalformedValueWarning,
                stacklevel=6,
            )
        values = frame[key].dropna()
        repeated = values[values.duplicated()].unique()
        if len(repeated) and level != "PATIENT":  # one PatientID may have two issuers
            warnings.warn(
                f"{len(repeated)} {key} value(s) appear in more than one row of {what} "
                f"(e.g. {repeated[0]!r}); the peer sent malformed data. All rows are "
                "kept; a retrieval requests each UID once.",
                frames.MalformedValueWarning,
                stacklevel=6,
            )
    for column in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID"):
        if column not in frame.columns:
            continue
        values = pd.Series(frame[column].dropna().unique(), dtype="string")
        bad = values[~(values.str.len().le(64) & values.str.fullmatch(frames.UID_PATTERN))]
        if len(bad):
            warnings.warn(
                f"{len(bad)} distinct {column} value(s) in {what} are not valid UIDs (e.g. "
                f"{bad.iloc[0][:70]!r}); the peer sent malformed data. They are kept as "
                "sent, but objects under them cannot be cached.",
                frames.MalformedValueWarning,
                stacklevel=6,
            )


def parents_of(
    pacs: Any, parents: pd.DataFrame | pd.Series | Sequence[str], query: Query
) -> pd.DataFrame:
    """The parent rows to drill down from, with every key the child query needs."""
    level_index = LEVELS.index(query.level)
    if isinstance(parents, pd.Series):
        if parents.name not in UNIQUE_KEY.values():
            raise QueryError(
                "a Series to drill down from must be a UID column (PatientID, "
                f"StudyInstanceUID, SeriesInstanceUID); got {parents.name!r}."
            )
        frame = parents.to_frame()
    elif isinstance(parents, pd.DataFrame):
        frame = parents
    elif isinstance(parents, (str, bytes)):
        raise QueryError(
            "parents must be a frame or a list of UIDs, not a single string; pass "
            f"[{parents!r}] or a matching key such as StudyInstanceUID=..."
        )
    else:
        if level_index == 0:
            raise QueryError("patient-level queries have no parents to drill down from.")
        key = UNIQUE_KEY[LEVELS[level_index - 1]]
        values = list(parents)
        frame = pd.DataFrame({key: frames.to_series(values, key)})
    parent_level = frames.infer_level(frame)
    if LEVELS.index(parent_level) >= level_index:
        raise QueryError(
            f"cannot drill down to {query.level} from a frame at {parent_level} level; "
            "pass a frame of a level above, or filter this frame with pandas."
        )
    needed = [*query.keys_required(), UNIQUE_KEY[parent_level]]
    missing = [k for k in dict.fromkeys(needed) if k not in frame.columns]
    if missing:
        next_level = LEVELS[LEVELS.index(parent_level) + 1]
        if next_level == query.level or (
            query.model == "patient" and parent_level != "PATIENT" and "PatientID" in missing
        ):
            raise QueryError(
                f"drilling down to {query.level} needs the column(s) {missing} in the "
                "parent frame; pass a frame returned by a find_* call."
            )
        # Drill through the level in between (e.g. studies -> series -> instances).
        frame = pacs.find(next_level, frame, model=query.model)
    return frame


def run(
    pacs: PACS, query: Query, parents: pd.DataFrame | None, progress: bool = True
) -> pd.DataFrame:
    """C-FIND ``query`` (once, or once per parent) on one association: see :func:`collect`."""
    model_uid = _MODEL_UIDS[query.model]
    worklist = query.model == "worklist"

    @contextlib.contextmanager
    def connect() -> Iterator[Ask]:
        purpose = "worklist" if worklist else "query"
        with pacs.session(query_contexts(query.model), purpose) as assoc:
            if not any(abstract == model_uid for abstract, _ in assoc.contexts.values()):
                if worklist:
                    raise NotSupported(
                        f"{pacs.ae_title} does not offer the Modality Worklist C-FIND "
                        f"({model_uid}); ask a worklist provider (the RIS, or the "
                        "modality worklist server the scanners use) instead.",
                        status=0x0122,
                    )
                other = "patient" if query.model == "study" else "study"
                accepted = {abstract for abstract, _ in assoc.contexts.values()}
                advice = (
                    f"use model={other!r}."
                    if str(FIND_MODELS[other]) in accepted
                    else "it accepts neither query/retrieve model: it may be a worklist "
                    "server only (use find_worklist) or a storage SCP."
                )
                raise NotSupported(
                    f"{pacs.ae_title} does not support C-FIND in the {query.model}-root "
                    f"model; {advice}",
                    status=0x0122,
                )

            def ask(asked: Query, builder: frames.FrameBuilder) -> str | None:
                return _find_one(pacs, assoc, asked, model_uid, builder)

            yield ask

    return collect(pacs, query, parents, connect, progress=progress, name=pacs.ae_title)


#: ``ask(query, builder) -> reason or None``: send one query, add its matches to the
#: builder, and say why the answer was cut short (None: complete).
Ask = Callable[[Query, frames.FrameBuilder], "str | None"]


def collect(
    peer: Any,
    query: Query,
    parents: pd.DataFrame | None,
    connect: Callable[[], contextlib.AbstractContextManager[Ask]],
    *,
    progress: bool = True,
    name: str,
    service: str = "C-FIND",
) -> pd.DataFrame:
    """Run ``query`` (once, or once per parent row) over any search service into one frame.

    The part C-FIND and QIDO-RS share: one request per parent (their columns
    carried along), capped answers split by :mod:`pacsframe.caps` and merged
    (every row once, or :class:`ResultsCapped` with ``.partial``), the rows a
    call's ``timeout=`` cut short as ``.partial``, and the answer checked for
    missing or invalid UIDs.

    Parameters
    ----------
    peer
        The facade: ``peer.max_results`` (the silent cap), ``peer.peer`` (for
        attrs), and ``peer.find`` (to drill through a level in between).
    connect : callable
        A context manager that opens the connection and yields ``ask``.
    name : str
        The peer, as messages name it (an AE title, a URL without credentials).
    service : str
        ``"C-FIND"`` or ``"QIDO-RS"``, for messages.
    """
    builder = query.builder()
    owners: list[int] = []
    requests = [(-1, query)] if parents is None else list(_child_queries(peer, query, parents))
    counter = caps.Progress(query.what.replace("C-FIND", service), show=progress)
    # (first row, end row, outcome) of each request whose answer was capped.
    splits: list[tuple[int, int, caps.Outcome[range]]] = []
    with connect() as ask:

        def run(keys: dict[str, str]) -> caps.Answer[range]:
            before, matches = len(builder), builder.matches
            truncated = ask(Query(query.level, query.model, keys), builder)
            # Caps count matches (identifiers), which a worklist answer spreads over
            # one row per step.
            return caps.Answer(range(before, len(builder)), builder.matches - matches, truncated)

        owner = -1
        try:
            for owner, request in requests:
                before = len(builder)
                outcome = caps.split_find(
                    run, request.keys, query.level, cap=peer.max_results, progress=counter
                )
                owners.extend([owner] * (len(builder) - before))
                if outcome.split:
                    splits.append((before, len(builder), outcome))
        except PacsFrameError as exc:
            if fired(Deadline.current()) or isinstance(exc, driver.LimitReached):
                # The rows of the request in flight belong to its parent too.
                owners.extend([owner] * (len(builder) - len(owners)))
                exc.partial = partial(  # type: ignore[attr-defined]
                    peer, query, builder, parents, owners
                )
            raise
        finally:
            counter.close()
    result = builder.frame()
    if splits:
        result, owners = _merge_splits(name, result, owners, query, splits, service)
    _check_answer(result, query.level, name, service)
    LOGGER.info(
        "%s %s level (%s root) at %s: %d request(s), %d match(es)",
        service,
        query.level,
        query.model,
        name,
        counter.queries,
        len(result),
    )
    if parents is not None:
        result = _carry_parents(result, parents, owners)
    result.attrs["pacsframe"] = {
        **query.to_json(),
        "peer": peer.peer,
        "requests": counter.queries,
        "split": bool(splits),
    }
    capped = [outcome for _, _, outcome in splits if outcome.capped]
    if capped:
        windows = [w for outcome in capped for w in outcome.capped]
        more = (
            f" (in {len(capped)} of the {len(requests)} parent queries)"
            if parents is not None
            else ""
        )
        raise ResultsCapped(
            caps.capped_message(
                query.level, name, capped[0], len(result), more=more, service=service
            ),
            partial=result,
            windows=windows,
            cap=capped[0].cap,
        )
    return result


def _merge_splits(
    name: str,
    result: pd.DataFrame,
    owners: list[int],
    query: Query,
    splits: list[tuple[int, int, caps.Outcome[range]]],
    service: str = "C-FIND",
) -> tuple[pd.DataFrame, list[int]]:
    """Drop the rows a split answer repeats (capped answers overlap their pieces)."""
    keep = pd.Series(True, index=result.index)
    unmatched: dict[str, int] = {}
    for start, end, outcome in splits:
        part = result.iloc[start:end]
        keep.iloc[start:end] = ~caps.repeated(part, query.level).to_numpy()
        for key in outcome.unmatched:
            if key in part.columns:
                kept = part[key][keep.iloc[start:end].to_numpy()]
                unmatched[key] = unmatched.get(key, 0) + int(kept.isna().sum())
    LOGGER.info(
        "%s %s level at %s: %d capped answer(s) split and merged; %d repeated row(s) dropped",
        service,
        query.level,
        name,
        len(splits),
        int((~keep).sum()),
    )
    for key, count in unmatched.items():
        if key == caps.SPLIT_KEYS[query.level][0]:
            what = f"the query was split into {key} windows"
            kept = f" ({count} such row(s) here)"
        else:  # the time key: only the days split by time lose their untimed rows
            what = f"a day holding at least the cap was split into {key} windows"
            kept = ""
        warnings.warn(
            f"{name} capped the {query.what.replace('C-FIND', service)} answer and {what}; "
            f"entities with no {key} match no window, so only those in a capped answer "
            f"are included{kept} and more may exist. Give {key}=... to leave them out "
            "on purpose, or ask the PACS administrator to raise the limit.",
            stacklevel=6,
        )
    mask = keep.to_numpy()
    owners = [owner for owner, kept in zip(owners, mask, strict=True) if kept]
    return result[mask].reset_index(drop=True), owners


def partial(
    pacs: Any,
    query: Query,
    builder: frames.FrameBuilder,
    parents: pd.DataFrame | None,
    owners: list[int],
) -> pd.DataFrame:
    """The rows received before a call's ``timeout=`` stopped it, typed as usual.

    Each row once: the answers of a split query overlap their capped first answer.
    """
    result = builder.frame()
    keep = ~caps.repeated(result, query.level).to_numpy()
    result = result[keep].reset_index(drop=True)
    owners = [owner for owner, kept in zip(owners, keep, strict=True) if kept]
    if parents is not None:
        result = _carry_parents(result, parents, owners)
    result.attrs["pacsframe"] = {**query.to_json(), "peer": pacs.peer, "partial": True}
    return result


def _child_queries(pacs: Any, query: Query, parents: pd.DataFrame) -> Iterator[tuple[int, Query]]:
    keys = list(dict.fromkeys([*query.keys_required(), UNIQUE_KEY[frames.infer_level(parents)]]))
    for key in keys:
        if query.keys.get(key):
            raise QueryError(
                f"{key} comes from the parent frame when drilling down; do not also "
                f"pass {key}=... (filter the parent frame instead)."
            )
    seen: set[tuple[str, ...]] = set()
    columns = [parents[k].tolist() for k in keys]
    for position, values in enumerate(zip(*columns, strict=True)):
        texts = tuple(frames.to_dicom(v, k) for k, v in zip(keys, values, strict=True))
        if any(not t for t in texts):
            missing = [k for k, t in zip(keys, texts, strict=True) if not t]
            warnings.warn(
                f"parent row {position} has no {', '.join(missing)}; it was skipped.",
                stacklevel=5,
            )
            continue
        if texts in seen:
            continue
        seen.add(texts)
        child = query.with_keys(**dict(zip(keys, texts, strict=True)))
        child.check_required()
        yield position, child


def _find_one(
    pacs: PACS,
    assoc: driver.ClientAssociation,
    query: Query,
    model_uid: str,
    builder: frames.FrameBuilder,
) -> str | None:
    """Run one C-FIND into ``builder``; say why its answer is cut short, or None.

    pacsframe sends C-CANCEL during a find only when the call's ``timeout=`` runs
    out, and then the driver raises :class:`~pacsframe.net.driver.LimitReached`
    (an interrupt aborts the association), so a final 0xFE00 is the peer
    stopping at its result limit.
    """
    what = query.what
    deadline = Deadline.current()
    if deadline is not None:
        deadline.check(what)
    cid = assoc.context_for(model_uid)
    implicit = assoc.contexts[cid][1] == _IMPLICIT_VR_LITTLE_ENDIAN
    identifier = query.encode(implicit)
    add_raw = builder.add_raw
    undecodable = 0
    count = 0
    code, comment = -1, None
    try:
        # The last item is the final response: its status and comment stay.
        for code, comment, data in assoc.find_responses(model_uid, identifier):  # noqa: B007
            if data is not None:  # a pending response and its match
                count += 1
                if not add_raw(data, implicit) and not _add_decoded(builder, data, implicit):
                    undecodable += 1
    except driver.LimitReached:
        raise  # find() turns it into the timeout error, with the rows so far
    except ProtocolError:
        raise
    except AssociationError as exc:
        raise pacs.explain_loss(exc, what) from None
    if undecodable:
        warnings.warn(
            f"{undecodable} match(es) in the {what} answer "
            f"from {pacs.ae_title} could not be decoded and are missing from the "
            "frame; the peer sent malformed identifiers (pacsframe's debug log "
            "says how).",
            frames.MalformedValueWarning,
            stacklevel=10,
        )
    if code == 0x0000:
        return None
    detail = f" The peer says: {comment}." if comment else ""
    if code == 0xFE00:
        return (
            f"it ended an answer with 0xFE00 (Cancel) after {count} match(es) although "
            "pacsframe sent no C-CANCEL"
        )
    if code == 0xB001:
        return f"it answered 0xB001 (response limit reached) after {count} match(es)"
    if ((code & 0xF000) == 0xC000 or (code & 0xFF00) == 0xA700) and caps.names_a_size(comment):
        return f"it refused with 0x{code:04X}, {str(comment)!r}, after {count} match(es)"
    category = code_to_category(code)
    statuses = (
        MODALITY_WORKLIST_SERVICE_CLASS_STATUS
        if query.is_worklist
        else QR_FIND_SERVICE_CLASS_STATUS
    )
    if category == "Warning":
        warnings.warn(
            f"{pacs.ae_title} ended the C-FIND with {_status_text(code, statuses)}.{detail}",
            stacklevel=10,
        )
        return None
    raise DimseError(
        f"{pacs.ae_title} answered the {what} with "
        f"{_status_text(code, statuses)}.{detail} "
        f"{_FIND_ADVICE.get(code & 0xFF00, _FIND_ADVICE[0])}",
        status=code,
        comment=str(comment) if comment else None,
    )


class FindMethods:
    """``find_patients/studies/series/instances`` over ``self.find``.

    :class:`~pacsframe.pacs.PACS` (C-FIND) and :class:`~pacsframe.dicomweb.DICOMweb`
    (QIDO-RS) share them, so the two keep one public surface. ``_call`` prefixes the
    call's name in timeout errors (``"web."`` for DICOMweb).
    """

    _call = ""

    def find(self, level: str, parents: Any = None, **keys: Any) -> pd.DataFrame:
        raise NotImplementedError  # pragma: no cover - the facades define it

    def find_patients(self, *, timeout: float | None = None, **keys: Any) -> pd.DataFrame:
        """Patients (patient-root model). See :meth:`find`."""
        with deadline_for(timeout, f"{self._call}find_patients"):
            return self.find("PATIENT", None, model="patient", **keys)

    def find_studies(
        self,
        parents: pd.DataFrame | pd.Series | Sequence[str] | None = None,
        *,
        timeout: float | None = None,
        **keys: Any,
    ) -> pd.DataFrame:
        """Studies; ``parents`` may be a frame of patients. See :meth:`find`."""
        with deadline_for(timeout, f"{self._call}find_studies"):
            return self.find("STUDY", parents, **keys)

    def find_series(
        self,
        parents: pd.DataFrame | pd.Series | Sequence[str] | None = None,
        *,
        timeout: float | None = None,
        **keys: Any,
    ) -> pd.DataFrame:
        """Series; ``parents`` is usually a frame of studies. See :meth:`find`."""
        with deadline_for(timeout, f"{self._call}find_series"):
            return self.find("SERIES", parents, **keys)

    def find_instances(
        self,
        parents: pd.DataFrame | pd.Series | Sequence[str] | None = None,
        *,
        timeout: float | None = None,
        **keys: Any,
    ) -> pd.DataFrame:
        """Instances (IMAGE level); ``parents`` is usually a frame of series. See :meth:`find`."""
        with deadline_for(timeout, f"{self._call}find_instances"):
            return self.find("IMAGE", parents, **keys)
