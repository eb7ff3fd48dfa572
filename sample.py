"""Text -> PNG with a trained NAMI checkpoint or the authors' released NAMI-2B: progressive
sampling (paper §3.5).

    python sample.py "a red circle above a blue square"          # newest checkpoint under runs/
    python sample.py "three green squares" -n 8 --seed 1 --out squares.png
    python sample.py "a blue triangle" --show-stages              # each stage's output, like Fig. 3
    python sample.py "a blue triangle" --flat                     # the flat sampler, same total steps
    python sample.py --weights NAMI-T2I/weights "a photo of a cat"  # released NAMI-2B, 1024², 10+10+10, CFG 3
    python sample.py --lora runs/lora-toy "a circle"               # a LoRA (train.py --lora) on its base
    python sample.py --lora runs/lora-toy --merge-lora runs/merged "a circle"   # and its merged weights

The preset, resolution, text encoders and VAE come from the checkpoint. With --weights the release's
grid, prompt suffix and negative prompt are the defaults (--schedule, --no-release-prompts). The PNG's
text chunk records prompt, suffix, negative prompt, seed, steps, cfg, schedule, sampler and
checkpoint; the time of each stage is printed.
"""
from __future__ import annotations

import time
from pathlib import Path

import torch
from safetensors import SafetensorError

import nami
from common import images, parallel
from datafeed.feed import world_note  # the note when a prompt names nothing of the checkpoint's world
from training import checkpoint, config, lora, release, sample_config


def load(args, plan, device):
    """Only once the plan holds, the weights: (model, bridge, encoder, autoencoder, info) of one of
    our checkpoints or of the authors' release, with the LoRA on it if --lora is given."""
    if args.weights:
        loaded = release.load(args.weights, device)
    else:
        loaded = checkpoint.load_model(plan["folder"], not args.no_ema, args.text_encoder, args.pooled_encoder,
                                       args.vae, args.size, device)
    model, bridge, autoencoder = loaded[0], loaded[1], loaded[3]
    w, h = plan["size"]
    config.check_resolution(h, w, autoencoder.factor * model.cfg.size_multiple, "--res")
    if args.lora:  # refused unless made for this base; then kept as adapters, or merged and written too
        weights = "transformer" if args.weights else "model" if args.no_ema else "ema"
        lora.apply_to_base(model, bridge, args.lora_folder, args.lora_record, args.lora_scale, Path(plan["folder"]),
                           weights, args.merge_lora)
    model.to(parallel.sampling_dtype(device))
    return loaded


def main(argv=None):
    # the flags, then the plan they make with the checkpoint's config files, before any weights are read
    args = sample_config.parse_args(argv, __doc__)
    plan = None
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    parallel.use_tf32()
    try:
        plan = sample_config.sample_plan(args)
        if note := world_note(args.prompt, plan["vocabulary"]):
            print(note)
        # the model θ_k = m_1 ⊕ … ⊕ m_k (§3.2), the BridgeFlow of each jump (§3.3), text encoder and VAE
        model, bridge, encoder, autoencoder, info = load(args, plan, device)
    except (ValueError, FileNotFoundError, ImportError) as e:
        raise SystemExit(f"error: {e}")
    except SafetensorError as e:  # checkpoint.load_checkpoint's weights.safetensors, cut short or overwritten
        raise SystemExit(f"error: {plan['folder']}: a .safetensors file there is damaged ({e}): use another "
                         "checkpoint (--ckpt) or copy it again")
    (w, h), factor, steps = plan["size"], autoencoder.factor, plan["steps"]
    prompt = args.prompt + plan["suffix"]
    print(f"prompt: {prompt!r}  negative: {plan['negative']!r}  schedule: {plan['schedule']}")
    # §3.5: the prompt and the negative prompt encoded (classifier-free guidance g); one noise per seed,
    # sampled at the minimum resolution (ε_1 of its coupled pyramid); stage k = 1 … K integrates Eq. 1 by
    # Flow-Euler over its window with θ_k, steps[k−1] steps; at each jump x ← BridgeFlow(Up(x)) (§3.3).
    # --flat: the baseline, one window [1 → 0] with every block
    marks = [time.perf_counter()]
    stage_outputs = nami.generate(model, encoder, [prompt] * args.n, range(args.seed, args.seed + args.n),
                                  h // factor, w // factor, steps, plan["cfg"], plan["negative"], bridge=bridge,
                                  flat=args.flat, schedule=release.SCHEDULES[plan["schedule"]],
                                  on_stage_end=lambda k, x: (parallel.synchronize(device),
                                                             marks.append(time.perf_counter())))
    times = [b - t for t, b in zip(marks[:-1], marks[1:])]
    # the VAE decodes the last stage's latents (with --show-stages every stage's, side by side as in Fig. 3)
    t0 = time.perf_counter()
    decoded = [autoencoder.decode(x) for x in (stage_outputs if args.show_stages else stage_outputs[-1:])]
    picture = images.sample_picture(decoded, (w, h), plan["zoom"], 8 if args.show_stages else 4)
    label = "flat" if args.flat or plan["K"] == 1 else "stage"
    print("  ".join(f"{label} {i + 1}: {t:.3f}s" for i, t in enumerate(times)) + f"  total: {sum(times):.3f}s"
          f"  (decode {time.perf_counter() - t0:.3f}s)")
    # the PNG, its text chunks recording how it was made
    meta = images.png_info({"prompt": args.prompt, "prompt_suffix": plan["suffix"], "negative": plan["negative"],
                            "seed": args.seed, "n": args.n, "steps": steps, "cfg": plan["cfg"],
                            "schedule": plan["schedule"], "sampler": "flat" if args.flat else "nami",
                            "resolution": f"{w}x{h}", "checkpoint": info["folder"], "ema": not args.no_ema,
                            **({"lora": str(args.lora_folder), "lora_scale": args.lora_scale} if args.lora else {})})
    images.save_png(picture, plan["out"], meta)
    print(f"wrote {plan['out']}")


if __name__ == "__main__":
    main()
