"""docs/rest.md's tables of operations and model inputs, generated from the
OpenAPI document (api/openapi.py) with the shipped registry, so the reference
in the repository says what the API does. `python -m api.reference --write`
rewrites the block; tests/api/test_reference.py fails while it is stale."""
from __future__ import annotations

import json
import sys
from pathlib import Path

from api.openapi import build
from genq.settings import DEFAULT_REGISTRY, ROOT
from models.registry import Registry

REFERENCE = ROOT / "docs" / "rest.md"
START, END = "<!-- reference:start -->", "<!-- reference:end -->"


def _cell(text: str) -> str:
    return " ".join(str(text).split()).replace("|", "\\|")


def _type(schema: dict) -> str:
    if "anyOf" in schema:
        return " or ".join(_type(s) for s in schema["anyOf"])
    if "enum" in schema:
        return " \\| ".join(f"`{v}`" for v in schema["enum"])
    if "$ref" in schema:
        return schema["$ref"].rsplit("/", 1)[1]
    return schema.get("type", "object")


def _bounds(schema: dict) -> str:
    parts = []
    for key, word in (("minimum", "≥"), ("exclusiveMinimum", ">"), ("maximum", "≤"), ("exclusiveMaximum", "<"),
                      ("minLength", "length ≥"), ("maxLength", "length ≤")):
        for s in [schema] + schema.get("anyOf", []):
            if s.get(key) is not None:
                parts.append(f"{word} {s[key]:g}" if isinstance(s[key], float) else f"{word} {s[key]}")
    return ", ".join(parts)


def _fields(schema: dict, prefix: str) -> list[str]:
    """A row per field; an object's fields as `parent.child` rows."""
    rows, required = [], set(schema.get("required", []))
    for field, prop in schema.get("properties", {}).items():
        default = "required" if field in required else f"`{json.dumps(prop['default'])}`" if "default" in prop else ""
        if "properties" in prop:
            rows += _fields(prop, f"{prefix}{field}.")
            continue
        rows.append(f"| `{prefix}{field}` | {_type(prop)} | {default} | {_bounds(prop)} | "
                    f"{_cell(prop.get('description', ''))} |")
    return rows


def markdown() -> str:
    doc = build(Registry.load(DEFAULT_REGISTRY))
    out = [START, "<!-- Generated from api/openapi.py with models/registry.yaml: edit those, then run "
                  "`python -m api.reference --write`. -->"]
    by_tag: dict[str, list[str]] = {}
    for path, operations in doc["paths"].items():
        for method, op in operations.items():
            ok = ", ".join(code for code in op["responses"] if code < "400")
            errors = ", ".join(code for code in op["responses"] if code >= "400")
            auth = "none" if op.get("security") == [] else "key"
            by_tag.setdefault(op["tags"][0], []).append(
                f"| `{method.upper()} {path}` | `{op['operationId']}` | {auth} | {_cell(op['summary'])} | {ok} | {errors} |")
    for tag, rows in by_tag.items():
        out += ["", f"### {tag}", "", "| operation | operationId | auth | what | success | errors |",
                "| --- | --- | --- | --- | --- | --- |", *rows]
    out += ["", "auth `key`: `Authorization: Bearer <key>`. Every error is `application/problem+json`."]
    schemas = doc["components"]["schemas"]
    for name in sorted(n for n in schemas if n.startswith("Input_")):
        out += ["", f"### `input` of {name.removeprefix('Input_').replace('_', '-')}", "",
                "| field | type | default | bounds | what |", "| --- | --- | --- | --- | --- |"]
        out += _fields(schemas[name], "")
    return "\n".join(out + ["", END])


def block(text: str) -> str:
    start, end = text.find(START), text.find(END)
    return text[start:end + len(END)] if 0 <= start < end else ""


def main(argv: list[str]) -> int:
    if argv == ["--markdown"]:
        print(markdown())
        return 0
    if argv == ["--write"]:
        text = Path(REFERENCE).read_text()
        if not block(text):
            print(f"{REFERENCE} has no {START} ... {END} block", file=sys.stderr)
            return 1
        Path(REFERENCE).write_text(text.replace(block(text), markdown()))
        return 0
    print("usage: python -m api.reference --markdown | --write", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
