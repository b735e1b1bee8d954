"""docs/rest.md, the REST reference in the repository, says what the API does:
its tables are the OpenAPI document's, and the README points at it."""
from __future__ import annotations

import re

from api import reference
from genq.settings import README


def test_the_reference_tables_are_current():
    block = reference.block(reference.REFERENCE.read_text())
    assert block, "docs/rest.md has no <!-- reference:start --> ... <!-- reference:end --> block"
    assert block == reference.markdown(), "docs/rest.md's tables are stale: run `python -m api.reference --write`"
    assert "`POST /v1/jobs` | `create_job` | key |" in block


def test_the_readme_links_nothing_outside_the_repository():
    text = README.read_text()
    links = re.findall(r"\]\(([^)]+)\)", text)
    assert "docs/rest.md" in links
    outside = [link for link in links if "://" in link or link.startswith("..") or link.startswith("/")]
    assert outside == []
