"""Input errors and refused state changes become 422 and 409 problems in one
place, the app's error handlers, whichever route raises them."""
from __future__ import annotations

import ast
from pathlib import Path

from pydantic import BaseModel, ConfigDict

from genq.errors import IllegalTransition
from models.base import InputInvalid

API = Path(__file__).resolve().parents[2] / "api"
MAPPED = {"InputInvalid", "ValidationError", "IllegalTransition", "RedeliveryRefused"}


class Body(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str


def test_a_raised_error_becomes_its_problem_in_any_route(app):
    def bad_input():
        raise InputInvalid([{"field": "input.steps", "message": "must be at most 50, got 80"}])

    def bad_body():
        Body.model_validate({"name": 3, "colour": "red"}, strict=True)

    def refused():
        raise IllegalTransition("job 1 is succeeded; only queued or running jobs can be canceled")

    for view in (bad_input, bad_body, refused):
        app.add_url_rule(f"/test/{view.__name__}", view_func=view)
    client = app.test_client()

    r = client.get("/test/bad_input")
    assert (r.status_code, r.mimetype) == (422, "application/problem+json")
    assert r.json["detail"] == "input.steps: must be at most 50, got 80"
    assert r.json["errors"] == [{"field": "input.steps", "message": "must be at most 50, got 80"}]

    r = client.get("/test/bad_body")
    assert r.status_code == 422
    assert {e["field"] for e in r.json["errors"]} == {"name", "colour"}
    assert "colour: is not a known field" in r.json["detail"]

    r = client.get("/test/refused")
    assert (r.status_code, r.mimetype) == (409, "application/problem+json")
    assert r.json["detail"] == "job 1 is succeeded; only queued or running jobs can be canceled"


def test_no_route_maps_these_errors_by_hand():
    by_hand = []
    for path in sorted(API.glob("*.py")):
        if path.name.startswith("openai_"):
            # The OpenAI-compatible routes answer in OpenAI's error shape, not
            # problem+json: translating these errors is their job.
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ExceptHandler) and node.type is not None:
                names = {n.id if isinstance(n, ast.Name) else n.attr for n in ast.walk(node.type)
                         if isinstance(n, (ast.Name, ast.Attribute))}
                if names & MAPPED:
                    by_hand.append(f"{path.name}:{node.lineno}")
    assert by_hand == [], "registered in api/errors.py; raise and let the handler answer"
