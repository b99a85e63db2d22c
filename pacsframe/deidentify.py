"""De-identified export of cached objects (DICOM PS3.15 Annex E), behind :meth:`Cache.export`.

The profile applied is the Basic Application Level Confidentiality Profile (PS3.15
E.2, Table E.1-1) with the Retain Longitudinal Temporal Information with Modified
Dates Option (E.3.6): identifying attributes are removed, emptied or replaced as the
table says, UIDs are replaced, and dates move by a per-patient number of days
instead of being removed, so intervals within a patient survive.

Which action each attribute gets comes from the table that ``dicom-anonymizer``
(KitwareMedical, BSD-3-Clause) keeps from the standard (its 2026c edition). Its
action engine is not used, as it cannot do what an export needs: it maps UIDs to
random ones in a module-global dictionary (no seed, so a resumed export would give
other UIDs), sets dates to ``00010101`` (no shift), writes a dummy date where the
table says remove, acts on top-level attributes only, and prints to stdout. The
engine here applies the same table at every nesting level, with keyed-hash UIDs
and a seeded date shift. (``deid`` has no copy of the table, only recipes one
writes, and pulls in matplotlib; ``dicognito`` follows its own scheme of fake
names and one date offset per run, not Table E.1-1.)
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import functools
import hashlib
import hmac
import io
import os
import secrets
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pandas as pd
from pydicom import dcmread
from pydicom.datadict import dictionary_has_tag, dictionary_VR
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.tag import BaseTag
from pynetdicom import PYNETDICOM_IMPLEMENTATION_UID, PYNETDICOM_IMPLEMENTATION_VERSION

from . import frames
from .cache import _READ_ERRORS, _TEMP_RE, _listing, _stray, atomic_write
from .errors import CacheError
from .retrieve import _progress

if TYPE_CHECKING:
    from .cache import Cache

__all__ = ["ExportResult", "Profile", "action_for", "deidentify_dataset", "export"]

# What the table's combined actions become. The IOD's attribute Types are not known
# here, so an attribute stays present whenever the table allows it (Z or D rather
# than X), which keeps Type 1 and 2 attributes conformant in any IOD.
_RESOLVE = {
    "X/Z": "Z",
    "X/D": "D",
    "X/Z/D": "D",
    "Z/D": "D",
    "X/Z/U*": "U*",
}
_CATEGORIES = {
    "D_TAGS": "D",
    "Z_TAGS": "Z",
    "X_TAGS": "X",
    "U_TAGS": "U",
    "Z_D_TAGS": "Z/D",
    "X_Z_TAGS": "X/Z",
    "X_D_TAGS": "X/D",
    "X_Z_D_TAGS": "X/Z/D",
    "X_Z_U_STAR_TAGS": "X/Z/U*",
}
# The three date/time attributes of Table E.1-1 that the Modified Dates Option does
# not clean (its column is empty for them): they keep their basic action.
_DATES_NOT_MODIFIED = frozenset({0x00100030, 0x00100032, 0x00160077})
_DATE_VRS = frozenset({"DA", "DT", "TM"})
# Curves (50xx) and overlays (60xx): repeating groups. The table removes Curve Data
# and Overlay Data/Comments; the whole overlay group goes, as its remaining
# attributes would describe an overlay that is no longer there.
_CURVE, _OVERLAY = 0x5000, 0x6000
_PATIENT_ID = 0x00100020
_SOP_INSTANCE_UID = 0x00080018

_TEXT_DUMMY = "ANONYMIZED"
_DUMMY = {
    "AE": _TEXT_DUMMY,
    "AS": "000Y",
    "CS": _TEXT_DUMMY,
    "DS": "0",
    "IS": "0",
    "LO": _TEXT_DUMMY,
    "LT": _TEXT_DUMMY,
    "PN": _TEXT_DUMMY,
    "SH": _TEXT_DUMMY,
    "ST": _TEXT_DUMMY,
    "UC": _TEXT_DUMMY,
    "UT": _TEXT_DUMMY,
    "UR": "http://anonymized.invalid",
    "DA": "19000101",
    "DT": "19000101000000",
    "TM": "000000",
}
_METHOD = [
    "Basic Application Confidentiality Profile",
    "Retain Longitudinal With Modified Dates",
]
_METHOD_CODES = (
    ("113100", "Basic Application Confidentiality Profile"),
    ("113107", "Retain Longitudinal Temporal Information Modified Dates Option"),
)
# Shifts are whole days back, 1 to 10 years: times of day and weekdays' spacing
# stay, the calendar year does not.
_SHIFT_MIN, _SHIFT_MAX = 366, 3652

_MANIFEST_COLUMNS = (
    "PatientID",
    "new_PatientID",
    "date_offset_days",
    "StudyInstanceUID",
    "new_StudyInstanceUID",
    "SeriesInstanceUID",
    "new_SeriesInstanceUID",
    "SOPInstanceUID",
    "new_SOPInstanceUID",
    "source_path",
    "path",
    "status",
)


@functools.cache
def _table() -> dict[int, str]:
    """Table E.1-1's Basic Profile column: tag -> action, from dicom-anonymizer's copy."""
    from dicomanonymizer.dicom_anonymization_databases import dicomfields_2026c as table

    out: dict[int, str] = {}
    for category, action in _CATEGORIES.items():
        for entry in getattr(table, category):
            if len(entry) == 2:  # repeating groups (curves, overlays): see _action
                out[(entry[0] << 16) | entry[1]] = action
    return out


def action_for(tag: int, vr: str | None = None) -> str:
    """The action this export applies to an attribute, as a Table E.1-1 code.

    ``X`` remove, ``Z`` empty, ``D`` dummy value, ``U`` new UID, ``U*`` keep the
    sequence and clean its items, ``C`` shift by the patient's days (dates; times
    are kept), ``K`` keep. Attributes not in the table are kept, except private ones
    (removed) and dates anywhere (shifted).

    Parameters
    ----------
    tag : int
        The attribute's tag, e.g. ``0x00100010``.
    vr : str, optional
        Its VR; the data dictionary's when not given.

    Examples
    --------
    >>> [action_for(t) for t in (0x00100010, 0x00100020, 0x0020000D, 0x00080020, 0x00090010)]
    ['Z', 'D', 'U', 'C', 'X']
    """
    return _action(int(tag), vr)


@functools.lru_cache(maxsize=4096)
def _action(tag: int, vr: str | None) -> str:
    group = tag >> 16
    if group & 1:
        return "X"
    if group & 0xFF00 in (_CURVE, _OVERLAY):
        return "X"
    if vr is None:
        try:
            vr = dictionary_VR(tag)
        except KeyError:
            vr = "UN"
    basic = _table().get(tag)
    if vr in _DATE_VRS and tag not in _DATES_NOT_MODIFIED:
        return "K" if vr == "TM" and basic is None else "C"
    if basic is None:
        return "K"
    return _RESOLVE.get(basic, basic)


@dataclass(frozen=True)
class Profile:
    """The keyed mappings of one export: new UIDs, patient IDs and date offsets.

    Every value is an HMAC-SHA256 of the original under ``seed``, so the same seed
    gives the same new identifiers in any run, and without it they cannot be
    recomputed from the originals.

    Examples
    --------
    >>> p = Profile("s3cret")
    >>> p.uid("1.2.3") == Profile("s3cret").uid("1.2.3"), p.uid("1.2.3").startswith("2.25.")
    (True, True)
    >>> -3652 <= p.days("PF000001") <= -366
    True
    """

    seed: str

    def _digest(self, kind: str, value: str) -> bytes:
        message = f"{kind}\0{value}".encode()
        return hmac.new(self.seed.encode(), message, hashlib.sha256).digest()

    def uid(self, value: str) -> str:
        """A new UID under the 2.25 (UUID-derived) root: at most 44 characters."""
        return f"2.25.{int.from_bytes(self._digest('uid', value)[:16], 'big')}"

    def patient_id(self, value: str) -> str:
        """A new PatientID (16 characters, fits LO)."""
        return "ANON" + self._digest("patient", value).hex()[:12].upper()

    def days(self, patient_id: str) -> int:
        """The patient's date shift, in days (negative: back in time)."""
        span = _SHIFT_MAX - _SHIFT_MIN + 1
        return -(_SHIFT_MIN + int.from_bytes(self._digest("days", patient_id)[:8], "big") % span)


def _shift_da(value: str, days: int) -> str:
    """A DA value moved by ``days``; '' when it is not a date (it could not be cleaned)."""
    try:
        day = _dt.datetime.strptime(value.strip(), "%Y%m%d").date()
        return (day + _dt.timedelta(days=days)).strftime("%Y%m%d")
    except (ValueError, OverflowError):
        return ""


def _shift_dt(value: str, days: int) -> str:
    """A DT value whose date moves by ``days``; time, fraction and offset are kept."""
    text = value.strip()
    digits = len(text) - len(text.lstrip("0123456789"))
    if digits < 4:
        return ""
    if digits < 8:  # year or year-month precision: shift its first day, keep the precision
        head = text[:digits] + "0101"[digits - 4 :]
        shifted = _shift_da(head, days)
        return shifted[:digits] + text[digits:] if shifted else ""
    shifted = _shift_da(text[:8], days)
    return shifted + text[8:] if shifted else ""


def _shift(element: Any, days: int) -> None:
    values = element.value
    if element.VR == "TM" or values in (None, ""):
        return
    shift = _shift_da if element.VR == "DA" else _shift_dt
    if isinstance(values, str):
        element.value = shift(values, days)
    else:
        element.value = [shift(str(v), days) for v in values]


class _Cleaner:
    """Applies the profile to one data set, at every nesting level."""

    def __init__(self, profile: Profile, days: int) -> None:
        self.profile = profile
        self.days = days

    def dataset(self, ds: Dataset) -> None:
        for tag in list(ds.keys()):
            self.element(ds, tag)

    def element(self, ds: Dataset, tag: BaseTag) -> None:
        if tag.is_private or tag.group & 0xFF00 in (_CURVE, _OVERLAY):
            del ds[tag]
            return
        if tag == 0x7FE00010:
            return  # pixel data: copied unchanged (see Cache.export's notes)
        # The action is decided on the element as read, so an element kept as it is
        # is never decoded (pydicom writes it back from its raw bytes).
        vr = ds.get_item(tag).VR
        if vr in (None, "UN") and dictionary_has_tag(tag):
            vr = dictionary_VR(tag)
        action = _action(int(tag), vr)
        if action == "K" and vr != "SQ":
            return
        element = ds[tag]  # decodes a raw element
        if action == "X":
            del ds[tag]
        elif action == "Z":
            if element.VR == "SQ":
                element.value = Sequence()
            else:
                element.value = "" if element.VR in _DUMMY or element.VR == "UI" else None
        elif action == "D":
            self.dummy(ds, element)
        elif action == "U":
            self.uids(element)
        elif action == "C":
            _shift(element, self.days)
        elif element.VR == "SQ":  # K or U*: the items are cleaned by the same table
            for item in element.value:
                self.dataset(item)

    def dummy(self, ds: Dataset, element: Any) -> None:
        if element.tag == _PATIENT_ID:
            element.value = self.profile.patient_id(str(element.value or ""))
        elif element.VR == "SQ":
            # A sequence to be replaced by dummy content (Content Sequence, Operator
            # Identification Sequence, ...) holds free text the table cannot vouch
            # for: it is removed rather than filled with made-up items.
            del ds[element.tag]
        elif element.VR == "UI":
            self.uids(element)
        elif element.VR in _DUMMY:
            element.value = _DUMMY[element.VR]
        elif element.VR in ("FL", "FD", "SL", "SS", "UL", "US", "SV", "UV"):
            element.value = 0
        else:  # binary VRs (OB, OW, UN, ...): a non-empty, even-length dummy
            element.value = b"\0\0"

    def uids(self, element: Any) -> None:
        values = element.value
        if values in (None, ""):
            return
        if isinstance(values, str):
            element.value = self.profile.uid(values)
        else:
            element.value = [self.profile.uid(str(v)) for v in values]


def deidentify_dataset(ds: Dataset, profile: Profile, days: int) -> Dataset:
    """Apply the profile to ``ds`` in place and mark it de-identified; returns ``ds``.

    Examples
    --------
    >>> from pydicom.dataset import Dataset
    >>> ds = Dataset()
    >>> ds.PatientName, ds.PatientID, ds.StudyDate = "Doe^Jane", "PF000001", "20240110"
    >>> ds.StudyInstanceUID = "1.2.3"
    >>> out = deidentify_dataset(ds, Profile("seed"), -400)
    >>> out.PatientName, out.PatientID[:4], out.StudyDate, out.PatientIdentityRemoved
    ('', 'ANON', '20221206', 'YES')
    """
    _Cleaner(profile, days).dataset(ds)
    ds.PatientIdentityRemoved = "YES"
    ds.DeidentificationMethod = _METHOD
    codes = []
    for value, meaning in _METHOD_CODES:
        item = Dataset()
        item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning = value, "DCM", meaning
        codes.append(item)
    ds.DeidentificationMethodCodeSequence = codes
    ds.LongitudinalTemporalInformationModified = "MODIFIED"
    return ds


@dataclass
class ExportResult:
    """What :meth:`Cache.export` did.

    ``manifest`` maps every exported instance's old identifiers to its new ones
    (columns ``PatientID``/``new_PatientID``, ``date_offset_days``, the three UIDs
    and their ``new_`` forms, ``source_path`` in the cache, ``path`` in the export,
    and ``status``: ``written`` or ``present`` when an earlier run had written it).
    It is the key that re-identifies the export: keep it apart from the export.
    ``seed`` is the secret the new identifiers derive from: pass it again to resume
    or extend the export with the same mapping.
    """

    folder: Path
    manifest: pd.DataFrame
    seed: str | None
    deidentified: bool
    manifest_path: Path | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def written(self) -> int:
        """Files written by this call."""
        return int((self.manifest["status"] == "written").sum())

    @property
    def present(self) -> int:
        """Files an earlier run had written completely, left as they were."""
        return int((self.manifest["status"] == "present").sum())

    def __repr__(self) -> str:
        return (
            f"ExportResult(written={self.written}, present={self.present}, "
            f"deidentified={self.deidentified}, folder={str(self.folder)!r})"
        )


def _check_folder(cache: Cache, folder: str | os.PathLike[str]) -> Path:
    if not isinstance(folder, (str, os.PathLike)) or not os.fspath(folder):
        raise CacheError(
            f"export() takes the folder to export into as a path, not {folder!r}; "
            "nothing was written."
        )
    target = Path(os.path.abspath(os.path.expanduser(os.fspath(folder))))
    real, root = target.resolve(), cache.root.resolve()
    if real.is_relative_to(root) or root.is_relative_to(real):
        raise CacheError(
            f"export() cannot write into {target}: it overlaps the cache at {cache.root}, "
            "which an export never modifies; choose a folder outside the cache."
        )
    if target.exists() and not target.is_dir():
        raise CacheError(f"export() needs a folder, but {target} is a file; nothing was written.")
    return target


def _check_manifest_path(path: str | os.PathLike[str], folder: Path) -> Path:
    if not isinstance(path, (str, os.PathLike)) or not os.fspath(path):
        raise CacheError(f"manifest= takes a file path, not {path!r}; nothing was written.")
    target = Path(os.path.abspath(os.path.expanduser(os.fspath(path))))
    if target.resolve().is_relative_to(folder.resolve()):
        raise CacheError(
            f"refused to write the manifest to {target}: it is inside the export folder "
            f"{folder}, and the manifest re-identifies the export; give a path outside it."
        )
    if target.suffix.lower() not in (".csv", ".parquet"):
        raise CacheError(
            f"manifest= must end in .csv or .parquet, not {target.name!r}; nothing was written."
        )
    return target


def _holds_export(folder: Path) -> bool:
    """Whether ``folder`` already holds exported files (``<uid>/<uid>/<uid>.dcm``)."""
    if not folder.is_dir():
        return False
    for study in os.scandir(folder):
        if study.is_dir(follow_symlinks=False) and frames.is_uid(study.name):
            for series in os.scandir(study.path):
                if series.is_dir(follow_symlinks=False) and any(
                    name.endswith(".dcm") for name in os.listdir(series.path)
                ):
                    return True
    return False


def _target(folder: Path, study: str, series: str, sop: str) -> Path:
    for name, uid in (("StudyInstanceUID", study), ("SeriesInstanceUID", series)):
        if not frames.is_uid(uid):
            raise CacheError(_bad_uid(name, uid))
    if not frames.is_uid(sop):
        raise CacheError(_bad_uid("SOPInstanceUID", sop))
    path = folder / study / series / f"{sop}.dcm"
    # Defence in depth: a symbolic link inside the export must not lead outside it.
    if not path.resolve().is_relative_to(folder.resolve()):
        raise CacheError(
            f"refused to export to {path}: it resolves outside {folder} (a symbolic link?); "
            "remove the link and run again."
        )
    return path


def _bad_uid(name: str, uid: Any) -> str:
    shown = repr(uid) if isinstance(uid, str) and len(uid) <= 70 else "a long value"
    return (
        f"refused to export: the cache holds a {name} {shown} that is not a valid UID "
        "(digits and dots, at most 64 characters), so it cannot name a file; run "
        "cache.verify() or export with deidentify=True, which writes new UIDs."
    )


def _remove_stray_parts(folder: Path) -> None:
    """Remove temporary files that a killed export left in ``folder``."""
    now = time.time()
    for entry in _listing(folder):
        if _TEMP_RE.match(entry.name) and _stray(entry, now) is not None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(entry.path)


def _encode(ds: Dataset, source: Dataset) -> bytes:
    """A de-identified data set as Part 10 bytes, with a file meta of its new UIDs."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = ds.SOPClassUID
    meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    meta.TransferSyntaxUID = source.file_meta.TransferSyntaxUID
    meta.ImplementationClassUID = PYNETDICOM_IMPLEMENTATION_UID
    meta.ImplementationVersionName = PYNETDICOM_IMPLEMENTATION_VERSION
    ds.file_meta = meta
    out = io.BytesIO()
    ds.save_as(out, enforce_file_format=True)
    return out.getvalue()


def export(
    cache: Cache,
    frame_or_uids: Any,
    folder: str | os.PathLike[str],
    *,
    deidentify: bool = True,
    seed: str | None = None,
    manifest: str | os.PathLike[str] | None = None,
    progress: bool = True,
    on_exported: Callable[[Mapping[str, Any]], None] | None = None,
) -> ExportResult:
    """The body of :meth:`pacsframe.Cache.export` (see there)."""

    target_folder = _check_folder(cache, folder)
    manifest_path = _check_manifest_path(manifest, target_folder) if manifest is not None else None
    if seed is not None and (not isinstance(seed, str) or not seed):
        raise CacheError(
            f"seed= takes a non-empty string (the secret new identifiers derive from), "
            f"not {type(seed).__name__}; nothing was written."
        )
    drawn = False
    if deidentify and seed is None:
        if _holds_export(target_folder):
            raise CacheError(
                f"{target_folder} already holds an export, and without its seed the new "
                "identifiers would differ; pass seed=<the earlier result.seed> to resume "
                "or extend it, or choose an empty folder."
            )
        seed = secrets.token_hex(16)
        drawn = True
    if not deidentify:
        seed = None
    profile = Profile(seed) if seed is not None else None

    rows = cache._selected_rows(frame_or_uids, "export()", "; nothing was exported")
    plan = []
    for patient, study, series, sop, relative in rows:
        patient = patient or ""
        if profile is not None:
            new = (profile.uid(study), profile.uid(series), profile.uid(sop))
            new_patient, days = profile.patient_id(patient), profile.days(patient)
        else:
            new, new_patient, days = (study, series, sop), patient, None
        path = _target(target_folder, *new)
        plan.append((patient, new_patient, days, study, series, sop, new, relative, path))

    bar = _progress(len(plan), progress and bool(plan), "export")
    records = []
    cleaned: set[Path] = set()
    try:
        for patient, new_patient, days, study, series, sop, new, relative, path in plan:
            source = cache._absolute(relative)
            if path.parent not in cleaned:
                _remove_stray_parts(path.parent)
                cleaned.add(path.parent)
            # A file at the final name is complete: files are only ever renamed there.
            status = "present" if path.is_file() else "written"
            if status == "written":
                if profile is None:
                    atomic_write(path, _chunks(source))
                else:
                    try:
                        ds = dcmread(source)
                    except _READ_ERRORS as exc:
                        raise CacheError(
                            f"cached instance {sop} at {source} cannot be read ({exc}); run "
                            "cache.verify() to drop damaged files, then retrieve again."
                        ) from exc
                    found = (ds.get("StudyInstanceUID"), ds.get("SeriesInstanceUID"))
                    if (*found, ds.get("SOPInstanceUID")) != (study, series, sop):
                        raise CacheError(
                            f"the cached file {source} does not hold the instance its index "
                            "row names (its UIDs differ); run cache.verify() to re-index the "
                            "cache, then export again."
                        )
                    atomic_write(path, _encode(deidentify_dataset(ds, profile, days), ds))
            record = {
                "PatientID": patient,
                "new_PatientID": new_patient,
                "date_offset_days": days,
                "StudyInstanceUID": study,
                "new_StudyInstanceUID": new[0],
                "SeriesInstanceUID": series,
                "new_SeriesInstanceUID": new[1],
                "SOPInstanceUID": sop,
                "new_SOPInstanceUID": new[2],
                "source_path": str(source),
                "path": str(path),
                "status": status,
            }
            records.append(record)
            if bar is not None:
                bar.update(1)
            if on_exported is not None:
                on_exported(record)
    except BaseException as exc:
        if drawn:
            # The files written so far are named by a seed only this call knows: hand
            # it over on the exception (not in its message, which may end up in a log).
            exc.export_seed = seed  # type: ignore[attr-defined]
            exc.add_note(
                "pacsframe: this export drew a random seed; it is in the exception's "
                "export_seed attribute: pass it as seed= to resume the export."
            )
        raise
    finally:
        if bar is not None:
            bar.close()
    frame = pd.DataFrame.from_records(records, columns=list(_MANIFEST_COLUMNS))
    frame = frame.astype({c: "string" for c in _MANIFEST_COLUMNS if c != "date_offset_days"})
    frame["date_offset_days"] = frame["date_offset_days"].astype("Int64")
    if manifest_path is not None:
        _write_manifest(frame, manifest_path)
    return ExportResult(
        folder=target_folder,
        manifest=frame,
        seed=seed,
        deidentified=deidentify,
        manifest_path=manifest_path,
    )


def _chunks(path: Path, size: int = 1 << 20) -> Iterable[bytes]:
    with open(path, "rb") as source:
        while chunk := source.read(size):
            yield chunk


def _write_manifest(frame: pd.DataFrame, path: Path) -> None:
    out = io.BytesIO()
    if path.suffix.lower() == ".parquet":
        frame.to_parquet(out, index=False)
    else:
        frame.to_csv(out, index=False)
    atomic_write(path, out.getvalue())
