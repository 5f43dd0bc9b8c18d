"""Kafka over TLS and SASL/SCRAM-SHA-512 against a real broker configured by the test.

A dedicated broker gets an SSL listener (PEM keystore from a CA and server certificate
made with the ``openssl`` CLI) and a SASL_PLAINTEXT listener with SCRAM-SHA-512 (the
credential created through the admin API on the PLAINTEXT listener). Workers, and
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

from kafka_broker import Broker, free_ports
from reliability.conftest import make_topics
from reliability.harness import ROOT, build_scenario, find_identifiers, info_lines, record_figure, stop_all, worker_logs
from workers import WorkerProcess, service_env

pytestmark = pytest.mark.integration

USER, PASSWORD = "alice", "alice-Secr3t-7c1d9"


def make_certs(d: Path) -> dict[str, str]:
    def run(*args):
        subprocess.run(["openssl", *args], cwd=d, check=True, capture_output=True, timeout=60)

    run("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.pem", "-days", "2",
        "-subj", "/CN=reliability-test-ca")
    run("req", "-newkey", "rsa:2048", "-nodes", "-keyout", "server.key", "-out", "server.csr", "-subj", "/CN=127.0.0.1")
    (d / "san.ext").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    run("x509", "-req", "-in", "server.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
        "-out", "server.pem", "-days", "2", "-extfile", "san.ext")
    run("pkcs8", "-topk8", "-nocrypt", "-in", "server.key", "-out", "server.pk8")
    (d / "keystore.pem").write_text((d / "server.pk8").read_text() + (d / "server.pem").read_text())
    return {"ca": str(d / "ca.pem"), "keystore": str(d / "keystore.pem")}


@pytest.fixture(scope="module")
def secure_broker(tmp_path_factory):
    d = tmp_path_factory.mktemp("tls")
    certs = make_certs(d)
    ssl_port, sasl_port = free_ports(2)
    props = {
        "listener.name.ssl.ssl.keystore.type": "PEM",
        "listener.name.ssl.ssl.keystore.location": certs["keystore"],
        "sasl.enabled.mechanisms": "SCRAM-SHA-512",
        "listener.name.sasl_plaintext.sasl.enabled.mechanisms": "SCRAM-SHA-512",
        "listener.name.sasl_plaintext.scram-sha-512.sasl.jaas.config":
            "org.apache.kafka.common.security.scram.ScramLoginModule required;",
    }
    broker = Broker(extra_properties=props, start_timeout=90,
                    extra_listeners=[f"SSL://127.0.0.1:{ssl_port}", f"SASL_PLAINTEXT://127.0.0.1:{sasl_port}"])
    try:
        broker.start()
        from kafka.admin import KafkaAdminClient, ScramMechanism, UserScramCredentialUpsertion

        admin = KafkaAdminClient(bootstrap_servers=broker.bootstrap)
        try:
            res = admin.alter_user_scram_credentials(
                [UserScramCredentialUpsertion(USER, ScramMechanism.SCRAM_SHA_512, PASSWORD)])
            assert not any(res.values()), res
        finally:
            admin.close()
        time.sleep(1)  # credential propagation to the SASL listener
        yield {"broker": broker, "ssl": f"127.0.0.1:{ssl_port}", "sasl": f"127.0.0.1:{sasl_port}", **certs}
    finally:
        broker.stop()


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
