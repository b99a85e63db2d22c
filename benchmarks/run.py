"""Side-by-side benchmark: pacsframe vs raw pynetdicom vs dcmtk, against a real Orthanc.

Run ``make bench`` (or ``python benchmarks/run.py --help``). The harness

* starts Orthanc (``tests/servers.py``, the test fixture code) on a folder under
  ``--workdir`` that is reused between runs: the cohorts are written and loaded once,
  and a marker file plus Orthanc's ``/statistics`` say whether the store is complete;
* runs each work item for ``--rounds`` rounds, the tools alternating within a round
  (the order rotates every round so no tool always goes first);
* after the C-GET cold rounds, measures the peak RSS of fresh processes (below);
* prints a table of medians, min-max, the ratio pacsframe / fastest other tool and the
  peak RSS of each tool, and writes it as markdown with ``--results``.

How each tool is timed:

* pacsframe and raw pynetdicom each run in a long-lived worker subprocess that imports
  once and then executes items on command, so pacsframe is timed in process with its
  imports done, as a notebook user feels it. Before each timed call the worker resets
  the kernel's RSS high-water mark (``/proc/self/clear_refs``) and reads ``VmHWM``
  after it, so the peak RSS is of that call (it includes the interpreter and imports,
  and whatever the worker's earlier items left allocated: CPython and glibc seldom
  give freed memory back to the OS).
* So the cold C-GET also gets a whole-process peak, comparable with dcmtk's and the
  one its RSS target is judged on: after its timed rounds, untimed, one fresh process
  per probe (``--rss-probe KIND``, the worker code measuring exactly one command)
  does the cold C-GET into an emptied folder and reports its ``VmHWM``: pacsframe
  (query the study, then ``get(..., workers=1)``), pacsframe without pyarrow
  (``sys.modules["pyarrow"] = None`` before anything imports pandas: its base install,
  as pyarrow is only the optional ``parquet`` extra, yet pandas 3 imports it whenever
  it is installed) and raw pynetdicom; two more probes only import pacsframe, with and
  without pyarrow, for the baseline. Probes run this script, whose own standard-library
  imports add under 1 MB to a bare ``python -c "import pacsframe"``.
* The memory a get adds: after the 2,000-object rounds, two more fresh pacsframe
  processes (``workers=1``) get the 500- and the 2,000-object study; each reports its
  ``VmRSS`` right after ``import pacsframe`` and its ``VmHWM`` at the end, and the
  difference is the RSS the get added over the imported baseline. It must stay under
  ``ADDED_RSS_TARGET_MB`` and not grow with the study (``GROWTH_TOLERANCE_MB``).
* dcmtk tools are timed as whole processes (start to exit) with ``TCP_NODELAY=1``,
  their best configuration; peak RSS from GNU time's ``wait4`` rusage. ``movescu``
  receives the objects it moves itself, on its own port (``+P``).
* The DICOMweb items (``wado-cold``, ``qido-studies``) run against the same store with
  Orthanc's DICOMweb plugin loaded (Debian's ``orthanc-dicomweb``): pacsframe's
  ``pf.DICOMweb`` in its worker, dicomweb-client in a long-lived worker of its own,
  and ``curl`` (the WADO-RS floor: the multipart body saved unparsed) as a process,
  timed like the dcmtk tools.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import importlib
import importlib.util
import json
import os
import platform
import select
import shutil
import statistics
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
# The repository's pacsframe (not an installed copy) and the tests' server fixtures.
sys.path.insert(0, str(ROOT))
sys.path.insert(1, str(ROOT / "tests"))

HOST = "127.0.0.1"
CALL_TIMEOUT = 900.0  # seconds any single timed call may take before the run fails

_FULL: dict[str, dict[str, Any]] = {
    # 2,000 studies of one small instance: 2,002 study rows with the two retrieve studies.
    "query": {
        "patients": 2000,
        "seed": 601,
        "studies_per_patient": 1,
        "series_per_study": 1,
        "instances_per_series": 1,
        "matrix": 8,
        "modalities": ["CT", "MR"],
    },
    # One CT study of 500 512x512 instances in 2 series (about 256 MB): the issue's
    # study, where workers=2 can give each association a series.
    "retrieve": {
        "patients": 1,
        "seed": 602,
        "studies_per_patient": 1,
        "series_per_study": 2,
        "instances_per_series": 250,
        "matrix": 512,
        "modalities": ["CT"],
    },
    # One CT study of 2,000 512x512 instances in 4 series (about 1 GB): the same
    # objects as "retrieve", four times as many, for the large get and its memory.
    "retrieve-large": {
        "patients": 1,
        "seed": 603,
        "studies_per_patient": 1,
        "series_per_study": 4,
        "instances_per_series": 500,
        "matrix": 512,
        "modalities": ["CT"],
    },
}
COHORTS: dict[str, dict[str, dict[str, Any]]] = {
    "full": _FULL,
    # The smoke run: the same cohorts, smaller.
    "quick": {
        "query": {**_FULL["query"], "patients": 20},
        "retrieve": {**_FULL["retrieve"], "instances_per_series": 5, "matrix": 64},
        "retrieve-large": {**_FULL["retrieve-large"], "instances_per_series": 10, "matrix": 64},
    },
}

REPEAT = 5  # the study query made REPEAT times over one association: the "x5" item
ITEMS = (
    "find-studies",
    "find-studies-x5",
    "find-series",
    "get-cold",
    "get-cached",
    "move",
    "get-large",
    "wado-cold",
    "qido-studies",
    "read-headers",
)
# Items that need no Orthanc: with only these asked for, none is started.
OFFLINE_ITEMS = ("read-headers",)
# read-headers: a folder of small files written once (untimed) by the cohort
# generator and kept between runs, read by pf.read_headers, a pydicom loop, dcmdump.
FILES_COHORT: dict[str, dict[str, Any]] = {
    # 100 patients x 2 studies x 4 series x 25 instances of 8x8: 20,000 files (80 MB).
    "full": {
        "patients": 100,
        "seed": 604,
        "studies_per_patient": 2,
        "series_per_study": 4,
        "instances_per_series": 25,
        "matrix": 8,
        "modalities": ["CT", "MR"],
    },
}
FILES_COHORT["quick"] = {**FILES_COHORT["full"], "patients": 5}
FILES_FOLDER = {"full": "files20k", "quick": "files1k"}
FILES_WORKERS = (1, 4)  # pacsframe's workers= in read_headers (4 is its default)
# The DICOMweb items: Orthanc loads its DICOMweb plugin (Debian's orthanc-dicomweb).
WEB_ITEMS = ("wado-cold", "qido-studies")
# The Python tools whose items have a target per tool, so a ratio to each is shown.
PER_TOOL = ("dicomweb-client", "pydicom")
DICOMWEB_PLUGIN = "/usr/share/orthanc/plugins/libOrthancDicomWeb.so"
# The Accept of every WADO-RS request (pacsframe's, dicomweb-client's, curl's): the
# objects as stored. Without transfer-syntax Orthanc 1.7's plugin transcodes them.
WADO_ACCEPT = 'multipart/related; type="application/dicom"; transfer-syntax=*'
WEB_WORKERS = (1, 4)  # pacsframe's workers= in the WADO-RS get
WORKERS = (1, 2, 4)
# The 2,000-object get: pacsframe's workers timed, and at most this many rounds (each
# round takes four times the 500-object one).
LARGE_WORKERS = (1, 4)
LARGE_ROUNDS = 3
# The fresh-process peak-RSS probes run after the get-cold rounds: name -> (kind, op).
RSS_PROBES = {
    "pacsframe": ("pacsframe", "get-cold"),
    "pacsframe-base": ("pacsframe-base", "get-cold"),
    "pynetdicom": ("pynetdicom", "get-cold"),
    "pacsframe import": ("pacsframe", "import"),
    "pacsframe-base import": ("pacsframe-base", "import"),
}
PROBE_WORKERS = 1  # pacsframe's workers= in its probe: the fewest buffers in flight
RSS_TARGET_MB = 150  # the target for pacsframe's cold C-GET
ADDED_RSS_TARGET_MB = 50  # what a get may add over the imported baseline (issue 12)
# "Does not grow with the study": the 2,000-object get may add at most this much more
# than the 500-object one (allocator and page-cache noise between two processes).
GROWTH_TOLERANCE_MB = 10


# --- the worker subprocesses (pacsframe, raw pynetdicom) --------------------------------


def _reset_peak() -> None:
    with contextlib.suppress(OSError), open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def _peak_mb(pid: int | str = "self", field: str = "VmHWM") -> float | None:
    """``field`` of /proc/<pid>/status in MB: the peak RSS by default, or ``VmRSS``."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(f"{field}:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


class _PacsframeTool:
    """pacsframe as a notebook user calls it."""

    def __init__(self, cfg: dict[str, Any], find_all: bool = True) -> None:
        import pacsframe as pf

        self.pf = pf
        self.cfg = cfg
        # The offline items (read-headers) run in a worker of their own, with no PACS.
        self.pacs = self._pacs(None) if "port" in cfg else None
        # Untimed: the frame the drill-downs start from. A fresh-process probe skips it,
        # as a 2,002-row frame would count in its peak RSS; it queries just its study.
        self.studies = self.pacs.find_studies() if find_all and self.pacs else None
        self.cached_pacs: Any = None
        # DICOMweb (QIDO-RS, WADO-RS) on the same Orthanc, when its plugin is loaded.
        self.web = pf.DICOMweb(cfg["url"], cache=cfg["scratch"]) if cfg.get("url") else None

    def _pacs(self, cache: str | None) -> Any:
        c = self.cfg
        return self.pf.PACS(
            HOST,
            c["port"],
            c["aet"],
            calling_ae=c["calling_ae"],
            scp_port=c["scp_port"],
            cache=cache or c["scratch"],
        )

    def prepare(self, op: str, p: dict[str, Any]) -> Any:
        if op == "wado-cold":
            # As a user does: the study frame from QIDO-RS (untimed), an empty cache.
            shutil.rmtree(p["out"], ignore_errors=True)
            web = self.pf.DICOMweb(self.cfg["url"], cache=p["out"])
            web.cache  # noqa: B018 - open the cache (a user's cache already exists)
            frame = web.find_studies(StudyInstanceUID=p["study"], progress=False)
            _settle_disk(warm=p.get("warm"))
            return web, frame
        if op in ("get-cold", "move"):
            shutil.rmtree(p["out"], ignore_errors=True)
            pacs = self._pacs(p["out"])
            pacs.cache  # noqa: B018 - open the cache (a user's cache already exists)
            if self.studies is None:
                frame = pacs.find_studies(StudyInstanceUID=p["study"])
            else:
                frame = self.studies[self.studies.StudyInstanceUID == p["study"]]
            if op == "get-cold":
                self.cached_pacs = (pacs, frame)
            return pacs, frame
        if op == "find-series":
            return self.studies[self.studies.StudyInstanceUID.isin(p["studies"])]
        if op == "get-cached":
            return self.cached_pacs
        return None

    def run(self, op: str, p: dict[str, Any], state: Any) -> dict[str, Any]:
        pacs = self.pacs
        if op == "find-studies":
            return {"count": len(pacs.find_studies())}
        if op == "find-studies-x5":
            import pandas as pd

            with pacs:
                frame = pd.concat([pacs.find_studies() for _ in range(REPEAT)])
            return {"count": len(frame)}
        if op == "find-series":
            return {"count": len(pacs.find_series(state))}
        if op == "qido-studies":
            return {"count": len(self.web.find_studies())}
        if op == "read-headers":
            frame = self.pf.read_headers(p["folder"], workers=p["workers"])
            return {"count": len(frame), "errors": len(frame.attrs["pacsframe"]["errors"])}
        if op in ("get-cold", "get-cached", "wado-cold"):
            target, frame = state
            result = target.get(frame, workers=p.get("workers", 4), progress=False)
            return {
                "count": result.completed + result.cached,
                "completed": result.completed,
                "cached": result.cached,
                "failed": result.failed,
                "requests": result.requests,
            }
        if op == "move":
            target, frame = state
            result = target.move(frame, progress=False)
            return {"count": result.completed, "failed": result.failed}
        raise ValueError(op)


class _RawTool:
    """The straightforward pynetdicom code a competent user writes."""

    def __init__(self, cfg: dict[str, Any]) -> None:
        from pydicom.dataset import Dataset
        from pynetdicom import AE, StoragePresentationContexts, _config, build_role, evt
        from pynetdicom.sop_class import (
            CTImageStorage,
            StudyRootQueryRetrieveInformationModelFind,
            StudyRootQueryRetrieveInformationModelGet,
            StudyRootQueryRetrieveInformationModelMove,
        )

        _config.STORE_RECV_CHUNKED_DATASET = True
        self.cfg = cfg
        self.Dataset, self.evt = Dataset, evt
        self.FIND = StudyRootQueryRetrieveInformationModelFind
        self.GET = StudyRootQueryRetrieveInformationModelGet
        self.MOVE = StudyRootQueryRetrieveInformationModelMove
        self.find_ae = AE(ae_title=cfg["calling_ae"])
        self.find_ae.add_requested_context(self.FIND)
        self.get_ae = AE(ae_title=cfg["calling_ae"])
        self.get_ae.add_requested_context(self.GET)
        self.get_ae.add_requested_context(CTImageStorage)
        self.get_roles = [build_role(CTImageStorage, scp_role=True)]
        self.move_ae = AE(ae_title=cfg["calling_ae"])
        self.move_ae.add_requested_context(self.MOVE)
        self.move_ae.supported_contexts = StoragePresentationContexts
        for ae in (self.find_ae, self.get_ae, self.move_ae):
            # A stalled association (seen with many C-FINDs on one association) fails
            # after 10 s instead of holding up the run.
            ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 10

    def _associate(self, ae: Any, **kwargs: Any) -> Any:
        import socket

        assoc = ae.associate(HOST, self.cfg["port"], ae_title=self.cfg["aet"], **kwargs)
        if not assoc.is_established:
            raise RuntimeError("association not established")
        assoc.dul.socket.socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return assoc

    def _query(self, level: str, keys: list[str], **match: str) -> Any:
        ds = self.Dataset()
        ds.QueryRetrieveLevel = level
        for key in keys:
            setattr(ds, key, "")
        for key, value in match.items():
            setattr(ds, key, value)
        return ds

    def _find(self, assoc: Any, query: Any) -> list[Any]:
        rows = []
        for status, identifier in assoc.send_c_find(query, self.FIND):
            if "Status" not in (status or {}):
                # pynetdicom yields an empty status when the association ended early.
                raise RuntimeError("C-FIND: association aborted or timed out")
            if status.Status not in (0x0000, 0xFF00, 0xFF01):
                raise RuntimeError(f"C-FIND failed: {status}")
            if status.Status in (0xFF00, 0xFF01):
                rows.append(identifier)  # None if the identifier did not decode
        return rows

    def prepare(self, op: str, p: dict[str, Any]) -> Any:
        if op in ("get-cold", "move"):
            shutil.rmtree(p["out"], ignore_errors=True)
            Path(p["out"]).mkdir(parents=True)
        return None

    def _store_handler(self, out: Path, counter: list[int]) -> Any:
        def handle(event: Any) -> int:
            uid = event.request.AffectedSOPInstanceUID
            os.replace(event.dataset_path, out / f"{uid}.dcm")
            counter[0] += 1
            return 0x0000

        return handle

    def run(self, op: str, p: dict[str, Any], state: Any) -> dict[str, Any]:
        keys = p.get("keys", [])
        if op in ("find-studies", "find-studies-x5"):
            assoc = self._associate(self.find_ae)
            try:
                rows = []
                for _ in range(REPEAT if op == "find-studies-x5" else 1):
                    rows += self._find(assoc, self._query("STUDY", keys))
            finally:
                assoc.release()
            return {"count": len(rows), "undecoded": rows.count(None)}
        if op == "find-series":
            assoc = self._associate(self.find_ae)
            try:
                rows = []
                for uid in p["studies"]:
                    rows += self._find(assoc, self._query("SERIES", keys, StudyInstanceUID=uid))
            finally:
                assoc.release()
            return {"count": len(rows)}
        out = Path(p["out"])
        counter = [0]
        handlers = [(self.evt.EVT_C_STORE, self._store_handler(out, counter))]
        query = self._query("STUDY", [], StudyInstanceUID=p["study"])
        if op == "get-cold":
            assoc = self._associate(self.get_ae, ext_neg=self.get_roles, evt_handlers=handlers)
            try:
                for status, _ in assoc.send_c_get(query, self.GET):
                    if status is None:
                        raise RuntimeError("C-GET: no response")
            finally:
                assoc.release()
            return {"count": counter[0]}
        if op == "move":
            server = self.move_ae.start_server(
                (HOST, self.cfg["scp_port"]), block=False, evt_handlers=handlers
            )
            try:
                assoc = self._associate(self.move_ae)
                try:
                    for status, _ in assoc.send_c_move(query, self.cfg["calling_ae"], self.MOVE):
                        if status is None:
                            raise RuntimeError("C-MOVE: no response")
                finally:
                    assoc.release()
            finally:
                server.shutdown()
            return {"count": counter[0]}
        raise ValueError(op)


class _DicomwebClientTool:
    """dicomweb-client as its documentation shows it, saving what it retrieves."""

    # The Accept of every WADO-RS call in the bench: the objects as stored, as
    # pacsframe and curl ask (without it Orthanc 1.7's plugin transcodes to Explicit
    # VR Little Endian).
    MEDIA_TYPES = (("application/dicom", "*"),)

    def __init__(self, cfg: dict[str, Any]) -> None:
        from dicomweb_client.api import DICOMwebClient

        self.client = DICOMwebClient(cfg["url"])

    def prepare(self, op: str, p: dict[str, Any]) -> Any:
        if op == "wado-cold":
            shutil.rmtree(p["out"], ignore_errors=True)
            Path(p["out"]).mkdir(parents=True)
            _settle_disk(warm=p.get("warm"))
        return None

    def run(self, op: str, p: dict[str, Any], state: Any) -> dict[str, Any]:
        if op == "qido-studies":
            # DICOM JSON dicts, as it returns them (no frame is built).
            return {"count": len(self.client.search_for_studies())}
        if op == "wado-cold":
            out = Path(p["out"])
            instances = self.client.retrieve_study(p["study"], media_types=self.MEDIA_TYPES)
            for ds in instances:
                ds.save_as(out / f"{ds.SOPInstanceUID}.dcm")
            return {"count": len(instances)}
        raise ValueError(op)


class _PydicomTool:
    """The loop a pydicom user writes for a folder: one ``dcmread`` per file, a DataFrame.

    ``dcmread(path, stop_before_pixels=True)`` per file under the folder (recursively,
    sorted as read_headers sorts), files pydicom says are not DICOM skipped, and the
    columns pacsframe gives by default taken with ``ds.get(keyword)`` into one
    ``pd.DataFrame``: values left as pydicom gives them (no typing), the least work a
    frame of those columns takes.
    """

    def __init__(self, cfg: dict[str, Any]) -> None:
        import pandas as pd
        from pydicom import dcmread
        from pydicom.errors import InvalidDicomError

        self.pd, self.dcmread, self.invalid = pd, dcmread, InvalidDicomError
        self.columns = cfg["columns"]

    def prepare(self, op: str, p: dict[str, Any]) -> Any:
        return None

    def run(self, op: str, p: dict[str, Any], state: Any) -> dict[str, Any]:
        if op != "read-headers":
            raise ValueError(op)
        rows = []
        for path in sorted(Path(p["folder"]).rglob("*")):
            if not path.is_file():
                continue
            try:
                ds = self.dcmread(path, stop_before_pixels=True)
            except self.invalid:
                continue
            rows.append({c: ds.get(c) for c in self.columns})
        return {"count": len(self.pd.DataFrame(rows, columns=self.columns))}


# What a worker or probe runs. "pacsframe-base" is pacsframe without pyarrow, its
# optional `parquet` extra that pandas 3 imports whenever it is installed.
KINDS = ("pacsframe", "pacsframe-base", "pynetdicom", "dicomweb-client", "pydicom")


def _make_tool(kind: str, cfg: dict[str, Any], find_all: bool = True) -> Any:
    if kind == "pynetdicom":
        return _RawTool(cfg)
    if kind == "dicomweb-client":
        return _DicomwebClientTool(cfg)
    if kind == "pydicom":
        return _PydicomTool(cfg)
    return _PacsframeTool(cfg, find_all)


def _timed_call(tool: Any, cmd: dict[str, Any]) -> dict[str, Any]:
    """One call in a long-lived worker: seconds and the peak RSS of that call."""
    state = tool.prepare(cmd["op"], cmd)
    _reset_peak()
    cpu = time.process_time()
    start = time.perf_counter()
    answer = tool.run(cmd["op"], cmd, state)
    answer["seconds"] = time.perf_counter() - start
    answer["cpu_s"] = time.process_time() - cpu  # the worker's own CPU (all its threads)
    answer["rss_mb"] = _peak_mb()
    return answer


def _probe_call(kind: str, cfg: dict[str, Any], cmd: dict[str, Any]) -> dict[str, Any]:
    """The one command of a fresh-process probe: the whole process's peak RSS.

    ``import`` only imports the library; a retrieve op builds the tool and does the
    retrieve (pacsframe queries just its study first). VmHWM rather than ``ru_maxrss``:
    Linux carries the spawning process's high-water mark over ``exec`` into
    ``ru_maxrss`` (see ``run_dcmtk``), and the harness has pacsframe imported.
    """
    importlib.import_module("pynetdicom" if kind == "pynetdicom" else "pacsframe")
    # The imported baseline: what the process holds before it does anything.
    import_mb = _peak_mb(field="VmRSS")
    if cmd["op"] == "import":
        answer: dict[str, Any] = {}
    else:
        tool = _make_tool(kind, cfg, find_all=False)
        answer = tool.run(cmd["op"], cmd, tool.prepare(cmd["op"], cmd))
    answer["import_mb"] = import_mb
    answer["rss_mb"] = _peak_mb()
    answer["pyarrow"] = sys.modules.get("pyarrow") is not None
    return answer


def worker_main(kind: str, probe: bool = False) -> int:
    """Serve commands (one JSON object per stdin line) until stdin closes.

    A worker imports and builds its tool at ``setup`` (untimed). A probe (``probe``)
    only keeps the config at ``setup`` and measures exactly one command, imports
    included, so one probe is one fresh process.
    """
    if kind == "pacsframe-base":
        if "pandas" in sys.modules:
            raise RuntimeError("pyarrow must be blocked before pandas loads, and it has")
        # None in sys.modules makes `import pyarrow` raise ImportError, as if not installed.
        sys.modules["pyarrow"] = None  # type: ignore[assignment]
    reply = os.fdopen(os.dup(1), "w", buffering=1)
    sys.stdout = sys.stderr  # stray prints must not corrupt the protocol
    cfg: dict[str, Any] = {}
    tool: Any = None
    measured = False
    for line in sys.stdin:
        cmd = json.loads(line)
        try:
            if cmd["op"] == "setup":
                cfg = cmd["cfg"]
                answer: dict[str, Any] = {}
                if not probe:
                    tool = _make_tool(kind, cfg)
                if isinstance(tool, _PacsframeTool):
                    answer = {"version": tool.pf.__version__, "file": tool.pf.__file__}
            elif probe:
                if measured:
                    raise RuntimeError("a probe measures one command; start a fresh one")
                measured = True
                answer = _probe_call(kind, cfg, cmd)
            else:
                answer = _timed_call(tool, cmd)
            answer["ok"] = True
        except Exception as exc:  # reported to the harness, which fails the run
            import traceback

            answer = {"ok": False, "error": f"{exc!r}"}
            traceback.print_exc()  # to the worker's log
        reply.write(json.dumps(answer) + "\n")
    return 0


class Worker:
    """The harness side of one worker (or ``probe``) subprocess; every wait is bounded."""

    def __init__(self, kind: str, cfg: dict[str, Any], log: Path, probe: bool = False) -> None:
        self.kind = kind
        self._log = open(log, "ab")  # noqa: SIM115 - closed in close()
        mode = "--rss-probe" if probe else "--worker"
        self.proc = subprocess.Popen(
            [sys.executable, str(Path(__file__).resolve()), mode, kind],
            cwd=ROOT,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._log,
            text=True,
            bufsize=1,
        )
        self.info = self.call({"op": "setup", "cfg": cfg}, timeout=300)

    def call(self, cmd: dict[str, Any], timeout: float | None = None) -> dict[str, Any]:
        timeout = timeout or CALL_TIMEOUT
        assert self.proc.stdin and self.proc.stdout
        self.proc.stdin.write(json.dumps(cmd) + "\n")
        self.proc.stdin.flush()
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        if not ready:
            self.close()
            raise RuntimeError(f"{self.kind} worker: {cmd['op']} took over {timeout:.0f} s")
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"{self.kind} worker died; see {self._log.name}")
        answer = json.loads(line)
        if not answer.get("ok"):
            raise RuntimeError(f"{self.kind} worker: {cmd['op']} failed: {answer['error']}")
        return answer

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.proc.stdin.close()  # type: ignore[union-attr]
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=10)
        self._log.close()


def rss_probe(kind: str, cfg: dict[str, Any], cmd: dict[str, Any], log: Path) -> dict[str, Any]:
    """Run ``cmd`` in a fresh probe process; its answer carries the process's peak RSS."""
    probe = Worker(kind, cfg, log, probe=True)
    try:
        return probe.call(cmd)
    finally:
        probe.close()


def fresh_rss(
    cfgs: dict[str, dict[str, Any]], study: str, expected: int, scratch: Path, log: Path
) -> tuple[dict[str, dict[str, Any]], list[str]]:
    """Each of RSS_PROBES in its own fresh process: answers by name, and what went wrong.

    The C-GET probes retrieve ``study`` into a folder of their own under ``scratch``,
    emptied first (by the tool's ``prepare``, as in the timed rounds).
    """
    found: dict[str, dict[str, Any]] = {}
    problems: list[str] = []
    for name, (kind, op) in RSS_PROBES.items():
        cfg = cfgs["pynetdicom" if kind == "pynetdicom" else "pacsframe"]
        out = scratch / f"probe-{kind}"
        cmd = {"op": op, "study": study, "out": str(out), "workers": PROBE_WORKERS}
        try:
            r = rss_probe(kind, cfg, cmd, log)
        except RuntimeError as exc:
            problems.append(f"fresh-process probe {name}: {str(exc).splitlines()[0][:300]}")
            continue
        if op != "import" and r.get("count") != expected:
            problems.append(f"fresh-process probe {name}: got {r.get('count')} (not {expected})")
        if kind == "pacsframe-base" and r.get("pyarrow"):
            problems.append(f"fresh-process probe {name}: pyarrow was imported despite the block")
        found[name] = r
    return found, problems


def added_rss(
    cfg: dict[str, Any], studies: dict[int, str], scratch: Path, log: Path
) -> tuple[dict[int, dict[str, Any]], list[str]]:
    """The RSS a pacsframe get adds over its imported baseline, per study size.

    ``studies``: object count -> StudyInstanceUID. One fresh process per study (so
    nothing an earlier get left allocated counts), ``workers=1``: the answer's
    ``rss_mb - import_mb`` is the peak the get (with its study query) added.
    """
    found: dict[int, dict[str, Any]] = {}
    problems: list[str] = []
    for count, study in studies.items():
        out = scratch / f"probe-added-{count}"
        cmd = {"op": "get-cold", "study": study, "out": str(out), "workers": PROBE_WORKERS}
        try:
            r = rss_probe("pacsframe", cfg, cmd, log)
        except RuntimeError as exc:
            problems.append(f"memory probe, {count} objects: {str(exc).splitlines()[0][:300]}")
            continue
        finally:
            shutil.rmtree(out, ignore_errors=True)
        if r.get("count") != count:
            problems.append(f"memory probe, {count} objects: got {r.get('count')}")
        found[count] = r
    return found, problems


def _added_rss_text(added: dict[int, dict[str, Any]]) -> str:
    """The paragraph on the memory probes (:func:`added_rss`)."""

    def delta(r: dict[str, Any]) -> float | None:
        if r.get("rss_mb") is None or r.get("import_mb") is None:
            return None
        return r["rss_mb"] - r["import_mb"]

    parts = []
    deltas = {}
    for count, r in sorted(added.items()):
        d = delta(r)
        deltas[count] = d
        base = r.get("import_mb")
        if d is None or base is None:
            parts.append(f"{count:,} objects n/a")
        else:
            parts.append(f"{count:,} objects {d:.0f} MB (over {base:.0f} MB after import)")
    known = [d for d in deltas.values() if d is not None]
    if len(known) < 2 or len(known) != len(deltas):
        verdict = "not measured"
    else:
        counts = sorted(deltas)
        small, large = deltas[counts[0]], deltas[counts[-1]]
        assert small is not None and large is not None
        under = max(known) < ADDED_RSS_TARGET_MB
        flat = large - small <= GROWTH_TOLERANCE_MB
        verdict = "met" if under and flat else "not met"
        if not under:
            verdict += f" (over {ADDED_RSS_TARGET_MB} MB)"
        if not flat:
            verdict += f" (grows {large - small:.0f} MB with the study)"
    return (
        "RSS a get adds over the imported baseline (a fresh process per study: VmHWM at "
        f"the end minus VmRSS right after `import pacsframe`; the study query, then "
        f"`get(..., workers={PROBE_WORKERS})`): {', '.join(parts)}. Target < "
        f"{ADDED_RSS_TARGET_MB} MB and not growing with the study (at most "
        f"{GROWTH_TOLERANCE_MB} MB more for the larger): {verdict}."
    )


# --- dcmtk ------------------------------------------------------------------------------


GNU_TIME = shutil.which("time", path="/usr/bin:/bin")


def run_dcmtk(command: list[str], timeout: float | None = None) -> dict[str, Any]:
    """Run one dcmtk tool to completion: wall seconds and peak RSS.

    The peak RSS comes from GNU time (``%M``, its ``wait4`` on the tool it forked):
    ``wait4`` on a child spawned from this Python process would report this process's
    own high-water mark, since Linux carries the pre-exec mark over ``exec``.
    """
    from servers import dcmtk_env

    tmp = Path(os.environ.get("TMPDIR", "/tmp"))
    rss_file = tmp / f"pacsframe-bench-{os.getpid()}.rss"
    wrapper = [GNU_TIME, "-f", "%M", "-o", str(rss_file)] if GNU_TIME else []
    # The tools log each answer (findscu prints every response): to a file, as a pipe
    # that is not drained while the tool runs would block it.
    with open(tmp / f"pacsframe-bench-{os.getpid()}.log", "w+b") as log:
        start = time.perf_counter()
        proc = subprocess.Popen(
            [*wrapper, *command],
            env=dcmtk_env(),
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        timer = threading.Timer(timeout or CALL_TIMEOUT, proc.kill)
        timer.start()
        try:
            _, status, _ = os.wait4(proc.pid, 0)
        finally:
            timer.cancel()
        seconds = time.perf_counter() - start
        proc.returncode = os.waitstatus_to_exitcode(status)
        log.seek(0)
        out = log.read().decode(errors="replace")
        Path(log.name).unlink()
    if proc.returncode != 0:
        raise RuntimeError(f"{Path(command[0]).name} exited {proc.returncode}: {out[-2000:]}")
    rss = None
    if GNU_TIME:
        with contextlib.suppress(OSError, ValueError):
            rss = int(rss_file.read_text().split()[-1]) / 1024
            rss_file.unlink()
    answer: dict[str, Any] = {"seconds": seconds, "rss_mb": rss}
    if Path(command[0]).name == "findscu":
        answer["count"] = out.count("(Pending)")
    if Path(command[0]).name == "dcmdump":
        answer["count"] = out.count(" SOPInstanceUID\n")  # one +P line per file
    return answer


# Seconds after a sync before ext4 without a journal reuses a freed inode
# (RECENTCY_MIN, 60 s, in fs/ext4/ialloc.c), and a margin: see _settle_disk.
INODE_WAIT_S = 65


def _settle_disk(warm: str | None = None) -> None:
    """Finish the disk work of earlier rounds before a timed WADO-RS get (untimed).

    Every tool of the WADO-RS item writes the study's 263 MB. Three things would
    make a round pay for the rounds before it, hardest the tools that create 500
    files (pacsframe, dicomweb-client) rather than one (curl):

    - the writeback of the last round's files: each tool's prepare step calls
      ``os.sync()`` first;
    - the freeing of the last round's files. This machine's ext4 has no journal
      (``/sys/fs/ext4/vda/journal_task`` is ``<none>``), and without one ext4 does
      not reuse an inode freed less than 60 s ago (300 s while its inode-table
      block is dirty: ``recently_deleted()`` in ``fs/ext4/ialloc.c``): every new
      file scans past the freed ones. Creating 500 files right after 500 were
      deleted took ~0.6 ms per ``open(O_CREAT)`` (strace) instead of ~0.02 ms,
      about 0.13 s of a 0.6-0.7 s get. So each round of the WADO-RS item writes
      into a folder no round used before (``fresh_out`` in :func:`main`), and the
      item's folders are removed only after its last round. The items before it
      free thousands of files too (the large get alone 24,000), so in a full run
      the item starts after a sync and ``INODE_WAIT_S`` untimed seconds.

    - the page cache the rounds before filled. Every round leaves 263 MB of
      written (then synced) pages in it, and on this VM creating and writing
      files gets dearer as they pile up: 500 files of 525 kB cost 0.08-0.13 s of
      CPU with the page cache dropped and 0.17-0.86 s a few gigabytes of writes
      later, one file of the same 263 MB 0.08 s either way (probe in the notes of
      RESULTS.md). Unsettled, the later rounds of every tool ran up to twice as
      slow as the first. So, as root, each round also drops the page cache
      (``/proc/sys/vm/drop_caches``: clean pages only, after the sync) and then
      asks the server for the study once, untimed, into nothing (``warm``): every
      round starts with the server's files in memory and none of the client's.
      ``warm`` (the study's URL) is given in a full run only: a quick run is a
      smoke test, which may share the machine with other work.

    The C-GET and C-MOVE items still empty one folder per tool between rounds:
    there every tool creates one file per object, and keeping gigabytes of
    unsynced rounds would throttle the later ones instead.
    """
    os.sync()
    if warm is None:  # a quick run: a smoke test, which may share the machine
        return
    with contextlib.suppress(OSError):  # not root: the page cache stays as it is
        Path("/proc/sys/vm/drop_caches").write_text("1\n")
    request = urllib.request.Request(warm, headers={"Accept": WADO_ACCEPT})
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(request, timeout=CALL_TIMEOUT) as answer:
        while answer.read(1 << 20):
            pass


def curl_study(
    curl: str, url: str, study: str, scratch: Path, *, warm: bool = False
) -> dict[str, Any]:
    """curl saving a study's WADO-RS multipart body to one file (the floor: no parsing).

    Timed as a whole process, like the dcmtk tools; the parts are counted untimed.
    """
    import mmap
    import re

    out = scratch / "curl-study.multipart"
    out.unlink(missing_ok=True)
    _settle_disk(warm=f"{url}/studies/{study}" if warm else None)
    r = run_dcmtk(
        [
            curl,
            "-s",
            "-f",
            "--noproxy",
            "*",
            "-o",
            str(out),
            "-H",
            f"Accept: {WADO_ACCEPT}",
            f"{url}/studies/{study}",
        ]
    )
    with open(out, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as body:
        part = re.compile(rb"(?im)^content-type:[ \t]*application/dicom\b")
        r["count"] = sum(1 for _ in part.finditer(body))  # type: ignore[call-overload]
    out.unlink()
    return r


def _write_query(path: Path, level: str, keys: list[str], **match: str) -> Path:
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian

    ds = Dataset()
    ds.QueryRetrieveLevel = level
    for key in keys:
        setattr(ds, key, "")
    for key, value in match.items():
        setattr(ds, key, value)
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.2.2.1"
    ds.file_meta.MediaStorageSOPInstanceUID = "1.2.3"
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.save_as(path, enforce_file_format=True)
    return path


# --- setup: cohorts and Orthanc ---------------------------------------------------------


def _log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def start_orthanc(workdir: Path, mode: str, dicomweb: bool = False) -> tuple[Any, dict[str, Any]]:
    """Start Orthanc on ``workdir/orthanc``; load the cohorts unless already there.

    ``dicomweb``: load the DICOMweb plugin at ``/dicom-web/`` (the store is the same).
    """
    from servers import OrthancServer

    import pacsframe as pf
    from pacsframe.demo import make_cohort

    spec = COHORTS[mode]
    # Orthanc's default DicomScpTimeout (30 s in the test fixture) would close long
    # associations (a slow load, a drill-down) in the middle.
    config: dict[str, Any] = {"DefaultEncoding": "Utf8", "DicomScpTimeout": 600}
    if dicomweb:
        config["Plugins"] = [DICOMWEB_PLUGIN]
        config["DicomWeb"] = {"Enable": True, "Root": "/dicom-web/"}
        # Orthanc's default, said outright: no cap, so one QIDO-RS answer holds every
        # study and pacsframe's paging (limit/offset) is the only split.
        config["LimitFindResults"] = 0
    server = OrthancServer(workdir / "orthanc", extra_config=config)
    server.start(timeout=120)
    marker = workdir / "orthanc" / "loaded.json"
    try:
        loaded = json.loads(marker.read_text())
    except (OSError, ValueError):
        loaded = None
    info: dict[str, Any] = {}
    expected = None
    if loaded and loaded.get("cohorts") == spec:
        expected = loaded["instances"]
    if expected is not None and server.count_instances() == expected:
        _log(f"Orthanc store in {server.workdir} already holds the cohorts ({expected} objects)")
        info = loaded
    else:
        _log("loading cohorts into Orthanc (once; reused by later runs)")
        marker.unlink(missing_ok=True)
        server.clear()
        manifests = {}
        for name, params in spec.items():
            folder = workdir / "cohorts" / f"{mode}-{name}"
            start = time.monotonic()
            manifests[name] = make_cohort(
                folder, **{**params, "modalities": tuple(params["modalities"])}
            )
            _log(f"  wrote {name} cohort: {len(manifests[name])} files")
            client = pf.PACS(server.host, server.dicom_port, server.aet, calling_ae="BENCHLOAD")
            # Chunks of 250 (one association each) and up to 3 tries for what failed:
            # Orthanc here sometimes drops a long C-STORE association ("association lost").
            paths = list(manifests[name].path)
            for attempt in range(3):
                failed = []
                for i in range(0, len(paths), 250):
                    result = client.store(paths[i : i + 250])
                    failed += list(result.failed_instances.path)
                if not failed:
                    break
                _log(f"  {len(failed)} failed (try {attempt + 1}); retrying them")
                paths = failed
            if failed:
                raise RuntimeError(f"storing the {name} cohort: {len(failed)} failed")
            _log(f"  stored {name} cohort in {time.monotonic() - start:.0f} s")
            shutil.rmtree(folder, ignore_errors=True)
        info = {
            "cohorts": spec,
            "instances": server.count_instances(),
            "retrieve_study": str(manifests["retrieve"].StudyInstanceUID.iloc[0]),
            "retrieve_instances": len(manifests["retrieve"]),
            "large_study": str(manifests["retrieve-large"].StudyInstanceUID.iloc[0]),
            "large_instances": len(manifests["retrieve-large"]),
            "studies": int(server.rest("GET", "/statistics")["CountStudies"]),
        }
        marker.write_text(json.dumps(info, indent=2))
    return server, info


# --- the run ----------------------------------------------------------------------------


def _stats(values: list[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def _fmt(stat: dict[str, float] | None) -> str:
    if not stat:
        return "n/a"
    return f"{stat['median']:.3f} ({stat['min']:.3f}-{stat['max']:.3f})"


def _rss(values: list[float | None]) -> str:
    real = [v for v in values if v is not None]
    return f"{max(real):.0f}" if real else "n/a"


def _fresh_rss_text(fresh: dict[str, dict[str, Any]], getscu: list[float | None]) -> str:
    """The paragraph on the fresh-process probes; ``getscu``: its timed rounds' peaks."""

    def mb(values: list[float | None]) -> str:
        text = _rss(values)
        return text if text == "n/a" else f"{text} MB"

    def probe(name: str) -> str:
        return mb([fresh.get(name, {}).get("rss_mb")])

    pf = fresh.get("pacsframe", {})
    if pf.get("rss_mb") is None:
        verdict = "not measured"
    else:
        verdict = "met" if pf["rss_mb"] < RSS_TARGET_MB else "not met"
    # pandas 3 imports pyarrow whenever it is installed, so the first number depends on
    # the environment; say so when there was none to import.
    absent = "" if pf.get("pyarrow", True) else "pyarrow is not installed here; "
    return (
        "Peak RSS of a fresh process doing the cold C-GET (one process per tool, run "
        "after the timed rounds; whole-process VmHWM, so imports included; pacsframe "
        f"queries the study, then `get(..., workers={PROBE_WORKERS})`): pacsframe "
        f"{probe('pacsframe')} ({absent}base install, i.e. without pyarrow, its optional "
        f"`parquet` extra: {probe('pacsframe-base')}; import alone {probe('pacsframe import')} / "
        f"{probe('pacsframe-base import')}), raw pynetdicom {probe('pynetdicom')}, getscu "
        f"{mb(getscu)}. Target pacsframe < {RSS_TARGET_MB} MB, judged on the first number: "
        f"{verdict}."
    )


def _versions(server: Any, pf_info: dict[str, Any], web: bool = False) -> dict[str, str]:
    import pandas
    import pydicom
    import pynetdicom

    dcmtk = subprocess.run(
        [shutil.which("findscu") or "findscu", "--version"],
        capture_output=True,
        text=True,
        timeout=30,
    ).stdout.splitlines()
    if web:
        curl = subprocess.run(["curl", "--version"], capture_output=True, text=True, timeout=30)
        plugins = server.rest("GET", "/plugins/dicom-web")
        extra = {
            "dicomweb-client": _installed("dicomweb-client"),
            "curl": (curl.stdout.split() or ["?", "?"])[1],
            "Orthanc DICOMweb plugin": str(plugins.get("Version")),
        }
    else:
        extra = {}
    return {
        "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, {platform.platform()}",
        "load average at start": ", ".join(f"{x:.2f}" for x in os.getloadavg()),
        "Python": platform.python_version(),
        "pacsframe": f"{pf_info.get('version')} ({pf_info.get('file')})",
        "pynetdicom": pynetdicom.__version__,
        "pydicom": pydicom.__version__,
        "pandas": pandas.__version__,
        "pyarrow": _installed("pyarrow"),
        "dcmtk": dcmtk[0].strip("$ ").removeprefix("dcmtk: ") if dcmtk else "?",
        "Orthanc": str(server.system().get("Version")) if server else "not started",
        **extra,
    }


def _installed(package: str) -> str:
    """The installed version of ``package`` (it moves pacsframe's peak RSS), if any."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return "not installed"


def _setup_argparser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Benchmark pacsframe against raw pynetdicom and dcmtk on a local Orthanc."
    )
    parser.add_argument(
        "--workdir",
        type=Path,
        help="folder for Orthanc's store (reused between runs) and scratch output; "
        "default benchmarks/.work/<full|quick>",
    )
    parser.add_argument("--rounds", type=int, default=5, help="rounds per item (default 5)")
    parser.add_argument(
        "--items", nargs="+", choices=ITEMS, default=list(ITEMS), help="a subset of the items"
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="tiny cohorts (20 studies, a 10-instance and a 40-instance 64x64 study) for a "
        "smoke run",
    )
    parser.add_argument("--results", type=Path, help="write the markdown table to this file")
    parser.add_argument(
        "--timeout",
        type=float,
        default=CALL_TIMEOUT,
        help=f"seconds one timed call may take before the run fails (default {CALL_TIMEOUT:.0f})",
    )
    parser.add_argument(
        "--load-only",
        action="store_true",
        help="load the cohorts (and write the read-headers files) and stop",
    )
    parser.add_argument("--worker", choices=KINDS, help=argparse.SUPPRESS)
    parser.add_argument("--rss-probe", choices=KINDS, help=argparse.SUPPRESS)
    return parser


def main(argv: list[str] | None = None) -> int:
    global CALL_TIMEOUT
    args = _setup_argparser().parse_args(argv)
    CALL_TIMEOUT = args.timeout
    if args.worker or args.rss_probe:
        return worker_main(args.worker or args.rss_probe, probe=bool(args.rss_probe))
    from servers import require_tool

    web = bool(set(args.items) & set(WEB_ITEMS))
    online = [item for item in args.items if item not in OFFLINE_ITEMS]
    needed = [
        *(["Orthanc", "findscu", "getscu", "movescu"] if online else []),
        *(["curl"] if web else []),
        *(["dcmdump"] if "read-headers" in args.items else []),
    ]
    try:
        tools = {name: require_tool(name) for name in needed}
    except RuntimeError as exc:
        print(f"benchmarks: {exc}", file=sys.stderr)
        return 2
    if web and not Path(DICOMWEB_PLUGIN).exists():
        print(
            f"benchmarks: the DICOMweb items need Orthanc's DICOMweb plugin "
            f"({DICOMWEB_PLUGIN}): `apt-get install orthanc-dicomweb`.",
            file=sys.stderr,
        )
        return 2
    if web and importlib.util.find_spec("dicomweb_client") is None:
        print(
            "benchmarks: the DICOMweb items need dicomweb-client (in the dev extra: "
            "`pip install -e '.[dev]'`).",
            file=sys.stderr,
        )
        return 2
    mode = "quick" if args.quick else "full"
    workdir = (args.workdir or ROOT / "benchmarks" / ".work" / mode).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    scratch = workdir / "scratch"
    shutil.rmtree(scratch, ignore_errors=True)
    scratch.mkdir()
    # The read-headers files: beside the Orthanc store (benchmarks/.work/files20k).
    files_root = (args.workdir.resolve() if args.workdir else workdir.parent) / FILES_FOLDER[mode]
    files_root.mkdir(parents=True, exist_ok=True)
    if args.load_only and "read-headers" in args.items:
        files_folder(files_root, mode)
    if args.load_only and not online:
        return 0
    if not online:
        # No PACS in these items: Orthanc is not started.
        problems: list[str] = []
        label, runs, pf_info = files_item(
            mode, files_root, args.rounds, problems, tools["dcmdump"]
        )
        versions = _versions(None, pf_info)
        _report(render({label: runs}, versions, mode, args.rounds, problems), args.results)
        return 0

    server, info = start_orthanc(workdir, mode, dicomweb=web)
    workers: list[Worker] = []
    try:
        if args.load_only:
            return 0
        from pacsframe.query import DEFAULT_KEYS, UNIQUE_KEY

        def keys(level: str) -> list[str]:
            return list(dict.fromkeys([*DEFAULT_KEYS[level], UNIQUE_KEY[level]]))

        from servers import free_port

        cfgs = {
            "pacsframe": {"calling_ae": "BENCHPF", "scp_port": free_port()},
            "pynetdicom": {"calling_ae": "BENCHRAW", "scp_port": free_port()},
        }
        web_url = f"{server.url}/dicom-web"
        for name, cfg in cfgs.items():
            cfg.update(port=server.dicom_port, aet=server.aet, scratch=str(scratch / name))
            server.add_modality(name, cfg["calling_ae"], HOST, cfg["scp_port"])
        if web:
            cfgs["pacsframe"]["url"] = web_url
        pfw = Worker("pacsframe", cfgs["pacsframe"], workdir / "pacsframe-worker.log")
        workers.append(pfw)
        raw = Worker("pynetdicom", cfgs["pynetdicom"], workdir / "pynetdicom-worker.log")
        workers.append(raw)
        dwc: Worker | None = None
        if web:
            dwc_log = workdir / "dicomweb-client-worker.log"
            dwc = Worker("dicomweb-client", {"url": web_url}, dwc_log)
            workers.append(dwc)
        versions = _versions(server, pfw.info, web)

        study = info["retrieve_study"]
        n_studies = info["studies"]
        n_instances = info["retrieve_instances"]
        large_study = info["large_study"]
        n_large = info["large_instances"]
        base = [tools["findscu"], "-S", "-aet", "BENCHDCMTK", "-aec", server.aet]
        peer = [HOST, str(server.dicom_port)]
        qdir = scratch / "queries"
        qdir.mkdir()
        study_q = _write_query(qdir / "study.dcm", "STUDY", keys("STUDY"))
        found = server.rest("POST", "/tools/find", {"Level": "Study", "Query": {}, "Expand": True})
        drill = sorted(s["MainDicomTags"]["StudyInstanceUID"] for s in found)[:200]
        series_qs = [
            _write_query(qdir / f"s{i}.dcm", "SERIES", keys("SERIES"), StudyInstanceUID=uid)
            for i, uid in enumerate(drill)
        ]

        def dcmtk_out(name: str) -> Path:
            out = scratch / name
            shutil.rmtree(out, ignore_errors=True)
            out.mkdir(parents=True)
            return out

        def getscu(study: str = study) -> dict[str, Any]:
            out = dcmtk_out("getscu")
            r = run_dcmtk(
                [
                    tools["getscu"],
                    "-S",
                    "-aet",
                    "BENCHDCMTK",
                    "-aec",
                    server.aet,
                    "-k",
                    "QueryRetrieveLevel=STUDY",
                    "-k",
                    f"StudyInstanceUID={study}",
                    "-od",
                    str(out),
                    *peer,
                ]
            )
            r["count"] = sum(1 for _ in out.iterdir())
            return r

        # movescu receives the objects itself, on its own port (+P), as pacsframe's
        # move does with its built-in SCP: one process, no storescp.
        movescu_port = free_port()
        # Orthanc answers C-MOVE only from registered calling AEs; this is also the
        # destination, movescu's own port.
        server.add_modality("movescu", "BENCHDCMTK", HOST, movescu_port)

        def movescu() -> dict[str, Any]:
            out = dcmtk_out("movescu")
            r = run_dcmtk(
                [
                    tools["movescu"],
                    "-S",
                    "-aet",
                    "BENCHDCMTK",
                    "-aec",
                    server.aet,
                    "-aem",
                    "BENCHDCMTK",
                    "+P",
                    str(movescu_port),
                    "-od",
                    str(out),
                    "-k",
                    "QueryRetrieveLevel=STUDY",
                    "-k",
                    f"StudyInstanceUID={study}",
                    *peer,
                ]
            )
            r["count"] = sum(1 for _ in out.iterdir())
            return r

        def pf_call(op: str, **kw: Any) -> Any:
            return lambda: pfw.call({"op": op, **kw})

        def raw_call(op: str, **kw: Any) -> Any:
            return lambda: raw.call({"op": op, **kw})

        out_pf = str(scratch / "pf-cache")
        made: list[str] = []

        def fresh_out(base: str) -> str:
            """A folder no round used before (see _settle_disk); removed after the item."""
            made.append(f"{base}-{len(made) + 1}")
            return made[-1]

        out_raw = str(scratch / "raw-out")
        # item -> (label, expected count, {tool: callable}, target text)
        plan: list[tuple[str, str, int, dict[str, Any]]] = []
        if "find-studies" in args.items:
            plan.append(
                (
                    "find-studies",
                    f"C-FIND study level, {n_studies:,} rows",
                    n_studies,
                    {
                        "pacsframe": pf_call("find-studies"),
                        "pynetdicom": raw_call("find-studies", keys=keys("STUDY")),
                        "dcmtk": lambda: run_dcmtk([*base, *peer, str(study_q)]),
                    },
                )
            )
        if "find-studies-x5" in args.items:
            plan.append(
                (
                    "find-studies-x5",
                    f"C-FIND study level x{REPEAT}, {REPEAT * n_studies:,} rows",
                    REPEAT * n_studies,
                    {
                        "pacsframe": pf_call("find-studies-x5"),
                        "pynetdicom": raw_call("find-studies-x5", keys=keys("STUDY")),
                        "dcmtk": lambda: run_dcmtk([*base, *peer, *[str(study_q)] * REPEAT]),
                    },
                )
            )
        if "find-series" in args.items:
            plan.append(
                (
                    "find-series",
                    f"C-FIND series drill-down from {len(drill)} studies",
                    len(drill),
                    {
                        "pacsframe": pf_call("find-series", studies=drill),
                        "pynetdicom": raw_call("find-series", studies=drill, keys=keys("SERIES")),
                        "dcmtk": lambda: run_dcmtk([*base, *peer, *map(str, series_qs)]),
                    },
                )
            )
        if "get-cold" in args.items:
            tools_get: dict[str, Any] = {
                f"pacsframe w={w}": pf_call("get-cold", study=study, out=out_pf, workers=w)
                for w in WORKERS
            }
            tools_get["pynetdicom"] = raw_call("get-cold", study=study, out=out_raw)
            tools_get["dcmtk"] = getscu
            plan.append(
                ("get-cold", f"C-GET cold, {n_instances} instances", n_instances, tools_get)
            )
        if "get-cached" in args.items:
            plan.append(
                (
                    "get-cached",
                    f"C-GET fully cached re-run, {n_instances} instances",
                    n_instances,
                    {
                        # the cold run fills the cache (untimed here), then the re-run
                        "pacsframe": lambda: (
                            pfw.call({"op": "get-cold", "study": study, "out": out_pf}),
                            pfw.call({"op": "get-cached", "study": study, "out": out_pf}),
                        )[1],
                    },
                )
            )
        if "move" in args.items:
            plan.append(
                (
                    "move",
                    f"C-MOVE to own SCP, {n_instances} instances",
                    n_instances,
                    {
                        "pacsframe": pf_call("move", study=study, out=out_pf + "-move"),
                        "pynetdicom": raw_call("move", study=study, out=out_raw + "-move"),
                        "dcmtk": movescu,
                    },
                )
            )

        if "get-large" in args.items:
            tools_large: dict[str, Any] = {
                f"pacsframe w={w}": pf_call(
                    "get-cold", study=large_study, out=out_pf + "-large", workers=w
                )
                for w in LARGE_WORKERS
            }
            tools_large["pynetdicom"] = raw_call("get-cold", study=large_study, out=out_raw)
            tools_large["dcmtk"] = lambda: getscu(large_study)
            plan.append(
                (
                    "get-large",
                    f"{LARGE_LABEL}, {n_large:,} instances in 4 series",
                    n_large,
                    tools_large,
                )
            )

        if "wado-cold" in args.items:
            assert dwc is not None
            # Each round's untimed settling (see _settle_disk); a quick run, a smoke
            # test that may share the machine, leaves the page cache alone.
            warm = f"{web_url}/studies/{study}" if mode == "full" else None

            def wado_pf(w: int) -> Any:
                return lambda: pfw.call(
                    {
                        "op": "wado-cold",
                        "study": study,
                        "out": fresh_out(out_pf + "-wado"),
                        "workers": w,
                        "warm": warm,
                    }
                )

            tools_wado: dict[str, Any] = {f"pacsframe w={w}": wado_pf(w) for w in WEB_WORKERS}
            tools_wado["dicomweb-client"] = lambda: dwc.call(
                {
                    "op": "wado-cold",
                    "study": study,
                    "out": fresh_out(out_raw + "-wado"),
                    "warm": warm,
                }
            )
            tools_wado["curl"] = lambda: curl_study(
                tools["curl"], web_url, study, scratch, warm=warm is not None
            )
            plan.append(
                ("wado-cold", f"{WADO_LABEL}, {n_instances} instances", n_instances, tools_wado)
            )
        if "qido-studies" in args.items:
            assert dwc is not None
            plan.append(
                (
                    "qido-studies",
                    f"{QIDO_LABEL}, {n_studies:,} rows",
                    n_studies,
                    {
                        "pacsframe": pf_call("qido-studies"),
                        "dicomweb-client": lambda: dwc.call({"op": "qido-studies"}),
                    },
                )
            )

        results: dict[str, dict[str, list[dict[str, Any]]]] = {}
        fresh: dict[str, dict[str, Any]] = {}
        added: dict[int, dict[str, Any]] = {}
        problems = []
        for item, label, expected, tool_calls in plan:
            rounds = min(args.rounds, LARGE_ROUNDS) if item == "get-large" else args.rounds
            if item == "wado-cold" and mode == "full" and len(plan) > 1:
                # The items before freed thousands of files: see _settle_disk.
                _log(f"{label}: waiting {INODE_WAIT_S} s (untimed) for ext4 to reuse inodes")
                os.sync()
                time.sleep(INODE_WAIT_S)
            results[label] = run_rounds(item, label, expected, tool_calls, rounds, problems)
            for folder in made:  # untimed, once the item's rounds are over
                shutil.rmtree(folder, ignore_errors=True)
            made.clear()
            if item == "get-cold":
                _log(f"{label}: peak RSS of fresh processes ({len(RSS_PROBES)} probes, untimed)")
                log = workdir / "rss-probe.log"
                fresh, bad = fresh_rss(cfgs, study, n_instances, scratch, log)
                for p in bad:
                    problems.append(f"{label}: {p}")
                    _log(problems[-1])
            if item == "get-large":
                # A gigabyte per tool: not kept past the item.
                for folder in (out_pf + "-large", out_raw, scratch / "getscu"):
                    shutil.rmtree(folder, ignore_errors=True)
                _log(f"{label}: RSS a get adds, {n_instances} vs {n_large} objects (untimed)")
                log = workdir / "rss-probe.log"
                sizes = {n_instances: study, n_large: large_study}
                added, bad = added_rss(cfgs["pacsframe"], sizes, scratch, log)
                for p in bad:
                    problems.append(f"{label}: {p}")
                    _log(problems[-1])

        if "read-headers" in args.items:
            label, runs = files_item(mode, files_root, args.rounds, problems, tools["dcmdump"])[:2]
            results[label] = runs
        table = render(results, versions, mode, args.rounds, problems, fresh, added)
        _report(table, args.results)
        return 0
    finally:
        for w in workers:
            w.close()
        server.stop()


def _report(table: str, path: Path | None) -> None:
    print(table)
    if path:
        write_results(path, table)
        _log(f"wrote {path}")


def run_rounds(
    item: str,
    label: str,
    expected: int,
    tool_calls: dict[str, Any],
    rounds: int,
    problems: list[str],
) -> dict[str, list[dict[str, Any]]]:
    """``rounds`` rounds of every tool, alternating (the order rotates every round).

    A failed call or a wrong count is added to ``problems``; the tool's answers are
    returned by tool name.
    """
    _log(f"{label}: {rounds} rounds")
    names = list(tool_calls)
    runs: dict[str, list[dict[str, Any]]] = {n: [] for n in names}
    for rnd in range(rounds):
        k = rnd % len(names)
        for name in names[k:] + names[:k]:
            try:
                r = tool_calls[name]()
            except RuntimeError as exc:
                first = str(exc).splitlines()[0][:300]
                problems.append(f"{label}: {name}, round {rnd + 1}: {first}")
                _log(problems[-1])
                continue
            # The drill-down's row count is the series found, not the studies.
            if "count" in r and item != "find-series" and r["count"] != expected:
                problems.append(
                    f"{label}: {name}, round {rnd + 1}, got {r['count']} (not {expected})"
                )
                _log(problems[-1])
            if item == "get-cached" and r.get("requests"):
                problems.append(f"{label}: round {rnd + 1} sent requests: {r}")
                _log(problems[-1])
            if r.get("errors"):
                problems.append(f"{label}: {name}, round {rnd + 1}, {r['errors']} unread files")
                _log(problems[-1])
            runs[name].append(r)
    for name, rs in runs.items():
        cpu = [r["cpu_s"] for r in rs if "cpu_s" in r]
        if cpu:
            _log(f"{label}: {name} CPU s median {statistics.median(cpu):.3f}")
    return runs


# dcmdump over the read-headers folder: one process for every file (+sd +r: scan the
# folder recursively), stopping each file's parse before its pixel data (+sb, as
# stop_before_pixels; -q drops the notice it prints for each file), printing only the
# default instance columns (+P per keyword) rather than the whole header.
DCMDUMP_ARGS = ("+sd", "+r", "-q", "+sb", "PixelData")


def files_folder(root: Path, mode: str) -> tuple[Path, int]:
    """The read-headers folder under ``root``, written once (untimed) and reused.

    ``root/cohort.json`` records the cohort's arguments and file count; a folder that
    does not match them is written again.
    """
    from pacsframe.demo import make_cohort

    spec = FILES_COHORT[mode]
    marker, folder = root / "cohort.json", root / "dicom"
    try:
        loaded = json.loads(marker.read_text())
    except (OSError, ValueError):
        loaded = {}
    if loaded.get("cohort") == spec and folder.is_dir():
        count = sum(1 for p in folder.rglob("*") if p.is_file())
        if count == loaded.get("files"):
            _log(f"read-headers: {folder} already holds the {count:,} files")
            return folder, count
    _log(f"read-headers: writing the files into {folder} (once; reused by later runs)")
    marker.unlink(missing_ok=True)
    shutil.rmtree(folder, ignore_errors=True)
    manifest = make_cohort(folder, **{**spec, "modalities": tuple(spec["modalities"])})
    marker.write_text(json.dumps({"cohort": spec, "files": len(manifest)}, indent=2))
    return folder, len(manifest)


def files_item(
    mode: str, root: Path, rounds: int, problems: list[str], dcmdump: str
) -> tuple[str, dict[str, list[dict[str, Any]]], dict[str, Any]]:
    """The read-headers item: its label, its runs and the pacsframe worker's info.

    pacsframe and the pydicom loop each run in a fresh long-lived worker of their own
    (no PACS), dcmdump as a process; the files are in the page cache for every round
    (they were just written or counted).
    """
    from pacsframe.query import build_query

    folder, count = files_folder(root, mode)
    columns = build_query("IMAGE", "study").columns
    log = root / "workers.log"
    pfw = Worker("pacsframe", {}, log)
    try:
        loop = Worker("pydicom", {"columns": columns}, log)
    except Exception:
        pfw.close()
        raise
    try:
        calls: dict[str, Any] = {
            f"pacsframe w={w}": lambda w=w: pfw.call(
                {"op": "read-headers", "folder": str(folder), "workers": w}
            )
            for w in FILES_WORKERS
        }
        calls["pydicom"] = lambda: loop.call({"op": "read-headers", "folder": str(folder)})
        searched = [arg for c in columns for arg in ("+P", c)]
        calls["dcmdump"] = lambda: run_dcmtk([dcmdump, *DCMDUMP_ARGS, *searched, str(folder)])
        label = f"{FILES_LABEL}, {count:,} files"
        runs = run_rounds("read-headers", label, count, calls, rounds, problems)
    finally:
        pfw.close()
        loop.close()
    return label, runs, pfw.info


START, END = "<!-- bench:start -->", "<!-- bench:end -->"


def write_results(path: Path, table: str) -> None:
    """Put ``table`` between the markers of ``path`` (the rest is kept), or write it."""
    block = f"{START}\n{table}\n{END}"
    try:
        text = path.read_text()
    except FileNotFoundError:
        text = ""
    if START in text and END in text:
        head, rest = text.split(START, 1)
        text = head + block + rest.split(END, 1)[1]
    else:
        text = block + "\n"
    path.write_text(text)


LARGE_LABEL = "C-GET large study, cold"
WADO_LABEL = "WADO-RS get cold"
QIDO_LABEL = "QIDO-RS studies"
FILES_LABEL = "read_headers of a folder"
TARGETS = {
    FILES_LABEL: ("<= 0.5x the pydicom loop (dcmdump shown, no target)", None),
    WADO_LABEL: ("<= 1.0x dicomweb-client, <= 1.5x curl", None),
    QIDO_LABEL: ("<= 1.0x dicomweb-client", None),
    f"C-FIND study level x{REPEAT}": ("none (shows scaling)", None),
    LARGE_LABEL: (
        f"none for time; RSS a get adds < {ADDED_RSS_TARGET_MB} MB, not growing (below)",
        None,
    ),
    "C-FIND study level": ("<= 1.0x findscu, <= 1.1x raw pynetdicom", None),
    "C-GET cold": (
        f"<= 1.0x getscu; pacsframe peak RSS < {RSS_TARGET_MB} MB in a fresh process (below)",
        None,
    ),
    "C-GET fully cached": ("< 2% of pacsframe's fastest cold median, zero sub-operations", None),
    "C-MOVE": ("<= 1.0x movescu receiving on its own port", None),
}


def render(
    results: dict[str, dict[str, list[dict[str, Any]]]],
    versions: dict[str, str],
    mode: str,
    rounds: int,
    problems: list[str],
    fresh: dict[str, dict[str, Any]] | None = None,
    added: dict[int, dict[str, Any]] | None = None,
) -> str:
    """The markdown table (and context) of one run.

    ``fresh``: the RSS_PROBES answers; ``added``: :func:`added_rss`'s, by object count.
    """
    lines = [
        f"Cohorts: {mode}. Seconds: median (min-max) of {rounds} rounds; tools alternate "
        "within a round. pacsframe and raw pynetdicom are timed in process with imports "
        "done (as a notebook user feels it), each in its own long-lived worker; dcmtk "
        "tools as whole processes, with TCP_NODELAY=1. Peak RSS in MB (max over rounds; "
        "for workers the VmHWM of the timed call, interpreter included, so it also holds "
        "what the worker's earlier items left allocated; C-MOVE dcmtk is movescu "
        "receiving on its own port).",
        "",
        "| work item | pacsframe s | raw pynetdicom s (DICOMweb: dicomweb-client; files: "
        "pydicom loop) | dcmtk s (DICOMweb: curl; files: dcmdump) | pacsframe / fastest "
        "other | target | peak RSS MB pf / raw / dcmtk (or curl) |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    cold_best = None
    for label, runs in results.items():
        if label.startswith("C-GET cold"):
            cold_best = min(
                statistics.median(r["seconds"] for r in rs)
                for name, rs in runs.items()
                if name.startswith("pacsframe")
            )
    for label, runs in results.items():
        stats = {n: _stats([r["seconds"] for r in rs]) for n, rs in runs.items() if rs}
        rss = {n: _rss([r.get("rss_mb") for r in rs]) for n, rs in runs.items()}
        target = next((t for k, (t, _) in TARGETS.items() if label.startswith(k)), "")
        # The Python library's column and the C tool's: DICOMweb items fill them with
        # dicomweb-client and curl.
        py = next((n for n in PER_TOOL if n in runs), "pynetdicom")
        ctool = next((n for n in ("curl", "dcmdump") if n in runs), "dcmtk")
        others = [stats[n]["median"] for n in (py, ctool) if n in stats]
        for name in [n for n in runs if n.startswith("pacsframe")]:
            if name not in stats:
                lines.append(f"| {label} ({name}) | every round failed | | | | {target} | |")
                continue
            row_label = label + (f", workers={name.split('=')[1]}" if "=" in name else "")
            if py in PER_TOOL:
                # Each DICOMweb and files target is per tool: the ratio to each.
                ratio = (
                    ", ".join(
                        f"{stats[name]['median'] / stats[n]['median']:.2f}x {n}"
                        for n in (py, ctool)
                        if n in stats
                    )
                    or "n/a"
                )
            elif others:
                ratio = f"{stats[name]['median'] / min(others):.2f}x"
            elif label.startswith("C-GET fully cached") and cold_best:
                ratio = f"{100 * stats[name]['median'] / cold_best:.1f}% of cold"
            else:
                ratio = "n/a"
            lines.append(
                f"| {row_label} | {_fmt(stats[name])} | {_fmt(stats.get(py))} "
                f"| {_fmt(stats.get(ctool))} | {ratio} | {target} "
                f"| {rss[name]} / {rss.get(py, 'n/a')} / {rss.get(ctool, 'n/a')} |"
            )
    workers = _workers_text(results)
    if workers:
        lines += ["", workers]
    if fresh:
        cold = next(rs for label, rs in results.items() if label.startswith("C-GET cold"))
        getscu = [r.get("rss_mb") for r in cold.get("dcmtk", [])]
        lines += ["", _fresh_rss_text(fresh, getscu)]
    if added:
        lines += ["", _added_rss_text(added)]
    # The DIMSE items' notes, unless only offline items ran.
    if any(not label.startswith(FILES_LABEL) for label in results):
        lines += [
            "",
            f"The x{REPEAT} item is the study-level query made {REPEAT} times over one "
            f"association (pacsframe: inside `with pacs:`, frames concatenated; findscu: the "
            f"query file given {REPEAT} times), a 10k-row answer built from the same cohort "
            "without loading 10,000 objects into Orthanc. The drill-down is one series query "
            "per study of the frame, over one association. C-GET/C-MOVE rounds start from an "
            "empty cache/output folder (emptied untimed); the raw pynetdicom C-MOVE starts "
            "and stops its storage SCP inside the timed call, as pacsframe does. movescu "
            "receives on its own port, and its time includes 0-1 s of waiting: dcmtk's "
            "DIMSE_moveUser looks for the peer's sub-association only between 1 s polls of "
            "the main association, so a sub-association that arrives first waits for the "
            f"poll (storescp as the receiver has no such wait). The large study's get runs at "
            f"most {LARGE_ROUNDS} rounds.",
        ]
    lines += [
        *(["", _web_text(results)] if _web_text(results) else []),
        *(["", _files_text(results)] if _files_text(results) else []),
        "",
        *(
            ["Wrong answers seen (rows or objects):", *[f"- {p}" for p in problems], ""]
            if problems
            else []
        ),
        *[f"- {k}: {v}" for k, v in versions.items()],
        "",
    ]
    return "\n".join(lines)


def _files_text(results: dict[str, dict[str, list[dict[str, Any]]]]) -> str:
    """What each tool did in the read-headers item (empty when it did not run)."""
    if not any(label.startswith(FILES_LABEL) for label in results):
        return ""
    spec = FILES_COHORT["full"]
    return (
        f"{FILES_LABEL}: a folder of small files from the cohort generator (full: "
        f"{spec['patients']} patients x {spec['studies_per_patient']} studies x "
        f"{spec['series_per_study']} series x {spec['instances_per_series']} "
        f"{spec['matrix']}x{spec['matrix']} instances, seed {spec['seed']}), written "
        "once and reused, in the page cache for every round. pacsframe: "
        "`pf.read_headers(folder, workers=...)` (4 threads is its default), the typed "
        "instance frame, in a worker of its own. pydicom loop: "
        "`dcmread(path, stop_before_pixels=True)` for each file "
        "of `sorted(Path(folder).rglob('*'))` and `ds.get(keyword)` for the same default "
        "instance columns into one `pd.DataFrame` (values untyped), in a worker of its "
        f"own. dcmdump: one process, `dcmdump {' '.join(DCMDUMP_ARGS)} +P <keyword>... "
        "folder`, each of the default columns searched (`+P`), the text to a file: "
        "the fastest invocation tried on the 20,000 files (`-M` instead of `+sb` was "
        "about as fast or slower, the whole header instead of `+P` 1.2-2x slower, one "
        "process per file about 100x slower)."
    )


def _web_text(results: dict[str, dict[str, list[dict[str, Any]]]]) -> str:
    """What each tool did in the DICOMweb items (empty when none ran)."""
    parts = []
    if any(label.startswith(WADO_LABEL) for label in results):
        parts.append(
            f"{WADO_LABEL}: every tool asks with `Accept: {WADO_ACCEPT}` (the objects as "
            "stored; without transfer-syntax Orthanc 1.7's plugin would transcode to "
            "Explicit VR Little Endian). pacsframe: `pf.DICOMweb(url).get(frame, "
            "workers=...)` into a new cache, the study frame queried over QIDO-RS "
            'untimed. dicomweb-client: `retrieve_study(uid, media_types=(("application/'
            'dicom", "*"),))`, which decodes every part into a pydicom Dataset in '
            "memory, then `ds.save_as(...)` per instance into a new folder, both "
            "timed. curl: one process saving the multipart body to one file, unparsed "
            "(the floor). Before each timed call, untimed, the disk is synced, the page "
            "cache dropped (as root) and the study asked once into nothing, so that "
            "every round starts with the server's files in memory and none of the "
            "rounds before (their written pages made creating files dearer, up to twice "
            "as slow by the last round); each round writes into a folder no round used "
            "before (all removed after the item), so that no round pays for the freeing "
            "of earlier rounds' files (this ext4 has no journal, and then does not reuse "
            "an inode freed in the last 60 s: each new file scans past those; see "
            f"_settle_disk); the item itself starts {INODE_WAIT_S} s after a sync that "
            "follows the items before."
        )
    if any(label.startswith(QIDO_LABEL) for label in results):
        parts.append(
            f"{QIDO_LABEL}: the study-level search of everything, Orthanc's "
            "`LimitFindResults` 0 (no cap). pacsframe: `find_studies()`, a typed frame, "
            "paging with `limit=1000`/`offset`, each page asked together with the one "
            "after it (two requests in flight, which Orthanc answers on two threads): "
            "pages at 0 and 1,000, then 2,000 (2 rows, which ends the answer) and 3,000 "
            "(asked ahead, abandoned), each page typed while the next one is worked on. "
            "dicomweb-client: `search_for_studies()`, one request, timed as it comes: "
            "a list of DICOM JSON dicts, no frame."
        )
    return " ".join(parts)


def _workers_text(results: dict[str, dict[str, list[dict[str, Any]]]]) -> str:
    """Whether more workers made the cold C-GET faster (issue 12's target)."""
    label, cold = next(
        ((label, rs) for label, rs in results.items() if label.startswith("C-GET cold")),
        ("", {}),
    )
    medians = {
        int(name.split("=")[1]): statistics.median(r["seconds"] for r in rs)
        for name, rs in cold.items()
        if name.startswith("pacsframe w=") and rs
    }
    if 1 not in medians or len(medians) < 2:
        return ""
    ratios = ", ".join(
        f"workers={w} {medians[w] / medians[1]:.2f}x" for w in sorted(medians) if w != 1
    )
    verdict = "met" if 2 in medians and medians[2] < medians[1] else "not met"
    if 2 not in medians:
        verdict = "not measured"
    return (
        f"Workers ({label}): pacsframe's median time relative to workers=1: {ratios}. "
        f"Target workers=2 faster than workers=1: {verdict}."
    )


if __name__ == "__main__":
    sys.exit(main())
