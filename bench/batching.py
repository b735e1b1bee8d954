"""Does batching pay through the whole service? Side by side, in one run, on one worker:

- service throughput (HTTP API -> queue -> worker -> storage) at max_batch_size 1, 4, 8,
  and the ratio to batch 1;
- the same model called directly in a loop at the same batch sizes, and service / direct;
- queue latency (submit -> start) p50 / p99 with an idle worker.

    .venv/bin/python bench/batching.py [--jobs 64] [--tokens 64] [--image-jobs 16] [--embedded]

By default it uses Postgres and Redis on 127.0.0.1 when they answer (a
database of its own, dropped afterwards) and local storage; --embedded uses
SQLite and the filesystem broker instead.

Service throughput is a burst of N jobs submitted over HTTP while the worker
is held, then drained: jobs over the span from the first start to the last
completion, as the database recorded them. Holding the worker keeps the
burst's submission work (on the API's own machine in production) off the two
cores the model runs on here. "in model" is the share of that span the worker
spent inside the model call; the rest is claims, storage, status writes.
"""
from __future__ import annotations

import argparse
import os
import secrets
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import requests
import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from genq.settings import DEFAULT_REGISTRY, Settings  # noqa: E402

BATCH_SIZES = (1, 4, 8)


@contextmanager
def postgres_db():
    from sqlalchemy import create_engine, text

    admin_url = os.environ.get("GENQ_BENCH_PG_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test")
    name = f"genq_bench_{secrets.token_hex(4)}"
    admin = create_engine(admin_url, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    try:
        yield admin_url.rsplit("/", 1)[0] + f"/{name}"
    finally:
        with admin.connect() as conn:
            conn.execute(text(f"SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = '{name}'"))
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}"'))


def services_up() -> bool:
    import socket

    for port in (5432, 6379):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
        except OSError:
            return False
    return True


def write_registry(path: Path, pool: str) -> None:
    """One entry per batch size, same checkpoint, one pool: one worker serves them all."""
    base = yaml.safe_load(DEFAULT_REGISTRY.read_text())["models"]
    models = {}
    for b in BATCH_SIZES:
        models[f"text-b{b}"] = {**base["demo-text"], "pool": pool, "max_batch_size": b, "max_wait_ms": 50}
        models[f"image-b{b}"] = {**base["demo-image"], "pool": pool, "max_batch_size": b, "max_wait_ms": 50,
                                 "limits": {**base["demo-image"]["limits"], "max_images": 8}}
    path.write_text(yaml.safe_dump({"models": models}))


class Service:
    def __init__(self, settings: Settings, pool: str):
        from werkzeug.serving import make_server

        from api.app import create_app
        from genq.keys import create_key
        from genq.db import make_engine, make_sessionmaker

        self.settings = settings
        engine = make_engine(settings.database_url)
        with make_sessionmaker(engine).begin() as s:
            _, raw = create_key(s, "bench")
        self.headers = {"Authorization": f"Bearer {raw}"}
        self.server = make_server("127.0.0.1", 0, create_app(settings), threaded=True)
        self.url = f"http://127.0.0.1:{self.server.server_port}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        # The worker logs at INFO: its "ready." line is how we know it listens.
        env = {**os.environ, **settings.as_env(), "PYTHONUNBUFFERED": "1", "GENQ_LOG_LEVEL": "INFO"}
        self.worker = subprocess.Popen([sys.executable, "-m", "genq.cli", "worker", "--pool", pool, "--preload"],
                                       env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT)
        for line in self.worker.stdout:
            if " ready." in line:
                break
        else:
            raise RuntimeError("worker exited before it was ready")
        threading.Thread(target=lambda: [None for _ in self.worker.stdout], daemon=True).start()
        self.http = requests.Session()

    @contextmanager
    def held(self):
        """Freeze the worker while a burst is submitted, so the burst's HTTP and
        database work (on the API's machine in production, on these same two
        cores here) does not run beside the model; the worker then drains a
        full queue. SIGSTOP/SIGCONT is the harness's trick, not the product's."""
        os.kill(self.worker.pid, signal.SIGSTOP)
        try:
            yield
        finally:
            os.kill(self.worker.pid, signal.SIGCONT)

    def submit(self, model: str, inputs: list[dict]) -> list[str]:
        def post(inp):
            r = requests.post(f"{self.url}/v1/jobs", json={"model": model, "input": inp}, headers=self.headers, timeout=30)
            r.raise_for_status()
            return r.json()["id"]

        # Submitted concurrently, as many clients would.
        with ThreadPoolExecutor(8) as pool:
            return list(pool.map(post, inputs))

    def wait(self, ids: list[str], timeout: float = 600) -> list[dict]:
        deadline = time.monotonic() + timeout
        done: dict[str, dict] = {}
        while len(done) < len(ids):
            for jid in ids:
                if jid not in done:
                    job = self.http.get(f"{self.url}/v1/jobs/{jid}", headers=self.headers, timeout=30).json()
                    if job["status"] in ("succeeded", "failed", "canceled"):
                        if job["status"] != "succeeded":
                            raise RuntimeError(f"job {jid} {job['status']}: {job['error']}")
                        done[jid] = job
                        continue
                    break  # the rest are later still
            if time.monotonic() > deadline:
                raise TimeoutError(f"{len(ids) - len(done)} jobs unfinished")
            time.sleep(0.5)  # seldom: the bench's own polling shares the cores with the worker
        return [done[i] for i in ids]

    def close(self) -> None:
        self.worker.terminate()
        self.worker.wait(30)
        self.server.shutdown()


def span(jobs: list[dict], start: str = "created_at") -> float:
    from datetime import datetime

    t = lambda s: datetime.fromisoformat(s.replace("Z", "+00:00")).timestamp()  # noqa: E731
    return max(t(j["completed_at"]) for j in jobs) - min(t(j[start]) for j in jobs)


def text_inputs(n: int, tokens: int) -> list[dict]:
    return [{"prompt": f"Story number {i} begins", "max_new_tokens": tokens, "seed": i, "temperature": 1.0}
            for i in range(n)]


def image_inputs(n: int) -> list[dict]:
    return [{"prompt": f"picture {i}", "width": 64, "height": 64, "num_inference_steps": 10, "seed": i}
            for i in range(n)]


def direct(family: str, checkpoint_dir: Path, inputs: list[dict], batch: int) -> tuple[float, int]:
    """The bare model call in a loop: seconds for all inputs at this batch size, and units made."""
    import importlib

    from models.demo import ensure_checkpoint

    module = importlib.import_module(f"models.{family}")
    key = "demo:text" if family == "text" else "demo:image"
    model = direct.cache.get(family) or module.load(ensure_checkpoint(key, checkpoint_dir), "cpu", "float32")
    direct.cache[family] = model
    parsed = [module.Input.model_validate(i) for i in inputs]
    model.run(parsed[:batch], lambda *a: None, lambda r: False)  # warm-up
    started = time.perf_counter()
    units = 0
    for k in range(0, len(parsed), batch):
        for result in model.run(parsed[k:k + batch], lambda *a: None, lambda r: False):
            units += result.output["tokens"] if family == "text" else len(result.output["images"])
    return time.perf_counter() - started, units


direct.cache = {}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--jobs", type=int, default=64, help="text jobs per batch size")
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--image-jobs", type=int, default=16)
    ap.add_argument("--latency-jobs", type=int, default=40)
    ap.add_argument("--families", default="text,image")
    ap.add_argument("--repeats", type=int, default=3, help="runs of each measurement; the best is kept")
    ap.add_argument("--embedded", action="store_true", help="SQLite + filesystem broker even if services answer")
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import logging

    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # no access log lines between the figures

    home = Path(tempfile.mkdtemp(prefix="genq-bench-"))
    pool = f"bench-{secrets.token_hex(3)}"
    write_registry(home / "registry.yaml", pool)
    model_dir = Path(os.environ.get("GENQ_MODEL_DIR") or home / "models")
    use_services = services_up() and not args.embedded
    from genq.migrate import upgrade

    with (postgres_db() if use_services else _nothing()) as pg:
        overrides = dict(home=home, registry_path=home / "registry.yaml", model_dir=model_dir, device="cpu",
                         progress_interval=1.0, log_level="WARNING")
        if use_services:
            overrides.update(database_url=pg, broker_url="redis://127.0.0.1:6379/0")
        settings = Settings.from_env({}, **overrides)
        upgrade(settings.database_url)
        print(f"stack: {'Postgres + Redis' if use_services else 'SQLite + filesystem broker'}, local storage; "
              f"torch threads per process: default; {os.cpu_count()} cores")
        svc = Service(settings, pool)
        try:
            rows = []
            for family, n, inputs, unit in (("text", args.jobs, text_inputs(args.jobs, args.tokens), "tokens"),
                                            ("image", args.image_jobs, image_inputs(args.image_jobs), "images")):
                if family not in args.families.split(","):
                    continue
                base = None
                for b in BATCH_SIZES:
                    # This machine's neighbours make timings jitter by 10-20%: each
                    # measurement runs `--repeats` times, interleaved, best kept.
                    best = None
                    for _ in range(args.repeats):
                        with svc.held():
                            ids = svc.submit(f"{family}-b{b}", inputs)
                        jobs = svc.wait(ids)
                        seconds = span(jobs, "started_at")
                        units = sum(j["output"]["tokens"] if family == "text" else len(j["output"]["images"]) for j in jobs)
                        d_seconds, d_units = direct(family, model_dir, inputs, b)
                        if units != d_units:
                            print(f"warning: service made {units} {unit}, direct {d_units}")
                        mean_batch = statistics.mean(j["metrics"]["batch_size"] for j in jobs)
                        # Share of the span the worker spent inside the model call.
                        in_model = sum(j["metrics"]["run_seconds"] / j["metrics"]["batch_size"] for j in jobs) / seconds
                        svc_rate, direct_rate = units / seconds, d_units / d_seconds
                        if best is None:
                            best = [mean_batch, n / seconds, svc_rate, direct_rate, in_model]
                        elif svc_rate > best[2]:
                            best[:3], best[4] = [mean_batch, n / seconds, svc_rate], in_model
                        best[3] = max(best[3], direct_rate)
                    mean_batch, jps, svc_rate, direct_rate, in_model = best
                    base = base or svc_rate
                    rows.append((family, b, mean_batch, jps, svc_rate, svc_rate / base, direct_rate,
                                 svc_rate / direct_rate, in_model, unit))
            print(f"\n{'family':7} {'batch':>5} {'mean':>5} {'jobs/s':>8} {'units/s':>9} {'vs b1':>6} "
                  f"{'direct/s':>9} {'svc/direct':>10} {'in model':>8}")
            for fam, b, mb, jps, rate, vs1, drate, ratio, busy, unit in rows:
                print(f"{fam:7} {b:>5} {mb:>5.1f} {jps:>8.2f} {rate:>9.1f} {vs1:>5.2f}x {drate:>9.1f} {ratio:>10.2f} "
                      f"{busy:>7.0%}  ({unit})")

            lat = []
            for i in range(args.latency_jobs if "text" in args.families else 0):
                [job] = svc.wait(svc.submit("text-b1", [{"prompt": "hi", "max_new_tokens": 1, "seed": i}]))
                lat.append(job["metrics"]["queue_seconds"])
            if not lat:
                return 0
            lat.sort()
            p99 = lat[min(len(lat) - 1, int(round(0.99 * (len(lat) - 1))))]
            print(f"\nqueue latency (submit -> start), idle worker, {len(lat)} jobs: "
                  f"p50 {statistics.median(lat) * 1000:.1f} ms, p99 {p99 * 1000:.1f} ms")
        finally:
            svc.close()
    return 0


@contextmanager
def _nothing():
    yield None


if __name__ == "__main__":
    sys.exit(main())
