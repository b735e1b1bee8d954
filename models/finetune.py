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
from models.libraries import quiet

FAMILY = "fine-tune"
SUFFIX_PATTERN = r"^[a-z0-9][a-z0-9-]{0,39}$"
# The most max_steps may ever say. A deployment's real bound is lower: the base
# model's `max_train_steps`, else GENQ_MAX_TRAIN_STEPS (check_workload).
MAX_STEPS_CEILING = 1_000_000


class Hyperparameters(BaseModel):
    model_config = ConfigDict(extra="forbid")

    epochs: int = Field(3, ge=1, le=100, description="Passes over the dataset.")
    learning_rate: float = Field(1e-3, gt=0, le=1, description="AdamW learning rate.")
    batch_size: int = Field(4, ge=1, le=64, description="Rows per optimizer step.")
    lora_rank: int = Field(8, ge=1, le=256, description="LoRA rank (method=lora).")
    lora_alpha: int = Field(16, ge=1, le=1024, description="LoRA alpha (method=lora).")
    max_steps: int | None = Field(None, ge=1, le=MAX_STEPS_CEILING,
                                  description="Stop after this many optimizer steps, whatever the epochs.")
    max_seq_len: int = Field(128, ge=8, le=2048, description="Tokens per row; longer rows are cut. Rows with no "
                             "completion token left within it are skipped.")
    seed: int = Field(0, ge=0, le=2**32 - 1, description="Seeds initialisation and data order: the same seed trains the same model.")


class Input(BaseModel):
    """A fine-tune job's `input`."""

    model_config = ConfigDict(extra="forbid")

    training_file: str = Field(pattern=r"^[0-9a-f]{32}$", description="A file id from POST /v1/files (purpose fine-tune).")
    method: Literal["lora", "full"] = Field("lora", description="LoRA adapters (small, fast) or all weights.")
    hyperparameters: Hyperparameters = Field(default_factory=Hyperparameters)
    suffix: str = Field("custom", pattern=SUFFIX_PATTERN, description="Part of the new model's name: <base>:ft-<suffix>-<id>.")


def validate(raw: Any, limits: dict) -> Input:
    """The input checked against the base model's registry limits; the work it
    asks for depends on the dataset too, and is checked by check_workload."""
    inp = parse(Input, raw)
    errors: list[dict[str, str]] = []
    hp = inp.hyperparameters
    check_bound(errors, "input.hyperparameters.epochs", hp.epochs, limits.get("max_epochs"))
    check_bound(errors, "input.hyperparameters.max_seq_len", hp.max_seq_len, limits.get("max_seq_len"))
    if errors:
        raise InputInvalid(errors)
    return inp


def input_schema(limits: dict, max_train_steps: int = 0) -> dict:
    """Input's JSON schema, self-contained, bounded for one base model: its
    registry's max_epochs and max_seq_len, and its max_train_steps (else the
    deployment's, GENQ_MAX_TRAIN_STEPS) on max_steps, so the schema admits what
    validation accepts. What depends on the dataset too (the run's real steps
    and examples) is checked at submit by check_workload."""
    schema = Input.model_json_schema()
    hp = schema.pop("$defs")["Hyperparameters"]
    schema["properties"]["hyperparameters"] = hp
    bounds = {"epochs": limits.get("max_epochs"), "max_seq_len": limits.get("max_seq_len"),
              "max_steps": limits.get("max_train_steps", max_train_steps)}
    for fieldname, limit in bounds.items():
        if limit:
            prop = hp["properties"][fieldname]
            target = next((b for b in prop.get("anyOf", []) if b.get("type") != "null"), prop)
            target["maximum"] = min(target["maximum"], limit)
    return schema


def check_workload(inp: Input, n_rows: int, limits: dict, *, max_train_steps: int, max_train_examples: int) -> None:
    """Refuse a fine-tune of `n_rows` rows that would take more optimizer steps,
    or train on more examples (rows × epochs, or what max_steps leaves of it),
    than the base model's registry limits allow; where the registry sets none,
    the deployment's defaults given here (GENQ_MAX_TRAIN_STEPS,
    GENQ_MAX_TRAIN_EXAMPLES). 0 means no limit. Raises InputInvalid naming the
    hyperparameter to change and the numbers."""
    hp = inp.hyperparameters
    step_limit = limits.get("max_train_steps", max_train_steps)
    example_limit = limits.get("max_train_examples", max_train_examples)
    steps, examples = total_steps(n_rows, hp), total_examples(n_rows, hp)
    # max_steps decides when it cuts training short; otherwise epochs do.
    capped = hp.max_steps is not None and steps == hp.max_steps and steps < hp.epochs * math.ceil(n_rows / hp.batch_size)
    field = "input.hyperparameters.max_steps" if capped else "input.hyperparameters.epochs"
    shape = (f"{steps} steps at batch_size {hp.batch_size}, cut short by max_steps" if capped
             else f"{n_rows} rows × {hp.epochs} epochs at batch_size {hp.batch_size}")
    errors: list[dict[str, str]] = []
    if step_limit and hp.max_steps is not None and hp.max_steps > step_limit:
        check_bound(errors, "input.hyperparameters.max_steps", hp.max_steps, step_limit)
    elif step_limit and steps > step_limit:
        errors.append({"field": field, "message": (
            f"this fine-tune would take {steps} optimizer steps ({shape}); at most {step_limit} are allowed for "
            f"this model: lower epochs, raise batch_size, or set max_steps")})
    if example_limit and examples > example_limit and not errors:
        errors.append({"field": field, "message": (
            f"this fine-tune would train on {examples} examples ({shape}); at most {example_limit} are allowed "
            f"for this model: lower {'max_steps' if capped else 'epochs or set max_steps'}, or train on fewer rows")})
    if errors:
        raise InputInvalid(errors)


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


class TrainingFailed(Exception):
    """Training cannot go on, for a reason the job's owner can act on; `code`
    and `message` become the job's error."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code
        self.message = message


def total_steps(n_rows: int, hp: Hyperparameters) -> int:
    steps = hp.epochs * math.ceil(n_rows / hp.batch_size)
    return min(steps, hp.max_steps) if hp.max_steps else steps


def total_examples(n_rows: int, hp: Hyperparameters) -> int:
    """Rows the trainer will pass through, counting each epoch's: rows × epochs,
    unless max_steps stops it earlier (each step takes batch_size rows, the
    last of an epoch what is left)."""
    per_epoch = math.ceil(n_rows / hp.batch_size)
    if per_epoch == 0:
        return 0
    epochs, steps = divmod(total_steps(n_rows, hp), per_epoch)
    return epochs * n_rows + steps * hp.batch_size


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
    on_notice: Callable[[str], None] | None = None,
) -> TrainResult:
    """Supervised fine-tuning, resumable. A checkpoint (weights being trained,
    optimizer state, RNG state, step) is handed to `save_checkpoint` every
    `checkpoint_every` steps and on cancel; given one as `resume`, training
    continues from its step and ends with the model an uninterrupted run
    would have made (same data order, same RNG draws).

    Rows with no token to learn within max_seq_len are skipped, and
    `on_notice` is told which. Raises TrainingFailed when max_seq_len is more
    than the base model holds, when no row is left to learn from, and when the
    loss or its gradient stops being a finite number (nothing is returned,
    so no model is made of NaN weights)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    quiet()

    hp = inp.hyperparameters
    _check_positions(AutoConfig.from_pretrained(base_checkpoint), hp.max_seq_len)
    tokenizer = AutoTokenizer.from_pretrained(base_checkpoint)
    examples, skipped = _tokenize(tokenizer, dataset, hp.max_seq_len)
    if skipped and on_notice is not None:
        on_notice(_skipped_notice(dataset, skipped, hp.max_seq_len))
    if not examples:
        raise TrainingFailed("nothing_to_learn", _nothing_to_learn(dataset, skipped, hp.max_seq_len))
    torch.manual_seed(hp.seed)
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
            return TrainResult({}, {"train_loss": losses[-1] if losses else None, "skipped_rows": len(skipped)}, step,
                               canceled=True, losses=losses)
        ids, mask, labels = _collate(rows, tokenizer.pad_token_id or 0, device)
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        value = loss.detach().item()
        if not math.isfinite(value):
            raise _not_finite("loss", value, step + 1, hp)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        # A finite loss can still give an infinite gradient, which AdamW would
        # turn into NaN weights: stop before the update, as for the loss.
        grad_norm = torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None]).item()
        if not math.isfinite(grad_norm):
            raise _not_finite("gradient", grad_norm, step + 1, hp)
        optimizer.step()
        step += 1
        losses.append(round(value, 6))
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
        "skipped_rows": len(skipped),
        "method": inp.method,
    }
    return TrainResult(files, metrics, total, losses=losses)


def _check_positions(config, max_seq_len: int) -> None:
    """A row longer than the base model's position table ends in an IndexError
    deep in its forward pass: refuse such a max_seq_len up front, by name."""
    positions = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
    if positions and max_seq_len > positions:
        raise TrainingFailed("invalid_input", f"input.hyperparameters.max_seq_len: must be at most {positions} for "
                                              f"this base model (it has {positions} positions), got {max_seq_len}")


def _not_finite(what: str, value: float, step: int, hp: Hyperparameters) -> TrainingFailed:
    return TrainingFailed("loss_not_finite", (
        f"the {what} became {'NaN' if math.isnan(value) else 'infinite'} at step {step}; training stopped and no "
        f"model was made. Lower input.hyperparameters.learning_rate (it was {hp.learning_rate}), or check the "
        f"base model and the dataset"))


def _tokenize(tokenizer, dataset: Dataset, max_len: int) -> tuple[list[tuple[list[int], list[int]]], list[tuple[int, int]]]:
    """(input ids, labels) per row, cut to max_len, and the rows skipped as
    (index, prompt tokens). For prompt/completion rows only the completion
    (and the end-of-text token) is learned; -100 masks the prompt. A row whose
    prompt fills max_len has no label left: alone in a batch its loss would be
    0/0, a NaN that poisons the weights, so it is skipped."""
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    out, skipped = [], []
    for index, row in enumerate(dataset.rows):
        if dataset.format == "text":
            ids = tokenizer(row["text"], add_special_tokens=False)["input_ids"] + eos
            labels, prompt = list(ids), 0
        else:
            p = tokenizer(row["prompt"], add_special_tokens=False)["input_ids"]
            c = tokenizer(row["completion"], add_special_tokens=False)["input_ids"] + eos
            ids, labels, prompt = p + c, [-100] * len(p) + c, len(p)
        ids, labels = ids[:max_len], labels[:max_len]
        # The model predicts each token from those before it: the first one is never learned.
        if any(label != -100 for label in labels[1:]):
            out.append((ids, labels))
        else:
            skipped.append((index, prompt))
    return out, skipped


def _skipped_notice(dataset: Dataset, skipped: list[tuple[int, int]], max_len: int) -> str:
    numbers = ", ".join(str(index + 1) for index, _ in skipped[:10]) + (", ..." if len(skipped) > 10 else "")
    why = ("they are a single token, nothing to predict" if dataset.format == "text" else
           f"no completion token fits within input.hyperparameters.max_seq_len={max_len} after the prompt; "
           f"raise max_seq_len or shorten those prompts to train on them")
    return f"skipped {len(skipped)} of {len(dataset.rows)} rows (rows {numbers}, counting from 1): {why}"


def _nothing_to_learn(dataset: Dataset, skipped: list[tuple[int, int]], max_len: int) -> str:
    if dataset.format == "text":
        return f"none of the {len(dataset.rows)} rows has a token to learn: each is a single token"
    shortest = min(prompt for _, prompt in skipped)
    return (f"none of the {len(dataset.rows)} rows has a completion token within "
            f"input.hyperparameters.max_seq_len={max_len} (the shortest prompt is {shortest} tokens); raise "
            f"max_seq_len or shorten the prompts")


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

    quiet()

    base = AutoModelForCausalLM.from_pretrained(base_checkpoint, dtype=torch.float32)
    merged = PeftModel.from_pretrained(base, str(version_dir)).merge_and_unload()
    tmp = Path(tempfile.mkdtemp(dir=dest.parent, prefix=".merge-"))
    merged.save_pretrained(tmp, safe_serialization=True)
    AutoTokenizer.from_pretrained(base_checkpoint).save_pretrained(tmp)
    tmp.rename(dest)
    return dest
