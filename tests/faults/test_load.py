"""A thousand jobs submitted at once over HTTP, with a hundred duplicate
requests (same Idempotency-Key) racing them: a thousand jobs, each terminal
once, none run twice."""
from __future__ import annotations

import random
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import requests
from sqlalchemy import func, select
from werkzeug.serving import make_server

from genq.db import make_engine, make_sessionmaker
from genq.schema import Job
from tests.faults.harness import Figures

JOBS = 1000
DUPLICATES = 100


def test_a_thousand_concurrent_submissions_make_a_thousand_jobs_each_run_once(stack_factory):
    stack = stack_factory(max_batch_size=64)
    server = make_server("127.0.0.1", 0, stack.app, threaded=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_port}/v1/jobs"
    stack.worker()
    stack.worker()
    requests_ = [f"job-{i}" for i in range(JOBS)] + [f"job-{i}" for i in random.sample(range(JOBS), DUPLICATES)]
    random.shuffle(requests_)
    local = threading.local()

    def submit(key: str):
        session = getattr(local, "session", None) or requests.Session()
        local.session = session
        resp = session.post(url, json=stack.body(prompt=key), headers={**stack.tenant, "Idempotency-Key": key},
                            timeout=60)
        return key, resp.status_code, resp.json()["id"]

    started = time.monotonic()
    try:
        with ThreadPoolExecutor(16) as pool:
            answers = list(pool.map(submit, requests_))
        submitted = time.monotonic() - started
        by_key: dict[str, set[str]] = {}
        for key, status, job_id in answers:
            assert status in (200, 202), (key, status)  # 200: a replay of a job already done
            by_key.setdefault(key, set()).add(job_id)
        assert all(len(ids) == 1 for ids in by_key.values()), "a duplicate request got a different job"
        ids = sorted({job_id for ids in by_key.values() for job_id in ids})
        assert len(ids) == JOBS
        done = stack.wait(ids, 120)
    finally:
        server.shutdown()
    engine = make_engine(stack.settings.database_url)
    with make_sessionmaker(engine)() as session:
        assert session.scalar(select(func.count()).select_from(Job).where(Job.model == stack.model)) == JOBS
    engine.dispose()
    figures = stack.check(ids, Figures(f"{JOBS} jobs submitted concurrently (+{DUPLICATES} duplicate requests)",
                                       notes={"submit": f"{submitted:.1f}s ({len(requests_) / submitted:.0f}/s, 16 clients)",
                                              "submit to all terminal": f"{done - started:.1f}s"}))
    assert figures.succeeded == JOBS and figures.executions == JOBS
