"""The command line: every option of every sub-command has help with its default, --version,
one-line errors for user mistakes, JSON log format, and a wheel that builds with the declared
build requirements."""
from __future__ import annotations

import argparse
import io
import json
import logging
import logging.config
import os
import shutil
import subprocess
import sys
import time
import zipfile
from importlib import metadata
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SKIP = (argparse._HelpAction, argparse._VersionAction, argparse._SubParsersAction)


class _Captured(Exception):
    def __init__(self, parser: argparse.ArgumentParser) -> None:
        self.parser = parser


def captured_parser(main, monkeypatch) -> argparse.ArgumentParser:
    """The parser a delegated ``main(argv)`` builds (its ``parse_args`` is intercepted before it runs)."""
    def grab(self, *a, **k):
        raise _Captured(self)

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", grab)
    with pytest.raises(_Captured) as info:
        main(["--help"])
    monkeypatch.undo()
    return info.value.parser


def walk(parser: argparse.ArgumentParser, path: str):
    """(command path, action) for every action of ``parser`` and its sub-parsers."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from walk(sub, f"{path} {name}")
        elif not isinstance(action, SKIP):
            yield path, action


def undocumented(parser: argparse.ArgumentParser, path: str) -> list[str]:
    """Options without help, or whose help does not state a default; positionals without help."""
    bad = []
    for where, action in walk(parser, path):
        name = "/".join(action.option_strings) or action.dest
        text = action.help or ""
        if not text.strip() or text == argparse.SUPPRESS:
            bad.append(f"{where} {name}: no help")
        elif action.option_strings and "default" not in text.lower():
            bad.append(f"{where} {name}: help does not state the default")
    return bad


def test_every_option_of_the_main_parser_has_help():
    from monitor.cli import build_parser

    parser = build_parser()
    assert undocumented(parser, "monitor") == []
    # the introspection sees the sub-commands (so an empty result above means something)
    paths = {where for where, _ in walk(parser, "monitor")}
    assert {"monitor worker", "monitor dlq list", "monitor dlq replay", "monitor dlq show",
            "monitor config docs", "monitor schema", "monitor publish"} <= paths


def test_the_check_finds_an_option_without_help():
    p = argparse.ArgumentParser()
    p.add_argument("--quiet", action="store_true")
    p.add_argument("--n", default=3, help="how many")
    assert undocumented(p, "x") == ["x --quiet: no help", "x --n: help does not state the default"]


def test_simulate_options_have_help(monkeypatch):
    from monitor.simulate import main

    assert undocumented(captured_parser(main, monkeypatch), "monitor simulate") == []


@pytest.mark.parametrize("module", ["monitor.mllp", "monitor.inbox"])
def test_delegated_listener_options_have_help(module, monkeypatch):
    import importlib

    main = importlib.import_module(module).main
    assert undocumented(captured_parser(main, monkeypatch), f"monitor {module.split('.')[-1]}") == []


def run(*args: str, env: dict | None = None, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "monitor.cli", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, **(env or {})})


def test_version():
    r = run("--version")
    assert r.returncode == 0
    assert r.stdout.strip() == f"monitor {metadata.version('sma-gene-therapy-monitor')}"


@pytest.mark.parametrize("cmd", ["worker", "publish", "schema", "topics", "protocol check", "dlq list",
                                 "dlq show", "dlq replay", "config docs", "config show"])
def test_help_runs(cmd):
    r = run(*cmd.split(), "--help")
    assert r.returncode == 0 and r.stdout.startswith(f"usage: monitor {cmd}")


def test_missing_file_is_one_line(tmp_path):
    missing = tmp_path / "nope.jsonl"
    r = run("publish", str(missing), env={"KAFKA_BOOTSTRAP_SERVERS": "127.0.0.1:1"})
    assert r.returncode == 2
    assert "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines() == [f"monitor: {missing}: no such file"]


def test_unreachable_broker_is_one_line(tmp_path):
    f = tmp_path / "events.jsonl"
    f.write_text('{"event_id": "e", "patient_id": "p", "loinc": "1742-6", "value": 1, "unit": "U/L"}\n')
    t0 = time.monotonic()
    r = run("publish", str(f), env={"KAFKA_BOOTSTRAP_SERVERS": "127.0.0.1:1", "KAFKA_CONNECT_TIMEOUT_SECONDS": "1"},
            timeout=120)
    took = time.monotonic() - t0
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert took < 25, f"KAFKA_CONNECT_TIMEOUT_SECONDS=1 was not honoured: gave up after {took:.0f} s"
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("monitor: cannot reach Kafka at 127.0.0.1:1"), r.stderr


def test_bad_input_line_and_bad_configuration_are_one_line(tmp_path):
    f = tmp_path / "events.jsonl"
    f.write_text("{not json\n")
    r = run("dlq", "list", "--since", "yesterday")
    assert r.returncode == 2 and r.stderr.startswith("monitor: cannot read time 'yesterday'")
    r = run("config", "show", env={"TOPIC_PARTITIONS": "many"})
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.startswith("monitor: invalid configuration: TOPIC_PARTITIONS")
    r = run("config", "docs", env={"LOG_FORMAT": "xml"})
    assert r.returncode == 2 and r.stderr.strip() == "monitor: LOG_FORMAT='xml' is not one of text, json"


def test_json_log_format():
    from monitor.logs import JsonFormatter, configure_logging, faust_logging_config

    record = logging.LogRecord("monitor.x", logging.WARNING, __file__, 1, "lag %d on %s", (5, "obs"), None)
    out = json.loads(JsonFormatter().format(record))
    assert out["level"] == "WARNING" and out["logger"] == "monitor.x" and out["message"] == "lag 5 on obs"
    assert out["ts"].endswith("+00:00")

    root = logging.getLogger()
    saved = root.handlers[:], root.level
    try:
        configure_logging("INFO", "json")
        stream = io.StringIO()
        root.handlers[0].stream = stream
        logging.getLogger("monitor.y").info("hello %s", "world")
        assert json.loads(stream.getvalue())["message"] == "hello world"
        # faust's worker gets a dictConfig with the same formatter, and none in text mode
        logging.config.dictConfig(faust_logging_config("INFO", "json"))
        assert isinstance(root.handlers[0].formatter, JsonFormatter)
        assert faust_logging_config("INFO", "text") is None
    finally:
        root.handlers[:], _ = saved
        root.setLevel(saved[1])


def test_json_log_format_end_to_end():
    env = {"LOG_FORMAT": "json", "LOG_LEVEL": "INFO"}
    code = "import logging, sys; from monitor.cli import main; from monitor.logs import configure_logging; " \
           "configure_logging(); logging.getLogger('monitor.t').warning('x=%s', 1)"
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60,
                       env={**os.environ, **env})
    assert json.loads(r.stderr.strip())["message"] == "x=1"


def test_licence_file_matches_pyproject():
    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert project["project"]["license"] == "Apache-2.0"
    text = (ROOT / "LICENSE").read_text()
    assert "Apache License" in text and "Version 2.0, January 2004" in text
    assert "END OF TERMS AND CONDITIONS" in text and "APPENDIX: How to apply the Apache License" in text
    # PEP 639 licence expressions need setuptools >= 77
    assert any(r.replace(" ", "").startswith("setuptools>=") and
               tuple(int(x) for x in r.split(">=")[1].split(".")[:1]) >= (77,)
               for r in project["build-system"]["requires"])
    assert (ROOT / "CHANGELOG.md").read_text().startswith("# Changelog")


@pytest.mark.slow
def test_clean_copy_builds_a_wheel_with_declared_build_requirements(tmp_path):
    """pip wheel with build isolation: the declared build requirements are installed fresh."""
    src = tmp_path / "src"
    ignore = shutil.ignore_patterns(".venv", ".git", "build", "dist", "*.egg-info", ".kafka", "__pycache__",
                                    ".pytest_cache", ".hypothesis", ".demo", "node_modules", "sim-out", "artifacts")
    shutil.copytree(ROOT, src, ignore=ignore)
    out = tmp_path / "wheels"
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--disable-pip-version-check", "-q",
                        "-w", str(out), str(src)], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    wheels = list(out.glob("sma_gene_therapy_monitor-*.whl"))
    assert len(wheels) == 1
    with zipfile.ZipFile(wheels[0]) as z:
        names = z.namelist()
        meta = z.read(next(n for n in names if n.endswith(".dist-info/METADATA"))).decode()
    assert "License-Expression: Apache-2.0" in meta
    assert any(n.endswith(".dist-info/licenses/LICENSE") for n in names)
    assert "schemas/json/alert.json" in names and "schemas/asyncapi.yaml" in names
    assert "monitor/dlq_tool.py" in names and "alerts/protocols/onasemnogene-abeparvovec-iv.yaml" in names


def test_delegated_log_level_is_honoured(monkeypatch):
    """`monitor mllp --log-level WARNING` used to leave the root logger at INFO (configured before delegating)."""
    import monitor.mllp
    from monitor.cli import main

    seen = {}

    def fake_main(argv):
        logging.basicConfig(level=logging.DEBUG)  # what the listener does: a no-op once handlers exist
        seen["level"] = logging.getLogger().level
        seen["argv"] = argv
        return 0

    monkeypatch.setattr(monitor.mllp, "main", fake_main)
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    try:
        assert main(["mllp", "--log-level", "WARNING", "--port", "0"]) == 0
    finally:
        root.handlers[:], _ = saved
        root.setLevel(saved[1])
    assert seen == {"level": logging.WARNING, "argv": ["--log-level", "WARNING", "--port", "0"]}
