"""Shared fixtures: a real Apache Kafka broker for the session, per-test topics, workers."""
from __future__ import annotations

import sys
import uuid
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

# the Prometheus scrape tests' stack: started before the first test, its tests run last (under
# pytest-xdist: started by, and first on, the worker that is sent its module)
from prometheus_stack import FIXTURE as PROMETHEUS_FIXTURE  # noqa: E402
from prometheus_stack import prometheus_stack, prometheus_stack_started_first  # noqa: E402,F401
from prometheus_stack import xdist_worker  # noqa: E402


def pytest_collection_modifyitems(config, items):
    """The tests on the Prometheus stack last (in their order): the shipped rules they check
    need a minute of ``for:``, which passes while the rest of the suite runs
    (``tests/prometheus_stack.py``). Under pytest-xdist (``make test`` runs two workers, each
    sent whole modules: ``--dist loadfile``) their module comes first instead: the worker that
    gets it starts the stack and waits out the minute while the other worker runs the rest."""
    on_stack_first = bool(xdist_worker())
    items.sort(key=lambda item: (PROMETHEUS_FIXTURE in item.fixturenames) != on_stack_first)


@pytest.fixture(scope="session")
def kafka_broker():
    from kafka_broker import ensure_broker

    broker = ensure_broker()
    try:
        yield broker
    finally:
        broker.stop()


@pytest.fixture(scope="session")
def kafka_bootstrap(kafka_broker) -> str:
    return kafka_broker.bootstrap


@pytest.fixture
def topic_factory(kafka_bootstrap):
    """Create uniquely named topics; delete them (and any topic with the same prefix) after."""
    from kafka_broker import create_topics, drop_test_topics

    created: list[str] = []
    prefixes: list[str] = []

    def make(*names: str, partitions: int = 3, prefix: str | None = None,
             configs: dict[str, str] | None = None) -> dict[str, str]:
        """``configs``: topic configs for every topic made (e.g. ``{"retention.ms": "-1"}``
        for records whose timestamps lie further back than the broker's default retention)."""
        prefix = prefix or f"t{uuid.uuid4().hex[:10]}"
        prefixes.append(prefix)
        full = {n: f"{prefix}.{n}" for n in names}
        create_topics(kafka_bootstrap, list(full.values()), partitions=partitions, configs=configs)
        created.extend(full.values())
        return full

    yield make
    drop_test_topics(kafka_bootstrap, created, prefixes)


@pytest.fixture
def worker_factory(kafka_bootstrap, tmp_path):
    """Start ``monitor worker`` processes on isolated topics; stop them all after the test
    (in parallel; ``workers.stop_workers``)."""
    from workers import WorkerProcess, stop_workers

    started: list[WorkerProcess] = []

    def make(env: dict[str, str], name: str = "w", wait: bool = True) -> WorkerProcess:
        """A started worker, ready; with ``wait=False`` only launched (the test calls
        ``wait_ready`` before it relies on it, doing something else meanwhile)."""
        wp = WorkerProcess(kafka_bootstrap, env, tmp_path / name)
        started.append(wp)
        if wait:
            wp.start()
        else:
            wp.launch()
        return wp

    yield make
    stop_workers(started)
