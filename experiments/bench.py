"""Benchmarks, and the check of the CUDA path. Sampling: NAMI against the flat baseline with the
same total steps (paper Table 2). Training (--train): samples/s, image tokens/s, peak memory and
MFU of Algorithm 1's step. --gpu-check: everything a GPU run needs, in one command.

    python -m experiments.bench                                  # the default run's model (toy, 64²), 10+10+10 steps, CFG 3
    python -m experiments.bench --size 2b --res 1024 --cfg 1 --repeat 3 --dtype bf16     # GPU: paper Table 2
    python -m experiments.bench --flops --size 2b --res 1024 --text-len 256   # FLOPs per stage (meta device)
    python -m experiments.bench --train                          # training throughput of the default preset
    python -m experiments.bench --profile --repeat 20            # where one step of the default run goes
    python -m experiments.bench --train --size 2b --res 1024 --batch 8 --mix 1:2:4 --dtype bf16 --activation-checkpointing
    python -m experiments.bench --gpu-check                      # one CUDA device, ≤ 8 minutes, no download
    python -m experiments.bench --gpu-check --tiny               # the same steps at toy sizes (runs on a CPU)
    python -m experiments.bench --vae weights/shapes-vae --batch 32   # VAE encode/decode: default against channels-last memory

--res is in pixels; the 16-channel presets (0.6b, 2b) work on FLUX-VAE latents, 8× smaller, the toy
preset on the shapes VAE's 4-channel latents, 4× smaller.
Times depend only on the shapes, so the weights are random (the DiT init is replaced by
non-zero values so that no kernel sees special inputs). Both samplers run in the same process,
alternating, after a warm-up; medians of --repeat runs are printed.

MFU = model FLOPs per second / the device's peak. The FLOPs of one training step (forward and
backward) are counted by torch.utils.flop_counter; the peak is measured in the same run with a
large matrix product in bf16 and in fp32 (the training dtype's is used).
"""
from __future__ import annotations

import argparse
import datetime
import math
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

import nami
from bridgeflow import BridgeFlow, jump_for
from common import encoders, parallel
from toyworld import shapes
from training import checkpoint, config, lora

ROOT = Path(__file__).resolve().parents[1]  # the repository root: train.py, sample.py


# (latent channels, pixels per latent cell) of each preset's usual input: the FLUX VAE for the paper's
# sizes, the tiny shapes VAE (weights/shapes-vae) for the default run's toy preset, pixels otherwise
INPUTS = {"2b": (16, 8), "0.6b": (16, 8), "toy": (4, 4)}


def latent_factor(cfg: nami.NamiConfig) -> int:
    """Pixels per latent cell: 8 for FLUX-VAE latents (16 channels), 4 for the shapes VAE's (4), else 1."""
    return {16: 8, 4: 4}.get(cfg.in_channels, 1)


def bench_config(size: str, stages: int | None = None) -> nami.NamiConfig:
    """The preset in its benchmark's latents; stages: K uniform windows instead of the preset's, the cut points by
    the rule of the paper's presets (training.config.stage_cuts), e.g. K = 4 for 2048²."""
    if stages is None:
        return nami.get_config(size, in_channels=INPUTS.get(size, (3, 1))[0])
    return nami.get_config(size, in_channels=INPUTS.get(size, (3, 1))[0], window_ratios=(1,) * stages,
                           cuts=config.stage_cuts(nami.PRESETS[size]["depth_single"], stages))


def random_model(cfg, device, dtype=torch.float32):
    """A model of the preset's shape with N(0, 0.02) weights, built on the meta device and
    allocated once, in the dtype asked for, on the device."""
    torch.manual_seed(0)
    with torch.device("meta"):
        model = nami.Nami(cfg)
    model.to_empty(device=device).to(dtype)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.02)
    return model


def device_name(device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({torch.get_num_threads()} threads)"


def peak_flops(device, dtype, n=4096 if torch.cuda.is_available() else 2048, repeat=5):
    """The device's measured peak: the median FLOP/s of an n×n×n matrix product."""
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    a @ b
    times = []
    for _ in range(repeat):
        parallel.synchronize(device)
        t = time.perf_counter()
        for _ in range(4):
            a @ b
        parallel.synchronize(device)
        times.append((time.perf_counter() - t) / 4)
    return 2 * n ** 3 / statistics.median(times)


def peak_memory_gb(device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2 ** 30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20  # peak RSS of the process (KiB -> GiB)


# ----------------------------------------------------------------------------------------------
# Sampling time: NAMI against flat (paper Table 2)
# ----------------------------------------------------------------------------------------------


def time_sampler(model, bridge, txt, pooled, res, steps, guidance, flat):
    """Seconds per stage of one sample (batch of txt), the flat sampler's one window if flat."""
    eps = torch.randn(txt.shape[0], model.cfg.in_channels, res, res, device=txt.device)
    windows, grids, full = nami.sampling_plan(model.cfg, steps, flat)
    velocity = nami.model_velocity(model, txt, pooled, torch.zeros_like(txt), torch.zeros_like(pooled), guidance, full,
                                   windows)
    parallel.synchronize(eps.device)
    marks = [time.perf_counter()]
    nami.progressive_sample(velocity, eps, grids, None if flat else bridge,
                            on_stage_end=lambda k, x: (parallel.synchronize(x.device), marks.append(time.perf_counter())))
    return [b - a for a, b in zip(marks[:-1], marks[1:])]


def sampling_times(cfg, device, res, steps, guidance, batch, text_len, dtype, warmup, repeat) -> dict:
    """Medians of `repeat` runs of both samplers, alternating, after `warmup` untimed ones: NAMI's
    seconds per stage ("stages") and in all ("nami"), the flat sampler's ("flat"). res in pixels."""
    K, f = cfg.num_stages, latent_factor(cfg)
    config.check_resolution(res, res, f * cfg.size_multiple, "--res")
    model = random_model(cfg, device, dtype).eval()  # weights in the dtype asked for, no autocast
    side = res // f
    bridge = BridgeFlow(cfg.in_channels, [(s, s) for s in nami.stage_sizes(side, K)]).to(device)
    txt = torch.randn(batch, text_len, cfg.joint_attention_dim, device=device)
    pooled = torch.randn(batch, cfg.pooled_projection_dim, device=device)
    args = (model, bridge, txt, pooled, side, steps, guidance)
    for _ in range(warmup):
        time_sampler(*args, False), time_sampler(*args, True)
    runs = {"nami": [], "flat": []}
    for _ in range(repeat):
        runs["nami"].append(time_sampler(*args, False))
        runs["flat"].append(time_sampler(*args, True))
    return {"stages": [statistics.median(r[i] for r in runs["nami"]) for i in range(K)],
            "nami": statistics.median(sum(r) for r in runs["nami"]),
            "flat": statistics.median(sum(r) for r in runs["flat"])}


def flop_ratio(cfg, res: int, steps, text_len: int) -> float:
    """The flat sampler's transformer FLOPs over NAMI's for one image at these steps (meta device, no memory)."""
    with torch.device("meta"):
        model = nami.Nami(cfg)
        txt, pooled = torch.empty(1, text_len, cfg.joint_attention_dim), torch.empty(1, cfg.pooled_projection_dim)
        sizes = nami.stage_sizes(res // latent_factor(cfg), cfg.num_stages)
        staged = sum(n * count_flops(model, torch.empty(1, cfg.in_channels, s, s), txt, pooled, k)
                     for k, (s, n) in enumerate(zip(sizes, steps), 1))
        flat = sum(steps) * count_flops(model, torch.empty(1, cfg.in_channels, sizes[-1], sizes[-1]), txt, pooled, None)
    return flat / staged


def sampling_table(a):
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cfg, steps = bench_config(a.size, a.stages), a.steps
    times = sampling_times(cfg, device, a.res, steps, a.cfg, a.batch, a.text_len,
                           torch.bfloat16 if a.dtype == "bf16" else torch.float32,
                           1 if a.warmup is None else a.warmup, a.repeat)
    K = cfg.num_stages
    print(f"{a.size} at {a.res}², steps {steps}, cfg {a.cfg}, batch {a.batch}, {a.dtype}, "
          f"torch {torch.__version__}, {device_name(device)}, median of {a.repeat}")
    print("| sampler | " + " | ".join(f"stage {k} ({s}²)" for k, s in enumerate(nami.stage_sizes(a.res, K), 1))
          + " | total | reduction |")
    print("|---" * (K + 3) + "|")
    print("| flat | " + " | ".join(["–"] * (K - 1)) + f" | {times['flat']:.3f} s | {times['flat']:.3f} s | – |")
    print("| NAMI | " + " | ".join(f"{t:.3f} s" for t in times["stages"]) + f" | {times['nami']:.3f} s | "
          f"{100 * (1 - times['nami'] / times['flat']):.1f} % ({times['flat'] / times['nami']:.2f}× faster) |")
    flops = flop_ratio(cfg, a.res, steps, a.text_len)
    times["flop_ratio"], times["wall_over_flops"] = flops, times["flat"] / times["nami"] / flops
    print(f"the FLOP ratio (flat / NAMI, transformer, torch.utils.flop_counter) is {flops:.2f}×: the clock gives "
          f"{times['wall_over_flops']:.2f} of it")
    return times


# ----------------------------------------------------------------------------------------------
# Training throughput and MFU
# ----------------------------------------------------------------------------------------------


def mix_counts(mix: str, batch: int, num_stages: int) -> list[int]:
    """Samples per stage of a batch at ratios "1:2:4" (rounded, the last stage takes the rest)."""
    ratios = [int(r) for r in mix.split(":")]
    if len(ratios) != num_stages:
        raise SystemExit(f"error: --mix needs {num_stages} ratios, got {mix}")
    counts = [round(batch * r / sum(ratios)) for r in ratios]
    counts[-1] = batch - sum(counts[:-1])
    return counts


def random_stage_inputs(cfg, counts, sizes, text_len: int, device):
    """Per stage k with counts[k−1] > 0 samples: (k, x̂_t at the stage's size, its target, τ, txt, pooled)."""
    def normal(*shape):
        return torch.randn(*shape, device=device)
    return [(k, normal(n, cfg.in_channels, s, s), normal(n, cfg.in_channels, s, s), torch.rand(n, device=device),
             normal(n, text_len, cfg.joint_attention_dim), normal(n, cfg.pooled_projection_dim))
            for k, (n, s) in enumerate(zip(counts, sizes), 1) if n > 0]


def training_step(cfg, device, res, mixes, text_len, bf16, checkpointing=False, compile=False, warmup=3,
                  repeat=7, lora_rank=None) -> dict:
    """Time Algorithm 1's training step on random data: the model's forward and backward at every
    stage of a mixed batch (train.Algorithm1Loss adds only elementwise pyramid, bridge and
    interpolation arithmetic around these calls), then AdamW. `mixes`: per-stage counts, one list
    per step in turn (several: the batch sizes change as between phases). lora_rank: a LoRA run's
    step instead (train.py --lora): the frozen base in bf16 when bf16, AdamW over the adapters."""
    from torch.utils.flop_counter import FlopCounterMode
    model = random_model(cfg, device, torch.bfloat16 if lora_rank and bf16 else torch.float32).train()
    if lora_rank:
        lora.attach(model, lora.settings(lora_rank))
    model.checkpointing = checkpointing
    if compile:
        parallel.compile_blocks(model)
    sizes = nami.stage_sizes(res // latent_factor(cfg), cfg.num_stages)
    batches = [random_stage_inputs(cfg, counts, sizes, text_len, device) for counts in mixes]
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

    def loss_of(stages):  # Eq. 4 summed over the stages, the model cut after each stage's blocks
        loss = 0.0
        for k, x_t, target, tau, txt, pooled in stages:
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                loss = loss + nami.flow_loss(model(x_t, tau, txt, pooled, stage=k), target)
        return loss

    def step(i):
        opt.zero_grad(set_to_none=True)
        loss_of(batches[i % len(batches)]).backward()
        opt.step()

    for i in range(warmup):
        step(i)
    model.checkpointing = False  # model FLOPs: the recomputation of checkpointing is not counted
    with FlopCounterMode(display=False) as counter:
        loss_of(batches[0]).backward()
    model.checkpointing = checkpointing
    times = []
    for i in range(repeat):
        parallel.synchronize(device)
        t0 = time.perf_counter()
        step(i)
        parallel.synchronize(device)
        times.append(time.perf_counter() - t0)
    peak = peak_flops(device, torch.bfloat16 if bf16 else torch.float32)
    step_time = statistics.median(times)  # of the first mix's steps when several alternate
    batch = sum(mixes[0])
    return {"step": step_time, "samples_per_s": batch / step_time, "flops": counter.get_total_flops(),
            "tokens": sum(n * (s // cfg.patch_size) ** 2 for n, s in zip(mixes[0], sizes)),
            "mfu": counter.get_total_flops() / step_time / peak, "peak": peak, "memory_gb": peak_memory_gb(device)}


def train_table(a):
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cfg = bench_config(a.size)
    config.check_resolution(a.res, a.res, latent_factor(cfg) * cfg.size_multiple, "--res")
    counts = mix_counts(a.mix, a.batch, cfg.num_stages)
    r = training_step(cfg, device, a.res, [counts], a.text_len, a.dtype == "bf16", a.activation_checkpointing,
                      a.compile, a.warmup, a.repeat, a.lora)
    print(f"train {a.size}{f' LoRA rank {a.lora}' if a.lora else ''} at {a.res}², batch {a.batch} as {counts} over "
          f"the stages (mix {a.mix}), {a.dtype}, "
          f"activation checkpointing {a.activation_checkpointing}, compile {a.compile}, {device_name(device)}, "
          f"torch {torch.__version__}, median of {a.repeat} steps")
    print("| step | samples/s | image tokens/s | model TFLOP/step | achieved TFLOP/s | measured peak TFLOP/s | MFU | peak memory |")
    print("|---|---|---|---|---|---|---|---|")
    print(f"| {r['step']:.3f} s | {r['samples_per_s']:.1f} | {r['tokens'] / r['step']:,.0f} | {r['flops'] / 1e12:.3f} | "
          f"{r['flops'] / r['step'] / 1e12:.3f} | {r['peak'] / 1e12:.2f} | {100 * r['mfu']:.1f} % | {r['memory_gb']:.2f} GiB |")
    return r


def step_sections(a) -> dict:
    """Where one step of the default run goes: its real data feed (feed.Batches: the built-in world
    rendered, VAE-encoded, captions encoded, noise and t' drawn), then per stage the pyramid, start
    and end points and the model's forward, the backward, clipping, AdamW and the EMA; wall-clock
    medians over --repeat steps at the mix --mix, then torch.profiler's most expensive operators.
    It repeats train.Algorithm1Loss's arithmetic with nami's functions, as training_step does."""
    from datafeed import feed  # here only: the other benchmarks need no data feed
    cfg = config.TrainConfig(batch_size=a.batch, text_len=a.text_len, progress=False)
    device = torch.device("cpu")
    autoencoder = encoders.load_autoencoder(cfg.vae, device)
    encoder = encoders.TextEncoder(cfg.text_encoder, cfg.text_len, device)
    model_cfg = config.model_config(cfg, encoder.dim, encoder.pooled_dim, autoencoder.channels)
    K = model_cfg.num_stages
    windows = nami.stage_windows(model_cfg.window_ratios, model_cfg.gamma)
    ranges = nami.tau_ranges(model_cfg.window_ratios, model_cfg.gamma)
    model, ema = nami.Nami(model_cfg).train(), nami.Nami(model_cfg).requires_grad_(False)
    side = cfg.resolution // autoencoder.factor
    bridge = BridgeFlow(model_cfg.in_channels, [(s, s) for s in nami.stage_sizes(side, K)]).requires_grad_(False)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, fused=not a.foreach_adamw)  # train.py's: fused
    batches = feed.Batches(cfg, encoder, autoencoder, K, device)
    ratios = [int(r) for r in a.mix.split(":")]
    times: dict[str, list[float]] = {}

    def timed(name, fn, *args):
        t0 = time.perf_counter()
        out = fn(*args)
        times.setdefault(name, []).append(time.perf_counter() - t0)
        return out

    def feed_parts(positions):  # the feed's pieces on their own (the whole feed then does them again)
        pixels, samples = timed("data: render the built-in world (PIL)", shapes.batch_at, cfg.seed, positions,
                                cfg.resolution, "train", cfg.world_level)
        timed("data: VAE encode", autoencoder.encode, pixels)
        timed("data: text encode (cached per caption)", encoder.encode, [s.caption for s in samples])
        timed("data: noise, t', caption dropout", draws, positions)

    def draws(positions):  # train.draws' numbers (scripts import no other script): caption dropout, ε, t'
        generators = [feed.sample_generator(cfg.seed, p) for p in positions]
        dropped = torch.tensor([bool(torch.rand((), generator=g) < cfg.caption_dropout) for g in generators])
        eps = torch.stack([torch.randn((autoencoder.channels, side, side), generator=g) for g in generators])
        return dropped, eps, torch.cat([nami.logit_normal(1, g) for g in generators])

    def step(i, parts=True):
        if parts:
            feed_parts(list(range(i * cfg.batch_size, (i + 1) * cfg.batch_size)))
        t0 = time.perf_counter()
        batch = batches.next_step()[0]
        stages = feed.batch_stages(ratios, cfg.batch_size)
        dropped, eps_K, t = draws(batch.positions)
        txt = torch.where(dropped[:, None, None], batches.uncond[0], batch.txt)
        pooled = torch.where(dropped[:, None], batches.uncond[1], batch.pooled)
        times.setdefault("data: the whole feed (feed.Batches.next_step, stages, draws)", []).append(time.perf_counter() - t0)
        opt.zero_grad(set_to_none=True)
        t0, loss = time.perf_counter(), 0.0
        for k in range(1, K + 1):
            rows = [i for i, s in enumerate(stages) if s == k]
            n = len(rows)
            if n == 0:
                continue
            t1 = time.perf_counter()
            jump_k = jump_for(bridge, windows, batch.x[rows], eps_K[rows], model_cfg.jump_noise)
            x_s, x_e = nami.stage_points(nami.image_pyramid(batch.x[rows], K)[k - 1],
                                         nami.noise_pyramid(eps_K[rows], K)[k - 1], k, windows, jump_k)
            x_t, tau = nami.interpolate(x_s, x_e, t[rows]), nami.stage_tau(t[rows], ranges[k - 1])
            times.setdefault(f"stage {k}: pyramid, BridgeFlow, x̂_t", []).append(time.perf_counter() - t1)
            t1 = time.perf_counter()
            v = model(x_t, tau, txt[rows], pooled[rows], stage=k)
            loss = loss + nami.flow_loss(v, nami.flow_target(x_s, x_e)) * n / cfg.batch_size
            times.setdefault(f"stage {k}: model forward ({n} samples)", []).append(time.perf_counter() - t1)
        timed("backward (all stages)", loss.backward)
        timed("gradient clipping", torch.nn.utils.clip_grad_norm_, model.parameters(), cfg.grad_clip)
        timed("AdamW" + (" (foreach)" if a.foreach_adamw else " (fused)"), opt.step)
        timed("EMA", torch._foreach_lerp_, list(ema.parameters()), list(model.parameters()), 1 - cfg.ema_decay)
        times.setdefault("model step (forward to EMA)", []).append(time.perf_counter() - t0)

    for i in range(a.warmup):
        step(i)
    times.clear()
    for i in range(a.repeat):
        step(a.warmup + i)
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for i in range(3):
            step(a.warmup + a.repeat + i, parts=False)
    medians = {name: statistics.median(ts) for name, ts in times.items()}
    whole = medians["data: the whole feed (feed.Batches.next_step, stages, draws)"] + medians["model step (forward to EMA)"]
    print(f"one step of the default run: toy at {cfg.resolution}² in the shapes VAE's latents, batch {cfg.batch_size} "
          f"at mix {a.mix} ({feed.stage_counts(ratios, cfg.batch_size)}), text {cfg.text_len} tokens, {device_name(device)}, "
          f"torch {torch.__version__}, median of {a.repeat} steps; {cfg.batch_size / whole:.1f} images/s")
    print("| section | ms | share of the step |\n|---|---:|---:|")
    for name, value in medians.items():
        print(f"| {name} | {1000 * value:.1f} | {100 * value / whole:.0f} % |")
    print(f"| **the step (feed + model step)** | **{1000 * whole:.1f}** | 100 % |")
    rows = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)[:12]
    print("\ntorch.profiler, 3 steps, the operators by their own time:\n| operator | calls per step | ms per step |\n|---|---:|---:|")
    for e in rows:
        print(f"| `{e.key}` | {e.count // 3} | {e.self_cpu_time_total / 3000:.1f} |")
    ops = sum(e.count for e in prof.key_averages() if e.key.startswith("aten::")) // 3
    print(f"\n{ops} aten operator calls per step (every one counted, nested ones too)")
    return medians


def vae_table(a):
    """encoders.VAE keeps the autoencoder in channels-last memory; this times it against the default
    layout, both in one process, alternating."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if a.dtype == "bf16" else torch.float32
    fast = encoders.VAE(a.vae, device, dtype)
    plain = encoders.VAE(a.vae, device, dtype)
    plain.model.to(memory_format=torch.contiguous_format)
    images = torch.rand(a.batch, 3, a.res, a.res, device=device) * 2 - 1
    latents = fast.encode(images)
    times = {(name, job): [] for name in ("default", "channels-last") for job in ("encode", "decode")}
    for i in range(a.warmup + a.repeat):
        for name, vae in (("default", plain), ("channels-last", fast)):
            for job, run_it in (("encode", lambda: vae.encode(images)), ("decode", lambda: vae.decode(latents))):
                start = time.perf_counter()
                run_it()
                if device.type == "cuda":
                    torch.cuda.synchronize()
                if i >= a.warmup:
                    times[name, job].append(time.perf_counter() - start)
    print(f"VAE {a.vae}, batch {a.batch} at {a.res}², {a.dtype}, {device_name(device)}, torch {torch.__version__}, "
          f"median of {a.repeat}")
    print("| layout | encode | decode |\n|---|---|---|")
    for name in ("default", "channels-last"):
        print(f"| {name} | {1e3 * statistics.median(times[name, 'encode']):.1f} ms | "
              f"{1e3 * statistics.median(times[name, 'decode']):.1f} ms |")
    return times


# ----------------------------------------------------------------------------------------------
# Transformer FLOPs per stage (meta device)
# ----------------------------------------------------------------------------------------------


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
    cfg = bench_config(a.size, a.stages)
    K, f = cfg.num_stages, latent_factor(cfg)
    config.check_resolution(a.res, a.res, f * cfg.size_multiple, "--res")
    steps = a.steps
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
    print(f"{a.size} at {a.res}² ({sizes[-1]}² latent), K = {K}, cut points {cfg.cuts}, steps {steps} vs flat "
          f"{sum(steps)}, {a.text_len} text tokens, batch 1, no CFG: transformer {unit} per image "
          "(torch.utils.flop_counter, meta device)")
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


# ----------------------------------------------------------------------------------------------
# --gpu-check: the CUDA path, end to end, in one command
# ----------------------------------------------------------------------------------------------


def run(command: list[str], timeout: int = 600) -> str:
    """A script of this folder as a subprocess; its output, or an error with the end of stderr."""
    r = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    if r.returncode != 0:
        raise RuntimeError(f"`{' '.join(command[1:6])} …` exited {r.returncode}: {r.stderr.strip()[-600:]}")
    return r.stdout


def log_losses(run_dir: Path) -> list[dict]:
    """The training lines of the run's log (not its validation lines), each with a finite loss."""
    records = checkpoint.read_log(run_dir)
    if not records or not all(math.isfinite(r["loss"]) for r in records):
        raise RuntimeError(f"{run_dir}/log.jsonl: no losses, or non-finite ones")
    return records


def check_training(work: Path, flags: list[str], steps: int) -> str:
    """train.py in bf16: stop half-way with a checkpoint, resume to the end, then sample.py."""
    out = work / "single"
    command = [sys.executable, "train.py", *flags, "--bf16", "--max-steps", str(steps), "--ckpt-every",
               str(steps // 2), "--sample-every", str(steps), "--log-every", "1", "--out", str(out)]
    run(command + ["--stop-after", str(steps // 2)])
    run(command + ["--resume"])
    records = log_losses(out)
    if [r["step"] for r in records] != list(range(1, steps + 1)):
        raise RuntimeError(f"the resumed log does not read as one run: steps {[r['step'] for r in records]}")
    run([sys.executable, "sample.py", "a red circle above a blue square", "--ckpt", str(out), "--out",
         str(work / "sample.png"), "-n", "4"])
    speed = statistics.median(r["images_per_s"] for r in records[1:])
    return (f"{steps} steps, stopped at {steps // 2} and resumed; loss {records[0]['loss']:.3f} -> "
            f"{records[-1]['loss']:.3f}; {speed:.0f} images/s; sample.png written")


def check_torchrun(work: Path, flags: list[str], strategy: str) -> str:
    """torchrun with one rank (NCCL on a GPU): 2 steps, a checkpoint, then resumed to 4."""
    out = work / strategy
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1", "train.py",
               *flags, "--bf16", "--parallel", strategy, "--max-steps", "4", "--ckpt-every", "2",
               "--sample-every", "4", "--log-every", "1", "--out", str(out)]
    run(command + ["--stop-after", "2"])
    run(command + ["--resume"])
    records = log_losses(out)
    sharded = (out / "ckpt-0000004" / "dcp" / ".metadata").is_file()
    if strategy == "fsdp" and not sharded:
        raise RuntimeError("the FSDP2 checkpoint holds no dcp/ shards")
    return f"4 steps, resumed at 2, loss {records[-1]['loss']:.3f}" + (", dcp/ shards written" if sharded else "")


def check_sampling(size: str, device, res: int, text_len: int, dtype) -> str:
    t = sampling_times(bench_config(size), device, res, [10, 10, 10], 1.0, 1, text_len, dtype, warmup=1, repeat=3)
    met = t["nami"] <= 0.5 and t["flat"] / t["nami"] >= 2.5
    return (f"NAMI {t['nami']:.3f} s/image (" + " + ".join(f"{s:.3f}" for s in t["stages"]) +
            f"), flat 30 steps {t['flat']:.3f} s: {t['flat'] / t['nami']:.2f}× faster "
            f"(target ≤ 0.5 s and ≥ 2.5×: {'met' if met else 'not met'})")


def check_training_step(size: str, device, res: int, batch: int, text_len: int, checkpointing: bool,
                        lora_rank=None) -> str:
    counts = mix_counts("1:2:4", batch, 3)
    r = training_step(bench_config(size), device, res, [counts], text_len, device.type == "cuda", checkpointing,
                      warmup=2, repeat=3, lora_rank=lora_rank)
    return (f"batch {batch} as {counts}: {r['step']:.3f} s/step, {r['samples_per_s']:.1f} samples/s, "
            f"MFU {100 * r['mfu']:.1f} % of a measured {r['peak'] / 1e12:.3g} TFLOP/s")


def check_compile(size: str, device, res: int, text_len: int) -> str:
    """A compiled training step through the three phases' stage mixes (the batch size of each stage
    changes): how many graphs the blocks compiled, against one per block and stage resolution."""
    from torch._dynamo.utils import counters
    torch._dynamo.reset()
    cfg = bench_config(size)
    mixes = [mix_counts(m, 32, 3) for m in ("4:2:1", "2:4:1", "1:2:4")]
    r = training_step(cfg, device, res, mixes, text_len, device.type == "cuda", compile=True, warmup=3, repeat=3)
    graphs = counters["stats"]["unique_graphs"]
    expected = sum(cfg.depth_double + cut for cut in cfg.cuts)  # stage k runs the doubles and c_k singles
    if graphs > expected:
        raise RuntimeError(f"{graphs} graphs compiled for {expected} block-stage pairs: the blocks recompile")
    return f"{graphs} graphs for {expected} block-stage pairs over 3 stage mixes, {r['step']:.3f} s/step"


def gpu_check(a) -> int:
    """Every part of the CUDA path a run needs, each in turn, into one table; non-zero exit if one
    failed. --tiny runs the same steps at toy sizes (a CPU can run it: the test suite does)."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    work = Path(a.out or tempfile.mkdtemp(prefix="nami-gpu-check-"))
    encoder = a.text_encoder or encoders.write_tiny_encoder(work / "text-encoder", sorted(shapes.caption_words()))
    small, big, big_res, text_len = ("tiny", "tiny", 16, 16) if a.tiny else ("small", "2b", 1024, 256)
    # pixel space: the lent GPU machines have no diffusers (the VAE path is the CPU tests' to prove)
    flags = ["--size", small, "--resolution", "16" if a.tiny else "32", "--vae", "none", "--world-level", "3",
             "--batch-size", "8" if a.tiny else "64",
             "--bridge-steps", "10", "--text-encoder", encoder, "--text-len", "16", "--workers", "0", "--no-progress"]
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    parts = [
        ("train (bf16), stop, resume, sample", lambda: check_training(work, flags, 8 if a.tiny else 60)),
        ("torchrun, 1 rank, DDP, checkpoint + resume", lambda: check_torchrun(work, flags, "ddp")),
        ("torchrun, 1 rank, FSDP2, checkpoint + resume", lambda: check_torchrun(work, flags, "fsdp")),
        (f"{big} sampling at {big_res}², batch 1, no CFG", lambda: check_sampling(big, device, big_res, text_len, dtype)),
        (f"{big} training step at {big_res}², 1:2:4, checkpointing",
         lambda: check_training_step(big, device, big_res, 14, text_len, True)),
        (f"{'tiny' if a.tiny else '0.6b'} training step, micro-batch 16",
         lambda: check_training_step("tiny" if a.tiny else "0.6b", device, big_res, 16, text_len, False)),
        ("compiled training step", lambda: check_compile(small, device, 16 if a.tiny else 64, 16)),
        (f"{big} LoRA rank 16 step at {big_res}², micro-batch 4, checkpointing (docs/fine-tuning.md's memory table)",
         lambda: check_training_step(big, device, big_res, 4, text_len, True, lora_rank=16)),
    ]
    rows, failed = [], 0
    for name, check in parts:
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        t0 = time.perf_counter()
        try:
            status, result = "ok", check()
        except Exception as e:  # every part runs and is reported, whatever the others did
            status, result, failed = "FAILED", f"{type(e).__name__}: {e}"[:800], failed + 1
        memory = f"{torch.cuda.max_memory_allocated(device) / 2 ** 30:.1f} GiB" if device.type == "cuda" else "–"
        rows.append(f"| {name} | {status} | {result} | {time.perf_counter() - t0:.0f} s | {memory} |")
        print(rows[-1], flush=True)
    print(f"\n{device_name(device)}, torch {torch.__version__}, {datetime.date.today()}, "
          f"`python -m experiments.bench --gpu-check{' --tiny' if a.tiny else ''}` (work folder {work})\n")
    print("| part | status | result | time | peak memory (in-process parts) |\n|---|---|---|---|---|")
    print("\n".join(rows))
    return 1 if failed else 0


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--train", action="store_true", help="training throughput and MFU instead of sampling time")
    ap.add_argument("--profile", action="store_true", help="where one step of the default run goes (its data feed, "
                    "each stage, the optimizer; torch.profiler's top operators)")
    ap.add_argument("--foreach-adamw", action="store_true", help="--profile: AdamW's multi-tensor form instead of "
                    "train.py's fused one")
    ap.add_argument("--flops", action="store_true", help="count the transformer FLOPs per stage (meta device) instead")
    ap.add_argument("--gpu-check", action="store_true", help="check the whole CUDA path, one table (see above)")
    ap.add_argument("--tiny", action="store_true", help="--gpu-check at toy sizes (runs on a CPU)")
    ap.add_argument("--out", help="--gpu-check: work folder (default: a new temporary folder)")
    ap.add_argument("--text-encoder", help="--gpu-check: a local text encoder folder (default: a tiny random one)")
    ap.add_argument("--vae", help="time this diffusers AutoencoderKL folder's encode and decode instead")
    ap.add_argument("--size", default="toy", choices=sorted(nami.PRESETS))
    ap.add_argument("--res", type=int, default=64, help="image side in pixels")
    ap.add_argument("--steps", help="Euler steps per stage (default 30 in all: 10,10,10 for K = 3, 8,8,7,7 for 4)")
    ap.add_argument("--stages", type=int, choices=range(2, 7), help="K uniform stages instead of the preset's three, "
                    "the cut points by the paper's presets' rule (training.config.stage_cuts): --stages 4 for 2048²")
    ap.add_argument("--cfg", type=float, default=nami.DEFAULT_GUIDANCE, help="guidance (1 = no CFG, half the batch)")
    ap.add_argument("--batch", type=int, default=None, help="batch size (default: 1 sampling, 32 training)")
    ap.add_argument("--mix", default="1:2:4", help="--train: samples per stage, low -> high (paper's last phase)")
    ap.add_argument("--warmup", type=int, default=None,
                    help="untimed runs first (default: 3 training steps, or 1 sampling run of each sampler)")
    ap.add_argument("--activation-checkpointing", action="store_true", help="--train: recompute blocks in backward")
    ap.add_argument("--compile", action="store_true", help="--train: torch.compile each block")
    ap.add_argument("--lora", type=int, help="--train: a LoRA run's step of this rank (frozen base, bf16 with --dtype bf16)")
    ap.add_argument("--text-len", type=int, default=16)
    ap.add_argument("--repeat", type=int, default=7)
    ap.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32")
    a = ap.parse_args(argv)
    K = a.stages or bench_config(a.size).num_stages
    a.steps = [int(n) for n in a.steps.split(",")] if a.steps else nami.default_steps(K)
    if len(a.steps) != K:
        raise SystemExit(f"error: --steps {a.steps} gives {len(a.steps)} stages, the model has {K}")
    parallel.use_tf32()
    if a.gpu_check:
        raise SystemExit(gpu_check(a))
    if a.flops:
        return flops_table(a)
    if a.vae:
        a.batch, a.warmup = a.batch or 32, 2 if a.warmup is None else a.warmup
        return vae_table(a)
    if a.profile:
        a.batch, a.warmup = a.batch or 32, 5 if a.warmup is None else a.warmup
        return step_sections(a)
    if a.train:
        a.batch = a.batch or 32
        a.warmup = 3 if a.warmup is None else a.warmup
        return train_table(a)
    a.batch = a.batch or 1
    return sampling_table(a)


if __name__ == "__main__":
    main()
