"""The small hierarchy of errors genq raises on purpose.

Each carries a machine-readable `code` and a message a user can act on. The
worker's runner is the one place that catches broadly and records them on the
job; the API answers IllegalTransition with 409.
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


class ModelError(GenqError):
    """Loading or running a model failed."""

    code = "model_error"


class IllegalTransition(GenqError):
    """A status change the state table (genq.states) does not allow."""

    code = "illegal_transition"
