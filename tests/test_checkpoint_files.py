"""Checkpoint and weight files that are crafted or damaged (the Reliability issue): files crafted to run
code when unpickled (train_state.pt, DCP metadata and values, release .bin weights, a pickle named
.safetensors, an encoder folder naming custom code) are refused and run nothing; checkpoints are
found by their step, and only the trainer's own are pruned or resumed from; checkpoints whose
tensors do not fit their config name the first mismatch.

    python -m pytest -q tests/test_checkpoint_files.py    # about 40 s on 2 CPU cores
"""
from __future__ import annotations

import io
import json
import os
import pickle
import shutil
import time
from pathlib import Path
from unittest import mock

import pytest
import torch
from safetensors.torch import load_file, save_file

import conftest
import nami
import sample
import train
from common import encoders, parallel
import test_inputs
from test_inputs import tiny_run
from training import checkpoint, release

# test_inputs' fixtures: run_dir, a folder holding one checkpoint of a tiny run, and fresh_run, a copy to damage
run_dir, fresh_run = test_inputs.run_dir, test_inputs.fresh_run


# ----------------------------------------------------------------------------------------------
# untrusted checkpoint files
# ----------------------------------------------------------------------------------------------


class RunsCode:
    """Unpickling this object calls exec(), which writes the marker file: the shape of a
    checkpoint crafted to run code on the machine that loads it."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return exec, (f"open({self.marker!r}, 'w').write('code ran')",)


def crafted(path: Path, marker: Path, legacy: bool = False) -> Path:
    """A torch.save file (zip format, or the legacy plain pickle) that runs code when loaded
    without weights_only, to prove which it is: loaded here once the unsafe way, marker removed."""
    payload = {"optimizer": RunsCode(marker), "step": 2}
    if legacy:
        path.write_bytes(pickle.dumps(payload, protocol=2))  # torch's own legacy files use 2
        pickle.loads(path.read_bytes())  # the unsafe load: this is what a crafted file does
    else:
        torch.save(payload, path)
        torch.load(io.BytesIO(path.read_bytes()), weights_only=False)  # (torch.load reads a path
        # ending in .safetensors as safetensors; a buffer is what the file holds)
    assert marker.read_text() == "code ran"
    marker.unlink()
    return path


def test_crafted_train_state_is_refused_on_resume_and_runs_nothing(fresh_run, tmp_path, encoder_dir):
    marker = tmp_path / "MARKER"
    crafted(fresh_run / "ckpt-0000002" / "train_state.pt", marker)
    with pytest.raises(ValueError, match=r"train_state\.pt.*refused") as e:
        train.main(tiny_run(fresh_run, encoder_dir, max_steps=4, resume=True))
    assert not marker.exists(), "unpickling ran the crafted code"
    assert "weights_only" in str(e.value)


def test_crafted_dcp_metadata_is_refused_on_resume_and_runs_nothing(fresh_run, tmp_path, encoder_dir):
    """torch.distributed.checkpoint's own reader unpickles dcp/.metadata with plain pickle."""
    marker = tmp_path / "MARKER"
    (fresh_run / "ckpt-0000002" / "dcp").mkdir()
    crafted(fresh_run / "ckpt-0000002" / "dcp" / ".metadata", marker, legacy=True)
    with pytest.raises(ValueError, match=r"\.metadata was refused \(it names .*exec, .*nothing in it was run"):
        train.main(tiny_run(fresh_run, encoder_dir, max_steps=4, resume=True))
    assert not marker.exists(), "unpickling ran the crafted code"


def test_crafted_value_in_a_dcp_checkpoint_is_refused_and_runs_nothing(tmp_path):
    """DCP stores non-tensor values (the optimizer's settings) as pickles, which its default
    planner loads with weights_only=False: one of them replaced by a crafted pickle."""
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(model.parameters())
    parallel.save_sharded(tmp_path / "dcp", model, model, optimizer)
    metadata = pickle.loads((tmp_path / "dcp" / ".metadata").read_bytes())  # ours, as written above
    lr = next(i for i in metadata.storage_data if i.fqn == "optim.param_groups.0.lr")
    shard = tmp_path / "dcp" / metadata.storage_data[lr].relative_path
    blob = torch_bytes({"lr": RunsCode(tmp_path / "MARKER")})
    metadata.storage_data[lr].offset, metadata.storage_data[lr].length = shard.stat().st_size, len(blob)
    shard.write_bytes(shard.read_bytes() + blob)
    (tmp_path / "dcp" / ".metadata").write_bytes(pickle.dumps(metadata))
    with pytest.raises(ValueError, match=r"optim\.param_groups\.0\.lr.*refused \(weights_only loading.*GLOBAL .*exec"):
        parallel.load_sharded(tmp_path / "dcp", model, model, optimizer)
    assert not (tmp_path / "MARKER").exists(), "unpickling ran the crafted code"


@pytest.mark.parametrize("file", ["config.json", "tokenizer_config.json"])
def test_encoder_folder_that_names_custom_code_is_refused_without_a_prompt(encoder_dir, tmp_path, file):
    """transformers would run modeling_crafted.py with trust_remote_code, ask on a terminal without it,
    or silently load the built-in BERT in its place: we refuse the folder, saying why."""
    marker, folder = tmp_path / "MARKER", Path(shutil.copytree(encoder_dir, tmp_path / "encoder"))
    (folder / "modeling_crafted.py").write_text(f"open({str(marker)!r}, 'w').write('code ran')\n")
    settings = json.loads((folder / file).read_text())
    settings["auto_map"] = {"AutoConfig": "modeling_crafted.Config", "AutoModel": "modeling_crafted.Model",
                            "AutoTokenizer": ["modeling_crafted.Tokenizer", None]}
    (folder / file).write_text(json.dumps(settings))
    with mock.patch("builtins.input", side_effect=AssertionError("transformers prompted")):
        with pytest.raises(ValueError, match=rf"{file} names custom code .*trust_remote_code=False"):
            encoders.TextEncoder(folder, max_len=8)
    assert not marker.exists()


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy-pickle"])
def test_crafted_bin_weights_are_refused_by_read_state_dict_and_run_nothing(tmp_path, legacy):
    marker = tmp_path / "MARKER"
    path = crafted(tmp_path / "bridge_flow.bin", marker, legacy)
    with pytest.raises(ValueError, match=r"bridge_flow\.bin was refused: .*\(Unsupported global: GLOBAL exec .*\); "
                                         "nothing in it was run"):
        release.read_state_dict(path)
    assert not marker.exists(), "unpickling ran the crafted code"


@pytest.mark.parametrize("blob, message", [
    (lambda b: b[:len(b) // 2], "is not a readable PyTorch file"),
    (lambda b: b"", "is not a readable PyTorch file"),
    (lambda b: b"not a checkpoint", "was refused: .* or is not a PyTorch file"),
    (lambda b: torch_bytes([1, 2, 3]), "holds a list, not a state dict of named tensors"),
], ids=["cut-short", "empty", "garbage", "not-a-dict"])
def test_damaged_bin_weights_are_named(tmp_path, blob, message):
    path = tmp_path / "bridge_flow.bin"
    path.write_bytes(blob(torch_bytes({"scale": torch.ones(2)})))
    with pytest.raises(ValueError, match=rf"bridge_flow\.bin {message}"):
        release.read_state_dict(path)


def torch_bytes(obj) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def tiny_release(root: Path) -> Path:
    """A release-layout folder whose transformer has the tiny preset's shape (our module names are
    diffusers', so our state dict is one), with 32-d text like conftest's encoder: --init-from reads it."""
    (root / "transformer").mkdir(parents=True)
    model_config = nami.get_config("tiny", joint_attention_dim=32, pooled_projection_dim=32)
    torch.save(nami.Nami(model_config).state_dict(), root / "transformer" / "pytorch_model_fsdp.bin")
    (root / "transformer" / "config.json").write_text(json.dumps(dict(
        patch_size=1, in_channels=12, num_layers=1, num_single_layers=3, attention_head_dim=32, num_attention_heads=2,
        joint_attention_dim=32, pooled_projection_dim=32, axes_dims_rope=[8, 12, 12])))
    torch.save({"scale": torch.ones(2), "shift.0": torch.zeros(1, 3, 8, 8), "shift.1": torch.zeros(1, 3, 16, 16)},
               root / "bridge_flow.bin")
    return root


@pytest.mark.parametrize("file", ["release/transformer/pytorch_model_fsdp.bin", "release/bridge_flow.bin",
                                  "run/ckpt-0000002/weights.safetensors"])
def test_crafted_weights_are_refused_by_init_from_and_run_nothing(fresh_run, tmp_path, encoder_dir, file):
    """--init-from reads the release's pickles with weights_only and our weights with safetensors;
    a file crafted to run code when unpickled is refused, and nothing is trained from it."""
    tiny_release(tmp_path / "release")
    train.main(tiny_run(tmp_path / "control", encoder_dir, init_from=str(tmp_path / "release")))  # it loads as made
    marker = tmp_path / "MARKER"
    crafted(tmp_path / file, marker)
    message = r"weights\.safetensors there is damaged" if file.startswith("run") else \
        rf"{Path(file).name} was refused: .*GLOBAL exec.*nothing in it was run"
    with pytest.raises(ValueError, match=message):
        train.main(tiny_run(tmp_path / "new", encoder_dir, init_from=str(tmp_path / file.split("/")[0])))
    assert not marker.exists(), "unpickling ran the crafted code"
    assert checkpoint.latest_checkpoint(tmp_path / "new") is None


def test_pickle_saved_as_safetensors_is_refused_as_damaged(fresh_run, tmp_path):
    marker = tmp_path / "MARKER"
    ckpt = fresh_run / "ckpt-0000002"
    crafted(ckpt / "weights.safetensors", marker)
    with pytest.raises(SystemExit, match=r"error: .*ckpt-0000002.*damaged"):
        sample.main(["x", "--ckpt", str(ckpt), "--out", str(tmp_path / "s.png")])
    assert not marker.exists() and not (tmp_path / "s.png").exists()


# ----------------------------------------------------------------------------------------------
# checkpoints are found by their step, and only the trainer's own are pruned or resumed from
# ----------------------------------------------------------------------------------------------


def test_user_copies_of_checkpoints_are_never_resumed_from_or_pruned(fresh_run, encoder_dir):
    for name in ("ckpt-0000002-best", "ckpt-best"):
        shutil.copytree(fresh_run / "ckpt-0000002", fresh_run / name)
    (fresh_run / "ckpt-best" / "train_state.pt").write_bytes(b"resuming from this copy would fail")
    train.main(tiny_run(fresh_run, encoder_dir, max_steps=4, ckpt_every=1, keep=1, resume=True))
    assert sorted(p.name for p in fresh_run.glob("ckpt-*")) == ["ckpt-0000002-best", "ckpt-0000004", "ckpt-best"]
    assert checkpoint.latest_checkpoint(fresh_run).name == "ckpt-0000004"
    assert checkpoint.find_checkpoint(fresh_run).name == "ckpt-0000004"  # sample.py's and experiments/eval.py's lookup


def fake_checkpoint(folder: Path, age_s: float = 0) -> Path:
    folder.mkdir(parents=True)
    for name in checkpoint.FILES:
        (folder / name).write_bytes(b"")
    when = os.stat(folder).st_mtime - age_s
    os.utime(folder, (when, when))
    return folder


def test_steps_sort_as_numbers_and_the_lookup_takes_the_highest_step(tmp_path):
    run = tmp_path / "runs" / "a"
    for name in ("ckpt-10000000", "ckpt-9999999", "ckpt-00000005", "ckpt-10000000-copy", "ckpt-x"):
        fake_checkpoint(run / name, age_s=100)
    assert [p.name for p in checkpoint.complete_checkpoints(run)] == ["ckpt-9999999", "ckpt-10000000"]
    assert checkpoint.latest_checkpoint(run).name == checkpoint.find_checkpoint(run).name == "ckpt-10000000"
    # runs/ holds runs whose steps do not compare: the run that saved last, its highest step
    fake_checkpoint(tmp_path / "runs" / "b" / "ckpt-0000003", age_s=10)
    assert checkpoint.find_checkpoint(tmp_path / "runs") == tmp_path / "runs" / "b" / "ckpt-0000003"
    fake_checkpoint(run / "ckpt-0000001")  # the newest folder, but not the highest step of run a
    assert checkpoint.find_checkpoint(tmp_path / "runs") == run / "ckpt-10000000"


# ----------------------------------------------------------------------------------------------
# checkpoints whose tensors do not fit their config: the first mismatch is named
# ----------------------------------------------------------------------------------------------


def edit_weights(ckpt: Path, edit):
    tensors = load_file(ckpt / "weights.safetensors")
    edit(tensors)
    save_file(tensors, ckpt / "weights.safetensors")


@pytest.mark.parametrize("edit, message", [
    (lambda t: t.pop("ema.x_embedder.weight"),
     r"\(tiny\) does not match the model \(1 missing.*missing key 'x_embedder.weight'"),
    (lambda t: t.update({"ema.extra.weight": torch.zeros(2)}), r"1 unexpected.*unexpected key 'extra.weight'"),
    (lambda t: t.update({"ema.x_embedder.weight": torch.zeros(64, 3)}),
     r"'x_embedder.weight' has shape \(64, 3\), the model wants \(64, 12\)"),
    (lambda t: [t.pop(k) for k in list(t) if k.startswith("bridge.")], r"holds no bridge\.\* tensors"),
], ids=["missing", "extra", "shape", "no-bridge"])
def test_weights_that_do_not_fit_the_config_name_the_first_mismatch(fresh_run, edit, message):
    ckpt = fresh_run / "ckpt-0000002"
    edit_weights(ckpt, edit)
    with pytest.raises(ValueError, match=message):
        checkpoint.load_model(ckpt)


@pytest.mark.parametrize("claim, message", [
    (dict(hidden_size=10 ** 6, num_heads=31250), r"x_embedder\.weight' has shape \(64, 12\), the model wants "
                                                 r"\(1000000, 12\)"),
    (dict(depth_single=10 ** 9, cuts=[1, 2, 10 ** 9]), r"1000000000 single blocks: at most 1000"),
], ids=["width", "depth"])
def test_config_json_claiming_a_huge_model_is_refused_fast_without_building_it(fresh_run, claim, message):
    ckpt = fresh_run / "ckpt-0000002"
    config = json.loads((ckpt / "config.json").read_text())
    config["model"].update(claim)  # 10⁶ wide: 4·10¹² parameters; 10⁹ blocks: hours to build
    (ckpt / "config.json").write_text(json.dumps(config))
    started = time.perf_counter()
    with pytest.raises(ValueError, match=message):
        checkpoint.load_model(ckpt)
    assert time.perf_counter() - started < 30


def test_release_config_json_claiming_a_huge_model_is_refused(tmp_path):
    folder = tmp_path / "transformer"
    folder.mkdir()
    save_file({"x_embedder.weight": torch.zeros(16, 64)}, folder / "model.safetensors")
    (folder / "config.json").write_text(json.dumps(dict(
        patch_size=1, in_channels=64, num_layers=10 ** 9, num_single_layers=3, attention_head_dim=16,
        num_attention_heads=1, joint_attention_dim=8, pooled_projection_dim=8, axes_dims_rope=[4, 6, 6])))
    with pytest.raises(ValueError, match=r"1000000000 double and 3 single blocks: at most 1000"):
        release.load_transformer(folder)


def test_config_that_does_not_fit_the_weights_names_the_first_mismatch(fresh_run):
    ckpt = fresh_run / "ckpt-0000002"
    config = json.loads((ckpt / "config.json").read_text())
    config["model"].update(depth_single=4, cuts=[1, 2, 4])  # one single block more than was trained
    (ckpt / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"4 missing.*missing key 'single_transformer_blocks\.3\."):
        checkpoint.load_model(ckpt)


def test_tensor_name_without_a_part_prefix_is_named(fresh_run, tmp_path):
    ckpt = fresh_run / "ckpt-0000002"
    edit_weights(ckpt, lambda t: t.update({"stray": torch.zeros(1)}))
    with pytest.raises(SystemExit, match="stray"):
        sample.main(["x", "--ckpt", str(ckpt), "--out", str(tmp_path / "s.png")])


def test_checkpoint_of_another_shape_is_an_error_naming_the_mismatch(tmp_path, encoder_dir):
    train.main(conftest.tiny_run(tmp_path, encoder_dir, max_steps=1, ckpt_every=1))
    _, _, parts = checkpoint.load_checkpoint(tmp_path)
    other = nami.Nami(nami.get_config("tiny", hidden_size=32, axes_dim=(4, 6, 6), joint_attention_dim=32,
                                      pooled_projection_dim=32))
    with pytest.raises(ValueError, match="x_embedder.weight"):
        checkpoint.load_state(other, parts["model"], "ckpt")


@pytest.mark.parametrize("damage, message", [
    (lambda c: (c / "weights.safetensors").write_bytes((c / "weights.safetensors").read_bytes()[:1000]),
     r"ckpt-0000002: a \.safetensors file there is damaged"),
    (lambda c: (c / "config.json").write_text('{"model": '), r"config\.json is missing or damaged"),
    (lambda c: (c / "config.json").unlink(), r"config\.json is missing or damaged"),
], ids=["weights-cut-short", "config-not-json", "config-missing"])
def test_damaged_checkpoint_files_are_named_by_sample(fresh_run, tmp_path, damage, message):
    damage(fresh_run / "ckpt-0000002")
    with pytest.raises(SystemExit, match=message):
        sample.main(["x", "--ckpt", str(fresh_run / "ckpt-0000002"), "--out", str(tmp_path / "s.png")])
