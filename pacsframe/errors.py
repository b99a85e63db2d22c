"""The exception hierarchy, and the warnings a retrieval gives.

Every error pacsframe raises derives from :class:`PacsFrameError`, and every
message says what was wrong and what to do about it.
"""

from __future__ import annotations

from typing import Any

__all__ = [
    "AssociationError",
    "CacheError",
    "CountMismatchWarning",
    "DimseError",
    "HTTPError",
    "MoveDestinationUnknown",
    "MultipartError",
    "NotSupported",
    "PacsFrameError",
    "ProtocolError",
    "QueryError",
    "ResultsCapped",
    "UnusableListingWarning",
]


class PacsFrameError(Exception):
    """Base class of every pacsframe error."""


class QueryError(PacsFrameError, ValueError):
    """Input rejected before anything was sent to the peer."""


class ResultsCapped(QueryError):
    """The peer caps C-FIND answers, and no split of the query got under the cap.

    Raised after every window that could be asked was asked: ``partial`` holds all
    the rows obtained (typed, each once), which is not every match.

    Attributes
    ----------
    partial : pandas.DataFrame
        The rows obtained, as the find call would have returned them.
    window : str
        The first window still over the cap, e.g. ``"StudyDate=20260301
        StudyTime=0830-083059.999999"``.
    windows : list of str
        Every window still over the cap.
    cap : int or None
        The peer's cap, when known (``max_results``, or the count of an answer the
        peer flagged as cut short).
    """

    def __init__(self, message: str, *, partial: Any, windows: list[str], cap: int | None) -> None:
        super().__init__(message)
        self.partial = partial
        self.windows = list(windows)
        self.window = self.windows[0] if self.windows else ""
        self.cap = cap


class AssociationError(PacsFrameError, ConnectionError):
    """The association could not be made, was rejected, timed out or was aborted.

    Attributes
    ----------
    reason : str
        One of ``"refused"``, ``"timeout"``, ``"rejected"``, ``"aborted"``, or
        ``"tls"`` (the TLS handshake failed: an untrusted or wrong certificate, a
        missing client certificate, or TLS on one side only), or ``"auth"``
        (a DICOMweb server answered 401 or 403: credentials missing, wrong, or
        not allowed to use the service).
    partial : DataFrame
        Only when a find call's ``timeout=`` ran out: the rows received so far.
    result : RetrieveResult or StoreResult
        From ``get`` and ``move`` (any failure mid-way) and from ``store`` (its
        ``timeout=`` ran out): what was retrieved or stored.
    """

    def __init__(self, message: str, *, reason: str) -> None:
        super().__init__(message)
        self.reason = reason


class ProtocolError(AssociationError):
    """The peer broke the DICOM upper layer or DIMSE protocol (PS3.8, PS3.7).

    Raised by :mod:`pacsframe.net` for a malformed or unexpected PDU or command
    set: a truncated PDU, a length that overruns its data, an unknown PDU type, a
    PDU larger than the maximum we announced, a P-DATA-TF before the association
    was accepted, a fragment on a presentation context that was never accepted.
    The association cannot go on after it, so ``reason`` is ``"aborted"``: the
    driver sends an A-ABORT and closes the connection.

    Attributes
    ----------
    abort_reason : int
        The PS3.8 A-ABORT reason code that describes the fault (0 unspecified,
        1 unrecognized PDU, 2 unexpected PDU, 4 unrecognized PDU parameter,
        5 unexpected PDU parameter, 6 invalid PDU parameter value).
    """

    def __init__(self, message: str, *, abort_reason: int = 0) -> None:
        super().__init__(message, reason="aborted")
        self.abort_reason = abort_reason


class MultipartError(ProtocolError):
    """A DICOMweb peer's multipart/related body is malformed or was cut short.

    Raised by :mod:`pacsframe.multipart` for a WADO-RS answer that does not follow
    RFC 2046 as PS3.18 uses it: a Content-Type without a boundary, a body in which
    that boundary never appears (the peer sent another boundary, or no multipart
    body at all), part headers that never end, or a body that stops before the
    closing ``--boundary--`` (the connection dropped mid-transfer, or a proxy cut
    it short). The part being written when it happened is incomplete: it must be
    discarded, never cached. Like a dropped association, ``reason`` is
    ``"aborted"``; running the retrieval again fetches what is missing.
    """


class DimseError(PacsFrameError):
    """The peer answered a DIMSE request with a failure status.

    Attributes
    ----------
    status : int
        The DIMSE status code, e.g. ``0xC000``.
    comment : str or None
        The peer's Error Comment, when it sent one.
    """

    def __init__(self, message: str, *, status: int, comment: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.comment = comment


class HTTPError(DimseError):
    """A DICOMweb server answered with an HTTP failure pacsframe has no closer error for.

    401/403 are an :class:`AssociationError` (``reason="auth"``) and 404/405/501
    a :class:`NotSupported`; any other status of 400 or more is this.

    Attributes
    ----------
    status : int
        The HTTP status code, e.g. ``500``.
    comment : str or None
        The first line of the response body (at most about 200 characters).
    """


class MoveDestinationUnknown(DimseError):
    """The peer does not know the C-MOVE destination AE title."""


class NotSupported(DimseError):
    """The peer accepted none of the presentation contexts the operation needs."""


class CacheError(PacsFrameError):
    """The on-disk cache refused an operation or was found inconsistent."""


class UnusableListingWarning(UserWarning):
    """A listing the peer answered only to plan a retrieval could not be trusted.

    The listing (a study's series, to spread the work over ``workers``; what a
    partly cached series or study lacks) failed, was empty, lacked unique keys or
    disagreed with the peer's own counts. The unit was requested whole instead,
    so nothing is missing because of it; objects already cached that arrived
    again count as ``cached``. ``RetrieveResult.notes`` says which unit and why.
    """


class CountMismatchWarning(UserWarning):
    """What arrived differs from the number of objects the peer announced.

    The announced number is the frame's ``NumberOf*RelatedInstances`` or, without
    one, the sub-operation counts of the peer's first pending C-GET/C-MOVE
    response. ``RetrieveResult.expected`` and ``.shortfall`` give the totals, and
    ``.notes`` names each request that came up short (or long).
    """


class UnreadableFileWarning(UserWarning):
    """Some files given to :func:`pacsframe.read_headers` could not be read.

    One warning per call summarises them (how many, the first few); each is in
    the frame's ``attrs["pacsframe"]["errors"]`` as ``{"path": ..., "error": ...}``.
    Such a file (truncated, a ``.dcm`` that is not DICOM, an element whose declared
    length runs past the end of the file, a UID that is not a UID) has no row.
    """
