"""Settings read from the environment: every knob is declared once and its
README row generated from the declaration; misspelt variables and values that
cannot work are refused, all at once, naming the variable and the value."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from genq import settings
from genq.errors import ConfigError
from genq.settings import Settings

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"


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


def test_an_unknown_variable_is_refused_naming_the_closest_setting():
    with pytest.raises(ConfigError, match="GENQ_LEASE_SECOND is not a genq setting; did you mean GENQ_LEASE_SECONDS"):
        Settings.from_env({"GENQ_LEASE_SECOND": "5"})
    with pytest.raises(ConfigError, match="GENQ_REGISTRY_PATH .*did you mean GENQ_REGISTRY\\?"):
        Settings.from_env({"GENQ_REGISTRY_PATH": "/x.yaml"})


def test_variables_that_are_not_settings_pass():
    # The worker image's pool (read by its shell) and the tests' and benchmarks' own knobs.
    env = {"GENQ_POOL": "gpu-text", "GENQ_TEST_PG_URL": "postgresql://x", "GENQ_BENCH_PG_URL": "postgresql://y",
           "OTHER": "1"}
    assert Settings.from_env(env) == Settings.from_env({})


def test_bad_values_are_reported_all_at_once_each_with_its_value_and_what_is_expected():
    env = {"GENQ_LEASE_SECONDS": "two minutes", "GENQ_WEBHOOK_ALLOW_HTTP": "maybe", "GENQ_PRESIGN_SECONDS": "0",
           "GENQ_LOG_FORMAT": "xml", "GENQ_WEBHOOK_BACKOFF": "5,soon", "GENQ_METRICS_TOKEN": "", "GENQ_LEASE_SECOND": "1"}
    with pytest.raises(ConfigError) as caught:
        Settings.from_env(env)
    assert caught.value.message.splitlines() == [
        "GENQ_LEASE_SECOND is not a genq setting; did you mean GENQ_LEASE_SECONDS?",
        "GENQ_PRESIGN_SECONDS must be from 1 to 604800 (7 days, the longest S3 allows), got 0",
        "GENQ_LEASE_SECONDS must be an integer, got 'two minutes'",
        "GENQ_WEBHOOK_BACKOFF must be comma-separated, each a number, got '5,soon'",
        "GENQ_WEBHOOK_ALLOW_HTTP must be true or false (also 1/0, yes/no, on/off), got 'maybe'",
        "GENQ_LOG_FORMAT must be 'text' or 'json', got 'xml'",
    ]


def test_a_bad_secret_is_reported_without_its_value():
    with pytest.raises(ConfigError, match="GENQ_METRICS_TOKEN must be a string, got a value of 2 characters"):
        Settings.from_env({}, metrics_token=42)


def test_genq_with_bad_settings_prints_every_problem_and_exits_2_without_a_traceback(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("GENQ_")}
    env.update(GENQ_HOME=str(tmp_path), GENQ_LEASE_SECONDS="soon", GENQ_API_THREADS="0", GENQ_MAX_ATTEMPT="3")
    done = subprocess.run([sys.executable, "-m", "genq.cli", "migrate"], env=env, cwd=ROOT, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr
    for name in ("GENQ_LEASE_SECONDS must be an integer, got 'soon'", "GENQ_API_THREADS must be 1 or more, got 0",
                 "GENQ_MAX_ATTEMPT is not a genq setting; did you mean GENQ_MAX_ATTEMPTS?"):
        assert name in done.stderr
    assert not (tmp_path / "genq.db").exists()


def test_every_setting_has_a_section_and_a_description():
    for name, field in Settings.model_fields.items():
        assert field.description and field.description.endswith((".", ")")), name
        assert (field.json_schema_extra or {}).get("section"), name


def test_the_readme_table_is_the_one_the_declarations_generate():
    block = settings.readme_block(README.read_text())
    assert block, "README.md has no <!-- settings:start --> ... <!-- settings:end --> block"
    assert block == settings.markdown(), "README.md's settings table is stale: run `python -m genq.settings --write-readme`"
    for var in settings.env_names().values():
        assert f"| `{var}` |" in block


def test_settings_survive_the_trip_to_a_child_process():
    changed = Settings.from_env({"GENQ_WEBHOOK_ALLOWED_HOSTS": "127.0.0.1, localhost", "GENQ_WEBHOOK_ALLOW_HTTP": "yes",
                                 "GENQ_EXECUTION_LOG": "/tmp/x.jsonl", "GENQ_API_HELD_THREADS": "2",
                                 "GENQ_REGISTRY": "/tmp/registry.yaml"})
    assert changed.webhook_allowed_hosts == ("127.0.0.1", "localhost") and changed.webhook_allow_http
    assert Settings.from_env(changed.as_env()) == changed
    assert hash(Settings.from_env(changed.as_env())) == hash(changed)


def test_an_empty_variable_means_the_default_except_where_empty_is_a_value():
    assert Settings.from_env({"GENQ_LEASE_SECONDS": "", "GENQ_DEVICE": "", "GENQ_PUBLIC_URL": ""}) == Settings.from_env({})
    assert Settings.from_env({"GENQ_RATE_LIMIT": ""}).rate_limit == ""


def test_defaults_under_home_follow_home(tmp_path):
    s = Settings.from_env({"GENQ_HOME": str(tmp_path)})
    assert s.database_url == f"sqlite:///{tmp_path}/genq.db"
    assert s.storage_url == f"file://{tmp_path}/storage" and s.model_dir == tmp_path / "models"
    assert Settings.from_env({}, home=tmp_path) == s


def test_replace_checks_as_from_env_does():
    s = Settings.from_env({})
    assert s.replace(api_port=9000).api_port == 9000
    with pytest.raises(ConfigError, match="GENQ_API_THREADS must be 1 or more, got 0"):
        s.replace(api_threads=0)


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


@pytest.mark.parametrize("command", [["api"], ["worker", "--pool", "webhooks"]])
def test_the_api_and_the_sender_refuse_a_shared_database_without_a_secrets_key(tmp_path, command):
    """Both open the tenants' sealed webhook secrets: without a key they say so
    at start, exit 2 and print no traceback (not at a gunicorn worker's boot
    or a first delivery)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("GENQ_")}
    env.update(GENQ_HOME=str(tmp_path), GENQ_DATABASE_URL="postgresql+psycopg://nobody@127.0.0.1:9/none",
               GENQ_BROKER_URL="redis://127.0.0.1:9/0")
    done = subprocess.run([sys.executable, "-m", "genq.cli", *command], env=env, cwd=ROOT, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 2, done.stderr
    assert "GENQ_WEBHOOK_SECRET_KEYS is unset" in done.stderr and "Traceback" not in done.stderr


def test_api_workers_default_from_the_cores_and_access_log_off():
    import os

    cores = len(os.sched_getaffinity(0))
    assert Settings.from_env({}).workers == max(1, min(8, cores))
    assert Settings.from_env({"GENQ_API_WORKERS": "3"}).workers == 3
    assert Settings.from_env({}).api_access_log is False
    assert Settings.from_env({"GENQ_API_ACCESS_LOG": "on"}).api_access_log is True
    with pytest.raises(ConfigError, match="GENQ_API_WORKERS must be 1 or more, got 0"):
        Settings.from_env({"GENQ_API_WORKERS": "0"})


def test_key_cache_and_rate_limit_are_checked():
    assert Settings.from_env({}).key_cache_seconds == 5.0
    assert Settings.from_env({"GENQ_KEY_CACHE_SECONDS": "0"}).key_cache_seconds == 0
    with pytest.raises(ConfigError, match="GENQ_KEY_CACHE_SECONDS must be 0 or more, got -1"):
        Settings.from_env({"GENQ_KEY_CACHE_SECONDS": "-1"})
    with pytest.raises(ConfigError, match="GENQ_RATE_LIMIT must be like `1200/minute`"):
        Settings.from_env({"GENQ_RATE_LIMIT": "often"})
