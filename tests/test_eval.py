"""Tests of the experiments (experiments/): experiments/eval.py's GenEval-style judge of the shapes world passes
real renders and fails renders that break their prompt in one way, the detector reads hand-built
pictures right, the Fréchet distance orders real and degraded images, `python -m experiments.eval
--ckpt` prints the table for a tiny checkpoint trained here, `python -m experiments.ablate --gpu` runs
at a toy budget, and experiments/bench.py times every stage of both samplers.
Run: python -m pytest -q tests/test_eval.py  (CPU, about 3 minutes)."""
from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import train
from common import images
from experiments import eval
from toyworld import judge as ev, shapes
from training import checkpoint, config

ROOT = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------------------------------------
# The judge on real renders and on renders that break the prompt
# ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module", params=[(24, 100), (32, 100), (64, 40)], ids=["24px", "32px", "64px"])
def calibration(request):
    size, n = request.param
    return ev.calibrate(n, size, seed=123)  # not the prompt set's seed: the thresholds were set on seed 7


def test_real_renders_pass_the_judge_in_every_category(calibration):
    for cat, rate in calibration["real"].items():
        assert rate >= 0.98, f"{cat}: {rate:.3f} of real {calibration['size']}px renders pass; misses: {calibration['misses'][:5]}"


def test_every_kind_of_broken_render_fails(calibration):
    assert set(calibration["broken"]) == set(ev.BREAKS)
    for kind, rate in calibration["broken"].items():
        assert calibration["n_broken"][kind] >= 10
        assert rate >= 0.95, f"{kind}: only {rate:.3f} of broken {calibration['size']}px renders fail"


def test_each_break_changes_what_its_name_says():
    rng = np.random.default_rng(0)
    pos = shapes.make_sample(1, 0, "train", "position")
    swapped = ev.break_sample(pos, "swap", rng)
    assert [o.box for o in swapped.objects] == [o.box for o in pos.objects][::-1]
    assert not shapes.satisfies(pos.prompt["relation"], swapped.objects[0].box, swapped.objects[1].box)
    count = shapes.make_sample(1, 0, "train", "counting")
    n = count.prompt["objects"][0]["count"]
    assert len(ev.break_sample(count, "drop", rng).objects) == n - 1
    assert len(ev.break_sample(count, "extra", rng).objects) == n + 1
    col = shapes.make_sample(1, 0, "train", "colors")
    assert ev.break_sample(col, "color", rng).objects[0].color != col.objects[0].color
    assert ev.break_sample(col, "swap", rng) is None  # no relation to swap
    assert len(count.objects) == n  # the original is left alone


# ---------------------------------------------------------------------------------------------
# The detector on hand-built pictures
# ---------------------------------------------------------------------------------------------

def picture(objects, background=0.2, size=32):
    s = shapes.Sample("", "", [shapes.Shape(*o) for o in objects], background)
    return shapes.render(s, size)


@pytest.mark.parametrize("size", [32, 64])
def test_detector_reads_colour_shape_and_box(size):
    objects = [("circle", "red", (0.05, 0.05, 0.4, 0.4)), ("square", "blue", (0.55, 0.1, 0.9, 0.45)),
               ("triangle", "white", (0.3, 0.55, 0.7, 0.95))]
    found = ev.detect(picture(objects, background=0.4, size=size))  # white on the lightest background
    assert sorted((d.color, d.shape) for d in found) == sorted((c, s) for s, c, _ in objects)
    for shape, color, box in objects:
        d = next(d for d in found if d.color == color)
        assert all(abs(a - b) < 0.1 for a, b in zip(d.box, box)), (d, box)  # square inset, triangle base
        assert 0 < d.area < (box[2] - box[0]) * (box[3] - box[1])


def test_detector_counts_four_small_objects_of_one_colour_at_the_generators_margin():
    side, gap = 0.2, 0.031  # the generator keeps 0.03 between boxes; 0.2 is its smallest counting size
    for shape in shapes.SHAPES:
        boxes = [(x, y, x + side, y + side) for x in (0.25, 0.25 + side + gap) for y in (0.25, 0.25 + side + gap)]
        found = ev.detect(picture([(shape, "yellow", b) for b in boxes]))
        assert [(d.color, d.shape) for d in found] == [("yellow", shape)] * 4


def test_tensor_pil_and_array_inputs_agree_and_tiny_or_broken_images_do_not_crash():
    img = picture([("triangle", "green", (0.2, 0.2, 0.8, 0.8))])
    as_pil, as_tensor = ev.detect(img), ev.detect(images.to_tensor(img))
    assert as_pil == as_tensor == ev.detect(np.asarray(img)) and as_pil[0].shape == "triangle"
    for size in (1, 2, 4, 16):
        ev.detect(picture([("circle", "red", (0.2, 0.2, 0.8, 0.8))], size=size))
    ev.detect(torch.randn(3, 16, 16))
    assert ev.detect(torch.full((3, 8, 8), float("nan"))) == []
    ev.features(torch.randn(2, 3, 1, 1))
    with pytest.raises(ValueError, match=r"\(3, H, W\)"):
        ev.detect(torch.zeros(1, 3, 8, 8))
    with pytest.raises(ValueError, match="empty"):
        ev.detect(torch.zeros(3, 0, 8))


def test_judge_rules():
    D = ev.Detection
    red_circle, blue_sq = D("red", "circle", (0.1, 0.4, 0.3, 0.6), 0.04), D("blue", "square", (0.6, 0.4, 0.8, 0.6), 0.04)
    assert ev.judge([red_circle], {"objects": [{"shape": "circle"}]})
    assert not ev.judge([red_circle], {"objects": [{"shape": "circle"}, {"shape": "square"}]})
    assert ev.judge([red_circle, blue_sq], {"objects": [{"shape": "circle", "color": "red"}]})  # extras allowed
    assert not ev.judge([red_circle], {"objects": [{"shape": "circle", "color": "blue"}]})
    two = {"objects": [{"shape": "circle", "color": None, "count": 2}]}
    assert not ev.judge([red_circle], two) and ev.judge([red_circle, red_circle], two)
    assert not ev.judge([red_circle] * 3, two)  # counting is exact
    two_blue = {"objects": [{"shape": "circle", "color": "blue", "count": 2}]}
    assert not ev.judge([red_circle, red_circle], two_blue)
    left = {"objects": [{"shape": "circle", "color": "red"}, {"shape": "square", "color": "blue"}], "relation": "left of"}
    assert ev.judge([red_circle, blue_sq], left)
    assert not ev.judge([red_circle, blue_sq], {**left, "relation": "right of"})
    assert not ev.judge([red_circle, blue_sq], {**left, "relation": "above"})
    assert not ev.judge([red_circle], left)


# ---------------------------------------------------------------------------------------------
# Fréchet distance
# ---------------------------------------------------------------------------------------------

def test_frechet_distance_of_commuting_gaussians_has_its_closed_form():
    # Σ1, Σ2 diagonal: FD = |μ1 − μ2|² + Σ_i (σ1_i − σ2_i)²; the sample estimate converges to it
    g = np.random.default_rng(0)
    s1, s2, mu = np.array([1.0, 2.0, 0.5]), np.array([0.5, 2.0, 1.5]), np.array([1.0, -1.0, 0.0])
    a, b = g.normal(size=(200_000, 3)) * s1, g.normal(size=(200_000, 3)) * s2 + mu
    assert ev.frechet_distance(a, b) == pytest.approx((mu ** 2).sum() + ((s1 - s2) ** 2).sum(), rel=0.02)
    assert abs(ev.frechet_distance(a, a)) < 1e-8
    with pytest.raises(ValueError):
        ev.frechet_distance(a[:1], b)


def blur(x, sigma):
    """Separable Gaussian blur of (N, 3, H, W)."""
    r = max(1, math.ceil(3 * sigma))
    k = torch.exp(-torch.arange(-r, r + 1).float() ** 2 / (2 * sigma ** 2))
    k = (k / k.sum()).repeat(3, 1, 1, 1)  # (3, 1, 1, 2r + 1)
    x = F.pad(x, (r, r, r, r), mode="reflect")
    return F.conv2d(F.conv2d(x, k, groups=3), k.transpose(2, 3), groups=3)


def test_frechet_distance_is_small_between_real_sets_and_grows_with_degradation():
    real_a, _ = shapes.batch(11, 0, 300, 32)
    real_b, _ = shapes.batch(12, 0, 300, 32)  # another seed: disjoint samples
    fa = ev.features(real_a)
    real = ev.frechet_distance(fa, ev.features(real_b))
    g = torch.Generator().manual_seed(0)
    degraded = {
        "noise 0.1": real_b + 0.1 * torch.randn(real_b.shape, generator=g),
        "colour shift 0.25": real_b + torch.tensor([0.25, -0.25, 0.0]).view(1, 3, 1, 1),
        "blur σ=1": blur(real_b, 1.0),
    }
    for name, x in degraded.items():
        fd = ev.frechet_distance(fa, ev.features(x.clamp(-1, 1)))
        assert fd > 5 * real, f"{name}: FD {fd:.3f} vs real-vs-real {real:.3f}"
    by_blur = [ev.frechet_distance(fa, ev.features(blur(real_b, s))) for s in (0.5, 0.75, 1.0, 1.5, 2.0)]
    assert real < by_blur[0] and by_blur == sorted(by_blur), (real, by_blur)


# ---------------------------------------------------------------------------------------------
# The benchmark, end to end on a tiny checkpoint
# ---------------------------------------------------------------------------------------------

def test_prompt_set_is_fixed_and_holds_every_category_and_the_heldout_pairs():
    items = ev.prompt_set(3)
    assert [s.caption for _, s in items] == [s.caption for _, s in ev.prompt_set(3)]
    assert [s.category for split, s in items if split == "train"] == [c for c in shapes.CATEGORIES for _ in range(3)]
    held = [s for split, s in items if split == "heldout"]
    assert [s.category for s in held] == [c for c in ev.HELDOUT_CATEGORIES for _ in range(3)]
    for s in held:  # each names a held-out pair in its prompt
        assert any((o.get("color"), o["shape"]) in shapes.HELDOUT_PAIRS for o in s.prompt["objects"])


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory, encoder_dir):
    out = tmp_path_factory.mktemp("tiny_eval_run")
    train.main(config.TrainConfig(size="tiny", resolution=16, vae=None, world_level=3, jump_noise=False, batch_size=8,
                                  max_steps=2, bridge_steps=5,
                                 text_encoder=encoder_dir, out=str(out), ckpt_every=2, sample_every=1000,
                                 progress=False))
    return out / "ckpt-0000002"


def test_evaluate_is_importable_and_scores_every_prompt(tiny_ckpt):
    model, bridge, encoder, autoencoder, info = checkpoint.load_model(tiny_ckpt)
    result = ev.evaluate(model, bridge, encoder, autoencoder, info["resolution"], per_category=2, steps=[2, 2, 2],
                         batch_size=7, return_images=True)
    assert set(result["categories"]) == set(shapes.CATEGORIES)
    assert all(a["n"] == 2 for a in result["categories"].values())
    assert result["overall"] == pytest.approx(np.mean([a["accuracy"] for a in result["categories"].values()]))
    assert set(result["heldout"]["categories"]) == set(ev.HELDOUT_CATEGORIES) and result["heldout"]["n"] == 8
    assert math.isfinite(result["fd"]) and result["images"].shape == (20, 3, 16, 16)
    assert len(result["samples"]) == 20 and result["settings"]["sampler"] == "nami"
    json.dumps({k: v for k, v in result.items() if k != "images"})  # the rest is plain data


def test_evaluate_from_the_last_stage_keeps_the_real_layout(tiny_ckpt):
    """--from-stage 3 with no step in stage 3 returns the noised, bridged real renders, each that
    of its own prompt (nami's tests check the start point's formula)."""
    model, bridge, encoder, autoencoder, info = checkpoint.load_model(tiny_ckpt)
    size = info["resolution"][0]
    result = ev.evaluate(model, bridge, encoder, autoencoder, size, per_category=4, steps=[1, 1, 0], heldout=False,
                         from_stage=3, return_images=True)
    assert result["settings"]["from_stage"] == 3 and result["images"].shape == (24, 3, size, size)
    reals = torch.stack([images.to_tensor(shapes.render(s, size)) for _, s in ev.prompt_set(4, heldout=False)])
    own = (result["images"] - reals).abs().mean()
    assert own < 0.8 * (result["images"] - reals.roll(1, 0)).abs().mean()
    with pytest.raises(SystemExit, match="--from-stage"):
        eval.main(["--ckpt", str(tiny_ckpt), "--from-stage", "2", "--flat"])


def test_eval_cli_prints_the_table(tiny_ckpt, tmp_path):
    out = tmp_path / "eval-out"
    run = subprocess.run([sys.executable, "-m", "experiments.eval", "--ckpt", str(tiny_ckpt), "--per-category", "2", "--steps", "2,2,2",
                          "--out", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    rows = [line.split("|")[1].strip() for line in run.stdout.splitlines() if line.startswith("| ")]
    assert rows[0] == "category" and rows[1:7] == list(shapes.CATEGORIES)
    assert rows[7].startswith("**overall**") and rows[8].startswith("held-out pairs")
    assert "Fréchet distance" in run.stdout
    saved = json.loads((out / "eval.json").read_text())
    assert saved["settings"]["steps"] == [2, 2, 2] and len(saved["samples"]) == 20
    assert (out / "samples.png").is_file()


def test_eval_cli_refuses_bad_flags_before_loading_anything(tmp_path, capsys):
    for argv, message in ((["--per-category", "0"], "--per-category"), (["--cfg", "nan"], "--cfg"),
                          (["--steps", "a,b"], "--steps"), (["--calibrate", "0"], "--calibrate"),
                          (["--calibrate", "3", "--res", "x"], "--res")):
        with pytest.raises(SystemExit, match=message):
            eval.main(argv + ["--ckpt", str(tmp_path / "nowhere")])
    with pytest.raises(SystemExit, match="no checkpoint"):
        eval.main(["--ckpt", str(tmp_path / "nowhere")])


# ---------------------------------------------------------------------------------------------
# experiments/ablate.py --gpu at a toy budget: the command a GPU runs, so that it cannot rot on a CPU
# ---------------------------------------------------------------------------------------------

def test_gpu_ablation_runs_every_step_at_a_toy_budget_and_writes_its_report(tmp_path):
    from experiments import ablate
    results = ablate.main(["--gpu", "--tiny", "--minutes", "0.01", "--batch", "4", "--per-category", "1",
                           "--out", str(tmp_path / "runs"), "--results", str(tmp_path / "results")])
    assert set(results) == {"flat", "flow only", "NAMI"}
    report = (tmp_path / "results" / "fig6-gpu.md").read_text()
    assert "torch " + torch.__version__ in report and "python -m experiments.ablate --gpu --tiny" in report
    claims = [line for line in report.splitlines() if line.startswith("- ") and "**" in line]
    assert len(claims) == 3 and all(any(v in c for v in ("holds", "fails", "within noise")) for c in claims)
    assert (tmp_path / "results" / "fig6-gpu.png").stat().st_size > 1000
    with pytest.raises(SystemExit, match="CUDA"):  # without --tiny it needs the device it is for
        if not torch.cuda.is_available():
            ablate.main(["--gpu", "--out", str(tmp_path / "runs")])
        else:
            raise SystemExit("CUDA present")


def test_time_ablation_gives_each_variant_the_same_minutes_and_writes_its_verdicts(tmp_path):
    """experiments/ablate.py --cpu-minutes (Fig. 6 at equal training time) at a toy budget: every variant gets
    its own number of steps from its measured step time, and the report says holds / fails / within
    noise for each claim."""
    from experiments import ablate
    results = ablate.main(["--cpu-minutes", "0.02", "--tiny", "--per-category", "1",
                           "--out", str(tmp_path / "runs"), "--results", str(tmp_path / "results")])
    assert set(results) == {"flat", "flow only", "NAMI"}
    report = (tmp_path / "results" / "fig6-cpu-time-0.02min-level0.md").read_text()
    assert "python -m experiments.ablate --cpu-minutes 0.02 --tiny" in report and "torch " + torch.__version__ in report
    claims = [line for line in report.splitlines() if line.startswith("- ") and "**" in line]
    assert len(claims) == 3 and all(any(v in c for v in ("holds", "fails", "within noise")) for c in claims)
    rows = [line for line in report.splitlines() if line.startswith(("| flat |", "| flow only |", "| NAMI |"))]
    assert len(rows) == 3 and all(int(row.split("|")[2]) >= 3 for row in rows)  # steps of each variant
    assert (tmp_path / "results" / "fig6-cpu-time-0.02min-level0.png").stat().st_size > 1000


def test_reference_unet_trains_on_the_default_runs_feed_and_is_judged(tmp_path):
    """experiments/ablate.py --reference at a toy budget: a diffusers UNet2DConditionModel trains a few steps on
    feed.Batches' samples and its samples are judged on the default level's categories."""
    from experiments import ablate
    report = ablate.main(["--reference", "--tiny", "--steps", "3", "--per-category", "2", "--quiet",
                          "--results", str(tmp_path / "results")])
    assert report["images"] == 3 * 8 and len(report["losses_every_100"]) == 1
    assert set(report["categories"]) == {"single_object", "colors"} and 0 <= report["overall"] <= 1
    saved = json.loads((tmp_path / "results" / "reference-unet.json").read_text())
    assert saved["command"] == "python -m experiments.ablate --reference --tiny --steps 3 --per-category 2 --quiet --results " + \
        str(tmp_path / "results")


def test_the_conversion_protocol_runs_every_run_once_and_reports_them(tmp_path):
    """experiments/conversion.py (results/conversion.md) at a toy length: the flat run, NAMI from scratch with each
    --velocity, the flat checkpoint nearest S-local's time converted for 0 to all steps, the flow-only-first order;
    a second call trains nothing, and the reader's findings in conversion.md survive it."""
    from experiments import conversion
    args = ["--steps", "4", "--per-category", "1", "--train-flags", "--size tiny --bridge-steps 5 --batch-size 8 "
            "--resolution 32", "--out", str(tmp_path / "runs"), "--results", str(tmp_path / "results")]
    conversion.main(args)
    runs = tmp_path / "runs"
    assert set(conversion.seconds_of(runs)) == {name for name, _ in conversion.plan(4)}
    source = json.loads((checkpoint.latest_checkpoint(runs / "C-global-300") / "config.json").read_text())
    assert "F/ckpt-" in source["init_from"]["path"] and source["model"]["velocity"] == "global"
    assert checkpoint.latest_checkpoint(runs / "C-local-0").name == "ckpt-0000000"
    report = (tmp_path / "results" / "conversion.md").read_text()
    assert all(f"| {name} |" in report for name in ("F", "S-global", "C-local-0", "C-global-1200", "C-global-fo"))
    assert (tmp_path / "results" / "conversion.png").is_file()
    (tmp_path / "results" / "conversion.md").write_text(report + "\n## What it shows\n\nmy notes\n")
    lines = (runs / "times.txt").read_text()
    conversion.main(args + ["--report-only"])
    assert (runs / "times.txt").read_text() == lines
    assert (tmp_path / "results" / "conversion.md").read_text().endswith("## What it shows\n\nmy notes\n")


@pytest.mark.parametrize("level", [0, 1])
def test_the_speed_protocol_judges_and_times_every_point_once_and_reports_the_fronts(tmp_path, level):
    """experiments/speed.py (results/speed-level{0,1}.md) at a toy size: its models trained once (level 1 also the
    flat model converted), every point of both samplers judged and timed, on level 0 the splits of the two
    budgets; a second call trains and judges nothing and reports the same figures."""
    from experiments import speed
    args = ["--level", str(level), "--per-category", "1", "--batch", "2", "--repeat", "1", "--splits", "2",
            "--train-flags", "--size tiny --bridge-steps 5 --batch-size 8 --resolution 32 --max-steps 4 --val-every 0",
            "--out", str(tmp_path / "runs"), "--results", str(tmp_path / "results")]
    rows = speed.main(args)
    out = tmp_path / "runs" / f"level{level}"
    assert {r["model"] for r in rows} == ({"NAMI", "flat"} if level == 0 else {"NAMI", "flat", "conv"})
    assert {r["steps"] for r in rows if r["sampler"] == "flat"} == {str(n) for n in speed.FLAT_STEPS}
    assert {"2+2+2", "10+10+10"} <= {r["steps"] for r in rows if r["sampler"] == "nami"}
    assert all(r["s_per_image"] > 0 and 0 <= r["overall"] <= 1 for r in rows)
    report = (tmp_path / "results" / f"speed-level{level}.md").read_text()
    assert "## Verdict" in report and ("## The split" in report) == (level == 0)
    assert (tmp_path / "results" / f"speed-level{level}.png").is_file()
    if level == 1:
        source = json.loads((checkpoint.latest_checkpoint(out / "conv") / "config.json").read_text())["init_from"]
        assert "/flat/ckpt-" in source["path"]
    judged = {p.name: p.stat().st_mtime for p in (out / "judged").iterdir()}
    again = speed.main(args + ["--report-only"])
    assert {p.name: p.stat().st_mtime for p in (out / "judged").iterdir()} == judged
    assert sorted((r["name"], r["overall"], r["s_per_image"]) for r in again) == sorted(
        (r["name"], r["overall"], r["s_per_image"]) for r in rows)


def test_checkpoint_plot_draws_a_runs_log_and_names_what_is_missing(tmp_path):
    """`python -m training.checkpoint plot RUN`: loss per stage and images/s from log.jsonl (a killed run's torn
    last line left out) into RUN/log.png; a folder without a log is refused with what to give."""
    lines = [json.dumps({"step": s, "loss": 1.0 / s, "loss_stage1": 0.3 / s, "loss_stage2": 0.3 / s,
                         "loss_stage3": 0.4 / s, "images_per_s": 100.0}) for s in range(10, 60, 10)]
    (tmp_path / "log.jsonl").write_text("\n".join(lines) + '\n{"step": 60, "lo')
    r = subprocess.run([sys.executable, "-m", "training.checkpoint", "plot", str(tmp_path)], cwd=ROOT, capture_output=True,
                       text=True)
    assert r.returncode == 0 and (tmp_path / "log.png").stat().st_size > 5000, r.stderr
    r = subprocess.run([sys.executable, "-m", "training.checkpoint", "plot", str(tmp_path / "nowhere")], cwd=ROOT,
                       capture_output=True, text=True)
    assert r.returncode == 1 and "holds no log.jsonl" in r.stderr


def test_tensorboard_logs_what_log_jsonl_holds_and_the_sample_grids(tmp_path, encoder_dir):
    """train.py --tensorboard: the same numbers as log.jsonl (losses per stage, lr, images/s, the validation
    loss) and the stage mix as scalars, the sample grid as an image, in RUN/tensorboard."""
    pytest.importorskip("tensorboard")
    from conftest import tiny_run
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    out = tmp_path / "run"
    train.main(tiny_run(out, encoder_dir, max_steps=4, log_every=2, sample_every=4, tensorboard=True))
    board = EventAccumulator(str(out / "tensorboard")).Reload()
    tags = board.Tags()
    assert {"train/loss", "train/loss_stage1", "train/loss_stage3", "train/lr", "train/grad_norm",
            "train/images_per_s", "stage_mix/stage1"} <= set(tags["scalars"]) and tags["images"] == ["samples"]
    trained, validated = checkpoint.read_log(out), checkpoint.read_log(out, validation=True)
    assert [e.step for e in board.Scalars("train/loss")] == [r["step"] for r in trained] == [2, 4]
    assert [e.value for e in board.Scalars("train/loss")] == pytest.approx([r["loss"] for r in trained])
    assert [e.step for e in board.Scalars("val/val_loss_stage2")] == [r["step"] for r in validated] == [0, 4]
    assert [e.value for e in board.Scalars("val/val_loss")] == pytest.approx([r["val_loss"] for r in validated])


def test_tensorboard_without_the_package_is_refused_before_any_work(tmp_path, encoder_dir, monkeypatch):
    import importlib.util
    from conftest import tiny_run
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "tensorboard" else real(name, *a))
    with pytest.raises(ImportError, match="pip install tensorboard"):
        train.main(tiny_run(tmp_path / "run", encoder_dir, tensorboard=True))
    assert not (tmp_path / "run" / "log.jsonl").exists()


# ---------------------------------------------------------------------------------------------
# experiments/bench.py: the sampling benchmark (Table 2)
# ---------------------------------------------------------------------------------------------

def test_sampling_benchmark_times_every_stage_of_both_samplers(capsys):
    """experiments/bench.py's Table-2 path runs NAMI and flat in one process and reports one time per stage."""
    from experiments import bench
    r = bench.main(["--size", "tiny", "--res", "32", "--steps", "1,1,2", "--repeat", "2", "--warmup", "0", "--cfg", "1"])
    assert len(r["stages"]) == 3 and r["nami"] == pytest.approx(sum(r["stages"]))  # median of 2 = mean: adds up
    assert "| flat |" in capsys.readouterr().out
