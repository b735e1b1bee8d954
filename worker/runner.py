"""The worker's run loop: doorbell → claim a batch under a lease → load the model
(cached) → run → store outputs → finish each job under its lease.

The running batch itself (its rows, their stop reasons, the tracker, and what
becomes of each job) is worker/batch.py; a fine-tune goes to the trainer
(worker/training.py), which build_runner hands the runner.

This is the one place that catches broadly: whatever a model or storage
raises is recorded on the jobs it concerned, in words a user can act on.
"""
from __future__ import annotations

import logging
import os
import socket
import time
import uuid
from typing import Callable

from sqlalchemy.orm import Session, sessionmaker

from genq import catalog
from genq import jobs as joblib
from genq import pools as poollib
from genq import tracing
from genq.errors import GenqError
from genq.outage import retry
from genq.schema import Job
from genq.settings import Settings
from genq.states import JobStatus, JobType
from genq.storage import NotFound, Storage, file_key, job_key
from models.base import InputInvalid, Result
from models.registry import ModelSpec, Registry
from worker import metrics as prom
from worker.batch import NO_RESULT, BatchTracker, Phase, Row, Verdict, error_for, verdicts
from worker.cache import ModelCache
from worker.continuous import ContinuousBatch
from worker.executions import ExecutionLog
from worker.shutdown import Shutdown

log = logging.getLogger(__name__)

# A draining worker waits this long before ringing a doorbell again for
# another worker, so that alone on its queue it does not spin on one message.
DRAIN_HANDBACK_SECONDS = 1.0

# Runs one fine-tune: (runner, base model, pool, the pool's head) -> jobs run (0 or 1).
Trainer = Callable[["Runner", ModelSpec, str, joblib.Head], int]


def worker_name(node: str = "") -> str:
    """A lease owner: "<Celery node name or host>:<pid>:<random>". The part
    before the first colon names the worker in /v1/admin/workers."""
    return f"{node or socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"


class Runner:
    def __init__(
        self,
        settings: Settings,
        sessions: sessionmaker[Session],
        registry: Registry,
        storage: Storage,
        cache: ModelCache,
        train: Trainer,
        owner: str | None = None,
        shutdown: Shutdown | None = None,
        ring: Callable[[str, str], object] | None = None,
        live=None,
    ):
        self.settings = settings
        self.sessions = sessions
        self.registry = registry
        self.storage = storage
        self.cache = cache
        self.owner = owner or worker_name(settings.worker_name)
        self.shutdown = shutdown or Shutdown()
        # Rings a pool's doorbell for a job (job id, pool). Without it, jobs
        # handed back wait for the reconciler's next round.
        self.ring = ring or (lambda job_id, pool: None)
        # Fine-tunes are not batches of the model's own: they go to the trainer.
        self.train = train
        self.executions = ExecutionLog(settings.execution_log, self.owner)
        # The span of the batch running now (genq.tracing; None while traces are
        # off): each job finished links to it, from whichever thread finishes it.
        self.batch_span = None
        # Where running jobs publish their output as it grows (genq.live).
        self._live = live

    @property
    def live(self):
        if self._live is None:
            from genq.live import live_for

            self._live = live_for(self.settings)
        return self._live

    # --- entry points -------------------------------------------------------

    def on_doorbell(self, job_id: str) -> int:
        """Handle one Celery message: serve the pool of the job it names.
        Returns how many jobs ran; 0 for a stale or duplicate message (the job
        is no longer queued), or on a draining worker, which rings the doorbell
        again for another worker of the pool."""
        # One read says both whether there is anything to do and whether this
        # worker may: the head's read is the next (two before the claim).
        with self.sessions() as session:
            pool = joblib.queued_pool(session, job_id)
            draining = pool is not None and self._draining(session)
        if pool is None:
            log.debug("doorbell for job %s: nothing to claim", job_id, extra={"job_id": job_id})
            return 0
        if draining:
            log.info("doorbell for job %s: draining, claiming nothing; ringing again for another worker", job_id,
                     extra={"job_id": job_id})
            time.sleep(DRAIN_HANDBACK_SECONDS)
            self.ring(job_id, pool)
            return 0
        ran = self.serve(pool, drain_checked=True)
        if self.shutdown.requested:
            # Stopping: what this doorbell rang for may still be queued; ring
            # for it now rather than leave it to the reconciler's grace period.
            self.ring_if_queued(job_id)
        return ran

    def serve(self, pool: str, drain_checked: bool = False) -> int:
        """Run the pool's jobs a batch at a time until none is queued. The
        doorbell names one job, but each batch is built around the pool's first
        job in line (genq.line: tenants take turns, each tenant's jobs by
        priority then age), whatever its model or batch key, and filled with
        the next jobs in line that can share its forward pass; after each
        batch the line's head is read again. A fine-tune runs alone. A
        shutdown, or an operator's drain, stops it between batches: the one in
        hand finishes. `drain_checked`: the caller has just read the drain flag."""
        ran = 0
        check_drain = not drain_checked
        while True:
            if self.shutdown.requested:
                log.info("shutting down: claiming no more jobs of pool %s", pool)
                return ran
            with self.sessions() as session:
                head = joblib.pool_head(session, pool)
                if head is None:
                    return ran
                if check_drain and self._draining(session):
                    log.info("draining: claiming no more jobs of pool %s", pool)
                    return ran
                spec = catalog.resolve(session, self.registry, head.model)
            check_drain = True
            if spec is not None and head.batch_model != head.model:
                # A LoRA fine-tune served as an adapter: the batch runs on its base,
                # with the base's jobs and those of its other adapters.
                spec = self.registry.get(head.batch_model)
            if spec is None:
                self._fail_unknown_model(pool, head.model, head.batch_key, head.batch_model)
                continue
            if head.type == JobType.FINE_TUNE.value:
                done = self.train(self, spec, pool, head)
            else:
                try:
                    # Load before claiming: a lease should not tick away on a load.
                    loaded = self.cache.get(spec)
                except Exception as exc:
                    if self.shutdown.requested:
                        # Maybe the shutdown itself (a cold one raises wherever this
                        # thread is): the queued jobs did nothing wrong.
                        raise
                    self._fail_queued(spec, pool, head.batch_key, exc)
                    continue
                if self.cache.last_load_seconds is not None and self.draining():
                    # A load takes seconds to minutes: a drain asked meanwhile counts.
                    return ran
                if getattr(spec.module, "ADAPTERS", False) and hasattr(loaded, "serve_adapters"):
                    loaded.serve_adapters(self.settings.max_adapters)
                if spec.batching == "continuous" and hasattr(loaded, "engine"):
                    running = ContinuousBatch(self, spec, pool, head, loaded)
                    # Jobs join a continuous batch as it runs: its span links
                    # to none of them; each job's span links to it.
                    with tracing.batch_span(spec.name, pool) as self.batch_span:
                        done = running.run()
                    stored = running.stored_ok
                else:
                    batch = self.claim(spec, pool, head)
                    stored = True
                    if batch:
                        with tracing.batch_span(spec.name, pool, [j.trace_context for j in batch]) as self.batch_span:
                            stored = self.run_batch(spec, batch, loaded)
                    done = len(batch)
                self.batch_span = None
                if not stored:
                    # Storage is down: what could not be stored went back to the
                    # queue and was rung for; claiming the same jobs straight
                    # back would only spend their attempts.
                    return ran + done
            if not done:
                return ran
            ran += done

    def draining(self) -> bool:
        """An operator asked this worker to drain (/v1/admin/workers/<name>/drain)."""
        with self.sessions() as session:
            return self._draining(session)

    def _draining(self, session: Session) -> bool:
        return poollib.is_draining(session, self.settings.worker_name)

    def claim(self, spec: ModelSpec, pool: str, head: joblib.Head) -> list[Job]:
        """A batch built around the pool's head: it first, then the next jobs
        in line of its model and batch key."""
        batch_key = head.batch_key
        with self.sessions.begin() as session:
            batch = joblib.claim_batch(
                session, pool=pool, first=head.id, model=spec.name, batch_key=batch_key, limit=spec.max_batch_size,
                owner=self.owner, lease_seconds=self.settings.lease_seconds,
            )
        deadline = time.monotonic() + spec.max_wait_ms / 1000
        # A part-full batch waits a little for company: the forward pass costs
        # nearly the same for one row as for several. A job on a later attempt
        # runs alone (claim_batch), so it gets none.
        alone = bool(batch) and batch[0].attempts > 1
        while (batch and not alone and len(batch) < spec.max_batch_size and time.monotonic() < deadline
               and not self.shutdown.requested):
            time.sleep(min(0.01, max(deadline - time.monotonic(), 0)))
            try:
                with self.sessions.begin() as session:
                    batch += joblib.claim_batch(
                        session, pool=pool, model=spec.name, batch_key=batch_key,
                        limit=spec.max_batch_size - len(batch), owner=self.owner,
                        lease_seconds=self.settings.lease_seconds, top_up=True,
                    )
            except Exception as exc:
                # The jobs in hand are ours under their lease: run them rather than
                # strand them until it lapses for want of company.
                log.warning("topping up the batch of %s failed (%s); running the %d job(s) claimed",
                            spec.name, exc, len(batch))
                break
        return batch

    # --- one batch ----------------------------------------------------------

    def run_batch(self, spec: ModelSpec, batch: list[Job], loaded) -> bool:
        """Run one batch to its end and write what became of each job. Returns
        False when some outputs could not be stored (their jobs went back to
        the queue)."""
        rows = [Row(job) for job in batch]
        # What progress counts: tokens for text out, denoising steps otherwise (a family may say).
        unit = getattr(spec.module, "PROGRESS_UNIT", "token" if spec.family == "text-generation" else "step")
        log.info("running batch of %d %s jobs: %s", len(rows), spec.name, [j.id for j in batch],
                 extra={"job_ids": [j.id for j in batch], "model": spec.name})
        prom.BATCH_SIZE.labels(spec.name).observe(len(rows))
        for r in rows:
            if r.job.started_at and r.job.created_at:
                prom.QUEUE_SECONDS.labels(spec.name).observe((r.job.started_at - r.job.created_at).total_seconds())
        inputs, runnable, invalid, refs = [], [], [], []
        memo: dict = {}
        for r in rows:
            try:
                inp = spec.validate(r.job.input)
            except InputInvalid as exc:
                # Validated at submit; only a registry change can make it fail here.
                invalid.append((r, JobStatus.FAILED, {"error": {"code": getattr(exc, "code", "invalid_input"), "message": str(exc)}}))
                continue
            try:
                ref = self.adapter_ref(spec, r.job, memo)
                if ref is not None:
                    # Refused here, it fails this job alone; the batch's adapters so far stay loaded.
                    loaded.adapters.ensure([x for x in refs if x is not None] + [ref])
            except Exception as exc:
                invalid.append((r, JobStatus.FAILED, {"error": error_for(exc, default_code="model_load_failed")}))
                continue
            try:
                inputs.append(self.attach_files(spec, inp))
                runnable.append(r)
                refs.append(ref)
            except Exception as exc:
                invalid.append((r, JobStatus.FAILED, {"error": {"code": "input_file_unavailable", "message": str(exc)}}))
        self.finish(invalid)
        if not runnable:
            return True
        load_seconds = self.cache.last_load_seconds
        tracker = None
        results: list[Result | None] | None = None
        error: dict | None = None  # the batch's, when the model raised
        started = time.monotonic()
        try:
            # Set-up is inside the try too: a cold shutdown raises from its signal
            # handler wherever the main thread is, and a batch claimed but not yet
            # running must be handed back like one cut short in the model.
            tracker = BatchTracker(self, runnable, unit)
            for r in runnable:
                self.started(r)
            try:
                # A cancel that came between the claim and now keeps its row out of the forward pass.
                tracker.poll_cancels()
            except Exception as exc:
                if self.shutdown.requested:
                    raise
                # Reading the flags is not the batch's work: a database blip here must not
                # fail it. The tracker reads them again at its next tick.
                log.warning("could not read cancel requests before batch %s (%s); reading them while it runs",
                            [r.job.id for r in runnable], exc)
            started = time.monotonic()
            if any(refs):
                results = loaded.run(inputs, tracker.on_progress, tracker.is_cancelled, adapters=refs)
            else:
                results = loaded.run(inputs, tracker.on_progress, tracker.is_cancelled)
            if len(results) != len(runnable):
                raise GenqError(f"model returned {len(results)} results for {len(runnable)} jobs")
        except Exception as exc:
            results, error = None, error_for(exc)
            if self.shutdown.requested:
                log.warning("batch interrupted by the shutdown (%s: %s); handing its jobs back", type(exc).__name__, exc)
            else:
                log.exception("batch of %s failed", spec.name, extra={"job_ids": [r.job.id for r in runnable]})
        run_seconds = time.monotonic() - started
        for _ in runnable:
            prom.RUN_SECONDS.labels(spec.name).observe(run_seconds)
        # The tracker stops before anything below writes, so no job is finished twice.
        if tracker is not None:
            tracker.close()
        metrics = {"run_seconds": round(run_seconds, 4), "batch_size": len(runnable)}
        if load_seconds is not None:
            metrics["model_load_seconds"] = round(load_seconds, 4)
        # Storage that is down is waited for, within half the lease (renewed at
        # most a third of a lease ago) for the whole batch; what it cannot take
        # by then goes back to the queue.
        store_until = time.monotonic() + self.settings.lease_seconds / 2
        outcomes, back, unstored = [], [], []
        for i, (r, verdict) in enumerate(zip(runnable, verdicts(runnable, results, self.shutdown.requested))):
            if verdict is Verdict.NONE:
                continue  # cancelled mid-run by its owner, already written
            elif verdict is Verdict.DROP:
                if r.settle():
                    self.executions.ended(r.job.id, r.job.attempts, "lease_lost", at=r.stopped_at)
            elif verdict is Verdict.HAND_BACK:
                back.append(r)
            elif verdict is Verdict.CANCEL:
                outcomes.append((r, JobStatus.CANCELED, {}))
            elif verdict is Verdict.FAIL:
                outcomes.append((r, JobStatus.FAILED, {"error": error if results is None else NO_RESULT}))
            else:
                try:
                    output = retry(lambda: self.store(r.job.id, results[i]),
                                   within=max(store_until - time.monotonic(), 0),
                                   what=f"storing the outputs of job {r.job.id}")
                except Exception as exc:
                    log.exception("storing the outputs of job %s failed; handing it back", r.job.id,
                                  extra={"job_id": r.job.id})
                    unstored.append((r, exc))
                    continue
                queued = (r.job.started_at - r.job.created_at).total_seconds()
                outcomes.append((r, JobStatus.SUCCEEDED, {"output": output,
                                                          "metrics": {"queue_seconds": round(queued, 4), **metrics}}))
        self.hand_back(back)
        self.not_stored(unstored)
        self.finish(outcomes)
        return not unstored

    def not_stored(self, failed: list[tuple[Row, Exception]]) -> None:
        """Jobs whose outputs could not be stored did nothing wrong: they go
        back to the queue and another worker is rung. The attempt counts, so a
        storage that stays down ends a job after max_attempts rather than
        passing it around for ever; on the last one it fails, saying why."""
        last = [(r, JobStatus.FAILED, {"error": {
            "code": "storage_error",
            "message": f"could not store the outputs on its last attempt ({r.job.attempts} of {r.job.max_attempts}): "
                       f"{exc}"}})
            for r, exc in failed if r.job.attempts >= r.job.max_attempts]
        self.finish(last)
        self.hand_back([r for r, _ in failed if r.job.attempts < r.job.max_attempts], counted=True,
                       reason="its outputs could not be stored; queued again, the attempt counted")

    def adapter_ref(self, spec: ModelSpec, job: Job, memo: dict):
        """The LoRA adapter `job` runs on, on the loaded base `spec` (a
        text_adapters.AdapterRef), or None for the base's own job. Its files
        are fetched from storage once per machine; its version is resolved for
        the job's own tenant, as at submit. `memo` keeps what a batch resolved."""
        if job.model == spec.name:
            return None
        key = (job.model, job.tenant_id)
        if key not in memo:
            from models.checkpoints import adapter_dir
            from models.text_adapters import AdapterRef

            with self.sessions() as session:
                version = catalog.resolve(session, self.registry, job.model, job.tenant_id)
            if version is None or version.adapter_of != spec.name:
                raise GenqError(f"model {job.model!r} is no longer a fine-tune of {spec.name!r} served here",
                                code="unknown_model")
            path = adapter_dir(version, self.settings.model_dir, self.storage)
            memo[key] = AdapterRef(f"{version.name}|{version.checkpoint}", str(path))
        return memo[key]

    def attach_files(self, spec: ModelSpec, inp):
        """The input with the files it names read from storage, for families
        that take them (image-to-image's `image`); others' inputs as they are."""
        attach = getattr(spec.module, "attach_files", None)
        if attach is None:
            return inp

        def read(file_id: str) -> bytes:
            try:
                return self.storage.get(file_key(file_id))
            except NotFound:
                raise ValueError(f"input file {file_id} is gone (deleted since the job was queued)") from None

        return attach(inp, read)

    def store(self, job_id: str, result: Result) -> dict:
        """Put a result's files at deterministic keys and point the output at them."""
        keys = {}
        for name, (data, content_type) in result.files.items():
            key = job_key(job_id, name)
            self.storage.put(key, data, content_type)
            keys[name] = key
        return _swap_files(result.output, keys)

    def started(self, row: Row) -> None:
        row.phase = Phase.EXECUTING
        self.executions.started(row.job.id, row.job.attempts)

    def finish(self, outcomes: list[tuple[Row, JobStatus, dict]]) -> None:
        """Write final states in one transaction; each counts only where this
        worker still holds that job's lease. A database that is down is waited
        for, up to a lease: past that the jobs are another worker's anyway."""
        if not outcomes:
            return
        executing = [row.settle() for row, _, _ in outcomes]

        def write() -> dict[str, bool]:
            events: list[dict] = []
            with self.sessions.begin() as session:
                done = {row.job.id: joblib.finish(session, row.job.id, self.owner, status, progress=row.progress,
                                                  webhook=bool(row.job.webhook), events=events, **fields)
                        for row, status, fields in outcomes}
                # The batch's events in one statement (after the deliveries' own writes).
                joblib.record_events(session, events)
                return done

        try:
            done = retry(write, within=self.settings.lease_seconds, what=f"finishing {len(outcomes)} job(s)")
        except Exception:
            for (row, _, _), ran in zip(outcomes, executing):
                if ran:
                    self.executions.ended(row.job.id, row.job.attempts, "not_written")
            raise
        for (row, status, fields), ran in zip(outcomes, executing):
            if ran:
                self.executions.ended(row.job.id, row.job.attempts, status.value if done[row.job.id] else "not_written")
            if done[row.job.id]:
                prom.JOBS_FINISHED.labels(row.job.model, row.job.pool, status.value).inc()
                if status is JobStatus.SUCCEEDED:
                    prom.count_output(row.job.model, fields.get("output"))
                # The job's span joins the trace of the request that created it.
                with tracing.job_span(row.job, status.value, fields.get("error"), self.batch_span):
                    log.info("job %s %s", row.job.id, status.value, extra={"job_id": row.job.id})
            else:
                log.warning("job %s: lease lost before it finished; result discarded", row.job.id,
                            extra={"job_id": row.job.id})

    def hand_back(self, rows: list[Row], counted: bool = False,
                  reason: str = "its worker shut down; queued again, attempt not counted") -> None:
        """Jobs stopped here through no fault of their own go back to the
        queue, and their pool's doorbell rings for another worker. A shutdown
        does not count the attempt; `counted` does (genq.jobs.hand_back)."""
        if not rows:
            return
        for r in rows:
            # Before the commit: no other worker can start them until it lands.
            if r.settle():
                self.executions.ended(r.job.id, r.job.attempts, "handed_back", at=r.stopped_at)

        def write() -> list[str]:
            with self.sessions.begin() as session:
                return joblib.hand_back(session, [r.job.id for r in rows], self.owner, reason, counted=counted)

        back = retry(write, within=self.settings.lease_seconds, what=f"handing back {len(rows)} job(s)")
        log.info("handed jobs %s back to the queue: %s", back, reason)
        for r in rows:
            if r.job.id in back:
                self.ring(r.job.id, r.job.pool)

    def ring_if_queued(self, job_id: str) -> None:
        with self.sessions() as session:
            job = session.get(Job, job_id)
            if job is not None and job.status == JobStatus.QUEUED.value:
                self.ring(job.id, job.pool)

    # --- failures before a claim ------------------------------------------------

    def _fail_unknown_model(self, pool: str, model: str, batch_key: str, batch_model: str) -> None:
        error = {"code": "unknown_model", "message": f"model {model!r} is no longer in this worker's registry"}
        self._fail_all_queued(pool, batch_model, batch_key, error, only_model=model)

    def _fail_queued(self, spec: ModelSpec, pool: str, batch_key: str, exc: Exception) -> None:
        """The model cannot load: fail the waiting jobs with the reason rather
        than leave them queued forever."""
        log.exception("loading model %s failed", spec.name)
        self._fail_all_queued(pool, spec.name, batch_key, error_for(exc, default_code="model_load_failed"))

    def _fail_all_queued(self, pool: str, model: str, batch_key: str, error: dict,
                         only_model: str | None = None) -> None:
        # claim_batch takes a job on a later attempt alone: go on until none is left.
        while True:
            with self.sessions.begin() as session:
                batch = joblib.claim_batch(session, pool=pool, model=model, batch_key=batch_key, limit=1000,
                                           owner=self.owner, lease_seconds=self.settings.lease_seconds,
                                           only_model=only_model)
            if not batch:
                return
            self.finish([(Row(job), JobStatus.FAILED, {"error": error}) for job in batch])


def _swap_files(value, keys: dict[str, str]):
    if isinstance(value, dict):
        out = {k: _swap_files(v, keys) for k, v in value.items()}
        if "file" in out and out["file"] in keys:
            out["key"] = keys[out.pop("file")]
        return out
    if isinstance(value, list):
        return [_swap_files(v, keys) for v in value]
    return value
