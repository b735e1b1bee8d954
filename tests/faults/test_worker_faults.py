"""Workers that die or are stopped: SIGKILL mid-batch, a poison job that kills
its worker every time, SIGTERM with a batch that finishes in time and one that
does not, and a job that outlives the broker's visibility timeout."""
from __future__ import annotations

import signal
import time

from tests.faults.conftest import since
from tests.faults.family import POISON
from tests.faults.harness import Figures, statuses, wait_for


def running(stack, ids) -> list[str]:
    return [j for j, s in statuses(stack.settings, ids).items() if s == "running"]


def finished_after_hand_back(stack, ids, scenario: str, signalled: float, exited: float, workers: int = 1,
                             log: str = "") -> Figures:
    """The jobs a leaving worker handed back are all queued; `workers` fresh
    workers then finish them. The scenario's figures, checked."""
    assert set(statuses(stack.settings, ids).values()) == {"queued"}, log
    for _ in range(workers):
        stack.worker()
    done = stack.wait(ids, 60)
    return stack.check(ids, Figures(scenario, recovery_seconds=done - signalled,
                                    notes={"worker exited after": f"{exited}s"}))


def attempts(stack, ids) -> list[int]:
    client = stack.app.test_client()
    return [client.get(f"/v1/jobs/{j}", headers=stack.tenant).get_json()["attempts"] for j in ids]


def test_sigkill_during_a_batch_then_restart_completes_every_job(stack):
    first = stack.worker()
    ids = [stack.submit(prompt=f"job {i}", steps=10, step_seconds=0.1) for i in range(12)]
    wait_for(lambda: len(running(stack, ids)) == 4, 30, "a batch of four running")
    first.proc.send_signal(signal.SIGKILL)
    killed = time.monotonic()
    first.wait_exit(10)
    in_flight = running(stack, ids)
    stack.worker()
    done = stack.wait(ids, 90)
    figures = stack.check(ids, Figures("SIGKILL mid-batch, worker restarted", recovery_seconds=done - killed,
                                       notes={"running at the kill": len(in_flight)}))
    assert figures.succeeded == 12 and figures.rerun == len(in_flight) == 4


def test_a_poison_job_fails_after_max_attempts_and_spares_its_batch_mates(stack):
    supervisor = stack.supervised()
    poison = stack.submit(prompt=POISON)
    mates = [stack.submit(prompt=f"mate {i}", steps=2, step_seconds=0.05) for i in range(5)]
    started = time.monotonic()
    done = stack.wait([poison, *mates], 120)
    figures = stack.check([poison, *mates], Figures("poison job (kills its worker)", recovery_seconds=done - started,
                                                    notes={"worker deaths": supervisor.deaths()}))
    client = stack.app.test_client()
    job = client.get(f"/v1/jobs/{poison}", headers=stack.tenant).get_json()
    assert job["status"] == "failed" and job["attempts"] == 3
    assert job["error"]["code"] == "attempts_exhausted"
    assert "stopped responding on each of 3 attempts" in job["error"]["message"]
    # Killed with it once, then each ran alone: the batch-mates all succeed.
    assert figures.succeeded == 5 and supervisor.deaths() == 3


def test_sigterm_lets_the_batch_finish_and_claims_nothing_more(stack):
    leaving = stack.worker(shutdown_timeout=30)
    batch = [stack.submit(prompt=f"in hand {i}", steps=8, step_seconds=0.15) for i in range(4)]
    wait_for(lambda: len(running(stack, batch)) == 4, 30, "the batch running")
    waiting = [stack.submit(prompt=f"waiting {i}", steps=2, step_seconds=0.05) for i in range(4)]
    leaving.proc.send_signal(signal.SIGTERM)
    signalled = time.monotonic()
    assert leaving.wait_exit(30) == 0
    exited = since(signalled)
    # The batch in hand finished on the leaving worker; nothing else was claimed.
    assert set(statuses(stack.settings, batch).values()) == {"succeeded"}
    assert set(statuses(stack.settings, waiting).values()) == {"queued"}
    stack.worker()
    done = stack.wait(batch + waiting, 60)
    figures = stack.check(batch + waiting, Figures("SIGTERM, batch finishes within the timeout",
                                                   recovery_seconds=done - signalled,
                                                   notes={"worker exited after": f"{exited}s"}))
    assert figures.succeeded == 8 and figures.rerun == 0


def test_sigterm_past_the_timeout_hands_the_batch_back_uncounted(stack):
    leaving = stack.worker(shutdown_timeout=1)
    ids = [stack.submit(prompt=f"long {i}", steps=60, step_seconds=0.1) for i in range(4)]  # 6 s
    wait_for(lambda: len(running(stack, ids)) == 4, 30, "the batch running")
    leaving.proc.send_signal(signal.SIGTERM)
    signalled = time.monotonic()
    assert leaving.wait_exit(30) == 0
    exited = since(signalled)
    assert exited < 4.5, "the worker exits soon after the 1 s shutdown timeout, not after the 6 s batch"
    figures = finished_after_hand_back(stack, ids, "SIGTERM, batch longer than the timeout: handed back",
                                       signalled, exited)
    # Handed back, not failed: each job's one counted attempt is the one that finished it.
    assert attempts(stack, ids) == [1] * 4
    assert figures.succeeded == 4 and figures.rerun == 4


def test_sigterm_reaches_the_children_of_a_prefork_worker(stack):
    # Only the main process gets the signal; its children learn through shared memory.
    leaving = stack.worker(args=["--concurrency", "2"], shutdown_timeout=1)
    ids = [stack.submit(prompt=f"child {i}", steps=50, step_seconds=0.1) for i in range(8)]  # 5 s
    wait_for(lambda: len(running(stack, ids)) == 8, 30, "a batch running in each child")
    leaving.proc.send_signal(signal.SIGTERM)
    signalled = time.monotonic()
    assert leaving.wait_exit(30) == 0
    exited = since(signalled)
    # Handed back by both children, not run to the end.
    figures = finished_after_hand_back(stack, ids, "SIGTERM to a prefork worker (2 children), batches handed back",
                                       signalled, exited, workers=2, log=leaving.log()[-2000:])
    assert figures.succeeded == 8


def test_sigquit_hands_the_batch_back_at_once_instead_of_failing_it(stack):
    # A cold shutdown cancels running tasks; Celery's solo pool cannot, and
    # raises inside the model. The runner knows the shutdown began: it hands back.
    leaving = stack.worker()
    ids = [stack.submit(prompt=f"cut {i}", steps=60, step_seconds=0.1) for i in range(4)]  # 6 s
    wait_for(lambda: len(running(stack, ids)) == 4, 30, "the batch running")
    leaving.proc.send_signal(signal.SIGQUIT)
    signalled = time.monotonic()
    leaving.wait_exit(30)
    exited = since(signalled)
    assert exited < 3, "a cold shutdown does not wait for the batch"
    figures = finished_after_hand_back(stack, ids, "SIGQUIT (cold shutdown) mid-batch: handed back, not failed",
                                       signalled, exited, log=leaving.log()[-2000:])
    assert attempts(stack, ids) == [1] * 4
    assert figures.succeeded == 4


def test_a_job_longer_than_the_visibility_timeout_runs_once(stack):
    # Redis hands an unacked message out again after 2 s; the job takes 5 s.
    # The reconcilers' later rounds are out of the way, so the only doorbell
    # after the first is the message coming back.
    short = {"broker_visibility_timeout": 2, "broker_restore_interval": 0.5, "reconcile_interval": 600}
    busy = stack.worker(**short)
    idle = stack.worker(**short)
    started = time.monotonic()
    job = stack.submit(prompt="slow", steps=25, step_seconds=0.2)
    stack.wait([job], 60)
    redelivered = f"doorbell for job {job}: nothing to claim"
    # The message came back while the job ran, and the worker that got it found nothing to do.
    wait_for(lambda: redelivered in busy.log() + idle.log(), 10, "the redelivered doorbell")
    figures = stack.check([job], Figures("job longer than the visibility timeout (2 s vs 5 s)",
                                         notes={"redeliveries seen": (busy.log() + idle.log()).count(redelivered),
                                                "took": f"{since(started)}s"}))
    assert figures.executions == 1
