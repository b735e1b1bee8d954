"""What a claim costs on Postgres with a long line, side by side:

- before: main's claim (one model and batch key, by priority then age) on main's indexes;
- after: the pool's head, then its batch, tenants taking turns (genq.line), on the new indexes;
- after on main's indexes: the same claim without the migration's indexes, to show what they buy;
- window: the same order from `row_number() over (partition by tenant ...)` over the queue, the
  first shape tried, on the new indexes;

with 10,000 and 100,000 jobs queued over a few tenants, then the plans (EXPLAIN ANALYZE) of
the queries the new claim runs.

    .venv/bin/python bench/claims.py [--sizes 10000 100000] [--repeats 30] [--tenants 4]

It uses a database of its own on the Postgres server at 127.0.0.1 (or
GENQ_BENCH_PG_URL), migrated to head, dropped afterwards. The line: one pool,
two models, three batch keys, priorities 0/10/50, tenants sharing it 70/15/10/5
(the first floods it), plus as many finished jobs as queued ones (the history
each tenant's last start is looked up in). Each claim runs in a transaction
that is rolled back, so every repeat sees the same line; the figure is the
median wall time of the whole claim (every statement, as the worker sends
them), in milliseconds.
"""
from __future__ import annotations

import argparse
import datetime as dt
import os
import secrets
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from sqlalchemy import event, func, select, text, update  # noqa: E402

from genq import jobs as joblib  # noqa: E402
from genq import webhooks  # noqa: E402
from genq.db import make_engine, make_sessionmaker, temporary_database  # noqa: E402
from genq.migrate import upgrade  # noqa: E402
from genq.schema import Job, Pool, utcnow  # noqa: E402
from genq.states import JobStatus  # noqa: E402

POOL = "bench"
LIMIT = 8
# The migration's indexes, and main's one index for the claim.
NEW_INDEXES = ("ix_jobs_claim", "ix_jobs_line", "ix_jobs_served")
MAIN_INDEX = "CREATE INDEX ix_jobs_claim ON jobs (status, model, batch_key, priority, created_at)"


def main_claim(session, *, model: str, batch_key: str, limit: int, owner: str, lease_seconds: float) -> list[Job]:
    """main's claim_batch (before this change), for the "before" column."""
    now = utcnow()
    paused = select(Pool.name).where(Pool.paused.is_(True))
    candidates = (
        select(Job.id, Job.attempts)
        .where(Job.status == JobStatus.QUEUED.value, Job.model == model, Job.batch_key == batch_key,
               Job.pool.not_in(paused))
        .order_by(Job.priority.desc(), Job.created_at.asc(), Job.id.asc())
        .limit(limit)
        .with_for_update(skip_locked=True)
    )
    rows = session.execute(candidates).all()
    ids = [rows[0].id] if rows and rows[0].attempts > 0 else [r.id for r in rows if r.attempts == 0]
    if not ids:
        return []
    jobs = list(session.scalars(
        update(Job).where(Job.id.in_(ids), Job.status == JobStatus.QUEUED.value)
        .values(status=JobStatus.RUNNING.value, lease_owner=owner,
                lease_until=now + dt.timedelta(seconds=lease_seconds), attempts=Job.attempts + 1, started_at=now,
                updated_at=now)
        .returning(Job).execution_options(populate_existing=True, synchronize_session=False)))
    for job in jobs:
        joblib.record_event(session, job.id, "start", {"attempt": job.attempts, "worker": owner}, at=now)
        webhooks.enqueue(session, job, "start", now=now)
    return jobs


def claim_before(session) -> list[Job]:
    # main: the doorbell's job names the model and batch key (a primary-key read), then the claim.
    session.execute(select(Job.model, Job.batch_key, Job.status).where(Job.id == FIRST["id"])).first()
    return main_claim(session, model="m0", batch_key="k0", limit=LIMIT, owner="bench", lease_seconds=30)


def claim_after(session) -> list[Job]:
    head = joblib.pool_head(session, POOL)
    return joblib.claim_batch(session, pool=POOL, first=head.id, model=head.model, batch_key=head.batch_key,
                              limit=LIMIT, owner="bench", lease_seconds=30)


def window_line(pool: str):
    """The line as a window function over the pool's queue (every queued row ranked)."""
    turn = func.row_number().over(partition_by=Job.tenant_id,
                                  order_by=(Job.priority.desc(), Job.created_at.asc(), Job.id.asc()))
    queued = select(Job.id, Job.tenant_id, Job.model, Job.batch_key, Job.attempts, Job.created_at,
                    turn.label("turn")).where(Job.status == JobStatus.QUEUED.value, Job.pool == pool).cte("queued")
    last = select(func.max(Job.started_at)).where(Job.pool == pool, Job.tenant_id == queued.c.tenant_id) \
        .scalar_subquery()
    tenants = select(queued.c.tenant_id, last.label("last_start")).where(queued.c.turn == 1) \
        .cte("tenants").prefix_with("MATERIALIZED")
    line = select(queued, tenants.c.last_start).join(tenants, tenants.c.tenant_id == queued.c.tenant_id) \
        .subquery("line")
    return line, (line.c.turn, line.c.last_start.asc().nulls_first(), line.c.created_at, line.c.id)


def claim_window(session) -> list[Job]:
    """The head and its batch from the window, the rows locked apart, then main's update."""
    line, order = window_line(POOL)
    head = session.execute(select(line.c.id, line.c.model, line.c.batch_key).order_by(*order).limit(1)).first()
    line, order = window_line(POOL)
    ids = session.scalars(select(line.c.id).where(line.c.model == head.model, line.c.batch_key == head.batch_key)
                          .order_by(*order).limit(LIMIT)).all()
    ids = session.scalars(select(Job.id).where(Job.id.in_(ids)).with_for_update(skip_locked=True)).all()
    now = utcnow()
    return list(session.scalars(
        update(Job).where(Job.id.in_(ids), Job.status == JobStatus.QUEUED.value)
        .values(status=JobStatus.RUNNING.value, lease_owner="bench", lease_until=now, attempts=Job.attempts + 1,
                started_at=now, updated_at=now)
        .returning(Job).execution_options(populate_existing=True, synchronize_session=False)))


FIRST: dict[str, str] = {}


def fill(engine, queued: int, tenants: int) -> None:
    """`queued` jobs in line and as many finished, over `tenants` tenants."""
    weights = [70, 15, 10, 5][:tenants] + [5] * max(tenants - 4, 0)
    # g % 100 picks the tenant by the weights: tenant 0 for the first 70 of every 100, and so on.
    bounds, acc = [], 0
    for w in weights:
        acc += w * 100 // sum(weights)
        bounds.append(acc)
    tenant_of = "CASE " + " ".join(f"WHEN g % 100 < {b} THEN 't{i}'" for i, b in enumerate(bounds[:-1])) + \
                f" ELSE 't{len(bounds) - 1}' END"
    with engine.begin() as conn:
        conn.execute(text("TRUNCATE jobs, tenants CASCADE"))
        for i in range(tenants):
            conn.execute(text("INSERT INTO tenants (id, name, created_at) VALUES (:id, :id, now())"), {"id": f"t{i}"})
        for status, offset in (("succeeded", 2 * queued), ("queued", queued)):
            attempts, started = ("0", "NULL") if status == "queued" else ("1", "created")
            conn.execute(text(f"""
                INSERT INTO jobs (id, tenant_id, type, model, pool, batch_key, status, input, priority, attempts,
                                  max_attempts, cancel_requested, webhook_events_filter, metrics, created_at,
                                  started_at, updated_at)
                SELECT lpad(to_hex(:offset - g), 32, '0'), {tenant_of}, 'image-generation', 'm' || (g % 2), :pool,
                       'k' || (g % 3), '{status}', '{{}}', (ARRAY[0, 0, 10, 50])[g % 4 + 1], {attempts}, 3, false,
                       '["completed"]', '{{}}', created, {started}, now()
                FROM generate_series(1, :count) AS g, LATERAL (SELECT now() - make_interval(secs => :offset - g)
                                                               AS created) AS c"""),
                         {"count": queued, "offset": offset, "pool": POOL})
        conn.execute(text("ANALYZE jobs"))
        FIRST["id"] = conn.execute(text("SELECT id FROM jobs WHERE status = 'queued' AND model = 'm0' AND "
                                        "batch_key = 'k0' ORDER BY created_at LIMIT 1")).scalar()


def timed(sessions, claim, repeats: int) -> float:
    """Median ms of `repeats` claims after two to warm the caches (five, for a
    claim slower than half a second: the figure is plain enough then)."""
    times: list[float] = []
    while len(times) < 2 + (repeats if len(times) < 2 or times[1] < 500 else 5):
        session = sessions()
        started = time.perf_counter()
        batch = claim(session)
        session.flush()
        times.append((time.perf_counter() - started) * 1000)
        assert len(batch) == LIMIT, len(batch)
        session.rollback()
        session.close()
    return statistics.median(times[2:])


def plans(engine, sessions, claim) -> list[str]:
    """EXPLAIN ANALYZE of each SELECT the claim sends, as it sends it."""
    sent: list[tuple[str, object]] = []

    def keep(conn, cursor, statement, parameters, context, executemany):
        if statement.lstrip().upper().startswith(("SELECT", "WITH")):
            sent.append((statement, parameters))

    event.listen(engine, "before_cursor_execute", keep)
    with sessions() as session:
        claim(session)
        session.rollback()
    event.remove(engine, "before_cursor_execute", keep)
    out = []
    with engine.connect() as conn:
        conn.exec_driver_sql("SET LOCAL jit = off")  # as genq.line sets it for the claim
        for statement, parameters in sent:
            rows = conn.exec_driver_sql("EXPLAIN (ANALYZE, COSTS OFF) " + statement, parameters).scalars().all()
            out.append(statement.strip().splitlines()[0][:100] + " ...\n" + "\n".join("    " + r for r in rows))
        conn.rollback()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000])
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--tenants", type=int, default=4)
    args = parser.parse_args()
    admin_url = os.environ.get("GENQ_BENCH_PG_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test")
    with temporary_database(admin_url, f"genq_bench_{secrets.token_hex(4)}") as url:
        upgrade(url)
        engine = make_engine(url)
        sessions = make_sessionmaker(engine)
        with engine.connect() as conn:
            new_indexes = [conn.execute(text("SELECT indexdef FROM pg_indexes WHERE indexname = :n"),
                                        {"n": name}).scalar_one() for name in NEW_INDEXES]

        def indexes(definitions) -> None:
            with engine.begin() as conn:
                for name in NEW_INDEXES:
                    conn.execute(text(f"DROP INDEX IF EXISTS {name}"))
                for definition in definitions:
                    conn.execute(text(definition))
                conn.execute(text("ANALYZE jobs"))

        print(f"claim of a batch of {LIMIT}, median of {args.repeats}, ms; {args.tenants} tenants 70/15/10/5")
        print(f"{'queued':>8} {'before':>8} {'after':>8} {'after on main indexes':>22} {'window':>8}")
        all_plans = {}
        for size in args.sizes:
            fill(engine, size, args.tenants)
            after = timed(sessions, claim_after, args.repeats)
            window = timed(sessions, claim_window, args.repeats)
            all_plans[size] = plans(engine, sessions, claim_after)
            indexes([MAIN_INDEX])
            before = timed(sessions, claim_before, args.repeats)
            bare = timed(sessions, claim_after, args.repeats)
            indexes(new_indexes)
            print(f"{size:>8} {before:>8.2f} {after:>8.2f} {bare:>22.2f} {window:>8.2f}", flush=True)
        for size, found in all_plans.items():
            print(f"\n--- plans with {size} queued (after) ---")
            for p in found:
                print(p)
        engine.dispose()


if __name__ == "__main__":
    main()
