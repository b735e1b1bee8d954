"""`genq api` as production runs it: gunicorn in its own process, on Postgres
and Redis, spoken to over real HTTP. One tenant holding many event streams or
`Prefer: wait` requests must not stall the API for anyone else."""
from __future__ import annotations

import secrets
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests

from sqlalchemy import select

from genq import jobs as joblib
from genq.db import make_engine, make_sessionmaker
from genq.keys import authenticate
from genq.notify import Notifier, notify_after_commit
from genq.schema import Job
from genq.settings import Settings
from tests.conftest import REDIS_URL, WEBHOOK_KEYS
from tests.helpers import genq_api, make_key

PROBLEM = "application/problem+json"
# Each gunicorn worker runs THREADS threads, HELD of which may hold a stream or a
# wait; a tenant may hold PER_TENANT at once across processes.
THREADS, HELD, PER_TENANT = 4, 2, 2
# More streams than any thread pool here has threads (main's fixed 8 included).
MANY = 12
# Safety nets, not measurements: a loaded machine answers well within these.
SAFETY = 45



@pytest.fixture(scope="module")
def server(tmp_path_factory, pg_url, registry_path):
    """`genq api --workers 1` with 4 threads, a held share of 2 and a tenant cap of 2."""
    home = tmp_path_factory.mktemp("api-home")
    settings = Settings.from_env({}, home=home, database_url=pg_url, broker_url=REDIS_URL, registry_path=registry_path,
                                 webhook_secret_keys=WEBHOOK_KEYS)
    extra = dict(GENQ_API_THREADS=str(THREADS), GENQ_API_HELD_THREADS=str(HELD),
                 GENQ_MAX_HELD_REQUESTS=str(PER_TENANT))
    with genq_api(settings, extra) as api:
        # `genq api` runs gunicorn in its own place with the threads the settings say.
        argv = open(f"/proc/{api['proc'].pid}/cmdline").read().split("\0")
        assert "gunicorn" in argv[2] and argv[argv.index("--threads") + 1] == str(THREADS), argv
        yield {**api, "settings": settings}


def tenant(server, name: str) -> dict:
    return make_key(server["settings"], f"{name}-{secrets.token_hex(3)}")


def submit(server, headers) -> str:
    """A job that stays queued: no worker runs in these tests."""
    resp = requests.post(f"{server['url']}/v1/jobs", headers=headers, timeout=SAFETY,
                         json={"model": "demo-text", "input": {"prompt": "held"}})
    assert resp.status_code == 202, resp.text
    return resp.json()["id"]


def cancel_queued(server, headers) -> None:
    """Cancel the tenant's queued jobs in the database (not through an API that
    may be stalled): their streams and waits end with them."""
    engine = make_engine(server["settings"].database_url)
    sessions = make_sessionmaker(engine)
    # Published like a worker's or an API's cancel: the streams hear it now, not at the
    # stream server's slow re-check (which made this module's first test take 30 s).
    notify_after_commit(sessions, Notifier.from_settings(server["settings"]))
    with sessions.begin() as session:
        tenant_id = authenticate(session, headers["Authorization"].split()[1])[0].id
        for job in session.scalars(select(Job).where(Job.tenant_id == tenant_id, Job.status == "queued")):
            joblib.cancel(session, job)
    engine.dispose()


def open_stream(server, headers, job_id: str) -> requests.Response | str:
    """An event stream, open once its headers arrived; 'timeout' if they never did."""
    try:
        return requests.get(f"{server['url']}/v1/jobs/{job_id}/events", stream=True, timeout=(SAFETY, SAFETY),
                            headers={**headers, "Accept": "text/event-stream"})
    except requests.Timeout:
        return "timeout"


def status(resp) -> int | str:
    return resp if isinstance(resp, str) else resp.status_code


def answers(url: str, headers: dict | None = None) -> int | str:
    try:
        return requests.get(url, headers=headers or {}, timeout=SAFETY).status_code
    except requests.Timeout:
        return f"no answer in {SAFETY}s"


def test_one_tenants_event_streams_are_capped_and_never_stall_the_api(server):
    alice, bob = tenant(server, "streamer"), tenant(server, "bystander")
    job = submit(server, alice)
    with ThreadPoolExecutor(MANY) as pool:
        streams = list(pool.map(lambda _: open_stream(server, alice, job), range(MANY)))
    try:
        # The API still answers everyone while those streams are held (on main,
        # /healthz waited behind them for a thread and never answered).
        assert answers(f"{server['url']}/healthz") == 200
        assert answers(f"{server['url']}/v1/jobs", bob) == 200
        codes = sorted((status(s) for s in streams), key=str)
        # The cap is counted atomically: exactly PER_TENANT streams, the rest refused.
        assert codes == [200] * PER_TENANT + [429] * (MANY - PER_TENANT), codes
        refused = next(s for s in streams if s.status_code == 429)
        assert refused.headers["Content-Type"] == PROBLEM and int(refused.headers["Retry-After"]) >= 1
        assert "event streams" in refused.json()["detail"]
        # Streams hold no thread (they are handed to the stream server,
        # api/fanout.py): another tenant's stream is served at once, where it
        # used to be refused 503 for the process's share of threads.
        theirs = open_stream(server, bob, submit(server, bob))
        assert status(theirs) == 200, status(theirs)
        assert theirs.headers["Content-Type"].startswith("text/event-stream")
        theirs.close()
    finally:
        cancel_queued(server, bob)
        cancel_queued(server, alice)
        # The job's end ends its streams, and each frees its slot as it ends.
        for s in streams:
            if not isinstance(s, str) and s.status_code == 200:
                kinds = [line for line in s.iter_lines(decode_unicode=True) if line.startswith("event: ")]
                assert kinds[-1] == "event: completed"
            if not isinstance(s, str):
                s.close()
    again = open_stream(server, alice, submit(server, alice))
    assert status(again) == 200
    cancel_queued(server, alice)
    # Read to its end: then its slot is free (a stream closed early frees it
    # only once the server next writes to it), and the next test starts clean.
    assert [line for line in again.iter_lines(decode_unicode=True) if line.startswith("event: ")][-1] == "event: completed"
    again.close()


def test_prefer_wait_past_the_cap_is_answered_at_once_and_never_stalls_the_api(server):
    carol, dave = tenant(server, "waiter"), tenant(server, "bystander")
    body = {"model": "demo-text", "input": {"prompt": "wait"}}

    def post():
        return requests.post(f"{server['url']}/v1/jobs", json=body, timeout=(SAFETY, 120),
                             headers={**carol, "Prefer": "wait=60"})

    pool = ThreadPoolExecutor(MANY)
    try:
        futures = [pool.submit(post) for _ in range(MANY)]
        # Waits past the cap are not honoured: those submits are answered at once.
        deadline = time.monotonic() + SAFETY
        while sum(f.done() for f in futures) < MANY - PER_TENANT:
            assert time.monotonic() < deadline, f"only {sum(f.done() for f in futures)} submits answered in {SAFETY}s"
            time.sleep(0.1)
        quick = [f.result() for f in futures if f.done()]
        assert all(r.status_code == 202 and "Preference-Applied" not in r.headers for r in quick)
        assert answers(f"{server['url']}/healthz") == 200
        assert answers(f"{server['url']}/v1/jobs", dave) == 200
    finally:
        # Ending the held jobs ends their waits.
        cancel_queued(server, carol)
        pool.shutdown(wait=True)
    replies = [f.result() for f in futures]
    honoured = [r for r in replies if "Preference-Applied" in r.headers]
    assert len(honoured) == PER_TENANT
    assert all(r.status_code == 200 and r.json()["status"] == "canceled" and r.headers["Preference-Applied"] == "wait=60"
               for r in honoured)
