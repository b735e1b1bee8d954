"""The API process never imports torch: it validates with the families' schemas only."""
from __future__ import annotations

import subprocess
import sys

SCRIPT = """
import sys, tempfile
from pathlib import Path
from genq.settings import Settings
from genq.migrate import upgrade
from genq.db import make_engine, make_sessionmaker
from genq.keys import create_key
from api.app import create_app
s = Settings.from_env({}, home=Path(tempfile.mkdtemp()))
upgrade(s.database_url)
with make_sessionmaker(make_engine(s.database_url)).begin() as session:
    _, key = create_key(session, "t")
c = create_app(s).test_client()
h = {"Authorization": "Bearer " + key}
assert c.post("/v1/jobs", json={"model": "demo-text", "input": {"prompt": "hi"}}, headers=h).status_code == 202
assert c.post("/v1/jobs", json={"model": "demo-image", "input": {"prompt": "hi", "width": 64}}, headers=h).status_code == 202
assert c.get("/v1/models", headers=h).status_code == 200
assert c.get("/openapi.json").status_code == 200
print("torch" in sys.modules, "transformers" in sys.modules, "diffusers" in sys.modules)
"""


def test_api_serves_jobs_and_models_without_importing_torch():
    out = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "False False False"


CLIENT_SCRIPT = """
import sys
import genq.client
from genq.client import Client
from genq.cli import main
# A job command against an API that is not there: a client error (2), and no model library loaded.
code = main(["jobs", "ls"])
print(code, "torch" in sys.modules, "transformers" in sys.modules, "diffusers" in sys.modules,
      "api" in sys.modules, "models" in sys.modules)
"""


def test_the_client_and_the_job_commands_load_no_model_library(tmp_path):
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "GENQ_URL": "http://127.0.0.1:9", "GENQ_API_KEY": "gq_x"}
    out = subprocess.run([sys.executable, "-c", CLIENT_SCRIPT], capture_output=True, text=True, timeout=120, env=env)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "2 False False False False False"
    assert "genq: " in out.stderr and "ConnectError" in out.stderr
