"""LoRA (Hu et al., 2021) on the NAMI transformer with `peft`: fine-tuning a large base (the released
NAMI-2B, docs/fine-tuning.md) on one GPU by training low-rank adapters W + (α/r)·B·A on
its linear layers while every base weight stays frozen.

    python train.py --init-from runs/shapes-toy --lora 8 --out runs/lora-toy ...   # train adapters
    python sample.py --lora runs/lora-toy "a circle"                             # sample with them
    python sample.py --lora runs/lora-toy --merge-lora runs/merged "a circle"    # bake them in
    python -m training.lora plan --size 2b --rank 16                                      # docs/fine-tuning.md

A LoRA run's checkpoints hold the adapters alone: `pytorch_lora_weights.safetensors` in the layout
of diffusers' FLUX LoRAs (peft keys prefixed `transformer.`, the EMA adapters, what sampling uses),
beside config.json, whose "lora" entry names the rank, α, targets and the base: its folder and the
sha256 of every file its weights were read from. A LoRA is applied only to that base.
"""
from __future__ import annotations

import argparse
import copy
from pathlib import Path

import torch
import torch.nn as nn

import nami
from common import files
from training import diffusers_folder
from training.init_from import SHAPE, describe  # the fields that fix a transformer's shape, and their wording

FILE = "pytorch_lora_weights.safetensors"
PREFIX = "transformer."  # diffusers' prefix for the transformer's LoRA keys
# diffusers' default for FLUX LoRAs (examples/dreambooth/train_dreambooth_lora_flux.py): the
# attention projections of the image and the text stream, their output projections, both MLPs.
# Suffixes of module names, matched as peft does: name == target or name ends with "." + target
# ("attn.to_q" also takes the single blocks' query projection).
DEFAULT_TARGETS = ("attn.to_k", "attn.to_q", "attn.to_v", "attn.to_out.0", "attn.add_k_proj", "attn.add_q_proj",
                   "attn.add_v_proj", "attn.to_add_out", "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj",
                   "ff_context.net.2")


def require_peft():
    try:
        import peft
    except ImportError:
        raise ImportError("--lora needs the peft package: pip install peft (docs/fine-tuning.md)")
    return peft


def is_adapter(name: str) -> bool:
    return ".lora_A." in name or ".lora_B." in name


def targeted(model: nn.Module, targets) -> list[str]:
    """The linear layers that the targets name; ValueError naming a target that matches none."""
    linears = [name for name, m in model.named_modules() if isinstance(m, nn.Linear)]
    for target in targets:
        if not any(name == target or name.endswith("." + target) for name in linears):
            raise ValueError(f"--lora-targets: {target!r} names no linear layer of the transformer (they are named "
                             f"as diffusers' FLUX: {', '.join(DEFAULT_TARGETS)}, proj_mlp, proj_out, ...)")
    return [name for name in linears if any(name == t or name.endswith("." + t) for t in targets)]


def settings(rank: int, alpha: float | None = None, targets=None) -> dict:
    """What config.json records of a LoRA: rank r, α (default r: scale α/r = 1) and the targets."""
    return {"rank": int(rank), "alpha": float(rank if alpha is None else alpha),
            "targets": list(targets or DEFAULT_TARGETS)}


def attach(model: nn.Module, lora: dict) -> nn.Module:
    """peft LoRA layers on the targeted linears (B = 0: the model is unchanged until trained); every
    other weight frozen. Returns the same model, its trainable parameters the adapters alone."""
    peft = require_peft()
    targeted(model, lora["targets"])
    peft.inject_adapter_in_model(peft.LoraConfig(r=lora["rank"], lora_alpha=lora["alpha"],
                                                 target_modules=list(lora["targets"])), model)
    for name, param in model.named_parameters():
        param.requires_grad_(is_adapter(name))
        if is_adapter(name):  # peft makes adapters in the base's dtype; AdamW and the EMA need float32, where
            param.data = param.data.float()  # a step of 1e-4 of a weight does not round away (as diffusers' scripts)
    return model


def ema_of(model: nn.Module) -> nn.Module:
    """The EMA model of a LoRA run: a copy of the model that shares its frozen base (no second copy
    of 2B weights) and has its own adapters, which train.update_ema averages."""
    shared = {id(p): p for name, p in model.named_parameters() if not is_adapter(name)}
    ema = copy.deepcopy(model, memo=shared)
    return ema.requires_grad_(False)


def adapters(module: nn.Module) -> dict:
    """The adapter tensors of a model, by its own (peft) parameter names."""
    return {name: value for name, value in module.state_dict().items() if is_adapter(name)}


def write_adapters(folder: Path, tensors: dict):
    """Adapters (peft names, e.g. a checkpoint's EMA ones) as FILE in diffusers' layout:
    transformer.<module>.lora_A.weight / .lora_B.weight (read_tensors reads them back)."""
    from safetensors.torch import save_file
    save_file({PREFIX + k.replace(".default.", "."): v.detach().contiguous() for k, v in tensors.items()},
              folder / FILE, metadata={"format": "pt"})


def adapter_parameters(module: nn.Module) -> list[nn.Parameter]:
    return [p for name, p in module.named_parameters() if is_adapter(name)]


def set_scale(model: nn.Module, scale: float):
    """Scale every adapter's contribution: W + scale·(α/r)·B·A. At 0 the adapters are switched off:
    the base runs alone, its own computation bit for bit, without the adapters' matrix products."""
    for module in model.modules():
        if hasattr(module, "set_scale") and hasattr(module, "lora_A"):
            module.enable_adapters(scale != 0)
            module.set_scale("default", scale)


def merge(model: nn.Module) -> nn.Module:
    """W ← W + (α/r)·B·A in every adapted layer, each layer replaced by its base linear: a plain
    model that sampling reads without peft."""
    for name, module in list(model.named_modules()):
        if hasattr(module, "merge") and hasattr(module, "get_base_layer"):
            module.merge()
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, child, module.get_base_layer())
    return model


# ----------------------------------------------------------------------------------------------
# A saved LoRA: its record, its base, its tensors
# ----------------------------------------------------------------------------------------------

def find(path) -> Path:
    """The folder holding pytorch_lora_weights.safetensors: PATH itself, or a LoRA run's newest ckpt-N."""
    root = Path(path)
    if (root / FILE).is_file():
        return root
    held = sorted(root.glob(f"ckpt-*/{FILE}")) if root.is_dir() else []
    if not held:
        raise FileNotFoundError(f"--lora {root}: no {FILE} there or in a ckpt-N/ below it: give a LoRA run folder "
                                "(train.py --lora) or one of its checkpoints")
    return held[-1].parent


def record(folder: Path) -> dict:
    """config.json's "lora" entry ({rank, alpha, targets, base}) and the model config it was made for."""
    try:
        saved = files.read_json(folder / "config.json")
        entry, model = saved["lora"], saved["model"]
        base = entry["base"]
        ok = isinstance(base.get("sha256"), dict) and isinstance(base.get("path"), str)
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise ValueError(f"{folder}/config.json is missing or has no LoRA record ({type(e).__name__}: {e}): "
                         "give a folder written by train.py --lora")
    if not ok:
        raise ValueError(f"{folder}/config.json: its LoRA record names no base weights (path and sha256)")
    return {**entry, "model": model}


def check_base(lora: dict, folder: Path, base_folder: Path, model_cfg: nami.NamiConfig, weights: str):
    """A LoRA fits only the base it was trained on: the same shape (else both named), the same part
    of one of our checkpoints (EMA or raw), and the same bytes in every file its weights came from."""
    made_for = nami.NamiConfig.from_dict(lora["model"])
    if any(getattr(made_for, name) != getattr(model_cfg, name) for name in SHAPE):
        raise ValueError(f"the LoRA in {folder} was made for a transformer of {describe(made_for)}; the base "
                         f"{base_folder} is one of {describe(model_cfg)}")
    base = lora["base"]
    if base.get("weights", "transformer") not in (weights, "transformer"):
        raise ValueError(f"the LoRA in {folder} was trained on the {base['weights']} weights of {base['path']}; "
                         f"this sampling uses its {weights} weights" + (" (leave out --no-ema)" if weights == "model"
                                                                         else " (add --no-ema)"))
    for name, digest in base["sha256"].items():
        path = base_folder / name
        if not path.is_file() or files.sha256(path) != digest:
            found = files.sha256(path)[:12] if path.is_file() else "no such file"
            raise ValueError(f"the LoRA in {folder} was trained on the base {base['path']} ({name}: sha256 "
                             f"{digest[:12]}…); {base_folder} is another ({found}): sample it on its own base, "
                             "given by --ckpt or --weights")


def read_tensors(folder: Path) -> dict:
    """The adapters of pytorch_lora_weights.safetensors, in peft's names. Safetensors holds tensors
    only: nothing in the file can run."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file
    try:
        tensors = load_file(folder / FILE)
    except SafetensorError as e:
        raise ValueError(f"{folder / FILE} is not a readable safetensors file ({e}): copy it again")
    odd = [k for k in tensors if not (k.startswith(PREFIX) and is_adapter("." + k.split(".", 1)[-1]))]
    if odd:
        raise ValueError(f"{folder / FILE} holds {odd[0]!r}, not a LoRA tensor transformer.<layer>.lora_A/B.weight")
    return {k[len(PREFIX):]: v for k, v in tensors.items()}


def apply(model: nn.Module, folder: Path, lora: dict, scale: float = 1.0) -> nn.Module:
    """The saved adapters on a base model (already checked by check_base), at `scale`."""
    peft = require_peft()
    attach(model, lora)
    tensors = read_tensors(folder)
    own = {k.replace(".default.", "."): v.shape for k, v in adapters(model).items()}
    wrong = sorted(set(own) ^ set(tensors)) + [k for k in own if k in tensors and own[k] != tensors[k].shape]
    if wrong:
        raise ValueError(f"{folder / FILE} does not fit rank {lora['rank']} adapters on {lora['targets']} "
                         f"({len(wrong)} tensors differ in name or shape, e.g. {wrong[0]!r})")
    device = next(model.parameters()).device
    peft.set_peft_model_state_dict(model, {k: v.to(device) for k, v in tensors.items()})
    set_scale(model, scale)
    return model.requires_grad_(False)


def write_merged(out: Path, model: nn.Module, bridge: nn.Module, base_folder: Path, release: bool, note: dict):
    """A merged model in its base's layout, loadable without peft: one of our checkpoint folders
    (weights.safetensors with model., ema. and bridge. tensors, the base's config.json noting the
    merge), or the release's layout with the merged transformer/ and links to the base's other parts."""
    import json
    import shutil
    from safetensors.torch import save_file
    weights = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    out.mkdir(parents=True)
    if release:
        (out / "transformer").mkdir()
        save_file(weights, out / "transformer" / "diffusion_pytorch_model.safetensors")
        if (base_folder / "transformer" / "config.json").is_file():
            shutil.copy(base_folder / "transformer" / "config.json", out / "transformer" / "config.json")
        for part in ("bridge_flow.bin", "vae", "mt5", "mclip"):
            (out / part).symlink_to((base_folder / part).resolve())
        (out / "merged_lora.json").write_text(json.dumps(note, indent=2))
        return
    tensors = {f"model.{k}": v for k, v in weights.items()}
    tensors.update({f"ema.{k}": v.clone() for k, v in weights.items()})
    tensors.update({f"bridge.{k}": v.detach().contiguous() for k, v in bridge.state_dict().items()})
    save_file(tensors, out / "weights.safetensors")
    saved = diffusers_folder.record(base_folder) if diffusers_folder.holds(base_folder) else files.read_json(
        base_folder / "config.json")  # an exported base (training/export.py): the record it is read back with
    (out / "config.json").write_text(json.dumps({**saved, "merged_lora": note}, indent=2))


def apply_to_base(model: nn.Module, bridge: nn.Module, folder: Path, lora: dict, scale: float, base_folder: Path,
                  weights: str, merge_into: str | None = None) -> nn.Module:
    """sample.py --lora: the adapters in `folder` on the loaded base `model` (its `weights`: "transformer"
    of the release, "ema" or "model" of one of our checkpoints), refused unless made for this base
    (check_base), at `scale`; with --merge-lora also merged in and written with the bridge to the new
    folder `merge_into`, in the base's layout (write_merged). Either way `model` samples with the LoRA."""
    check_base(lora, folder, base_folder, model.cfg, weights)
    apply(model, folder, lora, scale)
    if merge_into:
        release = weights == "transformer"
        write_merged(Path(merge_into), merge(model), bridge, base_folder, release,
                     {"lora": str(folder.resolve()), "scale": scale, "base": str(base_folder)})
        print(f"wrote {merge_into}: the base with the LoRA merged in (sample it with "
              f"{'--weights' if release else '--ckpt'} {merge_into})")
    return model


# ----------------------------------------------------------------------------------------------
# The memory of a LoRA run on one GPU, counted on the meta device: python -m training.lora plan
# ----------------------------------------------------------------------------------------------

class FlashAttention(torch.autograd.Function):
    """What a fused attention kernel (FlashAttention, memory-efficient SDPA) keeps for its backward:
    q, k, v, the output and one float32 log-sum-exp per query and head, never the L×L weights. The
    meta device would otherwise count SDPA's math fallback, which does keep them."""

    @staticmethod
    def forward(ctx, q, k, v):
        out = torch.empty_like(q)
        ctx.save_for_backward(q, k, v, out, q.new_empty(q.shape[:-1], dtype=torch.float32))
        return out

    @staticmethod
    def backward(ctx, grad):
        q, k, v, *_ = ctx.saved_tensors
        return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def saved_bytes(model: nn.Module, latent: int, text_len: int, batch: int) -> tuple[int, int]:
    """(bytes kept for backward, the largest block's share) by one forward of the full model at a
    latent side (the last stage of Algorithm 1, the largest), each storage counted once."""
    import torch.nn.functional as F
    cfg, kept, per_block = model.cfg, {}, []
    weights = {p.untyped_storage()._cdata for p in model.parameters()}  # kept anyway: counted as the base

    def pack(t):
        storage = t.untyped_storage()
        if storage._cdata not in weights:
            kept.setdefault(storage._cdata, (t, storage.nbytes()))
        return t

    def block_hook(module, args, output):
        per_block.append(sum(n for _, n in kept.values()) - sum(per_block))
    hooks = [b.register_forward_hook(block_hook) for b in [*model.transformer_blocks, *model.single_transformer_blocks]]
    sdpa, F.scaled_dot_product_attention = F.scaled_dot_product_attention, lambda q, k, v: FlashAttention.apply(q, k, v)
    try:
        with torch.device("meta"), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            x = torch.empty(batch, cfg.in_channels, latent, latent, dtype=torch.bfloat16)
            model(x, torch.rand(batch), torch.empty(batch, text_len, cfg.joint_attention_dim, dtype=torch.bfloat16),
                  torch.empty(batch, cfg.pooled_projection_dim, dtype=torch.bfloat16), None,
                  torch.rand(batch) if cfg.guidance_embeds else None)
    finally:
        F.scaled_dot_product_attention = sdpa
        for h in hooks:
            h.remove()
    return sum(n for _, n in kept.values()), max(per_block)


def memory_plan(size: str = "2b", rank: int = 16, resolution: int = 1024, vae_factor: int = 8, text_len: int = 256,
                batch: int = 1) -> dict:
    """GiB of each part of a LoRA run on one GPU: the bf16 base, the fp32 adapters with their
    gradients, AdamW moments and EMA, and the activations of one micro-batch at the last stage."""
    with torch.device("meta"):
        # bf16 throughout, as autocast computes (the adapters' fp32 weights are counted below)
        model = attach(nami.Nami(nami.get_config(size)), settings(rank)).to(torch.bfloat16)
    adapter = sum(p.numel() for p in adapter_parameters(model))
    base = sum(p.numel() for n, p in model.named_parameters() if not is_adapter(n))
    model.checkpointing = False
    whole, largest = saved_bytes(model, resolution // vae_factor, text_len, batch)
    model.checkpointing = True  # each block keeps its inputs alone; backward recomputes one block at a time
    inputs, _ = saved_bytes(model.train(), resolution // vae_factor, text_len, batch)
    gib = 1 / 2 ** 30
    return {"base_params": base, "adapter_params": adapter, "base_gib": base * 2 * gib,
            "adapters_gib": adapter * (4 + 4 + 8 + 4) * gib,  # fp32 weight, gradient, two AdamW moments, EMA
            "activations_gib": whole * gib, "checkpointed_gib": (inputs + largest) * gib}


OVERHEAD_GIB = 1.5  # CUDA context and kernels, the VAE (decoding sample grids), the allocator's slack: an estimate
GPUS_GIB = (16, 24, 48, 80)


def plan_table(size: str, rank: int, resolutions, text_len: int = 256) -> str:
    """docs/fine-tuning.md's table: each part's memory, and the samples per micro-batch that fit each GPU."""
    rows = ["| | " + " | ".join(f"{r}², {how}" for r in resolutions for how in ("plain", "checkpointed")) + " |",
            "|---|" + "---|" * 2 * len(resolutions)]
    plans = [memory_plan(size, rank, r, text_len=text_len) for r in resolutions]
    fixed = [p["base_gib"] + p["adapters_gib"] + OVERHEAD_GIB for p in plans]
    cells = [(p, f) for p, f in zip(plans, fixed)]
    rows.append("| bf16 base + fp32 adapters, grads, AdamW, EMA + overhead (GiB) | " + " | ".join(
        f"{p['base_gib']:.2f} + {p['adapters_gib']:.2f} + {OVERHEAD_GIB}" for p, _ in cells for _ in range(2)) + " |")
    rows.append("| activations per sample at the last stage (GiB) | " + " | ".join(
        f"{p[key]:.2f}" for p, _ in cells for key in ("activations_gib", "checkpointed_gib")) + " |")
    for gpu in GPUS_GIB:
        rows.append(f"| samples per micro-batch on {gpu} GB | " + " | ".join(
            str(max(0, int((gpu * 1e9 / 2 ** 30 - f) // p[key]))) for p, f in cells
            for key in ("activations_gib", "checkpointed_gib")) + " |")
    head = plans[0]
    return (f"{size}, rank {rank}: {head['base_params'] / 1e9:.2f} B base parameters, "
            f"{head['adapter_params'] / 1e6:.1f} M adapter parameters\n\n" + "\n".join(rows))


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description="The memory of a LoRA run on one GPU (docs/fine-tuning.md)")
    ap.add_argument("what", choices=["plan"])
    ap.add_argument("--size", default="2b", choices=sorted(nami.PRESETS))
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--resolution", type=int, nargs="+", default=[1024, 512])
    ap.add_argument("--text-len", type=int, default=256, help="text tokens (the release: 256; FLUX.1-dev: 512)")
    a = ap.parse_args()
    print(plan_table(a.size, a.rank, a.resolution, a.text_len))
