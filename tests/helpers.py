"""Test helpers importable by spawned DDP processes (pytest test modules are not)."""
from __future__ import annotations

import json
from pathlib import Path

import lightning as L
import torch
from torch import nn
from torchvision import transforms as T

from datamodules.shards import from_folder, partition, write_shards
from datamodules.synthetic import make_image_folder

TRANSFORM = T.Compose([T.Resize((16, 16)), T.ToTensor()])


def make_shards(root: Path, per_class: int = 8, max_count: int = 8, fractions: dict | None = None, seed: int = 0) -> Path:
    """Synthetic shape images written as shards under ``root/shards``; returns that directory."""
    images = make_image_folder(root / "images", per_class=per_class, size=32, seed=seed)
    records, names = from_folder(images)
    if fractions:
        records = partition(records, fractions)
    write_shards(records, names, root / "shards", max_count=max_count, progress=False, dataset="shapes")
    return root / "shards"


class KeyRecorder(L.LightningModule):
    """Consumes image batches and writes, per rank and epoch, the sample keys it trained on."""

    def __init__(self, out_dir: str):
        super().__init__()
        self.out_dir = out_dir
        self.weight = nn.Parameter(torch.zeros(1))
        self.keys: list[str] = []

    def on_train_epoch_start(self) -> None:
        self.trainer.datamodule.set_epoch(self.current_epoch)
        self.keys = []

    def training_step(self, batch, batch_idx):
        self.keys.extend(batch["key"])
        return (self.weight * batch["image"].mean()).sum()

    def on_train_epoch_end(self) -> None:
        path = Path(self.out_dir) / f"rank{self.global_rank}-epoch{self.current_epoch}.json"
        path.write_text(json.dumps({"keys": self.keys, "batches": len(self.keys) // self.trainer.datamodule.batch_size}))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


class CrashAtStep(L.Callback):
    """Raise at a given global step, as if the job had died there."""

    def __init__(self, step: int):
        self.step = step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step >= self.step:
            raise RuntimeError(f"simulated crash at step {trainer.global_step}")


def make_openimages(root: Path, images_per_class: int = 8, seed: int = 0) -> dict[str, Path]:
    """Small Open Images-format inputs: class descriptions, image-level labels (positives, negatives and
    second labels) and ``<ImageID>.jpg`` files (synthetic shapes)."""
    import csv
    import random

    from datamodules.synthetic import CLASS_NAMES, render

    rng = random.Random(seed)
    images = root / "images"
    images.mkdir(parents=True, exist_ok=True)
    label_names = [f"/m/0{i:03d}" for i in range(len(CLASS_NAMES))]
    with open(root / "classes.csv", "w", newline="") as f:
        csv.writer(f).writerows(zip(label_names, CLASS_NAMES))
    with open(root / "labels.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["ImageID", "Source", "LabelName", "Confidence"])
        for c, name in enumerate(CLASS_NAMES):
            for i in range(images_per_class):
                image_id = f"{c:02d}{i:04d}abcdef"
                render(name, rng, 32).save(images / f"{image_id}.jpg")
                w.writerow([image_id, "verification", label_names[c], 1])
                w.writerow([image_id, "verification", label_names[(c + 1) % len(CLASS_NAMES)], 0])  # negative
                if i % 4 == 0:
                    w.writerow([image_id, "crowdsource", label_names[(c + 3) % len(CLASS_NAMES)], 1])  # second label
    return {"labels": root / "labels.csv", "classes": root / "classes.csv", "images": images}


class SignalAtStep(L.Callback):
    """Send this process a signal once training reaches a given global step (or prediction a given
    number of batches): preemption, Ctrl-C, a kill, as a scheduler or a user sends it, at a known step."""

    def __init__(self, step: int, signum: int = 15, in_validation: bool = False, rank: int | None = None):
        self.step, self.signum, self.sent, self.predicted = step, signum, False, 0
        self.in_validation = in_validation  # during the first validation batch at or after the step
        self.rank = rank  # under DDP: only this rank is signalled (None: every rank)

    def _signal(self, trainer=None) -> None:
        import os

        self.sent = True
        if self.rank is None or trainer is None or trainer.global_rank == self.rank:
            os.kill(os.getpid(), self.signum)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step >= self.step and not self.sent and not self.in_validation:
            self._signal(trainer)

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        if self.in_validation and trainer.global_step >= self.step and not self.sent and not trainer.sanity_checking:
            self._signal(trainer)

    def on_predict_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        self.predicted += 1  # prediction has no global step: count its batches
        if self.predicted >= self.step and not self.sent:
            self._signal()
