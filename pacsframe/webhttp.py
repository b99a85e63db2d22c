"""The HTTP transport of the DICOMweb client: one pooled ``requests.Session`` per peer.

:class:`WebTransport` is what QIDO-RS, WADO-RS and STOW-RS share: the service
root, the session (ours, or a caller's such as google-auth's
``AuthorizedSession``), bounded retries of idempotent requests, the call's
``timeout=`` (:class:`pacsframe.deadline.Deadline`), and the mapping of HTTP
failures to pacsframe's errors:

======================================  ==============================================
failure                                 error
======================================  ==============================================
connection refused, unknown host        ``AssociationError(reason="refused")``
connect or read timeout                 ``AssociationError(reason="timeout")``
TLS handshake, certificate              ``AssociationError(reason="tls")``
401, 403                                ``AssociationError(reason="auth")``
404, 405, 501                           ``NotSupported`` (or the response, with
                                        ``missing="return"``)
any other status >= 400                 :class:`~pacsframe.errors.HTTPError`
                                        (``.status``, ``.comment``)
======================================  ==============================================

Credentials (``auth``, an ``Authorization`` header, ``user:password@`` in the
URL, token-like query parameters) never appear in logs, reprs or messages, and
query values (patient identifiers) are never logged: a request is logged as its
method, its path without the query string, its status and its size.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Collection
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import requests
from requests.adapters import HTTPAdapter
from urllib3.util.retry import Retry

from .deadline import Deadline
from .errors import AssociationError, HTTPError, NotSupported, QueryError

__all__ = ["WebTransport", "redact"]

LOGGER = logging.getLogger("pacsframe")

#: Query parameters whose values are credentials, by name (case-insensitive).
_SECRET_PARAMS = re.compile(
    r"(^|_|-)(token|access_token|id_token|key|apikey|api_key|password|passwd|pwd|secret|"
    r"signature|sig|auth|authorization|credential|credentials|session)$",
    re.IGNORECASE,
)
_COMMENT_CHARS = 200
_MISSING = frozenset({404, 405, 501})


class _NoQueryStrings(logging.Filter):
    """Drop query strings (patient identifiers as QIDO-RS matching values) from urllib3's
    DEBUG lines (``"GET /studies?PatientID=... HTTP/1.1" 200``) and its retry notes."""

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.args, tuple) and record.args:
            record.args = tuple(
                _QUERY.sub("?...", a) if isinstance(a, str) else a for a in record.args
            )
        elif isinstance(record.msg, str) and "?" in record.msg:
            record.msg = _QUERY.sub("?...", record.msg)
        return True


_QUERY = re.compile(r"\?[^\s\"']*")
for _name in ("urllib3.connectionpool", "urllib3.util.retry"):
    _logger = logging.getLogger(_name)
    if not any(isinstance(f, _NoQueryStrings) for f in _logger.filters):
        _logger.addFilter(_NoQueryStrings())


def redact(url: str) -> str:
    """``url`` without ``user:password@`` and with credential-like query values hidden.

    >>> redact("https://bob:secret@host:8443/dicom-web?access_token=abc&limit=5")
    'https://host:8443/dicom-web?access_token=***&limit=5'
    >>> redact("http://127.0.0.1/wado")
    'http://127.0.0.1/wado'
    """
    try:
        parts = urlsplit(url)
    except ValueError:
        return "<an unreadable URL>"
    netloc = parts.netloc.rpartition("@")[2]
    query = parts.query
    if query:
        pairs = parse_qsl(query, keep_blank_values=True)
        query = urlencode(
            [(k, "***" if _SECRET_PARAMS.search(k) else v) for k, v in pairs], safe="*,"
        )
    return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))


def _first_line(text: str) -> str:
    for line in text.splitlines():
        line = line.strip()
        if line:
            return line[:_COMMENT_CHARS] + ("..." if len(line) > _COMMENT_CHARS else "")
    return ""


def _scrub(text: str, secrets: list[str]) -> str:
    for secret in secrets:
        if secret:
            text = text.replace(secret, "***")
    return text


class WebTransport:
    """HTTP to one DICOMweb service root, with pacsframe's errors and deadlines.

    Parameters
    ----------
    url : str
        The service root, e.g. ``https://archive.example/dicom-web``. A
        ``user:password@`` in it becomes HTTP basic auth (unless ``auth`` is given)
        and is stripped from :attr:`base`.
    auth : tuple or requests auth, optional
        ``(user, password)`` for basic auth, or any ``requests`` auth object.
    headers : mapping, optional
        Headers sent with every request (e.g. ``{"Authorization": "Bearer ..."}``).
    session : requests.Session, optional
        A session to use as given (e.g. ``google.auth.transport.requests.
        AuthorizedSession``); pacsframe then mounts no adapter of its own and does
        not close it.
    verify : bool or str
        TLS certificate check: True, False, or a CA bundle path.
    timeout : float or (float, float)
        Seconds to connect and to wait for data (one number: both).
    pool : int
        Connections kept per host (size it for the parallel workers).
    """

    def __init__(
        self,
        url: str,
        *,
        auth: Any = None,
        headers: Any = None,
        session: requests.Session | None = None,
        verify: Any = True,
        timeout: float | tuple[float, float] = (10.0, 60.0),
        pool: int = 8,
    ) -> None:
        if not isinstance(url, str) or not url.strip():
            raise QueryError(
                f"url must be the DICOMweb service root (http[s]://...), not {url!r}."
            )
        try:
            parts = urlsplit(url.strip())
            parts.port  # noqa: B018  (raises ValueError for a bad port)
        except ValueError:
            raise QueryError(
                f"url {redact(url)!r} is not a valid URL; give the DICOMweb service root, "
                "e.g. https://archive.example/dicom-web."
            ) from None
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise QueryError(
                f"url {redact(url)!r} must start with http:// or https:// and name a host, "
                "e.g. https://archive.example/dicom-web."
            )
        self._secrets: list[str] = []
        if parts.username is not None or parts.password is not None:
            from urllib.parse import unquote

            user, password = unquote(parts.username or ""), unquote(parts.password or "")
            if auth is None:
                auth = (user, password)
            self._secrets += [parts.password or "", password]
        netloc = parts.netloc.rpartition("@")[2]
        self.base = urlunsplit((parts.scheme, netloc, parts.path.rstrip("/"), "", ""))
        if parts.query:
            self.base += "?" + parts.query  # kept (a signed root), but never shown
        self._shown_base = redact(self.base)
        if isinstance(auth, tuple) and len(auth) == 2:
            self._secrets.append(str(auth[1]))
        self.auth = auth
        self.headers = dict(headers or {})
        for name, value in self.headers.items():
            if name.lower() in ("authorization", "proxy-authorization", "cookie", "x-api-key"):
                self._secrets.append(str(value))
                self._secrets.append(str(value).partition(" ")[2])
        self._secrets = sorted({s for s in self._secrets if len(s) >= 3}, key=len, reverse=True)
        if isinstance(timeout, (int, float)) and not isinstance(timeout, bool):
            timeout = (float(timeout), float(timeout))
        if (
            not isinstance(timeout, tuple)
            or len(timeout) != 2
            or not all(isinstance(t, (int, float)) and t > 0 for t in timeout)
        ):
            raise QueryError(
                f"timeout={timeout!r} must be positive seconds, or (connect, read) seconds."
            )
        self.timeout = (float(timeout[0]), float(timeout[1]))
        self.verify = verify
        self._pool = pool
        self._own_session = session is None
        self.session = session if session is not None else self._new_session(pool)

    @staticmethod
    def _new_session(pool: int) -> requests.Session:
        """pacsframe's own session: pooled connections, bounded retries of idempotent requests."""
        session = requests.Session()
        retry = Retry(
            total=3,
            connect=2,
            read=0,
            status=2,
            backoff_factor=0.2,
            status_forcelist=(502, 503, 504),
            allowed_methods=frozenset({"GET", "HEAD", "OPTIONS"}),
            raise_on_status=False,
            respect_retry_after_header=True,
        )
        adapter = HTTPAdapter(pool_connections=pool, pool_maxsize=pool, max_retries=retry)
        session.mount("http://", adapter)
        session.mount("https://", adapter)
        session.trust_env = True
        return session

    def portable(self) -> bool:
        """Whether this transport can cross to a worker process (:meth:`__getstate__`)."""
        return self._own_session

    def __getstate__(self) -> dict[str, Any]:
        """Settings only (a worker process opens its own connections): URL, auth,
        headers, verify, timeout. A session the caller gave cannot cross."""
        if not self._own_session:
            raise TypeError(
                "a WebTransport with a caller's session= cannot be pickled (the session "
                "holds live connections and its own credentials); use it in this process."
            )
        state = dict(vars(self))
        state.pop("session", None)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        vars(self).update(state)
        self.session = self._new_session(self._pool)

    def __repr__(self) -> str:
        return f"WebTransport({self._shown_base!r})"

    def close(self) -> None:
        """Close the session's connections (a session given by the caller is left open)."""
        if self._own_session:
            self.session.close()

    # --- requests --------------------------------------------------------------------

    def request(
        self,
        method: str,
        path: str,
        *,
        params: Any = None,
        headers: Any = None,
        data: Any = None,
        stream: bool = False,
        what: str,
        missing: str = "notsupported",
        returned: Collection[int] = (),
    ) -> requests.Response:
        """Send one request to ``base + path``; pacsframe's error for any failure.

        Parameters
        ----------
        method, path : str
            E.g. ``"GET"``, ``"/studies"``.
        params, headers, data, stream
            As for ``requests``; ``headers`` add to the transport's own.
        what : str
            What the request does, for messages (``"QIDO-RS search for studies"``).
        missing : {"notsupported", "return"}
            404/405/501: raise :class:`NotSupported` (the service is absent), or
            return the response for the caller to judge (an unknown UID).
        returned : collection of int
            Failure statuses (>= 400) returned with their body instead of raised: the
            caller reads the body (STOW-RS's 400 and 409 name each failed object in
            DICOM JSON) and may raise :meth:`error` itself. 401/403 always raise.
        """
        deadline = Deadline.current()
        timeout: tuple[float, float] = self.timeout
        if deadline is not None:
            deadline.check(what)
            timeout = (deadline.cap(timeout[0]), deadline.cap(timeout[1]))
        url = self.base + path if "?" not in self.base else _join(self.base, path)
        shown_path = urlsplit(self.base + path).path if "?" not in self.base else path
        merged = {**self.headers, **(headers or {})}
        started = time.monotonic()
        try:
            response = self.session.request(
                method,
                url,
                params=params,
                headers=merged,
                data=data,
                stream=stream,
                auth=self.auth,
                verify=self.verify,
                timeout=timeout,
            )
        except requests.exceptions.RequestException as exc:
            raise self._failure(exc, what, deadline) from None
        size = response.headers.get("Content-Length", "?" if stream else len(response.content))
        LOGGER.info(
            "HTTP %s %s: %d, %s bytes, %.3f s",
            method,
            shown_path,
            response.status_code,
            size,
            time.monotonic() - started,
        )
        status = response.status_code
        if status < 400:
            return response
        if status in _MISSING and missing == "return":
            return response
        if status in returned and status not in (401, 403):
            if not stream:
                response.content  # noqa: B018  (read now: the caller has the body)
            return response
        raise self.error(response, what, stream=stream)

    def error(self, response: requests.Response, what: str, *, stream: bool = False) -> Exception:
        """pacsframe's error for a failure ``response`` (status >= 400) to the ``what``.

        ``AssociationError(reason="auth")`` for 401/403, :class:`NotSupported` for
        404/405/501, else :class:`HTTPError` with the status and the body's first
        line (credentials scrubbed). A streamed body is read for at most 4 KiB and
        the response closed.

        Examples
        --------
        >>> answer = requests.Response()
        >>> answer.status_code, answer.reason, answer.url = 409, "Conflict", "http://h/studies"
        >>> answer._content = b"no study 1.2.3 here"
        >>> error = WebTransport("http://h").error(answer, "STOW-RS of 1 object(s)")
        >>> type(error).__name__, error.status, error.comment
        ('HTTPError', 409, 'no study 1.2.3 here')
        """
        status = response.status_code
        shown_path = urlsplit(response.url or "").path or "/"
        merged = {**self.headers, **dict(getattr(response.request, "headers", None) or {})}
        try:
            body = (
                response.text if not stream else response.raw.read(4096).decode("utf-8", "replace")
            )
        except Exception:  # a body we cannot read adds nothing to the message
            body = ""
        finally:
            if stream:
                response.close()
        comment = _scrub(_first_line(body), self._secrets)
        said = f" The server says: {comment}" if comment else ""
        reason = _scrub(response.reason or "", self._secrets)
        if status in (401, 403):
            advice = (
                "check the credentials (auth=, headers=, or the session's) and that this "
                "user may use the service."
                if self.auth is not None or self.session.auth is not None or _has_auth(merged)
                else "the service needs credentials: pass auth=(user, password), "
                "headers={'Authorization': ...}, or an authorized session=."
            )
            return AssociationError(
                f"{self._shown_base} refused the {what} with HTTP {status} {reason}: "
                f"{advice}{said}",
                reason="auth",
            )
        if status in _MISSING:
            return NotSupported(
                f"{self._shown_base} does not offer the {what} (HTTP {status} {reason} for "
                f"{shown_path}): check that the URL is the DICOMweb service root (e.g. "
                f"ending in /dicom-web) and that the archive enables this service.{said}",
                status=status,
                comment=comment or None,
            )
        if status == 413:
            advice = "ask for less at a time (a narrower query, fewer objects per request)."
        elif status >= 500:
            advice = "the server failed; try again later, or check the server's log."
        else:
            advice = "check the request's keys and values against what the server supports."
        return HTTPError(
            f"{self._shown_base} answered the {what} with HTTP {status} {reason}: {advice}{said}",
            status=status,
            comment=comment or None,
        )

    def _failure(
        self, exc: requests.exceptions.RequestException, what: str, deadline: Deadline | None
    ) -> Exception:
        text = _scrub(redact(str(exc)), self._secrets)
        if isinstance(exc, requests.exceptions.SSLError) or "CERTIFICATE" in text.upper():
            return AssociationError(
                f"the TLS handshake with {self._shown_base} failed during the {what}: check "
                "the server's certificate, or pass verify='ca.pem' (a CA bundle); "
                f"verify=False turns the check off. ({_short(text)})",
                reason="tls",
            )
        if isinstance(exc, requests.exceptions.Timeout):
            if deadline is not None and deadline.remaining() <= 0.01:
                deadline.fired = True
                return deadline.error(what)
            return AssociationError(
                f"{self._shown_base} did not answer the {what} within the transport's "
                f"timeout of {self.timeout[0]:g} s to connect / {self.timeout[1]:g} s to "
                "read: check the server, or raise timeout=.",
                reason="timeout",
            )
        if isinstance(exc, requests.exceptions.ConnectionError):
            if deadline is not None and deadline.expired:
                deadline.fired = True
                return deadline.error(what)
            inner = _root(exc)
            if isinstance(inner, (TimeoutError,)) or "timed out" in text.lower():
                return AssociationError(
                    f"{self._shown_base} did not answer the {what} in time: check the "
                    "server, or raise timeout=.",
                    reason="timeout",
                )
            return AssociationError(
                f"could not connect to {self._shown_base} for the {what}: check the URL "
                f"(host, port, http/https) and that the server is running. ({_short(text)})",
                reason="refused",
            )
        return AssociationError(
            f"the {what} to {self._shown_base} failed: {_short(text)}", reason="aborted"
        )


def _root(exc: BaseException) -> BaseException:
    seen = set()
    while exc.__context__ is not None and id(exc) not in seen:
        seen.add(id(exc))
        nxt = exc.__cause__ or exc.__context__
        if nxt is None:
            break
        exc = nxt
    return exc


def _short(text: str) -> str:
    return text if len(text) <= 300 else text[:300] + "..."


def _has_auth(headers: dict[str, Any]) -> bool:
    return any(k.lower() == "authorization" for k in headers)


def _join(base: str, path: str) -> str:
    """``base`` (with a query string) and ``path``: the path goes before the query."""
    head, _, query = base.partition("?")
    path_part, _, extra = path.partition("?")
    return f"{head}{path_part}?{query}" + (f"&{extra}" if extra else "")
