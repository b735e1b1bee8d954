"""The API as its own process, made to die at the worst moment: after a job's
row is committed and before its doorbell is published (as a crash, an OOM
kill or a deploy could). Run as `python -m tests.faults.api_dies_before_publish PORT`
with the GENQ_* environment of the stack under test."""
from __future__ import annotations

import os
import sys

from werkzeug.serving import make_server

import genq.queue
from api.app import create_app


def die_instead(*args, **kwargs):
    os._exit(137)


if __name__ == "__main__":
    # The doorbell thread publishes through genq.queue.publish, looked up at each send.
    genq.queue.publish = die_instead
    server = make_server("127.0.0.1", int(sys.argv[1]), create_app(), threaded=True)
    print("listening", flush=True)
    server.serve_forever()
