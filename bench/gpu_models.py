"""GPU-sized models for the benches, built from configs with random weights
(a forward pass costs the same with trained ones): a GPT-2-medium-sized LM
(24 layers, 1024 wide, 16 heads, 50,257 tokens, 355M parameters) and an
SD-1.5-sized pipeline (its UNet, VAE and CLIP text encoder configs).

    python bench/gpu_models.py DEST     # writes DEST/text and DEST/image
"""
from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from models import demo  # noqa: E402

GPT2_VOCAB = 50257


def build_text(dest: Path) -> None:
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    tok = demo._train_tokenizer(model_max_length=1024, add_bos_eos=False)
    # The demo tokenizer knows a few hundred tokens; padded to GPT-2's vocabulary
    # so the LM head costs what GPT-2 medium's does, and any id decodes.
    tok.add_tokens([f"<x{i}>" for i in range(GPT2_VOCAB - len(tok))])
    config = GPT2Config(vocab_size=len(tok), n_positions=1024, n_embd=1024, n_layer=24, n_head=16,
                        pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    torch.manual_seed(0)
    model = GPT2LMHeadModel(config).eval()
    model.generation_config.pad_token_id = tok.pad_token_id
    model.save_pretrained(dest)
    tok.save_pretrained(dest)


def build_image(dest: Path) -> None:
    import torch
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    tok = demo._train_tokenizer(model_max_length=77, add_bos_eos=True)
    torch.manual_seed(0)
    unet = UNet2DConditionModel(  # Stable Diffusion 1.5's UNet config (860M parameters)
        sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
        block_out_channels=(320, 640, 1280, 1280), cross_attention_dim=768, attention_head_dim=8,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3)
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2, sample_size=512,
        block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        hidden_size=768, intermediate_size=3072, num_attention_heads=12, num_hidden_layers=12,
        vocab_size=len(tok), max_position_embeddings=77, bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)).eval()
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                              clip_sample=False, set_alpha_to_one=False, steps_offset=1)
    StableDiffusionPipeline(unet=unet, vae=vae, text_encoder=text_encoder, tokenizer=tok, scheduler=scheduler,
                            safety_checker=None, feature_extractor=None,
                            requires_safety_checker=False).save_pretrained(dest)


if __name__ == "__main__":
    out = Path(sys.argv[1])
    build_text(out / "text")
    build_image(out / "image")
    print(f"built {out}/text and {out}/image")
