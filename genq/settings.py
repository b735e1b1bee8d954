"""Every knob genq has, read from GENQ_* environment variables in one place.

Unset variables fall back to the embedded default: a SQLite file, a local
storage folder and a filesystem broker under GENQ_HOME, so `genq up` runs on a
machine with no services. Nothing else in the code base reads os.environ.
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

from genq.errors import ConfigError

DEFAULT_REGISTRY = Path(__file__).resolve().parent.parent / "models" / "registry.yaml"
# A presigned URL (signature version 4) is valid for at most 7 days.
MAX_PRESIGN_SECONDS = 7 * 24 * 3600


def _home(env: Mapping[str, str]) -> Path:
    return Path(env.get("GENQ_HOME") or Path.home() / ".genq").expanduser().resolve()


@dataclass(frozen=True)
class Settings:
    # Where the embedded default keeps its database, broker folders, storage and demo checkpoints.
    home: Path
    # SQLAlchemy URL of the record of truth: Postgres in production, SQLite embedded.
    database_url: str
    # Celery broker: redis://... in production, filesystem:// embedded (no server needed).
    broker_url: str
    # s3://bucket[/prefix] for any S3 endpoint, or file:///dir for a local folder.
    storage_url: str
    # S3 endpoint for MinIO / moto / other S3-compatibles; None means AWS itself.
    s3_endpoint_url: str | None = None
    s3_region: str = "us-east-1"
    # Explicit S3 credentials; None lets boto3 find them (instance role, ~/.aws, ...).
    s3_access_key_id: str | None = None
    s3_secret_access_key: str | None = None
    # How long a presigned output URL stays valid (seconds): 1 to 604800, the
    # 7 days S3's signature version 4 allows at most.
    presign_seconds: int = 3600
    # The model registry: which models exist, their family, checkpoint, pool and limits.
    registry_path: Path = DEFAULT_REGISTRY
    # Where demo checkpoints are built and remote checkpoints are cached.
    model_dir: Path = Path(".")
    # torch device for workers: "cpu", "cuda", "cuda:1", or "auto" (cuda when present).
    device: str = "auto"
    # Threads a worker process gives torch for work on the CPU; 0 keeps torch's
    # default (one per core). A CPU worker sharing its cores with the API, the
    # database or other workers runs steadier with fewer: torch's threads wait
    # for each other at every operation, so one preempted thread stalls them all.
    torch_threads: int = 0
    # Memory a worker process may spend on loaded models before evicting the
    # least recently used one (bytes of parameters and buffers).
    model_cache_bytes: int = 8 * 2**30
    # A claimed job belongs to its worker until now + lease_seconds; renewed while it runs.
    lease_seconds: int = 120
    # Attempts before a job whose worker keeps disappearing is failed.
    max_attempts: int = 3
    # Progress is written to the database at most this often per job (seconds).
    progress_interval: float = 1.0
    # Cancel requests are read from the database at most this often per batch (seconds).
    cancel_poll_interval: float = 0.5
    # The pool (Celery queue) fine-tune jobs run on, one job per worker process.
    training_pool: str = "training"
    # A fine-tune saves a resumable checkpoint to storage every this many steps.
    checkpoint_every: int = 50
    # Largest file POST /v1/files accepts (bytes) and most rows in a dataset.
    max_file_bytes: int = 50 * 2**20
    max_dataset_rows: int = 100_000
    # Bytes of uploaded files a tenant may have stored in all (0 = no limit).
    # Outputs need no quota of their own: they are bounded by each model's
    # input limits and the active-jobs quota.
    max_tenant_file_bytes: int = 2**30
    # The most work one fine-tune may ask for, where its base model's registry
    # entry sets no `max_train_steps` / `max_train_examples` (0 = no limit):
    # optimizer steps, and examples trained on (rows × epochs, or what
    # max_steps leaves of that). 10,000 steps is over a hundred times what the
    # demo needs to learn a phrase, yet a bound on how long one job holds a
    # training worker; 200,000 examples is the largest dataset accepted
    # (max_dataset_rows) for two epochs. Raise them per model in the registry.
    max_train_steps: int = 10_000
    max_train_examples: int = 200_000
    # Workers look for jobs whose lease expired (a killed worker) this often (seconds).
    reconcile_interval: float = 30.0
    # Requests per tenant (flask-limiter syntax, e.g. "1200/minute"); empty turns it off.
    rate_limit: str = "1200/minute"
    # Where request counts live; empty = the broker's Redis, or memory when embedded.
    ratelimit_storage_url: str = ""
    # Jobs a tenant may have queued or running at once (0 = no limit).
    max_active_jobs: int = 200
    # After SIGTERM a worker claims nothing new and gives its batch this long to
    # finish (seconds); then the batch's jobs are handed back to the queue at
    # their next step, without counting an attempt. Keep it below the
    # orchestrator's grace period (Compose's stop_grace_period, Kubernetes'
    # terminationGracePeriodSeconds) by 10 s (see shutdown_deadline).
    shutdown_timeout: float = 240.0
    # An unacknowledged Redis message is delivered again after this long
    # (seconds). Keep it above the longest job: a redelivery is harmless (the
    # job row decides), but each one wakes a worker for nothing.
    broker_visibility_timeout: float = 6 * 3600
    # How often a worker looks for unacknowledged messages older than the
    # visibility timeout to put back (seconds; kombu's default is about 100).
    broker_restore_interval: float = 100.0
    # Idempotency-Key records are kept at least this long (seconds), then purged.
    idempotency_ttl: int = 24 * 3600
    # When set, workers append one JSON line per job execution (start and end,
    # worker, attempt) to this file: an audit trail of what actually ran where.
    execution_log: Path | None = None
    # Largest request body the API accepts; bigger is 413.
    max_body_bytes: int = 1_048_576
    # Longest `Prefer: wait=N` the API honours (seconds).
    max_prefer_wait: int = 60
    # Where `genq up` / `genq api` listen.
    api_host: str = "127.0.0.1"
    api_port: int = 8000
    # gunicorn worker processes `genq api` starts (its --workers overrides), and
    # threads in each: every request holds one thread while it is served.
    api_workers: int = 2
    api_threads: int = 8
    # Threads per API process that long-held requests (event streams, honoured
    # `Prefer: wait`) may take at once; the rest always serve short requests.
    # None = half of api_threads. Past it a stream is 503, a wait is not honoured.
    api_held_threads: int | None = None
    # Long-held requests one tenant may have open at once, across every API
    # process (counted in the rate limiter's Redis); 0 = no per-tenant cap.
    # Past it a stream is 429, a wait is not honoured.
    max_held_requests: int = 4
    # An event stream ends after this long (seconds); the client reconnects
    # with Last-Event-ID and misses nothing. Frees its slot for others meanwhile.
    event_stream_seconds: int = 300
    # Log level for every process.
    log_level: str = "INFO"
    # "text" for people at a terminal; "json" for a log pipeline: one object a
    # line, with the job id on every line about a job.
    log_format: str = "text"
    # Port a worker serves Prometheus /metrics on (0 = off). The API serves its
    # own at /metrics on the API port.
    metrics_port: int = 0
    # The API's job gauges are read from the database at most once per this
    # many seconds per process (0 = on every scrape): a scrape storm costs one query.
    metrics_cache_seconds: float = 5.0
    # When set, the API's /metrics needs `Authorization: Bearer <this>`.
    metrics_token: str | None = None
    # Set by `genq worker` to its Celery node name (the -n value), the name
    # /v1/admin/workers lists and drains; empty outside a worker.
    worker_name: str = ""
    # A worker writes "still alive" to the database this often (seconds); one
    # silent for three intervals is listed as gone.
    heartbeat_interval: float = 5.0
    # Base URL the API is reached at from outside, for URLs inside webhook
    # payloads (local-storage outputs); None means http://{api_host}:{api_port}.
    public_url: str | None = None
    # Celery queue the webhook sender consumes: `genq worker --pool webhooks`.
    webhook_queue: str = "webhooks"
    # One POST may wait this long to connect and as long again for the answer (seconds).
    webhook_timeout: float = 15.0
    # Waits before each retry of a failed delivery (seconds), jittered by ±20%.
    # The Standard Webhooks schedule: 5 s, 5 min, 30 min, 2 h, 5 h, 10 h, 10 h,
    # so eight attempts over about 27.6 hours before a delivery is marked failed.
    webhook_backoff: tuple[float, ...] = (5.0, 300.0, 1800.0, 7200.0, 18000.0, 36000.0, 36000.0)
    # After a secret is rotated, the old one keeps signing beside the new one this long (seconds).
    webhook_secret_grace: int = 24 * 3600
    # The sender looks for due retries and deliveries whose message was lost this often (seconds).
    webhook_sweep_interval: float = 1.0
    # Webhook URLs must be https; true lets http:// through too (local use only).
    webhook_allow_http: bool = False
    # True turns off the address check for every host: only for a deployment
    # whose receivers all sit on a private network the operator trusts.
    webhook_allow_private: bool = False
    # Hosts, exactly as written in the URL, exempt from the address check
    # (e.g. "127.0.0.1" for a receiver on this machine). Comma-separated in the env.
    webhook_allowed_hosts: tuple[str, ...] = ()
    # Deliveries of one tenant being posted at once, across every sender. Keep
    # it below the sender's threads (8): a tenant whose receiver hangs then
    # holds only this many, and the other tenants' deliveries go on.
    webhook_tenant_concurrency: int = 4
    # Times a job's events may be sent again on request (each one a new
    # schedule of up to eight POSTs); past it, redeliver answers 409.
    webhook_max_redeliveries: int = 10

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, **overrides) -> "Settings":
        env = os.environ if env is None else env
        home = Path(overrides.pop("home", None) or _home(env))

        def get(name: str, default):
            return env.get(f"GENQ_{name.upper()}", default)

        def num(name: str, default, kind):
            raw = get(name, None)
            if raw is None or raw == "":
                return default
            try:
                return kind(raw)
            except ValueError:
                raise ConfigError(f"GENQ_{name.upper()} must be a {kind.__name__}, got {raw!r}") from None

        def flag(name: str, default: bool) -> bool:
            raw = get(name, None)
            if raw is None or raw == "":
                return default
            if raw.strip().lower() in ("1", "true", "yes", "on"):
                return True
            if raw.strip().lower() in ("0", "false", "no", "off"):
                return False
            raise ConfigError(f"GENQ_{name.upper()} must be true or false, got {raw!r}")

        def items(name: str, default: tuple, kind) -> tuple:
            raw = get(name, None)
            if raw is None:
                return default
            try:
                return tuple(kind(part.strip()) for part in raw.split(",") if part.strip())
            except ValueError:
                raise ConfigError(f"GENQ_{name.upper()} must be comma-separated {kind.__name__}s, got {raw!r}") from None

        values = dict(
            home=home,
            database_url=get("database_url", f"sqlite:///{home / 'genq.db'}"),
            broker_url=get("broker_url", "filesystem://"),
            storage_url=get("storage_url", (home / "storage").as_uri()),
            s3_endpoint_url=get("s3_endpoint_url", None) or None,
            s3_region=get("s3_region", "us-east-1"),
            s3_access_key_id=get("s3_access_key_id", None) or None,
            s3_secret_access_key=get("s3_secret_access_key", None) or None,
            presign_seconds=num("presign_seconds", 3600, int),
            registry_path=Path(get("registry", DEFAULT_REGISTRY)),
            model_dir=Path(get("model_dir", home / "models")),
            device=get("device", "auto"),
            torch_threads=num("torch_threads", 0, int),
            model_cache_bytes=num("model_cache_bytes", 8 * 2**30, int),
            lease_seconds=num("lease_seconds", 120, int),
            max_attempts=num("max_attempts", 3, int),
            progress_interval=num("progress_interval", 1.0, float),
            cancel_poll_interval=num("cancel_poll_interval", 0.5, float),
            training_pool=get("training_pool", "training"),
            checkpoint_every=num("checkpoint_every", 50, int),
            max_file_bytes=num("max_file_bytes", 50 * 2**20, int),
            max_dataset_rows=num("max_dataset_rows", 100_000, int),
            max_tenant_file_bytes=num("max_tenant_file_bytes", 2**30, int),
            max_train_steps=num("max_train_steps", 10_000, int),
            max_train_examples=num("max_train_examples", 200_000, int),
            reconcile_interval=num("reconcile_interval", 30.0, float),
            rate_limit=get("rate_limit", "1200/minute"),
            ratelimit_storage_url=get("ratelimit_storage_url", ""),
            max_active_jobs=num("max_active_jobs", 200, int),
            shutdown_timeout=num("shutdown_timeout", 240.0, float),
            broker_visibility_timeout=num("broker_visibility_timeout", 6 * 3600, float),
            broker_restore_interval=num("broker_restore_interval", 100.0, float),
            idempotency_ttl=num("idempotency_ttl", 24 * 3600, int),
            execution_log=Path(get("execution_log", "")) if get("execution_log", "") else None,
            max_body_bytes=num("max_body_bytes", 1_048_576, int),
            max_prefer_wait=num("max_prefer_wait", 60, int),
            api_host=get("api_host", "127.0.0.1"),
            api_port=num("api_port", 8000, int),
            api_workers=num("api_workers", 2, int),
            api_threads=num("api_threads", 8, int),
            api_held_threads=num("api_held_threads", None, int),
            max_held_requests=num("max_held_requests", 4, int),
            event_stream_seconds=num("event_stream_seconds", 300, int),
            log_level=get("log_level", "INFO"),
            log_format=get("log_format", "text"),
            metrics_port=num("metrics_port", 0, int),
            metrics_cache_seconds=num("metrics_cache_seconds", 5.0, float),
            metrics_token=get("metrics_token", None) or None,
            worker_name=get("worker_name", ""),
            heartbeat_interval=num("heartbeat_interval", 5.0, float),
            public_url=get("public_url", None) or None,
            webhook_queue=get("webhook_queue", "webhooks"),
            webhook_timeout=num("webhook_timeout", 15.0, float),
            webhook_backoff=items("webhook_backoff", cls.webhook_backoff, float),
            webhook_secret_grace=num("webhook_secret_grace", 24 * 3600, int),
            webhook_sweep_interval=num("webhook_sweep_interval", 1.0, float),
            webhook_allow_http=flag("webhook_allow_http", False),
            webhook_allow_private=flag("webhook_allow_private", False),
            webhook_allowed_hosts=items("webhook_allowed_hosts", (), str),
            webhook_tenant_concurrency=num("webhook_tenant_concurrency", 4, int),
            webhook_max_redeliveries=num("webhook_max_redeliveries", 10, int),
        )
        values.update(overrides)
        if values["log_format"] not in ("text", "json"):
            raise ConfigError(f"GENQ_LOG_FORMAT must be text or json, got {values['log_format']!r}")
        for name in ("max_train_steps", "max_train_examples"):
            if values[name] < 0:
                raise ConfigError(f"GENQ_{name.upper()} must be 0 (no limit) or more, got {values[name]}")
        if values["torch_threads"] < 0:
            raise ConfigError(f"GENQ_TORCH_THREADS must be 0 (torch's default) or more, got {values['torch_threads']}")
        if not 1 <= values["presign_seconds"] <= MAX_PRESIGN_SECONDS:
            raise ConfigError(f"GENQ_PRESIGN_SECONDS must be from 1 to {MAX_PRESIGN_SECONDS} (7 days, the longest "
                              f"S3 allows), got {values['presign_seconds']}")
        if values["max_tenant_file_bytes"] < 0:
            raise ConfigError(f"GENQ_MAX_TENANT_FILE_BYTES must be 0 (no limit) or more, got {values['max_tenant_file_bytes']}")
        for name in ("api_workers", "api_threads", "event_stream_seconds"):
            if values[name] < 1:
                raise ConfigError(f"GENQ_{name.upper()} must be 1 or more, got {values[name]}")
        for name in ("max_held_requests", "metrics_cache_seconds"):
            if values[name] < 0:
                raise ConfigError(f"GENQ_{name.upper()} must be 0 or more, got {values[name]}")
        held = values["api_held_threads"]
        if held is not None and not 0 <= held < values["api_threads"]:
            raise ConfigError(f"GENQ_API_HELD_THREADS must be from 0 to GENQ_API_THREADS - 1 ({values['api_threads'] - 1}), "
                              f"leaving threads for short requests; got {held}")
        return cls(**values)

    def replace(self, **changes) -> "Settings":
        return dataclasses.replace(self, **changes)

    def as_env(self) -> dict[str, str]:
        """The GENQ_* variables that reproduce these settings in a child process."""
        out = {"GENQ_HOME": str(self.home)}
        for f in dataclasses.fields(self):
            if f.name == "home":
                continue
            value = getattr(self, f.name)
            if isinstance(value, tuple):
                value = ",".join(str(v) for v in value)
            if value is not None:
                out[f"GENQ_{f.name.upper()}"] = str(value)
        out["GENQ_REGISTRY"] = str(self.registry_path)
        out.pop("GENQ_REGISTRY_PATH", None)
        return out

    @property
    def shutdown_deadline(self) -> float:
        """The longest a worker takes to stop after SIGTERM: the shutdown
        timeout, then 10 s for the model to reach its next step and stop."""
        return self.shutdown_timeout + 10.0

    @property
    def held_threads(self) -> int:
        """Threads per API process long-held requests may take (see api_held_threads)."""
        return self.api_threads // 2 if self.api_held_threads is None else self.api_held_threads

    @property
    def embedded_broker(self) -> bool:
        return self.broker_url.startswith("filesystem://")

    @property
    def api_base_url(self) -> str:
        """Where clients reach the API, for URLs the service hands out outside a request."""
        return (self.public_url or f"http://{self.api_host}:{self.api_port}").rstrip("/")
