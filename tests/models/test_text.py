"""Tests of the text-generation family: validation, determinism, batch invariance, stops, cancellation, progress."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from models import text
from models.base import InputInvalid

ROOT = Path(__file__).resolve().parents[2]
LIMITS = {"max_new_tokens": 64, "max_prompt_chars": 100}

# Different prompt lengths (so different left padding) and different settings in every row.
MIXED = [
    text.Input(prompt="Once upon a time", max_new_tokens=24, temperature=0.8, top_p=0.9, seed=1),
    text.Input(
        prompt="The weather today is sunny with a light breeze from the west and",
        max_new_tokens=40,
        temperature=1.3,
        top_k=20,
        repetition_penalty=1.3,
        seed=2,
    ),
    text.Input(prompt="A", max_new_tokens=8, temperature=0, seed=3),
    text.Input(prompt="Call me Ishmael. Some years ago", max_new_tokens=33, top_p=0.5, repetition_penalty=0.8, seed=2**32 - 1),
]


def never(row: int) -> bool:
    return False


def ignore(row: int, current: int, total: int) -> None:
    pass


def run_one(model, inp):
    return model.run([inp], ignore, never)[0].output


@pytest.mark.parametrize(
    "raw, field",
    [
        ({"prompt": "hi", "colour": "red"}, "input.colour"),
        ({"prompt": "hi", "max_new_tokens": "5"}, "input.max_new_tokens"),
        ({"prompt": "hi", "max_new_tokens": 65}, "input.max_new_tokens"),
        ({"prompt": "hi", "max_new_tokens": 0}, "input.max_new_tokens"),
        ({"prompt": "x" * 101}, "input.prompt"),
        ({}, "input.prompt"),
        ({"prompt": ""}, "input.prompt"),
        ({"prompt": 5}, "input.prompt"),
        ({"prompt": "hi", "temperature": -0.1}, "input.temperature"),
        ({"prompt": "hi", "top_p": 0}, "input.top_p"),
        ({"prompt": "hi", "top_p": 1.5}, "input.top_p"),
        ({"prompt": "hi", "top_k": -1}, "input.top_k"),
        ({"prompt": "hi", "repetition_penalty": 0}, "input.repetition_penalty"),
        ({"prompt": "hi", "stop": ["a", ""]}, "input.stop.1"),
        ({"prompt": "hi", "stop": ["a", "b", "c", "d", "e"]}, "input.stop"),
        ({"prompt": "hi", "stop": "a"}, "input.stop"),
        ({"prompt": "hi", "seed": 2**32}, "input.seed"),
        ({"prompt": "hi", "seed": True}, "input.seed"),
    ],
)
def test_invalid_input_names_the_field(raw, field):
    with pytest.raises(InputInvalid) as exc:
        text.validate(raw, LIMITS)
    assert [e["field"] for e in exc.value.errors] == [field], exc.value.errors


def test_error_messages_say_what_was_wrong():
    with pytest.raises(InputInvalid) as exc:
        text.validate({"prompt": "hi", "colour": "red"}, LIMITS)
    assert exc.value.errors == [{"field": "input.colour", "message": "is not a known field"}]
    with pytest.raises(InputInvalid) as exc:
        text.validate({"prompt": "x" * 101, "max_new_tokens": 65}, LIMITS)
    assert exc.value.errors == [
        {"field": "input.max_new_tokens", "message": "must be at most 64 for this model, got 65"},
        {"field": "input.prompt", "message": "must be at most 100 characters for this model, got 101"},
    ]
    with pytest.raises(InputInvalid) as exc:
        text.validate(["not", "an", "object"], LIMITS)
    assert exc.value.errors[0]["field"] == "input"


def test_valid_input_and_defaults():
    # JSON has no float type of its own: an integer temperature is fine.
    inp = text.validate({"prompt": "hi", "temperature": 0, "stop": ["\n"], "seed": 2**32 - 1}, LIMITS)
    assert inp.temperature == 0.0 and inp.stop == ["\n"] and inp.seed == 2**32 - 1
    inp = text.validate({"prompt": "hi"}, {})
    assert (inp.max_new_tokens, inp.temperature, inp.top_p, inp.top_k, inp.repetition_penalty, inp.stop, inp.seed) == (
        32, 1.0, 1.0, 0, 1.0, [], None
    )
    assert text.batch_key(MIXED[0]) == text.batch_key(MIXED[1])


def test_messages_instead_of_a_prompt():
    inp = text.validate({"messages": [{"role": "user", "content": "hi"}], "max_new_tokens": 4}, LIMITS)
    assert inp.prompt is None and inp.messages[0].content == "hi"
    # Stored as given: the dump validates again, and a prompt's has no messages.
    assert "prompt" not in inp.model_dump(mode="json")
    assert text.validate(inp.model_dump(mode="json"), LIMITS) == inp
    assert "messages" not in text.validate({"prompt": "hi"}, LIMITS).model_dump(mode="json")
    for raw, field in (({"prompt": "a", "messages": [{"role": "user", "content": "b"}]}, "input.messages"),
                       ({"messages": []}, "input.messages"),
                       ({"prompt": None}, "input.prompt"),
                       ({"messages": [{"role": "robot", "content": "b"}]}, "input.messages.0.role"),
                       ({"messages": [{"role": "user", "content": "x" * 101}]}, "input.messages")):
        with pytest.raises(InputInvalid) as err:
            text.validate(raw, LIMITS)
        assert err.value.errors[0]["field"] == field, raw


def test_schema_documents_every_field():
    schema = text.Input.model_json_schema()
    json.dumps(schema)
    # A prompt or chat messages: exactly one is required.
    assert "required" not in schema and schema["oneOf"] == [{"required": ["prompt"]}, {"required": ["messages"]}]
    assert schema["additionalProperties"] is False
    for name, prop in schema["properties"].items():
        assert prop.get("description"), name


def test_family_modules_do_not_import_torch():
    code = (
        "import sys, models.text, models.image, models.registry, models.demo\n"
        "print(sorted(m for m in ('torch', 'transformers', 'diffusers', 'tokenizers', 'PIL') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_output_shape(text_model):
    out = run_one(text_model, MIXED[0])
    assert set(out) == {"text", "tokens", "prompt_tokens", "finish_reason"}
    assert isinstance(out["text"], str) and out["finish_reason"] in ("length", "stop")
    assert 1 <= out["tokens"] <= MIXED[0].max_new_tokens
    assert out["prompt_tokens"] == len(text_model.tokenizer(MIXED[0].prompt)["input_ids"])


def test_chat_messages_through_the_template(text_model):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Once upon a time"}]
    inp = text.validate({"messages": messages, "max_new_tokens": 4, "seed": 1}, {})
    rendered = "<s>system\nBe brief.</s>\n<s>user\nOnce upon a time</s>\n<s>assistant\n"
    out = run_one(text_model, inp)
    assert out["prompt_tokens"] == len(text_model.tokenizer(rendered, add_special_tokens=False)["input_ids"])
    # The same rendering given as a prompt gives the same tokens.
    assert out["text"] == run_one(text_model, text.validate({"prompt": rendered, "max_new_tokens": 4, "seed": 1}, {}))["text"]


def test_chat_messages_without_a_template_are_refused(text_model, monkeypatch):
    monkeypatch.setattr(text_model.tokenizer, "chat_template", None)
    inp = text.validate({"messages": [{"role": "user", "content": "hi"}]}, {})
    with pytest.raises(text.NoChatTemplate) as err:
        text_model.sequence(0, inp)
    assert err.value.code == "no_chat_template" and err.value.errors[0]["field"] == "input.messages"


def test_same_input_same_output(text_model):
    assert run_one(text_model, MIXED[0]) == run_one(text_model, MIXED[0])
    assert text_model.run(MIXED, ignore, never) == text_model.run(MIXED, ignore, never)


def test_seed_changes_the_sample(text_model):
    outs = {run_one(text_model, MIXED[1].model_copy(update={"seed": s}))["text"] for s in range(3)}
    assert len(outs) == 3


def test_job_alone_equals_job_in_mixed_batch(text_model):
    """The core property: batch-mates (other lengths, other settings) never change a job's output."""
    alone = [run_one(text_model, inp) for inp in MIXED]
    batched = [r.output for r in text_model.run(MIXED, ignore, never)]
    assert batched == alone
    reordered = [r.output for r in text_model.run(MIXED[::-1] + [MIXED[0]], ignore, never)]
    assert reordered == alone[::-1] + [alone[0]]


def test_greedy_ignores_the_seed(text_model):
    a = MIXED[2].model_copy(update={"seed": 1})
    b = MIXED[2].model_copy(update={"seed": 99})
    assert run_one(text_model, a) == run_one(text_model, b)


def _stop_string_in(text_out: str) -> tuple[str, int]:
    """A short ASCII piece of `text_out` (first occurring at index >= 3) to use as a stop string."""
    for i in range(3, len(text_out) - 1):
        piece = text_out[i : i + 2]
        if piece.isascii() and piece.isalnum() and text_out.find(piece) == i:
            return piece, i
    raise AssertionError(f"no usable stop string in {text_out!r}")


def test_stop_string_cuts_before_it(text_model):
    base = text.Input(prompt="Once upon a time", max_new_tokens=48, temperature=0.7, seed=11)
    full = run_one(text_model, base)
    stop, at = _stop_string_in(full["text"])
    out = run_one(text_model, base.model_copy(update={"stop": ["never appears \x00", stop]}))
    assert out["text"] == full["text"][:at]
    assert out["finish_reason"] == "stop"
    assert out["tokens"] < full["tokens"]


def test_per_row_stops_and_lengths_in_one_batch(text_model):
    base = text.Input(prompt="Once upon a time", max_new_tokens=48, temperature=0.7, seed=11)
    stop, at = _stop_string_in(run_one(text_model, base)["text"])
    rows = [
        base.model_copy(update={"stop": [stop]}),  # ends at its stop string
        text.Input(prompt="The capital of France", max_new_tokens=3, temperature=0.7, seed=5),
        text.Input(prompt="The capital of France", max_new_tokens=17, temperature=0.7, seed=5),
        base,  # same prompt and seed as row 0, no stop: runs to its length
    ]
    out = [r.output for r in text_model.run(rows, ignore, never)]
    assert out[0]["finish_reason"] == "stop" and len(out[0]["text"]) == at
    assert (out[1]["tokens"], out[1]["finish_reason"]) == (3, "length")
    assert (out[2]["tokens"], out[2]["finish_reason"]) == (17, "length")
    # Same seed: the 3-token row is the start of the 17-token one.
    assert out[2]["text"].startswith(out[1]["text"])
    assert (out[3]["tokens"], out[3]["finish_reason"]) == (48, "length")
    assert out == [run_one(text_model, inp) for inp in rows]


def test_cancelled_row_returns_none_while_batch_mates_complete(text_model, progress):
    # Row 1 is cancelled once it has made 3 tokens.
    def is_cancelled(row: int) -> bool:
        return row == 1 and bool(progress.calls.get(1)) and progress.calls[1][-1][0] >= 3

    out = text_model.run(MIXED, progress, is_cancelled)
    assert out[1] is None
    assert max(c for c, _ in progress.calls[1]) == 3
    for i in (0, 2, 3):
        assert out[i].output == run_one(text_model, MIXED[i])


def test_rows_cancelled_before_the_start(text_model):
    out = text_model.run(MIXED[:2], ignore, lambda row: row == 0)
    assert out[0] is None and out[1].output == run_one(text_model, MIXED[1])
    assert text_model.run(MIXED[:2], ignore, lambda row: True) == [None, None]


def test_progress_rises_to_each_rows_count(text_model, progress):
    rows = [MIXED[2], MIXED[0]]
    out = text_model.run(rows, progress, never)
    for r, inp in enumerate(rows):
        calls = progress.calls[r]
        currents = [c for c, _ in calls]
        assert currents == list(range(1, len(currents) + 1))
        assert {t for _, t in calls} == {inp.max_new_tokens}
        assert currents[-1] == out[r].output["tokens"]


def test_prompt_longer_than_the_model_keeps_its_end(text_model):
    # Far over the demo model's 512 positions: the row still runs instead of failing the batch.
    long = text.Input(prompt="the quick brown fox " * 200, max_new_tokens=8, temperature=0, seed=0)
    out = text_model.run([long, MIXED[2]], ignore, never)
    assert out[0].output["tokens"] == 8
    assert out[1].output == run_one(text_model, MIXED[2])


def test_loaded_model_reports_its_size(text_model):
    params = sum(p.numel() for p in text_model.model.parameters())
    assert 2_000_000 < params < 5_000_000
    assert text_model.nbytes >= params * 4


def test_int8_needs_bitsandbytes_and_cuda(text_checkpoint):
    with pytest.raises(ValueError, match="int8.*bitsandbytes.*CUDA"):
        text.load(text_checkpoint, "cpu", "int8")


def test_tiny_temperature_is_greedy(text_model):
    greedy = run_one(text_model, MIXED[2])
    assert run_one(text_model, MIXED[2].model_copy(update={"temperature": 1e-45})) == greedy


def test_shipped_registry_limits_apply():
    from models.registry import Registry

    spec = Registry.load(ROOT / "models" / "registry.yaml")["demo-text"]
    assert spec.module is text
    assert spec.validate({"prompt": "hi", "max_new_tokens": 256}).max_new_tokens == 256
    with pytest.raises(InputInvalid) as exc:
        spec.validate({"prompt": "hi", "max_new_tokens": 257})
    assert exc.value.errors[0]["field"] == "input.max_new_tokens"
    # The published schema carries the registry's limits as bounds.
    schema = spec.input_schema()
    assert schema["properties"]["max_new_tokens"]["maximum"] == 256
    assert schema["properties"]["prompt"]["maxLength"] == 2000
    assert text.Input.model_json_schema()["properties"]["max_new_tokens"].get("maximum") is None


def _draws(rows, logits, steps):
    """Tokens each row picks over `steps` picks of one RowSampling (one generator per row, advancing)."""
    import random

    from models.text_engine import RowSampling

    settings = [text.row_settings(inp) for inp in rows]
    sampling = RowSampling(settings, "cpu")
    generators = [random.Random(s.seed) for s in settings]
    picks = [sampling.pick(logits.clone(), generators).tolist() for _ in range(steps)]
    return [[p[r] for p in picks] for r in range(len(rows))]


def test_sampler_follows_each_rows_settings():
    """Synthetic logits with known probabilities: every row keeps to its own top-k,
    top-p and temperature while sharing one call, and samples in proportion."""
    import torch

    probs = torch.tensor([0.5, 0.3, 0.15, 0.05] + [0.0] * 4)
    logits = torch.log(probs).expand(5, -1).contiguous()
    rows = [
        text.Input(prompt="x", seed=1),  # plain sampling over the 4 live tokens
        text.Input(prompt="x", seed=2, top_k=2),  # only tokens 0 and 1
        text.Input(prompt="x", seed=3, top_p=0.75),  # 0.5 < 0.75, 0.8 >= 0.75: tokens 0 and 1
        text.Input(prompt="x", seed=4, temperature=0),  # greedy: token 0
        text.Input(prompt="x", seed=5, top_k=1),  # top-1 is greedy too
    ]
    n = 2000
    plain, k2, p75, greedy, k1 = _draws(rows, logits, n)
    counts = [plain.count(t) / n for t in range(8)]
    assert all(abs(c - p) < 0.04 for c, p in zip(counts, probs.tolist())), counts
    assert set(k2) == {0, 1} and abs(k2.count(0) / n - 0.5 / 0.8) < 0.04
    assert set(p75) == {0, 1} and abs(p75.count(0) / n - 0.5 / 0.8) < 0.04
    assert set(greedy) == {0} and set(k1) == {0}


def test_sampler_rows_alone_equal_rows_together():
    """The same draws for a row whether it is sampled alone or beside others (bit-for-bit picks)."""
    import torch

    torch.manual_seed(0)
    logits = torch.randn(4, 400) * 3
    rows = [text.Input(prompt="x", seed=s, top_k=k, top_p=p, temperature=t)
            for s, k, p, t in [(1, 0, 1.0, 1.0), (2, 50, 0.9, 0.7), (3, 0, 0.3, 1.5), (4, 5, 1.0, 2.0)]]
    together = _draws(rows, logits, 50)
    alone = [_draws([row], logits[r:r + 1], 50)[0] for r, row in enumerate(rows)]
    assert together == alone


def test_temperature_sharpens_the_distribution():
    import torch

    logits = torch.log(torch.tensor([0.6, 0.4]))[None, :].expand(2, -1).contiguous()
    cold, hot = _draws([text.Input(prompt="x", seed=1, temperature=0.25), text.Input(prompt="x", seed=1, temperature=4.0)],
                       logits, 1000)
    # p0 ∝ 0.6^(1/T): 0.835 at T=0.25, 0.525 at T=4.
    assert abs(cold.count(0) / 1000 - 0.835) < 0.04 and abs(hot.count(0) / 1000 - 0.525) < 0.04


def test_repetition_penalty_only_touches_the_rows_own_tokens():
    """Greedy rows over the same logits: a strong penalty on the tokens a row has seen
    moves it off them; a row that has not seen them, or has no penalty, is unmoved."""
    import random

    import torch

    from models.text_engine import pick_tokens, seen_mask

    logits = torch.tensor([[3.0, 2.0, 1.0, -1.0]]).expand(4, -1).contiguous()
    rows = [text.Input(prompt="x", temperature=0, repetition_penalty=p) for p in (10.0, 10.0, 1.0, 0.1)]
    seen = seen_mask([[0], [3], [0, 1], [3]], vocab=4)
    picks = pick_tokens(logits, [text.row_settings(r) for r in rows], [random.Random(0) for _ in rows], seen)
    # Row 0 has seen token 0 (3.0 -> 0.3): token 1 wins. Row 1 penalised token 3 only.
    # Row 2 has no penalty. Row 3's bonus (<1) on a negative logit: -1 * 0.1 = -0.1, still last.
    assert picks.tolist() == [1, 0, 0, 0]
    bonus = pick_tokens(logits[:1], [text.row_settings(rows[3])], [random.Random(0)], seen_mask([[2]], vocab=4))
    assert bonus.tolist() == [2]  # 1.0 / 0.1 = 10 beats 3.0
