"""Does batching pay through the whole service? Side by side, in one run, on one worker:

- service throughput (HTTP API -> queue -> worker -> storage) at max_batch_size 1, 4, 8,
  and the ratio to batch 1;
- the same model called directly in a loop at the same batch sizes, and service / direct;
- queue latency (submit -> start) p50 / p99 with an idle worker.

    .venv/bin/python bench/batching.py [--jobs 64] [--tokens 64] [--image-jobs 16] [--repeats 3]
                                       [--threads N] [--embedded]

By default it uses Postgres and Redis on 127.0.0.1 when they answer (a
database of its own, dropped afterwards) and local storage; --embedded uses
SQLite and the filesystem broker instead.

Service throughput is a burst of N jobs submitted over HTTP while the worker
is held, then drained: jobs over the span from the first start to the last
completion, as the database recorded them. Holding the worker keeps the
burst's submission work (on the API's own machine in production) off the
cores the model runs on here, and the harness learns that the burst is done
from one count query a quarter second, reading the jobs through the API only
afterwards. "in model" is the share of that span the worker spent inside the
model call; the rest is claims, storage, status writes.

The machines this runs on are shared: the same loop can run 20% slower from
one minute to the next. So the measurements are interleaved in rounds (each
round runs every batch size through the service and directly, alternating
which goes first) and every ratio is the median of the ratios within each
round, measured seconds apart, never of figures taken minutes apart. Rates
are the medians over rounds. --threads (default 1) sets torch's threads for
the worker (GENQ_TORCH_THREADS) and for the direct loop alike.
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
from contextlib import contextmanager, nullcontext
from pathlib import Path

import requests
import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from genq.settings import DEFAULT_REGISTRY, Settings  # noqa: E402

BATCH_SIZES = (1, 4, 8)


def postgres_db():
    """A database of the bench's own on the local Postgres server, dropped afterwards."""
    from genq.db import temporary_database

    admin_url = os.environ.get("GENQ_BENCH_PG_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test")
    return temporary_database(admin_url, f"genq_bench_{secrets.token_hex(4)}")


def services_up() -> bool:
    import socket

    for port in (5432, 6379):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
        except OSError:
            return False
    return True


def write_registry(path: Path, pool: str, checkpoints: dict[str, str] | None = None, dtype: str = "float32") -> None:
    """One entry per batch size, same checkpoint, one pool: one worker serves them all.
    `checkpoints` ({"text": dir, "image": dir}) replaces the demo models (bench/gpu.sh)."""
    base = yaml.safe_load(DEFAULT_REGISTRY.read_text())["models"]
    for family, name in (("text", "demo-text"), ("image", "demo-image")):
        base[name] = {**base[name], "dtype": dtype}
        if (checkpoints or {}).get(family):
            base[name]["checkpoint"] = checkpoints[family]
    models = {}
    for b in BATCH_SIZES:
        # Static batches: continuous batching has its own bench (bench/continuous.py).
        models[f"text-b{b}"] = {**base["demo-text"], "pool": pool, "max_batch_size": b, "max_wait_ms": 50,
                                "batching": "static"}
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
        self.engine = engine = make_engine(settings.database_url)
        with make_sessionmaker(engine).begin() as s:
            _, raw = create_key(s, "bench")
        self.headers = {"Authorization": f"Bearer {raw}"}
        self.server = make_server("127.0.0.1", 0, create_app(settings), threaded=True)
        self.url = f"http://127.0.0.1:{self.server.server_port}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.pool = pool
        self.start_worker()
        self.http = requests.Session()

    def start_worker(self, **env) -> None:
        """Start the worker (settings' environment, then `env`'s GENQ_ variables on top)."""
        # The worker logs at INFO: its "ready." line is how we know it listens.
        env = {**os.environ, **self.settings.as_env(), "PYTHONUNBUFFERED": "1", "GENQ_LOG_LEVEL": "INFO", **env}
        self.worker = subprocess.Popen([sys.executable, "-m", "genq.cli", "worker", "--pool", self.pool, "--preload"],
                                       env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT)
        for line in self.worker.stdout:
            if " ready." in line:
                break
        else:
            raise RuntimeError("worker exited before it was ready")
        threading.Thread(target=lambda: [print(l, end="") for l in self.worker.stdout if "TIMING" in l], daemon=True).start()

    def restart_worker(self, **env) -> None:
        self.worker.terminate()
        self.worker.wait(30)
        self.start_worker(**env)

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
        """The jobs once all have ended. Until then, one count query every quarter
        second: polling each job over HTTP would run the API beside the model."""
        from sqlalchemy import func, select

        from genq.schema import Job

        deadline = time.monotonic() + timeout
        ended = select(func.count()).select_from(Job).where(
            Job.id.in_(ids), Job.status.in_(("succeeded", "failed", "canceled")))
        while True:
            with self.engine.connect() as conn:
                if conn.scalar(ended) == len(ids):
                    break
            if time.monotonic() > deadline:
                raise TimeoutError(f"jobs unfinished after {timeout}s")
            time.sleep(0.25)
        jobs = [self.http.get(f"{self.url}/v1/jobs/{jid}", headers=self.headers, timeout=30).json() for jid in ids]
        for job in jobs:
            if job["status"] != "succeeded":
                raise RuntimeError(f"job {job['id']} {job['status']}: {job['error']}")
        return jobs

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
    return _direct(family, checkpoint_dir, inputs, batch, *direct.target)


# (checkpoint directories by family, device, dtype): set from the command line.
direct.target = ({}, "cpu", "float32")


def _direct(family: str, checkpoint_dir: Path, inputs: list[dict], batch: int, checkpoints: dict, device: str,
            dtype: str) -> tuple[float, int]:
    import importlib

    from models.demo import ensure_checkpoint

    module = importlib.import_module(f"models.{family}")
    key = "demo:text" if family == "text" else "demo:image"
    path = checkpoints.get(family) or ensure_checkpoint(key, checkpoint_dir)
    model = direct.cache.get(family) or module.load(path, device, dtype)
    direct.cache[family] = model
    parsed = [module.Input.model_validate(i) for i in inputs]
    model.run(parsed[:batch], lambda *a: None, lambda r: False)  # warm-up
    started = time.perf_counter()
    units = 0
    for k in range(0, len(parsed), batch):
        for result in model.run(parsed[k:k + batch], lambda *a: None, lambda r: False):
            units += units_of(family, result.output)
    return time.perf_counter() - started, units


direct.cache = {}


def units_of(family: str, output: dict) -> int:
    return output["tokens"] if family == "text" else len(output["images"])


def service_run(svc: Service, family: str, b: int, inputs: list[dict]) -> dict:
    with svc.held():
        ids = svc.submit(f"{family}-b{b}", inputs)
    jobs = svc.wait(ids)
    seconds = span(jobs, "started_at")
    units = sum(units_of(family, j["output"]) for j in jobs)
    return {
        "rate": units / seconds,
        "jobs_per_s": len(jobs) / seconds,
        "units": units,
        "mean_batch": statistics.mean(j["metrics"]["batch_size"] for j in jobs),
        # Share of the span the worker spent inside the model call.
        "in_model": sum(j["metrics"]["run_seconds"] / j["metrics"]["batch_size"] for j in jobs) / seconds,
    }


def measure(svc: Service, family: str, inputs: list[dict], model_dir: Path, repeats: int) -> list[dict]:
    """Rounds of every batch size, service and direct side by side; a row per
    batch size with medians over the rounds and the median within-round ratios."""
    rounds: list[dict[int, tuple[dict, float]]] = []
    for r in range(repeats):
        this: dict[int, tuple[dict, float]] = {}
        for b in BATCH_SIZES:
            # Alternate which goes first, so a machine slowing down or speeding
            # up within a round does not favour one side.
            if r % 2:
                d_seconds, d_units = direct(family, model_dir, inputs, b)
                svc_run = service_run(svc, family, b, inputs)
            else:
                svc_run = service_run(svc, family, b, inputs)
                d_seconds, d_units = direct(family, model_dir, inputs, b)
            if svc_run["units"] != d_units:
                print(f"warning: the service made {svc_run['units']} units, the direct loop {d_units}")
            this[b] = (svc_run, d_units / d_seconds)
        rounds.append(this)
        print(f"  {family} round {r + 1}/{repeats}: " + ", ".join(
            f"b{b} {run['rate']:.1f}/{d:.1f}" for b, (run, d) in this.items()) + " (service/direct units per s)",
            flush=True)
    med = statistics.median
    rows = []
    for b in BATCH_SIZES:
        runs = [rd[b][0] for rd in rounds]
        paired = [rd[b][0]["rate"] / rd[b][1] for rd in rounds]
        rows.append({
            "family": family, "batch": b,
            "mean_batch": med(x["mean_batch"] for x in runs),
            "jobs_per_s": med(x["jobs_per_s"] for x in runs),
            "rate": med(x["rate"] for x in runs),
            "vs_b1": med(rd[b][0]["rate"] / rd[1][0]["rate"] for rd in rounds),
            "direct": med(rd[b][1] for rd in rounds),
            "direct_vs_b1": med(rd[b][1] / rd[1][1] for rd in rounds),
            "svc_direct": med(paired), "svc_direct_range": (min(paired), max(paired)),
            "in_model": med(x["in_model"] for x in runs),
        })
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--jobs", type=int, default=64, help="text jobs per batch size")
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--image-jobs", type=int, default=16)
    ap.add_argument("--latency-jobs", type=int, default=40)
    ap.add_argument("--families", default="text,image")
    ap.add_argument("--repeats", type=int, default=3, help="rounds of every measurement; medians are reported")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads for the worker and the direct loop alike (0: torch's default); "
                         "1 by default: on two cores the worker shares them with the API, Postgres, Redis and this harness")
    ap.add_argument("--embedded", action="store_true", help="SQLite + filesystem broker even if services answer")
    ap.add_argument("--text-checkpoint", help="a text model directory instead of the demo model")
    ap.add_argument("--image-checkpoint", help="a diffusers pipeline directory instead of the demo model")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32")
    args = ap.parse_args()
    checkpoints = {"text": args.text_checkpoint, "image": args.image_checkpoint}
    direct.target = (checkpoints, args.device, args.dtype)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import logging

    import torch

    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # no access log lines between the figures
    if args.threads:
        torch.set_num_threads(args.threads)

    home = Path(tempfile.mkdtemp(prefix="genq-bench-"))
    pool = f"bench-{secrets.token_hex(3)}"
    write_registry(home / "registry.yaml", pool, checkpoints, args.dtype)
    model_dir = Path(os.environ.get("GENQ_MODEL_DIR") or home / "models")
    use_services = services_up() and not args.embedded
    from genq.migrate import upgrade

    with (postgres_db() if use_services else nullcontext()) as pg:
        overrides = dict(home=home, registry_path=home / "registry.yaml", model_dir=model_dir, device=args.device,
                         progress_interval=1.0, log_level="WARNING", torch_threads=args.threads)
        if use_services:
            from cryptography.fernet import Fernet

            # A shared database: the API seals webhook secrets with a configured key.
            overrides.update(database_url=pg, broker_url="redis://127.0.0.1:6379/0",
                             webhook_secret_keys=(Fernet.generate_key().decode(),))
        settings = Settings.from_env({}, **overrides)
        upgrade(settings.database_url)
        print(f"stack: {'Postgres + Redis' if use_services else 'SQLite + filesystem broker'}, local storage; "
              f"torch threads per process: {args.threads or f'default ({torch.get_num_threads()})'}; "
              f"{os.cpu_count()} cores; {args.repeats} rounds", flush=True)
        svc = Service(settings, pool)
        try:
            rows = []
            for family, inputs in (("text", text_inputs(args.jobs, args.tokens)),
                                   ("image", image_inputs(args.image_jobs))):
                if family in args.families.split(","):
                    rows += measure(svc, family, inputs, model_dir, args.repeats)
            print(f"\n{'family':7} {'batch':>5} {'mean':>5} {'jobs/s':>8} {'units/s':>9} {'vs b1':>6} "
                  f"{'direct/s':>9} {'(vs b1)':>7} {'svc/direct':>10} {'(range)':>11} {'in model':>8}")
            for x in rows:
                lo, hi = x["svc_direct_range"]
                print(f"{x['family']:7} {x['batch']:>5} {x['mean_batch']:>5.1f} {x['jobs_per_s']:>8.2f} "
                      f"{x['rate']:>9.1f} {x['vs_b1']:>5.2f}x {x['direct']:>9.1f} {x['direct_vs_b1']:>6.2f}x "
                      f"{x['svc_direct']:>10.2f} {lo:>5.2f}-{hi:<5.2f} {x['in_model']:>7.0%}  "
                      f"({'tokens' if x['family'] == 'text' else 'images'})")

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


if __name__ == "__main__":
    sys.exit(main())
