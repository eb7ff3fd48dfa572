"""An automatic judge for the built-in shapes world, in the manner of GenEval (paper Table 3), and
a Fréchet distance over features that need no download. experiments/eval.py is its command line.

The judge finds the objects in an image by colour and shape (`detect`) and decides whether they
satisfy the structured prompt the image was made from (`judge`), with GenEval's rules adapted to
this world. `evaluate` samples a fixed, seeded prompt set with a model and reports the accuracy
per category (single object, two objects, counting, colours, position, colour attribution), their
mean (GenEval's overall score), the accuracy on prompts that name a held-out colour-shape pair
(shapes.HELDOUT_PAIRS, never seen in training), and the Fréchet distance of the generated images
to real renders of the same prompts (`frechet_distance` over `features`).

    result = judge.evaluate(model, bridge, encoder, autoencoder, resolution)
with the five things `checkpoint.load_model(ckpt)` returns (the fifth, info, gives resolution
and steps).

Calibration (`python -m experiments.eval --calibrate 2000`, seed 2026): 100 % of the 12 000 real renders pass
at 32² and at 64² in every category, and 100 % of the renders broken one way (another colour,
another shape, an object left out, one too many, the two boxes of a position prompt swapped)
fail. At 24² (`--calibrate 1000 --res 24`) 100 % of the real renders pass and 99.9 % of the
broken ones fail. At 16² the objects are 3-6 px and counting passes only ~90 % of real renders:
judge 24² or larger.

World levels (shapes.LEVELS): the prompt set holds the categories of the checkpoint's level
(train.py --world-level; --level overrides), and "overall" is the mean over those categories:
two at level 1, five at level 2, GenEval's six at level 3. Each accuracy comes with its standard
error sqrt(p(1 − p)/n).

Block artefacts (`block_artefacts`): NAMI's stage jumps upsample by nearest neighbour, so a last
stage that does not sharpen what the jump made leaves 2×2-aligned blocks of one value. Of the
2×2 blocks at an edge (their 4×4 neighbourhood varies), the share that is constant inside is
measured on the aligned grid and on the grid shifted by one pixel; for real renders the two agree
(0.50 / 0.51 at 32² and 64²), for a nearest-neighbour upsampled image they are 1 and 0. evaluate()
reports both for the samples and for real renders of the same prompts, in pixels and, with a
VAE, in the latent space where the jumps happen.
"""
from __future__ import annotations

import copy
import functools
import time
from collections import deque
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

import nami
from common.images import grid, to_image, to_tensor
from toyworld import shapes

COLOR_NAMES = list(shapes.COLORS)
PALETTE = np.array([shapes.COLORS[c] for c in COLOR_NAMES], dtype=np.float64)  # (7, 3), 0..255

# Pixel labelling. A rendered pixel is a mix α·colour + (1 − α)·background (anti-aliasing), so a
# pixel is matched against each segment background -> palette colour, not against the colours
# alone: the rim of a yellow disc on black is (120, 110, 20), nearer to green than to yellow as a
# point, but on the yellow segment at α = 0.5.
MIN_ALPHA = 0.5        # at least half covered by the colour: the rest of the rim is background
MAX_RESIDUAL = 60.0    # distance (0..255 units) from the nearest segment; farther = washed out, no label
MIN_AREA = 0.005       # components below this fraction of the image are specks (5 px at 32², 20 at 64²)
CORE_ALPHA = 0.75      # a component's core: α at least this × its 90th-percentile α (split_touching)

# Shape from geometry of the component (shape_features): an upward triangle has only 1/4 of its
# pixels in the upper half of its box (disc and square: 1/2); a square fills its box (soft fill
# exactly 1), a disc π/4 ≈ 0.785. Measured on real renders (seed 7, 150 per category): top share
# of triangles ≤ 0.333 at 32², ≤ 0.294 at 64², of discs and squares ≥ 0.426; soft fill of discs
# ≤ 0.789, of squares 1.000. The thresholds sit halfway.
TRIANGLE_TOP = 0.38    # upper-half share below this: triangle
SQUARE_FILL = 0.89     # soft fill above this: square, else circle

# Position: the rule of shapes.satisfies (the generator's own) on the detected boxes, loosened by
# this much, since a detected box is the pixels' box, not the generator's (a triangle's drawn
# extent stops 7 % above its box's bottom; pixelation moves a centre by up to half a pixel).
# Unloosened, 98.7 % of 1000 real position renders pass at 32² (99.3 % at 64²); loosened, 100 %.
# A swap still fails: it reverses the sign of the offset along the axis.
POSITION_SLACK = 0.05

SEED = 2026  # the prompt set's seed: not training's 0 (the same prompts could appear, different images do)
HELDOUT_CATEGORIES = ("colors", "counting", "position", "color_attr")  # the ones whose prompt names the pair


@dataclass
class Detection:
    color: str
    shape: str
    box: tuple    # (x0, y0, x1, y1) as fractions of the image side, y downwards (as shapes.Shape.box)
    area: float   # fraction of the image the object covers


# ----------------------------------------------------------------------------------------------
# 1. Detection: background, pixel labels, connected components, shape
# ----------------------------------------------------------------------------------------------

def as_array(image) -> np.ndarray:
    """PIL image, (3, H, W) tensor in [−1, 1] or (H, W, 3) uint8 array -> (H, W, 3) float64 in 0..255."""
    if isinstance(image, Image.Image):
        arr = np.asarray(image.convert("RGB"), dtype=np.float64)
    elif isinstance(image, torch.Tensor):
        if image.ndim != 3 or image.shape[0] != 3:
            raise ValueError(f"detect() takes one (3, H, W) image tensor in [−1, 1], got shape {tuple(image.shape)}")
        x = torch.nan_to_num(image.detach().float().cpu(), nan=0.0).clamp(-1, 1)  # a diverged model's NaN: grey
        arr = ((x + 1) * 127.5).permute(1, 2, 0).numpy().astype(np.float64)
    elif isinstance(image, np.ndarray):
        if image.ndim != 3 or image.shape[2] != 3:
            raise ValueError(f"detect() takes an (H, W, 3) array in 0..255, got shape {image.shape}")
        arr = image.astype(np.float64)
    else:
        raise TypeError(f"detect() takes a PIL image, a (3, H, W) tensor or an (H, W, 3) array, not {type(image).__name__}")
    if arr.shape[0] == 0 or arr.shape[1] == 0:
        raise ValueError(f"detect() got an empty image ({arr.shape[1]}x{arr.shape[0]} pixels)")
    return arr


def background(arr: np.ndarray) -> np.ndarray:
    """The background colour: the per-channel median of the border pixels (objects keep a 3 %
    margin from the sides, so the border is background but for a few anti-aliased pixels)."""
    border = np.concatenate([arr[0], arr[-1], arr[:, 0], arr[:, -1]])  # (2H + 2W, 3)
    return np.median(border, axis=0)


BACKGROUND, UNLABELLED = -1, -2


def label_pixels(arr: np.ndarray, bg: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(labels (H, W), α (H, W, 7)). Labels: the palette index of each pixel's colour;
    BACKGROUND where the pixel is less than half covered by a colour; UNLABELLED where it lies
    on no segment bg -> colour (a washed-out or off-palette pixel). α: how far along each
    segment the pixel lies, 0 (background) to 1 (the colour): its coverage by that colour."""
    d = PALETTE - bg                                   # (7, 3): segment directions bg -> colour
    p = arr - bg                                       # (H, W, 3)
    norm2 = np.maximum((d * d).sum(-1), 1.0)           # a colour equal to the background is never matched
    alpha = np.clip(p @ d.T / norm2, 0.0, 1.0)         # (H, W, 7): position along each segment
    residual = np.linalg.norm(p[:, :, None, :] - alpha[..., None] * d, axis=-1)  # (H, W, 7)
    best = residual.argmin(-1)                         # (H, W): the nearest segment
    best_res = np.take_along_axis(residual, best[..., None], -1)[..., 0]
    best_alpha = np.take_along_axis(alpha, best[..., None], -1)[..., 0]
    labels = np.where(best_alpha >= MIN_ALPHA, best, BACKGROUND)
    return np.where(best_res <= MAX_RESIDUAL, labels, UNLABELLED), alpha


def components(labels: np.ndarray) -> list[tuple[int, np.ndarray, np.ndarray]]:
    """4-connected components of equal label (−1 skipped): (label, rows, cols) each. 4- not
    8-connected: two same-coloured objects 1 px apart may touch at a corner, not along a side."""
    H, W = labels.shape
    seen = labels < 0
    found = []
    for y0, x0 in zip(*np.nonzero(~seen)):
        if seen[y0, x0]:
            continue
        lab, rows, cols = labels[y0, x0], [], []
        seen[y0, x0] = True
        queue = deque([(y0, x0)])
        while queue:
            y, x = queue.popleft()
            rows.append(y)
            cols.append(x)
            for ny, nx in ((y - 1, x), (y + 1, x), (y, x - 1), (y, x + 1)):
                if 0 <= ny < H and 0 <= nx < W and not seen[ny, nx] and labels[ny, nx] == lab:
                    seen[ny, nx] = True
                    queue.append((ny, nx))
        found.append((int(lab), np.array(rows), np.array(cols)))
    return found


def split_touching(rows: np.ndarray, cols: np.ndarray, coverage: np.ndarray, min_px: float):
    """One component -> one or more objects: [(rows, cols)].

    Two objects of one colour drawn at the generator's 0.03 margin are less than a pixel apart
    at 32², so the anti-aliased pixel between them can be half covered and join them (circles
    touching at a point, triangles at a base corner). The pixels that join them are only partly
    covered: the component's core (α ≥ CORE_ALPHA × its 90th-percentile α, relative so that a
    washed-out colour still has a core) falls apart into one piece per object. Each core piece
    of at least min_px / 2 pixels seeds an object, and every other pixel of the component goes
    to the nearest seed (breadth-first within the component)."""
    H, W = coverage.shape
    a = coverage[rows, cols]
    core = np.full((H, W), -1)
    core[rows, cols] = np.where(a >= CORE_ALPHA * np.percentile(a, 90), 0, -1)
    pieces = [p for p in components(core) if len(p[1]) >= max(1, min_px / 2)]
    if len(pieces) < 2:
        return [(rows, cols)]
    owner = np.full((H, W), -2)
    owner[rows, cols] = -1                      # in the component, not yet assigned
    queue = deque()
    for k, (_, pr, pc) in enumerate(pieces):
        owner[pr, pc] = k
        queue.extend(zip(pr, pc))
    while queue:                                # multi-source breadth-first: nearest seed wins
        y, x = queue.popleft()
        for ny, nx in ((y - 1, x), (y + 1, x), (y, x - 1), (y, x + 1)):
            if 0 <= ny < H and 0 <= nx < W and owner[ny, nx] == -1:
                owner[ny, nx] = owner[y, x]
                queue.append((ny, nx))
    return [tuple(np.nonzero(owner == k)) for k in range(len(pieces))]


def dilate(mask: np.ndarray) -> np.ndarray:
    """mask grown by one pixel in all 8 directions."""
    m = np.pad(mask, 1)
    H, W = mask.shape
    return np.any([m[1 + dy:1 + dy + H, 1 + dx:1 + dx + W] for dy in (-1, 0, 1) for dx in (-1, 0, 1)], axis=0)


def shape_features(mask: np.ndarray, coverage: np.ndarray) -> tuple[float, float]:
    """(fill, top) of one component, mask (H, W) bool, coverage (H, W) the α of its colour.

    fill: soft area / (soft width × soft height), with coverage summed over the component and
      the ring of background pixels around it (the anti-aliased rim). Soft width = Σ over
      columns of the column's largest coverage. A box-filtered axis-aligned square has
      α(x, y) = cx(x)·cy(y), so its fill is exactly 1 at any size, where the pixel count of a
      small square with partial edges is not; a disc gives ≈ π/4, a triangle ≈ 1/2.
    top: share of the component's pixels in the upper half of their bounding box (a row cut by
      the midline counts in part): ≈ 1/4 for an upward triangle, 1/2 for a disc or a square."""
    rows, cols = np.nonzero(mask)
    w = np.where(mask | (dilate(mask) & (coverage < MIN_ALPHA)), coverage, 0.0)
    fill = w.sum() / max(w.max(0).sum() * w.max(1).sum(), 1e-9)
    mid = (rows.min() + rows.max() + 1) / 2
    top = np.clip(mid - rows, 0.0, 1.0).sum() / len(rows)
    return float(fill), float(top)


def classify(fill: float, top: float) -> str:
    if top < TRIANGLE_TOP:
        return "triangle"
    return "square" if fill > SQUARE_FILL else "circle"


def detect(image) -> list[Detection]:
    """The objects in an image (PIL RGB, (3, H, W) tensor in [−1, 1], or (H, W, 3) uint8 array),
    largest first."""
    arr = as_array(image)
    H, W = arr.shape[:2]
    labels, alpha = label_pixels(arr, background(arr))
    min_px = max(2, MIN_AREA * H * W)
    found = []
    for lab, comp_rows, comp_cols in components(labels):
        if len(comp_rows) < min_px:
            continue
        # the rim may be only pixels not claimed by another colour: keep those out of the coverage
        coverage = np.where((labels == lab) | (labels < 0), alpha[..., lab], 0.0)
        for rows, cols in split_touching(comp_rows, comp_cols, coverage, min_px):
            if len(rows) < min_px:
                continue
            mask = np.zeros((H, W), bool)
            mask[rows, cols] = True
            box = (cols.min() / W, rows.min() / H, (cols.max() + 1) / W, (rows.max() + 1) / H)
            found.append(Detection(COLOR_NAMES[lab], classify(*shape_features(mask, coverage)),
                                   tuple(float(v) for v in box), len(rows) / (H * W)))
    return sorted(found, key=lambda d: -d.area)


# ----------------------------------------------------------------------------------------------
# 2. The judge: GenEval's rules on the structured prompt (shapes.Sample.prompt)
# ----------------------------------------------------------------------------------------------

def relation_holds(relation: str, a, b, slack: float = POSITION_SLACK) -> bool:
    """Is box a <relation> box b? shapes.satisfies's rule (the centres differ more along the axis
    than across it, and by at least 0.15) with every bound loosened by `slack`."""
    ax, ay, bx, by = (a[0] + a[2]) / 2, (a[1] + a[3]) / 2, (b[0] + b[2]) / 2, (b[1] + b[3]) / 2
    dx, dy = bx - ax, by - ay  # positive dx: a is left of b; positive dy: a is above b
    along = {"left of": dx, "right of": -dx, "above": dy, "below": -dy}[relation]
    across = abs(dy if relation in ("left of", "right of") else dx)
    return along > max(0.15 - slack, across - slack)


def matches(d: Detection, obj: dict) -> bool:
    return d.shape == obj["shape"] and (obj.get("color") is None or d.color == obj["color"])


def judge(detections: list[Detection], prompt: dict) -> bool:
    """Does the image satisfy the prompt? (GenEval's rules, adapted)
      single object, two objects: an object of each named shape exists;
      colours, colour attribution: an object of each named (colour, shape) exists;
      counting: exactly n objects of the shape (and of the colour, when the prompt names one);
      position: both (colour, shape) objects exist and the relation holds between the largest
        of each (GenEval compares its most confident detections). Extra objects are allowed
        everywhere but in counting, as in GenEval."""
    objects = prompt["objects"]
    if prompt.get("relation"):
        a, b = ([d for d in detections if matches(d, o)] for o in objects)
        return bool(a and b) and relation_holds(prompt["relation"], a[0].box, b[0].box)  # detections: largest first
    if objects[0].get("count"):
        return sum(matches(d, objects[0]) for d in detections) == objects[0]["count"]
    return all(any(matches(d, o) for d in detections) for o in objects)


# ----------------------------------------------------------------------------------------------
# 3. Fréchet distance over download-free features
# ----------------------------------------------------------------------------------------------

def features(images) -> np.ndarray:
    """(N, 68) features of images (N, 3, H, W) in [−1, 1] (or a list of PIL images), no download:
      48: the image average-pooled to 4×4 (layout and colours of the scene);
       9: the share of pixels unlabelled (washed out, off the palette), background, and of each
          palette colour (label_pixels);
       9: per channel, mean |∂x|, mean |∂y| and mean |Laplacian|, ×4 to weigh like the rest;
       2: sharpness, ×2: mean |Laplacian| / (mean |∂x| + mean |∂y|), and the share of the
          non-background pixels that are partly covered (0.15 < α < 0.85). Both are ratios, so
          they do not vary with how much of the image the objects cover: over real renders
          they vary little (1.55 ± 0.13 and 0.23 ± 0.08 at 32²), and blur moves them far (σ = 1
          px: 0.67 and 0.57), where the pooled pixels barely change."""
    if isinstance(images, (list, tuple)):
        images = torch.stack([to_tensor(im) if isinstance(im, Image.Image) else im for im in images])
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"features() takes images (N, 3, H, W), got shape {tuple(images.shape)}")
    x = torch.nan_to_num(images.detach().float().cpu()).clamp(-1, 1)  # (N, 3, H, W)
    pooled = F.adaptive_avg_pool2d(x, 4).flatten(1)                        # (N, 48)
    hist, mixed = [], []
    for im in x:
        arr = as_array(im)
        labels, alpha = label_pixels(arr, background(arr))
        hist.append(np.bincount(labels.ravel() + 2, minlength=len(COLOR_NAMES) + 2) / labels.size)  # −2, −1, colours
        best = alpha.max(-1)
        mixed.append(((best > 0.15) & (best < 0.85)).sum() / max((best > 0.15).sum(), 1))
    hist = torch.tensor(np.array(hist), dtype=torch.float32)               # (N, 9)
    mixed = torch.tensor(mixed, dtype=torch.float32)[:, None]              # (N, 1)

    def mean_abs(d):  # (N, 3); 0 where the image is too small to have that difference
        return d.abs().mean((2, 3)) if d.numel() else torch.zeros(len(x), 3)
    gx = mean_abs(x[..., :, 1:] - x[..., :, :-1])
    gy = mean_abs(x[..., 1:, :] - x[..., :-1, :])
    lap = mean_abs(4 * x[..., 1:-1, 1:-1] - x[..., :-2, 1:-1] - x[..., 2:, 1:-1] - x[..., 1:-1, :-2] - x[..., 1:-1, 2:])
    sharp = lap.sum(1, keepdim=True) / (gx + gy).sum(1, keepdim=True).clamp_min(1e-6)  # (N, 1); a flat image: 0
    return torch.cat([pooled, hist, 4 * gx, 4 * gy, 4 * lap, 2 * sharp, 2 * mixed], 1).double().numpy()


def frechet_distance(f1: np.ndarray, f2: np.ndarray) -> float:
    """FD = |μ1 − μ2|² + tr(Σ1 + Σ2 − 2(Σ1Σ2)^{1/2}) between Gaussians fitted to two feature sets
    (N1, D), (N2, D). tr((Σ1Σ2)^{1/2}) = tr((√Σ1 Σ2 √Σ1)^{1/2}): the symmetric form, whose
    eigenvalues are real and ≥ 0 (numpy's eigh; no scipy)."""
    f1, f2 = np.asarray(f1, np.float64), np.asarray(f2, np.float64)
    if f1.ndim != 2 or f2.ndim != 2 or f1.shape[1] != f2.shape[1] or min(len(f1), len(f2)) < 2:
        raise ValueError(f"frechet_distance() needs two sets of at least 2 feature vectors of one width, got "
                         f"{f1.shape} and {f2.shape}")
    mu1, mu2 = f1.mean(0), f2.mean(0)
    s1, s2 = np.cov(f1, rowvar=False), np.cov(f2, rowvar=False)
    w, v = np.linalg.eigh(s1)
    root1 = (v * np.sqrt(np.clip(w, 0, None))) @ v.T        # √Σ1
    m = root1 @ s2 @ root1
    tr_sqrt = np.sqrt(np.clip(np.linalg.eigvalsh((m + m.T) / 2), 0, None)).sum()
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * tr_sqrt)


# ----------------------------------------------------------------------------------------------
# 4. Calibration: real renders must pass, renders that break the prompt must fail
# ----------------------------------------------------------------------------------------------

BREAKS = ("color", "shape", "drop", "extra", "swap")


def break_sample(s: shapes.Sample, kind: str, rng: np.random.Generator) -> shapes.Sample | None:
    """A copy of s whose picture breaks its prompt in one way, or None where that kind does not apply:
      color: one object the prompt names a colour of gets another colour;
      shape: one object gets another shape (prompts without a count or relation);
      drop:  one object is left out (every prompt of two or more objects);
      extra: one more object of the counted kind in a free place (counting);
      swap:  the two boxes of a position prompt trade places."""
    s = copy.deepcopy(s)
    named = [o for o in s.prompt["objects"] if o.get("color")]
    if kind == "color" and named:
        obj = s.objects[int(rng.integers(len(s.objects)))]
        obj.color = str(rng.choice([c for c in shapes.COLORS if c != obj.color]))
    elif kind == "shape" and "relation" not in s.prompt and not s.prompt["objects"][0].get("count"):
        obj = s.objects[int(rng.integers(len(s.objects)))]
        obj.shape = str(rng.choice([k for k in shapes.SHAPES if k != obj.shape]))
    elif kind == "drop" and len(s.objects) > 1:
        s.objects.pop(int(rng.integers(len(s.objects))))
    elif kind == "extra" and s.prompt["objects"][0].get("count"):
        first = s.objects[0]
        side = first.box[2] - first.box[0]
        for _ in range(500):  # a free place with the generator's 0.03 margin, if the picture has one
            x0, y0 = rng.uniform(0.03, 0.97 - side, size=2)
            box = (x0, y0, x0 + side, y0 + side)
            if all(max(box[0], o.box[0]) >= min(box[2], o.box[2]) + 0.03 or max(box[1], o.box[1]) >= min(box[3], o.box[3]) + 0.03
                   for o in s.objects):
                s.objects.append(shapes.Shape(first.shape, first.color, tuple(float(v) for v in box)))
                break
        else:
            return None
    elif kind == "swap" and s.prompt.get("relation"):
        a, b = s.objects
        a.box, b.box = b.box, a.box
    else:
        return None
    return s


def calibrate(n: int, size: int = 32, seed: int = SEED, split: str = "train", level: int = 3,
              autoencoder=None) -> dict:
    """Pass rates of the judge on n real renders per category (of the world level) at size×size,
    and fail rates of each kind of broken render made from them (break_sample): {"size", "real":
    {cat: rate}, "n_real": n, "broken": {kind: rate}, "n_broken": {kind: count}, "misses": ["cat:
    caption" of each real render that failed]}. autoencoder: the real renders are judged after
    its encode -> decode round trip (what a perfect model in its latent space could draw)."""
    rng = np.random.default_rng([seed, size])
    real, broken, misses = {}, {k: [] for k in BREAKS}, []
    for cat in shapes.check_level(level):
        passed = []
        for i in range(n):
            s = shapes.make_sample(seed, i, split, cat)
            image = shapes.render(s, size)
            if autoencoder is not None:
                image = to_image(autoencoder.decode(autoencoder.encode(to_tensor(image)[None]))[0])
            ok = judge(detect(image), s.prompt)
            passed.append(ok)
            if not ok:
                misses.append(f"{cat}: {s.caption}")
            for kind in BREAKS:
                b = break_sample(s, kind, rng)
                if b is not None:
                    broken[kind].append(not judge(detect(shapes.render(b, size)), b.prompt))
        real[cat] = passed
    return {"size": size, "real": {c: float(np.mean(v)) for c, v in real.items()}, "n_real": n,
            "broken": {k: float(np.mean(v)) for k, v in broken.items() if v},
            "n_broken": {k: len(v) for k, v in broken.items()}, "misses": misses}


# ----------------------------------------------------------------------------------------------
# 5. Block artefacts: 2×2-aligned blocks of one value, left by the nearest-neighbour jumps
# ----------------------------------------------------------------------------------------------

PIXEL_TOL = 4.0    # 0..255 units: a 2×2 block whose channels vary less than this inside is constant
LATENT_TOL = 0.02  # the same for unit-variance latents (encoders.VAE normalises them)


def constant_share(x: torch.Tensor, tol: float, offset: int = 0, block: int = 2) -> float:
    """Of the block×block cells of the grid starting at `offset` whose neighbourhood (the cell and
    a one-pixel ring around it) varies by more than 4·tol — cells at an edge — the share whose own
    values vary by at most tol (max − min over the cell, largest over the channels). x: (N, C, H, W)."""
    x = x[..., offset:, offset:]
    H, W = x.shape[-2] // block * block, x.shape[-1] // block * block
    x = x[..., :H, :W].float()
    cell = F.max_pool2d(x, block) + F.max_pool2d(-x, block)                   # max − min per cell and channel
    xp = F.pad(x, (1, 1, 1, 1), mode="replicate")
    around = F.max_pool2d(xp, block + 2, block) + F.max_pool2d(-xp, block + 2, block)
    edge = around.amax(1) > 4 * tol                                          # (N, H/b, W/b)
    constant = cell.amax(1) <= tol
    return float((constant & edge).sum() / edge.sum().clamp_min(1))


def grid_contrast(x: torch.Tensor, cell: int = 2) -> float:
    """1 − (mean |difference| between neighbours inside a cell×cell cell of the aligned grid) /
    (mean |difference| between neighbours on either side of a cell border), rows and columns
    together. Needs no tolerance: near 0 where the grid leaves no trace (real images), 1 for a
    nearest-neighbour upsampled image, in between where a stage sharpened the jump only in part.
    cell = 2 × the VAE factor finds the jump's latent blocks in decoded images."""
    x = x.float()
    W, H = x.shape[-1] // cell * cell, x.shape[-2] // cell * cell
    dx, dy = (x[..., :, 1:W] - x[..., :, :W - 1]).abs(), (x[..., 1:H, :] - x[..., :H - 1, :]).abs()
    border = torch.arange(W - 1) % cell == cell - 1
    inside = torch.cat([dx[..., ~border].flatten(), dy[..., ~border[:H - 1], :].flatten()]).mean()
    across = torch.cat([dx[..., border].flatten(), dy[..., border[:H - 1], :].flatten()]).mean()
    return float(1 - inside / across.clamp_min(1e-12))


def block_artefacts(x: torch.Tensor, tol: float = PIXEL_TOL, cell: int = 2) -> dict:
    """{"aligned": share of constant edge cells on the 2×2 grid the jumps use, "shifted": the same
    on the grid shifted by one pixel, "excess": aligned − shifted, "grid": grid_contrast}. x:
    (N, C, H, W) images in [−1, 1] (tol then in 0..255 units) or latents (pass tol=LATENT_TOL).
    Real renders: excess ≈ 0 and grid ≈ 0; a nearest-neighbour upsampled image: aligned 1,
    excess and grid near 1. cell: the grid contrast's cell (2 × the VAE factor for decoded images)."""
    if tol == PIXEL_TOL:
        x = (x.float().clamp(-1, 1) + 1) * 127.5
    aligned, shifted = constant_share(x, tol, 0), constant_share(x, tol, 1)
    return {"aligned": aligned, "shifted": shifted, "excess": aligned - shifted, "grid": grid_contrast(x, cell)}


# ----------------------------------------------------------------------------------------------
# 6. The benchmark: a fixed prompt set, sampled, judged and compared with real renders
# ----------------------------------------------------------------------------------------------

def prompt_set(per_category: int = 50, seed: int = SEED, heldout: bool = True,
               level: int = 3) -> list[tuple[str, shapes.Sample]]:
    """[(split, Sample)]: per_category prompts of each category of the world level from the
    training pairs, then (heldout=True) per_category of each of those categories that names a
    held-out colour-shape pair. A category's prompts are the same at every level (level 0 draws them
    centred, as it trains)."""
    categories = shapes.check_level(level)
    items = [("train", shapes.make_sample(seed, i, "train", cat, level)) for cat in categories for i in range(per_category)]
    if heldout:
        items += [("heldout", shapes.make_sample(seed, i, "heldout", cat, level))
                  for cat in HELDOUT_CATEGORIES if cat in categories for i in range(per_category)]
    return items


def later_stage_start(clean, from_stage: int, eps, windows, bridge):
    """nami.generate's start for the diagnostic `python -m experiments.eval --from-stage k`: (k, x̂_s), stage k
    starting at the clean latents' training start point (Algorithm 1, lines 7-13), so that stages k..K alone
    make the image."""
    K = len(windows)
    if not 1 < from_stage <= K or clean is None or clean.shape != eps.shape:
        raise ValueError(f"from_stage={from_stage} needs 2 ≤ from_stage ≤ {K} stages of the NAMI sampler "
                         f"and clean latents of shape {tuple(eps.shape)}")
    x_k, eps_k = nami.image_pyramid(clean.to(eps.device), K)[from_stage - 1], nami.noise_pyramid(eps, K)[from_stage - 1]
    return from_stage, nami.stage_points(x_k, eps_k, from_stage, windows, bridge)[0]


@torch.no_grad()
def generate_images(model, bridge, encoder, autoencoder, captions, seeds, resolution, steps, guidance=nami.DEFAULT_GUIDANCE,
                    flat=False, batch_size=64, from_stage=1, reals=None, latents=None) -> torch.Tensor:
    """Captions -> decoded images (N, 3, H, W) in [−1, 1] on the CPU, batch_size prompts at a time
    (steps: Euler steps per stage, as evaluate resolved them). from_stage > 1: start that stage
    from the real images `reals` (N, 3, H, W) instead of noise (nami.generate's diagnostic).
    latents: a list that receives the undecoded final latents, batch by batch."""
    w, h = (resolution, resolution) if isinstance(resolution, int) else resolution
    f = autoencoder.factor
    device = next(model.parameters()).device
    out = []
    for i in range(0, len(captions), batch_size):
        clean = None if reals is None else autoencoder.encode(reals[i:i + batch_size].to(device))
        start = None if from_stage == 1 else functools.partial(later_stage_start, clean, from_stage)
        x = nami.generate(model, encoder, captions[i:i + batch_size], seeds[i:i + batch_size], h // f, w // f, steps,
                          guidance, bridge=bridge, flat=flat, start=start)[-1]
        if latents is not None:
            latents.append(x.float().cpu())
        out.append(autoencoder.decode(x).float().cpu())
    return torch.cat(out)


def real_renders(items: list[tuple[str, shapes.Sample]], width: int, height: int) -> torch.Tensor:
    """The generator's own images of the prompts, (N, 3, height, width) in [−1, 1] (not square: the
    scene in the centre square, shapes.render's aspect)."""
    side = min(width, height)
    return torch.stack([to_tensor(shapes.render(s, side, aspect=width / height).resize((width, height), Image.BOX))
                        for _, s in items])


def centre_square(image: torch.Tensor) -> torch.Tensor:
    """The centred square of an image (C, H, W): where shapes.render puts the scene of a wider or
    taller picture, so that the judge reads it as it reads a square one."""
    h, w = image.shape[-2:]
    side = min(h, w)
    return image[..., (h - side) // 2:(h - side) // 2 + side, (w - side) // 2:(w - side) // 2 + side]


def standard_error(p: float, n: int) -> float:
    """Of an accuracy p measured on n prompts: sqrt(p(1 − p)/n)."""
    return float(np.sqrt(p * (1 - p) / n)) if n else float("nan")


def score(images: torch.Tensor, items: list[tuple[str, shapes.Sample]], level: int = 3, reals=None) -> dict:
    """Judge each image against its prompt and compare all images with real renders of the same
    prompts (Fréchet distance, block artefacts); the numbers of evaluate(). The categories (and
    the overall mean) are those of the world level. reals: the real renders, if already made."""
    if len(images) != len(items):
        raise ValueError(f"{len(images)} images for {len(items)} prompts")
    size = tuple(images.shape[-2:])
    records = []
    for im, (split, s) in zip(images, items):
        dets = detect(centre_square(im))
        records.append({"caption": s.caption, "category": s.category, "split": split, "passed": judge(dets, s.prompt),
                        "shapes": sorted({o["shape"] for o in s.prompt["objects"]}),
                        "detections": [asdict(d) for d in dets]})

    def accuracy(split, cat):
        got = [r["passed"] for r in records if r["split"] == split and r["category"] == cat]
        return {"accuracy": float(np.mean(got)), "n": len(got), "se": standard_error(np.mean(got), len(got))} \
            if got else None

    def mean_of(accuracies):  # the mean of independent accuracies and its standard error
        return (float(np.mean([a["accuracy"] for a in accuracies])),
                float(np.sqrt(sum(a["se"] ** 2 for a in accuracies)) / len(accuracies)))

    cats = {c: accuracy("train", c) for c in shapes.check_level(level)}
    held = {c: a for c in HELDOUT_CATEGORIES if (a := accuracy("heldout", c))}
    overall = mean_of(list(cats.values())) if all(cats.values()) else (None, None)
    result = {"categories": cats, "level": level, "overall": overall[0], "overall_se": overall[1],
              "heldout": {"accuracy": mean_of(list(held.values()))[0], "se": mean_of(list(held.values()))[1],
                          "n": sum(a["n"] for a in held.values()), "categories": held} if held else None}
    result["by_shape"] = by_shape(records)
    reals = real_renders(items, size[1], size[0]) if reals is None else reals
    result["fd"] = frechet_distance(features(images), features(reals)) if len(items) >= 2 else None
    result["blocks"] = {"samples": block_artefacts(images), "real": block_artefacts(reals)}
    result["samples"] = records
    return result


def by_shape(records: list[dict]) -> dict:
    """{shape: {"accuracy", "n", "se"}} over the training-pair prompts that name one kind of shape:
    which shape a model fails (a square drawn with round or slanted sides is read as a circle)."""
    result = {}
    for shape in shapes.SHAPES:
        got = [r["passed"] for r in records if r["split"] == "train" and r["shapes"] == [shape]]
        if got:
            result[shape] = {"accuracy": float(np.mean(got)), "n": len(got), "se": standard_error(np.mean(got), len(got))}
    return result


def evaluate(model, bridge, encoder, autoencoder, resolution, per_category: int = 50, steps=None,
             guidance: float = nami.DEFAULT_GUIDANCE, seed: int = SEED, flat: bool = False, heldout: bool = True,
             batch_size: int = 64, return_images: bool = False, from_stage: int = 1, level: int = 3) -> dict:
    """Sample the prompt set with the model and score it. resolution: pixels, an int or (W, H)
    (checkpoint.load_model's info["resolution"]); steps: Euler steps per stage (default 30 in all,
    10 each for K = 3; flat=True runs their sum in one window). Noise seed of prompt j is j. Returns
    {"categories": {cat: {"accuracy", "n"}}, "overall": mean of the six accuracies,
     "heldout": {"accuracy": mean over its categories, "n", "categories"}, "fd": float,
     "samples": [per prompt: caption, category, split, passed, detections], "settings": {...},
     "blocks": block artefacts of samples and real renders (and of their latents with a VAE),
     "seconds": sampling time} (+ "images": (N, 3, H, W) tensor if return_images).
    level: the world level whose categories are judged (shapes.LEVELS).
    from_stage=k > 1: stages 1..k−1 are not sampled; stage k starts from the real render of each
    prompt, noised as in training — which stage loses the prompt? (a diagnostic, not a score)."""
    items = prompt_set(per_category, seed, heldout, level)
    steps = list(steps or nami.default_steps(model.cfg.num_stages))
    w, h = (resolution, resolution) if isinstance(resolution, int) else resolution
    reals = real_renders(items, w, h)
    latents = []
    t0 = time.perf_counter()
    images = generate_images(model, bridge, encoder, autoencoder, [s.caption for _, s in items],
                             list(range(len(items))), resolution, steps, guidance, flat, batch_size, from_stage,
                             reals if from_stage > 1 else None, latents)
    seconds = time.perf_counter() - t0
    result = score(images, items, level, reals)
    if autoencoder.factor > 1:  # the jumps happen in the latent space: look for blocks there, and for
        # the latent blocks decoded, cells of 2 × factor pixels, in the images
        device, cell = next(model.parameters()).device, 2 * autoencoder.factor
        real_latents = torch.cat([autoencoder.encode(r.to(device)).cpu() for r in reals.split(256)])
        result["blocks"]["samples"] = block_artefacts(images, cell=cell)
        result["blocks"]["real"] = block_artefacts(reals, cell=cell)
        result["blocks"]["real_through_vae"] = block_artefacts(
            torch.cat([autoencoder.decode(z.to(device)).cpu() for z in real_latents.split(256)]), cell=cell)
        result["blocks"]["latent_samples"] = block_artefacts(torch.cat(latents), LATENT_TOL)
        result["blocks"]["latent_real"] = block_artefacts(real_latents, LATENT_TOL)
    result["settings"] = {"per_category": per_category, "seed": seed, "steps": steps, "guidance": guidance,
                          "sampler": "flat" if flat or model.cfg.num_stages == 1 else "nami",
                          "resolution": list(images.shape[-2:][::-1]), "from_stage": from_stage, "level": level}
    result["seconds"] = seconds
    if return_images:
        result["images"] = images
    return result


# ----------------------------------------------------------------------------------------------
# 7. Output: the table, the JSON, a grid of samples framed green (pass) or red (fail)
# ----------------------------------------------------------------------------------------------

def table(result: dict) -> str:
    """Markdown table like the paper's Table 3: one row per category, overall, held-out pairs."""
    def cell(a):
        return f"{a['accuracy']:.3f} ± {a['se']:.3f}" if "se" in a else f"{a['accuracy']:.3f}"
    lines = ["| category | n | accuracy ± s.e. |", "|---|---:|---:|"]
    cats = result["categories"]
    for cat, a in cats.items():
        lines.append(f"| {cat} | {a['n']} | {cell(a)} |" if a else f"| {cat} | 0 | – |")
    overall = "–" if result["overall"] is None else f"**{result['overall']:.3f}**" + (
        f" ± {result['overall_se']:.3f}" if result.get("overall_se") is not None else "")
    count = {2: "two", 5: "five", 6: "six"}.get(len(cats), len(cats))
    lines.append(f"| **overall** (mean of the {count}) | {sum(a['n'] for a in cats.values() if a)} | {overall} |")
    held = result.get("heldout")
    if held:
        parts = ", ".join(f"{c} {a['accuracy']:.2f}" for c, a in held["categories"].items())
        lines.append(f"| held-out pairs ({parts}) | {held['n']} | {cell(held)} |")
    if result.get("by_shape"):
        lines.append("| by the shape a prompt names: " + ", ".join(
            f"{shape} {a['accuracy']:.2f}" for shape, a in result["by_shape"].items()) +
            f" | {sum(a['n'] for a in result['by_shape'].values())} | |")
    fd = result.get("fd")
    lines.append("")
    lines.append(f"Fréchet distance to real renders of the same prompts: {fd:.4f}" if fd is not None else
                 "Fréchet distance: needs at least 2 prompts")
    blocks = result.get("blocks")
    if blocks:
        lines.append("Block artefacts (share of constant 2×2 edge cells, aligned grid / shifted grid, equal for real "
                     "renders; grid contrast, about 0 for real renders, 1 for nearest-neighbour blocks): " +
                     "; ".join(f"{name.replace('_', ' ')} {b['aligned']:.3f} / {b['shifted']:.3f}, {b['grid']:.3f}"
                               for name, b in blocks.items()))
    return "\n".join(lines)


def sample_grid(images: torch.Tensor, records: list[dict], per_row: int = 8, zoom: int = 64) -> Image.Image:
    """One row per category in the table's order (then the held-out categories), its first
    per_row images, each framed green where the judge passed it and red where it did not."""
    rows = {}
    for i, r in enumerate(records):
        rows.setdefault((r["split"], r["category"]), []).append(i)
    tiles = []
    for indices in rows.values():
        for j in range(per_row):
            framed = Image.new("RGB", (zoom + 6, zoom + 6), (255, 255, 255))  # blank where a row is short
            if j < len(indices):
                i = indices[j]
                framed.paste((40, 190, 60) if records[i]["passed"] else (220, 30, 30), (0, 0, zoom + 6, zoom + 6))
                framed.paste(to_image(images[i]).resize((zoom, zoom), Image.NEAREST), (3, 3))
            tiles.append(framed)
    return grid(tiles, ncols=per_row)
