"""Scale-out on CPU with the gloo backend (issue 5): torchrun with DDP and FSDP2 repeats the
one-process run with the same global batch, an FSDP2 checkpoint written by 2 ranks resumes on 1
and on 2, and the memory/speed flags leave the results unchanged.

    python -m pytest -q test_parallel.py        # about a minute and a half on 2 cores
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import checkpoint
import config
import nami
import train

ROOT = Path(__file__).parent
# batch 8 = 2 micro-batches of 4: one process accumulates both, two ranks take one each
RUN = ["--size", "tiny", "--resolution", "16", "--batch-size", "8", "--micro-batch", "4", "--warmup", "2",
       "--bridge-steps", "5", "--text-len", "16", "--sample-every", "1000000", "--log-every", "1", "--no-progress"]
TOLERANCE = 1e-4  # relative, on each step's loss: the same sums, taken in another order and batching


def one_process(out, encoder, **kw):
    cfg = config.parse_args([*RUN, "--text-encoder", encoder, "--out", str(out)])
    for k, v in kw.items():
        setattr(cfg, k, v)
    return train.main(cfg)


def torchrun(out, encoder, *extra, ranks=2):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}",
           str(ROOT / "train.py"), *RUN, "--text-encoder", encoder, "--out", str(out), *extra]
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    return r


def losses(out) -> list[float]:
    return [json.loads(l)["loss"] for l in (Path(out) / "log.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def reference(tmp_path_factory, encoder_dir):
    out = tmp_path_factory.mktemp("one_process")
    one_process(out, encoder_dir, max_steps=4, ckpt_every=2)
    return out


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_two_ranks_repeat_the_one_process_run(tmp_path, encoder_dir, reference, strategy):
    torchrun(tmp_path, encoder_dir, "--parallel", strategy, "--max-steps", "4", "--ckpt-every", "2")
    assert losses(tmp_path) == pytest.approx(losses(reference), rel=TOLERANCE)
    # the single-file export holds the whole (unsharded) EMA, readable on one device
    _, _, mine = checkpoint.load_checkpoint(tmp_path)
    _, _, ref = checkpoint.load_checkpoint(reference)
    for key, value in ref["ema"].items():
        assert torch.allclose(mine["ema"][key], value, rtol=1e-3, atol=1e-5), key
    if strategy == "fsdp":
        assert (checkpoint.latest_checkpoint(tmp_path) / "dcp" / ".metadata").is_file()


def test_fsdp_checkpoint_of_two_ranks_resumes_on_one_and_on_two(tmp_path, encoder_dir, reference):
    torchrun(tmp_path / "two", encoder_dir, "--parallel", "fsdp", "--max-steps", "4", "--stop-after", "2")
    assert (tmp_path / "two" / "ckpt-0000002" / "dcp").is_dir()
    subprocess.run(["cp", "-r", str(tmp_path / "two"), str(tmp_path / "one")], check=True)
    torchrun(tmp_path / "two", encoder_dir, "--parallel", "fsdp", "--max-steps", "4", "--resume")
    resumed = one_process(tmp_path / "one", encoder_dir, max_steps=4, resume=True)
    assert losses(tmp_path / "two") == pytest.approx(losses(reference), rel=TOLERANCE)
    assert resumed["losses"] == pytest.approx(losses(reference)[2:], rel=TOLERANCE)


def test_activation_checkpointing_gives_the_same_gradients():
    torch.manual_seed(0)
    cfg = nami.get_config("tiny", joint_attention_dim=8, pooled_projection_dim=8)
    model = nami.Nami(cfg)
    for p in model.parameters():  # random everywhere, so that every block matters
        torch.nn.init.normal_(p, std=0.2)
    x, tau, txt, pooled = torch.randn(2, 3, 16, 16), torch.rand(2), torch.randn(2, 5, 8), torch.randn(2, 8)
    grads = []
    for checkpointing in (False, True):
        model.zero_grad()
        model.checkpointing = checkpointing
        model(x, tau, txt, pooled, stage=2).square().mean().backward()
        grads.append([p.grad.clone() for p in model.parameters() if p.grad is not None])
    assert len(grads[0]) == len(grads[1]) > 0
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(*grads))


def test_compiled_block_gives_the_eager_result():
    torch.manual_seed(0)
    block = nami.SingleStreamBlock(32, 2, 4.0)
    for p in block.parameters():
        torch.nn.init.normal_(p, std=0.2)
    x, vec = torch.randn(2, 20, 32), torch.randn(2, 32)
    pe = nami.rope(torch.cat([torch.zeros(4, 3, dtype=torch.long), nami.image_ids(4, 4)]), (4, 6, 6), 10000)
    eager = block(x, vec, pe)
    block.compile(dynamic=False)
    compiled = block(x, vec, pe)
    assert torch.allclose(eager, compiled, atol=1e-5)
