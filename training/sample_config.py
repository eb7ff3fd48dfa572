"""The command line of sampling: the flags of sample.py, their bounds and checks, and the plan of a
sampling run (which checkpoint or release, size, steps, guidance, prompts) settled from the
checkpoint's config files before any weights are read; --steps and --cfg are experiments/eval.py's too.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import nami
from common import encoders, files
from training import checkpoint, diffusers_folder, lora, release
from training.config import check_resolution


MAX_STEPS_PER_STAGE, MAX_GUIDANCE = 1000, 50.0


def parse_steps(text: str) -> list[int]:
    """--steps "10,10,10": Euler steps per stage."""
    try:
        steps = [int(s) for s in text.split(",")]
    except ValueError:
        raise ValueError(f"--steps must be integers separated by commas, e.g. 10,10,10, got {text!r}")
    if min(steps) < 1 or max(steps) > MAX_STEPS_PER_STAGE:
        raise ValueError(f"--steps {text}: each stage needs between 1 and {MAX_STEPS_PER_STAGE} Euler steps")
    return steps


def check_guidance(value: float):
    if not 0 <= value <= MAX_GUIDANCE:  # NaN fails this too
        raise ValueError(f"--cfg must be between 0 and {MAX_GUIDANCE:g} (1 = no guidance), got {value}")


# ----------------------------------------------------------------------------------------------
# sample.py's command line: its flags, their bounds, and the plan of a sampling run
# ----------------------------------------------------------------------------------------------

# Bounds of the command line, far past any sensible use: a value beyond them is a typo, refused
# before anything is loaded rather than ending in an out-of-memory error or a huge file
MAX_IMAGES = 256
MAX_SIDE = 8192        # pixels per side of a generated image (8 times the paper's 1024)
MAX_PNG_SIDE = 16384   # pixels per side of one image after --upscale
MAX_SEED = 2 ** 63     # seeds are non-negative 64-bit integers, as torch.Generator takes them


def parse_args(argv=None, description: str | None = None) -> argparse.Namespace:
    """sample.py's command line (its docstring is the description --help prints)."""
    ap = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("prompt", help="the text prompt ('' = unconditional)")
    ap.add_argument("--ckpt", help="checkpoint folder, a run folder (its newest checkpoint) or a diffusers folder of "
                    "python -m training.export; default: newest under runs/")
    ap.add_argument("--weights", help="the authors' released NAMI-2B folder (layout in README) instead of --ckpt")
    ap.add_argument("--seed", type=int, default=0, help="seed of the first image (image i uses seed+i)")
    ap.add_argument("--steps", default=None,
                    help="Euler steps per stage, e.g. 10,10,10 (default 30 in all: 10 per stage for 3 stages)")
    ap.add_argument("--cfg", type=float, default=None, help="classifier-free guidance scale g (1 = off; default 3); a guidance-"
                    "distilled model (FLUX.1-dev's layout) takes g as its input instead")
    ap.add_argument("--negative", default=None,
                    help="negative prompt, the unconditional half of CFG (default '', with --weights the release's)")
    ap.add_argument("--schedule", choices=sorted(release.SCHEDULES), default=None,
                    help="Euler grid: the release's 1000-step table or our uniform one (default: release with "
                         "--weights, uniform otherwise)")
    ap.add_argument("--no-release-prompts", action="store_true",
                    help="with --weights (or an exported release): no prompt suffix and an empty negative prompt, "
                         "unlike the release")
    ap.add_argument("--res", help="WxH in pixels (default: the training resolution; 1024x1024 for --weights)")
    ap.add_argument("-n", type=int, default=1, help="number of images (several -> one grid)")
    ap.add_argument("--out", default="sample.png", help="output PNG")
    ap.add_argument("--flat", action="store_true",
                    help="the flat baseline sampler (one window, full model, full size) with the same total steps")
    ap.add_argument("--show-stages", action="store_true", help="each stage's output, upsampled, side by side")
    ap.add_argument("--no-ema", action="store_true", help="use the raw weights instead of the EMA")
    ap.add_argument("--text-encoder", help="local text encoder folder (default: the one the checkpoint names)")
    ap.add_argument("--pooled-encoder", help="local pooled (CLIP-style) encoder folder (default: the checkpoint's)")
    ap.add_argument("--vae", help="local diffusers AutoencoderKL folder (default: the checkpoint's)")
    ap.add_argument("--size", choices=sorted(nami.PRESETS),
                    help="expected preset; an error if the checkpoint holds another")
    ap.add_argument("--lora", help="LoRA adapters (a train.py --lora run or checkpoint folder) on their base: "
                    "the one they record, or --ckpt/--weights when it lives elsewhere (it must be the same files)")
    ap.add_argument("--lora-scale", type=float, default=1.0, help="strength of the LoRA (0 = the base alone)")
    ap.add_argument("--merge-lora", help="also write the base with the LoRA merged in to this new folder, "
                    "which --ckpt (or --weights, for the release) loads without peft")
    ap.add_argument("--upscale", type=int, default=None, help="nearest-neighbour zoom of the PNG (default: to ≥256 px)")
    return ap.parse_args(argv)


def parse_res(text: str) -> tuple[int, int]:
    """--res "WxH" -> (width, height), each side within MAX_SIDE."""
    try:
        w, h = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise ValueError(f"--res must look like WxH, e.g. 32x32, got {text!r}")
    if not (0 < w <= MAX_SIDE and 0 < h <= MAX_SIDE):
        raise ValueError(f"--res {text}: each side must be between 1 and {MAX_SIDE} pixels")
    return w, h


def check_png_out(out: str) -> Path:
    """--out must be a .png file name in a folder that exists or can be made, and can be written:
    checked (and the folder made) before sampling, so that a run never ends without its picture."""
    path = Path(out)
    if path.is_dir():
        raise ValueError(f"--out {out} is a folder: give a file name, e.g. {path / 'sample.png'}")
    if path.suffix.lower() != ".png":
        raise ValueError(f"--out {out}: sample.py writes PNG (prompt and settings go in its text chunks); "
                         "give a file name ending in .png")
    try:
        files.probe_writable(path.parent)  # a folder can exist and still refuse writes
    except OSError as e:
        raise ValueError(f"--out {out}: cannot write in {path.parent} ({e.strerror or e}): choose another folder")
    return path


def check_sample_flags(args):
    """Every check of sample.py's flags that needs no checkpoint, done before anything is read or loaded."""
    if args.weights and args.ckpt:
        raise ValueError("give --weights (the released folder) or --ckpt (our checkpoint), not both")
    if args.weights:
        for flag, value in (("--text-encoder", args.text_encoder), ("--pooled-encoder", args.pooled_encoder),
                            ("--vae", args.vae), ("--size", args.size), ("--no-ema", args.no_ema)):
            if value:  # silently ignoring it would sample with something the user did not ask for
                raise ValueError(f"{flag} applies to --ckpt checkpoints; --weights uses the encoders, VAE and "
                                 "weights inside its folder")
    elif args.no_release_prompts and not (args.ckpt and diffusers_folder.holds(args.ckpt)):
        raise ValueError("--no-release-prompts applies to --weights and exported folders (our checkpoints add no "
                         "prompt suffix)")
    if not 1 <= args.n <= MAX_IMAGES:
        raise ValueError(f"-n must be between 1 and {MAX_IMAGES}, got {args.n}")
    if args.cfg is not None:
        check_guidance(args.cfg)
    if not 0 <= args.seed <= MAX_SEED - args.n:
        raise ValueError(f"--seed must be between 0 and 2**63 − n (image i uses seed + i), got {args.seed}")
    if args.upscale is not None and not 1 <= args.upscale <= MAX_PNG_SIDE:
        raise ValueError(f"--upscale must be a whole zoom factor from 1 to {MAX_PNG_SIDE}, got {args.upscale}")
    encoders.check_prompt(args.prompt, "the prompt")
    if args.negative is not None:
        encoders.check_prompt(args.negative, "--negative")
    if args.steps is not None:
        parse_steps(args.steps)
    if args.res:
        parse_res(args.res)
    if (args.lora_scale != 1.0 or args.merge_lora) and not args.lora:
        raise ValueError("--lora-scale and --merge-lora apply to --lora PATH")
    if args.merge_lora and Path(args.merge_lora).exists():
        raise ValueError(f"--merge-lora {args.merge_lora} exists: give a new folder (nothing is overwritten)")


def sample_plan(args) -> dict:
    """The plan of a sampling run, all before any weights are read: 1. the flags alone, 2. against
    the config files of the checkpoint (or of the release, or of the LoRA's base): the steps,
    guidance, size, zoom, output file, Euler grid, prompt suffix and negative prompt."""
    check_sample_flags(args)
    out_png = check_png_out(args.out)
    if args.lora:  # the LoRA's own base unless one is given
        args.lora_folder = lora.find(args.lora)
        args.lora_record = lora.record(args.lora_folder)
        if not (args.ckpt or args.weights):
            base = args.lora_record["base"]
            args.weights, args.ckpt = (base["path"], None) if base.get("kind") == "release" else (None, base["path"])
    plan = release.plan(args.weights) if args.weights else checkpoint.plan(args.ckpt)
    K = plan["K"]
    steps = plan["steps"] if args.steps is None else parse_steps(args.steps)
    if len(steps) != K:
        raise ValueError(f"--steps needs {K} counts between 1 and {MAX_STEPS_PER_STAGE} (one per stage), "
                         f"got {args.steps}")
    w, h = parse_res(args.res) if args.res else plan["resolution"]
    if plan["multiple"]:
        check_resolution(h, w, plan["multiple"], "--res")
    zoom = args.upscale or max(1, -(-256 // max(w, h)))
    if zoom * max(w, h) > MAX_PNG_SIDE:
        raise ValueError(f"--upscale {zoom} makes {w * zoom}x{h * zoom} pixels per image, more than "
                         f"{MAX_PNG_SIDE} per side: use --upscale {max(1, MAX_PNG_SIDE // max(w, h))} or less")
    exported = plan.get("prompts")  # an exported folder's own defaults (docs/export.md): the release's, or none
    if exported and not args.no_release_prompts:
        prompts = {"suffix": exported["suffix"], "negative": exported["negative"] if args.negative is None else args.negative}
    else:
        prompts = release.prompts(args.weights, args.no_release_prompts, args.negative)
    return {**plan, "steps": steps, "cfg": plan["cfg"] if args.cfg is None else args.cfg, "size": (w, h),
            "zoom": zoom, "out": out_png, "schedule": args.schedule or plan["schedule"], **prompts}
