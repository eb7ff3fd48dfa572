"""Faults injected into training (docs/reliability.md): SIGKILL at random moments and in the middle of a
checkpoint write, exact resume, a disk that fills up, non-finite losses, Ctrl-C / SIGTERM.

    python -m pytest -q tests/test_faults.py          # the tests (a few kills; about a minute)
    python -m tests.test_faults --kills 60            # the longer kill campaign reported in docs/reliability.md
"""
from __future__ import annotations

import argparse
import errno
import json
import math
import os
import random
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

import nami
import train
from common import files
from conftest import tiny_encoder
from training import checkpoint

ROOT = Path(__file__).resolve().parents[1]
RUN = dict(size="tiny", resolution=16, vae=None, world_level=3, jump_noise=False, batch_size=8, warmup=2, bridge_steps=5, text_len=16, sample_every=10 ** 6)


@pytest.fixture(scope="module")
def encoder(encoder_dir):
    return encoder_dir


def config(out, encoder, **kw) -> train.TrainConfig:
    return train.TrainConfig(**{**RUN, "text_encoder": encoder, "out": str(out), "progress": False, **kw})


def cli_args(out, encoder, max_steps, ckpt_every=1) -> list[str]:
    return [sys.executable, str(ROOT / "train.py"), "--size", "tiny", "--resolution", "16", "--vae", "none", "--world-level", "3",
            "--no-jump-noise", "--batch-size", "8", "--warmup", "2", "--bridge-steps", "5", "--text-len", "16", "--sample-every", "1000000",
            "--text-encoder", encoder, "--out", str(out), "--max-steps", str(max_steps),
            "--ckpt-every", str(ckpt_every), "--no-progress", "--resume"]


def weights(folder: Path) -> dict:
    return load_file(checkpoint.latest_checkpoint(folder) / "weights.safetensors")


def log_records(folder: Path) -> list[dict]:
    """log.jsonl without the wall-clock field (the only one allowed to differ between runs)."""
    records = checkpoint.read_log(folder)
    return [{k: v for k, v in r.items() if k != "images_per_s"} for r in records]


def check_checkpoints_complete(folder: Path):
    """Every ckpt-* folder on disk is complete and loads (weights, config, weights_only state)."""
    for ckpt in folder.glob(f"{checkpoint.PREFIX}*"):
        assert {p.name for p in ckpt.iterdir()} == set(checkpoint.FILES), ckpt
        checkpoint.load_checkpoint(ckpt)
        torch.load(ckpt / "train_state.pt", weights_only=True)


def wait_for(predicate, proc, timeout=120.0, poll=0.0005):
    """Poll until predicate() or the process ends; True if the predicate came first."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if predicate():
            return True
        if proc.poll() is not None:
            return False
        time.sleep(poll)
    raise TimeoutError("training subprocess made no progress")


def kill_campaign(out: Path, encoder: str, kills: int, max_steps: int, seed: int = 0) -> dict:
    """Start `train.py --resume` again and again, each time SIGKILLing it: at a random moment
    after a checkpoint appeared, or (every other time) the instant a checkpoint is being written.
    Returns counts; the last start runs to the end."""
    rng = random.Random(seed)
    stats = {"kills": 0, "during_save": 0, "resumed": 0, "starts": 0}
    while True:
        stats["starts"] += 1
        before = checkpoint.latest_checkpoint(out) if out.exists() else None
        proc = subprocess.Popen(cli_args(out, encoder, max_steps), cwd=ROOT, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
        if stats["kills"] < kills:
            if stats["kills"] % 2:   # the instant a temporary checkpoint folder exists
                hit = wait_for(lambda: any(out.glob(f".tmp-{checkpoint.PREFIX}*")), proc)
            else:                    # a random moment once this start has written a checkpoint
                hit = wait_for(lambda: checkpoint.latest_checkpoint(out) not in (None, before), proc)
                time.sleep(rng.uniform(0, 0.05))
            if hit and proc.poll() is None:
                proc.send_signal(signal.SIGKILL)
                proc.wait()
                stats["kills"] += 1
                stats["during_save"] += any(out.glob(f".tmp-{checkpoint.PREFIX}*"))
                check_checkpoints_complete(out)
                continue
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err[-2000:]
        stats["resumed"] += "resumed from" in _
        return stats


def test_sigkill_at_random_moments_and_mid_save_loses_nothing(tmp_path, encoder):
    """Killed runs resume from the last complete checkpoint; no checkpoint on disk is ever partial,
    and the run ends with exactly the weights and log of a run that was never killed."""
    straight = train.main(config(tmp_path / "straight", encoder, max_steps=8, ckpt_every=1))
    stats = kill_campaign(tmp_path / "killed", encoder, kills=4, max_steps=8)
    assert stats["kills"] == 4 and stats["resumed"] == 1
    a, b = weights(tmp_path / "straight"), weights(tmp_path / "killed")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert log_records(tmp_path / "straight") == log_records(tmp_path / "killed")
    assert not list((tmp_path / "killed").glob(".tmp-*"))
    assert len(straight["losses"]) == 8


def test_stop_and_resume_repeat_data_rng_ema_and_lr_exactly(tmp_path, encoder):
    straight = train.main(config(tmp_path / "a", encoder, max_steps=9, ckpt_every=3, log_every=1))
    parts = [train.main(config(tmp_path / "b", encoder, max_steps=9, ckpt_every=3, log_every=1, stop_after=s,
                               resume=s > 3)) for s in (3, 5, 9)]
    assert sum((p["losses"] for p in parts), []) == straight["losses"]
    assert log_records(tmp_path / "a") == log_records(tmp_path / "b")  # loss, lr, grad norm per step
    a, b = weights(tmp_path / "a"), weights(tmp_path / "b")
    assert all(torch.equal(a[k], b[k]) for k in a)  # model, EMA and BridgeFlow


def test_a_new_run_never_overwrites_an_old_one(tmp_path, encoder):
    train.main(config(tmp_path, encoder, max_steps=2, ckpt_every=2))
    with pytest.raises(ValueError, match="--resume"):
        train.main(config(tmp_path, encoder, max_steps=2, ckpt_every=2))


def test_disk_full_during_a_save_keeps_the_previous_checkpoint(tmp_path, encoder, monkeypatch):
    real_save, calls = checkpoint.save_file, []

    def save_then_fill_the_disk(tensors, path):
        calls.append(path)
        if len(calls) == 2:
            with open(path, "wb") as f:  # a partial file, then the disk is full
                f.write(b"\0" * 100)
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real_save(tensors, path)

    monkeypatch.setattr(checkpoint, "save_file", save_then_fill_the_disk)
    with pytest.raises(checkpoint.TrainingStopped, match=r"No space left.*ckpt-0000002 is intact"):
        train.main(config(tmp_path, encoder, max_steps=4, ckpt_every=2))
    assert [p.name for p in checkpoint.complete_checkpoints(tmp_path)] == ["ckpt-0000002"]
    assert not list(tmp_path.glob(".tmp-*"))
    check_checkpoints_complete(tmp_path)
    monkeypatch.setattr(checkpoint, "save_file", real_save)  # space freed: the run resumes and finishes
    assert len(train.main(config(tmp_path, encoder, max_steps=4, ckpt_every=2, resume=True))["losses"]) == 2


def test_unwritable_output_is_refused_before_any_work(tmp_path, encoder):
    (tmp_path / "file").write_text("not a folder")
    with pytest.raises(ValueError, match="cannot be written"):
        train.main(config(tmp_path / "file" / "run", encoder, max_steps=2))


def nan_loss_at(monkeypatch, bad_calls):
    """Make nami.flow_loss return NaN at the given call numbers (one call per stage and step; the runs that
    use it leave the validation loss off, whose calls would shift the count)."""
    real, calls = nami.flow_loss, [0]

    def flow_loss(v, target):
        calls[0] += 1
        loss = real(v, target)
        return loss * float("nan") if calls[0] in bad_calls else loss
    monkeypatch.setattr(nami, "flow_loss", flow_loss)


def test_a_non_finite_step_is_skipped_and_counted(tmp_path, encoder, monkeypatch):
    nan_loss_at(monkeypatch, {3 * 2 + 2})  # step 3, its second stage
    result = train.main(config(tmp_path, encoder, max_steps=5, ckpt_every=5, log_every=1, val_every=0))
    assert result["skipped_steps"] == 1 and math.isnan(result["losses"][2])
    assert all(math.isfinite(l) for i, l in enumerate(result["losses"]) if i != 2)
    records = log_records(tmp_path)
    assert records[2]["grad_norm"] is None and records[-1]["skipped_steps"] == 1
    assert all(torch.isfinite(v).all() for v in weights(tmp_path).values())


def test_non_finite_steps_in_a_row_stop_with_step_stage_and_last_good_checkpoint(tmp_path, encoder, monkeypatch):
    nan_loss_at(monkeypatch, set(range(3 * 4 + 1, 1000)))  # every stage from step 5 on
    with pytest.raises(checkpoint.TrainingStopped, match=r"3 steps in a row.*step 7 \(stage 1 loss\).*ckpt-0000006"):
        train.main(config(tmp_path, encoder, max_steps=20, ckpt_every=2, max_bad_steps=3, val_every=0))
    # skipped steps leave the weights untouched, so the checkpoint of step 6 holds step 4's weights
    a, b = (load_file(tmp_path / f"ckpt-000000{s}" / "weights.safetensors") for s in (4, 6))
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_ctrl_c_and_sigterm_write_a_final_checkpoint_and_exit_cleanly(tmp_path, encoder, sig):
    proc = subprocess.Popen(cli_args(tmp_path, encoder, max_steps=100000, ckpt_every=1000), cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert wait_for(lambda: (tmp_path / "log.jsonl").is_file() and '"loss"' in (tmp_path / "log.jsonl").read_text(),
                    proc, poll=0.05)  # the first training line (the validation's of step 0 comes before it)
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err[-2000:]
    assert f"stopped by {sig.name}" in out
    ckpt = checkpoint.latest_checkpoint(tmp_path)
    assert ckpt is not None and int(ckpt.name.split("-")[1]) >= 10  # the first log line came at step 10
    check_checkpoints_complete(tmp_path)


# ----------------------------------------------------------------------------------------------
# two processes, one folder: the OS lock of the run folder and of the cache (files.lock_folder)
# ----------------------------------------------------------------------------------------------


def started(out: Path, proc) -> bool:
    """Wait until a training process has opened its log (it holds its folders' locks by then)."""
    return wait_for(lambda: (out / "log.jsonl").is_file(), proc, poll=0.05)


def train_in_background(out: Path, encoder: str, *extra):
    return subprocess.Popen([*cli_args(out, encoder, max_steps=10 ** 6, ckpt_every=10 ** 6), *extra], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def run(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *map(str, args)], cwd=ROOT, capture_output=True, text=True, timeout=300)


def test_a_second_run_on_the_same_folder_is_refused_naming_the_holder(tmp_path, encoder):
    """A job requeued while the old one still runs: the second train.py is refused, naming the
    first's PID and host, and the first runs on; the lock dies with its holder (SIGKILL)."""
    out = tmp_path / "run"
    first = train_in_background(out, encoder)
    try:
        assert started(out, first)
        second = run(*cli_args(out, encoder, max_steps=2)[1:])
        assert second.returncode != 0 and f"PID {first.pid} on host {socket.gethostname()}" in second.stderr
        assert first.poll() is None, "the first run was disturbed"
    finally:
        first.kill()
        first.wait()
    files.lock_folder(out).release()  # free again at once: no stale lock after a kill


def test_a_cache_is_not_rebuilt_while_a_run_reads_it_nor_read_while_it_is_built(tmp_path, encoder):
    images, cache = tmp_path / "images", tmp_path / "cache"
    images.mkdir()
    for i in range(4):
        Image.new("RGB", (16, 16), (60 * i, 0, 0)).save(images / f"{i}.png")
        (images / f"{i}.txt").write_text(f"red {i}")
    build = ["-m", "datafeed", "cache", images, "--out", cache, "--resolution", "16", "--text-encoder", encoder,
             "--text-len", "16", "--dtype", "fp32"]
    assert run(*build).returncode == 0
    built = (cache / "cache.json").read_bytes()
    reader = train_in_background(tmp_path / "run", encoder, "--cache", str(cache), "--workers", "0")
    try:
        assert started(tmp_path / "run", reader)
        rebuild = run(*build)
        assert rebuild.returncode != 0 and f"PID {reader.pid} on host" in rebuild.stderr
        assert (cache / "cache.json").read_bytes() == built and reader.poll() is None
    finally:
        reader.kill()
        reader.wait()
    builder = files.lock_folder(cache, purpose="python -m datafeed cache")  # as a build in progress holds it
    try:
        refused = run(*cli_args(tmp_path / "run2", encoder, max_steps=2)[1:], "--cache", cache)
        assert refused.returncode != 0 and f"PID {os.getpid()} on host" in refused.stderr
    finally:
        builder.release()


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description="the SIGKILL campaign of docs/reliability.md")
    ap.add_argument("--kills", type=int, default=60)
    ap.add_argument("--steps", type=int, default=80)
    ap.add_argument("--out", default="runs/kill-campaign")
    a = ap.parse_args()
    out = Path(a.out)
    if out.exists():
        raise SystemExit(f"{out} exists: remove it or pass another --out")
    enc = tiny_encoder(out / "encoder")
    t0 = time.time()
    train.main(config(out / "straight", enc, max_steps=a.steps, ckpt_every=1))
    stats = kill_campaign(out / "killed", enc, a.kills, a.steps)
    same = all(torch.equal(x, y) for x, y in zip(weights(out / "straight").values(), weights(out / "killed").values()))
    same_log = log_records(out / "straight") == log_records(out / "killed")
    print(json.dumps({**stats, "final_weights_equal": same, "log_equal": same_log,
                      "minutes": round((time.time() - t0) / 60, 1)}))
