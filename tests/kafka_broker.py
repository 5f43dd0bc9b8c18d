"""A real Apache Kafka broker for the test suite (no pytest fixtures here).

``ensure_broker()`` either reuses the cluster named by ``KAFKA_BOOTSTRAP_SERVERS``
(nothing is started or stopped) or starts a dedicated single-node KRaft broker
through ``deploy/local/kafka.sh`` on a free port pair (never 9092/9093, so it
does not collide with a developer's ``make kafka`` broker), with its own
temporary data dir and pid file. ``Broker.stop()`` stops it and removes the
temporary dir.

Safety nets so a test run leaves no broker behind: ``stop()`` is registered with
``atexit``, and kafka.sh runs a watchdog (``KAFKA_OWNER_PID``) that stops the
broker when this Python process dies, even by SIGKILL.

``create_topics`` / ``delete_topics`` use kafka-python 3.x's ``KafkaAdminClient``
and return only once the change is visible in metadata.
"""

from __future__ import annotations

import atexit
import functools
import logging
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Iterable, Mapping

REPO_ROOT = Path(__file__).resolve().parent.parent
KAFKA_SH = REPO_ROOT / "deploy" / "local" / "kafka.sh"
LOOPBACK = "127.0.0.1"
_RESERVED_PORTS = frozenset({9092, 9093})  # the dev broker's defaults

log = logging.getLogger(__name__)


class BrokerError(RuntimeError):
    """The test broker could not be started or stopped."""


def free_port(exclude: Iterable[int] = ()) -> int:
    """A TCP port on 127.0.0.1 that is free right now (not 9092/9093, not in ``exclude``)."""
    return free_ports(1, exclude=exclude)[0]


def free_ports(count: int, exclude: Iterable[int] = ()) -> list[int]:
    """``count`` distinct free loopback ports, never 9092/9093."""
    avoid = set(_RESERVED_PORTS) | set(exclude)
    held: list[socket.socket] = []
    ports: list[int] = []
    try:
        while len(ports) < count:
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind((LOOPBACK, 0))
            held.append(s)  # keep bound so the next pick cannot return it again
            port = s.getsockname()[1]
            if port not in avoid:
                ports.append(port)
                avoid.add(port)
    finally:
        for s in held:
            s.close()
    return ports


def _port_open(port: int, host: str = LOOPBACK) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class Broker:
    """One Kafka broker for tests.

    ``Broker()`` describes a dedicated broker that ``start()`` launches (via
    deploy/local/kafka.sh) on free ports with a temporary data dir;
    ``Broker.external("host:port")`` wraps an existing cluster, for which
    ``start()`` and ``stop()`` do nothing.

    ``extra_properties`` (mapping or properties text) is appended to
    server.properties (later keys win); ``extra_listeners`` (e.g.
    ``"SSL://127.0.0.1:19094"``) is added to ``listeners`` and
    ``advertised.listeners`` next to the PLAINTEXT one, which always stays (the
    readiness check and the admin helpers use it). For TLS/SASL tests pick the
    extra port with ``free_port()``.
    """

    def __init__(
        self,
        port: int | None = None,
        controller_port: int | None = None,
        *,
        extra_properties: Mapping[str, object] | str | None = None,
        extra_listeners: str | Iterable[str] | None = None,
        start_timeout: float = 60.0,
        bootstrap: str | None = None,
    ) -> None:
        self.owned = bootstrap is None
        self.port = port
        self.controller_port = controller_port
        self.extra_properties = extra_properties
        if extra_listeners is not None and not isinstance(extra_listeners, str):
            extra_listeners = ",".join(extra_listeners)
        self.extra_listeners = extra_listeners or None
        self.start_timeout = start_timeout
        self.bootstrap: str = bootstrap or ""
        self.tmp_dir: Path | None = None
        self.pid: int | None = None
        self._started = False

    @classmethod
    def external(cls, bootstrap: str) -> "Broker":
        """An already running cluster; start()/stop() are no-ops."""
        return cls(bootstrap=bootstrap)

    # -- paths (dedicated broker only)
    @property
    def data_dir(self) -> Path | None:
        return self.tmp_dir / "data" if self.tmp_dir else None

    @property
    def pid_file(self) -> Path | None:
        return self.tmp_dir / "kafka.pid" if self.tmp_dir else None

    @property
    def log_file(self) -> Path | None:
        return self.tmp_dir / "broker.log" if self.tmp_dir else None

    def log_tail(self, lines: int = 60) -> str:
        if not self.log_file or not self.log_file.exists():
            return ""
        return "\n".join(self.log_file.read_text(errors="replace").splitlines()[-lines:])

    @property
    def running(self) -> bool:
        return self.pid is not None and _pid_alive(self.pid)

    # -- lifecycle
    def _env(self) -> dict[str, str]:
        assert self.tmp_dir is not None
        env = dict(os.environ)
        for key in ("KAFKA_EXTRA_PROPERTIES_FILE", "KAFKA_EXTRA_LISTENERS", "KAFKA_LOG_FILE"):
            env.pop(key, None)
        env.update(
            KAFKA_PORT=str(self.port),
            KAFKA_CONTROLLER_PORT=str(self.controller_port),
            KAFKA_DATA_DIR=str(self.data_dir),
            KAFKA_PID_FILE=str(self.pid_file),
            KAFKA_START_TIMEOUT=str(int(self.start_timeout)),
            KAFKA_OWNER_PID=str(os.getpid()),
            PYTHON=sys.executable,
        )
        if self.extra_properties:
            props = self.extra_properties
            if not isinstance(props, str):
                props = "\n".join(f"{k}={v}" for k, v in props.items())
            path = self.tmp_dir / "extra.properties"
            path.write_text(props + "\n")
            env["KAFKA_EXTRA_PROPERTIES_FILE"] = str(path)
        if self.extra_listeners:
            env["KAFKA_EXTRA_LISTENERS"] = self.extra_listeners
        return env

    def _kafka_sh(self, command: str, timeout: float) -> subprocess.CompletedProcess:
        return subprocess.run(
            ["bash", str(KAFKA_SH), command],
            env=self._env(),
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )

    def start(self) -> "Broker":
        """Start the dedicated broker and return once it answers metadata."""
        if not self.owned or self._started:
            return self
        choose_ports = self.port is None or self.controller_port is None
        attempts = 3 if choose_ports else 1
        atexit.register(self.stop)
        last_error = ""
        for _ in range(attempts):
            if choose_ports:
                self.port, self.controller_port = free_ports(2)
            self.tmp_dir = Path(tempfile.mkdtemp(prefix="sma-kafka-test-"))
            try:
                proc = self._kafka_sh("start", timeout=self.start_timeout + 60)
            except subprocess.TimeoutExpired as exc:
                proc = subprocess.CompletedProcess(exc.cmd, 124, "", f"kafka.sh start timed out: {exc}")
            pid = self._read_pid()
            if proc.returncode == 0 and pid is not None and _pid_alive(pid):
                self.pid = pid
                self.bootstrap = f"{LOOPBACK}:{self.port}"
                self._started = True
                ready = [line for line in proc.stderr.splitlines() if " ready on " in line]
                log.info("%s", ready[-1] if ready else f"test broker ready on {self.bootstrap}")
                return self
            # Failed (often a port taken between picking and binding): clean up and retry.
            last_error = (
                f"kafka.sh start exited {proc.returncode} (pid file: {pid}):\n{proc.stderr}\n"
                f"--- broker log tail ---\n{self.log_tail()}"
            )
            self._stop_and_clean()
        raise BrokerError(f"could not start a test Kafka broker:\n{last_error}")

    def _read_pid(self) -> int | None:
        try:
            return int(self.pid_file.read_text().strip()) if self.pid_file else None
        except (OSError, ValueError):
            return None

    def _stop_and_clean(self) -> None:
        error = None
        if self.tmp_dir is not None:
            pid = self._read_pid() or self.pid
            try:
                proc = self._kafka_sh("stop", timeout=60)
                if proc.returncode != 0:
                    error = f"kafka.sh stop exited {proc.returncode}: {proc.stderr}"
            except subprocess.TimeoutExpired as exc:
                error = f"kafka.sh stop timed out: {exc}"
            if pid is not None and _pid_alive(pid):  # last resort
                try:
                    os.kill(pid, 9)
                except ProcessLookupError:
                    pass
            shutil.rmtree(self.tmp_dir, ignore_errors=True)
            self.tmp_dir = None
        self.pid = None
        self._started = False
        if error:
            raise BrokerError(error)

    def stop(self) -> None:
        """Stop the dedicated broker and delete its temporary dir (idempotent)."""
        if not self.owned:
            return
        try:
            atexit.unregister(self.stop)
        except Exception:  # pragma: no cover - interpreter shutting down
            pass
        self._stop_and_clean()

    def __enter__(self) -> "Broker":
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def __repr__(self) -> str:
        kind = "dedicated" if self.owned else "external"
        return f"<Broker {kind} bootstrap={self.bootstrap or '-'} pid={self.pid}>"


def ensure_broker(**kwargs: object) -> Broker:
    """A broker for tests, started and ready.

    With ``KAFKA_BOOTSTRAP_SERVERS`` set: that cluster, nothing started, and
    ``stop()`` leaves it alone. Otherwise a dedicated broker (``Broker(**kwargs)``)
    on free ports with a temporary data dir; the caller must ``stop()`` it.
    """
    bootstrap = os.environ.get("KAFKA_BOOTSTRAP_SERVERS", "").strip()
    if bootstrap:
        return Broker.external(bootstrap)
    return Broker(**kwargs).start()  # type: ignore[arg-type]


# ---------------------------------------------------------------- topic helpers

def admin_client(bootstrap: str, **configs: object):
    """A kafka-python ``KafkaAdminClient``; the caller closes it."""
    from kafka import KafkaAdminClient

    configs.setdefault("client_id", "sma-tests-admin")
    configs.setdefault("request_timeout_ms", 15000)
    return KafkaAdminClient(bootstrap_servers=bootstrap, **configs)


def create_topics(
    bootstrap: str,
    names: Iterable[str],
    partitions: int = 3,
    *,
    replication_factor: int = 1,
    configs: Mapping[str, str] | None = None,
    exist_ok: bool = False,
    timeout: float = 30.0,
) -> None:
    """Create topics and wait until every partition has a leader in metadata.

    ``configs`` are topic configs (e.g. ``{"cleanup.policy": "compact"}``).
    With ``exist_ok`` an existing topic is accepted as is (its partition count
    is not checked).
    """
    import kafka.errors as Errors

    names = list(names)
    if not names:
        return
    request = {
        name: {
            "num_partitions": partitions,
            "replication_factor": replication_factor,
            "configs": dict(configs or {}),
        }
        for name in names
    }
    admin = admin_client(bootstrap)
    try:
        result = admin.create_topics(request, timeout_ms=int(timeout * 1000), raise_errors=False)
        _raise_topic_errors("create_topics", result, Errors.TopicAlreadyExistsError if exist_ok else None)
        admin.wait_for_topics(names, timeout_ms=int(timeout * 1000))
        if not exist_ok:
            described = {t["name"]: t for t in admin.describe_topics(names)}
            wrong = {n: len(described[n]["partitions"]) for n in names
                     if len(described[n]["partitions"]) != partitions}
            if wrong:
                raise Errors.KafkaError(f"unexpected partition counts: {wrong}")
    finally:
        admin.close()


def _raise_topic_errors(what: str, result: dict, tolerated: type | None) -> None:
    """Raise one KafkaError naming every topic whose per-topic error code is not tolerated."""
    import kafka.errors as Errors

    failures = []
    for topic in result.get("topics", []):
        code = topic.get("error_code", 0)
        if code == 0:
            continue
        error = Errors.for_code(code)
        if tolerated is not None and error is tolerated:
            continue
        failures.append(f"{topic.get('name')}: {error.__name__} {topic.get('error_message') or ''}".strip())
    if failures:
        raise Errors.KafkaError(f"{what} failed: " + "; ".join(failures))


def delete_topics(
    bootstrap: str,
    names: Iterable[str],
    *,
    missing_ok: bool = True,
    timeout: float = 30.0,
) -> None:
    """Delete topics and wait until none of them is listed in metadata any more."""
    import kafka.errors as Errors

    names = list(names)
    if not names:
        return
    admin = admin_client(bootstrap)
    try:
        result = admin.delete_topics(names, timeout_ms=int(timeout * 1000), raise_errors=False)
        _raise_topic_errors("delete_topics", result, Errors.UnknownTopicOrPartitionError if missing_ok else None)
        deadline = time.monotonic() + timeout
        while True:
            remaining = set(names) & set(admin.list_topics())
            if not remaining:
                return
            if time.monotonic() >= deadline:
                raise Errors.KafkaTimeoutError(f"topics still listed after {timeout}s: {sorted(remaining)}")
            time.sleep(0.1)
    finally:
        admin.close()


def read_topic(bootstrap: str, topic: str, expected: int = 0, timeout: float = 30.0, **consumer_config: object) -> list:
    """Every record of ``topic`` (kafka-python ``ConsumerRecord``s, in order per partition),
    once at least ``expected`` are there (waiting up to ``timeout``): read from the beginning
    up to the partitions' end offsets. Complete when nothing writes to the topic any more (the
    writer stopped, or answered only after the broker acknowledged): what a check must not
    see is then either read here or never written, with no fixed wait for it."""
    from kafka import KafkaConsumer, TopicPartition

    from monitor.topics_admin import topic_partitions

    consumer = KafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False, group_id=None, **consumer_config)
    out: list = []
    try:
        tps = [TopicPartition(topic, p) for p in sorted(topic_partitions(consumer, topic))]
        if not tps:
            raise BrokerError(f"no partitions for {topic}")
        consumer.assign(tps)
        consumer.seek_to_beginning(*tps)
        deadline = time.monotonic() + timeout
        while True:
            ends = consumer.end_offsets(tps)
            while any(consumer.position(tp) < ends[tp] for tp in tps) and time.monotonic() < deadline:
                for records in consumer.poll(timeout_ms=500).values():
                    out.extend(records)
            if len(out) >= expected or time.monotonic() >= deadline:
                return out
            time.sleep(0.2)
    finally:
        consumer.close()


class JsonTopicReader:
    """Every JSON record of one topic, from the beginning, read as it arrives (no consumer
    group). The topic's partitions are assigned explicitly, once the broker names them (a
    subscription without a group is assigned from metadata, and a topic created moments
    before can be missed until the next refresh). A ``wait_for`` that times out says how
    many records the topic holds, so a failure tells "nothing written" from "not read"."""

    def __init__(self, bootstrap: str, topic: str, timeout: float = 30.0) -> None:
        from kafka import KafkaConsumer, TopicPartition

        from monitor.topics_admin import topic_partitions

        self.topic = topic
        self.c = KafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False, group_id=None,
                               consumer_timeout_ms=300)
        parts = topic_partitions(self.c, topic, wait=timeout)
        if not parts:
            self.c.close()
            raise BrokerError(f"no partitions for {topic} after {timeout:.0f}s")
        self.tps = [TopicPartition(topic, p) for p in sorted(parts)]
        self.c.assign(self.tps)
        self.c.seek_to_beginning(*self.tps)
        self.items: list[dict] = []

    @property
    def versions(self) -> list[dict]:  # alert versions, for the alert tests
        return self.items

    def poll(self) -> list[dict]:
        import json

        for m in self.c:
            self.items.append(json.loads(m.value))
        return self.items

    def wait_for(self, pred, timeout: float = 60.0, describe=None) -> list[dict]:
        """The records matching ``pred`` once there is one (polling up to ``timeout`` s)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = [x for x in self.poll() if pred(x)]
            if found:
                return found
        describe = describe or (lambda x: (x.get("patient_id"), x.get("rule_id"),
                                           x.get("state") or x.get("status"), x.get("version")))
        held = sum(self.c.end_offsets(self.tps).values())
        raise AssertionError(f"nothing matched within {timeout}s on {self.topic} ({held} records on the broker, "
                             f"{len(self.items)} read); saw {[describe(x) for x in self.items]}")

    def close(self) -> None:
        self.c.close()


def drop_test_topics(bootstrap: str, names: Iterable[str], prefixes: Iterable[str]) -> None:
    """Delete ``names`` and every topic starting with one of ``prefixes`` (changelogs and
    other topics the service made for itself); never raises, so cleanup cannot mask a
    test's result."""
    prefixes = tuple(prefixes)
    try:
        admin = admin_client(bootstrap)
        try:
            existing = admin.list_topics()
        finally:
            admin.close()
        extra = [t for t in existing if prefixes and t.startswith(prefixes)]
        delete_topics(bootstrap, sorted(set(names) | set(extra)))
    except Exception as exc:
        print(f"topic cleanup failed: {exc}", file=sys.stderr)


# -- SASL/SCRAM with an enforcing authorizer ------------------------------------------------

def scram_acl_broker(sasl_port: int | None = None, *, super_users: Iterable[str] = (),
                     ssl_port: int | None = None, ssl_keystore: str | None = None, **kwargs: object) -> Broker:
    """A dedicated broker (not started) whose extra SASL_PLAINTEXT listener authenticates
    SCRAM-SHA-512 users and whose StandardAuthorizer enforces ACLs: a principal without an
    ACL may do nothing (``allow.everyone.if.no.acl.found=false``). The PLAINTEXT listener
    (readiness check, admin helpers, the controller) runs as ``User:ANONYMOUS``, a super
    user, as do the ``super_users`` (SCRAM user names). The SASL bootstrap is
    ``broker.sasl_bootstrap``. With ``ssl_port`` and ``ssl_keystore`` (a PEM key + certificate
    file) also an SSL listener (no client certificates: its clients are ``User:ANONYMOUS``)."""
    sasl_port = sasl_port or free_port()
    props = {
        "authorizer.class.name": "org.apache.kafka.metadata.authorizer.StandardAuthorizer",
        "allow.everyone.if.no.acl.found": "false",
        "super.users": ";".join(["User:ANONYMOUS", *(f"User:{u}" for u in super_users)]),
        "sasl.enabled.mechanisms": "SCRAM-SHA-512",
        "listener.name.sasl_plaintext.sasl.enabled.mechanisms": "SCRAM-SHA-512",
        "listener.name.sasl_plaintext.scram-sha-512.sasl.jaas.config":
            "org.apache.kafka.common.security.scram.ScramLoginModule required;",
    }
    listeners = [f"SASL_PLAINTEXT://{LOOPBACK}:{sasl_port}"]
    if ssl_port is not None:
        props["listener.name.ssl.ssl.keystore.type"] = "PEM"
        props["listener.name.ssl.ssl.keystore.location"] = str(ssl_keystore)
        listeners.append(f"SSL://{LOOPBACK}:{ssl_port}")
    broker = Broker(extra_properties=props, extra_listeners=listeners, **kwargs)
    broker.sasl_bootstrap = f"{LOOPBACK}:{sasl_port}"  # type: ignore[attr-defined]
    return broker


def add_scram_users(bootstrap: str, users: Mapping[str, str]) -> None:
    """Create SCRAM-SHA-512 credentials (user -> password) through the admin API."""
    from kafka.admin import ScramMechanism, UserScramCredentialUpsertion

    admin = admin_client(bootstrap)
    try:
        res = admin.alter_user_scram_credentials(
            [UserScramCredentialUpsertion(u, ScramMechanism.SCRAM_SHA_512, pw) for u, pw in users.items()])
        if any(res.values()):
            raise BrokerError(f"SCRAM credentials refused: {res}")
    finally:
        admin.close()


@functools.lru_cache(maxsize=1)
def _kafka_lib() -> str:
    """The directory of the Kafka jars (``kafka.sh fetch``: fetched once, then only found)."""
    return subprocess.run(["bash", str(KAFKA_SH), "fetch"], capture_output=True, text=True, check=True,
                          timeout=600).stdout.strip().splitlines()[-1]


def set_client_quota(bootstrap: str, client_id: str, producer_byte_rate: int | None) -> None:
    """Set (or, with None, remove) the broker's produce quota of one client id, with Kafka's
    own ``kafka-configs`` (``kafka.admin.ConfigCommand`` from the jars ``kafka.sh fetch``
    put in place; kafka-python has no client-quota API). The broker then delays a client
    over its byte rate (it mutes the connection for up to the quota window, about 11 s)."""
    lib = _kafka_lib()
    change = (["--add-config", f"producer_byte_rate={producer_byte_rate}"] if producer_byte_rate is not None
              else ["--delete-config", "producer_byte_rate"])
    done = subprocess.run(["java", "-Xmx128m", "-cp", f"{lib}/*", "kafka.admin.ConfigCommand",
                           "--bootstrap-server", bootstrap, "--alter", *change,
                           "--entity-type", "clients", "--entity-name", client_id],
                          capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL)
    if done.returncode != 0 or "Completed updating config" not in done.stdout:
        raise BrokerError(f"quota of {client_id} not changed: {done.stdout[-400:]} {done.stderr[-400:]}")
