"""The authors' release (training/release.py): its Euler grid against the numbers of its scheduler,
its file layout (BridgeFlow's bridge_flow.bin) and sampling with released weights end to end. The
weights are tiny random models in the release's layout (conftest.released_dir): none can be
downloaded here. The converted transformer against diffusers' FLUX is in test_nami.py.

    python -m pytest -q tests/test_release.py         # about 20 s
"""
from __future__ import annotations

import math

import pytest
import torch
from PIL import Image

import nami
from training import release


def release_scheduler_grids(n, stage_range=(0, 1 / 3, 2 / 3, 1), gamma=1 / 3, N=1000):
    """The release's per-stage (σ, t) for n steps, from the formulas of its scheduler (release
    src/scheduling_flow_matching.py: a float32 table t = N … 1, windows with corrected starts, the τ
    axis split ∝ window lengths, K_k-entry stage tables, then numpy linspaces of n)."""
    import numpy as np
    table_t = torch.arange(N, 0, -1, dtype=torch.float32)
    table_sigma = table_t / N
    table_t = table_sigma * N
    lengths = []
    for i in range(3):
        s = table_sigma[int(stage_range[i] * N)].item()
        e = table_sigma[int(stage_range[i + 1] * N)].item() if int(stage_range[i + 1] * N) < N else 0.0
        if i > 0:
            o = 1 - s
            s = 1 - o * (1 / (math.sqrt(1 + 1 / gamma) * (1 - o) + o))
        lengths.append(s - e)
    ratios = [0.0, lengths[0] / sum(lengths), (lengths[0] + lengths[1]) / sum(lengths), 1.0]
    grids = []
    for i in range(3):
        t_max, t_min = table_t[int(ratios[i] * N)].item(), table_t[min(int(ratios[i + 1] * N), N - 1)].item()
        K = int(t_max - t_min)
        stage_t, stage_sigma = np.linspace(t_max, t_min, K + 1)[:-1], np.linspace(1, 0, K + 1)[:-1]
        sigma = np.append(np.linspace(stage_sigma[0], stage_sigma[-1], n), 0.0)
        grids.append((sigma, np.linspace(stage_t[0], stage_t[-1], n)))
    return grids


def test_release_grid_equals_the_release_schedulers_numbers():
    """docs/method.md §6: t' = [linspace(1, 1/K_k, n), 0] and τ = t/1000, t = linspace(t_max, t_min + 1, n),
    with (t_max, t_min) = (1000, 744), (744, 386), (386, 1) and K_k = 256, 358, 385 for 1:1:1."""
    assert release.stage_tables() == [(1000.0, 744.0), (744.0, 386.0), (386.0, 1.0)]
    grids = release.grids([10, 10, 10])
    # the release's numbers for 10+10+10 (its scheduler, printed): t' and t at every step
    assert grids[0].t == pytest.approx([1, .889323, .778646, .667969, .557292, .446615, .335938, .225260, .114583,
                                        .003906, 0], abs=1e-6)
    assert [1000 * tau for tau in grids[0].tau] == pytest.approx(
        [1000, 971.6667, 943.3333, 915, 886.6667, 858.3333, 830, 801.6667, 773.3333, 745], abs=1e-4)
    assert [1000 * tau for tau in grids[2].tau] == pytest.approx(
        [386, 343.3333, 300.6667, 258, 215.3333, 172.6667, 130, 87.3333, 44.6667, 2], abs=1e-4)
    for k, K in enumerate((256, 358, 385)):  # nine steps of (1 − 1/K)/9, then one of 1/K
        dt = [a - b for a, b in zip(grids[k].t[:-1], grids[k].t[1:])]
        assert dt[:9] == pytest.approx([(1 - 1 / K) / 9] * 9, abs=1e-12) and dt[9] == pytest.approx(1 / K, abs=1e-12)
    for n in (10, 7, 1):  # the formulas, for any step count
        for ours, (sigma, t) in zip(release.grids([n] * 3), release_scheduler_grids(n)):
            assert ours.t == pytest.approx(sigma.tolist(), abs=1e-12, rel=0)
            assert ours.tau == pytest.approx((t / 1000).tolist(), abs=1e-12, rel=0)
            assert len(ours.tau) == n and len(ours.t) == n + 1
    # not reproduced: the release rounds t to fp16 on its way to the sinusoid (pipeline_flux.py:464,
    # transformer_flux.py:455), at most 0.25 away from the t we give (971.5 for 971.667)
    for ours in grids:
        t = torch.tensor(ours.tau, dtype=torch.float64) * 1000
        seen = ((t.half() / 1000).half() * 1000).half().double()
        assert (seen - t).abs().max() <= 0.25
    # the release's grid on the flat sampler: one stage over the whole table, t = 1000 … 2
    (flat,) = nami.sampling_plan(nami.NamiConfig(), [4, 3, 3], flat=True, schedule=release.grids)[1]
    assert flat.tau[0] == 1.0 and flat.tau[-1] == pytest.approx(0.002) and flat.t[-2] == pytest.approx(1 / 999)


def test_released_bridgeflow_layout_loads_and_computes_w_up_plus_b(released_dir):
    """bridge_flow.bin keys scale (2,), shift.0 (1,C,H2,W2), shift.1 (1,C,H3,W3): x_s = W_k·Up(x_e) + B_k."""
    bridge = release.load_bridge(released_dir / "bridge_flow.bin", channels=4)
    raw = torch.load(released_dir / "bridge_flow.bin", weights_only=True)
    for k, size in ((2, 4), (3, 8)):
        x = torch.randn(2, 4, size, size)
        nearest = x.repeat_interleave(2, dim=-1).repeat_interleave(2, dim=-2)
        want = raw["scale"][k - 2] * nearest + raw[f"shift.{k - 2}"]
        assert torch.allclose(bridge(x, k), want, atol=1e-6)


def test_sample_with_released_weights_end_to_end(released_dir, tmp_path, capsys):
    """python sample.py --weights DIR on the release's layout: its text encoding, the transformer,
    BridgeFlow, the VAE decoder, the release's grid and prompts; bad folders are explained."""
    import sample
    out = tmp_path / "cat.png"
    sample.main(["a photo of a cat", "--weights", str(released_dir), "--res", "32x32", "--steps", "2,2,2",
                 "--out", str(out), "--show-stages"])
    printed = capsys.readouterr().out
    assert f"prompt: 'a photo of a cat{release.PROMPT_SUFFIX}'" in printed and release.NEGATIVE_PROMPT in printed
    assert "schedule: release" in printed and "stage 3:" in printed
    png = Image.open(out)
    assert png.text["cfg"] == "3.0" and png.text["resolution"] == "32x32" and png.text["schedule"] == "release"
    assert png.text["prompt"] == "a photo of a cat" and png.text["prompt_suffix"] == release.PROMPT_SUFFIX
    assert png.text["negative"] == release.NEGATIVE_PROMPT
    assert png.width > 2.5 * png.height  # the three stages side by side
    # the release's prompts off; an explicit negative prompt wins over the release's; our grid on request
    sample.main(["a cat", "--weights", str(released_dir), "--res", "32x32", "--steps", "1,1,1", "--out", str(out),
                 "--no-release-prompts", "--schedule", "uniform"])
    png = Image.open(out)
    assert (png.text["prompt_suffix"], png.text["negative"], png.text["schedule"]) == ("", "", "uniform")
    sample.main(["a cat", "--weights", str(released_dir), "--res", "32x32", "--steps", "1,1,1", "--out", str(out),
                 "--negative", "blurry"])
    assert Image.open(out).text["negative"] == "blurry"
    with pytest.raises(SystemExit, match="(?s)lacks.*bridge_flow.bin.*mclip/clip_text_encoder"):
        sample.main(["x", "--weights", str(tmp_path), "--out", str(out)])
    _, _, encoder, autoencoder, info = release.load(released_dir)
    assert info["resolution"] == (1024, 1024) and info["steps"] == [10, 10, 10] and info["cfg"] == 3.0
    assert info["dtype"] == "torch.float32"  # bf16 on a GPU only
    assert autoencoder.channels == 4 and autoencoder.factor == 2
