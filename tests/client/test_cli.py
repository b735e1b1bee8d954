"""The job commands of `genq` against a real `genq up`, in a pseudo-terminal
where a person would see the bars: output saved, bars drawn, exit codes."""
from __future__ import annotations

import json
import os
import pty
import re
import subprocess
import sys
import threading
import time

import pytest

from tests.client.conftest import new_tenant
from tests.client.test_client import pause

ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


def genq(up, *args, key: str | None = None, tty: bool = False, cwd=None, timeout: float = 120,
         env: dict | None = None) -> tuple[int, str]:
    """`genq ARGS` as a user runs it; (exit code, what it wrote: stdout, then
    stderr; in a pty both together, ANSI codes removed). `env` replaces the
    GENQ_* variables it is given (GENQ_URL, GENQ_API_KEY by default)."""
    base = {k: v for k, v in os.environ.items() if not k.startswith("GENQ_")}
    env = {**base, "COLUMNS": "100", "TERM": "xterm-256color", "PYTHONUNBUFFERED": "1",
           **(env if env is not None else {"GENQ_URL": up["url"], "GENQ_API_KEY": key or up["key"]})}
    cmd = [sys.executable, "-m", "genq.cli", *args]
    if not tty:
        out = subprocess.run(cmd, env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout)
        return out.returncode, out.stdout + out.stderr
    leader, follower = pty.openpty()
    proc = subprocess.Popen(cmd, env=env, cwd=cwd, stdin=follower, stdout=follower, stderr=follower)
    os.close(follower)
    chunks = []
    while True:
        try:
            chunk = os.read(leader, 65536)
        except OSError:  # EIO: every writer has closed the terminal
            break
        if not chunk:
            break
        chunks.append(chunk)
    os.close(leader)
    return proc.wait(timeout), ANSI.sub("", b"".join(chunks).decode("utf-8", "replace"))


@pytest.fixture(scope="module")
def key(up):
    return new_tenant(up)


def test_run_an_image_draws_a_bar_and_saves_the_file(up, key, tmp_path):
    code, out = genq(up, "run", "demo-image", "-i", "prompt=a red fox", "-i", "width=64", "-i", "height=64",
                     "-i", "num_inference_steps=20", "-i", "seed=7", "-o", str(tmp_path / "out"), key=key, tty=True)
    assert code == 0, out
    assert "━━━" in out and "20/20 steps" in out and "succeeded" in out
    [saved] = (tmp_path / "out").iterdir()
    assert saved.read_bytes()[:4] == b"\x89PNG" and str(saved) in out


def test_run_reads_json_values_and_files(up, key, tmp_path):
    (tmp_path / "prompt.txt").write_text("a prompt from a file\n")
    code, out = genq(up, "run", "demo-text", "-i", f"prompt=@{tmp_path / 'prompt.txt'}", "-i", "max_new_tokens=6",
                     "-i", "seed=7", "--json", key=key)
    assert code == 0, out
    job = json.loads(out)
    assert job["status"] == "succeeded" and job["input"]["prompt"] == "a prompt from a file"
    assert job["input"]["seed"] == 7 and job["output"]["tokens"] <= 6
    code, text = genq(up, "run", "demo-text", "-i", "prompt=a prompt from a file", "-i", "max_new_tokens=6",
                      "-i", "seed=7", key=key)
    assert code == 0 and text == job["output"]["text"] + "\n"  # the same seed, the same text, on stdout


def test_watch_follows_a_queued_job_to_its_end(up, key):
    pause(up, "gpu-image")
    try:
        code, job_id = genq(up, "run", "demo-image", "-i", "prompt=x", "-i", "width=64", "-i", "height=64",
                            "-i", "num_inference_steps=10", "--no-wait", key=key)
        assert code == 0 and re.fullmatch(r"[0-9a-f]{32}\n", job_id), job_id
        job_id = job_id.strip()
        # Watching from before the job starts: the bar begins at "queued".
        watched = []
        watcher = threading.Thread(target=lambda: watched.append(genq(up, "jobs", "watch", job_id, key=key, tty=True)))
        watcher.start()
        time.sleep(4)  # time for the watcher to start and draw its first bar on a loaded machine
    finally:
        pause(up, "gpu-image", resume=True)
    watcher.join(120)
    [(code, out)] = watched
    assert code == 0, out
    assert "queued" in out and "succeeded" in out and "10/10 steps" in out
    assert f"/v1/jobs/{job_id}/outputs/0.png" in out


def test_watch_json_streams_text_deltas(up, key):
    _, job_id = genq(up, "run", "demo-text", "-i", "prompt=Once", "-i", "max_new_tokens=24", "-i", "seed=3",
                     "--no-wait", key=key)
    code, out = genq(up, "jobs", "watch", job_id.strip(), "--json", key=key)
    assert code == 0, out
    events = [json.loads(line) for line in out.splitlines()]
    assert events[-1]["type"] == "completed"
    final = next(e for e in events if e["type"] == "output" and "text" in (e["data"] or {}))["data"]["text"]
    deltas = "".join(e["data"]["delta"] for e in events if e["type"] == "output" and "delta" in e["data"])
    assert final.startswith(deltas)


def test_cancel_get_and_exit_codes(up, key):
    pause(up, "gpu-text")
    try:
        _, job_id = genq(up, "run", "demo-text", "-i", "prompt=never", "--no-wait", key=key)
        job_id = job_id.strip()
        code, out = genq(up, "jobs", "cancel", job_id, key=key)
        assert code == 0 and out == f"{job_id} canceled\n"
    finally:
        pause(up, "gpu-text", resume=True)
    code, out = genq(up, "jobs", "get", job_id, key=key)
    assert code == 1 and "canceled" in out
    code, out = genq(up, "jobs", "watch", job_id, key=key)
    assert code == 1 and f"job {job_id} canceled" in out
    code, out = genq(up, "jobs", "cancel", job_id, key=key)
    assert code == 2 and "409" in out and "already canceled" in out
    code, out = genq(up, "jobs", "rm", job_id, key=key)
    assert code == 0 and out == f"{job_id} deleted\n"
    code, out = genq(up, "jobs", "get", job_id, key=key)
    assert code == 2 and "404" in out
    code, out = genq(up, "jobs", "get", "0" * 32, key=key)
    assert code == 2 and "404" in out
    code, out = genq(up, "run", "demo-image", "-i", "prompt=x", "-i", "width=100000", key=key)
    assert code == 2 and "input.width" in out
    code, out = genq(up, "run", "demo-text", "-i", "no-equals-sign", key=key)
    assert code == 2 and "expected KEY=VALUE" in out
    code, out = genq(up, "jobs", "frobnicate", key=key)
    assert code == 2 and "usage:" in out
    code, out = genq(up, "jobs", "ls", key="gq_not-a-key")
    assert code == 2 and "401" in out


def test_ls_filters_and_json(up, key, tmp_path):
    # Its own jobs, so that it needs no earlier test's: a text job and an image job, both done.
    for model, extra in (("demo-text", ["-i", "max_new_tokens=2"]), ("demo-image", ["-i", "width=64", "-i", "height=64",
                                                                                   "-i", "num_inference_steps=2"])):
        code, out = genq(up, "run", model, "-i", "prompt=ls", *extra, "-o", str(tmp_path), key=key)
        assert code == 0, out
    code, out = genq(up, "jobs", "ls", "--status", "succeeded", "--json", key=key)
    assert code == 0 and {j["status"] for j in json.loads(out)} == {"succeeded"}
    code, out = genq(up, "jobs", "ls", "--model", "demo-image", "-n", "1", key=key, tty=True)
    assert code == 0 and "demo-image" in out and "demo-text" not in out and "STATUS" in out


def test_fine_tune_create_watch_shows_step_and_loss(up, key, tmp_path):
    data = tmp_path / "train.jsonl"
    data.write_text("".join(f'{{"prompt": "q{i}", "completion": " a{i}"}}\n' for i in range(8)))
    code, out = genq(up, "files", "upload", str(data), "--json", key=key)
    assert code == 0 and json.loads(out)["rows"] == 8
    code, out = genq(up, "fine-tune", "create", "--model", "demo-text", "--file", str(data), "--epochs", "1",
                     "--max-steps", "3", "--suffix", "cli", "--watch", key=key, tty=True, timeout=300)
    assert code == 0, out
    assert re.search(r"(\d+)/\1 steps loss \d+\.\d{4}", out), out  # 8 rows, 4 a step: 2 steps
    assert re.search(r"demo-text:ft-cli-[0-9a-z]+", out), out


def test_files_upload_and_rm(up, key, tmp_path):
    data = tmp_path / "d.jsonl"
    data.write_text('{"text": "to be deleted"}\n')
    code, out = genq(up, "files", "upload", str(data), key=key)
    file_id = out.strip().splitlines()[0]
    assert code == 0 and len(file_id) == 32
    code, out = genq(up, "files", "rm", file_id, key=key)
    assert code == 0 and out == f"{file_id} deleted\n"
    code, out = genq(up, "files", "rm", file_id, key=key)
    assert code == 2 and "404" in out


def test_keys_list_and_version(up):
    code, out = genq(up, "keys", "list", "--json")
    assert code == 0 and up["key"][:10] in {k["prefix"] for k in json.loads(out)}
    code, out = genq(up, "keys", "list", key=new_tenant(up))  # a user key: admin only
    assert code == 2 and "403" in out
    # No GENQ_API_KEY: the key `genq up` keeps in GENQ_HOME, as for its user at the same machine.
    code, out = genq(up, "jobs", "ls", "--json", env={"GENQ_URL": up["url"], "GENQ_HOME": str(up["home"])})
    assert code == 0 and isinstance(json.loads(out), list)
    code, out = genq(up, "jobs", "ls", env={"GENQ_URL": "ftp://nowhere"})
    assert code == 2 and "base_url must be an http(s) URL" in out
    code, out = genq(up, "--version")
    assert code == 0 and re.fullmatch(r"genq \d+\.\d+\.\d+\S*\n", out)
