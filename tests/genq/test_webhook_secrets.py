"""Webhook signing secrets at rest: sealed under a key that is not in the
database, so a dump alone reveals none; keys rotate (the first seals, every
one opens); rows from before sealing are sealed when first read; the embedded
default keeps its key in GENQ_HOME, and a shared database without a key
refuses to start the API."""
from __future__ import annotations

import contextlib
import os
import stat
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
from alembic import command
from cryptography.fernet import Fernet
from sqlalchemy import text
from standardwebhooks import Webhook

from api.app import create_app
from genq import webhook_secrets
from genq.db import make_engine, make_sessionmaker
from genq.errors import ConfigError
from genq.keys import get_or_create_tenant
from genq.migrate import alembic_config, upgrade
from genq.settings import Settings
from genq.webhook_secrets import Sealer
from tests.conftest import temp_pg_database

ROOT = Path(__file__).resolve().parents[2]
KEY_A, KEY_B = Fernet.generate_key().decode(), Fernet.generate_key().decode()


@pytest.fixture(params=["postgres", "sqlite"])
def own_sessions(request, tmp_path):
    """A database of the test's own: reencrypt rewrites every row, and the
    run's shared database holds rows sealed by other tests' keys."""
    with contextlib.ExitStack() as stack:
        if request.param == "sqlite":
            url = f"sqlite:///{tmp_path / 'genq.db'}"
        else:
            url = stack.enter_context(temp_pg_database(f"_keys_{uuid.uuid4().hex[:6]}"))
        upgrade(url)
        engine = make_engine(url)
        yield make_sessionmaker(engine)
        engine.dispose()


def tenant(sessions) -> str:
    with sessions.begin() as s:
        return get_or_create_tenant(s, f"t-{uuid.uuid4().hex[:8]}").id


def stored(sessions, tenant_id: str) -> list[str]:
    """The column as a dump shows it."""
    with sessions() as s:
        return list(s.scalars(text("SELECT sealed FROM webhook_secrets WHERE tenant_id = :t"), {"t": tenant_id}))


def test_a_database_dump_reveals_no_secret(sessions):
    tenant_id = tenant(sessions)
    sealer = Sealer([KEY_A])
    with sessions.begin() as s:
        first = webhook_secrets.current(s, tenant_id, sealer)
        second, _ = webhook_secrets.rotate(s, tenant_id, 3600, sealer)
    dump = stored(sessions, tenant_id)
    assert len(dump) == 2
    for value in dump:
        assert first not in value and second not in value and "whsec_" not in value
        assert first[6:] not in value and second[6:] not in value  # nor the key's base64 alone
    with pytest.raises(ConfigError, match="sealed with a key that is not among GENQ_WEBHOOK_SECRET_KEYS"):
        Sealer([KEY_B]).open(dump[0])
    # Signing still gets the secrets themselves, and a receiver verifies with them.
    with sessions.begin() as s:
        keys = webhook_secrets.signing_keys(s, tenant_id, sealer)
    assert keys == [second, first]
    headers = webhook_secrets.sign(keys, "msg_1", b'{"id": "j"}', webhook_secrets.utcnow())
    assert Webhook(first).verify(b'{"id": "j"}', headers) == {"id": "j"}


def test_keys_rotate_the_first_seals_and_every_one_opens(own_sessions):
    sessions = own_sessions
    tenant_id = tenant(sessions)
    with sessions.begin() as s:
        secret = webhook_secrets.current(s, tenant_id, Sealer([KEY_A]))
    # A new key first, the old one after it: old rows still open.
    rotated = Sealer([KEY_B, KEY_A])
    with sessions.begin() as s:
        assert webhook_secrets.current(s, tenant_id, rotated) == secret
    with sessions.begin() as s:
        assert webhook_secrets.reencrypt(s, rotated) == 1
    [value] = stored(sessions, tenant_id)
    assert Sealer([KEY_B]).open(value) == secret
    with pytest.raises(ConfigError):
        Sealer([KEY_A]).open(value)
    # The old key can go.
    with sessions.begin() as s:
        assert webhook_secrets.current(s, tenant_id, Sealer([KEY_B])) == secret


@pytest.mark.parametrize("backend", ["sqlite", "postgres"])
def test_a_plain_secret_from_before_sealing_is_sealed_when_first_read(tmp_path, backend):
    if backend == "sqlite":
        check_upgrade_seals_on_read(f"sqlite:///{tmp_path / 'old.db'}")
    else:
        with temp_pg_database(f"_seal_{uuid.uuid4().hex[:6]}") as url:
            check_upgrade_seals_on_read(url)


def check_upgrade_seals_on_read(url: str) -> None:
    upgrade(url, "0007")
    plain, older = webhook_secrets.new_secret(), webhook_secrets.new_secret()
    engine = make_engine(url)
    with engine.begin() as conn:
        conn.execute(text("INSERT INTO tenants (id, name, created_at) VALUES ('t1', 'old', CURRENT_TIMESTAMP)"))
        conn.execute(text("INSERT INTO webhook_secrets (id, tenant_id, secret, created_at, expires_at) VALUES "
                          "('s1', 't1', :plain, CURRENT_TIMESTAMP, NULL), "
                          "('s0', 't1', :older, CURRENT_TIMESTAMP, CURRENT_TIMESTAMP + INTERVAL '1 hour')"
                          if url.startswith("postgresql") else
                          "INSERT INTO webhook_secrets (id, tenant_id, secret, created_at, expires_at) VALUES "
                          "('s1', 't1', :plain, CURRENT_TIMESTAMP, NULL), "
                          "('s0', 't1', :older, CURRENT_TIMESTAMP, datetime('now', '+1 hour'))"),
                     {"plain": plain, "older": older})
    upgrade(url)
    sessions = make_sessionmaker(engine)
    sealer = Sealer([KEY_A])
    with sessions.begin() as s:
        assert webhook_secrets.signing_keys(s, "t1", sealer) == [plain, older]
    dump = stored(sessions, "t1")
    assert len(dump) == 2 and not any(v.startswith("whsec_") for v in dump)
    assert sorted(sealer.open(v) for v in dump) == sorted([plain, older])
    # Walking back leaves code that reads plain secrets nothing it would misread.
    engine.dispose()
    command.downgrade(alembic_config(url), "0007")
    with make_engine(url).connect() as conn:
        assert conn.execute(text("SELECT count(*) FROM webhook_secrets")).scalar() == 0


def test_reencrypt_seals_plain_rows_too(own_sessions):
    sessions = own_sessions
    tenant_id = tenant(sessions)
    plain = webhook_secrets.new_secret()
    with sessions.begin() as s:
        s.add(webhook_secrets.WebhookSecret(tenant_id=tenant_id, sealed=plain))
    with sessions.begin() as s:
        webhook_secrets.reencrypt(s, Sealer([KEY_A]))
    [value] = stored(sessions, tenant_id)
    assert Sealer([KEY_A]).open(value) == plain


def test_the_embedded_default_makes_one_key_in_home_readable_by_its_owner_only(tmp_path):
    # Processes starting together (the API, the sender) end up with the same key.
    code = "import sys; from pathlib import Path; from genq.webhook_secrets import home_key; print(home_key(Path(sys.argv[1])).decode())"
    procs = [subprocess.Popen([sys.executable, "-c", code, str(tmp_path / "home")], cwd=ROOT, stdout=subprocess.PIPE,
                              text=True, env={**os.environ, "PYTHONPATH": str(ROOT)}) for _ in range(4)]
    keys = {p.communicate(timeout=120)[0].strip() for p in procs}
    assert len(keys) == 1 and all(p.returncode == 0 for p in procs)
    path = tmp_path / "home" / webhook_secrets.KEY_FILE
    assert path.read_text().strip() == keys.pop()
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert [p.name for p in path.parent.iterdir()] == [webhook_secrets.KEY_FILE]
    settings = Settings.from_env({}, home=tmp_path / "home")
    sealed = Sealer.from_settings(settings).seal("whsec_x")
    assert Sealer([path.read_text().strip()]).open(sealed) == "whsec_x"


def test_configured_keys_win_over_the_home_key(tmp_path):
    settings = Settings.from_env({"GENQ_WEBHOOK_SECRET_KEYS": f"{KEY_B},{KEY_A}"}, home=tmp_path)
    sealed = Sealer.from_settings(settings).seal("whsec_x")
    assert Sealer([KEY_B]).open(sealed) == "whsec_x"
    assert not (tmp_path / webhook_secrets.KEY_FILE).exists()


def test_a_shared_database_without_a_key_refuses_to_start_the_api(embedded_settings, pg_url):
    shared = embedded_settings.replace(database_url=pg_url)
    with pytest.raises(ConfigError, match="GENQ_WEBHOOK_SECRET_KEYS is unset: with a shared database"):
        create_app(shared)
    assert create_app(shared.replace(webhook_secret_keys=(KEY_A,)))


def test_a_malformed_key_is_refused_without_echoing_it():
    with pytest.raises(ConfigError) as caught:
        Settings.from_env({"GENQ_WEBHOOK_SECRET_KEYS": f"{KEY_A},not-a-key-at-all"})
    assert "GENQ_WEBHOOK_SECRET_KEYS key 2 of 2 is not a Fernet key" in caught.value.message
    assert "not-a-key-at-all" not in caught.value.message and KEY_A not in caught.value.message


def test_new_key_prints_a_key_settings_accept():
    done = subprocess.run([sys.executable, "-m", "genq.webhook_secrets", "new-key"], cwd=ROOT, capture_output=True,
                          text=True, timeout=120, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert done.returncode == 0, done.stderr
    key = done.stdout.strip()
    assert Settings.from_env({"GENQ_WEBHOOK_SECRET_KEYS": key}).webhook_secret_keys == (key,)
