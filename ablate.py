"""The paper's ablations (Fig. 6, 7, 8) at small scale on the built-in data.

    python ablate.py --figure 6      # flat vs "flow only" vs NAMI, at 24² and 32² (paper: 256², 512²)
    python ablate.py --figure 7      # layer ratios across the three stages, total depth fixed
    python ablate.py --figure 8      # time-window ratios across the three stages
    python ablate.py --figure 7 --steps 300 --eval-every 100     # a quicker, smaller budget

Every variant of a figure trains with the same budget (steps × batch) into
runs/ablate/fig<N>/<variant>/ and keeps a checkpoint every --eval-every steps; each checkpoint
is scored once with eval.py's judge (GenEval-style accuracy) and Fréchet distance, and the scores
are cached in scores.json beside it. Interrupted? Run the same command again: training resumes
(train.py's --resume) and scored checkpoints are not scored again. At the end the figure's curves
go to results/fig<N>.png and a markdown table to results/fig<N>.md.
"""
from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import time
from pathlib import Path

import checkpoint
import judge

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


def slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower().replace("²", "")).strip("-")


def train_flags(overrides: dict) -> list[str]:
    """A variant's TrainConfig overrides as train.py flags: cuts=(1, 3, 6) -> --cuts 1,3,6."""
    flags = []
    for name, value in overrides.items():
        text = ",".join(str(v) for v in value) if isinstance(value, tuple) else str(value)
        flags += ["--" + name.replace("_", "-"), text]
    return flags


def train_variant(out: Path, overrides: dict, a) -> float:
    """Train (or resume) one variant up to the budget with `python train.py`, keeping every
    checkpoint for scoring. Returns the training minutes of the run so far (kept in
    train_minutes.txt across resumes)."""
    minutes_file = out / "train_minutes.txt"
    before = float(minutes_file.read_text()) if minutes_file.is_file() else None
    done = checkpoint.latest_checkpoint(out)
    if done is not None and int(done.name.split("-")[1]) >= a.steps:
        return float("nan") if before is None else before  # nan: trained before minutes were kept
    command = [sys.executable, str(Path(__file__).parent / "train.py"), "--size", a.size, "--max-steps", str(a.steps),
               "--ckpt-every", str(a.eval_every), "--keep", "1000", "--sample-every", str(a.steps), "--out", str(out),
               "--seed", str(a.seed), *(["--resume"] if done is not None else []),
               *(["--no-progress"] if a.quiet else []), *train_flags(overrides)]
    t = time.perf_counter()
    subprocess.run(command, check=True)
    minutes = (before or 0.0) + (time.perf_counter() - t) / 60
    minutes_file.write_text(f"{minutes:.2f}\n")
    return minutes


def score_checkpoints(out: Path, a) -> list[dict]:
    """Judge accuracy and Fréchet distance of every checkpoint of a run (cached per checkpoint)."""
    scores = []
    for ckpt in checkpoint.complete_checkpoints(out):
        cache = ckpt / "scores.json"
        if not cache.is_file():
            model, bridge, encoder, autoencoder, info = checkpoint.load_model(ckpt)
            result = judge.evaluate(model, bridge, encoder, autoencoder, info["resolution"],
                                    per_category=a.per_category, seed=a.eval_seed)
            result.pop("samples", None)  # per-prompt records: not needed for the curves
            cache.write_text(json.dumps(result, indent=1))
        result = json.loads(cache.read_text())
        scores.append({"step": int(ckpt.name.split("-")[1]), **result})
    return scores


def plot(figure: int, title: str, runs: dict, path: Path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
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
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)


def table(figure: int, title: str, runs: dict, a, minutes: dict) -> str:
    categories = [c for c in next(iter(runs.values()))[-1]["categories"]]
    lines = [f"# Fig. {figure} at small scale — {title}", "",
             f"`python ablate.py {a.command}` (preset {a.size}, batch 32, judge on {a.per_category} prompts per "
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


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--figure", type=int, required=True, choices=sorted(FIGURES))
    ap.add_argument("--steps", type=int, help="training steps per variant (default: about an hour per figure)")
    ap.add_argument("--eval-every", type=int, help="steps between scored checkpoints (default: steps / 3)")
    ap.add_argument("--size", default="small", help="model preset")
    ap.add_argument("--per-category", type=int, default=30, help="judge prompts per category")
    ap.add_argument("--seed", type=int, default=0, help="training seed")
    ap.add_argument("--eval-seed", type=int, default=2026, help="seed of the judge's prompt set")
    ap.add_argument("--out", default="runs/ablate", help="where the runs go")
    ap.add_argument("--results", default="results", help="where the plot and the table go")
    ap.add_argument("--only", help="comma-separated variant names to run (default: all)")
    ap.add_argument("--quiet", action="store_true", help="no progress bars")
    a = ap.parse_args(argv)
    a.steps = a.steps or DEFAULT_STEPS[a.figure]
    a.eval_every = a.eval_every or max(1, a.steps // 3)
    a.command = " ".join(f"'{v}'" if " " in v else v for v in (argv if argv is not None else sys.argv[1:]))
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
