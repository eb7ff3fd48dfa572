"""Tests of the data feed (datafeed/): image-folder scanning and conversion, Algorithm 1's stage rule,
the resumable sampler and the latent/text cache. Fast (seconds), no network, no common/encoders.py:
the text encoder and VAE are small fakes with the same interface.

    python -m pytest -q tests/test_data.py
"""
from __future__ import annotations

import itertools
import json
import random
import shutil
import struct
import zlib

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from common import images
from datafeed import cache, commands, feed, folders

# ----------------------------------------------------------------------------------------------
# a data folder with one of every case scan must handle
# ----------------------------------------------------------------------------------------------


def write_png_rgb16(path, pixels: np.ndarray):
    """A 16-bit-per-channel RGB PNG, written by hand (Pillow cannot save one)."""
    h, w, _ = pixels.shape
    raw = b"".join(b"\x00" + row.astype(">u2").tobytes() for row in pixels)  # filter 0 per row

    def chunk(tag, body):
        return struct.pack(">I", len(body)) + tag + body + struct.pack(">I", zlib.crc32(tag + body))
    header = struct.pack(">IIBBBBB", w, h, 16, 2, 0, 0, 0)  # depth 16, colour type 2 (RGB)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw))
                     + chunk(b"IEND", b""))


def gradient(w, h):
    """An RGB image with different content left and right (to see crops and flips)."""
    x = np.linspace(0, 255, w, dtype=np.float32)[None, :, None]
    y = np.linspace(0, 255, h, dtype=np.float32)[:, None, None]
    return Image.fromarray(np.concatenate([np.broadcast_to(x, (h, w, 1)), np.broadcast_to(y, (h, w, 1)),
                                           np.full((h, w, 1), 90, np.float32)], axis=2).astype(np.uint8))


DEEP_VALUES = np.array([[0, 257, 32768, 65535]], dtype=np.uint16)


def make_folder(root):
    """Returns the folder. 9 usable images of native side >= 16; every other file is a case."""
    root.mkdir(parents=True, exist_ok=True)

    def caption(name, text):
        (root / name).write_text(text)

    gradient(40, 32).save(root / "rgb.jpg", quality=95)
    caption("rgb.txt", "a gradient")
    Image.fromarray(np.full((20, 24), 200, np.uint8)).save(root / "gray.png")
    caption("gray.txt", "grey")
    pal = Image.new("P", (24, 24), 0)
    pal.putpalette([0, 0, 255] + [255, 0, 0] * 255)
    pal.putpixel((0, 0), 1)
    pal.info["transparency"] = 0  # palette entry 0 (blue) is transparent -> white
    pal.save(root / "palette.png", transparency=0)
    caption("palette.txt", "palette")
    rgba = np.zeros((24, 24, 4), np.uint8)
    rgba[..., 0] = 255
    rgba[:, :12, 3] = 255  # left half opaque red, right half fully transparent
    Image.fromarray(rgba, "RGBA").save(root / "rgba.png")
    caption("rgba.txt", "half red")
    Image.fromarray(np.tile(DEEP_VALUES, (16, 4))).save(root / "deep.png")  # mode I;16, 16 × 16
    caption("deep.txt", "sixteen bits")
    write_png_rgb16(root / "deep_rgb.png", np.tile(DEEP_VALUES[..., None], (16, 4, 3)))
    caption("deep_rgb.txt", "sixteen bits rgb")
    Image.new("CMYK", (20, 20), (0, 255, 255, 0)).save(root / "cmyk.jpg")
    caption("cmyk.txt", "cmyk red")

    gradient(64, 64).save(root / "truncated.png")
    blob = (root / "truncated.png").read_bytes()
    (root / "truncated.png").write_bytes(blob[: len(blob) // 2])
    caption("truncated.txt", "cut in half")
    (root / "empty.png").write_bytes(b"")
    caption("empty.txt", "zero bytes")
    gradient(20, 20).save(root / "nocap.png")
    gradient(12, 30).save(root / "tiny.png")  # shorter side 12 < 16
    caption("tiny.txt", "too small")
    (root / "notes.csv").write_text("a,b\n")
    caption("readme.txt", "a caption file with no image")

    sub = root / "sub"
    sub.mkdir()
    gradient(16, 16).save(sub / "a.png")
    (sub / "a.txt").write_text("from the txt file")
    gradient(18, 16).save(sub / "b.png")
    lines = [json.dumps({"image": "a.png", "text": "a from the manifest"}),
             "this is not json",
             json.dumps({"image": "gone.png", "text": "no such file"}),
             "",
             json.dumps({"file_name": "b.png", "text": "b from the manifest"})]
    (sub / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    return root


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return make_folder(tmp_path_factory.mktemp("data") / "images")


@pytest.fixture(scope="module")
def scanned(folder):
    return folders.scan(folder, min_size=16, progress=False)


# ----------------------------------------------------------------------------------------------
# scan and summary
# ----------------------------------------------------------------------------------------------


def test_scan_counts_every_case(scanned):
    items, counts = scanned
    assert sorted(it.rel for it in items) == sorted(
        ["rgb.jpg", "gray.png", "palette.png", "rgba.png", "deep.png", "deep_rgb.png", "cmyk.jpg",
         "sub/a.png", "sub/b.png"])
    expected = {"images": 9, "no caption": 1, "unreadable": 2, "too small": 1, "non-image": 1,
                "bad manifest line": 1, "missing image": 1, "orphan caption": 1,
                "grayscale": 1, "palette": 1, "RGBA": 1, "16-bit": 2, "CMYK": 1}
    assert {k: v for k, v in counts.items() if v} == expected
    assert counts.first["bad manifest line"] == "sub/metadata.jsonl:2"


def test_scan_captions_and_sizes(scanned):
    items, _ = scanned
    by = {it.rel: it for it in items}
    assert by["sub/a.png"].caption == "a from the manifest"  # the manifest wins over a.txt
    assert by["sub/b.png"].caption == "b from the manifest"  # "file_name" is read too
    assert by["rgb.jpg"].caption == "a gradient"
    assert (by["rgb.jpg"].width, by["rgb.jpg"].height, by["rgb.jpg"].native) == (40, 32, 32)


def test_summary_line_names_each_case(scanned):
    line = folders.summary_line(scanned[1])
    assert "\n" not in line and line.startswith("data: 9 images, skipped ")
    for words in ("1 without caption", "2 unreadable", "1 too small", "1 non-image files",
                  "1 bad metadata.jsonl lines (first: sub/metadata.jsonl:2)", "1 metadata.jsonl entries without",
                  "1 .txt files without an image", "converted 1 grayscale", "1 palette", "1 RGBA", "2 16-bit",
                  "1 CMYK"):
        assert words in line, (words, line)


def test_empty_and_useless_folders_raise(tmp_path):
    with pytest.raises(ValueError, match="no usable image.*same-named .txt caption"):
        folders.scan(tmp_path, progress=False)
    gradient(20, 20).save(tmp_path / "x.png")  # no caption
    with pytest.raises(ValueError, match="1 without caption"):
        folders.scan(tmp_path, progress=False)
    with pytest.raises(ValueError, match="not a folder"):
        folders.scan(tmp_path / "nope", progress=False)


def test_fingerprint_follows_captions(folder, tmp_path):
    items, _ = folders.scan(folder, min_size=16, progress=False)
    same, _ = folders.scan(folder, min_size=16, progress=False)
    assert folders.fingerprint(items) == folders.fingerprint(same)
    changed = [folders.Item(**{**it.__dict__, "caption": it.caption + "!"}) if i == 0 else it
               for i, it in enumerate(items)]
    assert folders.fingerprint(changed) != folders.fingerprint(items)
    assert folders.fingerprint(items)["count"] == 9


# ----------------------------------------------------------------------------------------------
# conversion to RGB
# ----------------------------------------------------------------------------------------------


def test_load_rgb_conversions(folder):
    img, notes = folders.load_rgb(folder / "deep.png")
    assert notes == ("16-bit",) and img.mode == "RGB"
    # 16-bit -> 8-bit is scaled (v / 257), not clipped: 0, 257, 32768, 65535 -> 0, 1, 128, 255
    assert np.array(img)[0, :4, 0].tolist() == [0, 1, 128, 255]
    img, notes = folders.load_rgb(folder / "deep_rgb.png")
    assert notes == ("16-bit",) and np.array(img)[0, :4].tolist() == [[0] * 3, [1] * 3, [128] * 3, [255] * 3]
    img, notes = folders.load_rgb(folder / "rgba.png")
    assert notes == ("RGBA",)
    assert np.array(img)[0, 0].tolist() == [255, 0, 0] and np.array(img)[0, -1].tolist() == [255, 255, 255]
    img, notes = folders.load_rgb(folder / "palette.png")
    assert notes == ("palette",)
    assert np.array(img)[0, 0].tolist() == [255, 0, 0] and np.array(img)[5, 5].tolist() == [255, 255, 255]
    img, notes = folders.load_rgb(folder / "gray.png")
    assert notes == ("grayscale",) and np.array(img)[0, 0].tolist() == [200, 200, 200]
    img, notes = folders.load_rgb(folder / "cmyk.jpg")
    assert notes == ("CMYK",) and np.array(img)[0, 0].tolist() == pytest.approx([255, 0, 0], abs=3)
    img, notes = folders.load_rgb(folder / "rgb.jpg")
    assert notes == () and img.size == (40, 32)


def test_exif_rotation_is_applied_and_noted(tmp_path):
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90° clockwise to view
    gradient(40, 20).save(tmp_path / "cam.jpg", exif=exif)
    img, notes = folders.load_rgb(tmp_path / "cam.jpg")
    assert notes == ("EXIF-rotated",) and img.size == (20, 40)


def test_truncated_and_empty_files_raise(folder):
    for name in ("truncated.png", "empty.png"):
        with pytest.raises(folders.DECODE_ERRORS):
            folders.load_rgb(folder / name)


# ----------------------------------------------------------------------------------------------
# crop, resize, tensor
# ----------------------------------------------------------------------------------------------


def test_center_crop_takes_the_middle_square():
    a = np.zeros((40, 60, 3), np.uint8)
    a[:, :10] = (255, 0, 0)
    a[:, 50:] = (255, 0, 0)
    a[:, 10:50] = (0, 0, 255)  # the centred 40 × 40 square is all blue
    out = folders.center_crop_resize(Image.fromarray(a), 20)
    assert out.size == (20, 20) and (np.array(out) == (0, 0, 255)).all()
    same = folders.center_crop_resize(Image.fromarray(a), 40)  # crop without resize stays exact
    assert (np.array(same) == a[:, 10:50]).all()


def test_large_downscale_is_antialiased():
    # A 1-pixel checkerboard shrunk 32×: a good filter gives flat grey, point sampling black/white
    board = (np.indices((256, 256)).sum(0) % 2 * 255).astype(np.uint8)
    out = np.array(folders.center_crop_resize(Image.fromarray(board).convert("RGB"), 8)).astype(float)
    assert abs(out.mean() - 127.5) < 3 and out.std() < 3


def test_to_tensor_range_and_shape():
    a = np.zeros((6, 4, 3), np.uint8)
    a[0, 0] = 255
    x = images.to_tensor(Image.fromarray(a))
    assert x.shape == (3, 6, 4) and x.dtype == torch.float32
    assert x.max() == 1 and x.min() == -1 and x[:, 0, 0].tolist() == [1, 1, 1]
    with pytest.raises(ValueError, match="RGB"):
        images.to_tensor(Image.new("L", (2, 2)))


# ----------------------------------------------------------------------------------------------
# Algorithm 1's rule: max_stage and assign_stages
# ----------------------------------------------------------------------------------------------


def test_max_stage():
    # R = 1024, K = 3: stages at 256, 512, 1024
    for native, k in [(4000, 3), (1024, 3), (1023, 2), (512, 2), (511, 1), (256, 1), (255, 0)]:
        assert folders.max_stage(native, 1024, 3) == k, native
    assert folders.max_stage(32, 32, 1) == 1 and folders.max_stage(31, 32, 1) == 0


def test_assign_stages_examples():
    # Everyone allowed everywhere: counts met exactly, highest stages filled first in batch order
    assert feed.assign_stages([3] * 7, [4, 2, 1]) == [3, 2, 2, 1, 1, 1, 1]
    # Only one sample reaches stage 3: it takes it, the rest fill stages 2 and 1
    assert feed.assign_stages([1, 2, 3, 2, 1], [2, 2, 1]) == [1, 2, 3, 2, 1]
    # All low-resolution: stage 3 cannot be had; leftovers go to their highest allowed stage
    assert feed.assign_stages([1, 1, 1, 1], [1, 1, 2]) == [1, 1, 1, 1]
    with pytest.raises(ValueError, match="max_stage >= 1"):
        feed.assign_stages([0, 2], [1, 1])


def best_met(max_stages, counts):
    """Brute force: the most wanted slots Σ_k min(assigned_k, wanted_k) any valid assignment meets."""
    best = 0
    for stages in itertools.product(*[range(1, m + 1) for m in max_stages]):
        best = max(best, sum(min(stages.count(k), c) for k, c in enumerate(counts, 1)))
    return best


def test_assign_stages_properties_random():
    rng = random.Random(0)
    for _ in range(300):
        K = rng.randint(1, 3)
        n = rng.randint(1, 6)
        max_stages = [rng.randint(1, K) for _ in range(n)]
        counts = [rng.randint(0, 3) for _ in range(K)]
        stages = feed.assign_stages(max_stages, counts)
        assert all(1 <= s <= m for s, m in zip(stages, max_stages)), (max_stages, counts, stages)
        met = sum(min(stages.count(k), c) for k, c in enumerate(counts, 1))
        assert met == best_met(max_stages, counts), (max_stages, counts, stages)
        # samples beyond the wanted counts sit at their highest allowed stage
        over = [k for k, c in enumerate(counts, 1) if stages.count(k) > c]
        for k in over:
            extra = [i for i, s in enumerate(stages) if s == k]
            assert sum(max_stages[i] == k for i in extra) >= stages.count(k) - counts[k - 1]
        assert feed.assign_stages(max_stages, counts) == stages  # deterministic


# ----------------------------------------------------------------------------------------------
# datasets and the sampler
# ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def dataset(folder):
    # R = 32, K = 2: stages at 16 and 32 px; every usable image (native 16..32) has max_stage 1 or 2
    return folders.FolderDataset(folder, 32, 2, progress=False)


def test_folder_dataset_items(dataset):
    assert len(dataset) == 9
    for i in range(len(dataset)):
        item = dataset[i]
        assert item["image"].shape == (3, 32, 32) and item["image"].abs().max() <= 1
        assert item["max_stage"] == folders.max_stage(dataset.items[i].native, 32, 2)
        assert item["caption"] == dataset.items[i].caption
    assert sorted(set(dataset.max_stages)) == [1, 2]


def test_low_resolution_image_is_exact_at_its_stage(dataset):
    # sub/b.png (18 × 16) only reaches stage 1 (16 px): Down of the returned 32 px image must be
    # exactly its 16 px version, not the Down of a blurred upsampling
    i = [it.rel for it in dataset.items].index("sub/b.png")
    assert dataset.max_stages[i] == 1
    img, _ = folders.load_rgb(dataset.items[i].path)
    at_stage = images.to_tensor(folders.center_crop_resize(img, 16))
    assert torch.equal(F.avg_pool2d(dataset[i]["image"][None], 2)[0], at_stage)


def test_flip_is_reproducible_and_per_epoch(folder):
    flipping = folders.FolderDataset(folder, 32, 2, flip=True, progress=False, seed=5)
    plain = folders.FolderDataset(folder, 32, 2, progress=False)
    i = [it.rel for it in plain.items].index("rgb.jpg")
    x = plain[i]["image"]
    seen = set()
    for epoch in range(12):
        y = flipping[(i, epoch)]["image"]
        assert torch.equal(y, flipping[(i, epoch)]["image"])  # same key, same draw
        assert torch.equal(y, x) or torch.equal(y, x.flip(-1))
        seen.add(torch.equal(y, x))
    assert seen == {True, False}  # both outcomes over the epochs
    bits = [folders.mix_seed(5, i, e) & 1 for i in range(50) for e in range(8)]
    assert 150 < sum(bits) < 250  # about half


def test_sampler_epochs_are_permutations():
    s = feed.ResumableSampler(7, seed=3)
    first = list(itertools.islice(s, 21))
    for e in range(3):
        assert sorted(first[7 * e:7 * e + 7]) == list(range(7))
    assert first[:7] != first[7:14]  # a new order each epoch
    assert first != list(itertools.islice(feed.ResumableSampler(7, seed=4), 21))
    tagged = list(itertools.islice(feed.ResumableSampler(7, seed=3, with_epoch=True), 21))
    assert tagged == [(i, k // 7) for k, i in enumerate(first)]


def test_sampler_resume_continues_the_same_order():
    full = list(itertools.islice(feed.ResumableSampler(7, seed=3), 40))
    for start in (0, 5, 7, 10, 23):
        resumed = list(itertools.islice(feed.ResumableSampler(7, seed=3, start=start), 40 - start))
        assert resumed == full[start:], start


def test_dataloader_resume_gives_the_same_batches():
    ds = torch.utils.data.TensorDataset(torch.arange(10))
    B, steps, stop = 4, 8, 3

    def batches(start, n):
        loader = torch.utils.data.DataLoader(ds, batch_size=B, sampler=feed.ResumableSampler(10, 1, start=start))
        return [b[0].tolist() for b in itertools.islice(loader, n)]
    whole = batches(0, steps)
    assert batches(stop * B, steps - stop) == whole[stop:]


# ----------------------------------------------------------------------------------------------
# the cache
# ----------------------------------------------------------------------------------------------


class FakeText:
    """Stands in for encoders.TextEncoder: states from the prompt's characters."""
    dim, pooled_dim, max_len = 4, 3, 5

    def encode(self, prompts):
        codes = torch.zeros(len(prompts), self.max_len)
        for b, p in enumerate(prompts):
            for j, ch in enumerate(p[:self.max_len]):
                codes[b, j] = ord(ch) / 128
        txt = torch.stack([codes * (d + 1) for d in range(self.dim)], dim=-1)  # (B, L, D)
        pooled = torch.stack([codes.mean(1), codes.max(1).values, torch.full((len(prompts),), 0.5)], dim=-1)
        return txt, pooled

    def identity(self):
        return {"name": "fake-text", "max_len": self.max_len}


class FakeVAE:
    """Stands in for an autoencoder with factor 2: 2×2 average pooling and a channel mix."""
    channels, factor = 4, 2

    def __init__(self, name="fake-vae"):
        self.name = name

    def encode(self, images):
        x = F.avg_pool2d(images, 2)
        return torch.cat([x, x.mean(1, keepdim=True) * 0.3], dim=1)  # (B, 4, H/2, W/2)

    def identity(self):
        return {"name": self.name, "factor": self.factor}


def key(dataset, vae=None, dtype=torch.bfloat16):
    return cache.cache_key(FakeText(), vae or FakeVAE(), dtype, dataset.resolution, dataset.num_stages)


@pytest.fixture(scope="module")
def cache_dir(dataset, tmp_path_factory):
    out = tmp_path_factory.mktemp("cache")
    cache.build_cache(dataset, FakeText(), FakeVAE(), out, shard_size=4, batch_size=3, progress=False)
    return out


def test_cache_round_trip(dataset, cache_dir):
    meta = json.loads((cache_dir / "cache.json").read_text())
    assert meta["count"] == 9 and [s["count"] for s in meta["shards"]] == [4, 4, 1]
    assert meta["data"] == folders.fingerprint(dataset.items)
    cached = cache.CachedDataset(cache_dir, key(dataset), expect_data=folders.fingerprint(dataset.items))
    assert len(cached) == 9
    text, vae = FakeText(), FakeVAE()
    for i in range(9):
        item, want = cached[i], dataset.load(i)
        latent = vae.encode(want["image"][None])[0]
        txt, pooled = text.encode([want["caption"]])
        assert item["latent"].shape == (4, 16, 16) and item["latent"].dtype == torch.float32
        torch.testing.assert_close(item["latent"], latent, atol=1e-2, rtol=1e-2)  # bf16 storage
        torch.testing.assert_close(item["txt"], txt[0], atol=2e-2, rtol=1e-2)
        torch.testing.assert_close(item["pooled"], pooled[0], atol=1e-2, rtol=1e-2)
        assert item["max_stage"] == want["max_stage"]
    assert cached[(3, 7)]["max_stage"] == cached[3]["max_stage"]  # (index, epoch) keys work too
    txt, pooled = cached.uncond
    torch.testing.assert_close(txt, text.encode([""])[0][0])
    torch.testing.assert_close(pooled, text.encode([""])[1][0])
    with pytest.raises(IndexError):
        cached[9]


def test_cache_through_dataloader_workers(dataset, cache_dir):
    # the dataset is pickled into a worker process: the open shard handles must not travel
    cached = cache.CachedDataset(cache_dir, key(dataset))
    cached[0]  # opens a handle in this process
    loader = torch.utils.data.DataLoader(cached, batch_size=5, num_workers=1)
    batch = next(iter(loader))
    assert batch["latent"].shape == (5, 4, 16, 16) and batch["txt"].shape == (5, 5, 4)


def test_stale_cache_is_refused_naming_the_field(dataset, cache_dir):
    with pytest.raises(ValueError, match=r'vae \{"name": "fake-vae".*this run uses \{"name": "other-vae"'):
        cache.CachedDataset(cache_dir, key(dataset, vae=FakeVAE("other-vae")))
    with pytest.raises(ValueError, match='dtype "bfloat16", this run uses "float32".*python -m datafeed cache'):
        cache.CachedDataset(cache_dir, key(dataset, dtype=torch.float32))
    other = dict(folders.fingerprint(dataset.items), count=10)
    with pytest.raises(ValueError, match="data folder now has 10"):
        cache.CachedDataset(cache_dir, key(dataset), expect_data=other)


def test_missing_cache_json_is_refused(dataset, cache_dir, tmp_path):
    with pytest.raises(ValueError, match="no cache.json"):
        cache.CachedDataset(tmp_path, key(dataset))


def test_killed_rebuild_leaves_no_complete_looking_cache(dataset, tmp_path):
    cache.build_cache(dataset, FakeText(), FakeVAE(), tmp_path, shard_size=4, batch_size=3, progress=False)
    cache.CachedDataset(tmp_path, key(dataset))  # complete

    class Dies(FakeVAE):
        calls = 0

        def encode(self, images):
            Dies.calls += 1
            if Dies.calls == 3:
                raise KeyboardInterrupt
            return super().encode(images)
    with pytest.raises(KeyboardInterrupt):
        cache.build_cache(dataset, FakeText(), Dies(), tmp_path, shard_size=4, batch_size=3, progress=False)
    assert (tmp_path / "shard-00000.safetensors").exists()  # the partial run wrote a shard ...
    with pytest.raises(ValueError, match="no cache.json"):  # ... but the cache is refused
        cache.CachedDataset(tmp_path, key(dataset))


def test_rebuilding_a_cache_deletes_only_the_files_its_cache_json_lists(dataset, tmp_path):
    build = dict(batch_size=3, progress=False)
    cache.build_cache(dataset, FakeText(), FakeVAE(), tmp_path, shard_size=4, **build)  # 3 shards
    (tmp_path / "notes.txt").write_text("the user's")
    (tmp_path / "shard-00007.safetensors").write_bytes(b"not listed in cache.json")
    (tmp_path / "shard-00099.safetensors").mkdir()  # a folder named like a shard
    cache.build_cache(dataset, FakeText(), FakeVAE(), tmp_path, shard_size=8, **build)  # 2 shards
    assert (tmp_path / "notes.txt").is_file() and (tmp_path / "shard-00007.safetensors").is_file()
    assert (tmp_path / "shard-00099.safetensors").is_dir()
    assert not (tmp_path / "shard-00002.safetensors").exists()  # the old cache's third shard is gone
    assert len(cache.CachedDataset(tmp_path, key(dataset))) == 9


@pytest.mark.parametrize("name", ["../outside.safetensors", "OUTSIDE", "sub/shard-00000.safetensors",
                                  ".hidden.safetensors", 7])
def test_cache_json_naming_anything_but_a_plain_file_in_the_cache_is_refused(dataset, tmp_path, name):
    out, outside = tmp_path / "cache", tmp_path / "outside.safetensors"
    cache.build_cache(dataset, FakeText(), FakeVAE(), out, shard_size=4, batch_size=3, progress=False)
    shutil.copy(out / "shard-00000.safetensors", outside)
    meta = json.loads((out / "cache.json").read_text())
    meta["shards"][0]["file"] = str(outside) if name == "OUTSIDE" else name
    (out / "cache.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="not a plain .safetensors file name inside the cache"):
        cache.CachedDataset(out, key(dataset))
    with pytest.raises(ValueError, match="not a plain .safetensors file name inside the cache"):
        cache.build_cache(dataset, FakeText(), FakeVAE(), out, shard_size=4, batch_size=3, progress=False)
    assert outside.is_file()


def test_cli_scan_and_errors(folder, capsys):
    commands.main(["scan", str(folder), "--resolution", "32", "--stages", "2", "--no-buckets"])
    out = capsys.readouterr().out
    assert "data: 9 images" in out and "stage 1: " in out and "| 32×32 | 9 |" in out
    commands.main(["scan", str(folder), "--resolution", "32", "--stages", "2"])  # buckets: both sides of each image
    out = capsys.readouterr().out  # the 20×48 image covers stage 1 of the 20×48 bucket (10×24): a square crop was too small
    assert "data: 10 images" in out and "| 20×48 | 1 |" in out
    with pytest.raises(SystemExit, match="error: .*not a folder"):
        commands.main(["scan", str(folder / "missing")])


# ----------------------------------------------------------------------------------------------
# The training feed: stages decided on the global batch
# ----------------------------------------------------------------------------------------------


class ZeroText:
    """A stand-in text encoder: every prompt is 4 zero tokens of width 8."""

    def encode(self, prompts):
        return torch.zeros(len(prompts), 4, 8), torch.zeros(len(prompts), 8)


@pytest.mark.parametrize("world", [1, 2])
@pytest.mark.parametrize("micro", [1, 2, 4, 8])
def test_stage_shares_of_a_run_follow_the_ratios_for_any_micro_batch_and_ranks(micro, world):
    """Algorithm 1's stage mix is drawn on the global batch, then split: with micro-batches of 1-4
    (what 2b at 1024² uses) each step still trains the phase's ratios, on any number of ranks."""
    from training import config
    from common import encoders
    from common import parallel
    cfg = config.TrainConfig(size="tiny", resolution=16, vae=None, world_level=3, batch_size=16, max_steps=9,
                             caption_dropout=0.0)
    if micro * world > cfg.batch_size:
        pytest.skip("more ranks than samples")
    schedule = config.stage_mix_schedule(cfg, 3)
    got = {ratios: [0, 0, 0] for _, _, ratios in schedule}
    for rank in range(world):
        batches = feed.Batches(cfg, ZeroText(), encoders.PixelSpace(), 3, torch.device("cpu"),
                            slots=parallel.micro_batches(cfg.batch_size, micro, world, rank))
        for step in range(cfg.max_steps):  # as train.main assigns the stages
            ratios = config.stage_ratios(schedule, step)
            micro_batches = batches.next_step()
            stages = feed.batch_stages(ratios, cfg.batch_size, batches.max_stages(micro_batches))
            assert [stages.count(k) for k in (1, 2, 3)] == feed.stage_counts(ratios, cfg.batch_size)
            for batch in micro_batches:
                counts = [[stages[i] for i in batch.slot].count(k) for k in (1, 2, 3)]
                assert len(batch.x) == micro and sum(counts) == micro
                got[ratios] = [a + b for a, b in zip(got[ratios], counts)]
    for first, last, ratios in schedule:
        want = [(last - first) * n for n in feed.stage_counts(ratios, cfg.batch_size)]
        assert got[ratios] == want, (ratios, got[ratios])
