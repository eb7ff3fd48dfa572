"""Train NAMI: BridgeFlow pre-training (paper §3.3), then Algorithm 1 (multi-resolution training of
the progressive rectified flow transformer), on the built-in shapes data or an image folder.

    python train.py                          # the default run: world level 0, ~8 min on 2 cores
    python train.py --world-level 3 --max-steps 12000 --ema-decay 0.999 --out runs/shapes-toy-long
                                             # the longer recipe: the full world, ~1 h on 2 cores
    python train.py --mode flat              # the flat baseline (K = 1, full model)
    python train.py --aspect 2:1             # the built-in world in 2:1 pictures (an image folder: datafeed/buckets.py)
    python train.py --resume                 # continue the run in --out where it stopped
    python train.py --init-from runs/shapes-small-flat --out runs/converted   # a new run from a checkpoint,
                                             # the authors' release or a flat transformer (training/init_from.py)
    python train.py --init-from runs/shapes-toy --lora 8 --data DIR --vae weights/shapes-vae --jump-noise
                                             # LoRA adapters on frozen weights (training/lora.py; docs/fine-tuning.md)
    python train.py --size 0.6b --data DIR --vae VAE --text-encoder MT5 --pooled-encoder MCLIP \\
        --resolution 1024                    # the paper's recipe (§4.3) at its size, in the FLUX VAE's latents
    python -m datafeed cache DIR --out CACHE ...  # then train with --cache CACHE instead of --data DIR
    torchrun --nproc_per_node 8 train.py --size 2b ...   # DDP / FSDP2 (see common/parallel.py)

Read `main` and `Algorithm1Loss` next to the paper's Algorithm 1: each of its lines sits above the code that does it,
in the paper's notation where the code has it and with the difference said where not (docs/method.md, "Notation").
What is not the paper (torchrun, the run folder, LoRA, --init-from, the validation loss, the NaN guard, grids,
checkpoints) is training/session.py, settled before the loop; the settings and their flags are training/config.py,
the data feed datafeed/feed.py. Writes to --out: log.jsonl, samples/step-NNNNNNN.png, ckpt-NNNNNNN/; a killed run
continues with --resume. `main(TrainConfig(...))` is importable.
"""
from __future__ import annotations

import torch
import torch.nn as nn
from tqdm import tqdm

import nami
from bridgeflow import fit, pretrain
from common import parallel
from datafeed import feed
from training import checkpoint, config
from training.config import TrainConfig
from training.session import TrainingRun


def pretrain_bridgeflow(cfg: TrainConfig, bridge, windows, run: TrainingRun):
    """Paper §3.3, §4.3: pre-train every BridgeFlow map on its MSE, before the transformer: with the
    paper's Adam (lr 1e-3, the default), or exactly, by least squares over the batches (bridgeflow.fit).
    Every rank fits the same map on the same data; rank 0's copy is then broadcast."""
    source = feed.Batches(cfg, run.encoder, run.autoencoder, len(windows), run.device, stream=1)
    steps = cfg.bridge_steps

    def batch(i):
        x = source.next(text=False)[0]
        return x, torch.randn(x.shape, generator=run.state.generator).to(run.device)
    bar = tqdm(total=steps, desc="BridgeFlow", disable=not (cfg.progress and run.main), leave=False)
    if cfg.bridge_fit == "least-squares":
        losses = fit(bridge, batch, windows, steps, progress=lambda i: bar.update(1))
    else:
        losses = pretrain(bridge, batch, windows, steps, cfg.bridge_lr,
                          progress=lambda i, l: (bar.update(1), bar.set_postfix(mse=f"{sum(l):.4f}")))
    bar.close()
    parallel.broadcast_module(bridge)
    if run.main:
        print(f"BridgeFlow pre-trained ({cfg.bridge_fit}, {steps} batches): W = "
              f"{[round(w, 3) for w in bridge.scale.tolist()]}, MSE per jump = {[round(l, 4) for l in losses]}")


def draws(seed: int, positions, shape, caption_dropout: float, device):
    """Paper §3.4's draws, each sample's from its own generator keyed by the seed and its position in the data order
    (feed.sample_generator), so that a resumed run and any number of ranks draw the same numbers."""
    generators = [feed.sample_generator(seed, p) for p in positions]
    dropped = torch.tensor([bool(torch.rand((), generator=g) < caption_dropout) for g in generators])
    eps = torch.stack([torch.randn(shape, generator=g) for g in generators])
    t = torch.cat([nami.logit_normal(1, g) for g in generators])
    return dropped.to(device), eps.to(device), t.to(device)


class Algorithm1Loss(nn.Module):
    """Lines 6-16 of Algorithm 1 on one micro-batch, and line 18's w_k-weighted sum: each window's loss is its mean
    over the global batch's samples there (totals[k−1]). One module, so that DDP sees one forward per backward;
    theta (line 15's v_θk) and jumps (lines 7-13's BridgeFlow) come resolved by training/session.py."""

    def __init__(self, theta, jumps, windows, ranges, weights):
        super().__init__()
        self.theta, self.jumps, self.windows, self.ranges, self.weights = theta, jumps, windows, ranges, weights

    def forward(self, x_1, txt, pooled, eps_K, t, stage: list, totals: list):
        K, loss, sums = len(self.windows), 0.0, torch.zeros(len(self.windows), device=x_1.device)
        for k in [k for k in range(1, K + 1) if totals[k - 1]]:  # line 4: for each window [s_k → e_k] in the batch
            rows, n = parallel.window_rows(stage, k)  # its n samples here (n = 0: one, weight 0; see window_rows)
            # line 6: Down(x'_1) until it is at window k's resolution (VAE latents here, images in the paper); the
            # noise too, coupled: ε_(k−1) = 2·Down(ε_k)
            x, eps = nami.image_pyramid(x_1[rows], K)[k - 1], nami.noise_pyramid(eps_K[rows], K)[k - 1]
            # lines 7-13: the start point x̂_s (k = 1: x_0, the noise ε_1; else BridgeFlow(Up(x̂_e of window k−1)))
            # and the end point x̂_e (x'_1 noised to the window's end e_k)
            x_s, x_e = nami.stage_points(x, eps, k, self.windows, self.jumps(x_1[rows], eps_K[rows]))
            # line 14: t' sampled (§3.4, in main) and Eq. 3, x̂_t = t'·x̂_s + (1 − t')·x̂_e, t' ∈ [0, 1] in every window
            x_t = nami.interpolate(x_s, x_e, t[rows])
            # line 15: v_θk(x̂_t, τ), the model cut after c_k, given the global time τ(k, t') where the paper writes t'
            v = self.theta(x_t, nami.stage_tau(t[rows], self.ranges[k - 1]), txt[rows], pooled[rows], k)
            # line 16: Eq. 4, ‖(x̂_s − x̂_e) − v_θk‖², summed over the window's n samples here
            stage_sum = nami.flow_loss(v, nami.flow_target(x_s, x_e)) * n
            sums[k - 1] = stage_sum.detach()
            # line 18: Σ_k w_k · (window k's mean over the global batch): §4.3's 4:2:1 sets how many samples each
            # window gets, not its weight (docs/method.md §5)
            loss = loss + self.weights[k - 1] * parallel.share_of_global_mean(stage_sum, totals[k - 1])
        return loss, sums


def main(cfg: TrainConfig) -> dict:
    """BridgeFlow pre-training, then Algorithm 1; returns {"losses": [...], "out": folder, ...}. Under torchrun every
    rank calls it; only the main rank logs, writes and prints."""
    with TrainingRun(cfg) as run:  # torchrun, the run folder (locked), the encoders, the VAE: training/session.py
        model_config = run.model_config
        K = model_config.num_stages
        # Algorithm 1, line 2: K time windows [s_k → e_k], stage 1 at the noise (the paper's [t_(k−1), t_k]), the
        # starts corrected (docs/method.md §2), and the range of the global time τ in each
        windows = nami.stage_windows(model_config.window_ratios, model_config.gamma)
        ranges = nami.tau_ranges(model_config.window_ratios, model_config.gamma)
        # line 3: θ_k = m_1 ⊕ … ⊕ m_k, one model whose stage k stops after cut point c_k; new, or --init-from's
        model, bridge = run.weights()  # and the EMA of θ, kept beside it by the run (as DiT)
        if run.step == 0 and K > 1 and not run.bridge_given:  # §3.3: BridgeFlow pre-trained first, then frozen
            pretrain_bridgeflow(cfg, bridge, windows, run)
        bridge.requires_grad_(False)
        loss_of = run.distributed(Algorithm1Loss(run.velocity(model, windows), run.jumps(bridge, windows), windows,
                                                 ranges, run.stage_weights))
        data = run.feed()
        for step in run.steps():  # line 4: repeat … until the last step
            # line 5: sample x'_1 ~ D', a global batch of full-size latents and their captions' text states, as
            # this rank's micro-batches
            micro_batches = data.next_step()
            # §4.3: each sample's window by its place in the global batch, at the phase's ratios (4:2:1, 2:4:1,
            # 1:2:4, low → high), a window taking only images at least its size (D' of line 5)
            ratios = config.stage_ratios(run.schedule, step)
            stages = feed.batch_stages(ratios, cfg.batch_size, data.max_stages(micro_batches))
            totals, sums = [stages.count(k) for k in range(1, K + 1)], torch.zeros(K, device=run.device)
            for batch in run.accumulate(micro_batches):
                # §3.4, per sample: the caption dropped with p = 0.1 (the empty prompt, CFG's unconditional input),
                # the noise ε_K at the full size (its coarser levels follow in line 6), t' ~ logit-normal(0, 1)
                dropped, eps, t = draws(cfg.seed, batch.positions, batch.x.shape[1:], cfg.caption_dropout, run.device)
                txt = torch.where(dropped[:, None, None], data.uncond[0], batch.txt)
                pooled = torch.where(dropped[:, None], data.uncond[1], batch.pooled)
                stage = [stages[i] for i in batch.slot]
                loss, stage_sums = loss_of(batch.x, txt, pooled, eps, t, stage, totals)  # lines 6-16, 18's sum: above
                loss.backward()  # line 18: backpropagation
                sums += stage_sums
            run.update(step, sums, totals, ratios)  # clip, NaN guard, AdamW, EMA, log, validation, grids, checkpoints
    return run.result()


if __name__ == "__main__":
    try:
        main(config.parse_args(description=__doc__))
    except (ValueError, FileNotFoundError, ImportError, checkpoint.TrainingStopped) as e:
        raise SystemExit(f"error: {e}")
    finally:
        parallel.shutdown()
