"""``monitor protocol check``: a protocol file validated, compiled and summarised.

Apart from ``alerts.protocol`` because compiling needs ``alerts.rules``, which is built on the
protocol's models: the two would import each other otherwise."""
from __future__ import annotations

from pathlib import Path

from .protocol import ProtocolError, load_protocol, summarise
from .rules import compile_protocol


def check_protocol_file(path: str | Path) -> tuple[bool, str]:
    """Validate ``path``; return (ok, summary or the error list)."""
    try:
        p = load_protocol(path)
    except ProtocolError as exc:
        return False, f"{path}: invalid protocol\n" + "\n".join(f"  {m}" for m in exc.messages)
    try:
        compile_protocol(p)
    except Exception as exc:  # a compile failure is a protocol defect, report it
        return False, f"{path}: protocol does not compile: {exc}"
    return True, summarise(p)
