"""The webhook sender: claim a due delivery, POST it signed to an address the
guard allowed, record the attempt; and the sweep beside it that rings for due
retries and lost messages and takes back deliveries whose sender died.

The POST goes to the address that was checked, not to the name: the host is
resolved here, every address it resolves to is checked, and the connection is
made to one of them with the name kept in the Host header and in TLS (SNI and
certificate check). Redirects are not followed, no proxy is used, and the
answer's body is read only up to a few hundred bytes for the log.
"""
from __future__ import annotations

import datetime as dt
import logging
import random
import socket
import threading
import time
from typing import Callable

import urllib3
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from genq import retention, serialize, webhook_secrets, webhooks
from genq.queue import publish_delivery
from genq.schema import Tenant, utcnow
from genq.settings import Settings
from genq.storage import Storage
from genq.webhook_guard import Policy, Resolver, Target, WebhookRefused, allowed_addresses, parse, system_resolver
from genq.webhooks import Outcome
from worker import metrics

log = logging.getLogger(__name__)

# How much of a failed answer's body goes into the log.
ERROR_BODY_BYTES = 300
USER_AGENT = "genq-webhooks/1"


def post(url: str, body: bytes, headers: dict[str, str], *, policy: Policy, timeout: float,
         resolver: Resolver = system_resolver, ca_certs: str | None = None) -> Outcome:
    """POST once and say how it went; never raises. Only 2xx is success."""
    started = time.monotonic()

    def done(status_code: int | None, error: str | None, retry_after: float | None = None) -> Outcome:
        return Outcome(status_code, error, int((time.monotonic() - started) * 1000), retry_after)

    try:
        target = parse(url, policy)
        addresses = allowed_addresses(target, policy, resolver)
        for i, address in enumerate(addresses):
            try:
                status, location, retry_after, snippet = _post_pinned(target, address, body, headers, timeout, ca_certs)
                break
            except urllib3.exceptions.NewConnectionError:
                # Refused or unreachable (say, an IPv6 address on a host without IPv6):
                # the next checked address, as a browser would. A timeout is not retried.
                if i == len(addresses) - 1:
                    raise
    except WebhookRefused as exc:
        return done(None, f"refused: {exc.message}")
    except (socket.gaierror, UnicodeError) as exc:
        return done(None, f"webhook host does not resolve: {exc}")
    except urllib3.exceptions.NewConnectionError as exc:  # a subclass of the timeout below, so first
        return done(None, f"could not connect: {str(exc.__cause__ or exc)[:200]}")
    except urllib3.exceptions.TimeoutError:
        return done(None, f"no answer within the {timeout:g} s timeout")
    except (urllib3.exceptions.HTTPError, OSError) as exc:
        return done(None, f"connection failed: {type(exc).__name__}: {str(exc)[:200]}")
    if 200 <= status < 300:
        return done(status, None)
    if 300 <= status < 400:
        return done(status, f"HTTP {status}: redirect to {location or '(no Location)'} not followed; "
                            "give the webhook's final URL")
    error = f"HTTP {status}" + (f": {snippet}" if snippet else "")
    return done(status, error, retry_after if status in (429, 503) else None)


def _post_pinned(target: Target, address: str, body: bytes, headers: dict[str, str], timeout: float,
                 ca_certs: str | None) -> tuple[int, str | None, float | None, str]:
    # Each read or connect may take `timeout`; the delivery's lease allows for both.
    limits = urllib3.Timeout(connect=timeout, read=timeout)
    if target.scheme == "https":
        pool = urllib3.HTTPSConnectionPool(
            address, target.port, timeout=limits, retries=False, maxsize=1, cert_reqs="CERT_REQUIRED",
            ca_certs=ca_certs, server_hostname=target.host, assert_hostname=target.host,
        )
    else:
        pool = urllib3.HTTPConnectionPool(address, target.port, timeout=limits, retries=False, maxsize=1)
    try:
        resp = pool.urlopen(
            "POST", target.path, body=body,
            headers={**headers, "Host": target.host_header, "User-Agent": USER_AGENT},
            redirect=False, retries=False, preload_content=False, assert_same_host=False,
        )
        try:
            snippet = resp.read(ERROR_BODY_BYTES).decode("utf-8", "replace").strip() if resp.status >= 300 else ""
        finally:
            resp.release_conn()
        retry_after = webhooks.parse_retry_after(resp.headers.get("Retry-After"))
        return resp.status, resp.headers.get("Location"), retry_after, " ".join(snippet.split())
    finally:
        pool.close()


class Sender:
    """Delivers one delivery per call. Collaborators, clock and randomness are
    passed in so tests can drive it without sleeping."""

    def __init__(self, settings: Settings, sessions: sessionmaker[Session], storage: Storage, *,
                 resolver: Resolver = system_resolver, clock: Callable[[], dt.datetime] = utcnow,
                 rng: Callable[[], float] = random.random, ca_certs: str | None = None):
        self.settings = settings
        self.sessions = sessions
        self.storage = storage
        self.policy = Policy.from_settings(settings)
        self.resolver = resolver
        self.clock = clock
        self.rng = rng
        self.ca_certs = ca_certs
        # Built now: a sender that cannot open the tenants' secrets fails at once, not per delivery.
        self.sealer = webhook_secrets.Sealer.from_settings(settings)

    @property
    def lease_seconds(self) -> float:
        # Connecting and reading may each take the timeout; a second more for
        # the database writes. Past this the sweep takes the delivery back.
        return 2 * self.settings.webhook_timeout + 1

    def deliver(self, delivery_id: str) -> str | None:
        """One attempt at a due delivery; returns its new status, or None when
        there was nothing to do (not due, or another sender has it)."""
        with self.sessions.begin() as session:
            delivery = webhooks.claim(session, delivery_id, self.lease_seconds, self.clock(),
                                      tenant_limit=self.settings.webhook_tenant_concurrency)
            if delivery is None:
                log.info("webhook delivery %s: nothing to send now (not due, taken, or its tenant's "
                         "deliveries in flight are at the limit)", delivery_id)
                return None
            keys = webhook_secrets.signing_keys(session, delivery.tenant_id, self.sealer, self.clock())
            own = session.scalar(select(Tenant.retention).where(Tenant.id == delivery.tenant_id))
        url_for_key = serialize.output_urls(self.storage, self.settings.api_base_url, delivery.job_id)
        kept = retention.effective(self.settings, own)["outputs"]
        payload = webhook_secrets.encode(webhooks.body(delivery, url_for_key, kept))
        headers = webhook_secrets.sign(keys, delivery.webhook_id, payload, self.clock())
        outcome = post(delivery.url, payload, headers, policy=self.policy, timeout=self.settings.webhook_timeout,
                       resolver=self.resolver, ca_certs=self.ca_certs)
        with self.sessions.begin() as session:
            status = webhooks.record(session, delivery, outcome, self.settings.webhook_backoff, self.clock(), self.rng)
        metrics.WEBHOOK_ATTEMPTS.labels(status or "lease_lost").inc()
        owner = f"job {delivery.job_id}" if delivery.job_id else f"batch {delivery.batch_id}"
        log.info("webhook %s %s of %s, attempt %d: %s in %d ms -> %s", delivery.id, delivery.event, owner,
                 delivery.attempts, outcome.status_code or outcome.error, outcome.duration_ms, status or "lease lost")
        return status


class Sweep:
    """Every `interval` seconds: take back deliveries whose sender died, then
    ring the doorbell for every due one. Runs as a thread in each sender
    process; row locks and the doorbell mark keep sweeps in several senders
    from ringing for the same row together."""

    def __init__(self, settings: Settings, sessions: sessionmaker[Session], celery):
        self.settings = settings
        self.sessions = sessions
        self.celery = celery
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def run_once(self) -> list[str]:
        with self.sessions.begin() as session:
            taken_back = webhooks.take_back_stale(session, self.settings.webhook_backoff)
        if taken_back:
            log.warning("webhook deliveries %s: their sender stopped mid-attempt; sending again", taken_back)
        with self.sessions.begin() as session:
            ring = webhooks.due(session, tenant_limit=self.settings.webhook_tenant_concurrency)
        for delivery_id in ring:
            publish_delivery(self.celery, delivery_id, self.settings.webhook_queue)
        return ring

    def start(self) -> "Sweep":
        self._thread = threading.Thread(target=self._loop, name="webhook-sweep", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)

    def _loop(self) -> None:
        while True:
            try:
                self.run_once()
            except Exception:  # the database or broker blinked: try again next round
                log.exception("webhook sweep failed")
            if self._stop.wait(self.settings.webhook_sweep_interval):
                return
