"""How the model libraries (transformers, diffusers, the Hugging Face hub)
talk while genq runs them: no progress bars, and their log lines through
the process's own handler (one format, GENQ_LOG_FORMAT=json included)
instead of theirs. Each function of models/ that imports them calls quiet()
first thing after: a process that runs no such model (the webhook sender,
the fault tests' family) never imports them."""
from __future__ import annotations

import importlib

_done = False


def quiet() -> None:
    """Once per process (a fork inherits it); later calls do nothing. A
    library that is not installed has nothing to say."""
    global _done
    if _done:
        return
    # tqdm bars ("Loading weights", "Writing model shards", "Loading pipeline
    # components") redraw with carriage returns: noise in any log file.
    try:
        import huggingface_hub.utils as hub_utils
    except ImportError:
        pass
    else:
        hub_utils.disable_progress_bars()
    for name in ("transformers.utils.logging", "diffusers.utils.logging"):
        try:
            library = importlib.import_module(name)
        except ImportError:
            continue
        library.disable_progress_bar()
        library.disable_default_handler()
        library.enable_propagation()
    _done = True


def transformers_problems(checkpoint: str, mapping_name: str, not_kind: str, companions: tuple[str, ...],
                          no_companion: str) -> list[str]:
    """What is wrong with a transformers model's directory, from its files only
    (no weights loaded): a config transformers reads whose class is in
    `transformers.<mapping_name>` (else "<config> <not_kind>"), one of the
    `companions` files (tokenizer or processor; else `no_companion`), and
    weights. [] when nothing is."""
    from pathlib import Path

    import transformers

    quiet()
    root = Path(checkpoint)
    try:
        config = transformers.AutoConfig.from_pretrained(root, local_files_only=True)
    except Exception as exc:  # transformers raises OSError, ValueError or KeyError here
        return [f"{root}: no config transformers can read ({exc})"]
    problems = []
    if type(config) not in getattr(transformers, mapping_name):
        problems.append(f"{root}: {type(config).__name__} {not_kind}")
    if not any((root / f).is_file() for f in companions):
        problems.append(f"{root}: {no_companion}")
    if not any(f.name.endswith((".safetensors", ".bin")) for f in root.iterdir()):
        problems.append(f"{root}: no weights (*.safetensors or *.bin)")
    return problems
