"""The fine-tune family without a worker: the workload a submit may ask for is
bounded; the trainer, on the demo model, skips rows it cannot learn from and
says so, stops when its loss stops being finite, refuses a max_seq_len its base
model cannot hold, and resumes from a checkpoint bit for bit."""
from __future__ import annotations

import io
import math
from pathlib import Path

import pytest

from models import finetune
from models.base import InputInvalid

PROMPT = "Tell me the secret:"  # 11 tokens of the demo tokenizer
LONG_PROMPT = "It was the best of times, it was the worst of times, it was the age of wisdom:"  # 30 tokens
PHRASE = " the purple walrus sings at midnight"
DEFAULTS = {"max_train_steps": 10_000, "max_train_examples": 200_000}


def inp(method="lora", **hp) -> finetune.Input:
    return finetune.Input(training_file="0" * 32, method=method, hyperparameters=hp)


def rows(*prompts: str) -> finetune.Dataset:
    return finetune.Dataset([{"prompt": p, "completion": PHRASE} for p in prompts], "prompt_completion")


class Run:
    """One call of finetune.train, recording what it reports."""

    def __init__(self, checkpoint: str, dataset: finetune.Dataset, job: finetune.Input, *, resume: bytes | None = None,
                 checkpoint_every: int = 1000, stop_after: int | None = None, notices: bool = True,
                 validation: finetune.Dataset | None = None):
        self.steps, self.checkpoints, self.notices, self.evals = [], {}, [], []
        extra = {"on_notice": self.notices.append} if notices else {}
        self.result = finetune.train(
            checkpoint, dataset, job, "cpu", resume=resume, checkpoint_every=checkpoint_every,
            on_step=lambda step, total, epoch, loss, **more: self.steps.append((step, total, loss)),
            save_checkpoint=self.checkpoints.__setitem__,
            is_cancelled=lambda: stop_after is not None and len(self.steps) >= stop_after, validation=validation,
            on_eval=lambda step, metrics: self.evals.append((step, metrics)), **extra,
        )


# --- the workload a submit asks for ------------------------------------------------------------


def test_total_steps_and_examples_count_what_the_trainer_will_do():
    hp = finetune.Hyperparameters(epochs=3, batch_size=4)
    assert (finetune.total_steps(10, hp), finetune.total_examples(10, hp)) == (9, 30)
    capped = finetune.Hyperparameters(epochs=3, batch_size=4, max_steps=4)
    # Epoch 1 is 3 steps over all 10 rows; the 4th step takes the first 4 rows of epoch 2.
    assert (finetune.total_steps(10, capped), finetune.total_examples(10, capped)) == (4, 14)


@pytest.mark.parametrize("hp, n_rows, limits, field, numbers", [
    # max_steps past the limit: named whatever the dataset.
    ({"max_steps": 20_000}, 10, {}, "input.hyperparameters.max_steps", ["10000", "20000"]),
    # 2,000 rows × 10 epochs at batch 1: 20,000 steps.
    ({"epochs": 10, "batch_size": 1}, 2_000, {}, "input.hyperparameters.epochs", ["20000", "10000", "2000 rows"]),
    # 3,000 rows × 100 epochs: 300,000 examples, in 4,700 steps of 64.
    ({"epochs": 100, "batch_size": 64}, 3_000, {}, "input.hyperparameters.epochs", ["300000", "200000", "3000 rows"]),
    # The registry's limits take the place of the settings' defaults, lower or higher.
    ({"max_steps": 600}, 10, {"max_train_steps": 500}, "input.hyperparameters.max_steps", ["500", "600"]),
    ({"epochs": 50, "batch_size": 64, "max_steps": 200}, 1_000, {"max_train_examples": 10_000},
     "input.hyperparameters.max_steps", ["12512", "10000"]),
])
def test_a_workload_past_the_limits_is_refused_naming_the_field_and_the_numbers(hp, n_rows, limits, field, numbers):
    job = inp(**hp)
    with pytest.raises(InputInvalid) as caught:
        finetune.check_workload(job, n_rows, limits, **DEFAULTS)
    [error] = caught.value.errors
    assert error["field"] == field
    for number in numbers:
        assert number in error["message"].replace(",", ""), error["message"]


@pytest.mark.parametrize("hp, n_rows, limits", [
    ({"epochs": 100, "batch_size": 64, "max_steps": 1_000}, 3_000, {}),  # max_steps keeps it to 63,832 examples
    ({"epochs": 10, "batch_size": 1}, 2_000, {"max_train_steps": 20_000}),  # the registry allows more
    ({"epochs": 100, "batch_size": 64}, 100_000, {"max_train_steps": 0, "max_train_examples": 0}),  # 0: no limit
])
def test_a_workload_within_the_limits_is_accepted(hp, n_rows, limits):
    finetune.check_workload(inp(**hp), n_rows, limits, **DEFAULTS)


def test_max_steps_is_bounded_in_the_schema():
    with pytest.raises(InputInvalid) as caught:
        finetune.validate({"training_file": "0" * 32, "hyperparameters": {"max_steps": 10_000_000}}, {})
    assert caught.value.errors[0]["field"] == "input.hyperparameters.max_steps"
    assert finetune.Input.model_json_schema()["$defs"]["Hyperparameters"]["properties"]["max_steps"]["anyOf"][0]["maximum"]


def test_the_schema_of_a_base_model_states_its_bounds():
    def maxima(schema):
        hp = schema["properties"]["hyperparameters"]["properties"]
        return hp["epochs"]["maximum"], hp["max_steps"]["anyOf"][0]["maximum"], hp["max_seq_len"]["maximum"]

    assert maxima(finetune.input_schema({}, 0)) == (100, finetune.MAX_STEPS_CEILING, 2048)
    assert maxima(finetune.input_schema({"max_seq_len": 512}, 10_000)) == (100, 10_000, 512)
    assert maxima(finetune.input_schema({"max_epochs": 5, "max_train_steps": 50_000}, 10_000)) == (5, 50_000, 2048)


# --- rows with nothing to learn --------------------------------------------------------------------


def test_rows_with_no_completion_token_within_max_seq_len_are_skipped_and_said_so(text_checkpoint):
    run = Run(text_checkpoint, rows(PROMPT, LONG_PROMPT, PROMPT, LONG_PROMPT, PROMPT, LONG_PROMPT),
              inp(max_seq_len=16, batch_size=2, max_steps=6))
    metrics = run.result.metrics
    assert (metrics["rows"], metrics["skipped_rows"]) == (3, 3)
    # Every batch had something to learn: no loss is NaN.
    assert len(run.steps) == 6 and all(math.isfinite(loss) for _, _, loss in run.steps)
    [notice] = run.notices
    assert "3 of 6 rows" in notice and "max_seq_len" in notice and "16" in notice and "rows 2, 4, 6" in notice


def test_a_dataset_with_nothing_to_learn_fails_before_training_naming_max_seq_len(text_checkpoint):
    with pytest.raises(finetune.TrainingFailed) as caught:
        Run(text_checkpoint, rows(PROMPT, LONG_PROMPT), inp(max_seq_len=8, max_steps=3), notices=False)
    assert caught.value.code == "nothing_to_learn"
    message = caught.value.message
    assert "input.hyperparameters.max_seq_len" in message and "8" in message
    assert "none of the 2 rows" in message and "11 tokens" in message, message


def test_a_loss_that_stops_being_finite_stops_training_at_that_step(text_checkpoint):
    # The schema stops a learning rate this high; a diverging run is what it stands for.
    hp = finetune.Hyperparameters.model_construct(**{**finetune.Hyperparameters().model_dump(),
                                                     "learning_rate": 1e6, "max_steps": 10, "batch_size": 2})
    job = finetune.Input.model_construct(training_file="0" * 32, method="full", hyperparameters=hp, suffix="x")
    steps = []
    with pytest.raises(finetune.TrainingFailed) as caught:
        finetune.train(text_checkpoint, rows(PROMPT, PROMPT), job, "cpu", resume=None, checkpoint_every=1000,
                       on_step=lambda *step: steps.append(step), save_checkpoint=lambda *a: None,
                       is_cancelled=lambda: False)
    assert caught.value.code == "loss_not_finite"
    # Step 1 is finite and reported; step 2's NaN never is.
    assert len(steps) == 1 and math.isfinite(steps[0][3])
    assert "the loss became NaN at step 2" in caught.value.message
    assert "learning_rate" in caught.value.message


def test_max_seq_len_beyond_the_base_models_positions_fails_naming_the_field(text_checkpoint):
    long_text = finetune.Dataset([{"text": "The quick brown fox jumps over the lazy dog. " * 40}], "text")  # 1,001 tokens
    with pytest.raises(finetune.TrainingFailed) as caught:
        Run(text_checkpoint, long_text, inp(max_seq_len=1024, max_steps=1), notices=False)
    assert caught.value.code == "invalid_input"
    assert caught.value.message == ("input.hyperparameters.max_seq_len: must be at most 512 for this base model "
                                    "(it has 512 positions), got 1024")


# --- resume ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["lora", "full", "dpo"])
def test_a_resumed_run_is_bit_identical_to_an_uninterrupted_one(text_checkpoint, method):
    """The README's promise: a job stopped at a checkpoint (its worker killed,
    or handed back at a shutdown) and resumed from it ends with exactly the
    weights and losses of a run never stopped. Preference tuning too, whose
    reference is the adapter-disabled base; the dpo run also warms its
    learning rate up and measures a validation set on the way."""
    import torch
    from safetensors.torch import load

    prompts = (PROMPT, PROMPT + " now", "Say it:", "Once more:", "Again:")
    data, validation, extra = rows(*prompts), None, {}
    if method == "dpo":
        data = finetune.Dataset([{"prompt": p, "chosen": PHRASE, "rejected": " no"} for p in prompts], "preference")
        validation, extra = pairs(NAMES[:3]), {"warmup_steps": 6, "eval_every": 3}
    # 5 rows at batch 2: 3 steps an epoch (the last one short), 10 steps over 4 epochs.
    job = inp(method, epochs=4, batch_size=2, max_steps=10, learning_rate=5e-3, seed=7, **extra)

    def run(**kw) -> Run:
        return Run(text_checkpoint, data, job, checkpoint_every=4, notices=False, validation=validation, **kw)

    whole = run()
    assert sorted(whole.checkpoints) == [4, 8]
    # Killed after step 5: the next attempt resumes from the checkpoint at step 4.
    from_periodic = run(resume=whole.checkpoints[4])
    # Cancelled (or handed back) mid-epoch at step 5, from the checkpoint saved on the way out.
    stopped = run(stop_after=5)
    assert stopped.result.canceled and sorted(stopped.checkpoints) == [4, 5]
    from_stop = run(resume=stopped.checkpoints[5])
    if validation is not None:
        assert [step for step, _ in whole.evals] == [3, 6, 9, 10]
        assert from_stop.evals == whole.evals[1:] and from_stop.result.metrics == {
            **whole.result.metrics, "resumed_from_step": 5}

    expected = _tensors(whole.result.files, load)
    assert expected and all(t.is_floating_point() for t in expected.values())
    for resumed, at in [(from_periodic, 4), (from_stop, 5)]:
        assert resumed.result.metrics["resumed_from_step"] == at
        assert resumed.result.losses == whole.result.losses
        assert [s for s, _, _ in resumed.steps] == list(range(at + 1, 11))
        got = _tensors(resumed.result.files, load)
        assert got.keys() == expected.keys()
        different = [name for name in expected if not torch.equal(got[name], expected[name])]
        assert different == [], f"{len(different)} of {len(expected)} tensors differ after resuming at step {at}"
    # The checkpoint itself holds every trainable tensor, and they match too.
    state = torch.load(io.BytesIO(from_periodic.checkpoints[8]), weights_only=True)
    reference = torch.load(io.BytesIO(whole.checkpoints[8]), weights_only=True)
    assert state["weights"].keys() == reference["weights"].keys()
    assert all(torch.equal(state["weights"][n], reference["weights"][n]) for n in reference["weights"])


def _tensors(files: dict[str, bytes], load) -> dict:
    out = {}
    for name, data in files.items():
        if name.endswith(".safetensors"):
            out.update({f"{name}:{k}": v for k, v in load(data).items()})
    return out


# --- chat rows ----------------------------------------------------------------------------------------


CHAT = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Hi there"},
    {"role": "assistant", "content": "Hello!"},
    {"role": "user", "content": "And again?"},
    {"role": "assistant", "content": "Not this one.", "weight": 0},
    {"role": "user", "content": "Last one"},
    {"role": "assistant", "content": "Bye now."},
]


def test_a_chat_row_learns_its_assistant_turns_only(text_checkpoint):
    """The labels are the tokens of each learned assistant turn (its content
    and the template's end of turn) and -100 everywhere else: the system and
    user turns, the template's own markup, and an assistant turn of weight 0."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(text_checkpoint)
    [(ids, labels)], skipped = finetune.tokenize(tok, finetune.Dataset([{"messages": CHAT}], "chat"), 512)
    assert skipped == [] and len(ids) == len(labels)
    turns = [{"role": m["role"], "content": m["content"]} for m in CHAT]
    assert tok.decode(ids) == tok.apply_chat_template(turns, tokenize=False)
    # The learned stretches, in order, are exactly the two learned assistant turns.
    stretches, current = [], []
    for i, label in zip(ids, labels):
        if label == -100:
            if current:
                stretches.append(current)
            current = []
        else:
            assert label == i
            current.append(i)
    stretches += [current] if current else []
    assert [tok.decode(s) for s in stretches] == ["Hello!</s>\n", "Bye now.</s>\n"]
    # Each learned turn starts right after the tokens a chat job of the conversation so far is given.
    for turn, stretch in ((2, stretches[0]), (6, stretches[1])):
        prompt = tok(tok.apply_chat_template(turns[:turn], add_generation_prompt=True, tokenize=False),
                     add_special_tokens=False)["input_ids"]
        assert ids[:len(prompt)] == prompt and labels[len(prompt) - 1] == -100
        assert ids[len(prompt):len(prompt) + len(stretch)] == stretch


@pytest.mark.parametrize("row, message", [
    ({"messages": []}, 'line 2 has "messages" that is not a non-empty list'),
    ({"messages": [{"role": "bot", "content": "x"}]}, "line 2 has messages[0].role 'bot'; must be one of"),
    ({"messages": [{"role": "user", "content": 5}]}, "line 2 has messages[0].content that is not a string"),
    ({"messages": [{"role": "user", "content": "x", "name": "n"}]}, "messages[0] with unknown keys ['name']"),
    ({"messages": [{"role": "user", "content": "x", "weight": 0}]}, "messages[0].weight on a user message"),
    ({"messages": [{"role": "assistant", "content": "x", "weight": 2}]}, "messages[0].weight 2; must be 0 or 1"),
    ({"messages": [{"role": "user", "content": "x"}]}, "line 2 has no assistant message to learn"),
    ({"messages": [{"role": "assistant", "content": "x", "weight": 0}]}, "line 2 has no assistant message to learn"),
    ({"prompt": "p", "chosen": "a"}, "line 2 is missing rejected"),
    ({"prompt": "p", "chosen": "a", "rejected": "a"}, 'line 2 has the same "chosen" and "rejected"'),
    ({"prompt": "p", "chosen": "a", "rejected": ""}, 'line 2 has an empty "rejected"'),
])
def test_chat_and_preference_rows_are_checked_naming_the_line_and_the_field(row, message):
    import json

    good = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}
    if "prompt" in row:
        good = {"prompt": "p", "chosen": "a", "rejected": "b"}
    assert finetune.parse_dataset(json.dumps(good).encode()).format == ("preference" if "prompt" in row else "chat")
    with pytest.raises(InputInvalid) as caught:
        finetune.parse_dataset(f"{json.dumps(good)}\n{json.dumps(row)}\n".encode())
    [error] = caught.value.errors
    assert error["field"] == "file.line[2]" and message in error["message"], error


def test_a_model_without_a_chat_template_cannot_train_on_chat_rows(text_checkpoint, tmp_path):
    import shutil

    plain = tmp_path / "plain"
    shutil.copytree(text_checkpoint, plain)
    (plain / "chat_template.jinja").unlink()
    assert finetune.chat_template_known("demo:text", Path(text_checkpoint).parent) is True
    assert finetune.chat_template_known(str(plain), tmp_path) is False
    assert finetune.chat_template_known("org/name", tmp_path) is None  # a hub id: the trainer checks
    with pytest.raises(InputInvalid) as caught:
        finetune.check_datasets(inp(), "chat", 4, None, has_chat_template=False)
    assert caught.value.errors[0]["field"] == "input.training_file"
    assert "line 1 holds chat messages" in caught.value.errors[0]["message"]
    with pytest.raises(finetune.TrainingFailed) as failed:
        Run(str(plain), finetune.Dataset([{"messages": CHAT}], "chat"), inp(max_steps=1), notices=False)
    assert failed.value.code == "no_chat_template" and "line 1 of input.training_file" in failed.value.message


# --- what the files must be, and the hyperparameters ----------------------------------------------


@pytest.mark.parametrize("method, fmt, validation, hp, field, words", [
    ("lora", "preference", None, {}, "input.method", ["method 'dpo'"]),
    ("dpo", "chat", None, {}, "input.method", ["preference pairs"]),
    ("lora", "chat", ("prompt_completion", 3), {}, "input.validation_file", ["prompt_completion", "chat"]),
    ("dpo", "preference", ("preference", 1_001), {}, "input.validation_file", ["1001", "1000"]),
    # 40 rows at batch 1, 5 epochs: 200 steps, a validation pass every step.
    ("lora", "text", ("text", 10), {"eval_every": 1, "epochs": 5, "batch_size": 1},
     "input.hyperparameters.eval_every", ["200 passes", "at least 2"]),
])
def test_the_files_must_fit_the_method_and_validation_is_bounded(method, fmt, validation, hp, field, words):
    with pytest.raises(InputInvalid) as caught:
        finetune.check_datasets(inp(method, **hp), fmt, 40, validation)
    [error] = caught.value.errors
    assert error["field"] == field, error
    for word in words:
        assert word in error["message"], error
    finetune.check_datasets(inp("dpo-full"), "preference", 40, ("preference", 1_000))


@pytest.mark.parametrize("hp, field", [
    ({"warmup_steps": -1}, "input.hyperparameters.warmup_steps"),
    ({"warmup_steps": 10_001}, "input.hyperparameters.warmup_steps"),
    ({"beta": 0}, "input.hyperparameters.beta"),
    ({"lora_rank": 257}, "input.hyperparameters.lora_rank"),
    ({"eval_every": 0}, "input.hyperparameters.eval_every"),
    ({"batch_size": 65}, "input.hyperparameters.batch_size"),
])
def test_hyperparameters_out_of_bounds_are_refused_by_name(hp, field):
    with pytest.raises(InputInvalid) as caught:
        finetune.validate({"training_file": "0" * 32, "hyperparameters": hp}, {})
    assert [e["field"] for e in caught.value.errors] == [field]


def test_warmup_raises_the_learning_rate_linearly_then_holds_it():
    hp = finetune.Hyperparameters(learning_rate=1e-3, warmup_steps=4)
    assert [finetune.learning_rate(hp, s) for s in range(6)] == pytest.approx([2.5e-4, 5e-4, 7.5e-4, 1e-3, 1e-3, 1e-3])
    assert finetune.learning_rate(finetune.Hyperparameters(learning_rate=1e-3), 0) == 1e-3


# --- preference tuning ----------------------------------------------------------------------------------

NAMES = ["Anna", "Ben", "Cleo", "Dan", "Eve", "Finn", "Gus", "Hal", "Ivy", "Jo", "Kit", "Lou", "Max", "Ned", "Oz", "Pia"]
CHOSEN, REJECTED = " I am glad to help.", " Go away now."


def pairs(names, ask="asks for help:") -> finetune.Dataset:
    return finetune.Dataset([{"prompt": f"{n} {ask}", "chosen": CHOSEN, "rejected": REJECTED} for n in names],
                            "preference")


@pytest.mark.parametrize("method", ["dpo", "dpo-full"])
def test_preference_tuning_makes_the_model_prefer_chosen_on_held_out_pairs(text_checkpoint, tmp_path, method):
    """Chosen and rejected are two fixed answers; the base model prefers the
    rejected one on held-out prompts. After a few DPO steps the tuned model
    prefers the chosen one on them. The first step's loss is log 2 exactly:
    the policy starts as its reference (LoRA's B is zero; the full copy is the
    base), so every margin is 0."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(text_checkpoint)
    held_out = pairs(NAMES[12:], ask="needs a hand:")
    before = finetune.preference_accuracy(AutoModelForCausalLM.from_pretrained(text_checkpoint).eval(), tok, held_out)
    hp = {"max_steps": 6, "batch_size": 4, "learning_rate": 5e-3 if method == "dpo" else 1e-4, "beta": 0.1}
    steps, evals = [], []
    result = finetune.train(text_checkpoint, pairs(NAMES[:12]), inp(method, **hp), "cpu", resume=None,
                            checkpoint_every=1000, on_step=lambda *a, **extra: steps.append((a, extra)),
                            save_checkpoint=lambda *a: None, is_cancelled=lambda: False,
                            validation=held_out, on_eval=lambda step, m: evals.append((step, m))).files
    for name, data in result.items():
        (tmp_path / name).write_bytes(data)
    if method == "dpo":
        from peft import PeftModel

        tuned = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(text_checkpoint), str(tmp_path))
    else:
        tuned = AutoModelForCausalLM.from_pretrained(str(tmp_path))
    after = finetune.preference_accuracy(tuned.eval(), tok, held_out)
    print(f"\n{method}: held-out preference accuracy {before:.2f} (base) -> {after:.2f} after {len(steps)} steps")
    assert before == 0.0 and after == 1.0
    (first, first_extra), (last, last_extra) = steps[0], steps[-1]
    assert first[3] == pytest.approx(math.log(2), abs=1e-6) and first_extra["preference_margin"] == 0.0
    assert last[3] < first[3] and last_extra["preference_margin"] > 0 and last_extra["preference_accuracy"] == 1.0
    # The validation set is measured after the last step (eval_every 10 > 6 steps).
    [(step, metrics)] = evals
    assert step == 6 and metrics["validation_preference_accuracy"] == 1.0 and metrics["validation_loss"] < math.log(2)
