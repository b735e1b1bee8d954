"""infra/k8s: every document parses and carries the fields its schema requires
(the Kubernetes and KEDA schemas' required fields, written down here since no
schema download is possible offline), and every pool has a Deployment and a
KEDA ScaledObject that agree with the registry."""
from __future__ import annotations

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

API_VERSIONS = {"Deployment": "apps/v1", "Service": "v1", "Job": "batch/v1", "ConfigMap": "v1",
                "ScaledObject": "keda.sh/v1alpha1", "PrometheusRule": "monitoring.coreos.com/v1"}


def documents() -> list[tuple[str, dict]]:
    out = []
    for path in sorted(K8S.glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc is not None:
                out.append((path.name, doc))
    return out


def of_kind(kind: str) -> dict[str, dict]:
    return {doc["metadata"]["name"]: doc for _, doc in documents() if doc["kind"] == kind}


def pools() -> list[str]:
    models = yaml.safe_load(REGISTRY.read_text())["models"]
    return sorted({m["pool"] for m in models.values()} | {DEFAULTS.training_pool, DEFAULTS.webhook_queue})


def test_every_document_has_kind_api_version_and_name():
    docs = documents()
    assert len(docs) >= 8
    for name, doc in docs:
        assert doc.get("kind") in API_VERSIONS, (name, doc.get("kind"))
        assert doc.get("apiVersion") == API_VERSIONS[doc["kind"]], name
        assert doc.get("metadata", {}).get("name"), name
        assert "namespace" not in doc["metadata"], f"{name}: keep manifests namespace-agnostic (kubectl -n)"


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
