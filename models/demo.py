"""Demo checkpoints built locally from random weights, so genq runs with no model hub."""
from __future__ import annotations

import fcntl
import os
import shutil
import tempfile
from pathlib import Path

from models.libraries import quiet

# checkpoint name in the registry -> (directory under the model dir, builder name)
DEMOS = {
    "demo:text": ("demo-text", "build_text"),
    "demo:image": ("demo-image", "build_image"),
    "demo:image-xl": ("demo-image-xl", "build_image_xl"),
    "demo:audio": ("demo-audio", "build_audio"),
    "demo:video": ("demo-video", "build_video"),
    "demo:vision-text": ("demo-vision-text", "build_vision_text"),
    "demo:digits": ("demo-digits", "build_digits"),
}

SPECIAL_TOKENS = ["<pad>", "<s>", "</s>", "<unk>"]

# Enough English for a byte-level BPE to learn a few hundred merges; the
# weights are random, so the text only has to make tokenization look sane.
CORPUS = """\
The quick brown fox jumps over the lazy dog. A job queue takes requests, runs them in batches and stores the results.
Generative models turn a prompt into text or an image. The worker loads a model once and serves many jobs with it.
It was the best of times, it was the worst of times, it was the age of wisdom, it was the age of foolishness.
Call me Ishmael. Some years ago, never mind how long precisely, having little or no money in my purse,
and nothing particular to interest me on shore, I thought I would sail about a little and see the watery part of the world.
In the beginning the universe was created. This has made a lot of people very angry and been widely regarded as a bad move.
A photograph of an astronaut riding a horse on the moon, highly detailed, dramatic lighting, oil painting, trending.
A watercolor painting of a lighthouse on a rocky coast at sunset, with seagulls and waves crashing against the stones.
Once upon a time there was a little cat who lived in a house by the river. Every morning she watched the boats go by.
The weather today is sunny with a light breeze from the west. Tomorrow there will be rain in the north and the east.
Please write a short story about a robot who learns to paint. The robot lives in a city full of people and machines.
What is the capital of France? The capital of France is Paris. What is the capital of Italy? It is Rome, of course.
numbers 0 1 2 3 4 5 6 7 8 9 10 100 1000, punctuation: commas, periods. question marks? exclamation marks! quotes "yes".
"""


# Each turn as `<s>role\ncontent</s>\n`, and the assistant's turn opened at the end.
CHAT_TEMPLATE = (
    "{% for m in messages %}<s>{{ m['role'] }}\n{{ m['content'] }}</s>\n{% endfor %}"
    "{% if add_generation_prompt %}<s>assistant\n{% endif %}"
)


def _train_tokenizer(model_max_length: int, add_bos_eos: bool):
    """A byte-level BPE tokenizer trained on CORPUS, as a transformers fast tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS.splitlines(), trainer=trainer)
    if add_bos_eos:
        # CLIP-style: <s> prompt </s>, as the text encoder of a diffusion pipeline expects.
        bos, eos = tok.token_to_id("<s>"), tok.token_to_id("</s>")
        tok.post_processor = processors.TemplateProcessing(
            single="<s> $A </s>", pair="<s> $A </s> $B </s>", special_tokens=[("<s>", bos), ("</s>", eos)]
        )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        model_max_length=model_max_length,
        pad_token="<pad>",
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
    )


def build_text(dest: Path) -> None:
    """A ~3M-parameter GPT-2 with random weights and its tokenizer, saved into `dest`."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    quiet()

    tok = _train_tokenizer(model_max_length=256, add_bos_eos=False)
    # A chat template, so chat messages (POST /v1/chat/completions) can be rendered.
    tok.chat_template = CHAT_TEMPLATE
    config = GPT2Config(
        vocab_size=len(tok),
        n_positions=512,
        n_embd=256,
        n_layer=4,
        n_head=4,
        pad_token_id=tok.pad_token_id,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
    )
    torch.manual_seed(0)
    model = GPT2LMHeadModel(config).eval()
    gen = model.generation_config
    gen.pad_token_id, gen.bos_token_id, gen.eos_token_id = tok.pad_token_id, tok.bos_token_id, tok.eos_token_id
    dest = Path(dest)
    model.save_pretrained(dest)
    tok.save_pretrained(dest)


# The tiny diffusion components diffusers' own tests use (get_dummy_components),
# shared by the demo pipelines. Each is made right after torch.manual_seed(0),
# so a component's random weights do not depend on what was built before it.
TEXT_SHAPE = dict(hidden_size=32, intermediate_size=37, layer_norm_eps=1e-05, num_attention_heads=4,
                  num_hidden_layers=5)


def _tiny_unet(**overrides):
    """A two-level conditional UNet over 4-channel latents (cross-attention in the lower level)."""
    import torch
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    return UNet2DConditionModel(**{**dict(
        block_out_channels=(32, 64), layers_per_block=2, sample_size=32, in_channels=4, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
    ), **overrides})


def _tiny_vae(channels: int = 3, **overrides):
    """A two-level VAE from `channels` to 4 latent channels."""
    import torch
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    return AutoencoderKL(block_out_channels=[32, 64], in_channels=channels, out_channels=channels,
                         down_block_types=["DownEncoderBlock2D", "DownEncoderBlock2D"],
                         up_block_types=["UpDecoderBlock2D", "UpDecoderBlock2D"], latent_channels=4, **overrides)


def _ddim():
    """Stable Diffusion's DDIM schedule (steps_offset=1, clip_sample=False: no deprecation noise)."""
    from diffusers import DDIMScheduler

    return DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                         set_alpha_to_one=False, steps_offset=1)


def _clip_config(tok, **extra):
    """A tiny CLIP text encoder's config over the demo tokenizer `tok`."""
    from transformers import CLIPTextConfig

    return CLIPTextConfig(bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                          vocab_size=len(tok), max_position_embeddings=tok.model_max_length, **TEXT_SHAPE, **extra)


def _tiny_clip(tok):
    import torch
    from transformers import CLIPTextModel

    torch.manual_seed(0)
    return CLIPTextModel(_clip_config(tok)).eval()


def build_image(dest: Path) -> None:
    """A tiny Stable Diffusion pipeline (diffusers' test shapes) with random weights, saved into `dest`."""
    from diffusers import StableDiffusionPipeline

    quiet()

    tok = _train_tokenizer(model_max_length=77, add_bos_eos=True)
    unet = _tiny_unet(cross_attention_dim=32)
    scheduler = _ddim()
    vae = _tiny_vae()
    text_encoder = _tiny_clip(tok)
    pipe = StableDiffusionPipeline(
        unet=unet,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tok,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(Path(dest))


def build_image_xl(dest: Path) -> None:
    """A tiny Stable Diffusion XL pipeline (two text encoders, size and crop
    conditioning; diffusers' test shapes) with random weights, saved into `dest`:
    a second pipeline class, so the image family's generic loader is exercised."""
    import torch
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    quiet()

    tok = _train_tokenizer(model_max_length=77, add_bos_eos=True)
    unet = _tiny_unet(
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        transformer_layers_per_block=(1, 2),
        projection_class_embeddings_input_dim=80,  # 6 size/crop numbers x 8 + the pooled text embedding's 32
        cross_attention_dim=64,  # both encoders' hidden states side by side
    )
    scheduler = EulerDiscreteScheduler(
        beta_start=0.00085, beta_end=0.012, steps_offset=1, beta_schedule="scaled_linear", timestep_spacing="leading"
    )
    vae = _tiny_vae(sample_size=128)
    config = _clip_config(tok, hidden_act="gelu", projection_dim=32)
    torch.manual_seed(0)
    text_encoder = CLIPTextModel(config).eval()
    torch.manual_seed(0)
    text_encoder_2 = CLIPTextModelWithProjection(config).eval()
    pipe = StableDiffusionXLPipeline(
        unet=unet,
        vae=vae,
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=tok,
        tokenizer_2=tok,
        scheduler=scheduler,
        image_encoder=None,
        feature_extractor=None,
    )
    pipe.save_pretrained(Path(dest))


def build_audio(dest: Path) -> None:
    """A tiny AudioLDM pipeline (CLAP text encoder, a UNet over mel latents, a
    HiFi-GAN vocoder at 16 kHz; diffusers' test shapes) with random weights,
    saved into `dest`. The vocoder upsamples 1,024x, so a second of audio is a
    16-frame mel spectrogram: cheap on a CPU."""
    import torch
    from diffusers import AudioLDMPipeline
    from transformers import ClapTextConfig, ClapTextModelWithProjection, SpeechT5HifiGan, SpeechT5HifiGanConfig

    quiet()

    tok = _train_tokenizer(model_max_length=77, add_bos_eos=True)
    unet = _tiny_unet(
        cross_attention_dim=(32, 64),
        class_embed_type="simple_projection",  # the CLAP text embedding conditions every block
        projection_class_embeddings_input_dim=32,
        class_embeddings_concat=True,
    )
    scheduler = _ddim()
    vae = _tiny_vae(channels=1)
    torch.manual_seed(0)
    text_encoder = ClapTextModelWithProjection(ClapTextConfig(
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        vocab_size=len(tok),
        projection_dim=32,
        # RoBERTa-style positions start after the pad id.
        max_position_embeddings=tok.model_max_length + tok.pad_token_id + 2,
        **TEXT_SHAPE,
    )).eval()
    torch.manual_seed(0)
    vocoder = SpeechT5HifiGan(SpeechT5HifiGanConfig(
        model_in_dim=8,  # mel bins: the VAE's output width
        sampling_rate=16000,
        upsample_initial_channel=16,
        upsample_rates=[8, 8, 4, 4],
        upsample_kernel_sizes=[16, 16, 8, 8],
        resblock_kernel_sizes=[3, 7],
        resblock_dilation_sizes=[[1, 3, 5], [1, 3, 5]],
        normalize_before=False,
        # Wider than the default 0.01 init: four upsampling stages of 0.01 weights
        # leave ~1e-9 of signal, silence once written as 16-bit PCM.
        initializer_range=0.2,
    )).eval()
    pipe = AudioLDMPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tok, unet=unet, scheduler=scheduler,
                            vocoder=vocoder)
    pipe.save_pretrained(Path(dest))


def build_video(dest: Path) -> None:
    """A tiny text-to-video pipeline (TextToVideoSD: a 3D UNet with temporal
    attention, the image demo's VAE and CLIP shapes) with random weights, saved into `dest`."""
    import torch
    from diffusers import TextToVideoSDPipeline, UNet3DConditionModel

    quiet()

    tok = _train_tokenizer(model_max_length=77, add_bos_eos=True)
    torch.manual_seed(0)
    unet = UNet3DConditionModel(
        block_out_channels=(32, 64),
        layers_per_block=2,
        sample_size=32,
        in_channels=4,
        out_channels=4,
        down_block_types=("CrossAttnDownBlock3D", "DownBlock3D"),
        up_block_types=("UpBlock3D", "CrossAttnUpBlock3D"),
        cross_attention_dim=32,
        attention_head_dim=4,
        norm_num_groups=2,
    )
    scheduler = _ddim()
    vae = _tiny_vae()
    text_encoder = _tiny_clip(tok)
    pipe = TextToVideoSDPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tok, unet=unet, scheduler=scheduler)
    pipe.save_pretrained(Path(dest))


def build_vision_text(dest: Path) -> None:
    """A tiny LLaVA (a CLIP vision tower on 32x32 images, a projector, a
    2-layer Llama) with random weights and its processor, saved into `dest`."""
    import torch
    from transformers import (CLIPImageProcessor, CLIPVisionConfig, LlamaConfig, LlavaConfig,
                              LlavaForConditionalGeneration, LlavaProcessor)

    quiet()

    tok = _train_tokenizer(model_max_length=512, add_bos_eos=False)
    tok.add_special_tokens({"additional_special_tokens": ["<image>"]})
    config = LlavaConfig(
        vision_config=CLIPVisionConfig(hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                                       num_attention_heads=4, image_size=32, patch_size=8),
        text_config=LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=512,
                                pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
                                eos_token_id=tok.eos_token_id),
        image_token_index=tok.convert_tokens_to_ids("<image>"),
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",  # drop the CLS token: 16 patch tokens per image
        projector_hidden_act="gelu",
    )
    torch.manual_seed(0)
    model = LlavaForConditionalGeneration(config).eval()
    gen = model.generation_config
    gen.pad_token_id, gen.bos_token_id, gen.eos_token_id = tok.pad_token_id, tok.bos_token_id, tok.eos_token_id
    processor = LlavaProcessor(
        image_processor=CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}),
        tokenizer=tok, patch_size=8, vision_feature_select_strategy="default", num_additional_image_tokens=1,
        image_token="<image>",
    )
    model.save_pretrained(Path(dest))
    processor.save_pretrained(Path(dest))


def build_digits(dest: Path) -> None:
    """The handwritten-digits diffusion model (models/digits.py): trained weights
    committed in the repo, copied into `dest` (training them takes CPU minutes)."""
    from models import digits

    digits.build(dest)


def ensure_checkpoint(checkpoint: str, model_dir: Path) -> str:
    """The directory of demo checkpoint `checkpoint` ("demo:text", "demo:image")
    under `model_dir`, built on first use. Other schemes are resolved by
    models/checkpoints.py."""
    if checkpoint not in DEMOS:
        raise ValueError(f"unknown demo checkpoint {checkpoint!r}; known: {sorted(DEMOS)}")
    dirname, builder = DEMOS[checkpoint]
    model_dir = Path(model_dir)
    dest = model_dir / dirname
    if dest.is_dir():
        return str(dest)
    model_dir.mkdir(parents=True, exist_ok=True)
    # Several worker processes may start at once: one builds, the others wait on
    # the lock and then find the finished directory. The build goes to a temp
    # directory renamed into place, so a crash never leaves a half-built `dest`.
    with open(model_dir / f".{dirname}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            if not dest.is_dir():
                tmp = Path(tempfile.mkdtemp(prefix=f".{dirname}-", dir=model_dir))
                try:
                    globals()[builder](tmp)
                    os.chmod(tmp, 0o755)  # mkdtemp makes it private; the result is not
                    os.rename(tmp, dest)
                except BaseException:
                    shutil.rmtree(tmp, ignore_errors=True)
                    raise
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
    return str(dest)
