"""The nurse web inbox: an aiohttp app beside the worker (``monitor inbox``).

``main(argv) -> int`` is the command line; ``create_inbox_app(settings, ...)`` builds the app.
"""
from __future__ import annotations

from typing import Any

__all__ = ["main", "create_inbox_app"]


def main(argv: list[str] | None = None) -> int:
    from .app import main as _main

    return _main(argv)


async def create_inbox_app(settings: Any, **kwargs: Any):
    from .app import create_inbox_app as _create

    return await _create(settings, **kwargs)
