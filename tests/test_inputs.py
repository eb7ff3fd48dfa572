"""Tests of bad and hostile input (the Reliability issue): prompts and data folders fuzzed with
hypothesis, data folders that would hang or exhaust a run, and folders that cannot train, whose
error says what the folder should hold. Crafted and damaged checkpoint files are in
tests/test_checkpoint_files.py, the flags of sample.py and train.py in tests/test_cli.py; both use
this file's fixtures run_dir and fresh_run (one checkpoint of a tiny run).

    python -m pytest -q tests/test_inputs.py          # about 30 s on 2 CPU cores; -s prints how many
                                                # cases each fuzz test ran
"""
from __future__ import annotations

import io
import json
import os
import re
import shutil
import struct
import tempfile
import threading
import tracemalloc
import warnings
import zlib
from pathlib import Path
from unittest import mock

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from PIL import Image

import conftest
import sample
import train
from common import encoders, images
from datafeed import folders

# No example database in the repository; a failure prints the example that falsified it.
# FUZZ_SCALE=20 python -m pytest tests/test_inputs.py -k fuzzed runs 20 times as many cases.
FUZZ = dict(deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
SCALE = int(os.environ.get("FUZZ_SCALE", "1"))


def ran(name: str, n: int, at_least: int):
    """Print how many generated cases a fuzz test ran (pytest -s shows it)."""
    print(f"\n{name}: {n} cases ran")
    assert n >= at_least, f"{name} ran only {n} cases"


# ----------------------------------------------------------------------------------------------
# shared: a tiny text encoder, and one checkpoint of a tiny training run
# ----------------------------------------------------------------------------------------------


def tiny_run(out, encoder_dir, **kw):
    return conftest.tiny_run(out, encoder_dir, **{"max_steps": 2, "warmup": 1, "ckpt_every": 2, **kw})


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, encoder_dir):
    """A run folder holding ckpt-0000002 (tiny preset, 16 px, K = 3). Tests that damage a
    checkpoint work on a copy (fresh_run)."""
    out = tmp_path_factory.mktemp("run") / "run"
    train.main(tiny_run(out, encoder_dir))
    return out


@pytest.fixture
def fresh_run(run_dir, tmp_path):
    shutil.copytree(run_dir, tmp_path / "run")
    return tmp_path / "run"


# ----------------------------------------------------------------------------------------------
# prompts: any text encodes, and the PNG keeps it
# ----------------------------------------------------------------------------------------------

CONTROL = st.characters(max_codepoint=0x1F) | st.sampled_from("\x7f\x85\u200b\u200e\ufeff\u2028\ufffd")
EMOJI = st.characters(min_codepoint=0x1F300, max_codepoint=0x1FAFF) | st.sampled_from(
    ["👩‍👩‍👧", "🏳️‍🌈", "🇫🇷", " ", "\u0301", "\u200d"])  # sequences, joiners, combining marks
WORDS = st.sampled_from(["a", "red", "circle", "красный", "круг", "赤い", "円", "🐱", "naïve", "\x1b[31m", "\r\n"])
PROMPTS = st.one_of(
    st.text(),                                                          # any Unicode but lone surrogates
    st.text(CONTROL | st.characters(max_codepoint=0x7F), max_size=40),  # mostly control characters
    st.lists(EMOJI, max_size=30).map("".join),                         # emoji
    st.lists(WORDS, min_size=500, max_size=3000).map(" ".join),        # thousands of words
)


@pytest.fixture(scope="module")
def text_encoder(encoder_dir):
    return encoders.TextEncoder(encoder_dir, max_len=8)


def test_fuzzed_prompts_encode_to_finite_states_of_the_right_shape(text_encoder):
    """Non-ASCII, emoji, control characters, the empty prompt and thousands of words all encode;
    exactly the prompts longer than max_len tokens are truncated with a warning."""
    seen = []

    @settings(max_examples=80 * SCALE, **FUZZ)
    @given(prompt=PROMPTS)
    @example(prompt="")
    @example(prompt="\x00")
    @example(prompt="a\r\nb\x1b[2J\x00c")
    @example(prompt="word " * 5000)
    def check(prompt):
        seen.append(prompt)
        text_encoder.cache.clear()  # the warning is given once per prompt; see it each time
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            txt, pooled = text_encoder.encode([prompt, "a red circle"])
        assert txt.shape == (2, 8, 32) and pooled.shape == (2, 32)
        assert torch.isfinite(txt).all() and torch.isfinite(pooled).all()
        n_tokens = len(text_encoder.tokenizer(prompt, verbose=False)["input_ids"])
        truncated = [w for w in caught if "truncated" in str(w.message)]
        assert len(truncated) == (n_tokens > 8), (n_tokens, [str(w.message) for w in caught])
    check()
    ran("prompts through TextEncoder", len(seen), 80 * SCALE)


def test_prompt_with_bytes_that_are_not_utf8_is_refused_naming_the_character(text_encoder):
    """A command line with bytes that are not UTF-8 reaches Python as lone surrogates, which the
    tokenizer would reject with an unrelated TypeError."""
    with pytest.raises(ValueError, match=r"character 1 is '\\udcff'.*UTF-8"):
        text_encoder.encode(["a\udcffb"])
    with pytest.raises(TypeError, match="must be a str"):
        text_encoder.encode([None])


def test_text_length_beyond_the_encoders_positions_is_refused(encoder_dir):
    with pytest.raises(ValueError, match="512 positions"):
        encoders.TextEncoder(encoder_dir, max_len=600)


def read_png_text(fields: dict) -> dict:
    buffer = io.BytesIO()
    Image.new("RGB", (2, 2)).save(buffer, format="PNG", pnginfo=images.png_info(fields))
    buffer.seek(0)
    with Image.open(buffer) as png:
        return dict(png.text)


def test_fuzzed_png_metadata_round_trips():
    """images.png_info keeps every character of any text, with a NUL written as U+2400 (the PNG
    specification allows no NUL in a text chunk), in UTF-8 iTXt chunks."""
    seen = []

    @settings(max_examples=150 * SCALE, **FUZZ)
    @given(fields=st.dictionaries(st.sampled_from(["prompt", "negative", "checkpoint"]), st.text(), min_size=1))
    @example(fields={"prompt": "nul\x00nul", "negative": "ça 🐱 \r\n\x1b[0m", "checkpoint": ""})
    def check(fields):
        seen.append(fields)
        text = read_png_text(fields)
        assert text == {k: v.replace("\0", "\u2400") for k, v in fields.items()}
        for key, value in fields.items():
            if "\u2400" not in value:  # then the escape is exactly reversible
                assert text[key].replace("\u2400", "\0") == value
    check()
    ran("PNG text chunks", len(seen), 150 * SCALE)


def test_fuzzed_prompts_through_sample_main(run_dir, tmp_path):
    """The whole sampler, in-process (a subprocess costs seconds per case): the PNG written
    records prompt and negative prompt as given."""
    seen = []

    @settings(max_examples=10 * SCALE, **FUZZ)
    @given(prompt=PROMPTS, negative=st.text(max_size=20))
    @example(prompt="", negative="")
    @example(prompt="-starts with a dash \x00 🐱", negative="-x")
    def check(prompt, negative):
        seen.append(prompt)
        out = tmp_path / "fuzz.png"
        # `--` ends the options, so a prompt starting with "-" is still the prompt; the same
        # holds for --negative=VALUE
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the truncation warning of long prompts
            sample.main(["--ckpt", str(run_dir), "--steps", "1,1,1", "--out", str(out), "--upscale", "1",
                         f"--negative={negative}", "--", prompt])
        with Image.open(out) as png:
            assert png.size == (16, 16)
            assert png.text["prompt"] == prompt.replace("\0", "\u2400")
            assert png.text["negative"] == negative.replace("\0", "\u2400")
    check()
    ran("prompts through sample.main", len(seen), 10 * SCALE)


# ----------------------------------------------------------------------------------------------
# data folders: fuzzed files, captions and manifests
# ----------------------------------------------------------------------------------------------

# Few stems, so that images, captions and manifest entries often refer to the same file
STEMS = st.sampled_from(["a", "b", "Ünï 🐱", "sub/a", "sub/c", "sub/deep/d"])
IMAGE_EXT = st.sampled_from([".png", ".jpg", ".jpeg", ".gif", ".bmp", ".tif", ".webp", ".PNG", ".JPG"])
OTHER_EXT = st.sampled_from([".csv", ".json", "", ".TXT", ".txt", ".jsonl", ".md", ".png.bak"])
# Pillow's format for each extension, and the modes it can save in that format
FORMATS = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG", ".gif": "GIF", ".bmp": "BMP", ".tif": "TIFF",
           ".webp": "WEBP"}
MODES = ["1", "L", "LA", "P", "PA", "RGB", "RGBA", "I;16", "I;16B", "I", "F", "CMYK", "YCbCr", "LAB"]
MAGIC = [b"", b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff\xe0", b"GIF89a", b"BM", b"II*\x00", b"MM\x00*", b"RIFF\0\0\0\0WEBP"]


def encode_image(mode: str, size: tuple, ext: str, seed: int, exif) -> bytes:
    """An image of random pixels in `mode`, saved in the format of `ext` (as PNG where that
    format cannot hold the mode, so that every drawn case still gives an image file)."""
    raw = np.random.default_rng(seed).bytes(len(Image.new(mode, size).tobytes()))
    im = Image.frombytes(mode, size, raw)  # any bit pattern: negative I, NaN and inf in F
    extra = {} if exif is None else {"exif": exif}
    for fmt in (FORMATS[ext.lower().replace(".jpeg", ".jpg")], "PNG"):
        buffer = io.BytesIO()
        try:
            im.save(buffer, format=fmt, **extra)
            return buffer.getvalue()
        except Exception:  # the format cannot hold this mode or this EXIF: try PNG
            continue
    buffer = io.BytesIO()
    im.convert("RGB").save(buffer, format="PNG")
    return buffer.getvalue()


def exif_bytes(orientation: int) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = orientation
    return exif.tobytes()


@st.composite
def image_files(draw):
    """(relative path, bytes): a real image, a truncated one, an empty file or random bytes."""
    path = draw(STEMS) + draw(IMAGE_EXT)
    kind = draw(st.sampled_from(["image", "image", "image", "truncated", "empty", "random"]))
    if kind == "empty":
        return path, b""
    if kind == "random":
        return path, draw(st.sampled_from(MAGIC)) + draw(st.binary(max_size=200))
    exif = draw(st.one_of(st.none(), st.integers(0, 10).map(exif_bytes),
                          st.binary(max_size=60).map(lambda b: b"Exif\x00\x00" + b)))
    blob = encode_image(draw(st.sampled_from(MODES)), (draw(st.integers(1, 40)), draw(st.integers(1, 40))),
                        Path(path).suffix, draw(st.integers(0, 2 ** 32 - 1)), exif)
    if kind == "truncated":  # cut somewhere strictly inside (the drawn number is not the length:
        blob = blob[:1 + draw(st.integers(0, 2 ** 16)) % max(1, len(blob) - 1)]  # draws stay fixed)
    return path, blob


CAPTION_BYTES = st.one_of(
    st.text().map(lambda t: t.encode("utf-8", "surrogatepass")),
    st.text(max_size=30).map(lambda t: "\ufeff" + t).map(str.encode),   # UTF-8 with a byte-order mark
    st.text(st.characters(min_codepoint=0xA0, max_codepoint=0xFF), min_size=1).map(lambda t: t.encode("latin-1")),
    st.binary(max_size=50),
    st.just(b""), st.just(b"  \n\t "),
)


@st.composite
def manifest_lines(draw):
    """One line of a metadata.jsonl, as bytes: valid, of the wrong shape, or garbage."""
    image = draw(st.sampled_from(["a", "b", "c", "../a", "deep/d", "/abs/a", ""])) + draw(IMAGE_EXT)
    text = draw(st.text(max_size=20))
    return draw(st.sampled_from([
        json.dumps({"image": image, "text": text}).encode(),
        json.dumps({"file_name": image, "text": text}, ensure_ascii=False).encode(),
        json.dumps({"image": image}).encode(),
        json.dumps({"image": 3, "text": text}).encode(),
        json.dumps([image, text]).encode(),
        b"null", b"", b"\r", b"[" * 5000, b'{"image": "a.png", "text": "\xff\xfe"}',
        draw(st.binary(max_size=40)),
        draw(st.text(max_size=40)).encode(),
    ]))


@st.composite
def data_folders(draw):
    """{relative path: bytes or None (a broken symbolic link)} for one data folder."""
    files = dict(draw(st.lists(image_files(), max_size=8)))
    for name in list(files):  # most images get a good caption (some are replaced below)
        if draw(st.integers(0, 3)):
            files[str(Path(name).with_suffix(".txt"))] = draw(st.text(min_size=1)).encode() + b" a caption"
    for stem, blob in draw(st.lists(st.tuples(STEMS, CAPTION_BYTES), max_size=4)):
        files[stem + draw(st.sampled_from([".txt", ".TXT"]))] = blob
    for stem in draw(st.lists(STEMS, max_size=3)):
        files[stem + draw(OTHER_EXT)] = draw(st.binary(max_size=30))
    for folder in draw(st.lists(st.sampled_from(["", "sub/"]), max_size=2, unique=True)):
        lines = draw(st.lists(manifest_lines(), max_size=6))
        newline = draw(st.sampled_from([b"\n", b"\r\n"]))
        files[folder + "metadata.jsonl"] = draw(st.sampled_from([b"", b"\xef\xbb\xbf"])) + newline.join(lines)
    for stem in draw(st.lists(STEMS, max_size=2)):
        files[stem + draw(st.sampled_from([".png", ".txt", ".csv"]))] = None
    # a path cannot be both a file and a folder ("sub" the file, "sub/a.png" below it)
    folders = {str(p) for name in files for p in Path(name).parents}
    return {name: blob for name, blob in files.items() if name not in folders}


def write_folder(root: Path, files: dict):
    for name, blob in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        if blob is None:
            os.symlink(root / "no such file", path)
        else:
            path.write_bytes(blob)


def expected_buckets(root: Path) -> dict:
    """What scan must account for, from a listing of its own: every image file lands in exactly
    one of the per-image outcomes, every other file (but .txt and manifests) is a non-image,
    every .txt is the caption of an image, a duplicate, or an orphan."""
    images, texts, other = [], [], 0
    for folder, _, names in os.walk(root):
        for name in names:
            path = Path(folder) / name
            ext = path.suffix.lower()
            if ext in folders.IMAGE_EXTS:
                images.append(path)
            elif ext == ".txt":
                texts.append(path)
            elif name != folders.MANIFEST:
                other += 1
    stems = {os.path.normpath(p.with_suffix("")) for p in images}
    return {"image files": len(images), "non-image": other, "text files": len(texts),
            "captioned stems": len({os.path.normpath(p.with_suffix("")) for p in texts} & stems)}


PER_IMAGE = ("images", "no caption", "empty caption", "bad caption", "large caption", "unreadable", "too small",
             "too many pixels")


def test_fuzzed_data_folders_scan_or_raise_the_documented_error():
    """folders.scan on generated folders (random bytes, truncated and empty images, every image
    mode, EXIF of any value or garbage, captions in any encoding, good and garbage manifest
    lines, broken links): it returns items or raises the ValueError for "no usable image"; every
    file is counted once; every item decodes to RGB at the size scan recorded."""
    seen = []

    @settings(max_examples=100 * SCALE, **FUZZ)
    @given(files=data_folders(), min_size=st.integers(1, 16))
    def check(files, min_size):
        seen.append(files)
        with tempfile.TemporaryDirectory() as tmp:
            root = Path(tmp) / "data"
            root.mkdir()
            write_folder(root, files)
            want = expected_buckets(root)
            # A random header may claim a huge image; refuse it before a large allocation
            with mock.patch.object(Image, "MAX_IMAGE_PIXELS", 1 << 20), warnings.catch_warnings():
                warnings.simplefilter("ignore")
                try:
                    items, counts = folders.scan(root, min_size=min_size, progress=False)
                except ValueError as e:
                    assert str(e).startswith(f"no usable image in {root}"), e
                    assert "The folder should hold images" in str(e)
                    return
            assert sum(counts[k] for k in PER_IMAGE) == want["image files"], (counts, want)
            assert counts["images"] == len(items) > 0
            assert counts["non-image"] == want["non-image"]
            # a .txt file is the caption of an image, a second caption of it, or an orphan
            assert counts["orphan caption"] + counts["duplicate caption"] \
                == want["text files"] - want["captioned stems"], (counts, want)
            line = folders.summary_line(counts)
            assert "\n" not in line and line.startswith(f"data: {len(items)} images")
            for item in items:
                img, _ = folders.load_rgb(item.path)
                assert img.mode == "RGB" and img.size == (item.width, item.height)
                assert min(img.size) >= min_size and item.caption == item.caption.strip() != ""
                assert images.to_tensor(img).shape == (3, item.height, item.width)
    check()
    ran("data folders through folders.scan", len(seen), 100 * SCALE)


def test_decompression_bomb_header_is_counted_unreadable(tmp_path):
    """A PNG whose header claims 100000 x 100000 pixels is refused before any pixel is decoded."""
    def chunk(tag, body):
        return struct.pack(">I", len(body)) + tag + body + struct.pack(">I", zlib.crc32(tag + body))
    header = struct.pack(">IIBBBBB", 100000, 100000, 8, 2, 0, 0, 0)
    (tmp_path / "bomb.png").write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IEND", b""))
    (tmp_path / "bomb.txt").write_text("huge")
    Image.new("RGB", (8, 8)).save(tmp_path / "ok.png")
    (tmp_path / "ok.txt").write_text("fine")
    items, counts = folders.scan(tmp_path, progress=False)
    assert [it.rel for it in items] == ["ok.png"] and counts["unreadable"] == 1
    assert "decompression bomb" in counts.first["unreadable"]


def test_cases_the_fuzzing_found(tmp_path):
    """Each of these once made scan raise, skip a usable image, or pass over a file silently."""
    png = png_bytes()
    files = {
        "nested.png": png, "metadata.jsonl": b"\xef\xbb\xbf" + b"\n".join([  # BOM, as Windows editors write
            json.dumps({"image": "nested.png", "text": "first line after the BOM"}).encode(),
            b"[" * 5000,                                           # json: RecursionError
            b'{"image": "latin.png", "text": "caf\xe9"}']),       # not UTF-8: bad, not guessed
        "latin.png": png,
        "bom.png": png, "bom.txt": "\ufeffa caption after a BOM".encode(),
        "two.png": png, "two.TXT": b"first in sorted order", "two.txt": b"second caption",
        "exif.png": image_with_exif(b"Exif\x00\x00 not a TIFF header"),  # damaged EXIF, fine pixels
        "exif.txt": b"damaged exif",
        "nine.png": image_with_exif(exif_bytes(9)), "nine.txt": b"orientation 9 means nothing",
    }
    root = folder_with(tmp_path / "data", files)
    os.symlink(root / "gone.txt", root / "linked.txt")  # a caption that is a broken link
    (root / "linked.png").write_bytes(png)
    items, counts = folders.scan(root, progress=False)
    captions = {it.rel: it.caption for it in items}
    assert captions == {"nested.png": "first line after the BOM", "bom.png": "a caption after a BOM",
                        "two.png": "first in sorted order", "exif.png": "damaged exif",
                        "nine.png": "orientation 9 means nothing"}
    assert counts["bad manifest line"] == 2 and counts.first["bad manifest line"] == "metadata.jsonl:2"
    assert counts["duplicate caption"] == 1 and counts.first["duplicate caption"] == "two.txt"
    assert counts["bad caption"] == 1 and counts.first["bad caption"] == "linked.txt"
    assert counts["no caption"] == 1 and counts["EXIF-rotated"] == 0 and counts["unreadable"] == 0


def scan_within(root: Path, seconds: float):
    """folders.scan in a daemon thread: a scan that hangs (open() of a FIFO waits for a writer) fails
    the test instead of blocking it."""
    outcome = []

    def scan():
        try:
            outcome.append(folders.scan(root, progress=False))
        except BaseException as e:  # e.g. MemoryError from a caption read whole
            outcome.append(e)
    worker = threading.Thread(target=scan, daemon=True)
    worker.start()
    worker.join(seconds)
    assert outcome, f"folders.scan did not return within {seconds} s"
    if isinstance(outcome[0], BaseException):
        raise outcome[0]
    return outcome[0]


def test_data_folder_that_would_hang_or_exhaust_a_run_is_counted_in_bounded_time_and_memory(tmp_path, monkeypatch):
    png = png_bytes()
    root = folder_with(tmp_path / "data", {
        "ok.png": png, "ok.txt": b"fine", "zero.png": png, "fifo.txt": b"an image that is a FIFO", "piped.png": png,
        "huge.png": png, "from-manifest.png": png})
    os.symlink("/dev/zero", root / "zero.txt")                  # a caption that never ends
    for fifo in ("fifo.png", "piped.txt", "sub/metadata.jsonl"):  # FIFOs named like an image, a caption, a manifest
        (root / fifo).parent.mkdir(exist_ok=True)
        os.mkfifo(root / fifo)
    with open(root / "huge.txt", "wb") as f:                    # 3 GB, sparse
        f.truncate(3 << 30)
    with open(root / "metadata.jsonl", "wb") as f:              # a line of 3 GB, then a good one
        f.write(b'{"image": "ok.png", "text": "')
        f.seek(3 << 30)
        f.write(b'"}\n' + json.dumps({"image": "from-manifest.png", "text": "after the long line"}).encode())
    Image.new("1", (7000, 6000)).save(root / "big.png")        # 42 megapixels, a 40 kB file
    (root / "big.txt").write_text("too many pixels")
    (tmp_path / "elsewhere").mkdir()
    os.symlink(tmp_path / "elsewhere", root / "linked")
    (root / "locked").mkdir(mode=0)
    if os.geteuid() == 0:  # root reads any folder: refuse this one as the OS would refuse others
        real_scandir = os.scandir
        monkeypatch.setattr(os, "scandir", lambda p=".": real_scandir(p) if not str(p).endswith("locked") else
                            (_ for _ in ()).throw(PermissionError(13, "Permission denied", str(p))))
    tracemalloc.start()
    try:
        items, counts = scan_within(root, seconds=60)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert [it.rel for it in items] == ["from-manifest.png", "ok.png"] and peak < 256 << 20
    assert counts["special file"] == 4 and counts["large caption"] == 1 and counts["too many pixels"] == 1
    assert counts.first["bad manifest line"] == "metadata.jsonl:1 (over 1 MiB)"
    assert counts["linked folder"] == 1 and counts.first["unreadable folder"] == "locked"
    line = folders.summary_line(counts)
    for words in ("4 FIFOs, devices or sockets", "1 with a caption file over 1 MiB", "1 over 40 megapixels",
                  "1 linked folders", "1 folders that cannot be read"):
        assert words in line, line


def image_with_exif(exif: bytes) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (16, 12), (10, 200, 10)).save(buffer, format="PNG", exif=exif)
    return buffer.getvalue()


# ----------------------------------------------------------------------------------------------
# data folders that cannot train: the error says what the folder should hold
# ----------------------------------------------------------------------------------------------

SHOULD_HOLD = r"The folder should hold images \(.*\.png.*\), each with a same-named \.txt caption"


def folder_with(root: Path, files: dict) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for name, blob in files.items():
        (root / name).write_bytes(blob)
    return root


def png_bytes(side: int = 16) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (side, side), (200, 10, 10)).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.mark.parametrize("files, found", [
    ({}, r"data: 0 images[;)]"),
    ({"notes.csv": b"a,b", "readme.md": b"#", "orphan.txt": b"a cat"}, r"2 non-image files.*1 \.txt files without"),
    ({"a.png": png_bytes(), "b.jpg": png_bytes()}, "2 without caption"),
    ({"a.png": png_bytes()[:40], "a.txt": b"cut", "b.png": b"", "b.txt": b"empty"}, "2 unreadable"),
    ({"a.png": png_bytes(), "a.txt": b"\xff\xfe latin-1 \xe9"}, "1 with a caption that is not UTF-8"),
    ({"a.png": png_bytes(2), "a.txt": b"small"}, "1 too small.*shorter side of at least 4 px"),
], ids=["empty", "no-images", "no-captions", "truncated-and-empty", "caption-not-utf8", "too-small"])
def test_folder_that_cannot_train_says_what_it_should_hold(tmp_path, files, found):
    root = folder_with(tmp_path / "data", files)
    with pytest.raises(ValueError, match=rf"no usable image in {re.escape(str(root))} .*{found}.*{SHOULD_HOLD}"):
        folders.FolderDataset(root, resolution=16, num_stages=3, progress=False)


def test_train_on_a_folder_without_usable_images_says_what_it_should_hold(tmp_path, encoder_dir):
    root = folder_with(tmp_path / "data", {"a.png": b"", "a.txt": b"zero bytes", "notes.csv": b"x"})
    with pytest.raises(ValueError, match=rf"no usable image.*{SHOULD_HOLD}"):
        train.main(tiny_run(tmp_path / "out", encoder_dir, data=str(root), workers=0))
    assert not list((tmp_path / "out").glob("ckpt-*"))
