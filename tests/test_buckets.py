"""Aspect-ratio buckets (datafeed/buckets.py, feed.BucketSampler, train.py --buckets): the bucket set, the
assignment and crops of made-up image sizes, the data order on one and two ranks and on resume,
every stage of a non-square image, folders and caches of mixed shapes end to end, the built-in
world at 2:1 and its judge, and sampling at bucket sizes.

    python -m pytest -q tests/test_buckets.py
"""
from __future__ import annotations

import json

import pytest
import torch
from PIL import Image

import nami
import train
from bridgeflow import BridgeFlow
from common.encoders import TextEncoder, load_autoencoder
from conftest import tiny_run
from datafeed import buckets, commands, feed
from datafeed.folders import FolderDataset
from toyworld import judge, shapes
from training import config


def test_the_bucket_set_of_1024_is_the_one_trainers_use():
    sizes = buckets.bucket_set(1024, 64)
    assert sizes == [(1024, 1024), (1152, 896), (896, 1152), (1216, 832), (832, 1216), (1344, 768), (768, 1344),
                     (1536, 640), (640, 1536)]
    for multiple, resolution in ((8, 64), (32, 64), (16, 256), (64, 512)):
        for w, h in buckets.bucket_set(resolution, multiple):
            assert w % multiple == 0 and h % multiple == 0 and w * h <= resolution ** 2


@pytest.mark.parametrize("size, bucket, crop", [((3000, 2000), (1216, 832), 0.026), ((2000, 3000), (832, 1216), 0.026),
                                                ((1000, 1000), (1024, 1024), 0.0), ((4000, 1000), (1536, 640), 0.4),
                                                ((1920, 1080), (1344, 768), 0.016), ((500, 700), (832, 1216), 0.042)])
def test_each_image_goes_to_the_bucket_nearest_its_aspect(size, bucket, crop):
    sizes = buckets.bucket_set(1024, 64)
    chosen = sizes[buckets.nearest(*size, sizes)]
    assert chosen == bucket
    assert buckets.crop_share(*size, chosen) == pytest.approx(crop, abs=1e-3)


def test_cover_crop_keeps_the_centre_and_cuts_the_least():
    img = Image.new("RGB", (300, 100), (255, 0, 0))
    img.paste((0, 255, 0), (100, 0, 200, 100))  # the centre third green, red on either side
    out = buckets.cover_crop(img, (64, 64))
    assert out.size == (64, 64) and {c for _, c in out.getcolors()} == {(0, 255, 0)}
    wide = buckets.cover_crop(img, (96, 32))  # the same aspect: nothing cut, everything resized
    assert wide.size == (96, 32) and wide.getpixel((5, 16))[0] > 200 and wide.getpixel((48, 16))[1] > 200


def test_the_size_rule_holds_on_both_sides():
    bucket = (1216, 832)  # stage sizes 304×208, 608×416, 1216×832
    assert buckets.max_stage(1216, 832, bucket, 3) == 3
    assert buckets.max_stage(1300, 400, bucket, 3) == 1  # wide enough for all, tall enough for stage 1 only
    assert buckets.max_stage(700, 900, bucket, 3) == 2
    assert buckets.max_stage(300, 900, bucket, 3) == 0


def test_the_bucket_order_is_one_bucket_per_batch_deterministic_and_resumable():
    item_buckets = [0] * 13 + [1] * 7 + [2] * 2
    sampler = feed.BucketSampler(item_buckets, 4, seed=3)
    steps = iter(sampler)
    batches = [[next(steps) for _ in range(4)] for _ in range(3 * sampler.per_epoch)]
    assert sampler.per_epoch == 4 + 2 + 1
    for batch in batches:
        assert len({item_buckets[i] for i in batch}) == 1
    first_epoch = sorted(set(sum(batches[:sampler.per_epoch], [])))
    assert first_epoch == list(range(22))  # every image once an epoch (and the last batches wrap around)
    resumed = iter(feed.BucketSampler(item_buckets, 4, seed=3, start_step=5))
    assert [[next(resumed) for _ in range(4)] for _ in range(9)] == batches[5:14]
    assert batches[:7] != batches[7:14]  # a new order each epoch


def mixed_folder(root, n=12):
    """Landscape 2:1, portrait 1:2 and square images with captions, colours by index."""
    root.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        size = [(48, 24), (24, 48), (32, 32)][i % 3]
        Image.new("RGB", size, (20 * i, 255 - 20 * i, 90)).save(root / f"{i:02d}.png")
        (root / f"{i:02d}.txt").write_text(f"a picture number {i}")
    return root


def test_a_folder_of_mixed_shapes_is_bucketed(tmp_path):
    sizes = buckets.bucket_set(32, 8)
    ds = FolderDataset(mixed_folder(tmp_path / "imgs"), 32, 3, progress=False, bucket_sizes=sizes)
    for i in range(len(ds)):
        item, (w, h) = ds[i], sizes[ds.item_buckets[i]]
        assert item["image"].shape == (3, h, w)
        assert (w > h) == (ds.items[i].width > ds.items[i].height) and (w == h) == (ds.items[i].width == ds.items[i].height)
    square = FolderDataset(tmp_path / "imgs", 32, 3, progress=False)  # --no-buckets: squares as before
    assert {tuple(square[i]["image"].shape) for i in range(len(square))} == {(3, 32, 32)}


def folder_run(tmp_path, encoder_dir, **kw):
    return tiny_run(tmp_path, encoder_dir, resolution=32, max_steps=4, batch_size=6, ckpt_every=4, log_every=1, **kw)


def test_mixed_shapes_train_through_data_and_cache_with_the_same_losses(tmp_path, encoder_dir):
    folder = mixed_folder(tmp_path / "imgs")
    direct = train.main(folder_run(tmp_path / "direct", encoder_dir, data=str(folder), workers=0))
    commands.main(["cache", str(folder), "--out", str(tmp_path / "cache"), "--resolution", "32", "--stages", "3",
               "--text-encoder", encoder_dir, "--dtype", "fp32"])
    meta = json.loads((tmp_path / "cache" / "cache.json").read_text())
    assert len(meta["key"]["buckets"]) > 1 and len({s["bucket"] for s in meta["shards"]}) == 3
    cached = train.main(folder_run(tmp_path / "cached", encoder_dir, cache=str(tmp_path / "cache"), workers=0))
    assert direct["losses"] == pytest.approx(cached["losses"], rel=1e-4)
    with pytest.raises(ValueError, match="buckets"):  # a square run refuses the bucketed cache, naming why
        train.main(folder_run(tmp_path / "square", encoder_dir, cache=str(tmp_path / "cache"), buckets=False))


def test_one_and_two_ranks_draw_the_same_bucketed_batches(tmp_path, encoder_dir):
    folder = mixed_folder(tmp_path / "imgs")
    cfg = folder_run(tmp_path / "x", encoder_dir, data=str(folder), workers=0)
    encoder, pixels = TextEncoder(encoder_dir, 16, "cpu"), load_autoencoder(None)
    one = feed.Batches(cfg, encoder, pixels, 3, torch.device("cpu"), start_step=2, slots=[list(range(6))])
    two = [feed.Batches(cfg, encoder, pixels, 3, torch.device("cpu"), start_step=2, slots=[slot])
           for slot in ([0, 1, 2], [3, 4, 5])]
    for _ in range(3):
        x = one.next(text=False)[0]
        halves = [b.next(text=False)[0] for b in two]
        assert torch.equal(x, torch.cat(halves))


def test_every_stage_of_a_2_to_1_image_has_its_shape():
    x, eps = torch.randn(2, 4, 16, 32), torch.randn(2, 4, 16, 32)
    assert [tuple(p.shape[-2:]) for p in nami.image_pyramid(x, 3)] == [(4, 8), (8, 16), (16, 32)]
    assert [tuple(p.shape[-2:]) for p in nami.noise_pyramid(eps, 3)] == [(4, 8), (8, 16), (16, 32)]
    bridge = BridgeFlow(4, [(4, 4), (8, 8), (16, 16)])  # bias maps trained square, resized to each jump
    assert bridge(nami.image_pyramid(x, 3)[0], 2).shape == (2, 4, 8, 16)
    model = nami.Nami(nami.get_config("tiny", in_channels=4))
    txt, pooled = torch.randn(2, 5, 384), torch.randn(2, 384)
    for k, level in enumerate(nami.image_pyramid(x, 3), 1):
        assert model(level, torch.rand(2), txt, pooled, stage=k).shape == level.shape


def test_release_bridge_maps_apply_at_every_1024_bucket():
    bridge = BridgeFlow(16, [(32, 32), (64, 64), (128, 128)])  # the release's maps, trained at 1024²
    for w, h in buckets.bucket_set(1024, 64):
        end_of_stage_2 = torch.randn(1, 16, h // 8 // 2, w // 8 // 2)
        assert bridge(end_of_stage_2, 3).shape == (1, 16, h // 8, w // 8)


def test_the_built_in_world_at_2_to_1_trains_and_its_renders_pass_the_judge(tmp_path, encoder_dir):
    cfg = tiny_run(tmp_path, encoder_dir, resolution=32, aspect=2.0, world_level=1, max_steps=2, ckpt_every=2)
    assert buckets.size_for(2.0, 32, 8) == (40, 24)  # the bucket nearest 2:1 of 32² in pixels
    result = train.main(cfg)
    saved = json.loads((result["out"] / "ckpt-0000002" / "config.json").read_text())
    assert saved["size"] == [40, 24]
    items = judge.prompt_set(20, 2026, True, 1)
    reals = judge.real_renders(items, 96, 48)
    assert reals.shape[-2:] == (48, 96)
    scored = judge.score(reals, items, level=1, reals=reals)
    assert all(r["passed"] for r in scored["samples"])
    with pytest.raises(ValueError, match="between 1:4 and 4:1"):
        shapes.parse_aspect("9:1")
    with pytest.raises(ValueError, match="--aspect applies to the built-in world"):
        config.validate(tiny_run(tmp_path / "y", encoder_dir, data=str(tmp_path), aspect=2.0))


def test_sample_py_samples_a_non_square_run_at_its_size_and_refuses_sizes_no_stage_can_take(tmp_path, encoder_dir):
    import sample
    out = train.main(tiny_run(tmp_path, encoder_dir, resolution=32, aspect=2.0, world_level=1, max_steps=1,
                              ckpt_every=1))["out"]
    sample.main(["a red circle", "--ckpt", str(out), "--out", str(tmp_path / "wide.png"), "--upscale", "1"])
    picture = Image.open(tmp_path / "wide.png")
    assert picture.size == (40, 24) and picture.text["resolution"] == "40x24"  # its own size by default
    sample.main(["a red circle", "--ckpt", str(out), "--res", "24x40", "--out", str(tmp_path / "tall.png"),
                 "--upscale", "1"])
    assert Image.open(tmp_path / "tall.png").size == (24, 40)
    with pytest.raises(SystemExit, match=r"36x24 is not valid.*Nearest valid: width \[32, 40\]"):
        sample.main(["x", "--ckpt", str(out), "--res", "36x24", "--out", str(tmp_path / "bad.png")])


def test_a_bucketed_folder_on_two_gloo_ranks_repeats_one_process(tmp_path, encoder_dir):
    """torchrun with DDP: each rank loads its half of every global batch of one bucket; the losses
    are the one-process run's, from the folder and from its cache (whose lock rank 0 alone takes)."""
    from test_parallel import losses, one_process, torchrun
    folder = mixed_folder(tmp_path / "imgs")
    one_process(tmp_path / "one", encoder_dir, max_steps=3, data=str(folder), workers=0, buckets=True)
    torchrun(tmp_path / "two", encoder_dir, "--max-steps", "3", "--data", str(folder), "--workers", "0")
    assert losses(tmp_path / "two") == pytest.approx(losses(tmp_path / "one"), rel=1e-4)
    commands.main(["cache", str(folder), "--out", str(tmp_path / "cache"), "--resolution", "16", "--stages", "3",
                   "--text-encoder", encoder_dir, "--text-len", "16", "--dtype", "fp32"])
    torchrun(tmp_path / "cached", encoder_dir, "--max-steps", "3", "--cache", str(tmp_path / "cache"), "--workers", "0")
    assert losses(tmp_path / "cached") == pytest.approx(losses(tmp_path / "one"), rel=1e-4)


def test_the_least_squares_bridge_fit_over_two_buckets_is_the_minimum_over_them_resized_to_its_maps():
    """bridgeflow.fit on a square batch and a 2:1 batch: a dense map's (W, B) is closed_form over both,
    the 2:1 batch's inputs and targets resized bilinearly (antialiased) to the map's size first."""
    from bridgeflow import bridge_pairs, closed_form, fit
    import torch.nn.functional as F
    windows, g = nami.stage_windows(), torch.Generator().manual_seed(5)
    square, wide = torch.randn(6, 3, 16, 16, generator=g), torch.randn(6, 3, 16, 32, generator=g)
    noise = [torch.randn(x.shape, generator=g) for x in (square, wide)]
    bridge = BridgeFlow(3, [(4, 4), (8, 8), (16, 16)])
    fit(bridge, lambda step: ((square, noise[0]), (wide, noise[1]))[step], windows, steps=2)
    for k in (2, 3):
        pairs = [bridge_pairs(x, e, windows, k) for x, e in ((square, noise[0]), (wide, noise[1]))]
        side = bridge.shift[k - 2].shape[-1]
        u = [nami.up(p[0]).double() for p in pairs]
        y = [p[1].double() for p in pairs]
        u[1], y[1] = (F.interpolate(v, size=(side, side), mode="bilinear", align_corners=False, antialias=True)
                      for v in (u[1], y[1]))
        W, B = closed_form(torch.cat(u), torch.cat(y))
        assert bridge.scale[k - 2].item() == pytest.approx(W.item(), abs=1e-5)
        torch.testing.assert_close(bridge.shift[k - 2], B, atol=1e-5, rtol=0)
