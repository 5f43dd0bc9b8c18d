"""Kafka client options (bootstrap, TLS, SASL) shared by faust, aiokafka and kafka-python."""
from __future__ import annotations

import ssl
from typing import Any

from .settings import Settings


def ssl_context(s: Settings) -> ssl.SSLContext | None:
    if s.kafka_security_protocol not in ("SSL", "SASL_SSL"):
        return None
    ctx = ssl.create_default_context(cafile=s.kafka_ssl_cafile)
    if s.kafka_ssl_certfile:
        ctx.load_cert_chain(s.kafka_ssl_certfile, s.kafka_ssl_keyfile)
    return ctx


def kafka_python_config(s: Settings, connect_timeout: float | None = None) -> dict[str, Any]:
    """Keyword arguments for kafka-python clients (producer, consumer, admin); the first
    connection is given up after ``connect_timeout`` seconds (default
    ``KAFKA_CONNECT_TIMEOUT_SECONDS``)."""
    cfg: dict[str, Any] = {
        "bootstrap_servers": s.kafka_bootstrap_servers.split(","),
        "security_protocol": s.kafka_security_protocol,
        "bootstrap_timeout_ms": int((connect_timeout or s.kafka_connect_timeout_seconds) * 1000),
    }
    if s.kafka_security_protocol in ("SSL", "SASL_SSL"):
        cfg.update(ssl_cafile=s.kafka_ssl_cafile, ssl_certfile=s.kafka_ssl_certfile, ssl_keyfile=s.kafka_ssl_keyfile)
    if s.kafka_security_protocol.startswith("SASL"):
        cfg.update(
            sasl_mechanism=s.kafka_sasl_mechanism or "PLAIN",
            sasl_plain_username=s.kafka_sasl_username,
            sasl_plain_password=s.kafka_sasl_password,
        )
    return cfg


def aiokafka_config(s: Settings) -> dict[str, Any]:
    cfg: dict[str, Any] = {
        "bootstrap_servers": s.kafka_bootstrap_servers,
        "security_protocol": s.kafka_security_protocol,
    }
    ctx = ssl_context(s)
    if ctx is not None:
        cfg["ssl_context"] = ctx
    if s.kafka_security_protocol.startswith("SASL"):
        cfg.update(
            sasl_mechanism=s.kafka_sasl_mechanism or "PLAIN",
            sasl_plain_username=s.kafka_sasl_username,
            sasl_plain_password=s.kafka_sasl_password,
        )
    return cfg


def faust_credentials(s: Settings) -> Any:
    """faust ``broker_credentials`` for the configured security protocol (None for PLAINTEXT)."""
    import faust

    ctx = ssl_context(s)
    if s.kafka_security_protocol.startswith("SASL"):
        return faust.SASLCredentials(
            username=s.kafka_sasl_username,
            password=s.kafka_sasl_password,
            mechanism=s.kafka_sasl_mechanism or "PLAIN",
            ssl_context=ctx,
        )
    if ctx is not None:
        return faust.SSLCredentials(ctx)
    return None


def broker_url(s: Settings) -> str:
    return ";".join(f"kafka://{h}" for h in s.kafka_bootstrap_servers.split(","))
