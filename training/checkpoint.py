"""The run folder: everything train.py, sample.py, experiments/eval.py and experiments/bench.py read or write of a run.

    RUN/log.jsonl                  one line of metrics per --log-every steps, one per validation
    RUN/samples/step-NNNNNNN.png   sample grids of fixed prompts and seeds (EMA weights)
    RUN/ckpt-NNNNNNN/              weights.safetensors (model., ema., bridge. tensors), config.json,
                                   train_state.pt (step, RNG, optimizer), dcp/ (FSDP2 shards)
    RUN/.lock                      the OS lock of the run that holds the folder (its PID and host)

Only folders named as the trainer names them (ckpt- and the step in 7 digits or more) are resumed
from, pruned, or found by sample.py and experiments/eval.py; a user's copy such as ckpt-best is left alone.

Checkpoints are never partial on disk: each is written into a temporary folder, every file
flushed and fsynced, the folder renamed into place (atomic on POSIX) and the parent fsynced, so
a crash, a kill or a power cut leaves either the whole checkpoint or none. During training,
`RunFolder` also keeps the faults in check: non-finite steps are skipped (the NaN guard),
SIGINT/SIGTERM stop the run after the current step with a checkpoint, a full disk stops it
with the previous checkpoint intact. Only the main rank writes; every rank calls.
"""
from __future__ import annotations

import json
import math
import os
import pickle
import re
import shutil
import signal
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn as nn
from safetensors.torch import load_file, save_file
from tqdm import tqdm

import nami
from bridgeflow import BridgeFlow
from common import files, images, parallel
from common.encoders import TextEncoder, load_autoencoder
from training import diffusers_folder

PREFIX = "ckpt-"
FILES = ("weights.safetensors", "config.json", "train_state.pt")


class TrainingStopped(Exception):
    """Training cannot go on safely (non-finite steps, a checkpoint that cannot be written)."""


# ----------------------------------------------------------------------------------------------
# 1. Reading: find a checkpoint, its parts, load them strictly and without running code
# ----------------------------------------------------------------------------------------------


def checkpoint_name(step: int) -> str:
    return f"{PREFIX}{step:07d}"


def checkpoint_step(name: str) -> int | None:
    """The step of a folder name the trainer writes (ckpt- and the step, in 7 digits or more,
    exactly as checkpoint_name gives it), or None: a user's ckpt-best or ckpt-0000600-best is
    never resumed from, pruned or picked by the lookup."""
    match = re.fullmatch(rf"{PREFIX}(\d{{7,}})", name)
    return int(match[1]) if match and checkpoint_name(int(match[1])) == name else None


def find_checkpoint(path) -> Path:
    """The checkpoint to sample or evaluate. PATH may be a checkpoint folder (any name: the user chose
    it; a diffusers folder of training/export.py too), or a run folder: its highest step, as --resume takes
    it. A folder of runs (runs/ when path is None) holds steps that do not compare: the run that saved a
    checkpoint last (modification time), and in it the highest step."""
    root = Path(path) if path is not None else Path("runs")
    if (root / "weights.safetensors").is_file() or diffusers_folder.holds(root):  # or python -m training.export's
        return root
    found = latest_checkpoint(root)
    if found is None:
        runs = {p.parent.parent for p in root.glob(f"**/{PREFIX}*/weights.safetensors")
                if checkpoint_step(p.parent.name) is not None}
        saved = {run: max((c.stat().st_mtime for c in complete_checkpoints(run)), default=None) for run in runs}
        last = max((run for run in runs if saved[run] is not None), key=saved.get, default=None)
        found = last and latest_checkpoint(last)
    if found is None:
        raise FileNotFoundError(
            f"no checkpoint found under {root}/ (a checkpoint is a folder {PREFIX}NNNNNNN holding "
            f"{', '.join(FILES)}): train one with `python train.py`, or pass --ckpt PATH")
    return found


def load_checkpoint(path):
    """-> (folder, config dict, {"model": sd, "ema": sd, "bridge": sd}) from a checkpoint folder."""
    folder = find_checkpoint(path)
    if diffusers_folder.holds(folder):  # a folder of python -m training.export, read as the checkpoint it holds
        return folder, *diffusers_folder.read(folder)
    config = files.read_json(folder / "config.json")
    parts: dict[str, dict] = {}
    for key, value in load_file(folder / "weights.safetensors").items():
        if "." not in key:
            raise ValueError(f"{folder}/weights.safetensors holds a tensor {key!r} outside the model./ema./bridge. "
                             "parts: not a checkpoint of train.py")
        part, name = key.split(".", 1)
        parts.setdefault(part, {})[name] = value
    return folder, config, parts


def unpickling_refusal(e: Exception) -> str:
    """What torch's weights_only error says the file holds ("Unsupported global: GLOBAL exec was
    not an allowed global by default"), without the rest of it: terminal escape codes, and the
    advice to load the file with weights_only=False, which is what a crafted file wants."""
    reason = str(e).split("WeightsUnpickler error:")[-1]
    reason = re.sub(r"\x1b\[[0-9;]*m", "", reason).strip().split(". ")[0].split("\n")[0]
    return reason[:300]


def key_mismatches(own: dict, state_dict: dict) -> tuple[list, list, list]:
    """The names of state_dict's tensors that do not fit a module's {name: shape}: (missing,
    unexpected, of another shape)."""
    missing = [k for k in own if k not in state_dict]
    extra = [k for k in state_dict if k not in own]
    shape = [k for k in own if k in state_dict and tuple(own[k]) != tuple(state_dict[k].shape)]
    return missing, extra, shape


def load_state(module: nn.Module, state_dict: dict, what: str, assign: bool = False, own: dict | None = None):
    """load_state_dict(strict) with an error naming the first mismatch, not a deep stack trace.
    assign=True adopts the given tensors (for a model built on the meta device: no second copy).
    own: the part of the module's state that state_dict must match (a LoRA run's adapters)."""
    partial = own is not None
    own = {name: value.shape for name, value in (module.state_dict() if own is None else own).items()}
    missing, extra, shape = key_mismatches(own, state_dict)
    if missing or extra or shape:
        first = (f"missing key {missing[0]!r}" if missing else f"unexpected key {extra[0]!r}" if extra else
                 f"{shape[0]!r} has shape {tuple(state_dict[shape[0]].shape)}, the model wants {tuple(own[shape[0]])}")
        raise ValueError(f"{what} does not match the model ({len(missing)} missing, {len(extra)} unexpected, "
                         f"{len(shape)} of other shape keys): {first}")
    module.load_state_dict(state_dict, assign=assign, strict=not partial)


def build_filled(build, state_dict: dict, what: str) -> nn.Module:
    """build() on the meta device, then filled with state_dict's tensors: whatever sizes a config
    file claims take no memory before load_state has compared every name and shape with the
    weights (a hidden_size of 10⁶ is refused, not allocated), and the weights are adopted
    (assign), not copied."""
    with torch.device("meta"):
        module = build()
    load_state(module, state_dict, what, assign=True)
    return module


def read_train_state(ckpt: Path) -> dict:
    """train_state.pt with weights_only loading: a file crafted to run code is refused, not run."""
    try:
        return torch.load(ckpt / "train_state.pt", weights_only=True)
    except pickle.UnpicklingError as e:
        raise ValueError(f"{ckpt / 'train_state.pt'} holds more than tensors and plain data, so it was "
                         f"refused (weights_only loading; nothing in it was run): {unpickling_refusal(e)}")


def plan(ckpt) -> dict:
    """What sampling needs to know before any weights are read, from the config file alone: the
    checkpoint folder (resolved once, so that a checkpoint written meanwhile is not picked up
    halfway), the number of stages K, the multiple each image side must be, and the defaults of
    the resolution, the steps and the guidance."""
    folder = find_checkpoint(ckpt)
    exported = diffusers_folder.record(folder) if diffusers_folder.holds(folder) else None  # its errors name its files
    try:
        config = exported or files.read_json(folder / "config.json")
        model_config = nami.NamiConfig.from_dict(config["model"])
        factor = (config.get("vae") or {}).get("factor") or 1  # no VAE: pixel space
        resolution = picture_size(config)
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{folder}/config.json is missing or damaged ({type(e).__name__}: {e}): "
                         "use another checkpoint (--ckpt) or train one with `python train.py`")
    not_adapters(config, folder, f"sample it with --lora {folder} (on the base it records), or merge it into a "
                 "model with --merge-lora OUT")
    K, vocabulary = model_config.num_stages, config.get("vocabulary")
    if not (isinstance(vocabulary, list) and all(isinstance(word, str) for word in vocabulary)):
        vocabulary = None  # not recorded (an older checkpoint), or damaged: no note, nothing refused
    return {"folder": folder, "K": K, "multiple": factor * model_config.size_multiple,
            "resolution": resolution, "steps": nami.default_steps(K), "cfg": nami.DEFAULT_GUIDANCE,
            "schedule": config.get("schedule", "uniform"), "vocabulary": vocabulary, "prompts": config.get("prompts")}


def not_adapters(config: dict, folder, how: str):
    """A LoRA run's checkpoint holds adapters, not a model: say how to use it instead."""
    if config.get("lora"):
        raise ValueError(f"{folder} is a LoRA run's checkpoint (adapters alone, no model): {how}")


def picture_size(config: dict) -> tuple[int, int]:
    """(width, height) of a run's pictures: config.json's "size" (a run of the built-in world with
    --aspect), else its square resolution (runs before sizes were recorded, and runs of folders,
    whose buckets vary)."""
    size = config.get("size")
    if isinstance(size, list) and len(size) == 2 and all(isinstance(v, int) and 0 < v <= 1 << 16 for v in size):
        return size[0], size[1]
    return config["resolution"], config["resolution"]


def load_model(ckpt, use_ema=True, text_encoder=None, pooled_encoder=None, vae=None, size=None, device="cpu"):
    """(model, bridge, encoder, autoencoder, info) from one of our checkpoint folders (or the
    newest below a folder). The encoders and VAE are the ones the checkpoint records, or local
    copies given by the flags; a copy with another architecture or width is refused."""
    folder, config, parts = load_checkpoint(ckpt)
    not_adapters(config, folder, f"use --lora {folder} (on the base it records)")
    for part in ("ema" if use_ema else "model", "bridge"):
        if part not in parts:  # else a KeyError from deep in here
            raise ValueError(f"{folder}/weights.safetensors holds no {part}.* tensors (only {sorted(parts)}): "
                             "the checkpoint is incomplete; use another one (--ckpt)")
    model_config = nami.NamiConfig.from_dict(config["model"])
    preset = config["train"]["size"]
    if size is not None and size != preset:
        raise ValueError(f"--size {size} asked for, but {folder} holds a {preset!r} checkpoint ({model_config.hidden_size} "
                         f"wide, {model_config.depth_double}+{model_config.depth_single} blocks)")
    encoder = load_recorded_encoder(config["text_encoder"], folder, text_encoder, pooled_encoder, device)
    vae_saved = config.get("vae", {"vae": None})
    autoencoder = load_autoencoder(vae or vae_saved["vae"], device)
    if autoencoder.channels != model_config.in_channels or autoencoder.identity().get("config") != vae_saved.get("config"):
        raise ValueError(f"{folder} was trained on latents of {vae_saved.get('vae') or 'pixel space'} "
                         f"({model_config.in_channels} channels); {vae or vae_saved['vae']} is another autoencoder")
    model = build_filled(lambda: nami.Nami(model_config), parts["ema" if use_ema else "model"], f"{folder} ({preset})")
    K, side = model_config.num_stages, config["resolution"] // autoencoder.factor
    bridge = build_filled(lambda: BridgeFlow(model_config.in_channels, [(s, s) for s in nami.stage_sizes(side, K)]),
                          parts["bridge"], f"{folder} (BridgeFlow)")
    info = {"folder": str(folder), "resolution": picture_size(config), "steps": nami.default_steps(K),
            "cfg": nami.DEFAULT_GUIDANCE,  # and the world level it learnt (runs from before levels: the full world)
            "world_level": config["train"].get("world_level", 3)}
    # frozen: sampling needs no gradients (and a LoRA on it, training/lora.py, leaves the base as frozen as this)
    return model.to(device).eval().requires_grad_(False), bridge.to(device).eval(), encoder, autoencoder, info


def load_recorded_encoder(saved: dict, folder, text_encoder=None, pooled_encoder=None, device="cpu", dtype=torch.float32):
    """The text encoder a checkpoint records (or local copies of it), refused if its architecture
    (config) or widths differ: the transformer's text projections only fit the states they were
    trained on."""
    for flag, given, key in (("--text-encoder", text_encoder, "path"), ("--pooled-encoder", pooled_encoder, "pooled_path")):
        path = given or saved.get(key)
        if path and not Path(path).is_dir():
            raise FileNotFoundError(f"{folder} was trained with the encoder at {saved.get(key)}, which is not "
                                    f"here: pass {flag} PATH to a local copy of it")
    encoder = TextEncoder(text_encoder or saved["path"], saved["max_len"], device,
                          pooled_encoder or saved.get("pooled_path"), saved.get("pooled_len", 77),
                          dtype=dtype, pad=saved.get("pad", "zeros"))
    loaded = encoder.identity()
    for key, what in (("config", "text encoder"), ("dim", "text width"), ("pooled_config", "pooled encoder"),
                      ("pooled_dim", "pooled width"), ("pooled_rule", "pooling rule")):
        if key in saved and loaded.get(key) != saved[key]:
            raise ValueError(f"{folder} was trained with {what} {saved[key]!r} ({saved.get('path')}, pooled: "
                             f"{saved.get('pooled_path') or 'mean of the states'}), the encoder given gives "
                             f"{loaded.get(key)!r}: pass the same encoders (--text-encoder/--pooled-encoder)")
    return encoder


# ----------------------------------------------------------------------------------------------
# 2. Writing: atomic checkpoints, pruning without half-deleted folders
# ----------------------------------------------------------------------------------------------


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


def complete_checkpoints(out: Path) -> list[Path]:
    """The checkpoint folders the trainer wrote in a run folder (checkpoint_step names) holding all
    their files, by step, oldest first (steps of 8 digits and more after 7). Temporary folders of
    an interrupted save are named .tmp-* and never match."""
    out = Path(out)
    found = [(step, p) for p in (out.iterdir() if out.is_dir() else ()) if (step := checkpoint_step(p.name)) is not None
             and p.is_dir() and all((p / n).is_file() for n in FILES)]
    return [p for _, p in sorted(found)]


def latest_checkpoint(out: Path):
    found = complete_checkpoints(out)
    return found[-1] if found else None


def remove_interrupted_saves(out: Path):
    """The .tmp-ckpt-N/ and .old-ckpt-N/ folders a killed save or prune left (only those names)."""
    for path in list(out.iterdir()):
        if any(path.name.startswith(mark) and checkpoint_step(path.name[len(mark):]) is not None
               for mark in (".tmp-", ".old-")):
            shutil.rmtree(path, ignore_errors=True)


def discard(ckpt: Path):
    """Delete an old checkpoint without ever leaving it half deleted under its own name: rename it
    first (atomic), then delete (a kill during the delete leaves a .old-* folder, removed later)."""
    old = ckpt.parent / f".old-{ckpt.name}"
    shutil.rmtree(old, ignore_errors=True)
    os.replace(ckpt, old)
    shutil.rmtree(old, ignore_errors=True)


@dataclass
class TrainState:
    """What a checkpoint holds of a training run besides its settings."""
    model: nn.Module
    ema: nn.Module
    bridge: BridgeFlow
    optimizer: torch.optim.Optimizer
    generator: torch.Generator   # BridgeFlow pre-training's noise
    sharded: bool                # FSDP2: model, EMA and optimizer also as dcp/ shards
    # a LoRA run (training/lora.py): the part of model and EMA a checkpoint holds (lora.adapters), and the file
    # of the EMA adapters it writes beside them (lora.write_adapters)
    keep: Callable[[nn.Module], dict] | None = None
    export: Callable[[Path, dict], None] | None = None

    def trained(self, module: nn.Module) -> dict:
        """The tensors of the model or EMA that a checkpoint holds: all, or a LoRA run's adapters."""
        return self.keep(module) if self.keep else module.state_dict()


def write_files(tmp: Path, final: Path, step: int, model_sd, ema_sd, state: TrainState, record: dict,
                data_position: int):
    """weights.safetensors, config.json and train_state.pt into tmp, fsynced, then renamed to final."""
    tensors = {f"model.{k}": v for k, v in model_sd.items()}
    tensors.update({f"ema.{k}": v for k, v in ema_sd.items()})
    tensors.update({f"bridge.{k}": v for k, v in state.bridge.state_dict().items()})
    save_file({k: v.detach().contiguous() for k, v in tensors.items()}, tmp / "weights.safetensors")
    if state.export is not None:  # a LoRA run: the EMA adapters again, in the layout sampling reads
        state.export(tmp, ema_sd)
    (tmp / "config.json").write_text(json.dumps({**record, "step": step}, indent=2))
    train_state = {"step": step, "generator": state.generator.get_state(), "torch_rng": torch.get_rng_state(),
                   "data_position": data_position}
    if not state.sharded:
        train_state["optimizer"] = state.optimizer.state_dict()
    torch.save(train_state, tmp / "train_state.pt")
    fsync_tree(tmp)
    if final.exists():  # the same step saved again (e.g. a resumed run stopped at once)
        discard(final)
    os.replace(tmp, final)
    fsync_path(final.parent)


# ----------------------------------------------------------------------------------------------
# 3. The run folder of a training run
# ----------------------------------------------------------------------------------------------


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


class RunFolder:
    """One training run's folder, opened by every rank (only the main one writes): checkpoints,
    resume, the log, sample grids, the NaN guard and the stop signals. `cfg` is train.py's
    TrainConfig (out, resume, keep, the *_every intervals, max_bad_steps, progress, batch_size)."""

    def __init__(self, cfg, main: bool, first_step: int = 0):
        self.cfg, self.out, self.main = cfg, Path(cfg.out), main
        self.locks = self.lock(cfg, main)
        try:
            if main:
                remove_interrupted_saves(self.out)
            if not cfg.resume and latest_checkpoint(self.out) is not None:
                raise ValueError(f"{self.out} already holds a run ({latest_checkpoint(self.out).name}): pass --resume "
                                 "to continue it, or choose another --out (nothing is overwritten)")
        except BaseException:
            self.unlock()
            raise
        self.record: dict = {}          # what config.json says besides the step (describe())
        self.skipped, self.bad_in_row, self.all_losses = 0, 0, []
        self.stop = None                # StopRequest, from resume() on
        self.log_file, self.bar, self.board = None, None, None
        self.log_time, self.images_since_log = time.perf_counter(), 0

    @staticmethod
    def lock(cfg, main: bool) -> list:
        """The main rank's locks for the life of the run: the run folder, exclusive (a second run on
        it would delete this one's temporary checkpoint, prune its checkpoints and rewrite its
        log), and the --cache it reads, shared (`python -m datafeed cache` would rewrite it). Every
        rank learns of a refusal and raises it."""
        locks, error = [], None
        if main:
            try:
                locks.append(files.lock_folder(cfg.out, purpose=f"train.py --out {cfg.out}"))
                if cfg.cache:
                    locks.append(files.lock_folder(cfg.cache, shared=True, purpose=f"train.py reading it for {cfg.out}"))
            except (files.FolderBusy, OSError) as e:  # busy, or no lock file can be made there
                error = str(e)
        error = parallel.broadcast_object(error)
        if error is not None:
            for held in locks:
                held.release()
            raise ValueError(error)
        return locks

    def unlock(self):
        for held in self.locks:
            held.release()

    def describe(self, model_config, encoder, autoencoder, size, vocabulary=None):
        """What config.json records, so that sample.py rebuilds the model with the same parts (and
        can tell a prompt that uses none of the training captions' words, feed.vocabulary). `size` is
        the run's picture (width, height) in pixels, as datafeed.buckets.size_for gives it."""
        cfg = self.cfg
        self.record = {"model": model_config.to_dict(), "train": asdict(cfg), "text_encoder": encoder.identity(),
                       "vae": autoencoder.identity(), "resolution": cfg.resolution,
                       "size": list(size),
                       "channels": model_config.in_channels, "mode": cfg.mode, "vocabulary": vocabulary}

    def resume(self, state: TrainState) -> int:
        """Restore model, EMA, BridgeFlow, optimizer and RNG from the newest checkpoint and return its
        step; 0 for a new run. A dcp/ folder (FSDP2 runs) loads on any number of ranks."""
        ckpt = latest_checkpoint(self.out) if self.cfg.resume else None
        if ckpt is None:
            if self.cfg.resume and self.main:
                print(f"--resume: no checkpoint in {self.out}/, starting from scratch")
            step = 0
        else:
            step = load_for_resume(ckpt, self.record["model"], state)
            self.keep_source(ckpt)
            if self.main:
                truncate_log(self.out / "log.jsonl", step)
                print(f"resumed from {ckpt} at step {step}")
        if self.main:
            self.log_file = (self.out / "log.jsonl").open("a")
            if self.cfg.tensorboard:  # a view of the same numbers; log.jsonl stays the record
                from torch.utils.tensorboard import SummaryWriter
                self.board = SummaryWriter(str(self.out / "tensorboard"), purge_step=step + 1 if step else None)
        self.stop = StopRequest()
        self.bar = tqdm(total=self.cfg.max_steps, initial=step, desc=f"train {self.cfg.size}/{self.cfg.mode}",
                        disable=not (self.cfg.progress and self.main))
        return step

    def keep_source(self, ckpt: Path):
        """A run started with --init-from resumes with --resume alone: its checkpoints keep saying
        where its first weights came from, and its warm-up stays the fine-tuning one
        (config.warmup_plan reads cfg.init_from)."""
        source = files.read_json(ckpt / "config.json").get("init_from")
        if isinstance(source, dict) and isinstance(source.get("path"), str):
            self.record["init_from"] = source
            self.cfg.init_from = self.record["train"]["init_from"] = source["path"]

    def step_is_finite(self, step: int, stage_loss: dict, grad_norm: torch.Tensor) -> bool:
        """The NaN guard: False (skip the update: weights, optimizer state and EMA stay as they were)
        when a stage loss or the gradient norm is not finite; after --max-bad-steps such steps in
        a row, stop, naming the step, the stage and the last good checkpoint."""
        bad = next((f"stage {k} loss" for k, l in stage_loss.items() if not math.isfinite(l)), None)
        if bad is None and not torch.isfinite(grad_norm):
            bad = f"gradient (stages {sorted(stage_loss)})"
        if bad is None:
            self.bad_in_row = 0
            return True
        self.skipped, self.bad_in_row = self.skipped + 1, self.bad_in_row + 1
        if self.main:
            tqdm.write(f"step {step + 1}: non-finite {bad}, update skipped ({self.bad_in_row} in a row)")
        if self.bad_in_row >= self.cfg.max_bad_steps:
            raise TrainingStopped(
                f"{self.bad_in_row} steps in a row with a non-finite loss or gradient, the last at step {step + 1} "
                f"({bad}); last good checkpoint: {latest_checkpoint(self.out) or 'none'}. Lower --lr, check the "
                "data, then resume with --resume")
        return False

    def log(self, step: int, stage_loss: dict, total: float, **extra):
        """The progress bar every step, a log.jsonl line every --log-every steps (and the last)."""
        self.all_losses.append(total)
        self.images_since_log += self.cfg.batch_size
        self.bar.update(1)
        self.bar.set_postfix({f"L{k}": f"{l:.3f}" for k, l in stage_loss.items()})
        if self.main and (step % self.cfg.log_every == 0 or step == self.cfg.max_steps):
            now = time.perf_counter()
            record = {"step": step, "loss": total, **{f"loss_stage{k}": l for k, l in stage_loss.items()}, **extra,
                      "skipped_steps": self.skipped, "images_per_s": self.images_since_log / (now - self.log_time)}
            self.log_file.write(json.dumps(record) + "\n")
            self.log_file.flush()
            self.log_time, self.images_since_log = now, 0
            if self.board is not None:
                ratios = record.pop("ratios", None) or []
                for name, value in record.items():
                    if isinstance(value, (int, float)) and name != "step":
                        self.board.add_scalar(f"train/{name}", value, step)
                for k, ratio in enumerate(ratios, 1):  # the stage mix as shares of the batch
                    self.board.add_scalar(f"stage_mix/stage{k}", ratio / sum(ratios), step)

    def log_validation(self, step: int, fields: dict):
        """A log.jsonl line of the validation loss (training/validation.py), and its TensorBoard scalars."""
        if self.main:
            self.log_file.write(json.dumps({"step": step, **fields}) + "\n")
            self.log_file.flush()
            for name, value in fields.items() if self.board is not None else ():
                self.board.add_scalar(f"val/{name}", value, step)

    def sample_grid(self, step: int, ema, bridge, encoder, autoencoder, prompts):
        """Every --sample-every steps (and the last), a grid of the EMA model's samples of fixed
        prompts and seeds. Every rank samples (FSDP2 shards the EMA too, so its forward is
        collective); only the main rank writes."""
        if step % self.cfg.sample_every and step != self.cfg.max_steps:
            return
        ema.eval()
        (w, h), f = self.record["size"], autoencoder.factor
        x = nami.generate(ema, encoder, prompts, range(len(prompts)), h // f, w // f,
                          nami.default_steps(ema.cfg.num_stages), bridge=bridge)[-1]
        if self.main:
            zoom = max(1, -(-64 // min(w, h)))  # nearest-neighbour zoom to at least 64 px
            pictures = [images.to_image(im).resize((w * zoom, h * zoom), 0) for im in autoencoder.decode(x)]
            path = self.out / "samples" / f"step-{step:07d}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            picture = images.grid(pictures, ncols=4)
            picture.save(path)
            if self.board is not None:
                self.board.add_image("samples", images.to_tensor(picture).add(1).div(2), step)

    def checkpoint(self, step: int, last_step: int, state: TrainState) -> bool:
        """Save every --ckpt-every steps, at the last step and when a stop signal came (all ranks
        agree on it); True when the run must stop now."""
        stopping = parallel.any_rank(self.stop.signal is not None)
        if step % self.cfg.ckpt_every == 0 or step == last_step or stopping:
            if parallel.any_rank(not all_finite(state.model, state.ema)):
                raise TrainingStopped(f"non-finite weights at step {step}: no checkpoint written; the last good "
                                      f"one is {latest_checkpoint(self.out) or 'none'}")
            self.save(step, state)
        return stopping

    def save(self, step: int, state: TrainState) -> Path:
        """Write ckpt-<step>/ atomically (collective under FSDP2: every rank writes its dcp/ shards
        and gathers the full weights; the main rank writes the files) and prune old ones."""
        final = self.out / checkpoint_name(step)
        tmp = self.out / f".tmp-{final.name}"
        if self.main:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        parallel.barrier()
        if state.sharded:
            parallel.save_sharded(tmp / "dcp", state.model, state.ema, state.optimizer)
        model_sd = parallel.full_state_dict(state.model) if state.sharded else state.trained(state.model)
        ema_sd = parallel.full_state_dict(state.ema) if state.sharded else state.trained(state.ema)
        error = None
        if self.main:
            try:
                write_files(tmp, final, step, model_sd, ema_sd, state, self.record, step * self.cfg.batch_size)
            except OSError as e:
                error = f"{e}"
        error = parallel.broadcast_object(error)
        if error is not None:
            if self.main:
                remove_interrupted_saves(self.out)
            raise TrainingStopped(f"could not write the checkpoint of step {step} to {self.out} ({error}); the "
                                  f"previous checkpoint {latest_checkpoint(self.out) or '(none)'} is intact. Free "
                                  "space or fix the folder, then run again with --resume")
        if self.main:
            for stale in complete_checkpoints(self.out)[:-self.cfg.keep]:
                discard(stale)
        parallel.barrier()
        return final

    def __enter__(self):
        return self

    def __exit__(self, *error):
        """Whatever happened (an error too): the signal handlers go back, the log is closed, the
        locks are released."""
        if self.stop is not None:
            self.stop.restore()
        if self.bar is not None:
            self.bar.close()
        if self.log_file is not None:
            self.log_file.close()
        if self.board is not None:
            self.board.close()
        self.unlock()

    def result(self, step: int) -> dict:
        """What train.main returns: the losses of this process's steps, the folder, the skipped
        steps and the signal that stopped the run, if one did (said on the main rank)."""
        signal_name = self.stop.signal if self.stop is not None else None
        if signal_name and self.main:
            print(f"stopped by {signal_name} at step {step}: checkpoint {latest_checkpoint(self.out)}; "
                  "continue with --resume")
        return {"losses": self.all_losses, "out": self.out, "skipped_steps": self.skipped, "stopped_by": signal_name}


def load_for_resume(ckpt: Path, model_dict: dict, state: TrainState) -> int:
    """Restore model, EMA, BridgeFlow, optimizer and RNG from a checkpoint; returns its step. A dcp/
    folder (FSDP2 runs) loads on any number of ranks, sharded or not; otherwise the full weights."""
    _, saved, parts = load_checkpoint(ckpt)
    if saved["model"] != model_dict:
        raise ValueError(f"{ckpt} was trained with model config {saved['model']}, not {model_dict}: "
                         "use the same --size/--mode/--cuts/--window-ratios, or another --out")
    load_state(state.bridge, parts["bridge"], f"{ckpt} (bridge)")
    state.bridge.requires_grad_(False)
    train_state = read_train_state(ckpt)
    if (ckpt / "dcp").is_dir():
        parallel.load_sharded(ckpt / "dcp", state.model, state.ema, state.optimizer)
    elif state.sharded:
        parallel.load_full(state.model, parts["model"])
        parallel.load_full(state.ema, parts["ema"])
        print(f"{ckpt} holds unsharded weights: loaded into FSDP2; the optimizer state starts afresh")
    else:
        load_state(state.model, parts["model"], f"{ckpt} (model)", own=state.trained(state.model))
        load_state(state.ema, parts["ema"], f"{ckpt} (ema)", own=state.trained(state.ema))
        state.optimizer.load_state_dict(train_state["optimizer"])
    state.generator.set_state(train_state["generator"])
    torch.set_rng_state(train_state["torch_rng"])
    return train_state["step"]


# ----------------------------------------------------------------------------------------------
# A run's curves, for readers without TensorBoard: python -m training.checkpoint plot RUN
# ----------------------------------------------------------------------------------------------

def read_log(run: Path, validation: bool = False) -> list[dict]:
    """The training lines of RUN/log.jsonl (validation=True: its validation-loss lines instead); a torn
    last line (a killed run's) is left out."""
    path = Path(run) / "log.jsonl"
    if not path.is_file():
        raise ValueError(f"{run} holds no log.jsonl: give the --out folder of a training run")
    records = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if ("val_loss" in record) == validation:
            records.append(record)
    if not records and not validation:
        raise ValueError(f"{path} has no complete line yet: plot again after the first --log-every steps")
    return records


def plot_log(run: Path, out: Path | None = None) -> Path:
    """The loss of every stage, the weighted loss and the validation loss (log scale), and images per second,
    against the step, from RUN/log.jsonl; written to RUN/log.png unless `out` names another file."""
    plt = images.pyplot()
    records, validated = read_log(run), read_log(run, validation=True)
    fig, (losses, speed) = plt.subplots(1, 2, figsize=(10, 3.6))
    stage_keys = sorted({k for r in records for k in r if re.fullmatch(r"loss_stage\d+", k)},
                        key=lambda k: int(k[len("loss_stage"):]))
    for key in ["loss", *stage_keys]:
        points = [(r["step"], r[key]) for r in records if r.get(key) is not None]
        losses.plot(*zip(*points), label="weighted (Eq. 4)" if key == "loss" else f"stage {key[10:]}")
    for key in sorted({k for r in validated for k in r if re.fullmatch(r"val_loss_stage\d+", k)}):
        points = [(r["step"], r[key]) for r in validated]
        losses.plot(*zip(*points), "--", marker=".", label=f"validation, stage {key[14:]}")
    losses.set(xlabel="step", ylabel="loss", yscale="log", title="loss per stage")
    losses.legend(fontsize=8)
    speed.plot(*zip(*[(r["step"], r["images_per_s"]) for r in records]), color="C4")
    speed.set(xlabel="step", ylabel="images / s", title="throughput", ylim=(0, None))
    return images.save_figure(fig, Path(out) if out else Path(run) / "log.png", str(run), dpi=110, fontsize=9)


if __name__ == "__main__":
    import argparse
    parser = argparse.ArgumentParser(description="Draw a run's log: python -m training.checkpoint plot RUN [--out FILE.png]")
    parser.add_argument("command", choices=("plot",))
    parser.add_argument("run", help="the --out folder of a training run")
    parser.add_argument("--out", help="the PNG to write (default RUN/log.png)")
    a = parser.parse_args()
    try:
        print(f"wrote {plot_log(Path(a.run), a.out)}")
    except (ValueError, ImportError) as e:
        raise SystemExit(f"error: {e}")
