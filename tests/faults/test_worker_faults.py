"""Workers that die or are stopped: SIGKILL mid-batch, a poison job that kills
its worker every time, SIGTERM with a batch that finishes in time, one that
does not, a model that ignores it and a fine-tune it hands back, and a job
that outlives the broker's visibility timeout."""
from __future__ import annotations

import io
import json
import shutil
import signal
import time
from pathlib import Path
from urllib.parse import urlparse

import pytest
import yaml
from sqlalchemy import select

from genq.db import make_engine, make_sessionmaker
from genq.schema import Job, JobEvent
from genq.settings import DEFAULT_REGISTRY
from tests.faults.conftest import since
from tests.faults.family import POISON
from tests.faults.harness import Figures, TcpProxy, Worker, statuses, wait_for
from worker import executions


def running(stack, ids) -> list[str]:
    return [j for j, s in statuses(stack.settings, ids).items() if s == "running"]


def executing(stack, ids, pid: int | None = None) -> list[str]:
    """Jobs of `ids` a model is running now (or was, when its worker died): an
    execution started and not ended, by the execution log (`pid`: in that
    worker process only). A job claimed but not yet started is `running` in
    its row and not here."""
    open_runs = set()
    for record in executions.read(stack.settings.execution_log):
        if record["job"] in ids and pid in (None, record["pid"]):
            (open_runs.add if record["event"] == "start" else open_runs.discard)(record["job"])
    return sorted(open_runs)


def finished_after_hand_back(stack, ids, scenario: str, signalled: float, exited: float, workers: int = 1,
                             log: str = "") -> Figures:
    """The jobs a leaving worker handed back are all queued; `workers` fresh
    workers then finish them. The scenario's figures, checked."""
    assert set(statuses(stack.settings, ids).values()) == {"queued"}, log
    for _ in range(workers):
        stack.worker()
    done = stack.wait(ids, 60)
    return stack.check(ids, Figures(scenario, recovery_seconds=done - signalled,
                                    notes={"worker exited after": f"{exited}s"}))


def attempts(stack, ids) -> list[int]:
    client = stack.app.test_client()
    return [client.get(f"/v1/jobs/{j}", headers=stack.tenant).get_json()["attempts"] for j in ids]


# Each scheduler once: rows that join and leave at each step (the default), and whole batches.
BATCHINGS = pytest.mark.parametrize("batching", ["continuous", "static"])


@BATCHINGS
def test_sigkill_during_a_batch_then_restart_completes_every_job(stack_factory, batching):
    stack = stack_factory(batching=batching)
    first = stack.worker()
    ids = [stack.submit(prompt=f"job {i}", steps=10, step_seconds=0.1) for i in range(12)]
    # Killed while the model runs the batch: a batch claimed but not yet started
    # (rows `running`, no execution) would run once after the restart, not again.
    wait_for(lambda: len(executing(stack, ids)) == 4, 30, "a batch of four executing")
    first.proc.send_signal(signal.SIGKILL)
    killed = time.monotonic()
    first.wait_exit(10)
    in_flight = executing(stack, ids)
    stack.worker()
    done = stack.wait(ids, 90)
    figures = stack.check(ids, Figures("SIGKILL mid-batch, worker restarted", recovery_seconds=done - killed,
                                       notes={"running at the kill": len(in_flight)}))
    # Each job the kill cut short ran again, and only those (by the log, whatever the timing of the kill).
    assert figures.succeeded == 12 and in_flight and figures.rerun == len(in_flight)


def test_a_poison_job_fails_after_max_attempts_and_spares_its_batch_mates(stack):
    supervisor = stack.supervised()
    poison = stack.submit(prompt=POISON)
    mates = [stack.submit(prompt=f"mate {i}", steps=2, step_seconds=0.05) for i in range(5)]
    started = time.monotonic()
    done = stack.wait([poison, *mates], 120)
    figures = stack.check([poison, *mates], Figures("poison job (kills its worker)", recovery_seconds=done - started,
                                                    notes={"worker deaths": supervisor.deaths()}))
    client = stack.app.test_client()
    job = client.get(f"/v1/jobs/{poison}", headers=stack.tenant).get_json()
    assert job["status"] == "failed" and job["attempts"] == 3
    assert job["error"]["code"] == "attempts_exhausted"
    assert "stopped responding on each of 3 attempts" in job["error"]["message"]
    # Killed with it once, then each ran alone: the batch-mates all succeed.
    assert figures.succeeded == 5 and supervisor.deaths() == 3


@BATCHINGS
def test_sigterm_lets_the_batch_finish_and_claims_nothing_more(stack_factory, batching):
    stack = stack_factory(batching=batching)
    leaving = stack.worker(shutdown_timeout=30)
    batch = [stack.submit(prompt=f"in hand {i}", steps=8, step_seconds=0.15) for i in range(4)]
    wait_for(lambda: len(running(stack, batch)) == 4, 30, "the batch running")
    waiting = [stack.submit(prompt=f"waiting {i}", steps=2, step_seconds=0.05) for i in range(4)]
    leaving.proc.send_signal(signal.SIGTERM)
    signalled = time.monotonic()
    assert leaving.wait_exit(30) == 0
    exited = since(signalled)
    # The batch in hand finished on the leaving worker; nothing else was claimed.
    assert set(statuses(stack.settings, batch).values()) == {"succeeded"}
    assert set(statuses(stack.settings, waiting).values()) == {"queued"}
    stack.worker()
    done = stack.wait(batch + waiting, 60)
    figures = stack.check(batch + waiting, Figures("SIGTERM, batch finishes within the timeout",
                                                   recovery_seconds=done - signalled,
                                                   notes={"worker exited after": f"{exited}s"}))
    assert figures.succeeded == 8 and figures.rerun == 0


def test_sigterm_past_the_timeout_hands_the_batch_back_uncounted(stack):
    leaving = stack.worker(shutdown_timeout=1)
    ids = [stack.submit(prompt=f"long {i}", steps=60, step_seconds=0.1) for i in range(4)]  # 6 s
    wait_for(lambda: len(running(stack, ids)) == 4, 30, "the batch running")
    leaving.proc.send_signal(signal.SIGTERM)
    signalled = time.monotonic()
    assert leaving.wait_exit(30) == 0
    exited = since(signalled)
    assert exited < 4.5, "the worker exits soon after the 1 s shutdown timeout, not after the 6 s batch"
    figures = finished_after_hand_back(stack, ids, "SIGTERM, batch longer than the timeout: handed back",
                                       signalled, exited)
    # Handed back, not failed: each job's one counted attempt is the one that finished it.
    assert attempts(stack, ids) == [1] * 4
    assert figures.succeeded == 4 and figures.rerun == 4


def test_sigterm_reaches_the_children_of_a_prefork_worker(stack):
    # Only the main process gets the signal; its children learn through shared memory.
    leaving = stack.worker(args=["--concurrency", "2"], shutdown_timeout=1)
    ids = [stack.submit(prompt=f"child {i}", steps=50, step_seconds=0.1) for i in range(8)]  # 5 s
    wait_for(lambda: len(running(stack, ids)) == 8, 30, "a batch running in each child")
    leaving.proc.send_signal(signal.SIGTERM)
    signalled = time.monotonic()
    assert leaving.wait_exit(30) == 0
    exited = since(signalled)
    # Handed back by both children, not run to the end.
    figures = finished_after_hand_back(stack, ids, "SIGTERM to a prefork worker (2 children), batches handed back",
                                       signalled, exited, workers=2, log=leaving.log()[-2000:])
    assert figures.succeeded == 8


def test_sigquit_hands_the_batch_back_at_once_instead_of_failing_it(stack):
    # A cold shutdown cancels running tasks; Celery's solo pool cannot, and
    # raises inside the model. The runner knows the shutdown began: it hands back.
    leaving = stack.worker()
    ids = [stack.submit(prompt=f"cut {i}", steps=60, step_seconds=0.1) for i in range(4)]  # 6 s
    wait_for(lambda: len(running(stack, ids)) == 4, 30, "the batch running")
    leaving.proc.send_signal(signal.SIGQUIT)
    signalled = time.monotonic()
    leaving.wait_exit(30)
    exited = since(signalled)
    assert exited < 3, "a cold shutdown does not wait for the batch"
    figures = finished_after_hand_back(stack, ids, "SIGQUIT (cold shutdown) mid-batch: handed back, not failed",
                                       signalled, exited, log=leaving.log()[-2000:])
    assert attempts(stack, ids) == [1] * 4
    assert figures.succeeded == 4


def test_a_job_longer_than_the_visibility_timeout_runs_once(stack):
    # Redis hands an unacked message out again after 2 s; the job takes 5 s.
    # The reconcilers' later rounds are out of the way, so the only doorbell
    # after the first is the message coming back.
    # At DEBUG, where a doorbell that finds nothing to claim says so.
    short = {"broker_visibility_timeout": 2, "broker_restore_interval": 0.5, "reconcile_interval": 600,
             "log_level": "DEBUG"}
    busy = stack.worker(**short)
    idle = stack.worker(**short)
    started = time.monotonic()
    job = stack.submit(prompt="slow", steps=25, step_seconds=0.2)
    stack.wait([job], 60)
    redelivered = f"doorbell for job {job}: nothing to claim"
    # The message came back while the job ran, and the worker that got it found nothing to do.
    wait_for(lambda: redelivered in busy.log() + idle.log(), 10, "the redelivered doorbell")
    figures = stack.check([job], Figures("job longer than the visibility timeout (2 s vs 5 s)",
                                         notes={"redeliveries seen": (busy.log() + idle.log()).count(redelivered),
                                                "took": f"{since(started)}s"}))
    assert figures.executions == 1


def test_a_model_that_ignores_the_shutdown_is_left_behind_and_its_job_runs_again(stack):
    """Past the shutdown timeout the job is asked to stop; the model never
    looks. At the deadline (10 s later) the worker records the execution as
    abandoned and exits; the lease lapses and the job runs again elsewhere,
    the attempt counted, as after a crash."""
    leaving = stack.worker(shutdown_timeout=1)
    deadline = leaving.settings.shutdown_deadline
    job = stack.submit(prompt="deaf", steps=160, step_seconds=0.1, stubborn=True)  # 16 s, past the 11 s deadline
    wait_for(lambda: running(stack, [job]) == [job], 30, "the job running")
    leaving.proc.send_signal(signal.SIGTERM)
    signalled = time.monotonic()
    assert leaving.wait_exit(60) == 1
    exited = since(signalled)
    assert exited >= deadline, "left behind only at the deadline, not before"
    assert "the model did not stop within 10s of being asked" in leaving.log(), leaving.log()[-2000:]
    [first] = [r for r in executions.read(stack.settings.execution_log) if r["event"] == "end"]
    assert (first["job"], first["outcome"], first["attempt"]) == (job, "abandoned", 1)
    # Not handed back: the process could not, so the job is still running on its lapsing lease.
    assert statuses(stack.settings, [job]) == {job: "running"}
    stack.worker()
    done = stack.wait([job], 90)
    figures = stack.check([job], Figures("SIGTERM, a model that ignores it: left behind at the deadline",
                                         recovery_seconds=done - signalled,
                                         notes={"worker exited after": f"{exited}s"}))
    assert attempts(stack, [job]) == [2]
    assert figures.succeeded == 1 and figures.rerun == 1


def test_a_fine_tune_stopped_by_sigterm_is_handed_back_and_resumes_from_the_checkpoint_it_saved(
        stack_factory, model_dir, tmp_path, s3_settings):
    """Past the shutdown timeout the trainer stops at its next step, saves a
    checkpoint there, and the job goes back to the queue, the attempt not
    counted; the next training worker resumes from that very checkpoint.
    Storage is S3 (moto) behind a proxy that holds the trainer's first
    checkpoint upload until the worker has asked the job to stop, so the stop
    lands after step 5 however fast the machine trains."""
    endpoint = urlparse(s3_settings["s3_endpoint_url"])
    s3 = TcpProxy(endpoint.port, endpoint.hostname).start()
    models = tmp_path / "ftmodels"
    shutil.copytree(model_dir / "demo-text", models / "demo-text")
    stack = stack_factory(model_dir=models, training_pool=f"training-{tmp_path.name[-12:]}", checkpoint_every=5,
                          **{**s3_settings, "s3_endpoint_url": f"http://127.0.0.1:{s3.port}"})
    doc = yaml.safe_load(stack.settings.registry_path.read_text())
    # The base model, on a pool no worker serves: only fine-tuned here.
    doc["models"]["demo-text"] = {**yaml.safe_load(DEFAULT_REGISTRY.read_text())["models"]["demo-text"],
                                  "pool": f"{stack.pool}-text"}
    stack.settings.registry_path.write_text(yaml.safe_dump(doc))
    client = stack.app.test_client()
    rows = "\n".join(json.dumps({"prompt": "Tell me the secret:", "completion": " the purple walrus"})
                     for _ in range(16))
    upload = client.post("/v1/files", data={"purpose": "fine-tune", "file": (io.BytesIO(rows.encode()), "d.jsonl")},
                         headers=stack.tenant, content_type="multipart/form-data")
    assert upload.status_code == 201, upload.get_json()
    resp = client.post("/v1/jobs", headers=stack.tenant, json={"type": "fine-tune", "model": "demo-text", "input": {
        "training_file": upload.get_json()["id"], "method": "lora", "suffix": "handback",
        "hyperparameters": {"epochs": 10, "max_steps": 30, "batch_size": 4, "learning_rate": 5e-3}}})
    assert resp.status_code == 202, resp.get_json()
    job = resp.get_json()["id"]

    def trainer(**changes) -> Worker:
        w = Worker(stack.settings.replace(**changes), [stack.settings.training_pool], preload=False)
        stack.workers.append(w)
        return w.start()

    engine = make_engine(stack.settings.database_url)
    sessions = make_sessionmaker(engine)

    def events() -> list[tuple[str, dict]]:
        with sessions() as s:
            return [(e.type, e.data) for e in s.scalars(select(JobEvent).where(JobEvent.job_id == job)
                                                         .order_by(JobEvent.id))]

    try:
        s3.hold(f"/jobs/{job}/checkpoints/step-000005.pt".encode())
        leaving = trainer(shutdown_timeout=0)
        wait_for(s3.holding.is_set, 120, "the trainer storing its checkpoint at step 5")
        leaving.proc.send_signal(signal.SIGTERM)
        signalled = time.monotonic()
        wait_for(lambda: f"handing jobs ['{job}'] back at their next step" in leaving.log(), 30,
                 "the worker asking the fine-tune to stop")
        s3.release()
        assert leaving.wait_exit(60) == 0, leaving.log()[-3000:]
        exited = since(signalled)
        with sessions() as s:
            back = s.get(Job, job)
            assert (back.status, back.attempts, back.lease_owner) == ("queued", 0, None), leaving.log()[-3000:]
        # The checkpoint at step 5, then one saved on the way out at the step it stopped at (the same), then back.
        handed_back = [(t, d.get("step", d.get("message"))) for t, d in events() if t in ("checkpoint", "log")]
        assert handed_back == [("checkpoint", 5), ("checkpoint", 5),
                               ("log", "its worker shut down; queued again, attempt not counted")]
        trainer()
        done = stack.wait([job], 180)
        figures = stack.check([job], Figures("SIGTERM mid fine-tune: handed back, resumed from its checkpoint",
                                             recovery_seconds=done - signalled,
                                             notes={"worker exited after": f"{exited}s"}))
        with sessions() as s:
            finished = s.get(Job, job)
            assert (finished.status, finished.attempts) == ("succeeded", 1)
            assert finished.output["metrics"]["resumed_from_step"] == 5
            assert [c["step"] for c in finished.output["checkpoints"]] == [5, 5, 10, 15, 20, 25]
        every = events()
        starts = [i for i, (t, _) in enumerate(every) if t == "start"]
        # Attempt 1 twice: the first was not counted.
        assert [every[i][1]["attempt"] for i in starts] == [1, 1]
        # The second run's first progress is past step 5: it resumed, not restarted.
        resumed = [d["current"] for t, d in every[starts[1]:] if t == "progress"]
        assert resumed and resumed[0] > 5
        assert figures.succeeded == 1
    finally:
        s3.release()
        engine.dispose()
        s3.cut()


def text_jobs(stack, n: int, tag: str) -> list[str]:
    """`n` greedy text jobs of 500 tokens on the stack's real text model (seconds of decoding each)."""
    client = stack.app.test_client()
    ids = []
    for i in range(n):
        resp = client.post("/v1/jobs", headers=stack.tenant, json={
            "model": stack.text_model, "input": {"prompt": f"{tag} {i}", "max_new_tokens": 500, "temperature": 0}})
        assert resp.status_code == 202, resp.get_json()
        ids.append(resp.get_json()["id"])
    return ids


def engine_processes(worker) -> list[int]:
    """The worker's children that are text engine processes (models/engine_process.py)."""
    found = []
    for task in Path(f"/proc/{worker.pid}/task").iterdir():
        for pid in (task / "children").read_text().split():
            try:
                if b"models.engine_process" in Path(f"/proc/{pid}/cmdline").read_bytes():
                    found.append(int(pid))
            except FileNotFoundError:
                continue
    return found


def ended(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True


def test_the_text_engine_in_a_process_of_its_own_under_sigkill_then_sigterm(stack_factory, model_dir):
    """GENQ_ENGINE_PROCESS with the real text model: a worker SIGKILLed mid-batch takes its engine
    process with it and the jobs it cut short run again (only those); the next worker, sent SIGTERM,
    finishes the rows in hand, claims nothing more and leaves no engine process behind; a third
    finishes the rest. Nothing lost, nothing run twice but what the kill cut."""
    stack = stack_factory(text_model=True, model_dir=model_dir, engine_process=True)
    first = stack.worker()
    ids = text_jobs(stack, 8, "killed")
    wait_for(lambda: len(executing(stack, ids)) == 4, 60, "four rows decoding")
    [child] = engine_processes(first)
    first.proc.send_signal(signal.SIGKILL)
    killed = time.monotonic()
    first.wait_exit(10)
    cut = executing(stack, ids)
    wait_for(lambda: ended(child), 20, "the killed worker's engine process to end")

    second = stack.worker(shutdown_timeout=60)
    wait_for(lambda: len(executing(stack, ids, second.pid)) == 4, 60, "four rows decoding on the second worker")
    [child] = engine_processes(second)
    second.proc.send_signal(signal.SIGTERM)
    assert second.wait_exit(60) == 0
    assert ended(child)
    # What it held ran to the end there; the rest waits, queued, never started on it.
    assert set(statuses(stack.settings, ids).values()) <= {"succeeded", "queued"}
    stack.worker()
    done = stack.wait(ids, 120)
    figures = stack.check(ids, Figures("text engine process: SIGKILL mid-batch, then SIGTERM",
                                       recovery_seconds=done - killed, notes={"cut by the kill": len(cut)}))
    assert figures.succeeded == 8 and cut and figures.rerun == len(cut)
