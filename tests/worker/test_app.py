"""The worker's Celery app and settings: `genq worker` hands its Settings to
worker.app before Celery starts, and the tasks use those, not a second read
of the environment; `celery -A worker.app` still finds an app. Each in a
process of its own: the app is made once per process."""
from __future__ import annotations

import os
import subprocess
import sys

HANDED = r"""
import os
from genq.settings import Settings
import worker.app

given = Settings.from_env().replace(worker_name="text.4242@box", lease_seconds=77)
app = worker.app.make(given)
import worker.tasks
assert worker.tasks.settings is given and worker.tasks.app is app and worker.tasks.run_job.app is app
assert "GENQ_WORKER_NAME" not in os.environ
try:
    worker.app.make(given)
except RuntimeError as exc:
    print(exc)
"""

FROM_ENV = r"""
from celery.app.utils import find_app
app = find_app("worker.app")
import worker.app, worker.tasks
assert app is worker.app.app is worker.tasks.app and worker.app.settings.lease_seconds == 55
"""


def run(code: str, tmp_path) -> str:
    env = {k: v for k, v in os.environ.items() if not k.startswith("GENQ_")}
    env.update(GENQ_HOME=str(tmp_path), GENQ_LEASE_SECONDS="55")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return out.stdout


def test_the_tasks_use_the_settings_genq_worker_hands_over(tmp_path):
    assert run(HANDED, tmp_path).strip() == "the worker's Celery app is made once per process, and it was made already"


def test_celery_dash_a_gets_the_app_made_from_the_environment(tmp_path):
    run(FROM_ENV, tmp_path)
