"""Score a checkpoint with the judge of the built-in world (toyworld/judge.py): GenEval-style accuracy per
category, held-out colour-shape pairs and the Fréchet distance to real renders.

    python -m experiments.eval --ckpt runs/shapes-small                 # NAMI sampler, 50 prompts per category
    python -m experiments.eval --ckpt runs/shapes-small --flat          # the flat sampler of the same checkpoint
    python -m experiments.eval --ckpt CKPT --per-category 200 --out eval-out   # + eval-out/eval.json, samples.png
    python -m experiments.eval --calibrate 2000 --res 32,64             # the judge on real and broken renders
    python -m experiments.eval --ckpt CKPT --from-stage 3               # diagnostic: stage 3 from real renders
    python -m experiments.eval --calibrate 200 --res 64 --level 1 --vae weights/shapes-vae   # real renders through a VAE
    python -m experiments.eval --lora runs/lora-toy                     # a LoRA (train.py --lora) on the base it names
    python -m experiments.eval --ckpt CKPT --val-loss                   # the validation loss (Eq. 4 per stage and t')

The categories judged are those of the checkpoint's world level (train.py --world-level;
--level overrides); every accuracy comes with its standard error, and the table ends with the
block-artefact measures of judge.block_artefacts.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

import nami
from common import encoders, files, parallel
from toyworld import shapes
from toyworld.judge import SEED, calibrate, evaluate, sample_grid, table
from training import checkpoint, lora, sample_config, validation


def parse_sizes(text: str) -> list[int]:
    try:
        sizes = [int(v) for v in text.split(",")]
    except ValueError:
        raise ValueError(f"--res must be sizes in pixels separated by commas, e.g. 32,64, got {text!r}")
    if not all(4 <= v <= 1024 for v in sizes):
        raise ValueError(f"--res {text}: each size must be between 4 and 1024 pixels")
    return sizes


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ckpt", help="checkpoint folder, or a run folder (its newest checkpoint); default: newest under runs/")
    ap.add_argument("--flat", action="store_true", help="the flat baseline sampler of the same checkpoint (same total steps)")
    ap.add_argument("--per-category", type=int, default=50, help="prompts per category (and per held-out category)")
    ap.add_argument("--no-heldout", action="store_true", help="leave out the held-out colour-shape pairs")
    ap.add_argument("--steps", help="Euler steps per stage, e.g. 10,10,10 (default 30 in all: 10 per stage for 3 stages)")
    ap.add_argument("--cfg", type=float, default=nami.DEFAULT_GUIDANCE, help="classifier-free guidance scale (1 = off)")
    ap.add_argument("--seed", type=int, default=SEED, help="seed of the prompt set (noise seed of prompt j is j)")
    ap.add_argument("--batch-size", type=int, default=64, help="prompts sampled at once")
    ap.add_argument("--no-ema", action="store_true", help="the raw weights instead of the EMA")
    ap.add_argument("--from-stage", type=int, default=1, metavar="K",
                    help="diagnostic: start stage K from each prompt's real render, noised as in training "
                         "(only stages K.. are sampled), to see which stage loses the prompt")
    ap.add_argument("--out", help="folder for eval.json (every number, every prompt) and samples.png")
    ap.add_argument("--json", action="store_true", help="print the result as JSON instead of the table")
    ap.add_argument("--calibrate", type=int, metavar="N",
                    help="no model: judge N real renders per category, and broken ones, at each --res size")
    ap.add_argument("--res", default="32,64", help="image sizes for --calibrate (default 32,64)")
    ap.add_argument("--level", type=int, choices=sorted(shapes.LEVELS),
                    help="world level whose categories are judged (default: the checkpoint's; 3 for --calibrate)")
    ap.add_argument("--vae", help="--calibrate: judge the real renders after this AutoencoderKL's round trip")
    ap.add_argument("--lora", help="judge these LoRA adapters (train.py --lora) on their base (or on --ckpt, "
                    "which must be the same files)")
    ap.add_argument("--lora-scale", type=float, default=1.0, help="strength of the LoRA (0 = the base alone)")
    ap.add_argument("--val-loss", action="store_true", help="no sampling: the validation loss of the checkpoint's "
                    "EMA, as train.py logs it (training/validation.py), per stage and fixed t'")
    ap.add_argument("--val-data", help="--val-loss: held-out image folder or cache (default: the run's --val-data, "
                    "or the built-in world's held-out samples)")
    ap.add_argument("--val-samples", type=int, help="--val-loss: held-out samples (default: the run's, 64)")
    return ap.parse_args(argv)


def validation_report(a) -> dict:
    """--val-loss: the checkpoint's validation loss on the held-out samples its run was validated on."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model, bridge, encoder, autoencoder, info = checkpoint.load_model(a.ckpt, not a.no_ema, device=device)
    train = files.read_json(Path(info["folder"]) / "config.json")["train"]
    run = argparse.Namespace(**{**train, "val_data": a.val_data or train.get("val_data"),
                                "val_samples": a.val_samples or train.get("val_samples", 64)})
    held = validation.held_out(run, encoder, autoencoder, model.cfg.num_stages, device)
    if held is None:
        raise ValueError(f"{info['folder']} was trained on --data/--cache without --val-data: give --val-data DIR")
    guidance = train.get("distilled_guidance", 3.5) if model.cfg.guidance_embeds else None
    per_t = validation.validation_loss(model, bridge, held, start=train.get("start", "bridge"), guidance=guidance)
    weights = train.get("stage_weights") or [1.0] * model.cfg.num_stages
    return {"checkpoint": info["folder"], "samples": sum(len(g[0]) for g in held), "t": validation.t_points(),
            "per_t": {str(k): v for k, v in per_t.items()}, **validation.summary(per_t, weights)}


def print_validation(report: dict):
    print(f"{report['checkpoint']}: validation loss (Eq. 4, local units), {report['samples']} held-out samples, "
          f"EMA weights\n")
    print("stage | mean | " + " | ".join(f"t'={t:.4g}" for t in report["t"]))
    for k, losses in report["per_t"].items():
        print(f"{k} | {report['val_loss_stage' + k]:.6f} | " + " | ".join(f"{v:.6f}" for v in losses))
    print(f"\nweighted sum over the stages (val_loss): {report['val_loss']:.6f}")


def check_flags(a):
    """Every flag, before anything is loaded; makes --out. Returns (calibration sizes, steps, out)."""
    sizes = None
    if a.calibrate is not None:
        if a.calibrate < 1:
            raise ValueError(f"--calibrate needs N ≥ 1 renders per category, got {a.calibrate}")
        sizes = parse_sizes(a.res)
    if not 1 <= a.per_category <= 100_000:
        raise ValueError(f"--per-category must be between 1 and 100000, got {a.per_category}")
    if not 1 <= a.batch_size <= 4096:
        raise ValueError(f"--batch-size must be between 1 and 4096, got {a.batch_size}")
    sample_config.check_guidance(a.cfg)
    steps = sample_config.parse_steps(a.steps) if a.steps else None
    out = Path(a.out) if a.out else None
    if out is not None:
        if out.exists() and not out.is_dir():
            raise ValueError(f"--out {out} is a file: give a folder (eval.json and samples.png go in it)")
        out.mkdir(parents=True, exist_ok=True)
    return sizes, steps, out


def print_calibration(results):
    for r in results:
        print(f"real renders at {r['size']}², {r['n_real']} per category: pass rate")
        print("  " + "  ".join(f"{c} {v:.4f}" for c, v in r["real"].items()))
        print("broken renders: fail rate")
        print("  " + "  ".join(f"{k} {v:.4f} (n={r['n_broken'][k]})" for k, v in r["broken"].items()))
        if r["misses"]:
            print(f"  real renders failed: {r['misses'][:8]}{' ...' if len(r['misses']) > 8 else ''}")


def load(a, steps):
    """The checkpoint's model and parts, and the steps per stage, checked against it."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    parallel.use_tf32()
    folder = lora.find(a.lora) if a.lora else None
    record = lora.record(folder) if folder else None
    ckpt = checkpoint.find_checkpoint(a.ckpt or (record["base"]["path"] if record else None))
    model, bridge, encoder, autoencoder, info = checkpoint.load_model(ckpt, not a.no_ema, device=device)
    if folder:  # refused unless made for this base
        lora.check_base(record, folder, ckpt, model.cfg, "model" if a.no_ema else "ema")
        lora.apply(model, folder, record, a.lora_scale)
        info["folder"] = f"{folder} (LoRA, scale {a.lora_scale:g}) on {ckpt}"
    model.to(parallel.sampling_dtype(device))
    steps = steps or info["steps"]
    if len(steps) != model.cfg.num_stages:
        raise ValueError(f"--steps needs {model.cfg.num_stages} counts (one per stage), got {a.steps}")
    if a.from_stage != 1 and (a.flat or not 1 <= a.from_stage <= model.cfg.num_stages):
        raise ValueError(f"--from-stage must be between 1 and {model.cfg.num_stages} (the checkpoint's stages), "
                         f"without --flat; got {a.from_stage}")
    return (model, bridge, encoder, autoencoder), info, steps, info["world_level"] if a.level is None else a.level


def print_result(result: dict, folder):
    s = result["settings"]
    print(f"{folder}: {s['sampler']} sampler, steps {s['steps']}, cfg {s['guidance']:g}, "
          f"{s['resolution'][0]}x{s['resolution'][1]}, world level {s['level']}, prompt seed {s['seed']}; "
          f"sampled in {result['seconds']:.1f}s\n")
    if s["from_stage"] > 1:
        skipped = "stage 1" if s["from_stage"] == 2 else f"stages 1-{s['from_stage'] - 1}"
        print(f"diagnostic: {skipped} not sampled; stage {s['from_stage']} starts from each prompt's real "
              "render, noised as in training\n")
    if min(s["resolution"]) < 24:
        print(f"note: the judge is calibrated at 24² and above; at {min(s['resolution'])} px small objects "
              "merge or vanish even in real renders, so these numbers understate the model\n")
    print(table(result))


def main(argv=None):
    a = parse_args(argv)
    try:
        sizes, steps, out = check_flags(a)
    except (ValueError, OSError) as e:
        raise SystemExit(f"error: {e}")
    if a.calibrate is not None:
        autoencoder = encoders.load_autoencoder(a.vae) if a.vae else None
        level = 3 if a.level is None else a.level
        results = [calibrate(a.calibrate, size, a.seed, level=level, autoencoder=autoencoder) for size in sizes]
        if a.json:
            print(json.dumps(results, indent=1))
        else:
            print_calibration(results)
        if out is not None:
            (out / "calibration.json").write_text(json.dumps(results, indent=1))
        return results
    if a.val_loss:
        try:
            report = validation_report(a)
        except (ValueError, FileNotFoundError, ImportError) as e:
            raise SystemExit(f"error: {e}")
        print(json.dumps(report, indent=1)) if a.json else print_validation(report)
        if out is not None:
            (out / "validation.json").write_text(json.dumps(report, indent=1))
        return report
    try:
        parts, info, steps, level = load(a, steps)
    except (ValueError, FileNotFoundError, ImportError) as e:
        raise SystemExit(f"error: {e}")
    result = evaluate(*parts, info["resolution"], a.per_category, steps, a.cfg, a.seed, a.flat, not a.no_heldout,
                      a.batch_size, return_images=True, from_stage=a.from_stage, level=level)
    images = result.pop("images")
    result["checkpoint"] = info["folder"]
    if a.json:
        print(json.dumps({k: v for k, v in result.items() if k != "samples"}, indent=1))
    else:
        print_result(result, info["folder"])
    if out is not None:
        (out / "eval.json").write_text(json.dumps(result, indent=1))
        sample_grid(images, result["samples"]).save(out / "samples.png")
        if not a.json:
            print(f"wrote {out / 'eval.json'} and {out / 'samples.png'}")
    return result


if __name__ == "__main__":
    main()
