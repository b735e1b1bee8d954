"""The text-generation family: input schema, validation, and rows of a causal LM run on the text engine."""
from __future__ import annotations

import logging
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_serializer

from models.base import InputInvalid, IsCancelled, OnProgress, Result, check_bound, check_chars, module_bytes, parse
from models.libraries import quiet, transformers_problems

FAMILY = "text-generation"
# Decodes a step at a time behind an engine: the worker batches it continuously.
CONTINUOUS = True
# A LoRA fine-tune is served as an adapter on its loaded base (models/text_adapters.py).
ADAPTERS = True
# Its rows may decode in a process of their own (models/engine_process.py; GENQ_ENGINE_PROCESS).
ENGINE_PROCESS = True
# Registry limits as JSON-schema bounds of the input: (limit, field, keyword).
SCHEMA_LIMITS = [
    ("max_new_tokens", "max_new_tokens", "maximum"),
    ("max_prompt_chars", "prompt", "maxLength"),
]
# Every key a registry entry's `limits` may hold: the input's bounds, and the
# bounds of fine-tunes of the model (models/finetune.py).
LIMITS = {"max_new_tokens", "max_prompt_chars", "max_seq_len", "max_epochs", "max_train_steps", "max_train_examples"}
SEED_MAX = 2**32 - 1
MAX_STOPS = 4
MAX_MESSAGES = 256

log = logging.getLogger(__name__)


class Message(BaseModel):
    """One turn of a chat, rendered with the model's chat template."""

    model_config = ConfigDict(extra="forbid")

    role: Literal["system", "user", "assistant"]
    content: str


class Input(BaseModel):
    """A text-generation job's `input`: a `prompt`, or chat `messages` (not both)."""

    model_config = ConfigDict(extra="forbid", json_schema_extra={"oneOf": [{"required": ["prompt"]},
                                                                          {"required": ["messages"]}]})

    # Typed without None: null is refused like any non-string (the default None means "not given").
    prompt: str = Field(None, min_length=1, description="Text to continue. The output does not repeat it.")
    messages: list[Message] = Field(
        None, min_length=1, max_length=MAX_MESSAGES,
        description="Chat turns instead of a prompt: the worker renders them with the model's chat template "
                    "(and the assistant's turn opened); a model whose tokenizer has none fails the job "
                    "(`no_chat_template`).")
    max_new_tokens: int = Field(32, ge=1, description="Most tokens to generate.")
    temperature: float = Field(
        1.0, ge=0, le=100, description="Sampling temperature; 0 picks the most likely token every step (greedy)."
    )
    top_p: float = Field(
        1.0, gt=0, le=1, description="Nucleus sampling: sample from the smallest set of tokens whose probability reaches top_p."
    )
    top_k: int = Field(0, ge=0, le=100_000, description="Sample from the k most likely tokens only; 0 turns this off.")
    repetition_penalty: float = Field(
        1.0, gt=0, le=100, description="Penalty (>1) or bonus (<1) for tokens already in the prompt or the output; 1 is off."
    )
    stop: list[Annotated[str, Field(min_length=1, max_length=200)]] = Field(
        default_factory=list,
        max_length=MAX_STOPS,
        description=f"Up to {MAX_STOPS} strings that end generation; the output stops before the first one.",
    )
    seed: int | None = Field(
        None, ge=0, le=SEED_MAX, description="Random seed; the same input and seed give the same output."
    )

    @model_serializer(mode="wrap")
    def _without_the_other(self, handler):
        # Of prompt and messages only the one given is written: the stored input validates again as it is.
        out = handler(self)
        for name in ("prompt", "messages"):
            if out.get(name) is None:
                out.pop(name, None)
        return out


def validate(raw: Any, limits: dict) -> Input:
    """The job input as an `Input`; raises InputInvalid naming "input.<field>"."""
    inp = parse(Input, raw)
    errors: list[dict[str, str]] = []
    if (inp.prompt is None) == (inp.messages is None):
        field = "input.prompt" if inp.prompt is None else "input.messages"
        raise InputInvalid([{"field": field, "message": "give a prompt or chat messages (exactly one of the two)"}])
    check_bound(errors, "input.max_new_tokens", inp.max_new_tokens, limits.get("max_new_tokens"))
    if inp.prompt is not None:
        check_chars(errors, "input.prompt", inp.prompt, limits.get("max_prompt_chars"))
    else:
        # The prompt's bound covers the turns' text together.
        check_chars(errors, "input.messages", "".join(m.content for m in inp.messages), limits.get("max_prompt_chars"))
    if errors:
        raise InputInvalid(errors)
    return inp


def batch_key(inp: Input) -> str:
    # Every sampling setting is applied per row (see text_engine.RowSampling), so any two
    # text jobs for the same model can share a forward pass.
    return ""


def row_settings(inp: Input):
    """The job's sampling settings as the engine takes them (a job without a seed samples with seed 0)."""
    from models.text_engine import RowSettings

    return RowSettings(
        seed=inp.seed if inp.seed is not None else 0,
        temperature=inp.temperature,
        top_p=inp.top_p,
        top_k=inp.top_k,
        repetition_penalty=inp.repetition_penalty,
    )


class NoChatTemplate(InputInvalid):
    """Chat messages for a model whose tokenizer has no chat template: the job fails `no_chat_template`."""

    code = "no_chat_template"

    def __init__(self):
        super().__init__([{"field": "input.messages",
                           "message": "this model's tokenizer has no chat template; send a prompt instead"}])


def prompt_ids(tokenizer, inp: Input) -> list[int]:
    """The job's prompt tokens: the prompt as it is, or the messages through the chat template."""
    if inp.messages is None:
        return tokenizer(inp.prompt, add_special_tokens=True, verbose=False)["input_ids"]
    if not getattr(tokenizer, "chat_template", None):
        raise NoChatTemplate()
    return render_chat(tokenizer, inp.messages)


def render_chat(tokenizer, messages: list[Message]) -> list[int]:
    """Token ids of `messages` through the tokenizer's chat template, the assistant's turn opened."""
    rendered = tokenizer.apply_chat_template([m.model_dump() for m in messages], add_generation_prompt=True,
                                             tokenize=False)
    # The template writes the special tokens itself: none are added again.
    return tokenizer(rendered, add_special_tokens=False, verbose=False)["input_ids"]


def _torch_dtype(dtype: str):
    import torch

    try:
        return {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[dtype]
    except KeyError:
        raise ValueError(f"dtype must be float32, float16, bfloat16 or int8, got {dtype!r}") from None


def load(checkpoint: str, device: str, dtype: str, engine: str = "transformers", process: bool = False,
         torch_threads: int = 0, **engine_args) -> "TextModel":
    """Load a causal LM and its tokenizer from `checkpoint` (a local directory or hub id) onto `device`.
    `engine: vllm` loads it into vLLM instead (models/text_vllm.py; `engine_args`:
    max_rows, max_batch_tokens, which size vLLM's KV cache at load). `process`:
    its rows decode in a process of its own, which loads a second copy
    (models/engine_process.py; `torch_threads` there, 0: torch's default)."""
    if engine == "vllm":
        from models import text_vllm

        return text_vllm.load(checkpoint, device, dtype, **engine_args)
    if engine != "transformers":
        raise ValueError(f"engine must be transformers or vllm, got {engine!r}")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    quiet()

    kwargs: dict[str, Any] = {}
    if dtype == "int8":
        import importlib.util

        if importlib.util.find_spec("bitsandbytes") is None or not str(device).startswith("cuda"):
            raise ValueError(
                f"dtype 'int8' needs the bitsandbytes package and a CUDA device; got device {device!r}, "
                f"bitsandbytes {'installed' if importlib.util.find_spec('bitsandbytes') else 'not installed'}"
            )
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = BitsAndBytesConfig(load_in_8bit=True)
        kwargs["device_map"] = {"": device}
    else:
        kwargs["dtype"] = _torch_dtype(dtype)

    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    if process:
        # The weights live in the engine process only; this side tokenizes and schedules.
        from models.engine_process import EngineProcess

        return TextModel.served_by(EngineProcess(checkpoint, device, dtype, torch_threads), tokenizer,
                                   torch.device(device))
    model = AutoModelForCausalLM.from_pretrained(checkpoint, **kwargs)
    if dtype != "int8":
        model = model.to(device)
    model.eval()
    return TextModel(model, tokenizer, torch.device(device))


def check(checkpoint: str) -> list[str]:
    """What is wrong with a causal LM's directory, read from its configs only
    (no weights loaded): a config transformers can read as a causal LM, a
    tokenizer, weights. [] when nothing is."""
    return transformers_problems(checkpoint, "MODEL_FOR_CAUSAL_LM_MAPPING", "has no causal LM class in this transformers",
                                 ("tokenizer.json", "tokenizer.model", "vocab.json", "tokenizer_config.json"),
                                 "no tokenizer files")


class TextModel:
    """A loaded causal LM and its tokenizer; its rows run on a TextEngine (models/text_engine.py)."""

    def __init__(self, model, tokenizer, device):
        self.model = model
        self.tokenizer = tokenizer
        self.device = device
        gen = model.generation_config
        eos = gen.eos_token_id if gen.eos_token_id is not None else tokenizer.eos_token_id
        self.eos_ids = set(eos if isinstance(eos, list) else [eos]) - {None}
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else gen.pad_token_id
        if pad is None:
            pad = min(self.eos_ids) if self.eos_ids else 0
        self.pad_id = pad
        self.max_positions = getattr(model.config, "max_position_embeddings", None)
        self.base_nbytes = module_bytes(model)
        # LoRA fine-tunes served on this base (models/text_adapters.py), once serve_adapters() is called.
        self.adapters = None
        # Where its rows decode when not here (models/engine_process.py): load(process=True).
        self.engine_process = None

    @classmethod
    def served_by(cls, process, tokenizer, device) -> "TextModel":
        """A model whose weights are in an engine process (models/engine_process.py): here
        its tokenizer and what the scheduler needs to know of it, as the child read them."""
        self = cls.__new__(cls)
        self.model, self.tokenizer, self.device = None, tokenizer, device
        self.eos_ids = set(process.info["eos_ids"])
        self.pad_id = process.info["pad_id"]
        self.max_positions = process.info["max_positions"]
        self.base_nbytes = 0
        self.adapters = None
        self.engine_process = process
        return self

    @property
    def nbytes(self) -> int:
        """Memory the model holds: the base's parameters and buffers (in its engine process,
        when it has one), and its loaded adapters'."""
        process = self.engine_process.nbytes if self.engine_process is not None else 0
        return self.base_nbytes + process + (self.adapters.nbytes if self.adapters is not None else 0)

    def serve_adapters(self, max_loaded: int):
        """The LoRA adapters served on this base, at most `max_loaded` kept loaded
        when not in use (models/text_adapters.py)."""
        from models.text_adapters import Adapters

        if self.engine_process is not None:
            # Served where the weights are: ensure() asks the engine process.
            if self.adapters is None or self.adapters.max_loaded != max_loaded:
                self.adapters = self.engine_process.serve_adapters(max_loaded)
        elif self.adapters is None:
            self.adapters = Adapters(self.model, max_loaded)
        else:
            self.adapters.max_loaded = max_loaded
        return self.adapters

    def fit(self, inp: Input) -> tuple[list[int], int]:
        """The row's prompt tokens and how many new tokens it may have, both fitted to the model's positions."""
        ids = prompt_ids(self.tokenizer, inp)
        limit = inp.max_new_tokens
        if self.max_positions:
            # A position past the model's table fails the whole batch, so fit the row:
            # keep the end of the prompt (what the continuation depends on most).
            limit = min(limit, self.max_positions - 1)
            if len(ids) + limit > self.max_positions:
                keep = self.max_positions - limit
                log.warning("prompt of %d tokens cut to its last %d to fit max_positions=%d", len(ids), keep, self.max_positions)
                ids = ids[-keep:]
        return ids, limit

    def sequence(self, key, inp: Input, adapter=None):
        """Job `inp` as a row for the engine, under the scheduler's handle `key`,
        on the LoRA adapter `adapter` (a text_adapters.AdapterRef; None: the base)."""
        from models.text_engine import Sequence

        ids, limit = self.fit(inp)
        return Sequence(key=key, prompt=ids, limit=limit, settings=row_settings(inp), stop=list(inp.stop),
                        adapter=adapter)

    def engine(self, max_rows: int, max_batch_tokens: int | None = None):
        """A running batch over this model that rows join and leave between decode steps (models/text_engine.py),
        in the engine process when it has one (one batch at a time there: a new one ends the last)."""
        if self.engine_process is not None:
            return self.engine_process.engine(self, max_rows, max_batch_tokens)
        from models.text_engine import TextEngine

        return TextEngine(self, max_rows, max_batch_tokens)

    def run(self, inputs: list[Input], on_progress: OnProgress, is_cancelled: IsCancelled,
            adapters: list | None = None) -> list[Result | None]:
        """A static batch on the engine: every row joins at once, the batch decodes until the last row ends.
        `adapters[i]`: the LoRA adapter row i runs on (an AdapterRef, or None for the base).

        The continuous scheduler drives the same engine with rows joining
        mid-flight; one code path, so a job's tokens are the same either way.
        """
        results: list[Result | None] = [None] * len(inputs)
        # Rows cancelled before the start are left out of the forward pass entirely.
        live = [i for i in range(len(inputs)) if not is_cancelled(i)]
        if not live:
            return results
        engine = self.engine(max_rows=len(live))
        try:
            return self._run(engine, live, inputs, results, on_progress, is_cancelled, adapters)
        finally:
            close = getattr(engine, "close", None)  # an engine in the engine process ends its batch there
            if close is not None:
                close()

    def _run(self, engine, live, inputs, results, on_progress, is_cancelled, adapters):
        updates = engine.add([self.sequence(i, inputs[i], adapters[i] if adapters else None) for i in live])
        while True:
            for u in updates:
                on_progress(u.key, u.tokens, u.limit)
                if u.output is not None:
                    results[u.key] = Result(output=u.output)
            # A cancelled row leaves before the next step; a finished one keeps its result.
            for key in engine.keys():
                if is_cancelled(key):
                    engine.drop(key)
            if not len(engine):
                return results
            updates = engine.step()
