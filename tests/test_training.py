"""Training runs end to end on a tiny model (train.py, training/): save and resume, training in a VAE's
latent space, an image folder against its cache, a cached run holding no text encoder, the words a
checkpoint records for sample.py's note, and --init-from (our runs, the authors' release, a flat or
diffusers transformer, and weights that do not fit).

    python -m pytest -q tests/test_training.py        # about 3 minutes on 2 CPU cores
"""
from __future__ import annotations

import dataclasses
import json
import math

import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from test_cli import run_cli

import nami
import train
from common import encoders
from conftest import TINY_FLUX, randomize, save_tiny_vae, tiny_run
from datafeed import feed
from toyworld import shapes
from training import checkpoint, config, release, session


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


PAPER_RECIPE = dict(lr=1e-4, max_steps=250_000, stage_mix="4:2:1,2:4:1,1:2:4", mix_fractions="0.48,0.32,0.2",
                    final_lr_scale=0.5, bridge_steps=10_000, text_len=256, jump_noise=False, ema_decay=0.9999)
TOY_RECIPE = dict(lr=1e-3, max_steps=1200, stage_mix="4:2:1,2:4:1,1:2:4", mix_fractions="0.48,0.32,0.2",
                  final_lr_scale=0.5, bridge_steps=1000, text_len=16, jump_noise=True, ema_decay=0.995)


@pytest.mark.parametrize("size", sorted(nami.PRESETS))
def test_each_preset_trains_its_recipe_and_a_flag_changes_it(size):
    """The paper's sizes train with paper §4.3's recipe (lr 1e-4, 4:2:1 for 120k steps, 2:4:1 for 80k, 1:2:4 at
    lr 5e-5 for 50k, BridgeFlow ~10k steps), the release's 256 text tokens and no jump noise; the small presets
    with ours. What config.json records (asdict of the settings) holds the values, not None."""
    cfg = config.parse_args(["--size", size])
    recipe = PAPER_RECIPE if size in ("0.6b", "2b", "flux1-dev") else TOY_RECIPE
    assert {name: getattr(cfg, name) for name in recipe} == recipe
    assert all(dataclasses.asdict(cfg)[name] is not None for name in recipe)
    flags = config.parse_args(["--size", size, "--lr", "3e-4", "--jump-noise", "--text-len", "77", "--data", "."])
    assert (flags.lr, flags.jump_noise, flags.text_len) == (3e-4, True, 77)
    assert config.parse_args(["--size", size, "--data", "."]).jump_noise is False  # a folder: the paper's method
    assert ("paper §4.3" in config.describe_recipe(cfg)) == (recipe is PAPER_RECIPE)


def test_a_run_records_the_recipe_it_trained_and_prints_it(tmp_path, encoder_dir, capsys):
    train.main(tiny_run(tmp_path, encoder_dir, max_steps=1, lr=None, ema_decay=None))
    recorded = json.loads((checkpoint.latest_checkpoint(tmp_path) / "config.json").read_text())["train"]
    assert (recorded["lr"], recorded["ema_decay"], recorded["text_len"]) == (1e-3, 0.995, 16)
    assert "recipe (ours, for a CPU" in capsys.readouterr().out


def test_four_stages_train_resume_and_sample_end_to_end(tmp_path, encoder_dir, capsys):
    """K = 4, the paper's next stage count (2048² from 256²; docs/method.md §5): the cut points by the presets' rule,
    BridgeFlow for three jumps, the stage mix of four stages, exact resume, and sample.py drawing all four stages."""
    import sample
    four = dict(window_ratios=(1, 1, 1, 1), max_steps=6, val_every=0)
    straight = train.main(tiny_run(tmp_path / "a", encoder_dir, **four))
    first = train.main(tiny_run(tmp_path / "b", encoder_dir, stop_after=3, **four))
    resumed = train.main(tiny_run(tmp_path / "b", encoder_dir, resume=True, **four))
    assert first["losses"] + resumed["losses"] == straight["losses"]
    _, recorded, parts = checkpoint.load_checkpoint(tmp_path / "a")
    assert recorded["model"]["cuts"] == [1, 2, 3, 3] and parts["bridge"]["scale"].shape == (3,)
    assert {k for r in checkpoint.read_log(tmp_path / "a") for k in r if k.startswith("loss_stage")} == {
        "loss_stage1", "loss_stage2", "loss_stage3", "loss_stage4"}
    sample.main(["a red circle", "--ckpt", str(tmp_path / "a"), "--show-stages", "--out", str(tmp_path / "four.png")])
    assert "stage 4:" in capsys.readouterr().out and Image.open(tmp_path / "four.png").text["steps"] == "[8, 8, 7, 7]"


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
    """--data encodes on the fly, --cache reads what `python -m datafeed cache` stored: the same data
    order, encodings and losses; a cache built for other settings is refused."""
    make_image_folder(tmp_path / "images")
    folder = train.main(tiny_run(tmp_path / "a", encoder_dir, data=str(tmp_path / "images"), workers=0,
                                 max_steps=3, ckpt_every=3))
    r = run_cli("-m", "datafeed", "cache", str(tmp_path / "images"), "--out", str(tmp_path / "cache"), "--resolution", "16",
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
    r = run_cli("-m", "datafeed", "cache", str(tmp_path / "images"), "--out", str(tmp_path / "cache"), "--resolution", "16",
                "--text-encoder", encoder_dir, "--text-len", "16", "--dtype", "fp32")
    assert r.returncode == 0, r.stderr
    loaded, real_load, real_build = [], encoders.TextEncoder.load, session.build_model
    monkeypatch.setattr(encoders.TextEncoder, "load", lambda self: (loaded.append(self), real_load(self))[1])

    def build_model(*args, **kwargs):
        assert loaded and all(e.model is None for e in loaded), "a text encoder holds its weights during training"
        return real_build(*args, **kwargs)
    monkeypatch.setattr(session, "build_model", build_model)
    result = train.main(tiny_run(tmp_path / "run", encoder_dir, cache=str(tmp_path / "cache"), workers=0,
                                 max_steps=2, ckpt_every=2, sample_every=2))
    assert len(loaded) == 1 and loaded[0].model is None and all(math.isfinite(l) for l in result["losses"])
    assert (tmp_path / "run" / "samples" / "step-0000002.png").is_file()


def test_a_prompt_outside_the_training_captions_gets_a_note(tmp_path, encoder_dir):
    """config.json records the words of the training captions: the built-in world's from toyworld/shapes.py's
    templates, a folder's from its captions (function words left out, none past the limit); a prompt
    that uses none of them is noted in one line, pointing to --weights (sampled all the same: the CLI test)."""
    vocabulary = feed.vocabulary(tiny_run(tmp_path, encoder_dir))
    assert {"red", "circle", "triangles", "three", "left", "above"} <= set(vocabulary) and "photo" not in vocabulary
    captions = [shapes.make_sample(0, i).caption for i in range(300)]
    assert all(set(feed.words(c)) <= shapes.caption_words() for c in captions)  # the templates' words, all of them
    make_image_folder(tmp_path / "images", n_full=3, n_small=0)
    assert feed.vocabulary(tiny_run(tmp_path, encoder_dir, data=str(tmp_path / "images"))) == ["blue", "green", "noise", "orange"]
    assert feed.caption_vocabulary([f"w{i}" for i in range(feed.VOCABULARY_LIMIT + 1)]) is None
    assert feed.vocabulary(tiny_run(tmp_path, encoder_dir, cache=str(tmp_path))) is None  # a cache keeps no captions
    note = feed.world_note("a photo of a cat", vocabulary)
    assert "circle" in note and "--weights" in note and "\n" not in note
    for prompt in ("a photo of a red dog", "", "a RED circle"):
        assert feed.world_note(prompt, vocabulary) is None, prompt
    assert feed.world_note("a photo of a cat", None) is None  # a checkpoint that records no vocabulary


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


def test_a_guidance_distilled_flux_gives_diffusers_velocity_and_converts_to_nami(tmp_path, monkeypatch,
                                                                               released_tiny_preset):
    """FLUX.1-dev's layout (guidance_embeds: the guidance g is an input, g·1000 embedded beside τ·1000): the same
    velocity as diffusers', one pass per step in the sampler instead of CFG's two, and --init-from converts it
    (here a tiny one, through a tiny preset with the guidance embedding) with --velocity global."""
    from diffusers import FluxTransformer2DModel

    from test_nami import flux_velocity, inputs
    flux = randomize(FluxTransformer2DModel(**dict(TINY_PRESET_FLUX, guidance_embeds=True)), seed=6).eval()
    flux.save_pretrained(tmp_path / "dev")
    ours = release.load_transformer(tmp_path / "dev")
    x, tau, txt, pooled = inputs(ours.cfg, B=2, H=8, W=8)
    g = torch.tensor([3.5, 1.0])
    with torch.no_grad():
        want = flux_velocity(flux, x, tau, txt, pooled, g)
        torch.testing.assert_close(ours(x, tau, txt, pooled, guidance=g), want, rtol=1e-4, atol=1e-4 * want.abs().max())
        with pytest.raises(ValueError, match="guidance-distilled"):
            ours(x, tau, txt, pooled)
        calls = []
        ours.register_forward_hook(lambda module, args, out: calls.append(args[0].shape[0]))
        v = nami.model_velocity(ours, txt, pooled, txt * 0, pooled * 0, 3.5)(x, 3, 0.5, 0.25)
        torch.testing.assert_close(v, ours(x, torch.full((2,), 0.25), txt, pooled, 3, torch.full((2,), 3.5)))
        assert calls[0] == 2  # no unconditional half
    monkeypatch.setitem(nami.PRESETS, "tiny", dict(nami.PRESETS["tiny"], guidance_embeds=True))
    result = train.main(release_run(tmp_path / "nami", released_tiny_preset, resolution=32, max_steps=2, ckpt_every=2,
                                    init_from=str(tmp_path / "dev"), velocity="global", val_samples=4))
    _, saved, new = checkpoint.load_checkpoint(tmp_path / "nami")
    assert saved["model"]["guidance_embeds"] and saved["model"]["velocity"] == "global"
    assert "time_text_embed.guidance_embedder.linear_1.weight" in new["model"]
    assert all(math.isfinite(loss) for loss in result["losses"]) and (tmp_path / "nami" / "samples").is_dir()


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
