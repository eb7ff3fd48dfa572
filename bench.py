"""Benchmarks. Sampling: NAMI against the flat baseline with the same total steps (paper
Table 2). Training (--train): samples/s, image tokens/s, peak memory and MFU of Algorithm 1.

    python bench.py                                  # default CPU preset at 32², 10+10+10 steps, CFG 3
    python bench.py --size 2b --res 1024 --cfg 1 --repeat 3 --dtype bf16     # GPU: paper Table 2
    python bench.py --flops --size 2b --res 1024 --text-len 256   # FLOPs per stage (meta device)
    python bench.py --train                          # training throughput of the default preset
    python bench.py --train --size 2b --res 1024 --batch 8 --mix 1:2:4 --dtype bf16 --activation-checkpointing

--res is in pixels; the 16-channel presets (0.6b, 2b) work on FLUX-VAE latents, 8× smaller.
Times depend only on the shapes, so the weights are random (the DiT init is replaced by
non-zero values so that no kernel sees special inputs). Both samplers run in the same process,
alternating, after a warm-up; medians of --repeat runs are printed.

MFU = model FLOPs per second / the device's peak. The FLOPs of one training step (forward and
backward) are counted by torch.utils.flop_counter; the peak is measured in the same run with a
large matrix product in bf16 and in fp32 (the training dtype's is used).
"""
from __future__ import annotations

import argparse
import resource
import statistics
import time

import torch

import nami
import parallel
from bridgeflow import BridgeFlow


def time_sampler(model, bridge, txt, pooled, res, steps, guidance, flat, dtype):
    eps = torch.randn(txt.shape[0], model.cfg.in_channels, res, res, device=txt.device)
    _, grids, full = nami.sampling_plan(model.cfg, steps, flat)
    velocity = nami.model_velocity(model, txt, pooled, torch.zeros_like(txt), torch.zeros_like(pooled),
                                   guidance, full, autocast=dtype == "bf16")
    sync(eps.device)
    marks = [time.perf_counter()]
    nami.progressive_sample(velocity, eps, grids, None if flat else bridge,
                            on_stage_end=lambda k, x: (sync(x.device), marks.append(time.perf_counter())))
    return [b - a for a, b in zip(marks[:-1], marks[1:])]


def latent_factor(cfg: nami.NamiConfig) -> int:
    """Pixels per latent cell: 8 for FLUX-VAE latents (16 channels), 1 in pixel space."""
    return 8 if cfg.in_channels == 16 else 1


def bench_config(size: str) -> nami.NamiConfig:
    return nami.get_config(size, in_channels=3) if size in ("small", "base", "tiny") else nami.get_config(size)


def random_model(cfg, device):
    torch.manual_seed(0)
    model = nami.Nami(cfg).to(device)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.02)
    return model


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def peak_flops(device, dtype, n=4096 if torch.cuda.is_available() else 2048, repeat=5):
    """The device's measured peak: the median FLOP/s of an n×n×n matrix product."""
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    a @ b
    times = []
    for _ in range(repeat):
        sync(device)
        t = time.perf_counter()
        for _ in range(4):
            a @ b
        sync(device)
        times.append((time.perf_counter() - t) / 4)
    return 2 * n ** 3 / statistics.median(times)


def peak_memory_gb(device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2 ** 30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20  # peak RSS of the process (KiB -> GiB)


def random_stage_inputs(cfg, counts, sizes, text_len: int, device):
    """Per stage k with counts[k−1] > 0 samples: (k, x̂_t at the stage's size, its target, τ, txt, pooled)."""
    def normal(*shape):
        return torch.randn(*shape, device=device)
    return [(k, normal(n, cfg.in_channels, s, s), normal(n, cfg.in_channels, s, s), torch.rand(n, device=device),
             normal(n, text_len, cfg.joint_attention_dim), normal(n, cfg.pooled_projection_dim))
            for k, (n, s) in enumerate(zip(counts, sizes), 1) if n > 0]


def train_bench(a):
    """Time Algorithm 1's training step (the model's forward and backward at every stage of a mixed
    batch, then AdamW) on random data."""
    from torch.utils.flop_counter import FlopCounterMode
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cfg = bench_config(a.size)
    K, f = cfg.num_stages, latent_factor(cfg)
    res = a.res // f
    nami.check_resolution(a.res, a.res, f * cfg.size_multiple, "--res")
    model = random_model(cfg, device).train()
    model.checkpointing = a.activation_checkpointing
    if a.compile:
        parallel.compile_blocks(model)
    ratios = [int(r) for r in a.mix.split(":")]
    if len(ratios) != K:
        raise SystemExit(f"error: --mix needs {K} ratios, got {a.mix}")
    counts = [round(a.batch * r / sum(ratios)) for r in ratios]
    counts[-1] = a.batch - sum(counts[:-1])
    B, sizes = a.batch, nami.stage_sizes(res, K)
    stages = random_stage_inputs(cfg, counts, sizes, a.text_len, device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def loss_of_step():
        """Eq. 4 summed over the stages, the model cut after each stage's blocks (train.Algorithm1Loss
        adds only elementwise pyramid, bridge and interpolation arithmetic around these calls)."""
        loss = 0.0
        for k, x_t, target, tau, txt, pooled in stages:
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=a.dtype == "bf16"):
                v = model(x_t, tau, txt, pooled, stage=k)
            loss = loss + nami.flow_loss(v, target)
        return loss

    def step():
        opt.zero_grad(set_to_none=True)
        loss_of_step().backward()
        opt.step()

    for _ in range(a.warmup):
        step()
    model.checkpointing = False  # model FLOPs: the recomputation of checkpointing is not counted
    with FlopCounterMode(display=False) as counter:
        loss_of_step().backward()
    flops = counter.get_total_flops()
    model.checkpointing = a.activation_checkpointing
    times = []
    for _ in range(a.repeat):
        sync(device)
        t0 = time.perf_counter()
        step()
        sync(device)
        times.append(time.perf_counter() - t0)
    step_time = statistics.median(times)
    peaks = {d: peak_flops(device, getattr(torch, d)) for d in ("bfloat16", "float32")}
    tokens = sum(n * (s // cfg.patch_size) ** 2 for n, s in zip(counts, sizes))
    print(f"train {a.size} at {a.res}² (latent {res}²), batch {B} as {counts} over the stages (mix {a.mix}), "
          f"{a.dtype}, activation checkpointing {a.activation_checkpointing}, compile {a.compile}, "
          f"{device_name(device)}, torch {torch.__version__}, median of {a.repeat} steps")
    print_train_table(step_time, B, tokens, flops, peaks, peaks["bfloat16" if a.dtype == "bf16" else "float32"], device)


def device_name(device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({torch.get_num_threads()} threads)"


def print_train_table(step_time, batch, tokens, flops, peaks, peak, device):
    print("| step | samples/s | image tokens/s | model TFLOP/step | achieved TFLOP/s | peak bf16 / fp32 TFLOP/s (measured) | MFU | peak memory |")
    print("|---|---|---|---|---|---|---|---|")
    print(f"| {step_time:.3f} s | {batch / step_time:.1f} | {tokens / step_time:,.0f} | {flops / 1e12:.3f} | "
          f"{flops / step_time / 1e12:.3f} | {peaks['bfloat16'] / 1e12:.2f} / {peaks['float32'] / 1e12:.2f} | "
          f"{100 * flops / step_time / peak:.1f} % | {peak_memory_gb(device):.2f} GiB |")


def count_flops(model, x, txt, pooled, stage) -> int:
    """FLOPs of one forward pass, counted by torch.utils.flop_counter (works on the meta device)."""
    from torch.utils.flop_counter import FlopCounterMode
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(x, torch.zeros(x.shape[0], device=x.device), txt, pooled, stage=stage)
    return counter.get_total_flops()


def flops_table(a):
    """Transformer FLOPs of one sample (batch 1, CFG doubles everything alike) per stage: NAMI, "flow
    only" (the stages with the full model) and flat (full model, full size, all steps), built on the
    meta device so that the 2b preset needs no memory. The saving of NAMI over flat splits into the
    piecewise flow (flat -> flow only) and the truncation (flow only -> NAMI)."""
    cfg = bench_config(a.size)
    K, f = cfg.num_stages, latent_factor(cfg)
    nami.check_resolution(a.res, a.res, f * cfg.size_multiple, "--res")
    steps = [int(s) for s in a.steps.split(",")]
    with torch.device("meta"):
        model = nami.Nami(cfg)
        txt = torch.empty(1, a.text_len, cfg.joint_attention_dim)
        pooled = torch.empty(1, cfg.pooled_projection_dim)
        sizes = nami.stage_sizes(a.res // f, K)
        nami_per = [count_flops(model, torch.empty(1, cfg.in_channels, s, s), txt, pooled, k)
                    for k, s in enumerate(sizes, 1)]
        full_per = [count_flops(model, torch.empty(1, cfg.in_channels, s, s), txt, pooled, None) for s in sizes]
    rows = {"NAMI": [n * s for n, s in zip(nami_per, steps)], "flow only": [n * s for n, s in zip(full_per, steps)]}
    flat = full_per[-1] * sum(steps)
    unit, scale = ("TFLOP", 1e12) if flat > 1e12 else ("GFLOP", 1e9)
    print(f"{a.size} at {a.res}² ({sizes[-1]}² latent), steps {steps} vs flat {sum(steps)}, {a.text_len} text "
          f"tokens, batch 1, no CFG: transformer {unit} per image (torch.utils.flop_counter, meta device)")
    print("| sampler | " + " | ".join(f"stage {k} ({s * f}²)" for k, s in enumerate(sizes, 1)) + " | total | vs flat |")
    print("|---" * (K + 3) + "|")
    print("| flat | " + " | ".join(["–"] * (K - 1)) + f" | {flat / scale:.2f} | {flat / scale:.2f} | – |")
    for name, per in rows.items():
        print(f"| {name} | " + " | ".join(f"{v / scale:.2f}" for v in per) +
              f" | {sum(per) / scale:.2f} | −{100 * (1 - sum(per) / flat):.1f} % |")
    piecewise = 100 * (1 - sum(rows["flow only"]) / flat)
    truncation = 100 * (sum(rows["flow only"]) - sum(rows["NAMI"])) / flat
    print(f"NAMI saves {piecewise + truncation:.1f} % of the flat model's FLOPs: {piecewise:.1f} points from the "
          f"piecewise flow (smaller stages), {truncation:.1f} from the truncation (fewer blocks). The paper's wall-clock "
          "split on an A100 is 53 + 11.8 points (Table 2).")
    return {"flat": flat, **{name: sum(per) for name, per in rows.items()}}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--train", action="store_true", help="training throughput and MFU instead of sampling time")
    ap.add_argument("--flops", action="store_true", help="count the transformer FLOPs per stage (meta device) instead")
    ap.add_argument("--size", default="small", choices=sorted(nami.PRESETS))
    ap.add_argument("--res", type=int, default=32, help="image side in pixels")
    ap.add_argument("--steps", default="10,10,10")
    ap.add_argument("--cfg", type=float, default=nami.DEFAULT_GUIDANCE, help="guidance (1 = no CFG, half the batch)")
    ap.add_argument("--batch", type=int, default=None, help="batch size (default: 1 sampling, 32 training)")
    ap.add_argument("--mix", default="1:2:4", help="--train: samples per stage, low -> high (paper's last phase)")
    ap.add_argument("--warmup", type=int, default=None,
                    help="untimed runs first (default: 3 training steps, or 1 sampling run of each sampler)")
    ap.add_argument("--activation-checkpointing", action="store_true", help="--train: recompute blocks in backward")
    ap.add_argument("--compile", action="store_true", help="--train: torch.compile each block")
    ap.add_argument("--text-len", type=int, default=16)
    ap.add_argument("--repeat", type=int, default=7)
    ap.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32")
    a = ap.parse_args(argv)
    if a.flops:
        return flops_table(a)
    if a.train:
        a.batch = a.batch or 32
        a.warmup = 3 if a.warmup is None else a.warmup
        return train_bench(a)
    a.batch = a.batch or 1
    cfg = bench_config(a.size)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = random_model(cfg, device).eval()
    K, f = cfg.num_stages, latent_factor(cfg)
    nami.check_resolution(a.res, a.res, f * cfg.size_multiple, "--res")
    res = a.res // f
    bridge = BridgeFlow(cfg.in_channels, [(s, s) for s in nami.stage_sizes(res, K)]).to(device)
    steps = [int(s) for s in a.steps.split(",")]
    txt = torch.randn(a.batch, a.text_len, cfg.joint_attention_dim, device=device)
    pooled = torch.randn(a.batch, cfg.pooled_projection_dim, device=device)
    args = (model, bridge, txt, pooled, res, steps, a.cfg)
    for _ in range(1 if a.warmup is None else a.warmup):
        time_sampler(*args, False, a.dtype), time_sampler(*args, True, a.dtype)
    runs = {"nami": [], "flat": []}
    for _ in range(a.repeat):
        runs["nami"].append(time_sampler(*args, False, a.dtype))
        runs["flat"].append(time_sampler(*args, True, a.dtype))
    med = {name: [statistics.median(r[i] for r in rs) for i in range(len(rs[0]))] for name, rs in runs.items()}
    tot = {name: statistics.median(sum(r) for r in rs) for name, rs in runs.items()}
    print(f"{a.size} at {a.res}², steps {steps}, cfg {a.cfg}, batch {a.batch}, {a.dtype}, "
          f"torch {torch.__version__}, {torch.cuda.get_device_name() if device.type == 'cuda' else f'{torch.get_num_threads()} threads'}, "
          f"median of {a.repeat}")
    sizes = nami.stage_sizes(a.res, K)
    print("| sampler | " + " | ".join(f"stage {k} ({s}²)" for k, s in enumerate(sizes, 1)) + " | total | reduction |")
    print("|---" * (K + 3) + "|")
    print("| flat | " + " | ".join(["–"] * (K - 1)) + f" | {med['flat'][0]:.3f} s | {tot['flat']:.3f} s | – |")
    print("| NAMI | " + " | ".join(f"{t:.3f} s" for t in med["nami"]) +
          f" | {tot['nami']:.3f} s | {100 * (1 - tot['nami'] / tot['flat']):.1f} % ({tot['flat'] / tot['nami']:.2f}× faster) |")
    return {"stages": med["nami"], "nami": tot["nami"], "flat": tot["flat"]}


if __name__ == "__main__":
    main()
