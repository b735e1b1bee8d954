"""The small hierarchy of errors genq raises on purpose.

Each carries a machine-readable `code` and a message a user can act on. The
worker's runner is the one place that catches broadly and records them on the
job; the API turns InputError into a 422 problem.
"""
from __future__ import annotations


class GenqError(Exception):
    code = "internal_error"

    def __init__(self, message: str, *, code: str | None = None):
        super().__init__(message)
        self.message = message
        if code:
            self.code = code


class ConfigError(GenqError):
    """Settings or registry are wrong: the operator must fix something."""

    code = "config_error"


class InputError(GenqError):
    """A request field is invalid. `errors` is a list of {"field", "message"}."""

    code = "invalid_input"

    def __init__(self, errors: list[dict[str, str]]):
        self.errors = errors
        super().__init__("; ".join(f"{e['field']}: {e['message']}" for e in errors))


class UnknownModel(GenqError):
    code = "unknown_model"


class ModelError(GenqError):
    """Loading or running a model failed."""

    code = "model_error"


class LeaseLost(GenqError):
    """The worker no longer holds the job's lease; its write does not count."""

    code = "lease_lost"


class IllegalTransition(GenqError):
    code = "illegal_transition"
