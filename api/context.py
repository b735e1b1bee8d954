"""What the API's request handlers share: settings, sessions, registry, storage,
the Celery app, the webhook secrets' sealer. Built once by the app factory and
kept in app.extensions."""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator

from celery import Celery
from flask import current_app
from sqlalchemy.orm import Session, sessionmaker

from genq.settings import Settings
from genq.storage import Storage
from genq.webhook_secrets import Sealer
from models.registry import Registry


@dataclass
class Context:
    settings: Settings
    sessions: sessionmaker[Session]
    registry: Registry
    storage: Storage
    celery: Celery
    sealer: Sealer

    @contextmanager
    def session(self) -> Iterator[Session]:
        with self.sessions() as session:
            yield session


def ctx() -> Context:
    return current_app.extensions["genq"]
