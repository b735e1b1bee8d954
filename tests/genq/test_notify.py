"""Doorbells for event streams (genq.notify): published after a commit that
wrote job events, never after a rollback, and never failing a transition."""
from __future__ import annotations

import secrets
import time

import redis

from genq import jobs as joblib
from genq.notify import PATTERN, Notifier, channel, notify_after_commit
from genq.schema import Job
from genq.states import JobStatus
from tests.conftest import REDIS_URL


def listen():
    client = redis.Redis.from_url(REDIS_URL)
    pubsub = client.pubsub(ignore_subscribe_messages=True)
    pubsub.psubscribe(PATTERN)
    # The subscription's own confirmation first.
    pubsub.get_message(timeout=2)
    pubsub.keep = client  # a client collected closes its connections, the subscription's too
    return pubsub


def heard(pubsub, jobs: list[str], seconds: float = 2.0) -> dict[str, int]:
    """What rang on the channels of `jobs`: the pattern hears every job on the
    server, and other test runs (or this run's workers) may be ringing theirs."""
    mine = {channel(j) for j in jobs}
    out: dict[str, int] = {}
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        message = pubsub.get_message(timeout=0.2)
        if message and message["type"] == "pmessage" and message["channel"].decode() in mine:
            out[message["channel"].decode()] = int(message["data"])
    return out


def submit(session, tenant="t-notify"):
    from genq.keys import create_key

    owner, _ = create_key(session, f"{tenant}-{secrets.token_hex(3)}", "user")
    session.flush()
    return joblib.submit(session, tenant_id=owner.id, type_="text-generation", model="demo-text", pool="p",
                         batch_key="k", input_={})


def test_a_commit_that_wrote_events_rings_once_per_job_a_rollback_never(sessions):
    notify_after_commit(sessions, Notifier(redis.Redis.from_url(REDIS_URL)))
    notify_after_commit(sessions, Notifier(redis.Redis.from_url(REDIS_URL)))  # hooked once however often asked
    pubsub = listen()
    with sessions.begin() as session:
        job = submit(session)
        job_id = job.id
    got = heard(pubsub, [job_id])
    # The submit's queued event goes in by Core (no id read back): the doorbell says 0.
    assert got == {channel(job_id): 0}
    # A cancel is a state change with an event: it rings too.
    with sessions.begin() as session:
        joblib.cancel(session, session.get(Job, job_id))
    got = heard(pubsub, [job_id])
    assert list(got) == [channel(job_id)]
    with sessions() as session:
        assert got[channel(job_id)] == max(e.id for e in joblib.events(session, job_id))
    # Rolled back: nothing was written, nothing rings.
    session = sessions()
    rolled_back = submit(session, "t-notify-rollback").id
    session.flush()
    session.rollback()
    session.close()
    assert heard(pubsub, [rolled_back], 1.0) == {}


def test_redis_down_never_fails_a_transition(sessions):
    dead = Notifier(redis.Redis(host="127.0.0.1", port=1, socket_connect_timeout=0.5, socket_timeout=0.5))
    notify_after_commit(sessions, dead)
    with sessions.begin() as session:
        job_id = submit(session, "t-notify-down").id
    with sessions() as session:
        assert session.get(Job, job_id).status == JobStatus.QUEUED.value
    # And the next commit does not wait out another timeout.
    started = time.monotonic()
    with sessions.begin() as session:
        joblib.cancel(session, session.get(Job, job_id))
    assert time.monotonic() - started < 5
