"""The data of Algorithm 1: image folders, its resolution rule, a cache, and the training feed.

A data folder holds images with captions, found recursively, from either source:
  - a same-named text file beside the image: cat.png + cat.txt
  - a metadata.jsonl in any folder, one line per image: {"image": "sub/cat.png", "text": "a cat"}
    (paths relative to that file's folder; "file_name", the Hugging Face key, is read too).
    A manifest line wins over a .txt file for the same image.
Every image is decoded once by `scan`; missing captions or ones that are not UTF-8, unreadable
or truncated files, images too small for stage 1 and files that are not images are skipped, and
grayscale, palette, RGBA, 16-bit and CMYK images are converted to 8-bit RGB (transparency over
white). So that no folder can hang or exhaust a run, images over MAX_PIXELS, caption files and
manifest lines over MAX_TEXT_BYTES, and FIFOs or devices in place of a file are skipped without
being read, and linked or unreadable folders are not entered. Each case is counted in one summary
line, never passed over silently.

Algorithm 1's rule [paper §3.4]: stage k trains only on images whose native (shorter) side is at
least the stage's size, downsampled to it. `FolderDataset` returns every image at the full size R
together with its highest allowed stage; `assign_stages` then picks a stage per sample of a batch.

The cache holds VAE latents and text states in safetensors shards, keyed by text encoder, VAE,
dtype, resolution and number of stages; `CachedDataset` refuses a cache whose key differs.

`Batches` feeds train.py: each step's global batch (from the built-in shapes world, a folder or a
cache) cut into this rank's micro-batches, with every sample's noise, t' and caption dropout
drawn from its position in the data order, and its stage drawn at the phase's sampling ratio.

    python data.py scan DATA_DIR --resolution 256 --stages 3      # what would be used, and why not
    python data.py cache DATA_DIR --out CACHE_DIR --resolution 256 [--vae PATH] [--text-encoder PATH]
"""
from __future__ import annotations

import argparse
import bisect
import copy
import hashlib
import json
import math
import os
import re
import stat
import struct
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import ExifTags, Image, ImageOps
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm import tqdm

import files
import nami
import parallel
import shapes
from images import to_tensor

IMAGE_EXTS = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff"}
MANIFEST = "metadata.jsonl"
CACHE_FORMAT = 1  # bump when the layout of the shards or of cache.json changes
TEMPORARY = re.compile(r"\.tmp-(shard-\d{5,}\.safetensors|uncond\.safetensors|cache\.json)")  # _write_atomic's
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
# What Pillow's decoders raise on a broken file, depending on the format and where it breaks
DECODE_ERRORS = (OSError, ValueError, SyntaxError, EOFError, IndexError, struct.error,
                 Image.DecompressionBombError)
# Files that could exhaust a worker: an image is decoded whole (Pillow only refuses above 179 MP,
# 0.5 GB as RGB), so images above 40 megapixels are skipped: every common camera (24-33 MP) and
# 9.5 times a 2048² training image pass, and a decoded image with its conversions stays under 1 GB.
# A caption file or a metadata.jsonl line above 1 MiB (some 150,000 words) is skipped unread.
MAX_PIXELS = 40_000_000
MAX_TEXT_BYTES = 1 << 20

# The summary line's wording, in its order; keys are those of scan's counts
SKIPPED = {
    "no caption": "without caption",
    "empty caption": "with an empty caption",
    "bad caption": "with a caption that is not UTF-8 text or cannot be read",
    "large caption": "with a caption file over 1 MiB",
    "unreadable": "unreadable",
    "too small": "too small",
    "too many pixels": f"over {MAX_PIXELS // 10 ** 6} megapixels",
    "non-image": "non-image files",
    "special file": "FIFOs, devices or sockets in place of a file",
    "linked folder": "linked folders (not followed)",
    "unreadable folder": "folders that cannot be read",
    "bad manifest line": f"bad {MANIFEST} lines",
    "missing image": f"{MANIFEST} entries without an image",
    "orphan caption": ".txt files without an image",
    "duplicate caption": "second .txt captions of one image (a.txt and a.TXT)",
}
CONVERTED = ("grayscale", "palette", "RGBA", "16-bit", "CMYK", "EXIF-rotated")

# ----------------------------------------------------------------------------------------------
# 1. Reading one image
# ----------------------------------------------------------------------------------------------


def _is_16_bit(im: Image.Image) -> bool:
    """True for 16 bits per channel. Pillow reads 16-bit RGB(A) PNGs as 8-bit RGB(A) (keeping
    the high byte, which is a correct rescale), so only the decoder's raw mode, readable before
    load(), still tells the file's depth."""
    return im.mode.startswith("I;16") or any(";16" in str(tile.args) for tile in im.tile)


def _family(im: Image.Image) -> str | None:
    """The conversion an image needs to become RGB, as named in the summary line."""
    if im.mode == "F":
        raise ValueError("32-bit float pixels (mode F) have no agreed range: save the image as 8 or 16 bit")
    if im.mode.startswith("I"):
        return None  # the 16-bit note says it
    if im.mode in ("1", "L", "LA", "La"):
        return "grayscale"
    if im.mode in ("P", "PA"):
        return "palette"
    if im.mode in ("RGBA", "RGBa") or (im.mode == "RGB" and "transparency" in im.info):
        return "RGBA"
    return None if im.mode == "RGB" else im.mode  # CMYK, YCbCr, LAB, HSV


def _orientation(im: Image.Image) -> int:
    """The EXIF orientation: 2-8 rotate or mirror; 1 (upright) when there is none, when its value
    means nothing, or when the EXIF block is damaged, which a viewer ignores too: the pixels
    are fine, so the image is used as stored rather than skipped as unreadable."""
    try:
        value = im.getexif().get(ExifTags.Base.Orientation, 1)
    except DECODE_ERRORS:  # Pillow's TIFF parser: SyntaxError or struct.error on garbage
        return 1
    return value if value in range(2, 9) else 1


class TooManyPixels(ValueError):
    """An image above MAX_PIXELS, refused from its header before any pixel is decoded."""


def load_rgb(path) -> tuple[Image.Image, tuple[str, ...]]:
    """Decode an image file fully into 8-bit RGB; returns (image, notes) where notes names each
    conversion that happened ("16-bit", "grayscale", "palette", "RGBA", "CMYK", "EXIF-rotated").
    Raises TooManyPixels above MAX_PIXELS, one of DECODE_ERRORS on a truncated, empty or
    unreadable file, or on anything but a regular file (a FIFO would block)."""
    with files.open_regular(path) as f, Image.open(f) as im:
        if im.width * im.height > MAX_PIXELS:
            raise TooManyPixels(f"{im.width}x{im.height} pixels")
        deep = _is_16_bit(im)
        im.load()  # decode everything now, so a truncated file fails here and not mid-training
        notes = ["16-bit"] if deep or im.mode.startswith("I") else []
        family = _family(im)
        if family:
            notes.append(family)
        # Camera JPEGs store their rotation in EXIF: turn the pixels the way a viewer shows them
        if _orientation(im) != 1:
            im = ImageOps.exif_transpose(im)
            notes.append("EXIF-rotated")
        if im.mode.startswith("I"):
            # 16-bit grey (I;16*, or I from older Pillow): 0..65535 -> 0..255 by v/257, so
            # 65535 -> 255 and 257·k -> k exactly; a plain convert("L") would clip at 255
            v = np.clip(np.asarray(im, dtype=np.float32), 0, 65535)
            im = Image.fromarray(np.round(v / 257).astype(np.uint8))
        if im.mode in ("LA", "La", "PA", "RGBA", "RGBa") or "transparency" in im.info:
            # Transparent pixels carry arbitrary colours; show them over white, as a viewer does
            rgba = im.convert("RGBA")
            im = Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba)
        return im.convert("RGB"), tuple(notes)


def center_crop_resize(img: Image.Image, size: int) -> Image.Image:
    """The centred square of side min(W, H), resized to size × size with Lanczos. Pillow widens
    the filter by the downscaling factor (it antialiases), and reducing_gap first box-reduces by
    an integer factor, which keeps large reductions fast and the result nearly exact."""
    w, h = img.size
    side = min(w, h)
    left, top = (w - side) // 2, (h - side) // 2  # whole pixels: an equal-size crop stays exact
    # Crop, then resize: resize(box=...) would let the filter read pixels outside the square
    square = img.crop((left, top, left + side, top + side))
    return square.resize((size, size), Image.Resampling.LANCZOS, reducing_gap=3.0)


# ----------------------------------------------------------------------------------------------
# 2. Finding images and captions
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Item:
    path: str       # the image file
    rel: str        # its path below the data folder, with "/" (hashed by fingerprint)
    caption: str
    width: int      # native size, after EXIF rotation
    height: int
    bytes: int      # file size and modification time: a changed file changes the fingerprint
    mtime_ns: int

    @property
    def native(self) -> int:
        return min(self.width, self.height)


class Counts(Counter):
    """What scan found: how many of each outcome (a Counter), and in `.first` the first example
    of each problem ("sub/metadata.jsonl:4"), so that the summary can point to it."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.first = {}

    def note(self, key: str, where: str | None = None):
        self[key] += 1
        if where is not None:
            self.first.setdefault(key, where)


def summary_line(counts: Counter) -> str:
    """One line: images used, then what was skipped and what was converted, e.g.
    `data: 1234 images, skipped 3 without caption, 2 unreadable (first: a.png: truncated); converted 4 grayscale`."""
    first = getattr(counts, "first", {})
    skipped = [f"{counts[k]} {words}" + (f" (first: {first[k]})" if k in first else "")
               for k, words in SKIPPED.items() if counts[k]]
    kinds = [k for k in CONVERTED if counts[k]]
    kinds += sorted(k for k in counts if counts[k] and k not in CONVERTED and k not in SKIPPED and k != "images")
    line = f"data: {counts['images']} images"
    if skipped:
        line += ", skipped " + ", ".join(skipped)
    if kinds:
        line += "; converted " + ", ".join(f"{counts[k]} {k}" for k in kinds)
    return line


def _key(path) -> str:
    """One spelling per file, so that manifest paths and walked paths compare equal."""
    return os.path.normpath(os.fspath(path))


def read_manifest(path: Path, root: Path, counts: Counts) -> dict[str, str]:
    """{image key: caption} from one metadata.jsonl; bad lines are counted, with the first one's
    file:line kept for the summary. A line that is not UTF-8 is bad, as a .txt caption would be
    (one guessed from bytes would be trained on as if true); a byte-order mark is allowed."""
    captions = {}
    where = path.relative_to(root).as_posix()
    try:
        f = files.open_regular(path)  # bytes: each line is decoded on its own, so one bad line costs one line
    except OSError as e:
        counts.note("bad manifest line", f"{where}: {e.strerror or e}")
        return captions
    with f:
        for lineno, raw in enumerate(iter(lambda: f.readline(MAX_TEXT_BYTES + 1), b""), 1):
            if len(raw) > MAX_TEXT_BYTES:  # read past the rest of it in pieces: memory stays bounded
                while not raw.endswith(b"\n") and (raw := f.readline(MAX_TEXT_BYTES)):
                    pass
                counts.note("bad manifest line", f"{where}:{lineno} (over 1 MiB)")
                continue
            try:
                line = raw.decode("utf-8-sig" if lineno == 1 else "utf-8")
                if not line.strip():
                    continue
                entry = json.loads(line)
                image = entry.get("image", entry.get("file_name"))
                text = entry["text"]
                if not isinstance(image, str) or not isinstance(text, str):
                    raise TypeError
            # RecursionError: json gives up on deeply nested garbage ([[[[…) that way
            except (ValueError, KeyError, TypeError, AttributeError, RecursionError):
                counts.note("bad manifest line", f"{where}:{lineno}")
                continue
            captions[_key(path.parent / image)] = text
    return captions


def read_caption(path: Path) -> str:
    """A .txt caption (a leading byte-order mark, as some Windows editors write, dropped). Raises
    UnicodeDecodeError if it is not valid UTF-8 (a caption guessed from bytes would be trained on
    as if true), files.TooLarge above MAX_TEXT_BYTES (nothing read), OSError if it cannot be read
    (a broken link, no permission, not a regular file)."""
    return files.read_bounded(path, MAX_TEXT_BYTES).decode("utf-8-sig")


def walk(root: Path, counts: Counts):
    """The files below root, sorted: (images, {stem key: .txt caption}, manifests, second .txt
    captions of one stem); files of other kinds are counted."""
    images, texts, manifests, second_texts = [], {}, [], []

    def where(path) -> str:
        return Path(path).relative_to(root).as_posix()
    for folder, dirs, names in os.walk(root, onerror=lambda e: counts.note("unreadable folder", where(e.filename))):
        for name in [d for d in dirs if os.path.islink(os.path.join(folder, d))]:
            counts.note("linked folder", where(os.path.join(folder, name)))  # os.walk does not follow them
        dirs.sort()  # a fixed walk order: the same items in the same order on every machine
        for name in sorted(names):
            path = Path(folder) / name
            ext = path.suffix.lower()
            if not _regular_or_broken(path):
                counts.note("special file", where(path))
            elif ext in IMAGE_EXTS:
                images.append(path)
            elif ext == ".txt":
                key = _key(path.with_suffix(""))
                if key in texts:  # a.TXT beside a.txt: the first in sorted order is the caption
                    second_texts.append(path)
                else:
                    texts[key] = path
            elif name == MANIFEST:
                manifests.append(path)
            else:
                counts["non-image"] += 1
    return images, texts, manifests, second_texts


def folder_captions(root):
    """Every caption of a data folder, .txt files then metadata.jsonl lines, read lazily and
    without decoding an image (for the vocabulary a checkpoint records)."""
    root, counts = Path(root), Counts()
    _, texts, manifests, _ = walk(root, counts)
    for path in texts.values():
        try:
            yield read_caption(path)
        except (UnicodeDecodeError, OSError):  # scan counts these; the vocabulary takes what reads
            continue
    for path in manifests:
        yield from read_manifest(path, root, counts).values()


def _regular_or_broken(path: Path) -> bool:
    """False for a FIFO, device or socket (also behind a link): opening or reading one could block
    or never end. A broken link passes: reading it fails, and is counted there."""
    try:
        return stat.S_ISREG(os.stat(path).st_mode)
    except OSError:
        return True


def scan(root, min_size: int = 1, progress: bool = True) -> tuple[list[Item], Counts]:
    """Walk `root` recursively and decode every captioned image once; returns (items, counts).
    Images whose shorter side is below min_size are skipped ("too small"). Raises ValueError if
    no image can be used, saying what was found."""
    root = Path(root)
    if not root.is_dir():
        raise ValueError(f"{root} is not a folder: give the folder that holds the images and captions")
    counts = Counts()
    images, texts, manifests, second_texts = walk(root, counts)
    from_manifests = {}
    for path in manifests:
        from_manifests.update(read_manifest(path, root, counts))
    image_keys = {_key(p) for p in images}
    for key in from_manifests.keys() - image_keys:
        counts.note("missing image", os.path.relpath(key, root))
    used_texts = {_key(p.with_suffix("")) for p in images}
    counts["orphan caption"] += sum(1 for k in texts if k not in used_texts)
    for path in second_texts:
        if _key(path.with_suffix("")) in used_texts:
            counts.note("duplicate caption", path.relative_to(root).as_posix())
        else:
            counts["orphan caption"] += 1
    items = [item for path in tqdm(images, desc="scan", unit="img", disable=not progress)
             if (item := read_item(path, root, from_manifests, texts, min_size, counts)) is not None]
    if not items:
        raise ValueError(f"no usable image in {root} ({summary_line(counts)}"
                         + (f"; images need a shorter side of at least {min_size} px" if min_size > 1 else "")
                         + f"). The folder should hold images ({', '.join(sorted(IMAGE_EXTS))}), each with "
                         f"a same-named .txt caption (cat.png + cat.txt) or a line in a {MANIFEST} "
                         '({"image": "cat.png", "text": "a cat"})')
    return items, counts


def read_item(path: Path, root: Path, from_manifests: dict, texts: dict, min_size: int, counts: Counts):
    """One image and its caption as an Item, or None with the reason counted."""
    rel = path.relative_to(root).as_posix()
    caption = from_manifests.get(_key(path))
    text_file = texts.get(_key(path.with_suffix("")))
    if caption is None and text_file is not None:
        try:
            caption = read_caption(text_file)
        except (UnicodeDecodeError, OSError) as e:
            counts.note("large caption" if isinstance(e, files.TooLarge) else "bad caption",
                        text_file.relative_to(root).as_posix())
            return None
    if caption is None:
        counts.note("no caption", rel)
        return None
    if not caption.strip():
        counts.note("empty caption", rel)
        return None
    try:
        img, notes = load_rgb(path)
    except TooManyPixels as e:
        counts.note("too many pixels", f"{rel}: {e}")
        return None
    except DECODE_ERRORS as e:
        counts.note("unreadable", f"{rel}: {e}")
        return None
    if min(img.size) < min_size:
        counts.note("too small", rel)
        return None
    counts.update(notes)
    counts["images"] += 1
    stat = path.stat()
    return Item(str(path), rel, caption.strip(), img.width, img.height, stat.st_size, stat.st_mtime_ns)


def fingerprint(items: list[Item]) -> dict:
    """The data a cache was built from: image count and a hash of (path, size, mtime, caption)."""
    h = hashlib.sha256()
    for it in items:
        h.update(json.dumps([it.rel, it.bytes, it.mtime_ns, it.caption]).encode())
    return {"count": len(items), "sha256": h.hexdigest()}


# ----------------------------------------------------------------------------------------------
# 3. Algorithm 1's rule: which stages an image may train
# ----------------------------------------------------------------------------------------------


def max_stage(native: int, resolution: int, num_stages: int) -> int:
    """The highest stage k whose size R / 2^(K−k) is at most the native (shorter) side; 0 if
    even stage 1 is larger. [Algorithm 1: a stage uses only images at least its size]"""
    return max((k for k in range(1, num_stages + 1) if nami.stage_size(resolution, num_stages, k) <= native), default=0)


def assign_stages(max_stages: list[int], counts: list[int]) -> list[int]:
    """A stage per sample of one batch. counts[k−1] samples are wanted at stage k; no sample gets
    a stage above its max_stage. Stages are filled from the highest down, each from the
    unassigned samples allowed there in batch order; as every sample allowed at stage k is also
    allowed below it, this meets every wanted count that any assignment could. Samples left over
    (the high stages lacked images) go to the highest stage they are allowed."""
    if any(m < 1 for m in max_stages):
        raise ValueError(f"every sample needs max_stage >= 1, got {max_stages}: "
                         "FolderDataset skips images too small for stage 1")
    stages = [0] * len(max_stages)
    for k in range(len(counts), 0, -1):
        allowed = [i for i, m in enumerate(max_stages) if stages[i] == 0 and m >= k]
        for i in allowed[:counts[k - 1]]:
            stages[i] = k
    return [s or min(m, len(counts)) for s, m in zip(stages, max_stages)]


# ----------------------------------------------------------------------------------------------
# 4. Datasets and the resumable sampler
# ----------------------------------------------------------------------------------------------


def mix_seed(*parts) -> int:
    """A 64-bit seed from integers, e.g. (seed, epoch): unrelated streams for nearby inputs."""
    return int.from_bytes(hashlib.sha256(repr(parts).encode()).digest()[:8], "little")


def _index_epoch(key) -> tuple[int, int]:
    """Dataset keys are an index, or (index, epoch) from ResumableSampler(with_epoch=True)."""
    return (int(key[0]), int(key[1])) if isinstance(key, (tuple, list)) else (int(key), 0)


class FolderDataset(torch.utils.data.Dataset):
    """The images of a data folder at training size R, each with its caption and max_stage.

    An image whose highest allowed stage m is below K is resized to stage m's size and then
    repeated 2^(K−m) times along each axis (nearest Up), so that Down^(K−m) of the returned
    image (2×2 average pooling, docs/method.md §1) is exactly the image at stage m's size: stages ≤ m see
    the native pixels downsampled, never an upsampled guess.

    With flip=True, item (index, epoch) is mirrored left-right when a bit of
    sha256(seed, index, epoch) is set: probability 1/2, a fresh draw each epoch, the same in
    every worker and on resume. Pass keys (index, epoch) with ResumableSampler(with_epoch=True);
    a plain index means epoch 0."""

    def __init__(self, root, resolution: int, num_stages: int, flip: bool = False, progress: bool = True,
                 seed: int = 0):
        if num_stages < 1 or resolution % 2 ** (num_stages - 1):
            raise ValueError(f"--resolution {resolution} must be divisible by 2^(stages−1) = "
                             f"{2 ** (num_stages - 1)} for {num_stages} stages")
        self.root, self.resolution, self.num_stages = Path(root), resolution, num_stages
        self.flip, self.seed = flip, seed
        self.items, self.counts = scan(root, min_size=nami.stage_size(resolution, num_stages, 1), progress=progress)
        print(summary_line(self.counts))
        self.max_stages = [max_stage(it.native, resolution, num_stages) for it in self.items]

    def __len__(self):
        return len(self.items)

    def load(self, index: int, flipped: bool = False) -> dict:
        item, m = self.items[index], self.max_stages[index]
        img, _ = load_rgb(item.path)
        img = center_crop_resize(img, nami.stage_size(self.resolution, self.num_stages, m))
        if flipped:
            img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        x = to_tensor(img)  # (3, s, s), s = stage m's size
        f = 2 ** (self.num_stages - m)
        x = x.repeat_interleave(f, dim=1).repeat_interleave(f, dim=2)  # (3, R, R), Up^(K−m)
        return {"image": x, "caption": item.caption, "max_stage": m}

    def __getitem__(self, key) -> dict:
        index, epoch = _index_epoch(key)
        return self.load(index, flipped=self.flip and (mix_seed(self.seed, index, epoch) & 1) == 1)


class ResumableSampler(torch.utils.data.Sampler):
    """Endless epochs, each torch.randperm(n) from a generator seeded by (seed, epoch), starting
    at global sample position `start`: a run resumed at step s with batch size B uses
    start = s·B and sees exactly the order of a run that never stopped. It has no length; use
    it with DataLoader(sampler=..., batch_size=B) and stop by step count.
    with_epoch=True yields (index, epoch) pairs, which FolderDataset uses for its flips."""

    def __init__(self, n: int, seed: int, start: int = 0, with_epoch: bool = False):
        super().__init__()
        if n <= 0 or start < 0:
            raise ValueError(f"ResumableSampler needs n > 0 and start >= 0, got n={n}, start={start}")
        self.n, self.seed, self.start, self.with_epoch = n, seed, start, with_epoch

    def order(self, epoch: int) -> list[int]:
        gen = torch.Generator().manual_seed(mix_seed(self.seed, epoch))
        return torch.randperm(self.n, generator=gen).tolist()

    def __iter__(self):
        epoch, offset = divmod(self.start, self.n)
        while True:
            for i in self.order(epoch)[offset:]:
                yield (i, epoch) if self.with_epoch else i
            epoch, offset = epoch + 1, 0


# Words that say nothing about what an image holds, left out of a caption vocabulary
FUNCTION_WORDS = frozenset("a an the of and or in on at to with for by from is are this that it its "
                           "photo image picture drawing".split())
VOCABULARY_LIMIT = 1000  # more distinct words than this: no closed world, nothing recorded


def words(text: str) -> list[str]:
    """The lower-case words of a caption or prompt (runs of letters and digits, any script)."""
    return re.findall(r"[^\W_]+", text.lower())


def caption_vocabulary(captions) -> list[str] | None:
    """The sorted content words of the captions (FUNCTION_WORDS left out), or None past
    VOCABULARY_LIMIT: config.json stays small, and a world that large is not a closed one."""
    vocabulary = set()
    for caption in captions:
        vocabulary.update(word for word in words(caption) if word not in FUNCTION_WORDS)
        if len(vocabulary) > VOCABULARY_LIMIT:
            return None
    return sorted(vocabulary)


def vocabulary(cfg) -> list[str] | None:
    """The vocabulary of a run's training captions, which config.json records so that sample.py can
    say when a prompt uses none of it: the built-in world's from its templates, a folder's from its
    captions; None for a cache (it keeps text states, not captions)."""
    if cfg.cache:
        return None
    return caption_vocabulary(folder_captions(cfg.data) if cfg.data else shapes.caption_words())


# ----------------------------------------------------------------------------------------------
# 5. The cache: latents and text states in safetensors shards
# ----------------------------------------------------------------------------------------------


def cache_key(text_encoder, autoencoder, dtype: torch.dtype, resolution: int, num_stages: int = 3) -> dict:
    """Everything the cached tensors depend on; a cache is used only if its key is equal.
    (num_stages matters too: it decides which images are kept and their max_stage.)"""
    return {"format": CACHE_FORMAT, "text_encoder": text_encoder.identity(), "vae": autoencoder.identity(),
            "dtype": str(dtype).removeprefix("torch."), "resolution": resolution, "stages": num_stages}


def cache_dtype(cache_dir) -> torch.dtype:
    """The dtype a finished cache was built in (float32 when there is none yet: CachedDataset then
    explains what is missing). Training accepts any dtype and reads float32."""
    meta = Path(cache_dir) / "cache.json"
    if not meta.is_file():
        return torch.float32
    return getattr(torch, files.read_json(meta)["key"]["dtype"])


def key_differences(built: dict, wanted: dict) -> list[str]:
    """One phrase per field that differs between two cache keys."""
    return [f"cache built with {name} {json.dumps(built.get(name))}, this run uses {json.dumps(wanted.get(name))}"
            for name in sorted(set(built) | set(wanted), key=str) if built.get(name) != wanted.get(name)]


def _device_of(autoencoder) -> torch.device:
    """Where the autoencoder's inputs belong: its .device, else the device of the first parameter
    of it or of its .model (a wrapped diffusers module), else the CPU (pixel space)."""
    if hasattr(autoencoder, "device"):
        return torch.device(autoencoder.device)
    for module in (autoencoder, getattr(autoencoder, "model", None)):
        if isinstance(module, torch.nn.Module):
            for param in module.parameters():
                return param.device
    return torch.device("cpu")


def _write_atomic(path: Path, write):
    """write(tmp) then rename: a killed run leaves a hidden temp file, never a half-written one."""
    tmp = path.with_name(f".tmp-{path.name}")
    write(tmp)
    os.replace(tmp, path)


def shard_names(meta: dict, folder: Path) -> list[str]:
    """The shard files a cache.json lists, each a plain .safetensors file name inside the cache
    folder; ValueError for anything else (a path outside the folder, a folder part, a hidden name)."""
    try:
        names = [shard["file"] for shard in meta["shards"]]
    except (KeyError, TypeError) as e:
        raise ValueError(f"{folder}/cache.json is damaged ({type(e).__name__}: {e}): rebuild the cache")
    for name in names:
        if not files.plain_name(name) or not name.endswith(".safetensors"):
            raise ValueError(f"{folder}/cache.json lists the shard {name!r}, which is not a plain .safetensors file "
                             "name inside the cache folder: this cache.json was not written by `python data.py cache`")
    return names


def _clear_cache(out: Path):
    """Remove an earlier cache in `out`: the files its cache.json lists (its shards), its
    uncond.safetensors, temporary files of this module's names (a killed build's), and cache.json
    last, so that a kill midway leaves the listing of what remains. Only regular files: never a
    folder, a link, or a file the cache does not name; a cache.json that names anything outside
    the folder is refused. The caller holds the folder's lock (cmd_cache)."""
    names = ["uncond.safetensors"]
    if (out / "cache.json").is_file():
        try:
            names += shard_names(files.read_json(out / "cache.json"), out)
        except OSError as e:
            raise ValueError(f"{out}/cache.json cannot be read ({e}): remove the old cache by hand")
    names += [p.name for p in out.iterdir() if TEMPORARY.fullmatch(p.name)]
    for name in names + ["cache.json"]:
        path = out / name
        if path.is_file() and not path.is_symlink():
            path.unlink()


@torch.no_grad()
def build_cache(dataset: FolderDataset, text_encoder, autoencoder, out_dir, dtype=torch.bfloat16,
                shard_size: int = 1024, batch_size: int = 16, progress: bool = True, num_workers: int = 0) -> dict:
    """Encode every image (no flips) and caption of `dataset` into out_dir/shard-NNNNN.safetensors
    (latent (N, C, h, w), txt (N, L, D), pooled (N, P), max_stage (N,)), the empty prompt into
    uncond.safetensors, and last cache.json {key, count, shards, data}. Returns cache.json's dict."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    _clear_cache(out)
    plain = copy.copy(dataset)
    plain.flip = False
    loader = torch.utils.data.DataLoader(plain, batch_size=batch_size, num_workers=num_workers)
    device = _device_of(autoencoder)
    shards, buffer = [], []  # buffer: encoded batches not yet in a shard

    def write_shard(rows: dict):
        name = f"shard-{len(shards):05d}.safetensors"
        _write_atomic(out / name, lambda tmp: save_file({k: v.contiguous() for k, v in rows.items()}, tmp))
        shards.append({"file": name, "count": len(rows["max_stage"])})

    bar = tqdm(total=len(dataset), desc="cache", unit="img", disable=not progress)
    for batch in loader:
        latent = autoencoder.encode(batch["image"].to(device))  # (B, C, R/f, R/f)
        txt, pooled = text_encoder.encode(list(batch["caption"]))  # (B, L, D), (B, P)
        buffer.append({"latent": latent.to("cpu", dtype), "txt": txt.to("cpu", dtype),
                       "pooled": pooled.to("cpu", dtype), "max_stage": batch["max_stage"].long()})
        rows = {k: torch.cat([b[k] for b in buffer]) for k in buffer[0]}
        while len(rows["max_stage"]) >= shard_size:
            write_shard({k: v[:shard_size] for k, v in rows.items()})
            rows = {k: v[shard_size:] for k, v in rows.items()}
        buffer = [rows]
        bar.update(len(batch["caption"]))
    bar.close()
    if buffer and len(buffer[0]["max_stage"]):
        write_shard(buffer[0])

    # Paper §3.4: caption dropout trains on the empty prompt's embedding (the CFG unconditional)
    txt, pooled = text_encoder.encode([""])
    _write_atomic(out / "uncond.safetensors",
                  lambda tmp: save_file({"txt": txt[0].to("cpu", dtype).contiguous(),
                                         "pooled": pooled[0].to("cpu", dtype).contiguous()}, tmp))
    meta = {"key": cache_key(text_encoder, autoencoder, dtype, dataset.resolution, dataset.num_stages),
            "count": sum(s["count"] for s in shards), "shards": shards, "data": fingerprint(dataset.items)}
    _write_atomic(out / "cache.json", lambda tmp: tmp.write_text(json.dumps(meta, indent=2)))
    return meta


class CachedDataset(torch.utils.data.Dataset):
    """A finished cache, checked against this run's key, read item by item from its shards
    (safetensors memory maps: a large cache is never loaded whole). Items are float32 dicts
    {latent (C, h, w), txt (L, D), pooled (P,), max_stage}; `.uncond` is (txt, pooled) of the
    empty prompt. With expect_data (a fingerprint) it also refuses a cache of other data."""

    def __init__(self, cache_dir, expect_key: dict, expect_data: dict | None = None):
        self.dir = Path(cache_dir)
        command = (f"`python data.py cache DATA_DIR --out {self.dir} --resolution {expect_key.get('resolution')} "
                   f"--stages {expect_key.get('stages')}` with this run's --vae, --text-encoder and --dtype")
        if not (self.dir / "cache.json").is_file():
            raise ValueError(f"{self.dir} holds no finished cache (no cache.json: the caching run did not "
                             f"finish, or this is not a cache folder): build it with {command}")
        meta = files.read_json(self.dir / "cache.json")
        names = shard_names(meta, self.dir)
        problems = key_differences(meta["key"], expect_key)
        if expect_data is not None and meta["data"] != expect_data:
            problems.append(f"cache built from {meta['data']['count']} images, the data folder now has "
                            f"{expect_data['count']} (or changed files or captions)")
        if problems:
            raise ValueError(f"stale cache {self.dir}: " + "; ".join(problems) + f". Rebuild it with {command}")
        missing = [name for name in names if not (self.dir / name).is_file()]
        if missing or not (self.dir / "uncond.safetensors").is_file():
            raise ValueError(f"{self.dir} lacks {missing or 'uncond.safetensors'}: rebuild it with {command}")
        self.meta = meta
        self.shards = names
        self.ends = np.cumsum([s["count"] for s in meta["shards"]]).tolist()  # item index bounds per shard
        self._open = {}

    def __len__(self):
        return self.meta["count"]

    def _handle(self, shard: int):
        # Opened on first use in each process: the handles cannot be pickled into DataLoader workers
        if shard not in self._open:
            self._open[shard] = safe_open(self.dir / self.shards[shard], framework="pt")
        return self._open[shard]

    def __getstate__(self):
        return {**self.__dict__, "_open": {}}

    def __getitem__(self, key) -> dict:
        index, _ = _index_epoch(key)
        if not 0 <= index < len(self):
            raise IndexError(f"cache item {index} out of range 0..{len(self) - 1}")
        shard = bisect.bisect_right(self.ends, index)
        row = index - (self.ends[shard - 1] if shard else 0)
        h = self._handle(shard)
        item = {name: h.get_slice(name)[row:row + 1][0].float() for name in ("latent", "txt", "pooled")}
        item["max_stage"] = int(h.get_slice("max_stage")[row:row + 1][0])
        return item

    @property
    def uncond(self) -> tuple[torch.Tensor, torch.Tensor]:
        with safe_open(self.dir / "uncond.safetensors", framework="pt") as f:
            return f.get_tensor("txt").float(), f.get_tensor("pooled").float()


# ----------------------------------------------------------------------------------------------
# 6. The training feed: global batches cut into this rank's micro-batches, ordered by stage
# ----------------------------------------------------------------------------------------------


def stage_counts(ratios, batch_size):
    """Samples per stage in one batch, ∝ ratios (largest remainder), every stage with a positive
    ratio getting at least one sample."""
    total = sum(ratios)
    raw = [batch_size * r / total for r in ratios]
    counts = [max(1, math.floor(v)) if r > 0 else 0 for v, r in zip(raw, ratios)]
    while sum(counts) > batch_size:
        counts[counts.index(max(counts))] -= 1
    order = sorted(range(len(raw)), key=lambda i: raw[i] - math.floor(raw[i]), reverse=True)
    for i in order:
        if sum(counts) == batch_size:
            break
        if ratios[i] > 0:
            counts[i] += 1
    return counts


def sample_randomness(seed: int, caption_dropout: float, positions, shape, device):
    """Per sample, from a generator seeded by (seed, position): the caption-dropout coin, ε_K at
    full size and t' ~ logit-normal (SD3). A sample draws the same numbers on whichever rank and
    in whichever micro-batch it lands, so a run on N ranks repeats the one-process run."""
    drop, eps, t = [], [], []
    for p in positions:
        g = torch.Generator().manual_seed(mix_seed(seed, "noise", p))
        drop.append(bool(torch.rand((), generator=g) < caption_dropout))
        eps.append(torch.randn(shape, generator=g))
        t.append(nami.logit_normal(1, g))
    return torch.tensor(drop, device=device), torch.stack(eps).to(device), torch.cat(t).to(device)


@dataclass
class MicroBatch:
    """One micro-batch of Algorithm 1, its samples ordered by stage: counts[k−1] at stage k."""
    x: torch.Tensor        # (n, C, H, W) clean latents x'_1 at the full training size
    txt: torch.Tensor      # (n, L, D) text states (the empty prompt's where the caption was dropped)
    pooled: torch.Tensor   # (n, P) pooled text vectors
    eps: torch.Tensor      # (n, C, H, W) noise ε_K at the full size
    t: torch.Tensor        # (n,) local times t' ~ logit-normal
    counts: list           # samples per stage


class Batches:
    """Training micro-batches as latents at the full training size, from the built-in shapes data,
    an image folder (cfg.data, encoded on the fly) or a cache (cfg.cache, encoded once by
    `python data.py cache`). `cfg` is train.py's TrainConfig.

    next() -> x (n, C, H, W), txt (n, L, D), pooled (n, P), max_stage (n,) — the highest stage
    each image may train at (Algorithm 1: only images at least as large as the stage) — and the
    global sample positions (which seed each sample's noise). Each call returns this rank's next
    micro-batch (`slots`, parallel.micro_batches); one global batch per step, the same global
    batches whatever the number of ranks. `start_step` makes a resumed run continue the same data
    order; `stream` separates independent streams (BridgeFlow pre-training draws its own)."""

    def __init__(self, cfg, encoder, autoencoder, num_stages, device, start_step=0, stream=0, slots=None):
        self.cfg, self.encoder, self.autoencoder, self.K, self.device = cfg, encoder, autoencoder, num_stages, device
        B = cfg.batch_size
        self.slots = slots or [list(range(B))]
        self.step, self.offset = start_step, stream * 10_000_000
        self.queue: list = []
        self.prompts = shapes.EXAMPLE_PROMPTS[cfg.world_level]
        self.loader = None
        if cfg.data or cfg.cache:
            if cfg.cache:
                key = cache_key(encoder, autoencoder, cache_dtype(cfg.cache), cfg.resolution, num_stages)
                dataset = CachedDataset(cfg.cache, key)
                self.uncond = tuple(u.unsqueeze(0).to(device) for u in dataset.uncond)
            else:
                dataset = FolderDataset(cfg.data, cfg.resolution, num_stages, flip=cfg.flip,
                                        progress=cfg.progress, seed=cfg.seed)
                self.prompts = [dataset.items[i].caption for i in range(min(8, len(dataset)))]
            order = iter(ResumableSampler(len(dataset), cfg.seed + stream, start_step * B, with_epoch=cfg.flip))

            def this_ranks_keys():  # the global order, B keys per step, cut into this rank's micro-batches
                while True:
                    keys = [next(order) for _ in range(B)]
                    for slot in self.slots:
                        yield from (keys[i] for i in slot)
            self.loader = iter(torch.utils.data.DataLoader(
                dataset, batch_size=len(self.slots[0]), sampler=this_ranks_keys(), num_workers=cfg.workers,
                pin_memory=device.type == "cuda", persistent_workers=cfg.workers > 0))
        if not cfg.cache:
            self.uncond = tuple(u.to(device) for u in encoder.encode([""]))

    def next(self, text: bool = True):
        """text=False skips encoding the captions (BridgeFlow pre-training needs images only)."""
        if not self.queue:
            self.queue = [[self.offset + self.step * self.cfg.batch_size + i for i in slot] for slot in self.slots]
            self.step += 1
        positions = self.queue.pop(0)
        if self.loader is None:     # built-in data: rendered at the full size, every stage allowed
            pixels, samples = shapes.batch_at(self.cfg.seed, positions, self.cfg.resolution, level=self.cfg.world_level)
            captions = [s.caption for s in samples]
            max_stage = torch.full((len(positions),), self.K)
        else:
            batch = next(self.loader)
            max_stage = batch["max_stage"]
            if self.cfg.cache:
                x = batch["latent"].to(self.device)
                return x, batch["txt"].to(self.device), batch["pooled"].to(self.device), max_stage, positions
            pixels, captions = batch["image"], batch["caption"]
        x = self.autoencoder.encode(pixels.to(self.device))
        if not text:
            return x, None, None, max_stage, positions
        txt, pooled = self.encoder.encode(list(captions))
        return x, txt.to(self.device), pooled.to(self.device), max_stage, positions

    def next_step(self, ratios) -> tuple[list[MicroBatch], list[int]]:
        """This rank's micro-batches of the next global batch, each with its samples' noise, t' and
        caption dropout, and the samples per stage of the whole global batch. The stages are drawn
        on the global batch (paper §4.3: the phase's sampling ratio) by each sample's position in
        it, within Algorithm 1's size rule, and only then split: every micro-batch size and number
        of ranks trains the same mix."""
        loaded = [self.next() for _ in self.slots]
        stages = batch_stages(ratios, self.cfg.batch_size, self.global_max_stages(loaded))
        micro = []
        for slot, (x, txt, pooled, max_stage, positions) in zip(self.slots, loaded):
            drop, eps, t = sample_randomness(self.cfg.seed, self.cfg.caption_dropout, positions, x.shape[1:],
                                             self.device)
            # Paper §3.4: drop 10 % of the captions (the empty prompt is the unconditional input)
            txt = torch.where(drop[:, None, None], self.uncond[0], txt)
            pooled = torch.where(drop[:, None], self.uncond[1], pooled)
            mine = [stages[i] for i in slot]
            order = sorted(range(len(slot)), key=lambda i: mine[i])  # the micro-batch by stage
            counts = [mine.count(k) for k in range(1, self.K + 1)]
            micro.append(MicroBatch(x[order], txt[order], pooled[order], eps[order], t[order], counts))
        return micro, [stages.count(k) for k in range(1, self.K + 1)]

    def global_max_stages(self, loaded):
        """The highest stage each sample of the global batch may train (Algorithm 1's size rule),
        gathered from every rank's micro-batches; None when every image allows every stage (the
        built-in data), which needs no communication."""
        if self.loader is None:
            return None
        everyone = torch.zeros(self.cfg.batch_size)
        for slot, (_, _, _, max_stage, _) in zip(self.slots, loaded):
            everyone[slot] = max_stage.float()
        return [int(m) for m in parallel.all_sum(everyone).tolist()]


def batch_stages(ratios, batch_size: int, max_stages=None) -> list[int]:
    """The stage of each sample of a global batch, by its position: stage_counts(ratios) of them
    per stage, stage 1 first; with max_stages, Algorithm 1's size rule decides who goes where."""
    counts = stage_counts(ratios, batch_size)
    if max_stages is None or min(max_stages) == len(counts):
        return [k for k, n in enumerate(counts, 1) for _ in range(n)]
    return assign_stages(max_stages, counts)


# ----------------------------------------------------------------------------------------------
# 7. Command line
# ----------------------------------------------------------------------------------------------


def cmd_scan(a):
    min_size = nami.stage_size(a.resolution, a.stages, 1) if a.resolution else 1
    items, counts = scan(a.data, min_size=min_size)
    print(summary_line(counts))
    if a.resolution:
        per = Counter(max_stage(it.native, a.resolution, a.stages) for it in items)
        print("highest stage allowed (Algorithm 1): "
              + ", ".join(f"stage {k} ({nami.stage_size(a.resolution, a.stages, k)} px): {per[k]}"
                          for k in range(1, a.stages + 1)))


def cmd_cache(a):
    """Build a cache in a.out, holding its lock (exclusive) from before the scan to the end: a
    second build, or a training run reading the cache (it holds the lock shared), refuses."""
    Path(a.out).mkdir(parents=True, exist_ok=True)
    lock = files.lock_folder(a.out, purpose="python data.py cache")
    try:
        build_cache_command(a)
    finally:
        lock.release()


def build_cache_command(a):
    import encoders  # here only: the rest of data.py works without it
    dataset = FolderDataset(a.data, a.resolution, a.stages)  # scan first: data errors before model loading
    device = "cuda" if torch.cuda.is_available() else "cpu"
    autoencoder = encoders.load_autoencoder(a.vae, device=device)
    multiple = autoencoder.factor * nami.size_multiple(a.stages)  # VAE factor · patch · 2^(K−1)
    if a.resolution % multiple:
        lower = a.resolution // multiple * multiple
        raise ValueError(f"--resolution {a.resolution} is not divisible by vae factor·patch·2^(stages−1) = {multiple}: "
                         f"use {lower or multiple} or {lower + multiple}")
    text_encoder = encoders.TextEncoder(a.text_encoder, max_len=a.text_len, device=device,
                                        pooled_path=a.pooled_encoder, pooled_len=a.pooled_len)
    meta = build_cache(dataset, text_encoder, autoencoder, a.out, DTYPES[a.dtype], batch_size=a.batch_size,
                       num_workers=a.workers)
    print(f"cache: {meta['count']} items in {len(meta['shards'])} shards -> {a.out}")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="command", required=True)
    s = sub.add_parser("scan", help="count usable, skipped and converted images")
    s.add_argument("data", help="data folder")
    s.add_argument("--resolution", type=int, help="full training size: also skip images too small for stage 1")
    s.add_argument("--stages", type=int, default=3, help="number of stages K")
    c = sub.add_parser("cache", help="precompute VAE latents and text states")
    c.add_argument("data", help="data folder")
    c.add_argument("--out", required=True, help="cache folder")
    c.add_argument("--resolution", type=int, required=True, help="full training size (pixels)")
    c.add_argument("--stages", type=int, default=3, help="number of stages K")
    c.add_argument("--vae", help="VAE folder (default: none, pixel space)")
    c.add_argument("--text-encoder", help="text encoder folder (default: encoders.TextEncoder's)")
    c.add_argument("--pooled-encoder", help="encoder folder of the pooled vector (default: the text encoder)")
    c.add_argument("--text-len", type=int, default=16, help="text tokens per prompt (paper: 256)")
    c.add_argument("--pooled-len", type=int, default=77, help="tokens of the pooled encoder (paper: 77)")
    c.add_argument("--dtype", default="bf16", choices=sorted(DTYPES), help="stored precision")
    c.add_argument("--batch-size", type=int, default=16)
    c.add_argument("--workers", type=int, default=0, help="DataLoader workers decoding images")
    a = ap.parse_args(argv)
    if (a.resolution is not None and a.resolution <= 0) or a.stages < 1:
        raise SystemExit("error: --resolution and --stages must be positive")
    try:
        cmd_scan(a) if a.command == "scan" else cmd_cache(a)
    except (ValueError, FileNotFoundError) as e:
        raise SystemExit(f"error: {e}")


if __name__ == "__main__":
    main()
