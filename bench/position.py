"""What a queued job's place in line costs (genq.position), with 100,000 jobs
queued in one pool over a few tenants (and as many finished), on Postgres:

- a poll of a queued job: its row, then its rank among its tenant's jobs
  (bounded by RANK_CAP), with the pool's counts cached (what every poll pays);
- the pool's counts, read once per POOL_SECONDS per pool per process;
- the plans (EXPLAIN ANALYZE) of the statements.

    .venv/bin/python bench/position.py [--queued 100000] [--tenants 4] [--repeats 30]

It uses a database of its own on the Postgres server at 127.0.0.1 (or
GENQ_BENCH_PG_URL), migrated to head, dropped afterwards. The line is
bench/claims.py's: tenants sharing it 70/15/10/5, priorities 0/10/50.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from sqlalchemy import text  # noqa: E402

from bench.batching import postgres_db  # noqa: E402
from bench.claims import POOL, fill  # noqa: E402
from genq import position  # noqa: E402
from genq.db import make_engine  # noqa: E402
from genq.migrate import upgrade  # noqa: E402


def ms(f, repeats: int) -> float:
    f(), f()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        f()
        times.append((time.perf_counter() - t) * 1000)
    return statistics.median(times)


def explain(conn, statement, params) -> str:
    compiled = statement.compile(dialect=conn.dialect, compile_kwargs={"render_postcompile": True})
    sql = str(compiled)
    values = {**compiled.params, **params}
    plan = conn.exec_driver_sql(f"EXPLAIN (ANALYZE, BUFFERS, COSTS OFF) {sql}", values).scalars().all()
    return "\n".join("    " + line for line in plan)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--queued", type=int, default=100_000)
    ap.add_argument("--tenants", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=30)
    args = ap.parse_args()
    with postgres_db() as url:
        upgrade(url)
        engine = make_engine(url)
        fill(engine, args.queued, args.tenants)
        with engine.connect() as conn:
            # The last job in line of the biggest tenant, the first of the smallest.
            last = conn.execute(text("SELECT id FROM jobs WHERE status = 'queued' AND tenant_id = 't0' "
                                     "ORDER BY priority, created_at DESC LIMIT 1")).scalar()
            first = conn.execute(text(f"SELECT id FROM jobs WHERE status = 'queued' AND tenant_id = "
                                      f"'t{args.tenants - 1}' ORDER BY priority DESC, created_at LIMIT 1")).scalar()
            # The pool's counts kept for the whole run; each job's place read every time.
            line = position.Line(seconds=3600)
            print(f"{args.queued:,} queued in pool {POOL} over {args.tenants} tenants, as many finished; "
                  f"median of {args.repeats}")
            for label, job_id in (("the biggest tenant's last job", last), ("the smallest tenant's first", first)):
                place = line.place(conn, job_id)
                poll = ms(lambda: line._place(conn, job_id), args.repeats)
                print(f"  {label}: position {place.position:,}{'+' if place.at_least else ''}, "
                      f"a poll that reads it {poll:.2f} ms (its row and its bounded rank; the pool's counts cached)")
            cold = ms(lambda: line.pool.__func__(position.Line(seconds=0), conn, POOL), args.repeats)
            print(f"  the pool's counts (once per {position.POOL_SECONDS:g} s per pool per process): {cold:.2f} ms")
            me = conn.execute(position._ME, {"job_id": last}).first()
            rank_params = {"job_id": last, "pool": me.pool, "tenant_id": me.tenant_id, "priority": me.priority,
                           "created_at": me.created_at}
            print("\nplan: the rank (bounded)")
            print(explain(conn, position._AHEAD, rank_params))
            print("plan: the pool's tenants")
            print(explain(conn, position._TENANTS, {"pool": POOL}))
        engine.dispose()
    return 0


if __name__ == "__main__":
    sys.exit(main())
