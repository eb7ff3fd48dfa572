"""The paper's ablations (Fig. 6, 7, 8) at small scale on the built-in data, and ours.

    python -m experiments.ablate --figure 6      # flat vs "flow only" vs NAMI, at 24² and 32² (paper: 256², 512²)
    python -m experiments.ablate --figure 7      # layer ratios across the three stages, total depth fixed
    python -m experiments.ablate --figure 8      # time-window ratios across the three stages
    python -m experiments.ablate --figure 7 --steps 300 --eval-every 100     # a quicker, smaller budget

Every variant of a figure trains with the same budget (steps × batch) into
runs/ablate/fig<N>/<variant>/ and keeps a checkpoint every --eval-every steps; each checkpoint
is scored once with experiments/eval.py's judge (GenEval-style accuracy) and Fréchet distance, and the scores
are cached in scores.json beside it. Interrupted? Run the same command again: training resumes
(train.py's --resume) and scored checkpoints are not scored again. At the end the figure's curves
go to results/fig<N>.png and a markdown table to results/fig<N>.md.

    python -m experiments.ablate --gpu           # Fig. 6 decided on one CUDA device in about 8 minutes
    python -m experiments.ablate --gpu --tiny    # the same steps at toy sizes (runs on a CPU; the tests do)
    python -m experiments.ablate --cpu-minutes 8 # Fig. 6 at equal training time: 8 minutes each on this machine
    python -m experiments.ablate --reference     # a conditional UNet of the field on the default run's data, judged

--gpu trains flat, flow only and NAMI on the full built-in world at 32² with one budget of steps
(bf16, large batches), picked from the throughput it measures at start-up so that the whole
command fits in --minutes; judges each on ≥ 100 prompts per category with standard errors, and
writes results/fig6-gpu.md and .png saying for each of the paper's claims whether it holds,
fails, or stays within noise.
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import re
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from common import encoders, images, parallel
from toyworld import judge, shapes
from training import checkpoint

# Layers per stage = blocks added by that stage: stage 1 runs the 2 double blocks and c_1 single
# blocks, stage k adds c_k − c_(k−1) (small preset: 2 double + 6 single = 8 in all).
FIGURES = {
    6: ("Components: flat baseline, the stages with the full model (flow only), NAMI (paper Fig. 6)", {
        "flat 32²": dict(mode="flat", resolution=32), "flow only 32²": dict(mode="flow-only", resolution=32),
        "NAMI 32²": dict(resolution=32),
        # The smaller of the two sizes, not 64²: the judge is exact from 24² up, and a flat model at
        # 64² needs, by its FLOP count, ~7× the time per step of one at 32² (over two hours for 600 steps).
        "flat 24²": dict(mode="flat", resolution=24), "flow only 24²": dict(mode="flow-only", resolution=24),
        "NAMI 24²": dict(resolution=24)}),
    7: ("Layers per stage (stage 1 : 2 : 3), 8 layers in all (paper Fig. 7)", {
        "3:2:3": dict(cuts=(1, 3, 6)), "4:2:2": dict(cuts=(2, 4, 6)), "5:2:1": dict(cuts=(3, 5, 6)),
        "3:1:4": dict(cuts=(1, 2, 6))}),
    8: ("Time-window ratios (stage 1 : 2 : 3) (paper Fig. 8)", {
        "1:1:1": dict(window_ratios=(1, 1, 1)), "2:1:1": dict(window_ratios=(2, 1, 1)),
        "1:2:1": dict(window_ratios=(1, 2, 1)), "1:1:2": dict(window_ratios=(1, 1, 2))}),
}
NOTES = "## What it shows"  # a section written by hand below the generated tables: kept on re-runs
DEFAULT_STEPS = {6: 600, 7: 900, 8: 900}  # sized for about an hour per figure on 2 CPU cores
# Every ablation's setting: the full built-in world in pixel space, the paper's method (no jump noise)
SETTING = ["--resolution", "32", "--vae", "none", "--world-level", "3", "--no-jump-noise"]


def slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower().replace("²", "")).strip("-")


def train_flags(overrides: dict) -> list[str]:
    """A variant's TrainConfig overrides as train.py flags: cuts=(1, 3, 6) -> --cuts 1,3,6."""
    flags = []
    for name, value in overrides.items():
        text = ",".join(str(v) for v in value) if isinstance(value, tuple) else str(value)
        flags += ["--" + name.replace("_", "-"), text]
    return flags


def train_variant(out: Path, overrides: dict, a, setting=SETTING) -> float:
    """Train (or resume) one variant up to the budget with `python train.py`, keeping every
    checkpoint for scoring. Returns the training minutes of the run so far (kept in
    train_minutes.txt across resumes)."""
    minutes_file = out / "train_minutes.txt"
    before = float(minutes_file.read_text()) if minutes_file.is_file() else None
    done = checkpoint.latest_checkpoint(out)
    if done is not None and int(done.name.split("-")[1]) >= a.steps:
        return float("nan") if before is None else before  # nan: trained before minutes were kept
    if done is not None:  # a resumed run keeps the weights it started from (--init-from is for new runs)
        overrides = {k: v for k, v in overrides.items() if k != "init_from"}
    command = [sys.executable, str(Path(__file__).parents[1] / "train.py"), "--size", a.size, "--max-steps", str(a.steps),
               "--ckpt-every", str(a.eval_every), "--keep", "1000", "--sample-every", str(a.steps), "--out", str(out),
               "--seed", str(a.seed), *(["--resume"] if done is not None else []),
               *(["--no-progress"] if a.quiet else []), *setting, *a.train_flags.split(), *train_flags(overrides)]
    t = time.perf_counter()
    subprocess.run(command, check=True)
    minutes = (before or 0.0) + (time.perf_counter() - t) / 60
    minutes_file.write_text(f"{minutes:.2f}\n")
    return minutes


def score(ckpt: Path, per_category: int, seed: int, heldout: bool = True) -> dict:
    """The judge's result for one checkpoint, sampled on the best device (bf16 weights on CUDA)."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model, bridge, encoder, autoencoder, info = checkpoint.load_model(ckpt, device=device)
    model.to(parallel.sampling_dtype(device))
    result = judge.evaluate(model, bridge, encoder, autoencoder, info["resolution"], per_category=per_category,
                            seed=seed, heldout=heldout, batch_size=256 if device.type == "cuda" else 64,
                            level=info["world_level"])
    result.pop("samples", None)  # per-prompt records: not needed for the curves
    return {**result, "world_level": info["world_level"]}


def score_checkpoints(out: Path, a) -> list[dict]:
    """Judge accuracy and Fréchet distance of every checkpoint of a run (cached per checkpoint)."""
    scores = []
    for ckpt in checkpoint.complete_checkpoints(out):
        cache = ckpt / "scores.json"
        if not cache.is_file():
            result = score(ckpt, a.per_category, a.eval_seed)
            cache.write_text(json.dumps(result, indent=1))
        result = json.loads(cache.read_text())
        scores.append({"step": int(ckpt.name.split("-")[1]), **result})
    return scores


def plot(figure: int, title: str, runs: dict, path: Path):
    plt = images.pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    # One colour per method and one line style per size ("flat 32²" and "flat 24²": same colour).
    split = {name: name.rpartition(" ")[::2] if name.endswith("²") else (name, "") for name in runs}
    methods = list(dict.fromkeys(m for m, _ in split.values()))
    sizes = list(dict.fromkeys(s for _, s in split.values()))
    for name, scores in runs.items():
        method, size = split[name]
        style = dict(marker="o", label=name, color=f"C{methods.index(method)}",
                     linestyle=["-", "--", ":"][sizes.index(size) % 3])
        steps = [s["step"] for s in scores]
        axes[0].plot(steps, [s["overall"] for s in scores], **style)
        axes[1].plot(steps, [s["fd"] for s in scores], **style)
    axes[0].set(xlabel="training step", ylabel="judge accuracy (overall, higher is better)")
    axes[1].set(xlabel="training step", ylabel="Fréchet distance (lower is better)")
    for ax in axes:
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    images.save_figure(fig, path, title)


def table(figure: int, title: str, runs: dict, a, minutes: dict) -> str:
    categories = [c for c in next(iter(runs.values()))[-1]["categories"]]
    lines = [f"# Fig. {figure} at small scale — {title}", "",
             f"`python -m experiments.ablate {a.command}` (preset {a.size}, batch 32, judge on {a.per_category} prompts per "
             f"category, seed {a.eval_seed}).",
             "Scores of the last checkpoint of each run; the curves are in "
             f"[fig{figure}.png](fig{figure}.png).", "",
             "| variant | " + " | ".join(c.replace("_", " ") for c in categories) +
             " | overall | held-out | Fréchet distance | train min |",
             "|---" * (len(categories) + 5) + "|"]
    for name, scores in runs.items():
        last = scores[-1]
        held = last["heldout"]["accuracy"] if last.get("heldout") else float("nan")
        lines.append(f"| {name} | " + " | ".join(f"{last['categories'][c]['accuracy']:.2f}" for c in categories) +
                     f" | {last['overall']:.3f} | {held:.2f} | {last['fd']:.2f} | {minutes.get(name, float('nan')):.1f} |")
    lines += ["", "| variant | " + " | ".join(f"step {s['step']}" for s in next(iter(runs.values()))) + " |",
              "|---" * (len(next(iter(runs.values()))) + 1) + "|"]
    for name, scores in runs.items():
        lines.append(f"| {name} | " + " | ".join(f"{s['overall']:.3f} / {s['fd']:.1f}" for s in scores) + " |")
    lines.append("\n(cells: overall judge accuracy / Fréchet distance)")
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------------------------
# --conversion: can a flat model become NAMI by training Algorithm 1 from its weights?
# ----------------------------------------------------------------------------------------------

# ----------------------------------------------------------------------------------------------
# --gpu: Fig. 6 decided where the compute is, in one command
# ----------------------------------------------------------------------------------------------

GPU_VARIANTS = {"flat": dict(mode="flat"), "flow only": dict(mode="flow-only"), "NAMI": {}}
PROBE_STEPS = 30          # steps of each variant timed at start-up (3 when --tiny)
EVALUATION_SHARE = 0.25   # of --minutes kept for judging the three runs
TIME_PROBE_STEPS = 60     # --cpu-minutes: steps of each variant timed first (all three phases of the stage mix)


def text_encoder_flags(root: Path) -> tuple[list[str], str]:
    """The default text encoder (all-MiniLM-L6-v2) where it is installed, else a tiny random one over
    the built-in world's words written by encoders.write_tiny_encoder (a lent GPU machine may lack
    the package: nothing is downloaded); and its name for the report."""
    try:
        encoders.default_text_encoder_path()
        return [], "all-MiniLM-L6-v2"
    except (ImportError, FileNotFoundError, ValueError):
        folder = encoders.write_tiny_encoder(root / "text-encoder", sorted(shapes.caption_words()))
        return ["--text-encoder", folder, "--text-len", "16"], "a tiny random encoder (all-MiniLM-L6-v2 not installed)"


def gpu_flags(a) -> list[str]:
    """train.py's flags of every --gpu run: the full built-in world at 32² (16² when --tiny),
    large batches, bf16 and compiled blocks on CUDA."""
    cuda = torch.cuda.is_available()
    return [*SETTING, "--size", "tiny" if a.tiny else a.size, "--resolution", "16" if a.tiny else "32",
            "--batch-size", str(a.batch), "--lr", str(a.lr), "--warmup", "20", "--seed", str(a.seed),
            "--sample-every", str(10 ** 9), "--log-every", "1" if a.tiny else "5", "--no-progress",
            *(["--bf16", "--compile"] if cuda else [])]


def run_train(out: Path, flags: list[str], steps: int):
    command = [sys.executable, str(Path(__file__).parents[1] / "train.py"), *flags, "--max-steps", str(steps),
               "--ckpt-every", str(steps), "--out", str(out)]
    r = subprocess.run(command, capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"{' '.join(command[1:])} failed: {r.stderr[-2000:]}")


def seconds_per_step(out: Path, flags: list[str], steps: int, mean: bool = False) -> float:
    """Train a throw-away run of `steps` steps; its median step time from log.jsonl (the first
    lines, with compilation and warm-up, left out). mean=True: the mean over the run's steps, which
    go through every phase of the stage mix (their costs differ)."""
    shutil.rmtree(out, ignore_errors=True)
    run_train(out, flags, steps)
    records = checkpoint.read_log(out)
    rates = [r["images_per_s"] for r in records[1:]] or [r["images_per_s"] for r in records]
    shutil.rmtree(out, ignore_errors=True)
    batch = int(flags[flags.index("--batch-size") + 1]) if "--batch-size" in flags else 32
    return statistics.mean(batch / r for r in rates) if mean else batch / statistics.median(rates)


def overall_with_error(result: dict) -> tuple[float, float]:
    """GenEval's overall score and its standard error, as the judge computed them."""
    return result["overall"], result["overall_se"]


def verdict(better: str, worse: str, scores: dict, claim: str) -> str:
    """'holds' when `better` beats `worse` by more than two standard errors of the difference,
    'fails' when it loses by as much, else 'within noise'."""
    (b, se_b), (w, se_w) = scores[better], scores[worse]
    margin = 2 * math.sqrt(se_b ** 2 + se_w ** 2)
    outcome = "holds" if b - w > margin else "fails" if w - b > margin else "within noise"
    return f"- {claim}: **{outcome}** ({better} {b:.3f} ± {se_b:.3f} against {worse} {w:.3f} ± {se_w:.3f})"


def gpu_report(a, steps: int, step_times: dict, results: dict, seconds: float) -> str:
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"cpu ({torch.get_num_threads()} threads)"
    scores = {name: overall_with_error(r) for name, r in results.items()}
    cats = list(next(iter(results.values()))["categories"])
    lines = [f"# Fig. 6 on one device: flat, flow only, NAMI with one budget of {steps} steps × {a.batch}", "",
             f"`python -m experiments.ablate {a.command}` — {device}, torch {torch.__version__}, {datetime.date.today()}, "
             f"{seconds / 60:.1f} min in all; preset {'tiny' if a.tiny else a.size}, full built-in world, judge on "
             f"{a.per_category} prompts per category (seed {a.eval_seed}), 10+10+10 steps (flat: 30), CFG 3; text "
             f"encoder: {a.encoder_name}.", "",
             "| variant | " + " | ".join(c.replace("_", " ") for c in cats) +
             " | overall ± SE | held-out | Fréchet distance | s/step (training) | s (sampling all prompts) |",
             "|---" * (len(cats) + 6) + "|"]
    for name, r in results.items():
        held = r["heldout"]["accuracy"] if r.get("heldout") else float("nan")
        lines.append(f"| {name} | " + " | ".join(f"{r['categories'][c]['accuracy']:.2f}" for c in cats) +
                     f" | {scores[name][0]:.3f} ± {scores[name][1]:.3f} | {held:.2f} | {r['fd']:.3f} | "
                     f"{step_times[name]:.3f} | {r['seconds']:.1f} |")
    lines += ["", "## The paper's claims (§4.4, Fig. 6)", "",
              verdict("NAMI", "flat", scores, "NAMI trains to better quality than the flat model in the same budget"),
              verdict("flow only", "flat", scores, "the piecewise flow alone beats the flat model"),
              f"- the partition (NAMI against flow only) costs little quality: **"
              f"{'holds' if abs(scores['NAMI'][0] - scores['flow only'][0]) <= 2 * math.hypot(scores['NAMI'][1], scores['flow only'][1]) else 'fails'}** "
              f"(NAMI {scores['NAMI'][0]:.3f}, flow only {scores['flow only'][0]:.3f}), and samples faster: **"
              f"{'holds' if results['NAMI']['seconds'] < results['flow only']['seconds'] else 'fails'}** "
              f"({results['flow only']['seconds'] / results['NAMI']['seconds']:.2f}×)",
              f"- NAMI trains faster per step than flat: {step_times['flat'] / step_times['NAMI']:.2f}× "
              f"(flow only {step_times['flat'] / step_times['flow only']:.2f}×)", "",
              "Fréchet distance: lower is better; it has no error bar here (one set of prompts)."]
    return "\n".join(lines) + "\n"


def gpu_plot(results: dict, path: Path, title: str):
    plt = images.pyplot()
    names = list(results)
    scores = [overall_with_error(results[n]) for n in names]
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.6))
    axes[0].bar(names, [s for s, _ in scores], yerr=[2 * e for _, e in scores], color=["C0", "C1", "C2"], capsize=4)
    axes[0].set(ylabel="judge overall (± 2 SE)", ylim=(0, 1))
    axes[1].bar(names, [results[n]["fd"] for n in names], color=["C0", "C1", "C2"])
    axes[1].set(ylabel="Fréchet distance (lower is better)")
    images.save_figure(fig, path, title, fontsize=9)


def gpu_ablation(a):
    """Fig. 6 in one command: time each variant, pick one budget of steps that fits, train, judge."""
    if not torch.cuda.is_available() and not a.tiny:
        raise SystemExit("error: --gpu needs a CUDA device (--tiny runs the same steps at toy sizes on a CPU)")
    t0, root, flags = time.perf_counter(), Path(a.out) / "fig6-gpu", gpu_flags(a)
    encoder_flags, a.encoder_name = text_encoder_flags(root)
    flags += encoder_flags
    probe = 3 if a.tiny else PROBE_STEPS
    step_times = {name: seconds_per_step(root / f"probe-{slug(name)}", flags + train_flags(overrides), probe)
                  for name, overrides in GPU_VARIANTS.items()}
    left = a.minutes * 60 * (1 - EVALUATION_SHARE) - (time.perf_counter() - t0)
    steps = max(probe, int(left / (sum(step_times.values()) * 1.1)))  # 10 % for start-ups and checkpoints
    print(f"seconds per step {step_times}: {steps} steps of {a.batch} for every variant", flush=True)
    results = {}
    for name, overrides in GPU_VARIANTS.items():
        out = root / slug(name)
        shutil.rmtree(out, ignore_errors=True)
        run_train(out, flags + train_flags(overrides), steps)
        results[name] = score(checkpoint.latest_checkpoint(out), a.per_category, a.eval_seed)
        print(f"{name}: overall {results[name]['overall']:.3f}, FD {results[name]['fd']:.3f}", flush=True)
    results_dir = Path(a.results)
    results_dir.mkdir(parents=True, exist_ok=True)
    report = gpu_report(a, steps, step_times, results, time.perf_counter() - t0)
    (results_dir / "fig6-gpu.md").write_text(report)
    gpu_plot(results, results_dir / "fig6-gpu.png", report.splitlines()[0].lstrip("# "))
    print(report)
    return results


def time_flags(a) -> list[str]:
    """train.py's flags of every --cpu-minutes run: the default run's setting (toy, 64² in the shapes
    VAE's latents, its world level, jump noise for the staged variants), as `python train.py` trains it;
    --train-flags "--world-level 1" for another level."""
    tiny = ["--size", "tiny", "--resolution", "32", "--bridge-steps", "5", "--batch-size", "8"] if a.tiny else []
    return ["--seed", str(a.seed), "--sample-every", str(10 ** 9), "--log-every", "1" if a.tiny else "5",
            "--no-progress", *tiny, *a.train_flags.split()]


def time_ablation(a):
    """Fig. 6 at equal training time: each variant trains for --cpu-minutes of wall clock on this
    machine (its steps = the minutes / its seconds per step, measured first by a short run of each,
    BridgeFlow pre-training and start-up included), then all are judged on the run's world level."""
    t0, root, flags = time.perf_counter(), Path(a.out) / "fig6-time", time_flags(a)
    probe = 3 if a.tiny else TIME_PROBE_STEPS
    step_times, overheads = {}, {}
    for name, overrides in GPU_VARIANTS.items():
        begin = time.perf_counter()
        step_times[name] = seconds_per_step(root / f"probe-{slug(name)}", flags + train_flags(overrides), probe, True)
        overheads[name] = max(0.0, time.perf_counter() - begin - probe * step_times[name])
    steps = {name: max(probe, int((a.cpu_minutes * 60 - overheads[name]) / step_times[name])) for name in step_times}
    print(f"seconds per step {step_times}, start-up {overheads}: steps {steps}", flush=True)
    results, minutes = {}, {}
    for name, overrides in GPU_VARIANTS.items():
        out = root / slug(name)
        shutil.rmtree(out, ignore_errors=True)
        begin = time.perf_counter()
        run_train(out, flags + train_flags(overrides), steps[name])
        minutes[name] = (time.perf_counter() - begin) / 60
        results[name] = score(checkpoint.latest_checkpoint(out), a.per_category, a.eval_seed)
        print(f"{name}: {steps[name]} steps in {minutes[name]:.1f} min, overall {results[name]['overall']:.3f}",
              flush=True)
    report = time_report(a, steps, step_times, minutes, results, time.perf_counter() - t0)
    results_dir = Path(a.results)
    results_dir.mkdir(parents=True, exist_ok=True)
    name = f"fig6-cpu-time-{a.cpu_minutes:g}min-level{next(iter(results.values()))['world_level']}"
    (results_dir / f"{name}.md").write_text(report)
    gpu_plot(results, results_dir / f"{name}.png", report.splitlines()[0].lstrip("# "))
    print(report)
    return results


def time_report(a, steps: dict, step_times: dict, minutes: dict, results: dict, seconds: float) -> str:
    scores = {name: overall_with_error(r) for name, r in results.items()}
    cats = list(next(iter(results.values()))["categories"])
    level = next(iter(results.values())).get("world_level", 1)
    lines = [f"# Fig. 6 at equal training time: flat, flow only, NAMI, {a.cpu_minutes:g} minutes each",
             "", f"`python -m experiments.ablate {a.command}` — cpu ({torch.get_num_threads()} threads), torch {torch.__version__}, "
             f"{datetime.date.today()}, {seconds / 60:.1f} min in all; the default run's setting (toy, 64² in the "
             f"shapes VAE's latents, world level {level}, batch 32), judged on {a.per_category} prompts per category "
             f"(seed {a.eval_seed}), 10+10+10 steps (flat: 30), CFG 3.", "",
             "| variant | steps | s/step | training min (measured) | " + " | ".join(c.replace("_", " ") for c in cats) +
             " | overall ± SE | by shape: circle / square / triangle | Fréchet distance | s (sampling all prompts) |",
             "|---" * (len(cats) + 8) + "|"]
    for name, r in results.items():
        shapes_row = " / ".join(f"{r['by_shape'][s]['accuracy']:.2f}" if s in r.get("by_shape", {}) else "–"
                                for s in ("circle", "square", "triangle"))
        lines.append(f"| {name} | {steps[name]} | {step_times[name]:.3f} | {minutes[name]:.1f} | " +
                     " | ".join(f"{r['categories'][c]['accuracy']:.2f}" for c in cats) +
                     f" | {scores[name][0]:.3f} ± {scores[name][1]:.3f} | {shapes_row} | {r['fd']:.3f} | "
                     f"{r['seconds']:.1f} |")
    lines += ["", "## The paper's claim (§1, §4.4, Fig. 6): NAMI converges faster", "",
              verdict("NAMI", "flat", scores, f"NAMI against the flat model after {a.cpu_minutes:g} minutes of training"),
              verdict("flow only", "flat", scores, "the piecewise flow alone against the flat model"),
              verdict("NAMI", "flow only", scores, "the truncated stages against the full model at every stage"),
              f"- steps in the same minutes: NAMI {steps['NAMI']}, flow only {steps['flow only']}, flat {steps['flat']} "
              f"({steps['NAMI'] / steps['flat']:.2f}× the flat model's)", "",
              "holds / fails: a difference of more than two standard errors of the difference; Fréchet distance: "
              "lower is better, no error bar (one set of prompts)."]
    return "\n".join(lines) + "\n"


def reference_unet(text_dim: int, channels: int, width: int):
    """A text-to-image UNet as the field trains them (Stable Diffusion's layout, diffusers'
    UNet2DConditionModel): convolutional down and up blocks, cross-attention to the text states in
    the two lower ones."""
    from diffusers import UNet2DConditionModel
    return UNet2DConditionModel(
        sample_size=16, in_channels=channels, out_channels=channels, layers_per_block=1,
        block_out_channels=(width, 2 * width, 2 * width), norm_num_groups=min(32, width),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=text_dim, attention_head_dim=8)


def reference_run(a):
    """A recipe of our field beside NAMI: a conditional UNet trained with the flat rectified flow on
    exactly the default run's data (feed.Batches: the same latents, captions, noise, t' and caption
    dropout, sample by sample), with its optimizer, learning-rate schedule, clipping and EMA, for the
    same number of images; sampled with 30 Euler steps and CFG 3, judged as experiments/eval.py judges NAMI."""
    import copy
    from training import config
    from datafeed import feed
    import nami
    cfg = config.TrainConfig(max_steps=a.steps or 1200, progress=False, **(dict(resolution=32, batch_size=8)
                                                                            if a.tiny else {}))
    torch.manual_seed(cfg.seed)
    autoencoder = encoders.load_autoencoder(cfg.vae)
    encoder = encoders.TextEncoder(cfg.text_encoder, cfg.text_len)
    unet = reference_unet(encoder.dim, autoencoder.channels, 8 if a.tiny else a.unet_width)
    ema = copy.deepcopy(unet).requires_grad_(False)
    optimizer = torch.optim.AdamW(unet.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, fused=True)
    schedule = config.stage_mix_schedule(cfg, 3)  # for the lr's last phase, as the default run's
    batches = feed.Batches(cfg, encoder, autoencoder, 1, torch.device("cpu"))
    t0, log = time.perf_counter(), []
    for step in range(cfg.max_steps):
        for group in optimizer.param_groups:
            group["lr"] = config.learning_rate(cfg, step, schedule)
        batch = batches.next_step()[0]
        # each sample's draws as train.draws makes them (scripts import no other script): caption dropout, ε, t'
        generators = [feed.sample_generator(cfg.seed, p) for p in batch.positions]
        dropped = torch.tensor([bool(torch.rand((), generator=g) < cfg.caption_dropout) for g in generators])
        eps = torch.stack([torch.randn(batch.x.shape[1:], generator=g) for g in generators])
        t = torch.cat([nami.logit_normal(1, g) for g in generators])
        txt = torch.where(dropped[:, None, None], batches.uncond[0], batch.txt)
        x_t = t[:, None, None, None] * eps + (1 - t[:, None, None, None]) * batch.x  # Eq. 1, the whole flow in one window
        v = unet(x_t, t * 1000, encoder_hidden_states=txt).sample
        loss = nami.flow_loss(v, eps - batch.x)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), cfg.grad_clip)
        optimizer.step()
        decay = min(cfg.ema_decay, (1 + step) / (10 + step))
        torch._foreach_lerp_(list(ema.parameters()), list(unet.parameters()), 1 - decay)
        log.append(loss.item())
        if not a.quiet and step % 100 == 0:
            print(f"step {step}: loss {loss.item():.4f}", flush=True)
    minutes = (time.perf_counter() - t0) / 60
    items = judge.prompt_set(a.per_category, a.eval_seed, True, cfg.world_level)
    captions = [sample.caption for _, sample in items]
    side = cfg.resolution // autoencoder.factor
    with torch.no_grad():
        txt, _ = encoder.encode(captions)
        uncond = encoder.encode([""])[0].expand_as(txt)
        x = torch.stack([torch.randn(autoencoder.channels, side, side, generator=torch.Generator().manual_seed(j))
                         for j in range(len(items))])
        grid = torch.linspace(1, 0, 31).tolist()
        for t_now, t_next in zip(grid[:-1], grid[1:]):
            tau = torch.full((len(items),), t_now * 1000)
            v_c, v_u = ema(torch.cat([x, x]), torch.cat([tau, tau]),
                           encoder_hidden_states=torch.cat([txt, uncond])).sample.chunk(2)
            x = nami.euler_step(x, v_u + nami.DEFAULT_GUIDANCE * (v_c - v_u), t_now, t_next)
        pictures = autoencoder.decode(x)
    result = judge.score(pictures, items, cfg.world_level, judge.real_renders(items, cfg.resolution, cfg.resolution))
    result.pop("samples", None)
    params = sum(p.numel() for p in unet.parameters())
    report = {"command": f"python -m experiments.ablate {a.command}", "torch": torch.__version__, "date": str(datetime.date.today()),
              "parameters": params, "images": cfg.max_steps * cfg.batch_size, "train_minutes": round(minutes, 2),
              "losses_every_100": log[::100], **result}
    out = Path(a.results) / "reference-unet.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1, default=float))
    print(judge.table(result))
    print(f"UNet2DConditionModel, {params / 1e6:.2f}M parameters, {cfg.max_steps} steps × {cfg.batch_size} in "
          f"{minutes:.1f} min -> {out}")
    return report


def main(argv=None):
    try:  # the plots come last: say now, not after hours of training, that matplotlib is missing
        images.pyplot()
    except ImportError as e:
        raise SystemExit(f"error: {e}")
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--figure", type=int, choices=sorted(FIGURES))
    ap.add_argument("--gpu", action="store_true", help="Fig. 6 on one CUDA device within --minutes (see above)")
    ap.add_argument("--tiny", action="store_true", help="--gpu at toy sizes (runs on a CPU)")
    ap.add_argument("--reference", action="store_true", help="a conditional UNet of the field (diffusers), trained "
                    "on the default run's data for --steps (default 1200) and judged (see reference_run)")
    ap.add_argument("--unet-width", type=int, default=32, help="--reference: channels of the UNet's first level")
    ap.add_argument("--cpu-minutes", type=float, help="Fig. 6 at equal training time on this machine: flat, flow "
                    "only and NAMI on the default run's setting, this many minutes each (see time_ablation)")
    ap.add_argument("--minutes", type=float, default=8.0, help="--gpu: the whole command's time budget")
    ap.add_argument("--batch", type=int, default=256, help="--gpu: batch size of every variant")
    ap.add_argument("--lr", type=float, default=1e-3, help="--gpu: peak learning rate")
    ap.add_argument("--steps", type=int, help="training steps per variant (default: about an hour per figure)")
    ap.add_argument("--eval-every", type=int, help="steps between scored checkpoints (default: steps / 3)")
    ap.add_argument("--size", help="model preset (default: small)")
    ap.add_argument("--per-category", type=int, default=30, help="judge prompts per category")
    ap.add_argument("--seed", type=int, default=0, help="training seed")
    ap.add_argument("--eval-seed", type=int, default=2026, help="seed of the judge's prompt set")
    ap.add_argument("--out", default="runs/ablate", help="where the runs go")
    ap.add_argument("--results", default="results", help="where the plot and the table go")
    ap.add_argument("--only", help="comma-separated variant names to run (default: all)")
    ap.add_argument("--quiet", action="store_true", help="no progress bars")
    ap.add_argument("--train-flags", default="", help="more train.py flags for every run, e.g. '--bridge-steps 100'")
    a = ap.parse_args(argv)
    a.size = a.size or "small"
    a.command = " ".join(f"'{v}'" if " " in v else v for v in (argv if argv is not None else sys.argv[1:]))
    if a.gpu:
        a.per_category = max(a.per_category, 100) if not a.tiny else a.per_category
        return gpu_ablation(a)
    if a.reference:
        a.per_category = a.per_category if a.tiny else max(a.per_category, 50)
        return reference_run(a)
    if a.cpu_minutes:
        a.per_category = a.per_category if a.tiny else max(a.per_category, 50)
        return time_ablation(a)
    if a.figure is None:
        raise SystemExit("error: give --figure 6, 7 or 8, --gpu, --cpu-minutes or --reference (a flat model converted: "
                         "python -m experiments.conversion)")
    a.steps = a.steps or DEFAULT_STEPS[a.figure]
    a.eval_every = a.eval_every or max(1, a.steps // 3)
    if a.steps <= 0 or a.eval_every <= 0 or a.per_category <= 0:
        raise SystemExit("error: --steps, --eval-every and --per-category must be positive")
    title, variants = FIGURES[a.figure]
    if a.only:
        wanted = [v.strip() for v in a.only.split(",")]
        unknown = [v for v in wanted if v not in variants]
        if unknown:
            raise SystemExit(f"error: unknown variant(s) {unknown}; figure {a.figure} has {list(variants)}")
        variants = {k: v for k, v in variants.items() if k in wanted}
    runs, minutes = {}, {}
    for name, overrides in variants.items():
        out = Path(a.out) / f"fig{a.figure}" / slug(name)
        minutes[name] = train_variant(out, overrides, a)
        runs[name] = score_checkpoints(out, a)
        print(f"{name}: " + ", ".join(f"step {s['step']}: {s['overall']:.3f} / FD {s['fd']:.1f}" for s in runs[name]))
    results = Path(a.results)
    plot(a.figure, title, runs, results / f"fig{a.figure}.png")
    md = results / f"fig{a.figure}.md"
    old = md.read_text() if md.is_file() else ""
    notes = old[old.index(NOTES):] if NOTES in old else ""  # the reader's commentary survives a re-run
    md.write_text(table(a.figure, title, runs, a, minutes) + ("\n" + notes if notes else ""))
    print(f"wrote {results / f'fig{a.figure}.png'} and {results / f'fig{a.figure}.md'}")


if __name__ == "__main__":
    main()
