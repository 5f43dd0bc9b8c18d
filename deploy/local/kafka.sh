#!/usr/bin/env bash
# A real Apache Kafka 4.x single-node KRaft broker (combined broker+controller)
# for development and tests, without Docker. Loopback only.
#
#   deploy/local/kafka.sh fetch    download the broker jars into the cache (idempotent)
#   deploy/local/kafka.sh start    format once, start, wait until it answers metadata
#   deploy/local/kafka.sh stop     SIGTERM, wait up to KAFKA_STOP_TIMEOUT s, then SIGKILL
#   deploy/local/kafka.sh status   exit 0 if running, 3 if not
#   deploy/local/kafka.sh reset    stop and delete the data dir
#   deploy/local/kafka.sh logs     tail the broker log
#
# Environment (defaults in brackets):
#   KAFKA_VERSION            broker version [<kafka.version> in deploy/local/pom.xml]
#   KAFKA_CACHE_DIR          cache root; jars go to $KAFKA_CACHE_DIR/kafka-<version>/lib
#                            [${XDG_CACHE_HOME:-$HOME/.cache}/sma-monitor]
#   KAFKA_PORT               PLAINTEXT client port [9092]
#   KAFKA_CONTROLLER_PORT    KRaft controller port [9093]
#   KAFKA_DATA_DIR           log.dirs [<repo>/.kafka/data]; its parent holds
#                            server.properties, broker.log, broker.stdout and the pid file
#   KAFKA_PID_FILE           [<parent of data dir>/kafka.pid]
#   KAFKA_LOG_FILE           [<parent of data dir>/broker.log]
#   KAFKA_EXTRA_LISTENERS    extra listeners added to listeners AND advertised.listeners,
#                            e.g. "SSL://127.0.0.1:19094" (the PLAINTEXT one on
#                            KAFKA_PORT stays: the readiness check and admin use it)
#   KAFKA_EXTRA_PROPERTIES_FILE  lines appended to server.properties; a key set there
#                            overrides the generated one (java.util.Properties: last wins)
#   KAFKA_START_TIMEOUT      seconds to wait for readiness [60]
#   KAFKA_STOP_TIMEOUT       seconds between SIGTERM and SIGKILL [30]
#   KAFKA_HEAP_OPTS          [-Xmx512m -Xms256m]
#   KAFKA_JVM_OPTS           [-XX:+UseSerialGC -XX:TieredStopAtLevel=1 ...]
#   KAFKA_OWNER_PID          if set, a watchdog stops the broker when that process dies
#                            (tests set it so a killed test run leaves no broker behind)
#   PYTHON                   interpreter with kafka-python for the readiness check
#                            [<repo>/.venv/bin/python, else python3]
set -euo pipefail

SCRIPT_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO_ROOT="$(cd "$SCRIPT_DIR/../.." && pwd)"
POM="$SCRIPT_DIR/pom.xml"
LOG4J_CONFIG="$SCRIPT_DIR/log4j2.properties"

pom_kafka_version() {
  sed -n 's:.*<kafka\.version>\(.*\)</kafka\.version>.*:\1:p' "$POM" | head -n1
}

KAFKA_VERSION="${KAFKA_VERSION:-$(pom_kafka_version)}"
KAFKA_CACHE_DIR="${KAFKA_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/sma-monitor}"
VERSION_DIR="$KAFKA_CACHE_DIR/kafka-$KAFKA_VERSION"
LIB_DIR="$VERSION_DIR/lib"
DONE_MARKER="$VERSION_DIR/.fetched"

KAFKA_HOST=127.0.0.1
KAFKA_PORT="${KAFKA_PORT:-9092}"
KAFKA_CONTROLLER_PORT="${KAFKA_CONTROLLER_PORT:-9093}"
KAFKA_DATA_DIR="${KAFKA_DATA_DIR:-$REPO_ROOT/.kafka/data}"
case "$KAFKA_DATA_DIR" in /*) ;; *) KAFKA_DATA_DIR="$PWD/$KAFKA_DATA_DIR" ;; esac
KAFKA_DATA_DIR="${KAFKA_DATA_DIR%/}"
STATE_DIR="$(dirname "$KAFKA_DATA_DIR")"
KAFKA_PID_FILE="${KAFKA_PID_FILE:-$STATE_DIR/kafka.pid}"
KAFKA_LOG_FILE="${KAFKA_LOG_FILE:-$STATE_DIR/broker.log}"
STDOUT_FILE="$STATE_DIR/broker.stdout"
SERVER_PROPERTIES="$STATE_DIR/server.properties"
KAFKA_START_TIMEOUT="${KAFKA_START_TIMEOUT:-60}"
KAFKA_STOP_TIMEOUT="${KAFKA_STOP_TIMEOUT:-30}"
KAFKA_HEAP_OPTS="${KAFKA_HEAP_OPTS:--Xmx512m -Xms256m}"
# SerialGC: one GC thread and a smaller footprint on a shared 2-core box.
# TieredStopAtLevel=1 (C1 only): no C2 compiler threads competing with the test
# workers for the 2 cores. Measured start-to-ready on an idle 2-core machine:
# ~2.0-2.2 s with these, ~2.5 s with the JVM defaults (G1 + C2). Set
# KAFKA_JVM_OPTS="" for JVM defaults (e.g. a throughput benchmark of the broker).
KAFKA_JVM_OPTS="${KAFKA_JVM_OPTS:--XX:+UseSerialGC -XX:TieredStopAtLevel=1 -XX:+ExitOnOutOfMemoryError -Djava.awt.headless=true}"

if [[ -z "${PYTHON:-}" ]]; then
  if [[ -x "$REPO_ROOT/.venv/bin/python" ]]; then PYTHON="$REPO_ROOT/.venv/bin/python"; else PYTHON=python3; fi
fi

log() { printf 'kafka.sh: %s\n' "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }

now() { date +%s.%N; }
elapsed() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.1f", b - a }'; }

port_open() {  # port_open PORT: something accepts TCP connections on 127.0.0.1:PORT
  (exec 3<>"/dev/tcp/$KAFKA_HOST/$1") 2>/dev/null
}

pid_alive() { [[ -n "${1:-}" ]] && kill -0 "$1" 2>/dev/null; }

read_pid() {  # prints the pid from the pid file if it names a live Kafka broker JVM
  [[ -f "$KAFKA_PID_FILE" ]] || return 1
  local pid
  pid="$(tr -dc '0-9' <"$KAFKA_PID_FILE")"
  pid_alive "$pid" || return 1
  if [[ -r "/proc/$pid/cmdline" ]] && ! grep -qa 'kafka\.Kafka' "/proc/$pid/cmdline"; then
    return 1  # pid reused by something else
  fi
  printf '%s\n' "$pid"
}

tail_log() {
  local f
  for f in "$KAFKA_LOG_FILE" "$STDOUT_FILE"; do
    if [[ -s "$f" ]]; then
      log "---- last lines of $f ----"
      tail -n "${1:-40}" "$f" >&2 || true
    fi
  done
}

# ---------------------------------------------------------------- fetch
cmd_fetch() {
  local pom_hash
  pom_hash="$(sha256sum "$POM" | cut -d' ' -f1)"
  if [[ -f "$DONE_MARKER" && "$(cat "$DONE_MARKER")" == "$pom_hash" && -d "$LIB_DIR" ]]; then
    return 0
  fi
  command -v java >/dev/null || die "java not found (Kafka $KAFKA_VERSION needs Java 17+)"
  command -v mvn >/dev/null || die "mvn not found (apt-get install maven)"
  mkdir -p "$VERSION_DIR"
  # Serialise concurrent fetches of the same version (parallel test runs).
  exec 8>"$VERSION_DIR/.lock"
  if command -v flock >/dev/null; then flock 8; fi
  if [[ -f "$DONE_MARKER" && "$(cat "$DONE_MARKER")" == "$pom_hash" && -d "$LIB_DIR" ]]; then
    exec 8>&-; return 0
  fi
  local t0 tmp
  t0="$(now)"
  tmp="$VERSION_DIR/lib.tmp.$$"
  rm -rf "$tmp"
  log "fetching Apache Kafka $KAFKA_VERSION jars into $LIB_DIR ..."
  if ! mvn -q -B -Dstyle.color=never -f "$POM" -Dkafka.version="$KAFKA_VERSION" \
      dependency:copy-dependencies -DincludeScope=runtime -DoutputDirectory="$tmp" \
      >"$VERSION_DIR/fetch.log" 2>&1; then
    cat "$VERSION_DIR/fetch.log" >&2
    rm -rf "$tmp"
    die "mvn could not fetch org.apache.kafka:kafka_2.13:$KAFKA_VERSION"
  fi
  ls "$tmp"/kafka_2.13-"$KAFKA_VERSION".jar >/dev/null 2>&1 || { rm -rf "$tmp"; die "fetch produced no kafka_2.13-$KAFKA_VERSION.jar"; }
  rm -rf "$LIB_DIR"
  mv "$tmp" "$LIB_DIR"
  printf '%s\n' "$pom_hash" >"$DONE_MARKER"
  log "fetched $(find "$LIB_DIR" -name '*.jar' | wc -l) jars in $(elapsed "$t0")s"
  exec 8>&-
}

java_cmd() {  # java_cmd MAINCLASS ARGS... (word-splitting of the *_OPTS is intended)
  # shellcheck disable=SC2086
  java $KAFKA_HEAP_OPTS $KAFKA_JVM_OPTS \
    -Dlog4j2.configurationFile="$LOG4J_CONFIG" -Dkafka.log.file="$KAFKA_LOG_FILE" \
    -cp "$LIB_DIR/*" "$@"
}

# ---------------------------------------------------------------- config
write_server_properties() {
  local listeners advertised
  listeners="PLAINTEXT://$KAFKA_HOST:$KAFKA_PORT,CONTROLLER://$KAFKA_HOST:$KAFKA_CONTROLLER_PORT"
  advertised="PLAINTEXT://$KAFKA_HOST:$KAFKA_PORT"
  if [[ -n "${KAFKA_EXTRA_LISTENERS:-}" ]]; then
    listeners="$listeners,$KAFKA_EXTRA_LISTENERS"
    advertised="$advertised,$KAFKA_EXTRA_LISTENERS"
  fi
  local tmp="$SERVER_PROPERTIES.tmp.$$"
  cat >"$tmp" <<EOF
# Generated by deploy/local/kafka.sh on every start; edits here are overwritten.
# Put overrides in a file named by KAFKA_EXTRA_PROPERTIES_FILE instead.
process.roles=broker,controller
node.id=1
controller.quorum.bootstrap.servers=$KAFKA_HOST:$KAFKA_CONTROLLER_PORT
listeners=$listeners
advertised.listeners=$advertised
inter.broker.listener.name=PLAINTEXT
controller.listener.names=CONTROLLER
listener.security.protocol.map=CONTROLLER:PLAINTEXT,PLAINTEXT:PLAINTEXT,SSL:SSL,SASL_PLAINTEXT:SASL_PLAINTEXT,SASL_SSL:SASL_SSL
log.dirs=$KAFKA_DATA_DIR

auto.create.topics.enable=false
# inputs up to 16 MiB must reach the worker so it can dead-letter them with their bytes
message.max.bytes=16777216
replica.fetch.max.bytes=16777216
delete.topic.enable=true
num.partitions=3
default.replication.factor=1
min.insync.replicas=1
group.initial.rebalance.delay.ms=0

offsets.topic.replication.factor=1
offsets.topic.num.partitions=10
transaction.state.log.replication.factor=1
transaction.state.log.min.isr=1
transaction.state.log.num.partitions=10
share.coordinator.state.topic.replication.factor=1
share.coordinator.state.topic.min.isr=1

# Small footprint on a shared 2-core machine.
num.network.threads=2
num.io.threads=4
num.recovery.threads.per.data.dir=1
log.segment.bytes=16777216
log.retention.hours=168
log.cleaner.dedupe.buffer.size=33554432
EOF
  if [[ -n "${KAFKA_EXTRA_PROPERTIES_FILE:-}" ]]; then
    [[ -r "$KAFKA_EXTRA_PROPERTIES_FILE" ]] || die "KAFKA_EXTRA_PROPERTIES_FILE=$KAFKA_EXTRA_PROPERTIES_FILE is not readable"
    { printf '\n# ---- appended from %s ----\n' "$KAFKA_EXTRA_PROPERTIES_FILE"; cat "$KAFKA_EXTRA_PROPERTIES_FILE"; printf '\n'; } >>"$tmp"
  fi
  mv "$tmp" "$SERVER_PROPERTIES"
}

new_cluster_id() {  # Kafka Uuid: 16 random bytes, URL-safe base64, no padding, not starting with '-'
  local id
  while :; do
    id="$(head -c 16 /dev/urandom | base64 | tr '+/' '-_' | tr -d '=\n')"
    [[ "$id" != -* ]] && { printf '%s\n' "$id"; return; }
  done
}

format_once() {
  # Once per data dir. (Checked on 4.1.2: a data dir formatted with
  # --standalone for one controller port also comes up on another port.)
  [[ -f "$KAFKA_DATA_DIR/meta.properties" ]] && return 0
  mkdir -p "$KAFKA_DATA_DIR"
  local cluster_id t0
  cluster_id="$(new_cluster_id)"
  t0="$(now)"
  if ! java_cmd kafka.tools.StorageTool format --standalone -t "$cluster_id" -c "$SERVER_PROPERTIES" \
      >"$STATE_DIR/format.out" 2>&1; then
    cat "$STATE_DIR/format.out" >&2
    die "formatting $KAFKA_DATA_DIR failed"
  fi
  log "formatted $KAFKA_DATA_DIR (cluster id $cluster_id) in $(elapsed "$t0")s"
}

# ---------------------------------------------------------------- readiness
# Ready = the client port answers a Metadata request (kafka-python admin
# list_topics). Falls back to the broker's own "Kafka Server started" log line
# when no Python with kafka-python is around.
READY_PY='
import logging, os, sys, time
logging.disable(logging.CRITICAL)
from kafka import KafkaAdminClient
bootstrap, pid, deadline = sys.argv[1], int(sys.argv[2]), time.monotonic() + float(sys.argv[3])
last = None
while time.monotonic() < deadline:
    if pid:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            sys.exit(3)
    try:
        admin = KafkaAdminClient(bootstrap_servers=bootstrap, client_id="kafka-sh-readiness",
                                 request_timeout_ms=5000)
        try:
            admin.list_topics()
        finally:
            admin.close()
        sys.exit(0)
    except Exception as exc:
        last = exc
        time.sleep(0.2)
print("no metadata answer: %r" % (last,), file=sys.stderr)
sys.exit(1)
'

have_python_kafka() { "$PYTHON" -c 'import kafka' 2>/dev/null; }

wait_ready() {  # wait_ready PID: 0 ready, 1 timed out, 2 the broker process exited
  local pid="$1" deadline
  deadline=$(( $(date +%s) + KAFKA_START_TIMEOUT ))
  while ! port_open "$KAFKA_PORT"; do
    if [[ -n "$pid" ]] && ! pid_alive "$pid"; then return 2; fi
    (( $(date +%s) < deadline )) || return 1
    sleep 0.2
  done
  local left=$(( deadline - $(date +%s) )); (( left > 0 )) || left=1
  if have_python_kafka; then
    local rc=0
    "$PYTHON" -c "$READY_PY" "$KAFKA_HOST:$KAFKA_PORT" "${pid:-0}" "$left" || rc=$?
    case "$rc" in
      0) return 0 ;;
      3) return 2 ;;
      *) return 1 ;;
    esac
  fi
  log "no kafka-python for $PYTHON; readiness falls back to the broker log"
  while ! grep -q 'Kafka Server started' "$KAFKA_LOG_FILE" 2>/dev/null; do
    if [[ -n "$pid" ]] && ! pid_alive "$pid"; then return 2; fi
    (( $(date +%s) < deadline )) || return 1
    sleep 0.2
  done
}

start_watchdog() {  # stop the broker when KAFKA_OWNER_PID dies
  local broker_pid="$1" owner="$2"
  # shellcheck disable=SC2016  # expanded by the inner bash
  nohup bash -c '
    owner=$1 broker=$2
    while kill -0 "$owner" 2>/dev/null && kill -0 "$broker" 2>/dev/null; do sleep 1; done
    if kill -0 "$broker" 2>/dev/null; then
      kill -TERM "$broker" 2>/dev/null || true
      for _ in $(seq 1 300); do kill -0 "$broker" 2>/dev/null || exit 0; sleep 0.1; done
      kill -KILL "$broker" 2>/dev/null || true
    fi' kafka-watchdog "$owner" "$broker_pid" </dev/null >/dev/null 2>&1 &
}

kill_broker() {  # kill_broker PID: SIGTERM, wait KAFKA_STOP_TIMEOUT, SIGKILL
  local pid="$1" i
  kill -TERM "$pid" 2>/dev/null || return 0
  for (( i = 0; i < KAFKA_STOP_TIMEOUT * 10; i++ )); do
    pid_alive "$pid" || return 0
    sleep 0.1
  done
  log "broker $pid still alive after ${KAFKA_STOP_TIMEOUT}s; SIGKILL"
  kill -KILL "$pid" 2>/dev/null || true
  for (( i = 0; i < 50; i++ )); do pid_alive "$pid" || return 0; sleep 0.1; done
}

# ---------------------------------------------------------------- start
cmd_start() {
  local t0 pid
  t0="$(now)"
  if port_open "$KAFKA_PORT"; then
    log "something already accepts connections on $KAFKA_HOST:$KAFKA_PORT; not starting another broker"
    return 0
  fi
  if pid="$(read_pid)"; then
    log "broker $pid is already starting; waiting for it"
    wait_ready "$pid" || { tail_log 60; die "broker $pid not ready within ${KAFKA_START_TIMEOUT}s"; }
    log "ready on $KAFKA_HOST:$KAFKA_PORT after $(elapsed "$t0")s"
    return 0
  fi
  port_open "$KAFKA_CONTROLLER_PORT" && die "controller port $KAFKA_CONTROLLER_PORT on $KAFKA_HOST is taken by another process"
  cmd_fetch
  mkdir -p "$STATE_DIR" "$KAFKA_DATA_DIR" "$(dirname "$KAFKA_PID_FILE")"
  write_server_properties
  format_once
  local t_launch
  t_launch="$(now)"
  {
    printf '==== %s starting Kafka %s ====\n' "$(date -Is)" "$KAFKA_VERSION"
  } >>"$STDOUT_FILE"
  # shellcheck disable=SC2086
  nohup java $KAFKA_HEAP_OPTS $KAFKA_JVM_OPTS \
    -Dlog4j2.configurationFile="$LOG4J_CONFIG" -Dkafka.log.file="$KAFKA_LOG_FILE" \
    -cp "$LIB_DIR/*" kafka.Kafka "$SERVER_PROPERTIES" \
    </dev/null >>"$STDOUT_FILE" 2>&1 &
  pid=$!
  printf '%s\n' "$pid" >"$KAFKA_PID_FILE"
  if [[ -n "${KAFKA_OWNER_PID:-}" ]]; then start_watchdog "$pid" "$KAFKA_OWNER_PID"; fi
  local rc=0
  wait_ready "$pid" || rc=$?
  if (( rc != 0 )); then
    tail_log 60
    if (( rc == 2 )); then
      rm -f "$KAFKA_PID_FILE"
      die "the broker exited during start-up (log: $KAFKA_LOG_FILE)"
    fi
    log "broker $pid not ready within ${KAFKA_START_TIMEOUT}s; stopping it"
    KAFKA_STOP_TIMEOUT=5 kill_broker "$pid"
    rm -f "$KAFKA_PID_FILE"
    die "Kafka did not become ready on $KAFKA_HOST:$KAFKA_PORT within ${KAFKA_START_TIMEOUT}s (log: $KAFKA_LOG_FILE)"
  fi
  log "Kafka $KAFKA_VERSION ready on $KAFKA_HOST:$KAFKA_PORT (pid $pid) in $(elapsed "$t_launch")s from launch, $(elapsed "$t0")s in total; log: $KAFKA_LOG_FILE"
}

# ---------------------------------------------------------------- stop / status / reset
cmd_stop() {
  local pid
  if ! pid="$(read_pid)"; then
    [[ -f "$KAFKA_PID_FILE" ]] && rm -f "$KAFKA_PID_FILE"
    log "no broker running from $KAFKA_PID_FILE"
    return 0
  fi
  local t0; t0="$(now)"
  kill_broker "$pid"
  pid_alive "$pid" && die "could not stop broker $pid"
  rm -f "$KAFKA_PID_FILE"
  log "stopped broker $pid in $(elapsed "$t0")s"
}

cmd_status() {
  local pid
  if pid="$(read_pid)"; then
    if port_open "$KAFKA_PORT"; then
      echo "running: pid $pid, $KAFKA_HOST:$KAFKA_PORT accepting connections, data $KAFKA_DATA_DIR"
    else
      echo "starting: pid $pid, $KAFKA_HOST:$KAFKA_PORT not accepting connections yet"
    fi
    return 0
  fi
  if port_open "$KAFKA_PORT"; then
    echo "not started by this script ($KAFKA_PID_FILE), but $KAFKA_HOST:$KAFKA_PORT accepts connections"
    return 0
  fi
  echo "stopped"
  return 3
}

cmd_reset() {
  cmd_stop
  case "$KAFKA_DATA_DIR" in
    ""|/|"$HOME"|"$REPO_ROOT") die "refusing to delete KAFKA_DATA_DIR=$KAFKA_DATA_DIR" ;;
  esac
  if [[ -d "$KAFKA_DATA_DIR" ]]; then
    if [[ -n "$(ls -A "$KAFKA_DATA_DIR")" && ! -f "$KAFKA_DATA_DIR/meta.properties" ]]; then
      die "$KAFKA_DATA_DIR does not look like a Kafka data dir (no meta.properties); not deleting it"
    fi
    rm -rf "$KAFKA_DATA_DIR"
    log "deleted $KAFKA_DATA_DIR"
  fi
}

cmd_logs() { tail -n "${1:-100}" "$KAFKA_LOG_FILE"; }

usage() {
  sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//' >&2
  exit 2
}

case "${1:-}" in
  fetch) cmd_fetch; echo "$LIB_DIR" ;;
  start) cmd_start ;;
  stop) cmd_stop ;;
  status) cmd_status ;;
  reset) cmd_reset ;;
  logs) shift; cmd_logs "$@" ;;
  *) usage ;;
esac
