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

REQUIRED_SERVICES = {"postgres", "redis", "minio", "minio-init", "migrate", "api"}
WEBHOOK_QUEUE = Settings.from_env({}).webhook_queue


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


def test_worker_pools_exist_in_the_registry(services):
    # A worker for a renamed or removed pool would fail at start (`genq worker` exits 2).
    pools = {m["pool"] for m in yaml.safe_load(REGISTRY.read_text())["models"].values()}
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
        assert deps.get("minio-init") == "service_completed_successfully", name
    assert depends_on(services["migrate"]).get("postgres") == "service_healthy"
    assert command_words(services["migrate"]) == ["genq", "migrate"]


def test_backing_services(services):
    assert services["postgres"]["image"].startswith("postgres:16")
    assert "pg_isready" in json.dumps(services["postgres"]["healthcheck"]["test"])
    assert services["redis"]["image"].startswith("redis:7")
    assert "redis-cli" in json.dumps(services["redis"]["healthcheck"]["test"])
    # Without persistence a Redis restart drops every queued doorbell.
    assert "--appendonly yes" in " ".join(command_words(services["redis"]))
    assert services["minio-init"]["image"].startswith("minio/mc")
    assert "genq/genq" in json.dumps(services["minio-init"]), "minio-init must create the bucket of GENQ_STORAGE_URL"


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


def test_minio_is_published_on_this_host_only(services):
    ports = published(services["minio"])
    assert {target for _, target in ports} == {"9000", "9001"}
    assert all(address == "127.0.0.1" for address, _ in ports), ports
    # Only the API is for the world; every backing service stays on this host or the compose network.
    for name, service in services.items():
        if name != "api":
            assert all(address in ("127.0.0.1", "::1") for address, _ in published(service)), name


CREDENTIALS = ("POSTGRES_PASSWORD", "MINIO_ROOT_USER", "MINIO_ROOT_PASSWORD", "GENQ_WEBHOOK_SECRET_KEYS")


def test_credentials_come_from_the_users_env_file_with_no_defaults():
    text = COMPOSE.read_text()
    for name in CREDENTIALS:
        uses = re.findall(r"\$\{" + name + r"([^}]*)\}", text)
        assert uses, f"{name} is not used in docker-compose.yml"
        # ${NAME:?message}: Compose refuses to start while it is unset or empty.
        assert all(use.startswith(":?") for use in uses), f"{name} has a default or no check: {uses}"
    for old_default in ("genq-minio-secret", "${POSTGRES_PASSWORD:-", "${MINIO_ROOT_USER:-"):
        assert old_default not in text
    environments = [environment(s) for s in yaml.safe_load(text)["services"].values()]
    for env in environments:
        for key in ("POSTGRES_PASSWORD", "MINIO_ROOT_USER", "MINIO_ROOT_PASSWORD", "GENQ_S3_SECRET_ACCESS_KEY",
                    "GENQ_WEBHOOK_SECRET_KEYS"):
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
        assert env.get("GENQ_S3_ENDPOINT_URL") == "http://minio:9000", name
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
    assert "[worker" not in runs and "torch" not in runs, "the API never imports torch; keep it out of the image"
    assert ("EXPOSE", "8000") in instructions(API_DOCKERFILE)
    assert cmd_argv(API_DOCKERFILE)[:2] == ["genq", "api"] and "0.0.0.0:8000" in cmd_argv(API_DOCKERFILE)


def test_worker_image_installs_cuda_torch_and_runs_its_pool():
    steps = instructions(WORKER_DOCKERFILE)
    assert any(word == "ARG" and args.startswith("TORCH_INDEX_URL=https://download.pytorch.org/whl/cu")
               for word, args in steps)
    runs = [args for word, args in steps if word == "RUN"]
    assert any("TORCH_INDEX_URL" in r and "torch" in r for r in runs)
    assert any(".[worker]" in r for r in runs)
    # constraints.txt pins the CPU torch build; applied as is it would undo the CUDA one.
    assert not any(re.search(r"-c\s+constraints\.txt", r) for r in runs)
    argv = cmd_argv(WORKER_DOCKERFILE)
    assert "genq worker --pool" in " ".join(argv) and "GENQ_POOL" in " ".join(argv)
