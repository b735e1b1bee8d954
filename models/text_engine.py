"""Iteration-level batching for the text family: rows join and leave a running batch between decode steps.

The worker's continuous scheduler drives a `TextEngine` one decode step at a
time: `add()` prefills newly claimed jobs and merges them into the running
batch, `step()` decodes one token for every row, and a row that finished (EOS,
stop string, length) or was `drop()`ped leaves at once, so its slot is free at
the next step. `TextModel.run()` (the static path) drives the same engine, so
a job's tokens are the same alone, in a static batch or joining mid-flight:

- every row samples with its own settings and its own random stream
  (`RowSampling`), never with its batch-mates';
- every row sees positions 0..n-1 whatever padding it has, because position
  ids are counted from the row's own attention mask, never from columns;
- padding is masked out of attention, and the keys/values added as padding
  when batches merge are zeros (never NaN, which a mask cannot cancel);
- a row on a LoRA adapter gets its own adapter's update and a row on the base
  none (models/text_adapters.py), so rows of different fine-tunes of one base
  share the batch.

The running batch is left-padded: each row's tokens are the last columns of
the key/value cache, so a row's next token is always at the last column and a
decode step is one forward pass of one token per row.

Imported only where torch is wanted (the worker, `TextModel` methods):
models/text.py itself stays torch-free at import.
"""
from __future__ import annotations

import inspect
import random
from dataclasses import dataclass
from typing import TYPE_CHECKING, Hashable

import torch
import torch.nn.functional as F

if TYPE_CHECKING:
    from models.text import TextModel
    from models.text_adapters import AdapterRef


@dataclass(frozen=True)
class RowSettings:
    """A row's sampling settings."""

    seed: int
    temperature: float
    top_p: float
    top_k: int
    repetition_penalty: float


@dataclass
class Sequence:
    """One job's row, before it joins."""

    key: Hashable  # the job id (the scheduler's handle)
    prompt: list[int]  # fitted prompt token ids
    limit: int  # max new tokens, fitted to the model's positions
    settings: RowSettings
    stop: list[str]  # stop strings
    # The LoRA adapter the row runs on (models/text_adapters.py); None: the base model itself.
    adapter: "AdapterRef | None" = None


class Update:
    """What one row did in one add()/step().

    `text` is the text safe to publish so far: always a prefix of the final
    output text; never ends in a partial multi-byte character; holds back any
    tail that could be the start of a stop string. A running row without stop
    strings hands it over unevaluated (a callable, decoded on first read):
    decoding a row's whole body every step cost about a tenth of a decode
    step at 8 rows on CPU, and the worker reads a row's text only when it
    publishes (at most every PUBLISH_EVERY), so most steps never decode.
    """

    __slots__ = ("key", "tokens", "limit", "_text", "output", "token")

    def __init__(self, key: Hashable, tokens: int, limit: int, text, output: dict | None = None,
                 token: int | None = None):
        self.key = key
        self.tokens = tokens  # tokens generated so far (what the row cost, EOS and stop-string tokens included)
        self.limit = limit
        self.token = token  # the token this step generated (the engine process sends it to the worker)
        self._text = text  # a str, or a callable that returns it
        # Set when the row finished ({"text", "tokens", "finish_reason"}); the row has then left the batch.
        self.output = output

    @property
    def text(self) -> str:
        if callable(self._text):
            self._text = self._text()
        return self._text

    def __repr__(self) -> str:
        return (f"Update(key={self.key!r}, tokens={self.tokens}, limit={self.limit}, text={self.text!r}, "
                f"output={self.output!r})")


class RowSampling:
    """Picks one token per row, each row with its own settings and its own random stream.

    All rows are worked on at once: every operation (elementwise scaling,
    top-k, softmax, sort, cumulative sum, search) goes along each row on its
    own, so a row's numbers are the same in a batch of one or of eight, while a
    step costs a fixed dozen tensor calls instead of a dozen per row (a per-row
    loop cost about as much as the forward pass at batch 8 on CPU, and is a
    string of tiny kernel launches on a GPU). Sampling inverts each row's
    cumulative distribution at one uniform draw from the row's own generator,
    a `random.Random` seeded with the job's seed: the same stream on any device.

    Built once per batch membership (the settings as tensors), used every step.
    """

    def __init__(self, settings: list[RowSettings], device):
        self.device = device
        self.rows = len(settings)
        # Temperature 0 divides by 1 here and is picked greedily below.
        self.divisor = torch.tensor([[s.temperature or 1.0] for s in settings], dtype=torch.float32, device=device)
        self.greedy = torch.tensor([s.temperature == 0 for s in settings], dtype=torch.bool, device=device)
        self.all_greedy = all(s.temperature == 0 for s in settings)
        self.top_k = [s.top_k for s in settings]
        self.top_p = torch.tensor([[s.top_p] for s in settings], dtype=torch.float32, device=device)
        self.nucleus = torch.tensor([[s.top_p < 1.0] for s in settings], dtype=torch.bool, device=device)
        self.any_top_p = any(s.top_p < 1.0 for s in settings)
        self.penalised = any(s.repetition_penalty != 1.0 for s in settings)
        # A row whose penalty is 1 multiplies and divides by exactly 1: its logits are unchanged.
        self.penalty = torch.tensor([[s.repetition_penalty] for s in settings], dtype=torch.float32, device=device)
        self._k = None  # (vocab, kmax, index of each row's k-th value, rows that use top-k), once the vocabulary is known

    def _top_k(self, vocab: int):
        if self._k is None or self._k[0] != vocab:
            ks = [k if 0 < k < vocab else 0 for k in self.top_k]
            self._k = (vocab, max(ks, default=0),
                       torch.tensor([[max(k, 1) - 1] for k in ks], dtype=torch.long, device=self.device),
                       torch.tensor([[k > 0] for k in ks], dtype=torch.bool, device=self.device))
        return self._k[1:]

    def pick(self, logits, generators: list[random.Random], seen=None):
        """One token id per row (a LongTensor of shape [rows]) from `logits` [rows, vocab].

        `generators[r]` is row r's random stream: one draw is taken from it per
        call unless the row is greedy. `seen` [rows, vocab] (bool) marks the
        tokens of each row's own prompt and output, for the repetition penalty;
        it may be None when no row has a penalty.
        """
        if logits.shape[0] != self.rows or len(generators) != self.rows:
            raise ValueError(f"logits has {logits.shape[0]} rows and generators {len(generators)}; "
                             f"the sampling was built for {self.rows}")
        logits = logits.float()
        if self.penalised:
            if seen is None:
                raise ValueError("seen must mark each row's prompt and output when a row has a repetition penalty")
            logits = torch.where(seen, torch.where(logits < 0, logits * self.penalty, logits / self.penalty), logits)
        greedy = logits.argmax(-1)
        if self.all_greedy:
            return greedy
        scaled = logits / self.divisor
        kmax, kth_index, use_k = self._top_k(logits.shape[-1])
        if kmax:
            kth = torch.topk(scaled, kmax, dim=-1).values.gather(1, kth_index)
            scaled = scaled.masked_fill(use_k & (scaled < kth), float("-inf"))
        probs = torch.softmax(scaled, dim=-1)
        if self.any_top_p:
            sorted_p, order = torch.sort(probs, dim=-1, descending=True, stable=True)
            # Drop a token when the tokens before it already reach top_p; the first always stays.
            drop = ((torch.cumsum(sorted_p, dim=-1) - sorted_p) >= self.top_p) & self.nucleus
            probs = torch.zeros_like(probs).scatter_(1, order, sorted_p.masked_fill(drop, 0.0))
        cdf = torch.cumsum(probs, dim=-1)
        # One draw in (0, 1] per row (a greedy row's draw is taken and ignored: its
        # stream is its own, so that changes nothing). The first token whose
        # cumulative probability reaches draw * total has a probability above zero: a
        # token cut by top-k or top-p is never picked, whatever the rounding.
        draws = torch.tensor([[1.0 - g.random()] for g in generators], dtype=torch.float32, device=logits.device)
        sampled = torch.searchsorted(cdf, draws * cdf[:, -1:])[:, 0].clamp_(max=cdf.shape[-1] - 1)
        # Temperature 0 is greedy; so is a temperature so small it overflowed the logits to +-inf.
        return torch.where(self.greedy | torch.isnan(cdf[:, -1]), greedy, sampled)


def pick_tokens(logits, settings: list[RowSettings], generators: list[random.Random], seen=None):
    """One token id per row of `logits` [rows, vocab], each row sampled with its own settings and stream
    (see RowSampling.pick). For one call; an engine keeps its RowSampling between steps."""
    return RowSampling(settings, logits.device).pick(logits, generators, seen)


def seen_mask(histories: list[list[int]], vocab: int, device="cpu"):
    """A [rows, vocab] bool tensor marking the tokens in each row's own history (prompt + output)."""
    seen = torch.zeros((len(histories), vocab), dtype=torch.bool, device=device)
    for r, ids in enumerate(histories):
        if ids:
            seen[r, torch.tensor(ids, dtype=torch.long, device=device)] = True
    return seen


def backend_decode(tokenizer):
    """`tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)`,
    as a function of a list of ids.

    A fast tokenizer whose class keeps transformers' own `_decode` is asked
    through its Rust backend directly: that is all `_decode` does without the
    clean-up, and the wrapper's way there (`to_py_obj` looks at every id in
    Python) cost as much as the decoding itself. Live output decodes each
    running row a few times a second on the worker's interpreter, beside the
    decode step. Any other tokenizer goes through `decode`."""
    try:
        from transformers.tokenization_utils_tokenizers import TokenizersBackend
    except ImportError:  # pragma: no cover - transformers before 5
        TokenizersBackend = None
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if TokenizersBackend is not None and backend is not None and isinstance(tokenizer, TokenizersBackend) \
            and type(tokenizer)._decode is TokenizersBackend._decode \
            and type(tokenizer).decode is TokenizersBackend.decode:
        return lambda tokens: backend.decode(tokens, skip_special_tokens=True)
    return lambda tokens: tokenizer.decode(tokens, skip_special_tokens=True, clean_up_tokenization_spaces=False)


class RowText:
    """A row's text as it grows: what is safe to publish, and whether a stop string ended it."""

    def __init__(self, tokenizer, stop: list[str]):
        self.tokenizer = tokenizer
        self.stop = list(stop)
        self.published = ""
        self._decode = backend_decode(tokenizer)

    def decode(self, tokens: list[int]) -> str:
        return self._decode(tokens)

    def first_stop(self, text: str) -> int | None:
        """Where the earliest stop string starts in `text`, if any."""
        hits = [h for h in (text.find(s) for s in self.stop) if h >= 0]
        return min(hits) if hits else None

    def held_back(self, text: str) -> int:
        """How many characters at the end of `text` could be the start of a stop string."""
        longest = 0
        for s in self.stop:
            for n in range(min(len(s) - 1, len(text)), longest, -1):
                if text.endswith(s[:n]):
                    longest = n
                    break
        return longest

    def advance(self, text: str) -> str:
        """Publishable text of a running row whose body decodes to `text` (no stop string in it).

        A cut multi-byte character decodes to U+FFFD at the end and may become a
        different character with the next token, so trailing U+FFFDs wait; so
        does a tail that could be the start of a stop string (the stop string
        would cut it off). What was published stays published: a tokenizer
        whose decoding of a longer body rewrites earlier text holds its text
        until it agrees again.
        """
        safe = text.rstrip("\ufffd")
        safe = safe[: len(safe) - self.held_back(safe)]
        if len(safe) > len(self.published) and safe.startswith(self.published):
            self.published = safe
        return self.published


class _Row:
    """A running row: its job, its random stream, what it generated."""

    __slots__ = ("seq", "generator", "tokens", "text")

    def __init__(self, seq: Sequence, tokenizer):
        self.seq = seq
        self.generator = random.Random(seq.settings.seed)
        self.tokens: list[int] = []
        self.text = RowText(tokenizer, seq.stop)


def check_joining(seqs: list[Sequence], running) -> None:
    """Raise ValueError naming the first of `seqs` that cannot join rows keyed `running`."""
    known = set(running)
    for seq in seqs:
        if seq.key in known:
            raise ValueError(f"key {seq.key!r} is already in the batch")
        if not seq.prompt:
            raise ValueError(f"sequence {seq.key!r} has an empty prompt; it needs at least one token")
        if seq.limit < 1:
            raise ValueError(f"sequence {seq.key!r} has limit {seq.limit}; it must be at least 1")
        known.add(seq.key)


def fits(running: list[Sequence], seq: Sequence, max_rows: int, max_batch_tokens: int | None) -> bool:
    """Whether `seq` may join the rows of `running`: at most `max_rows` rows, and rows x the
    longest row's prompt + limit within `max_batch_tokens` (None: no bound)."""
    if not running:
        return True  # an empty engine always admits one, or a too-long job would never run
    if len(running) >= max_rows:
        return False
    if max_batch_tokens is None:
        return True
    longest = max([len(r.prompt) + r.limit for r in running] + [len(seq.prompt) + seq.limit])
    return (len(running) + 1) * longest <= max_batch_tokens


def _forward_names(model) -> tuple[str, str | None]:
    """The names model.forward gives the key/value cache and the keep-only-the-last-logits argument."""
    params = inspect.signature(model.forward).parameters
    # transformers 5.x renamed past_key_values to cache (the old name is deprecated).
    cache = next((n for n in ("cache", "past_key_values") if n in params), None)
    if cache is None:
        raise ValueError(f"{type(model).__name__}.forward takes no key/value cache (no 'cache' or "
                         f"'past_key_values' argument); the text engine cannot decode with it")
    keep = next((n for n in ("logits_to_keep", "num_logits_to_keep") if n in params), None)
    return cache, keep


class TextEngine:
    """A running batch of text rows that join (add), decode one token a step (step), and leave.

    `max_rows` bounds the rows decoding together; `max_batch_tokens` (None: no
    bound) bounds the key/value cache a batch may grow to, counted as rows x the
    longest row's prompt + limit (the left-padded cache is as wide as its
    longest row). fits() says whether one more row is within both; add() takes
    what it is given, so a caller adding several rows checks them one by one.
    """

    # The worker may call step() on a thread of its own while it does the step
    # boundary's database work (worker/continuous.py); add() and drop() are
    # never called while a step runs.
    steps_off_thread = True

    def __init__(self, model: "TextModel", max_rows: int, max_batch_tokens: int | None = None):
        if not isinstance(max_rows, int) or max_rows < 1:
            raise ValueError(f"max_rows must be a positive integer, got {max_rows!r}")
        if max_batch_tokens is not None and (not isinstance(max_batch_tokens, int) or max_batch_tokens < 1):
            raise ValueError(f"max_batch_tokens must be a positive integer or None, got {max_batch_tokens!r}")
        self.model = model
        self.lm = model.model
        self.lm.eval()
        self.tokenizer = model.tokenizer
        self.device = model.device
        self.eos_ids = model.eos_ids
        self.pad_id = model.pad_id
        self.max_rows = max_rows
        self.max_batch_tokens = max_batch_tokens
        self._cache_arg, self._keep_arg = _forward_names(self.lm)
        self.rows: list[_Row] = []  # in batch order
        self.cache = None  # DynamicCache over the running rows, [rows, heads, columns, dim] per layer
        self.mask = None  # LongTensor [rows, columns]: 1 where the column holds the row's token
        self.last = None  # LongTensor [rows]: each row's newest token, not yet in the cache
        self.seen = None  # BoolTensor [rows, vocab]: tokens of each row's prompt and output
        self.sampling: RowSampling | None = None
        # The LoRA adapters on this base, if any, and which rows take which (rebuilt with the rows).
        self.adapters = getattr(model, "adapters", None)
        self.route = None
        if self.adapters is not None:
            self.adapters.engines.add(self)

    def __len__(self) -> int:
        return len(self.rows)

    def keys(self) -> list:
        return [row.seq.key for row in self.rows]

    def width(self) -> int:
        """Columns of the key/value cache (0 when empty)."""
        return 0 if self.mask is None else self.mask.shape[1]

    def ending_within(self, steps: int) -> int:
        """How many running rows leave within `steps` more steps at the latest
        (at their token limit; an end token or a stop string may end them sooner)."""
        return sum(1 for row in self.rows if row.seq.limit - len(row.tokens) <= steps)

    def fits(self, seq: Sequence) -> bool:
        return fits([row.seq for row in self.rows], seq, self.max_rows, self.max_batch_tokens)

    # -- joining ---------------------------------------------------------------

    def add(self, seqs: list[Sequence]) -> list[Update]:
        """Prefill `seqs` in one forward pass, sample their first tokens, merge them into the running batch."""
        if not seqs:
            return []
        check_joining(seqs, self.keys())
        for seq in seqs:
            if seq.adapter is not None and self.adapters is None:
                raise ValueError(f"sequence {seq.key!r} runs on adapter {seq.adapter.key!r}, "
                                 f"but this model serves no adapters")
        refs = [seq.adapter for seq in seqs]
        if any(refs):
            self.adapters.ensure([r for r in refs if r is not None])
        rows = [_Row(seq, self.tokenizer) for seq in seqs]
        width = max(len(seq.prompt) for seq in seqs)
        ids = torch.full((len(seqs), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(seqs), width), dtype=torch.long)
        for r, seq in enumerate(seqs):
            ids[r, width - len(seq.prompt):] = torch.tensor(seq.prompt, dtype=torch.long)
            mask[r, width - len(seq.prompt):] = 1
        ids, mask = ids.to(self.device), mask.to(self.device)
        # Each row's own positions 0..n-1; its left padding gets a harmless 1 (as generate() does).
        positions = (mask.cumsum(-1) - 1).masked_fill_(mask == 0, 1)
        with torch.inference_mode():
            cache = _growing_cache()
            route = self.adapters.route(refs, self.device) if any(refs) else None
            logits = self._forward(ids, mask, positions, cache, route)
            sampling = RowSampling([seq.settings for seq in seqs], self.device)
            seen = seen_mask([seq.prompt for seq in seqs], logits.shape[-1], self.device) if sampling.penalised else \
                torch.zeros((len(seqs), logits.shape[-1]), dtype=torch.bool, device=self.device)
            picks = sampling.pick(logits, [row.generator for row in rows], seen)
            seen.scatter_(1, picks[:, None], True)
            self._merge(rows, cache, mask, picks, seen)
            return self._advance(rows, picks.tolist())

    def _merge(self, rows: list[_Row], cache, mask, last, seen) -> None:
        """Append prefilled rows to the running batch, left-padding whichever cache is narrower."""
        if not self.rows:
            self.rows, self.cache, self.mask, self.last, self.seen = list(rows), cache, mask, last, seen
            self.sampling = self.route = None
            return
        ours, theirs = self.mask.shape[1], mask.shape[1]
        width = max(ours, theirs)
        for mine, new in zip(self.cache.layers, cache.layers, strict=True):
            mine.append_rows(new.keys, new.values, self.max_rows)
        self.mask = torch.cat([F.pad(self.mask, (width - ours, 0)), F.pad(mask, (width - theirs, 0))])
        self.last = torch.cat([self.last, last])
        self.seen = torch.cat([self.seen, seen])
        self.rows.extend(rows)
        self.sampling = self.route = None

    # -- decoding --------------------------------------------------------------

    def step(self) -> list[Update]:
        """One decode step for every running row; rows that finish leave."""
        if not self.rows:
            return []
        with torch.inference_mode():
            if self.sampling is None:
                self.sampling = RowSampling([row.seq.settings for row in self.rows], self.device)
                refs = [row.seq.adapter for row in self.rows]
                self.route = self.adapters.route(refs, self.device) if any(refs) else None
            # The new token's position is the count of the row's tokens already cached.
            positions = self.mask.sum(-1, keepdim=True)
            mask = F.pad(self.mask, (0, 1), value=1)
            width = self.mask.shape[1]
            try:
                logits = self._forward(self.last[:, None], mask, positions, self.cache, self.route)
            except BaseException:
                # A failed step (out of memory, say) leaves the batch as it was, so the
                # caller can drop rows and step again: undo the layers that already grew.
                for layer in self.cache.layers:
                    if layer.keys is not None and layer.keys.shape[-2] > width:
                        layer.keys, layer.values = layer.keys[:, :, :width], layer.values[:, :, :width]
                raise
            self.mask = mask
            picks = self.sampling.pick(logits, [row.generator for row in self.rows], self.seen)
            self.seen.scatter_(1, picks[:, None], True)
            self.last = picks
            return self._advance(list(self.rows), picks.tolist())

    def _forward(self, ids, mask, positions, cache, route=None):
        """Logits of each row's last column, [rows, vocab]; `cache` grows by ids' columns.
        `route`: which rows take which LoRA adapter's update (None: none does)."""
        kwargs = {self._cache_arg: cache}
        if self._keep_arg:
            kwargs[self._keep_arg] = 1  # the last column's logits only, not the whole prompt's
        if route is None:
            out = self.lm(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True, **kwargs)
        else:
            with self.adapters.routing(route):
                out = self.lm(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True, **kwargs)
        return out.logits[:, -1, :]

    def _advance(self, rows: list[_Row], picks: list[int]) -> list[Update]:
        """Give each of `rows` its new token; the rows that finished leave the batch."""
        updates, finished = [], []
        for row, token in zip(rows, picks, strict=True):
            row.tokens.append(token)
            update = self._update(row, token)
            updates.append(update)
            if update.output is not None:
                finished.append(row.seq.key)
        if finished:
            self._remove(set(finished))
        return updates

    def _update(self, row: _Row, token: int) -> Update:
        seq, n = row.seq, len(row.tokens)
        if token in self.eos_ids:
            # The end token is counted (it was generated) but is not text.
            return self._finish(row, row.text.decode(row.tokens[:-1]), "stop")
        if n >= seq.limit or seq.stop:
            text = row.text.decode(row.tokens)
            cut = row.text.first_stop(text) if seq.stop else None
            if cut is not None:
                return self._finish(row, text[:cut], "stop")
            if n >= seq.limit:
                return self._finish(row, text, "length")
            return Update(seq.key, n, seq.limit, row.text.advance(text), None, token)
        # No stop string to look for: the text is decoded only if someone reads it,
        # from the first n tokens (the row goes on growing meanwhile, maybe on another thread).
        return Update(seq.key, n, seq.limit, lambda: row.text.advance(row.text.decode(row.tokens[:n])), None, token)

    def _finish(self, row: _Row, text: str, reason: str) -> Update:
        # `tokens` counts what the model generated for the job (what it cost),
        # including the EOS or the stop string's tokens that are not in `text`.
        # `prompt_tokens`: what the prompt cost (after any cut to fit the model).
        output = {"text": text, "tokens": len(row.tokens), "prompt_tokens": len(row.seq.prompt),
                  "finish_reason": reason}
        return Update(row.seq.key, len(row.tokens), row.seq.limit, text, output, row.tokens[-1])

    # -- leaving ---------------------------------------------------------------

    def drop(self, key) -> None:
        """Remove the row of `key` (a cancelled job); no-op if it is not here."""
        if any(row.seq.key == key for row in self.rows):
            with torch.inference_mode():
                self._remove({key})

    def _remove(self, keys: set) -> None:
        keep = [r for r, row in enumerate(self.rows) if row.seq.key not in keys]
        if not keep:
            self.rows, self.cache, self.mask, self.last, self.seen, self.sampling = [], None, None, None, None, None
            self.route = None
            return
        index = torch.tensor(keep, dtype=torch.long, device=self.device)
        mask = self.mask.index_select(0, index)
        # Columns that are padding in every remaining row hold nothing anyone attends to: trim them.
        used = mask.any(0).nonzero()
        first = int(used[0, 0]) if used.numel() else mask.shape[1]
        for layer in self.cache.layers:
            layer.keep_rows(keep, index, first)
        self.mask = mask[:, first:]
        self.last = self.last.index_select(0, index)
        self.seen = self.seen.index_select(0, index)
        self.rows = [self.rows[r] for r in keep]
        self.sampling = self.route = None


def _growing_cache():
    """A DynamicCache whose layers grow into spare room (see _growing_layer_class)."""
    from transformers import DynamicCache

    cache = DynamicCache()
    cache.layer_class_to_replicate = _growing_layer_class()
    return cache


_GROWING = None


def _growing_layer_class():
    """transformers' DynamicLayer over a buffer with spare rows and columns: a
    step writes its column in place, a row that joins is copied into a spare
    row, a row that leaves is closed over by the rows after it.

    DynamicLayer.update does torch.cat([cache, new]) every step: a copy of the
    whole cache per layer per step, which for a running batch that never ends
    (continuous batching keeps a long row's cache alive while short rows come
    and go) cost about as much as the forward pass at 8 rows on CPU. And a join
    or a leave that rebuilt the cache (torch.cat of the batch and the new rows,
    index_select of the rows that stay) copied all of it once, and the next
    step copied it again into a buffer with room. Here `keys`/`values` are a
    window buf[:rows, :, first:end] of a buffer [row room, heads, column room,
    dim]: a step writes column `end`; a join writes the new rows' columns (and
    the zeros of their left padding) into spare rows; a leave moves only the
    rows after the first one that left, and trimming columns every remaining
    row pads is moving `first`. The buffer is copied into a bigger one only
    when it is full (a quarter more columns, at least ROOM). Anything that
    replaces keys/values with tensors of its own (not a window of the buffer)
    is taken into a fresh buffer at the next update, one copy.
    """
    global _GROWING
    if _GROWING is None:
        from transformers.cache_utils import DynamicLayer

        class GrowingLayer(DynamicLayer):
            ROOM = 32

            def lazy_initialization(self, key_states, value_states) -> None:
                super().lazy_initialization(key_states, value_states)
                self._buffers = None

            def _window(self):
                """(rows, first, end) of the buffer keys and values are a view of, or None."""
                bufs = getattr(self, "_buffers", None)
                if bufs is None:
                    return None
                w = _window_of(self.keys, bufs[0])
                return w if w is not None and w == _window_of(self.values, bufs[1]) else None

            def _rebuffer(self, rows: int, columns: int) -> tuple[int, int, int]:
                """A fresh buffer with room for `rows` rows and `columns` more columns, holding
                the cache at its start; returns the new window."""
                have_rows, have = (self.keys.shape[0], self.keys.shape[-2]) if self.keys.dim() == 4 else (0, 0)
                need = have + columns
                room = need + max(self.ROOM, need // 4)
                # Room for the rows the batch may grow to, once a join said how many (append_rows).
                rows = max(rows, have_rows, getattr(self, "_row_room", 0))
                bufs = (self.keys.new_zeros((rows, self._heads, room, self._key_dim)),
                        self.values.new_zeros((rows, self._heads, room, self._value_dim)))
                if have:
                    bufs[0][:have_rows, :, :have].copy_(self.keys)
                    bufs[1][:have_rows, :, :have].copy_(self.values)
                self._buffers = bufs
                self.keys, self.values = bufs[0][:have_rows, :, :have], bufs[1][:have_rows, :, :have]
                return have_rows, 0, have

            def update(self, key_states, value_states, *args, **kwargs):
                if not self.is_initialized:
                    self.lazy_initialization(key_states, value_states)
                self._heads, self._key_dim, self._value_dim = \
                    key_states.shape[1], key_states.shape[-1], value_states.shape[-1]
                rows, columns = key_states.shape[0], key_states.shape[-2]
                w = self._window()
                if w is None or w[0] != rows or w[2] + columns > self._buffers[0].shape[-2]:
                    w = self._rebuffer(rows, columns)
                _, first, end = w
                kb, vb = self._buffers
                kb[:rows, :, end:end + columns].copy_(key_states)
                vb[:rows, :, end:end + columns].copy_(value_states)
                self.keys, self.values = kb[:rows, :, first:end + columns], vb[:rows, :, first:end + columns]
                return self.keys, self.values

            def append_rows(self, keys, values, row_room: int) -> None:
                """Add rows whose cache is `keys`/`values` [k, heads, columns, dim] below the
                running ones, both left-padded with zero columns to the wider of the two.
                Zeros, not garbage: a masked column's attention weight is exactly 0, but 0 x NaN is NaN."""
                k, theirs = keys.shape[0], keys.shape[-2]
                self._row_room = row_room
                w = self._window()
                if w is not None:
                    rows, first, end = w
                    width = max(end - first, theirs)
                    start = end - width
                    if rows + k <= self._buffers[0].shape[0] and start >= 0:
                        for buf, new in zip(self._buffers, (keys, values)):
                            buf[:rows, :, start:first].zero_()
                            buf[rows:rows + k, :, start:end - theirs].zero_()
                            buf[rows:rows + k, :, end - theirs:end].copy_(new)
                        self.keys = self._buffers[0][:rows + k, :, start:end]
                        self.values = self._buffers[1][:rows + k, :, start:end]
                        return
                rows, ours = self.keys.shape[0], self.keys.shape[-2]
                width = max(ours, theirs)
                room = width + max(self.ROOM, width // 4)
                bufs = (keys.new_zeros((max(row_room, rows + k), keys.shape[1], room, keys.shape[-1])),
                        values.new_zeros((max(row_room, rows + k), values.shape[1], room, values.shape[-1])))
                for buf, mine, new in zip(bufs, (self.keys, self.values), (keys, values)):
                    buf[:rows, :, width - ours:width].copy_(mine)
                    buf[rows:rows + k, :, width - theirs:width].copy_(new)
                self._buffers = bufs
                self.keys, self.values = bufs[0][:rows + k, :, :width], bufs[1][:rows + k, :, :width]

            def keep_rows(self, keep: list[int], index, trim: int) -> None:
                """Keep rows `keep` (ascending; `index` the same as a tensor) and drop the first
                `trim` columns, padding in every row kept."""
                w = self._window()
                if w is None:
                    self.keys = self.keys.index_select(0, index)[:, :, trim:]
                    self.values = self.values.index_select(0, index)[:, :, trim:]
                    return
                _, first, end = w
                moved = next((i for i, r in enumerate(keep) if r != i), None)
                if moved is not None:
                    # Rows keep their order, so each moves up into room already given up.
                    tail = index[moved:]
                    for buf in self._buffers:
                        buf[moved:len(keep), :, first:end].copy_(buf[:, :, first:end].index_select(0, tail))
                self.keys = self._buffers[0][:len(keep), :, first + trim:end]
                self.values = self._buffers[1][:len(keep), :, first + trim:end]

        _GROWING = GrowingLayer
    return _GROWING


def _window_of(view, buf):
    """(rows, first, end) if `view` is buf[:rows, :, first:end], else None."""
    if view.dim() != 4 or view.numel() == 0 or view.stride() != buf.stride() or view.shape[1] != buf.shape[1] \
            or view.shape[3] != buf.shape[3] or view.shape[0] > buf.shape[0]:
        return None
    offset, column = view.data_ptr() - buf.data_ptr(), buf.stride(2) * buf.element_size()
    if offset < 0 or offset % column:
        return None
    first = offset // column
    if first + view.shape[2] > buf.shape[2]:
        return None
    return view.shape[0], first, first + view.shape[2]
