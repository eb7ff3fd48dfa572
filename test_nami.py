"""Tests: one per equation of the paper (and docs/method.md's pinned details), then training, resume and
the sampling CLI on a tiny model. Run: python -m pytest -q test_nami.py  (CPU, about 2 minutes)."""
from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import bridgeflow
import checkpoint
import config
import data
import encoders
import nami
import parallel
import release
import shapes
import train
from conftest import tiny_run

ROOT = Path(__file__).parent


def randomize(model: torch.nn.Module, seed: int = 0):
    """Random weights everywhere (the real init zeroes the output, which would hide differences)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * (0.3 if p.ndim == 1 else 1 / math.sqrt(p.shape[-1])))
    return model


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
    x_s, _ = nami.stage_points(xs[1], es[1], 2, windows, start="pyramid")
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


def flux_param_count(D, heads, n_double, n_single, in_ch, joint, pooled, mlp=4):
    """Parameters of a diffusers FluxTransformer2DModel, counted from its architecture."""
    hd, H = D // heads, int(D * mlp)
    lin = lambda i, o: i * o + o
    double = 2 * lin(D, 6 * D) + 6 * lin(D, D) + 2 * lin(D, D) + 4 * hd + 2 * (lin(D, H) + lin(H, D))
    single = lin(D, 3 * D) + 3 * lin(D, D) + 2 * hd + lin(D, H) + lin(D + H, D)
    embed = lin(in_ch, D) + lin(joint, D) + lin(256, D) + lin(D, D) + lin(pooled, D) + lin(D, D)
    return embed + n_double * double + n_single * single + lin(D, 2 * D) + lin(D, in_ch)


@pytest.mark.parametrize("name,expected", [("2b", 2.12e9), ("0.6b", 0.64e9)])
def test_parameter_counts_match_a_diffusers_flux_of_the_same_shape(name, expected):
    cfg = nami.get_config(name)
    with torch.device("meta"):
        model = nami.Nami(cfg)
    n = sum(p.numel() for p in model.parameters())
    assert n == pytest.approx(expected, rel=0.01)
    assert n == flux_param_count(cfg.hidden_size, cfg.num_heads, cfg.depth_double, cfg.depth_single,
                                 cfg.in_channels * 4, cfg.joint_attention_dim, cfg.pooled_projection_dim)
    diffusers = pytest.importorskip("diffusers")
    with torch.device("meta"):
        ref = diffusers.FluxTransformer2DModel(
            patch_size=1, in_channels=cfg.in_channels * 4, num_layers=cfg.depth_double,
            num_single_layers=cfg.depth_single, attention_head_dim=cfg.hidden_size // cfg.num_heads,
            num_attention_heads=cfg.num_heads, joint_attention_dim=cfg.joint_attention_dim,
            pooled_projection_dim=cfg.pooled_projection_dim, guidance_embeds=False, axes_dims_rope=cfg.axes_dim)
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
                                                cfg.pooled_projection_dim), name
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
    # started at stage 2 (the diagnostic of eval.py --from-stage): stage 1 is never run
    seen_t.clear()
    grids = nami.sampling_plan(nami.NamiConfig(), [4, 3, 2], schedule=release.SCHEDULES[schedule])[1]
    outs = nami.progressive_sample(velocity, eps, grids, start=(2, nami.up(ends[0])))
    assert len(outs) == 2 and [k for k, _ in seen_t] == [2] * 3 + [3] * 2
    torch.testing.assert_close(outs[-1], x_star)
    with pytest.raises(ValueError, match="stage 4 of 3"):
        nami.progressive_sample(velocity, eps, grids, start=(4, x_star))


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


def release_scheduler_grids(n, stage_range=(0, 1 / 3, 2 / 3, 1), gamma=1 / 3, N=1000):
    """The release's per-stage (σ, t) for n steps, from the formulas of its scheduler (release
    src/scheduling_flow_matching.py: a float32 table t = N … 1, windows with corrected starts, the τ
    axis split ∝ window lengths, K_k-entry stage tables, then numpy linspaces of n)."""
    import numpy as np
    table_t = torch.arange(N, 0, -1, dtype=torch.float32)
    table_sigma = table_t / N
    table_t = table_sigma * N
    lengths = []
    for i in range(3):
        s = table_sigma[int(stage_range[i] * N)].item()
        e = table_sigma[int(stage_range[i + 1] * N)].item() if int(stage_range[i + 1] * N) < N else 0.0
        if i > 0:
            o = 1 - s
            s = 1 - o * (1 / (math.sqrt(1 + 1 / gamma) * (1 - o) + o))
        lengths.append(s - e)
    ratios = [0.0, lengths[0] / sum(lengths), (lengths[0] + lengths[1]) / sum(lengths), 1.0]
    grids = []
    for i in range(3):
        t_max, t_min = table_t[int(ratios[i] * N)].item(), table_t[min(int(ratios[i + 1] * N), N - 1)].item()
        K = int(t_max - t_min)
        stage_t, stage_sigma = np.linspace(t_max, t_min, K + 1)[:-1], np.linspace(1, 0, K + 1)[:-1]
        sigma = np.append(np.linspace(stage_sigma[0], stage_sigma[-1], n), 0.0)
        grids.append((sigma, np.linspace(stage_t[0], stage_t[-1], n)))
    return grids


def test_release_grid_equals_the_release_schedulers_numbers():
    """docs/method.md §6: t' = [linspace(1, 1/K_k, n), 0] and τ = t/1000, t = linspace(t_max, t_min + 1, n),
    with (t_max, t_min) = (1000, 744), (744, 386), (386, 1) and K_k = 256, 358, 385 for 1:1:1."""
    assert release.stage_tables() == [(1000.0, 744.0), (744.0, 386.0), (386.0, 1.0)]
    grids = release.grids([10, 10, 10])
    # the release's numbers for 10+10+10 (its scheduler, printed): t' and t at every step
    assert grids[0].t == pytest.approx([1, .889323, .778646, .667969, .557292, .446615, .335938, .225260, .114583,
                                        .003906, 0], abs=1e-6)
    assert [1000 * tau for tau in grids[0].tau] == pytest.approx(
        [1000, 971.6667, 943.3333, 915, 886.6667, 858.3333, 830, 801.6667, 773.3333, 745], abs=1e-4)
    assert [1000 * tau for tau in grids[2].tau] == pytest.approx(
        [386, 343.3333, 300.6667, 258, 215.3333, 172.6667, 130, 87.3333, 44.6667, 2], abs=1e-4)
    for k, K in enumerate((256, 358, 385)):  # nine steps of (1 − 1/K)/9, then one of 1/K
        dt = [a - b for a, b in zip(grids[k].t[:-1], grids[k].t[1:])]
        assert dt[:9] == pytest.approx([(1 - 1 / K) / 9] * 9, abs=1e-12) and dt[9] == pytest.approx(1 / K, abs=1e-12)
    for n in (10, 7, 1):  # the formulas, for any step count
        for ours, (sigma, t) in zip(release.grids([n] * 3), release_scheduler_grids(n)):
            assert ours.t == pytest.approx(sigma.tolist(), abs=1e-12, rel=0)
            assert ours.tau == pytest.approx((t / 1000).tolist(), abs=1e-12, rel=0)
            assert len(ours.tau) == n and len(ours.t) == n + 1
    # not reproduced: the release rounds t to fp16 on its way to the sinusoid (pipeline_flux.py:464,
    # transformer_flux.py:455), at most 0.25 away from the t we give (971.5 for 971.667)
    for ours in grids:
        t = torch.tensor(ours.tau, dtype=torch.float64) * 1000
        seen = ((t.half() / 1000).half() * 1000).half().double()
        assert (seen - t).abs().max() <= 0.25
    # the release's grid on the flat sampler: one stage over the whole table, t = 1000 … 2
    (flat,) = nami.sampling_plan(nami.NamiConfig(), [4, 3, 3], flat=True, schedule=release.grids)[1]
    assert flat.tau[0] == 1.0 and flat.tau[-1] == pytest.approx(0.002) and flat.t[-2] == pytest.approx(1 / 999)


def test_generate_from_a_later_stage_starts_at_the_noised_real_image():
    """Eq. 3's end point of stage k−1 for the real image (coupled noise 2·Down(ε)), carried up:
    with no Euler step in the last stage, generate(from_stage=3) returns exactly that start."""
    cfg = nami.get_config("tiny", joint_attention_dim=8, pooled_projection_dim=8)
    model = nami.Nami(cfg).eval()

    class Encoder:
        def encode(self, prompts):
            return torch.zeros(len(prompts), 4, 8), torch.zeros(len(prompts), 8)

    clean = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(9)) * 2 - 1
    out = nami.generate(model, Encoder(), ["a", "b"], [11, 12], 16, 16, [1, 1, 0], from_stage=3, clean=clean)
    eps = torch.stack([torch.randn(3, 16, 16, generator=torch.Generator().manual_seed(s)) for s in (11, 12)])
    e2 = nami.stage_windows(cfg.window_ratios, cfg.gamma)[1][1]
    expected = nami.up(e2 * 2 * F.avg_pool2d(eps, 2) + (1 - e2) * F.avg_pool2d(clean, 2))
    assert len(out) == 1
    torch.testing.assert_close(out[-1], expected)
    with pytest.raises(ValueError, match="from_stage=2"):
        nami.generate(model, Encoder(), ["a"], [1], 16, 16, [1, 1, 1], flat=True, from_stage=2, clean=clean[:1])


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
# the built-in data
# ---------------------------------------------------------------------------------------------

def test_shapes_world_is_deterministic_complete_and_keeps_heldout_pairs_out():
    a, b = shapes.make_sample(3, 17), shapes.make_sample(3, 17)
    assert a == b
    torch.testing.assert_close(shapes.batch(3, 0, 4, 32)[0], shapes.batch(3, 0, 4, 32)[0])
    held = set(shapes.HELDOUT_PAIRS)
    categories = set()
    for i in range(2000):
        s = shapes.make_sample(0, i)
        categories.add(s.category)
        assert 1 <= len(s.objects) <= 4
        assert not any((o.color, o.shape) in held for o in s.objects)
        for color, shape in held:
            assert f"{color} {shape}" not in s.caption
        if "relation" in s.prompt:
            assert shapes.satisfies(s.prompt["relation"], s.objects[0].box, s.objects[1].box)
    assert categories == set(shapes.CATEGORIES)
    assert any(f"{c} {sh}" in shapes.make_sample(0, i, "heldout").caption
               for i in range(50) for c, sh in held)
    # the record matches the pixels: the centre of a drawn object has its colour
    s = shapes.make_sample(0, 5, category="colors")
    img = shapes.render(s, 64)
    box = s.objects[0].box
    centre = img.getpixel((int((box[0] + box[2]) / 2 * 64), int((box[1] + box[3]) / 2 * 64 + 4)))
    assert max(abs(c - r) for c, r in zip(centre, shapes.COLORS[s.objects[0].color])) < 30


# ---------------------------------------------------------------------------------------------
# training, resume, sampling CLI (tiny model, tiny local text encoder)
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
    assert data.stage_counts((4, 2, 1), 32) == [18, 9, 5]
    assert data.stage_counts((1, 2, 4), 7) == [1, 2, 4]
    assert sum(data.stage_counts((1, 1, 1), 2)) == 2
    assert config.learning_rate(cfg, 900, schedule) == pytest.approx(cfg.lr * cfg.final_lr_scale)


def test_save_then_resume_gives_the_same_losses_as_not_stopping(tmp_path, encoder_dir):
    straight = train.main(tiny_run(tmp_path / "a", encoder_dir))
    first = train.main(tiny_run(tmp_path / "b", encoder_dir, stop_after=3))
    resumed = train.main(tiny_run(tmp_path / "b", encoder_dir, resume=True))
    assert len(first["losses"]) == 3 and len(resumed["losses"]) == 3
    assert first["losses"] + resumed["losses"] == straight["losses"]
    ckpt = tmp_path / "b" / "ckpt-0000006"
    assert {p.name for p in ckpt.iterdir()} == {"weights.safetensors", "config.json", "train_state.pt"}
    from safetensors.torch import load_file
    a, b = load_file(tmp_path / "a" / "ckpt-0000006" / "weights.safetensors"), load_file(ckpt / "weights.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert len((tmp_path / "a" / "log.jsonl").read_text().splitlines()) >= 1


@pytest.mark.parametrize("mode", ["flat", "flow-only"])
def test_flat_and_flow_only_modes_train_through_the_same_code(tmp_path, encoder_dir, mode):
    result = train.main(tiny_run(tmp_path, encoder_dir, mode=mode, max_steps=2, ckpt_every=2))
    config = json.loads((tmp_path / "ckpt-0000002" / "config.json").read_text())
    assert config["model"]["cuts"] == ([3] if mode == "flat" else [3, 3, 3])
    assert all(math.isfinite(l) for l in result["losses"])


def run_cli(*args):
    return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=300)


def test_sample_cli_end_to_end_and_bad_input(tmp_path, encoder_dir, capsys):
    import sample
    train.main(tiny_run(tmp_path / "run", encoder_dir, max_steps=2, ckpt_every=2))
    # a prompt outside the built-in world's words: one note naming them and --weights, then the picture
    sample.main(["a photo of a cat", "--ckpt", str(tmp_path / "run"), "--steps", "1,1,1", "--out", str(tmp_path / "c.png")])
    printed = capsys.readouterr().out
    assert [line for line in printed.splitlines() if line.startswith("note:")] == [
        sample.world_note("a photo of a cat", json.loads((tmp_path / "run" / "ckpt-0000002" / "config.json").read_text())["vocabulary"])]
    assert "--weights" in printed and "wrote" in printed
    out = tmp_path / "cat.png"
    r = run_cli("sample.py", "a red circle above a blue square", "--ckpt", str(tmp_path / "run"), "--out", str(out),
                "--steps", "2,2,2", "-n", "2", "--show-stages")
    assert r.returncode == 0, r.stderr
    assert "stage 1:" in r.stdout and "stage 3:" in r.stdout and "note:" not in r.stdout
    png = Image.open(out)
    assert png.text["prompt"] == "a red circle above a blue square" and png.text["steps"] == "[2, 2, 2]"
    assert png.text["schedule"] == "uniform" and png.text["negative"] == "" and png.text["prompt_suffix"] == ""
    assert "ckpt-0000002" in png.text["checkpoint"]
    # empty prompt (unconditional), the flat sampler and another valid resolution work
    r = run_cli("sample.py", "", "--ckpt", str(tmp_path / "run"), "--out", str(tmp_path / "u.png"),
                "--flat", "--res", "24x32", "--steps", "1,1,1")
    assert r.returncode == 0 and "flat 1:" in r.stdout, r.stderr
    # an invalid resolution names valid ones
    r = run_cli("sample.py", "x", "--ckpt", str(tmp_path / "run"), "--res", "20x16")
    assert r.returncode != 0 and "Nearest valid: width [16, 24]" in r.stderr
    # a missing checkpoint says how to make one; a wrong preset names both
    r = run_cli("sample.py", "x", "--ckpt", str(tmp_path / "nothing"))
    assert r.returncode != 0 and "python train.py" in r.stderr
    r = run_cli("sample.py", "x", "--ckpt", str(tmp_path / "run"), "--size", "small")
    assert r.returncode != 0 and "'tiny'" in r.stderr and "small" in r.stderr
    r = run_cli("sample.py", "x", "--ckpt", str(tmp_path / "run"), "--steps", "2,2")
    assert r.returncode != 0 and "3 counts" in r.stderr


def test_a_prompt_outside_the_training_captions_gets_a_note(tmp_path, encoder_dir):
    """config.json records the words of the training captions: the built-in world's from shapes.py's
    templates, a folder's from its captions (function words left out, none past the limit); a prompt
    that uses none of them is noted in one line, pointing to --weights (sampled all the same: the CLI test)."""
    import sample
    vocabulary = data.vocabulary(tiny_run(tmp_path, encoder_dir))
    assert {"red", "circle", "triangles", "three", "left", "above"} <= set(vocabulary) and "photo" not in vocabulary
    captions = [shapes.make_sample(0, i).caption for i in range(300)]
    assert all(set(data.words(c)) <= shapes.caption_words() for c in captions)  # the templates' words, all of them
    make_image_folder(tmp_path / "images", n_full=3, n_small=0)
    assert data.vocabulary(tiny_run(tmp_path, encoder_dir, data=str(tmp_path / "images"))) == ["blue", "green", "noise", "orange"]
    assert data.caption_vocabulary([f"w{i}" for i in range(data.VOCABULARY_LIMIT + 1)]) is None
    assert data.vocabulary(tiny_run(tmp_path, encoder_dir, cache=str(tmp_path))) is None  # a cache keeps no captions
    note = sample.world_note("a photo of a cat", vocabulary)
    assert "circle" in note and "--weights" in note and "\n" not in note
    for prompt in ("a photo of a red dog", "", "a RED circle"):
        assert sample.world_note(prompt, vocabulary) is None, prompt
    assert sample.world_note("a photo of a cat", None) is None  # a checkpoint that records no vocabulary


def test_checkpoint_of_another_shape_is_an_error_naming_the_mismatch(tmp_path, encoder_dir):
    train.main(tiny_run(tmp_path, encoder_dir, max_steps=1, ckpt_every=1))
    _, _, parts = checkpoint.load_checkpoint(tmp_path)
    other = nami.Nami(nami.get_config("tiny", hidden_size=32, axes_dim=(4, 6, 6), joint_attention_dim=32,
                                      pooled_projection_dim=32))
    with pytest.raises(ValueError, match="x_embedder.weight"):
        checkpoint.load_state(other, parts["model"], "ckpt")


def test_long_prompt_is_truncated_with_a_warning(encoder_dir):
    enc = encoders.TextEncoder(encoder_dir, max_len=8)
    with pytest.warns(UserWarning, match="truncated"):
        txt, pooled = enc.encode(["a red circle " * 50])
    assert txt.shape == (1, 8, 32) and pooled.shape == (1, 32)
    txt, _ = enc.encode(["", "a red circle"])
    assert txt[0, 2:].abs().sum() == 0 and txt[0, :2].abs().sum() > 0  # [CLS] [SEP], then zero padding


def test_invalid_resolution_names_nearest_valid_sizes():
    with pytest.raises(ValueError, match=r"multiple of 8.*width \[96, 104\].*height \[64\]"):
        config.check_resolution(64, 100, 8)
    with pytest.raises(ValueError, match="unknown preset"):
        nami.get_config("3b")
    with pytest.raises(ValueError, match="cut points"):
        nami.get_config("tiny", cuts=(1, 2))


# ---------------------------------------------------------------------------------------------
# Real scale: encoders and VAE from local folders, the released NAMI-2B layout.
# No weights can be downloaded here, so every loading path runs on tiny models that the tests
# build, save to a folder and load back through the code a user runs.
# ---------------------------------------------------------------------------------------------

TINY_FLUX = dict(patch_size=1, in_channels=16, num_layers=2, num_single_layers=3, attention_head_dim=16,
                 num_attention_heads=2, joint_attention_dim=24, pooled_projection_dim=20, guidance_embeds=False,
                 axes_dims_rope=(4, 6, 6))


def save_tiny_vae(folder):
    from diffusers import AutoencoderKL
    torch.manual_seed(0)
    AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                  up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 8), norm_num_groups=4,
                  latent_channels=4, scaling_factor=0.5, shift_factor=0.1).save_pretrained(folder)


def save_tiny_mt5_tokenizer(folder):
    """A T5 (sentencepiece-style unigram) tokenizer over single characters and a few pieces, as the
    mT5 folder's: ids of pieces, then </s>, then <pad> (id 0) up to the length asked for."""
    from transformers import T5Tokenizer
    pieces = ["▁a", "▁photo", "▁of", "▁cat", ".", ",", "(", ")"] + list("abcdefghijklmnopqrstuvwxyz▁")
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)] + [(p, -1.0 - i) for i, p in enumerate(pieces)]
    T5Tokenizer(vocab=vocab, extra_ids=0).save_pretrained(folder)


@pytest.fixture(scope="session")
def released_dir(tmp_path_factory, encoder_dir):
    """A folder in the layout of the authors' release (release src/infer.py:176-205), tiny random models:
    transformer/pytorch_model_fsdp.bin, bridge_flow.bin, vae/, mt5/ (MT5EncoderModel + T5 tokenizer),
    mclip/tokenizer/ (BertTokenizer) and mclip/clip_text_encoder/ (BertModel without pooling layer).
    One file more than the release: transformer/config.json, which gives the tiny shape (without it
    the loader builds the release's 2b shape, infer.py:136-151)."""
    from diffusers import FluxTransformer2DModel
    from transformers import AutoTokenizer, BertConfig, BertModel, MT5Config, MT5EncoderModel
    root = tmp_path_factory.mktemp("released") / "weights"
    (root / "transformer").mkdir(parents=True)
    torch.manual_seed(0)
    flux = randomize(FluxTransformer2DModel(**TINY_FLUX), seed=1)
    torch.save(flux.state_dict(), root / "transformer" / "pytorch_model_fsdp.bin")
    (root / "transformer" / "config.json").write_text(json.dumps(TINY_FLUX))
    g = torch.Generator().manual_seed(2)
    torch.save({"scale": torch.tensor([1.1, 0.9]), "shift.0": torch.randn(1, 4, 8, 8, generator=g),
                "shift.1": torch.randn(1, 4, 16, 16, generator=g)}, root / "bridge_flow.bin")
    save_tiny_vae(root / "vae")
    save_tiny_mt5_tokenizer(root / "mt5")
    mt5_tokenizer = AutoTokenizer.from_pretrained(root / "mt5", local_files_only=True)
    randomize(MT5EncoderModel(MT5Config(vocab_size=len(mt5_tokenizer), d_model=24, d_kv=8, d_ff=32, num_layers=1,
                                        num_heads=2)), seed=3).save_pretrained(root / "mt5")
    bert_tokenizer = AutoTokenizer.from_pretrained(encoder_dir, local_files_only=True)
    bert_tokenizer.save_pretrained(root / "mclip" / "tokenizer")
    BertModel(BertConfig(vocab_size=bert_tokenizer.vocab_size, hidden_size=20, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=32), add_pooling_layer=False).save_pretrained(root / "mclip" / "clip_text_encoder")
    return root


def flux_velocity(flux, x, tau, txt, pooled):
    """diffusers' FluxTransformer2DModel on our unpacked inputs: 2×2 packing, ids (0, row, col)."""
    B, C, H, W = x.shape
    out = flux(hidden_states=nami.patchify(x, 2), encoder_hidden_states=txt, pooled_projections=pooled,
               timestep=tau, img_ids=nami.image_ids(H // 2, W // 2).float(), txt_ids=torch.zeros(txt.shape[1], 3),
               return_dict=False)[0]
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
    # a guidance-distilled FLUX (which NAMI does not use) is refused with a reason
    with pytest.raises(ValueError, match="guidance"):
        release.convert_diffusers_flux({"time_text_embed.guidance_embedder.linear_1.weight": torch.zeros(1)})


def test_released_bridgeflow_layout_loads_and_computes_w_up_plus_b(released_dir):
    """bridge_flow.bin keys scale (2,), shift.0 (1,C,H2,W2), shift.1 (1,C,H3,W3): x_s = W_k·Up(x_e) + B_k."""
    bridge = release.load_bridge(released_dir / "bridge_flow.bin", channels=4)
    raw = torch.load(released_dir / "bridge_flow.bin", weights_only=True)
    for k, size in ((2, 4), (3, 8)):
        x = torch.randn(2, 4, size, size)
        nearest = x.repeat_interleave(2, dim=-1).repeat_interleave(2, dim=-2)
        want = raw["scale"][k - 2] * nearest + raw[f"shift.{k - 2}"]
        assert torch.allclose(bridge(x, k), want, atol=1e-6)


def test_sample_with_released_weights_end_to_end(released_dir, tmp_path, capsys):
    """python sample.py --weights DIR on the release's layout: its text encoding, the transformer,
    BridgeFlow, the VAE decoder, the release's grid and prompts; bad folders are explained."""
    import sample
    out = tmp_path / "cat.png"
    sample.main(["a photo of a cat", "--weights", str(released_dir), "--res", "32x32", "--steps", "2,2,2",
                 "--out", str(out), "--show-stages"])
    printed = capsys.readouterr().out
    assert f"prompt: 'a photo of a cat{release.PROMPT_SUFFIX}'" in printed and release.NEGATIVE_PROMPT in printed
    assert "schedule: release" in printed and "stage 3:" in printed
    png = Image.open(out)
    assert png.text["cfg"] == "3.0" and png.text["resolution"] == "32x32" and png.text["schedule"] == "release"
    assert png.text["prompt"] == "a photo of a cat" and png.text["prompt_suffix"] == release.PROMPT_SUFFIX
    assert png.text["negative"] == release.NEGATIVE_PROMPT
    assert png.width > 2.5 * png.height  # the three stages side by side
    # the release's prompts off; an explicit negative prompt wins over the release's; our grid on request
    sample.main(["a cat", "--weights", str(released_dir), "--res", "32x32", "--steps", "1,1,1", "--out", str(out),
                 "--no-release-prompts", "--schedule", "uniform"])
    png = Image.open(out)
    assert (png.text["prompt_suffix"], png.text["negative"], png.text["schedule"]) == ("", "", "uniform")
    sample.main(["a cat", "--weights", str(released_dir), "--res", "32x32", "--steps", "1,1,1", "--out", str(out),
                 "--negative", "blurry"])
    assert Image.open(out).text["negative"] == "blurry"
    with pytest.raises(SystemExit, match="(?s)lacks.*bridge_flow.bin.*mclip/clip_text_encoder"):
        sample.main(["x", "--weights", str(tmp_path), "--out", str(out)])
    _, _, encoder, autoencoder, info = release.load(released_dir)
    assert info["resolution"] == (1024, 1024) and info["steps"] == [10, 10, 10] and info["cfg"] == 3.0
    assert info["dtype"] == "torch.float32"  # bf16 on a GPU only
    assert autoencoder.channels == 4 and autoencoder.factor == 2


def test_released_text_states_are_unmasked_mt5_and_masked_bert_cls(released_dir):
    """The release's encoding (src/infer.py:17-100): mT5 on 256 tokens padded to the maximum, called with the
    ids alone, every state kept; mCLIP's BertModel (no pooling layer) with its mask, the CLS state of 77 tokens."""
    from transformers import AutoTokenizer, BertModel, MT5EncoderModel
    encoder = release.load(released_dir)[2]
    prompts = ["a photo of a cat" + release.PROMPT_SUFFIX, release.NEGATIVE_PROMPT]
    txt, pooled = encoder.encode(prompts)
    assert encoder.identity()["pad"] == "unmasked" and encoder.pooled_rule() == "cls"
    mt5, mt5_tokenizer = MT5EncoderModel.from_pretrained(released_dir / "mt5"), AutoTokenizer.from_pretrained(released_dir / "mt5")
    bert = BertModel.from_pretrained(released_dir / "mclip" / "clip_text_encoder", add_pooling_layer=False)
    bert_tokenizer = AutoTokenizer.from_pretrained(released_dir / "mclip" / "tokenizer")
    assert type(encoder.model) is MT5EncoderModel and encoder.pooled_model.pooler is None
    ids = mt5_tokenizer(prompts, max_length=256, padding="max_length", truncation=True, return_tensors="pt")
    assert ids["attention_mask"][0].sum() < 256 and ids["input_ids"][0, ids["attention_mask"][0].sum() - 1] == 1  # </s>
    tok = bert_tokenizer(prompts, max_length=77, padding="max_length", truncation=True, return_tensors="pt")
    with torch.no_grad():
        unmasked = mt5(input_ids=ids["input_ids"]).last_hidden_state
        masked = mt5(input_ids=ids["input_ids"], attention_mask=ids["attention_mask"]).last_hidden_state
        cls = bert(input_ids=tok["input_ids"], attention_mask=tok["attention_mask"]).last_hidden_state[:, 0]
    assert txt.shape == (2, 256, 24) and pooled.shape == (2, 20)
    torch.testing.assert_close(txt, unmasked, rtol=0, atol=1e-6)
    torch.testing.assert_close(pooled, cls, rtol=0, atol=1e-6)
    assert (txt[0, :4] - masked[0, :4]).abs().max() > 1e-3  # a masked mT5 differs, real tokens included
    # our checkpoints keep the masked rule (padding zeroed); identity() tells the two apart
    ours = encoders.TextEncoder(released_dir / "mt5", 256, pooled_path=released_dir / "mclip")
    assert ours.identity()["pad"] == "zeros" and ours.identity()["pooled_config"] == encoder.identity()["pooled_config"]
    torch.testing.assert_close(ours.encode(prompts[:1])[0][0, :4], masked[0, :4], rtol=0, atol=1e-6)


def test_clip_text_model_gives_its_pooler_output_and_t5_its_encoder(tmp_path, encoder_dir):
    from transformers import AutoTokenizer, CLIPTextConfig, CLIPTextModel
    tok = AutoTokenizer.from_pretrained(encoder_dir, local_files_only=True)
    torch.manual_seed(0)
    CLIPTextModel(CLIPTextConfig(vocab_size=tok.vocab_size, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                 num_attention_heads=2, max_position_embeddings=77, bos_token_id=tok.cls_token_id,
                                 eos_token_id=tok.sep_token_id, pad_token_id=tok.pad_token_id)).save_pretrained(tmp_path / "clip")
    tok.save_pretrained(tmp_path / "clip")
    enc = encoders.TextEncoder(encoder_dir, max_len=8, pooled_path=tmp_path / "clip")
    txt, pooled = enc.encode(["a red circle", "a blue square"])
    assert enc.pooled_rule() == "pooler_output" and pooled.shape == (2, 16) and txt.shape == (2, 8, 32)
    t = enc.pooled_tokenizer(["a red circle"], padding="max_length", max_length=77, return_tensors="pt")
    out = enc.pooled_model(input_ids=t["input_ids"], attention_mask=t["attention_mask"])
    assert torch.allclose(pooled[0], out.pooler_output[0], atol=1e-5)
    assert not torch.allclose(pooled[0], out.last_hidden_state[0, 0], atol=1e-3)
    # pad="zeros": states after the prompt's tokens are zero; the default pooled is their masked mean
    plain = encoders.TextEncoder(encoder_dir, max_len=8)
    txt, pooled = plain.encode(["a red circle"])
    n = len(plain.tokenizer("a red circle")["input_ids"])
    assert txt[0, n:].abs().sum() == 0 and txt[0, :n].abs().sum() > 0
    assert torch.allclose(pooled[0], txt[0, :n].mean(0), atol=1e-6)


def test_vae_normalises_latents_with_its_config_and_decode_inverts_encode(tmp_path):
    from diffusers import AutoencoderKL
    save_tiny_vae(tmp_path / "vae")
    vae = encoders.load_autoencoder(tmp_path / "vae")
    raw = AutoencoderKL.from_pretrained(tmp_path / "vae")
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    z = vae.encode(x)
    with torch.no_grad():
        mode = raw.encode(x).latent_dist.mode()
        assert z.shape == (2, 4, 8, 8) and vae.factor == 2
        assert torch.allclose(z, (mode - 0.1) * 0.5, atol=1e-5)  # (z − shift_factor)·scaling_factor
        assert torch.allclose(vae.decode(z), raw.decode(mode).sample.clamp(-1, 1), atol=1e-5)
    with pytest.raises(FileNotFoundError, match="AutoencoderKL"):
        encoders.load_autoencoder(tmp_path)


def test_train_in_vae_latent_space_and_sample_refuses_another_encoder(tmp_path, encoder_dir, released_dir):
    save_tiny_vae(tmp_path / "vae")
    result = train.main(tiny_run(tmp_path / "run", encoder_dir, max_steps=2, ckpt_every=2, resolution=32,
                                 vae=str(tmp_path / "vae")))
    assert all(math.isfinite(l) for l in result["losses"])
    config = json.loads((tmp_path / "run" / "ckpt-0000002" / "config.json").read_text())
    assert config["model"]["in_channels"] == 4 and config["vae"]["factor"] == 2
    r = run_cli("sample.py", "a red circle", "--ckpt", str(tmp_path / "run"), "--steps", "1,1,1",
                "--out", str(tmp_path / "s.png"))
    assert r.returncode == 0, r.stderr
    assert Image.open(tmp_path / "s.png").size == (256, 256)
    # the checkpoint records its encoder: another one (here 24-d mT5) is refused with both named
    r = run_cli("sample.py", "x", "--ckpt", str(tmp_path / "run"), "--text-encoder", str(released_dir / "mt5"))
    assert r.returncode != 0 and "trained with text encoder" in r.stderr


def make_image_folder(root, n_full=10, n_small=6, size=16):
    """Captioned images: n_full at the training size, n_small at half of it (Algorithm 1 keeps
    those out of the last stage)."""
    g = torch.Generator().manual_seed(0)
    root.mkdir(parents=True)
    for i in range(n_full + n_small):
        side = size if i < n_full else size // 2
        pixels = (torch.rand(side, side, 3, generator=g) * 255).to(torch.uint8).numpy()
        Image.fromarray(pixels).save(root / f"img{i:02d}.png")
        (root / f"img{i:02d}.txt").write_text(f"a photo of {sorted(shapes.COLORS)[i % 7]} noise")


def test_train_on_an_image_folder_equals_training_on_its_cache(tmp_path, encoder_dir):
    """--data encodes on the fly, --cache reads what `python data.py cache` stored: the same data
    order, encodings and losses; a cache built for other settings is refused."""
    make_image_folder(tmp_path / "images")
    folder = train.main(tiny_run(tmp_path / "a", encoder_dir, data=str(tmp_path / "images"), workers=0,
                                 max_steps=3, ckpt_every=3))
    r = run_cli("data.py", "cache", str(tmp_path / "images"), "--out", str(tmp_path / "cache"), "--resolution", "16",
                "--text-encoder", encoder_dir, "--text-len", "16", "--dtype", "fp32")
    assert r.returncode == 0, r.stderr
    cached = train.main(tiny_run(tmp_path / "b", encoder_dir, cache=str(tmp_path / "cache"), workers=0,
                                 max_steps=3, ckpt_every=3))
    assert all(math.isfinite(l) for l in folder["losses"])
    assert folder["losses"] == pytest.approx(cached["losses"], rel=1e-4)
    with pytest.raises(ValueError, match="stale cache"):
        train.main(tiny_run(tmp_path / "c", encoder_dir, cache=str(tmp_path / "cache"), workers=0, text_len=8))


def test_a_run_on_a_cache_holds_no_text_encoder_while_it_trains(tmp_path, encoder_dir, monkeypatch):
    """With --cache the text states come from the cache: the encoders load once, for the sample
    grids' prompts, and are freed before the model is built (mT5-XXL alone is 9 GB in bf16)."""
    make_image_folder(tmp_path / "images")
    r = run_cli("data.py", "cache", str(tmp_path / "images"), "--out", str(tmp_path / "cache"), "--resolution", "16",
                "--text-encoder", encoder_dir, "--text-len", "16", "--dtype", "fp32")
    assert r.returncode == 0, r.stderr
    loaded, real_load, real_build = [], encoders.TextEncoder.load, train.build_model
    monkeypatch.setattr(encoders.TextEncoder, "load", lambda self: (loaded.append(self), real_load(self))[1])

    def build_model(*args, **kwargs):
        assert loaded and all(e.model is None for e in loaded), "a text encoder holds its weights during training"
        return real_build(*args, **kwargs)
    monkeypatch.setattr(train, "build_model", build_model)
    result = train.main(tiny_run(tmp_path / "run", encoder_dir, cache=str(tmp_path / "cache"), workers=0,
                                 max_steps=2, ckpt_every=2, sample_every=2))
    assert len(loaded) == 1 and loaded[0].model is None and all(math.isfinite(l) for l in result["losses"])
    assert (tmp_path / "run" / "samples" / "step-0000002.png").is_file()


# ---------------------------------------------------------------------------------------------
# --init-from: a new run from our checkpoints, the authors' release or a flat transformer.
# A run of one step at lr 1e-9 holds in its checkpoint the weights it started from (to ~1e-9; the
# EMA's first update takes 90 % of the model's weights, which have not moved).
# ---------------------------------------------------------------------------------------------

STILL = dict(lr=1e-9, max_steps=1, ckpt_every=1)
# released_dir's transformer in the shape of the tiny preset (its text widths are the release folder's encoders')
TINY_PRESET_FLUX = dict(TINY_FLUX, num_layers=1, attention_head_dim=32, axes_dims_rope=(8, 12, 12))


def same(a: dict, b: dict, atol: float = 1e-6) -> bool:
    return a.keys() == b.keys() and all(torch.allclose(a[k].float(), b[k].float(), atol=atol) for k in a)


def recorded_source(run) -> dict:
    return json.loads((checkpoint.latest_checkpoint(run) / "config.json").read_text())["init_from"]


def release_run(out, root, **kw):
    """A tiny run on the encoders and VAE of a release-layout folder (24-d mT5, 20-d mCLIP, 4 channels)."""
    return tiny_run(out, str(root / "mt5"), pooled_encoder=str(root / "mclip"), vae=str(root / "vae"), text_len=64,
                    **kw)  # 64 tokens: every caption of the built-in world, in the tiny mT5's characters


@pytest.fixture(scope="session")
def our_run(tmp_path_factory, encoder_dir):
    """A tiny run of 4 steps at a high lr, so that its EMA and raw weights differ clearly."""
    out = tmp_path_factory.mktemp("source") / "run"
    train.main(tiny_run(out, encoder_dir, max_steps=4, ckpt_every=4, lr=3e-3))
    return out


@pytest.fixture(scope="session")
def released_tiny_preset(tmp_path_factory, released_dir):
    """released_dir with a transformer of the tiny preset's shape, so that --size tiny runs start from it;
    the same bridge_flow.bin (maps at 8² and 16²: latent 16, a 32-px image), VAE and encoders."""
    from diffusers import FluxTransformer2DModel
    root = tmp_path_factory.mktemp("released_tiny") / "weights"
    (root / "transformer").mkdir(parents=True)
    flux = randomize(FluxTransformer2DModel(**TINY_PRESET_FLUX), seed=4)
    torch.save(flux.state_dict(), root / "transformer" / "pytorch_model_fsdp.bin")
    (root / "transformer" / "config.json").write_text(json.dumps(TINY_PRESET_FLUX))
    (root / "bridge_flow.bin").write_bytes((released_dir / "bridge_flow.bin").read_bytes())
    for part in ("vae", "mt5", "mclip"):
        (root / part).symlink_to(released_dir / part)
    return root


@pytest.mark.parametrize("raw", [False, True], ids=["ema", "raw"])
def test_init_from_our_run_starts_from_its_ema_or_raw_weights_and_bridgeflow(tmp_path, encoder_dir, our_run, raw,
                                                                             capsys):
    import hashlib
    _, _, source = checkpoint.load_checkpoint(our_run)
    assert not same(source["ema"], source["model"], atol=1e-4)  # the test tells them apart
    capsys.readouterr()
    train.main(tiny_run(tmp_path, encoder_dir, init_from=str(our_run), init_from_raw=raw, **STILL))
    assert "BridgeFlow pre-trained" not in capsys.readouterr().out
    _, _, new = checkpoint.load_checkpoint(tmp_path)
    wanted = source["model" if raw else "ema"]
    assert same(new["model"], wanted) and same(new["ema"], wanted)
    assert same(new["bridge"], source["bridge"], atol=0)  # taken, frozen: no pre-training
    ckpt = our_run / "ckpt-0000004"
    assert recorded_source(tmp_path) == {
        "path": str(ckpt.resolve()), "kind": "checkpoint", "step": 4, "weights": "model" if raw else "ema",
        "bridge": "from the source",
        "sha256": {name: hashlib.sha256((ckpt / name).read_bytes()).hexdigest()
                   for name in ("weights.safetensors", "config.json")}}


def test_init_from_run_resumes_with_its_source_and_warm_up_and_never_into_another_run(tmp_path, encoder_dir, our_run):
    """--resume alone continues a run started with --init-from exactly (its checkpoints record the
    source, and the fine-tuning warm-up, 20 steps from lr/10, is still the one that applies)."""
    kw = dict(init_from=str(our_run), max_steps=4, ckpt_every=2, warmup=None)
    straight = train.main(tiny_run(tmp_path / "a", encoder_dir, **kw))
    train.main(tiny_run(tmp_path / "b", encoder_dir, stop_after=2, **kw))
    resumed = train.main(tiny_run(tmp_path / "b", encoder_dir, max_steps=4, ckpt_every=2, warmup=None, resume=True))
    assert resumed["losses"] == straight["losses"][2:]
    assert recorded_source(tmp_path / "b") == recorded_source(tmp_path / "a")
    cfg = tiny_run(tmp_path, encoder_dir, **kw)
    assert config.warmup_plan(cfg) == (20, 0.1) and config.learning_rate(cfg, 0, [(0, 4, (1, 1, 1))]) == pytest.approx(
        cfg.lr * (0.1 + 0.9 / 20))
    with pytest.raises(ValueError, match="already holds a run"):
        train.main(tiny_run(tmp_path / "a", encoder_dir, **kw))


@pytest.mark.parametrize("resolution", [32, 16])
def test_init_from_the_release_takes_its_transformer_and_bridgeflow(tmp_path, released_tiny_preset, resolution):
    """At the size the release's maps were made for (here 32 px: latent 16, maps 8² and 16²) they are
    taken as they are; at another size each is resized bilinearly, as BridgeFlow.forward does when
    sampling the release at that size (docs/method.md §4)."""
    root = released_tiny_preset
    train.main(release_run(tmp_path, root, resolution=resolution, init_from=str(root), **STILL))
    _, _, new = checkpoint.load_checkpoint(tmp_path)
    _, flux, _ = release.read_transformer(root / "transformer")
    assert same(new["model"], flux) and same(new["ema"], flux)
    released = release.load_bridge(root / "bridge_flow.bin", 4).state_dict()
    latent = resolution // 2
    assert torch.equal(new["bridge"]["scale"], released["scale"])
    for j, side in enumerate((latent // 2, latent)):
        resized = F.interpolate(released[f"shift.{j}"], size=(side, side), mode="bilinear", align_corners=False)
        assert torch.allclose(new["bridge"][f"shift.{j}"], resized, atol=1e-6)
    record = recorded_source(tmp_path)
    assert record["kind"] == "release" and record["step"] is None and record["weights"] == "transformer"
    assert set(record["sha256"]) == {"transformer/pytorch_model_fsdp.bin", "transformer/config.json", "bridge_flow.bin"}
    assert record["bridge"] == "from the source" + ("" if resolution == 32 else
                                                    ", bias maps resized bilinearly (8x8 -> 4x4, 16x16 -> 8x8)")


def test_init_from_a_flat_model_converts_it_to_nami_and_pretrains_bridgeflow(tmp_path, encoder_dir,
                                                                            released_tiny_preset, capsys):
    from diffusers import FluxTransformer2DModel
    # one of our --mode flat runs: the same weights, now cut into stages (cuts 1, 2, 3), BridgeFlow pre-trained
    train.main(tiny_run(tmp_path / "flat", encoder_dir, mode="flat", max_steps=2, ckpt_every=2))
    _, _, flat = checkpoint.load_checkpoint(tmp_path / "flat")
    capsys.readouterr()
    train.main(tiny_run(tmp_path / "nami", encoder_dir, init_from=str(tmp_path / "flat"), **STILL))
    assert "BridgeFlow pre-trained" in capsys.readouterr().out
    folder, saved, new = checkpoint.load_checkpoint(tmp_path / "nami")
    assert same(new["model"], flat["ema"]) and saved["model"]["cuts"] == [1, 2, 3]
    assert recorded_source(tmp_path / "nami")["bridge"] == "pre-trained in this run (the source is a flat model)"
    # a diffusers FluxTransformer2DModel folder, as save_pretrained writes it (config.json, safetensors)
    flux = randomize(FluxTransformer2DModel(**TINY_PRESET_FLUX), seed=5)
    flux.save_pretrained(tmp_path / "flux")
    train.main(release_run(tmp_path / "from-flux", released_tiny_preset, resolution=32,
                           init_from=str(tmp_path / "flux"), **STILL))
    _, _, new = checkpoint.load_checkpoint(tmp_path / "from-flux")
    assert same(new["model"], release.convert_diffusers_flux(flux.state_dict()))
    record = recorded_source(tmp_path / "from-flux")
    assert record["kind"] == "diffusers" and set(record["sha256"]) == {"config.json", "diffusion_pytorch_model.safetensors"}


def test_init_from_weights_that_do_not_fit_names_both_shapes_or_every_tensor(tmp_path, encoder_dir, our_run,
                                                                             released_tiny_preset):
    with pytest.raises(ValueError, match=r"holds a transformer of width 64, 2 heads, 1 double \+ 3 single blocks, 3 latent "
                                         r"channels, text 32-d, pooled 32-d \(--size tiny\); this run builds width 192, 3 "
                                         r"heads, 2 double \+ 6 single .*They differ in hidden_size, num_heads"):
        train.main(tiny_run(tmp_path / "a", encoder_dir, size="small", init_from=str(our_run)))
    # the same widths, but a pooled vector of another rule (the source's is the mean of the text states)
    with pytest.raises(ValueError, match=r"trained with text_encoder .*\(pooled_config, pooled_rule differ\)"):
        train.main(tiny_run(tmp_path / "b", encoder_dir, pooled_encoder=encoder_dir, init_from=str(our_run)))
    # a diffusers folder whose tensors do not fit its config.json: every name, by kind, and nothing loaded
    state = torch.load(released_tiny_preset / "transformer" / "pytorch_model_fsdp.bin", weights_only=True)
    del state["proj_out.bias"]
    state["extra.weight"], state["x_embedder.bias"] = torch.zeros(1), torch.zeros(3)
    (tmp_path / "damaged").mkdir()
    torch.save(state, tmp_path / "damaged" / "model.bin")
    (tmp_path / "damaged" / "config.json").write_text(json.dumps(TINY_PRESET_FLUX))
    with pytest.raises(ValueError, match=r"nothing was loaded: 1 missing \(proj_out\.bias\); 1 unexpected "
                                         r"\(extra\.weight\); 1 of another shape \(x_embedder\.bias \(3,\) for \(64,\)\)"):
        train.main(release_run(tmp_path / "c", released_tiny_preset, resolution=32, init_from=str(tmp_path / "damaged")))
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="holds no weights we read: give one of our checkpoints"):
        train.main(tiny_run(tmp_path / "d", encoder_dir, init_from=str(tmp_path / "empty")))


def test_flop_count_of_2b_at_1024_matches_spec_section_7():
    """docs/method.md §7: 10+10+10 steps vs 30, 256 text tokens, batch 1: NAMI 158, flow only 174, flat 392 TFLOP
    (counted on the meta device: no memory needed for 2B parameters)."""
    import bench
    flops = bench.flops_table(bench.argparse.Namespace(size="2b", res=1024, steps="10,10,10", text_len=256))
    assert flops["NAMI"] / 1e12 == pytest.approx(158.3, rel=2e-3)
    assert flops["flow only"] / 1e12 == pytest.approx(173.8, rel=2e-3)
    assert flops["flat"] / 1e12 == pytest.approx(391.8, rel=2e-3)


def test_sampling_benchmark_times_every_stage_of_both_samplers(capsys):
    """bench.py's Table-2 path runs NAMI and flat in one process and reports one time per stage."""
    import bench
    r = bench.main(["--size", "tiny", "--res", "32", "--steps", "1,1,2", "--repeat", "2", "--warmup", "0", "--cfg", "1"])
    assert len(r["stages"]) == 3 and r["nami"] == pytest.approx(sum(r["stages"]))  # median of 2 = mean: adds up
    assert "| flat |" in capsys.readouterr().out


def test_default_steps_give_every_sampler_the_same_30_steps():
    """A flat (K = 1) checkpoint must not be sampled with fewer steps than NAMI's 10+10+10."""
    assert nami.default_steps(3) == [10, 10, 10] and nami.default_steps(1) == [30]
    assert all(sum(nami.default_steps(k)) == 30 and max(nami.default_steps(k)) - min(nami.default_steps(k)) <= 1
               for k in range(1, 7))


# ----------------------------------------------------------------------------------------------
# The layout: README's paper -> code table names real functions; scripts never import scripts
# ----------------------------------------------------------------------------------------------

SCRIPTS = ("train", "sample", "eval", "bench", "ablate")


def test_readme_names_functions_that_exist():
    import importlib
    import re
    readme = (Path(__file__).parent / "README.md").read_text()
    table = readme[readme.index("| paper | computed by |"):readme.index("## Presets")]
    names = {n for cell in (row.split("|")[2] for row in table.splitlines()[2:] if row.startswith("| "))
             for n in re.findall(r"`([a-z_0-9]+(?:\.[A-Za-z_0-9]+)+)`", cell)}
    assert len(names) > 30
    for name in sorted(names):
        module, *attrs = name.split(".")
        obj = importlib.import_module(module)
        for attr in attrs:
            assert hasattr(obj, attr), f"README's paper -> code table names {name}, which does not exist"
            obj = getattr(obj, attr)
        assert callable(obj), name


def test_scripts_import_modules_only():
    import ast
    for script in SCRIPTS:
        tree = ast.parse((Path(__file__).parent / f"{script}.py").read_text())
        imported = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        imported |= {n.module.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
        assert not imported & set(SCRIPTS) - {script}, f"{script}.py imports {imported & set(SCRIPTS)}"
