"""Folders of DICOM files into the typed frames a C-FIND answer gives.

:func:`read_headers` reads every file's header up to its pixel data with the scan
the cache uses for received objects (:func:`pacsframe.frames.scan_elements`),
keeps the raw elements in a :class:`~pacsframe.frames.FrameBuilder` (the C-FIND
conversion), and answers the level's query over those instance rows with
:func:`pacsframe.matching.answer`, the code the demo PACS and the cache's offline
``find_*`` answer C-FIND with. So a frame read from files has the columns, dtypes
and computed attributes (``NumberOfSeriesRelatedInstances``, ``ModalitiesInStudy``
...) of the C-FIND frame of the same objects.
"""

from __future__ import annotations

import functools
import io
import os
import struct
import warnings
import zlib
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from stat import S_ISDIR, S_ISREG
from typing import Any

import pandas as pd
from pydicom import dcmread
from pydicom.uid import UID, ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pydicom.valuerep import VR

from . import frames, matching
from .errors import QueryError, UnreadableFileWarning
from .net.operations import read_part10
from .query import UNIQUE_KEY, build_query, normalize_level

__all__ = ["read_headers"]

# What is read of each file first: the preamble, the file meta and, for the files a
# PACS holds, the whole header. A longer header is read in growing steps.
_FIRST_READ = 1 << 16
# Past this many header bytes the rest is left to pydicom, which seeks over values.
_MAX_READ = 1 << 26
_PIXEL_TAGS = frozenset({0x7FE00010, 0x7FE00009, 0x7FE00008})
_HEADER_END = min(_PIXEL_TAGS)
_CHARSET_TAG = 0x00080005
_DICOMDIR = "1.2.840.10008.1.3.10"
_UID_COLUMNS = ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID")
# Threads reading files by default. The scan holds the GIL, so threads overlap only
# the reads (what matters on a network share or a cold disk); more do not help, and
# a process pool lost to pickling and start-up (see the closing note of issue 14).
_DEFAULT_WORKERS = 4
# How many errors the summary warning names.
_NAMED = 3
_LONG = struct.Struct("<L").unpack_from
# What a bare data set's first element holds at bytes 4-5 when its VR is explicit.
_VR_NAMES = frozenset(vr.value.encode() for vr in VR if len(vr.value) == 2)
# Put before a file meta that lacks its preamble, so read_part10 reads it.
_PREAMBLE = bytes(128) + b"DICM"


def _files(path_or_paths: Any) -> tuple[list[Path], list[str], list[dict[str, str]]]:
    """Every file under the paths (folders recursively), sorted; the sources; errors.

    The errors are the folders that could not be listed, as ``{"path", "error"}``.
    """
    if isinstance(path_or_paths, (str, os.PathLike)):
        sources = [path_or_paths]
    elif isinstance(path_or_paths, Iterable):
        sources = list(path_or_paths)
    else:
        raise QueryError(
            f"read_headers takes a folder, a file or a list of them, not "
            f"{type(path_or_paths).__name__}."
        )
    out: list[Path] = []
    # Each folder and each file once, by device and inode: a symbolic link is followed
    # (a CD import or a share may link series folders), so a link back up the tree
    # (a loop) or a second link to one file adds nothing, and the walk ends.
    folders: set[tuple[int, int]] = set()
    files: set[tuple[int, int]] = set()
    errors: list[dict[str, str]] = []
    for source in sources:
        path = Path(source)
        try:
            stat = path.stat()
        except OSError:
            stat = None
        if stat is not None and S_ISDIR(stat.st_mode):
            found: list[tuple[str, os.stat_result]] = []
            _walk(str(path), stat, folders, found, errors)
            found.sort(key=lambda f: f[0])
        elif stat is not None and S_ISREG(stat.st_mode):
            found = [(str(path), stat)]
        else:
            raise QueryError(f"{str(path)!r} is neither a file nor a folder; check the path.")
        for name, st in found:
            if (st.st_dev, st.st_ino) not in files:
                files.add((st.st_dev, st.st_ino))
                out.append(Path(name))
    return out, [str(s) for s in sources], errors


def _walk(
    folder: str,
    stat: os.stat_result,
    folders: set[tuple[int, int]],
    found: list[tuple[str, os.stat_result]],
    errors: list[dict[str, str]],
) -> None:
    """Add the regular files under ``folder`` to ``found``, following links.

    A folder that cannot be listed is an entry of ``errors``.

    Iterative, and no folder is entered twice (``folders`` holds each one's device
    and inode), so links that loop are bounded by the number of real folders.
    """
    pending = [(folder, stat)]
    while pending:
        folder, stat = pending.pop()
        if (stat.st_dev, stat.st_ino) in folders:
            continue
        folders.add((stat.st_dev, stat.st_ino))
        try:
            # By name, so which of two paths to one folder or file is kept does not
            # depend on the order the file system lists them in.
            entries = sorted(os.scandir(folder), key=lambda e: e.name)
        except OSError as exc:
            why = f"the folder could not be listed ({type(exc).__name__}); check its permissions"
            errors.append({"path": folder, "error": why})
            continue
        subfolders = []
        for entry in entries:
            try:
                st = entry.stat()  # follows a link; a dangling one raises
            except OSError:
                continue
            if S_ISDIR(st.st_mode):
                subfolders.append((entry.path, st))
            elif S_ISREG(st.st_mode):
                found.append((entry.path, st))
        pending += reversed(subfolders)  # the first by name is walked first


def _pixel_overrun(data: bytes, pos: int, implicit: bool, size: int, offset: int) -> str | None:
    """Whether the pixel data element at ``pos`` declares more bytes than the file has."""
    if pos + 12 > len(data):
        return None
    if implicit:
        length = _LONG(data, pos + 4)[0]
        start = pos + 8
    else:
        length = _LONG(data, pos + 8)[0]
        start = pos + 12
    if length == 0xFFFFFFFF:
        return None
    if offset + start + length > size:
        return (
            f"it is truncated: its pixel data declares {length} bytes, but the file ends "
            f"{size - offset - start} bytes after the element starts"
        )
    return None


@functools.lru_cache(maxsize=64)
def _syntax(uid: str) -> tuple[bool, bool]:
    """Whether the scan reads a transfer syntax (little endian, not deflated); implicit VR.

    Cached: a folder holds a few syntaxes, and pydicom's UID properties cost a
    twentieth of a small file's read.
    """
    syntax = UID(uid)
    if not (syntax.is_transfer_syntax and syntax.is_little_endian and not syntax.is_deflated):
        return False, False
    return True, syntax.is_implicit_VR


def _read_one(path: Path, tags: frozenset[int]) -> tuple[str, Any]:
    """One file: ("row", elements), ("ds", Dataset), ("skip", why) or ("error", why)."""
    try:
        with open(path, "rb") as handle:
            size = os.fstat(handle.fileno()).st_size
            data = handle.read(_FIRST_READ)
            bare = not (len(data) >= 132 and data[128:132] == b"DICM")
            if bare and data[:2] == b"\x08\x00" and len(data) >= 8:
                # A bare data set (no preamble, no file meta), as old CD imports hold:
                # read as pydicom's dcmread(force=True) reads it, explicit VR when the
                # first element's bytes 4-5 are a VR, else implicit, little endian.
                explicit = data[4:6] in _VR_NAMES
                syntax = ExplicitVRLittleEndian if explicit else ImplicitVRLittleEndian
                offset = 0
            else:
                head = _PREAMBLE + data if bare and data[:2] == b"\x02\x00" else data
                if head[128:132] != b"DICM":
                    if path.suffix.lower() == ".dcm":
                        return "error", (
                            "it has a .dcm name but is not DICOM: no 'DICM' after a 128-byte "
                            "preamble, and no data set at its start"
                        )
                    return "skip", "not DICOM"
                try:
                    meta = read_part10(io.BytesIO(head))
                except ValueError as exc:
                    return "error", str(exc).replace("the data", "its file meta")
                if meta.sop_class_uid == _DICOMDIR:
                    return "skip", "a DICOMDIR"
                syntax = meta.transfer_syntax
                # A file meta without its preamble (as pydicom's force=True reads it).
                offset = meta.dataset_offset - (len(head) - len(data))
            scannable, implicit = _syntax(syntax)
            if scannable:
                while True:
                    out: dict[int, Any] = {}
                    view = memoryview(data)[offset:]
                    end = frames._scan(view, 0, len(view), implicit, tags, _HEADER_END, out, 0)
                    whole = len(data) >= size
                    if end is not None and (end < len(view) or whole):
                        if end < len(view):
                            why = _pixel_overrun(data, offset + end, implicit, size, 0)
                            if why:
                                return "error", why
                        return "row", out
                    if whole or len(data) >= _MAX_READ:
                        break
                    data += handle.read(min(len(data) * 3, _MAX_READ - len(data)))
                if len(data) >= size:
                    # The whole file is here and the scan gave up on it: find out why
                    # before pydicom, which stops quietly at a short read.
                    why = _overrun(data, offset, implicit, size)
                    if why:
                        return "error", why
            handle.seek(0)
            ds = dcmread(handle, force=bare, stop_before_pixels=True, specific_tags=sorted(tags))
            return "ds", ds
    except zlib.error as exc:
        return "error", f"its deflated data set is truncated or damaged (zlib: {exc})"
    except Exception as exc:  # a hostile file must not end the call
        return "error", f"it could not be read ({type(exc).__name__}: {exc})"


def _overrun(data: bytes, pos: int, implicit: bool, size: int) -> str | None:
    """A top-level element whose declared length runs past the end of the file."""
    while pos + 8 <= len(data):
        group, element = struct.unpack_from("<HH", data, pos)
        if group << 16 | element >= _HEADER_END:
            return None
        if implicit:
            length, step = _LONG(data, pos + 4)[0], 8
        else:
            vr = data[pos + 4 : pos + 6]
            if vr in frames._LONG_VRS:
                if pos + 12 > len(data):
                    return f"it is truncated in element ({group:04X},{element:04X})"
                length, step = _LONG(data, pos + 8)[0], 12
            else:
                length, step = struct.unpack_from("<H", data, pos + 6)[0], 8
        if length == 0xFFFFFFFF:
            return None  # a sequence of undefined length: pydicom reads the rest
        if pos + step + length > size:
            return (
                f"element ({group:04X},{element:04X}) declares {length} bytes, past the end "
                f"of the file ({size} bytes): it is truncated or damaged"
            )
        pos += step + length
    if pos < len(data):
        return f"it is truncated: it ends inside an element header at byte {pos}"
    return None


def _chunks(items: Sequence[Path], n: int) -> Iterator[Sequence[Path]]:
    for start in range(0, len(items), n):
        yield items[start : start + n]


def _read_chunk(paths: Sequence[Path], tags: frozenset[int]) -> list[tuple[str, Any]]:
    return [_read_one(p, tags) for p in paths]


# What the levels above the instance group by and count (see matching.level_frame).
_GROUPING = (
    "PatientID",
    "StudyInstanceUID",
    "SeriesInstanceUID",
    "SOPInstanceUID",
    "Modality",
    "SOPClassUID",
    "SpecificCharacterSet",
)


def _columns(level: str, keys: Sequence[str] | None) -> tuple[Any, list[str]]:
    """The query a PACS would answer, and the instance columns that answer needs.

    Only those columns are read from each file: the answer's own attributes and
    what its computed ones are counted from (the rest would be dropped by
    :func:`pacsframe.matching.answer` anyway).
    """
    model = "patient" if level == "PATIENT" else "study"
    query = build_query(level, model, {}, keys)
    computed = {c for cols in matching.LEVEL_KEYWORDS.values() for c in cols} - set(
        matching.INDEX_KEYWORDS
    )
    columns = [c for c in query.columns if c not in computed]
    columns += [c for c in _GROUPING if c not in columns]
    return query, columns


def read_headers(
    path_or_paths: str | os.PathLike[str] | Iterable[str | os.PathLike[str]],
    level: str = "instance",
    keys: Sequence[str] | None = None,
    workers: int | None = None,
) -> pd.DataFrame:
    """Read the headers of DICOM files into the typed frame a C-FIND answer gives.

    Every file under a folder (recursively), or each file of a list of files and
    folders, is read up to its pixel data (the first 64 KiB, more only for a
    longer header) and becomes one instance row, converted as a C-FIND
    identifier is. At ``level="series"``, ``"study"`` or ``"patient"`` the rows
    are grouped as a PACS groups them, with the same computed attributes
    (``NumberOfSeriesRelatedInstances``, ``NumberOfStudyRelatedSeries``,
    ``ModalitiesInStudy``...), by the code the demo PACS answers C-FIND with.

    Symbolic links are followed, and each folder and file is read once (by device
    and inode), so a link loop ends and a file linked twice is one row. A file is
    DICOM when it has ``DICM`` after a 128-byte preamble, or when it starts with a
    bare data set (an element of group 0008, implicit or explicit VR little endian,
    as old CD imports hold) or with a file meta lacking its preamble: those are read
    as pydicom's ``dcmread(force=True)`` reads them. Any other file is skipped and
    counted, unless its name ends in ``.dcm`` (then it is an error). Deflated files
    are inflated by pydicom.

    Parameters
    ----------
    path_or_paths : path or iterable of paths
        A folder, a file, or a list of both.
    level : {"instance", "series", "study", "patient"}, default "instance"
        The query level whose frame to build (``"image"`` is ``"instance"``).
    keys : list of str, optional
        Keywords to add to the level's default columns, like ``return_keys`` in
        :meth:`pacsframe.PACS.find`. At a level above the instance, an attribute
        a PACS does not hold at that level comes back empty, as from a PACS.
    workers : int, optional
        Threads reading files. Default 4: the header scan holds the GIL, so threads
        overlap the reads only (a network share, a cold disk); ``1`` reads in the
        calling thread, which was faster on an idle machine for files already in
        the page cache (``make bench``'s read-headers item; the README gives the
        numbers).

    Returns
    -------
    pandas.DataFrame
        One row per file (or per series, study, patient; copies of an instance
        count once there), sorted by the level's unique key, columns and dtypes
        as :meth:`pacsframe.PACS.find` gives them.
        ``attrs["pacsframe"]`` holds ``level``, ``model``, ``keys`` (empty),
        ``source`` (the paths given), ``files`` (how many were looked at),
        ``skipped`` (files that are not DICOM, DICOMDIRs) and ``errors`` (a list of
        ``{"path", "error"}`` for files that could not be read: truncated, a ``.dcm``
        that is not DICOM, a declared length past the end, a UID that is not a UID, a
        damaged deflated data set, a folder that could not be listed).
        When there are errors, one :class:`~pacsframe.UnreadableFileWarning`
        summarises them; nothing is raised for a bad file.

    Raises
    ------
    QueryError
        For an unknown level or keyword, or a path that does not exist.

    Examples
    --------
    >>> import tempfile
    >>> import pacsframe as pf
    >>> from pacsframe.demo import make_cohort
    >>> tmp = tempfile.TemporaryDirectory()
    >>> _ = make_cohort(tmp.name, patients=1, studies_per_patient=1, series_per_study=2,
    ...                 instances_per_series=3, matrix=8)
    >>> series = pf.read_headers(tmp.name, level="series")
    >>> series.NumberOfSeriesRelatedInstances.tolist()
    [3, 3]
    >>> studies = pf.read_headers(tmp.name, level="study", keys=["PatientAge"])
    >>> studies.NumberOfStudyRelatedInstances.tolist(), str(studies.StudyDate.dtype)
    ([6], 'datetime64[ns]')
    >>> studies.attrs["pacsframe"]["errors"], studies.attrs["pacsframe"]["skipped"]
    ([], 0)
    >>> tmp.cleanup()
    """
    lv = normalize_level(level)
    query, columns = _columns(lv, keys)
    paths, sources, errors = _files(path_or_paths)
    builder = frames.FrameBuilder(columns)
    tags = builder.tags
    if workers is None:
        workers = _DEFAULT_WORKERS
    if workers < 1:
        raise QueryError(f"workers must be 1 or more, not {workers}.")
    if workers == 1 or len(paths) < 64:
        results = _read_chunk(paths, tags)
    else:
        size = max(16, min(256, len(paths) // (workers * 4)))
        with ThreadPoolExecutor(workers, thread_name_prefix="pacsframe-read") as pool:
            results = [
                r
                for part in pool.map(_read_chunk, _chunks(paths, size), [tags] * len(paths))
                for r in part
            ]
    rows: list[str] = []
    skipped = 0
    for path, (kind, payload) in zip(paths, results, strict=True):
        if kind == "row":
            builder.add_elements(payload)
        elif kind == "ds":
            builder.add(payload)
        elif kind == "skip":
            skipped += 1
            continue
        else:
            errors.append({"path": str(path), "error": payload})
            continue
        rows.append(str(path))
    instances = builder.frame()
    keep = pd.Series(True, index=instances.index)
    for column in _UID_COLUMNS:
        values = instances[column]
        for i, value in enumerate(values.tolist()):
            if not keep.iat[i]:
                continue
            if value is pd.NA or value is None:
                why = f"it has no {column}"
            elif not frames.is_uid(value):
                why = f"its {column} {value!r} is not a valid UID"
            else:
                continue
            keep.iat[i] = False
            errors.append({"path": rows[i], "error": why})
    instances = instances[keep.to_numpy()].reset_index(drop=True)
    errors.sort(key=lambda e: e["path"])
    instances = instances.sort_values(list(_UID_COLUMNS), kind="stable", ignore_index=True)
    if lv != "IMAGE":
        # Copies of one instance (the same file in two folders) count once, as in a PACS.
        instances = instances.drop_duplicates("SOPInstanceUID", ignore_index=True)
    frame = matching.answer(instances, query)
    frame = frame.sort_values(UNIQUE_KEY[lv], kind="stable", ignore_index=True)
    frame.attrs["pacsframe"] = {
        **query.to_json(),
        "source": sources,
        "files": len(paths),
        "skipped": skipped,
        "errors": errors,
    }
    if errors:
        named = "; ".join(f"{e['path']}: {e['error']}" for e in errors[:_NAMED])
        more = f" (and {len(errors) - _NAMED} more)" if len(errors) > _NAMED else ""
        warnings.warn(
            f"{len(errors)} of {len(paths)} files could not be read and have no row: "
            f"{named}{more}. The list is in frame.attrs['pacsframe']['errors'].",
            UnreadableFileWarning,
            stacklevel=2,
        )
    return frame
