"""One resolver for every checkpoint scheme: demo checkpoints are built,
fine-tuned versions fetched from storage and cached, directories and hub ids
given to from_pretrained as they are."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

from genq.storage import LocalStorage
from models import checkpoints
from models.registry import ModelSpec, Registry

ROOT = Path(__file__).resolve().parents[2]


def spec(checkpoint: str, **kw) -> ModelSpec:
    return ModelSpec(name="m", family="text-generation", checkpoint=checkpoint, pool="p", **kw)


def test_directories_and_hub_ids_pass_through(tmp_path):
    assert checkpoints.resolve(spec("openai-community/gpt2"), tmp_path) == "openai-community/gpt2"
    assert checkpoints.resolve(spec("/models/my-sd"), tmp_path) == "/models/my-sd"
    assert list(tmp_path.iterdir()) == []


def test_a_demo_checkpoint_is_built_where_the_model_dir_says(text_checkpoint, demo_dir):
    assert checkpoints.resolve(spec("demo:text"), demo_dir) == text_checkpoint
    with pytest.raises(ValueError, match="unknown demo checkpoint 'demo:hologram'"):
        checkpoints.resolve(spec("demo:hologram"), demo_dir)


def test_relative_directories_are_relative_to_the_registry_file(tmp_path):
    (tmp_path / "conf").mkdir()
    registry = tmp_path / "conf" / "registry.yaml"
    registry.write_text("models:\n"
                        "  a: {family: text-generation, checkpoint: ./weights/a, pool: p}\n"
                        "  b: {family: text-generation, checkpoint: ../b, pool: p}\n"
                        "  c: {family: text-generation, checkpoint: demo:text, pool: p}\n"
                        "  d: {family: text-generation, checkpoint: org/name, pool: p}\n")
    loaded = Registry.load(registry)
    assert [loaded[n].checkpoint for n in "abcd"] == [
        str(tmp_path / "conf" / "weights" / "a"), str(tmp_path / "b"), "demo:text", "org/name"]


def test_a_fine_tuned_version_is_fetched_from_storage_once(tmp_path):
    storage = LocalStorage(tmp_path / "storage")
    for name, data in {"config.json": b"{}", "model.safetensors": b"weights"}.items():
        storage.put(f"models/v1/{name}", data, "application/octet-stream")
    version = spec("org/base").fine_tuned("m:ft-walrus-abc123", "full", "models/v1", "full fine-tune of m")
    assert version.checkpoint.startswith(checkpoints.FINE_TUNED) and version.base_checkpoint == "org/base"

    local = Path(checkpoints.resolve(version, tmp_path / "models", storage))
    assert local.parent == tmp_path / "models" / "ft"
    assert {p.name: p.read_bytes() for p in local.iterdir()} == {"config.json": b"{}", "model.safetensors": b"weights"}
    # Cached on this machine: storage is not read again.
    assert checkpoints.resolve(version, tmp_path / "models", LocalStorage(tmp_path / "empty")) == str(local)


def test_a_fine_tuned_version_without_weights_names_them(tmp_path):
    version = spec("org/base").fine_tuned("m:ft-x-1", "lora", "models/gone", "")
    with pytest.raises(FileNotFoundError, match=re.escape("the weights of 'm:ft-x-1' are missing from storage (models/gone)")):
        checkpoints.resolve(version, tmp_path, LocalStorage(tmp_path / "storage"))


def test_only_the_resolver_spells_the_schemes():
    spelt = []
    for package in ("api", "genq", "worker", "models"):
        for path in sorted((ROOT / package).rglob("*.py")):
            if path.name == "checkpoints.py":
                continue
            for i, line in enumerate(path.read_text().splitlines(), 1):
                if re.search(r"""["']ft:|["']demo:["']|startswith\(\(?["'](demo|ft):""", line):
                    spelt.append(f"{path.relative_to(ROOT)}:{i}: {line.strip()}")
    assert spelt == [], "resolve checkpoints with models.checkpoints"
