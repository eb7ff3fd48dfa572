"""The built-in "shapes" world: a text-to-image data set that needs no download.

Images of 1-4 coloured circles, squares and triangles on a plain background of varied shade,
with captions from templates (with paraphrases) in GenEval's categories: single object, two
objects, counting, colours, position and colour attribution. Everything is deterministic by
(seed, index) and rendered on the fly at any size; each sample keeps the generator's own record
of what it drew (shape, colour, box) so that images can be checked against it.

HELDOUT_PAIRS lists the colour-shape pairs that are never drawn in training images (so never
named in a training caption): `split="heldout"` produces prompts that use them, to measure
generalisation to unseen combinations.

The world has four levels of difficulty (LEVELS); the held-out pairs stay out at every level:
  0  one object, centred, at half the side (CENTRED_SIZE): the prompts of level 1, the variety
     that a few minutes on a CPU can learn (the default run's world);
  1  one object anywhere, at 0.35-0.6 of the side: single object ("a photo of a triangle") and
     colours ("a red circle");
  2  + two objects, colour attribution and position;
  3  the full world, + counting. Level 3 is the world as it always was: the same (seed, index)
     gives the same sample as before levels existed, so earlier results stay valid.
Levels 1-3 are each a superset of the one below; level 0 draws level 1's captions with one
placement.

    python -m toyworld.shapes --n 16 --size 32 --out shapes_preview.png     # look at some samples
    python -m toyworld.shapes --level 0 --size 64                          # the default run's world
    python -m toyworld.shapes --level 1 --size 64                          # one object anywhere
    python -m toyworld.shapes --level 1 --split heldout --n 512 --size 64 --export data/heldout
                                  # an image folder (PNG + .txt captions) for train.py --data, e.g.
                                  # the held-out pairs a LoRA of the default run learns (docs/fine-tuning.md)
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass, field

import numpy as np
import torch
from PIL import Image, ImageDraw

from common.images import grid, to_tensor

COLORS = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (50, 90, 235),
    "yellow": (240, 220, 40),
    "purple": (150, 60, 200),
    "orange": (245, 140, 30),
    "white": (245, 245, 245),
}
SHAPES = ("circle", "square", "triangle")
PLURAL = {"circle": "circles", "square": "squares", "triangle": "triangles"}
NUMBERS = {2: "two", 3: "three", 4: "four"}
HELDOUT_PAIRS = (("red", "triangle"), ("blue", "circle"), ("yellow", "square"))
CATEGORIES = ("single_object", "two_object", "counting", "colors", "position", "color_attr")
# World levels: the categories a level draws from, in CATEGORIES' order (each level ⊃ the one below)
LEVELS = {0: ("single_object", "colors"),
          1: ("single_object", "colors"),
          2: ("single_object", "two_object", "colors", "position", "color_attr"),
          3: CATEGORIES}
CENTRED_SIZE = 0.5  # level 0: every object's side, as a fraction of the image side, in its centre
RELATIONS = {  # relation -> paraphrases; "A <rel> B" means A is on that side of B
    "left of": ("to the left of", "left of", "on the left of"),
    "right of": ("to the right of", "right of", "on the right of"),
    "above": ("above", "on top of", "over"),
    "below": ("below", "under", "beneath"),
}
PREFIXES = ("a photo of ", "an image of ", "a picture of ", "a drawing of ", "")
# Fixed prompts of each level for the sample grids written while training (none names a held-out pair)
EXAMPLE_PROMPTS = {
    0: ["a photo of a red circle", "a blue square", "a photo of a green triangle", "a yellow circle",
        "a purple square", "an orange triangle", "a photo of a white circle", "a photo of a triangle"],
    2: ["a photo of a red circle", "a blue square", "a photo of a green triangle", "a photo of a circle and a square",
        "a purple square to the left of an orange circle", "a white triangle above a blue square",
        "a yellow circle below a green triangle", "a photo of a red circle and a green square"],
    3: ["a photo of a red circle", "a blue square", "a photo of a green triangle", "three yellow circles",
        "a purple square to the left of an orange circle", "a white triangle above a blue square",
        "a photo of a circle and a square", "a photo of a red circle and a green square"],
}
EXAMPLE_PROMPTS[1] = EXAMPLE_PROMPTS[0]  # the same captions, drawn anywhere
SAMPLE_PROMPTS = EXAMPLE_PROMPTS[3]  # the full world's


def caption_words() -> set[str]:
    """Every word a caption of this world can use, from the templates' parts above (a checkpoint
    records the world's vocabulary from these, feed.vocabulary)."""
    phrases = [*COLORS, *SHAPES, *PLURAL.values(), *NUMBERS.values(), *map(str, NUMBERS), *PREFIXES, "a an and"]
    phrases += [phrase for paraphrases in RELATIONS.values() for phrase in paraphrases]
    return {word for phrase in phrases for word in phrase.split()}


@dataclass
class Shape:
    shape: str
    color: str
    box: tuple  # (x0, y0, x1, y1) as fractions of the image side, y downwards


@dataclass
class Sample:
    caption: str
    category: str
    objects: list = field(default_factory=list)   # the generator's record: list[Shape]
    background: float = 0.0                       # grey level in [0, 1]
    prompt: dict = field(default_factory=dict)    # the structured prompt the caption says


def allowed_colors(shape: str, split: str) -> list[str]:
    held = {c for c, s in HELDOUT_PAIRS if s == shape}
    if split == "train":
        return [c for c in COLORS if c not in held]
    return sorted(held)


def article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def noun_phrase(color: str | None, shape: str) -> str:
    words = f"{color} {shape}" if color else shape
    return f"{article(words)} {words}"


def _place(rng, sizes, relation=None, tries=200):
    """Boxes (fractions) for objects of the given sizes, not overlapping; for a relation the
    first object is placed clearly on that side of the second."""
    for _ in range(tries):
        boxes = []
        for s in sizes:
            x0, y0 = rng.uniform(0.03, 0.97 - s), rng.uniform(0.03, 0.97 - s)
            boxes.append((x0, y0, x0 + s, y0 + s))
        if any(_overlap(a, b) for i, a in enumerate(boxes) for b in boxes[i + 1:]):
            continue
        if relation is not None and not satisfies(relation, boxes[0], boxes[1]):
            continue
        return boxes
    return _place(rng, [0.85 * s for s in sizes], relation, tries)  # crowded: shrink and retry


def _overlap(a, b, margin=0.03):
    return not (a[2] + margin <= b[0] or b[2] + margin <= a[0] or a[3] + margin <= b[1] or b[3] + margin <= a[1])


def satisfies(relation: str, a, b) -> bool:
    """Is box a <relation> box b? The centres must differ more along that axis than across it."""
    ax, ay, bx, by = (a[0] + a[2]) / 2, (a[1] + a[3]) / 2, (b[0] + b[2]) / 2, (b[1] + b[3]) / 2
    dx, dy = bx - ax, by - ay  # positive dx: a is left of b; positive dy: a is above b
    return {"left of": dx, "right of": -dx, "above": dy, "below": -dy}[relation] > max(0.15, abs(dy if relation in ("left of", "right of") else dx))


def check_level(level: int) -> tuple:
    """The categories of a world level, or a ValueError naming the levels."""
    if level not in LEVELS:
        raise ValueError(f"world level {level!r} does not exist: choose one of {sorted(LEVELS)} (0 one object, "
                         "centred; 1 one object anywhere; 2 + two objects and positions; 3 the full world with counting)")
    return LEVELS[level]


def compose(category: str, rng, pick, prefix: str, held: bool):
    """What a sample of this category shows and says: ([(shape, colour)], caption, structured prompt,
    object sizes, relation or None). pick(held) draws a (shape, colour) pair from rng."""
    relation = None
    if category == "single_object":
        objs = [pick(held=held)]
        caption = prefix + noun_phrase(None, objs[0][0])
        prompt = {"objects": [{"shape": objs[0][0]}]}
        sizes = [rng.uniform(0.35, 0.6)]
    elif category == "colors":
        objs = [pick(held=held)]
        caption = prefix + noun_phrase(objs[0][1], objs[0][0])
        prompt = {"objects": [{"shape": objs[0][0], "color": objs[0][1]}]}
        sizes = [rng.uniform(0.35, 0.6)]
    elif category == "counting":
        n = int(rng.integers(2, 5))
        shape, color = pick(held=held)
        with_color = bool(rng.integers(2)) or held
        count = NUMBERS[n] if rng.random() < 0.8 else str(n)
        caption = prefix + f"{count} " + (f"{color} " if with_color else "") + PLURAL[shape]
        objs = [(shape, color)] * n
        prompt = {"objects": [{"shape": shape, "color": color if with_color else None, "count": n}]}
        sizes = [rng.uniform(0.2, 0.3)] * n
    else:  # two_object, position, color_attr: two objects of different kinds
        first = pick(held=held)
        second = pick()
        while second == first or (category == "two_object" and second[0] == first[0]):
            second = pick()
        objs = [first, second]
        sizes = list(rng.uniform(0.25, 0.4, size=2))
        if category == "two_object":
            caption = prefix + f"{noun_phrase(None, first[0])} and {noun_phrase(None, second[0])}"
            prompt = {"objects": [{"shape": first[0]}, {"shape": second[0]}]}
        elif category == "color_attr":
            caption = prefix + f"{noun_phrase(first[1], first[0])} and {noun_phrase(second[1], second[0])}"
            prompt = {"objects": [{"shape": s, "color": c} for s, c in objs]}
        else:
            relation = list(RELATIONS)[rng.integers(len(RELATIONS))]
            phrase = RELATIONS[relation][rng.integers(3)]
            caption = prefix + f"{noun_phrase(first[1], first[0])} {phrase} {noun_phrase(second[1], second[0])}"
            prompt = {"objects": [{"shape": s, "color": c} for s, c in objs], "relation": relation}
    return objs, caption, prompt, sizes, relation


def make_sample(seed: int, index: int, split: str = "train", category: str | None = None,
                level: int = 3) -> Sample:
    """The index-th sample of the world with this seed (the same (seed, index) -> the same sample).
    level: the world level (LEVELS) the category is drawn from when none is given; level 3 draws
    exactly as the world did before levels existed."""
    cats = check_level(level)
    if category is not None and category not in cats:
        raise ValueError(f"category {category!r} is not in world level {level} ({', '.join(cats)})")
    rng = np.random.default_rng([seed, index, 0 if split == "train" else 1])
    if category is None:
        category = cats[rng.integers(len(cats))]
    bg = float(rng.uniform(0.0, 0.4))

    def pick(held=False):
        """A (shape, colour) pair: a held-out pair if held, else any pair allowed in training."""
        if held:
            color, shape = HELDOUT_PAIRS[rng.integers(len(HELDOUT_PAIRS))]
            return shape, color
        shape = SHAPES[rng.integers(len(SHAPES))]
        colors = allowed_colors(shape, "train")
        return shape, colors[rng.integers(len(colors))]

    prefix = PREFIXES[rng.integers(len(PREFIXES))]
    objs, caption, prompt, sizes, relation = compose(category, rng, pick, prefix, split == "heldout")
    if level == 0:  # one object, centred, one size: what the default run's few minutes can learn
        low, high = (1 - CENTRED_SIZE) / 2, (1 + CENTRED_SIZE) / 2
        boxes = [(low, low, high, high)]
    else:
        boxes = _place(rng, sizes, relation)
    if rng.random() < 0.5 and relation is None:
        order = rng.permutation(len(objs))
        objs, boxes = [objs[i] for i in order], [boxes[i] for i in order]
    objects = [Shape(s, c, tuple(float(v) for v in b)) for (s, c), b in zip(objs, boxes)]
    return Sample(caption=caption, category=category, objects=objects, background=bg, prompt=prompt)


def render(sample: Sample, size: int = 32, supersample: int = 4, aspect: float = 1.0) -> Image.Image:
    """Draw the sample at size×size (drawn supersample× larger, then box-filtered: anti-aliased).
    aspect = width / height ≠ 1: a wider (or taller) picture of the same scene, the size×size square
    in its centre and its background on either side (size is the shorter side): non-square data
    for the aspect-ratio buckets that needs no download, judged on its centre square."""
    if aspect != 1.0:
        scene = render(sample, size, supersample)
        width, height = (round(size * aspect), size) if aspect > 1 else (size, round(size / aspect))
        grey = int(round(sample.background * 255))
        canvas = Image.new("RGB", (width, height), (grey, grey, grey))
        canvas.paste(scene, ((width - size) // 2, (height - size) // 2))
        return canvas
    big = size * supersample
    grey = int(round(sample.background * 255))
    img = Image.new("RGB", (big, big), (grey, grey, grey))
    draw = ImageDraw.Draw(img)
    for obj in sample.objects:
        x0, y0, x1, y1 = (v * big for v in obj.box)
        color = COLORS[obj.color]
        if obj.shape == "circle":
            draw.ellipse((x0, y0, x1, y1), fill=color)
        elif obj.shape == "square":
            inset = 0.08 * (x1 - x0)  # a square's area looks larger than a circle's: shrink it a bit
            draw.rectangle((x0 + inset, y0 + inset, x1 - inset, y1 - inset), fill=color)
        else:
            draw.polygon([((x0 + x1) / 2, y0), (x1, y1 - 0.07 * (y1 - y0)), (x0, y1 - 0.07 * (y1 - y0))], fill=color)
    return img.resize((size, size), Image.BOX)


def batch(seed: int, start: int, n: int, size: int = 32, split: str = "train", level: int = 3):
    """Samples start..start+n−1: images (n, 3, size, size) in [−1, 1] and their Sample records."""
    return batch_at(seed, range(start, start + n), size, split, level)


def batch_at(seed: int, indices, size: int = 32, split: str = "train", level: int = 3, aspect: float = 1.0):
    """The samples at these indices (any order): images (n, 3, size, size) in [−1, 1] and records
    (aspect ≠ 1: render's wider or taller pictures, size their shorter side)."""
    samples = [make_sample(seed, i, split, level=level) for i in indices]
    images = torch.stack([to_tensor(render(s, size, aspect=aspect)) for s in samples])  # (n, 3, H, W)
    return images, samples


def parse_aspect(text: str) -> float:
    """"2:1" (width:height) -> 2.0; ValueError saying what is expected."""
    try:
        w, h = (float(v) for v in str(text).split(":"))
    except ValueError:
        raise ValueError(f"an aspect ratio is width:height, e.g. 2:1 or 3:4, got {text!r}")
    if not (w > 0 and h > 0 and 1 / 4 <= w / h <= 4):
        raise ValueError(f"aspect {text}: width:height must be positive and between 1:4 and 4:1")
    return w / h


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=16)
    ap.add_argument("--size", type=int, default=32)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--split", choices=("train", "heldout"), default="train")
    ap.add_argument("--level", type=int, choices=sorted(LEVELS), default=3, help="world level (0, 1, 2 or 3)")
    ap.add_argument("--out", default="shapes_preview.png")
    ap.add_argument("--export", metavar="DIR", help="write the samples as DIR/NNNNNN.png + .txt captions instead")
    ap.add_argument("--shape", choices=SHAPES, help="only samples whose every object is this shape")
    ap.add_argument("--aspect", default="1:1", help="width:height, e.g. 2:1: the scene in the centre of a wider "
                    "picture (--size is its shorter side)")
    a = ap.parse_args()
    samples, index = [], 0
    while len(samples) < a.n:  # the world's samples in order, those of other shapes left out
        sample = make_sample(a.seed, index, a.split, level=a.level)
        index += 1
        if a.shape is None or all(o.shape == a.shape for o in sample.objects):
            samples.append(sample)
    if a.export:
        from pathlib import Path
        folder = Path(a.export)
        folder.mkdir(parents=True, exist_ok=True)
        for i, s in enumerate(samples):
            render(s, a.size, aspect=parse_aspect(a.aspect)).save(folder / f"{i:06d}.png")
            (folder / f"{i:06d}.txt").write_text(s.caption + "\n")
        raise SystemExit(f"wrote {a.n} images and captions to {folder}")
    for s in samples:
        print(f"{s.category:14s} {s.caption}")
    pictures = [render(s, a.size, aspect=parse_aspect(a.aspect)) for s in samples]
    grid([p.resize((p.width * 4, p.height * 4), Image.NEAREST) for p in pictures]).save(a.out)
    print(f"wrote {a.out}")
