"""Open Images -> training shards for IMO (the generic labelled set of methods-dac-imo.md §2.3).

Usage::

    python -m datamodules.openimages --labels oidv7-train-annotations-human-imagelabels.csv \\
        --classes oidv7-class-descriptions.csv --images DIR --out SHARDS \\
        [--label_policy single|multi] [--max_per_class 200] [--min_images 1] [--val_fraction 0.05]

Inputs are the files a user downloads from the Open Images site: image-level labels
(``ImageID,Source,LabelName,Confidence``), class descriptions (``LabelName,DisplayName``, with or
without a header) and a local folder of ``<ImageID>.jpg``. Only positive labels (Confidence 1) of
images present in the folder are kept. Label policy:

* ``single`` (the reference's): one label per image, the image's rarest positive class (so small
  classes keep their images); cross-entropy.
* ``multi``: every positive label, stored in the sample's ``json`` as ``labels`` (``cls`` is the
  first); train with ``loss: bce``.

``--max_per_class`` caps the images per class (the reference's folder name says "size200"; what it
meant was not recorded), chosen by ``--seed``. Shards go through `datamodules.shards.write_shards`, with
its ``dataset.json`` manifest and index.
"""
from __future__ import annotations

import argparse
import csv
import random
import sys
from collections import Counter, defaultdict
from collections.abc import Sequence
from pathlib import Path

from adapters.errors import ConfigError, UserError
from datamodules.shards import Record, write_shards


def read_classes(path: str | Path) -> dict[str, str]:
    """``LabelName -> DisplayName`` from the class-descriptions CSV (header optional)."""
    path = Path(path)
    try:
        with open(path, newline="") as f:
            rows = [r for r in csv.reader(f) if r]
    except OSError as e:
        raise ConfigError(f"{path}: cannot read class descriptions ({e.strerror})") from None
    if rows and rows[0][:2] == ["LabelName", "DisplayName"]:
        rows = rows[1:]
    if not rows or any(len(r) < 2 for r in rows):
        raise ConfigError(f"{path}: expected rows 'LabelName,DisplayName'")
    return {r[0]: r[1] for r in rows}


def read_positive_labels(path: str | Path, known: dict[str, str], min_confidence: float = 1.0) -> dict[str, list[str]]:
    """``ImageID -> [LabelName]`` of positive labels, in file order (streamed: the CSVs are large)."""
    path = Path(path)
    out: dict[str, list[str]] = defaultdict(list)
    try:
        with open(path, newline="") as f:
            reader = csv.DictReader(f)
            missing = {"ImageID", "LabelName", "Confidence"} - set(reader.fieldnames or [])
            if missing:
                raise ConfigError(f"{path}: missing columns {sorted(missing)} (expected ImageID,Source,LabelName,Confidence)")
            for n, row in enumerate(reader, 2):
                try:
                    confidence = float(row["Confidence"])
                except ValueError:
                    raise ConfigError(f"{path}:{n}: Confidence {row['Confidence']!r} is not a number") from None
                if confidence >= min_confidence and row["LabelName"] in known:
                    out[row["ImageID"]].append(row["LabelName"])
    except OSError as e:
        raise ConfigError(f"{path}: cannot read image-level labels ({e.strerror})") from None
    return out


def build_records(labels: dict[str, list[str]], classes: dict[str, str], images: str | Path, *,
                  label_policy: str = "single", max_per_class: int | None = None, min_images: int = 1,
                  val_fraction: float = 0.0, seed: int = 0) -> tuple[list[Record], list[str], dict[str, list[int]]]:
    """(records, class names, multi-label lists by image path) for the images present in ``images``."""
    if label_policy not in ("single", "multi"):
        raise ConfigError(f"label_policy: must be 'single' or 'multi', got {label_policy!r}")
    images = Path(images)
    if not images.is_dir():
        raise ConfigError(f"{images}: image folder not found")
    present = {p.stem: p for p in images.iterdir() if p.suffix.lower() in (".jpg", ".jpeg")}
    labels = {i: ls for i, ls in labels.items() if i in present}
    if not labels:
        raise ConfigError(f"{images}: none of the labelled ImageIDs has a <ImageID>.jpg here")
    frequency = Counter(name for names in labels.values() for name in set(names))
    names = sorted(name for name, n in frequency.items() if n >= min_images)
    index = {name: i for i, name in enumerate(names)}
    rng = random.Random(seed)
    by_class: dict[int, list[str]] = defaultdict(list)
    for image_id in sorted(labels):
        kept = [name for name in dict.fromkeys(labels[image_id]) if name in index]
        if kept:
            primary = min(kept, key=lambda name: (frequency[name], name))  # rarest class first
            by_class[index[primary]].append(image_id)
    chosen: list[tuple[str, int]] = []
    for label in sorted(by_class):
        ids = by_class[label]
        if max_per_class and len(ids) > max_per_class:
            ids = sorted(rng.sample(ids, max_per_class))
        chosen += [(i, label) for i in ids]
    rng.shuffle(chosen)
    n_val = round(val_fraction * len(chosen))
    records, multi = [], {}
    for k, (image_id, label) in enumerate(chosen):
        path = present[image_id]
        records.append(Record(path, label, "val" if k < n_val else "train"))
        multi[str(path)] = sorted({index[n] for n in labels[image_id] if n in index}, key=lambda y: (y != label, y))
    return records, [classes[name] for name in names], (multi if label_policy == "multi" else {})


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m datamodules.openimages", description=__doc__.split("\n\n")[0])
    p.add_argument("--labels", required=True, help="image-level labels CSV (ImageID,Source,LabelName,Confidence)")
    p.add_argument("--classes", required=True, help="class descriptions CSV (LabelName,DisplayName)")
    p.add_argument("--images", required=True, help="folder of <ImageID>.jpg")
    p.add_argument("--out", required=True)
    p.add_argument("--label_policy", choices=("single", "multi"), default="single")
    p.add_argument("--max_per_class", type=int, default=None)
    p.add_argument("--min_images", type=int, default=1, help="drop classes with fewer images")
    p.add_argument("--min_confidence", type=float, default=1.0)
    p.add_argument("--val_fraction", type=float, default=0.0, help="held-out share written as split 'val'")
    p.add_argument("--max_count", type=int, default=1000, help="samples per shard")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    try:
        classes = read_classes(args.classes)
        labels = read_positive_labels(args.labels, classes, args.min_confidence)
        records, names, multi = build_records(labels, classes, args.images, label_policy=args.label_policy,
                                              max_per_class=args.max_per_class, min_images=args.min_images,
                                              val_fraction=args.val_fraction, seed=args.seed)
        manifest = write_shards(records, names, args.out, max_count=args.max_count, seed=args.seed,
                                progress=sys.stderr.isatty(), dataset="openimages", multi_labels=multi or None)
    except (UserError, OSError) as e:
        print(f"datamodules.openimages: error: {e}", file=sys.stderr)
        return 2
    for split, entry in manifest["splits"].items():
        print(f"{split}: {entry['count']} images, {len(names)} classes, {len(entry['shards'])} shards")
    return 0


if __name__ == "__main__":
    sys.exit(main())
