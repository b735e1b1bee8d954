"""Does a second worker on one pool raise throughput? N text jobs through 1,
then 2 `genq worker` processes on the same pool; prints jobs/s for each and
the ratio.

    OMP_NUM_THREADS=1 .venv/bin/python bench/scaleout.py [--jobs 48] [--tokens 64]

Uses Postgres and Redis on 127.0.0.1 (a database of its own, dropped
afterwards) and local storage. Jobs are inserted while the workers are
stopped, then the workers are started together on a full queue; throughput is
jobs over the span from the first start to the last completion, as the
database recorded them. torch is held to one thread per process in both runs
(OMP_NUM_THREADS=1, set here for the children), so the comparison measures
added processes, not one process's threads spread over more cores.
"""
from __future__ import annotations

import argparse
import os
import secrets
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.batching import postgres_db, services_up  # noqa: E402
from genq.settings import DEFAULT_REGISTRY, Settings  # noqa: E402


def run(settings: Settings, pool: str, workers: int, jobs: int, tokens: int) -> float:
    from sqlalchemy import func, select

    from genq import jobs as joblib
    from genq.db import make_engine, make_sessionmaker
    from genq.keys import create_key
    from genq.queue import make_celery, publish
    from genq.schema import Job
    from models.registry import Registry

    spec = Registry.load(settings.registry_path).get("demo-text")
    sessions = make_sessionmaker(make_engine(settings.database_url))
    ids = []
    with sessions.begin() as s:
        tenant, _ = create_key(s, f"bench-{secrets.token_hex(3)}")
        for i in range(jobs):
            inp = spec.validate({"prompt": f"job {i}", "max_new_tokens": tokens, "temperature": 0, "seed": i})
            ids.append(joblib.submit(s, tenant_id=tenant.id, type_="text-generation", model=spec.name, pool=pool,
                                     batch_key=spec.batch_key(inp), input_=inp.model_dump(mode="json")).id)
    celery = make_celery(settings)
    for job_id in ids:
        publish(celery, job_id, pool)
    env = {**os.environ, **settings.as_env(), "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    procs = [subprocess.Popen([sys.executable, "-m", "genq.cli", "worker", "--pool", pool, "--preload"], env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=ROOT) for _ in range(workers)]
    try:
        while True:
            with sessions() as s:
                left = s.scalar(select(func.count()).where(Job.id.in_(ids), Job.completed_at.is_(None)))
            if not left:
                break
            time.sleep(0.2)
        with sessions() as s:
            first, last = s.execute(select(func.min(Job.started_at), func.max(Job.completed_at)).where(Job.id.in_(ids))).one()
            owners = len(set(s.scalars(select(Job.lease_owner).where(Job.id.in_(ids)))))
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            p.wait(30)
    rate = jobs / (last - first).total_seconds()
    print(f"{workers} worker(s): {jobs} jobs in {(last - first).total_seconds():.2f}s = {rate:.2f} jobs/s "
          f"(jobs ran on {owners} process(es))", flush=True)
    return rate


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=48)
    parser.add_argument("--tokens", type=int, default=64)
    args = parser.parse_args()
    if not services_up():
        sys.exit("bench/scaleout.py needs Postgres on 127.0.0.1:5432 and Redis on 127.0.0.1:6379")
    from genq.migrate import upgrade

    home = Path(tempfile.mkdtemp(prefix="genq-scaleout-"))
    pool = f"scaleout-{secrets.token_hex(3)}"
    base = yaml.safe_load(DEFAULT_REGISTRY.read_text())["models"]["demo-text"]
    registry = home / "registry.yaml"
    # max_batch_size 1: each job is its own forward pass, so the work splits evenly.
    registry.write_text(yaml.safe_dump({"models": {"demo-text": {**base, "pool": pool, "max_batch_size": 1,
                                                                 "max_wait_ms": 0}}}))
    with postgres_db() as url:
        upgrade(url)
        settings = Settings.from_env({}, home=home, database_url=url, broker_url="redis://127.0.0.1:6379/0",
                                     storage_url=(home / "storage").as_uri(), registry_path=registry,
                                     model_dir=Path(os.environ.get("GENQ_MODEL_DIR", home / "models")),
                                     log_level="WARNING")
        one = run(settings, pool, 1, args.jobs, args.tokens)
        two = run(settings, pool, 2, args.jobs, args.tokens)
    print(f"throughput ratio, 2 workers / 1 worker: {two / one:.2f} (cores: {os.cpu_count()}, OMP_NUM_THREADS=1)")


if __name__ == "__main__":
    main()
