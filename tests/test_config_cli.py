"""Named peers from the TOML config file, and the command line."""

from __future__ import annotations

import pandas as pd
import pytest

import pacsframe as pf
from pacsframe import cli


@pytest.fixture
def config(tmp_path, monkeypatch):
    path = tmp_path / "config.toml"
    path.write_text(
        "[peers.hospital]\n"
        'host = "10.1.2.3"\nport = 4242\nae_title = "HOSP"\ncalling_ae = "ME"\n'
        "dimse_timeout = 12.5\n",
        encoding="utf-8",
    )
    monkeypatch.setenv("PACSFRAME_CONFIG", str(path))
    for key in ("HOST", "PORT", "AE_TITLE", "CALLING_AE"):
        monkeypatch.delenv(f"PACSFRAME_{key}", raising=False)
    return path


def test_from_config(config):
    pacs = pf.PACS.from_config("hospital")
    assert (pacs.host, pacs.port, pacs.ae_title, pacs.calling_ae) == (
        "10.1.2.3",
        4242,
        "HOSP",
        "ME",
    )
    assert pacs.dimse_timeout == 12.5


def test_environment_overrides_config(config, monkeypatch):
    monkeypatch.setenv("PACSFRAME_HOST", "127.0.0.1")
    monkeypatch.setenv("PACSFRAME_PORT", "11112")
    pacs = pf.PACS.from_config("hospital")
    assert (pacs.host, pacs.port) == ("127.0.0.1", 11112)


def test_unknown_peer_lists_known_ones(config):
    with pytest.raises(pf.QueryError, match="peers defined: hospital"):
        pf.PACS.from_config("clinic")


def test_missing_file_says_how_to_create_it(tmp_path):
    with pytest.raises(pf.QueryError, match=r"\[peers.x\] table"):
        pf.PACS.from_config("x", tmp_path / "none.toml")


def test_unknown_setting_is_named(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text('[peers.a]\nhost = "h"\nprot = 1\n', encoding="utf-8")
    with pytest.raises(pf.QueryError, match="unknown settings \\['prot'\\]"):
        pf.PACS.from_config("a", path)


def test_cli_echo_and_find_csv(demo_server, cohort, tmp_path, capsys):
    peer = ["--peer", f"127.0.0.1:{demo_server.port}", "--aet", demo_server.ae_title]
    assert cli.main(["echo", *peer]) == 0
    assert "C-ECHO" in capsys.readouterr().out
    _, manifest = cohort
    pid = manifest.PatientID.iloc[0]
    out = tmp_path / "out.csv"
    args = ["find", *peer, "--level", "study", f"PatientID={pid}", "StudyDate=20260101-"]
    assert cli.main([*args, "--csv", str(out)]) == 0
    frame = pd.read_csv(out)
    assert set(frame.PatientID) == {pid}
    assert len(frame) == manifest[manifest.PatientID == pid].StudyInstanceUID.nunique()


def test_cli_find_parquet_and_table(demo_server, tmp_path, capsys):
    peer = ["--peer", f"127.0.0.1:{demo_server.port}", "--aet", demo_server.ae_title]
    out = tmp_path / "out.parquet"
    assert (
        cli.main(
            ["find", *peer, "--level", "patient", "--model", "patient", "--parquet", str(out)]
        )
        == 0
    )
    assert len(pd.read_parquet(out)) > 0
    assert cli.main(["find", *peer, "--level", "study", "Modality=CT"]) == 0


def test_cli_errors_are_sentences(capsys):
    assert cli.main(["find", "--peer", "127.0.0.1:1", "StudyDate=2026*"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("pacsframe: error:") and "wildcards" in err
    assert cli.main(["find", "StudyDate=2026"]) == 2
    assert "--peer" in capsys.readouterr().err


def test_cli_get_from_query_and_from_saved_frame(demo_server, cohort, tmp_path, capsys):
    peer = ["--peer", f"127.0.0.1:{demo_server.port}", "--aet", demo_server.ae_title]
    _, manifest = cohort
    pid = manifest.PatientID.iloc[0]
    cache = tmp_path / "cache"
    args = ["get", *peer, "--cache", str(cache), "--no-progress", f"PatientID={pid}"]
    assert cli.main(args) == 0
    out = capsys.readouterr().out
    wanted = (manifest.PatientID == pid).sum()
    assert f"completed={wanted}" in out and str(cache) in out
    saved = tmp_path / "series.csv"
    assert cli.main(["find", *peer, "--level", "study", "--csv", str(saved)]) == 0
    capsys.readouterr()
    again = ["get", *peer, "--cache", str(cache), "--no-progress", "--from", str(saved)]
    assert cli.main(again) == 0
    out = capsys.readouterr().out
    assert f"cached={wanted}" in out and f"completed={len(manifest) - wanted}" in out


def test_cli_move_to_us(demo_server, cohort, tmp_path, capsys):
    from servers import free_port

    port = free_port()
    demo_server.add_known_ae("CLIMOVE", "127.0.0.1", port)
    peer = ["--peer", f"127.0.0.1:{demo_server.port}", "--aet", demo_server.ae_title]
    peer += ["--calling-aet", "CLIMOVE"]
    _, manifest = cohort
    pid = manifest.PatientID.iloc[-1]
    args = ["move", *peer, "--cache", str(tmp_path / "c"), "--scp-port", str(port)]
    assert cli.main([*args, "--no-progress", f"PatientID={pid}"]) == 0
    assert f"completed={(manifest.PatientID == pid).sum()}" in capsys.readouterr().out


def test_cli_get_refuses_both_sources(demo_server, tmp_path, capsys):
    peer = ["--peer", f"127.0.0.1:{demo_server.port}", "--aet", demo_server.ae_title]
    frame = tmp_path / "f.csv"
    frame.write_text("StudyInstanceUID\n1.2.3\n")
    assert cli.main(["get", *peer, "--from", str(frame), "PatientID=1"]) == 2
    assert "not both" in capsys.readouterr().err


def test_cli_store_reports_failures_with_exit_status(tmp_path, capsys):
    from pacsframe.demo import DemoPACS, make_cohort

    source = tmp_path / "src"
    manifest = make_cohort(source, patients=1, seed=61, studies_per_patient=1, matrix=8)
    (source / "junk.txt").write_text("not DICOM")
    with DemoPACS(tmp_path / "dest") as server:
        peer = ["--peer", f"127.0.0.1:{server.port}", "--aet", server.ae_title]
        assert cli.main(["store", *peer, str(source)]) == 1
        captured = capsys.readouterr()
        assert f"completed={len(manifest)}" in captured.out
        assert "junk.txt" in captured.err and "not a readable DICOM file" in captured.err
        assert len(server.instances()) == len(manifest)
