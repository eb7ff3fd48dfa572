"""NAMI (Ma et al., 2025, "Efficient Image Generation via Bridged Progressive Rectified Flow Transformers") as a
diffusers pipeline: text -> image by NAMI's progressive sampler, K resolution stages, each integrating its time
window by Flow-Euler with the first blocks of the transformer, BridgeFlow carrying each stage's end across the 2×
jump to the next (paper §3.5); classifier-free guidance batched.

    import torch
    from diffusers import DiffusionPipeline
    pipe = DiffusionPipeline.from_pretrained("FOLDER", trust_remote_code=True)   # dtype=torch.bfloat16 on a GPU
    image = pipe("a red circle", generator=torch.Generator().manual_seed(0)).images[0]

training/export.py (the nami repository, a plain-PyTorch reference of the paper) writes this file at the root of an
exported folder, beside copies of the repository's nami.py (the sampler: nami.generate) and common/text_states.py
(the text encoding of its TextEncoder), so that a picture drawn here is the one its `python sample.py` draws for
the same prompt, seed, steps and guidance. It is not imported inside the repository.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from diffusers import DiffusionPipeline
from diffusers.utils import BaseOutput, logging
from PIL import Image

from .nami import default_steps, generate
from .text_states import CHUNK, text_states

logger = logging.get_logger(__name__)
OUTPUT_TYPES = ("pil", "np", "pt", "latent")


@dataclass
class NamiPipelineOutput(BaseOutput):
    """images: PIL images, a numpy array (B, H, W, 3) or a tensor (B, 3, H, W) in [0, 1], or the latents
    (B, C, h, w); seeds: the seed each image's noise was drawn with (pass it back to draw that image again)."""
    images: list | np.ndarray | torch.Tensor
    seeds: list


class PromptEncoder:
    """nami.generate's text encoder over the pipeline's components: encode(prompts) -> txt (B, L, D), pooled (B, P),
    float32 on the CPU; each distinct prompt is encoded once, in sorted batches of CHUNK, as the repository's
    common/encoders.py TextEncoder.encode does."""

    def __init__(self, pipe: "NamiPipeline", device):
        self.pipe, self.device = pipe, device

    def encode(self, prompts):
        pipe, settings, states = self.pipe, self.pipe.config, {}
        distinct = sorted(set(prompts))
        for i in range(0, len(distinct), CHUNK):
            batch = distinct[i:i + CHUNK]
            txt, pooled = text_states(batch, pipe.tokenizer, pipe.text_encoder, settings.text_max_length,
                                      settings.text_padding, pipe.tokenizer_2, pipe.text_encoder_2,
                                      settings.pooled_max_length, settings.pooled_rule, self.device)
            states.update({prompt: (txt[j].cpu(), pooled[j].cpu()) for j, prompt in enumerate(batch)})
        return torch.stack([states[p][0] for p in prompts]), torch.stack([states[p][1] for p in prompts])


class NamiPipeline(DiffusionPipeline):
    """Text -> image with a NAMI transformer, its BridgeFlow maps, its scheduler (windows, grid), the text encoder(s)
    it was trained with, and the VAE (none: pixel space). The settings in model_index.json are the text encoding's
    (tokens, padding rule, pooled rule), the defaults of a call (prompt suffix, negative prompt, size, guidance),
    and, for readers, the source checkpoint's config.json (`trained`) and where the folder came from."""
    model_cpu_offload_seq = "text_encoder->text_encoder_2->transformer->vae"
    _optional_components = ["text_encoder_2", "tokenizer_2", "vae"]
    _exclude_from_cpu_offload = ["bridge_flow"]  # two small maps, used between the transformer's calls

    def __init__(self, transformer, bridge_flow, scheduler, text_encoder, tokenizer, text_encoder_2=None,
                 tokenizer_2=None, vae=None, text_max_length: int = 16, text_padding: str = "zeros",
                 pooled_max_length: int = 77, pooled_rule: str = "mean", prompt_suffix: str = "",
                 negative_prompt: str = "", height: int = 1024, width: int = 1024, guidance_scale: float = 3.0,
                 trained: dict | None = None, exported_from: dict | None = None):
        super().__init__()
        self.register_modules(transformer=transformer, bridge_flow=bridge_flow, scheduler=scheduler,
                              text_encoder=text_encoder, tokenizer=tokenizer, text_encoder_2=text_encoder_2,
                              tokenizer_2=tokenizer_2, vae=vae)
        self.register_to_config(text_max_length=text_max_length, text_padding=text_padding,
                                pooled_max_length=pooled_max_length, pooled_rule=pooled_rule,
                                prompt_suffix=prompt_suffix, negative_prompt=negative_prompt, height=height,
                                width=width, guidance_scale=guidance_scale, trained=trained,
                                exported_from=exported_from)
        model, times = transformer.cfg, scheduler.config
        if [float(r) for r in times.window_ratios] != list(model.window_ratios) or times.gamma != model.gamma:
            raise ValueError(f"scheduler/scheduler_config.json has the windows {list(times.window_ratios)}, γ "
                             f"{times.gamma}; transformer/config.json {list(model.window_ratios)}, γ {model.gamma}: "
                             "the transformer was trained for its own, make the two the same")
        if (text_encoder_2 is None) != (pooled_rule == "mean"):
            raise ValueError(f"model_index.json: pooled_rule {pooled_rule!r} with "
                             f"{'no' if text_encoder_2 is None else 'a'} pooled encoder (text_encoder_2): the mean of "
                             "the text states is the rule without one, 'cls' or 'pooler_output' with one")
        channels = vae.config.latent_channels if vae is not None else 3
        if channels != model.in_channels:
            raise ValueError(f"the transformer takes {model.in_channels}-channel latents, the "
                             f"{'VAE makes' if vae is not None else 'pixel space (no VAE) has'} {channels}")

    @property
    def vae_scale_factor(self) -> int:
        """Pixels per latent cell: 2^(levels − 1) of the VAE, 1 in pixel space."""
        return 2 ** (len(self.vae.config.block_out_channels) - 1) if self.vae is not None else 1

    def stage_steps(self, num_inference_steps) -> list[int]:
        """Euler steps per stage: a sequence gives them (one per stage), an int the total, split evenly as
        nami.default_steps splits 30 into 10 + 10 + 10; None: the scheduler's default."""
        stages = self.transformer.cfg.num_stages
        if num_inference_steps is None:
            return list(self.scheduler.config.num_inference_steps)
        if isinstance(num_inference_steps, int):
            if num_inference_steps < stages:
                raise ValueError(f"num_inference_steps={num_inference_steps}: at least one step per stage "
                                 f"({stages} stages)")
            return default_steps(stages, num_inference_steps)
        steps = [int(n) for n in num_inference_steps]
        if len(steps) != stages or min(steps) < 1:
            raise ValueError(f"num_inference_steps={tuple(num_inference_steps)}: give {stages} positive counts, "
                             "one per stage, or their total as an int")
        return steps

    @staticmethod
    def seeds(generator, count: int) -> list[int]:
        """The seed of each image. nami.generate draws image i's noise at full size with
        torch.Generator().manual_seed(seed_i), so a generator's seed is read, not its stream: one generator seeded s
        gives images s, s + 1, ... (what `python sample.py --seed s -n count` draws), a list one generator per
        image, each its own seed; None draws the first seed from torch's global generator (torch.manual_seed)."""
        if generator is None:
            first = int(torch.randint(0, 2 ** 62, ()).item())
            return [first + i for i in range(count)]
        if isinstance(generator, torch.Generator):
            return [(generator.initial_seed() + i) % 2 ** 64 for i in range(count)]
        generators = list(generator)
        if len(generators) != count or not all(isinstance(g, torch.Generator) for g in generators):
            raise ValueError(f"generator: one torch.Generator, or a list of {count} (one per image), got "
                             f"{len(generators)} items")
        return [g.initial_seed() for g in generators]

    def check_size(self, height: int, width: int):
        """Each side a multiple of (pixels per latent cell) × (patch) × 2^(K−1): every stage packs into patches."""
        factor, model = self.vae_scale_factor, self.transformer.cfg
        multiple = factor * model.size_multiple
        if height % multiple or width % multiple or height <= 0 or width <= 0:
            nearest = [max(multiple, side // multiple * multiple) for side in (width, height)]
            raise ValueError(f"height={height}, width={width}: each side must be a positive multiple of {multiple} "
                             f"({factor} pixels per latent cell × patch {model.patch_size} × 2^{model.num_stages - 1} "
                             f"for the stages), e.g. width={nearest[0]}, height={nearest[1]}")

    @torch.no_grad()
    def __call__(self, prompt, negative_prompt: str | None = None, num_inference_steps=None,
                 guidance_scale: float | None = None, height: int | None = None, width: int | None = None,
                 num_images_per_prompt: int = 1, generator=None, output_type: str = "pil", flat: bool = False,
                 return_dict: bool = True):
        """prompt: a str or a list of them (the release's suffix is appended, as its sampler does); negative_prompt:
        classifier-free guidance's unconditional text (None: the folder's default); num_inference_steps: steps per
        stage, e.g. (10, 10, 10), or their total; guidance_scale g of v_u + g·(v_c − v_u) (1: no guidance);
        height, width in pixels; generator: see `seeds`; output_type "pil", "np", "pt" or "latent"; flat: the
        flat sampler (one window [1 → 0], every block, full size, the same total steps)."""
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        negative = self.config.negative_prompt if negative_prompt is None else negative_prompt
        if not prompts or not all(isinstance(p, str) for p in prompts + [negative]):
            raise TypeError("prompt must be a str or a non-empty list of str, negative_prompt a str")
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"output_type={output_type!r}: one of {OUTPUT_TYPES}")
        height, width = height or self.config.height, width or self.config.width
        self.check_size(height, width)
        steps = self.stage_steps(num_inference_steps)
        guidance = self.config.guidance_scale if guidance_scale is None else guidance_scale
        texts = [p + self.config.prompt_suffix for p in prompts for _ in range(num_images_per_prompt)]
        seeds = self.seeds(generator, len(texts))
        # nami.generate samples where the transformer's weights are: under enable_model_cpu_offload, put it on the
        # device now (its hook puts it back when the VAE runs); BridgeFlow stays in float32 whatever torch_dtype,
        # as sample.py keeps it
        device = self._execution_device
        self.transformer.to(device)
        bridge = self.bridge_flow.to(device).float()
        factor = self.vae_scale_factor
        latents = generate(self.transformer, PromptEncoder(self, device), texts, seeds, height // factor,
                           width // factor, steps, guidance, negative, bridge=bridge, flat=flat,
                           schedule=self.scheduler.grids)[-1]
        images = latents if output_type == "latent" else self.decode(latents)
        self.maybe_free_model_hooks()
        if output_type == "pil":
            # x ∈ [−1, 1] -> round((x + 1)·127.5), the repository's common/images.py to_image: the same bytes
            pixels = ((images + 1) * 127.5).round().byte().permute(0, 2, 3, 1).cpu().numpy()
            images = [Image.fromarray(array) for array in pixels]
        elif output_type in ("np", "pt"):
            images = (images + 1) / 2
            images = images.permute(0, 2, 3, 1).cpu().numpy() if output_type == "np" else images.cpu()
        return NamiPipelineOutput(images=images, seeds=seeds) if return_dict else (images,)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents -> pixels in [−1, 1], float32: the VAE decodes x / scaling_factor + shift_factor (the latents
        were normalised as (z − shift)·scale, docs/method.md §6); in pixel space the latents are the pixels."""
        if self.vae is None:
            return latents.float().clamp(-1, 1)
        scale, shift = float(self.vae.config.scaling_factor), float(self.vae.config.shift_factor or 0.0)
        # channels-last convolutions, as the repository's sampler runs its VAE: the other layout sums in another
        # order, and a colour near a rounding step then lands one level apart (seen on an AMD EPYC)
        self.vae.to(memory_format=torch.channels_last)
        pixels = self.vae.decode((latents / scale + shift).to(self.vae.dtype)).sample
        return pixels.float().clamp(-1, 1)
