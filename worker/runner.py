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
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy.orm import Session, sessionmaker

from genq import jobs as joblib
from genq.errors import GenqError
from genq.schema import Job, utcnow
from genq.settings import Settings
from genq.states import JobStatus
from genq.storage import Storage, job_key
from models.base import InputInvalid, Result
from models.registry import ModelSpec, Registry
from worker.cache import ModelCache

log = logging.getLogger(__name__)


def worker_name() -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"


@dataclass
class Row:
    """One job's place in a running batch."""

    job: Job
    progress: dict[str, Any] | None = None
    progress_dirty: bool = False
    cancelled: bool = False
    finished: bool = False


@dataclass
class BatchTracker:
    """Progress, cancel checks and lease renewal for one running batch.

    The model calls on_progress / is_cancelled from its inner loop, many times
    a second; this writes progress at most once per `progress_interval` and
    reads cancel flags at most once per `cancel_poll_interval`. A heartbeat
    thread renews the leases, so a long step cannot let them lapse."""

    runner: "Runner"
    rows: list[Row]
    unit: str
    _last_progress_write: float = 0.0
    _last_cancel_poll: float = 0.0
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def __post_init__(self):
        self._thread = threading.Thread(target=self._heartbeat, name="lease-heartbeat", daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._stop.set()
        if self._thread:
            self._thread.join(timeout=5)

    def _heartbeat(self) -> None:
        interval = max(self.runner.settings.lease_seconds / 3, 0.2)
        while not self._stop.wait(interval):
            ids = [r.job.id for r in self.rows if not r.finished]
            try:
                with self.runner.sessions.begin() as session:
                    held = joblib.renew_leases(session, ids, self.runner.owner, self.runner.settings.lease_seconds)
                lost = set(ids) - held
                if lost:
                    log.warning("lost the lease on jobs %s; their results will not be written", sorted(lost))
            except Exception:  # a missed renewal is retried next beat
                log.exception("lease renewal failed")

    def on_progress(self, row: int, current: int, total: int) -> None:
        r = self.rows[row]
        r.progress = {"current": int(current), "total": int(total), "unit": self.unit}
        r.progress_dirty = True
        now = time.monotonic()
        if now - self._last_progress_write >= self.runner.settings.progress_interval:
            self._last_progress_write = now
            self.flush_progress()

    def flush_progress(self) -> None:
        dirty = [r for r in self.rows if r.progress_dirty and not r.finished]
        if not dirty:
            return
        with self.runner.sessions.begin() as session:
            for r in dirty:
                joblib.set_progress(session, r.job.id, self.runner.owner, r.progress)
                r.progress_dirty = False

    def is_cancelled(self, row: int) -> bool:
        now = time.monotonic()
        if now - self._last_cancel_poll >= self.runner.settings.cancel_poll_interval:
            self._last_cancel_poll = now
            self.poll_cancels()
        return self.rows[row].cancelled

    def poll_cancels(self) -> None:
        live = [r for r in self.rows if not r.finished and not r.cancelled]
        with self.runner.sessions() as session:
            flagged = joblib.cancel_requested(session, [r.job.id for r in live])
        for r in live:
            if r.job.id in flagged:
                # Canceled now, not when the batch ends: batch-mates run on.
                r.cancelled = True
                self.runner.finish(r, JobStatus.CANCELED)


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
        self.owner = owner or worker_name()

    # --- entry points -------------------------------------------------------

    def on_doorbell(self, job_id: str) -> int:
        """Handle one Celery message. Returns how many jobs ran; 0 for a stale
        or duplicate message (the job is no longer queued)."""
        with self.sessions() as session:
            key = joblib.claimable_key(session, job_id)
        if key is None:
            log.info("doorbell for job %s: nothing to claim", job_id)
            return 0
        model, batch_key = key
        spec = self.registry.get(model)
        if spec is None:
            self._fail_unknown_model(job_id, model)
            return 0
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
            batch = self.claim(spec, batch_key)
            if not batch:
                return ran
            self.run_batch(spec, batch, loaded)
            ran += len(batch)

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
        log.info("running batch of %d %s jobs: %s", len(rows), spec.name, [j.id for j in batch])
        inputs, runnable = [], []
        for r in rows:
            try:
                inputs.append(spec.validate(r.job.input))
                runnable.append(r)
            except InputInvalid as exc:
                # Validated at submit; only a registry change can make it fail here.
                self.finish(r, JobStatus.FAILED, error={"code": "invalid_input", "message": str(exc)})
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
            tracker.close()
            log.exception("batch of %s failed", spec.name)
            error = error_for(exc)
            for r in runnable:
                self.finish(r, JobStatus.FAILED, error=error)
            return
        run_seconds = time.monotonic() - started
        tracker.close()
        for r, result in zip(runnable, results):
            if r.finished:
                continue
            if result is None or r.cancelled:
                self.finish(r, JobStatus.CANCELED)
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
                log.exception("storing outputs of job %s failed", r.job.id)
                self.finish(r, JobStatus.FAILED, error={"code": "storage_error", "message": f"could not store the outputs: {exc}"})
                continue
            self.finish(r, JobStatus.SUCCEEDED, output=output, metrics=metrics)

    def store(self, job_id: str, result: Result) -> dict:
        """Put a result's files at deterministic keys and point the output at them."""
        keys = {}
        for name, (data, content_type) in result.files.items():
            key = job_key(job_id, name)
            self.storage.put(key, data, content_type)
            keys[name] = key
        return _swap_files(result.output, keys)

    def finish(self, row: Row, status: JobStatus, *, output=None, error=None, metrics=None) -> bool:
        row.finished = True
        with self.sessions.begin() as session:
            done = joblib.finish(
                session, row.job.id, self.owner, status, output=output, error=error,
                metrics=metrics, progress=row.progress,
            )
        if not done:
            log.warning("job %s: lease lost before it finished; result discarded", row.job.id)
        else:
            log.info("job %s %s", row.job.id, status.value)
        return done

    # --- failures before a claim ------------------------------------------------

    def _fail_unknown_model(self, job_id: str, model: str) -> None:
        with self.sessions.begin() as session:
            batch = joblib.claim_batch(session, model=model, batch_key=session.get(Job, job_id).batch_key, limit=1000,
                                       owner=self.owner, lease_seconds=self.settings.lease_seconds)
        for job in batch:
            self.finish(Row(job), JobStatus.FAILED, error={
                "code": "unknown_model", "message": f"model {model!r} is no longer in this worker's registry"})

    def _fail_queued(self, spec: ModelSpec, batch_key: str, exc: Exception) -> None:
        """The model cannot load: fail the waiting jobs with the reason rather
        than leave them queued forever."""
        log.exception("loading model %s failed", spec.name)
        error = error_for(exc, default_code="model_load_failed")
        with self.sessions.begin() as session:
            batch = joblib.claim_batch(session, model=spec.name, batch_key=batch_key, limit=1000,
                                       owner=self.owner, lease_seconds=self.settings.lease_seconds)
        for job in batch:
            self.finish(Row(job), JobStatus.FAILED, error=error)


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
