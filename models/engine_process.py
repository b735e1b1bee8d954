"""The text engine in a process of its own: the decode loop never shares an interpreter lock.

In the worker's process the decode step shares the interpreter lock with
everything else the worker does in Python: storing and finishing the rows
that ended, claiming, renewing leases, decoding live output. On a small model
a decode step is mostly Python (a module call per layer), and measured
through the service those threads took about a fifth of the step's time
(bench/continuous.py: service / bare engine about 0.8). Here the model is
loaded again in a child process (spawned, never forked: torch's OpenMP pool
hangs a forked child at its first parallel region, and CUDA cannot be
used in one at all) that runs the `TextEngine` on its own, as vLLM runs its
engine core in a process of its own for the same reason:

- the child decodes without waiting for the worker: it steps while it has
  rows, and between steps takes in what the worker sent (rows to add, rows to
  drop), so a join is at most one step late and the decode never waits on a
  database round trip or on the worker's interpreter;
- every step's updates come back on the pipe as plain data (each row's new
  token, its count, its output when it finished); the worker keeps each
  row's tokens and decodes its live text with its own tokenizer, exactly as
  the engine's `Update` does;
- `ProcessEngine` is the worker's side: the same small interface as
  `TextEngine` (add, step, drop, fits, ending_within, len, keys), counting
  rows as the worker sees them, so the scheduler (worker/continuous.py) and
  the static path (`TextModel.run`) drive it unchanged.

The child exits when the worker's end of the pipe closes (the worker ended,
however it ended) or its model is let go; it ignores SIGINT and SIGTERM,
which are the worker's to act on. It costs a second copy of the weights (the
worker's copy still tokenizes, and checks a LoRA adapter loads before its
job joins) and a few seconds to start, once per loaded model.
"""
from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import traceback
import weakref
from multiprocessing.connection import Connection, wait
from pathlib import Path
from typing import Hashable

log = logging.getLogger(__name__)

# While the worker waits for a step's updates, it asks this often whether the
# child is still alive and the batch still wanted.
POLL_SECONDS = 0.25
ROOT = Path(__file__).resolve().parent.parent
# How long a child may take to load its copy of the model.
START_TIMEOUT = 600.0


class EngineProcessError(RuntimeError):
    """The engine's process failed a step, or ended."""


class EngineProcess:
    """A spawned child that loads `checkpoint` and runs one TextEngine at a time for the worker."""

    def __init__(self, checkpoint: str, device: str, dtype: str, torch_threads: int = 0):
        # A plain `python -m` child over inherited sockets, not multiprocessing's
        # spawn: that runs the parent's __main__ again in the child (a bench
        # script, pytest, celery's), which is not ours to re-run. Two sockets:
        # the batch's (rows in, steps out, read by the scheduler's stepper
        # thread) and calls' (a question, its answer, between steps).
        ours, theirs = socket.socketpair()
        calls, their_calls = socket.socketpair()
        path = os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)
        env = {**os.environ, "PYTHONPATH": path}
        self.process = subprocess.Popen(
            [sys.executable, "-m", "models.engine_process", str(theirs.fileno()), str(their_calls.fileno()),
             checkpoint, str(device), dtype, str(int(torch_threads or 0))],
            pass_fds=[theirs.fileno(), their_calls.fileno()], env=env, stdin=subprocess.DEVNULL, close_fds=True)
        theirs.close()
        their_calls.close()
        self.conn = Connection(ours.detach())
        self.calls = Connection(calls.detach())
        self._calling = threading.Lock()
        self.generation = 0
        self.current: ProcessEngine | None = None
        # What the child loaded: {"nbytes", "eos_ids", "pad_id", "max_positions"}.
        self.info: dict = {}
        try:
            if not self.conn.poll(START_TIMEOUT):
                raise EngineProcessError(f"the engine process for {checkpoint!r} did not load it "
                                         f"within {START_TIMEOUT:.0f}s")
            kind, payload = self.conn.recv()
        except EOFError:
            raise EngineProcessError(f"the engine process for {checkpoint!r} ended while loading it "
                                     f"({self._death()})") from None
        except BaseException:
            self.close()
            raise
        if kind != "ready":
            self.close()
            # The worker's loader reports it as the model's load failure (model_load_failed).
            raise EngineProcessError(f"the engine process could not load it: {payload}")
        self.info = payload
        # Let go with the model that owns it (an evicted model's child ends).
        self._finalizer = weakref.finalize(self, _stop, self.process, self.conn, self.calls)

    @property
    def nbytes(self) -> int:
        return self.info.get("nbytes", 0)

    def call(self, *question):
        """Ask the child between its steps and wait for the answer; raises what it raised there."""
        with self._calling:
            try:
                self.calls.send(question)
                while not self.calls.poll(POLL_SECONDS):
                    if self.process.poll() is not None:
                        raise EngineProcessError(f"the engine process ended ({self._death()})")
                kind, payload = self.calls.recv()
            except (OSError, EOFError) as exc:
                raise EngineProcessError(f"the engine process is gone ({self._death()})") from exc
        if kind == "error":
            raise _rebuilt(*payload)
        return payload

    def send(self, *message) -> None:
        try:
            self.conn.send(message)
        except (OSError, EOFError) as exc:
            raise EngineProcessError(f"the engine process is gone ({self._death()})") from exc

    def serve_adapters(self, max_loaded: int) -> "RemoteAdapters":
        return RemoteAdapters(self, max_loaded)

    def engine(self, model, max_rows: int, max_batch_tokens: int | None) -> "ProcessEngine":
        """A new running batch in the child; the one before it, if any, is ended there first."""
        if self.current is not None:
            self.current.close()
        self.generation += 1
        self.send("engine", self.generation, max_rows, max_batch_tokens)
        self.current = ProcessEngine(self, self.generation, model, max_rows, max_batch_tokens)
        return self.current

    def receive(self, engine: "ProcessEngine"):
        """The next message of `engine`'s batch (messages of batches ended before it are skipped)."""
        while True:
            while not self.conn.poll(POLL_SECONDS):
                if engine.closed:
                    # Ended by the scheduler's other thread (a failure, a cold shutdown):
                    # nothing more comes for it, and this thread must not wait forever.
                    raise EngineProcessError("the batch was ended while a step was awaited")
                if self.process.poll() is not None:
                    raise EngineProcessError(f"the engine process ended ({self._death()})")
            try:
                kind, gen, payload = self.conn.recv()
            except (EOFError, OSError):
                raise EngineProcessError(f"the engine process ended ({self._death()})") from None
            if gen == engine.generation:
                return kind, payload

    def _death(self) -> str:
        try:
            code = self.process.wait(1)
        except subprocess.TimeoutExpired:
            code = None
        if code is None:
            return "its pipe closed"
        return f"killed by signal {-code}" if code < 0 else f"exit code {code}"

    def close(self) -> None:
        _stop(self.process, self.conn, self.calls)


def _stop(process, conn, calls) -> None:
    try:
        conn.send(("close",))
    except Exception:
        pass
    try:
        process.wait(5)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(5)
    conn.close()
    calls.close()


class RemoteAdapters:
    """The LoRA adapters the child serves on its base (models/text_adapters.Adapters
    there): what the scheduler asks of them here, asked there."""

    def __init__(self, owner: EngineProcess, max_loaded: int):
        self.owner = owner
        self.max_loaded = max_loaded
        self.nbytes = owner.call("adapters", max_loaded)

    def ensure(self, refs: list) -> None:
        """Load `refs` in the child now (a row that joins with one needs it there); raises what
        loading raised there, so a job whose adapter cannot be served fails alone."""
        self.nbytes = self.owner.call("ensure", list(refs))


def _rebuilt(name: str, message: str) -> Exception:
    """An exception raised in the child, for the worker: of a class with its class's name
    (which the job's error shows) and its message."""
    return type(name, (RuntimeError,), {"__module__": "models.engine_process"})(message)


class _Mirror:
    """The worker's view of a row in the child: what it asked for and the tokens it has been told of."""

    __slots__ = ("seq", "tokens", "text")

    def __init__(self, seq, tokenizer):
        from models.text_engine import RowText

        self.seq = seq
        self.tokens: list[int] = []
        self.text = RowText(tokenizer, seq.stop)


class ProcessEngine:
    """The worker's side of a running batch in the engine process: TextEngine's interface.

    `len()`, `keys()`, `fits()` and `ending_within()` count the rows as the
    worker has asked for them and been told of them: a row is in from its
    add() until its finish is received or it is dropped. add() and drop() are
    sent and take effect in the child at its next step boundary; add()
    returns no updates: a row's first token comes with a later step(). Rows
    added past the rows decoding (`max_rows` is twice those) wait in the
    child and join, in order, as soon as room frees there.
    step() returns the updates of every step the child made since the last
    call (the newest for each row), waiting for one if there are none yet.
    """

    # The scheduler's stepper thread waits on the pipe while its other thread
    # keeps the books; the decode itself runs in the child meanwhile.
    steps_off_thread = True

    def __init__(self, owner: EngineProcess, generation: int, model, max_rows: int, max_batch_tokens: int | None):
        if not isinstance(max_rows, int) or max_rows < 1:
            raise ValueError(f"max_rows must be a positive integer, got {max_rows!r}")
        if max_batch_tokens is not None and (not isinstance(max_batch_tokens, int) or max_batch_tokens < 1):
            raise ValueError(f"max_batch_tokens must be a positive integer or None, got {max_batch_tokens!r}")
        self.owner = owner
        self.generation = generation
        self.tokenizer = model.tokenizer
        # Rows may be sent ahead of room, up to a second batch of them: the
        # child holds them and adds each the step a running row leaves (at most
        # max_rows decode together there). The scheduler sends ahead only for
        # rows about to end (worker/continuous.py claims for those).
        self.decoding_rows = max_rows
        self.max_rows = 2 * max_rows
        self.max_batch_tokens = max_batch_tokens
        self.rows: dict[Hashable, _Mirror] = {}
        self.closed = False

    def __len__(self) -> int:
        return len(self.rows)

    def keys(self) -> list:
        return list(self.rows)

    def ending_within(self, steps: int) -> int:
        return sum(1 for row in self.rows.values() if row.seq.limit - len(row.tokens) <= steps)

    def fits(self, seq) -> bool:
        from models.text_engine import fits

        return fits([row.seq for row in self.rows.values()], seq, self.max_rows, self.max_batch_tokens)

    def add(self, seqs: list) -> list:
        from models.text_engine import check_joining

        if not seqs:
            return []
        check_joining(seqs, self.rows)
        self.owner.send("add", self.generation, list(seqs))
        for seq in seqs:
            self.rows[seq.key] = _Mirror(seq, self.tokenizer)
        return []

    def drop(self, key) -> None:
        if self.rows.pop(key, None) is not None:
            self.owner.send("drop", self.generation, key)

    def step(self) -> list:
        """The updates the child made since the last call: at least one step's, the newest per row."""
        if not self.rows:
            return []
        from models.text_engine import Update

        kind, payload = self.owner.receive(self)
        batches = [(kind, payload)]
        # Steps that came meanwhile: taken together, so a worker that fell behind catches up at once.
        while kind == "steps" and self.owner.conn.poll(0):
            kind, payload = self.owner.receive(self)
            batches.append((kind, payload))
        newest: dict = {}
        for kind, payload in batches:
            if kind == "error":
                self.rows.clear()
                raise EngineProcessError(payload)
            for key, token, count, limit, text, output in payload:
                row = self.rows.get(key)
                if row is None:
                    continue  # dropped meanwhile
                row.tokens.append(token)
                if output is not None:
                    del self.rows[key]
                    newest[key] = Update(key, count, limit, output["text"], output)
                elif text is not None:
                    # Worked out by the child's own RowText: publishable as it is.
                    row.text.published = text
                    newest[key] = Update(key, count, limit, text)
                else:
                    newest[key] = Update(key, count, limit, _lazy(row, count))
        return list(newest.values())

    def close(self) -> None:
        """End this batch in the child (rows still there are dropped)."""
        if self.closed:
            return
        self.closed = True
        self.rows.clear()
        if self.owner.current is self:
            self.owner.current = None
        try:
            self.owner.send("end", self.generation)
        except EngineProcessError:
            pass


def _lazy(row: _Mirror, n: int):
    # As TextEngine._update: the first n tokens, decoded only if read.
    return lambda: row.text.advance(row.text.decode(row.tokens[:n]))


# --- the child ------------------------------------------------------------------


def _child_main(fd: int, calls_fd: int, checkpoint: str, device: str, dtype: str, torch_threads: int) -> None:
    # SIGINT and SIGTERM are the worker's: it hands rows back or lets them
    # finish, and lets this process go when it is done with it.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    conn, calls = Connection(fd), Connection(calls_fd)
    try:
        import torch

        if torch_threads:
            torch.set_num_threads(torch_threads)
        from models import text

        model = text.load(checkpoint, device, dtype)
    except BaseException as exc:
        try:
            conn.send(("error", f"{type(exc).__name__}: {exc}"))
        finally:
            return
    conn.send(("ready", {"nbytes": model.base_nbytes, "eos_ids": sorted(model.eos_ids), "pad_id": model.pad_id,
                         "max_positions": model.max_positions}))
    try:
        _serve(conn, calls, model)
    except (EOFError, OSError, KeyboardInterrupt):
        pass  # the worker is gone


def _answer(calls, model) -> None:
    """One call from the worker, answered: the adapters' memory after it, or what it raised."""
    kind, *args = calls.recv()
    try:
        if kind == "adapters":
            adapters = model.serve_adapters(args[0])
        else:  # "ensure"
            adapters = model.adapters
            if adapters is None:
                raise ValueError("this model serves no adapters")
            adapters.ensure(args[0])
        calls.send(("ok", adapters.nbytes))
    except Exception as exc:
        calls.send(("error", (type(exc).__name__, str(exc))))


def _serve(conn, calls, model) -> None:
    """Step the current engine while it has rows; between steps, take in what the worker sent
    and answer what it asked."""
    engine, generation, adding = None, None, []

    def reply(kind, payload):
        conn.send((kind, generation, payload))

    while True:
        while calls.poll(0):
            _answer(calls, model)
        # Wait for work only with no rows to step and none to add.
        while conn.poll(0) or ((engine is None or not len(engine)) and not adding):
            if not conn.poll(0):
                # Idle: a call may come first (an adapter checked before its row is sent).
                if calls in wait([conn, calls]):
                    _answer(calls, model)
                    continue
            message = conn.recv()
            kind = message[0]
            if kind == "close":
                return
            if kind == "engine":
                _, generation, max_rows, max_batch_tokens = message
                engine, adding = model.engine(max_rows, max_batch_tokens), []
            elif message[1] != generation or engine is None:
                continue  # for an engine already ended
            elif kind == "add":
                adding.extend(message[2])
            elif kind == "drop":
                adding = [s for s in adding if s.key != message[2]]
                engine.drop(message[2])
            elif kind == "end":
                engine, adding = None, []
        try:
            # Rows sent ahead join the moment there is room: a row that ends at
            # this step is replaced at the next, with no round trip to the worker.
            joining = _room_for(engine, adding)
            if joining:
                adding = adding[len(joining):]
                updates = engine.add(joining)
            else:
                updates = engine.step()
        except Exception as exc:
            log.exception("the engine process's step failed")
            reply("error", f"{type(exc).__name__}: {exc}\n{traceback.format_exc(limit=3)}")
            engine, adding = None, []
            continue
        reply("steps", [_wire(u) for u in updates])


def _room_for(engine, waiting: list) -> list:
    """The first of `waiting` that fit beside the engine's running rows, in order."""
    from models.text_engine import fits

    running, joining = [row.seq for row in engine.rows], []
    for seq in waiting:
        if not fits(running + joining, seq, engine.max_rows, engine.max_batch_tokens):
            break  # in line: a later row does not pass one that waits for room
        joining.append(seq)
    return joining


def _wire(u) -> tuple:
    """An Update as plain data: (key, newest token, tokens, limit, text or None, output)."""
    # A row's text is sent only where the engine worked it out anyway (a row
    # with stop strings, or one that finished); the worker decodes the rest
    # from the tokens when it publishes.
    text = None if callable(u._text) else u._text
    return (u.key, u.token, u.tokens, u.limit, text, u.output)


if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s engine process: %(message)s")
    _child_main(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4], sys.argv[5], int(sys.argv[6]))
