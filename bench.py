"""Sampling time of NAMI against the flat baseline with the same total steps (paper Table 2).

    python bench.py                                  # default CPU preset at 32², 10+10+10 steps, CFG 3
    python bench.py --size 2b --res 1024 --cfg 1 --repeat 3 --dtype bf16

Times depend only on the shapes, so the weights are random (the DiT init is replaced by
non-zero values so that no kernel sees special inputs). Both samplers run in the same process,
alternating, after a warm-up; medians of --repeat runs are printed.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

import nami
from bridgeflow import BridgeFlow


def time_sampler(model, bridge, txt, pooled, res, steps, guidance, flat, dtype):
    eps = torch.randn(txt.shape[0], model.cfg.in_channels, res, res)
    windows, ranges, steps, full = nami.sampling_plan(model.cfg, steps, flat)
    velocity = nami.model_velocity(model, ranges, txt, pooled, torch.zeros_like(txt), torch.zeros_like(pooled),
                                   guidance, full, autocast=dtype == "bf16")
    marks = [time.perf_counter()]
    nami.progressive_sample(velocity, eps, windows, steps, None if flat else bridge,
                            on_stage_end=lambda k, x: marks.append(time.perf_counter()))
    return [b - a for a, b in zip(marks[:-1], marks[1:])]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", default="small", choices=sorted(nami.PRESETS))
    ap.add_argument("--res", type=int, default=32)
    ap.add_argument("--steps", default="10,10,10")
    ap.add_argument("--cfg", type=float, default=3.0, help="guidance (1 = no CFG, half the batch)")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--text-len", type=int, default=16)
    ap.add_argument("--repeat", type=int, default=7)
    ap.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32")
    a = ap.parse_args(argv)
    cfg = nami.get_config(a.size, in_channels=3) if a.size in ("small", "base", "tiny") else nami.get_config(a.size)
    torch.manual_seed(0)
    model = nami.Nami(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.02)
    K = cfg.num_stages
    bridge = BridgeFlow(cfg.in_channels, [(a.res // 2 ** (K - k),) * 2 for k in range(1, K + 1)])
    steps = [int(s) for s in a.steps.split(",")]
    txt = torch.randn(a.batch, a.text_len, cfg.joint_attention_dim)
    pooled = torch.randn(a.batch, cfg.pooled_projection_dim)
    args = (model, bridge, txt, pooled, a.res, steps, a.cfg)
    time_sampler(*args, False, a.dtype), time_sampler(*args, True, a.dtype)  # warm-up
    runs = {"nami": [], "flat": []}
    for _ in range(a.repeat):
        runs["nami"].append(time_sampler(*args, False, a.dtype))
        runs["flat"].append(time_sampler(*args, True, a.dtype))
    med = {name: [statistics.median(r[i] for r in rs) for i in range(len(rs[0]))] for name, rs in runs.items()}
    tot = {name: statistics.median(sum(r) for r in rs) for name, rs in runs.items()}
    print(f"{a.size} at {a.res}², steps {steps}, cfg {a.cfg}, batch {a.batch}, {a.dtype}, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads, median of {a.repeat}")
    sizes = [a.res // 2 ** (K - k) for k in range(1, K + 1)]
    print("| sampler | " + " | ".join(f"stage {k} ({s}²)" for k, s in enumerate(sizes, 1)) + " | total | reduction |")
    print("|---" * (K + 3) + "|")
    print("| flat | " + " | ".join(["–"] * (K - 1)) + f" | {med['flat'][0]:.3f} s | {tot['flat']:.3f} s | – |")
    print("| NAMI | " + " | ".join(f"{t:.3f} s" for t in med["nami"]) +
          f" | {tot['nami']:.3f} s | {100 * (1 - tot['nami'] / tot['flat']):.1f} % ({tot['flat'] / tot['nami']:.2f}× faster) |")


if __name__ == "__main__":
    main()
