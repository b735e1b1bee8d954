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
