"""LoRA adapters served on one loaded base (models/text_adapters.py): rows of
different adapters, and of the base, share a batch, and each row's tokens are
those of the same job run alone on its adapter."""
from __future__ import annotations

import random

import pytest

from models import text
from models.text_adapters import AdapterRef, AdapterRefused
from tests.models.test_text_engine import alone, joined, random_jobs

# (rank, target modules) of each test adapter: two ranks, all linear layers or attention only.
SHAPES = [(4, "all-linear"), (8, "all-linear"), (4, ["c_attn"]), (2, "all-linear")]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def make_adapter(checkpoint: str, dest, rank: int, targets, seed: int, **extra) -> str:
    """A LoRA adapter of the demo base with random weights (B not zero: it changes the output)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(checkpoint)
    torch.manual_seed(seed)
    model = get_peft_model(base, LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=targets, lora_dropout=0.0,
                                            init_lora_weights=False, task_type="CAUSAL_LM", **extra))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.mul_(0.5)  # big enough to change tokens, small enough to keep the text varied
    model.save_pretrained(dest)
    return str(dest)


@pytest.fixture(scope="module")
def adapter_refs(text_checkpoint, tmp_path_factory) -> list[AdapterRef]:
    root = tmp_path_factory.mktemp("adapters")
    return [AdapterRef(f"tenant-{i}:ft-{i}", make_adapter(text_checkpoint, root / f"a{i}", rank, targets, seed=i))
            for i, (rank, targets) in enumerate(SHAPES)]


@pytest.fixture
def served(text_checkpoint):
    """The demo base loaded on its own, serving adapters."""
    model = text.load(text_checkpoint, "cpu", "float32")
    model.serve_adapters(max_loaded=8)
    return model


class OnAdapters:
    """`model` whose sequence(key, inp) runs job `key` on `refs[key]` (the engine tests' helpers take it)."""

    def __init__(self, model, refs):
        self.model, self.refs = model, refs

    def sequence(self, key, inp):
        return self.model.sequence(key, inp, self.refs[key])

    def engine(self, *args):
        return self.model.engine(*args)


def test_rows_of_many_adapters_and_the_base_share_a_batch(served, text_model, adapter_refs):
    """48 random jobs over four adapters (two ranks, two sets of layers) and the base: each
    row's tokens and updates are those of the job alone on its adapter, in static batches and
    joining a running batch in random orders; a base row's are those of the plain base alone."""
    rng = random.Random(5)
    jobs = random_jobs(48, seed=21)
    refs = [rng.choice(adapter_refs + [None]) for _ in jobs]
    assert None in refs and all(r in refs for r in adapter_refs)
    on = OnAdapters(served, refs)
    solo = alone(on, jobs)
    plain = alone(text_model, jobs)  # the base with no adapter machinery at all
    for k, ref in enumerate(refs):
        if ref is None:
            assert solo[k] == plain[k], k
    # The adapters do something: most adapter rows differ from the plain base.
    changed = [solo[k][0] != plain[k][0] for k, ref in enumerate(refs) if ref is not None]
    assert sum(changed) > len(changed) // 2

    finals = {k: updates[-1][3] for k, (_, updates) in solo.items()}
    for start in range(0, len(jobs), 16):
        chunk = range(start, min(start + 16, len(jobs)))
        static = served.run([jobs[i] for i in chunk], lambda r, c, t: None, lambda r: False,
                            adapters=[refs[i] for i in chunk])
        assert [r.output for r in static] == [finals[i] for i in chunk]
    for order_seed, max_rows, one_at_a_time in [(1, 6, False), (2, 16, True)]:
        assert joined(on, jobs, order_seed, max_rows, None, one_at_a_time) == solo, order_seed


def test_a_row_gets_exactly_peft_s_own_lora_update(served, text_checkpoint, adapter_refs):
    """The batched update is LoRA as peft computes it: the logits of rows on two adapters in one
    pass equal peft's forward with each adapter active on a model of its own."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    ids = torch.tensor([[5, 17, 40, 99, 7], [9, 33, 2, 60, 71]])
    served.adapters.ensure(adapter_refs[:2])
    route = served.adapters.route(adapter_refs[:2], "cpu")
    with torch.inference_mode(), served.adapters.routing(route):
        ours = served.model(input_ids=ids).logits
    for r, ref in enumerate(adapter_refs[:2]):
        reference = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(text_checkpoint), ref.path).eval()
        with torch.inference_mode():
            theirs = reference(input_ids=ids[r:r + 1]).logits
        assert torch.allclose(ours[r], theirs[0], atol=1e-5), r


def test_adapters_are_evicted_least_recently_used_but_never_while_in_use(served, adapter_refs):
    adapters = served.serve_adapters(max_loaded=2)
    base_bytes = served.nbytes
    job = text.Input(prompt="the quick fox", max_new_tokens=30, temperature=0)
    busy = served.engine(4)
    busy.add([served.sequence("a0", job, adapter_refs[0])])  # a running row on adapter 0
    assert adapters.keys() == [adapter_refs[0].key] and served.nbytes > base_bytes

    for ref in adapter_refs[1:]:
        idle = served.engine(1)
        idle.add([served.sequence("x", text.Input(prompt="a", max_new_tokens=1), ref)])
        assert not len(idle)
    # Adapter 0 stayed (its row runs); of the others only the most recent fits the bound.
    assert adapters.keys() == [adapter_refs[0].key, adapter_refs[3].key]
    assert adapters.evictions == 2

    # While every loaded adapter is in use the bound gives way, by the rows running.
    busy.add([served.sequence("a1", job, adapter_refs[1]), served.sequence("a2", job, adapter_refs[2])])
    assert set(adapters.keys()) == {adapter_refs[0].key, adapter_refs[1].key, adapter_refs[2].key}
    assert served.nbytes == served.base_nbytes + adapters.nbytes
    while len(busy):
        busy.step()
    del busy
    idle = served.engine(1)
    idle.add([served.sequence("y", text.Input(prompt="a", max_new_tokens=1), adapter_refs[3])])
    assert len(adapters) == 2


def test_an_adapter_that_is_not_plain_lora_is_refused(served, text_checkpoint, tmp_path):
    dora = AdapterRef("t:ft-dora", make_adapter(text_checkpoint, tmp_path / "dora", 4, ["c_attn"], seed=1,
                                                use_dora=True))
    engine = served.engine(1)
    with pytest.raises(AdapterRefused, match="DoRA"):
        engine.add([served.sequence("d", text.Input(prompt="a"), dora)])
    assert not len(engine) and len(served.adapters) == 0


def test_a_model_serving_no_adapters_refuses_a_row_on_one(text_model, adapter_refs):
    with pytest.raises(ValueError, match="serves no adapters"):
        text_model.engine(1).add([text_model.sequence("k", text.Input(prompt="a"), adapter_refs[0])])
