"""The validation loss: Eq. 4 of every stage, in the window's local units, on held-out samples at fixed
local times t' and fixed noise, with the EMA weights in eval mode. The training loss draws new samples,
noise and t' at every step and mixes the stages by the phase's ratios, so it is too noisy to compare
runs; this figure changes only with the weights (docs/evaluation.md#the-validation-loss).

    held = held_out(cfg, encoder, autoencoder, K, device)           # built-in world, --val-data or none
    per_t = validation_loss(ema, bridge, held)                      # {k: [loss at each t'], ...}
    summary(per_t)                                                  # {"val_loss_stage1": ..., ...}

train.py logs it every --val-every steps (and at step 0 and the last) into log.jsonl and TensorBoard;
`python -m experiments.eval RUN --val-loss` gives it for any checkpoint.
"""
from __future__ import annotations

from pathlib import Path

import torch

import nami
from bridgeflow import jump_for
from datafeed.buckets import bucket_set
from datafeed.cache import CachedDataset, cache_dtype, cache_key
from datafeed.folders import FolderDataset, mix_seed
from toyworld import shapes

FIRST_HELD_OUT = 1 << 40  # built-in world: training draws sample positions from 0, BridgeFlow from 10^7
POINTS = 8                # fixed local times t' per stage


def t_points(n: int = POINTS) -> list[float]:
    """n equally spaced local times, the centres of n equal bins of [0, 1]: (j + ½)/n."""
    return [(j + 0.5) / n for j in range(n)]


def held_out(cfg, encoder, autoencoder, num_stages: int, device, n: int | None = None) -> list[tuple] | None:
    """[(x, txt, pooled, eps)], groups of held-out samples that share a shape: clean latents at the full
    size, their text states and fixed noise ε_K (seeded by (seed, "validation", i)). The built-in world:
    positions no training run draws; --val-data: the first n items of that folder or cache; else None."""
    n = n or cfg.val_samples
    if cfg.val_data is None and (cfg.data or cfg.cache):
        return None
    if cfg.val_data is None:
        pixels, samples = shapes.batch_at(cfg.seed, range(FIRST_HELD_OUT, FIRST_HELD_OUT + n), cfg.resolution,
                                          level=cfg.world_level)
        items = [(pixels[i:i + 1], samples[i].caption) for i in range(n)]
    else:
        items = list(folder_items(cfg, encoder, autoencoder, num_stages, n))
    groups: dict[tuple, list] = {}
    for i, (x, caption) in enumerate(items):
        groups.setdefault(tuple(x.shape[1:]), []).append((i, x, caption))
    out = []
    for members in groups.values():
        x = torch.cat([m[1] for m in members]).to(device)
        if isinstance(members[0][2], str):  # pictures with their captions: encode; a cache holds latents
            x = autoencoder.encode(x)
        txt, pooled = text_of([m[2] for m in members], encoder, device)
        eps = torch.stack([torch.randn(x.shape[1:], generator=torch.Generator().manual_seed(
            mix_seed(cfg.seed, "validation", i))) for i, _, _ in members]).to(device)
        out.append((x, txt, pooled, eps))
    return out


def folder_items(cfg, encoder, autoencoder, num_stages: int, n: int):
    """(pixels or latents (1, C, H, W), caption or (txt, pooled)) of the first n items of --val-data: an image
    folder (captions beside the images) or a cache made by `python -m datafeed cache`."""
    root = Path(cfg.val_data)
    sizes = bucket_set(cfg.resolution, autoencoder.factor * nami.size_multiple(num_stages)) if cfg.buckets else None
    if (root / "cache.json").is_file():
        key = cache_key(encoder, autoencoder, cache_dtype(root), cfg.resolution, num_stages, sizes)
        dataset = CachedDataset(root, key)
        for i in range(min(n, len(dataset))):
            item = dataset[i]
            yield item["latent"].float().unsqueeze(0), (item["txt"].float(), item["pooled"].float())
    else:
        dataset = FolderDataset(root, cfg.resolution, num_stages, progress=False, seed=cfg.seed, bucket_sizes=sizes)
        for i in range(min(n, len(dataset))):
            item = dataset[i]
            yield item["image"].unsqueeze(0), item["caption"]


def text_of(captions: list, encoder, device):
    """Text states of captions (strings), or the cached (txt, pooled) pairs stacked."""
    if isinstance(captions[0], str):
        txt, pooled = encoder.encode(captions)
    else:
        txt, pooled = torch.stack([c[0] for c in captions]), torch.stack([c[1] for c in captions])
    return txt.to(device), pooled.to(device)


@torch.no_grad()
def validation_loss(model, bridge, groups, points: int = POINTS, start: str = "bridge", chunk: int = 32,
                    guidance: float | None = None) -> dict:
    """{k: [Eq. 4 of stage k at each of the t_points, averaged over the held-out samples]}, in the window's
    local units whatever the model predicts (nami.stage_velocity), the model in eval mode (put back after);
    guidance: a guidance-distilled model's input."""
    cfg = model.cfg
    windows, ranges = nami.stage_windows(cfg.window_ratios, cfg.gamma), nami.tau_ranges(cfg.window_ratios, cfg.gamma)
    K, was_training = cfg.num_stages, model.training
    model.eval()
    sums = {k: [0.0] * points for k in range(1, K + 1)}
    count = 0
    for x_full, txt, pooled, eps_full in groups:
        count += len(x_full)
        for i in range(0, len(x_full), chunk):
            rows = slice(i, i + chunk)
            jump = jump_for(bridge, windows, x_full[rows], eps_full[rows], cfg.jump_noise, start == "pyramid")
            for k in range(1, K + 1):
                x, eps = nami.image_pyramid(x_full[rows], K)[k - 1], nami.noise_pyramid(eps_full[rows], K)[k - 1]
                x_s, x_e = nami.stage_points(x, eps, k, windows, jump)
                for j, t in enumerate(t_points(points)):
                    t_batch = torch.full((len(x),), t, device=x.device)
                    v = model(nami.interpolate(x_s, x_e, t_batch), nami.stage_tau(t_batch, ranges[k - 1]),
                              txt[rows], pooled[rows], k, None if guidance is None else torch.full_like(t_batch, guidance))
                    v = nami.stage_velocity(v.float(), windows[k - 1], cfg.velocity)
                    sums[k][j] += nami.flow_loss(v, nami.flow_target(x_s, x_e)).item() * len(x)
    model.train(was_training)
    return {k: [s / count for s in per_t] for k, per_t in sums.items()}


def summary(per_t: dict, weights=None) -> dict:
    """The log's fields: val_loss_stage{k}, the mean over t', and val_loss, their w_k-weighted sum (Eq. 4)."""
    means = {k: sum(v) / len(v) for k, v in per_t.items()}
    weights = weights or [1.0] * len(means)
    return {"val_loss": sum(weights[k - 1] * m for k, m in means.items()),
            **{f"val_loss_stage{k}": m for k, m in means.items()}}
