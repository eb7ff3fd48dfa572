"""The built-in shapes world (toyworld/shapes.py: deterministic, every category, held-out pairs kept
out), its levels (shapes.LEVELS), the level-aware judge, the block-artefact measure and the tiny
AutoencoderKL of the default run (toyworld/tinyvae.py, weights/shapes-vae). Each test takes seconds.

    python -m pytest -q tests/test_levels.py
"""
from __future__ import annotations

import copy
import dataclasses
import hashlib
import importlib.util
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import nami
from common import images
from experiments import eval
from toyworld import judge as ev, shapes, tinyvae
from training import checkpoint


def fingerprint(samples) -> str:
    return hashlib.sha256("|".join(
        f"{s.caption};{s.background:.6f};{[(o.shape, o.color, tuple(round(v, 6) for v in o.box)) for o in s.objects]}"
        for s in samples).encode()).hexdigest()


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


def test_level_3_is_the_world_as_it_was_before_levels():
    # pinned from toyworld/shapes.py as it was before levels existed (commit b420bb9): old results stay valid
    assert [shapes.make_sample(0, i).caption for i in range(6)] == [
        "a drawing of a red circle and an orange circle", "an orange circle",
        "a photo of a purple circle and a green triangle", "a blue triangle", "four squares",
        "an image of a blue square to the left of a yellow circle"]
    samples = [shapes.make_sample(7, i, split, level=3) for split in ("train", "heldout") for i in range(300)]
    assert fingerprint(samples) == "ef3ce84d8e8cfc35827a516641bda27ef2a04a576aee4e4bad1a8c782a4b7867"


def test_each_level_draws_its_categories_is_a_superset_and_keeps_the_heldout_pairs_out():
    assert set(shapes.LEVELS[1]) < set(shapes.LEVELS[2]) < set(shapes.LEVELS[3]) == set(shapes.CATEGORIES)
    for level, categories in shapes.LEVELS.items():
        drawn = [shapes.make_sample(0, i, level=level) for i in range(600)]
        assert {s.category for s in drawn} == set(categories)
        assert all((o.color, o.shape) not in shapes.HELDOUT_PAIRS for s in drawn for o in s.objects)
        named = " ".join(shapes.EXAMPLE_PROMPTS[level])
        assert not any(f"{c} {s}" in named for c, s in shapes.HELDOUT_PAIRS)
    # a category's sample does not depend on the level it is asked at
    assert shapes.make_sample(5, 3, category="colors", level=1).caption == shapes.make_sample(5, 3, category="colors").caption
    with pytest.raises(ValueError, match="not in world level 1"):
        shapes.make_sample(0, 0, category="counting", level=1)
    with pytest.raises(ValueError, match="does not exist"):
        shapes.batch(0, 0, 2, 16, level=4)


def test_level_0_is_level_1_centred_at_one_size_and_its_real_renders_pass_the_judge():
    """Level 0: the captions of level 1, sample for sample, each object in the centre at
    CENTRED_SIZE of the side; the judge reads every real render of it (held-out pairs too)."""
    for split in ("train", "heldout"):
        zero = [shapes.make_sample(3, i, split, level=0) for i in range(200)]
        one = [shapes.make_sample(3, i, split, level=1) for i in range(200)]
        assert [s.caption for s in zero] == [s.caption for s in one]
        assert [(o.shape, o.color) for s in zero for o in s.objects] == [(o.shape, o.color) for s in one for o in s.objects]
        low, high = (1 - shapes.CENTRED_SIZE) / 2, (1 + shapes.CENTRED_SIZE) / 2
        assert all(len(s.objects) == 1 and s.objects[0].box == (low, low, high, high) for s in zero)
        assert len({s.objects[0].box for s in one}) == 200  # level 1: anywhere, at any size
    items = ev.prompt_set(20, level=0)
    assert [s.caption for _, s in items] == [s.caption for _, s in ev.prompt_set(20, level=1)]
    result = ev.score(ev.real_renders(items, 64, 64), items, level=0)
    assert list(result["categories"]) == ["single_object", "colors"] and result["level"] == 0
    assert result["overall"] == 1.0 and result["heldout"]["accuracy"] == 1.0


def test_judge_scores_only_the_levels_categories():
    items = ev.prompt_set(4, level=1)
    assert [s.category for split, s in items if split == "train"] == ["single_object"] * 4 + ["colors"] * 4
    assert [s.category for split, s in items if split == "heldout"] == ["colors"] * 4
    assert ev.prompt_set(3, level=3) == ev.prompt_set(3)  # level 3: the prompt set as before
    result = ev.score(ev.real_renders(items, 32, 32), items, level=1)
    assert list(result["categories"]) == ["single_object", "colors"] and result["level"] == 1
    assert result["overall"] == 1.0 and result["overall_se"] == 0.0 and result["heldout"]["accuracy"] == 1.0
    assert "mean of the two" in ev.table(result)
    assert ev.standard_error(0.5, 100) == pytest.approx(0.05)


def test_judge_breaks_the_score_down_by_the_shape_a_prompt_names():
    items = ev.prompt_set(12, level=1, heldout=False)
    real = ev.score(ev.real_renders(items, 64, 64), items, level=1)["by_shape"]
    assert set(real) == set(shapes.SHAPES) and all(a["accuracy"] == 1.0 for a in real.values())
    assert sum(a["n"] for a in real.values()) == len(items)
    # the same prompts, every object drawn as a disc in its box: the square and triangle rows fail
    discs = [shapes.Sample(s.caption, s.category, [dataclasses.replace(o, shape="circle") for o in s.objects],
                           s.background, s.prompt) for _, s in items]
    redrawn = torch.stack([images.to_tensor(shapes.render(s, 64)) for s in discs])
    result = ev.score(redrawn, items, level=1)
    assert result["by_shape"]["square"]["accuracy"] == 0.0
    assert result["by_shape"]["circle"]["accuracy"] == 1.0 and result["by_shape"]["triangle"]["accuracy"] == 0.0
    assert "by the shape a prompt names: circle 1.00, square 0.00, triangle 0.00" in ev.table(result)


def test_block_artefacts_find_nearest_neighbour_jumps_and_not_real_renders():
    reals = ev.real_renders(ev.prompt_set(20, heldout=False, level=1), 32, 32)
    real = ev.block_artefacts(reals)
    assert abs(real["excess"]) < 0.05 and 0.3 < real["aligned"] < 0.7
    jumped = ev.block_artefacts(F.interpolate(F.avg_pool2d(reals, 2), scale_factor=2, mode="nearest"))
    assert jumped["aligned"] == 1.0 and jumped["shifted"] == 0.0
    smooth = ev.block_artefacts(F.interpolate(F.avg_pool2d(reals, 2), scale_factor=2, mode="bilinear"))
    assert smooth["excess"] < 0
    # latents: the same measure with the latent tolerance
    z = torch.randn(8, 4, 4, 4)
    assert ev.block_artefacts(F.interpolate(z, scale_factor=2), ev.LATENT_TOL)["excess"] == 1.0
    assert abs(ev.block_artefacts(torch.randn(8, 4, 8, 8), ev.LATENT_TOL)["excess"]) < 0.05


def test_tiny_vae_is_a_diffusers_autoencoderkl_trained_and_saved_by_our_code(tmp_path):
    from diffusers import AutoencoderKL

    from common import encoders
    vae = tinyvae.build(channels=(8, 8), latent_channels=4, size=16)
    assert isinstance(vae, AutoencoderKL)
    losses = tinyvae.train(vae, steps=3, batch_size=4, size=16, log_every=0)
    assert len(losses) == 3 and all(m > 0 and k >= 0 for m, k in losses)
    mean, std = tinyvae.latent_stats(vae, n=64, size=16)
    vae.register_to_config(shift_factor=mean, scaling_factor=1 / std)
    vae.save_pretrained(tmp_path / "vae", safe_serialization=True)
    loaded = encoders.load_autoencoder(tmp_path / "vae")  # the --vae PATH path of train.py and sample.py
    z = loaded.encode(tinyvae.renders(1, 0, 64, 16))
    assert loaded.factor == 2 and z.shape == (64, 4, 8, 8)
    assert abs(z.mean().item()) < 1e-4 and z.std().item() == pytest.approx(1.0, abs=1e-3)


def test_scale_equivariance_term_is_nami_pyramid_decoded_and_trains_the_autoencoder():
    vae = tinyvae.build(channels=(8, 8), latent_channels=4, size=16)
    x = tinyvae.renders(0, 0, 4, 16)
    z = vae.encode(x).latent_dist.mode()
    g = torch.Generator().manual_seed(0)
    j = int(torch.randint(1, 3, (1,), generator=torch.Generator().manual_seed(0)))  # the draw scale_loss makes
    coarse = z
    for _ in range(j):
        coarse = nami.down(coarse)  # the pyramid's own Down, twice for stage 1's level
    expected = (vae.decode(coarse).sample - F.avg_pool2d(x, 2 ** j)).pow(2).mean()
    assert tinyvae.scale_loss(vae, z, x, g).item() == pytest.approx(expected.item(), rel=1e-5)
    weights = {}
    for w in (0.0, 1.0):  # its gradient changes what is learnt
        vae = tinyvae.build(channels=(8, 8), latent_channels=4, size=16)
        tinyvae.train(vae, steps=1, batch_size=4, size=16, log_every=0, equivariance=w)  # one step: the same z
        weights[w] = torch.cat([p.detach().flatten() for p in vae.encoder.parameters()])
    assert not torch.equal(weights[0.0], weights[1.0])


COMMITTED = Path(__file__).resolve().parents[1] / "weights" / "shapes-vae"


@pytest.mark.skipif(not (COMMITTED / "config.json").is_file(), reason="weights/shapes-vae not committed")
def test_committed_vae_is_small_normalised_and_reconstructs_the_world_for_the_judge():
    from common import encoders
    files = list(COMMITTED.glob("*.safetensors"))
    assert len(files) == 1 and files[0].stat().st_size < 5e6
    record = json.loads((COMMITTED / "training.json").read_text())
    assert "python -m toyworld.tinyvae --out weights/shapes-vae" in record["command"]
    vae = encoders.load_autoencoder(COMMITTED)
    assert (vae.factor, vae.channels) == (4, 4)
    items = ev.prompt_set(6, heldout=True, level=1)
    reals = ev.real_renders(items, 64, 64)
    z = vae.encode(reals)
    assert z.shape == (len(items), 4, 16, 16) and abs(z.mean().item()) < 0.2 and 0.8 < z.std().item() < 1.2
    recon = vae.decode(z)
    assert (recon - reals).pow(2).mean().item() < 0.01
    assert ev.score(recon, items, level=1)["overall"] == 1.0  # held-out pairs included: never seen, still rebuilt


@pytest.mark.skipif(not (COMMITTED / "config.json").is_file(), reason="weights/shapes-vae not committed")
def test_vae_runs_channels_last_with_the_results_of_the_default_layout():
    """encoders.VAE keeps its convolutions in channels-last memory (1.4x faster encoding on this
    CPU, docs/benchmarks.md); the numbers stay those of the default layout."""
    from common import encoders
    vae = encoders.load_autoencoder(COMMITTED)
    assert vae.model.encoder.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    plain = copy.deepcopy(vae.model).to(memory_format=torch.contiguous_format)
    images = ev.real_renders(ev.prompt_set(2, level=1), 64, 64)
    z = vae.encode(images)
    close = dict(atol=2e-4, rtol=0)  # float sums in another order
    torch.testing.assert_close(z, (plain.encode(images).latent_dist.mode() - vae.shift) * vae.scaling, **close)
    torch.testing.assert_close(vae.decode(z), plain.decode(z / vae.scaling + vae.shift).sample.clamp(-1, 1), **close)


@pytest.mark.skipif(not (COMMITTED / "config.json").is_file(), reason="weights/shapes-vae not committed")
@pytest.mark.skipif(importlib.util.find_spec("accelerate") is not None, reason="accelerate is installed")
def test_loading_the_vae_without_accelerate_prints_no_advice_to_install_it(capfd):
    from common import encoders
    capfd.readouterr()
    encoders.load_autoencoder(COMMITTED)
    assert "accelerate" not in "".join(capfd.readouterr())


@pytest.mark.skipif(not (COMMITTED / "config.json").is_file(), reason="weights/shapes-vae not committed")
def test_bench_times_both_vae_layouts_in_one_process():
    from experiments import bench
    times = bench.main(["--vae", str(COMMITTED), "--batch", "2", "--res", "16", "--repeat", "2", "--warmup", "0"])
    assert sorted(times) == sorted((n, j) for n in ("default", "channels-last") for j in ("encode", "decode"))
    assert all(len(t) == 2 and min(t) > 0 for t in times.values())


# ---------------------------------------------------------------------------------------------
# nami.with_jump_noise: the fine noise BridgeFlow cannot make, added at each jump (docs/method.md §8)
# ---------------------------------------------------------------------------------------------

def up_only(x, k):
    return nami.up(x)


def test_without_jump_noise_a_stage_starts_constant_on_every_cell():
    """The failure the jump noise mends: the bridged start is constant inside every 2×2 cell, so
    along Eq. 3 the inside-cell part of x̂_t is (1 − t')·(that of x): the detail of the stage is
    fixed by the model's first prediction, not made by the flow (docs/method.md §8)."""
    windows = nami.stage_windows()
    g = torch.Generator().manual_seed(0)
    x, eps = torch.randn(4, 4, 16, 16, generator=g), torch.randn(4, 4, 16, 16, generator=g)
    x_s, _ = nami.stage_points(x, eps, 3, windows)
    assert (x_s - nami.up(nami.down(x_s))).abs().max() < 1e-6
    x_s, _ = nami.stage_points(x, eps, 3, windows, nami.with_jump_noise(None, eps, windows))
    inside = x_s - nami.up(nami.down(x_s))
    torch.testing.assert_close(inside, windows[2][0] * (eps - nami.up(nami.down(eps))))


def test_jump_noise_is_the_fine_part_of_pyramid_flows_start_and_independent_of_the_coarse_noise():
    eps = torch.randn(64, 4, 16, 16, generator=torch.Generator().manual_seed(1))
    s = 0.5
    windows = [(1.0, 0.6), (0.8, 0.3), (s, 0.0)]
    jump = nami.with_jump_noise(lambda x, k: torch.zeros_like(nami.up(x)), eps, windows)
    n = jump(torch.zeros(64, 4, 8, 8), 3)
    assert nami.down(n).abs().max() < 1e-6                           # nothing on the coarse grid
    assert n.var().item() == pytest.approx(0.75 * s ** 2, rel=0.03)  # BridgeFlow's irreducible MSE
    coarse = nami.up(2 * nami.down(eps))                              # what stage 2 saw of this noise
    assert abs((n * coarse).mean().item()) < 0.01
    # x̂_s^pyr(k) = its coarse part (what a perfect BridgeFlow makes) + the jump noise
    pyr = nami.pyramid_start(torch.randn(64, 4, 8, 8), eps, s)
    torch.testing.assert_close(pyr, nami.up(nami.down(pyr)) + n)
    # stage 2's jump uses stage 2's noise, 2·Down(ε), of the same coupled pyramid
    eps_2 = nami.noise_pyramid(eps, 3)[1]
    torch.testing.assert_close(jump(torch.zeros(64, 4, 4, 4), 2), 0.8 * (eps_2 - nami.up(nami.down(eps_2))))


def test_sampler_and_training_start_a_stage_at_the_same_point_with_jump_noise():
    """generate() with a jump-noise model carries stage 2's end across the jump exactly as
    Algorithm1Loss builds stage 3's start: the same BridgeFlow, the same fine noise of the seed."""
    import bridgeflow
    windows, K = nami.stage_windows(), 3
    g = torch.Generator().manual_seed(2)
    x, eps = torch.rand(2, 4, 16, 16, generator=g), torch.randn(2, 4, 16, 16, generator=g)
    bridge = bridgeflow.BridgeFlow(4, [(4, 4), (8, 8), (16, 16)])
    with torch.no_grad():
        for p in bridge.parameters():
            p.normal_(generator=g)
    xs, es = nami.image_pyramid(x, K), nami.noise_pyramid(eps, K)
    end_2 = nami.stage_endpoint(xs[1], es[1], windows[1][1])
    jump = nami.with_jump_noise(bridge, eps, windows)
    zero = lambda x, k, t, tau: torch.zeros_like(x)  # noqa: E731
    out = nami.progressive_sample(zero, eps, nami.uniform_grids([1, 1, 1]), jump, start=(2, end_2))
    expected = nami.stage_points(xs[2], es[2], 3, windows, jump)[0]
    torch.testing.assert_close(out[-1], expected)
    assert not torch.allclose(expected, nami.stage_points(xs[2], es[2], 3, windows, bridge)[0])


def test_train_records_its_world_level_and_jump_noise_and_the_judge_takes_the_level(tmp_path, encoder_dir):
    import train
    from conftest import tiny_run
    from training import config
    out = tmp_path / "run"
    train.main(tiny_run(out, encoder_dir, world_level=1, jump_noise=True, max_steps=2, ckpt_every=2))
    saved = json.loads((out / "ckpt-0000002" / "config.json").read_text())
    assert saved["train"]["world_level"] == 1 and saved["model"]["jump_noise"] is True
    result = eval.main(["--ckpt", str(out), "--per-category", "2", "--steps", "1,1,1", "--json"])
    assert list(result["categories"]) == ["single_object", "colors"] and result["settings"]["level"] == 1
    assert list(result["heldout"]["categories"]) == ["colors"]
    with pytest.raises(ValueError, match="world-level"):
        config.validate(tiny_run(tmp_path / "bad", encoder_dir, world_level=4))


def test_defaults_follow_the_data_the_built_in_world_in_vae_latents_with_jump_noise(tmp_path):
    from training import config
    built_in = config.TrainConfig()
    assert built_in.vae == config.SHAPES_VAE and built_in.jump_noise is True and built_in.world_level == 0
    folder = config.TrainConfig(data=str(tmp_path))
    assert folder.vae is None and folder.jump_noise is False  # an image folder: the paper's method, pixels
    assert config.TrainConfig(vae="none").vae is None and config.TrainConfig(jump_noise=False).jump_noise is False
    assert config.parse_args([]).out == "runs/shapes-toy"


# The default run's first step (loss, then stages 1-3), torch 2.13.0 on a CPU; before any update, so
# it depends only on the data feed, the initial weights, BridgeFlow's 5 Adam steps and the loss
PINNED_FIRST_LOSSES = [1.25192, 0.20062, 0.54330, 0.50800]  # world level 0 (1.23720, 0.19264, 0.55315, 0.49141 on level 1)


def default_run_losses(out: Path) -> list[dict]:
    """The first three steps of `python train.py` as it is (every default: toy, 64² in the shapes VAE's
    latents, level 0, jump noise, batch 32, fused AdamW), with a shorter BridgeFlow pre-training."""
    from training import config
    import train
    train.main(config.TrainConfig(out=str(out), max_steps=3, bridge_steps=5, log_every=1, ckpt_every=3,
                                  sample_every=10 ** 6, progress=False))
    return checkpoint.read_log(out)


def test_the_default_run_is_deterministic_and_its_first_losses_are_pinned(tmp_path):
    """The default run repeats itself to the last digit (its log's losses and gradient norms), and its
    first step's losses per stage, taken before any update, are pinned: a change to the data feed,
    the model's initialisation or the loss shows here."""
    first, second = default_run_losses(tmp_path / "a"), default_run_losses(tmp_path / "b")
    keys = ("loss", "loss_stage1", "loss_stage2", "loss_stage3", "grad_norm")
    assert [[r[k] for k in keys] for r in first] == [[r[k] for k in keys] for r in second]
    assert [first[0][k] for k in keys[:4]] == pytest.approx(PINNED_FIRST_LOSSES, abs=2e-4)
