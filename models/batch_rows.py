"""What every batching family does before and around its pipeline call.

A family's `run(inputs, on_progress, is_cancelled)` gets a batch of jobs. It
leaves out the jobs cancelled before the start, checks that the rest share
a batch key, seeds one generator per row, reports each row's progress per
step, notices a row cancelled mid-run (its result is dropped; when every row
is cancelled the pipeline is interrupted), and hands results back only for
the rows still wanted. One copy of that, so a fix to cancel handling is made
once for images, audio and video.
"""
from __future__ import annotations

import inspect
from typing import Any, Callable, Iterator, Sequence

from models.base import IsCancelled, OnProgress, pipeline_bytes


def live_rows(inputs: Sequence, is_cancelled: IsCancelled,
              batch_key: Callable[[Any], Any] | None = None) -> tuple[list[int], list]:
    """The indexes of the jobs not cancelled before the start, and their inputs.

    With `batch_key`, the live inputs must share it (the worker only batches
    jobs with equal keys; a mismatch is a bug upstream, not bad input).
    """
    live = [i for i in range(len(inputs)) if not is_cancelled(i)]
    rows = [inputs[i] for i in live]
    if batch_key is not None and rows:
        first = batch_key(rows[0])
        for inp in rows[1:]:
            if batch_key(inp) != first:
                raise ValueError(f"jobs in one batch must share batch_key {first!r}, got {batch_key(inp)!r}")
    return live, rows


def seeds_of(rows: Sequence) -> list[int]:
    """Each row's seed (0 when the job gave none: the same job gives the same output)."""
    return [inp.seed if inp.seed is not None else 0 for inp in rows]


def generators(seeds: Sequence[int], device) -> list:
    """One torch generator per seed: a row's noise never depends on its batch-mates."""
    import torch

    return [torch.Generator(device=device).manual_seed(int(s)) for s in seeds]


class StepProgress:
    """Per-row progress and cancellation over a pipeline's denoising steps.

    `live[r]` is row r's index in the batch the worker gave (what
    `on_progress` and `is_cancelled` take). Pass `callbacks(call_args)` to the
    pipeline: `callback_on_step_end` where the pipeline has it (it can also
    interrupt the pipeline once every row is cancelled), else the older
    `callback` / `callback_steps` pair (AudioLDM, TextToVideoSD), else nothing.
    """

    def __init__(self, live: Sequence[int], steps: int, on_progress: OnProgress, is_cancelled: IsCancelled):
        self.live = list(live)
        self.steps = steps
        self.on_progress = on_progress
        self.is_cancelled = is_cancelled
        self.cancelled = [False] * len(self.live)

    def report(self, step: int) -> None:
        """`step` of `steps` done: note rows cancelled since, report the others."""
        for r, i in enumerate(self.live):
            if not self.cancelled[r] and self.is_cancelled(i):
                self.cancelled[r] = True
            if not self.cancelled[r]:
                self.on_progress(i, step, self.steps)

    def step_end(self, pipe, step: int, timestep, callback_kwargs: dict) -> dict:
        self.report(step + 1)
        if all(self.cancelled):
            # The pipeline skips its remaining steps; nothing in the batch is wanted.
            pipe._interrupt = True
        return {}

    def old_callback(self, step: int, timestep, latents) -> None:
        self.report(step + 1)

    def callbacks(self, call_args) -> dict:
        """The step-callback arguments this pipeline takes (`call_args`: its __call__'s parameter names)."""
        if "callback_on_step_end" in call_args:
            return {"callback_on_step_end": self.step_end}
        if "callback" in call_args:
            return {"callback": self.old_callback, "callback_steps": 1}
        return {}

    def wanted(self) -> Iterator[tuple[int, int]]:
        """(row, index in the batch) of each row whose result is still wanted."""
        for r, i in enumerate(self.live):
            if not self.cancelled[r]:
                yield r, i


class PipelineModel:
    """A loaded diffusers pipeline that runs a batch of rows in one call (the
    image, audio and video families' models are these)."""

    def __init__(self, pipe, device):
        self.pipe = pipe
        self.device = device
        self.nbytes = pipeline_bytes(pipe)
        self.call_args = set(inspect.signature(pipe.__call__).parameters)

    def call(self, args: dict):
        """The pipeline called with those of `args` it takes: pipelines of one
        family name the same thing differently, or not at all."""
        return self.pipe(**{k: v for k, v in args.items() if k in self.call_args})
