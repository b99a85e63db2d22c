"""Command line: ``pacsframe echo|find|get|move|store|demo|serve``.

Examples
--------
``pacsframe echo --peer 127.0.0.1:4242 --aet ORTHANC``

``pacsframe find --peer 127.0.0.1:4242 --aet ORTHANC --level study PatientID=123
StudyDate=20260301-20260406 --csv out.csv``; ``--level worklist`` asks a Modality
Worklist (``find_worklist``: ``Modality=CT ScheduledProcedureStepStartDate=20260302``).

``pacsframe get --peer 127.0.0.1:4242 --aet ORTHANC --from studies.csv`` retrieves
a saved frame into the cache; ``pacsframe move ... --destination OTHER_AE`` moves.

``--max-results N`` gives a peer's C-FIND result cap, for a PACS that stops at N
matches without saying so (capped answers are split and merged; see README).

``pacsframe serve ./folder --port 11112`` runs the demo PACS over a folder, with the
demo worklist (``--max-results N`` makes it cap its answers as Orthanc's LimitFindResults does,
``--http-port 8042`` serves DICOMweb beside DIMSE on 127.0.0.1);
``pacsframe demo`` makes a synthetic cohort, serves it and runs a short tour.

``--timeout`` bounds each response; ``--deadline SECONDS`` bounds the whole
command (the API's ``timeout=``).

DICOM TLS: ``--tls-ca ca.pem [--tls-cert me.pem --tls-key me.key]`` on the client
commands; ``pacsframe serve ./folder --tls-cert server.pem --tls-key server.key
[--tls-ca ca.pem]`` serves TLS only (with ``--tls-ca``, client certificates signed
by that CA are required).
"""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from .deadline import deadline_for
from .errors import PacsFrameError, QueryError
from .pacs import PACS, TLS

__all__ = ["main"]


def _peer(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise argparse.ArgumentTypeError(f"{text!r} is not HOST:PORT, e.g. 127.0.0.1:4242")
    return host, int(port)


def _add_peer_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("peer")
    group.add_argument("--peer", type=_peer, metavar="HOST:PORT", help="where the PACS listens")
    group.add_argument("--aet", default="ANY-SCP", help="the PACS's AE title (called AE)")
    group.add_argument("--calling-aet", default="PACSFRAME", help="our AE title")
    group.add_argument("--config", metavar="NAME", help="a named peer from the config file")
    group.add_argument("--timeout", type=float, default=30.0, help="seconds per response")
    group.add_argument(
        "--max-results",
        type=int,
        metavar="N",
        help="the peer's C-FIND result cap, for a PACS that stops at N matches silently",
    )
    group.add_argument(
        "--deadline",
        type=float,
        metavar="SECONDS",
        help="give up the whole command after SECONDS (keeping what arrived); default: none",
    )
    tls = parser.add_argument_group("DICOM TLS")
    tls.add_argument("--tls", action="store_true", help="use TLS (implied by any --tls-* file)")
    _add_tls_files(tls, "the CA (PEM) that signed the peer's certificate", "our certificate")
    tls.add_argument(
        "--tls-no-check-hostname",
        action="store_true",
        help="do not require the peer's certificate to name the host (the CA still must sign it)",
    )


def _add_tls_files(group: Any, ca_help: str, cert_help: str) -> None:
    group.add_argument("--tls-ca", type=Path, metavar="PEM", help=ca_help)
    group.add_argument("--tls-cert", type=Path, metavar="PEM", help=f"{cert_help} (PEM)")
    group.add_argument("--tls-key", type=Path, metavar="PEM", help="its private key (PEM)")


def _tls(args: argparse.Namespace) -> TLS | None:
    """The TLS settings the --tls-* options ask for, or None."""
    files = {"ca": args.tls_ca, "cert": args.tls_cert, "key": args.tls_key}
    if not any(files.values()) and not getattr(args, "tls", False):
        return None
    check = not getattr(args, "tls_no_check_hostname", False)
    return TLS(**files, check_hostname=check)


def _setup_argparser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pacsframe",
        description="Query a PACS into typed tables; run the embedded demo PACS.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    commands = parser.add_subparsers(dest="command", required=True)

    echo = commands.add_parser("echo", help="C-ECHO a peer and print the round-trip time")
    _add_peer_arguments(echo)

    find = commands.add_parser("find", help="C-FIND and print or save the matches")
    _add_peer_arguments(find)
    find.add_argument(
        "--level",
        default="study",
        help="patient, study, series or image (default study), or worklist (Modality Worklist)",
    )
    find.add_argument("--model", default="study", help="study or patient (root)")
    find.add_argument("--return-keys", default="", help="comma-separated extra keywords to return")
    out = find.add_mutually_exclusive_group()
    out.add_argument("--csv", type=Path, help="write the frame as CSV")
    out.add_argument("--parquet", type=Path, help="write the frame as Parquet (needs pyarrow)")
    find.add_argument("keys", nargs="*", metavar="KEY=VALUE", help="matching keys, DICOM form")

    for name, text in (("get", "C-GET into the cache"), ("move", "C-MOVE to us or another AE")):
        retrieve = commands.add_parser(name, help=f"{text}: matches of a query, or a saved frame")
        _add_peer_arguments(retrieve)
        retrieve.add_argument(
            "--level", default="study", help="level of the query (default study)"
        )
        retrieve.add_argument("--model", default="study", help="study or patient (root)")
        retrieve.add_argument(
            "--from",
            dest="source",
            type=Path,
            help="a frame saved by `pacsframe find` (.csv or .parquet) instead of a query",
        )
        retrieve.add_argument("--cache", type=Path, help="cache folder (default: PACSFRAME_CACHE)")
        retrieve.add_argument("--no-progress", action="store_true", help="no progress bar")
        if name == "get":
            retrieve.add_argument("--workers", type=int, default=4, help="parallel associations")
        else:
            retrieve.add_argument("--destination", help="another AE title (default: ourselves)")
            retrieve.add_argument("--scp-port", type=int, default=0, help="our storage SCP port")
        retrieve.add_argument("keys", nargs="*", metavar="KEY=VALUE", help="matching keys")

    store = commands.add_parser("store", help="C-STORE files or folders to a peer")
    _add_peer_arguments(store)
    store.add_argument("paths", nargs="+", type=Path, help="DICOM files or folders")

    serve = commands.add_parser("serve", help="run the demo PACS over a folder until Ctrl-C")
    serve.add_argument("folder", type=Path, help="folder of DICOM files (created if missing)")
    serve.add_argument("--port", type=int, default=11112)
    serve.add_argument("--aet", default="PFDEMO")
    serve.add_argument(
        "--cohort", type=int, default=0, metavar="N", help="first write N synthetic patients"
    )
    serve.add_argument("--seed", type=int, default=0)
    serve.add_argument(
        "--max-results",
        type=int,
        metavar="N",
        help="answer at most N C-FIND matches, then 0xFE00 (as Orthanc's LimitFindResults)",
    )
    serve.add_argument(
        "--http-port",
        type=int,
        metavar="PORT",
        help="also serve DICOMweb (QIDO-RS, WADO-RS, STOW-RS) on 127.0.0.1:PORT/dicom-web",
    )
    serve.add_argument(
        "--worklist",
        type=Path,
        metavar="DIR",
        help="answer Modality Worklist queries from DIR's *.wl files (default: the demo worklist)",
    )
    _add_tls_files(
        serve.add_argument_group("DICOM TLS (serve TLS only)"),
        "the CA (PEM) that signs client certificates; they are then required",
        "the server's certificate",
    )

    demo = commands.add_parser("demo", help="serve a synthetic cohort and run a short tour")
    demo.add_argument("--patients", type=int, default=12)
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--folder", type=Path, help="where to write the cohort (default: temp)")
    _add_tls_files(
        demo.add_argument_group("DICOM TLS (the tour's client uses the same files)"),
        "the CA (PEM) that signed the certificate; client certificates are then required",
        "the server's certificate, also the tour client's",
    )
    return parser


def _pacs(args: argparse.Namespace, **settings: Any) -> PACS:
    """The peer from --config or --peer/--aet, with extra settings (cache, scp_port)."""
    settings = {k: v for k, v in settings.items() if v}
    if args.max_results is not None:
        settings["max_results"] = args.max_results
    tls = _tls(args)
    if tls is not None:
        settings["tls"] = tls
    if args.config:
        return PACS.from_config(args.config, **settings)
    if args.peer is None:
        raise QueryError("give --peer HOST:PORT (and --aet), or --config NAME.")
    host, port = args.peer
    timeouts = {"dimse_timeout": args.timeout, "acse_timeout": args.timeout}
    return PACS(host, port, args.aet, args.calling_aet, **timeouts, **settings)


def _read_frame(path: Path) -> pd.DataFrame:
    if not path.is_file():
        raise QueryError(f"{path} does not exist; save a frame with `pacsframe find --csv`.")
    if path.suffix.lower() == ".parquet":
        return pd.read_parquet(path)
    if path.suffix.lower() != ".csv":
        raise QueryError(f"{path} is neither .csv nor .parquet; give a frame saved by find.")
    # UIDs and IDs must stay strings (a PatientID like 000123 is not a number).
    return pd.read_csv(path, dtype=str, keep_default_na=False).replace("", None)


def _retrieve(args: argparse.Namespace) -> None:
    # --deadline bounds the whole command: the query and the retrieval share it.
    with deadline_for(args.deadline, args.command):
        _run_retrieve(args)


def _run_retrieve(args: argparse.Namespace) -> None:
    pacs = _pacs(args, cache=args.cache, scp_port=getattr(args, "scp_port", 0))
    if args.source is not None:
        if args.keys:
            raise QueryError("give either --from FRAME or KEY=VALUE matching keys, not both.")
        frame = _read_frame(args.source)
    else:
        frame = pacs.find(args.level, model=args.model, **_keys(args.keys))
    progress = not args.no_progress
    if args.command == "get":
        result = pacs.get(frame, workers=args.workers, progress=progress, model=args.model)
    else:
        result = pacs.move(frame, args.destination, progress=progress, model=args.model)
    print(result)
    if args.command == "get" or args.destination is None:
        print(f"cache: {pacs.cache.root}")


def _keys(pairs: Sequence[str]) -> dict[str, str]:
    keys: dict[str, str] = {}
    for pair in pairs:
        name, sep, value = pair.partition("=")
        if not sep or not name:
            raise QueryError(
                f"{pair!r} is not KEY=VALUE, e.g. PatientID=123 or StudyDate=20260301-"
            )
        keys[name.strip()] = value.strip()
    return keys


def _write(frame: pd.DataFrame, args: argparse.Namespace) -> None:
    if args.csv:
        frame.to_csv(args.csv, index=False)
        print(f"{len(frame)} rows written to {args.csv}")
    elif args.parquet:
        try:
            frame.to_parquet(args.parquet, index=False)
        except ImportError:
            raise QueryError("writing Parquet needs pyarrow: pip install pyarrow") from None
        print(f"{len(frame)} rows written to {args.parquet}")
    else:
        with pd.option_context("display.width", 200, "display.max_columns", 20):
            print(frame.to_string(max_rows=60) if len(frame) else "no matches")


def _demo(args: argparse.Namespace) -> None:
    from .demo import DemoPACS, make_cohort

    folder = args.folder or Path(tempfile.mkdtemp(prefix="pacsframe-demo-"))
    manifest = make_cohort(folder, patients=args.patients, seed=args.seed)
    print(f"Wrote {len(manifest)} synthetic instances for {args.patients} patients to {folder}")
    tls = _tls(args)
    client_tls = None
    if tls is not None:
        # The tour's client trusts the CA (or the self-signed server certificate)
        # and, when client certificates are required, presents the same one.
        client_tls = TLS(ca=tls.ca or tls.cert, cert=tls.cert, key=tls.key)
    with DemoPACS(folder, tls=tls, http_port=0) as server:
        secure = " (TLS)" if tls is not None else ""
        print(f"Demo PACS {server.ae_title!r} listening on 127.0.0.1:{server.port}{secure}")
        print(f"DICOMweb (QIDO-RS, WADO-RS, STOW-RS) at {server.url}\n")
        pacs = PACS("127.0.0.1", server.port, ae_title=server.ae_title, tls=client_tls)
        print(f"C-ECHO: {pacs.echo() * 1000:.1f} ms\n")
        with pd.option_context("display.width", 160, "display.max_columns", 12):
            # C-FIND answers come in the server's order; sort for reading.
            studies = pacs.find_studies(StudyDate=("2026-01-01", None))
            studies = studies.sort_values(["StudyDate", "StudyTime"], ignore_index=True)
            print(">>> studies = pacs.find_studies(StudyDate=('2026-01-01', None))")
            print(studies[["PatientName", "StudyDate", "ModalitiesInStudy", "StudyDescription"]])
            print("\n>>> studies.dtypes")
            print(studies.dtypes.to_string())
            ct = studies[studies.ModalitiesInStudy.apply(lambda m: "CT" in m)]
            recent = ct[ct.StudyDate >= "2026-02-01"]
            print("\n>>> recent = studies[CT in ModalitiesInStudy & StudyDate >= '2026-02-01']")
            print(recent[["PatientName", "StudyDate", "StudyDescription"]])
            series = pacs.find_series(recent, Modality="CT")
            print("\n>>> series = pacs.find_series(recent, Modality='CT')")
            shown = ["PatientName", "StudyDate", "SeriesNumber", "SeriesDescription"]
            print(series[[*shown, "NumberOfSeriesRelatedInstances"]])
            steps = pacs.find_worklist(ScheduledProcedureStepStartDate="2026-03-02")
            print("\n>>> steps = pacs.find_worklist(ScheduledProcedureStepStartDate='2026-03-02')")
            shown = ["PatientName", "ScheduledProcedureStepStartTime", "Modality"]
            print(steps[[*shown, "ScheduledStationAETitle", "ScheduledProcedureStepDescription"]])


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; return the exit status."""
    args = _setup_argparser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(message)s"
    )
    try:
        if args.command == "echo":
            pacs = _pacs(args)
            seconds = pacs.echo(timeout=args.deadline)
            print(f"C-ECHO {pacs.ae_title} at {pacs.host}:{pacs.port}: {seconds * 1000:.1f} ms")
        elif args.command == "find":
            pacs = _pacs(args)
            extra = [k for k in args.return_keys.split(",") if k.strip()]
            if args.level.strip().lower() == "worklist":
                frame = pacs.find_worklist(
                    return_keys=extra, timeout=args.deadline, **_keys(args.keys)
                )
            else:
                frame = pacs.find(
                    args.level,
                    model=args.model,
                    return_keys=extra,
                    timeout=args.deadline,
                    **_keys(args.keys),
                )
            _write(frame, args)
        elif args.command == "store":
            result = _pacs(args).store([str(p) for p in args.paths], timeout=args.deadline)
            print(result)
            for row in result.failed_instances.itertuples():
                print(f"failed: {row.path}: {row.error}", file=sys.stderr)
            return 0 if result.failed == 0 else 1
        elif args.command in ("get", "move"):
            _retrieve(args)
        elif args.command == "serve":
            from .demo import make_cohort, serve

            if args.cohort:
                make_cohort(args.folder, patients=args.cohort, seed=args.seed)
            tls = _tls(args)
            if tls is not None:
                tls.server_context()  # a missing --tls-cert fails before "Serving"
            args.folder.mkdir(parents=True, exist_ok=True)
            secure = " over TLS" if tls is not None else ""
            web = ""
            if args.http_port:
                web = f", DICOMweb at http://127.0.0.1:{args.http_port}/dicom-web"
            print(
                f"Serving {args.folder} as {args.aet!r} on 127.0.0.1:{args.port}{secure}{web}; "
                "Ctrl-C stops."
            )
            serve(
                args.folder,
                ae_title=args.aet,
                port=args.port,
                tls=tls,
                max_results=args.max_results,
                http_port=args.http_port,
                worklist=args.worklist,
            )
        elif args.command == "demo":
            _demo(args)
    except PacsFrameError as exc:
        print(f"pacsframe: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
