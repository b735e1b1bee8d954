"""Does continuous batching pay? Side by side, in one run, on one worker, on one job mix:

- sequential (batch 1), static batching (a batch runs to its longest job), and
  continuous batching (rows join and leave at each decode step), all through
  the running service (HTTP API -> queue -> worker -> storage);
- tokens/s, job latency (submit -> completed) p50/p99 for short and for long
  jobs, and time to the first streamed output p50/p99 (read from the job's
  live output as a client would; a static batch shows nothing before it ends,
  so its first output is its completion);
- time to first streamed token with an idle worker, over the SSE event
  stream, beside the model's own prefill time for the same prompt;
- service / bare engine: the same jobs, all queued at once, through the
  service and through the engine's own loop (no queue, no database), with the
  engine in the worker's process and in a process of its own
  (GENQ_ENGINE_PROCESS, the default; the worker restarted between), with the
  first streamed token again on the one the replay did not use;
- throughput as capacity: the same jobs all queued at once through the
  service, static and continuous (the Poisson replay's tokens/s is the
  offered load for a mode that keeps up with the arrivals);
- the bare engine against static batching as genq did it before the engine
  (transformers' generate() on batches of 8, each run to its longest job), the
  baseline the continuous-batching issue names.

    .venv/bin/python bench/continuous.py [--jobs 100] [--rate-factor 3] [--threads 1]
                                         [--checkpoint DIR] [--device cpu] [--dtype float32]

The mix is skewed like real traffic: four in five jobs short (16-32 new
tokens), one in five long (200-256), arriving as a Poisson stream (the same
arrival times and jobs for every mode) at --rate-factor times what batch 1
can serve, measured first with the bare engine. Greedy decoding, so every job
runs to its length and every mode makes the same tokens.

Uses Postgres and Redis on 127.0.0.1 when they answer (a database of its own),
else SQLite and the filesystem broker, like bench/batching.py.
"""
from __future__ import annotations

import argparse
import os
import random
import secrets
import statistics
import sys
import tempfile
import threading
import time
from contextlib import nullcontext
from pathlib import Path

import requests
import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.batching import Service, postgres_db, services_up  # noqa: E402
from genq.settings import DEFAULT_REGISTRY, Settings  # noqa: E402

MODES = ("sequential", "static", "continuous")
ROWS = 8


def write_registry(path: Path, pool: str, checkpoint: str | None, dtype: str) -> None:
    base = yaml.safe_load(DEFAULT_REGISTRY.read_text())["models"]["demo-text"]
    if checkpoint:
        base = {**base, "checkpoint": checkpoint, "limits": {**base["limits"], "max_prompt_chars": 2000}}
    base = {**base, "pool": pool, "dtype": dtype, "max_wait_ms": 20}
    models = {
        "text-sequential": {**base, "max_batch_size": 1, "batching": "static"},
        "text-static": {**base, "max_batch_size": ROWS, "batching": "static"},
        "text-continuous": {**base, "max_batch_size": ROWS, "batching": "continuous"},
    }
    path.write_text(yaml.safe_dump({"models": models}))


def job_mix(n: int, seed: int = 7) -> list[dict]:
    rnd = random.Random(seed)
    jobs = []
    for i in range(n):
        long_ = rnd.random() < 0.2
        tokens = rnd.randint(200, 256) if long_ else rnd.randint(16, 32)
        words = " ".join(rnd.choice(["the", "queue", "model", "a", "story", "of", "light", "river"])
                         for _ in range(rnd.randint(3, 12)))
        jobs.append({"prompt": f"Job {i}: {words}", "max_new_tokens": tokens, "temperature": 0, "seed": i})
    return jobs


def arrivals(n: int, rate: float, seed: int = 11) -> list[float]:
    rnd = random.Random(seed)
    t, out = 0.0, []
    for _ in range(n):
        out.append(t)
        t += rnd.expovariate(rate)
    return out


def pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q * (len(values) - 1))))]


class Bare:
    """The engine alone: the loaded model in this process, no queue."""

    def __init__(self, checkpoint_dir: Path, checkpoint: str | None, device: str, dtype: str):
        from models import text
        from models.demo import ensure_checkpoint

        path = checkpoint or ensure_checkpoint("demo:text", checkpoint_dir)
        self.model = text.load(path, device, dtype)
        self.text = text

    def inputs(self, jobs):
        return [self.text.Input.model_validate(j) for j in jobs]

    def sequential_seconds_per_token(self, jobs) -> float:
        """Batch 1 over a few jobs: what one job at a time costs per token."""
        inputs = self.inputs(jobs[:6])
        self.model.run(inputs[:1], lambda *a: None, lambda r: False)  # warm-up
        started, tokens = time.perf_counter(), 0
        for inp in inputs:
            tokens += self.model.run([inp], lambda *a: None, lambda r: False)[0].output["tokens"]
        return (time.perf_counter() - started) / tokens

    def continuous(self, jobs) -> tuple[float, int]:
        """All jobs queued at once, the engine's loop admitting as rows free."""
        engine = self.model.engine(ROWS, None)
        waiting = [self.model.sequence(i, inp) for i, inp in enumerate(self.inputs(jobs))]
        tokens = 0
        started = time.perf_counter()
        while waiting or len(engine):
            joining = []
            while waiting and len(engine) + len(joining) < ROWS:
                joining.append(waiting.pop(0))
            updates = (engine.add(joining) if joining else []) + (engine.step() if len(engine) else [])
            tokens += sum(u.output["tokens"] for u in updates if u.output is not None)
        return time.perf_counter() - started, tokens

    def static(self, jobs) -> tuple[float, int]:
        """The same jobs in static batches of ROWS, in order (finished rows leave the batch)."""
        inputs = self.inputs(jobs)
        tokens = 0
        started = time.perf_counter()
        for k in range(0, len(inputs), ROWS):
            tokens += sum(r.output["tokens"] for r in self.model.run(inputs[k:k + ROWS], lambda *a: None,
                                                                      lambda r: False))
        return time.perf_counter() - started, tokens

    def static_to_longest(self, jobs) -> tuple[float, int]:
        """Static batches as `generate()` ran them before continuous batching:
        every row decodes until the batch's longest job is done. Emulated on the
        engine by giving each row the batch's longest limit; only a job's own
        tokens count. A row that hits its end token still leaves early here
        (generate() kept it), so this errs in static's favour."""
        inputs = self.inputs(jobs)
        tokens = 0
        started = time.perf_counter()
        for k in range(0, len(inputs), ROWS):
            batch = inputs[k:k + ROWS]
            longest = max(i.max_new_tokens for i in batch)
            padded = [i.model_copy(update={"max_new_tokens": longest}) for i in batch]
            results = self.model.run(padded, lambda *a: None, lambda r: False)
            tokens += sum(min(r.output["tokens"], i.max_new_tokens) for r, i in zip(results, batch))
        return time.perf_counter() - started, tokens

    def generate_static(self, jobs) -> tuple[float, int]:
        """Static batches through transformers' own generate(), as genq ran text
        before the engine: the batch's prompts left-padded, every row decoding
        until the batch's longest job is done (min_new_tokens holds a row that
        would end early to the length generate() kept it running anyway); only
        a job's own tokens count."""
        import torch

        seqs = [self.model.sequence(i, inp) for i, inp in enumerate(self.inputs(jobs))]
        lm, pad = self.model.model, self.model.pad_id
        tokens = 0
        started = time.perf_counter()
        for k in range(0, len(seqs), ROWS):
            batch = seqs[k:k + ROWS]
            width, longest = max(len(s.prompt) for s in batch), max(s.limit for s in batch)
            ids = torch.full((len(batch), width), pad, dtype=torch.long)
            mask = torch.zeros((len(batch), width), dtype=torch.long)
            for r, s in enumerate(batch):
                ids[r, width - len(s.prompt):] = torch.tensor(s.prompt)
                mask[r, width - len(s.prompt):] = 1
            with torch.inference_mode():
                out = lm.generate(input_ids=ids.to(self.model.device), attention_mask=mask.to(self.model.device),
                                  max_new_tokens=longest, min_new_tokens=longest, do_sample=False,
                                  pad_token_id=pad)
            assert out.shape[1] == width + longest
            tokens += sum(s.limit for s in batch)
        return time.perf_counter() - started, tokens

    def step_seconds(self, rows: int, steps: int = 40) -> float:
        """One decode step's time with `rows` rows (short prompts, greedy)."""
        inp = self.text.Input.model_validate({"prompt": "a b c", "max_new_tokens": steps + 1, "temperature": 0})
        engine = self.model.engine(rows, None)
        engine.add([self.model.sequence(k, inp) for k in range(rows)])
        t = time.perf_counter()
        for _ in range(steps):
            engine.step()
        return (time.perf_counter() - t) / steps

    def prefill_seconds(self, prompt: str, repeats: int = 20) -> float:
        inp = self.text.Input.model_validate({"prompt": prompt, "max_new_tokens": 4, "temperature": 0})
        times = []
        for k in range(repeats):
            engine = self.model.engine(ROWS, None)
            t = time.perf_counter()
            engine.add([self.model.sequence(k, inp)])
            times.append(time.perf_counter() - t)
        return statistics.median(times)


class FirstOutput:
    """When each job's first live output appeared, read from genq.live as the
    API's event stream reads it."""

    def __init__(self, settings: Settings, tenant_id: str):
        from genq.live import live_for

        self.live = live_for(settings)
        self.tenant_id = tenant_id
        self.seen: dict[str, float] = {}

    def watch(self, job_id: str, deadline: float) -> None:
        def run():
            while time.monotonic() < deadline:
                if self.live.read(self.tenant_id, job_id, -1, 1.0):
                    self.seen[job_id] = time.monotonic()
                    return
        threading.Thread(target=run, daemon=True).start()


def replay(svc: Service, tenant_id: str, model: str, jobs: list[dict], times: list[float], stream: bool) -> dict:
    """Submit `jobs` at `times` (seconds from now) and wait for all of them."""
    first = FirstOutput(svc.settings, tenant_id) if stream else None
    submitted: dict[str, float] = {}
    ids: list[str] = [""] * len(jobs)
    t0 = time.monotonic()

    def post(i):
        delay = t0 + times[i] - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        r = requests.post(f"{svc.url}/v1/jobs", json={"model": model, "input": jobs[i]}, headers=svc.headers,
                          timeout=30)
        r.raise_for_status()
        ids[i] = r.json()["id"]
        submitted[ids[i]] = time.monotonic()
        if first:
            first.watch(ids[i], time.monotonic() + 600)

    threads = [threading.Thread(target=post, args=(i,)) for i in range(len(jobs))]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    done = svc.wait(ids)
    from datetime import datetime

    ts = lambda s: datetime.fromisoformat(s.replace("Z", "+00:00")).timestamp()  # noqa: E731
    tokens = sum(j["output"]["tokens"] for j in done)
    wall = max(ts(j["completed_at"]) for j in done) - min(ts(j["created_at"]) for j in done)
    latency = {j["id"]: ts(j["completed_at"]) - ts(j["created_at"]) for j in done}
    short = [latency[j["id"]] for j, inp in zip(done, jobs) if inp["max_new_tokens"] <= 32]
    long_ = [latency[j["id"]] for j, inp in zip(done, jobs) if inp["max_new_tokens"] > 32]
    if first:
        ttft = [first.seen[i] - submitted[i] for i in ids if i in first.seen]
    else:
        ttft = list(latency.values())
    return {"tokens": tokens, "rate": tokens / wall, "short": short, "long": long_, "ttft": ttft,
            "outputs": [j["output"]["text"] for j in done],
            "mean_rows": statistics.mean(j["metrics"]["batch_size"] for j in done)}


def sse_first_token(svc: Service, model: str, prompt: str, n: int) -> list[float]:
    """Idle worker: submit one job at a time and read its SSE event stream
    until the first `output` event; seconds from submit to it."""
    out = []
    for i in range(n):
        t = time.monotonic()
        r = requests.post(f"{svc.url}/v1/jobs", json={"model": model, "input": {
            "prompt": prompt, "max_new_tokens": 8, "temperature": 0, "seed": i}}, headers=svc.headers, timeout=30)
        r.raise_for_status()
        job_id = r.json()["id"]
        with requests.get(f"{svc.url}/v1/jobs/{job_id}/events", headers={**svc.headers, "Accept": "text/event-stream"},
                          stream=True, timeout=60) as resp:
            for line in resp.iter_lines(decode_unicode=True):
                if line == "event: output":
                    out.append(time.monotonic() - t)
                    break
                if line == "event: completed":
                    break
        svc.wait([job_id])
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--jobs", type=int, default=100)
    ap.add_argument("--rate-factor", type=float, default=3.0,
                    help="arrival rate as a multiple of batch 1's capacity (jobs/s)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads for the worker and the bare engine")
    ap.add_argument("--first-token-jobs", type=int, default=20)
    ap.add_argument("--checkpoint", help="a model directory (default: the demo text model)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--embedded", action="store_true", help="SQLite + filesystem broker even if services answer")
    ap.add_argument("--engine-process", action=argparse.BooleanOptionalAction, default=True,
                    help="run the Poisson replay and the first-token figure with the text engine in a process of "
                         "its own (GENQ_ENGINE_PROCESS, the default), or in the worker's (--no-engine-process); the "
                         "saturated service / bare figures run both ways regardless")
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import logging

    import torch

    logging.getLogger("werkzeug").setLevel(logging.WARNING)
    if args.threads:
        torch.set_num_threads(args.threads)
    home = Path(tempfile.mkdtemp(prefix="genq-bench-"))
    pool = f"bench-{secrets.token_hex(3)}"
    write_registry(home / "registry.yaml", pool, args.checkpoint, args.dtype)
    model_dir = Path(os.environ.get("GENQ_MODEL_DIR") or home / "models")
    use_services = services_up() and not args.embedded
    from genq.migrate import upgrade

    jobs = job_mix(args.jobs)
    bare = Bare(model_dir, args.checkpoint, args.device, args.dtype)
    per_token = bare.sequential_seconds_per_token(jobs)
    mean_tokens = statistics.mean(j["max_new_tokens"] for j in jobs)
    capacity = 1 / (per_token * mean_tokens)
    rate = args.rate_factor * capacity
    times = arrivals(len(jobs), rate)
    with (postgres_db() if use_services else nullcontext()) as pg:
        overrides = dict(home=home, registry_path=home / "registry.yaml", model_dir=model_dir, device=args.device,
                         progress_interval=1.0, log_level="WARNING", torch_threads=args.threads,
                         engine_process=args.engine_process)
        if use_services:
            from cryptography.fernet import Fernet

            overrides.update(database_url=pg, broker_url="redis://127.0.0.1:6379/0",
                             webhook_secret_keys=(Fernet.generate_key().decode(),))
        settings = Settings.from_env({}, **overrides)
        upgrade(settings.database_url)
        print(f"stack: {'Postgres + Redis' if use_services else 'SQLite + filesystem broker'}, local storage; "
              f"torch threads {args.threads}; {os.cpu_count()} cores; device {args.device} {args.dtype}", flush=True)
        print(f"mix: {len(jobs)} jobs, {sum(j['max_new_tokens'] > 32 for j in jobs)} long (200-256 tokens), the rest "
              f"16-32; batch 1 serves {capacity:.2f} jobs/s ({per_token * 1000:.1f} ms/token); Poisson arrivals at "
              f"{rate:.2f} jobs/s ({args.rate_factor}x) over {times[-1]:.1f}s; the text engine "
              f"{'in a process of its own' if args.engine_process else 'in the worker process'}", flush=True)
        svc = Service(settings, pool)
        try:
            tenant_id = tenant_of(svc)
            results = {}
            for mode in MODES:
                print(f"  running {mode} ...", flush=True)
                results[mode] = replay(svc, tenant_id, f"text-{mode}", jobs, times, stream=mode == "continuous")
            same = results["continuous"]["outputs"] == results["static"]["outputs"] == results["sequential"]["outputs"]
            print(f"\n{'mode':11} {'tokens/s':>9} {'vs static':>9} {'rows':>5} {'short p50':>10} {'short p99':>10} "
                  f"{'long p50':>9} {'long p99':>9} {'first p50':>10} {'first p99':>10}")
            st = results["static"]
            for mode, r in results.items():
                print(f"{mode:11} {r['rate']:>9.1f} {r['rate'] / st['rate']:>8.2f}x {r['mean_rows']:>5.1f} "
                      f"{statistics.median(r['short']):>9.2f}s {pct(r['short'], 0.99):>9.2f}s "
                      f"{statistics.median(r['long']):>8.2f}s {pct(r['long'], 0.99):>8.2f}s "
                      f"{statistics.median(r['ttft']):>9.3f}s {pct(r['ttft'], 0.99):>9.3f}s")
            c = results["continuous"]
            print(f"\ncontinuous / static: tokens/s {c['rate'] / st['rate']:.2f}x; short-job p50 latency "
                  f"{statistics.median(c['short']) / statistics.median(st['short']):.2f} of static's; "
                  f"same text in every mode: {same}")
            print("(static and sequential show no output before a job ends: their 'first' is the job's latency)")

            # Idle worker: submit -> first `output` event over SSE, beside the bare prefill.
            prompt = jobs[0]["prompt"]
            prefill = bare.prefill_seconds(prompt)
            firsts = sse_first_token(svc, "text-continuous", prompt, args.first_token_jobs)
            print(f"\nfirst streamed token, idle worker, {len(firsts)} jobs over SSE: p50 "
                  f"{statistics.median(firsts) * 1000:.1f} ms, p99 {pct(firsts, 0.99) * 1000:.1f} ms; the model's own "
                  f"prefill {prefill * 1000:.1f} ms: p50 {(statistics.median(firsts) - prefill) * 1000:.1f} ms above it")

            # Service / bare engine: the same jobs all queued at once, the worker held
            # meanwhile; with the engine in the worker's process (the default) and in a
            # process of its own (GENQ_ENGINE_PROCESS), the worker restarted between.
            sat, current = {}, args.engine_process
            for where, flag in (("in the worker", False), ("engine process", True)):
                if flag != current:
                    svc.restart_worker(GENQ_ENGINE_PROCESS=str(flag).lower())
                    current = flag
                sat[where] = saturated(svc, bare, jobs)
            if not args.engine_process:
                firsts_p = sse_first_token(svc, "text-continuous", prompt, args.first_token_jobs)
            s_seconds, s_tokens = bare.static(jobs)
            g_seconds, g_tokens = bare.static_to_longest(jobs)
            t_seconds, t_tokens = bare.generate_static(jobs)
            print(f"\nservice / bare engine (all {len(jobs)} jobs queued at once, {ROWS} rows; the bare engine run "
                  f"just before and just after, their mean):")
            for where, (svc_rate, static_rate, bare_before, bare_after) in sat.items():
                bare_rate = (bare_before + bare_after) / 2
                print(f"  {where:15} continuous {svc_rate:.1f} / bare {bare_rate:.1f} tokens/s = "
                      f"{svc_rate / bare_rate:.2f} (bare {bare_before:.1f} before, {bare_after:.1f} after); "
                      f"static through the service {static_rate:.1f}: continuous {svc_rate / static_rate:.2f}x")
            if not args.engine_process:
                print(f"first streamed token, idle worker, engine process: p50 {statistics.median(firsts_p) * 1000:.1f} ms, "
                      f"p99 {pct(firsts_p, 0.99) * 1000:.1f} ms; {(statistics.median(firsts_p) - prefill) * 1000:.1f} "
                      f"ms above the prefill")
            bare_runs = [r for _, _, *b in sat.values() for r in b]
            tokens, seconds = sum(bare_runs) / len(bare_runs), 1.0  # the bare engine's mean rate, tokens/s
            # What the engine alone allows: a decode step's cost by rows says how
            # much a full batch gains over static batches whose rows leave early.
            one, full = bare.step_seconds(1), bare.step_seconds(ROWS)
            print(f"bare engine, same jobs: continuous {tokens / seconds:.1f} tokens/s, static batches "
                  f"{s_tokens / s_seconds:.1f} ({tokens / seconds / (s_tokens / s_seconds):.2f}x); a decode step "
                  f"takes {one * 1000:.1f} ms with 1 row, {full * 1000:.1f} ms with {ROWS} "
                  f"({full / one:.1f}x the time for {ROWS}x the tokens)")
            print(f"bare engine, static batches whose rows all run to the batch's longest job, as generate() ran "
                  f"them: {g_tokens / g_seconds:.1f} tokens/s; continuous {tokens / seconds / (g_tokens / g_seconds):.2f}x")
            print(f"transformers' generate(), static batches of {ROWS} to the longest job (genq's text path before "
                  f"the engine): {t_tokens / t_seconds:.1f} tokens/s; continuous {tokens / seconds / (t_tokens / t_seconds):.2f}x")
        finally:
            svc.close()
    return 0


def saturated(svc: Service, bare: "Bare", jobs: list[dict]) -> tuple[float, float, float, float]:
    """The same jobs all queued at once through the service, continuous then
    static (throughput as capacity: the Poisson replay measures it only where
    the arrivals outrun the mode), and the bare engine on them just before and
    just after the service's continuous run (a machine whose load drifts moves
    both sides alike). Tokens/s: (continuous, static, bare before, bare after)."""
    from datetime import datetime

    ts = lambda s: datetime.fromisoformat(s.replace("Z", "+00:00")).timestamp()  # noqa: E731

    def rate(done):
        return sum(j["output"]["tokens"] for j in done) / (
            max(ts(j["completed_at"]) for j in done) - min(ts(j["started_at"]) for j in done))

    before_seconds, before_tokens = bare.continuous(jobs)
    with svc.held():
        ids = svc.submit("text-continuous", jobs)
    continuous = rate(svc.wait(ids))
    after_seconds, after_tokens = bare.continuous(jobs)
    with svc.held():
        ids = svc.submit("text-static", jobs)
    static = rate(svc.wait(ids))
    return continuous, static, before_tokens / before_seconds, after_tokens / after_seconds


def tenant_of(svc: Service) -> str:
    """The bench key's tenant (bench.batching.Service makes the key "bench")."""
    from sqlalchemy import select

    from genq.schema import Tenant

    with svc.engine.connect() as conn:
        return conn.scalar(select(Tenant.id).where(Tenant.name == "bench"))


if __name__ == "__main__":
    sys.exit(main())
