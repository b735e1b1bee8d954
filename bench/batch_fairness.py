"""Does an interactive job wait behind a big batch? One run, one worker, one pool:

    .venv/bin/python bench/batch_fairness.py [--lines 10000] [--probes 10]

Through the running service (HTTP API -> queue -> worker; Postgres + Redis
when they answer, each bench in a database of its own, else SQLite and the
filesystem broker), on the demo text model:

1. idle: `--probes` interactive jobs one after another on an idle worker; the
   queue latency of each is started_at - created_at (the API's clock for
   both). Their median is the idle queue latency.
2. a `--lines`-line OpenAI-style batch (8 tokens a line) is uploaded and
   created; its jobs fill the worker. Then `--probes` interactive jobs, one a
   second, on the same pool; each one's queue latency again.
3. "one batch's run time": the median time a batch line's job ran
   (completed_at - started_at), the time a row of the running batch takes to
   free its slot.

Prints each probe's latency beside the bound the issue sets (2 x the idle
queue latency + one batch's run time) and how many were within it. Then the
batch is cancelled and the service stopped.
"""
from __future__ import annotations

import argparse
import io
import json
import secrets
import statistics
import sys
import tempfile
import time
from contextlib import nullcontext
from datetime import datetime
from pathlib import Path

import requests
import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.batching import Service, postgres_db, services_up  # noqa: E402
from genq.settings import DEFAULT_REGISTRY, Settings  # noqa: E402


def ts(value: str) -> float:
    return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()


def queue_latency(job: dict) -> float:
    return ts(job["started_at"]) - ts(job["created_at"])


def probe(svc: Service, k: int) -> str:
    r = requests.post(f"{svc.url}/v1/jobs", headers=svc.headers, timeout=30, json={
        "model": "demo-text", "input": {"prompt": f"interactive {k}", "max_new_tokens": 8, "temperature": 0}})
    r.raise_for_status()
    return r.json()["id"]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lines", type=int, default=10_000)
    ap.add_argument("--probes", type=int, default=10)
    ap.add_argument("--embedded", action="store_true", help="SQLite + filesystem broker even if services answer")
    args = ap.parse_args()
    import logging

    logging.getLogger("werkzeug").setLevel(logging.WARNING)
    home = Path(tempfile.mkdtemp(prefix="genq-bench-"))
    pool = f"bench-{secrets.token_hex(3)}"
    models = yaml.safe_load(DEFAULT_REGISTRY.read_text())["models"]
    (home / "registry.yaml").write_text(yaml.safe_dump({"models": {"demo-text": {**models["demo-text"], "pool": pool}}}))
    use_services = services_up() and not args.embedded
    from genq.migrate import upgrade

    with (postgres_db() if use_services else nullcontext()) as pg:
        overrides = dict(home=home, registry_path=home / "registry.yaml", model_dir=home / "models",
                         log_level="WARNING", rate_limit="", max_file_bytes=64 * 2**20)
        if use_services:
            from cryptography.fernet import Fernet

            overrides.update(database_url=pg, broker_url="redis://127.0.0.1:6379/0",
                             webhook_secret_keys=(Fernet.generate_key().decode(),))
        settings = Settings.from_env({}, **overrides)
        upgrade(settings.database_url)
        svc = Service(settings, pool)
        try:
            print(f"stack: {'Postgres + Redis' if use_services else 'SQLite + filesystem broker'}; "
                  f"model demo-text ({models['demo-text'].get('batching', 'its family default')} batching, "
                  f"up to {models['demo-text'].get('max_batch_size')} rows)", flush=True)
            svc.wait([probe(svc, -1)])  # warm: the model loaded, the first claim done
            idle = [queue_latency(svc.wait([probe(svc, k)])[0]) for k in range(args.probes)]
            idle_p50 = statistics.median(idle)
            print(f"idle worker: queue latency p50 {idle_p50 * 1000:.0f} ms, max {max(idle) * 1000:.0f} ms "
                  f"({args.probes} jobs one after another)", flush=True)

            body = "".join(json.dumps({"custom_id": f"r{k}", "method": "POST", "url": "/v1/completions",
                                       "body": {"model": "demo-text", "prompt": f"line {k}", "max_tokens": 8,
                                                "temperature": 0}}) + "\n"
                           for k in range(args.lines)).encode()
            f = requests.post(f"{svc.url}/openai/v1/files", headers=svc.headers, timeout=120,
                              data={"purpose": "batch"}, files={"file": ("batch.jsonl", io.BytesIO(body))})
            f.raise_for_status()
            started = time.monotonic()
            b = requests.post(f"{svc.url}/openai/v1/batches", headers=svc.headers, timeout=120, json={
                "input_file_id": f.json()["id"], "endpoint": "/v1/completions", "completion_window": "24h"})
            b.raise_for_status()
            batch_id = b.json()["id"]
            print(f"batch of {args.lines} lines created in {time.monotonic() - started:.2f} s; probing while it runs",
                  flush=True)
            time.sleep(2)  # the worker is into the batch
            ids = []
            for k in range(args.probes):
                ids.append(probe(svc, 100 + k))
                time.sleep(1)
            probes = [queue_latency(j) for j in svc.wait(ids)]
            got = requests.get(f"{svc.url}/openai/v1/batches/{batch_id}", headers=svc.headers, timeout=30).json()
            done_lines = got["request_counts"]["completed"]
            # One batch line's run time, from the lines that ran: a slot frees that often.
            lines = requests.get(f"{svc.url}/v1/jobs", headers=svc.headers, timeout=30,
                                 params={"limit": 100, "status": "succeeded"}).json()["data"]
            runs = [ts(j["completed_at"]) - ts(j["started_at"]) for j in lines if j["id"] not in ids
                    and j.get("started_at") and "line" in json.dumps(j.get("input", {}))]
            run_p50 = statistics.median(runs) if runs else float("nan")
            bound = 2 * idle_p50 + run_p50
            queued_left = got["request_counts"]["total"] - done_lines - got["request_counts"]["failed"]
            print(f"batch lines run meanwhile: {done_lines} of {args.lines} ({queued_left} still queued or running "
                  f"when the probes ended); one line's run time p50 {run_p50 * 1000:.0f} ms")
            print(f"interactive jobs with the batch queued: queue latency p50 {statistics.median(probes) * 1000:.0f} ms, "
                  f"max {max(probes) * 1000:.0f} ms")
            print(f"bound (2 x idle p50 + one line's run time): {bound * 1000:.0f} ms; within it: "
                  f"{sum(p <= bound for p in probes)} of {len(probes)}; worst / bound = {max(probes) / bound:.2f}")
            requests.post(f"{svc.url}/openai/v1/batches/{batch_id}/cancel", headers=svc.headers, timeout=60)
        finally:
            svc.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
