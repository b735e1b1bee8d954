"""infra/grafana/dashboards/genq.json and the alert rules: every panel's and
rule's PromQL names metrics genq exports, checked against live /metrics: the API's, and a `genq worker`'s that
has run a text and an image job. Metrics only a GPU brings are read from the
collector with a stand-in CUDA. Also: the token and image counters count, and
the run-time histogram counts once per job."""
from __future__ import annotations

import json
import re
import secrets
import sys
import types
from pathlib import Path

import pytest
import requests
import yaml
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from api.app import create_app
from genq.settings import Settings
from tests.conftest import REDIS_URL, WEBHOOK_KEYS
from tests.helpers import WorkerProcess, free_port, make_key, wait_job

ROOT = Path(__file__).resolve().parents[2]
DASHBOARD = ROOT / "infra" / "grafana" / "dashboards" / "genq.json"
RULES = ROOT / "infra" / "prometheus" / "rules" / "genq.rules.yml"

# Labels Prometheus adds to every scraped series (and the Compose scrape's
# relabelled `service`); `le` is a histogram bucket's bound.
TARGET_LABELS = {"instance", "job", "service", "le"}
METRIC = re.compile(r"\b(genq_[a-z0-9_]+)\b\s*(\{[^}]*\})?")
MATCHER = re.compile(r"([a-zA-Z_][a-zA-Z0-9_]*)\s*(?:=~|!~|!=|=)")
GROUPING = re.compile(r"\b(?:by|without)\s*\(([^)]*)\)")


def panels(dashboard: dict) -> list[dict]:
    out = []
    for panel in dashboard["panels"]:
        out.append(panel)
        out.extend(panel.get("panels", []))  # a collapsed row holds its panels
    return [p for p in out if p.get("type") != "row"]


def queries() -> list[tuple[str, str]]:
    dashboard = json.loads(DASHBOARD.read_text())
    out = [(p["title"], t["expr"]) for p in panels(dashboard) for t in p.get("targets", [])]
    out += [(f"variable {v['name']}", v["query"]["query"]) for v in dashboard["templating"]["list"]
            if v["type"] == "query"]
    # The alert rules' expressions face the same check.
    out += [(f"alert {r['alert']}", r["expr"]) for g in yaml.safe_load(RULES.read_text())["groups"] for r in g["rules"]]
    return out


def exported(text: str) -> dict[str, set[str]]:
    """{sample name: its label names} of a /metrics page. A labelled metric
    that has counted nothing yet has no samples, only its HELP and TYPE: its
    sample names are made from its type, with labels unknown (empty)."""
    out: dict[str, set[str]] = {}
    suffixes = {"counter": ["_total"], "histogram": ["_bucket", "_sum", "_count"], "summary": ["_sum", "_count"]}
    for family in text_string_to_metric_families(text):
        for suffix in suffixes.get(family.type, [""]):
            out.setdefault(family.name + suffix, set())
        for sample in family.samples:
            out.setdefault(sample.name, set()).update(sample.labels)
    return out


def gpu_metrics() -> dict[str, set[str]]:
    """What GpuMemoryCollector exports where CUDA is present, with a stand-in torch."""
    from worker.metrics import GpuMemoryCollector

    cuda = types.SimpleNamespace(is_available=lambda: True, device_count=lambda: 1,
                                 memory_allocated=lambda i: 1024, memory_reserved=lambda i: 2048)
    saved = sys.modules.get("torch")
    sys.modules["torch"] = types.SimpleNamespace(cuda=cuda)
    try:
        registry = CollectorRegistry()
        registry.register(GpuMemoryCollector())
        return exported(generate_latest(registry).decode())
    finally:
        if saved is None:
            sys.modules.pop("torch")
        else:
            sys.modules["torch"] = saved


@pytest.fixture(scope="module")
def settings(tmp_path_factory, model_dir, registry_path, pg_url):
    """Pools of this module's own, so other tests' jobs do not mix in."""
    doc = yaml.safe_load(registry_path.read_text())
    tag = secrets.token_hex(3)
    doc["models"] = {"demo-text": {**doc["models"]["demo-text"], "pool": f"text-{tag}", "max_wait_ms": 0},
                     "demo-image": {**doc["models"]["demo-image"], "pool": f"image-{tag}", "max_wait_ms": 0}}
    reg = tmp_path_factory.mktemp("reg") / "registry.yaml"
    reg.write_text(yaml.safe_dump(doc))
    home = tmp_path_factory.mktemp("home")
    return Settings.from_env({}, home=home, model_dir=model_dir, registry_path=reg, database_url=pg_url,
                             broker_url=REDIS_URL, storage_url=(home / "storage").as_uri(), lease_seconds=30,
                             heartbeat_interval=0.5, webhook_secret_keys=WEBHOOK_KEYS)


@pytest.fixture(scope="module")
def live(settings) -> dict:
    """The API's and a worker's /metrics once the worker has run two text jobs
    and two image jobs. All are queued before the worker starts, so the image
    jobs (same size and steps) run as one static batch."""
    pools = sorted({m["pool"] for m in yaml.safe_load(settings.registry_path.read_text())["models"].values()})
    client = create_app(settings.replace(metrics_cache_seconds=0)).test_client()
    tenant = make_key(settings, f"dash-{secrets.token_hex(3)}")
    image = {"prompt": "c", "width": 32, "height": 32, "num_inference_steps": 2}
    jobs = [client.post("/v1/jobs", headers=tenant, json={"model": model, "input": inp}).get_json()["id"]
            for model, inp in [("demo-text", {"prompt": "a", "max_new_tokens": 3, "seed": 1}),
                               ("demo-text", {"prompt": "b", "max_new_tokens": 3, "seed": 2}),
                               ("demo-image", {**image, "seed": 3}), ("demo-image", {**image, "seed": 4})]]
    port = free_port()
    with WorkerProcess(settings, pools, extra_env={"GENQ_METRICS_PORT": str(port)}):
        done = [wait_job(client.get, job, tenant) for job in jobs]
        worker = requests.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
    assert [d["status"] for d in done] == ["succeeded"] * 4, done
    api = client.get("/metrics").get_data(as_text=True)
    return {"api": api, "worker": worker, "done": done,
            "metrics": {**exported(api), **exported(worker), **gpu_metrics()}}


def value(text: str, name: str, **labels) -> float:
    return sum(s.value for f in text_string_to_metric_families(text) for s in f.samples
               if s.name == name and labels.items() <= s.labels.items())


def test_the_dashboard_has_panels_for_what_operators_watch():
    titles = {title for title, _ in queries()}
    for needed in ("Queue depth", "Oldest queued job", "Throughput", "Failure rate", "Queue time p50 / p99",
                   "Run time p50 / p99", "Batch size", "Model loads", "Model cache hit ratio", "Webhook outcomes",
                   "GPU memory", "Tokens and images made"):
        assert needed in titles, needed
    dashboard = json.loads(DASHBOARD.read_text())
    assert dashboard["uid"] == "genq"
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    for p in panels(dashboard):
        assert p["datasource"]["uid"] == "prometheus", p["title"]  # the provisioned data source's uid


def problems(expr: str, metrics: dict[str, set[str]]) -> list[str]:
    """What in a query names something no live /metrics exports: a metric, a
    label in a matcher, or a label grouped by."""
    found = METRIC.findall(expr)
    if not found:
        return ["names no genq metric"]
    out = []
    labels_of_expr = set(TARGET_LABELS)
    for name, matchers in found:
        if name not in metrics:
            out.append(f"{name} is not in any live /metrics (nor the GPU collector's)")
            continue
        known = metrics[name]
        labels_of_expr |= known
        if known:  # labels are known only for a metric that has counted something
            out += [f"{name} has no label {label!r} (has {sorted(known)})"
                    for label in MATCHER.findall(matchers) if label not in known | TARGET_LABELS]
    if not out and all(metrics[name] for name, _ in found):
        for group in GROUPING.findall(expr):
            out += [f"no metric here has the label {label!r}"
                    for label in filter(None, (part.strip() for part in group.split(",")))
                    if label not in labels_of_expr]
    return out


@pytest.mark.parametrize("title, expr", queries(), ids=[f"{t}:{i}" for i, (t, _) in enumerate(queries())])
def test_every_query_names_metrics_genq_exports(live, title, expr):
    assert not problems(expr, live["metrics"]), (title, expr, problems(expr, live["metrics"]))


@pytest.mark.parametrize("expr", [
    "sum(rate(genq_worker_job_total[5m]))",                      # misspelt
    "genq_worker_jobs",                                          # a counter's samples end in _total
    'sum(rate(genq_worker_jobs_total{state="failed"}[5m]))',    # the label is `status`
    "max by (tenant) (genq_queue_depth)",                        # no such label
    "up",                                                        # no genq metric at all
])
def test_the_check_refuses_what_genq_does_not_export(live, expr):
    assert problems(expr, live["metrics"])


def test_tokens_images_and_run_time_count_per_job(live):
    worker, done = live["worker"], live["done"]
    tokens = sum(d["output"]["tokens"] for d in done[:2])
    assert tokens > 0 and value(worker, "genq_output_tokens_total", model="demo-text") == tokens
    assert value(worker, "genq_output_images_total", model="demo-image") == 2
    # The two image jobs ran as one static batch; its time counts once per job.
    assert value(worker, "genq_batch_size_count", model="demo-image") == 1
    assert value(worker, "genq_batch_size_sum", model="demo-image") == 2
    assert value(worker, "genq_job_run_seconds_count", model="demo-image") == 2
    assert value(worker, "genq_job_run_seconds_count", model="demo-text") == 2
