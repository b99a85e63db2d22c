"""The DICOMweb facade: QIDO-RS searches as the same typed frames as C-FIND.

:class:`DICOMweb` has the public surface of :class:`~pacsframe.PACS` where
DICOMweb has the service: ``echo``, ``find`` and ``find_*`` (the same
arguments, validation, columns, dtypes and drill-down), ``cache``,
``from_config`` and ``timeout=`` on every call; ``move`` raises
:class:`~pacsframe.errors.NotSupported` (DICOMweb has no move). HTTP is
:class:`~pacsframe.webhttp.WebTransport`; a search runs through
:func:`pacsframe.finder.collect`, the code C-FIND uses, so drill-down, capped
answers (split by :mod:`pacsframe.caps`), partial results and answer checks are
the same code over either protocol.

QIDO-RS mapping
---------------
* Matching keys become query parameters in DICOM matching form (ranges
  ``20260101-20260131``, wildcards, UID lists comma-separated); every other
  column is asked for with ``includefield``.
* Paths: ``/studies``; ``/studies/{uid}/series``; ``/studies/{uid}/series/{uid}/
  instances`` (``/studies/{uid}/instances``, ``/series``, ``/instances`` when
  the parent UIDs are not single values).
* Paging: pages of 1,000 rows (``limit``) with ``offset``, continued while a page
  is full or the server's ``Warning: 299`` says more results can be requested.
  Each page is asked together with the one after it, before anyone knows whether
  it is full (see ``DICOMweb._page``): two requests in flight, which a server
  answers on two threads (a search below one parent, as a drill-down sends, asks
  its first page alone). An answer the server cut short without saying so
  (Orthanc's ``LimitFindResults``) is recognised by ``max_results=`` and split by
  StudyDate/StudyTime windows, as C-FIND does.
* PATIENT level: PS3.18 defines no patient search, so :meth:`DICOMweb.find_patients`
  asks for the matching studies and groups them by patient (PatientID, and
  IssuerOfPatientID when asked for); ``NumberOfPatientRelated*`` are counted
  from the studies. Patients with no study are not visible over DICOMweb.
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
import os
import re
import threading
import time
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pandas as pd
import requests

from . import finder, frames
from .cache import Cache
from .deadline import deadline_for, timed_out
from .errors import HTTPError, NotSupported, PacsFrameError, ProtocolError, QueryError
from .query import Query, build_query, normalize_level, normalize_model
from .webhttp import WebTransport, redact

__all__ = ["DICOMweb"]

LOGGER = logging.getLogger("pacsframe")

_JSON = "application/dicom+json"
_WARNING_MORE = re.compile(r"\b299\b.*additional\s+results", re.IGNORECASE | re.DOTALL)
_LEVEL_NAMES = {"STUDY": "studies", "SERIES": "series", "IMAGE": "instances"}
#: The study columns a patient row is counted from.
_PATIENT_COUNTS = {
    "NumberOfPatientRelatedStudies": None,
    "NumberOfPatientRelatedSeries": "NumberOfStudyRelatedSeries",
    "NumberOfPatientRelatedInstances": "NumberOfStudyRelatedInstances",
}


class DICOMweb(finder.FindMethods):
    """A DICOMweb archive (QIDO-RS) to query into typed frames, like :class:`~pacsframe.PACS`.

    Parameters
    ----------
    url : str
        The service root, e.g. ``https://archive.example/dicom-web``.
    auth : (str, str) or requests auth, optional
        HTTP basic credentials, or any ``requests`` auth object.
    headers : mapping, optional
        Headers for every request (e.g. ``{"Authorization": "Bearer ..."}``).
    session : requests.Session, optional
        A session to use as given, e.g. google-auth's ``AuthorizedSession`` for a
        cloud DICOM store.
    verify : bool or str
        Check the server's TLS certificate (True), don't (False), or a CA bundle path.
    timeout : float or (float, float), optional
        Seconds to connect and to wait for data, per request (default 10 and 60).
        The ``timeout=`` of each call bounds the whole call.
    cache : path or Cache, optional
        Where retrieved objects go; default ``PACSFRAME_CACHE`` or the user cache
        directory.
    max_results : int, optional
        The server's silent result cap (e.g. Orthanc's ``LimitFindResults``): an
        answer with at least this many rows is treated as capped and split.

    Examples
    --------
    >>> web = DICOMweb("https://user:pw@archive.example/dicom-web")
    >>> web
    DICOMweb('https://archive.example/dicom-web')
    """

    #: Rows asked for per request (``limit``), and the page size every server is trusted
    #: to honour: a page of fewer rows without a ``Warning: 299`` ends the answer. A
    #: server that cuts silently below it (at a maximum of its own) is invisible, as it
    #: always was; give ``max_results=``. A server that announces a lower maximum with
    #: the Warning is followed, and its maximum becomes the step between pages.
    #:
    #: Speculative paging, one page ahead: the page at ``offset + step`` is asked at the
    #: same time as the page at ``offset``, on its own thread, before anyone knows
    #: whether the page at ``offset`` is full; a full page's successor is then already
    #: under way, and a short page abandons it. Why pages of 1,000 asked two at a time,
    #: not one large request: Orthanc (and servers like it) answers concurrent requests
    #: on threads of its own, and its cost is per request ~60 us for each skipped
    #: ``offset`` row plus ~950 us for each returned row. On the bench Orthanc (2,002
    #: studies, 2 cores) one unpaged request took 1.96 s; pages of 1,000 asked in turn
    #: 0.96 s + 1.0 s (+ 0.12 s for the empty page that proves a 2,002-row page whole);
    #: three pages of 1,000 asked in parallel 1.30 s. A larger ``limit`` cannot tell a
    #: complete page from a server's own maximum without that extra, serial request.
    #: The price: a search whose answer fits in one page costs two requests (the second
    #: returns nothing, cheaply, at the same time), and an abandoned request still ends
    #: its work on the server; on a busy server (no spare core) that work is a loss
    #: (bench, one core taken by other work: 2.3 s against 2.1 s for one request and
    #: its probe). A drill-down's search below one parent asks its first page alone:
    #: its answers seldom fill a page, and a second request per parent row cost it
    #: about a quarter more time (300 series searches: 3.0-3.5 s against 2.3-3.0 s).
    _page = 1000

    _call = "web."  # timeout errors name web.find_studies() and the like

    def __init__(
        self,
        url: str,
        *,
        auth: Any = None,
        headers: Any = None,
        session: Any = None,
        verify: Any = True,
        timeout: float | tuple[float, float] | None = None,
        cache: str | os.PathLike[str] | Cache | None = None,
        max_results: int | None = None,
    ) -> None:
        if max_results is not None and (
            not isinstance(max_results, int) or isinstance(max_results, bool) or max_results < 1
        ):
            raise QueryError(
                f"max_results={max_results!r} must be a whole number of at least 1 (the "
                "number of matches at which the server stops answering a search), or None."
            )
        options: dict[str, Any] = {} if timeout is None else {"timeout": timeout}
        self.transport = WebTransport(
            url, auth=auth, headers=headers, session=session, verify=verify, **options
        )
        self.url = redact(self.transport.base)
        self.max_results = max_results
        self._cache_setting = cache
        self._cache: Cache | None = None
        self._checked: str | None = None

    # --- construction ---------------------------------------------------------------

    @classmethod
    def from_config(
        cls, name: str, path: str | os.PathLike[str] | None = None, **overrides: Any
    ) -> DICOMweb:
        """An archive from the ``[peers.NAME]`` table of the configuration file.

        The same file as :meth:`PACS.from_config`; a table with ``url = ...`` is a
        DICOMweb archive. Settings: ``url``, ``user`` and ``password`` (basic
        auth), ``token`` (a bearer token), ``verify`` (true, false, or a CA bundle
        path relative to the file's folder), ``timeout``, ``cache``,
        ``max_results``. ``PACSFRAME_URL``, ``PACSFRAME_USER``,
        ``PACSFRAME_PASSWORD``, ``PACSFRAME_TOKEN`` and ``PACSFRAME_MAX_RESULTS``
        override the file (keep credentials out of it), and keyword arguments
        override both.

        Examples
        --------
        >>> import tempfile, pathlib
        >>> cfg = pathlib.Path(tempfile.mkdtemp()) / "config.toml"
        >>> _ = cfg.write_text('[peers.web]\\nurl = "http://10.0.0.5/dicom-web"\\n')
        >>> DICOMweb.from_config("web", cfg)
        DICOMweb('http://10.0.0.5/dicom-web')
        """
        from .pacs import read_peer

        file, settings = read_peer(name, path)
        if "url" not in settings and "url" not in overrides:
            raise QueryError(
                f"[peers.{name}] in {file} has no url, so it is a DIMSE peer: use "
                f"pf.PACS.from_config({name!r}), or add url = 'https://.../dicom-web'."
            )
        return cls._from_settings(name, file, settings, overrides)

    @classmethod
    def _from_settings(
        cls, name: str, file: Path, settings: dict[str, Any], overrides: dict[str, Any]
    ) -> DICOMweb:
        settings = dict(settings)
        for key in ("url", "user", "password", "token", "max_results"):
            env = os.environ.get(f"PACSFRAME_{key.upper()}")
            if env:
                settings[key] = env
        known = {"url", "user", "password", "token", "verify", "timeout", "cache", "max_results"}
        unknown = set(settings) - known
        if unknown:
            raise QueryError(
                f"[peers.{name}] in {file} has settings {sorted(unknown)} that a DICOMweb "
                f"archive (a table with url) does not take; the known ones are {sorted(known)}."
            )
        kwargs: dict[str, Any] = {}
        try:
            if "user" in settings or "password" in settings:
                kwargs["auth"] = (str(settings.get("user", "")), str(settings.get("password", "")))
            if "token" in settings:
                kwargs["headers"] = {"Authorization": f"Bearer {settings['token']}"}
            if "verify" in settings:
                verify = settings["verify"]
                if isinstance(verify, str) and verify.lower() in ("true", "false"):
                    verify = verify.lower() == "true"
                if isinstance(verify, str):
                    verify = str(file.parent / Path(verify).expanduser())
                kwargs["verify"] = verify
            if "timeout" in settings:
                kwargs["timeout"] = float(settings["timeout"])
            if "max_results" in settings:
                kwargs["max_results"] = int(settings["max_results"])
            if "cache" in settings:
                kwargs["cache"] = str(settings["cache"])
        except (TypeError, ValueError) as exc:
            raise QueryError(f"[peers.{name}] in {file}: {exc}; fix the value.") from None
        url = overrides.pop("url", None) or str(settings["url"])
        return cls(url, **{**kwargs, **overrides})

    def __repr__(self) -> str:
        return f"DICOMweb({self.url!r})"

    def __getstate__(self) -> dict[str, Any]:
        """Settings only, as :meth:`PACS.__getstate__`: a worker process
        (:mod:`pacsframe.workers`) gets a DICOMweb with the URL, auth, headers,
        verify and timeout, which opens its own connections. A ``session=`` the
        caller gave cannot cross (TypeError): that archive's retrievals use threads."""
        state = dict(vars(self))
        opened = state.pop("_cache", None)
        if opened is None and isinstance(self._cache_setting, Cache):
            opened = self._cache_setting
        if opened is not None:  # (a Cache is falsy when empty)
            state["_cache_setting"] = str(opened.root)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        vars(self).update(state)
        self._cache = None

    def _repr_html_(self) -> str:
        from html import escape

        rows = {
            "service root": self.url,
            "credentials": "yes" if self._has_credentials() else "none",
            "TLS check": str(self.transport.verify) if self.url.startswith("https") else "n/a",
            "cache": str(self.cache.root),
        }
        body = "".join(
            f"<tr><th style='text-align:left'>{escape(k)}</th><td>{escape(v)}</td></tr>"
            for k, v in rows.items()
        )
        checked = escape(self._checked or "not checked; echo() tests it")
        return f"<div><b>DICOMweb</b> <i>({checked})</i><table>{body}</table></div>"

    def _has_credentials(self) -> bool:
        t = self.transport
        return (
            t.auth is not None
            or getattr(t.session, "auth", None) is not None
            or any(k.lower() == "authorization" for k in t.headers)
        )

    @property
    def peer(self) -> dict[str, Any]:
        """JSON-safe description of the archive (for ``DataFrame.attrs``), no credentials."""
        return {"url": self.url, "protocol": "DICOMweb"}

    @property
    def ae_title(self) -> str:
        """How messages name the archive (its URL, without credentials)."""
        return self.url

    def __enter__(self) -> DICOMweb:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Close the HTTP connections (a session passed in by the caller stays open)."""
        self.transport.close()

    @property
    def cache(self) -> Cache:
        """The on-disk cache retrieved objects go to (created on first use)."""
        if self._cache is None:
            setting = self._cache_setting
            self._cache = setting if isinstance(setting, Cache) else Cache(setting)
        return self._cache

    # --- echo -------------------------------------------------------------------------

    def echo(self, *, timeout: float | None = None) -> float:
        """Ask for one study (``GET /studies?limit=1``); the round trip in seconds.

        Raises
        ------
        AssociationError
            Unreachable, TLS, 401/403 (``reason="auth"``) or ``timeout``.
        NotSupported, HTTPError
            The URL is not a QIDO-RS service root, or the server failed.
        """
        with deadline_for(timeout, "web.echo") as deadline:
            started = time.monotonic()
            try:
                self.transport.request(
                    "GET",
                    "/studies",
                    params={"limit": "1"},
                    headers={"Accept": _JSON},
                    what="QIDO-RS echo (a search for one study)",
                ).close()
            except PacsFrameError as exc:
                error = timed_out(deadline, exc, "QIDO-RS echo")
                self._checked = f"not reachable at the last echo(): {error}"
                if error is exc:
                    raise
                raise error from error.__cause__
        self._checked = "reachable: it answered the last echo()"
        return time.monotonic() - started

    # --- QIDO-RS ----------------------------------------------------------------------

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
        """QIDO-RS search at ``level``: one typed row per match, as :meth:`PACS.find`.

        The arguments, validation, columns, dtypes, drill-down, capped-answer
        splitting and ``timeout=`` behave as for :meth:`pacsframe.PACS.find`.
        ``model`` only decides which keys are required (QIDO-RS has no models).

        Raises
        ------
        QueryError
            Wrong input (nothing was sent); :class:`ResultsCapped` when a window
            is still capped after every split.
        AssociationError
            Unreachable, TLS, 401/403 (``reason="auth"``), or ``timeout`` (then
            ``.partial`` holds the rows received).
        NotSupported
            The server offers no QIDO-RS at this URL (404, 405, 501).
        HTTPError
            Any other HTTP failure (``.status``, ``.comment``).
        """
        level = normalize_level(level)
        model = normalize_model(model)
        query = build_query(level, model, keys, return_keys)
        with deadline_for(timeout, "web.find") as deadline:
            try:
                if level == "PATIENT":
                    if parents is not None:
                        finder.parents_of(self, parents, query)  # raises: no parents
                    query.check_required()
                    return self._find_patients(query, progress)
                if parents is None:
                    query.check_required()
                    return self._collect(query, None, progress)
                return self._collect(query, finder.parents_of(self, parents, query), progress)
            except PacsFrameError as exc:
                error = timed_out(
                    deadline,
                    exc,
                    f"{query.level}-level QIDO-RS search",
                    "The rows received so far are in this error's .partial. Narrow the query "
                    "(a shorter date range, more matching keys), or raise timeout= (None: no "
                    "overall limit).",
                )
                if error is exc:
                    raise
                partial = getattr(exc, "partial", None)
                if not finder.same_level(partial, query):
                    empty = frames.FrameBuilder(query.columns)
                    partial = finder.partial(self, query, empty, None, [])
                error.partial = partial  # type: ignore[attr-defined]
                raise error from error.__cause__

    def find_patients(self, *, timeout: float | None = None, **keys: Any) -> pd.DataFrame:
        """Patients, from a study search grouped by patient (PS3.18 has no patient search).

        The same columns and dtypes as :meth:`PACS.find_patients`;
        ``NumberOfPatientRelated*`` are counted from the matching studies, so a
        patient with no study is not found. See :meth:`find`.
        """
        with deadline_for(timeout, "web.find_patients"):
            return self.find("PATIENT", None, model="patient", **keys)

    def get(self, frame: Any, **kwargs: Any) -> Any:
        """WADO-RS ``frame`` into :attr:`cache`, as :meth:`PACS.get` does over C-GET.

        See :func:`pacsframe.webtransfer.get` (``workers``, ``progress``,
        ``on_received``, ``overwrite``, ``timeout``); returns a ``RetrieveResult``.
        """
        from . import webtransfer

        return webtransfer.get(self, frame, **kwargs)

    def store(self, source: Any, **kwargs: Any) -> Any:
        """STOW-RS ``source`` (paths, a folder, a frame with ``path``, Datasets).

        See :func:`pacsframe.webtransfer.store` (``study``, ``batch``, ``timeout``);
        returns a ``StoreResult`` with one status per object, also when the archive
        stored only some (HTTP 202, or Orthanc's 409 / 400 naming the failed ones).
        """
        from . import webtransfer

        return webtransfer.store(self, source, **kwargs)

    def move(self, *args: Any, **kwargs: Any) -> Any:
        """DICOMweb has no move: raises :class:`~pacsframe.errors.NotSupported`."""
        raise NotSupported(
            "DICOMweb has no C-MOVE: a DICOMweb archive sends objects only to the client "
            "that asks. Use get() to retrieve into the cache, or pf.PACS(...).move() if the "
            "archive also speaks DIMSE.",
            status=501,
        )

    # --- searching --------------------------------------------------------------------

    def _collect(self, query: Query, parents: pd.DataFrame | None, progress: bool) -> pd.DataFrame:
        @contextlib.contextmanager
        def connect() -> Iterator[finder.Ask]:
            yield self._search

        return finder.collect(
            self, query, parents, connect, progress=progress, name=self.url, service="QIDO-RS"
        )

    def _search(self, query: Query, builder: frames.FrameBuilder) -> str | None:
        """One QIDO-RS search, every page, into ``builder``; why it is cut short, or None.

        Speculative paging, one page ahead (see ``_page``): each page is asked
        together with the page ``step`` rows after it (that one on a thread of its
        own), so that the server works on the next page while this one is counted
        and typed. A page of ``c`` rows from ``offset`` goes on at ``offset + c``
        when it is full
        (``c >= step``) or the server's ``Warning: 299`` says more can be requested;
        the request ahead is taken when it was asked from exactly there, and
        otherwise abandoned and the page asked anew (a server maximum below the page,
        announced by the Warning, becomes the new ``step``; a server that ignored
        ``limit`` sent more rows than asked, which are never typed twice). A page of
        fewer rows without the Warning ends the answer, and the request ahead is
        abandoned: its result and its error are ignored. So an answer that fits in
        one page costs two requests (the second finds nothing, in parallel), except a
        search below one parent (``/studies/{uid}/series`` and the like, one per
        parent row of a drill-down), whose first page goes alone. A needed
        page's failure is raised here, after the pages before it were added, exactly
        as if it had been asked in turn.
        """
        path, params = qido_request(query)
        what = f"QIDO-RS search for {_LEVEL_NAMES[query.level]}"

        def ask(at: int, inline: bool = False) -> tuple[int, _Prefetch]:
            return at, _Prefetch(self._page_at, path, params, at, what, inline=inline)

        offset, step = 0, self._page
        # Below one parent (a study's series, a series' instances: a drill-down asks
        # one such search per parent row) an answer seldom fills a page, and a second
        # request for each would cost more than it saves: the first page goes alone.
        below_parent = path.count("/") > 1
        ahead = None if below_parent else ask(step)
        # The first page on this thread (nothing is typed while it comes), the one
        # ahead already on its own: no thread is started for a search below a parent.
        current = ask(0, inline=True)
        # The previous page's first match and whether it held more rows than asked: a
        # server that ignores offset answers every page with the same matches.
        first: Any = None
        over = False
        try:
            # Bounded: every turn types at least one new row from a larger offset, or
            # returns (a server that ignores offset is caught by its repeated page).
            while True:
                response = current[1].result()
                more = bool(_WARNING_MORE.search(response.headers.get("Warning", "")))
                objects = self._objects(response, what)
                count = len(objects)
                if more and count == 0:
                    return (
                        "its Warning header says more results can be requested, but asking "
                        f"from offset={offset} returned none"
                    )
                if count and first is not None and objects[0] == first:
                    if over:  # it ignores limit and offset: the page before was all
                        return None
                    return (
                        f"it answered offset={offset} with the matches it sent before (it "
                        "ignores offset, so an answer larger than one page cannot be paged)"
                    )
                first = objects[0] if count else None
                over = count > self._page
                goes_on = count > 0 and (more or count >= step)
                if goes_on:
                    if more and count < step:  # the server's own maximum, announced
                        step = count
                    at = offset + count
                    if ahead is not None and ahead[0] == at:
                        current, ahead = ahead, ask(at + step)
                    else:  # asked from elsewhere: abandoned
                        current, ahead = ask(at), ask(at + step)
                skipped = sum(not builder.add_json(obj) for obj in objects)
                if skipped:
                    warnings.warn(
                        f"{skipped} match(es) of the {what} at {self.url} are not JSON "
                        "objects and are missing from the frame; the server sent malformed "
                        "data.",
                        frames.MalformedValueWarning,
                        stacklevel=10,
                    )
                offset += count
                if not goes_on:
                    return None  # the request ahead is abandoned
                builder.settle()  # typed now, while the server works on the next page
        except HTTPError as exc:
            if exc.status != 413:
                raise
            # "Payload too large": the server refuses an answer this big, as
            # dcm4chee-arc does over DIMSE; the query is split like a capped one.
            return (
                f"it refused with HTTP 413 ({exc.comment or 'answer too large'}) after "
                f"{offset} match(es)"
            )

    def _page_at(
        self, path: str, params: dict[str, str], offset: int, what: str
    ) -> requests.Response:
        """One page of a QIDO-RS search: ``_page`` rows (``limit``) from ``offset``."""
        page = {**params, "limit": str(self._page)}
        if offset:
            page["offset"] = str(offset)
        return self.transport.request(
            "GET", path, params=page, headers={"Accept": _JSON}, what=what
        )

    def _objects(self, response: requests.Response, what: str) -> list[Any]:
        """The matches of one page: its DICOM JSON objects (nothing for a 204 or no body)."""
        body = response.content
        if response.status_code == 204 or not body or body.isspace():
            return []
        try:
            objects = response.json()
        except ValueError:
            raise ProtocolError(
                f"{self.url} answered the {what} with a body that is not DICOM JSON "
                f"(Content-Type {response.headers.get('Content-Type', 'none')!r}); "
                "check that the URL is the DICOMweb service root."
            ) from None
        if isinstance(objects, dict):
            objects = [objects]
        if not isinstance(objects, list):
            raise ProtocolError(
                f"{self.url} answered the {what} with JSON that is not a list of "
                "matches; check that the URL is the DICOMweb service root."
            )
        return objects

    def _find_patients(self, query: Query, progress: bool) -> pd.DataFrame:
        # Matching on the counts is not possible over a study search: refuse it.
        counted = [k for k in query.matching if k in _PATIENT_COUNTS]
        if counted:
            raise QueryError(
                f"{counted[0]} cannot be matched over DICOMweb (patients are counted from "
                "a study search); filter the frame with pandas instead."
            )
        patient_columns = [c for c in query.columns if c not in _PATIENT_COUNTS]
        studies = build_query(
            "STUDY",
            "study",
            {k: v for k, v in query.matching.items() if k not in _PATIENT_COUNTS},
            [
                *patient_columns,
                "NumberOfStudyRelatedSeries",
                "NumberOfStudyRelatedInstances",
            ],
            defaults=False,
        )
        found = self._collect(studies, None, progress)
        return _patients_from_studies(found, query, self.peer)


def qido_request(query: Query) -> tuple[str, dict[str, str]]:
    """The QIDO-RS path and query parameters (without paging) for ``query``.

    Examples
    --------
    >>> q = build_query("series", keys={"StudyInstanceUID": "1.2", "Modality": "CT"})
    >>> path, params = qido_request(q)
    >>> path, params["Modality"], params["includefield"].split(",")[:2]
    ('/studies/1.2/series', 'CT', ['SeriesInstanceUID', 'SeriesNumber'])
    """
    params: dict[str, str] = {}
    matching = dict(query.matching)

    def single(key: str) -> str | None:
        value = matching.get(key, "")
        if value and "\\" not in value and "*" not in value and "?" not in value:
            return value
        return None

    study, series = single("StudyInstanceUID"), single("SeriesInstanceUID")
    if query.level == "SERIES" and study:
        path = f"/studies/{study}/series"
        matching.pop("StudyInstanceUID")
    elif query.level == "IMAGE" and study and series:
        path = f"/studies/{study}/series/{series}/instances"
        matching.pop("StudyInstanceUID")
        matching.pop("SeriesInstanceUID")
    elif query.level == "IMAGE" and study:
        path = f"/studies/{study}/instances"
        matching.pop("StudyInstanceUID")
    else:
        path = "/" + _LEVEL_NAMES[query.level]
    for key, value in matching.items():
        attr = frames.attribute(key)
        params[key] = value.replace("\\", ",") if attr.vr == "UI" else value
    include = [k for k in query.columns if k not in query.matching]
    if include:
        params["includefield"] = ",".join(include)
    return path, params


def _patients_from_studies(
    studies: pd.DataFrame, query: Query, peer: dict[str, Any]
) -> pd.DataFrame:
    """One row per patient of a study frame, typed as a PATIENT-level C-FIND frame."""
    typed = frames.FrameBuilder(query.columns).frame()
    identity = [c for c in ("PatientID", "IssuerOfPatientID") if c in query.columns]
    if studies.empty:
        out = typed
    else:
        keys = studies[identity].astype(object).where(studies[identity].notna(), "")
        group = keys.apply(tuple, axis=1)
        rows: list[dict[str, Any]] = []
        for _, members in studies.groupby(group, sort=False):
            row: dict[str, Any] = {}
            for column in query.columns:
                if column == "NumberOfPatientRelatedStudies":
                    row[column] = members["StudyInstanceUID"].nunique()
                elif column in _PATIENT_COUNTS:
                    source = members[_PATIENT_COUNTS[column]]
                    row[column] = pd.NA if source.isna().all() else int(source.sum())
                else:
                    values = members[column].dropna()
                    row[column] = values.iloc[0] if len(values) else None
            rows.append(row)
        out = pd.DataFrame(rows, columns=query.columns)
        for column in query.columns:
            if typed[column].dtype != object:
                out[column] = out[column].astype(typed[column].dtype)
            else:
                out[column] = [v if isinstance(v, list) else [] for v in out[column]]
    out.attrs["pacsframe"] = {
        **query.to_json(),
        "peer": peer,
        "requests": studies.attrs.get("pacsframe", {}).get("requests", 0),
        "split": studies.attrs.get("pacsframe", {}).get("split", False),
    }
    return out


class _Prefetch:
    """One call run on a daemon thread (or here, ``inline``): :meth:`result` returns it
    or raises its error.

    The thread runs in a copy of the caller's context, so the call's ``timeout=``
    (:class:`~pacsframe.deadline.Deadline`) bounds it as it bounds the caller. A
    call nobody takes (an abandoned page ahead, or the caller failed first) is
    simply dropped: its result and its error are never raised, the daemon thread
    never holds up the interpreter's exit, and a response is read whole (not
    streamed), so its connection goes back to the pool even then.
    """

    def __init__(self, call: Any, *args: Any, inline: bool = False) -> None:
        self._done = threading.Event()
        self._value: Any = None
        self._error: BaseException | None = None
        context = contextvars.copy_context()

        def run() -> None:
            try:
                self._value = context.run(call, *args)
            except BaseException as exc:  # handed to the caller by result()
                self._error = exc
            finally:
                self._done.set()

        if inline:
            run()  # its error, too, is raised by result(), as from a thread
        else:
            threading.Thread(target=run, name="pacsframe-qido-next-page", daemon=True).start()

    def result(self) -> Any:
        """Wait for the call; its return value, or its exception raised here."""
        self._done.wait()
        if self._error is not None:
            error, self._error = self._error, None
            raise error
        return self._value
