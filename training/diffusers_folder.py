"""A diffusers folder written by `python -m training.export` (docs/export.md), read back as one of our checkpoints:
checkpoint.load_checkpoint hands such a folder here, so `sample.py --ckpt OUT`, `train.py --init-from OUT` and a
LoRA trained on OUT read it as they read a ckpt-N/ folder. Nothing in it is run: its configs are JSON, its weights
safetensors, and its code is diffusers' to import (trust_remote_code=True), never ours.

    holds(folder)    a diffusers folder (model_index.json): ours, or another that read() explains
    read(folder)     -> (config, parts): the record a checkpoint's config.json holds, and its tensors by part
                        ({"model", "ema", "bridge"}; model and ema are the one exported set of weights)
    record(folder)   the record alone, the weights left unread
    files(folder)    the files that weights and settings are read from (a LoRA records their sha256)

What the folder says is checked before anything is built, and each fault is named with its file: another family's
pipeline or transformer, a missing component, a config edited into values the model does not have.
"""
from __future__ import annotations

from pathlib import Path

import nami
from common.encoders import config_digest, vae_factor
from common.files import read_json
from common.text_states import PADDINGS, POOLED_RULES
from training.schedules import SCHEDULES

PIPELINE = ["pipeline_nami", "NamiPipeline"]
# our components: the module beside their weights and its class, as model_index.json names them
OURS = {"transformer": ["transformer_nami", "NamiTransformer2DModel"], "bridge_flow": ["bridgeflow_nami", "NamiBridgeFlow"],
        "scheduler": ["scheduler_nami", "NamiScheduler"]}
WEIGHTS = "diffusion_pytorch_model*.safetensors"  # diffusers' name; a save_pretrained of a large model shards it
# the pipeline's settings in model_index.json and the type of each (NamiPipeline.__init__)
SETTINGS = {"text_max_length": int, "text_padding": str, "pooled_max_length": int, "pooled_rule": str,
            "prompt_suffix": str, "negative_prompt": str, "height": int, "width": int, "guidance_scale": (int, float)}
DIFFUSERS_KEYS = {"_class_name", "_diffusers_version", "_name_or_path", "_use_default_values"}
HOW = "export the model again (python -m training.export SOURCE OUT)"


def holds(folder) -> bool:
    return (Path(folder) / "model_index.json").is_file()


def config_of(path: Path) -> dict:
    """A config file of the folder as a dict, or an error naming it."""
    try:
        config = read_json(path)
    except FileNotFoundError:
        raise FileNotFoundError(f"{path} is missing: the folder is incomplete; copy the whole folder again or {HOW}")
    except (OSError, ValueError) as e:
        raise ValueError(f"{path} is not readable JSON ({e}): {HOW}")
    if not isinstance(config, dict):
        raise ValueError(f"{path} holds a {type(config).__name__}, not a config: {HOW}")
    return config


def pipeline_settings(folder: Path) -> dict:
    """model_index.json, checked: NAMI's pipeline, each of our components named and present beside it, the
    encoders and the VAE as transformers and diffusers classes, every setting of the right type."""
    index = config_of(folder / "model_index.json")
    if index.get("_class_name") != PIPELINE:
        raise ValueError(f"{folder} is a diffusers folder of {index.get('_class_name')!r}, not of NAMI's "
                         f"{PIPELINE[1]} (python -m training.export writes those): nami reads only its own; a FLUX "
                         "transformer converts with train.py --init-from FOLDER/transformer")
    for name, module in OURS.items():
        if index.get(name) != module:
            raise ValueError(f"{folder}/model_index.json: {name} is {index.get(name)!r}, not NAMI's {module}: "
                             f"the folder holds another family's {name}")
        if not (folder / name / f"{module[0]}.py").is_file():
            raise FileNotFoundError(f"{folder} lacks {name}/{module[0]}.py, which model_index.json names: copy the "
                                    f"whole folder again or {HOW}")
    for name, library, optional in (("text_encoder", "transformers", False), ("tokenizer", "transformers", False),
                                    ("text_encoder_2", "transformers", True), ("tokenizer_2", "transformers", True),
                                    ("vae", "diffusers", True)):
        entry = index.get(name, [None, None])
        if entry == [None, None] and optional:
            continue
        if not (isinstance(entry, list) and len(entry) == 2 and entry[0] == library):
            raise ValueError(f"{folder}/model_index.json: {name} is {entry!r}; NAMI's pipeline takes a {library} "
                             f"class there{' or [null, null]' if optional else ''}")
        if not (folder / name).is_dir():
            raise FileNotFoundError(f"{folder} lacks {name}/, which model_index.json names: copy the whole folder "
                                    f"again or {HOW}")
    if (index.get("text_encoder_2", [None]) == [None, None]) != (index.get("tokenizer_2", [None]) == [None, None]):
        raise ValueError(f"{folder}/model_index.json names text_encoder_2 without tokenizer_2 or the reverse")
    wrong = [f"{key}={index.get(key)!r}" for key, kind in SETTINGS.items()
             if not isinstance(index.get(key), kind) or isinstance(index.get(key), bool)]
    if index.get("text_padding") not in PADDINGS or index.get("pooled_rule") not in POOLED_RULES:
        wrong.append(f"text_padding {index.get('text_padding')!r} (one of {PADDINGS}), pooled_rule "
                     f"{index.get('pooled_rule')!r} (one of {POOLED_RULES})")
    if wrong:
        raise ValueError(f"{folder}/model_index.json: {'; '.join(wrong)}: not a setting NAMI's pipeline takes; {HOW}")
    return index


def model_config(folder: Path) -> nami.NamiConfig:
    """transformer/config.json as a NamiConfig: its class ours, its keys NamiConfig's fields, its values valid."""
    path = folder / "transformer" / "config.json"
    config = config_of(path)
    if config.get("_class_name") != OURS["transformer"][1]:
        raise ValueError(f"{path}: the class is {config.get('_class_name')!r}, not {OURS['transformer'][1]}")
    unknown = sorted(set(config) - DIFFUSERS_KEYS - set(nami.NamiConfig.__dataclass_fields__))
    if unknown:
        raise ValueError(f"{path} has keys NamiConfig does not: {unknown}; {HOW}")
    try:
        return nami.NamiConfig.from_dict(config)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{path}: {e}")


def record(folder) -> dict:
    """What a checkpoint's config.json says, for an exported folder: the source checkpoint's record (`trained` in
    model_index.json; the release has none) with the model, encoders, VAE, size and grid that the folder holds."""
    folder = Path(folder)
    index, model = pipeline_settings(folder), model_config(folder)
    bridge, scheduler = config_of(folder / "bridge_flow" / "config.json"), config_of(folder / "scheduler" / "scheduler_config.json")
    sizes = bridge.get("stage_sizes")
    if bridge.get("channels") != model.in_channels or not isinstance(sizes, list) or len(sizes) != model.num_stages:
        raise ValueError(f"{folder}/bridge_flow/config.json: {bridge.get('channels')} channels and stage sizes {sizes} "
                         f"for a transformer of {model.in_channels} channels and {model.num_stages} stages; {HOW}")
    if scheduler.get("schedule") not in SCHEDULES or [float(r) for r in scheduler.get("window_ratios", [])] != list(
            model.window_ratios) or scheduler.get("gamma") != model.gamma:
        raise ValueError(f"{folder}/scheduler/scheduler_config.json: schedule {scheduler.get('schedule')!r}, windows "
                         f"{scheduler.get('window_ratios')}, γ {scheduler.get('gamma')}; the transformer's are "
                         f"{list(model.window_ratios)}, γ {model.gamma} and the grids {sorted(SCHEDULES)}; {HOW}")
    trained = index.get("trained") or {}
    pooled = index.get("text_encoder_2", [None])[0] is not None
    vae = folder / "vae" if index.get("vae", [None])[0] is not None else None
    factor = vae_factor(vae) if vae is not None else 1
    # the widths the transformer's text projections take: an encoder folder swapped for another is refused on load
    text_encoder = {"path": str(folder / "text_encoder"), "config": config_digest(folder / "text_encoder"),
                    "dim": model.joint_attention_dim, "max_len": index["text_max_length"], "pad": index["text_padding"],
                    "pooled_path": str(folder / "text_encoder_2") if pooled else None,
                    "pooled_config": config_digest(folder / "text_encoder_2") if pooled else None,
                    "pooled_dim": model.pooled_projection_dim, "pooled_len": index["pooled_max_length"],
                    "pooled_rule": index["pooled_rule"]}
    autoencoder = {"vae": None} if vae is None else {"vae": str(vae), "config": config_digest(vae), "factor": factor}
    return {**trained, "model": model.to_dict(), "train": trained.get("train") or {"size": preset_of(model)},
            "text_encoder": text_encoder, "vae": autoencoder, "size": [index["width"], index["height"]],
            # the bias maps' size is the training resolution's (the release records none)
            "resolution": trained.get("resolution") or sizes[-1][0] * (factor or 1),
            "schedule": scheduler["schedule"],
            "prompts": {"suffix": index["prompt_suffix"], "negative": index["negative_prompt"]},
            "exported_from": index.get("exported_from")}


def preset_of(model: nami.NamiConfig) -> str | None:
    """The preset whose settings the model has, its cut points aside (the release's: 2b), or None."""
    return next((name for name, fields in nami.PRESETS.items()
                 if all(getattr(model, key) == value for key, value in fields.items() if key != "cuts")), None)


def files(folder) -> list[Path]:
    """The files a model's weights and settings are read from, model_index.json first."""
    folder = Path(folder)
    found = [folder / "model_index.json"]
    for name, config in (("transformer", "config.json"), ("bridge_flow", "config.json"),
                         ("scheduler", "scheduler_config.json")):
        found += [folder / name / config] + sorted((folder / name).glob(WEIGHTS))
    return found


def read(folder) -> tuple[dict, dict]:
    """(record, {"model": ..., "ema": ..., "bridge": ...}) of an exported folder, as checkpoint.load_checkpoint
    returns our checkpoints' (their names and shapes are checked where they are loaded)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file
    folder = Path(folder)
    config, parts = record(folder), {}
    for part, name in (("model", "transformer"), ("bridge", "bridge_flow")):
        weight_files = sorted((folder / name).glob(WEIGHTS))
        if not weight_files:
            raise FileNotFoundError(f"{folder}/{name}/ holds no {WEIGHTS}: copy the whole folder again or {HOW}")
        parts[part] = {}
        for path in weight_files:
            try:
                parts[part].update(load_file(path))
            except SafetensorError as e:
                raise ValueError(f"{path} is damaged ({e}): copy it again or {HOW}")
    parts["ema"] = parts["model"]
    return config, parts
