"""The Celery app workers run: `genq worker --pool NAME`, or
`celery -A worker.app worker -Q NAME --pool solo`."""
from genq.queue import make_celery
from genq.settings import Settings

settings = Settings.from_env()
app = make_celery(settings)
app.conf.include = ["worker.tasks"]
