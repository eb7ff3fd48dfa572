"""The authors' released NAMI-2B (public repository 360CVGroup/NAMI-T2I): its folder layout, its
settings, and loading it into our model. sample.py --weights uses it.

    DIR/transformer/pytorch_model_fsdp.bin   diffusers FluxTransformer2DModel state dict
    DIR/bridge_flow.bin                      BridgeFlow: scale (2,), shift.0, shift.1
    DIR/vae/  DIR/mt5/                       FLUX VAE, mT5-XXL
    DIR/mclip/tokenizer/  DIR/mclip/clip_text_encoder/   multilingual CLIP (BertTokenizer, BertModel)

Our modules carry the names of diffusers' FluxTransformer2DModel, so its weights load key for key
(`convert_diffusers_flux` only strips wrapper prefixes); `config_from_diffusers` reads the shape
from its config.json. Pickled .bin files are read with weights_only loading: a file that holds
anything but tensors is refused, never run. The release's Euler grid (`grids`) is in training/schedules.py.
"""
from __future__ import annotations

import pickle
from pathlib import Path

import torch
from safetensors import SafetensorError

import nami
from bridgeflow import BridgeFlow
from common import parallel
from common.encoders import TextEncoder, load_autoencoder
from common.files import read_json
from training.checkpoint import load_state, unpickling_refusal
# the release's grid lives in a file of its own, which an exported folder carries (training/export.py)
from training.schedules import SCHEDULES, TRAIN_STEPS, grids, stage_tables  # noqa: F401

LAYOUT = """  DIR/transformer/pytorch_model_fsdp.bin   diffusers FluxTransformer2DModel state dict
                                           (or *.safetensors; config.json optional, else the 2b shape)
  DIR/bridge_flow.bin                      BridgeFlow: scale (2,), shift.0, shift.1
  DIR/vae/                                 diffusers AutoencoderKL (FLUX VAE)
  DIR/mt5/                                 mT5-XXL (transformers folder, tokenizer included)
  DIR/mclip/tokenizer/                     multilingual CLIP's BertTokenizer
  DIR/mclip/clip_text_encoder/             multilingual CLIP's BertModel (or one transformers folder DIR/mclip/)"""
# The release's settings (src/infer.py): stage cut points over the 14 single blocks (paper Table 1:
# 9 : 7 : 6 layers), Euler steps per stage, guidance, image size, text lengths, sampler grid
CUTS, STEPS, GUIDANCE, RESOLUTION = (1, 8, 14), [10, 10, 10], nami.DEFAULT_GUIDANCE, (1024, 1024)
TEXT_LEN, POOLED_LEN, SCHEDULE = 256, 77, "release"
# src/infer.py:281-290: appended to every prompt (no space), and the negative prompt of CFG
PROMPT_SUFFIX = ".extremely detailed,best quality,high quality,perfect composition"
NEGATIVE_PROMPT = "(face asymmetry, eyes asymmetry, deformed eyes, open mouth)"
PARTS = ("transformer", "bridge_flow.bin", "vae", "mt5", "mclip")


def prompts(weights, no_release_prompts: bool = False, negative: str | None = None) -> dict:
    """The prompt suffix and the negative prompt of a sampling run (sample.py). With the release's
    weights, its own (src/infer.py:281-290): PROMPT_SUFFIX appended with no space, NEGATIVE_PROMPT as
    the negative, unless no_release_prompts; an explicit `negative` (--negative) always wins."""
    release_prompts = bool(weights) and not no_release_prompts
    default_negative = NEGATIVE_PROMPT if release_prompts else ""
    return {"suffix": PROMPT_SUFFIX if release_prompts else "",
            "negative": default_negative if negative is None else negative}




def config_from_diffusers(config: dict, cuts=None, window_ratios=(1, 1, 1)) -> nami.NamiConfig:
    """Our NamiConfig for a diffusers FluxTransformer2DModel config.json (its in_channels are the
    packed C·2·2). cuts: the stage cut points over the single blocks; None gives the release's
    for 14 single blocks and K = 3, else evenly spread ones."""
    if config.get("patch_size", 1) != 1:
        raise ValueError(f"expected a FLUX transformer with patch_size 1 over packed 2×2 latents, got {config['patch_size']}")
    n_single, heads = config["num_single_layers"], config["num_attention_heads"]
    if cuts is None:
        K = len(window_ratios)
        cuts = CUTS if n_single == CUTS[-1] and K == len(CUTS) else tuple(
            max(1, round(n_single * k / K)) for k in range(1, K + 1))
    out_channels = config.get("out_channels") or config["in_channels"]
    if out_channels != config["in_channels"] or config["in_channels"] % 4:
        raise ValueError(f"in_channels {config['in_channels']} / out_channels {out_channels}: need equal "
                         "values that are C·4 for 2×2 packed latents")
    return nami.NamiConfig(hidden_size=heads * config["attention_head_dim"], num_heads=heads,
                           depth_double=config["num_layers"], depth_single=n_single, cuts=tuple(cuts),
                           in_channels=config["in_channels"] // 4, patch_size=2,
                           joint_attention_dim=config["joint_attention_dim"],
                           pooled_projection_dim=config["pooled_projection_dim"],
                           axes_dim=tuple(config.get("axes_dims_rope", (16, 56, 56))), window_ratios=window_ratios,
                           guidance_embeds=bool(config.get("guidance_embeds", False)))


def convert_diffusers_flux(state_dict: dict) -> dict:
    """A diffusers FluxTransformer2DModel state dict (the released NAMI-2B layout) in our keys.

    Our modules carry diffusers' names (a guidance-distilled one's time_text_embed.guidance_embedder too),
    so the conversion only strips a wrapper prefix."""
    out = {}
    for key, value in state_dict.items():
        for prefix in ("module.", "transformer.", "_orig_mod."):
            if key.startswith(prefix):
                key = key[len(prefix):]
        out[key] = value
    return out


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
                         f"file holds something else or is not a PyTorch file ({unpickling_refusal(e)}); "
                         "nothing in it was run")
    except (RuntimeError, EOFError, KeyError, ValueError) as e:  # cut short, empty, not a torch file
        raise ValueError(f"{path} is not a readable PyTorch file ({type(e).__name__}: {str(e)[:120]}): "
                         "download or copy it again")
    while isinstance(sd, dict) and len(sd) == 1 and next(iter(sd)) in ("module", "state_dict", "model"):
        sd = next(iter(sd.values()))
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise ValueError(f"{path} holds a {type(sd).__name__}, not a state dict of named tensors")
    return sd


def read_transformer(folder: Path, cuts=None) -> tuple[nami.NamiConfig, dict, list[Path]]:
    """(its NamiConfig, its state dict in our keys, the files read) of a diffusers-format FLUX
    transformer folder: *.safetensors (one file or shards), else *.bin, and config.json (without
    it, the release's 2b shape)."""
    weight_files = sorted(folder.glob("*.safetensors")) or sorted(folder.glob("*.bin"))
    if not weight_files:
        raise FileNotFoundError(f"no *.safetensors or *.bin weights in {folder}; expected layout:\n{LAYOUT}")
    config_file = folder / "config.json"
    if config_file.is_file():
        model_config = config_from_diffusers(read_json(config_file), cuts)
    else:
        model_config = nami.get_config("2b", cuts=cuts or CUTS)
    state = {}
    for file in weight_files:
        state.update(read_state_dict(file))
    read = weight_files + ([config_file] if config_file.is_file() else [])
    return model_config, convert_diffusers_flux(state), read


def load_transformer(folder: Path, cuts=None, device="cpu", dtype=torch.float32) -> nami.Nami:
    """A diffusers-format FLUX transformer folder -> our Nami in `dtype`, built on the meta device and
    filled with the converted tensors, each cast as it is taken (no second copy of 2B parameters)."""
    model_config, state, _ = read_transformer(folder, cuts)  # the model is built on meta below
    for key in list(state):  # one tensor at a time: the file's copy of each goes as its cast arrives
        state[key] = state.pop(key).to(dtype)
    with torch.device("meta"):
        model = nami.Nami(model_config)
    load_state(model, state, f"{folder} (FLUX transformer)", assign=True)
    del state
    return model.to(device).eval().requires_grad_(False)


def load_bridge(path: Path, channels: int, device="cpu") -> BridgeFlow:
    """bridge_flow.bin (keys scale (K−1,), shift.j (1, C, H, W)) -> BridgeFlow at its trained sizes."""
    state = read_state_dict(path)
    shifts = [state[f"shift.{j}"] for j in range(len(state) - 1) if f"shift.{j}" in state]
    if "scale" not in state or not shifts:
        raise ValueError(f"{path} has keys {sorted(state)}; a BridgeFlow file has scale, shift.0, shift.1, ...")
    sizes = [tuple(s.shape[-2:]) for s in shifts]
    per_channel = sizes[0] == (1, 1)
    first = (1, 1) if per_channel else (sizes[0][0] // 2, sizes[0][1] // 2)
    bridge = BridgeFlow(channels, [first] + sizes, per_channel=per_channel)
    load_state(bridge, state, f"{path} (BridgeFlow)")
    return bridge.to(device).eval()


def load(weights, device="cpu"):
    """(model, bridge, encoder, autoencoder, info) from the authors' released folder. The text
    encoders run as the release's (mT5 without a mask, all 256 states; mCLIP's masked CLS state)."""
    root = Path(weights)
    missing = [p for p in PARTS if not (root / p).exists()]
    if missing:
        raise FileNotFoundError(f"{root} lacks {', '.join(missing)}; the released weights are laid out as:\n{LAYOUT}")
    # bf16 on a GPU (parallel.sampling_dtype). The release runs fp16 (src/infer.py:259), relying on
    # diffusers' clipping of fp16 block outputs to ±65504 (transformer_flux.py:102, 204) and on T5's
    # fp16 clamping: bf16 has float32's range, so nothing overflows in our blocks or in mT5-XXL, for
    # 8× coarser rounding (docs/release.md, "What it computes").
    dtype = parallel.sampling_dtype(device)
    model = load_transformer(root / "transformer", None, device, dtype)
    if model.cfg.num_stages != 3:
        raise ValueError(f"expected 3 stages, got {model.cfg.num_stages}")
    bridge = load_bridge(root / "bridge_flow.bin", model.cfg.in_channels, device)
    encoder = TextEncoder(root / "mt5", TEXT_LEN, device, root / "mclip", POOLED_LEN, dtype, pad="unmasked")
    if (encoder.dim, encoder.pooled_dim) != (model.cfg.joint_attention_dim, model.cfg.pooled_projection_dim):
        raise ValueError(f"the encoders give {encoder.dim}/{encoder.pooled_dim}-d states, the transformer wants "
                         f"{model.cfg.joint_attention_dim}/{model.cfg.pooled_projection_dim}")
    autoencoder = load_autoencoder(root / "vae", device)
    if autoencoder.channels != model.cfg.in_channels:
        raise ValueError(f"the VAE has {autoencoder.channels} latent channels, the transformer {model.cfg.in_channels}")
    info = {"folder": str(root), "resolution": RESOLUTION, "steps": STEPS, "cfg": GUIDANCE, "dtype": str(dtype)}
    return model, bridge, encoder, autoencoder, info


def plan(weights) -> dict:
    """What sample.py needs before any weights are read (as checkpoint.plan for our runs): the
    release is K = 3 with 2×2 patches, and its VAE's config sets the pixels per latent cell."""
    root = Path(weights)
    try:
        vae = read_json(root / "vae" / "config.json")
        factor = 2 ** (len(vae["block_out_channels"]) - 1)
    except (OSError, ValueError, KeyError, TypeError):
        factor = None  # load() explains what is missing or wrong
    return {"folder": root, "K": len(CUTS), "multiple": factor and factor * nami.size_multiple(len(CUTS)),
            "resolution": RESOLUTION, "steps": STEPS, "cfg": GUIDANCE, "schedule": SCHEDULE, "vocabulary": None}
