"""The reconciler beside every model worker: expired leases, lost doorbells,
old Idempotency-Keys, once every GENQ_RECONCILE_INTERVAL."""
from __future__ import annotations

import datetime as dt
import logging
import threading
import time

from kombu.exceptions import ChannelError

from genq import batches, idempotency
from genq.db import make_engine, make_sessionmaker
from genq.jobs import queued_heads, requeue_expired
from genq.notify import Notifier, notify_after_commit
from genq.outage import unavailable
from genq.queue import make_celery, publish
from genq.schema import utcnow
from genq.settings import Settings

log = logging.getLogger(__name__)


class Reconciler(threading.Thread):
    """Beside every worker: jobs whose lease expired in these pools (a killed
    worker) are queued again, or failed past max_attempts; queued jobs that
    have waited past a grace period get their doorbell rung again (a lost
    publish, a broker restart) unless their pool's queue still holds one;
    Idempotency-Key records past their TTL are purged. A duplicate doorbell
    would be harmless (the job row decides), but a backlog would collect one
    per pool every round. A round
    that fails (the database or the broker is down) is tried again next
    interval, so the thread outlives any outage."""

    def __init__(self, settings: Settings, pools: list[str]):
        super().__init__(name="reconciler", daemon=True)
        self.settings, self.pools = settings, pools
        self._storage = None

    @property
    def storage(self):
        """Storage, made on first use in this thread (batch result files)."""
        if self._storage is None:
            from genq.storage import make_storage

            self._storage = make_storage(self.settings)
        return self._storage

    def run(self) -> None:
        sessions = make_sessionmaker(make_engine(self.settings.database_url))
        # Jobs it requeues or ends ring the API's event streams.
        notify_after_commit(sessions, Notifier.from_settings(self.settings))
        app = make_celery(self.settings)
        first = True
        while True:
            try:
                self.round(sessions, app, first)
                first = False
            except Exception as exc:
                if (down := unavailable(exc)) is None:
                    log.exception("reconciler round failed; trying again in %ss", self.settings.reconcile_interval)
                else:
                    log.warning("reconciler round failed, the %s is unreachable; trying again in %ss",
                                down, self.settings.reconcile_interval)
            time.sleep(self.settings.reconcile_interval)

    def round(self, sessions, app, first: bool = False) -> None:
        with sessions.begin() as session:
            ring = requeue_expired(session, self.pools)
        requeued = len(ring)
        # The first round after a start rings for everything queued: the
        # broker may have lost every message while no worker was up.
        grace = dt.timedelta(seconds=0 if first else 2 * self.settings.reconcile_interval)
        with sessions() as session:
            heads = queued_heads(session, self.pools, older_than=utcnow() - grace)
        # A pool whose queue still holds a doorbell is served when a worker
        # takes it (a worker serves the pool's line, whatever job the doorbell
        # names): ringing again would add a duplicate every round for as long
        # as a backlog lasts. Only pools with none waiting are rung. A stale
        # doorbell waiting there is taken and dropped soon, and the next round
        # rings.
        waiting = {pool: doorbells_waiting(app, pool) for pool in {pool for _, pool in heads}}
        ring += [(job_id, pool) for job_id, pool in heads if not waiting[pool]]
        for job_id, pool in ring:
            publish(app, job_id, pool)
        if ring:
            log.info("reconciler: rang %d doorbell(s), %d for jobs queued again after their lease expired",
                     len(ring), requeued)
        # Batches whose jobs have all ended get their result files (genq.batches).
        if settled := batches.settle_open(sessions, self.storage):
            log.info("reconciler: settled %d batch(es)", settled)
        with sessions.begin() as session:
            if purged := idempotency.purge(session, dt.timedelta(seconds=self.settings.idempotency_ttl)):
                log.info("purged %d idempotency keys older than %ss", purged, self.settings.idempotency_ttl)


def doorbells_waiting(app, pool: str) -> int | None:
    """Messages waiting in the pool's queue (Redis: the list named after it,
    summed over kombu's priority lists; the filesystem broker: its files).
    None when the broker cannot say: then the pool is rung, as before."""
    try:
        with app.connection_for_read() as conn:
            conn.ensure_connection(max_retries=1)  # a broker that is down is not waited for here
            return conn.default_channel.queue_declare(queue=pool, passive=True).message_count
    except ChannelError:  # Redis: no list, so nothing waits
        return 0
    except Exception as exc:
        log.debug("could not count the doorbells waiting in %s (%s); ringing", pool, exc)
        return None
