"""The benchmark harness runs end to end (tiny cohorts, one round), so it cannot rot."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
from servers import _in_ci, require_tool

ROOT = Path(__file__).resolve().parent.parent

pytestmark = [pytest.mark.orthanc, pytest.mark.dcmtk]


# The read-headers row: a ratio to each of the pydicom loop and dcmdump, and its target.
READ_HEADERS_ROW = (
    r"\| read_headers of a folder, 1,000 files, workers=1 \| .* \| \d+\.\d+x pydicom, "
    r"\d+\.\d+x dcmdump \| <= 0\.5x the pydicom loop"
)


def _run(tmp_path: Path, *args: str) -> str:
    done = subprocess.run(
        [
            sys.executable,
            str(ROOT / "benchmarks" / "run.py"),
            "--quick",
            "--rounds",
            "1",
            "--timeout",
            "60",
            "--workdir",
            str(tmp_path / "work"),
            *args,
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done.stdout


def test_offline_item_needs_no_orthanc(tmp_path):
    """read-headers alone starts no Orthanc, and its folder is written once."""
    require_tool("dcmdump")
    out = _run(tmp_path, "--items", "read-headers")
    assert re.search(READ_HEADERS_ROW, out), out
    assert "- Orthanc: not started" in out, out
    assert "The x5 item" not in out, out
    assert "`pf.read_headers(folder, workers=...)`" in out, out
    assert "Wrong answers" not in out, out
    folder = tmp_path / "work" / "files1k"
    assert not (tmp_path / "work" / "orthanc").exists()
    marker = folder / "cohort.json"
    written = marker.stat().st_mtime_ns
    out = _run(tmp_path, "--items", "read-headers")
    assert marker.stat().st_mtime_ns == written  # reused, not written again
    assert re.search(READ_HEADERS_ROW, out), out


def test_quick_benchmark_prints_and_writes_the_table(tmp_path):
    for tool in ("Orthanc", "findscu", "getscu", "movescu", "curl"):
        require_tool(tool)
    plugin = Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so")
    if not plugin.exists():
        message = f"{plugin} missing: `apt-get install orthanc-dicomweb`"
        if _in_ci():
            pytest.fail(message, pytrace=False)
        pytest.skip(message)
    results = tmp_path / "RESULTS.md"
    stale = "<!-- bench:start -->\nSTALE TABLE\n<!-- bench:end -->"
    results.write_text(f"# Kept\n\n{stale}\n\nAlso kept.\n")
    out = _run(tmp_path, "--results", str(results))
    assert "timed in process with imports done" in out
    for row in (
        "C-FIND study level, 22 rows",
        "C-FIND study level x5, 110 rows",
        "C-FIND series drill-down from 22 studies",
        "C-GET cold, 10 instances, workers=1",
        "C-GET cold, 10 instances, workers=4",
        "C-GET fully cached re-run, 10 instances",
        "C-MOVE to own SCP, 10 instances",
        "C-GET large study, cold, 40 instances in 4 series, workers=1",
        "C-GET large study, cold, 40 instances in 4 series, workers=4",
        "WADO-RS get cold, 10 instances, workers=1",
        "WADO-RS get cold, 10 instances, workers=4",
        "QIDO-RS studies, 22 rows",
        "read_headers of a folder, 1,000 files, workers=1",
        "read_headers of a folder, 1,000 files, workers=4",
    ):
        assert f"| {row} |" in out, out
    assert re.search(READ_HEADERS_ROW, out), out
    assert "<= 1.0x movescu receiving on its own port" in out, out
    # The DICOMweb rows: a ratio to each of dicomweb-client and curl, and the notes.
    wado = r"\| WADO-RS get cold, 10 instances, workers=1 \| .* \| \d+\.\d+x dicomweb-client, "
    assert re.search(wado + r"\d+\.\d+x curl \| <= 1\.0x dicomweb-client, <= 1\.5x curl \|", out)
    assert re.search(r"\| QIDO-RS studies, 22 rows \| .* \| \d+\.\d+x dicomweb-client \|", out)
    assert "every tool asks with `Accept: multipart/related" in out, out
    assert "Orthanc's `LimitFindResults` 0 (no cap)" in out, out
    workers = (
        r"Workers \(C-GET cold, 10 instances\): pacsframe's median time relative to "
        r"workers=1: workers=2 \d+\.\d+x, workers=4 \d+\.\d+x\. Target workers=2 faster "
        r"than workers=1: (not )?met\."
    )
    assert re.search(workers, out), out
    # The memory a get adds, 10 vs 40 objects: both measured (a failed probe is n/a).
    added = (
        r"RSS a get adds over the imported baseline .*: 10 objects -?\d+ MB \(over \d+ MB "
        r"after import\), 40 objects -?\d+ MB \(over \d+ MB after import\)\. Target < 50 MB "
        r"and not growing .*: (not )?met"
    )
    assert re.search(added, out), out
    assert "every round failed" not in out, out
    # Every fresh-process probe answered (a failed one renders as n/a).
    fresh = (
        r"Peak RSS of a fresh process doing the cold C-GET .*: pacsframe \d+ MB \(base "
        r"install, .*: \d+ MB; import alone \d+ MB / \d+ MB\), raw pynetdicom \d+ MB, "
        r"getscu \d+ MB\. Target pacsframe < 150 MB, judged on the first number: (not )?met\."
    )
    assert re.search(fresh, out), out
    assert f"pacsframe: 0.1.0 ({ROOT / 'pacsframe' / '__init__.py'})" in out
    written = results.read_text()
    assert written.startswith("# Kept\n") and written.endswith("Also kept.\n")
    assert "STALE TABLE" not in written and "| C-MOVE to own SCP, 10 instances |" in written
