"""Offline end-to-end demo (``make demo``): built-in images -> features -> few-shot comparison table.

Runs on a fresh machine with no download: it renders a small labelled image set
(`datamodules.synthetic`), embeds it with the tiny random-weight open_clip backbone (train views
averaged over augmented passes, as Tip-Adapter builds its cache), writes a feature file with a
zero-shot text classifier, and compares the training-free heads with ``evaluate.py``.
"""
from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path

import torch
from PIL import Image

import evaluate
from adapters.backbone import TINY_MODEL, FrozenCLIP
from adapters.protocol import few_shot_indices
from datamodules.features import write_feature_file
from datamodules.synthetic import CLASS_NAMES, make_image_folder


@torch.no_grad()
def embed(backbone: FrozenCLIP, paths: list[Path], transform, views: int = 1) -> torch.Tensor:
    """Mean of ``views`` passes of unnormalised embeddings per image, then L2-normalised."""
    images = [Image.open(p).convert("RGB") for p in paths]
    total = sum(backbone.encode_image(torch.stack([transform(im) for im in images]), normalize=False)
                for _ in range(views))
    return torch.nn.functional.normalize(total, dim=-1)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--run_dir", default="runs/demo", help="where the images, features and results go")
    p.add_argument("--per_class", type=int, default=40)
    args = p.parse_args(argv)
    run = Path(args.run_dir)
    torch.manual_seed(0)
    images = make_image_folder(run / "images", per_class=args.per_class)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        backbone = FrozenCLIP(TINY_MODEL, pretrained=None)
    paths, labels = [], []
    for y, name in enumerate(CLASS_NAMES):
        files = sorted((images / name.replace(" ", "_")).glob("*.jpg"))
        paths += files
        labels += [y] * len(files)
    labels = torch.tensor(labels)
    # a fixed train/val/test partition of the image set: 40% / 30% / 30% per class
    train_idx = few_shot_indices(labels, int(0.4 * args.per_class), seed=0)
    rest = torch.tensor(sorted(set(range(len(labels))) - set(train_idx.tolist())))
    val_idx = rest[few_shot_indices(labels[rest], int(0.3 * args.per_class), seed=0)]
    test_idx = torch.tensor(sorted(set(rest.tolist()) - set(val_idx.tolist())))
    splits = {}
    for name, idx, transform, views in [("train", train_idx, backbone.train_transform, 10),
                                        ("val", val_idx, backbone.eval_transform, 1),
                                        ("test", test_idx, backbone.eval_transform, 1)]:
        splits[name] = (embed(backbone, [paths[i] for i in idx], transform, views), labels[idx])
    text = backbone.zero_shot_classifier(CLASS_NAMES, ["a photo of a {}."])
    features = write_feature_file(run / "features.safetensors", splits, text_features=text,
                                  metadata={"dataset": "synthetic-shapes", **backbone.describe()},
                                  class_names=CLASS_NAMES)
    print(f"features: {features} (tiny random-weight backbone: accuracies only show the pipeline works)")
    return evaluate.main(["--features", str(features), "--shots", "4", "16",
                          "--output", str(run / "eval_results.json")])


if __name__ == "__main__":
    sys.exit(main())
