"""The method's executable documentation: read it next to the paper (and docs/method.md, whose sections
the headings below name), one test per equation. The time windows and τ ranges with their corrected
starts (§2), the progressive model against a diffusers FLUX transformer (§3), BridgeFlow against its
closed form (§4), the pyramids, Eq. 3 and Eq. 4 (§5), the samplers (§6), Algorithm 1's loss and stage
mix, the FLOP count (§7), and README's paper → code table. Everything else (the release's files,
training options, the command lines, bad input, scale-out) is tested next to its code in tests/.

    python -m pytest -q test_nami.py                  # this file (CPU, about a minute)
    python -m pytest -q test_nami.py tests/           # the whole suite
"""
from __future__ import annotations

import importlib
import json
import math
import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import bridgeflow
import nami
import train
from common import parallel
from conftest import TINY_FLUX, randomize, tiny_run
from datafeed import feed
from toyworld import shapes
from training import config, release

ROOT = Path(__file__).resolve().parent


def inputs(cfg: nami.NamiConfig, B=2, H=16, W=16, L=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(B, cfg.in_channels, H, W, generator=g), torch.rand(B, generator=g),
            torch.randn(B, L, cfg.joint_attention_dim, generator=g), torch.randn(B, cfg.pooled_projection_dim, generator=g))


# ---------------------------------------------------------------------------------------------
# docs/method.md §2: time windows and τ ranges
# ---------------------------------------------------------------------------------------------

def test_windows_and_tau_ranges_equal_spec_values():
    windows = nami.stage_windows((1, 1, 1), 1 / 3)
    expected = [(1.0, 2 / 3), (0.8, 1 / 3), (0.5, 0.0)]  # docs/method.md §2 for 1:1:1
    for (s, e), (s_ref, e_ref) in zip(windows, expected):
        assert s == pytest.approx(s_ref) and e == pytest.approx(e_ref)
    ranges = nami.tau_ranges((1, 1, 1), 1 / 3)
    assert ranges[0] == pytest.approx((1.0, 1 - (1 / 3) / 1.3))  # ≈ [1, 0.744]
    assert ranges[1] == pytest.approx((1 - (1 / 3) / 1.3, 0.5 / 1.3))  # ≈ [0.744, 0.385]
    assert ranges[2] == pytest.approx((0.5 / 1.3, 0.0))
    assert [round(b, 3) for b, _ in ranges] == [1.0, 0.744, 0.385]
    # other ratios: boundaries follow the ratios, the τ axis is split ∝ window lengths
    assert nami.window_boundaries((2, 1, 1)) == pytest.approx([1.0, 0.5, 0.25, 0.0])
    w = nami.stage_windows((2, 1, 1))
    lengths = [s - e for s, e in w]
    r = nami.tau_ranges((2, 1, 1))
    assert [b - a for b, a in r] == pytest.approx([L / sum(lengths) for L in lengths])
    # the flat baseline: one window [1 -> 0], τ = t'
    assert nami.stage_windows((1,)) == [(1.0, 0.0)] and nami.tau_ranges((1,)) == [(1.0, 0.0)]
    assert nami.stage_tau(0.25, (1.0, 0.0)) == 0.25
    assert nami.stage_tau(1.0, ranges[1]) == pytest.approx(ranges[1][0])
    assert nami.stage_tau(0.0, ranges[1]) == pytest.approx(ranges[1][1])


def test_corrected_start_formula():
    # s_k = 1 − o / (sqrt(1 + 1/γ)(1 − o) + o), o = 1 − σ_(k−1); γ = 1/3 gives sqrt(4) = 2
    sigma_prev = 0.6
    o = 1 - sigma_prev
    s = nami.stage_windows((2, 3), gamma=1 / 3)[1][0]
    assert s == pytest.approx(1 - o / (2 * (1 - o) + o))


# ---------------------------------------------------------------------------------------------
# docs/method.md §5: pyramids, end points, Eq. 3 and its target, logit-normal t', Eq. 4
# ---------------------------------------------------------------------------------------------

def test_coupled_noise_has_unit_variance_at_every_stage():
    eps = torch.randn(64, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    levels = nami.noise_pyramid(eps, 4)
    assert [l.shape[-1] for l in levels] == [8, 16, 32, 64]
    for level in levels:
        assert level.var().item() == pytest.approx(1.0, abs=0.03)
        assert level.mean().item() == pytest.approx(0.0, abs=0.03)
    # coupling: each level is 2·Down of the next
    torch.testing.assert_close(levels[1], 2 * F.avg_pool2d(levels[2], 2))


def test_stage_points_end_of_last_stage_is_data_and_start_of_first_is_noise():
    K, windows = 3, nami.stage_windows()
    g = torch.Generator().manual_seed(1)
    x, eps = torch.rand(2, 3, 16, 16, generator=g) * 2 - 1, torch.randn(2, 3, 16, 16, generator=g)
    xs, es = nami.image_pyramid(x, K), nami.noise_pyramid(eps, K)
    x_s, x_e = nami.stage_points(xs[2], es[2], 3, windows)
    torch.testing.assert_close(x_e, x)                    # e_K = 0: the data
    x_s, x_e = nami.stage_points(xs[0], es[0], 1, windows)
    torch.testing.assert_close(x_s, es[0])                # stage 1 starts at ε_1
    torch.testing.assert_close(x_e, (2 / 3) * es[0] + (1 / 3) * xs[0])
    # stage 2 starts at Up(end of stage 1) (identity bridge) or Pyramid Flow's analytic start
    x_s, _ = nami.stage_points(xs[1], es[1], 2, windows)
    torch.testing.assert_close(x_s, nami.up((2 / 3) * es[0] + (1 / 3) * xs[0]))
    x_s, _ = nami.stage_points(xs[1], es[1], 2, windows, bridgeflow.jump_for(None, windows, x, eps, pyramid=True))
    torch.testing.assert_close(x_s, 0.8 * es[1] + 0.2 * nami.up(xs[0]))
    # Down is 2×2 averaging and Up is nearest
    torch.testing.assert_close(nami.down(nami.up(xs[0])), xs[0])


def test_eq3_interpolation_and_its_velocity_target():
    g = torch.Generator().manual_seed(2)
    x_s, x_e = torch.randn(3, 3, 8, 8, generator=g), torch.randn(3, 3, 8, 8, generator=g)
    t = torch.tensor([0.0, 0.3, 1.0])
    x_t = nami.interpolate(x_s, x_e, t)
    torch.testing.assert_close(x_t[0], x_e[0])
    torch.testing.assert_close(x_t[2], x_s[2])
    torch.testing.assert_close(x_t[1], 0.3 * x_s[1] + 0.7 * x_e[1])
    # the target is dx̂_t/dt' (finite difference), i.e. x̂_s − x̂_e
    h = 1e-3
    deriv = (nami.interpolate(x_s, x_e, t + h) - nami.interpolate(x_s, x_e, t - h)) / (2 * h)
    torch.testing.assert_close(deriv, nami.flow_target(x_s, x_e), rtol=1e-3, atol=1e-3)


def test_logit_normal_and_loss():
    t = nami.logit_normal(200_000, torch.Generator().manual_seed(0))
    assert 0 < t.min() and t.max() < 1
    logit = torch.log(t / (1 - t))
    assert logit.mean().item() == pytest.approx(0, abs=0.01) and logit.std().item() == pytest.approx(1, abs=0.01)
    v, target = torch.zeros(2, 3), torch.tensor([[1.0, 2.0, 3.0], [0.0, 0.0, 0.0]])
    assert nami.flow_loss(v, target).item() == pytest.approx(14 / 6)


def test_global_velocity_is_the_path_velocity_scaled_to_the_window_and_weights_eq4_by_its_length_squared():
    """docs/method.md §10: with velocity="global" the network predicts ε − x and stage k's local velocity is
    (s_k − e_k)·v; Eq. 4 in local units is then (s_k − e_k)²·‖v − (x̂_s − x̂_e)/(s_k − e_k)‖². The path's
    velocity read this way is stage 1's target exactly (its start is ε_1, its end on the straight path)."""
    g = torch.Generator().manual_seed(4)
    x, eps, v = (torch.randn(2, 3, 8, 8, generator=g) for _ in range(3))
    windows = nami.stage_windows()
    for k, window in enumerate(windows, 1):
        length = window[0] - window[1]
        assert torch.equal(nami.stage_velocity(v, window, "local"), v)
        torch.testing.assert_close(nami.stage_velocity(v, window, "global"), length * v)
        target = nami.flow_target(*nami.stage_points(x, eps, k, windows))
        assert nami.flow_loss(nami.stage_velocity(v, window, "global"), target).item() == pytest.approx(
            length ** 2 * nami.flow_loss(v, target / length).item(), rel=1e-5)
    x_s, x_e = nami.stage_points(x, eps, 1, windows)
    torch.testing.assert_close(nami.stage_velocity(eps - x, windows[0], "global"), nami.flow_target(x_s, x_e))
    assert [round(1 / (s - e), 2) for s, e in windows] == [3.0, 2.14, 2.0]  # the factors a local reading is off by
    with pytest.raises(ValueError, match="velocity must be one of"):
        nami.get_config("tiny", velocity="path")


# ---------------------------------------------------------------------------------------------
# docs/method.md §3: the progressive model
# ---------------------------------------------------------------------------------------------

def test_stage_k_runs_exactly_the_blocks_up_to_its_cut_point():
    cfg = nami.get_config("tiny", depth_single=5, cuts=(1, 3, 5))
    model = randomize(nami.Nami(cfg))
    calls = []
    for i, b in enumerate(model.transformer_blocks):
        b.register_forward_hook(lambda m, a, o, i=i: calls.append(("double", i)))
    for i, b in enumerate(model.single_transformer_blocks):
        b.register_forward_hook(lambda m, a, o, i=i: calls.append(("single", i)))
    x, tau, txt, pooled = inputs(cfg)
    outs = {}
    for stage, cut in [(1, 1), (2, 3), (3, 5), (None, 5)]:
        calls.clear()
        outs[stage] = model(x, tau, txt, pooled, stage=stage)
        assert calls == [("double", 0)] + [("single", i) for i in range(cut)]
    assert outs[1].shape == x.shape
    assert not torch.allclose(outs[1], outs[2])
    torch.testing.assert_close(outs[3], outs[None])


def test_all_cut_points_at_the_end_equal_the_full_model():
    cfg = nami.get_config("tiny", cuts=(3, 3, 3))
    model = randomize(nami.Nami(cfg), seed=3)
    x, tau, txt, pooled = inputs(cfg, seed=3)
    full = model(x, tau, txt, pooled)
    for stage in (1, 2, 3):
        torch.testing.assert_close(model(x, tau, txt, pooled, stage=stage), full)


def test_untrained_model_predicts_zero_and_is_conditioned():
    cfg = nami.get_config("tiny")
    model = nami.Nami(cfg)
    x, tau, txt, pooled = inputs(cfg)
    assert model(x, tau, txt, pooled).abs().max() == 0  # DiT's zero init
    randomize(model)
    v1 = model(x, tau, txt, pooled)
    assert not torch.allclose(v1, model(x, tau * 0.5, txt, pooled))  # τ matters
    assert not torch.allclose(v1, model(x, tau, txt * 0.5, pooled))  # text matters


def test_rope_rotates_adjacent_pairs_by_position_times_frequency():
    axes = (2, 4, 2)
    ids = torch.tensor([[0, 3, 5], [0, 1, 2]])
    pe = nami.rope(ids, axes, theta=100)
    x = torch.randn(1, 1, 2, 8)
    out = nami.apply_rope(x, pe)
    # expected angle per pair: axis 0 (1 pair), axis 1 (2 pairs), axis 2 (1 pair); ω_j = θ^(−2j/dim)
    for pos in range(2):
        angles = [ids[pos, 0] * 1.0, ids[pos, 1] * 1.0, ids[pos, 1] * 100 ** (-2 / 4), ids[pos, 2] * 1.0]
        for j, a in enumerate(angles):
            x0, x1 = x[0, 0, pos, 2 * j], x[0, 0, pos, 2 * j + 1]
            c, s = math.cos(float(a)), math.sin(float(a))
            torch.testing.assert_close(out[0, 0, pos, 2 * j:2 * j + 2], torch.stack([x0 * c - x1 * s, x0 * s + x1 * c]))
    # a rotation keeps the norm of every pair
    torch.testing.assert_close(out.norm(dim=-1), x.norm(dim=-1))


def test_patchify_roundtrip_and_flux_packing_order():
    x = torch.arange(2 * 3 * 4 * 4, dtype=torch.float32).view(2, 3, 4, 4)
    tokens = nami.patchify(x, 2)
    assert tokens.shape == (2, 4, 12)
    # token 0 holds channel-major 2×2 patches: (c, ph, pw)
    torch.testing.assert_close(tokens[0, 0, :4], x[0, 0, :2, :2].flatten())
    torch.testing.assert_close(nami.unpatchify(tokens, 2, 2, 2), x)


def flux_param_count(D, heads, n_double, n_single, in_ch, joint, pooled, mlp=4, guidance=False):
    """Parameters of a diffusers FluxTransformer2DModel, counted from its architecture."""
    hd, H = D // heads, int(D * mlp)
    lin = lambda i, o: i * o + o
    double = 2 * lin(D, 6 * D) + 6 * lin(D, D) + 2 * lin(D, D) + 4 * hd + 2 * (lin(D, H) + lin(H, D))
    single = lin(D, 3 * D) + 3 * lin(D, D) + 2 * hd + lin(D, H) + lin(D + H, D)
    embed = lin(in_ch, D) + lin(joint, D) + (1 + guidance) * (lin(256, D) + lin(D, D)) + lin(pooled, D) + lin(D, D)
    return embed + n_double * double + n_single * single + lin(D, 2 * D) + lin(D, in_ch)


@pytest.mark.parametrize("name,expected", [("2b", 2.12e9), ("0.6b", 0.64e9), ("flux1-dev", 11.9e9)])
def test_parameter_counts_match_a_diffusers_flux_of_the_same_shape(name, expected):
    cfg = nami.get_config(name)
    with torch.device("meta"):
        model = nami.Nami(cfg)
    n = sum(p.numel() for p in model.parameters())
    assert n == pytest.approx(expected, rel=0.01)
    assert n == flux_param_count(cfg.hidden_size, cfg.num_heads, cfg.depth_double, cfg.depth_single,
                                 cfg.in_channels * 4, cfg.joint_attention_dim, cfg.pooled_projection_dim,
                                 guidance=cfg.guidance_embeds)
    diffusers = pytest.importorskip("diffusers")
    with torch.device("meta"):
        ref = diffusers.FluxTransformer2DModel(
            patch_size=1, in_channels=cfg.in_channels * 4, num_layers=cfg.depth_double,
            num_single_layers=cfg.depth_single, attention_head_dim=cfg.hidden_size // cfg.num_heads,
            num_attention_heads=cfg.num_heads, joint_attention_dim=cfg.joint_attention_dim,
            pooled_projection_dim=cfg.pooled_projection_dim, guidance_embeds=cfg.guidance_embeds, axes_dims_rope=cfg.axes_dim)
    assert n == sum(p.numel() for p in ref.parameters())
    assert set(model.state_dict()) == set(release.convert_diffusers_flux(ref.state_dict()))


def test_every_preset_is_a_valid_flux_layout_and_the_cpu_presets_grow_in_order():
    counts = {}
    for name in nami.PRESETS:
        cfg = nami.get_config(name)  # NamiConfig checks heads, RoPE axes and cut points
        with torch.device("meta"):
            counts[name] = sum(p.numel() for p in nami.Nami(cfg).parameters())
        assert counts[name] == flux_param_count(cfg.hidden_size, cfg.num_heads, cfg.depth_double, cfg.depth_single,
                                                cfg.in_channels * 4, cfg.joint_attention_dim,
                                                cfg.pooled_projection_dim, guidance=cfg.guidance_embeds), name
    assert counts["tiny"] < counts["mini"] < counts["small"] < counts["base"] < counts["0.6b"] < counts["2b"]


# ---------------------------------------------------------------------------------------------
# docs/method.md §6: sampling
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("schedule", sorted(release.SCHEDULES))
def test_progressive_sampler_with_exact_velocity_lands_on_each_stage_end_and_the_data(schedule):
    K, windows = 3, nami.stage_windows()
    grids = nami.sampling_plan(nami.NamiConfig(), [4, 3, 2], schedule=release.SCHEDULES[schedule])[1]
    g = torch.Generator().manual_seed(4)
    x_star, eps = torch.rand(2, 3, 16, 16, generator=g), torch.randn(2, 3, 16, 16, generator=g)
    xs, es = nami.image_pyramid(x_star, K), nami.noise_pyramid(eps, K)
    ends = [nami.stage_endpoint(xs[k], es[k], windows[k][1]) for k in range(K)]
    seen_t = []

    def velocity(x, k, t, tau):  # a point mass: the straight path from the current x to stage k's end
        seen_t.append((k, t))
        return (x - ends[k - 1]) / t

    outs = nami.progressive_sample(velocity, eps, grids)
    for out, end in zip(outs, ends):
        torch.testing.assert_close(out, end)
    torch.testing.assert_close(outs[-1], x_star)
    assert seen_t[0] == (1, 1.0) and [k for k, _ in seen_t] == [1] * 4 + [2] * 3 + [3] * 2
    # with zero velocity the sampler only carries ε_1 across the jumps
    grids = nami.sampling_plan(nami.NamiConfig(), [2, 2, 2], schedule=release.SCHEDULES[schedule])[1]
    outs = nami.progressive_sample(lambda x, k, t, tau: torch.zeros_like(x), eps, grids)
    torch.testing.assert_close(outs[-1], nami.up(nami.up(es[0])))
    bridge = bridgeflow.BridgeFlow(3, [(4, 4), (8, 8), (16, 16)])
    with torch.no_grad():
        bridge.scale.copy_(torch.tensor([2.0, 0.5]))
        bridge.shift[1].fill_(1.0)
    outs = nami.progressive_sample(lambda x, k, t, tau: torch.zeros_like(x), eps, grids, bridge)
    torch.testing.assert_close(outs[-1], 0.5 * nami.up(2.0 * nami.up(es[0])) + 1.0)
    # started at stage 2 (the diagnostic of experiments/eval.py --from-stage): stage 1 is never run
    seen_t.clear()
    grids = nami.sampling_plan(nami.NamiConfig(), [4, 3, 2], schedule=release.SCHEDULES[schedule])[1]
    outs = nami.progressive_sample(velocity, eps, grids, start=(2, nami.up(ends[0])))
    assert len(outs) == 2 and [k for k, _ in seen_t] == [2] * 3 + [3] * 2
    torch.testing.assert_close(outs[-1], x_star)
    with pytest.raises(ValueError, match="stage 4 of 3"):
        nami.progressive_sample(velocity, eps, grids, start=(4, x_star))


def test_flat_sampler_with_the_exact_velocity_of_a_gaussian_reproduces_it():
    mu, s = 0.7, 0.3  # data ~ N(mu, s²) per element; x_t = t·ε + (1 − t)·x

    def velocity(x, k, t, tau):  # E[ε − x | x_t]
        var = t ** 2 + (1 - t) ** 2 * s ** 2
        r = x - (1 - t) * mu
        return t * r / var - (mu + (1 - t) * s ** 2 * r / var)

    eps = torch.randn(1, 1, 200, 200, generator=torch.Generator().manual_seed(5))
    out = nami.progressive_sample(velocity, eps, nami.uniform_grids([200], (1.0,)))[-1]
    assert out.mean().item() == pytest.approx(mu, abs=0.01)
    assert out.std().item() == pytest.approx(s, abs=0.01)


def test_cfg_with_guidance_one_equals_the_conditional_velocity():
    cfg = nami.get_config("tiny")
    model = randomize(nami.Nami(cfg), seed=6)
    x, tau, txt, pooled = inputs(cfg, seed=6)
    g = torch.Generator().manual_seed(7)
    txt_u, pooled_u = torch.randn(txt.shape, generator=g), torch.randn(pooled.shape, generator=g)
    v_c = model(x, tau, txt, pooled, stage=2)
    v_u = model(x, tau, txt_u, pooled_u, stage=2)
    torch.testing.assert_close(nami.guided_velocity(model, x, tau, txt, pooled, txt_u, pooled_u, 1.0, 2), v_c,
                               rtol=1e-5, atol=1e-5)
    # the batched conditional + unconditional pass differs from two passes by float rounding,
    # which the guidance scale amplifies: 1e-4 (a wrong formula is off by O(1))
    torch.testing.assert_close(nami.guided_velocity(model, x, tau, txt, pooled, txt_u, pooled_u, 3.0, 2),
                               v_u + 3.0 * (v_c - v_u), rtol=1e-4, atol=1e-4)


# ---------------------------------------------------------------------------------------------
# docs/method.md §4: BridgeFlow
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("per_channel", [False, True])
def test_bridgeflow_least_squares_fit_is_the_exact_minimum_over_all_its_batches(per_channel):
    """bridgeflow.fit streams batches into running sums; its (W, B) must equal closed_form over the
    batches at once (dense bias), and be where the MSE's gradient vanishes (dense or per channel)."""
    windows = nami.stage_windows()
    g = torch.Generator().manual_seed(3)
    x = shapes.batch(0, 0, 24, 16)[0]
    eps = torch.randn(x.shape, generator=g)
    parts = [(x[i:i + 8], eps[i:i + 8]) for i in range(0, 24, 8)]
    bridge = bridgeflow.BridgeFlow(3, [(4, 4), (8, 8), (16, 16)], per_channel=per_channel)
    bridgeflow.fit(bridge, lambda step: parts[step], windows, steps=3)
    for k in (2, 3):
        x_e_prev, target = bridgeflow.bridge_pairs(x, eps, windows, k)
        if not per_channel:
            W, B = bridgeflow.closed_form(nami.up(x_e_prev), target)
            assert bridge.scale[k - 2].item() == pytest.approx(W.item(), abs=1e-5)
            torch.testing.assert_close(bridge.shift[k - 2], B, atol=1e-5, rtol=0)
        scale = bridge.scale[k - 2].detach().clone().requires_grad_(True)
        shift = bridge.shift[k - 2].detach().clone().requires_grad_(True)
        F.mse_loss(scale * nami.up(x_e_prev) + shift, target).backward()
        assert scale.grad.abs().item() < 1e-5 and shift.grad.abs().max().item() < 1e-6


def test_bridgeflow_gradient_training_matches_closed_form():
    windows = nami.stage_windows()
    g = torch.Generator().manual_seed(7)
    x = shapes.batch(0, 0, 64, 16)[0]
    eps = torch.randn(x.shape, generator=g)
    bridge = bridgeflow.BridgeFlow(3, [(4, 4), (8, 8), (16, 16)])
    bridgeflow.pretrain(bridge, lambda step: (x, eps), windows, steps=600, lr=0.03)
    for k in (2, 3):
        x_e_prev, target = bridgeflow.bridge_pairs(x, eps, windows, k)
        W, B = bridgeflow.closed_form(nami.up(x_e_prev), target)
        assert bridge.scale[k - 2].item() == pytest.approx(W.item(), abs=2e-3)
        torch.testing.assert_close(bridge.shift[k - 2].detach(), B, atol=5e-3, rtol=0)
        # the closed form is a minimum: perturbing it raises the loss
        best = F.mse_loss(W * nami.up(x_e_prev) + B, target)
        assert best < F.mse_loss((W + 0.05) * nami.up(x_e_prev) + B, target)
        assert best < F.mse_loss(W * nami.up(x_e_prev) + B + 0.05, target)
    # a bias map trained at one size serves another (resized bilinearly)
    assert bridge(torch.zeros(1, 3, 16, 16), 3).shape == (1, 3, 32, 32)
    assert dict(bridge.state_dict()).keys() == {"scale", "shift.0", "shift.1"}  # the release's keys


# ---------------------------------------------------------------------------------------------
# docs/method.md §3: the model is diffusers' FLUX transformer, cut after c_k single blocks
# ---------------------------------------------------------------------------------------------

def flux_velocity(flux, x, tau, txt, pooled, guidance=None):
    """diffusers' FluxTransformer2DModel on our unpacked inputs: 2×2 packing, ids (0, row, col)."""
    B, C, H, W = x.shape
    out = flux(hidden_states=nami.patchify(x, 2), encoder_hidden_states=txt, pooled_projections=pooled,
               timestep=tau, img_ids=nami.image_ids(H // 2, W // 2).float(), txt_ids=torch.zeros(txt.shape[1], 3),
               guidance=guidance, return_dict=False)[0]
    return nami.unpatchify(out, 2, H // 2, W // 2)


def test_released_flux_weights_give_diffusers_velocity_at_every_stage(released_dir):
    """docs/method.md §3: our model with converted diffusers weights computes diffusers' velocity,
    for the full model and for each stage (diffusers' model cut after c_k single blocks)."""
    from diffusers import FluxTransformer2DModel
    flux = FluxTransformer2DModel(**TINY_FLUX).eval()
    flux.load_state_dict(torch.load(released_dir / "transformer" / "pytorch_model_fsdp.bin", weights_only=True))
    ours = release.load_transformer(released_dir / "transformer")
    assert ours.cfg.cuts == (1, 2, 3) and ours.cfg.in_channels == 4 and ours.cfg.hidden_size == 32
    x, tau, txt, pooled = inputs(ours.cfg, B=2, H=8, W=12, L=5)
    single = flux.single_transformer_blocks
    with torch.no_grad():
        for stage in (None, 1, 2, 3):
            flux.single_transformer_blocks = single[:ours.cfg.depth_single if stage is None else ours.cfg.cuts[stage - 1]]
            want = flux_velocity(flux, x, tau, txt, pooled)
            got = ours(x, tau, txt, pooled, stage=stage)
            assert want.abs().max() > 0.1  # a real signal, not a zero-initialised head
            assert (got - want).abs().max() <= 1e-4 * want.abs().max(), stage
    # GPUs load it in bf16 (parallel.sampling_dtype): every tensor cast while loading, and the sampler's
    # velocity (inputs cast to the weights' dtype) stays within bf16 rounding of the float32 one
    assert parallel.sampling_dtype("cuda") == torch.bfloat16 and parallel.sampling_dtype("cpu") == torch.float32
    half = release.load_transformer(released_dir / "transformer", dtype=torch.bfloat16)
    assert {p.dtype for p in half.parameters()} == {torch.bfloat16}
    got = nami.model_velocity(half, txt, pooled)(x, 2, 0.5, tau[0].item())
    want = ours(x, tau[:1].expand(2), txt, pooled, stage=2)
    assert got.dtype == torch.float32 and (got - want).abs().max() <= 0.05 * want.abs().max()


# ---------------------------------------------------------------------------------------------
# Algorithm 1: training (tiny model, tiny local text encoder)
# ---------------------------------------------------------------------------------------------

def test_a_few_training_steps_lower_the_loss_on_a_fixed_batch():
    torch.manual_seed(0)
    cfg = nami.get_config("tiny", joint_attention_dim=8, pooled_projection_dim=8)
    model = nami.Nami(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(0)
    x = shapes.batch(0, 0, 8, 16)[0]
    eps, t = torch.randn(x.shape, generator=g), nami.logit_normal(8, g)
    txt, pooled = torch.randn(8, 4, 8, generator=g), torch.randn(8, 8, generator=g)
    windows, ranges = nami.stage_windows(), nami.tau_ranges()
    losses = []
    for _ in range(40):
        loss = 0
        for k in (1, 2, 3):
            xk, ek = nami.image_pyramid(x, 3)[k - 1], nami.noise_pyramid(eps, 3)[k - 1]
            x_s, x_e = nami.stage_points(xk, ek, k, windows)
            v = model(nami.interpolate(x_s, x_e, t), nami.stage_tau(t, ranges[k - 1]), txt, pooled, stage=k)
            loss = loss + nami.flow_loss(v, nami.flow_target(x_s, x_e))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.6 * losses[0]


def test_stage_mix_schedule_and_counts():
    cfg = config.TrainConfig(max_steps=1000)
    schedule = config.stage_mix_schedule(cfg, 3)
    assert schedule == [(0, 480, (4, 2, 1)), (480, 800, (2, 4, 1)), (800, 1000, (1, 2, 4))]
    assert feed.stage_counts((4, 2, 1), 32) == [18, 9, 5]
    assert feed.stage_counts((1, 2, 4), 7) == [1, 2, 4]
    assert sum(feed.stage_counts((1, 1, 1), 2)) == 2
    assert config.learning_rate(cfg, 900, schedule) == pytest.approx(cfg.lr * cfg.final_lr_scale)


@pytest.mark.parametrize("mode", ["flat", "flow-only"])
def test_flat_and_flow_only_modes_train_through_the_same_code(tmp_path, encoder_dir, mode):
    result = train.main(tiny_run(tmp_path, encoder_dir, mode=mode, max_steps=2, ckpt_every=2))
    config = json.loads((tmp_path / "ckpt-0000002" / "config.json").read_text())
    assert config["model"]["cuts"] == ([3] if mode == "flat" else [3, 3, 3])
    assert all(math.isfinite(l) for l in result["losses"])


# ---------------------------------------------------------------------------------------------
# docs/method.md §7: the cost of sampling
# ---------------------------------------------------------------------------------------------

def test_flop_count_of_2b_at_1024_matches_method_section_7():
    """docs/method.md §7: 10+10+10 steps vs 30, 256 text tokens, batch 1: NAMI 158, flow only 174, flat 392 TFLOP
    (counted on the meta device: no memory needed for 2B parameters)."""
    from experiments import bench
    flops = bench.flops_table(bench.argparse.Namespace(size="2b", res=1024, steps=[10, 10, 10], text_len=256, stages=None))
    assert flops["NAMI"] / 1e12 == pytest.approx(158.3, rel=2e-3)
    assert flops["flow only"] / 1e12 == pytest.approx(173.8, rel=2e-3)
    assert flops["flat"] / 1e12 == pytest.approx(391.8, rel=2e-3)


def test_k_stages_take_the_cut_points_and_stage_mix_of_the_paper_presets_rule():
    """More stages (the paper's future work: 2048² in K = 4): the cut points by the rule 2b and 0.6b follow (stage 1
    all double blocks and one single block, the rest shared out evenly, earlier stages first), the stage mix halving
    from the lowest resolution in the first phase and doubling in the last."""
    assert config.stage_cuts(14, 3) == nami.PRESETS["2b"]["cuts"] and config.stage_cuts(8, 3) == nami.PRESETS["0.6b"]["cuts"]
    assert config.stage_cuts(14, 4) == (1, 6, 10, 14) and config.stage_cuts(8, 4) == (1, 4, 6, 8)
    model_config = config.model_config(config.TrainConfig(size="2b", window_ratios=(1, 1, 1, 1)))
    assert model_config.num_stages == 4 and model_config.cuts == (1, 6, 10, 14)
    schedule = config.stage_mix_schedule(config.TrainConfig(size="2b", window_ratios=(1, 1, 1, 1), max_steps=100), 4)
    assert [ratios for _, _, ratios in schedule] == [(8, 4, 2, 1), (1, 1, 1, 1), (1, 2, 4, 8)]
    assert config.stage_mix_schedule(config.TrainConfig(max_steps=100), 3)[1][2] == (2, 4, 1)  # K = 3: the paper's


# ---------------------------------------------------------------------------------------------
# README's paper -> code table names real functions
# ---------------------------------------------------------------------------------------------

def resolve(name: str):
    """`training.config.stage_ratios` -> that function: import successively longer dotted prefixes while
    they are modules (the longest one is the module), then getattr the rest."""
    parts, module, n = name.split("."), None, 0
    while n < len(parts):
        prefix = ".".join(parts[:n + 1])
        try:
            module = importlib.import_module(prefix)
        except ModuleNotFoundError as e:  # not a module; an import failing inside one is an error
            if e.name is None or not (prefix == e.name or prefix.startswith(e.name + ".")):
                raise
            break
        n += 1
    assert module is not None, f"README's paper -> code table names {name}, but {parts[0]} is no module"
    assert ROOT in Path(module.__file__).resolve().parents, f"README's table names {name}, not one of ours"
    obj = module
    for i, attr in enumerate(parts[n:], n):
        assert hasattr(obj, attr), (f"README's paper -> code table names {name}, which does not exist "
                                    f"({'.'.join(parts[:i])} has no {attr})")
        obj = getattr(obj, attr)
    return obj


def test_readme_names_functions_that_exist():
    readme = (ROOT / "README.md").read_text()
    table = readme[readme.index("| paper | computed by |"):readme.index("## Presets")]
    names = {n for cell in (row.split("|")[2] for row in table.splitlines()[2:] if row.startswith("| "))
             for n in re.findall(r"`([a-z_0-9]+(?:\.[A-Za-z_0-9]+)+)`", cell)}
    assert len(names) > 30
    for name in sorted(names):
        assert callable(resolve(name)), name
