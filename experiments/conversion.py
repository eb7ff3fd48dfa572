"""Converting a flat model into NAMI, measured on the built-in world: results/conversion.md and .png.

    python -m experiments.conversion --out runs/conversion      # about 80 minutes on 2 CPU cores
    python -m experiments.conversion --out runs/conversion --report-only   # the tables and plot of finished runs

One torch job at a time, on world level 1 (where the default recipe is not at its ceiling), the
default run's settings otherwise, every log line kept (--log-every 1):

  F                   a flat run (--mode flat) of the default run's steps, a checkpoint every 100 steps
  S-local, S-global   NAMI from scratch with each --velocity (docs/method.md §10), validated every 100 steps
  F-src               F's checkpoint nearest the step F reaches in S-local's time: F at the NAMI run's wall clock
                      (a flat run's lr is constant after its warm-up, so a checkpoint is a shorter run)
  C-{v}-{n}           F-src converted (train.py --init-from) with --velocity v for n = 0, 100, 300 and 1200 steps
  C-global-fo         the other order: 150 steps of --mode flow-only (the full model at every stage), then 150
                      with the cut points

Each is then judged (experiments/eval.py, --per-category prompts; F with its flat sampler). A finished run
or score is not done again: run the same command after an interruption.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from common import images
from training import checkpoint

ROOT = Path(__file__).resolve().parents[1]
TITLE = "# Converting a flat model into NAMI: --velocity local and global, 0 to 1200 steps\n\n"
NOTES = "## What it shows"
STEPS = 1200                     # the default run's
CONVERSIONS = (0, 100, 300, 1200)


def plan(steps: int) -> list[tuple[str, list[str]]]:
    """(name, train.py flags) of every run in order, for a protocol of `steps` (1200: the one measured); "F-src"
    stands for the flat checkpoint picked after S-local, C-global-fo-a for the flow-only half's run."""
    n = lambda count: str(max(1, round(count * steps / STEPS)))  # a count of the 1200-step protocol, scaled
    runs = [("F", ["--mode", "flat", "--max-steps", n(1200), "--ckpt-every", n(100), "--keep", "1000"]),
            ("S-local", ["--max-steps", n(1200), "--val-every", n(100), "--ckpt-every", n(300)]),
            ("S-global", ["--velocity", "global", "--max-steps", n(1200), "--val-every", n(100), "--ckpt-every", n(300)])]
    validate = {0: 0, 100: 25, 300: 50, 1200: 50}
    for velocity in ("global", "local"):
        for count in CONVERSIONS:
            trained = ["--max-steps", n(count), "--val-every", n(validate[count]), "--ckpt-every", n(min(count, 300))]
            runs.append((f"C-{velocity}-{count}", ["--init-from", "F-src", "--velocity", velocity,
                                                   *(["--max-steps", "0"] if count == 0 else trained)]))
    half = ["--velocity", "global", "--max-steps", n(150), "--val-every", n(50), "--ckpt-every", n(150)]
    return runs + [("C-global-fo-a", ["--mode", "flow-only", "--init-from", "F-src", *half]),
                   ("C-global-fo", ["--init-from", "C-global-fo-a", *half])]


def seconds_of(out: Path) -> dict:
    """{run: training seconds} from out/times.txt ("NAME SECONDS s rc=N" per finished run)."""
    path = out / "times.txt"
    lines = path.read_text().splitlines() if path.is_file() else []
    return {p[0]: float(p[1]) for p in (line.split() for line in lines) if len(p) >= 3 and p[2] == "s" and p[0] != "eval"}


def train(out: Path, name: str, flags: list[str], common: list[str]):
    """One run, skipped when it finished before; its seconds appended to out/times.txt."""
    if name in seconds_of(out):
        return
    flags = [str(out / f) if f in ("F-src", "C-global-fo-a") else f for f in flags]
    start = time.perf_counter()
    with open(out / f"{name}.log", "w") as log:
        rc = subprocess.call([sys.executable, str(ROOT / "train.py"), *common, "--out", str(out / name), *flags],
                             cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    if rc:
        raise SystemExit(f"error: {name} failed (rc {rc}); see {out / name}.log")
    with open(out / "times.txt", "a") as f:
        f.write(f"{name} {time.perf_counter() - start:.1f} s rc=0\n")


def pick_flat_source(out: Path) -> Path:
    """out/F-src: a link to F's checkpoint nearest the step F reaches in S-local's training time, at F's median
    speed (its log's images per second: a stretch slowed by another job on the cores does not move the pick)."""
    link = out / "F-src"
    if not link.exists():
        log = checkpoint.read_log(out / "F")[1:]  # the first holds the start-up
        batch = json.loads((checkpoint.latest_checkpoint(out / "F") / "config.json").read_text())["train"]["batch_size"]
        per_step = batch / statistics.median(r["images_per_s"] for r in log)
        target = seconds_of(out)["S-local"]
        steps = [checkpoint.checkpoint_step(c.name) for c in checkpoint.complete_checkpoints(out / "F")]
        best = min(steps, key=lambda s: abs(s * per_step - target))
        os.symlink(out / "F" / checkpoint.checkpoint_name(best), link)
        (out / "F-src.json").write_text(json.dumps({"step": best, "seconds": best * per_step, "s_per_step": per_step,
                                                    "S-local seconds": target}))
    return link


def judge(out: Path, name: str, per_category: int) -> dict:
    """experiments/eval.py on the run's newest checkpoint, once (its eval.json is kept)."""
    folder = out / "eval" / name
    if not (folder / "eval.json").is_file():
        subprocess.check_call([sys.executable, "-m", "experiments.eval", "--ckpt", str(out / name), "--per-category",
                               str(per_category), "--json", "--out", str(folder)], cwd=ROOT, stdout=subprocess.DEVNULL)
    return json.loads((folder / "eval.json").read_text())


def validation_curves(run: Path) -> dict:
    """{k: [(step, val_loss_stage k)]} from the run's log."""
    curves: dict = {}
    for r in checkpoint.read_log(run, validation=True):
        for key, value in r.items():
            if key.startswith("val_loss_stage"):
                curves.setdefault(int(key[14:]), []).append((r["step"], value))
    return curves


def first_losses(run: Path) -> dict:
    """{k: Eq. 4 of stage k at the first training step} (its samples, noise and t' are the seed's)."""
    first = checkpoint.read_log(run)[0]
    return {int(k[10:]): v for k, v in first.items() if k.startswith("loss_stage")}


def meeting_step(behind: dict, ahead: dict, tolerance: float = 0.05) -> int | None:
    """The first validation step at which run `behind`'s validation loss, summed over the stages, is within
    `tolerance` of run `ahead`'s (or below it); None if it never is."""
    steps = sorted(set(s for s, _ in behind[1]) & set(s for s, _ in ahead[1]))
    total = lambda curves, s: sum(dict(c)[s] for c in curves.values())
    return next((s for s in steps if total(behind, s) <= (1 + tolerance) * total(ahead, s)), None)


def plot(out: Path, path: Path, title: str):
    """The validation loss of each stage against the training step: the runs from scratch and the conversions."""
    plt = images.pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    styles = {"S-local": ("C0", "-"), "S-global": ("C0", "--"), "C-local-1200": ("C3", "-"), "C-global-1200": ("C2", "-"),
              "C-local-300": ("C3", ":"), "C-global-300": ("C2", ":"), "C-global-fo": ("C4", "-.")}
    for name, (color, line) in styles.items():
        curves = validation_curves(out / name) if (out / name / "log.jsonl").is_file() else {}
        if name == "C-global-fo":  # its flow-only half first, then the cut points' steps after it
            first = validation_curves(out / "C-global-fo-a")
            shift = max(s for s, _ in first[1])
            curves = {k: first[k] + [(s + shift, v) for s, v in points[1:]] for k, points in curves.items()}
        for k, points in curves.items():
            axes[k - 1].plot(*zip(*points), line, color=color, marker=".", label=name)
    for k, ax in enumerate(axes, 1):
        ax.set(title=f"stage {k}", xlabel="training step", ylabel="validation loss (Eq. 4, local units)", yscale="log")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    images.save_figure(fig, path, title, dpi=110)


def report(out: Path, results: Path, per_category: int, command: str) -> str:
    """results/conversion.md's tables: the judge of every run, the validation and the first training losses."""
    seconds, source = seconds_of(out), json.loads((out / "F-src.json").read_text())
    names = ["F", "S-local", "S-global"] + [f"C-{v}-{n}" for v in ("global", "local") for n in CONVERSIONS] + ["C-global-fo"]
    scores = {name: judge(out, "F-src" if name == "F" else name, per_category) for name in names}
    steps = {name: source["step"] if name == "F" else checkpoint.checkpoint_step(checkpoint.latest_checkpoint(out / name).name)
             for name in names}
    train_s = {name: source["seconds"] if name == "F" else seconds[name] for name in names}
    train_s["C-global-fo"] += seconds["C-global-fo-a"]  # both halves: flow only, then the cut points
    steps["C-global-fo"] += checkpoint.checkpoint_step(checkpoint.latest_checkpoint(out / "C-global-fo-a").name)
    shapes = list(scores["S-local"]["by_shape"])
    cats = list(scores["S-local"]["categories"])
    lines = [f"| run | steps | training s | {' | '.join(c.replace('_', ' ') for c in cats)} | overall ± SE | held-out | "
             f"by shape: {' / '.join(shapes)} | sampling s |", "|---" * (len(cats) + 7) + "|"]
    for name in names:
        r = scores[name]
        lines.append(f"| {name} | {steps[name]} | {train_s[name]:.0f} | " +
                     " | ".join(f"{r['categories'][c]['accuracy']:.2f}" for c in cats) +
                     f" | {r['overall']:.3f} ± {r['overall_se']:.3f} | {r['heldout']['accuracy']:.2f} | " +
                     " / ".join(f"{r['by_shape'][s]['accuracy']:.2f}" for s in shapes) + f" | {r['seconds']:.1f} |")
    val = {name: validation_curves(out / name) for name in names[1:]}
    val["C-global-fo"] = {k: validation_curves(out / "C-global-fo-a")[k][:1] + c for k, c in val["C-global-fo"].items()}
    lines += ["", "Validation loss per stage (Eq. 4 in local units, 64 held-out samples, 8 fixed t', EMA weights): "
              "at step 0, and at the run's last step.", "",
              "| run | step 0: stage 1 / 2 / 3 | last: stage 1 / 2 / 3 |", "|---|---|---|"]
    for name in names[1:]:
        first = " / ".join(f"{c[0][1]:.4f}" for c in val[name].values())
        last = " / ".join(f"{c[-1][1]:.4f}" for c in val[name].values())
        lines.append(f"| {name} | {first} | {last} |")
    lines += ["", "First training step, Eq. 4 per stage (the same samples, noise and t' in every run: the seed's):", "",
              "| run | stage 1 | stage 2 | stage 3 |", "|---|---|---|---|"]
    for name in ("S-local", "S-global", "C-global-1200", "C-local-1200"):
        first = first_losses(out / name)
        lines.append(f"| {name} | " + " | ".join(f"{first.get(k, float('nan')):.4f}" for k in (1, 2, 3)) + " |")
    meet = meeting_step(val["C-local-1200"], val["C-global-1200"])
    head = [f"`python -m experiments.conversion {command}` — {datetime.date.today()}, torch {torch.__version__}, "
            f"{torch.get_num_threads()} CPU threads; world level 1, the default run's settings otherwise. F is the flat "
            f"run's checkpoint at step {source['step']} ({source['seconds']:.0f} s, S-local took "
            f"{source['S-local seconds']:.0f} s). Judge: {per_category} prompts per category, 10+10+10 steps (F: 30 "
            "flat steps), CFG 3. The local conversion's validation loss (summed over the stages) comes within 5 % of the "
            f"global one's at step {meet} of the 1200-step runs. Curves: [conversion.png](conversion.png).", ""]
    text = "\n".join(head + lines) + "\n"
    plot(out, results / "conversion.png", "validation loss per stage: from scratch (blue), converted (green: global, red: local)")
    return text


def main(argv=None):
    try:  # the plots come last: say now, not after hours of training, that matplotlib is missing
        images.pyplot()
    except ImportError as e:
        raise SystemExit(f"error: {e}")
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="runs/conversion", help="where the runs go")
    ap.add_argument("--results", default="results", help="where conversion.md's tables and conversion.png go")
    ap.add_argument("--steps", type=int, default=STEPS, help="the protocol's length (1200: the default run's; "
                    "the conversions' lengths scale with it)")
    ap.add_argument("--per-category", type=int, default=100, help="judge prompts per category")
    ap.add_argument("--report-only", action="store_true", help="no training: the report of finished runs")
    ap.add_argument("--train-flags", default="", help="more train.py flags for every run, e.g. '--size tiny'")
    a = ap.parse_args(argv)
    out = Path(a.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    common = ["--world-level", "1", "--no-progress", "--log-every", "1", *a.train_flags.split()]
    if not a.report_only:
        for name, flags in plan(a.steps):
            if name.startswith("C-"):
                pick_flat_source(out)
            train(out, name, flags, common)
    command = " ".join(argv if argv is not None else sys.argv[1:])
    text = TITLE + report(out, Path(a.results), a.per_category, command)
    md = Path(a.results) / "conversion.md"
    old = md.read_text() if md.is_file() else ""
    md.write_text(text + ("\n" + old[old.index(NOTES):] if NOTES in old else ""))  # the reader's findings survive
    print(text)
    return text


if __name__ == "__main__":
    main()
