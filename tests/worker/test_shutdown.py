"""worker/shutdown.py and the batch tracker's shutdown check, without a worker:
a warm shutdown (SIGTERM) gives the batch GENQ_SHUTDOWN_TIMEOUT, a cold one
(SIGQUIT) asks its rows to stop at once, and neither abandons the model
before the deadline's grace has passed."""
from __future__ import annotations

import time
import types

from worker.batch import BatchTracker, Row, Stop
from worker.shutdown import Shutdown


def check(shutdown: Shutdown, rows: list[Row]) -> None:
    settings = types.SimpleNamespace(shutdown_timeout=30.0, shutdown_deadline=40.0)
    tracker = types.SimpleNamespace(runner=types.SimpleNamespace(shutdown=shutdown, settings=settings), rows=rows)
    BatchTracker.check_shutdown(tracker)  # exits the process only past the deadline: not here


def rows() -> list[Row]:
    return [Row(job=types.SimpleNamespace(id=f"job-{i}", attempts=1)) for i in range(3)]


def test_a_warm_shutdown_waits_its_timeout_and_a_cold_one_asks_at_once():
    batch = rows()
    check(Shutdown(), batch)
    assert [r.stop for r in batch] == [None] * 3  # no shutdown: nothing asked

    warm = Shutdown()
    warm.begin()
    assert warm.requested and not warm.cold
    check(warm, batch)
    assert [r.stop for r in batch] == [None] * 3  # 30 s to finish

    cold = Shutdown()
    cold.begin(cold=True)
    assert cold.requested and cold.cold
    check(cold, batch)
    assert [r.stop for r in batch] == [Stop.SHUTDOWN] * 3


def test_a_cold_signal_after_a_warm_one_makes_the_shutdown_cold_and_keeps_its_start():
    shutdown = Shutdown()
    shutdown.begin(now=time.time() - 5)
    began = shutdown._began.value
    shutdown.begin(cold=True)
    assert shutdown.cold and shutdown._began.value == began
    batch = rows()
    check(shutdown, batch)
    assert all(r.stop is Stop.SHUTDOWN for r in batch)
