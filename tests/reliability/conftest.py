"""Fixtures of the reliability suite (the session broker comes from tests/conftest.py)."""
from __future__ import annotations

import subprocess
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


# -- one dedicated broker with TLS, SASL/SCRAM and an enforcing authorizer -----------------

#: the SCRAM user of test_security (a super user of the secured broker: its worker and clients
#: need every topic and group); the identities test_kafka_acls checks are not super users
SECURITY_USER = "alice"


def make_certs(d: Path) -> dict[str, str]:
    """A CA and a server certificate for 127.0.0.1 (``openssl`` CLI); the PEM keystore."""
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


@pytest.fixture(scope="session")
def secured_broker(tmp_path_factory):
    """A dedicated broker (not the session's plain one) shared by test_kafka_acls and
    test_security, started once: an SSL listener (PEM keystore from ``make_certs``; its
    clients are ``User:ANONYMOUS``, a super user), a SASL_PLAINTEXT listener with
    SCRAM-SHA-512, and the StandardAuthorizer with no access without an ACL
    (``kafka_broker.scram_acl_broker``). ``SECURITY_USER`` is a super user. Each module adds
    its own SCRAM credentials, topics and ACLs."""
    from kafka_broker import free_ports, scram_acl_broker

    d = tmp_path_factory.mktemp("tls")
    certs = make_certs(d)
    ssl_port, sasl_port = free_ports(2)
    broker = scram_acl_broker(sasl_port, super_users=[SECURITY_USER], ssl_port=ssl_port,
                              ssl_keystore=certs["keystore"], start_timeout=90)
    try:
        broker.start()
        yield {"broker": broker, "ssl": f"127.0.0.1:{ssl_port}", "sasl": f"127.0.0.1:{sasl_port}", **certs}
    finally:
        broker.stop()
