"""The Celery app a worker process runs, and the Settings its tasks use.

`genq worker` makes both from the Settings it was handed (worker/main.py),
before Celery starts: prefork children inherit them by fork. `celery -A
worker.app worker -Q NAME --pool solo` finds `app` here and gets both from
the environment, on first use."""
from __future__ import annotations

from celery import Celery

from genq.queue import make_celery
from genq.settings import Settings

_app: Celery | None = None
_settings: Settings | None = None


def make(settings: Settings) -> Celery:
    """This process's app, made from `settings`. Once per process, and before
    worker.tasks is imported: its tasks bind to the app they find here."""
    global _app, _settings
    if _app is not None:
        raise RuntimeError("the worker's Celery app is made once per process, and it was made already")
    _settings, _app = settings, make_celery(settings)
    _app.conf.include = ["worker.tasks"]
    return _app


def __getattr__(name: str):
    # `worker.app.app` and `worker.app.settings` (PEP 562): the ones make() was
    # given, or, for `celery -A worker.app`, the environment's.
    if name in ("app", "settings"):
        if _app is None:
            make(Settings.from_env())
        return _app if name == "app" else _settings
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
