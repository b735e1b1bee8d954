"""A queued job's place in line (genq.position) against the order in which
its pool's jobs then actually start, claim by claim (genq.line), on SQLite
and on Postgres."""
from __future__ import annotations

import datetime as dt
import secrets

import pytest
from sqlalchemy import update

from genq import jobs as joblib
from genq.db import make_engine, make_sessionmaker
from genq.keys import create_key
from genq.migrate import upgrade
from genq.position import Line, place_in, Pool
from genq.schema import Job, utcnow
from genq.settings import Settings


@pytest.fixture(params=["sqlite", "postgres"])
def sessions(request, tmp_path):
    if request.param == "sqlite":
        url = Settings.from_env({}, home=tmp_path).database_url
        upgrade(url)
    else:
        url = request.getfixturevalue("pg_url")
    engine = make_engine(url)
    yield make_sessionmaker(engine)
    engine.dispose()


def tenant(sessions, name):
    with sessions.begin() as session:
        owner, _ = create_key(session, f"{name}-{secrets.token_hex(3)}", "user")
        return owner.id


def submit(sessions, tenant_id, pool, priority=0):
    with sessions.begin() as session:
        return joblib.submit(session, tenant_id=tenant_id, type_="text-generation", model="demo-text", pool=pool,
                             batch_key="k", input_={}, priority=priority).id


def test_places_match_the_order_jobs_then_start(sessions):
    pool = f"line-{secrets.token_hex(3)}"
    a, b, c = tenant(sessions, "a"), tenant(sessions, "b"), tenant(sessions, "c")
    # c ran a job here an hour ago: among tenants, it goes after those that never did.
    earlier = submit(sessions, c, pool)
    with sessions.begin() as session:
        hour_ago = utcnow() - dt.timedelta(hours=1)
        session.execute(update(Job).where(Job.id == earlier).values(status="succeeded", started_at=hour_ago,
                                                                      completed_at=hour_ago))
    jobs = [submit(sessions, a, pool), submit(sessions, b, pool, priority=5), submit(sessions, a, pool, priority=10),
            submit(sessions, c, pool), submit(sessions, c, pool, priority=3), submit(sessions, a, pool),
            submit(sessions, b, pool), submit(sessions, a, pool, priority=-1), submit(sessions, c, pool)]
    line = Line(seconds=0)
    with sessions() as session:
        conn = session.connection()
        places = {j: line.place(conn, j) for j in jobs}
    assert sorted(p.position for p in places.values()) == list(range(len(jobs)))
    # Nothing ended in the pace window but c's job an hour ago: no pace, no ETA.
    assert all(p.eta_seconds is None and not p.at_least for p in places.values())
    started = []
    for _ in jobs:
        with sessions.begin() as session:
            head = joblib.pool_head(session, pool)
            claimed = joblib.claim_batch(session, pool=pool, first=head.id, model=head.model,
                                         batch_key=head.batch_key, limit=1, owner="w", lease_seconds=60)
        started.append(claimed[0].id)
    assert [places[j].position for j in started] == list(range(len(jobs)))
    with sessions() as session:
        assert line.place(session.connection(), jobs[0]) is None  # running now: no place in line


def test_the_eta_follows_the_pools_pace(sessions):
    pool = f"pace-{secrets.token_hex(3)}"
    t = tenant(sessions, "pace")
    done = [submit(sessions, t, pool) for _ in range(30)]
    with sessions.begin() as session:
        now = utcnow()
        session.execute(update(Job).where(Job.id.in_(done)).values(status="succeeded", started_at=now,
                                                                     completed_at=now))
    queued = [submit(sessions, t, pool) for _ in range(3)]
    with sessions() as session:
        place = Line().place(session.connection(), queued[2])
    # 30 jobs in the last 300 s: 0.1 a second; third in line: (2 + 1) / 0.1.
    assert place.position == 2 and place.eta_seconds == pytest.approx(30.0)
    assert place.shown() == {"position": 2, "position_is_lower_bound": False, "eta_seconds": 30.0}


def test_the_arithmetic_with_many_tenants():
    never = None
    pool = Pool(queued={"t": 5, "u": 1, "v": 10, "w": 3},
                first={k: dt.datetime(2026, 1, 1, tzinfo=dt.timezone.utc) for k in "tuvw"},
                last_start={"t": never, "u": never, "v": dt.datetime(2026, 1, 2, tzinfo=dt.timezone.utc), "w": never},
                pace=0.0, read_at=0.0)
    # t's job with 2 of its own ahead: rounds 0 and 1 of everyone (u has 1, v 2, w 2), then in
    # round 2 only those before t: none (u and w have never started either but sort after "t").
    assert place_in(pool, "t", 2).position == 2 + 1 + 2 + 2
    # v's first job: v started last, so every other tenant's first job goes before it.
    assert place_in(pool, "v", 0).position == 3


@pytest.mark.parametrize("seed", [1, 2, 3, 4])
def test_random_lines_start_in_the_order_their_places_say(sessions, seed):
    import random

    rnd = random.Random(seed)
    pool = f"rand-{secrets.token_hex(3)}"
    tenants = [tenant(sessions, f"r{k}") for k in range(4)]
    for k, t in enumerate(tenants[:2]):  # two tenants ran jobs here before, at different times
        ran = submit(sessions, t, pool)
        with sessions.begin() as session:
            at = utcnow() - dt.timedelta(minutes=10 * (k + 1))
            session.execute(update(Job).where(Job.id == ran).values(status="succeeded", started_at=at, completed_at=at))
    jobs = [submit(sessions, rnd.choice(tenants), pool, priority=rnd.choice([0, 0, 5, 10])) for _ in range(14)]
    with sessions() as session:
        line = Line(seconds=0)
        places = {j: line.place(session.connection(), j).position for j in jobs}
    started = []
    for _ in jobs:
        with sessions.begin() as session:
            head = joblib.pool_head(session, pool)
            started += [j.id for j in joblib.claim_batch(session, pool=pool, first=head.id, model=head.model,
                                                         batch_key=head.batch_key, limit=1, owner="w",
                                                         lease_seconds=60)]
    assert [places[j] for j in started] == list(range(len(jobs)))
