"""Train NAMI: BridgeFlow pre-training, then Algorithm 1 (multi-resolution training of the
progressive rectified flow transformer), on the built-in shapes data or an image folder.

    python train.py                          # default CPU preset, ~15 min on 2 cores
    python train.py --max-steps 7000 --ema-decay 0.999 --out runs/shapes-small-long   # the longer recipe
    python train.py --mode flat              # the flat baseline (K = 1, full model)
    python train.py --resume                 # continue the run in --out where it stopped
    python train.py --size 0.6b --data DIR --vae VAE --text-encoder MT5 --pooled-encoder MCLIP \
        --text-len 256 --resolution 1024      # real data in the FLUX VAE's latent space
    python data.py cache DIR --out CACHE ...  # then train with --cache CACHE instead of --data DIR
    torchrun --nproc_per_node 8 train.py --size 2b ...   # DDP / FSDP2 (see parallel.py)

Writes to --out: log.jsonl (metrics), samples/step-NNNNNNN.png (fixed prompts and seeds),
ckpt-NNNNNNN/ (weights.safetensors: model, EMA and BridgeFlow; config.json; train_state.pt:
optimizer, step, RNG and data position; dcp/ under FSDP2). Checkpoints are never partial on
disk; a killed run continues with --resume. `main(TrainConfig(...))` is importable.
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import os
import pickle
import shutil
import signal
import threading
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
from safetensors.torch import save_file
from tqdm import tqdm

import data
import nami
import parallel
import shapes
from bridgeflow import BridgeFlow, pretrain
from encoders import TextEncoder, load_autoencoder

SAMPLE_PROMPTS = [
    "a photo of a red circle", "a blue square", "a photo of a green triangle", "three yellow circles",
    "a purple square to the left of an orange circle", "a white triangle above a blue square",
    "a photo of a circle and a square", "a photo of a red circle and a green square",
]


@dataclass
class TrainConfig:
    size: str = "small"                   # model preset (nami.PRESETS)
    mode: str = "nami"                    # nami | flat (K = 1, full model) | flow-only (stages, full model)
    cuts: tuple | None = None             # stage cut points over the single blocks (paper Fig. 7)
    window_ratios: tuple | None = None    # time-window ratios of the stages (paper Fig. 8)
    resolution: int = 32                  # full training size of the built-in data (pixels)
    batch_size: int = 32
    lr: float = 1e-3
    max_steps: int = 1200
    warmup: int = 100
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    ema_decay: float = 0.995
    stage_mix: str = "4:2:1,2:4:1,1:2:4"  # per-phase stage sampling ratios, low -> high resolution
    mix_fractions: str = "0.48,0.32,0.2"  # share of the run per phase (paper: 120k, 80k, 50k steps)
    final_lr_scale: float = 0.5           # lr factor of the last phase (paper: 1e-4 -> 5e-5)
    stage_weights: tuple | None = None    # w_k of Eq. 4 (default 1 per stage)
    caption_dropout: float = 0.1
    start: str = "bridge"                 # stage start point: bridge (paper) | pyramid (analytic)
    bridge_steps: int = 1000
    bridge_lr: float = 1e-3
    data: str | None = None               # image folder (captions: .txt beside each image or
                                          # metadata.jsonl); default: the built-in shapes data
    cache: str | None = None              # precomputed latents + text states (python data.py cache)
    flip: bool = False                    # random horizontal flips of --data images
    workers: int = 2                      # DataLoader worker processes for --data / --cache
    text_encoder: str | None = None       # local transformers folder (default: all-MiniLM-L6-v2)
    pooled_encoder: str | None = None     # CLIP-style encoder for the pooled vector (default: the
                                          # masked mean of the text states)
    text_len: int = 16                    # text tokens (paper: 256 for mT5)
    pooled_len: int = 77                  # tokens of the pooled encoder (paper: 77)
    vae: str | None = None                # diffusers AutoencoderKL folder: train in its latent space
    out: str = "runs/shapes-small"
    resume: bool = False
    stop_after: int | None = None         # stop (with a checkpoint) at this step; the schedules
                                          # still follow max_steps, so --resume continues the same run
    seed: int = 0
    sample_every: int = 300
    ckpt_every: int = 300
    keep: int = 3                         # checkpoints kept
    max_bad_steps: int = 5                # non-finite loss/gradient steps in a row before stopping
    log_every: int = 10
    bf16: bool | None = None              # bf16 autocast, fp32 master weights (default: on CUDA only;
                                          # on a CPU without AMX bf16 matmuls are slower than fp32)
    parallel: str | None = None           # ddp | fsdp under torchrun (default: fsdp for 0.6b/2b, else ddp)
    micro_batch: int | None = None        # samples per rank per forward; batch_size = micro · ranks ·
                                          # accumulation steps (default: batch_size / ranks, no accumulation)
    activation_checkpointing: bool = False  # recompute each block in backward: less memory, ~30 % more time
    compile: bool = False                 # torch.compile each block (one graph per stage resolution)
    progress: bool = True


# ----------------------------------------------------------------------------------------------
# set-up helpers
# ----------------------------------------------------------------------------------------------


def parse_ints(text, what):
    try:
        return tuple(int(v) for v in str(text).replace(":", ",").split(",") if v.strip())
    except ValueError:
        raise SystemExit(f"error: {what} must be integers separated by commas or colons, got {text!r}")


def model_config(cfg: TrainConfig, text_dim: int, pooled_dim: int, channels: int) -> nami.NamiConfig:
    """The NamiConfig of this run: preset, mode, ablation overrides, the widths of the encoders
    and the latent channels of the autoencoder."""
    base = nami.PRESETS[cfg.size]
    overrides = dict(joint_attention_dim=text_dim, pooled_projection_dim=pooled_dim, in_channels=channels)
    if cfg.window_ratios is not None:
        overrides["window_ratios"] = cfg.window_ratios
    if cfg.cuts is not None:
        overrides["cuts"] = cfg.cuts
    if cfg.mode == "flat":    # one window [1 -> 0], full model, full resolution
        overrides.update(window_ratios=(1,), cuts=(base["depth_single"],))
    elif cfg.mode == "flow-only":  # the stages, but every stage runs the full model
        k = len(overrides.get("window_ratios", (1, 1, 1)))
        overrides["cuts"] = (base["depth_single"],) * k
    return nami.get_config(cfg.size, **overrides)


# Limits far beyond any sensible run: a value past them is a typo, caught before any work starts
LIMITS = {"batch_size": 1 << 16, "max_steps": 10 ** 9, "text_len": 4096, "pooled_len": 4096, "resolution": 16384,
          "sample_every": 10 ** 9, "ckpt_every": 10 ** 9, "keep": 1000, "log_every": 10 ** 9, "workers": 256,
          "bridge_steps": 10 ** 8, "warmup": 10 ** 9, "max_bad_steps": 10 ** 6}


def validate(cfg: TrainConfig):
    """Check every setting before any work starts (no model or encoder is loaded yet); raise
    ValueError saying what to change."""
    if cfg.size not in nami.PRESETS:
        raise ValueError(f"unknown preset --size {cfg.size!r}; choose one of {sorted(nami.PRESETS)}")
    if cfg.mode not in ("nami", "flat", "flow-only"):
        raise ValueError(f"--mode must be nami, flat or flow-only, got {cfg.mode!r}")
    if cfg.start not in ("bridge", "pyramid"):
        raise ValueError(f"--start must be bridge or pyramid, got {cfg.start!r}")
    for name, limit in LIMITS.items():
        value, least = getattr(cfg, name), 0 if name in ("workers", "bridge_steps", "warmup") else 1
        if not least <= value <= limit:
            raise ValueError(f"--{name.replace('_', '-')} must be between {least} and {limit}, got {value}")
    checks = [(0 < cfg.lr < 1, f"--lr must be in (0, 1), got {cfg.lr}"),
              (0 <= cfg.ema_decay < 1, f"--ema-decay must be in [0, 1), got {cfg.ema_decay}"),
              (0 <= cfg.caption_dropout < 1, f"--caption-dropout must be in [0, 1), got {cfg.caption_dropout}"),
              (0 < cfg.bridge_lr < 1, f"--bridge-lr must be in (0, 1), got {cfg.bridge_lr}"),
              (0 <= cfg.weight_decay < 10, f"--weight-decay must be in [0, 10), got {cfg.weight_decay}"),
              (0 < cfg.grad_clip <= 1e6, f"--grad-clip must be in (0, 1e6], got {cfg.grad_clip}"),
              (0 < cfg.final_lr_scale <= 1, f"--final-lr-scale must be in (0, 1], got {cfg.final_lr_scale}"),
              (cfg.stop_after is None or cfg.stop_after > 0, f"--stop-after must be positive, got {cfg.stop_after}"),
              (0 <= cfg.seed < 2 ** 63, f"--seed must be between 0 and 2^63 − 1, got {cfg.seed}"),
              (not (cfg.data and cfg.cache), "give --data (images, encoded on the fly) or --cache (precomputed), not both"),
              (not cfg.flip or bool(cfg.data), "--flip applies to --data images only (a cache holds unflipped latents)"),
              (cfg.parallel in (None, "ddp", "fsdp"), f"--parallel must be ddp or fsdp, got {cfg.parallel}"),
              (cfg.micro_batch is None or 1 <= cfg.micro_batch <= cfg.batch_size,
               f"--micro-batch must be between 1 and --batch-size {cfg.batch_size}, got {cfg.micro_batch}")]
    for ok, message in checks:
        if not ok:
            raise ValueError(message)
    for flag, path in (("--data", cfg.data), ("--cache", cfg.cache), ("--vae", cfg.vae),
                       ("--text-encoder", cfg.text_encoder), ("--pooled-encoder", cfg.pooled_encoder)):
        if path is not None and not Path(path).is_dir():
            raise ValueError(f"{flag} {path}: no such folder")
    # cuts and window ratios must fit the preset (NamiConfig names what is wrong), the stage mix
    # and the loss weights must have one value per stage
    mcfg = model_config(cfg, 1, 1, 3)
    stage_mix_schedule(cfg, mcfg.num_stages)
    if cfg.vae is None:  # pixel space; with a VAE its factor is known once its config is read
        nami.check_resolution(cfg.resolution, cfg.resolution, mcfg.size_multiple, "--resolution")
    if cfg.stage_weights is not None and (len(cfg.stage_weights) != mcfg.num_stages or min(cfg.stage_weights) < 0):
        raise ValueError(f"--stage-weights needs {mcfg.num_stages} non-negative values, got {cfg.stage_weights}")
    check_writable(Path(cfg.out))


def check_writable(out: Path):
    """Create the output folder and write a probe file in it, so that a path that cannot be
    written fails now, with the reason, not after hours of training."""
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".write-test"
        probe.write_text("ok")
        probe.unlink()
    except OSError as e:
        raise ValueError(f"--out {out} cannot be written ({e.strerror or e}): choose another folder")


def stage_mix_schedule(cfg: TrainConfig, num_stages: int):
    """[(first step, last step, ratios)] per phase, scaled to the run's length."""
    if num_stages == 1:
        return [(0, cfg.max_steps, (1,))]
    phases = [parse_ints(p, "--stage-mix") for p in cfg.stage_mix.split(",")] if "," in cfg.stage_mix and ":" in cfg.stage_mix \
        else [parse_ints(cfg.stage_mix, "--stage-mix")]
    try:
        fracs = [float(f) for f in cfg.mix_fractions.split(",")] if len(phases) > 1 else [1.0]
    except ValueError:
        raise ValueError(f"--mix-fractions must be numbers separated by commas, e.g. 0.48,0.32,0.2, "
                         f"got {cfg.mix_fractions!r}")
    if len(fracs) != len(phases) or any(len(p) != num_stages for p in phases) or any(min(p) < 0 or sum(p) == 0 for p in phases):
        raise ValueError(f"--stage-mix {cfg.stage_mix!r} with --mix-fractions {cfg.mix_fractions!r} must give "
                         f"one fraction per phase and {num_stages} non-negative ratios per phase")
    schedule, start, total = [], 0, sum(fracs)
    for i, (ratios, frac) in enumerate(zip(phases, fracs)):
        end = cfg.max_steps if i == len(phases) - 1 else start + round(cfg.max_steps * frac / total)
        schedule.append((start, end, ratios))
        start = end
    return schedule


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


def learning_rate(cfg: TrainConfig, step: int, schedule) -> float:
    """Linear warm-up, constant, and final_lr_scale·lr in the last mix phase (paper §4.3)."""
    lr = cfg.lr * min(1.0, (step + 1) / max(1, cfg.warmup))
    if len(schedule) > 1 and step >= schedule[-1][0]:
        lr *= cfg.final_lr_scale
    return lr


# ----------------------------------------------------------------------------------------------
# checkpoints: never partial on disk. Each is written into a temporary folder, every file flushed
# and fsynced, the folder renamed into place (atomic on POSIX) and the parent folder fsynced, so a
# crash, a kill or a power cut leaves either the complete checkpoint or none.
# ----------------------------------------------------------------------------------------------

CKPT_FILES = ("weights.safetensors", "config.json", "train_state.pt")


def fsync_path(path: Path):
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(folder: Path):
    for path in sorted(folder.rglob("*"), reverse=True):  # files before the folders holding them
        fsync_path(path)
    fsync_path(folder)


def save_checkpoint(out: Path, step, model, ema, bridge, opt, gen, cfg, mcfg, encoder, autoencoder, dist_,
                    sharded: bool):
    """Write ckpt-<step>/: weights.safetensors (full model, EMA and BridgeFlow, which sample.py reads
    on one device), config.json, train_state.pt (step, RNG, data position; the optimizer too unless
    sharded) and, for FSDP2, dcp/ (model, EMA and optimizer shards written by every rank with
    torch.distributed.checkpoint). Collective: every rank calls it; the main rank writes the files."""
    final = out / f"{nami.CKPT_PREFIX}{step:07d}"
    tmp = out / f".tmp-{final.name}"
    if dist_.main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    parallel.barrier()
    if sharded:
        parallel.save_sharded(tmp / "dcp", model, ema, opt)
    model_sd = parallel.full_state_dict(model) if sharded else model.state_dict()
    ema_sd = parallel.full_state_dict(ema) if sharded else ema.state_dict()
    error = None
    if dist_.main:
        try:
            write_checkpoint_files(tmp, final, step, model_sd, ema_sd, bridge, None if sharded else opt, gen, cfg,
                                   mcfg, encoder, autoencoder)
        except OSError as e:
            error = f"{e}"
    error = parallel.broadcast_object(error)
    if error is not None:
        if dist_.main:
            remove_interrupted_saves(out)
        raise TrainingStopped(f"could not write the checkpoint of step {step} to {out} ({error}); the previous "
                              f"checkpoint {latest_checkpoint(out) or '(none)'} is intact. Free space or fix "
                              "the folder, then run again with --resume")
    if dist_.main:
        for stale in complete_checkpoints(out)[:-cfg.keep]:
            discard(stale)
    parallel.barrier()
    return final


def write_checkpoint_files(tmp, final, step, model_sd, ema_sd, bridge, opt, gen, cfg, mcfg, encoder, autoencoder):
    tensors = {f"model.{k}": v for k, v in model_sd.items()}
    tensors.update({f"ema.{k}": v for k, v in ema_sd.items()})
    tensors.update({f"bridge.{k}": v for k, v in bridge.state_dict().items()})
    save_file({k: v.detach().contiguous() for k, v in tensors.items()}, tmp / "weights.safetensors")
    config = {"model": mcfg.to_dict(), "train": asdict(cfg), "step": step,
              "text_encoder": encoder.identity(), "vae": autoencoder.identity(),
              "resolution": cfg.resolution, "channels": mcfg.in_channels, "mode": cfg.mode}
    (tmp / "config.json").write_text(json.dumps(config, indent=2))
    state = {"step": step, "generator": gen.get_state(), "torch_rng": torch.get_rng_state(),
             "data_position": step * cfg.batch_size}
    if opt is not None:
        state["optimizer"] = opt.state_dict()
    torch.save(state, tmp / "train_state.pt")
    fsync_tree(tmp)
    out = final.parent
    if final.exists():  # the same step saved again (e.g. a resumed run stopped at once)
        discard(final)
    os.replace(tmp, final)
    fsync_path(out)


def discard(ckpt: Path):
    """Delete an old checkpoint without ever leaving it half deleted under its own name: rename it
    first (atomic), then delete (a kill during the delete leaves a .old-* folder, removed later)."""
    old = ckpt.parent / f".old-{ckpt.name}"
    shutil.rmtree(old, ignore_errors=True)
    os.replace(ckpt, old)
    shutil.rmtree(old, ignore_errors=True)


def complete_checkpoints(out: Path) -> list[Path]:
    """Checkpoint folders holding all their files, oldest first (temporary folders of a save that
    was interrupted are named .tmp-* and never match)."""
    return sorted(p for p in out.glob(f"{nami.CKPT_PREFIX}*") if all((p / n).is_file() for n in CKPT_FILES))


def latest_checkpoint(out: Path):
    found = complete_checkpoints(out)
    return found[-1] if found else None


def remove_interrupted_saves(out: Path):
    for tmp in list(out.glob(f".tmp-{nami.CKPT_PREFIX}*")) + list(out.glob(f".old-{nami.CKPT_PREFIX}*")):
        shutil.rmtree(tmp, ignore_errors=True)


class TrainingStopped(Exception):
    """Training cannot go on safely (non-finite steps, a checkpoint that cannot be written)."""


class StopRequest:
    """SIGINT (Ctrl-C) and SIGTERM ask the loop to stop after the current step, write a final
    checkpoint and return; a second signal interrupts at once (the previous handlers return)."""

    def __init__(self):
        self.signal, self.previous = None, {}
        if threading.current_thread() is threading.main_thread():
            for s in (signal.SIGINT, signal.SIGTERM):
                self.previous[s] = signal.signal(s, self.request)

    def request(self, signum, frame):
        self.signal = signal.Signals(signum).name
        tqdm.write(f"{self.signal}: stopping after this step with a checkpoint (send it again to stop at once)")
        self.restore()

    def restore(self):
        for s, handler in self.previous.items():
            signal.signal(s, handler)
        self.previous = {}


def all_finite(*modules) -> bool:
    return all(bool(torch.isfinite(parallel.local(p)).all()) for m in modules for p in m.parameters())


def truncate_log(path: Path, step: int):
    """Drop log lines written after the checkpoint a run resumes from (a killed run logged steps
    that the resumed run repeats), so the log reads as one uninterrupted run."""
    if path.is_file():
        def keep(line):
            try:
                return json.loads(line).get("step", 0) <= step
            except json.JSONDecodeError:  # a line cut short by the kill
                return False
        path.write_text("".join(l + "\n" for l in path.read_text().splitlines() if keep(l)))


# ----------------------------------------------------------------------------------------------
# training
# ----------------------------------------------------------------------------------------------


def micro_batches(batch_size: int, micro: int, world: int, rank: int) -> list[list[int]]:
    """Which samples of a global batch this rank computes, one list per accumulation step: sample i
    of the batch belongs to micro-batch i mod R (R = ranks · accumulation steps, strided so that
    every micro-batch draws from the whole batch), and rank r computes micro-batches r, r+W, …"""
    R = batch_size // micro
    return [list(range(j * world + rank, batch_size, R)) for j in range(R // world)]


class Batches:
    """Training micro-batches as latents at the full training size, from the built-in shapes data,
    an image folder (--data, encoded on the fly) or a cache (--cache, encoded once by data.py).

    next() -> x (n, C, H, W), txt (n, L, D), pooled (n, P), max_stage (n,) — the highest stage
    each image may train at (Algorithm 1: only images at least as large as the stage) — and the
    global sample positions (which seed each sample's noise). Each call returns this rank's next
    micro-batch (see micro_batches); one global batch per step, the same global batches whatever
    the number of ranks. `start_step` makes a resumed run continue the same data order; `stream`
    separates independent streams (BridgeFlow pre-training draws its own, unsplit)."""

    def __init__(self, cfg: TrainConfig, encoder, autoencoder, num_stages, device, start_step=0, stream=0,
                 slots=None):
        self.cfg, self.encoder, self.autoencoder, self.K, self.device = cfg, encoder, autoencoder, num_stages, device
        B = cfg.batch_size
        self.slots = slots or [list(range(B))]
        self.step, self.offset = start_step, stream * 10_000_000
        self.queue: list = []
        self.prompts = SAMPLE_PROMPTS
        self.loader = None
        if cfg.data or cfg.cache:
            if cfg.cache:
                key = data.cache_key(encoder, autoencoder, data.cache_dtype(cfg.cache), cfg.resolution, num_stages)
                dataset = data.CachedDataset(cfg.cache, key)
                self.uncond = tuple(u.unsqueeze(0).to(device) for u in dataset.uncond)
            else:
                dataset = data.FolderDataset(cfg.data, cfg.resolution, num_stages, flip=cfg.flip,
                                             progress=cfg.progress, seed=cfg.seed)
                self.prompts = [dataset.items[i].caption for i in range(min(8, len(dataset)))]
            order = iter(data.ResumableSampler(len(dataset), cfg.seed + stream, start_step * B, with_epoch=cfg.flip))

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
            images, samples = shapes.batch_at(self.cfg.seed, positions, self.cfg.resolution)
            captions = [s.caption for s in samples]
            max_stage = torch.full((len(positions),), self.K)
        else:
            batch = next(self.loader)
            max_stage = batch["max_stage"]
            if self.cfg.cache:
                x = batch["latent"].to(self.device)
                return x, batch["txt"].to(self.device), batch["pooled"].to(self.device), max_stage, positions
            images, captions = batch["image"], batch["caption"]
        x = self.autoencoder.encode(images.to(self.device))
        if not text:
            return x, None, None, max_stage, positions
        txt, pooled = self.encoder.encode(list(captions))
        return x, txt.to(self.device), pooled.to(self.device), max_stage, positions


def sample_randomness(cfg: TrainConfig, positions, shape, device):
    """Per sample, from a generator seeded by (seed, position): the caption-dropout coin, ε_K at
    full size and t' ~ logit-normal (SD3). A sample draws the same numbers on whichever rank and
    in whichever micro-batch it lands, so a run on N ranks repeats the one-process run."""
    drop, eps, t = [], [], []
    for p in positions:
        g = torch.Generator().manual_seed(data.mix_seed(cfg.seed, "noise", p))
        drop.append(bool(torch.rand((), generator=g) < cfg.caption_dropout))
        eps.append(torch.randn(shape, generator=g))
        t.append(nami.logit_normal(1, g))
    return torch.tensor(drop, device=device), torch.stack(eps).to(device), torch.cat(t).to(device)


def save_samples(path: Path, ema, bridge, encoder, autoencoder, prompts, cfg: TrainConfig, write: bool = True):
    """A grid of the EMA model's samples of fixed prompts and seeds. Every rank samples (FSDP2
    shards the EMA too, so its forward is collective); only the main rank writes."""
    ema.eval()
    f = autoencoder.factor
    x = nami.generate(ema, encoder, prompts, range(len(prompts)), cfg.resolution // f, cfg.resolution // f,
                      nami.default_steps(ema.cfg.num_stages), guidance=3.0, bridge=bridge)[-1]
    if not write:
        return
    size = max(64, cfg.resolution)
    images = [shapes.to_image(im).resize((size, size), 0) for im in autoencoder.decode(x)]  # 0 = nearest
    path.parent.mkdir(parents=True, exist_ok=True)
    shapes.grid(images, ncols=4).save(path)


def main(cfg: TrainConfig) -> dict:
    """Run BridgeFlow pre-training and Algorithm 1; returns {"losses": [...], "out": folder, ...}.
    Under torchrun every rank calls it; only the main rank logs, samples to disk and prints."""
    validate(cfg)
    dist_ = parallel.init_distributed()
    device, world = dist_.device, dist_.world
    micro = cfg.micro_batch or cfg.batch_size // world
    if cfg.batch_size % (micro * world):
        raise ValueError(f"--batch-size {cfg.batch_size} must be a multiple of --micro-batch {micro} × {world} ranks")
    accumulation = cfg.batch_size // (micro * world)
    strategy = cfg.parallel or parallel.default_strategy(cfg.size)
    sharded = strategy == "fsdp" and dist_.active
    torch.manual_seed(cfg.seed)
    autoencoder = load_autoencoder(cfg.vae, device)
    f = autoencoder.factor  # pixels per latent cell
    multiple = f * model_config(cfg, 1, 1, 3).size_multiple
    nami.check_resolution(cfg.resolution, cfg.resolution, multiple, "--resolution")
    encoder = TextEncoder(cfg.text_encoder, cfg.text_len, device, cfg.pooled_encoder, cfg.pooled_len)
    mcfg = model_config(cfg, encoder.dim, encoder.pooled_dim, autoencoder.channels)
    schedule = stage_mix_schedule(cfg, mcfg.num_stages)
    K = mcfg.num_stages
    weights = cfg.stage_weights or (1.0,) * K
    out = Path(cfg.out)
    if dist_.main:
        remove_interrupted_saves(out)
    if not cfg.resume and latest_checkpoint(out) is not None:
        raise ValueError(f"{out} already holds a run ({latest_checkpoint(out).name}): pass --resume to continue "
                         "it, or choose another --out (nothing is overwritten)")
    autocast = device.type == "cuda" if cfg.bf16 is None else cfg.bf16

    # Algorithm 1, line 2: K time windows (corrected starts, SPEC §2) and their τ ranges
    windows = nami.stage_windows(mcfg.window_ratios, mcfg.gamma)
    ranges = nami.tau_ranges(mcfg.window_ratios, mcfg.gamma)
    sizes = [cfg.resolution // f // 2 ** (K - k) for k in range(1, K + 1)]  # latent side per stage
    # Algorithm 1, line 3: θ_k = m_1 ⊕ … ⊕ m_k, one model whose stage k stops at cut point c_k
    model = nami.Nami(mcfg).to(device)
    ema = copy.deepcopy(model).requires_grad_(False)
    model.checkpointing = cfg.activation_checkpointing
    if cfg.compile:
        parallel.compile_blocks(model)
    if sharded:  # FSDP2: bf16 compute, fp32 master weights and gradient reduction
        parallel.shard_model(model, bf16=autocast)
        parallel.shard_model(ema, bf16=autocast)
    bridge = BridgeFlow(mcfg.in_channels, [(s, s) for s in sizes]).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    gen = torch.Generator().manual_seed(cfg.seed)  # BridgeFlow pre-training's noise
    step = 0

    ckpt = latest_checkpoint(out) if cfg.resume else None
    if cfg.resume and ckpt is None and dist_.main:
        print(f"--resume: no checkpoint in {out}/, starting from scratch")
    if ckpt is not None:
        step = load_for_resume(ckpt, mcfg, model, ema, bridge, opt, gen, sharded)
        if dist_.main:
            truncate_log(out / "log.jsonl", step)
            print(f"resumed from {ckpt} at step {step}")
    elif K > 1:
        # Paper §4.3: pre-train every BridgeFlow map with MSE (lr 1e-3), then freeze it. Every rank
        # trains the same map on the same data; rank 0's copy is then broadcast.
        bridge_data = Batches(cfg, encoder, autoencoder, K, device, stream=1)

        def bridge_batch(i):
            x = bridge_data.next(text=False)[0]
            return x, torch.randn(x.shape, generator=gen).to(device)
        bar = tqdm(total=cfg.bridge_steps, desc="BridgeFlow", disable=not (cfg.progress and dist_.main), leave=False)
        losses = pretrain(bridge, bridge_batch, windows, cfg.bridge_steps, cfg.bridge_lr,
                          progress=lambda i, l: (bar.update(1), bar.set_postfix(mse=f"{sum(l):.4f}")))
        bar.close()
        parallel.broadcast_module(bridge)
        if dist_.main:
            print(f"BridgeFlow pre-trained: W = {[round(w, 3) for w in bridge.scale.tolist()]}, MSE per jump = "
                  f"{[round(l, 4) for l in losses]}")
    else:
        bridge.requires_grad_(False)

    loss_module = nami.FlowLoss(model, bridge, windows, ranges, weights, cfg.mode == "flat", cfg.start,
                                autocast and not sharded, world, sharded)
    step_loss = parallel.wrap_ddp(loss_module, device) if dist_.active and not sharded else loss_module
    batches = Batches(cfg, encoder, autoencoder, K, device, start_step=step,
                      slots=micro_batches(cfg.batch_size, micro, world, dist_.rank))
    log = (out / "log.jsonl").open("a") if dist_.main else None
    bar = tqdm(total=cfg.max_steps, initial=step, desc=f"train {cfg.size}/{cfg.mode}",
               disable=not (cfg.progress and dist_.main))
    all_losses, t_last, seen = [], time.perf_counter(), 0
    skipped, bad_in_row, stop = 0, 0, StopRequest()
    last = cfg.max_steps if cfg.stop_after is None else min(cfg.stop_after, cfg.max_steps)
    try:
        while step < last:
            ratios = next(r for a, b, r in schedule if a <= step < b)
            lr = learning_rate(cfg, step, schedule)
            for group in opt.param_groups:
                group["lr"] = lr
            model.train()
            # Algorithm 1, line 5: sample a batch of full-size images x'_1 (as latents): this rank's
            # micro-batches of the global batch, each with its samples' noise, t' and caption dropout
            work, counted = [], torch.zeros(K)
            for _ in range(accumulation):
                x_full, txt, pooled, max_stage, positions = batches.next()
                drop, eps_full, t_all = sample_randomness(cfg, positions, x_full.shape[1:], device)
                # Paper §3.4: drop 10 % of the captions (the empty prompt is the unconditional input)
                txt = torch.where(drop[:, None, None], batches.uncond[0], txt)
                pooled = torch.where(drop[:, None], batches.uncond[1], pooled)
                counts = stage_counts(ratios, len(positions))
                stages = [k for k in range(1, K + 1) for _ in range(counts[k - 1])]
                if int(max_stage.min()) < K:
                    # Algorithm 1: a stage trains only on images at least its size
                    stages = data.assign_stages(max_stage.tolist(), counts)
                    counts = [stages.count(k) for k in range(1, K + 1)]
                order = sorted(range(len(positions)), key=lambda i: stages[i])  # the batch by stage
                work.append((x_full[order], txt[order], pooled[order], eps_full[order], t_all[order], counts))
                counted += torch.tensor(counts, dtype=torch.float)
            totals = parallel.all_sum(counted).tolist()  # samples per stage in the global batch
            opt.zero_grad(set_to_none=True)
            sums = torch.zeros(K, device=device)
            for j, (x_full, txt, pooled, eps_full, t_all, counts) in enumerate(work):
                parallel.set_gradient_sync(step_loss, model, j == len(work) - 1)
                loss, stage_sums = step_loss(x_full, txt, pooled, eps_full, t_all, counts, totals)
                loss.backward()
                sums += stage_sums
            sums = parallel.all_sum(sums).cpu()
            stage_loss = {k: sums[k - 1].item() / totals[k - 1] for k in range(1, K + 1) if totals[k - 1] > 0}
            total = sum(weights[k - 1] * l for k, l in stage_loss.items())
            bad = next((f"stage {k} loss" for k, l in stage_loss.items() if not math.isfinite(l)), None)
            if bad is None:
                grad_norm = parallel.full(torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip))
                if not torch.isfinite(grad_norm):
                    bad = f"gradient (stages {sorted(stage_loss)})"
            if bad is not None:
                # NaN guard: skip the update (weights, optimizer state and EMA stay as they were)
                skipped, bad_in_row = skipped + 1, bad_in_row + 1
                opt.zero_grad(set_to_none=True)
                if dist_.main:
                    tqdm.write(f"step {step + 1}: non-finite {bad}, update skipped ({bad_in_row} in a row)")
                if bad_in_row >= cfg.max_bad_steps:
                    good = latest_checkpoint(out)
                    raise TrainingStopped(
                        f"{bad_in_row} steps in a row with a non-finite loss or gradient, the last at step {step + 1} "
                        f"({bad}); last good checkpoint: {good or 'none'}. Lower --lr, check the data, then resume "
                        "with --resume")
            else:
                bad_in_row = 0
                opt.step()
                # EMA of the weights (used for sampling), with DiT-style warm-up of the decay; on
                # each rank's shards under FSDP2
                decay = min(cfg.ema_decay, (1 + step) / (10 + step))
                with torch.no_grad():
                    torch._foreach_lerp_([parallel.local(p) for p in ema.parameters()],
                                         [parallel.local(p) for p in model.parameters()], 1 - decay)
            step += 1
            seen += cfg.batch_size
            all_losses.append(total)
            bar.update(1)
            bar.set_postfix({f"L{k}": f"{l:.3f}" for k, l in stage_loss.items()})
            if dist_.main and (step % cfg.log_every == 0 or step == cfg.max_steps):
                now = time.perf_counter()
                record = {"step": step, "loss": total, **{f"loss_stage{k}": l for k, l in stage_loss.items()},
                          "lr": lr, "grad_norm": grad_norm.item() if bad is None else None, "ratios": list(ratios),
                          "skipped_steps": skipped, "images_per_s": seen / (now - t_last)}
                log.write(json.dumps(record) + "\n")
                log.flush()
                t_last, seen = now, 0
            if step % cfg.sample_every == 0 or step == cfg.max_steps:
                save_samples(out / "samples" / f"step-{step:07d}.png", ema, bridge, encoder, autoencoder,
                             batches.prompts, cfg, write=dist_.main)
            stopping = parallel.all_sum(torch.tensor(float(stop.signal is not None))).item() > 0  # all ranks agree
            if step % cfg.ckpt_every == 0 or step == last or stopping:
                if parallel.all_sum(torch.tensor(float(not all_finite(model, ema)))).item() > 0:
                    raise TrainingStopped(f"non-finite weights at step {step}: no checkpoint written; the last good "
                                          f"one is {latest_checkpoint(out) or 'none'}")
                save_checkpoint(out, step, model, ema, bridge, opt, gen, cfg, mcfg, encoder, autoencoder, dist_,
                                sharded)
            if stopping:
                break
    finally:  # also on an error: the handlers go back, the log is closed
        stop.restore()
        bar.close()
        if log is not None:
            log.close()
    if stop.signal and dist_.main:
        print(f"stopped by {stop.signal} at step {step}: checkpoint {latest_checkpoint(out)}; continue with --resume")
    return {"losses": all_losses, "out": out, "skipped_steps": skipped, "stopped_by": stop.signal}


def load_for_resume(ckpt: Path, mcfg, model, ema, bridge, opt, gen, sharded: bool) -> int:
    """Restore model, EMA, BridgeFlow, optimizer and RNG from a checkpoint; returns its step. A dcp/
    folder (FSDP2 runs) loads on any number of ranks, sharded or not; otherwise the full weights."""
    _, saved, parts = nami.load_checkpoint(ckpt)
    if saved["model"] != mcfg.to_dict():
        raise ValueError(f"{ckpt} was trained with model config {saved['model']}, not {mcfg.to_dict()}: "
                         "use the same --size/--mode/--cuts/--window-ratios, or another --out")
    nami.load_state(bridge, parts["bridge"], f"{ckpt} (bridge)")
    bridge.requires_grad_(False)
    try:  # weights_only: a file crafted to run code when unpickled is refused, not run
        state = torch.load(ckpt / "train_state.pt", weights_only=True)
    except pickle.UnpicklingError as e:
        raise ValueError(f"{ckpt / 'train_state.pt'} holds more than tensors and plain data, so it was "
                         f"refused (weights_only loading; nothing in it was run): {nami.unpickling_refusal(e)}")
    if (ckpt / "dcp").is_dir():
        parallel.load_sharded(ckpt / "dcp", model, ema, opt)
    elif sharded:
        parallel.load_full(model, parts["model"])
        parallel.load_full(ema, parts["ema"])
        print(f"{ckpt} holds unsharded weights: loaded into FSDP2; the optimizer state starts afresh")
    else:
        nami.load_state(model, parts["model"], f"{ckpt} (model)")
        nami.load_state(ema, parts["ema"], f"{ckpt} (ema)")
        opt.load_state_dict(state["optimizer"])
    gen.set_state(state["generator"])
    torch.set_rng_state(state["torch_rng"])
    return state["step"]


def parse_args(argv=None) -> TrainConfig:
    d = TrainConfig()
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", default=d.size, choices=sorted(nami.PRESETS), help="model preset")
    ap.add_argument("--mode", default=d.mode, choices=("nami", "flat", "flow-only"),
                    help="nami; flat = K=1 baseline with the full model; flow-only = stages with the full model")
    ap.add_argument("--cuts", help="stage cut points over the single blocks, e.g. 1,4,7 (paper Fig. 7)")
    ap.add_argument("--window-ratios", help="time-window ratios of the stages, e.g. 1:1:1 (paper Fig. 8)")
    ap.add_argument("--resolution", type=int, default=d.resolution, help="training image size (pixels)")
    ap.add_argument("--batch-size", type=int, default=d.batch_size)
    ap.add_argument("--lr", type=float, default=d.lr, help="peak learning rate (AdamW)")
    ap.add_argument("--max-steps", type=int, default=d.max_steps, help="training steps")
    ap.add_argument("--warmup", type=int, default=d.warmup, help="linear lr warm-up steps")
    ap.add_argument("--weight-decay", type=float, default=d.weight_decay)
    ap.add_argument("--grad-clip", type=float, default=d.grad_clip, help="max gradient norm")
    ap.add_argument("--ema-decay", type=float, default=d.ema_decay)
    ap.add_argument("--stage-mix", default=d.stage_mix,
                    help="stage sampling ratios per phase, low->high resolution (paper: 4:2:1,2:4:1,1:2:4)")
    ap.add_argument("--mix-fractions", default=d.mix_fractions, help="share of the steps per phase")
    ap.add_argument("--final-lr-scale", type=float, default=d.final_lr_scale, help="lr factor of the last phase")
    ap.add_argument("--stage-weights", help="loss weights w_k of Eq. 4, e.g. 1,1,1")
    ap.add_argument("--caption-dropout", type=float, default=d.caption_dropout)
    ap.add_argument("--start", default=d.start, choices=("bridge", "pyramid"),
                    help="start point of stage k>1: BridgeFlow (paper) or Pyramid Flow's analytic one")
    ap.add_argument("--bridge-steps", type=int, default=d.bridge_steps, help="BridgeFlow pre-training steps")
    ap.add_argument("--bridge-lr", type=float, default=d.bridge_lr)
    ap.add_argument("--data", help="image folder (captions in .txt files beside the images or metadata.jsonl); "
                    "default: the built-in shapes data")
    ap.add_argument("--cache", help="a cache made by `python data.py cache` (latents + text states) instead of --data")
    ap.add_argument("--flip", action="store_true", help="random horizontal flips of --data images")
    ap.add_argument("--workers", type=int, default=d.workers, help="DataLoader workers for --data/--cache")
    ap.add_argument("--text-encoder", help="local transformers encoder folder for the token states "
                    "(paper: mT5-XXL; default: all-MiniLM-L6-v2)")
    ap.add_argument("--pooled-encoder", help="local CLIP-style encoder folder for the pooled vector "
                    "(paper: multilingual CLIP; default: mean of the text states)")
    ap.add_argument("--text-len", type=int, default=d.text_len, help="text tokens per prompt (paper: 256)")
    ap.add_argument("--pooled-len", type=int, default=d.pooled_len, help="tokens of the pooled encoder (paper: 77)")
    ap.add_argument("--vae", help="local diffusers AutoencoderKL folder: train in its latent space (FLUX VAE: 16 ch, 8x)")
    ap.add_argument("--out", help="output folder (default runs/<data>-<size>[-<mode>], data = shapes or the folder's name)")
    ap.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in --out")
    ap.add_argument("--stop-after", type=int, help="stop with a checkpoint at this step (resume later)")
    ap.add_argument("--seed", type=int, default=d.seed)
    ap.add_argument("--sample-every", type=int, default=d.sample_every, help="steps between sample grids")
    ap.add_argument("--ckpt-every", type=int, default=d.ckpt_every, help="steps between checkpoints")
    ap.add_argument("--keep", type=int, default=d.keep, help="checkpoints to keep")
    ap.add_argument("--log-every", type=int, default=d.log_every, help="steps between log.jsonl lines")
    ap.add_argument("--max-bad-steps", type=int, default=d.max_bad_steps,
                    help="stop after this many steps in a row with a non-finite loss or gradient (each is skipped)")
    ap.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True, help="progress bars")
    ap.add_argument("--parallel", choices=("ddp", "fsdp"),
                    help="under torchrun: DDP or FSDP2 (default: fsdp for 0.6b and 2b, ddp for the small presets)")
    ap.add_argument("--micro-batch", type=int, help="samples per rank per forward; gradient accumulation makes up "
                    "the rest of --batch-size (default: batch-size / ranks)")
    ap.add_argument("--activation-checkpointing", action="store_true",
                    help="recompute each block's activations in backward (less memory, more time)")
    ap.add_argument("--compile", action="store_true", help="torch.compile each transformer block")
    ap.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=None,
                    help="bf16 autocast (default off on CPU: slower than fp32 on CPUs without AMX)")
    a = ap.parse_args(argv)
    names = {f.name for f in fields(TrainConfig)}
    kw = {k: v for k, v in vars(a).items() if k in names and v is not None}
    kw["cuts"] = parse_ints(a.cuts, "--cuts") if a.cuts else None
    kw["window_ratios"] = parse_ints(a.window_ratios, "--window-ratios") if a.window_ratios else None
    try:
        kw["stage_weights"] = tuple(float(w) for w in a.stage_weights.split(",")) if a.stage_weights else None
    except ValueError:
        raise SystemExit(f"error: --stage-weights must be numbers separated by commas, e.g. 1,1,1, got {a.stage_weights!r}")
    if a.out is None:
        name = Path(a.data or a.cache).resolve().name if (a.data or a.cache) else "shapes"
        kw["out"] = f"runs/{name}-{a.size}" + ("" if a.mode == "nami" else f"-{a.mode}")
    return TrainConfig(**kw)


if __name__ == "__main__":
    config = parse_args()
    try:
        main(config)
    except (ValueError, FileNotFoundError, ImportError, TrainingStopped) as e:
        raise SystemExit(f"error: {e}")
    finally:
        parallel.shutdown()
