"""Worker processes: parallel associations that escape the GIL.

pacsframe's engine is Python, and one interpreter runs one thread of Python at a
time: associations in threads overlap only their waits. A :class:`ProcessWorker`
runs one association in a child process and talks back over a pipe:

- the child sends messages (``link.send``) that a thread of the parent hands to
  ``on_message``, in order: rows, progress, ``on_received``, the end;
- the child asks (``link.ask``) and the parent's ``on_message`` answers: the next
  unit of work, so the one queue of work stays in the parent;
- :meth:`ProcessWorker.cancel` and :meth:`ProcessWorker.abort`, from any thread
  of the parent, reach the child as ``SIGUSR1``/``SIGUSR2``, whose handlers only
  set flags for the child's engine (``interrupt()``), which acts at its next read;
- exceptions cross as (class, args, attributes) and are rebuilt in the parent
  (:func:`portable`, :func:`restore`): pacsframe's errors take keyword arguments
  that plain pickling loses; log records of the ``pacsframe`` logger are handed
  to the parent's handlers.

Children are forked by pacsframe's worker server (:class:`_Server`), not from
the caller: a notebook kernel (or a program running several retrievals in
threads) has other threads, whose locks a plain fork copies mid-use. The server
starts once per session (about a second: it imports pacsframe's retrieval
code); each worker is then forked from it in milliseconds, already imported.
The child ignores ``SIGINT`` (Ctrl-C in a terminal reaches the whole process
group, and the parent decides: it cancels every child), dies with the server
(which ends with the caller), and exits with ``os._exit``.

Linux only (:func:`available`); elsewhere, or with
``PACSFRAME_WORKER_PROCESSES=0`` in the environment, callers use threads.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import logging
import multiprocessing.connection
import os
import pickle
import signal
import socket
import struct
import subprocess
import sys
import threading
from collections.abc import Callable
from typing import Any

__all__ = ["ChildLink", "ProcessWorker", "available", "portable", "restore", "warm"]

LOGGER = logging.getLogger("pacsframe")

#: Set to ``0`` to run parallel associations in threads instead of processes.
ENV_VAR = "PACSFRAME_WORKER_PROCESSES"

_CANCEL = signal.SIGUSR1 if hasattr(signal, "SIGUSR1") else None
_ABORT = signal.SIGUSR2 if hasattr(signal, "SIGUSR2") else None
_PR_SET_PDEATHSIG = 1  # linux/prctl.h


def available() -> bool:
    """Whether parallel associations run in worker processes here.

    Linux only (the fork server and ``prctl``, which ties a child's life to
    it). The environment variable ``PACSFRAME_WORKER_PROCESSES=0`` turns it off.

    Examples
    --------
    >>> isinstance(available(), bool)
    True
    """
    if os.environ.get(ENV_VAR, "").strip() in ("0", "false", "no", "off"):
        return False
    # The server runs sys.executable: an embedding may have none that runs Python.
    runnable = bool(sys.executable) and os.access(sys.executable, os.X_OK)
    return sys.platform.startswith("linux") and _CANCEL is not None and runnable


def portable(exc: BaseException) -> tuple[type[BaseException], tuple[Any, ...], dict[str, Any]]:
    """``exc`` as (class, args, attributes) that pickle; :func:`restore` rebuilds it.

    Attributes that do not pickle are left out; the chain (``__cause__``) is
    not carried: its text is in the message where it matters.

    Examples
    --------
    >>> from pacsframe.errors import AssociationError
    >>> back = restore(portable(AssociationError("lost", reason="aborted")))
    >>> type(back).__name__, str(back), back.reason
    ('AssociationError', 'lost', 'aborted')
    """
    state: dict[str, Any] = {}
    for key, value in vars(exc).items():
        try:
            pickle.dumps(value)
        except Exception:
            continue
        state[key] = value
    cls = type(exc)
    try:
        pickle.dumps(cls)
        args = exc.args
        pickle.dumps(args)
    except Exception:
        cls, args = RuntimeError, (f"{type(exc).__name__}: {exc}",)
    return cls, args, state


def restore(parts: tuple[type[BaseException], tuple[Any, ...], dict[str, Any]]) -> BaseException:
    """The exception :func:`portable` described."""
    cls, args, state = parts
    exc = cls.__new__(cls)
    exc.args = args
    with contextlib.suppress(AttributeError, TypeError):
        exc.__dict__.update(state)
    return exc


class ChildLink:
    """The child's end of the pipe, and the flags the parent's signals set.

    ``on_cancel``/``on_abort``: called from the signal handler (in the child's
    main thread, between two bytecodes): they must only set flags.
    """

    def __init__(self, conn: Any) -> None:
        self._conn = conn
        self.on_cancel: Callable[[], None] | None = None
        self.on_abort: Callable[[], None] | None = None
        self.cancelled = False
        self.aborted = False

    def send(self, *message: Any) -> None:
        """Pass ``message`` to the parent's ``on_message`` (which must not answer)."""
        self._conn.send(message)

    def ask(self, *message: Any) -> Any:
        """Pass ``message`` to the parent's ``on_message`` and return its answer."""
        self._conn.send(("?", *message))
        return self._conn.recv()

    def _signalled(self, signum: int, _frame: Any) -> None:
        if signum == _ABORT:
            self.aborted = True
            if self.on_abort is not None:
                self.on_abort()
        else:
            self.cancelled = True
            if self.on_cancel is not None:
                self.on_cancel()


class ProcessWorker:
    """A child process running ``target(link, *args)``, with a thread-like face.

    Parameters
    ----------
    name : str
        The process's name (and its pump thread's), for logs.
    target : callable
        A module-level function (it is pickled by name), run in the child with its
        :class:`ChildLink` and ``args``; its return value is ignored, an
        exception it raises reaches ``on_message`` as ``("crashed", portable(exc))``.
    args : tuple
        Picklable arguments for ``target``.
    on_message : callable
        Called in the parent, in order, with each tuple the child sends; for a
        tuple the child asked (``link.ask``), its return value is the answer.
        At the end it gets ``("ended",)`` once, whatever happened.

    Examples
    --------
    >>> from pacsframe.workers import ProcessWorker, available, _example_child
    >>> got = []
    >>> def parent(message):
    ...     got.append(message)
    ...     return 2 * message[2] if message[0] == "?" else None
    >>> worker = ProcessWorker("doc", _example_child, (21,), parent)
    >>> if available():
    ...     worker.start(); worker.join(60)
    ...     got[1:]
    ... else:
    ...     [('hello', 42), ('ended',)]
    [('hello', 42), ('ended',)]
    """

    def __init__(
        self,
        name: str,
        target: Callable[..., Any],
        args: tuple[Any, ...],
        on_message: Callable[[tuple[Any, ...]], Any],
    ) -> None:
        self.name = name
        self.target = target
        self.args = args
        self.on_message = on_message
        self._pid: int | None = None
        self._conn: Any = None
        self._pump: threading.Thread | None = None
        self._ended = threading.Event()
        self._ready = False
        self._pending: list[Any] = []  # signals asked for before the child could take them
        self._signal_lock = threading.Lock()

    # --- the parent -----------------------------------------------------------------------

    def start(self) -> None:
        """Start the child (forked by the worker server) and pass its messages on."""
        level = logging.getLogger(LOGGER.name).getEffectiveLevel()
        self._conn, self._pid = _server().launch(self.target, self.args, level)
        self._pump = threading.Thread(target=self._run_pump, name=f"{self.name}-pump", daemon=True)
        self._pump.start()

    def _run_pump(self) -> None:
        conn = self._conn
        try:
            while True:
                try:
                    message = conn.recv()
                except (EOFError, OSError):
                    break
                kind = message[0]
                if kind == "log":
                    _log_in_parent(message[1])
                    continue
                if kind == "ready":
                    self._now_ready()
                    continue
                answer = self.on_message(message)
                if kind == "?":
                    try:
                        conn.send(answer)
                    except OSError:
                        break
        finally:
            conn.close()
            with self._signal_lock:
                self._ended.set()  # no signal from now on: the pid may be reused
            self.on_message(("ended",))

    def _now_ready(self) -> None:
        with self._signal_lock:
            self._ready = True
            pending, self._pending = self._pending, []
        for signum in pending:
            self._signal(signum)

    def is_alive(self) -> bool:
        """Whether the child runs or its last messages are still being passed on."""
        return self._pid is not None and not self._ended.is_set()

    def join(self, timeout: float | None = None) -> None:
        """Wait for the child to end and its messages to be passed on."""
        if self._pump is not None:
            self._pump.join(timeout)

    def _signal(self, signum: Any) -> None:
        with self._signal_lock:
            if self._ended.is_set() or self._pid is None:
                return
            if not self._ready:
                # Its handlers are not set yet: the default action would kill it.
                self._pending.append(signum)
                return
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(self._pid, signum)

    def cancel(self) -> None:
        """Ask the child to cancel (its ``link.on_cancel``); safe from any thread."""
        self._signal(_CANCEL)

    def abort(self) -> None:
        """Ask the child to abort (its ``link.on_abort``); safe from any thread."""
        self._signal(_ABORT)


class _Server:
    """The worker server: a clean, single-threaded process that forks the workers.

    Forking the caller itself would copy its other threads' locks mid-use (a
    notebook kernel has several, IPython's history thread writes SQLite; a child
    was seen hung on SQLite's allocator mutex). multiprocessing's fork server
    would re-run a user's script in every child (its ``__main__``), which a
    script without an ``if __name__ == "__main__":`` guard cannot survive. So
    the caller starts this server once per session (``python -c`` importing
    pacsframe's retrieval code, about a second, overlapped with the planning
    C-FINDs by :func:`warm`), and asks it for each worker: a request carries the
    pickled target and arguments and, over ``SCM_RIGHTS``, the child's end of a
    fresh socket pair; the server forks, answers the child's pid, and the child
    runs the target. The server ends when the caller's end of its socket closes
    (the caller exited or died); its children die with it (``prctl``).
    """

    def __init__(self) -> None:
        self.pid = os.getpid()  # whose server this is: a forked caller needs its own
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        env = dict(os.environ)
        # The caller's import path (an uninstalled checkout, a notebook's sys.path).
        env["PYTHONPATH"] = os.pathsep.join(p for p in sys.path if p)
        self.process = subprocess.Popen(
            [
                sys.executable,
                "-c",
                f"from pacsframe.workers import _serve; _serve({theirs.fileno()})",
            ],
            pass_fds=[theirs.fileno()],
            stdin=subprocess.DEVNULL,
            env=env,
        )
        theirs.close()
        self.sock = ours
        self.lock = threading.Lock()

    def alive(self) -> bool:
        return self.pid == os.getpid() and self.process.poll() is None

    def launch(self, target: Callable[..., Any], args: tuple[Any, ...], level: int) -> Any:
        """Have the server fork a child running ``target``; its connection and pid."""
        request = pickle.dumps((target, args, level), protocol=pickle.HIGHEST_PROTOCOL)
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            with self.lock:
                # The size, one byte carrying the child's socket, then the request.
                self.sock.sendall(struct.pack("!Q", len(request)))
                socket.send_fds(self.sock, [b"F"], [theirs.fileno()])
                self.sock.sendall(request)
                answer = _read_exactly(self.sock, 8)
        except OSError as exc:
            ours.close()
            raise OSError(f"the pacsframe worker server is gone ({exc})") from exc
        finally:
            theirs.close()
        (pid,) = struct.unpack("!q", answer)
        if pid < 0:
            ours.close()
            raise OSError("the pacsframe worker server could not fork a worker")
        return multiprocessing.connection.Connection(ours.detach()), pid


_SERVER: _Server | None = None
_SERVER_LOCK = threading.Lock()


def _server() -> _Server:
    global _SERVER
    with _SERVER_LOCK:
        if _SERVER is None or not _SERVER.alive():
            _SERVER = _Server()
        return _SERVER


def warm() -> None:
    """Start the worker server now, if it is not running, without waiting for it.

    Its imports then overlap whatever the caller does next (planning a
    retrieval); the first :meth:`ProcessWorker.start` waits for them.
    """
    if available():
        _server()


def _read_exactly(sock: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            raise OSError("connection closed")
        data += chunk
    return data


def _serve(fd: int) -> None:
    """The worker server's loop (run by ``python -c``): fork a child per request."""
    # Imported once here, for every child: C-GET's and WADO-RS's workers.
    import pacsframe.retrieve
    import pacsframe.webtransfer  # noqa: F401

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the caller's to handle
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # children are reaped by the kernel
    sock = socket.socket(fileno=fd)
    while True:
        try:
            header = _read_exactly(sock, 8)
            (size,) = struct.unpack("!Q", header)
            marker, fds, _flags, _addr = socket.recv_fds(sock, 1, 1)
            if marker != b"F" or len(fds) != 1:
                os._exit(1)  # not our caller's protocol
            request = _read_exactly(sock, size)
        except OSError:
            os._exit(0)  # the caller closed its end: it exited, or died
        # The imported modules' objects live as long as the server: frozen, a
        # child's garbage collections never walk them, so never copy their pages
        # (the fork-friendly pattern of the gc module's documentation).
        gc.freeze()
        try:
            pid = os.fork()
        except OSError:
            pid = -1
        if pid == 0:
            sock.close()
            try:
                _child(fds[0], request)
            finally:
                os._exit(0)
        for child_fd in fds:
            os.close(child_fd)
        sock.sendall(struct.pack("!q", pid))


def _example_child(link: ChildLink, n: int) -> None:
    """The child of :class:`ProcessWorker`'s example (a target must be importable)."""
    link.send("hello", link.ask("double", n))


def _child(fd: int, request: bytes) -> None:
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    # Die with the server, which ends with the caller: a caller killed outright must
    # not leave children filing objects into its cache behind its back. What a child
    # was writing stays a temporary file, which the cache knows as a dead process's.
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    conn = multiprocessing.connection.Connection(fd)
    link = ChildLink(conn)
    signal.signal(_CANCEL, link._signalled)
    signal.signal(_ABORT, link._signalled)
    try:
        target, args, level = pickle.loads(request)
        # pacsframe's log records go to the caller, whose handlers (and filters) apply.
        logger = logging.getLogger(LOGGER.name)
        for handler in list(logger.handlers):
            logger.removeHandler(handler)
        logger.addHandler(_Forward(link))
        logger.setLevel(level)
        logger.propagate = False
        link.send("ready")
        target(link, *args)
    except BaseException as exc:
        with contextlib.suppress(OSError, EOFError):
            conn.send(("crashed", portable(exc)))
    finally:
        with contextlib.suppress(OSError):
            conn.close()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)


class _Forward(logging.Handler):
    """In a child: sends each record to the parent, formatted (its args may not pickle)."""

    def __init__(self, link: ChildLink) -> None:
        super().__init__()
        self.link = link

    def emit(self, record: logging.LogRecord) -> None:
        try:
            state = dict(vars(record))
            state["msg"], state["args"] = record.getMessage(), None
            if record.exc_info:
                state["exc_text"] = logging.Formatter().formatException(record.exc_info)
            state["exc_info"] = None
            self.link.send("log", state)
        except Exception:
            self.handleError(record)


def _log_in_parent(state: dict[str, Any]) -> None:
    record = logging.makeLogRecord(state)
    logging.getLogger(record.name).handle(record)
