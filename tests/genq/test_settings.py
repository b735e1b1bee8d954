"""Settings: every knob is documented where users look for it, and refuses
values that cannot work."""
from __future__ import annotations

import dataclasses
import re
from pathlib import Path

from genq.settings import Settings

README = Path(__file__).resolve().parents[2] / "README.md"


def env_name(field: dataclasses.Field) -> str:
    return "GENQ_REGISTRY" if field.name == "registry_path" else f"GENQ_{field.name.upper()}"


def test_every_setting_is_in_a_readme_table():
    rows = "\n".join(line for line in README.read_text().splitlines() if line.startswith("|"))
    named = set(re.findall(r"GENQ_[A-Z0-9_]+", rows))
    missing = [env_name(f) for f in dataclasses.fields(Settings) if env_name(f) not in named]
    assert missing == [], f"settings missing from the README's tables: {missing}"
