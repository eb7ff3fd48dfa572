"""LoRA (training/lora.py, train.py --lora, sample.py --lora): only the adapters train, the base stays bit for bit,
scale 0 is the base, merged weights sample what the adapters sample, two ranks repeat one process,
a LoRA is refused on another base, and its files run no code.

    python -m pytest -q tests/test_lora.py
"""
from __future__ import annotations

import builtins
import pickle
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

import nami
import sample
import train
from conftest import tiny_run
from test_parallel import losses, one_process, torchrun
from training import checkpoint, lora


@pytest.fixture(scope="module")
def base(tmp_path_factory, encoder_dir):
    out = tmp_path_factory.mktemp("base")
    train.main(tiny_run(out, encoder_dir, max_steps=6, ckpt_every=6))
    return out


@pytest.fixture(scope="module")
def adapted(tmp_path_factory, encoder_dir, base):
    out = tmp_path_factory.mktemp("lora")
    train.main(tiny_run(out, encoder_dir, init_from=str(base), lora=4, max_steps=4, ckpt_every=4, lr=1e-2))
    return out


def test_only_the_adapters_train_and_the_base_stays_bit_identical(base, adapted):
    _, _, before = checkpoint.load_checkpoint(base)
    folder, saved, after = checkpoint.load_checkpoint(adapted)
    assert set(after) == {"model", "ema", "bridge"}
    assert after["model"] and all(lora.is_adapter(k) for k in after["model"]), "the checkpoint holds adapters alone"
    assert any(v.abs().max() > 0 for k, v in after["model"].items() if ".lora_B." in k), "B left zero: nothing trained"
    # the base inside the trained model: rebuild it as train.py does and compare every frozen tensor
    model = nami.Nami(nami.NamiConfig.from_dict(saved["model"]))
    model.load_state_dict(before["ema"])
    lora.attach(model, saved["lora"])
    model.load_state_dict(after["model"], strict=False)
    for name, value in model.state_dict().items():
        if not lora.is_adapter(name):
            assert torch.equal(value, before["ema"][name.replace("base_layer.", "")]), name
    assert sorted(p for p, q in model.named_parameters() if q.requires_grad) == sorted(after["model"])
    # the export beside it: diffusers' layout, the EMA adapters, and the base named by its files' sha256
    exported = lora.read_tensors(folder)
    assert sorted(exported) == sorted(k.replace(".default.", ".") for k in after["ema"])
    assert set(saved["lora"]["base"]["sha256"]) == {"weights.safetensors", "config.json"}


def test_gradients_reach_the_adapters_alone(encoder_dir):
    model = nami.Nami(nami.get_config("tiny"))
    lora.attach(model, lora.settings(2))
    x, tau = torch.randn(2, 3, 8, 8), torch.rand(2)
    model(x, tau, torch.randn(2, 4, 384), torch.randn(2, 384)).square().mean().backward()
    with_grad = {n for n, p in model.named_parameters() if p.grad is not None}
    assert with_grad and with_grad == {n for n, _ in model.named_parameters() if lora.is_adapter(n)}


def sample_png(tmp_path, name, *args):
    out = tmp_path / f"{name}.png"
    sample.main(["a red circle", "--seed", "3", "--out", str(out), *args])
    return torch.from_numpy(np.asarray(Image.open(out), dtype=np.float32))


def generate(model, bridge, encoder):
    return nami.generate(model, encoder, ["a red circle"], [3], 8, 8, [2, 2, 2], bridge=bridge)[-1]


def test_scale_zero_is_the_base_and_merged_weights_sample_as_the_adapters(tmp_path, base, adapted):
    model, bridge, encoder, _, _ = checkpoint.load_model(base)
    reference = generate(model, bridge, encoder)
    folder = lora.find(adapted)
    record = lora.record(folder)
    lora.apply(model, folder, record, scale=0.0)
    assert torch.equal(generate(model, bridge, encoder), reference)   # exactly the base
    lora.set_scale(model, 1.0)
    adapters = generate(model, bridge, encoder)
    assert (adapters - reference).abs().max() > 1e-4                  # the LoRA does something
    merged = lora.merge(model)
    assert not any(lora.is_adapter(n) for n, _ in merged.named_parameters())
    torch.testing.assert_close(generate(merged, bridge, encoder), adapters, rtol=1e-4, atol=1e-4)


def test_sample_py_lora_scale_and_merge(tmp_path, base, adapted):
    plain = sample_png(tmp_path, "base", "--ckpt", str(base))
    assert torch.equal(sample_png(tmp_path, "zero", "--lora", str(adapted), "--lora-scale", "0"), plain)
    with_lora = sample_png(tmp_path, "lora", "--lora", str(adapted), "--merge-lora", str(tmp_path / "merged"))
    merged = sample_png(tmp_path, "merged", "--ckpt", str(tmp_path / "merged"))
    assert (merged - with_lora).abs().max() <= 1  # one 8-bit step at most
    info = Image.open(tmp_path / "lora.png").text
    assert info["lora_scale"] == "1.0" and info["lora"].endswith("ckpt-0000004")
    with pytest.raises(SystemExit, match="exists"):
        sample.main(["x", "--lora", str(adapted), "--merge-lora", str(tmp_path / "merged")])


def test_a_lora_is_refused_on_another_base_or_shape(tmp_path, encoder_dir, base, adapted):
    other = tmp_path / "other"
    train.main(tiny_run(other, encoder_dir, max_steps=3, ckpt_every=3, seed=1))
    with pytest.raises(SystemExit, match=r"trained on the base .*base.*another"):
        sample.main(["x", "--lora", str(adapted), "--ckpt", str(other), "--out", str(tmp_path / "x.png")])
    wider = tmp_path / "wider"
    train.main(tiny_run(wider, encoder_dir, size="mini", max_steps=1, ckpt_every=1))
    with pytest.raises(SystemExit, match=r"made for a transformer of width 64.*one of width 128"):
        sample.main(["x", "--lora", str(adapted), "--ckpt", str(wider), "--out", str(tmp_path / "x.png")])
    with pytest.raises(SystemExit, match="no-ema"):
        sample.main(["x", "--lora", str(adapted), "--no-ema", "--out", str(tmp_path / "x.png")])


def test_resume_continues_the_lora_run_and_checks_its_base(tmp_path, encoder_dir, base):
    straight = train.main(tiny_run(tmp_path / "a", encoder_dir, init_from=str(base), lora=4, max_steps=4))
    first = train.main(tiny_run(tmp_path / "b", encoder_dir, init_from=str(base), lora=4, max_steps=4, stop_after=2,
                                ckpt_every=2))
    second = train.main(tiny_run(tmp_path / "b", encoder_dir, resume=True, lora=4, max_steps=4, ckpt_every=2))
    assert first["losses"] + second["losses"] == straight["losses"]
    with pytest.raises(ValueError, match="resume it with --lora 4"):
        train.main(tiny_run(tmp_path / "b", encoder_dir, resume=True, max_steps=6))
    weights = checkpoint.latest_checkpoint(base) / "config.json"
    weights.write_text(weights.read_text() + " ")  # the base's files changed since
    try:
        with pytest.raises(ValueError, match="not the one this LoRA run started on"):
            train.main(tiny_run(tmp_path / "b", encoder_dir, resume=True, lora=4, max_steps=6))
    finally:
        weights.write_text(weights.read_text()[:-1])


def test_lora_on_two_gloo_ranks_repeats_one_process(tmp_path, encoder_dir, base):
    one_process(tmp_path / "one", encoder_dir, max_steps=2, init_from=str(base), lora=4)
    torchrun(tmp_path / "two", encoder_dir, "--max-steps", "2", "--init-from", str(base), "--lora", "4")
    assert losses(tmp_path / "two") == pytest.approx(losses(tmp_path / "one"), rel=1e-4)


class Payload:
    def __reduce__(self):
        return (builtins.exec, ("open('/tmp/nami-lora-pwned', 'w').write('ran')",))


def test_a_crafted_adapter_file_runs_no_code(tmp_path, adapted):
    import shutil
    folder = tmp_path / "crafted"
    shutil.copytree(lora.find(adapted), folder)
    (folder / lora.FILE).write_bytes(pickle.dumps(Payload()))  # a pickle named like the safetensors file
    marker = Path("/tmp/nami-lora-pwned")
    marker.unlink(missing_ok=True)
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        lora.read_tensors(folder)
    save_file({"transformer.x.weight": torch.zeros(1)}, folder / lora.FILE)  # safetensors, but not a LoRA
    with pytest.raises(ValueError, match="not a LoRA tensor"):
        lora.read_tensors(folder)
    assert not marker.exists()


def test_missing_peft_gives_a_clear_message(tmp_path, encoder_dir, base, monkeypatch):
    monkeypatch.setitem(sys.modules, "peft", None)  # import peft now raises ImportError
    with pytest.raises(ImportError, match="pip install peft"):
        lora.attach(nami.Nami(nami.get_config("tiny")), lora.settings(2))
    monkeypatch.setattr("importlib.util.find_spec", lambda name, *a: None if name == "peft" else object())
    with pytest.raises(ImportError, match="pip install peft"):
        train.main(tiny_run(tmp_path, encoder_dir, init_from=str(base), lora=4))


def test_lora_flags_are_checked_first(tmp_path, encoder_dir, base):
    for kw, message in ((dict(lora=4), "add --init-from"), (dict(lora_alpha=8.0), "apply to --lora"),
                        (dict(lora=4, init_from=str(base), parallel="fsdp"), "not FSDP2"),
                        (dict(lora=4, init_from=str(base), lora_targets=("nope",)), "'nope' names no linear layer")):
        with pytest.raises(ValueError, match=message):
            train.main(tiny_run(tmp_path / "x", encoder_dir, **kw))
    assert lora.settings(4)["alpha"] == 4.0  # α defaults to the rank: the adapters' scale α/r is 1


def test_a_lora_checkpoint_used_as_a_model_says_how_to_use_it(tmp_path, encoder_dir, adapted):
    with pytest.raises(SystemExit, match="a LoRA run's checkpoint.*--lora"):
        sample.main(["x", "--ckpt", str(adapted), "--out", str(tmp_path / "x.png")])
    with pytest.raises(ValueError, match="a LoRA run's checkpoint.*--merge-lora"):
        train.main(tiny_run(tmp_path / "y", encoder_dir, init_from=str(adapted)))
    with pytest.raises(ValueError, match="a LoRA run's checkpoint"):
        checkpoint.load_model(adapted)


def test_the_memory_plan_counts_on_the_meta_device():
    """Activations grow with the tokens (4× the pixels: over 3×, text tokens fixed), checkpointing
    keeps far less, and the base is counted at 2 bytes per parameter."""
    small, large = (lora.memory_plan("tiny", 2, res, vae_factor=1, text_len=16) for res in (32, 64))
    assert small["base_gib"] * 2 ** 30 == 2 * small["base_params"] and small["adapter_params"] > 0
    assert 3 < large["activations_gib"] / small["activations_gib"] < 4.5
    assert large["checkpointed_gib"] < large["activations_gib"] / 2
    assert "samples per micro-batch on 16 GB" in lora.plan_table("tiny", 2, [64])


def test_activation_checkpointing_leaves_a_lora_run_unchanged(tmp_path, encoder_dir, base):
    plain = train.main(tiny_run(tmp_path / "a", encoder_dir, init_from=str(base), lora=4, max_steps=3))
    recomputed = train.main(tiny_run(tmp_path / "b", encoder_dir, init_from=str(base), lora=4, max_steps=3,
                                     activation_checkpointing=True))
    assert recomputed["losses"] == pytest.approx(plain["losses"], rel=1e-5)


def test_adapters_on_a_bf16_base_are_float32():
    """A GPU run's base is bf16 (training.session.build_model); peft makes the adapters in the base's dtype, and
    AdamW steps of 1e-4 relative would round away in bf16: they must be float32."""
    model = lora.attach(nami.Nami(nami.get_config("tiny")).to(torch.bfloat16), lora.settings(2))
    assert {p.dtype for p in lora.adapter_parameters(model)} == {torch.float32}
    assert {p.dtype for n, p in model.named_parameters() if not lora.is_adapter(n)} == {torch.bfloat16}
    x = torch.randn(1, 3, 8, 8)
    assert model(x, torch.rand(1), torch.randn(1, 4, 384), torch.randn(1, 384)).shape == x.shape
