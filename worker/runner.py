"""The worker's run loop: doorbell → claim a batch under a lease → load the model
(cached) → run → store outputs → finish each job under its lease.

This is the one place that catches broadly: whatever a model or storage
raises is recorded on the jobs it concerned, in words a user can act on.
"""
from __future__ import annotations

import logging
import os
import socket
import threading
import time
import uuid
from dataclasses import dataclass
from typing import Any, Callable

from sqlalchemy.orm import Session, sessionmaker

from genq import catalog
from genq import jobs as joblib
from genq import pools as poollib
from genq.errors import GenqError
from genq.outage import retry
from genq.schema import Job
from genq.settings import Settings
from genq.states import JobStatus
from genq.storage import Storage, job_key
from models.base import InputInvalid, Result
from models.registry import ModelSpec, Registry
from worker import metrics as prom
from worker.cache import ModelCache
from worker.executions import ExecutionLog
from worker.shutdown import Shutdown

log = logging.getLogger(__name__)

# The batch key of fine-tune jobs: never batched, one per claim.
FINE_TUNE = "fine-tune"
# A batch whose leases could not be renewed for this share of the lease stops
# its jobs, so they are no longer running here by the time the lease lapses
# and another worker may take them; the rest of the lease is the model's time
# to reach its next step.
LEASE_SAFE_SHARE = 0.8


def worker_name(node: str = "") -> str:
    """A lease owner: "<Celery node name or host>:<pid>:<random>". The part
    before the first colon names the worker in /v1/admin/workers."""
    return f"{node or socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"


@dataclass
class Row:
    """One job's place in a running batch."""

    job: Job
    progress: dict[str, Any] | None = None
    progress_dirty: bool = False
    # Asked to stop at the model's next step: by its owner, or for one of the two below.
    cancelled: bool = False
    finished: bool = False
    # The worker is shutting down: stop and go back to the queue, uncounted.
    handing_back: bool = False
    # The lease is gone (or could not be renewed in time): stop, write nothing.
    lost: bool = False
    # An execution was recorded as started, and when the model saw the stop (wall clock).
    executing: bool = False
    stopped_at: float | None = None


class BatchTracker:
    """Progress, cancel checks, lease renewal and shutdown for one running batch.

    The model calls on_progress / is_cancelled from its inner loop, many times
    a second, so they only touch memory. A side thread does the database work
    off the model's path: it writes progress at most once per
    `progress_interval`, reads cancel flags every `cancel_poll_interval`
    (finishing a cancelled job at once, so its batch-mates run on) and renews
    the leases, so a long step cannot let them lapse. The same thread stops
    rows whose lease is lost, and every row once a shutdown has waited
    GENQ_SHUTDOWN_TIMEOUT for the batch."""

    def __init__(self, runner: "Runner", rows: list[Row], unit: str, finish_cancelled: bool = True):
        self.runner = runner
        self.rows = rows
        self.unit = unit
        # Inference rows are finished the moment their cancel is seen; a
        # trainer finishes its own, after saving a last checkpoint.
        self.finish_cancelled = finish_cancelled
        # When the last renewal that succeeded was sent (the claim, at first).
        self._lease_ok = time.monotonic()
        # Failures in a row of each piece of the side thread's work, for the log.
        self._failures: dict[str, int] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="batch-tracker", daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=30)

    def on_progress(self, row: int, current: int, total: int, **extra) -> None:
        r = self.rows[row]
        r.progress = {"current": int(current), "total": int(total), "unit": self.unit, **extra}
        r.progress_dirty = True

    def is_cancelled(self, row: int) -> bool:
        r = self.rows[row]
        if r.cancelled and r.stopped_at is None:
            r.stopped_at = time.time()  # the model knows now, and stops spending on the row
        return r.cancelled

    def _loop(self) -> None:
        s = self.runner.settings
        tick = max(min(s.cancel_poll_interval, s.progress_interval), 0.02)
        renew_every = max(s.lease_seconds / 3, tick)
        last_progress = last_renew = time.monotonic()
        while not self._stop.wait(tick):
            now = time.monotonic()
            self.check_shutdown()
            self.check_lease(now)
            # Each piece of work fails alone: a progress write the database
            # refuses must not skip the renewal beside it, or the lease lapses
            # and a live worker's job is queued again as if the worker had died.
            self._beat("reading cancel requests", self.poll_cancels)
            if now - last_progress >= s.progress_interval:
                last_progress = now
                self._beat("writing progress", self.flush_progress)
            if now - last_renew >= renew_every:
                last_renew = now
                self._beat("renewing leases", self.renew)

    def _beat(self, what: str, work: Callable[[], None]) -> None:
        """Run one piece of the loop's work; a failure is logged and the work
        tried again at its next beat (progress: the next report is written).
        The first failure in a row is logged with its trace, then one line
        every 100, so a failure lasting hours does not flood the log."""
        try:
            work()
        except Exception as exc:
            failures = self._failures.get(what, 0) + 1
            self._failures[what] = failures
            if failures == 1:
                log.exception("batch tracker: %s failed; trying again at its next beat", what)
            elif failures % 100 == 0:
                log.error("batch tracker: %s has failed %d times in a row: %s", what, failures, exc)
        else:
            if self._failures.pop(what, 0):
                log.info("batch tracker: %s works again", what)

    def live(self) -> list[Row]:
        return [r for r in self.rows if not r.finished and not r.lost and not r.handing_back]

    def check_shutdown(self) -> None:
        runner, settings = self.runner, self.runner.settings
        if runner.shutdown.past(settings.shutdown_deadline):
            # The model has not come back from its step: nothing more can be
            # done in this process. Record that the jobs stop running here, and go.
            for r in self.rows:
                if r.executing and not r.finished:
                    runner.executions.ended(r.job.id, r.job.attempts, "abandoned")
            log.error("shutdown: the model did not stop within %.0fs of being asked; exiting now, "
                      "the leases of jobs %s will lapse and they will be queued again",
                      settings.shutdown_deadline - settings.shutdown_timeout, [r.job.id for r in self.rows if not r.finished])
            logging.shutdown()
            os._exit(1)
        live = self.live()
        if live and runner.shutdown.past(settings.shutdown_timeout):
            log.warning("shutdown: batch still running %.0fs after the signal; handing jobs %s back at their next step",
                        settings.shutdown_timeout, [r.job.id for r in live])
            for r in live:
                r.handing_back = r.cancelled = True

    def check_lease(self, now: float) -> None:
        lease = self.runner.settings.lease_seconds
        live = [r for r in self.rows if not r.finished and not r.lost]
        if live and now - self._lease_ok > LEASE_SAFE_SHARE * lease:
            log.warning("could not renew the lease on jobs %s for %.1fs of %ss; stopping them before it lapses",
                        [r.job.id for r in live], now - self._lease_ok, lease)
            for r in live:
                r.lost = r.cancelled = True

    def poll_cancels(self) -> None:
        live = [r for r in self.rows if not r.finished and not r.cancelled]
        if not live:
            return
        with self.runner.sessions() as session:
            flagged = joblib.cancel_requested(session, [r.job.id for r in live])
        for r in live:
            if r.job.id in flagged:
                r.cancelled = True
                if self.finish_cancelled:
                    self.runner.finish([(r, JobStatus.CANCELED, {})])

    def flush_progress(self) -> None:
        dirty = [r for r in self.rows if r.progress_dirty and not r.finished and not r.lost]
        if not dirty:
            return
        with self.runner.sessions.begin() as session:
            for r in dirty:
                r.progress_dirty = False
                joblib.set_progress(session, r.job.id, self.runner.owner, r.progress)

    def renew(self) -> None:
        rows = [r for r in self.rows if not r.finished and not r.lost]
        if not rows:
            return
        sent = time.monotonic()
        with self.runner.sessions.begin() as session:
            held = joblib.renew_leases(session, [r.job.id for r in rows], self.runner.owner,
                                       self.runner.settings.lease_seconds)
        self._lease_ok = sent
        if lost := [r for r in rows if r.job.id not in held]:
            log.warning("lost the lease on jobs %s; stopping them, their results will not be written",
                        [r.job.id for r in lost])
            for r in lost:
                r.lost = r.cancelled = True


class Runner:
    def __init__(
        self,
        settings: Settings,
        sessions: sessionmaker[Session],
        registry: Registry,
        storage: Storage,
        cache: ModelCache,
        owner: str | None = None,
        shutdown: Shutdown | None = None,
        ring: Callable[[str, str], object] | None = None,
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
        self.executions = ExecutionLog(settings.execution_log, self.owner)

    # --- entry points -------------------------------------------------------

    def on_doorbell(self, job_id: str) -> int:
        """Handle one Celery message: serve the pool of the job it names.
        Returns how many jobs ran; 0 for a stale or duplicate message (the job
        is no longer queued)."""
        with self.sessions() as session:
            pool = joblib.queued_pool(session, job_id)
        if pool is None:
            log.info("doorbell for job %s: nothing to claim", job_id, extra={"job_id": job_id})
            return 0
        if self.draining():
            log.info("doorbell for job %s: draining, claiming nothing", job_id, extra={"job_id": job_id})
            return 0
        ran = self.serve(pool)
        if self.shutdown.requested:
            # Stopping: what this doorbell rang for may still be queued; ring
            # for it now rather than leave it to the reconciler's grace period.
            self.ring_if_queued(job_id)
        return ran

    def serve(self, pool: str) -> int:
        """Run the pool's jobs a batch at a time until none is queued. The
        doorbell names one job, but each batch is built around the pool's first
        job in line (genq.line: tenants take turns, each tenant's jobs by
        priority then age), whatever its model or batch key, and filled with
        the next jobs in line that can share its forward pass; after each
        batch the line's head is read again. A fine-tune runs alone. A
        shutdown, or an operator's drain, stops it between batches: the one in
        hand finishes."""
        ran = 0
        while True:
            if self.shutdown.requested:
                log.info("shutting down: claiming no more jobs of pool %s", pool)
                return ran
            with self.sessions() as session:
                head = joblib.pool_head(session, pool)
                spec = head and catalog.resolve(session, self.registry, head.model)
            if head is None:
                return ran
            if spec is None:
                self._fail_unknown_model(pool, head.model, head.batch_key)
                continue
            if head.batch_key == FINE_TUNE:
                from worker.training import train_one

                if self.draining():
                    return ran
                done = train_one(self, spec, pool, head)
            else:
                try:
                    # Load before claiming: a lease should not tick away on a load.
                    loaded = self.cache.get(spec)
                except Exception as exc:
                    self._fail_queued(spec, pool, head.batch_key, exc)
                    continue
                if self.draining():
                    return ran
                batch = self.claim(spec, pool, head)
                if batch:
                    self.run_batch(spec, batch, loaded)
                done = len(batch)
            if not done:
                return ran
            ran += done

    def draining(self) -> bool:
        with self.sessions() as session:
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

    def run_batch(self, spec: ModelSpec, batch: list[Job], loaded) -> None:
        rows = [Row(job) for job in batch]
        unit = "token" if spec.family == "text-generation" else "step"
        log.info("running batch of %d %s jobs: %s", len(rows), spec.name, [j.id for j in batch],
                 extra={"job_ids": [j.id for j in batch], "model": spec.name})
        prom.BATCH_SIZE.labels(spec.name).observe(len(rows))
        for r in rows:
            if r.job.started_at and r.job.created_at:
                prom.QUEUE_SECONDS.labels(spec.name).observe((r.job.started_at - r.job.created_at).total_seconds())
        inputs, runnable, invalid = [], [], []
        for r in rows:
            try:
                inputs.append(spec.validate(r.job.input))
                runnable.append(r)
            except InputInvalid as exc:
                # Validated at submit; only a registry change can make it fail here.
                invalid.append((r, JobStatus.FAILED, {"error": {"code": "invalid_input", "message": str(exc)}}))
        self.finish(invalid)
        if not runnable:
            return
        load_seconds = self.cache.last_load_seconds
        tracker = None
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
            results = loaded.run(inputs, tracker.on_progress, tracker.is_cancelled)
            if len(results) != len(runnable):
                raise GenqError(f"model returned {len(results)} results for {len(runnable)} jobs")
        except Exception as exc:
            if self.interrupted_by_shutdown(runnable, exc):
                results = [None] * len(runnable)
            else:
                log.exception("batch of %s failed", spec.name, extra={"job_ids": [r.job.id for r in runnable]})
                error = error_for(exc)
                results = None
        run_seconds = time.monotonic() - started
        prom.RUN_SECONDS.labels(spec.name).observe(run_seconds)
        # The tracker stops before anything below writes, so no job is finished twice.
        if tracker is not None:
            tracker.close()
        outcomes, back = [], []
        for r, result in zip(runnable, results or [None] * len(runnable)):
            if r.finished:
                continue  # cancelled mid-run by its owner, already written
            if r.lost:
                self.executions.ended(r.job.id, r.job.attempts, "lease_lost", at=r.stopped_at)
                continue
            if results is None:
                outcomes.append((r, JobStatus.FAILED, {"error": error}))
                continue
            if result is None and r.handing_back:
                back.append(r)
                continue
            if result is None or (r.cancelled and not r.handing_back):
                outcomes.append((r, JobStatus.CANCELED, {}))
                continue
            # Done (even if a shutdown asked it to stop after its last step): keep it.
            metrics = {
                "queue_seconds": round((r.job.started_at - r.job.created_at).total_seconds(), 4),
                "run_seconds": round(run_seconds, 4),
                "batch_size": len(runnable),
            }
            if load_seconds is not None:
                metrics["model_load_seconds"] = round(load_seconds, 4)
            try:
                # Storage that is down is waited for, within half the lease
                # (renewed at most a third of a lease ago), then the job fails.
                output = retry(lambda: self.store(r.job.id, result), within=self.settings.lease_seconds / 2,
                               what=f"storing the outputs of job {r.job.id}")
            except Exception as exc:
                log.exception("storing outputs of job %s failed", r.job.id, extra={"job_id": r.job.id})
                outcomes.append((r, JobStatus.FAILED, {"error": {"code": "storage_error",
                                                                 "message": f"could not store the outputs: {exc}"}}))
                continue
            outcomes.append((r, JobStatus.SUCCEEDED, {"output": output, "metrics": metrics}))
        self.hand_back(back)
        self.finish(outcomes)

    def interrupted_by_shutdown(self, rows: list[Row], exc: Exception) -> bool:
        """A batch that raised during a shutdown was most likely cut short by
        it (a cold shutdown cancels tasks from its signal handler, inside the
        model; Celery's solo pool, unable to, raises right there). Its jobs did
        nothing wrong: they are marked to be handed back, not failed."""
        if not self.shutdown.requested:
            return False
        log.warning("batch interrupted by the shutdown (%s: %s); handing its jobs back", type(exc).__name__, exc)
        for r in rows:
            if not r.finished and not r.lost:
                r.handing_back = r.cancelled = True
        return True

    def store(self, job_id: str, result: Result) -> dict:
        """Put a result's files at deterministic keys and point the output at them."""
        keys = {}
        for name, (data, content_type) in result.files.items():
            key = job_key(job_id, name)
            self.storage.put(key, data, content_type)
            keys[name] = key
        return _swap_files(result.output, keys)

    def started(self, row: Row) -> None:
        row.executing = True
        self.executions.started(row.job.id, row.job.attempts)

    def finish(self, outcomes: list[tuple[Row, JobStatus, dict]]) -> None:
        """Write final states in one transaction; each counts only where this
        worker still holds that job's lease. A database that is down is waited
        for, up to a lease: past that the jobs are another worker's anyway."""
        if not outcomes:
            return
        for row, _, _ in outcomes:
            row.finished = True

        def write() -> dict[str, bool]:
            with self.sessions.begin() as session:
                return {row.job.id: joblib.finish(session, row.job.id, self.owner, status, progress=row.progress,
                                                  webhook=bool(row.job.webhook), **fields)
                        for row, status, fields in outcomes}

        try:
            done = retry(write, within=self.settings.lease_seconds, what=f"finishing {len(outcomes)} job(s)")
        except Exception:
            for row, _, _ in outcomes:
                if row.executing:
                    self.executions.ended(row.job.id, row.job.attempts, "not_written")
            raise
        for row, status, _ in outcomes:
            if row.executing:
                self.executions.ended(row.job.id, row.job.attempts, status.value if done[row.job.id] else "not_written")
            if done[row.job.id]:
                prom.JOBS_FINISHED.labels(row.job.model, row.job.pool, status.value).inc()
                log.info("job %s %s", row.job.id, status.value, extra={"job_id": row.job.id})
            else:
                log.warning("job %s: lease lost before it finished; result discarded", row.job.id,
                            extra={"job_id": row.job.id})

    def hand_back(self, rows: list[Row]) -> None:
        """Shutting down: jobs stopped mid-run go back to the queue, the
        attempt uncounted, and their pool's doorbell rings for another worker."""
        if not rows:
            return
        for r in rows:
            r.finished = True
            # Before the commit: no other worker can start them until it lands.
            if r.executing:
                self.executions.ended(r.job.id, r.job.attempts, "handed_back", at=r.stopped_at)

        def write() -> list[str]:
            with self.sessions.begin() as session:
                return joblib.hand_back(session, [r.job.id for r in rows], self.owner,
                                        "its worker shut down; queued again, attempt not counted")

        back = retry(write, within=self.settings.lease_seconds, what=f"handing back {len(rows)} job(s)")
        log.info("shutdown: handed jobs %s back to the queue", back)
        for r in rows:
            if r.job.id in back:
                self.ring(r.job.id, r.job.pool)

    def ring_if_queued(self, job_id: str) -> None:
        with self.sessions() as session:
            job = session.get(Job, job_id)
            if job is not None and job.status == JobStatus.QUEUED.value:
                self.ring(job.id, job.pool)

    # --- failures before a claim ------------------------------------------------

    def _fail_unknown_model(self, pool: str, model: str, batch_key: str) -> None:
        error = {"code": "unknown_model", "message": f"model {model!r} is no longer in this worker's registry"}
        self._fail_all_queued(pool, model, batch_key, error)

    def _fail_queued(self, spec: ModelSpec, pool: str, batch_key: str, exc: Exception) -> None:
        """The model cannot load: fail the waiting jobs with the reason rather
        than leave them queued forever."""
        log.exception("loading model %s failed", spec.name)
        self._fail_all_queued(pool, spec.name, batch_key, error_for(exc, default_code="model_load_failed"))

    def _fail_all_queued(self, pool: str, model: str, batch_key: str, error: dict) -> None:
        # claim_batch takes a job on a later attempt alone: go on until none is left.
        while True:
            with self.sessions.begin() as session:
                batch = joblib.claim_batch(session, pool=pool, model=model, batch_key=batch_key, limit=1000,
                                           owner=self.owner, lease_seconds=self.settings.lease_seconds)
            if not batch:
                return
            self.finish([(Row(job), JobStatus.FAILED, {"error": error}) for job in batch])


def error_for(exc: Exception, default_code: str = "model_error") -> dict:
    if isinstance(exc, GenqError):
        return {"code": exc.code, "message": exc.message}
    text = str(exc) or type(exc).__name__
    if "out of memory" in text.lower():
        return {"code": "out_of_memory", "message": "the model ran out of memory on this batch; try smaller inputs"}
    return {"code": default_code, "message": f"{type(exc).__name__}: {text[:500]}"}


def _swap_files(value, keys: dict[str, str]):
    if isinstance(value, dict):
        out = {k: _swap_files(v, keys) for k, v in value.items()}
        if "file" in out and out["file"] in keys:
            out["key"] = keys[out.pop("file")]
        return out
    if isinstance(value, list):
        return [_swap_files(v, keys) for v in value]
    return value
