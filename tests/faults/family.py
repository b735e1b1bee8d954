"""A model family for the fault tests: jobs that take as long as they are told
(in steps), report progress and honour cancellation like the real families,
write one output file, a prompt that kills the worker process running it
(a poison job), and jobs that never look at a request to stop (`stubborn`: a
model that ignores the shutdown timeout). Registered by its dotted path: `family: tests.faults.family`."""
from __future__ import annotations

import os
import time
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from models.base import IsCancelled, OnProgress, Result, parse

FAMILY = "fault-test"
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


class Loaded:
    nbytes = 0

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
                    text = f"{inputs[i].prompt} after {step} steps"
                    results[i] = Result({"text": text, "artifact": {"file": "out.txt"}}, {"out.txt": (text.encode(), "text/plain")})
                    live.discard(i)
        return results
