"""Every answer names its request: the caller's X-Request-Id when sane, else
one the API makes, on errors too; the id is the request's own while it is
served, and no other request's."""
from __future__ import annotations

import re

import pytest

from genq.logs import REQUEST_ID

MADE = re.compile(r"[0-9a-f]{32}")


@pytest.mark.parametrize("given", ["abc-123", "0af7651916cd43dd8448eb211c80319c", "Root=1-5759e988-bd862e3fe1be46a9",
                                   "dGhpcyBpcyBiYXNlNjQ/+=", "x" * 128])
def test_a_sane_request_id_is_kept(client, given):
    assert client.get("/healthz", headers={"X-Request-Id": given}).headers["X-Request-Id"] == given


@pytest.mark.parametrize("given", ["", "a b", "x" * 129, "semi;colon", '"quoted"', "naïve"])
def test_anything_else_is_replaced_by_a_new_id(client, given):
    assert MADE.fullmatch(client.get("/healthz", headers={"X-Request-Id": given}).headers["X-Request-Id"])


def test_each_request_gets_its_own_and_errors_say_it_too(client):
    answers = [client.get("/healthz"), client.get("/v1/jobs"), client.get("/v1/no-such-route"),
               client.get("/v1/jobs?api_key=gq_" + "a" * 43)]
    assert [a.status_code for a in answers] == [200, 401, 404, 400]
    ids = [a.headers["X-Request-Id"] for a in answers]
    assert len(set(ids)) == 4 and all(MADE.fullmatch(i) for i in ids)
    # Served and forgotten: nothing logged afterwards on this thread claims to be part of a request.
    assert REQUEST_ID.get() is None
