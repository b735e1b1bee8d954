"""Image fine-tunes: LoRA on a Stable Diffusion UNet (and optionally its text
encoder) with peft, from a zip of images with captions, taught a trigger word.

The dataset is a zip uploaded with purpose=fine-tune: images (PNG, JPEG, WebP)
and a `metadata.jsonl` whose lines are {"file_name": "<entry>", "text":
"<caption>"} (the layout of Hugging Face's imagefolder). It is checked whole at
upload, every entry named in the error, so nothing bad is queued.

Pivotal tuning: by default the trigger word also becomes a token of its own
whose input embedding is learned beside the adapters (textual inversion), so
what sets a trigger prompt apart lives in a vector only that prompt reads; a
prompt without the trigger encodes exactly as on the base, and only the
adapters' leak can move it.

Training keeps the text fine-tunes' contract (models/finetune.py,
worker/training.py): callbacks for each step (step, total, epoch, loss), a
checkpoint (trainable weights, optimizer state, step, losses) every
`checkpoint_every` steps and on cancel, and a resumed run that ends with the
weights an uninterrupted one makes. All randomness of a step (its images,
noise, timesteps, VAE samples) comes from a generator seeded by (seed, step),
so resuming needs no RNG state at all.

Importing this module needs pydantic only (the API checks datasets with it).
"""
from __future__ import annotations

import io
import json
import math
import tempfile
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from models import finetune, image_input
from models.base import InputInvalid, check_bound, parse
from models.finetune import SUFFIX_PATTERN, TrainingFailed, TrainResult
from models.libraries import quiet

FORMAT = "image_captions"
METADATA = "metadata.jsonl"
# Bounds of an image dataset's zip beyond the upload's byte limit: entries, and
# what the entries may inflate to (a zip bomb is refused from its directory).
MAX_ENTRIES = 1000
MAX_UNPACKED_BYTES = 512 * 2**20
MAX_CAPTION_CHARS = 1000
# Where the adapters go: the UNet's cross-attention keys and values (what reads
# the prompt's tokens, so a new word can come to mean something) and, when asked,
# the text encoder's attention.
UNET_TARGETS = ["attn2.to_k", "attn2.to_v"]
TEXT_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj"]
# The learned trigger embedding, in diffusers' textual-inversion format ({token: (1, dim)}).
EMBEDDING_FILE = "learned_embeds.safetensors"


class Hyperparameters(BaseModel):
    model_config = ConfigDict(extra="forbid")

    epochs: int = Field(10, ge=1, le=1000, description="Passes over the images.")
    learning_rate: float = Field(1e-4, gt=0, le=1, description="AdamW learning rate.")
    batch_size: int = Field(1, ge=1, le=64, description="Images per optimizer step.")
    lora_rank: int = Field(4, ge=1, le=256, description="LoRA rank.")
    lora_alpha: int = Field(4, ge=1, le=1024, description="LoRA alpha.")
    max_steps: int | None = Field(None, ge=1, le=finetune.MAX_STEPS_CEILING,
                                  description="Stop after this many optimizer steps, whatever the epochs.")
    resolution: int = Field(64, ge=8, le=1024, multiple_of=8,
                            description="Images are resized (shorter side) and centre-cropped to this square.")
    train_text_encoder: bool = Field(False, description="Put LoRA adapters on the text encoder too (transformers 5 needs "
                                                        "peft 0.22 or newer for it: refused at submit where older).")
    trigger_embedding: bool = Field(
        True, description="Pivotal tuning: the trigger word becomes a token of its own whose input embedding is "
        "learned beside the adapters (saved as learned_embeds.safetensors), so prompts without it encode as on the "
        "base. false leaves the tokenizer alone and trains the adapters only.")
    embedding_learning_rate: float = Field(
        1e-3, gt=0, le=1, description="AdamW learning rate of the trigger word's embedding (with trigger_embedding).")
    prior_preservation_weight: float = Field(
        1.0, ge=0, le=100, description="DreamBooth's prior preservation, in its distillation form: each step also "
        "asks the adapted model to predict what the base predicts for the caption without the trigger word, times "
        "this weight, so prompts without the trigger keep their images. 0 turns it off.")
    seed: int = Field(0, ge=0, le=2**32 - 1, description="Seeds initialisation, data order and noise: the same seed trains the same model.")


class Input(BaseModel):
    """An image fine-tune job's `input` (its base is an image-generation model)."""

    model_config = ConfigDict(extra="forbid")

    training_file: str = Field(pattern=r"^[0-9a-f]{32}$", description="A zip of images with a metadata.jsonl of captions, "
                                                                       "from POST /v1/files (purpose fine-tune).")
    method: Literal["lora"] = Field("lora", description="LoRA adapters on the UNet's attention (and the text encoder's).")
    trigger_word: str = Field(pattern=r"^[A-Za-z0-9_-]{1,32}$",
                              description="A word put before each caption that lacks it: prompts with it call up what "
                                          "the images show.")
    hyperparameters: Hyperparameters = Field(default_factory=Hyperparameters)
    suffix: str = Field("custom", pattern=SUFFIX_PATTERN, description="Part of the new model's name: <base>:ft-<suffix>-<id>.")


def validate(raw: Any, limits: dict) -> Input:
    inp = parse(Input, raw)
    errors: list[dict[str, str]] = []
    hp = inp.hyperparameters
    check_bound(errors, "input.hyperparameters.epochs", hp.epochs, limits.get("max_epochs"))
    check_bound(errors, "input.hyperparameters.resolution", hp.resolution,
                min(v for v in (limits.get("max_width"), limits.get("max_height"), 1024) if v is not None))
    if hp.train_text_encoder:
        problem = text_encoder_lora_problem()
        if problem:
            errors.append({"field": "input.hyperparameters.train_text_encoder", "message": problem})
    if errors:
        raise InputInvalid(errors)
    return inp


# transformers' own floor for its PEFT integration (text_encoder.add_adapter),
# transformers.integrations.peft.MIN_PEFT_VERSION, here without importing
# transformers (the API does not load torch); tests/models/test_image_finetune.py
# checks the two agree.
TRANSFORMERS_MIN_PEFT = "0.22.0"


def text_encoder_lora_problem() -> str | None:
    """Why LoRA on the text encoder cannot run with the libraries installed, or
    None. transformers 5 refuses its PEFT integration below peft 0.22, and the
    job would fail at its first step after waiting in line: refused at submit."""
    from importlib.metadata import PackageNotFoundError, version

    from packaging.version import Version

    try:
        transformers, peft = version("transformers"), version("peft")
    except PackageNotFoundError as exc:
        return f"LoRA on the text encoder needs {exc.name}, which this server does not have"
    if Version(transformers).major >= 5 and Version(peft) < Version(TRANSFORMERS_MIN_PEFT):
        return (f"LoRA on the text encoder needs peft >= {TRANSFORMERS_MIN_PEFT} with transformers {transformers}; "
                f"this server has peft {peft} (LoRA on the UNet alone works)")
    return None


def input_schema(limits: dict, max_train_steps: int = 0) -> dict:
    """Input's JSON schema, self-contained, bounded by one base model's limits
    (as models/finetune.py's is for text)."""
    side = min(v for v in (limits.get("max_width"), limits.get("max_height"), 1024) if v is not None)
    return finetune.bounded_schema(Input, {"epochs": limits.get("max_epochs"), "resolution": side,
                                           "max_steps": limits.get("max_train_steps", max_train_steps)})


def check_workload(inp: Input, n_rows: int, limits: dict, *, max_train_steps: int, max_train_examples: int) -> None:
    """The text fine-tunes' bounds on steps and examples (one image is one example)."""
    finetune.check_workload(inp, n_rows, limits, max_train_steps=max_train_steps, max_train_examples=max_train_examples)


# --- datasets -----------------------------------------------------------------------


@dataclass
class Dataset:
    # (image bytes, caption) in metadata.jsonl's order.
    rows: list[tuple[bytes, str]]
    format: str = FORMAT


def is_zip(data: bytes) -> bool:
    return data[:4] == b"PK\x03\x04"


def parse_dataset(data: bytes, max_rows: int | None = None, max_image_bytes: int = image_input.MAX_BYTES,
                  max_image_pixels: int = image_input.MAX_PIXELS) -> Dataset:
    """Check a zip of captioned images; InputInvalid names the entry (or
    metadata line) and what is wrong with it."""
    def refuse(fieldname: str, message: str):
        raise InputInvalid([{"field": fieldname, "message": message}])

    try:
        archive = zipfile.ZipFile(io.BytesIO(data))
        infos = archive.infolist()
    except (zipfile.BadZipFile, ValueError, EOFError) as exc:
        refuse("file", f"is not a readable zip ({exc})")
    if len(infos) > MAX_ENTRIES:
        refuse("file", f"has {len(infos)} entries; at most {MAX_ENTRIES} are allowed")
    if sum(i.file_size for i in infos) > MAX_UNPACKED_BYTES:
        refuse("file", f"unpacks to more than {MAX_UNPACKED_BYTES} bytes")
    entries = {i.filename: i for i in infos if not i.is_dir()}
    if METADATA not in entries:
        refuse("file", f'has no {METADATA}: one JSON line per image, {{"file_name": "<entry>", "text": "<caption>"}}')
    try:
        lines = archive.read(METADATA).decode("utf-8").splitlines()
    except (UnicodeDecodeError, zipfile.BadZipFile, OSError) as exc:
        refuse(f"file.entry[{METADATA}]", f"cannot be read as UTF-8 text ({exc})")
    rows: list[tuple[bytes, str]] = []
    seen: set[str] = set()
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        where = f"file.entry[{METADATA}].line[{number}]"
        try:
            row = json.loads(line)
        except (ValueError, RecursionError):
            refuse(where, f"line {number} of {METADATA} is not JSON")
        if not isinstance(row, dict) or set(row) != {"file_name", "text"}:
            refuse(where, f'line {number} of {METADATA} must be {{"file_name": ..., "text": ...}}')
        name, caption = row["file_name"], row["text"]
        if not isinstance(name, str) or not isinstance(caption, str) or not caption.strip():
            refuse(where, f"line {number} of {METADATA}: file_name and a non-empty text must be strings")
        if len(caption) > MAX_CAPTION_CHARS:
            refuse(where, f"line {number} of {METADATA}: the caption is {len(caption)} characters; at most "
                          f"{MAX_CAPTION_CHARS}")
        if name not in entries:
            refuse(where, f"line {number} of {METADATA} names {name!r:.80}, which is not in the zip")
        if name in seen:
            refuse(where, f"line {number} of {METADATA} names {name!r:.80} a second time")
        seen.add(name)
        try:
            blob = archive.read(entries[name])
        except (zipfile.BadZipFile, OSError, ValueError) as exc:
            refuse(f"file.entry[{name}]", f"cannot be read from the zip ({exc})")
        try:
            image_input.check(blob, max_image_bytes, max_image_pixels)
        except image_input.ImageRefused as exc:
            refuse(f"file.entry[{name}]", f"{name!r:.80} {exc}")
        rows.append((blob, caption))
        if max_rows is not None and len(rows) > max_rows:
            refuse("file", f"has more than {max_rows} images; at most {max_rows} are allowed")
    if not rows:
        refuse(f"file.entry[{METADATA}]", "names no image")
    return Dataset(rows)


# --- training ---------------------------------------------------------------------------


def _total(n_rows: int, hp: Hyperparameters) -> int:
    return finetune.total_steps(n_rows, hp)


def _pixels(blob: bytes, resolution: int):
    """An image as a (3, r, r) tensor in [-1, 1]: shorter side resized to r, centre-cropped."""
    import numpy as np
    import torch
    from PIL import Image

    img = Image.open(io.BytesIO(blob)).convert("RGB")
    scale = resolution / min(img.size)
    w, h = max(resolution, round(img.width * scale)), max(resolution, round(img.height * scale))
    img = img.resize((w, h), Image.BICUBIC)
    left, top = (w - resolution) // 2, (h - resolution) // 2
    img = img.crop((left, top, left + resolution, top + resolution))
    return torch.from_numpy(np.asarray(img, dtype=np.float32) / 127.5 - 1).permute(2, 0, 1)


def caption_with_trigger(caption: str, trigger: str) -> str:
    return caption if trigger in caption.split() else f"{trigger} {caption}"


def caption_without_trigger(caption: str, trigger: str) -> str:
    return " ".join(w for w in caption.split() if w != trigger)


def trigger_token(tokenizer, text_encoder, trigger: str) -> int:
    """The trigger word's token id, adding it to the tokenizer (as a whole word)
    and a row for it to the text encoder's input embeddings when it is not one
    token already. Training and materialize() both call this, so the id a
    trained embedding was learned for is the id it is written to."""
    from tokenizers import AddedToken

    if trigger not in tokenizer.get_vocab():
        tokenizer.add_tokens([AddedToken(trigger, single_word=True)])
        # The new row is overwritten (by the learned vector); mean_resizing=False draws no random numbers.
        text_encoder.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    return tokenizer.convert_tokens_to_ids(trigger)


def train(
    base_checkpoint: str,
    dataset: Dataset,
    inp: Input,
    device: str,
    *,
    resume: bytes | None,
    checkpoint_every: int,
    on_step: Callable[[int, int, int, float], None],
    save_checkpoint: Callable[[int, bytes], None],
    is_cancelled: Callable[[], bool],
    on_notice: Callable[[str], None] | None = None,
) -> TrainResult:
    """DreamBooth-style LoRA on a Stable Diffusion pipeline's UNet (the noise
    prediction loss), resumable bit for bit; returns the LoRA weights as
    diffusers saves them (pytorch_lora_weights.safetensors) and, with
    trigger_embedding, the trigger's learned embedding (EMBEDDING_FILE)."""
    import torch
    import torch.nn.functional as F
    from diffusers import DDPMScheduler, DiffusionPipeline
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    quiet()
    hp = inp.hyperparameters
    pipe = DiffusionPipeline.from_pretrained(base_checkpoint, dtype=torch.float32, safety_checker=None,
                                             requires_safety_checker=False)
    if not hasattr(pipe, "save_lora_weights") or not {"unet", "vae", "text_encoder", "tokenizer"} <= set(pipe.components) \
            or getattr(pipe, "text_encoder_2", None) is not None:
        raise TrainingFailed("unsupported_model", f"image LoRA fine-tunes take Stable Diffusion (1.x/2.x) pipelines; "
                                                  f"this base is a {type(pipe).__name__}")
    unet, vae, text_encoder, tokenizer = pipe.unet, pipe.vae, pipe.text_encoder, pipe.tokenizer
    noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    for module in (unet, vae, text_encoder):
        module.requires_grad_(False)
    torch.manual_seed(hp.seed)
    lora = dict(r=hp.lora_rank, lora_alpha=hp.lora_alpha, lora_dropout=0.0, init_lora_weights="gaussian")
    unet.add_adapter(LoraConfig(target_modules=UNET_TARGETS, **lora))
    if hp.train_text_encoder:
        text_encoder.add_adapter(LoraConfig(target_modules=TEXT_TARGETS, **lora))
    for module in (unet, vae, text_encoder):
        module.to(device)
    unet.train()
    text_encoder.train(hp.train_text_encoder)
    trained = {"unet": unet, **({"text_encoder": text_encoder} if hp.train_text_encoder else {})}
    params = [p for m in trained.values() for p in m.parameters() if p.requires_grad]
    groups = [{"params": params, "lr": hp.learning_rate}]
    embedding = None
    if hp.trigger_embedding:
        # Textual inversion's start: the mean embedding of the pieces the word was split into.
        pieces = tokenizer(inp.trigger_word, add_special_tokens=False).input_ids
        start = text_encoder.get_input_embeddings().weight[pieces].mean(0).detach().clone()
        token = trigger_token(tokenizer, text_encoder, inp.trigger_word)
        text_encoder.get_input_embeddings().requires_grad_(False)  # a resized table is made trainable
        embedding = torch.nn.Parameter(start.to(device))
        # The frozen table stays as it is; the trigger's positions read the learned vector instead.
        text_encoder.get_input_embeddings().register_forward_hook(
            lambda _module, args, out: torch.where((args[0] == token)[..., None], embedding, out))
        groups.append({"params": [embedding], "lr": hp.embedding_learning_rate})
        params = params + [embedding]
    optimizer = torch.optim.AdamW(groups)

    # Every image once, resized; every caption once, encoded to ids.
    pixels = torch.stack([_pixels(blob, hp.resolution) for blob, _ in dataset.rows])
    captions = [caption_with_trigger(c, inp.trigger_word) for _, c in dataset.rows]
    plain = [caption_without_trigger(c, inp.trigger_word) for _, c in dataset.rows]

    def encode(texts):
        return tokenizer(texts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                         return_tensors="pt").input_ids

    ids, plain_ids = encode(captions), encode(plain)
    # The empty prompt too: its tokens (start, end, padding) are in every prompt, so an
    # adapter that leaves them alone leaves alone what no trigger asks for.
    empty_ids = encode([""] * len(captions))
    n = len(dataset.rows)
    total, per_epoch = _total(n, hp), math.ceil(n / hp.batch_size)

    step, losses = 0, []
    if resume is not None:
        state = torch.load(io.BytesIO(resume), map_location=device, weights_only=True)
        named = {f"{k}.{n_}": p for k, m in trained.items() for n_, p in m.named_parameters() if p.requires_grad}
        if embedding is not None:
            named["trigger_embedding"] = embedding
        with torch.no_grad():
            for name, value in state["weights"].items():
                named[name].copy_(value)
        optimizer.load_state_dict(state["optimizer"])
        step, losses = int(state["step"]), list(state["losses"])

    def snapshot() -> bytes:
        buf = io.BytesIO()
        weights = {f"{k}.{n_}": p.detach().clone() for k, m in trained.items() for n_, p in m.named_parameters()
                   if p.requires_grad}
        if embedding is not None:
            weights["trigger_embedding"] = embedding.detach().clone()
        torch.save({"weights": weights, "optimizer": optimizer.state_dict(), "step": step, "losses": losses}, buf)
        return buf.getvalue()

    first_step = step
    scaling = getattr(vae.config, "scaling_factor", 0.18215)
    while step < total:
        epoch, index = divmod(step, per_epoch)
        order = torch.randperm(n, generator=torch.Generator().manual_seed(hp.seed + epoch)).tolist()
        batch = order[index * hp.batch_size:(index + 1) * hp.batch_size]
        if is_cancelled():
            save_checkpoint(step, snapshot())
            return TrainResult({}, {"train_loss": losses[-1] if losses else None}, step, canceled=True, losses=losses)
        # This step's draws, from (seed, step) alone.
        g = torch.Generator().manual_seed(hp.seed * 1_000_003 + step)
        with torch.no_grad():
            dist = vae.encode(pixels[batch].to(device)).latent_dist
            latents = (dist.mean + dist.std * torch.randn(dist.mean.shape, generator=g).to(device)) * scaling
        noise = torch.randn(latents.shape, generator=g).to(device)
        t = torch.randint(0, noise_scheduler.config.num_train_timesteps, (len(batch),), generator=g).to(device)
        noisy = noise_scheduler.add_noise(latents, noise, t)
        states = text_encoder(ids[batch].to(device))[0]
        target = noise if noise_scheduler.config.prediction_type == "epsilon" else \
            noise_scheduler.get_velocity(latents, noise, t)
        loss = F.mse_loss(unet(noisy, t, states).sample, target)
        if hp.prior_preservation_weight:
            # The base's prediction (adapters off) for the caption without the trigger,
            # and for the empty prompt, is the target there.
            for prior_ids in (plain_ids, empty_ids):
                prior_states = text_encoder(prior_ids[batch].to(device))[0]
                with torch.no_grad():
                    unet.disable_adapters()
                    base_pred = unet(noisy, t, prior_states.detach()).sample
                    unet.enable_adapters()
                loss = loss + hp.prior_preservation_weight * F.mse_loss(unet(noisy, t, prior_states).sample,
                                                                        base_pred)
        value = loss.detach().item()
        if not math.isfinite(value):
            raise finetune._not_finite("loss", value, step + 1, hp)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None]).item()
        if not math.isfinite(grad_norm):
            raise finetune._not_finite("gradient", grad_norm, step + 1, hp)
        optimizer.step()
        step += 1
        losses.append(round(value, 6))
        on_step(step, total, epoch + 1, losses[-1])
        if step % checkpoint_every == 0 and step < total:
            save_checkpoint(step, snapshot())

    from diffusers.utils import convert_state_dict_to_diffusers

    layers = {f"{k}_lora_layers": convert_state_dict_to_diffusers(get_peft_model_state_dict(m))
              for k, m in trained.items()}
    with tempfile.TemporaryDirectory() as tmp:
        type(pipe).save_lora_weights(tmp, **layers)
        if embedding is not None:
            from safetensors.torch import save_file

            save_file({inp.trigger_word: embedding.detach().cpu()[None].contiguous()}, Path(tmp) / EMBEDDING_FILE)
        files = {p.name: p.read_bytes() for p in Path(tmp).iterdir() if p.is_file()}
    metrics = {"train_loss": losses[-1], "initial_loss": losses[0], "steps": total, "resumed_from_step": first_step,
               "rows": n, "method": inp.method, "trigger_word": inp.trigger_word}
    return TrainResult(files, metrics, total, losses=losses)


def materialize(base_checkpoint: str, version_dir: Path, dest: Path) -> Path:
    """A loadable pipeline directory for an image LoRA version: the base with
    the LoRA fused into its weights and, when the version learned one, the
    trigger word's token and embedding in its tokenizer and text encoder
    (served then like any pipeline)."""
    import torch
    from diffusers import DiffusionPipeline

    quiet()
    pipe = DiffusionPipeline.from_pretrained(base_checkpoint, dtype=torch.float32, safety_checker=None,
                                             requires_safety_checker=False)
    pipe.load_lora_weights(str(version_dir))
    if (Path(version_dir) / EMBEDDING_FILE).exists():
        from safetensors.torch import load_file

        ((word, vector),) = load_file(str(Path(version_dir) / EMBEDDING_FILE)).items()
        token = trigger_token(pipe.tokenizer, pipe.text_encoder, word)
        with torch.no_grad():
            pipe.text_encoder.get_input_embeddings().weight[token] = vector[0]
    pipe.fuse_lora()
    pipe.unload_lora_weights()
    tmp = Path(tempfile.mkdtemp(dir=dest.parent, prefix=".merge-"))
    pipe.save_pretrained(tmp)
    tmp.rename(dest)
    return dest
