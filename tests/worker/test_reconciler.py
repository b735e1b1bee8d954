"""The reconciler's doorbells, on Redis and on the filesystem broker: a pool
whose queue still holds a doorbell is not rung again, however long its jobs
wait (a long backlog gets no duplicates round after round); a pool whose
doorbells are gone (a lost publish, a broker restart) is rung."""
from __future__ import annotations

import secrets

import pytest

from genq import jobs as joblib
from genq.db import make_engine, make_sessionmaker
from genq.keys import get_or_create_tenant
from genq.queue import make_celery
from genq.settings import Settings
from tests.conftest import REDIS_URL
from worker.reconciler import Reconciler


@pytest.fixture(params=["redis", "filesystem"])
def settings(request, tmp_path, pg_url) -> Settings:
    broker = REDIS_URL if request.param == "redis" else "filesystem://"
    # Interval 0: every queued job is past the grace period at once.
    return Settings.from_env({}, home=tmp_path / "home", database_url=pg_url, broker_url=broker,
                             reconcile_interval=0)


@pytest.fixture
def sessions(settings):
    engine = make_engine(settings.database_url)
    yield make_sessionmaker(engine)
    engine.dispose()


def queue(sessions, pool: str, jobs: int, models: int = 1) -> None:
    """`jobs` queued jobs of each of `models` models on `pool`, with no doorbell rung."""
    with sessions.begin() as session:
        tenant = get_or_create_tenant(session, f"backlog-{secrets.token_hex(3)}")
        for m in range(models):
            for _ in range(jobs):
                joblib.submit(session, tenant_id=tenant.id, type_="text-generation", model=f"{pool}-m{m}", pool=pool,
                              batch_key="", input_={"prompt": "x"})


def waiting(app, pool: str) -> int:
    with app.connection_for_read() as conn:
        return conn.default_channel.queue_declare(queue=pool, passive=False).message_count


def purge(app, pool: str) -> None:
    with app.connection_for_write() as conn:
        conn.default_channel.queue_purge(pool)


def test_a_pool_whose_doorbell_still_waits_is_not_rung_again(settings, sessions):
    pool = f"backlog-{secrets.token_hex(3)}"
    app = make_celery(settings)
    queue(sessions, pool, jobs=5, models=2)
    reconciler = Reconciler(settings, [pool])
    reconciler.round(sessions, app, first=True)
    # One doorbell per head (model and batch key), as before.
    assert waiting(app, pool) == 2
    for _ in range(3):
        reconciler.round(sessions, app)
    # Still waiting to be taken: ringing again would only add duplicates.
    assert waiting(app, pool) == 2
    purge(app, pool)  # the broker lost them
    reconciler.round(sessions, app)
    assert waiting(app, pool) == 2
    purge(app, pool)


def test_pools_are_judged_each_on_its_own_queue(settings, sessions):
    rung, lost = f"rung-{secrets.token_hex(3)}", f"lost-{secrets.token_hex(3)}"
    app = make_celery(settings)
    queue(sessions, rung, jobs=2)
    queue(sessions, lost, jobs=2)
    reconciler = Reconciler(settings, [rung, lost])
    reconciler.round(sessions, app, first=True)
    purge(app, lost)
    reconciler.round(sessions, app)
    assert (waiting(app, rung), waiting(app, lost)) == (1, 1)
    purge(app, rung)
    purge(app, lost)
