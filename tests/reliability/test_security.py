"""Kafka over TLS and SASL/SCRAM-SHA-512 against a real broker configured by the test.

A dedicated broker (``secured_broker``, reliability/conftest.py, shared with test_kafka_acls)
has an SSL listener (PEM keystore from a CA and server certificate made with the ``openssl``
CLI) and a SASL_PLAINTEXT listener with SCRAM-SHA-512 (the credential created through the
admin API on the PLAINTEXT listener; a super user of its enforcing authorizer). Workers, and
kafka-python / aiokafka clients built by ``monitor/kafka_config.py``, run over each:
events flow to ``observations``. A wrong password makes ``monitor topics`` exit non-zero
within 30 s with an authentication error (not a hang). Secrets never appear in logs.
"""
from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from kafka_broker import add_scram_users
from reliability.conftest import SECURITY_USER, make_topics
from reliability.harness import ROOT, build_scenario, find_identifiers, info_lines, record_figure, stop_all, worker_logs
from workers import WorkerProcess, service_env

pytestmark = pytest.mark.integration

USER, PASSWORD = SECURITY_USER, "alice-Secr3t-7c1d9"


@pytest.fixture(scope="module")
def secure_broker(secured_broker):
    """The secured broker (reliability/conftest.py: SSL and SASL_PLAINTEXT listeners) with
    this module's SCRAM credential."""
    add_scram_users(secured_broker["broker"].bootstrap, {USER: PASSWORD})
    time.sleep(1)  # credential propagation to the SASL listener
    return secured_broker


def sec_env(kind: str, sb: dict, password: str = PASSWORD) -> dict[str, str]:
    if kind == "SSL":
        return {"KAFKA_BOOTSTRAP_SERVERS": sb["ssl"], "KAFKA_SECURITY_PROTOCOL": "SSL", "KAFKA_SSL_CAFILE": sb["ca"]}
    return {"KAFKA_BOOTSTRAP_SERVERS": sb["sasl"], "KAFKA_SECURITY_PROTOCOL": "SASL_PLAINTEXT",
            "KAFKA_SASL_MECHANISM": "SCRAM-SHA-512", "KAFKA_SASL_USERNAME": USER, "KAFKA_SASL_PASSWORD": password}


def settings_for(env: dict[str, str]):
    from monitor.settings import Settings

    return Settings(**{k.lower(): v for k, v in env.items()})


def test_worker_and_clients_over_tls_and_sasl(secure_broker, tmp_path):
    from kafka import KafkaProducer

    from monitor.kafka_config import aiokafka_config, kafka_python_config

    sb = secure_broker
    sc = build_scenario(4, 5, days=20, invalid_every=100, id_prefix="SEC")
    recs = [r for r in sc.records if r.reason is None][:150]
    workers: list = []
    runs = {}
    try:
        for kind in ("SSL", "SASL"):
            env_sec = sec_env(kind, sb)
            prefix = f"sec{kind.lower()}{uuid.uuid4().hex[:6]}"
            topics = make_topics(sb["broker"].bootstrap, prefix)
            env = {**service_env(topics, app_id=prefix, TICK_INTERVAL_SECONDS="5"), **env_sec}
            w = WorkerProcess(env_sec["KAFKA_BOOTSTRAP_SERVERS"], env, tmp_path / kind)
            workers.append(w)
            w.launch()  # the two workers start at the same time
            runs[kind] = (topics, env_sec, w)
        for _topics, _env_sec, w in runs.values():
            w.wait_ready(120)
        for kind, (topics, env_sec, w) in runs.items():
            s = settings_for(env_sec)
            p = KafkaProducer(acks="all", **kafka_python_config(s))  # kafka-python through kafka_config
            for r in recs:
                p.send(topics[r.topic], key=r.key.encode(), value=r.raw)
            p.flush(30)
            p.close()
        want = {o for r in recs for o in r.observation_ids}
        for kind, (topics, env_sec, w) in runs.items():
            s = settings_for(env_sec)

            async def consume():  # aiokafka through kafka_config
                from aiokafka import AIOKafkaConsumer

                c = AIOKafkaConsumer(topics["observations"], auto_offset_reset="earliest", group_id=None,
                                     enable_auto_commit=False, **aiokafka_config(s))
                await c.start()
                got = set()
                try:
                    deadline = time.monotonic() + 90
                    while want - got and time.monotonic() < deadline:
                        batch = await c.getmany(timeout_ms=500)
                        for msgs in batch.values():  # (records with headers: routed treatments)
                            got.update(json.loads(m.value)["observation_id"] for m in msgs if not m.headers)
                finally:
                    await c.stop()
                return got

            got = asyncio.run(consume())
            assert want <= got, f"{kind}: {len(want - got)} observations missing\n{w.tail(20)}"
            print(f"{kind}: {len(got)} observations through the worker")
        logs = worker_logs(workers)
        assert PASSWORD not in logs, "the SASL password appears in a worker log"
        assert not find_identifiers(info_lines(logs), sc.patient_ids)
        record_figure("security", {"tls_observations": len(want), "sasl_observations": len(want)})
    finally:
        stop_all(workers)


def test_wrong_password_is_a_clear_error_not_a_hang(secure_broker):
    env = {**os.environ, **sec_env("SASL", secure_broker, password="not-the-password-42"),
           "MONITOR_APP_ID": "wrongpw",
           "KAFKA_CONNECT_TIMEOUT_SECONDS": "20"}  # gives up (with its message) before this test's 30 s
    t0 = time.monotonic()
    try:
        proc = subprocess.run([sys.executable, "-m", "monitor.cli", "topics"], cwd=ROOT, env=env,
                              capture_output=True, text=True, timeout=30)
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"`monitor topics` with a wrong password hung for more than 30 s: {exc.stderr!r}"[:2000])
    took = time.monotonic() - t0
    out = proc.stdout + proc.stderr
    print(f"wrong password: exit {proc.returncode} after {took:.1f}s")
    record_figure("wrong_password", {"exit": proc.returncode, "seconds": round(took, 1)})
    assert proc.returncode != 0, out[-2000:]
    assert "authenticat" in out.lower(), out[-2000:]
    assert "not-the-password-42" not in out
