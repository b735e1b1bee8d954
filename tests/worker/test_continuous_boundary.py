"""The running batch's step boundary, without a database or a model: the
rows that ended at one step are stored and finished while the next step
decodes, and a cancel that reaches such a row before its write does not
write it twice."""
from __future__ import annotations

import threading
import types

from genq.states import JobStatus
from models.text_engine import Update
from worker.batch import Row, Stop
from worker.continuous import Admission, ContinuousBatch, Member


class FakeEngine:
    steps_off_thread = True

    def __init__(self, keys):
        self.rows = list(keys)
        self.stepping = threading.Event()
        self.release = threading.Event()

    def __len__(self):
        return len(self.rows)

    def step(self):
        self.stepping.set()
        assert self.release.wait(10), "the boundary's work never ran while the step decoded"
        key = self.rows.pop(0)
        return [Update(key, 3, 3, "abc", {"text": "abc", "tokens": 3, "finish_reason": "length"})]

    def drop(self, key):
        self.rows.remove(key)


class FakeRunner:
    def __init__(self, engine):
        self.engine = engine
        self.finished, self.published = [], []
        self.shutdown = types.SimpleNamespace(requested=False)
        self.settings = types.SimpleNamespace(lease_seconds=30)
        self.live = types.SimpleNamespace(publish_many=self.published.extend)

    def store(self, job_id, result):
        return result.output

    def finish(self, outcomes):
        # Written while the engine is inside its step (which waits for this write): the overlap.
        assert self.engine.stepping.wait(10), "rows were written before the step began, not while it ran"
        self.finished.extend((row.job.id, status) for row, status, _ in outcomes)
        self.engine.release.set()

    def hand_back(self, rows):
        assert not rows


def batch_of(keys):
    import datetime as dt
    from concurrent.futures import ThreadPoolExecutor

    engine = FakeEngine(keys)
    runner = FakeRunner(engine)
    b = ContinuousBatch.__new__(ContinuousBatch)
    now = dt.datetime.now(dt.timezone.utc)
    b.runner, b.engine, b.door = runner, engine, Admission(open=False)
    b.spec = types.SimpleNamespace(name="demo-text", max_batch_size=4)
    b.members = {k: Member(row=Row(types.SimpleNamespace(id=k, tenant_id="t", started_at=now, created_at=now)),
                           seq=None, in_engine=True) for k in keys}
    b.waiting, b.ended, b.unpublished, b.last_publish = [], [], [], 0.0
    b.stored_ok = True
    b.tracker = types.SimpleNamespace(rows=[], close=lambda: None)
    b.stepper, b.books, b.booking = ThreadPoolExecutor(1), ThreadPoolExecutor(1), None
    return b, runner


def test_rows_that_ended_are_finished_while_the_next_step_decodes():
    b, runner = batch_of(["a", "b"])
    runner.engine.release.set()
    b.apply(b.step())            # "a" ends; nothing to write yet
    runner.engine.release.clear()
    runner.engine.stepping.clear()
    assert runner.finished == [] and [m.row.job.id for m, _ in b.ended] == ["a"]
    b.apply(b.step())            # "a" is written while this step (b's last) decodes
    assert runner.finished == [("a", JobStatus.SUCCEEDED)]
    runner.engine.release.set()
    b.write_finished()
    assert runner.finished == [("a", JobStatus.SUCCEEDED), ("b", JobStatus.SUCCEEDED)]
    assert b.members == {}


def test_a_cancel_that_reaches_an_ended_row_before_its_write_does_not_write_it_twice():
    b, runner = batch_of(["a", "b"])
    runner.engine.release.set()
    b.apply(b.step())            # "a" ended at this step, its write waits for the next boundary
    b.members["a"].row.ask_to_stop(Stop.CANCEL)   # the owner's cancel lands meanwhile
    b.stop_asked()
    assert runner.finished == []
    b.write_finished()
    assert runner.finished == [("a", JobStatus.SUCCEEDED)]
    assert list(b.members) == ["b"]


class SteppingEngine:
    """Rows that run until told: `ends` maps a step number to the key that ends at it."""

    steps_off_thread = True

    def __init__(self, keys, ends):
        self.rows, self.ends, self.steps = list(keys), ends, 0
        self.reached = threading.Event()

    def __len__(self):
        return len(self.rows)

    def step(self):
        self.steps += 1
        if self.steps >= 4:
            self.reached.set()
        key = self.ends.get(self.steps)
        if key is None:
            return [Update(k, self.steps, 100, "", None) for k in self.rows]
        self.rows.remove(key)
        return [Update(key, self.steps, self.steps, "x", {"text": "x", "tokens": self.steps, "finish_reason": "length"})]


def test_a_slow_write_does_not_hold_up_the_decode():
    """The rows that ended are written on the books thread; the running rows
    keep stepping meanwhile, however long the commit takes. Here the write of
    "a" returns only once three more steps have run: a decode that waited for
    it would never get there."""
    b, runner = batch_of(["a", "b"])
    engine = SteppingEngine(["a", "b"], {1: "a"})
    b.engine = engine

    def finish(outcomes):
        assert engine.reached.wait(10), "the decode stood still while a finished row was written"
        runner.finished.extend((row.job.id, status) for row, status, _ in outcomes)

    runner.finish = finish
    for _ in range(5):
        b.apply(b.step())
    assert engine.steps == 5
    b.write_finished()
    assert runner.finished == [("a", JobStatus.SUCCEEDED)] and list(b.members) == ["b"]


def test_a_claim_that_fails_during_a_shutdown_ends_the_batch():
    """Outside a shutdown a claim that fails leaves the running rows running;
    during one it is raised, so the batch hands its rows back at once: a cold
    shutdown raises inside whatever the loop's thread is doing, a claim
    included, and a swallowed one let the batch run to its end (the SIGQUIT
    fault test, once in a few runs)."""
    import time

    import pytest

    b, runner = batch_of(["a"])
    b.took(NotImplementedError("database blip"), time.monotonic())
    assert list(b.members) == ["a"] and b.door.next_claim > time.monotonic()
    runner.shutdown.requested = True
    with pytest.raises(NotImplementedError, match="cold shutdown"):
        b.took(NotImplementedError("the cold shutdown's cancel"), time.monotonic())


def test_jobs_are_claimed_for_the_rows_about_to_end_not_only_for_free_ones():
    """A full batch asks the queue for the rows that end within CLAIM_AHEAD_STEPS steps: the claim's round
    trips run while they finish, and the jobs join the step a row leaves instead of a claim later. Nothing
    more is claimed while a claimed job still waits to join, nor for rows that run on."""
    from worker.continuous import CLAIM_AHEAD_STEPS

    b, runner = batch_of(["a", "b", "c", "d"])
    b.door = Admission()
    left = {"a": 1, "b": CLAIM_AHEAD_STEPS, "c": CLAIM_AHEAD_STEPS + 1, "d": 200}
    b.engine.ending_within = lambda steps: sum(1 for n in left.values() if n <= steps)
    runner.shutdown.requested = False
    assert len(b.engine) == b.spec.max_batch_size
    assert b.claimable() == 2                  # a and b end within the horizon; the batch has no free row
    b.waiting = [object()]
    assert b.claimable() == 0                  # a job claimed ahead still waits: nothing more
    b.waiting = []
    b.engine.rows.remove("d")
    assert b.claimable() == 3                  # a free row, and a and b
    left.update(a=100, b=100)
    b.engine.rows.append("d")
    assert b.claimable() == 0                  # full, and nothing ends soon
    del b.engine.ending_within                 # an engine that cannot say (vLLM's): free rows only
    b.engine.rows.remove("d")
    assert b.claimable() == 1
