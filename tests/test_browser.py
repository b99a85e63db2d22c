"""End to end in a real browser: the query-form notebook served by Voila, driven by Chromium.

The widget logic has unit tests that need no browser; this test checks what those cannot:
that the notebook renders as an app, that the widgets' front end talks to the kernel, and
that a search and a retrieve started by clicks finish and report back on the page.

Chromium is Debian's (``/usr/bin/chromium``), driven by Playwright for Python; Playwright's
own browser download is never used. Nothing leaves loopback: Voila listens on 127.0.0.1,
and the page may load nothing from any other host.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import pytest
from playwright.sync_api import Error as PlaywrightError
from playwright.sync_api import Page, Route, expect, sync_playwright
from servers import _death_signal_prefix, free_port, require_tool

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOK = ROOT / "notebooks" / "03-query-form.ipynb"
# The notebook's cohort is make_cohort(..., patients=6, seed=3); IDs are PF{seed:02d}{n:04d}.
PATIENT_ID = "PF030001"

# Kernel start, cohort generation and the demo PACS all happen before the form appears.
RENDER_TIMEOUT_MS = 120_000
ACTION_TIMEOUT_MS = 30_000
SERVER_START_TIMEOUT_S = 60.0
SERVER_STOP_TIMEOUT_S = 15.0

CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-quic",
    "--no-first-run",
    # An http_proxy in the environment must not capture the loopback traffic.
    "--no-proxy-server",
]

pytestmark = pytest.mark.timeout(300)

# Loopback only, and no stray HTTP proxy for the readiness probe.
_NO_PROXY_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


@dataclass
class VoilaApp:
    url: str
    log_path: Path

    def log_tail(self, lines: int = 60) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError as exc:
            return f"(log {self.log_path} unreadable: {exc})"
        return "\n".join(text.splitlines()[-lines:])


def _isolated_env(home: Path) -> dict[str, str]:
    """Environment that keeps Jupyter, IPython, matplotlib and caches inside ``home``."""
    env = dict(os.environ)
    dirs = {
        "HOME": home,
        "JUPYTER_CONFIG_DIR": home / "jupyter-config",
        "JUPYTER_DATA_DIR": home / "jupyter-data",
        "JUPYTER_RUNTIME_DIR": home / "jupyter-runtime",
        "IPYTHONDIR": home / "ipython",
        "MPLCONFIGDIR": home / "matplotlib",
        "XDG_CONFIG_HOME": home / "config",
        "XDG_CACHE_HOME": home / "cache",
        "XDG_DATA_HOME": home / "data",
        "PACSFRAME_CACHE": home / "pacsframe-cache",
        # Kernel connection files and any tempfile the notebook makes.
        "TMPDIR": home / "tmp",
    }
    for name, path in dirs.items():
        path.mkdir(parents=True, exist_ok=True)
        env[name] = str(path)
    # Use platformdirs locations (and thus the variables above), as Jupyter will by default.
    env["JUPYTER_PLATFORM_DIRS"] = "1"
    # A user's peer config must not change what the notebook connects to.
    env.pop("PACSFRAME_CONFIG", None)
    return env


def _descendants(pid: int) -> list[int]:
    """PIDs below ``pid`` in the process tree (Linux /proc), nearest first."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        # The command name is in parentheses and may contain spaces; fields follow it.
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(entry.name))
    found: list[int] = []
    queue = [pid]
    while queue:
        for child in children.get(queue.pop(0), []):
            found.append(child)
            queue.append(child)
    return found


def _stop_voila(process: subprocess.Popen[bytes]) -> None:
    # jupyter_client starts each kernel in a session of its own, so killing Voila's process
    # group would miss them: note them now and kill any that outlive Voila's own shutdown.
    kernels = _descendants(process.pid) if sys.platform.startswith("linux") else []
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=SERVER_STOP_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=10)
    for pid in kernels:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGKILL)


def _wait_until_answering(url: str, process: subprocess.Popen[bytes], app: VoilaApp) -> None:
    deadline = time.monotonic() + SERVER_START_TIMEOUT_S
    # Bounded by the deadline and by a count, in case the clock misbehaves.
    for _ in range(2_000):
        code = process.poll()
        if code is not None:
            pytest.fail(f"voila exited with code {code} while starting:\n{app.log_tail()}")
        try:
            with _NO_PROXY_OPENER.open(url, timeout=2) as response:
                if response.status == 200:
                    return
        except (OSError, urllib.error.URLError):
            pass
        if time.monotonic() >= deadline:
            break
        time.sleep(0.1)
    pytest.fail(f"voila did not answer {url} within {SERVER_START_TIMEOUT_S} s:\n{app.log_tail()}")


@pytest.fixture
def voila_app(tmp_path: Path) -> Iterator[VoilaApp]:
    assert NOTEBOOK.is_file(), f"{NOTEBOOK} is missing"
    port = free_port()
    log_path = tmp_path / "voila.log"
    command = [
        sys.executable,
        "-m",
        "voila",
        "--no-browser",
        f"--port={port}",
        "--Voila.ip=127.0.0.1",
        # Fail on a taken port instead of silently serving on another one.
        "--Voila.port_retries=0",
        "--Voila.token=",
        "--show_tracebacks=True",
        f"--Voila.connection_dir_root={tmp_path / 'home' / 'tmp'}",
        str(NOTEBOOK),
    ]
    with open(log_path, "ab") as log:
        process = subprocess.Popen(
            _death_signal_prefix() + command,
            cwd=ROOT,
            env=_isolated_env(tmp_path / "home"),
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            # Own process group, so teardown can signal Voila and anything it forks at once.
            start_new_session=True,
        )
    app = VoilaApp(url=f"http://127.0.0.1:{port}/", log_path=log_path)
    try:
        # A static asset, not the page itself: each page load starts a kernel.
        _wait_until_answering(f"{app.url}voila/static/favicon.ico", process, app)
        yield app
    finally:
        _stop_voila(process)


@pytest.fixture
def chromium() -> str:
    # A fixture listed before voila_app, so a missing browser fails (CI) or skips before
    # Voila and a kernel are started for nothing.
    return require_tool("chromium")


def test_query_form_search_and_retrieve(
    chromium: str, voila_app: VoilaApp, tmp_path: Path
) -> None:
    screenshot = tmp_path / "query-form.png"
    blocked: list[str] = []
    console: list[str] = []

    def loopback_only(route: Route) -> None:
        if urlsplit(route.request.url).hostname in {"127.0.0.1", "localhost"}:
            route.continue_()
        else:
            blocked.append(route.request.url)
            route.abort()

    # Chromium writes crash and config files under HOME even with a temporary profile.
    browser_home = tmp_path / "browser-home"
    browser_home.mkdir()
    with sync_playwright() as p:
        browser = p.chromium.launch(
            executable_path=chromium,
            headless=True,
            args=CHROMIUM_ARGS,
            env={**os.environ, "HOME": str(browser_home), "XDG_CONFIG_HOME": str(browser_home)},
            timeout=60_000,
        )
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 1400})
            page.set_default_timeout(ACTION_TIMEOUT_MS)
            page.route("**/*", loopback_only)
            page.on("console", lambda message: console.append(f"{message.type}: {message.text}"))
            try:
                completed = _search_and_retrieve(page, voila_app.url)
            except (AssertionError, PlaywrightError) as exc:
                with contextlib.suppress(PlaywrightError):
                    page.screenshot(path=screenshot, full_page=True)
                raise AssertionError(
                    f"{exc}\nscreenshot: {screenshot}\nblocked requests: {blocked}\n"
                    "browser console:\n" + "\n".join(console[-30:]) + "\n"
                    f"end of voila log:\n{voila_app.log_tail()}"
                ) from exc
            # Voila's page scrolls an inner element, so a full-page shot would show only the
            # viewport; an element shot captures the whole form.
            page.locator(".pf-query-form").screenshot(path=screenshot)
        finally:
            browser.close()

    assert completed > 0, f"the status line reports 0 retrieved; screenshot: {screenshot}"
    assert screenshot.stat().st_size > 0, f"empty screenshot: {screenshot}"


def _search_and_retrieve(page: Page, url: str) -> int:
    """Search for PATIENT_ID, retrieve the first result row; return the count reported."""
    # Voila streams the page while it runs the notebook, whose later cells drive the form
    # from code; "load" fires when the stream ends, so our clicks cannot interleave with them.
    page.goto(url, wait_until="load", timeout=RENDER_TIMEOUT_MS)
    patient_id = page.locator(".pf-patient-id input")
    expect(patient_id).to_be_visible(timeout=RENDER_TIMEOUT_MS)

    patient_id.fill(PATIENT_ID)
    # ipywidgets sends a Text value to the kernel on input events; blur makes sure the last
    # one is out before the click's message, which the kernel handles in order.
    patient_id.blur()
    page.locator("button.pf-search").click()

    # The notebook leaves another patient's rows in the list: wait for ours.
    results = page.locator(".pf-results select")
    first_row = results.locator("option").first
    expect(first_row).to_contain_text(PATIENT_ID, timeout=ACTION_TIMEOUT_MS)
    results.select_option(index=0)
    expect(first_row).to_have_js_property("selected", True)

    status = page.locator(".pf-status .pf-status-text")
    done = re.compile(r"Retrieved (\d+) objects \((\d+) failed")
    # A "Retrieved" left over from the notebook's own retrieve would pass the check below.
    expect(status).not_to_contain_text(done)
    page.locator("button.pf-retrieve").click()
    expect(status).to_contain_text(done, timeout=ACTION_TIMEOUT_MS)
    text = status.inner_text()
    match = done.search(text)
    assert match, f"status line: {text!r}"
    assert match.group(2) == "0", f"some objects failed: {text!r}"
    expect(status).to_have_attribute("data-kind", "ok")
    return int(match.group(1))
