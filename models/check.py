"""`genq models check`: every registry entry read strictly, and its checkpoint's
configs and files resolved, without loading any weights."""
from __future__ import annotations

import sys
from pathlib import Path

from models import checkpoints
from models.registry import ModelSpec, Registry, RegistryError


def check_spec(spec: ModelSpec, model_dir: Path) -> tuple[list[str], list[str]]:
    """(problems, notes) for one model: problems stop it loading; notes are
    what a reader should know (a demo not built yet, a hub id not cached)."""
    checkpoint = spec.checkpoint
    if checkpoint.startswith(checkpoints.DEMO):
        from models.demo import DEMOS

        if checkpoint not in DEMOS:
            return [f"unknown demo checkpoint {checkpoint!r}; known: {sorted(DEMOS)}"], []
        built = Path(model_dir) / DEMOS[checkpoint][0]
        if not built.is_dir():
            how = ("its trained weights copied from models/demo_weights" if checkpoint == "demo:digits"
                   else "built from random weights")
            return [], [f"{checkpoint}: {how} on first use, under {model_dir}"]
        checkpoint = str(built)
    elif checkpoint.startswith(checkpoints.FINE_TUNED):
        return [], [f"{checkpoint}: a fine-tuned version in object storage, fetched on first use"]
    elif not checkpoint.startswith("/"):
        return _hub(spec)
    elif not Path(checkpoint).is_dir():
        return [f"{checkpoint}: no such directory"], []
    family_check = getattr(spec.module, "check", None)
    if family_check is None:
        return [], [f"family {spec.family!r} has no checks of its files"]
    pins = {k: v for k, v in (("revision", spec.revision), ("variant", spec.variant)) if v}
    if spec.revision:
        pins.pop("revision")  # a local directory holds one revision: nothing to pin there
    return family_check(checkpoint, **pins), []


def _hub(spec: ModelSpec) -> tuple[list[str], list[str]]:
    """A hub id: its config from the local Hugging Face cache only; this command downloads nothing."""
    from huggingface_hub import try_to_load_from_cache

    for name in ("model_index.json", "config.json"):
        found = try_to_load_from_cache(spec.checkpoint, name, revision=spec.revision)
        if isinstance(found, str):
            return [], [f"{spec.checkpoint}: hub id, {name} in the local cache"]
    at = f" at revision {spec.revision!r}" if spec.revision else ""
    return [], [f"{spec.checkpoint}: hub id{at} not in the local cache; a worker downloads it on first load "
                f"(it fails where the hub is unreachable)"]


def check_registry(path: Path, model_dir: Path) -> list[tuple[str, list[str], list[str]]]:
    """(model, problems, notes) for every entry of the registry at `path`: entries that fail to parse first."""
    specs, errors = Registry.read(path)
    out = []
    for name in list(dict.fromkeys([*errors, *specs])):
        if name in errors:
            out.append((name, [errors[name]], []))
            continue
        try:
            problems, notes = check_spec(specs[name], model_dir)
        except Exception as exc:  # one entry's surprise must not hide the others'
            problems, notes = [f"checking it raised {type(exc).__name__}: {exc}"], []
        out.append((name, problems, notes))
    return out


def main(settings, args) -> int:
    """`genq models check [--registry PATH]`: 0 when every entry can load, 1 when one cannot."""
    path = Path(args.registry or settings.registry_path)
    try:
        results = check_registry(path, settings.model_dir)
    except RegistryError as exc:
        print(f"FAIL  {exc}", file=sys.stderr)
        return 1
    failed = 0
    for name, problems, notes in results:
        print(f"{'FAIL' if problems else 'ok  '}  {name}")
        for line in problems:
            print(f"      problem: {line}")
        for line in notes:
            print(f"      note: {line}")
        failed += bool(problems)
    print(f"{len(results)} model(s) in {path}: {failed} with problems")
    return 1 if failed else 0
