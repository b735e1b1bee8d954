"""Checks on what a request's URL carries, run before the rate limiter, any
view or any log line of ours sees it: no API key in the query string (URLs
end up in access logs, proxies and browser history), and no NUL in a path or
query parameter (Postgres text cannot hold one)."""
from __future__ import annotations

from flask import request

from api.errors import ApiError, invalid
from genq.keys import KEY_IN_TEXT, KEY_PARAMS


def check_url_params() -> None:
    for name, value in request.args.items(multi=True):
        if name.lower() in KEY_PARAMS or KEY_IN_TEXT.search(name) or KEY_IN_TEXT.search(value):
            message = ("looks like an API key; keys go in the Authorization header ('Authorization: Bearer <key>'), "
                       "never in a URL. A key sent in one may have been logged on the way: revoke it and make a new one")
            raise ApiError(400, f"{_printable(name)}: {message}", errors=[{"field": _printable(name), "message": message}])
    params = [*(request.view_args or {}).items(), *request.args.items(multi=True)]
    for name, value in params:
        if "\x00" in name or "\x00" in str(value):
            raise invalid(_printable(name), "must not contain NUL (\\u0000) characters")


def _printable(name: str) -> str:
    return name.replace("\x00", "\\u0000")
