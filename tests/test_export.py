"""NAMI in the diffusers ecosystem (training/export.py, docs/export.md): an exported folder loads with
DiffusionPipeline.from_pretrained(OUT, trust_remote_code=True) in a Python process that cannot import this
repository and draws sample.py's picture (latents within 1e-5, the same PNG pixels), for one of our tiny runs and for
a folder in the release's layout; the release's export at its real shapes (NAMI-2B) builds every tensor of the
release on the meta device; sample.py --ckpt OUT, train.py --init-from OUT and a LoRA read the folder back; a folder
that is not ours, incomplete or edited by hand is refused with its fault named.

    OMP_NUM_THREADS=1 python -m pytest -q tests/test_export.py        # about 20 s on 2 CPU cores
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

import nami
import sample
import train
from common import images
from conftest import tiny_run
from training import checkpoint, diffusers_folder, export, init_from, release

ROOT = Path(__file__).resolve().parent.parent

# What runs in the clean process: load the folder with diffusers alone, make each call, save what it draws, and
# report the modules it imported from this repository (none may be) and the time of each part
DRAW = """
import json, sys, time
start = time.perf_counter()
import torch
from diffusers import DiffusionPipeline
folder, out, repository, calls, refused = sys.argv[1], sys.argv[2], sys.argv[3], json.loads(sys.argv[4]), sys.argv[5:]
imported = time.perf_counter()
pipe = DiffusionPipeline.from_pretrained(folder, trust_remote_code=True)
loaded, drawn = time.perf_counter(), {}
for name, call in calls.items():
    mark, seed = time.perf_counter(), call.pop("seed")
    result = pipe(**call, generator=torch.Generator().manual_seed(seed))
    drawn[name] = time.perf_counter() - mark
    if call.get("output_type") == "latent":
        torch.save(result.images, f"{out}/{name}.pt")
    else:
        for i, image in enumerate(result.images):
            image.save(f"{out}/{name}-{i}.png")
errors = {}
for edited in refused:
    try:
        DiffusionPipeline.from_pretrained(edited, trust_remote_code=True)
    except Exception as e:
        errors[edited] = f"{type(e).__name__}: {e}"
ours = sorted(m.__name__ for m in list(sys.modules.values())
              if (getattr(m, "__file__", None) or "").startswith(repository) and not m.__file__.startswith(sys.prefix))
json.dump({"import_s": imported - start, "load_s": loaded - imported, "draw_s": drawn, "from_repository": ours,
           "classes": {name: type(part).__module__ + "." + type(part).__name__ for name, part in pipe.components.items()},
           "errors": errors}, open(f"{out}/report.json", "w"))
"""


def draw_elsewhere(folder: Path, work: Path, calls: dict, refused=()) -> dict:
    """Run DRAW in a fresh `python -I` (no PYTHONPATH, no user site) whose working folder is a temporary one: this
    repository is not on its sys.path. diffusers' module cache goes to `work`, not the user's."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    env.update(HF_MODULES_CACHE=str(work / "modules"), HF_HUB_OFFLINE="1")
    done = subprocess.run([sys.executable, "-I", "-c", DRAW, str(folder), str(work), str(ROOT), json.dumps(calls),
                           *map(str, refused)], cwd=work, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads((work / "report.json").read_text())


def recorded_latents(monkeypatch) -> list:
    """The last stage's output of every nami.generate call sample.py makes from now on."""
    outputs, generate = [], nami.generate

    def recording(*args, **kwargs):
        stages = generate(*args, **kwargs)
        outputs.append(stages[-1])
        return stages
    monkeypatch.setattr(nami, "generate", recording)
    return outputs


def pixels(path) -> np.ndarray:
    with Image.open(path) as png:
        return np.asarray(png.convert("RGB"))


def assert_same_picture(drawn: np.ndarray, ours: np.ndarray, latent_difference: float):
    """Identical pixels when the two processes' latents are equal bit for bit, as they have been on every machine
    tried. Latents apart by float round-off (the 1e-5 allowed) can put a colour on the other side of a rounding
    step, so then a pixel may differ by one level, never more. (Bit-equal latents and one value one level apart:
    what an AMD EPYC gave while the pipeline decoded with contiguous convolutions and sample.py channels-last.)"""
    gap = np.abs(drawn.astype(int) - ours.astype(int))
    if latent_difference == 0:
        assert gap.max() == 0, f"latents equal, yet {np.count_nonzero(gap)} pixel values differ (largest {gap.max()})"
    else:
        assert gap.max() <= 1, f"latents {latent_difference:.1e} apart, a pixel value {gap.max()} levels apart"


@pytest.fixture(scope="module")
def exported_run(tmp_path_factory, encoder_dir):
    """A tiny run with the jump noise on (the pipeline must add it as nami.generate does), and its export."""
    root = tmp_path_factory.mktemp("exported")
    train.main(tiny_run(root / "run", encoder_dir, max_steps=2, ckpt_every=2, jump_noise=True))
    start = time.perf_counter()
    export.main([str(root / "run"), str(root / "out")])
    return root / "run", root / "out", time.perf_counter() - start


def test_an_exported_run_draws_sample_pys_picture_in_a_process_without_the_repository(exported_run, tmp_path,
                                                                                       monkeypatch, capsys):
    """For the same prompt, seeds, steps and CFG: the latents of DiffusionPipeline (NAMI and the flat sampler)
    within 1e-5 of sample.py's, and the same PNG pixels; a generator seeded s draws sample.py --seed s."""
    run, out, export_s = exported_run
    latents = recorded_latents(monkeypatch)
    # two images (seeds 3, 4), 2+1+2 steps, CFG 4: none a default, so the call must carry each
    common = ["--seed", "3", "-n", "2", "--steps", "2,1,2", "--cfg", "4", "--upscale", "1"]
    sample.main(["a red circle", "--ckpt", str(run), *common, "--out", str(tmp_path / "nami.png")])
    sample.main(["a red circle", "--ckpt", str(run), *common, "--flat", "--out", str(tmp_path / "flat.png")])
    call = dict(prompt="a red circle", num_images_per_prompt=2, num_inference_steps=[2, 1, 2], guidance_scale=4.0,
                seed=3)
    edited = tmp_path / "edited"  # the scheduler's windows edited by hand: the pipeline refuses to load
    shutil.copytree(out, edited)
    config = json.loads((edited / "scheduler" / "scheduler_config.json").read_text())
    config["windows"][1][0] = 0.5
    (edited / "scheduler" / "scheduler_config.json").write_text(json.dumps(config))
    work = tmp_path / "elsewhere"
    work.mkdir()
    report = draw_elsewhere(out, work, {"nami": {**call, "output_type": "latent"}, "pil": call,
                                        "flat": {**call, "output_type": "latent", "flat": True}}, [edited])
    assert report["from_repository"] == [], "the clean process imported this repository's modules"
    assert report["classes"]["transformer"].endswith("transformer_nami.NamiTransformer2DModel")
    differences = {}
    for name, ours in (("nami", latents[0]), ("flat", latents[1])):
        theirs = torch.load(work / f"{name}.pt")
        assert theirs.shape == ours.shape == (2, 3, 16, 16)
        differences[name] = (theirs - ours).abs().max().item()
        assert differences[name] <= 1e-5, name
    drawn = [Image.open(work / f"pil-{i}.png").convert("RGB") for i in range(2)]
    assert_same_picture(np.asarray(images.grid(drawn, ncols=2)), pixels(tmp_path / "nami.png"), differences["nami"])
    assert "windows" in report["errors"][str(edited)] and "do not follow from window_ratios" in report["errors"][str(edited)]
    with capsys.disabled():  # the measurement docs/export.md and results/export.md quote (OMP_NUM_THREADS=1)
        print(f"\nexport {export_s:.1f} s, clean process: imports {report['import_s']:.1f} s, from_pretrained "
              f"{report['load_s']:.1f} s, draws {', '.join(f'{k} {v:.2f} s' for k, v in report['draw_s'].items())}; "
              f"latents' largest difference from sample.py's: {differences}")


def test_the_release_exports_with_its_prompts_and_grid_and_draws_what_sample_py_weights_draws(
        released_dir, tmp_path, monkeypatch):
    """The release's layout (tiny random models): mT5 unmasked, mCLIP's CLS, the release's grid, prompt suffix and
    negative prompt as the pipeline's defaults, the VAE's decoding; the same latents and pixels as sample.py."""
    out = tmp_path / "out"
    export.main([str(released_dir), str(out)])
    index = json.loads((out / "model_index.json").read_text())
    assert (index["prompt_suffix"], index["negative_prompt"]) == (release.PROMPT_SUFFIX, release.NEGATIVE_PROMPT)
    assert (index["text_padding"], index["pooled_rule"], index["text_max_length"]) == ("unmasked", "cls", 256)
    assert index["trained"] is None and index["exported_from"]["kind"] == "release"
    assert json.loads((out / "scheduler" / "scheduler_config.json").read_text())["schedule"] == "release"
    assert set(load_file(out / "text_encoder_2" / "model.safetensors")) >= {"pooler.dense.weight"}  # zero, unread
    latents = recorded_latents(monkeypatch)
    sample.main(["a photo of a cat", "--weights", str(released_dir), "--res", "32x32", "--steps", "2,2,2", "--seed", "5",
                 "--upscale", "1", "--out", str(tmp_path / "cat.png")])
    work = tmp_path / "elsewhere"
    work.mkdir()
    call = dict(prompt="a photo of a cat", height=32, width=32, num_inference_steps=6, seed=5)  # 6 = 2 + 2 + 2
    report = draw_elsewhere(out, work, {"latent": {**call, "output_type": "latent"}, "pil": call})
    assert report["from_repository"] == []
    difference = (torch.load(work / "latent.pt") - latents[0]).abs().max().item()
    assert difference <= 1e-5
    assert_same_picture(pixels(work / "pil-0.png"), pixels(tmp_path / "cat.png"), difference)
    # read back by sample.py --ckpt: the release's grid and prompts are the folder's defaults there too
    sample.main(["a photo of a cat", "--ckpt", str(out), "--res", "32x32", "--steps", "2,2,2", "--seed", "5",
                 "--upscale", "1", "--out", str(tmp_path / "back.png")])
    assert np.array_equal(pixels(tmp_path / "back.png"), pixels(tmp_path / "cat.png"))
    png = Image.open(tmp_path / "back.png")
    assert (png.text["schedule"], png.text["prompt_suffix"]) == ("release", release.PROMPT_SUFFIX)
    sample.main(["a cat", "--ckpt", str(out), "--res", "32x32", "--steps", "1,1,1", "--no-release-prompts",
                 "--out", str(tmp_path / "plain.png")])
    assert (Image.open(tmp_path / "plain.png").text["prompt_suffix"], Image.open(tmp_path / "plain.png").text["negative"]) == ("", "")
    # train.py --init-from takes it as the release: its tensors, its maps, its text settings not compared
    taken, (_, flux, _) = init_from.read_source(out), release.read_transformer(released_dir / "transformer")
    assert taken.kind == "export" and taken.recorded is None and taken.weights == "transformer"
    assert taken.transformer.keys() == flux.keys() and all(torch.equal(taken.transformer[k], flux[k]) for k in flux)
    assert torch.equal(taken.bridge["shift.1"], torch.load(released_dir / "bridge_flow.bin")["shift.1"])


def test_the_releases_export_at_its_real_shapes_builds_every_tensor_of_the_release_on_the_meta_device(tmp_path):
    """NAMI-2B (8 double + 14 single blocks, width 2048, 16 channels): the exported code and configs build, on the
    meta device, exactly the tensors of the release's FluxTransformer2DModel state dict and of its bridge_flow.bin,
    by name and shape: none missing, none unexpected."""
    from diffusers import FluxTransformer2DModel
    model = nami.get_config("2b", cuts=release.CUTS)  # what the release's loader builds (release.read_transformer)
    with torch.device("meta"):
        flux = FluxTransformer2DModel(patch_size=1, in_channels=64, num_layers=8, num_single_layers=14,
                                      attention_head_dim=128, num_attention_heads=16, joint_attention_dim=4096,
                                      pooled_projection_dim=1024, guidance_embeds=False, axes_dims_rope=(16, 56, 56))
        released_bridge = {"scale": torch.empty(2), "shift.0": torch.empty(1, 16, 64, 64),
                           "shift.1": torch.empty(1, 16, 128, 128)}
    wanted = {name: list(value.shape) for name, value in release.convert_diffusers_flux(flux.state_dict()).items()}
    source = init_from.Source("release", tmp_path, model, {}, released_bridge)
    out = tmp_path / "out"
    export.write_code(out)
    export.write_config(out / "transformer", "NamiTransformer2DModel", model.to_dict())
    export.write_config(out / "bridge_flow", "NamiBridgeFlow", export.bridge_config(source, None, 8))
    build = """
import json, sys, torch
from diffusers.utils.dynamic_modules_utils import get_class_from_dynamic_module
shapes = {}
for part, module, name in (("transformer", "transformer_nami.py", "NamiTransformer2DModel"),
                           ("bridge_flow", "bridgeflow_nami.py", "NamiBridgeFlow")):
    cls = get_class_from_dynamic_module(sys.argv[1] + "/" + part, module, class_name=name, trust_remote_code=True)
    with torch.device("meta"):
        model = cls.from_config(cls.load_config(sys.argv[1] + "/" + part))
    shapes[part] = {key: list(value.shape) for key, value in model.state_dict().items()}
print(json.dumps(shapes))
"""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    env.update(HF_MODULES_CACHE=str(tmp_path / "modules"), HF_HUB_OFFLINE="1")
    done = subprocess.run([sys.executable, "-I", "-c", build, str(out)], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    built = json.loads(done.stdout.splitlines()[-1])
    assert sorted(set(wanted) - set(built["transformer"])) == [] and sorted(set(built["transformer"]) - set(wanted)) == []
    assert built["transformer"] == wanted  # every tensor of NAMI-2B, by name and shape
    assert built["bridge_flow"] == {name: list(value.shape) for name, value in released_bridge.items()}
    assert sum(np.prod(shape) for shape in wanted.values()) == pytest.approx(2.118e9, rel=1e-3)


def test_sample_train_and_lora_read_an_exported_folder_back(exported_run, tmp_path, encoder_dir):
    """sample.py --ckpt OUT draws what --ckpt RUN draws; train.py --init-from OUT starts from its weights and maps
    and records the files it read; a LoRA trained on OUT samples on it and merges into a folder --ckpt reads."""
    run, out, _ = exported_run
    for name, folder in (("run", run), ("out", out)):
        sample.main(["a blue square", "--ckpt", str(folder), "--steps", "1,2,1", "--out", str(tmp_path / f"{name}.png")])
    assert np.array_equal(pixels(tmp_path / "run.png"), pixels(tmp_path / "out.png"))
    assert Image.open(tmp_path / "out.png").text["checkpoint"] == str(out)
    train.main(tiny_run(tmp_path / "again", encoder_dir, init_from=str(out), max_steps=0, jump_noise=True))
    _, _, source = checkpoint.load_checkpoint(run)
    _, _, again = checkpoint.load_checkpoint(tmp_path / "again")
    assert all(torch.equal(again["model"][k], source["ema"][k]) for k in source["ema"])
    assert all(torch.equal(again["bridge"][k], source["bridge"][k]) for k in source["bridge"])
    recorded = json.loads((checkpoint.latest_checkpoint(tmp_path / "again") / "config.json").read_text())["init_from"]
    assert recorded["kind"] == "export" and recorded["bridge"] == "from the source"
    assert set(recorded["sha256"]) == {str(f.relative_to(out)) for f in diffusers_folder.files(out)}
    train.main(tiny_run(tmp_path / "lora", encoder_dir, init_from=str(out), lora=2, max_steps=1, ckpt_every=1,
                        jump_noise=True))
    sample.main(["a blue square", "--lora", str(tmp_path / "lora"), "--steps", "1,1,1", "--merge-lora",
                 str(tmp_path / "merged"), "--out", str(tmp_path / "lora.png")])
    sample.main(["a blue square", "--ckpt", str(tmp_path / "merged"), "--steps", "1,1,1", "--out",
                 str(tmp_path / "merged.png")])
    assert np.array_equal(pixels(tmp_path / "lora.png"), pixels(tmp_path / "merged.png"))


def edit(folder: Path, name: str, change) -> None:
    """Apply change(config) to a JSON file of the folder."""
    config = json.loads((folder / name).read_text())
    change(config)
    (folder / name).write_text(json.dumps(config))


@pytest.mark.parametrize("fault, change, message", [
    ("another pipeline", lambda f: edit(f, "model_index.json", lambda c: c.update(_class_name="FluxPipeline")),
     "diffusers folder of 'FluxPipeline', not of NAMI's NamiPipeline"),
    ("another transformer", lambda f: edit(f, "model_index.json",
                                           lambda c: c.update(transformer=["diffusers", "FluxTransformer2DModel"])),
     "another family's transformer"),
    ("a component missing", lambda f: shutil.rmtree(f / "bridge_flow"), "lacks bridge_flow/bridgeflow_nami.py"),
    ("weights missing", lambda f: (f / "transformer" / export.WEIGHTS).unlink(), "transformer/ holds no"),
    ("a width edited", lambda f: edit(f, "transformer/config.json", lambda c: c.update(hidden_size=96)),
     "transformer/config.json: invalid NamiConfig: axes_dim"),
    ("a key added", lambda f: edit(f, "transformer/config.json", lambda c: c.update(depth=4)),
     r"keys NamiConfig does not: \['depth'\]"),
    ("cut points edited", lambda f: edit(f, "transformer/config.json", lambda c: c.update(cuts=[1, 2, 2])),
     "the last cut point must be depth_single=3"),
    ("windows edited", lambda f: edit(f, "scheduler/scheduler_config.json", lambda c: c.update(window_ratios=[2, 1, 1])),
     "the transformer's are"),
    ("a setting edited", lambda f: edit(f, "model_index.json", lambda c: c.update(text_padding="none")),
     "text_padding 'none'"),
    ("the pooling edited", lambda f: edit(f, "model_index.json", lambda c: c.update(pooled_rule="cls")),
     "pooling rule 'cls'"),
])
def test_a_folder_that_is_not_an_export_of_ours_is_refused_naming_its_fault(exported_run, tmp_path, fault, change,
                                                                            message):
    folder = tmp_path / "folder"
    shutil.copytree(exported_run[1], folder)
    change(folder)
    with pytest.raises(SystemExit, match=message):
        sample.main(["a red circle", "--ckpt", str(folder), "--steps", "1,1,1", "--out", str(tmp_path / "x.png")])


def test_export_refuses_what_it_cannot_export_and_the_code_it_carries_stands_alone(exported_run, tmp_path):
    run, out, _ = exported_run
    with pytest.raises(SystemExit, match="exists: give a new folder"):
        export.main([str(run), str(out)])
    with pytest.raises(SystemExit, match="a diffusers folder already"):
        export.main([str(out), str(tmp_path / "again")])
    with pytest.raises(SystemExit, match="holds no weights we read"):
        export.main([str(tmp_path), str(tmp_path / "none")])
    assert not (tmp_path / "none").exists() and not list(tmp_path.glob(".tmp-*"))
    # every file an export carries imports torch, diffusers, transformers, the standard library or a file beside it
    for folder, sources in export.CARRIED.items():
        for path in sources:
            export.carried_code(path, [p.stem for p in sources if p != path])
    (tmp_path / "leaky.py").write_text("from common import files\n")
    with pytest.raises(ValueError, match="imports common, which an exported folder does not carry"):
        export.carried_code(tmp_path / "leaky.py", ["nami"])
    card = (out / "README.md").read_text()
    assert card.startswith("---\nlicense:") and "trust_remote_code=True" in card and "preset `tiny`" in card
