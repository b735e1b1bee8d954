"""A model family for the fault tests: jobs that take as long as they are told
(in steps), report progress and honour cancellation like the real families,
write one output file, a prompt that kills the worker process running it
(a poison job), and jobs that never look at a request to stop (`stubborn`: a
model that ignores the shutdown timeout). Registered by its dotted path: `family: tests.faults.family`.

It batches statically (`run`) or continuously (`engine`, the interface of
models/text_engine.py: rows join and leave between steps), so the fault tests
cover both of the worker's schedulers."""
from __future__ import annotations

import os
import time
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from models.base import IsCancelled, OnProgress, Result, parse

FAMILY = "fault-test"
CONTINUOUS = True
# A job with this prompt kills the process that runs it, every time.
POISON = "poison"


class Input(BaseModel):
    model_config = ConfigDict(extra="forbid")

    prompt: str = Field(min_length=1)
    steps: int = Field(1, ge=1, le=10_000)
    step_seconds: float = Field(0.0, ge=0, le=10)
    # Deaf to every request to stop (a cancel, a shutdown, a lost lease): runs all its steps.
    stubborn: bool = False


def validate(raw: Any, limits: dict) -> Input:
    return parse(Input, raw)


def batch_key(inp: Input) -> str:
    return ""


def load(checkpoint: str, device: str, dtype: str) -> "Loaded":
    return Loaded()


def _result(inp: Input, step: int) -> Result:
    text = f"{inp.prompt} after {step} steps"
    return Result({"text": text, "artifact": {"file": "out.txt"}}, {"out.txt": (text.encode(), "text/plain")})


class Loaded:
    nbytes = 0

    def sequence(self, key, inp: Input) -> "Seq":
        return Seq(key, inp)

    def engine(self, max_rows: int, max_batch_tokens: int | None = None) -> "Engine":
        return Engine(max_rows)

    def run(self, inputs: list[Input], on_progress: OnProgress, is_cancelled: IsCancelled) -> list[Result | None]:
        if any(inp.prompt == POISON for inp in inputs):
            os._exit(1)  # as a segfault or the OOM killer would: no cleanup, no goodbye
        results: list[Result | None] = [None] * len(inputs)
        live = set(range(len(inputs)))
        for step in range(1, max(inp.steps for inp in inputs) + 1):
            live = {i for i in live if inputs[i].stubborn or not is_cancelled(i)}
            if not live:
                break
            time.sleep(max(inputs[i].step_seconds for i in live))
            for i in sorted(live):
                on_progress(i, step, inputs[i].steps)
                if step == inputs[i].steps:
                    results[i] = _result(inputs[i], step)
                    live.discard(i)
        return results


class Seq:
    def __init__(self, key, inp: Input):
        self.key, self.inp = key, inp
        self.prompt, self.limit = [0], inp.steps


class Update:
    def __init__(self, key, tokens: int, limit: int, result: Result | None):
        self.key, self.tokens, self.limit, self.text = key, tokens, limit, ""
        self.output = result.output if result else None
        self.files = result.files if result else {}


class Engine:
    """Rows of steps: each step sleeps the longest step_seconds of the rows in
    it and moves every row one step on. A stubborn row takes all its steps in
    one call: the worker cannot get a word in until it is done."""

    def __init__(self, max_rows: int):
        self.max_rows = max_rows
        self.rows: dict = {}  # key -> [Seq, steps done]

    def fits(self, seq: Seq) -> bool:
        return len(self.rows) < self.max_rows or not self.rows

    def add(self, seqs: list[Seq]) -> list[Update]:
        if any(s.inp.prompt == POISON for s in seqs):
            os._exit(1)
        for s in seqs:
            self.rows[s.key] = [s, 0]
        return []

    def step(self) -> list[Update]:
        stubborn = [r for r in self.rows.values() if r[0].inp.stubborn]
        steps = max((r[0].inp.steps - r[1] for r in stubborn), default=1)
        updates = []
        for _ in range(steps):
            if not self.rows:
                break
            time.sleep(max(r[0].inp.step_seconds for r in self.rows.values()))
            for key, r in list(self.rows.items()):
                r[1] += 1
                done = r[1] >= r[0].inp.steps
                updates.append(Update(key, r[1], r[0].inp.steps, _result(r[0].inp, r[1]) if done else None))
                if done:
                    del self.rows[key]
        return updates

    def drop(self, key) -> None:
        self.rows.pop(key, None)

    def keys(self) -> list:
        return list(self.rows)

    def __len__(self) -> int:
        return len(self.rows)
