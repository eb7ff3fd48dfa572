"""Aspect-ratio buckets: images of any shape trained at every stage without a square crop.

A run's bucket set holds sizes of about its pixel count R² (never more), each side a multiple of
what every stage needs (VAE factor × patch × 2^(K−1)): at R = 1024 with the FLUX VAE and K = 3,
1024×1024, 1152×896, 1216×832, 1344×768, 1536×640 and their transposes, the list FLUX-era
trainers use (kohya-ss/sd-scripts, SimpleTuner, ostris/ai-toolkit). Each image goes to the bucket
nearest its aspect ratio (in log scale: 2:1 and 1:2 are as far from 1:1), is resized to cover
it and centre-cropped by the smallest amount. A global batch is drawn from one bucket, so that
its samples stack; feed.BucketSampler orders them, deterministic and resumable, the same on any
number of ranks. Algorithm 1's size rule holds per side: a stage trains only on images whose
width and height both reach its size (`max_stage`).

    python -m datafeed scan DIR --resolution 1024 --stages 3 --multiple 64   # the histogram, the crops
"""
from __future__ import annotations

import math

from PIL import Image

import nami

# Aspect ratios (width / height, ≥ 1) of the buckets: at 1024² and a multiple of 64 they give exactly
# 1024×1024, 1152×896 (9:7), 1216×832 (19:13), 1344×768 (7:4) and 1536×640 (12:5)
ASPECTS = (1.0, 9 / 7, 19 / 13, 7 / 4, 12 / 5)


def bucket_set(resolution: int, multiple: int) -> list[tuple[int, int]]:
    """The (width, height) of each bucket: the square first, then each landscape size and its
    portrait transpose; each side rounded down to the multiple (about R² pixels, never more), and
    sizes that round to one already listed left out."""
    sizes: list[tuple[int, int]] = []
    for aspect in ASPECTS:
        w = max(multiple, int(resolution * math.sqrt(aspect)) // multiple * multiple)
        h = max(multiple, int(resolution / math.sqrt(aspect)) // multiple * multiple)
        for size in ((w, h), (h, w)):
            if size not in sizes:
                sizes.append(size)
    return sizes


def nearest(width: int, height: int, buckets) -> int:
    """The index of the bucket nearest an image's aspect ratio, in log scale (the first on a tie)."""
    aspect = math.log(width / height)
    return min(range(len(buckets)), key=lambda b: abs(aspect - math.log(buckets[b][0] / buckets[b][1])))


def crop_share(width: int, height: int, bucket) -> float:
    """The share of an image's pixels that covering the bucket and centre-cropping cuts away."""
    a, b = width / height, bucket[0] / bucket[1]
    return 1 - min(a, b) / max(a, b)


def stage_bucket(bucket, num_stages: int, k: int) -> tuple[int, int]:
    """A bucket's (width, height) at stage k: each side halved K − k times."""
    return nami.stage_size(bucket[0], num_stages, k), nami.stage_size(bucket[1], num_stages, k)


def max_stage(width: int, height: int, bucket, num_stages: int) -> int:
    """The highest stage k at which the image covers the bucket's stage-k size without being
    enlarged (both sides at least the stage's); 0 if not even stage 1's. [Algorithm 1, per side]"""
    return max((k for k in range(1, num_stages + 1)
                if width >= stage_bucket(bucket, num_stages, k)[0] and height >= stage_bucket(bucket, num_stages, k)[1]),
               default=0)


def cover_crop(img: Image.Image, size) -> Image.Image:
    """The image resized to cover size = (width, height) and centre-cropped to it: the largest
    centred box of the bucket's aspect is cut first (whole pixels), then resized with Lanczos, so
    that the filter never reads pixels outside the box (folders.center_crop_resize, any aspect)."""
    w, h = img.size
    scale = max(size[0] / w, size[1] / h)
    box_w, box_h = min(w, round(size[0] / scale)), min(h, round(size[1] / scale))
    left, top = (w - box_w) // 2, (h - box_h) // 2
    return img.crop((left, top, left + box_w, top + box_h)).resize(size, Image.Resampling.LANCZOS, reducing_gap=3.0)


def size_for(aspect: float | None, resolution: int, multiple: int) -> tuple[int, int]:
    """The (width, height) of a run's pictures: R × R, or with an aspect ratio (the built-in world's
    --aspect) the bucket nearest it."""
    if aspect is None or aspect == 1:
        return resolution, resolution
    sizes = bucket_set(resolution, multiple)
    return sizes[nearest(aspect, 1, sizes)]
