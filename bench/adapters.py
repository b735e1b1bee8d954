"""Many LoRA fine-tunes of one base: served as adapters on the loaded base
(rows of different adapters in one batch), or each as a merged model of its
own, with the same model-cache budget. Side by side, in one run:

- throughput: 16 LoRA fine-tunes of the demo text base (as tenants' fine-tunes
  are: versions in the database, adapter files in storage), 64 jobs spread over
  them (4 each, queued in random order), drained by one worker's runner in this
  process (real claims, leases, storage, model cache; SQLite), continuous
  batching at up to 16 rows. "adapters": the jobs' batch model is the base, so
  jobs of every adapter share its batches. "merged": each fine-tune's jobs run
  on its own merged model (the way genq served them before), the cache holding
  what the adapters need, base + 16 adapters: about one merged model, so each
  switch loads the next one. Both start cold (the merged checkpoints and the
  adapter files are already on local disk, as after a first use).
- memory: the base with its 16 adapters loaded, as the cache counts it
  (parameters and buffers), beside base + 16 x the adapter's file size; and the
  process's resident memory growth while the 16 adapters loaded.

    .venv/bin/python bench/adapters.py [--adapters 16] [--jobs 64] [--tokens 32] [--rows 16]
                                       [--rank 8] [--rounds 2] [--threads 1]

The machine is shared: the two modes are interleaved in rounds (alternating
which goes first) and the ratio is the median of each round's ratio.
"""
from __future__ import annotations

import argparse
import random
import secrets
import statistics
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from genq import catalog  # noqa: E402
from genq import jobs as joblib  # noqa: E402
from genq.db import make_engine, make_sessionmaker  # noqa: E402
from genq.keys import get_or_create_tenant  # noqa: E402
from genq.migrate import upgrade  # noqa: E402
from genq.schema import Job, ModelVersion  # noqa: E402
from genq.settings import Settings  # noqa: E402
from genq.storage import make_storage  # noqa: E402


def rss() -> int:
    with open("/proc/self/statm") as f:
        import os

        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def make_adapters(checkpoint: str, root: Path, n: int, rank: int) -> list[Path]:
    """`n` LoRA adapters of the base as genq's fine-tunes make them (all linear layers), random weights."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    out = []
    for i in range(n):
        torch.manual_seed(i)
        model = get_peft_model(AutoModelForCausalLM.from_pretrained(checkpoint),
                               LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.0, target_modules="all-linear",
                                          init_lora_weights=False, task_type="CAUSAL_LM"))
        model.save_pretrained(root / f"adapter-{i}")
        out.append(root / f"adapter-{i}")
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--adapters", type=int, default=16)
    ap.add_argument("--jobs", type=int, default=64)
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--rows", type=int, default=16)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()

    import logging

    logging.basicConfig(level=logging.WARNING)
    import torch

    torch.set_num_threads(args.threads)
    from models import checkpoints
    from models import text
    from models.demo import ensure_checkpoint
    from models.registry import Registry
    from worker.build import build_runner

    tmp = Path(tempfile.mkdtemp(prefix="genq-bench-adapters-"))
    model_dir = tmp / "models"
    checkpoint = ensure_checkpoint("demo:text", model_dir)
    url = f"sqlite:///{tmp / 'bench.db'}"
    upgrade(url)
    pool = "lora-bench"
    entry = {"family": "text-generation", "checkpoint": "demo:text", "pool": pool, "max_batch_size": args.rows,
             "batching": "continuous", "limits": {"max_new_tokens": args.tokens}}
    (tmp / "registry.yaml").write_text(yaml.safe_dump({"models": {"demo-text": entry}}))

    print(f"building {args.adapters} LoRA adapters (rank {args.rank}, all linear layers) of the demo text base ...")
    adapter_dirs = make_adapters(checkpoint, tmp / "made", args.adapters, args.rank)
    adapter_file = (adapter_dirs[0] / "adapter_model.safetensors").stat().st_size
    base_loaded = text.load(checkpoint, "cpu", "float32")
    base_bytes = base_loaded.base_nbytes
    del base_loaded
    budget = base_bytes + args.adapters * adapter_file

    def settings_for() -> Settings:
        return Settings.from_env({}, home=tmp / "home", registry_path=tmp / "registry.yaml", database_url=url,
                                 device="cpu", model_dir=model_dir, storage_url=(tmp / "storage").as_uri(),
                                 lease_seconds=120, max_adapters=args.adapters, model_cache_bytes=budget,
                                 torch_threads=args.threads)

    settings = settings_for()
    sessions = make_sessionmaker(make_engine(url))
    storage = make_storage(settings)
    registry = Registry.load(settings.registry_path)
    names = []
    with sessions.begin() as session:
        tenants = [get_or_create_tenant(session, f"tenant-{i}").id for i in range(args.adapters)]
    for i, d in enumerate(adapter_dirs):
        prefix = f"models/{tenants[i]}/ft-{i}"
        for f in d.iterdir():
            storage.put(f"{prefix}/{f.name}", f.read_bytes(), "application/octet-stream")
        name = catalog.version_name("demo-text", f"t{i}", secrets.token_hex(8))
        with sessions.begin() as session:
            session.add(ModelVersion(tenant_id=tenants[i], name=name, base_model="demo-text",
                                     family="text-generation", method="lora", storage_prefix=prefix,
                                     job_id=secrets.token_hex(8)))
        names.append(name)
    # As after a first use of each: adapter files and merged checkpoints on local disk.
    with sessions() as session:
        specs = [catalog.resolve(session, registry, n) for n in names]
    for spec in specs:
        checkpoints.adapter_dir(spec, model_dir, storage)
        checkpoints.resolve(spec, model_dir, storage)

    rng = random.Random(7)
    plan = [(k % args.adapters, {"prompt": f"job {k}: " + " ".join(rng.choice(["the", "queue", "model", "a", "story",
                                                                                "of", "light", "river"])
                                                                     for _ in range(rng.randint(3, 10))),
                                 "max_new_tokens": args.tokens, "temperature": 0, "seed": k})
            for k in range(args.jobs)]
    rng.shuffle(plan)

    def run(mode: str) -> dict:
        ids = []
        with sessions.begin() as session:
            for i, inp in plan:
                spec = specs[i]
                ids.append(joblib.submit(session, tenant_id=tenants[i], type_="text-generation", model=spec.name,
                                         pool=pool, batch_key=spec.batch_key(spec.validate(inp)), input_=inp,
                                         batch_model=spec.batch_model if mode == "adapters" else spec.name).id)
        runner = build_runner(settings_for())  # a cold model cache
        before = rss()
        started = time.monotonic()
        ran = 0
        while ran < len(ids):
            ran += runner.on_doorbell(ids[0]) or runner.serve(pool)
        took = time.monotonic() - started
        with sessions() as session:
            jobs = list(session.scalars(joblib.select(Job).where(Job.id.in_(ids))))
        assert all(j.status == "succeeded" for j in jobs), [j.error for j in jobs if j.status != "succeeded"][:3]
        tokens = sum(j.output["tokens"] for j in jobs)
        out = {"seconds": took, "tokens": tokens, "jobs": len(jobs),
               "batch": statistics.mean(j.metrics["batch_size"] for j in jobs),
               "loads": runner.cache.misses, "texts": {j.id: j.output["text"] for j in jobs}, "order": ids}
        if mode == "adapters":
            loaded = next(iter(runner.cache._loaded.values()))
            out["nbytes"], out["adapters"] = loaded.nbytes, len(loaded.adapters)
            out["rss_growth"] = rss() - before
            # What a running batch adds while a LoRA layer computes: its rows' adapter weights for
            # that layer, stacked (text_adapters._Group), at most one layer's at a time.
            from models.text_adapters import AdapterRef

            keys = loaded.adapters.keys()
            route = loaded.adapters.route([AdapterRef(keys[k % len(keys)], "") for k in range(args.rows)], "cpu")
            out["gathered"] = max(sum(t.numel() * t.element_size() for g in groups for t in g.As + g.Bs)
                                  for groups in route.layers.values())
        return out

    rounds = []
    for r in range(args.rounds):
        order = ("adapters", "merged") if r % 2 == 0 else ("merged", "adapters")
        got = {mode: run(mode) for mode in order}
        rounds.append(got)
        a, m = got["adapters"], got["merged"]
        print(f"round {r + 1}: adapters {a['tokens'] / a['seconds']:.0f} tok/s ({a['jobs'] / a['seconds']:.1f} jobs/s, "
              f"mean batch {a['batch']:.1f}, {a['loads']} model load(s)); merged {m['tokens'] / m['seconds']:.0f} "
              f"tok/s ({m['jobs'] / m['seconds']:.1f} jobs/s, mean batch {m['batch']:.1f}, {m['loads']} model loads)")

    ratio = statistics.median((g["adapters"]["tokens"] / g["adapters"]["seconds"])
                              / (g["merged"]["tokens"] / g["merged"]["seconds"]) for g in rounds)
    last = rounds[-1]
    same = sum(ta == tm for ta, tm in zip([last["adapters"]["texts"][i] for i in last["adapters"]["order"]],
                                          [last["merged"]["texts"][i] for i in last["merged"]["order"]]))
    print()
    print(f"{args.jobs} jobs x {args.tokens} tokens over {args.adapters} LoRA fine-tunes, cache budget "
          f"{budget / 1e6:.1f} MB (base + {args.adapters} adapters), {args.threads} torch thread(s)")
    print(f"throughput, mixed-adapter batches / each adapter merged: {ratio:.2f}x   (target >= 3x)")
    print(f"  outputs the same text in both modes: {same} of {args.jobs} (merging rounds the weights differently)")
    a = last["adapters"]
    limit = base_bytes + args.adapters * adapter_file
    print(f"memory, base + {a['adapters']} adapters loaded: {a['nbytes'] / 1e6:.2f} MB (parameters and buffers)")
    print(f"  base + {args.adapters} x adapter file ({adapter_file / 1e3:.0f} kB): {limit / 1e6:.2f} MB; "
          f"ratio {a['nbytes'] / limit:.3f}   (target <= 1.10)")
    print(f"  a step of {args.rows} rows on these adapters stacks its rows' weights one LoRA layer at a time: "
          f"at most {a['gathered'] / 1e6:.2f} MB, dropped after the layer")
    print(f"  resident memory growth during the adapters' run (base load, 16 adapters, batches): "
          f"{a['rss_growth'] / 1e6:.1f} MB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
