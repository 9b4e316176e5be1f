"""A built-in labelled image set, generated offline: coloured shapes on textured backgrounds.

Used by ``make demo`` and the tests so that the whole pipeline runs on a fresh machine with no
download. Classes differ in shape and colour; position, size, background and noise vary per image.
"""
from __future__ import annotations

import random
from pathlib import Path

from PIL import Image, ImageDraw, ImageFilter

COLOURS = {"red": (220, 40, 40), "green": (40, 180, 60), "blue": (40, 70, 220)}
SHAPES = ("circle", "square", "triangle")
CLASS_NAMES = [f"{c} {s}" for s in SHAPES for c in COLOURS]


def render(class_name: str, rng: random.Random, size: int = 64) -> Image.Image:
    """One image of ``class_name`` ("red circle", ...), varied by ``rng``."""
    colour_name, shape = class_name.split()
    bg = tuple(rng.randint(90, 200) for _ in range(3))
    image = Image.new("RGB", (size, size), bg)
    draw = ImageDraw.Draw(image)
    for _ in range(6):  # background clutter
        x, y = rng.randint(0, size), rng.randint(0, size)
        draw.line((x, y, x + rng.randint(-20, 20), y + rng.randint(-20, 20)),
                  fill=tuple(rng.randint(60, 230) for _ in range(3)), width=2)
    r = rng.randint(size // 6, size // 3)
    cx, cy = rng.randint(r, size - r), rng.randint(r, size - r)
    colour = tuple(max(0, min(255, v + rng.randint(-25, 25))) for v in COLOURS[colour_name])
    if shape == "circle":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=colour)
    elif shape == "square":
        draw.rectangle((cx - r, cy - r, cx + r, cy + r), fill=colour)
    else:
        draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=colour)
    return image.filter(ImageFilter.GaussianBlur(rng.uniform(0, 0.8)))


def make_image_folder(root: str | Path, per_class: int = 30, size: int = 64, seed: int = 0) -> Path:
    """Write ``root/<class_name>/<index>.jpg`` for every class (spaces become underscores)."""
    root = Path(root)
    rng = random.Random(seed)
    for name in CLASS_NAMES:
        folder = root / name.replace(" ", "_")
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            render(name, rng, size).save(folder / f"{i:04d}.jpg", quality=90)
    return root
