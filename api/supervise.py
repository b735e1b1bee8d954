"""`genq up`'s child processes, kept running: a child that dies (killed by the
kernel, out of memory, a crash) is started again after a wait that grows with
each quick death in a row, and after too many of those `genq up` gives up and
stops, saying why. What a dead child leaves behind is handled first (for the
model worker: its jobs are taken back at once, not when their leases lapse)."""
from __future__ import annotations

import logging
import signal
import subprocess
import threading
import time
from typing import Callable

log = logging.getLogger("genq")

# Seconds before each restart of a child that keeps dying soon after its start
# (the last repeats); one that ran longer than QUICK_DEATH_SECONDS starts over
# at the first.
RESTART_BACKOFF = (1.0, 2.0, 5.0, 10.0)
# A death within this many seconds of its start counts as quick ...
QUICK_DEATH_SECONDS = 60.0
# ... and this many in a row is a broken installation, not bad luck: give up
# (about 18 s of waiting with the backoff above).
GIVE_UP_AFTER = 5


def describe(code: int) -> str:
    """How a process ended, from Popen's returncode."""
    if code < 0:
        try:
            return f"was killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"was killed by signal {-code}"
    return f"exited with code {code}"


class Child:
    """One child process of `genq up`, started at once and again whenever it
    dies, until stop() or until it gives up (then `on_give_up` is called).
    `on_death(pid)` runs after each death, before the wait, and returns what
    it did for the log (or None)."""

    def __init__(self, name: str, argv: list[str], env: dict[str, str], *,
                 on_death: Callable[[int], str | None] | None = None,
                 on_give_up: Callable[[], None] = lambda: None,
                 backoff: tuple[float, ...] = RESTART_BACKOFF, quick: float = QUICK_DEATH_SECONDS,
                 give_up_after: int = GIVE_UP_AFTER):
        self.name, self.argv, self.env = name, argv, env
        self.on_death, self.on_give_up = on_death, on_give_up
        self.backoff, self.quick, self.give_up_after = backoff, quick, give_up_after
        self.proc: subprocess.Popen | None = None
        self.gave_up = False
        self._stopping = threading.Event()
        # Reentrant: stop() runs in a signal handler, maybe while this thread spawns.
        self._lock = threading.RLock()
        self._thread = threading.Thread(target=self._watch, name=f"supervise {name}", daemon=True)

    def start(self) -> "Child":
        self._spawn()
        self._thread.start()
        return self

    def _spawn(self) -> None:
        with self._lock:
            if not self._stopping.is_set():
                self.proc = subprocess.Popen(self.argv, env=self.env)
                self._started = time.monotonic()

    def _watch(self) -> None:
        quick_deaths = 0
        while True:
            proc = self.proc
            code = proc.wait()
            if self._stopping.is_set():
                return
            quick_deaths = quick_deaths + 1 if time.monotonic() - self._started < self.quick else 1
            try:
                done = self.on_death(proc.pid) if self.on_death else None
            except Exception as exc:  # the database may be down: the leases lapse and the reconciler takes over
                done = f"could not take back its jobs ({exc}); they wait for their leases to lapse"
            said = f"{self.name} (pid {proc.pid}) {describe(code)}" + (f"; {done}" if done else "")
            if quick_deaths >= self.give_up_after:
                log.error("%s; it died %d times in a row within %gs of starting: giving up, genq up stops",
                          said, quick_deaths, self.quick)
                self.gave_up = True
                self.on_give_up()
                return
            wait = self.backoff[min(quick_deaths, len(self.backoff)) - 1]
            log.warning("%s; starting it again in %gs", said, wait)
            if self._stopping.wait(wait):
                return
            self._spawn()

    def stop(self) -> None:
        """Stop supervising and ask the child to end (SIGTERM: its graceful shutdown)."""
        with self._lock:
            self._stopping.set()
            proc = self.proc
        if proc is not None and proc.poll() is None:
            proc.terminate()

    def join(self, timeout: float = 30) -> None:
        """Wait for a stopped child to end; SIGKILL it past `timeout`."""
        if self.proc is None:
            return
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
