"""The exception hierarchy, and the warnings a retrieval gives.

Every error pacsframe raises derives from :class:`PacsFrameError`, and every
message says what was wrong and what to do about it.
"""

from __future__ import annotations

__all__ = [
    "AssociationError",
    "CacheError",
    "CountMismatchWarning",
    "DimseError",
    "MoveDestinationUnknown",
    "NotSupported",
    "PacsFrameError",
    "QueryError",
    "UnusableListingWarning",
]


class PacsFrameError(Exception):
    """Base class of every pacsframe error."""


class QueryError(PacsFrameError, ValueError):
    """Input rejected before anything was sent to the peer."""


class AssociationError(PacsFrameError, ConnectionError):
    """The association could not be made, was rejected, timed out or was aborted.

    Attributes
    ----------
    reason : str
        One of ``"refused"``, ``"timeout"``, ``"rejected"``, ``"aborted"``, or
        ``"tls"`` (the TLS handshake failed: an untrusted or wrong certificate, a
        missing client certificate, or TLS on one side only).
    """

    def __init__(self, message: str, *, reason: str) -> None:
        super().__init__(message)
        self.reason = reason


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
