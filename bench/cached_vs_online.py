"""Training on cached features vs the same epochs through the image encoder, same process.

DAC on 16 shots of the 10 CIFAR-10 classes in ../shared/data/cifar10-test-jpg (160 images):
online, `ImageShardDataModule` streams the images and every step runs the frozen encoder; cached,
`FeatureDataModule` reads their pre-extracted features. Same backbone (ViT-B-32, random weights:
speed does not depend on them), epochs, batch size and optimiser; only the time inside training
epochs is counted (a callback), not start-up. Prints seconds per epoch of both and their ratio.

    python -m bench.cached_vs_online [--model ViT-B-32] [--epochs 2]
"""
from __future__ import annotations

import argparse
import tempfile
import time
import warnings
from pathlib import Path

import lightning as L

from adapters.backbone import FrozenCLIP
from adapters.dac import DACAdapter
from bench import report
from datamodules.feature_file import write_feature_file
from datamodules.features import FeatureDataModule
from datamodules.images import ImageShardDataModule
from datamodules.shards import from_folder, write_shards

DEFAULT_IMAGES = Path(__file__).resolve().parents[1].parent / "shared/data/cifar10-test-jpg"


class EpochTimer(L.Callback):
    def __init__(self):
        self.seconds = []

    def on_train_epoch_start(self, trainer, pl_module):
        self._start = time.perf_counter()

    def on_train_epoch_end(self, trainer, pl_module):
        self.seconds.append(time.perf_counter() - self._start)


def fit(model, dm, epochs: int) -> tuple[float, int]:
    """(seconds per epoch, samples per epoch)."""
    timer = EpochTimer()
    trainer = L.Trainer(max_epochs=epochs, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                        callbacks=[timer])
    trainer.fit(model, datamodule=dm)
    samples = trainer.num_training_batches * dm.batch_size
    return sum(timer.seconds) / len(timer.seconds), samples


def main() -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--images_dir", default=str(DEFAULT_IMAGES))
    p.add_argument("--model", default="ViT-B-32")
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--shots", type=int, default=16)
    p.add_argument("--json", help="also write the result here")
    args = p.parse_args()
    L.seed_everything(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        backbone = FrozenCLIP(args.model, pretrained=None)
    records, names = from_folder(args.images_dir)
    with tempfile.TemporaryDirectory() as tmp:
        write_shards(records, names, Path(tmp) / "shards", max_count=100, progress=False, dataset="cifar10")
        online = ImageShardDataModule(str(Path(tmp) / "shards"), shots=args.shots, batch_size=32, num_workers=2,
                                      augment=False)
        online.set_transforms(backbone.train_transform, backbone.eval_transform)
        # the cached features of exactly these images, embedded by the model (extraction is not timed)
        embedder = DACAdapter(num_classes=len(names), backbone=args.model, dataset="cifar10")
        embedder.use_backbone(backbone)
        train = embedder.embed_split(online.head_data()[0])
        path = write_feature_file(Path(tmp) / "features.safetensors", {"train": (train.features, train.labels)},
                                  metadata={"backbone": args.model, "dataset": "cifar10"}, class_names=names)
        cached = FeatureDataModule(str(path), shots=None, batch_size=32, val_split=None, test_split=None)

        def model():
            m = DACAdapter(num_classes=len(names), backbone=args.model, dataset="cifar10")
            return m

        online_model = model()
        online_model.use_backbone(backbone)
        online_s, online_n = fit(online_model, online, args.epochs)
        cached_s, cached_n = fit(model(), cached, args.epochs)
    # per sample: the streamed epoch may hold fewer samples (see ImageShardDataModule's epoch rule)
    ratio = (online_s / online_n) / (cached_s / min(cached_n, len(train)))
    out = {"name": f"DAC training time per sample, {args.shots}-shot CIFAR-10 ({len(train)} images), "
                   f"{args.model}, CPU",
           "online_s_per_epoch": round(online_s, 3), "online_samples_per_epoch": online_n,
           "cached_s_per_epoch": round(cached_s, 4), "cached_samples_per_epoch": min(cached_n, len(train)),
           "ratio": round(ratio, 1), "command": "python -m bench.cached_vs_online"}
    return report(out, args.json)


if __name__ == "__main__":
    main()
