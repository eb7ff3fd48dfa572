"""BridgeFlow (paper §3.3): the learned map that carries the end of stage k−1 across the
upsampling jump to the start of stage k:  x̂_s = W_k · Up(x̂_e^(k−1)) + B_k.

As in the authors' release, W_k is one scalar per jump (`scale`, shape (K−1,)) and B_k a dense
bias map at stage k's latent size (`shift.{k−2}`, shape (1, C, H_k, W_k)); the state dict has the
release's keys. [ours] A bias map trained at one size is resized bilinearly for another size, so
any resolution works (the release only works at the size it was trained for); `per_channel=True`
keeps one bias per channel instead.

Pre-training (before the transformer, then frozen) minimises
    ‖ BridgeFlow_k(Up(x̂_e^(k−1))) − x̂_s^pyr(k) ‖²
with x̂_e^(k−1) = e_(k−1)·ε_(k−1) + (1 − e_(k−1))·x^(k−1) and x̂_s^pyr(k) = s_k·ε_k + (1 − s_k)·Up(x^(k−1)).
For a scalar W and a dense B this least-squares problem has a closed form (`closed_form`), which
the gradient version (`pretrain`, the paper's Adam) is tested against. `fit` [ours] computes that
minimum exactly over a stream of batches, from running sums: the same objective, solved, in a
tenth of the batches (the data feed, not the map, is what pre-training costs).
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from nami import image_pyramid, noise_pyramid, pyramid_start, stage_endpoint, up, with_jump_noise


class BridgeFlow(nn.Module):
    """One (scalar W_k, bias map B_k) per jump k = 2..K. forward(x, k) upsamples a stage-(k−1)
    end point and applies the affine map of jump k, at any size."""

    def __init__(self, channels: int, stage_sizes, per_channel: bool = False):
        """stage_sizes: [(H_k, W_k)] of the latent at stages k = 1..K (the training size)."""
        super().__init__()
        jumps = len(stage_sizes) - 1
        self.scale = nn.Parameter(torch.ones(jumps))
        self.shift = nn.ParameterList(
            nn.Parameter(torch.zeros(1, channels, *((1, 1) if per_channel else size)))
            for size in stage_sizes[1:])

    def forward(self, x: torch.Tensor, k: int) -> torch.Tensor:
        # x̂_s = W_k · Up(x̂_e^(k−1)) + B_k
        u = up(x)
        return self.scale[k - 2] * u + resize_bias(self.shift[k - 2], u.shape[-2:])


def resize_bias(bias: torch.Tensor, size) -> torch.Tensor:
    """A bias map B_k at another latent size, resized bilinearly [ours, docs/method.md §4]; a
    per-channel bias (1×1) is the same at every size."""
    if bias.shape[-1] > 1 and tuple(bias.shape[-2:]) != tuple(size):
        bias = F.interpolate(bias, size=tuple(size), mode="bilinear", align_corners=False)
    return bias


def bridge_pairs(x: torch.Tensor, eps: torch.Tensor, windows, k: int):
    """(Up-input, target) of jump k for clean full-size images x and noise eps (docs/method.md §4):
    input x̂_e^(k−1) (BridgeFlow upsamples it itself), target x̂_s^pyr(k)."""
    K = len(windows)
    xs, es = image_pyramid(x, K), noise_pyramid(eps, K)
    x_e_prev = stage_endpoint(xs[k - 2], es[k - 2], windows[k - 2][1])
    target = pyramid_start(xs[k - 2], es[k - 1], windows[k - 1][0])
    return x_e_prev, target


def closed_form(u: torch.Tensor, y: torch.Tensor):
    """Least squares min_{W, B} Σ ‖W·u + B − y‖² over a batch (N, C, H, W), scalar W, dense B:
    W = Σ (u − ū)(y − ȳ) / Σ (u − ū)²,  B = ȳ − W·ū  (means over the batch, per pixel)."""
    u, y = u.double(), y.double()
    u_mean, y_mean = u.mean(0, keepdim=True), y.mean(0, keepdim=True)
    W = ((u - u_mean) * (y - y_mean)).sum() / (u - u_mean).pow(2).sum()
    return W.float(), (y_mean - W * u_mean).float()


@torch.no_grad()
def fit(bridge: BridgeFlow, batches, windows, steps: int, progress=None):
    """Set every jump's (W_k, B_k) to the exact minimum of the pre-training MSE over `steps`
    batches (`batches(step)` returns (x, eps) at full size), as closed_form would over all of them
    at once: per jump, running float64 sums over the samples of u = Up(x̂_e^(k−1)), of the target y,
    of u² and of u·y, per pixel; then, with means per pixel (per channel for a per-channel bias),
    W = Σ (u − ū)(y − ȳ) / Σ (u − ū)² and B = ȳ − W·ū. Returns the MSE per jump on the last batch."""
    K = len(windows)
    if steps == 0:
        return []
    sums = [None] * (K - 1)  # per jump: [Σu, Σy, Σu², Σuy] over samples (C, H, W), and the count
    for step in range(steps):
        x, eps = batches(step)
        for k in range(2, K + 1):
            x_e_prev, y = bridge_pairs(x, eps, windows, k)
            u, y = up(x_e_prev).double(), y.double()
            # [ours] a batch of another aspect-ratio bucket is resized to the map's size (a per-channel map:
            # to the first batch's) before its sums are taken (docs/method.md §9)
            size = tuple((bridge.shift[k - 2] if bridge.shift[k - 2].shape[-1] > 1 else (sums[k - 2] or [u])[0]).shape[-2:])
            if u.shape[-2:] != size:
                u, y = (F.interpolate(v, size=size, mode="bilinear", align_corners=False, antialias=True) for v in (u, y))
            batch = [u.sum(0), y.sum(0), (u * u).sum(0), (u * y).sum(0), u.shape[0]]
            sums[k - 2] = batch if sums[k - 2] is None else [a + b for a, b in zip(sums[k - 2], batch)]
        if progress is not None:
            progress(step)
    for k in range(2, K + 1):
        su, sy, suu, suy, n = sums[k - 2]
        if bridge.shift[k - 2].shape[-1] == 1:  # one bias per channel: its mean runs over the pixels too
            n = n * su.shape[-2] * su.shape[-1]
            su, sy, suu, suy = (v.sum((1, 2), keepdim=True) for v in (su, sy, suu, suy))
        u_mean, y_mean = su / n, sy / n
        covariance, variance = (suy - n * u_mean * y_mean).sum(), (suu - n * u_mean ** 2).sum()
        W = covariance / variance if variance > 0 else torch.ones((), dtype=torch.float64)
        bridge.scale[k - 2] = W.float()
        bridge.shift[k - 2].copy_((y_mean - W * u_mean).float().expand_as(bridge.shift[k - 2][0]))
    bridge.requires_grad_(False)
    pairs = [bridge_pairs(x, eps, windows, k) for k in range(2, K + 1)]
    return [F.mse_loss(bridge(x_e_prev, k), target).item() for k, (x_e_prev, target) in enumerate(pairs, 2)]


def pretrain(bridge: BridgeFlow, batches, windows, steps: int, lr: float = 1e-3, progress=None):
    """Adam on the MSE of every jump; `batches(step)` returns (x, eps) at full size.
    Returns the last loss per jump."""
    opt = torch.optim.Adam(bridge.parameters(), lr=lr)
    K = len(windows)
    losses = []
    for step in range(steps):
        x, eps = batches(step)
        losses = []
        for k in range(2, K + 1):
            x_e_prev, target = bridge_pairs(x, eps, windows, k)
            losses.append(F.mse_loss(bridge(x_e_prev, k), target))
        opt.zero_grad(set_to_none=True)
        torch.stack(losses).sum().backward()
        opt.step()
        if progress is not None:
            progress(step, [l.item() for l in losses])
    bridge.requires_grad_(False)
    return [l.item() for l in losses]


def jump_for(bridge, windows, x, eps, jump_noise: bool = False, pyramid: bool = False):
    """The jump that nami.stage_points gives the start point of a stage by, for samples of clean full-size latents x
    and noise eps: BridgeFlow(Up(·)), the paper's (bridge=None: Up alone); [ours] plus the fine noise BridgeFlow cannot
    make (jump_noise: nami.with_jump_noise, docs/method.md §8); or, pyramid, Pyramid Flow's analytic start
    s_k·ε_k + (1 − s_k)·Up(x^(k−1)) whatever the end point it is handed (train.py --start pyramid)."""
    if pyramid:
        xs, noise = image_pyramid(x, len(windows)), noise_pyramid(eps, len(windows))
        return lambda x_e_prev, k: pyramid_start(xs[k - 2], noise[k - 1], windows[k - 1][0])
    return with_jump_noise(bridge, eps, windows) if jump_noise else bridge
