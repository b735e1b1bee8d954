"""The `genq` command: up, api, worker, migrate, keys, models check (the
service's side); run, jobs, files, fine-tune, keys list (a user's side, over
the REST API: genq/client/commands.py).

The kernel imports nothing of api/, worker/ or models/ (tests/test_imports.py):
each deployable is reached by its dotted name when its command runs, and is
handed the Settings this command read. The user's commands read no Settings:
they talk to an API that may be on another machine."""
from __future__ import annotations

import argparse
import importlib
import logging
import sys

from genq.client import commands as user_commands
from genq.errors import ConfigError
from genq.logs import configure as configure_logging
from genq.settings import Settings

# command -> "module:function(settings, args) -> exit code", imported only when it runs.
DEPLOYABLES = {
    "up": "api.up:main",
    "api": "api.serve:main",
    "worker": "worker.main:main",
    # `genq models check`: the registry read strictly, checkpoints resolved, no weights loaded.
    "models": "models.check:main",
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="genq", description="A job queue for generative models. The job commands "
                                     "(run, jobs, files, fine-tune) talk to the API at GENQ_URL (default "
                                     "http://127.0.0.1:8000) with the key GENQ_API_KEY (default: the one `genq up` "
                                     "keeps in GENQ_HOME).")
    parser.add_argument("--version", action="version", version=f"genq {_version()}")
    sub = parser.add_subparsers(dest="command", required=True)

    up = sub.add_parser("up", help="run API and worker together on this machine, no services needed")
    up.add_argument("--port", type=int, help="API port (default GENQ_API_PORT or 8000)")
    up.add_argument("--host", help="API host (default GENQ_API_HOST or 127.0.0.1)")

    api = sub.add_parser("api", help="serve the REST API with gunicorn")
    api.add_argument("--bind", help="host:port (default GENQ_API_HOST:GENQ_API_PORT)")
    api.add_argument("--workers", type=int, help="gunicorn worker processes (default GENQ_API_WORKERS or 2)")

    worker = sub.add_parser("worker", help="run a worker for one or more pools, or the webhook sender")
    worker.add_argument("--pool", required=True, help="pool name(s), comma-separated; 'all' for every pool in the registry; "
                                                      "the webhook queue (GENQ_WEBHOOK_QUEUE, 'webhooks') for the sender")
    worker.add_argument("--concurrency", type=int, default=None,
                        help="processes; 1 (the default) runs in-process (one GPU, one process). "
                             "The webhook sender alone runs this many threads (default 8)")
    worker.add_argument("--preload", action="store_true", help="load the pools' models before taking jobs")

    sub.add_parser("migrate", help="bring the database schema up to date")

    keys = sub.add_parser("keys", help="manage API keys")
    keys_sub = keys.add_subparsers(dest="keys_command", required=True)
    create = keys_sub.add_parser("create", help="create a key for a tenant (made if new) and print it once")
    create.add_argument("--tenant", required=True)
    create.add_argument("--role", default="user", choices=["user", "admin"])
    revoke = keys_sub.add_parser("revoke", help="revoke keys by the prefix shown when they were made")
    revoke.add_argument("prefix")
    listing = keys_sub.add_parser("list", help="every key by its prefix, over the API (an admin key)")
    listing.add_argument("--json", action="store_true", help="print the API's JSON instead of a table")

    user_commands.add_parsers(sub)

    models = sub.add_parser("models", help="inspect the model registry")
    models_sub = models.add_subparsers(dest="models_command", required=True)
    models_check = models_sub.add_parser("check", help="read every registry entry and resolve its checkpoint's "
                                                       "configs and files, loading no weights; exit 1 on a problem")
    models_check.add_argument("--registry", help="registry file (default GENQ_REGISTRY or models/registry.yaml)")

    args = parser.parse_args(argv)
    if args.command in USER_COMMANDS or (args.command == "keys" and args.keys_command == "list"):
        return user_commands.main(args)
    try:
        settings = Settings.from_env()
        configure_logging(settings)
        if args.command in DEPLOYABLES:
            module, _, name = DEPLOYABLES[args.command].partition(":")
            command = getattr(importlib.import_module(module), name)
        else:
            command = COMMANDS[args.command]
        return command(settings, args) or 0
    except ConfigError as exc:
        # Something the operator must fix, said once and plainly: no traceback.
        print(f"genq {args.command}: the configuration cannot work:", file=sys.stderr)
        for line in exc.message.splitlines():
            print(f"  {line}", file=sys.stderr)
        return 2


def cmd_migrate(settings: Settings, args) -> int:
    from genq.db import redact
    from genq.migrate import upgrade

    # Kept quiet elsewhere (genq.logs.QUIET_LOGGERS); here what ran is the output.
    logging.getLogger("alembic").setLevel(logging.INFO)
    upgrade(settings.database_url)
    print(f"database at {redact(settings.database_url)} is up to date")
    return 0


def cmd_keys(settings: Settings, args) -> int:
    from genq.db import make_engine, make_sessionmaker
    from genq.keys import create_key, revoke

    sessions = make_sessionmaker(make_engine(settings.database_url))
    with sessions.begin() as session:
        if args.keys_command == "create":
            tenant, raw = create_key(session, args.tenant, args.role)
            print(raw)
            print(f"# tenant {tenant.name} ({args.role}); shown once, stored hashed", file=sys.stderr)
        else:
            count = revoke(session, args.prefix)
            print(f"revoked {count} key(s)")
            return 0 if count else 1
    return 0


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("genq")
    except PackageNotFoundError:  # run from a source tree that was never installed
        return "unknown"


COMMANDS = {"migrate": cmd_migrate, "keys": cmd_keys}
# Commands of a user of the API, run by genq/client/commands.py.
USER_COMMANDS = ("run", "jobs", "files", "fine-tune")

if __name__ == "__main__":
    sys.exit(main())
