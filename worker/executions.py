"""What actually ran where: with GENQ_EXECUTION_LOG set, a worker appends one
JSON line when it starts executing a job and one when it stops, with the job,
the attempt, the worker and the wall-clock time. It is evidence independent of
the job row (which only says how things ended): the fault tests check from it
that no job ever ran on two workers at once."""
from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path


class ExecutionLog:
    def __init__(self, path: Path | None, owner: str):
        self.path = path
        self.owner = owner

    def started(self, job_id: str, attempt: int, at: float | None = None) -> None:
        self._write({"event": "start", "job": job_id, "attempt": attempt, "at": at or time.time()})

    def ended(self, job_id: str, attempt: int, outcome: str, at: float | None = None) -> None:
        self._write({"event": "end", "job": job_id, "attempt": attempt, "outcome": outcome, "at": at or time.time()})

    def _write(self, record: dict) -> None:
        if self.path is None:
            return
        record.update(worker=self.owner, pid=os.getpid(), host=socket.gethostname())
        line = (json.dumps(record) + "\n").encode()
        # One write() on an O_APPEND descriptor: lines from many processes
        # never overwrite or split one another.
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, line)
        finally:
            os.close(fd)


def read(path: Path) -> list[dict]:
    if not Path(path).exists():
        return []
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
