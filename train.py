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
        --text-len 256 --resolution 1024      # real data in the FLUX VAE's latent space
    python -m datafeed cache DIR --out CACHE ...  # then train with --cache CACHE instead of --data DIR
    torchrun --nproc_per_node 8 train.py --size 2b ...   # DDP / FSDP2 (see common/parallel.py)

Read `main` next to the paper's Algorithm 1: each of its lines sits above the code that does it,
and `Algorithm1Loss` holds lines 6-18, the loop over the time windows. The settings and their
flags are in training/config.py, the run folder (checkpoints, log, sample grids, NaN guard, stop signals)
in training/checkpoint.py, the data feed in datafeed/feed.py, torchrun/DDP/FSDP2 in common/parallel.py. Writes to --out:
log.jsonl, samples/step-NNNNNNN.png, ckpt-NNNNNNN/; a killed run continues with --resume.
`main(TrainConfig(...))` is importable.
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn
from tqdm import tqdm

import nami
from bridgeflow import BridgeFlow, fit, pretrain
from common import files, parallel
from common.encoders import TextEncoder, load_autoencoder
from datafeed import buckets, feed
from toyworld import shapes
from training import checkpoint, config, init_from, lora, validation
from training.config import TrainConfig, validate


class Algorithm1Loss(nn.Module):
    """Algorithm 1, lines 6-18, on one micro-batch whose samples are ordered by stage: for each time
    window present, the stage's image and noise pyramid level, its start and end points, x̂_t, the
    velocity of θ_k and the loss of Eq. 4; weighted by w_k into the mean over the global batch
    (totals[k−1] samples at stage k). One module, so that DDP sees one forward per backward."""

    def __init__(self, model, bridge, windows, ranges, weights, flat=False, start="bridge", autocast=False,
                 every_stage=False, jump_noise=False, velocity="local", guidance=None):
        super().__init__()
        self.model, self.bridge, self.windows, self.ranges, self.weights = model, bridge, windows, ranges, weights
        self.flat, self.start, self.autocast, self.every_stage = flat, start, autocast, every_stage
        self.jump_noise = jump_noise  # [ours] nami.with_jump_noise, as the sampler adds it
        self.velocity = velocity      # what the network predicts: nami.stage_velocity makes it the local velocity
        self.guidance = guidance      # a guidance-distilled model's (FLUX.1-dev) guidance input, else None

    def forward(self, batch: feed.MicroBatch, totals):
        K = len(self.windows)
        loss, sums = 0.0, torch.zeros(K, device=batch.x.device)
        # line 4 (inner loop): for each time window [s_k → e_k] that the batch holds
        for k, rows, n in parallel.stage_rows(batch.counts, totals, self.every_stage):
            # line 6: Down(x'_1) until it is at stage k's resolution; the coupled noise likewise
            x = nami.image_pyramid(batch.x[rows], K)[k - 1]
            eps = nami.noise_pyramid(batch.eps[rows], K)[k - 1]
            # lines 7-13: start point (ε_1, or BridgeFlow(Up(end point of stage k−1))) and end point
            jump = nami.with_jump_noise(self.bridge, batch.eps[rows], self.windows) if self.jump_noise else self.bridge
            x_s, x_e = nami.stage_points(x, eps, k, self.windows, jump, self.start)
            # line 14: t' (logit-normal, drawn with the noise by feed.Batches); Eq. 3:
            # x̂_t = t'·x̂_s + (1 − t')·x̂_e, and the global time τ(k, t') the model sees
            t = batch.t[rows]
            x_t = nami.interpolate(x_s, x_e, t)
            tau = nami.stage_tau(t, self.ranges[k - 1])
            # line 15: the velocity v_θk(x̂_t, t') of the model cut after stage k's blocks, in the window's
            # local units whatever the network predicts (--velocity global: (s_k − e_k)·v)
            with torch.autocast(x_t.device.type, dtype=torch.bfloat16, enabled=self.autocast):
                g = None if self.guidance is None else torch.full_like(tau, self.guidance)
                v = self.model(x_t, tau, batch.txt[rows], batch.pooled[rows], None if self.flat else k, g)
            v = nami.stage_velocity(v, self.windows[k - 1], self.velocity)
            # line 16: Eq. 4, ‖(x̂_s − x̂_e) − v_θk(x̂_t, t')‖², summed over this micro-batch's n samples
            stage_sum = nami.flow_loss(v, nami.flow_target(x_s, x_e)) * n
            sums[k - 1] = stage_sum.detach()
            # line 18: weight the windows' losses (w_k), each the mean over its samples of the global batch
            loss = loss + self.weights[k - 1] * parallel.share_of_global_mean(stage_sum, totals[k - 1])
        return loss, sums


def build_model(model_config, cfg: TrainConfig, sharded: bool, autocast: bool, device):
    """The model and its EMA (kept beside it, as DiT), with checkpointing, compile and FSDP2 as asked.
    Both are built on the meta device, sharded, then given their initial values one parameter at a
    time: no rank ever holds a copy of the whole model it does not keep."""
    with torch.device("meta"):
        model, ema = nami.Nami(model_config), nami.Nami(model_config)
    model.checkpointing = cfg.activation_checkpointing
    if cfg.compile:
        parallel.compile_blocks(model)
    if cfg.lora:  # a LoRA run's frozen base: no EMA of its own (lora.ema_of), stored in bf16 where the step computes
        # in bf16, its values from --init-from (init_from.load)
        return model.to(torch.bfloat16 if autocast else torch.float32).to_empty(device=device), None
    if sharded:  # FSDP2: bf16 compute, fp32 master weights and gradient reduction
        parallel.shard_model(model, bf16=autocast)
        parallel.shard_model(ema, bf16=autocast)
    model.to_empty(device=device)
    ema.to_empty(device=device)
    model.initialize_weights(fill=parallel.fill_shard)
    with torch.no_grad():
        for kept, weight in zip(ema.parameters(), model.parameters()):
            parallel.local(kept).copy_(parallel.local(weight))
    return model, ema.requires_grad_(False)


def pretrain_bridgeflow(cfg: TrainConfig, bridge, windows, encoder, autoencoder, generator, dist):
    """Paper §3.3, §4.3: pre-train every BridgeFlow map on its MSE, before the transformer: with the
    paper's Adam (lr 1e-3, the default), or exactly, by least squares over the batches (bridgeflow.fit).
    Every rank fits the same map on the same data; rank 0's copy is then broadcast."""
    source = feed.Batches(cfg, encoder, autoencoder, len(windows), dist.device, stream=1)
    steps = config.BRIDGE_STEPS[cfg.bridge_fit] if cfg.bridge_steps is None else cfg.bridge_steps

    def batch(i):
        x = source.next(text=False)[0]
        return x, torch.randn(x.shape, generator=generator).to(dist.device)
    bar = tqdm(total=steps, desc="BridgeFlow", disable=not (cfg.progress and dist.main), leave=False)
    if cfg.bridge_fit == "least-squares":
        losses = fit(bridge, batch, windows, steps, progress=lambda i: bar.update(1))
    else:
        losses = pretrain(bridge, batch, windows, steps, cfg.bridge_lr,
                          progress=lambda i, l: (bar.update(1), bar.set_postfix(mse=f"{sum(l):.4f}")))
    bar.close()
    parallel.broadcast_module(bridge)
    if dist.main:
        print(f"BridgeFlow pre-trained ({cfg.bridge_fit}, {steps} batches): W = "
              f"{[round(w, 3) for w in bridge.scale.tolist()]}, MSE per jump = {[round(l, 4) for l in losses]}")


def lora_base(cfg: TrainConfig):
    """--resume of a LoRA run: the base comes back from the folder its checkpoints record, and --lora
    must give the rank it was started with (a full run resumes without --lora)."""
    ckpt = checkpoint.latest_checkpoint(Path(cfg.out)) if cfg.resume else None
    recorded = lora.record(ckpt) if ckpt and files.read_json(ckpt / "config.json").get("lora") else {}
    if ckpt and recorded.get("rank") != cfg.lora:
        raise ValueError(f"--resume: {ckpt} is " + (f"a LoRA run of rank {recorded['rank']}: resume it with --lora "
                         f"{recorded['rank']}" if recorded else "a run of every weight: resume it without --lora"))
    if recorded:
        base = recorded["base"]
        cfg.init_from, cfg.init_from_raw = base["path"], base.get("weights") == "model"
        return base


def start_lora(cfg: TrainConfig, model, run, resumed_base):
    """Adapters of --lora's rank on the frozen base (training/lora.py), recorded in config.json with the sha256
    of the files the base came from; a resumed run refuses a base whose files changed."""
    base = {k: run.record["init_from"][k] for k in ("path", "kind", "weights", "sha256")}
    if resumed_base is not None and run.main and resumed_base["sha256"] != base["sha256"]:
        raise ValueError(f"--resume: the base {base['path']} is not the one this LoRA run started on (the sha256 of "
                         f"its files changed); put the original back, or start a new run with --init-from")
    run.record["lora"] = {**lora.settings(cfg.lora, cfg.lora_alpha, cfg.lora_targets), "base": base}
    model = lora.attach(model, run.record["lora"])
    if run.main:
        print(f"LoRA rank {cfg.lora}: {sum(p.numel() for p in lora.adapter_parameters(model)):,} adapter "
              f"parameters trained, {sum(p.numel() for p in model.parameters() if not p.requires_grad):,} frozen")
    return model, lora.ema_of(model)


def update_ema(kept: list, trained: list, decay: float, step: int):
    """EMA of the trained weights (used for sampling), with DiT-style warm-up of the decay; on each
    rank's shards under FSDP2. kept[i] averages trained[i]: every weight of the model, or a LoRA
    run's adapters alone (its EMA model shares the frozen base)."""
    decay = min(decay, (1 + step) / (10 + step))
    with torch.no_grad():
        torch._foreach_lerp_([parallel.local(p) for p in kept], [parallel.local(p) for p in trained], 1 - decay)


def main(cfg: TrainConfig) -> dict:
    """BridgeFlow pre-training, then Algorithm 1; returns {"losses": [...], "out": folder, ...}.
    Under torchrun every rank calls it; only the main rank logs, writes and prints."""
    validate(cfg)
    dist = parallel.init_distributed()
    device = dist.device
    parallel.use_tf32()
    micro = cfg.micro_batch or cfg.batch_size // dist.world
    if cfg.batch_size % (micro * dist.world):
        raise ValueError(f"--batch-size {cfg.batch_size} must be a multiple of --micro-batch {micro} × {dist.world} ranks")
    strategy = cfg.parallel or ("ddp" if cfg.lora else parallel.default_strategy(cfg.size))
    sharded = strategy == "fsdp" and dist.active
    autocast = device.type == "cuda" if cfg.bf16 is None else cfg.bf16
    with checkpoint.RunFolder(cfg, dist.main) as run:  # locked for the run; released however it ends
        torch.manual_seed(cfg.seed)
        autoencoder = load_autoencoder(cfg.vae, device)
        side = cfg.resolution // autoencoder.factor  # latent side at the full size
        config.check_resolution(cfg.resolution, cfg.resolution,
                                autoencoder.factor * config.model_config(cfg).size_multiple, "--resolution")
        encoder = TextEncoder(cfg.text_encoder, cfg.text_len, device, cfg.pooled_encoder, cfg.pooled_len,
                              parallel.sampling_dtype(device), lazy=bool(cfg.cache))
        if cfg.cache:  # the text states come from the cache: encode the grids' prompts now, free the encoders
            encoder.keep_only(shapes.EXAMPLE_PROMPTS[cfg.world_level] + [""])
        model_config = config.model_config(cfg, encoder.dim, encoder.pooled_dim, autoencoder.channels)
        K, weights = model_config.num_stages, cfg.stage_weights or (1.0,) * model_config.num_stages
        size = buckets.size_for(cfg.aspect, cfg.resolution, autoencoder.factor * model_config.size_multiple)  # (W, H) px
        run.describe(model_config, encoder, autoencoder, size, feed.vocabulary(cfg) if dist.main else None)

        # Algorithm 1, line 2: K time windows [s_k → e_k] (corrected starts, docs/method.md §2), τ ranges
        windows = nami.stage_windows(model_config.window_ratios, model_config.gamma)
        ranges = nami.tau_ranges(model_config.window_ratios, model_config.gamma)
        # line 3: θ_k = m_1 ⊕ … ⊕ m_k, one model whose stage k stops after cut point c_k
        model, ema = build_model(model_config, cfg, sharded, autocast, device)
        bridge = BridgeFlow(model_config.in_channels, [(s, s) for s in nami.stage_sizes(side, K)]).to(device)
        # or θ and BridgeFlow from weights the user has (--init-from: ours, the release's, a flat model's)
        resumed_base = lora_base(cfg)
        bridge_given = init_from.load(cfg, model, ema, bridge, run)
        if cfg.lora:  # or θ frozen, and low-rank adapters on it trained in its place (training/lora.py)
            model, ema = start_lora(cfg, model, run, resumed_base)
        # fused: one kernel per parameter instead of a dozen (the default run's AdamW: 9-12 → 3-4 ms a step on a
        # CPU, docs/benchmarks.md); FSDP2's sharded parameters keep the multi-tensor form
        trained = [p for p in model.parameters() if p.requires_grad]  # a LoRA run: its adapters alone
        kept = lora.adapter_parameters(ema) if cfg.lora else list(ema.parameters())  # their EMA, in the same order
        optimizer = torch.optim.AdamW(trained, lr=cfg.lr, weight_decay=cfg.weight_decay, fused=None if sharded else True)
        state = checkpoint.TrainState(model, ema, bridge, optimizer, torch.Generator().manual_seed(cfg.seed), sharded,
                                      *((lora.adapters, lora.write_adapters) if cfg.lora else ()))
        step = run.resume(state)  # 0 for a new run; from here on, SIGINT/SIGTERM stop with a checkpoint
        if step == 0 and K > 1 and not bridge_given:  # §3.3: BridgeFlow, pre-trained and frozen first
            pretrain_bridgeflow(cfg, bridge, windows, encoder, autoencoder, state.generator, dist)
        bridge.requires_grad_(False)
        guidance = cfg.distilled_guidance if model_config.guidance_embeds else None  # FLUX.1-dev: g is an input
        loss_fn = Algorithm1Loss(model, bridge, windows, ranges, weights, cfg.mode == "flat", cfg.start,
                                 autocast and not sharded, every_stage=sharded, jump_noise=model_config.jump_noise,
                                 velocity=model_config.velocity, guidance=guidance)
        step_loss = parallel.wrap_ddp(loss_fn, device) if dist.active and not sharded else loss_fn
        batches = feed.Batches(cfg, encoder, autoencoder, K, device, start_step=step,
                               slots=parallel.micro_batches(cfg.batch_size, micro, dist.world, dist.rank))
        schedule = config.stage_mix_schedule(cfg, K)
        last_step = cfg.max_steps if cfg.stop_after is None else min(cfg.stop_after, cfg.max_steps)
        # [ours] the validation loss: Eq. 4 per stage on held-out samples at fixed t' and noise (EMA weights)
        held_out = validation.held_out(cfg, encoder, autoencoder, K, device) if cfg.val_every else None

        def validate_at(step):
            if held_out is not None and (step % cfg.val_every == 0 or step == cfg.max_steps):
                per_t = validation.validation_loss(ema, bridge, held_out, start=cfg.start, guidance=guidance)
                run.log_validation(step, validation.summary(per_t, weights))
        if step == 0:
            validate_at(0)
        model.train()
        while step < last_step:  # line 4: repeat … until the last step
            ratios, lr = config.stage_ratios(schedule, step), config.learning_rate(cfg, step, schedule)
            for group in optimizer.param_groups:
                group["lr"] = lr
            # line 5: sample a global batch x'_1 of full-size latents with their captions: this rank's
            # micro-batches, each sample's stage drawn at the phase's ratios (paper §4.3)
            micro_batches, totals = batches.next_step(ratios)  # totals: samples per stage, global batch
            optimizer.zero_grad(set_to_none=True)
            sums = torch.zeros(K, device=device)
            for j, micro_batch in enumerate(micro_batches):
                parallel.set_gradient_sync(step_loss, model, j == len(micro_batches) - 1)
                loss, stage_sums = step_loss(micro_batch, totals)  # lines 6-16, weighted as line 18
                loss.backward()                                    # line 18: backpropagation
                sums += stage_sums
            stage_loss = {k: s / totals[k - 1] for k, s in enumerate(parallel.all_sum(sums).tolist(), 1)
                          if totals[k - 1] > 0}
            grad_norm = parallel.clip_grad_norm(model, cfg.grad_clip)
            finite = run.step_is_finite(step, stage_loss, grad_norm)  # the NaN guard: else skip the update
            if finite:
                optimizer.step()
                update_ema(kept, trained, cfg.ema_decay, step)
            step += 1
            run.log(step, stage_loss, sum(weights[k - 1] * l for k, l in stage_loss.items()), lr=lr,
                    grad_norm=grad_norm.item() if finite else None, ratios=list(ratios))
            validate_at(step)
            run.sample_grid(step, ema, bridge, encoder, autoencoder, batches.prompts)
            if run.checkpoint(step, last_step, state):  # also asks whether a stop signal came
                break
        if last_step == 0:  # --max-steps 0: the --init-from weights as they are, beside the pre-trained BridgeFlow
            run.sample_grid(0, ema, bridge, encoder, autoencoder, batches.prompts)
            run.checkpoint(0, 0, state)
    return run.result(step)


if __name__ == "__main__":
    try:
        main(config.parse_args(description=__doc__))
    except (ValueError, FileNotFoundError, ImportError, checkpoint.TrainingStopped) as e:
        raise SystemExit(f"error: {e}")
    finally:
        parallel.shutdown()
