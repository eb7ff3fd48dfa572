"""The samplers of nami.py beyond their equations (those are in test_nami.py): the uniform grid pinned
bit for bit to the loop it replaced, generate() from a later stage (the diagnostic of
`python -m experiments.eval --from-stage`), bf16 weights, and the default step counts.

    python -m pytest -q tests/test_sampling.py        # seconds
"""
from __future__ import annotations

import functools

import pytest
import torch
import torch.nn.functional as F

import bridgeflow
import nami
from conftest import randomize
from toyworld import judge


def sample_before_grids(model, eps, steps, bridge, conditioning, flat=False):
    """The sampler as it was before explicit grids (docs/method.md §6), written out: t' = linspace(1, 0, n + 1)
    in float32, τ = a_k + t'·(b_k − a_k), the velocity in one CFG batch, x ← x + (t'_next − t')·v."""
    cfg = model.cfg
    ratios, steps = ((1.0,), [sum(steps)]) if flat else (cfg.window_ratios, steps)
    ranges, K = nami.tau_ranges(ratios, cfg.gamma), len(ratios)
    x, outputs = nami.noise_pyramid(eps, K)[0], []
    for k in range(1, K + 1):
        if k > 1:
            x = bridge(x, k)
        grid = torch.linspace(1.0, 0.0, steps[k - 1] + 1).tolist()
        for t, t_next in zip(grid[:-1], grid[1:]):
            tau = torch.full((x.shape[0],), nami.stage_tau(t, ranges[k - 1]))
            v = nami.guided_velocity(model, x, tau, *conditioning, 3.0, None if flat else k).float()
            x = x + (t_next - t) * v
        outputs.append(x)
    return outputs


def test_uniform_grid_samples_bit_for_bit_as_the_sampler_before_grids():
    """Our checkpoints keep their sampler exactly: the uniform grid through sampling_plan, model_velocity
    and progressive_sample gives the same bits as the loop it replaced, NAMI and flat."""
    cfg = nami.get_config("tiny", joint_attention_dim=8, pooled_projection_dim=8)
    model = randomize(nami.Nami(cfg), seed=3).eval()
    g = torch.Generator().manual_seed(3)
    conditioning = (torch.randn(2, 4, 8, generator=g), torch.randn(2, 8, generator=g),
                    torch.randn(2, 4, 8, generator=g), torch.randn(2, 8, generator=g))
    eps = torch.randn(2, 3, 16, 16, generator=g)
    bridge = randomize(bridgeflow.BridgeFlow(3, [(4, 4), (8, 8), (16, 16)]), seed=4)
    with torch.no_grad():
        for flat in (False, True):
            _, grids, full = nami.sampling_plan(cfg, [3, 2, 2], flat)
            velocity = nami.model_velocity(model, *conditioning, 3.0, full)
            got = nami.progressive_sample(velocity, eps, grids, None if flat else bridge)
            want = sample_before_grids(model, eps, [3, 2, 2], bridge, conditioning, flat)
            assert len(got) == len(want) and all(torch.equal(a, b) for a, b in zip(got, want)), flat


def test_generate_from_a_later_stage_starts_at_the_noised_real_image():
    """Eq. 3's end point of stage k−1 for the real image (coupled noise 2·Down(ε)), carried up:
    with no Euler step in the last stage, generate from judge.later_stage_start at stage 3 returns exactly it."""
    cfg = nami.get_config("tiny", joint_attention_dim=8, pooled_projection_dim=8)
    model = nami.Nami(cfg).eval()

    class Encoder:
        def encode(self, prompts):
            return torch.zeros(len(prompts), 4, 8), torch.zeros(len(prompts), 8)

    clean = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(9)) * 2 - 1
    out = nami.generate(model, Encoder(), ["a", "b"], [11, 12], 16, 16, [1, 1, 0],
                        start=functools.partial(judge.later_stage_start, clean, 3))
    eps = torch.stack([torch.randn(3, 16, 16, generator=torch.Generator().manual_seed(s)) for s in (11, 12)])
    e2 = nami.stage_windows(cfg.window_ratios, cfg.gamma)[1][1]
    expected = nami.up(e2 * 2 * F.avg_pool2d(eps, 2) + (1 - e2) * F.avg_pool2d(clean, 2))
    assert len(out) == 1
    torch.testing.assert_close(out[-1], expected)
    with pytest.raises(ValueError, match="from_stage=2"):
        nami.generate(model, Encoder(), ["a"], [1], 16, 16, [1, 1, 1], flat=True,
                      start=functools.partial(judge.later_stage_start, clean[:1], 2))


def test_bf16_weights_sample_like_fp32_without_autocast():
    """Sampling on a GPU casts the weights to bf16 once (no autocast recasting fp32 weights every
    step): the model casts its inputs to its weights' dtype, keeps τ in float32, and the sampler
    integrates in float32."""
    cfg = nami.get_config("tiny", joint_attention_dim=8, pooled_projection_dim=8)
    model = randomize(nami.Nami(cfg), seed=3)
    txt, pooled = torch.randn(2, 5, 8), torch.randn(2, 8)
    _, grids, _ = nami.sampling_plan(cfg, [2, 2, 2])
    eps = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    outputs = {}
    for dtype in (torch.float32, torch.bfloat16):
        model.to(dtype)
        velocity = nami.model_velocity(model, txt, pooled, guidance=1.0)
        outputs[dtype] = nami.progressive_sample(velocity, eps, grids, bridge=None)[-1]
    assert outputs[torch.bfloat16].dtype == torch.float32
    error = (outputs[torch.bfloat16] - outputs[torch.float32]).abs().max() / outputs[torch.float32].abs().max()
    assert 0 < error < 0.05


def test_default_steps_give_every_sampler_the_same_30_steps():
    """A flat (K = 1) checkpoint must not be sampled with fewer steps than NAMI's 10+10+10."""
    assert nami.default_steps(3) == [10, 10, 10] and nami.default_steps(1) == [30]
    assert all(sum(nami.default_steps(k)) == 30 and max(nami.default_steps(k)) - min(nami.default_steps(k)) <= 1
               for k in range(1, 7))
