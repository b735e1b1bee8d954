"""The Flask app factory: one place builds the API from settings."""
from __future__ import annotations

from flask import Flask

from api import admin, catalog, console, errors, events, files, health, jobs, metrics, openai_batches, openai_compat, openai_fine_tuning, openapi, params
from api.context import Context
from api.fastpoll import FastPoll
from api.held import init_slots
from api.limits import init_limiter, storage_uri
from api.request_id import init_request_ids
from api import webhooks as webhook_routes
from genq import tracing, webhook_secrets, webhooks
from genq.db import make_engine, make_sessionmaker
from genq.notify import Notifier, notify_after_commit
from genq.queue import make_celery
from genq.logs import configure as configure_logging
from genq.settings import Settings
from genq.storage import make_storage
from models.registry import Registry


def create_app(settings: Settings | None = None, **overrides) -> Flask:
    """Build the API. Tests pass `settings`, and may override collaborators
    (registry, storage, celery, sealer) by keyword."""
    settings = settings or Settings.from_env()
    configure_logging(settings)
    # Before the engine is made: tracing wraps SQLAlchemy's create_engine. Off
    # unless GENQ_OTEL_ENDPOINT is set.
    tracing.setup(settings, "genq-api")
    app = Flask(__name__, static_folder=None)
    app.config["MAX_CONTENT_LENGTH"] = settings.max_body_bytes
    app.json.sort_keys = False
    # A connection per server thread: none is opened and closed per request.
    engine = make_engine(settings.database_url, pool_size=settings.api_threads)
    notifier = Notifier.from_settings(settings)
    app.extensions["genq"] = Context(
        settings=settings,
        sessions=overrides.get("sessions") or make_sessionmaker(engine),
        registry=overrides.get("registry") or Registry.load(settings.registry_path),
        storage=overrides.get("storage") or make_storage(settings),
        celery=overrides.get("celery") or make_celery(settings),
        # Now, not on first use: an API that cannot open the webhook secrets must not start.
        sealer=overrides.get("sealer") or webhook_secrets.Sealer.from_settings(settings),
        notifier=notifier,
    )
    context = app.extensions["genq"]
    # Deliveries the API enqueues (cancel, redeliver) ring the sender once committed.
    webhooks.ring_after_commit(context.sessions, context.celery, settings.webhook_queue)
    # Jobs it submits or cancels ring every API process's event streams (api/fanout.py).
    notify_after_commit(context.sessions, notifier)
    errors.register(app)
    # First of all: every request gets its id, for its log lines and its answer.
    init_request_ids(app)
    # Then a key in the URL is refused before the limiter looks the caller up.
    app.before_request(params.check_url_params)
    app.extensions["genq_limiter"] = init_limiter(app, settings)
    init_slots(app, settings, storage_uri(settings))
    app.before_request(openapi.check_query_params)
    metrics.init_metrics(app)
    for blueprint in (health.bp, jobs.bp, events.bp, files.bp, catalog.bp, admin.bp, openapi.bp, metrics.bp, console.bp):
        app.register_blueprint(blueprint)
    app.register_blueprint(webhook_routes.bp)
    openai_compat.register(app)
    openai_batches.register(app)
    openai_fine_tuning.register(app)
    tracing.instrument_flask(app)
    if context.driver_reads:
        # Plain polls answered below Flask (api/fastpoll.py), and below the
        # tracing middleware too: a traced deployment sees no span for them.
        app.wsgi_app = FastPoll(app)
    return app
