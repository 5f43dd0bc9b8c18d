"""Deploy artefacts checked with the real tools.

promtool (Debian ``prometheus``), amtool (``prometheus-alertmanager``), kustomize and
kubeconform (``deploy/local/install-tools.sh``, Go module proxy), check-jsonschema with
its vendored compose-spec schema, and the Kubernetes JSON schemas shipped by the PyPI
package ``kubernetes-validate`` (kubeconform cannot download schemas here). A missing
tool FAILS the test (run ``make debs`` / ``deploy/local/install-tools.sh``).
Also: unit tests of ``monitor.ops`` (consumer lag) with a fake consumer.
"""
from __future__ import annotations

import asyncio
import json
import re
import shutil
import subprocess
import sys
from collections import namedtuple
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
RULES = DEPLOY / "prometheus" / "rules.yml"
K8S_VERSION = "1.33.0"
CRD_KINDS = {"Kafka", "KafkaNodePool", "KafkaTopic", "KafkaUser", "ServiceMonitor", "PrometheusRule"}


def tools_bin() -> Path:
    out = subprocess.run([str(DEPLOY / "local" / "install-tools.sh"), "--print"], capture_output=True, text=True, check=True)
    return Path(out.stdout.strip())


def tool(name: str) -> str:
    """Path of a tool; installs the Go/PyPI ones on demand, fails loudly if impossible."""
    found = shutil.which(name)
    if name in {"promtool", "amtool"}:
        if not found:
            pytest.fail(f"{name} not installed: run `make debs` (Debian prometheus / prometheus-alertmanager)")
        return found
    path = tools_bin() / name
    if not path.exists():
        res = subprocess.run([str(DEPLOY / "local" / "install-tools.sh")], capture_output=True, text=True)
        if res.returncode != 0 or not path.exists():
            pytest.fail(f"cannot install {name}:\n{res.stdout}\n{res.stderr}")
    return str(path)


def run(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    return subprocess.run(list(args), cwd=cwd, capture_output=True, text=True, timeout=120)


def ok(res: subprocess.CompletedProcess) -> str:
    assert res.returncode == 0, f"{res.args}\nstdout:\n{res.stdout}\nstderr:\n{res.stderr}"
    return res.stdout + res.stderr


# ---- Prometheus rules ---------------------------------------------------------------

def shipped_rules() -> list[dict]:
    return [r for g in yaml.safe_load(RULES.read_text())["groups"] for r in g["rules"]]


def test_promtool_check_rules():
    out = ok(run(tool("promtool"), "check", "rules", str(RULES)))
    assert f"SUCCESS: {len(shipped_rules())} rules found" in out


def test_promtool_test_rules():
    out = ok(run(tool("promtool"), "test", "rules", "rules.test.yml", cwd=DEPLOY / "prometheus"))
    assert "SUCCESS" in out


def test_every_rule_has_a_firing_and_a_quiet_unit_test():
    tests = yaml.safe_load((DEPLOY / "prometheus" / "rules.test.yml").read_text())["tests"]
    fired, quiet = set(), set()
    for t in tests:
        for case in t.get("alert_rule_test", []):
            (fired if case.get("exp_alerts") else quiet).add(case["alertname"])
    names = {r["alert"] for r in shipped_rules()}
    assert names - fired == set(), "rules never tested firing"
    assert names - quiet == set(), "rules never tested not firing"


def _inbox_metric_names() -> set[str]:
    """The inbox's own registry (issue 14: its metrics are served on its own port)."""
    from monitor.inbox.metrics import InboxMetrics

    return {m.name + ("_total" if m.type == "counter" else "_info" if m.type == "info" else "")
            for m in InboxMetrics().registry.collect()}


def test_rules_are_labelled_for_routing_and_name_only_known_metrics():
    from monitor.metrics import REGISTRY

    known = {m.name for m in REGISTRY.collect()} | {"up"} | {
        re.sub(r"_(total|info)$", "", n) for n in _inbox_metric_names()}
    for rule in shipped_rules():
        assert rule["labels"]["category"] == "ops" and rule["labels"]["severity"] in {"critical", "warning"}, rule
        assert rule["annotations"]["summary"] and rule["annotations"]["description"], rule
        metrics = set(re.findall(r"\b(monitor_[a-z_]+|up)\b", rule["expr"]))
        base = {re.sub(r"_(total|bucket|sum|count|info)$", "", m) for m in metrics}
        assert base <= known | {"monitor_build"}, (rule["alert"], base - known)


def test_promtool_check_example_prometheus_config():
    ok(run(tool("promtool"), "check", "config", "prometheus.yml", cwd=DEPLOY / "prometheus"))


# ---- Alertmanager -------------------------------------------------------------------

AM_CONFIG = DEPLOY / "alertmanager" / "alertmanager.yml"


def test_amtool_check_config():
    out = ok(run(tool("amtool"), "check-config", str(AM_CONFIG)))
    assert "SUCCESS" in out


@pytest.mark.parametrize("labels,receiver", [
    (["category=ops", "severity=critical", "alertname=MonitorWorkerDown"], "ops-pager"),
    (["category=ops", "severity=warning", "alertname=MonitorLabSourceSilent"], "ops-default"),
    (["alertname=alt_grade3", "rule_id=alt_grade3", "severity=high", "team=hepatology"], "clinical-hepatology-pager"),
    (["alertname=alt_grade1", "rule_id=alt_grade1", "severity=warning", "team=hepatology"], "clinical-hepatology"),
    (["alertname=x", "rule_id=x", "severity=critical", "team=neuromuscular"], "clinical-neuromuscular-pager"),
    (["alertname=x", "rule_id=x", "severity=warning", "team=unassigned"], "clinical-unassigned"),
    (["alertname=x", "rule_id=x", "severity=warning", "team=some-new-team"], "clinical-unassigned"),
    # escalation tiers are labels (issue 14): the failsafe pages the on-call physician, tier 0 the
    # nurse in charge as well as the team
    (["alertname=x", "rule_id=x", "severity=high", "team=hepatology", "escalation_tier=failsafe"],
     "clinical-oncall-physician"),
    (["alertname=x", "rule_id=x", "severity=high", "team=hepatology", "escalation_tier=0"],
     "clinical-nurse-in-charge,clinical-hepatology-pager"),
    (["alertname=x", "rule_id=x", "severity=warning", "team=hepatology", "escalation_tier=1"], "clinical-hepatology"),
])
def test_alertmanager_routes(labels, receiver):
    out = ok(run(tool("amtool"), "config", "routes", "test", f"--config.file={AM_CONFIG}", *labels))
    assert out.split("\n")[0].strip() == receiver, out


# ---- Grafana --------------------------------------------------------------------------

def dashboard() -> dict:
    return json.loads((DEPLOY / "grafana" / "dashboards" / "sma-monitor.json").read_text())


def dashboard_exprs() -> list[str]:
    return [t["expr"] for p in dashboard()["panels"] for t in p.get("targets", [])]


def test_dashboard_covers_the_service_metrics():
    d = dashboard()
    assert d["uid"] == "sma-monitor" and d["panels"]
    ids = [p["id"] for p in d["panels"]]
    assert len(ids) == len(set(ids))
    text = " ".join(dashboard_exprs())
    for metric in ["monitor_events_consumed_total", "monitor_dead_letters_total", "monitor_findings_total",
                   "monitor_alerts_opened_total", "monitor_consumer_lag_messages", "monitor_sink_failures_total",
                   "monitor_receipt_to_alert_seconds_bucket", "monitor_effective_to_alert_seconds_bucket",
                   "monitor_patients_overdue", "monitor_patients_monitored", "monitor_source_last_event_timestamp_seconds",
                   "monitor_rollbacks_total", "monitor_commit_failures_total", "monitor_clinical_checkpoints_total",
                   "monitor_clinical_uncheckpointed_records", "monitor_clinical_partitions_owned",
                   "monitor_clinical_restore_seconds_count", "monitor_clinical_clock_last_run_timestamp_seconds",
                   "monitor_clinical_clock_failures_total", "monitor_loop_restarts_total"]:
        assert metric in text, metric
    for expr in dashboard_exprs():
        assert expr.count("(") == expr.count(")"), expr
    # faust hosts the worker but reads and writes no Kafka: its message, commit and rebalance
    # families stay empty, so no panel reads them (deploy/METRICS.md)
    assert not [e for e in dashboard_exprs() if "monitor_faust_" in e and "monitor_faust_http" not in e]


def test_grafana_provisioning_points_at_the_dashboards():
    prov = yaml.safe_load((DEPLOY / "grafana" / "provisioning" / "dashboards" / "sma-monitor.yaml").read_text())
    assert prov["providers"][0]["options"]["path"] == "/var/lib/grafana/dashboards"
    ds = yaml.safe_load((DEPLOY / "grafana" / "provisioning" / "datasources" / "prometheus.yaml").read_text())
    assert any(d["type"] == "prometheus" for d in ds["datasources"])


# ---- docker compose ---------------------------------------------------------------------

COMPOSE = DEPLOY / "compose.yaml"


def test_compose_validates_against_the_compose_spec_schema(tmp_path):
    cj = tool("check-jsonschema")
    ok(run(cj, "--builtin-schema", "vendor.compose-spec", str(COMPOSE)))
    # the validator does reject a broken file
    broken = yaml.safe_load(COMPOSE.read_text())
    broken["services"]["kafka"]["restart_policy"] = "always"
    bad = tmp_path / "compose.yaml"
    bad.write_text(yaml.safe_dump(broken))
    assert run(cj, "--builtin-schema", "vendor.compose-spec", str(bad)).returncode != 0


def test_compose_structure():
    doc = yaml.safe_load(COMPOSE.read_text())
    services = doc["services"]
    assert {"kafka", "topic-init", "worker-1", "worker-2", "prometheus", "alertmanager", "grafana"} <= set(services)
    assert services["kafka"]["image"] == "apache/kafka:4.1.2"
    assert "controller" in services["kafka"]["environment"]["KAFKA_PROCESS_ROLES"]
    for name, svc in services.items():
        assert "image" in svc or "build" in svc, name
        if "build" in svc:
            assert (COMPOSE.parent / svc["build"]["context"] / svc["build"]["dockerfile"]).is_file(), name
        for vol in svc.get("volumes", []):
            src = vol.split(":")[0]
            if src.startswith("."):
                assert (COMPOSE.parent / src).exists(), (name, src)
        for dep in svc.get("depends_on", {}):
            assert dep in services, (name, dep)
    assert services["worker-1"]["environment"]["WEB_HOST"] == "0.0.0.0"
    assert services["worker-1"]["depends_on"]["topic-init"]["condition"] == "service_completed_successfully"
    prom = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    targets = prom["scrape_configs"][0]["static_configs"][0]["targets"]
    assert {t.split(":")[0] for t in targets} == {"worker-1", "worker-2"}
    assert prom["scrape_configs"][0]["job_name"] == "sma-monitor"
    # issue 14: the inbox and the listener, each on its metrics port, under the job names the rules use
    jobs = {j["job_name"]: j["static_configs"][0]["targets"] for j in prom["scrape_configs"]}
    assert jobs["sma-monitor-inbox"] == ["inbox:9465"] and jobs["sma-monitor-mllp"] == ["mllp:9464"]
    assert "9465" in services["inbox"]["command"] and "9464" in services["mllp"]["command"]
    assert "/readyz" in " ".join(services["inbox"]["healthcheck"]["test"])


def test_dockerfile_runs_as_non_root():
    text = (DEPLOY / "Dockerfile").read_text()
    assert re.search(r"^USER 10001", text, re.M)
    assert "WEB_HOST=0.0.0.0" in text


def test_dockerfile_ships_the_compiled_core_where_the_worker_looks_for_it():
    text = (DEPLOY / "Dockerfile").read_text()
    built = re.search(r"CLINICAL_CORE_DIR=(\S+) python scripts/build_clinical_core.py", text).group(1)
    looked = re.search(r"^\s*CLINICAL_CORE_DIR=(\S+)$", text, re.M).group(1)
    assert built.startswith("/install/") and looked == "/usr/local/" + built[len("/install/"):]
    assert "COPY --from=build /install /usr/local" in text
    assert re.search(r'"cython==([\d.]+)"', text).group(1) in (ROOT / "pyproject.toml").read_text()


# ---- Kubernetes -------------------------------------------------------------------------

@pytest.fixture(scope="module")
def k8s_docs() -> list[dict]:
    out = ok(run(tool("kustomize"), "build", str(DEPLOY / "k8s" / "base")))
    return [d for d in yaml.safe_load_all(out) if d]


def _by_kind(docs, kind):
    return [d for d in docs if d["kind"] == kind]


def standalone_schemas(dest: Path, kinds: set[tuple[str, str]]) -> Path:
    """kubeconform needs self-contained schemas: inline kubernetes-validate's shared $defs."""
    src_root = Path((tools_bin() / ".k8s-schemas").read_text().strip())
    src = src_root / f"v{K8S_VERSION}-local-strict"
    assert src.is_dir(), f"no Kubernetes {K8S_VERSION} schemas in {src_root}"
    defs = json.loads((src / "_definitions.json").read_text())
    out = dest / f"v{K8S_VERSION}-standalone-strict"
    out.mkdir(parents=True)
    for kind, api_version in kinds:
        group, _, version = api_version.rpartition("/")
        suffix = f"-{group.split('.')[0]}-{version}" if group else f"-{version}"
        name = f"{kind.lower()}{suffix}.json"
        text = (src / name).read_text().replace("/api/_definitions.json#/$defs/", "#/$defs/")
        schema = json.loads(text)
        schema["$defs"] = defs.get("$defs", defs.get("definitions"))
        (out / name).write_text(json.dumps(schema))
    return dest


def test_kubeconform_validates_core_resources(k8s_docs, tmp_path):
    built = tmp_path / "built.yaml"
    built.write_text(yaml.safe_dump_all(k8s_docs))
    core = {(d["kind"], d["apiVersion"]) for d in k8s_docs if d["kind"] not in CRD_KINDS}
    schemas = standalone_schemas(tmp_path / "schemas", core)
    res = run(tool("kubeconform"), "-strict", "-summary", "-kubernetes-version", K8S_VERSION,
              "-schema-location", f"{schemas}/{{{{ .NormalizedKubernetesVersion }}}}-standalone{{{{ .StrictSuffix }}}}/{{{{ .ResourceKind }}}}{{{{ .KindSuffix }}}}.json",
              "-skip", ",".join(sorted(CRD_KINDS)), str(built))
    out = ok(res)
    n_core = sum(1 for d in k8s_docs if d["kind"] not in CRD_KINDS)  # two NetworkPolicies share a kind
    assert f"Valid: {n_core}" in out and "Invalid: 0" in out and "Errors: 0" in out, out
    # and it does catch a broken Deployment
    broken = [dict(d) for d in k8s_docs]
    dep = next(d for d in broken if d["kind"] == "Deployment")
    dep["spec"] = {**dep["spec"], "replicas": "three"}
    built.write_text(yaml.safe_dump_all(broken))
    assert run(*res.args[:-1], str(built)).returncode != 0


def test_k8s_structure(k8s_docs):
    for d in k8s_docs:
        assert d.get("apiVersion") and d.get("kind") and d["metadata"].get("name"), d
        if d["kind"] != "Namespace":
            assert d["metadata"]["namespace"] == "sma-monitor", d["metadata"]
    deps = {d["metadata"]["name"]: d for d in _by_kind(k8s_docs, "Deployment")}
    assert set(deps) == {"sma-monitor", "sma-monitor-inbox", "sma-monitor-mllp"}  # issue 14: the whole stack
    for d in deps.values():
        spec = d["spec"]["template"]["spec"]
        assert spec["securityContext"]["runAsNonRoot"] is True
        for c in spec["containers"]:
            assert c["securityContext"]["readOnlyRootFilesystem"] is True and c["livenessProbe"]
            assert c["readinessProbe"] and c["resources"]["limits"]["memory"]
    dep = deps["sma-monitor"]
    pod = dep["spec"]["template"]
    selector = dep["spec"]["selector"]["matchLabels"]
    assert selector.items() <= pod["metadata"]["labels"].items()
    (c,) = pod["spec"]["containers"]
    assert c["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert c["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert c["resources"]["requests"] and c["resources"]["limits"]["memory"]
    assert pod["spec"]["securityContext"]["runAsNonRoot"] is True
    assert c["securityContext"]["allowPrivilegeEscalation"] is False
    assert c["securityContext"]["readOnlyRootFilesystem"] is True
    port_names = {p["name"] for p in c["ports"]}
    assert {r["configMapRef"]["name"] for r in c["envFrom"]} == {d["metadata"]["name"] for d in _by_kind(k8s_docs, "ConfigMap")}
    cm = _by_kind(k8s_docs, "ConfigMap")[0]["data"]
    assert cm["KAFKA_SECURITY_PROTOCOL"] in {"SSL", "SASL_SSL", "SASL_PLAINTEXT", "PLAINTEXT"}
    assert cm["WEB_HOST"] == "0.0.0.0"
    assert any(e["name"] == "KAFKA_SASL_PASSWORD" and "secretKeyRef" in e["valueFrom"] for e in c["env"])
    assert not any(k.endswith("PASSWORD") for k in cm), "secrets belong in a Secret"
    # Service, ServiceMonitor and PDB select the pods
    svc = next(d for d in _by_kind(k8s_docs, "Service") if d["metadata"]["name"] == "sma-monitor")
    assert svc["spec"]["selector"].items() <= pod["metadata"]["labels"].items()
    assert {p["targetPort"] for p in svc["spec"]["ports"]} <= port_names
    monitors = {d["metadata"]["name"]: d for d in _by_kind(k8s_docs, "ServiceMonitor")}
    assert set(monitors) == {"sma-monitor", "sma-monitor-frontends"}
    sm = monitors["sma-monitor"]
    assert sm["spec"]["selector"]["matchLabels"].items() <= svc["metadata"]["labels"].items()
    assert sm["spec"]["endpoints"][0]["path"] == "/metrics"
    assert svc["metadata"]["labels"][sm["spec"]["jobLabel"]] == "sma-monitor"
    # issue 14: the inbox and the listener scraped on their metrics ports; job = the Service name
    # (no jobLabel), which the rules select on; the inbox is ready once its store caught up
    front = monitors["sma-monitor-frontends"]["spec"]
    assert "jobLabel" not in front and [e["port"] for e in front["endpoints"]] == ["metrics"]
    (expr,) = front["selector"]["matchExpressions"]
    services = {d["metadata"]["name"]: d for d in _by_kind(k8s_docs, "Service")}
    rules_text = RULES.read_text()
    for name in ("sma-monitor-inbox", "sma-monitor-mllp"):
        assert services[name]["metadata"]["labels"][expr["key"]] in expr["values"]
        assert "metrics" in {p["name"] for p in services[name]["spec"]["ports"]}
        assert f'job="{name}"' in rules_text
    assert services["sma-monitor"]["metadata"]["labels"][expr["key"]] not in expr["values"]
    (inbox_c,) = deps["sma-monitor-inbox"]["spec"]["template"]["spec"]["containers"]
    assert inbox_c["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert inbox_c["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert "--metrics-port" in inbox_c["args"] and {"name": "metrics", "containerPort": 9465, "protocol": "TCP"} \
        in inbox_c["ports"]
    (pdb,) = _by_kind(k8s_docs, "PodDisruptionBudget")
    assert pdb["spec"]["selector"]["matchLabels"].items() <= pod["metadata"]["labels"].items()
    # Strimzi: KRaft with a node pool
    (kafka,) = _by_kind(k8s_docs, "Kafka")
    assert kafka["metadata"]["annotations"]["strimzi.io/kraft"] == "enabled"
    assert kafka["metadata"]["annotations"]["strimzi.io/node-pools"] == "enabled"
    pools = _by_kind(k8s_docs, "KafkaNodePool")
    assert pools and all(p["metadata"]["labels"]["strimzi.io/cluster"] == kafka["metadata"]["name"] for p in pools)
    assert {"controller", "broker"} <= {r for p in pools for r in p["spec"]["roles"]}
    users = {u["metadata"]["name"]: u for u in _by_kind(k8s_docs, "KafkaUser")}
    assert all(u["spec"]["authentication"]["type"] == "scram-sha-512" for u in users.values())
    assert cm["KAFKA_SASL_USERNAME"] == "sma-monitor" and "sma-monitor" in users


def _acl_topics(user: dict, op: str) -> set[str]:
    out = set()
    for acl in user["spec"]["authorization"]["acls"]:
        res = acl["resource"]
        if res["type"] == "topic" and (op in acl["operations"] or "All" in acl["operations"]):
            out.add(res["name"] + ("*" if res.get("patternType") == "prefix" else ""))
    return out


def test_kafka_identities_are_least_privilege(k8s_docs):
    """Security review H4: one KafkaUser per component; the inbox writes alert-actions only,
    MLLP only its inputs, and only the worker writes findings, alerts, the delivery ledger
    and its changelog. No prefix grant other than the worker's own app-id prefix (a prefix
    "alert" would also grant alert-actions and alert-deliveries)."""
    users = {u["metadata"]["name"]: u for u in _by_kind(k8s_docs, "KafkaUser")}
    assert set(users) == {"sma-monitor", "sma-monitor-inbox", "sma-monitor-mllp"}
    writes = {name: _acl_topics(u, "Write") for name, u in users.items()}
    assert writes["sma-monitor-inbox"] == {"alert-actions"}
    assert writes["sma-monitor-mllp"] == {"observations", "dead-letter", "patients"}  # results, rejects, ADT records
    assert {"findings", "alerts", "alert-deliveries", "sma-monitor*", "observations"} <= writes["sma-monitor"]
    assert not {"alert-actions", "lab-results", "vital-signs", "liver-function", "treatments"} & writes["sma-monitor"]
    for name, u in users.items():
        for acl in u["spec"]["authorization"]["acls"]:
            assert "All" not in acl["operations"], (name, acl)
            if acl["resource"].get("patternType") == "prefix":
                assert name == "sma-monitor" and acl["resource"]["name"] == "sma-monitor", (name, acl)
            if acl["resource"]["type"] == "topic" and acl["resource"]["name"] == "*":
                assert set(acl["operations"]) <= {"Describe", "DescribeConfigs"}, (name, acl)
    assert _acl_topics(users["sma-monitor-mllp"], "Read") == set()
    assert _acl_topics(users["sma-monitor-inbox"], "Read") >= {"alerts"}


def test_network_policies_and_secrets(k8s_docs):
    """Security review M7/H2/H3: default-deny ingress, the worker reachable only from
    Prometheus on 6066 and talking only to DNS, Kafka over TLS and HTTPS; secrets from a Secret."""
    pols = {d["metadata"]["name"]: d["spec"] for d in _by_kind(k8s_docs, "NetworkPolicy")}
    deny = pols["default-deny-ingress"]
    assert deny["podSelector"] == {} and deny["policyTypes"] == ["Ingress"] and not deny.get("ingress")
    dep = next(d for d in _by_kind(k8s_docs, "Deployment") if d["metadata"]["name"] == "sma-monitor")
    pod_labels = dep["spec"]["template"]["metadata"]["labels"]
    # the inbox and the listener: each its own policy with ingress on its own ports only
    assert [p["port"] for r in pols["sma-monitor-inbox"]["ingress"] for p in r["ports"]] == [8443, 9465]
    # the metrics port from Prometheus only, the user-facing one from the ingress controller only
    by_port = {p["port"]: r["from"] for r in pols["sma-monitor-inbox"]["ingress"] for p in r["ports"]}
    assert by_port[9465][0]["podSelector"]["matchLabels"] == {"app.kubernetes.io/name": "prometheus"}
    assert "podSelector" not in by_port[8443][0]
    assert sorted(p["port"] for r in pols["sma-monitor-mllp"]["ingress"] for p in r["ports"]) == [2575, 9464]
    worker = pols["sma-monitor-worker"]
    assert worker["podSelector"]["matchLabels"].items() <= pod_labels.items()
    assert set(worker["policyTypes"]) == {"Ingress", "Egress"}
    (rule,) = worker["ingress"]
    assert [p["port"] for p in rule["ports"]] == [6066] and rule["from"], "no ingress from anywhere"
    egress_ports = sorted(p["port"] for r in worker["egress"] for p in r["ports"])
    assert egress_ports == [53, 53, 443, 9093]
    (kafka,) = _by_kind(k8s_docs, "Kafka")
    for listener in kafka["spec"]["kafka"]["listeners"]:
        assert listener["tls"] is True and listener["networkPolicyPeers"]
    (c,) = dep["spec"]["template"]["spec"]["containers"]
    env = {e["name"]: e for e in c["env"]}
    assert env["PSEUDONYM_SECRET"]["valueFrom"]["secretKeyRef"]["name"] == "sma-monitor-secrets"
    assert env["WEBHOOK_SECRET"]["valueFrom"]["secretKeyRef"]["optional"] is True
    cm = _by_kind(k8s_docs, "ConfigMap")[0]["data"]
    assert not any("SECRET" in k for k in cm)
    for vol in dep["spec"]["template"]["spec"]["volumes"]:
        if "emptyDir" in vol:
            assert vol["emptyDir"].get("sizeLimit"), vol  # review L8


def test_compose_binds_loopback_without_default_credentials():
    """Security review M9: every published port on 127.0.0.1, no admin/admin, no lifecycle API."""
    doc = yaml.safe_load(COMPOSE.read_text())
    published = [(name, p) for name, svc in doc["services"].items() for p in svc.get("ports", [])]
    assert published
    for name, port in published:
        assert str(port).startswith("127.0.0.1:"), (name, port)
    text = COMPOSE.read_text()
    assert "--web.enable-lifecycle" not in text
    graf = doc["services"]["grafana"]["environment"]
    assert graf["GF_SECURITY_ADMIN_PASSWORD"].startswith("${GRAFANA_ADMIN_PASSWORD:?")
    for name in ("worker-1", "worker-2"):
        svc = doc["services"][name]
        assert svc["environment"]["PSEUDONYM_SECRET"].startswith("${PSEUDONYM_SECRET:?")
        assert svc["cap_drop"] == ["ALL"] and "no-new-privileges:true" in svc["security_opt"]
        assert svc["read_only"] is True and svc["mem_limit"]


def test_a_kafka_topic_for_every_service_topic(k8s_docs):
    from monitor.settings import Settings
    from monitor.topics_admin import changelog_topic, service_topics, topic_configs

    s = Settings.model_construct()
    topics = _by_kind(k8s_docs, "KafkaTopic")
    names = {t["metadata"]["name"] for t in topics}
    assert names == {*service_topics(s), changelog_topic(s)} and "patient-ticks" not in names
    # clinical records never expire (issue 14): same retention as `monitor topics` creates
    by_name = {t["metadata"]["name"]: t["spec"]["config"] for t in topics}
    for name in ("alerts", "alert-actions", "treatments"):
        assert str(by_name[name]["retention.ms"]) == "-1", name
    for name in ("patients", "alert-deliveries", changelog_topic(s)):
        assert by_name[name]["cleanup.policy"] == "compact", name
    assert all({k: str(v) for k, v in topic_configs(s, n).items()}.items() <= {k: str(v) for k, v in c.items()}.items()
               for n, c in by_name.items())
    (kafka,) = _by_kind(k8s_docs, "Kafka")
    assert all(t["metadata"]["labels"]["strimzi.io/cluster"] == kafka["metadata"]["name"] for t in topics)


def test_prometheus_rule_equals_rules_yml(k8s_docs):
    (rule,) = _by_kind(k8s_docs, "PrometheusRule")
    assert rule["spec"]["groups"] == yaml.safe_load(RULES.read_text())["groups"]


def test_generated_k8s_files_are_fresh():
    ok(run(sys.executable, str(DEPLOY / "k8s" / "generate.py"), "--check"))


# ---- monitor.ops: consumer lag ---------------------------------------------------------

TP = namedtuple("TP", "topic partition")


class FakeConsumer:
    """The public aiokafka consumer API the lag reads: assignment() and highwater()."""

    def __init__(self, assignment, highwater):
        self._assignment = set(assignment)
        self._hw = highwater

    def assignment(self):
        return self._assignment

    def highwater(self, tp):
        return self._hw.get(tp)


def test_lag_is_log_end_minus_what_this_worker_committed():
    from monitor.kafka_batch import Positions

    a0, a1, a2, a3 = TP("lab-results", 0), TP("lab-results", 1), TP("vital-signs", 0), TP("vital-signs", 1)
    consumer = FakeConsumer(assignment=[a0, a1, a2, a3], highwater={a0: 120, a1: None, a2: 0, a3: 9})
    pos = Positions()
    pos.committed.update({a0: 100, a1: 40, TP("lab-results", 7): 5})  # partition 7 was revoked
    # a1 not fetched yet (no log end known), a3 never committed here: no figure rather than a wrong one
    assert pos.lag(consumer) == {("lab-results", 0): 20, ("vital-signs", 0): 0}
    assert TP("lab-results", 7) not in pos.committed


def test_publish_lag_removes_revoked_partitions():
    from monitor import ops
    from monitor.metrics import REGISTRY

    ops.publish_lag({("t-ops", 0): 3, ("t-ops", 1): 4})
    ops.publish_lag({("t-ops", 1): 0})
    samples = {s.labels["partition"]: s.value for m in REGISTRY.collect() if m.name == "monitor_consumer_lag_messages"
               for s in m.samples if s.labels["topic"] == "t-ops"}
    assert samples == {"1": 0}
    ops.publish_lag({})


def test_lag_timer_never_raises():
    from monitor import ops

    class Broken:
        def lag(self):
            raise RuntimeError("consumer not started")

    assert asyncio.run(ops.update_consumer_lag([Broken()])) is False


def test_faust_sensor_shares_the_service_registry_and_build_info():
    from monitor import ops
    from monitor.metrics import REGISTRY
    from monitor.settings import Settings
    from monitor.worker import build_worker

    build_worker(Settings())

    names = {m.name for m in REGISTRY.collect()}
    assert "monitor_faust_messages_received" in names and "monitor_faust_topic_partition_offset_commited" in names
    info = next(m for m in REGISTRY.collect() if m.name == "monitor_build")
    assert info.samples[0].labels["version"] == ops.build_version() != "unknown"


def test_metrics_note_lists_every_metric():
    from monitor.metrics import REGISTRY
    from monitor.settings import Settings
    from monitor.worker import build_worker

    build_worker(Settings())  # attaches faust's sensor to the registry

    doc = (DEPLOY / "METRICS.md").read_text()
    exposed = set()
    for m in REGISTRY.collect():
        exposed.add(m.name + ("_total" if m.type == "counter" else "_info" if m.type == "info" else ""))
    exposed |= _inbox_metric_names()
    missing = sorted(n for n in exposed if f"`{n}`" not in doc)
    assert not missing, f"deploy/METRICS.md misses {missing}"
    listed = set(re.findall(r"`(monitor_[a-z_]*[a-z])`", doc))
    assert listed <= exposed, f"deploy/METRICS.md lists unknown metrics {sorted(listed - exposed)}"
