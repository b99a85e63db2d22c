"""Start and stop real DICOM peers for the integration tests and the benchmarks.

Four peers are provided: :class:`OrthancServer` (Debian's ``orthanc`` package),
:class:`DcmtkStoreSCP` (dcmtk's ``storescp``), :class:`DcmqrscpServer` (dcmtk's
``dcmqrscp``, a query/retrieve archive) and :class:`WlmscpfsServer` (dcmtk's
``wlmscpfs``, a modality worklist server over files). Each runs as a child process in its own
folder on free ports, is stopped by :meth:`stop`, by its context manager, by an ``atexit``
hook, and - where ``setpriv`` exists - by the kernel when the Python process dies, so a
crashed or killed test run does not leave servers behind.

Loopback only: Orthanc 1.10 has no bind-address option (its HTTP and DICOM servers listen
on all interfaces; ``RemoteAccessAllowed: false`` makes HTTP refuse non-local clients) and
storescp and dcmqrscp 3.6.7 have none either, so the peers use loopback addresses
throughout but the DICOM ports are reachable from other hosts while a test runs.

This module imports without pytest so ``benchmarks/`` can use it too.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Self

__all__ = [
    "DcmqrscpServer",
    "DcmtkStoreSCP",
    "OrthancRestError",
    "OrthancServer",
    "WlmscpfsServer",
    "dcmtk_env",
    "free_port",
    "require_tool",
]

LOOPBACK = "127.0.0.1"

# Debian package per executable, for the "apt-get install" hint of require_tool.
_DEBIAN_PACKAGES = {
    "Orthanc": "orthanc",
    # Debian's browser package; the browser test drives it with Playwright.
    "chromium": "chromium",
    **{
        tool: "dcmtk"
        for tool in (
            "echoscu",
            "findscu",
            "getscu",
            "movescu",
            "storescu",
            "storescp",
            "dcmdump",
            "dcmodify",
            "dcmqridx",
            "dcmqrscp",
            "dump2dcm",
            "img2dcm",
            "wlmscpfs",
        )
    },
}

# Orthanc is installed in /usr/sbin, which is not on a normal user's PATH.
_EXTRA_TOOL_DIRS = ("/usr/sbin", "/usr/local/sbin", "/sbin")


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that was free a moment ago.

    Another process may take it before the caller binds it; the servers below retry with
    new ports when that happens.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((LOOPBACK, 0))
        return sock.getsockname()[1]


def _in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in {"true", "1"}


def require_tool(name: str) -> str:
    """Return the full path of executable ``name``, or skip/fail the test without it.

    Under pytest a missing tool skips the test, except on CI (``CI=true`` or ``CI=1``)
    where it fails so a broken CI image cannot pass by skipping everything. Outside
    pytest (benchmarks) it raises :class:`RuntimeError`.
    """
    path = shutil.which(name) or shutil.which(name, path=os.pathsep.join(_EXTRA_TOOL_DIRS))
    if path:
        return path
    package = _DEBIAN_PACKAGES.get(name, name.lower())
    message = (
        f"{name} was not found on PATH or in /usr/sbin; install it with "
        f"`apt-get install {package}` (Debian package {package!r})."
    )
    # Only treat this as a pytest run when pytest is already loaded; importing it here
    # would make a benchmark raise pytest's Skipped instead of a plain error.
    if "pytest" not in sys.modules:
        raise RuntimeError(message)
    import pytest

    if _in_ci():
        pytest.fail(message, pytrace=False)
    pytest.skip(message)
    raise AssertionError("unreachable")  # pytest.skip raises; keeps type checkers happy


def dcmtk_env() -> dict[str, str]:
    """Return a copy of the environment for dcmtk's tools, with ``TCP_NODELAY=1``.

    dcmtk reads ``TCP_NODELAY`` from the environment; without it, Nagle's algorithm
    and delayed ACKs stall each DIMSE exchange for about 40 ms.
    """
    env = dict(os.environ)
    env["TCP_NODELAY"] = "1"
    return env


def _port_open(host: str, port: int, timeout: float = 0.2) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def _log_tail(path: Path, lines: int = 40) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError as exc:
        return f"(log {path} unreadable: {exc})"
    return "\n".join(text.splitlines()[-lines:])


_SETPRIV = shutil.which("setpriv")


def _death_signal_prefix() -> list[str]:
    """Command prefix that makes the kernel TERM the child when this process dies.

    ``setpriv --pdeathsig`` covers deaths that skip ``atexit`` (SIGKILL, ``os._exit`` as
    used by pytest-timeout's thread method). It is exec-based, so unlike ``preexec_fn``
    it is safe with the threads pynetdicom starts. Linux sends the signal when the
    *thread* that started the child exits, so start servers from a long-lived thread.
    """
    if _SETPRIV and sys.platform.startswith("linux"):
        return [_SETPRIV, "--pdeathsig", "TERM", "--"]
    return []


_running: set[_ManagedProcess] = set()
_running_lock = threading.Lock()
_atexit_registered = False


def _stop_all_at_exit() -> None:
    with _running_lock:
        servers = list(_running)
    for server in servers:
        with contextlib.suppress(Exception):
            # The interpreter is exiting: do not spend seconds on clean shutdowns.
            server.stop(timeout=5, graceful=False)


def _track(server: _ManagedProcess) -> None:
    global _atexit_registered
    with _running_lock:
        _running.add(server)
        if not _atexit_registered:
            atexit.register(_stop_all_at_exit)
            _atexit_registered = True


def _untrack(server: _ManagedProcess) -> None:
    with _running_lock:
        _running.discard(server)


class _ManagedProcess:
    """A child process with a log file, bounded start-up wait and idempotent stop."""

    host: str = LOOPBACK
    #: Number of launches with fresh ports when a port turned out to be taken.
    _port_attempts = 3

    def __init__(self, workdir: str | os.PathLike[str], log_name: str) -> None:
        self.workdir = Path(workdir).resolve()
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.log_path = self.workdir / log_name
        self.process: subprocess.Popen[bytes] | None = None
        #: Exit code of the process ended by the last :meth:`stop`.
        self.last_returncode: int | None = None
        self._log_file: Any = None

    # Subclasses fill these in.
    def _command(self) -> list[str]:
        raise NotImplementedError

    def _env(self) -> dict[str, str] | None:
        return None

    def _prepare(self) -> None:
        """Write configuration files before each launch."""

    def _ready(self) -> bool:
        raise NotImplementedError

    def _pick_new_ports(self) -> None:
        raise NotImplementedError

    def _port_in_use(self, log: str) -> bool:
        return "already in use" in log.lower()

    @property
    def running(self) -> bool:
        """Whether the child process has been started and has not exited."""
        return self.process is not None and self.process.poll() is None

    def start(self, timeout: float = 60) -> Self:
        """Launch the server and wait until it answers, at most ``timeout`` seconds.

        Raises :class:`RuntimeError` with the end of the log if the process exits or does
        not become ready in time. Returns ``self`` so ``server = X(...).start()`` works.
        """
        if self.running:
            return self
        deadline = time.monotonic() + timeout
        for attempt in range(1, self._port_attempts + 1):
            self._launch()
            error = self._wait_ready(deadline)
            if error is None:
                return self
            log = _log_tail(self.log_path)
            self.stop(graceful=False)
            # free_port() cannot reserve a port, so a parallel process may have taken it.
            if self._port_in_use(log) and attempt < self._port_attempts:
                self._pick_new_ports()
                continue
            raise RuntimeError(
                f"{type(self).__name__} in {self.workdir} {error}; end of {self.log_path}:\n{log}"
            )
        raise AssertionError("unreachable")

    def _launch(self) -> None:
        self._prepare()
        # Append so a restart or a port retry keeps the earlier log for diagnosis.
        self._log_file = open(self.log_path, "ab")  # noqa: SIM115 - closed in stop()
        self.process = subprocess.Popen(
            _death_signal_prefix() + self._command(),
            cwd=self.workdir,
            env=self._env(),
            stdin=subprocess.DEVNULL,
            stdout=self._log_file,
            stderr=subprocess.STDOUT,
            # Own session: a Ctrl-C meant for pytest should not hit the server first and
            # make teardown fail; stop() and the death signal end it instead.
            start_new_session=True,
        )
        _track(self)

    def _wait_ready(self, deadline: float) -> str | None:
        """Poll until ready; return None on success or a reason for failure."""
        assert self.process is not None
        # Bounded twice: by the deadline and by a count (in case the clock misbehaves).
        for _ in range(10_000):
            code = self.process.poll()
            if code is not None:
                return f"exited with code {code} while starting"
            if self._ready():
                return None
            if time.monotonic() >= deadline:
                return "did not become ready before the timeout"
            time.sleep(0.05)
        return "did not become ready after the maximum number of polls"

    def stop(self, timeout: float = 20, *, graceful: bool = True) -> None:
        """Stop the server and wait for it to exit. Idempotent.

        Graceful: SIGTERM, wait up to ``timeout`` seconds, then SIGKILL. Orthanc 1.10
        needs about 3 s to shut down cleanly; ``graceful=False`` kills at once, which is
        fine for a throw-away folder (SQLite rolls back any half-written transaction).
        """
        process, self.process = self.process, None
        if process is not None:
            if process.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    process.send_signal(signal.SIGTERM if graceful else signal.SIGKILL)
                try:
                    process.wait(timeout=timeout)
                except subprocess.TimeoutExpired:
                    with contextlib.suppress(ProcessLookupError):
                        process.kill()
                    with contextlib.suppress(subprocess.TimeoutExpired):
                        process.wait(timeout=10)
            self.last_returncode = process.returncode
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None
        _untrack(self)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


class OrthancRestError(RuntimeError):
    """An Orthanc REST call answered with an HTTP error status."""

    def __init__(self, method: str, url: str, status: int, body: str) -> None:
        super().__init__(f"{method} {url} -> HTTP {status}: {body[:2000]}")
        self.status = status
        self.body = body


# Bypass any http_proxy in the environment: the server is on loopback.
_NO_PROXY_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


class OrthancServer(_ManagedProcess):
    """Debian's Orthanc in a temporary folder, on free HTTP and DICOM ports.

    Every configuration key used below exists in Orthanc 1.10 (checked against
    ``/etc/orthanc/orthanc.json`` and the binary); Orthanc silently ignores unknown keys,
    so a misspelt key would not fail loudly.
    """

    def __init__(
        self,
        workdir: str | os.PathLike[str],
        *,
        aet: str = "ORTHANC",
        check_called_aet: bool = False,
        modalities: dict[str, tuple[str, str, int]] | None = None,
        extra_config: dict[str, Any] | None = None,
        verbose: bool = False,
    ) -> None:
        super().__init__(workdir, "orthanc.log")
        self.aet = aet
        self.check_called_aet = check_called_aet
        self.modalities = dict(modalities or {})
        self.extra_config = dict(extra_config or {})
        self.verbose = verbose
        self.config_path = self.workdir / "orthanc.json"
        self.storage_dir = self.workdir / "storage"
        self.dicom_port = free_port()
        self.http_port = free_port()

    @property
    def url(self) -> str:
        """Base URL of the REST API."""
        return f"http://{self.host}:{self.http_port}"

    def config(self) -> dict[str, Any]:
        """The configuration written for the next start."""
        config: dict[str, Any] = {
            "Name": f"pacsframe-test-{self.aet}",
            "DicomAet": self.aet,
            "DicomPort": self.dicom_port,
            "HttpPort": self.http_port,
            "StorageDirectory": str(self.storage_dir),
            "IndexDirectory": str(self.storage_dir),
            "Plugins": [],
            "HttpServerEnabled": True,
            "DicomServerEnabled": True,
            # HTTP: local clients only, no login. (No bind-address key exists in 1.10.)
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False,
            "DicomCheckCalledAet": self.check_called_aet,
            # Any calling AE may echo/find/get/store, as with a typical PACS test peer.
            # C-MOVE is refused (no C-MOVE-RSP at all) unless the *calling* AE is a
            # registered modality, so tests exercise add_modality() as real sites do.
            "DicomAlwaysAllowEcho": True,
            "DicomAlwaysAllowFind": True,
            "DicomAlwaysAllowGet": True,
            "DicomAlwaysAllowStore": True,
            "DicomAlwaysAllowMove": False,
            "DicomModalities": {
                name: {
                    "AET": remote_aet,
                    "Host": remote_host,
                    "Port": remote_port,
                    "AllowEcho": True,
                    "AllowFind": True,
                    "AllowGet": True,
                    "AllowMove": True,
                    "AllowStore": True,
                }
                for name, (remote_aet, remote_host, remote_port) in self.modalities.items()
            },
            "DicomScpTimeout": 30,
            "DicomScuTimeout": 10,
            # Several associations at once (parallel retrieves, benchmarks).
            "DicomThreadsCount": 8,
            # C-MOVE answered inside the association rather than as a background job,
            # so a finished C-MOVE means the sub-operations are done.
            "SynchronousCMove": True,
            "ConcurrentJobs": 4,
            "SaveJobs": False,
            "StableAge": 1,
            "DefaultEncoding": "Latin1",
            "LogExportedResources": False,
            "StorageCompression": False,
            # Orthanc as an HTTP client (peers); bounded so nothing hangs a test.
            "HttpTimeout": 10,
            "HttpRequestTimeout": 30,
            # Only affects Lua-initiated associations in 1.10, but 0 is what tests want.
            "DicomAssociationCloseDelay": 0,
            # fsync per stored file is pointless for a throw-away folder and costs time.
            "SyncStorageArea": False,
            # Test data is synthetic; real queries in the log help debugging.
            "DeidentifyLogs": False,
            "WebDavEnabled": False,
            "OrthancExplorerEnabled": False,
        }
        config.update(self.extra_config)
        return config

    def _prepare(self) -> None:
        self.storage_dir.mkdir(parents=True, exist_ok=True)
        self.config_path.write_text(json.dumps(self.config(), indent=2))

    def _command(self) -> list[str]:
        orthanc = require_tool("Orthanc")
        # stdout/stderr go to log_path (see _launch), which also catches anything printed
        # outside Orthanc's logger, so --logfile is not used.
        return [orthanc, *(["--verbose"] if self.verbose else []), str(self.config_path)]

    def _env(self) -> dict[str, str]:
        # Orthanc's DICOM layer is dcmtk, which reads TCP_NODELAY too.
        return dcmtk_env()

    def _pick_new_ports(self) -> None:
        self.dicom_port = free_port()
        self.http_port = free_port()

    def _ready(self) -> bool:
        # Orthanc opens its DICOM port before its HTTP port, so /system answering means
        # both are up.
        try:
            with _NO_PROXY_OPENER.open(f"{self.url}/system", timeout=1) as response:
                return response.status == 200
        except (OSError, urllib.error.URLError):
            return False

    def rest(self, method: str, path: str, body: Any = None, timeout: float = 30) -> Any:
        """Call the REST API; return the decoded JSON answer (None when empty).

        ``body`` is sent as JSON unless it is ``bytes``. Raises :class:`OrthancRestError`
        on an HTTP error status.
        """
        url = f"{self.url}/{path.lstrip('/')}"
        data = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
        request = urllib.request.Request(url, data=data, method=method.upper())
        if data is not None and not isinstance(body, bytes):
            request.add_header("Content-Type", "application/json")
        try:
            with _NO_PROXY_OPENER.open(request, timeout=timeout) as response:
                payload = response.read()
        except urllib.error.HTTPError as exc:
            text = exc.read().decode(errors="replace")
            raise OrthancRestError(method.upper(), url, exc.code, text) from None
        if not payload.strip():
            return None
        try:
            return json.loads(payload)
        except ValueError:
            return payload.decode(errors="replace")

    def system(self) -> dict[str, Any]:
        """``GET /system``: version, AET, ports."""
        return self.rest("GET", "/system")

    def count_instances(self) -> int:
        """Number of instances stored."""
        return int(self.rest("GET", "/statistics")["CountInstances"])

    def clear(self) -> None:
        """Delete every stored patient (and so every instance)."""
        patients = self.rest("GET", "/patients")
        if patients:
            self.rest("POST", "/tools/bulk-delete", {"Resources": patients}, timeout=120)

    def add_modality(
        self,
        name: str,
        aet: str,
        host: str,
        port: int,
        **options: Any,
    ) -> None:
        """Register a remote AE at runtime (``PUT /modalities/{name}``).

        ``options`` override body keys of Orthanc 1.10, e.g. ``AllowMove=False``; by
        default the AE may use every service. Not persisted across restarts.
        """
        body = {
            "AET": aet,
            "Host": host,
            "Port": int(port),
            "AllowEcho": True,
            "AllowFind": True,
            "AllowGet": True,
            "AllowMove": True,
            "AllowStore": True,
            **options,
        }
        self.rest("PUT", f"/modalities/{name}", body)
        self.modalities[name] = (aet, host, int(port))

    def registered_modalities(self) -> dict[str, Any]:
        """``GET /modalities?expand``: name -> settings of each known modality."""
        return self.rest("GET", "/modalities?expand")


class _DcmtkServer(_ManagedProcess):
    """A dcmtk tool on :attr:`port`: dcmtk's environment, a free port, ready when open."""

    #: dcmtk's options that bound waiting for a silent peer (30 s), not for ever.
    _TIMEOUTS = ("--dimse-timeout", "30", "--acse-timeout", "30")

    def __init__(self, workdir: str | os.PathLike[str], log_name: str) -> None:
        super().__init__(workdir, log_name)
        self.port = free_port()

    @property
    def dicom_port(self) -> int:
        """Same as :attr:`port`, named like :attr:`OrthancServer.dicom_port`."""
        return self.port

    def _env(self) -> dict[str, str]:
        return dcmtk_env()

    def _pick_new_ports(self) -> None:
        self.port = free_port()

    def _ready(self) -> bool:
        return _port_open(self.host, self.port)


class DcmtkStoreSCP(_DcmtkServer):
    """dcmtk's ``storescp`` writing received objects to ``output_dir``.

    Accepts every storage SOP class dcmtk knows plus unknown ones (``--promiscuous``) in
    every supported transfer syntax (``+xa``); files are named ``<modality>.<SOP UID>``.
    """

    def __init__(
        self,
        workdir: str | os.PathLike[str],
        *,
        aet: str = "STORESCP",
        extra_args: list[str] | None = None,
    ) -> None:
        super().__init__(workdir, "storescp.log")
        self.aet = aet
        self.extra_args = list(extra_args or [])
        self.output_dir = self.workdir / "received"

    def received_files(self) -> list[Path]:
        """Files written so far, sorted by name."""
        if not self.output_dir.is_dir():
            return []
        return sorted(p for p in self.output_dir.iterdir() if p.is_file())

    def _prepare(self) -> None:
        self.output_dir.mkdir(parents=True, exist_ok=True)

    def _command(self) -> list[str]:
        return [
            require_tool("storescp"),
            "--aetitle",
            self.aet,
            "--output-directory",
            str(self.output_dir),
            "--accept-all",
            "--promiscuous",
            *self.extra_args,
            str(self.port),
        ]


class DcmqrscpServer(_DcmtkServer):
    """dcmtk's ``dcmqrscp`` archive in a temporary folder, on a free port.

    One storage area (AE title ``aet``, read/write, open to any calling AE) under
    ``workdir/storage``, with a ``dcmqrscp.cfg`` written before each start. It answers
    C-ECHO, C-FIND (patient and study root), C-GET and C-MOVE, and accepts C-STORE.

    ``destinations`` maps AE titles to ``(host, port)``: dcmqrscp moves only to AEs in
    its HostTable, which is read once at start-up, so :meth:`add_destination` restarts
    a running server (the index in the storage area survives; the port may change if
    it was taken meanwhile). :meth:`index` registers files already on disk
    (``dcmqridx``) so a cohort is loaded without a network round trip; the files stay
    where they are and are served as they are, byte for byte.

    Quirks seen with dcmqrscp 3.6.7, which a client must live with:

    * its index holds a fixed set of attributes: C-FIND answers leave out the rest
      (``ModalitiesInStudy``, the ``NumberOf...Related...`` counts, series date and
      time), so those columns are empty, and it adds ``RetrieveAETitle``;
    * it caps a storage area at 500 studies (a larger quota is lowered, with a warning)
      and deletes the oldest studies beyond the quota;
    * when a query has no ``SpecificCharacterSet`` it tries to convert non-ASCII
      answers to ASCII, fails, logs a warning and sends the stored bytes and character
      set unchanged;
    * it accepts C-MOVE/C-GET contexts without a C-FIND context but logs an error
      ("Move Presentation Context but no Find"); ``--require-find`` would refuse them;
    * its ``MaxPDUSize`` is 16 kB by default, so objects arrive in many PDUs.
    """

    def __init__(
        self,
        workdir: str | os.PathLike[str],
        *,
        aet: str = "DCMQRSCP",
        destinations: dict[str, tuple[str, int]] | None = None,
        max_pdu: int = 16384,
        extra_args: list[str] | None = None,
    ) -> None:
        super().__init__(workdir, "dcmqrscp.log")
        self.aet = aet
        self.destinations = {
            ae: (host, int(port)) for ae, (host, port) in (destinations or {}).items()
        }
        self.max_pdu = max_pdu
        self.extra_args = list(extra_args or [])
        self.config_path = self.workdir / "dcmqrscp.cfg"
        self.storage_dir = self.workdir / "storage" / aet

    def config(self) -> str:
        """The ``dcmqrscp.cfg`` written for the next start."""
        hosts = [
            # Symbolic names are unique words; the AE title is the destination. The
            # example configuration says a host name, not an IP address, is wanted.
            f"dest{i} = ({ae}, {'localhost' if host == LOOPBACK else host}, {port})"
            for i, (ae, (host, port)) in enumerate(sorted(self.destinations.items()))
        ]
        return "\n".join(
            [
                f"NetworkTCPPort  = {self.port}",
                f"MaxPDUSize      = {self.max_pdu}",
                "MaxAssociations = 16",
                "HostTable BEGIN",
                *hosts,
                "HostTable END",
                "VendorTable BEGIN",
                "VendorTable END",
                "AETable BEGIN",
                # AETitle StorageArea Access Quota(maxStudies, maxBytesPerStudy) Peers.
                # 500 studies is dcmqrscp's most; beyond the quota it deletes the oldest.
                f"{self.aet} {self.storage_dir} RW (500, 1024mb) ANY",
                "AETable END",
                "",
            ]
        )

    def add_destination(self, aet: str, host: str, port: int) -> None:
        """Let dcmqrscp C-MOVE to ``aet`` at ``host:port``; restarts a running server."""
        self.destinations[aet] = (host, int(port))
        if self.running:
            self.stop()
            self.start()

    def index(self, paths: list[str] | list[Path], timeout: float = 120) -> None:
        """Register Part-10 files in the storage area's index (``dcmqridx``), in place.

        The files must stay where they are while the server runs. Raises
        :class:`RuntimeError` with dcmqridx's output when it fails.
        """
        self.storage_dir.mkdir(parents=True, exist_ok=True)
        dcmqridx = require_tool("dcmqridx")
        # A batch per call keeps the command line short; each call is bounded.
        for i in range(0, len(paths), 200):
            done = subprocess.run(
                [dcmqridx, str(self.storage_dir), *map(str, paths[i : i + 200])],
                capture_output=True,
                text=True,
                timeout=timeout,
            )
            if done.returncode != 0:
                raise RuntimeError(
                    f"dcmqridx exited {done.returncode}: {(done.stdout + done.stderr)[-2000:]}"
                )

    def _prepare(self) -> None:
        self.storage_dir.mkdir(parents=True, exist_ok=True)
        self.config_path.write_text(self.config())

    def _command(self) -> list[str]:
        return [
            require_tool("dcmqrscp"),
            "--config",
            str(self.config_path),
            *self._TIMEOUTS,
            *self.extra_args,
            str(self.port),
        ]

    def stop(self, timeout: float = 20, *, graceful: bool = True) -> None:
        """Stop dcmqrscp and the children it forked, one per association. Idempotent.

        A child serving an association would outlive its parent (and the parent's
        death signal); the children share the server's own session and process group
        (``start_new_session``), so the whole group gets the signal. Only while the
        parent is unreaped: its pid, and so the group's id, cannot have been reused.
        """
        process = self.process
        if process is not None and process.poll() is None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(process.pid, signal.SIGTERM if graceful else signal.SIGKILL)
        super().stop(timeout, graceful=graceful)


class WlmscpfsServer(_DcmtkServer):
    """dcmtk's ``wlmscpfs`` worklist server over a folder of ``*.wl`` files, on a free port.

    It serves the files in :attr:`worklist_dir` (``<workdir>/worklists/<aet>/``, which
    also holds the empty ``lockfile`` wlmscpfs requires) to requests that call
    ``aet``; files are read at each request, so tests may write them while it runs.
    ``--keep-char-set`` returns the files' SpecificCharacterSet (by default wlmscpfs
    returns none). Incomplete files (missing type 1 return keys) are rejected (its
    default ``--enable-file-reject``). Single process (``--single-process``): no child
    per association to outlive a stop.
    """

    def __init__(
        self,
        workdir: str | os.PathLike[str],
        *,
        aet: str = "WLMSCPFS",
        extra_args: list[str] | None = None,
    ) -> None:
        super().__init__(workdir, "wlmscpfs.log")
        self.aet = aet
        self.extra_args = list(extra_args or [])
        self.data_dir = self.workdir / "worklists"
        self.worklist_dir = self.data_dir / aet

    def _prepare(self) -> None:
        self.worklist_dir.mkdir(parents=True, exist_ok=True)
        (self.worklist_dir / "lockfile").touch()

    def _command(self) -> list[str]:
        return [
            require_tool("wlmscpfs"),
            "--single-process",
            "--data-files-path",
            str(self.data_dir),
            "--keep-char-set",
            *self._TIMEOUTS,
            *self.extra_args,
            str(self.port),
        ]
