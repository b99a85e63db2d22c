"""DICOM TLS: our settings (:class:`TLS`), and sentences for failed handshakes.

One place for both sides: the client context every association of a
:class:`pacsframe.PACS` uses, the server context of our storage SCP and of the
demo PACS (with a bounded handshake), and :func:`explain_failure`, which turns
an ``ssl.SSLError`` into an :class:`~pacsframe.errors.AssociationError` that
says which certificate or setting to fix.
"""

from __future__ import annotations

import logging
import os
import socket
import ssl
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pacsframe.errors import AssociationError, QueryError

__all__ = [
    "TLS",
    "BoundedHandshake",
    "client_context",
    "describe",
    "explain_failure",
    "speaks_tls",
]

LOGGER = logging.getLogger("pacsframe")


@dataclass(frozen=True)
class TLS:
    """DICOM TLS settings for a peer: the CA to trust, and our certificate and key.

    The files are PEM. They are checked when the object is made (each exists and
    is readable, the certificate and key belong together), so a mistake fails
    here with a sentence naming the file rather than later as a failed
    handshake.

    Parameters
    ----------
    ca : path, optional
        The CA certificate(s) that signed the peer's certificate. Without it the
        system's trusted CAs are used (right for a publicly signed certificate,
        rarely for a PACS). For a server (the demo PACS, our storage SCP for
        C-MOVE) it is the CA that signs client certificates, which are then
        required.
    cert, key : path, optional
        Our certificate and its private key, given together: the client
        certificate a peer may require, and the server certificate of our
        storage SCP when a C-MOVE delivers to us over TLS.
    check_hostname : bool, default True
        Require the peer's certificate to name the host we connect to (a DNS
        name, or an IP address in its subjectAltName when we connect by IP).
        It is on by default because in a hospital every modality's
        certificate is signed by the same CA, and only the name tells the PACS
        from them. Set it to False for a peer whose certificate does not list the
        address you use; the certificate must still be signed by ``ca``.
    password : str, optional
        The passphrase of an encrypted ``key``.

    Raises
    ------
    QueryError
        A file is missing, unreadable or not PEM, ``cert`` comes without
        ``key`` (or the reverse), or the key does not match the certificate.

    Examples
    --------
    Without files: the system's CAs, no client certificate.

    >>> import ssl
    >>> tls = TLS()
    >>> context = tls.client_context()
    >>> context.verify_mode == ssl.CERT_REQUIRED, context.check_hostname
    (True, True)
    >>> tls.cert is None
    True

    Mistakes fail before anything is sent:

    >>> TLS(ca="/no/such/ca.pem")
    Traceback (most recent call last):
    ...
    pacsframe.errors.QueryError: tls.ca='/no/such/ca.pem' does not exist; give the path of the \
CA certificate (PEM) that signed the peer's certificate.
    >>> TLS(cert="/no/such/client.pem")
    Traceback (most recent call last):
    ...
    pacsframe.errors.QueryError: tls.cert is given without tls.key; give both our certificate \
and its private key (PEM files), or neither.
    """

    ca: str | os.PathLike[str] | None = None
    cert: str | os.PathLike[str] | None = None
    key: str | os.PathLike[str] | None = None
    check_hostname: bool = True
    password: str | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if (self.cert is None) != (self.key is None):
            given, missing = ("cert", "key") if self.key is None else ("key", "cert")
            raise QueryError(
                f"tls.{given} is given without tls.{missing}; give both our certificate and "
                "its private key (PEM files), or neither."
            )
        if not isinstance(self.check_hostname, bool):
            raise QueryError(f"tls.check_hostname={self.check_hostname!r} must be True or False.")
        if self.password is not None and not isinstance(self.password, str):
            raise QueryError("tls.password must be a string (the passphrase of tls.key).")
        for name, marker, what in (
            (
                "ca",
                "-----BEGIN CERTIFICATE-----",
                "the CA certificate (PEM) that signed the peer's certificate",
            ),
            ("cert", "-----BEGIN CERTIFICATE-----", "our certificate (PEM)"),
            ("key", "PRIVATE KEY-----", "the private key (PEM) of tls.cert"),
        ):
            value = getattr(self, name)
            if value is not None:
                object.__setattr__(self, name, _pem_file(value, name, marker, what))
        # Load everything once: a malformed file or a key that does not match the
        # certificate is reported now, not as a failed handshake later.
        self.client_context()

    def client_context(self) -> ssl.SSLContext:
        """A client-side context: verify the peer against ``ca``, present ``cert``.

        TLS 1.2 or later, certificates always verified, the host name checked
        unless ``check_hostname`` is False.
        """
        try:
            context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=self.ca)
        except ssl.SSLError as exc:
            raise QueryError(
                f"tls.ca={self.ca!r} holds no usable CA certificate ({exc.reason or exc}); "
                "give the CA certificate(s) in PEM form."
            ) from None
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        context.check_hostname = self.check_hostname
        self._load_chain(context)
        return context

    def server_context(self, require_client_cert: bool | None = None) -> ssl.SSLContext:
        """A server-side context: present ``cert``; verify clients against ``ca``.

        Parameters
        ----------
        require_client_cert : bool, optional
            Refuse clients without a certificate signed by ``ca``. Default: True
            when ``ca`` is given. Without it a client certificate is still
            verified when a client sends one.
        """
        if self.cert is None:
            raise QueryError(
                "a TLS server needs a certificate; give TLS(cert=..., key=...) with the "
                "server's certificate and private key."
            )
        require = self.ca is not None if require_client_cert is None else require_client_cert
        if require and self.ca is None:
            raise QueryError(
                "require_client_cert=True needs tls.ca, the CA that signs the client "
                "certificates to accept; give TLS(ca=...)."
            )
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        self._load_chain(context)
        if self.ca is not None:
            context.load_verify_locations(cafile=self.ca)
            context.verify_mode = ssl.CERT_REQUIRED if require else ssl.CERT_OPTIONAL
        return context

    def _load_chain(self, context: ssl.SSLContext) -> None:
        if self.cert is None:
            return
        asked: list[bool] = []

        def password() -> str:
            asked.append(True)
            return self.password or ""

        try:
            # A callback, never None: OpenSSL would otherwise prompt on the terminal
            # for the passphrase of an encrypted key, hanging a notebook.
            context.load_cert_chain(self.cert, self.key, password=password)
        except ssl.SSLError as exc:
            reason = exc.reason or str(exc)
            if reason == "KEY_VALUES_MISMATCH":
                raise QueryError(
                    f"tls.key={self.key!r} is not the private key of tls.cert={self.cert!r}; "
                    "give the key the certificate was made for."
                ) from None
            if asked:
                what = "a wrong tls.password" if self.password else "no tls.password"
                raise QueryError(
                    f"tls.key={self.key!r} is encrypted and could not be decrypted with "
                    f"{what}; give TLS(..., password=...) with its passphrase."
                ) from None
            raise QueryError(
                f"tls.cert={self.cert!r} and tls.key={self.key!r} could not be loaded "
                f"({reason}); give a PEM certificate and its PEM private key."
            ) from None


def _pem_file(value: Any, name: str, marker: str, what: str) -> str:
    """The path of a readable PEM file, or a QueryError naming the file."""
    if not isinstance(value, (str, os.PathLike)) or not str(value):
        raise QueryError(f"tls.{name}={value!r} must be the path of {what}.")
    path = Path(value).expanduser()
    text = str(path)
    if not path.exists():
        raise QueryError(f"tls.{name}={text!r} does not exist; give the path of {what}.")
    if not path.is_file():
        raise QueryError(f"tls.{name}={text!r} is not a file; give the path of {what}.")
    try:
        head = path.read_bytes()[:1_000_000]
    except OSError as exc:
        raise QueryError(
            f"tls.{name}={text!r} cannot be read ({exc.strerror or exc}); check its permissions."
        ) from None
    if marker.encode() not in head:
        raise QueryError(
            f"tls.{name}={text!r} is not a PEM file with {marker.strip('-')}; give {what} "
            "(convert DER with `openssl x509 -inform der` or `openssl pkey -inform der`)."
        )
    return text


def client_context(tls: Any) -> ssl.SSLContext | None:
    """The client-side context for ``PACS(tls=...)``, or a QueryError."""
    if tls is None:
        return None
    if isinstance(tls, TLS):
        return tls.client_context()
    if isinstance(tls, ssl.SSLContext):
        if tls.protocol == ssl.PROTOCOL_TLS_SERVER:
            raise QueryError(
                "tls= is a server-side ssl.SSLContext; give a client one, e.g. "
                "ssl.create_default_context(cafile=...), or pf.TLS(ca=..., cert=..., key=...)."
            )
        return tls
    raise QueryError(
        f"tls={tls!r} must be pf.TLS(ca=..., cert=..., key=...), an ssl.SSLContext, or None."
    )


def describe(tls: TLS | ssl.SSLContext | None) -> str:
    if tls is None:
        return "off"
    if not isinstance(tls, TLS):
        return "on (an ssl.SSLContext)"
    parts = [f"CA {tls.ca}" if tls.ca else "the system's CAs"]
    parts.append(f"client certificate {tls.cert}" if tls.cert else "no client certificate")
    if not tls.check_hostname:
        parts.append("host name not checked")
    return "on: " + ", ".join(parts)


class BoundedHandshake:
    """Server-side TLS for a listening socket (our storage SCP, the demo PACS).

    pynetdicom wraps each accepted socket on the thread that accepts connections,
    with no timeout: one client that stops mid-handshake would stall the server
    for ever. This wrapper bounds the handshake by ``timeout`` seconds (a silent
    client delays the clients behind it by at most that; a real handshake takes
    milliseconds) and logs why a handshake failed (the server side otherwise
    drops the connection silently). A failed handshake never becomes an
    association, so it leaves no thread behind.
    """

    def __init__(self, context: ssl.SSLContext, timeout: float = 5.0) -> None:
        self.context = context
        self.timeout = timeout

    def wrap_socket(
        self, sock: socket.socket, server_side: bool = True, **_: Any
    ) -> ssl.SSLSocket:
        """Wrap an accepted socket, doing the handshake within ``timeout`` seconds."""
        sock.settimeout(self.timeout)
        try:
            peer = sock.getpeername()
        except OSError:
            peer = ("?", 0)
        try:
            wrapped = self.context.wrap_socket(sock, server_side=True)
        except (OSError, ValueError) as exc:
            reason = getattr(exc, "reason", None) or exc
            LOGGER.warning("TLS handshake from %s:%s failed: %s", peer[0], peer[1], reason)
            raise OSError(f"TLS handshake failed: {reason}") from exc
        # Back to pynetdicom's own setting for accepted sockets (blocking; it polls).
        wrapped.settimeout(None)
        return wrapped


# SSLError reasons meaning "the bytes that came back were not TLS".
_NOT_TLS = {
    "WRONG_VERSION_NUMBER",
    "RECORD_LAYER_FAILURE",
    "PACKET_LENGTH_TOO_LONG",
    "HTTP_REQUEST",
    "UNEXPECTED_RECORD",
}
_UNTRUSTED = {2, 18, 19, 20, 21}  # X509_V_ERR_*: no trusted CA signed the chain
_EXPIRED = {9, 10}  # not yet valid, expired
_WRONG_NAME = {62, 64}  # hostname or IP address mismatch


def speaks_tls(host: str, port: int, connect_timeout: float) -> bool:
    """Whether the peer completes (or answers with an alert) a TLS handshake.

    Only used to explain a plain association the peer dropped without a word:
    nothing is sent after the handshake, and nothing received is trusted.
    """
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    try:
        with (
            socket.create_connection((host, port), min(connect_timeout, 5.0)) as raw,
            context.wrap_socket(raw),
        ):
            return True
    except ssl.SSLError as exc:
        # An alert (e.g. "handshake failure" for want of a client certificate)
        # comes from a TLS server; garbage or a closed connection does not.
        return "ALERT" in str(exc.reason or "")
    except OSError:
        return False


def refusal_alert(
    host: str, port: int, context: ssl.SSLContext, timeout: float
) -> ssl.SSLError | None:
    """The TLS alert the peer sends after a handshake, without our sending anything.

    With TLS 1.3 a server checks our certificate after the client's side of the
    handshake has completed, then sends an alert and closes. When our first
    write (the A-ASSOCIATE-RQ) crosses that close, the peer's kernel answers it
    with a reset that can discard the alert, and all we see is an EOF. A second
    handshake followed only by a read gets the alert itself, so the error can
    say which certificate was refused. None when no alert comes within
    ``timeout`` seconds.
    """
    try:
        with (
            socket.create_connection((host, port), timeout) as raw,
            context.wrap_socket(raw, server_hostname=host) as sock,
        ):
            sock.settimeout(timeout)
            sock.recv(1)
    except ssl.SSLError as exc:
        reason = str(exc.reason or "")
        if "ALERT" in reason or isinstance(exc, ssl.SSLCertVerificationError):
            return exc
        return None
    except OSError:
        return None
    return None


def explain_failure(
    host: str, port: int, tls: TLS | ssl.SSLContext | None, exc: ssl.SSLError
) -> AssociationError:
    """An AssociationError explaining a failed TLS handshake (or a TLS alert)."""
    where = f"{host}:{port}"
    reason = str(exc.reason or exc)
    said = reason.lower().replace("_", " ")
    tls = tls if isinstance(tls, TLS) else None
    if tls is None:
        trusted, ours = "the CAs of the ssl.SSLContext given as tls=", "our certificate"
    else:
        trusted = f"the CA in tls.ca={tls.ca!r}" if tls.ca else "a CA this system trusts"
        ours = f"our certificate tls.cert={tls.cert!r}"
    if isinstance(exc, ssl.SSLCertVerificationError):
        code = exc.verify_code
        detail = exc.verify_message
        if code in _UNTRUSTED:
            text = (
                f"the certificate of {where} was not signed by {trusted} ({detail}); "
                "pass the CA that signed the peer's certificate as tls.ca."
            )
        elif code in _WRONG_NAME:
            text = (
                f"the certificate of {where} is not valid for {host!r} ({detail}); "
                "connect by a host name or IP address the certificate lists, or pass "
                "TLS(check_hostname=False) to rely on the CA alone."
            )
        elif code in _EXPIRED:
            text = (
                f"the certificate of {where} is outside its validity period ({detail}); "
                "the peer needs a renewed certificate (or check this computer's clock)."
            )
        else:
            text = (
                f"the certificate of {where} failed verification against {trusted} "
                f"({detail}); check the peer's certificate and tls.ca."
            )
    elif reason == "TLSV13_ALERT_CERTIFICATE_REQUIRED" or (
        "HANDSHAKE_FAILURE" in reason and (tls is None or tls.cert is None)
    ):
        text = (
            f"{where} requires a client certificate and we sent none ({said}); pass "
            "tls=pf.TLS(ca=..., cert=..., key=...) with a certificate signed by a CA "
            "the peer trusts."
        )
    elif "ALERT" in reason and any(
        word in reason for word in ("UNKNOWN_CA", "CERTIFICATE", "ACCESS_DENIED")
    ):
        text = (
            f"{where} refused {ours} ({said}); use a certificate signed by a CA the peer "
            "trusts, or have the peer trust the CA that signed ours."
        )
    elif reason in _NOT_TLS:
        text = (
            f"{where} did not answer the TLS handshake in TLS ({said}); it seems to speak "
            "plain DICOM on this port. Use the peer's TLS port, or drop tls=."
        )
    elif isinstance(exc, ssl.SSLEOFError) or "EOF" in reason:
        text = (
            f"{where} closed the connection during the TLS handshake ({said}); it may not "
            "speak TLS on this port (use its TLS port, or drop tls=), or it refused us "
            "without an alert (check its log)."
        )
    else:
        text = (
            f"the TLS handshake with {where} failed ({said}); check that tls= matches "
            "the peer's TLS settings (CA, client certificate, TLS version)."
        )
    return AssociationError(text, reason="tls")
