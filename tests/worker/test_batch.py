"""What becomes of each job of a batch once the model returns, as a table: no
database, no model. And a row's one stop reason: a stronger one replaces a
weaker, never the other way."""
from __future__ import annotations

import pytest

from worker.batch import Phase, Ran, Row, Stop, Verdict, verdict, verdicts

C, E, D = Phase.CLAIMED, Phase.EXECUTING, Phase.DONE
RESULT, NOTHING, FAILED, RAISED = Ran.RESULT, Ran.NOTHING, Ran.FAILED, Ran.RAISED
OWNER, LOST, LEAVING = Stop.CANCEL, Stop.LEASE_LOST, Stop.SHUTDOWN
SUCCEED, FAIL, CANCEL, BACK, DROP, NONE = (Verdict.SUCCEED, Verdict.FAIL, Verdict.CANCEL, Verdict.HAND_BACK,
                                           Verdict.DROP, Verdict.NONE)

TABLE = [
    # phase, stop, what the model gave, shutting down -> verdict
    # Running normally.
    (E, None, RESULT, False, SUCCEED),
    (E, None, FAILED, False, FAIL),
    (E, None, RAISED, False, FAIL),
    (E, None, NOTHING, False, FAIL),  # no result, never asked to stop: the model's fault
    # Its owner cancelled it.
    (E, OWNER, NOTHING, False, CANCEL),
    (E, OWNER, RESULT, False, SUCCEED),  # its last step came before the cancel: the work is done, kept
    (E, OWNER, FAILED, False, FAIL),
    (E, OWNER, RAISED, False, FAIL),
    (D, OWNER, NOTHING, False, NONE),  # an inference row, finished canceled the moment the cancel was seen
    (D, OWNER, RESULT, False, NONE),
    # The lease is lost: nothing is written, whatever the model gave.
    (E, LOST, RESULT, False, DROP),
    (E, LOST, NOTHING, False, DROP),
    (E, LOST, FAILED, False, DROP),
    (E, LOST, RAISED, False, DROP),
    (E, LOST, RAISED, True, DROP),
    (E, LOST, NOTHING, True, DROP),
    # Shutting down: the timeout passed and the row was asked to stop.
    (E, LEAVING, NOTHING, True, BACK),
    (E, LEAVING, RESULT, True, SUCCEED),  # finished its last step before it saw the stop
    (E, LEAVING, FAILED, True, FAIL),  # its own failure (a NaN loss) is no interruption
    (E, LEAVING, RAISED, True, BACK),
    # Shutting down within the timeout: the batch runs to its end.
    (E, None, RESULT, True, SUCCEED),
    (E, None, FAILED, True, FAIL),
    # A cold shutdown raises inside the model (or before it starts): the jobs did nothing wrong.
    (E, None, RAISED, True, BACK),
    (C, None, RAISED, True, BACK),
    (E, OWNER, RAISED, True, CANCEL),  # its owner's wish outlives the shutdown
    (E, OWNER, NOTHING, True, CANCEL),
    (D, None, RAISED, True, NONE),
    (D, LEAVING, NOTHING, True, NONE),
]


@pytest.mark.parametrize("phase, stop, ran, shutting_down, expected", TABLE,
                         ids=[f"{p.value}-{s.name if s else 'running'}-{r.value}-{'shutdown' if sd else 'up'}"
                              for p, s, r, sd, _ in TABLE])
def test_the_outcome_of_a_row(phase, stop, ran, shutting_down, expected):
    assert verdict(phase, stop, ran, shutting_down) is expected


def test_the_table_covers_every_combination_a_row_can_be_in():
    """Every phase, stop reason and result appears, so no case is left to chance."""
    seen = {(p, s, r) for p, s, r, *_ in TABLE}
    assert {p for p, _, _ in seen} == set(Phase)
    assert {s for _, s, _ in seen} == {None, *Stop}
    assert {r for _, _, r in seen} == set(Ran)


def row(phase: Phase = E, stop: Stop | None = None) -> Row:
    return Row(job=None, phase=phase, stop=stop)


def test_a_batch_cut_short_by_a_shutdown_hands_back_only_what_is_still_its_own():
    rows = [row(D, OWNER), row(E, LOST), row(E, LEAVING), row(E, LEAVING), row(E)]
    # The model returned: a result for the row done just in time, none for the rows it stopped.
    results = [None, None, object(), None, object()]
    assert verdicts(rows, results, shutting_down=True) == [NONE, DROP, SUCCEED, BACK, SUCCEED]
    # The model raised instead: the rows still this worker's go back, none fails.
    assert verdicts(rows, None, shutting_down=True) == [NONE, DROP, BACK, BACK, BACK]
    # Raised with no shutdown: the rows still this worker's fail.
    assert verdicts(rows, None, shutting_down=False) == [NONE, DROP, FAIL, FAIL, FAIL]


@pytest.mark.parametrize("first, then, kept", [
    (LEAVING, OWNER, OWNER),  # a cancel asked during a shutdown ends the job canceled
    (OWNER, LEAVING, OWNER),  # ...and a shutdown does not send a cancelled job back to the queue
    (LEAVING, LOST, LOST),  # a row cannot be handed back and lost at once: lost wins
    (LOST, LEAVING, LOST),
    (OWNER, LOST, LOST),
    (LOST, OWNER, LOST),
])
def test_a_row_has_one_stop_reason_and_the_stronger_one_wins(first, then, kept):
    r = row()
    assert r.ask_to_stop(first)
    assert r.ask_to_stop(then) is (then is kept)
    assert r.stop is kept


def test_a_done_row_is_not_asked_to_stop_and_settling_says_whether_it_ran():
    r = row(C)
    assert r.settle() is False  # never started: nothing to end in the execution log
    assert not r.ask_to_stop(LOST) and r.stop is None and not r.held
    r = row(E, LEAVING)
    assert r.held and r.settle() is True and not r.held
