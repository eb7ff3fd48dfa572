"""The Euler grid of each stage of the sampler (docs/method.md §6): ours, uniform in local time
(nami.uniform_grids), and the authors' release's, Pyramid Flow's scheduler over a 1000-step table
(`grids`). SCHEDULES names them for sample.py --schedule.

It needs torch and nami.py alone: training/export.py copies it, its nami import made relative, into the
scheduler/ folder of an exported diffusers pipeline, whose scheduler computes the same grids from it.

    grids([10, 10, 10])      # the release's: nine steps of ≈ 0.111 and one of ≈ 0.003 per stage
"""
from __future__ import annotations

import torch

from nami import StageGrid, corrected_start, uniform_grids

TRAIN_STEPS = 1000  # the release's discrete time table t = 1000, 999, …, 1


def stage_tables(ratios=(1, 1, 1), gamma: float = 1 / 3) -> list[tuple[float, float]]:
    """[(t_max, t_min)] per stage on the release's 1000-step table (Pyramid Flow's scheduler, release
    src/scheduling_flow_matching.py:70-150): the windows and the τ split of docs/method.md §2, each
    taken at a float32 table entry. For 1:1:1: (1000, 744), (744, 386), (386, 1)."""
    N, K = TRAIN_STEPS, len(ratios)
    table_sigma = torch.arange(N, 0, -1, dtype=torch.float32) / N  # σ = t/1000 (shift 1), lines 70-88
    table_t = table_sigma * N
    edges = [sum(ratios[:i]) / sum(ratios) for i in range(K + 1)]  # stage_range, e.g. [0, 1/3, 2/3, 1]
    lengths = []
    for i in range(K):  # lines 90-121: windows [s_k → e_k] on the table, corrected starts for k > 1
        start, end = int(edges[i] * N), int(edges[i + 1] * N)
        s, e = table_sigma[start].item(), table_sigma[end].item() if end < N else 0.0
        lengths.append((s if i == 0 else corrected_start(s, gamma)) - e)
    # lines 123-150: the τ axis split ∝ window lengths, each bound truncated to a table entry
    bounds = [sum(lengths[:i]) / sum(lengths) for i in range(K)] + [1.0]
    return [(table_t[int(bounds[i] * N)].item(), table_t[min(int(bounds[i + 1] * N), N - 1)].item())
            for i in range(K)]


def grids(steps, ratios=(1, 1, 1), gamma: float = 1 / 3) -> list[StageGrid]:
    """The release's Euler grids, as nami.uniform_grids makes ours (release src/scheduling_flow_matching.py:137-150,
    180-207). Stage k trains on K_k = int(t_max − t_min) table steps, local time 1, 1 − 1/K_k, …, 1/K_k paired with model time
    t_max, t_max − 1, …, t_min + 1. Sampling with n steps takes t' = linspace(1, 1/K_k, n) followed
    by 0, and τ = t/1000 with t = linspace(t_max, t_min + 1, n): n − 1 steps of (1 − 1/K_k)/(n − 1),
    then one of 1/K_k (10+10+10: 0.1107, then 0.0039), the last model call at τ ≈ a_k + 0.001."""
    stage_grids = []
    for (t_max, t_min), n in zip(stage_tables(ratios, gamma), steps):
        K = int(t_max - t_min)
        # the last entries of linspace(t_max, t_min, K + 1)[:-1] and linspace(1, 0, K + 1)[:-1]
        t_last, sigma_last = t_max + (K - 1) * ((t_min - t_max) / K), 1.0 + (K - 1) * (-1.0 / K)
        sigma = torch.linspace(1.0, sigma_last, n, dtype=torch.float64).tolist() + [0.0]
        t = torch.linspace(t_max, t_last, n, dtype=torch.float64).tolist()
        stage_grids.append(StageGrid(sigma, [t_j / TRAIN_STEPS for t_j in t]))
    return stage_grids


SCHEDULES = {"uniform": uniform_grids, "release": grids}  # sample.py --schedule
