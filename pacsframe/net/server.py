"""A storage SCP on pacsframe's own engine: where C-MOVE sub-operations arrive.

:class:`StorageServer` listens on a host and port (port 0 picks a free one,
readable afterwards as :attr:`StorageServer.port`), accepts associations in a
thread of its own and serves each in a thread of its own, over the same sans-I/O
machine (:mod:`~pacsframe.net.association`) and the same blocking plumbing
(:class:`~pacsframe.net.driver.BlockingAssociation`) as the client. A C-STORE's
data set goes fragment by fragment to the caller's ``on_store`` writer, the same
:class:`~pacsframe.net.operations.ObjectWriter` protocol a C-GET uses, through
the same code.

Acceptance policy:

- the called AE title must be ours, else A-ASSOCIATE-RJ (called AE title not
  recognized); with ``calling_aes``, the calling AE title must be listed, else
  A-ASSOCIATE-RJ (calling AE title not recognized);
- storage contexts are accepted for the SOP classes and transfer syntaxes the
  caller lists (the first of ours the peer offers wins); Verification is always
  accepted;
- every wait is bounded: the TLS handshake by ``tls_timeout``, the
  A-ASSOCIATE-RQ by ``acse_timeout`` (PS3.8's ARTIM: a peer that connects and
  says nothing is dropped), each DIMSE message or fragment by ``dimse_timeout``.

One bad peer never stops the server: a protocol error gets an A-ABORT and a
logged sentence, a writer's ``OSError`` answers 0xA700 (out of resources), any
other exception from the writer aborts that association only (logged by type:
writers may put file names in their messages, and logs never carry patient
data). :meth:`StorageServer.stop` ends everything within a fraction of a second.

Examples
--------
>>> import io
>>> from pacsframe import net
>>> from pacsframe.net.server import StorageServer
>>> class Memory:
...     def __init__(self): self.buffer = io.BytesIO()
...     def write(self, data): self.buffer.write(data)
...     def commit(self): return None
...     def discard(self): pass
>>> with StorageServer(lambda request: Memory(), ae_title="PF_SCP") as server:
...     with net.associate("127.0.0.1", server.port, called_ae="PF_SCP") as assoc:
...         status = assoc.echo()
>>> hex(status)
'0x0'
"""

from __future__ import annotations

import contextlib
import logging
import selectors
import socket
import ssl
import threading
import time
from collections.abc import Iterable, Sequence
from types import TracebackType

from pacsframe.errors import AssociationError, ProtocolError
from pacsframe.net import dimse, pdu
from pacsframe.net.association import (
    DEFAULT_MAX_PDU,
    AssociateRequested,
    Association,
    CommandReceived,
    ReleaseRequested,
    describe_rejection,
)
from pacsframe.net.driver import (
    EXPLICIT_VR_LITTLE_ENDIAN,
    IMPLEMENTATION_CLASS_UID,
    IMPLEMENTATION_VERSION_NAME,
    IMPLICIT_VR_LITTLE_ENDIAN,
    VERIFICATION,
    BlockingAssociation,
    next_event,
)
from pacsframe.net.operations import StoreWriterFactory

__all__ = ["StorageServer"]

LOGGER = logging.getLogger("pacsframe")

# A-ASSOCIATE-RJ (result, source, reason), PS3.8 9.3.4.
_CALLED_AE_UNKNOWN = pdu.AssociateRJ(1, 1, 7)
_CALLING_AE_UNKNOWN = pdu.AssociateRJ(1, 1, 3)
_TOO_BUSY = pdu.AssociateRJ(2, 3, 2)  # transient: local limit exceeded

# Presentation context results, PS3.8 9.3.3.2.
_ABSTRACT_SYNTAX_NOT_SUPPORTED = 3
_TRANSFER_SYNTAXES_NOT_SUPPORTED = 4

_VERIFICATION_SYNTAXES = (EXPLICIT_VR_LITTLE_ENDIAN, IMPLICIT_VR_LITTLE_ENDIAN)


class StorageServer:
    """A storage SCP (C-ECHO, C-STORE) on a background thread.

    Parameters
    ----------
    on_store : callable
        Called with a :class:`~pacsframe.net.operations.StoreRequest` per
        incoming object, from the association's thread; returns the
        :class:`~pacsframe.net.operations.ObjectWriter` that receives its data
        set. ``commit``'s return is the C-STORE-RSP status (``None`` for
        0x0000). It may be called from several threads at once.
    ae_title : str
        Ours: the called AE title a peer must use.
    storage : iterable of (SOP class UID, transfer syntaxes)
        The storage contexts we accept, syntaxes in our order of preference,
        e.g. from :func:`pacsframe.storage.storage_contexts` ``("acceptor")``.
    host, port : str, int
        Where to listen; port 0 picks a free port (see :attr:`port`).
    calling_aes : iterable of str, optional
        Accept only these calling AE titles.
    ssl_context : ssl.SSLContext, optional
        A server-side context: every connection must complete a TLS handshake
        within ``tls_timeout`` seconds.
    max_pdu : int
        The largest P-DATA-TF we accept, announced in our A-ASSOCIATE-AC.
    acse_timeout, dimse_timeout, tls_timeout : float
        Seconds to wait for the A-ASSOCIATE-RQ (and an A-RELEASE exchange),
        for each DIMSE message or fragment (also the longest idle time between
        messages), and for the TLS handshake.
    max_associations : int
        Associations served at once; more are rejected as transient (the peer
        may retry).

    Attributes
    ----------
    port : int
        The port listened on, once started.
    """

    def __init__(
        self,
        on_store: StoreWriterFactory,
        *,
        ae_title: str,
        storage: Iterable[tuple[str, Sequence[str]]] = (),
        host: str = "127.0.0.1",
        port: int = 0,
        calling_aes: Iterable[str] | None = None,
        ssl_context: ssl.SSLContext | None = None,
        max_pdu: int = DEFAULT_MAX_PDU,
        acse_timeout: float = 30.0,
        dimse_timeout: float = 60.0,
        tls_timeout: float = 10.0,
        max_associations: int = 32,
    ) -> None:
        if not 0 < len(ae_title.strip()) <= 16:
            raise ValueError(f"an AE title has 1 to 16 characters; {ae_title!r} does not")
        self.on_store = on_store
        self.ae_title = ae_title.strip()
        self.storage: dict[str, tuple[str, ...]] = {}
        for sop_class, syntaxes in storage:
            # A class listed twice keeps every syntax, in the order first given.
            known = self.storage.get(sop_class, ())
            self.storage[sop_class] = known + tuple(s for s in syntaxes if s not in known)
        self.host = host
        self.port = port
        self.calling_aes = None if calling_aes is None else {ae.strip() for ae in calling_aes}
        self.ssl_context = ssl_context
        self.max_pdu = max_pdu
        self.acse_timeout = acse_timeout
        self.dimse_timeout = dimse_timeout
        self.tls_timeout = tls_timeout
        self.max_associations = max_associations
        self._listener: socket.socket | None = None
        self._wake_read: socket.socket | None = None
        self._wake_write: socket.socket | None = None
        self._stopping = threading.Event()
        self._accept_thread: threading.Thread | None = None
        self._lock = threading.Lock()
        # Live connections (to wake them on stop) and their threads (to join).
        self._connections: dict[threading.Thread, socket.socket] = {}

    # ------------------------------------------------------------ lifecycle

    def start(self) -> StorageServer:
        """Bind, listen and start accepting; returns ``self``.

        Raises :class:`OSError` when the address cannot be bound (the port is
        taken, the host is not ours).
        """
        if self._accept_thread is not None:
            raise RuntimeError("this StorageServer was already started; make a new one")
        listener = socket.create_server((self.host, self.port), backlog=64)
        # The selector says when to accept; a non-blocking accept then never hangs
        # on a connection the peer reset in between.
        listener.setblocking(False)
        self._listener = listener
        self.port = listener.getsockname()[1]
        # Closing a listening socket does not wake a thread blocked on it (Linux);
        # a byte on this pair does, at once.
        self._wake_read, self._wake_write = socket.socketpair()
        self._accept_thread = threading.Thread(
            target=self._accept_loop, name=f"pacsframe-scp-{self.port}", daemon=True
        )
        self._accept_thread.start()
        return self

    def stop(self, timeout: float = 5.0) -> None:
        """Stop accepting, end every association, join every thread, close every socket.

        Associations in progress are cut (their objects are discarded); each
        thread is waited for at most ``timeout`` seconds. Safe to call twice.
        """
        if self._accept_thread is None or self._stopping.is_set():
            return
        self._stopping.set()
        assert self._wake_write is not None and self._listener is not None
        with contextlib.suppress(OSError):  # the accept thread may be gone already
            self._wake_write.send(b"x")
        self._accept_thread.join(timeout)
        with self._lock:
            connections = list(self._connections.items())
        for _, conn in connections:
            # The plain socket's shutdown, also under TLS: it wakes a thread
            # blocked in recv or send on the descriptor without touching the
            # TLS object another thread is using. OSError: its thread closed it.
            with contextlib.suppress(OSError):
                socket.socket.shutdown(conn, socket.SHUT_RDWR)
        deadline = time.monotonic() + timeout
        for thread, _ in connections:
            if thread is not threading.current_thread():  # stop() called from on_store
                thread.join(max(0.0, deadline - time.monotonic()))
        for sock in (self._listener, self._wake_read, self._wake_write):
            if sock is not None:
                sock.close()

    @property
    def running(self) -> bool:
        """Whether the accept loop is running."""
        return self._accept_thread is not None and self._accept_thread.is_alive()

    def __enter__(self) -> StorageServer:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # ------------------------------------------------------------- accepting

    def _accept_loop(self) -> None:
        listener, wake = self._listener, self._wake_read
        assert listener is not None and wake is not None
        # A selector, not select(): descriptors above 1024 are fine in a busy process.
        selector = selectors.DefaultSelector()
        selector.register(listener, selectors.EVENT_READ)
        selector.register(wake, selectors.EVENT_READ)
        with selector:
            # Bounded by stop(): each pass waits for a connection or the wake-up byte.
            while not self._stopping.is_set():
                try:
                    ready = selector.select()
                except OSError:
                    return  # closed under us: stopping
                if self._stopping.is_set():
                    return
                if any(key.fileobj is listener for key, _ in ready):
                    self._accept(listener)

    def _accept(self, listener: socket.socket) -> None:
        """Accept one connection and start its thread."""
        try:
            conn, address = listener.accept()
        except (BlockingIOError, ConnectionAbortedError):
            return  # the peer gave up between the selector's answer and accept
        except OSError as exc:
            # Out of descriptors, say: keep serving those already connected,
            # without spinning on a listener that stays readable.
            LOGGER.warning("storage SCP %s could not accept a connection: %s", self.ae_title, exc)
            time.sleep(0.05)
            return
        thread = threading.Thread(
            target=self._serve_connection,
            args=(conn, f"{address[0]}:{address[1]}"),
            name=f"pacsframe-scp-{self.port}-{address[1]}",
            daemon=True,
        )
        with self._lock:
            self._connections[thread] = conn
        thread.start()

    def _serve_connection(self, conn: socket.socket, where: str) -> None:
        this = threading.current_thread()
        try:
            self._serve(conn, where)
        except ProtocolError as exc:
            # next_event / _protocol_failure already sent the A-ABORT.
            LOGGER.warning(
                "storage SCP %s aborted the association with %s: %s", self.ae_title, where, exc
            )
        except AssociationError as exc:
            # Timeouts, peer aborts, broken connections, failed handshakes, and
            # our own stop(): the peer's business, worth a line, not an alarm.
            level = logging.DEBUG if self._stopping.is_set() else logging.INFO
            LOGGER.log(level, "storage SCP %s, peer %s: %s", self.ae_title, where, exc)
        except Exception as exc:
            # A bug in on_store or its writer: that association is aborted (by
            # _serve), the server goes on.
            LOGGER.error(
                "storage SCP %s aborted the association with %s: the object writer raised "
                "%s. The object was discarded; the server goes on.",
                self.ae_title,
                where,
                type(exc).__name__,
            )
        finally:
            with self._lock:
                conn = self._connections.pop(this, conn)
            conn.close()

    def _serve(self, conn: socket.socket, where: str) -> None:
        # Each DIMSE message goes out in one write; Nagle's algorithm would hold
        # a small response back until the peer's delayed ACK (about 40 ms).
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if self.ssl_context is not None:
            conn = self._handshake(conn, where)
        machine = Association("acceptor", max_receive=self.max_pdu, reassemble=False, batch=True)
        event = next_event(
            conn, machine, time.monotonic() + self.acse_timeout, "an A-ASSOCIATE-RQ", where
        )
        assert isinstance(event, AssociateRequested), event  # the machine allows nothing else
        request = event.request
        answer = self._negotiate(request)
        conn.settimeout(self.acse_timeout)
        try:
            conn.sendall(machine.send(answer))
        except OSError as exc:
            raise AssociationError(
                f"the connection broke while sending the A-ASSOCIATE answer: {exc}",
                reason="aborted",
            ) from None
        if isinstance(answer, pdu.AssociateRJ):
            raise AssociationError(
                f"rejected the association from calling AE {request.calling_ae!r} to called AE "
                f"{request.called_ae!r} ({describe_rejection(answer)})",
                reason="rejected",
            )
        _Acceptor(
            conn,
            machine,
            where=where,
            acse_timeout=self.acse_timeout,
            dimse_timeout=self.dimse_timeout,
        ).serve(self.on_store, request)

    def _handshake(self, conn: socket.socket, where: str) -> socket.socket:
        assert self.ssl_context is not None
        conn.settimeout(self.tls_timeout)
        try:
            wrapped = self.ssl_context.wrap_socket(conn, server_side=True)
        except (ssl.SSLError, OSError) as exc:
            raise AssociationError(
                f"the TLS handshake failed: {exc}. The peer may not speak TLS, or may not "
                "trust our certificate (or we its).",
                reason="tls",
            ) from None
        # wrap_socket took the descriptor over: stop() must shut the new object.
        with self._lock:
            self._connections[threading.current_thread()] = wrapped
        if self._stopping.is_set():
            raise AssociationError("the storage SCP is stopping", reason="aborted")
        return wrapped

    def _negotiate(self, request: pdu.AssociateRQ) -> pdu.AssociateAC | pdu.AssociateRJ:
        """Our answer to an A-ASSOCIATE-RQ: the acceptance policy."""
        if request.called_ae != self.ae_title:
            return _CALLED_AE_UNKNOWN
        if self.calling_aes is not None and request.calling_ae not in self.calling_aes:
            return _CALLING_AE_UNKNOWN
        with self._lock:
            busy = len(self._connections) > self.max_associations
        if busy:
            return _TOO_BUSY
        results = []
        for cx in request.contexts:
            if cx.abstract_syntax == VERIFICATION:
                ours: Sequence[str] = _VERIFICATION_SYNTAXES
            else:
                ours = self.storage.get(cx.abstract_syntax, ())
            chosen = next((syntax for syntax in ours if syntax in cx.transfer_syntaxes), None)
            if chosen is not None:
                result = 0
            elif ours:
                result = _TRANSFER_SYNTAXES_NOT_SUPPORTED
            else:
                result = _ABSTRACT_SYNTAX_NOT_SUPPORTED
            # A rejected context still carries a transfer syntax, which PS3.8 says to ignore.
            results.append(
                pdu.PresentationContextAC(
                    cx.context_id, result, chosen or IMPLICIT_VR_LITTLE_ENDIAN
                )
            )
        return pdu.AssociateAC(
            request.called_ae,
            request.calling_ae,
            tuple(results),
            pdu.UserInformation(
                self.max_pdu, IMPLEMENTATION_CLASS_UID, IMPLEMENTATION_VERSION_NAME
            ),
        )


class _Acceptor(BlockingAssociation):
    """One accepted association: C-ECHO and C-STORE until released or aborted."""

    def serve(self, on_store: StoreWriterFactory, request: pdu.AssociateRQ) -> None:
        """Serve until the peer releases; ``request`` is the A-ASSOCIATE-RQ accepted."""
        # Which service a command may ask for depends on its context's abstract syntax.
        self.abstract_syntaxes = {cx.context_id: cx.abstract_syntax for cx in request.contexts}
        try:
            self._serve(on_store)
        except AssociationError:
            raise  # the socket is closed and, where owed, the A-ABORT sent
        except BaseException:
            # A writer's bug mid-object: the object was discarded, but nothing
            # says where the peer is in its message, so the association ends.
            self.abort()
            raise

    def _serve(self, on_store: StoreWriterFactory) -> None:
        # Bounded by the peer: each pass serves one message or ends, and every
        # wait is at most dimse_timeout.
        while True:
            event = next_event(
                self._sock,
                self._machine,
                time.monotonic() + self.dimse_timeout,
                "a DIMSE message or an A-RELEASE-RQ",
                self.where,
            )
            if isinstance(event, ReleaseRequested):
                self._release()
                return
            if not isinstance(event, CommandReceived):
                self._protocol_failure(
                    ProtocolError(
                        "the peer sent a data set without a command announcing it",
                        abort_reason=pdu.UNEXPECTED_PARAMETER,
                    )
                )
                return  # pragma: no cover - _protocol_failure raises
            try:
                command = dimse.decode_command(event.data)
            except ProtocolError as exc:
                self._protocol_failure(exc)
                return  # pragma: no cover
            self._dispatch(event.context_id, command, on_store)

    def _dispatch(
        self, context_id: int, command: dimse.Command, on_store: StoreWriterFactory
    ) -> None:
        field = command.command_field
        abstract = self.abstract_syntaxes.get(context_id)
        if field == dimse.C_ECHO_RQ and abstract == VERIFICATION:
            if command.has_dataset or command.message_id is None:
                self._protocol_failure(
                    ProtocolError(
                        "the peer sent a C-ECHO-RQ with a data set or without a message ID",
                        abort_reason=pdu.INVALID_PARAMETER,
                    )
                )
            self._send_bytes(
                self._machine.send_message(
                    context_id, dimse.encode_command(dimse.c_echo_rsp(command.message_id)), None
                )
            )
        elif field == dimse.C_STORE_RQ and abstract != VERIFICATION:
            self._serve_store(context_id, command, on_store)
        elif field == dimse.C_CANCEL_RQ:
            pass  # a C-STORE is answered whole; there is nothing to cancel
        else:
            self._protocol_failure(
                ProtocolError(
                    f"the peer sent {command.name} on a {abstract} context; this storage SCP "
                    "serves only C-ECHO on Verification and C-STORE on storage contexts",
                    abort_reason=pdu.UNEXPECTED_PARAMETER,
                )
            )

    def _release(self) -> None:
        """Answer A-RELEASE-RQ, then give the peer a moment to close first (PS3.8 Sta13)."""
        self._send_bytes(self._machine.send(pdu.ReleaseRP()))
        # The requestor closes the transport; waiting briefly for that avoids a
        # reset racing our A-RELEASE-RP. Bounded: one read of at most 1 s.
        with contextlib.suppress(OSError):
            self._sock.settimeout(min(1.0, self.acse_timeout))
            self._sock.recv(1)
        self._sock.close()
