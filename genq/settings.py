"""Every knob genq has, read from GENQ_* environment variables in one place.

Each knob is one field below: its type, its default, and its description,
which is also its row in the README's settings table (`python -m genq.settings
--markdown` writes it). Unset variables fall back to the embedded default: a
SQLite file, a local storage folder and a filesystem broker under GENQ_HOME, so
`genq up` runs on a machine with no services. Nothing else in the code base
reads os.environ.

A plain pydantic model rather than pydantic-settings: `from_env` reads the
mapping it is handed (tests pass their own), lists are comma-separated rather
than JSON, and misspelt names must be refused. pydantic-settings reads
os.environ itself, decodes lists as JSON and ignores unknown variables, so each
would be worked around; the one loop in `from_env` is all it would replace.
"""
from __future__ import annotations

import difflib
import os
import sys
from pathlib import Path
from typing import Any, Literal, Mapping

from cryptography.fernet import Fernet
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from genq.errors import ConfigError

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_REGISTRY = ROOT / "models" / "registry.yaml"
README = ROOT / "README.md"
# A presigned URL (signature version 4) is valid for at most 7 days.
MAX_PRESIGN_SECONDS = 7 * 24 * 3600
# Defaults under GENQ_HOME are written with this placeholder and filled in once home is known.
HOME = "$GENQ_HOME"

# GENQ_* variables that are not settings, so they are not refused as misspelt:
# the worker image's pool, read by its start command's shell (infra/Dockerfile.worker),
# the client's (genq/client/_core.py: where the API is, the key it sends; a
# shell that runs `genq up` and `genq run` side by side has them set),
# and the tests' and benchmarks' own knobs (GENQ_TEST_PG_URL, GENQ_BENCH_PG_URL...).
NOT_SETTINGS = ("GENQ_POOL", "GENQ_URL", "GENQ_API_KEY")
NOT_SETTING_PREFIXES = ("GENQ_TEST_", "GENQ_BENCH_")

# The README table's sections, in this order.
PLACES = "Where things are"
WORKERS = "Workers"
RECOVERY = "Recovery"
API = "API"
LIMITS = "Files and fine-tuning"
WEBHOOKS = "Webhook sending"
OBSERVING = "Logs and metrics"


def knob(default: Any, section: str, about: str, *, env: str | None = None, shown: str | None = None,
         secret: bool = False, empty_is_a_value: bool = False) -> Any:
    """One setting: its default, the README section it is listed in, and what
    it does. `env` names a variable other than GENQ_<FIELD>; `shown` is the
    default as the README writes it; a `secret` is never echoed in an error or
    a repr; `empty_is_a_value` keeps an empty variable as "" (otherwise empty
    means the default)."""
    extra = {"section": section, "env": env, "shown": shown, "secret": secret, "empty_is_a_value": empty_is_a_value}
    return Field(default, description=about, repr=not secret, json_schema_extra=extra)


class Settings(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    # ---- where things are
    home: Path = knob(Path.home() / ".genq", PLACES, "Where the embedded default keeps its database, broker "
                      "folders, storage, demo checkpoints, API key and webhook key.", shown="`~/.genq`")
    database_url: str = knob(f"sqlite:///{HOME}/genq.db", PLACES, "SQLAlchemy URL of the record of truth: "
                             "Postgres in production (`postgresql+psycopg://user@host/genq`), SQLite embedded.")
    broker_url: str = knob("filesystem://", PLACES, "Celery broker: `redis://host:6379/0` in production; "
                           "`filesystem://` (files under `$GENQ_HOME/broker`, no server) embedded.")
    storage_url: str = knob(f"file://{HOME}/storage", PLACES,
                            "Where outputs and uploads go: `s3://bucket[/prefix]` for any S3 endpoint, or "
                            "`file:///dir` for a local folder.")
    s3_endpoint_url: str | None = knob(None, PLACES, "S3 endpoint for MinIO, moto or another S3-compatible "
                                       "store; unset means AWS itself.")
    s3_public_endpoint_url: str | None = knob(None, PLACES, "The S3 endpoint as clients see it, used only to "
                                              "presign output URLs (the signature covers the host, so a URL cannot "
                                              "be rewritten afterwards); every read and write still goes to "
                                              "`GENQ_S3_ENDPOINT_URL`. Set it when the services reach S3 by a name "
                                              "clients cannot resolve (Compose's `s3:8333`); unset presigns for "
                                              "`GENQ_S3_ENDPOINT_URL`.")
    s3_region: str = knob("us-east-1", PLACES, "S3 region.")
    s3_access_key_id: str | None = knob(None, PLACES, "S3 credentials; unset lets boto3 find them "
                                        "(instance role, `~/.aws`, ...).")
    s3_secret_access_key: str | None = knob(None, PLACES, "The secret half of the S3 credentials.", secret=True)
    presign_seconds: int = knob(3600, PLACES, "How long a presigned output URL stays valid (seconds): 1 to "
                                "604800, the 7 days S3's signature version 4 allows at most.")
    registry_path: Path = knob(DEFAULT_REGISTRY, PLACES, "The model registry: which models exist, their family, "
                               "checkpoint, pool and limits (see [Models](#models)).",
                               env="GENQ_REGISTRY", shown="`models/registry.yaml`")
    model_dir: Path = knob(Path(f"{HOME}/models"), PLACES, "Where demo checkpoints are built and fine-tuned "
                           "versions are cached.")

    # ---- workers
    device: str = knob("auto", WORKERS, "torch device for workers: `cpu`, `cuda`, `cuda:1`; `auto` picks CUDA "
                       "when present.")
    torch_threads: int = knob(0, WORKERS, "Threads a worker process gives torch for work on the CPU; 0 keeps "
                              "torch's default (one per core). A CPU worker sharing its cores with the API, the "
                              "database or other workers runs steadier with fewer: torch's threads wait for each "
                              "other at every operation, so one preempted thread stalls them all.")
    engine_process: bool = knob(True, WORKERS, "Decode text rows (the transformers engine) in a process of their "
                                "own, one per loaded text model, which holds its weights (the worker keeps the "
                                "tokenizer): the decode never shares an interpreter lock with the worker's claims, "
                                "writes and leases (bench/continuous.py, saturated: service ÷ bare engine 0.91-0.95 "
                                "with it, 0.75-0.85 without; see the README), as vLLM runs its engine core. Costs a "
                                "few seconds at each text model's load (a fresh interpreter imports torch and "
                                "loads the weights) and that process's own memory besides the weights (a CUDA "
                                "context of its own on a GPU); `false` decodes on a thread of the worker.")
    model_cache_bytes: int = knob(8 * 2**30, WORKERS, "Memory a worker process may spend on loaded models "
                                  "(parameters and buffers) before evicting the least recently used one.")
    max_adapters: int = knob(32, WORKERS, "LoRA fine-tunes a worker keeps loaded as adapters on each loaded base "
                             "model (the least recently used evicted first). An adapter a running row uses stays, "
                             "so a batch of adapters all in use may hold more, by at most its rows. Their memory "
                             "counts toward `GENQ_MODEL_CACHE_BYTES` with their base's.")
    lease_seconds: int = knob(120, WORKERS, "A claimed job belongs to its worker for this long (seconds), "
                              "renewed while it runs; a killed worker's jobs go back to the queue once it lapses.")
    max_attempts: int = knob(3, WORKERS, "Attempts before a job whose worker keeps disappearing is failed "
                             "(`attempts_exhausted`).")
    progress_interval: float = knob(1.0, WORKERS, "Progress is written to the database at most this often per "
                                    "job (seconds).")
    cancel_poll_interval: float = knob(0.5, WORKERS, "A running batch reads cancel requests at most this often "
                                       "(seconds).")
    heartbeat_interval: float = knob(5.0, WORKERS, "A worker writes \"still alive\" to the database this often "
                                     "(seconds); one silent for three intervals is listed as gone "
                                     "(see [Operators](#operators)).")
    worker_name: str = knob("", WORKERS, "Set by `genq worker` to its Celery node name, the name heartbeats, "
                            "lease owners and `/v1/admin/workers` use; not for setting by hand.",
                            shown="set by `genq worker`")

    # ---- recovery
    reconcile_interval: float = knob(30.0, RECOVERY, "Seconds between the reconciler's rounds: expired leases "
                                     "(a killed worker), lost doorbells, old idempotency keys.")
    shutdown_timeout: float = knob(240.0, RECOVERY, "After SIGTERM a worker claims nothing new and gives its "
                                   "batch this long to finish (seconds); then the batch's jobs are handed back to "
                                   "the queue at their next step, without counting an attempt. Keep it 10 s below "
                                   "the orchestrator's grace period (Compose's `stop_grace_period`, Kubernetes' "
                                   "`terminationGracePeriodSeconds`).")
    broker_visibility_timeout: float = knob(6 * 3600.0, RECOVERY, "Seconds before Redis hands an unacknowledged "
                                            "message out again. Keep it above the longest job: a redelivery is "
                                            "harmless (the job row decides), but each one wakes a worker for nothing.")
    broker_restore_interval: float = knob(100.0, RECOVERY, "Seconds between a worker's sweeps for unacknowledged "
                                          "messages older than the visibility timeout.")
    idempotency_ttl: int = knob(24 * 3600, RECOVERY, "Seconds an `Idempotency-Key` record is kept at least, "
                                "then purged.")
    output_retention_seconds: int = knob(7 * 24 * 3600, RECOVERY, "A finished job's outputs (its files in "
                                         "storage and its `output`) are deleted this long after it ended "
                                         "(seconds; 0 keeps them). A job shows when as `expires_at`. An admin can "
                                         "set a tenant's own (`PUT /v1/admin/tenants/<name>/retention`).")
    job_retention_seconds: int = knob(30 * 24 * 3600, RECOVERY, "A finished job's row, with its events and "
                                      "webhook deliveries, is deleted this long after it ended (seconds; 0 "
                                      "keeps it).")
    file_retention_seconds: int = knob(0, RECOVERY, "An uploaded file is deleted this long after its upload "
                                       "(seconds; 0 keeps it until deleted), unless a queued or running "
                                       "fine-tune uses it. A file shows when as `expires_at`.")
    sweep_interval: float = knob(60.0, RECOVERY, "Seconds between a worker's retention sweeps (expired outputs, "
                                 "jobs and files, and storage deletes still owed).")
    sweep_batch: int = knob(500, RECOVERY, "The most rows one sweep step expires at once: a long backlog is "
                            "worked off in bounded transactions.")
    execution_log: Path | None = knob(None, RECOVERY, "A file workers append one JSON line to when a job starts "
                                      "and stops executing (worker, attempt, time): evidence of what ran where.")

    # ---- API
    api_host: str = knob("127.0.0.1", API, "Where `genq up` and `genq api` listen.")
    api_port: int = knob(8000, API, "The port they listen on.")
    api_workers: int | None = knob(None, API, "gunicorn processes `genq api` starts (its `--workers` overrides). "
                                   "Unset: one per CPU core, at most 8; Python runs one thread at a time per "
                                   "process, so processes, not threads, use the cores, and more processes than "
                                   "cores only take turns on them (bench/api.py on 2 cores: a submit cost 1.7 ms "
                                   "of the API's CPU with 2 processes, 2.2-2.3 ms with 4, and its p99 halved).",
                                   shown="cores, at most 8")
    api_threads: int = knob(8, API, "Threads in each API process; a request holds one while it is served.")
    api_access_log: bool = knob(False, API, "`genq api` writes gunicorn's access log (a line per request, to "
                                "stderr). Off by default: at thousands of requests a second the line costs "
                                "more than a poll; each response's `X-Request-Id` still finds its log lines.")
    api_held_threads: int | None = knob(None, API, "Threads per API process that long-held requests (event "
                                        "streams, honoured `Prefer: wait`) may take at once; the rest always serve "
                                        "short requests. Past it a stream is 503 and a wait is not honoured.",
                                        shown="half of `GENQ_API_THREADS`")
    max_held_requests: int = knob(4, API, "Long-held requests one tenant may have open at once, across every API "
                                  "process (counted in the rate limiter's Redis); 0 = no cap. Past it a stream is "
                                  "429 and a wait is not honoured.")
    event_stream_seconds: int = knob(300, API, "An event stream ends after this long (seconds); the client "
                                     "reconnects with `Last-Event-ID` and misses nothing.")
    max_body_bytes: int = knob(1_048_576, API, "Largest request body the API accepts; bigger is 413.")
    max_prefer_wait: int = knob(60, API, "Longest `Prefer: wait=N` the API honours (seconds).")
    openai_wait_seconds: float = knob(300.0, API, "How long the OpenAI-compatible routes (`/v1/completions`, "
                                    "`/v1/chat/completions`, `/v1/images/generations`) hold a request for its "
                                    "jobs (seconds); past it they answer 504 in OpenAI's error shape and cancel "
                                    "the jobs, so a client's retry does not leave them running twice.")
    public_url: str | None = knob(None, API, "The API's address as clients see it, for every output URL it hands "
                                  "out (answers and webhook payloads; never the request's `Host` header). Set it "
                                  "when clients reach the API through another address (a proxy, a container's "
                                  "published port). Unset, `genq up` and `genq api --bind` use the port they "
                                  "listen on.", shown="`http://$GENQ_API_HOST:$GENQ_API_PORT`")
    rate_limit: str = knob("1200/minute", API, "Requests per tenant across every route (a caller without a key: per address), "
                           "as `N/second`, `N/minute`, `N/hour` or `N/day` (the `limits` library's syntax); empty turns it off. "
                           "Counted in a sliding window in Redis, which each API process leases tokens from in batches "
                           "(api/limits.py): within a window a tenant gets at most the limit plus "
                           "limit/100 (at most 50) per API process; under 100 a window, exactly the limit.",
                           empty_is_a_value=True)
    ratelimit_storage_url: str = knob("", API, "Where request counts live; empty means the broker's Redis, or "
                                      "memory when embedded.")
    max_active_jobs: int = knob(200, API, "Jobs a tenant may have queued or running at once (0 = no limit).")
    key_cache_seconds: float = knob(5.0, API, "An API process remembers a verified API key this long (seconds), "
                                    "so a poll needs no database statement to know its caller. A key revoked by "
                                    "another process (`genq keys revoke`, another API replica) stops working "
                                    "within this bound; the process that revokes it forgets it at once. 0 checks "
                                    "every request.")

    poll_cache_seconds: float = knob(1.0, API, "An API process answers polls of a job it read this recently "
                                     "(seconds) with no database statement (304 to `If-None-Match` naming its "
                                     "ETag, else the body it sent), while it is "
                                     "subscribed to the job event notifications in Redis: a change (every one "
                                     "writes a job event) drops the job's entry as soon as its notification "
                                     "arrives, and this is how stale an answer can be when a notification is "
                                     "lost. 0 reads the database on every poll.")

    # ---- files and fine-tuning
    max_file_bytes: int = knob(50 * 2**20, LIMITS, "Largest file `POST /v1/files` accepts.")
    max_dataset_rows: int = knob(100_000, LIMITS, "Most rows in a dataset.")
    max_image_bytes: int = knob(10 * 2**20, LIMITS, "Largest input image `POST /v1/files` accepts with "
                                "`purpose=image` (PNG, JPEG or WebP).")
    max_image_pixels: int = knob(2048 * 2048, LIMITS, "Most pixels (width x height) in an uploaded input image, "
                                 "read from its header before it is decoded.")
    max_tenant_file_bytes: int = knob(2**30, LIMITS, "Bytes of uploaded files a tenant may have stored in all "
                                      "(0 = no limit). Outputs need no quota of their own: they are bounded by each "
                                      "model's input limits and the active-jobs quota.")
    training_pool: str = knob("training", LIMITS, "The pool (Celery queue) fine-tunes run on, one job per worker "
                              "process.")
    checkpoint_every: int = knob(50, LIMITS, "A fine-tune saves a resumable checkpoint to storage every this many "
                                 "steps.")
    max_train_steps: int = knob(10_000, LIMITS, "The most optimizer steps one fine-tune may take where its base "
                                "model's registry `limits` set no `max_train_steps` (0 = no limit): over a hundred "
                                "times what the demo needs to learn a phrase, yet a bound on how long one job holds "
                                "a training worker (see [Fine-tuning](#fine-tuning)).")
    max_train_examples: int = knob(200_000, LIMITS, "The most examples (rows × epochs) one fine-tune may train on "
                                   "where the registry sets no `max_train_examples` (0 = no limit): the largest "
                                   "dataset accepted, twice.")

    # ---- webhook sending
    webhook_queue: str = knob("webhooks", WEBHOOKS, "The Celery queue the webhook sender consumes: "
                              "`genq worker --pool webhooks`.")
    webhook_timeout: float = knob(15.0, WEBHOOKS, "One POST may wait this long to connect and as long again for "
                                  "the answer (seconds).")
    webhook_backoff: tuple[float, ...] = knob(
        (5.0, 300.0, 1800.0, 7200.0, 18000.0, 36000.0, 36000.0), WEBHOOKS,
        "Seconds before each retry of a failed delivery, jittered by ±20%, comma-separated. The Standard Webhooks "
        "schedule: eight attempts over about 27.6 hours before a delivery is marked failed.")
    webhook_secret_grace: int = knob(24 * 3600, WEBHOOKS, "After a secret is rotated, the old one keeps signing "
                                     "beside the new one this long (seconds).")
    webhook_secret_keys: tuple[str, ...] = knob(
        (), WEBHOOKS, "Keys that encrypt the tenants' webhook signing secrets in the database (Fernet keys, "
        "comma-separated; make one with `python -m genq.webhook_secrets new-key`). The first encrypts, every one "
        "decrypts: to rotate, put a new key first, then run `python -m genq.webhook_secrets reencrypt` and drop "
        "the old one. Required with a shared database; the embedded default makes one in "
        "`$GENQ_HOME/webhook-key`.", shown="unset", secret=True)
    webhook_sweep_interval: float = knob(1.0, WEBHOOKS, "The sender looks for due retries and deliveries whose "
                                         "message was lost this often (seconds).")
    webhook_allow_http: bool = knob(False, WEBHOOKS, "Accept `http://` webhooks too (local use only).")
    webhook_allowed_hosts: tuple[str, ...] = knob((), WEBHOOKS, "Hosts, exactly as written in the URL, exempt from "
                                                  "the address check and allowed http (e.g. `127.0.0.1` for a "
                                                  "receiver on this machine); comma-separated.")
    webhook_allow_private: bool = knob(False, WEBHOOKS, "Turn off the address check for every host: only where "
                                       "every receiver sits on a private network the operator trusts.")
    webhook_tenant_concurrency: int = knob(4, WEBHOOKS, "Deliveries of one tenant being posted at once, across "
                                           "every sender. Keep it below the sender's threads (8): a tenant whose "
                                           "receiver hangs then holds only this many, and the others' go on.")
    webhook_max_redeliveries: int = knob(10, WEBHOOKS, "Times a job's events may be sent again on request (each "
                                         "a new schedule of up to eight POSTs); past it, redeliver answers 409.")

    # ---- logs and metrics
    log_level: str = knob("INFO", OBSERVING, "Log level for every process.")
    log_format: Literal["text", "json"] = knob("text", OBSERVING, "`text` for people at a terminal; `json` for a "
                                               "log pipeline: one object a line, with the job id on every line "
                                               "about a job (see [Operators](#operators)).")
    metrics_port: int = knob(0, OBSERVING, "Port a worker serves Prometheus `/metrics` on (0 = off); under "
                             "`genq up` the webhook sender serves on the next port. The API serves its own at "
                             "`/metrics` on the API port.")
    metrics_cache_seconds: float = knob(5.0, OBSERVING, "The API's job gauges are read from the database at most "
                                        "once per this many seconds per process (0 = on every scrape).")
    metrics_token: str | None = knob(None, OBSERVING, "When set, the API's `/metrics` needs "
                                     "`Authorization: Bearer <this>`.", secret=True)
    otel_endpoint: str | None = knob(None, OBSERVING, "OpenTelemetry traces: the OTLP/HTTP collector every genq "
                                     "process sends spans to (`http://otel-collector:4318`); unset, nothing is traced "
                                     "and OpenTelemetry is not imported. Needs the `otel` extra. The API's requests, "
                                     "SQL statements, Celery messages and S3 calls are traced, and each job keeps its "
                                     "creating request's trace context, so the worker's span for the job joins that "
                                     "trace (see [Operators](#operators)). The SDK's own `OTEL_*` variables (headers, "
                                     "sampling) apply.")

    # ---- reading

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, **overrides) -> "Settings":
        """Settings from GENQ_* variables (os.environ unless `env` is given),
        then `overrides` by field name. Every problem is reported at once in
        one ConfigError: misspelt names, and each value that cannot work."""
        env = os.environ if env is None else env
        values = {name: env[var] for name, var in env_names().items() if var in env}
        problems = unknown(env)
        try:
            settings = cls(**{**values, **overrides})
        except ValidationError as exc:
            problems += describe(exc, env)
        if problems:
            raise ConfigError("\n".join(problems))
        return settings

    def replace(self, **changes) -> "Settings":
        """A copy with `changes`, checked as from_env checks them."""
        try:
            return type(self)(**{**{name: getattr(self, name) for name in type(self).model_fields}, **changes})
        except ValidationError as exc:
            raise ConfigError("\n".join(describe(exc, {}))) from None

    def as_env(self) -> dict[str, str]:
        """The GENQ_* variables that reproduce these settings in a child process."""
        out = {}
        for name, var in env_names().items():
            value = getattr(self, name)
            if isinstance(value, tuple):
                value = ",".join(str(v) for v in value)
            if value is not None:
                out[var] = str(value)
        return out

    # ---- checks: each raises with a message naming what is expected and what came

    @model_validator(mode="before")
    @classmethod
    def _defaults(cls, values: dict) -> dict:
        """An empty variable means the default (except where empty is a value
        of its own), and defaults under GENQ_HOME are made from home."""
        values = {k: v for k, v in values.items() if not (v == "" and not _extra(k).get("empty_is_a_value"))}
        home = Path(values.get("home") or cls.model_fields["home"].get_default()).expanduser().resolve()
        values["home"] = home
        for name, field in cls.model_fields.items():
            if name not in values and HOME in str(field.default):
                values[name] = type(field.default)(str(field.default).replace(HOME, str(home)))
        return values

    @field_validator("webhook_backoff", "webhook_allowed_hosts", "webhook_secret_keys", mode="before")
    @classmethod
    def _comma_separated(cls, value):
        if isinstance(value, str):
            return tuple(part.strip() for part in value.split(",") if part.strip())
        return value

    @field_validator("max_train_steps", "max_train_examples", "max_tenant_file_bytes", "max_active_jobs")
    @classmethod
    def _zero_is_no_limit(cls, value):
        if value < 0:
            raise ValueError(f"must be 0 (no limit) or more, got {value}")
        return value

    @field_validator("openai_wait_seconds")
    @classmethod
    def _positive(cls, value):
        if value <= 0:
            raise ValueError(f"must be more than 0, got {value}")
        return value

    @field_validator("max_held_requests", "metrics_cache_seconds", "key_cache_seconds", "poll_cache_seconds")
    @classmethod
    def _zero_or_more(cls, value):
        if value < 0:
            raise ValueError(f"must be 0 or more, got {value}")
        return value

    @field_validator("torch_threads")
    @classmethod
    def _torch_threads(cls, value):
        if value < 0:
            raise ValueError(f"must be 0 (torch's default) or more, got {value}")
        return value

    @field_validator("api_workers", "api_threads", "event_stream_seconds", "max_adapters")
    @classmethod
    def _one_or_more(cls, value):
        if value is not None and value < 1:
            raise ValueError(f"must be 1 or more, got {value}")
        return value

    @field_validator("rate_limit")
    @classmethod
    def _rate_limit(cls, value):
        if value:
            from limits import parse

            try:
                parse(value)
            except ValueError:
                raise ValueError(f"must be like `1200/minute` or `20/second` (or empty: no limit), got {value!r}") from None
        return value

    @field_validator("presign_seconds")
    @classmethod
    def _presign_seconds(cls, value):
        if not 1 <= value <= MAX_PRESIGN_SECONDS:
            raise ValueError(f"must be from 1 to {MAX_PRESIGN_SECONDS} (7 days, the longest S3 allows), got {value}")
        return value

    @field_validator("webhook_secret_keys")
    @classmethod
    def _fernet_keys(cls, keys):
        for i, key in enumerate(keys, 1):
            try:
                Fernet(key)
            except ValueError:
                raise ValueError(f"key {i} of {len(keys)} is not a Fernet key (32 url-safe base64-encoded bytes, "
                                 f"as `python -m genq.webhook_secrets new-key` prints)") from None
        return keys

    @model_validator(mode="after")
    def _held_threads_leave_some(self) -> "Settings":
        held = self.api_held_threads
        if held is not None and not 0 <= held < self.api_threads:
            raise ValueError(f"GENQ_API_HELD_THREADS must be from 0 to GENQ_API_THREADS - 1 ({self.api_threads - 1}), "
                             f"leaving threads for short requests; got {held}")
        return self

    # ---- derived

    @property
    def shutdown_deadline(self) -> float:
        """The longest a worker takes to stop after SIGTERM: the shutdown
        timeout, then 10 s for the model to reach its next step and stop."""
        return self.shutdown_timeout + 10.0

    @property
    def workers(self) -> int:
        """gunicorn processes for `genq api` (see api_workers)."""
        if self.api_workers is not None:
            return self.api_workers
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        return max(1, min(8, cores))

    @property
    def held_threads(self) -> int:
        """Threads per API process long-held requests may take (see api_held_threads)."""
        return self.api_threads // 2 if self.api_held_threads is None else self.api_held_threads

    @property
    def embedded_broker(self) -> bool:
        return self.broker_url.startswith("filesystem://")

    @property
    def embedded_database(self) -> bool:
        return self.database_url.startswith("sqlite")

    @property
    def api_base_url(self) -> str:
        """Where clients reach the API, for URLs the service hands out outside a request."""
        return (self.public_url or f"http://{self.api_host}:{self.api_port}").rstrip("/")


def _extra(name: str) -> dict:
    field = Settings.model_fields.get(name)
    return (field.json_schema_extra or {}) if field is not None else {}


def env_names() -> dict[str, str]:
    """{field: its GENQ_* variable}, in declaration order."""
    return {name: _extra(name)["env"] or f"GENQ_{name.upper()}" for name in Settings.model_fields}


def unknown(env: Mapping[str, str]) -> list[str]:
    """A line for each GENQ_* variable that is no setting, naming the closest
    one: a misspelt name would otherwise be ignored and its default win."""
    known = list(env_names().values())
    out = []
    for var in sorted(env):
        if not var.startswith("GENQ_") or var in known or var in NOT_SETTINGS or var.startswith(NOT_SETTING_PREFIXES):
            continue
        close = difflib.get_close_matches(var, known, n=1, cutoff=0.6)
        hint = f"did you mean {close[0]}?" if close else "the settings are listed in README.md, Configuration"
        out.append(f"{var} is not a genq setting; {hint}")
    return out


# What a value of each type must look like, for pydantic's type errors.
EXPECTED = {
    "int_parsing": "an integer", "int_from_float": "an integer", "int_type": "an integer",
    "float_parsing": "a number", "float_type": "a number",
    "bool_parsing": "true or false (also 1/0, yes/no, on/off)", "bool_type": "true or false",
    "path_type": "a path", "string_type": "a string",
}


def describe(exc: ValidationError, env: Mapping[str, str]) -> list[str]:
    """One line per bad setting: its variable, what it must be, and what it
    was (a secret's length only)."""
    names = env_names()
    lines: dict[str, str] = {}
    for err in exc.errors(include_url=False):
        if not err["loc"]:  # a check across settings names its variables itself
            lines[err["msg"]] = err["msg"].removeprefix("Value error, ")
            continue
        name = str(err["loc"][0])
        if name in lines or err["type"] == "none_required":  # one line per setting; `X | None` adds a None branch
            continue
        if name not in names:
            lines[name] = f"{name} is not a setting (given by keyword)"
            continue
        var = names[name]
        if err["type"] == "value_error":
            lines[name] = f"{var} {err['msg'].removeprefix('Value error, ')}"
            continue
        expected = EXPECTED.get(err["type"]) or err["msg"].removeprefix("Input should be ")
        if len(err["loc"]) > 1:  # an item of a comma-separated list
            expected = f"comma-separated, each {expected}"
        raw = env.get(var, err.get("input"))
        shown = f"a value of {len(str(raw))} characters" if _extra(name).get("secret") else repr(raw)
        lines[name] = f"{var} must be {expected}, got {shown}"
    return list(lines.values())


# ---- the README's table

def _shown(name: str) -> str:
    extra = _extra(name)
    if extra.get("shown"):
        return extra["shown"]
    default = Settings.model_fields[name].default
    if default is None:
        return "unset"
    if default == "":
        return "empty"
    if isinstance(default, bool):
        return f"`{str(default).lower()}`"
    if isinstance(default, tuple):
        return f"`{','.join(f'{v:g}' if isinstance(v, float) else str(v) for v in default)}`" if default else "none"
    if isinstance(default, float):
        return f"`{default:g}`"
    if isinstance(default, int) and name.endswith("_bytes"):
        for power, unit in ((3, "GiB"), (2, "MiB"), (1, "KiB")):
            if default % 1024**power == 0:
                return f"{default // 1024**power} {unit}"
    return f"`{default}`"


def markdown() -> str:
    """The settings tables, one per section, as the README holds them."""
    sections: dict[str, list[str]] = {}
    for name, var in env_names().items():
        about = " ".join(Settings.model_fields[name].description.split()).replace("|", "\\|")
        sections.setdefault(_extra(name)["section"], []).append(f"| `{var}` | {_shown(name)} | {about} |")
    out = [START, "<!-- Generated from the declarations in genq/settings.py: edit them there, then run "
                  "`python -m genq.settings --write-readme`. -->"]
    for section, rows in sections.items():
        out += ["", f"### {section}", "", "| variable | default | |", "| --- | --- | --- |", *rows]
    return "\n".join(out + ["", END])


START, END = "<!-- settings:start -->", "<!-- settings:end -->"


def readme_block(text: str) -> str:
    """The generated block inside a README's text ("" if it has none)."""
    start, end = text.find(START), text.find(END)
    return text[start:end + len(END)] if 0 <= start < end else ""


def main(argv: list[str]) -> int:
    if argv == ["--markdown"]:
        print(markdown())
        return 0
    if argv == ["--write-readme"]:
        text = README.read_text()
        block = readme_block(text)
        if not block:
            print(f"{README} has no {START} ... {END} block", file=sys.stderr)
            return 1
        README.write_text(text.replace(block, markdown()))
        return 0
    print("usage: python -m genq.settings --markdown | --write-readme", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
