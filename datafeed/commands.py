"""The data tools' command line: what an image folder would give a run, and its cache.

    python -m datafeed scan DATA_DIR --resolution 256 --stages 3      # what would be used, and why not,
                                                                      # and the aspect-ratio buckets and their crops
    python -m datafeed cache DATA_DIR --out CACHE_DIR --resolution 256 [--vae PATH] [--text-encoder PATH]

Run from the repository root; docs/data.md says when a cache pays and how train.py reads it.
"""
from __future__ import annotations

import argparse
from collections import Counter
from pathlib import Path

import torch

import nami
from common import files
from datafeed.buckets import bucket_set, crop_share
from datafeed.cache import DTYPES, build_cache
from datafeed.folders import FolderDataset, scan, summary_line


def cmd_scan(a):
    if not a.resolution:
        print(summary_line(scan(a.data)[1]))
        return
    sizes = bucket_set(a.resolution, a.vae_factor * nami.size_multiple(a.stages)) if a.buckets else None
    dataset = FolderDataset(a.data, a.resolution, a.stages, bucket_sizes=sizes)  # prints the summary line
    per = Counter(dataset.max_stages)
    print("highest stage allowed (Algorithm 1, both sides): " + ", ".join(f"stage {k}: {per[k]}"
                                                                         for k in range(1, a.stages + 1)))
    print("| bucket (W×H px) | images | pixels cropped away: mean | max |\n|---|---:|---:|---:|")
    for b, (w, h) in enumerate(dataset.buckets):
        crops = [crop_share(it.width, it.height, (w, h)) for it, ib in zip(dataset.items, dataset.item_buckets) if ib == b]
        if crops:
            print(f"| {w}×{h} | {len(crops)} | {100 * sum(crops) / len(crops):.1f} % | {100 * max(crops):.1f} % |")


def cmd_cache(a):
    """Build a cache in a.out, holding its lock (exclusive) from before the scan to the end: a
    second build, or a training run reading the cache (it holds the lock shared), refuses."""
    Path(a.out).mkdir(parents=True, exist_ok=True)
    lock = files.lock_folder(a.out, purpose="python -m datafeed cache")
    try:
        build_cache_command(a)
    finally:
        lock.release()


def build_cache_command(a):
    from common import encoders  # here only: scan works without the encoders' packages
    device = "cuda" if torch.cuda.is_available() else "cpu"
    factor = (encoders.vae_factor(a.vae) or encoders.load_autoencoder(a.vae).factor) if a.vae else 1  # config.json alone
    multiple = factor * nami.size_multiple(a.stages)  # VAE factor · patch · 2^(K−1)
    sizes = bucket_set(a.resolution, multiple) if a.buckets else None  # as train.py --buckets makes them
    dataset = FolderDataset(a.data, a.resolution, a.stages, bucket_sizes=sizes)  # scan first: data errors early
    autoencoder = encoders.load_autoencoder(a.vae, device=device)
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
    ap = argparse.ArgumentParser(prog="python -m datafeed", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="command", required=True)
    s = sub.add_parser("scan", help="count usable, skipped and converted images")
    s.add_argument("data", help="data folder")
    s.add_argument("--resolution", type=int, help="full training size: also skip images too small for stage 1")
    s.add_argument("--stages", type=int, default=3, help="number of stages K")
    s.add_argument("--vae-factor", type=int, default=1, help="pixels per latent cell of the run's VAE (FLUX: 8; "
                   "default 1, pixel space): bucket sides are multiples of it × patch 2 × 2^(K−1)")
    s.add_argument("--buckets", action=argparse.BooleanOptionalAction, default=True,
                   help="report the aspect-ratio buckets of train.py --buckets (default) or the square crops")
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
    c.add_argument("--buckets", action=argparse.BooleanOptionalAction, default=True,
                   help="aspect-ratio buckets, as train.py --buckets (default; the cache is keyed by them)")
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
