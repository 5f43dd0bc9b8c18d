"""Logging set-up shared by every ``monitor`` command: plain text, or JSON lines for log shippers.

``LOG_FORMAT=json`` writes one JSON object per line (``ts``, ``level``, ``logger``,
``message``, and ``exc_info`` when there is a traceback); anything else writes the
plain ``time level logger message`` lines. ``LOG_LEVEL`` (default INFO) sets the level
unless a command-line flag does.
"""
from __future__ import annotations

import json
import logging
import os
import sys
from datetime import datetime, timezone

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
        if record.exc_info:
            out["exc_info"] = self.formatException(record.exc_info)
        if record.stack_info:
            out["stack_info"] = self.formatStack(record.stack_info)
        return json.dumps(out, ensure_ascii=False, default=str)


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
