"""How fast a batch file becomes jobs, against single submits, in one run.

    .venv/bin/python bench/batch_create.py [--lines 10000] [--singles 1000]

On Postgres (a database of its own, dropped afterwards; GENQ_BENCH_PG_URL or
the local server) through the app in process (Flask's test client, so no HTTP
server or load generator shares the cores): the time to upload a
`--lines`-line batch file (every line checked) and create its batch (every
line a job, inserted 1,000 to a statement), then `--singles` POST /v1/jobs
one after another. Prints both rates and their ratio. No worker runs; the
doorbells go to the embedded filesystem broker under a temporary GENQ_HOME.
"""
from __future__ import annotations

import argparse
import io
import json
import os
import sys
import tempfile
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from cryptography.fernet import Fernet  # noqa: E402

from api.app import create_app  # noqa: E402
from genq.db import temporary_database  # noqa: E402
from genq.migrate import upgrade  # noqa: E402
from genq.settings import Settings  # noqa: E402
from tests.helpers import make_key  # noqa: E402

PG_ADMIN_URL = os.environ.get("GENQ_BENCH_PG_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--lines", type=int, default=10_000)
    parser.add_argument("--singles", type=int, default=1_000)
    parser.add_argument("--quota", type=int, default=0,
                        help="GENQ_MAX_ACTIVE_JOBS for the singles (0: none), which count past the queued batch")
    args = parser.parse_args()
    with temporary_database(PG_ADMIN_URL, f"genq_bench_batch_{uuid.uuid4().hex[:8]}") as url, \
            tempfile.TemporaryDirectory(ignore_cleanup_errors=True) as home:
        # (The last submits' doorbells may still be landing in the filesystem broker's folder as it goes.)
        upgrade(url)
        settings = Settings.from_env({}, home=Path(home), database_url=url, rate_limit="", max_active_jobs=args.quota,
                                     max_file_bytes=64 * 2**20,
                                     webhook_secret_keys=(Fernet.generate_key().decode(),))
        app = create_app(settings)
        client = app.test_client()
        key = make_key(settings, "bench")
        body = "".join(json.dumps({"custom_id": f"r{k}", "method": "POST", "url": "/v1/completions",
                                   "body": {"model": "demo-text", "prompt": f"prompt {k}", "max_tokens": 8}}) + "\n"
                       for k in range(args.lines)).encode()
        started = time.perf_counter()
        f = client.post("/openai/v1/files", headers=key, content_type="multipart/form-data",
                        data={"purpose": "batch", "file": (io.BytesIO(body), "batch.jsonl")})
        assert f.status_code == 200, f.get_json()
        uploaded = time.perf_counter()
        batch = client.post("/openai/v1/batches", headers=key, json={
            "input_file_id": f.get_json()["id"], "endpoint": "/v1/completions", "completion_window": "24h"})
        assert batch.status_code == 200, batch.get_json()
        created = time.perf_counter()
        for k in range(args.singles):
            resp = client.post("/v1/jobs", headers=key,
                               json={"model": "demo-text", "input": {"prompt": f"prompt {k}", "max_new_tokens": 8}})
            assert resp.status_code == 202, resp.get_json()
        singles = time.perf_counter() - created
        batch_seconds = created - started
        batch_rate, single_rate = args.lines / batch_seconds, args.singles / singles
        print(f"batch of {args.lines} lines: upload+check {uploaded - started:.2f} s, create {created - uploaded:.2f} s, "
              f"total {batch_seconds:.2f} s = {batch_rate:,.0f} jobs/s")
        print(f"{args.singles} single POST /v1/jobs: {singles:.2f} s = {single_rate:,.0f} jobs/s "
              f"({args.lines / single_rate:.1f} s for {args.lines})")
        print(f"batch / singles: {batch_rate / single_rate:.1f}x")


if __name__ == "__main__":
    main()
