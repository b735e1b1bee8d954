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
from typing import Any

from sqlalchemy.orm import Session, sessionmaker

from genq import catalog
from genq import jobs as joblib
from genq import pools as poollib
from genq.errors import GenqError
from genq.schema import Job
from genq.settings import Settings
from genq.states import JobStatus
from genq.storage import Storage, job_key
from models.base import InputInvalid, Result
from models.registry import ModelSpec, Registry
from worker import metrics as prom
from worker.cache import ModelCache

log = logging.getLogger(__name__)

# The batch key of fine-tune jobs: never batched, one per claim.
FINE_TUNE = "fine-tune"


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
    cancelled: bool = False
    finished: bool = False


class BatchTracker:
    """Progress, cancel checks and lease renewal for one running batch.

    The model calls on_progress / is_cancelled from its inner loop, many times
    a second, so they only touch memory. A side thread does the database work
    off the model's path: it writes progress at most once per
    `progress_interval`, reads cancel flags every `cancel_poll_interval`
    (finishing a cancelled job at once, so its batch-mates run on) and renews
    the leases, so a long step cannot let them lapse."""

    def __init__(self, runner: "Runner", rows: list[Row], unit: str, finish_cancelled: bool = True):
        self.runner = runner
        self.rows = rows
        self.unit = unit
        # Inference rows are finished the moment their cancel is seen; a
        # trainer finishes its own, after saving a last checkpoint.
        self.finish_cancelled = finish_cancelled
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
        return self.rows[row].cancelled

    def _loop(self) -> None:
        s = self.runner.settings
        tick = max(min(s.cancel_poll_interval, s.progress_interval), 0.02)
        renew_every = max(s.lease_seconds / 3, tick)
        last_progress = last_renew = time.monotonic()
        while not self._stop.wait(tick):
            now = time.monotonic()
            try:
                self.poll_cancels()
                if now - last_progress >= s.progress_interval:
                    last_progress = now
                    self.flush_progress()
                if now - last_renew >= renew_every:
                    last_renew = now
                    self.renew()
            except Exception:  # a missed beat is retried on the next one
                log.exception("batch tracker: database write failed")

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
        dirty = [r for r in self.rows if r.progress_dirty and not r.finished]
        if not dirty:
            return
        with self.runner.sessions.begin() as session:
            for r in dirty:
                r.progress_dirty = False
                joblib.set_progress(session, r.job.id, self.runner.owner, r.progress)

    def renew(self) -> None:
        ids = [r.job.id for r in self.rows if not r.finished]
        with self.runner.sessions.begin() as session:
            held = joblib.renew_leases(session, ids, self.runner.owner, self.runner.settings.lease_seconds)
        if lost := set(ids) - held:
            log.warning("lost the lease on jobs %s; their results will not be written", sorted(lost))


class Runner:
    def __init__(
        self,
        settings: Settings,
        sessions: sessionmaker[Session],
        registry: Registry,
        storage: Storage,
        cache: ModelCache,
        owner: str | None = None,
    ):
        self.settings = settings
        self.sessions = sessions
        self.registry = registry
        self.storage = storage
        self.cache = cache
        self.owner = owner or worker_name(settings.worker_name)

    # --- entry points -------------------------------------------------------

    def on_doorbell(self, job_id: str) -> int:
        """Handle one Celery message. Returns how many jobs ran; 0 for a stale
        or duplicate message (the job is no longer queued)."""
        with self.sessions() as session:
            key = joblib.claimable_key(session, job_id)
        if key is None:
            log.info("doorbell for job %s: nothing to claim", job_id, extra={"job_id": job_id})
            return 0
        if self.draining():
            log.info("doorbell for job %s: draining, claiming nothing", job_id, extra={"job_id": job_id})
            return 0
        model, batch_key = key
        with self.sessions() as session:
            spec = catalog.resolve(session, self.registry, model)
        if spec is None:
            self._fail_unknown_model(job_id, model)
            return 0
        if batch_key == FINE_TUNE:
            from worker.training import train_one

            return train_one(self, spec)
        return self.drain(spec, batch_key)

    def drain(self, spec: ModelSpec, batch_key: str) -> int:
        """Run batches of one model and batch key until none is queued. The
        doorbell names one job, but whichever jobs are first in line run first,
        so the loop goes on until the line is empty."""
        ran = 0
        while True:
            try:
                # Load before claiming: a lease should not tick away on a load.
                loaded = self.cache.get(spec)
            except Exception as exc:
                self._fail_queued(spec, batch_key, exc)
                return ran
            # An operator's drain takes effect between batches: the one in hand finishes.
            if self.draining():
                return ran
            batch = self.claim(spec, batch_key)
            if not batch:
                return ran
            self.run_batch(spec, batch, loaded)
            ran += len(batch)

    def draining(self) -> bool:
        with self.sessions() as session:
            return poollib.is_draining(session, self.settings.worker_name)

    def claim(self, spec: ModelSpec, batch_key: str) -> list[Job]:
        with self.sessions.begin() as session:
            batch = joblib.claim_batch(
                session, model=spec.name, batch_key=batch_key, limit=spec.max_batch_size,
                owner=self.owner, lease_seconds=self.settings.lease_seconds,
            )
        deadline = time.monotonic() + spec.max_wait_ms / 1000
        # A part-full batch waits a little for company: the forward pass costs
        # nearly the same for one row as for several.
        while batch and len(batch) < spec.max_batch_size and time.monotonic() < deadline:
            time.sleep(min(0.01, max(deadline - time.monotonic(), 0)))
            with self.sessions.begin() as session:
                batch += joblib.claim_batch(
                    session, model=spec.name, batch_key=batch_key, limit=spec.max_batch_size - len(batch),
                    owner=self.owner, lease_seconds=self.settings.lease_seconds,
                )
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
        tracker = BatchTracker(self, runnable, unit)
        started = time.monotonic()
        try:
            tracker.poll_cancels()
            results = loaded.run(inputs, tracker.on_progress, tracker.is_cancelled)
            if len(results) != len(runnable):
                raise GenqError(f"model returned {len(results)} results for {len(runnable)} jobs")
        except Exception as exc:
            log.exception("batch of %s failed", spec.name, extra={"job_ids": [r.job.id for r in runnable]})
            error = error_for(exc)
            results = None
        run_seconds = time.monotonic() - started
        prom.RUN_SECONDS.labels(spec.name).observe(run_seconds)
        # The tracker stops before anything below writes, so no job is finished twice.
        tracker.close()
        if results is None:
            self.finish([(r, JobStatus.FAILED, {"error": error}) for r in runnable])
            return
        outcomes = []
        for r, result in zip(runnable, results):
            if r.finished:
                continue  # cancelled mid-run, already written
            if result is None or r.cancelled:
                outcomes.append((r, JobStatus.CANCELED, {}))
                continue
            metrics = {
                "queue_seconds": round((r.job.started_at - r.job.created_at).total_seconds(), 4),
                "run_seconds": round(run_seconds, 4),
                "batch_size": len(runnable),
            }
            if load_seconds is not None:
                metrics["model_load_seconds"] = round(load_seconds, 4)
            try:
                output = self.store(r.job.id, result)
            except Exception as exc:
                log.exception("storing outputs of job %s failed", r.job.id, extra={"job_id": r.job.id})
                outcomes.append((r, JobStatus.FAILED, {"error": {"code": "storage_error",
                                                                 "message": f"could not store the outputs: {exc}"}}))
                continue
            outcomes.append((r, JobStatus.SUCCEEDED, {"output": output, "metrics": metrics}))
        self.finish(outcomes)

    def store(self, job_id: str, result: Result) -> dict:
        """Put a result's files at deterministic keys and point the output at them."""
        keys = {}
        for name, (data, content_type) in result.files.items():
            key = job_key(job_id, name)
            self.storage.put(key, data, content_type)
            keys[name] = key
        return _swap_files(result.output, keys)

    def finish(self, outcomes: list[tuple[Row, JobStatus, dict]]) -> None:
        """Write final states in one transaction; each counts only where this
        worker still holds that job's lease."""
        if not outcomes:
            return
        with self.sessions.begin() as session:
            done = {}
            for row, status, fields in outcomes:
                row.finished = True
                done[row.job.id] = joblib.finish(session, row.job.id, self.owner, status, progress=row.progress, **fields)
        for row, status, _ in outcomes:
            if done[row.job.id]:
                prom.JOBS_FINISHED.labels(row.job.model, row.job.pool, status.value).inc()
                log.info("job %s %s", row.job.id, status.value, extra={"job_id": row.job.id})
            else:
                log.warning("job %s: lease lost before it finished; result discarded", row.job.id,
                            extra={"job_id": row.job.id})

    # --- failures before a claim ------------------------------------------------

    def _fail_unknown_model(self, job_id: str, model: str) -> None:
        with self.sessions.begin() as session:
            batch = joblib.claim_batch(session, model=model, batch_key=session.get(Job, job_id).batch_key, limit=1000,
                                       owner=self.owner, lease_seconds=self.settings.lease_seconds)
        error = {"code": "unknown_model", "message": f"model {model!r} is no longer in this worker's registry"}
        self.finish([(Row(job), JobStatus.FAILED, {"error": error}) for job in batch])

    def _fail_queued(self, spec: ModelSpec, batch_key: str, exc: Exception) -> None:
        """The model cannot load: fail the waiting jobs with the reason rather
        than leave them queued forever."""
        log.exception("loading model %s failed", spec.name)
        error = error_for(exc, default_code="model_load_failed")
        with self.sessions.begin() as session:
            batch = joblib.claim_batch(session, model=spec.name, batch_key=batch_key, limit=1000,
                                       owner=self.owner, lease_seconds=self.settings.lease_seconds)
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
