"""A training run's parts that are not the paper, settled before Algorithm 1's loop into objects the loop calls once
each, and what follows each step; train.py reads as the algorithm because they live here.

    with TrainingRun(cfg) as run:           # torchrun, the run folder and its lock, encoders, VAE, the model's config
        model, bridge = run.weights()        # θ new (meta device, FSDP2), or --init-from, LoRA; EMA, AdamW; --resume
        theta = run.velocity(model, windows) # line 15's v_θk: autocast, a guidance input, the velocity's reading
        jumps = run.jumps(bridge, windows)   # lines 7-13's jump: BridgeFlow(Up(·)), [ours] jump noise or --start
        loss_of = run.distributed(loss)      # DDP around the loss module: one forward per backward
        for step in run.steps():             # the lr of the step (§4.3), until the last step or a stop signal
            for batch in run.accumulate(micro_batches): ...   # gradient sync on the last micro-batch only
            run.update(step, sums, totals, ratios)  # clip, NaN guard, AdamW, EMA, log, validation, grids, checkpoints
    run.result()

The run folder itself (checkpoints, resume, the log, grids, the NaN guard, stop signals) is training/checkpoint.py;
ranks, DDP and FSDP2 are common/parallel.py.
"""
from __future__ import annotations

import functools
from pathlib import Path

import torch
import torch.nn as nn

import nami
from bridgeflow import BridgeFlow, jump_for
from common import files, parallel
from common.encoders import TextEncoder, load_autoencoder
from datafeed import buckets, feed
from toyworld import shapes
from training import checkpoint, config, init_from, lora, validation
from training.config import TrainConfig, validate


class StageVelocity(nn.Module):
    """v_θk(x̂_t, τ) of Algorithm 1, line 15: the model cut after stage k's blocks, under bf16 autocast where the
    run computes in bf16, given a guidance-distilled model's guidance input (FLUX.1-dev), and read as the stage's
    local velocity whatever the network predicts (nami.stage_velocity; --velocity global: (s_k − e_k)·v)."""

    def __init__(self, model, windows, autocast: bool = False, guidance: float | None = None):
        super().__init__()
        self.model, self.windows, self.autocast, self.guidance = model, windows, autocast, guidance

    def forward(self, x_t, tau, txt, pooled, k: int):
        with torch.autocast(x_t.device.type, dtype=torch.bfloat16, enabled=self.autocast):
            g = None if self.guidance is None else torch.full_like(tau, self.guidance)
            v = self.model(x_t, tau, txt, pooled, k, g)
        return nami.stage_velocity(v, self.windows[k - 1], self.model.cfg.velocity)


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


def start_lora(cfg: TrainConfig, model, folder, resumed_base):
    """Adapters of --lora's rank on the frozen base (training/lora.py), recorded in config.json with the sha256
    of the files the base came from; a resumed run refuses a base whose files changed."""
    base = {k: folder.record["init_from"][k] for k in ("path", "kind", "weights", "sha256")}
    if resumed_base is not None and folder.main and resumed_base["sha256"] != base["sha256"]:
        raise ValueError(f"--resume: the base {base['path']} is not the one this LoRA run started on (the sha256 of "
                         f"its files changed); put the original back, or start a new run with --init-from")
    folder.record["lora"] = {**lora.settings(cfg.lora, cfg.lora_alpha, cfg.lora_targets), "base": base}
    model = lora.attach(model, folder.record["lora"])
    if folder.main:
        print(f"LoRA rank {cfg.lora}: {sum(p.numel() for p in lora.adapter_parameters(model)):,} adapter "
              f"parameters trained, {sum(p.numel() for p in model.parameters() if not p.requires_grad):,} frozen")
    return model, lora.ema_of(model)


def update_ema(kept: list, trained: list, decay: float, step: int):
    """EMA of the trained weights (used for sampling), its decay warmed up as TensorFlow's ExponentialMovingAverage
    with num_updates does, min(decay, (1 + step) / (10 + step)) (DiT keeps a fixed 0.9999); on each rank's shards
    under FSDP2. kept[i] averages trained[i]: every weight of the model, or a LoRA run's adapters alone (its EMA
    model shares the frozen base)."""
    decay = min(decay, (1 + step) / (10 + step))
    with torch.no_grad():
        torch._foreach_lerp_([parallel.local(p) for p in kept], [parallel.local(p) for p in trained], 1 - decay)


class TrainingRun:
    """One call of train.main on one rank: opened as a context (the run folder locked for the run, released however
    it ends), then weights(), velocity(), jumps(), distributed(), feed(), steps(), accumulate(), update(), result()."""

    def __init__(self, cfg: TrainConfig):
        validate(cfg)
        self.cfg, self.dist = cfg, parallel.init_distributed()
        self.device, self.main = self.dist.device, self.dist.main
        parallel.use_tf32()
        self.micro = cfg.micro_batch or cfg.batch_size // self.dist.world
        if cfg.batch_size % (self.micro * self.dist.world):
            raise ValueError(f"--batch-size {cfg.batch_size} must be a multiple of --micro-batch {self.micro} × "
                             f"{self.dist.world} ranks")
        strategy = cfg.parallel or ("ddp" if cfg.lora else parallel.default_strategy(cfg.size))
        self.sharded = strategy == "fsdp" and self.dist.active
        self.autocast = self.device.type == "cuda" if cfg.bf16 is None else cfg.bf16
        self.folder, self.step, self.stopping = None, 0, False

    def __enter__(self):
        self.folder = checkpoint.RunFolder(self.cfg, self.main).__enter__()
        try:
            self.open_parts()
        except BaseException as error:
            self.folder.__exit__(type(error), error, error.__traceback__)
            raise
        return self

    def __exit__(self, *error):
        self.folder.__exit__(*error)

    def open_parts(self):
        """The autoencoder, the text encoders, the model's config and the loss weights w_k; what config.json records."""
        cfg, device = self.cfg, self.device
        torch.manual_seed(cfg.seed)
        if self.main:
            print(config.describe_recipe(cfg))
        self.autoencoder = load_autoencoder(cfg.vae, device)
        self.side = cfg.resolution // self.autoencoder.factor  # latent side at the full size
        config.check_resolution(cfg.resolution, cfg.resolution,
                                self.autoencoder.factor * config.model_config(cfg).size_multiple, "--resolution")
        self.encoder = TextEncoder(cfg.text_encoder, cfg.text_len, device, cfg.pooled_encoder, cfg.pooled_len,
                                   parallel.sampling_dtype(device), lazy=bool(cfg.cache))
        if cfg.cache:  # the text states come from the cache: encode the grids' prompts now, free the encoders
            self.encoder.keep_only(shapes.EXAMPLE_PROMPTS[cfg.world_level] + [""])
        self.model_config = config.model_config(cfg, self.encoder.dim, self.encoder.pooled_dim, self.autoencoder.channels)
        K = self.model_config.num_stages
        self.stage_weights = cfg.stage_weights or (1.0,) * K
        size = buckets.size_for(cfg.aspect, cfg.resolution, self.autoencoder.factor * self.model_config.size_multiple)
        self.folder.describe(self.model_config, self.encoder, self.autoencoder, size,
                             feed.vocabulary(cfg) if self.main else None)
        self.schedule = config.stage_mix_schedule(cfg, K)
        self.last_step = cfg.max_steps if cfg.stop_after is None else min(cfg.stop_after, cfg.max_steps)

    def weights(self):
        """Algorithm 1's θ and BridgeFlow, and the EMA of θ (kept here): new, or the weights --init-from gives (ours,
        the release, a flat model), with LoRA adapters trained in θ's place (--lora); then AdamW, and --resume's
        state. Sets self.step (0 for a new run) and self.bridge_given (BridgeFlow came with the weights)."""
        cfg, model_config = self.cfg, self.model_config
        model, ema = build_model(model_config, cfg, self.sharded, self.autocast, self.device)
        sizes = [(s, s) for s in nami.stage_sizes(self.side, model_config.num_stages)]
        bridge = BridgeFlow(model_config.in_channels, sizes).to(self.device)
        resumed_base = lora_base(cfg)
        self.bridge_given = init_from.load(cfg, model, ema, bridge, self.folder)
        if cfg.lora:  # θ frozen, and low-rank adapters on it trained in its place (training/lora.py)
            model, ema = start_lora(cfg, model, self.folder, resumed_base)
        # fused: one kernel per parameter instead of a dozen (the default run's AdamW: 9-12 → 3-4 ms a step on a
        # CPU, docs/benchmarks.md); FSDP2's sharded parameters keep the multi-tensor form
        self.trained = [p for p in model.parameters() if p.requires_grad]  # a LoRA run: its adapters alone
        self.kept = lora.adapter_parameters(ema) if cfg.lora else list(ema.parameters())  # their EMA, same order
        self.optimizer = torch.optim.AdamW(self.trained, lr=cfg.lr, weight_decay=cfg.weight_decay,
                                           fused=None if self.sharded else True)
        self.state = checkpoint.TrainState(model, ema, bridge, self.optimizer, torch.Generator().manual_seed(cfg.seed),
                                           self.sharded, *((lora.adapters, lora.write_adapters) if cfg.lora else ()))
        self.step = self.folder.resume(self.state)  # from here on, SIGINT/SIGTERM stop with a checkpoint
        self.model, self.ema, self.bridge = model, ema, bridge
        self.guidance = cfg.distilled_guidance if model_config.guidance_embeds else None  # FLUX.1-dev: g is an input
        return model, bridge

    def velocity(self, model, windows) -> StageVelocity:
        """Line 15's v_θk as the loss calls it: theta(x̂_t, τ, txt, pooled, k) -> the local velocity (StageVelocity)."""
        return StageVelocity(model, windows, self.autocast and not self.sharded, self.guidance)

    def jumps(self, bridge, windows):
        """The jump of lines 7-13 for the samples (x'_1, ε_K) of a stage: jumps(x, eps)(x̂_e^(k−1), k) -> x̂_s^(k),
        BridgeFlow(Up(·)) as the paper; [ours] plus the jump noise (docs/method.md §8), or with --start pyramid
        Pyramid Flow's analytic start (bridgeflow.jump_for)."""
        return functools.partial(jump_for, bridge, windows, jump_noise=self.model_config.jump_noise,
                                 pyramid=self.cfg.start == "pyramid")

    def distributed(self, loss_module: nn.Module) -> nn.Module:
        """DDP around the module that computes a micro-batch's whole loss (DDP allows several forwards of the model
        per backward only inside one wrapped forward); FSDP2 shards the model itself, one process needs nothing."""
        wrapped = parallel.wrap_ddp(loss_module, self.device) if self.dist.active and not self.sharded else loss_module
        self.loss_module = wrapped
        return wrapped

    def feed(self) -> feed.Batches:
        """Line 5's batches from the step the run starts at: this rank's micro-batches of each global batch."""
        data = feed.Batches(self.cfg, self.encoder, self.autoencoder, self.model_config.num_stages, self.device,
                            start_step=self.step,
                            slots=parallel.micro_batches(self.cfg.batch_size, self.micro, self.dist.world, self.dist.rank))
        self.prompts = data.prompts  # the sample grids': the world's example prompts, or a folder's first captions
        return data

    def steps(self):
        """The steps from where the run starts to the last (or a stop signal), each with its lr (a warm-up, and paper
        §4.3's lr halved in the last phase: config.learning_rate) and cleared gradients. Before the first, the
        validation loss of the weights as they start, and the held-out samples it uses (training/validation.py)."""
        cfg = self.cfg
        self.held_out = validation.held_out(cfg, self.encoder, self.autoencoder, self.model_config.num_stages,
                                            self.device) if cfg.val_every else None
        if self.step == 0:
            self.validate_at(0)
        self.model.train()
        while self.step < self.last_step and not self.stopping:
            self.lr = config.learning_rate(cfg, self.step, self.schedule)
            for group in self.optimizer.param_groups:
                group["lr"] = self.lr
            self.optimizer.zero_grad(set_to_none=True)
            yield self.step
        if self.last_step == 0:  # --max-steps 0: the --init-from weights as they are, beside the pre-trained BridgeFlow
            self.folder.sample_grid(0, self.ema, self.bridge, self.encoder, self.autoencoder, self.prompts)
            self.folder.checkpoint(0, 0, self.state)

    def accumulate(self, micro_batches):
        """The micro-batches of a step, the gradients reduced across ranks after the last one's backward only."""
        for j, batch in enumerate(micro_batches):
            parallel.set_gradient_sync(self.loss_module, self.state.model, j == len(micro_batches) - 1)
            yield batch

    def update(self, step: int, sums: torch.Tensor, totals: list, ratios):
        """After a step's backward passes: the stage losses (sums over the global batch / totals), the gradient norm
        clipped, the NaN guard (a non-finite step is skipped), AdamW and the EMA; then the log, the validation loss,
        sample grids and checkpoints as their intervals say; a stop signal ends the run after its checkpoint."""
        cfg = self.cfg
        stage_loss = {k: s / totals[k - 1] for k, s in enumerate(parallel.all_sum(sums).tolist(), 1) if totals[k - 1] > 0}
        grad_norm = parallel.clip_grad_norm(self.state.model, cfg.grad_clip)
        finite = self.folder.step_is_finite(step, stage_loss, grad_norm)
        if finite:
            self.optimizer.step()
            update_ema(self.kept, self.trained, cfg.ema_decay, step)
        self.step = step + 1
        self.folder.log(self.step, stage_loss, sum(self.stage_weights[k - 1] * l for k, l in stage_loss.items()),
                        lr=self.lr, grad_norm=grad_norm.item() if finite else None, ratios=list(ratios))
        self.validate_at(self.step)
        self.folder.sample_grid(self.step, self.ema, self.bridge, self.encoder, self.autoencoder, self.prompts)
        self.stopping = self.folder.checkpoint(self.step, self.last_step, self.state)  # also asks for a stop signal

    def validate_at(self, step: int):
        """[ours] The validation loss every --val-every steps and at the last: Eq. 4 per stage on held-out samples
        at fixed t' and noise, with the EMA weights (training/validation.py)."""
        if self.held_out is not None and (step % self.cfg.val_every == 0 or step == self.cfg.max_steps):
            per_t = validation.validation_loss(self.ema, self.bridge, self.held_out, start=self.cfg.start,
                                               guidance=self.guidance)
            self.folder.log_validation(step, validation.summary(per_t, self.stage_weights))

    def result(self) -> dict:
        """What train.main returns: {"losses": [...], "out": folder, "skipped_steps", "stopped_by"}."""
        return self.folder.result(self.step)
