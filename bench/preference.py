"""Does preference tuning (DPO) teach the demo model a preference it did not
have, on pairs it never trained on? In one run, for method dpo (LoRA, the
reference is the adapter-disabled base) and dpo-full (all weights, the
reference a frozen copy):

- pairs where the preferred answer depends on the prompt: "<owner> dog says:"
  prefers " woof woof" to " meow meow", "<owner> cat says:" the reverse; 16
  training pairs, 8 held-out pairs with owners never trained on;
- the held-out preference accuracy (share of pairs whose chosen answer the
  model finds more likely than the rejected one) of the base model and of the
  tuned one, and the validation metrics the trainer reports on the way.

    .venv/bin/python bench/preference.py [--steps 200] [--methods dpo,dpo-full]

The base model finds one answer more likely whatever the animal, so its
accuracy is 0.5 by construction: the tuned model's must come from the prompt.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from models import finetune  # noqa: E402
from models.demo import ensure_checkpoint  # noqa: E402

SOUND = {"dog": " woof woof", "cat": " meow meow"}
# Learning rates found to work on the demo model for each method.
LEARNING_RATE = {"dpo": 5e-3, "dpo-full": 1e-3}


def pairs(owners: list[str]) -> finetune.Dataset:
    rows = [{"prompt": f"{owner} {animal} says:", "chosen": SOUND[animal], "rejected": SOUND[other]}
            for owner in owners for animal, other in (("dog", "cat"), ("cat", "dog"))]
    return finetune.Dataset(rows, "preference")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--methods", default="dpo,dpo-full")
    args = parser.parse_args()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    checkpoint = ensure_checkpoint("demo:text", Path(tempfile.gettempdir()) / "genq-bench-models")
    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    train = pairs(["The", "A", "Our", "My", "Your", "This", "His", "One"])
    held_out = pairs(["Her", "That", "Their", "Every"])
    base = finetune.preference_accuracy(AutoModelForCausalLM.from_pretrained(checkpoint).eval(), tokenizer, held_out)
    print(f"{len(train.rows)} training pairs, {len(held_out.rows)} held-out pairs, {args.steps} steps, batch 4")
    for method in args.methods.split(","):
        hp = {"max_steps": args.steps, "epochs": 100, "batch_size": 4, "learning_rate": LEARNING_RATE[method],
              "lora_rank": 16, "lora_alpha": 32, "beta": 0.1, "eval_every": max(args.steps // 4, 1)}
        evals: list[tuple[int, dict]] = []
        started = time.monotonic()
        result = finetune.train(
            checkpoint, train, finetune.Input(training_file="0" * 32, method=method, hyperparameters=hp), "cpu",
            resume=None, checkpoint_every=10**6, on_step=lambda *a, **k: None, save_checkpoint=lambda *a: None,
            is_cancelled=lambda: False, validation=held_out, on_eval=lambda step, m: evals.append((step, m)))
        took = time.monotonic() - started
        out = Path(tempfile.mkdtemp())
        for name, data in result.files.items():
            (out / name).write_bytes(data)
        if method == "dpo":
            from peft import PeftModel

            tuned = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(checkpoint), str(out))
        else:
            tuned = AutoModelForCausalLM.from_pretrained(str(out))
        after = finetune.preference_accuracy(tuned.eval(), tokenizer, held_out)
        curve = ", ".join(f"step {s}: {m['validation_preference_accuracy']:.2f}" for s, m in evals)
        print(f"{method:8s} held-out accuracy {base:.2f} (base) -> {after:.2f} (tuned) in {took:.0f}s; "
              f"validation accuracy {curve}; final validation loss {evals[-1][1]['validation_loss']:.3f}")


if __name__ == "__main__":
    main()
