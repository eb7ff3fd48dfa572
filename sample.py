"""Text -> PNG with a trained NAMI checkpoint or the authors' released NAMI-2B: progressive
sampling (paper §3.5).

    python sample.py "a red circle above a blue square"          # newest checkpoint under runs/
    python sample.py "three green squares" -n 8 --seed 1 --out squares.png
    python sample.py "a blue triangle" --show-stages              # each stage's output, like Fig. 3
    python sample.py "a blue triangle" --flat                     # the flat sampler, same total steps
    python sample.py --weights NAMI-T2I/weights "a photo of a cat"  # released NAMI-2B, 1024², 10+10+10, CFG 3

The preset, resolution, text encoders and VAE come from the checkpoint. The PNG's text chunk records
prompt, negative prompt, seed, steps, cfg, sampler and checkpoint; the time of each stage is
printed.
"""
from __future__ import annotations

import argparse
import json
import os
import pickle
import tempfile
import time
from pathlib import Path

import torch
from PIL import Image
from PIL.PngImagePlugin import PngInfo
from safetensors import SafetensorError

import nami
import shapes
from bridgeflow import BridgeFlow
from encoders import TextEncoder, check_prompt, load_autoencoder


def load_model(ckpt, use_ema=True, text_encoder=None, pooled_encoder=None, vae=None, size=None, device="cpu"):
    """(model, bridge, encoder, autoencoder, info) from one of our checkpoint folders (or the
    newest below a folder). The encoders and VAE are the ones the checkpoint records, or local
    copies given by the flags; a copy with another architecture or width is refused."""
    folder, config, parts = nami.load_checkpoint(ckpt)
    for part in ("ema" if use_ema else "model", "bridge"):
        if part not in parts:  # else a KeyError from deep in here
            raise ValueError(f"{folder}/weights.safetensors holds no {part}.* tensors (only {sorted(parts)}): "
                             "the checkpoint is incomplete; use another one (--ckpt)")
    mcfg = nami.NamiConfig.from_dict(config["model"])
    preset = config["train"]["size"]
    if size is not None and size != preset:
        raise ValueError(f"--size {size} asked for, but {folder} holds a {preset!r} checkpoint "
                         f"({mcfg.hidden_size} wide, {mcfg.depth_double}+{mcfg.depth_single} blocks)")
    saved = config["text_encoder"]
    for flag, given, key in (("--text-encoder", text_encoder, "path"), ("--pooled-encoder", pooled_encoder, "pooled_path")):
        path = given or saved.get(key)
        if path and not Path(path).is_dir():
            raise FileNotFoundError(f"{folder} was trained with the encoder at {saved.get(key)}, which is not "
                                    f"here: pass {flag} PATH to a local copy of it")
    encoder = TextEncoder(text_encoder or saved["path"], saved["max_len"], device,
                          pooled_encoder or saved.get("pooled_path"), saved.get("pooled_len", 77),
                          pad=saved.get("pad", "zeros"))
    check_same_encoder(encoder.identity(), saved, folder)
    vae_saved = config.get("vae", {"vae": None})
    autoencoder = load_autoencoder(vae or vae_saved["vae"], device)
    if autoencoder.channels != mcfg.in_channels or autoencoder.identity().get("config") != vae_saved.get("config"):
        raise ValueError(f"{folder} was trained on latents of {vae_saved.get('vae') or 'pixel space'} "
                         f"({mcfg.in_channels} channels); {vae or vae_saved['vae']} is another autoencoder")
    model = nami.Nami(mcfg)
    nami.load_state(model, parts["ema" if use_ema else "model"], f"{folder} ({preset})")
    K, res = mcfg.num_stages, config["resolution"] // autoencoder.factor
    bridge = BridgeFlow(mcfg.in_channels, [(res // 2 ** (K - k),) * 2 for k in range(1, K + 1)])
    nami.load_state(bridge, parts["bridge"], f"{folder} (BridgeFlow)")
    info = {"folder": str(folder), "resolution": (config["resolution"],) * 2, "steps": nami.default_steps(K),
            "cfg": 3.0}
    return model.to(device).eval(), bridge.to(device).eval(), encoder, autoencoder, info


def check_same_encoder(loaded: dict, saved: dict, folder):
    """Refuse a text encoder whose architecture (config) or widths differ from the recorded one:
    the transformer's text projections only make sense for the states they were trained on."""
    for key, what in (("config", "text encoder"), ("dim", "text width"), ("pooled_config", "pooled encoder"),
                      ("pooled_dim", "pooled width"), ("pooled_rule", "pooling rule")):
        if key in saved and loaded.get(key) != saved[key]:
            raise ValueError(f"{folder} was trained with {what} {saved[key]!r} ({saved.get('path')}, pooled: "
                             f"{saved.get('pooled_path') or 'mean of the states'}), the encoder given gives "
                             f"{loaded.get(key)!r}: pass the same encoders (--text-encoder/--pooled-encoder)")


# The authors' release (360CVGroup/NAMI-T2I), SPEC §3-4 and §6
RELEASE_LAYOUT = """  DIR/transformer/pytorch_model_fsdp.bin   diffusers FluxTransformer2DModel state dict
                                           (or *.safetensors; config.json optional, else the 2b shape)
  DIR/bridge_flow.bin                      BridgeFlow: scale (2,), shift.0, shift.1
  DIR/vae/                                 diffusers AutoencoderKL (FLUX VAE)
  DIR/mt5/                                 mT5-XXL (transformers folder, tokenizer included)
  DIR/mclip/                               multilingual CLIP text tower (transformers folder)"""
RELEASE_CUTS, RELEASE_STEPS, RELEASE_CFG, RELEASE_RES = (1, 8, 14), [10, 10, 10], 3.0, (1024, 1024)
RELEASE_TEXT_LEN, RELEASE_POOLED_LEN = 256, 77


def read_state_dict(path: Path) -> dict:
    """Tensors from a .safetensors file, or from a PyTorch pickle with weights_only loading (so a
    file crafted to run code is refused, not executed); DDP/FSDP wrappers are unwrapped."""
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file
        try:
            return load_file(path)
        except SafetensorError as e:
            raise ValueError(f"{path} is not a readable safetensors file ({e}): download or copy it again")
    try:
        try:  # memory-mapped: a 2B state dict is not read into memory twice
            sd = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError:  # files in the legacy (non-zip) format cannot be memory-mapped
            sd = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise ValueError(f"{path} was refused: weights_only loading reads tensors and plain data only, and this "
                         f"file holds something else or is not a PyTorch file ({nami.unpickling_refusal(e)}); "
                         "nothing in it was run")
    except (RuntimeError, EOFError, KeyError, ValueError) as e:  # cut short, empty, not a torch file
        raise ValueError(f"{path} is not a readable PyTorch file ({type(e).__name__}: {str(e)[:120]}): "
                         "download or copy it again")
    while isinstance(sd, dict) and len(sd) == 1 and next(iter(sd)) in ("module", "state_dict", "model"):
        sd = next(iter(sd.values()))
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise ValueError(f"{path} holds a {type(sd).__name__}, not a state dict of named tensors")
    return sd


def load_released_transformer(folder: Path, cuts=None, device="cpu") -> nami.Nami:
    """A diffusers-format FLUX transformer folder -> our Nami, built on the meta device and filled
    with the converted tensors (no second copy of 2B parameters)."""
    files = sorted(folder.glob("*.safetensors")) or sorted(folder.glob("*.bin"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors or *.bin weights in {folder}; expected layout:\n{RELEASE_LAYOUT}")
    config_file = folder / "config.json"
    if config_file.is_file():
        mcfg = nami.config_from_diffusers(json.loads(config_file.read_text()), cuts)
    else:
        mcfg = nami.get_config("2b", cuts=cuts or RELEASE_CUTS)
    state = {}
    for f in files:
        state.update(read_state_dict(f))
    state = {k: v.float() for k, v in nami.convert_diffusers_flux(state).items()}
    with torch.device("meta"):
        model = nami.Nami(mcfg)
    nami.load_state(model, state, f"{folder} (FLUX transformer)", assign=True)
    return model.to(device).eval()


def load_released_bridge(path: Path, channels: int, device="cpu") -> BridgeFlow:
    """bridge_flow.bin (keys scale (K−1,), shift.j (1, C, H, W)) -> BridgeFlow at its trained sizes."""
    state = read_state_dict(path)
    shifts = [state[f"shift.{j}"] for j in range(len(state) - 1) if f"shift.{j}" in state]
    if "scale" not in state or not shifts:
        raise ValueError(f"{path} has keys {sorted(state)}; a BridgeFlow file has scale, shift.0, shift.1, ...")
    sizes = [tuple(s.shape[-2:]) for s in shifts]
    per_channel = sizes[0] == (1, 1)
    first = (1, 1) if per_channel else (sizes[0][0] // 2, sizes[0][1] // 2)
    bridge = BridgeFlow(channels, [first] + sizes, per_channel=per_channel)
    nami.load_state(bridge, state, f"{path} (BridgeFlow)")
    return bridge.to(device).eval()


def load_released(weights, device="cpu"):
    """(model, bridge, encoder, autoencoder, info) from the authors' released folder."""
    root = Path(weights)
    missing = [p for p in ("transformer", "bridge_flow.bin", "vae", "mt5", "mclip") if not (root / p).exists()]
    if missing:
        raise FileNotFoundError(f"{root} lacks {', '.join(missing)}; the released weights are laid out as:\n"
                                f"{RELEASE_LAYOUT}")
    model = load_released_transformer(root / "transformer", None, device)
    if model.cfg.num_stages != 3:
        raise ValueError(f"expected 3 stages, got {model.cfg.num_stages}")
    bridge = load_released_bridge(root / "bridge_flow.bin", model.cfg.in_channels, device)
    dtype = torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
    encoder = TextEncoder(root / "mt5", RELEASE_TEXT_LEN, device, root / "mclip", RELEASE_POOLED_LEN, dtype, pad="encoder")
    if (encoder.dim, encoder.pooled_dim) != (model.cfg.joint_attention_dim, model.cfg.pooled_projection_dim):
        raise ValueError(f"the encoders give {encoder.dim}/{encoder.pooled_dim}-d states, the transformer wants "
                         f"{model.cfg.joint_attention_dim}/{model.cfg.pooled_projection_dim}")
    autoencoder = load_autoencoder(root / "vae", device)
    if autoencoder.channels != model.cfg.in_channels:
        raise ValueError(f"the VAE has {autoencoder.channels} latent channels, the transformer {model.cfg.in_channels}")
    info = {"folder": str(root), "resolution": RELEASE_RES, "steps": RELEASE_STEPS, "cfg": RELEASE_CFG}
    return model, bridge, encoder, autoencoder, info


# Bounds of the command line, far past any sensible use: a value beyond them is a typo, refused
# before anything is loaded rather than ending in an out-of-memory error or a huge file
MAX_IMAGES, MAX_STEPS, MAX_CFG = 256, 1000, 50.0
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


def parse_steps(text):
    try:
        steps = [int(s) for s in text.split(",")]
    except ValueError:
        raise ValueError(f"--steps must be integers separated by commas, e.g. 10,10,10, got {text!r}")
    if min(steps) < 1 or max(steps) > MAX_STEPS:
        raise ValueError(f"--steps {text}: each stage needs between 1 and {MAX_STEPS} Euler steps")
    return steps


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
    if not 1 <= a.n <= MAX_IMAGES:
        raise ValueError(f"-n must be between 1 and {MAX_IMAGES}, got {a.n}")
    if a.cfg is not None and not 0 <= a.cfg <= MAX_CFG:  # NaN fails this too
        raise ValueError(f"--cfg must be between 0 and {MAX_CFG:g} (1 = no guidance), got {a.cfg}")
    if not 0 <= a.seed <= MAX_SEED - a.n:
        raise ValueError(f"--seed must be between 0 and 2**63 − n (image i uses seed + i), got {a.seed}")
    if a.upscale is not None and not 1 <= a.upscale <= MAX_PNG_SIDE:
        raise ValueError(f"--upscale must be a whole zoom factor from 1 to {MAX_PNG_SIDE}, got {a.upscale}")
    check_prompt(a.prompt, "the prompt")
    check_prompt(a.negative, "--negative")
    if a.steps is not None:
        parse_steps(a.steps)
    if a.res:
        parse_res(a.res)


def read_plan(a) -> dict:
    """What sampling needs to know before any weights are read, from the config files alone:
    the checkpoint folder (resolved once, so that a checkpoint written meanwhile is not picked
    up halfway), the number of stages K, the multiple each side of --res must be, and the
    defaults of --res, --steps and --cfg."""
    if a.weights:
        root = Path(a.weights)
        try:  # the release is K = 3 with 2x2 patches; the VAE sets the pixels per latent cell
            vae = json.loads((root / "vae" / "config.json").read_text())
            factor = 2 ** (len(vae["block_out_channels"]) - 1)
        except (OSError, ValueError, KeyError, TypeError):
            factor = None  # load_released explains what is missing or wrong
        return {"folder": root, "K": 3, "multiple": factor and factor * 2 * 2 ** 2, "resolution": RELEASE_RES,
                "steps": RELEASE_STEPS, "cfg": RELEASE_CFG}
    folder = nami.find_checkpoint(a.ckpt)
    try:
        config = json.loads((folder / "config.json").read_text())
        mcfg = nami.NamiConfig.from_dict(config["model"])
        factor = (config.get("vae") or {}).get("factor") or 1  # no VAE: pixel space
        resolution = config["resolution"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{folder}/config.json is missing or damaged ({type(e).__name__}: {e}): "
                         "use another checkpoint (--ckpt) or train one with `python train.py`")
    K = mcfg.num_stages
    return {"folder": folder, "K": K, "multiple": factor * mcfg.size_multiple, "resolution": (resolution,) * 2,
            "steps": nami.default_steps(K), "cfg": 3.0}


def png_info(fields: dict) -> PngInfo:
    r"""PNG text chunks recording how a picture was made: one iTXt chunk (UTF-8) per field, so
    that any prompt is kept as typed, in any script, with emoji and control characters (tEXt
    holds Latin-1 only). The PNG specification allows no NUL in a text chunk, and readers in C
    stop at one, so a NUL is written as U+2400 "␀", the symbol for it: a prompt that had NULs
    comes back with value.replace("\u2400", "\0")."""
    meta = PngInfo()
    for key, value in fields.items():
        meta.add_itxt(key, str(value).replace("\0", "\u2400"))
    return meta


def save_png(picture: Image.Image, out: Path, meta: PngInfo):
    """Write to a temporary file beside `out`, then rename it: an earlier picture at `out` is
    replaced by a complete new one or kept, never left half-written."""
    tmp = out.with_name(f".tmp-{out.name}")
    try:
        picture.save(tmp, format="PNG", pnginfo=meta)
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("prompt", help="the text prompt ('' = unconditional)")
    ap.add_argument("--ckpt", help="checkpoint folder, or a run folder (its newest checkpoint); default: newest under runs/")
    ap.add_argument("--weights", help="the authors' released NAMI-2B folder (layout in README) instead of --ckpt")
    ap.add_argument("--seed", type=int, default=0, help="seed of the first image (image i uses seed+i)")
    ap.add_argument("--steps", default=None,
                    help="Euler steps per stage, e.g. 10,10,10 (default 30 in all: 10 per stage for 3 stages)")
    ap.add_argument("--cfg", type=float, default=None, help="classifier-free guidance scale g (1 = off; default 3)")
    ap.add_argument("--negative", default="", help="negative prompt (the unconditional half of CFG)")
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
    ap.add_argument("--upscale", type=int, default=None, help="nearest-neighbour zoom of the PNG (default: to ≥256 px)")
    a = ap.parse_args(argv)
    try:
        # 1. the flags alone, 2. against the checkpoint's config files, 3. only then load weights
        check_flags(a)
        out_png = check_out(a.out)
        plan = read_plan(a)
        K = plan["K"]
        steps = plan["steps"] if a.steps is None else parse_steps(a.steps)
        if len(steps) != K:
            raise ValueError(f"--steps needs {K} counts between 1 and {MAX_STEPS} (one per stage), got {a.steps}")
        guidance = plan["cfg"] if a.cfg is None else a.cfg
        w, h = parse_res(a.res) if a.res else plan["resolution"]
        if plan["multiple"]:
            nami.check_resolution(h, w, plan["multiple"], "--res")
        zoom = a.upscale or max(1, -(-256 // max(w, h)))
        if zoom * max(w, h) > MAX_PNG_SIDE:
            raise ValueError(f"--upscale {zoom} makes {w * zoom}x{h * zoom} pixels per image, more than "
                             f"{MAX_PNG_SIDE} per side: use --upscale {max(1, MAX_PNG_SIDE // max(w, h))} or less")
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        if a.weights:
            model, bridge, encoder, autoencoder, info = load_released(a.weights, device)
        else:
            model, bridge, encoder, autoencoder, info = load_model(
                plan["folder"], not a.no_ema, a.text_encoder, a.pooled_encoder, a.vae, a.size, device)
        f = autoencoder.factor
        nami.check_resolution(h, w, f * model.cfg.size_multiple, "--res")
    except (ValueError, FileNotFoundError, ImportError) as e:
        raise SystemExit(f"error: {e}")
    except SafetensorError as e:  # nami.load_checkpoint's weights.safetensors, cut short or overwritten
        raise SystemExit(f"error: {plan['folder']}: a .safetensors file there is damaged ({e}): use another "
                         "checkpoint (--ckpt) or copy it again")

    seeds = list(range(a.seed, a.seed + a.n))
    marks = [time.perf_counter()]
    stage_outputs = nami.generate(model, encoder, [a.prompt] * a.n, seeds, h // f, w // f, steps, guidance,
                                  a.negative, bridge=bridge, flat=a.flat, autocast=device.type == "cuda",
                                  on_stage_end=lambda k, x: marks.append(time.perf_counter()))
    times = [b - t for t, b in zip(marks[:-1], marks[1:])]
    label = "flat" if a.flat or K == 1 else "stage"
    t0 = time.perf_counter()
    decoded = [autoencoder.decode(x) for x in (stage_outputs if a.show_stages else stage_outputs[-1:])]
    print("  ".join(f"{label} {i + 1}: {t:.3f}s" for i, t in enumerate(times)) + f"  total: {sum(times):.3f}s"
          f"  (decode {time.perf_counter() - t0:.3f}s)")

    images = []
    for i in range(a.n):
        row = [shapes.to_image(out[i]).resize((w, h), Image.NEAREST) for out in decoded]
        images.append(shapes.grid(row, ncols=len(row), pad=1) if len(row) > 1 else row[0])
    picture = shapes.grid(images, ncols=min(a.n, 8 if a.show_stages else 4)) if a.n > 1 else images[0]
    picture = picture.resize((picture.width * zoom, picture.height * zoom), Image.NEAREST)
    meta = png_info({"prompt": a.prompt, "negative": a.negative, "seed": a.seed, "n": a.n, "steps": steps,
                     "cfg": guidance, "sampler": "flat" if a.flat else "nami", "resolution": f"{w}x{h}",
                     "checkpoint": info["folder"], "ema": not a.no_ema})
    save_png(picture, out_png, meta)
    print(f"wrote {out_png}")


if __name__ == "__main__":
    main()
