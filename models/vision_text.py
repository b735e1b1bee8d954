"""The image-text-to-text family: an image and a prompt to text through a
transformers vision-language model (AutoModelForImageTextToText: LLaVA, Qwen2-VL,
Idefics, ...), batched, each row sampled with the text family's per-row
sampler (its own temperature, top-k, top-p, repetition penalty and random
stream), so a job's tokens do not depend on its batch-mates' settings or seeds."""
from __future__ import annotations

import random
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr

from models import image_input
from models.base import InputInvalid, IsCancelled, OnProgress, Result, check_bound, check_chars, module_bytes, parse
from models.libraries import quiet, transformers_problems

FAMILY = "image-text-to-text"
FILE_FIELDS = ("image",)
PROGRESS_UNIT = "token"
SEED_MAX = 2**32 - 1
SCHEMA_LIMITS = [
    ("max_new_tokens", "max_new_tokens", "maximum"),
    ("max_prompt_chars", "prompt", "maxLength"),
]
LIMITS = {"max_new_tokens", "max_prompt_chars", "max_input_bytes", "max_input_pixels"}


class Input(BaseModel):
    """An image-text-to-text job's `input`."""

    model_config = ConfigDict(extra="forbid")

    prompt: str = Field(min_length=1, description="The question or instruction about the image.")
    image: str = Field(description="The image: a file id (POST /v1/files with purpose=image) or a "
                                   "data:image/png|jpeg|webp;base64,... URI. Never a URL.")
    max_new_tokens: int = Field(32, ge=1, description="Most tokens to generate.")
    temperature: float = Field(1.0, ge=0, le=100, description="Sampling temperature; 0 is greedy.")
    top_p: float = Field(1.0, gt=0, le=1, description="Nucleus sampling threshold.")
    top_k: int = Field(0, ge=0, le=100_000, description="Sample from the k most likely tokens only; 0 turns this off.")
    repetition_penalty: float = Field(1.0, gt=0, le=100, description="Penalty (>1) for tokens already seen; 1 is off.")
    seed: int | None = Field(None, ge=0, le=SEED_MAX, description="Random seed; the same input and seed give the same text.")
    _image_bytes: bytes | None = PrivateAttr(None)


def validate(raw: Any, limits: dict) -> Input:
    """The job input as an `Input`; raises InputInvalid naming "input.<field>"."""
    inp = parse(Input, raw)
    errors: list[dict[str, str]] = []
    check_bound(errors, "input.max_new_tokens", inp.max_new_tokens, limits.get("max_new_tokens"))
    check_chars(errors, "input.prompt", inp.prompt, limits.get("max_prompt_chars"))
    try:
        image_input.check_reference(inp.image, limits.get("max_input_bytes", image_input.MAX_BYTES),
                                    limits.get("max_input_pixels", image_input.MAX_PIXELS))
    except image_input.ImageRefused as exc:
        errors.append({"field": "input.image", "message": str(exc)})
    if errors:
        raise InputInvalid(errors)
    return inp


def batch_key(inp: Input) -> str:
    # Sampling is per row and each row is cut at its own max_new_tokens: any two jobs share a pass.
    return ""


def attach_files(inp: Input, read_file) -> Input:
    """The input with its image's bytes read (storage or data URI)."""
    inp = inp.model_copy()
    inp._image_bytes = image_input.read(inp.image, read_file)
    return inp


def load(checkpoint: str, device: str, dtype: str) -> "VisionTextModel":
    """Load a vision-language model and its processor from `checkpoint` onto `device`."""
    import torch
    from transformers import AutoModelForImageTextToText, AutoProcessor

    quiet()

    dtypes = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
    if dtype not in dtypes:
        raise ValueError(f"dtype for an image-text-to-text model must be one of {sorted(dtypes)}, got {dtype!r}")
    processor = AutoProcessor.from_pretrained(checkpoint)
    processor.tokenizer.padding_side = "left"  # rows end together, where generation starts
    model = AutoModelForImageTextToText.from_pretrained(checkpoint, dtype=dtypes[dtype]).to(device).eval()
    return VisionTextModel(model, processor, torch.device(device))


def check(checkpoint: str) -> list[str]:
    """What is wrong with a vision-language model's directory, from its configs only."""
    return transformers_problems(checkpoint, "MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING",
                                 "is no image-text-to-text model in this transformers",
                                 ("preprocessor_config.json", "processor_config.json"), "no image processor config")


class VisionTextModel:
    """A loaded vision-language model that answers a batch of (image, prompt) jobs in one generate()."""

    def __init__(self, model, processor, device):
        self.model = model
        self.processor = processor
        self.device = device
        self.nbytes = module_bytes(model)
        self.image_token = getattr(processor, "image_token", "<image>")

    def run(self, inputs: list[Input], on_progress: OnProgress, is_cancelled: IsCancelled) -> list[Result | None]:
        import torch
        from transformers import LogitsProcessor, LogitsProcessorList

        from models.text_engine import RowSampling, RowSettings, seen_mask

        results: list[Result | None] = [None] * len(inputs)
        live = [i for i in range(len(inputs)) if not is_cancelled(i)]
        if not live:
            return results
        rows = [inputs[i] for i in live]
        for inp in rows:
            if inp._image_bytes is None:
                raise ValueError("input.image was not read: attach_files() runs before the model")
        tok = self.processor.tokenizer
        enc = self.processor(
            text=[f"{self.image_token}\n{inp.prompt}" for inp in rows],
            images=[image_input.decode_rgb(inp._image_bytes) for inp in rows],
            padding=True, return_tensors="pt",
        ).to(self.device)
        prompt_len = enc["input_ids"].shape[1]
        settings = [RowSettings(seed=inp.seed if inp.seed is not None else 0, temperature=inp.temperature,
                                top_p=inp.top_p, top_k=inp.top_k, repetition_penalty=inp.repetition_penalty)
                    for inp in rows]
        sampling = RowSampling(settings, self.device)
        streams = [random.Random(s.seed) for s in settings]
        longest = max(inp.max_new_tokens for inp in rows)
        # What a row's repetition penalty sees: its own prompt's text tokens and output, never padding.
        ignored = {tok.pad_token_id, tok.convert_tokens_to_ids(self.image_token)}
        cancelled = [False] * len(rows)

        class PerRow(LogitsProcessor):
            """Each row picks its token with its own settings and stream; the pick becomes a one-hot score."""

            def __call__(self, input_ids, scores):
                step = input_ids.shape[1] - prompt_len
                for r in range(len(rows)):
                    if not cancelled[r] and is_cancelled(live[r]):
                        cancelled[r] = True
                    if not cancelled[r] and step < rows[r].max_new_tokens:
                        on_progress(live[r], step + 1, rows[r].max_new_tokens)
                seen = None
                if sampling.penalised:
                    seen = seen_mask([[t for t in ids if t not in ignored] for ids in input_ids.tolist()],
                                     scores.shape[-1], scores.device)
                picks = sampling.pick(scores, streams, seen)
                onehot = torch.full_like(scores, float("-inf"))
                return onehot.scatter_(1, picks[:, None], 0.0)

        with torch.no_grad():
            out = self.model.generate(**enc, max_new_tokens=longest, do_sample=False,
                                      logits_processor=LogitsProcessorList([PerRow()]),
                                      pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
        for r, i in enumerate(live):
            if cancelled[r]:
                continue
            new = out[r, prompt_len:].tolist()[: rows[r].max_new_tokens]
            reason = "length"
            if tok.eos_token_id in new:
                new, reason = new[: new.index(tok.eos_token_id)], "stop"
            results[i] = Result(output={"text": tok.decode(new, skip_special_tokens=True), "tokens": len(new),
                                        "finish_reason": reason})
        return results
