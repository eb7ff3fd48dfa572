"""A tiny diffusers AutoencoderKL for the built-in shapes world, and the code that trains it.

The default CPU run trains NAMI in the latent space of this autoencoder, through the same
`--vae PATH` path (encoders.VAE) as the 2B model uses with the FLUX VAE: 64×64 images become
4×16×16 latents (factor 4), so the transformer sees 64 tokens at its last stage, and its first
stage (a 4×4 latent, 16×16 pixels' worth) still holds the shapes.

`config()` is the architecture: a real `diffusers.AutoencoderKL`, three levels of 16/32/32
channels, one ResNet block per level (two in the decoder), no attention, 4 latent channels
(0.24 M parameters, 0.95 MB as safetensors). `train()` fits it on renders of the built-in
world (shapes.batch_at, all of level 3, training split: the held-out colour-shape pairs are never
seen) with the usual VAE objective, pixel MSE + a small KL term towards N(0, I); `latent_stats()`
then sets the config's shift_factor and scaling_factor to the latents' mean and 1/std, so that
encoders.VAE hands the transformer latents of mean 0 and variance 1, as the FLUX VAE's
shift and scaling factors do.

    OMP_NUM_THREADS=1 python -m toyworld.tinyvae --out weights/shapes-vae   # the committed weights, ~28 min

The committed weights (weights/shapes-vae/: config.json, diffusion_pytorch_model.safetensors)
were made by exactly that command, with torch 2.13.0 on a CPU with OMP_NUM_THREADS=1 (another
thread count or torch version may round differently, giving weights that differ in the last bits
but work as well). It prints the reconstruction error on renders it never trained on; how the
judge of experiments/eval.py rates reconstructed real renders is `python -m experiments.eval --calibrate 200 --res 64
--vae weights/shapes-vae`.
"""
from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import nami
from toyworld import shapes

DEFAULT_OUT = Path(__file__).resolve().parents[1] / "weights" / "shapes-vae"


def config(channels=(16, 32, 32), latent_channels: int = 4, size: int = 64) -> dict:
    """The AutoencoderKL configuration: len(channels) levels, factor 2^(len − 1)."""
    return dict(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * len(channels),
                up_block_types=("UpDecoderBlock2D",) * len(channels), block_out_channels=tuple(channels),
                layers_per_block=1, latent_channels=latent_channels, norm_num_groups=8, sample_size=size,
                mid_block_add_attention=False)


def build(channels=(16, 32, 32), latent_channels: int = 4, size: int = 64, seed: int = 0):
    from diffusers import AutoencoderKL
    torch.manual_seed(seed)
    return AutoencoderKL(**config(channels, latent_channels, size))


def renders(seed: int, start: int, n: int, size: int) -> torch.Tensor:
    """n training renders of the full world (level 3, training split), (n, 3, size, size) in [−1, 1]."""
    return shapes.batch(seed, start, n, size, level=3)[0]


def learning_rate(step: int, steps: int, lr: float, warmup: int = 50) -> float:
    """Linear warm-up, then a cosine decay to zero."""
    if step < warmup:
        return lr * (step + 1) / warmup
    return 0.5 * lr * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))


def smooth(z: torch.Tensor, amount: torch.Tensor) -> torch.Tensor:
    """Each latent mixed with its 3×3 box blur: (1 − amount)·z + amount·blur(z), amount (N,)."""
    blurred = F.avg_pool2d(F.pad(z, (1, 1, 1, 1), mode="replicate"), 3, stride=1)
    return torch.lerp(z, blurred, amount.view(-1, 1, 1, 1))


def scale_loss(vae, z: torch.Tensor, x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """EQ-VAE's scale-equivariance term (Kouzelis et al., 2025), with NAMI's own pyramid operator: the
    latent average-pooled by 2 or 4 (at random), as stage 2 or 1 sees it, must decode to the render
    pooled alike: MSE(D(Down^j(z)), Down^j(x))."""
    for _ in range(int(torch.randint(1, 3, (1,), generator=gen))):
        z, x = nami.down(z), nami.down(x)
    return (vae.decode(z).sample - x).pow(2).mean()


def train(vae, steps: int = 1200, batch_size: int = 32, size: int = 64, lr: float = 2e-3,
          kl_weight: float = 1e-5, seed: int = 0, log_every: int = 50, decoder_only: bool = False,
          smoothing: float = 0.0, equivariance: float = 0.0):
    """Adam on mean pixel MSE + kl_weight · mean KL(q(z|x) ‖ N(0, I)), one fresh batch of renders
    per step (never the same image twice). Returns the losses.

    decoder_only: train the decoder alone (the latent space, encoder and normalisation, stays).
    smoothing p: for a share p of each batch the decoder gets the latent blurred by a random
    amount (smooth) and must still draw the sharp render. A flow model that has not learnt every
    detail yet makes smoother latents than the encoder's (posterior means); a plain decoder draws
    a smoothed square as a disc, this one draws the shape the smoothed latent still tells.
    equivariance w: + w · scale_loss, which makes the coarse levels of the latent pyramid pictures
    of the coarse image, as NAMI's first stages assume (measured: results/default-run.md)."""
    params = [p for name, p in vae.named_parameters() if not decoder_only or name.startswith(("decoder.",
                                                                                              "post_quant_conv."))]
    opt = torch.optim.Adam(params, lr=lr)
    gen = torch.Generator().manual_seed(seed)
    losses, t0 = [], time.perf_counter()
    vae.train()
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = learning_rate(step, steps, lr)
        x = renders(seed, step * batch_size, batch_size, size)
        with torch.set_grad_enabled(not decoder_only):
            posterior = vae.encode(x).latent_dist
            z = posterior.sample(generator=gen)
        if smoothing > 0:
            amount = torch.rand(len(z), generator=gen) * (torch.rand(len(z), generator=gen) < smoothing)
            z = smooth(z, amount)
        recon = vae.decode(z).sample
        mse = (recon - x).pow(2).mean()
        kl = posterior.kl().mean() / z[0].numel()  # diffusers sums the KL over a latent's elements
        loss = mse + kl_weight * kl
        if equivariance > 0:
            loss = loss + equivariance * scale_loss(vae, z, x, gen)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append((mse.item(), kl.item()))
        if log_every and (step + 1) % log_every == 0:
            print(f"step {step + 1}/{steps}  mse {mse.item():.5f}  kl {kl.item():.3f}  "
                  f"{time.perf_counter() - t0:.0f}s", flush=True)
    vae.eval()
    return losses


@torch.no_grad()
def latent_stats(vae, n: int = 512, size: int = 64, seed: int = 1):
    """(mean, std) of the posterior means over n renders the autoencoder never trained on."""
    z = torch.cat([vae.encode(renders(seed, i, 64, size)).latent_dist.mode() for i in range(0, n, 64)])
    return z.mean().item(), z.std().item()


@torch.no_grad()
def reconstruction_error(vae, n: int = 256, size: int = 64, seed: int = 2) -> float:
    """Mean pixel MSE (images in [−1, 1]) of encode -> mode -> decode on unseen renders."""
    errors = []
    for i in range(0, n, 64):
        x = renders(seed, i, 64, size)
        errors.append((vae.decode(vae.encode(x).latent_dist.mode()).sample.clamp(-1, 1) - x).pow(2).mean().item())
    return sum(errors) / len(errors)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=str(DEFAULT_OUT), help="folder for save_pretrained (config.json + safetensors)")
    ap.add_argument("--steps", type=int, default=1200)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--size", type=int, default=64, help="training render size (pixels)")
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--kl-weight", type=float, default=1e-5)
    ap.add_argument("--channels", default="16,32,32", help="block_out_channels, one per level (factor 2^(n−1))")
    ap.add_argument("--latent-channels", type=int, default=4)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--decoder-from", metavar="FOLDER",
                    help="train only the decoder of this autoencoder (its latent space and normalisation stay)")
    ap.add_argument("--from", dest="start_from", metavar="FOLDER",
                    help="start from this autoencoder's weights (all of it) instead of a random one")
    ap.add_argument("--equivariance", type=float, default=0.0,
                    help="weight of the scale-equivariance term (EQ-VAE; train())")
    ap.add_argument("--smoothing", type=float, default=0.0,
                    help="share of each batch whose latents the decoder gets blurred by a random amount (train())")
    a = ap.parse_args(argv)
    channels = tuple(int(c) for c in a.channels.split(","))
    if a.decoder_from or a.start_from:  # an existing autoencoder: its architecture comes with it
        from diffusers import AutoencoderKL
        vae = AutoencoderKL.from_pretrained(a.decoder_from or a.start_from, use_safetensors=True,
                                            low_cpu_mem_usage=False)
        channels, a.latent_channels = tuple(vae.config.block_out_channels), vae.config.latent_channels
    else:
        vae = build(channels, a.latent_channels, a.size, a.seed)
    print(f"AutoencoderKL {channels}, {a.latent_channels} latent channels, factor {2 ** (len(channels) - 1)}, "
          f"{sum(p.numel() for p in vae.parameters()) / 1e6:.3f} M parameters; {a.steps} steps of {a.batch_size} "
          f"renders at {a.size}², torch {torch.__version__}, {torch.get_num_threads()} threads")
    t0 = time.perf_counter()
    train(vae, a.steps, a.batch_size, a.size, a.lr, a.kl_weight, a.seed, decoder_only=bool(a.decoder_from),
          smoothing=a.smoothing, equivariance=a.equivariance)
    if a.decoder_from:  # the encoder is unchanged: so are its latents' statistics
        mean, std = vae.config.shift_factor, 1.0 / vae.config.scaling_factor
    else:
        mean, std = latent_stats(vae, size=a.size)
        # encoders.VAE normalises z as (z − shift_factor)·scaling_factor: mean 0, variance 1
        vae.register_to_config(shift_factor=mean, scaling_factor=1.0 / std)
    error = reconstruction_error(vae, size=a.size)
    out = Path(a.out)
    vae.save_pretrained(out, safe_serialization=True)
    record = {"command": "python -m toyworld.tinyvae " + " ".join(argv if argv is not None else __import__("sys").argv[1:]),
              "steps": a.steps, "batch_size": a.batch_size, "size": a.size, "lr": a.lr, "kl_weight": a.kl_weight,
              "seed": a.seed, "decoder_from": a.decoder_from, "from": a.start_from, "smoothing": a.smoothing,
              "equivariance": a.equivariance, "torch": torch.__version__, "threads": torch.get_num_threads(),
              "train_seconds": round(time.perf_counter() - t0, 1), "latent_mean": mean, "latent_std": std,
              "reconstruction_mse": error}
    (out / "training.json").write_text(json.dumps(record, indent=1))
    print(f"latents: mean {mean:.4f}, std {std:.4f}; reconstruction MSE on unseen renders {error:.5f}; "
          f"wrote {out}")


if __name__ == "__main__":
    main()
