"""The deployment files under deploy/: they parse, the dashboard and the alerts name only
metrics (and labels) flashgate exports, the alert rules pass promtool, the configs pass
``flashgate check``, and the Dockerfile, compose file and Kubernetes objects agree with
each other and with the gateway (ports, probes, user, shutdown grace)."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tomllib
from collections.abc import Iterator
from functools import cache
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml
from prometheus_client.metrics import MetricWrapperBase

from gateway import stats as metrics
from gateway.core.publisher import CampaignFigures, RedisFigures
from gateway.process.serve import DRAIN_SECONDS
from gateway.process.supervisor import STOP_GRACE
from limiter.waiting import View

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
PROMETHEUS = DEPLOY / "prometheus"
KUBERNETES = DEPLOY / "kubernetes"
DASHBOARD = DEPLOY / "grafana" / "dashboards" / "flashgate.json"
COMPOSE_CONFIG = DEPLOY / "flashgate.compose.yaml"

PROMTOOL = shutil.which("promtool")
needs_promtool = pytest.mark.skipif(
    PROMTOOL is None,
    reason="promtool is not on PATH (Debian: apt-get install prometheus; or a Prometheus release)",
)

#: Sample names per metric type, from the name prometheus-client gives the family.
SUFFIXES = {
    "counter": ("_total", "_created"),
    "histogram": ("_bucket", "_count", "_sum", "_created"),
    "gauge": ("",),
}
#: Labels Prometheus attaches to every scraped series (scrape config and relabelling).
TARGET_LABELS = frozenset({"job", "instance", "namespace", "pod"})

_METRIC = re.compile(r"\bflashgate_[a-z0-9_]+\b")
_SELECTOR = re.compile(r"\b(flashgate_[a-z0-9_]+)\s*\{([^}]*)\}")
_MATCHER = re.compile(r"([A-Za-z_][A-Za-z0-9_]*)\s*(?:=~|!~|!=|=)")
_GROUPING = re.compile(r"\b(?:by|without)\s*\(([^)]*)\)")


@cache
def exported() -> dict[str, frozenset[str]]:
    """Every sample name flashgate exports, with its label names: read from the metric
    objects of gateway.stats and from what RedisFigures yields."""
    found: dict[str, frozenset[str]] = {}
    for value in vars(metrics).values():
        if not isinstance(value, MetricWrapperBase):
            continue
        (family,) = value.describe()
        assert family.type in SUFFIXES, f"{family.name}: a {family.type}; teach SUFFIXES"
        labels = frozenset(value._labelnames)
        for suffix in SUFFIXES[family.type]:
            found[family.name + suffix] = labels | ({"le"} if suffix == "_bucket" else set())
    figures = RedisFigures()
    figures.campaigns = [CampaignFigures("c", {"available": 1}, {"reserved": 1}, 0, 0)]
    figures.processes = 1
    figures.rooms = [("c", View(now_ms=0, length=1))]
    for family in figures.collect():
        assert family.samples, f"{family.name} yielded no sample to learn its labels from"
        for sample in family.samples:
            found[sample.name] = found.get(sample.name, frozenset()) | frozenset(sample.labels)
    return found


def families() -> set[str]:
    """What a panel must show: each histogram by its base name, every other sample."""
    names = exported().keys()
    histograms = {n.removesuffix("_bucket") for n in names if n.endswith("_bucket")}
    parts = {h + suffix for h in histograms for suffix in ("_bucket", "_count", "_sum")}
    return histograms | {n for n in names if n not in parts and not n.endswith("_created")}


def load_yaml(path: Path) -> list[Any]:
    with path.open(encoding="utf-8") as f:
        return [doc for doc in yaml.safe_load_all(f) if doc is not None]


def one_yaml(path: Path) -> Any:
    (document,) = load_yaml(path)
    return document


def dashboard() -> dict[str, Any]:
    document: dict[str, Any] = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    return document


def dashboard_panels() -> Iterator[dict[str, Any]]:
    for panel in dashboard()["panels"]:
        yield panel
        yield from panel.get("panels", [])


def dashboard_expressions() -> list[str]:
    expressions = [t["expr"] for p in dashboard_panels() for t in p.get("targets", [])]
    for variable in dashboard()["templating"]["list"]:
        if variable["type"] == "query":
            expressions.append(variable["definition"])
    return expressions


def alert_rules() -> list[dict[str, Any]]:
    return [
        rule for group in one_yaml(PROMETHEUS / "alerts.yml")["groups"] for rule in group["rules"]
    ]


def k8s(kind: str, name: str | None = None) -> dict[str, Any]:
    matches = [
        doc
        for path in sorted(KUBERNETES.glob("*.yaml"))
        for doc in load_yaml(path)
        if doc["kind"] == kind and name in (None, doc["metadata"]["name"])
    ]
    assert len(matches) == 1, f"{len(matches)} {kind} objects named {name}"
    document: dict[str, Any] = matches[0]
    return document


def gateway_container() -> dict[str, Any]:
    (container,) = k8s("Deployment")["spec"]["template"]["spec"]["containers"]
    assert isinstance(container, dict)
    return container


def configmap_config() -> dict[str, Any]:
    config: dict[str, Any] = yaml.safe_load(k8s("ConfigMap")["data"]["flashgate.yaml"])
    return config


def run_check(path: Path, **env: str) -> subprocess.CompletedProcess[str]:
    environ = {k: v for k, v in os.environ.items() if not k.startswith("FLASHGATE_")} | env
    return subprocess.run(
        [sys.executable, "-m", "gateway", "check", "--json", "-c", str(path)],
        capture_output=True,
        text=True,
        env=environ,
        cwd=ROOT,
        timeout=60,
        check=False,
    )


def promtool(*args: str) -> subprocess.CompletedProcess[str]:
    assert PROMTOOL is not None
    return subprocess.run(
        [PROMTOOL, *args], capture_output=True, text=True, cwd=PROMETHEUS, timeout=60, check=False
    )


# ------------------------------------------------------------------------ parsing


@pytest.mark.parametrize(
    "path",
    sorted([*DEPLOY.rglob("*.yaml"), *DEPLOY.rglob("*.yml")]),
    ids=lambda p: str(p.relative_to(DEPLOY)),
)
def test_every_yaml_file_parses(path: Path) -> None:
    assert load_yaml(path), f"{path} holds no document"


def test_the_dashboard_parses_and_has_a_campaign_variable() -> None:
    document = dashboard()
    variables = {v["name"]: v for v in document["templating"]["list"]}
    assert variables["campaign"]["definition"] == "label_values(flashgate_stock_units, campaign)"
    ids = [p["id"] for p in dashboard_panels()]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    for panel in dashboard_panels():
        for target in panel.get("targets", []):
            assert target["datasource"]["uid"] == "${datasource}", panel["title"]


# ------------------------------------------------------------------------ metric names


def test_the_exported_metrics_are_found() -> None:
    """Guards the derivation the next tests rely on."""
    assert {"flashgate_requests_total", "flashgate_decision_seconds_bucket"} <= exported().keys()
    assert {"flashgate_stock_units", "flashgate_gateway_processes"} <= exported().keys()
    assert exported()["flashgate_stock_units"] == {"campaign", "state"}


@pytest.mark.parametrize("source", ["dashboard", "alerts"])
def test_expressions_use_only_exported_metrics_and_their_labels(source: str) -> None:
    expressions = (
        dashboard_expressions() if source == "dashboard" else [r["expr"] for r in alert_rules()]
    )
    assert len(expressions) >= 10
    known = exported()
    for expr in expressions:
        used = set(_METRIC.findall(expr))
        unknown = used - known.keys()
        assert not unknown, f"{expr!r} uses {sorted(unknown)}, not exported by flashgate"
        if not used:
            continue
        for name, matchers in _SELECTOR.findall(expr):
            selected = set(_MATCHER.findall(matchers)) - TARGET_LABELS
            assert selected <= known[name], f"{expr!r}: {name} has no {selected - known[name]}"
        grouped = {
            label.strip()
            for group in _GROUPING.findall(expr)
            for label in group.split(",")
            if label.strip()
        }
        allowed = TARGET_LABELS.union(*(known[name] for name in used))
        assert grouped <= allowed, f"{expr!r}: no metric here has {sorted(grouped - allowed)}"


def test_the_dashboard_shows_every_exported_metric() -> None:
    text = " ".join(dashboard_expressions())
    missing = {name for name in families() if not re.search(rf"\b{name}(_bucket)?\b", text)}
    assert not missing, f"no panel shows {sorted(missing)}"


# ------------------------------------------------------------------------ alerts


def test_every_alert_has_for_severity_and_advice() -> None:
    rules = alert_rules()
    assert len(rules) >= 8
    for rule in rules:
        assert "for" in rule, rule["alert"]
        assert rule["labels"]["severity"] in ("info", "warning", "critical"), rule["alert"]
        assert rule["annotations"]["summary"], rule["alert"]
        assert rule["annotations"]["description"], rule["alert"]
        if rule["labels"]["severity"] != "info":
            assert "docs/operations.md" in rule["annotations"]["description"], rule["alert"]


def test_every_alert_is_unit_tested() -> None:
    tests = one_yaml(PROMETHEUS / "alerts_test.yml")["tests"]
    cases = [case for test in tests for case in test["alert_rule_test"]]
    for rule in alert_rules():
        mine = [c for c in cases if c["alertname"] == rule["alert"]]
        assert any(c.get("exp_alerts") for c in mine), f"{rule['alert']}: no firing case"
        assert any(not c.get("exp_alerts") for c in mine), f"{rule['alert']}: no quiet case"


@pytest.mark.integration
@needs_promtool
def test_promtool_accepts_the_rules_and_the_config() -> None:
    for args in (("check", "rules", "alerts.yml"), ("check", "config", "prometheus.yml")):
        result = promtool(*args)
        assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.integration
@needs_promtool
def test_promtool_unit_tests_pass() -> None:
    result = promtool("test", "rules", "alerts_test.yml")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


# ------------------------------------------------------------------------ configs


@pytest.mark.integration
def test_the_compose_config_is_valid(tmp_path: Path) -> None:
    result = run_check(COMPOSE_CONFIG, FLASHGATE_ADMIN_TOKEN="a-token-for-the-test")
    assert result.returncode == 0, result.stdout + result.stderr
    summary = json.loads(result.stdout)
    assert summary["redis"] == "redis://redis:6379/0"
    assert summary["campaigns"]
    without = run_check(COMPOSE_CONFIG)
    assert without.returncode == 2
    assert "FLASHGATE_ADMIN_TOKEN" in without.stdout + without.stderr


@pytest.mark.integration
def test_the_configmap_config_is_valid(tmp_path: Path) -> None:
    path = tmp_path / "flashgate.yaml"
    path.write_text(k8s("ConfigMap")["data"]["flashgate.yaml"], encoding="utf-8")
    result = run_check(path, FLASHGATE_ADMIN_TOKEN="a-token-for-the-test")
    assert result.returncode == 0, result.stdout + result.stderr
    assert json.loads(result.stdout)["campaigns"]


def test_containers_listen_on_every_interface_at_the_exposed_ports() -> None:
    dockerfile = (DEPLOY / "Dockerfile").read_text(encoding="utf-8")
    (exposed,) = re.findall(r"^EXPOSE\s+(.+)$", dockerfile, re.M)
    for config in (one_yaml(COMPOSE_CONFIG), configmap_config()):
        assert config["gateway"]["host"] == config["admin"]["host"] == "0.0.0.0"
        assert exposed.split() == [str(config["gateway"]["port"]), str(config["admin"]["port"])]
        assert config["admin"]["token"] == "${FLASHGATE_ADMIN_TOKEN}"


# ------------------------------------------------------------------------ compose


def test_compose_references_resolve() -> None:
    compose = one_yaml(DEPLOY / "compose.yaml")
    services = compose["services"]
    gateway = services["gateway"]
    context = (DEPLOY / gateway["build"]["context"]).resolve()
    assert context == ROOT
    assert (context / gateway["build"]["dockerfile"]).is_file()
    assert gateway["environment"]["FLASHGATE_ADMIN_TOKEN"].startswith("${FLASHGATE_ADMIN_TOKEN:?")
    assert gateway["depends_on"]["redis"]["condition"] == "service_healthy"
    for service in services.values():
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("."):
                assert (DEPLOY / source).exists(), f"{source} is mounted but missing"
    mounts = {v.split(":")[1]: v.split(":")[0] for v in gateway["volumes"]}
    assert Path(DEPLOY / mounts["/etc/flashgate/flashgate.yaml"]).resolve() == COMPOSE_CONFIG
    config = one_yaml(COMPOSE_CONFIG)
    for url in (config["redis"]["url"], *(u["url"] for u in config["upstreams"].values())):
        assert urlsplit(url).hostname in services, f"{url}: no such compose service"
    scrape = one_yaml(PROMETHEUS / "prometheus.yml")["scrape_configs"]
    (job,) = [j for j in scrape if j["job_name"] == "flashgate"]
    (target,) = job["static_configs"][0]["targets"]
    assert target == f"gateway:{config['admin']['port']}"
    assert job.get("metrics_path", "/metrics") == "/metrics"


def test_grafana_provisioning_matches_the_mounts() -> None:
    grafana = one_yaml(DEPLOY / "compose.yaml")["services"]["grafana"]
    mounts = {v.split(":")[1]: v.split(":")[0] for v in grafana["volumes"]}
    provisioning = DEPLOY / "grafana" / "provisioning"
    (provider,) = one_yaml(provisioning / "dashboards" / "flashgate.yml")["providers"]
    assert (DEPLOY / mounts[provider["options"]["path"]]).resolve() == DASHBOARD.parent
    (datasource,) = one_yaml(provisioning / "datasources" / "prometheus.yml")["datasources"]
    assert urlsplit(datasource["url"]).hostname == "prometheus"
    variables = {v["name"]: v for v in dashboard()["templating"]["list"]}
    assert variables["datasource"]["current"]["value"] == datasource["uid"]


# ------------------------------------------------------------------------ Kubernetes


def _port(container: dict[str, Any], port: int | str) -> int:
    if isinstance(port, int):
        return port
    (number,) = [p["containerPort"] for p in container["ports"] if p["name"] == port]
    assert isinstance(number, int)
    return number


def test_the_deployment_probes_the_admin_port() -> None:
    container = gateway_container()
    admin_port = configmap_config()["admin"]["port"]
    probes = {
        "readinessProbe": "/readyz",
        "livenessProbe": "/healthz",
    }
    for probe, path in probes.items():
        get = container[probe]["httpGet"]
        assert get["path"] == path, probe
        assert _port(container, get["port"]) == admin_port, probe
    annotations = k8s("Deployment")["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert int(annotations["prometheus.io/port"]) == admin_port


def test_the_deployment_runs_as_non_root_on_a_read_only_root() -> None:
    pod = k8s("Deployment")["spec"]["template"]["spec"]
    container = gateway_container()
    security = pod.get("securityContext", {}) | container.get("securityContext", {})
    assert security["runAsNonRoot"] is True
    assert security["runAsUser"] != 0
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert container["securityContext"]["allowPrivilegeEscalation"] is False
    (tmp,) = [m for m in container["volumeMounts"] if m["mountPath"] == "/tmp"]
    (volume,) = [v for v in pod["volumes"] if v["name"] == tmp["name"]]
    assert "emptyDir" in volume
    dockerfile = (DEPLOY / "Dockerfile").read_text(encoding="utf-8")
    (user,) = re.findall(r"^USER\s+(\d+)", dockerfile, re.M)
    assert int(user) == security["runAsUser"]


def test_the_deployment_outlasts_the_drain() -> None:
    deployment = k8s("Deployment")
    pod = deployment["spec"]["template"]["spec"]
    command = gateway_container()["lifecycle"]["preStop"]["exec"]["command"]
    assert command[0] == "sleep"
    pre_stop = float(command[1])
    grace = pod["terminationGracePeriodSeconds"]
    assert grace > pre_stop + DRAIN_SECONDS
    assert grace > pre_stop + STOP_GRACE, "the supervisor, not the kubelet, should kill"
    assert deployment["spec"]["replicas"] >= 2


def test_the_deployment_runs_the_configmap_with_the_secret() -> None:
    container = gateway_container()
    args = container["args"]
    assert args[:3] == ["run", "-c", "/etc/flashgate/flashgate.yaml"]
    workers = int(args[args.index("--workers") + 1])
    assert workers <= int(container["resources"]["limits"]["cpu"])
    (mount,) = [m for m in container["volumeMounts"] if m["mountPath"] == "/etc/flashgate"]
    (volume,) = [
        v
        for v in k8s("Deployment")["spec"]["template"]["spec"]["volumes"]
        if v["name"] == mount["name"]
    ]
    assert volume["configMap"]["name"] == k8s("ConfigMap")["metadata"]["name"]
    env = {e["name"]: e for e in container["env"]}
    token = env["FLASHGATE_ADMIN_TOKEN"]["valueFrom"]["secretKeyRef"]
    secret = k8s("Secret")
    assert token["name"] == secret["metadata"]["name"]
    assert token["key"] in secret["stringData"]
    assert "EXAMPLE" in secret["stringData"][token["key"]]


def test_the_public_service_does_not_carry_the_admin_port() -> None:
    admin_port = configmap_config()["admin"]["port"]
    public = k8s("Service", "flashgate")
    assert [p["port"] for p in public["spec"]["ports"]] == [configmap_config()["gateway"]["port"]]
    admin = k8s("Service", "flashgate-admin")
    assert admin["spec"].get("type", "ClusterIP") == "ClusterIP"
    assert [p["port"] for p in admin["spec"]["ports"]] == [admin_port]
    labels = k8s("Deployment")["spec"]["template"]["metadata"]["labels"]
    for selector in (public["spec"]["selector"], admin["spec"]["selector"]):
        assert selector.items() <= labels.items()
    pdb = k8s("PodDisruptionBudget")
    assert pdb["spec"]["selector"]["matchLabels"].items() <= labels.items()


# ------------------------------------------------------------------------ Dockerfile


def _stages(dockerfile: str) -> list[str]:
    return re.split(r"^FROM\s", dockerfile, flags=re.M)[1:]


def test_the_dockerfile_runs_as_a_user_with_a_health_check() -> None:
    text = (DEPLOY / "Dockerfile").read_text(encoding="utf-8")
    lines = [line for line in text.splitlines() if not line.lstrip().startswith("#")]
    final = _stages("\n".join(lines))[-1]
    users = re.findall(r"^USER\s+(\S+)", final, re.M)
    assert users, "the final stage sets no USER: it would run as root"
    assert users[-1].split(":")[0] not in ("root", "0")
    assert not re.search(r"\b(gcc|build-essential|g\+\+|clang)\b", final), "a compiler"
    assert "COPY --from=builder" in final
    (healthcheck,) = re.findall(r"^HEALTHCHECK\s(?:.*\\\n)*.*", final, re.M)
    assert "http://127.0.0.1:9090/healthz" in healthcheck
    assert "urllib" in healthcheck, "slim images have no curl"
    assert re.search(r'^ENTRYPOINT \["flashgate"\]$', final, re.M)
    assert re.search(r"^STOPSIGNAL SIGTERM$", final, re.M)


def test_the_dockerfile_copies_what_the_wheel_is_built_from() -> None:
    text = (DEPLOY / "Dockerfile").read_text(encoding="utf-8")
    copied = {
        part.rstrip("/")
        for args in re.findall(r"^COPY\s+(?!--from)(.+)$", text, re.M)
        for part in args.split()[:-1]
    }
    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    wheel = project["tool"]["hatch"]["build"]["targets"]["wheel"]
    needed = {"pyproject.toml", project["project"]["readme"], *wheel["packages"]}
    needed |= set(wheel.get("force-include", {}))
    assert needed <= copied, f"not copied into the builder: {sorted(needed - copied)}"


# ------------------------------------------------------------------------ kube-prometheus-stack

PROMETHEUS_RULE = KUBERNETES / "prometheusrule.yaml"


def prometheus_rule() -> dict[str, Any]:
    """What prometheusrule.yaml must hold: alerts.yml's groups, for the operator."""
    return {
        "apiVersion": "monitoring.coreos.com/v1",
        "kind": "PrometheusRule",
        "metadata": {
            "name": "flashgate",
            "labels": {"app.kubernetes.io/name": "flashgate", "release": "kube-prometheus-stack"},
        },
        "spec": one_yaml(PROMETHEUS / "alerts.yml"),
    }


def write_prometheus_rule() -> None:
    """Regenerate prometheusrule.yaml from alerts.yml, keeping its header comment."""
    text = PROMETHEUS_RULE.read_text(encoding="utf-8")
    header = "".join(line for line in text.splitlines(True) if line.startswith("#"))
    body = yaml.safe_dump(prometheus_rule(), sort_keys=False, width=100)
    PROMETHEUS_RULE.write_text(header + body, encoding="utf-8")


def test_the_prometheus_rule_is_alerts_yml() -> None:
    assert k8s("PrometheusRule") == prometheus_rule(), "regenerate: see its header"


def test_the_service_monitor_scrapes_every_pod_on_the_admin_port() -> None:
    monitor = k8s("ServiceMonitor")
    admin = k8s("Service", "flashgate-admin")
    public = k8s("Service", "flashgate")
    selector = monitor["spec"]["selector"]["matchLabels"]
    assert selector.items() <= admin["metadata"]["labels"].items()
    (endpoint,) = monitor["spec"]["endpoints"]
    assert endpoint["path"] == "/metrics"
    assert endpoint["port"] in [p["name"] for p in admin["spec"]["ports"]]
    assert endpoint["port"] not in [p["name"] for p in public["spec"]["ports"]]
    assert (
        monitor["metadata"]["labels"]["release"]
        == k8s("PrometheusRule")["metadata"]["labels"]["release"]
    )


def test_the_network_policy_keeps_the_admin_port_inside() -> None:
    policy = k8s("NetworkPolicy")["spec"]
    labels = k8s("Deployment")["spec"]["template"]["metadata"]["labels"]
    assert policy["podSelector"]["matchLabels"].items() <= labels.items()
    assert set(policy["policyTypes"]) == {"Ingress", "Egress"}
    by_port = {rule["ports"][0]["port"]: rule for rule in policy["ingress"]}
    assert "from" not in by_port["http"], "buyers come from anywhere"
    assert by_port["admin"]["from"], "the admin port from listed peers only"
    container = gateway_container()
    named = {p["name"] for p in container["ports"]}
    assert set(by_port) <= named
    egress_ports = {p["port"] for rule in policy["egress"] for p in rule["ports"]}
    assert {53, 6379} <= egress_ports


def _anchor(heading: str) -> str:
    return re.sub(r"[^a-z0-9 -]", "", heading.lower()).strip().replace(" ", "-")


def test_every_alert_has_a_runbook_url_to_a_section_that_exists() -> None:
    operations = (ROOT / "docs" / "operations.md").read_text(encoding="utf-8")
    anchors = {_anchor(h) for h in re.findall(r"^#+ (.+)$", operations, re.M)}
    for rule in alert_rules():
        if rule["labels"]["severity"] == "info":
            continue
        url = rule["annotations"]["runbook_url"]
        path, _, anchor = url.partition("#")
        assert path == "docs/operations.md", rule["alert"]
        assert anchor in anchors, f"{rule['alert']}: no section #{anchor} in docs/operations.md"


def _summed(name: str, expr: str) -> bool:
    """Whether ``expr`` sums ``name`` directly: sum(x), sum by (l) (x), sum(x) by (l)."""
    grouping = r"(?:\s*(?:by|without)\s*\([^)]*\))?"
    return re.search(rf"\bsum\b{grouping}\s*\(\s*{name}\b", expr) is not None


def test_summing_is_told_apart() -> None:
    assert _summed("flashgate_stock_units", "sum by (campaign) (flashgate_stock_units)")
    assert _summed("flashgate_stock_units", "sum(flashgate_stock_units{state='sold'})")
    assert not _summed("flashgate_stock_units", "max by (campaign) (flashgate_stock_units)")


def test_the_redis_read_gauges_are_never_summed() -> None:
    """Every gateway reports the same Redis-read gauge: a sum() across pods multiplies it."""
    redis_read = {family.name for family in RedisFigures().collect()} - {
        "flashgate_redis_figures_up",
        "flashgate_build",
    }
    for expr in [r["expr"] for r in alert_rules()] + dashboard_expressions():
        for name in redis_read:
            assert not _summed(name, expr), expr
