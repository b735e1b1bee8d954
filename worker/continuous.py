"""Continuous batching: one model's running batch, scheduled at the decode step.

The loaded model's engine (models/text_engine.py, or vLLM's) keeps the rows;
this module decides who is in it. At each step boundary rows that finished
leave and their jobs are stored and finished at once, rows asked to stop
(their owner's cancel, a lost lease, a shutdown past its timeout) are dropped,
and queued jobs of the same model are claimed, with the same claims and leases
as a static batch, and join after their prefill. What a row has written so far
goes out as live output deltas (genq.live), never a database write per token.

Claims stay in line (genq.line): the batch admits only while the pool's head
is a job of its own model and batch key. A job on a later attempt runs alone,
as in a static batch: while it runs nothing joins, and when it heads the line
behind a running batch, the batch stops admitting and drains first.
"""
from __future__ import annotations

import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from genq import jobs as joblib
from genq.outage import retry
from genq.states import JobStatus
from models.base import InputInvalid, Result
from models.registry import ModelSpec
from worker import metrics as prom
from worker.batch import BatchTracker, Ran, Row, Stop, Verdict, error_for, verdict

log = logging.getLogger(__name__)

# With rows free, the queue is asked again this often when it last had
# nothing: often enough that a new job waits about a step, rarely enough that
# the claims' round trips do not crowd out the decode.
CLAIM_EVERY = 0.02
# Jobs are claimed for the rows that end within this many decode steps, not
# only for rows already free: the claim's round trips (several steps) then run
# while those rows finish, and the jobs join the step a row leaves instead of
# a claim later. Several rows' jobs come in one claim. A job claimed ahead
# holds its lease (it shows running, at 0 tokens) this many steps at most.
CLAIM_AHEAD_STEPS = 8
# A running job's output goes out at most this often (about 20 deltas a second).
PUBLISH_EVERY = 0.05


@dataclass
class Member:
    """A job's row in the running batch, and what it has published."""

    row: Row
    seq: object
    joined: float = 0.0      # monotonic, when its prefill began
    published: str = ""      # the text sent as deltas so far
    deltas: int = 0          # how many deltas were sent (the next one's index)
    most_rows: int = 0       # the most rows it ran beside (itself included)
    load_seconds: float | None = None
    in_engine: bool = False
    ending: bool = False     # it left the engine finished; its outputs are being stored


@dataclass
class Admission:
    """The state of the door: open, or why it closed."""

    open: bool = True
    why: str = ""
    next_claim: float = 0.0
    first: bool = True       # the batch's first claim is built around the head, not a top-up
    alone: bool = False      # a job on a later attempt runs: nothing joins it

    def close(self, why: str) -> None:
        if self.open:
            self.open, self.why = False, why
            log.info("continuous batch stops admitting: %s", why)


class ContinuousBatch:
    """One model's running batch on one worker, from its first claim until it
    is empty and admits no more. `run()` returns how many jobs it took."""

    def __init__(self, runner, spec: ModelSpec, pool: str, head: joblib.Head, loaded):
        self.runner = runner
        self.spec = spec
        self.pool = pool
        self.head = head
        self.loaded = loaded
        self.batch_key = head.batch_key
        self.engine = loaded.engine(spec.max_batch_size, spec.max_batch_tokens)
        self.members: dict[str, Member] = {}
        self.waiting: list[Member] = []  # claimed, waiting for room in the KV budget
        self.adapters: dict = {}  # the LoRA adapters its rows were resolved to (Runner.adapter_ref)
        self.door = Admission()
        self.taken = 0
        self.load_seconds = runner.cache.last_load_seconds
        self.stored_ok = True
        self.last_publish = 0.0
        # Rows that ended at the last step, to be stored and finished (and
        # live output to publish) while the next step decodes.
        self.ended: list = []
        self.unpublished: list = []
        # The engine decodes on this thread when it says it may (the
        # transformers engine does; vLLM's keeps its own threads and stays here).
        self.stepper = ThreadPoolExecutor(1, thread_name_prefix=f"step-{spec.name}") \
            if getattr(self.engine, "steps_off_thread", False) else None
        # With a stepper, the step boundary's database and Redis work (storing
        # and finishing the rows that ended, publishing live output, claiming
        # jobs for free rows) runs on this thread, one piece of work at a time,
        # and the decode does not wait for it: a piece started at one boundary
        # is collected at the first later boundary that finds it done. A
        # commit's or a claim's round trips (milliseconds, several decode
        # steps) then cost the running rows nothing.
        self.books = ThreadPoolExecutor(1, thread_name_prefix=f"books-{spec.name}") \
            if self.stepper is not None else None
        self.booking = None  # the piece of work in flight on `books`: (future, ended members, asked rows)
        # The tracker renews leases, reads cancel requests and writes progress
        # for every row held here, off the decode's path. Rows it is asked to
        # stop are dropped and written by this loop at the next step, so one
        # thread writes a job's end.
        self.tracker = BatchTracker(runner, [], "token", finish_cancelled=False)

    # --- the loop -------------------------------------------------------------

    def run(self) -> int:
        try:
            while True:
                if not len(self.engine):
                    self.admit()
                self.stop_asked()
                if not self.engine_rows() and not self.waiting:
                    self.write_finished()
                    if not self.door.open or not self.taken_more():
                        return self.taken
                    continue
                self.join()
                if len(self.engine):
                    self.apply(self.step())
                else:
                    self.write_finished()
        except Exception as exc:
            self.failed(exc)
            return self.taken
        finally:
            self.tracker.close()
            close = getattr(self.engine, "close", None)  # an engine in the engine process ends its batch there
            if close is not None:
                close()
            if self.stepper is not None:
                self.stepper.shutdown(wait=False)
            if self.books is not None:
                self.books.shutdown(wait=False)

    def step(self):
        """One decode step. While an engine that allows it decodes on the
        stepper thread, this thread does the step boundary's database and Redis
        work: the rows that ended last step are stored and finished, the live
        output goes out, and the queue is asked for jobs to fill free rows. So
        claims and finishes overlap the decode instead of stalling it (torch and
        the database driver both release the GIL while they wait). Nothing here
        touches the engine while it steps: joins and drops happen between steps."""
        if self.stepper is None:
            self.write_finished()
            self.admit()
            return self.engine.step()
        future = self.stepper.submit(self.engine.step)
        try:
            self.book()
        finally:
            # The step's own exception, if any, is the one raised.
            updates = future.result()
        return updates

    # --- the books: the boundary's writes and claims, off the decode's path ----

    def book(self) -> None:
        """Collect the boundary work in flight if it is done, and start the
        next piece: the rows that ended since, the live output held back, and
        a claim when rows are free. Never waits: while a piece is in flight,
        rows that end wait for the next one (their leases still renewed)."""
        if self.booking is not None:
            if not self.booking[0].done():
                return
            self.settle()
        out, self.unpublished = self.unpublished, []
        done, self.ended = self.ended, []
        free = self.claimable()
        if not (out or done or free):
            return
        future = self.books.submit(self.keep_books, out, done, free)
        self.booking = (future, done, free)

    def keep_books(self, out: list, done: list, free: int):
        """On the books thread: publish, store and finish, then claim. Touches
        no state the decode loop reads: members leave at settle()."""
        self.publish(out)
        written = self.finished(done, pop=False) if done else []
        claimed = None
        if free:
            try:
                claimed = self.claim(free)
            except Exception as exc:
                claimed = exc
        return written, claimed

    def settle(self) -> None:
        """Wait for the boundary work in flight, if any, and take in what it did:
        finished rows leave, claimed jobs wait to join. Raises what it raised."""
        if self.booking is None:
            return
        future, done, free = self.booking
        self.booking = None
        try:
            written, claimed = future.result()
        except BaseException:
            # As a failed write in line: those rows are not ours to write again.
            for m, _ in done:
                self.members.pop(m.row.job.id, None)
            self.track()
            raise
        for job_id in written:
            self.members.pop(job_id, None)
        if written:
            self.track()
        if free:
            self.took(claimed, time.monotonic())

    def engine_rows(self) -> int:
        return len(self.engine)

    def taken_more(self) -> bool:
        """With nothing running: one more look at the queue before the batch ends."""
        before = self.taken
        self.door.next_claim = 0.0
        self.admit()
        return self.taken > before

    # --- the door -------------------------------------------------------------

    def admit(self) -> None:
        """Claim queued jobs of this model into free rows, if the door is open
        and it is time to look, and wait for the claim."""
        self.settle()
        free = self.claimable()
        if not free:
            return
        try:
            jobs = self.claim(free)
        except Exception as exc:
            jobs = exc
        self.took(jobs, time.monotonic())

    def claimable(self) -> int:
        """How many jobs to claim now: the free rows, when the door is open and
        it is time to look again (0 otherwise)."""
        runner, door = self.runner, self.door
        if not door.open:
            return 0
        if runner.shutdown.requested:
            door.close("the worker is shutting down")
            return 0
        if door.alone or self.waiting:
            return 0
        ending = getattr(self.engine, "ending_within", None)
        free = self.spec.max_batch_size - len(self.engine) + (ending(CLAIM_AHEAD_STEPS) if ending else 0)
        if free <= 0 or time.monotonic() < door.next_claim:
            return 0
        return free

    def took(self, jobs, now: float) -> None:
        """Take in what a claim returned: its jobs wait to join (or the
        exception it raised, which ends the batch only if it holds nothing)."""
        door = self.door
        if isinstance(jobs, BaseException):
            exc = jobs
            # During a shutdown a claim's error may be the shutdown itself: a cold
            # one (SIGQUIT) raises from its signal handler wherever this thread
            # is (Celery's solo pool cannot cancel a task otherwise), here inside
            # the claim. Swallowing it left the batch running to its end as if the
            # shutdown were warm; raised, the batch hands its rows back at once.
            if not self.members or self.runner.shutdown.requested:
                raise exc
            # The rows in hand are ours under their lease: run them rather than
            # fail them for a claim the database refused.
            log.warning("claiming into the running batch of %s failed (%s); running the %d job(s) in hand",
                        self.spec.name, exc, len(self.members))
            door.next_claim = now + 1.0
            return
        door.next_claim = now if jobs else now + CLAIM_EVERY
        for job in jobs:
            self.taken += 1
            row = Row(job)
            member = Member(row=row, seq=None, load_seconds=self.load_seconds)
            self.load_seconds = None
            try:
                # Validated at submit; only a registry change can make it fail
                # here, or an engine that takes less than the schema (vLLM: a
                # temperature up to 2). It fails that job alone.
                inp = self.spec.validate(job.input)
            except (InputInvalid, ValueError) as exc:
                self.runner.started(row)
                self.write([(member, JobStatus.FAILED, {"error": {"code": getattr(exc, "code", "invalid_input"), "message": str(exc)}})])
                continue
            try:
                # A fine-tune's row runs on its adapter on this base (fetched here, loaded when it joins).
                adapter = self.runner.adapter_ref(self.spec, job, self.adapters)
                member.seq = self.loaded.sequence(job.id, inp, adapter) if adapter else \
                    self.loaded.sequence(job.id, inp)
            except (InputInvalid, ValueError) as exc:
                self.runner.started(row)
                self.write([(member, JobStatus.FAILED, {"error": {"code": getattr(exc, "code", "invalid_input"), "message": str(exc)}})])
                continue
            except Exception as exc:
                self.runner.started(row)
                self.write([(member, JobStatus.FAILED, {"error": error_for(exc, default_code="model_load_failed")})])
                continue
            if job.started_at and job.created_at:
                prom.QUEUE_SECONDS.labels(self.spec.name).observe((job.started_at - job.created_at).total_seconds())
            self.members[job.id] = member
            self.waiting.append(member)
            self.runner.started(row)
            if job.attempts > 1:
                # It may be what killed its last worker: it runs alone. Its
                # output starts again: the last attempt's deltas go.
                door.alone = True
                self.runner.live.clear(job.tenant_id, job.id)
        self.track()

    def claim(self, free: int) -> list:
        """Up to `free` jobs of this model, in line; closes the door when the
        line's head is not ours to take."""
        runner, door = self.runner, self.door
        head = self.head
        if not door.first:
            # The first claim is built around the head the runner has just read
            # (with the drain flag); later ones read the line again.
            with runner.sessions() as session:
                head = joblib.pool_head(session, self.pool)
                if head is None:
                    return []
                if (head.batch_model, head.batch_key) != (self.spec.name, self.batch_key) or head.type != self.head.type:
                    door.close(f"the pool's next job {head.id} is for {head.model}")
                    return []
                # Only with something to take: an idle look costs one read.
                if runner._draining(session):
                    door.close("the worker is draining")
                    return []
        top_up = not door.first and bool(self.members)
        with runner.sessions.begin() as session:
            jobs = joblib.claim_batch(
                session, pool=self.pool, first=head.id, model=self.spec.name, batch_key=self.batch_key,
                limit=free, owner=runner.owner, lease_seconds=runner.settings.lease_seconds, top_up=top_up)
        door.first = False
        if top_up and jobs and head.id not in {j.id for j in jobs}:
            # The head was passed over: a job on a later attempt, which runs
            # alone. Let this batch drain so it can.
            door.close(f"job {head.id} on a later attempt runs alone")
        return jobs

    def track(self) -> None:
        # A new list each time: the tracker's thread reads the old one meanwhile.
        self.tracker.rows = [m.row for m in self.members.values()]

    # --- rows in and out ---------------------------------------------------------

    def join(self) -> None:
        """Prefill the waiting rows that fit, in one forward pass, and add them."""
        if not self.waiting:
            return
        fits = []
        for member in list(self.waiting):
            if member.row.stop is not None:
                continue
            if self.engine.fits(member.seq) if not fits else self._fits_with(fits, member):
                fits.append(member)
            else:
                break  # in line: a later job does not pass one that waits for room
        if not fits:
            return
        fits = self._adapters_loaded(fits)
        if not fits:
            return
        now = time.monotonic()
        for m in fits:
            self.waiting.remove(m)
            m.joined, m.in_engine = now, True
        log.info("jobs %s join the running batch of %s (%d rows)", [m.row.job.id for m in fits], self.spec.name,
                 len(self.engine) + len(fits), extra={"job_ids": [m.row.job.id for m in fits], "model": self.spec.name})
        self.apply(self.engine.add([m.seq for m in fits]))

    def _adapters_loaded(self, fits: list[Member]) -> list[Member]:
        """Load the adapters of the rows about to join, one by one, between
        steps: one that cannot be served fails its own job, not the batch."""
        adapters = getattr(self.loaded, "adapters", None)
        keep = []
        for m in fits:
            ref = getattr(m.seq, "adapter", None)
            if ref is not None:
                try:
                    # The adapters of the rows joining with it stay loaded too.
                    adapters.ensure([k.seq.adapter for k in keep if k.seq.adapter is not None] + [ref])
                except Exception as exc:
                    self.waiting.remove(m)
                    self.write([(m, JobStatus.FAILED, {"error": error_for(exc, default_code="model_load_failed")})])
                    continue
            keep.append(m)
        return keep

    def _fits_with(self, chosen: list[Member], member: Member) -> bool:
        # fits() knows the running rows only; the rows chosen this step count too.
        # The engine's own bound on rows: an engine process takes rows ahead of room (models/engine_process.py).
        return len(self.engine) + len(chosen) + 1 <= self.engine.max_rows and self.engine.fits(member.seq) and (
            self.spec.max_batch_tokens is None or self._tokens(chosen + [member]) <= self.spec.max_batch_tokens)

    def _tokens(self, extra: list[Member]) -> int:
        # The running rows' budget as the engine counts it, plus the new ones at
        # the longest of all: a conservative bound, never an overshoot.
        lengths = [len(m.seq.prompt) + m.seq.limit for m in extra]
        running = [len(m.seq.prompt) + m.seq.limit for m in self.members.values() if m.in_engine]
        longest = max(lengths + running)
        return longest * (len(running) + len(extra))

    def apply(self, updates) -> None:
        """What the engine did this step: progress, live output, finished rows."""
        # The rows that ran this step: those still in, and those that just left.
        # (An engine process counts rows sent ahead of room too: at most max_batch_size decode together.)
        rows = min(len(self.engine) + sum(1 for u in updates if u.output is not None), self.spec.max_batch_size)
        now = time.monotonic()
        # Live output goes out for the whole batch at once, every PUBLISH_EVERY,
        # in one round trip; a row's first text goes at once (time to first token).
        flush = now - self.last_publish >= PUBLISH_EVERY
        done, out = [], []
        for u in updates:
            m = self.members.get(u.key)
            if m is None:
                continue
            m.most_rows = max(m.most_rows, rows)
            m.row.progress = {"current": int(u.tokens), "total": int(u.limit), "unit": "token"}
            m.row.progress_dirty = True
            if u.output is not None:
                m.in_engine, m.ending = False, True
                done.append((m, u))
            elif (flush or not m.deltas) and len(u.text) > len(m.published):
                # The flush is asked first: reading u.text decodes the row's tokens
                # (models/text_engine.Update), which every row every step cost the
                # decode loop more than a fifth of its time.
                out.append(self.delta(m, u.text))
        if flush:
            self.last_publish = now
        # A row's first text goes out now (time to first token); the rest, and
        # the ended rows' writes, at the next step boundary (write_finished).
        first = [item for item in out if item[2][0][0] == 0]
        self.publish(first)
        self.unpublished.extend(item for item in out if item[2][0][0] != 0)
        self.ended.extend(done)

    def write_finished(self) -> None:
        """Publish the live output held back and store and finish the rows that
        ended, and wait for it (after any boundary work in flight)."""
        self.settle()
        out, self.unpublished = self.unpublished, []
        self.publish(out)
        done, self.ended = self.ended, []
        if done:
            self.finished(done)

    def delta(self, m: Member, text: str) -> tuple[str, str, list]:
        """The delta `text` adds to what `m` has published, counted as sent."""
        item = (m.row.job.tenant_id, m.row.job.id, [(m.deltas, text[len(m.published):])])
        m.published, m.deltas = text, m.deltas + 1
        return item

    def publish(self, items: list) -> None:
        if items:
            self.runner.live.publish_many(items)

    def finished(self, done, pop: bool = True) -> list[str]:
        """Store and finish the rows that ended this step, in one transaction;
        the ids of the jobs that are no longer this batch's to write. With
        `pop=False` (on the books thread) they stay members until settle()."""
        runner = self.runner
        outcomes, rest, gone = [], [], []
        for m, u in done:
            job = m.row.job
            m.ending = False
            if m.row.stop is Stop.LEASE_LOST:
                continue  # stop_asked writes nothing for it
            files = getattr(u, "files", None) or {}
            text = u.output.get("text") if isinstance(u.output, dict) else None
            if isinstance(text, str) and len(text) > len(m.published):
                # The rest of the text goes out before the job is seen finished.
                rest.append(self.delta(m, text))
            try:
                output = retry(lambda: runner.store(job.id, Result(output=u.output, files=files)),
                               within=runner.settings.lease_seconds / 2, what=f"storing the outputs of job {job.id}")
            except Exception as exc:
                log.exception("storing the outputs of job %s failed; handing it back", job.id, extra={"job_id": job.id})
                self.stored_ok = False
                self.door.close("storage is down")
                gone.append(job.id)
                if pop:
                    self.members.pop(job.id, None)
                runner.not_stored([(m.row, exc)])
                continue
            run_seconds = time.monotonic() - m.joined
            prom.RUN_SECONDS.labels(self.spec.name).observe(run_seconds)
            prom.BATCH_SIZE.labels(self.spec.name).observe(m.most_rows)
            metrics = {"queue_seconds": round((job.started_at - job.created_at).total_seconds(), 4),
                       "run_seconds": round(run_seconds, 4), "batch_size": m.most_rows}
            if m.load_seconds is not None:
                metrics["model_load_seconds"] = round(m.load_seconds, 4)
            outcomes.append((m, JobStatus.SUCCEEDED, {"output": output, "metrics": metrics}))
        self.publish(rest)
        self.write(outcomes, pop=pop)
        return gone + [m.row.job.id for m, _, _ in outcomes]

    def stop_asked(self) -> None:
        """Drop the rows the tracker asked to stop, and write what becomes of them."""
        # A row that ended is written by write_finished, whatever was asked of it since.
        stopped = [m for m in self.members.values() if m.row.stop is not None and not m.ending]
        if not stopped:
            return
        outcomes, back = [], []
        for m in stopped:
            if m.in_engine:
                self.engine.drop(m.row.job.id)
                m.in_engine = False
                m.row.stopped_at = m.row.stopped_at or time.time()
            if m in self.waiting:
                self.waiting.remove(m)
            v = verdict(m.row.phase, m.row.stop, Ran.NOTHING, self.runner.shutdown.requested)
            if v is Verdict.CANCEL:
                outcomes.append((m, JobStatus.CANCELED, {}))
            elif v is Verdict.HAND_BACK:
                back.append(m)
            elif v is Verdict.DROP:
                self.members.pop(m.row.job.id, None)
                if m.row.settle():
                    self.runner.executions.ended(m.row.job.id, m.row.job.attempts, "lease_lost", at=m.row.stopped_at)
        for m in back:
            self.members.pop(m.row.job.id, None)
        self.runner.hand_back([m.row for m in back])
        self.write(outcomes)
        self.track()

    def write(self, outcomes: list[tuple[Member, JobStatus, dict]], pop: bool = True) -> None:
        if pop:
            for m, _, _ in outcomes:
                self.members.pop(m.row.job.id, None)
        self.runner.finish([(m.row, status, fields) for m, status, fields in outcomes])
        if pop:
            self.track()

    def failed(self, exc: Exception) -> None:
        """The engine (or a write) raised: every job still here fails with the
        reason, or goes back to the queue when the worker is shutting down."""
        runner = self.runner
        shutting_down = runner.shutdown.requested
        if shutting_down:
            log.warning("continuous batch interrupted by the shutdown (%s: %s); handing its jobs back",
                        type(exc).__name__, exc)
        else:
            log.exception("continuous batch of %s failed", self.spec.name,
                          extra={"job_ids": list(self.members)})
        self.tracker.close()
        if self.ended or self.booking is not None:
            # Rows that ended before the failure have their outputs: keep them.
            try:
                self.write_finished()
            except Exception:
                log.exception("finishing the rows that ended before the failure failed too")
                self.ended = []
                for m in self.members.values():
                    m.ending = False
        error = error_for(exc)
        outcomes, back = [], []
        for m in list(self.members.values()):
            v = verdict(m.row.phase, m.row.stop, Ran.RAISED, shutting_down)
            if v is Verdict.FAIL:
                outcomes.append((m, JobStatus.FAILED, {"error": error}))
            elif v is Verdict.CANCEL:
                outcomes.append((m, JobStatus.CANCELED, {}))
            elif v is Verdict.HAND_BACK:
                back.append(m.row)
            elif v is Verdict.DROP and m.row.settle():
                runner.executions.ended(m.row.job.id, m.row.job.attempts, "lease_lost", at=m.row.stopped_at)
        self.members.clear()
        runner.hand_back(back)
        runner.finish([(m.row, status, fields) for m, status, fields in outcomes])
