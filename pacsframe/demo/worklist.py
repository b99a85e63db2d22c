"""Modality Worklist for the demo PACS: a deterministic demo worklist and the C-FIND SCP.

A worklist is a list of worklist entries: datasets with the patient's and the
requested procedure's attributes at top level and one item per Scheduled Procedure
Step in the Scheduled Procedure Step Sequence (PS3.4 Annex K). The demo PACS
answers Modality Worklist C-FIND requests from such a list, or from a folder of
``*.wl`` files read at each request (as ``wlmscpfs`` and Orthanc's worklist plugin
do), with the matching engine of every other query (:func:`pacsframe.matching.match`)
over one row per step.

Sequence matching (PS3.4 C.2.2.2.6): the request's Scheduled Procedure Step
Sequence holds one item of keys; an entry matches when its top-level keys match
and at least one of its steps matches every key of that item. Its response carries
the requested top-level attributes and, in the sequence, the steps that matched,
each with only the requested attributes. An empty (or absent) item asks for whole
steps.

:func:`make_worklist` is the default demo worklist: synthetic patients (no real
person), deterministic, scheduled on :data:`DEMO_DATE` and the day after.

Examples
--------
>>> entries = make_worklist()
>>> len(entries), sum(len(e.ScheduledProcedureStepSequence) for e in entries)
(5, 7)
>>> steps_frame(entries).Modality.value_counts().to_dict()
{'CT': 3, 'MR': 2, 'US': 1, 'DX': 1}
"""

from __future__ import annotations

import copy
import datetime as _dt
import logging
import os
import struct
import uuid
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from pydicom import config, datadict, dcmread
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.errors import InvalidDicomError
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import ExplicitVRLittleEndian
from pynetdicom import evt
from pynetdicom.sop_class import ModalityWorklistInformationFind

from .. import frames, matching
from ..errors import QueryError
from ..query import SPS_SEQUENCE_TAG

__all__ = [
    "DEMO_DATE",
    "Worklist",
    "handle_worklist_find",
    "make_worklist",
    "steps_frame",
    "write_worklist",
]

LOGGER = logging.getLogger(__name__)

#: The day the demo worklist's first steps are scheduled on (some are on the next day).
DEMO_DATE = _dt.date(2026, 3, 2)

_TAG_CHARSET = 0x00080005
_NAMESPACE = uuid.uuid5(uuid.NAMESPACE_URL, "https://pacsframe.invalid/demo/worklist")

# (PatientID, PatientName, birth date, sex, accession, requested procedure, referring
# physician, steps); a step is (day offset, time, modality, station AE, station name,
# location, performing physician, description). Names are invented; one needs UTF-8.
_DEMO: tuple[tuple[Any, ...], ...] = (
    (
        "WL0001",
        "Doe^Jane",
        "19700412",
        "F",
        "ACC1001",
        "CT chest with contrast",
        "House^Gregory",
        [(0, "0830", "CT", "CT01", "CT ROOM 1", "RAD-1", "Grey^Meredith", "CT chest")],
    ),
    (
        "WL0002",
        "Roe^Richard",
        "19581130",
        "M",
        "ACC1002",
        "Head MR and CT angiography",
        "House^Gregory",
        [
            (0, "0915", "MR", "MR01", "MR ROOM 1", "RAD-2", "Yang^Cristina", "MR brain"),
            (0, "1400", "CT", "CT01", "CT ROOM 1", "RAD-1", "Grey^Meredith", "CTA head"),
        ],
    ),
    (
        "WL0003",
        "Łukasiewicz^Zoë",
        "19920105",
        "F",
        "ACC1003",
        "Abdominal ultrasound",
        "Quinn^Michaela",
        [(0, "1030", "US", "US01", "US ROOM 1", "RAD-3", "Karev^Alex", "US abdomen")],
    ),
    (
        "WL0004",
        "Smith^John",
        "19850720",
        "M",
        "ACC1004",
        "Knee MR and X-ray",
        "Quinn^Michaela",
        [
            (0, "1530", "DX", "DX01", "XRAY ROOM", "RAD-4", "Karev^Alex", "XR knee"),
            (1, "0800", "MR", "MR01", "MR ROOM 1", "RAD-2", "Yang^Cristina", "MR knee"),
        ],
    ),
    (
        "WL0005",
        "Doe^John",
        "19631203",
        "M",
        "ACC1005",
        "CT abdomen",
        "House^Gregory",
        [(1, "1100", "CT", "CT02", "CT ROOM 2", "RAD-1", "Grey^Meredith", "CT abdomen")],
    ),
)


def _uid(name: str) -> str:
    return f"2.25.{uuid.uuid5(_NAMESPACE, name).int}"


def make_worklist(date: _dt.date | str = DEMO_DATE) -> list[Dataset]:
    """The demo worklist: 5 synthetic patients, 7 scheduled steps, on ``date`` and the day after.

    Deterministic (the same datasets, UIDs included, for the same ``date``); no
    real person's data. Two requested procedures have two steps each (one of them
    on two days), one patient's name needs UTF-8 (``ISO_IR 192``), and the
    modalities are CT, MR, US and DX on stations ``CT01``, ``CT02``, ``MR01``,
    ``US01`` and ``DX01``.

    Parameters
    ----------
    date : datetime.date or str, default DEMO_DATE (2026-03-02)
        The first day (ISO ``"2026-03-02"`` or a date).

    Returns
    -------
    list of pydicom.dataset.Dataset
        One worklist entry per requested procedure.

    Examples
    --------
    >>> [e.PatientID for e in make_worklist()][:2]
    ['WL0001', 'WL0002']
    >>> steps = make_worklist("2026-05-04")[3].ScheduledProcedureStepSequence
    >>> steps[1].ScheduledProcedureStepStartDate
    '20260505'
    """
    day = _dt.date.fromisoformat(date) if isinstance(date, str) else date
    entries = []
    for pid, name, birth, sex, accession, procedure, referring, steps in _DEMO:
        ds = Dataset()
        ds.SpecificCharacterSet = "ISO_IR 192"
        ds.PatientID = pid
        ds.PatientName = name
        ds.PatientBirthDate = birth
        ds.PatientSex = sex
        ds.AccessionNumber = accession
        ds.ReferringPhysicianName = referring
        ds.RequestedProcedureID = f"RP{accession[3:]}"
        ds.RequestedProcedureDescription = procedure
        ds.RequestedProcedurePriority = "ROUTINE"
        ds.StudyInstanceUID = _uid(f"{day.isoformat()}/{accession}")
        items = []
        for n, (offset, time, modality, aet, station, where, physician, text) in enumerate(steps):
            item = Dataset()
            item.ScheduledStationAETitle = aet
            item.ScheduledProcedureStepStartDate = (day + _dt.timedelta(days=offset)).strftime(
                "%Y%m%d"
            )
            item.ScheduledProcedureStepStartTime = time + "00"
            item.Modality = modality
            item.ScheduledPerformingPhysicianName = physician
            item.ScheduledProcedureStepDescription = text
            item.ScheduledStationName = station
            item.ScheduledProcedureStepLocation = where
            item.ScheduledProcedureStepID = f"SPS{accession[3:]}{n + 1}"
            item.ScheduledProcedureStepStatus = "SCHEDULED"
            items.append(item)
        ds.ScheduledProcedureStepSequence = items
        entries.append(ds)
    return entries


def write_worklist(
    entries: Iterable[Dataset], folder: str | os.PathLike[str], *, one_step_per_file: bool = False
) -> list[Path]:
    """Write worklist entries as ``*.wl`` files, as worklist servers read them.

    Each file is a DICOM file (Part 10, Explicit VR Little Endian) named after its
    entry's AccessionNumber (or its position), written to a temporary name and
    renamed, so a server reading the folder never sees half a file.

    Parameters
    ----------
    entries : iterable of pydicom.dataset.Dataset
        Worklist entries, e.g. :func:`make_worklist`.
    folder : str or os.PathLike
        Created when missing.
    one_step_per_file : bool
        Write an entry with several scheduled steps as one file per step (named
        ``<accession>-<n>.wl``), its other attributes repeated: dcmtk's
        ``wlmscpfs`` ignores files whose Scheduled Procedure Step Sequence does
        not hold exactly one item.

    Returns
    -------
    list of pathlib.Path
        The files written.

    Examples
    --------
    >>> import tempfile
    >>> [p.name for p in write_worklist(make_worklist()[:2], tempfile.mkdtemp())]
    ['ACC1001.wl', 'ACC1002.wl']
    """
    target = Path(folder)
    target.mkdir(parents=True, exist_ok=True)
    files: list[tuple[str, Dataset]] = []
    for position, entry in enumerate(entries):
        name = str(entry.get("AccessionNumber", "") or f"entry{position:05d}")
        steps = list(entry.get("ScheduledProcedureStepSequence", None) or [])
        if not one_step_per_file or len(steps) < 2:
            files.append((name, entry))
            continue
        for n, step in enumerate(steps):
            single = copy.deepcopy(entry)
            single.ScheduledProcedureStepSequence = [copy.deepcopy(step)]
            files.append((f"{name}-{n + 1}", single))
    written = []
    for position, (name, entry) in enumerate(files):
        # The name comes from data: keep only characters safe in a file name.
        stem = "".join(c if c.isalnum() or c in "-_." else "_" for c in name).lstrip(".")
        ds = copy.deepcopy(entry)
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = ModalityWorklistInformationFind
        meta.MediaStorageSOPInstanceUID = _uid(f"file/{stem}/{position}")
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.file_meta = meta
        path = target / f"{stem or position}.wl"
        temporary = path.with_suffix(".wl.tmp")
        ds.save_as(temporary, enforce_file_format=True)
        os.replace(temporary, path)
        written.append(path)
    return written


def _columns(entries: Iterable[Dataset]) -> list[str]:
    """The flat attributes the entries and their steps hold, by keyword."""
    found: dict[str, None] = {}

    def note(ds: Dataset) -> None:
        # Tags, not elements: nothing is decoded.
        for tag in sorted(ds.keys()):
            if tag == _TAG_CHARSET or tag.is_private:
                continue
            keyword = datadict.keyword_for_tag(tag)
            if keyword and datadict.dictionary_VR(tag) != "SQ":
                found[keyword] = None

    for entry in entries:
        note(entry)
        for item in entry.get("ScheduledProcedureStepSequence", None) or []:
            note(item)
    return list(found)


def steps_frame(entries: Iterable[Dataset]) -> pd.DataFrame:
    """One typed row per scheduled step of ``entries``, the entry's attributes repeated.

    Built by :class:`pacsframe.frames.FrameBuilder` as a worklist answer is, so
    it has the columns and dtypes ``PACS.find_worklist`` gives. The demo PACS
    matches requests on it.

    Examples
    --------
    >>> steps = steps_frame(make_worklist())
    >>> steps.loc[steps.PatientID == "WL0002", "Modality"].tolist()
    ['MR', 'CT']
    """
    entries = list(entries)
    return _flatten(entries, _columns(entries))[0]


def _flatten(entries: list[Dataset], columns: list[str]) -> tuple[pd.DataFrame, np.ndarray]:
    """The steps frame and, per row, the position of its entry and of its step."""
    builder = frames.FrameBuilder(columns, flatten=SPS_SEQUENCE_TAG)
    owner: list[int] = []
    step: list[int] = []
    for position, entry in enumerate(entries):
        before = len(builder)
        builder.add(entry)
        owner.extend([position] * (len(builder) - before))
        step.extend(range(len(builder) - before))
    return builder.frame(), np.array([owner, step], dtype=np.int64).reshape(2, -1)


class Worklist:
    """What the demo PACS answers worklist queries from: datasets, or a folder of files.

    Parameters
    ----------
    source : iterable of Dataset, str, os.PathLike or None
        Worklist entries; a folder whose ``*.wl`` files (recursively) are read at
        every request, so files may be added and removed while the server runs
        (a file without a Scheduled Procedure Step Sequence is skipped); or None
        for :func:`make_worklist`'s demo worklist.

    Examples
    --------
    >>> len(Worklist(None).entries())
    5
    >>> Worklist([]).entries()
    []
    """

    def __init__(self, source: Iterable[Dataset] | str | os.PathLike[str] | None) -> None:
        self.folder: Path | None = None
        self._entries: list[Dataset] = []
        if source is None:
            self._entries = make_worklist()
        elif isinstance(source, (str, os.PathLike)):
            self.folder = Path(source)
        else:
            self._entries = list(source)
            bad = [type(e).__name__ for e in self._entries if not isinstance(e, Dataset)]
            if bad:
                raise QueryError(
                    f"worklist= takes pydicom Datasets (worklist entries) or a folder of "
                    f"*.wl files; got a {bad[0]}."
                )
        self._frame: tuple[pd.DataFrame, np.ndarray] | None = None

    def __repr__(self) -> str:
        return (
            f"Worklist({str(self.folder)!r})" if self.folder else f"Worklist({len(self._entries)})"
        )

    def entries(self) -> list[Dataset]:
        """The worklist entries now (a folder is read again)."""
        if self.folder is None:
            return self._entries
        entries = []
        paths = sorted(self.folder.rglob("*.wl")) if self.folder.is_dir() else []
        for path in paths[:100_000]:
            try:
                # Forced: worklist files often lack the Part 10 preamble (dump2dcm -F).
                ds = dcmread(path, force=True)
                sequence = ds.get(SPS_SEQUENCE_TAG)
                if sequence is None or sequence.VR != "SQ":
                    raise ValueError("it holds no Scheduled Procedure Step Sequence")
            except (InvalidDicomError, OSError, ValueError, EOFError, struct.error) as exc:
                # Not the file's name or the message: both may carry an accession number.
                LOGGER.warning(
                    "a worklist file under %s was skipped (%s)", self.folder, type(exc).__name__
                )
                continue
            entries.append(ds)
        return entries

    def steps(self) -> tuple[list[Dataset], pd.DataFrame, np.ndarray]:
        """The entries, their steps frame, and each row's (entry, step) positions."""
        entries = self.entries()
        if self.folder is None:
            if self._frame is None:
                self._frame = _flatten(entries, _columns(entries))
            return entries, *self._frame
        return entries, *_flatten(entries, _columns(entries))


# --- the C-FIND SCP ------------------------------------------------------------------------


def _requested(ds: Dataset) -> tuple[dict[str, str], list[tuple[int, str]]]:
    """The matching keys (keyword -> DICOM string) and the requested (tag, VR) of ``ds``."""
    from .server import _query_value  # the one reader of identifier values

    keys: dict[str, str] = {}
    returned: list[tuple[int, str]] = []
    for tag in [int(t) for t in sorted(ds.keys())]:
        if tag in (_TAG_CHARSET, SPS_SEQUENCE_TAG) or (tag & 0xFFFF) == 0:
            continue
        keyword = datadict.keyword_for_tag(tag) if not (tag >> 16) % 2 else ""
        vr = ds.get_item(tag).VR or (datadict.dictionary_VR(tag) if keyword else "UN")
        returned.append((tag, str(vr)))
        try:
            attr = frames.attribute(keyword) if keyword else None
        except QueryError:
            attr = None  # a sequence: returned, never matched
        if attr is None:
            continue
        value = _query_value(ds, tag, attr.vr)
        if value is not None:
            keys[attr.keyword] = value
    return keys, returned


def _element(elem: DataElement) -> DataElement:
    """A copy of ``elem`` to send: a new element sharing its value (which writing does
    not change), a sequence copied whole (its items belong to their parent)."""
    if elem.VR == "SQ":
        return copy.deepcopy(elem)
    return DataElement(elem.tag, elem.VR, elem.value, validation_mode=config.IGNORE)


def _copy(source: Dataset, requested: list[tuple[int, str]], target: Dataset) -> None:
    """Each requested attribute of ``source`` into ``target``; empty when it has none."""
    for tag, vr in requested:
        if tag in source:
            target.add(_element(source[tag]))
        else:
            target.add(DataElement(tag, vr, DicomSequence() if vr == "SQ" else None))


def handle_worklist_find(event: evt.Event, server: Any) -> Iterator[tuple[int | Dataset, Any]]:
    """Answer a Modality Worklist C-FIND request (``evt.EVT_C_FIND``) from ``server.worklist``.

    One pending response per matching entry, holding the requested attributes and
    the matching steps (see the module's description); ``0xFE00`` when the peer
    cancels, or past ``server.max_results`` responses (as Orthanc does); ``0xC000``
    with an Error Comment for a matching value that cannot be read (an impossible
    date, a malformed range), ``0xA900`` for an identifier that cannot be decoded
    or a Scheduled Procedure Step Sequence with more than one item.

    Examples
    --------
    >>> from pacsframe.demo import DemoPACS
    >>> handlers = [(evt.EVT_C_FIND, handle_worklist_find, [DemoPACS("/tmp/nowhere")])]
    """
    from .server import _status

    try:
        identifier = event.identifier
        top, returned = _requested(identifier)
        sequence = identifier.get(SPS_SEQUENCE_TAG)
        items = list(sequence.value or []) if sequence is not None else []
        if len(items) > 1:
            yield _status(0xA900, "Scheduled Procedure Step Sequence has more than one item"), None
            return
        item_keys, item_returned = _requested(items[0]) if items else ({}, [])
    except (ValueError, TypeError, LookupError, EOFError, struct.error) as exc:
        LOGGER.info("worklist C-FIND identifier unreadable: %s", exc)
        yield _status(0xA900, f"the identifier could not be decoded: {exc}"), None
        return
    try:
        entries, steps, positions = server.worklist.steps()
        mask = matching.match(steps, {**top, **item_keys}).to_numpy()
    except QueryError as exc:
        LOGGER.info("worklist C-FIND unable to process: %s", exc)
        yield _status(0xC000, str(exc)), None
        return
    matched: dict[int, list[int]] = {}
    for owner, step in positions[:, mask].T.tolist():
        matched.setdefault(owner, []).append(step)
    LOGGER.info("worklist C-FIND: %d entry(ies), %d step(s)", len(matched), int(mask.sum()))
    limit = server.max_results
    for n, (owner, chosen) in enumerate(matched.items()):
        if event.is_cancelled or (limit is not None and n >= limit):
            yield 0xFE00, None  # at the cap: Cancel unasked, as Orthanc says "more"
            return
        entry = entries[owner]
        response = Dataset()
        if "SpecificCharacterSet" in entry:
            response.SpecificCharacterSet = entry.SpecificCharacterSet
        _copy(entry, returned, response)
        if sequence is not None:
            have = list(entry.get("ScheduledProcedureStepSequence", None) or [])
            out = []
            for step in chosen:
                if step >= len(have):
                    continue  # an entry without steps: its row stands for the entry
                if item_returned:
                    item = Dataset()
                    _copy(have[step], item_returned, item)
                else:  # an empty item asks for whole steps
                    item = Dataset()
                    for elem in have[step]:
                        item.add(_element(elem))
                out.append(item)
            response.ScheduledProcedureStepSequence = out
        yield 0xFF00, response
