"""An overall time limit for one public call: ``timeout=`` on echo, find*, get, move, store.

Each association's timeouts bound one wait (``acse_timeout`` for the
association, ``dimse_timeout`` for each response), so a peer that answers
every match or sub-operation just inside ``dimse_timeout`` keeps a call alive
for ever. A :class:`Deadline` bounds the whole call, whatever it does inside:
the associations it opens (their connect and negotiation waits are capped by
the time left), drill-downs over many parents, split queries, planning
listings and parallel C-GET workers.

The deadline of the running call is a context variable, so code deep inside a
call (another ``find`` made to plan a retrieval, a worker thread started with a
copy of the context) shares it without passing it along; a nested call with no
``timeout=`` of its own inherits it.

The deadline is enforced where the waiting happens, in the calling thread:
``PACS.session`` makes ``Deadline.end`` the association's ``limit``
(:class:`pacsframe.net.driver.BlockingAssociation`). When it passes, pacsframe's
engine sends a C-CANCEL where DIMSE has one (C-FIND, C-GET, C-MOVE) and, if
the peer does not end the operation within a short grace, an A-ABORT; it
aborts a C-ECHO or C-STORE at once. It then raises
:class:`~pacsframe.net.driver.LimitReached`, which :func:`timed_out` turns into
:meth:`Deadline.error`, an :class:`~pacsframe.errors.AssociationError` with
``reason="timeout"`` that the call completes with what it obtained
(``.partial`` or ``.result``).
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
import math
import time
from collections.abc import Iterator
from typing import Any

from .errors import AssociationError, QueryError

__all__ = [
    "Deadline",
    "check_timeout",
    "deadline_for",
    "fired",
    "is_timeout",
    "timed_out",
]

LOGGER = logging.getLogger("pacsframe")

_CURRENT: contextvars.ContextVar[Deadline | None] = contextvars.ContextVar(
    "pacsframe_deadline", default=None
)


def check_timeout(timeout: Any) -> float | None:
    """``timeout`` as seconds, or None; a QueryError for anything else.

    >>> check_timeout(None), check_timeout(2)
    (None, 2.0)
    >>> check_timeout(0)
    Traceback (most recent call last):
    ...
    pacsframe.errors.QueryError: timeout=0 must be a positive number of seconds for the whole \
call, or None for no overall limit.
    """
    if timeout is None:
        return None
    if (
        isinstance(timeout, bool)
        or not isinstance(timeout, (int, float))
        or not math.isfinite(timeout)
        or timeout <= 0
    ):
        raise QueryError(
            f"timeout={timeout!r} must be a positive number of seconds for the whole call, "
            "or None for no overall limit."
        )
    return float(timeout)


class Deadline:
    """The end of one public call's time: ``timeout`` seconds after it started.

    Attributes
    ----------
    timeout : float
        The limit given, in seconds.
    call : str
        The public method it limits (``"find_series"``), for messages.
    fired : bool
        The time ran out and pacsframe acted on it (cancelled, aborted, or
        refused to start another request). A call checks this, not the clock,
        to tell the deadline's doing from another failure.
    action : str or None
        What ended the operation in flight: ``"cancelled"`` or ``"aborted"``.
    """

    def __init__(self, timeout: float, call: str) -> None:
        self.timeout = timeout
        self.call = call
        self.end = time.monotonic() + timeout
        self.fired = False
        self.action: str | None = None

    @staticmethod
    def current() -> Deadline | None:
        """The deadline of the call running in this context, if it has one."""
        return _CURRENT.get()

    def remaining(self) -> float:
        """Seconds left (0 when the time is up)."""
        return max(0.0, self.end - time.monotonic())

    @property
    def expired(self) -> bool:
        """Whether the time is up."""
        return time.monotonic() >= self.end

    def cap(self, seconds: float) -> float:
        """``seconds``, or the time left when that is shorter (a wait never outlasts the call)."""
        return max(0.001, min(seconds, self.end - time.monotonic()))

    def check(self, doing: str, advice: str = "") -> None:
        """Raise the timeout error before starting ``doing`` when the time is up.

        An ``advice`` given here is kept when the call remakes the error.
        """
        if self.expired:
            self.fired = True
            error = self.error(doing, advice)
            error.advice = advice  # type: ignore[attr-defined]
            raise error

    def error(self, doing: str, advice: str = "") -> AssociationError:
        """The AssociationError (``reason="timeout"``) for a call stopped during ``doing``."""
        if self.action == "cancelled":
            how = f"pacsframe cancelled the {doing} in progress (C-CANCEL)"
        elif self.action == "aborted":
            how = f"pacsframe aborted the association during the {doing}"
        else:
            how = f"the time ran out during the {doing}"
        advice = advice or "Raise timeout= (None: no overall limit), or ask for less at a time."
        # "find_studies" is a PACS call; a DICOMweb call names itself ("web.find_studies").
        name = self.call if "." in self.call else f"pacs.{self.call}"
        exc = AssociationError(
            f"{name}() did not finish within timeout={self.timeout:g} s; {how}. {advice}",
            reason="timeout",
        )
        exc.deadline = self  # type: ignore[attr-defined]
        exc.doing = doing  # type: ignore[attr-defined]
        return exc


@contextlib.contextmanager
def deadline_for(timeout: Any, call: str) -> Iterator[Deadline | None]:
    """Validate ``timeout`` and make it the deadline of everything run inside.

    A call inside another call's deadline shares it (the error then names the
    outer call), unless its own ``timeout`` ends sooner.
    """
    seconds = check_timeout(timeout)
    outer = _CURRENT.get()
    if seconds is None or (outer is not None and outer.end <= time.monotonic() + seconds):
        yield outer
        return
    deadline = Deadline(seconds, call)
    token = _CURRENT.set(deadline)
    try:
        yield deadline
    finally:
        _CURRENT.reset(token)


@contextlib.contextmanager
def deadline_scope(deadline: Deadline | None) -> Iterator[Deadline | None]:
    """Make ``deadline`` (another process's, unpickled) the current one inside.

    For a worker process (:mod:`pacsframe.workers`): ``Deadline.end`` is on the
    system-wide monotonic clock, so it means the same moment there.
    """
    token = _CURRENT.set(deadline)
    try:
        yield deadline
    finally:
        _CURRENT.reset(token)


def fired(deadline: Deadline | None) -> bool:
    """Whether ``deadline`` exists and has acted."""
    return deadline is not None and deadline.fired


def is_timeout(exc: BaseException) -> bool:
    """Whether ``exc`` is a deadline's own error."""
    return getattr(exc, "deadline", None) is not None


def timed_out(
    deadline: Deadline | None, exc: BaseException, doing: str, advice: str = ""
) -> BaseException:
    """``exc``, or the deadline's error in its place when the deadline caused it.

    Raise what this returns. A failure that follows the deadline's cancel or abort
    (a "cancelled" status, a lost association) becomes the timeout error, with
    the failure as its cause; an error the deadline raised itself is remade with
    the call's ``advice``; anything else is returned as it is.
    """
    if deadline is not None and getattr(exc, "action", None) in _LIMIT_ACTIONS:
        # pacsframe's engine enforced the deadline where it waited, in the calling
        # thread (pacsframe.net.driver.LimitReached): it cancelled or aborted.
        deadline.fired = True
        if exc.action != "none":  # type: ignore[attr-defined]
            deadline.action = exc.action  # type: ignore[attr-defined]
    if deadline is None or not deadline.fired or not isinstance(exc, Exception):
        return exc
    cause = exc
    if is_timeout(exc):
        doing = getattr(exc, "doing", doing)
        advice = getattr(exc, "advice", "") or advice
        cause = exc.__cause__  # type: ignore[assignment]
    new = deadline.error(doing, advice)
    new.__cause__ = cause
    return new


_LIMIT_ACTIONS = frozenset({"cancelled", "aborted", "none"})
