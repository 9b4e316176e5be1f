"""Offline end-to-end demo (``make demo``): images -> shards -> features -> DAC -> export -> evaluation.

Runs on a fresh machine with no download, in about a minute on 2 CPU cores:

1. render a small labelled image set (`datamodules.synthetic`: coloured shapes, 9 classes);
2. write webdataset shards with train/val/test splits (``python -m datamodules.shards``);
3. extract features with the tiny random-weight open_clip backbone (``train.py predict``), training
   images averaged over 10 augmented views as Tip-Adapter builds its cache;
4. train the DAC-style adapter on the cached features (``train.py fit``), which exports it;
5. compare the exported adapter with the training-free heads (``evaluate.py --adapter``).

The backbone has random weights, so the accuracies only show that the pipeline works.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from clip_adapters import evaluate, train
from datamodules import shards
from datamodules.synthetic import make_image_folder


def fresh_run_dir(base: Path) -> Path:
    """``base``, or ``base-2``, ``base-3``, ... : the first that does not exist or is empty. Running the
    demo again never writes over an earlier demo (a run directory is its user's record)."""
    candidate, n = base, 1
    while candidate.exists() and any(candidate.iterdir()):
        n += 1
        candidate = base.with_name(f"{base.name}-{n}")
    return candidate


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--run_dir", default=None,
                   help="where images, shards, features and the run go (default: runs/demo, or runs/demo-2, ... "
                        "when an earlier demo is there); must be new or empty")
    p.add_argument("--per_class", type=int, default=40, help="images per class")
    args = p.parse_args(argv)
    run = fresh_run_dir(Path("runs/demo")) if args.run_dir is None else Path(args.run_dir)
    if run.exists() and any(run.iterdir()):
        print(f"demo.py: error: --run_dir: {run} is not empty (an earlier run?); pass a new directory, or "
              "leave --run_dir out to get a fresh one", file=sys.stderr)
        return 2
    print(f"demo run directory: {run}")
    start = time.monotonic()

    def step(title: str) -> None:
        print(f"\n== {title} ({time.monotonic() - start:.0f}s)", flush=True)

    step("1/5 rendering the built-in image set")
    images = make_image_folder(run / "images", per_class=args.per_class)
    step("2/5 writing webdataset shards")
    if shards.main(["folder", str(images), "--out", str(run / "shards"), "--max_count", "40",
                    "--fractions", "train=0.4,val=0.3,test=0.3", "--dataset", "synthetic-shapes"]):
        return 2
    step("3/5 extracting features with the frozen backbone (train.py predict)")
    if train.main(["predict", "--config", "configs/extract.yaml", "--run_dir", str(run / "extract"),
                   "--data.init_args.shards", str(run / "shards"), "--data.init_args.num_workers", "0",
                   "--data.init_args.predict_splits", "[train,val,test]", "--data.init_args.views", "10"]):
        return 2
    step("4/5 training the DAC-style adapter on cached features (train.py fit)")
    if train.main(["fit", "--config", "configs/dac/demo.yaml", "--data", "configs/data/demo.yaml", "--run_dir", str(run / "dac"),
                   "--data.init_args.path", str(run / "extract" / "features")]):
        return 2
    step("5/5 evaluating the exported adapter against the training-free heads")
    status = evaluate.main(["--features", str(run / "extract" / "features"), "--shots", "16",
                            "--adapter", str(run / "dac" / "adapter"), "--output", str(run / "eval_results.json")])
    print(f"\ndone in {time.monotonic() - start:.0f}s. Run directory: {(run / 'dac').resolve()} "
          "(config.yaml, checkpoints/, logs/, adapter/)")
    return status


if __name__ == "__main__":
    sys.exit(main())
