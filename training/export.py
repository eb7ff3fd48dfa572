"""A NAMI model as a diffusers folder, which `DiffusionPipeline.from_pretrained(OUT, trust_remote_code=True)` loads
and samples with the same pictures as sample.py (docs/export.md):

    python -m training.export runs/shapes-toy runs/shapes-toy-diffusers        # one of our runs or checkpoints
    python -m training.export NAMI-T2I/weights NAMI-2B-diffusers               # the authors' release

SOURCE is one of our run or checkpoint folders (a full run, an --init-from conversion, a --merge-lora folder) or the
authors' release folder as sample.py --weights takes it (training/release.py). OUT, a new folder, holds

    model_index.json   NamiPipeline's components and settings: the text encoding (tokens, padding, pooling), the
                       defaults of a call (prompt suffix, negative prompt, size, guidance), the source checkpoint's
                       config.json (`trained`) and where it came from (`exported_from`: path, step, sha256)
    pipeline_nami.py   the pipeline, beside nami.py (the sampler) and text_states.py (the text encoding)
    transformer/       config.json (nami.NamiConfig), diffusion_pytorch_model.safetensors, transformer_nami.py, nami.py
    bridge_flow/       BridgeFlow's maps: config.json, safetensors, bridgeflow_nami.py, bridgeflow.py, nami.py
    scheduler/         scheduler_config.json (windows, grid, steps per stage), scheduler_nami.py, schedules.py, nami.py
    text_encoder/ tokenizer/ [text_encoder_2/ tokenizer_2/]   the encoders, as transformers saves them
    vae/               the AutoencoderKL, as diffusers saves it (none in pixel space)
    README.md          the model card: what it is, how it was trained, how to sample it; its license left to you

The code there is copied from this repository's files at export time, never written twice: nami.py as it is,
bridgeflow.py and training/schedules.py with their `from nami import` made relative, common/text_states.py, and
the four files of training/diffusers_code/; it needs torch, diffusers and transformers, nothing of ours. Each
encoder's and the VAE's config.json is copied byte for byte from its source folder, so that the hash by which a
checkpoint names them still names them. training/diffusers_folder.py reads OUT back (sample.py --ckpt OUT,
train.py --init-from OUT). OUT is written beside itself as .tmp-OUT and renamed when complete.
"""
from __future__ import annotations

import argparse
import ast
import json
import os
import re
import shutil
import sys
from pathlib import Path

import torch

import nami
from common import files
from common.encoders import TextEncoder, config_digest, is_release_mclip, vae_factor
from training import checkpoint, diffusers_folder, init_from, release

ROOT = Path(__file__).resolve().parent.parent  # the repository: what an export carries is copied from here
CODE = Path(__file__).resolve().parent / "diffusers_code"
# what each folder of an export carries: the files of this repository, under their names there
CARRIED = {".": [CODE / "pipeline_nami.py", ROOT / "nami.py", ROOT / "common" / "text_states.py"],
           "transformer": [CODE / "transformer_nami.py", ROOT / "nami.py"],
           "bridge_flow": [CODE / "bridgeflow_nami.py", ROOT / "bridgeflow.py", ROOT / "nami.py"],
           "scheduler": [CODE / "scheduler_nami.py", ROOT / "training" / "schedules.py", ROOT / "nami.py"]}
OURS = {"nami", "bridgeflow", "train", "sample", "common", "datafeed", "training", "toyworld", "experiments"}
WEIGHTS = "diffusion_pytorch_model.safetensors"


def carried_code(path: Path, beside: list[str]) -> str:
    """A file of ours as an export carries it: `from nami import ...` of a module carried beside it made relative
    (diffusers imports the folder's code as a package), then checked to import nothing else of ours."""
    text = re.sub(rf"^from ({'|'.join(beside)}) import ", r"from .\1 import ", path.read_text(), flags=re.M)
    for node in ast.walk(ast.parse(text)):
        names = ([alias.name for alias in node.names] if isinstance(node, ast.Import) else
                 [node.module] if isinstance(node, ast.ImportFrom) and not node.level else [])
        ours = [name for name in names if name and name.split(".")[0] in OURS]
        if ours:
            raise ValueError(f"{path.name} imports {ours[0]}, which an exported folder does not carry: "
                             f"only {sorted(beside)} travel beside it; import from those, or carry the module too")
    return text


def write_code(out: Path):
    for folder, sources in CARRIED.items():
        (out / folder).mkdir(parents=True, exist_ok=True)
        for path in sources:
            (out / folder / path.name).write_text(carried_code(path, [p.stem for p in sources if p != path]))


# ----------------------------------------------------------------------------------------------
# The source: its weights, its encoders and VAE, how it samples
# ----------------------------------------------------------------------------------------------

def describe_source(path, raw: bool = False, text_encoder=None, pooled_encoder=None, vae=None) -> dict:
    """What an export of PATH holds, read and checked before anything is written: the Source of
    init_from.read_source (transformer and BridgeFlow tensors in our names), the loaded TextEncoder and the VAE's
    folder, the settings of the pipeline and of the scheduler, and the record of where it all came from."""
    root = Path(path)
    if diffusers_folder.holds(root):
        raise ValueError(f"{root} is a diffusers folder already: copy it as it is, or export the checkpoint it was "
                         "made from")
    source = init_from.read_source(root, raw)
    if source.kind == "diffusers":
        raise ValueError(f"{root} holds a FLUX transformer alone, without BridgeFlow, encoders or VAE: make it a NAMI "
                         "model with train.py --init-from (docs/fine-tuning.md), then export that run")
    model, K = source.model_config, source.model_config.num_stages
    if source.kind == "release":
        if text_encoder or pooled_encoder or vae:
            raise ValueError("--text-encoder, --pooled-encoder and --vae apply to our checkpoints; the release is "
                             "exported with the parts of its own folder")
        missing = [part for part in release.PARTS if not (root / part).exists()]
        if missing:
            raise FileNotFoundError(f"{root} lacks {', '.join(missing)}; the release is laid out as:\n{release.LAYOUT}")
        encoder = TextEncoder(root / "mt5", release.TEXT_LEN, "cpu", root / "mclip", release.POOLED_LEN, dtype="auto",
                              pad="unmasked")
        vae_folder, trained = root / "vae", None
        (width, height), resolution = release.RESOLUTION, None
        sampling = {"schedule": release.SCHEDULE, "steps": release.STEPS, "guidance": release.GUIDANCE,
                    **release.prompts(root)}
    else:
        trained = source.recorded
        encoder = checkpoint.load_recorded_encoder(trained["text_encoder"], source.folder, text_encoder,
                                                   pooled_encoder, dtype="auto")
        recorded_vae = trained.get("vae") or {"vae": None}
        vae_folder = Path(vae or recorded_vae["vae"]) if (vae or recorded_vae["vae"]) else None
        if vae_folder is not None and not (vae_folder / "config.json").is_file():
            raise FileNotFoundError(f"{source.folder} was trained on the latents of the VAE at {recorded_vae['vae']}, "
                                    "which is not here: pass --vae PATH to a local copy of it")
        if vae_folder is not None and config_digest(vae_folder) != recorded_vae.get("config"):
            raise ValueError(f"{source.folder} was trained on the latents of {recorded_vae['vae'] or 'pixel space'}; "
                             f"{vae_folder} is another autoencoder (its config.json differs)")
        (width, height), resolution = checkpoint.picture_size(trained), trained["resolution"]
        sampling = {"schedule": "uniform", "steps": nami.default_steps(K), "guidance": nami.DEFAULT_GUIDANCE,
                    **release.prompts(None)}
    if (encoder.dim, encoder.pooled_dim) != (model.joint_attention_dim, model.pooled_projection_dim):
        raise ValueError(f"the encoders give {encoder.dim}/{encoder.pooled_dim}-d states, the transformer of "
                         f"{source.folder} takes {model.joint_attention_dim}/{model.pooled_projection_dim}-d ones")
    exported_from = {"kind": source.kind, "path": str(source.folder.resolve()), "step": source.step,
                     "weights": source.weights,
                     "sha256": {str(f.relative_to(source.folder)): files.sha256(f) for f in source.read}}
    if (source.folder / "merged_lora.json").is_file():  # the release with a LoRA merged in (training/lora.py)
        exported_from["merged_lora"] = files.read_json(source.folder / "merged_lora.json")
    return {"source": source, "encoder": encoder, "vae": vae_folder, "width": width, "height": height,
            "resolution": resolution, "sampling": sampling, "trained": trained, "exported_from": exported_from}


def scheduler_config(model: nami.NamiConfig, sampling: dict) -> dict:
    """The scheduler's config: the windows' ratios and γ (the transformer's), the grid and the default steps per
    stage; the windows [s_k → e_k] and τ ranges they give, for readers (NamiScheduler checks them)."""
    return {"window_ratios": list(model.window_ratios), "gamma": model.gamma, "schedule": sampling["schedule"],
            "num_inference_steps": list(sampling["steps"]),
            "windows": nami.stage_windows(model.window_ratios, model.gamma),
            "tau_ranges": nami.tau_ranges(model.window_ratios, model.gamma)}


def bridge_config(source, resolution: int | None, factor: int) -> dict:
    """BridgeFlow's config.json: channels and the latent size of each stage when it was trained, read from its bias
    maps as release.load_bridge reads them (stage 1's is half stage 2's), or from the resolution for a flat model."""
    model = source.model_config
    shifts = [source.bridge[f"shift.{j}"] for j in range(model.num_stages - 1)]
    per_channel = bool(shifts) and tuple(shifts[0].shape[-2:]) == (1, 1)
    if shifts and not per_channel:
        sizes = [[s // 2 for s in shifts[0].shape[-2:]]] + [list(shift.shape[-2:]) for shift in shifts]
    else:
        side = resolution // factor
        sizes = [[s, s] for s in nami.stage_sizes(side, model.num_stages)]
    return {"channels": model.in_channels, "stage_sizes": sizes, "per_channel": per_channel}


# ----------------------------------------------------------------------------------------------
# Writing the folder
# ----------------------------------------------------------------------------------------------

def write_config(folder: Path, class_name: str, config: dict, name: str = "config.json"):
    """A component's config file as diffusers' ConfigMixin writes it: its class, diffusers' version, its fields."""
    import diffusers
    folder.mkdir(parents=True, exist_ok=True)
    config = {"_class_name": class_name, "_diffusers_version": diffusers.__version__, **config}
    (folder / name).write_text(json.dumps(config, indent=2) + "\n")


def write_weights(folder: Path, tensors: dict):
    """A component's weights in the safetensors file ModelMixin.save_pretrained writes (one shard)."""
    from safetensors.torch import save_file
    save_file({name: value.contiguous() for name, value in tensors.items()}, folder / WEIGHTS, metadata={"format": "pt"})


def write_encoder(model, tokenizer, source_folder, out: Path, name: str, tokenizer_name: str) -> dict:
    """An encoder and its tokenizer with save_pretrained, then the config.json of its source copied over the one
    written, byte for byte (a checkpoint names its encoders by that file's hash). A BERT saved without its pooling
    layer (the release's mCLIP, whose CLS state is the pooled vector) gets a zero one, which nothing reads, so that
    BertModel.from_pretrained finds every weight it builds. -> the model_index.json entries of the two."""
    from transformers import BertModel
    from transformers.models.bert.modeling_bert import BertPooler
    if isinstance(model, BertModel) and model.pooler is None:
        model.pooler = BertPooler(model.config).to(model.dtype)
        torch.nn.init.zeros_(model.pooler.dense.weight), torch.nn.init.zeros_(model.pooler.dense.bias)
    model.save_pretrained(out / name)
    tokenizer.save_pretrained(out / tokenizer_name)
    source_folder = Path(source_folder)
    source_config = source_folder / "clip_text_encoder" if is_release_mclip(source_folder) else source_folder
    shutil.copyfile(source_config / "config.json", out / name / "config.json")
    return {name: ["transformers", type(model).__name__], tokenizer_name: ["transformers", type(tokenizer).__name__]}


def write_vae(folder: Path | None, out: Path) -> dict:
    if folder is None:
        return {"vae": [None, None]}
    from diffusers import AutoencoderKL
    AutoencoderKL.from_pretrained(folder, local_files_only=True).save_pretrained(out / "vae")
    shutil.copyfile(folder / "config.json", out / "vae" / "config.json")
    return {"vae": ["diffusers", "AutoencoderKL"]}


def export(path, out, raw: bool = False, text_encoder=None, pooled_encoder=None, vae=None) -> Path:
    """Write the diffusers folder OUT of the model in PATH (the module's docstring); returns OUT."""
    import diffusers
    out = Path(out)
    if out.exists():
        raise ValueError(f"{out} exists: give a new folder (nothing is overwritten)")
    described = describe_source(path, raw, text_encoder, pooled_encoder, vae)
    source, encoder, sampling = described["source"], described["encoder"], described["sampling"]
    model = source.model_config
    factor = vae_factor(described["vae"]) if described["vae"] else 1
    tmp = out.parent / f".tmp-{out.name}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        write_code(tmp)
        write_config(tmp / "transformer", diffusers_folder.OURS["transformer"][1], model.to_dict())
        write_weights(tmp / "transformer", source.transformer)
        write_config(tmp / "bridge_flow", diffusers_folder.OURS["bridge_flow"][1],
                     bridge_config(source, described["resolution"], factor))
        write_weights(tmp / "bridge_flow", source.bridge if model.num_stages > 1 else {"scale": torch.ones(0)})
        write_config(tmp / "scheduler", diffusers_folder.OURS["scheduler"][1], scheduler_config(model, sampling),
                     "scheduler_config.json")
        components = write_encoder(encoder.model, encoder.tokenizer, encoder.path, tmp, "text_encoder", "tokenizer")
        components.update(write_encoder(encoder.pooled_model, encoder.pooled_tokenizer, encoder.pooled_path, tmp,
                                        "text_encoder_2", "tokenizer_2") if encoder.pooled_path else
                          {"text_encoder_2": [None, None], "tokenizer_2": [None, None]})
        components.update(write_vae(described["vae"], tmp))
        index = {"_class_name": diffusers_folder.PIPELINE, "_diffusers_version": diffusers.__version__,
                 **{name: module for name, module in diffusers_folder.OURS.items()}, **components,
                 "text_max_length": encoder.max_len, "text_padding": encoder.pad,
                 "pooled_max_length": encoder.pooled_len, "pooled_rule": encoder.pooled_rule(),
                 "prompt_suffix": sampling["suffix"], "negative_prompt": sampling["negative"],
                 "height": described["height"], "width": described["width"], "guidance_scale": sampling["guidance"],
                 "trained": described["trained"], "exported_from": described["exported_from"]}
        (tmp / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")
        (tmp / "README.md").write_text(model_card(index, out.name))
        diffusers_folder.record(tmp)  # what training/diffusers_folder.py will read back holds together
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


# ----------------------------------------------------------------------------------------------
# The model card
# ----------------------------------------------------------------------------------------------

def trained_lines(index: dict) -> list[str]:
    """How the weights were made, in a few lines, from the source's record."""
    source, trained = index["exported_from"], index["trained"]
    if trained is None:
        merged = source.get("merged_lora")
        return ["The authors' released NAMI-2B (public repository 360CVGroup/NAMI-T2I, weights on the Hugging Face "
                "Hub as qihoo360/NAMI-T2I), converted key for key: its transformer, BridgeFlow maps, mT5-XXL and "
                "multilingual CLIP encoders and FLUX VAE; trained by its authors as the paper §4.3 describes"
                + (f"; with the LoRA `{merged.get('lora')}` merged in at scale {merged.get('scale')}." if merged else ".")]
    train, model, text = trained.get("train", {}), trained.get("model", {}), trained.get("text_encoder", {})
    if train.get("data"):
        data = f"the images of `{train['data']}`"
    elif train.get("cache"):
        data = f"the cache `{train['cache']}`"
    else:
        data = f"the built-in shapes world, level {train.get('world_level')}"
    vae = (trained.get("vae") or {}).get("vae")
    pooled = text.get("pooled_path")
    lines = [f"- model: preset `{train.get('size')}`, mode `{train.get('mode')}`, {model.get('depth_double')} double + "
             f"{model.get('depth_single')} single blocks of width {model.get('hidden_size')}, cut points "
             f"{model.get('cuts')}, window ratios {model.get('window_ratios')}, velocity `{model.get('velocity')}`, "
             f"jump noise {model.get('jump_noise')}",
             f"- data: {data} at {trained.get('resolution')} pixels, "
             + (f"in the latents of the VAE `{vae}` (here vae/)" if vae else "in pixel space"),
             f"- training: {trained.get('step')} of {train.get('max_steps')} steps, batch {train.get('batch_size')}, lr "
             f"{train.get('lr')}, EMA decay {train.get('ema_decay')}, seed {train.get('seed')}; exported: its "
             + ("raw weights (--no-ema)" if source.get("weights") == "model" else "EMA weights"),
             f"- text: `{text.get('path')}` (here text_encoder/), {text.get('max_len')} tokens; the pooled vector: "
             + (f"`{pooled}` (here text_encoder_2/)" if pooled else "the mean of the text states")]
    if trained.get("init_from"):
        lines.append(f"- started from `{trained['init_from'].get('path')}` ({trained['init_from'].get('kind')}, "
                     "train.py --init-from)")
    if trained.get("merged_lora"):
        lines.append(f"- with the LoRA `{trained['merged_lora'].get('lora')}` merged in at scale "
                     f"{trained['merged_lora'].get('scale')}")
    return lines


def example_prompt(index: dict) -> str:
    """A prompt the model knows: a shape of the built-in world, else the release's own example."""
    train = (index["trained"] or {}).get("train") or {}
    return "a red circle" if index["trained"] and not (train.get("data") or train.get("cache")) else "a photo of a cat"


def model_card(index: dict, name: str) -> str:
    """README.md of an exported folder, front matter first (the Hub's model card); the license is the user's to set."""
    return "\n".join([
        "---",
        "license:  # fill in before sharing: the terms of these weights and of the data they were trained on",
        "library_name: diffusers",
        "pipeline_tag: text-to-image",
        "tags: [nami, rectified-flow, text-to-image]",
        "---",
        "",
        f"# {name}",
        "",
        "A NAMI model (Ma et al., 2025, \"NAMI: Efficient Image Generation via Bridged Progressive Rectified Flow "
        "Transformers\"): a FLUX-style rectified-flow transformer that generates in stages of rising resolution, each "
        "stage integrating its own time window with the first blocks of the transformer, a learned map (BridgeFlow) "
        "carrying each stage's end across the 2× jump to the next. Exported from the plain-PyTorch reference "
        "implementation *nami* with `python -m training.export`; the code beside the weights is that repository's, "
        "and needs torch, diffusers and transformers.",
        "",
        "## How it was made",
        "",
        *trained_lines(index),
        "",
        f"Exported from `{index['exported_from']['path']}` (the sha256 of each file read: `exported_from` in "
        "model_index.json; the source's whole config.json: `trained`).",
        "",
        "## Sampling",
        "",
        "```python",
        "import torch",
        "from diffusers import DiffusionPipeline",
        "",
        f"pipe = DiffusionPipeline.from_pretrained(\"{name}\", trust_remote_code=True)  # dtype=torch.bfloat16 on a GPU",
        f"image = pipe(\"{example_prompt(index)}\", generator=torch.Generator().manual_seed(0)).images[0]",
        "image.save(\"sample.png\")",
        "```",
        "",
        f"Defaults: {index['width']}x{index['height']} pixels, guidance {index['guidance_scale']}, the scheduler's steps "
        "per stage; `num_inference_steps=(10, 10, 10)` or a total, `flat=True` for the flat sampler, `output_type` "
        "`\"pil\"`, `\"np\"`, `\"pt\"` or `\"latent\"`. A generator's seed s gives the picture that "
        f"`python sample.py --ckpt {name} --seed s \"{example_prompt(index)}\"` draws in the nami repository"
        + (f"; the prompt suffix `{index['prompt_suffix']}` is appended and the negative prompt is "
           f"`{index['negative_prompt']}`, as the release samples" if index["prompt_suffix"] else "") + ".",
        "",
        "## License",
        "",
        "Not set by the export: state the license of the weights above (and, for the release, copy the terms of "
        "360CVGroup/NAMI-T2I) before sharing this folder.",
        ""])


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("source", help="one of our run or checkpoint folders, or the authors' release folder")
    parser.add_argument("out", help="the diffusers folder to write (must not exist)")
    parser.add_argument("--no-ema", action="store_true", help="our checkpoints: the raw weights instead of the EMA")
    parser.add_argument("--text-encoder", help="a local copy of the text encoder the checkpoint records")
    parser.add_argument("--pooled-encoder", help="a local copy of the pooled encoder the checkpoint records")
    parser.add_argument("--vae", help="a local copy of the VAE the checkpoint records")
    args = parser.parse_args(argv)
    try:
        out = export(args.source, args.out, args.no_ema, args.text_encoder, args.pooled_encoder, args.vae)
    except (ValueError, FileNotFoundError, ImportError) as e:
        raise SystemExit(f"error: {e}")
    size = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    print(f"wrote {out} ({size / 2 ** 20:.1f} MiB): DiffusionPipeline.from_pretrained({str(out)!r}, "
          f"trust_remote_code=True), or python sample.py --ckpt {out} \"PROMPT\"")


if __name__ == "__main__":
    main(sys.argv[1:])
