"""Modality Worklist C-FIND (``PACS.find_worklist``) against the demo PACS, Orthanc and wlmscpfs.

The same worklist (:func:`pacsframe.demo.worklist.make_worklist`: 5 entries, 7 steps,
two entries with two steps, one name in UTF-8) is served by the demo PACS from
datasets, and by Orthanc's ModalityWorklists plugin (Debian's build) and dcmtk's
``wlmscpfs`` from ``*.wl`` files the fixtures write with pydicom. Expected rows are
computed here from the datasets, in plain Python.

Where the peers differ (each test says which it relies on):

* Orthanc's plugin matches with Orthanc's own C-FIND code (PN case-insensitive,
  like the demo PACS) and returns only the steps that match; wlmscpfs matches on
  the bytes (PN case-sensitive) and supports a fixed set of matching keys (see
  ``man wlmscpfs``: for a step, Modality, ScheduledStationAETitle, the start date
  and time and the performing physician).
"""

from __future__ import annotations

import datetime as _dt
import fnmatch
import json
import os
from collections.abc import Callable
from pathlib import Path

import pandas as pd
import pytest
from pydicom.dataset import Dataset
from servers import DcmtkStoreSCP, OrthancServer, WlmscpfsServer, _in_ci, require_tool

import pacsframe as pf
from pacsframe import frames
from pacsframe.demo import DemoPACS
from pacsframe.demo.worklist import DEMO_DATE, make_worklist, steps_frame, write_worklist
from pacsframe.errors import NotSupported, QueryError, ResultsCapped
from pacsframe.query import SPS_KEYS, build_worklist_query

ORTHANC_PLUGIN = Path("/usr/share/orthanc/plugins/libModalityWorklists.so")
ENTRIES = make_worklist(DEMO_DATE)


def _orthanc_plugin() -> str:
    require_tool("Orthanc")
    if ORTHANC_PLUGIN.is_file():
        return str(ORTHANC_PLUGIN)
    message = f"{ORTHANC_PLUGIN} is missing; install Debian's orthanc package (it ships it)."
    if _in_ci():
        pytest.fail(message, pytrace=False)
    pytest.skip(message)
    raise AssertionError("unreachable")


def _orthanc_worklists(workdir: Path, entries: list[Dataset], **options: object) -> OrthancServer:
    folder = workdir / "worklists"
    write_worklist(entries, folder)
    return OrthancServer(
        workdir,
        extra_config={
            "Plugins": [_orthanc_plugin()],
            "Worklists": {"Enable": True, "Database": str(folder), **options},
            "DefaultEncoding": "Utf8",
            "DicomAlwaysAllowFind": True,
            # Orthanc 1.10 authorizes worklist C-FIND on its own (default false).
            "DicomAlwaysAllowFindWorklist": True,
        },
    )


@pytest.fixture(scope="module")
def demo_worklist(tmp_path_factory):
    with DemoPACS(tmp_path_factory.mktemp("demo-wl"), worklist=ENTRIES) as server:
        yield server


@pytest.fixture(scope="module")
def orthanc_worklist(tmp_path_factory):
    server = _orthanc_worklists(tmp_path_factory.mktemp("orthanc-wl"), ENTRIES)
    with server:
        yield server


@pytest.fixture(scope="module")
def wlmscpfs(tmp_path_factory):
    server = WlmscpfsServer(tmp_path_factory.mktemp("wlmscpfs"))
    # wlmscpfs ignores a file whose sequence has more than one item: one file per step.
    write_worklist(ENTRIES, server.worklist_dir, one_step_per_file=True)
    with server:
        yield server


@pytest.fixture(params=["demo", "orthanc", "wlmscpfs"])
def peer(request) -> tuple[str, pf.PACS]:
    fixture = {"demo": "demo_worklist", "orthanc": "orthanc_worklist", "wlmscpfs": "wlmscpfs"}
    server = request.getfixturevalue(fixture[request.param])
    port = getattr(server, "dicom_port", None) or server.port
    title = getattr(server, "aet", None) or server.ae_title
    return request.param, pf.PACS("127.0.0.1", port, ae_title=title, dimse_timeout=30)


def expected(
    top: Callable[[Dataset], bool] = lambda entry: True,
    step: Callable[[Dataset], bool] = lambda item: True,
) -> list[tuple[str, str]]:
    """(PatientID, ScheduledProcedureStepID) of every step that matches, sorted."""
    return sorted(
        (entry.PatientID, item.ScheduledProcedureStepID)
        for entry in ENTRIES
        if top(entry)
        for item in entry.ScheduledProcedureStepSequence
        if step(item)
    )


def rows(frame: pd.DataFrame) -> list[tuple[str, str]]:
    return sorted(zip(frame.PatientID, frame.ScheduledProcedureStepID, strict=True))


# --- against every peer ----------------------------------------------------------------------


def test_all_steps_one_row_each_with_the_entry_repeated(peer):
    _, pacs = peer
    frame = pacs.find_worklist()
    assert rows(frame) == expected()
    # An entry with two steps is two rows that repeat its top-level values.
    two = [e for e in ENTRIES if len(e.ScheduledProcedureStepSequence) == 2]
    assert two
    for entry in two:
        mine = frame[frame.PatientID == entry.PatientID]
        assert len(mine) == 2
        for column in ("PatientName", "AccessionNumber", "StudyInstanceUID"):
            assert mine[column].nunique() == 1
        assert sorted(mine.Modality) == sorted(
            i.Modality for i in entry.ScheduledProcedureStepSequence
        )


def test_dtypes_follow_the_vr_table(peer):
    _, pacs = peer
    frame = pacs.find_worklist(return_keys=["ScheduledProcedureStepStatus"])
    assert frame.columns[0] == "PatientID"
    for column in frame.columns:
        assert str(frame[column].dtype) == frames.attribute(column).dtype, column
    first = frame.sort_values("ScheduledProcedureStepID").iloc[0]
    item = ENTRIES[0].ScheduledProcedureStepSequence[0]
    assert first.ScheduledProcedureStepStartDate == pd.Timestamp(DEMO_DATE)
    assert first.ScheduledProcedureStepStartTime == pd.Timedelta(
        hours=int(item.ScheduledProcedureStepStartTime[:2]),
        minutes=int(item.ScheduledProcedureStepStartTime[2:4]),
    )
    # AE 1-n: a list column, as every multi-valued attribute.
    assert first.ScheduledStationAETitle == [item.ScheduledStationAETitle]
    assert first.ScheduledProcedureStepStatus == "SCHEDULED"
    json.dumps(frame.attrs)  # attrs stay JSON-safe
    assert frame.attrs["pacsframe"]["level"] == "WORKLIST"


def test_date_range_on_the_step(peer):
    _, pacs = peer
    day = DEMO_DATE.strftime("%Y%m%d")
    frame = pacs.find_worklist(ScheduledProcedureStepStartDate=(DEMO_DATE, DEMO_DATE))
    assert rows(frame) == expected(step=lambda i: i.ScheduledProcedureStepStartDate == day)
    later = pacs.find_worklist(
        ScheduledProcedureStepStartDate=(DEMO_DATE + _dt.timedelta(days=1), None)
    )
    assert rows(later) == expected(step=lambda i: i.ScheduledProcedureStepStartDate > day)
    assert not pacs.find_worklist(ScheduledProcedureStepStartDate="2020-01-01").shape[0]


def test_time_range_on_the_step(peer):
    _, pacs = peer
    frame = pacs.find_worklist(
        ScheduledProcedureStepStartDate=DEMO_DATE,
        ScheduledProcedureStepStartTime=("08:00", "10:59"),
    )
    day = DEMO_DATE.strftime("%Y%m%d")
    assert rows(frame) == expected(
        step=lambda i: (
            i.ScheduledProcedureStepStartDate == day
            and "0800" <= i.ScheduledProcedureStepStartTime[:4] <= "1059"
        )
    )


def test_wildcard_on_patient_name(peer):
    _, pacs = peer
    frame = pacs.find_worklist(PatientName="Doe*")
    assert rows(frame) == expected(top=lambda e: fnmatch.fnmatchcase(str(e.PatientName), "Doe*"))
    assert set(frame.PatientName) == {"Doe^Jane", "Doe^John"}
    one = pacs.find_worklist(PatientName="?oe^J?ne")
    assert one.PatientName.tolist() == ["Doe^Jane"]


def test_modality_and_station(peer):
    _, pacs = peer
    frame = pacs.find_worklist(Modality="MR")
    assert rows(frame) == expected(step=lambda i: i.Modality == "MR")
    assert set(frame.Modality) == {"MR"}
    station = pacs.find_worklist(ScheduledStationAETitle="CT01")
    assert rows(station) == expected(step=lambda i: i.ScheduledStationAETitle == "CT01")
    both = pacs.find_worklist(Modality="CT", ScheduledStationAETitle="CT02")
    assert rows(both) == expected(
        step=lambda i: i.Modality == "CT" and i.ScheduledStationAETitle == "CT02"
    )


def test_sequence_matching_returns_the_matching_step_only(peer):
    """An entry whose two steps differ in modality answers with the matching one."""
    _, pacs = peer
    entry = next(
        e for e in ENTRIES if len({i.Modality for i in e.ScheduledProcedureStepSequence}) == 2
    )
    wanted = entry.ScheduledProcedureStepSequence[1]
    frame = pacs.find_worklist(PatientID=entry.PatientID, Modality=wanted.Modality)
    assert frame.ScheduledProcedureStepID.tolist() == [wanted.ScheduledProcedureStepID]


def test_non_ascii_names(peer):
    _, pacs = peer
    entry = next(e for e in ENTRIES if not str(e.PatientName).isascii())
    name = str(entry.PatientName)
    frame = pacs.find_worklist(PatientID=entry.PatientID)
    assert frame.PatientName.tolist() == [name] * len(entry.ScheduledProcedureStepSequence)
    found = pacs.find_worklist(PatientName=name[:4] + "*")
    assert set(found.PatientName) == {name}


# --- pacsframe's side: validation, the frame, caps -------------------------------------------


def test_keys_go_to_the_sequence_item_or_top_level():
    query = build_worklist_query(
        {"patient_name": "Doe*", "modality": "CT", "AccessionNumber": None},
        return_keys=["ScheduledProcedureStepStatus", "PatientWeight"],
    )
    ds = query.dataset()
    assert "QueryRetrieveLevel" not in ds
    (item,) = ds.ScheduledProcedureStepSequence
    assert {e.keyword for e in item} == SPS_KEYS & set(query.columns)
    assert item.Modality == "CT" and ds.PatientName == "Doe*"
    assert "PatientWeight" in ds and "PatientWeight" not in item
    assert query.columns[-2:] == ["ScheduledProcedureStepStatus", "PatientWeight"]


@pytest.mark.parametrize(
    ("keys", "words"),
    [
        ({"ScheduledProcedureStepStartDate": "2026-02-30"}, "not a real date"),
        ({"ScheduledProcedureStepStartDate": ("2026-03-05", "2026-03-01")}, "swap"),
        ({"ScheduledProcedureStepStartTime": "25:00"}, "not a time of day"),
        ({"Modality": "ct"}, "upper-case"),
        ({"StudyInstanceUID": "1.2.*"}, "wildcards are not allowed"),
        ({"ScheduledProcedureStepSequence": ""}, "is a sequence"),
        ({"ScheduledStatoinAETitle": "CT01"}, "did you mean"),
    ],
)
def test_bad_values_raise_before_sending(keys, words):
    # Port 1 on loopback: nothing listens, so a call that got as far as sending
    # would fail with a connection error instead.
    pacs = pf.PACS("127.0.0.1", 1, ae_title="NOBODY")
    with pytest.raises(QueryError, match=words):
        pacs.find_worklist(**keys)


def test_dicomweb_has_no_worklist():
    web = pf.DICOMweb("http://127.0.0.1:1/dicom-web")
    assert not hasattr(web, "find_worklist")


def test_a_peer_without_worklist_says_so(demo_worklist, tmp_path):
    with DcmtkStoreSCP(tmp_path) as storescp:
        pacs = pf.PACS("127.0.0.1", storescp.port, ae_title=storescp.aet)
        with pytest.raises(NotSupported, match="Modality Worklist"):
            pacs.find_worklist()


def test_steps_frame_equals_the_answer(demo_worklist):
    """The demo's own one-row-per-step frame is what a client receives."""
    pacs = pf.PACS("127.0.0.1", demo_worklist.port, ae_title=demo_worklist.ae_title)
    answer = pacs.find_worklist()
    local = steps_frame(ENTRIES)[answer.columns]
    pd.testing.assert_frame_equal(answer, local, check_like=False)


@pytest.mark.parametrize("name", ["demo", "orthanc"])
def test_capped_answers_are_split_by_step_date(name, tmp_path):
    """A cap of two answers ended by an unasked 0xFE00: the demo's max_results, and
    Orthanc's plugin option LimitAnswers."""
    if name == "demo":
        server = DemoPACS(tmp_path, worklist=ENTRIES, max_results=2)
    else:
        server = _orthanc_worklists(tmp_path, ENTRIES, LimitAnswers=2)
    with server:
        port = server.port if name == "demo" else server.dicom_port
        pacs = pf.PACS("127.0.0.1", port, ae_title="PFDEMO" if name == "demo" else server.aet)
        with pytest.warns(UserWarning, match="ScheduledProcedureStepStart"):
            frame = pacs.find_worklist(
                ScheduledProcedureStepStartDate=(DEMO_DATE, DEMO_DATE + _dt.timedelta(days=1)),
                progress=False,
            )
    assert rows(frame) == expected()
    assert frame.attrs["pacsframe"]["split"] is True
    assert frame.attrs["pacsframe"]["requests"] > 1


def test_a_cap_no_split_gets_under_raises_with_partial(tmp_path):
    # Two entries at the same minute and a cap of one: no window holds fewer.
    twins = [make_worklist(DEMO_DATE)[0], make_worklist(DEMO_DATE)[0]]
    twins[1].PatientID = "WL9999"
    with DemoPACS(tmp_path, worklist=twins, max_results=1) as server:
        pacs = pf.PACS("127.0.0.1", server.port, ae_title=server.ae_title)
        with (
            pytest.raises(ResultsCapped, match="worklist C-FIND") as caught,
            pytest.warns(UserWarning, match="no ScheduledProcedureStepStartTime"),
        ):
            pacs.find_worklist(ScheduledProcedureStepStartDate=DEMO_DATE, progress=False)
    partial = caught.value.partial
    assert isinstance(partial, pd.DataFrame) and len(partial) == 1
    assert partial.PatientID.iloc[0] in {"WL0001", "WL9999"}


def test_demo_reads_a_folder_at_each_request(tmp_path):
    folder = tmp_path / "wl"
    write_worklist(ENTRIES[:1], folder)
    with DemoPACS(tmp_path / "dicom", worklist=folder) as server:
        pacs = pf.PACS("127.0.0.1", server.port, ae_title=server.ae_title)
        assert pacs.find_worklist().PatientID.tolist() == [ENTRIES[0].PatientID]
        write_worklist(ENTRIES[1:2], folder)
        (folder / "not-a-worklist.wl").write_bytes(b"garbage")
        assert sorted(set(pacs.find_worklist().PatientID)) == [
            ENTRIES[0].PatientID,
            ENTRIES[1].PatientID,
        ]
    assert os.listdir(folder)  # nothing removed


def test_default_demo_worklist():
    entries = make_worklist()
    assert entries[0].ScheduledProcedureStepSequence[0].ScheduledProcedureStepStartDate == (
        DEMO_DATE.strftime("%Y%m%d")
    )
    assert [e.PatientID for e in entries] == [e.PatientID for e in make_worklist()]
    assert [e.StudyInstanceUID for e in entries] == [e.StudyInstanceUID for e in make_worklist()]


def test_what_each_peer_promises(peer):
    """Where the peers differ, each is held to what it documents.

    PN case: the demo PACS and Orthanc match PatientName case-insensitively (PS3.4
    leaves it to the SCP); wlmscpfs compares the bytes. Matching keys: wlmscpfs
    matches on a fixed list (``man wlmscpfs``) and ignores any other key, so a
    ScheduledProcedureStepDescription key returns every step; Orthanc and the
    demo PACS match it.
    """
    name, pacs = peer
    lower = pacs.find_worklist(PatientName="doe*")
    if name == "wlmscpfs":
        assert rows(lower) == []
    else:
        assert rows(lower) == expected(
            top=lambda e: fnmatch.fnmatch(str(e.PatientName).lower(), "doe*")
        )
    described = pacs.find_worklist(ScheduledProcedureStepDescription="MR*")
    if name == "wlmscpfs":
        assert rows(described) == expected()
    else:
        assert rows(described) == expected(
            step=lambda i: fnmatch.fnmatchcase(i.ScheduledProcedureStepDescription, "MR*")
        )


def test_cli_find_level_worklist(demo_worklist, tmp_path):
    from pacsframe import cli

    out = tmp_path / "steps.csv"
    peer = ["--peer", f"127.0.0.1:{demo_worklist.port}", "--aet", demo_worklist.ae_title]
    args = ["find", *peer, "--level", "worklist", "Modality=CT", "--csv", str(out)]
    assert cli.main(args) == 0
    frame = pd.read_csv(out, dtype=str)
    assert sorted(zip(frame.PatientID, frame.ScheduledProcedureStepID, strict=True)) == (
        expected(step=lambda i: i.Modality == "CT")
    )


def test_worklist_logs_no_patient_data(peer, caplog):
    """Every logger at DEBUG over a worklist query names no patient of the worklist."""
    import logging

    _, pacs = peer
    caplog.set_level(logging.DEBUG)
    frame = pacs.find_worklist(PatientName="Doe*", ScheduledProcedureStepStartDate=DEMO_DATE)
    assert len(frame)
    secret = set()
    for entry in ENTRIES:
        secret.update({entry.PatientID, entry.PatientBirthDate, entry.AccessionNumber})
        secret.update(p for p in str(entry.PatientName).split("^") if len(p) >= 3)
    text = "\n".join(record.getMessage() for record in caplog.records)
    assert not [value for value in secret if value in text]


def test_timeout_gives_a_typed_partial(tmp_path):
    """``timeout=`` bounds the call as for find_*: a peer that sleeps before answering
    (wlmscpfs --sleep-before) ends it with reason "timeout" and a typed empty .partial."""
    server = WlmscpfsServer(tmp_path, extra_args=["--sleep-before", "20"])
    write_worklist(ENTRIES, server.worklist_dir, one_step_per_file=True)
    with server:
        pacs = pf.PACS("127.0.0.1", server.port, ae_title=server.aet)
        with pytest.raises(pf.AssociationError, match="find_worklist") as caught:
            pacs.find_worklist(Modality="CT", timeout=1)
    assert caught.value.reason == "timeout"
    partial = caught.value.partial
    assert list(partial.columns) == build_worklist_query({"Modality": "CT"}).columns
    assert len(partial) == 0
    assert partial.attrs["pacsframe"]["partial"] is True
    assert str(partial.ScheduledProcedureStepStartDate.dtype) == "datetime64[ns]"


def test_find_level_worklist_points_to_find_worklist():
    pacs = pf.PACS("127.0.0.1", 1, ae_title="NOBODY")
    with pytest.raises(QueryError, match="find_worklist"):
        pacs.find("worklist")


def test_builder_flattens_steps_and_keeps_entries_without_steps():
    query = build_worklist_query()
    builder = query.builder()
    entry = make_worklist()[1]  # two steps
    bare = Dataset()
    bare.PatientID = "NOSTEPS"
    empty = Dataset()
    empty.PatientID = "EMPTY"
    empty.ScheduledProcedureStepSequence = []
    for ds in (entry, bare, empty):
        builder.add(ds)
    frame = builder.frame()
    assert builder.matches == 3 and len(frame) == 4
    assert frame.PatientID.tolist() == [entry.PatientID] * 2 + ["NOSTEPS", "EMPTY"]
    assert frame.Modality.tolist()[:2] == [
        i.Modality for i in entry.ScheduledProcedureStepSequence
    ]
    assert frame.Modality.isna().tolist()[2:] == [True, True]


def test_study_query_to_a_worklist_server_says_so(wlmscpfs):
    pacs = pf.PACS("127.0.0.1", wlmscpfs.port, ae_title=wlmscpfs.aet)
    with pytest.raises(NotSupported, match="find_worklist"):
        pacs.find_studies()


@pytest.mark.parametrize("implicit", [True, False])
def test_raw_scan_equals_pydicom_for_worklist_answers(implicit):
    """FrameBuilder.add_raw (scan_items) gives the frame pydicom's reader gives."""
    from io import BytesIO

    from pydicom.filebase import DicomBytesIO
    from pydicom.filereader import read_dataset
    from pydicom.filewriter import write_dataset

    query = build_worklist_query(return_keys=["ScheduledProcedureStepStatus", "PatientWeight"])
    fast, slow = query.builder(), query.builder()
    bare = Dataset()
    bare.PatientID = "NOSTEPS"
    for entry in [*ENTRIES, bare]:
        fp = DicomBytesIO()
        fp.is_little_endian, fp.is_implicit_VR = True, implicit
        write_dataset(fp, entry)
        data = fp.getvalue()
        assert fast.add_raw(data, implicit_vr=implicit)
        slow.add(read_dataset(BytesIO(data), implicit, True))
    assert fast.matches == slow.matches == len(ENTRIES) + 1
    pd.testing.assert_frame_equal(fast.frame(), slow.frame())


def test_the_demo_tour_queries_the_demo_worklist(tmp_path, capsys):
    from pacsframe import cli

    assert cli.main(["demo", "--patients", "1", "--folder", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "pacs.find_worklist(" in out
    day = DEMO_DATE.strftime("%Y%m%d")
    for entry in ENTRIES:
        for item in entry.ScheduledProcedureStepSequence:
            if item.ScheduledProcedureStepStartDate == day:
                assert item.ScheduledProcedureStepDescription in out
