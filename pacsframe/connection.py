"""The PACS peer: settings, associations, C-ECHO, C-FIND into frames, configuration.

One :class:`PACS` object describes one remote Application Entity. Each call opens
an association, uses it for every request the call needs (a drill-down over 200
studies is 200 C-FINDs on one association) and releases it; inside ``with pacs:``
associations are kept open across calls until the block ends.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import threading
import time
import tomllib
import warnings
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pandas as pd
import platformdirs
from pynetdicom import AE, _config, evt
from pynetdicom.association import Association
from pynetdicom.pdu import A_ASSOCIATE_RJ
from pynetdicom.presentation import PresentationContext, build_context
from pynetdicom.sop_class import (
    PatientRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelFind,
    Verification,
)
from pynetdicom.status import QR_FIND_SERVICE_CLASS_STATUS, code_to_category

from . import frames
from .errors import AssociationError, DimseError, NotSupported, PacsFrameError, QueryError
from .query import LEVELS, UNIQUE_KEY, Query, build_query, normalize_model

if TYPE_CHECKING:
    from .cache import Cache
    from .retrieve import RetrieveResult

__all__ = ["PACS", "check_ae_title", "config_path", "set_nodelay"]

LOGGER = logging.getLogger("pacsframe")

FIND_MODELS = {
    "study": StudyRootQueryRetrieveInformationModelFind,
    "patient": PatientRootQueryRetrieveInformationModelFind,
}
_PENDING = (0xFF00, 0xFF01)
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
# Pauses before retrying an association the peer rejected as transient (busy).
_TRANSIENT_RETRY_DELAYS = (0.25, 0.5, 1.0, 2.0)
_SETTING_TYPES: dict[str, type] = {
    "host": str,
    "port": int,
    "ae_title": str,
    "calling_ae": str,
    "connect_timeout": float,
    "acse_timeout": float,
    "dimse_timeout": float,
    "network_timeout": float,
    "max_pdu": int,
    "scp_port": int,
    "cache": str,
}


def check_ae_title(title: str, what: str) -> str:
    """Validate an AE title (1-16 characters of the default repertoire, no backslash)."""
    if not isinstance(title, str) or not title.strip():
        raise QueryError(f"{what} must be a non-empty AE title of at most 16 characters.")
    text = title.strip()
    if len(text) > 16 or "\\" in text or not text.isascii() or not text.isprintable():
        raise QueryError(
            f"{what}={title!r} is not a valid AE title: at most 16 printable ASCII "
            "characters, no backslash."
        )
    return text


def config_path() -> Path:
    """Where :meth:`PACS.from_config` reads named peers (``PACSFRAME_CONFIG`` overrides)."""
    env = os.environ.get("PACSFRAME_CONFIG")
    if env:
        return Path(env).expanduser()
    return Path(platformdirs.user_config_dir("pacsframe")) / "config.toml"


def set_nodelay(event: evt.Event) -> None:
    """EVT_CONN_OPEN handler: turn off Nagle's algorithm on the association's socket."""
    # Nagle's algorithm and the peer's delayed ACK stall every small request by
    # ~40 ms; DIMSE traffic is request/response, so we always want it off.
    sock = getattr(event.assoc.dul.socket, "socket", None)
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


_QUIET_LOCK = threading.Lock()
_quiet_users = 0
_quiet_saved = True


@contextlib.contextmanager
def _raw_identifiers() -> Iterator[None]:
    """Keep pynetdicom from rendering C-FIND answers for a log that shows nothing.

    With LOG_RESPONSE_IDENTIFIERS on, pynetdicom formats every response identifier
    for its log even when the log is off, and so converts each value with pydicom
    before pacsframe reads it: slower, and undecodable bytes are silently replaced.
    Turned off only while pynetdicom's logger would not show them, and restored by
    the last C-FIND to finish.
    """
    global _quiet_users, _quiet_saved
    with _QUIET_LOCK:
        if _quiet_users == 0:
            _quiet_saved = _config.LOG_RESPONSE_IDENTIFIERS
        _quiet_users += 1
        if not logging.getLogger("pynetdicom").isEnabledFor(logging.INFO):
            _config.LOG_RESPONSE_IDENTIFIERS = False
    try:
        yield
    finally:
        with _QUIET_LOCK:
            _quiet_users -= 1
            if _quiet_users == 0:
                _config.LOG_RESPONSE_IDENTIFIERS = _quiet_saved


def _status_text(code: int, table: dict[int, tuple[str, str]]) -> str:
    category, text = table.get(code, (code_to_category(code), "unknown status"))
    return f"0x{code:04X} {category}: {text}" if text else f"0x{code:04X} {category}"


class PACS:
    """A remote DICOM peer (PACS, VNA, modality) to query and retrieve from.

    Parameters
    ----------
    host, port : str, int
        Where the peer listens.
    ae_title : str
        The peer's AE title (the *called* AE).
    calling_ae : str
        Our AE title, as registered at the peer.
    connect_timeout, acse_timeout, dimse_timeout, network_timeout : float
        Seconds to wait for the TCP connection, for association negotiation, for
        each DIMSE response, and for any network activity.
    max_pdu : int
        Largest PDU we accept (bytes; 0 for no limit).
    scp_port : int
        Port of our storage SCP for :meth:`move` (0: a free port, chosen once
        per PACS object; read it from ``pacs.scp_port`` to register us at the peer).
    cache : path or Cache, optional
        Where retrieved objects go; default ``PACSFRAME_CACHE`` or the user cache
        directory.

    Examples
    --------
    >>> pacs = PACS("127.0.0.1", 4242, ae_title="ORTHANC")
    >>> pacs
    PACS('127.0.0.1', 4242, ae_title='ORTHANC', calling_ae='PACSFRAME')
    """

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 104,
        ae_title: str = "ANY-SCP",
        calling_ae: str = "PACSFRAME",
        *,
        connect_timeout: float = 10.0,
        acse_timeout: float = 30.0,
        dimse_timeout: float = 60.0,
        network_timeout: float = 60.0,
        max_pdu: int = 0,
        scp_port: int = 0,
        cache: str | os.PathLike[str] | Cache | None = None,
    ) -> None:
        if not isinstance(host, str) or not host:
            raise QueryError(f"host={host!r} must be a host name or IP address.")
        if not isinstance(port, int) or isinstance(port, bool) or not 0 < port < 65536:
            raise QueryError(f"port={port!r} must be an integer between 1 and 65535.")
        self.host = host
        self.port = port
        self.ae_title = check_ae_title(ae_title, "ae_title")
        self.calling_ae = check_ae_title(calling_ae, "calling_ae")
        for name, value in (
            ("connect_timeout", connect_timeout),
            ("acse_timeout", acse_timeout),
            ("dimse_timeout", dimse_timeout),
            ("network_timeout", network_timeout),
        ):
            if not isinstance(value, (int, float)) or value <= 0:
                raise QueryError(f"{name}={value!r} must be a positive number of seconds.")
        self.connect_timeout = float(connect_timeout)
        self.acse_timeout = float(acse_timeout)
        self.dimse_timeout = float(dimse_timeout)
        self.network_timeout = float(network_timeout)
        self.max_pdu = int(max_pdu)
        if (
            not isinstance(scp_port, int)
            or isinstance(scp_port, bool)
            or not 0 <= scp_port < 65536
        ):
            raise QueryError(f"scp_port={scp_port!r} must be 0 (a free port) or 1-65535.")
        self._scp_port = scp_port
        self._cache_setting = cache
        self._cache: Cache | None = None
        self._checked: str | None = None  # what the last echo() found, for the HTML repr
        self._held: dict[str, Association] = {}
        self._depth = 0
        self._lock = threading.RLock()

    # --- construction ---------------------------------------------------------------

    @classmethod
    def from_config(
        cls, name: str, path: str | os.PathLike[str] | None = None, **overrides: Any
    ) -> PACS:
        """A peer from the ``[peers.NAME]`` table of the configuration file.

        The file is ``<user config dir>/pacsframe/config.toml`` unless ``path`` or
        ``PACSFRAME_CONFIG`` says otherwise. ``PACSFRAME_HOST``, ``PACSFRAME_PORT``,
        ``PACSFRAME_AE_TITLE`` and ``PACSFRAME_CALLING_AE`` override the file, and
        keyword arguments (any :class:`PACS` setting) override both.

        Examples
        --------
        >>> import tempfile, pathlib
        >>> cfg = pathlib.Path(tempfile.mkdtemp()) / "config.toml"
        >>> text = '[peers.hospital]\\nhost = "10.0.0.5"\\nport = 104\\nae_title = "PACS"\\n'
        >>> _ = cfg.write_text(text)
        >>> PACS.from_config("hospital", cfg).ae_title
        'PACS'
        """
        file = Path(path).expanduser() if path is not None else config_path()
        if not file.is_file():
            raise QueryError(
                f"no pacsframe configuration at {file}; create it with a [peers.{name}] "
                "table (host, port, ae_title, calling_ae), or set PACSFRAME_CONFIG."
            )
        try:
            data = tomllib.loads(file.read_text(encoding="utf-8"))
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
            raise QueryError(f"{file} is not valid TOML ({exc}); fix the file.") from None
        peers = data.get("peers", {})
        if name not in peers:
            known = ", ".join(sorted(peers)) or "none"
            raise QueryError(
                f"no peer named {name!r} in {file} (peers defined: {known}); add a "
                f"[peers.{name}] table."
            )
        settings = dict(peers[name])
        for key in ("host", "port", "ae_title", "calling_ae"):
            env = os.environ.get(f"PACSFRAME_{key.upper()}")
            if env:
                settings[key] = env
        unknown = set(settings) - set(_SETTING_TYPES)
        if unknown:
            raise QueryError(
                f"[peers.{name}] in {file} has unknown settings {sorted(unknown)}; the "
                f"known ones are {sorted(_SETTING_TYPES)}."
            )
        try:
            typed = {k: _SETTING_TYPES[k](v) for k, v in settings.items()}
        except (TypeError, ValueError) as exc:
            raise QueryError(f"[peers.{name}] in {file}: {exc}; fix the value.") from None
        return cls(**{**typed, **overrides})

    def __repr__(self) -> str:
        return (
            f"PACS({self.host!r}, {self.port}, ae_title={self.ae_title!r}, "
            f"calling_ae={self.calling_ae!r})"
        )

    def _repr_html_(self) -> str:
        # Never connects: a notebook repr must not block on an unreachable peer
        # (call echo() to check reachability).
        from html import escape

        rows = {
            "peer": f"{self.host}:{self.port}",
            "called AE (ae_title)": self.ae_title,
            "calling AE (calling_ae)": self.calling_ae,
            "cache": str(self.cache.root),
        }
        body = "".join(
            f"<tr><th style='text-align:left'>{escape(k)}</th><td>{escape(v)}</td></tr>"
            for k, v in rows.items()
        )
        checked = escape(self._checked or "not checked; echo() tests it")
        return f"<div><b>PACS</b> <i>({checked})</i><table>{body}</table></div>"

    @property
    def peer(self) -> dict[str, Any]:
        """JSON-safe description of the peer (for ``DataFrame.attrs``)."""
        return {
            "host": self.host,
            "port": self.port,
            "ae_title": self.ae_title,
            "calling_ae": self.calling_ae,
        }

    # --- associations ------------------------------------------------------------------

    def __enter__(self) -> PACS:
        with self._lock:
            self._depth += 1
        return self

    def __exit__(self, *exc: object) -> None:
        with self._lock:
            self._depth -= 1
            if self._depth == 0:
                self.close()

    def close(self) -> None:
        """Release every association kept open by ``with pacs:``."""
        with self._lock:
            held, self._held = self._held, {}
        for assoc in held.values():
            _release(assoc)

    def _open(
        self,
        contexts: Sequence[PresentationContext],
        purpose: str,
        ext_neg: Sequence[Any] = (),
        handlers: Sequence[tuple[Any, Any]] = (),
    ) -> Association:
        ae = AE(ae_title=self.calling_ae)
        ae.connection_timeout = self.connect_timeout
        ae.acse_timeout = self.acse_timeout
        ae.dimse_timeout = self.dimse_timeout
        ae.network_timeout = self.network_timeout
        ae.maximum_pdu_size = self.max_pdu
        ae.requested_contexts = list(contexts)
        opened = threading.Event()
        rejections: list[Any] = []

        def on_open(event: evt.Event) -> None:
            opened.set()
            set_nodelay(event)

        def on_pdu(event: evt.Event) -> None:
            # Under load pynetdicom can end an association as "aborted" although it
            # decoded the peer's A-ASSOCIATE-RJ (the peer closes right after sending
            # it); keeping the PDU lets us report the real rejection and its reason.
            if isinstance(event.pdu, A_ASSOCIATE_RJ):
                rejections.append(event.pdu)

        started = time.monotonic()
        for delay in (*_TRANSIENT_RETRY_DELAYS, None):
            opened.clear()
            rejections.clear()
            assoc = ae.associate(
                self.host,
                self.port,
                ae_title=self.ae_title,
                max_pdu=self.max_pdu,
                ext_neg=list(ext_neg) or None,
                evt_handlers=[
                    (evt.EVT_CONN_OPEN, on_open),
                    (evt.EVT_PDU_RECV, on_pdu),
                    *handlers,
                ],
            )
            transient = [r for r in rejections if r.result == 0x02] or (
                assoc.is_rejected and getattr(assoc.acceptor.primitive, "result", None) == 0x02
            )
            if assoc.is_established or not transient or delay is None:
                break
            # A busy peer rejects "transient" (e.g. its association limit); it says
            # to try again, so we do, a few times with growing pauses.
            LOGGER.info("%s rejected the association as transient; retrying", self.ae_title)
            time.sleep(delay)
        if assoc.is_established:
            LOGGER.info(
                "association %s -> %s at %s:%s established for %s",
                self.calling_ae,
                self.ae_title,
                self.host,
                self.port,
                purpose,
            )
            return assoc
        raise self._association_failure(
            assoc, opened.is_set(), time.monotonic() - started, rejections
        )

    def _association_failure(
        self, assoc: Association, connected: bool, elapsed: float, rejections: list[Any]
    ) -> AssociationError | NotSupported:
        where = f"{self.host}:{self.port}"
        if assoc.is_rejected or rejections:
            prim = rejections[0] if rejections else assoc.acceptor.primitive
            reason = getattr(prim, "reason_str", "unknown reason")
            source = getattr(prim, "source_str", "unknown source")
            result = getattr(prim, "result_str", "Rejected")
            if getattr(prim, "result", None) == 0x02:
                advice = (
                    f"The peer is busy and said to try later; pacsframe tried "
                    f"{len(_TRANSIENT_RETRY_DELAYS) + 1} times. Try again later, or use "
                    "fewer parallel associations (workers=)."
                )
            else:
                advice = (
                    "Check that ae_title is the peer's AE title and that the peer knows "
                    f"{self.calling_ae!r}."
                )
            return AssociationError(
                f"the peer at {where} rejected the association ({result}; source: {source}; "
                f"reason: {reason}) for called AE {self.ae_title!r} from calling AE "
                f"{self.calling_ae!r}. {advice}",
                reason="rejected",
            )
        if not connected:
            try:
                with socket.create_connection((self.host, self.port), self.connect_timeout):
                    pass
            except ConnectionRefusedError:
                return AssociationError(
                    f"connection refused by {where}: nothing listens there. Check the host "
                    "and port, and that the PACS is running.",
                    reason="refused",
                )
            except TimeoutError:
                return AssociationError(
                    f"timed out after {self.connect_timeout:g} s connecting to {where}; check "
                    "the host, the port and any firewall, or raise connect_timeout.",
                    reason="timeout",
                )
            except OSError as exc:
                return AssociationError(
                    f"could not connect to {where}: {exc.strerror or exc}. Check the host "
                    "name and port.",
                    reason="refused",
                )
            return AssociationError(
                f"could not connect to {where} (the connection failed, then succeeded on a "
                "second try); try again.",
                reason="refused",
            )
        if assoc.rejected_contexts and not assoc.accepted_contexts and assoc.acceptor.primitive:
            names = [str(cx.abstract_syntax.name) for cx in assoc.rejected_contexts]
            shown = ", ".join(names[:3]) + (
                f" and {len(names) - 3} more" if len(names) > 3 else ""
            )
            return NotSupported(
                f"{self.ae_title} at {where} accepted none of the presentation contexts "
                f"proposed ({shown}); the peer does not offer this service to "
                f"{self.calling_ae!r}.",
                status=0x0122,
            )
        if assoc.acceptor.primitive is None and elapsed >= self.acse_timeout * 0.9:
            return AssociationError(
                f"{where} accepted the TCP connection but did not answer the association "
                f"request within acse_timeout={self.acse_timeout:g} s; check that this is "
                "the peer's DICOM port (not its web port), or raise acse_timeout.",
                reason="timeout",
            )
        return AssociationError(
            f"{self.ae_title} at {where} aborted the association request from "
            f"{self.calling_ae!r}; check the peer's log for why (unknown calling AE, "
            "too many connections).",
            reason="aborted",
        )

    @contextlib.contextmanager
    def association(
        self,
        contexts: Sequence[PresentationContext],
        purpose: str = "query",
        *,
        ext_neg: Sequence[Any] = (),
        handlers: Sequence[tuple[Any, Any]] = (),
        keep: bool = True,
    ) -> Iterator[Association]:
        """An established association for ``purpose``, released afterwards.

        Inside ``with pacs:`` the association is kept for later calls with the
        same purpose, unless ``keep`` is False (associations with call-specific
        event handlers, such as a C-GET's receiver, are never reused).
        """
        with self._lock:
            held = self._held.get(purpose) if self._depth and keep else None
            if held is not None and not held.is_established:
                self._held.pop(purpose, None)
                held = None
        if held is not None:
            yield held
            return
        assoc = self._open(contexts, purpose, ext_neg, handlers)
        with self._lock:
            keep = bool(self._depth) and keep
            if keep:
                self._held[purpose] = assoc
        try:
            yield assoc
        except BaseException:
            # An interrupted exchange leaves the peer mid-operation: abort rather
            # than reuse or release into an unknown state.
            if assoc.is_established:
                assoc.abort()
            with self._lock:
                self._held.pop(purpose, None)
            raise
        finally:
            if not keep:
                _release(assoc)

    def _query_contexts(self) -> list[PresentationContext]:
        return [build_context(Verification)] + [build_context(m) for m in FIND_MODELS.values()]

    # --- C-ECHO --------------------------------------------------------------------------

    def echo(self) -> float:
        """Send a C-ECHO; return the round-trip time in seconds.

        Raises
        ------
        AssociationError
            When the peer cannot be reached or refuses us.
        DimseError
            When the peer answers with a failure status.
        """
        try:
            seconds = self._echo()
        except PacsFrameError as exc:
            self._checked = f"not reachable at the last echo(): {exc}"
            raise
        self._checked = "reachable: it answered the last echo()"
        return seconds

    def _echo(self) -> float:
        started = time.monotonic()
        with self.association(self._query_contexts()) as assoc:
            sent = time.monotonic()
            status = assoc.send_c_echo()
            if not status or "Status" not in status:
                raise self._lost(assoc, "C-ECHO", time.monotonic() - sent)
            if status.Status != 0x0000:
                raise DimseError(
                    f"{self.ae_title} answered C-ECHO with status 0x{status.Status:04X}.",
                    status=int(status.Status),
                )
        return time.monotonic() - started

    def _lost(self, assoc: Association, what: str, waited: float) -> AssociationError:
        where = f"{self.ae_title} at {self.host}:{self.port}"
        if waited >= self.dimse_timeout * 0.9:
            return AssociationError(
                f"no {what} response from {where} within dimse_timeout="
                f"{self.dimse_timeout:g} s; the association was aborted. Check the peer's "
                "log, or raise dimse_timeout for a slow peer.",
                reason="timeout",
            )
        return AssociationError(
            f"{where} aborted the association during {what}; check the peer's log, then "
            "try again.",
            reason="aborted",
        )

    # --- C-FIND --------------------------------------------------------------------------

    def find(
        self,
        level: str,
        parents: pd.DataFrame | pd.Series | Sequence[str] | None = None,
        *,
        model: str = "study",
        return_keys: Sequence[str] | None = None,
        **keys: Any,
    ) -> pd.DataFrame:
        """C-FIND at ``level`` and return one typed row per match.

        Parameters
        ----------
        level : {"patient", "study", "series", "image"}
            The query/retrieve level.
        parents : DataFrame, Series or list of str, optional
            Drill down: one query per parent row, the parents' columns carried
            along. A list holds unique keys of the level above (PatientIDs for
            studies, StudyInstanceUIDs for series).
        model : {"study", "patient"}
            Study-root or patient-root information model.
        return_keys : list of str, optional
            Attributes to return in addition to the level's defaults.
        **keys
            Matching keys: DICOM keywords (or snake_case) and values (see
            :func:`pacsframe.query.encode_value`).

        Examples
        --------
        >>> from pacsframe.demo import DemoPACS, make_cohort
        >>> import tempfile
        >>> folder = tempfile.mkdtemp()
        >>> _ = make_cohort(folder, patients=3, seed=1)
        >>> with DemoPACS(folder) as server:
        ...     pacs = PACS("127.0.0.1", server.port, ae_title=server.ae_title)
        ...     studies = pacs.find("study", ModalitiesInStudy="CT")
        >>> studies.StudyDate.dtype
        dtype('<M8[ns]')
        """
        query = build_query(level, normalize_model(model), keys, return_keys)
        if parents is None:
            query.check_required()
            return self._run(query, None)
        return self._run(query, self._parents(parents, query))

    def find_patients(self, **keys: Any) -> pd.DataFrame:
        """C-FIND at PATIENT level (patient-root model). See :meth:`find`."""
        return self.find("PATIENT", None, model="patient", **keys)

    def find_studies(
        self, parents: pd.DataFrame | pd.Series | Sequence[str] | None = None, **keys: Any
    ) -> pd.DataFrame:
        """C-FIND at STUDY level; ``parents`` may be a frame of patients. See :meth:`find`."""
        return self.find("STUDY", parents, **keys)

    def find_series(
        self, parents: pd.DataFrame | pd.Series | Sequence[str] | None = None, **keys: Any
    ) -> pd.DataFrame:
        """C-FIND at SERIES level; ``parents`` is usually a frame of studies. See :meth:`find`."""
        return self.find("SERIES", parents, **keys)

    def find_instances(
        self, parents: pd.DataFrame | pd.Series | Sequence[str] | None = None, **keys: Any
    ) -> pd.DataFrame:
        """C-FIND at IMAGE level; ``parents`` is usually a frame of series. See :meth:`find`."""
        return self.find("IMAGE", parents, **keys)

    def _parents(
        self, parents: pd.DataFrame | pd.Series | Sequence[str], query: Query
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
            frame = self.find(next_level, frame, model=query.model)
        return frame

    def _run(self, query: Query, parents: pd.DataFrame | None) -> pd.DataFrame:
        model_uid = FIND_MODELS[query.model]
        builder = frames.FrameBuilder(query.columns)
        owners: list[int] = []
        requests = [(-1, query)] if parents is None else list(self._child_queries(query, parents))
        with self.association(self._query_contexts()) as assoc:
            if not any(cx.abstract_syntax == model_uid for cx in assoc.accepted_contexts):
                other = "patient" if query.model == "study" else "study"
                raise NotSupported(
                    f"{self.ae_title} does not support C-FIND in the {query.model}-root "
                    f"model; use model={other!r}.",
                    status=0x0122,
                )
            for owner, request in requests:
                before = len(builder)
                self._find_one(assoc, request, model_uid, builder)
                owners.extend([owner] * (len(builder) - before))
        result = builder.frame()
        _check_answer(result, query.level, self.ae_title)
        LOGGER.info(
            "C-FIND %s level (%s root) at %s: %d request(s), %d match(es)",
            query.level,
            query.model,
            self.ae_title,
            len(requests),
            len(result),
        )
        if parents is not None:
            result = _carry_parents(result, parents, owners)
        result.attrs["pacsframe"] = {
            **query.to_json(),
            "peer": self.peer,
            "requests": len(requests),
        }
        return result

    def _child_queries(self, query: Query, parents: pd.DataFrame) -> Iterator[tuple[int, Query]]:
        keys = list(
            dict.fromkeys([*query.keys_required(), UNIQUE_KEY[frames.infer_level(parents)]])
        )
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
                    stacklevel=4,
                )
                continue
            if texts in seen:
                continue
            seen.add(texts)
            child = query.with_keys(**dict(zip(keys, texts, strict=True)))
            child.check_required()
            yield position, child

    def _find_one(
        self,
        assoc: Association,
        query: Query,
        model_uid: str,
        builder: frames.FrameBuilder,
    ) -> None:
        with _raw_identifiers():
            self._receive(assoc, query, model_uid, builder)

    def _receive(
        self,
        assoc: Association,
        query: Query,
        model_uid: str,
        builder: frames.FrameBuilder,
    ) -> None:
        last = time.monotonic()
        undecodable: set[int] = set()
        for status, identifier in assoc.send_c_find(query.dataset(), model_uid):
            if not status or "Status" not in status:
                raise self._lost(assoc, f"{query.level}-level C-FIND", time.monotonic() - last)
            last = time.monotonic()
            code = int(status.Status)
            if code in _PENDING:
                if identifier is not None:
                    builder.add(identifier)
                else:
                    # pynetdicom could not decode it (and yields that response twice).
                    undecodable.add(id(status))
                continue
            if undecodable:
                warnings.warn(
                    f"{len(undecodable)} match(es) in the {query.level}-level C-FIND answer "
                    f"from {self.ae_title} could not be decoded and are missing from the "
                    "frame; the peer sent malformed identifiers (pynetdicom's log says how).",
                    frames.MalformedValueWarning,
                    stacklevel=5,
                )
            if code == 0x0000:
                return
            comment = status.get("ErrorComment")
            detail = f" The peer says: {comment}." if comment else ""
            category = code_to_category(code)
            if category == "Warning":
                warnings.warn(
                    f"{self.ae_title} ended the C-FIND with "
                    f"{_status_text(code, QR_FIND_SERVICE_CLASS_STATUS)}.{detail}",
                    stacklevel=5,
                )
                return
            if code == 0xFE00:
                raise DimseError(
                    f"the {query.level}-level C-FIND was cancelled.", status=code, comment=comment
                )
            raise DimseError(
                f"{self.ae_title} answered the {query.level}-level C-FIND with "
                f"{_status_text(code, QR_FIND_SERVICE_CLASS_STATUS)}.{detail} "
                f"{_FIND_ADVICE.get(code & 0xFF00, _FIND_ADVICE[0])}",
                status=code,
                comment=str(comment) if comment else None,
            )
        raise self._lost(assoc, f"{query.level}-level C-FIND", time.monotonic() - last)

    # --- retrieval ------------------------------------------------------------------------

    @property
    def cache(self) -> Cache:
        """The on-disk cache retrieved objects go to (created on first use)."""
        if self._cache is None:
            from .cache import Cache

            setting = self._cache_setting
            self._cache = setting if isinstance(setting, Cache) else Cache(setting)
        return self._cache

    @property
    def scp_port(self) -> int:
        """Port of our storage SCP for C-MOVE (a free port is chosen once when 0)."""
        if not self._scp_port:
            with socket.socket() as probe:
                probe.bind(("127.0.0.1", 0))
                self._scp_port = probe.getsockname()[1]
        return self._scp_port

    def get(
        self,
        frame: pd.DataFrame | pd.Series | Sequence[str],
        *,
        workers: int = 4,
        progress: bool = True,
        on_received: Callable[[str, dict[str, Any]], Any] | None = None,
        overwrite: bool = False,
        model: str | None = None,
    ) -> RetrieveResult:
        """C-GET what ``frame`` describes into :attr:`cache`; skip what is cached.

        Parameters
        ----------
        frame : DataFrame, Series or list of StudyInstanceUIDs
            A frame from any ``find_*`` call (filtered as you like). The level is
            the most specific UID column present; patients need ``model="patient"``
            (frames from :meth:`find_patients` carry it).
        workers : int
            Parallel associations (work is split by study, series or instance list).
        progress : bool
            Show a ``tqdm`` bar (a widget in notebooks).
        on_received : callable, optional
            ``on_received(path, meta)`` after each object is safely in the cache;
            an exception from it stops the retrieval (C-CANCEL) and is re-raised.
        overwrite : bool
            Fetch and replace objects even when cached.
        model : {"study", "patient"}, optional
            The retrieve model; from the frame's attrs when it has them.

        Returns
        -------
        RetrieveResult
            ``completed``, ``cached``, ``warning``, ``failed``, and ``instances``.

        Examples
        --------
        >>> import tempfile
        >>> from pacsframe.demo import DemoPACS, make_cohort
        >>> folder = tempfile.mkdtemp()
        >>> _ = make_cohort(folder, patients=1, seed=4, studies_per_patient=1, matrix=8)
        >>> with DemoPACS(folder) as server:
        ...     pacs = PACS("127.0.0.1", server.port, server.ae_title, cache=tempfile.mkdtemp())
        ...     first = pacs.get(pacs.find_studies(), progress=False)
        ...     again = pacs.get(pacs.find_studies(), progress=False)
        >>> first.completed > 0, again.completed, again.cached == first.completed
        (True, 0, True)
        """
        from .retrieve import get

        return get(
            self,
            frame,
            workers=workers,
            progress=progress,
            on_received=on_received,
            overwrite=overwrite,
            model=model,
        )

    def move(
        self,
        frame: pd.DataFrame | pd.Series | Sequence[str],
        destination: str | None = None,
        *,
        progress: bool = True,
        on_received: Callable[[str, dict[str, Any]], Any] | None = None,
        overwrite: bool = False,
        model: str | None = None,
    ) -> RetrieveResult:
        """C-MOVE what ``frame`` describes, to us (the cache) or to another AE.

        With no ``destination`` (or our own ``calling_ae``) pacsframe runs its own
        storage SCP on :attr:`scp_port` for the duration of the call and files
        what arrives into :attr:`cache`; the peer must know ``calling_ae`` with
        our host and that port. With another AE title the peer is only asked to
        send there, and the result carries the peer's counts.

        Raises
        ------
        MoveDestinationUnknown
            When the peer does not know the destination AE.
        """
        from .retrieve import move

        return move(
            self,
            frame,
            destination=destination,
            progress=progress,
            on_received=on_received,
            overwrite=overwrite,
            model=model,
        )

    # --- C-STORE --------------------------------------------------------------------------

    def store(self, source: Any) -> Any:
        """C-STORE files, a frame with a ``path`` column, or datasets to the peer.

        Returns a :class:`~pacsframe.storage.StoreResult` with one row per object.
        See :func:`pacsframe.storage.store`.
        """
        from .storage import store

        return store(self, source)


def _release(assoc: Association) -> None:
    if assoc.is_established:
        assoc.release()


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


def _check_answer(frame: pd.DataFrame, level: str, peer: str) -> None:
    """Warn about rows a retrieval or drill-down trips over: no, invalid or repeated UIDs."""
    what = f"the {level}-level C-FIND answer from {peer}"
    key = UNIQUE_KEY[level]
    if key in frame.columns:
        missing = int(frame[key].isna().sum())
        if missing:
            warnings.warn(
                f"{missing} row(s) of {what} have no {key}, the level's unique key; the "
                "peer sent malformed data. They are kept, but cannot be retrieved or "
                "drilled down from.",
                frames.MalformedValueWarning,
                stacklevel=5,
            )
        values = frame[key].dropna()
        repeated = values[values.duplicated()].unique()
        if len(repeated) and level != "PATIENT":  # one PatientID may have two issuers
            warnings.warn(
                f"{len(repeated)} {key} value(s) appear in more than one row of {what} "
                f"(e.g. {repeated[0]!r}); the peer sent malformed data. All rows are "
                "kept; a retrieval requests each UID once.",
                frames.MalformedValueWarning,
                stacklevel=5,
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
                stacklevel=5,
            )
