"""genq's Python client: `Client` (blocking) and `AsyncClient`, on httpx.

    from genq.client import Client
    client = Client()                      # GENQ_URL, GENQ_API_KEY
    output = client.run("demo-text", {"prompt": "Once upon a time", "seed": 7})

It needs none of the model libraries (torch, transformers, diffusers): `pip
install genq` with no extras is enough."""
from genq.client.aio import AsyncClient
from genq.client.errors import (APIConnectionError, APIError, AuthenticationError, BadRequest, Conflict, GenqError,
                                JobFailed, NotFound, PayloadTooLarge, PermissionDenied, RateLimited, ServerError,
                                Unavailable, ValidationError, WaitTimeout)
from genq.client.sync import Client
from genq.client.types import Event, File, Job

__all__ = ["Client", "AsyncClient", "Job", "Event", "File", "GenqError", "APIError", "APIConnectionError",
           "AuthenticationError", "BadRequest", "Conflict", "JobFailed", "NotFound", "PayloadTooLarge",
           "PermissionDenied", "RateLimited", "ServerError", "Unavailable", "ValidationError", "WaitTimeout"]
