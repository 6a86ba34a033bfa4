"""The Kubernetes manifests stay in step with the code they deploy, and keep it locked down.

No cluster is needed: the manifests are parsed as YAML, and the NetworkPolicies are evaluated
here with Kubernetes' selector and policy semantics (a pod selected by any policy of a
direction is isolated in that direction; what any of those policies allows is allowed).
Pod labels, ports and Secret references are read from the manifests themselves.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml

from libs.catalog import load_catalog
from libs.config import DEFAULT_CATALOG, DEFAULT_ROUTER_HTTP_PORT, REPO_ROOT
from libs.health import LIVENESS

K8S = REPO_ROOT / "deploy" / "k8s"
NAMESPACE = "shepherd"
SECRET_TEMPLATE = "secret.example.yaml"
NOT_RESOURCES = {"catalog.yaml", "kustomization.yaml", SECRET_TEMPLATE}
SERVICES = ("router", "scheduler", "cache", "billing")
WORKLOAD_KINDS = {"Deployment", "StatefulSet", "DaemonSet", "Job", "CronJob"}

# The health names that follow a service's readiness (libs/health.py).
READINESS_NAMES = {
    service: {"", f"shepherd.{service}.v1.{service.capitalize()}Service"} for service in SERVICES
}

INTERNAL_TOKEN = "SHEPHERD_INTERNAL_TOKEN"
ADMIN_KEYS = "SHEPHERD_ADMIN_KEYS"
HOSTED_API_KEY = "SHEPHERD_HOSTED_API_KEY"
REDIS_PASSWORD = "REDIS_PASSWORD"
# libs/credentials.py refuses a token or admin key shorter than this.
MIN_SECRET_CHARS = 16

# Which secret values each workload may hold (least privilege): the scheduler replicas share
# their state through Redis (scale-out); Triton and Jaeger get nothing.
SECRET_KEYS_BY_WORKLOAD = {
    "router": {INTERNAL_TOKEN, REDIS_PASSWORD},
    "scheduler": {INTERNAL_TOKEN, ADMIN_KEYS, HOSTED_API_KEY, REDIS_PASSWORD},
    "cache": {INTERNAL_TOKEN, REDIS_PASSWORD},
    "billing": {INTERNAL_TOKEN, ADMIN_KEYS, REDIS_PASSWORD},
    "redis": {REDIS_PASSWORD},
    "triton": set(),
    "jaeger": set(),
}
REDIS_USERS = {name for name, keys in SECRET_KEYS_BY_WORKLOAD.items() if REDIS_PASSWORD in keys}

# Every connection the mesh makes, as (caller, callee, callee's container port name). Anything
# not listed must be refused. "operator" is a pod in the namespace labelled as an operator
# tool; "outside" is a pod in another namespace (it even carries the router's labels).
OPERATOR_LABELS = {"shepherd.io/operator": "true"}
# Prometheus as kube-prometheus and most charts run it: its own namespace, its name label.
PROMETHEUS = ("monitoring", {"app.kubernetes.io/name": "prometheus"})
METRICS_PORTS = {"router": 9461, "scheduler": 9462, "cache": 9463, "billing": 9464}
EXPECTED_CALLS = {
    ("outside", "router", "grpc"),
    ("outside", "router", "http"),  # the OpenAI-compatible HTTP edge
    ("router", "scheduler", "grpc"),
    ("router", "cache", "grpc"),
    ("router", "billing", "grpc"),
    ("scheduler", "billing", "grpc"),  # RecordPoolUsage
    ("scheduler", "redis", "redis"),  # scale-out: membership, node slots, leases, claims
    ("scheduler", "scheduler", "grpc"),  # EnsureLoaded to the pool's placement leader
    ("router", "redis", "redis"),
    ("cache", "redis", "redis"),
    ("billing", "redis", "redis"),
    ("scheduler", "triton", "grpc"),
    ("scheduler", "triton", "metrics"),
    ("operator", "billing", "grpc"),
    *((service, "jaeger", "otlp-grpc") for service in SERVICES),
    ("triton", "jaeger", "otlp-http"),
    *(("prometheus", target, "metrics") for target in (*SERVICES, "triton")),
    # The public API (gRPC and HTTP) takes anyone off the namespace, Prometheus included.
    ("prometheus", "router", "grpc"),
    ("prometheus", "router", "http"),
}


# --- loading ---------------------------------------------------------------------------------


def _load(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def _kustomization() -> dict[str, Any]:
    return yaml.safe_load((K8S / "kustomization.yaml").read_text())


@functools.cache
def _applied() -> list[dict[str, Any]]:
    """Every object `kubectl apply -k deploy/k8s` creates from files (not the generated ones).

    Cached: parsed once per run, and never modified by the tests.
    """
    return [doc for name in _kustomization()["resources"] for doc in _load(K8S / name)]


def _pod_spec(doc: dict[str, Any]) -> dict[str, Any]:
    spec = doc["spec"]
    if doc["kind"] == "CronJob":
        spec = spec["jobTemplate"]["spec"]
    return spec["template"]["spec"]


def _workloads() -> dict[str, dict[str, Any]]:
    return {d["metadata"]["name"]: d for d in _applied() if d["kind"] in WORKLOAD_KINDS}


def _containers(workload: dict[str, Any]) -> list[dict[str, Any]]:
    spec = _pod_spec(workload)
    return [*spec.get("initContainers", []), *spec["containers"]]


def _main_container(name: str) -> dict[str, Any]:
    (container,) = [c for c in _pod_spec(_workloads()[name])["containers"] if c["name"] == name]
    return container


def _env(name: str) -> dict[str, dict[str, Any]]:
    return {e["name"]: e for e in _main_container(name).get("env", [])}


def _secret_ref(entry: dict[str, Any]) -> dict[str, Any] | None:
    return entry.get("valueFrom", {}).get("secretKeyRef")


def _configmap_data() -> dict[str, str]:
    data: dict[str, str] = {}
    for doc in _applied():
        if doc["kind"] == "ConfigMap":
            data.update(doc.get("data", {}))
    return data


def _redis_secret_ref() -> tuple[str, str]:
    """The Secret and key Redis takes its password from; its clients must use the same."""
    ref = _secret_ref(_env("redis")[REDIS_PASSWORD])
    assert ref is not None, "redis must read REDIS_PASSWORD from a Secret"
    return ref["name"], ref["key"]


# --- a small NetworkPolicy evaluator ---------------------------------------------------------


@dataclass(frozen=True)
class Pod:
    """A pod that may open or receive connections; namespace None is an address off-cluster."""

    name: str
    namespace: str | None
    labels: Mapping[str, str]
    ports: Mapping[str, tuple[int, str]] = field(default_factory=dict)  # name -> (port, proto)


def _selects(selector: Mapping[str, Any], labels: Mapping[str, str]) -> bool:
    """Kubernetes label-selector semantics; the empty selector selects everything."""
    if any(labels.get(k) != v for k, v in (selector.get("matchLabels") or {}).items()):
        return False
    for expression in selector.get("matchExpressions") or []:
        key, operator = expression["key"], expression["operator"]
        values = expression.get("values") or []
        present = key in labels
        ok = {
            "In": present and labels.get(key) in values,
            "NotIn": not present or labels.get(key) not in values,
            "Exists": present,
            "DoesNotExist": not present,
        }[operator]
        if not ok:
            return False
    return True


@functools.cache
def _workload_pods() -> dict[str, Pod]:
    pods = {}
    for name, workload in _workloads().items():
        ports = {
            p["name"]: (p["containerPort"], p.get("protocol", "TCP"))
            for c in _pod_spec(workload)["containers"]
            for p in c.get("ports", [])
        }
        labels = workload["spec"]["template"]["metadata"]["labels"]
        pods[name] = Pod(name, NAMESPACE, labels, ports)
    return pods


def _sources() -> dict[str, Pod]:
    router_labels = _workload_pods()["router"].labels
    return {
        **_workload_pods(),
        "operator": Pod("operator", NAMESPACE, OPERATOR_LABELS),
        "outside": Pod("outside", "elsewhere", router_labels),
        "prometheus": Pod("prometheus", *PROMETHEUS),
        # Prometheus' label, in the mesh's namespace: not the monitoring Prometheus.
        "impostor": Pod("impostor", NAMESPACE, PROMETHEUS[1]),
    }


INTERNET = Pod("internet", None, {}, {"https": (443, "TCP")})
CLUSTER_DNS = Pod(
    "kube-dns", "kube-system", {"k8s-app": "kube-dns"}, {"dns": (53, "UDP"), "dns-tcp": (53, "TCP")}
)


@functools.cache
def _policies() -> list[dict[str, Any]]:
    return [d for d in _applied() if d["kind"] == "NetworkPolicy"]


def _policy_types(policy: dict[str, Any]) -> list[str]:
    spec = policy["spec"]
    return spec.get("policyTypes") or ["Ingress", *(["Egress"] if "egress" in spec else [])]


def _peer_matches(peer: Mapping[str, Any], pod: Pod) -> bool:
    if "ipBlock" in peer:
        return True  # conservatively: an address range may contain any pod, and the internet
    if pod.namespace is None:
        return False
    namespace_selector = peer.get("namespaceSelector")
    if namespace_selector is None:
        if pod.namespace != NAMESPACE:
            return False
    elif not _selects(namespace_selector, {"kubernetes.io/metadata.name": pod.namespace}):
        return False
    pod_selector = peer.get("podSelector")
    return pod_selector is None or _selects(pod_selector, pod.labels)


def _port_matches(rule: Mapping[str, Any], destination: Pod, port_name: str) -> bool:
    number, protocol = destination.ports[port_name]
    ports = rule.get("ports")
    if not ports:
        return True
    for allowed in ports:
        if allowed.get("protocol", "TCP") != protocol:
            continue
        value = allowed.get("port")
        if value is None or value == port_name:
            return True
        if isinstance(value, int) and value <= number <= allowed.get("endPort", value):
            return True
    return False


def _allowed(direction: str, subject: Pod, peer: Pod, destination: Pod, port_name: str) -> bool:
    """Whether the policies on `subject` let it receive from / send to `peer`."""
    if subject.namespace != NAMESPACE:
        return True  # other namespaces' policies are not ours to check
    rules_key, peers_key = ("ingress", "from") if direction == "Ingress" else ("egress", "to")
    selecting = [
        p
        for p in _policies()
        if direction in _policy_types(p) and _selects(p["spec"]["podSelector"], subject.labels)
    ]
    if not selecting:
        return True
    for policy in selecting:
        for rule in policy["spec"].get(rules_key) or []:
            peers = rule.get(peers_key)
            if (not peers or any(_peer_matches(x, peer) for x in peers)) and _port_matches(
                rule, destination, port_name
            ):
                return True
    return False


def _can_connect(source: Pod, destination: Pod, port_name: str) -> bool:
    return _allowed("Egress", source, destination, destination, port_name) and _allowed(
        "Ingress", destination, source, destination, port_name
    )


def _possible_calls() -> Iterator[tuple[str, str, str]]:
    """Every (caller, callee, port name) the policies let through, over all sources and ports."""
    for source_name, source in _sources().items():
        for destination_name, destination in _workload_pods().items():
            for port_name in destination.ports:
                if _can_connect(source, destination, port_name):
                    yield source_name, destination_name, port_name


# --- the tests -------------------------------------------------------------------------------


def test_cluster_catalog_is_the_shipped_catalog() -> None:
    # Kustomize cannot read files outside deploy/k8s, so the cluster has a copy; it must not drift.
    assert load_catalog(K8S / "catalog.yaml", env={}) == load_catalog(DEFAULT_CATALOG, env={})


def test_every_manifest_is_valid_yaml_with_kinds() -> None:
    files = sorted(K8S.glob("*.yaml"))
    assert files
    for path in files:
        documents = _load(path)
        assert documents, path
        if path.name not in {"catalog.yaml", "kustomization.yaml"}:
            assert all("kind" in d and "metadata" in d for d in documents), path


def test_kustomization_applies_every_manifest_but_the_secret_template() -> None:
    resources = _kustomization()["resources"]
    assert len(resources) == len(set(resources))
    assert set(resources) == {p.name for p in K8S.glob("*.yaml")} - NOT_RESOURCES
    # Real secrets are created by hand; a committed Secret would be re-applied over them.
    assert not [d for d in _applied() if d["kind"] == "Secret"]


def test_the_services_and_their_peers_are_all_deployed() -> None:
    assert set(_workloads()) == set(SECRET_KEYS_BY_WORKLOAD)


@pytest.mark.parametrize("service", SERVICES)
def test_every_service_gets_the_internal_token_from_a_secret(service: str) -> None:
    entry = _env(service).get(INTERNAL_TOKEN)
    assert entry is not None, f"{service} has no {INTERNAL_TOKEN}"
    assert "value" not in entry
    ref = _secret_ref(entry)
    assert ref is not None and ref["key"] == INTERNAL_TOKEN
    assert not ref.get("optional", False), "a missing token must stop the pod, not disable auth"
    assert INTERNAL_TOKEN not in _configmap_data()


def test_all_services_share_one_token_secret() -> None:
    refs = {(r["name"], r["key"]) for s in SERVICES if (r := _secret_ref(_env(s)[INTERNAL_TOKEN]))}
    assert len(refs) == 1


@pytest.mark.parametrize("workload", sorted(SECRET_KEYS_BY_WORKLOAD))
def test_secrets_reach_only_the_workloads_that_need_them(workload: str) -> None:
    keys = set()
    for container in _containers(_workloads()[workload]):
        assert not [s for s in container.get("envFrom", []) if "secretRef" in s], (
            f"{workload}: envFrom a Secret hands over every key in it"
        )
        for entry in container.get("env", []):
            ref = _secret_ref(entry)
            if ref is not None:
                keys.add(ref["key"])
    volumes = _pod_spec(_workloads()[workload]).get("volumes", [])
    assert not [v for v in volumes if "secret" in v or "projected" in v]
    assert keys == SECRET_KEYS_BY_WORKLOAD[workload]


def test_admin_keys_are_required_where_they_are_read() -> None:
    for service in ("scheduler", "billing"):
        ref = _secret_ref(_env(service)[ADMIN_KEYS])
        assert ref is not None and not ref.get("optional", False)


def test_redis_url_is_built_from_the_secret_and_holds_no_literal_password() -> None:
    # envFrom values are never $(VAR)-expanded, so a ConfigMap cannot carry a safe REDIS_URL.
    assert "REDIS_URL" not in _configmap_data()
    redis_service = next(
        d for d in _applied() if d["kind"] == "Service" and d["metadata"]["name"] == "redis"
    )
    redis_port = _workload_pods()["redis"].ports["redis"][0]
    setters = set()
    for name, workload in _workloads().items():
        for container in _containers(workload):
            env = container.get("env", [])
            names = [e["name"] for e in env]
            for index, entry in enumerate(env):
                if entry["name"] != "REDIS_URL":
                    continue
                setters.add(name)
                url = urlsplit(entry["value"])
                match = re.fullmatch(r"\$\((\w+)\)", url.password or "")
                assert match, f"{name}: REDIS_URL must take its password from $(VAR), not a literal"
                variable = match.group(1)
                # $(VAR) expands only variables defined earlier in the same list.
                assert variable in names[:index], f"{name}: {variable} must precede REDIS_URL"
                ref = _secret_ref(env[names.index(variable)])
                assert ref is not None, f"{name}: {variable} must come from a Secret"
                assert (ref["name"], ref["key"]) == _redis_secret_ref()
                assert url.hostname == redis_service["metadata"]["name"]
                assert url.port == redis_port
    assert setters == REDIS_USERS - {"redis"}


def test_redis_requires_the_password_from_the_secret() -> None:
    container = _main_container("redis")
    secret_vars = {
        e["name"]
        for e in container.get("env", [])
        if (ref := _secret_ref(e)) and (ref["name"], ref["key"]) == _redis_secret_ref()
    }
    start = " ".join([*container.get("command", []), *container.get("args", [])])
    # `--requirepass $(VAR)` (expanded by Kubernetes) or a shell's `requirepass "$VAR"`.
    used = re.findall(r"requirepass\s+\"?\$\(?(\w+)\)?", start)
    assert used, "redis must start with requirepass"
    assert set(used) <= secret_vars


@pytest.mark.parametrize("service", SERVICES)
def test_probes_ask_liveness_to_restart_and_readiness_to_route(service: str) -> None:
    # libs/health.py: `liveness` is the process alone; "" and the service's full name follow
    # its dependencies and shutdown. A liveness probe on readiness would restart every pod
    # whenever Redis is down; a readiness probe on liveness would route calls to a pod that
    # cannot serve them, or is draining.
    container = _main_container(service)
    port = next(p["containerPort"] for p in container["ports"] if p["name"] == "grpc")
    for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
        assert container[probe]["grpc"]["port"] == port, (service, probe)
    assert container["livenessProbe"]["grpc"].get("service") == LIVENESS
    assert container["startupProbe"]["grpc"].get("service") == LIVENESS
    assert container["readinessProbe"]["grpc"].get("service", "") in READINESS_NAMES[service]


def test_redis_probes_authenticate_and_check_the_answer() -> None:
    container = _main_container("redis")
    auth = _secret_ref(_env("redis").get("REDISCLI_AUTH", {}))
    for probe in ("readinessProbe", "livenessProbe"):
        command = " ".join(container[probe]["exec"]["command"])
        assert "redis-cli" in command
        uses_flag = re.search(r"-a\s+\"?\$\(?REDIS_PASSWORD", command) is not None
        assert uses_flag or (auth and (auth["name"], auth["key"]) == _redis_secret_ref()), probe
    # redis-cli exits 0 on NOAUTH: readiness must look at the reply itself.
    assert "PONG" in " ".join(container["readinessProbe"]["exec"]["command"])


def test_secret_template_defines_every_key_the_manifests_reference() -> None:
    template: dict[str, set[str]] = {}
    for doc in _load(K8S / SECRET_TEMPLATE):
        assert doc["kind"] == "Secret"
        assert doc["metadata"]["namespace"] == NAMESPACE
        keys = {*doc.get("stringData", {}), *doc.get("data", {})}
        template.setdefault(doc["metadata"]["name"], set()).update(keys)
    referenced = {
        (ref["name"], ref["key"])
        for workload in _workloads().values()
        for container in _containers(workload)
        for entry in container.get("env", [])
        if (ref := _secret_ref(entry))
    }
    assert referenced
    missing = {(name, key) for name, key in referenced if key not in template.get(name, set())}
    assert not missing


def test_secret_template_placeholders_fail_closed() -> None:
    values = {
        key: value
        for doc in _load(K8S / SECRET_TEMPLATE)
        for key, value in doc.get("stringData", {}).items()
    }
    # Too short for libs/credentials.py, so a service given the placeholder refuses to start.
    for key in (INTERNAL_TOKEN, ADMIN_KEYS):
        assert all(len(v) < MIN_SECRET_CHARS for v in values[key].split(","))
    # Two words are not a valid `requirepass` line, so Redis refuses to start.
    assert " " in values[REDIS_PASSWORD]


def test_a_default_deny_policy_isolates_every_pod() -> None:
    for direction, rules_key in (("Ingress", "ingress"), ("Egress", "egress")):
        assert [
            p
            for p in _policies()
            if p["spec"]["podSelector"] == {}
            and direction in _policy_types(p)
            and not p["spec"].get(rules_key)
        ], f"no default-deny {direction} policy"


def test_every_policy_selector_matches_real_pods() -> None:
    # A typo in a label would silently allow nothing (or isolate nothing).
    pods = [*_workload_pods().values(), _sources()["operator"]]
    for policy in _policies():
        selectors = [policy["spec"]["podSelector"]]
        for rule in [*policy["spec"].get("ingress", []), *policy["spec"].get("egress", [])]:
            for peer in [*rule.get("from", []), *rule.get("to", [])]:
                if "podSelector" in peer and "namespaceSelector" not in peer:
                    selectors.append(peer["podSelector"])
        for selector in selectors:
            assert any(_selects(selector, pod.labels) for pod in pods), (
                policy["metadata"]["name"],
                selector,
            )


@pytest.mark.parametrize("target", ["scheduler", "cache", "billing", "redis", "triton", "jaeger"])
def test_internal_targets_accept_only_their_callers(target: str) -> None:
    # Ingress alone must hold, even where egress policies are dropped.
    pod = _workload_pods()[target]
    admitted = {
        (source, port)
        for source, candidate in {**_sources(), "internet": INTERNET}.items()
        for port in pod.ports
        if _allowed("Ingress", pod, candidate, pod, port)
    }
    assert admitted == {
        (caller, port) for caller, callee, port in EXPECTED_CALLS if callee == target
    }
    # ...and every `from` is a plain pod selector of this namespace.
    for policy in _policies():
        if "Ingress" in _policy_types(policy) and _selects(
            policy["spec"]["podSelector"], pod.labels
        ):
            for rule in policy["spec"].get("ingress", []):
                assert rule.get("from"), f"{policy['metadata']['name']}: open to everyone"
                assert rule.get("ports"), f"{policy['metadata']['name']}: open on every port"
                for peer in rule["from"]:
                    # A pod of this namespace, or Prometheus' pods in its own namespace (both
                    # selectors in one peer: pods of that namespace only).
                    assert set(peer) in ({"podSelector"}, {"podSelector", "namespaceSelector"})
                    assert peer["podSelector"], policy["metadata"]["name"]


# The router's public ports: gRPC and the OpenAI-compatible HTTP edge.
API_PORTS = {"grpc", "http"}


def test_router_accepts_anyone_on_its_api_ports_only() -> None:
    router = _workload_pods()["router"]
    assert set(router.ports) >= API_PORTS
    for port in router.ports:
        assert _allowed("Ingress", router, INTERNET, router, port) == (port in API_PORTS)


def test_the_router_service_and_container_agree_on_the_http_port() -> None:
    # The container port is the router's default (SHEPHERD_ROUTER_HTTP_PORT is not set).
    assert _workload_pods()["router"].ports["http"] == (DEFAULT_ROUTER_HTTP_PORT, "TCP")
    service = next(
        doc
        for doc in _load(K8S / "router.yaml")
        if doc["kind"] == "Service" and doc["metadata"]["name"] == "router"
    )
    ports = {p["name"]: p for p in service["spec"]["ports"]}
    assert (
        ports["http"]["targetPort"] == "http" and ports["http"]["port"] == DEFAULT_ROUTER_HTTP_PORT
    )


def test_only_the_expected_connections_are_possible() -> None:
    # Ingress and egress together: each call the mesh makes gets through, nothing else does.
    assert set(_possible_calls()) == EXPECTED_CALLS


def test_every_pod_can_resolve_names() -> None:
    for source in [*_workload_pods().values(), _sources()["operator"]]:
        for port in CLUSTER_DNS.ports:
            assert _allowed("Egress", source, CLUSTER_DNS, CLUSTER_DNS, port), (source.name, port)


def test_only_the_scheduler_reaches_the_internet() -> None:
    # The hosted API; nothing else in the namespace may open connections off-cluster.
    reach = {
        source.name
        for source in [*_workload_pods().values(), _sources()["operator"]]
        if _allowed("Egress", source, INTERNET, INTERNET, "https")
    }
    assert reach == {"scheduler"}


@pytest.mark.parametrize("service", SERVICES)
def test_every_service_serves_metrics_where_prometheus_is_told_to_scrape(service: str) -> None:
    pod = _workload_pods()[service]
    port = METRICS_PORTS[service]
    assert pod.ports["metrics"] == (port, "TCP")
    annotations = _workloads()[service]["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert annotations["prometheus.io/port"] == str(port)
    assert annotations["prometheus.io/path"] == "/metrics"
    # The process listens where the pod says: its variable, from the shared ConfigMap.
    assert _configmap_data()[f"SHEPHERD_{service.upper()}_METRICS_PORT"] == str(port)


def test_triton_traces_into_jaeger_over_otlp_http() -> None:
    args = _main_container("triton")["args"]
    assert "--trace-config=mode=opentelemetry" in args
    assert "--trace-config=rate=0" in args  # only requests that carry a trace context
    (url,) = [
        a.split("url=", 1)[1] for a in args if a.startswith("--trace-config=opentelemetry,url=")
    ]
    endpoint = urlsplit(url)
    assert (endpoint.hostname, endpoint.path) == ("jaeger", "/v1/traces")
    assert endpoint.port == _workload_pods()["jaeger"].ports["otlp-http"][0]
    annotations = _workloads()["triton"]["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/port"] == str(_workload_pods()["triton"].ports["metrics"][0])
