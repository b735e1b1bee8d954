"""docker-compose.yml and the Dockerfiles, checked by reading them (no Docker here)."""
from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

import pytest
import yaml

from genq import settings
from genq.settings import Settings

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = ROOT / "docker-compose.yml"
REGISTRY = ROOT / "models" / "registry.yaml"
API_DOCKERFILE = ROOT / "infra" / "Dockerfile.api"
WORKER_DOCKERFILE = ROOT / "infra" / "Dockerfile.worker"

REQUIRED_SERVICES = {"postgres", "redis", "s3", "s3-init", "migrate", "api"}
DEFAULTS = Settings.from_env({})
WEBHOOK_QUEUE = DEFAULTS.webhook_queue
PROMETHEUS_CONFIG = ROOT / "infra" / "prometheus" / "prometheus.yml"


@pytest.fixture(scope="module")
def services() -> dict:
    # PyYAML resolves the x-* anchors and `<<` merges the way Compose does.
    return yaml.safe_load(COMPOSE.read_text())["services"]


def gpu_pools() -> list[str]:
    models = yaml.safe_load(REGISTRY.read_text())["models"]
    return sorted({m["pool"] for m in models.values() if m["pool"].startswith("gpu")})


def environment(service: dict) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):  # the "KEY=value" list form
        env = dict(item.split("=", 1) if "=" in item else (item, "") for item in env)
    return {k: str(v) for k, v in env.items()}


def command_words(service: dict) -> list[str]:
    cmd = service.get("command") or []
    return shlex.split(cmd) if isinstance(cmd, str) else [str(w) for w in cmd]


def serves_pool(service: dict, pool: str) -> bool:
    if environment(service).get("GENQ_POOL") == pool:
        return True
    words = command_words(service)
    return any(w == "--pool" and i + 1 < len(words) and pool in words[i + 1].split(",")
               for i, w in enumerate(words))


def worker_services(services: dict) -> dict[str, dict]:
    return {name: s for name, s in services.items()
            if "GENQ_POOL" in environment(s) or "worker" in command_words(s)}


def reserves_nvidia_gpu(service: dict) -> bool:
    devices = (((service.get("deploy") or {}).get("resources") or {}).get("reservations") or {}).get("devices") or []
    return any(d.get("driver") == "nvidia" and "gpu" in (d.get("capabilities") or []) for d in devices)


def depends_on(service: dict) -> dict[str, str]:
    deps = service.get("depends_on") or {}
    if isinstance(deps, list):
        return {name: "service_started" for name in deps}
    return {name: (cond or {}).get("condition", "service_started") for name, cond in deps.items()}


def instructions(dockerfile: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, with continuation lines joined and comments dropped."""
    text = re.sub(r"\\\n", " ", "\n".join(
        line for line in dockerfile.read_text().splitlines() if not line.lstrip().startswith("#")))
    out = []
    for line in text.splitlines():
        if line.strip():
            word, _, rest = line.strip().partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def cmd_argv(dockerfile: Path) -> list[str]:
    cmds = [args for word, args in instructions(dockerfile) if word == "CMD"]
    assert cmds, f"{dockerfile.name} has no CMD"
    last = cmds[-1]  # only the last CMD counts
    return json.loads(last) if last.startswith("[") else ["sh", "-c", last]


def runs_genq(argv: list[str]) -> bool:
    if argv[0] == "genq":
        return True
    # A shell form: the script must exec the genq entry point.
    return argv[:2] == ["sh", "-c"] and re.match(r"^\s*(exec\s+)?genq\s", argv[2]) is not None


# ---- docker-compose.yml -------------------------------------------------------


def test_required_services_exist(services):
    assert REQUIRED_SERVICES <= set(services), f"missing: {REQUIRED_SERVICES - set(services)}"


def test_registry_has_gpu_pools():
    # Guards the parametrization below against silently checking nothing.
    assert gpu_pools()


@pytest.mark.parametrize("pool", gpu_pools())
def test_every_gpu_pool_has_a_worker_that_reserves_a_gpu(services, pool):
    serving = {name: s for name, s in services.items() if serves_pool(s, pool)}
    assert serving, f"no service in docker-compose.yml runs a worker for pool {pool!r}"
    for name, service in serving.items():
        assert reserves_nvidia_gpu(service), f"{name} serves GPU pool {pool!r} but reserves no nvidia GPU"
        assert environment(service).get("GENQ_DEVICE", "").startswith("cuda"), name


def every_pool() -> list[str]:
    """Every queue something is put on: the registry's pools, fine-tunes' and webhooks'."""
    models = yaml.safe_load(REGISTRY.read_text())["models"]
    return sorted({m["pool"] for m in models.values()} | {DEFAULTS.training_pool, WEBHOOK_QUEUE})


@pytest.mark.parametrize("pool", every_pool())
def test_every_pool_has_a_consumer(services, pool):
    # A queue no service consumes holds its jobs for ever (fine-tunes did).
    default = {name: s for name, s in services.items() if not s.get("profiles")}
    assert any(serves_pool(s, pool) for s in default.values()), \
        f"no service of the default profile consumes pool {pool!r}"


def long_running(services: dict) -> dict[str, dict]:
    """Every service but the one-shot jobs (restart "no": they run to their end)."""
    return {name: s for name, s in services.items() if str(s.get("restart", "no")) != "no"}


def test_every_long_running_service_has_a_health_check(services):
    assert set(long_running(services)) >= {"postgres", "redis", "s3", "api", "webhooks", "prometheus", "grafana",
                                           *worker_services(services)}
    for name, service in long_running(services).items():
        check = service.get("healthcheck") or {}
        assert check.get("test") and not check.get("disable"), f"{name} has no health check"
        assert check["test"][0] in ("CMD", "CMD-SHELL"), name


# A release tag (major.minor at least, v-prefix allowed) or a digest: `postgres:16`
# or `redis:7` move with every patch release, `latest` or no tag with every push.
PINNED = re.compile(r"^[^@\s]+(:v?\d+\.\d+[^\s]*|@sha256:[0-9a-f]{64})$")


def test_every_pulled_image_is_pinned(services):
    pulled = {name: s["image"] for name, s in services.items() if "build" not in s}
    assert set(pulled) >= {"postgres", "redis", "s3", "prometheus", "grafana"}
    for name, image in pulled.items():
        assert PINNED.match(image) and not image.endswith(":latest"), f"{name}: {image!r} is not pinned"


@pytest.mark.parametrize("image", ["postgres:16", "redis", "minio/minio", "x:latest", "grafana/grafana:11"])
def test_the_pin_check_refuses_moving_tags(image):
    assert not PINNED.match(image)


def test_workers_and_the_sender_serve_metrics(services):
    for name, service in worker_services(services).items():
        port = environment(service).get("GENQ_METRICS_PORT", "0")
        assert port not in ("", "0"), f"{name} serves no /metrics"
        assert f":{port}/metrics" in json.dumps(service["healthcheck"]["test"]), name


def test_prometheus_scrapes_the_api_and_every_worker_service(services):
    config = yaml.safe_load(PROMETHEUS_CONFIG.read_text())
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    assert jobs["genq-api"]["static_configs"][0]["targets"] == ["api:8000"]
    discovered = {(name, sd["port"]) for sd in jobs["genq-workers"]["dns_sd_configs"] for name in sd["names"]}
    for name, service in worker_services(services).items():
        assert (name, int(environment(service)["GENQ_METRICS_PORT"])) in discovered, f"nothing scrapes {name}"
    # A name no service has would be a target that never resolves.
    assert {name for name, _ in discovered} <= set(worker_services(services))
    assert config["rule_files"] == ["/etc/prometheus/rules/*.yml"]


def bind_mounts(service: dict) -> list[tuple[Path, str]]:
    out = []
    for volume in service.get("volumes") or []:
        source, target = str(volume).split(":")[:2]
        if source.startswith("."):
            out.append(((ROOT / source).resolve(), target))
    return out


def test_worker_pools_exist_in_the_registry(services):
    # A worker for a renamed or removed pool would fail at start (`genq worker` exits 2).
    # `genq worker` takes the registry's pools and fine-tunes' (GENQ_TRAINING_POOL).
    pools = {m["pool"] for m in yaml.safe_load(REGISTRY.read_text())["models"].values()} | {DEFAULTS.training_pool}
    workers = worker_services(services)
    assert workers
    for name, service in workers.items():
        assert environment(service).get("GENQ_POOL") in pools or serves_pool(service, WEBHOOK_QUEUE), name


def test_a_cpu_sender_serves_the_webhook_queue(services):
    senders = {name: s for name, s in services.items() if serves_pool(s, WEBHOOK_QUEUE)}
    assert senders, "no service runs the webhook sender: deliveries would wait forever"
    for name, service in senders.items():
        assert not reserves_nvidia_gpu(service), f"{name} posts webhooks; it needs no GPU"
        assert service["image"] == services["api"]["image"], f"{name}: the API image (no torch) is enough"


def test_workers_can_be_scaled(services):
    for name, service in worker_services(services).items():
        assert "container_name" not in service, f"{name}: container_name breaks `docker compose up --scale`"
        assert "stop_grace_period" in service, f"{name}: SIGKILL 10 s after SIGTERM would cut batches short"


def test_api_and_workers_wait_for_migration_and_services(services):
    for name in ["api", *worker_services(services)]:
        deps = depends_on(services[name])
        assert deps.get("migrate") == "service_completed_successfully", name
        assert deps.get("redis") == "service_healthy", name
        assert deps.get("s3-init") == "service_completed_successfully", name
    assert depends_on(services["migrate"]).get("postgres") == "service_healthy"
    assert command_words(services["migrate"]) == ["genq", "migrate"]


def test_backing_services(services):
    assert services["postgres"]["image"].startswith("postgres:16")
    assert "pg_isready" in json.dumps(services["postgres"]["healthcheck"]["test"])
    assert services["redis"]["image"].startswith("redis:7")
    assert "redis-cli" in json.dumps(services["redis"]["healthcheck"]["test"])
    # Without persistence a Redis restart drops every queued doorbell.
    assert "--appendonly yes" in " ".join(command_words(services["redis"]))
    # s3-init makes the bucket with genq's own storage code, from the same settings as every genq process.
    assert "ensure_bucket" in json.dumps(services["s3-init"]["command"])
    assert environment(services["s3-init"])["GENQ_STORAGE_URL"] == "s3://genq"
    assert depends_on(services["s3-init"]).get("s3") == "service_healthy"


def test_api_serves_port_8000_with_a_healthcheck(services):
    api = services["api"]
    assert any(str(p).split(":")[-1] == "8000" for p in api["ports"])
    test = json.dumps(api["healthcheck"]["test"])
    assert "/healthz" in test and "curl" not in test  # python:3.11-slim has no curl


def published(service: dict) -> list[tuple[str, str]]:
    """(host address, container port) of each port a service publishes; an
    empty address means every interface."""
    out = []
    for port in service.get("ports") or []:
        if isinstance(port, dict):  # the long syntax
            out.append((str(port.get("host_ip", "")), str(port["target"])))
            continue
        parts = str(port).split(":")
        out.append((parts[0] if len(parts) == 3 else "", parts[-1].split("/")[0]))
    return out


def test_s3_is_published_on_this_host_only(services):
    ports = published(services["s3"])
    assert {target for _, target in ports} == {"8333"}
    assert all(address == "127.0.0.1" for address, _ in ports), ports
    # Only the API is for the world; every backing service stays on this host or the compose network.
    for name, service in services.items():
        if name != "api":
            assert all(address in ("127.0.0.1", "::1") for address, _ in published(service)), name


CREDENTIALS = ("POSTGRES_PASSWORD", "S3_ACCESS_KEY_ID", "S3_SECRET_ACCESS_KEY", "GENQ_WEBHOOK_SECRET_KEYS",
               "GRAFANA_ADMIN_PASSWORD")


def test_credentials_come_from_the_users_env_file_with_no_defaults():
    text = COMPOSE.read_text()
    for name in CREDENTIALS:
        uses = re.findall(r"\$\{" + name + r"([^}]*)\}", text)
        assert uses, f"{name} is not used in docker-compose.yml"
        # ${NAME:?message}: Compose refuses to start while it is unset or empty.
        assert all(use.startswith(":?") for use in uses), f"{name} has a default or no check: {uses}"
    for old_default in ("genq-minio-secret", "${POSTGRES_PASSWORD:-", "${S3_ACCESS_KEY_ID:-"):
        assert old_default not in text
    environments = [environment(s) for s in yaml.safe_load(text)["services"].values()]
    for env in environments:
        for key in ("POSTGRES_PASSWORD", "GENQ_S3_ACCESS_KEY_ID", "GENQ_S3_SECRET_ACCESS_KEY",
                    "GENQ_WEBHOOK_SECRET_KEYS", "GF_SECURITY_ADMIN_PASSWORD"):
            if key in env:
                assert env[key].startswith("${") and ":?" in env[key], (key, env[key])


def test_an_env_example_names_every_credential_and_holds_none():
    example = ROOT / ".env.example"
    values = dict(line.split("=", 1) for line in example.read_text().splitlines()
                  if line.strip() and not line.lstrip().startswith("#"))
    assert set(values) == set(CREDENTIALS)
    assert all(value.strip() == "" for value in values.values()), "the example must not ship real values"
    assert ".env" in (ROOT / ".gitignore").read_text().split()
    assert ".env" in (ROOT / ".dockerignore").read_text().split()


def test_genq_services_share_settings(services):
    for name in ["migrate", "api", *worker_services(services)]:
        env = environment(services[name])
        assert env.get("GENQ_DATABASE_URL", "").startswith("postgresql+psycopg://"), name
        assert env.get("GENQ_BROKER_URL") == "redis://redis:6379/0", name
        assert env.get("GENQ_STORAGE_URL") == "s3://genq", name
        assert env.get("GENQ_S3_ENDPOINT_URL") == "http://s3:8333", name
        # Presigned URLs name the port published on this host, not the network-only name.
        assert env.get("GENQ_S3_PUBLIC_ENDPOINT_URL", "").endswith("http://localhost:8333}"), name
        # genq refuses to start on a misspelt variable.
        assert not settings.unknown(env), name


def test_build_sections_name_existing_dockerfiles(services):
    for name, service in services.items():
        build = service.get("build")
        if build:
            assert (ROOT / build.get("context", ".") / build["dockerfile"]).is_file(), name


# ---- Dockerfiles ----------------------------------------------------------------


@pytest.mark.parametrize("dockerfile", [API_DOCKERFILE, WORKER_DOCKERFILE], ids=lambda p: p.name)
def test_dockerfile_base_user_and_genq_entry_point(dockerfile):
    assert dockerfile.is_file()
    steps = instructions(dockerfile)
    assert [args for word, args in steps if word == "FROM"][0].startswith("python:3.11-slim")
    users = [args for word, args in steps if word == "USER"]
    assert users and users[-1] not in ("root", "0"), f"{dockerfile.name} runs as root"
    assert runs_genq(cmd_argv(dockerfile)), cmd_argv(dockerfile)


def test_api_image_has_no_worker_extra():
    runs = " ".join(args for word, args in instructions(API_DOCKERFILE) if word == "RUN")
    assert "pip install" in runs
    assert "worker" not in runs and "torch" not in runs, "the API never imports torch; keep it out of the image"
    assert ("EXPOSE", "8000") in instructions(API_DOCKERFILE)
    assert cmd_argv(API_DOCKERFILE)[:2] == ["genq", "api"] and "0.0.0.0:8000" in cmd_argv(API_DOCKERFILE)


def test_worker_image_installs_cuda_torch_and_runs_its_pool():
    steps = instructions(WORKER_DOCKERFILE)
    assert any(word == "ARG" and args.startswith("TORCH_INDEX_URL=https://download.pytorch.org/whl/cu")
               for word, args in steps)
    runs = [args for word, args in steps if word == "RUN"]
    assert any("TORCH_INDEX_URL" in r and "torch" in r for r in runs)
    assert any(re.search(r"\.\[worker[],]", r) for r in runs)
    # constraints.txt pins the CPU torch build; applied as is it would undo the CUDA one.
    assert not any(re.search(r"-c\s+constraints\.txt", r) for r in runs)
    argv = cmd_argv(WORKER_DOCKERFILE)
    assert "genq worker --pool" in " ".join(argv) and "GENQ_POOL" in " ".join(argv)
def test_the_observability_profile_is_provisioned_from_the_repo(services):
    for name in ("prometheus", "grafana"):
        assert services[name]["profiles"] == ["observability"], name
        for source, target in bind_mounts(services[name]):
            assert source.exists(), f"{name} mounts {source}, which is not in the repository"
    mounted = dict((target, source) for source, target in bind_mounts(services["grafana"]))
    provisioning = mounted["/etc/grafana/provisioning"]
    datasources = yaml.safe_load((provisioning / "datasources" / "prometheus.yaml").read_text())["datasources"]
    assert datasources[0]["url"] == "http://prometheus:9090" and datasources[0]["uid"] == "prometheus"
    providers = yaml.safe_load((provisioning / "dashboards" / "genq.yaml").read_text())["providers"]
    folder = providers[0]["options"]["path"]
    assert mounted[folder].joinpath("genq.json").is_file(), "the provider's folder must hold the dashboard"
    home = environment(services["grafana"])["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert home == f"{folder}/genq.json"
    rules = dict((target, source) for source, target in bind_mounts(services["prometheus"]))["/etc/prometheus/rules"]
    assert list(rules.glob("*.yml")), "Prometheus would evaluate no rules"
