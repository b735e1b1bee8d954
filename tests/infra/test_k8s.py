"""infra/k8s, a kustomize base: it renders (with `kubectl kustomize` where
kubectl is installed, else with the Python equivalent below), every object
carries the fields its schema requires (the Kubernetes, KEDA and Prometheus
Operator schemas' required fields, written down here since no schema download
is possible offline), every pool has a Deployment with probes and a KEDA
ScaledObject that agree with the registry, and the monitors select what they
should."""
from __future__ import annotations

import functools
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from genq.settings import Settings

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "infra" / "k8s"
REGISTRY = ROOT / "models" / "registry.yaml"
DEFAULTS = Settings.from_env({})
# Celery's warm shutdown finishes the batch in hand: the same five minutes
# docker-compose.yml gives a worker; the sender's longest POST is twice its timeout.
MODEL_WORKER_GRACE = 300
SENDER_GRACE = 2 * DEFAULTS.webhook_timeout + 1
NAMESPACE = "genq"
KUBECTL = shutil.which("kubectl")

API_VERSIONS = {"Deployment": "apps/v1", "Service": "v1", "Job": "batch/v1", "ConfigMap": "v1", "Namespace": "v1",
                "ScaledObject": "keda.sh/v1alpha1", "PrometheusRule": "monitoring.coreos.com/v1",
                "ServiceMonitor": "monitoring.coreos.com/v1", "PodMonitor": "monitoring.coreos.com/v1"}
CLUSTER_SCOPED = {"Namespace"}


def kustomization() -> dict:
    return yaml.safe_load((K8S / "kustomization.yaml").read_text())


def render_in_python() -> list[dict]:
    """What `kubectl kustomize` makes of the fields this base uses: the
    resources' documents in order, each namespaced kind put in `namespace`.
    kubectl may be missing (it is no Python package); this keeps the checks
    below running without it, and test_the_python_render_matches_kubectl keeps
    it honest where kubectl is there."""
    k = kustomization()
    out = []
    for resource in k["resources"]:
        for doc in yaml.safe_load_all((K8S / resource).read_text()):
            if doc is None:
                continue
            if "namespace" in k and doc["kind"] not in CLUSTER_SCOPED:
                doc["metadata"]["namespace"] = k["namespace"]
            out.append(doc)
    return out


@functools.cache
def render_with_kubectl() -> tuple[dict, ...]:
    out = subprocess.run([KUBECTL, "kustomize", str(K8S)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return tuple(doc for doc in yaml.safe_load_all(out.stdout) if doc is not None)


def documents() -> list[dict]:
    return list(render_with_kubectl()) if KUBECTL else render_in_python()


def test_the_kustomization_uses_only_what_the_python_render_knows_and_lists_every_file():
    k = kustomization()
    assert k["apiVersion"] == "kustomize.config.k8s.io/v1beta1" and k["kind"] == "Kustomization"
    assert set(k) <= {"apiVersion", "kind", "namespace", "resources"}, \
        f"teach render_in_python {set(k) - {'apiVersion', 'kind', 'namespace', 'resources'}}"
    assert k["namespace"] == NAMESPACE
    files = {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml"}
    assert set(k["resources"]) == files, "a manifest in infra/k8s that kustomization.yaml leaves out is never applied"


@pytest.mark.skipif(KUBECTL is None, reason="kubectl is not installed: the Python render stands in for it")
def test_the_python_render_matches_kubectl():
    def key(doc):
        return doc["kind"], doc["metadata"]["name"], doc["metadata"].get("namespace")

    assert sorted(map(key, render_with_kubectl())) == sorted(map(key, render_in_python()))


def test_every_document_has_kind_api_version_name_and_namespace():
    docs = documents()
    assert len(docs) >= 14
    for doc in docs:
        name = f"{doc.get('kind')}/{doc.get('metadata', {}).get('name')}"
        assert doc.get("kind") in API_VERSIONS, name
        assert doc.get("apiVersion") == API_VERSIONS[doc["kind"]], name
        assert doc.get("metadata", {}).get("name"), name
        if doc["kind"] in CLUSTER_SCOPED:
            assert "namespace" not in doc["metadata"], name
        else:
            assert doc["metadata"].get("namespace") == NAMESPACE, name
    assert NAMESPACE in of_kind("Namespace")


def test_the_sources_leave_the_namespace_to_the_kustomization():
    # One place decides it, so an overlay can change it.
    for path in sorted(K8S.glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc and doc.get("kind") != "Kustomization":
                assert "namespace" not in doc["metadata"], f"{path.name}: the namespace comes from kustomization.yaml"


def of_kind(kind: str) -> dict[str, dict]:
    return {doc["metadata"]["name"]: doc for doc in documents() if doc["kind"] == kind}


def pools() -> list[str]:
    models = yaml.safe_load(REGISTRY.read_text())["models"]
    return sorted({m["pool"] for m in models.values()} | {DEFAULTS.training_pool, DEFAULTS.webhook_queue})


def pod_spec_ok(where: str, template: dict) -> dict:
    spec = template["spec"]
    assert spec["containers"], where
    for c in spec["containers"]:
        assert c.get("name") and c.get("image"), where
    return spec


def test_deployments_select_their_template():
    for name, d in of_kind("Deployment").items():
        selector = d["spec"]["selector"]["matchLabels"]
        labels = d["spec"]["template"]["metadata"]["labels"]
        assert selector and selector.items() <= labels.items(), name
        pod_spec_ok(name, d["spec"]["template"])


def test_migration_job_runs_genq_migrate():
    job = of_kind("Job")["genq-migrate"]
    spec = pod_spec_ok("genq-migrate", job["spec"]["template"])
    assert spec["restartPolicy"] in ("Never", "OnFailure")
    assert spec["containers"][0]["command"] == ["genq", "migrate"]


def test_api_deployment_and_service():
    api = of_kind("Deployment")["genq-api"]
    service = of_kind("Service")["genq-api"]
    assert service["spec"]["selector"].items() <= api["spec"]["template"]["metadata"]["labels"].items()
    assert service["spec"]["ports"]
    container = api["spec"]["template"]["spec"]["containers"][0]
    assert "worker" not in container["image"], "the API never imports torch"


@pytest.mark.parametrize("pool", pools())
def test_each_pool_has_a_worker_deployment_and_a_redis_list_scaler(pool):
    deployment = of_kind("Deployment")[f"genq-worker-{pool}"]
    pod = pod_spec_ok(pool, deployment["spec"]["template"])
    worker = pod["containers"][0]
    assert worker["command"][:4] == ["genq", "worker", "--pool", pool]
    requests = (worker.get("resources") or {}).get("requests") or {}
    if pool.startswith("gpu-"):
        assert int(requests.get("nvidia.com/gpu", 0)) >= 1, f"{pool} runs models on a GPU"
        assert int(worker["resources"]["limits"]["nvidia.com/gpu"]) >= 1, "extended resources need a limit too"
    if pool == DEFAULTS.webhook_queue:
        assert "nvidia.com/gpu" not in requests and "worker" not in worker["image"]
        assert pod["terminationGracePeriodSeconds"] >= SENDER_GRACE
    else:
        assert pod["terminationGracePeriodSeconds"] >= MODEL_WORKER_GRACE

    scaled = of_kind("ScaledObject")[f"genq-worker-{pool}"]
    spec = scaled["spec"]
    assert spec["scaleTargetRef"]["name"] == deployment["metadata"]["name"]
    assert 0 <= spec.get("minReplicaCount", 0) <= spec["maxReplicaCount"]
    assert spec["triggers"]
    for trigger in spec["triggers"]:
        assert trigger["type"] == "redis"
        meta = trigger["metadata"]
        assert meta["listName"] == pool, "Celery's Redis transport keeps a queue as a list of its own name"
        assert int(meta["listLength"]) >= 1
        assert meta.get("address") or meta.get("addressFromEnv") or meta.get("host")
        if "addressFromEnv" in meta:
            # KEDA resolves it from the target container's environment.
            config = of_kind("ConfigMap")["genq-config"]["data"]
            assert meta["addressFromEnv"] in config or any(e["name"] == meta["addressFromEnv"] for e in worker.get("env", []))
    if pool == DEFAULTS.webhook_queue:
        assert spec["minReplicaCount"] >= 1, "the sender's sweep rings due retries; at zero they would wait"


def test_no_stray_pools():
    deployed = {n.removeprefix("genq-worker-") for n in of_kind("Deployment") if n.startswith("genq-worker-")}
    assert deployed == set(pools())
    assert {n.removeprefix("genq-worker-") for n in of_kind("ScaledObject")} == set(pools())


def test_config_names_only_known_settings():
    from genq.settings import unknown

    assert not unknown(of_kind("ConfigMap")["genq-config"]["data"])


PROBES = ("startupProbe", "readinessProbe", "livenessProbe")


@pytest.mark.parametrize("pool", pools())
def test_every_worker_has_probes_on_its_metrics_port(pool):
    worker = of_kind("Deployment")[f"genq-worker-{pool}"]["spec"]["template"]["spec"]["containers"][0]
    ports = {p["name"]: p["containerPort"] for p in worker.get("ports", [])}
    config = of_kind("ConfigMap")["genq-config"]["data"]
    assert ports.get("metrics") == int(config["GENQ_METRICS_PORT"]), "the worker serves /metrics on GENQ_METRICS_PORT"
    for probe in PROBES:
        check = worker.get(probe, {}).get("httpGet")
        assert check and check["path"] == "/metrics" and check["port"] in ("metrics", ports["metrics"]), probe


def test_the_service_monitor_selects_the_api_service_by_a_port_it_has():
    monitor = of_kind("ServiceMonitor")["genq-api"]["spec"]
    service = of_kind("Service")["genq-api"]
    assert monitor["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    port_names = {p["name"] for p in service["spec"]["ports"]}
    assert all(e["port"] in port_names and e["path"] == "/metrics" for e in monitor["endpoints"])


def selects(selector: dict, labels: dict) -> bool:
    """A label selector's matchLabels and matchExpressions (In, NotIn, Exists, DoesNotExist)."""
    if not selector.get("matchLabels", {}).items() <= labels.items():
        return False
    for e in selector.get("matchExpressions", []):
        present, value = e["key"] in labels, labels.get(e["key"])
        ok = {"Exists": present, "DoesNotExist": not present, "In": present and value in e.get("values", []),
              "NotIn": not present or value not in e.get("values", [])}[e["operator"]]
        if not ok:
            return False
    return True


def test_the_pod_monitor_scrapes_every_worker_pod_and_nothing_else():
    monitor = of_kind("PodMonitor")["genq-workers"]["spec"]
    endpoints = monitor["podMetricsEndpoints"]
    for name, deployment in of_kind("Deployment").items():
        template = deployment["spec"]["template"]
        selected = selects(monitor["selector"], template["metadata"]["labels"])
        assert selected == name.startswith("genq-worker-"), name
        if selected:
            ports = {p.get("name") for c in template["spec"]["containers"] for p in c.get("ports", [])}
            assert all(e["port"] in ports for e in endpoints), f"{name} has no port {[e['port'] for e in endpoints]}"


def test_the_selector_check_can_refuse():
    assert not selects({"matchExpressions": [{"key": "genq/pool", "operator": "Exists"}]}, {"a": "b"})
    assert not selects({"matchLabels": {"a": "c"}}, {"a": "b"})


def test_the_rules_are_in_the_base():
    assert of_kind("PrometheusRule")["genq"]["spec"]["groups"]
