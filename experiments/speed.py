"""Quality against sampling time on the built-in world: NAMI's progressive sampler against a flat model given fewer
steps, each point judged and timed, with the Pareto front of each sampler; and, on level 0, the best split of
NAMI's steps at two time budgets. Writes results/speed-level{L}.md and .png.

    python -m experiments.speed --level 0 --out runs/speed      # about 45 minutes on 2 CPU cores
    python -m experiments.speed --level 1 --out runs/speed      # about an hour
    python -m experiments.speed --level 0 --out runs/speed --report-only   # the table and plot of what is done

The models, trained once by train.py (a finished run is not trained again; run the same command after a stop):
  level 0  NAMI   the default run (python train.py)
           flat   --mode flat, a checkpoint every 100 steps, taken at the step it reaches in NAMI's training time
                  at its median throughput (experiments/conversion.py picks its F so)
  level 1  NAMI   NAMI from scratch (the default recipe at --world-level 1), S-local of results/conversion.md
           flat   F, taken as on level 0
           conv   F converted: --init-from F --velocity global, 300 steps (C-global-300 of results/conversion.md)
The points: the flat sampler at 2, 3, 4, 6, 9, 13, 20 and 30 steps; NAMI at 2+2+2, 3+3+3, 5+5+5 and 10+10+10 and, on
level 0, --splits other splits at the cost of 5+5+5 and of 10+10+10 (from the stages' measured cost per step).
Each point is judged once (toyworld/judge.py: --per-category prompts per category, CFG 3, prompt j's noise seed j,
so a rerun gives the same figures) and cached in OUT/level{L}/judged/. Its seconds per image are then timed in one
process, all points alternating, each the median of --repeat batches of --batch images (nami.generate: text
encoding cached, transformer and BridgeFlow, not the VAE decode), after a warm-up.
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

import nami
from common import images, parallel
from toyworld import judge
from training import checkpoint

ROOT = Path(__file__).resolve().parents[1]
FLAT_STEPS = (2, 3, 4, 6, 9, 13, 20, 30)
NAMI_STEPS = ((2, 2, 2), (3, 3, 3), (5, 5, 5), (10, 10, 10))
BUDGETS = ((5, 5, 5), (10, 10, 10))  # the splits are searched at the cost of these


def models(level: int) -> dict:
    """{name: (train.py flags, the sampler judged)} of a level, trained in this order."""
    if level == 0:
        return {"NAMI": ([], "nami"), "flat": (["--mode", "flat", "--ckpt-every", "100", "--keep", "1000"], "flat")}
    return {"NAMI": ([], "nami"), "flat": (["--mode", "flat", "--ckpt-every", "100", "--keep", "1000"], "flat"),
            "conv": (["--init-from", "FLAT-SRC", "--velocity", "global", "--max-steps", "300"], "nami")}


def train(out: Path, name: str, flags: list[str], level: int, report_only: bool = False) -> float:
    """One train.py run into out/name, once; its wall-clock seconds (kept in out/name.seconds)."""
    seconds = out / f"{name}.seconds"
    if not seconds.is_file() and report_only:
        raise SystemExit(f"error: --report-only, but {out / name} is not trained yet: run without it")
    if not seconds.is_file():
        flags = [str(flat_source(out)) if f == "FLAT-SRC" else f for f in flags]
        start = time.perf_counter()
        with open(out / f"{name}.log", "w") as log:
            rc = subprocess.call([sys.executable, str(ROOT / "train.py"), "--world-level", str(level), "--no-progress",
                                  "--log-every", "1", "--out", str(out / name), *flags], cwd=ROOT, stdout=log,
                                 stderr=subprocess.STDOUT)
        if rc:
            raise SystemExit(f"error: {name} failed (rc {rc}); see {out / name}.log")
        seconds.write_text(f"{time.perf_counter() - start:.1f}\n")
    return float(seconds.read_text())


def flat_source(out: Path) -> Path:
    """The flat run's checkpoint nearest the step it reaches in NAMI's training seconds, at its median throughput
    (a stretch slowed by another job on the cores does not move the pick)."""
    log = checkpoint.read_log(out / "flat")[1:]  # the first line holds the start-up
    batch = json.loads((checkpoint.latest_checkpoint(out / "flat") / "config.json").read_text())["train"]["batch_size"]
    per_step = batch / statistics.median(r["images_per_s"] for r in log)
    target = float((out / "NAMI.seconds").read_text())
    steps = [checkpoint.checkpoint_step(c.name) for c in checkpoint.complete_checkpoints(out / "flat")]
    return out / "flat" / checkpoint.checkpoint_name(min(steps, key=lambda s: abs(s * per_step - target)))


def load(ckpt: Path):
    """((model, bridge, encoder, autoencoder), info) of a checkpoint, its EMA weights on the CPU."""
    *parts, info = checkpoint.load_model(ckpt, device=torch.device("cpu"))
    return tuple(parts), info


def point_name(model: str, sampler: str, steps) -> str:
    return f"{model}-{sampler}-" + "+".join(map(str, steps))


def judged(out: Path, name: str, parts, info, steps, sampler: str, per_category: int, level: int) -> dict:
    """The judge's result of one point, computed once (OUT/judged/NAME.json)."""
    path = out / "judged" / f"{name}.json"
    if not path.is_file():
        result = judge.evaluate(*parts, info["resolution"], per_category, list(steps), nami.DEFAULT_GUIDANCE,
                                flat=sampler == "flat", level=level)
        result.pop("samples", None)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(result, indent=1))
    return json.loads(path.read_text())


def stage_costs(parts, info, batch: int, repeat: int = 3) -> list[float]:
    """Seconds per Euler step of each stage at this batch (3+3+3, medians): to predict a split's cost."""
    per_stage = [[] for _ in range(parts[0].cfg.num_stages)]
    for _ in range(repeat):
        marks = [time.perf_counter()]
        sample(parts, info, (3, 3, 3), "nami", batch, on_stage_end=lambda k, x: marks.append(time.perf_counter()))
        for k in range(len(per_stage)):
            per_stage[k].append((marks[k + 1] - marks[k]) / 3)
    return [statistics.median(c) for c in per_stage]


def splits_at(budget, costs, count: int) -> list[list[int]]:
    """`count` splits (n_1, n_2, n_3), each stage at least 2 steps, whose predicted cost is within 7 % of the budget
    split's: spread from the one that spends least of the time at the finest stage to the one that spends most
    (e.g. 20+10+5 to 5+5+10), the budget split itself among them."""
    target = sum(n * c for n, c in zip(budget, costs))
    near = [(a, b, c) for a in range(2, 61) for b in range(2, 41) for c in range(2, 31)
            if abs(a * costs[0] + b * costs[1] + c * costs[2] - target) <= 0.07 * target]
    finest = lambda split: split[2] * costs[2] / sum(n * c for n, c in zip(split, costs))
    near.sort(key=lambda split: (finest(split), split))
    picked = [near[round(i * (len(near) - 1) / max(1, count - 1))] for i in range(count)] if near else []
    return [list(split) for split in sorted(set(picked) | {tuple(budget)}, key=finest)]


@torch.no_grad()
def sample(parts, info, steps, sampler: str, batch: int, on_stage_end=None):
    model, bridge, encoder, autoencoder = parts
    (w, h), f = info["resolution"], autoencoder.factor
    return nami.generate(model, encoder, ["a red circle"] * batch, range(batch), h // f, w // f, list(steps),
                         bridge=bridge, flat=sampler == "flat", on_stage_end=on_stage_end)


def timed(points: dict, loaded: dict, batch: int, repeat: int) -> dict:
    """{point: median seconds per image}, every point's batch in turn, `repeat` rounds after one warm-up round."""
    runs = {name: [] for name in points}
    for round_ in range(repeat + 1):
        for name, (model, sampler, steps) in points.items():
            parts, info = loaded[model]
            parallel.synchronize("cpu")
            t0 = time.perf_counter()
            sample(parts, info, steps, sampler, batch)
            if round_:
                runs[name].append((time.perf_counter() - t0) / batch)
    return {name: statistics.median(t) for name, t in runs.items()}


def front(rows: list[dict]) -> list[dict]:
    """The Pareto front: the points no other point beats in both time and quality, by time."""
    rows = sorted(rows, key=lambda r: (r["s_per_image"], -r["overall"]))
    best, kept = -math.inf, []
    for r in rows:
        if r["overall"] > best:
            kept.append(r)
            best = r["overall"]
    return kept


def z_score(a: dict, b: dict) -> float:
    """a's overall minus b's in standard errors of the difference (±inf where both errors are 0 and they differ)."""
    difference, error = a["overall"] - b["overall"], math.hypot(a["overall_se"], b["overall_se"])
    return difference / error if error else 0.0 if difference == 0 else math.copysign(math.inf, difference)


def flat_at(flat_front: list[dict], seconds: float):
    """The flat front's best point that takes at most `seconds` (None if even its fastest takes longer)."""
    return max((r for r in flat_front if r["s_per_image"] <= seconds), key=lambda r: r["overall"], default=None)


def verdict(rows: list[dict]) -> list[str]:
    """Per staged model, at each point of its front, against the flat front's best point at no more time: the
    difference in standard errors of the difference (more than 2: above or below, else within noise)."""
    flat_front = front([r for r in rows if r["sampler"] == "flat"])
    lines = []
    for model in sorted({r["model"] for r in rows if r["sampler"] == "nami"}):
        parts = []
        for r in front([r for r in rows if r["model"] == model]):
            rival = flat_at(flat_front, r["s_per_image"])
            if rival is None:
                parts.append(f"{r['steps']} ({1000 * r['s_per_image']:.1f} ms): faster than any flat point")
                continue
            z = z_score(r, rival)
            word = "above" if z > 2 else "below" if z < -2 else "within noise"
            parts.append(f"{r['steps']} ({1000 * r['s_per_image']:.1f} ms) {word} flat {rival['steps']} "
                         f"({r['overall']:.3f} against {rival['overall']:.3f}, {z:+.1f} SE)")
        lines.append(f"- **{model}** against the flat front: " + "; ".join(parts))
    return lines


def plot(rows: list[dict], path: Path, title: str):
    plt = images.pyplot()
    fig, (accuracy, distance) = plt.subplots(1, 2, figsize=(11, 4))
    styles = {"NAMI": "C0", "conv": "C2", "flat": "C3"}
    for model in sorted({r["model"] for r in rows}):
        mine = sorted([r for r in rows if r["model"] == model], key=lambda r: r["s_per_image"])
        t = [1000 * r["s_per_image"] for r in mine]
        accuracy.errorbar(t, [r["overall"] for r in mine], [r["overall_se"] for r in mine], fmt="o", ms=4,
                          color=styles.get(model, "C4"), alpha=0.6, capsize=2)
        best = front(mine)
        accuracy.plot([1000 * r["s_per_image"] for r in best], [r["overall"] for r in best], "-",
                      color=styles.get(model, "C4"), label=f"{model} ({mine[0]['sampler']} sampler), front")
        distance.plot(t, [r["fd"] for r in mine], "o", ms=4, color=styles.get(model, "C4"), alpha=0.6)
        lowest = front([{**r, "overall": -r["fd"]} for r in mine])  # the front of the distance: lower is better
        distance.plot([1000 * r["s_per_image"] for r in lowest], [r["fd"] for r in lowest], "-",
                      color=styles.get(model, "C4"), label=f"{model}, front")
        for r in best:
            accuracy.annotate(r["steps"], (1000 * r["s_per_image"], r["overall"]), fontsize=6, xytext=(3, -8),
                              textcoords="offset points")
    accuracy.set(xscale="log", xlabel="sampling ms per image (log)", ylabel="judge: overall ± SE",
                 title="accuracy against time")
    distance.set(xscale="log", yscale="log", xlabel="sampling ms per image (log)", ylabel="Fréchet distance (lower is better)",
                 title="Fréchet distance against time")
    from matplotlib.ticker import LogLocator, NullFormatter, ScalarFormatter
    for axes in (accuracy, distance):
        axes.xaxis.set_major_locator(LogLocator(base=10, subs=(1, 2, 5)))
        axes.xaxis.set_major_formatter(ScalarFormatter())
        axes.xaxis.set_minor_formatter(NullFormatter())
        axes.legend(fontsize=7)
    images.save_figure(fig, path, title, fontsize=9)


def chosen_splits(out: Path, nami_model, a) -> dict:
    """{budget: [split, …]} of level 0, chosen once from the stages' measured costs and kept (OUT/splits.json), so
    that a rerun judges and reports the same points."""
    path = out / "splits.json"
    if not path.is_file():
        costs = stage_costs(*nami_model, a.batch)
        path.write_text(json.dumps({"+".join(map(str, budget)): splits_at(budget, costs, a.splits)
                                    for budget in BUDGETS} | {"stage_seconds_per_step": costs}))
    chosen = json.loads(path.read_text())
    chosen.pop("stage_seconds_per_step")
    return chosen


def report(rows: list[dict], level: int, a, seconds: dict, sources: dict, splits: dict) -> str:
    """results/speed-level{L}.md: how it was made, the table, the verdict, the splits."""
    lines = [f"# Quality against sampling time, world level {level}: NAMI against flat given fewer steps\n",
             f"`python -m experiments.speed --level {level} --out {a.out}` — {datetime.date.today()}, torch "
             f"{torch.__version__}, {torch.get_num_threads()} CPU threads. Models: " + "; ".join(
                 f"{name} {sources[name]} (trained {seconds[name]:.0f} s)" for name in sources) +
             f". Judge: {a.per_category} prompts per category, CFG {nami.DEFAULT_GUIDANCE:g}, prompt j's noise seed j. "
             f"Time: nami.generate of {a.batch} images (text encoding cached, no VAE decode), the median of "
             f"{a.repeat} batches per point, every point in one process in turn. Plot: [speed-level{level}.png]"
             f"(speed-level{level}.png).\n",
             "| model | sampler | steps | ms per image | overall ± SE | single / colours | held-out | Fréchet distance | "
             "on its front |", "|---|---|---|---|---|---|---|---|---|"]
    fronts = {m: {r["name"] for r in front([r for r in rows if r["model"] == m])} for m in {r["model"] for r in rows}}
    for r in sorted(rows, key=lambda r: (r["model"], r["s_per_image"])):
        cats = r["categories"]
        lines.append(f"| {r['model']} | {r['sampler']} | {r['steps']} | {1000 * r['s_per_image']:.2f} | "
                     f"{r['overall']:.3f} ± {r['overall_se']:.3f} | " + " / ".join(f"{v:.2f}" for v in cats) +
                     f" | {r['heldout']:.2f} | {r['fd']:.2f} | {'yes' if r['name'] in fronts[r['model']] else ''} |")
    lines += ["", "## Verdict", "", *verdict(rows)]
    if splits:
        lines += ["", "## The split of NAMI's steps at equal time", ""]
        reference = next(r for r in rows if r["model"] == "NAMI" and r["steps"] == "10+10+10")
        for budget, found in splits.items():
            by_name = {r["name"]: r for r in rows}
            mine = [by_name[n] for n in (point_name("NAMI", "nami", split) for split in found) if n in by_name]
            best, uniform = max(mine, key=lambda r: r["overall"]), by_name[point_name("NAMI", "nami", budget.split("+"))]
            lines.append(f"- at the cost of {budget} ({', '.join(r['steps'] for r in mine)}): best {best['steps']}, "
                         f"{best['overall']:.3f} ± {best['overall_se']:.3f} in {1000 * best['s_per_image']:.2f} ms: "
                         f"{z_score(best, uniform):+.1f} SE from {budget}'s {uniform['overall']:.3f}, "
                         f"{z_score(best, reference):+.1f} SE from 10+10+10's {reference['overall']:.3f}")
    return "\n".join(lines) + "\n"


def row(name: str, model: str, sampler: str, steps, result: dict, seconds: float) -> dict:
    categories = [c["accuracy"] for c in result["categories"].values()]
    return {"name": name, "model": model, "sampler": sampler, "steps": "+".join(map(str, steps)),
            "s_per_image": seconds, "overall": result["overall"], "overall_se": result["overall_se"],
            "categories": categories, "heldout": result["heldout"]["accuracy"] if result.get("heldout") else float("nan"),
            "fd": result["fd"]}


def main(argv=None):
    try:  # the plot comes last: say now, not after an hour, that matplotlib is missing
        images.pyplot()
    except ImportError as e:
        raise SystemExit(f"error: {e}")
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--level", type=int, choices=(0, 1), default=0, help="world level (0: the default run's)")
    ap.add_argument("--out", default="runs/speed", help="where the runs and the judged points go")
    ap.add_argument("--results", default="results", help="where speed-level{L}.md and .png go")
    ap.add_argument("--per-category", type=int, default=100, help="judge prompts per category")
    ap.add_argument("--batch", type=int, default=64, help="images per timed batch (the judge's batch)")
    ap.add_argument("--repeat", type=int, default=5, help="timed batches per point")
    ap.add_argument("--splits", type=int, default=6, help="level 0: splits tried at each budget")
    ap.add_argument("--report-only", action="store_true", help="no training or judging: what is done")
    ap.add_argument("--train-flags", default="", help="more train.py flags for every run, e.g. '--size tiny'")
    a = ap.parse_args(argv)
    out = Path(a.out).resolve() / f"level{a.level}"
    out.mkdir(parents=True, exist_ok=True)
    plan = models(a.level)
    seconds = {name: train(out, name, flags + a.train_flags.split(), a.level, a.report_only)
               for name, (flags, _) in plan.items()}
    sources = {name: (flat_source(out) if name == "flat" else checkpoint.latest_checkpoint(out / name))
               for name in plan}
    loaded = {name: load(path) for name, path in sources.items()}
    points = {}
    for name, (_, sampler) in plan.items():
        for steps in (FLAT_STEPS if sampler == "flat" else NAMI_STEPS):
            steps = (steps,) if sampler == "flat" else steps
            points[point_name(name, sampler, steps)] = (name, sampler, steps)
    splits = chosen_splits(out, loaded["NAMI"], a) if a.level == 0 and a.splits else {}
    for found in splits.values():
        points.update({point_name("NAMI", "nami", s): ("NAMI", "nami", tuple(s)) for s in found})
    results = {name: judged(out, name, *loaded[model], steps, sampler, a.per_category, a.level)
               for name, (model, sampler, steps) in points.items() if not a.report_only or
               (out / "judged" / f"{name}.json").is_file()}
    timing = out / "timing.json"
    times = json.loads(timing.read_text()) if timing.is_file() else {}
    if set(results) - set(times):
        times = timed({n: points[n] for n in results}, loaded, a.batch, a.repeat)
        timing.write_text(json.dumps(times, indent=1))
    rows = [row(name, *points[name], results[name], times[name]) for name in results]
    sources = {name: f"{path.parent.name}/{path.name}" for name, path in sources.items()}
    text = report(rows, a.level, a, seconds, sources, splits)
    results_dir = Path(a.results)
    plot(rows, results_dir / f"speed-level{a.level}.png", f"world level {a.level}: quality against sampling time")
    (results_dir / f"speed-level{a.level}.md").write_text(text)
    print(text)
    return rows


if __name__ == "__main__":
    main()
