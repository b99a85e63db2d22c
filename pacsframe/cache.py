"""The on-disk cache: a safe file layout, atomic writes and a SQLite index.

Retrieved objects live at
``<root>/<StudyInstanceUID>/<SeriesInstanceUID>/<SOPInstanceUID>.dcm``, where every
UID is checked against the UI grammar before it becomes a path part, so a peer that
sends ``../../x`` as a UID never gets anything written outside the root.

Every object is written to a temporary file in its final folder
(``.<SOPInstanceUID>.<host>-<pid>-<random>.part``, a name no instance can have and
that says which process writes it; an object streamed in by a C-STORE
(:meth:`Cache.receive`) is written in the root, as its folder is known only once its
header arrived), its header is checked, and only then is it
renamed into place (``os.replace``, atomic on POSIX and Windows) and given one row
in ``<root>/index.sqlite``. A reader therefore sees either no file or a complete
one, and an index row always points at a complete file. A killed run leaves at
most stray ``.part`` files and complete files not yet indexed (one, or the rows a
WADO-RS response still held: they are committed 100 at a time), which
:meth:`Cache.verify` removes and indexes, also while other processes write; no
fsync is done (a power cut may lose the last objects, which a re-run fetches
again, as pooch and joblib also accept).

The index holds one row per instance with the DICOM string form of every
attribute of :data:`pacsframe.matching.INDEX_KEYWORDS`, so "what is cached" is one
query, and :meth:`Cache.find` answers C-FIND-style queries offline with the same
validation (:func:`pacsframe.query.build_query`) and matching engine
(:func:`pacsframe.matching.answer`) as the demo PACS.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import functools
import hashlib
import io
import itertools
import math
import operator
import os
import re
import secrets
import socket
import sqlite3
import struct
import threading
import time
import warnings
import weakref
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import platformdirs
from pydicom import dcmread
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.errors import InvalidDicomError
from pydicom.filereader import read_dataset
from pydicom.filewriter import write_file_meta_info
from pydicom.tag import Tag
from pydicom.uid import UID
from pynetdicom import PYNETDICOM_IMPLEMENTATION_UID, PYNETDICOM_IMPLEMENTATION_VERSION

from . import frames, matching
from .errors import CacheError, QueryError
from .query import build_query, normalize_level

if TYPE_CHECKING:
    from .deidentify import ExportResult
    from .net.operations import StoreRequest

__all__ = [
    "Cache",
    "IncomingObject",
    "Volume",
    "atomic_write",
]

#: The environment variable that overrides the default cache root.
ENV_VAR = "PACSFRAME_CACHE"
INDEX_NAME = "index.sqlite"

_BUSY_SECONDS = 60.0
# SQLite's historical limit on bound parameters is 999; stay under it.
_CHUNK = 900
_UID_KEYS = ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID")
_FIXED = (
    "SOPInstanceUID",
    "StudyInstanceUID",
    "SeriesInstanceUID",
    "SOPClassUID",
    "TransferSyntaxUID",
    "path",
    "size",
    "stored_at",
)
_KEYWORD_COLUMNS = tuple(k for k in matching.INDEX_KEYWORDS if k not in _FIXED)
_SOP_AT, _PATH_AT = _FIXED.index("SOPInstanceUID"), _FIXED.index("path")
# How many index rows a batching receiver (Cache._batched) holds before it commits
# them in one transaction: one commit per object cost a WAL append of the table's and
# both indexes' pages each time (and a checkpoint every 1,000 WAL pages).
_BATCH_ROWS = 100
_ALL_COLUMNS = (*_FIXED, *_KEYWORD_COLUMNS)
# Columns of instances(): the indexed keywords, then what the cache adds.
_FRAME_KEYWORDS = (*matching.INDEX_KEYWORDS, "TransferSyntaxUID")
_HEADER_TAGS = [Tag(frames.attribute(k).tag) for k in matching.INDEX_KEYWORDS]
# What a received object's header is scanned for (pydicom adds the character set too).
# Plain ints: a set of pydicom Tags answers `in` through Tag.__eq__, a Python call per hit.
_HEADER_TAG_SET = frozenset([*(int(t) for t in _HEADER_TAGS), 0x00080005])
_INSERT = (
    f"INSERT OR REPLACE INTO instances ({', '.join(_ALL_COLUMNS)}) "
    f"VALUES ({', '.join('?' * len(_ALL_COLUMNS))})"
)
_ORDER = (
    "ORDER BY StudyInstanceUID, SeriesInstanceUID, CAST(InstanceNumber AS INTEGER), SOPInstanceUID"
)
_LEVEL_COLUMN = {
    "PATIENT": "PatientID",
    "STUDY": "StudyInstanceUID",
    "SERIES": "SeriesInstanceUID",
}
_LEVEL_COLUMN["IMAGE"] = "SOPInstanceUID"
_READ_ERRORS = (
    InvalidDicomError,
    EOFError,
    ValueError,
    OSError,
    KeyError,
    TypeError,
    struct.error,
)
_INSERT_NEW = _INSERT.replace("INSERT OR REPLACE", "INSERT OR IGNORE", 1)
# The index strings of _KEYWORD_COLUMNS, in order, in one call.
_keyword_values = operator.itemgetter(*_KEYWORD_COLUMNS)
# Where a header ends: pydicom's own stop_before_pixels tags.
_PIXEL_TAGS = frozenset({0x7FE00010, 0x7FE00009, 0x7FE00008})
_HEADER_END = min(_PIXEL_TAGS)  # scan_elements stops at the first tag from here on
# How much of a received object's data set IncomingObject keeps in memory for the
# header scan; a header running longer is read back from the temporary file.
_KEPT_BYTES = 1 << 16
# The write buffer of a received object's temporary file: fragments (16 KiB PDVs
# from most peers) reach the kernel in writes this large, which costs it less per
# byte than a write per fragment.
_WRITE_BUFFER = 1 << 18
# A fragment at least this large (a WADO-RS part's piece of a read) goes to the
# kernel as it is: through the buffer it would first be copied into it.
_DIRECT_BYTES = 1 << 16
# Looked up once: getattr with a default formats an AttributeError each time it misses.
_O_BINARY = getattr(os, "O_BINARY", 0)
# Series folders path_for() found inside the root (see there); reset when this large.
_SAFE_FOLDERS_MAX = 4096
# What Cache.locate gives per cached instance.
_LOCATE_FIELDS = ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "SOPClassUID", "path")

# Temporary files are named ``.<name>.<host>-<pid>-<random>.part``: <host> tells
# whether <pid> is a process of this machine (and PID namespace), so that verify()
# can ask whether the writer still runs. One untouched for this long is stray
# whoever wrote it (a writer streams into it, so a live one keeps touching it).
_STALE_SECONDS = 3600.0
_TEMP_RE = re.compile(r"^\.(.+)\.(?P<host>[0-9a-f]{8})-(?P<pid>[0-9]+)-[0-9a-f]{16}\.part$")
# Names of the temporary files this process is writing now.
_LIVE_TEMPS: set[str] = set()
_LIVE_LOCK = threading.Lock()


def _pid() -> int:
    """This process's ID, without a getpid() system call per object or index query."""
    return _PROCESS[0]


def _random_tag() -> str:
    """16 hex digits for a temporary file's name, unique in this process: a counter
    after a random prefix drawn once per process (not a getrandom() per file)."""
    return f"{_PROCESS[1]}{next(_TEMP_SERIAL) & 0xFFFFFFFF:08x}"


def _new_process() -> None:
    """Note this process's ID and draw its prefix: at import, and in a forked child."""
    _PROCESS[:] = [os.getpid(), secrets.token_hex(4)]


_PROCESS: list[Any] = []
_TEMP_SERIAL = itertools.count()
_new_process()
if hasattr(os, "register_at_fork"):  # no fork: the process never changes
    os.register_at_fork(after_in_child=_new_process)


@functools.cache
def _host_tag() -> str:
    """This machine, boot and PID namespace, as 8 hex digits."""
    parts = [socket.gethostname()]
    with contextlib.suppress(OSError):
        parts.append(Path("/proc/sys/kernel/random/boot_id").read_text().strip())
    with contextlib.suppress(OSError):
        parts.append(str(os.stat("/proc/self/ns/pid").st_ino))
    return hashlib.blake2s("\0".join(parts).encode(), digest_size=4).hexdigest()


def _temp_path(path: Path, base: str) -> Path:
    """A new temporary name next to ``path`` that says which process writes it."""
    name = f".{base}.{_host_tag()}-{os.getpid()}-{secrets.token_hex(8)}.part"
    return path.parent / name


def _pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)  # signal 0: only asks whether the process exists
    except ProcessLookupError:
        return False
    except OSError:
        return True  # e.g. another user's process: it exists
    return True


def _listing(folder: str | os.PathLike[str]) -> list[os.DirEntry[str]]:
    """A folder's entries; none when it was removed meanwhile (a concurrent prune)."""
    try:
        with os.scandir(folder) as entries:
            return list(entries)
    except FileNotFoundError:
        return []


def _stray(entry: os.DirEntry[str], now: float) -> str | None:
    """Why a temporary file is stray (its writer is gone), or None while it may be written."""
    try:
        age = now - entry.stat(follow_symlinks=False).st_mtime
    except FileNotFoundError:
        return None  # renamed into place or removed meanwhile
    found = _TEMP_RE.match(entry.name)
    if found and found["host"] == _host_tag():
        pid = int(found["pid"])
        if pid == os.getpid():
            with _LIVE_LOCK:
                if entry.name in _LIVE_TEMPS:
                    return None
            return "its writer, this process, no longer writes it"
        # os.kill(pid, 0) would terminate the process on Windows: POSIX only.
        if os.name == "posix" and not _pid_alive(pid):
            return f"its writer, process {pid}, is gone"
    if age > _STALE_SECONDS:
        return f"untouched for {age / 3600:.1f} hours"
    return None


def _schema() -> str:
    keyword_columns = "".join(f",\n    {k} TEXT" for k in _KEYWORD_COLUMNS)
    return f"""
CREATE TABLE IF NOT EXISTS instances (
    SOPInstanceUID TEXT PRIMARY KEY,
    StudyInstanceUID TEXT NOT NULL,
    SeriesInstanceUID TEXT NOT NULL,
    SOPClassUID TEXT,
    TransferSyntaxUID TEXT,
    path TEXT NOT NULL,
    size INTEGER NOT NULL,
    stored_at TEXT NOT NULL{keyword_columns}
);
CREATE INDEX IF NOT EXISTS instances_by_study ON instances (StudyInstanceUID);
CREATE INDEX IF NOT EXISTS instances_by_series ON instances (SeriesInstanceUID);
"""


def _use_wal(conn: sqlite3.Connection) -> None:
    """Put the index in WAL mode, retrying while another process opens it too."""
    deadline = time.monotonic() + _BUSY_SECONDS
    while True:
        try:
            conn.execute("PRAGMA journal_mode = WAL")
            return
        except sqlite3.OperationalError as exc:
            # Changing the journal mode fails at once, without the busy timeout, when
            # another connection opens a new index at the same moment.
            if "locked" not in str(exc) or time.monotonic() > deadline:
                raise
            time.sleep(0.01)


class _Connection(sqlite3.Connection):
    """A connection that can be weakly referenced (the base class cannot)."""


def _chunks(items: Sequence[str], size: int = _CHUNK) -> Iterator[Sequence[str]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def _human(size: float) -> str:
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if size < 1000 or unit == "TB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1000
    return f"{size:.1f} TB"  # pragma: no cover


def _uid_list(values: Iterable[Any]) -> list[str]:
    """Distinct non-empty strings, in first-seen order."""
    if isinstance(values, str):
        values = [values]
    out = (str(v).strip() for v in values if not frames.is_missing(v))
    return list(dict.fromkeys(v for v in out if v))


def atomic_write(path: str | os.PathLike[str], data: bytes | Iterable[bytes]) -> None:
    """Write ``data`` to ``path`` so that readers see either no file or all of it.

    The bytes go to a hidden ``.part`` file in the same folder, then
    ``os.replace`` puts it in place; on any error the temporary file is removed.

    Examples
    --------
    >>> import pathlib, tempfile
    >>> target = pathlib.Path(tempfile.mkdtemp()) / "a" / "b.dcm"
    >>> atomic_write(target, [b"DI", b"CM"])
    >>> target.read_bytes(), [p.name for p in target.parent.iterdir()]
    (b'DICM', ['b.dcm'])
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temp_path(path, path.name)
    chunks = [data] if isinstance(data, (bytes, bytearray, memoryview)) else data
    with _LIVE_LOCK:
        _LIVE_TEMPS.add(tmp.name)
    try:
        with open(tmp, "xb") as out:
            for chunk in chunks:
                out.write(chunk)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    finally:
        with _LIVE_LOCK:
            _LIVE_TEMPS.discard(tmp.name)


@dataclass(eq=False)
class Volume:
    """A series as one array, in patient coordinates (what :meth:`Cache.load_series` returns).

    Attributes
    ----------
    array : numpy.ndarray
        ``(slices, rows, columns)`` float32, with RescaleSlope and RescaleIntercept
        applied (Hounsfield units for CT).
    spacing : tuple of 3 floats
        Millimetres between slices (from the positions), between rows and between
        columns.
    origin : tuple of 3 floats
        ImagePositionPatient of the first slice (NaN when the files have none).
    orientation : numpy.ndarray
        3x3: the row direction, the column direction and the slice normal.
    sop_instance_uids : list of str
        The SOPInstanceUID of each slice, in array order.
    """

    array: np.ndarray
    spacing: tuple[float, float, float]
    origin: tuple[float, float, float]
    orientation: np.ndarray
    sop_instance_uids: list[str] = field(default_factory=list)

    def __repr__(self) -> str:
        spacing = ", ".join(f"{s:g}" for s in self.spacing)
        origin = ", ".join(f"{s:g}" for s in self.origin)
        if self.array.size:
            values = f", values {self.array.min():g} to {self.array.max():g}"
        else:
            values = ""
        return (
            f"Volume(shape={self.array.shape}, spacing=({spacing}) mm, origin=({origin}){values})"
        )


_PLAIN_UID = re.compile(r"[0-9.]{1,64}")


def _ui(value: str) -> bytes:
    data = value.encode("ascii")
    return data + b"\0" * (len(data) % 2)


def _meta_element(element: int, vr: bytes, value: bytes) -> bytes:
    return struct.pack("<HH2sH", 2, element, vr, len(value)) + value


_IMPLEMENTATION = _meta_element(0x12, b"UI", _ui(PYNETDICOM_IMPLEMENTATION_UID)) + _meta_element(
    0x13,
    b"SH",
    PYNETDICOM_IMPLEMENTATION_VERSION.encode("ascii")
    + b" " * (len(PYNETDICOM_IMPLEMENTATION_VERSION) % 2),
)


def part10_head(sop_class: str, sop: str, syntax: str) -> bytes | None:
    """Preamble, ``DICM`` and file meta of a received object, as pynetdicom's
    ``Event.encoded_dataset()`` writes them (byte for byte), in a few microseconds
    instead of a pydicom encode per object; None for values only pydicom should
    encode (empty, or not a plain UID).
    """
    if not all(_PLAIN_UID.fullmatch(v) for v in (sop_class, sop, syntax)):
        return None
    body = b"".join(
        (
            struct.pack("<HH2sHI", 2, 1, b"OB", 0, 2) + b"\x00\x01",
            _meta_element(0x02, b"UI", _ui(sop_class)),
            _meta_element(0x03, b"UI", _ui(sop)),
            _meta_element(0x10, b"UI", _ui(syntax)),
            _IMPLEMENTATION,
        )
    )
    return b"\0" * 128 + b"DICM" + struct.pack("<HH2sHI", 2, 0, b"UL", 4, len(body)) + body


def _received_head(sop_class: str, sop: str, syntax: str) -> bytes:
    """:func:`part10_head`, or pydicom's encoding of the values it leaves to pydicom.

    Raises :class:`CacheError` for values no file meta can hold.
    """
    head = part10_head(sop_class, sop, syntax)
    if head is not None:
        return head
    meta = FileMetaDataset()
    # Set here, not by enforce_standard, which refuses empty values pynetdicom writes.
    meta.FileMetaInformationGroupLength = 0  # computed by write_file_meta_info
    meta.FileMetaInformationVersion = b"\x00\x01"
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = sop
    meta.TransferSyntaxUID = syntax
    meta.ImplementationClassUID = PYNETDICOM_IMPLEMENTATION_UID
    meta.ImplementationVersionName = PYNETDICOM_IMPLEMENTATION_VERSION
    buffer = io.BytesIO()
    buffer.write(b"\0" * 128 + b"DICM")
    try:
        write_file_meta_info(buffer, meta, enforce_standard=False)
    except (ValueError, TypeError, AttributeError, UnicodeError) as exc:
        raise CacheError(
            "refused to cache the received object: its C-STORE request's UIDs cannot be "
            f"written as a file meta ({exc}); nothing was written."
        ) from None
    return buffer.getvalue()


class Cache:
    """Retrieved DICOM objects on disk, with a SQLite index that answers queries.

    Parameters
    ----------
    root : str or os.PathLike, optional
        The cache folder. Default: the ``PACSFRAME_CACHE`` environment variable,
        else the platform's user cache directory
        (``platformdirs.user_cache_dir("pacsframe")``). Created on first use.

    Notes
    -----
    One Cache may be used from several threads (each gets its own SQLite
    connection) and several processes may share one root: the index runs in WAL
    mode with a busy timeout, files are only ever renamed into place, and
    :meth:`verify` may run while they write.

    Examples
    --------
    >>> import pathlib, tempfile
    >>> from pacsframe.demo import make_cohort
    >>> tmp = tempfile.TemporaryDirectory()
    >>> manifest = make_cohort(f"{tmp.name}/src", patients=1, matrix=16,
    ...     studies_per_patient=1, series_per_study=1, instances_per_series=3)
    >>> cache = Cache(f"{tmp.name}/cache")
    >>> _ = [cache.add(pathlib.Path(p).read_bytes()) for p in manifest.path]
    >>> len(cache), cache.size_bytes > 3 * 16 * 16 * 2
    (3, True)
    >>> cache.find_studies().PatientID.tolist()
    ['PF000001']
    >>> cache.close(); tmp.cleanup()
    """

    def __init__(self, root: str | os.PathLike[str] | None = None) -> None:
        if root is None:
            root = os.environ.get(ENV_VAR) or platformdirs.user_cache_dir("pacsframe")
        self.root = Path(os.path.abspath(os.path.expanduser(os.fspath(root))))
        self._local = threading.local()
        # Index rows filed but not yet committed, per thread (see _batched); apart
        # from _local, which close() resets: a close from another thread must not
        # drop them.
        self._batches = threading.local()
        self._lock = threading.Lock()
        # Weak, so a worker thread's connection closes when the thread ends.
        self._connections: weakref.WeakSet[_Connection] = weakref.WeakSet()
        self._schema_ready = False
        self._resolved_root: Path | None = None
        self._safe_folders: dict[tuple[str, str], Path] = {}

    def __repr__(self) -> str:
        if not (self.root / INDEX_NAME).exists():
            return f"Cache({str(self.root)!r}, empty)"
        try:
            n, size = len(self), self.size_bytes
        except (sqlite3.Error, OSError):
            return f"Cache({str(self.root)!r})"
        return f"Cache({str(self.root)!r}, {n} instances, {_human(size)})"

    def _repr_html_(self) -> str:
        from html import escape

        root = escape(str(self.root))
        # Like __repr__, do not create an index just to describe an empty cache.
        if not (self.root / INDEX_NAME).exists():
            return f"<div><b>Cache</b> at <code>{root}</code>: empty</div>"
        try:
            n, size = len(self), self.size_bytes
            counts = (
                self._db()
                .execute(
                    "SELECT COALESCE(Modality, ''), COUNT(*) FROM instances "
                    "GROUP BY Modality ORDER BY COUNT(*) DESC"
                )
                .fetchall()
            )
        except (sqlite3.Error, OSError) as exc:
            return (
                f"<div><b>Cache</b> at <code>{root}</code>: unreadable ({escape(str(exc))})</div>"
            )
        by_modality = "".join(
            f"<tr><td>{escape(m or '(none)')}</td><td>{c}</td></tr>" for m, c in counts
        )
        return (
            f"<div><b>Cache</b> at <code>{root}</code>: {n} instances, {_human(size)}"
            f"<table><tr><th>Modality</th><th>instances</th></tr>{by_modality}</table></div>"
        )

    def __len__(self) -> int:
        return int(self._db().execute("SELECT COUNT(*) FROM instances").fetchone()[0])

    @property
    def size_bytes(self) -> int:
        """Total size of the cached files, in bytes, from the index."""
        row = self._db().execute("SELECT COALESCE(SUM(size), 0) FROM instances").fetchone()
        return int(row[0])

    def __enter__(self) -> Cache:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __reduce__(self) -> tuple[Any, ...]:
        # Its root is all a Cache is: connections and locks are made where it is used.
        return (type(self), (str(self.root),))

    def close(self) -> None:
        """Close every index connection this Cache opened (they reopen on next use)."""
        with self._lock:
            connections = list(self._connections)
            self._connections = weakref.WeakSet()
        for conn in connections:
            with contextlib.suppress(sqlite3.Error):
                conn.close()
        self._local = threading.local()

    # --- the index ---------------------------------------------------------------------

    def _db(self) -> _Connection:
        # One connection per thread (and per process: a forked child must not reuse
        # its parent's SQLite handle).
        entry = getattr(self._local, "entry", None)
        if entry is not None and entry[0] == _pid():
            return entry[1]
        conn = self._connect()
        self._local.entry = (_pid(), conn)
        return conn

    def _connect(self) -> _Connection:
        index = self.root / INDEX_NAME
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            conn = sqlite3.connect(
                index,
                timeout=_BUSY_SECONDS,
                # Autocommit: each INSERT is its own transaction, but for the
                # batches _flush_rows commits in one (BEGIN IMMEDIATE ... COMMIT).
                isolation_level=None,
                check_same_thread=False,  # only so close() may close it from any thread
                factory=_Connection,
            )
        except (OSError, sqlite3.Error) as exc:
            raise CacheError(
                f"cannot open the cache index at {index} ({exc}); check that the folder "
                f"is writable, or choose another root with {ENV_VAR}."
            ) from exc
        try:
            conn.execute(f"PRAGMA busy_timeout = {int(_BUSY_SECONDS * 1000)}")
            with self._lock:
                if not self._schema_ready:
                    _use_wal(conn)
                    conn.executescript(_schema())
                    have = {r[1] for r in conn.execute("PRAGMA table_info(instances)")}
                    for keyword in _KEYWORD_COLUMNS:
                        if keyword not in have:
                            # An index from before a keyword was indexed: old rows stay
                            # empty in that column until they are written again.
                            conn.execute(f"ALTER TABLE instances ADD COLUMN {keyword} TEXT")
                    self._schema_ready = True
                self._connections.add(conn)
            # In WAL mode NORMAL never corrupts the index; it only skips fsync per commit.
            conn.execute("PRAGMA synchronous = NORMAL")
        except sqlite3.Error as exc:
            conn.close()
            raise CacheError(
                f"the cache index {index} cannot be used ({exc}); if it is damaged, "
                "delete it: the files stay, and a re-run of the retrieval indexes them again."
            ) from exc
        return conn

    def _existing(self, sop: str) -> str | None:
        """The relative path the index has for ``sop`` (or a row this thread holds
        in a :meth:`_batched` block), or None."""
        pending = getattr(self._batches, "rows", None)
        if pending:
            held = pending.get(sop)
            if held is not None:
                return str(held[_PATH_AT])
        # Asked per object even for a series new to the cache: the instance may be
        # indexed under other parents, and then its copy is kept (or moved).
        row = (
            self._db()
            .execute("SELECT path FROM instances WHERE SOPInstanceUID = ?", (sop,))
            .fetchone()
        )
        return row[0] if row else None

    def _rows_where(self, column: str, uids: Sequence[str], fields: str) -> list[tuple[Any, ...]]:
        db = self._db()
        rows: list[tuple[Any, ...]] = []
        for chunk in _chunks(uids):
            marks = ", ".join("?" * len(chunk))
            rows += db.execute(
                f"SELECT {fields} FROM instances WHERE {column} IN ({marks})", list(chunk)
            ).fetchall()
        return rows

    # --- layout and writing ------------------------------------------------------------

    def path_for(self, study: str, series: str, sop: str) -> Path:
        """The path of an instance in the cache, after checking every UID.

        Raises
        ------
        CacheError
            When a UID does not follow the UI grammar (so it could name a path
            outside the root), or the path would resolve outside the root.

        Examples
        --------
        >>> cache = Cache("/tmp/pacsframe-example")
        >>> cache.path_for("1.2.3", "1.2.3.4", "1.2.3.4.5").relative_to(cache.root).as_posix()
        '1.2.3/1.2.3.4/1.2.3.4.5.dcm'
        >>> cache.path_for("1.2.3", "../../x", "1.2.3.4.5")
        Traceback (most recent call last):
        ...
        pacsframe.errors.CacheError: refused to write into the cache: SeriesInstanceUID '../../x' is not a valid UID (digits and dots, at most 64 characters); nothing was written.
        """  # noqa: E501
        # A folder checked once is not resolved again for each of its objects (one
        # realpath walks every component of the path): its UIDs were checked then.
        folder = self._safe_folders.get((study, series))
        for name, uid in zip(_UID_KEYS, (study, series, sop), strict=True):
            if (folder is None or name == "SOPInstanceUID") and not frames.is_uid(uid):
                shown = repr(uid) if not isinstance(uid, str) or len(uid) <= 70 else "a long value"
                raise CacheError(
                    f"refused to write into the cache: {name} {shown} is not a valid UID "
                    "(digits and dots, at most 64 characters); nothing was written."
                )
        # The file itself could still be a link, which one lstat tells.
        if folder is not None:
            path = folder / f"{sop}.dcm"
            if not os.path.islink(path):
                return path
        path = self.root / study / series / f"{sop}.dcm"
        if self._resolved_root is None:
            self._resolved_root = self.root.resolve()
        # Defence in depth: a symlinked folder inside the root must not lead outside it.
        if not path.resolve().is_relative_to(self._resolved_root):
            raise CacheError(
                f"refused to write {sop}: {path} resolves outside the cache root "
                f"{self.root} (a symbolic link?); nothing was written."
            )
        if len(self._safe_folders) >= _SAFE_FOLDERS_MAX:
            self._safe_folders.clear()
        self._safe_folders[(study, series)] = path.parent
        return path

    def _absolute(self, relative: str) -> Path:
        path = self.root / relative
        if self._resolved_root is None:
            self._resolved_root = self.root.resolve()
        if not path.resolve().is_relative_to(self._resolved_root):
            raise CacheError(
                f"the cache index points outside its root ({relative!r}); the index was "
                "tampered with: delete index.sqlite and re-run the retrieval."
            )
        return path

    @contextlib.contextmanager
    def _temporary(self, path: Path) -> Iterator[tuple[Path, IO[bytes]]]:
        """A new file next to ``path``, removed on exit unless it was renamed into place."""
        # O_EXCL with a random name instead of mkstemp: mkstemp's 0600 mode would
        # ignore the user's umask for files that are meant to be shared.
        tmp = _temp_path(path, path.stem)
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | _O_BINARY
        made_folder = False
        with _LIVE_LOCK:
            _LIVE_TEMPS.add(tmp.name)  # before it exists: verify() here leaves it alone
        try:
            for attempt in range(3):
                try:
                    fd = os.open(tmp, flags, 0o666)
                    break
                except FileNotFoundError:
                    # The folder is made only when missing: one failed open is cheaper
                    # than a mkdir call per object. Retried, as a failing writer next
                    # door may remove the empty folder it made in between.
                    if attempt == 2:
                        raise
                    path.parent.mkdir(parents=True, exist_ok=True)
                    made_folder = True
        except BaseException:
            with _LIVE_LOCK:
                _LIVE_TEMPS.discard(tmp.name)
            raise
        handle = os.fdopen(fd, "wb")
        try:
            yield tmp, handle
        except BaseException:
            handle.close()
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            if made_folder:
                self._prune([path.parent])  # leave no empty folders behind either
            raise
        finally:
            handle.close()
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            with _LIVE_LOCK:
                _LIVE_TEMPS.discard(tmp.name)

    def _header(self, source: Any, sop: str) -> tuple[dict[str, str | None], str]:
        """Read an object's header: its index strings and transfer syntax."""
        try:
            ds = dcmread(source, stop_before_pixels=True, specific_tags=_HEADER_TAGS)
            syntax = ds.file_meta.get("TransferSyntaxUID") if ds.file_meta else None
        except _READ_ERRORS as exc:
            raise CacheError(
                f"refused to cache {sop}: it is not a readable DICOM Part-10 file ({exc}); "
                "pass the encoded file (preamble, 'DICM' and file meta), e.g. "
                "event.encoded_dataset(); nothing was written."
            ) from exc
        if not syntax:
            raise CacheError(
                f"refused to cache {sop}: its file meta has no TransferSyntaxUID, so it "
                "cannot be read back; nothing was written."
            )
        # An undecodable value is indexed as empty, with a MalformedValueWarning (not
        # silenced here: catch_warnings is not thread-safe).
        return frames.dicom_strings(ds, matching.INDEX_KEYWORDS), str(syntax)

    def _row(
        self,
        header: tuple[dict[str, str | None], str],
        study: str,
        series: str,
        sop: str,
        path: Path,
    ) -> list[Any]:
        """Check a header against the UIDs given and build the object's index row."""
        strings, syntax = header
        for keyword, given in zip(_UID_KEYS, (study, series, sop), strict=True):
            if strings[keyword] != given:
                raise CacheError(
                    f"refused to cache {sop}: its header has {keyword} "
                    f"{strings[keyword]!r}, not {given!r} as the caller said; nothing was "
                    "written."
                )
        stored_at = _dt.datetime.now(_dt.UTC).isoformat(timespec="milliseconds")
        relative = f"{study}/{series}/{sop}.dcm"  # path_for's layout, relative to root
        fixed = {
            "SOPInstanceUID": sop,
            "StudyInstanceUID": study,
            "SeriesInstanceUID": series,
            "SOPClassUID": strings["SOPClassUID"],
            "TransferSyntaxUID": syntax,
            "path": relative,
            "size": 0,  # set once the file is complete
            "stored_at": stored_at,
        }
        return [*fixed.values(), *_keyword_values(strings)]

    def _commit(
        self,
        row: list[Any],
        tmp: str | Path,
        path: Path,
        old: str | None,
        size: int | None = None,
    ) -> None:
        """File ``tmp`` at ``path`` and index it; ``size``: its size, when known."""
        row[_FIXED.index("size")] = os.stat(tmp).st_size if size is None else size
        for attempt in range(3):
            try:
                os.replace(tmp, path)
                break
            except FileNotFoundError:
                # Only a received object's temporary file lives outside its final
                # folder, which may not exist yet (or a failing writer next door
                # removed it, empty, in between): made only when missing.
                if attempt == 2 or not os.path.exists(tmp):
                    raise
                path.parent.mkdir(parents=True, exist_ok=True)
        # The file is complete and in place before the row exists, so a row always
        # points at a whole file; a crash in between only means a re-fetch.
        pending = getattr(self._batches, "rows", None)
        if pending is not None and (old is None or old == row[_PATH_AT]):
            pending[row[_SOP_AT]] = row  # committed with its batch (see _batched)
            return
        if pending:
            self._flush_rows()  # in order: an earlier row of this instance first
        self._db().execute(_INSERT, row)
        if old is not None and old != row[_PATH_AT]:
            # The same instance re-filed under other parents: drop the old copy.
            with contextlib.suppress(OSError, CacheError):
                self._absolute(old).unlink()

    @contextlib.contextmanager
    def _batched(self) -> Iterator[None]:
        """Within the block, this thread's index rows are committed in batches.

        A receiver that files many objects in a row (a WADO-RS response) commits
        their rows ``_BATCH_ROWS`` at a time when it calls :meth:`_flush_rows`
        with ``full=True`` between objects, and the rest when the block ends.
        Each file is in place before its row is held, as before; a row held is
        seen by this thread's ``_existing``, by other connections once committed
        (as if its object had arrived a little later); a crash loses only rows,
        and their objects are fetched again, as after a crash between rename
        and row. Nested blocks commit with the outermost one.
        """
        if getattr(self._batches, "rows", None) is not None:
            yield
            return
        self._batches.rows = {}
        try:
            yield
        finally:
            try:
                self._flush_rows()
            finally:
                self._batches.rows = None

    def _flush_rows(self, *, full: bool = False) -> None:
        """Commit this thread's held index rows in one transaction (``full``: only
        once there are ``_BATCH_ROWS`` of them).

        Raises
        ------
        CacheError
            The index refused the transaction: the objects are filed, not indexed.
        """
        pending = getattr(self._batches, "rows", None)
        if not pending or (full and len(pending) < _BATCH_ROWS):
            return
        rows = list(pending.values())
        pending.clear()
        conn = self._db()
        try:
            conn.execute("BEGIN IMMEDIATE")
            try:
                conn.executemany(_INSERT, rows)
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            conn.execute("COMMIT")
        except sqlite3.Error as exc:
            raise CacheError(
                f"the cache index at {self.root / INDEX_NAME} did not record {len(rows)} "
                f"object(s) just filed ({exc}): their files are in place but not "
                "indexed, so the cache does not count them. Free the disk or end what "
                "holds the index, then retrieve again: what is missing is fetched again."
            ) from exc

    def write(
        self,
        study: str,
        series: str,
        sop: str,
        data: bytes | bytearray | memoryview | Iterable[bytes],
        *,
        overwrite: bool = False,
        _header: tuple[dict[str, str | None], str] | None = None,
    ) -> Path:
        """Store one encoded DICOM file atomically and index it.

        Parameters
        ----------
        study, series, sop : str
            The object's StudyInstanceUID, SeriesInstanceUID and SOPInstanceUID;
            they must be valid UIDs and equal to the ones in its header.
        data : bytes-like or iterable of bytes
            A DICOM Part-10 file (preamble, ``DICM``, file meta, dataset), e.g. what
            ``pynetdicom``'s ``Event.encoded_dataset()`` returns, whole or in chunks.
        overwrite : bool, default False
            Write even when the object is already cached.

        Returns
        -------
        pathlib.Path
            Where the object is (or already was) cached.

        Raises
        ------
        CacheError
            For an invalid UID, data that is not a Part-10 file, or a header whose
            UIDs differ from the ones given. Nothing is left on disk.

        Examples
        --------
        >>> import pathlib, tempfile
        >>> from pacsframe.demo import make_cohort
        >>> tmp = tempfile.TemporaryDirectory()
        >>> row = make_cohort(f"{tmp.name}/src", patients=1, matrix=16,
        ...     studies_per_patient=1, series_per_study=1, instances_per_series=1).iloc[0]
        >>> data = pathlib.Path(row.path).read_bytes()
        >>> cache = Cache(f"{tmp.name}/cache")
        >>> path = cache.write(row.StudyInstanceUID, row.SeriesInstanceUID, row.SOPInstanceUID, data)
        >>> path.read_bytes() == data, path.name == f"{row.SOPInstanceUID}.dcm"
        (True, True)
        >>> cache.cached([row.SOPInstanceUID]) == {row.SOPInstanceUID}
        True
        >>> cache.close(); tmp.cleanup()
        """  # noqa: E501
        path = self.path_for(study, series, sop)
        old = self._existing(sop)
        if old is not None and not overwrite:
            existing = self._absolute(old)
            if existing.exists():
                return existing
        if isinstance(data, (bytes, bytearray, memoryview)):
            view = memoryview(data).cast("B") if isinstance(data, memoryview) else data
            if bytes(view[128:132]) != b"DICM":
                raise CacheError(
                    f"refused to cache {sop}: the data is not a DICOM Part-10 file (no "
                    "'DICM' after the 128-byte preamble); pass the encoded file, e.g. "
                    "event.encoded_dataset(); nothing was written."
                )
            # Checked before anything touches the disk.
            header = _header or self._header(io.BytesIO(view), sop)
            row = self._row(header, study, series, sop, path)
            chunks: Iterable[Any] = (view,)
        else:
            # Chunks are checked once written, unless the caller read the header.
            row = self._row(_header, study, series, sop, path) if _header else []
            chunks = data
        with self._temporary(path) as (tmp, handle):
            for chunk in chunks:
                handle.write(chunk)
            handle.close()
            if not row:
                row = self._row(self._header(tmp, sop), study, series, sop, path)
            self._commit(row, tmp, path, old)
        return path

    def add(
        self, data: bytes | bytearray, *, overwrite: bool = False
    ) -> tuple[Path, dict[str, str | None]]:
        """Store one encoded DICOM file under the UIDs in its own header.

        What a storage SCP or C-GET receiver calls: the header is read once, both
        to place the file and to index it.

        Returns
        -------
        (pathlib.Path, dict)
            Where the object is cached, and its header's index strings by keyword.

        Raises
        ------
        CacheError
            For data that is not a Part-10 file or a header whose UIDs are not
            valid (``../../x``); nothing is written.
        """
        view = memoryview(data).cast("B") if isinstance(data, memoryview) else data
        header = self._header(io.BytesIO(view), "the received object")
        strings = header[0]
        study, series, sop = (strings[k] or "" for k in _UID_KEYS)
        path = self.write(study, series, sop, view, overwrite=overwrite, _header=header)
        return path, strings

    def add_received(
        self, head: bytes, dataset: io.BytesIO, syntax: str, *, overwrite: bool = False
    ) -> tuple[Path, dict[str, str | None]]:
        """Store one object as a C-STORE delivered it: file meta apart from its dataset.

        ``head`` is the preamble, ``DICM`` and encoded file meta; ``dataset`` the
        buffer pynetdicom assembled from the PDV fragments, encoded in ``syntax``.
        The dataset is scanned once, up to its pixel data, for the UIDs and the
        index (:func:`pacsframe.frames.scan_elements`; pydicom reads what the scan
        leaves to it), and goes to the temporary file as it is: never joined to the meta,
        copied or decoded. Otherwise as :meth:`add`.
        """
        uid = UID(syntax)
        if not uid.is_transfer_syntax or uid.is_deflated:
            # Deflated data must be inflated to be read: pydicom's path does that.
            return self.add(head + dataset.getvalue(), overwrite=overwrite)
        try:
            found = None
            if uid.is_little_endian:
                with dataset.getbuffer() as view:
                    found = frames.scan_elements(
                        view, uid.is_implicit_VR, _HEADER_TAG_SET, stop=_HEADER_END
                    )
            if found is not None:
                strings = frames.raw_strings(found, matching.INDEX_KEYWORDS)
            else:
                dataset.seek(0)
                ds = read_dataset(
                    dataset,
                    uid.is_implicit_VR,
                    uid.is_little_endian,
                    stop_when=lambda tag, vr, length: tag in _PIXEL_TAGS,
                    specific_tags=_HEADER_TAGS,
                )
                strings = frames.dicom_strings(ds, matching.INDEX_KEYWORDS)
        except Exception:
            # Let the whole-file path refuse it, with the same error as ever.
            return self.add(head + dataset.getvalue(), overwrite=overwrite)
        study, series, sop = (strings[k] or "" for k in _UID_KEYS)
        with dataset.getbuffer() as body:
            path = self.write(
                study, series, sop, (head, body), overwrite=overwrite, _header=(strings, syntax)
            )
        return path, strings

    def receive(self, request: StoreRequest, *, overwrite: bool = False) -> IncomingObject:
        """A writer for one object a C-STORE delivers, fragment by fragment.

        The :class:`~pacsframe.net.operations.ObjectWriter` a C-GET's
        ``on_store`` or our storage SCP hands out: the data set's fragments go
        to a temporary file in the cache root as they arrive, after a file meta
        encoded from ``request`` as :meth:`add_received` does; ``commit`` scans
        the header once, then files and indexes the object as :meth:`write`
        does (atomically; an object already cached is kept unless
        ``overwrite``; invalid UIDs refused with the same :class:`CacheError`);
        ``discard`` leaves no trace. Memory per object is bounded (the first
        64 KiB of the data set, for the header scan, and a 256 KiB write
        buffer), whatever its size.

        Parameters
        ----------
        request : pacsframe.net.operations.StoreRequest
            The C-STORE-RQ's SOP class and instance UIDs and the context's
            transfer syntax, which go into the file meta.
        overwrite : bool, default False
            Replace a cached copy of the same instance.

        Raises
        ------
        CacheError
            When the request's UIDs cannot be written as a file meta.
        OSError
            When the temporary file cannot be made (a full disk, a read-only root).

        Examples
        --------
        >>> import pathlib, tempfile
        >>> from pydicom import dcmread
        >>> from pacsframe.demo import make_cohort
        >>> from pacsframe.net.operations import StoreRequest, read_part10
        >>> tmp = tempfile.TemporaryDirectory()
        >>> row = make_cohort(f"{tmp.name}/src", patients=1, matrix=16,
        ...     studies_per_patient=1, series_per_study=1, instances_per_series=1).iloc[0]
        >>> part10 = read_part10(row.path)
        >>> dataset = pathlib.Path(row.path).read_bytes()[part10.dataset_offset:]
        >>> cache = Cache(f"{tmp.name}/cache")
        >>> writer = cache.receive(StoreRequest(part10.sop_class_uid,
        ...     part10.sop_instance_uid, part10.transfer_syntax, 1))
        >>> for start in range(0, len(dataset), 1000):
        ...     writer.write(memoryview(dataset)[start:start + 1000])
        >>> writer.commit()
        >>> writer.path.name == f"{row.SOPInstanceUID}.dcm", len(cache)
        (True, 1)
        >>> cache.close(); tmp.cleanup()
        """
        return IncomingObject(self, request, overwrite=overwrite)

    @contextlib.contextmanager
    def open_writer(
        self, study: str, series: str, sop: str, *, overwrite: bool = False
    ) -> Iterator[IO[bytes]]:
        """A binary file to stream one object into; it is filed atomically on exit.

        On a clean exit the file is checked like :meth:`write` does, renamed into
        place and indexed; on an exception it is removed and nothing is visible.
        When the object is already cached and ``overwrite`` is False, what was
        written is discarded and the cached copy kept.

        Examples
        --------
        >>> import pathlib, tempfile
        >>> from pacsframe.demo import make_cohort
        >>> tmp = tempfile.TemporaryDirectory()
        >>> row = make_cohort(f"{tmp.name}/src", patients=1, matrix=16,
        ...     studies_per_patient=1, series_per_study=1, instances_per_series=1).iloc[0]
        >>> data = pathlib.Path(row.path).read_bytes()
        >>> cache = Cache(f"{tmp.name}/cache")
        >>> with cache.open_writer(row.StudyInstanceUID, row.SeriesInstanceUID,
        ...                        row.SOPInstanceUID) as out:
        ...     _ = out.write(data[:1000])
        ...     _ = out.write(data[1000:])
        >>> len(cache)
        1
        >>> cache.close(); tmp.cleanup()
        """
        path = self.path_for(study, series, sop)
        with self._temporary(path) as (tmp, handle):
            yield handle
            handle.close()
            old = self._existing(sop)
            if old is not None and not overwrite and self._absolute(old).exists():
                return
            row = self._row(self._header(tmp, sop), study, series, sop, path)
            self._commit(row, tmp, path, old)

    # --- what is cached ------------------------------------------------------------------

    def instances(self, **keys: Any) -> pd.DataFrame:
        """The whole index as a typed frame: one row per cached instance.

        Columns: every attribute of :data:`pacsframe.matching.INDEX_KEYWORDS` typed
        by its VR (as in a C-FIND answer), then ``TransferSyntaxUID``, ``path``
        (absolute), ``size`` (bytes, ``Int64``) and ``stored_at`` (UTC).

        Parameters
        ----------
        **keys
            Optional filters on UID columns, e.g. ``SeriesInstanceUID="1.2.3"`` or
            a list of UIDs, applied in SQL before the frame is built.

        Examples
        --------
        >>> import pathlib, tempfile
        >>> from pacsframe.demo import make_cohort
        >>> tmp = tempfile.TemporaryDirectory()
        >>> manifest = make_cohort(f"{tmp.name}/src", patients=1, matrix=16,
        ...     studies_per_patient=1, series_per_study=1, instances_per_series=2)
        >>> cache = Cache(f"{tmp.name}/cache")
        >>> _ = [cache.add(pathlib.Path(p).read_bytes()) for p in manifest.path]
        >>> frame = cache.instances()
        >>> frame.InstanceNumber.tolist(), str(frame.StudyDate.dtype), str(frame["size"].dtype)
        ([1, 2], 'datetime64[ns]', 'Int64')
        >>> cache.close(); tmp.cleanup()
        """
        where = []
        params: list[str] = []
        for name, value in keys.items():
            keyword = frames.normalize_keyword(name)
            if keyword not in _LEVEL_COLUMN.values():
                raise QueryError(
                    f"instances() filters on PatientID, StudyInstanceUID, "
                    f"SeriesInstanceUID or SOPInstanceUID, not {keyword}; use find_instances "
                    "for other keys."
                )
            uids = _uid_list(value)
            where.append(f"{keyword} IN ({', '.join('?' * len(uids))})" if uids else "0")
            params += uids
        sql = f"SELECT {', '.join(_ALL_COLUMNS)} FROM instances"
        if where:
            sql += " WHERE " + " AND ".join(where)
        rows = self._db().execute(f"{sql} {_ORDER}", params).fetchall()
        columns = dict(zip(_ALL_COLUMNS, zip(*rows, strict=True), strict=True)) if rows else {}
        frame = pd.DataFrame(
            {k: frames.to_series(list(columns.get(k, ())), k) for k in _FRAME_KEYWORDS}
        )
        root = self.root
        frame["path"] = pd.Series([str(root / p) for p in columns.get("path", ())], dtype="string")
        frame["size"] = pd.Series(list(columns.get("size", ())), dtype="Int64")
        stored = pd.Series(list(columns.get("stored_at", ())), dtype=object)
        frame["stored_at"] = pd.to_datetime(stored, utc=True, format="ISO8601").astype(
            "datetime64[ns, UTC]"
        )
        return frame

    def locate(self, level: str, uids: Iterable[str]) -> pd.DataFrame:
        """Where the cached instances under some entities are: a lean, fast lookup.

        Only the UIDs, SOPClassUID and absolute ``path`` (all strings), so a
        retrieval can report what it skipped without building the full typed
        frame of :meth:`instances`.

        Parameters
        ----------
        level : {"patient", "study", "series", "image"}
            What ``uids`` are: PatientIDs, Study-, Series- or SOPInstanceUIDs.

        Examples
        --------
        >>> import tempfile
        >>> Cache(tempfile.mkdtemp()).locate("series", ["1.2.3"]).columns.tolist()
        ['StudyInstanceUID', 'SeriesInstanceUID', 'SOPInstanceUID', 'SOPClassUID', 'path']
        """
        return pd.DataFrame(
            self.locate_records(level, uids), columns=list(_LOCATE_FIELDS), dtype="string"
        )

    def locate_records(self, level: str, uids: Iterable[str]) -> list[dict[str, str | None]]:
        """:meth:`locate` as plain dicts, one per cached instance, without pandas.

        What a retrieval's planning reads for every unit it finds cached: a fully
        cached re-run is this lookup and nothing else, so it stays a list.
        """
        column = _LEVEL_COLUMN[normalize_level(level)]
        rows = self._rows_where(column, _uid_list(uids), ", ".join(_LOCATE_FIELDS))
        root = str(self.root)
        return [
            {
                "StudyInstanceUID": study,
                "SeriesInstanceUID": series,
                "SOPInstanceUID": sop,
                "SOPClassUID": sop_class,
                "path": os.path.join(root, relative),
            }
            for study, series, sop, sop_class, relative in rows
        ]

    def cached(self, sop_uids: Iterable[str]) -> set[str]:
        """The SOPInstanceUIDs among ``sop_uids`` that are in the cache.

        Examples
        --------
        >>> import tempfile
        >>> tmp = tempfile.TemporaryDirectory()
        >>> cache = Cache(tmp.name)
        >>> cache.cached(["1.2.3", "1.2.4"])
        set()
        >>> cache.close(); tmp.cleanup()
        """
        uids = _uid_list(sop_uids)
        return {r[0] for r in self._rows_where("SOPInstanceUID", uids, "SOPInstanceUID")}

    def count(self, level: str, uids: Iterable[str] | None = None) -> dict[str, int]:
        """Cached instances per patient, study or series.

        Parameters
        ----------
        level : {"patient", "study", "series"}
            What the UIDs are: PatientIDs, StudyInstanceUIDs or SeriesInstanceUIDs.
        uids : iterable of str, optional
            The entities to count; each appears in the result, with 0 when nothing
            of it is cached. Default: every cached entity of the level.

        Examples
        --------
        >>> import tempfile
        >>> tmp = tempfile.TemporaryDirectory()
        >>> cache = Cache(tmp.name)
        >>> cache.count("series", ["1.2.3"])
        {'1.2.3': 0}
        >>> cache.close(); tmp.cleanup()
        """
        lv = normalize_level(level)
        if lv == "IMAGE":
            raise QueryError(
                "count() counts instances per patient, study or series; use cached() to "
                "ask about single instances."
            )
        column = _LEVEL_COLUMN[lv]
        if uids is None:
            rows = (
                self._db()
                .execute(f"SELECT {column}, COUNT(*) FROM instances GROUP BY {column}")
                .fetchall()
            )
            return {r[0]: int(r[1]) for r in rows if r[0] is not None}
        wanted = _uid_list(uids)
        counts = dict.fromkeys(wanted, 0)
        db = self._db()
        for chunk in _chunks(wanted):
            marks = ", ".join("?" * len(chunk))
            for uid, n in db.execute(
                f"SELECT {column}, COUNT(*) FROM instances WHERE {column} IN ({marks}) "
                f"GROUP BY {column}",
                list(chunk),
            ):
                counts[uid] = int(n)
        return counts

    # --- offline queries -------------------------------------------------------------------

    def find(
        self,
        level: str,
        model: str = "study",
        return_keys: Sequence[str] | None = None,
        **keys: Any,
    ) -> pd.DataFrame:
        """Query the cache like a PACS: same validation, same matching, same columns.

        Keys are validated by :func:`pacsframe.query.build_query` (so bad input
        raises :class:`~pacsframe.errors.QueryError` exactly as ``PACS.find``
        does) and matched by :func:`pacsframe.matching.answer` over
        :meth:`instances`. Unlike a PACS, the cache answers relational queries:
        the keys of the levels above need not be given (``find_series`` with no
        StudyInstanceUID searches every cached series) and may be lists of UIDs.
        Computed attributes (``NumberOfStudyRelatedInstances``,
        ``ModalitiesInStudy``...) describe what is cached. Drilling down from a
        frame is not supported: filter the frame with pandas, or pass
        ``StudyInstanceUID=frame.StudyInstanceUID.tolist()``.

        Examples
        --------
        >>> import pathlib, tempfile
        >>> from pacsframe.demo import make_cohort
        >>> tmp = tempfile.TemporaryDirectory()
        >>> manifest = make_cohort(f"{tmp.name}/src", patients=2, matrix=16,
        ...     studies_per_patient=1, series_per_study=1, instances_per_series=2)
        >>> cache = Cache(f"{tmp.name}/cache")
        >>> _ = [cache.add(pathlib.Path(p).read_bytes()) for p in manifest.path]
        >>> cache.find("study", PatientID="PF000002").NumberOfStudyRelatedInstances.tolist()
        [2]
        >>> cache.find("study", StudyDate="2026-13-01")
        Traceback (most recent call last):
        ...
        pacsframe.errors.QueryError: StudyDate='20261301' is not a real date; give a date such as '2026-03-01' or '20260301'.
        >>> cache.close(); tmp.cleanup()
        """  # noqa: E501
        if not isinstance(model, str) or not (return_keys is None or _is_keys(return_keys)):
            raise QueryError(
                "the cache does not drill down from a frame; filter the frame with pandas, "
                "or pass the parents' UIDs, e.g. StudyInstanceUID=studies.StudyInstanceUID"
                ".tolist()."
            )
        query = build_query(level, model, keys, return_keys)
        result = matching.answer(self.instances(), query)
        result.attrs["pacsframe"] = {**query.to_json(), "peer": None, "cache": str(self.root)}
        return result

    def find_patients(self, **keys: Any) -> pd.DataFrame:
        """Cached patients (patient-root PATIENT level). See :meth:`find`."""
        return self.find("PATIENT", "patient", **keys)

    def find_studies(self, parents: Any = None, **keys: Any) -> pd.DataFrame:
        """Cached studies. See :meth:`find`."""
        _no_parents(parents)
        return self.find("STUDY", **keys)

    def find_series(self, parents: Any = None, **keys: Any) -> pd.DataFrame:
        """Cached series. See :meth:`find`."""
        _no_parents(parents)
        return self.find("SERIES", **keys)

    def find_instances(self, parents: Any = None, **keys: Any) -> pd.DataFrame:
        """Cached instances (IMAGE level). See :meth:`find`."""
        _no_parents(parents)
        return self.find("IMAGE", **keys)

    # --- reading ---------------------------------------------------------------------------

    def _selection(
        self, frame_or_uids: pd.DataFrame | pd.Series | Iterable[str], verb: str
    ) -> tuple[str, list[str]]:
        """The index column and the UIDs a frame (any level) or a list of SOP UIDs names."""
        if isinstance(frame_or_uids, (pd.DataFrame, pd.Series)):
            column = _LEVEL_COLUMN[frames.infer_level(frame_or_uids)]
            if isinstance(frame_or_uids, pd.Series):
                return column, _uid_list(frame_or_uids)
            return column, _uid_list(frame_or_uids[column])
        if isinstance(frame_or_uids, (str, bytes)) or not isinstance(frame_or_uids, Iterable):
            raise CacheError(
                f"{verb} takes a frame from find_* or a list of SOPInstanceUIDs, not "
                f"{type(frame_or_uids).__name__}; wrap a single UID in a list."
            )
        return "SOPInstanceUID", _uid_list(frame_or_uids)

    def read(self, frame_or_uids: pd.DataFrame | pd.Series | Iterable[str]) -> list[Dataset]:
        """The cached datasets of a frame at any level, or of a list of SOPInstanceUIDs.

        Study, series and patient rows expand to all their cached instances, ordered
        by study, series and InstanceNumber; a list of SOPInstanceUIDs keeps its order.

        Raises
        ------
        CacheError
            When something asked for is not cached (nothing is read then).

        Examples
        --------
        >>> import pathlib, tempfile
        >>> from pacsframe.demo import make_cohort
        >>> tmp = tempfile.TemporaryDirectory()
        >>> manifest = make_cohort(f"{tmp.name}/src", patients=1, matrix=16,
        ...     studies_per_patient=1, series_per_study=1, instances_per_series=2)
        >>> cache = Cache(f"{tmp.name}/cache")
        >>> _ = [cache.add(pathlib.Path(p).read_bytes()) for p in manifest.path]
        >>> [int(ds.InstanceNumber) for ds in cache.read(cache.find_series())]
        [1, 2]
        >>> cache.close(); tmp.cleanup()
        """
        rows = self._selected_rows(frame_or_uids, "read()", "")
        return [self._read_file(r[4], r[3]) for r in rows]

    def _selected_rows(
        self, frame_or_uids: pd.DataFrame | pd.Series | Iterable[str], verb: str, end: str
    ) -> list[tuple[str | None, str, str, str, str]]:
        """(PatientID, study, series, SOP UID, relative path) of every instance asked for.

        Study, series and patient rows expand to their instances, ordered by study,
        series and InstanceNumber; a list of SOPInstanceUIDs keeps its order. Raises
        :class:`CacheError` (its message ending in ``end``) when something asked for
        is not cached.
        """
        column, uids = self._selection(frame_or_uids, verb)
        rows = self._rows_where(
            column,
            uids,
            f"{column}, PatientID, StudyInstanceUID, SeriesInstanceUID, SOPInstanceUID, path, "
            "CAST(InstanceNumber AS INTEGER)",
        )
        _require_all(column, uids, rows, end)
        if column == "SOPInstanceUID":
            position = {uid: i for i, uid in enumerate(uids)}
            rows.sort(key=lambda r: position[r[4]])
        else:
            rows.sort(key=lambda r: (r[2], r[3], r[6] if r[6] is not None else math.inf, r[4]))
        return [r[1:6] for r in rows]

    def export(
        self,
        frame_or_uids: pd.DataFrame | pd.Series | Iterable[str],
        folder: str | os.PathLike[str],
        deidentify: bool = True,
        *,
        seed: str | None = None,
        manifest: str | os.PathLike[str] | None = None,
        progress: bool = True,
        on_exported: Callable[[Mapping[str, Any]], None] | None = None,
    ) -> ExportResult:
        """Copy cached objects into a folder, de-identified by DICOM PS3.15's Basic Profile.

        The rows are a frame at any level (as :meth:`read` takes) or SOPInstanceUIDs.
        Each object is written to ``<folder>/<StudyUID>/<SeriesUID>/<SOPUID>.dcm``,
        named by its new UIDs only, through a temporary file in the same folder and
        ``os.replace``, so a reader never sees a partial file. The cache is only read.

        With ``deidentify=True`` every data set gets the Basic Application Level
        Confidentiality Profile (Table E.1-1) with the Retain Longitudinal Temporal
        Information with Modified Dates Option (see :mod:`pacsframe.deidentify`):

        * attributes are removed, emptied or given dummy values as the table says, at
          every nesting level; private attributes, curves (50xx) and overlays (60xx)
          are removed; PatientID becomes a pseudonym;
        * Study, Series and SOP Instance UIDs, Frame of Reference UIDs and every other
          UID the table lists (also inside sequences, e.g.
          ReferencedSOPInstanceUID) become ``2.25.<int>`` UIDs keyed by ``seed``, so
          references between exported objects still hold; the file meta follows;
        * all dates (DA, and the date of DT) of one patient move back by the same
          number of whole days (1 to 10 years, keyed by ``seed`` and the PatientID);
          times of day are kept; the birth date is emptied, as the option asks;
        * PatientIdentityRemoved is YES, DeidentificationMethod and its code sequence
          name the profile and the option (codes 113100, 113107), and
          LongitudinalTemporalInformationModified is MODIFIED.

        Pixel data is copied unchanged. The profile leaves to the user what the pixels
        show: text burned into images (BurnedInAnnotation YES, common in ultrasound,
        secondary captures and scanned documents) and recognizable features (e.g. a
        face in a head scan) still identify a patient; check such series before
        sharing. Free text in attributes the table keeps is not read either.

        Parameters
        ----------
        frame_or_uids : DataFrame, Series or iterable of str
            What to export: a frame from ``find_*``/``instances()`` at any level, or
            SOPInstanceUIDs.
        folder : str or os.PathLike
            The export's root; created when missing. It may not overlap the cache.
        deidentify : bool, default True
            False copies the cached files byte for byte (still atomically, named by
            their own UIDs, which are checked to be safe path parts).
        seed : str, optional
            The secret every new identifier derives from. By default a random one is
            drawn and returned as ``result.seed``: pass it again to resume an
            interrupted export or to add rows to it with the same mapping (when an
            exception interrupts such an export, it carries the seed as its
            ``export_seed`` attribute). A folder that already holds an export is
            refused without a seed.
        manifest : str or os.PathLike, optional
            Also write the manifest (``.csv`` or ``.parquet``) there, atomically. It
            re-identifies the export, so it must be outside ``folder``.
        progress : bool, default True
            Show a progress bar (tqdm).
        on_exported : callable, optional
            Called with each manifest row (a dict) once its file is in place; an
            exception from it stops the export there.

        Returns
        -------
        ExportResult
            ``manifest`` (old and new identifiers, date offset, paths, status
            ``written`` or ``present``), ``seed``, ``written`` and ``present``.

        Raises
        ------
        CacheError
            Before anything is written, when some rows asked for are not in the cache
            (as :meth:`read` does: retrieve them first), when an argument is wrong, or
            when the folder overlaps the cache; during the export, when a cached file
            is damaged or does not hold the instance its index row names. Files
            written until then stay; a re-run with the same seed skips them.

        Examples
        --------
        >>> import pathlib, tempfile
        >>> from pacsframe.demo import make_cohort
        >>> tmp = tempfile.TemporaryDirectory()
        >>> manifest = make_cohort(f"{tmp.name}/src", patients=1, matrix=16,
        ...     studies_per_patient=1, series_per_study=1, instances_per_series=2)
        >>> cache = Cache(f"{tmp.name}/cache")
        >>> _ = [cache.add(pathlib.Path(p).read_bytes()) for p in manifest.path]
        >>> result = cache.export(cache.find_studies(), f"{tmp.name}/out", seed="s3cret",
        ...     progress=False)
        >>> result
        ExportResult(written=2, present=0, deidentified=True, folder=...)
        >>> result.manifest.new_PatientID.tolist()
        ['ANONB5EFF55FA5DC', 'ANONB5EFF55FA5DC']
        >>> again = cache.export(cache.find_studies(), f"{tmp.name}/out", seed="s3cret",
        ...     progress=False)
        >>> again.present, again.manifest.path.equals(result.manifest.path)
        (2, True)
        >>> cache.close(); tmp.cleanup()
        """
        from .deidentify import export

        return export(
            self,
            frame_or_uids,
            folder,
            deidentify=deidentify,
            seed=seed,
            manifest=manifest,
            progress=progress,
            on_exported=on_exported,
        )

    def _read_file(self, relative: str, sop: str, **kwargs: Any) -> Dataset:
        path = self._absolute(relative)
        try:
            return dcmread(path, **kwargs)
        except _READ_ERRORS as exc:
            raise CacheError(
                f"cached instance {sop} at {path} cannot be read ({exc}); run cache.verify() "
                "to drop damaged files, then retrieve again."
            ) from exc

    def load_series(self, series_uid: str) -> Volume:
        """A cached series as a :class:`Volume`: slices sorted along the normal, rescaled.

        Slices are ordered by their ImagePositionPatient projected on the slice
        normal (the cross product of the ImageOrientationPatient directions), or by
        InstanceNumber when a slice has no position. The slice spacing is the median
        distance between neighbouring positions (else SpacingBetweenSlices, else
        SliceThickness, else NaN); a warning says when it is not uniform.

        Raises
        ------
        CacheError
            When the series is not cached, or its slices cannot be stacked
            (different shapes, multi-frame or colour images).

        Examples
        --------
        >>> import pathlib, tempfile
        >>> from pacsframe.demo import make_cohort
        >>> tmp = tempfile.TemporaryDirectory()
        >>> manifest = make_cohort(f"{tmp.name}/src", patients=1, matrix=16, modalities=["CT"],
        ...     studies_per_patient=1, series_per_study=1, instances_per_series=4)
        >>> cache = Cache(f"{tmp.name}/cache")
        >>> _ = [cache.add(pathlib.Path(p).read_bytes()) for p in manifest.path]
        >>> volume = cache.load_series(manifest.SeriesInstanceUID.iloc[0])
        >>> volume.array.shape, volume.array.dtype.name, float(volume.array.min()) >= -1024
        ((4, 16, 16), 'float32', True)
        >>> volume.sop_instance_uids == manifest.SOPInstanceUID.tolist()
        True
        >>> cache.close(); tmp.cleanup()
        """
        if not isinstance(series_uid, str):
            raise CacheError(
                f"load_series takes one SeriesInstanceUID (a str), not "
                f"{type(series_uid).__name__}; e.g. series.SeriesInstanceUID.iloc[0]."
            )
        rows = self._rows_where("SeriesInstanceUID", [series_uid], "SOPInstanceUID, path")
        if not rows:
            raise CacheError(
                f"series {series_uid} is not in the cache at {self.root}; retrieve it "
                "first, e.g. pacs.get(series_frame), then load it."
            )
        slices = [self._read_file(path, sop) for sop, path in sorted(rows)]
        return _stack(series_uid, slices)

    # --- upkeep ----------------------------------------------------------------------------

    def _walk_series_folders(self) -> Iterator[Path]:
        """Every ``<root>/<study>/<series>`` folder (UID-named ones only)."""
        if not self.root.is_dir():
            return
        for study in _listing(self.root):
            if not (study.is_dir(follow_symlinks=False) and frames.is_uid(study.name)):
                continue
            for series in _listing(study.path):
                if series.is_dir(follow_symlinks=False) and frames.is_uid(series.name):
                    yield Path(series.path)

    def _prune(self, folders: Iterable[Path]) -> None:
        """Remove series and study folders left empty (never the root)."""
        self._safe_folders.clear()  # a folder made again is checked again
        for folder in set(folders):
            for candidate in (folder, folder.parent):
                if candidate != self.root and candidate.is_relative_to(self.root):
                    with contextlib.suppress(OSError):
                        candidate.rmdir()  # fails, as wanted, when not empty

    def _delete_rows(self, pairs: Sequence[tuple[str, str]]) -> None:
        db = self._db()
        db.execute("BEGIN IMMEDIATE")
        try:
            # Only rows still pointing at what was checked: a concurrent re-write wins.
            db.executemany("DELETE FROM instances WHERE SOPInstanceUID = ? AND path = ?", pairs)
        except BaseException:
            db.execute("ROLLBACK")
            raise
        db.execute("COMMIT")

    def _drop_unchanged(self, rows: Sequence[tuple[str, str, int, str]]) -> list[bool]:
        """Delete rows still as they were read (SOP, path, size, stored_at); which were."""
        db = self._db()
        db.execute("BEGIN IMMEDIATE")
        try:
            # A row written again since it was checked (a concurrent re-write) stays.
            hits = [
                db.execute(
                    "DELETE FROM instances WHERE SOPInstanceUID = ? AND path = ? AND size = ? "
                    "AND stored_at = ?",
                    row,
                ).rowcount
                == 1
                for row in rows
            ]
        except BaseException:
            db.execute("ROLLBACK")
            raise
        db.execute("COMMIT")
        return hits

    def _adopt(self, path: Path, relative: str) -> tuple[str, str] | None:
        """Index a layout file that has no index row, or remove it; what was found."""
        sop = path.name[:-4]
        series, study = path.parent.name, path.parent.parent.name
        db = self._db()
        held = db.execute("SELECT path FROM instances WHERE SOPInstanceUID = ?", (sop,)).fetchone()
        if held is not None and held[0] == relative:
            return None  # indexed since the index was read
        if held is not None:
            # Left by a re-filing stopped between indexing the new copy and removing this.
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
            return "duplicate", f"the instance is indexed at {held[0]}; this copy was removed"
        try:
            row = self._row(self._header(path, sop), study, series, sop, path)
            row[_FIXED.index("size")] = path.stat().st_size
        except (CacheError, OSError) as exc:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
            detail = f"a file without index row that cannot be indexed ({exc}); removed"
            return "not indexed", detail
        db.execute(_INSERT_NEW, row)
        return "not indexed", (
            "a complete file without index row (its writer stopped between renaming it "
            "into place and indexing it); indexed"
        )

    def verify(self) -> pd.DataFrame:
        """Find and repair what the index and the files disagree on; a re-run fetches the rest.

        Checks every index row's file: ``missing``, ``truncated`` (its size differs
        from the index) or ``not DICOM`` (its header cannot be read); such rows are
        dropped and such files removed, so that the next retrieval fetches them
        again. Then checks every file of the layout: a ``.dcm`` file with no index
        row (``not indexed``, from a process killed between renaming it into place
        and indexing it) is indexed when its header matches its folders and removed
        otherwise; a second copy of an instance indexed elsewhere (``duplicate``) is
        removed; a temporary ``.part`` file is removed when its writer is gone
        (``stray temporary file``).

        Safe to run while other threads or processes retrieve into the same cache.
        A temporary file is removed only when the process that writes it (named in
        the file name) no longer runs on this machine, or when nothing has touched
        it for an hour (a writer on another machine sharing the folder, or on a
        system where processes cannot be asked). A row is dropped only if it is
        still the one that was checked, and an unindexed file is indexed, never
        removed, when it is complete. Only damaged objects that a concurrent
        ``overwrite=True`` retrieval rewrites at the same moment may need another
        ``verify()``.

        Returns
        -------
        pandas.DataFrame
            One row per problem found and repaired: ``path``, ``SOPInstanceUID``
            (``<NA>`` for a temporary file), ``problem`` (one of the names above, or
            ``outside the cache root`` for a tampered row) and ``detail`` (what was
            found and what was done, as a sentence).

        Examples
        --------
        >>> import pathlib, tempfile
        >>> from pacsframe.demo import make_cohort
        >>> tmp = tempfile.TemporaryDirectory()
        >>> manifest = make_cohort(f"{tmp.name}/src", patients=1, matrix=16,
        ...     studies_per_patient=1, series_per_study=1, instances_per_series=3)
        >>> cache = Cache(f"{tmp.name}/cache")
        >>> paths = [cache.add(pathlib.Path(p).read_bytes())[0] for p in manifest.path]
        >>> paths[0].unlink()
        >>> _ = paths[1].write_bytes(paths[1].read_bytes()[:1000])
        >>> report = cache.verify()
        >>> report.problem.tolist(), len(cache)
        (['missing', 'truncated'], 1)
        >>> report.detail[1].split(" but ")[0], report.detail[1].split("; ")[1]
        ('1000 bytes on disk', 'file and row removed')
        >>> cache.verify().empty
        True
        >>> cache.close(); tmp.cleanup()
        """
        rows = self._db().execute(
            f"SELECT SOPInstanceUID, path, size, stored_at FROM instances {_ORDER}"
        )
        problems: list[tuple[str, str | None, str, str]] = []
        # (the row as read, where, problem, detail, the file to remove if the row goes)
        damaged: list[tuple[tuple[str, str, int, str], str, str, str, Path | None]] = []
        indexed: set[str] = set()
        for sop, relative, size, stored_at in rows.fetchall():
            indexed.add(relative)
            read = (sop, relative, size, stored_at)
            try:
                path = self._absolute(relative)
            except CacheError:
                damaged.append(
                    (
                        read,
                        str(self.root / relative),
                        "outside the cache root",
                        "the index row points outside the cache root (a tampered index); "
                        "row dropped, nothing removed",
                        None,
                    )
                )
                continue
            try:
                actual = path.stat().st_size
            except FileNotFoundError:
                detail = "the indexed file is gone; row dropped"
                damaged.append((read, str(path), "missing", detail, None))
                continue
            if actual != size:
                detail = f"{actual} bytes on disk but {size} in the index; file and row removed"
                damaged.append((read, str(path), "truncated", detail, path))
                continue
            try:
                dcmread(path, stop_before_pixels=True, specific_tags=[Tag(0x00080018)])
            except _READ_ERRORS as exc:
                detail = f"its header cannot be read ({exc}); file and row removed"
                damaged.append((read, str(path), "not DICOM", detail, path))
        folders: list[Path] = []
        hits = self._drop_unchanged([d[0] for d in damaged]) if damaged else []
        for (read, where, problem, detail, remove), hit in zip(damaged, hits, strict=True):
            if not hit:
                continue  # written again since it was checked
            problems.append((where, read[0], problem, detail))
            if remove is not None:
                with contextlib.suppress(FileNotFoundError):
                    remove.unlink()
                folders.append(remove.parent)
        now = time.time()
        # Received objects are written in the root until their header names their folder.
        for entry in _listing(self.root) if self.root.is_dir() else ():
            if entry.name.startswith(".") and entry.name.endswith(".part"):
                why = _stray(entry, now)
                if why is not None:
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(entry.path)
                    problems.append((entry.path, None, "stray temporary file", f"{why}; removed"))
        for folder in self._walk_series_folders():
            for entry in _listing(folder):
                name = entry.name
                if name.startswith(".") and name.endswith(".part"):
                    why = _stray(entry, now)
                    if why is None:
                        continue  # being written
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(entry.path)
                    problems.append((entry.path, None, "stray temporary file", f"{why}; removed"))
                    folders.append(folder)
                elif (
                    name.endswith(".dcm")
                    and frames.is_uid(name[:-4])
                    and entry.is_file(follow_symlinks=False)
                ):
                    path = Path(entry.path)
                    relative = path.relative_to(self.root).as_posix()
                    if relative in indexed:
                        continue
                    found = self._adopt(path, relative)
                    if found is not None:
                        problems.append((entry.path, name[:-4], *found))
                        folders.append(folder)
        self._prune(folders)
        return pd.DataFrame(
            {
                name: pd.Series([p[i] for p in problems], dtype="string")
                for i, name in enumerate(("path", "SOPInstanceUID", "problem", "detail"))
            }
        )

    def clear(self, frame_or_uids: pd.DataFrame | pd.Series | Iterable[str] | None = None) -> int:
        """Remove cached objects: all of them, or those of a frame or SOPInstanceUID list.

        Only files of the cache layout (``<uid>/<uid>/<uid>.dcm`` and temporary
        files) and the index rows are removed, never anything else, so a root
        pointed at the wrong folder by mistake loses nothing but cache files.

        Returns
        -------
        int
            The number of index rows removed.

        Examples
        --------
        >>> import pathlib, tempfile
        >>> from pacsframe.demo import make_cohort
        >>> tmp = tempfile.TemporaryDirectory()
        >>> manifest = make_cohort(f"{tmp.name}/src", patients=2, matrix=16,
        ...     studies_per_patient=1, series_per_study=1, instances_per_series=2)
        >>> cache = Cache(f"{tmp.name}/cache")
        >>> _ = [cache.add(pathlib.Path(p).read_bytes()) for p in manifest.path]
        >>> cache.clear(cache.find_studies(PatientID="PF000001")), len(cache)
        (2, 2)
        >>> cache.clear(), len(cache)
        (2, 0)
        >>> cache.close(); tmp.cleanup()
        """
        if frame_or_uids is None:
            db = self._db()
            n = int(db.execute("SELECT COUNT(*) FROM instances").fetchone()[0])
            db.execute("DELETE FROM instances")
            folders = list(self._walk_series_folders())
            for folder in folders:
                for entry in os.scandir(folder):
                    name = entry.name
                    ours = (name.endswith(".dcm") and frames.is_uid(name[:-4])) or (
                        name.startswith(".") and name.endswith(".part")
                    )
                    if ours and entry.is_file(follow_symlinks=False):
                        with contextlib.suppress(FileNotFoundError):
                            os.unlink(entry.path)
            self._prune(folders)
            return n
        column, uids = self._selection(frame_or_uids, "clear()")
        rows = self._rows_where(column, uids, "SOPInstanceUID, path")
        folders = []
        for _sop, relative in rows:
            try:
                path = self._absolute(relative)
            except CacheError:
                continue  # a tampered row: drop it, touch nothing
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
            folders.append(path.parent)
        self._delete_rows(rows)
        self._prune(folders)
        return len(rows)


class IncomingObject:
    """One received object on its way into the cache: what :meth:`Cache.receive` returns.

    An :class:`~pacsframe.net.operations.ObjectWriter`: ``write`` each fragment
    of the data set in order, then ``commit`` or ``discard``, once. Not for use
    from several threads at once.

    The temporary file is made in the cache root (the object's folder needs
    its Study and Series Instance UIDs, known only once the header arrived):
    the same filesystem, so filing it is one ``os.replace``; named like every
    temporary file of the cache, so :meth:`Cache.verify` removes it when its
    writer is gone.

    Attributes
    ----------
    path : pathlib.Path or None
        Where the object is cached, once committed (an existing copy's path
        when it was kept).
    header : dict or None
        The header's index strings by keyword, once committed.
    size : int
        Bytes of the Part-10 file so far: file meta and data set.
    written : bool
        Whether ``commit`` filed these bytes (False: a cached copy was kept).
    """

    def __init__(self, cache: Cache, request: StoreRequest, *, overwrite: bool = False) -> None:
        self.cache = cache
        self.syntax = str(request.transfer_syntax)
        self.overwrite = overwrite
        self.path: Path | None = None
        self.header: dict[str, str | None] | None = None
        self.written = False
        head = _received_head(
            str(request.sop_class_uid), str(request.sop_instance_uid), self.syntax
        )
        self._head_size = len(head)
        self._kept: bytes | bytearray = bytearray()
        self._done = False
        # Set when the header shows the object cached already (and not overwrite):
        # the rest of it is counted, not written. (existing path, header strings)
        self._cached: tuple[Path, dict[str, str | None]] | None = None
        self._strings: dict[str, str | None] | None = None  # the header, once read
        sop = str(request.sop_instance_uid)
        # _temp_path's name, in the root, built as strings (a Path costs more per object).
        base = sop if frames.is_uid(sop) else "received"
        self._tmp_name = f".{base}.{_host_tag()}-{_pid()}-{_random_tag()}.part"
        self._tmp = os.path.join(cache.root, self._tmp_name)
        self._filed = False  # renamed into place: nothing left to remove
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | _O_BINARY
        with _LIVE_LOCK:
            _LIVE_TEMPS.add(self._tmp_name)  # before it exists: verify() leaves it alone
        try:
            try:
                fd = os.open(self._tmp, flags, 0o666)
            except FileNotFoundError:
                cache.root.mkdir(parents=True, exist_ok=True)
                fd = os.open(self._tmp, flags, 0o666)
            self._handle: IO[bytes] = os.fdopen(fd, "wb", buffering=_WRITE_BUFFER)
            self._handle.write(head)
        except BaseException:
            self._done = True
            self._remove()
            raise
        self.size = len(head)

    def __repr__(self) -> str:
        state = "filed" if self.path is not None else "discarded" if self._done else "open"
        return f"IncomingObject({state}, {self.size} bytes)"

    def write(self, data: bytes | bytearray | memoryview, /) -> None:
        """Append the next fragment of the data set to the temporary file."""
        if self._done:
            raise CacheError("this received object was already committed or discarded")
        if self._cached is None:
            room = _KEPT_BYTES - len(self._kept)
            if room > 0:
                if room == _KEPT_BYTES and len(data) >= room:
                    self._kept = bytes(data[:room])  # at once, as bytes: _kept_strings copies none
                else:
                    self._kept += data[:room]
                if len(self._kept) == _KEPT_BYTES and not self.overwrite:
                    # If the header shows the object cached, the rest need not touch
                    # the disk, as write() would not write it.
                    self._cached = self._held()
                    if self._cached is not None:
                        self._remove()
        if self._cached is None:
            if len(data) < _DIRECT_BYTES:
                self._handle.write(data)
            else:
                handle = self._handle
                handle.flush()  # what is buffered goes first
                view = memoryview(data)
                while view:
                    view = view[os.write(handle.fileno(), view) :]
        self.size += len(data)

    def _held(self) -> tuple[Path, dict[str, str | None]] | None:
        """The cached copy of this object and its header, when the kept bytes show one."""
        transfer, deflated, little, implicit = _syntax_facts(self.syntax)
        if not transfer or deflated or not little:
            return None
        try:
            strings = self._kept_strings(implicit, complete=False)
            if strings is None:
                return None
        except Exception:
            return None  # commit reads it its own way
        self._strings = strings  # the header is read: commit need not read it again
        sop = strings["SOPInstanceUID"]
        if not frames.is_uid(sop):
            return None
        old = self.cache._existing(str(sop))
        if old is None:
            return None
        existing = self.cache._absolute(old)
        return (existing, strings) if existing.exists() else None

    def commit(self) -> None:
        """Scan the header, file the object and index it; ``None`` means status 0x0000.

        Raises :class:`CacheError` (nothing is left on disk) for an object that
        cannot be filed: not readable DICOM, a UID that is not one.
        """
        if self._done:
            raise CacheError("this received object was already committed or discarded")
        self._done = True
        cache = self.cache
        if self._cached is not None:
            existing, strings = self._cached
            study, series, sop = (strings[k] or "" for k in _UID_KEYS)
            cache.path_for(study, series, sop)  # refused as write() refuses it
            if not existing.exists():
                raise FileNotFoundError(
                    f"the cached copy of {sop} was removed while the object arrived again; "
                    "it was not kept: retrieve it again"
                )
            self.path, self.header = existing, strings
            return None
        try:
            self._handle.close()
            header = self._scan()
            strings = header[0]
            study, series, sop = (strings[k] or "" for k in _UID_KEYS)
            path = cache.path_for(study, series, sop)
            old = cache._existing(sop)
            if old is not None and not self.overwrite:
                existing = cache._absolute(old)
                if existing.exists():
                    self.path, self.header = existing, strings
                    return None
            row = cache._row(header, study, series, sop, path)
            cache._commit(row, self._tmp, path, old, self.size)
            self._filed = True
        finally:
            self._remove()  # renamed into place, or kept out of sight
        self.path, self.header, self.written = path, strings, True
        return None

    def discard(self) -> None:
        """Remove what was written; safe to call again, or after ``commit``."""
        if not self._done:
            self._done = True
            self._remove()

    def _remove(self) -> None:
        handle = getattr(self, "_handle", None)  # none when the file could not be made
        if handle is not None:
            with contextlib.suppress(OSError):
                handle.close()
        if not self._filed:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self._tmp)
        with _LIVE_LOCK:
            _LIVE_TEMPS.discard(self._tmp_name)
        self._kept = bytearray()

    def _scan(self) -> tuple[dict[str, str | None], str]:
        """The header's index strings and transfer syntax, as :meth:`Cache.add_received`."""
        if self._strings is not None:
            return self._strings, self.syntax
        transfer, deflated, little, implicit = _syntax_facts(self.syntax)
        label = "the received object"
        if not transfer or deflated:
            # Deflated data must be inflated to be read: pydicom's whole-file path.
            return self.cache._header(self._tmp, label)
        try:
            found = None
            if little:
                found = self._kept_strings(implicit)
            if found is not None:
                strings = found
            else:
                # The header runs past what was kept, or the scan leaves it to pydicom:
                # read it back from the file, up to the pixel data.
                with open(self._tmp, "rb") as source:
                    source.seek(self._head_size)
                    ds = read_dataset(
                        source,
                        implicit,
                        little,
                        stop_when=lambda tag, vr, length: tag in _PIXEL_TAGS,
                        specific_tags=_HEADER_TAGS,
                    )
                strings = frames.dicom_strings(ds, matching.INDEX_KEYWORDS)
        except Exception:
            # Let the whole-file path read it or refuse it, with the same error as ever.
            return self.cache._header(self._tmp, label)
        return strings, self.syntax

    def _kept_strings(
        self, implicit: bool, complete: bool | None = None
    ) -> dict[str, str | None] | None:
        """The index strings of the kept bytes; None unless they surely hold the whole header.

        ``complete``: whether they are the whole data set (default: as far as written).
        """
        # As bytes (at most one copy of 64 KiB): each value is then a slice of it, not
        # a memoryview slice copied again.
        kept = self._kept
        data = kept if type(kept) is bytes else bytes(kept)
        if complete is None:
            complete = self.size - self._head_size <= len(data)
        # A common header in one pass; any other in two (the same strings and warnings).
        strings = frames.scan_strings(
            data, implicit, matching.INDEX_KEYWORDS, _HEADER_END, complete
        )
        if strings is not None:
            return strings
        out: dict[int, Any] = {}
        # frames.scan_elements, told apart: stopping at the pixel data from running
        # to the end of what was kept (which, cut short, may lack later elements).
        end = frames._scan(data, 0, len(data), implicit, _HEADER_TAG_SET, _HEADER_END, out, 0)
        if end is None or (end == len(data) and not complete):
            return None
        return frames.raw_strings(out, matching.INDEX_KEYWORDS)


def _syntax_facts(syntax: str) -> tuple[bool, bool, bool, bool]:
    """Whether ``syntax`` is a transfer syntax, and if so, deflated, little endian, implicit VR.

    The same answers as pydicom's ``UID`` properties (the last three False when it is
    not a transfer syntax), kept per value that follows the UI grammar: pydicom's
    validation of such a value never warns, so only other values are read each time.
    """
    if frames.is_uid(syntax):
        return _uid_facts(syntax)
    return _uid_facts.__wrapped__(syntax)


@functools.lru_cache(maxsize=64)
def _uid_facts(syntax: str) -> tuple[bool, bool, bool, bool]:
    uid = UID(syntax)
    if not uid.is_transfer_syntax:
        return False, False, False, False
    return True, uid.is_deflated, uid.is_little_endian, uid.is_implicit_VR


def _require_all(
    column: str, uids: Sequence[str], rows: Sequence[Sequence[Any]], end: str
) -> None:
    """Raise when some of ``uids`` have no row (each row's first field is its ``column``)."""
    missing = set(uids) - {r[0] for r in rows}
    if missing:
        shown = ", ".join(sorted(missing)[:3]) + (", ..." if len(missing) > 3 else "")
        raise CacheError(
            f"{len(missing)} of the {len(uids)} {column} value(s) asked for have nothing "
            f"in the cache ({shown}); retrieve them first with pacs.get(...){end}."
        )


def _is_keys(value: Any) -> bool:
    if isinstance(value, str):
        return True
    if isinstance(value, (pd.DataFrame, pd.Series)):
        return False
    return isinstance(value, Iterable)


def _no_parents(parents: Any) -> None:
    if parents is not None:
        raise QueryError(
            "the cache does not drill down from a frame; filter the frame with pandas, or "
            "pass the parents' UIDs, e.g. StudyInstanceUID=studies.StudyInstanceUID.tolist()."
        )


# --- stacking a series --------------------------------------------------------------------


def _floats(ds: Dataset, keyword: str, n: int) -> np.ndarray | None:
    value = ds.get(keyword)
    if value is None or value == "":
        return None
    try:
        numbers = np.asarray([float(v) for v in (value if n > 1 else [value])], dtype=float)
    except (TypeError, ValueError):
        return None
    return numbers if numbers.shape == (n,) and np.all(np.isfinite(numbers)) else None


def _number(ds: Dataset, keyword: str, default: float) -> float:
    found = _floats(ds, keyword, 1)
    return float(found[0]) if found is not None else default


def _stack(series_uid: str, slices: list[Dataset]) -> Volume:
    orientation_values = next(
        (o for o in (_floats(ds, "ImageOrientationPatient", 6) for ds in slices) if o is not None),
        None,
    )
    if orientation_values is None:
        row_dir, col_dir = np.array([1.0, 0.0, 0.0]), np.array([0.0, 1.0, 0.0])
    else:
        row_dir, col_dir = orientation_values[:3], orientation_values[3:]
    normal = np.cross(row_dir, col_dir)
    length = np.linalg.norm(normal)
    normal = normal / length if length > 0 else np.array([0.0, 0.0, 1.0])

    positions = [_floats(ds, "ImagePositionPatient", 3) for ds in slices]
    numbers = [_number(ds, "InstanceNumber", math.inf) for ds in slices]
    uids = [str(ds.get("SOPInstanceUID", "")) for ds in slices]
    have_positions = all(p is not None for p in positions)
    if have_positions:
        along = [float(np.dot(p, normal)) for p in positions]  # type: ignore[arg-type]
        order = sorted(range(len(slices)), key=lambda i: (along[i], numbers[i], uids[i]))
    else:
        order = sorted(range(len(slices)), key=lambda i: (numbers[i], uids[i]))

    first = slices[order[0]]
    if have_positions and len(order) > 1:
        steps = np.diff([along[i] for i in order])
        step = float(np.median(steps))
        if step <= 0 or np.max(np.abs(steps - step)) > 0.01 * max(step, 1e-6):
            warnings.warn(
                f"series {series_uid} has unevenly spaced slices (steps from "
                f"{steps.min():g} to {steps.max():g} mm); spacing[0] is the median, "
                f"{step:g} mm.",
                stacklevel=3,
            )
    else:
        step = _number(first, "SpacingBetweenSlices", _number(first, "SliceThickness", math.nan))
    pixel_spacing = _floats(first, "PixelSpacing", 2)
    row_spacing, col_spacing = (
        (float(pixel_spacing[0]), float(pixel_spacing[1]))
        if pixel_spacing is not None
        else (math.nan, math.nan)
    )
    origin_values = positions[order[0]] if have_positions else None
    origin = (
        tuple(float(v) for v in origin_values)
        if origin_values is not None
        else (math.nan, math.nan, math.nan)
    )

    array: np.ndarray | None = None
    for k, i in enumerate(order):
        ds = slices[i]
        if int(_number(ds, "NumberOfFrames", 1)) > 1 or int(_number(ds, "SamplesPerPixel", 1)) > 1:
            raise CacheError(
                f"series {series_uid} holds multi-frame or colour images, which load_series "
                "does not stack; use cache.read(...) and each dataset's pixel_array."
            )
        try:
            pixels = ds.pixel_array
        except (AttributeError, ValueError, RuntimeError, NotImplementedError) as exc:
            raise CacheError(
                f"the pixel data of {uids[i]} in series {series_uid} cannot be decoded "
                f"({exc}); a compressed transfer syntax may need a pydicom pixel plugin "
                "(e.g. pylibjpeg)."
            ) from exc
        if array is None:
            array = np.empty((len(order), *pixels.shape), dtype=np.float32)
        elif pixels.shape != array.shape[1:]:
            raise CacheError(
                f"series {series_uid} cannot be stacked: slice {uids[i]} is "
                f"{pixels.shape[0]}x{pixels.shape[1]} but the first is "
                f"{array.shape[1]}x{array.shape[2]}; read the slices with cache.read(...) "
                "instead."
            )
        slope = _number(ds, "RescaleSlope", 1.0)
        intercept = _number(ds, "RescaleIntercept", 0.0)
        np.multiply(pixels, slope, out=array[k], casting="unsafe")
        array[k] += intercept
    assert array is not None
    return Volume(
        array=array,
        spacing=(step, row_spacing, col_spacing),
        origin=origin,  # type: ignore[arg-type]
        orientation=np.stack([row_dir, col_dir, normal]).astype(float),
        sop_instance_uids=[uids[i] for i in order],
    )
