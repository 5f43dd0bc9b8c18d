"""``monitor``: the command line (worker, publish, schema, protocol, mllp, topics)."""
from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path


def _settings():
    from .settings import get_settings

    return get_settings()


def cmd_worker(args: argparse.Namespace) -> int:
    s = _settings()
    from .topics_admin import ensure_topics

    ensure_topics(s)
    import faust

    from .worker import build_worker

    app = build_worker(s).app
    worker = faust.Worker(app, loglevel=args.loglevel or s.log_level, quiet=True, redirect_stdouts=False)
    worker.execute_from_commandline()
    return 0


def cmd_publish(args: argparse.Namespace) -> int:
    from .publish import publish_file

    counts = publish_file(args.file, _settings())
    print(json.dumps({"published": counts, "total": sum(counts.values())}))
    return 0


def cmd_schema(args: argparse.Namespace) -> int:
    from schemas.jsonschema import write_schemas

    for path in write_schemas(Path(args.out)):
        print(path)
    return 0


def cmd_topics(args: argparse.Namespace) -> int:
    from .topics_admin import ensure_topics

    created = ensure_topics(_settings())
    print(json.dumps({"created": created}))
    return 0


def cmd_protocol_check(args: argparse.Namespace) -> int:
    from alerts.protocol import check_protocol_file

    ok, text = check_protocol_file(args.file)
    print(text)
    return 0 if ok else 1


def cmd_mllp(args: argparse.Namespace) -> int:
    from .mllp import main as mllp_main

    return mllp_main(args.rest)


def cmd_inbox(args: argparse.Namespace) -> int:
    from .inbox import main as inbox_main

    return inbox_main(args.rest)


def cmd_simulate(args: argparse.Namespace) -> int:
    from .simulate import main as simulate_main

    return simulate_main(args.rest)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="monitor", description="Post-gene-therapy safety monitoring service")
    sub = p.add_subparsers(dest="command", required=True)
    w = sub.add_parser("worker", help="run a stream-processing worker")
    w.add_argument("--loglevel", default=None)
    w.set_defaults(func=cmd_worker)
    pub = sub.add_parser("publish", help="publish a JSON-lines file of events to their topics")
    pub.add_argument("file")
    pub.set_defaults(func=cmd_publish)
    sc = sub.add_parser("schema", help="write the JSON Schemas of the input events")
    sc.add_argument("--out", default="schemas/json")
    sc.set_defaults(func=cmd_schema)
    t = sub.add_parser("topics", help="create the service's topics (idempotent)")
    t.set_defaults(func=cmd_topics)
    pr = sub.add_parser("protocol", help="safety protocol tools")
    prs = pr.add_subparsers(dest="protocol_command", required=True)
    chk = prs.add_parser("check", help="validate and summarise a protocol file")
    chk.add_argument("file")
    chk.set_defaults(func=cmd_protocol_check)
    m = sub.add_parser("mllp", help="HL7 v2 MLLP listener publishing to Kafka")
    m.add_argument("rest", nargs=argparse.REMAINDER)
    m.set_defaults(func=cmd_mllp)
    ib = sub.add_parser("inbox", help="the nurse web inbox (serve | hash-password)")
    ib.add_argument("rest", nargs=argparse.REMAINDER)
    ib.set_defaults(func=cmd_inbox)
    si = sub.add_parser("simulate", help="generate (and publish) a synthetic post-dose cohort with ground truth")
    si.add_argument("rest", nargs=argparse.REMAINDER)
    si.set_defaults(func=cmd_simulate)
    return p


#: sub-commands with their own argument parsers
_DELEGATED = {"inbox": cmd_inbox, "simulate": cmd_simulate, "mllp": cmd_mllp}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in _DELEGATED:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
        return int(_DELEGATED[argv[0]](argparse.Namespace(rest=argv[1:])) or 0)
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    from .topics_admin import KafkaUnreachable

    try:
        return int(args.func(args) or 0)
    except KafkaUnreachable as exc:
        print(f"monitor: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
