"""The cache: VAE latents and text states of a data folder in safetensors shards, encoded once.

`python -m datafeed cache DATA_DIR --out CACHE_DIR ...` builds it (build_cache); `train.py --cache
CACHE_DIR` reads it (CachedDataset). A cache is keyed by text encoder, VAE, dtype, resolution and
number of stages, and fingerprinted by the folder's files and captions; CachedDataset refuses a
cache whose key differs, saying how to rebuild it.
"""
from __future__ import annotations

import bisect
import copy
import json
import os
import re
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm import tqdm

from common import files
from datafeed.folders import FolderDataset, fingerprint, index_epoch

CACHE_FORMAT = 1  # bump when the layout of the shards or of cache.json changes
TEMPORARY = re.compile(r"\.tmp-(shard-\d{5,}\.safetensors|uncond\.safetensors|cache\.json)")  # _write_atomic's
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def cache_key(text_encoder, autoencoder, dtype: torch.dtype, resolution: int, num_stages: int = 3,
              buckets=None) -> dict:
    """Everything the cached tensors depend on; a cache is used only if its key is equal.
    (num_stages matters too: it decides which images are kept and their max_stage; and the bucket
    set, buckets.bucket_set, the size each image was cropped to.)"""
    key = {"format": CACHE_FORMAT, "text_encoder": text_encoder.identity(), "vae": autoencoder.identity(),
           "dtype": str(dtype).removeprefix("torch."), "resolution": resolution, "stages": num_stages}
    if buckets_key(buckets) is not None:  # square caches keep the key they always had
        key["buckets"] = buckets_key(buckets)
    return key


def buckets_key(buckets):
    """A bucket set as a cache key records it: [[width, height], ...], or None for squares alone."""
    return [list(b) for b in buckets] if buckets and len(buckets) > 1 else None


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
                             "name inside the cache folder: this cache.json was not written by `python -m datafeed cache`")
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
    uncond.safetensors, and last cache.json {key, count, shards, data}. Returns cache.json's dict.
    With buckets each shard holds images of one bucket (its latents stack), bucket by bucket: the
    cache's item order is the folder's within each bucket, and cache.json names each shard's bucket."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    _clear_cache(out)
    plain = copy.copy(dataset)
    plain.flip = False
    device = _device_of(autoencoder)
    shards = []

    def write_shard(rows: dict, bucket: int):
        name = f"shard-{len(shards):05d}.safetensors"
        _write_atomic(out / name, lambda tmp: save_file({k: v.contiguous() for k, v in rows.items()}, tmp))
        shards.append({"file": name, "count": len(rows["max_stage"]), "bucket": bucket})

    bar = tqdm(total=len(dataset), desc="cache", unit="img", disable=not progress)
    for bucket in sorted(set(dataset.item_buckets)):
        members = [i for i, b in enumerate(dataset.item_buckets) if b == bucket]
        loader = torch.utils.data.DataLoader(torch.utils.data.Subset(plain, members), batch_size=batch_size,
                                             num_workers=num_workers)
        buffer = []  # encoded batches not yet in a shard
        for batch in loader:
            latent = autoencoder.encode(batch["image"].to(device))  # (B, C, H/f, W/f)
            txt, pooled = text_encoder.encode(list(batch["caption"]))  # (B, L, D), (B, P)
            buffer.append({"latent": latent.to("cpu", dtype), "txt": txt.to("cpu", dtype),
                           "pooled": pooled.to("cpu", dtype), "max_stage": batch["max_stage"].long()})
            rows = {k: torch.cat([b[k] for b in buffer]) for k in buffer[0]}
            while len(rows["max_stage"]) >= shard_size:
                write_shard({k: v[:shard_size] for k, v in rows.items()}, bucket)
                rows = {k: v[shard_size:] for k, v in rows.items()}
            buffer = [rows]
            bar.update(len(batch["caption"]))
        if buffer and len(buffer[0]["max_stage"]):
            write_shard(buffer[0], bucket)
    bar.close()

    # Paper §3.4: caption dropout trains on the empty prompt's embedding (the CFG unconditional)
    txt, pooled = text_encoder.encode([""])
    _write_atomic(out / "uncond.safetensors",
                  lambda tmp: save_file({"txt": txt[0].to("cpu", dtype).contiguous(),
                                         "pooled": pooled[0].to("cpu", dtype).contiguous()}, tmp))
    meta = {"key": cache_key(text_encoder, autoencoder, dtype, dataset.resolution, dataset.num_stages,
                             dataset.buckets),
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
        command = (f"`python -m datafeed cache DATA_DIR --out {self.dir} --resolution {expect_key.get('resolution')} "
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
        self.buckets = meta["key"].get("buckets") or [[meta["key"]["resolution"]] * 2]
        self.item_buckets = [s.get("bucket", 0) for s in meta["shards"] for _ in range(s["count"])]
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
        index, _ = index_epoch(key)
        if not 0 <= index < len(self):
            raise IndexError(f"cache item {index} out of range 0..{len(self) - 1}")
        shard = bisect.bisect_right(self.ends, index)
        row = index - (self.ends[shard - 1] if shard else 0)
        h = self._handle(shard)
        item = {name: h.get_slice(name)[row:row + 1][0].float() for name in ("latent", "txt", "pooled")}
        item["max_stage"] = int(h.get_slice("max_stage")[row:row + 1][0])
        item["bucket"] = self.item_buckets[index]
        return item

    @property
    def uncond(self) -> tuple[torch.Tensor, torch.Tensor]:
        with safe_open(self.dir / "uncond.safetensors", framework="pt") as f:
            return f.get_tensor("txt").float(), f.get_tensor("pooled").float()
