"""The text-generation family: input schema, validation, and batched per-row sampling over a causal LM."""
from __future__ import annotations

import logging
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field

from models.base import IsCancelled, InputInvalid, OnProgress, Result, check_bound, check_chars, parse
from models.libraries import quiet

FAMILY = "text-generation"
# Registry limits as JSON-schema bounds of the input: (limit, field, keyword).
SCHEMA_LIMITS = [
    ("max_new_tokens", "max_new_tokens", "maximum"),
    ("max_prompt_chars", "prompt", "maxLength"),
]
SEED_MAX = 2**32 - 1
MAX_STOPS = 4

log = logging.getLogger(__name__)


class Input(BaseModel):
    """A text-generation job's `input`."""

    model_config = ConfigDict(extra="forbid")

    prompt: str = Field(min_length=1, description="Text to continue. The output does not repeat it.")
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


def validate(raw: Any, limits: dict) -> Input:
    """The job input as an `Input`; raises InputInvalid naming "input.<field>"."""
    inp = parse(Input, raw)
    errors: list[dict[str, str]] = []
    check_bound(errors, "input.max_new_tokens", inp.max_new_tokens, limits.get("max_new_tokens"))
    check_chars(errors, "input.prompt", inp.prompt, limits.get("max_prompt_chars"))
    if errors:
        raise InputInvalid(errors)
    return inp


def batch_key(inp: Input) -> str:
    # Every sampling setting is applied per row (see RowSampler), so any two
    # text jobs for the same model can share a forward pass.
    return ""


def _torch_dtype(dtype: str):
    import torch

    try:
        return {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[dtype]
    except KeyError:
        raise ValueError(f"dtype must be float32, float16, bfloat16 or int8, got {dtype!r}") from None


def load(checkpoint: str, device: str, dtype: str) -> "TextModel":
    """Load a causal LM and its tokenizer from `checkpoint` (a local directory or hub id) onto `device`."""
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
    model = AutoModelForCausalLM.from_pretrained(checkpoint, **kwargs)
    if dtype != "int8":
        model = model.to(device)
    model.eval()
    return TextModel(model, tokenizer, torch.device(device))


class TextModel:
    """A loaded causal LM that runs a batch of text jobs in one generate() call."""

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
        self.nbytes = sum(t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers()))

    def _prompt_ids(self, inp: Input) -> tuple[list[int], int]:
        """The row's prompt tokens and how many new tokens it may have, both fitted to the model's positions."""
        ids = self.tokenizer(inp.prompt, add_special_tokens=True, verbose=False)["input_ids"]
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

    def run(self, inputs: list[Input], on_progress: OnProgress, is_cancelled: IsCancelled) -> list[Result | None]:
        import torch
        from transformers import LogitsProcessorList, StoppingCriteriaList

        results: list[Result | None] = [None] * len(inputs)
        # Rows cancelled before the start are left out of the forward pass entirely.
        live = [i for i in range(len(inputs)) if not is_cancelled(i)]
        if not live:
            return results
        rows = [inputs[i] for i in live]
        fitted = [self._prompt_ids(inp) for inp in rows]
        prompts = [ids for ids, _ in fitted]
        limits = [limit for _, limit in fitted]
        width = max(len(p) for p in prompts)
        # Left padding, so every row's next token is at the last column; generate()
        # derives position ids from the attention mask (cumsum - 1), so a padded
        # row sees the same positions 0..n-1 as it would alone.
        ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for r, p in enumerate(prompts):
            ids[r, width - len(p):] = torch.tensor(p, dtype=torch.long)
            mask[r, width - len(p):] = 1
        pads = [width - len(p) for p in prompts]

        state = _RowState(
            rows=rows,
            prompt_width=width,
            pads=pads,
            limits=limits,
            eos_ids=self.eos_ids,
            tokenizer=self.tokenizer,
            on_progress=lambda r, n, m: on_progress(live[r], n, m),
            is_cancelled=lambda r: is_cancelled(live[r]),
        )
        with torch.inference_mode():
            out = self.model.generate(
                input_ids=ids.to(self.device),
                attention_mask=mask.to(self.device),
                max_new_tokens=max(limits),
                # Greedy over the one-hot scores RowSampler returns = its sample.
                do_sample=False,
                num_beams=1,
                logits_processor=LogitsProcessorList([RowSampler(state, self.device)]),
                stopping_criteria=StoppingCriteriaList([RowStopper(state)]),
                pad_token_id=self.pad_id,
                eos_token_id=sorted(self.eos_ids) or None,
                # Neutral values, so a checkpoint's generation_config.json cannot add its
                # own penalties on top of the per-row ones.
                temperature=1.0,
                top_k=50,
                top_p=1.0,
                repetition_penalty=1.0,
                no_repeat_ngram_size=0,
                min_length=0,
            )
        generated = out[:, width:].tolist()
        for r, i in enumerate(live):
            if state.cancelled[r]:
                continue
            results[i] = Result(output=state.finish(r, generated[r]))
        return results


class _RowState:
    """What the sampler and the stopper share about each row of one batch."""

    def __init__(self, rows, prompt_width, pads, limits, eos_ids, tokenizer, on_progress, is_cancelled):
        self.rows = rows
        self.prompt_width = prompt_width
        self.pads = pads
        self.limits = limits  # each row's max_new_tokens, fitted to the model
        self.eos_ids = eos_ids
        self.tokenizer = tokenizer
        self.on_progress = on_progress
        self.is_cancelled = is_cancelled
        n = len(rows)
        self.done = [False] * n
        self.cancelled = [False] * n
        # Tokens the row generated when it ended, and why.
        self.ended_at: list[int | None] = [None] * n
        self.reason: list[str | None] = [None] * n

    def decode(self, tokens: list[int]) -> str:
        return self.tokenizer.decode(tokens, skip_special_tokens=True, clean_up_tokenization_spaces=False)

    def first_stop(self, r: int, text: str) -> int | None:
        """Where the earliest stop string of row `r` starts in `text`, if any."""
        hits = [text.find(s) for s in self.rows[r].stop]
        hits = [h for h in hits if h >= 0]
        return min(hits) if hits else None

    def finish(self, r: int, generated: list[int]) -> dict:
        """Row `r`'s output from its generated tokens, cut where the row ended."""
        n = self.ended_at[r] if self.ended_at[r] is not None else min(len(generated), self.limits[r])
        tokens = generated[:n]
        reason = self.reason[r] or "length"
        body = tokens
        for k, t in enumerate(tokens):
            if t in self.eos_ids:
                body, reason = tokens[:k], "stop"
                break
        text = self.decode(body)
        cut = self.first_stop(r, text)
        if cut is not None:
            text, reason = text[:cut], "stop"
        # `tokens` counts what the model generated for the job (what it cost),
        # including the EOS or the stop string's tokens that are not in `text`.
        return {"text": text, "tokens": len(tokens), "finish_reason": reason}


class RowSampler:
    """A logits processor sampling every row with its own settings and its own random stream.

    It returns a one-hot score per row, so generate()'s greedy step picks exactly
    the sampled token. A row's draw depends only on its own logits and seed, never
    on its batch-mates, so a job's tokens do not depend on what it is batched with.
    (generate() only calls it; it needs no LogitsProcessor base class.)

    All rows are worked on at once: every operation here (elementwise scaling,
    top-k, softmax, sort, cumulative sum, search) goes along each row on its
    own, so a row's numbers are the same in a batch of one or of eight, while a
    step costs a fixed dozen tensor calls instead of a dozen per row (a per-row
    loop cost about as much as the forward pass at batch 8 on CPU, and is a
    string of tiny kernel launches on a GPU). Sampling inverts each row's
    cumulative distribution at one uniform draw from the row's own generator,
    a `random.Random` seeded with the job's seed: the same stream on any device.
    """

    def __init__(self, state: _RowState, device):
        import random

        import torch

        self.state = state
        self.device = device
        rows = state.rows
        self.generators = [random.Random(inp.seed if inp.seed is not None else 0) for inp in rows]
        # Temperature 0 divides by 1 here and is picked greedily below.
        self.divisor = torch.tensor([[inp.temperature or 1.0] for inp in rows], dtype=torch.float32, device=device)
        self.greedy = torch.tensor([inp.temperature == 0 for inp in rows], device=device)
        self.all_greedy = all(inp.temperature == 0 for inp in rows)
        self.top_k = [inp.top_k for inp in rows]
        self.top_p = torch.tensor([[inp.top_p] for inp in rows], dtype=torch.float32, device=device)
        self.nucleus = torch.tensor([[inp.top_p < 1.0] for inp in rows], device=device)
        self.any_top_p = any(inp.top_p < 1.0 for inp in rows)
        self.penalised = [r for r, inp in enumerate(rows) if inp.repetition_penalty != 1.0]
        self._k = None  # (kmax, index of each row's k-th value, rows that use top-k), once the vocabulary is known

    def _top_k(self, vocab: int):
        import torch

        if self._k is None:
            ks = [k if 0 < k < vocab else 0 for k in self.top_k]
            kmax = max(ks)
            self._k = (kmax, torch.tensor([[max(k, 1) - 1] for k in ks], device=self.device),
                       torch.tensor([[k > 0] for k in ks], device=self.device))
        return self._k

    def __call__(self, input_ids, scores):
        import torch

        state = self.state
        logits = scores.float()
        if self.penalised:
            logits = logits.clone()
            for r in self.penalised:
                if state.done[r]:
                    continue
                # Over the row's own prompt and output only: its left padding is not its text.
                penalty = state.rows[r].repetition_penalty
                prev = torch.unique(input_ids[r, state.pads[r]:])
                vals = logits[r, prev]
                logits[r, prev] = torch.where(vals < 0, vals * penalty, vals / penalty)
        greedy = logits.argmax(-1)
        if self.all_greedy:
            picks = greedy
        else:
            picks = self._sample(logits, greedy)
        onehot = torch.full_like(scores, float("-inf"))
        onehot.scatter_(1, picks[:, None], 0.0)
        return onehot

    def _sample(self, logits, greedy):
        import torch

        scaled = logits / self.divisor
        kmax, kth_index, use_k = self._top_k(logits.shape[-1])
        if kmax:
            kth = torch.topk(scaled, kmax, dim=-1).values.gather(1, kth_index)
            scaled = scaled.masked_fill(use_k & (scaled < kth), float("-inf"))
        probs = torch.softmax(scaled, dim=-1)
        if self.any_top_p:
            sorted_p, order = torch.sort(probs, dim=-1, descending=True, stable=True)
            # Drop a token when the tokens before it already reach top_p; the first always stays.
            drop = ((torch.cumsum(sorted_p, dim=-1) - sorted_p) >= self.top_p) & self.nucleus
            probs = torch.zeros_like(probs).scatter_(1, order, sorted_p.masked_fill(drop, 0.0))
        cdf = torch.cumsum(probs, dim=-1)
        # One draw in (0, 1] per live row (finished rows are padded by generate() and
        # spend none). The first token whose cumulative probability reaches
        # draw * total has a probability above zero: a token cut by top-k or
        # top-p is never picked, whatever the rounding.
        done = self.state.done
        draws = torch.tensor([[1.0 if done[r] else 1.0 - g.random()] for r, g in enumerate(self.generators)],
                             dtype=torch.float32, device=logits.device)
        sampled = torch.searchsorted(cdf, draws * cdf[:, -1:])[:, 0].clamp_(max=cdf.shape[-1] - 1)
        # Temperature 0 is greedy; so is a temperature so small it overflowed the logits to +-inf.
        return torch.where(self.greedy | torch.isnan(cdf[:, -1]), greedy, sampled)


class RowStopper:
    """A stopping criterion ending each row at its own max_new_tokens, stop strings, EOS or cancellation.

    generate() accepts a per-row bool tensor from it and pads the rows it ends.
    """

    def __init__(self, state: _RowState):
        self.state = state

    def __call__(self, input_ids, scores, **kwargs):
        import torch

        state = self.state
        n = input_ids.shape[1] - state.prompt_width
        last = input_ids[:, -1].tolist()
        for r, inp in enumerate(state.rows):
            if state.done[r]:
                continue
            if state.is_cancelled(r):
                state.done[r] = state.cancelled[r] = True
                continue
            if last[r] in state.eos_ids:
                self._end(r, n, "stop")
            elif inp.stop and state.first_stop(r, state.decode(input_ids[r, state.prompt_width:].tolist())) is not None:
                self._end(r, n, "stop")
            elif n >= state.limits[r]:
                self._end(r, n, "length")
            state.on_progress(r, n, state.limits[r])
        return torch.tensor(state.done, dtype=torch.bool, device=input_ids.device)

    def _end(self, r: int, n: int, reason: str) -> None:
        self.state.done[r] = True
        self.state.ended_at[r] = n
        self.state.reason[r] = reason
