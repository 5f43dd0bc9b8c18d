"""``monitor``: the command line (worker, publish, schema, protocol, mllp, topics)."""
from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from .gc_tuning import tune_garbage_collector


def _settings():
    from .settings import get_settings

    return get_settings()


def cmd_worker(args: argparse.Namespace) -> int:
    s = _settings()
    from .settings import require_secrets
    from .topics_admin import ensure_topics

    require_secrets("worker", s)
    ensure_topics(s)
    import faust

    from .worker import build_worker

    from .logs import faust_logging_config

    app = build_worker(s).app
    tune_garbage_collector()
    from .metrics import time_garbage_collections

    time_garbage_collections()
    level = args.loglevel or s.log_level
    worker = faust.Worker(app, loglevel=level, quiet=True, redirect_stdouts=False,
                          logging_config=faust_logging_config(level))
    worker.execute_from_commandline()
    return 0


def cmd_publish(args: argparse.Namespace) -> int:
    from .publish import publish_file

    if not Path(args.file).is_file():
        raise FileNotFoundError(2, "no such file" if not Path(args.file).exists() else "not a file", args.file)
    counts = publish_file(args.file, _settings())
    print(json.dumps({"published": counts, "total": sum(counts.values())}))
    return 0


def cmd_schema(args: argparse.Namespace) -> int:
    from schemas.jsonschema import write_schemas

    from .asyncapi import render

    out = Path(args.out)
    for path in write_schemas(out):
        print(path)
    asyncapi = out.parent / "asyncapi.yaml"
    asyncapi.write_text(render(version=_version(), schema_dir=f"./{out.name}"), encoding="utf-8")
    print(asyncapi)
    return 0


def cmd_topics(args: argparse.Namespace) -> int:
    from .topics_admin import ensure_topics

    created = ensure_topics(_settings())
    print(json.dumps({"created": created}))
    return 0


def cmd_protocol_check(args: argparse.Namespace) -> int:
    from alerts.protocol_check import check_protocol_file

    ok, text = check_protocol_file(args.file)
    print(text)
    return 0 if ok else 1


def cmd_protocol_test(args: argparse.Namespace) -> int:
    """Run clinicians' scenario files (like ``promtool test rules``); no broker needed."""
    from alerts.scenarios import format_results, run_paths

    results = run_paths(args.paths or None)
    print(format_results(results))
    if not results:
        print("no scenario files found", file=sys.stderr)
        return 1
    return 0 if all(r.ok for r in results) else 1


def cmd_protocol_replay(args: argparse.Namespace) -> int:
    """Compare a candidate protocol with the baseline over recorded patients (issue 17)."""
    from .replay import run

    return run(args, _settings())


def cmd_mllp(args: argparse.Namespace) -> int:
    from .mllp import main as mllp_main

    return mllp_main(args.rest)


def cmd_inbox(args: argparse.Namespace) -> int:
    from .inbox import main as inbox_main

    return inbox_main(args.rest)


def cmd_patients(args: argparse.Namespace) -> int:
    from .patients import main as patients_main

    return patients_main(args.rest)


def cmd_simulate(args: argparse.Namespace) -> int:
    from .simulate import main as simulate_main

    return simulate_main(args.rest)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="monitor", description="Post-gene-therapy safety monitoring service",
                                epilog=_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--version", action="version", version=f"%(prog)s {_version()}",
                   help="print the installed version and exit")
    sub = p.add_subparsers(dest="command", required=True)
    w = sub.add_parser("worker", help="run a stream-processing worker")
    w.add_argument("--loglevel", "--log-level", default=None, metavar="LEVEL",
                   help="log level: DEBUG, INFO, WARNING, ERROR (env LOG_LEVEL; default INFO)")
    w.set_defaults(func=cmd_worker)
    pub = sub.add_parser("publish", help="publish a JSON-lines file of events to their topics")
    pub.add_argument("file", help="JSON-lines file: one event per line, or {\"topic\", \"value\"[, \"key\"]} "
                                   "(topics from the TOPIC_* variables; broker KAFKA_BOOTSTRAP_SERVERS)")
    pub.set_defaults(func=cmd_publish)
    sc = sub.add_parser("schema", help="write the JSON Schemas of every topic payload and the AsyncAPI document")
    sc.add_argument("--out", default="schemas/json", metavar="DIR",
                    help="directory for the *.json schema files; asyncapi.yaml goes to its parent "
                         "(no env; default schemas/json)")
    sc.set_defaults(func=cmd_schema)
    t = sub.add_parser("topics", help="create the service's topics (idempotent)")
    t.set_defaults(func=cmd_topics)
    pr = sub.add_parser("protocol", help="safety protocol tools")
    prs = pr.add_subparsers(dest="protocol_command", required=True)
    chk = prs.add_parser("check", help="validate and summarise a protocol file")
    chk.add_argument("file", help="protocol YAML file to check (the shipped ones are in alerts/protocols/)")
    chk.set_defaults(func=cmd_protocol_check)
    tst = prs.add_parser("test", help="run protocol test scenarios (files or folders; none = the shipped suite)")
    tst.add_argument("paths", nargs="*", metavar="PATH",
                     help="scenario files or folders (default: the shipped suite in alerts/protocols/tests)")
    tst.set_defaults(func=cmd_protocol_test)
    rp = prs.add_parser("replay", help="replay recorded patients through a candidate protocol and compare its alerts "
                                       "with the baseline (read-only; never writes to the service's topics)")
    rp.add_argument("--candidate", action="append", required=True, metavar="FILE",
                    help="candidate protocol YAML (repeatable; products it does not cover keep the baseline) "
                         "(required, no default)")
    rp.add_argument("--baseline", action="append", default=None, metavar="FILE",
                    help="baseline protocol YAML (repeatable) (default: the deployed protocols: PROTOCOL_FILES, "
                         "else the shipped ones)")
    rp.add_argument("--since", default=None, metavar="ISO",
                    help="first arrival time to read, ISO 8601 (default: the start of the topics / file)")
    rp.add_argument("--until", default=None, metavar="ISO",
                    help="last arrival time to read; the clock runs up to it (default: the newest record read)")
    rp.add_argument("--patients", type=int, default=None, metavar="N",
                    help="replay only the first N patients in recorded order (default: all)")
    rp.add_argument("--json", default=None, metavar="OUT",
                    help="write the comparison as JSON to OUT (default: none)")
    rp.add_argument("--html", default=None, metavar="OUT",
                    help="write a self-contained HTML report with the alert-burden chart to OUT (default: none)")
    rp.add_argument("--from-file", default=None, metavar="JSONL",
                    help="read a JSON-lines export (the format of 'monitor publish' / 'monitor simulate') instead "
                         "of the topics (default: read the topics at KAFKA_BOOTSTRAP_SERVERS)")
    rp.add_argument("--identify", action="store_true",
                    help="list changed patients by id, for clinical reviewers (default: off, pseudonymous "
                         "references keyed with PSEUDONYM_SECRET)")
    rp.add_argument("--quiet", action="store_true", help="no progress lines on stderr (default: off)")
    rp.set_defaults(func=cmd_protocol_replay)
    m = sub.add_parser("mllp", help="HL7 v2 MLLP listener publishing to Kafka")
    m.add_argument("rest", nargs=argparse.REMAINDER, help="options of the listener: see 'monitor mllp --help'")
    m.set_defaults(func=cmd_mllp)
    ib = sub.add_parser("inbox", help="the nurse web inbox (serve | hash-password)")
    ib.add_argument("rest", nargs=argparse.REMAINDER, help="sub-command and options: see 'monitor inbox --help'")
    ib.set_defaults(func=cmd_inbox)
    pa = sub.add_parser("patients", help="patient demographics feed (load JSON, FHIR Patient or HL7 ADT files)")
    pa.add_argument("rest", nargs=argparse.REMAINDER, help="sub-command and options: see 'monitor patients --help'")
    pa.set_defaults(func=cmd_patients)
    si = sub.add_parser("simulate", help="generate (and publish) a synthetic post-dose cohort with ground truth")
    si.add_argument("rest", nargs=argparse.REMAINDER, help="options of the simulator: see 'monitor simulate --help'")
    si.set_defaults(func=cmd_simulate)
    _add_tool_commands(sub)
    return p


#: sub-commands with their own argument parsers
_DELEGATED = {"inbox": cmd_inbox, "simulate": cmd_simulate, "mllp": cmd_mllp, "patients": cmd_patients}

#: long-running commands keep the Kafka clients' logs; the others are one-shot tools
_SERVERS = frozenset({"worker"})

_EPILOG = """\
Configuration comes from environment variables (KAFKA_BOOTSTRAP_SERVERS, TOPIC_*,
KAFKA_SECURITY_PROTOCOL, PSEUDONYM_SECRET, LOG_LEVEL, LOG_FORMAT=text|json, ...):
'monitor config docs' prints them all with defaults and meanings (docs/configuration.md).
"""


def _version() -> str:
    from importlib import metadata

    try:
        return metadata.version("sma-gene-therapy-monitor")
    except metadata.PackageNotFoundError:
        return "unknown"


def cmd_config_docs(args: argparse.Namespace) -> int:
    from .config_docs import render_markdown

    text = render_markdown()
    if args.out:
        Path(args.out).write_text(text, encoding="utf-8")
        print(args.out)
    else:
        sys.stdout.write(text)
    return 0


def cmd_config_show(args: argparse.Namespace) -> int:
    from .config_docs import effective_config

    print(json.dumps(effective_config(), indent=2))
    return 0


def cmd_maps_check(args: argparse.Namespace) -> int:
    from schemas.codemaps import CodeMapError, check_code_map, load_code_map

    failed = 0
    for path in args.files:
        try:
            cmap = load_code_map(path)
        except CodeMapError as exc:
            print(f"FAIL {exc}")
            failed += 1
            continue
        problems = check_code_map(cmap)
        for problem in problems:
            print(f"FAIL {path}: {problem}")
        if problems:
            failed += 1
        else:
            print(f"ok   {path}: source {cmap.source!r}, {len(cmap.codes)} codes, {len(cmap.units)} units")
    return 1 if failed else 0


def _add_tool_commands(sub) -> None:
    """Operator tools: ``dlq`` (dead letters), ``changelog`` (the patient store's changelog) and
    ``config`` (environment reference)."""
    from .dlq_tool import add_parser as add_dlq_parser

    add_dlq_parser(sub, "See docs/operations.md.")
    from .changelog_tool import add_parser as add_changelog_parser

    add_changelog_parser(sub)
    cf = sub.add_parser("config", help="configuration reference and effective configuration")
    cfs = cf.add_subparsers(dest="config_command", required=True)
    doc = cfs.add_parser("docs", help="print the table of every environment variable (Markdown)")
    doc.add_argument("--out", default=None, metavar="FILE",
                     help="write to FILE instead of stdout (default: stdout; docs/configuration.md is generated so)")
    doc.set_defaults(func=cmd_config_docs)
    show = cfs.add_parser("show", help="print the effective configuration as JSON (secrets masked)")
    show.set_defaults(func=cmd_config_show)
    mp = sub.add_parser("maps", help="per-source code and unit maps (CODE_MAPS_DIR; docs/integration.md)")
    mps = mp.add_subparsers(dest="maps_command", required=True)
    mchk = mps.add_parser("check", help="validate code maps against the analyte catalogue (exit 1 on a problem)")
    mchk.add_argument("files", nargs="+", metavar="FILE", help="code map YAML file(s)")
    mchk.set_defaults(func=cmd_maps_check)


def _delegated_log_level(rest: list[str]) -> str | None:
    """The ``--log-level``/``--loglevel`` a delegated command was given (its own parser reads it too late)."""
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--log-level", "--loglevel", dest="level", default=None)
    known, _ = pre.parse_known_args(rest)
    return known.level


def _fail(message: str, code: int = 2) -> int:
    print(f"monitor: {message}", file=sys.stderr)
    return code


def main(argv: list[str] | None = None) -> int:
    """Run a command; user mistakes (missing file, unreachable broker, bad value) print one line, exit non-zero."""
    from .logs import configure_logging

    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        if argv and argv[0] in _DELEGATED:
            # the root logger is configured here, so the command's own basicConfig is a no-op: honour its level
            configure_logging(_delegated_log_level(argv[1:]))
            return int(_DELEGATED[argv[0]](argparse.Namespace(rest=argv[1:])) or 0)
        args = build_parser().parse_args(argv)
        configure_logging(tool=args.command not in _SERVERS)
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        return 130
    except Exception as exc:  # noqa: BLE001 - only the user mistakes below become one line
        message = _user_error(exc)
        if message is None:
            raise
        return _fail(message)


def _user_error(exc: BaseException) -> str | None:
    """A one-line message for a user mistake, or None for a bug (which keeps its traceback)."""
    from .dlq_tool import DlqError
    from .topics_admin import KafkaUnreachable

    if isinstance(exc, (KafkaUnreachable, DlqError)):
        return str(exc)
    if isinstance(exc, (FileNotFoundError, IsADirectoryError, NotADirectoryError, PermissionError)):
        return f"{exc.filename}: {exc.strerror.lower() if exc.strerror else exc}"
    if isinstance(exc, json.JSONDecodeError):
        return f"invalid JSON (line {exc.lineno}, column {exc.colno}): {exc.msg}"
    if isinstance(exc, UnicodeDecodeError):
        return f"the file is not UTF-8 text: {exc.reason}"
    from kafka.errors import KafkaConnectionError, KafkaTimeoutError

    if isinstance(exc, (KafkaConnectionError, KafkaTimeoutError)):
        from .settings import get_settings

        return (f"cannot reach Kafka at {get_settings().kafka_bootstrap_servers} ({type(exc).__name__}); "
                "check KAFKA_BOOTSTRAP_SERVERS and the TLS/SASL settings")
    from pydantic import ValidationError

    if isinstance(exc, ValidationError):
        errors = "; ".join(f"{'.'.join(map(str, e['loc'])).upper() or 'value'}: {e['msg']}" for e in exc.errors())
        return f"invalid configuration: {errors}"
    from .replay import ReplayError

    if isinstance(exc, ReplayError):
        return str(exc)
    if isinstance(exc, ValueError) and str(exc).startswith("LOG_FORMAT="):
        return str(exc)
    return None


if __name__ == "__main__":
    sys.exit(main())
