"""Capped C-FIND answers come back whole, or raise ResultsCapped with what was obtained.

Against real servers on loopback: the demo PACS with ``max_results`` (Orthanc's
behaviour), Orthanc itself with ``LimitFindResults``/``LimitFindInstances``, and the
fault peer refusing as dcm4chee-arc does or stopping silently with Success. Every
test checks the rows: each match exactly once, nothing else.
"""

from __future__ import annotations

import pandas as pd
import pytest
from capped import write_studies
from faults import Faults, FaultyPACS, status
from servers import OrthancServer, require_tool

import pacsframe as pf
from pacsframe import cli

# A day over the cap is split by StudyTime, with a warning that studies of that day
# without a StudyTime may be missing; the tests that check it say so with pytest.warns.
pytestmark = pytest.mark.filterwarnings("ignore:.*split into StudyTime windows:UserWarning")

CAP = 5
CROWDED_DAY = "20260402"
# Two studies a month at 09:30 across 2024-2026, one day with nine studies at nine
# different minutes, a placeholder date, a pre-digital one, a future one, an undated one.
SPREAD = [
    (f"{y}{m:02d}{d:02d}", "093000") for y in (2024, 2025) for m in (2, 5, 8, 11) for d in (3, 21)
]
CROWD = [
    (CROWDED_DAY, t)
    for t in (
        "070500",
        "074000",
        "090500",
        "094000",
        "130500",
        "134000",
        "180500",
        "184000",
        "235900",
    )
]
ODD = [("19000101", "000000"), ("19920615", "101010"), ("20991231", "120000"), ("", "100000")]
WHEN = SPREAD + CROWD + ODD
NO_BIRTH_DATE = 5
BIRTH_DATES = [
    "" if i == NO_BIRTH_DATE else f"{1940 + i}{1 + i % 9:02d}{10 + i % 18:02d}"
    for i in range(len(WHEN))
]


@pytest.fixture(scope="module")
def archive(tmp_path_factory):
    """(folder, studies manifest, multi-instance manifest) of the capped archive."""
    folder = tmp_path_factory.mktemp("capped")
    studies = write_studies(folder, WHEN, birth_dates=BIRTH_DATES)
    # Two more studies of four images each, for IMAGE-level drill-downs.
    images = write_studies(
        folder, [("20250101", "080000")] * 2, seed="caps-images", instances=4, prefix="IMG"
    )
    return folder, studies, images


@pytest.fixture(scope="module")
def capped_demo(archive):
    with pf.demo.DemoPACS(archive[0], max_results=CAP) as server:
        yield server


def client(server, **settings) -> pf.PACS:
    return pf.PACS("127.0.0.1", server.port, server.ae_title, dimse_timeout=30, **settings)


def dated(manifest: pd.DataFrame) -> set[str]:
    return set(manifest[manifest.StudyDate != ""].StudyInstanceUID)


def assert_each_once(frame: pd.DataFrame, expected: set[str], *, allowed: set[str] = frozenset()):
    uids = frame.StudyInstanceUID.tolist()
    assert len(uids) == len(set(uids)), "a study came back twice"
    assert expected <= set(uids) <= expected | allowed


# --- the demo PACS, capped like Orthanc ---------------------------------------------------------


def test_a_capped_demo_pacs_answers_in_full(capped_demo, archive):
    _, studies, images = archive
    pacs = client(capped_demo)
    with pytest.warns(UserWarning, match="no StudyDate match no window"):
        got = pacs.find_studies(progress=False)
    everything = set(studies.StudyInstanceUID) | set(images.StudyInstanceUID)
    undated = set(studies[studies.StudyDate == ""].StudyInstanceUID)
    # The undated study is there only if the capped first answer carried it.
    assert_each_once(got, everything - undated, allowed=undated)
    attrs = got.attrs["pacsframe"]
    assert attrs["split"] is True and attrs["requests"] > len(everything) // CAP
    assert str(got.StudyDate.dtype) == "datetime64[ns]"
    assert got.StudyDate.min() == pd.Timestamp("1900-01-01")
    assert got.StudyDate.max() == pd.Timestamp("2099-12-31")  # after today: still covered


def test_a_date_range_and_a_crowded_day_are_split_by_date_then_time(capped_demo, archive):
    _, studies, _ = archive
    pacs = client(capped_demo)
    with pytest.warns(UserWarning, match="split into StudyTime windows"):
        got = pacs.find_studies(StudyDate=("2026-01-01", None), progress=False)
    expected = set(studies[(studies.StudyDate >= "20260101")].StudyInstanceUID)
    assert_each_once(got, expected)
    day = pacs.find_studies(StudyDate=CROWDED_DAY, StudyTime=("07:00", "13:59"), progress=False)
    in_window = studies[
        (studies.StudyDate == CROWDED_DAY) & studies.StudyTime.between("070000", "135959")
    ]
    assert_each_once(day, set(in_window.StudyInstanceUID))
    assert day.attrs["pacsframe"]["split"] is True


def test_an_answer_under_the_cap_is_one_request(capped_demo):
    got = client(capped_demo).find_studies(StudyDate="20240203-20240521")
    assert got.attrs["pacsframe"]["requests"] == 1 and got.attrs["pacsframe"]["split"] is False
    assert len(got) == 4


def test_patients_are_split_by_birth_date(capped_demo, archive):
    _, studies, images = archive
    with pytest.warns(UserWarning, match="no PatientBirthDate"):
        got = client(capped_demo).find_patients(progress=False)
    ids = got.PatientID.tolist()
    assert len(ids) == len(set(ids))
    born = set(studies[studies.PatientBirthDate != ""].PatientID)
    everyone = set(studies.PatientID) | set(images.PatientID)
    assert born <= set(ids) <= everyone
    assert got.attrs["pacsframe"]["split"] is True


def test_a_minute_over_the_cap_raises_with_the_rows_obtained(tmp_path):
    minute = [(CROWDED_DAY, f"0830{s:02d}") for s in range(CAP + 2)]
    others = [(CROWDED_DAY, "1000"), ("20260403", "1000")]
    manifest = write_studies(tmp_path, minute + others, seed="minute")
    with (
        pf.demo.DemoPACS(tmp_path, max_results=CAP) as server,
        pytest.raises(pf.ResultsCapped) as caught,
    ):
        client(server).find_studies(StudyDate=(CROWDED_DAY, "2026-04-03"), progress=False)
    error = caught.value
    assert isinstance(error, pf.QueryError)
    assert error.window == f"StudyDate={CROWDED_DAY} StudyTime=0830-083059.999999"
    assert error.cap == CAP
    message = str(error)
    assert f"at {CAP}" in message and error.window in message and "Narrow the query" in message
    partial = error.partial
    assert partial.StudyInstanceUID.is_unique
    assert set(partial.StudyInstanceUID) <= set(manifest.StudyInstanceUID)
    # Everything outside the crowded minute was obtained, and the minute's capped rows.
    outside = manifest.iloc[len(minute) :]
    assert set(outside.StudyInstanceUID) <= set(partial.StudyInstanceUID)
    assert len(partial) == len(outside) + CAP
    assert str(partial.StudyDate.dtype) == "datetime64[ns]"


def test_drill_downs_split_per_parent_and_carry_the_parents(tmp_path):
    # One patient with eight studies spread over a year, another with one.
    when = [(f"2025{m:02d}15", "0900") for m in range(1, 9)] + [("20250301", "1000")]
    manifest = write_studies(tmp_path, when, seed="drill", patients=2, prefix="DRL")
    with pf.demo.DemoPACS(tmp_path, max_results=3) as server:
        pacs = client(server)
        patients = pacs.find_patients()  # two patients: under the cap
        with pytest.warns(UserWarning, match=r"no StudyDate .* \(0 such row\(s\) here\)"):
            got = pacs.find_studies(patients, progress=False)
    assert_each_once(got, set(manifest.StudyInstanceUID))
    assert got.attrs["pacsframe"]["split"] is True
    owner = manifest.set_index("StudyInstanceUID").PatientID
    assert (got.PatientID == got.StudyInstanceUID.map(owner)).all()
    assert "NumberOfPatientRelatedStudies" in got.columns  # a parent column, carried


def test_a_drill_down_over_the_cap_in_total_but_not_per_parent_needs_no_split(
    capped_demo, archive
):
    _, studies, images = archive
    pacs = client(capped_demo)
    parents = pacs.find_studies(StudyDate=("2024-01-01", "2025-12-31"), progress=False)
    series = pacs.find_series(parents)
    assert len(series) > CAP and series.SeriesInstanceUID.is_unique
    assert series.attrs["pacsframe"]["split"] is False
    assert series.attrs["pacsframe"]["requests"] == len(parents)
    expected = pd.concat([studies, images])
    expected = expected[expected.StudyInstanceUID.isin(parents.StudyInstanceUID)]
    assert set(series.SeriesInstanceUID) == set(expected.SeriesInstanceUID)


def test_image_level_has_no_complete_split_and_says_so(capped_demo, archive):
    _, _, images = archive
    pacs = pf.PACS("127.0.0.1", capped_demo.port, capped_demo.ae_title)
    series = pacs.find_series(sorted(set(images.StudyInstanceUID)))
    capped_demo.max_results = 3
    try:
        with pytest.raises(pf.ResultsCapped) as caught:
            pacs.find_instances(series, progress=False)
    finally:
        capped_demo.max_results = CAP
    error = caught.value
    assert "no complete split exists at the IMAGE level" in str(error)
    assert "in 2 of the 2 parent queries" in str(error)
    partial = error.partial
    assert partial.SOPInstanceUID.is_unique and len(partial) == 2 * 3
    assert set(partial.SOPInstanceUID) <= set(images.SOPInstanceUID)
    assert "Modality" in partial.columns  # the parent series' columns are carried


# --- the fault peer: dcm4chee-arc's refusal, silent caps, 0xB001 -----------------------------


@pytest.fixture
def faulty(archive):
    with FaultyPACS(archive[0]) as server:
        yield server


RANGE = ("2025-01-01", "2026-12-31")


def _in_range(archive) -> set[str]:
    _, studies, images = archive
    both = pd.concat([studies, images])
    return set(both[both.StudyDate.between("20250101", "20261231")].StudyInstanceUID)


@pytest.mark.parametrize(
    "refusal",
    [
        status(0xC000, "Request entity too large"),  # dcm4chee-arc
        status(0xA700, "Too many matches"),
    ],
)
def test_a_refusal_that_names_a_size_is_split(faulty, archive, refusal):
    faulty.faults = Faults(refuse_over=(CAP, refusal))
    with pytest.warns(UserWarning, match="StudyTime"):
        got = client(faulty).find_studies(StudyDate=RANGE, progress=False)
    assert_each_once(got, _in_range(archive))


@pytest.mark.parametrize(
    ("code", "comment"), [(0xC000, "index offline"), (0xA700, None), (0xA900, "too large")]
)
def test_a_refusal_that_names_no_size_is_still_a_dimse_error(faulty, code, comment):
    faulty.faults = Faults(refuse_over=(CAP, status(code, comment)))
    with pytest.raises(pf.DimseError) as caught:
        client(faulty).find_studies(StudyDate=RANGE)
    assert caught.value.status == code and type(caught.value) is pf.DimseError


def test_a_silent_cap_is_beaten_with_max_results(faulty, archive):
    faulty.faults = Faults(status_after=(CAP, 0x0000))
    # Nothing in the answer says it stopped: without max_results, nothing can tell.
    assert len(client(faulty).find_studies(StudyDate=RANGE)) == CAP
    with pytest.warns(UserWarning, match="StudyTime"):
        got = client(faulty, max_results=CAP).find_studies(StudyDate=RANGE, progress=False)
    assert_each_once(got, _in_range(archive))


def test_b001_is_a_cap(faulty, archive):
    pending = [0]

    def final_b001(command, data):
        if command.Status in (0xFF00, 0xFF01):
            pending[0] += 1
            return
        if command.Status == 0x0000 and pending[0] == CAP:
            command.Status = 0xB001  # "matching reached response limit"
        pending[0] = 0

    # pynetdicom's SCP goes on after a Warning its handler yields; so the fault peer
    # stops with Success at the cap and that final response is rewritten on its way.
    faulty.faults = Faults(status_after=(CAP, 0x0000), response=final_b001)
    with pytest.warns(UserWarning, match="StudyTime"):
        got = client(faulty).find_studies(StudyDate=RANGE, progress=False)
    assert_each_once(got, _in_range(archive))


# --- settings -----------------------------------------------------------------------------------


@pytest.mark.parametrize("value", [0, -3, 2.5, True, "100"])
def test_max_results_is_validated_with_a_sentence(value, tmp_path):
    with pytest.raises(pf.QueryError, match="must be a whole number of at least 1"):
        pf.PACS("127.0.0.1", 104, "X", max_results=value)
    with pytest.raises(pf.QueryError, match="must be a whole number >= 1"):
        pf.demo.DemoPACS(tmp_path, max_results=value)


def test_serve_takes_max_results():
    args = cli._setup_argparser().parse_args(["serve", "folder", "--max-results", "3"])
    assert args.max_results == 3


def test_max_results_from_config_environment_and_cli(tmp_path, monkeypatch, faulty, archive):
    path = tmp_path / "config.toml"
    path.write_text(
        f'[peers.capped]\nhost = "127.0.0.1"\nport = {faulty.port}\n'
        f'ae_title = "{faulty.ae_title}"\nmax_results = 7\n',
        encoding="utf-8",
    )
    monkeypatch.setenv("PACSFRAME_CONFIG", str(path))
    monkeypatch.delenv("PACSFRAME_MAX_RESULTS", raising=False)
    assert pf.PACS.from_config("capped").max_results == 7
    monkeypatch.setenv("PACSFRAME_MAX_RESULTS", str(CAP))
    assert pf.PACS.from_config("capped").max_results == CAP
    monkeypatch.setenv("PACSFRAME_MAX_RESULTS", "0")
    with pytest.raises(pf.QueryError, match="max_results=0"):
        pf.PACS.from_config("capped")
    monkeypatch.delenv("PACSFRAME_MAX_RESULTS")

    faulty.faults = Faults(status_after=(CAP, 0x0000))
    out = tmp_path / "found.csv"
    args = ["find", "--peer", f"127.0.0.1:{faulty.port}", "--aet", faulty.ae_title]
    args += ["--max-results", str(CAP), "--csv", str(out), "StudyDate=20250101-20261231"]
    with pytest.warns(UserWarning, match="StudyTime"):
        assert cli.main(args) == 0
    found = pd.read_csv(out, dtype=str)
    assert set(found.StudyInstanceUID) == _in_range(archive) and found.StudyInstanceUID.is_unique


# --- Orthanc with LimitFindResults / LimitFindInstances ------------------------------------------


@pytest.fixture(scope="module")
def capped_orthanc(archive, tmp_path_factory):
    require_tool("Orthanc")
    _, studies, images = archive
    server = OrthancServer(
        tmp_path_factory.mktemp("orthanc-capped"),
        extra_config={"LimitFindResults": CAP, "LimitFindInstances": 3},
    )
    server.start()
    try:
        stored = pf.PACS(server.host, server.dicom_port, server.aet).store(
            pd.concat([studies, images])
        )
        assert stored.failed == 0
        yield server
    finally:
        server.stop()


@pytest.mark.orthanc
def test_orthanc_with_limit_find_results_answers_in_full(capped_orthanc, archive):
    _, studies, images = archive
    pacs = pf.PACS(capped_orthanc.host, capped_orthanc.dicom_port, capped_orthanc.aet)
    with pytest.warns(UserWarning, match="no StudyDate"):
        got = pacs.find_studies(progress=False)
    everything = set(studies.StudyInstanceUID) | set(images.StudyInstanceUID)
    undated = set(studies[studies.StudyDate == ""].StudyInstanceUID)
    assert_each_once(got, everything - undated, allowed=undated)
    assert got.attrs["pacsframe"]["split"] is True
    with pytest.warns(UserWarning, match="StudyTime"):
        day = pacs.find_studies(StudyDate=CROWDED_DAY, progress=False)
    assert_each_once(day, set(studies[studies.StudyDate == CROWDED_DAY].StudyInstanceUID))
    with pytest.warns(UserWarning, match="no PatientBirthDate"):
        patients = pacs.find_patients(progress=False)
    assert patients.PatientID.is_unique
    born = set(studies[studies.PatientBirthDate != ""].PatientID)
    assert born <= set(patients.PatientID) <= set(studies.PatientID) | set(images.PatientID)


@pytest.mark.orthanc
def test_orthanc_limit_find_instances_raises_with_partial(capped_orthanc, archive):
    _, _, images = archive
    pacs = pf.PACS(capped_orthanc.host, capped_orthanc.dicom_port, capped_orthanc.aet)
    series = pacs.find_series(sorted(set(images.StudyInstanceUID)))
    assert len(series) == 2  # under LimitFindResults: no split needed
    with pytest.raises(pf.ResultsCapped) as caught:
        pacs.find_instances(series, progress=False)
    error = caught.value
    assert error.cap == 3 and "IMAGE level" in str(error)
    assert error.partial.SOPInstanceUID.is_unique and len(error.partial) == 6
    assert set(error.partial.SOPInstanceUID) <= set(images.SOPInstanceUID)
