"""One fault-test stack per test: a Redis server of its own, the run's Postgres
database, local storage, a model of the fault family on a pool of its own, an
execution log, and leases and intervals short enough for CI (lease 3 s,
reconciler every 0.5 s). Each test's figures are printed at the end of the run."""
from __future__ import annotations

import secrets
import time
from pathlib import Path

import pytest
import yaml

from api.app import create_app
from genq.settings import Settings
from tests.conftest import WEBHOOK_KEYS
from tests.faults.harness import Figures, RedisServer, Supervisor, Worker, check_nothing_lost, wait_terminal
from tests.helpers import make_key

FIGURES: list[Figures] = []


def pytest_terminal_summary(terminalreporter):
    if FIGURES:
        terminalreporter.section("nothing lost: fault scenarios")
        for f in FIGURES:
            terminalreporter.write_line(f.line())


class Stack:
    def __init__(self, tmp: Path, pg_url: str, redis_server: RedisServer, max_batch_size: int,
                 batching: str = "continuous", text_model: bool = False, **overrides):
        tag = secrets.token_hex(3)
        # Two models on one pool: a worker draining one leaves the other's jobs to their doorbells.
        self.model, self.other_model = f"faulty-{tag}", f"faulty-{tag}-b"
        self.pool = f"faults-{tag}"
        registry = tmp / "registry.yaml"
        entry = {"family": "tests.faults.family", "checkpoint": "none", "pool": self.pool,
                 "max_batch_size": max_batch_size, "max_wait_ms": 50, "batching": batching}
        models = {self.model: entry, self.other_model: entry}
        if text_model:
            # The real text family on the same pool (the demo checkpoint from `model_dir`).
            self.text_model = f"text-{tag}"
            models[self.text_model] = {**entry, "family": "text-generation", "checkpoint": "demo:text"}
        registry.write_text(yaml.safe_dump({"models": models}))
        self.redis = redis_server
        values = dict(
            home=tmp / "home", registry_path=registry, model_dir=tmp / "models", database_url=pg_url,
            broker_url=redis_server.url, storage_url=(tmp / "storage").as_uri(), execution_log=tmp / "executions.jsonl",
            lease_seconds=3, reconcile_interval=0.5, progress_interval=0.2, cancel_poll_interval=0.1,
            max_attempts=3, shutdown_timeout=10, device="cpu",
            # Fault tests submit bursts of up to 1,000 jobs on one key: no rate limit or quota here.
            rate_limit="", max_active_jobs=0, webhook_secret_keys=WEBHOOK_KEYS,
        )
        self.settings = Settings.from_env({}, **{**values, **overrides})
        self.workers: list[Worker] = []
        self.supervisors: list[Supervisor] = []
        self._app = None
        self.tenant = make_key(self.settings, f"faults-{tag}")

    @property
    def app(self):
        if self._app is None:
            self._app = create_app(self.settings)
        return self._app

    def worker(self, start: bool = True, args: list[str] | None = None, **changes) -> Worker:
        w = Worker(self.settings.replace(**changes), [self.pool], preload=False, extra_args=args)
        self.workers.append(w)
        return w.start() if start else w

    def supervised(self, **changes) -> Supervisor:
        sup = Supervisor(lambda: self.worker(start=False, **changes)).start()
        self.supervisors.append(sup)
        return sup

    def body(self, prompt: str = "hello", steps: int = 1, step_seconds: float = 0.0, model: str | None = None,
             **extra) -> dict:
        return {"model": model or self.model,
                "input": {"prompt": prompt, "steps": steps, "step_seconds": step_seconds, **extra}}

    def submit(self, client=None, key: str | None = None, **inp) -> str:
        client = client or self.app.test_client()
        headers = {**self.tenant, **({"Idempotency-Key": key} if key else {})}
        resp = client.post("/v1/jobs", json=self.body(**inp), headers=headers)
        assert resp.status_code == 202, resp.get_json()
        return resp.get_json()["id"]

    def wait(self, ids: list[str], timeout: float = 60) -> float:
        return wait_terminal(self.settings, ids, timeout)

    def check(self, ids: list[str], figures: Figures) -> Figures:
        every = self.workers + [w for s in self.supervisors for w in s.workers]
        check_nothing_lost(self.settings, ids, every, figures)
        FIGURES.append(figures)
        print("\n" + figures.line())
        return figures

    def close(self) -> None:
        for s in self.supervisors:
            s.stop()
        for w in self.workers:
            w.stop("kill")


@pytest.fixture
def redis_server(tmp_path):
    server = RedisServer(tmp_path).start()
    yield server
    server.kill()


@pytest.fixture
def stack_factory(tmp_path, pg_url, redis_server):
    stacks = []

    def make(max_batch_size: int = 4, batching: str = "continuous", text_model: bool = False, **overrides) -> Stack:
        stacks.append(Stack(tmp_path, pg_url, redis_server, max_batch_size, batching, text_model, **overrides))
        return stacks[-1]

    yield make
    for s in stacks:
        s.close()


@pytest.fixture
def stack(stack_factory) -> Stack:
    return stack_factory()


def since(t0: float) -> float:
    return round(time.monotonic() - t0, 2)
