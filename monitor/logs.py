"""Logging set-up shared by every ``monitor`` command: plain text, or JSON lines for log shippers.

``LOG_FORMAT=json`` writes one JSON object per line (``ts``, ``level``, ``logger``,
``message``, and ``exc_info`` when there is a traceback); anything else writes the
plain ``time level logger message`` lines. ``LOG_LEVEL`` (default INFO) sets the level
unless a command-line flag does.

An exception's text (its message, its notes, those of the exceptions it was raised from)
can carry what the code was handling: a patient identifier, an HL7 field, a date of birth.
A record at INFO or above that carries a traceback therefore keeps the traceback's frames
and each exception's type, and withholds the text (``withheld_traceback``), whatever
formatter prints it: this service's, faust's or the standard one. Only a process whose
root level is DEBUG, a log that may carry patient data by design, prints the text; the
Kafka clients' errors always keep theirs (``TEXT_KEPT_MODULES``).
"""
from __future__ import annotations

import json
import logging
import os
import sys
import traceback
from datetime import datetime, timezone
from typing import Any, Callable

PLAIN_FORMAT = "%(asctime)s %(levelname)s %(name)s %(message)s"
FORMATS = ("text", "json")


class JsonFormatter(logging.Formatter):
    """One JSON object per record; the message is formatted with its arguments first."""

    def format(self, record: logging.LogRecord) -> str:
        out = {
            "ts": datetime.fromtimestamp(record.created, timezone.utc).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        if record.exc_text:
            out["exc_info"] = record.exc_text
        if record.stack_info:
            out["stack_info"] = self.formatStack(record.stack_info)
        return json.dumps(out, ensure_ascii=False, default=str)


WITHHELD = "[text withheld: it may carry patient data; LOG_LEVEL=DEBUG prints it]"

#: modules whose exceptions keep their text: the Kafka clients' protocol and connection
#: errors name brokers, topics, partitions and error codes, never a record's content, and
#: operations need them ("Group Coordinator Request failed: GroupCoordinatorNotAvailableError")
TEXT_KEPT_MODULES = ("aiokafka.errors", "kafka.errors")


def _text_kept(exc: BaseException) -> bool:
    return type(exc).__module__ in TEXT_KEPT_MODULES


class WithheldException:
    """An exception passed as a log argument: printed as its type only."""

    __slots__ = ("name",)

    def __init__(self, exc: BaseException) -> None:
        self.name = type(exc).__qualname__

    def __repr__(self) -> str:
        return f"{self.name}({WITHHELD})"

    __str__ = __repr__


CAUSE = "\nThe above exception was the direct cause of the following exception:\n\n"
CONTEXT = "\nDuring handling of the above exception, another exception occurred:\n\n"


def withheld_traceback(exc: BaseException) -> str:
    """``exc``'s traceback as Python prints it, chained exceptions included, with each
    exception's type and frames but never its text or notes (``WITHHELD`` instead; the
    Kafka clients' errors, ``TEXT_KEPT_MODULES``, as Python prints them)."""
    chain: list[tuple[BaseException, str]] = []  # the newest first, each with how it led to the one before it
    seen: set[int] = set()
    link = ""
    e: BaseException | None = exc
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        chain.append((e, link))
        if e.__cause__ is not None:
            e, link = e.__cause__, CAUSE
        elif e.__context__ is not None and not e.__suppress_context__:
            e, link = e.__context__, CONTEXT
        else:
            e = None
    parts: list[str] = []
    for i in range(len(chain) - 1, -1, -1):  # the oldest first, as Python prints them
        e = chain[i][0]
        if e.__traceback__ is not None:
            parts.append("Traceback (most recent call last):\n")
            parts.extend(traceback.format_tb(e.__traceback__))
        if _text_kept(e):
            parts.extend(traceback.format_exception_only(e))
        else:
            kind = type(e)
            name = (kind.__qualname__ if kind.__module__ in ("builtins", "__main__")
                    else f"{kind.__module__}.{kind.__qualname__}")
            parts.append(f"{name}: {WITHHELD}\n")
        parts.append(chain[i][1])  # how it led to the next one (nothing after the newest)
    return "".join(parts).rstrip("\n")


def _withholding_factory(make: Callable[..., logging.LogRecord]) -> Callable[..., logging.LogRecord]:
    def record(*args: Any, **kwargs: Any) -> logging.LogRecord:
        rec = make(*args, **kwargs)
        if rec.levelno < logging.INFO or logging.getLogger().getEffectiveLevel() <= logging.DEBUG:
            return rec
        if rec.exc_info and rec.exc_info[1] is not None:
            rec.exc_text = withheld_traceback(rec.exc_info[1])
        if isinstance(rec.args, tuple) and any(isinstance(a, BaseException) and not _text_kept(a) for a in rec.args):
            # faust's and mode's own "Crashed reason=%r", "Error: %r"
            rec.args = tuple(WithheldException(a) if isinstance(a, BaseException) and not _text_kept(a) else a
                             for a in rec.args)
        if rec.name == "asyncio" and isinstance(rec.msg, str) and "\n" in rec.msg:
            # the loop's default handler: its first line is asyncio's own ("Task exception was
            # never retrieved"); the lines after it are reprs of the task, future or handle,
            # with the exception's text and the callback's arguments
            rec.msg = rec.msg.split("\n", 1)[0] + " (the task's details: " + WITHHELD + ")"
        return rec

    record.withholds_exception_text = True  # type: ignore[attr-defined]
    return record


def withhold_exception_text() -> None:
    """Install the record factory that withholds exception text at INFO and above (idempotent)."""
    current = logging.getLogRecordFactory()
    if not getattr(current, "withholds_exception_text", False):
        logging.setLogRecordFactory(_withholding_factory(current))


def log_format() -> str:
    fmt = os.environ.get("LOG_FORMAT", "text").strip().lower() or "text"
    if fmt not in FORMATS:
        raise ValueError(f"LOG_FORMAT={fmt!r} is not one of {', '.join(FORMATS)}")
    return fmt


def make_formatter(fmt: str | None = None) -> logging.Formatter:
    return JsonFormatter() if (fmt or log_format()) == "json" else logging.Formatter(PLAIN_FORMAT)


class QuietLibraries(logging.Filter):
    """Drop the Kafka clients' own connection chatter below CRITICAL (one-shot tools report errors themselves).

    A handler filter, not a logger level: ``topics_admin`` watches the ``kafka`` logger
    for authentication failures and must still receive those records.
    """

    PREFIXES = ("kafka", "aiokafka")

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.CRITICAL or not record.name.startswith(self.PREFIXES)


def configure_logging(level: str | int | None = None, fmt: str | None = None, *, tool: bool = False) -> None:
    """Replace the root handlers with one stderr handler in the chosen format.

    ``tool=True`` (one-shot commands such as ``publish`` or ``dlq``) hides the Kafka
    clients' retry logs unless the level is DEBUG.
    """
    level = level or os.environ.get("LOG_LEVEL", "INFO")
    if isinstance(level, str):
        level = level.upper()
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(make_formatter(fmt))
    if tool and level not in ("DEBUG", logging.DEBUG):
        handler.addFilter(QuietLibraries())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    withhold_exception_text()


#: client libraries that log per message at DEBUG
CLIENT_LOGGERS = ("aiokafka", "kafka", "faust.transport", "mode")


def quiet_client_loggers() -> None:
    """Hold the client libraries' loggers at INFO or above, whatever the root level: they
    log per message at DEBUG, which must never reach a production worker's log."""
    level = max(logging.INFO, logging.getLogger().getEffectiveLevel())
    for name in CLIENT_LOGGERS:
        logging.getLogger(name).setLevel(level)


def faust_logging_config(level: str | int, fmt: str | None = None) -> dict | None:
    """A ``logging.config.dictConfig`` for faust's worker in JSON mode (None keeps faust's own coloured text)."""
    if (fmt or log_format()) != "json":
        return None
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {"json": {"()": "monitor.logs.JsonFormatter"}},
        "handlers": {"default": {"class": "logging.StreamHandler", "formatter": "json", "stream": "ext://sys.stderr"}},
        "root": {"level": level.upper() if isinstance(level, str) else level, "handlers": ["default"]},
    }
