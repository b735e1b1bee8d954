"""Tests of the text engine: rows join a running batch and leave it, and a job's tokens never depend on how it ran.

Run on two real architectures built tiny: the demo GPT-2 (learned positions)
and a Llama (rotary positions, grouped-query attention), both loaded the real
way with from_pretrained.
"""
from __future__ import annotations

import random

import pytest

from models import text
from models.text_engine import RowText, TextEngine, Update

WORDS = ["the", "quick", "fox", "café", "naïve", "日本", "✓", "über", "a", "jobs", "queue", ",", ".", "x", "Paris", "€"]
STOPS = ["e", "th", " a", "o ", "ab", "x"]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """One torch thread for this module: thousands of tiny decode steps run 3-7x faster on a shared 2-core
    machine without a second thread to wait for at every op (what is checked does not depend on it)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def llama_model(demo_dir):
    """A ~50k-parameter LlamaForCausalLM with the demo tokenizer, saved and loaded like any checkpoint."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from models.demo import _train_tokenizer

    dest = demo_dir / "test-llama"
    if not (dest / "config.json").exists():
        tok = _train_tokenizer(model_max_length=256, add_bos_eos=False)
        config = LlamaConfig(
            vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=256, pad_token_id=tok.pad_token_id,
            bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
        )
        torch.manual_seed(0)
        LlamaForCausalLM(config).save_pretrained(dest)
        tok.save_pretrained(dest)
    return text.load(str(dest), "cpu", "float32")


@pytest.fixture(params=["gpt2", "llama"], scope="session")
def model(request, text_model, llama_model):
    return {"gpt2": text_model, "llama": llama_model}[request.param]


def random_jobs(n: int, seed: int) -> list[text.Input]:
    """`n` jobs with random prompts (multi-byte characters included), lengths, seeds, settings and stops."""
    rng = random.Random(seed)
    jobs = []
    for _ in range(n):
        prompt = " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 12)))
        sampled = rng.random() < 0.75
        jobs.append(text.Input(
            prompt=prompt,
            max_new_tokens=rng.randint(1, 40),
            temperature=rng.choice([0.6, 1.0, 1.4]) if sampled else 0.0,
            top_k=rng.choice([0, 0, 5, 50]),
            top_p=rng.choice([1.0, 1.0, 0.9, 0.5]),
            repetition_penalty=rng.choice([1.0, 1.0, 1.3, 0.8]),
            stop=rng.sample(STOPS, rng.randint(1, 2)) if rng.random() < 0.3 else [],
            seed=rng.randrange(2**32),
        ))
    return jobs


class Recorder:
    """Every Update of every row, and the token ids the engine picked for it, by key."""

    def __init__(self, engine: TextEngine):
        self.engine = engine
        self.updates: dict = {}
        self.tokens: dict = {}
        advance = engine._advance

        def recording_advance(rows, picks):
            for row, token in zip(rows, picks):
                self.tokens.setdefault(row.seq.key, []).append(token)
            return advance(rows, picks)

        engine._advance = recording_advance

    def take(self, updates: list[Update]) -> list[Update]:
        for u in updates:
            self.updates.setdefault(u.key, []).append(u)
        return updates

    def streams(self) -> dict:
        """Per key: the token ids and the (tokens, text, output) of every update."""
        return {k: (self.tokens[k], [(u.tokens, u.limit, u.text, u.output) for u in us]) for k, us in self.updates.items()}


def check_cache(engine: TextEngine) -> None:
    """The left-padded cache is exactly as wide as its longest row, and every row's tokens end at the last column."""
    if not len(engine):
        assert engine.cache is None and engine.width() == 0
        return
    lengths = [len(r.seq.prompt) + len(r.tokens) - 1 for r in engine.rows]  # the newest token is not cached yet
    assert engine.width() == max(lengths)
    assert engine.mask.sum(-1).tolist() == lengths
    for r, n in enumerate(lengths):
        assert engine.mask[r, engine.width() - n:].all()
    for layer in engine.cache.layers:
        assert layer.keys.shape[0] == len(engine) and layer.keys.shape[2] == engine.width()
        # Padding columns are masked, but must hold numbers: a masked weight is 0, and 0 x NaN is NaN.
        assert layer.keys.isfinite().all() and layer.values.isfinite().all()


def alone(model, jobs) -> dict:
    """Each job on an engine of its own."""
    out = {}
    for key, inp in enumerate(jobs):
        engine = model.engine(1)
        rec = Recorder(engine)
        rec.take(engine.add([model.sequence(key, inp)]))
        while len(engine):
            rec.take(engine.step())
        out.update(rec.streams())
    return out


def joined(model, jobs, order_seed: int, max_rows: int, max_batch_tokens: int | None, one_at_a_time: bool) -> dict:
    """The jobs arriving in a random order at random steps, joining a running batch of at most `max_rows`."""
    rng = random.Random(order_seed)
    order = list(range(len(jobs)))
    rng.shuffle(order)
    arrivals, t = [], 0
    for key in order:
        t += rng.choice([0, 0, 1, 2, 3])
        arrivals.append((t, key))
    engine = model.engine(max_rows, max_batch_tokens)
    rec = Recorder(engine)
    queue: list = []
    step = 0
    while arrivals or queue or len(engine):
        while arrivals and arrivals[0][0] <= step:
            queue.append(arrivals.pop(0)[1])
        if one_at_a_time:
            while queue and engine.fits(seq := model.sequence(queue[0], jobs[queue[0]])):
                queue.pop(0)
                rec.take(engine.add([seq]))
        else:
            group = []
            while queue and len(engine) + len(group) < max_rows:
                key = queue.pop(0)
                group.append(model.sequence(key, jobs[key]))
            rec.take(engine.add(group))
        check_cache(engine)
        rec.take(engine.step())
        check_cache(engine)
        step += 1
    return rec.streams()


def test_batch_invariance_alone_static_joined(model):
    """The core property: 120 random jobs give the same tokens and the same stream of updates
    alone, in static batches, and joining a running batch mid-flight in three arrival orders
    (groups joining together, or one at a time under a key/value budget that keeps rows queued)."""
    jobs = random_jobs(120, seed=14)
    solo = alone(model, jobs)
    finals = {k: updates[-1][3] for k, (_, updates) in solo.items()}
    assert all(out is not None for out in finals.values())
    # Coverage: the mix holds rows ended by length and by stop strings.
    assert {out["finish_reason"] for out in finals.values()} == {"length", "stop"}

    for start in range(0, len(jobs), 15):
        chunk = jobs[start:start + 15]
        static = model.run(chunk, lambda r, c, t: None, lambda r: False)
        assert [r.output for r in static] == [finals[start + i] for i in range(len(chunk))]

    for order_seed, max_rows, budget, one_at_a_time in [(1, 4, None, False), (2, 7, None, False), (3, 6, 250, True)]:
        assert joined(model, jobs, order_seed, max_rows, budget, one_at_a_time) == solo, order_seed


def test_short_job_that_joins_a_long_one_finishes_first(text_model):
    engine = text_model.engine(4)
    long = text.Input(prompt="Once upon a time", max_new_tokens=120, temperature=0.9, seed=1)
    short = text.Input(prompt="The capital of France", max_new_tokens=6, temperature=0.9, seed=2)
    engine.add([text_model.sequence("long", long)])
    for _ in range(10):
        assert engine.step()[0].output is None
    engine.add([text_model.sequence("short", short)])
    done = {}
    while len(engine):
        for u in engine.step():
            if u.output is not None:
                done[u.key] = (len(done), u.output)
    assert done["short"][0] == 0 and done["long"][0] == 1
    assert done["short"][1]["tokens"] == 6 and done["long"][1]["tokens"] == 120
    assert done["short"][1] == text_model.run([short], lambda r, c, t: None, lambda r: False)[0].output
    assert done["long"][1] == text_model.run([long], lambda r, c, t: None, lambda r: False)[0].output


def test_streamed_text_only_grows_and_ends_as_the_output(text_model):
    """Every update's text extends the one before and is a prefix of the final text, so no
    U+FFFD of a cut character and no start of a stop string is ever published and taken back."""
    # Every other job with two-character stop strings, whose first character must wait.
    jobs = [j.model_copy(update={"stop": ["th", "o ", " a", "e,"]}) if k % 2 else j
            for k, j in enumerate(random_jobs(40, seed=3))]
    streams = joined(text_model, jobs, order_seed=5, max_rows=6, max_batch_tokens=None, one_at_a_time=False)
    held_partial = 0
    for key, (tokens, updates) in streams.items():
        final = updates[-1][3]["text"]
        previous = ""
        for n, (count, _, published, output) in enumerate(updates, start=1):
            assert count == n
            assert published.startswith(previous) and final.startswith(published), (key, previous, published, final)
            previous = published
            raw = RowText(text_model.tokenizer, []).decode(tokens[:n])
            if output is None and raw.endswith("\ufffd") and len(final) >= len(raw) and final[len(raw) - 1] != "\ufffd":
                held_partial += 1  # a cut character that a later token completed: it was held back
        assert previous == final
    assert held_partial > 0


def test_row_text_holds_back_cut_characters_and_stop_starts(text_model):
    tok = text_model.tokenizer
    # "é" is the bytes C3 A9: byte-level BPE tokens "Ã" and "©".
    ids = tok.convert_tokens_to_ids(["a", "Ã", "©", "b"])
    row = RowText(tok, [])
    steps = [row.advance(row.decode(ids[:n])) for n in range(1, 5)]
    assert steps == ["a", "a", "aé", "aéb"]
    row = RowText(tok, ["b!", "éb?"])
    assert [row.advance(s) for s in ["x", "xé", "xéb", "xébc"]] == ["x", "x", "x", "xébc"]
    assert row.first_stop("xéb? b!") == 1


def test_row_text_decodes_as_the_tokenizer_does_without_its_python_wrapper(model):
    """RowText goes to the fast tokenizer's backend directly (the wrapper's per-id Python cost as much as the
    decoding): the same text as `decode` for random ids, special tokens and cut characters included."""
    from models.text_engine import backend_decode

    tok = model.tokenizer
    decode = backend_decode(tok)
    assert decode.__code__ is not backend_decode(object()).__code__  # the backend path, not the fallback
    rnd = random.Random(4)
    specials = [i for i in (tok.eos_token_id, tok.bos_token_id, tok.pad_token_id) if i is not None]
    ids_ = [tok.encode(" ".join(rnd.choice(WORDS) for _ in range(8)), add_special_tokens=False) for _ in range(30)]
    ids_ += [[rnd.randrange(len(tok)) for _ in range(rnd.randint(0, 40))] + rnd.sample(specials, len(specials))
             for _ in range(30)]
    for ids in ids_:
        for n in range(len(ids) + 1):
            want = tok.decode(ids[:n], skip_special_tokens=True, clean_up_tokenization_spaces=False)
            assert decode(ids[:n]) == RowText(tok, []).decode(ids[:n]) == want


def test_ending_within_counts_the_rows_at_most_that_many_steps_from_their_limit(text_model):
    engine = TextEngine(text_model, max_rows=4)
    inp = lambda n: text.Input.model_validate({"prompt": "a b", "max_new_tokens": n, "temperature": 0})  # noqa: E731
    engine.add([text_model.sequence("short", inp(4)), text_model.sequence("long", inp(40))])  # one token each
    assert engine.ending_within(2) == 0 and engine.ending_within(3) == 1 and engine.ending_within(39) == 2
    engine.step()
    assert engine.ending_within(2) == 1


def test_end_token_cuts_the_text_and_counts(text_checkpoint):
    """A row ending at EOS: reason "stop", the EOS counted but not in the text, the same alone and batched."""
    m = text.load(text_checkpoint, "cpu", "float32")
    jobs = [text.Input(prompt="Once upon a time", max_new_tokens=40, temperature=1.0, seed=s) for s in range(6)]
    free = [r.output for r in m.run(jobs, lambda r, c, t: None, lambda r: False)]
    # Make a token the model often picks an end token.
    e = m.tokenizer.convert_tokens_to_ids("e")
    m.eos_ids = m.eos_ids | {e}
    ended = [r.output for r in m.run(jobs, lambda r, c, t: None, lambda r: False)]
    assert any(out["finish_reason"] == "stop" for out in ended)
    for before, after in zip(free, ended):
        # Same stream up to the end token, which is counted but not in the text.
        assert after == before or before["text"].startswith(after["text"] + "e"), (before, after)
        assert after["tokens"] <= before["tokens"]
    assert ended == [r.output for inp in jobs for r in m.run([inp], lambda r, c, t: None, lambda r: False)]


def test_drop_removes_one_row_and_the_others_continue(model):
    jobs = random_jobs(4, seed=8)
    jobs = [j.model_copy(update={"max_new_tokens": 30, "stop": []}) for j in jobs]
    solo = alone(model, jobs)
    engine = model.engine(4)
    rec = Recorder(engine)
    rec.take(engine.add([model.sequence(k, inp) for k, inp in enumerate(jobs)]))
    for _ in range(5):
        rec.take(engine.step())
    engine.drop(1)
    engine.drop("not a key")
    assert engine.keys() == [0, 2, 3]
    check_cache(engine)
    while len(engine):
        rec.take(engine.step())
        check_cache(engine)
    streams = rec.streams()
    assert streams[1][1][-1][3] is None and len(streams[1][1]) == 6
    for k in (0, 2, 3):
        assert streams[k] == solo[k]


def test_cache_shrinks_when_the_long_row_leaves(text_model):
    engine = text_model.engine(3)
    long_prompt = text.Input(prompt="the quick brown fox " * 10, max_new_tokens=5, temperature=0, seed=0)
    shorts = [text.Input(prompt="A", max_new_tokens=30, temperature=0.8, seed=s) for s in (1, 2)]
    engine.add([text_model.sequence("long", long_prompt)] + [text_model.sequence(s, inp) for s, inp in enumerate(shorts)])
    width_with_long = engine.width()
    assert width_with_long == len(engine.rows[0].seq.prompt)
    while "long" in engine.keys():
        engine.step()
    # The short rows hold 1 prompt token + 5 generated (the newest not yet cached): 5 columns, not 40-odd.
    assert engine.width() == 5 < width_with_long
    check_cache(engine)
    while len(engine):
        engine.step()
    assert engine.cache is None and engine.width() == 0


def test_fits_counts_rows_and_the_key_value_budget(text_model):
    def seq(key, prompt_tokens, limit):
        s = text_model.sequence(key, text.Input(prompt="x", max_new_tokens=limit, seed=0))
        s.prompt = s.prompt * prompt_tokens
        return s

    engine = text_model.engine(max_rows=2, max_batch_tokens=100)
    assert engine.fits(seq("huge", 300, 200))  # an empty engine always admits one
    engine.add([seq("a", 10, 30)])  # 40 tokens
    assert engine.fits(seq("b", 10, 10))  # 2 rows x 40 = 80
    assert engine.fits(seq("b", 20, 30))  # 2 x 50 = 100
    assert not engine.fits(seq("b", 20, 40))  # 2 x 60 = 120
    engine.add([seq("b", 1, 5)])
    assert not engine.fits(seq("c", 1, 1))  # max_rows
    assert text_model.engine(max_rows=3).fits(seq("c", 500, 500))  # no budget: rows only
    with pytest.raises(ValueError, match="max_rows must be a positive integer, got 0"):
        text_model.engine(max_rows=0)
    with pytest.raises(ValueError, match="key 'a' is already in the batch"):
        engine.add([seq("a", 1, 1)])


def test_updates_carry_counts_and_limits(text_model):
    engine = text_model.engine(2)
    first = engine.add([text_model.sequence("k", text.Input(prompt="Hi", max_new_tokens=3, temperature=0))])
    assert [(u.key, u.tokens, u.limit, u.output) for u in first] == [("k", 1, 3, None)]
    assert engine.step()[0].tokens == 2
    last = engine.step()[0]
    assert (last.tokens, last.output["tokens"], last.output["finish_reason"]) == (3, 3, "length")
    assert last.text == last.output["text"] and len(engine) == 0 and engine.step() == []


def two_rows_one_step(model, tokens: int, seeds: tuple[int, int]):
    """An engine of two sampled rows that has taken one step, its recorder, and what each row makes alone."""
    jobs = [text.Input(prompt="Once upon a time", max_new_tokens=tokens, temperature=0.9, seed=s) for s in seeds]
    solo = alone(model, jobs)
    engine = model.engine(2)
    rec = Recorder(engine)
    rec.take(engine.add([model.sequence(k, inp) for k, inp in enumerate(jobs)]))
    rec.take(engine.step())
    return engine, rec, solo


def test_a_failed_step_leaves_the_batch_as_it_was(text_model):
    engine, rec, solo = two_rows_one_step(text_model, 12, (1, 2))
    # The third of the model's four blocks runs out of memory mid-forward: two layers' caches have grown.
    block = text_model.model.transformer.h[2]

    def fail(*args, **kwargs):
        raise RuntimeError("out of memory")

    block.forward = fail
    try:
        with pytest.raises(RuntimeError, match="out of memory"):
            engine.step()
    finally:
        del block.forward  # the class's forward again
    check_cache(engine)
    while len(engine):
        rec.take(engine.step())
    assert rec.streams() == solo


def test_a_step_writes_its_column_in_place_instead_of_copying_the_cache(model):
    """A running batch's cache grows into spare room: steps between joins and
    leaves leave its storage where it was (a copy per step per layer cost about
    as much as the forward pass at 8 rows), and the tokens stay the solo ones."""
    engine, rec, solo = two_rows_one_step(model, 20, (3, 4))
    storage = [(layer.keys.data_ptr(), layer.values.data_ptr()) for layer in engine.cache.layers]
    for _ in range(10):
        rec.take(engine.step())
        check_cache(engine)
        assert [(layer.keys.data_ptr(), layer.values.data_ptr()) for layer in engine.cache.layers] == storage
    while len(engine):
        rec.take(engine.step())
    assert rec.streams() == solo


def test_joins_and_leaves_keep_the_running_rows_where_they_are(model):
    """Rows join into spare rows of the cache's buffer and leave by the rows
    after them moving up: once the buffer has room for max_rows, joins, leaves
    and steps never copy it whole (each copy was a step's worth of work at 8
    rows), and every row's tokens are still its solo ones."""
    # The longest prompts start, so the rows that join fit within the columns already there
    # (a longer one makes room on the left: a bigger buffer, by design).
    jobs = sorted(random_jobs(6, seed=21), key=lambda j: -len(model.sequence(0, j).prompt))
    jobs = [j.model_copy(update={"max_new_tokens": 12 + 3 * k, "stop": []}) for k, j in enumerate(jobs)]
    solo = alone(model, jobs)
    engine = model.engine(4)
    rec = Recorder(engine)
    rec.take(engine.add([model.sequence(0, jobs[0]), model.sequence(1, jobs[1])]))
    rec.take(engine.step())
    rec.take(engine.add([model.sequence(2, jobs[2])]))  # the buffer takes room for 4 rows here

    def storage():
        return [(layer.keys.untyped_storage().data_ptr(), layer.values.untyped_storage().data_ptr())
                for layer in engine.cache.layers]

    held = storage()
    rec.take(engine.step())
    check_cache(engine)
    rec.take(engine.add([model.sequence(3, jobs[3])]))
    engine.drop(1)  # a row in the middle leaves
    check_cache(engine)
    assert storage() == held
    rec.take(engine.add([model.sequence(4, jobs[4])]))
    for _ in range(3):
        rec.take(engine.step())
        check_cache(engine)
    assert storage() == held
    while len(engine) or 5 not in rec.streams():
        if 5 not in rec.streams() and len(engine) < 4:
            rec.take(engine.add([model.sequence(5, jobs[5])]))
        rec.take(engine.step())
        check_cache(engine)
    streams = rec.streams()
    for k in (0, 2, 3, 4, 5):
        assert streams[k] == solo[k]


def test_a_buffer_grown_by_a_step_keeps_room_for_the_rows_a_batch_may_have(text_model):
    """When steps fill the buffer's columns it is copied into a bigger one; that
    one still has room for max_rows rows, so a row that joins later is written
    into it, not into yet another copy (the service saw one copy per join)."""
    jobs = [text.Input(prompt="Once upon a time there was", max_new_tokens=70, temperature=0.7, seed=s) for s in (5, 6)]
    jobs.append(text.Input(prompt="A", max_new_tokens=10, temperature=0.7, seed=7))
    solo = alone(text_model, jobs)
    engine = text_model.engine(3)
    rec = Recorder(engine)
    rec.take(engine.add([text_model.sequence(0, jobs[0])]))
    rec.take(engine.add([text_model.sequence(1, jobs[1])]))  # a join: room for 3 rows from here on

    def storage():
        return [layer.keys.untyped_storage().data_ptr() for layer in engine.cache.layers]

    first, grown = storage(), 0
    for _ in range(50):
        rec.take(engine.step())
        grown += storage() != first
        first = storage()
    assert grown and len(engine) == 2  # the steps outgrew the buffer at least once
    rec.take(engine.add([text_model.sequence(2, jobs[2])]))
    assert storage() == first
    while len(engine):
        rec.take(engine.step())
        check_cache(engine)
    assert rec.streams() == solo
