"""`genq up`'s supervision of its children, with real child processes: a child
that dies is started again after a growing wait, what it left behind is
handled first, quick deaths in a row end in giving up, and a stopped child
stays stopped. (tests/test_up.py kills the worker of a real `genq up`.)"""
from __future__ import annotations

import logging
import os
import sys
import threading

from api.supervise import Child, describe

SAFETY = 60  # seconds; a net for a loaded machine, not a measurement


def python(code: str) -> list[str]:
    return [sys.executable, "-c", code]


def test_a_child_dying_quickly_again_and_again_is_restarted_then_given_up_on(caplog):
    caplog.set_level(logging.INFO, logger="genq")
    deaths: list[int] = []
    gave_up = threading.Event()
    child = Child("doomed", python("import os, signal; os.kill(os.getpid(), signal.SIGKILL)"), dict(os.environ),
                  on_death=lambda pid: deaths.append(pid) or "cleaned up", on_give_up=gave_up.set,
                  backoff=(0.05, 0.1), give_up_after=3).start()
    assert gave_up.wait(SAFETY)
    child._thread.join(SAFETY)
    # Each death handled once, before the next start; three processes in all, none started after giving up.
    assert len(set(deaths)) == 3 and child.gave_up and child.proc.pid == deaths[-1]
    said = [(r.levelname, r.getMessage()) for r in caplog.records if r.name == "genq"]
    assert said == [
        ("WARNING", f"doomed (pid {deaths[0]}) was killed by SIGKILL; cleaned up; starting it again in 0.05s"),
        ("WARNING", f"doomed (pid {deaths[1]}) was killed by SIGKILL; cleaned up; starting it again in 0.1s"),
        ("ERROR", f"doomed (pid {deaths[2]}) was killed by SIGKILL; cleaned up; it died 3 times in a row "
                  "within 60s of starting: giving up, genq up stops"),
    ]


def test_a_child_that_ran_a_while_before_dying_starts_the_count_again():
    deaths: list[int] = []
    enough = threading.Event()

    def died(pid):
        deaths.append(pid)
        if len(deaths) == 4:
            enough.set()

    # Lives 0.3 s each time: never a quick death when quick means under 0.1 s.
    child = Child("flaky", python("import time; time.sleep(0.3); raise SystemExit(3)"), dict(os.environ),
                  on_death=died, backoff=(0.01,), quick=0.1, give_up_after=2).start()
    try:
        assert enough.wait(SAFETY)
        assert not child.gave_up
    finally:
        child.stop()
        child.join(SAFETY)


def test_a_stopped_child_is_ended_and_not_started_again():
    deaths: list[int] = []
    child = Child("sleeper", python("import time; time.sleep(600)"), dict(os.environ), on_death=deaths.append).start()
    first = child.proc.pid
    child.stop()
    child.join(SAFETY)
    child._thread.join(SAFETY)
    assert not child._thread.is_alive()
    assert (child.proc.pid, child.proc.returncode, deaths) == (first, -15, [])


def test_a_failing_clean_up_does_not_stop_the_restart(caplog):
    started = threading.Event()
    calls: list[int] = []

    def broken(pid):
        calls.append(pid)
        if len(calls) > 1:
            started.set()
        raise RuntimeError("database is down")

    child = Child("w", python("raise SystemExit(1)"), dict(os.environ), on_death=broken, backoff=(0.01,),
                  give_up_after=100).start()
    try:
        assert started.wait(SAFETY)
    finally:
        child.stop()
        child.join(SAFETY)
    assert "could not take back its jobs (database is down); they wait for their leases to lapse" in caplog.text


def test_describe_says_how_a_process_ended():
    assert [describe(c) for c in (0, 3, -9, -15)] == [
        "exited with code 0", "exited with code 3", "was killed by SIGKILL", "was killed by SIGTERM"]
