"""The project's import rules, read from the source: imports go one way.

- genq/ (the kernel) imports nothing of api/, worker/ or models/; the CLI
  reaches each deployable by its dotted name, when its command runs;
- api/ never imports worker/, and worker/ never imports api/;
- models/ imports nothing of ours but the settings it is handed (today not
  even those), so a model family stays one self-contained file.

Every import statement counts, at module level or inside a function.
"""
from __future__ import annotations

import ast
import importlib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
OURS = ("genq", "api", "worker", "models")
# package -> what of ours it may import (a package or a dotted module).
ALLOWED = {
    "genq": {"genq"},
    "api": {"api", "genq", "models"},
    "worker": {"worker", "genq", "models"},
    "models": {"models", "genq.settings"},
}


def imported(path: Path) -> list[tuple[int, str]]:
    """(line, dotted name) of everything a module imports."""
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: inside its own package
                continue
            # `from genq import jobs` imports genq.jobs: name the module where it can be one.
            out += [(node.lineno, f"{node.module}.{alias.name}") for alias in node.names]
    return sorted(out)


def allowed(name: str, rules: set[str]) -> bool:
    return any(name == rule or name.startswith(rule + ".") for rule in rules)


def violations(package: str) -> list[str]:
    found = []
    for path in sorted((ROOT / package).rglob("*.py")):
        for line, name in imported(path):
            if name.split(".")[0] in OURS and not allowed(name, ALLOWED[package]):
                found.append(f"{path.relative_to(ROOT)}:{line} imports {name}")
    return found


@pytest.mark.parametrize("package", sorted(ALLOWED))
def test_imports_go_one_way(package):
    assert violations(package) == []


def test_the_rule_sees_every_kind_of_import(tmp_path):
    module = tmp_path / "m.py"
    module.write_text("import api.app\nfrom worker import main\n\ndef f():\n    from models.registry import Registry\n"
                      "from genq.settings import Settings\nfrom . import sibling\n")
    names = [name for _, name in imported(module)]
    assert names == ["api.app", "worker.main", "models.registry.Registry", "genq.settings.Settings"]
    assert [n for n in names if not allowed(n, ALLOWED["genq"])] == names[:3]
    assert [n for n in names if not allowed(n, ALLOWED["models"])] == names[:2]


def test_each_command_names_a_deployable_that_imports():
    from genq import cli

    for command, target in cli.DEPLOYABLES.items():
        module, _, name = target.partition(":")
        # `genq models check` runs in the worker's environment on models/ alone.
        assert module.split(".")[0] in ("api", "worker", "models"), (command, target)
        assert callable(getattr(importlib.import_module(module), name)), (command, target)
