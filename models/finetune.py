"""The fine-tune family: dataset checks, hyperparameters, and a resumable
supervised fine-tuning loop (LoRA with peft, or full) over a causal LM.

Importing this module needs pydantic only: the API validates fine-tune inputs
and datasets with it and never imports torch. The trainer is a plain function
with callbacks; storage, leases and the database stay with the worker.
"""
from __future__ import annotations

import io
import json
import math
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal

from pydantic import BaseModel, ConfigDict, Field

from models.base import InputInvalid, check_bound, parse

FAMILY = "fine-tune"
SUFFIX_PATTERN = r"^[a-z0-9][a-z0-9-]{0,39}$"


class Hyperparameters(BaseModel):
    model_config = ConfigDict(extra="forbid")

    epochs: int = Field(3, ge=1, le=100, description="Passes over the dataset.")
    learning_rate: float = Field(1e-3, gt=0, le=1, description="AdamW learning rate.")
    batch_size: int = Field(4, ge=1, le=64, description="Rows per optimizer step.")
    lora_rank: int = Field(8, ge=1, le=256, description="LoRA rank (method=lora).")
    lora_alpha: int = Field(16, ge=1, le=1024, description="LoRA alpha (method=lora).")
    max_steps: int | None = Field(None, ge=1, description="Stop after this many optimizer steps, whatever the epochs.")
    max_seq_len: int = Field(128, ge=8, le=2048, description="Tokens per row; longer rows are cut.")
    seed: int = Field(0, ge=0, le=2**32 - 1, description="Seeds initialisation and data order: the same seed trains the same model.")


class Input(BaseModel):
    """A fine-tune job's `input`."""

    model_config = ConfigDict(extra="forbid")

    training_file: str = Field(pattern=r"^[0-9a-f]{32}$", description="A file id from POST /v1/files (purpose fine-tune).")
    method: Literal["lora", "full"] = Field("lora", description="LoRA adapters (small, fast) or all weights.")
    hyperparameters: Hyperparameters = Field(default_factory=Hyperparameters)
    suffix: str = Field("custom", pattern=SUFFIX_PATTERN, description="Part of the new model's name: <base>:ft-<suffix>-<id>.")


def validate(raw: Any, limits: dict) -> Input:
    inp = parse(Input, raw)
    errors: list[dict[str, str]] = []
    hp = inp.hyperparameters
    check_bound(errors, "input.hyperparameters.epochs", hp.epochs, limits.get("max_epochs"))
    check_bound(errors, "input.hyperparameters.max_steps", hp.max_steps, limits.get("max_train_steps"))
    check_bound(errors, "input.hyperparameters.max_seq_len", hp.max_seq_len, limits.get("max_seq_len"))
    if errors:
        raise InputInvalid(errors)
    return inp


# --- datasets -----------------------------------------------------------------------


@dataclass
class Dataset:
    rows: list[dict[str, str]]
    format: str  # "prompt_completion" | "text"


def parse_dataset(data: bytes, max_rows: int | None = None) -> Dataset:
    """Check a JSONL dataset: every line a JSON object with string "prompt" and
    "completion", or a string "text"; one format per file. Raises InputInvalid
    naming the line and what is wrong with it."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InputInvalid([{"field": "file", "message": f"is not UTF-8 text (byte {exc.start})"}]) from None
    rows, fmt, errors = [], None, []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        problem, row = _check_row(line)
        if problem is None:
            row_fmt = "text" if "text" in row else "prompt_completion"
            if fmt is None:
                fmt = row_fmt
            elif row_fmt != fmt:
                problem = f"is a {row_fmt!r} row but earlier rows are {fmt!r}; use one format per file"
        if problem:
            errors.append({"field": f"file.line[{number}]", "message": f"line {number} {problem}"})
            if len(errors) >= 10:
                break
            continue
        rows.append(row)
    if errors:
        raise InputInvalid(errors)
    if not rows:
        raise InputInvalid([{"field": "file", "message": "has no rows; expected JSON lines of {\"prompt\", \"completion\"} or {\"text\"}"}])
    if max_rows is not None and len(rows) > max_rows:
        raise InputInvalid([{"field": "file", "message": f"has {len(rows)} rows; at most {max_rows} are allowed"}])
    return Dataset(rows, fmt or "text")


def _check_row(line: str) -> tuple[str | None, dict]:
    try:
        row = json.loads(line)
    except json.JSONDecodeError as exc:
        return f"is not valid JSON: {exc.msg} at column {exc.colno}", {}
    except RecursionError:  # nesting deeper than the interpreter's stack
        return "is JSON nested too deeply to be a row", {}
    except ValueError as exc:  # valid JSON Python will not read, e.g. a number of 5,000 digits
        return f"is JSON that cannot be read: {str(exc)[:200]}", {}
    if not isinstance(row, dict):
        return f"must be a JSON object, got {type(row).__name__}", {}
    keys = set(row)
    if keys == {"text"}:
        if not isinstance(row["text"], str) or not row["text"]:
            return 'has a "text" that is not a non-empty string', {}
        return None, row
    if keys == {"prompt", "completion"}:
        for k in ("prompt", "completion"):
            if not isinstance(row[k], str):
                return f'has a "{k}" that is not a string', {}
        if not row["completion"]:
            return 'has an empty "completion"', {}
        return None, row
    missing = {"prompt", "completion"} - keys if keys & {"prompt", "completion"} else set()
    if missing:
        return f'is missing {", ".join(sorted(missing))!s}', {}
    return f'must have "prompt" and "completion", or "text"; got keys {sorted(keys)}', {}


# --- training ---------------------------------------------------------------------------


@dataclass
class TrainResult:
    # Files of the new model version: the adapter (LoRA) or full weights, safetensors.
    files: dict[str, bytes]
    metrics: dict[str, Any]
    steps_done: int
    canceled: bool = False
    losses: list[float] = field(default_factory=list)


def total_steps(n_rows: int, hp: Hyperparameters) -> int:
    steps = hp.epochs * math.ceil(n_rows / hp.batch_size)
    return min(steps, hp.max_steps) if hp.max_steps else steps


def train(
    base_checkpoint: str,
    dataset: Dataset,
    inp: Input,
    device: str,
    *,
    resume: bytes | None,
    checkpoint_every: int,
    on_step: Callable[[int, int, int, float], None],
    save_checkpoint: Callable[[int, bytes], None],
    is_cancelled: Callable[[], bool],
) -> TrainResult:
    """Supervised fine-tuning, resumable. A checkpoint (weights being trained,
    optimizer state, RNG state, step) is handed to `save_checkpoint` every
    `checkpoint_every` steps and on cancel; given one as `resume`, training
    continues from its step and ends with the model an uninterrupted run
    would have made (same data order, same RNG draws)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    hp = inp.hyperparameters
    torch.manual_seed(hp.seed)
    tokenizer = AutoTokenizer.from_pretrained(base_checkpoint)
    model = AutoModelForCausalLM.from_pretrained(base_checkpoint, dtype=torch.float32)
    if inp.method == "lora":
        from peft import LoraConfig, get_peft_model

        # lora_dropout 0: dropout draws would make a resumed run depend on more
        # RNG state than we checkpoint; the base model's own dropout is covered.
        # Adapters on every linear layer (attention and MLP): on small models
        # attention-only LoRA learns a new phrase several times slower.
        model = get_peft_model(model, LoraConfig(r=hp.lora_rank, lora_alpha=hp.lora_alpha, lora_dropout=0.0,
                                                 target_modules="all-linear", task_type="CAUSAL_LM"))
    model.to(device)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=hp.learning_rate)
    examples = _tokenize(tokenizer, dataset, hp.max_seq_len)
    total = total_steps(len(examples), hp)
    per_epoch = math.ceil(len(examples) / hp.batch_size)

    step, losses = 0, []
    if resume is not None:
        state = torch.load(io.BytesIO(resume), map_location=device, weights_only=True)
        _load_trainable(model, state["weights"])
        optimizer.load_state_dict(state["optimizer"])
        torch.set_rng_state(state["rng"])
        step, losses = int(state["step"]), list(state["losses"])

    def snapshot() -> bytes:
        buf = io.BytesIO()
        torch.save({"weights": _trainable_state(model), "optimizer": optimizer.state_dict(),
                    "rng": torch.get_rng_state(), "step": step, "losses": losses}, buf)
        return buf.getvalue()

    first_step = step
    while step < total:
        epoch, index = divmod(step, per_epoch)
        # The order of an epoch depends only on seed and epoch, so a resumed run
        # sees exactly the batches the interrupted one would have.
        order = torch.randperm(len(examples), generator=torch.Generator().manual_seed(hp.seed + epoch)).tolist()
        rows = [examples[i] for i in order[index * hp.batch_size:(index + 1) * hp.batch_size]]
        if is_cancelled():
            save_checkpoint(step, snapshot())
            return TrainResult({}, {"train_loss": losses[-1] if losses else None}, step, canceled=True, losses=losses)
        ids, mask, labels = _collate(rows, tokenizer.pad_token_id or 0, device)
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        step += 1
        losses.append(round(float(loss), 6))
        on_step(step, total, epoch + 1, losses[-1])
        if step % checkpoint_every == 0 and step < total:
            save_checkpoint(step, snapshot())

    model.eval()
    files = _export(model, tokenizer, inp.method)
    metrics = {
        "train_loss": losses[-1],
        "initial_loss": losses[0],
        "steps": total,
        "resumed_from_step": first_step,
        "rows": len(examples),
        "method": inp.method,
    }
    return TrainResult(files, metrics, total, losses=losses)


def _tokenize(tokenizer, dataset: Dataset, max_len: int) -> list[tuple[list[int], list[int]]]:
    """(input ids, labels) per row. For prompt/completion rows only the
    completion (and the end-of-text token) is learned; -100 masks the prompt."""
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    out = []
    for row in dataset.rows:
        if dataset.format == "text":
            ids = tokenizer(row["text"], add_special_tokens=False)["input_ids"] + eos
            labels = list(ids)
        else:
            p = tokenizer(row["prompt"], add_special_tokens=False)["input_ids"]
            c = tokenizer(row["completion"], add_special_tokens=False)["input_ids"] + eos
            ids, labels = p + c, [-100] * len(p) + c
        out.append((ids[:max_len], labels[:max_len]))
    return out


def _collate(rows, pad_id: int, device):
    import torch

    width = max(len(ids) for ids, _ in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    labels = torch.full((len(rows), width), -100, dtype=torch.long)
    for r, (i, lab) in enumerate(rows):
        ids[r, :len(i)] = torch.tensor(i)
        mask[r, :len(i)] = 1
        labels[r, :len(lab)] = torch.tensor(lab)
    return ids.to(device), mask.to(device), labels.to(device)


def _trainable_state(model) -> dict:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def _load_trainable(model, weights: dict) -> None:
    import torch

    named = dict(model.named_parameters())
    with torch.no_grad():
        for name, value in weights.items():
            named[name].copy_(value)


def _export(model, tokenizer, method: str) -> dict[str, bytes]:
    """The new version's files: the LoRA adapter, or the full model and tokenizer."""
    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        if method == "full":
            tokenizer.save_pretrained(tmp)
        return {p.name: p.read_bytes() for p in Path(tmp).iterdir() if p.is_file()}


def materialize(base_checkpoint: str, version_dir: Path, method: str, dest: Path) -> Path:
    """A loadable checkpoint for a fine-tuned version: full weights as they are;
    a LoRA adapter merged into its base (inference then runs as fast as the
    base, through the same text family code)."""
    if method == "full":
        return version_dir
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base = AutoModelForCausalLM.from_pretrained(base_checkpoint, dtype=torch.float32)
    merged = PeftModel.from_pretrained(base, str(version_dir)).merge_and_unload()
    tmp = Path(tempfile.mkdtemp(dir=dest.parent, prefix=".merge-"))
    merged.save_pretrained(tmp, safe_serialization=True)
    AutoTokenizer.from_pretrained(base_checkpoint).save_pretrained(tmp)
    tmp.rename(dest)
    return dest
