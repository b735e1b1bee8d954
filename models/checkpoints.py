"""Where a model's weights come from, by the scheme of its `checkpoint`, and the
one resolver that turns any of them into what from_pretrained loads:

    demo:text, demo:image   built here from random weights on first use (models/demo.py)
    ft:<method>:<prefix>    a tenant's fine-tuned version: its files under <prefix> in
                            object storage, merged onto its base's weights (LoRA), cached
                            under the model dir once per machine; or, for a LoRA
                            fine-tune served on its loaded base, its adapter files as
                            they are (adapter_dir)
    /dir, ./dir, ../dir     a local directory; a relative one is relative to the registry
                            file that names it
    org/name                a hub id, left to from_pretrained

No torch at import: the registry (and so the API) reads checkpoints too.
"""
from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

DEMO = "demo:"
FINE_TUNED = "ft:"


def normalize(checkpoint: str, registry_dir: Path) -> str:
    """The checkpoint as a registry records it: a relative directory made
    absolute against the registry file's, not the current directory."""
    if checkpoint.startswith((".", "/")):
        return str((Path(registry_dir) / checkpoint).resolve())
    return checkpoint


def fine_tuned(method: str, storage_prefix: str) -> str:
    """The checkpoint of a fine-tuned version whose files lie under `storage_prefix`."""
    return f"{FINE_TUNED}{method}:{storage_prefix}"


def resolve(spec, model_dir: Path, storage=None) -> str:
    """The directory (or hub id) to load `spec`'s weights from: demo
    checkpoints are built, fine-tuned versions fetched from `storage` (a
    genq Storage: list and get) and merged onto their base, directories and
    hub ids given as they are."""
    if spec.checkpoint.startswith(FINE_TUNED):
        return str(_fetch_version(spec, Path(model_dir), storage))
    return _local(spec.checkpoint, model_dir)


def _local(checkpoint: str, model_dir: Path) -> str:
    """A checkpoint that is no fine-tuned version (a base model's, say)."""
    from models.demo import ensure_checkpoint

    return ensure_checkpoint(checkpoint, model_dir) if checkpoint.startswith(DEMO) else checkpoint


def on_this_machine(checkpoint: str, model_dir: Path) -> Path | None:
    """Where a base checkpoint's files are (or will be, for a demo not yet
    built) without building or fetching anything: a demo's directory under
    `model_dir`, a local directory; None for a hub id or a fine-tuned version."""
    if checkpoint.startswith(DEMO):
        from models.demo import DEMOS

        return Path(model_dir) / DEMOS[checkpoint][0] if checkpoint in DEMOS else None
    if checkpoint.startswith("/"):
        return Path(checkpoint)
    return None


def adapter_dir(spec, model_dir: Path, storage) -> Path:
    """The local directory of a LoRA fine-tune's adapter files (as the fine-tune
    wrote them: adapter_config.json, adapter_model.safetensors), fetched from
    `storage` once per machine; served on its loaded base (models/text_adapters.py)."""
    if not spec.checkpoint.startswith(FINE_TUNED + "lora:"):
        raise ValueError(f"model {spec.name!r} is no LoRA fine-tune ({spec.checkpoint})")
    root = Path(model_dir) / "ft-adapters"
    root.mkdir(parents=True, exist_ok=True)
    ready = root / _safe(spec.name)
    if ready.exists():
        return ready
    raw = _fetch_raw(spec, root, storage)
    try:
        raw.rename(ready)
    except OSError:  # another process got there first
        shutil.rmtree(raw, ignore_errors=True)
    return ready


def _fetch_raw(spec, root: Path, storage) -> Path:
    """A fine-tuned version's files from storage, into a new folder under `root`."""
    prefix = spec.checkpoint.split(":", 2)[2]
    if storage is None:
        raise ValueError(f"model {spec.name!r} is a fine-tuned version ({spec.checkpoint}); fetching it needs storage")
    keys = storage.list(prefix)
    if not keys:
        raise FileNotFoundError(f"the weights of {spec.name!r} are missing from storage ({prefix})")
    raw = Path(tempfile.mkdtemp(dir=root, prefix=".fetch-"))
    for key in keys:
        (raw / key.rsplit("/", 1)[-1]).write_bytes(storage.get(key))
    return raw


def _fetch_version(spec, model_dir: Path, storage) -> Path:
    """A fine-tuned version's weights from object storage, cached on local disk
    once per machine (and merged into the base for LoRA)."""
    from models.finetune import materialize

    method = spec.checkpoint.split(":", 2)[1]
    root = model_dir / "ft"
    root.mkdir(parents=True, exist_ok=True)
    ready = root / _safe(spec.name)
    if ready.exists():
        return ready
    raw = _fetch_raw(spec, root, storage)
    if method == "full":
        try:
            raw.rename(ready)
        except OSError:  # another process got there first
            shutil.rmtree(raw, ignore_errors=True)
        return ready
    base = _local(spec.base_checkpoint, model_dir)
    try:
        if spec.family == "image-generation":
            from models.image_finetune import materialize as materialize_image

            materialize_image(base, raw, ready)
        else:
            materialize(base, raw, method, ready)
    except OSError:
        if not ready.exists():
            raise
    finally:
        shutil.rmtree(raw, ignore_errors=True)
    return ready


def _safe(name: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in name)
