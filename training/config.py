"""The settings of a training run: `TrainConfig`, one field per command-line flag (name, default,
help and allowed range in one place), the parser that builds train.py's flags from it, their
validation, and the schedules they imply (paper §4.3: the stage mix per phase, the learning rate).

    from training.config import TrainConfig, parse_args, validate
    cfg = parse_args(["--size", "tiny", "--max-steps", "100"])    # or TrainConfig(size="tiny", ...)

Also the check of image sizes that sampling shares (check_resolution); sample.py's own flags are
in training/sample_config.py.
"""
from __future__ import annotations

import argparse
import importlib.util
from dataclasses import dataclass, field, fields
from pathlib import Path

import nami
from common import encoders, files
from toyworld import shapes


def flag(default, help: str, **argparse_kw):
    """A TrainConfig field with its flag's help and argparse options (type, choices, action, and
    `bounds=(low, high)` or `bounds=("(", low, high, "]")` for the range validate() checks)."""
    return field(default=default, metadata={"help": help, **argparse_kw})


def numbers(name: str, kind=int, example: str = "1,2,3"):
    """An argparse type: numbers separated by commas or colons ("1,4,7", "1:1:2") -> a tuple."""
    def parse(text):
        try:
            return tuple(kind(v) for v in str(text).replace(":", ",").split(",") if v.strip())
        except ValueError:
            what = "integers" if kind is int else "numbers"
            raise argparse.ArgumentTypeError(f"{name} must be {what} separated by commas or colons, e.g. {example}, "
                                             f"got {text!r}")
    return parse


PRESETS, MODES, STARTS = sorted(nami.PRESETS), ("nami", "flat", "flow-only"), ("bridge", "pyramid")
PAPER_STAGE_MIX = "4:2:1,2:4:1,1:2:4"  # paper §4.3: 120k, 80k and 50k steps (--mix-fractions)
BRIDGE_FITS = ("adam", "least-squares")
BRIDGE_STEPS = {"adam": 1000, "least-squares": 100}  # --bridge-steps' default per --bridge-fit
SHAPES_VAE = str(Path(__file__).resolve().parents[1] / "weights" / "shapes-vae")  # made by python -m toyworld.tinyvae


@dataclass
class TrainConfig:
    # the model
    size: str = flag("toy", "model preset", choices=PRESETS)
    mode: str = flag("nami", "nami; flat = the K = 1 baseline with the full model; flow-only = the stages with "
                     "the full model (paper Fig. 6)", choices=MODES)
    cuts: tuple | None = flag(None, "stage cut points over the single blocks, e.g. 1,4,7 (paper Fig. 7)",
                              type=numbers("--cuts"))
    window_ratios: tuple | None = flag(None, "ratios of the stages' time windows before Pyramid Flow's correction of "
                                       "their starts, e.g. 1:1:1 (boundaries 1, 2/3, 1/3, 0; windows 1→0.667, 0.8→0.333, "
                                       "0.5→0: docs/method.md §2) or 0.5:0.25:0.25 (paper Fig. 8); four values: K = 4 "
                                       "stages, the cut points by stage_cuts unless --cuts", type=numbers("--window-ratios",
                                       float, "1:1:1"))
    velocity: str = flag("local", "what the network predicts: local, the stage's velocity x̂_s − x̂_e (the release); "
                         "global, the path's ε − x, scaled by the window's length s_k − e_k (a flat model's: "
                         "convert one with --init-from FLAT --velocity global; docs/method.md §10)",
                         choices=nami.VELOCITIES)
    distilled_guidance: float = flag(3.5, "a guidance-distilled model's guidance input while training and validating "
                                     "(FLUX.1-dev, --size flux1-dev; diffusers' FLUX training examples: 3.5); sampling "
                                     "gives it --cfg", type=float, bounds=(0, 100))
    # Algorithm 1 and its schedule (paper §3.4, §4.3)
    resolution: int = flag(64, "training image size (pixels; 64 = 4×16×16 latents of the tiny shapes VAE)", type=int,
                           bounds=(1, 16384))
    batch_size: int = flag(32, "global batch (samples per step over all ranks)", type=int, bounds=(1, 1 << 16))
    lr: float | None = flag(None, "peak learning rate (AdamW; default: the recipe's, 1e-4 for the paper's sizes as "
                            "paper §4.3, 1e-3 for the small presets: RECIPES)", type=float, bounds=("(", 0, 1, ")"))
    max_steps: int | None = flag(None, "training steps (default: the recipe's, 250000 for the paper's sizes as §4.3's "
                                 "120k + 80k + 50k, 1200 for the small presets; 0 with --init-from: BridgeFlow "
                                 "pre-trained, the given weights saved as they are, a conversion without training)",
                                 type=int, bounds=(0, 10 ** 9))
    warmup: int | None = flag(None, "linear lr warm-up steps (default 100; 20 with --init-from)", type=int,
                              bounds=(0, 10 ** 9))
    warmup_start: float | None = flag(None, "the warm-up rises linearly from this fraction of --lr (default 0; 0.1 "
                                      "with --init-from)", type=float, bounds=(0, 1))
    weight_decay: float = flag(0.0, "AdamW weight decay", type=float, bounds=("[", 0, 10, ")"))
    grad_clip: float = flag(1.0, "max gradient norm", type=float, bounds=("(", 0, 1e6, "]"))
    ema_decay: float | None = flag(None, "EMA decay of the weights used for sampling (default: the recipe's, 0.9999 "
                                   "for the paper's sizes as DiT, 0.995 for the small presets; the paper names none)",
                                   type=float, bounds=("[", 0, 1, ")"))
    stage_mix: str = flag(PAPER_STAGE_MIX, "stage sampling ratios per phase, low -> high resolution "
                          "(paper: 4:2:1,2:4:1,1:2:4; K ≠ 3 stages: stage_mix_for, e.g. 8:4:2:1,1:1:1:1,1:2:4:8)")
    mix_fractions: str = flag("0.48,0.32,0.2", "share of the steps per phase (paper: 120k, 80k, 50k steps)")
    final_lr_scale: float = flag(0.5, "lr factor of the last phase (paper: 1e-4 -> 5e-5)", type=float,
                                 bounds=("(", 0, 1, "]"))
    stage_weights: tuple | None = flag(None, "loss weights w_k of Eq. 4, e.g. 1,1,1 (default 1 per stage; each stage's "
                                       "loss is the mean over its own samples, so --stage-mix sets how many samples a "
                                       "stage gets, not its weight)", type=numbers("--stage-weights", float, "1,1,1"))
    caption_dropout: float = flag(0.1, "share of captions replaced by the empty prompt (CFG, paper §3.4)",
                                  type=float, bounds=("[", 0, 1, ")"))
    jump_noise: bool | None = flag(None, "[ours] add at each stage jump the fine noise BridgeFlow cannot make "
                                   "(nami.with_jump_noise; default: on for the built-in data with the small presets, "
                                   "off for --data/--cache and the paper's sizes, as in the paper)",
                                   action=argparse.BooleanOptionalAction)
    start: str = flag("bridge", "start point of stage k > 1: BridgeFlow (paper) or Pyramid Flow's analytic one",
                      choices=STARTS)
    bridge_fit: str = flag("adam", "how BridgeFlow is pre-trained on its MSE (paper §3.3): adam, the paper's "
                           "gradient steps; least-squares, its exact minimum over --bridge-steps batches, the same "
                           "maps in a sixth of the time [ours, docs/method.md §4]", choices=BRIDGE_FITS)
    bridge_steps: int | None = flag(None, "BridgeFlow pre-training steps (default: the paper's sizes 10000, as §4.3; "
                                    "the small presets 1000 Adam steps for adam, 100 batches for least-squares)",
                                    type=int, bounds=(0, 10 ** 8))
    bridge_lr: float = flag(1e-3, "BridgeFlow pre-training lr (--bridge-fit adam)", type=float, bounds=("(", 0, 1, ")"))
    # data, encoders, autoencoder
    world_level: int = flag(0, "built-in data: 0 one object, centred, one size; 1 one object anywhere, any size; "
                            "2 + two objects, attributes and positions; 3 the full world with counting "
                            "(toyworld.shapes.LEVELS)", type=int, choices=sorted(shapes.LEVELS))
    data: str | None = flag(None, "image folder (captions in .txt files beside the images or metadata.jsonl); "
                            "default: the built-in shapes data")
    cache: str | None = flag(None, "a cache made by `python -m datafeed cache` (latents + text states) instead of --data")
    flip: bool = flag(False, "random horizontal flips of --data images", action="store_true")
    aspect: float | None = flag(None, "built-in world: width:height of its pictures, e.g. 2:1 (the scene in the "
                                "centre, its background on either side; the bucket nearest it, datafeed/buckets.py)",
                                type=shapes.parse_aspect)
    buckets: bool | None = flag(None, "aspect-ratio buckets (datafeed/buckets.py): each image at the size of about R² nearest "
                                "its aspect, a global batch from one bucket (default: on for --data and --cache; "
                                "--no-buckets centre-crops squares)", action=argparse.BooleanOptionalAction)
    workers: int = flag(2, "DataLoader workers for --data/--cache", type=int, bounds=(0, 256))
    text_encoder: str | None = flag(None, "local transformers encoder folder for the token states "
                                    "(paper: mT5-XXL; default: all-MiniLM-L6-v2)")
    pooled_encoder: str | None = flag(None, "local CLIP-style encoder folder for the pooled vector "
                                      "(paper: multilingual CLIP; default: mean of the text states)")
    text_len: int | None = flag(None, "text tokens per prompt (default: the recipe's, 256 for the paper's sizes as "
                                "the release runs mT5, 16 for the small presets)", type=int, bounds=(1, 4096))
    pooled_len: int = flag(77, "tokens of the pooled encoder (paper: 77)", type=int, bounds=(1, 4096))
    vae: str | None = flag("auto", "local diffusers AutoencoderKL folder: train in its latent space (FLUX VAE: 16 "
                           "channels, 8x); none: pixel space; auto (default): the tiny shapes VAE in "
                           "weights/shapes-vae for the built-in data, pixel space for --data/--cache")
    # the run folder
    out: str = flag("runs/shapes-toy", "output folder (default runs/<data>-<size>[-<mode>], data = shapes or "
                    "the folder's name)")
    resume: bool = flag(False, "continue from the newest checkpoint in --out", action="store_true")
    init_from: str | None = flag(None, "start a new run (fresh optimizer, schedule and step count) from the weights "
                                 "in this folder: one of our checkpoints (a run or ckpt-N folder), the authors' "
                                 "release, or a diffusers FluxTransformer2DModel folder (training/init_from.py)")
    init_from_raw: bool = flag(False, "with --init-from one of our checkpoints: its raw weights, not the EMA",
                               action="store_true")
    lora: int | None = flag(None, "train LoRA adapters of this rank on the frozen --init-from weights instead of "
                            "every weight (training/lora.py; needs peft)", type=int, bounds=(1, 4096))
    lora_alpha: float | None = flag(None, "LoRA α (the adapters are scaled by α/rank; default: the rank)", type=float,
                                    bounds=("(", 0, 1e6, "]"))
    lora_targets: tuple | None = flag(None, "the linear layers that get adapters, as suffixes of their names "
                                      "(default: diffusers' FLUX LoRA targets, lora.DEFAULT_TARGETS)",
                                      type=lambda text: tuple(t.strip() for t in text.split(",") if t.strip()))
    stop_after: int | None = flag(None, "stop with a checkpoint at this step (the schedules still follow "
                                  "--max-steps, so --resume continues the same run)", type=int, bounds=(1, 10 ** 9))
    seed: int = flag(0, "seed of the data order, the noise and the initial weights", type=int,
                     bounds=("[", 0, 2 ** 63, ")"))
    sample_every: int = flag(300, "steps between sample grids", type=int, bounds=(1, 10 ** 9))
    ckpt_every: int = flag(300, "steps between checkpoints", type=int, bounds=(1, 10 ** 9))
    keep: int = flag(3, "checkpoints kept", type=int, bounds=(1, 1000))
    max_bad_steps: int = flag(5, "stop after this many steps in a row with a non-finite loss or gradient "
                              "(each is skipped)", type=int, bounds=(1, 10 ** 6))
    val_every: int = flag(300, "steps between validation losses (Eq. 4 per stage on held-out samples at fixed t' and "
                          "noise, EMA weights; also at step 0 and the last; training/validation.py); 0: none",
                          type=int, bounds=(0, 10 ** 9))
    val_samples: int = flag(64, "held-out samples of the validation loss", type=int, bounds=(1, 1 << 16))
    val_data: str | None = flag(None, "held-out image folder or cache for the validation loss (the built-in world "
                                "holds out its own samples; --data/--cache runs without --val-data have none)")
    log_every: int = flag(10, "steps between log.jsonl lines", type=int, bounds=(1, 10 ** 9))
    progress: bool = flag(True, "progress bars", action=argparse.BooleanOptionalAction)
    tensorboard: bool = flag(False, "also log to RUN/tensorboard (losses per stage, lr, gradient norm, images/s, "
                             "stage ratios, sample grids; needs the tensorboard package; log.jsonl stays the record)",
                             action="store_true")
    # scale-out (common/parallel.py)
    bf16: bool | None = flag(None, "bf16 autocast with fp32 master weights (default: on CUDA only; on a CPU "
                             "without AMX bf16 matrix products are slower than fp32)",
                             action=argparse.BooleanOptionalAction)
    parallel: str | None = flag(None, "under torchrun: DDP or FSDP2 (default: fsdp for 0.6b and 2b, ddp for the "
                                "small presets)", choices=("ddp", "fsdp"))
    micro_batch: int | None = flag(None, "samples per rank per forward; gradient accumulation makes up the rest "
                                   "of --batch-size (default: batch-size / ranks)", type=int, bounds=(1, 1 << 16))
    activation_checkpointing: bool = flag(False, "recompute each block's activations in backward (less memory, "
                                          "~30 %% more time)", action="store_true")
    compile: bool = flag(False, "torch.compile each transformer block", action="store_true")

    def __post_init__(self):
        """The defaults that depend on the preset and the data: the recipe of the preset (RECIPES) for what the flags
        leave unset; the built-in world runs in the latents of its tiny VAE, with jump noise for the small presets; an
        image folder or a cache runs the paper's method, in pixels unless --vae."""
        builtin = not (self.data or self.cache)
        for name, value in RECIPES[recipe_of(self.size)].items():
            if getattr(self, name) is None:
                setattr(self, name, value)
        if self.vae == "auto":
            self.vae = SHAPES_VAE if builtin else None
        elif isinstance(self.vae, str) and self.vae.lower() == "none":
            self.vae = None
        if self.jump_noise is None:
            self.jump_noise = builtin
        if self.bridge_steps is None:
            self.bridge_steps = BRIDGE_STEPS.get(self.bridge_fit)
        if self.buckets is None:
            self.buckets = not builtin


# The recipe of a run, for the flags it leaves unset. "paper" for the paper's sizes: §4.3 (lr 1e-4; BridgeFlow ~10k
# steps; 4:2:1 for 120k steps, 2:4:1 for 80k, 1:2:4 at lr 5e-5 for 50k: --stage-mix, --mix-fractions and
# --final-lr-scale's defaults), the release's text length (mT5, 256 tokens), no jump noise, and an EMA the paper does
# not name (DiT's 0.9999). "toy" for the small presets: tuned on a 2-core CPU (results/recipes.md); jump noise on the
# built-in world (None: decided by the data).
PAPER_SIZES = ("0.6b", "2b", "flux1-dev")
RECIPES = {
    "paper": dict(lr=1e-4, max_steps=250_000, bridge_steps=10_000, text_len=256, jump_noise=False, ema_decay=0.9999),
    "toy": dict(lr=1e-3, max_steps=1200, text_len=16, jump_noise=None, ema_decay=0.995),
}


def recipe_of(size: str) -> str:
    return "paper" if size in PAPER_SIZES else "toy"


def describe_recipe(cfg) -> str:
    """One line of what a run trains with, printed as it starts."""
    phases = " → ".join(cfg.stage_mix.split(",")) if "," in cfg.stage_mix else cfg.stage_mix
    source = "paper §4.3" if recipe_of(cfg.size) == "paper" else "ours, for a CPU"
    return (f"recipe ({source}; flags change it): lr {cfg.lr:g} (×{cfg.final_lr_scale:g} in the last phase), "
            f"{cfg.max_steps} steps, stage mix {phases} over {cfg.mix_fractions} of them, text {cfg.text_len} tokens, "
            f"jump noise {'on' if cfg.jump_noise else 'off'}, EMA {cfg.ema_decay:g}, BridgeFlow {cfg.bridge_steps} "
            f"{cfg.bridge_fit} steps, batch {cfg.batch_size}")


def parse_args(argv=None, description: str | None = None) -> TrainConfig:
    """train.py's command line, built from TrainConfig's fields."""
    ap = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    for f in fields(TrainConfig):
        options = {k: v for k, v in f.metadata.items() if k != "bounds"}
        if options.get("action") != "store_true":
            options["default"] = None  # unset flags keep TrainConfig's default (and --out is derived below)
        ap.add_argument("--" + f.name.replace("_", "-"), **options)
    given = {k: v for k, v in vars(ap.parse_args(argv)).items() if v is not None}
    if "out" not in given:
        source = given.get("data") or given.get("cache")
        name = Path(source).resolve().name if source else "shapes"
        size, mode = given.get("size", TrainConfig.size), given.get("mode", TrainConfig.mode)
        given["out"] = f"runs/{name}-{size}" + ("" if mode == "nami" else f"-{mode}")
    return TrainConfig(**given)


def in_bounds(value, bounds) -> bool:
    left, low, high, right = bounds if len(bounds) == 4 else ("[", *bounds, "]")
    above = low < value if left == "(" else low <= value
    below = value < high if right == ")" else value <= high
    return above and below


def check_resolution(height: int, width: int, multiple: int, what: str = "resolution"):
    """Raise a ValueError naming the nearest valid sizes if a side is not a multiple."""
    bad = [s for s in (height, width) if s <= 0 or s % multiple]
    if bad:
        def near(s):
            if s > 0 and s % multiple == 0:
                return [s]
            lo = max(multiple, s // multiple * multiple)
            return sorted({lo, lo + multiple})
        raise ValueError(
            f"{what} {width}x{height} is not valid: each side must be a positive multiple of {multiple} "
            f"(patch size × 2^(K−1) × VAE factor). Nearest valid: width {near(width)}, height {near(height)}")


def model_config(cfg: TrainConfig, text_dim: int = 1, pooled_dim: int = 1, channels: int = 3) -> nami.NamiConfig:
    """The NamiConfig of this run: preset, mode, ablation overrides, the widths of the encoders
    and the latent channels of the autoencoder."""
    base = nami.PRESETS[cfg.size]
    overrides = dict(joint_attention_dim=text_dim, pooled_projection_dim=pooled_dim, in_channels=channels)
    if cfg.window_ratios is not None:
        overrides["window_ratios"] = cfg.window_ratios
    if cfg.cuts is not None:
        overrides["cuts"] = cfg.cuts
    elif cfg.window_ratios is not None and len(cfg.window_ratios) != len(base["cuts"]):  # e.g. K = 4
        overrides["cuts"] = stage_cuts(base["depth_single"], len(cfg.window_ratios))
    if cfg.jump_noise:
        overrides["jump_noise"] = True
    if cfg.velocity != "local":
        overrides["velocity"] = cfg.velocity
    if cfg.mode == "flat":    # one window [1 -> 0], full model, full resolution
        overrides.update(window_ratios=(1,), cuts=(base["depth_single"],))
    elif cfg.mode == "flow-only":  # the stages, but every stage runs the full model
        k = len(overrides.get("window_ratios", (1, 1, 1)))
        overrides["cuts"] = (base["depth_single"],) * k
    return nami.get_config(cfg.size, **overrides)


def stage_cuts(depth_single: int, num_stages: int) -> tuple:
    """[ours] Cut points for K stages by the rule of the paper's presets (2b: (1, 8, 14), 0.6b: (1, 5, 8)): stage 1
    runs every double block and the first single block, the other single blocks are shared out as evenly as they
    divide among the later stages, an earlier stage taking one more where they do not. K = 4: 2b (1, 6, 10, 14)."""
    if num_stages == 1:
        return (depth_single,)
    rest, later = depth_single - 1, num_stages - 1
    cuts = [1]
    for k in range(later):
        cuts.append(cuts[-1] + rest // later + (k < rest % later))
    return tuple(cuts)


def validate(cfg: TrainConfig):
    """Check every setting before any work starts (no model or encoder is loaded yet); raise
    ValueError saying what to change."""
    for f in fields(TrainConfig):
        value, bounds = getattr(cfg, f.name), f.metadata.get("bounds")
        name = "--" + f.name.replace("_", "-")
        if "choices" in f.metadata and value not in f.metadata["choices"] and value is not None:
            raise ValueError(f"{name} must be one of {', '.join(map(str, f.metadata['choices']))}, got {value!r}")
        if bounds is not None and value is not None and not in_bounds(value, bounds):
            left, low, high, right = bounds if len(bounds) == 4 else ("[", *bounds, "]")
            raise ValueError(f"{name} must be in {left}{low:g}, {high:g}{right}, got {value}")
    checks = [(not (cfg.data and cfg.cache), "give --data (images, encoded on the fly) or --cache (precomputed), not both"),
              (not cfg.flip or bool(cfg.data), "--flip applies to --data images only (a cache holds unflipped latents)"),
              (not cfg.buckets or bool(cfg.data or cfg.cache), "--buckets applies to --data and --cache (the "
               "built-in world is square, or --aspect W:H)"),
              (cfg.aspect is None or not (cfg.data or cfg.cache), "--aspect applies to the built-in world; an image "
               "folder keeps each image's own aspect ratio in its bucket (--buckets)"),
              (not (cfg.resume and cfg.init_from), "--resume continues the run in --out, --init-from starts a new "
               "one from other weights: give one of them (a run started with --init-from resumes with --resume "
               "alone: its checkpoints record where its weights came from)"),
              (not cfg.init_from_raw or bool(cfg.init_from), "--init-from-raw applies to --init-from only"),
              (cfg.max_steps > 0 or bool(cfg.init_from), "--max-steps 0 saves given weights untrained: add --init-from "
               "PATH, or train at least one step"),
              (cfg.lora is not None or (cfg.lora_alpha is None and cfg.lora_targets is None),
               "--lora-alpha and --lora-targets apply to --lora RANK runs only"),
              (not cfg.lora or bool(cfg.init_from or cfg.resume), "--lora trains adapters on given weights: add "
               "--init-from PATH (the base: one of our runs, the authors' release, a FLUX transformer)"),
              (not cfg.lora or cfg.parallel != "fsdp", "--lora runs under DDP, not FSDP2: its frozen base is held in "
               "bf16 on each GPU (4.2 GB for 2b) and only the adapters are trained; leave out --parallel fsdp"),
              (cfg.micro_batch is None or cfg.micro_batch <= cfg.batch_size,
               f"--micro-batch must be at most --batch-size {cfg.batch_size}, got {cfg.micro_batch}")]
    for ok, message in checks:
        if not ok:
            raise ValueError(message)
    if cfg.tensorboard and importlib.util.find_spec("tensorboard") is None:
        raise ImportError("--tensorboard needs the tensorboard package: pip install tensorboard (or leave the flag "
                          "out: log.jsonl is written either way, and `python -m training.checkpoint plot RUN` draws it)")
    if cfg.lora and importlib.util.find_spec("peft") is None:
        raise ImportError("--lora needs the peft package: pip install peft (docs/fine-tuning.md)")
    for name in ("data", "cache", "val_data", "vae", "text_encoder", "pooled_encoder", "init_from"):
        path = getattr(cfg, name)
        if path is not None and not Path(path).is_dir():
            raise ValueError(f"--{name.replace('_', '-')} {path}: no such folder")
    # cuts and window ratios must fit the preset (NamiConfig names what is wrong), the stage mix
    # and the loss weights must have one value per stage
    stages = model_config(cfg)
    stage_mix_schedule(cfg, stages.num_stages)
    factor = 1 if cfg.vae is None else encoders.vae_factor(cfg.vae)  # None: load_autoencoder will say what is wrong
    if factor is not None:
        check_resolution(cfg.resolution, cfg.resolution, factor * stages.size_multiple, "--resolution")
    if cfg.stage_weights is not None and (len(cfg.stage_weights) != stages.num_stages or min(cfg.stage_weights) < 0):
        raise ValueError(f"--stage-weights needs {stages.num_stages} non-negative values, got {cfg.stage_weights}")
    check_writable(Path(cfg.out))


def check_writable(out: Path):
    """Create the output folder and write a probe file in it (files.probe_writable: one no other rank
    can touch), so that a path that cannot be written fails now, with the reason, on every rank, not
    after hours of training."""
    try:
        files.probe_writable(out)
    except OSError as e:
        raise ValueError(f"--out {out} cannot be written ({e.strerror or e}): choose another folder")


# ----------------------------------------------------------------------------------------------
# The schedule of Algorithm 1 (paper §4.3): stage mix per phase, learning rate
# ----------------------------------------------------------------------------------------------


def stage_mix_schedule(cfg: TrainConfig, num_stages: int):
    """[(first step, last step, ratios)] per phase, scaled to the run's length."""
    if num_stages == 1:
        return [(0, cfg.max_steps, (1,))]
    parse = numbers("--stage-mix", int, "4:2:1,2:4:1,1:2:4")
    mix = stage_mix_for(num_stages) if cfg.stage_mix == PAPER_STAGE_MIX and num_stages != 3 else cfg.stage_mix
    try:
        phases = [parse(p) for p in mix.split(",")] if "," in mix and ":" in mix else [parse(mix)]
        fracs = [float(f) for f in cfg.mix_fractions.split(",")] if len(phases) > 1 else [1.0]
    except argparse.ArgumentTypeError as e:
        raise ValueError(str(e))
    except ValueError:
        raise ValueError(f"--mix-fractions must be numbers separated by commas, e.g. 0.48,0.32,0.2, "
                         f"got {cfg.mix_fractions!r}")
    if (len(fracs) != len(phases) or any(len(p) != num_stages for p in phases)
            or any(min(p) < 0 or sum(p) == 0 for p in phases)):
        raise ValueError(f"--stage-mix {cfg.stage_mix!r} with --mix-fractions {cfg.mix_fractions!r} must give "
                         f"one fraction per phase and {num_stages} non-negative ratios per phase")
    schedule, start, total = [], 0, sum(fracs)
    for i, (ratios, frac) in enumerate(zip(phases, fracs)):
        end = cfg.max_steps if i == len(phases) - 1 else start + round(cfg.max_steps * frac / total)
        schedule.append((start, end, ratios))
        start = end
    return schedule


def stage_mix_for(num_stages: int) -> str:
    """[ours] The default stage mix of a run of K ≠ 3 stages (K = 3 keeps the paper's 4:2:1, 2:4:1, 1:2:4): the
    paper's first phase halves from the lowest resolution up and its last doubles, so K = 4 takes 8:4:2:1 and
    1:2:4:8; between them every stage alike."""
    first = ":".join(str(2 ** (num_stages - k)) for k in range(1, num_stages + 1))
    return ",".join([first, ":".join(["1"] * num_stages), ":".join(reversed(first.split(":")))])


def stage_ratios(schedule, step: int):
    """The stage sampling ratios of the phase that holds this step."""
    return next(ratios for first, last, ratios in schedule if first <= step < last)


# (steps, start) of the linear warm-up, from start·lr to lr: a new model's, and a fine-tuning one's
# (--init-from). The latter is short because the weights are already good: only AdamW's fresh moment
# estimates need it. Its first update is exactly lr·sign(g) for every parameter, and updates stay
# near that size until the first moment has averaged about 1/(1−β1) = 10 gradients: the warm-up
# covers 2/(1−β1) = 20 steps and starts at lr/10, so those updates stay small.
WARMUP, FINE_TUNE_WARMUP = (100, 0.0), (20, 0.1)


def warmup_plan(cfg: TrainConfig) -> tuple[int, float]:
    """(steps, start) of this run's warm-up: --warmup and --warmup-start, else the defaults above."""
    steps, start = FINE_TUNE_WARMUP if cfg.init_from else WARMUP
    return (steps if cfg.warmup is None else cfg.warmup), (start if cfg.warmup_start is None else cfg.warmup_start)


def learning_rate(cfg: TrainConfig, step: int, schedule) -> float:
    """Linear warm-up (warmup_plan), constant, and final_lr_scale·lr in the last mix phase (paper §4.3)."""
    steps, start = warmup_plan(cfg)
    lr = cfg.lr * (start + (1 - start) * min(1.0, (step + 1) / max(1, steps)))
    if len(schedule) > 1 and step >= schedule[-1][0]:
        lr *= cfg.final_lr_scale
    return lr
