"""Settings read from GENQ_* and refused when they cannot work."""
from __future__ import annotations

import pytest

from genq.errors import ConfigError
from genq.settings import Settings


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
