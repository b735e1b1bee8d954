"""Builds a worker's Runner and webhook Sender from settings: database,
registry, storage, model cache."""
from __future__ import annotations

from genq.db import make_engine, make_sessionmaker
from genq.notify import Notifier, notify_after_commit
from genq.settings import Settings
from genq.storage import make_storage
from models.registry import Registry
from worker.cache import ModelCache, make_loader
from worker.runner import Runner
from worker.training import train_one
from worker.webhook_sender import Sender


def build_runner(settings: Settings, **extra) -> Runner:
    """`extra`: the Runner's optional collaborators (shutdown, ring). Its
    fine-tunes go to the trainer (worker/training.py)."""
    storage = make_storage(settings)
    sessions = make_sessionmaker(make_engine(settings.database_url))
    # Every state change and event it commits rings the API's event streams.
    notify_after_commit(sessions, Notifier.from_settings(settings))
    return Runner(
        settings=settings,
        sessions=sessions,
        registry=Registry.load(settings.registry_path),
        storage=storage,
        cache=ModelCache(make_loader(settings, storage), settings.model_cache_bytes),
        train=train_one,
        **extra,
    )


def build_sender(settings: Settings) -> Sender:
    return Sender(settings, make_sessionmaker(make_engine(settings.database_url)), make_storage(settings))
