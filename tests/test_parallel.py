"""Scale-out on CPU with the gloo backend: torchrun with DDP and FSDP2 repeats the
one-process run with the same global batch, an FSDP2 checkpoint written by 2 ranks resumes on 1
and on 2, and the memory/speed flags leave the results unchanged.

    python -m pytest -q tests/test_parallel.py        # about a minute and a half on 2 cores
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import nami
import train
from common import parallel
from training import checkpoint, config

ROOT = Path(__file__).resolve().parents[1]
# batch 8 = 2 micro-batches of 4: one process accumulates both, two ranks take one each
RUN = ["--size", "tiny", "--resolution", "16", "--vae", "none", "--world-level", "3", "--no-jump-noise",
       "--batch-size", "8", "--micro-batch", "4", "--warmup", "2",
       "--bridge-steps", "5", "--text-len", "16", "--sample-every", "1000000", "--log-every", "1", "--no-progress"]
TOLERANCE = 1e-4  # relative, on each step's loss: the same sums, taken in another order and batching


def one_process(out, encoder, **kw):
    cfg = config.parse_args([*RUN, "--text-encoder", encoder, "--out", str(out)])
    for k, v in kw.items():
        setattr(cfg, k, v)
    return train.main(cfg)


def torchrun(out, encoder, *extra, ranks=2):
    """train.py on `ranks` gloo ranks, each recording the files it writes (tests/rank_writes.py): besides
    repeating one process, no two ranks may write, rename or delete one file name below the run's folder."""
    record = Path(f"{out}.writes")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}",
           str(ROOT / "tests" / "rank_writes.py"), str(record), str(Path(out).parent), str(ROOT / "train.py"),
           *RUN, "--text-encoder", encoder, "--out", str(out), *extra]
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    if r.returncode != 0:  # the whole of both streams beside the run, the end of each in the message
        log = Path(f"{out}.torchrun.log")
        log.write_text(f"$ {' '.join(cmd)}\n--- stdout\n{r.stdout}\n--- stderr\n{r.stderr}")
        raise AssertionError(f"torchrun exited with {r.returncode} (both streams whole in {log})\n--- stdout, "
                             f"last lines\n{r.stdout[-2000:]}\n--- stderr, last lines\n{r.stderr[-6000:]}")
    assert shared_writes(record, ranks) == {}
    return r


def shared_writes(record: Path, ranks: int) -> dict:
    """{path: ranks} of the files more than one rank wrote, renamed or deleted (tests/rank_writes.py)."""
    by_path: dict[str, list[int]] = {}
    for rank in range(ranks):
        for path in json.loads(Path(f"{record}-rank{rank}.json").read_text()):
            by_path.setdefault(path, []).append(rank)
    return {path: seen for path, seen in by_path.items() if len(seen) > 1}


def losses(out) -> list[float]:
    return [r["loss"] for r in checkpoint.read_log(out)]


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


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_init_from_on_two_ranks_repeats_the_one_process_run(tmp_path, encoder_dir, reference, strategy):
    """--init-from under torchrun: every rank reads the source and copies into its replica (DDP) or
    its own shard of each parameter (FSDP2, parallel.fill_shard), one parameter at a time; the
    losses from the first step on are those of one process started from the same checkpoint."""
    one_process(tmp_path / "one", encoder_dir, max_steps=2, init_from=str(reference))
    torchrun(tmp_path / "two", encoder_dir, "--parallel", strategy, "--max-steps", "2", "--init-from", str(reference))
    assert losses(tmp_path / "two") == pytest.approx(losses(tmp_path / "one"), rel=TOLERANCE)
    assert losses(tmp_path / "one")[0] < 0.95 * losses(reference)[0]  # not a new model: 0.62 against 0.68
    recorded = [json.loads((checkpoint.latest_checkpoint(tmp_path / run) / "config.json").read_text())["init_from"]
                for run in ("one", "two")]
    assert recorded[0] == recorded[1] and recorded[0]["step"] == 4


def test_fsdp_checkpoint_of_two_ranks_resumes_on_one_and_on_two(tmp_path, encoder_dir, reference):
    """Also the run folder's other files under two ranks (torchrun checks that no two ranks write one name):
    TensorBoard's, resumed with its purge step, and the pruning of old checkpoints (--keep 1)."""
    torchrun(tmp_path / "two", encoder_dir, "--parallel", "fsdp", "--max-steps", "4", "--stop-after", "2", "--tensorboard")
    assert (tmp_path / "two" / "ckpt-0000002" / "dcp").is_dir()
    subprocess.run(["cp", "-r", str(tmp_path / "two"), str(tmp_path / "one")], check=True)
    torchrun(tmp_path / "two", encoder_dir, "--parallel", "fsdp", "--max-steps", "4", "--resume", "--tensorboard",
             "--keep", "1")
    assert [p.name for p in checkpoint.complete_checkpoints(tmp_path / "two")] == ["ckpt-0000004"]
    assert list((tmp_path / "two" / "tensorboard").iterdir())
    resumed = one_process(tmp_path / "one", encoder_dir, max_steps=4, resume=True)
    assert losses(tmp_path / "two") == pytest.approx(losses(reference), rel=TOLERANCE)
    assert resumed["losses"] == pytest.approx(losses(reference)[2:], rel=TOLERANCE)


def test_fsdp_run_whose_batches_lack_a_stage_keeps_the_one_process_weights(tmp_path, encoder_dir):
    """When a phase's global batch has no stage-3 sample, the blocks only stage 3 runs get no
    gradient on any rank. They must stay as they are, as in one process: FSDP2's
    set_reduce_scatter_unused_params (torch 2.13) gave them zero gradients instead, which AdamW's
    momentum from the earlier phase kept moving."""
    mix = ["--stage-mix", "1:1:1,1:1:0", "--mix-fractions", "0.5,0.5", "--max-steps", "4", "--ckpt-every", "4"]
    torchrun(tmp_path / "two", encoder_dir, "--parallel", "fsdp", *mix)
    cfg = config.parse_args([*RUN, "--text-encoder", encoder_dir, "--out", str(tmp_path / "one"), *mix])
    train.main(cfg)
    _, _, two = checkpoint.load_checkpoint(tmp_path / "two")
    _, _, one = checkpoint.load_checkpoint(tmp_path / "one")
    stage3_only = [k for k in one["model"] if k.startswith("single_transformer_blocks.") and
                   int(k.split(".")[1]) >= nami.get_config("tiny").cuts[1]]
    assert stage3_only
    for key in stage3_only:
        assert torch.allclose(two["model"][key], one["model"][key], rtol=1e-4, atol=1e-6), key


def check_out_many_times(out: str, start, refusals, rounds: int):
    """One rank's start-up check of --out, `rounds` times; the first refusal's message goes to `refusals`."""
    start.wait()
    for _ in range(rounds):
        try:
            config.check_writable(Path(out))
        except ValueError as e:
            refusals.put(str(e))
            return


def test_ranks_checking_one_out_folder_at_once_never_refuse_it(tmp_path):
    """Every torchrun rank validates its settings, --out included, at the same moment. A probe file of one
    name, written and deleted by each rank, failed when another rank deleted it first ("--out … cannot be
    written (No such file or directory)"), and README's test command with it, under load."""
    import multiprocessing
    context = multiprocessing.get_context("fork")
    ranks, rounds = 4, 300
    start, refusals = context.Barrier(ranks), context.Queue()
    processes = [context.Process(target=check_out_many_times, args=(str(tmp_path / "run"), start, refusals, rounds))
                 for _ in range(ranks)]
    for process in processes:
        process.start()
    for process in processes:
        process.join(timeout=120)
    assert [process.exitcode for process in processes] == [0] * ranks
    assert refusals.empty(), refusals.get()
    assert list((tmp_path / "run").iterdir()) == []  # no probe left behind


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


def test_compiled_blocks_take_any_batch_size_without_recompiling():
    """Per-stage batch sizes change from phase to phase (and micro-batch to micro-batch): with the
    batch dimension static every new size compiled every block again, near dynamo's recompile
    limit. One graph per block and stage resolution, whatever the batch."""
    from torch._dynamo.utils import counters
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = nami.Nami(nami.get_config("tiny", joint_attention_dim=8, pooled_projection_dim=8))
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.2)
    inputs = {n: (torch.randn(n, 3, 16, 16), torch.rand(n), torch.randn(n, 5, 8), torch.randn(n, 8)) for n in (2, 3, 5)}
    eager = {n: model(*args, stage=1) for n, args in inputs.items()}
    parallel.compile_blocks(model)
    before = counters["stats"]["unique_graphs"]
    for n, args in inputs.items():
        torch.testing.assert_close(model(*args, stage=1), eager[n], atol=1e-5, rtol=1e-5)
    blocks_at_stage_1 = sum(model.blocks_run(1))
    assert counters["stats"]["unique_graphs"] - before == blocks_at_stage_1


def test_time_input_stays_float32_under_fsdp2_bf16(tmp_path):
    """FSDP2's MixedPrecisionPolicy casts forward inputs to bf16; τ·1000 in bf16 is off by up to 3
    (an Euler step is 30), so the time embedding must see τ in float32."""
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    script = tmp_path / "fsdp_tau.py"
    script.write_text(f"""
import sys; sys.path.insert(0, {str(ROOT)!r})
import torch, torch.distributed as dist
import nami
from common import parallel
dist.init_process_group("gloo", init_method="tcp://127.0.0.1:{port}", rank=0, world_size=1)
seen, real = [], nami.timestep_embedding
nami.timestep_embedding = lambda t, *a, **k: (seen.append(t.detach().clone()), real(t, *a, **k))[1]
torch.manual_seed(0)
model = parallel.shard_model(nami.Nami(nami.get_config("tiny", joint_attention_dim=8, pooled_projection_dim=8)), bf16=True)
tau = torch.tensor([0.7431, 0.0123])
v = model(torch.randn(2, 3, 16, 16), tau, torch.randn(2, 5, 8), torch.randn(2, 8), stage=2)
print(seen[0].dtype, float((seen[0].double() - tau.double() * 1000).abs().max()), v.dtype, bool(v.isfinite().all()))
dist.destroy_process_group()
""")
    r = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    dtype, error, out_dtype, finite = r.stdout.split()
    assert dtype == "torch.float32" and float(error) < 1e-4 and finite == "True", r.stdout


# ----------------------------------------------------------------------------------------------
# The CUDA path, as far as a CPU can check it
# ----------------------------------------------------------------------------------------------


def test_process_group_on_gpus_serves_the_cpu_tensors_of_the_collectives(monkeypatch):
    """On GPUs the group must also serve CPU tensors: the stop and finite-weights agreements and
    the per-stage counts are small CPU tensors, and NCCL alone refuses them ("No backend type
    associated with device type cpu"), which stopped every torchrun run at step 1."""
    import torch.distributed as dist
    calls = {}
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "1")
    monkeypatch.setenv("LOCAL_RANK", "0")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: None)
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    monkeypatch.setattr(dist, "init_process_group", lambda backend=None, **kw: calls.update(backend=backend, **kw))
    where = parallel.init_distributed()
    assert where.device == torch.device("cuda", 0)
    served = dict(part.split(":") for part in calls["backend"].split(","))
    assert served == {"cpu": "gloo", "cuda": "nccl"}, calls["backend"]


def test_gpu_check_runs_every_part_at_toy_size(tmp_path):
    """`python -m experiments.bench --gpu-check` is what a lent GPU runs; its --tiny form runs every part on a
    CPU (gloo for NCCL, the tiny preset for 2b), so that the command cannot rot unnoticed."""
    r = subprocess.run([sys.executable, "-m", "experiments.bench", "--gpu-check", "--tiny", "--out", str(tmp_path)], cwd=ROOT,
                       capture_output=True, text=True, timeout=1500)
    table = r.stdout[r.stdout.index("| part | status |"):]
    rows = [line.split(" | ") for line in table.splitlines()[2:] if line.startswith("| ")]
    assert r.returncode == 0 and len(rows) == 8 and all(row[1] == "ok" for row in rows), r.stdout[-4000:] + r.stderr[-2000:]
    assert "torch " + torch.__version__ in r.stdout and (tmp_path / "sample.png").is_file()
