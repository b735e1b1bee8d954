"""The fine-tune family: dataset checks, hyperparameters, and a resumable
training loop over a causal LM, LoRA (peft) or full: supervised fine-tuning on
prompt/completion, text or chat rows, and preference tuning (DPO) on
prompt/chosen/rejected pairs, with an optional validation set.

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
# A validation file's rows, and the validation passes of one run: each pass
# is a forward over every validation row, so both are bounded.
MAX_VALIDATION_ROWS = 1_000
MAX_VALIDATION_PASSES = 100
MAX_MESSAGES = 256
ROLES = ("system", "user", "assistant")
# method -> (the weights trained, the objective). A version's own method
# (ModelVersion.method, ft:<method>: checkpoints) is the weights kind.
METHODS = {"lora": ("lora", "sft"), "full": ("full", "sft"), "dpo": ("lora", "dpo"), "dpo-full": ("full", "dpo")}


class Hyperparameters(BaseModel):
    model_config = ConfigDict(extra="forbid")

    epochs: int = Field(3, ge=1, le=100, description="Passes over the dataset.")
    learning_rate: float = Field(1e-3, gt=0, le=1, description="AdamW learning rate.")
    batch_size: int = Field(4, ge=1, le=64, description="Rows per optimizer step.")
    lora_rank: int = Field(8, ge=1, le=256, description="LoRA rank (methods lora, dpo).")
    lora_alpha: int = Field(16, ge=1, le=1024, description="LoRA alpha (methods lora, dpo).")
    warmup_steps: int = Field(0, ge=0, le=10_000, description="Optimizer steps over which the learning rate rises "
                              "linearly to learning_rate; constant after.")
    beta: float = Field(0.1, gt=0, le=10, description="Preference tuning (method dpo, dpo-full): how strongly "
                        "the log-probability margin over the reference model is pushed; higher keeps closer to it.")
    eval_every: int = Field(10, ge=1, le=MAX_STEPS_CEILING, description="With a validation_file: optimizer steps "
                            "between validation passes (and one after the last step).")
    max_steps: int | None = Field(None, ge=1, le=MAX_STEPS_CEILING,
                                  description="Stop after this many optimizer steps, whatever the epochs.")
    max_seq_len: int = Field(128, ge=8, le=2048, description="Tokens per row (each side of a preference pair); longer "
                             "rows are cut. Rows with nothing left to learn within it are skipped.")
    seed: int = Field(0, ge=0, le=2**32 - 1, description="Seeds initialisation and data order: the same seed trains the same model.")


class Input(BaseModel):
    """A fine-tune job's `input`."""

    model_config = ConfigDict(extra="forbid")

    training_file: str = Field(pattern=r"^[0-9a-f]{32}$", description="A file id from POST /v1/files (purpose fine-tune).")
    validation_file: str | None = Field(None, pattern=r"^[0-9a-f]{32}$", description=(
        "A file id like training_file's, in the same row format: its loss (and, for dpo, preference accuracy) is "
        "measured every eval_every steps and reported in `metrics` events and the output's metrics."))
    method: Literal["lora", "full", "dpo", "dpo-full"] = Field("lora", description=(
        "lora: LoRA adapters (small, fast); full: all weights; both supervised, on prompt/completion, text or "
        "chat rows. dpo: preference tuning (DPO) of LoRA adapters against the adapter-disabled base; dpo-full: "
        "of all weights against a frozen copy of the base; both on {prompt, chosen, rejected} rows."))
    hyperparameters: Hyperparameters = Field(default_factory=Hyperparameters)
    suffix: str = Field("custom", pattern=SUFFIX_PATTERN, description="Part of the new model's name: <base>:ft-<suffix>-<id>.")


    @property
    def weights(self) -> str:
        """What the new version is: a LoRA adapter or full weights."""
        return METHODS[self.method][0]

    @property
    def objective(self) -> str:
        return METHODS[self.method][1]


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
    return bounded_schema(Input, {"epochs": limits.get("max_epochs"), "max_seq_len": limits.get("max_seq_len"),
                                  "max_steps": limits.get("max_train_steps", max_train_steps)})


def bounded_schema(model: type[BaseModel], bounds: dict[str, int | None]) -> dict:
    """`model`'s JSON schema with its Hyperparameters inlined and each named
    hyperparameter's maximum lowered to its bound (None or 0: left as is)."""
    schema = model.model_json_schema()
    hp = schema.pop("$defs")["Hyperparameters"]  # its only nested model
    schema["properties"]["hyperparameters"] = hp
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


def check_datasets(inp: Input, training_format: str, n_rows: int, validation: tuple[str, int] | None,
                   has_chat_template: bool | None = None) -> None:
    """What the files must be for this method: preference rows for dpo, the
    others for supervised methods; a validation file in the training file's
    format, of at most MAX_VALIDATION_ROWS rows, measured at most
    MAX_VALIDATION_PASSES times; chat rows only for a model with a chat
    template (`has_chat_template` False; None when the submit cannot tell,
    and the trainer checks). Raises InputInvalid naming the field."""
    errors: list[dict[str, str]] = []
    wants_pairs = inp.objective == "dpo"
    if wants_pairs != (training_format == "preference"):
        wanted = ('{"prompt", "chosen", "rejected"} rows' if wants_pairs
                  else 'prompt/completion, text or chat rows')
        errors.append({"field": "input.method", "message": (
            f"method {inp.method!r} trains on {wanted}, but the training file holds {training_format} rows; "
            + ("use method 'dpo' (or 'dpo-full') for preference pairs" if training_format == "preference"
               else "upload preference pairs, or use method 'lora' or 'full'"))})
    if training_format == "chat" and has_chat_template is False:
        errors.append({"field": "input.training_file", "message": (
            "line 1 holds chat messages, but this model's tokenizer has no chat template to render them with; "
            "upload prompt/completion rows instead")})
    if validation is not None:
        v_format, v_rows = validation
        steps = total_steps(n_rows, inp.hyperparameters)
        passes = math.ceil(steps / inp.hyperparameters.eval_every)
        if v_format != training_format:
            errors.append({"field": "input.validation_file", "message": (
                f"holds {v_format} rows but the training file holds {training_format} rows; use one format for both")})
        elif v_rows > MAX_VALIDATION_ROWS:
            errors.append({"field": "input.validation_file", "message": (
                f"has {v_rows} rows; at most {MAX_VALIDATION_ROWS} are allowed in a validation file")})
        elif passes > MAX_VALIDATION_PASSES:
            errors.append({"field": "input.hyperparameters.eval_every", "message": (
                f"{steps} steps with a validation pass every {inp.hyperparameters.eval_every} would make {passes} "
                f"passes; at most {MAX_VALIDATION_PASSES} are allowed: raise eval_every to at least "
                f"{math.ceil(steps / MAX_VALIDATION_PASSES)}")})
    if errors:
        raise InputInvalid(errors)


def chat_template_known(checkpoint: str, model_dir: Path) -> bool | None:
    """Whether a base model's tokenizer has a chat template, read from its
    files without loading it: True or False for a local directory (a demo
    checkpoint once built), None for what is not on this machine (a hub id),
    which the trainer checks when it loads the tokenizer."""
    from models.checkpoints import on_this_machine

    path = on_this_machine(checkpoint, model_dir)
    if path is None:
        return None
    config = path / "tokenizer_config.json"
    if not config.is_file():
        return None
    if (path / "chat_template.jinja").is_file() or (path / "chat_template.json").is_file():
        return True
    try:
        return bool(json.loads(config.read_text()).get("chat_template"))
    except (OSError, ValueError):
        return None


# --- datasets -----------------------------------------------------------------------

# The row formats, by their keys; one format per file.
FORMATS = {
    frozenset({"prompt", "completion"}): "prompt_completion",
    frozenset({"text"}): "text",
    frozenset({"messages"}): "chat",
    frozenset({"prompt", "chosen", "rejected"}): "preference",
}
EXPECTED = ('expected JSON lines of {"prompt", "completion"}, {"text"}, {"messages"} (chat) or '
            '{"prompt", "chosen", "rejected"} (preference pairs)')


@dataclass
class Dataset:
    rows: list[dict]
    format: str  # "prompt_completion" | "text" | "chat" | "preference"


def parse_dataset(data: bytes, max_rows: int | None = None) -> Dataset:
    """Check a JSONL dataset: every line a JSON object of one of the FORMATS,
    one format per file. Raises InputInvalid naming the line, and within it
    the field, and what is wrong with it."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InputInvalid([{"field": "file", "message": f"is not UTF-8 text (byte {exc.start})"}]) from None
    rows, fmt, errors = [], None, []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        problem, row, row_fmt = _check_row(line)
        if problem is None:
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
        raise InputInvalid([{"field": "file", "message": f"has no rows; {EXPECTED}"}])
    if max_rows is not None and len(rows) > max_rows:
        raise InputInvalid([{"field": "file", "message": f"has {len(rows)} rows; at most {max_rows} are allowed"}])
    return Dataset(rows, fmt or "text")


def _check_row(line: str) -> tuple[str | None, dict, str]:
    """(what is wrong with the line or None, the row, its format)."""
    try:
        row = json.loads(line)
    except json.JSONDecodeError as exc:
        return f"is not valid JSON: {exc.msg} at column {exc.colno}", {}, ""
    except RecursionError:  # nesting deeper than the interpreter's stack
        return "is JSON nested too deeply to be a row", {}, ""
    except ValueError as exc:  # valid JSON Python will not read, e.g. a number of 5,000 digits
        return f"is JSON that cannot be read: {str(exc)[:200]}", {}, ""
    if not isinstance(row, dict):
        return f"must be a JSON object, got {type(row).__name__}", {}, ""
    keys = frozenset(row)
    fmt = FORMATS.get(keys)
    if fmt == "text":
        if not isinstance(row["text"], str) or not row["text"]:
            return 'has a "text" that is not a non-empty string', {}, fmt
    elif fmt == "prompt_completion":
        for k in ("prompt", "completion"):
            if not isinstance(row[k], str):
                return f'has a "{k}" that is not a string', {}, fmt
        if not row["completion"]:
            return 'has an empty "completion"', {}, fmt
    elif fmt == "preference":
        for k in ("prompt", "chosen", "rejected"):
            if not isinstance(row[k], str):
                return f'has a "{k}" that is not a string', {}, fmt
        for k in ("chosen", "rejected"):
            if not row[k]:
                return f'has an empty "{k}"', {}, fmt
        if row["chosen"] == row["rejected"]:
            return 'has the same "chosen" and "rejected": a pair teaches nothing unless they differ', {}, fmt
    elif fmt == "chat":
        problem = _check_messages(row["messages"])
        if problem:
            return problem, {}, fmt
    else:
        for known in FORMATS:
            if keys & known and keys < known:  # some of a format's keys, none foreign: name what is missing
                return f'is missing {", ".join(sorted(known - keys))}', {}, ""
        return f"has keys {sorted(keys)}; {EXPECTED}", {}, ""
    return None, row, fmt


def _check_messages(messages) -> str | None:
    """A chat row's turns, as OpenAI's chat fine-tuning format has them:
    role and content strings, and on assistant turns an optional weight (0:
    shown as context, not learned). At least one assistant turn is learned."""
    if not isinstance(messages, list) or not messages:
        return 'has "messages" that is not a non-empty list'
    if len(messages) > MAX_MESSAGES:
        return f'has {len(messages)} messages; at most {MAX_MESSAGES} are allowed'
    learned = False
    for i, m in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            return f"has {where} that is not an object"
        extra = set(m) - {"role", "content", "weight"}
        if extra:
            return f"has {where} with unknown keys {sorted(extra)}; a message has role, content and weight"
        if m.get("role") not in ROLES:
            return f"has {where}.role {m.get('role')!r:.40}; must be one of {', '.join(ROLES)}"
        if not isinstance(m.get("content"), str):
            return f"has {where}.content that is not a string"
        if "weight" in m:
            if m["role"] != "assistant":
                return f"has {where}.weight on a {m['role']} message; only assistant messages carry a weight"
            if m["weight"] not in (0, 1) or isinstance(m["weight"], bool):
                return f"has {where}.weight {m['weight']!r:.40}; must be 0 or 1"
        if m["role"] == "assistant" and m.get("weight", 1) == 1:
            learned = True
    if not learned:
        return "has no assistant message to learn (none, or every one with weight 0)"
    return None


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
    on_step: Callable[..., None],
    save_checkpoint: Callable[[int, bytes], None],
    is_cancelled: Callable[[], bool],
    on_notice: Callable[[str], None] | None = None,
    validation: Dataset | None = None,
    on_eval: Callable[[int, dict], None] | None = None,
) -> TrainResult:
    """Fine-tuning, resumable: supervised (method lora, full) or preference
    tuning (dpo, dpo-full). A checkpoint (weights being trained, optimizer
    state, RNG state, step, the losses and validation results so far) is
    handed to `save_checkpoint` every `checkpoint_every` steps and on cancel;
    given one as `resume`, training continues from its step and ends with the
    model an uninterrupted run would have made (same data order, same RNG
    draws; the learning rate is a function of the step alone).

    `on_step(step, total, epoch, loss, **extra)`: extra is the step's
    preference_margin and preference_accuracy for DPO. With a `validation`
    set, `on_eval(step, metrics)` is told its validation_loss (and for DPO
    validation accuracy and margin) every eval_every steps and after the last.

    Rows with no token to learn within max_seq_len are skipped, and
    `on_notice` is told which. Raises TrainingFailed when max_seq_len is more
    than the base model holds, when chat rows meet a model without a chat
    template, when no row is left to learn from, and when the loss or its
    gradient stops being a finite number (nothing is returned, so no model is
    made of NaN weights)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    quiet()

    hp = inp.hyperparameters
    dpo = inp.objective == "dpo"
    _check_positions(AutoConfig.from_pretrained(base_checkpoint), hp.max_seq_len)
    tokenizer = AutoTokenizer.from_pretrained(base_checkpoint)
    examples, skipped = tokenize(tokenizer, dataset, hp.max_seq_len)
    if skipped and on_notice is not None:
        on_notice(_skipped_notice(dataset, skipped, hp.max_seq_len))
    if not examples:
        raise TrainingFailed("nothing_to_learn", _nothing_to_learn(dataset, skipped, hp.max_seq_len))
    held_out = tokenize(tokenizer, validation, hp.max_seq_len)[0] if validation is not None else []
    if validation is not None and not held_out and on_notice is not None:
        on_notice(f"none of the {len(validation.rows)} validation rows has a token to learn within "
                  f"input.hyperparameters.max_seq_len={hp.max_seq_len}: no validation loss will be measured")
    torch.manual_seed(hp.seed)
    model = AutoModelForCausalLM.from_pretrained(base_checkpoint, dtype=torch.float32)
    reference = None
    if dpo:
        # The loss compares the policy with the reference on the same tokens:
        # dropout in either would make the margin noise (trl turns it off too).
        _no_dropout(model)
        if inp.weights == "full":
            reference = AutoModelForCausalLM.from_pretrained(base_checkpoint, dtype=torch.float32).to(device).eval()
            reference.requires_grad_(False)
    if inp.weights == "lora":
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
    pad_id = tokenizer.pad_token_id or 0

    def objective(rows) -> tuple[Any, dict[str, float]]:
        if not dpo:
            ids, mask, labels = _collate(rows, pad_id, device)
            return model(input_ids=ids, attention_mask=mask, labels=labels).loss, {}
        return _dpo_loss(model, reference, rows, hp.beta, pad_id, device)

    step, losses, evals = 0, [], []
    if resume is not None:
        state = torch.load(io.BytesIO(resume), map_location=device, weights_only=True)
        _load_trainable(model, state["weights"])
        optimizer.load_state_dict(state["optimizer"])
        torch.set_rng_state(state["rng"])
        step, losses, evals = int(state["step"]), list(state["losses"]), list(state.get("evals", []))

    def snapshot() -> bytes:
        buf = io.BytesIO()
        torch.save({"weights": _trainable_state(model), "optimizer": optimizer.state_dict(),
                    "rng": torch.get_rng_state(), "step": step, "losses": losses, "evals": evals}, buf)
        return buf.getvalue()

    def evaluate() -> None:
        # model.eval() and no_grad draw nothing from the RNG: a resumed run stays exact.
        model.eval()
        sums: dict[str, float] = {}
        with torch.no_grad():
            for start in range(0, len(held_out), hp.batch_size):
                rows = held_out[start:start + hp.batch_size]
                loss, extra = objective(rows)
                for name, value in {"loss": loss.item(), **extra}.items():
                    sums[name] = sums.get(name, 0.0) + value * len(rows)
        model.train()
        result = {f"validation_{name}": round(value / len(held_out), 6) for name, value in sums.items()}
        evals.append({"step": step, **result})
        if on_eval is not None:
            on_eval(step, result)

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
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(hp, step)
        loss, extra = objective(rows)
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
        on_step(step, total, epoch + 1, losses[-1], **{k: round(v, 6) for k, v in extra.items()})
        if held_out and (step % hp.eval_every == 0 or step == total):
            evaluate()
        if step % checkpoint_every == 0 and step < total:
            save_checkpoint(step, snapshot())

    model.eval()
    files = _export(model, tokenizer, inp.weights)
    metrics = {
        "train_loss": losses[-1],
        "initial_loss": losses[0],
        "steps": total,
        "resumed_from_step": first_step,
        "rows": len(examples),
        "skipped_rows": len(skipped),
        "method": inp.method,
    }
    if evals:
        metrics.update({k: v for k, v in evals[-1].items() if k != "step"})
        metrics["validation_rows"] = len(held_out)
    return TrainResult(files, metrics, total, losses=losses)


def learning_rate(hp: Hyperparameters, step: int) -> float:
    """The rate of optimizer step `step` (from 0): a linear warmup over
    warmup_steps, then constant. A function of the step alone, so a resumed
    run needs no scheduler state."""
    if hp.warmup_steps and step < hp.warmup_steps:
        return hp.learning_rate * (step + 1) / hp.warmup_steps
    return hp.learning_rate


def _no_dropout(model) -> None:
    import torch

    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0


def _dpo_loss(model, reference, pairs, beta: float, pad_id: int, device):
    """DPO's sigmoid loss (Rafailov et al. 2023, as trl's loss_type "sigmoid"):
    -log σ(β · ((log π(chosen) − log π_ref(chosen)) − (log π(rejected) −
    log π_ref(rejected)))), log-probabilities summed over each completion's
    tokens, averaged over the pairs. The reference is the frozen copy when
    given, else the model with its LoRA adapters disabled (peft). Returns the
    loss and the batch's preference_margin (mean of β times that difference,
    trl's rewards/margins) and preference_accuracy (share of pairs whose
    chosen completion gains more than the rejected one, trl's
    rewards/accuracies)."""
    import torch
    import torch.nn.functional as F

    rows = [chosen for chosen, _ in pairs] + [rejected for _, rejected in pairs]
    ids, mask, labels = _collate(rows, pad_id, device)
    policy = _sequence_logps(model, ids, mask, labels)
    with torch.no_grad():
        if reference is not None:
            ref = _sequence_logps(reference, ids, mask, labels)
        else:
            with model.disable_adapter():
                ref = _sequence_logps(model, ids, mask, labels)
    n = len(pairs)
    chosen_reward = beta * (policy[:n] - ref[:n])
    rejected_reward = beta * (policy[n:] - ref[n:])
    margin = chosen_reward - rejected_reward
    loss = -F.logsigmoid(margin).mean()
    return loss, {"preference_margin": margin.mean().item(),
                  "preference_accuracy": (margin > 0).float().mean().item()}


def _sequence_logps(model, ids, mask, labels):
    """Each row's log-probability of its labelled tokens, summed."""
    import torch

    logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1]
    targets = labels[:, 1:]
    learned = targets != -100
    per_token = torch.gather(logits.log_softmax(-1), 2, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return (per_token * learned).sum(-1)


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


def tokenize(tokenizer, dataset: Dataset, max_len: int) -> tuple[list, list[tuple[int, int]]]:
    """The training examples, cut to max_len, and the rows skipped as (index,
    prompt tokens). An example is (input ids, labels), where -100 masks what
    is not learned: a prompt, and in a chat everything but the assistant
    turns; for preference rows it is a pair of them, (chosen, rejected),
    each its prompt and completion. A row with no label left within max_len
    is skipped: alone in a batch its loss would be 0/0, a NaN that poisons the
    weights (for a pair, either side having none)."""
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    if dataset.format == "chat" and not getattr(tokenizer, "chat_template", None):
        raise TrainingFailed("no_chat_template", (
            "line 1 of input.training_file holds chat messages, but this model's tokenizer has no chat template "
            "to render them with; upload prompt/completion rows instead"))

    def completion(prompt: str, text: str) -> tuple[list[int], list[int], int]:
        p = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        c = tokenizer(text, add_special_tokens=False)["input_ids"] + eos
        return p + c, [-100] * len(p) + c, len(p)

    out, skipped = [], []
    for index, row in enumerate(dataset.rows):
        if dataset.format == "text":
            ids = tokenizer(row["text"], add_special_tokens=False)["input_ids"] + eos
            pieces, prompt = [(ids, list(ids))], 0
        elif dataset.format == "chat":
            ids, labels, prompt = chat_example(tokenizer, row["messages"])
            pieces = [(ids, labels)]
        elif dataset.format == "preference":
            chosen, rejected = completion(row["prompt"], row["chosen"]), completion(row["prompt"], row["rejected"])
            pieces, prompt = [chosen[:2], rejected[:2]], chosen[2]
        else:
            ids, labels, prompt = completion(row["prompt"], row["completion"])
            pieces = [(ids, labels)]
        pieces = [(ids[:max_len], labels[:max_len]) for ids, labels in pieces]
        # The model predicts each token from those before it: the first one is never learned.
        if all(any(label != -100 for label in labels[1:]) for _, labels in pieces):
            out.append(tuple(pieces) if dataset.format == "preference" else pieces[0])
        else:
            skipped.append((index, prompt))
    return out, skipped


def chat_example(tokenizer, messages: list[dict]) -> tuple[list[int], list[int], int]:
    """A chat row as (input ids, labels, tokens before the first learned one):
    the conversation through the tokenizer's chat template, labels on the
    assistant turns (their content and what the template closes them with,
    such as an end-of-turn token) and -100 everywhere else, also on
    assistant turns of weight 0.

    Each assistant turn is found by rendering the conversation up to it with
    the assistant's turn opened (what a chat job's prompt is) and up to its
    end; the pieces between are tokenized one by one, so the tokens before
    each learned turn are those a chat job of that conversation would be
    given. A template that does not render a conversation as a prefix of its
    continuation cannot be split so, and fails by name."""
    turns = [{"role": m["role"], "content": m["content"]} for m in messages]

    def render(upto: int, opened: bool) -> str:
        return tokenizer.apply_chat_template(turns[:upto], add_generation_prompt=opened, tokenize=False)

    pieces: list[tuple[str, bool]] = []
    done = ""
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        before, through = render(i, True), render(i + 1, False)
        if not before.startswith(done) or not through.startswith(before):
            raise TrainingFailed("invalid_chat_template", (
                f"this model's chat template does not render a conversation as the start of its continuation "
                f"(at message {i}), so the assistant turns cannot be told apart for training on them alone"))
        pieces += [(before[len(done):], False), (through[len(before):], m.get("weight", 1) == 1)]
        done = through
    whole = render(len(turns), False)
    pieces.append((whole[len(done):] if whole.startswith(done) else "", False))
    ids: list[int] = []
    labels: list[int] = []
    for text, learned in pieces:
        piece = tokenizer(text, add_special_tokens=False)["input_ids"] if text else []
        ids += piece
        labels += piece if learned else [-100] * len(piece)
    prompt = next((i for i, label in enumerate(labels) if label != -100), len(labels))
    return ids, labels, prompt


def _skipped_notice(dataset: Dataset, skipped: list[tuple[int, int]], max_len: int) -> str:
    numbers = ", ".join(str(index + 1) for index, _ in skipped[:10]) + (", ..." if len(skipped) > 10 else "")
    why = ("they are a single token, nothing to predict" if dataset.format == "text" else
           f"no {_learned(dataset)} token fits within input.hyperparameters.max_seq_len={max_len} after the "
           f"{_context(dataset)}; raise max_seq_len or shorten those rows to train on them")
    return f"skipped {len(skipped)} of {len(dataset.rows)} rows (rows {numbers}, counting from 1): {why}"


def _nothing_to_learn(dataset: Dataset, skipped: list[tuple[int, int]], max_len: int) -> str:
    if dataset.format == "text":
        return f"none of the {len(dataset.rows)} rows has a token to learn: each is a single token"
    shortest = min(prompt for _, prompt in skipped)
    return (f"none of the {len(dataset.rows)} rows has a {_learned(dataset)} token within "
            f"input.hyperparameters.max_seq_len={max_len} (the shortest {_context(dataset)} {'are' if dataset.format == 'chat' else 'is'} {shortest} tokens); "
            f"raise max_seq_len or shorten the rows")


def _learned(dataset: Dataset) -> str:
    return {"chat": "assistant", "preference": "chosen and rejected"}.get(dataset.format, "completion")


def _context(dataset: Dataset) -> str:
    return "turns before the first assistant turn" if dataset.format == "chat" else "prompt"


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


def _export(model, tokenizer, weights: str) -> dict[str, bytes]:
    """The new version's files: the LoRA adapter, or the full model and tokenizer."""
    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        if weights == "full":
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


def preference_accuracy(model, tokenizer, dataset: Dataset, max_len: int = 128) -> float:
    """Share of a preference dataset's pairs whose chosen completion `model`
    finds more likely than the rejected one (summed log-probabilities, as the
    DPO loss counts them). For checks and benchmarks, one pair at a time."""
    import torch

    examples, _ = tokenize(tokenizer, dataset, max_len)
    wins = 0
    for chosen, rejected in examples:
        ids, mask, labels = _collate([chosen, rejected], tokenizer.pad_token_id, "cpu")
        with torch.no_grad():
            logps = _sequence_logps(model, ids, mask, labels)
        wins += bool(logps[0] > logps[1])
    return wins / len(examples)
