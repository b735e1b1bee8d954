"""Tests of the demo checkpoints: built deterministically, once, safely under concurrent first use."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from models.demo import build_text, ensure_checkpoint

ROOT = Path(__file__).resolve().parents[2]


def test_only_demo_checkpoints_are_built(tmp_path):
    # Other schemes are models.checkpoints.resolve's (tests/models/test_checkpoints.py).
    for other in ("demo:hologram", "openai-community/gpt2", "/models/my-sd"):
        with pytest.raises(ValueError, match="unknown demo checkpoint"):
            ensure_checkpoint(other, tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_built_once_then_reused(text_checkpoint, demo_dir):
    weights = Path(text_checkpoint) / "model.safetensors"
    before = weights.stat().st_mtime_ns
    assert ensure_checkpoint("demo:text", demo_dir) == text_checkpoint
    assert weights.stat().st_mtime_ns == before


def test_build_is_deterministic(tmp_path, text_checkpoint):
    build_text(tmp_path)
    for name in ("model.safetensors", "tokenizer.json", "config.json"):
        assert (tmp_path / name).read_bytes() == (Path(text_checkpoint) / name).read_bytes(), name


def test_racing_processes_build_one_checkpoint(tmp_path):
    code = "import sys; from models.demo import ensure_checkpoint; print(ensure_checkpoint('demo:text', sys.argv[1]))"
    procs = [
        subprocess.Popen([sys.executable, "-c", code, str(tmp_path)], cwd=ROOT, stdout=subprocess.PIPE, text=True)
        for _ in range(2)
    ]
    outs = [p.communicate(timeout=120)[0].strip() for p in procs]
    assert [p.returncode for p in procs] == [0, 0]
    assert outs == [str(tmp_path / "demo-text")] * 2
    # Only the finished directory and the lock file: no half-built temp directories.
    assert sorted(p.name for p in tmp_path.iterdir()) == [".demo-text.lock", "demo-text"]
    assert (tmp_path / "demo-text" / "model.safetensors").is_file()
