"""Images and tensors: PIL RGB <-> (3, H, W) float tensors in [−1, 1] (the pixel-space convention of
the whole project), grids of images (sample.py's picture among them), and PNG files that record how
they were made.

Every script and module converts through these four functions, so a pixel means the same thing
in the data, the sampler, the judge and the pictures on disk.
"""
from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from PIL.PngImagePlugin import PngInfo


def to_tensor(img: Image.Image) -> torch.Tensor:
    """8-bit RGB image -> (3, H, W) float32 in [−1, 1]."""
    if img.mode != "RGB":
        raise ValueError(f"to_tensor expects an RGB image, got mode {img.mode}: convert it to RGB first "
                         "(folders.load_rgb does, with every conversion named)")
    x = torch.from_numpy(np.array(img, dtype=np.uint8))  # (H, W, 3)
    return x.permute(2, 0, 1).float() / 127.5 - 1


def to_image(x: torch.Tensor) -> Image.Image:
    """(3, H, W) in [−1, 1] -> PIL RGB (clamped)."""
    arr = ((x.detach().float().clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).cpu().numpy()
    return Image.fromarray(arr)


def grid(images, ncols: int | None = None, pad: int = 2) -> Image.Image:
    """A list of PIL images of one size -> one PIL image, ncols per row, on white."""
    n = len(images)
    ncols = ncols or math.ceil(math.sqrt(n))
    nrows = math.ceil(n / ncols)
    w, h = images[0].size
    canvas = Image.new("RGB", (ncols * (w + pad) + pad, nrows * (h + pad) + pad), (255, 255, 255))
    for i, im in enumerate(images):
        canvas.paste(im, (pad + (i % ncols) * (w + pad), pad + (i // ncols) * (h + pad)))
    return canvas


def sample_picture(decoded, size, zoom: int, ncols: int) -> Image.Image:
    """sample.py's picture: `decoded` holds one (n, 3, h, w) batch in [−1, 1] per stage shown; each
    image's stages side by side at `size` (W, H), the n images in a grid of at most ncols per row,
    zoomed `zoom` times (nearest neighbour)."""
    n, pictures = len(decoded[0]), []
    for i in range(n):
        row = [to_image(out[i]).resize(size, Image.NEAREST) for out in decoded]
        pictures.append(grid(row, ncols=len(row), pad=1) if len(row) > 1 else row[0])
    picture = grid(pictures, ncols=min(n, ncols)) if n > 1 else pictures[0]
    return picture.resize((picture.width * zoom, picture.height * zoom), Image.NEAREST)


def png_info(fields: dict) -> PngInfo:
    r"""PNG text chunks recording how a picture was made: one iTXt chunk (UTF-8) per field, so
    that any prompt is kept as typed, in any script, with emoji and control characters (tEXt
    holds Latin-1 only). The PNG specification allows no NUL in a text chunk, and readers in C
    stop at one, so a NUL is written as U+2400 "␀", the symbol for it: a prompt that had NULs
    comes back with value.replace("\u2400", "\0")."""
    meta = PngInfo()
    for key, value in fields.items():
        meta.add_itxt(key, str(value).replace("\0", "\u2400"))
    return meta


def save_png(picture: Image.Image, out: Path, meta: PngInfo | None = None):
    """Write to a temporary file beside `out`, then rename it: an earlier picture at `out` is
    replaced by a complete new one or kept, never left half-written."""
    out = Path(out)
    tmp = out.with_name(f".tmp-{out.name}")
    try:
        picture.save(tmp, format="PNG", pnginfo=meta)
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)


def pyplot():
    """matplotlib.pyplot drawing to files (the Agg backend), for the plotting commands; without matplotlib, an
    ImportError that says what to install (it is not needed to train or sample: requirements-test.txt has it)."""
    try:
        import matplotlib
    except ImportError:
        raise ImportError("the plots need matplotlib, which train.py and sample.py do not: pip install matplotlib "
                          "(or pip install -r requirements-test.txt)") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def save_figure(fig, path, title: str, dpi: int = 120, fontsize: int = 10) -> Path:
    """A matplotlib figure of the plotting commands, titled and laid out, to `path` (its folder made), then closed."""
    plt = pyplot()
    fig.suptitle(title, fontsize=fontsize)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return path
