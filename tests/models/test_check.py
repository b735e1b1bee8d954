"""`genq models check`: each registry entry read strictly and its checkpoint's files resolved, no weights loaded."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from genq import cli
from models.check import check_registry

ROOT = Path(__file__).resolve().parents[2]


def registry(tmp_path, body: str) -> Path:
    path = tmp_path / "registry.yaml"
    path.write_text("models:\n" + body)
    return path


def test_the_shipped_registry_checks_clean_before_any_demo_is_built(tmp_path):
    results = check_registry(ROOT / "models" / "registry.yaml", tmp_path)
    assert [problems for _, problems, _ in results] == [[] for _ in results]
    assert all("built from random weights on first use" in notes[0] for name, _, notes in results
               if name != "demo-digits")
    assert [notes[0].split(",")[0] for name, _, notes in results if name == "demo-digits"] == [
        "demo:digits: its trained weights copied from models/demo_weights on first use"]


def test_built_demos_pass_their_family_checks(demo_dir, text_checkpoint, image_checkpoint, image_xl_checkpoint,
                                              audio_checkpoint, video_checkpoint, vision_text_checkpoint,
                                              digits_checkpoint):
    results = check_registry(ROOT / "models" / "registry.yaml", demo_dir)
    assert {"demo-text", "demo-image", "demo-image-xl", "demo-image-to-image", "demo-inpainting",
            "demo-audio", "demo-video", "demo-vision-text", "demo-digits"} <= {
        name for name, _, _ in results}
    assert [(name, problems, notes) for name, problems, notes in results if problems or notes] == []


def test_what_is_wrong_is_said_per_entry(tmp_path, image_checkpoint, text_checkpoint):
    broken = tmp_path / "broken-image"
    shutil.copytree(image_checkpoint, broken)
    shutil.rmtree(broken / "vae")
    for weights in (broken / "unet").glob("*.safetensors"):
        weights.unlink()
    no_tokenizer = tmp_path / "text"
    shutil.copytree(text_checkpoint, no_tokenizer)
    for f in no_tokenizer.glob("tokenizer*"):
        f.unlink()
    path = registry(tmp_path, f"""\
  typo: {{family: text-generation, checkpoint: demo:text, pool: p, max_batch_sise: 8}}
  missing: {{family: text-generation, checkpoint: ./nowhere, pool: p}}
  broken: {{family: image-generation, checkpoint: {broken}, pool: p}}
  notext: {{family: text-generation, checkpoint: {no_tokenizer}, pool: p}}
  wrongvariant: {{family: image-generation, checkpoint: {image_checkpoint}, pool: p, variant: fp16}}
  textasimage: {{family: image-generation, checkpoint: {text_checkpoint}, pool: p}}
  textasvision: {{family: image-text-to-text, checkpoint: {text_checkpoint}, pool: p}}
  hub: {{family: image-generation, checkpoint: nobody/nothing, pool: p, revision: v1}}
""")
    results = {name: (problems, notes) for name, problems, notes in check_registry(path, tmp_path)}
    assert results["typo"][0] == [f"{path}: model 'typo': unknown key 'max_batch_sise'; did you mean 'max_batch_size'?"]
    assert results["missing"][0] == [f"{tmp_path / 'nowhere'}: no such directory"]
    assert sorted(results["broken"][0]) == [f"{broken / 'unet'}: no weights",
                                            f"{broken / 'vae'}: missing (model_index.json names component 'vae')"]
    assert results["notext"][0] == [f"{no_tokenizer}: no tokenizer files"]
    assert results["wrongvariant"][0] == [f"{image_checkpoint}/{c}: no weights of variant 'fp16'"
                                          for c in ("text_encoder", "unet", "vae")]
    assert results["textasimage"][0] == [f"{text_checkpoint}: no model_index.json (not a diffusers pipeline directory)"]
    assert results["textasvision"][0] == [
        f"{text_checkpoint}: GPT2Config is no image-text-to-text model in this transformers",
        f"{text_checkpoint}: no image processor config"]
    assert results["hub"] == ([], ["nobody/nothing: hub id at revision 'v1' not in the local cache; a worker downloads "
                                   "it on first load (it fails where the hub is unreachable)"])


def test_the_command_exits_1_on_a_problem_and_prints_it(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("GENQ_HOME", str(tmp_path))
    path = registry(tmp_path, "  m: {family: text-generation, checkpoint: demo:text, pool: p, max_wait: 5}\n")
    assert cli.main(["models", "check", "--registry", str(path)]) == 1
    out = capsys.readouterr().out
    assert "FAIL  m" in out and "did you mean 'max_wait_ms'?" in out and "1 with problems" in out
    assert cli.main(["models", "check", "--registry", str(ROOT / "models" / "registry.yaml")]) == 0


def test_a_corrupt_config_is_named(tmp_path, image_checkpoint):
    copy = tmp_path / "img"
    shutil.copytree(image_checkpoint, copy)
    (copy / "scheduler" / "scheduler_config.json").write_text("{not json")
    path = registry(tmp_path, f"  m: {{family: image-generation, checkpoint: {copy}, pool: p}}\n")
    [(_, problems, _)] = check_registry(path, tmp_path)
    assert len(problems) == 1 and problems[0].startswith(f"{copy}/scheduler/scheduler_config.json: not JSON")
    json.loads((Path(image_checkpoint) / "scheduler" / "scheduler_config.json").read_text())  # the original is untouched
