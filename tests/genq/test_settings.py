"""Settings read from the environment: every knob is documented where users
look for it, and values that cannot work are refused, naming the variable and
the value."""
from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest

from genq.errors import ConfigError
from genq.settings import Settings

README = Path(__file__).resolve().parents[2] / "README.md"


@pytest.mark.parametrize("raw", ["-5", "0", "604801", str(365 * 24 * 3600)])
def test_presign_lifetime_outside_1_to_7_days_is_refused(raw):
    with pytest.raises(ConfigError, match=rf"GENQ_PRESIGN_SECONDS must be from 1 to 604800 .*got {raw}"):
        Settings.from_env({"GENQ_PRESIGN_SECONDS": raw})


@pytest.mark.parametrize("raw, seconds", [("1", 1), ("604800", 604800), ("", 3600)])
def test_presign_lifetime_within_limits_is_taken(raw, seconds):
    assert Settings.from_env({"GENQ_PRESIGN_SECONDS": raw}).presign_seconds == seconds


def test_tenant_file_quota_is_a_non_negative_byte_count():
    assert Settings.from_env({}).max_tenant_file_bytes == 2**30
    assert Settings.from_env({"GENQ_MAX_TENANT_FILE_BYTES": "0"}).max_tenant_file_bytes == 0
    with pytest.raises(ConfigError, match="GENQ_MAX_TENANT_FILE_BYTES must be 0 .*got -1"):
        Settings.from_env({"GENQ_MAX_TENANT_FILE_BYTES": "-1"})


def env_name(field: dataclasses.Field) -> str:
    return "GENQ_REGISTRY" if field.name == "registry_path" else f"GENQ_{field.name.upper()}"


def test_every_setting_is_in_a_readme_table():
    rows = "\n".join(line for line in README.read_text().splitlines() if line.startswith("|"))
    named = set(re.findall(r"GENQ_[A-Z0-9_]+", rows))
    missing = [env_name(f) for f in dataclasses.fields(Settings) if env_name(f) not in named]
    assert missing == [], f"settings missing from the README's tables: {missing}"

def test_held_threads_default_to_half_the_threads_and_always_leave_some():
    assert Settings.from_env({}).held_threads == 4
    assert Settings.from_env({"GENQ_API_THREADS": "16"}).held_threads == 8
    assert Settings.from_env({"GENQ_API_THREADS": "1"}).held_threads == 0
    assert Settings.from_env({"GENQ_API_THREADS": "4", "GENQ_API_HELD_THREADS": "3"}).held_threads == 3
    with pytest.raises(ConfigError, match="GENQ_API_HELD_THREADS must be from 0 to GENQ_API_THREADS - 1 \\(3\\)"):
        Settings.from_env({"GENQ_API_THREADS": "4", "GENQ_API_HELD_THREADS": "4"})


@pytest.mark.parametrize("name, value", [("API_WORKERS", "0"), ("API_THREADS", "0"), ("EVENT_STREAM_SECONDS", "0"),
                                         ("MAX_HELD_REQUESTS", "-1"), ("METRICS_CACHE_SECONDS", "-1"),
                                         ("API_THREADS", "many")])
def test_unworkable_api_settings_are_refused_naming_the_variable(name, value):
    with pytest.raises(ConfigError, match=f"GENQ_{name}"):
        Settings.from_env({f"GENQ_{name}": value})


def test_the_metrics_token_travels_to_child_processes_only_when_set():
    assert "GENQ_METRICS_TOKEN" not in Settings.from_env({}).as_env()
    settings = Settings.from_env({"GENQ_METRICS_TOKEN": "t0ken"})
    assert Settings.from_env(settings.as_env()).metrics_token == "t0ken"
