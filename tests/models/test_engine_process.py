"""The text engine in a process of its own (models/engine_process.py): the
same tokens and text as the engine in this process, rows that join while it
runs ahead, drops, a failed step, batches one after another, and a child that
ends with its parent."""
from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from models import text
from models.engine_process import EngineProcessError, ProcessEngine, _Mirror, _room_for
from tests.models.test_text_engine import random_jobs

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def remote(text_checkpoint):
    model = text.load(text_checkpoint, "cpu", "float32", process=True, torch_threads=1)
    yield model
    model.engine_process.close()


def drive(engine, model, jobs, order_seed: int, max_rows: int) -> tuple[dict, dict]:
    """The jobs joining in a random order after random numbers of steps: each job's
    output, and the texts its updates showed, in order."""
    rng = random.Random(order_seed)
    queue = list(range(len(jobs)))
    rng.shuffle(queue)
    outputs, shown = {}, {}
    while queue or len(engine):
        if queue and rng.random() < 0.5:
            keys = []
            n = rng.randint(1, max_rows)
            while queue and len(engine) + len(keys) < max_rows and len(keys) < n:
                keys.append(queue.pop(0))
            engine.add([model.sequence(k, jobs[k]) for k in keys])
        if not len(engine):
            continue
        for u in engine.step():
            shown.setdefault(u.key, []).append(u.text)
            if u.output is not None:
                assert u.key not in outputs
                outputs[u.key] = u.output
    return outputs, shown


def test_the_weights_are_in_the_child_only(remote, text_model):
    """The worker's side holds the tokenizer and what the scheduler needs; the child, the weights."""
    assert remote.model is None and remote.base_nbytes == 0
    assert remote.nbytes == remote.engine_process.nbytes == text_model.base_nbytes
    assert (remote.eos_ids, remote.pad_id, remote.max_positions) == \
        (text_model.eos_ids, text_model.pad_id, text_model.max_positions)


def test_rows_make_the_same_tokens_and_text_as_in_this_process(remote, text_model):
    """60 random jobs (stop strings, multi-byte characters, sampling settings) joining the
    child's running batch in random orders while it decodes ahead: every output is the one
    the in-process engine gives, and what the updates showed only grows, up to the output."""
    jobs = random_jobs(60, seed=41)
    expected = {}
    for start in range(0, len(jobs), 15):
        results = text_model.run(jobs[start:start + 15], lambda *a: None, lambda r: False)
        expected.update({start + i: r.output for i, r in enumerate(results)})
    # The last: rows sent ahead of room (twice the rows that decode), joining in the child as rows leave.
    for order_seed, rows, sent in [(1, 4, 4), (2, 8, 8), (3, 3, 6)]:
        engine = remote.engine(rows)
        assert isinstance(engine, ProcessEngine) and engine.max_rows == 2 * rows
        outputs, shown = drive(engine, remote, jobs, order_seed, sent)
        engine.close()
        assert outputs == expected
        for key, texts in shown.items():
            for before, after in zip(texts, texts[1:]):
                assert after.startswith(before), (key, before, after)
            assert texts[-1] == expected[key]["text"]


def test_a_static_batch_through_the_child_is_the_same(remote, text_model):
    jobs = random_jobs(12, seed=5)
    progress = []
    mine = remote.run(jobs, lambda key, cur, total: progress.append((key, cur, total)), lambda r: False)
    assert [r.output for r in mine] == [r.output for r in text_model.run(jobs, lambda *a: None, lambda r: False)]
    # Progress counts each row's tokens up to its last.
    for key, out in enumerate(r.output for r in mine):
        counts = [c for k, c, _ in progress if k == key]
        assert counts == sorted(counts) and counts[-1] == out["tokens"]


def test_a_dropped_row_leaves_and_its_batch_mates_finish(remote):
    engine = remote.engine(3)
    long = text.Input(prompt="Once upon a time", max_new_tokens=60, temperature=0)
    engine.add([remote.sequence(k, long) for k in ("a", "b", "c")])
    engine.step()
    engine.drop("b")
    assert sorted(engine.keys()) == ["a", "c"] and engine.ending_within(1000) == 2
    ended = {}
    while len(engine):
        for u in engine.step():
            assert u.key != "b"
            if u.output is not None:
                ended[u.key] = u.output["tokens"]
    assert ended == {"a": 60, "c": 60}
    engine.close()


def test_a_failed_step_fails_the_batch_and_the_next_batch_runs(remote, text_model):
    engine = remote.engine(2)
    bad = remote.sequence("bad", text.Input(prompt="x", max_new_tokens=4))
    bad.prompt = [10**7]  # past the vocabulary: the child's prefill raises
    engine.add([bad])
    with pytest.raises(EngineProcessError, match="IndexError|index"):
        engine.step()
    assert len(engine) == 0
    engine.close()
    good = text.Input(prompt="Hello", max_new_tokens=8, seed=3)
    assert remote.run([good], lambda *a: None, lambda r: False)[0].output == \
        text_model.run([good], lambda *a: None, lambda r: False)[0].output


def test_a_new_batch_ends_the_last_and_hears_none_of_its_steps(remote, text_model):
    first = remote.engine(2)
    first.add([remote.sequence("old", text.Input(prompt="Long ago", max_new_tokens=200, temperature=0))])
    first.step()
    second = remote.engine(2)  # ends the first in the child; its steps still in the pipe are skipped
    assert first.closed
    job = text.Input(prompt="Fresh start", max_new_tokens=12, seed=9)
    second.add([remote.sequence("new", job)])
    seen = []
    while len(second):
        seen.extend(second.step())
    assert {u.key for u in seen} == {"new"}
    assert seen[-1].output == text_model.run([job], lambda *a: None, lambda r: False)[0].output
    second.close()


def test_a_step_awaited_when_its_batch_is_ended_elsewhere_returns(remote):
    engine = remote.engine(1)
    engine.add([remote.sequence("k", text.Input(prompt="Wait", max_new_tokens=3, temperature=0))])
    while len(engine):
        engine.step()
    # A row the child does not have (as if its batch had been ended there): a step waits...
    engine.rows["ghost"] = _Mirror(remote.sequence("ghost", text.Input(prompt="Wait")), remote.tokenizer)
    raised = []

    def wait():
        try:
            engine.step()
        except EngineProcessError as exc:
            raised.append(exc)

    waiter = threading.Thread(target=wait)
    waiter.start()
    time.sleep(0.5)
    assert waiter.is_alive()
    engine.close()  # ...until the batch is ended by the scheduler's other thread
    waiter.join(5)
    assert not waiter.is_alive() and raised


def test_the_child_ends_with_its_parent(text_checkpoint, tmp_path):
    """A worker killed with SIGKILL closes its end of the pipe: the child exits, its model with it."""
    script = tmp_path / "parent.py"
    script.write_text(
        "import sys, time\n"
        f"sys.path.insert(0, {str(ROOT)!r})\n"
        "from models import text\n"
        f"m = text.load({text_checkpoint!r}, 'cpu', 'float32', process=True, torch_threads=1)\n"
        "e = m.engine(1)\n"
        "e.add([m.sequence('k', text.Input(prompt='forever', max_new_tokens=250, temperature=0))])\n"
        "e.step()\n"
        "print(m.engine_process.process.pid, flush=True)\n"
        "time.sleep(600)\n")
    parent = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True)
    try:
        child = int(parent.stdout.readline())
        os.kill(child, 0)  # alive, decoding the row
        parent.send_signal(signal.SIGKILL)
        parent.wait(10)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            try:
                os.kill(child, 0)
            except ProcessLookupError:
                break
            # Not our child: the kernel reaps it under init once it exits; a zombie counts as gone.
            if Path(f"/proc/{child}/stat").read_text().split(") ")[1].startswith("Z"):
                break
            time.sleep(0.1)
        else:
            pytest.fail(f"engine process {child} outlived its parent by 20s")
    finally:
        if parent.poll() is None:
            parent.kill()


def test_rows_on_lora_adapters_decode_in_the_child_as_here(text_checkpoint, remote, tmp_path):
    """A row's adapter is loaded by the child (its own copy of the base serves adapters too):
    rows of several adapters and the base, joining in a random order, make what they make here."""
    from tests.models.test_text_adapters import SHAPES, OnAdapters, make_adapter
    from models.text_adapters import AdapterRef

    refs = [AdapterRef(f"t:ft-{i}", make_adapter(text_checkpoint, tmp_path / f"a{i}", rank, targets, seed=i))
            for i, (rank, targets) in enumerate(SHAPES)]
    here = text.load(text_checkpoint, "cpu", "float32")
    here.serve_adapters(max_loaded=8)
    adapters = remote.serve_adapters(max_loaded=8)
    # The scheduler checks a row's adapter before the row joins: loaded there, counted here.
    adapters.ensure(refs[:1])
    assert adapters.nbytes > 0 and remote.nbytes == remote.engine_process.nbytes + adapters.nbytes
    rng = random.Random(7)
    jobs = random_jobs(24, seed=23)
    rows = [rng.choice(refs + [None]) for _ in jobs]
    expected = here.run(jobs, lambda *a: None, lambda r: False, adapters=rows)
    engine = remote.engine(6)
    outputs, _ = drive(engine, OnAdapters(remote, rows), jobs, order_seed=3, max_rows=6)
    engine.close()
    assert outputs == {k: r.output for k, r in enumerate(expected)}
    base = text.load(text_checkpoint, "cpu", "float32").run(jobs, lambda *a: None, lambda r: False)
    # The adapters changed something (else this would not tell the child loaded them).
    assert sum(outputs[k] != base[k].output for k, ref in enumerate(rows) if ref is not None) > 0


def test_rows_sent_ahead_join_in_order_as_room_frees(text_model):
    """The child's door (run here on an engine in this process): at most the engine's rows
    decode, a row waiting joins once one leaves, in order, and the key/value budget holds."""
    engine = text_model.engine(2, max_batch_tokens=200)
    seq = lambda key, tokens: text_model.sequence(key, text.Input(prompt="Hello there", max_new_tokens=tokens,
                                                                  temperature=0))  # noqa: E731
    waiting = [seq("a", 3), seq("b", 40), seq("c", 5), seq("d", 5)]
    assert [s.key for s in _room_for(engine, waiting)] == ["a", "b"]
    engine.add(waiting[:2])
    assert _room_for(engine, waiting[2:]) == []  # two rows decode: c waits
    while "a" in engine.keys():
        engine.step()
    assert [s.key for s in _room_for(engine, waiting[2:])] == ["c"]  # d waits behind c
    big = seq("e", 150)  # 2 rows x (prompt + 150) is past the budget of 200
    assert _room_for(engine, [big, waiting[3]]) == []  # and d does not pass it


def test_an_adapter_the_child_cannot_serve_fails_with_its_reason(text_checkpoint, remote, tmp_path):
    from models.text_adapters import AdapterRef
    from tests.models.test_text_adapters import make_adapter
    from worker.batch import error_for

    dora = AdapterRef("t:ft-dora", make_adapter(text_checkpoint, tmp_path / "dora", 4, ["c_attn"], seed=1,
                                                use_dora=True))
    with pytest.raises(Exception, match="DoRA") as caught:
        remote.serve_adapters(max_loaded=8).ensure([dora])
    # As the job's error shows it: the child's exception class by name, and its message.
    error = error_for(caught.value, default_code="model_load_failed")
    assert error["code"] == "model_load_failed" and error["message"].startswith("AdapterRefused: ")


def test_a_model_the_child_cannot_load_fails_the_load_with_its_reason(text_checkpoint, tmp_path):
    """The tokenizer and config are there, the weights are not: the child says why, and exits."""
    import shutil


    broken = tmp_path / "no-weights"
    shutil.copytree(text_checkpoint, broken, ignore=shutil.ignore_patterns("*.safetensors", "*.bin"))
    with pytest.raises(EngineProcessError, match="could not load it: .*(safetensors|weights|pytorch_model)"):
        text.load(str(broken), "cpu", "float32", process=True, torch_threads=1)
