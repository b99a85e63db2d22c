"""The PACS facade: a peer's settings, its associations, and the public calls.

One :class:`PACS` object describes one remote Application Entity. Each call opens
an association (pacsframe's own engine, :mod:`pacsframe.net`), uses it for every
request the call needs (a drill-down over 200 studies is 200 C-FINDs on one
association) and releases it; inside ``with pacs:`` associations are kept open
across calls until the block ends. The work is done by services that take the
PACS as their peer and never import it: :mod:`pacsframe.finder` (C-FIND),
:mod:`pacsframe.retrieve` (C-GET, C-MOVE), :mod:`pacsframe.storage` (C-STORE and
our storage SCP). TLS settings live in :mod:`pacsframe.net.tls`.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import ssl
import threading
import time
import tomllib
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import pandas as pd
import platformdirs
from pydicom.uid import UID

from . import finder, retrieve, storage
from .cache import Cache
from .deadline import Deadline, deadline_for, timed_out
from .errors import (
    AssociationError,
    DimseError,
    NotSupported,
    PacsFrameError,
    ProtocolError,
    QueryError,
)
from .net import driver, pdu
from .net import tls as net_tls
from .net.association import DEFAULT_MAX_PDU, describe_rejection
from .net.tls import TLS, BoundedHandshake
from .query import Query, build_query, build_worklist_query, normalize_model

__all__ = [
    "PACS",
    "TLS",
    "BoundedHandshake",
    "check_ae_title",
    "config_path",
    "read_peer",
]

LOGGER = logging.getLogger("pacsframe")

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
    "max_results": int,
    # TLS files (paths relative to the config file's folder) and the hostname check.
    "tls_ca": str,
    "tls_cert": str,
    "tls_key": str,
    "tls_check_hostname": bool,
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


def read_peer(
    name: str, path: str | os.PathLike[str] | None = None
) -> tuple[Path, dict[str, Any]]:
    """The configuration file and the settings of its ``[peers.NAME]`` table.

    Shared by :meth:`PACS.from_config` and :meth:`~pacsframe.DICOMweb.from_config`
    (a table with ``url`` is a DICOMweb archive); environment overrides are theirs.
    """
    file = Path(path).expanduser() if path is not None else config_path()
    if not file.is_file():
        raise QueryError(
            f"no pacsframe configuration at {file}; create it with a [peers.{name}] "
            "table (host, port, ae_title, calling_ae; or url for DICOMweb), or set "
            "PACSFRAME_CONFIG."
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
    return file, dict(peers[name])


def _capped(deadline: Deadline | None, seconds: float) -> float:
    """A wait of ``seconds``, shortened to what is left of the call's ``timeout=``."""
    return seconds if deadline is None else deadline.cap(seconds)


class PACS(finder.FindMethods):
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
        each DIMSE response, and for any network activity. They bound each wait;
        the ``timeout=`` of each call (echo, find*, get, move, store) bounds the
        whole call.
    max_pdu : int
        Largest PDU we accept (bytes; 0 for no limit).
    scp_port : int
        Port of our storage SCP for :meth:`move` (0: a free port, chosen once
        per PACS object; read it from ``pacs.scp_port`` to register us at the peer).
    cache : path or Cache, optional
        Where retrieved objects go; default ``PACSFRAME_CACHE`` or the user cache
        directory.
    tls : TLS or ssl.SSLContext, optional
        Speak DICOM TLS with the peer, on every association (echo, find, get,
        move, store). A :class:`TLS` with ``cert`` and ``key`` also makes our
        storage SCP for :meth:`move` accept only TLS; an ``ssl.SSLContext`` is
        used as given for our associations (the storage SCP then stays plain).
    max_results : int, optional
        The peer's C-FIND result cap, for a PACS that stops at that many matches
        and answers Success: an answer with at least this many rows is treated as
        capped and split (see :meth:`find`). Peers that say they stopped (Orthanc's
        0xFE00, dcm4chee-arc's "too large" refusal, 0xB001) need no setting.

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
        tls: TLS | ssl.SSLContext | None = None,
        max_results: int | None = None,
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
        if max_results is not None and (
            not isinstance(max_results, int) or isinstance(max_results, bool) or max_results < 1
        ):
            raise QueryError(
                f"max_results={max_results!r} must be a whole number of at least 1 (the "
                "number of matches at which the peer stops answering a C-FIND), or None."
            )
        self.max_results = max_results
        self.tls = tls
        self._tls_context = net_tls.client_context(tls)
        self._cache_setting = cache
        self._cache: Cache | None = None
        self._checked: str | None = None  # what the last echo() found, for the HTML repr
        self._held: dict[str, driver.ClientAssociation] = {}
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
        ``max_results`` (the peer's silent result cap) may be set in the file too,
        and ``PACSFRAME_MAX_RESULTS`` overrides it.

        TLS: ``tls_ca``, ``tls_cert`` and ``tls_key`` name PEM files (relative
        paths are relative to the configuration file's folder), overridden by
        ``PACSFRAME_TLS_CA``, ``PACSFRAME_TLS_CERT`` and ``PACSFRAME_TLS_KEY``;
        ``tls_check_hostname = false`` turns off the host name check (see
        :class:`TLS`). Any of them turns TLS on.

        Examples
        --------
        >>> import tempfile, pathlib
        >>> cfg = pathlib.Path(tempfile.mkdtemp()) / "config.toml"
        >>> text = '[peers.hospital]\\nhost = "10.0.0.5"\\nport = 104\\nae_title = "PACS"\\n'
        >>> _ = cfg.write_text(text)
        >>> PACS.from_config("hospital", cfg).ae_title
        'PACS'
        """
        file, settings = read_peer(name, path)
        if "url" in settings:
            # A table with url is a DICOMweb archive: the same file serves both.
            from .dicomweb import DICOMweb

            return DICOMweb._from_settings(name, file, settings, overrides)  # type: ignore[return-value]
        for key in ("host", "port", "ae_title", "calling_ae", "max_results"):
            env = os.environ.get(f"PACSFRAME_{key.upper()}")
            if env:
                settings[key] = env
        for key in ("tls_ca", "tls_cert", "tls_key"):
            env = os.environ.get(f"PACSFRAME_{key.upper()}")
            if env:
                settings[key] = str(Path(env).expanduser().resolve())
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
        tls_settings = {k: typed.pop(k) for k in list(typed) if k.startswith("tls_")}
        if tls_settings and "tls" not in overrides:
            check = settings.get("tls_check_hostname", True)
            if not isinstance(check, bool):
                raise QueryError(
                    f"[peers.{name}] in {file}: tls_check_hostname = {check!r} must be true "
                    "or false."
                )
            files = {
                k[4:]: file.parent / Path(v).expanduser()
                for k, v in tls_settings.items()
                if k != "tls_check_hostname"
            }
            try:
                typed["tls"] = TLS(**files, check_hostname=check)
            except QueryError as exc:
                raise QueryError(f"[peers.{name}] in {file}: {exc}") from None
        return cls(**{**typed, **overrides})

    def __repr__(self) -> str:
        tls = ""
        if self.tls is not None:
            tls = f", tls={self.tls!r}" if isinstance(self.tls, TLS) else ", tls=<ssl.SSLContext>"
        return (
            f"PACS({self.host!r}, {self.port}, ae_title={self.ae_title!r}, "
            f"calling_ae={self.calling_ae!r}{tls})"
        )

    def _repr_html_(self) -> str:
        # Never connects: a notebook repr must not block on an unreachable peer
        # (call echo() to check reachability).
        from html import escape

        rows = {
            "peer": f"{self.host}:{self.port}",
            "called AE (ae_title)": self.ae_title,
            "calling AE (calling_ae)": self.calling_ae,
            "TLS": net_tls.describe(self.tls),
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
            "tls": self.tls is not None,
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

    def __getstate__(self) -> dict[str, Any]:
        """Settings only: a worker process (:mod:`pacsframe.workers`) gets a PACS
        that opens its own associations, never this one's kept ones."""
        if isinstance(self.tls, ssl.SSLContext):
            raise TypeError(
                "a PACS whose tls= is an ssl.SSLContext cannot be pickled; pass "
                "pf.TLS(ca=..., cert=..., key=...) settings instead."
            )
        state = dict(vars(self))
        for runtime in ("_lock", "_held", "_tls_context", "_cache"):
            state.pop(runtime, None)
        state["_depth"] = 0
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        vars(self).update(state)
        self._tls_context = net_tls.client_context(self.tls)
        self._cache = None
        self._held = {}
        self._lock = threading.RLock()

    def close(self) -> None:
        """Release every association kept open by ``with pacs:``."""
        with self._lock:
            held, self._held = self._held, {}
        for assoc in held.values():
            _release(assoc)

    def connect(
        self,
        contexts: Sequence[tuple[str, Sequence[str]]],
        purpose: str,
        roles: Sequence[pdu.RoleSelection] = (),
    ) -> driver.ClientAssociation:
        """A new association over pacsframe's own upper layer (:mod:`pacsframe.net`).

        The call's ``timeout=`` caps the connection and negotiation waits and
        becomes the association's ``limit``. A peer that rejects us as
        transient (busy) is asked again a few times. Every failure is an
        :class:`AssociationError` (or :class:`NotSupported` when the peer accepts
        none of ``contexts``) saying what to check.
        """
        deadline = Deadline.current()
        doing = f"association request to {self.ae_title} at {self.host}:{self.port}"
        advice = "Check that the peer answers (pacs.echo()), or raise timeout=."
        if deadline is not None:
            deadline.check(doing, advice)
        started = time.monotonic()
        for delay in (*_TRANSIENT_RETRY_DELAYS, None):
            try:
                assoc = driver.associate(
                    self.host,
                    self.port,
                    called_ae=self.ae_title,
                    calling_ae=self.calling_ae,
                    contexts=contexts,
                    roles=roles,
                    connect_timeout=_capped(deadline, self.connect_timeout),
                    acse_timeout=_capped(deadline, self.acse_timeout),
                    dimse_timeout=self.dimse_timeout,
                    ssl_context=self._tls_context,
                    max_pdu=self.max_pdu or DEFAULT_MAX_PDU,
                )
            except AssociationError as exc:
                rejection = getattr(exc, "rejection", None)
                if rejection is not None and rejection.result == 2 and delay is not None:
                    # A busy peer rejects "transient" (e.g. its association limit); it
                    # says to try again, so we do, a few times with growing pauses.
                    LOGGER.info(
                        "%s rejected the association as transient; retrying", self.ae_title
                    )
                    time.sleep(_capped(deadline, delay))
                    if deadline is not None:
                        deadline.check(doing, advice)
                    continue
                if deadline is not None:
                    deadline.check(doing, advice)
                raise self._connect_failure(exc, time.monotonic() - started) from None
            break
        if not assoc.contexts:
            assoc.release()
            names = [_uid_name(abstract) for abstract, _ in contexts]
            shown = ", ".join(names[:3]) + (
                f" and {len(names) - 3} more" if len(names) > 3 else ""
            )
            raise NotSupported(
                f"{self.ae_title} at {self.host}:{self.port} accepted none of the presentation "
                f"contexts proposed ({shown}); the peer does not offer this service to "
                f"{self.calling_ae!r}.",
                status=0x0122,
            )
        if deadline is not None:
            assoc.limit = deadline.end
        LOGGER.info(
            "association %s -> %s at %s:%s established for %s",
            self.calling_ae,
            self.ae_title,
            self.host,
            self.port,
            purpose,
        )
        return assoc

    def _connect_failure(self, exc: AssociationError, elapsed: float) -> AssociationError:
        """The driver's failure to associate, explained for a PACS user."""
        where = f"{self.host}:{self.port}"
        rejection = getattr(exc, "rejection", None)
        if rejection is not None:
            if rejection.result == 2:
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
                f"the peer at {where} rejected the association "
                f"({describe_rejection(rejection)}) for called AE {self.ae_title!r} from "
                f"calling AE {self.calling_ae!r}. {advice}",
                reason="rejected",
            )
        ssl_error = getattr(exc, "ssl_error", None)
        if self._tls_context is not None and (
            (ssl_error is None and getattr(exc, "closed", False))
            or isinstance(ssl_error, ssl.SSLEOFError)
            or "EOF" in str(getattr(ssl_error, "reason", "") or "")
        ):
            # The peer closed right after the handshake: ask again, only reading,
            # for the alert that says why (see refusal_alert).
            ssl_error = (
                net_tls.refusal_alert(
                    self.host, self.port, self._tls_context, min(self.connect_timeout, 2.0)
                )
                or ssl_error
            )
        if ssl_error is not None:
            return net_tls.explain_failure(self.host, self.port, self.tls, ssl_error)
        if exc.reason == "tls":
            return AssociationError(
                f"the TLS handshake with {where} failed (the TCP connection works); check "
                "that this is the peer's TLS port and that tls= matches its TLS settings "
                "(CA, client certificate).",
                reason="tls",
            )
        if exc.reason == "refused":
            return exc
        if exc.reason == "timeout":
            if "connecting" in str(exc):
                return exc
            return AssociationError(
                f"{where} accepted the TCP connection but did not answer the association "
                f"request within acse_timeout={self.acse_timeout:g} s; check that this is "
                "the peer's DICOM port (not its web port), or raise acse_timeout.",
                reason="timeout",
            )
        if self._tls_context is None and net_tls.speaks_tls(
            self.host, self.port, self.connect_timeout
        ):
            return AssociationError(
                f"{self.ae_title} at {where} requires DICOM TLS: it closed our plain "
                "association request and answers a TLS handshake. Pass "
                "tls=pf.TLS(ca=..., cert=..., key=...) with the CA that signed its "
                "certificate (and our certificate, if it asks for one).",
                reason="tls",
            )
        if self._tls_context is not None:
            return AssociationError(
                f"{self.ae_title} at {where} closed the TLS connection without answering the "
                f"association request from {self.calling_ae!r}; check the peer's log (it may "
                "have refused our client certificate, or not know our AE title).",
                reason="aborted",
            )
        return AssociationError(
            f"{self.ae_title} at {where} aborted the association request from "
            f"{self.calling_ae!r}; check the peer's log for why (unknown calling AE, "
            "too many connections).",
            reason="aborted",
        )

    def explain_loss(self, exc: AssociationError, what: str) -> AssociationError:
        """The engine's loss of an association during ``what``, said for a PACS user.

        The driver times out only when one message took over ``dimse_timeout``
        (the call's ``timeout=`` is :class:`~pacsframe.net.driver.LimitReached`);
        a protocol error keeps its own sentence, which says what the peer did.
        """
        if isinstance(exc, ProtocolError) or exc.reason not in ("timeout", "aborted"):
            return exc
        where = f"{self.ae_title} at {self.host}:{self.port}"
        if exc.reason == "timeout":
            return AssociationError(
                f"no {what} response from {where} within dimse_timeout="
                f"{self.dimse_timeout:g} s; the association was aborted. Check the peer's "
                "log, or raise dimse_timeout for a slow peer.",
                reason="timeout",
            )
        return AssociationError(
            f"{where} aborted the association during {what} ({exc}); check the peer's "
            "log, then try again.",
            reason="aborted",
        )

    @contextlib.contextmanager
    def session(
        self,
        contexts: Sequence[tuple[str, Sequence[str]]],
        purpose: str = "query",
        *,
        roles: Sequence[pdu.RoleSelection] = (),
        keep: bool = True,
    ) -> Iterator[driver.ClientAssociation]:
        """An established association (pacsframe's engine) for ``purpose``, released after.

        Inside ``with pacs:`` the association is kept for later calls with the
        same purpose, unless ``keep`` is False (C-GET workers). The call's
        ``timeout=`` is the association's ``limit`` while the block runs. An
        exception inside aborts it (the peer may be mid-operation) unless the
        association is :attr:`~pacsframe.net.driver.ClientAssociation.idle`: a
        failure status, or a C-FIND the peer ended after our C-CANCEL, leaves a
        held association usable.
        """
        key = f"net:{purpose}"
        deadline = Deadline.current()
        with self._lock:
            assoc = self._held.get(key) if self._depth and keep else None
            if assoc is not None and not assoc.is_quiet():
                # The peer closed it while idle (its idle timeout, a restart) or
                # sent something unasked: start afresh rather than fail the call.
                self._held.pop(key, None)
                assoc.abort()
                assoc = None
        if assoc is None:
            assoc = self.connect(contexts, purpose, roles)
            with self._lock:
                keep = bool(self._depth) and keep
                if keep:
                    self._held[key] = assoc
        assoc.limit = deadline.end if deadline is not None else None
        try:
            yield assoc
        except BaseException as exc:
            if not (isinstance(exc, Exception) and assoc.idle and assoc.is_established):
                assoc.abort()
                with self._lock:
                    if self._held.get(key) is assoc:
                        del self._held[key]
            raise
        finally:
            assoc.limit = None
            with self._lock:
                held = self._held.get(key) is assoc
            if not held and assoc.is_established:
                assoc.release()

    # --- C-ECHO --------------------------------------------------------------------------

    def echo(self, *, timeout: float | None = None) -> float:
        """Send a C-ECHO; return the round-trip time in seconds.

        Parameters
        ----------
        timeout : float, optional
            Seconds for the whole call, association included; None (the
            default) sets no overall limit (each wait is still bounded by
            ``connect_timeout``, ``acse_timeout`` and ``dimse_timeout``).

        Raises
        ------
        AssociationError
            When the peer cannot be reached or refuses us, or (``reason="timeout"``)
            when it does not answer within ``timeout``.
        DimseError
            When the peer answers with a failure status.
        """
        with deadline_for(timeout, "echo") as deadline:
            try:
                seconds = self._echo(deadline)
            except PacsFrameError as exc:
                error = timed_out(deadline, exc, "C-ECHO")
                self._checked = f"not reachable at the last echo(): {error}"
                if error is exc:
                    raise
                raise error from error.__cause__
        self._checked = "reachable: it answered the last echo()"
        return seconds

    def _echo(self, deadline: Deadline | None) -> float:
        started = time.monotonic()
        with self.session(finder.query_contexts()) as assoc:
            status = assoc.echo()
        if status != 0x0000:
            raise DimseError(
                f"{self.ae_title} answered C-ECHO with status 0x{status:04X}.", status=status
            )
        return time.monotonic() - started

    # --- C-FIND --------------------------------------------------------------------------

    def find(
        self,
        level: str,
        parents: pd.DataFrame | pd.Series | Sequence[str] | None = None,
        *,
        model: str = "study",
        return_keys: Sequence[str] | None = None,
        progress: bool = True,
        timeout: float | None = None,
        **keys: Any,
    ) -> pd.DataFrame:
        """C-FIND at ``level`` and return one typed row per match.

        A capped answer is never returned as if complete. When the peer stops
        early (a final 0xFE00 nobody asked for, a refusal whose comment names a
        size, 0xB001, or at least :attr:`max_results` rows), the query is split
        (StudyDate windows, then StudyTime within a day, down to one minute;
        PatientBirthDate windows at PATIENT level; see :mod:`pacsframe.caps`), the
        pieces are asked on the same association and merged, each row once.
        Entities without a value in a split key (undated studies) match no window:
        those in the capped answer are kept, and a warning says more may exist.

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
        progress : bool
            Show a ``tqdm`` bar when splitting a capped answer takes many queries.
        timeout : float, optional
            Seconds for the whole call: every association and C-FIND it needs
            (one per parent when drilling down). None (the default) sets no
            overall limit; each wait is still bounded by ``dimse_timeout``.
        **keys
            Matching keys: DICOM keywords (or snake_case) and values (see
            :func:`pacsframe.query.encode_value`).

        Returns
        -------
        DataFrame
            ``attrs["pacsframe"]`` holds the query, the peer, ``requests`` (the
            number of C-FINDs sent) and ``split`` (whether a capped answer was split).

        Raises
        ------
        ResultsCapped
            A window is still capped after every split (one minute of StudyTime
            holds at least the cap, or SERIES/IMAGE level, where no split is
            complete); ``.partial`` holds the rows obtained. A ``QueryError``.
        QueryError
            A key, value, level or ``timeout`` is wrong (nothing was sent).
        AssociationError
            The peer cannot be reached, refuses us or stops answering; with
            ``reason="timeout"`` and ``.partial`` (the rows received so far, typed
            like the result) when ``timeout`` ran out.
        DimseError
            The peer answered with a failure status.

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
        return self._find(query, parents, progress, timeout, "find")

    def find_worklist(
        self,
        *,
        return_keys: Sequence[str] | None = None,
        progress: bool = True,
        timeout: float | None = None,
        **keys: Any,
    ) -> pd.DataFrame:
        """Scheduled procedure steps: C-FIND in the Modality Worklist model, one row per step.

        The peer is a worklist provider (a RIS, a modality worklist server such as
        Orthanc's plugin or dcmtk's ``wlmscpfs``). Keys are flat: those of a
        Scheduled Procedure Step (:data:`pacsframe.query.SPS_KEYS`: Modality,
        ScheduledStationAETitle, ScheduledProcedureStepStartDate/Time,
        ScheduledPerformingPhysicianName...) go into the single item of the
        Scheduled Procedure Step Sequence; the others (PatientName, PatientID,
        AccessionNumber, RequestedProcedureID, StudyInstanceUID...) are top level.
        Values take the forms of :meth:`find` (date ranges and tuples, ISO dates,
        wildcards, None to return a key without matching).

        A capped answer is split by ScheduledProcedureStepStartDate (then time),
        as :meth:`find` splits by StudyDate, or raises :class:`ResultsCapped`.

        Parameters
        ----------
        return_keys : list of str, optional
            Attributes to return in addition to the defaults
            (``pacsframe.query.DEFAULT_KEYS["WORKLIST"]``); keys of a step go into
            the sequence item.
        progress : bool
            Show a ``tqdm`` bar when splitting a capped answer takes many queries.
        timeout : float, optional
            Seconds for the whole call; None sets no overall limit.
        **keys
            Matching keys: DICOM keywords (or snake_case) and values.

        Returns
        -------
        DataFrame
            One row per scheduled procedure step, typed like every C-FIND frame:
            each attribute of the step's item is a column by its keyword, and the
            requested procedure's and patient's columns repeat on every step of one
            match. ``attrs["pacsframe"]`` holds the query (``level`` is
            ``"WORKLIST"``), the peer, ``requests`` and ``split``.

        Raises
        ------
        QueryError
            A key or value is wrong (nothing was sent).
        NotSupported
            The peer does not offer the Modality Worklist model.
        ResultsCapped, AssociationError, DimseError
            As for :meth:`find`.

        Examples
        --------
        >>> import tempfile
        >>> from pacsframe.demo import DemoPACS
        >>> with DemoPACS(tempfile.mkdtemp()) as server:  # serves the demo worklist
        ...     pacs = PACS("127.0.0.1", server.port, ae_title=server.ae_title)
        ...     steps = pacs.find_worklist(ScheduledProcedureStepStartDate="2026-03-02",
        ...                                Modality="CT")
        >>> steps.Modality.unique().tolist()
        ['CT']
        >>> str(steps.ScheduledProcedureStepStartTime.dtype)
        'timedelta64[ns]'
        """
        query = build_worklist_query(keys, return_keys)
        return self._find(query, None, progress, timeout, "find_worklist")

    def _find(
        self,
        query: Query,
        parents: Any,
        progress: bool,
        timeout: float | None,
        call: str,
    ) -> pd.DataFrame:
        """Run a validated query under the call's ``timeout=`` (see :meth:`find`)."""
        with deadline_for(timeout, call) as deadline:
            try:
                if parents is None:
                    query.check_required()
                    return finder.run(self, query, None, progress)
                return finder.run(self, query, finder.parents_of(self, parents, query), progress)
            except PacsFrameError as exc:
                error = timed_out(
                    deadline,
                    exc,
                    query.what,
                    "The rows received so far are in this error's .partial. Narrow the query "
                    "(a shorter date range, more matching keys), or raise timeout= (None: no "
                    "overall limit).",
                )
                if error is exc:
                    raise
                # Rows of this call's level only: a drill-down through a level in
                # between may have stopped there, before any row of this one.
                partial = getattr(exc, "partial", None)
                if not finder.same_level(partial, query):
                    partial = finder.partial(self, query, query.builder(), None, [])
                error.partial = partial  # type: ignore[attr-defined]
                raise error from error.__cause__

    # --- retrieval ------------------------------------------------------------------------

    @property
    def cache(self) -> Cache:
        """The on-disk cache retrieved objects go to (created on first use)."""
        if self._cache is None:
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
        timeout: float | None = None,
    ) -> retrieve.RetrieveResult:
        """C-GET what ``frame`` describes into :attr:`cache`; skip what is cached.

        Parameters
        ----------
        frame : DataFrame, Series or list of StudyInstanceUIDs
            A frame from any ``find_*`` call (filtered as you like). The level is
            the most specific UID column present; patients need ``model="patient"``
            (frames from :meth:`find_patients` carry it).
        workers : int
            Parallel associations (work is split by study, series or instance list).
            On Linux each runs in a worker process forked from this one, so they
            use every core; ``on_received`` and the progress bar still run here
            (:mod:`pacsframe.workers`; ``PACSFRAME_WORKER_PROCESSES=0`` uses
            threads instead).
        progress : bool
            Show a ``tqdm`` bar (a widget in notebooks).
        on_received : callable, optional
            ``on_received(path, meta)`` after each object is safely in the cache;
            an exception from it stops the retrieval (C-CANCEL) and is re-raised.
        overwrite : bool
            Fetch and replace objects even when cached.
        model : {"study", "patient"}, optional
            The retrieve model; from the frame's attrs when it has them.
        timeout : float, optional
            Seconds for the whole call, planning and every worker included. When
            they run out the C-GETs in flight are cancelled (aborted if the peer
            does not stop), what arrived stays cached, and an ``AssociationError``
            with ``reason="timeout"`` carries the ``RetrieveResult`` as ``.result``;
            calling ``get`` again fetches only the rest. None (the default) sets
            no overall limit.

        Returns
        -------
        RetrieveResult
            ``completed``, ``cached``, ``warning``, ``failed``, and ``instances``.

        Raises
        ------
        AssociationError, DimseError
            The retrieval failed or ran out of ``timeout``; ``.result`` says what
            arrived (it is in the cache).

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

        return retrieve.get(
            self,
            frame,
            workers=workers,
            progress=progress,
            on_received=on_received,
            overwrite=overwrite,
            model=model,
            timeout=timeout,
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
        timeout: float | None = None,
    ) -> retrieve.RetrieveResult:
        """C-MOVE what ``frame`` describes, to us (the cache) or to another AE.

        With no ``destination`` (or our own ``calling_ae``) pacsframe runs its own
        storage SCP on :attr:`scp_port` for the duration of the call and files
        what arrives into :attr:`cache`; the peer must know ``calling_ae`` with
        our host and that port. With another AE title the peer is only asked to
        send there, and the result carries the peer's counts.

        Parameters
        ----------
        frame : DataFrame, Series or list of StudyInstanceUIDs
            As for :meth:`get`.
        destination : str, optional
            The AE title to move to; default: us.
        progress, on_received, overwrite, model
            As for :meth:`get`.
        timeout : float, optional
            Seconds for the whole call. When they run out the C-MOVE in flight is
            cancelled (aborted if the peer does not stop), our storage SCP stops,
            what arrived stays cached, and an ``AssociationError`` with
            ``reason="timeout"`` carries the ``RetrieveResult`` as ``.result``.
            None (the default) sets no overall limit.

        Raises
        ------
        MoveDestinationUnknown
            When the peer does not know the destination AE.
        AssociationError
            The peer cannot be reached, stops answering, or ``timeout`` ran out;
            ``.result`` says what arrived.
        """

        return retrieve.move(
            self,
            frame,
            destination=destination,
            progress=progress,
            on_received=on_received,
            overwrite=overwrite,
            model=model,
            timeout=timeout,
        )

    # --- C-STORE --------------------------------------------------------------------------

    def store(self, source: Any, *, timeout: float | None = None) -> Any:
        """C-STORE files, a frame with a ``path`` column, or datasets to the peer.

        Returns a :class:`~pacsframe.storage.StoreResult` with one row per object.
        ``timeout`` (seconds, default None: no overall limit) bounds the whole
        call; when it runs out an ``AssociationError`` with ``reason="timeout"``
        carries the ``StoreResult`` as ``.result``. See
        :func:`pacsframe.storage.store`.
        """

        return storage.store(self, source, timeout=timeout)


def _release(assoc: driver.ClientAssociation) -> None:
    if assoc.is_established:
        assoc.release()


def _uid_name(uid: str) -> str:
    """A SOP class's name where pydicom knows it, else the UID."""
    name = UID(uid).name
    return str(name) if name and name != uid else uid
