"""NAMI: Bridged Progressive Rectified Flow Transformers (Ma et al., 2025) in plain PyTorch.

This file holds the method, top to bottom: 1. NamiConfig and PRESETS (paper Table 1); 2. the flow mathematics as
small pure functions (Eq. 1-4, §3.2); 3. the progressive FLUX-style MM-DiT (§3.2, §4.1); 4. the progressive Euler
sampler with classifier-free guidance (§3.5); 5. ours, not the paper's: the jump noise. It
imports nothing of ours: BridgeFlow and the text encoder reach the sampler as arguments; Algorithm 1 is train.py.

Notation, where it differs from the paper (the whole table: docs/method.md). Time follows Eq. 1-2, x_t = t·ε + (1−t)·x
with t = 1 the noise: the paper's x_0 (noise) and x_1 (data) are ε and x here. Stage 1, the coarsest, sits at the
noise: windows run [s_k → e_k] from 1 = σ_0 > σ_1 > … > σ_K = 0 (the paper's [t_(k−1), t_k] with t_K = 1), s_k and e_k
are times (the paper's x̂_(s_k), x̂_(e_k) are the points there), t' ∈ [0, 1] is local to a window (1 at its start), and
the network sees the global time τ(k, t'), not t'. Down halves VAE latents (the paper: images); stage k's side is
side / 2^(K−k). The paper's modules m_k of MM-DiT blocks are here double-stream blocks, then single-stream ones.
Latents are unpacked (B, C, H, W); the model packs 2×2 patches only inside its forward.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint  # [ours] activation checkpointing (Nami.run_block)

# ----------------------------------------------------------------------------------------------
# 1. Configuration and presets
# ----------------------------------------------------------------------------------------------

@dataclass
class NamiConfig:
    hidden_size: int = 192
    num_heads: int = 3
    depth_double: int = 2             # MM-DiT (double-stream) blocks, all run at every stage
    depth_single: int = 6             # single-stream blocks, stage k runs the first cuts[k-1]
    cuts: tuple = (2, 4, 6)           # cut points over the single blocks, one per stage
    in_channels: int = 3              # unpacked latent channels C (16: FLUX VAE, 3: pixels)
    patch_size: int = 2
    joint_attention_dim: int = 384    # text token states (mT5-XXL: 4096, MiniLM: 384)
    pooled_projection_dim: int = 384  # pooled text vector (mCLIP: 1024, MiniLM: 384)
    axes_dim: tuple = (16, 24, 24)    # RoPE dims per axis (frame, row, col); sums to head dim
    theta: int = 10000
    mlp_ratio: float = 4.0
    window_ratios: tuple = (1, 1, 1)  # lengths of the K original time windows, stage 1 first
    gamma: float = 1 / 3              # Pyramid Flow's corrected-start constant
    jump_noise: bool = False          # [ours] fine noise added at each jump (with_jump_noise); release: off
    velocity: str = "local"           # what the network predicts (stage_velocity): release "local"; [ours] "global"
    guidance_embeds: bool = False     # FLUX.1-dev's distilled guidance as an input (TimeTextEmbed); release: none
    MAX_BLOCKS = 1000  # [ours] per kind (not a field): far above any published model (FLUX.1: 19 double + 38 single)

    def __post_init__(self):
        self.cuts, self.axes_dim = tuple(int(c) for c in self.cuts), tuple(int(a) for a in self.axes_dim)
        self.window_ratios = tuple(float(r) for r in self.window_ratios)
        problems = []
        if self.hidden_size % self.num_heads:
            problems.append(f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}")
        elif sum(self.axes_dim) != self.hidden_size // self.num_heads or any(a % 2 for a in self.axes_dim):
            problems.append(f"axes_dim {self.axes_dim} must be even and sum to the head dim "
                            f"{self.hidden_size // self.num_heads}")
        if len(self.cuts) != len(self.window_ratios):
            problems.append(f"{len(self.cuts)} cut points for {len(self.window_ratios)} stages: "
                            "give one cut point per stage (--cuts) or change --window-ratios")
        if list(self.cuts) != sorted(self.cuts) or not all(1 <= c <= self.depth_single for c in self.cuts):
            problems.append(f"cut points {self.cuts} must be non-decreasing within 1..{self.depth_single}")
        elif self.cuts[-1] != self.depth_single:
            problems.append(f"the last cut point must be depth_single={self.depth_single} "
                            f"(the last stage runs the whole model), got {self.cuts}")
        if self.velocity not in VELOCITIES:
            problems.append(f"velocity must be one of {VELOCITIES}, got {self.velocity!r}")
        if any(r <= 0 for r in self.window_ratios):
            problems.append(f"window ratios must be positive, got {self.window_ratios}")
        if not (0 <= self.depth_double <= self.MAX_BLOCKS and 1 <= self.depth_single <= self.MAX_BLOCKS):  # [ours]
            problems.append(f"{self.depth_double} double and {self.depth_single} single blocks: at most "
                            f"{self.MAX_BLOCKS} of each (a config file claiming more is damaged or crafted)")
        if problems:
            raise ValueError("invalid NamiConfig: " + "; ".join(problems))

    @property
    def num_stages(self) -> int:
        return len(self.window_ratios)

    @property
    def size_multiple(self) -> int:
        """Image (latent) sides must be multiples of this: patch · 2^(K−1)."""
        return size_multiple(self.num_stages, self.patch_size)

    def to_dict(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, d: dict) -> "NamiConfig":
        return cls(**{k: v for k, v in d.items() if k in {f.name for f in fields(cls)}})


# Paper Table 1; the double/single split of 2B is the release's, 0.6B follows the same rule. flux1-dev: FLUX.1-dev's
# shape (T5-XXL states, CLIP-L pooled, guidance-distilled) with release.config_from_diffusers' cuts, to convert it.
# The small presets are ours, sized for a 2-core CPU and the built-in shapes data (pixels, C=3).
PRESETS: dict[str, dict] = {
    "2b": dict(hidden_size=2048, num_heads=16, depth_double=8, depth_single=14, cuts=(1, 8, 14),
               in_channels=16, joint_attention_dim=4096, pooled_projection_dim=1024, axes_dim=(16, 56, 56)),
    "0.6b": dict(hidden_size=1536, num_heads=12, depth_double=4, depth_single=8, cuts=(1, 5, 8),
                 in_channels=16, joint_attention_dim=4096, pooled_projection_dim=1024, axes_dim=(16, 56, 56)),
    "flux1-dev": dict(hidden_size=3072, num_heads=24, depth_double=19, depth_single=38, cuts=(13, 25, 38),
                      in_channels=16, joint_attention_dim=4096, pooled_projection_dim=768, axes_dim=(16, 56, 56),
                      guidance_embeds=True),
    # CPU presets (text dims of all-MiniLM-L6-v2); mini: results/recipes.md's smaller model; toy: the
    # default run's, for 4×16×16 latents of the tiny shapes VAE (one double block: stage 1 is cheap)
    "small": dict(hidden_size=192, num_heads=3, depth_double=2, depth_single=6, cuts=(2, 4, 6), axes_dim=(16, 24, 24)),
    "mini": dict(hidden_size=128, num_heads=2, depth_double=2, depth_single=6, cuts=(2, 4, 6), axes_dim=(16, 24, 24)),
    "base": dict(hidden_size=256, num_heads=4, depth_double=2, depth_single=8, cuts=(2, 5, 8), axes_dim=(16, 24, 24)),
    "toy": dict(hidden_size=128, num_heads=2, depth_double=1, depth_single=8, cuts=(1, 4, 8), axes_dim=(16, 24, 24)),
    "tiny": dict(hidden_size=64, num_heads=2, depth_double=1, depth_single=3, cuts=(1, 2, 3), axes_dim=(8, 12, 12)),
}


def get_config(name: str, **overrides) -> NamiConfig:
    """A preset by name, with fields replaced by `overrides` (None values are ignored)."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
    kw = dict(PRESETS[name])
    kw.update({k: v for k, v in overrides.items() if v is not None})
    return NamiConfig(**kw)


# ----------------------------------------------------------------------------------------------
# 2. Flow mathematics (pure functions shared by model, trainer, sampler and tests)
# ----------------------------------------------------------------------------------------------

def window_boundaries(ratios=(1, 1, 1)) -> list[float]:
    """Original boundaries 1 = σ_0 > σ_1 > … > σ_K = 0, stage lengths ∝ ratios (paper Fig. 8)."""
    total = float(sum(ratios))
    return [1.0] + [1.0 - sum(ratios[:k]) / total for k in range(1, len(ratios))] + [0.0]


def corrected_start(sigma: float, gamma: float = 1 / 3) -> float:
    """Pyramid Flow's corrected start of a stage whose window begins at σ: the jump to a finer
    grid re-introduces noise. s = 1 − o / (sqrt(1 + 1/γ)·(1 − o) + o),  o = 1 − σ."""
    o = 1.0 - sigma
    return 1.0 - o / (math.sqrt(1.0 + 1.0 / gamma) * (1.0 - o) + o)


def stage_windows(ratios=(1, 1, 1), gamma: float = 1 / 3) -> list[tuple[float, float]]:
    """[(s_k, e_k)] for k = 1..K: the time at which stage k starts and ends (docs/method.md §2)."""
    sigmas = window_boundaries(ratios)
    return [(1.0 if k == 1 else corrected_start(sigmas[k - 1], gamma), sigmas[k]) for k in range(1, len(ratios) + 1)]


def tau_ranges(ratios=(1, 1, 1), gamma: float = 1 / 3) -> list[tuple[float, float]]:
    """[(b_k, a_k)]: the global-time interval of stage k, split ∝ window lengths L_k = s_k − e_k."""
    lengths = [s - e for s, e in stage_windows(ratios, gamma)]
    total, top, ranges = sum(lengths), 1.0, []
    for length in lengths:
        bottom = top - length / total
        ranges.append((top, bottom))
        top = bottom
    ranges[-1] = (ranges[-1][0], 0.0)
    return ranges


def stage_tau(t_local, tau_range):
    """τ = a_k + t'·(b_k − a_k): the global time the model sees at local time t' of stage k."""
    b, a = tau_range
    return a + t_local * (b - a)


def down(x: torch.Tensor) -> torch.Tensor:
    """Down(x): 2× bilinear downsampling (of latents; the paper: images), for a factor of 2 a 2×2 average pooling."""
    return F.avg_pool2d(x, 2)


def up(x: torch.Tensor) -> torch.Tensor:
    """Up(x): 2× nearest-neighbour upsampling."""
    return F.interpolate(x, scale_factor=2, mode="nearest")


def image_pyramid(x: torch.Tensor, num_stages: int) -> list[torch.Tensor]:
    """[x^(1), …, x^(K)] with x^(K) = x and x^(k−1) = Down(x^(k))."""
    levels = [x]
    for _ in range(num_stages - 1):
        levels.insert(0, down(levels[0]))
    return levels


def noise_pyramid(eps: torch.Tensor, num_stages: int) -> list[torch.Tensor]:
    """Coupled noise [ε_1, …, ε_K] with ε_K = eps and ε_(k−1) = 2·Down(ε_k) (unit variance)."""
    levels = [eps]
    for _ in range(num_stages - 1):
        levels.insert(0, 2.0 * down(levels[0]))
    return levels


def stage_endpoint(x_k: torch.Tensor, eps_k: torch.Tensor, e_k: float) -> torch.Tensor:
    """End point of stage k: x̂_e = e_k·ε_k + (1 − e_k)·x^(k)  (for k = K, e_K = 0: the data)."""
    return e_k * eps_k + (1.0 - e_k) * x_k


def pyramid_start(x_prev: torch.Tensor, eps_k: torch.Tensor, s_k: float) -> torch.Tensor:
    """Pyramid Flow's analytic start of stage k: x̂_s = s_k·ε_k + (1 − s_k)·Up(x^(k−1))."""
    return s_k * eps_k + (1.0 - s_k) * up(x_prev)


def interpolate(x_s: torch.Tensor, x_e: torch.Tensor, t) -> torch.Tensor:
    """Eq. 3: x̂_t = t'·x̂_s + (1 − t')·x̂_e, t' ∈ [0, 1] in every window (the paper: [t_(k−1), t_k]), per sample."""
    if torch.is_tensor(t) and t.ndim == 1:
        t = t.view(-1, *([1] * (x_s.ndim - 1)))
    return t * x_s + (1.0 - t) * x_e


def flow_target(x_s: torch.Tensor, x_e: torch.Tensor) -> torch.Tensor:
    """The velocity Eq. 4 regresses: dx̂_t/dt' = x̂_s − x̂_e."""
    return x_s - x_e


VELOCITIES = ("local", "global")


def stage_velocity(v: torch.Tensor, window, velocity: str = "local") -> torch.Tensor:
    """The local velocity x̂_s − x̂_e (Eq. 4's target, Eq. 1's v) from the network's output v at the window
    (s_k, e_k): "local", the release's, is v itself. [ours] "global": v is the path's velocity ε − x, which a flat
    model predicts; x̂_s − x̂_e ≈ (s_k − e_k)·(ε − x), so the local one is (s_k − e_k)·v (docs/method.md §10)."""
    return v if velocity == "local" else (window[0] - window[1]) * v


def logit_normal(n: int, generator=None, mean: float = 0.0, std: float = 1.0, device="cpu"):
    """t' ~ logit-normal(mean, std) as in SD3: sigmoid of a normal draw."""
    return torch.sigmoid(mean + std * torch.randn(n, generator=generator, device=device))


def flow_loss(v: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Eq. 4, one stage: mean ‖(x̂_s − x̂_e) − v_θk(x̂_t, t')‖² over batch and elements (v_θk is given τ, not t')."""
    return (target.float() - v.float()).pow(2).mean()


def euler_step(x: torch.Tensor, v: torch.Tensor, t: float, t_next: float) -> torch.Tensor:
    """Eq. 1 integrated by Euler: x ← x + (t_next − t)·v (t decreases from noise to data)."""
    return x + (t_next - t) * v


def stage_points(x, eps, k, windows, jump=None):
    """(x̂_s, x̂_e) of stage k for clean images x and noise eps, both at stage k's size. Algorithm 1, lines 7-13: the
    end point is the noised image at e_k; the start point is ε_1 for k = 1, else jump(x̂_e^(k−1), k): the end point of
    stage k−1 (from Down(x) and the coupled noise 2·Down(ε)) carried across the jump, by BridgeFlow(Up(·)) as the
    sampler carries it (jump=None: Up alone; bridgeflow.jump_for: the jumps of training, ours included)."""
    x_e = stage_endpoint(x, eps, windows[k - 1][1])
    if k == 1:
        return eps, x_e
    x_e_prev = stage_endpoint(down(x), 2.0 * down(eps), windows[k - 2][1])
    return (jump(x_e_prev, k) if jump is not None else up(x_e_prev)), x_e


def stage_size(size: int, num_stages: int, k: int) -> int:
    """Side of stage k for a full side `size` (pixels or latent cells): size / 2^(K−k) (the paper counts 2^k)."""
    return size // 2 ** (num_stages - k)


def stage_sizes(size: int, num_stages: int) -> list[int]:
    """[side of stage 1, …, side of stage K] = [size / 2^(K−1), …, size]."""
    return [stage_size(size, num_stages, k) for k in range(1, num_stages + 1)]


def size_multiple(num_stages: int, patch_size: int = 2) -> int:
    """Latent sides must be multiples of patch · 2^(K−1), so that every stage packs into patches."""
    return patch_size * 2 ** (num_stages - 1)


# ----------------------------------------------------------------------------------------------
# 3. The progressive MM-DiT (FLUX layout; module names follow diffusers' FluxTransformer2DModel)
# ----------------------------------------------------------------------------------------------

def patchify(x: torch.Tensor, p: int) -> torch.Tensor:
    """(B, C, H, W) -> (B, H/p·W/p, C·p·p), features ordered (c, ph, pw) as in FLUX."""
    B, C, H, W = x.shape
    x = x.view(B, C, H // p, p, W // p, p).permute(0, 2, 4, 1, 3, 5)  # (B, h, w, C, p, p)
    return x.reshape(B, (H // p) * (W // p), C * p * p)


def unpatchify(tokens: torch.Tensor, p: int, h: int, w: int) -> torch.Tensor:
    """(B, h·w, C·p·p) -> (B, C, h·p, w·p), the inverse of patchify."""
    B, _, D = tokens.shape
    C = D // (p * p)
    x = tokens.view(B, h, w, C, p, p).permute(0, 3, 1, 4, 2, 5)  # (B, C, h, p, w, p)
    return x.reshape(B, C, h * p, w * p)


def timestep_embedding(t: torch.Tensor, dim: int = 256, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding [cos, sin] of t (FLUX feeds τ·1000)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


def rope(ids: torch.Tensor, axes_dim, theta: int) -> torch.Tensor:
    """3-axis rotary embedding: ids (L, 3) -> (L, head_dim/2, 2), the cosine and sine of pos·ω for
    each adjacent feature pair (ω_j = θ^(−2j/dim) per axis, computed in float64 as FLUX does)."""
    angles = []
    for i, dim in enumerate(axes_dim):
        freqs = 1.0 / theta ** (torch.arange(0, dim, 2, dtype=torch.float64, device=ids.device) / dim)
        angles.append(ids[:, i].double()[:, None] * freqs[None])  # (L, dim/2)
    angles = torch.cat(angles, dim=-1).float()
    return torch.stack([angles.cos(), angles.sin()], dim=-1)


def apply_rope(x: torch.Tensor, pe: torch.Tensor) -> torch.Tensor:
    """Rotate adjacent feature pairs (x0, x1) of x (B, heads, L, hd) by their angles, in float32: (x0·cos − x1·sin,
    x0·sin + x1·cos), FLUX's pairing; real-valued, so that torch.compile and FSDP2 need no complex tensors."""
    x0, x1 = x.float().unflatten(-1, (-1, 2)).unbind(-1)  # (B, heads, L, hd/2) each
    cos, sin = pe.unbind(-1)                               # (L, hd/2) each
    return torch.stack([x0 * cos - x1 * sin, x0 * sin + x1 * cos], dim=-1).flatten(-2).type_as(x)


def image_ids(h: int, w: int, device=None) -> torch.Tensor:
    """RoPE positions (0, row, col) on the current stage's token grid, (h·w, 3)."""
    rows = torch.arange(h, device=device).repeat_interleave(w)
    cols = torch.arange(w, device=device).repeat(h)
    return torch.stack([torch.zeros_like(rows), rows, cols], dim=-1)


class RMSNorm(nn.Module):
    """Query/key normalisation (QK RMSNorm), computed in float32."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps, self.weight = eps, nn.Parameter(torch.ones(dim))

    def forward(self, x):
        return F.rms_norm(x.float(), self.weight.shape, self.weight.float(), self.eps).type_as(x)


def modulate(x, shift, scale):
    """adaLN: LayerNorm(x)·(1 + scale) + shift, per sample (a LayerNorm without affine parameters: adaLN's)."""
    return torch.addcmul(shift[:, None], F.layer_norm(x, x.shape[-1:], eps=1e-6), 1 + scale[:, None])


class AdaNorm(nn.Module):
    """adaLN modulation: silu(vec) -> n_chunks vectors of width dim (the silu is applied once
    in Nami.forward). diffusers' AdaLayerNormZero(Single)/Continuous keep their weights in .linear."""

    def __init__(self, dim: int, n_chunks: int):
        super().__init__()
        self.linear = nn.Linear(dim, n_chunks * dim)

    def forward(self, vec_act):
        return self.linear(vec_act).chunk(self.linear.out_features // self.linear.in_features, dim=-1)


class GELUProj(nn.Module):
    def __init__(self, dim_in: int, dim_out: int):
        super().__init__()
        self.proj = nn.Linear(dim_in, dim_out)

    def forward(self, x):
        return F.gelu(self.proj(x), approximate="tanh")


class FeedForward(nn.Module):
    """Linear -> GELU(tanh) -> Linear; as a list so that keys read ff.net.0.proj / ff.net.2."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.net = nn.ModuleList([GELUProj(dim, hidden), nn.Identity(), nn.Linear(hidden, dim)])

    def forward(self, x):
        return self.net[2](self.net[0](x))


class Attention(nn.Module):
    """Multi-head attention with QK RMSNorm and RoPE. With `joint=True` it also holds the
    text stream's projections (double blocks); single blocks have no output projection here."""

    def __init__(self, dim: int, heads: int, joint: bool):
        super().__init__()
        self.heads, head_dim = heads, dim // heads
        self.to_q, self.to_k, self.to_v = nn.Linear(dim, dim), nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.norm_q, self.norm_k = RMSNorm(head_dim), RMSNorm(head_dim)
        if joint:
            self.add_q_proj, self.add_k_proj, self.add_v_proj = (nn.Linear(dim, dim) for _ in range(3))
            self.norm_added_q, self.norm_added_k = RMSNorm(head_dim), RMSNorm(head_dim)
            self.to_out = nn.ModuleList([nn.Linear(dim, dim)])
            self.to_add_out = nn.Linear(dim, dim)

    def _heads(self, x):
        return x.unflatten(-1, (self.heads, -1)).transpose(1, 2)  # (B, L, D) -> (B, heads, L, hd)

    def attend(self, q, k, v, pe):
        q, k = apply_rope(q, pe), apply_rope(k, pe)
        out = F.scaled_dot_product_attention(q, k, v)  # (B, heads, L, hd)
        return out.transpose(1, 2).flatten(2)           # (B, L, D)

    def forward(self, x, pe):
        """Single-stream: x is [txt; img] (B, L, D)."""
        q = self.norm_q(self._heads(self.to_q(x)))
        k = self.norm_k(self._heads(self.to_k(x)))
        return self.attend(q, k, self._heads(self.to_v(x)), pe)

    def joint(self, img, txt, pe):
        """Double-stream: separate projections per stream, one attention over [txt; img]."""
        q = torch.cat([self.norm_added_q(self._heads(self.add_q_proj(txt))),
                       self.norm_q(self._heads(self.to_q(img)))], dim=2)
        k = torch.cat([self.norm_added_k(self._heads(self.add_k_proj(txt))),
                       self.norm_k(self._heads(self.to_k(img)))], dim=2)
        v = torch.cat([self._heads(self.add_v_proj(txt)), self._heads(self.to_v(img))], dim=2)
        out = self.attend(q, k, v, pe)
        n_txt = txt.shape[1]
        return self.to_out[0](out[:, n_txt:]), self.to_add_out(out[:, :n_txt])


class DoubleStreamBlock(nn.Module):
    """MM-DiT block: image and text keep their own weights and meet in one joint attention."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float):
        super().__init__()
        self.norm1, self.norm1_context = AdaNorm(dim, 6), AdaNorm(dim, 6)
        self.attn = Attention(dim, heads, joint=True)
        self.ff = FeedForward(dim, int(dim * mlp_ratio))
        self.ff_context = FeedForward(dim, int(dim * mlp_ratio))

    def forward(self, img, txt, vec_act, pe):
        # modulation chunks are (shift, scale, gate) for attention, then for the MLP
        img_shift, img_scale, img_gate, img_shift2, img_scale2, img_gate2 = self.norm1(vec_act)
        txt_shift, txt_scale, txt_gate, txt_shift2, txt_scale2, txt_gate2 = self.norm1_context(vec_act)
        img_attn, txt_attn = self.attn.joint(modulate(img, img_shift, img_scale),
                                             modulate(txt, txt_shift, txt_scale), pe)
        img = img + img_gate[:, None] * img_attn
        img = img + img_gate2[:, None] * self.ff(modulate(img, img_shift2, img_scale2))
        txt = txt + txt_gate[:, None] * txt_attn
        txt = txt + txt_gate2[:, None] * self.ff_context(modulate(txt, txt_shift2, txt_scale2))
        return img, txt


class SingleStreamBlock(nn.Module):
    """FLUX single-stream block: attention and MLP in parallel on the joined [txt; img] tokens."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float):
        super().__init__()
        hidden = int(dim * mlp_ratio)
        self.norm = AdaNorm(dim, 3)
        self.proj_mlp = nn.Linear(dim, hidden)
        self.proj_out = nn.Linear(dim + hidden, dim)
        self.attn = Attention(dim, heads, joint=False)

    def forward(self, x, vec_act, pe):
        shift, scale, gate = self.norm(vec_act)
        h = modulate(x, shift, scale)
        mlp = F.gelu(self.proj_mlp(h), approximate="tanh")
        # proj_out acts on [attn; mlp]: two matmuls on the halves of its weight spare the concat
        D, W = x.shape[-1], self.proj_out.weight
        out = F.linear(self.attn(h, pe), W[:, :D]) + F.linear(mlp, W[:, D:], self.proj_out.bias)
        return torch.addcmul(x, gate[:, None], out)


class MLPEmbedder(nn.Module):
    def __init__(self, dim_in: int, dim: int):
        super().__init__()
        self.linear_1, self.linear_2 = nn.Linear(dim_in, dim), nn.Linear(dim, dim)

    def forward(self, x):
        return self.linear_2(F.silu(self.linear_1(x)))


class TimeTextEmbed(nn.Module):
    """vec = time_embed(τ·1000) + pooled_text_embed (the release); a guidance-distilled FLUX (FLUX.1-dev) adds
    guidance_embed(g·1000), the guidance scale g given as an input instead of classifier-free guidance."""

    def __init__(self, dim: int, pooled_dim: int, guidance_embeds: bool = False):
        super().__init__()
        self.timestep_embedder = MLPEmbedder(256, dim)
        self.guidance_embedder = MLPEmbedder(256, dim) if guidance_embeds else None
        self.text_embedder = MLPEmbedder(pooled_dim, dim)

    def forward(self, tau, pooled, guidance=None):
        # τ·1000 and its sinusoid in float32 whatever the weights' dtype: in bf16 τ·1000 would be
        # off by up to 2, against Euler steps of 33 (10 per stage)
        vec = self.timestep_embedder(timestep_embedding(tau.float() * 1000.0).to(pooled.dtype))
        if self.guidance_embedder is not None:
            vec = vec + self.guidance_embedder(timestep_embedding(guidance.float() * 1000.0).to(pooled.dtype))
        return vec + self.text_embedder(pooled)


class Nami(nn.Module):
    """The progressive MM-DiT: all double blocks, then the first c_k single blocks at stage k,
    then one shared output head. θ_k = m_1 ⊕ … ⊕ m_k (paper §3.2)."""

    def __init__(self, cfg: NamiConfig):
        super().__init__()
        self.cfg = cfg
        D, p = cfg.hidden_size, cfg.patch_size
        self.x_embedder = nn.Linear(cfg.in_channels * p * p, D)
        self.context_embedder = nn.Linear(cfg.joint_attention_dim, D)
        self.time_text_embed = TimeTextEmbed(D, cfg.pooled_projection_dim, cfg.guidance_embeds)
        self.transformer_blocks = nn.ModuleList(
            DoubleStreamBlock(D, cfg.num_heads, cfg.mlp_ratio) for _ in range(cfg.depth_double))
        self.single_transformer_blocks = nn.ModuleList(
            SingleStreamBlock(D, cfg.num_heads, cfg.mlp_ratio) for _ in range(cfg.depth_single))
        self.norm_out = AdaNorm(D, 2)  # chunks are (scale, shift), unlike the blocks
        self.proj_out = nn.Linear(D, cfg.in_channels * p * p)
        self._pe_cache: dict = {}
        self.checkpointing = self.compiled = False  # [ours] per-block activation checkpointing; parallel.compile_blocks
        if not self.x_embedder.weight.is_meta:  # on the meta device: train.py materialises it later
            self.initialize_weights()

    def initial_values(self):
        """(name, value) of each parameter at initialisation, one at a time, on the CPU, as DiT: Xavier-uniform
        linears, zero biases, adaLN and output head zero (blocks start as identities, v = 0), unit RMSNorm scales."""
        zeroed = {id(self.proj_out)} | {id(m.linear) for m in self.modules() if isinstance(m, AdaNorm)}
        for prefix, module in self.named_modules():
            for name, param in module.named_parameters(recurse=False):
                value = torch.ones(param.shape) if isinstance(module, RMSNorm) else torch.zeros(param.shape)
                if isinstance(module, nn.Linear) and name == "weight" and id(module) not in zeroed:
                    nn.init.xavier_uniform_(value)
                elif isinstance(module, nn.Linear) and name == "weight":
                    nn.init.xavier_uniform_(value).zero_()  # drawn all the same: the RNG stream stays DiT's
                yield f"{prefix}.{name}" if prefix else name, value

    @torch.no_grad()
    def initialize_weights(self, fill=None):
        """Give every parameter its initial value; fill(param, value) copies it (FSDP2: parallel.fill_shard)."""
        fill = fill or (lambda param, value: param.copy_(value))
        for name, value in self.initial_values():
            fill(self.get_parameter(name), value)

    def blocks_run(self, stage: int | None) -> tuple[int, int]:
        """(double, single) blocks that stage k runs; stage=None is the full model."""
        n_single = self.cfg.depth_single if stage is None else self.cfg.cuts[stage - 1]
        return self.cfg.depth_double, n_single

    def positions(self, n_txt: int, h: int, w: int, device) -> torch.Tensor:
        """RoPE rotations of [txt; img] (text ids 0, image ids on h×w), cached per shape: the steps reuse them."""
        key = (n_txt, h, w, str(device))
        if key not in self._pe_cache:
            ids = torch.cat([torch.zeros(n_txt, 3, dtype=torch.long, device=device), image_ids(h, w, device)])
            self._pe_cache[key] = rope(ids, self.cfg.axes_dim, self.cfg.theta)
        return self._pe_cache[key]

    def run_block(self, block, *args):
        """A block. [ours] With checkpointing (and gradients needed) recomputed in backward, its activations not kept.
        Compiled, its batch dimension is dynamic (stage, micro-batch): one graph per stage resolution."""
        if self.compiled:
            for activation in args[:-1]:  # img, txt / tokens, vec: (B, ...); pe, the last, has no batch
                torch._dynamo.maybe_mark_dynamic(activation, 0)
        if self.checkpointing and torch.is_grad_enabled():
            return torch.utils.checkpoint.checkpoint(block, *args, use_reentrant=False)
        return block(*args)

    def forward(self, x, tau, txt, pooled, stage: int | None = None, guidance=None):
        """x (B, C, H, W) at the stage's size, tau (B,) in [0, 1], txt (B, L, joint_attention_dim),
        pooled (B, pooled_projection_dim), guidance (B,) for guidance_embeds -> velocity (B, C, H, W)."""
        B, C, H, W = x.shape
        p = self.cfg.patch_size
        if C != self.cfg.in_channels or H % p or W % p:
            raise ValueError(f"input {tuple(x.shape)} must have {self.cfg.in_channels} channels "
                             f"and sides divisible by the patch size {p}")
        if stage is not None and not 1 <= stage <= self.cfg.num_stages:
            raise ValueError(f"stage {stage} outside 1..{self.cfg.num_stages}")
        if (guidance is None) == self.cfg.guidance_embeds:
            raise ValueError("guidance (B,) is the input of guidance-distilled models (guidance_embeds), of no other")
        h, w = H // p, W // p
        dtype = self.x_embedder.weight.dtype  # bf16 for bf16 weights or FSDP2's bf16 compute; τ stays fp32
        img = self.x_embedder(patchify(x, p).to(dtype))                # (B, h·w, D)
        txt = self.context_embedder(txt.to(dtype))                     # (B, L, D)
        vec_act = F.silu(self.time_text_embed(tau, pooled.to(dtype), guidance))  # (B, D)
        pe = self.positions(txt.shape[1], h, w, x.device)
        n_double, n_single = self.blocks_run(stage)
        for block in self.transformer_blocks[:n_double]:
            img, txt = self.run_block(block, img, txt, vec_act, pe)
        tokens = torch.cat([txt, img], dim=1)
        for block in self.single_transformer_blocks[:n_single]:
            tokens = self.run_block(block, tokens, vec_act, pe)
        img = tokens[:, txt.shape[1]:]
        scale, shift = self.norm_out(vec_act)
        return unpatchify(self.proj_out(modulate(img, shift, scale)), p, h, w)  # from (B, h·w, C·p·p)


# ----------------------------------------------------------------------------------------------
# 4. Sampling (paper §3.5): progressive Euler with BridgeFlow at each jump, batched CFG
# ----------------------------------------------------------------------------------------------

def guided_velocity(model, x, tau, txt, pooled, txt_uncond=None, pooled_uncond=None, cfg: float = 1.0, stage=None):
    """Classifier-free guidance v = v_u + g·(v_c − v_u), the two halves in one batch."""
    if txt_uncond is None:
        return model(x, tau, txt, pooled, stage=stage)
    v_c, v_u = model(torch.cat([x, x]), torch.cat([tau, tau]), torch.cat([txt, txt_uncond]),
                     torch.cat([pooled, pooled_uncond]), stage=stage).chunk(2)
    return v_u + cfg * (v_c - v_u)


class StageGrid(NamedTuple):
    """One stage's Euler grid: local times t' 1 → 0 (step j: t[j] → t[j + 1]) and the τ of each of its n steps."""
    t: list
    tau: list


def uniform_grids(steps, ratios=(1, 1, 1), gamma: float = 1 / 3) -> list[StageGrid]:
    """Ours (docs/method.md §6; release.grids: the authors'): t' = linspace(1, 0, n_k+1), τ = a_k + t'·(b_k − a_k)."""
    grids = []
    for tau_range, n in zip(tau_ranges(ratios, gamma), steps):
        t = torch.linspace(1.0, 0.0, n + 1).tolist()
        grids.append(StageGrid(t, [stage_tau(t_j, tau_range) for t_j in t[:-1]]))
    return grids


@torch.no_grad()
def progressive_sample(velocity, eps, grids, bridge=None, on_stage_end=None, start=None):
    """Integrate the K-stage flow from noise to data; returns every stage's output. velocity(x, k, t', τ): v at
    stage k, local time t' (1 = window start, 0 = end), global time τ; grids: one StageGrid per stage. Stage 1
    starts at ε_1 of the full-size noise's coupled pyramid (one seed, one image, whatever the stage count); between
    stages x ← BridgeFlow_(k+1)(Up(x)) (bridge=None: Up alone). [ours] start=(k0, x̂_s): begin at stage k0 there."""
    K = len(grids)
    k0, x = start if start is not None else (1, noise_pyramid(eps, K)[0])
    if not 1 <= k0 <= K:
        raise ValueError(f"cannot start at stage {k0} of {K}")
    outputs = []
    for k in range(k0, K + 1):
        if k > k0:
            x = bridge(x, k) if bridge is not None else up(x)
        t, tau = grids[k - 1]
        for j in range(len(tau)):
            x = euler_step(x, velocity(x, k, t[j], tau[j]), t[j], t[j + 1])
        outputs.append(x)
        if on_stage_end is not None:
            on_stage_end(k, x)
    return outputs


def model_velocity(model, txt, pooled, txt_uncond=None, pooled_uncond=None, guidance: float = 1.0,
                   full_model: bool = False, windows=None):
    """progressive_sample's velocity(x, k, t', τ) for a Nami model: stage k's local velocity (windows: the plan's
    (s_k, e_k), for cfg.velocity "global") in float32. Guidance 1 skips the unconditional half, a guidance-distilled
    model takes g as its input instead; full_model runs every block ("flow only", flat)."""
    distilled = model.cfg.guidance_embeds
    if guidance == 1.0 or distilled:
        txt_uncond = pooled_uncond = None
    if windows is None and model.cfg.velocity != "local":
        raise ValueError("a model that predicts the global velocity needs the sampling plan's windows")

    def velocity(x, k, t, tau):
        tau, stage = torch.full((x.shape[0],), tau, device=x.device), None if full_model else k
        v = (model(x, tau, txt, pooled, stage, torch.full_like(tau, guidance)) if distilled else
             guided_velocity(model, x, tau, txt, pooled, txt_uncond, pooled_uncond, guidance, stage))
        return v.float() if windows is None else stage_velocity(v.float(), windows[k - 1], model.cfg.velocity)
    return velocity


DEFAULT_GUIDANCE = 3.0  # classifier-free guidance scale g of the release (10+10+10 steps, CFG 3)


def default_steps(num_stages: int, total: int = 30) -> list[int]:
    """Euler steps per stage when none are given: 30 in all (the release's 10+10+10), split evenly (flat: 30)."""
    return [total // num_stages + (k < total % num_stages) for k in range(num_stages)]


def sampling_plan(cfg: NamiConfig, steps, flat: bool = False, schedule=uniform_grids):
    """(windows, grids, full_model) of the NAMI sampler, or of the flat baseline: one window [1 → 0] with all
    sum(steps) steps and every block. schedule(steps, ratios, gamma): ours, or release.grids (docs/method.md §6)."""
    if flat or cfg.num_stages == 1:
        ratios, steps, full_model = (1.0,), [sum(steps)], True
    else:
        ratios, steps, full_model = cfg.window_ratios, list(steps), False
    if len(steps) != len(ratios):
        raise ValueError(f"{len(steps)} step counts for {len(ratios)} stages")
    return stage_windows(ratios, cfg.gamma), schedule(steps, ratios, cfg.gamma), full_model


@torch.no_grad()
def generate(model, encoder, prompts, seeds, height, width, steps, guidance=DEFAULT_GUIDANCE, negative="",
             bridge=None, flat=False, on_stage_end=None, start=None, schedule=uniform_grids):
    """Prompts -> images (B, C, H, W), one Gaussian draw ε_K per seed at the full size; flat=True and
    schedule: sampling_plan. [ours] start(eps, windows, bridge) -> (k, x̂_s): begin at stage k from x̂_s."""
    cfg = model.cfg
    device = next(model.parameters()).device
    txt, pooled = encoder.encode(list(prompts))
    txt_u, pooled_u = encoder.encode([negative] * len(prompts))
    eps = torch.stack([torch.randn(cfg.in_channels, height, width, generator=torch.Generator().manual_seed(int(s)))
                       for s in seeds]).to(device)
    windows, grids, full = sampling_plan(cfg, steps, flat, schedule)
    bridge = with_jump_noise(bridge, eps, windows) if cfg.jump_noise else bridge  # [ours] jump noise
    velocity = model_velocity(model, txt.to(device), pooled.to(device), txt_u.to(device), pooled_u.to(device),
                              guidance, full, windows)
    start = None if start is None else start(eps, windows, bridge)  # [ours] e.g. toyworld.judge.later_stage_start
    return progressive_sample(velocity, eps, grids, bridge, on_stage_end, start)


# ----------------------------------------------------------------------------------------------
# 5. Ours, not the paper's: the jump noise
# ----------------------------------------------------------------------------------------------

def with_jump_noise(bridge, eps: torch.Tensor, windows):
    """The jump bridge(x, k) (None: Up) plus s_k·(ε_k − Up(Down(ε_k))), the fine noise of Pyramid Flow's
    start that BridgeFlow cannot make (docs/method.md §8), ε_k of eps's pyramid (NamiConfig.jump_noise)."""
    pyramid = noise_pyramid(eps, len(windows))

    def jump(x, k):
        fine = pyramid[k - 1] - up(down(pyramid[k - 1]))
        return (bridge(x, k) if bridge is not None else up(x)) + windows[k - 1][0] * fine
    return jump

