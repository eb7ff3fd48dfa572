"""Text -> PNG with a trained NAMI checkpoint: progressive sampling (paper §3.5).

    python sample.py "a red circle above a blue square"          # newest checkpoint under runs/
    python sample.py "three green squares" -n 8 --seed 1 --out squares.png
    python sample.py "a blue triangle" --show-stages              # each stage's output, like Fig. 3
    python sample.py "a blue triangle" --flat                     # the flat sampler, same total steps

The preset, resolution and text encoder come from the checkpoint. The PNG's text chunk records
prompt, negative prompt, seed, steps, cfg, sampler and checkpoint; the time of each stage is
printed.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from PIL import Image
from PIL.PngImagePlugin import PngInfo

import nami
import shapes
from bridgeflow import BridgeFlow


def load_model(ckpt, use_ema=True, text_encoder=None, size=None, device="cpu"):
    """(model, bridge, encoder, config) from a checkpoint folder (or the newest below a folder)."""
    folder, config, parts = nami.load_checkpoint(ckpt)
    mcfg = nami.NamiConfig.from_dict(config["model"])
    preset = config["train"]["size"]
    if size is not None and size != preset:
        raise ValueError(f"--size {size} asked for, but {folder} holds a {preset!r} checkpoint "
                         f"({mcfg.hidden_size} wide, {mcfg.depth_double}+{mcfg.depth_single} blocks)")
    enc_path = text_encoder or config["text_encoder"]["path"]
    if not Path(enc_path).is_dir():
        raise FileNotFoundError(f"{folder} was trained with the text encoder at {enc_path}, which is not "
                                "here: pass --text-encoder PATH to a local copy of it")
    encoder = nami.TextEncoder(enc_path, config["text_encoder"]["max_len"], device)
    if encoder.dim != mcfg.joint_attention_dim:
        raise ValueError(f"text encoder {enc_path} gives {encoder.dim}-d states, but {folder} was trained "
                         f"with {mcfg.joint_attention_dim}-d ones ({config['text_encoder']['path']})")
    model = nami.Nami(mcfg)
    nami.load_state(model, parts["ema" if use_ema else "model"], f"{folder} ({preset})")
    K, res = mcfg.num_stages, config["resolution"]
    bridge = BridgeFlow(mcfg.in_channels, [(res // 2 ** (K - k),) * 2 for k in range(1, K + 1)])
    nami.load_state(bridge, parts["bridge"], f"{folder} (BridgeFlow)")
    return model.to(device).eval(), bridge.to(device).eval(), encoder, {**config, "folder": str(folder)}


def parse_res(text):
    try:
        w, h = (int(v) for v in text.lower().split("x"))
        return w, h
    except ValueError:
        raise ValueError(f"--res must look like WxH, e.g. 32x32, got {text!r}")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("prompt", help="the text prompt ('' = unconditional)")
    ap.add_argument("--ckpt", help="checkpoint folder, or a run folder (its newest checkpoint); default: newest under runs/")
    ap.add_argument("--seed", type=int, default=0, help="seed of the first image (image i uses seed+i)")
    ap.add_argument("--steps", default=None, help="Euler steps per stage, e.g. 10,10,10 (default 10 per stage)")
    ap.add_argument("--cfg", type=float, default=3.0, help="classifier-free guidance scale g (1 = off)")
    ap.add_argument("--negative", default="", help="negative prompt (the unconditional half of CFG)")
    ap.add_argument("--res", help="WxH (default: the training resolution)")
    ap.add_argument("-n", type=int, default=1, help="number of images (several -> one grid)")
    ap.add_argument("--out", default="sample.png", help="output PNG")
    ap.add_argument("--flat", action="store_true",
                    help="the flat baseline sampler (one window, full model, full size) with the same total steps")
    ap.add_argument("--show-stages", action="store_true", help="each stage's output, upsampled, side by side")
    ap.add_argument("--no-ema", action="store_true", help="use the raw weights instead of the EMA")
    ap.add_argument("--text-encoder", help="local text encoder folder (default: the one the checkpoint names)")
    ap.add_argument("--size", help="expected preset; an error if the checkpoint holds another")
    ap.add_argument("--upscale", type=int, default=None, help="nearest-neighbour zoom of the PNG (default: to ≥256 px)")
    a = ap.parse_args(argv)
    try:
        if a.n < 1 or a.n > 256:
            raise ValueError(f"-n must be between 1 and 256, got {a.n}")
        if a.cfg < 0 or a.cfg > 50:
            raise ValueError(f"--cfg must be between 0 and 50, got {a.cfg}")
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        model, bridge, encoder, config = load_model(a.ckpt, not a.no_ema, a.text_encoder, a.size, device)
        K = model.cfg.num_stages
        steps = [10] * K if a.steps is None else [int(s) for s in a.steps.split(",")]
        if len(steps) != K or min(steps) < 1 or max(steps) > 1000:
            raise ValueError(f"--steps needs {K} counts between 1 and 1000 (one per stage), got {a.steps}")
        w, h = parse_res(a.res) if a.res else (config["resolution"],) * 2
        nami.check_resolution(h, w, model.cfg.size_multiple, "--res")
    except (ValueError, FileNotFoundError) as e:
        raise SystemExit(f"error: {e}")

    seeds = list(range(a.seed, a.seed + a.n))
    marks = [time.perf_counter()]
    stage_outputs = nami.generate(model, encoder, [a.prompt] * a.n, seeds, h, w, steps, a.cfg, a.negative,
                                  bridge=bridge, flat=a.flat, autocast=device.type == "cuda",
                                  on_stage_end=lambda k, x: marks.append(time.perf_counter()))
    times = [b - t for t, b in zip(marks[:-1], marks[1:])]
    label = "flat" if a.flat or K == 1 else "stage"
    print("  ".join(f"{label} {i + 1}: {t:.3f}s" for i, t in enumerate(times)) + f"  total: {sum(times):.3f}s")

    images = []
    for i in range(a.n):
        row = [shapes.to_image(out[i]).resize((w, h), Image.NEAREST)
               for out in (stage_outputs if a.show_stages else stage_outputs[-1:])]
        images.append(shapes.grid(row, ncols=len(row), pad=1) if len(row) > 1 else row[0])
    picture = shapes.grid(images, ncols=min(a.n, 8 if a.show_stages else 4)) if a.n > 1 else images[0]
    zoom = a.upscale or max(1, -(-256 // max(w, h)))
    picture = picture.resize((picture.width * zoom, picture.height * zoom), Image.NEAREST)
    info = PngInfo()
    for key, value in {"prompt": a.prompt, "negative": a.negative, "seed": a.seed, "n": a.n, "steps": steps,
                       "cfg": a.cfg, "sampler": "flat" if a.flat else "nami", "resolution": f"{w}x{h}",
                       "checkpoint": config["folder"], "ema": not a.no_ema}.items():
        info.add_text(key, str(value))
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    picture.save(a.out, pnginfo=info)
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
