"""Converting a flat model into NAMI (docs/training.md#converting-a-flat-model): the velocity a network
predicts (--velocity local|global, nami.stage_velocity) in Algorithm 1's loss and in the sampler, a
conversion without training (--max-steps 0), and the validation loss (training/validation.py) that
compares runs.

    python -m pytest -q tests/test_conversion.py      # about a minute on 2 CPU cores
"""
from __future__ import annotations

import json

import pytest
import torch
from PIL import Image

import nami
import train
from conftest import randomize, tiny_run
from experiments import eval as evaluation
from training import checkpoint, session, validation


class ScaledToWindow(torch.nn.Module):
    """A local-velocity model that multiplies another's output by its window's length s_k − e_k: what a
    global-velocity model is, written out the long way."""

    def __init__(self, model):
        super().__init__()
        self.model, self.cfg = model, nami.NamiConfig(**{**model.cfg.to_dict(), "velocity": "local"})
        self.windows = nami.stage_windows(model.cfg.window_ratios, model.cfg.gamma)

    def forward(self, x, tau, txt, pooled, stage=None, guidance=None):
        s, e = self.windows[stage - 1]
        return (s - e) * self.model(x, tau, txt, pooled, stage, guidance)


def global_model(seed=0):
    cfg = nami.get_config("tiny", joint_attention_dim=8, pooled_projection_dim=8, velocity="global")
    return randomize(nami.Nami(cfg), seed).eval()


def test_algorithm1_loss_reads_a_global_model_in_local_units():
    model = global_model()
    g = torch.Generator().manual_seed(1)
    batch = (torch.randn(6, 3, 16, 16, generator=g), torch.randn(6, 4, 8, generator=g), torch.randn(6, 8, generator=g),
             torch.randn(6, 3, 16, 16, generator=g), torch.rand(6, generator=g), [1, 1, 2, 2, 3, 3], [2, 2, 2])
    windows, ranges = nami.stage_windows(), nami.tau_ranges()

    def loss(model):  # Algorithm 1's loss as train.py computes it, the velocity read as the model's config says
        theta = session.StageVelocity(model, windows)
        return train.Algorithm1Loss(theta, lambda x, eps: None, windows, ranges, [1, 1, 1])(*batch)
    as_global, long_way = loss(model), loss(ScaledToWindow(model))
    torch.testing.assert_close(as_global[1], long_way[1])
    read_as_local = global_model()  # the same weights, their output read as the local velocity
    read_as_local.cfg = nami.NamiConfig(**{**model.cfg.to_dict(), "velocity": "local"})
    assert not torch.allclose(loss(read_as_local)[1], as_global[1])


def test_the_sampler_integrates_the_local_velocity_of_a_global_model(encoder_dir):
    from common.encoders import TextEncoder
    model, encoder = global_model(), TextEncoder(encoder_dir, 8)
    model.context_embedder = torch.nn.Linear(encoder.dim, model.cfg.hidden_size)  # the encoder's width
    model.time_text_embed.text_embedder.linear_1 = torch.nn.Linear(encoder.pooled_dim, model.cfg.hidden_size)
    got = nami.generate(model, encoder, ["a red circle"], [5], 16, 16, [2, 2, 2])
    want = nami.generate(ScaledToWindow(model), encoder, ["a red circle"], [5], 16, 16, [2, 2, 2])
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)
    with pytest.raises(ValueError, match="windows"):
        nami.model_velocity(model, None, None)


def test_a_flat_run_converts_with_global_velocity_and_without_training(tmp_path, encoder_dir):
    """--velocity is recorded in config.json (a config without it is the release's "local"); --max-steps 0
    with --init-from saves the given weights as they are beside a pre-trained BridgeFlow, validated at step 0."""
    train.main(tiny_run(tmp_path / "flat", encoder_dir, mode="flat", max_steps=2, ckpt_every=2))
    train.main(tiny_run(tmp_path / "nami", encoder_dir, init_from=str(tmp_path / "flat"), velocity="global",
                        max_steps=0, val_samples=8))
    folder, saved, parts = checkpoint.load_checkpoint(tmp_path / "nami")
    assert folder.name == "ckpt-0000000" and saved["model"]["velocity"] == "global"
    flat = checkpoint.load_checkpoint(tmp_path / "flat")[2]
    assert all(torch.equal(parts["ema"][k], flat["ema"][k]) for k in flat["ema"])
    assert any(not torch.equal(v, torch.ones_like(v)) for k, v in parts["bridge"].items() if k.endswith("scale"))
    logged = [json.loads(line) for line in (tmp_path / "nami" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in logged] == [0] and set(logged[0]) >= {"val_loss_stage1", "val_loss_stage3"}
    del saved["model"]["velocity"]
    assert nami.NamiConfig.from_dict(saved["model"]).velocity == "local"
    with pytest.raises(ValueError, match="--max-steps 0 saves given weights untrained"):
        train.main(tiny_run(tmp_path / "none", encoder_dir, max_steps=0))


def test_the_validation_loss_is_logged_and_the_evaluation_command_repeats_it(tmp_path, encoder_dir):
    """Every --val-every steps, at step 0 and the last, into log.jsonl (the training lines keep their form);
    `python -m experiments.eval --val-loss` gives the last figure again, and the same figure twice to 1e-6."""
    train.main(tiny_run(tmp_path, encoder_dir, max_steps=4, ckpt_every=4, val_every=3, val_samples=10, log_every=1))
    lines = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    val = [r for r in lines if "val_loss" in r]
    assert [r["step"] for r in val] == [0, 3, 4] and all("loss" not in r for r in val)
    assert [r["step"] for r in lines if "loss" in r] == [1, 2, 3, 4]
    assert val[0]["val_loss"] == pytest.approx(sum(val[0][f"val_loss_stage{k}"] for k in (1, 2, 3)))
    first = evaluation.main(["--ckpt", str(tmp_path), "--val-loss", "--json"])
    again = evaluation.main(["--ckpt", str(tmp_path), "--val-loss", "--out", str(tmp_path / "v")])
    assert abs(first["val_loss"] - again["val_loss"]) <= 1e-6 and first["samples"] == 10
    assert first["val_loss"] == pytest.approx(val[-1]["val_loss"], abs=1e-6)
    assert len(first["per_t"]["3"]) == validation.POINTS and (tmp_path / "v" / "validation.json").is_file()
    checkpoint.plot_log(tmp_path)  # the plot draws the validation lines beside the training loss


def test_the_validation_loss_of_an_image_folder_needs_val_data(tmp_path, encoder_dir):
    for folder in ("train", "held"):
        (tmp_path / folder).mkdir()
        for i in range(6):
            Image.new("RGB", (32, 32), (40 * i, 200, 30 * i)).save(tmp_path / folder / f"{i}.png")
            (tmp_path / folder / f"{i}.txt").write_text(f"a colour number {i}")
    run = dict(resolution=32, max_steps=2, batch_size=6, ckpt_every=2, workers=0, data=str(tmp_path / "train"))
    train.main(tiny_run(tmp_path / "a", encoder_dir, **run))
    assert checkpoint.read_log(tmp_path / "a", validation=True) == []
    train.main(tiny_run(tmp_path / "b", encoder_dir, val_data=str(tmp_path / "held"), **run))
    val = checkpoint.read_log(tmp_path / "b", validation=True)
    assert [r["step"] for r in val] == [0, 2]
    with pytest.raises(SystemExit, match="give --val-data"):
        evaluation.main(["--ckpt", str(tmp_path / "a"), "--val-loss"])
