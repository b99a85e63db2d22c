"""DICOM TLS: pf.TLS, PACS(tls=...), the demo PACS and our storage SCP over TLS, and
real Orthanc with DICOM TLS enabled.

Certificates are made in the test session with ``cryptography``: a CA, a server
certificate (subjectAltName IP 127.0.0.1 and DNS localhost), a client certificate
(with the same names, since it also serves our storage SCP for C-MOVE), a second,
unrelated CA with a "rogue" client certificate, and a server certificate for
another host name. Failures must be AssociationErrors with reason "tls" and a
sentence naming the peer and what to do, within seconds, leaving no thread behind.
"""

from __future__ import annotations

import contextlib
import datetime
import ipaddress
import os
import socket
import ssl
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import pydicom
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from servers import OrthancServer, free_port, require_tool

import pacsframe as pf
from pacsframe import cli
from pacsframe.demo import DemoPACS, make_cohort

REPO = Path(__file__).resolve().parents[1]
# Every failure here must be reported, never waited out: FAILS_WITHIN is well under
# every timeout in FAST, and loose enough for a busy machine.
FAST = {"connect_timeout": 30, "acse_timeout": 30, "dimse_timeout": 30, "network_timeout": 30}
FAILS_WITHIN = 15.0
HANDSHAKE = 5.0  # the demo server's bound on one client's TLS handshake


# --- certificates ------------------------------------------------------------------------


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _write_key(path: Path, key: rsa.RSAPrivateKey, password: bytes | None = None) -> None:
    encryption = (
        serialization.BestAvailableEncryption(password)
        if password
        else serialization.NoEncryption()
    )
    path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, encryption
        )
    )


def _builder(
    name: str, issuer: x509.Name, key: rsa.RSAPrivateKey, *, ca: bool
) -> x509.CertificateBuilder:
    """What a test CA and a leaf share: names, a two-day validity, constraints, usage."""
    now = datetime.datetime.now(datetime.UTC)
    return (
        x509.CertificateBuilder()
        .subject_name(_name(f"pacsframe test {name}"))
        .issuer_name(issuer)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=2))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=0 if ca else None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=not ca,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=ca,
                crl_sign=ca,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
    )


def _save(
    folder: Path,
    name: str,
    cert: x509.Certificate,
    key: rsa.RSAPrivateKey,
    password: bytes | None = None,
) -> None:
    (folder / f"{name}.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    _write_key(folder / f"{name}.key", key, password)


def _make_ca(folder: Path, name: str) -> tuple[x509.Certificate, rsa.RSAPrivateKey]:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    cert = _builder(name, _name(f"pacsframe test {name}"), key, ca=True).sign(key, hashes.SHA256())
    _save(folder, name, cert, key)
    return cert, key


def _make_leaf(
    folder: Path,
    name: str,
    ca: tuple[x509.Certificate, rsa.RSAPrivateKey],
    names: list[x509.GeneralName],
    password: bytes | None = None,
) -> None:
    ca_cert, ca_key = ca
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    cert = (
        _builder(name, ca_cert.subject, key, ca=False)
        # DICOM peers are clients and servers (C-MOVE sub-associations).
        .add_extension(
            x509.ExtendedKeyUsage(
                [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
            ),
            critical=False,
        )
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )
    _save(folder, name, cert, key, password)


@dataclass(frozen=True)
class Certs:
    folder: Path

    def path(self, name: str) -> str:
        return str(self.folder / name)

    def tls(self, ca: str | None = "ca", who: str | None = "client", **kw) -> pf.TLS:
        """A TLS trusting ``ca`` and presenting ``who``'s certificate."""
        return pf.TLS(
            ca=self.path(f"{ca}.pem") if ca else None,
            cert=self.path(f"{who}.pem") if who else None,
            key=self.path(f"{who}.key") if who else None,
            **kw,
        )


@pytest.fixture(scope="session")
def certs(tmp_path_factory) -> Certs:
    folder = tmp_path_factory.mktemp("certs")
    local = [x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.DNSName("localhost")]
    ca = _make_ca(folder, "ca")
    other = _make_ca(folder, "otherca")
    _make_leaf(folder, "server", ca, local)
    _make_leaf(folder, "client", ca, local)
    _make_leaf(folder, "rogue", other, local)
    _make_leaf(folder, "elsewhere", ca, [x509.DNSName("pacs.example.org")])
    _make_leaf(folder, "locked", ca, local, password=b"s3cret")
    return Certs(folder)


# --- helpers -------------------------------------------------------------------------------


@contextlib.contextmanager
def no_new_threads(*, ignore_acceptors: bool = False):
    """Fail if the block leaves threads running (bounded wait for them to end).

    ``ignore_acceptors``: a plain pynetdicom server keeps the acceptor thread of a
    connection that closed before its A-ASSOCIATE-RQ until its ACSE timeout; that
    is the peer's thread, not ours.
    """
    before = set(threading.enumerate())
    yield
    deadline = time.monotonic() + FAILS_WITHIN
    new: list[threading.Thread] = []
    while True:
        new = [
            t
            for t in threading.enumerate()
            if t not in before
            and t.is_alive()
            and not (ignore_acceptors and t.name.startswith("AcceptorThread"))
        ]
        if not new or time.monotonic() > deadline:
            break
        time.sleep(0.025)
    assert not new, f"threads left running: {new}"


def fails_with_tls_error(pacs: pf.PACS, call=None, match: str = "") -> pf.AssociationError:
    """Run ``call(pacs)`` (default: echo), expect a prompt AssociationError(reason='tls')."""
    started = time.monotonic()
    with no_new_threads(), pytest.raises(pf.AssociationError, match=match) as info:
        (call or (lambda p: p.echo()))(pacs)
    assert time.monotonic() - started < FAILS_WITHIN
    assert info.value.reason == "tls", str(info.value)
    assert f"{pacs.host}:{pacs.port}" in str(info.value)
    return info.value


# --- pf.TLS: validation and contexts -----------------------------------------------------


def test_tls_validates_files_when_made(certs, tmp_path):
    with pytest.raises(pf.QueryError, match=r"tls\.ca='.*nope\.pem' does not exist"):
        pf.TLS(ca=tmp_path / "nope.pem")
    with pytest.raises(pf.QueryError, match=r"tls\.ca=.* is not a file"):
        pf.TLS(ca=tmp_path)
    junk = tmp_path / "junk.pem"
    junk.write_text("hello")
    with pytest.raises(pf.QueryError, match=r"tls\.ca=.*junk\.pem' is not a PEM file"):
        pf.TLS(ca=junk)
    with pytest.raises(pf.QueryError, match=r"tls\.key=.*junk\.pem' is not a PEM file"):
        pf.TLS(cert=certs.path("client.pem"), key=junk)
    with pytest.raises(pf.QueryError, match=r"tls\.cert is given without tls\.key"):
        pf.TLS(cert=certs.path("client.pem"))
    with pytest.raises(pf.QueryError, match=r"tls\.key is given without tls\.cert"):
        pf.TLS(key=certs.path("client.key"))
    with pytest.raises(pf.QueryError, match=r"is not the private key of tls\.cert"):
        pf.TLS(cert=certs.path("client.pem"), key=certs.path("server.key"))
    with pytest.raises(pf.QueryError, match=r"check_hostname='no' must be True or False"):
        pf.TLS(check_hostname="no")
    with pytest.raises(pf.QueryError, match=r"must be the path"):
        pf.TLS(ca=42)


def test_tls_encrypted_key_needs_its_password(certs):
    # Never an interactive OpenSSL prompt: a sentence instead.
    with pytest.raises(pf.QueryError, match=r"is encrypted .* no tls\.password"):
        certs.tls(who="locked")
    with pytest.raises(pf.QueryError, match=r"is encrypted .* a wrong tls\.password"):
        certs.tls(who="locked", password="guess")
    tls = certs.tls(who="locked", password="s3cret")
    assert "s3cret" not in repr(tls)


def test_tls_contexts(certs):
    tls = certs.tls()
    client = tls.client_context()
    assert client.verify_mode == ssl.CERT_REQUIRED and client.check_hostname
    assert client.minimum_version >= ssl.TLSVersion.TLSv1_2
    assert not certs.tls(check_hostname=False).client_context().check_hostname
    server = certs.tls(who="server").server_context()
    assert server.verify_mode == ssl.CERT_REQUIRED  # a CA given: client certificates required
    optional = certs.tls(who="server").server_context(require_client_cert=False)
    assert optional.verify_mode == ssl.CERT_OPTIONAL
    no_ca = certs.tls(ca=None, who="server").server_context()
    assert no_ca.verify_mode == ssl.CERT_NONE
    with pytest.raises(pf.QueryError, match=r"needs a certificate"):
        certs.tls(who=None).server_context()
    with pytest.raises(pf.QueryError, match=r"require_client_cert=True needs tls\.ca"):
        certs.tls(ca=None, who="server").server_context(require_client_cert=True)


def test_pacs_tls_argument_and_reprs(certs):
    plain = pf.PACS("127.0.0.1", 104, "PACS")
    assert "tls" not in repr(plain) and plain.peer["tls"] is False
    assert "<td>off</td>" in plain._repr_html_()
    tls = certs.tls()
    pacs = pf.PACS("127.0.0.1", 104, "PACS", tls=tls)
    assert pacs.peer["tls"] is True
    assert repr(pacs).endswith(f"tls={tls!r})")
    assert "on: CA " in pacs._repr_html_() and "client.pem" in pacs._repr_html_()
    context = tls.client_context()
    assert "tls=<ssl.SSLContext>" in repr(pf.PACS("127.0.0.1", 104, "PACS", tls=context))
    with pytest.raises(pf.QueryError, match=r"must be pf\.TLS"):
        pf.PACS("127.0.0.1", 104, "PACS", tls=certs.path("ca.pem"))
    with pytest.raises(pf.QueryError, match=r"server-side ssl\.SSLContext"):
        pf.PACS("127.0.0.1", 104, "PACS", tls=certs.tls(who="server").server_context())


def test_from_config_reads_tls_files(certs, tmp_path, monkeypatch):
    for key in ("HOST", "PORT", "AE_TITLE", "CALLING_AE", "TLS_CA", "TLS_CERT", "TLS_KEY"):
        monkeypatch.delenv(f"PACSFRAME_{key}", raising=False)
    folder = tmp_path / "conf"
    folder.mkdir()
    for name in ("ca.pem", "client.pem", "client.key"):
        (folder / name).write_bytes(Path(certs.path(name)).read_bytes())
    config = folder / "config.toml"
    config.write_text(
        '[peers.secure]\nhost = "127.0.0.1"\nport = 2762\nae_title = "PACS"\n'
        # Relative to the config file's folder.
        'tls_ca = "ca.pem"\ntls_cert = "client.pem"\ntls_key = "client.key"\n'
        "tls_check_hostname = false\n"
        '[peers.plain]\nhost = "127.0.0.1"\nport = 104\n'
        '[peers.broken]\nhost = "127.0.0.1"\ntls_ca = "missing.pem"\n'
        '[peers.sloppy]\nhost = "127.0.0.1"\ntls_ca = "ca.pem"\ntls_check_hostname = "no"\n',
        encoding="utf-8",
    )
    pacs = pf.PACS.from_config("secure", config)
    assert pacs.tls == pf.TLS(
        ca=folder / "ca.pem",
        cert=folder / "client.pem",
        key=folder / "client.key",
        check_hostname=False,
    )
    assert pf.PACS.from_config("plain", config).tls is None
    with pytest.raises(pf.QueryError, match=r"\[peers\.broken\].*tls\.ca=.*missing\.pem"):
        pf.PACS.from_config("broken", config)
    with pytest.raises(pf.QueryError, match=r"tls_check_hostname = 'no' must be true or false"):
        pf.PACS.from_config("sloppy", config)
    # Environment variables override the file, and turn TLS on for a plain peer.
    monkeypatch.setenv("PACSFRAME_TLS_CA", certs.path("otherca.pem"))
    assert pf.PACS.from_config("secure", config).tls.ca == certs.path("otherca.pem")
    assert pf.PACS.from_config("plain", config).tls == pf.TLS(ca=certs.path("otherca.pem"))


# --- against the demo PACS -----------------------------------------------------------------


@pytest.fixture(scope="module")
def tls_demo(certs, tmp_path_factory):
    """A demo PACS speaking only TLS and requiring client certificates signed by the CA."""
    folder = tmp_path_factory.mktemp("tls-demo")
    manifest = make_cohort(
        folder, patients=2, seed=5, studies_per_patient=1, series_per_study=(1, 2), matrix=8
    )
    with DemoPACS(folder, tls=certs.tls(who="server")) as server:
        yield server, manifest


def _client(server, certs, tmp_path, calling_ae="PFTLS", **tls) -> pf.PACS:
    return pf.PACS(
        "127.0.0.1",
        server.port,
        server.ae_title,
        calling_ae,
        cache=tmp_path / "cache",
        tls=certs.tls(**tls) if tls.get("who", "client") != "plain" else None,
        **FAST,
    )


def test_find_get_over_tls(tls_demo, certs, tmp_path):
    server, manifest = tls_demo
    assert "(TLS)" in repr(server)
    pacs = _client(server, certs, tmp_path)
    assert pacs.echo() < FAILS_WITHIN
    studies = pacs.find_studies()
    assert sorted(studies.StudyInstanceUID) == sorted(manifest.StudyInstanceUID.unique())
    series = pacs.find_series(studies)
    assert sorted(series.SeriesInstanceUID) == sorted(manifest.SeriesInstanceUID.unique())
    result = pacs.get(studies, progress=False, workers=2)
    assert (result.completed, result.failed) == (len(manifest), 0)
    held = pacs.cache.instances()
    assert sorted(held.SOPInstanceUID) == sorted(manifest.SOPInstanceUID)
    original = manifest.set_index("SOPInstanceUID").path
    for row in held.itertuples():
        got, want = pydicom.dcmread(row.path), pydicom.dcmread(original[row.SOPInstanceUID])
        assert got.PixelData == want.PixelData


def test_held_associations_over_tls(tls_demo, certs, tmp_path):
    server, _ = tls_demo
    pacs = _client(server, certs, tmp_path)
    with pacs:
        first = pacs.find_studies()
        second = pacs.find_series(first)
    assert len(second) >= len(first) > 0


def test_move_to_our_tls_storage_scp(tls_demo, certs, tmp_path):
    server, manifest = tls_demo
    pacs = _client(server, certs, tmp_path, calling_ae="PFTLSMOVE")
    # The demo PACS delivers over TLS: it trusts our CA and presents its certificate,
    # which our SCP (requiring client certificates signed by the CA) accepts.
    server.add_known_ae(pacs.calling_ae, "127.0.0.1", pacs.scp_port, tls=certs.tls(who="server"))
    series = pacs.find_series(pacs.find_studies()).iloc[:2]
    result = pacs.move(series, progress=False)
    expected = manifest[manifest.SeriesInstanceUID.isin(series.SeriesInstanceUID)]
    assert (result.completed, result.failed) == (len(expected), 0)
    assert sorted(pacs.cache.instances().SOPInstanceUID) == sorted(expected.SOPInstanceUID)


def test_our_tls_storage_scp_refuses_plain_delivery(tls_demo, certs, tmp_path):
    server, _ = tls_demo
    pacs = _client(server, certs, tmp_path, calling_ae="PFTLSPLAIN")
    server.add_known_ae(pacs.calling_ae, "127.0.0.1", pacs.scp_port)  # no tls=
    studies = pacs.find_studies().iloc[:1]
    with pytest.raises(pf.MoveDestinationUnknown, match=r"refused the as.*speaks only DICOM TLS"):
        pacs.move(studies, progress=False)
    assert len(pacs.cache.instances()) == 0


def test_store_over_tls(tls_demo, certs, tmp_path):
    server, _ = tls_demo
    new = make_cohort(tmp_path / "new", patients=1, seed=99, studies_per_patient=1, matrix=8)
    pacs = _client(server, certs, tmp_path)
    result = pacs.store(new)
    assert (result.completed, result.failed) == (len(new), 0)
    found = pacs.find_instances(pacs.find_series(pacs.find_studies(PatientID=new.PatientID[0])))
    assert sorted(found.SOPInstanceUID) == sorted(new.SOPInstanceUID)


def test_wrong_ca_is_refused(tls_demo, certs, tmp_path):
    server, _ = tls_demo
    pacs = _client(server, certs, tmp_path, ca="otherca")
    error = fails_with_tls_error(pacs, match=r"was not signed by the CA in tls\.ca=")
    assert certs.path("otherca.pem") in str(error)
    assert "pass the CA that signed the peer's certificate" in str(error)


def test_wrong_ca_fails_get_workers_too(tls_demo, certs, tmp_path):
    server, manifest = tls_demo
    pacs = _client(server, certs, tmp_path, ca="otherca")
    uids = list(manifest.StudyInstanceUID.unique())
    fails_with_tls_error(
        pacs, lambda p: p.get(uids, progress=False, workers=2), match="not signed by"
    )
    assert not list((tmp_path / "cache").rglob("*.dcm"))


def test_client_without_certificate_is_refused(tls_demo, certs, tmp_path):
    server, _ = tls_demo
    pacs = _client(server, certs, tmp_path, who=None)
    fails_with_tls_error(
        pacs, lambda p: p.find_studies(), match=r"requires a client certificate and we sent none"
    )


def test_client_certificate_from_another_ca_is_refused(tls_demo, certs, tmp_path):
    server, _ = tls_demo
    pacs = _client(server, certs, tmp_path, who="rogue")
    error = fails_with_tls_error(pacs, match=r"refused our certificate tls\.cert=")
    assert certs.path("rogue.pem") in str(error)


def test_plain_client_to_tls_server(tls_demo, tmp_path):
    server, _ = tls_demo
    pacs = pf.PACS("127.0.0.1", server.port, server.ae_title, cache=tmp_path, **FAST)
    fails_with_tls_error(pacs, match=r"requires DICOM TLS.*Pass tls=pf\.TLS")


def test_tls_client_to_plain_server(certs, tmp_path):
    with DemoPACS(tmp_path / "plain") as server:
        pacs = _client(server, certs, tmp_path)
        started = time.monotonic()
        with no_new_threads(ignore_acceptors=True), pytest.raises(pf.AssociationError) as info:
            pacs.echo()
        assert time.monotonic() - started < FAILS_WITHIN
    assert info.value.reason == "tls"
    assert "speak plain DICOM on this port" in str(info.value)


def test_hostname_is_checked_unless_turned_off(certs, tmp_path):
    # The server's certificate names pacs.example.org, not 127.0.0.1.
    with DemoPACS(tmp_path / "elsewhere", tls=certs.tls(who="elsewhere")) as server:
        pacs = _client(server, certs, tmp_path)
        fails_with_tls_error(pacs, match=r"is not valid for '127\.0\.0\.1'.*check_hostname=False")
        relaxed = _client(server, certs, tmp_path, check_hostname=False)
        assert relaxed.echo() < FAILS_WITHIN


def test_a_user_ssl_context_works_too(tls_demo, certs, tmp_path):
    server, _ = tls_demo
    context = ssl.create_default_context(cafile=certs.path("ca.pem"))
    context.load_cert_chain(certs.path("client.pem"), certs.path("client.key"))
    pacs = pf.PACS("127.0.0.1", server.port, server.ae_title, tls=context, cache=tmp_path)
    assert len(pacs.find_studies()) > 0
    bare = ssl.create_default_context(cafile=certs.path("ca.pem"))
    pacs = pf.PACS("127.0.0.1", server.port, server.ae_title, tls=bare, cache=tmp_path, **FAST)
    fails_with_tls_error(pacs, match="requires a client certificate")


def test_demo_server_tls_arguments(certs, tmp_path):
    with pytest.raises(pf.QueryError, match=r"needs a certificate"):
        DemoPACS(tmp_path, tls=certs.tls(who=None))
    with pytest.raises(pf.QueryError, match=r"require_client_cert=True needs tls"):
        DemoPACS(tmp_path, require_client_cert=True)
    with pytest.raises(pf.QueryError, match=r"client-side ssl\.SSLContext"):
        DemoPACS(tmp_path, tls=certs.tls().client_context())
    # Optional client certificates: a client without one is served.
    server_tls = certs.tls(who="server")
    with DemoPACS(tmp_path / "optional", tls=server_tls, require_client_cert=False) as server:
        assert _client(server, certs, tmp_path, who=None).echo() < FAILS_WITHIN
        # ... but a certificate that is sent must be signed by the CA.
        fails_with_tls_error(_client(server, certs, tmp_path, who="rogue"), match="refused our")


def test_a_silent_client_does_not_stall_the_tls_server(tls_demo, certs, tmp_path):
    server, _ = tls_demo
    # A client that connects and never starts the handshake holds the server's
    # accepting thread for at most the handshake timeout (5 s), never for ever.
    with socket.create_connection(("127.0.0.1", server.port), timeout=5):
        pacs = pf.PACS(
            "127.0.0.1", server.port, server.ae_title, tls=certs.tls(), cache=tmp_path, **FAST
        )
        started = time.monotonic()
        assert pacs.echo() >= 0
        assert time.monotonic() - started < HANDSHAKE + FAILS_WITHIN


# --- the command line ----------------------------------------------------------------------


def test_cli_client_tls_flags(tls_demo, certs, capsys):
    server, _ = tls_demo
    peer = ["--peer", f"127.0.0.1:{server.port}", "--aet", server.ae_title, "--timeout", "5"]
    files = ["--tls-ca", certs.path("ca.pem")]
    mine = ["--tls-cert", certs.path("client.pem"), "--tls-key", certs.path("client.key")]
    assert cli.main(["echo", *peer, *files, *mine]) == 0
    assert "C-ECHO PFDEMO" in capsys.readouterr().out
    assert cli.main(["find", *peer, *files, *mine, "--level", "study"]) == 0
    assert cli.main(["echo", *peer, *files]) == 2
    assert "requires a client certificate" in capsys.readouterr().err
    assert cli.main(["echo", *peer, "--tls-cert", certs.path("client.pem")]) == 2
    assert "tls.cert is given without tls.key" in capsys.readouterr().err


def test_cli_serve_over_tls(certs, tmp_path):
    port = free_port()
    command = [
        sys.executable,
        "-m",
        "pacsframe.cli",
        "serve",
        str(tmp_path / "served"),
        "--port",
        str(port),
        "--cohort",
        "1",
        "--tls-cert",
        certs.path("server.pem"),
        "--tls-key",
        certs.path("server.key"),
        "--tls-ca",
        certs.path("ca.pem"),
    ]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    process = subprocess.Popen(
        command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, cwd=tmp_path
    )
    try:
        pacs = pf.PACS("127.0.0.1", port, "PFDEMO", tls=certs.tls(), cache=tmp_path, **FAST)
        deadline = time.monotonic() + 60
        for _ in range(600):
            with contextlib.suppress(pf.AssociationError):
                pacs.echo()
                break
            assert process.poll() is None, process.stdout.read().decode()
            assert time.monotonic() < deadline, "pacsframe serve did not start"
            time.sleep(0.1)
        assert len(pacs.find_studies()) > 0
        plain = pf.PACS("127.0.0.1", port, "PFDEMO", cache=tmp_path, **FAST)
        with pytest.raises(pf.AssociationError, match="requires DICOM TLS"):
            plain.echo()
    finally:
        process.terminate()
        output = process.communicate(timeout=20)[0].decode()
    assert "over TLS" in output


# --- against Orthanc with DICOM TLS --------------------------------------------------------


@pytest.fixture(scope="module")
def tls_orthanc(certs, tmp_path_factory):
    require_tool("Orthanc")
    folder = tmp_path_factory.mktemp("tls-orthanc")
    manifest = make_cohort(
        folder / "cohort", patients=1, seed=8, studies_per_patient=1, series_per_study=2, matrix=8
    )
    server = OrthancServer(
        folder / "orthanc",
        extra_config={
            # Orthanc 1.10 honours these (checked by running it: the log reports
            # "Receiving Association failed: TLS error: peer did not return a
            # certificate" for a client without one).
            "DicomTlsEnabled": True,
            "DicomTlsCertificate": certs.path("server.pem"),
            "DicomTlsPrivateKey": certs.path("server.key"),
            "DicomTlsTrustedCertificates": certs.path("ca.pem"),
            "DicomTlsRemoteCertificateRequired": True,
        },
    )
    with server:
        loader = pf.PACS(server.host, server.dicom_port, server.aet, tls=certs.tls(), **FAST)
        assert loader.store(manifest).completed == len(manifest)
        yield server, manifest


def _orthanc_client(server, certs, tmp_path, calling_ae="PFTLS", **tls) -> pf.PACS:
    return pf.PACS(
        server.host,
        server.dicom_port,
        server.aet,
        calling_ae,
        cache=tmp_path / "cache",
        tls=certs.tls(**tls),
        **FAST,
    )


@pytest.mark.orthanc
def test_orthanc_echo_find_get_over_tls(tls_orthanc, certs, tmp_path):
    server, manifest = tls_orthanc
    pacs = _orthanc_client(server, certs, tmp_path)
    assert pacs.echo() < FAILS_WITHIN
    studies = pacs.find_studies()
    assert list(studies.StudyInstanceUID) == list(manifest.StudyInstanceUID.unique())
    result = pacs.get(studies, progress=False)
    assert (result.completed, result.failed) == (len(manifest), 0)
    assert sorted(pacs.cache.instances().SOPInstanceUID) == sorted(manifest.SOPInstanceUID)


@pytest.mark.orthanc
def test_orthanc_moves_to_our_tls_storage_scp(tls_orthanc, certs, tmp_path):
    server, manifest = tls_orthanc
    pacs = _orthanc_client(server, certs, tmp_path, calling_ae="PFTLSMOVE")
    # Orthanc connects to our SCP with DICOM TLS, presenting its own certificate.
    server.add_modality(
        pacs.calling_ae, pacs.calling_ae, "127.0.0.1", pacs.scp_port, UseDicomTls=True
    )
    series = pacs.find_series(pacs.find_studies()).iloc[:1]
    result = pacs.move(series, progress=False)
    expected = manifest[manifest.SeriesInstanceUID.isin(series.SeriesInstanceUID)]
    assert (result.completed, result.failed) == (len(expected), 0)


@pytest.mark.orthanc
def test_orthanc_refuses_a_client_without_certificate(tls_orthanc, certs, tmp_path):
    server, _ = tls_orthanc
    pacs = _orthanc_client(server, certs, tmp_path, who=None)
    fails_with_tls_error(pacs, match="requires a client certificate and we sent none")


@pytest.mark.orthanc
def test_orthanc_wrong_ca_and_plain_client(tls_orthanc, certs, tmp_path):
    server, _ = tls_orthanc
    fails_with_tls_error(
        _orthanc_client(server, certs, tmp_path, ca="otherca"), match="was not signed by"
    )
    fails_with_tls_error(
        _orthanc_client(server, certs, tmp_path, who="rogue"), match="refused our certificate"
    )
    plain = pf.PACS(server.host, server.dicom_port, server.aet, cache=tmp_path, **FAST)
    fails_with_tls_error(plain, match="requires DICOM TLS")
