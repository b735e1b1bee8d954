"""A fine-tune job on the worker: claim it alone, train with checkpoints to
object storage, resume from the last one on a later attempt, and publish the
result as a new model version of the tenant's."""
from __future__ import annotations

import logging

from sqlalchemy import select

from genq import catalog
from genq import jobs as joblib
from genq.schema import File, JobEvent, ModelVersion, new_id
from genq.states import JobStatus
from genq.storage import job_key
from models import finetune, image_finetune
from models.base import InputInvalid
from models.checkpoints import resolve as resolve_checkpoint
from models.registry import ModelSpec
from worker.batch import NO_RESULT, BatchTracker, Host, Ran, Row, Verdict, error_for, verdict
from worker.cache import resolve_device

log = logging.getLogger(__name__)


def train_one(runner: Host, spec: ModelSpec, pool: str, head: joblib.Head) -> int:
    """Claim the pool's head, a fine-tune of this base model (or, if another
    worker took it meanwhile, the next of its base model in line) and run it
    to the end, or until a shutdown hands it back (from a checkpoint saved on
    the way out)."""
    if runner.shutdown.requested:
        return 0
    with runner.sessions.begin() as session:
        claimed = joblib.claim_batch(session, pool=pool, first=head.id, model=spec.name, batch_key=head.batch_key,
                                     limit=1, owner=runner.owner, lease_seconds=runner.settings.lease_seconds)
    if not claimed:
        return 0
    row = Row(claimed[0])
    tracker = BatchTracker(runner, [row], unit="step", finish_cancelled=False)
    runner.started(row)
    try:
        ran, fields = _train(runner, spec, row, tracker)
    except Exception as exc:
        ran, fields = Ran.RAISED, {"error": error_for(exc, default_code="training_failed")}
        if runner.shutdown.requested:
            log.warning("fine-tune job %s interrupted by the shutdown (%s: %s)", row.job.id, type(exc).__name__, exc)
        else:
            log.exception("fine-tune job %s failed", row.job.id)
    finally:
        tracker.close()
    outcome = verdict(row.phase, row.stop, ran, runner.shutdown.requested)
    if outcome is Verdict.SUCCEED:
        _publish(runner, row, fields)
    elif outcome is Verdict.HAND_BACK:
        runner.hand_back([row])  # the next attempt resumes from the checkpoint saved on the way out
    elif outcome is Verdict.DROP:
        if row.settle():
            runner.executions.ended(row.job.id, row.job.attempts, "lease_lost", at=row.stopped_at)
    elif outcome is Verdict.CANCEL:
        runner.finish([(row, JobStatus.CANCELED, fields if ran is Ran.NOTHING else {})])
    elif outcome is Verdict.FAIL:
        runner.finish([(row, JobStatus.FAILED, fields if "error" in fields else {"error": NO_RESULT})])
    return 1


def _train(runner: Host, spec: ModelSpec, row: Row, tracker: BatchTracker) -> tuple[Ran, dict]:
    """Run the fine-tune: what it gave (a result to publish, nothing because
    it stopped as asked, or its own failure) and that outcome's fields."""
    job, settings, storage = row.job, runner.settings, runner.storage
    # An image model's fine-tune is an image LoRA (models/image_finetune.py), with the same contract.
    trainer = image_finetune if spec.family == "image-generation" else finetune
    try:
        inp = trainer.validate(job.input, spec.limits)
    except InputInvalid as exc:
        return Ran.FAILED, {"error": {"code": "invalid_input", "message": str(exc)}}
    with runner.sessions() as session:
        f = session.get(File, inp.training_file)
        # Image fine-tunes take no validation file.
        validation_file = getattr(inp, "validation_file", None)
        v = session.get(File, validation_file) if validation_file else None
        latest = session.scalar(select(JobEvent).where(JobEvent.job_id == job.id, JobEvent.type == "checkpoint")
                                .order_by(JobEvent.id.desc()).limit(1))
    if f is None:
        return Ran.FAILED, {"error": {"code": "file_missing", "message": f"training file {inp.training_file} is gone"}}
    if validation_file and v is None:
        return Ran.FAILED, {"error": {"code": "file_missing",
                                      "message": f"validation file {validation_file} is gone"}}
    dataset = trainer.parse_dataset(storage.get(f.storage_key))
    validation = trainer.parse_dataset(storage.get(v.storage_key)) if v is not None else None
    try:
        # Checked at submit too; here again for jobs queued before a limit was lowered.
        trainer.check_workload(inp, len(dataset.rows), spec.limits, max_train_steps=settings.max_train_steps,
                                max_train_examples=settings.max_train_examples)
    except InputInvalid as exc:
        return Ran.FAILED, {"error": {"code": "invalid_input", "message": str(exc)}}
    resume = storage.get(latest.data["key"]) if latest else None
    if latest:
        log.info("fine-tune job %s resumes from step %s", job.id, latest.data["step"])
    checkpoints = [] if latest is None else _checkpoints(runner, job.id)

    def save_checkpoint(step: int, blob: bytes) -> None:
        key = job_key(job.id, f"checkpoints/step-{step:06d}.pt")
        storage.put(key, blob, "application/octet-stream")
        with runner.sessions.begin() as session:
            # Recorded only while this worker holds the lease: a stale attempt's
            # checkpoint must not become the one the next attempt resumes from.
            if joblib.renew_leases(session, [job.id], runner.owner, settings.lease_seconds):
                joblib.record_event(session, job.id, "checkpoint", {"step": step, "key": key})
                checkpoints.append({"step": step, "key": key})

    def on_step(step: int, total: int, epoch: int, loss: float, **extra) -> None:
        tracker.on_progress(0, step, total, epoch=epoch, loss=loss, **extra)

    def on_eval(step: int, metrics: dict) -> None:
        # An event of its own: progress is written at intervals and keeps the latest only.
        try:
            with runner.sessions.begin() as session:
                joblib.record_event(session, job.id, "metrics", {"step": step, **metrics})
        except Exception:
            log.exception("fine-tune job %s: could not record validation metrics", job.id, extra={"job_id": job.id})

    def on_notice(message: str) -> None:
        # The owner reads it in the job's events; the output's metrics say it too.
        log.warning("fine-tune job %s: %s", job.id, message, extra={"job_id": job.id})
        try:
            with runner.sessions.begin() as session:
                joblib.record_event(session, job.id, "log", {"message": message})
        except Exception:
            log.exception("fine-tune job %s: could not record a notice", job.id, extra={"job_id": job.id})

    try:
        result = trainer.train(
            resolve_checkpoint(spec, settings.model_dir), dataset, inp, resolve_device(settings.device),
            resume=resume, checkpoint_every=settings.checkpoint_every, on_step=on_step,
            save_checkpoint=save_checkpoint, is_cancelled=lambda: row.stop is not None, on_notice=on_notice,
            **(dict(validation=validation, on_eval=on_eval) if trainer is finetune else {}),
        )
    except finetune.TrainingFailed as exc:
        log.warning("fine-tune job %s failed: %s", job.id, exc.message, extra={"job_id": job.id})
        return Ran.FAILED, {"error": {"code": exc.code, "message": exc.message}}
    if result.canceled:
        return Ran.NOTHING, {"output": {"checkpoints": checkpoints, "metrics": result.metrics}}
    return Ran.RESULT, {"result": result, "inp": inp, "checkpoints": checkpoints, "spec": spec}


def _checkpoints(runner: Host, job_id: str) -> list[dict]:
    with runner.sessions() as session:
        events = session.scalars(select(JobEvent).where(JobEvent.job_id == job_id, JobEvent.type == "checkpoint")
                                 .order_by(JobEvent.id))
        return [{"step": e.data["step"], "key": e.data["key"]} for e in events]


def _publish(runner: Host, row: Row, fields: dict) -> None:
    """Upload the new version's weights, then in one transaction finish the job
    and record the version: the model exists exactly when the job succeeded."""
    job, result, inp, spec = row.job, fields["result"], fields["inp"], fields["spec"]
    version_id = new_id()
    prefix = f"models/{version_id}"
    for name, data in result.files.items():
        if name.endswith((".safetensors", ".json")):
            runner.storage.put(f"{prefix}/{name}", data, "application/octet-stream")
    name = catalog.version_name(job.model, inp.suffix, job.id)
    output = {"model": name, "checkpoints": fields["checkpoints"], "metrics": result.metrics}
    metrics = {"queue_seconds": round((job.started_at - job.created_at).total_seconds(), 4),
               "train_steps": result.steps_done, "resumed_from_step": result.metrics["resumed_from_step"]}
    executing = row.settle()
    with runner.sessions.begin() as session:
        done = joblib.finish(session, job.id, runner.owner, JobStatus.SUCCEEDED, output=output, metrics=metrics,
                             progress=row.progress)
        if done:
            session.add(ModelVersion(id=version_id, tenant_id=job.tenant_id, name=name, base_model=job.model,
                                     family=spec.family, method=getattr(inp, "weights", inp.method),
                                     storage_prefix=prefix, job_id=job.id))
    if executing:
        runner.executions.ended(job.id, job.attempts, "succeeded" if done else "not_written")
    log.info("fine-tune job %s %s: model %s", job.id, "succeeded" if done else "lost its lease", name)
