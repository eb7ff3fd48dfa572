"""Text -> PNG with a trained NAMI checkpoint or the authors' released NAMI-2B: progressive
sampling (paper §3.5).

    python sample.py "a red circle above a blue square"          # newest checkpoint under runs/
    python sample.py "three green squares" -n 8 --seed 1 --out squares.png
    python sample.py "a blue triangle" --show-stages              # each stage's output, like Fig. 3
    python sample.py "a blue triangle" --flat                     # the flat sampler, same total steps
    python sample.py --weights NAMI-T2I/weights "a photo of a cat"  # released NAMI-2B, 1024², 10+10+10, CFG 3
    python sample.py --lora runs/lora-toy "a circle"               # a LoRA (train.py --lora) on its base
    python sample.py --lora runs/lora-toy --merge-lora runs/merged "a circle"   # and its merged weights

The preset, resolution, text encoders and VAE come from the checkpoint. With --weights the release's
grid, prompt suffix and negative prompt are the defaults (--schedule, --no-release-prompts). The PNG's
text chunk records prompt, suffix, negative prompt, seed, steps, cfg, schedule, sampler and
checkpoint; the time of each stage is printed.
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch
from PIL import Image
from safetensors import SafetensorError

import checkpoint
import config
import data
import images
import lora
import nami
import parallel
import release
from encoders import check_prompt

# Bounds of the command line, far past any sensible use: a value beyond them is a typo, refused
# before anything is loaded rather than ending in an out-of-memory error or a huge file
MAX_IMAGES = 256
MAX_SIDE = 8192        # pixels per side of a generated image (8 times the paper's 1024)
MAX_PNG_SIDE = 16384   # pixels per side of one image after --upscale
MAX_SEED = 2 ** 63     # seeds are non-negative 64-bit integers, as torch.Generator takes them


def parse_res(text):
    try:
        w, h = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise ValueError(f"--res must look like WxH, e.g. 32x32, got {text!r}")
    if not (0 < w <= MAX_SIDE and 0 < h <= MAX_SIDE):
        raise ValueError(f"--res {text}: each side must be between 1 and {MAX_SIDE} pixels")
    return w, h


def check_out(out: str) -> Path:
    """--out must be a .png file name in a folder that exists or can be made, and can be written:
    checked (and the folder made) before sampling, so that a run never ends without its picture."""
    path = Path(out)
    if path.is_dir():
        raise ValueError(f"--out {out} is a folder: give a file name, e.g. {path / 'sample.png'}")
    if path.suffix.lower() != ".png":
        raise ValueError(f"--out {out}: sample.py writes PNG (prompt and settings go in its text chunks); "
                         "give a file name ending in .png")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path.parent):  # a folder can exist and still refuse writes
            pass
    except OSError as e:
        raise ValueError(f"--out {out}: cannot write in {path.parent} ({e.strerror or e}): choose another folder")
    return path


def check_flags(a):
    """Every check that needs no checkpoint, done before anything is read or loaded."""
    if a.weights and a.ckpt:
        raise ValueError("give --weights (the released folder) or --ckpt (our checkpoint), not both")
    if a.weights:
        for flag, value in (("--text-encoder", a.text_encoder), ("--pooled-encoder", a.pooled_encoder),
                            ("--vae", a.vae), ("--size", a.size), ("--no-ema", a.no_ema)):
            if value:  # silently ignoring it would sample with something the user did not ask for
                raise ValueError(f"{flag} applies to --ckpt checkpoints; --weights uses the encoders, VAE and "
                                 "weights inside its folder")
    elif a.no_release_prompts:
        raise ValueError("--no-release-prompts applies to --weights (our checkpoints add no prompt suffix)")
    if not 1 <= a.n <= MAX_IMAGES:
        raise ValueError(f"-n must be between 1 and {MAX_IMAGES}, got {a.n}")
    if a.cfg is not None:
        config.check_guidance(a.cfg)
    if not 0 <= a.seed <= MAX_SEED - a.n:
        raise ValueError(f"--seed must be between 0 and 2**63 − n (image i uses seed + i), got {a.seed}")
    if a.upscale is not None and not 1 <= a.upscale <= MAX_PNG_SIDE:
        raise ValueError(f"--upscale must be a whole zoom factor from 1 to {MAX_PNG_SIDE}, got {a.upscale}")
    check_prompt(a.prompt, "the prompt")
    if a.negative is not None:
        check_prompt(a.negative, "--negative")
    if a.steps is not None:
        config.parse_steps(a.steps)
    if a.res:
        parse_res(a.res)
    if (a.lora_scale != 1.0 or a.merge_lora) and not a.lora:
        raise ValueError("--lora-scale and --merge-lora apply to --lora PATH")
    if a.merge_lora and Path(a.merge_lora).exists():
        raise ValueError(f"--merge-lora {a.merge_lora} exists: give a new folder (nothing is overwritten)")


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("prompt", help="the text prompt ('' = unconditional)")
    ap.add_argument("--ckpt", help="checkpoint folder, or a run folder (its newest checkpoint); default: newest under runs/")
    ap.add_argument("--weights", help="the authors' released NAMI-2B folder (layout in README) instead of --ckpt")
    ap.add_argument("--seed", type=int, default=0, help="seed of the first image (image i uses seed+i)")
    ap.add_argument("--steps", default=None,
                    help="Euler steps per stage, e.g. 10,10,10 (default 30 in all: 10 per stage for 3 stages)")
    ap.add_argument("--cfg", type=float, default=None, help="classifier-free guidance scale g (1 = off; default 3)")
    ap.add_argument("--negative", default=None,
                    help="negative prompt, the unconditional half of CFG (default '', with --weights the release's)")
    ap.add_argument("--schedule", choices=sorted(release.SCHEDULES), default=None,
                    help="Euler grid: the release's 1000-step table or our uniform one (default: release with "
                         "--weights, uniform otherwise)")
    ap.add_argument("--no-release-prompts", action="store_true",
                    help="with --weights: no prompt suffix and an empty negative prompt, unlike the release")
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


def settle(a) -> dict:
    """1. the flags alone, 2. against the checkpoint's config files: the plan of the run (steps,
    guidance, size, zoom, output file), all before any weights are read."""
    check_flags(a)
    out_png = check_out(a.out)
    if a.lora:  # the LoRA's own base unless one is given
        a.lora_folder = lora.find(a.lora)
        a.lora_record = lora.record(a.lora_folder)
        if not (a.ckpt or a.weights):
            base = a.lora_record["base"]
            a.weights, a.ckpt = (base["path"], None) if base.get("kind") == "release" else (None, base["path"])
    plan = release.plan(a.weights) if a.weights else checkpoint.plan(a.ckpt)
    K = plan["K"]
    steps = plan["steps"] if a.steps is None else config.parse_steps(a.steps)
    if len(steps) != K:
        raise ValueError(f"--steps needs {K} counts between 1 and {config.MAX_STEPS_PER_STAGE} (one per stage), "
                         f"got {a.steps}")
    w, h = parse_res(a.res) if a.res else plan["resolution"]
    if plan["multiple"]:
        config.check_resolution(h, w, plan["multiple"], "--res")
    zoom = a.upscale or max(1, -(-256 // max(w, h)))
    if zoom * max(w, h) > MAX_PNG_SIDE:
        raise ValueError(f"--upscale {zoom} makes {w * zoom}x{h * zoom} pixels per image, more than "
                         f"{MAX_PNG_SIDE} per side: use --upscale {max(1, MAX_PNG_SIDE // max(w, h))} or less")
    return {**plan, "steps": steps, "cfg": plan["cfg"] if a.cfg is None else a.cfg, "size": (w, h), "zoom": zoom,
            "out": out_png, "schedule": a.schedule or plan["schedule"], **prompts(a)}


def prompts(a) -> dict:
    """The prompt suffix and the negative prompt. With --weights, the release's (src/infer.py:281-290):
    ".extremely detailed,…" appended with no space, "(face asymmetry, …)" as the negative, unless
    --no-release-prompts; an explicit --negative always wins."""
    release_prompts = bool(a.weights) and not a.no_release_prompts
    negative = release.NEGATIVE_PROMPT if release_prompts else ""
    return {"suffix": release.PROMPT_SUFFIX if release_prompts else "",
            "negative": negative if a.negative is None else a.negative}


def world_note(prompt: str, vocabulary) -> str | None:
    """A one-line note when the prompt uses none of the content words of the checkpoint's training
    captions (its config.json's vocabulary, data.vocabulary): such a prompt still samples, from that world."""
    if not vocabulary or not data.words(prompt) or set(data.words(prompt)) & set(vocabulary):
        return None
    shown = ", ".join(vocabulary[:30]) + (f", … ({len(vocabulary)} words)" if len(vocabulary) > 30 else "")
    return (f"note: this prompt names nothing this checkpoint was trained on (its captions' words: {shown}); "
            "it will draw something of that world. For the authors' text-to-image NAMI-2B use --weights DIR "
            "(README, \"The authors' NAMI-2B\")")


def load(a, plan, device):
    """3. only then the weights: (model, bridge, encoder, autoencoder, info)."""
    if a.weights:
        loaded = release.load(a.weights, device)
    else:
        loaded = checkpoint.load_model(plan["folder"], not a.no_ema, a.text_encoder, a.pooled_encoder, a.vae,
                                       a.size, device)
    model, autoencoder = loaded[0], loaded[3]
    w, h = plan["size"]
    config.check_resolution(h, w, autoencoder.factor * model.cfg.size_multiple, "--res")
    if a.lora:  # refused unless made for this base; then merged and written, or kept as adapters
        weights = "transformer" if a.weights else "model" if a.no_ema else "ema"
        lora.check_base(a.lora_record, a.lora_folder, Path(plan["folder"]), model.cfg, weights)
        lora.apply(model, a.lora_folder, a.lora_record, a.lora_scale)
        if a.merge_lora:
            lora.write_merged(Path(a.merge_lora), lora.merge(model), loaded[1], Path(plan["folder"]), bool(a.weights),
                              {"lora": str(a.lora_folder.resolve()), "scale": a.lora_scale, "base": str(plan["folder"])})
            print(f"wrote {a.merge_lora}: the base with the LoRA merged in (sample it with "
                  f"{'--weights' if a.weights else '--ckpt'} {a.merge_lora})")
    model.to(parallel.sampling_dtype(device))
    return loaded


def picture_of(a, stage_outputs, autoencoder, size, zoom) -> Image.Image:
    """The decoded images (each stage's side by side with --show-stages), as one zoomed grid."""
    w, h = size
    decoded = [autoencoder.decode(x) for x in (stage_outputs if a.show_stages else stage_outputs[-1:])]
    pictures = []
    for i in range(a.n):
        row = [images.to_image(out[i]).resize((w, h), Image.NEAREST) for out in decoded]
        pictures.append(images.grid(row, ncols=len(row), pad=1) if len(row) > 1 else row[0])
    picture = images.grid(pictures, ncols=min(a.n, 8 if a.show_stages else 4)) if a.n > 1 else pictures[0]
    return picture.resize((picture.width * zoom, picture.height * zoom), Image.NEAREST)


def main(argv=None):
    a = parse_args(argv)
    plan = None
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    parallel.use_tf32()
    try:
        plan = settle(a)
        if note := world_note(a.prompt, plan["vocabulary"]):
            print(note)
        model, bridge, encoder, autoencoder, info = load(a, plan, device)
    except (ValueError, FileNotFoundError, ImportError) as e:
        raise SystemExit(f"error: {e}")
    except SafetensorError as e:  # checkpoint.load_checkpoint's weights.safetensors, cut short or overwritten
        raise SystemExit(f"error: {plan['folder']}: a .safetensors file there is damaged ({e}): use another "
                         "checkpoint (--ckpt) or copy it again")
    (w, h), f, steps = plan["size"], autoencoder.factor, plan["steps"]
    print(f"prompt: {a.prompt + plan['suffix']!r}  negative: {plan['negative']!r}  schedule: {plan['schedule']}")
    marks = [time.perf_counter()]
    stage_outputs = nami.generate(model, encoder, [a.prompt + plan["suffix"]] * a.n, range(a.seed, a.seed + a.n),
                                  h // f, w // f, steps, plan["cfg"], plan["negative"], bridge=bridge, flat=a.flat,
                                  schedule=release.SCHEDULES[plan["schedule"]],
                                  on_stage_end=lambda k, x: (parallel.synchronize(device),
                                                             marks.append(time.perf_counter())))
    times = [b - t for t, b in zip(marks[:-1], marks[1:])]
    t0 = time.perf_counter()
    picture = picture_of(a, stage_outputs, autoencoder, (w, h), plan["zoom"])
    label = "flat" if a.flat or plan["K"] == 1 else "stage"
    print("  ".join(f"{label} {i + 1}: {t:.3f}s" for i, t in enumerate(times)) + f"  total: {sum(times):.3f}s"
          f"  (decode {time.perf_counter() - t0:.3f}s)")
    meta = images.png_info({"prompt": a.prompt, "prompt_suffix": plan["suffix"], "negative": plan["negative"],
                            "seed": a.seed, "n": a.n, "steps": steps, "cfg": plan["cfg"], "schedule": plan["schedule"],
                            "sampler": "flat" if a.flat else "nami", "resolution": f"{w}x{h}",
                            "checkpoint": info["folder"], "ema": not a.no_ema,
                            **({"lora": str(a.lora_folder), "lora_scale": a.lora_scale} if a.lora else {})})
    images.save_png(picture, plan["out"], meta)
    print(f"wrote {plan['out']}")


if __name__ == "__main__":
    main()
