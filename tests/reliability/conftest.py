"""Fixtures of the reliability suite (the session broker comes from tests/conftest.py)."""
from __future__ import annotations

import sys
import uuid
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from reliability.harness import ALL_TOPICS, stop_all  # noqa: E402


@pytest.fixture
def workers():
    """A list to register every WorkerProcess in; all are stopped (or killed) after the test."""
    started: list = []
    yield started
    stop_all(started)


def make_topics(bootstrap: str, prefix: str | None = None, partitions: int = 3) -> dict[str, str]:
    from kafka_broker import create_topics

    prefix = prefix or f"rel{uuid.uuid4().hex[:8]}"
    topics = {n: f"{prefix}.{n}" for n in ALL_TOPICS}
    create_topics(bootstrap, list(topics.values()), partitions=partitions)
    return topics


def drop_topics(bootstrap: str, topics: dict[str, str]) -> None:
    from kafka_broker import drop_test_topics

    drop_test_topics(bootstrap, topics.values(), [next(iter(topics.values())).split(".")[0]])
