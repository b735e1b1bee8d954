"""The fine-tune family without a worker: the workload a submit may ask for is
bounded; the trainer, on the demo model, skips rows it cannot learn from and
says so, stops when its loss stops being finite, refuses a max_seq_len its base
model cannot hold, and resumes from a checkpoint bit for bit."""
from __future__ import annotations

import io
import math

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
                 checkpoint_every: int = 1000, stop_after: int | None = None, notices: bool = True):
        self.steps, self.checkpoints, self.notices = [], {}, []
        extra = {"on_notice": self.notices.append} if notices else {}
        self.result = finetune.train(
            checkpoint, dataset, job, "cpu", resume=resume, checkpoint_every=checkpoint_every,
            on_step=lambda step, total, epoch, loss: self.steps.append((step, total, loss)),
            save_checkpoint=self.checkpoints.__setitem__,
            is_cancelled=lambda: stop_after is not None and len(self.steps) >= stop_after, **extra,
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


@pytest.mark.parametrize("method", ["lora", "full"])
def test_a_resumed_run_is_bit_identical_to_an_uninterrupted_one(text_checkpoint, method):
    """The README's promise: a job stopped at a checkpoint (its worker killed,
    or handed back at a shutdown) and resumed from it ends with exactly the
    weights and losses of a run never stopped."""
    import torch
    from safetensors.torch import load

    data = rows(PROMPT, PROMPT + " now", "Say it:", "Once more:", "Again:")
    # 5 rows at batch 2: 3 steps an epoch (the last one short), 10 steps over 4 epochs.
    job = inp(method, epochs=4, batch_size=2, max_steps=10, learning_rate=5e-3, seed=7)
    whole = Run(text_checkpoint, data, job, checkpoint_every=4, notices=False)
    assert sorted(whole.checkpoints) == [4, 8]
    # Killed after step 5: the next attempt resumes from the checkpoint at step 4.
    from_periodic = Run(text_checkpoint, data, job, resume=whole.checkpoints[4], checkpoint_every=4, notices=False)
    # Cancelled (or handed back) mid-epoch at step 5, from the checkpoint saved on the way out.
    stopped = Run(text_checkpoint, data, job, checkpoint_every=4, stop_after=5, notices=False)
    assert stopped.result.canceled and sorted(stopped.checkpoints) == [4, 5]
    from_stop = Run(text_checkpoint, data, job, resume=stopped.checkpoints[5], checkpoint_every=4, notices=False)

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
