"""The training feed of Algorithm 1: line 5's global batches of full-size latents, in a resumable data order.

`Batches` feeds train.py: each step's global batch (from the built-in shapes world, an image folder read by
datafeed/folders.py, or a cache made by datafeed/cache.py) cut into this rank's micro-batches, each sample with its
position in the data order (train.py draws its noise, t' and caption dropout from it) and the highest stage its image
allows (Algorithm 1's size rule: a stage trains only on images at least its size; folders.max_stage). Which stage
each sample trains at the phase's ratio is `batch_stages` (§4.3), which train.py calls. The data tools' command line
(scan, cache) is datafeed/commands.py, run as python -m datafeed.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass

import torch

import nami
from common import parallel
from datafeed.buckets import bucket_set, size_for
from datafeed.cache import CachedDataset, cache_dtype, cache_key
from datafeed.folders import FolderDataset, folder_captions, mix_seed
from toyworld import shapes

# ----------------------------------------------------------------------------------------------
# 1. Algorithm 1's rule: which stage each sample of a batch trains
# ----------------------------------------------------------------------------------------------


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
# 2. The resumable data order and the caption vocabulary
# ----------------------------------------------------------------------------------------------


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


class BucketSampler(torch.utils.data.Sampler):
    """Endless epochs of global batches, each of `batch_size` items of one bucket. An epoch
    shuffles each bucket's items (seeded by (seed, epoch, bucket)), fills its last batch by
    wrapping around to the bucket's first items, and then shuffles the order of all the batches
    (seeded by (seed, epoch)). Every epoch has the same number of batches, so a run resumed at
    step s starts at batch s and sees exactly the order of a run that never stopped; every rank
    computes the same order and takes its own slots of each batch. Yields keys (index, or
    (index, epoch) with with_epoch, for FolderDataset's flips), batch_size of them per step."""

    def __init__(self, item_buckets: list[int], batch_size: int, seed: int, start_step: int = 0,
                 with_epoch: bool = False):
        super().__init__()
        if not item_buckets or start_step < 0:
            raise ValueError(f"BucketSampler needs items and start_step >= 0, got {len(item_buckets)} items, "
                             f"start_step={start_step}")
        self.members: dict[int, list[int]] = {}
        for index, bucket in enumerate(item_buckets):
            self.members.setdefault(bucket, []).append(index)
        self.batch_size, self.seed, self.start_step, self.with_epoch = batch_size, seed, start_step, with_epoch
        self.per_epoch = sum(-(-len(m) // batch_size) for m in self.members.values())

    def batches(self, epoch: int) -> list[list[int]]:
        B, out = self.batch_size, []
        for bucket in sorted(self.members):
            items = self.members[bucket]
            gen = torch.Generator().manual_seed(mix_seed(self.seed, epoch, "bucket", bucket))
            order = [items[i] for i in torch.randperm(len(items), generator=gen).tolist()]
            n = -(-len(order) // B) * B
            order = [order[i % len(order)] for i in range(n)]  # the last batch filled by wrapping around
            out += [order[i:i + B] for i in range(0, n, B)]
        gen = torch.Generator().manual_seed(mix_seed(self.seed, epoch, "batches"))
        return [out[i] for i in torch.randperm(len(out), generator=gen).tolist()]

    def __iter__(self):
        epoch, offset = divmod(self.start_step, self.per_epoch)
        while True:
            for batch in self.batches(epoch)[offset:]:
                yield from ((i, epoch) if self.with_epoch else i for i in batch)
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


def world_note(prompt: str, vocabulary) -> str | None:
    """A one-line note when the prompt uses none of the content words of the checkpoint's training
    captions (its config.json's vocabulary, feed.vocabulary): such a prompt still samples, from that world."""
    if not vocabulary or not words(prompt) or set(words(prompt)) & set(vocabulary):
        return None
    shown = ", ".join(vocabulary[:30]) + (f", … ({len(vocabulary)} words)" if len(vocabulary) > 30 else "")
    return (f"note: this prompt names nothing this checkpoint was trained on (its captions' words: {shown}); "
            "it will draw something of that world. For the authors' text-to-image NAMI-2B use --weights DIR "
            "(docs/release.md, \"The authors' NAMI-2B\")")


# ----------------------------------------------------------------------------------------------
# 3. The training feed: global batches cut into this rank's micro-batches, ordered by stage
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


def sample_generator(seed: int, position: int) -> torch.Generator:
    """The generator of one sample's draws (train.draws: caption dropout, ε_K, t'), seeded by (seed, its position in
    the data order): a sample draws the same numbers on whichever rank and in whichever micro-batch it lands, so a
    run on N ranks repeats the one-process run, and a resumed run the one that never stopped."""
    return torch.Generator().manual_seed(mix_seed(seed, "noise", position))


@dataclass
class MicroBatch:
    """One micro-batch of a step's global batch as the data gives it (Algorithm 1, line 5)."""
    x: torch.Tensor        # (n, C, H, W) clean latents x'_1 at the full training size
    txt: torch.Tensor      # (n, L, D) text states of the captions
    pooled: torch.Tensor   # (n, P) pooled text vectors
    positions: list        # each sample's position in the data order (the seed of its draws: sample_generator)
    slot: list             # each sample's index in the global batch (batch_stages gives its stage by it)
    max_stage: torch.Tensor  # (n,) the highest stage each image may train (Algorithm 1's size rule)


class Batches:
    """Training micro-batches as latents at the full training size, from the built-in shapes data,
    an image folder (cfg.data, encoded on the fly) or a cache (cfg.cache, encoded once by
    `python -m datafeed cache`). `cfg` is train.py's TrainConfig.

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
        # the built-in world's pictures: R × R, or the bucket nearest --aspect
        self.size = size_for(cfg.aspect, cfg.resolution, autoencoder.factor * nami.size_multiple(num_stages))
        if cfg.data or cfg.cache:
            # datafeed/buckets.py: sizes of about R² whose sides every stage can halve, in the autoencoder's pixels
            sizes = bucket_set(cfg.resolution, autoencoder.factor * nami.size_multiple(num_stages)) if cfg.buckets else None
            if cfg.cache:
                key = cache_key(encoder, autoencoder, cache_dtype(cfg.cache), cfg.resolution, num_stages, sizes)
                dataset = CachedDataset(cfg.cache, key)
                self.uncond = tuple(u.unsqueeze(0).to(device) for u in dataset.uncond)
            else:
                dataset = FolderDataset(cfg.data, cfg.resolution, num_stages, flip=cfg.flip,
                                        progress=cfg.progress, seed=cfg.seed, bucket_sizes=sizes)
                self.prompts = [dataset.items[i].caption for i in range(min(8, len(dataset)))]
            if len(dataset.buckets) > 1:  # each global batch from one bucket, so that its samples stack
                order = iter(BucketSampler(dataset.item_buckets, B, cfg.seed + stream, start_step, with_epoch=cfg.flip))
            else:
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
            (w, h), level = self.size, self.cfg.world_level
            pixels, samples = shapes.batch_at(self.cfg.seed, positions, min(w, h), level=level, aspect=w / h)
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

    def next_step(self) -> list[MicroBatch]:
        """This rank's micro-batches of the next global batch (Algorithm 1, line 5), as the data gives them: the same
        global batches whatever the micro-batch size and the number of ranks."""
        return [MicroBatch(x, txt, pooled, positions, slot, max_stage)
                for slot, (x, txt, pooled, max_stage, positions) in zip(self.slots, [self.next() for _ in self.slots])]

    def max_stages(self, micro_batches: list[MicroBatch]) -> list[int] | None:
        """The highest stage each sample of the global batch may train (Algorithm 1's size rule), gathered from every
        rank's micro-batches; None when every image allows every stage (the built-in data): no communication."""
        if self.loader is None:
            return None
        everyone = torch.zeros(self.cfg.batch_size)
        for batch in micro_batches:
            everyone[batch.slot] = batch.max_stage.float()
        return [int(m) for m in parallel.all_sum(everyone).tolist()]


def batch_stages(ratios, batch_size: int, max_stages=None) -> list[int]:
    """The stage of each sample of a global batch, by its position: stage_counts(ratios) of them
    per stage, stage 1 first; with max_stages, Algorithm 1's size rule decides who goes where."""
    counts = stage_counts(ratios, batch_size)
    if max_stages is None or min(max_stages) == len(counts):
        return [k for k, n in enumerate(counts, 1) for _ in range(n)]
    return assign_stages(max_stages, counts)

