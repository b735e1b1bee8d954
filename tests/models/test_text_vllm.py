"""The vLLM engine adapter (models/text_vllm.py) on the demo GPT-2, through vLLM's real engine.

Opt-in: vLLM lives in its own virtualenv (`make test-vllm`); elsewhere this module is skipped.
"""
from __future__ import annotations

import os
import random

import pytest

# In-process engine core (as models/text_vllm.load sets), before vllm reads its environment.
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
pytest.importorskip("vllm", reason="vllm is not installed in this environment; `make test-vllm` runs these tests in .venv-vllm")

from models import text_vllm  # noqa: E402
from models.text import Input  # noqa: E402

PROMPTS = [
    "Once upon a time",
    "The quick brown fox",
    "A job queue takes requests",
    "What is the capital of France?",
    "Call me Ishmael.",
    "numbers 0 1 2 3",
    "The weather today is",
    "Please write a short story about a robot",
]


def job(i: int, **changes) -> Input:
    """Job `i` of a varied set: prompt, length and every sampling setting differ from job to job."""
    fields = dict(
        prompt=PROMPTS[i % len(PROMPTS)],
        max_new_tokens=[12, 40, 24, 32, 16, 48, 20, 36][i % 8],
        temperature=[1.0, 0.7, 1.3, 0.0, 1.0, 0.9, 1.0, 2.0][i % 8],
        top_p=[1.0, 0.9, 1.0, 1.0, 0.8, 1.0, 0.95, 1.0][i % 8],
        top_k=[0, 0, 50, 0, 20, 0, 0, 100_000][i % 8],
        repetition_penalty=[1.0, 1.0, 1.2, 1.0, 1.0, 0.9, 1.0, 1.0][i % 8],
        seed=1000 + i,
    )
    fields.update(changes)
    return Input(**fields)


@pytest.fixture(scope="module")
def model(text_checkpoint):
    return text_vllm.load(text_checkpoint, "cpu", "float32", max_rows=8)


def drive(engine, arrivals, streams=None) -> dict:
    """Step `engine` until it is empty and every (step, seq) of `arrivals` has joined at or after its step.

    Returns each key's output; `streams` (if given) collects each key's Updates.
    """
    pending = sorted(arrivals, key=lambda a: a[0])
    outputs: dict = {}
    step = 0
    while pending or len(engine):
        while pending and pending[0][0] <= step and engine.fits(pending[0][1]):
            assert engine.add([pending.pop(0)[1]]) == []
        for u in engine.step():
            if streams is not None:
                streams.setdefault(u.key, []).append(u)
            if u.output is not None:
                assert u.key not in outputs
                assert u.key not in engine.keys()
                outputs[u.key] = u.output
        step += 1
    return outputs


@pytest.fixture(scope="module")
def alone(model) -> dict:
    """Each job's output when it runs alone."""
    out = {}
    for i in range(8):
        out.update(drive(model.engine(), [(0, model.sequence(i, job(i)))]))
    return out


def test_outputs_have_the_text_family_shape(alone):
    for i, output in alone.items():
        assert set(output) == {"text", "tokens", "finish_reason"}
        assert output["finish_reason"] in ("stop", "length")
        assert 1 <= output["tokens"] <= job(i).max_new_tokens
        if output["finish_reason"] == "length":
            assert output["tokens"] == job(i).max_new_tokens


def test_a_jobs_tokens_are_the_same_alone_in_a_static_batch_and_joined_mid_flight(model, alone):
    # Static: all eight added at once, one batch.
    engine = model.engine()
    engine.add([model.sequence(i, job(i)) for i in range(8)])
    assert sorted(engine.keys()) == list(range(8))
    assert drive(engine, []) == alone
    with pytest.raises(ValueError, match="max_rows must be at most 8 .*, got 9"):
        model.engine(max_rows=9)

    # Joined: other jobs are decoding when each job arrives, at random steps and in random orders.
    for trial in range(3):
        rng = random.Random(trial)
        fillers = [(0, model.sequence(("filler", f), job(f, seed=rng.randrange(2**32), max_new_tokens=48)))
                   for f in range(3)]
        arrivals = [(rng.randint(1, 30), model.sequence(i, job(i))) for i in rng.sample(range(8), 8)]
        outputs = drive(model.engine(max_rows=rng.choice([4, 6, 8])), fillers + arrivals)
        assert {i: outputs[i] for i in range(8)} == alone, f"trial {trial}"


def test_the_seed_and_the_settings_decide_the_tokens(model, alone):
    other_seed = drive(model.engine(), [(0, model.sequence(0, job(0, seed=7)))])[0]
    assert other_seed != alone[0]
    unseeded = drive(model.engine(), [(0, model.sequence(0, job(0, seed=None)))])[0]
    # No seed is seed 0, as in genq's own sampler: the same input gives the same output.
    assert unseeded == drive(model.engine(), [(0, model.sequence(0, job(0, seed=0)))])[0]
    greedy = [drive(model.engine(), [(0, model.sequence(3, job(3, seed=s)))])[3] for s in (1, 2)]
    assert greedy[0] == greedy[1] == alone[3]  # temperature 0: the seed does not matter


def test_a_dropped_row_leaves_and_the_others_finish_as_alone(model, alone):
    engine = model.engine()
    engine.add([model.sequence(i, job(i)) for i in (1, 3, 5, 7)])
    seen_after_drop = []
    for _ in range(3):
        engine.step()
    engine.drop(5)
    assert sorted(engine.keys()) == [1, 3, 7] and len(engine) == 3
    assert model.llm.get_num_unfinished_requests() == 3  # aborted in vLLM, not only forgotten here
    engine.drop(5)  # a key that already left is ignored
    engine.drop("never added")
    outputs = {}
    while len(engine):
        for u in engine.step():
            seen_after_drop.append(u.key)
            if u.output is not None:
                outputs[u.key] = u.output
    assert 5 not in seen_after_drop
    assert outputs == {i: alone[i] for i in (1, 3, 7)}
    assert not model.llm.has_unfinished_requests()
    # The engine stays usable: a new row after the drop runs as it would alone.
    assert drive(engine, [(0, model.sequence(5, job(5)))]) == {5: alone[5]}


def test_stop_strings_end_the_output_before_the_first_one(model, alone):
    text = alone[5]["text"]
    assert len(text) > 12, text
    stop = text[8:11]
    cut = text.find(stop)
    streams: dict = {}
    out = drive(model.engine(), [(0, model.sequence(5, job(5, stop=[stop])))], streams)[5]
    assert out["text"] == text[:cut]
    assert out["finish_reason"] == "stop"
    assert out["tokens"] <= alone[5]["tokens"]
    # What was streamed never showed the stop string, nor anything past where the text ends.
    assert all(out["text"].startswith(u.text) for u in streams[5])

    # Of two stop strings, the earlier in the text wins, whichever is listed first.
    later = text[cut + 4:cut + 6] if len(text) >= cut + 6 else None
    if later and later not in text[:cut + len(stop)]:
        out2 = drive(model.engine(), [(0, model.sequence(5, job(5, stop=[later, stop])))])[5]
        assert out2["text"] == text[:cut]


def test_streamed_text_only_grows_and_ends_as_the_output(model, alone):
    streams: dict = {}
    # Odd jobs stop at "e ": vLLM holds back text that may be the start of a stop string.
    jobs = {i: job(i, stop=["e "] if i % 2 else []) for i in range(8)}
    outputs = drive(model.engine(), [(i * 2, model.sequence(i, jobs[i])) for i in range(8)], streams)
    assert set(streams) == set(outputs) == set(jobs)
    for key, updates in streams.items():
        final = outputs[key]
        assert updates[-1].output == final and updates[-1].text == final["text"]
        assert all(u.output is None for u in updates[:-1])
        assert [u.tokens for u in updates] == list(range(1, len(updates) + 1))
        assert updates[-1].tokens == final["tokens"]
        assert {u.limit for u in updates} == {job(key).max_new_tokens}
        for before, after in zip(updates, updates[1:]):
            assert after.text.startswith(before.text)
        if not jobs[key].stop:
            assert final == alone[key]
        else:
            assert "e " not in final["text"] and alone[key]["text"].startswith(final["text"])


def test_fits_counts_rows_and_the_token_budget(model):
    engine = model.engine(max_rows=2, max_batch_tokens=100)

    def seq(key, limit):
        return text_vllm.Sequence(key=key, prompt=[50, 322, 224, 88], limit=limit)

    assert engine.fits(seq("big", 200))  # an empty engine takes any one row
    engine.add([seq("a", 56)])  # 60 tokens reserved
    assert not engine.fits(seq("b", 37))  # 60 + 41 > 100
    assert engine.fits(seq("b", 36))
    engine.add([seq("b", 36)])
    assert not engine.fits(seq("c", 1))  # no free row
    with pytest.raises(ValueError, match="'a'"):
        engine.add([seq("a", 5)])
    engine.drop("a")
    assert engine.fits(seq("c", 36)) and not engine.fits(seq("c", 61))
    outputs = drive(engine, [])
    assert set(outputs) == {"b"} and outputs["b"]["tokens"] == 36


def test_settings_vllm_refuses_are_refused_per_job_by_name(model):
    with pytest.raises(ValueError, match="temperature must be at most 2.0 on the vllm engine, got 5.0"):
        model.sequence("hot", job(0, temperature=5.0))


def test_run_is_a_static_batch_with_progress_and_cancel(model, alone):
    calls: dict = {}
    results = model.run(
        [job(i) for i in range(8)],
        on_progress=lambda row, n, total: calls.setdefault(row, []).append((n, total)),
        is_cancelled=lambda row: row == 2,
    )
    assert results[2] is None and 2 not in calls
    for i in (0, 1, 3, 4, 5, 6, 7):
        assert results[i].output == alone[i]
        assert calls[i][-1] == (alone[i]["tokens"], job(i).max_new_tokens)


def test_loaded_model_reports_its_memory_and_refuses_what_it_cannot_run(model, text_checkpoint):
    assert model.nbytes > 13_500_000  # ~3.4M float32 parameters, and the KV cache on top
    with pytest.raises(ValueError, match="dtype must be float32, float16 or bfloat16 on the vllm engine, got 'int8'"):
        text_vllm.load(text_checkpoint, "cpu", "int8")
    with pytest.raises(ValueError, match="device must be 'cpu' for the installed vllm, got 'cuda'"):
        text_vllm.load(text_checkpoint, "cuda", "float32")
