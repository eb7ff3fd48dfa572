"""The first weights of a new run: `train.py --init-from PATH` (docs/fine-tuning.md). The run is new (fresh
optimizer, lr schedule with the fine-tuning warm-up of config.warmup_plan, step 0, its own flags);
only its weights come from PATH, which is one of

    our checkpoint      RUN/ (its newest ckpt-N) or RUN/ckpt-N/: the EMA weights (--init-from-raw:
                        the raw ones) and the BridgeFlow maps
    the authors' release DIR/transformer/ and DIR/bridge_flow.bin (release.LAYOUT): NAMI-2B, its maps
    an exported folder  a diffusers folder of python -m training.export (docs/export.md): its weights and maps
    a flat transformer  a diffusers FluxTransformer2DModel folder (config.json and weights), or one
                        of our --mode flat runs. Algorithm 1 from its weights makes it progressive;
                        BridgeFlow is pre-trained as for a new model (paper §3.3)

    python train.py --init-from runs/shapes-small-flat --out runs/converted      # flat -> NAMI
    python train.py --size 2b --init-from NAMI-2B --cache CACHE ...               # docs/fine-tuning.md

The transformer must have this run's shape (preset, encoder widths, latent channels); cut points
and time windows may differ, they are not in the weights. BridgeFlow comes from the source when
the source was trained for this run's time windows, each bias map resized bilinearly to this run's
stage sizes when they differ (docs/method.md §4); otherwise it is pre-trained. Files are read
without running code (safetensors, or pickles with weights_only), every tensor's name and shape is
checked before one is copied, and config.json records the source: its path, step, which weights,
where BridgeFlow came from and the sha256 of every file read.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError

import nami
from bridgeflow import resize_bias
from common import files, parallel
from training import checkpoint, diffusers_folder, release

# The fields of NamiConfig that fix the shapes of the weights (cuts and windows do not)
SHAPE = ("hidden_size", "num_heads", "depth_double", "depth_single", "in_channels", "patch_size",
         "joint_attention_dim", "pooled_projection_dim", "axes_dim", "mlp_ratio", "guidance_embeds")
LAYOUTS = ("one of our checkpoints (RUN/ or RUN/ckpt-N/ with weights.safetensors), the authors' release "
           "(DIR/transformer/ and DIR/bridge_flow.bin), a diffusers FluxTransformer2DModel folder "
           "(config.json and *.safetensors or *.bin) or a folder of python -m training.export (model_index.json)")


@dataclass
class Source:
    """What --init-from found: the transformer's tensors in our names, BridgeFlow's (None for a
    flat model), and what config.json records about them."""
    kind: str                      # "checkpoint", "release", "diffusers" (a FLUX transformer) or "export"
    folder: Path
    model_config: nami.NamiConfig
    transformer: dict
    bridge: dict | None
    read: list = field(default_factory=list)  # the files the tensors came from
    step: int | None = None
    weights: str = "transformer"   # ours: "ema" or "model"
    recorded: dict | None = None   # ours: its config.json (encoders, VAE)


def read_source(path, raw: bool = False) -> Source:
    """The weights in PATH, read without running code (release.read_state_dict,
    checkpoint.load_checkpoint); FileNotFoundError naming the layouts when PATH holds none."""
    root = Path(path)
    if diffusers_folder.holds(root):
        return exported(root, raw)
    if (root / "weights.safetensors").is_file() or checkpoint.latest_checkpoint(root) is not None:
        return our_checkpoint(root, raw)
    if raw:
        raise ValueError(f"--init-from-raw: {root} is not one of our checkpoints, it holds one set of weights")
    if (root / "transformer").is_dir() and (root / "bridge_flow.bin").is_file():
        model_config, transformer, read = release.read_transformer(root / "transformer")
        bridge = release.load_bridge(root / "bridge_flow.bin", model_config.in_channels).state_dict()
        return Source("release", root, model_config, transformer, bridge, read + [root / "bridge_flow.bin"])
    if (root / "config.json").is_file() and "num_single_layers" in files.read_json(root / "config.json"):
        model_config, transformer, read = release.read_transformer(root)
        return Source("diffusers", root, model_config, transformer, None, read)
    raise FileNotFoundError(f"--init-from {root} holds no weights we read: give {LAYOUTS}")


def our_checkpoint(root: Path, raw: bool) -> Source:
    """A run folder's newest checkpoint, or a checkpoint folder: its EMA (or raw) weights and BridgeFlow."""
    try:
        folder, saved, parts = checkpoint.load_checkpoint(root)
    except SafetensorError as e:  # cut short, or not a safetensors file (a pickle renamed): nothing was run
        raise ValueError(f"--init-from {root}: a weights.safetensors there is damaged ({e}): use another checkpoint")
    weights = "model" if raw else "ema"
    checkpoint.not_adapters(saved, folder, "merge it into its base first (python sample.py --lora "
                            f"{folder} --merge-lora OUT \"...\"), then --init-from OUT")
    try:
        model_config = nami.NamiConfig.from_dict(saved["model"])
    except (KeyError, TypeError) as e:
        raise ValueError(f"{folder}/config.json is damaged ({type(e).__name__}: {e}): use another checkpoint")
    if weights not in parts:
        raise ValueError(f"{folder}/weights.safetensors holds no {weights}.* tensors (only {sorted(parts)})")
    bridge = parts.get("bridge") if model_config.num_stages > 1 else None  # a flat run's has no jumps
    return Source("checkpoint", folder, model_config, parts[weights], bridge,
                  [folder / "weights.safetensors", folder / "config.json"], saved.get("step"), weights, saved)


def exported(root: Path, raw: bool) -> Source:
    """A diffusers folder of python -m training.export (training/diffusers_folder.py reads it): its one set of weights
    and BridgeFlow, and the encoders and VAE of one of our runs to compare; a release's export is taken as the
    release is, its text settings not compared (check_source)."""
    if raw:
        raise ValueError(f"--init-from-raw: {root} is an exported folder, it holds one set of weights")
    folder, saved, parts = checkpoint.load_checkpoint(root)
    model_config = nami.NamiConfig.from_dict(saved["model"])
    release_export = (saved.get("exported_from") or {}).get("kind") == "release"
    return Source("export", folder, model_config, parts["model"], parts["bridge"] if model_config.num_stages > 1 else None,
                  diffusers_folder.files(folder), saved.get("step"), "transformer", None if release_export else saved)


def describe(c: nami.NamiConfig) -> str:
    return (f"width {c.hidden_size}, {c.num_heads} heads, {c.depth_double} double + {c.depth_single} single blocks, "
            f"{c.in_channels} latent channels, text {c.joint_attention_dim}-d, pooled {c.pooled_projection_dim}-d")


def check_source(source: Source, model_config: nami.NamiConfig, run_record: dict):
    """The source's transformer has this run's shape (else both shapes named), and one of our
    checkpoints was trained with this run's encoders and autoencoder (its text projections fit
    only their states)."""
    differ = [name for name in SHAPE if getattr(source.model_config, name) != getattr(model_config, name)]
    if differ:
        preset = ((source.recorded or {}).get("train") or {}).get("size")
        raise ValueError(
            f"--init-from {source.folder} holds a transformer of {describe(source.model_config)}"
            f"{f' (--size {preset})' if preset else ''}; this run builds "
            f"{describe(model_config)} (--size {run_record['train']['size']}, the widths of its encoders, the channels "
            f"of its autoencoder). They differ in {', '.join(differ)}: pass the preset and encoders of the source")
    recorded = source.recorded or {}
    for part, keys, flags in (("text_encoder", ("config", "pooled_config", "pooled_rule", "pad"),
                               "--text-encoder/--pooled-encoder"), ("vae", ("config",), "--vae")):
        theirs, mine = recorded.get(part) or {}, run_record.get(part) or {}
        differ = [k for k in keys if k in theirs and theirs[k] != mine.get(k)]
        if differ:
            raise ValueError(f"{source.folder} was trained with {part} {theirs.get('path') or theirs.get('vae')} and "
                             f"this run uses {mine.get('path') or mine.get('vae')} ({', '.join(differ)} differ): pass "
                             f"the same {flags} as the source")


def mismatch_report(own: dict, given: dict, limit: int = 8) -> str:
    """Every name of `given` that does not fit a module's {name: shape}, by kind ('' if none)."""
    missing, extra, shape = checkpoint.key_mismatches(own, given)

    def names(keys):
        return ", ".join(keys[:limit]) + (f" and {len(keys) - limit} more" if len(keys) > limit else "")
    shape = [f"{k} {tuple(given[k].shape)} for {tuple(own[k])}" for k in shape]
    return "; ".join(f"{len(keys)} {kind} ({names(keys)})" for kind, keys in
                     (("missing", missing), ("unexpected", extra), ("of another shape", shape)) if keys)


@torch.no_grad()
def fill(module: torch.nn.Module, state_dict: dict, what: str):
    """Copy a state dict that matches every name and shape of a module's parameters into them, one
    parameter at a time (under FSDP2 each rank copies its own shard: parallel.fill_shard)."""
    report = mismatch_report({name: p.shape for name, p in module.named_parameters()}, state_dict)
    if report:
        raise ValueError(f"{what} does not fit this run's model, nothing was loaded: {report}")
    for name, value in state_dict.items():
        parallel.fill_shard(module.get_parameter(name), value)


@torch.no_grad()
def take_bridge(source: Source, bridge, model_config: nami.NamiConfig) -> tuple[bool, str]:
    """The source's BridgeFlow maps into this run's when they were trained for its time windows,
    each bias map resized bilinearly to this run's stage size when it differs (docs/method.md §4).
    (taken, what config.json says)."""
    if model_config.num_stages == 1:
        return False, "none (a flat run has no jumps)"
    if source.bridge is None:
        return False, "pre-trained in this run (the source is a flat model)"
    windows = source.model_config.window_ratios, source.model_config.gamma
    if windows != (model_config.window_ratios, model_config.gamma):
        return False, (f"pre-trained in this run (the source's maps are for the time windows "
                       f"{windows[0]}, this run's are {model_config.window_ratios})")
    own = dict(bridge.named_parameters())
    if set(source.bridge) != set(own) or any(source.bridge[k].shape[:2] != own[k].shape[:2] for k in own):
        def shapes(tensors):
            return ", ".join(f"{k} {tuple(v.shape)}" for k, v in sorted(tensors.items()))
        raise ValueError(f"{source.folder}: its BridgeFlow tensors ({shapes(source.bridge)}) do not fit this run's "
                         f"({shapes(own)}), whose bias maps may differ in size only")
    own["scale"].copy_(source.bridge["scale"])
    sizes = []  # (the source's, this run's) side of each bias map
    for j, shift in enumerate(bridge.shift):
        value = source.bridge[f"shift.{j}"].float()
        shift.copy_(resize_bias(value, shift.shape[-2:]))
        sizes.append((tuple(value.shape[-2:]), tuple(shift.shape[-2:])))
    if all(given == wanted for given, wanted in sizes):
        return True, "from the source"
    return True, "from the source, bias maps resized bilinearly (" + ", ".join(
        f"{given[0]}x{given[1]} -> {wanted[0]}x{wanted[1]}" for given, wanted in sizes) + ")"


def load(cfg, model, ema, bridge, run) -> bool:
    """Fill a new run's model, EMA and BridgeFlow from cfg.init_from (nothing without it) and record
    the source in run.record (config.json); True when BridgeFlow came from the source, so that it is
    not pre-trained. Every rank reads the files and fills its own shards."""
    if not cfg.init_from:
        return False
    source = read_source(cfg.init_from, cfg.init_from_raw)
    check_source(source, model.cfg, run.record)
    what = f"{source.folder} ({source.kind}, {source.weights})"
    fill(model, source.transformer, what)
    if ema is not None:  # a LoRA run's EMA is made later, sharing the base (lora.ema_of)
        fill(ema, source.transformer, what)
    taken, bridge_note = take_bridge(source, bridge, model.cfg)
    run.record["init_from"] = {
        "path": str(source.folder.resolve()), "kind": source.kind, "step": source.step, "weights": source.weights,
        "bridge": bridge_note,
        "sha256": {str(f.relative_to(source.folder)): files.sha256(f) for f in source.read} if run.main else {}}
    if run.main:
        step = f" at step {source.step}" if source.step is not None else ""
        print(f"--init-from {source.folder} ({source.kind}{step}): {source.weights} weights; BridgeFlow {bridge_note}")
        if source.kind == "release" and run.record["text_encoder"].get("pad") != "unmasked":
            print("note: the release runs mT5 without a mask and keeps all its states; this run's text states are "
                  "masked and zero-padded (docs/method.md §3), which the transformer adapts to as it trains")
    return taken
