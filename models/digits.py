"""demo-digits: a class-conditional diffusion model of handwritten digits, the
demo whose output a person can recognise.

A small diffusers UNet2DModel (one grey channel, 8x8, ten class embeddings)
is trained as a DDPM on the 1,797 8x8 digits that scikit-learn ships
(`load_digits`, no download), at their own size; it samples with DDIM. Jobs
ask for `scale` to see them bigger (nearest neighbour: the model's pixels). The
training takes some CPU minutes, so its weights (about 1 MB) are committed
under models/demo_weights/demo-digits and `ensure_checkpoint("demo:digits")`
copies them; this module rebuilds them:

    .venv/bin/python -m models.digits            # writes models/demo_weights/demo-digits

scikit-learn is needed only here and in the tests (the `test` extra).
"""
from __future__ import annotations

import argparse
import shutil
import time
from pathlib import Path

COMMITTED = Path(__file__).parent / "demo_weights" / "demo-digits"
SIZE = 8
CLASSES = 10
TRAIN_TIMESTEPS = 1000


def unet_config() -> dict:
    return dict(sample_size=SIZE, in_channels=1, out_channels=1, layers_per_block=1,
                block_out_channels=(32, 64), down_block_types=("DownBlock2D",) * 2,
                up_block_types=("UpBlock2D",) * 2, num_class_embeds=CLASSES, norm_num_groups=8)


def digits_tensor():
    """scikit-learn's digits as (N, 1, 8, 8) floats in [-1, 1] (their 0-16 ink scaled), and their labels."""
    import torch
    from sklearn.datasets import load_digits

    data = load_digits()
    return torch.tensor(data.images, dtype=torch.float32)[:, None] / 8.0 - 1, torch.tensor(data.target)


def save(unet, dest: Path) -> None:
    """`unet` with its DDIM sampler as a diffusers pipeline directory (DDIMPipeline's layout)."""
    from diffusers import DDIMPipeline, DDIMScheduler

    scheduler = DDIMScheduler(num_train_timesteps=TRAIN_TIMESTEPS, beta_schedule="squaredcos_cap_v2",
                              clip_sample=True, set_alpha_to_one=True)
    DDIMPipeline(unet=unet, scheduler=scheduler).save_pretrained(Path(dest))


def build_untrained(dest: Path, seed: int = 0) -> None:
    """The same model with random weights (what the demo is measured against)."""
    import torch
    from diffusers import UNet2DModel

    torch.manual_seed(seed)
    save(UNet2DModel(**unet_config()), dest)


def train(dest: Path, steps: int = 2500, batch_size: int = 64, lr: float = 2e-3, seed: int = 0, log=print) -> None:
    """Train the UNet as a DDPM (predict the noise) on the digits and save it into `dest`."""
    import torch
    import torch.nn.functional as F
    from diffusers import DDPMScheduler, UNet2DModel

    x, y = digits_tensor()
    torch.manual_seed(seed)
    unet = UNet2DModel(**unet_config())
    noise_schedule = DDPMScheduler(num_train_timesteps=TRAIN_TIMESTEPS, beta_schedule="squaredcos_cap_v2")
    opt = torch.optim.AdamW(unet.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.05)
    g = torch.Generator().manual_seed(seed)
    start = time.monotonic()
    for step in range(steps):
        idx = torch.randint(0, len(x), (batch_size,), generator=g)
        noise = torch.randn((batch_size, *x.shape[1:]), generator=g)
        t = torch.randint(0, TRAIN_TIMESTEPS, (batch_size,), generator=g)
        loss = F.mse_loss(unet(noise_schedule.add_noise(x[idx], noise, t), t, class_labels=y[idx]).sample, noise)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        if step % 250 == 0 or step == steps - 1:
            log(f"step {step + 1}/{steps} loss {loss.item():.4f} ({time.monotonic() - start:.0f} s)")
        if (step + 1) % 500 == 0 and step + 1 < steps:
            save(unet, dest)  # a usable model so far, should the run be stopped
    save(unet.eval(), dest)


def build(dest: Path) -> None:
    """The demo checkpoint in `dest`: a copy of the committed weights."""
    shutil.copytree(COMMITTED, dest, dirs_exist_ok=True)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=COMMITTED)
    parser.add_argument("--steps", type=int, default=2500)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (one is fastest for so small a model on a busy machine)")
    args = parser.parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    train(args.out, steps=args.steps)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
