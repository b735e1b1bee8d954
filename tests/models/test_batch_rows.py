"""models/batch_rows.py: the rows a family runs, their seeds, progress and cancellation."""
from types import SimpleNamespace

import pytest
import torch

from models.batch_rows import StepProgress, generators, live_rows, seeds_of


def job(seed=None, key="a"):
    return SimpleNamespace(seed=seed, key=key)


def test_jobs_cancelled_before_the_start_are_left_out():
    inputs = [job(1), job(2), job(3)]
    live, rows = live_rows(inputs, lambda i: i == 1)
    assert live == [0, 2] and rows == [inputs[0], inputs[2]]
    assert live_rows(inputs, lambda i: True) == ([], [])


def test_live_rows_must_share_the_batch_key():
    inputs = [job(key="a"), job(key="b")]
    with pytest.raises(ValueError, match="batch_key 'a'.*got 'b'"):
        live_rows(inputs, lambda i: False, lambda inp: inp.key)
    # A row with another key that was cancelled before the start is no reason to fail.
    assert live_rows(inputs, lambda i: i == 1, lambda inp: inp.key)[0] == [0]


def test_seeds_default_to_zero_and_each_row_gets_its_own_stream():
    assert seeds_of([job(7), job(None)]) == [7, 0]
    a, b = generators([7, 7], "cpu")
    assert a is not b
    assert torch.equal(torch.rand(3, generator=a), torch.rand(3, generator=b))


def test_progress_reports_live_rows_and_drops_one_cancelled_mid_run():
    cancelled, seen = set(), []
    progress = StepProgress([0, 2, 5], 4, lambda i, step, steps: seen.append((i, step, steps)),
                            lambda i: i in cancelled)
    pipe = SimpleNamespace(_interrupt=False)
    progress.step_end(pipe, 0, None, {})
    cancelled.add(2)
    progress.old_callback(1, None, None)
    assert seen == [(0, 1, 4), (2, 1, 4), (5, 1, 4), (0, 2, 4), (5, 2, 4)]
    assert list(progress.wanted()) == [(0, 0), (2, 5)]
    assert pipe._interrupt is False


def test_every_row_cancelled_interrupts_the_pipeline():
    progress = StepProgress([0, 1], 10, lambda *a: None, lambda i: True)
    pipe = SimpleNamespace(_interrupt=False)
    progress.step_end(pipe, 3, None, {})
    assert pipe._interrupt is True and list(progress.wanted()) == []


def test_callbacks_follow_what_the_pipeline_takes():
    progress = StepProgress([0], 1, lambda *a: None, lambda i: False)
    assert progress.callbacks({"prompt", "callback_on_step_end", "callback"}) == {
        "callback_on_step_end": progress.step_end}
    assert progress.callbacks({"prompt", "callback", "callback_steps"}) == {
        "callback": progress.old_callback, "callback_steps": 1}
    assert progress.callbacks({"prompt"}) == {}
