"""LoRA adapters served on their loaded base: one base in memory, many fine-tunes on it.

A tenant's LoRA fine-tune is a few hundred kilobytes of adapter weights; merged
into its base it is a full copy of the model, and a hundred tenants' fine-tunes
of one base would be a hundred models thrashing the worker's cache. Here the
base is loaded once (models/text.py) and each fine-tune is an adapter on it,
loaded on first use and evicted by an LRU of its own (`Adapters`), and rows of
different adapters, and of the base itself, decode in one batch.

peft loads, validates and deletes the adapters (its key mapping, configs,
Conv1D and Linear layers, `PeftModel.load_adapter` / `delete_adapter`); its own
mixed-adapter forward (`adapter_names=` per row) is correct but loops over the
adapters in every LoRA layer in Python, and on the demo base it cost 7x a plain
step at 16 rows of 16 adapters: more than batching wins. So peft's LoRA layers
are switched off (`enable_adapters(False)`: each computes its base layer only)
and a forward hook on each adds the per-row update in one batched product per
layer, the rows of each rank together:

    out[rows] += (x[rows] @ A[row]^T @ B[row]^T) * scaling[row]

A row's update is its own slice of a batched matmul (`torch.bmm`), and a row
with no adapter (a job for the base) gets none: its numbers are the base
layer's alone, exactly what the plain base computes. So a row's tokens are the
same alone, beside rows of other adapters, or joining a running batch
(tests/models/test_text_adapters.py).

Plain LoRA only: DoRA, LoRA biases, extra trained modules and embedding LoRA
are refused at load (genq's fine-tunes make none of them).
"""
from __future__ import annotations

import logging
import warnings
import weakref
from collections import OrderedDict
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

from models.libraries import quiet

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class AdapterRef:
    """A row's adapter: `key` names it to the worker (a fine-tuned version's name
    and checkpoint); `path` is the local directory of its adapter files."""

    key: str
    path: str


class AdapterRefused(ValueError):
    """An adapter this module cannot serve on a base (not plain LoRA, or not for this base)."""


class Adapters:
    """The adapters loaded on one base model, least recently used evicted first
    once there are more than `max_loaded`.

    An adapter a running row uses is never evicted (the engines that use this
    base register here; their rows say which adapters are in use), so while
    every loaded adapter is in use the set may hold more than `max_loaded`:
    at most the rows of the running batch more.
    """

    def __init__(self, model, max_loaded: int):
        if not isinstance(max_loaded, int) or max_loaded < 1:
            raise ValueError(f"max_loaded must be a positive integer, got {max_loaded!r}")
        self.model = model  # the transformers model; peft wraps its layers in place
        self.max_loaded = max_loaded
        self.peft = None  # the PeftModel, once the first adapter is loaded
        self._loaded: OrderedDict[str, tuple[str, int]] = OrderedDict()  # key -> (peft name, bytes), LRU order
        self._hooked: set[int] = set()
        self._serial = 0
        self._route: Route | None = None
        self.engines: weakref.WeakSet = weakref.WeakSet()  # engines whose rows may use these adapters
        self.loads = 0
        self.evictions = 0

    # -- what is loaded ----------------------------------------------------------

    def __len__(self) -> int:
        return len(self._loaded)

    def keys(self) -> list[str]:
        return list(self._loaded)

    @property
    def nbytes(self) -> int:
        return sum(size for _, size in self._loaded.values())

    def in_use(self) -> set[str]:
        return {row.seq.adapter.key for engine in list(self.engines) for row in engine.rows
                if row.seq.adapter is not None}

    def name(self, key: str) -> str:
        return self._loaded[key][0]

    def ensure(self, refs: list[AdapterRef]) -> None:
        """Load the adapters of `refs` that are not loaded, evicting the least
        recently used ones no running row uses; all of `refs` count as used now."""
        wanted = list(dict.fromkeys(r.key for r in refs))
        for ref in {r.key: r for r in refs}.values():
            if ref.key not in self._loaded:
                self._load(ref)
        for key in wanted:
            self._loaded.move_to_end(key)
        self._evict(keep=set(wanted))

    def _evict(self, keep: set[str]) -> None:
        if len(self._loaded) <= self.max_loaded:
            return
        busy = self.in_use() | keep
        for key in [k for k in self._loaded if k not in busy]:
            if len(self._loaded) <= self.max_loaded:
                break
            self.unload(key)
        if len(self._loaded) > self.max_loaded:
            log.info("%d adapters loaded (bound %d): the rest are in use", len(self._loaded), self.max_loaded)

    def unload(self, key: str) -> None:
        name, _ = self._loaded.pop(key)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "adapter N was active which is now deleted": none is active here
            self.peft.delete_adapter(name)
        self.evictions += 1
        log.info("evicted adapter %s", key)

    def _load(self, ref: AdapterRef) -> None:
        from peft import PeftConfig, PeftModel
        from peft.tuners.lora import LoraLayer

        quiet()
        config = PeftConfig.from_pretrained(ref.path)
        _check_config(ref, config)
        self._serial += 1
        name = f"adapter{self._serial}"  # peft's names key module dicts: no dots, nothing of the tenant's
        try:
            with warnings.catch_warnings():
                # peft notes that a GPT-2 Conv1D layer takes its weights transposed, and transformers'
                # deprecations: nothing the server can act on.
                warnings.simplefilter("ignore")
                if self.peft is None:
                    self.peft = PeftModel.from_pretrained(self.model, ref.path, adapter_name=name, is_trainable=False)
                else:
                    self.peft.load_adapter(ref.path, adapter_name=name, is_trainable=False)
        except Exception as exc:
            raise AdapterRefused(f"adapter {ref.key!r} does not load on this base: {exc}") from exc
        size = 0
        for module in self.model.modules():
            if not isinstance(module, LoraLayer):
                continue
            if name in module.lora_embedding_A or name in getattr(module, "lora_variant", {}) \
                    or (name in module.lora_A and not isinstance(module.lora_A[name], torch.nn.Linear)):
                self.peft.delete_adapter(name)
                raise AdapterRefused(f"adapter {ref.key!r} has a LoRA layer this server does not batch "
                                     f"({type(module).__name__}); only plain LoRA on linear layers is served")
            # peft's own forward computes the base layer only; the hook adds each row's update.
            module.enable_adapters(False)
            if id(module) not in self._hooked:
                module.register_forward_hook(self._hook)
                self._hooked.add(id(module))
            if name in module.lora_A:
                size += sum(t.numel() * t.element_size()
                            for t in (module.lora_A[name].weight, module.lora_B[name].weight))
        self.model.eval()
        self._loaded[ref.key] = (name, size)
        self.loads += 1
        log.info("loaded adapter %s (%.1f kB)", ref.key, size / 1e3)

    # -- routing rows to adapters ----------------------------------------------------

    def route(self, refs: list[AdapterRef | None], device) -> "Route | None":
        """Which rows of a batch take which adapter's update, per LoRA layer
        (None when no row has an adapter). The adapters must be loaded."""
        if all(r is None for r in refs):
            return None
        from peft.tuners.lora import LoraLayer

        names = [None if r is None else self.name(r.key) for r in refs]
        layers = {}
        for module in self.model.modules():
            if not isinstance(module, LoraLayer):
                continue
            groups: dict[int, list[int]] = {}
            for row, name in enumerate(names):
                if name is not None and name in module.lora_A:
                    groups.setdefault(module.lora_A[name].weight.shape[0], []).append(row)
            if groups:
                layers[module] = [_Group(rows, [names[r] for r in rows], module, device, len(names))
                                  for rows in groups.values()]
        return Route(layers)

    @contextmanager
    def routing(self, route: "Route | None"):
        """Forward passes in this block apply `route`'s per-row updates."""
        self._route = route
        try:
            yield
        finally:
            self._route = None

    def _hook(self, module, args, out):
        route = self._route
        if route is None:
            return None
        groups = route.layers.get(module)
        if not groups:
            return None
        x = args[0]
        for g in groups:
            # Each row's adapter weights, gathered for this layer's product only.
            A = torch.stack(g.As).transpose(1, 2)  # [rows, in, r]
            B = torch.stack(g.Bs).transpose(1, 2)  # [rows, r, out]
            sub = x if g.rows is None else x.index_select(0, g.index)
            if sub.dtype != A.dtype:
                sub = sub.to(A.dtype)
            delta = torch.bmm(torch.bmm(sub, A), B).mul_(g.scale)
            if delta.dtype != out.dtype:
                delta = delta.to(out.dtype)
            if g.rows is None:
                out.add_(delta)
            else:
                out.index_add_(0, g.index, delta)
        return out


class _Group:
    """The rows of one LoRA layer whose adapters have the same rank there, and
    their adapters' weights, row by row. They are stacked for each product and
    dropped after it: a copy kept for the batch's life would hold one adapter
    per row (at 64 rows of the demo base, more than the base and 16 adapters)."""

    def __init__(self, rows: list[int], names: list[str], module, device, batch: int):
        self.names = names
        # Every row of the batch, in order: the update is added without an index.
        self.rows = None if rows == list(range(batch)) else rows
        self.index = torch.tensor(rows, dtype=torch.long, device=device)
        self.As = [module.lora_A[n].weight for n in names]
        self.Bs = [module.lora_B[n].weight for n in names]
        self.scale = torch.tensor([module.scaling[n] for n in names], dtype=torch.float32,
                                  device=device).view(-1, 1, 1)


@dataclass
class Route:
    layers: dict  # LoRA layer module -> [_Group]


def _check_config(ref: AdapterRef, config) -> None:
    from peft import PeftType

    problems = []
    if config.peft_type != PeftType.LORA:
        problems.append(f"it is {config.peft_type}, not LoRA")
    else:
        if getattr(config, "use_dora", False):
            problems.append("DoRA")
        if getattr(config, "lora_bias", False):
            problems.append("LoRA biases")
        if getattr(config, "modules_to_save", None):
            problems.append(f"trained modules {config.modules_to_save}")
        if getattr(config, "layer_replication", None):
            problems.append("layer replication")
    if problems:
        raise AdapterRefused(f"adapter {ref.key!r} cannot be served on its base: {', '.join(problems)}")


def adapter_files(path: str | Path) -> bool:
    """Whether `path` holds a peft adapter (its config and weights)."""
    path = Path(path)
    return (path / "adapter_config.json").is_file() and any(path.glob("adapter_model.*"))
