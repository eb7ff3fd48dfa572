"""Image folders as training data: finding images and their captions, decoding each image once,
and the folder as a torch Dataset at the training size.

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
together with its highest allowed stage (`max_stage`); feed.assign_stages then picks a stage per
sample of a batch.

`python -m datafeed scan DATA_DIR` prints what a folder would give.
"""
from __future__ import annotations

import hashlib
import json
import os
import stat
import struct
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import ExifTags, Image, ImageOps
from tqdm import tqdm

import nami
from common import files
from common.images import to_tensor
from datafeed import buckets

IMAGE_EXTS = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff"}
MANIFEST = "metadata.jsonl"

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
# 3. The folder as a Dataset, with Algorithm 1's size rule
# ----------------------------------------------------------------------------------------------


def max_stage(native: int, resolution: int, num_stages: int) -> int:
    """The highest stage k whose size R / 2^(K−k) is at most the native (shorter) side; 0 if
    even stage 1 is larger. [Algorithm 1: a stage uses only images at least its size]"""
    return max((k for k in range(1, num_stages + 1) if nami.stage_size(resolution, num_stages, k) <= native), default=0)



def mix_seed(*parts) -> int:
    """A 64-bit seed from integers, e.g. (seed, epoch): unrelated streams for nearby inputs."""
    return int.from_bytes(hashlib.sha256(repr(parts).encode()).digest()[:8], "little")


def index_epoch(key) -> tuple[int, int]:
    """Dataset keys are an index, or (index, epoch) from ResumableSampler(with_epoch=True)."""
    return (int(key[0]), int(key[1])) if isinstance(key, (tuple, list)) else (int(key), 0)


class FolderDataset(torch.utils.data.Dataset):
    """The images of a data folder at training size R, each with its caption and max_stage.

    Without bucket_sizes every image is centre-cropped to a square R × R; with them (datafeed/buckets.py,
    `train.py --buckets`) each image covers the bucket nearest its aspect ratio and is centre-
    cropped by the least amount, and its max_stage is the highest stage whose bucket size it
    reaches on both sides. An image whose highest allowed stage m is below K is resized to stage m's size and then
    repeated 2^(K−m) times along each axis (nearest Up), so that Down^(K−m) of the returned
    image (2×2 average pooling, docs/method.md §1) is exactly the image at stage m's size: stages ≤ m see
    the native pixels downsampled, never an upsampled guess.

    With flip=True, item (index, epoch) is mirrored left-right when a bit of
    sha256(seed, index, epoch) is set: probability 1/2, a fresh draw each epoch, the same in
    every worker and on resume. Pass keys (index, epoch) with ResumableSampler(with_epoch=True);
    a plain index means epoch 0."""

    def __init__(self, root, resolution: int, num_stages: int, flip: bool = False, progress: bool = True,
                 seed: int = 0, bucket_sizes=None):
        if num_stages < 1 or resolution % 2 ** (num_stages - 1):
            raise ValueError(f"--resolution {resolution} must be divisible by 2^(stages−1) = "
                             f"{2 ** (num_stages - 1)} for {num_stages} stages")
        self.root, self.resolution, self.num_stages = Path(root), resolution, num_stages
        self.flip, self.seed = flip, seed
        # buckets (buckets.bucket_set): each image at the (width, height) nearest its aspect; None: squares
        self.buckets = list(bucket_sizes) if bucket_sizes else [(resolution, resolution)]
        smallest = min(min(nami.stage_size(w, num_stages, 1), nami.stage_size(h, num_stages, 1)) for w, h in self.buckets)
        items, self.counts = scan(root, min_size=smallest, progress=progress)
        placed = [(it, *self.place(it)) for it in items]
        for it, _, m in placed:
            if m < 1:  # smaller than stage 1 of its bucket along one side
                self.counts.note("too small", it.rel)
                self.counts["images"] -= 1
        kept = [(it, b, m) for it, b, m in placed if m >= 1]
        if not kept:
            raise ValueError(f"no image in {root} reaches stage 1 of its bucket ({summary_line(self.counts)})")
        self.items, self.item_buckets, self.max_stages = (list(v) for v in zip(*kept))
        print(summary_line(self.counts))

    def place(self, item: Item) -> tuple[int, int]:
        """(bucket, max_stage) of an image: the bucket nearest its aspect and the highest stage whose
        bucket size it reaches on both sides; without buckets, the square and its shorter side."""
        if len(self.buckets) == 1:
            return 0, max_stage(item.native, self.resolution, self.num_stages)
        b = buckets.nearest(item.width, item.height, self.buckets)
        return b, buckets.max_stage(item.width, item.height, self.buckets[b], self.num_stages)

    def __len__(self):
        return len(self.items)

    def load(self, index: int, flipped: bool = False) -> dict:
        item, m, bucket = self.items[index], self.max_stages[index], self.buckets[self.item_buckets[index]]
        img, _ = load_rgb(item.path)
        if len(self.buckets) == 1:
            img = center_crop_resize(img, nami.stage_size(self.resolution, self.num_stages, m))
        else:
            img = buckets.cover_crop(img, buckets.stage_bucket(bucket, self.num_stages, m))
        if flipped:
            img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        x = to_tensor(img)  # (3, h, w) at stage m's size of the bucket
        f = 2 ** (self.num_stages - m)
        x = x.repeat_interleave(f, dim=1).repeat_interleave(f, dim=2)  # (3, H, W), Up^(K−m)
        return {"image": x, "caption": item.caption, "max_stage": m, "bucket": self.item_buckets[index]}

    def __getitem__(self, key) -> dict:
        index, epoch = index_epoch(key)
        return self.load(index, flipped=self.flip and (mix_seed(self.seed, index, epoch) & 1) == 1)

